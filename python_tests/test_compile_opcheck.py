"""The CPU kernels under torch.library.opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import gam_ext

pytestmark = pytest.mark.skipif(
    gam_ext.backend_info()["ops"]["cpu"]["memory_retrieval"] != "kernel",
    reason="the CPU kernels are not built",
)

OP = torch.ops.gam_ext


def _samples(requires_grad: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0, grad=requires_grad):
        x = (torch.randn(*shape, generator=gen) * scale).to(dtype)
        return x.requires_grad_(grad)

    b, n, d, s, k = 2, 9, 6, 11, 3
    x, w, bias = t(b, n, d), t(d, k, scale=0.5), t(d)
    h, m = t(b, n, d), t(s, d, scale=0.5)
    out, lse = OP.memory_retrieval_fwd(h.detach(), m.detach(), 0.7)
    local, glob, z = t(b, n, d), t(b, n, d), t(b, n, 2 * d)
    g = t(b, n, d, grad=False)
    # The step ops are inference-only (no autograd, conv_state mutated): never requires_grad.
    state, hs, zs = t(b, k + 1, d, grad=False), t(b, d, grad=False), t(b, 2 * d, grad=False)
    pos = torch.tensor([0, 5], dtype=torch.int32)
    wg, bg = t(2 * d, d, scale=0.4), t(2 * d, scale=0.1)
    mixer_params = (w, bias, m, wg, bg)
    _, mixer_lse, mixer_z, mixer_g = OP.gam_mixer_fwd(h.detach(), *(p.detach() for p in mixer_params), 0.7)
    return [
        (OP.causal_conv1d_fwd, (x, w, bias)),
        (OP.causal_conv1d_fwd, (x, w, None)),
        (OP.causal_conv1d_bwd, (g, x.detach(), w.detach())),
        (OP.memory_retrieval_fwd, (h, m, 0.7)),
        (OP.memory_retrieval_bwd, (g, h.detach(), m.detach(), out, lse, 0.7)),
        (OP.gate_fusion_fwd, (local, glob, z)),
        (OP.gate_fusion_bwd, (g, local.detach(), glob.detach(), z.detach())),
        (OP.causal_conv1d_update, (x.detach(), state, w.detach(), bias.detach(), None)),
        (OP.causal_conv1d_update, (x.detach()[:, :1], state, w.detach(), None, pos)),
        (OP.gam_mixer_step, (hs, state, w.detach(), bias.detach(), m.detach(), zs, pos, 0.7)),
        (OP.gam_mixer_step, (hs, state, w.detach(), None, m.detach(), zs, None, 1.0)),
        (OP.gam_mixer_fwd, (h, *mixer_params, 0.7)),
        (OP.gam_mixer_fwd, (h, w, None, m, wg, None, 1.0)),
        (
            OP.gam_mixer_bwd,
            (
                g,
                h.detach(),
                w.detach(),
                bias.detach(),
                m.detach(),
                wg.detach(),
                mixer_lse,
                mixer_z,
                mixer_g,
                0.7,
            ),
        ),
    ]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("index", range(14))
def test_opcheck(requires_grad, index):
    op, args = _samples(requires_grad)[index]
    torch.library.opcheck(op, args)


def test_opcheck_half_activations_fp32_params():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(4, 3, generator=gen).requires_grad_()
    m = torch.randn(7, 4, generator=gen).requires_grad_()
    torch.library.opcheck(OP.causal_conv1d_fwd, (x, w, None))
    torch.library.opcheck(OP.memory_retrieval_fwd, (x, m, 1.0))


def _small_block_input(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 11, 16, generator=gen)


def test_compile_gam_block_fullgraph_matches_eager():
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(16, num_memory_slots=12, conv_kernel_size=3, dropout=0.0)
    x = _small_block_input().requires_grad_()
    y_eager = block(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, *block.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-4)


# The forward ops a GAMBlock's mixer runs per backend: the fused op, or the three primitives.
MIXER_OPS = {
    "auto": {"gam_mixer_fwd"},
    "unfused": {"causal_conv1d_fwd", "memory_retrieval_fwd", "gate_fusion_fwd"},
}


@pytest.mark.parametrize("backend", ["auto", "unfused"])
def test_compile_gam_model_fullgraph_matches_eager(backend, use_backend):
    use_backend(backend)
    graph_ops = set()

    def inductor_recording_ops(gm, example_inputs):
        graph_ops.update(
            str(node.target).split(".")[-1]
            for node in gm.graph.nodes
            if str(node.target).startswith("gam_ext.")
        )
        return torch._inductor.compile(gm, example_inputs)

    torch.manual_seed(0)
    config = gam_ext.GAMConfig(
        vocab_size=37,
        block_size=16,
        d_model=16,
        n_layer=2,
        dropout=0.0,
        num_memory_slots=9,
        conv_kernel_size=4,
    )
    model = gam_ext.GAMModel(config)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 37, (2, 13), generator=gen)
    targets = torch.randint(0, 37, (2, 13), generator=gen)
    logits_eager, loss_eager = model(idx, targets)
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=inductor_recording_ops)
    logits, loss = compiled(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert graph_ops == MIXER_OPS[backend]
    torch.testing.assert_close(logits, logits_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-4)


def test_compile_step_fullgraph_matches_eager():
    # The step mixer mutates its conv state: torch.compile functionalizes the op and writes the
    # state back, so compiled and eager steps leave the same state (up to the compiled layer
    # norm's rounding of the rows it stores).
    torch.manual_seed(0)
    block = gam_ext.GAMBlock(16, num_memory_slots=12, conv_kernel_size=3, dropout=0.0).eval()
    x = torch.randn(3, 16)
    pos = torch.tensor([0, 1, 7], dtype=torch.int32)
    state_eager = torch.randn(3, 2, 16)
    state_compiled = state_eager.clone()
    torch._dynamo.reset()
    compiled = torch.compile(block.step, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            y_eager = block.step(x, state_eager, pos)
            y = compiled(x, state_compiled, pos)
            torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state_compiled, state_eager, rtol=1e-5, atol=1e-5)
            x, pos = y_eager, pos + 1
