"""The resource report (benchmarks/kernel_resources.py) where nvcc exists: no retrieval kernel
spills on sm_80 / sm_90 / sm_90a / sm_100; on sm_90 every retrieval kernel uses at most 168
registers (the mma.sync and SIMT kernels: the wgmma kernels are sm_90a's, where their
accumulators take more, by design), the fp16 and bf16 launches at the report shape (B*N = 65536,
S = D = 512) run tensor-core kernels whose SASS holds HMMA and LDSM (when a cuobjdump is found),
none of them falls back to SIMT, and the wgmma kernels hold HGMMA on sm_90a.

The compile takes a minute or two on a cold cache (build/kernel_resources/, keyed by the sources).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "kernel_resources", ROOT / "benchmarks" / "kernel_resources.py"
)
kernel_resources = importlib.util.module_from_spec(_spec)
sys.modules["kernel_resources"] = kernel_resources  # dataclasses look their module up
_spec.loader.exec_module(kernel_resources)

pytestmark = pytest.mark.skipif(kernel_resources.find_nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def report() -> dict:
    return kernel_resources.collect(kernel_resources.DEFAULT_ARCHS, (16 * 4096, 512, 512))


def retrieval(kernels: list[dict]) -> list[dict]:
    return [k for k in kernels if "retrieval" in k["name"]]


def test_no_retrieval_kernel_spills(report: dict) -> None:
    found = retrieval(report["kernels"])
    assert {k["arch"] for k in found} == {"80", "90", "90a", "100"}
    spilling = [(k["arch"], k["name"], k["spill_stores"], k["spill_loads"]) for k in found
                if k["spill_stores"] or k["spill_loads"]]  # fmt: skip
    assert not spilling, spilling


def test_sm90_retrieval_kernels_fit_168_registers(report: dict) -> None:
    heavy = [(k["name"], k["registers"]) for k in retrieval(report["kernels"])
             if k["arch"] == "90" and k["registers"] > 168]  # fmt: skip
    assert not heavy, heavy


def test_sm90_half_launches_are_tensor_core_kernels(report: dict) -> None:
    launches = report["launches"]
    assert isinstance(launches, list), launches
    half = [x for x in launches if x["arch"] == "90" and x["dtype"] in ("float16", "bfloat16")]
    assert {x["op"] for x in half} == {"fwd", "bwd"}
    for x in half:
        assert "simt" not in x["kernel"], x
        assert x["registers"] is not None and x["registers"] <= 168, x
        assert x["ctas_per_sm"] and x["ctas_per_sm"] >= 1, x
    products = [x for x in half if "mma" in x["kernel"]]
    assert {x["op"] for x in products} == {"fwd", "bwd"}, [x["kernel"] for x in half]
    if report["cuobjdump"]:
        for x in products:
            assert x["sass"]["hmma"] > 0 and x["sass"]["ldsm"] > 0, x


def test_wgmma_kernels_hold_hgmma_on_sm90a_only(report: dict) -> None:
    if not report["cuobjdump"]:
        pytest.skip("no cuobjdump")
    wgmma = [k for k in report["kernels"] if "wgmma_kernel" in k["name"] and "probe" not in k["name"]]
    assert {k["arch"] for k in wgmma} == {"80", "90", "90a", "100"}
    for k in wgmma:
        assert (k["sass"]["hgmma"] > 0) == (k["arch"] == "90a"), (k["arch"], k["name"], k["sass"])


def test_markdown_report(report: dict) -> None:
    text = kernel_resources.markdown(report)
    assert "| sm_90 | fwd | bfloat16 |" in text
    assert "retrieval_fwd_mma_kernel" in text
    assert "| sm_90a | memory_retrieval_bwd_wgmma.cu | `retrieval_bwd_scores_wgmma_kernel" in text


def compile_sm90a(src: Path, obj: Path) -> tuple[str, str]:
    """nvcc of src for sm_90a and plain sm_90 (the project's flags): (ptxas -v report, SASS)."""
    nvcc = kernel_resources.find_nvcc()
    cuobjdump = kernel_resources.find_cuobjdump(nvcc)
    if cuobjdump is None:
        pytest.skip("no cuobjdump")
    archs = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=sm_90"]
    flags = [*kernel_resources.NVCC_FLAGS, *archs, "-Xptxas", "-v", "-I", str(ROOT / "csrc")]
    proc = kernel_resources.run([nvcc, "-c", *flags, str(src), "-o", str(obj)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr, kernel_resources.run([cuobjdump, "-sass", str(obj)]).stdout


def opcodes(sass: str, kernel: str, prefix: str) -> dict[tuple[str, str], list[str]]:
    """(arch, function) -> the opcodes that start with prefix (e.g. "STG", with their modifiers:
    "STG.E.128"), in order, of each function named kernel; predicates are dropped."""
    found: dict[tuple[str, str], list[str]] = {}
    arch = func = None
    for line in sass.splitlines():
        if m := re.search(r"code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(rf"Function : (\S*{kernel}\S*)", line):
            func = m.group(1)
            found[(arch, func)] = []
        elif "Function : " in line:
            func = None
        elif func and (m := re.search(rf"\*/\s+(?:@!?U?P\w+\s+)?({prefix}[\w.]*)", line)):
            found[(arch, func)].append(m.group(1))
    return found


def hgmma_shapes(sass: str, kernel: str) -> dict[tuple[str, str], list[str]]:
    """(arch, function) -> the HGMMA shapes (64xNx16, in order) of each function named kernel."""
    return {
        key: [re.search(r"HGMMA\.(64x\d+x16)\.F32", op).group(1) for op in ops]
        for key, ops in opcodes(sass, kernel, "HGMMA").items()
    }


def test_wgmma_primitives_compile_to_hgmma_on_sm90a(tmp_path: Path) -> None:
    """csrc/cuda/warpgroup_mma.cuh under nvcc: the emulator's wgmma self-test kernels, built for
    sm_90a, hold HGMMA of their shape (ptxas accepts the inline PTX of every variant: f16 and
    bf16, N = 32, 64, 128 and 256, A from shared memory or registers, K- or MN-major, B K-major
    at N = 32); built for plain sm_90 they compile to a trap, with no HGMMA."""
    _, sass = compile_sm90a(ROOT / "csrc" / "emu" / "selftest_kernels.cu", tmp_path / "selftest.o")
    hgmma = hgmma_shapes(sass, "wgmma_gemm_kernel")
    kernels = {f for _, f in hgmma}
    # 2 dtypes x (3 N x 6 operand forms + N = 32 x 3 forms of A with B K-major)
    assert len(kernels) == 42, sorted(kernels)
    for func in kernels:
        n = re.search(r"Li(\d+)E", func).group(1)
        assert set(hgmma[("sm_90a", func)]) == {f"64x{n}x16"}, func
        assert hgmma[("sm_90", func)] == [], func


def compile_wgmma_sm90a(src: Path, obj: Path) -> str:
    """compile_sm90a of a wgmma kernel file, held to what every wgmma kernel must show: no wgmma
    serialised by ptxas (it injects warpgroup.arrive / wait, and says so, where it cannot prove
    that the registers of a product in flight are left alone), no spills, and at most 224
    registers (one block of 256 threads per SM, bound by shared memory, which could hold 255).
    Returns the SASS."""
    report, sass = compile_sm90a(src, obj)
    assert "is injected" not in report and "serialized" not in report, report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(a == "0" and b == "0" for a, b in spills), spills
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert registers and max(registers) <= 224, registers
    return sass


def test_wgmma_retrieval_forwards_on_sm90a(tmp_path: Path) -> None:
    """The wgmma retrieval forwards (memory_retrieval_fwd_wgmma.cu) for sm_90a, D = 128, 256 and
    512, as compile_wgmma_sm90a holds them, and their HGMMA sequences. The lockstep kernel: per M
    tile D / 32 HGMMA.64x64x16 (the scores) then 4 HGMMA.64x(D/2)x16 (P M). The pipelined one:
    the first tile's D / 32 HGMMA.64x32x16, the loop's D / 32 for the next tile followed at once
    by 2 HGMMA.64x(D/2)x16 (P M) with a partial wait after them (DEPBAR.LE 1: the scores only),
    then the last tile's 2. The seesaw one, in each warpgroup's branch of its loop over pairs of
    tiles: D / 16 HGMMA.64x64x16 (its tile's scores over all of D), then 4 + 4 HGMMA.64x(D/2)x16
    (P M of both tiles). For plain sm_90 all three are a trap."""
    sass = compile_wgmma_sm90a(ROOT / "csrc" / "cuda" / "memory_retrieval_fwd_wgmma.cu", tmp_path / "fwd.o")
    # The SASS of each, by D: the lockstep kernel's one loop; the pipelined one's first scores,
    # loop (next scores, P M) and last P M; the seesaw one's two branches.
    expected_by_kernel = {
        "retrieval_fwd_wgmma_kernel": lambda d: ["64x64x16"] * (d // 32) + [f"64x{d // 2}x16"] * 4,
        "retrieval_fwd_wgmma_pipelined_kernel": lambda d: (
            ["64x32x16"] * (2 * d // 32) + [f"64x{d // 2}x16"] * 4
        ),
        "retrieval_fwd_wgmma_seesaw_kernel": lambda d: (
            (["64x64x16"] * (d // 16) + [f"64x{d // 2}x16"] * 8) * 2
        ),
    }
    for kernel, expected in expected_by_kernel.items():
        hgmma = hgmma_shapes(sass, kernel)
        assert len({f for _, f in hgmma}) == 6, hgmma.keys()  # __half and __nv_bfloat16 x 3 D
        for (arch, func), shapes in hgmma.items():
            d = int(re.search(r"Li(\d+)E", func).group(1))
            assert shapes == ([] if arch == "sm_90" else expected(d)), func
    pipelined = sass.split("retrieval_fwd_wgmma_pipelined_kernel")
    assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in part for part in pipelined[1:]), "no partial wait"


def test_wgmma_retrieval_backward_on_sm90a(tmp_path: Path) -> None:
    """The wgmma backward's score kernel (memory_retrieval_bwd_wgmma.cu) for sm_90a, as
    compile_wgmma_sm90a holds it (the 64 + 64 accumulators within the 224 registers): per chunk
    of M 8 HGMMA.64x128x16 (4 for the scores, 4 for dP, interleaved), and only 16-byte global
    stores; for plain sm_90 a trap."""
    sass = compile_wgmma_sm90a(ROOT / "csrc" / "cuda" / "memory_retrieval_bwd_wgmma.cu", tmp_path / "bwd.o")
    hgmma = hgmma_shapes(sass, "retrieval_bwd_scores_wgmma_kernel")
    assert len({f for _, f in hgmma}) == 2, hgmma.keys()  # __half and __nv_bfloat16
    for (arch, func), shapes in hgmma.items():
        assert shapes == ([] if arch == "sm_90" else ["64x128x16"] * 8), func
    # P and dS leave in 16-byte stores (quad_transpose), and so does the delta correction: the
    # 4-byte pairs it stored before kept the H200's L2 busier than the tensor cores.
    for (arch, func), stores in opcodes(sass, "retrieval_bwd_scores_wgmma_kernel", "STG").items():
        if arch == "sm_90a":
            assert stores and set(stores) == {"STG.E.128"}, (func, sorted(set(stores)))
