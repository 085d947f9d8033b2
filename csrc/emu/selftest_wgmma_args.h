// The argument checks of the wgmma self-test binding, shared by its emulated build
// (selftest_bindings.cpp, CPU tensors) and its GPU build (selftest_gpu_bindings.cpp, CUDA
// tensors): a (64 x 64) and b (N x 64, N = 32 (K-major only), 64, 128 or 256), both fp16 or both
// bf16, contiguous, and the layout codes of selftest_kernels.h.
#pragma once

#include <torch/extension.h>

namespace gam_selftest {

inline void check_wgmma_gemm_args(const torch::Tensor& a, const torch::Tensor& b, int64_t mode_a,
                                  int64_t mode_b) {
  const int64_t n = b.dim() == 2 ? b.size(0) : 0;
  TORCH_CHECK(a.sizes() == torch::IntArrayRef({64, 64}) && b.dim() == 2 && b.size(1) == 64 &&
                  (n == 32 || n == 64 || n == 128 || n == 256),
              "a must be 64 x 64 and b 32, 64, 128 or 256 x 64");
  TORCH_CHECK(n != 32 || (mode_b & 4) == 0, "b of 32 rows must be K-major (mode_b 0..3, 8..11)");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "a and b must be contiguous");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == torch::kHalf || a.scalar_type() == torch::kBFloat16),
              "a and b must both be fp16 or both bf16");
  TORCH_CHECK(mode_a >= -1 && mode_a < 8 && mode_b >= 0 && mode_b < 16,
              "mode_a is -1..7, mode_b 0..15");
}

}  // namespace gam_selftest
