"""gam_ext.reference against the math of docs/design.md, written out independently, in float64."""

from __future__ import annotations

import pytest
import torch
from paper_model import PaperBlock

from gam_ext import reference

torch.manual_seed(0)
F64 = dict(dtype=torch.float64)


def conv_by_definition(x, w, bias):
    """y[b,t,c] = bias[c] + sum_j w[c,j] x[b, t-(K-1)+j, c], with x = 0 before t = 0."""
    b, n, d = x.shape
    k = w.shape[1]
    y = bias.expand(b, n, d).clone()
    for t in range(n):
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                y[:, t] += w[:, j] * x[:, src]
    return y


@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (2, 3), (7, 3), (5, 8)])
def test_conv_matches_definition(n, k):
    x = torch.randn(2, n, 5, **F64)
    w = torch.randn(5, k, **F64)
    bias = torch.randn(5, **F64)
    torch.testing.assert_close(reference.causal_conv1d(x, w, bias), conv_by_definition(x, w, bias))
    # (D, 1, K) weights as nn.Conv1d holds them give the same result
    torch.testing.assert_close(
        reference.causal_conv1d(x, w[:, None, :], bias), conv_by_definition(x, w, bias)
    )


def test_conv_backward_matches_design_formulas():
    x = torch.randn(2, 6, 3, **F64, requires_grad=True)
    w = torch.randn(3, 4, **F64, requires_grad=True)
    bias = torch.randn(3, **F64, requires_grad=True)
    dy = torch.randn(2, 6, 3, **F64)
    reference.causal_conv1d(x, w, bias).backward(dy)
    n, k = 6, 4
    dx = torch.zeros_like(x)
    dw = torch.zeros_like(w)
    for t in range(n):
        for j in range(k):
            later = t + (k - 1) - j
            if later < n:
                dx[:, t] += w[:, j] * dy[:, later]
            src = t - (k - 1) + j
            if src >= 0:
                dw[:, j] += (dy[:, t] * x[:, src]).sum(0)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(w.grad, dw.detach())
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_memory_retrieval_forward_and_backward_match_design_formulas(scale):
    h = torch.randn(2, 5, 4, **F64, requires_grad=True)
    m = torch.randn(3, 4, **F64, requires_grad=True)
    dg = torch.randn(2, 5, 4, **F64)
    g = reference.memory_retrieval(h, m, scale)
    s = scale * torch.einsum("btc,mc->btm", h, m)
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
    torch.testing.assert_close(g, torch.einsum("btm,mc->btc", p, m))
    g.backward(dg)
    dp = torch.einsum("btc,mc->btm", dg, m)
    delta = (dg * g).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    torch.testing.assert_close(h.grad, (scale * torch.einsum("btm,mc->btc", ds, m)).detach())
    dm = scale * torch.einsum("btm,btc->mc", ds, h) + torch.einsum("btm,btc->mc", p, dg)
    torch.testing.assert_close(m.grad, dm.detach())


def test_gate_fusion_forward_and_backward_match_design_formulas():
    local = torch.randn(2, 3, 4, **F64, requires_grad=True)
    glob = torch.randn(2, 3, 4, **F64, requires_grad=True)
    z = torch.randn(2, 3, 8, **F64, requires_grad=True)
    df = torch.randn(2, 3, 4, **F64)
    f = reference.gate_fusion(local, glob, z)
    sl, sg = torch.sigmoid(z[..., :4]), torch.sigmoid(z[..., 4:])
    torch.testing.assert_close(f, sl * local + sg * glob)
    f.backward(df)
    torch.testing.assert_close(local.grad, (sl * df).detach())
    torch.testing.assert_close(glob.grad, (sg * df).detach())
    dz = torch.cat([df * local * sl * (1 - sl), df * glob * sg * (1 - sg)], -1)
    torch.testing.assert_close(z.grad, dz.detach())


def test_gam_block_matches_paper_block():
    torch.manual_seed(1)
    block = PaperBlock(d_model=12, num_slots=5, kernel_size=3, dropout=0.0).double().eval()
    x = torch.randn(2, 9, 12, **F64)
    ffn = block.ffn
    ours = reference.gam_block(
        x,
        block.ln1.weight,
        block.ln1.bias,
        block.causal_conv.weight,
        block.causal_conv.bias,
        block.memory_bank,
        block.gate.weight,
        block.gate.bias,
        block.ln2.weight,
        block.ln2.bias,
        ffn[0].weight,
        ffn[0].bias,
        ffn[2].weight,
        ffn[2].bias,
    )
    torch.testing.assert_close(ours, block(x))


def test_retrieval_is_causal_per_token():
    """The memory path of token t depends on h[t] alone: changing later tokens changes nothing."""
    h = torch.randn(1, 6, 4, **F64)
    m = torch.randn(5, 4, **F64)
    changed = h.clone()
    changed[:, 3:] += 1.0
    torch.testing.assert_close(
        reference.memory_retrieval(h, m)[:, :3], reference.memory_retrieval(changed, m)[:, :3]
    )
