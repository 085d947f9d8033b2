"""Benchmark of the GAM ops: gam_ext kernels against the paper's eager formulation and torch.compile.

For each op (conv, retrieval, gate) and the whole token mixer (conv + retrieval + gate linear +
gate fusion, as in one GAM block), in forward, backward and forward+backward, on the same inputs in
one process, it reports the median time, GFLOP/s, peak memory and the speedup over eager, plus the
fp32 GEMM floor of the mixer (its model GEMM FLOPs at the fp32 GEMM rate measured in the same run).
Where the fused and unfused mixer both ran, a line per size sets one against the other and says
which of them the backend "auto" runs there (``_backend.AUTO_FUSED_MAX_ELEMENTS``).
The providers' repeats are interleaved (round after round, each provider once per round), so that
load from other processes on a shared machine moves every provider's times alike.

Providers:
  gam_ext   the gam_ext public ops (compiled kernels for the device; gam_ext.gam_mixer for the mixer,
            which runs the fused mixer op where the backend "auto" picks it: on the CPU, and on
            cuda up to a size)
  gam_fused_mixer (mixer only) gam_ext.gam_mixer with the backend "fused": the fused op
            gam_mixer_fwd / _bwd, asserting that it is built for the device and dtype (the same
            path as gam_ext on the CPU; by default run on cuda only, where gam_ext is fused up to
            a size only)
  gam_unfused (mixer only) gam_ext.gam_mixer with the backend "unfused": the conv, retrieval and
            gate fusion kernels and a gate linear, three ops and their intermediates in memory
  eager     the paper's formulation in plain PyTorch: nn.Conv1d-style depthwise conv padded by K-1
            on both sides (permute + conv + slice), matmul-softmax-matmul, two sigmoid gates
  compile   torch.compile of that eager formulation (default inductor backend)
  sdpa      (cuda only, retrieval only) F.scaled_dot_product_attention with the bank as K and V
  gam_fp32_tiles (cpu, bfloat16, retrieval and mixer) gam_ext with GAM_EXT_CPU_BF16_GEMM=fp32: the
            CPU kernels' fp32 tiles instead of the bf16 products that gam_ext runs on CPUs with bf16
            matrix units (the same path as gam_ext on other CPUs)
  gam_fused (cuda only, retrieval only) gam_ext with GAM_EXT_RETRIEVAL=fused: the fused
            retrieval kernels (the gam_ext provider runs the default path: on cuda the gemm path,
            cuBLAS products around gam_ext's softmax kernels; in fp32 the fused path is the fp32
            SIMT kernels)
  gam_wgmma (cuda only, retrieval and mixer, fp16/bf16, where the device and the build have the
            sm_90a kernels) gam_ext with GAM_EXT_RETRIEVAL=wgmma: the warpgroup-MMA retrieval
            forward and the backward's warpgroup-MMA score kernel before cuBLAS's products (each
            where it takes the shape, else the gemm path's); for the mixer, the fused mixer op on
            them

Modes: fwd (a training forward: inputs require grad), bwd (backward only; the forward runs
untimed before each repeat), fwdbwd (both).

Peak memory: on cuda torch.cuda.max_memory_allocated; on cpu the peak of live bytes of torch's CPU
allocator during one call, from the profiler's memory records (buffers allocated outside torch's
allocator would not be seen; gam_ext's CPU kernels allocate their scratch through ATen). Both are
relative to the memory live before the call (inputs and parameters), so outputs and grads count.

FLOPs are model FLOPs: conv 2BNDK fwd, 4BNDK bwd; retrieval 4BNSD fwd, 8BNSD bwd (recomputation in
a flash-style backward is not counted); gate fusion ~10 flops per element fwd, ~12 bwd; the mixer
adds the gate linear (4BND^2 fwd, 8BND^2 bwd).

Output: a markdown table and a CSV (same stem) under benchmarks/results/, with the machine, date,
load average and the exact command. The CLI is stable (scripts/gpu_check.sh calls it):

  python benchmarks/bench_ops.py --device cpu --dtype float32 --batch 4 --seqlen 512 \\
      --d-model 512 --slots 512 --kernel-size 3 --repeats 20
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# The installed gam_ext; this source tree (built in place) only when none is installed.
if importlib.util.find_spec("gam_ext") is None:
    sys.path.insert(1, str(ROOT))
# The GPU check's names of the kernel paths (scripts/cuda_smoke.py).
sys.path.insert(1, str(ROOT / "scripts"))

from cuda_smoke import broken_paths, paths_met  # noqa: E402

import gam_ext  # noqa: E402

OPS = ("conv", "retrieval", "gate", "mixer")
MODES = ("fwd", "bwd", "fwdbwd")
PROVIDERS = (
    "gam_ext",
    "gam_fused_mixer",
    "gam_unfused",
    "gam_fp32_tiles",
    "eager",
    "compile",
    "sdpa",
    "gam_fused",
    "gam_wgmma",
)
# Providers that only exist for some ops (on some devices).
MIXER_PROVIDERS = ("gam_fused_mixer", "gam_unfused")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# The paper's eager formulation (what the public GAM code runs)
# --------------------------------------------------------------------------------------------


def eager_conv(x, weight, bias):
    n, k = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=x.shape[2])
    return y[..., :n].transpose(1, 2)


def eager_retrieval(h, memory):
    return torch.matmul(F.softmax(torch.matmul(h, memory.t()), dim=-1), memory)


def eager_gate(local, global_ctx, gate_logits):
    zl, zg = gate_logits.chunk(2, dim=-1)
    return torch.sigmoid(zl) * local + torch.sigmoid(zg) * global_ctx


def eager_mixer(h, conv_w, conv_b, memory, gate_w, gate_b):
    return eager_gate(eager_conv(h, conv_w, conv_b), eager_retrieval(h, memory), F.linear(h, gate_w, gate_b))


def sdpa_retrieval(h, memory):
    kv = memory.unsqueeze(0).unsqueeze(0)
    return F.scaled_dot_product_attention(h.unsqueeze(1), kv, kv, scale=1.0).squeeze(1)


def gam_conv(x, weight, bias):
    return gam_ext.causal_conv1d(x, weight, bias)


def gam_retrieval(h, memory):
    return gam_ext.memory_retrieval(h, memory)


# Environment variables the extension reads on every call, and the values some providers force.
PROVIDER_ENV = ("GAM_EXT_RETRIEVAL", "GAM_EXT_CPU_BF16_GEMM")
FORCED_ENV = {
    "gam_fused": {"GAM_EXT_RETRIEVAL": "fused"},
    "gam_wgmma": {"GAM_EXT_RETRIEVAL": "wgmma"},
    "gam_fp32_tiles": {"GAM_EXT_CPU_BF16_GEMM": "fp32"},
}


def set_provider_env(provider, originals):
    """PROVIDER_ENV for a provider's runs: its FORCED_ENV values, the others as the environment
    said when the benchmark started (originals; None: unset)."""
    for name, value in {**originals, **FORCED_ENV.get(provider, {})}.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def has_wgmma(slots, dim, dtype):
    """Whether the gam_wgmma provider's environment runs a wgmma kernel (the forward or the
    backward's score kernel) for this shape on this device (else it runs the gemm path, the
    gam_ext provider's)."""
    originals = {name: os.environ.get(name) for name in PROVIDER_ENV}
    set_provider_env("gam_wgmma", originals)
    try:
        info = gam_ext.backend_info(retrieval=(slots, dim, dtype))["retrieval"]
    finally:
        set_provider_env(None, originals)
    cuda = info.get("cuda")  # a dict on a CUDA device, else a sentence
    return isinstance(cuda, dict) and any(cuda[x].startswith("wgmma") for x in ("forward", "backward"))


