"""The one-token step ops on the CPU: causal_conv1d_update and gam_mixer_step.

The reference (gam_ext.reference) is checked against the full-sequence ops it decomposes, in
float64; the C++ kernels are checked against the float64 reference in every dtype, on shapes
that cross the kernels' edges (the retrieval's slot chunks, about 65536 / D slots each), with
per-sequence positions (cache_seqlens) before and after K-1, K = 1 .. 5, W > K-1, L > W. The
state must come out exactly as the reference leaves it (it only copies rows).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import TOL

import gam_ext
from gam_ext import reference

pytestmark = pytest.mark.skipif(
    gam_ext.backend_info()["extension"] is None, reason="the compiled extension is not built"
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OP = torch.ops.gam_ext


@pytest.fixture(autouse=True)
def _kernels_on():
    previous = gam_ext.set_backend("auto")
    yield
    gam_ext.set_backend(previous)


def gen(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def assert_close(name, ours, ref64, eager, dtype):
    """Within the dtype's tolerance, or within twice eager's error in that dtype (docs/design.md)."""
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    diff = (ours.double() - ref64.double()).abs()
    ok = diff <= atol + rtol * ref64.double().abs()
    if eager is not None and dtype in (torch.float16, torch.bfloat16):
        ok |= diff <= 2 * (eager.double() - ref64.double()).abs() + 1e-5
    assert bool(ok.all()), f"{name}: {int((~ok).sum())}/{ok.numel()} off, max|diff| {diff.max():.3g}"


def test_kernel_path_is_used():
    ops = gam_ext.backend_info()["ops"]["cpu"]
    assert ops["causal_conv1d_update"] == "kernel" and ops["gam_mixer_step"] == "kernel", ops


# --------------------------------------------------------------------------------------------
# The reference against the full-sequence ops (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_reference_update_rebuilds_the_full_conv(k, circular, chunk):
    # Feeding a sequence chunk by chunk through the state gives the full causal conv, whatever W.
    b, n, d, width = 2, 11, 5, k + 1
    x = gen((b, n, d), torch.float64, 1)
    w, bias = gen((d, 1, k), torch.float64, 2), gen((d,), torch.float64, 3)
    full = reference.causal_conv1d(x, w, bias)
    state = torch.zeros(b, width, d, dtype=torch.float64)
    pos = torch.zeros(b, dtype=torch.int64) if circular else None
    outs = []
    for t0 in range(0, n, chunk):
        piece = x[:, t0 : t0 + chunk]
        outs.append(reference.causal_conv1d_update(piece, state, w, bias, pos))
        if circular:
            pos += piece.shape[1]
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL[torch.float64])
    if not circular and width:  # the shift register ends with the last W inputs
        torch.testing.assert_close(state, x[:, -width:], **TOL[torch.float64])


def test_reference_circular_state_masks_positions_before_zero():
    # Whatever a circular buffer holds, taps before position 0 read zeros (a reused state).
    x = gen((2, 3, 4), torch.float64, 4)
    w = gen((4, 3), torch.float64, 5)
    garbage = gen((2, 2, 4), torch.float64, 6)
    y = reference.causal_conv1d_update(x, garbage.clone(), w, None, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(y, reference.causal_conv1d(x, w), **TOL[torch.float64])


def test_reference_mixer_step_rebuilds_the_full_mixer():
    b, n, d, s, k = 2, 9, 6, 7, 3
    h = gen((b, n, d), torch.float64, 7)
    p = dict(
        conv_weight=gen((d, 1, k), torch.float64, 8),
        conv_bias=gen((d,), torch.float64, 9),
        memory=gen((s, d), torch.float64, 10),
        gate_weight=gen((2 * d, d), torch.float64, 11),
        gate_bias=gen((2 * d,), torch.float64, 12),
    )
    full = reference.gam_mixer(h, scale=0.7, **p)
    state = torch.zeros(b, k - 1, d, dtype=torch.float64)
    pos = torch.zeros(b, dtype=torch.int32)
    rows = []
    for t in range(n):
        rows.append(reference.gam_mixer_step(h[:, t], state, scale=0.7, cache_seqlens=pos, **p))
        pos += 1
    torch.testing.assert_close(torch.stack(rows, 1), full, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# causal_conv1d_update: kernel vs float64 reference
# --------------------------------------------------------------------------------------------

UPDATE_SHAPES = [
    # (B, L, D, K, W)
    (1, 1, 1, 1, 0),
    (2, 1, 5, 2, 1),
    (3, 1, 13, 4, 3),
    (2, 4, 9, 3, 6),  # W > K-1
    (2, 7, 17, 5, 4),  # L > W
    (1, 2, 64, 3, 2),
]


def _positions(b, seed):
    # Per-sequence positions: 0, below K-1 and far past it (masking and wrap-around).
    return torch.tensor([0, 1, 37, 5, 2] * (b // 5 + 1), dtype=torch.int32)[:b] if seed else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: "B{}L{}D{}K{}W{}".format(*s))
@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
def test_conv_update(dtype, shape, circular):
    b, n, d, k, width = shape
    x = gen((b, n, d), dtype, 20)
    w, bias = gen((d, k), torch.float32, 21, 0.5), gen((d,), torch.float32, 22)
    state = gen((b, width, d), dtype, 23)
    pos = _positions(b, circular)
    ours_state, ref_state, eager_state = state.clone(), state.double(), state.clone()
    y = gam_ext.causal_conv1d_update(x, ours_state, w, bias, pos)
    y_ref = reference.causal_conv1d_update(x.double(), ref_state, w.double(), bias.double(), pos)
    y_eager = reference.causal_conv1d_update(x, eager_state, w, bias, pos)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close("y", y, y_ref, y_eager, dtype)
    assert torch.equal(ours_state, ref_state.to(dtype))
    # One row per sequence may come as (B, D).
    s1, s2 = state.clone(), state.clone()
    one = gam_ext.causal_conv1d_update(x[:, 0], s1, w, bias, pos)
    assert one.shape == (b, d)
    assert torch.equal(one, gam_ext.causal_conv1d_update(x[:, :1], s2, w, bias, pos)[:, 0])
    assert torch.equal(s1, s2)


def test_conv_update_accepts_int64_positions_and_noncontiguous_x():
    x = gen((3, 4, 6), torch.float32, 24)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    w = gen((6, 1, 3), torch.float32, 25)  # nn.Conv1d layout
    state = gen((3, 2, 6), torch.float32, 26)
    pos32, pos64 = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 4, 9])
    s1, s2 = state.clone(), state.clone()
    y1 = gam_ext.causal_conv1d_update(x, s1, w, None, pos32)
    y2 = gam_ext.causal_conv1d_update(xt, s2, w, None, pos64)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


# --------------------------------------------------------------------------------------------
# gam_mixer_step: kernel vs float64 reference
# --------------------------------------------------------------------------------------------

STEP_SHAPES = [
    # (B, D, S, K): S = 1; S across the slot chunks (496 slots at D = 130, 240 at D = 264,
    # 4096 at D = 8); D odd; K = 1 (no state) .. 5; B across the 64-row blocks of the kernel.
    (1, 8, 1, 3),
    (2, 5, 3, 1),
    (3, 13, 40, 4),
    (1, 130, 600, 3),
    (2, 264, 500, 2),
    (1, 8, 4100, 5),
    (70, 16, 90, 3),
    (129, 264, 500, 2),
]


def _step_inputs(shape, dtype, seed=30):
    b, d, s, k = shape
    return dict(
        h=gen((b, d), dtype, seed),
        conv_state=gen((b, max(k - 1, 0) + 1, d), dtype, seed + 1),
        conv_weight=gen((d, 1, k), torch.float32, seed + 2, 0.5),
        conv_bias=gen((d,), torch.float32, seed + 3),
        memory=gen((s, d), torch.float32, seed + 4, d**-0.25),
        gate_weight=gen((2 * d, d), torch.float32, seed + 5, d**-0.5),
        gate_bias=gen((2 * d,), torch.float32, seed + 6),
    )


def _mixer_step_ref(inputs, dtype, pos, scale):
    """The reference in float64 and in dtype (eager: parameters follow h), each on its own copy of
    the state; returns {"ref": (out, state), "eager": (out, state)}."""
    out = {}
    for key, cast in (("ref", torch.float64), ("eager", dtype)):
        args = {name: t.to(cast).clone() for name, t in inputs.items()}
        out[key] = (reference.gam_mixer_step(scale=scale, cache_seqlens=pos, **args), args["conv_state"])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "B{}D{}S{}K{}".format(*s))
@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
def test_mixer_step(dtype, shape, circular):
    inputs = _step_inputs(shape, dtype)
    pos = _positions(shape[0], circular)
    # The memory bank is rounded to the activation dtype on every path (csrc/op_checks.h).
    inputs["memory"] = inputs["memory"].to(dtype)
    refs = _mixer_step_ref(inputs, dtype, pos, 0.8)
    state = inputs["conv_state"].clone()
    out = gam_ext.gam_mixer_step(**{**inputs, "conv_state": state}, scale=0.8, cache_seqlens=pos)
    assert out.dtype == dtype and out.shape == inputs["h"].shape
    assert_close("f", out, refs["ref"][0], refs["eager"][0], dtype)
    assert torch.equal(state, refs["ref"][1].to(dtype))


def test_mixer_step_rows_rebuild_the_full_mixer():
    # The step over a sequence gives gam_mixer's rows (both on the kernels, fp32).
    b, n, d, s, k = 2, 70, 24, 40, 3
    h = gen((b, n, d), torch.float32, 40)
    p = _step_inputs((b, d, s, k), torch.float32, 41)
    del p["h"], p["conv_state"]
    full = gam_ext.gam_mixer(h, **p)
    for circular in (False, True):
        state = torch.zeros(b, k - 1, d)
        pos = torch.zeros(b, dtype=torch.int32) if circular else None
        rows = []
        for t in range(n):
            rows.append(gam_ext.gam_mixer_step(h[:, t], state, **p, cache_seqlens=pos))
            if pos is not None:
                pos += 1
        torch.testing.assert_close(torch.stack(rows, 1), full, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixer_step_half_activations_fp32_parameters(dtype):
    # fp32 parameters with half activations, and the same under autocast from fp32 h.
    inputs = _step_inputs((2, 24, 50, 3), torch.float32, 50)
    h32 = inputs.pop("h")
    state32 = inputs.pop("conv_state")
    s1, s2 = state32.to(dtype), state32.to(dtype)
    direct = gam_ext.gam_mixer_step(h32.to(dtype), s1, **inputs)
    with torch.autocast("cpu", dtype=dtype):
        autocast = gam_ext.gam_mixer_step(h32, s2, **inputs)
    assert direct.dtype == autocast.dtype == dtype
    assert torch.equal(direct, autocast) and torch.equal(s1, s2)
    ref_state = state32.to(dtype).double()
    ref = reference.gam_mixer_step(
        h32.to(dtype).double(),
        ref_state,
        **{k: v.to(dtype).double() if k == "memory" else v.double() for k, v in inputs.items()},
    )
    assert_close("f", direct, ref, None, dtype)


def test_empty_batch_and_inference_mode():
    p = _step_inputs((0, 6, 5, 3), torch.float32)
    assert gam_ext.gam_mixer_step(**p).shape == (0, 6)
    x = torch.zeros(0, 2, 6)
    assert gam_ext.causal_conv1d_update(x, torch.zeros(0, 2, 6), torch.randn(6, 3)).shape == x.shape
    p = _step_inputs((2, 6, 5, 3), torch.float32)
    with torch.inference_mode():
        state = p["conv_state"].clone()
        out = gam_ext.gam_mixer_step(**{**p, "conv_state": state})
    assert out.shape == (2, 6) and torch.equal(state[:, -1], p["h"])


def test_inputs_that_need_a_gradient_take_the_reference():
    # No backward kernel: with requires_grad inputs the reference runs, and is differentiable.
    p = _step_inputs((2, 6, 5, 3), torch.float64)
    h = p.pop("h").requires_grad_()
    out = gam_ext.gam_mixer_step(h, **p)
    (grad,) = torch.autograd.grad(out.sum(), [h])
    assert grad.shape == h.shape and grad.abs().sum() > 0
    x = gen((2, 1, 6), torch.float64, 3).requires_grad_()
    y = gam_ext.causal_conv1d_update(
        x, torch.zeros(2, 2, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    )
    assert y.requires_grad


def _step_outputs():
    results = []
    for b in (1, 3, 70):
        p = _step_inputs((b, 40, 3000, 3), torch.float32, 60)  # 2 slot chunks, 2 row blocks
        state = p["conv_state"].clone()
        results += [gam_ext.gam_mixer_step(**{**p, "conv_state": state}), state]
    return results


def test_deterministic_across_runs_and_thread_counts():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _step_outputs(), _step_outputs()
        torch.set_num_threads(1)
        single = _step_outputs()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


_ISA_SCRIPT = """
import sys, torch, gam_ext
torch.manual_seed(0)
h, st = torch.randn(2, 20), torch.randn(2, 2, 20)
w, b, m = torch.randn(20, 3), torch.randn(20), torch.randn(700, 20) * 0.5
gw, gb = torch.randn(40, 20) * 0.2, torch.randn(40)
outs = []
for dtype in (torch.float32, torch.bfloat16):
    s = st.to(dtype)
    outs += [gam_ext.gam_mixer_step(h.to(dtype), s, w, b, m, gw, gb, 0.9), s]
