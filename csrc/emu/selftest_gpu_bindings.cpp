// pybind11 binding of the wgmma self-test kernel on CUDA tensors: the kernel that the emulated
// tests run (selftest_kernels.cu), built by nvcc for a real sm_90a GPU, so that the GPU checks
// the PTX layouts the emulator assumes. python_tests/test_cuda_wgmma.py builds and runs it.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "emu/selftest_kernels.h"
#include "emu/selftest_wgmma_args.h"

namespace {

torch::Tensor wgmma_gemm(const torch::Tensor& a, const torch::Tensor& b, int64_t mode_a,
                         int64_t mode_b) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "a and b must be CUDA tensors");
  gam_selftest::check_wgmma_gemm_args(a, b, mode_a, mode_b);
  const int64_t n = b.size(0);
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
