"""The data of a training run: the training batches and the validation chunks, from a corpus held in
memory, from token shards on disk (``--shards``, memory-mapped), or the recall task.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lm_data import (
    ByteTokenizer,
    RecallSpec,
    bpe_tokenizer,
    chunk,
    load_corpus,
    recall_examples,
    unigram_perplexity,
)
from token_shards import Chunks, ShardError, TokenShards, WindowSampler
from torch.utils.data.distributed import DistributedSampler
from train_args import UserError, dataset_name
from train_parallel import Dist


class ChunkBatches:
    """Chunks held in memory, shuffled by a DistributedSampler each epoch; this process's share."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, ctx: Dist) -> None:
        self.x, self.y, self.batch_size, self.seed, self.device = x, y, batch_size, seed, ctx.device
        self.sampler = DistributedSampler(
            range(len(x)), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.too_small = (
            f"the training split has {len(x)} chunks of --seq-len {x.shape[1]} + 1 tokens, fewer "
            f"than one batch (--batch-size {batch_size} x {ctx.world} processes): lower "
            "--batch-size or --seq-len, or give more text"
        )
        self._order: torch.Tensor | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._order is None or i == 0:
            self.sampler.set_epoch(epoch)
            self._order = torch.tensor(list(self.sampler))
        idx = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def position(self, step: int) -> dict[str, Any]:
        return {
            "sampler_seed": self.seed,
            "epoch": step // self.steps_per_epoch,
            "index_in_epoch": step % self.steps_per_epoch,
        }


class WindowBatches:
    """Random windows of memory-mapped token shards; step s reads the windows drawn for step s."""

    def __init__(
        self, sampler: WindowSampler, batch_size: int, seed: int, ctx: Dist, fingerprint: str
    ) -> None:
        self.sampler, self.batch_size, self.seed, self.ctx = sampler, batch_size, seed, ctx
        self.fingerprint = fingerprint
        windows = sum(len(a) // sampler.window for a in sampler.split.arrays)
        # An "epoch" is as many windows as the split holds chunks of seq_len + 1 tokens.
        self.steps_per_epoch = windows // (batch_size * ctx.world)
        self.too_small = (
            f"the training shards hold {windows} windows of --seq-len {sampler.window - 1} + 1 "
            f"tokens, fewer than one batch (--batch-size {batch_size} x {ctx.world} processes)"
        )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.batch(step, self.batch_size, self.ctx.rank, self.ctx.world)
        return x.to(self.ctx.device), y.to(self.ctx.device)

    def position(self, step: int) -> dict[str, Any]:
        return {
            "shards_seed": self.seed,
            "step": step,
            "windows_drawn": step * self.batch_size * self.ctx.world,
            "fingerprint": self.fingerprint,
        }


@dataclass
class Data:
    name: str
    train: ChunkBatches | WindowBatches
    val_x: torch.Tensor | Chunks
    val_y: torch.Tensor | Chunks
    vocab_size: int
    tokenizer: Any  # None for recall
    description: str
    unigram_ppl: float


def prepare_data(args: argparse.Namespace, ctx: Dist) -> Data:
    name = dataset_name(args)
    if args.dataset == "recall":
        spec = RecallSpec(args.recall_pairs, args.recall_keys, args.recall_values)
        args.seq_len = spec.seq_len
        train_x, train_y = recall_examples(args.recall_train, spec, seed=args.seed)
        val_x, val_y = recall_examples(args.recall_val, spec, seed=args.seed + 1)
        desc = (
            f"recall: {spec.num_pairs} pairs + {spec.num_pairs} queries over "
            f"{spec.num_keys} keys / {spec.num_values} values, {args.recall_train} train / "
            f"{args.recall_val} val examples of {spec.seq_len} tokens"
        )
        return Data(
            name,
            ChunkBatches(train_x, train_y, args.batch_size, args.seed, ctx),
            val_x,
            val_y,
            spec.vocab_size,
            None,
            desc,
            unigram_perplexity(val_y),
        )
    if args.dataset == "shards":
        return shard_data(args, ctx)

    # Rank 0 trains (and caches) the tokenizer first; the others then read it from the cache.
    if ctx.enabled and not ctx.main:
        dist.barrier()
    corpus = load_corpus(
        None if args.dataset in ("pydoc", "file") else args.dataset, args.train_file, args.val_file
    )
    if args.tokenizer == "byte":
        tokenizer: Any = ByteTokenizer()
    else:
        tokenizer = bpe_tokenizer(corpus, args.vocab_size, Path(args.data_dir) / "tokenizers")
    if ctx.enabled and ctx.main:
        dist.barrier()
    train_ids = tokenizer.encode_docs(corpus.train)
    val_ids = tokenizer.encode_docs(corpus.val)
    train_x, train_y = chunk(train_ids, args.seq_len)
    val_x, val_y = chunk(val_ids, args.seq_len)
    if len(val_x) == 0:
        raise UserError(
            f"the validation split has {len(val_ids)} tokens, fewer than one chunk "
            f"of --seq-len {args.seq_len} + 1"
        )
    desc = (
        f"{name}: {len(train_ids):,} train / {len(val_ids):,} val tokens, tokenizer "
        f"{tokenizer.description}" + (f"; {corpus.note}" if corpus.note else "")
    )
    return Data(
        name,
        ChunkBatches(train_x, train_y, args.batch_size, args.seed, ctx),
        val_x,
        val_y,
        tokenizer.vocab_size,
        tokenizer,
        desc,
        unigram_perplexity(val_y),
    )


def shard_data(args: argparse.Namespace, ctx: Dist) -> Data:
    """Token shards of prepare_data.py, memory-mapped: random training windows, validation in
    consecutive chunks."""
    try:
        shards = TokenShards(args.shards)
        train, val = shards.splits["train"], shards.splits["val"]
        sampler = WindowSampler(train, args.seq_len, args.seed)
        tokenizer = shards.load_tokenizer()
    except ShardError as exc:
        raise UserError(str(exc)) from None
    val_x, val_y = Chunks(val, args.seq_len, shift=0), Chunks(val, args.seq_len, shift=1)
    if len(val_x) == 0:
        raise UserError(
            f"the validation shards hold {val.tokens} tokens, fewer than one chunk "
            f"of --seq-len {args.seq_len} + 1"
        )
    counts = val_y.targets_unigram_counts(shards.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram_ppl = math.exp(float(-(p * np.log(p)).sum()))
    desc = (
        f"shards {shards.folder}: {train.tokens:,} train / {val.tokens:,} val tokens in "
        f"{len(train.arrays)} + {len(val.arrays)} memory-mapped {shards.dtype.name} shard(s), "
        f"random windows; tokenizer {tokenizer.description}; from "
        f"{shards.index.get('source', '?')}"
    )
    batches = WindowBatches(sampler, args.batch_size, args.seed, ctx, shards.fingerprint())
    return Data(dataset_name(args), batches, val_x, val_y, shards.vocab_size, tokenizer, desc, unigram_ppl)
