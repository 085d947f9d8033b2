"""scripts/gpu_check.sh on a machine without a GPU: stops at once, says why, writes nothing."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def load_script(path: Path) -> types.ModuleType:
    """A script of the repository imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_sanitizer_driver_selects_shared_memory_groups(monkeypatch, capsys):
    """racecheck (shared memory only) gets the groups whose kernels use shared memory; each group
    prints a progress line, so a run cut off by gpu_check.sh's time limit shows how far it got."""
    driver = load_script(ROOT / "scripts" / "cuda_sanitize_driver.py")
    ran = []
    groups = [(name, lambda name=name: ran.append(name), shared) for name, _, shared in driver.GROUPS]
    monkeypatch.setattr(driver, "GROUPS", groups)
    monkeypatch.setattr(
        driver.gam_ext, "backend_info", lambda: {"ops": {"cuda": {"memory_retrieval": "kernel"}}}
    )
    monkeypatch.setattr(driver.torch.cuda, "synchronize", lambda: None)
    for argv, expected in (
        (["--shared-memory-only"], [name for name, _, shared in groups if shared]),
        ([], [name for name, _, _ in groups]),
    ):
        ran.clear()
        monkeypatch.setattr(sys, "argv", ["cuda_sanitize_driver.py", *argv])
        driver.main()
        assert ran == expected
        out = capsys.readouterr().out
        assert [line.split(": ", 1)[1].rsplit(" done", 1)[0] for line in out.splitlines()[:-1]] == expected
        assert out.splitlines()[-1] == "cuda_sanitize_driver: ok"
    shared = {name for name, _, is_shared in driver.GROUPS if is_shared}
    assert any("tensor-core" in name for name in shared) and not any("gemm" in name for name in shared)


# The Python stages of gpu_check.sh and the variable that holds each one's arguments.
STAGE_SCRIPTS = {
    "BENCH_ARGS": "cuda_kernel_bench.py",
    "OPS_ARGS": "bench_ops.py",
    "FP32_ARGS": "bench_ops.py",
    "BREAKDOWN_ARGS": "profile_steps.py",
    "PROFILE_ARGS": "profile_steps.py",
    "SCALING_ARGS": "bench_scaling.py",
    "GENERATE_ARGS": "bench_generate.py",
}


def stage_arguments() -> dict[str, list[str]]:
    """The *_ARGS strings of gpu_check.sh as bash would pass them: line continuations joined,
    ${SLUG} and ${DATE} filled in, split on whitespace."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    found = {}
    for name, value in re.findall(r'^\s*([A-Z0-9_]+_ARGS)="(.*?)"$', text, flags=re.M | re.S):
        value = value.replace("\\\n", "").replace("${SLUG}", "GPU").replace("${DATE}", "2026-01-01")
        found[name] = shlex.split(value)
    return found


def test_every_stage_passes_arguments_its_script_accepts(monkeypatch):
    # A GPU machine is lent for minutes: a flag a script no longer takes would cost a whole run.

    found = stage_arguments()
    assert set(STAGE_SCRIPTS) <= set(found), sorted(found)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when a script runs: its own folder
    for name, script in STAGE_SCRIPTS.items():
        module = load_script(ROOT / "benchmarks" / script)
        try:
            module.parse_args(found[name])
        except SystemExit as exc:
            pytest.fail(f"gpu_check.sh's {name} is refused by benchmarks/{script}: {exc}")


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in interpreter that claims a GPU: answers gpu_check.sh's one-line queries and lets every
# stage succeed at once, recording its arguments.
echo "$*" >> "$CALLS"
# The report's own helper runs for real where the test names an interpreter for it.
[[ "$1" == *ncu_source_top.py && -n "${REAL_PYTHON:-}" ]] && exec "$REAL_PYTHON" "$@"
if [[ "$1" == -c ]]; then
  case "$2" in
    *get_device_capability*) echo 9.0 ;;
    *get_device_name*) echo "Stand-in GPU" ;;
    *__version__*) echo "2.0 CUDA 13.0" ;;
    *backend_info*) echo "{'path': 'gemm'}" ;;
  esac
  exit 0
fi
[[ "$*" == *pytest* ]] && echo "3 passed in 0.01s"
exit 0
"""


