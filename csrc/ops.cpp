// The gam_ext op registry: schemas of every op, and the Python module gam_ext._C.
// Kernels register their implementations per device with TORCH_LIBRARY_IMPL in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (gam_ext/ops.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cpu/cpu_ops.h"

#ifdef GAM_EXT_WITH_CUDA
namespace gam {
namespace cuda {
// csrc/cuda/dispatch.cpp: which retrieval kernels run on the current device.
std::tuple<std::string, std::string, std::string> retrieval_path(int64_t slots, int64_t dim,
                                                                 const std::string& dtype);
}  // namespace cuda
}  // namespace gam
#endif

TORCH_LIBRARY(gam_ext, m) {
  // Weight is (D, K); the returned grads of weight and bias are in weight's dtype.
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("causal_conv1d_bwd(Tensor grad_y, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)");
  // Returns (out, lse): lse is the fp32 logsumexp of the scores of each row, kept for backward.
  m.def("memory_retrieval_fwd(Tensor h, Tensor memory, float scale) -> (Tensor, Tensor)");
  m.def(
      "memory_retrieval_bwd(Tensor grad_out, Tensor h, Tensor memory, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor)");
  m.def("gate_fusion_fwd(Tensor local, Tensor global_ctx, Tensor gate_logits) -> Tensor");
  m.def(
      "gate_fusion_bwd(Tensor grad_out, Tensor local, Tensor global_ctx, Tensor gate_logits) -> "
      "(Tensor, Tensor, Tensor)");
  // The fused mixer: out = sigmoid(z[:D]) * conv(h) + sigmoid(z[D:]) * softmax(scale h M^T) M
  // with z = h gate_weight^T + gate_bias, in one pass. conv_weight is (D, K), gate_weight (2D, D).
  // Returns (out, lse, gate_logits, global_ctx): lse (B, N) fp32 and z (B, N, 2D) and G (B, N, D)
  // in h's dtype, kept for the backward. The backward returns (dh, dconv_weight, dconv_bias,
  // dmemory, dgate_weight, dgate_bias), the parameter gradients in their parameter's dtype (the
  // biases' in their weight's).
  m.def(
      "gam_mixer_fwd(Tensor h, Tensor conv_weight, Tensor? conv_bias, Tensor memory, "
      "Tensor gate_weight, Tensor? gate_bias, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gam_mixer_bwd(Tensor grad_out, Tensor h, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor memory, Tensor gate_weight, Tensor lse, Tensor gate_logits, Tensor global_ctx, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The one-token step of generation (inference only: no backward). conv_state (B, W, D) holds
  // the conv's previous inputs and is updated in place; cache_seqlens (B) makes it a circular
  // buffer indexed by position. x is (B, L, D) new rows; h (B, D) one row per sequence.
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "Tensor? cache_seqlens) -> Tensor");
  m.def(
      "gam_mixer_step(Tensor h, Tensor(a!) conv_state, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor memory, Tensor gate_logits, Tensor? cache_seqlens, float scale) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gam_ext compiled ops (registered under torch.ops.gam_ext)";
  m.def("cuda_compiled", [] {
#ifdef GAM_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_bf16_gemm", &gam::cpu::bf16_gemm_path,
        "how the CPU kernels run the products of bfloat16 inputs now: 'bf16' (oneDNN micro-kernel "
        "on the CPU's bf16 matrix units) or 'fp32' (fp32 tiles)");
  m.def("cpu_isa", &gam::cpu::cpu_isa_name,
        "which build of the CPU kernels' vectorised loops runs: 'avx512', 'avx2' or 'baseline' "
        "(the best the CPU has, capped by GAM_EXT_CPU_ISA)");
#ifdef GAM_EXT_WITH_CUDA
  m.def("cuda_retrieval_path", &gam::cuda::retrieval_path,
        "(path, forward, backward): the retrieval kernels the current CUDA device runs for "
        "(slots, dim, dtype), under the environment as it is now");
#endif
}
