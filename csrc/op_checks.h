// The contract of every op shared by its CPU and CUDA implementations: the argument checks of the
// forward and backward ops, so that a direct call of torch.ops.gam_ext.* with bad input fails with
// a message naming the argument, never a crash; and the dtype the memory bank is computed in.
#pragma once

#include <ATen/ATen.h>

namespace gam {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", st);
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                         const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// A float tensor of the given rank; with ref, on ref's device too.
inline void check_float_tensor(const at::Tensor& t, int64_t rank, const char* name) {
  check_float(t, name);
  check_rank(t, rank, name);
}
inline void check_float_tensor(const at::Tensor& t, int64_t rank, const char* name,
                               const at::Tensor& ref, const char* ref_name) {
  check_float_tensor(t, rank, name);
  check_device(t, ref, name, ref_name);
}

// x (B, N, D), weight (D, K) with K >= 1, bias (D) or none.
inline void check_conv_args(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  check_float_tensor(x, 3, "x");
  check_float_tensor(weight, 2, "weight", x, "x");
  TORCH_CHECK(weight.size(0) == x.size(2), "weight has ", weight.size(0),
              " channels but x has D=", x.size(2));
  TORCH_CHECK(weight.size(1) >= 1, "weight must have a kernel size K >= 1, got K=0");
  if (bias.has_value()) {
    check_float_tensor(*bias, 1, "bias", x, "x");
    TORCH_CHECK(bias->size(0) == x.size(2), "bias must have shape (", x.size(2), "), got ",
                bias->sizes());
  }
}

// h (B, N, D), memory (S, D) with S >= 1.
inline void check_memory_args(const at::Tensor& h, const at::Tensor& memory) {
  check_float_tensor(h, 3, "h");
  check_float_tensor(memory, 2, "memory", h, "h");
  TORCH_CHECK(memory.size(1) == h.size(2), "memory must have shape (S, ", h.size(2),
              ") to match h, got ", memory.sizes());
  TORCH_CHECK(memory.size(0) >= 1, "memory must have at least one slot (S >= 1)");
}

// local and global_ctx (B, N, D) of one dtype, gate_logits (B, N, 2D) of the same dtype.
inline void check_gate_args(const at::Tensor& local, const at::Tensor& global_ctx,
                            const at::Tensor& gate_logits) {
  check_float_tensor(local, 3, "local");
  check_rank(global_ctx, 3, "global_ctx");
  check_rank(gate_logits, 3, "gate_logits");
  check_device(global_ctx, local, "global_ctx", "local");
  check_device(gate_logits, local, "gate_logits", "local");
  TORCH_CHECK(global_ctx.sizes() == local.sizes(), "global_ctx must have the shape of local ",
              local.sizes(), ", got ", global_ctx.sizes());
  TORCH_CHECK(gate_logits.size(0) == local.size(0) && gate_logits.size(1) == local.size(1) &&
                  gate_logits.size(2) == 2 * local.size(2),
              "gate_logits must have shape (B, N, 2D) = (", local.size(0), ", ", local.size(1),
              ", ", 2 * local.size(2), "), got ", gate_logits.sizes());
  TORCH_CHECK(global_ctx.scalar_type() == local.scalar_type() &&
                  gate_logits.scalar_type() == local.scalar_type(),
              "local, global_ctx and gate_logits must share one dtype, got ", local.scalar_type(),
              ", ", global_ctx.scalar_type(), ", ", gate_logits.scalar_type());
}

// A gradient argument against the tensor it is the gradient of: float dtype, device and shape.
inline void check_grad_like(const at::Tensor& grad, const at::Tensor& like, const char* name,
                            const char* like_name) {
  check_float(grad, name);
  check_device(grad, like, name, like_name);
  TORCH_CHECK(grad.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", grad.sizes());
}

// Backward of the causal conv: the forward's checks, and grad_y like x.
inline void check_conv_bwd_args(const at::Tensor& grad_y, const at::Tensor& x,
                                const at::Tensor& weight) {
  check_conv_args(x, weight, c10::nullopt);
  check_grad_like(grad_y, x, "grad_y", "x");
}

// Backward of the memory retrieval: the forward's checks, grad_out and out like h, lse (B, N).
inline void check_memory_bwd_args(const at::Tensor& grad_out, const at::Tensor& h,
                                  const at::Tensor& memory, const at::Tensor& out,
                                  const at::Tensor& lse) {
  check_memory_args(h, memory);
  check_grad_like(grad_out, h, "grad_out", "h");
  check_grad_like(out, h, "out", "h");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == h.size(0) && lse.size(1) == h.size(1),
              "lse must have shape (B, N) = (", h.size(0), ", ", h.size(1), "), got ", lse.sizes());
  check_device(lse, h, "lse", "h");
}

// Backward of the gate fusion: the forward's checks, and grad_out like local.
inline void check_gate_bwd_args(const at::Tensor& grad_out, const at::Tensor& local,
                                const at::Tensor& global_ctx, const at::Tensor& gate_logits) {
  check_gate_args(local, global_ctx, gate_logits);
  check_grad_like(grad_out, local, "grad_out", "local");
}

// ---- The fused mixer (gam_mixer_fwd, gam_mixer_bwd)
// ----------------------------------------------

// h (B, N, D); the conv's weight (D, K), K >= 1, and bias (D) or none; memory (S, D), S >= 1;
// gate_weight (2D, D) and gate_bias (2D) or none.
inline void check_mixer_args(const at::Tensor& h, const at::Tensor& conv_weight,
                             const c10::optional<at::Tensor>& conv_bias, const at::Tensor& memory,
                             const at::Tensor& gate_weight,
                             const c10::optional<at::Tensor>& gate_bias) {
  check_float_tensor(h, 3, "h");
  const int64_t dim = h.size(2);
  check_float_tensor(conv_weight, 2, "conv_weight", h, "h");
  TORCH_CHECK(conv_weight.size(0) == dim, "conv_weight has ", conv_weight.size(0),
              " channels but h has D=", dim);
  TORCH_CHECK(conv_weight.size(1) >= 1, "conv_weight must have a kernel size K >= 1, got K=0");
  if (conv_bias.has_value()) {
    check_float_tensor(*conv_bias, 1, "conv_bias", h, "h");
    TORCH_CHECK(conv_bias->size(0) == dim, "conv_bias must have shape (", dim, "), got ",
                conv_bias->sizes());
  }
  check_float_tensor(memory, 2, "memory", h, "h");
  TORCH_CHECK(memory.size(1) == dim, "memory must have shape (S, ", dim, ") to match h, got ",
              memory.sizes());
  TORCH_CHECK(memory.size(0) >= 1, "memory must have at least one slot (S >= 1)");
  check_float_tensor(gate_weight, 2, "gate_weight", h, "h");
  TORCH_CHECK(gate_weight.size(0) == 2 * dim && gate_weight.size(1) == dim,
              "gate_weight must have shape (2D, D) = (", 2 * dim, ", ", dim, "), got ",
              gate_weight.sizes());
  if (gate_bias.has_value()) {
    check_float_tensor(*gate_bias, 1, "gate_bias", h, "h");
    TORCH_CHECK(gate_bias->size(0) == 2 * dim, "gate_bias must have shape (", 2 * dim, "), got ",
                gate_bias->sizes());
  }
}

// Backward of the fused mixer: the forward's checks, grad_out and global_ctx like h, lse (B, N),
// gate_logits (B, N, 2D).
inline void check_mixer_bwd_args(const at::Tensor& grad_out, const at::Tensor& h,
                                 const at::Tensor& conv_weight,
                                 const c10::optional<at::Tensor>& conv_bias,
                                 const at::Tensor& memory, const at::Tensor& gate_weight,
                                 const at::Tensor& lse, const at::Tensor& gate_logits,
                                 const at::Tensor& global_ctx) {
  check_mixer_args(h, conv_weight, conv_bias, memory, gate_weight, c10::nullopt);
  check_grad_like(grad_out, h, "grad_out", "h");
  check_grad_like(global_ctx, h, "global_ctx", "h");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == h.size(0) && lse.size(1) == h.size(1),
              "lse must have shape (B, N) = (", h.size(0), ", ", h.size(1), "), got ", lse.sizes());
  check_device(lse, h, "lse", "h");
  check_float(gate_logits, "gate_logits");
  check_device(gate_logits, h, "gate_logits", "h");
  TORCH_CHECK(gate_logits.dim() == 3 && gate_logits.size(0) == h.size(0) &&
                  gate_logits.size(1) == h.size(1) && gate_logits.size(2) == 2 * h.size(2),
              "gate_logits must have shape (B, N, 2D) = (", h.size(0), ", ", h.size(1), ", ",
              2 * h.size(2), "), got ", gate_logits.sizes());
}

