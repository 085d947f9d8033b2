"""benchmarks/bench_scaling.py on a tiny grid: the three files, their columns, caps recorded."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"
TINY = [
    "--device",
    "cpu",
    "--batch",
    "1",
    "--d-model",
    "16",
    "--n-head",
    "2",
    "--slots",
    "8",
    "--repeats",
    "2",
    "--max-seconds",
    "0.1",
    "--dtype",
    "fp32",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args], capture_output=True, text=True, timeout=600
    )


def read_rows(stem: Path) -> list[dict]:
    with open(stem.with_suffix(".csv")) as f:
        return list(csv.DictReader(f))


def test_block_grid_writes_table_csv_and_plot(tmp_path):
    stem = tmp_path / "block"
    out = run(
        "--seqlen",
        "16",
        "32",
        "--out",
        str(stem),
        "--cpu-memory-cap",
        "0",
        "--providers",
        "gam_ext",
        "gam_reference",
        "sdpa",
        "naive_attn",
        "mamba",
    )
    assert out.returncode == 0, out.stderr
    rows = read_rows(stem)
    assert {"dtype", "provider", "seqlen", "status", "ms", "min_ms", "peak_mb", "params"} <= set(rows[0])
    by = {(r["provider"], int(r["seqlen"])): r for r in rows}
    for provider in ("gam_ext", "gam_reference", "sdpa", "mamba"):
        for n in (16, 32):
            assert by[provider, n]["status"] == "ok" and float(by[provider, n]["ms"]) > 0
    # A cap is recorded, not raised, and larger N are skipped for that provider.
    assert by["naive_attn", 16]["status"].startswith("memory cap")
    assert by["naive_attn", 32]["status"].startswith("skipped")
    text = stem.with_suffix(".md").read_text()
    assert "time slope" in text and "The paper's figures" in text and "| 8192 | 217.3 |" in text
    assert "gam_reference time / gam_ext time = " in text
    assert stem.with_suffix(".png").stat().st_size > 10_000


def test_time_cap_is_recorded(tmp_path):
    stem = tmp_path / "cap"
    out = run(
        "--seqlen", "16", "--out", str(stem), "--cap-seconds", "1e-9", "--no-memory", "--providers", "gam_ext"
    )
    assert out.returncode == 0, out.stderr
    (row,) = read_rows(stem)
    assert row["status"].startswith("time cap") and row["ms"] == ""


def test_model_mode_reports_tokens_per_second(tmp_path):
    stem = tmp_path / "model"
    out = run(
        "--model",
        "--seqlen",
        "16",
        "--n-layer",
        "1",
        "--vocab-size",
        "50",
        "--out",
        str(stem),
        "--providers",
        "gam_ext",
        "transformer",
        "mamba",
    )
    assert out.returncode == 0, out.stderr
    rows = read_rows(stem)
    assert {r["provider"] for r in rows} == {"gam_ext", "transformer", "mamba"}
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 and int(r["params"]) > 0 for r in rows)
    assert "tokens/s" in stem.with_suffix(".md").read_text()


def test_rejects_bad_flags():
    out = run("--providers", "flash")
    assert out.returncode == 2 and "unknown provider" in out.stderr
    out = run("--d-model", "15")
    assert out.returncode == 2 and "divisible" in out.stderr


def test_missing_mamba_is_recorded_not_raised(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_scaling

    def missing(device):
        raise ImportError("no mamba here")

    monkeypatch.setattr(bench_scaling, "mamba_implementation", missing)
    args = bench_scaling.parse_args([*TINY, "--seqlen", "16"])
    args.dtype_name = "fp32"
    row = bench_scaling.measure("mamba", 16, args)
    assert row["status"].startswith("not installed") and row["ms"] is None