torch.save([t.float() for t in outs], sys.argv[1])
"""


def test_isa_builds_agree(isa_build_outputs):
    best, *others = isa_build_outputs(_ISA_SCRIPT)
    for outputs in others:
        for a, b in zip(best, outputs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

H = torch.randn(2, 4)
X3 = torch.randn(2, 1, 4)
ST = torch.zeros(2, 2, 4)
W3 = torch.randn(4, 3)
MEM = torch.randn(5, 4)
Z = torch.randn(2, 8)
GW, GB = torch.randn(8, 4), torch.randn(8)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: OP.causal_conv1d_update(X3, ST.double(), W3, None, None),
            "conv_state must have the dtype of x",
        ),
        (
            lambda: OP.causal_conv1d_update(X3, torch.zeros(3, 2, 4), W3, None, None),
            r"conv_state must have shape \(B, W, D\)",
        ),
        (lambda: OP.causal_conv1d_update(X3, torch.zeros(2, 1, 4), W3, None, None), "at least K-1 = 2 rows"),
        (
            lambda: OP.causal_conv1d_update(X3, torch.zeros(2, 4, 2).transpose(1, 2), W3, None, None),
            "conv_state must be contiguous",
        ),
        (
            lambda: OP.causal_conv1d_update(X3, ST, W3, None, torch.zeros(2)),
            "cache_seqlens must be int32 or int64",
        ),
        (
            lambda: OP.causal_conv1d_update(X3, ST, W3, None, torch.zeros(3, dtype=torch.int32)),
            r"cache_seqlens must have shape \(B,\)",
        ),
        (lambda: OP.causal_conv1d_update(X3[0], ST, W3, None, None), "x must have 3 dimensions"),
        (lambda: OP.causal_conv1d_update(X3, ST, torch.randn(5, 3), None, None), "weight has 5 channels"),
        (
            lambda: OP.gam_mixer_step(H, ST, W3, None, MEM, Z.double(), None, 1.0),
            "gate_logits must have the dtype of h",
        ),
        (
            lambda: OP.gam_mixer_step(H, ST, W3, None, MEM, Z[:, :4], None, 1.0),
            r"gate_logits must have shape \(B, 2D\)",
        ),
        (lambda: OP.gam_mixer_step(H, ST, W3, None, MEM[:, :3], Z, None, 1.0), "memory must have shape"),
        (lambda: OP.gam_mixer_step(H, ST, W3, None, MEM[:0], Z, None, 1.0), "at least one slot"),
        (lambda: OP.gam_mixer_step(X3, ST, W3, None, MEM, Z, None, 1.0), "h must have 2 dimensions"),
        (
            lambda: OP.gam_mixer_step(H, ST.half(), W3, None, MEM, Z, None, 1.0),
            "conv_state must have the dtype of h",
        ),
        (lambda: OP.gam_mixer_step(H, ST, W3, torch.randn(3), MEM, Z, None, 1.0), "bias must have shape"),
    ],
)
def test_kernel_bad_input_names_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: gam_ext.causal_conv1d_update(torch.randn(2, 1, 1, 4), ST, W3),
            ValueError,
            r"x must be \(B, D\) or \(B, L, D\)",
        ),
        (
            lambda: gam_ext.causal_conv1d_update(H, ST.half(), W3),
            TypeError,
            "conv_state must have the dtype of x",
        ),
        (lambda: gam_ext.causal_conv1d_update(H, ST[:, :1], W3), ValueError, "at least K-1 = 2"),
        (lambda: gam_ext.causal_conv1d_update(H, ST[:1], W3), ValueError, "conv_state must have shape"),
        (
            lambda: gam_ext.causal_conv1d_update(H, ST, W3, None, [0, 0]),
            TypeError,
            "cache_seqlens must be a torch.Tensor",
        ),
        (
            lambda: gam_ext.causal_conv1d_update(H, ST, W3, None, torch.zeros(2)),
            TypeError,
            "cache_seqlens must be int32 or int64",
        ),
        (
            lambda: gam_ext.causal_conv1d_update(H, torch.zeros(2, 4, 2).transpose(1, 2), W3),
            ValueError,
            "conv_state must be contiguous",
        ),
        (
            lambda: gam_ext.gam_mixer_step(X3, ST, W3, None, MEM, GW, GB),
            ValueError,
            "h must have 2 dimensions",
        ),
        (
            lambda: gam_ext.gam_mixer_step(H, ST, W3, None, MEM, GW[:4], GB),
            ValueError,
            "gate_weight must have shape",
        ),
        (
            lambda: gam_ext.gam_mixer_step(H, ST, W3, None, MEM[:, :3], GW, GB),
            ValueError,
            "memory must have shape",
        ),
        (
            lambda: gam_ext.gam_mixer_step(H, ST.double(), W3, None, MEM, GW, GB),
            TypeError,
            "conv_state must have the dtype of h",
        ),
        (lambda: gam_ext.gam_mixer_step(H, ST, W3, None, MEM, GW, GB, "1"), TypeError, "scale"),
        (
            lambda: gam_ext.gam_mixer_step(
                H, ST, W3, None, MEM, GW, GB, cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta")
            ),
            ValueError,
            "cache_seqlens is on meta",
        ),
    ],
)
def test_public_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
