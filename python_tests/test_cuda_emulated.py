"""The CUDA kernels (csrc/cuda/*.cu) run through the SIMT emulator on the CPU, vs the fp64 reference.

Run with `bash python_tests/run_emulated.sh` (AddressSanitizer preloaded, so out-of-bounds global
or shared memory accesses abort); in a plain pytest process these tests skip. The module exposes
the host dispatch of csrc/cuda/dispatch.cpp (the same checks, conversions and launchers as the
real CUDA build) on CPU tensors. Shapes are small but cross every tile edge of the kernels:
conv blocks cover 128 time steps and 32 channel groups; the fused tensor-core retrieval forward
takes 16 to 64 rows x 16 or 32 slots per step, D in chunks of 128 columns (up to 8 chunks,
D <= 1024), the tensor-core backward 32 x 32, SIMT 16 x 32 with 256-column slices; the dM
reduction splits rows every 128. GAM_EXT_RETRIEVAL selects the path (fused / simt / gemm / wgmma) and
emu.set_device the emulated GPU whose shared memory sizes the fused kernels, so every per-arch
configuration the dispatcher can pick runs here.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import wgmma_cases
from tolerances import TOL

from gam_ext import reference

pytestmark = pytest.mark.emulated

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def emu():
    import emulation

    reason = emulation.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    mod = emulation.load_emulated_module(["csrc/cuda/dispatch.cpp"], name="gam_cuda_emulated")
    mod.set_device(*DEVICES["sm_90"])
    return mod


# Emulated GPUs: (compute capability, shared memory per block (opt-in), per SM), bytes.
DEVICES = {
    "sm_90": (90, 232448, 233472),
    "sm_80": (80, 166912, 167936),
    "sm_86": (86, 101376, 102400),
    "sm_75": (75, 65536, 65536),
}


@pytest.fixture
def device(emu):
    """Sets the emulated device for one test (by name), restoring the H100-like default."""

    def use(name):
        emu.set_device(*DEVICES[name])

    yield use
    emu.set_device(*DEVICES["sm_90"])


def close(ours, ref, dtype, scale=1.0, **kw):
    tol = dict(TOL[dtype])
    tol["atol"] *= scale
    tol.update(kw)
    torch.testing.assert_close(ours.double(), ref.double(), **tol)


def gen(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def misaligned(t):
    """A contiguous copy of t whose data pointer is off the 16-byte grid (forces scalar paths)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


# --------------------------------------------------------------------------------------------
# Causal conv
# --------------------------------------------------------------------------------------------


def conv_ref(x, w, b, dy):
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    y = reference.causal_conv1d(xd, wd, bd)
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad, None if bd is None else bd.grad


CONV_SHAPES = [
    # (B, N, D, K): N = 1, 2, primes, across the 128-step block edge; D odd / not a multiple of
    # the vector width / multiple of 8; K = 1..8 (fast paths 2-4, generic others), K > N.
    (1, 1, 8, 3),
    (2, 2, 5, 4),
    (2, 7, 16, 8),
    (1, 131, 24, 3),
    (2, 129, 13, 2),
    (1, 67, 40, 1),
    (1, 37, 64, 5),
    (2, 11, 9, 6),
    (1, 257, 8, 4),
    (1, 5, 264, 7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "B{}N{}D{}K{}".format(*s))
def test_conv(emu, dtype, shape):
    b_, n, d, k = shape
    x = gen((b_, n, d), dtype, 1)
    w = gen((d, k), torch.float32, 2, 0.5)  # fp32 params with half activations
    bias = gen((d,), torch.float32, 3)
    dy = gen((b_, n, d), dtype, 4)
    y_ref, dx_ref, dw_ref, db_ref = conv_ref(x, w, bias, dy)
    y = emu.causal_conv1d_fwd(x, w, bias)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, y_ref, dtype)
    dx, dw, db = emu.causal_conv1d_bwd(dy, x, w)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    close(dx, dx_ref, dtype)
    # dw, dbias sum B*N products in fp32: relative to the size of the sum.
    close(dw, dw_ref, torch.float32, scale=max(1.0, (b_ * n) ** 0.5))
    close(db, db_ref, torch.float32, scale=max(1.0, (b_ * n) ** 0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_scalar_path_and_layouts(emu, dtype):
    # Misaligned data pointer (scalar path at D % vec == 0), non-contiguous input, no bias,
    # weight in the activation dtype.
    x = gen((2, 45, 16), dtype, 5)
    w = gen((16, 3), dtype, 6, 0.5)
    dy = gen((2, 45, 16), dtype, 7)
    y_ref, dx_ref, dw_ref, _ = conv_ref(x, w, None, dy)
    close(emu.causal_conv1d_fwd(misaligned(x), w, None), y_ref, dtype)
    dx, dw, db = emu.causal_conv1d_bwd(misaligned(dy), misaligned(x), w)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype, scale=4.0)
    assert dw.dtype == dtype
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, D) view, channel stride N
    assert not xt.is_contiguous()
    close(emu.causal_conv1d_fwd(xt, w, None), y_ref, dtype)
    dx2, dw2, _ = emu.causal_conv1d_bwd(dy.transpose(1, 2).contiguous().transpose(1, 2), xt, w)
    close(dx2, dx_ref, dtype)


def test_conv_empty_and_deterministic(emu):
    x = torch.zeros(0, 5, 8)
    w = gen((8, 3), torch.float32, 8)
    assert emu.causal_conv1d_fwd(x, w, None).shape == (0, 5, 8)
    dx, dw, db = emu.causal_conv1d_bwd(x, x, w)
    assert dx.shape == x.shape and torch.all(dw == 0) and torch.all(db == 0)
    x = gen((3, 300, 8), torch.float32, 9)  # several time blocks -> several partials
    dy = gen((3, 300, 8), torch.float32, 10)
    first = emu.causal_conv1d_bwd(dy, x, w)
    second = emu.causal_conv1d_bwd(dy, x, w)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_conv_bad_input(emu):
    x = gen((1, 4, 8), torch.float32, 11)
    with pytest.raises(RuntimeError, match="weight has 4 channels"):
        emu.causal_conv1d_fwd(x, torch.zeros(4, 3), None)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32"):
        emu.causal_conv1d_fwd(x.double(), torch.zeros(8, 3), None)
    with pytest.raises(RuntimeError, match="x must have 3 dimensions"):
        emu.causal_conv1d_fwd(x[0], torch.zeros(8, 3), None)


# --------------------------------------------------------------------------------------------
# Memory retrieval
# --------------------------------------------------------------------------------------------


def retrieval_ref(h, m, scale, grad_out):
    hd = h.double().requires_grad_()
    md = m.double().requires_grad_()
    out = reference.memory_retrieval(hd, md, scale)
    out.backward(grad_out.double())
    lse = torch.logsumexp(scale * hd.detach() @ md.detach().t(), dim=-1)
    return out.detach(), lse, hd.grad, md.grad


RET_SHAPES = [
    # (B, N, S, D): S = 1, S not a multiple of 32, several slot tiles; rows across the 64-row
    # (tensor core), 16-row (SIMT) and 128-row (dM split) edges; D odd, < 16, not a multiple of
    # 16, and > 256 (several SIMT column slices).
    (1, 1, 1, 8),
    (2, 2, 3, 5),
    (1, 67, 33, 24),
    (2, 37, 70, 40),
    (1, 131, 17, 16),
    (1, 9, 45, 130),
    (1, 5, 20, 264),
    (1, 40, 40, 100),
    (1, 3, 5, 520),  # > 512 columns: several output slices per row tile on every path
    (1, 20, 33, 1000),  # 8 column chunks of the fused forward, the last one partial
    (2, 9, 17, 1024),
]


