import os
import sys
from pathlib import Path

import pytest
import torch

# The emulated CUDA build's driver is a test tool that lives with the emulator sources, outside
# the gam_ext package: the emulated tests import it as `emulation`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "csrc" / "emu"))

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
