"""Data for the training example: corpora, tokenizers, chunking and the synthetic recall task.

Corpora come as lists of documents per split:

- ``pydoc``: the default, offline. The Python documentation topics shipped with every Python
  (``pydoc_data.topics``), cut into paragraphs and split deterministically 90/10 by blocks.
- ``wikitext2`` / ``tinystories``: Hugging Face ``datasets`` (needs the network or its cache).
- local text files (``--train-file`` / ``--val-file``).

Tokenizers: the paper's BPE (HF ``tokenizers``, Whitespace pre-tokenizer, specials [UNK] [PAD]
[SOS] [EOS]) trained on the training split only and cached on disk, or raw bytes.

Language-model chunking as the paper: every split's tokens concatenated and cut into seq_len + 1
token chunks, x = chunk[:-1], y = chunk[1:]. The recall task masks its targets with -100 except
at the answers, so the loss and accuracy count only what the model retrieves from its context.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[SOS]", "[EOS]"]
HF_DATASETS = ("wikitext2", "tinystories")
ALTERNATIVES = (
    "Alternatives that need no network: run with no data flag for the built-in offline corpus "
    "(the Python documentation topics), --train-file/--val-file for your own text, or "
    "--dataset recall for the synthetic recall task."
)
IGNORE_INDEX = -100


class DataError(Exception):
    """A user-facing data problem (missing file, no network): printed without a traceback."""


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    note: str = ""  # how the documents were cut, for the run's header


# ------------------------------------------------------------------------------------------------
# Corpora
# ------------------------------------------------------------------------------------------------


def pydoc_corpus(val_every: int = 10, block: int = 20) -> Corpus:
    """The stdlib's documentation topics as an English corpus present on any machine with Python.

    Topics in name order are cut into paragraphs; paragraphs go in blocks of ``block``, and every
    ``val_every``-th block is the validation split: deterministic and spread over all topics.
    """
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
    train, val = [], []
    for i, paragraph in enumerate(paragraphs):
        (val if (i // block) % val_every == val_every - 1 else train).append(paragraph)
    return Corpus("pydoc", train, val)


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 text (binary data, another encoding) is
    refused rather than read with replacement characters."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"{path} is not a text file (byte {nul} is NUL): --train-file and --val-file take UTF-8 text"
        )
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}): "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_documents(text: str) -> tuple[list[str], str]:
    """Split text into documents: blank-line separated paragraphs, or lines when it has no blank
    lines. Returns the documents and what they are ("paragraphs" or "lines")."""
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) == 1:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            return lines, "lines"
    return paragraphs, "paragraphs"


def file_corpus(train_file: str, val_file: str | None, val_fraction: float = 0.1) -> Corpus:
    """Local UTF-8 text: one document per blank-line separated paragraph (per line in a file with
    no blank lines); without a validation file, the last ``val_fraction`` of the training file's
    documents."""

    def read(path: str) -> tuple[list[str], str]:
        docs, unit = text_documents(read_text_file(path))
        if not docs:
            raise DataError(f"{path} holds no text")
        return docs, unit

    train, unit = read(train_file)
    note = f"documents: {unit}"
    if val_file is not None:
        val, val_unit = read(val_file)
        if val_unit != unit:
            note = f"documents: {unit} (train), {val_unit} (validation)"
    else:
        if len(train) < 2:
            raise DataError(
                f"{train_file} is one line of text: too short to split off a "
                "validation part; give more lines or paragraphs, or pass --val-file"
            )
        cut = max(1, round(len(train) * (1 - val_fraction)))
        cut = min(cut, len(train) - 1)
        train, val = train[:cut], train[cut:]
        note += f", the last {len(val)} of {len(train) + len(val)} for validation"
    name = "file-" + Path(train_file).stem
    return Corpus(name, train, val, note)


def _hub_reachable(timeout: float) -> bool:
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets/wikitext", timeout=timeout)
        return True
    except Exception:
        return False


def hf_corpus(name: str, timeout: float = 5.0) -> Corpus:
    """WikiText-2 (raw) or TinyStories (first 50k train / 5k validation stories, as the paper).

    Probes the Hub for ``timeout`` seconds first; offline, it runs ``datasets`` in offline mode so
    that a cached copy still loads, and otherwise fails at once with the alternatives.
    """
    online = _hub_reachable(timeout)
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"--dataset {name} needs the `datasets` package (pip install datasets). " + ALTERNATIVES
        ) from exc
    datasets.disable_progress_bars()
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
            train = [t for t in ds["train"]["text"] if t.strip()]
            val = [t for t in ds["validation"]["text"] if t.strip()]
        else:
            ds = datasets.load_dataset("roneneldan/TinyStories")
            train = list(ds["train"].select(range(50_000))["text"])
            val = list(ds["validation"].select(range(5_000))["text"])
    except Exception as exc:
        why = "the Hugging Face Hub is not reachable and no cached copy was found"
        if online:
            why = f"loading failed: {type(exc).__name__}: {str(exc)[:300]}"
        raise DataError(f"cannot load --dataset {name}: {why}. " + ALTERNATIVES) from None
    return Corpus(name, train, val)


def load_corpus(dataset: str | None, train_file: str | None, val_file: str | None) -> Corpus:
    if train_file is not None:
        return file_corpus(train_file, val_file)
    if dataset in HF_DATASETS:
        return hf_corpus(dataset)
    return pydoc_corpus()


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode_docs(self, docs: list[str]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; documents end with a newline byte."""

    vocab_size = 256
    eos_id = None
    description = "byte (256)"

    def encode_docs(self, docs: list[str]) -> list[int]:
        return list("\n".join(docs).encode("utf-8")) + [10]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """The paper's BPE: Whitespace pre-tokenizer, specials [UNK] [PAD] [SOS] [EOS].

    Word-final pieces carry a ``</w>`` suffix so that samples decode with their word breaks (the
    vocabulary size, pre-tokenizer and specials are the paper's). Each document ends with [EOS].
    """

    def __init__(self, tokenizer: object, path: Path) -> None:
        self.tokenizer = tokenizer
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id("[EOS]")
        self.description = f"BPE ({self.vocab_size}), cached at {path}"

    def encode_docs(self, docs: list[str]) -> list[int]:
        ids: list[int] = []
        for encoding in self.tokenizer.encode_batch(docs):
            ids.extend(encoding.ids)
            if self.eos_id is not None:  # a tokenizer file without [EOS] (prepare_data.py)
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def bpe_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike) -> BPETokenizer:
    """Train (or load from the cache) a BPE tokenizer on the training split only.

    The cache file is keyed by the corpus name, the settings and a hash of the training text.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    settings = {
        "vocab_size": vocab_size,
        "pre_tokenizer": "Whitespace",
        "specials": SPECIAL_TOKENS,
        "end_of_word_suffix": "</w>",
        "version": 1,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in corpus.train:
        digest.update(doc.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    path = Path(cache_dir) / f"bpe-{corpus.name}-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return BPETokenizer(HFTokenizer.from_file(str(path)), path)

    tokenizer = HFTokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, end_of_word_suffix="</w>", show_progress=False
    )
    tokenizer.train_from_iterator(corpus.train, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return BPETokenizer(tokenizer, path)


# ------------------------------------------------------------------------------------------------
# Chunking and the baseline it is compared with
# ------------------------------------------------------------------------------------------------


def chunk(ids: list[int] | torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into (seq_len + 1)-token chunks: x = chunk[:-1], y = chunk[1:]."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n_chunks = len(ids) // (seq_len + 1)
    chunks = ids[: n_chunks * (seq_len + 1)].view(n_chunks, seq_len + 1)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def unigram_perplexity(targets: torch.Tensor) -> float:
    """Perplexity of the targets under their own unigram distribution, exp(entropy).

    The best any model that ignores context can do on these tokens: a language model has learned
    from context only where its perplexity is far below this. Positions equal to -100 are skipped.
    """
    t = targets[targets != IGNORE_INDEX]
    counts = torch.bincount(t.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


# ------------------------------------------------------------------------------------------------
# Synthetic multi-query associative recall
# ------------------------------------------------------------------------------------------------


@dataclass
class RecallSpec:
    num_pairs: int = 16
    num_keys: int = 64
    num_values: int = 64

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        return 4 * self.num_pairs - 1


def recall_examples(num_examples: int, spec: RecallSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall: ``k1 v1 ... kP vP`` then every key again as a query.

    Token ids: keys 0..num_keys-1, values num_keys..num_keys+num_values-1. Each sequence draws P
    distinct keys with random values, lists the pairs, then queries the P keys in a new random
    order, each query followed by its value. x = seq[:-1]; y = seq[1:] with -100 everywhere but
    where x holds a query (the model must then produce that key's value: 1/num_values by chance).
    Sequences are 4P tokens, so x and y are (num_examples, 4P - 1).
    """
    if spec.num_pairs > spec.num_keys:
        raise ValueError(f"num_pairs {spec.num_pairs} exceeds num_keys {spec.num_keys}")
    g = torch.Generator().manual_seed(seed)
    n, p = num_examples, spec.num_pairs
    keys = torch.argsort(torch.rand(n, spec.num_keys, generator=g), dim=1)[:, :p]
    values = spec.num_keys + torch.randint(0, spec.num_values, (n, p), generator=g)
    order = torch.argsort(torch.rand(n, p, generator=g), dim=1)
    seq = torch.empty(n, 4 * p, dtype=torch.long)
    seq[:, 0 : 2 * p : 2] = keys
    seq[:, 1 : 2 * p : 2] = values
    seq[:, 2 * p :: 2] = keys.gather(1, order)
    seq[:, 2 * p + 1 :: 2] = values.gather(1, order)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].clone()
    answer = torch.zeros_like(y, dtype=torch.bool)
    answer[:, 2 * p :: 2] = True  # y at position 2P + 2i is the value of query i (x at 2P + 2i)
    y[~answer] = IGNORE_INDEX
    return x, y