def run_retrieval(emu, dtype, shape, seed=20, scale=0.75):
    """Forward and backward through the emulated kernels and in float64; returns both.

    Inputs scale like d**-0.25 (at most 0.5), as in test_cuda.py, so scores stay O(1) at D = 1024.
    """
    b_, n, s, d = shape
    mag = min(0.5, d**-0.25)
    h = gen((b_, n, d), dtype, seed, mag)
    m = gen((s, d), torch.float32, seed + 1, mag)  # fp32 bank with half activations
    grad_out = gen((b_, n, d), dtype, seed + 2)
    ref = retrieval_ref(h, m.to(dtype), scale, grad_out)
    out, lse = emu.memory_retrieval_fwd(h, m, scale)
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, scale)
    return (out, lse, dh, dm), ref


def check_retrieval(ours, ref, dtype, shape):
    out, lse, dh, dm = ours
    out_ref, lse_ref, dh_ref, dm_ref = ref
    b_, n, _, _ = shape
    close(out, out_ref, dtype)
    close(lse, lse_ref, dtype)
    close(dh, dh_ref, dtype)
    close(dm, dm_ref, dtype, scale=max(1.0, (b_ * n / 16) ** 0.5))


@pytest.mark.parametrize("path", ["fused", "simt", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RET_SHAPES, ids=lambda s: "B{}N{}S{}D{}".format(*s))
def test_retrieval(emu, dtype, shape, path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    b_, n, s, d = shape
    (out, lse, dh, dm), (out_ref, lse_ref, dh_ref, dm_ref) = run_retrieval(emu, dtype, shape)
    kind = emu.retrieval_path(s, d, str(dtype).split(".")[1])
    expected = "gemm" if path == "gemm" else "mma" if path == "fused" and dtype != torch.float32 else "simt"
    assert kind[0] == path and kind[1].startswith(expected) and kind[2].startswith(expected), kind
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b_, n)
    assert dm.dtype == torch.float32 and dm.shape == (s, d)
    check_retrieval((out, lse, dh, dm), (out_ref, lse_ref, dh_ref, dm_ref), dtype, shape)


# The wgmma kernels (sm_90a). Forward (D = 128, 256, 512), both kernels: rows crossing their
# 64-row blocks, slots their 64-slot (lockstep) and 32-slot (pipelined) tiles (S = 1: one slot;
# 45: two tiles of 32, the second partial; 130: five, a 2-slot tail, the 4-stage ring wrapped;
# 300: ten), a single row; for the seesaw kernel's pairs of 64-slot tiles S = 1, 45 and 64 are
# one tile and a tile past S, 130 two pairs (the second with a tile past S), 200 two whole pairs
# (a 8-slot tail). Backward (D = 64
# .. 512, D % 64 == 0; at D = 64 and 192 the forward is the gemm path's): the same 64-row blocks,
# 128-slot tiles split between two warpgroups (S <= 128: the second has none; 130: three tiles,
# the second one; 515: five, odd S, a 3-slot tail), 1 to 8 panels of 64 columns.
WGMMA_SHAPES = [
    (1, 1, 1, 512), (2, 37, 45, 512), (1, 128, 64, 512), (3, 50, 130, 512),
    (1, 65, 129, 64), (2, 33, 515, 192), (1, 7, 1, 256), (1, 130, 300, 128), (2, 40, 70, 256),
    (1, 70, 200, 128),
]  # fmt: skip


@pytest.mark.parametrize("forward", list(wgmma_cases.FORWARD_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", WGMMA_SHAPES, ids=lambda s: "B{}N{}S{}D{}".format(*s))
def test_retrieval_wgmma(emu, dtype, shape, forward, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    monkeypatch.setenv("GAM_EXT_WGMMA_FORWARD", forward)
    _, _, s, d = shape
    kind = emu.retrieval_path(s, d, str(dtype).split(".")[1])
    kernel = wgmma_cases.FORWARD_KERNELS[forward]
    fwd = f"wgmma: {kernel}<" if d in (128, 256, 512) else "gemm path (the wgmma forward takes"
    assert kind[0] == "wgmma" and kind[1].startswith(fwd), kind
    assert kind[2].startswith("wgmma: retrieval_bwd_scores_wgmma_kernel"), kind
    ours, ref = run_retrieval(emu, dtype, shape)
    check_retrieval(ours, ref, dtype, shape)
    again, _ = run_retrieval(emu, dtype, shape)
    assert all(torch.equal(a, b) for a, b in zip(ours, again, strict=True))  # bitwise repeatable


@pytest.mark.parametrize("forward", list(wgmma_cases.FORWARD_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_retrieval_wgmma_forward_on_rows_peaked_in_every_tile(emu, dtype, forward, monkeypatch):
    # Each row's scores have two peaks far above the rest, at slots of their own in two different
    # tiles (early, middle or late; either one first): the running max jumps by 3.5 to 5.5 on a
    # tile that either warpgroup owns, and the lower peak still carries 0.5-3% of the output. Every
    # rescale of O and of the row sums (and, in the seesaw kernel, of the P handed between the
    # warpgroups) must be right, or that share is off by a factor of e^3.5 or more.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    monkeypatch.setenv("GAM_EXT_WGMMA_FORWARD", forward)
    n, s, d = 96, 250, 128
    m = gen((s, d), torch.float64, 60)
    m = (m / m.norm(dim=1, keepdim=True) * 3.0).float()  # rows of norm 3
    rows = torch.arange(n)
    high = (rows * 37 + 11) % s
    low = ((high // 64 + 1 + rows % 3) % 4) * 64 + (rows * 13) % 50  # another of the 4 tiles
    md = m.double()
    h = (gen((1, n, d), torch.float64, 61, 0.02) + 0.7 * md[high] + 0.45 * md[low]).to(dtype)
    out, lse = emu.memory_retrieval_fwd(h, m, 2.0)
    hd, md = h.double(), m.to(dtype).double()
    scores = 2.0 * hd[0] @ md.t()
    top2 = scores.topk(2, -1)
    assert torch.equal(top2.indices[:, 0], high) and torch.equal(top2.indices[:, 1], low)
    assert (top2.values[:, 1] - scores.median(-1).values).min() > 5  # two peaks, as intended
    assert set((high // 64).tolist()) == {0, 1, 2, 3} and bool((high // 64 != low // 64).all())
    close(out[0], torch.softmax(scores, -1) @ md, dtype)
    close(lse[0], torch.logsumexp(scores, -1), dtype)


def test_retrieval_wgmma_backward_matches_the_gemm_path(emu, monkeypatch):
    # Same P and scale * dS up to their rounding, so dh and dM agree with the gemm path's far
    # inside the reference tolerance (a wrong row's lse or delta would not).
    shape = (2, 40, 150, 128)
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    ours, _ = run_retrieval(emu, torch.float16, shape)
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "gemm")
    gemm, _ = run_retrieval(emu, torch.float16, shape)
    for a, b in zip(ours[2:], gemm[2:], strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-3, atol=2e-3)


def test_retrieval_wgmma_backward_misaligned_grad_takes_the_gemm_backward(emu, monkeypatch):
    # grad_out starting 2 bytes into its allocation: the score kernel's 16-byte copies cannot
    # take it, so the gemm backward runs (the emulator would trap on a misaligned cp.async).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    shape = (1, 9, 45, 128)
    h = gen(shape[:2] + (128,), torch.bfloat16, 40, 0.3)
    m = gen((45, 128), torch.float32, 41, 0.3)
    grad = gen(shape[:2] + (128,), torch.bfloat16, 42)
    out, lse = emu.memory_retrieval_fwd(h, m, 0.75)
    dh, dm = emu.memory_retrieval_bwd(misaligned(grad), h, m, out, lse, 0.75)
    ref_dh, ref_dm = emu.memory_retrieval_bwd(grad, h, m, out, lse, 0.75)  # the wgmma backward
    close(dh, ref_dh, torch.bfloat16)
    close(dm, ref_dm, torch.bfloat16)


def test_retrieval_wgmma_misaligned_input_takes_the_gemm_forward(emu, monkeypatch):
    # h starting 2 bytes into its allocation: the wgmma forward's 16-byte copies cannot take it,
    # so the gemm forward runs (the emulator would trap on a misaligned cp.async).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    shape = (1, 9, 45, 512)
    h = gen(shape[:2] + (512,), torch.bfloat16, 30, 0.2)
    h_odd = misaligned(h)
    assert h_odd.data_ptr() % 16 != 0
    m = gen((45, 512), torch.float32, 31, 0.2)
    out, lse = emu.memory_retrieval_fwd(h_odd, m, 0.75)
    ref_out, ref_lse = emu.memory_retrieval_fwd(h, m, 0.75)  # aligned: the wgmma forward
    close(out, ref_out, torch.bfloat16)
    close(lse, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixer_wgmma(emu, dtype, monkeypatch):
    # The fused mixer's epilogue on the G of the wgmma forward, and its backward.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    shape = (2, 37, 512, 45, 4)
    assert emu.retrieval_path(45, 512, str(dtype).split(".")[1])[1].startswith("wgmma:")
    ours, refs = run_mixer(emu, dtype, shape, seed=512)
    check_mixer(ours, refs, dtype, shape)


@pytest.mark.parametrize(
    ("dtype", "d", "device_name", "bwd"),
    [
        (torch.float32, 512, "sm_90", "gemm path"),
        (torch.bfloat16, 192, "sm_90", "wgmma:"),
        (torch.float16, 100, "sm_90", "gemm path"),
        (torch.float16, 512, "sm_80", "gemm path"),
    ],
)
def test_retrieval_wgmma_elsewhere_takes_the_gemm_kernels(
    emu, device, dtype, d, device_name, bwd, monkeypatch
):
    # fp32, D other than 128, 256, 512 (forward) or not a multiple of 64 (backward), or a GPU
    # other than sm_90: the gemm path's kernels, said so.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "wgmma")
    device(device_name)
    kind = emu.retrieval_path(45, d, str(dtype).split(".")[1])
    assert kind[0] == "wgmma" and kind[1].startswith("gemm path (the wgmma forward takes"), kind
    assert kind[2].startswith(bwd), kind
    if bwd == "gemm path":
        assert kind[2].startswith("gemm path (the wgmma backward takes"), kind
    shape = (2, 9, 45, d)
    ours, ref = run_retrieval(emu, dtype, shape)
    check_retrieval(ours, ref, dtype, shape)


# (D, what the fused forward picks on each emulated device for fp16; bf16 the same except where
# the device has no bf16 tensor cores). Each D class, on each device, is one configuration of
# FwdMmaConfig (csrc/cuda/retrieval_common.cuh).
FWD_VARIANTS = {
    40: {
        "sm_90": "<128, 32>, 64 rows",
        "sm_80": "<128, 32>, 64 rows",
        "sm_86": "<128, 32>, 64 rows",
        "sm_75": "<128, 16>, 32 rows",
    },
    100: {
        "sm_90": "<128, 32>, 64 rows",
        "sm_80": "<128, 32>, 64 rows",
        "sm_86": "<128, 32>, 64 rows",
        "sm_75": "<128, 16>, 32 rows",
    },
    200: {
        "sm_90": "<128, 32>, 64 rows x 32 slots, 2 column chunks of 128, 3 stages",
        "sm_80": "<128, 32>, 64 rows x 32 slots, 2 column chunks of 128, 2 stages",
        "sm_86": "<128, 32>, 64 rows x 32 slots, 2 column chunks of 128, 3 stages",
        "sm_75": "<128, 32>, 32 rows",
    },
    512: {
        "sm_90": "<128, 32>, 64 rows x 32 slots, 4 column chunks of 128, 3 stages",
        "sm_80": "<128, 32>, 64 rows x 32 slots, 4 column chunks of 128, 2 stages",
        "sm_86": "<128, 16>, 32 rows",
        "sm_75": "<128, 16>, 16 rows",
    },
    1000: {
        "sm_90": "<128, 32>, 32 rows",
        "sm_80": "<128, 16>, 32 rows",
        "sm_86": "<128, 16>, 16 rows x 16 slots, 8 column chunks of 128, 1 stages",
        "sm_75": "<128, 16, h in registers>, 16 rows",
    },
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(DEVICES))
@pytest.mark.parametrize("d", list(FWD_VARIANTS))
def test_retrieval_every_device_configuration(emu, device, name, d, dtype, monkeypatch):
    # Every configuration the dispatcher picks for sm_75 .. sm_90 shared memory; S not a multiple
    # of any tile, rows crossing the 16-, 32- and 64-row tiles.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "fused")
    device(name)
    shape = (2, 37, 45, d)
    kind = emu.retrieval_path(45, d, str(dtype).split(".")[1])
    if name == "sm_75" and dtype == torch.bfloat16:
        assert kind[1].startswith("simt (no bf16 tensor cores before sm_80)"), kind
        assert kind[2].startswith("simt (no bf16 tensor cores before sm_80)"), kind
    else:
        assert kind[1].startswith("mma: retrieval_fwd_mma_kernel" + FWD_VARIANTS[d][name]), kind
        # The backward's row pass keeps h and grad_out in registers only where nothing else fits.
        regs = d > 512 and name in ("sm_86", "sm_75")
        bwd = "mma: retrieval_bwd_mma_kernel" + ("<h and grad_out in registers>" if regs else ", ")
        assert kind[2].startswith(bwd), kind
    ours, ref = run_retrieval(emu, dtype, shape, seed=d)
    check_retrieval(ours, ref, dtype, shape)


@pytest.mark.parametrize(
    ("path", "s", "d", "kernels"),
    [("fused", 130, 32, ("mma", "mma")), ("wgmma", 200, 128, ("wgmma:", "wgmma:"))],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_retrieval_rescale_path(emu, dtype, path, s, d, kernels, monkeypatch):
    # Slot norms that grow along the bank push each row's max up tile after tile (scores up to
    # about 50 apart), so the tensor-core kernels must rescale their output fragments several
    # times (the mma kernel past a threshold of exp(8), the wgmma one at every tile), and p
    # underflows to zero for most slots of a row.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    kind = emu.retrieval_path(s, d, str(dtype).split(".")[1])
    assert kind[1].startswith(kernels[0]) and kind[2].startswith(kernels[1]), kind
    h = gen((1, 70, d), dtype, 30)
    grow = torch.linspace(0.2, 3.0, s).unsqueeze(1) * (32 / d) ** 0.5
    m = (gen((s, d), torch.float64, 31) * grow).to(dtype)
    grad_out = gen((1, 70, d), dtype, 32)
    out_ref, lse_ref, dh_ref, dm_ref = retrieval_ref(h, m, 1.5, grad_out)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.5)
    close(out, out_ref, dtype, scale=4.0)
    close(lse, lse_ref, dtype, scale=4.0)
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.5)
    assert dm.dtype == dtype
    ref_mag = max(1.0, dh_ref.abs().max().item() / 4)
    close(dh, dh_ref, dtype, scale=ref_mag)
    close(dm, dm_ref, dtype, scale=max(1.0, dm_ref.abs().max().item() / 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["gemm", "fused", "wgmma", "simt"])
def test_retrieval_backward_on_peaked_rows(emu, path, dtype, monkeypatch):
    # h and M of unit scale at D = 192: scores about 14 apart, one slot holds nearly all of each
    # row's p (a case a randomised run found). There dP of that slot and delta = rowsum(P dP)
    # nearly cancel. The fused and wgmma backwards start from delta = rowsum(dG G) on G as stored
    # (rounded), whose rounding dP does not share, and then correct dS and dh with the exact
    # delta (csrc/cuda/README.md, "Numerics of delta"). Without the correction dh was off by
    # 8e-3 (fused) and 2e-2 (wgmma) in fp16, beyond its tolerance; with it, 7e-5 and 1e-4, as
    # on the gemm path (1e-4).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    b, n, s, d = 2, 2, 535, 192
    backward = emu.retrieval_path(s, d, str(dtype).split(".")[1])[2]
    assert backward.startswith({"gemm": "gemm", "fused": "mma", "wgmma": "wgmma:", "simt": "simt"}[path]), (
        backward
    )
    h = gen((b, n, d), dtype, 84)
    m = gen((s, d), torch.float32, 85)
    grad_out = gen((b, n, d), dtype, 86)
    out_ref, lse_ref, dh_ref, dm_ref = retrieval_ref(h, m.to(dtype), 1.0, grad_out)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
    close(out, out_ref, dtype)
    close(lse, lse_ref, dtype)
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
    close(dh, dh_ref, dtype)
    close(dm, dm_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["gemm", "fused", "wgmma", "simt"])
def test_retrieval_single_slot_backward(emu, path, dtype, monkeypatch):
    # S = 1: p = 1 whatever h is, so dh = 0 and dM = sum of grad_out. Every path's dS must sum to
    # zero over the row as softmax's gradient does, also where the backward's recomputed score
    # differs from the forward's by rounding (the wgmma kernels order their products
    # differently), so that p = exp(scale s - lse) is 1 +- 1e-6: the delta correction divides
    # rowsum(p dP) by rowsum(p) (without that the wgmma path left dh at 2e-5 here; in the
    # emulator, with exact exp2 and the same products on both sides, the other paths give 0).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    h, m, grad_out = gen((1, 70, 128), dtype, 30), gen((1, 128), dtype, 31, 1.5), gen((1, 70, 128), dtype, 32)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
    assert torch.equal(out, m.expand(1, 70, 128))
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
    assert dh.abs().max().item() <= 1e-6
    close(dm, grad_out.double().sum((0, 1)).unsqueeze(0), dtype)


@pytest.mark.parametrize("path", ["gemm", "simt"])
@pytest.mark.parametrize("s", [500, 502])  # gemm: S % 4 == 0 takes the row-in-registers kernel
def test_retrieval_backward_on_peaked_rows_fp32(emu, s, path, monkeypatch):
    # The same rows in fp32: there lse's fp32 rounding (scores near 40) left p off by a few 1e-6,
    # which on such rows stays whole in dP - delta (dh off by 4.3e-5 / 4.4e-5 against eager's
    # 1.7e-6 at S = 500); both paths now renormalise p: 1.6e-6 / 5.5e-6. Budget: twice eager's
    # error on the gemm path, whose products are eager's; four times on the SIMT one, whose
    # scores and dP are sequential fp32 dot products (about sqrt(D) ulp each; p's errors stay
    # visible on such rows: 2e-7 of noise in p alone gives 5e-6 here).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    b, n, d = 2, 2, 192
    h, m, grad_out = (
        gen((b, n, d), torch.float32, 84),
        gen((s, d), torch.float32, 85),
        gen((b, n, d), torch.float32, 86),
    )
    _, _, dh_ref, dm_ref = retrieval_ref(h, m, 1.0, grad_out)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
    leaves = [h.clone().requires_grad_(), m.clone().requires_grad_()]
    reference.memory_retrieval(*leaves, 1.0).backward(grad_out)
    budget = {"gemm": 2, "simt": 4}[path]
    for ours, eager, ref in ((dh, leaves[0].grad, dh_ref), (dm, leaves[1].grad, dm_ref)):
        err = (ours.double() - ref).abs().max().item()
        assert err <= budget * (eager.double() - ref).abs().max().item(), err


@pytest.mark.parametrize("path", ["fused", "simt", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_retrieval_memory_rounded_like_autocast_on_both_devices(emu, dtype, path, monkeypatch):
    # One rule (csrc/op_checks.h): the memory bank is rounded to the activation dtype, as autocast
    # does for the eager formulation's matmuls. An fp32 bank must then give the very bits of the
    # pre-rounded bank, on the CPU kernels and on the CUDA kernels alike.
    import gam_ext

    h32 = gen((2, 37, 40), torch.float32, 90, 0.5)
    m = gen((70, 40), torch.float32, 91, 0.5)
    assert not torch.equal(m.to(dtype).float(), m)  # the bank does round
    m_rounded = m.to(dtype)
    grad_out = gen((2, 37, 40), dtype, 92)
    with torch.autocast("cpu", dtype=dtype):
        eager = reference.memory_retrieval(h32, m, 0.75)
        ours = gam_ext.memory_retrieval(h32, m, 0.75)
    h = h32.to(dtype)
    assert eager.dtype == dtype and ours.dtype == dtype
    cpu_out, cpu_lse = torch.ops.gam_ext.memory_retrieval_fwd(h, m, 0.75)
    assert torch.equal(ours, cpu_out)
    cpu_rounded = torch.ops.gam_ext.memory_retrieval_fwd(h, m_rounded, 0.75)
    assert torch.equal(cpu_out, cpu_rounded[0]) and torch.equal(cpu_lse, cpu_rounded[1])
    cpu_dh, cpu_dm = torch.ops.gam_ext.memory_retrieval_bwd(grad_out, h, m, cpu_out, cpu_lse, 0.75)
    cpu_dh_r, cpu_dm_r = torch.ops.gam_ext.memory_retrieval_bwd(
        grad_out, h, m_rounded, cpu_out, cpu_lse, 0.75
    )
    assert torch.equal(cpu_dh, cpu_dh_r) and torch.equal(cpu_dm.to(dtype), cpu_dm_r)
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    out, lse = emu.memory_retrieval_fwd(h, m, 0.75)
    out_r, lse_r = emu.memory_retrieval_fwd(h, m_rounded, 0.75)
    dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 0.75)
    dh_r, dm_r = emu.memory_retrieval_bwd(grad_out, h, m_rounded, out, lse, 0.75)
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    assert torch.equal(dh, dh_r) and torch.equal(dm.to(dtype), dm_r)
    # Both devices agree with the eager formulation under autocast, and with each other.
    close(cpu_out, eager, dtype)
    close(out, eager, dtype)
    close(out, cpu_out, dtype)
    close(dh, cpu_dh, dtype)
    close(dm, cpu_dm, dtype, scale=2.0)


def test_retrieval_smem_limit_and_layouts(emu, monkeypatch):
    # GAM_EXT_RETRIEVAL_SMEM_LIMIT below every tensor-core tile: the SIMT kernels run, and the
    # path says so and why (never a silent fallback).
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "fused")
    h = gen((1, 20, 48), torch.bfloat16, 40)
    m = gen((40, 48), torch.bfloat16, 41)
    grad_out = gen((1, 20, 48), torch.bfloat16, 42)
    out_ref, lse_ref, dh_ref, dm_ref = retrieval_ref(h, m, 1.0, grad_out)
    with monkeypatch.context() as mp:
        mp.setenv("GAM_EXT_RETRIEVAL_SMEM_LIMIT", "1024")
        kind = emu.retrieval_path(40, 48, "bfloat16")
        assert kind[1].startswith("simt (no tensor-core tile fits the shared memory)"), kind
        out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
        dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
        mp.setenv("GAM_EXT_RETRIEVAL_SMEM_LIMIT", "lots")
        with pytest.raises(RuntimeError, match="GAM_EXT_RETRIEVAL_SMEM_LIMIT must be"):
            emu.memory_retrieval_fwd(h, m, 1.0)
        mp.setenv("GAM_EXT_RETRIEVAL", "tensor")
        mp.delenv("GAM_EXT_RETRIEVAL_SMEM_LIMIT")
        with pytest.raises(RuntimeError, match="GAM_EXT_RETRIEVAL must be fused, gemm, simt or wgmma"):
            emu.memory_retrieval_fwd(h, m, 1.0)
        mp.setenv("GAM_EXT_RETRIEVAL", "wgmma")
        mp.setenv("GAM_EXT_WGMMA_FORWARD", "overlapped")
        with pytest.raises(RuntimeError, match="GAM_EXT_WGMMA_FORWARD must be pipelined, lockstep or seesaw"):
            emu.memory_retrieval_fwd(h, m, 1.0)
        mp.delenv("GAM_EXT_RETRIEVAL")
        mp.delenv("GAM_EXT_WGMMA_FORWARD")
    close(out, out_ref, torch.bfloat16)
    close(dh, dh_ref, torch.bfloat16)
    close(dm, dm_ref, torch.bfloat16, scale=2.0)
    # Non-contiguous and misaligned inputs (element loads instead of cp.async) give the same
    # result.
    assert emu.retrieval_path(40, 48, "bfloat16")[1].startswith("mma")
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)
    out2, lse2 = emu.memory_retrieval_fwd(misaligned(ht), misaligned(m), 1.0)
    close(out2, out_ref, torch.bfloat16)
    dh, dm = emu.memory_retrieval_bwd(misaligned(grad_out), ht, m, out2, lse2, 1.0)
    close(dh, dh_ref, torch.bfloat16)
    close(dm, dm_ref, torch.bfloat16, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_retrieval_fused_backward_is_deterministic(emu, dtype, monkeypatch):
    # 300 rows: the dM product runs 3 row splits, whose fp32 partials are added in a fixed order.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "fused")
    shape = (2, 150, 70, 136)
    first, ref = run_retrieval(emu, dtype, shape, seed=53)
    second, _ = run_retrieval(emu, dtype, shape, seed=53)
    assert emu.retrieval_path(70, 136, str(dtype).split(".")[1])[2].startswith("mma")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    check_retrieval(first, ref, dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device_name", ["sm_90", "sm_80", "sm_86", "sm_75"])
def test_retrieval_default_path(emu, device, dtype, device_name, monkeypatch):
    # Unset or empty GAM_EXT_RETRIEVAL: gemm for fp32, fp16 and bf16 (bf16 from sm_80, the first
    # with bf16 tensor cores; before it the fused path's SIMT kernels); the default gives the very
    # bits of the path it names.
    device(device_name)
    name = str(dtype).split(".")[1]
    sm = int(device_name[3:])
    expected = "gemm" if dtype != torch.bfloat16 or sm >= 80 else "fused"
    shape = (1, 21, 36, 40)
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("GAM_EXT_RETRIEVAL", raising=False)
        else:
            monkeypatch.setenv("GAM_EXT_RETRIEVAL", unset)
        assert emu.retrieval_path(36, 40, name)[0] == expected
        default, ref = run_retrieval(emu, dtype, shape, seed=61)
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", expected)
    forced, _ = run_retrieval(emu, dtype, shape, seed=61)
    for a, b in zip(default, forced, strict=True):
        assert torch.equal(a, b)
    check_retrieval(default, ref, dtype, shape)


# S for the gemm path's softmax kernels: every register-resident variant (1, 2, 4, 8 float4s
# per lane; full and partial last vectors of lanes), and the element-wise kernels (S % 4 != 0,
# S > 1024; fp32 P past 512 slots).
GEMM_SOFTMAX_SLOTS = [(4, 1), (36, 1), (128, 1), (132, 2), (256, 2), (260, 4), (512, 4),
                      (516, 8), (1024, 8), (1028, 0), (37, 0), (514, 0)]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots,vecs", GEMM_SOFTMAX_SLOTS, ids=lambda v: str(v))
def test_retrieval_gemm_softmax_kernels(emu, dtype, slots, vecs, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "gemm")
    if dtype == torch.float32 and vecs == 8:
        vecs = 0
    kind = emu.retrieval_path(slots, 24, str(dtype).split(".")[1])
    variant = "_kernel (element-wise" if vecs == 0 else f"_vec_kernel<{vecs}>"
    assert f"retrieval_softmax_fwd{variant}" in kind[1], kind
    assert f"retrieval_softmax_bwd{variant}" in kind[2], kind
    # 11 rows: the last block of 8 warps (rows) is partial.
    shape = (1, 11, slots, 24)
    ours, ref = run_retrieval(emu, dtype, shape, seed=70 + slots)
    check_retrieval(ours, ref, dtype, shape)


def test_retrieval_gemm_softmax_large_scores(emu, monkeypatch):
    # Scores far beyond exp's range: the exact row max keeps the softmax finite, in both kernels.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", "gemm")
    for slots in (512, 37):
        h = gen((1, 5, 16), torch.float32, 80, 30.0)
        m = gen((slots, 16), torch.float32, 81, 30.0)
        grad_out = gen((1, 5, 16), torch.float32, 82)
        out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
        dh, dm = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
        out_ref, lse_ref, dh_ref, dm_ref = retrieval_ref(h, m, 1.0, grad_out)
        assert torch.isfinite(lse).all() and lse.abs().max() > 1000
        torch.testing.assert_close(lse.double(), lse_ref.double(), rtol=1e-5, atol=1e-3)
        for ours, ref in ((out, out_ref), (dh, dh_ref), (dm, dm_ref)):
            assert torch.isfinite(ours).all()
            close(ours, ref, torch.float32, scale=4.0)


@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_retrieval_empty_and_deterministic(emu, path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    h = torch.zeros(0, 4, 8)
    m = gen((5, 8), torch.float32, 50)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
    assert out.shape == h.shape and lse.shape == (0, 4)
    dh, dm = emu.memory_retrieval_bwd(h, h, m, out, lse, 1.0)
    assert dh.shape == h.shape and torch.all(dm == 0)
    # D = 0: softmax over zero scores, lse = log(S) (a fill kernel, no host copy).
    h0 = torch.zeros(2, 3, 0, dtype=torch.bfloat16)
    out, lse = emu.memory_retrieval_fwd(h0, m[:, :0].bfloat16(), 1.0)
    assert out.shape == h0.shape
    torch.testing.assert_close(lse, torch.full((2, 3), torch.log(torch.tensor(5.0)).item()))
    dh, dm = emu.memory_retrieval_bwd(h0, h0, m[:, :0].bfloat16(), out, lse, 1.0)
    assert dh.shape == h0.shape and dm.shape == (5, 0)
    h = gen((2, 150, 8), torch.float32, 51)  # 300 rows: 3 dM row splits
    grad_out = gen((2, 150, 8), torch.float32, 52)
    out, lse = emu.memory_retrieval_fwd(h, m, 1.0)
    first = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
    second = emu.memory_retrieval_bwd(grad_out, h, m, out, lse, 1.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    _, _, dh_ref, dm_ref = retrieval_ref(h, m, 1.0, grad_out)
    close(first[1], dm_ref, torch.float32, scale=4.0)


def test_retrieval_bad_input(emu):
    h = gen((1, 4, 8), torch.float32, 60)
    with pytest.raises(RuntimeError, match="memory must have shape"):
        emu.memory_retrieval_fwd(h, torch.zeros(3, 7), 1.0)
    with pytest.raises(RuntimeError, match="at least one slot"):
        emu.memory_retrieval_fwd(h, torch.zeros(0, 8), 1.0)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        emu.memory_retrieval_bwd(h, h, torch.zeros(3, 8), h, torch.zeros(4), 1.0)


# --------------------------------------------------------------------------------------------
# Gate fusion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 3, 5), (2, 7, 16), (1, 33, 40), (3, 5, 13)], ids=lambda s: "B{}N{}D{}".format(*s)
)
@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
def test_gate(emu, dtype, shape, aligned):
    b_, n, d = shape
    local = gen((b_, n, d), dtype, 70)
    global_ctx = gen((b_, n, d), dtype, 71)
    z = gen((b_, n, 2 * d), dtype, 72, 2.0)
    df = gen((b_, n, d), dtype, 73)
    args = [t.double().requires_grad_() for t in (local, global_ctx, z)]
    f_ref = reference.gate_fusion(*args)
    f_ref.backward(df.double())
    prep = (lambda t: t) if aligned else misaligned
    f = emu.gate_fusion_fwd(prep(local), prep(global_ctx), prep(z))
    close(f, f_ref.detach(), dtype)
    grads = emu.gate_fusion_bwd(prep(df), prep(local), prep(global_ctx), prep(z))
    for ours, ref in zip(grads, args, strict=True):
        assert ours.dtype == dtype
        close(ours, ref.grad, dtype)


def test_gate_layouts_and_errors(emu):
    local = gen((2, 6, 8), torch.float32, 80)
    global_ctx = gen((2, 6, 8), torch.float32, 81)
    z = gen((2, 6, 16), torch.float32, 82)
    ref = reference.gate_fusion(local, global_ctx, z)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)
    close(emu.gate_fusion_fwd(local, global_ctx, zt), ref, torch.float32)
    e = torch.zeros(0, 6, 8)
    assert emu.gate_fusion_fwd(e, e, torch.zeros(0, 6, 16)).shape == e.shape
    with pytest.raises(RuntimeError, match="gate_logits must have shape"):
        emu.gate_fusion_fwd(local, global_ctx, local)
    with pytest.raises(RuntimeError, match="share one dtype"):
        emu.gate_fusion_fwd(local, global_ctx.half(), z)


# --------------------------------------------------------------------------------------------
# The fused mixer (gam_mixer_fwd / _bwd: csrc/cuda/gam_mixer.cu, the retrieval kernels, dispatch)
# --------------------------------------------------------------------------------------------


def run_mixer(emu, dtype, shape, seed, scale=0.8, misalign=False):
    """The fused mixer forward and backward through the emulated kernels, and in float64.

    Parameters are fp32 (the CUDA op rounds the bank and the gate linear to the activation dtype;
    the reference gets them rounded the same way). Returns ((out, lse, z, g, grads...), refs).
    """
    b_, n, d, s, k = shape
    mag = min(0.5, d**-0.25)
    h = gen((b_, n, d), dtype, seed, mag)
    cw = gen((d, k), torch.float32, seed + 1, 0.5)
    cb = gen((d,), torch.float32, seed + 2, 0.1)
    m = gen((s, d), torch.float32, seed + 3, mag)
    gw = gen((2 * d, d), torch.float32, seed + 4, d**-0.5)
    gb = gen((2 * d,), torch.float32, seed + 5, 0.1)
    df = gen((b_, n, d), dtype, seed + 6)
    leaves = [t.double().requires_grad_() for t in (h, cw, cb, m.to(dtype), gw.to(dtype), gb.to(dtype))]
    out_ref = reference.gam_mixer(*leaves, scale)
    out_ref.backward(df.double())
    hd, _, _, md, gwd, gbd = (t.detach() for t in leaves)
    refs = dict(
        out=out_ref.detach(),
        lse=torch.logsumexp(scale * hd @ md.t(), dim=-1),
        z=torch.nn.functional.linear(hd, gwd, gbd),
        g=reference.memory_retrieval(hd, md, scale),
        grads=[t.grad for t in leaves],
    )
    args = [misaligned(t) if misalign else t for t in (h, df)]
    out, lse, z, g = emu.gam_mixer_fwd(args[0], cw, cb, m, gw, gb, scale)
    grads = emu.gam_mixer_bwd(args[1], args[0], cw, cb, m, gw, lse, z, g, scale)
    return dict(out=out, lse=lse, z=z, g=g, grads=list(grads)), refs


def check_mixer(ours, refs, dtype, shape):
    b_, n, d, s, k = shape
    rows = b_ * n
    assert ours["out"].dtype == dtype and ours["out"].shape == (b_, n, d)
    assert ours["lse"].dtype == torch.float32 and ours["lse"].shape == (b_, n)
    assert ours["z"].shape == (b_, n, 2 * d) and ours["g"].shape == (b_, n, d)
    for name in ("out", "lse", "z", "g"):
        close(ours[name], refs[name], dtype)
    dh, dcw, dcb, dm, dgw, dgb = ours["grads"]
    dh_ref, dcw_ref, dcb_ref, dm_ref, dgw_ref, dgb_ref = refs["grads"]
    assert dh.dtype == dtype and all(t.dtype == torch.float32 for t in (dcw, dcb, dm, dgw, dgb))
    assert (dcw.shape, dm.shape, dgw.shape, dgb.shape) == ((d, k), (s, d), (2 * d, d), (2 * d,))
    close(dh, dh_ref, dtype)
    # Parameter gradients sum B*N rows in fp32 (of terms rounded to the activation dtype).
    rows_scale = max(1.0, rows**0.5)
    close(dcw, dcw_ref, dtype, scale=rows_scale)
    close(dcb, dcb_ref, dtype, scale=rows_scale)
    close(dm, dm_ref, dtype, scale=max(1.0, (rows / 16) ** 0.5))
    close(dgw, dgw_ref, dtype, scale=rows_scale)
    close(dgb, dgb_ref, dtype, scale=rows_scale)


MIXER_SHAPES = [
    # (B, N, D, S, K): K = 1..8 and K > N; S = 1 (p = 1, G = M); D odd and not a multiple of 8
    # (scalar epilogue and prologue), D > 128 (two column chunks of the tensor-core forward);
    # rows across the 16-, 32- and 64-row retrieval tiles, sequences starting inside a row tile
    # (the conv's halo rows from the tile or from global memory) and the 128-row dM split.
    (1, 1, 8, 1, 1),
    (2, 3, 5, 7, 8),
    (1, 67, 24, 33, 3),
    (2, 37, 40, 45, 4),
    (1, 131, 16, 17, 2),
    (1, 9, 136, 20, 5),
    (3, 11, 13, 6, 6),
    (2, 21, 64, 1, 7),
]


def _mixer_path_expected(path, dtype):
    return "gemm" if path == "gemm" else "mma" if path == "fused" and dtype != torch.float32 else "simt"


@pytest.mark.parametrize("path", ["fused", "simt", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MIXER_SHAPES, ids=lambda s: "B{}N{}D{}S{}K{}".format(*s))
def test_mixer(emu, dtype, shape, path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    b_, n, d, s, k = shape
    kind = emu.retrieval_path(s, d, str(dtype).split(".")[1])
    expected = _mixer_path_expected(path, dtype)
    assert kind[0] == path and kind[1].startswith(expected), kind
    ours, refs = run_mixer(emu, dtype, shape, seed=sum(shape))
    check_mixer(ours, refs, dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(DEVICES))
@pytest.mark.parametrize("d", [40, 200, 1000])
def test_mixer_every_device_configuration(emu, device, name, d, dtype):
    # The fused retrieval kernels in every configuration class the dispatcher picks for sm_75 ..
    # sm_90 (sm_75 bf16: SIMT), with the mixer's epilogue kernel after the forward and its
    # prologue before the backward.
    device(name)
    shape = (2, 37, d, 45, 4)
    ours, refs = run_mixer(emu, dtype, shape, seed=d)
    check_mixer(ours, refs, dtype, shape)


@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixer_scalar_paths(emu, dtype, path, monkeypatch):
    # Misaligned h and grad_out (D a multiple of 8): the scalar epilogue and prologue.
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    shape = (2, 19, 16, 9, 3)
    ours, refs = run_mixer(emu, dtype, shape, seed=80, misalign=True)
    check_mixer(ours, refs, dtype, shape)


@pytest.mark.parametrize("misalign", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixer_forward_bitwise_as_three_ops(emu, dtype, k, misalign):
    # The epilogue (the prefetching span for K = 2..4, conv_span's for any other K) sums the conv
    # in conv_fwd_kernel's order and rounds it as the three-op path stores it, so out has the bits
    # of gate_fusion(conv(h), G, z) on the same G and z. 77 rows: spans that start past the
    # sequence's first row (halo from memory) and end short of 32 rows.
    b_, n, d, s = 2, 77, 24, 9
    h = gen((b_, n, d), dtype, 300 + k, 0.5)
    cw = gen((d, k), torch.float32, 301, 0.5)
    cb = gen((d,), torch.float32, 302, 0.1)
    m = gen((s, d), torch.float32, 303, 0.5)
    gw = gen((2 * d, d), torch.float32, 304, d**-0.5)
    x = misaligned(h) if misalign else h
    out, _, z, g = emu.gam_mixer_fwd(x, cw, cb, m, gw, None, 0.7)
    local = emu.causal_conv1d_fwd(x, cw, cb)
    assert torch.equal(out, emu.gate_fusion_fwd(local, g, z))


@pytest.mark.parametrize("path", ["fused", "simt", "gemm"])
def test_mixer_empty_no_bias_and_deterministic(emu, path, monkeypatch):
    monkeypatch.setenv("GAM_EXT_RETRIEVAL", path)
    d, s, k = 8, 5, 3
    cw, m = gen((d, k), torch.float32, 90), gen((s, d), torch.float32, 91)
    gw = gen((2 * d, d), torch.float32, 92, 0.3)
    for b_, n in ((0, 4), (2, 0)):
        h = torch.zeros(b_, n, d, dtype=torch.bfloat16)
        out, lse, z, g = emu.gam_mixer_fwd(h, cw, None, m, gw, None, 1.0)
        assert out.shape == h.shape and lse.shape == (b_, n) and z.shape == (b_, n, 2 * d)
        grads = emu.gam_mixer_bwd(h, h, cw, None, m, gw, lse, z, g, 1.0)
        assert grads[0].shape == h.shape
        assert all(torch.all(t == 0) for t in grads[1:])
        assert [tuple(t.shape) for t in grads[1:]] == [(d, k), (d,), (s, d), (2 * d, d), (2 * d,)]
    # Without biases, 300 rows (several conv blocks and dM row splits): bitwise repeatable.
    h = gen((2, 150, d), torch.bfloat16, 93, 0.5)
    df = gen((2, 150, d), torch.bfloat16, 94)
    fwd = emu.gam_mixer_fwd(h, cw, None, m, gw, None, 0.9)
    assert torch.equal(fwd[0], emu.gam_mixer_fwd(h, cw, None, m, gw, None, 0.9)[0])
    first = emu.gam_mixer_bwd(df, h, cw, None, m, gw, *fwd[1:], 0.9)
    second = emu.gam_mixer_bwd(df, h, cw, None, m, gw, *fwd[1:], 0.9)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    leaves = [t.double().requires_grad_() for t in (h, cw, m.bfloat16(), gw.bfloat16())]
    out_ref = reference.gam_mixer(leaves[0], leaves[1], None, leaves[2], leaves[3], None, 0.9)
    out_ref.backward(df.double())
    close(fwd[0], out_ref.detach(), torch.bfloat16)
    # The op returns the conv bias's gradient (sum of dL over rows) with or without a bias.
    close(
        first[2],
        (torch.sigmoid(fwd[2][..., :d].double()) * df.double()).sum((0, 1)),
        torch.bfloat16,
        scale=300**0.5,
    )
    close(first[0], leaves[0].grad, torch.bfloat16)
    close(first[3], leaves[2].grad, torch.bfloat16, scale=(300 / 16) ** 0.5)


def test_mixer_bad_input(emu):
    h = gen((1, 4, 8), torch.float32, 95)
    cw, m, gw = torch.zeros(8, 3), torch.zeros(5, 8), torch.zeros(16, 8)
    with pytest.raises(RuntimeError, match="gate_weight must have shape"):
        emu.gam_mixer_fwd(h, cw, None, m, gw[:, :4], None, 1.0)
    with pytest.raises(RuntimeError, match="conv_weight has 4 channels"):
        emu.gam_mixer_fwd(h, cw[:4], None, m, gw, None, 1.0)
    with pytest.raises(RuntimeError, match="h must be float16, bfloat16 or float32"):
        emu.gam_mixer_fwd(h.double(), cw, None, m, gw, None, 1.0)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        emu.gam_mixer_bwd(h, h, cw, None, m, gw, torch.zeros(4), torch.zeros(1, 4, 16), h, 1.0)


# --------------------------------------------------------------------------------------------
# The one-token step (csrc/cuda/gam_step.cu): causal_conv1d_update and gam_mixer_step
# --------------------------------------------------------------------------------------------

# (B, L, D, K, W): K = 1 (no state) .. 5, W > K-1, L > W, D odd and across the 128-channel blocks.
UPDATE_SHAPES = [
    (1, 1, 1, 1, 0),
    (2, 1, 5, 2, 1),
    (3, 1, 13, 4, 3),
    (2, 4, 9, 3, 6),
    (2, 7, 17, 5, 4),
    (1, 2, 130, 3, 2),
]


def _positions(b, circular):
    # Per-sequence positions: 0, below K-1 and far past it (masking and wrap-around).
    return torch.tensor([0, 1, 37][:b], dtype=torch.int32) if circular else None


@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: "B{}L{}D{}K{}W{}".format(*s))
def test_conv_update(emu, dtype, shape, circular):
    b_, n, d, k, width = shape
    x = gen((b_, n, d), dtype, 100)
    w, bias = gen((d, k), torch.float32, 101, 0.5), gen((d,), torch.float32, 102)
    state = gen((b_, width, d), dtype, 103)
    pos = _positions(b_, circular)
    ref_state = state.double()
    y_ref = reference.causal_conv1d_update(x.double(), ref_state, w.double(), bias.double(), pos)
    ours_state = state.clone()
    y = emu.causal_conv1d_update(x, ours_state, w, bias, pos)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, y_ref, dtype)
    assert torch.equal(ours_state, ref_state.to(dtype))
    # The CPU kernel agrees.
    cpu_state = state.clone()
    close(y, torch.ops.gam_ext.causal_conv1d_update(x, cpu_state, w, bias, pos), dtype)
    assert torch.equal(cpu_state, ours_state)


# (B, D, S, K): S = 1, S across the 32-slot splits, D odd, < 32 lanes, across 128-channel blocks.
STEP_SHAPES = [(1, 8, 1, 3), (2, 5, 3, 1), (3, 13, 33, 4), (1, 130, 70, 3), (2, 40, 64, 2), (1, 264, 97, 5)]


@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "B{}D{}S{}K{}".format(*s))
def test_mixer_step(emu, dtype, shape, circular):
    b_, d, s, k = shape
    h = gen((b_, d), dtype, 110)
    state = gen((b_, k, d), dtype, 111)
    w, bias = gen((d, k), torch.float32, 112, 0.5), gen((d,), torch.float32, 113)
    m = gen((s, d), torch.float32, 114, d**-0.25)  # fp32 bank with half activations
    z = gen((b_, 2 * d), dtype, 115, 2.0)
    pos = _positions(b_, circular)
    # Reference in float64 with the bank rounded to the activation dtype (the one rule), and the
    # given gate logits as the gates' input.
    ref_state = state.double()
    x = h.double().unsqueeze(1)
    local = reference.causal_conv1d_update(x, ref_state, w.double(), bias.double(), pos)
    glob = reference.memory_retrieval(x, m.to(dtype).double(), 0.8)
    f_ref = reference.gate_fusion(local, glob, z.double().unsqueeze(1)).squeeze(1)
    ours_state = state.clone()
    f = emu.gam_mixer_step(h, ours_state, w, bias, m, z, pos, 0.8)
    assert f.dtype == dtype and f.shape == h.shape
    close(f, f_ref, dtype)
    assert torch.equal(ours_state, ref_state.to(dtype))
    cpu_state = state.clone()
    close(f, torch.ops.gam_ext.gam_mixer_step(h, cpu_state, w, bias, m, z, pos, 0.8), dtype)
    assert torch.equal(cpu_state, ours_state)


def test_step_layouts_empty_deterministic_and_errors(emu):
    h = gen((3, 40), torch.float32, 120)
    ht = h.t().contiguous().t()  # non-contiguous (B, D)
    assert not ht.is_contiguous()
    state = gen((3, 2, 40), torch.float32, 121)
    w, m, z = (
        gen((40, 3), torch.float32, 122),
        gen((100, 40), torch.float32, 123),
        gen((3, 80), torch.float32, 124),
    )
    pos64 = torch.tensor([0, 3, 8])
    s1, s2, s3 = state.clone(), state.clone(), state.clone()
    f1 = emu.gam_mixer_step(h, s1, w, None, m, z, pos64, 1.0)
    f2 = emu.gam_mixer_step(ht, s2, w, None, m, z, pos64.int(), 1.0)
    f3 = emu.gam_mixer_step(h, s3, w, None, m, z, pos64, 1.0)
    assert torch.equal(f1, f2) and torch.equal(s1, s2)  # int64 positions, strided h
    assert torch.equal(f1, f3) and torch.equal(s1, s3)  # bitwise repeatable
    empty = torch.zeros(0, 40)
    assert emu.gam_mixer_step(
        empty, torch.zeros(0, 2, 40), w, None, m, torch.zeros(0, 80), None, 1.0
    ).shape == (0, 40)
    x0 = torch.zeros(0, 2, 40)
    assert emu.causal_conv1d_update(x0, torch.zeros(0, 2, 40), w, None, None).shape == x0.shape
    with pytest.raises(RuntimeError, match="conv_state must have the dtype of h"):
        emu.gam_mixer_step(h, state.half(), w, None, m, z, None, 1.0)
    with pytest.raises(RuntimeError, match="h must be float16, bfloat16 or float32"):
        emu.gam_mixer_step(h.double(), state.double(), w, None, m, z.double(), None, 1.0)
    with pytest.raises(RuntimeError, match="at least K-1 = 2 rows"):
        emu.causal_conv1d_update(h.unsqueeze(1), state[:, :1].contiguous(), w, None, None)
    with pytest.raises(RuntimeError, match=r"cache_seqlens must have shape \(B,\)"):
        emu.causal_conv1d_update(h.unsqueeze(1), state, w, None, pos64[:2])


@contextlib.contextmanager
def cpu_ops_shadowed(impls):
    """The CPU implementations of the named gam_ext ops replaced by impls (name -> function) for
    the duration: a fresh registration shadows the C++ one, and destroying it restores that."""
    lib = torch.library.Library("gam_ext", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name, impl in impls.items():
                lib.impl(name, impl, "CPU")
        yield
    finally:
        lib._destroy()


def test_greedy_generation_on_the_emulated_kernels(emu):
    # GAMModel's ops on the CUDA kernels: the CPU implementations of the ops it calls are
    # overridden by the emulated kernels for the duration of the test (a fresh registration
    # shadows the C++ one; destroying it restores that). Greedy generation with the step must
    # give generate_tokens' tokens (the full recompute, on the same kernels), for prompts shorter
    # and longer than block_size, and the step logits the full forward's.
    import gam_ext
    from gam_ext.modules import generate_tokens

    names = ("causal_conv1d_fwd", "memory_retrieval_fwd", "gate_fusion_fwd", "gam_mixer_step")
    calls = dict.fromkeys(names, 0)

    def counted(name):
        def kernel(*args):
            calls[name] += 1
            return getattr(emu, name)(*args)

        return kernel

    torch.manual_seed(0)
    model = gam_ext.GAMModel(
        gam_ext.GAMConfig(
            vocab_size=37,
            block_size=10,
            d_model=20,
            n_layer=2,
            num_memory_slots=9,
            conv_kernel_size=3,
            dropout=0.0,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    with cpu_ops_shadowed({name: counted(name) for name in names}):
        for n_prompt in (3, 14):
            prompt = torch.randint(0, 37, (2, n_prompt), generator=g)
            ours = model.generate(prompt, 12, greedy=True)
            assert torch.equal(ours, generate_tokens(model, prompt, 12, 10, greedy=True))
        idx = torch.randint(0, 37, (2, 10), generator=g)
        state = model.allocate_state(2)
        logits = [model.prefill(idx[:, :2], state)]
        logits += [model.step(idx[:, t], state) for t in range(2, 10)]
        with torch.no_grad():
            full = model(idx)[0][:, 1:]
        close(torch.stack(logits, 1), full, torch.float32)
    assert all(calls.values()), calls  # every op ran on the emulated kernels
    before = dict(calls)
    model.generate(idx[:, :3], 2, greedy=True)  # the C++ kernels again
    assert calls == before


def test_gpu_check_smoke_children_on_the_emulated_kernels(emu, use_backend, restore_environ):
    # scripts/cuda_smoke.py's children (the smoke stage of scripts/gpu_check.sh) with the CPU
    # implementations of the ops they call shadowed by the emulated CUDA kernels, as in the test
    # above: each path's cases pass on the kernels a GPU check would run, and the environment
    # each child sets reaches the dispatcher (wgmma-backward: the gemm path's forward, then the
    # wgmma backward on what it saved).
    import os

    import cuda_smoke as smoke  # scripts/, on the path through conftest.py

    ran = []

    def shadow(name):
        def kernel(*args):
            if name.startswith("memory_retrieval"):
                h, m = args[:2] if name.endswith("fwd") else args[1:3]
                words = emu.retrieval_path(m.shape[0], m.shape[1], str(h.dtype).split(".")[1])
                ran.append(words[1] if name.endswith("fwd") else words[2])
            else:
                ran.append(name)
            return getattr(emu, name)(*args)

        return kernel

    names = ("memory_retrieval_fwd", "memory_retrieval_bwd", "gam_mixer_fwd", "gam_mixer_bwd")
    runs = {}
    with cpu_ops_shadowed({name: shadow(name) for name in names}):
        for child in smoke.PATH_ENV:
            for k in smoke.KERNEL_VARIABLES:
                os.environ.pop(k, None)
            use_backend("auto")
            ran.clear()
            assert smoke.child(child, device="cpu", shapes=[(1, 5, 13, 128)]) == 0, child
            runs[child] = list(ran)
    for forward, kernel in wgmma_cases.FORWARD_KERNELS.items():
        assert runs[f"wgmma-{forward}"] and all(
            r.startswith(f"wgmma: {kernel}<") for r in runs[f"wgmma-{forward}"]
        )
    forwards, backwards = runs["wgmma-backward"][0::2], runs["wgmma-backward"][1::2]
    assert all(f.startswith("gemm:") for f in forwards) and all(b.startswith("wgmma:") for b in backwards)
    assert all(r.startswith("gemm:") for r in runs["gemm"]) and not any("wgmma" in r for r in runs["fused"])
    assert set(runs["mixer"]) == {"gam_mixer_fwd", "gam_mixer_bwd"}
