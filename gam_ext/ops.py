"""Public GAM primitives: argument checks, then the compiled op or the reference.

Each primitive takes token-major ``(B, N, D)`` tensors and is differentiable in every tensor
argument. The compiled ops ``torch.ops.gam_ext.<op>_fwd`` / ``<op>_bwd`` get their fake (meta)
kernels and their autograd formula here, so ``torch.compile(fullgraph=True)`` traces them and
``torch.library.opcheck`` passes.

Higher-order and forward-mode derivatives go through the pure-PyTorch reference math
(``gam_ext.reference``), which autograd and torch.func differentiate to any order:

- a backward run with ``create_graph=True`` (double backward, gradient penalties,
  ``torch.autograd.functional.hessian``) computes each op's input gradients as a differentiable
  vector-Jacobian product of the reference math, on the saved inputs, in fp32 (fp64 for fp64
  inputs); an ordinary backward runs the compiled ``*_bwd`` kernel;
- under a differentiating torch.func transform (``grad``, ``vjp``, ``jacrev``, ``jvp``,
  ``jacfwd``, ``hessian``), and for inputs that carry a ``torch.autograd.forward_ad`` tangent, the
  op itself runs the reference math. ``vmap`` and ``functionalize`` alone keep the kernels, and so
  do ``torch.compile`` and ``torch.export`` traces.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

from gam_ext import _backend, reference

__all__ = [
    "causal_conv1d",
    "memory_retrieval",
    "gate_fusion",
    "gam_mixer",
    "gam_block",
    "causal_conv1d_update",
    "gam_mixer_step",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Argument checks: a clear Python exception that names the argument, before any kernel runs.
# --------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _check_param(name: str, value: object, shape: tuple[int, ...], optional: bool = False) -> None:
    """A parameter tensor of exactly ``shape`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return
    _check_float_tensor(name, value, len(shape))
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")


def _check_same_device(reference_name: str, reference_tensor: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference_tensor.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on "
                f"{reference_tensor.device}; all tensors must be on one device"
            )


def _activation(t: torch.Tensor) -> torch.Tensor:
    """Under autocast, run an op's activation input in the autocast dtype (parameters stay)."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and t.dtype == torch.float32:
        return t.to(torch.get_autocast_dtype(device_type))
    return t


def _check_conv(x: object, weight: object, bias: object) -> torch.Tensor:
    x = _check_float_tensor("x", x, 3)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 3:
        if weight.shape[1] != 1:
            raise ValueError(
                f"weight of shape (D, 1, K) expected for a depthwise conv, got {tuple(weight.shape)}"
            )
    elif weight.dim() != 2:
        raise ValueError(f"weight must be (D, K) or (D, 1, K), got shape {tuple(weight.shape)}")
    _check_float_tensor("weight", weight, weight.dim())
    d = x.shape[2]
    if weight.shape[0] != d:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has D={d}")
    if weight.shape[-1] < 1:
        raise ValueError("weight must have a kernel size K >= 1, got K=0")
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
        if bias.shape[0] != d:
            raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
    _check_same_device("x", x, weight=weight, bias=bias)
    return weight.reshape(d, weight.shape[-1])


def _check_memory(h: object, memory: object, scale: object) -> None:
    h = _check_float_tensor("h", h, 3)
    memory = _check_float_tensor("memory", memory, 2)
    if memory.shape[1] != h.shape[2]:
        raise ValueError(f"memory must have shape (S, {h.shape[2]}) to match h, got {tuple(memory.shape)}")
    if memory.shape[0] < 1:
        raise ValueError("memory must have at least one slot (S >= 1)")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    _check_same_device("h", h, memory=memory)


def _check_gate(local: object, global_ctx: object, gate_logits: object) -> None:
    local = _check_float_tensor("local", local, 3)
    global_ctx = _check_float_tensor("global_ctx", global_ctx, 3)
    gate_logits = _check_float_tensor("gate_logits", gate_logits, 3)
    if global_ctx.shape != local.shape:
        raise ValueError(
            f"global_ctx must have the shape of local {tuple(local.shape)}, got {tuple(global_ctx.shape)}"
        )
    b, n, d = local.shape
    if tuple(gate_logits.shape) != (b, n, 2 * d):
        raise ValueError(
            f"gate_logits must have shape {(b, n, 2 * d)} (first D local, last D global), "
            f"got {tuple(gate_logits.shape)}"
        )
    _check_same_device("local", local, global_ctx=global_ctx, gate_logits=gate_logits)


# --------------------------------------------------------------------------------------------
# Which math runs: torch.func transforms and forward-mode AD take the reference
# --------------------------------------------------------------------------------------------

_DIFFERENTIATING_TRANSFORMS = (TransformType.Grad, TransformType.Jvp)


def _needs_reference_math(*tensors: torch.Tensor | None) -> bool:
    """True when the compiled ops cannot give the derivatives asked for, so the reference must run.

    That is under a torch.func transform that differentiates (grad, vjp, jacrev, jvp, jacfwd,
    hessian: the compiled ops have neither a forward-mode formula nor functorch support), or when
    an input carries a forward-mode tangent of ``torch.autograd.forward_ad``. Cheap: two global
    reads when neither is active; nothing at all while torch.compile or torch.export traces.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.maybe_current_level() is not None and any(
        interpreter.key() in _DIFFERENTIATING_TRANSFORMS
        for interpreter in retrieve_all_functorch_interpreters()
    ):
        return True
    if forward_ad._current_level >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _use_kernel(
    op: str,
    device_type: str,
    dtype: torch.dtype,
    *tensors: torch.Tensor | None,
    elements: int | None = None,
) -> bool:
    return _backend.use_kernel(op, device_type, dtype, elements) and not _needs_reference_math(*tensors)


# --------------------------------------------------------------------------------------------
# Public primitives
# --------------------------------------------------------------------------------------------


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv over time of ``x`` (B, N, D); weight (D, K) or (D, 1, K)."""
    weight_2d = _check_conv(x, weight, bias)
    x = _activation(x)
    if _use_kernel("causal_conv1d", x.device.type, x.dtype, x, weight_2d, bias):
        return torch.ops.gam_ext.causal_conv1d_fwd(x, weight_2d, bias)
    return reference.causal_conv1d(x, weight_2d, bias)


def memory_retrieval(h: torch.Tensor, memory: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """softmax(scale * h M^T) M for h (B, N, D) and the memory bank M (S, D)."""
    _check_memory(h, memory, scale)
    h = _activation(h)
    if _use_kernel("memory_retrieval", h.device.type, h.dtype, h, memory):
        return torch.ops.gam_ext.memory_retrieval_fwd(h, memory, float(scale))[0]
    return reference.memory_retrieval(h, memory, scale)


def gate_fusion(local: torch.Tensor, global_ctx: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(zl) * local + sigmoid(zg) * global_ctx; gate_logits (B, N, 2D) holds [zl, zg].

    Inputs of different dtypes are computed in their promoted dtype.
    """
    _check_gate(local, global_ctx, gate_logits)
    dtype = torch.promote_types(torch.promote_types(local.dtype, global_ctx.dtype), gate_logits.dtype)
    local, global_ctx, gate_logits = (t.to(dtype) for t in (local, global_ctx, gate_logits))
    if _use_kernel("gate_fusion", local.device.type, dtype, local, global_ctx, gate_logits):
        return torch.ops.gam_ext.gate_fusion_fwd(local, global_ctx, gate_logits)
    return reference.gate_fusion(local, global_ctx, gate_logits)


def gam_mixer(
    h: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """gate_fusion(causal_conv1d(h), memory_retrieval(h), h @ gate_weight.T + gate_bias).

    gate_weight is (2D, D) and gate_bias (2D,) or None, as ``nn.Linear(D, 2D)``. Where the fused
    op is built for h's device and dtype and the backend picks it (``auto``: on the CPU, and on
    CUDA up to ``_backend.AUTO_FUSED_MAX_ELEMENTS`` elements of h; ``fused``: everywhere), the
    whole mixer runs as one op, ``torch.ops.gam_ext.gam_mixer_fwd`` / ``gam_mixer_bwd``: the
    conv's output is never written, the retrieval's only kept for the backward. Otherwise
    (``auto`` on CUDA above that size, ``unfused``, or no fused kernel) it runs the three
    primitives and a gate linear.
    """
    _check_float_tensor("h", h, 3)
    d = h.shape[2]
    _check_param("gate_weight", gate_weight, (2 * d, d))
    _check_param("gate_bias", gate_bias, (2 * d,), optional=True)
    _check_same_device("h", h, gate_weight=gate_weight, gate_bias=gate_bias)
    weight_2d = _check_conv(h, conv_weight, conv_bias)
    _check_memory(h, memory, scale)
    act = _activation(h)
    if _use_kernel(
        "gam_mixer",
        act.device.type,
        act.dtype,
        act,
        weight_2d,
        conv_bias,
        memory,
        gate_weight,
        gate_bias,
        elements=act.numel(),
    ):
        return torch.ops.gam_ext.gam_mixer_fwd(
            act, weight_2d, conv_bias, memory, gate_weight, gate_bias, float(scale)
        )[0]
    # The three take the one cast of h (under autocast each would cast it again, and autograd
    # would convert three gradients back to fp32 and sum them there).
    local = causal_conv1d(act, conv_weight, conv_bias)
    global_ctx = memory_retrieval(act, memory, scale)
    gate_logits = _gate_linear(act, gate_weight, gate_bias)
    return gate_fusion(local, global_ctx, gate_logits)


def _gate_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h @ weight.T + bias. With the CPU kernels and half activations that the CPU has no matrix
    units for, computed in fp32.

    torch's float16/bfloat16 GEMM on a CPU without native half-precision matrix instructions runs
    far slower than its fp32 GEMM (figures: docs/design.md, "Half precision on the CPU"), so the
    gate linear would dominate the mixer; in fp32 it is fast (and more accurate), rounded once to
    h's dtype. This also takes fp32 parameters with half activations outside autocast. bfloat16 on
    a CPU with bf16 matrix units (where the CPU kernels run their own bf16 products) stays in
    bfloat16, as the fused op computes z: there it is about four times faster than fp32.
    """
    if (
        h.device.type == "cpu"
        and h.dtype in (torch.float16, torch.bfloat16)
        and _backend.use_kernel("gate_fusion", "cpu", h.dtype)
        and not _backend.cpu_bf16_products(h.dtype)
    ):
        with torch.autocast("cpu", enabled=False):
            out = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
        return out.to(h.dtype)
    # Parameters follow the activations' dtype, as in the other ops (a no-op under autocast).
    return F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))


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
    """One GAM block (docs/paper.md): x + mixer(LN1(x)), then + Dropout(W2 GELU(W1 LN2(.))).

    LayerNorm weights and biases are (D,); ffn_w1 (H, D), ffn_b1 (H,), ffn_w2 (D, H), ffn_b2 (D,)
    as ``nn.Linear``; the mixer's parameters as in :func:`gam_mixer`.
    """
    _check_float_tensor("x", x, 3)
    d = x.shape[-1]
    for name, value in (
        ("ln1_weight", ln1_weight),
        ("ln1_bias", ln1_bias),
        ("ln2_weight", ln2_weight),
        ("ln2_bias", ln2_bias),
    ):
        _check_param(name, value, (d,))
    _check_float_tensor("ffn_w1", ffn_w1, 2)
    hidden = ffn_w1.shape[0]
    _check_param("ffn_w1", ffn_w1, (hidden, d))
    _check_param("ffn_b1", ffn_b1, (hidden,), optional=True)
    _check_param("ffn_w2", ffn_w2, (d, hidden))
    _check_param("ffn_b2", ffn_b2, (d,), optional=True)
    _check_same_device(
        "x",
        x,
        ln1_weight=ln1_weight,
        ln1_bias=ln1_bias,
        ln2_weight=ln2_weight,
        ln2_bias=ln2_bias,
        ffn_w1=ffn_w1,
        ffn_b1=ffn_b1,
        ffn_w2=ffn_w2,
        ffn_b2=ffn_b2,
    )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    h = F.layer_norm(x, (d,), ln1_weight, ln1_bias, eps)
    x = x + gam_mixer(h, conv_weight, conv_bias, memory, gate_weight, gate_bias)
    u = F.layer_norm(x, (d,), ln2_weight, ln2_bias, eps)
    u = F.linear(F.gelu(F.linear(u, ffn_w1, ffn_b1)), ffn_w2, ffn_b2)
    return x + F.dropout(u, dropout, training)


# --------------------------------------------------------------------------------------------
# The one-token step of generation (inference only)
# --------------------------------------------------------------------------------------------


def _check_conv_state(
    act_name: str, act: torch.Tensor, conv_state: object, kwidth: int, cache_seqlens: object
) -> None:
    """conv_state (B, W, D) in the activation's dtype, contiguous, W >= K-1; cache_seqlens (B,)."""
    conv_state = _check_float_tensor("conv_state", conv_state, 3)
    b, d = act.shape[0], act.shape[-1]
    if conv_state.dtype != act.dtype:
        raise TypeError(f"conv_state must have the dtype of {act_name} ({act.dtype}), got {conv_state.dtype}")
    if conv_state.shape[0] != b or conv_state.shape[2] != d:
        raise ValueError(
            f"conv_state must have shape (B, W, D) = ({b}, W, {d}), got {tuple(conv_state.shape)}"
        )
    if conv_state.shape[1] < kwidth - 1:
        raise ValueError(
            f"conv_state must hold at least K-1 = {kwidth - 1} rows, got W={conv_state.shape[1]}"
        )
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous (it is updated in place)")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor):
            raise TypeError(
                f"cache_seqlens must be a torch.Tensor or None, got {type(cache_seqlens).__name__}"
            )
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (b,):
            raise ValueError(f"cache_seqlens must have shape ({b},), got {tuple(cache_seqlens.shape)}")
    _check_same_device(act_name, act, conv_state=conv_state, cache_seqlens=cache_seqlens)


def _use_step_kernel(op: str, device_type: str, dtype: torch.dtype, *tensors) -> bool:
    """The step kernels have no backward: inputs that need a gradient take the reference."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _use_kernel(op, device_type, dtype, *tensors)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """New rows of :func:`causal_conv1d`, the K-1 inputs before them read from a state.

    x is (B, D), one new row per sequence, or (B, L, D); the result has x's shape.
    conv_state (B, W, D), W >= K-1, in x's dtype (the autocast dtype under autocast), contiguous,
    is updated in place. Without cache_seqlens it is a shift register: it holds the W inputs
    before x, oldest first, and afterwards the last W rows of [conv_state; x]. With cache_seqlens
    (B,) int32/int64 it is a circular buffer: the input at absolute position q of sequence b is
    row q mod W, x's first row is at position cache_seqlens[b] (per sequence), and inputs before
    position 0 are zeros, whatever the buffer holds. cache_seqlens is not advanced. Inference
    only: inputs that need a gradient run the reference math.
    """
    if isinstance(x, torch.Tensor) and x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, D) or (B, L, D), got shape {tuple(x.shape)}")
    single = isinstance(x, torch.Tensor) and x.dim() == 2
    if single:
        x = x.unsqueeze(1)
    weight_2d = _check_conv(x, weight, bias)
    x = _activation(x)
    _check_conv_state("x", x, conv_state, weight_2d.shape[1], cache_seqlens)
    if _use_step_kernel("causal_conv1d_update", x.device.type, x.dtype, x, weight_2d, bias):
        y = torch.ops.gam_ext.causal_conv1d_update(x, conv_state, weight_2d, bias, cache_seqlens)
    else:
        y = reference.causal_conv1d_update(x, conv_state, weight_2d, bias, cache_seqlens)
    return y.squeeze(1) if single else y


def gam_mixer_step(
    h: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    scale: float = 1.0,
    *,
    cache_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gam_mixer` for one new row h (B, D) per sequence: the step of text generation.

    The conv reads the K-1 inputs before h from conv_state and pushes h into it (in place, as in
    :func:`causal_conv1d_update`); the retrieval and the gates see only h. The result (B, D) is
    the last row gam_mixer would compute over the whole sequence. Fused into one compiled op
    (``torch.ops.gam_ext.gam_mixer_step``) after the gate linear. Inference only: inputs that
    need a gradient run the reference math.
    """
    h = _check_float_tensor("h", h, 2)
    d = h.shape[1]
    _check_param("gate_weight", gate_weight, (2 * d, d))
    _check_param("gate_bias", gate_bias, (2 * d,), optional=True)
    _check_same_device("h", h, gate_weight=gate_weight, gate_bias=gate_bias)
    weight_2d = _check_conv(h.unsqueeze(1), conv_weight, conv_bias)
    _check_memory(h.unsqueeze(1), memory, scale)
    h = _activation(h)
    _check_conv_state("h", h, conv_state, weight_2d.shape[1], cache_seqlens)
    return _mixer_step(
        h, conv_state, weight_2d, conv_bias, memory, gate_weight, gate_bias, scale, cache_seqlens
    )


def _mixer_step(
    h: torch.Tensor,
    conv_state: torch.Tensor,
    weight_2d: torch.Tensor,
    conv_bias: torch.Tensor | None,
    memory: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    scale: float,
    cache_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """gam_mixer_step past its argument checks, h already in its activation dtype. The model's
    own step calls it directly: its parameters are its own and its state was checked once, and
    at small widths the checks take more host time per token than the step's kernel."""
    gate_logits = _gate_linear(h, gate_weight, gate_bias)
    if _use_step_kernel(
        "gam_mixer_step", h.device.type, h.dtype, h, weight_2d, conv_bias, memory, gate_logits
    ):
        return torch.ops.gam_ext.gam_mixer_step(
            h, conv_state, weight_2d, conv_bias, memory, gate_logits, cache_seqlens, float(scale)
        )
    x = h.unsqueeze(1)
    local = reference.causal_conv1d_update(x, conv_state, weight_2d, conv_bias, cache_seqlens)
    global_ctx = reference.memory_retrieval(x, memory, scale)
    return reference.gate_fusion(local, global_ctx, gate_logits.unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the differentiable backward computes in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reference_vjp(
    fn, inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor, needed: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    """Input gradients of ``fn(*inputs)`` for ``grad_output``, themselves differentiable.

    ``fn`` is an op's reference math; it runs on the saved inputs (which keep their place in the
    graph) cast to the compute dtype of the first one, with autocast off (a CPU backward runs in
    the caller's thread, under its autocast), and the gradients come back in each input's dtype.
    ``needed`` marks the inputs whose gradient is wanted (``ctx.needs_input_grad``).
    """
    dtype = _compute_dtype(inputs[0])
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
    wanted = [i for i, need in enumerate(needed) if need]
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    if not wanted:
        return grads
    device_type = inputs[0].device.type
    no_autocast = (
        torch.autocast(device_type, enabled=False)
        if device_type in ("cpu", "cuda")
        else contextlib.nullcontext()
    )
    with torch.enable_grad(), no_autocast:
        out = fn(*(t.to(dtype) for t in leaves))
        found = torch.autograd.grad(
            out,
            [leaves[i] for i in wanted],
            grad_output.to(dtype),
            create_graph=True,
            allow_unused=True,
        )
    for i, g in zip(wanted, found, strict=True):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


def _register_compiled_ops() -> None:
    lib = "gam_ext::"

    @torch.library.register_fake(lib + "causal_conv1d_fwd")
    def _conv_fwd_fake(x, weight, bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "causal_conv1d_bwd")
    def _conv_bwd_fake(grad_y, x, weight):
        d = weight.shape[0]
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((d,))

    @torch.library.register_fake(lib + "memory_retrieval_fwd")
    def _mem_fwd_fake(h, memory, scale):
        return h.new_empty(h.shape), h.new_empty(h.shape[:2], dtype=torch.float32)

    @torch.library.register_fake(lib + "memory_retrieval_bwd")
    def _mem_bwd_fake(grad_out, h, memory, out, lse, scale):
        return h.new_empty(h.shape), memory.new_empty(memory.shape)

    @torch.library.register_fake(lib + "gate_fusion_fwd")
    def _gate_fwd_fake(local, global_ctx, gate_logits):
        return local.new_empty(local.shape)

    @torch.library.register_fake(lib + "gate_fusion_bwd")
    def _gate_bwd_fake(grad_out, local, global_ctx, gate_logits):
        return (
            local.new_empty(local.shape),
            global_ctx.new_empty(global_ctx.shape),
            gate_logits.new_empty(gate_logits.shape),
        )

    @torch.library.register_fake(lib + "gam_mixer_fwd")
    def _mixer_fwd_fake(h, conv_weight, conv_bias, memory, gate_weight, gate_bias, scale):
        b, n, d = h.shape
        return (
            h.new_empty(h.shape),
            h.new_empty((b, n), dtype=torch.float32),
            h.new_empty((b, n, 2 * d)),
            h.new_empty(h.shape),
        )

    @torch.library.register_fake(lib + "gam_mixer_bwd")
    def _mixer_bwd_fake(
        grad_out, h, conv_weight, conv_bias, memory, gate_weight, lse, gate_logits, global_ctx, scale
    ):
        d = h.shape[2]
        return (
            h.new_empty(h.shape),
            conv_weight.new_empty(conv_weight.shape),
            conv_weight.new_empty((d,)),
            memory.new_empty(memory.shape),
            gate_weight.new_empty(gate_weight.shape),
            gate_weight.new_empty((2 * d,)),
        )

    # The step ops (inference only, no autograd): the output has the shape of the new rows.
    @torch.library.register_fake(lib + "causal_conv1d_update")
    def _conv_update_fake(x, conv_state, weight, bias, cache_seqlens):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "gam_mixer_step")
    def _mixer_step_fake(h, conv_state, conv_weight, conv_bias, memory, gate_logits, cache_seqlens, scale):
        return h.new_empty(h.shape)

    # An ordinary backward runs the *_bwd kernels. A backward with create_graph=True (grad mode is
    # on inside it) computes the same gradients through the reference math instead, so that they
    # are differentiable again: the *_bwd ops have no derivative of their own.

    def conv_setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype

    def conv_backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw = _reference_vjp(
                lambda x, w: reference.causal_conv1d(x, w),
                (x, weight),
                grad_y,
                ctx.needs_input_grad[:2],
            )
            dbias = None
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                dbias = grad_y.to(_compute_dtype(x)).sum((0, 1)).to(ctx.bias_dtype)
            return dx, dw, dbias
        dx, dw, dbias = torch.ops.gam_ext.causal_conv1d_bwd(grad_y, x, weight)
        return dx, dw, None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)

    def mem_setup(ctx, inputs, output):
        h, memory, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(h, memory, out, lse)
        ctx.scale = scale

    def mem_backward(ctx, grad_out, grad_lse):
        h, memory, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if torch.is_grad_enabled():
            scale = ctx.scale
            dh, dmemory = _reference_vjp(
                lambda h, m: reference.memory_retrieval(h, m, scale),
                (h, memory),
                grad_out,
                ctx.needs_input_grad[:2],
            )
            return dh, dmemory, None
        dh, dmemory = torch.ops.gam_ext.memory_retrieval_bwd(grad_out, h, memory, out, lse, ctx.scale)
        return dh, dmemory, None

    def gate_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gate_backward(ctx, grad_out):
        if torch.is_grad_enabled():
            return tuple(
                _reference_vjp(reference.gate_fusion, ctx.saved_tensors, grad_out, ctx.needs_input_grad)
            )
        return torch.ops.gam_ext.gate_fusion_bwd(grad_out, *ctx.saved_tensors)

    def mixer_setup(ctx, inputs, output):
        h, conv_weight, conv_bias, memory, gate_weight, gate_bias, scale = inputs
        _, lse, gate_logits, global_ctx = output
        ctx.mark_non_differentiable(lse, gate_logits, global_ctx)
        # No zero gradients for the three saved outputs (they would cost 3 * B * N * D elements
        # in the backward): the backward takes None for them, and for out when it is unused.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            h, conv_weight, conv_bias, memory, gate_weight, gate_bias, lse, gate_logits, global_ctx
        )
        ctx.scale = scale

    def mixer_backward(ctx, grad_out, grad_lse, grad_z, grad_global):
        (h, conv_weight, conv_bias, memory, gate_weight, gate_bias, lse, gate_logits, global_ctx) = (
            ctx.saved_tensors
        )
        if grad_out is None:
            grad_out = torch.zeros_like(h)
        needed = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            scale = ctx.scale
            present = [
                i
                for i, t in enumerate((h, conv_weight, conv_bias, memory, gate_weight, gate_bias))
                if t is not None
            ]
            tensors = (h, conv_weight, conv_bias, memory, gate_weight, gate_bias)

            def mixer_math(*given):
                full = list(tensors)
                for i, t in zip(present, given, strict=True):
                    full[i] = t
                return reference.gam_mixer(*full, scale)

            found = _reference_vjp(
                mixer_math, tuple(tensors[i] for i in present), grad_out, tuple(needed[i] for i in present)
            )
            grads: list[torch.Tensor | None] = [None] * 6
            for i, g in zip(present, found, strict=True):
                grads[i] = g
            return (*grads, None)
        dh, dcw, dcb, dm, dgw, dgb = torch.ops.gam_ext.gam_mixer_bwd(
            grad_out, h, conv_weight, conv_bias, memory, gate_weight, lse, gate_logits, global_ctx, ctx.scale
        )
        return (
            dh,
            dcw,
            None if conv_bias is None else dcb.to(conv_bias.dtype),
            dm,
            dgw,
            None if gate_bias is None else dgb.to(gate_bias.dtype),
            None,
        )

    torch.library.register_autograd(lib + "gam_mixer_fwd", mixer_backward, setup_context=mixer_setup)
    torch.library.register_autograd(lib + "causal_conv1d_fwd", conv_backward, setup_context=conv_setup)
    torch.library.register_autograd(lib + "memory_retrieval_fwd", mem_backward, setup_context=mem_setup)
    torch.library.register_autograd(lib + "gate_fusion_fwd", gate_backward, setup_context=gate_setup)


if _backend._extension is not None:
    _register_compiled_ops()
