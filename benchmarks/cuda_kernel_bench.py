"""Per-kernel figures of the CUDA kernels against their targets (H100, bf16), as a markdown table.

    python benchmarks/cuda_kernel_bench.py --batch 16 --dim 512 --slots 512 --seqlens 256,1024,8192

Bandwidth-bound ops (conv, gate) report GB/s over the bytes they must move, as % of a measured
device-to-device copy and of the nominal HBM peak; retrieval reports TFLOP/s (4*B*N*S*D) as % of
the nominal bf16 dense tensor-core peak and its speed-up over eager PyTorch, torch.compile and
SDPA (K = V = M), for each path of GAM_EXT_RETRIEVAL (fused; gemm: cuBLAS around a softmax
kernel, the default; and wgmma, the sm_90a forward and the backward's sm_90a score kernel before
cuBLAS's products, where the device and the build have them, with the pipelined forward and, as
wgmma-lockstep and wgmma-seesaw, the other two), forward, backward (against eager
autograd's backward alone) and both, with each path's speed-up over the gemm path ("vs gemm"),
all in one process, so that a GPU run can check the default per shape (csrc/cuda/README.md); the
mixer (the default retrieval path) reports fwd+bwd speed-up over eager; the one-token step of
generation (gam_mixer_step, 1 and B rows) GB/s and its speed-up over
the eager step.

Times are per call, from back-to-back calls between two CUDA events (timeit): where the GPU is the
bottleneck they are the kernels' own time, the host's per-call work hidden behind it. Reports
before 2026-11-27 timed single calls, which added that host time (tens of microseconds per op) to
every row, most visibly to the conv and gate rows at small N.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from bench_ops import broken_kernels_met, has_wgmma  # noqa: E402

import gam_ext  # noqa: E402
from gam_ext import reference  # noqa: E402

# Nominal peaks (SXM parts): HBM GB/s, bf16 dense TFLOP/s.
PEAKS = {"H100": (3350.0, 989.0), "H200": (4800.0, 989.0), "A100": (2039.0, 312.0)}


def timeit(fn, calls: int = 8, rounds: int = 5, warmup: int = 5) -> float:
    """Median seconds per call over `rounds` rounds of `calls` back-to-back calls, each round
    between two CUDA events. Back to back, the host's work per call (Python, dispatch, launch:
    tens of microseconds) overlaps the GPU's wherever the GPU is the bottleneck, so the figures
    are the kernels' own; an event pair around every single call added that host time to each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2] * 1e-3  # median, seconds


def copy_bandwidth() -> float:
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a))
    return 2 * a.numel() / t / 1e9


def bw_row(n, op, fn, nbytes, hbm, copy_bw, eager_fn=None):
    t = timeit(fn)
    gbs = nbytes / t / 1e9
    nominal = f"{100 * gbs / hbm:.0f}%" if hbm else "-"
    vs = f"{timeit(eager_fn) / t:.2f}x" if eager_fn else "-"
    print(
        f"| {n} | {op} | {t * 1e3:.3f} | {gbs:.0f} GB/s | {100 * gbs / copy_bw:.0f}% | "
        f"{nominal} | {vs} | - | - | - |"
    )


# The environment of each retrieval path measured: GAM_EXT_RETRIEVAL, and for the wgmma path
# its forward kernel (GAM_EXT_WGMMA_FORWARD): the pipelined one (the default), the lockstep one
# it replaced and the seesaw one (scores once per tile), kept to be measured against each other.
PATH_ENV = {
    "fused": {"GAM_EXT_RETRIEVAL": "fused"},
    "gemm": {"GAM_EXT_RETRIEVAL": "gemm"},
    "wgmma": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "pipelined"},
    "wgmma-lockstep": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "lockstep"},
    "wgmma-seesaw": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "seesaw"},
}


def with_path(path, fn):
    """fn run with the environment of PATH_ENV[path] (read by the extension on every call)."""

    def run():
        old = {name: os.environ.get(name) for name in PATH_ENV[path]}
        os.environ.update(PATH_ENV[path])
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return run