def broken_kernels_met(env: dict[str, str], *, backward: bool = True, mixer: bool = False) -> list[str]:
    """The kernel paths that scripts/gpu_check.sh's smoke stage found hanging or failing on this
    GPU (GAM_CHECK_BROKEN, in scripts/cuda_smoke.py's names) that a run would meet under env
    (values of GAM_EXT_RETRIEVAL and GAM_EXT_WGMMA_FORWARD over the process's own), with the
    backward or not, and with the fused mixer op or not."""
    path = env.get("GAM_EXT_RETRIEVAL", os.environ.get("GAM_EXT_RETRIEVAL"))
    met = paths_met(path, env.get("GAM_EXT_WGMMA_FORWARD"), backward=backward, mixer=mixer)
    return sorted(met & broken_paths())


def gam_mixer(h, conv_w, conv_b, memory, gate_w, gate_b):
    return gam_ext.gam_mixer(h, conv_w, conv_b, memory, gate_w, gate_b)


def gam_mixer_fused(h, conv_w, conv_b, memory, gate_w, gate_b):
    """The mixer on the fused op gam_mixer_fwd / _bwd (the backend "fused")."""
    previous = gam_ext.set_backend("fused")
    try:
        if not gam_ext._backend.use_kernel("gam_mixer", h.device.type, h.dtype):
            raise RuntimeError(f"the fused mixer op is not built for {h.device.type} {h.dtype}")
        return gam_ext.gam_mixer(h, conv_w, conv_b, memory, gate_w, gate_b)
    finally:
        gam_ext.set_backend(previous)


