"""Constant-memory text generation for GAMModel: the recurrent state, prefill, the one-token step.

Nothing in a GAM block mixes tokens except its causal convolution: the layer norms, the memory
retrieval (every row attends to the same learned slots), the gates and the FFN all act on one row
at a time. So the state a model needs to emit the next token is, per layer, the last K-1 inputs
of its conv: n_layer * (K-1) * D numbers per sequence, whatever the length of the context. A
Transformer's KV cache grows with the context instead.

The API follows the inference caches of other recurrent models (Mamba's ``InferenceParams``):

    state = model.allocate_state(batch_size)     # zeros; a few KB
    logits = model.prefill(idx, state)           # the prompt through the fused full-sequence path
    logits = model.step(next_tokens, state)      # one token per sequence, state updated in place
    out = model.generate(idx, max_new_tokens, temperature=..., top_k=..., top_p=..., greedy=...,
                         cuda_graph=...)

**Positions.** GAMModel has learned absolute positions 0 .. block_size-1. While the context fits
(at most block_size tokens) the step is exact: its logits are the last row of ``model(idx)``, up to
floating-point rounding. Past block_size, :func:`gam_ext.modules.generate_tokens` (the full
recompute) runs the last block_size tokens at positions 0 .. block_size-1, so every token's
position shifts at every step and no recurrent state can follow. The step keeps that semantics
exactly: a token's output depends only on the n_layer * (K-1) tokens before it (each conv looks
K-1 rows back), so it re-runs just the window of the last ``min(block_size, n_layer*(K-1)+1)``
tokens at positions block_size-window .. block_size-1 through the full-sequence ops, each block
computing only the rows the next ones still need (n_layer*(K-1)+1, then K-1 fewer per block, 1
in the last). That costs a few rows per step, still independent of the context length; the
state keeps the last window tokens for it.

**CUDA graphs.** The recurrent step (context <= block_size) makes no host synchronisation: the
positions live on the device (``state.positions``, advanced in place), the token history is
shifted on the device, and the step ops allocate only from the caching allocator. So
``torch.cuda.graph`` can capture ``model.step(tokens, state)`` and replay it while the context
stays within block_size (the window step past it is capturable too, as a second graph). The only
host-side field is ``state.seqlen``, which picks the branch; a replay does not advance it, so
advance it yourself when you mix replays with eager calls. Token ids are range-checked on the
CPU, and on CUDA outside a capture (a device-to-host read). :class:`StepGraph` does all of this
for a loop of your own, and ``generate(..., cuda_graph=True)`` for its own: one step is a few
dozen small kernels, and on a GPU their launches from Python can take longer than the kernels; a
replay launches them all at once.

**Dropout** never applies: prefill, step and generate compute what ``model.eval()`` computes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam_ext import ops

__all__ = [
    "GAMState",
    "StepGraph",
    "allocate_state",
    "prefill",
    "step",
    "generate",
    "sample_logits",
    "window_length",
]


@dataclass
class GAMState:
    """The recurrent state of a batch of sequences in a GAMModel (see the module docstring).

    - ``conv``: per block, the last K-1 inputs of its causal conv, (B, K-1, D) in the activation
      dtype, a circular buffer indexed by position (the ``cache_seqlens`` layout of
      :func:`gam_ext.ops.causal_conv1d_update`);
    - ``positions``: (B,) int32 on the device, the number of tokens seen per sequence;
    - ``tokens``: (B, window) int64, the last ``window_length(model)`` tokens (for the step past
      block_size);
    - ``seqlen``: the same count as ``positions``, on the host (it picks the step's branch).
    """

    conv: list[torch.Tensor]
    positions: torch.Tensor
    tokens: torch.Tensor
    seqlen: int = 0

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv[0].dtype

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the state holds; it does not grow with the context."""
        tensors = [*self.conv, self.positions, self.tokens]
        return sum(t.numel() * t.element_size() for t in tensors)

    def copy_(self, other: GAMState) -> GAMState:
        """Make this state (of the same shapes) equal to ``other``, in place."""
        for dst, src in zip(
            [*self.conv, self.positions, self.tokens],
            [*other.conv, other.positions, other.tokens],
            strict=True,
        ):
            dst.copy_(src)
        self.seqlen = other.seqlen
        return self

    def clone(self) -> GAMState:
        return GAMState(
            [t.clone() for t in self.conv], self.positions.clone(), self.tokens.clone(), self.seqlen
        )


def window_length(model: nn.Module) -> int:
    """Tokens the step re-runs past block_size: min(block_size, n_layer * (K-1) + 1)."""
    config = model.config
    return min(config.block_size, config.n_layer * (config.conv_kernel_size - 1) + 1)


def _model_device(model: nn.Module) -> torch.device:
    return model.token_embedding.weight.device


def _activation_dtype(model: nn.Module, device_type: str) -> torch.dtype:
    """The dtype of the conv inputs in the blocks: the parameters', or autocast's for fp32 ones."""
    dtype = model.token_embedding.weight.dtype
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return dtype


def allocate_state(
    model: nn.Module,
    batch_size: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> GAMState:
    """A zero state for ``batch_size`` sequences; dtype and device default to the model's.

    The dtype is the one the blocks' convs compute in: the parameters' dtype, or under autocast
    (when allocated inside ``torch.autocast``) the autocast dtype.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = _model_device(model) if device is None else torch.device(device)
    if dtype is None:
        dtype = _activation_dtype(model, device.type)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    config = model.config
    k1 = config.conv_kernel_size - 1
    conv = [
        torch.zeros(batch_size, k1, config.d_model, dtype=dtype, device=device) for _ in range(config.n_layer)
    ]
    positions = torch.zeros(batch_size, dtype=torch.int32, device=device)
    tokens = torch.zeros(batch_size, window_length(model), dtype=torch.long, device=device)
    return GAMState(conv, positions, tokens, 0)


def _check_state(model: nn.Module, state: object, batch: int) -> None:
    if not isinstance(state, GAMState):
        raise TypeError(f"state must be a GAMState (model.allocate_state), got {type(state).__name__}")
    device = _model_device(model)
    if state.device != device:
        raise ValueError(
            f"state is on {state.device} but the model is on {device}; allocate it "
            f"with model.allocate_state(batch_size, device={str(device)!r})"
        )
    expected = _activation_dtype(model, device.type)
    if state.dtype != expected:
        raise ValueError(
            f"state has dtype {state.dtype} but the model computes in {expected}; "
            f"allocate it with model.allocate_state(batch_size, dtype={expected})"
        )
    if state.batch_size != batch:
        raise ValueError(
            f"state holds {state.batch_size} sequences but the tokens have batch "
            f"size {batch}; allocate it with model.allocate_state({batch})"
        )
    config = model.config
    shape = (batch, config.conv_kernel_size - 1, config.d_model)
    if (
        len(state.conv) != config.n_layer
        or any(tuple(t.shape) != shape for t in state.conv)
        or tuple(state.tokens.shape) != (batch, window_length(model))
    ):
        raise ValueError(
            "state was allocated for a model of another shape; allocate it with this model's allocate_state"
        )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_tokens(model: nn.Module, name: str, tokens: object, ndim: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if tokens.dim() not in ndim:
        raise ValueError(
            f"{name} has shape {tuple(tokens.shape)}; expected "
            + (" or ".join({1: "(B,)", 2: "(B, 1)" if name == "tokens" else "(B, N)"}[n] for n in ndim))
        )
    device = _model_device(model)
    if tokens.device != device:
        raise ValueError(f"{name} is on {tokens.device} but the model is on {device}")
    vocab = model.config.vocab_size
    if tokens.numel() and not _capturing(device):
        low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one device-to-host read
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds the token id {bad}, outside the vocabulary [0, {vocab})")
    return tokens


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """No autograd graph and no dropout (eval mode) for the duration; restores the mode."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _block_tail(block: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The last ``rows`` rows of ``block(x)`` in eval mode, computing only those: LN1 and the conv
    see every row of x (the conv reads the K-1 rows before each kept one), the retrieval, the
    gates and the FFN only the kept rows. The same ops and math as ``GAMBlock.forward``."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), block.ln1.weight, block.ln1.bias, block.ln1.eps)
    local = ops.causal_conv1d(h, block.causal_conv.weight, block.causal_conv.bias)[:, -rows:]
    h = h[:, -rows:]
    global_ctx = ops.memory_retrieval(h, block.memory_bank)
    gate_logits = ops._gate_linear(ops._activation(h), block.gate.weight, block.gate.bias)
    return block._ffn_residual(x[:, -rows:] + ops.gate_fusion(local, global_ctx, gate_logits))


def _window_logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token logits for a context past block_size: the last window tokens at the last
    positions, through the blocks' full-sequence ops, each block computing only the rows that the
    next ones still need (block i: the last (n_layer-1-i)*(K-1)+1)."""
    config = model.config
    k1, n_layer = config.conv_kernel_size - 1, config.n_layer
    n = window.shape[1]
    positions = torch.arange(config.block_size - n, config.block_size, device=window.device)
    x = model.token_embedding(window) + model.pos_embedding(positions)
    for i, block in enumerate(model.blocks):
        x = _block_tail(block, x, min(x.shape[1], (n_layer - 1 - i) * k1 + 1))
    return model.head(model.ln_f(x[:, -1]))


def _fill_conv_state(block: nn.Module, x: torch.Tensor, conv: torch.Tensor) -> None:
    """conv <- the block's conv inputs LN1(x) of the last K-1 positions of x (0 .. n-1)."""
    width = conv.shape[1]
    conv.zero_()
    n = x.shape[1]
    rows = min(n, width)
    if rows == 0:
        return
    d = x.shape[-1]
    h = F.layer_norm(x[:, n - rows :], (d,), block.ln1.weight, block.ln1.bias, block.ln1.eps)
    h = ops._activation(h).to(conv.dtype)
    for i, q in enumerate(range(n - rows, n)):
        conv[:, q % width] = h[:, i]


def prefill(model: nn.Module, idx: torch.Tensor, state: GAMState) -> torch.Tensor:
    """Run the prompt idx (B, N) through the fused full-sequence path, fill ``state`` (all of it is
    overwritten: a state can be reused) and return the next-token logits (B, vocab_size).

    N may exceed block_size: the logits are then those of the last block_size tokens, as
    :func:`gam_ext.modules.generate_tokens` computes them.
    """
    idx = _check_tokens(model, "idx", idx, (2,))
    b, n = idx.shape
    if n < 1:
        raise ValueError("idx must hold at least one token per sequence (N >= 1)")
    _check_state(model, state, b)
    config = model.config
    with _inference(model):
        w = state.tokens.shape[1]
        last = idx[:, -w:]
        state.tokens.zero_()
        state.tokens[:, w - last.shape[1] :] = last
        state.positions.fill_(n)
        state.seqlen = n
        if n > config.block_size:
            for conv in state.conv:
                conv.zero_()
            return _window_logits(model, state.tokens)
        positions = torch.arange(n, device=idx.device)
        x = model.token_embedding(idx) + model.pos_embedding(positions)
        for block, conv in zip(model.blocks, state.conv, strict=True):
            _fill_conv_state(block, x, conv)
            x = block(x)
        return model.head(model.ln_f(x[:, -1]))


def _push_tokens(state: GAMState, tokens: torch.Tensor) -> None:
    """The token history (for the window step past block_size) takes tokens (B,) as its newest."""
    state.tokens.copy_(torch.cat([state.tokens[:, 1:], tokens.unsqueeze(1)], dim=1))


def _recurrent_step(model: nn.Module, tokens: torch.Tensor, state: GAMState) -> torch.Tensor:
    """The device work of a step within block_size, tokens (B,): it reads and writes no host
    state (state.seqlen is the caller's), so a CUDA graph can capture it."""
    _push_tokens(state, tokens)
    x = model.token_embedding(tokens) + model.pos_embedding(state.positions)
    for block, conv in zip(model.blocks, state.conv, strict=True):
        x = block._step(x, conv, state.positions)
    state.positions.add_(1)
    return model.head(model.ln_f(x))


def _step(model: nn.Module, tokens: torch.Tensor, state: GAMState) -> torch.Tensor:
    """The step without argument checks: tokens (B,) on the model's device."""
    with _inference(model):
        if state.seqlen < model.config.block_size:
            logits = _recurrent_step(model, tokens, state)
        else:
            _push_tokens(state, tokens)
            logits = _window_logits(model, state.tokens)
            state.positions.add_(1)
        state.seqlen += 1
    return logits


class StepGraph:
    """``model.step(tokens, state)`` for one state, with the recurrent step captured once in a CUDA
    graph: a call copies the tokens into the graph's input, replays it and returns the logits
    (B, vocab_size) in the graph's output buffer, which the next call overwrites (sample from it,
    or clone it, before the next call). Past block_size a call runs the window step eagerly.

    One step is a few dozen small kernels; launched one by one from Python they can take longer
    than they run, and a replay launches them all at once. The graph holds the state's tensors,
    so it serves this state only (``prefill`` it again to start a new prompt: it is written in
    place). The capture runs no step: construct it after the prefill, at any point. Tokens are
    not range-checked (that needs a device-to-host read); an id outside the vocabulary fails in
    the embedding kernel. ``generate(..., cuda_graph=True)`` builds one for its own loop.
    """

    def __init__(self, model: nn.Module, state: GAMState) -> None:
        if _model_device(model).type != "cuda":
            raise ValueError(
                f"StepGraph needs a model on a CUDA device; this one is on {_model_device(model)}"
            )
        _check_state(model, state, state.batch_size if isinstance(state, GAMState) else 0)
        self.model, self.state = model, state
        device = state.device  # the model's (checked)
        self.tokens = torch.zeros(state.batch_size, dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        with _inference(model), _uncached_autocast():
            # Warm up on a side stream, on a copy of the state (lazy cuBLAS handles and
            # workspaces must not be created inside the capture), at position 0: the state may
            # be past block_size, where the recurrent step's position embedding has no row.
            warm = state.clone()
            warm.positions.zero_()
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                _recurrent_step(model, self.tokens, warm)
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(self.graph):  # records the kernels, runs none: the state stays
                self.logits = _recurrent_step(model, self.tokens, state)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence, (B,) or (B, 1) ids on the model's device; the next-token logits."""
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.numel() != self.tokens.numel()
            or tokens.dim() not in (1, 2)
            or tokens.dtype.is_floating_point
            or tokens.dtype.is_complex
            or tokens.dtype == torch.bool
            or tokens.device != self.tokens.device
        ):
            got = (
                f"shape {tuple(tokens.shape)}, {tokens.dtype} on {tokens.device}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            raise ValueError(
                f"tokens must be {self.tokens.numel()} integer token ids, (B,) or (B, 1), on "
                f"{self.tokens.device}; got {got}"
            )
        if self.state.seqlen >= self.model.config.block_size:
            return _step(self.model, tokens.reshape(-1).to(torch.long), self.state)
        self.tokens.copy_(tokens.reshape(-1))
        self.graph.replay()
        self.state.seqlen += 1
        return self.logits


@contextlib.contextmanager
def _uncached_autocast() -> Iterator[None]:
    """Under CUDA autocast, autocast again without its cast cache: a capture must not use casts
    cached before it (freed when the outer autocast exits, while the graph still reads them)."""
    if not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


def step(model: nn.Module, tokens: torch.Tensor, state: GAMState) -> torch.Tensor:
    """Feed one new token per sequence, tokens (B,) or (B, 1); returns the next-token logits
    (B, vocab_size) and advances ``state`` in place (see the module docstring for positions past
    block_size and for CUDA graphs)."""
    tokens = _check_tokens(model, "tokens", tokens, (1, 2))
    if tokens.dim() == 2 and tokens.shape[1] != 1:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}; step takes one token per sequence, (B,) or (B, 1)"
        )
    tokens = tokens.reshape(-1).to(torch.long)
    _check_state(model, state, tokens.shape[0])
    return _step(model, tokens, state)


