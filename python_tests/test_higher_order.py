"""Derivatives beyond one backward: double backward, forward-mode AD and torch.func transforms.

Double backward (``create_graph=True``) takes each op's gradients through a differentiable
reference vector-Jacobian product; torch.func's differentiating transforms and forward-mode AD run
the reference math (gam_ext/ops.py). Every result is compared with the reference backend, in
float64 on the CPU, for the three ops, the mixer, the block and a small model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import gam_ext
from gam_ext import reference

F64 = torch.float64


@pytest.fixture(autouse=True)
def _kernels_on():
    previous = gam_ext.set_backend("auto")
    yield
    gam_ext.set_backend(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(gen, *shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)


def _block_params(gen, d, s=5, k=3, dtype=F64):
    return [
        1.0 + _t(gen, d, scale=0.1, dtype=dtype),
        _t(gen, d, scale=0.1, dtype=dtype),  # ln1
        _t(gen, d, 1, k, scale=0.5, dtype=dtype),
        _t(gen, d, scale=0.1, dtype=dtype),  # conv
        _t(gen, s, d, scale=0.7, dtype=dtype),  # memory
        _t(gen, 2 * d, d, scale=0.5, dtype=dtype),
        _t(gen, 2 * d, scale=0.1, dtype=dtype),  # gate
        1.0 + _t(gen, d, scale=0.1, dtype=dtype),
        _t(gen, d, scale=0.1, dtype=dtype),  # ln2
        _t(gen, 2 * d, d, scale=0.5, dtype=dtype),
        _t(gen, 2 * d, scale=0.1, dtype=dtype),  # ffn1
        _t(gen, d, 2 * d, scale=0.5, dtype=dtype),
        _t(gen, d, scale=0.1, dtype=dtype),  # ffn2
    ]


def _cases(dtype=F64):
    """(name, function of tensors, input tensors) for each op, the mixer and the block."""
    gen = _gen(0)
    b, n, d, s = 2, 5, 3, 4
    mixer_params = [
        _t(gen, d, 1, 3, scale=0.5, dtype=dtype),
        _t(gen, d, dtype=dtype),
        _t(gen, s, d, scale=0.7, dtype=dtype),
        _t(gen, 2 * d, d, scale=0.5, dtype=dtype),
        _t(gen, 2 * d, dtype=dtype),
    ]
    return [
        (
            "causal_conv1d",
            gam_ext.causal_conv1d,
            [_t(gen, b, n, d, dtype=dtype), _t(gen, d, 1, 3, dtype=dtype), _t(gen, d, dtype=dtype)],
        ),
        (
            "memory_retrieval",
            lambda h, m: gam_ext.memory_retrieval(h, m, 0.7),
            [_t(gen, b, n, d, dtype=dtype), _t(gen, s, d, dtype=dtype)],
        ),
        (
            "gate_fusion",
            gam_ext.gate_fusion,
            [
                _t(gen, b, n, d, dtype=dtype),
                _t(gen, b, n, d, dtype=dtype),
                _t(gen, b, n, 2 * d, scale=2.0, dtype=dtype),
            ],
        ),
        ("gam_mixer", gam_ext.gam_mixer, [_t(gen, b, n, d, dtype=dtype), *mixer_params]),
        ("gam_block", gam_ext.gam_block, [_t(gen, b, n, d, dtype=dtype), *_block_params(gen, d)]),
    ]


CASE_IDS = [name for name, _, _ in _cases()]


def _case(name, dtype=F64):
    return next(case for case in _cases(dtype) if case[0] == name)[1:]


def _on_reference(fn, *args, **kwargs):
    previous = gam_ext.set_backend("reference")
    try:
        return fn(*args, **kwargs)
    finally:
        gam_ext.set_backend(previous)


def _assert_close_tree(actual, expected, **tol):
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        torch.testing.assert_close(a, e, **tol)


# ------------------------------------------------------------------------------------------------
# Double backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_IDS)
def test_gradgradcheck(name):
    fn, inputs = _case(name)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-5, rtol=1e-4)


def test_gradgradcheck_conv_without_bias_and_weight_only():
    gen = _gen(1)
    x, w = _t(gen, 2, 6, 3), _t(gen, 3, 4).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda w: gam_ext.causal_conv1d(x, w), (w,), atol=1e-5)


def _gradient_penalty_grads(fn, inputs):
    """d/d(inputs) of ||d sum(fn(inputs)^2) / d inputs[0]||^2: a gradient penalty."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    (g,) = torch.autograd.grad(fn(*leaves).square().sum(), leaves[0], create_graph=True)
    return torch.autograd.grad(g.square().sum(), leaves, allow_unused=True)


@pytest.mark.parametrize("name", CASE_IDS)
def test_gradient_penalty_matches_reference(name):
    fn, inputs = _case(name)
    with warnings.catch_warnings():
        # torch warns when a backward runs through an op without a derivative (the *_bwd ops).
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        got = _gradient_penalty_grads(fn, inputs)
    expected = _on_reference(_gradient_penalty_grads, fn, inputs)
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    if name == "memory_retrieval":
        assert got[1].abs().max() > 1.0  # the memory gradient (was exactly 0)


