"""Checkpoints of the training example: what a run saves, and how ``--resume`` takes it back.

A checkpoint holds the model, optimizer, scheduler and grad scaler, the step, the train-loss
accumulator, the metrics so far, the data-order position, every process's RNG state and the run's
settings; ``--resume`` continues from it exactly, bit for bit.

Under FSDP (--fsdp) the model and optimizer states stay sharded: every process writes its shards
through ``torch.distributed.checkpoint`` into ``ckpt-shards/step-NNNNNNNN/`` (on a file system
that every node sees), and ``ckpt.pt``, written last, holds the rest and names that folder; older
step folders are removed once it is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def save_checkpoint(path: Path, ctx: Dist, local: dict[str, Any] | None = None, **state: Any) -> None:
    """Rank 0 writes ``path`` atomically. Every process's RNG state goes in (dropout masks), and
    its ``local`` values (its own training-loss accumulator) as ``ckpt["local"][rank]``."""
    rngs = [rng_state(ctx)]
    locals_ = [local or {}]
    if ctx.enabled:
        rngs, locals_ = [None] * ctx.world, [None] * ctx.world
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(ctx).items()})
        dist.all_gather_object(locals_, local or {})
    if ctx.main:
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "rng": rngs, "local": locals_}, tmp)
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
    if not isinstance(ckpt, dict) or "args" not in ckpt or not ("model" in ckpt or "sharded" in ckpt):
        raise UserError(f"--resume: {path} is not a checkpoint of this script")
    if "sharded" in ckpt and not (path.parent / ckpt["sharded"]).is_dir():
        raise UserError(
            f"--resume: {path} names the sharded model and optimizer state "
            f"{ckpt['sharded']}/, which is not in {path.parent}"
        )
    ckpt["folder"] = path.parent
    for key, value in ckpt["args"].items():
        if key in RUN_CONTROL:
            continue
        if key in RELOCATABLE and getattr(args, key, None) is not None:
            continue  # a copy of the same data elsewhere (checked when the data loads)
        if key in args.explicit and getattr(args, key, None) != value:
            print(
                f"warning: resuming keeps the checkpoint's {key}={value!r} "
                f"(ignoring --{key.replace('_', '-')} {getattr(args, key)!r})",
                file=sys.stderr,
            )
        setattr(args, key, value)
    return ckpt


SHARDS = "ckpt-shards"


def save_sharded_checkpoint(out_dir: Path, ctx: Dist, model: Any, optimizer: Any, **state: Any) -> None:
    """Every process writes its shards of the model and optimizer states with
    torch.distributed.checkpoint; then ``ckpt.pt`` (rank 0) names them and holds ``state``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDS}/step-{state['step']:08d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out_dir / name)
    save_checkpoint(out_dir / "ckpt.pt", ctx, sharded=name, **state)
    if ctx.main:
        for old in (out_dir / SHARDS).iterdir():
            if old.name != Path(name).name:
                shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(ckpt: dict[str, Any], model: Any, optimizer: Any) -> None:
    """Load the sharded model and optimizer states that ``ckpt`` names (each process its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(ckpt["folder"]) / ckpt["sharded"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
