"""Tokenize a corpus once into token shards that train.py reads by memory map (--shards DIR).

    python examples/prepare_data.py --input corpus/ --out data/shards/corpus        # local text
    python examples/prepare_data.py --hf-dataset wikitext --hf-config wikitext-103-raw-v1 \
        --val-split validation --out data/shards/wikitext103                       # HF datasets
    python examples/train.py --shards data/shards/corpus

Inputs: local UTF-8 text files or folders (read recursively, files matching --glob, in name
order; one document per blank-line separated paragraph, or per line in a file whose first MiB has
no blank line), or a Hugging Face dataset (streamed where the dataset allows, so it is never
downloaded whole). Every --val-every-th document goes to the validation split, unless
--val-input or --val-split names one.

The tokenizer is the training example's BPE (--vocab-size; trained on the first
--bpe-sample-mb MiB of the training documents and saved as tokenizer.json), UTF-8 bytes
(--tokenizer byte), or an existing `tokenizers` JSON file (--tokenizer-file). Output: the shards,
tokenizer.json and index.json (see token_shards.py); a progress bar counts documents and tokens.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import itertools
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import numpy as np  # noqa: E402
from lm_data import (  # noqa: E402
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    DataError,
    bpe_tokenizer,
)
from token_shards import (  # noqa: E402
    INDEX,
    TOKENIZER_FILE,
    SplitWriter,
    token_dtype,
    write_index,
)

ENCODE_BATCH = 512  # documents per tokenizer call


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize a corpus into token shards for examples/train.py --shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write the shards into")
    src = p.add_argument_group("source (one of)")
    src.add_argument(
        "--input", nargs="+", metavar="PATH", help="local UTF-8 text files or folders (read recursively)"
    )
    src.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset, e.g. wikitext")
    g = p.add_argument_group("source options")
    g.add_argument("--glob", default="*", help="files to read inside folders")
    g.add_argument(
        "--val-input",
        nargs="+",
        metavar="PATH",
        help="local validation text (default: every --val-every-th document)",
    )
    g.add_argument("--hf-config", help="the dataset's configuration, e.g. wikitext-103-raw-v1")
    g.add_argument("--split", default="train", help="the dataset's training split")
    g.add_argument(
        "--val-split", help="the dataset's validation split (default: every --val-every-th training document)"
    )
    g.add_argument("--text-field", default="text", help="the dataset's text column")
    g.add_argument("--no-streaming", action="store_true", help="download the dataset instead of streaming it")
    g.add_argument("--val-every", type=int, default=100, help="hold out every N-th document for validation")
    g.add_argument("--max-docs", type=int, default=0, help="stop after this many training documents (0: all)")
    t = p.add_argument_group("tokenizer")
    t.add_argument(
        "--tokenizer",
        choices=("bpe", "byte"),
        default="bpe",
        help="BPE trained on the first --bpe-sample-mb MiB, or UTF-8 bytes",
    )
    t.add_argument("--tokenizer-file", help="use this `tokenizers` JSON file instead")
    t.add_argument("--vocab-size", type=int, default=10000, help="BPE vocabulary size")
    t.add_argument(
        "--bpe-sample-mb", type=float, default=100.0, help="MiB of training text the BPE is trained on"
    )
    o = p.add_argument_group("output")
    o.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    o.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.input is None) == (args.hf_dataset is None):
        parser.error("give one source: --input PATH... or --hf-dataset NAME")
    if args.val_input and args.input is None:
        parser.error("--val-input goes with --input")
    if args.val_split and args.hf_dataset is None:
        parser.error("--val-split goes with --hf-dataset")
    for name in ("val_every", "shard_tokens", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_docs < 0 or args.bpe_sample_mb <= 0:
        parser.error("--max-docs must be >= 0 and --bpe-sample-mb > 0")
    for path in [
        *(args.input or []),
        *(args.val_input or []),
        *([args.tokenizer_file] if args.tokenizer_file else []),
    ]:
        if not os.path.exists(path):
            parser.error(f"no such file or folder: {path}")
    return args


# ------------------------------------------------------------------------------------------------
# Documents: local files (streamed line by line) or a Hugging Face dataset
# ------------------------------------------------------------------------------------------------


def list_files(paths: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and fnmatch.fnmatch(p.name, pattern)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise DataError(f"no files matching {pattern!r} under {' '.join(paths)}")
    return files


def file_documents(path: Path) -> Iterator[str]:
    """The documents of one UTF-8 file, read line by line: paragraphs, or lines in a file whose
    first MiB has no blank line (as train.py's --train-file)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} is not a text file (byte {nul} is NUL)")
    text_head = head.decode("utf-8", errors="ignore").replace("\r\n", "\n").replace("\r", "\n")
    by_lines = not re.search(r"\n[ \t]*\n", text_head) and text_head.count("\n") > 1
    paragraph: list[str] = []
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for line in f:
                line = line.strip()
                if "\0" in line:
                    raise DataError(f"{path} is not a text file (it holds NUL bytes)")
                if by_lines:
                    if line:
                        yield line
                elif line:
                    paragraph.append(line)
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start} of a "
            "block): convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if paragraph:
        yield "\n".join(paragraph)


