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


def test_sanitizer_driver_leaves_broken_paths_out(monkeypatch):
    """With kernel paths in GAM_CHECK_BROKEN the driver runs the wgmma forward and backward on the
    first working forward, the other working forwards forward only, and no case of a broken
    path or of the fused mixer where that is broken."""
    driver = load_script(ROOT / "scripts" / "cuda_sanitize_driver.py")
    seen = []
    for name in ("GAM_EXT_RETRIEVAL", "GAM_EXT_WGMMA_FORWARD"):
        monkeypatch.setenv(name, "")  # restored after the test; the driver sets them itself
    monkeypatch.setattr(driver, "DEV", "cpu")
    monkeypatch.setattr(
        driver, "step", lambda dtype, **_: seen.append(("fwd+bwd", os.environ["GAM_EXT_WGMMA_FORWARD"]))
    )
    monkeypatch.setattr(
        driver.gam_ext,
        "memory_retrieval",
        lambda *_: seen.append(("fwd", os.environ["GAM_EXT_WGMMA_FORWARD"])),
    )
    monkeypatch.setattr(driver.gam_ext, "gam_mixer", lambda *_: pytest.fail("the fused mixer ran"))

    def runs(broken: set[str], cases) -> set[tuple[str, str]]:
        monkeypatch.setattr(driver, "BROKEN", broken)
        seen.clear()
        cases()
        return set(seen)

    assert runs({"wgmma-pipelined", "mixer"}, driver.wgmma_cases) == {
        ("fwd+bwd", "lockstep"),
        ("fwd", "seesaw"),
    }
    assert runs({"wgmma-backward", "mixer"}, driver.wgmma_cases) == {
        ("fwd", "pipelined"),
        ("fwd", "lockstep"),
        ("fwd", "seesaw"),
    }
    assert runs({"fused"}, lambda: driver.path_cases("fused")) == set()
    assert runs({"fused"}, driver.tensor_core_tile_cases) == set()
    assert runs({"gemm"}, driver.gemm_softmax_cases) == set()


def test_benchmarks_leave_out_the_providers_of_broken_paths(monkeypatch):
    bench_ops = load_script(ROOT / "benchmarks" / "bench_ops.py")
    met = bench_ops.broken_kernels_met
    monkeypatch.delenv("GAM_EXT_WGMMA_FORWARD", raising=False)
    monkeypatch.delenv("GAM_EXT_RETRIEVAL", raising=False)
    monkeypatch.delenv("GAM_CHECK_BROKEN", raising=False)
    assert met({"GAM_EXT_RETRIEVAL": "wgmma"}, mixer=True) == []
    monkeypatch.setenv("GAM_CHECK_BROKEN", "wgmma-pipelined fused mixer")
    assert met({"GAM_EXT_RETRIEVAL": "wgmma"}) == ["wgmma-pipelined"]
    assert met({"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "lockstep"}) == []
    assert met({"GAM_EXT_RETRIEVAL": "fused"}, mixer=True) == ["fused", "mixer"]
    assert met({}) == []  # the default path, which the smoke stage found working
    monkeypatch.setenv("GAM_EXT_WGMMA_FORWARD", "lockstep")  # as gpu_check.sh sets it then
    assert met({"GAM_EXT_RETRIEVAL": "wgmma"}) == []
    monkeypatch.setenv("GAM_CHECK_BROKEN", "wgmma-backward")
    assert met({"GAM_EXT_RETRIEVAL": "wgmma"}, backward=False) == []
    assert met({"GAM_EXT_RETRIEVAL": "wgmma"}) == ["wgmma-backward"]


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
# stage succeed at once, recording its arguments (and what the smoke stage left out, and the wgmma
# forward, where the check sets them).
echo "$*${GAM_CHECK_BROKEN:+ [broken: $GAM_CHECK_BROKEN]}${GAM_EXT_WGMMA_FORWARD:+ [forward: \\
$GAM_EXT_WGMMA_FORWARD]}" >> "$CALLS"
# The report's own helper runs for real where the test names an interpreter for it.
[[ "$1" == *ncu_source_top.py && -n "${REAL_PYTHON:-}" ]] && exec "$REAL_PYTHON" "$@"
# The smoke stage prints what the test gives it (by default: every path ok).
if [[ "$1" == *cuda_smoke.py ]]; then
  printf '%s\n' "${SMOKE_OUTPUT:-| gemm | ok | fine |}" "broken: ${SMOKE_BROKEN:-none}"
  exit "${SMOKE_RC:-0}"
