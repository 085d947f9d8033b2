import os
import sys
from pathlib import Path

import pytest
import torch

# The emulated CUDA build's driver is a test tool that lives with the emulator sources, outside
# the gam_ext package: the emulated tests import it as `emulation`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "csrc" / "emu"))
# The GPU check's smoke stage, whose names of the kernel paths the skips below use.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

# The suite must not depend on the thread count of the machine it runs on.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def use_backend():
    """gam_ext.set_backend for one test: the backend in force before the test is restored after."""
    import gam_ext

    previous = gam_ext.get_backend()
    yield gam_ext.set_backend
    gam_ext.set_backend(previous)


@pytest.fixture
def restore_environ():
    """os.environ restored after the test to what it was before, for code under test that sets
    variables itself (monkeypatch.delenv of an unset variable would not undo a later set)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def reference_backend():
    """Run the test with gam_ext forced onto the pure-PyTorch reference, then restore."""
    import gam_ext

    previous = gam_ext.set_backend("reference")
    yield
    gam_ext.set_backend(previous)


@pytest.fixture
def isa_build_outputs(tmp_path):
    """Runs a script under each build of the CPU kernels' vectorised loops (GAM_EXT_CPU_ISA =
    auto, the best for this CPU, then avx2 and baseline), each in a fresh process; the script saves
    a list of tensors to the path in sys.argv[1]. Returns the lists, the best build's first (a
    build the CPU lacks runs as the best one it has)."""
    import subprocess

    def run(script: str) -> list[list[torch.Tensor]]:
        results = []
        for isa in ("auto", "avx2", "baseline"):
            env = {**os.environ, "GAM_EXT_CPU_ISA": isa}
            path = tmp_path / f"out-{isa}.pt"
            subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True)
            results.append(torch.load(path))
        return results

    return run


# Tests that run a kernel path their parameters do not name.
PATHS_BY_TEST = {"test_fused_mixer": {"mixer"}, "test_retrieval_smaller_gpu_configurations": {"fused"}}


def kernel_paths_run(item: pytest.Item) -> set[str]:
    """The kernel paths, as scripts/cuda_smoke.py names them, that a CUDA test runs: by its
    parameters `path` (a GAM_EXT_RETRIEVAL value, "wgmma-seesaw" for that forward), `forward`
    (a wgmma forward kernel) and `backend` ("fused": the fused mixer op), and by
    PATHS_BY_TEST."""
    from cuda_smoke import paths_met

    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    path, forward = params.get("path"), params.get("forward")
    retrieval, _, variant = path.partition("-") if isinstance(path, str) else (None, "", "")
    if forward is not None:
        retrieval = "wgmma"
    paths = paths_met(retrieval, forward or variant or None, mixer=params.get("backend") == "fused")
    return paths | PATHS_BY_TEST.get(item.originalname, set())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # scripts/gpu_check.sh's smoke stage names the kernel paths that hung or failed on its GPU in
    # GAM_CHECK_BROKEN: the CUDA tests that would run them are skipped, saying so, since a hung
    # kernel would hold the whole test stage to its time limit and a CUDA error fails every
    # test after it in the process.
    from cuda_smoke import broken_paths

    broken = broken_paths()
    if not broken:
        return
    for item in items:
        hit = sorted(kernel_paths_run(item) & broken)
        if hit and item.get_closest_marker("cuda"):
            found = ", ".join(hit)
            reason = f"GAM_CHECK_BROKEN: the GPU check's smoke stage found {found} hanging or failing"
            item.add_marker(pytest.mark.skip(reason=reason))
