"""benchmarks/profile_steps.py runs on the CPU and reports the gam_ext ops it profiled."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent


# The scripts import the installed gam_ext: make that this source tree.
ENV = {**{k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}, "PYTHONPATH": str(ROOT)}


def load_script(path: Path) -> types.ModuleType:
    """A script of the repository imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def run_profile(*args: str) -> subprocess.CompletedProcess:
    return run_script("profile_steps.py", *args)


def test_profile_runs_on_cpu(tmp_path):
    trace = tmp_path / "trace.json"
    out = run_profile(
        "--device",
        "cpu",
        "--what",
        "model",
        "--batch",
        "2",
        "--seqlen",
        "16",
        "--d-model",
        "16",
        "--slots",
        "4",
        "--layers",
        "1",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--trace",
        str(trace),
    )
    assert out.returncode == 0, out.stderr
    assert "ms/step" in out.stdout and "Self CPU" in out.stdout
    assert trace.stat().st_size > 0
    # The model's step is a training step: its own cross-entropy, no surrogate loss on the logits.
    # Read from the trace, which holds every op: the printed table is only the top rows by time,
    # and at this size nll_loss can fall out of it.
    events = trace.read_text()
    assert '"aten::nll_loss' in events and '"aten::pow' not in events
    # Nothing from torch.profiler's Kineto logging on a CPU run (it printed "gpuGetDeviceCount
    # failed" without a GPU, and USDT lines at every profiler start and stop).
    assert "gpuGetDeviceCount" not in out.stderr and "USDT" not in out.stderr, out.stderr


def test_bench_ops_cpu_run_is_quiet(tmp_path):
    out = run_script(
        "bench_ops.py",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seqlen",
        "16",
        "--d-model",
        "8",
        "--slots",
        "4",
        "--ops",
        "conv",
        "gate",
        "--providers",
        "gam_ext",
        "eager",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "bench"),
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "bench.md").is_file() and (tmp_path / "bench.csv").is_file()
    assert "USDT" not in out.stderr + out.stdout and "gpuGetDeviceCount" not in out.stderr
    assert out.stdout.count("peak") == 12  # 2 ops x 3 modes x 2 providers, each with its memory


def test_profile_rejects_bad_flags():
    out = run_profile("--batch", "0")
    assert out.returncode == 2 and "--batch must be >= 1" in out.stderr


def test_no_script_shadows_the_standard_library():
    # A script's folder is sys.path[0]: a benchmarks/profile.py once hid the stdlib module that
    # torch.compile imports, and every other script in that folder failed on a GPU.
    scripts = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("scripts/*.py")]
    assert scripts
    clashes = [p.name for p in scripts if p.stem in sys.stdlib_module_names]
    assert not clashes, f"rename these: they shadow standard-library modules: {clashes}"


def test_profile_mixer_prints_a_table_per_backend(tmp_path):
    # The breakdown stage of scripts/gpu_check.sh: the mixer alone, once per backend; on the CPU
    # the table lists ops by self CPU time, and the fused backend shows the fused ops.
    tables = {}
    for backend in ("unfused", "fused"):
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "profile_steps.py"),
                *("--device", "cpu", "--what", "mixer", "--batch", "2", "--seqlen", "16"),
                *("--d-model", "16", "--slots", "4", "--warmup", "1", "--steps", "2"),
                *("--trace", str(tmp_path / f"{backend}.json")),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**ENV, "GAM_EXT_BACKEND": backend},
        )
        assert out.returncode == 0, out.stderr
        assert f"backend {backend}" in out.stdout
        tables[backend] = out.stdout[out.stdout.index("| op (self CPU time) |") :]
        assert "| **all** |" in tables[backend]
    # Which ops each step ran is read from the traces, which hold every op: a table holds only its
    # top rows by time, and at this size a cheap op can fall out of them.
    events = {backend: (tmp_path / f"{backend}.json").read_text() for backend in tables}
    assert '"gam_ext::gam_mixer_bwd' in events["fused"] and '"gam_ext::gam_mixer' not in events["unfused"]
    assert '"gam_ext::memory_retrieval_bwd' in events["unfused"]
    # The backward starts from a fixed gradient of the output: no surrogate loss in the step.
    for backend, trace in events.items():
        assert '"aten::pow' not in trace and '"aten::mean' not in trace, backend
    # The fused op, about a third of the fused step, is listed in its table.
    assert "| gam_ext::gam_mixer_bwd |" in tables["fused"]


