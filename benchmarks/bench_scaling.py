"""Time and memory against sequence length: GAM vs Transformer vs Mamba, one block or one LM step.

The paper's Table 2 measures one block, forward+backward, at B=16 D=512 for N = 256..8192 on a T4
(fp16 autocast), and its attention baseline runs out of memory from N = 4096. This script measures
the same thing on this machine, in one process on the same inputs, for:

  gam_ext        GAMBlock on gam_ext's kernels (backend "auto")
  gam_reference  GAMBlock on the reference backend: the paper's eager formulation in plain PyTorch
  gam_compile    that reference GAMBlock under torch.compile
  sdpa           a pre-LN Transformer block (8 heads, GELU MLP 4x) on F.scaled_dot_product_attention
                 (causal; FlashAttention where torch has it)
  naive_attn     the same block with softmax(Q K^T / sqrt(d) + causal mask) V written out, the
                 formulation that ran out of memory in the paper
  mamba          a residual Mamba block (d_state 16, d_conv 4, expand 3): mamba_ssm on CUDA where
                 it is installed, else the pure-PyTorch mambapy

With --model it times a whole language model's training step instead (forward, cross-entropy,
backward; tokens/s) for GAMModel (kernels and reference backend), the Transformer and the Mamba
baseline of examples/baselines.py at the same width and depth (their parameter counts are reported).

Every cell is a forward+backward under autocast to --dtype (fp32 runs without autocast); time is
the median and the minimum over repeats after a warm-up; peak memory is the peak allocated above
what was live before the step (torch.cuda.max_memory_allocated on CUDA, torch's CPU allocator
records on CPU). An out-of-memory error, a step slower than --cap-seconds, or (on CPU) a naive
attention whose score matrices alone would pass --cpu-memory-cap is recorded as such, and larger N
are skipped for that provider.

Defaults: on CUDA the paper's shapes (B=16 D=512 S=512 K=3, N=256..8192, fp16 and bf16); on CPU a
scaled-down grid (B=2 D=256 S=256 K=3, N=256..4096, fp32, the dtype of CPU training) that takes
about 3 minutes on 2 cores.
Output: <stem>.md (machine, date, command, load, the paper's T4 figures beside ours), <stem>.csv and
<stem>.png (log-log time and memory against N, the fitted slope per provider in the legend), with
stem benchmarks/results/scaling[-model]-<device>-<date> unless --out is given.

  python benchmarks/bench_scaling.py                      # this machine's default grid
  python benchmarks/bench_scaling.py --model              # whole-model training steps
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "examples"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from baselines import (  # noqa: E402
    MambaPyBlock,
    MambaSSMBlock,
    TransformerBlock,
    build_model,
    mamba_implementation,
)
from bench_ops import machine_description, peak_memory, sync  # noqa: E402

import gam_ext  # noqa: E402

BLOCK_PROVIDERS = ("gam_ext", "gam_reference", "gam_compile", "sdpa", "naive_attn", "mamba")
MODEL_PROVIDERS = ("gam_ext", "gam_reference", "transformer", "mamba")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The paper's Table 2 (T4, one block, B=16 D=512, fp16 autocast, fwd+bwd): N -> (GAM ms,
# Transformer ms, GAM MB, Transformer MB); None where the Transformer ran out of memory.
PAPER_T4 = {
    256: (8.97, 8.90, 179.42, 216.03),
    512: (13.09, 23.86, 325.48, 552.98),
    1024: (25.86, 74.19, 617.60, 1964.79),
    2048: (51.94, 279.37, 1201.85, 7483.92),
    4096: (105.03, None, 2370.35, None),
    8192: (217.30, None, 4707.35, None),
}


# ------------------------------------------------------------------------------------------------
# The blocks
# ------------------------------------------------------------------------------------------------


class NaiveCausalAttention(nn.Module):
    """Multi-head causal attention with the (B, H, N, N) scores materialised, as the paper's code."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_head)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


