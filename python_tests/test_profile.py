"""benchmarks/profile_steps.py runs on the CPU and reports the gam_ext ops it profiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# The scripts import the installed gam_ext: make that this source tree.
ENV = {**{k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}, "PYTHONPATH": str(ROOT)}


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
