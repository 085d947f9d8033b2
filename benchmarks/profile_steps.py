"""Profile GAM training steps: NVTX ranges for Nsight on a GPU, torch.profiler tables anywhere.

--what picks the step: one GAMBlock (default), a whole GAMModel, or the token mixer alone (the
block's mixer on (B, N, D) activations, as GAMBlock.mix runs it). With the profiler on, a table of
kernels by device time per step follows (CUDA kernels on a GPU, ops by self CPU time on the CPU):
run it once per GAM_EXT_BACKEND value to see where each mixer path spends its time.

On a GPU, Nsight Systems (timeline) and Nsight Compute (per kernel; the CUDA sources are built with
-lineinfo, so it shows source lines):

    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o gam python benchmarks/profile_steps.py
    ncu --nvtx --nvtx-include "gam_step/" --set full -o gam python benchmarks/profile_steps.py --steps 1

Only the measured steps are captured (after --warmup steps), each inside an NVTX range "gam_step"
with nested "forward" and "backward" ranges. With --torch-profiler (the default on CPU) it prints
torch.profiler's table of the busiest ops instead, and --trace FILE writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The installed gam_ext; this source tree (built in place) only when none is installed.
if importlib.util.find_spec("gam_ext") is None:
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import gam_ext  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument(
        "--what",
        default="block",
        choices=["block", "model", "mixer"],
        help="one GAMBlock on (B, N, D) activations, a whole GAMModel on tokens, or the block's "
        "token mixer alone (GAMBlock.mix)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6, help="GAMModel layers (--what model)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--torch-profiler",
        action="store_true",
        help="print torch.profiler's op table (always on for --device cpu)",
    )
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the measured steps")
    args = parser.parse_args(argv)
    for name in ("batch", "seqlen", "d_model", "slots", "layers", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def build(
    args: argparse.Namespace,
) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """The step's forward, as a function of its inputs that returns what the backward starts from
    (a tensor and its gradient, or a scalar loss and None), and the inputs.

    A GAMModel's step ends in its own next-token cross-entropy, as in training. A block or the
    mixer has no loss of its own: its backward starts from a fixed random gradient of its output,
    so that the profile holds its kernels only (a surrogate loss such as out.square().mean() would
    add passes over the whole output to every step)."""
    device = torch.device(args.device)
    if args.what in ("block", "mixer"):
        block = gam_ext.GAMBlock(args.d_model, args.slots, dropout=0.0).to(device)
        module = block.mix if args.what == "mixer" else block
        inputs = torch.randn(args.batch, args.seqlen, args.d_model, device=device, requires_grad=True)
        grads: dict[torch.dtype, torch.Tensor] = {}

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = module(x)
            if out.dtype not in grads:  # the output's dtype (autocast's), made once
                gen = torch.Generator(device=device).manual_seed(0)
                grads[out.dtype] = torch.randn(out.shape, generator=gen, device=device).to(out.dtype)
            return out, grads[out.dtype]

        return forward, inputs
    config = gam_ext.GAMConfig(
        block_size=args.seqlen,
        d_model=args.d_model,
        n_layer=args.layers,
        num_memory_slots=args.slots,
        dropout=0.0,
    )
    model = gam_ext.GAMModel(config).to(device)
    inputs = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device=device)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device=device)
    return (lambda idx: (model(idx, targets)[1], None)), inputs


def kernel_table(profiler: torch.profiler.profile, cuda: bool, steps: int, rows: int = 25) -> str:
    """Markdown: the kernels (CUDA) or ops (CPU, by self time) of the profiled steps, busiest
    first, with calls and microseconds per step and their share of the total."""
    events = [
        e
        for e in profiler.key_averages()
        if (e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.self_cpu_time_total > 0)
    ]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    kind = "kernel" if cuda else "op (self CPU time)"
    lines = [
        f"| {kind} | calls per step | us per step | share |",
        "|---|---:|---:|---:|",
    ]
    for e in events[:rows]:
        name = e.key if len(e.key) <= 100 else e.key[:97] + "..."
        name = name.replace("|", "/")
        t = getattr(e, key)
        lines.append(f"| {name} | {e.count / steps:g} | {t / steps:.1f} | {100 * t / total:.1f}% |")
    if len(events) > rows:
        rest = sum(getattr(e, key) for e in events[rows:])
        lines.append(f"| ({len(events) - rows} more) | | {rest / steps:.1f} | {100 * rest / total:.1f}% |")
    lines.append(f"| **all** | {sum(e.count for e in events) / steps:g} | {total / steps:.1f} | 100% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        # torch.profiler's Kineto logs "USDT profiler_start/stop" lines and, without a GPU,
        # "gpuGetDeviceCount failed"; a CPU profile needs neither. An explicit KINETO_LOG_LEVEL wins.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    forward, inputs = build(args)
    autocast = torch.autocast(args.device, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    cuda = args.device == "cuda"
    nvtx = torch.cuda.nvtx if cuda else None

    def step() -> None:
        # A fresh input gradient each step, not one summed over the steps: that sum would add an
        # fp32 pass over the block's input to every backward, which training (whose block inputs
        # are not leaves) never runs.
        inputs.grad = None
        with nvtx.range("forward") if cuda else contextlib.nullcontext(), autocast:
            out, grad = forward(inputs)
        with nvtx.range("backward") if cuda else contextlib.nullcontext():
            out.backward(grad)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()

    profiler = None
    if args.torch_profiler or not cuda or args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities, record_shapes=True)

    print(f"gam_ext backends: {gam_ext.backend_info()['ops'][args.device]}")
    with profiler if profiler is not None else contextlib.nullcontext():
        if cuda:
            torch.cuda.cudart().cudaProfilerStart()
        start = time.perf_counter()
        for _ in range(args.steps):
            with nvtx.range("gam_step") if cuda else contextlib.nullcontext():
                step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        elapsed = time.perf_counter() - start

    tokens = args.batch * args.seqlen * args.steps
    print(
        f"{args.what} fwd+bwd: {1e3 * elapsed / args.steps:.2f} ms/step, "
        f"{tokens / elapsed:,.0f} tokens/s on {args.device}"
    )
    if profiler is not None:
        sort_key = "cuda_time_total" if cuda else "cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_key, row_limit=20))
        print(
            f"\n{'Kernels' if cuda else 'Ops'} per step ({args.what}, {args.dtype}, backend "
            f"{gam_ext.get_backend()}):\n"
        )
        print(kernel_table(profiler, cuda, args.steps))
        if args.trace:
            profiler.export_chrome_trace(args.trace)
            print(f"wrote {args.trace}")


if __name__ == "__main__":
    main()
