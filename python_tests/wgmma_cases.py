"""The operand layouts of the wgmma self-test kernel (csrc/emu/selftest_kernels.cu), shared by its
emulated test (test_emulator.py) and its GPU test (test_cuda_wgmma.py), which run the same cases;
and the wgmma retrieval forwards by GAM_EXT_WGMMA_FORWARD, shared by test_cuda_emulated.py and
test_cuda.py.
"""

from __future__ import annotations

# Swizzle 128 / 64 / 32 bytes or none (8 x 16-byte core matrices), K-major (0..3) or MN-major (4..7).
LAYOUTS = {"k128": 0, "k64": 1, "k32": 2, "kcore": 3, "mn128": 4, "mn64": 5, "mn32": 6, "mncore": 7}
# The forms of A: in registers, or in shared memory in some of the layouts.
A_FORMS = ["regs", "k128", "mn128", "kcore", "mncore"]


def mode_a(form: str) -> int:
    """The kernel's mode_a for a form of A (-1: registers)."""
    return -1 if form == "regs" else LAYOUTS[form]


# The self-test's (N, layout of B) pairs: N = 32 takes B K-major only (warpgroup_mma.cuh).
N_AND_LAYOUT_B = [
    (n, layout) for n in (32, 64, 128, 256) for layout, code in LAYOUTS.items() if n != 32 or not code & 4
]


# GAM_EXT_WGMMA_FORWARD -> the forward kernel it runs (as backend_info names it).
FORWARD_KERNELS = {
    "pipelined": "retrieval_fwd_wgmma_pipelined_kernel",
    "lockstep": "retrieval_fwd_wgmma_kernel",
    "seesaw": "retrieval_fwd_wgmma_seesaw_kernel",
}