def test_gam_block_module_gradient_penalty_float32():
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(16, num_memory_slots=12, dropout=0.0)
    x = torch.randn(2, 9, 16, generator=_gen(3))

    def penalty_grads():
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(block(xi).square().sum(), xi, create_graph=True)
        return torch.autograd.grad(g.square().sum(), list(block.parameters()))

    got, expected = penalty_grads(), _on_reference(penalty_grads)
    for (pname, _), g, e in zip(block.named_parameters(), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda m, n=pname: f"{n}: {m}")


def test_double_backward_with_half_activations_and_fp32_parameters():
    gen = _gen(4)
    x = _t(gen, 2, 7, 8, dtype=torch.float32).bfloat16().requires_grad_()
    w = _t(gen, 8, 3, dtype=torch.float32).requires_grad_()
    m = _t(gen, 5, 8, dtype=torch.float32).requires_grad_()
    y = gam_ext.memory_retrieval(gam_ext.causal_conv1d(x, w), m)
    gx, gw, gm = torch.autograd.grad(y.float().square().sum(), (x, w, m), create_graph=True)
    assert (gx.dtype, gw.dtype, gm.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    second = torch.autograd.grad(gx.float().square().sum() + gm.square().sum(), (x, w, m))
    assert all(s.isfinite().all() and s.abs().sum() > 0 for s in second)


def test_autograd_functional_hessian_matches_reference():
    fn, (h, m) = _case("memory_retrieval")
    f = lambda h: fn(h, m).square().sum()
    got = torch.autograd.functional.hessian(f, h)
    torch.testing.assert_close(got, _on_reference(torch.autograd.functional.hessian, f, h))


@pytest.mark.parametrize("backend", ["auto", "unfused"])
def test_first_order_backward_still_runs_the_kernels(monkeypatch, backend, use_backend):
    use_backend(backend)
    calls = []
    for op in ("causal_conv1d", "memory_retrieval", "gate_fusion", "gam_mixer"):
        original = getattr(reference, op)
        monkeypatch.setattr(
            reference, op, lambda *a, _o=original, _n=op, **k: calls.append(_n) or _o(*a, **k)
        )
    fn, inputs = _case("gam_mixer")
    leaves = [t.requires_grad_() for t in inputs]
    fn(*leaves).sum().backward()
    assert calls == [] or gam_ext.backend_info()["extension"] is None


# The ops a GAMBlock's mixer runs: the fused op (backend auto), or the three primitives.
BLOCK_OPS = {"auto": ("gam_mixer",), "unfused": ("causal_conv1d", "memory_retrieval", "gate_fusion")}


@pytest.mark.parametrize("backend", ["auto", "unfused"])
def test_compiled_backward_graph_keeps_the_bwd_kernels(backend, use_backend):
    if gam_ext.backend_info()["ops"]["cpu"]["gam_mixer"] != "kernel":
        pytest.skip("the CPU kernels are not built")
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    use_backend(backend)
    block = gam_ext.GAMBlock(8, num_memory_slots=5, dropout=0.0)
    params = dict(block.named_parameters())
    f = aot_function(lambda x, p: functional_call(block, p, (x,)), fw_compiler=keep, bw_compiler=keep)
    f(torch.randn(2, 7, 8, requires_grad=True), params).sum().backward()
    forward, backward = ({str(n.target) for n in g.graph.nodes} for g in graphs)
    for op in BLOCK_OPS[backend]:
        assert f"gam_ext.{op}_fwd.default" in forward
        assert f"gam_ext.{op}_bwd.default" in backward
    others = {op for ops in BLOCK_OPS.values() for op in ops} - set(BLOCK_OPS[backend])
    assert not any(f"gam_ext.{op}_fwd.default" in forward for op in others)


# ------------------------------------------------------------------------------------------------
# Forward mode and torch.func
# ------------------------------------------------------------------------------------------------


def _tangents(inputs, seed=5):
    gen = _gen(seed)
    return [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in inputs]


@pytest.mark.parametrize("name", CASE_IDS)
def test_func_jvp_matches_reference(name):
    fn, inputs = _case(name)
    tangents = _tangents(inputs)
    out, tangent = jvp(fn, tuple(inputs), tuple(tangents))
    expected_out, expected_tangent = _on_reference(jvp, fn, tuple(inputs), tuple(tangents))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)
    assert tangent.abs().max() > 0.1  # was all zeros


@pytest.mark.parametrize("name", CASE_IDS)
def test_forward_ad_matches_reference(name):
    fn, inputs = _case(name)
    tangents = _tangents(inputs)

    def run():
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, dt) for t, dt in zip(inputs, tangents, strict=True)]
            return fwAD.unpack_dual(fn(*duals)).tangent

    got = run()
    assert got is not None  # was None
    torch.testing.assert_close(got, _on_reference(run))


