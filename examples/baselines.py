"""The paper's baselines, built to the same interface as gam_ext.GAMModel.

Each model subclasses ``gam_ext.modules.LanguageModel``, as GAMModel does: token and learned
position embeddings, a final LayerNorm, an LM head tied to the token embedding,
``forward(idx, targets=None) -> (logits, loss)``, ``generate(...)`` and ``num_parameters()``; the
classes here only build their blocks.

- TransformerLM: GPT-style pre-LN Transformer (8 heads, GELU MLP 4x, causal
  F.scaled_dot_product_attention). At the paper's size: 24,166,400 parameters.
- MambaLM: Mamba mixers (d_state 16, d_conv 4, expand 3) each inside a residual pre-norm block
  with RMSNorm. The mixer comes from ``mamba_ssm`` (CUDA kernels) where it imports and the model
  runs on CUDA, else from the pure-PyTorch ``mambapy`` package. At the paper's size: 20,507,648
  parameters (the paper's 20,504,576 used six bare mixers; the residual blocks add 6 RMSNorms).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import gam_ext
from gam_ext.modules import LanguageModel

MODELS = ("gam", "transformer", "mamba")


# ------------------------------------------------------------------------------------------------
# Transformer
# ------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model {d_model} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(b, n, d)
        return self.resid_dropout(self.proj(y))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(LanguageModel):
    """GPT-style pre-LN Transformer with learned positions and a tied head."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_layer: int,
        n_head: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(vocab_size, block_size, d_model, dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_head, dropout) for _ in range(n_layer))


# ------------------------------------------------------------------------------------------------
# Mamba
# ------------------------------------------------------------------------------------------------


def mamba_implementation(device: torch.device | str) -> str:
    """``"mamba_ssm"`` when its CUDA mixer imports and the device is CUDA, else ``"mambapy"``."""
    if torch.device(device).type == "cuda":
        try:
            import mamba_ssm  # noqa: F401
            from mamba_ssm.modules.mamba_simple import Mamba  # noqa: F401

            return "mamba_ssm"
        except ImportError:
            pass
    try:
        import mambapy  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "--model mamba needs the `mambapy` package on CPU (pip install mambapy) or `mamba_ssm` on CUDA"
        ) from exc
    return "mambapy"


class MambaSSMBlock(nn.Module):
    """mamba_ssm's Mamba mixer inside its own residual Block with RMSNorm, made sequential.

    mamba_ssm's Block keeps the residual stream apart, (hidden, residual) -> (mixer(norm(h + r)),
    h + r); this wrapper adds the two back so that every block maps x -> x + mixer(norm(x)).
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        from functools import partial

        from mamba_ssm.modules.mamba_simple import Mamba

        try:
            from mamba_ssm.ops.triton.layer_norm import RMSNorm
        except ImportError:  # older releases
            from mamba_ssm.ops.triton.layernorm import RMSNorm
        try:
            from mamba_ssm.modules.block import Block
        except ImportError:  # older releases
            from mamba_ssm.modules.mamba_simple import Block

        mixer_cls = partial(Mamba, d_state=d_state, d_conv=d_conv, expand=expand)
        norm_cls = partial(RMSNorm, eps=1e-5)
        try:
            self.block = Block(
                d_model,
                mixer_cls,
                mlp_cls=nn.Identity,
                norm_cls=norm_cls,
                fused_add_norm=False,
                residual_in_fp32=True,
            )
        except TypeError:  # releases before the mlp_cls argument
            self.block = Block(
                d_model, mixer_cls, norm_cls=norm_cls, fused_add_norm=False, residual_in_fp32=True
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.block(x, None)
        return (hidden + residual).to(x.dtype)


class MambaPyBlock(nn.Module):
    """mambapy's MambaBlock mixer in its ResidualBlock: x + mixer(RMSNorm(x)), pure PyTorch."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        from mambapy.mamba import MambaConfig, ResidualBlock

        config = MambaConfig(
            d_model=d_model, n_layers=1, d_state=d_state, d_conv=d_conv, expand_factor=expand, pscan=True
        )
        self.block = ResidualBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MambaLM(LanguageModel):
    """Residual pre-norm Mamba blocks (RMSNorm) between the shared embeddings and the tied head."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_layer: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 3,
        dropout: float = 0.1,
        implementation: str = "mambapy",
    ) -> None:
        super().__init__(vocab_size, block_size, d_model, dropout)
        block_cls = {"mamba_ssm": MambaSSMBlock, "mambapy": MambaPyBlock}[implementation]
        self.implementation = implementation
        self.blocks = nn.ModuleList(block_cls(d_model, d_state, d_conv, expand) for _ in range(n_layer))


# ------------------------------------------------------------------------------------------------
# One entry point for the training script
# ------------------------------------------------------------------------------------------------


def build_model(
    name: str,
    vocab_size: int,
    block_size: int,
    d_model: int = 512,
    n_layer: int = 6,
    dropout: float = 0.1,
    num_memory_slots: int = 512,
    conv_kernel_size: int = 3,
    n_head: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, str]:
    """Build ``gam``, ``transformer`` or ``mamba``; returns (model, a line describing it)."""
    if name == "gam":
        config = gam_ext.GAMConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            d_model=d_model,
            n_layer=n_layer,
            dropout=dropout,
            num_memory_slots=num_memory_slots,
            conv_kernel_size=conv_kernel_size,
        )
        model: nn.Module = gam_ext.GAMModel(config)
        info = f"GAM (gam_ext, {num_memory_slots} memory slots, conv K={conv_kernel_size})"
    elif name == "transformer":
        model = TransformerLM(vocab_size, block_size, d_model, n_layer, n_head, dropout)
        info = f"Transformer (pre-LN GPT, {n_head} heads, scaled_dot_product_attention)"
    elif name == "mamba":
        implementation = mamba_implementation(device)
        model = MambaLM(
            vocab_size, block_size, d_model, n_layer, dropout=dropout, implementation=implementation
        )
        info = f"Mamba (d_state 16, d_conv 4, expand 3, residual RMSNorm blocks, {implementation})"
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model, info