fi
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


def run_on_stand_ins(tmp_path: Path, **env: str) -> tuple[str, str]:
    """gpu_check.sh run whole on a stand-in interpreter and stand-in profilers, which succeed at
    once and record their command lines (with the kernel-picking variables they were given):
    (the report, the recorded calls)."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    # Stand-in profilers first on PATH: they succeed at once and record their command lines.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("compute-sanitizer", "ncu"):
        (tools / tool).write_text(
            f'#!/usr/bin/env bash\necho "{tool} $* [env: ${{GAM_EXT_BACKEND:-}} ${{GAM_EXT_RETRIEVAL:-}} '
            '${GAM_EXT_WGMMA_FORWARD:-}]" >> "$CALLS"\necho "ERROR SUMMARY: 0 errors"\n'
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
            **env,
        )
        written = set(RESULTS.iterdir()) - before
        assert out.returncode == 0, out.stdout + out.stderr
        assert [p.name for p in written] == [f"Stand-in-GPU-{time.strftime('%Y-%m-%d', time.gmtime())}.md"]
        report = next(iter(written)).read_text()
    finally:
        for p in set(RESULTS.iterdir()) - before:
            p.unlink()
    return report, calls.read_text()


def test_report_names_every_stage_with_its_time(tmp_path):
    """A whole run on a stand-in interpreter: every stage runs in order and the report lists each
    with its status and wall time, so that a slip in the script's report code cannot cost a GPU
    run."""
    report, ran = run_on_stand_ins(tmp_path)
    lines = report.splitlines()
    first = lines.index("| stage | command | result |") + 2
    table = lines[first : lines.index("", first)]
    rows = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in table]
    assert all(len(row) == 3 for row in rows), table
    stages = [row[0] for row in rows]
    assert stages == [
        "build",
        "smoke",
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
    for script in set(STAGE_SCRIPTS.values()):
        assert f"benchmarks/{script}" in ran, script
    for tool in ("compute-sanitizer --tool memcheck", "compute-sanitizer --tool racecheck", "ncu --clock"):
        assert tool in ran, tool
    # The source-page pass: a report saved, then its SASS page read back, summarised in the report.
    assert "-k regex:seesaw|bwd_scores -c 2 --section SourceCounters" in ran and "--page source" in ran
    assert "## Nsight Compute, where the warps stall" in report
    assert "| 0x0040 | `DEPBAR.LE SB0, 0x1` | 90 | 75.0% |" in report


def test_smoke_stage_leaves_broken_paths_out(tmp_path):
    """Where the smoke stage finds kernel paths hanging or failing, every later stage is told
    (GAM_CHECK_BROKEN) and the stages that gpu_check.sh runs on those paths itself skip them: here
    the default wgmma forward and the seesaw one, so the wgmma stages run the lockstep forward
    and no seesaw pass runs."""
    table = "| wgmma-pipelined | HANG | no exit in 60 s |\n| wgmma-seesaw | FAILED | exit 1 |"
    report, ran = run_on_stand_ins(
        tmp_path, SMOKE_OUTPUT=table, SMOKE_BROKEN="wgmma-pipelined wgmma-seesaw", SMOKE_RC="1"
    )
    rows = dict(re.findall(r"^\| ([a-z0-9 ]+) \| .* \| (.*) \|$", report, flags=re.M))
    assert rows["smoke"].startswith(
        "ran: not every path ok (the table below): left out of the later stages: wgmma-pipelined wgmma-seesaw"
    )
    assert "| wgmma-pipelined | HANG | no exit in 60 s |" in report  # the smoke table, whole
    lines = ran.splitlines()
    smoke_call = next(i for i, line in enumerate(lines) if "cuda_smoke.py" in line)
    later = [line for line in lines[smoke_call + 1 :] if not line.startswith("-c ")]
    assert later and all(
        "[broken: wgmma-pipelined wgmma-seesaw]" in line for line in later if "[env" not in line
    )
    assert all("[forward: lockstep]" in line for line in later if "[env" not in line)
    profiled = [line for line in lines if line.startswith("ncu") and "--import" not in line]
    assert profiled and all(line.endswith("[env: fused wgmma lockstep]") for line in profiled), profiled
    assert not any("regex:seesaw" in line for line in profiled)
    assert any("-k regex:bwd_scores -c 1 --section SourceCounters" in line for line in profiled)


def test_smoke_stage_without_wgmma_backward_profiles_the_gemm_path(tmp_path):
    report, ran = run_on_stand_ins(tmp_path, SMOKE_BROKEN="wgmma-backward mixer", SMOKE_RC="1")
    profiled = [line for line in ran.splitlines() if line.startswith("ncu")]
    assert len(profiled) == 1 and profiled[0].endswith("[env: unfused gemm ]"), profiled
    assert "## Nsight Compute, where the warps stall" not in report
    breakdowns = [line for line in ran.splitlines() if "--what mixer" in line]
    assert len(breakdowns) == 1  # the unfused backend's only: the fused mixer op is left out


def test_smoke_finds_hung_failed_and_wrong_paths(capsys):
    """cuda_smoke.py's parent on stand-in children: a path that exits 0 is ok, one that exits with
    the wrong-result status WRONG, one that raises FAILED, and one that outlives the time limit
    HANG, named with the case it was in; two that time out together run again alone, so that one
    that only waited beside the other is not blamed. Only HANG and FAILED count as broken."""
    smoke = load_script(ROOT / "scripts" / "cuda_smoke.py")
    children = {
        "gemm": "print('case a'); print('done a 1e-3'); print('worst 1e-03')",
        "fused": "print('case a'); print('wrong a: 0.5 of the largest magnitude'); "
        f"raise SystemExit({smoke.EXIT_WRONG})",
        "simt": "raise RuntimeError('CUDA error: an illegal memory access was encountered')",
        "wgmma-seesaw": "import time; print('case b', flush=True); time.sleep(60)",
        # Slow beside the others (the first run), quick alone (its second).
        "wgmma-lockstep": "import os, time; time.sleep(0 if os.path.exists(os.environ['MARK']) else 60); "
        "print('worst 2e-03')",
    }
    started = []

    def launch(path: str) -> subprocess.Popen:
        if path == "wgmma-lockstep" and path in started:
            Path(os.environ["MARK"]).touch()
        started.append(path)
        return subprocess.Popen(
            [sys.executable, "-c", children[path]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    mark = Path(os.environ.get("TMPDIR", "/tmp")) / f"smoke-mark-{os.getpid()}"
    mark.unlink(missing_ok=True)
    os.environ["MARK"] = str(mark)
    try:
        rc = smoke.run(list(children), time_limit=4, launch=launch)
    finally:
        del os.environ["MARK"]
        mark.unlink(missing_ok=True)
    out = capsys.readouterr().out
    assert rc == 1
    rows = {
        line.split(" | ")[0].removeprefix("| "): line for line in out.splitlines() if line.startswith("| ")
    }
    assert rows["gemm"].startswith("| gemm | ok | largest error 1e-03")
    assert rows["fused"] == "| fused | WRONG | a: 0.5 of the largest magnitude |"
    assert rows["simt"].startswith("| simt | FAILED | exit 1: ") and "illegal memory access" in rows["simt"]
    assert rows["wgmma-seesaw"] == "| wgmma-seesaw | HANG | no exit in 2 s, in b (run again alone) |"
    assert (
        rows["wgmma-lockstep"].startswith("| wgmma-lockstep | ok |")
        and "(run again alone)" in rows["wgmma-lockstep"]
    )
    assert (
        started.count("wgmma-seesaw") == started.count("wgmma-lockstep") == 2 and started.count("gemm") == 1
    )
    assert out.splitlines()[-1] == "broken: simt wgmma-seesaw"
    # No path finished: the script, the build or the machine is at fault, not a kernel, and
    # nothing is left out (else the check would have nothing left to run).
    children = {"gemm": "raise SystemExit(1)", "fused": "import time; time.sleep(60)"}
    assert smoke.run(list(children), time_limit=2, launch=launch) == 1
    out = capsys.readouterr().out
    assert "every path failed or ran out of time: nothing is left out" in out
    assert out.splitlines()[-1] == "broken: none"


def test_smoke_children_run_every_path_on_the_cpu_kernels(monkeypatch, capsys, restore_environ):
    """The smoke children's own code, on the CPU kernels and tiny shapes (the environment variables
    that pick CUDA paths change nothing here): each path passes, and a retrieval that is off
    by a tenth is reported wrong."""
    smoke = load_script(ROOT / "scripts" / "cuda_smoke.py")
    shapes = [(2, 9, 13, 16), (1, 5, 7, 8)]
    import gam_ext

    previous = gam_ext.get_backend()
    try:
        for path in smoke.PATH_ENV:
            for name in smoke.KERNEL_VARIABLES:
                os.environ.pop(name, None)
            assert smoke.child(path, device="cpu", shapes=shapes) == 0, path
        out = capsys.readouterr().out
        assert out.count("worst ") == len(smoke.PATH_ENV)
        assert out.count("case float32") == 3 * len(shapes)  # fp32: the three non-wgmma retrieval paths
        retrieval = gam_ext.memory_retrieval
        monkeypatch.setattr(gam_ext, "memory_retrieval", lambda *a: retrieval(*a) * 1.1)
        assert smoke.child("gemm", device="cpu", shapes=shapes) == smoke.EXIT_WRONG
        assert "wrong bfloat16 B=2 N=9 S=13 D=16" in capsys.readouterr().out
    finally:
        gam_ext.set_backend(previous)


def test_pytest_skips_the_cuda_tests_of_broken_paths(tmp_path):
    """GAM_CHECK_BROKEN marks skipped (with the reason) exactly the CUDA tests that run a broken
    path, by their parameters: a path, a wgmma forward, the fused mixer's tests."""
    script = tmp_path / "collect.py"
    script.write_text(
        "import sys, pytest\n"
        "class Grab:\n"
        "    @pytest.hookimpl(trylast=True)\n"
        "    def pytest_collection_modifyitems(self, items):\n"
        "        for it in items:\n"
        "            skip = [m.kwargs['reason'] for m in it.iter_markers('skip')\n"
        "                    if 'GAM_CHECK' in m.kwargs.get('reason', '')]\n"
        "            print('ITEM', it.nodeid.split('::')[1], '|', skip[0] if skip else '-')\n"
        "args = ['--collect-only', '-q', '-p', 'no:cacheprovider', 'python_tests/test_cuda.py']\n"
        "sys.exit(pytest.main(args, plugins=[Grab()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GAM_EXT_WGMMA_FORWARD", "GAM_CHECK_BROKEN")}

    def collect(broken: str) -> dict[str, str]:
        """Each test of test_cuda.py and its GAM_CHECK_BROKEN skip reason ("-": none)."""
        out = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=env | {"GAM_CHECK_BROKEN": broken},
        )  # fmt: skip
        lines = [line.removeprefix("ITEM ") for line in out.stdout.splitlines() if line.startswith("ITEM")]
        assert len(lines) > 200, out.stdout + out.stderr
        return dict(line.split(" | ") for line in lines)

    items = collect("wgmma-seesaw mixer")
    skipped = {name for name, reason in items.items() if reason != "-"}
    assert "test_retrieval_rising_max[torch.bfloat16-wgmma-seesaw]" in skipped
    assert "test_retrieval_every_wgmma_forward[B2N64S512D512-torch.float16-seesaw]" in skipped
    assert "test_fused_mixer[B1N1D8S1K1-torch.float32-gemm]" in skipped
    assert items["test_fused_mixer[B1N1D8S1K1-torch.float32-gemm]"].endswith("found mixer hanging or failing")
    assert "test_training_step_captures_in_a_cuda_graph[gemm-fused]" in skipped  # the backend param
    for name in skipped:
        assert "seesaw" in name or name.startswith("test_fused_mixer") or name.endswith("-fused]"), name
    assert "test_retrieval_every_wgmma_forward[B2N64S512D512-torch.float16-pipelined]" not in skipped
    assert "test_retrieval[B2N64S512D512-torch.bfloat16-wgmma]" not in skipped
    # The default wgmma forward broken: the tests of path wgmma that do not name one skip too.
    skipped = {name for name, reason in collect("wgmma-pipelined").items() if reason != "-"}
    assert {name.split("[")[0] for name in skipped} == {
        "test_retrieval",
        "test_retrieval_rising_max",
        "test_retrieval_backward_on_peaked_rows",
        "test_retrieval_every_wgmma_forward",
        "test_fused_mixer",
        "test_training_step_captures_in_a_cuda_graph",
    }
    assert all("wgmma" in name or "pipelined" in name for name in skipped), skipped


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


def test_every_cuda_test_is_in_the_checks_test_files():
    # The check runs the files in TESTS, not `pytest -m cuda` over the suite: a GPU test in any
    # other file would never run on a GPU. (Generation's GPU tests once sat in test_generation.py.)
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    files = set(shlex.split(re.search(r'^TESTS="([^"]*)"', script, re.M).group(1)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "python_tests",
            "-m",
            "cuda",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    collected = [line.split("::")[0] for line in out.stdout.splitlines() if "::" in line]
    assert len(collected) > 100, out.stdout[-2000:] + out.stderr[-2000:]
    assert sorted(set(collected) - files) == []