def test_kernel_table_on_cuda_events():
    # The CUDA branch of kernel_table, on stand-ins for torch.profiler's averaged events: device
    # events only, busiest first, per step, the rest summed in one row.
    module = load_script(ROOT / "benchmarks" / "profile_steps.py")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(key="aten::mm", device_type=cpu, count=4, self_device_time_total=0.0),
        SimpleNamespace(key="small_kernel", device_type=cuda, count=2, self_device_time_total=100.0),
        SimpleNamespace(key="gemm|kernel", device_type=cuda, count=4, self_device_time_total=300.0),
        SimpleNamespace(key="tiny", device_type=cuda, count=2, self_device_time_total=50.0),
    ]
    profiler = SimpleNamespace(key_averages=lambda: events)
    table = module.kernel_table(profiler, cuda=True, steps=2, rows=2).splitlines()
    assert table[2] == "| gemm/kernel | 2 | 150.0 | 66.7% |"
    assert table[3] == "| small_kernel | 1 | 50.0 | 22.2% |"
    assert table[4] == "| (1 more) | | 25.0 | 11.1% |"
    assert table[5] == "| **all** | 4 | 225.0 | 100% |"
    assert not any("aten::mm" in line for line in table)


def test_bench_ops_wgmma_provider_only_where_it_runs(monkeypatch):
    # gam_wgmma is a cuda provider that runs only where GAM_EXT_RETRIEVAL=wgmma reaches the wgmma
    # forward; without a GPU backend_info has no CUDA kernels to name, so it is never picked, and
    # the caller's GAM_EXT_RETRIEVAL is left as it was.
    bench = load_script(ROOT / "benchmarks" / "bench_ops.py")
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "gemm")
    if not torch.cuda.is_available():
        assert not bench.has_wgmma(512, 512, torch.bfloat16)
    assert os.environ["GAM_EXT_RETRIEVAL"] == "gemm"
    assert "gam_wgmma" not in bench.parse_args(["--device", "cpu"]).providers
    assert bench.FORCED_ENV["gam_wgmma"] == {"GAM_EXT_RETRIEVAL": "wgmma"}


def test_bench_ops_mixer_summary_says_which_path_auto_takes():
    # The report sets the fused op against the three ops at each size and says which of them the
    # backend auto runs there, on each side of AUTO_FUSED_MAX_ELEMENTS.
    bench = load_script(ROOT / "benchmarks" / "bench_ops.py")
    limit = bench.gam_ext._backend.AUTO_FUSED_MAX_ELEMENTS["cuda"]

    def rows(batch, seqlen, d):
        timed = {"gam_ext": 2.0, "eager": 6.0, "gam_fused_mixer": 2.0, "gam_unfused": 2.5}
        return [
            dict(
                dtype="bfloat16",
                batch=batch,
                seqlen=seqlen,
                d_model=d,
                op="mixer",
                mode="fwdbwd",
                provider=p,
                ms=ms,
                min_ms=ms,
                peak_mb=None,
            )
            for p, ms in timed.items()
        ]

    small = bench.mixer_summary(rows(1, limit // 512, 512), "bfloat16", limit // 512, "cuda:0")
    assert "gam_fused_mixer 1.25x gam_unfused" in small[-1] and "runs the fused path" in small[-1]
    assert "3.00x eager" in small[1]
    large = bench.mixer_summary(rows(2, limit // 512, 512), "bfloat16", limit // 512, "cuda")
    assert "runs the unfused path" in large[-1]
    cpu = bench.mixer_summary(rows(2, limit // 512, 512), "bfloat16", limit // 512, "cpu")
    assert "runs the fused path (no size limit on cpu)" in cpu[-1]