def naive_attention_block(d_model: int, n_head: int) -> TransformerBlock:
    block = TransformerBlock(d_model, n_head, dropout=0.0)
    block.attn = NaiveCausalAttention(d_model, n_head)
    return block


def mamba_block(d_model: int, device: str) -> nn.Module:
    implementation = mamba_implementation(device)
    block_cls = MambaSSMBlock if implementation == "mamba_ssm" else MambaPyBlock
    return block_cls(d_model, d_state=16, d_conv=4, expand=3)


def make_block(provider: str, args: argparse.Namespace) -> nn.Module:
    d = args.d_model
    if provider.startswith("gam"):
        return gam_ext.GAMBlock(d, args.slots, conv_kernel_size=args.kernel_size, dropout=0.0)
    if provider == "sdpa":
        return TransformerBlock(d, args.n_head, dropout=0.0)
    if provider == "naive_attn":
        return naive_attention_block(d, args.n_head)
    return mamba_block(d, args.device)


def make_model(provider: str, args: argparse.Namespace, seqlen: int) -> nn.Module:
    name = {"gam_ext": "gam", "gam_reference": "gam"}.get(provider, provider)
    model, _ = build_model(
        name,
        args.vocab_size,
        seqlen,
        d_model=args.d_model,
        n_layer=args.n_layer,
        dropout=0.0,
        num_memory_slots=args.slots,
        conv_kernel_size=args.kernel_size,
        n_head=args.n_head,
        device=args.device,
    )
    return model


@contextlib.contextmanager
def backend_for(provider: str):
    """gam_reference and gam_compile run GAMBlock's pure-PyTorch formulation."""
    previous = gam_ext.set_backend("reference" if provider in ("gam_reference", "gam_compile") else "auto")
    try:
        yield
    finally:
        gam_ext.set_backend(previous)


# ------------------------------------------------------------------------------------------------
# Measuring one cell
# ------------------------------------------------------------------------------------------------


def training_step(
    module: nn.Module, args: argparse.Namespace, seqlen: int, seed: int
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(fn, inputs, grad): fn(*inputs) is one autocast forward; inputs include the parameters so
    that every repeat starts with no gradients; grad is the output's gradient."""
    gen = torch.Generator().manual_seed(seed)
    device, dtype = args.device, DTYPES[args.dtype_name]
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    params = [p for p in module.parameters() if p.requires_grad]
    if args.model:
        idx = torch.randint(0, args.vocab_size, (args.batch, seqlen + 1), generator=gen)
        idx = idx.to(device)

        def fn(*_: torch.Tensor) -> torch.Tensor:
            with autocast:
                _, loss = module(idx[:, :-1], idx[:, 1:])
            return loss

        return fn, params, torch.ones((), device=device)

    x = torch.randn(args.batch, seqlen, args.d_model, generator=gen).to(device).requires_grad_()

    def fn(*_: torch.Tensor) -> torch.Tensor:
        with autocast:
            return module(x)

    grad = torch.randn(args.batch, seqlen, args.d_model, generator=gen)
    return fn, [x, *params], grad.to(device=device, dtype=dtype)


def one_step(fn, inputs, grad, device) -> float:
    for t in inputs:
        t.grad = None
    sync(device)
    start = time.perf_counter()
    fn(*inputs).backward(grad)
    sync(device)
    return time.perf_counter() - start


def is_out_of_memory(error: BaseException) -> bool:
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "out of memory" in str(error).lower()
        or ("can't allocate memory" in str(error))
    )


def naive_scores_bytes(args: argparse.Namespace, seqlen: int) -> int:
    """Bytes of the naive attention's N x N tensors alive at once in fwd+bwd (scores, weights,
    their grads), a lower bound of what it needs."""
    element = 4 if args.dtype_name == "fp32" else 2
    return 4 * args.batch * args.n_head * seqlen * seqlen * element