def test_forward_ad_tangent_on_a_parameter_only():
    fn, (h, cw, cb, m, gw, gb) = _case("gam_mixer")
    dgw = torch.randn_like(gw)

    def run():
        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(h, cw, cb, m, fwAD.make_dual(gw, dgw), gb)).tangent

    torch.testing.assert_close(run(), _on_reference(run))


@pytest.mark.parametrize("name", CASE_IDS)
def test_func_grad_vjp_jacrev_jacfwd_match_reference(name):
    fn, inputs = _case(name)
    argnums = tuple(range(len(inputs)))
    scalar = lambda *a: fn(*a).square().sum()
    for transform in (
        grad(scalar, argnums=argnums),
        jacrev(fn, argnums=argnums),
        jacfwd(fn, argnums=argnums),
    ):
        _assert_close_tree(transform(*inputs), _on_reference(transform, *inputs))
    cotangent = _tangents([fn(*inputs)])[0]
    got = vjp(fn, *inputs)[1](cotangent)
    _assert_close_tree(got, _on_reference(lambda: vjp(fn, *inputs)[1](cotangent)))


@pytest.mark.parametrize("name", CASE_IDS)
def test_func_hessian_matches_reference(name):
    fn, inputs = _case(name)
    first, rest = inputs[0], inputs[1:]
    f = lambda x: fn(x, *rest).square().sum()
    got = hessian(f)(first)
    torch.testing.assert_close(got, _on_reference(hessian(f), first))
    assert got.abs().max() > 0.1


def _small_model():
    torch.manual_seed(0)
    config = gam_ext.GAMConfig(
        vocab_size=17, block_size=8, d_model=6, n_layer=2, dropout=0.0, num_memory_slots=5, conv_kernel_size=3
    )
    model = gam_ext.GAMModel(config).double()
    idx = torch.randint(0, 17, (2, 7), generator=_gen(6))
    return model, idx[:, :-1], idx[:, 1:]


def test_model_jvp_grad_and_jacrev_match_reference():
    model, idx, targets = _small_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn(v.shape, generator=_gen(7), dtype=v.dtype) for k, v in params.items()}
    logits = lambda p: functional_call(model, p, (idx,))[0]
    loss = lambda p: functional_call(model, p, (idx, targets))[1]

    got = jvp(logits, (params,), (tangents,))
    expected = _on_reference(jvp, logits, (params,), (tangents,))
    _assert_close_tree(got, expected)
    assert got[1].abs().max() > 0.1
    _assert_close_tree(grad(loss)(params), _on_reference(grad(loss), params))
    memory = "blocks.0.memory_bank"
    one = lambda m: logits({**params, memory: m})
    torch.testing.assert_close(jacrev(one)(params[memory]), _on_reference(jacrev(one), params[memory]))


def test_vmap_keeps_the_kernels_and_per_sample_grads_match(monkeypatch):
    fn, (h, m) = _case("memory_retrieval")
    batched = torch.stack([h, 2 * h])
    calls = []
    original = reference.memory_retrieval
    monkeypatch.setattr(reference, "memory_retrieval", lambda *a, **k: calls.append(1) or original(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = vmap(lambda h: fn(h, m))(batched)
    kernels = gam_ext.backend_info()["ops"]["cpu"]["memory_retrieval"] == "kernel"
    assert calls == ([] if kernels else [1])
    torch.testing.assert_close(out, torch.stack([original(h, m, 0.7), original(2 * h, m, 0.7)]))
    per_sample = vmap(grad(lambda h: fn(h, m).square().sum()))(batched)
    expected = _on_reference(vmap(grad(lambda h: fn(h, m).square().sum())), batched)
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize("backend", ["auto", "unfused"])
def test_export_keeps_the_kernels(backend, use_backend):
    if gam_ext.backend_info()["ops"]["cpu"]["gam_mixer"] != "kernel":
        pytest.skip("the CPU kernels are not built")

    class Mixer(torch.nn.Module):
        def forward(self, *args):
            return gam_ext.gam_mixer(*args)

    use_backend(backend)
    _, inputs = _case("gam_mixer", dtype=torch.float32)
    exported = torch.export.export(Mixer(), tuple(inputs))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert {f"gam_ext.{op}_fwd.default" for op in BLOCK_OPS[backend]} <= targets
    torch.testing.assert_close(exported.module()(*inputs), reference.gam_mixer(*inputs))


def test_create_graph_backward_under_autocast_computes_in_fp32():
    # The forward ran in fp32; the backward (on this thread, for CPU tensors) runs under autocast.
    fn, (h, m) = _case("memory_retrieval", dtype=torch.float32)
    h, m = h.requires_grad_(), m.requires_grad_()

    def first_order(autocast):
        loss = fn(h, m).square().sum()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return torch.autograd.grad(loss, (h, m), create_graph=True)

    for got, expected in zip(first_order(True), first_order(False), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
