"""The wgmma primitives (csrc/cuda/warpgroup_mma.cuh) on a Hopper GPU: the emulator's wgmma
self-test kernel (csrc/emu/selftest_kernels.cu), built by nvcc for sm_90a with a CUDA binding,
must give the same matrix products as in the emulated tests (python_tests/test_emulator.py), for
every operand layout. That checks on the hardware the PTX ISA layouts which the emulator
implements and the future wgmma kernels rely on. Skipped without an sm_90 GPU; scripts/gpu_check.sh
runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import wgmma_cases

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
        reason="needs an sm_90 GPU (H100 / H200)",
    ),
]


@pytest.fixture(scope="module")
def selftest(tmp_path_factory: pytest.TempPathFactory):
    from torch.utils import cpp_extension

    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"  # wgmma needs the arch-specific target
    try:
        return cpp_extension.load(
            name="gam_wgmma_selftest",
            sources=[
                str(ROOT / "csrc" / "emu" / "selftest_kernels.cu"),
                str(ROOT / "csrc" / "emu" / "selftest_gpu_bindings.cpp"),
            ],
            extra_include_paths=[str(ROOT / "csrc")],
            extra_cflags=["-O2"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
            build_directory=str(tmp_path_factory.mktemp("wgmma_selftest")),
            verbose=False,
        )
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


@pytest.mark.parametrize("n,layout_b", wgmma_cases.N_AND_LAYOUT_B)
@pytest.mark.parametrize("layout_a", wgmma_cases.A_FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_is_a_matrix_product_on_the_gpu(selftest, dtype, n, layout_a, layout_b):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(64, 64, generator=g).to("cuda", dtype)
    b = torch.randn(n, 64, generator=g).to("cuda", dtype)
    d = selftest.wgmma_gemm(a, b, wgmma_cases.mode_a(layout_a), wgmma_cases.LAYOUTS[layout_b])
    torch.cuda.synchronize()
    expected = a.double() @ b.double().t()
    torch.testing.assert_close(d.double(), expected, rtol=1e-4, atol=1e-3)
