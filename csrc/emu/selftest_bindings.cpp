// pybind11 bindings of the emulator self-test kernels, on CPU tensors. Built
// only into the emulated test module (csrc/emu/emulation.py); an example of
// what a kernel binding file for the emulated build looks like.
#include <torch/extension.h>

#include <string>

#include "emu/selftest_kernels.h"

namespace {

using torch::Tensor;

Tensor f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  return t.to(torch::kFloat32).contiguous();
}

float* fp(Tensor& t) { return t.data_ptr<float>(); }
const float* cfp(const Tensor& t) { return t.data_ptr<float>(); }

Tensor block_reduce(const Tensor& x_in, int64_t block) {
  const Tensor x = f32(x_in, "x");
  const int64_t n = x.numel();
  Tensor out = torch::empty({(n + block - 1) / block}, x.options());
  gam_selftest::block_reduce(cfp(x), fp(out), static_cast<int>(n),
                             static_cast<int>(block), nullptr);
  return out;
}

std::tuple<Tensor, Tensor> warp_reduce(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  const int64_t n = x.numel();
  // The launcher covers whole 64-thread blocks, i.e. two warps per block.
  const int64_t warps = (n + 63) / 64 * 2;
  Tensor a = torch::empty({warps}, x.options());
  Tensor b = torch::empty({warps}, x.options());
  gam_selftest::warp_reduce(cfp(x), fp(a), fp(b), static_cast<int>(n),
                            nullptr);
  return {a, b};
}

Tensor warp_scan(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor out = torch::empty_like(x);
  gam_selftest::warp_scan(cfp(x), fp(out), static_cast<int>(x.numel()),
                          nullptr);
  return out;
}

Tensor shfl_types(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  TORCH_CHECK(x.numel() == 32, "x must have 32 elements");
  Tensor out = torch::empty({5, 32}, x.options());
  gam_selftest::shfl_types(cfp(x), fp(out), nullptr);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> warp_vote(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  const int64_t warps = (x.numel() + 63) / 64 * 2;
  auto opts = x.options().dtype(torch::kInt32);
  Tensor ballot = torch::empty({warps}, opts);
  Tensor any = torch::empty({warps}, opts);
  Tensor all = torch::empty({warps}, opts);
  gam_selftest::warp_vote(cfp(x), ballot.data_ptr<int>(), any.data_ptr<int>(),
                          all.data_ptr<int>(), static_cast<int>(x.numel()),
                          nullptr);
  return {ballot, any, all};
}

Tensor halo_stencil(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor y = torch::empty_like(x);
  gam_selftest::halo_stencil(cfp(x), fp(y), static_cast<int>(x.numel()), 128,
                             nullptr);
  return y;
}

Tensor atomic_sum(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor out = torch::full({1}, 123.0f, x.options());  // launcher zeroes it
  gam_selftest::atomic_sum(cfp(x), fp(out), static_cast<int>(x.numel()),
                           nullptr);
  return out;
}

Tensor dynamic_reverse(const Tensor& x_in, int64_t block) {
  const Tensor x = f32(x_in, "x");
  Tensor y = torch::empty_like(x);
  gam_selftest::dynamic_reverse(cfp(x), fp(y), static_cast<int>(x.numel()),
                                static_cast<int>(block), nullptr);
  return y;
}

std::tuple<Tensor, Tensor> odd_block(const Tensor& x_in, int64_t block) {
  const Tensor x = f32(x_in, "x");
  const int64_t blocks = (x.numel() + block - 1) / block;
  Tensor y = torch::empty_like(x);
  Tensor ballots =
      torch::empty({blocks * ((block + 31) / 32)}, x.options().dtype(torch::kInt64));
  Tensor b32 = torch::empty({ballots.numel()}, x.options().dtype(torch::kInt32));
  gam_selftest::odd_block(cfp(x), fp(y),
                          reinterpret_cast<unsigned*>(b32.data_ptr<int>()),
                          static_cast<int>(x.numel()), static_cast<int>(block),
                          nullptr);
  // Unsigned 32-bit ballots, returned as non-negative int64.
  ballots.copy_(b32.to(torch::kInt64).bitwise_and(0xffffffffLL));
  return {y, ballots};
}

Tensor wmma_tile(const Tensor& a, const Tensor& b, bool b_col_major) {
  TORCH_CHECK(a.sizes() == torch::IntArrayRef({16, 16}) && a.is_contiguous(),
              "a must be a contiguous 16x16 tensor");
  TORCH_CHECK(b.sizes() == torch::IntArrayRef({16, 16}) && b.is_contiguous(),
              "b must be a contiguous 16x16 tensor");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b dtypes differ");
  int dtype = 0;
  if (a.scalar_type() == torch::kBFloat16)
    dtype = 1;
  else
    TORCH_CHECK(a.scalar_type() == torch::kHalf, "a must be fp16 or bf16");
  Tensor c = torch::empty({16, 16}, a.options().dtype(torch::kFloat32));
  gam_selftest::wmma_tile(a.data_ptr(), b.data_ptr(), fp(c), dtype,
                          b_col_major, nullptr);
  return c;
}

Tensor barrier_stress(int64_t blocks, int64_t rounds) {
  Tensor data = torch::empty({blocks * 256}, torch::kFloat32);
  gam_selftest::barrier_stress(fp(data), static_cast<int>(blocks),
                               static_cast<int>(rounds), nullptr);
  return data;
}

// Runs one planted fault; returns the kernel's output where there is one.
Tensor run_fault(const std::string& name) {
  Tensor out = torch::zeros({256}, torch::kFloat32);
  if (name == "oob_global") {
    Tensor x = torch::zeros({100}, torch::kFloat32);
    gam_selftest::fault_oob_global(fp(x), 100, nullptr);
  } else if (name == "oob_shared") {
    gam_selftest::fault_oob_shared(fp(out), nullptr);
  } else if (name == "uninit_shared") {
    gam_selftest::fault_uninit_shared(fp(out), nullptr);
    return out.narrow(0, 0, 64);
  } else if (name == "missing_barrier") {
    gam_selftest::fault_missing_barrier(fp(out), nullptr);
    return out.narrow(0, 0, 64);
  } else if (name == "divergent_barrier") {
    gam_selftest::fault_divergent_barrier(fp(out), nullptr);
  } else if (name == "warp_deadlock") {
    gam_selftest::fault_warp_deadlock(fp(out), nullptr);
  } else if (name == "wmma_misaligned") {
    Tensor a = torch::zeros({16 * 17}, torch::kFloat16);
    gam_selftest::fault_wmma_misaligned(a.data_ptr(), fp(out), nullptr);
  } else if (name == "empty_grid") {
    gam_selftest::fault_empty_grid(fp(out), nullptr);
  } else if (name == "smem_limit") {
    gam_selftest::fault_smem_limit(fp(out), nullptr);
  } else {
    TORCH_CHECK(false, "unknown fault ", name);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SIMT emulator self-test kernels (CPU, emulated CUDA)";
  m.def("block_reduce", &block_reduce);
  m.def("warp_reduce", &warp_reduce);
  m.def("warp_scan", &warp_scan);
  m.def("shfl_types", &shfl_types);
  m.def("warp_vote", &warp_vote);
  m.def("halo_stencil", &halo_stencil);
  m.def("atomic_sum", &atomic_sum);
  m.def("dynamic_reverse", &dynamic_reverse);
  m.def("odd_block", &odd_block);
  m.def("wmma_tile", &wmma_tile);
  m.def("barrier_stress", &barrier_stress);
  m.def("run_fault", &run_fault);
}
