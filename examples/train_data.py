"""The data of a training run: the training and validation token chunks (or the recall task) as
the flags select them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from train_args import UserError, dataset_name
from train_parallel import Dist


@dataclass
class Data:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
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
        desc = (f"recall: {spec.num_pairs} pairs + {spec.num_pairs} queries over "
                f"{spec.num_keys} keys / {spec.num_values} values, {args.recall_train} train / "
                f"{args.recall_val} val examples of {spec.seq_len} tokens")
        return Data(name, train_x, train_y, val_x, val_y, spec.vocab_size, None, desc,
                    unigram_perplexity(val_y))

    # Rank 0 trains (and caches) the tokenizer first; the others then read it from the cache.
    if ctx.enabled and not ctx.main:
        dist.barrier()
    corpus = load_corpus(None if args.dataset in ("pydoc", "file") else args.dataset,
                         args.train_file, args.val_file)
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
        raise UserError(f"the validation split has {len(val_ids)} tokens, fewer than one chunk "
                        f"of --seq-len {args.seq_len} + 1")
    desc = (f"{name}: {len(train_ids):,} train / {len(val_ids):,} val tokens, tokenizer "
            f"{tokenizer.description}" + (f"; {corpus.note}" if corpus.note else ""))
    return Data(name, train_x, train_y, val_x, val_y, tokenizer.vocab_size, tokenizer, desc,
                unigram_perplexity(val_y))