def gam_mixer_unfused(h, conv_w, conv_b, memory, gate_w, gate_b):
    """The mixer as three gam_ext ops and a gate linear (the backend "unfused" for the forward;
    the backward of each op is what its forward registered, whatever the backend then)."""
    previous = gam_ext.set_backend("unfused")
    try:
        return gam_ext.gam_mixer(h, conv_w, conv_b, memory, gate_w, gate_b)
    finally:
        gam_ext.set_backend(previous)


FUNCS = {
    ("conv", "eager"): eager_conv,
    ("retrieval", "eager"): eager_retrieval,
    ("gate", "eager"): eager_gate,
    ("mixer", "eager"): eager_mixer,
    ("conv", "gam_ext"): gam_conv,
    ("retrieval", "gam_ext"): gam_retrieval,
    ("gate", "gam_ext"): gam_ext.gate_fusion,
    ("mixer", "gam_ext"): gam_mixer,
    ("mixer", "gam_fused_mixer"): gam_mixer_fused,
    ("mixer", "gam_unfused"): gam_mixer_unfused,
    ("retrieval", "sdpa"): sdpa_retrieval,
    ("retrieval", "gam_fused"): gam_retrieval,
    ("retrieval", "gam_wgmma"): gam_retrieval,
    ("mixer", "gam_wgmma"): gam_mixer_fused,
    ("retrieval", "gam_fp32_tiles"): gam_retrieval,
    ("mixer", "gam_fp32_tiles"): gam_mixer,
}


def make_inputs(op, b, n, d, s, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen) * scale
        return x.to(device=device, dtype=dtype).requires_grad_()

    if op == "conv":
        return [t(b, n, d), t(d, 1, k, scale=0.5), t(d, scale=0.1)]
    if op == "retrieval":
        # xavier-like bank, as GAMBlock initialises it
        return [t(b, n, d), t(s, d, scale=math.sqrt(2.0 / (s + d)))]
    if op == "gate":
        return [t(b, n, d), t(b, n, d), t(b, n, 2 * d)]
    return [
        t(b, n, d),
        t(d, 1, k, scale=0.5),
        t(d, scale=0.1),
        t(s, d, scale=math.sqrt(2.0 / (s + d))),
        t(2 * d, d, scale=1 / math.sqrt(d)),
        t(2 * d, scale=0.01),
    ]


def model_flops(op, mode, b, n, d, s, k):
    conv = {"fwd": 2 * b * n * d * k, "bwd": 4 * b * n * d * k}
    retrieval = {"fwd": 4 * b * n * s * d, "bwd": 8 * b * n * s * d}
    gate = {"fwd": 10 * b * n * d, "bwd": 12 * b * n * d}
    linear = {"fwd": 4 * b * n * d * d, "bwd": 8 * b * n * d * d}
    parts = {
        "conv": [conv],
        "retrieval": [retrieval],
        "gate": [gate],
        "mixer": [conv, retrieval, gate, linear],
    }[op]
    modes = ("fwd", "bwd") if mode == "fwdbwd" else (mode,)
    return sum(p[m] for p in parts for m in modes)


def mixer_gemm_flops(b, n, d, s):
    """GEMM FLOPs of the mixer fwd+bwd: retrieval (2 fwd + 4 bwd) and gate linear (1 + 2)."""
    return 3 * 4 * b * n * s * d + 3 * 4 * b * n * d * d


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn, inputs, grad, mode, device):
    """One repeat of mode; returns the timed seconds."""
    for t in inputs:
        t.grad = None
    if mode == "bwd":
        out = fn(*inputs)
        sync(device)
        start = time.perf_counter()
        out.backward(grad)
        sync(device)
        return time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    out = fn(*inputs)
    if mode == "fwdbwd":
        out.backward(grad)
    sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def time_providers(entries, mode, device, repeats, warmup, max_seconds, originals):
    """{provider: (median, min, repeats)} seconds for one mode. The repeats are interleaved: each
    round runs every provider once, starting one provider later each round, so that a slow stretch
    of a shared machine falls on all providers alike instead of on whichever ran then. Stops after
    `repeats` rounds, or once every provider has spent max_seconds (>= 3 rounds), or once one has
    spent 3 * max_seconds."""
    for provider, fn, inputs, grad in entries:
        set_provider_env(provider, originals)
        for _ in range(warmup):
            run_once(fn, inputs, grad, mode, device)
    times = {provider: [] for provider, *_ in entries}
    spent = dict.fromkeys(times, 0.0)
    for r in range(repeats):
        shift = r % len(entries)
        for provider, fn, inputs, grad in entries[shift:] + entries[:shift]:
            set_provider_env(provider, originals)
            times[provider].append(run_once(fn, inputs, grad, mode, device))
            spent[provider] += times[provider][-1]
        if (r >= 2 and min(spent.values()) > max_seconds) or max(spent.values()) > 3 * max_seconds:
            break
    for _, _, inputs, _ in entries:
        for t in inputs:
            t.grad = None
    return {p: (statistics.median(t), min(t), len(t)) for p, t in times.items()}


