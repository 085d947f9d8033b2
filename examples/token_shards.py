"""Token shards: a tokenized corpus on disk, written once by prepare_data.py and memory-mapped by
train.py, so that a corpus larger than memory trains.

A shard folder holds, per split (``train``, ``val``), files ``<split>-00000.bin``, ... of raw
little-endian token ids (``uint16`` when the vocabulary fits, else ``uint32``), the tokenizer
(``tokenizer.json``, for BPE) and ``index.json``, written last::

    {"format": "gam_ext token shards", "version": 1, "dtype": "uint16", "vocab_size": 2048,
     "tokenizer": {"type": "bpe", "file": "tokenizer.json", "eos_id": 3, ...},
     "source": "...", "splits": {"train": {"documents": 9000, "tokens": 1234567,
     "shards": [{"file": "train-00000.bin", "tokens": 1234567}]}, "val": {...}}}

Documents follow each other in a split, each ended by the tokenizer's end-of-document token.
Training reads random windows of ``seq_len + 1`` tokens (see :class:`WindowSampler`): the
windows of a step depend only on the seed and the step, so a resumed run reads what the
uninterrupted run would have read. Validation reads the split's consecutive chunks.

The shards are memory-mapped. A page fault maps more of the file than the window it needs (the
kernel maps whole page-cache folios, up to megabytes), so after copying a window out the reader
drops its mapped pages again (``madvise(MADV_DONTNEED)``; the page cache keeps them): the resident
memory of a reader stays at a few megabytes whatever the shards' size.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "gam_ext token shards"
VERSION = 1
INDEX = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


class ShardError(Exception):
    """A shard folder that cannot be read: printed as one line."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


class SplitWriter:
    """Appends token ids of one split to ``<split>-NNNNN.bin`` files of ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0
        self._file: Any = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.folder / name, "wb")

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self.documents += documents
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def write_index(folder: Path, index: dict[str, Any]) -> None:
    tmp = folder / f".{INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **index}, indent=2) + "\n")
    os.replace(tmp, folder / INDEX)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split's shards, memory-mapped read-only: ``arrays[i]`` is a numpy view of ``maps[i]``."""

    name: str
    arrays: list[np.ndarray]
    maps: list[mmap.mmap]
    documents: int

    @property
    def tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def read(self, shard: int, start: int, stop: int) -> np.ndarray:
        """A copy of tokens ``start:stop`` of shard ``shard``; the pages it mapped are unmapped
        again (they stay in the page cache, and the next read maps them anew)."""
        out = np.array(self.arrays[shard][start:stop])
        if hasattr(mmap, "MADV_DONTNEED"):
            self.maps[shard].madvise(mmap.MADV_DONTNEED)
        return out