// ---- The one-token step (causal_conv1d_update, gam_mixer_step) --------------------------------

// The conv state of the step ops: conv_state (B, W, D) in the activation dtype, contiguous (the
// kernels update it in place), W >= K-1 rows; cache_seqlens (B) int32 or int64, or none.
inline void check_conv_state_args(const at::Tensor& act, const char* act_name, int64_t batch,
                                  int64_t dim, int64_t kwidth, const at::Tensor& conv_state,
                                  const c10::optional<at::Tensor>& cache_seqlens) {
  check_rank(conv_state, 3, "conv_state");
  check_device(conv_state, act, "conv_state", act_name);
  TORCH_CHECK(conv_state.scalar_type() == act.scalar_type(), "conv_state must have the dtype of ",
              act_name, " (", act.scalar_type(), "), got ", conv_state.scalar_type());
  TORCH_CHECK(conv_state.size(0) == batch && conv_state.size(2) == dim,
              "conv_state must have shape (B, W, D) = (", batch, ", W, ", dim, "), got ",
              conv_state.sizes());
  TORCH_CHECK(conv_state.size(1) >= kwidth - 1, "conv_state must hold at least K-1 = ", kwidth - 1,
              " rows, got W=", conv_state.size(1));
  TORCH_CHECK(conv_state.is_contiguous(), "conv_state must be contiguous (it is updated in place)");
  if (cache_seqlens.has_value()) {
    const at::Tensor& s = *cache_seqlens;
    check_device(s, act, "cache_seqlens", act_name);
    TORCH_CHECK(s.scalar_type() == at::kInt || s.scalar_type() == at::kLong,
                "cache_seqlens must be int32 or int64, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 1 && s.size(0) == batch, "cache_seqlens must have shape (B,) = (", batch,
                ",), got ", s.sizes());
  }
}

// causal_conv1d_update: x (B, L, D) new rows, the conv's weight and bias, and its state.
inline void check_conv_update_args(const at::Tensor& x, const at::Tensor& conv_state,
                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& cache_seqlens) {
  check_conv_args(x, weight, bias);
  check_conv_state_args(x, "x", x.size(0), x.size(2), weight.size(1), conv_state, cache_seqlens);
}

// gam_mixer_step: h (B, D) one row per sequence, the conv's weight (D, K) and bias (D), its
// state, memory (S, D) with S >= 1, gate_logits (B, 2D) in h's dtype.
inline void check_mixer_step_args(const at::Tensor& h, const at::Tensor& conv_state,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& memory, const at::Tensor& gate_logits,
                                  const c10::optional<at::Tensor>& cache_seqlens) {
  check_float_tensor(h, 2, "h");
  const int64_t batch = h.size(0), dim = h.size(1);
  check_float_tensor(weight, 2, "weight", h, "h");
  TORCH_CHECK(weight.size(0) == dim, "weight has ", weight.size(0), " channels but h has D=", dim);
  TORCH_CHECK(weight.size(1) >= 1, "weight must have a kernel size K >= 1, got K=0");
  if (bias.has_value()) {
    check_float_tensor(*bias, 1, "bias", h, "h");
    TORCH_CHECK(bias->size(0) == dim, "bias must have shape (", dim, "), got ", bias->sizes());
  }
  check_float_tensor(memory, 2, "memory", h, "h");
  TORCH_CHECK(memory.size(1) == dim, "memory must have shape (S, ", dim, ") to match h, got ",
              memory.sizes());
  TORCH_CHECK(memory.size(0) >= 1, "memory must have at least one slot (S >= 1)");
  check_rank(gate_logits, 2, "gate_logits");
  check_device(gate_logits, h, "gate_logits", "h");
  TORCH_CHECK(gate_logits.size(0) == batch && gate_logits.size(1) == 2 * dim,
              "gate_logits must have shape (B, 2D) = (", batch, ", ", 2 * dim, "), got ",
              gate_logits.sizes());
  TORCH_CHECK(gate_logits.scalar_type() == h.scalar_type(),
              "gate_logits must have the dtype of h (", h.scalar_type(), "), got ",
              gate_logits.scalar_type());
  check_conv_state_args(h, "h", batch, dim, weight.size(1), conv_state, cache_seqlens);
}

// The precision of the memory bank, one rule for every device: M is rounded to the activation
// dtype (h's) before any product, as torch.autocast treats the eager formulation
// (reference.memory_retrieval), whose matmuls cast both operands to the autocast dtype. An fp32
// bank with bf16 activations is therefore rounded to bf16 on the CPU and on the GPU alike; the
// kernels then accumulate in fp32 (fp64 for fp64). The gradient of M is returned in M's dtype.
inline at::Tensor memory_in_activation_dtype(const at::Tensor& memory, const at::Tensor& h) {
  return memory.to(h.scalar_type()).contiguous();
}

}  // namespace gam
