"""The C++ CPU kernels of the three ops and the fused mixer, forward and backward, against the
float64 reference.

Every case runs through the public functions (gam_ext.causal_conv1d / memory_retrieval /
gate_fusion / gam_mixer, the last on the fused op gam_mixer_fwd / _bwd) and torch.autograd, on the
shape classes of docs/design.md ("Shapes the tests cover"): N = 1, 2, primes, lengths across the
kernels' row blocks (64 rows), dw/dbias chunks (32 rows), backward tiles (256 rows) and slot chunks
(512 slots); D odd and not a multiple of 8; S = 1 and odd; K = 1..8 and K > N; non-contiguous
inputs; empty batches; fp32 parameters with half activations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tolerances import TOL

import gam_ext
from gam_ext import reference

pytestmark = pytest.mark.skipif(
    gam_ext.backend_info()["extension"] is None, reason="the compiled extension is not built"
)

OPS = ("causal_conv1d", "memory_retrieval", "gate_fusion", "gam_mixer")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _kernels_on():
    previous = gam_ext.set_backend("auto")
    yield
    gam_ext.set_backend(previous)


def test_kernel_path_is_used():
    info = gam_ext.backend_info()
    for op in OPS:
        assert info["ops"]["cpu"][op] == "kernel", info


def _rand(*shape, dtype=torch.float32, scale=1.0, noncontig=False, gen=None):
    if noncontig:
        # The same values laid out with the last two dims swapped, then viewed back.
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen) * scale
        return t.to(dtype).transpose(-1, -2)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _fwd_bwd(fn, inputs, grad_out):
    """Output and grads of every floating input that requires grad."""
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*leaves)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), grads


def _as64(inputs):
    return [t.detach().double() if isinstance(t, torch.Tensor) else t for t in inputs]


def _assert_close(name, ours, ref64, eager, dtype):
    """Within the dtype's tolerance, or within twice the error of eager in that dtype (docs/design.md)."""
    assert ours.shape == ref64.shape, (name, ours.shape, ref64.shape)
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    diff = (ours.double() - ref64).abs()
    ok = diff <= atol + rtol * ref64.abs()
    if eager is not None:
        ok |= diff <= 2 * (eager.double() - ref64).abs() + 1e-5
    if not bool(ok.all()):
        worst = int(torch.argmax(diff - atol - rtol * ref64.abs()))
        raise AssertionError(
            f"{name}: {int((~ok).sum())}/{ok.numel()} elements off; worst at flat index {worst}: "
            f"ours {ours.flatten()[worst].item()} ref64 {ref64.flatten()[worst].item()} "
            f"max|diff| {diff.max().item():.3g}"
        )


def _check_op(name, fn, ref_fn, inputs, dtype, gen, eager_budget=True):
    """Forward and every gradient of fn (kernel) against ref_fn in float64 (and in dtype)."""
    with torch.no_grad():
        probe = ref_fn(*_as64(inputs))
    grad_out = torch.randn(probe.shape, generator=gen, dtype=torch.float64)
    out, grads = _fwd_bwd(fn, inputs, grad_out)
    ref_out, ref_grads = _fwd_bwd(ref_fn, _as64(inputs), grad_out)
    eager_out, eager_grads = (None, [None] * len(grads))
    if eager_budget and dtype in (torch.float16, torch.bfloat16):
        eager_out, eager_grads = _fwd_bwd(ref_fn, inputs, grad_out)
    assert out.dtype == inputs[0].dtype
    _assert_close(f"{name} forward", out, ref_out, eager_out, dtype)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    for i, (g, rg, eg, t) in enumerate(zip(grads, ref_grads, eager_grads, tensors, strict=True)):
        assert g is not None and g.dtype == t.dtype, (name, i, None if g is None else g.dtype)
        _assert_close(f"{name} grad of input {i}", g, rg, eg, dtype)


# --------------------------------------------------------------------------------------------
# Causal conv
# --------------------------------------------------------------------------------------------

