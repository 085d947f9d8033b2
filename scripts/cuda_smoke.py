"""A first run of each CUDA kernel path, each in its own process under a time limit: which paths
hang, fail or compute wrong results on this GPU, found in seconds, before the GPU check spends its
minutes on them.

    python scripts/cuda_smoke.py [--time-limit 60]

Prints a markdown table, one row per path, and last a line `broken: <paths>` (`broken: none`
when none is): the paths that hung or failed (a CUDA error or another exception). scripts/
gpu_check.sh exports that list as GAM_CHECK_BROKEN, and its later stages leave those paths out:
a hung kernel would hold every stage that runs it to that stage's time limit, and a CUDA error
ends the process that meets it, with every test after it. A path that computed wrong results
stays in: the tests then say where. The exit status is 0 when every path passed, else 1.

The paths (GAM_CHECK_BROKEN's words):
  gemm, fused, simt   memory_retrieval forward and backward on that GAM_EXT_RETRIEVAL path
  mixer               the fused mixer op (gam_ext.set_backend("fused")), forward and backward
  wgmma-pipelined, wgmma-lockstep, wgmma-seesaw
                      the sm_90a forward kernel of that GAM_EXT_WGMMA_FORWARD, forward only
  wgmma-backward      the sm_90a backward (its score kernel), on the saved output of the gemm
                      path's forward, so that it is judged apart from the wgmma forwards
Children run side by side; where more than one runs out of time, each of those runs again alone,
so that a hang is not blamed on a path that only waited for the GPU beside it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import torch

# What each child sets before its first call (the extension reads these on every call).
PATH_ENV = {
    "gemm": {"GAM_EXT_RETRIEVAL": "gemm"},
    "fused": {"GAM_EXT_RETRIEVAL": "fused"},
    "simt": {"GAM_EXT_RETRIEVAL": "simt"},
    "mixer": {},
    "wgmma-pipelined": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "pipelined"},
    "wgmma-lockstep": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "lockstep"},
    "wgmma-seesaw": {"GAM_EXT_RETRIEVAL": "wgmma", "GAM_EXT_WGMMA_FORWARD": "seesaw"},
    "wgmma-backward": {"GAM_EXT_RETRIEVAL": "wgmma"},
}


def paths_met(
    retrieval: str | None, forward: str | None = None, *, backward: bool = True, mixer: bool = False
) -> set[str]:
    """The paths above that a run meets: on the GAM_EXT_RETRIEVAL path `retrieval` (None: the
    default one, not checked) with the wgmma forward `forward` (None: GAM_EXT_WGMMA_FORWARD's,
    else the default, pipelined), with its backward or not, with the fused mixer op or not."""
    met = {"mixer"} if mixer else set()
    if retrieval == "wgmma":
        met.add(f"wgmma-{forward or os.environ.get('GAM_EXT_WGMMA_FORWARD') or 'pipelined'}")
        if backward:
            met.add("wgmma-backward")
    elif retrieval:
        met.add(retrieval)
    return met


def broken_paths() -> set[str]:
    """GAM_CHECK_BROKEN: the paths that scripts/gpu_check.sh's run of this script found hanging
    or failing, which its later stages leave out."""
    return set(os.environ.get("GAM_CHECK_BROKEN", "").split())


# (B, N, S, D): partial row and slot tiles, odd and even tile counts, every D the wgmma forwards
# take, and one launch of the benchmarks' size (more blocks than SMs).
SHAPES = [(2, 70, 130, 512), (1, 40, 200, 128), (2, 77, 515, 256), (16, 1024, 512, 512)]
# Largest error allowed, relative to the largest magnitude of the fp64 result: coarse on purpose
# (a misplaced tile or a missing rescale is far off; the tests hold the tolerances).
WRONG_ABOVE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
EXIT_WRONG = 3


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def retrieval_case(h: torch.Tensor, m: torch.Tensor, backward: bool, bwd_env: dict[str, str]) -> float:
    """memory_retrieval (and its backward, under bwd_env) against fp64: the worst relative error."""
    import gam_ext
    from gam_ext import reference

    h = h.detach().requires_grad_(backward)
    m = m.detach().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = gam_ext.memory_retrieval(h, m, 0.9)
    h64 = h.detach().double().requires_grad_(backward)
    m64 = m.detach().double().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        ref = reference.memory_retrieval(h64, m64, 0.9)
    errors = [relative_error(out, ref)]
    if backward:
        grad = torch.randn_like(out)
        os.environ.update(bwd_env)
        out.backward(grad)
        ref.backward(grad.double())
        errors += [relative_error(h.grad, h64.grad), relative_error(m.grad, m64.grad)]
    synchronize(h.device)
    return max(errors)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixer_case(h: torch.Tensor, s: int) -> float:
    import gam_ext
    from gam_ext import reference

    d, k = h.shape[-1], 3
    params = [
        torch.randn(d, 1, k, device=h.device) * 0.5,
        torch.randn(d, device=h.device),
        torch.randn(s, d, device=h.device) * d**-0.25,
        torch.randn(2 * d, d, device=h.device) * d**-0.5,
        torch.randn(2 * d, device=h.device),
    ]
    leaves = [t.detach().requires_grad_() for t in (h, *params)]
    gam_ext.set_backend("fused")
    out = gam_ext.gam_mixer(*leaves, 0.9)
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, *params)]
    ref = reference.gam_mixer(*ref_leaves, 0.9)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    synchronize(h.device)
    errors = [relative_error(out, ref)]
    errors += [relative_error(a.grad, b.grad) for a, b in zip(leaves, ref_leaves, strict=True)]
    return max(errors)


def child(path: str, device: str = "cuda", shapes: list[tuple[int, int, int, int]] = SHAPES) -> int:
    """One path's cases, each announced before it runs and reported after it, so that the parent
    can tell where a path hung. (device and shapes: for the test of this script without a GPU.)"""
    import gam_ext

    os.environ.update(PATH_ENV[path])
    torch.manual_seed(0)
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if path in ("gemm", "fused", "simt") else ())
    if path.startswith("wgmma") and device == "cuda":
        info = gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))["retrieval"]["cuda"]
        if info["path"] != "wgmma":
            print(f"note: no wgmma kernels on this device or build, the {info['path']} path ran", flush=True)
    worst = 0.0
    for dtype in dtypes:
        for b, n, s, d in shapes:
            label = f"{str(dtype).removeprefix('torch.')} B={b} N={n} S={s} D={d}"
            print(f"case {label}", flush=True)
            h = torch.randn(b, n, d, device=device, dtype=dtype)
            m = (torch.randn(s, d, device=device) * d**-0.25).to(dtype)
            if path == "mixer":
                err = mixer_case(h, s)
            elif path == "wgmma-backward":
                # The gemm path's forward, then the wgmma backward on what it saved.
                os.environ["GAM_EXT_RETRIEVAL"] = "gemm"
                err = retrieval_case(h, m, True, {"GAM_EXT_RETRIEVAL": "wgmma"})
            else:
                err = retrieval_case(h, m, not path.startswith("wgmma-"), {})
            worst = max(worst, err)
            print(f"done {label} {err:.2e}", flush=True)
            if err > WRONG_ABOVE[dtype]:
                print(f"wrong {label}: {err:.2e} of the largest magnitude", flush=True)
                return EXIT_WRONG
    print(f"worst {worst:.2e}", flush=True)
    return 0


# Variables that pick kernels: a child starts without them and sets its own.
KERNEL_VARIABLES = ("GAM_EXT_BACKEND", "GAM_EXT_RETRIEVAL", "GAM_EXT_WGMMA_FORWARD")


def start(path: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_all(procs: dict[str, subprocess.Popen], seconds: float) -> dict[str, tuple[int | None, str, str]]:
    """(exit status, stdout, stderr) per path; None for a child that ran out of time (killed)."""
    deadline = time.monotonic() + seconds
    results = {}
    for path, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results[path] = (proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results[path] = (None, out, err)
    return results


def verdict(rc: int | None, out: str, err: str, seconds: float) -> tuple[str, str]:
    """(result, detail) of one child."""
    lines = out.splitlines()
    notes = "; ".join(line.removeprefix("note: ") for line in lines if line.startswith("note: "))
    if rc is None:
        started = [line.removeprefix("case ") for line in lines if line.startswith("case ")]
        done = {line.split(" ", 1)[1].rsplit(" ", 1)[0] for line in lines if line.startswith("done ")}
        where = next((c for c in reversed(started) if c not in done), None)
        return "HANG", f"no exit in {seconds:.0f} s, " + (f"in {where}" if where else "before its first case")
    if rc == 0:
        worst = next((line.split()[1] for line in lines if line.startswith("worst ")), "?")
        return "ok", f"largest error {worst} of the largest magnitude" + (f"; {notes}" if notes else "")
    if rc == EXIT_WRONG:
        return "WRONG", next(line.removeprefix("wrong ") for line in lines if line.startswith("wrong "))
    tail = " / ".join(line.strip() for line in err.strip().splitlines()[-2:]) or "no output"
    return "FAILED", f"exit {rc}: {tail}"


def run(paths: list[str], time_limit: float, launch: Callable[[str], subprocess.Popen] = start) -> int:
    """Every path at once within time_limit; then those that timed out together, each alone
    within half of it, all of them within another time_limit (so at most twice time_limit)."""
    begin = time.monotonic()
    live: list[subprocess.Popen] = []

    def launch_tracked(path: str) -> subprocess.Popen:
        live.append(launch(path))
        return live[-1]

    def stop(signum: int, frame: object) -> None:
        # Killed from outside (gpu_check.sh's time limit): no child may keep a kernel running
        # beside the stages that follow.
        for proc in live:
            proc.kill()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        results = wait_all({p: launch_tracked(p) for p in paths}, time_limit)
        limits = dict.fromkeys(paths, time_limit)
        timed_out = [p for p, (rc, _, _) in results.items() if rc is None]
        if len(timed_out) > 1:
            deadline = time.monotonic() + time_limit
            for path in timed_out:
                left = min(time_limit / 2, deadline - time.monotonic())
                if left < 1:
                    break
                limits[path] = left
                results[path] = wait_all({path: launch_tracked(path)}, left)[path]
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("| path | result | detail |")
    print("|---|---|---|")
    verdicts = {}
    for path in paths:
        result, detail = verdict(*results[path], limits[path])
        verdicts[path] = result
        again = " (run again alone)" if limits[path] < time_limit else ""
        print(f"| {path} | {result} | {detail}{again} |")
    print(f"\n{len(paths)} paths in {time.monotonic() - begin:.0f} s")
    broken = [path for path, result in verdicts.items() if result in ("HANG", "FAILED")]
    if broken and len(broken) == len(paths):
        # No path finished: that points at this script, the build or the machine (say, a slow
        # first import of torch), not at one kernel, and leaving every path out would leave the
        # GPU check nothing to measure.
        print("every path failed or ran out of time: nothing is left out of the later stages")
        broken = []
    print(f"broken: {' '.join(broken) or 'none'}")
    return 0 if set(verdicts.values()) == {"ok"} else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds for all paths at once")
    parser.add_argument("--paths", nargs="+", choices=list(PATH_ENV), default=list(PATH_ENV))
    parser.add_argument("--child", choices=list(PATH_ENV), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    return run(args.paths, args.time_limit)


if __name__ == "__main__":
    sys.exit(main())
