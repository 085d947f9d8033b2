"""GAMBlock and GAMModel: the paper's language model, with parameter names matching its public code.

A state_dict saved from the paper's ``GAM_Model`` loads into :class:`GAMModel` with ``strict=True``
(see :meth:`GAMModel.from_official`); the forward pass runs through the gam_ext ops.
:class:`LanguageModel` is the plumbing around the blocks (embeddings, final norm, tied head, loss,
sampling) that GAMModel shares with the training example's baselines.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam_ext import generation, ops
from gam_ext.ops import _check_float_tensor, gam_mixer

__all__ = ["GAMConfig", "GAMBlock", "GAMModel", "LanguageModel", "generate_tokens"]


@dataclass
class GAMConfig:
    vocab_size: int = 10000
    block_size: int = 256
    d_model: int = 512
    n_layer: int = 6
    dropout: float = 0.1
    num_memory_slots: int = 512
    conv_kernel_size: int = 3

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "block_size",
            "d_model",
            "n_layer",
            "num_memory_slots",
            "conv_kernel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GAMConfig.{name} must be a positive int, got {value!r}")
        if (
            not isinstance(self.dropout, (int, float))
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"GAMConfig.dropout must be in [0, 1), got {self.dropout!r}")


class GAMBlock(nn.Module):
    """x + GatedMixer(LN1(x)), then x + Dropout(FFN(LN2(x))); the mixer is conv + memory + gates."""

    def __init__(
        self,
        d_model: int,
        num_memory_slots: int = 512,
        conv_kernel_size: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_memory_slots", num_memory_slots),
            ("conv_kernel_size", conv_kernel_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"GAMBlock: {name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"GAMBlock: {name} must be >= 1, got {value}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"GAMBlock: dropout must be a float in [0, 1), got {dropout!r}")
        self.d_model = d_model
        self.ln1 = nn.LayerNorm(d_model)
        # Held as an nn.Conv1d so checkpoints of the paper's code load; run by gam_ext's kernel.
        self.causal_conv = nn.Conv1d(
            d_model, d_model, conv_kernel_size, padding=conv_kernel_size - 1, groups=d_model
        )
        self.memory_bank = nn.Parameter(torch.empty(num_memory_slots, d_model))
        nn.init.xavier_uniform_(self.memory_bank)
        self.gate = nn.Linear(d_model, 2 * d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.ln2 = nn.LayerNorm(d_model)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The token mixer on the normalised input: gated causal conv and memory retrieval."""
        return gam_mixer(
            h,
            self.causal_conv.weight,
            self.causal_conv.bias,
            self.memory_bank,
            self.gate.weight,
            self.gate.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("x", x, 3)
        x = x + self.mix(self.ln1(x))
        return x + self.ffn(self.ln2(x))

    def step(
        self, x: torch.Tensor, conv_state: torch.Tensor, cache_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block on one new row x (B, D) per sequence: the row ``forward`` would give there.

        conv_state (B, W >= K-1, D) holds the block's last conv inputs (LN1 of earlier rows) and
        takes LN1(x), in place, as in :func:`gam_ext.causal_conv1d_update` (with cache_seqlens, a
        circular buffer by position). Inference: no dropout.
        """
        x = _check_float_tensor("x", x, 2)
        if x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape (B, {self.d_model}), got {tuple(x.shape)}")
        ops._check_same_device("x", x, memory_bank=self.memory_bank)
        ops._check_conv_state(
            "x", ops._activation(x), conv_state, self.causal_conv.kernel_size[0], cache_seqlens
        )
        return self._step(x, conv_state, cache_seqlens)

    def _step(
        self, x: torch.Tensor, conv_state: torch.Tensor, cache_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`step` past its checks, in functional calls (generation's per-token loop runs it:
        a step is host-bound, and each module call and check costs microseconds)."""
        d = self.d_model
        h = ops._activation(F.layer_norm(x, (d,), self.ln1.weight, self.ln1.bias, self.ln1.eps))
        conv = self.causal_conv
        x = x + ops._mixer_step(
            h,
            conv_state,
            conv.weight.reshape(d, conv.kernel_size[0]),
            conv.bias,
            self.memory_bank,
            self.gate.weight,
            self.gate.bias,
            1.0,
            cache_seqlens,
        )
        return self._ffn_residual(x)

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + FFN(LN2(x)) in eval mode, in functional calls (the steps of generation)."""
        u = F.layer_norm(x, (self.d_model,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        up, down = self.ffn[0], self.ffn[2]  # Linear, GELU, Linear: the FFN without its dropout
        return x + F.linear(F.gelu(F.linear(u, up.weight, up.bias)), down.weight, down.bias)


class LanguageModel(nn.Module):
    """What GAMModel and the training example's baselines share around their blocks.

    Token and learned position embeddings with dropout, then ``blocks`` in order, a final
    LayerNorm and an LM head tied to the token embedding; ``forward(idx, targets=None)`` returns
    ``(logits, loss)`` with the mean cross-entropy, and ``generate`` samples from it. A subclass
    gives the blocks, each a module ``(B, N, D) -> (B, N, D)``.

    ``blocks`` (an iterable, built lazily) are registered between the embeddings and the final
    norm, the paper's order; a subclass that passes none sets ``self.blocks`` itself after this
    constructor (the baselines do: their parameters, and the random draws of their
    initialisation, come in that order).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        dropout: float,
        blocks: Iterable[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Embedding(block_size, d_model)
        self.dropout = nn.Dropout(dropout)
        if blocks is not None:
            self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N), N <= block_size -> the blocks' input (B, N, D)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, N) token ids, got shape {tuple(idx.shape)}")
        n = idx.shape[1]
        if n > self.block_size:
            raise ValueError(f"sequence length {n} exceeds block_size {self.block_size}")
        positions = torch.arange(n, device=idx.device)
        return self.dropout(self.token_embedding(idx) + self.pos_embedding(positions))

    def logits_and_loss(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks' output -> logits through the final norm and the tied head, and the mean
        cross-entropy against ``targets`` (positions equal to -100 are ignored), or None."""
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.logits_and_loss(x, targets)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` (B, N), nanoGPT style."""
        return generate_tokens(self, idx, max_new_tokens, self.block_size, temperature, top_k, generator)


class GAMModel(LanguageModel):
    """Token + learned position embeddings, n_layer GAMBlocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GAMConfig) -> None:
        super().__init__(
            config.vocab_size,
            config.block_size,
            config.d_model,
            config.dropout,
            blocks=(
                GAMBlock(config.d_model, config.num_memory_slots, config.conv_kernel_size, config.dropout)
                for _ in range(config.n_layer)
            ),
        )
        self.config = config

    # Generation with a constant-size recurrent state (gam_ext/generation.py has the details).

    def allocate_state(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> generation.GAMState:
        """A zero recurrent state for ``batch_size`` sequences: per block the last K-1 conv
        inputs, n_layer * (K-1) * D numbers per sequence whatever the context length. dtype and
        device default to the model's (the autocast dtype when allocated under autocast)."""
        return generation.allocate_state(self, batch_size, dtype=dtype, device=device)

    def prefill(self, idx: torch.Tensor, state: generation.GAMState) -> torch.Tensor:
        """Run the prompt idx (B, N) through the fused full-sequence path, fill ``state`` and
        return the next-token logits (B, vocab_size)."""
        return generation.prefill(self, idx, state)

    def step(self, tokens: torch.Tensor, state: generation.GAMState) -> torch.Tensor:
        """Feed one token per sequence (B,) and return the next-token logits (B, vocab_size);
        ``state`` advances in place.

        Up to block_size tokens of context the logits are those of the full forward (exact up
        to rounding). Past block_size they are those of :func:`generate_tokens`, which runs the
        last block_size tokens at positions 0 .. block_size-1: since a token's output depends
        only on the n_layer*(K-1) tokens before it, the step re-runs just that window of
        n_layer*(K-1)+1 tokens at positions block_size-window .. block_size-1, still at a cost
        independent of the context length. The recurrent step makes no host synchronisation and
        can be captured in a CUDA graph (see gam_ext/generation.py).
        """
        return generation.step(self, tokens, state)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """idx (B, N) followed by up to ``max_new_tokens`` new tokens, one :meth:`step` each after
        a :meth:`prefill`: constant memory and time per token at any context length. The tokens
        are those of :func:`generate_tokens` (the full recompute, same crop semantics past
        block_size). Sampling: softmax of logits / temperature, restricted to the top_k tokens
        and the top_p nucleus; greedy takes the argmax. A sequence that produced eos_token_id
        continues with it, and generation stops when all have. Runs without dropout or autograd.
        ``cuda_graph=True`` (a model on a GPU) replays the step from a CUDA graph: the same
        tokens, without the host's cost of launching each of the step's kernels.
        """
        return generation.generate(
            self,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            eos_token_id=eos_token_id,
            generator=generator,
            cuda_graph=cuda_graph,
        )

    @classmethod
    def from_official(
        cls,
        state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
        dropout: float = 0.1,
    ) -> GAMModel:
        """Build a GAMModel from a state_dict (or a file holding one) of the paper's GAM_Model.

        The config is inferred from the tensor shapes; loading is strict. Checkpoints that wrap the
        state_dict (``{"model": ...}``) or prefix its keys (``module.`` from DDP, ``_orig_mod.``
        from torch.compile, in any mix such as ``module._orig_mod.``) are unwrapped. A file that is
        not a PyTorch checkpoint raises ValueError; a state_dict without GAM_Model keys, KeyError.
        """
        state = _unwrap_state_dict(state_dict_or_path)
        config = config_from_state_dict(state, dropout=dropout)
        model = cls(config)
        if "head.weight" not in state:
            state = {**state, "head.weight": state["token_embedding.weight"]}
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (see
        :mod:`gam_ext.pretrained`); :meth:`from_pretrained` reads them back."""
        from gam_ext.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory_or_hub_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> GAMModel:
        """A GAMModel from a directory written by :meth:`save_pretrained`, or from a Hugging Face
        Hub repository holding those files (needs ``huggingface_hub`` and the network, or the
        Hub cache). A missing or broken directory, or weights that do not match the config,
        raise an error that says which file and why."""
        from gam_ext.pretrained import load_pretrained

        return load_pretrained(cls, directory_or_hub_id, revision=revision, cache_dir=cache_dir)


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    top_p: float | None = None,
    greedy: bool = False,
) -> torch.Tensor:
    """Autoregressive sampling for any ``model(idx) -> (logits, loss)`` that sees ``block_size`` tokens.

    Each new token reruns the whole model on the last ``block_size`` tokens (positions 0 ..
    block_size-1): the full-recompute baseline of :meth:`GAMModel.generate`, with the same
    sampling (:func:`gam_ext.generation.sample_logits`).
    """
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        next_token = generation.sample_logits(
            logits[:, -1, :],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            generator=generator,
        )
        idx = torch.cat([idx, next_token.unsqueeze(1)], dim=1)
    return idx


# Key prefixes of wrappers: DDP (module.) and torch.compile (_orig_mod.), nested in any order.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.blocks.0...`` (DDP around a compiled model) -> ``blocks.0...``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch.load's weights-only error that names what it refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else type(exc).__name__


def _load_checkpoint_file(path: str) -> Any:
    """torch.load a checkpoint's tensors only, with an error that says what the file is not."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (since torch 1.6) or, in the legacy format, a pickle.
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise ValueError(
            f"{path!r} is not a PyTorch checkpoint (a file written by torch.save holding a "
            "GAM_Model state_dict); its first bytes are " + repr(head)
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"cannot read {path!r} as a checkpoint of tensors: it holds other objects "
            f"({_unpickler_reason(exc)}). If you trust the file, load it with "
            "torch.load(path, weights_only=False) and pass its state_dict"
        ) from exc
    except Exception as exc:
        raise ValueError(
            f"cannot read {path!r} as a checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc


def _unwrap_state_dict(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
) -> dict[str, torch.Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file at {path!r}")
        state: Any = _load_checkpoint_file(path)
    else:
        state = state_dict_or_path
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state_dict (a mapping), got {type(state).__name__}")
    for wrapper_key in ("model", "state_dict", "model_state_dict"):
        if "token_embedding.weight" not in state and isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
    result = {}
    for key, value in state.items():
        result[_strip_wrapper_prefixes(key)] = value
    if "token_embedding.weight" not in result:
        raise KeyError(
            "not a GAM_Model state_dict: it has no 'token_embedding.weight' "
            f"(keys start with {sorted(result)[:5]})"
        )
    return result


def config_from_state_dict(state: Mapping[str, torch.Tensor], dropout: float = 0.1) -> GAMConfig:
    """Infer a GAMConfig (vocab, block size, width, layers, slots, kernel size) from tensor shapes."""
    vocab_size, d_model = state["token_embedding.weight"].shape
    block_size = state["pos_embedding.weight"].shape[0]
    layer_ids = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    n_layer = len(layer_ids)
    if n_layer == 0 or layer_ids != set(range(n_layer)):
        raise KeyError(f"blocks must be numbered 0..n-1, found {sorted(layer_ids)}")
    num_memory_slots = state["blocks.0.memory_bank"].shape[0]
    conv_kernel_size = state["blocks.0.causal_conv.weight"].shape[-1]
    return GAMConfig(
        vocab_size=int(vocab_size),
        block_size=int(block_size),
        d_model=int(d_model),
        n_layer=n_layer,
        dropout=dropout,
        num_memory_slots=int(num_memory_slots),
        conv_kernel_size=int(conv_kernel_size),
    )
