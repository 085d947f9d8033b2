"""How the training example runs on several processes and saves memory: torchrun's environment,
the process group, reductions over processes, FSDP2 sharding (--fsdp) and activation
checkpointing (--activation-checkpointing).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from train_args import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_mean(values: list[float], ctx: Dist) -> list[float]:
    """Mean of each value over the processes (identity without torchrun)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


def all_sum(values: list[float], ctx: Dist) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# FSDP2 and activation checkpointing
# ------------------------------------------------------------------------------------------------


def shard_model(model: nn.Module, ctx: Dist, param_dtype: torch.dtype | None) -> str:
    """Shard ``model`` with FSDP2 over all processes: each block on its own, then the rest (the
    embeddings, tied head and final norm) at the root. Each process keeps 1/world of every
    parameter, gradient and optimizer state; a block's parameters are all-gathered just before it
    runs and freed after it, forward and backward. With ``param_dtype`` (bf16 or fp16) the
    all-gathered parameters and the computation use it, while gradients are reduced and the
    sharded parameters and optimizer states kept in fp32. Returns a description."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype is not None
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    precision = (
        "fp32"
        if param_dtype is None
        else (
            f"{str(param_dtype).removeprefix('torch.')} parameters in compute, fp32 gradient "
            "reduction and sharded fp32 parameters"
        )
    )
    return (
        f"FSDP2 over {ctx.world} process(es) ({ctx.device.type}), one unit per block and one "
        f"for the rest; {precision}"
    )


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block's activations in backward instead of keeping them: each block's
    forward runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which keeps only
    the block's input (and replays its dropout masks). The module tree, parameter names and
    state_dict stay as they are, and FSDP's per-block hooks run outside the recomputed region, so
    it composes with FSDP2 and torch.compile."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Any) -> int:
    """Bytes that one training forward keeps for backward, besides the parameters: the tensors
    autograd saves, plus the inputs that activation checkpointing keeps to recompute a block.
    Counts each storage once; runs under its own RNG state (dropout draws nothing from the run's)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def block_input(module: nn.Module, args: tuple) -> None:
        if isinstance(module.forward, functools.partial):  # checkpointed: its input is kept
            keep(args[0])

    handles = [block.register_forward_pre_hook(block_input) for block in model.blocks]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            autocast,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model.train()
            _, loss = model(x, y)
            del loss
    finally:
        for handle in handles:
            handle.remove()
    return sum(kept.values())


def full_state_dict(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state_dict on the CPU of rank 0 (gathered from every process under FSDP; the other
    processes get an empty dict)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