def test_report_names_every_stage_with_its_time(tmp_path):
    """A whole run on a stand-in interpreter: every stage runs in order and the report lists each
    with its status and wall time, so that a slip in the script's report code cannot cost a GPU
    run."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    # Stand-in profilers first on PATH: they succeed at once and record their command lines.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("compute-sanitizer", "ncu"):
        (tools / tool).write_text(
            f'#!/usr/bin/env bash\necho "{tool} $*" >> "$CALLS"\necho "ERROR SUMMARY: 0 errors"\n'
            # ncu's source page, as CSV, for the report's table of stalls.
            + (
                '[[ "$*" == *"--page source"* ]] && printf \'%s\\n\' "$NCU_SOURCE_CSV"\nexit 0\n'
                if tool == "ncu"
                else ""
            )
        )
        (tools / tool).chmod(0o755)
    path = os.pathsep.join([str(tools), os.environ["PATH"]])
    before = set(RESULTS.iterdir())
    try:
        out, _ = run_check(
            PYTHON=str(python),
            CALLS=str(calls),
            GAM_CHECK_LOG_DIR=str(tmp_path / "logs"),
            PATH=path,
            NCU_SOURCE_CSV=SOURCE_CSV,
            REAL_PYTHON=sys.executable,
        )
        written = set(RESULTS.iterdir()) - before
        assert out.returncode == 0, out.stdout + out.stderr
        assert [p.name for p in written] == [f"Stand-in-GPU-{time.strftime('%Y-%m-%d', time.gmtime())}.md"]
        report = next(iter(written)).read_text()
    finally:
        for p in set(RESULTS.iterdir()) - before:
            p.unlink()
    lines = report.splitlines()
    first = lines.index("| stage | command | result |") + 2
    table = lines[first : lines.index("", first)]
    rows = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in table]
    assert all(len(row) == 3 for row in rows), table
    stages = [row[0] for row in rows]
    assert stages == [
        "build",
        "tests",
        "memcheck",
        "kernel bench",
        "ncu",
        "racecheck",
        "op bench",
        "fp32 paths",
        "mixer breakdown",
        "scaling",
        "generation",
    ]
    results = {row[0]: row[2] for row in rows}
    for stage in stages:
        assert re.fullmatch(r"ok(: 3 passed in 0\.01s)? \(\d+s\)", results[stage]), (stage, results[stage])
    # Each stage ran its own script.
    ran = calls.read_text()
    for script in set(STAGE_SCRIPTS.values()):
        assert f"benchmarks/{script}" in ran, script
    for tool in ("compute-sanitizer --tool memcheck", "compute-sanitizer --tool racecheck", "ncu --clock"):
        assert tool in ran, tool
    # The source-page pass: a report saved, then its SASS page read back, summarised in the report.
    assert "-k regex:seesaw|bwd_scores -c 2 --section SourceCounters" in ran and "--page source" in ran
    assert "## Nsight Compute, where the warps stall" in report
    assert "| 0x0040 | `DEPBAR.LE SB0, 0x1` | 90 | 75.0% |" in report


# A source page as ncu prints it with --csv (the columns the summary reads, and others).
SOURCE_CSV = """\
"retrieval_fwd_wgmma_seesaw_kernel"
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"
"0x0010","HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;","10","8"
"0x0040","DEPBAR.LE SB0, 0x1 ;","90","88"
"0x0050","BAR.SYNC.DEFER_BLOCKING R3, R4 ;","20","20"
"Kernel Name","retrieval_bwd_scores_wgmma_kernel"
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"
"0x0100","LDG.E.128 R4, desc[UR6][R2.64] ;","1,200","1,100"
"""


def test_ncu_source_summary_lists_each_kernels_top_stalls(tmp_path, capsys):
    top = load_script(ROOT / "scripts" / "ncu_source_top.py")
    path = tmp_path / "source.csv"
    path.write_text(SOURCE_CSV)
    assert top.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "retrieval_fwd_wgmma_seesaw_kernel: 3 instructions, 120 stall samples" in out
    assert "retrieval_bwd_scores_wgmma_kernel: 1 instructions, 1200 stall samples" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0x")]
    # The two most-sampled of the first kernel, most first, then the second kernel's.
    assert [row.split(" | ")[0] for row in rows] == ["| 0x0040", "| 0x0050", "| 0x0100"]
    assert rows[2].endswith("| 1200 | 100.0% |")
    # A file without such a table: its first lines, so the report still shows what ncu said.
    path.write_text("==ERROR== the source page is not available\n")
    assert top.main([str(path)]) == 0
    assert "==ERROR== the source page is not available" in capsys.readouterr().out


def test_kernel_bench_times_back_to_back_calls(monkeypatch):
    """cuda_kernel_bench.timeit: the per-call time of rounds of back-to-back calls between two
    events (on stand-in events whose clock the timed function advances), warm-up calls untimed."""
    bench = load_script(ROOT / "benchmarks" / "cuda_kernel_bench.py")
    clock = {"ms": 0.0, "calls": 0}

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            self.ms = clock["ms"]

        def elapsed_time(self, end: Event) -> float:
            return end.ms - self.ms

    def call() -> None:
        clock["calls"] += 1
        clock["ms"] += 2.0 if clock["calls"] == 8 else 0.5  # one slow call, in the second round

    monkeypatch.setattr(bench.torch.cuda, "Event", Event)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    seconds = bench.timeit(call, calls=4, rounds=3, warmup=2)
    assert clock["calls"] == 2 + 4 * 3
    assert seconds == pytest.approx(0.5e-3)  # the median round's mean; the slow round left out


def test_parts_split_the_stages_between_two_reports(tmp_path):
    """GAM_CHECK_PART=1 runs the build, tests, sanitizers, kernel benchmark and ncu, =2 the
    benchmarks (keeping the build it finds), each writing its own report of its own stages, also
    where both share a log folder; anything else stops before doing anything."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "gpu_check.sh").write_text((ROOT / "scripts" / "gpu_check.sh").read_text())
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)  # its check for an existing CUDA build passes: part 2 keeps it
    python.chmod(0o755)
    env = dict(os.environ) | {
        "PYTHON": str(python),
        "CALLS": str(tmp_path / "calls.txt"),
        "GAM_CHECK_LOG_DIR": str(tmp_path / "log"),
    }
    reports = {}
    for part, name in (("1", "Stand-in-GPU-{}.md"), ("2", "Stand-in-GPU-{}-part2.md")):
        out = subprocess.run(
            ["bash", "scripts/gpu_check.sh"], cwd=tmp_path, env=env | {"GAM_CHECK_PART": part},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        (path,) = (tmp_path / "benchmarks" / "results").glob(name.format("*"))
        reports[part] = path.read_text()
        path.unlink()
    rows = {
        p: dict(re.findall(r"^\| ([a-z0-9 ]+) \| .* \| (.*) \|$", r, flags=re.M)) for p, r in reports.items()
    }
    skipped = "skipped (GAM_CHECK_PART={})"
    assert rows["1"]["tests"].startswith("ok") and rows["1"]["kernel bench"].startswith("ok")
    assert rows["1"]["op bench"] == rows["1"]["generation"] == skipped.format(1)
    assert "## Kernel figures" in reports["1"] and "## bench_ops.py" not in reports["1"]
    assert rows["2"]["build"] == "not run: this checkout's CUDA build kept"
    assert rows["2"]["tests"] == rows["2"]["kernel bench"] == rows["2"]["racecheck"] == skipped.format(2)
    assert rows["2"]["op bench"].startswith("ok") and rows["2"]["generation"].startswith("ok")
    assert "## bench_ops.py" in reports["2"] and "## Kernel figures" not in reports["2"]
    assert "`GAM_CHECK_PART=2 bash scripts/gpu_check.sh`" in reports["2"]
    out = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=tmp_path, env=env | {"GAM_CHECK_PART": "3"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "GAM_CHECK_PART must be all, 1 or 2" in out.stderr
    assert not list((tmp_path / "benchmarks" / "results").iterdir())
