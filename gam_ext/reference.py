"""Pure-PyTorch reference math of GAM: the definition every kernel is tested against.

Written exactly as the paper's public code computes it (docs/paper.md, "The GAM block"; the
formulas are in docs/design.md, "The math of each op"): an ``nn.Conv1d``-style depthwise
convolution padded by K-1 on both sides and cut back to the first N outputs, a plain
matmul-softmax-matmul retrieval from the memory bank (keys = values = M, no projection), and two
independent sigmoid gates. All tensors are token-major ``(B, N, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d",
    "memory_retrieval",
    "gate_fusion",
    "gam_mixer",
    "gam_block",
    "causal_conv1d_update",
    "gam_mixer_step",
]


def _conv_weight_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[-1])


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[b,t,c] = bias[c] + sum_j w[c,j] * x[b, t-(K-1)+j, c]; weight (D, K) or (D, 1, K)."""
    n, d = x.shape[1], x.shape[2]
    w = _conv_weight_2d(weight).to(x.dtype)
    k = w.shape[1]
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), b, padding=k - 1, groups=d)
    return y[..., :n].transpose(1, 2)


def memory_retrieval(h: torch.Tensor, memory: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """g = softmax(scale * h M^T, over the S slots) M."""
    m = memory.to(h.dtype)
    scores = torch.matmul(h, m.t())
    if scale != 1.0:
        scores = scores * scale
    return torch.matmul(F.softmax(scores, dim=-1), m)


def gate_fusion(local: torch.Tensor, global_ctx: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """f = sigmoid(zl) * local + sigmoid(zg) * global, with (zl, zg) the two halves of gate_logits."""
    zl, zg = gate_logits.chunk(2, dim=-1)
    return torch.sigmoid(zl) * local + torch.sigmoid(zg) * global_ctx


def gam_mixer(
    h: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The token mixer of one GAM block, applied to the normalised input h."""
    local = causal_conv1d(h, conv_weight, conv_bias)
    global_ctx = memory_retrieval(h, memory, scale)
    gate_logits = F.linear(h, gate_weight, gate_bias)
    return gate_fusion(local, global_ctx, gate_logits)


def gam_block(
    x: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    ffn_w1: torch.Tensor,
    ffn_b1: torch.Tensor | None,
    ffn_w2: torch.Tensor,
    ffn_b2: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """One whole GAM block: x + mixer(LN1(x)), then + Dropout(FFN(LN2(.)))."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), ln1_weight, ln1_bias, eps)
    x = x + gam_mixer(h, conv_weight, conv_bias, memory, gate_weight, gate_bias)
    u = F.layer_norm(x, (d,), ln2_weight, ln2_bias, eps)
    u = F.linear(F.gelu(F.linear(u, ffn_w1, ffn_b1)), ffn_w2, ffn_b2)
    return x + F.dropout(u, dropout, training)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """New rows x (B, L, D) of causal_conv1d, the K-1 inputs before them read from conv_state.

    conv_state (B, W, D), W >= K-1, is updated in place. Without cache_seqlens it holds the W rows
    before x, oldest first, and afterwards the last W rows of [conv_state; x]. With cache_seqlens
    (B,) it is a circular buffer: the input at absolute position q of sequence b is row q mod W,
    x's first row is at position cache_seqlens[b], and inputs before position 0 are zeros.
    """
    b, n, d = x.shape
    w = _conv_weight_2d(weight).to(x.dtype)
    k = w.shape[1]
    width = conv_state.shape[1]
    if cache_seqlens is None:
        full = torch.cat([conv_state, x], dim=1)
        prev = full[:, width - (k - 1) : width]
    else:
        start = cache_seqlens.to(torch.long)
        offsets = torch.arange(-(k - 1), 0, device=x.device)
        q = start.unsqueeze(1) + offsets  # (B, K-1) positions of the previous inputs
        rows = q.remainder(max(width, 1)).unsqueeze(2).expand(b, k - 1, d)
        prev = conv_state.gather(1, rows).masked_fill((q < 0).unsqueeze(2), 0)
    windows = torch.cat([prev, x], dim=1)  # (B, K-1+L, D): a valid conv gives the L outputs
    b_ = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(windows.transpose(1, 2), w.unsqueeze(1), b_, groups=d).transpose(1, 2)
    if width > 0:
        if cache_seqlens is None:
            conv_state.copy_(full[:, n:])
        else:
            keep = min(n, width)
            pos = (
                cache_seqlens.to(torch.long).unsqueeze(1) + torch.arange(n - keep, n, device=x.device)
            ).remainder(width)
            conv_state.scatter_(1, pos.unsqueeze(2).expand(b, keep, d), x[:, n - keep :])
    return y


def gam_mixer_step(
    h: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    scale: float = 1.0,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """gam_mixer for one new row h (B, D) per sequence, its conv inputs before it in conv_state.

    The same math as the last row of gam_mixer over the whole sequence; conv_state is updated as
    in :func:`causal_conv1d_update`.
    """
    x = h.unsqueeze(1)
    local = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, cache_seqlens)
    global_ctx = memory_retrieval(x, memory, scale)
    gate_logits = F.linear(x, gate_weight, gate_bias)
    return gate_fusion(local, global_ctx, gate_logits).squeeze(1)