def local_documents(paths: list[str], pattern: str) -> Iterator[str]:
    for path in list_files(paths, pattern):
        yield from file_documents(path)


def hf_documents(args: argparse.Namespace, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("--hf-dataset needs the `datasets` package (pip install datasets)") from exc
    datasets.disable_progress_bars()
    streaming = not args.no_streaming
    try:
        ds = datasets.load_dataset(args.hf_dataset, args.hf_config, split=split, streaming=streaming)
    except Exception as exc:
        if not streaming:
            raise DataError(
                f"cannot load {args.hf_dataset} ({split}): {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        print(
            f"note: {args.hf_dataset} does not stream ({type(exc).__name__}); downloading it", file=sys.stderr
        )
        try:
            ds = datasets.load_dataset(args.hf_dataset, args.hf_config, split=split)
        except Exception as exc2:
            raise DataError(
                f"cannot load {args.hf_dataset} ({split}): {type(exc2).__name__}: {str(exc2)[:300]}"
            ) from None
    for record in ds:
        if args.text_field not in record:
            raise DataError(
                f"{args.hf_dataset} has no column {args.text_field!r} (it has "
                f"{sorted(record)}): pass --text-field"
            )
        text = record[args.text_field]
        if isinstance(text, str) and text.strip():
            yield text.strip()


def sources(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Factories of the training and validation document streams (None: hold out every
    --val-every-th training document), and a description of the source."""
    if args.input is not None:
        train = lambda: local_documents(args.input, args.glob)  # noqa: E731
        val = (lambda: local_documents(args.val_input, args.glob)) if args.val_input else None
        files = list_files(args.input, args.glob)
        return train, val, f"local: {len(files)} file(s) under {' '.join(args.input)}"
    train = lambda: hf_documents(args, args.split)  # noqa: E731
    val = (lambda: hf_documents(args, args.val_split)) if args.val_split else None
    name = args.hf_dataset + (f" ({args.hf_config})" if args.hf_config else "")
    return train, val, f"Hugging Face dataset {name}, split {args.split}"


def split_stream(docs: Iterable[str], val_every: int, max_docs: int) -> Iterator[tuple[str, str]]:
    """(split, document) pairs: every val_every-th document is validation."""
    train_count = 0
    for i, doc in enumerate(docs):
        if i % val_every == val_every - 1:
            yield "val", doc
        else:
            if max_docs and train_count >= max_docs:
                return
            train_count += 1
            yield "train", doc


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def make_tokenizer(args: argparse.Namespace, stream: Any, out: Path) -> tuple[Any, dict]:
    """The tokenizer and its description for the index; ``stream()`` yields (split, document)."""
    if args.tokenizer_file:
        from tokenizers import Tokenizer

        path = out / TOKENIZER_FILE
        shutil.copyfile(args.tokenizer_file, path)
        tok = BPETokenizer(Tokenizer.from_file(str(path)), path)
        return tok, {"type": "file", "file": TOKENIZER_FILE, "source": str(args.tokenizer_file)}
    if args.tokenizer == "byte":
        return ByteTokenizer(), {"type": "byte"}
    # The BPE of train.py, trained on a prefix of the training documents.
    limit, size, sample = args.bpe_sample_mb * (1 << 20), 0, []
    for split, doc in stream():
        if split == "train":
            sample.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= limit:
                break
    if not sample:
        raise DataError("the training split holds no text")
    corpus = Corpus(f"shards-{out.name}", sample, [])
    tok = bpe_tokenizer(corpus, args.vocab_size, out / ".tokenizer-cache")
    shutil.copyfile(tok.path, out / TOKENIZER_FILE)
    shutil.rmtree(out / ".tokenizer-cache", ignore_errors=True)
    return BPETokenizer(tok.tokenizer, out / TOKENIZER_FILE), {
        "type": "bpe",
        "file": TOKENIZER_FILE,
        "trained_on_mb": round(size / (1 << 20), 3),
        "trained_on_documents": len(sample),
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    if (out / INDEX).exists() and not args.overwrite:
        raise DataError(f"{out} already holds token shards ({INDEX}); pass --overwrite to replace them")
    needs = {"tqdm": "the progress bar"}
    if args.tokenizer == "bpe" or args.tokenizer_file:
        needs["tokenizers"] = "the tokenizer; --tokenizer byte needs none"
    missing = [f"{p} ({why})" for p, why in needs.items() if importlib.util.find_spec(p) is None]
    if missing:
        raise DataError(f"this needs packages that are not installed: {', '.join(missing)}")
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("train-*.bin"), *out.glob("val-*.bin"), out / INDEX]:
        old.unlink(missing_ok=True)
    train_docs, val_docs, source = sources(args)

    def stream() -> Iterator[tuple[str, str]]:
        if val_docs is None:
            yield from split_stream(train_docs(), args.val_every, args.max_docs)
        else:
            yield from (("train", d) for d in itertools.islice(train_docs(), args.max_docs or None))
            yield from (("val", d) for d in val_docs())

    t0 = time.perf_counter()
    tokenizer, tokenizer_info = make_tokenizer(args, stream, out)
    tokenizer_info.update(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(out, split, dtype, args.shard_tokens) for split in ("train", "val")}
    bar = tqdm(desc="tokenizing", unit=" docs", mininterval=1.0, dynamic_ncols=True)
    for batch in batched(stream(), ENCODE_BATCH):
        for split, group in itertools.groupby(batch, key=lambda pair: pair[0]):
            docs = [doc for _, doc in group]
            writers[split].write(np.asarray(tokenizer.encode_docs(docs), dtype=np.int64), documents=len(docs))
        bar.update(len(batch))
        bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)
    bar.close()
    for writer in writers.values():
        writer.close()
    if writers["train"].tokens == 0 or writers["val"].tokens == 0:
        empty = "training" if writers["train"].tokens == 0 else "validation"
        raise DataError(f"the {empty} split is empty: give more text, or lower --val-every")
    index = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer_info,
        "source": source,
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    write_index(out, index)
    seconds = time.perf_counter() - t0
    print(
        f"wrote {out}: {writers['train'].tokens:,} training tokens in "
        f"{len(writers['train'].shards)} shard(s), {writers['val'].tokens:,} validation tokens "
        f"({writers['train'].documents:,} + {writers['val'].documents:,} documents), "
        f"{dtype.name}, vocabulary {tokenizer.vocab_size}, {seconds:.1f} s\n"
        f"train with: python examples/train.py --shards {out}"
    )
    return index


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
