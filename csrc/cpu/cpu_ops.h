// The CPU implementations of the gam_ext ops (schemas in csrc/ops.cpp), registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace gam::cpu {

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(const at::Tensor& grad_y,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor> memory_retrieval_fwd(const at::Tensor& h,
                                                        const at::Tensor& memory, double scale);
std::tuple<at::Tensor, at::Tensor> memory_retrieval_bwd(const at::Tensor& grad_out,
                                                        const at::Tensor& h,
                                                        const at::Tensor& memory,
                                                        const at::Tensor& out,
                                                        const at::Tensor& lse, double scale);

at::Tensor gate_fusion_fwd(const at::Tensor& local, const at::Tensor& global_ctx,
                           const at::Tensor& gate_logits);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_fusion_bwd(const at::Tensor& grad_out,
                                                               const at::Tensor& local,
                                                               const at::Tensor& global_ctx,
                                                               const at::Tensor& gate_logits);

// Checks of a gradient argument against the tensor it is the gradient of.
inline void check_grad_like(const at::Tensor& grad, const at::Tensor& like, const char* name,
                            const char* like_name) {
  const auto st = grad.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              name, " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(grad.device() == like.device(), name, " is on ", grad.device(), " but ", like_name,
              " is on ", like.device());
  TORCH_CHECK(grad.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", grad.sizes());
}

}  // namespace gam::cpu