def result_bytes(fn, inputs, mode):
    """Bytes every implementation must hold at the end: the output (+ the inputs' grads)."""
    with torch.no_grad():
        out = fn(*[t.detach() for t in inputs])
    total = out.numel() * out.element_size()
    if mode != "fwd":
        total += sum(t.numel() * t.element_size() for t in inputs)
    return total


def peak_memory(fn, inputs, grad, mode, device):
    """Peak bytes allocated during one call of mode, above what was live before it."""
    for t in inputs:
        t.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(*inputs)
        if mode != "fwd":
            out.backward(grad)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs a "USDT profiler_start/stop" line at every profile and, without a GPU, an error
    # about the device count; this measurement needs neither. An explicit KINETO_LOG_LEVEL wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*inputs)
        if mode != "fwd":
            out.backward(grad)
        del out
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def gemm_rate(device, repeats=10):
    """fp32 GEMM GFLOP/s of a 2048x512x512-class product on this device, measured now."""
    a = torch.randn(2048, 512, device=device)
    b = torch.randn(512, 512, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / 5)
    return 2 * 2048 * 512 * 512 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def machine_description(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()} "
        f"(torch {torch.__version__})"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=["float32"],
        help="activation and parameter dtype(s) (default float32)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, nargs="+", default=[512], help="one or more sequence lengths N")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--slots", type=int, default=512, help="memory slots S")
    parser.add_argument("--kernel-size", type=int, default=3, help="conv kernel size K")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        default=None,
        help="default: gam_ext gam_unfused eager compile (+ gam_fp32_tiles on cpu, gam_fused_mixer "
        "sdpa gam_fused gam_wgmma on cuda); each runs only for the ops, dtypes and devices it has",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help="time budget per measurement; slow cells stop after 3 repeats (or 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--out",
        default=None,
        help="output stem (default benchmarks/results/<device>-<date>); writes <stem>.md and <stem>.csv",
    )
    parser.add_argument("--note", default="", help="free text added to the results file")
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = ["gam_ext", "gam_unfused", "eager", "compile"] + (
            ["gam_fused_mixer", "sdpa", "gam_fused", "gam_wgmma"]
            if args.device == "cuda"
            else ["gam_fp32_tiles"]
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    gam_ext.set_backend("auto")
    info = gam_ext.backend_info()["ops"][device]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rate = gemm_rate(device)
    print(f"# {machine_description(device)}; fp32 GEMM {rate:.1f} GFLOP/s; gam_ext ops: {info}", flush=True)

    rows = []
    originals = {name: os.environ.get(name) for name in PROVIDER_ENV}
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for n in args.seqlen:
            b, d, s, k = args.batch, args.d_model, args.slots, args.kernel_size
            for op in args.ops:
                compiled = {}
                entries = []  # (provider, fn, inputs, grad), each provider on its own copy
                for provider in args.providers:
                    if provider in ("sdpa", "gam_fused") and (device != "cuda" or op != "retrieval"):
                        continue
                    if provider in MIXER_PROVIDERS and op != "mixer":
                        continue
                    if provider == "gam_wgmma" and (
                        device != "cuda" or op not in ("retrieval", "mixer") or not has_wgmma(s, d, dtype)
                    ):
                        continue
                    if provider == "gam_fp32_tiles" and (
                        device != "cpu" or dtype != torch.bfloat16 or op not in ("retrieval", "mixer")
                    ):
                        continue
                    mixer_op = op == "mixer" and provider in ("gam_ext", "gam_fused_mixer", "gam_wgmma")
                    met = broken_kernels_met(FORCED_ENV.get(provider, {}), mixer=mixer_op)
                    if device == "cuda" and met:
                        print(f"left out: {op} {provider} (GAM_CHECK_BROKEN: {' '.join(met)})", flush=True)
                        continue
                    if provider == "compile":
                        fn = compiled.setdefault(op, torch.compile(FUNCS[(op, "eager")]))
                    else:
                        fn = FUNCS[(op, provider)]
                    inputs = make_inputs(op, b, n, d, s, k, dtype, device)
                    grad = torch.randn(b, n, d, generator=torch.Generator().manual_seed(1))
                    entries.append((provider, fn, inputs, grad.to(device=device, dtype=dtype)))
                if not entries:  # no provider asked for runs this op here
                    continue
                for mode in args.modes:
                    timings = time_providers(
                        entries, mode, device, args.repeats, args.warmup, args.max_seconds, originals
                    )
                    for provider, fn, inputs, grad in entries:
                        seconds, best, count = timings[provider]
                        set_provider_env(provider, originals)
                        peak = None if args.no_memory else peak_memory(fn, inputs, grad, mode, device)
                        extra = None if peak is None else max(0, peak - result_bytes(fn, inputs, mode))
                        flops = model_flops(op, mode, b, n, d, s, k)
                        row = dict(
                            dtype=dtype_name,
                            batch=b,
                            seqlen=n,
                            d_model=d,
                            slots=s,
                            kernel_size=k,
                            op=op,
                            mode=mode,
                            provider=provider,
                            ms=seconds * 1e3,
                            min_ms=best * 1e3,
                            gflops=flops / seconds / 1e9,
                            peak_mb=None if peak is None else peak / 2**20,
                            extra_mb=None if extra is None else extra / 2**20,
                            repeats=count,
                        )
                        rows.append(row)
                        print(
                            f"{dtype_name} N={n} {op:9s} {mode:6s} {provider:8s} "
                            f"{row['ms']:9.2f} ms {row['gflops']:8.1f} GFLOP/s "
                            f"peak {'-' if peak is None else f'{peak / 2**20:.1f} MB'} "
                            f"extra {'-' if extra is None else f'{extra / 2**20:.1f} MB'}",
                            flush=True,
                        )
                del entries
    set_provider_env("gam_ext", originals)
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["provider"] == "eager"
                and all(r[key] == row[key] for key in ("dtype", "seqlen", "op", "mode"))
            ),
            None,
        )
        row["speedup_vs_eager"] = base["ms"] / row["ms"] if base else None
        row["speedup_min_vs_eager"] = base["min_ms"] / row["min_ms"] if base else None
        for key in ("peak_mb", "extra_mb"):
            row[key.replace("_mb", "_vs_eager")] = (
                row[key] / base[key] if base and base[key] and row[key] is not None else None
            )
    write_results(args, rows, rate, load, info)


