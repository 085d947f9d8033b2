"""The one table of test tolerances against the float64 reference, per dtype (docs/design.md, "Tolerances").

Shared by the CPU kernel tests, the GPU tests and the emulated CUDA kernel tests.
"""

from __future__ import annotations

import torch

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=3e-4, atol=1e-3),
    torch.float16: dict(rtol=3e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=5e-2),
}
