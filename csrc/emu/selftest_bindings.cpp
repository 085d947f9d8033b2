// pybind11 bindings of the emulator self-test kernels, on CPU tensors. Built
// only into the emulated test module (csrc/emu/emulation.py); an example of
// what a kernel binding file for the emulated build looks like.
#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "emu/fiber.h"
#include "emu/selftest_kernels.h"
#include "emu/selftest_wgmma_args.h"
#include "emu/simt.h"  // the wgmma descriptor decoding (warpgroup_matrix.h)

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
  gam_selftest::block_reduce(cfp(x), fp(out), static_cast<int>(n), static_cast<int>(block),
                             nullptr);
  return out;
}

std::tuple<Tensor, Tensor> warp_reduce(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  const int64_t n = x.numel();
  // The launcher covers whole 64-thread blocks, i.e. two warps per block.
  const int64_t warps = (n + 63) / 64 * 2;
  Tensor a = torch::empty({warps}, x.options());
  Tensor b = torch::empty({warps}, x.options());
  gam_selftest::warp_reduce(cfp(x), fp(a), fp(b), static_cast<int>(n), nullptr);
  return {a, b};
}

Tensor warp_scan(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor out = torch::empty_like(x);
  gam_selftest::warp_scan(cfp(x), fp(out), static_cast<int>(x.numel()), nullptr);
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
  gam_selftest::warp_vote(cfp(x), ballot.data_ptr<int>(), any.data_ptr<int>(), all.data_ptr<int>(),
                          static_cast<int>(x.numel()), nullptr);
  return {ballot, any, all};
}

Tensor halo_stencil(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor y = torch::empty_like(x);
  gam_selftest::halo_stencil(cfp(x), fp(y), static_cast<int>(x.numel()), 128, nullptr);
  return y;
}

Tensor atomic_sum(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  Tensor out = torch::full({1}, 123.0f, x.options());  // launcher zeroes it
  gam_selftest::atomic_sum(cfp(x), fp(out), static_cast<int>(x.numel()), nullptr);
  return out;
}

Tensor dynamic_reverse(const Tensor& x_in, int64_t block) {
  const Tensor x = f32(x_in, "x");
  Tensor y = torch::empty_like(x);
  gam_selftest::dynamic_reverse(cfp(x), fp(y), static_cast<int>(x.numel()), static_cast<int>(block),
                                nullptr);
  return y;
}

std::tuple<Tensor, Tensor> odd_block(const Tensor& x_in, int64_t block) {
  const Tensor x = f32(x_in, "x");
  const int64_t blocks = (x.numel() + block - 1) / block;
  Tensor y = torch::empty_like(x);
  Tensor ballots = torch::empty({blocks * ((block + 31) / 32)}, x.options().dtype(torch::kInt64));
  Tensor b32 = torch::empty({ballots.numel()}, x.options().dtype(torch::kInt32));
  gam_selftest::odd_block(cfp(x), fp(y), reinterpret_cast<unsigned*>(b32.data_ptr<int>()),
                          static_cast<int>(x.numel()), static_cast<int>(block), nullptr);
  // Unsigned 32-bit ballots, returned as non-negative int64.
  ballots.copy_(b32.to(torch::kInt64).bitwise_and(0xffffffffLL));
  return {y, ballots};
}

int dtype_code(const Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kHalf) return 0;
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, name, " must be fp16 or bf16");
  return 1;
}

void check_shape(const Tensor& t, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.sizes() == torch::IntArrayRef(shape) && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous CPU tensor of shape ", torch::IntArrayRef(shape));
}

Tensor mma_fragments(const Tensor& a, const Tensor& b, const Tensor& c, bool misplace) {
  const int64_t k = a.size(1);
  TORCH_CHECK(k == 16 || k == 8, "a must be 16 x 16 or 16 x 8");
  check_shape(a, {16, k}, "a");
  check_shape(b, {k, 8}, "b");
  check_shape(c, {16, 8}, "c");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b dtypes differ");
  TORCH_CHECK(c.scalar_type() == torch::kFloat32, "c must be float32");
  const int dtype = dtype_code(a, "a");
  TORCH_CHECK(k == 16 || dtype == 0, "the k = 8 product takes fp16");
  Tensor d = torch::empty({16, 8}, c.options());
  gam_selftest::mma_fragments(a.data_ptr(), b.data_ptr(), cfp(c), fp(d), dtype, static_cast<int>(k),
                              misplace, nullptr);
  return d;
}

Tensor quad_transpose(const Tensor& words) {
  check_shape(words, {32, 4}, "words");
  TORCH_CHECK(words.scalar_type() == torch::kInt32, "words must be int32");
  const Tensor in = words.contiguous();
  Tensor out = torch::empty({32, 4}, torch::kInt32);
  gam_selftest::quad_transpose(reinterpret_cast<const unsigned*>(in.data_ptr<int>()),
                               reinterpret_cast<unsigned*>(out.data_ptr<int>()), nullptr);
  return out;
}

