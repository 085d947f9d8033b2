"""Self-tests of the SIMT emulation layer (csrc/emu) that runs CUDA kernel sources on the CPU.

The kernels are csrc/emu/selftest_kernels.cu, written against the kernel contract of
csrc/cuda/compat.cuh. Run with `bash python_tests/run_emulated.sh` (ASan preloaded); in a plain
pytest process these tests skip. Planted memory errors run in child processes, so the
AddressSanitizer abort they cause cannot take this process down, and every child has a timeout,
so an emulator hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import emulation as emu  # csrc/emu/emulation.py (conftest.py puts csrc/emu on sys.path)
import pytest
import torch
import wgmma_cases

pytestmark = pytest.mark.emulated

ROOT = Path(__file__).resolve().parent.parent
EMULATION_PY = ROOT / "csrc" / "emu" / "emulation.py"
CHILD_TIMEOUT_S = 600  # generous: a child may have to build the module on a cold cache


@pytest.fixture(scope="module")
def st() -> types.ModuleType:
    reason = emu.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return emu.load_selftest_module()


def _child_env() -> dict[str, str]:
    return emu.asan_subprocess_env() if emu.asan_requested() else dict(os.environ)


def _run_child(body: str) -> subprocess.CompletedProcess[str]:
    """Runs `body` in a fresh Python with `mod` = the self-test module already loaded."""
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('gam_emulation_child', sys.argv[1])\n"
        "emu = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(emu)\n"
        "mod = emu.load_selftest_module()\n"
        "import torch\n" + body
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(EMULATION_PY)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=_child_env(),
        cwd=ROOT,
    )


# ---- features -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [64, 128, 1024])
def test_block_reduction_through_shared_memory(st: types.ModuleType, block: int) -> None:
    x = torch.randn(1000)
    out = st.block_reduce(x, block)
    padded = torch.cat([x, x.new_zeros(-x.numel() % block)])
    torch.testing.assert_close(out, padded.view(-1, block).sum(1), rtol=1e-5, atol=1e-4)


def test_warp_shuffle_reductions_xor_and_down(st: types.ModuleType) -> None:
    x = torch.randn(200)
    out_xor, out_down = st.warp_reduce(x)
    padded = torch.cat([x, x.new_zeros(out_xor.numel() * 32 - x.numel())])
    expected = padded.view(-1, 32).sum(1)
    torch.testing.assert_close(out_xor, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out_down, expected, rtol=1e-5, atol=1e-4)


def test_warp_scan_with_shfl_up(st: types.ModuleType) -> None:
    x = torch.randn(300)
    out = st.warp_scan(x)
    padded = torch.cat([x, x.new_zeros(-x.numel() % 32)])
    expected = padded.view(-1, 32).cumsum(1).flatten()[: x.numel()]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_shuffles_of_int_unsigned_double_half_bf16(st: types.ModuleType) -> None:
    x = torch.arange(32, dtype=torch.float32) * 0.5 - 3.0  # exact in half and bf16
    out = st.shfl_types(x)
    lanes = torch.arange(32)
    assert torch.equal(out[0], torch.full((32,), float(int(x[3].item()))))
    assert torch.equal(out[1], (lanes ^ 5).float())
    assert torch.equal(out[2], x[lanes ^ 1])
    assert torch.equal(out[3], torch.cat([x[1:], x[31:]]))  # lane 31 keeps its own value
    assert torch.equal(out[4], torch.cat([x[:2], x[:-2]]))  # lanes 0, 1 keep theirs


def test_quad_transpose_swaps_lanes_and_words(st: types.ModuleType) -> None:
    # Lane l of quad Q ends with word l % 4 of each lane of Q: the wgmma backward's 16-byte
    # stores of P and dS rest on it (one lane per group of 8 slots after it).
    words = torch.arange(128, dtype=torch.int32).view(32, 4) * 7 + 3
    out = st.quad_transpose(words)
    lane = torch.arange(32).view(32, 1)
    k = torch.arange(4).view(1, 4)
    assert torch.equal(out, words[(lane // 4) * 4 + k, lane % 4])


def test_ballot_any_all(st: types.ModuleType) -> None:
    x = torch.cat([torch.ones(32), -torch.ones(32), torch.tensor([1.0, -1.0] * 16), torch.zeros(32)])
    x[96 + 5] = 2.0  # one positive lane in the last warp
    ballot, any_, all_ = st.warp_vote(x)
    bits = [sum(1 << i for i in range(32) if x[32 * w + i] > 0) for w in range(4)]
    assert [b & 0xFFFFFFFF for b in ballot.tolist()] == bits
    assert any_.tolist() == [1, 0, 1, 1]
    assert all_.tolist() == [1, 0, 0, 0]


def test_halo_exchange_between_neighbours(st: types.ModuleType) -> None:
    x = torch.randn(1000)  # 8 blocks of 128, the last one partial
    y = st.halo_stencil(x)
    padded = torch.nn.functional.pad(x, (1, 1))
    torch.testing.assert_close(y, padded[:-2] + padded[1:-1] + padded[2:], rtol=1e-5, atol=1e-5)


def test_float_atomic_add_from_many_blocks(st: types.ModuleType) -> None:
    x = torch.randint(-5, 6, (5000,)).float()  # integers: the sum is exact in any order
    out = st.atomic_sum(x)  # the launcher zeroes `out` with cudaMemsetAsync first
    assert out.item() == x.sum().item()


def test_dynamic_shared_memory(st: types.ModuleType) -> None:
    x = torch.arange(300, dtype=torch.float32)
    y = st.dynamic_reverse(x, 64)
    expected = torch.cat([chunk.flip(0) for chunk in x.split(64)])
    assert torch.equal(y, expected)


def test_block_size_not_a_multiple_of_32(st: types.ModuleType) -> None:
    block, n = 50, 130  # two warps per block, the second with 18 lanes
    x = torch.randn(n)
    y, ballots = st.odd_block(x, block)
    padded = torch.cat([x, x.new_zeros(-n % block)])
    block_sums = padded.view(-1, block).sum(1).repeat_interleave(block)[:n]
    torch.testing.assert_close(y, 2 * x + block_sums, rtol=1e-5, atol=1e-4)
    assert ballots.tolist() == [0xFFFFFFFF, (1 << 18) - 1] * 3


# ---- warp-level matrix primitives (csrc/cuda/warp_mma.cuh) --------------------------------


@pytest.mark.parametrize(("dtype", "k"), [(torch.float16, 16), (torch.bfloat16, 16), (torch.float16, 8)])
def test_mma_fragments_are_the_ptx_layouts(st: types.ModuleType, dtype: torch.dtype, k: int) -> None:
    # The kernel places A, B and C in registers by the PTX ISA's formulas for mma.m16n8k16 /
    # m16n8k8 and reads D back the same way: the product must be a b + c.
    a = torch.randn(16, k).to(dtype)
    b = torch.randn(k, 8).to(dtype)
    c = torch.randn(16, 8)
    d = st.mma_fragments(a, b, c)
    expected = a.double() @ b.double() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_misplaced_fragment_register_gives_a_wrong_product(
    st: types.ModuleType, dtype: torch.dtype
) -> None:
    # Lanes hold their own registers (not whole tiles): swapping two A registers of one lane
    # must change rows of the product, as on the GPU.
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.zeros(16, 8)
    good = st.mma_fragments(a, b, c)
    bad = st.mma_fragments(a, b, c, misplace=True)
    expected = (a.double() @ b.double()).float()
    torch.testing.assert_close(good, expected, rtol=1e-6, atol=1e-5)
    wrong_rows = (bad - expected).abs().amax(1) > 1e-3
    assert wrong_rows[0] and wrong_rows[8] and not wrong_rows[1:8].any() and not wrong_rows[9:].any()


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_fragments_bitwise(st: types.ModuleType, num: int, trans: bool) -> None:
    # PTX ldmatrix .m8n8 .b16: register j of lane l is the l-th 32-bit word of matrix j in row
    # major order (two consecutive 16-bit elements), of its transpose with .trans.
    src = torch.randint(-(2**15), 2**15, (num, 8, 8), dtype=torch.int16)
    out = st.ldmatrix_fragments(src, trans)
    mats = src.transpose(1, 2) if trans else src
    expected = mats.contiguous().view(torch.int32).view(num, 32).t()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("b_mode", [0, 1, 2, 3], ids=["col-x2", "row-x2trans", "col-2x1", "row-2x1trans"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ldmatrix_then_mma_is_a_matrix_product(st: types.ModuleType, dtype: torch.dtype, b_mode: int) -> None:
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    storage = b.t().contiguous() if b_mode % 2 == 0 else b  # n-major ("col") or k-major
    d = st.ldmatrix_mma(a, storage, b_mode)
    torch.testing.assert_close(d.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize(("dtype", "k"), [(torch.float16, 8), (torch.bfloat16, 40), (torch.float16, 136)])
def test_cp_async_pipeline_gemm(st: types.ModuleType, dtype: torch.dtype, k: int, stages: int) -> None:
    # 1- to 3-stage cp.async pipelines (zero-filled k tail) feeding ldmatrix + mma: a read of a
    # stage that was not waited for, or refilled too early, would show up as NaN.
    a = torch.randn(32, k).to(dtype)
    b = torch.randn(16, k).to(dtype)
    c = st.cp_async_gemm(a, b, stages)
    torch.testing.assert_close(c.double(), a.double() @ b.double().t(), rtol=1e-5, atol=1e-4)


# ---- warpgroup-level matrix primitives (csrc/cuda/warpgroup_mma.cuh) ------------------------


@pytest.mark.parametrize("n,layout_b", wgmma_cases.N_AND_LAYOUT_B)
@pytest.mark.parametrize("layout_a", wgmma_cases.A_FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_is_a_matrix_product(
    st: types.ModuleType, dtype: torch.dtype, n: int, layout_a: str, layout_b: str
) -> None:
    # One warpgroup, d = a b^T over k = 64 (four m64nNk16 products chained on one accumulator):
    # operands placed in shared memory by their layout's element addresses, decoded by the
    # emulator from the descriptors by the PTX ISA's canonical layouts; D read back by the
    # accumulator layout.
    a = torch.randn(64, 64).to(dtype)
    b = torch.randn(n, 64).to(dtype)
    d = st.wgmma_gemm(a, b, wgmma_cases.mode_a(layout_a), wgmma_cases.LAYOUTS[layout_b])
    torch.testing.assert_close(d.double(), a.double() @ b.double().t(), rtol=1e-5, atol=1e-4)


def _descriptor(lbo: int, sbo: int, swizzle: int, start: int = 0) -> int:
    # The start address, byte offsets >> 4, the swizzle code (0 none, 1 128B, 2 64B, 3 32B); as
    # the signed 64-bit value the binding takes.
    desc = start >> 4 | (lbo >> 4) << 16 | (sbo >> 4) << 32 | swizzle << 62
    return desc - (1 << 64) if desc >= 1 << 63 else desc


def _layout(shape: tuple, stride: tuple, index: tuple) -> int:
    # A CuTe layout's offset for a flat index per mode: ((s0, s1, ..), ..) : ((d0, d1, ..), ..).
    offset = 0
    for sizes, strides, i in zip(shape, stride, index, strict=True):
        for size, step in zip(sizes, strides, strict=True):
            offset += (i % size) * step
            i //= size
    return offset


def _swizzle(address: int, bits: int) -> int:
    # CuTe's Swizzle<bits, 4, 3> on a byte address.
    return address ^ (((address >> 7) & ((1 << bits) - 1)) << 4)


@pytest.mark.parametrize(
    ("name", "mn_major", "swizzle", "lbo", "sbo", "shape", "stride", "bits", "rows", "start"),
    [
        # The PTX ISA's worked examples ("Canonical Layouts", bf16; strides in elements).
        ("MN none", True, 0, 256, 128, ((8, 1, 2), (8, 2)), ((1, 8, 64), (8, 128)), 0, 16, 0),
        ("MN 32B", True, 3, 256, 512, ((8, 2, 2), (8, 2)), ((1, 8, 128), (16, 256)), 1, 16, 0),
        ("MN 64B", True, 2, 512, 1024, ((8, 4, 2), (8, 2)), ((1, 8, 256), (32, 512)), 2, 16, 0),
        # K-major, from the canonical forms with bf16 (T = 8) and 16 rows.
        ("K none", False, 0, 256, 128, ((8, 2), (8, 2)), ((8, 64), (1, 128)), 0, 16, 0),
        ("K 32B", False, 3, 16, 256, ((8, 2), (8, 2)), ((16, 128), (1, 8)), 1, 16, 0),
        ("K 128B", False, 1, 16, 1024, ((8, 2), (8, 2)), ((64, 512), (1, 8)), 3, 16, 0),
        # The two forms the wgmma retrieval kernels use, for which the PTX ISA has no worked
        # example: CuTe's 128-byte-swizzle atoms (Layout_K_SW128_Atom, Layout_MN_SW128_Atom for
        # 16-bit types) tiled as the kernels tile them, with the LBO / SBO that CuTe's
        # make_gmma_desc gives for those tiles (checked against CuTe itself when the kernels were
        # written). K-major: 64 rows of 128 bytes, the third k16 step of the atom (start + 64 B).
        ("K 128B k-step 2", False, 1, 16, 1024, ((8, 8), (8, 2)), ((64, 512), (1, 8)), 3, 64, 64),
        # MN-major: N = 256 over four 64-column panels LBO = 8 KB apart, 16 k rows of 128 bytes.
        ("MN 128B N=256", True, 1, 8192, 1024, ((64, 4), (8, 2)), ((1, 4096), (64, 512)), 3, 256, 0),
    ],
)
def test_wgmma_descriptor_decoding_matches_the_canonical_layouts(
    st: types.ModuleType,
    name: str,
    mn_major: bool,
    swizzle: int,
    lbo: int,
    sbo: int,
    shape,
    stride,
    bits: int,
    rows: int,
    start: int,
) -> None:
    # The emulator's element addresses against the canonical layouts (CuTe notation), written out
    # independently here: element (i, k) of a bf16 operand of `rows` rows (or columns), the
    # swizzle applied to the whole address as the hardware does (the atoms are 1024-byte aligned).
    got = st.wgmma_element_addresses(_descriptor(lbo, sbo, swizzle, start), mn_major, rows)
    for i in range(rows):
        for k in range(16):
            element = _layout(shape, stride, (i, k))
            assert got[i, k].item() == _swizzle(start + 2 * element, bits), (name, i, k)


# ---- the emulator's layouts against CUTLASS's CuTe ---------------------------------------------
# The emulator and the kernels are written by the same hands: both could misread the PTX ISA the
# same way, and the emulated kernel tests would still pass. CuTe's layouts, from the headers of
# the nvidia-cutlass wheel (`make` installs it into .venv), are an independent reading, proven on
# the hardware. python_tests/cute_layouts.cu prints them; the emulated kernel tests then hold the
# kernels to the emulator.


def _cute_include() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").is_file() else None


@pytest.fixture(scope="module")
def cute(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{"maps": {name: (threads, elements, 2) tensor}, "descs": [record, ...]} from CuTe."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_resources

    nvcc = kernel_resources.find_nvcc()
    include = _cute_include()
    if nvcc is None or include is None:
        pytest.skip("needs nvcc and CuTe's headers (pip install --no-deps nvidia-cutlass)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, env=env).stdout
    release = re.search(r"release (\d+)\.", version)
    if release is None or int(release.group(1)) < 12:
        pytest.skip(f"CuTe 4.2 needs nvcc 12 or newer; {nvcc} says {version.strip()[-60:]!r}")
    exe = tmp_path_factory.mktemp("cute") / "cute_layouts"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-I", str(include), str(ROOT / "python_tests" / "cute_layouts.cu"),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    maps, descs = {}, []
    for line in run.stdout.splitlines():
        if not line.startswith(("map ", "desc ")):
            continue  # CuTe prints notes of its own between the records
        kind, name, *fields = line.split(" ")
        if kind == "map":
            threads, elements, *pairs = map(int, fields)
            maps[name] = torch.tensor(pairs).view(threads, elements, 2)
        elif kind == "desc":
            mn_major, rows, start, lbo, sbo, layout, base, *addresses = map(int, fields)
            descs.append(
                dict(name=name, mn_major=bool(mn_major), rows=rows, start=start, lbo=lbo, sbo=sbo,
                     layout=layout, base=base, addresses=torch.tensor(addresses).view(rows, 16))
            )  # fmt: skip
    return {"maps": maps, "descs": descs}


def test_fragment_layouts_match_cute(st: types.ModuleType, cute: dict) -> None:
    # Which (row, column) each register element of each thread holds: mma.sync m16n8k16's A, B
    # and C, wgmma's A registers and its accumulators at N = 64, 128 and 256.
    ours = st.fragment_maps()
    assert sorted(cute["maps"]) == sorted(ours)
    for name, theirs in cute["maps"].items():
        assert torch.equal(ours[name], theirs), name


def test_wgmma_descriptor_decoding_matches_cute(st: types.ModuleType, cute: dict) -> None:
    # The 128-byte-swizzled tiles the retrieval kernels use (K-major: h, M tiles and chunks at
    # every k16 step; MN-major: M read as B of P M at D = 128, 256 and 512, each half of D):
    # CuTe's make_gmma_desc for each, decoded by the emulator, must address every element where
    # CuTe puts it.
    assert len(cute["descs"]) == 34
    for d in cute["descs"]:
        assert (d["layout"], d["base"]) == (1, 0), d["name"]  # 128-byte swizzle, aligned atoms
        desc = _descriptor(d["lbo"], d["sbo"], 1, d["start"])
        got = st.wgmma_element_addresses(desc, d["mn_major"], d["rows"])
        assert torch.equal(got, d["addresses"]), d["name"]


def test_wgmma_accumulators_are_nan_until_the_wait(st: types.ModuleType) -> None:
    # wgmma is asynchronous: its accumulators are undefined until wgmma.wait_group, and the
    # emulator makes them NaN, so a kernel that reads them early fails its tests.
    a = torch.randn(64, 64).to(torch.bfloat16)
    b = torch.randn(64, 64).to(torch.bfloat16)
    assert st.wgmma_gemm(a, b, 0, 0, misuse=1).isnan().all()


def test_wgmma_reads_its_operands_at_the_wait(st: types.ModuleType) -> None:
    # Shared-memory operands must stay as they are until wgmma.wait_group: the emulator reads them
    # there, so B zeroed after the commit and before the wait gives a zero product.
    a = torch.randn(64, 64).to(torch.bfloat16)
    b = torch.randn(64, 64).to(torch.bfloat16)
    assert torch.equal(st.wgmma_gemm(a, b, 0, 0, misuse=2), torch.zeros(64, 64))


def test_wgmma_layouts_differ(st: types.ModuleType) -> None:
    # The descriptors matter: operands stored in one layout and described as another give a wrong
    # product (here: B stored 128-byte swizzled, described without the swizzle).
    a = torch.randn(64, 64).to(torch.float16)
    b = torch.randn(64, 64).to(torch.float16)
    good = st.wgmma_gemm(a, b, 0, 0)
    wrong = st.wgmma_gemm(a, b, 0, 8)
    expected = a.double() @ b.double().t()
    torch.testing.assert_close(good.double(), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(wrong.double(), expected, rtol=1e-2, atol=1e-2)


def test_named_barriers_synchronise_groups_of_warps(st: types.ModuleType) -> None:
    x = torch.randn(3 * 128)
    y = st.named_barrier_groups(x)
    assert torch.equal(y, x.view(-1, 64).roll(-1, dims=1).flatten())


def test_syncwarp_orders_shared_memory_within_a_warp(st: types.ModuleType) -> None:
    x = torch.randn(3 * 64)
    y = st.syncwarp_exchange(x)
    assert torch.equal(y, x.view(-1, 32).roll(-1, dims=1).flatten())


def test_cp_async_read_before_it_lands_is_nan(st: types.ModuleType) -> None:
    # No cp.async.wait_group before the read: the destination still holds the 0xFF fill.
    assert st.run_fault("cp_async_unwaited").isnan().all()


def test_cp_async_of_another_thread_without_barrier_is_nan(st: types.ModuleType) -> None:
    # Each thread waits for its own copy, then reads its neighbour's without __syncthreads: the
    # neighbour has not run (hence not waited) yet, except for the last thread, whose neighbour
    # (thread 0) ran first.
    out = st.run_fault("cp_async_no_barrier")
    assert out[:31].isnan().all()


def test_barrier_heavy_kernel_is_fast(st: types.ModuleType) -> None:
    # The emulator's cost model, counted rather than timed: one context switch per thread per
    # barrier (no polling), stacks mapped once and reused by every later block and launch, and
    # on x86-64 the assembly switch (ucontext's makes a signal-mask syscall per switch).
    st.barrier_stress(2, 1)  # maps the 256 stacks
    switches0, mapped0, asm_switch = st.fiber_counters()
    blocks, rounds = 100, 16  # 256 threads x 100 blocks x 32 barriers
    data = st.barrier_stress(blocks, rounds)
    switches1, mapped1, _ = st.fiber_counters()
    v = torch.arange(256, dtype=torch.float32)
    for _ in range(rounds):
        v = 0.5 * (v + v.roll(-1))
    torch.testing.assert_close(data.view(blocks, 256), v.expand(blocks, 256))
    assert mapped1 == mapped0
    assert switches1 - switches0 <= blocks * 256 * (2 * rounds + 2)
    assert asm_switch == (platform.machine() == "x86_64")


def test_uninitialised_shared_memory_reads_nan(st: types.ModuleType) -> None:
    out = st.run_fault("uninit_shared")
    assert torch.equal(out[:32], torch.ones(32))
    assert out[32:].isnan().all()


def test_missing_barrier_shows_up_as_nan(st: types.ModuleType) -> None:
    out = st.run_fault("missing_barrier")
    # Block 0 runs threads in order, so each read happens after the neighbour's write: the race
    # is invisible there. Block 1 runs them in reverse: every read precedes the write.
    assert torch.equal(out[1:32], torch.arange(31, dtype=torch.float32))
    assert out[33:].isnan().all()


# ---- planted faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kernel"),
    [("oob_global", "oob_global_kernel"), ("oob_shared", "oob_shared_kernel")],
)
def test_out_of_bounds_write_is_caught_by_asan(st: types.ModuleType, fault: str, kernel: str) -> None:
    if not emu.asan_requested():
        pytest.skip("bounds checking needs the ASan build (GAM_EMU_ASAN=0 is set)")
    proc = _run_child(f"mod.run_fault({fault!r})\nprint('SURVIVED')\n")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "SURVIVED" not in proc.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert kernel in proc.stderr  # the report's stack names the faulting kernel


@pytest.fixture(scope="module")
def fault_messages(st: types.ModuleType) -> dict[str, str]:
    """Runs every fault that must raise, in one child (timeout guards against a hang)."""
    body = (
        "out = {}\n"
        "for name in ['divergent_barrier', 'warp_deadlock', "
        "'empty_grid', 'smem_limit', 'ldmatrix_misaligned', 'ldmatrix_global', "
        "'mma_exited_lane', 'named_barrier_count', 'named_barrier_split_warp', "
        "'wgmma_partial_warpgroup', 'wgmma_exited_thread', 'wgmma_unfenced_cp_async', "
        "'wgmma_no_wgmma_fence']:\n"
        "    try:\n"
        "        mod.run_fault(name)\n"
        "        out[name] = 'NOT RAISED'\n"
        "    except RuntimeError as exc:\n"
        "        out[name] = str(exc)\n"
        "x = torch.arange(256, dtype=torch.float32)\n"
        "out['recovered'] = mod.block_reduce(x, 128).tolist()\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    proc = _run_child(body)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize(
    ("fault", "needles"),
    [
        ("divergent_barrier", ["gam_launch(divergent_barrier_kernel)", "divergent __syncthreads"]),
        ("warp_deadlock", ["gam_launch(warp_deadlock_kernel)", "__shfl_sync", "__ballot_sync"]),
        ("empty_grid", ["gam_launch(atomic_sum_kernel)", "invalid configuration"]),
        ("smem_limit", ["gam_launch(smem_limit_kernel)", "48 KiB"]),
        ("ldmatrix_misaligned", ["gam_launch(ldmatrix_misaligned_kernel)", "not 16-byte aligned"]),
        ("ldmatrix_global", ["gam_launch(ldmatrix_global_kernel)", "not in shared memory"]),
        ("mma_exited_lane", ["gam_launch(mma_exited_lane_kernel)", "mma.m16n8k16.f16", "needs all 32 lanes"]),
        (
            "named_barrier_count",
            ["gam_launch(named_barrier_count_kernel)", "named barrier 1", "fewer than its count"],
        ),
        (
            "named_barrier_split_warp",
            [
                "gam_launch(named_barrier_split_warp_kernel)",
                "bar.sync 1",
                "warp 0 takes part with 16 of its 32 threads",
            ],
        ),
        ("wgmma_partial_warpgroup", ["gam_launch(wgmma_commit_kernel)", "not whole warpgroups"]),
        (
            "wgmma_exited_thread",
            [
                "gam_launch(wgmma_commit_kernel)",
                "wgmma.commit_group",
                "127 of the 128 threads of warpgroup 0",
            ],
        ),
        (
            "wgmma_unfenced_cp_async",
            ["gam_launch(wgmma_cp_async_kernel)", "cp.async of thread", "fence.proxy.async"],
        ),
        ("wgmma_no_wgmma_fence", ["gam_launch(wgmma_cp_async_kernel)", "no wgmma.fence"]),
    ],
)
def test_fault_raises_runtime_error_naming_kernel(
    fault_messages: dict[str, str], fault: str, needles: list[str]
) -> None:
    message = fault_messages[fault]
    for needle in needles:
        assert needle in message, message


def test_wgmma_on_fenced_cp_async_operands_runs(st: types.ModuleType) -> None:
    # The kernel of wgmma_unfenced_cp_async and wgmma_no_wgmma_fence with both fences: A and B
    # all ones, k = 16.
    assert st.run_fault("wgmma_fenced_cp_async").tolist() == [16.0] * 128


def test_emulator_recovers_after_faults(fault_messages: dict[str, str]) -> None:
    assert fault_messages["recovered"] == [float(sum(range(128))), float(sum(range(128, 256)))]


# ---- the same sources under nvcc ------------------------------------------------------------


def test_selftest_kernels_compile_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    proc = subprocess.run(
        [nvcc, "-c", "-std=c++17", "-arch=sm_80", "-x", "cu", "-I", str(ROOT / "csrc"),
         str(ROOT / "csrc" / "emu" / "selftest_kernels.cu"), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k.o").stat().st_size > 0
