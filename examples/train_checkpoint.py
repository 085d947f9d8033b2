"""Checkpoints of the training example: what a run saves, and how ``--resume`` takes it back.

A checkpoint holds the model, optimizer, scheduler and grad scaler, the step, the train-loss
accumulator, the metrics so far, the data-order position, every process's RNG state and the run's
settings; ``--resume`` continues from it exactly, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from train_args import RELOCATABLE, RUN_CONTROL, UserError
from train_parallel import Dist


def rng_state(ctx: Dist) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def save_checkpoint(path: Path, ctx: Dist, **state: Any) -> None:
    """Rank 0 writes ``path`` atomically; every process's RNG state goes in (dropout masks)."""
    rngs = [rng_state(ctx)]
    if ctx.enabled:
        rngs = [None] * ctx.world
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(ctx).items()})
    if ctx.main:
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "rng": rngs}, tmp)
        os.replace(tmp, path)
    if ctx.enabled:
        dist.barrier()


def resolve_resume(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load the checkpoint to resume from and take its run-defining settings over ``args``."""
    if args.resume is None:
        return None
    path = Path(args.out_dir) / "ckpt.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt or "model" not in ckpt:
        raise UserError(f"--resume: {path} is not a checkpoint of this script")
    for key, value in ckpt["args"].items():
        if key in RUN_CONTROL:
            continue
        if key in RELOCATABLE and getattr(args, key, None) is not None:
            continue  # a copy of the same data elsewhere (checked when the data loads)
        if key in args.explicit and getattr(args, key, None) != value:
            print(f"warning: resuming keeps the checkpoint's {key}={value!r} "
                  f"(ignoring --{key.replace('_', '-')} {getattr(args, key)!r})", file=sys.stderr)
        setattr(args, key, value)
    return ckpt