Tensor ldmatrix_fragments(const Tensor& src, bool trans) {
  const int64_t num = src.size(0);
  TORCH_CHECK(num == 1 || num == 2 || num == 4, "src must hold 1, 2 or 4 matrices");
  check_shape(src, {num, 8, 8}, "src");
  TORCH_CHECK(src.element_size() == 2, "src must have 16-bit elements");
  Tensor out = torch::empty({32, num}, torch::kInt32);
  gam_selftest::ldmatrix_fragments(src.data_ptr(), reinterpret_cast<unsigned*>(out.data_ptr<int>()),
                                   static_cast<int>(num), trans, nullptr);
  return out;
}

Tensor ldmatrix_mma(const Tensor& a, const Tensor& b_storage, int64_t b_mode) {
  check_shape(a, {16, 16}, "a");
  TORCH_CHECK(b_mode >= 0 && b_mode < 4, "b_mode must be 0..3");
  check_shape(b_storage,
              b_mode % 2 == 0 ? std::vector<int64_t>{8, 16} : std::vector<int64_t>{16, 8},
              "b_storage");
  TORCH_CHECK(a.scalar_type() == b_storage.scalar_type(), "a and b dtypes differ");
  // The kernel takes b as a k x n row-major array and stores it itself in the mode's layout.
  const Tensor b = b_mode % 2 == 0 ? b_storage.t().contiguous() : b_storage;
  Tensor d = torch::empty({16, 8}, torch::kFloat32);
  gam_selftest::ldmatrix_mma(a.data_ptr(), b.data_ptr(), fp(d), dtype_code(a, "a"),
                             static_cast<int>(b_mode), nullptr);
  return d;
}

Tensor cp_async_gemm(const Tensor& a, const Tensor& b, int64_t stages) {
  const int64_t k = a.size(1);
  TORCH_CHECK(k % 8 == 0 && k > 0, "k must be a positive multiple of 8");
  check_shape(a, {32, k}, "a");
  check_shape(b, {16, k}, "b");
  TORCH_CHECK(stages >= 1 && stages <= 3, "stages must be 1..3");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b dtypes differ");
  Tensor c = torch::empty({32, 16}, torch::kFloat32);
  gam_selftest::cp_async_gemm(a.data_ptr(), b.data_ptr(), fp(c), static_cast<int>(k),
                              static_cast<int>(stages), dtype_code(a, "a"), nullptr);
  return c;
}

Tensor named_barrier_groups(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  TORCH_CHECK(x.numel() % 128 == 0 && x.numel() > 0, "x must hold whole blocks of 128");
  Tensor y = torch::empty_like(x);
  gam_selftest::named_barrier_groups(cfp(x), fp(y), static_cast<int>(x.numel() / 128), nullptr);
  return y;
}

Tensor syncwarp_exchange(const Tensor& x_in) {
  const Tensor x = f32(x_in, "x");
  TORCH_CHECK(x.numel() % 64 == 0 && x.numel() > 0, "x must hold whole blocks of 64");
  Tensor y = torch::empty_like(x);
  gam_selftest::syncwarp_exchange(cfp(x), fp(y), static_cast<int>(x.numel() / 64), nullptr);
  return y;
}

Tensor barrier_stress(int64_t blocks, int64_t rounds) {
  Tensor data = torch::empty({blocks * 256}, torch::kFloat32);
  gam_selftest::barrier_stress(fp(data), static_cast<int>(blocks), static_cast<int>(rounds),
                               nullptr);
  return data;
}

Tensor wgmma_gemm(const Tensor& a, const Tensor& b, int64_t mode_a, int64_t mode_b,
                  int64_t misuse) {
  gam_selftest::check_wgmma_gemm_args(a, b, mode_a, mode_b);
  const int64_t n = b.size(0);
  Tensor d = torch::empty({64, n}, torch::kFloat32);
  gam_selftest::wgmma_gemm(a.data_ptr(), b.data_ptr(), fp(d), static_cast<int>(n),
                           dtype_code(a, "a"), static_cast<int>(mode_a), static_cast<int>(mode_b),
                           static_cast<int>(misuse), nullptr);
  return d;
}

// The shared address the emulator decodes for element (i, k), i < rows, k < 16, of a 16-bit wgmma
// operand described by desc (MN-major or K-major): out[i][k].
Tensor wgmma_element_addresses(int64_t desc, bool mn_major, int64_t rows) {
  Tensor out = torch::empty({rows, 16}, torch::kInt64);
  auto o = out.accessor<int64_t, 2>();
  const gam_emu::wg::Operand op =
      gam_emu::wg::decode_descriptor(static_cast<uint64_t>(desc), "wgmma_element_addresses");
  for (int64_t i = 0; i < rows; ++i)
    for (int k = 0; k < 16; ++k)
      o[i][k] = gam_emu::wg::element_address(op, mn_major, static_cast<int>(i), k);
  return out;
}