def mixer_summary(rows, dtype_name, n, device):
    """The mixer's fwd+bwd in one or two lines, when those rows were measured: gam_ext (the fused
    op where built) against eager and against the unfused gam_ext path, time and peak memory; and
    the fused op against the three ops (gam_fused_mixer against gam_unfused) with the path that the
    backend "auto" takes at this size (``_backend.AUTO_FUSED_MAX_ELEMENTS``), so that a report
    says where that limit should move."""
    cell = {
        r["provider"]: r
        for r in rows
        if r["dtype"] == dtype_name and r["seqlen"] == n and r["op"] == "mixer" and r["mode"] == "fwdbwd"
    }
    lines = []
    if "gam_ext" in cell and "eager" in cell:
        ours, eager = cell["gam_ext"], cell["eager"]
        parts = [
            f"gam_ext {eager['ms'] / ours['ms']:.2f}x eager (median; "
            f"{eager['min_ms'] / ours['min_ms']:.2f}x from min)"
        ]
        if "gam_unfused" in cell:
            unfused = cell["gam_unfused"]
            parts.append(
                f"{unfused['ms'] / ours['ms']:.2f}x gam_unfused "
                f"({unfused['min_ms'] / ours['min_ms']:.2f}x from min)"
            )
        if ours["peak_mb"] is not None and eager["peak_mb"]:
            parts.append(f"peak memory {ours['peak_mb'] / eager['peak_mb']:.2f}x eager")
        lines += ["", "Mixer fwd+bwd: " + ", ".join(parts) + "."]
    if "gam_fused_mixer" in cell and "gam_unfused" in cell:
        fused, unfused = cell["gam_fused_mixer"], cell["gam_unfused"]
        elements = fused["batch"] * fused["seqlen"] * fused["d_model"]
        device = device.split(":")[0]
        limit = gam_ext._backend.AUTO_FUSED_MAX_ELEMENTS.get(device)
        auto = "fused" if gam_ext._backend.within_auto_fused_limit(device, elements) else "unfused"
        limit_text = "no size limit" if limit is None else f"AUTO_FUSED_MAX_ELEMENTS = {limit}"
        lines += [
            "",
            f"Fused op against the three ops, fwd+bwd: gam_fused_mixer "
            f"{unfused['ms'] / fused['ms']:.2f}x gam_unfused (median; "
            f"{unfused['min_ms'] / fused['min_ms']:.2f}x from min); at B*N*D = {elements} the "
            f"backend auto runs the {auto} path ({limit_text} on {device}).",
        ]
    return lines