class TokenShards:
    """A shard folder: its index, tokenizer description and memory-mapped splits."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not self.folder.is_dir():
            raise ShardError(f"--shards: no folder {self.folder}")
        if not path.is_file():
            raise ShardError(
                f"--shards: {self.folder} has no {INDEX} (write one with "
                "examples/prepare_data.py; a run that did not finish leaves none)"
            )
        try:
            index = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"--shards: cannot read {path}: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ShardError(f"--shards: {path} is not an index of token shards")
        if index.get("version") != VERSION:
            raise ShardError(
                f"--shards: {path} has version {index.get('version')}, this script reads version {VERSION}"
            )
        self.index = index
        self.vocab_size = int(index["vocab_size"])
        self.dtype = np.dtype(index["dtype"])
        if self.dtype not in (np.uint16, np.uint32):
            raise ShardError(f"--shards: {path}: dtype must be uint16 or uint32, got {self.dtype}")
        self.tokenizer_info: dict[str, Any] = index["tokenizer"]
        self.splits = {name: self._split(name) for name in SPLITS}

    def _split(self, name: str) -> Split:
        info = self.index["splits"].get(name, {"documents": 0, "shards": []})
        arrays, maps = [], []
        for shard in info["shards"]:
            path = self.folder / shard["file"]
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if not path.is_file():
                raise ShardError(f"--shards: {path} is missing (listed in {INDEX})")
            if path.stat().st_size != expected:
                raise ShardError(
                    f"--shards: {path} has {path.stat().st_size} bytes, {INDEX} "
                    f"says {expected} ({shard['tokens']} tokens of {self.dtype})"
                )
            if shard["tokens"]:
                with open(path, "rb") as f:
                    maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                arrays.append(np.frombuffer(maps[-1], dtype=self.dtype.newbyteorder("<")))
        return Split(name, arrays, maps, int(info["documents"]))

    def fingerprint(self) -> str:
        """Names, sizes and tokenizer of the shards: what a resumed run must find again."""
        content = {
            "splits": self.index["splits"],
            "dtype": self.index["dtype"],
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_info,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def load_tokenizer(self) -> Any:
        """The tokenizer that wrote the shards, for decoding samples."""
        from lm_data import BPETokenizer, ByteTokenizer

        kind = self.tokenizer_info["type"]
        if kind == "byte":
            return ByteTokenizer()
        from tokenizers import Tokenizer

        path = self.folder / self.tokenizer_info["file"]
        if not path.is_file():
            raise ShardError(f"--shards: the tokenizer {path} is missing")
        tokenizer = BPETokenizer(Tokenizer.from_file(str(path)), path)
        tokenizer.description = f"{kind} ({tokenizer.vocab_size}) from {path.name}"
        return tokenizer


class WindowSampler:
    """Random windows of ``seq_len + 1`` tokens from a split, drawn afresh for every step.

    Step ``s`` draws ``batch_size * world`` window starts, uniform over every position where a
    whole window fits inside one shard, from a generator seeded with ``(seed, s)``; process
    ``rank`` takes its consecutive ``batch_size`` of them. So one process with batch ``B * world``
    reads the same windows as ``world`` processes with batch ``B``, and the position of a run is
    its step: a resumed run continues where it stopped.
    """

    def __init__(self, split: Split, seq_len: int, seed: int) -> None:
        self.split, self.window, self.seed = split, seq_len + 1, seed
        starts = [max(0, len(a) - self.window + 1) for a in split.arrays]
        self.cumulative = np.cumsum([0, *starts])
        if self.cumulative[-1] == 0:
            raise ShardError(
                f"--shards: no shard of the {split.name} split holds a window of "
                f"--seq-len {seq_len} + 1 tokens"
            )

    def windows(self, step: int, count: int, first: int = 0, total: int | None = None) -> np.ndarray:
        """Windows ``first .. first + count - 1`` of the ``total`` drawn at ``step``."""
        total = count if total is None else total
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        starts = rng.integers(0, self.cumulative[-1], size=total)[first : first + count]
        shard = np.searchsorted(self.cumulative, starts, side="right") - 1
        offsets = starts - self.cumulative[shard]
        return np.stack(
            [self.split.read(s, o, o + self.window) for s, o in zip(shard, offsets, strict=True)]
        ).astype(np.int64)

    def batch(
        self, step: int, batch_size: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.windows(step, batch_size, rank * batch_size, batch_size * world))
        return w[:, :-1], w[:, 1:]


class Chunks:
    """A split cut into consecutive ``seq_len + 1``-token chunks (per shard, tails dropped), as the
    in-memory path does; ``x`` (the first seq_len tokens) or ``y`` (the last), read on demand.

    Indexing takes a slice of chunks, optionally followed by an index into the tokens:
    ``chunks[a:b]`` is a ``(b - a, seq_len)`` LongTensor, ``chunks[:1, :16]`` its first 16 tokens.
    """

    def __init__(self, split: Split, seq_len: int, shift: int) -> None:
        self.split, self.window, self.shift = split, seq_len + 1, shift
        self.counts = np.cumsum([0, *(len(a) // self.window for a in split.arrays)])

    def __len__(self) -> int:
        return int(self.counts[-1])

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(rows, slice):
            raise TypeError("chunks are indexed by a slice")
        chunks = []
        for i in range(*rows.indices(len(self))):
            s = int(np.searchsorted(self.counts, i, side="right") - 1)
            start = (i - int(self.counts[s])) * self.window
            chunks.append(self.split.read(s, start + self.shift, start + self.window - 1 + self.shift))
        seq = self.window - 1
        out = (
            torch.from_numpy(np.stack(chunks).astype(np.int64))
            if chunks
            else torch.empty(0, seq, dtype=torch.long)
        )
        return out[(slice(None), *rest)] if rest else out

    def targets_unigram_counts(self, vocab_size: int, rows_per_read: int = 4096) -> np.ndarray:
        """Token counts of every chunk's targets, read in pieces."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for a in range(0, len(self), rows_per_read):
            ids = self[a : a + rows_per_read].numpy().ravel()
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
        return counts
