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