def _check_sampling(temperature: object, top_k: object, top_p: object) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (
        not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, V): the argmax when greedy, else a sample from the
    softmax of logits / temperature (floored at 1e-8), restricted to the top_k likeliest tokens
    and then to the smallest set whose probability reaches top_p (nucleus sampling)."""
    _check_sampling(temperature, top_k, top_p)
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-8)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first never is).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def generate(
    model: nn.Module,
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
    """idx (B, N) followed by up to max_new_tokens generated tokens: (B, N + new).

    Prefill, then one recurrent step per token (see the module docstring); the samples follow
    :func:`sample_logits`. With eos_token_id, a sequence that has produced it continues with
    eos_token_id, and generation stops once every sequence has. With cuda_graph (a model on a
    CUDA device), the step within block_size is captured once in a CUDA graph (a
    :class:`StepGraph`) and replayed per token: the same tokens, without the host's per-kernel
    launch cost.
    """
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cuda_graph and _model_device(model).type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs a model on a CUDA device; this one is on {_model_device(model)}"
        )
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    if eos_token_id is not None and (not isinstance(eos_token_id, int) or not 0 <= eos_token_id < vocab):
        raise ValueError(f"eos_token_id must be a token id in [0, {vocab}), got {eos_token_id!r}")
    idx = _check_tokens(model, "idx", idx, (2,))
    if idx.shape[1] < 1:
        raise ValueError("idx must hold at least one token per sequence (N >= 1)")
    if max_new_tokens == 0:
        return idx
    with _inference(model):
        state = allocate_state(model, idx.shape[0])
        logits = prefill(model, idx, state)
        # No graph where no step would replay it (a prompt past block_size: window steps only).
        replays = max_new_tokens > 1 and state.seqlen < model.config.block_size
        next_logits = StepGraph(model, state) if cuda_graph and replays else None
        pieces, done = [idx], None
        for i in range(max_new_tokens):
            token = sample_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
            )
            if eos_token_id is not None:
                done = token == eos_token_id if done is None else done | (token == eos_token_id)
                token = token.masked_fill(done, eos_token_id)
            pieces.append(token.unsqueeze(1).to(idx.dtype))
            if i + 1 == max_new_tokens or (done is not None and bool(done.all())):
                break
            logits = _step(model, token, state) if next_logits is None else next_logits(token)
    return torch.cat(pieces, dim=1)