CONV_SHAPES = [
    # (B, N, D, K)
    (1, 1, 1, 1),
    (2, 1, 5, 4),  # K > N
    (2, 2, 3, 3),
    (1, 3, 8, 8),  # K > N
    (3, 7, 13, 2),
    (2, 13, 17, 5),
    (1, 64, 9, 3),  # one full row block
    (2, 67, 33, 6),  # rows cross the 64-row blocks and 32-row dw chunks
    (3, 97, 11, 7),
    (1, 31, 4, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "B{}N{}D{}K{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_causal_conv1d(dtype, shape, bias):
    b, n, d, k = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x = _rand(b, n, d, dtype=dtype, gen=gen)
    w = _rand(d, 1, k, dtype=dtype, scale=0.5, gen=gen)
    inputs = [x, w] + ([_rand(d, dtype=dtype, gen=gen)] if bias else [])
    _check_op("conv", gam_ext.causal_conv1d, reference.causal_conv1d, inputs, dtype, gen)


@pytest.mark.parametrize("k", range(1, 9))
def test_causal_conv1d_every_k(k):
    gen = torch.Generator().manual_seed(k)
    inputs = [_rand(2, 5, 7, gen=gen), _rand(7, k, gen=gen), _rand(7, gen=gen)]  # (D, K) weight
    _check_op("conv", gam_ext.causal_conv1d, reference.causal_conv1d, inputs, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_causal_conv1d_fp32_params_half_activations(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _rand(2, 41, 12, dtype=dtype, gen=gen)
    w, b = _rand(12, 1, 3, scale=0.5, gen=gen), _rand(12, gen=gen)
    y, (dx, dw, db) = _fwd_bwd(gam_ext.causal_conv1d, [x, w, b], torch.ones(2, 41, 12))
    assert y.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    _check_op("conv mixed", gam_ext.causal_conv1d, reference.causal_conv1d, [x, w, b], dtype, gen)


def test_causal_conv1d_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    x = _rand(2, 19, 6, noncontig=True, gen=gen)
    w = _rand(3, 6, gen=gen).t()  # a (D, K) transposed view
    b = _rand(12, gen=gen)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    _check_op("conv noncontig", gam_ext.causal_conv1d, reference.causal_conv1d, [x, w, b], torch.float32, gen)


# --------------------------------------------------------------------------------------------
# Memory retrieval
# --------------------------------------------------------------------------------------------

MEM_SHAPES = [
    # (B, N, D, S)
    (1, 1, 1, 1),
    (2, 1, 3, 1),  # S = 1: p = 1, out = M
    (1, 2, 5, 3),
    (2, 7, 17, 13),
    (3, 13, 9, 64),
    (1, 67, 33, 31),  # rows cross the 64-row forward blocks
    (2, 131, 12, 45),  # 262 rows: cross the 256-row backward tile
    (1, 37, 8, 515),  # slots cross the 512-slot chunk: online softmax
    (3, 97, 6, 1031),  # both: several tiles and three slot chunks
    (1, 20, 72, 70),  # D and S across the 64-column panels of the bf16 products
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MEM_SHAPES, ids=lambda s: "B{}N{}D{}S{}".format(*s))
def test_memory_retrieval(dtype, shape):
    b, n, d, s = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    h = _rand(b, n, d, dtype=dtype, gen=gen)
    m = _rand(s, d, dtype=dtype, scale=0.7, gen=gen)
    _check_op("memory", gam_ext.memory_retrieval, reference.memory_retrieval, [h, m], dtype, gen)


@pytest.mark.parametrize("scale", [0.125, 1.0, 2.5])
def test_memory_retrieval_scale_and_lse(scale):
    gen = torch.Generator().manual_seed(3)
    h, m = _rand(2, 9, 10, gen=gen), _rand(21, 10, gen=gen)
    inputs = [h, m, scale]
    _check_op(
        "memory scale", gam_ext.memory_retrieval, reference.memory_retrieval, inputs, torch.float32, gen
    )
    out, lse = torch.ops.gam_ext.memory_retrieval_fwd(h, m, scale)
    assert lse.dtype == torch.float32 and lse.shape == (2, 9)
    torch.testing.assert_close(
        lse, torch.logsumexp(scale * h.double() @ m.double().t(), -1).float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_memory_retrieval_fp32_memory_half_activations(dtype):
    gen = torch.Generator().manual_seed(4)
    h, m = _rand(2, 70, 16, dtype=dtype, gen=gen), _rand(40, 16, scale=0.5, gen=gen)
    g, (dh, dm) = _fwd_bwd(gam_ext.memory_retrieval, [h, m], torch.ones(2, 70, 16))
    assert g.dtype == dtype and dh.dtype == dtype and dm.dtype == torch.float32
    _check_op("memory mixed", gam_ext.memory_retrieval, reference.memory_retrieval, [h, m], dtype, gen)


def test_memory_retrieval_noncontiguous():
    gen = torch.Generator().manual_seed(5)
    h = _rand(3, 11, 7, noncontig=True, gen=gen)
    m = _rand(7, 29, gen=gen).t()
    assert not h.is_contiguous() and not m.is_contiguous()
    _check_op(
        "memory noncontig", gam_ext.memory_retrieval, reference.memory_retrieval, [h, m], torch.float32, gen
    )


def test_memory_retrieval_large_scores_are_stable():
    # Scores in the hundreds: the online softmax must not overflow.
    gen = torch.Generator().manual_seed(6)
    h, m = _rand(1, 5, 8, scale=10.0, gen=gen), _rand(600, 8, scale=3.0, gen=gen)
    _check_op(
        "memory large", gam_ext.memory_retrieval, reference.memory_retrieval, [h, m], torch.float32, gen
    )


# dh and dM bounds on peaked rows, per dtype (a row's slots fit one 512-slot chunk). Max errors
# of the retrieval op / the fused mixer at the shape below, dh then dM, when the kernels took
# delta = rowsum(dG G) from the stored G and p unrenormalised, and now (this CPU's best build):
#   fp32 3.2e-5 2.7e-5 / 4.0e-5 3.4e-5 -> 5.6e-6 4.6e-6 / 3.3e-6 2.8e-6
#   fp16 7.7e-3 8.3e-3 / 3.7e-3 2.9e-3 -> 7.7e-5 1.7e-3 / 7.4e-4 1.7e-3
#   bf16 7.3e-2 6.9e-2 / 6.3e-2 4.4e-2 -> 7.1e-4 1.9e-2 / 1.0e-2 1.5e-2
# (the rest of the fp16 / bf16 error being the rounding of the outputs and of the bf16 operands).
PEAKED_BOUNDS = {
    torch.float32: (1.5e-5, 1.5e-5),
    torch.float16: (1e-3, 2.5e-3),
    torch.bfloat16: (2e-2, 3e-2),
}


@pytest.mark.parametrize("dtype", list(PEAKED_BOUNDS), ids=str)
@pytest.mark.parametrize("op", ["retrieval", "mixer"])
def test_backward_on_peaked_rows(dtype, op):
    """h and M of unit scale at D = 192, S = 500: scores about 14 apart, one slot holds nearly
    all of each row's p, where dp of that slot and delta = rowsum(p dp) nearly cancel; delta from
    the stored (rounded) G, or p off by lse's fp32 rounding, lose the cancellation
    (retrieval_tiles.h, scores_to_grads). The fused mixer's retrieval takes the same path."""

    def seeded(shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    b, n, s, d = 2, 2, 500, 192
    h, m, grad_out = seeded((b, n, d), 84).to(dtype), seeded((s, d), 85).to(dtype), seeded((b, n, d), 86)
    if op == "retrieval":
        inputs, fn, ref_fn = [h, m], gam_ext.memory_retrieval, reference.memory_retrieval
    else:
        inputs = _mixer_inputs(b, n, d, s, 3, dtype, torch.Generator().manual_seed(87))
        inputs[0], inputs[3] = h, m
        fn, ref_fn = _fused_mixer, reference.gam_mixer
    _, grads = _fwd_bwd(fn, inputs, grad_out)
    _, ref_grads = _fwd_bwd(ref_fn, _as64(inputs), grad_out)
    index_m = 1 if op == "retrieval" else 3
    dh_bound, dm_bound = PEAKED_BOUNDS[dtype]
    dh_err = (grads[0].double() - ref_grads[0]).abs().max().item()
    dm_err = (grads[index_m].double() - ref_grads[index_m]).abs().max().item()
    assert dh_err <= dh_bound and dm_err <= dm_bound, (dh_err, dm_err)


# --------------------------------------------------------------------------------------------
# Gate fusion
# --------------------------------------------------------------------------------------------

GATE_SHAPES = [(1, 1, 1), (2, 2, 3), (1, 13, 7), (3, 37, 33), (2, 65, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "B{}N{}D{}".format(*s))
def test_gate_fusion(dtype, shape):
    b, n, d = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    inputs = [
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(b, n, 2 * d, dtype=dtype, scale=3.0, gen=gen),
    ]
    _check_op("gate", gam_ext.gate_fusion, reference.gate_fusion, inputs, dtype, gen)


def test_gate_fusion_noncontiguous_and_saturated():
    gen = torch.Generator().manual_seed(7)
    local = _rand(2, 9, 5, noncontig=True, gen=gen)
    glob = _rand(2, 9, 10, gen=gen)[..., ::2]
    logits = _rand(2, 9, 10, scale=40.0, noncontig=True, gen=gen)  # sigmoids saturate
    _check_op(
        "gate noncontig",
        gam_ext.gate_fusion,
        reference.gate_fusion,
        [local, glob, logits],
        torch.float32,
        gen,
    )


# --------------------------------------------------------------------------------------------
# The whole mixer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fp32_params", [False, True], ids=["params_same", "params_fp32"])
def test_gam_mixer(dtype, fp32_params):
    if fp32_params and dtype in (torch.float32, torch.float64):
        pytest.skip("same as params_same")
    gen = torch.Generator().manual_seed(10)
    b, n, d, s, k = 2, 37, 12, 19, 3
    pdtype = torch.float32 if fp32_params else dtype
    inputs = [
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(d, 1, k, dtype=pdtype, scale=0.5, gen=gen),
        _rand(d, dtype=pdtype, scale=0.1, gen=gen),
        _rand(s, d, dtype=pdtype, scale=0.4, gen=gen),
        _rand(2 * d, d, dtype=pdtype, scale=0.3, gen=gen),
        _rand(2 * d, dtype=pdtype, scale=0.1, gen=gen),
    ]
    # The reference's F.linear does not take fp32 weights with half h: no eager error budget there.
    _check_op(
        "mixer", gam_ext.gam_mixer, reference.gam_mixer, inputs, dtype, gen, eager_budget=not fp32_params
    )


MIXER_SHAPES = [
    # (B, N, D, S, K)
    (1, 1, 1, 1, 1),
    (2, 1, 5, 3, 4),  # K > N
    (1, 3, 8, 8, 8),  # K > N, K = 8
    (2, 13, 17, 1, 5),  # S = 1: p = 1, G = M
    (1, 67, 33, 31, 3),
    (1, 300, 20, 40, 2),  # one sequence across the 256-row forward block and backward tile and
    #                       the 128-row backward sub-blocks: conv halos cross them
    (2, 131, 12, 45, 6),  # 262 rows: a second block and tile starting mid-sequence
    (1, 37, 8, 515, 2),  # slots cross the 512-slot chunk: online softmax, two dM chunks
    (3, 97, 6, 1031, 7),  # several tiles and three slot chunks
    (1, 75, 72, 70, 3),  # D, 2D and S across the 64-column panels of the bf16 products
]


def _mixer_inputs(b, n, d, s, k, dtype, gen, pdtype=None, bias=True):
    pdtype = dtype if pdtype is None else pdtype
    return [
        _rand(b, n, d, dtype=dtype, gen=gen),
        _rand(d, 1, k, dtype=pdtype, scale=0.5, gen=gen),
        _rand(d, dtype=pdtype, scale=0.1, gen=gen) if bias else None,
        _rand(s, d, dtype=pdtype, scale=0.4, gen=gen),
        _rand(2 * d, d, dtype=pdtype, scale=0.3, gen=gen),
        _rand(2 * d, dtype=pdtype, scale=0.1, gen=gen) if bias else None,
    ]


def _fused_mixer(*args):
    """gam_ext.gam_mixer, asserting that it runs the fused op."""
    assert gam_ext.backend_info()["mixer"]["cpu"] == "fused"
    return gam_ext.gam_mixer(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MIXER_SHAPES, ids=lambda s: "B{}N{}D{}S{}K{}".format(*s))
def test_fused_mixer(dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    inputs = _mixer_inputs(*shape, dtype, gen)
    _check_op("fused mixer", _fused_mixer, reference.gam_mixer, inputs, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_mixer_without_biases_scale_and_noncontiguous(dtype):
    gen = torch.Generator().manual_seed(11)
    h = _rand(2, 29, 10, dtype=dtype, noncontig=True, gen=gen)
    _, cw, _, m, gw, _ = _mixer_inputs(2, 29, 10, 23, 3, dtype, gen, bias=False)
    m = m.t().contiguous().t()
    assert not h.is_contiguous() and not m.is_contiguous()
    fn = lambda h, cw, m, gw: _fused_mixer(h, cw, None, m, gw, None, 0.6)  # noqa: E731
    ref = lambda h, cw, m, gw: reference.gam_mixer(h, cw, None, m, gw, None, 0.6)  # noqa: E731
    _check_op("fused mixer nobias", fn, ref, [h, cw, m, gw], dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_mixer_matches_unfused(dtype):
    gen = torch.Generator().manual_seed(12)
    inputs = _mixer_inputs(2, 70, 24, 33, 3, dtype, gen, pdtype=torch.float32)
    grad_out = torch.randn(2, 70, 24, generator=gen)
    fused, fused_grads = _fwd_bwd(_fused_mixer, inputs, grad_out)
    previous = gam_ext.set_backend("unfused")
    try:
        assert gam_ext.backend_info()["mixer"]["cpu"] == "unfused"
        unfused, unfused_grads = _fwd_bwd(gam_ext.gam_mixer, inputs, grad_out)
    finally:
        gam_ext.set_backend(previous)
    # The two differ by rounding only (the unfused path rounds conv(h) to the activation dtype).
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused, unfused, **tol)
    for a, b in zip(fused_grads, unfused_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


# --------------------------------------------------------------------------------------------
# bfloat16 products: on the CPU's bf16 matrix units where torch has a micro-kernel, else fp32 tiles
# --------------------------------------------------------------------------------------------


def _cpu_has_bf16_units() -> bool:
    """Whether the CPU kernels run bf16 products on matrix units under GAM_EXT_CPU_BF16_GEMM=auto,
    whatever the variable says in the environment the suite runs in (the tests set it)."""
    saved = os.environ.pop("GAM_EXT_CPU_BF16_GEMM", None)
    try:
        return gam_ext.backend_info()["cpu_bf16_gemm"] == "bf16"
    finally:
        if saved is not None:
            os.environ["GAM_EXT_CPU_BF16_GEMM"] = saved


BF16_UNITS = _cpu_has_bf16_units()


@pytest.mark.parametrize("shape", MEM_SHAPES, ids=lambda s: "B{}N{}D{}S{}".format(*s))
def test_memory_retrieval_bf16_fp32_tiles(shape, monkeypatch):
    """The fp32-tile path of bf16 inputs (the default on CPUs without bf16 matrix units)."""
    monkeypatch.setenv("GAM_EXT_CPU_BF16_GEMM", "fp32")
    assert gam_ext.backend_info()["cpu_bf16_gemm"] == "fp32"
    test_memory_retrieval(torch.bfloat16, shape)


@pytest.mark.parametrize("shape", MIXER_SHAPES, ids=lambda s: "B{}N{}D{}S{}K{}".format(*s))
def test_fused_mixer_bf16_fp32_tiles(shape, monkeypatch):
    monkeypatch.setenv("GAM_EXT_CPU_BF16_GEMM", "fp32")
    test_fused_mixer(torch.bfloat16, shape)


@pytest.mark.skipif(not BF16_UNITS, reason="torch has no bf16 micro-kernel for this CPU")
@pytest.mark.parametrize(
    "shape",
    [
        (1, 75, 72, 70),
        (1, 300, 600, 70),  # products split in rows (256 + 44) and depth (512 + 64 + 24)
    ],
    ids=lambda s: "B{}N{}D{}S{}".format(*s),
)
def test_bf16_products_run_on_the_matrix_units(shape, monkeypatch):
    """Where torch has the micro-kernel, bf16 inputs use it by default: a path of its own (its
    operands p, scale * ds, dG and dz are rounded to bf16) whose error against float64 stays at
    the fp32 tiles' level, for the output and every gradient."""
    monkeypatch.delenv("GAM_EXT_CPU_BF16_GEMM", raising=False)  # the default, whatever the suite's
    b, n, d, s = shape
    info = gam_ext.backend_info(retrieval=(s, d, torch.bfloat16))
    assert "bf16 matrix units" in info["retrieval"]["cpu"], info
    gen = torch.Generator().manual_seed(21)
    grad_out = torch.randn(b, n, d, generator=gen)
    h = _rand(b, n, d, dtype=torch.bfloat16, scale=(16 / d) ** 0.5, gen=gen)
    m = _rand(s, d, dtype=torch.bfloat16, scale=0.7, gen=gen)
    cases = [
        (gam_ext.memory_retrieval, reference.memory_retrieval, [h, m]),
        (_fused_mixer, reference.gam_mixer, [h, *_mixer_inputs(b, n, d, s, 3, torch.bfloat16, gen)[1:]]),
    ]

    def flat(result):
        return [result[0]] + [g for g in result[1] if g is not None]

    for fn, ref_fn, inputs in cases:
        ref = flat(_fwd_bwd(ref_fn, _as64(inputs), grad_out.double()))
        units = flat(_fwd_bwd(fn, inputs, grad_out))
        monkeypatch.setenv("GAM_EXT_CPU_BF16_GEMM", "fp32")
        tiles = flat(_fwd_bwd(fn, inputs, grad_out))
        monkeypatch.delenv("GAM_EXT_CPU_BF16_GEMM")
        assert not all(torch.equal(a, t) for a, t in zip(units, tiles, strict=True)), "same path"
        for i, (a, t, r) in enumerate(zip(units, tiles, ref, strict=True)):
            err_units = float((a.double() - r).norm() / r.norm())
            err_tiles = float((t.double() - r).norm() / r.norm())
            # bf16 keeps 8 bits (relative rounding 2^-9 = 2e-3): both errors are of that order.
            assert err_units < 1e-2 and err_units < 2 * err_tiles + 1e-4, (fn, i, err_units, err_tiles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_three_op_gate_linear_precision(dtype, monkeypatch):
    """The three-op mixer's gate linear: in the activation dtype where the CPU kernels run bf16
    products on matrix units (as the fused op computes z), else in fp32 rounded once (torch's
    half GEMM on a CPU without such units is far slower than its fp32 GEMM)."""
    from gam_ext.ops import _gate_linear

    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 24, generator=gen).to(dtype)
    w, b = torch.randn(48, 24, generator=gen) / 5, torch.randn(48, generator=gen)
    in_fp32 = torch.nn.functional.linear(h.float(), w, b).to(dtype)
    in_dtype = torch.nn.functional.linear(h, w.to(dtype), b.to(dtype))
    assert not torch.equal(in_fp32, in_dtype)  # the weight's rounding shows
    for switch in ("auto", "fp32"):
        monkeypatch.setenv("GAM_EXT_CPU_BF16_GEMM", switch)
        units = dtype == torch.bfloat16 and BF16_UNITS and switch == "auto"
        assert torch.equal(_gate_linear(h, w, b), in_dtype if units else in_fp32), (switch, units)


def test_bf16_gemm_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("GAM_EXT_CPU_BF16_GEMM", "amx")
    h = torch.randn(1, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="GAM_EXT_CPU_BF16_GEMM must be auto or fp32"):
        torch.ops.gam_ext.memory_retrieval_fwd(h, torch.randn(5, 4), 1.0)


def test_fused_mixer_saves_lse_gates_and_global():
    gen = torch.Generator().manual_seed(13)
    h, cw, cb, m, gw, gb = _mixer_inputs(2, 9, 6, 11, 3, torch.float32, gen)
    out, lse, z, g = torch.ops.gam_ext.gam_mixer_fwd(h, cw[:, 0], cb, m, gw, gb, 0.7)
    torch.testing.assert_close(z, torch.nn.functional.linear(h, gw, gb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, reference.memory_retrieval(h, m, 0.7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        lse, torch.logsumexp(0.7 * h.double() @ m.double().t(), -1).float(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out, reference.gam_mixer(h, cw, cb, m, gw, gb, 0.7), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Empty batches, gradcheck, determinism, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,n", [(0, 5), (2, 0)])
def test_empty_batch(b, n):
    d = 6
    cases = [
        (gam_ext.causal_conv1d, [torch.randn(b, n, d), torch.randn(d, 3), torch.randn(d)]),
        (gam_ext.memory_retrieval, [torch.randn(b, n, d), torch.randn(4, d)]),
        (gam_ext.gate_fusion, [torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(b, n, 2 * d)]),
        (
            _fused_mixer,
            [
                torch.randn(b, n, d),
                torch.randn(d, 1, 3),
                torch.randn(d),
                torch.randn(4, d),
                torch.randn(2 * d, d),
                torch.randn(2 * d),
            ],
        ),
    ]
    for fn, inputs in cases:
        out, grads = _fwd_bwd(fn, inputs, torch.zeros(b, n, d))
        assert out.shape == (b, n, d)
        for g, t in zip(grads, inputs, strict=True):
            assert g.shape == t.shape
            assert not g.isnan().any() and (g == 0).all()


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    assert torch.autograd.gradcheck(gam_ext.causal_conv1d, (leaf(2, 6, 3), leaf(3, 1, 4), leaf(3)), atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda h, m: gam_ext.memory_retrieval(h, m, 0.8),
        (leaf(2, 5, 4), leaf(7, 4)),
        atol=1e-5,
    )
    assert torch.autograd.gradcheck(
        gam_ext.gate_fusion, (leaf(2, 3, 4), leaf(2, 3, 4), leaf(2, 3, 8, scale=2.0)), atol=1e-6
    )
    assert torch.autograd.gradcheck(
        lambda *a: _fused_mixer(*a, 0.9),
        (leaf(2, 5, 3), leaf(3, 1, 4), leaf(3), leaf(4, 3), leaf(6, 3), leaf(6)),
        atol=1e-6,
    )


def _all_outputs(dtype):
    gen = torch.Generator().manual_seed(9)
    x = _rand(3, 150, 24, dtype=dtype, gen=gen)  # 450 rows: several tiles, blocks and chunks
    w, b = _rand(24, 1, 4, gen=gen), _rand(24, gen=gen)
    m = _rand(530, 24, scale=0.5, gen=gen)  # two slot chunks
    z = _rand(3, 150, 48, dtype=dtype, gen=gen)
    go = _rand(3, 150, 24, dtype=dtype, gen=gen)
    results = []
    gw, gb = _rand(48, 24, scale=0.2, gen=gen), _rand(48, gen=gen)
    for fn, inputs in (
        (gam_ext.causal_conv1d, [x, w, b]),
        (gam_ext.memory_retrieval, [x, m]),
        (gam_ext.gate_fusion, [x, x * 0.5, z]),
        (_fused_mixer, [x, w, b, m, gw, gb]),  # 450 rows: two backward tiles, two slot chunks
    ):
        out, grads = _fwd_bwd(fn, inputs, go)
        results += [out, *grads]
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_thread_counts(dtype):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _all_outputs(dtype), _all_outputs(dtype)
        torch.set_num_threads(1)
        single = _all_outputs(dtype)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b), "two runs differ"
        assert torch.equal(a, c), "1 thread and 2 threads differ"


X = torch.randn(2, 5, 4)
W2 = torch.randn(4, 3)
M = torch.randn(6, 4)
OP = torch.ops.gam_ext


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: OP.causal_conv1d_fwd(X.long(), W2, None), "x must be float"),
        (lambda: OP.causal_conv1d_fwd(X[0], W2, None), "x must have 3 dimensions"),
        (lambda: OP.causal_conv1d_fwd(X, W2[None], None), "weight must have 2 dimensions"),
        (lambda: OP.causal_conv1d_fwd(X, torch.randn(5, 3), None), "weight has 5 channels"),
        (lambda: OP.causal_conv1d_fwd(X, torch.randn(4, 0), None), "K >= 1"),
        (lambda: OP.causal_conv1d_fwd(X, W2, torch.randn(3)), "bias must have shape"),
        (lambda: OP.causal_conv1d_fwd(X, W2, torch.randn(4).int()), "bias must be float"),
        (lambda: OP.causal_conv1d_bwd(X[:, :4], X, W2), "grad_y must have the shape of x"),
        (lambda: OP.causal_conv1d_bwd(X.int(), X, W2), "grad_y must be float"),
        (lambda: OP.memory_retrieval_fwd(X, torch.randn(6, 5), 1.0), "memory must have shape"),
        (lambda: OP.memory_retrieval_fwd(X, torch.randn(0, 4), 1.0), "at least one slot"),
        (lambda: OP.memory_retrieval_fwd(X, M[0], 1.0), "memory must have 2 dimensions"),
        (lambda: OP.memory_retrieval_fwd(X.int(), M, 1.0), "h must be float"),
        (
            lambda: OP.memory_retrieval_bwd(X, X, M, X[:, :3], torch.zeros(2, 5), 1.0),
            "out must have the shape of h",
        ),
        (lambda: OP.memory_retrieval_bwd(X, X, M, X, torch.zeros(2, 4), 1.0), "lse must have shape"),
        (
            lambda: OP.memory_retrieval_bwd(X[:1], X, M, X, torch.zeros(2, 5), 1.0),
            "grad_out must have the shape of h",
        ),
        (lambda: OP.gate_fusion_fwd(X, X[:, :4], torch.randn(2, 5, 8)), "global_ctx must have"),
        (lambda: OP.gate_fusion_fwd(X, X, torch.randn(2, 5, 4)), "gate_logits must have shape"),
        (lambda: OP.gate_fusion_fwd(X, X.double(), torch.randn(2, 5, 8)), "share one dtype"),
        (lambda: OP.gate_fusion_fwd(X.long(), X, torch.randn(2, 5, 8)), "local must be float"),
        (
            lambda: OP.gate_fusion_bwd(X[:, :2], X, X, torch.randn(2, 5, 8)),
            "grad_out must have the shape of local",
        ),
        (
            lambda: OP.gam_mixer_fwd(X, W2, None, M, torch.randn(8, 3), None, 1.0),
            "gate_weight must have shape",
        ),
        (
            lambda: OP.gam_mixer_fwd(X, W2[:3], None, M, torch.randn(8, 4), None, 1.0),
            "conv_weight has 3 channels",
        ),
        (
            lambda: OP.gam_mixer_fwd(X, W2, torch.randn(3), M, torch.randn(8, 4), None, 1.0),
            "conv_bias must have shape",
        ),
        (
            lambda: OP.gam_mixer_fwd(X, W2, None, M, torch.randn(8, 4), torch.randn(4), 1.0),
            "gate_bias must have shape",
        ),
        (lambda: OP.gam_mixer_fwd(X, W2, None, M[:0], torch.randn(8, 4), None, 1.0), "at least one slot"),
        (lambda: OP.gam_mixer_fwd(X.int(), W2, None, M, torch.randn(8, 4), None, 1.0), "h must be float"),
        (
            lambda: OP.gam_mixer_bwd(
                X, X, W2, None, M, torch.randn(8, 4), torch.zeros(2, 4), torch.zeros(2, 5, 8), X, 1.0
            ),
            "lse must have shape",
        ),
        (
            lambda: OP.gam_mixer_bwd(
                X, X, W2, None, M, torch.randn(8, 4), torch.zeros(2, 5), torch.zeros(2, 5, 4), X, 1.0
            ),
            "gate_logits must have shape",
        ),
        (
            lambda: OP.gam_mixer_bwd(
                X[:1], X, W2, None, M, torch.randn(8, 4), torch.zeros(2, 5), torch.zeros(2, 5, 8), X, 1.0
            ),
            "grad_out must have the shape",
        ),
    ],
)
def test_kernel_bad_input_names_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_public_bad_device_names_the_argument():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="weight is on meta"):
        gam_ext.causal_conv1d(x, torch.randn(4, 3, device="meta"))
    with pytest.raises(ValueError, match="memory is on meta"):
        gam_ext.memory_retrieval(x, torch.randn(6, 4, device="meta"))


_ISA_SCRIPT = """
import sys, torch, gam_ext
torch.manual_seed(0)
x, z = torch.randn(2, 70, 20), torch.randn(2, 70, 40)
m, w = torch.randn(530, 20) * 0.5, torch.randn(20, 3)
gw, gb = torch.randn(40, 20) * 0.2, torch.randn(40)
outs = []
for dtype in (torch.float32, torch.bfloat16):
    leaves = [t.to(dtype).requires_grad_() for t in (x, x * 0.5, z)]
    f = gam_ext.gate_fusion(*leaves)
    h = x.to(dtype).requires_grad_()
    g = gam_ext.memory_retrieval(h, m.requires_grad_(), 0.9)
    y = gam_ext.causal_conv1d(h, w)
    params = [t.clone().requires_grad_() for t in (w, m, gw, gb)]
    mix = gam_ext.gam_mixer(h, params[0], None, params[1], params[2], params[3], 0.9)
    loss = f.sum() + g.square().sum() + y.sum() + mix.square().sum()
    outs += [f, g, y, mix, *torch.autograd.grad(loss.float(), [*leaves, h, m, *params])]
torch.save([t.detach().float() for t in outs], sys.argv[1])
"""


def test_isa_builds_agree(isa_build_outputs):
    """The vectorised loops have a baseline-ISA, an AVX2+FMA and an AVX-512 build (and hand-written
    AVX-512 softmax loops); every build must give the same math."""
    best, *others = isa_build_outputs(_ISA_SCRIPT)
    for outputs in others:
        for a, b in zip(best, outputs, strict=True):
            # FMA contraction and the order of the softmax sums change roundings only; bf16
            # outputs may differ by one bf16 ulp.
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


def test_cpu_isa_is_reported_and_capped():
    """backend_info names the build that runs; GAM_EXT_CPU_ISA caps it and rejects other values."""
    assert gam_ext.backend_info()["cpu_isa"] in ("avx512", "avx2", "baseline")
    script = "import gam_ext; print(gam_ext.backend_info()['cpu_isa'])"
    for cap in ("baseline", "bogus"):
        run = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "GAM_EXT_CPU_ISA": cap},
            capture_output=True,
            text=True,
        )
        if cap == "baseline":
            assert run.returncode == 0 and run.stdout.strip() == "baseline"
        else:
            assert run.returncode != 0 and "GAM_EXT_CPU_ISA must be" in run.stderr