def measure(provider: str, seqlen: int, args: argparse.Namespace) -> dict:
    row = dict(
        provider=provider,
        seqlen=seqlen,
        status="ok",
        ms=None,
        min_ms=None,
        peak_mb=None,
        tokens_per_s=None,
        params=None,
        repeats=0,
    )
    if (
        provider == "naive_attn"
        and args.device == "cpu"
        and naive_scores_bytes(args, seqlen) > args.cpu_memory_cap * 2**30
    ):
        row["status"] = f"memory cap (>{naive_scores_bytes(args, seqlen) / 2**30:.0f} GiB of scores)"
        return row
    if provider == "mamba":
        try:
            mamba_implementation(args.device)
        except ImportError:  # neither mamba_ssm nor mambapy: say so, measure the rest
            row["status"] = "not installed (pip install mambapy, or mamba_ssm on CUDA)"
            return row
    torch.manual_seed(0)
    with backend_for(provider):
        try:
            module = (make_model(provider, args, seqlen) if args.model else make_block(provider, args)).to(
                args.device
            )
            row["params"] = sum(p.numel() for p in module.parameters())
            if provider == "gam_compile":
                module = torch.compile(module)
            fn, inputs, grad = training_step(module, args, seqlen, seed=seqlen)
            first = one_step(fn, inputs, grad, args.device)  # warm-up (and compilation)
            if provider == "gam_compile":
                first = one_step(fn, inputs, grad, args.device)
            if first > args.cap_seconds:
                row["status"] = f"time cap (one step {first:.1f} s > {args.cap_seconds:g} s)"
                return row
            times, spent = [], 0.0
            while len(times) < args.repeats and (spent < args.max_seconds or len(times) < 3):
                times.append(one_step(fn, inputs, grad, args.device))
                spent += times[-1]
            row.update(ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), repeats=len(times))
            row["tokens_per_s"] = args.batch * seqlen / statistics.median(times)
            if not args.no_memory:
                peak = peak_memory(fn, inputs, grad, "fwdbwd", args.device)
                row["peak_mb"] = peak / 2**20
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            row["status"] = "OOM"
        finally:
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def fitted_slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(value) against log(N) over the measured points."""
    points = [(math.log(r["seqlen"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / var


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_plot(path: Path, results: dict[str, list[dict]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    panels = len(results) * 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False)
    for column, (dtype_name, rows) in enumerate(results.items()):
        for offset, (key, label) in enumerate(
            (("ms", "time per fwd+bwd (ms)"), ("peak_mb", "peak memory (MB)"))
        ):
            ax = axes[0][2 * column + offset]
            for provider in dict.fromkeys(r["provider"] for r in rows):
                mine = [r for r in rows if r["provider"] == provider and r.get(key)]
                if not mine:
                    continue
                slope = fitted_slope(mine, key)
                ax.plot(
                    [r["seqlen"] for r in mine],
                    [r[key] for r in mine],
                    marker="o",
                    label=f"{provider} (slope {fmt(slope, '.2f')})",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{title}, {dtype_name}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(args: argparse.Namespace, results: dict[str, list[dict]], load) -> Path:
    date = _dt.date.today().isoformat()
    kind = "scaling-model" if args.model else "scaling"
    stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (f"{kind}-{args.device}-{date}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "dtype",
        "provider",
        "seqlen",
        "status",
        "ms",
        "min_ms",
        "peak_mb",
        "tokens_per_s",
        "params",
        "repeats",
        "batch",
        "d_model",
        "slots",
        "kernel_size",
        "n_layer",
    ]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for dtype_name, rows in results.items():
            for r in rows:
                writer.writerow(
                    dict(
                        r,
                        dtype=dtype_name,
                        batch=args.batch,
                        d_model=args.d_model,
                        slots=args.slots,
                        kernel_size=args.kernel_size,
                        n_layer=args.n_layer if args.model else 1,
                    )
                )
    what = (
        f"one training step of a {args.n_layer}-layer language model (vocab {args.vocab_size})"
        if args.model
        else "one block"
    )
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    lines = [
        f"# Scaling with sequence length: {what} ({args.device}, {date})",
        "",
        f"- machine: {machine_description(args.device)}",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- shapes: B={args.batch} D={args.d_model} S={args.slots} K={args.kernel_size} "
        f"heads={args.n_head}; forward+backward under autocast to the dtype (fp32: none)",
        f"- gam_ext ops on {args.device}: {gam_ext.backend_info()['ops'][args.device]}",
    ]
    if load is not None:
        lines.append(
            f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / "
            f"{load[2]:.2f} (other processes share this machine: timings are noisy)"
        )
    lines += [
        "",
        "Time: median (and minimum) ms over the repeats; peak MB: peak allocated above "
        "what was live before the step (parameters and inputs), so activations, gradients "
        "and workspaces count. Slope: least-squares slope of log(time) against log(N) over "
        "the measured points (1 is linear, 2 quadratic).",
        "",
    ]
    for dtype_name, rows in results.items():
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        lines += [
            f"## {dtype_name}",
            "",
            "| provider | params | time slope | memory slope |",
            "|---|---:|---:|---:|",
        ]
        for p in providers:
            mine = [r for r in rows if r["provider"] == p]
            params = next((r["params"] for r in mine if r["params"]), None)
            lines.append(
                f"| {p} | {fmt(params, ',')} | {fmt(fitted_slope(mine, 'ms'), '.2f')} | "
                f"{fmt(fitted_slope(mine, 'peak_mb'), '.2f')} |"
            )
        value = "tokens/s" if args.model else "ms (min)"
        lines += [
            "",
            "| N | " + " | ".join(f"{p} {value} | {p} MB" for p in providers) + " |",
            "|---:|" + "---:|---:|" * len(providers),
        ]
        for n in sorted({r["seqlen"] for r in rows}):
            cells = []
            for p in providers:
                r = next((r for r in rows if r["provider"] == p and r["seqlen"] == n), None)
                if r is None:
                    cells += ["not run", "-"]
                elif r["status"] != "ok":
                    cells += [r["status"], "-"]
                elif args.model:
                    cells += [f"{r['tokens_per_s']:,.0f}", fmt(r["peak_mb"], ".0f")]
                else:
                    cells += [f"{r['ms']:.1f} ({r['min_ms']:.1f})", fmt(r["peak_mb"], ".0f")]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", *ratio_lines(rows), ""]
    if not args.model:
        lines += [
            "## The paper's figures (T4, B=16 D=512, fp16 autocast, one block fwd+bwd)",
            "",
            "| N | GAM ms | Transformer ms | GAM MB | Transformer MB |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n, (g_ms, t_ms, g_mb, t_mb) in PAPER_T4.items():
            lines.append(f"| {n} | {g_ms} | {t_ms or 'OOM'} | {g_mb} | {t_mb or 'OOM'} |")
        lines.append("")
    if write_plot(stem.with_suffix(".png"), results, "LM training step" if args.model else "one block"):
        lines += [f"![time and memory against N]({stem.with_suffix('.png').name})", ""]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}, .csv and .png")
    return stem


def ratio_lines(rows: list[dict]) -> list[str]:
    """gam_ext against every other provider at the largest N where both ran (> 1: gam_ext is
    faster)."""
    out = []
    for other in dict.fromkeys(r["provider"] for r in rows):
        if other == "gam_ext":
            continue
        both = [
            n
            for n in sorted({r["seqlen"] for r in rows})
            if all(
                any(r["provider"] == p and r["seqlen"] == n and r["status"] == "ok" for r in rows)
                for p in ("gam_ext", other)
            )
        ]
        if not both:
            continue
        n = both[-1]
        mine = next(r for r in rows if r["provider"] == "gam_ext" and r["seqlen"] == n)
        theirs = next(r for r in rows if r["provider"] == other and r["seqlen"] == n)
        out.append(
            f"- N={n}: {other} time / gam_ext time = {theirs['ms'] / mine['ms']:.2f} "
            f"(medians; {theirs['min_ms'] / mine['min_ms']:.2f} from the minima)"
        )
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--model",
        action="store_true",
        help="time a whole language model's training step instead of one block",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=None,
        help="default: fp16 bf16 on cuda (as the paper), fp32 on cpu",
    )
    parser.add_argument(
        "--seqlen",
        type=int,
        nargs="+",
        default=None,
        help="default: 256..8192 on cuda (256..4096 with --model), 256..4096 on cpu (128..1024 with --model)",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help=f"block: {' '.join(BLOCK_PROVIDERS)}; --model: {' '.join(MODEL_PROVIDERS)} (default: all)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 16 on cuda, 2 on cpu")
    parser.add_argument("--d-model", type=int, default=None, help="default 512 on cuda, 256 on cpu")
    parser.add_argument("--slots", type=int, default=None, help="memory slots S (default D)")
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument(
        "--n-layer", type=int, default=None, help="--model depth (default 6 on cuda, 2 on cpu)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="--model vocabulary (default 10000 on cuda, 2048 on cpu)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time per cell after the warm-up (>= 3 repeats); default 2 on cuda, 4 on cpu",
    )
    parser.add_argument(
        "--cap-seconds",
        type=float,
        default=None,
        help="a warm-up step slower than this records 'time cap' and skips larger "
        "N for that provider (default 10 on cuda, 20 on cpu)",
    )
    parser.add_argument(
        "--cpu-memory-cap",
        type=float,
        default=8.0,
        help="GiB: on cpu, skip the naive attention when its score matrices alone would need more",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out", default=None, help="output stem: writes <stem>.md/.csv/.png")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    cuda = args.device == "cuda"
    known = MODEL_PROVIDERS if args.model else BLOCK_PROVIDERS
    args.providers = args.providers or list(known)
    unknown = [p for p in args.providers if p not in known]
    if unknown:
        parser.error(f"unknown provider(s) {' '.join(unknown)}; choose from {' '.join(known)}")
    args.dtype = args.dtype or (["fp16", "bf16"] if cuda else ["fp32"])
    if args.seqlen is None:
        top = 4096 if args.model else 8192
        args.seqlen = (
            [n for n in (256, 512, 1024, 2048, 4096, 8192) if n <= top]
            if cuda
            else [128, 256, 512, 1024]
            if args.model
            else [256, 512, 1024, 2048, 4096]
        )
    args.batch = args.batch or (16 if cuda else 2)
    args.d_model = args.d_model or (512 if cuda else 256)
    args.slots = args.slots or args.d_model
    args.n_layer = args.n_layer or (6 if cuda else 2)
    args.vocab_size = args.vocab_size or (10000 if cuda else 2048)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (2.0 if cuda else 4.0)
    args.cap_seconds = args.cap_seconds if args.cap_seconds is not None else (10.0 if cuda else 20.0)
    for name in ("batch", "d_model", "slots", "kernel_size", "n_head", "n_layer", "vocab_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.seqlen) < 1:
        parser.error("--seqlen values must be >= 1")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} must be divisible by --n-head {args.n_head}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# {machine_description(args.device)}", flush=True)
    results: dict[str, list[dict]] = {}
    for dtype_name in args.dtype:
        args.dtype_name = dtype_name
        rows: list[dict] = []
        stopped: set[str] = set()
        for n in sorted(args.seqlen):
            for provider in args.providers:
                if provider in stopped:
                    rows.append(
                        dict(
                            provider=provider,
                            seqlen=n,
                            status="skipped (smaller N hit a cap)",
                            ms=None,
                            min_ms=None,
                            peak_mb=None,
                            tokens_per_s=None,
                            params=None,
                            repeats=0,
                        )
                    )
                    continue
                row = measure(provider, n, args)
                rows.append(row)
                if row["status"] != "ok":
                    stopped.add(provider)
                print(
                    f"{dtype_name} N={n:5d} {provider:13s} "
                    + (
                        f"{row['ms']:9.1f} ms (min {row['min_ms']:.1f}) peak {fmt(row['peak_mb'], '.0f')} MB"
                        if row["status"] == "ok"
                        else row["status"]
                    ),
                    flush=True,
                )
        results[dtype_name] = rows
    return write_results(args, results, load)


if __name__ == "__main__":
    main()
