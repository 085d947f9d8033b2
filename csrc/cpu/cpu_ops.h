// The CPU implementations of the gam_ext ops (schemas in csrc/ops.cpp), registered in register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
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

// The fused mixer (gam_mixer.cpp): (out, lse, gate_logits, global_ctx) and the backward's
// (dh, dconv_weight, dconv_bias, dmemory, dgate_weight, dgate_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_mixer_fwd(
    const at::Tensor& h, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& memory, const at::Tensor& gate_weight,
    const std::optional<at::Tensor>& gate_bias, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_mixer_bwd(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& memory,
    const at::Tensor& gate_weight, const at::Tensor& lse, const at::Tensor& gate_logits,
    const at::Tensor& global_ctx, double scale);

// The one-token step (gam_step.cpp): conv_state is updated in place.
at::Tensor causal_conv1d_update(const at::Tensor& x, at::Tensor& conv_state,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& cache_seqlens);
at::Tensor gam_mixer_step(const at::Tensor& h, at::Tensor& conv_state,
                          const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                          const at::Tensor& memory, const at::Tensor& gate_logits,
                          const std::optional<at::Tensor>& cache_seqlens, double scale);

// How the retrieval and fused-mixer kernels run the products of bfloat16 inputs now (bf16_gemm.h):
// "bf16" (torch's oneDNN micro-kernel on the CPU's bf16 matrix units) or "fp32" (fp32 tiles).
std::string bf16_gemm_path();

// Which build of the vectorised loops runs (cpu_common.h): "avx512", "avx2" or "baseline".
std::string cpu_isa_name();

}  // namespace gam::cpu
