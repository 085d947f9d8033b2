"""benchmarks/bench_generate.py on a tiny grid: the three files, every provider, the KV cache exact."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch
from tolerances import TOL

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_generate.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))


def test_tiny_grid_writes_table_csv_and_plot(tmp_path):
    stem = tmp_path / "gen"
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--contexts",
            "8",
            "24",
            "--d-model",
            "16",
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--slots",
            "8",
            "--vocab-size",
            "50",
            "--tokens",
            "3",
            "--repeats",
            "2",
            "--short-block",
            "16",
            "--threads",
            "1",
            "--out",
            str(stem),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert {"provider", "context", "status", "ms", "tokens_per_s", "state_mb", "peak_mb"} <= set(rows[0])
    by = {(r["provider"], int(r["context"])): r for r in rows}
    for provider in ("gam_step", "gam_recompute", "transformer_kv", "gam_step_block16"):
        for context in (8, 24):
            assert by[provider, context]["status"] == "ok" and float(by[provider, context]["ms"]) > 0
    # GAM's state does not grow with the context; the KV cache does.
    assert by["gam_step", 8]["state_mb"] == by["gam_step", 24]["state_mb"]
    assert float(by["transformer_kv", 24]["state_mb"]) == 3 * float(by["transformer_kv", 8]["state_mb"])
    text = stem.with_suffix(".md").read_text()
    assert "## Targets" in text and "gam_recompute latency / gam_step latency" in text
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "USDT" not in out.stdout + out.stderr
    assert not any(r["provider"] == "gam_step_graph" for r in rows)  # CUDA only: not by default here


def test_cuda_only_provider_on_the_cpu_is_refused():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--providers", "gam_step", "gam_step_graph"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "gam_step_graph runs on CUDA only (--device cuda)" in out.stderr


def test_kv_cache_step_is_the_transformer_forward():
    from baselines import TransformerLM
    from bench_generate import KVCache, kv_forward

    torch.manual_seed(0)
    model = TransformerLM(40, 32, 16, 2, n_head=2, dropout=0.0).eval()
    idx = torch.randint(0, 40, (2, 20))
    cache = KVCache(model, 2, 32, torch.float32, torch.device("cpu"))
    logits = [kv_forward(model, idx[:, :5], cache)]
    logits += [kv_forward(model, idx[:, t : t + 1], cache) for t in range(5, 20)]
    with torch.no_grad():
        full = model(idx)[0][:, 4:]
    torch.testing.assert_close(torch.stack(logits, 1), full, **TOL[torch.float32])
