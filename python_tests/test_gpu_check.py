"""scripts/gpu_check.sh on a machine without a GPU: stops at once, says why, writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def run_check(**env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON"} | env
    start = time.monotonic()
    out = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )
    return out, time.monotonic() - start


def test_stops_without_gpu_and_writes_nothing():
    before = sorted(RESULTS.iterdir())
    out, seconds = run_check(PYTHON=sys.executable)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "sees no CUDA GPU" in out.stderr and "Nothing was built or written" in out.stderr
    assert sorted(RESULTS.iterdir()) == before
    assert seconds < 60, f"took {seconds:.0f} s: it must stop before building anything"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no .venv here")
def test_prefers_the_project_venv():
    out, _ = run_check()
    assert out.returncode == 2
    assert ".venv/bin/python sees no CUDA GPU" in out.stderr