def write_results(args, rows, rate, load, info):
    date = _dt.date.today().isoformat()
    stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{args.device}-{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "dtype",
        "batch",
        "seqlen",
        "d_model",
        "slots",
        "kernel_size",
        "op",
        "mode",
        "provider",
        "ms",
        "min_ms",
        "gflops",
        "peak_mb",
        "extra_mb",
        "speedup_vs_eager",
        "speedup_min_vs_eager",
        "peak_vs_eager",
        "extra_vs_eager",
        "repeats",
    ]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    lines = [
        f"# gam_ext op benchmark ({args.device}, {date})",
        "",
        f"- machine: {machine_description(args.device)}",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- gam_ext ops on {args.device}: {info}",
        f"- fp32 GEMM rate measured in this run: {rate:.1f} GFLOP/s",
    ]
    if args.device == "cpu":
        lines.append(
            f"- bfloat16 products of the CPU kernels (gam_ext): {gam_ext.backend_info()['cpu_bf16_gemm']}"
            " ('bf16': the CPU's bf16 matrix units through torch's oneDNN micro-kernel; 'fp32': "
            "fp32 tiles)"
        )
        lines.append(
            f"- build of the CPU kernels' vectorised loops: {gam_ext.backend_info()['cpu_isa']}"
            " (GAM_EXT_CPU_ISA caps it)"
        )
    if load is not None:
        lines.append(
            f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / "
            f"{load[2]:.2f} (other processes share this machine: timings are noisy)"
        )
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        "GFLOP/s and speedup use median times; (from min) is the speedup from the "
        "fastest repeat, less sensitive to other load on a shared machine. The providers' "
        "repeats are interleaved (each round runs every provider once). peak MB: peak bytes "
        "allocated during one call above what was live before it (outputs and grads "
        "included); extra MB: that peak minus the bytes of the output and the inputs' grads, "
        "i.e. the workspace an implementation adds (saved activations, scratch).",
        "",
    ]
    for dtype_name in args.dtype:
        for n in args.seqlen:
            b, d, s, k = args.batch, args.d_model, args.slots, args.kernel_size
            lines += [
                f"## {dtype_name}, B={b} N={n} D={d} S={s} K={k}",
                "",
                "| op | mode | provider | median ms | min ms | GFLOP/s | speedup vs eager "
                "| (from min) | peak MB | peak vs eager | extra MB | extra vs eager |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                if r["dtype"] != dtype_name or r["seqlen"] != n:
                    continue
                lines.append(
                    f"| {r['op']} | {r['mode']} | {r['provider']} | {r['ms']:.2f} | "
                    f"{r['min_ms']:.2f} | {r['gflops']:.1f} | {fmt(r['speedup_vs_eager'], '.2f')} | "
                    f"{fmt(r['speedup_min_vs_eager'], '.2f')} | "
                    f"{fmt(r['peak_mb'], '.1f')} | {fmt(r['peak_vs_eager'], '.2f')} | "
                    f"{fmt(r['extra_mb'], '.1f')} | {fmt(r['extra_vs_eager'], '.2f')} |"
                )
            lines += mixer_summary(rows, dtype_name, n, args.device)
            floor_ms = mixer_gemm_flops(b, n, d, s) / (rate * 1e9) * 1e3
            lines += [
                "",
                f"fp32 GEMM floor of the mixer fwd+bwd (its {mixer_gemm_flops(b, n, d, s) / 1e9:.2f} "
                f"GEMM GFLOP at {rate:.1f} GFLOP/s): {floor_ms:.2f} ms",
                "",
            ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