// The emulator's register layouts, as (threads, elements, 2) tensors of (row, column) in the
// instruction's own orientation: mma.sync m16n8k16's A (16 x 16), B (as n, k: 8 x 16) and C
// (16 x 8) per lane; wgmma's A registers (64 x 16) and accumulators (64 x N, N = 64, 128, 256)
// per thread of the warpgroup. python_tests/test_emulator.py compares them with CuTe's.
std::map<std::string, Tensor> fragment_maps() {
  auto table = [](int64_t threads, int64_t elements, auto pos) {
    Tensor out = torch::empty({threads, elements, 2}, torch::kInt64);
    auto o = out.accessor<int64_t, 3>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = 0; i < elements; ++i) {
        const gam_emu::mat::FragmentPos e = pos(static_cast<int>(t), static_cast<int>(i));
        o[t][i][0] = e.row;
        o[t][i][1] = e.col;
      }
    return out;
  };
  std::map<std::string, Tensor> maps;
  maps["mma_a"] = table(32, 8, gam_emu::mat::a_fragment_pos);
  maps["mma_b"] = table(32, 4, [](int lane, int i) {
    const gam_emu::mat::FragmentPos e = gam_emu::mat::b_fragment_pos(lane, i);
    return gam_emu::mat::FragmentPos{e.col, e.row};
  });
  maps["mma_c"] = table(32, 4, gam_emu::mat::c_fragment_pos);
  maps["wgmma_a"] = table(128, 8, gam_emu::wg::a_register_pos);
  for (int n : {64, 128, 256}) {
    maps["wgmma_d" + std::to_string(n)] = table(128, n / 2, gam_emu::wg::accumulator_pos);
  }
  return maps;
}

// The calling thread's fiber counters (context switches, stacks mapped) and whether switches
// are the assembly ones (x86-64) or ucontext's.
std::tuple<int64_t, int64_t, bool> fiber_counters() {
  const gam_emu::fiber::Counters c = gam_emu::fiber::counters();
  return {static_cast<int64_t>(c.switches), static_cast<int64_t>(c.stacks_mapped),
          gam_emu::fiber::kAsmSwitch};
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
  } else if (name == "cp_async_unwaited" || name == "cp_async_no_barrier") {
    Tensor x = torch::arange(128, torch::kFloat32);
    if (name == "cp_async_unwaited")
      gam_selftest::fault_cp_async_unwaited(cfp(x), fp(out), nullptr);
    else
      gam_selftest::fault_cp_async_no_barrier(cfp(x), fp(out), nullptr);
    return out.narrow(0, 0, 32);
  } else if (name == "ldmatrix_misaligned") {
    gam_selftest::fault_ldmatrix_misaligned(fp(out), nullptr);
  } else if (name == "ldmatrix_global") {
    Tensor src = torch::zeros({64}, torch::kFloat16);
    gam_selftest::fault_ldmatrix_global(src.data_ptr(), fp(out), nullptr);
  } else if (name == "named_barrier_count") {
    gam_selftest::fault_named_barrier_count(fp(out), nullptr);
  } else if (name == "named_barrier_split_warp") {
    gam_selftest::fault_named_barrier_split_warp(fp(out), nullptr);
  } else if (name == "mma_exited_lane") {
    gam_selftest::fault_mma_exited_lane(fp(out), nullptr);
  } else if (name == "wgmma_partial_warpgroup") {
    gam_selftest::fault_wgmma_partial_warpgroup(nullptr);
  } else if (name == "wgmma_exited_thread") {
    gam_selftest::fault_wgmma_exited_thread(nullptr);
  } else if (name == "wgmma_unfenced_cp_async" || name == "wgmma_no_wgmma_fence" ||
             name == "wgmma_fenced_cp_async") {
    Tensor src = torch::ones({2048}, torch::kBFloat16);
    const int fences = name == "wgmma_unfenced_cp_async" ? 2
                       : name == "wgmma_no_wgmma_fence"  ? 1
                                                         : 3;
    gam_selftest::wgmma_cp_async(src.data_ptr(), fp(out), fences, nullptr);
    return out.narrow(0, 0, 128);
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
  m.def("mma_fragments", &mma_fragments, py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("misplace") = false);
  m.def("quad_transpose", &quad_transpose);
  m.def("ldmatrix_fragments", &ldmatrix_fragments);
  m.def("ldmatrix_mma", &ldmatrix_mma);
  m.def("cp_async_gemm", &cp_async_gemm);
  m.def("syncwarp_exchange", &syncwarp_exchange);
  m.def("named_barrier_groups", &named_barrier_groups);
  m.def("barrier_stress", &barrier_stress);
  m.def("fiber_counters", &fiber_counters);
  m.def("wgmma_element_addresses", &wgmma_element_addresses);
  m.def("fragment_maps", &fragment_maps);
  m.def("wgmma_gemm", &wgmma_gemm, py::arg("a"), py::arg("b"), py::arg("mode_a"), py::arg("mode_b"),
        py::arg("misuse") = 0);
  m.def("run_fault", &run_fault);
}
