import os

import pytest
import torch

# The suite must not depend on the thread count of the machine it runs on.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def reference_backend():
    """Run the test with gam_ext forced onto the pure-PyTorch reference, then restore."""
    import gam_ext

    previous = gam_ext.set_backend("reference")
    yield
    gam_ext.set_backend(previous)