def bench_seqlen(n, b, d, s, k, dtype, esz, hbm, tc_peak, copy_bw, mem_compiled) -> None:
    torch.manual_seed(0)
    x = torch.randn(b, n, d, device="cuda", dtype=dtype)
    w = torch.randn(d, k, device="cuda")
    bias = torch.randn(d, device="cuda")
    dy = torch.randn_like(x)
    bnd = b * n * d * esz
    bw_row(
        n,
        "conv fwd",
        lambda: gam_ext.causal_conv1d(x, w, bias),
        2 * bnd,
        hbm,
        copy_bw,
        lambda: reference.causal_conv1d(x, w, bias),
    )
    bw_row(n, "conv bwd", lambda: torch.ops.gam_ext.causal_conv1d_bwd(dy, x, w), 3 * bnd, hbm, copy_bw)
    z = torch.randn(b, n, 2 * d, device="cuda", dtype=dtype)
    bw_row(
        n,
        "gate fwd",
        lambda: gam_ext.gate_fusion(x, dy, z),
        5 * bnd,
        hbm,
        copy_bw,
        lambda: reference.gate_fusion(x, dy, z),
    )
    bw_row(n, "gate bwd", lambda: torch.ops.gam_ext.gate_fusion_bwd(dy, x, dy, z), 9 * bnd, hbm, copy_bw)

    m = torch.randn(s, d, device="cuda", dtype=dtype) * d**-0.5
    h = torch.randn(b, n, d, device="cuda", dtype=dtype)
    flops = 4 * b * n * s * d
    te = timeit(lambda: reference.memory_retrieval(h, m))
    tc = timeit(lambda: mem_compiled(h, m))
    mk = m[None, None].expand(b, 1, s, d)
    ts = timeit(lambda: F.scaled_dot_product_attention(h[:, None], mk, mk, scale=1.0))
    # Eager autograd's backward alone (the graph kept between calls).
    hl, ml = h.detach().requires_grad_(), m.detach().requires_grad_()
    ref_out = reference.memory_retrieval(hl, ml)
    te_bwd = timeit(lambda: torch.autograd.grad(ref_out, (hl, ml), dy, retain_graph=True))
    times = {}
    retrieval_bwd = torch.ops.gam_ext.memory_retrieval_bwd
    # The wgmma kernels where this device and build have them (sm_90, built for 9.0a).
    paths = tuple(PATH_ENV) if has_wgmma(s, d, dtype) else ("fused", "gemm")
    # Paths whose forward the smoke stage of scripts/gpu_check.sh found broken are left out, and
    # the backward rows of those whose backward it did.
    paths = [p for p in paths if not broken_kernels_met(PATH_ENV[p], backward=False)]
    for path in paths:
        t = timeit(with_path(path, lambda: gam_ext.memory_retrieval(h, m)))
        t_bwd = None
        if not broken_kernels_met(PATH_ENV[path]):
            g, lse = with_path(path, lambda: torch.ops.gam_ext.memory_retrieval_fwd(h, m, 1.0))()
            t_bwd = timeit(with_path(path, lambda g=g, lse=lse: retrieval_bwd(dy, h, m, g, lse, 1.0)))
        times[path] = (t, t_bwd)
    gemm_fwd, gemm_bwd = times.get("gemm", (None, None))
    for path in paths:
        t, t_bwd = times[path]
        tf = flops / t / 1e12
        pct = f"{100 * tf / tc_peak:.0f}%" if tc_peak else "-"
        vs_gemm = "-" if path == "gemm" or gemm_fwd is None else f"{gemm_fwd / t:.2f}x"
        print(
            f"| {n} | retrieval fwd ({path}) | {t * 1e3:.3f} | {tf:.0f} TFLOP/s | - | {pct} | "
            f"{te / t:.2f}x | {tc / t:.2f}x | {ts / t:.2f}x | {vs_gemm} |"
        )
        if t_bwd is None:
            continue
        # The backward needs 5 GEMM-sized products (2 * B*N*S*D flops each): 2.5x the forward.
        vs_gemm = "-" if path == "gemm" or gemm_bwd is None else f"{gemm_bwd / t_bwd:.2f}x"
        print(
            f"| {n} | retrieval bwd ({path}) | {t_bwd * 1e3:.3f} | {2.5 * flops / t_bwd / 1e12:.0f} TFLOP/s "
            f"| - | - | {te_bwd / t_bwd:.2f}x | - | - | {vs_gemm} |"
        )
        both = t + t_bwd
        vs_gemm = "-" if path == "gemm" or gemm_bwd is None else f"{(gemm_fwd + gemm_bwd) / both:.2f}x"
        print(
            f"| {n} | retrieval fwd+bwd ({path}) | {both * 1e3:.3f} | {3.5 * flops / both / 1e12:.0f} "
            f"TFLOP/s | - | - | {(te + te_bwd) / both:.2f}x | - | - | {vs_gemm} |"
        )

    gw = torch.randn(2 * d, d, device="cuda", dtype=dtype) * d**-0.5
    gb = torch.zeros(2 * d, device="cuda", dtype=dtype)
    wc = torch.randn(d, 1, k, device="cuda", dtype=dtype)
    mm = m.clone()
    params = [t_.requires_grad_() for t_ in (h.clone(), wc, bias.to(dtype), mm, gw, gb)]

    def mixer(fn):
        def run():
            for p in params:
                p.grad = None
            fn(*params).float().sum().backward()

        return run

    if broken_kernels_met({}, mixer=True):  # the fused mixer op, left out by the smoke stage
        return
    t = timeit(mixer(gam_ext.gam_mixer), calls=4)
    te = timeit(mixer(reference.gam_mixer), calls=4)
    print(f"| {n} | mixer fwd+bwd | {t * 1e3:.3f} | - | - | - | {te / t:.2f}x | - | - | - |")


