// pybind11 binding of the wgmma self-test kernel on CUDA tensors: the kernel that the emulated
// tests run (selftest_kernels.cu), built by nvcc for a real sm_90a GPU, so that the GPU checks
// the PTX layouts the emulator assumes. python_tests/test_cuda_wgmma.py builds and runs it.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "emu/selftest_kernels.h"

namespace {

torch::Tensor wgmma_gemm(const torch::Tensor& a, const torch::Tensor& b, int64_t mode_a,
                         int64_t mode_b) {
  const int64_t n = b.size(0);
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.is_contiguous() && b.is_contiguous(),
              "a and b must be contiguous CUDA tensors");
  TORCH_CHECK(a.sizes() == torch::IntArrayRef({64, 64}) && b.dim() == 2 && b.size(1) == 64 &&
                  (n == 64 || n == 128 || n == 256),
              "a must be 64 x 64 and b 64, 128 or 256 x 64");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == torch::kHalf || a.scalar_type() == torch::kBFloat16),
              "a and b must both be fp16 or both bf16");
  TORCH_CHECK(mode_a >= -1 && mode_a < 8 && mode_b >= 0 && mode_b < 16,
              "mode_a is -1..7, mode_b 0..15");
  torch::Tensor d = torch::empty({64, n}, a.options().dtype(torch::kFloat32));
  gam_selftest::wgmma_gemm(a.data_ptr(), b.data_ptr(), d.data_ptr<float>(), static_cast<int>(n),
                           a.scalar_type() == torch::kHalf ? 0 : 1, static_cast<int>(mode_a),
                           static_cast<int>(mode_b), 0, c10::cuda::getCurrentCUDAStream().stream());
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wgmma self-test kernel on the GPU (sm_90a)";
  m.def("wgmma_gemm", &wgmma_gemm);
}