def bench_step(b, d, s, k, dtype, esz, hbm, copy_bw) -> None:
    """The one-token step of generation (gam_mixer_step, gate linear included): B rows, one per
    sequence. Bandwidth-bound: the memory bank and the gate weights once, plus each row's input,
    conv state (read and written), gate logits and output."""
    torch.manual_seed(0)
    h = torch.randn(b, d, device="cuda", dtype=dtype)
    state = torch.randn(b, k - 1, d, device="cuda", dtype=dtype)
    w, bias = torch.randn(d, 1, k, device="cuda"), torch.randn(d, device="cuda")
    m = torch.randn(s, d, device="cuda", dtype=dtype) * d**-0.5
    gw = torch.randn(2 * d, d, device="cuda", dtype=dtype) * d**-0.5
    gb = torch.zeros(2 * d, device="cuda", dtype=dtype)
    pos = torch.zeros(b, device="cuda", dtype=torch.int32)
    nbytes = (s * d + 2 * d * d) * esz + b * d * (2 * (k - 1) + 5) * esz
    with torch.no_grad():
        bw_row(
            f"step B={b}",
            "mixer step",
            lambda: gam_ext.gam_mixer_step(h, state, w, bias, m, gw, gb, cache_seqlens=pos),
            nbytes,
            hbm,
            copy_bw,
            lambda: reference.gam_mixer_step(h, state.clone(), w, bias, m, gw, gb, cache_seqlens=pos),
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--seqlens", default="256,1024,4096,8192")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    hbm, tc_peak = next((v for k, v in PEAKS.items() if k in name), (None, None))
    copy_bw = copy_bandwidth()
    esz = torch.finfo(dtype).bits // 8
    b, d, s, k = args.batch, args.dim, args.slots, args.kernel_size
    print(
        f"device: {name}; dtype {args.dtype}; B={b} D={d} S={s} K={k}; "
        f"measured copy {copy_bw:.0f} GB/s; nominal HBM {hbm} GB/s, bf16 TC peak {tc_peak} TFLOP/s\n"
    )
    if os.environ.get("GAM_CHECK_BROKEN"):
        broken = os.environ["GAM_CHECK_BROKEN"]
        print(f"Left out (GAM_CHECK_BROKEN, from the smoke stage of scripts/gpu_check.sh): {broken}\n")
    print("| N | op | ms | figure | % copy BW | % nominal | vs eager | vs compile | vs sdpa | vs gemm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mem_compiled = torch.compile(reference.memory_retrieval)

    for n in [int(v) for v in args.seqlens.split(",")]:
        bench_seqlen(n, b, d, s, k, dtype, esz, hbm, tc_peak, copy_bw, mem_compiled)
    for rows in (1, b):
        bench_step(rows, d, s, k, dtype, esz, hbm, copy_bw)


if __name__ == "__main__":
    main()
