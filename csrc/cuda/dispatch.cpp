// Host dispatch of the CUDA kernels: argument checks (op_checks.h), contiguous inputs, parameter
// conversions, outputs and workspaces, then the torch-free launchers of csrc/cuda/*.cu.
//
// Real build: TORCH_LIBRARY_IMPL(gam_ext, CUDA) for every op, on the current stream.
// Emulated build (-DGAM_EMULATE, test-only): the same functions on CPU tensors, exposed as a
// pybind module (python_tests/test_cuda_emulated.py); the kernels run in the SIMT emulator.
#include <torch/extension.h>

#include <cstdlib>
#include <string>
#include <tuple>

#include "op_checks.h"

#ifndef GAM_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cuda/gam_step.h"
#include "cuda/launchers.h"

namespace gam {
namespace cuda {
namespace {

using at::Tensor;

#ifdef GAM_EMULATE
// Tests flip these to reach both retrieval paths.
bool g_tensor_cores = true;
int g_max_smem = 227 * 1024;
#endif

void check_on_device(const Tensor& t, const char* name) {
#ifdef GAM_EMULATE
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor in the emulated build");
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
#endif
}

DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32 for the CUDA kernels, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

Tensor f32_contig(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// What the launchers need from the device: the stream, and for the retrieval forward whether
// tensor cores apply to dtype and how much shared memory a block may opt into.
struct DeviceCtx {
#ifdef GAM_EMULATE
  explicit DeviceCtx(const Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
  bool tensor_cores(DType) const { return g_tensor_cores; }
  int max_smem() const { return g_max_smem; }
#else
  explicit DeviceCtx(const Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  bool tensor_cores(DType dtype) const {
    const char* env = std::getenv("GAM_EXT_RETRIEVAL_TENSOR_CORES");
    if (env != nullptr && std::string(env) == "0") return false;
    int dev = 0, major = 0;
    GAM_CUDA_CHECK(cudaGetDevice(&dev));
    GAM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return dtype == DType::kBFloat16 ? major >= 8 : dtype == DType::kFloat16 && major >= 7;
  }
  int max_smem() const {
    int dev = 0, bytes = 0;
    GAM_CUDA_CHECK(cudaGetDevice(&dev));
    GAM_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return bytes;
  }
#endif
};

// ---- causal conv ------------------------------------------------------------------------------

Tensor causal_conv1d_fwd(const Tensor& x_in, const Tensor& weight,
                         const c10::optional<Tensor>& bias) {
  check_conv_args(x_in, weight, bias);
  check_on_device(x_in, "x");
  const DType dt = kernel_dtype(x_in, "x");
  DeviceCtx ctx(x_in);
  const Tensor x = x_in.contiguous();
  const Tensor w = f32_contig(weight);
  const Tensor b = bias.has_value() ? f32_contig(*bias) : Tensor();
  Tensor y = at::empty_like(x);
  ConvFwdParams p{};
  p.x = x.data_ptr();
  p.weight = w.data_ptr<float>();
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.dim = x.size(2);
  p.kwidth = static_cast<int>(w.size(1));
  p.dtype = dt;
  launch_causal_conv1d_fwd(p, ctx.stream());
  return y;
}

std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const Tensor& grad_y, const Tensor& x_in,
                                                     const Tensor& weight) {
  check_conv_bwd_args(grad_y, x_in, weight);
  check_on_device(x_in, "x");
  const DType dt = kernel_dtype(x_in, "x");
  DeviceCtx ctx(x_in);
  const Tensor x = x_in.contiguous();
  const Tensor dy = grad_y.to(x.scalar_type()).contiguous();
  const Tensor w = f32_contig(weight);
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2);
  const int kwidth = static_cast<int>(w.size(1));
  Tensor dx = at::empty_like(x);
  Tensor dw = at::empty({dim, kwidth}, x.options().dtype(at::kFloat));
  Tensor db = at::empty({dim}, x.options().dtype(at::kFloat));
  Tensor ws = at::empty({causal_conv1d_bwd_workspace_floats(batch, seqlen, dim, kwidth)},
                        x.options().dtype(at::kFloat));
  ConvBwdParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = w.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr<float>();
  p.dbias = db.data_ptr<float>();
  p.partials = ws.data_ptr<float>();
  p.batch = batch;
  p.seqlen = seqlen;
  p.dim = dim;
  p.kwidth = kwidth;
  p.dtype = dt;
  launch_causal_conv1d_bwd(p, ctx.stream());
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

// ---- memory retrieval -------------------------------------------------------------------------

std::tuple<Tensor, Tensor> memory_retrieval_fwd(const Tensor& h_in, const Tensor& memory,
                                                double scale) {
  check_memory_args(h_in, memory);
  check_on_device(h_in, "h");
  const DType dt = kernel_dtype(h_in, "h");
  DeviceCtx ctx(h_in);
  const Tensor h = h_in.contiguous();
  const Tensor m = memory_in_activation_dtype(memory, h);
  Tensor out = at::empty_like(h);
  Tensor lse = at::empty({h.size(0), h.size(1)}, h.options().dtype(at::kFloat));
  RetrievalFwdParams p{};
  p.h = h.data_ptr();
  p.memory = m.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.rows = h.size(0) * h.size(1);
  p.slots = m.size(0);
  p.dim = m.size(1);
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  p.tensor_cores = ctx.tensor_cores(dt);
  p.max_smem_bytes = ctx.max_smem();
  launch_memory_retrieval_fwd(p, ctx.stream());
  return {out, lse};
}

std::tuple<Tensor, Tensor> memory_retrieval_bwd(const Tensor& grad_out_in, const Tensor& h_in,
                                                const Tensor& memory, const Tensor& out_in,
                                                const Tensor& lse_in, double scale) {
  check_memory_bwd_args(grad_out_in, h_in, memory, out_in, lse_in);
  check_on_device(h_in, "h");
  const DType dt = kernel_dtype(h_in, "h");
  DeviceCtx ctx(h_in);
  const auto st = h_in.scalar_type();
  const Tensor h = h_in.contiguous();
  const Tensor m = memory_in_activation_dtype(memory, h);
  const Tensor grad_out = grad_out_in.to(st).contiguous();
  const Tensor out = out_in.to(st).contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t rows = h.size(0) * h.size(1), slots = m.size(0), dim = m.size(1);
  const int splits = memory_retrieval_bwd_row_splits(rows);
  Tensor dh = at::empty_like(h);
  Tensor dm = at::empty({slots, dim}, h.options().dtype(at::kFloat));
  Tensor delta = at::empty({rows}, h.options().dtype(at::kFloat));
  Tensor ws = at::empty({memory_retrieval_bwd_workspace_floats(slots, dim, splits)},
                        h.options().dtype(at::kFloat));
  RetrievalBwdParams p{};
  p.grad_out = grad_out.data_ptr();
  p.h = h.data_ptr();
  p.memory = m.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dh = dh.data_ptr();
  p.dmemory = dm.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.partials = ws.data_ptr<float>();
  p.rows = rows;
  p.slots = slots;
  p.dim = dim;
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  p.row_splits = splits;
  p.tensor_cores = ctx.tensor_cores(dt);
  p.max_smem_bytes = ctx.max_smem();
  launch_memory_retrieval_bwd(p, ctx.stream());
  return {dh, dm.to(memory.scalar_type())};
}

// ---- gate fusion ------------------------------------------------------------------------------

Tensor gate_fusion_fwd(const Tensor& local_in, const Tensor& global_ctx_in,
                       const Tensor& gate_logits_in) {
  check_gate_args(local_in, global_ctx_in, gate_logits_in);
  check_on_device(local_in, "local");
  const DType dt = kernel_dtype(local_in, "local");
  DeviceCtx ctx(local_in);
  const Tensor local = local_in.contiguous(), global_ctx = global_ctx_in.contiguous(),
               gate_logits = gate_logits_in.contiguous();
  Tensor out = at::empty_like(local);
  GateFwdParams p{};
  p.local = local.data_ptr();
  p.global_ctx = global_ctx.data_ptr();
  p.gate_logits = gate_logits.data_ptr();
  p.out = out.data_ptr();
  p.rows = local.size(0) * local.size(1);
  p.dim = local.size(2);
  p.dtype = dt;
  launch_gate_fusion_fwd(p, ctx.stream());
  return out;
}

std::tuple<Tensor, Tensor, Tensor> gate_fusion_bwd(const Tensor& grad_out_in,
                                                   const Tensor& local_in,
                                                   const Tensor& global_ctx_in,
                                                   const Tensor& gate_logits_in) {
  check_gate_bwd_args(grad_out_in, local_in, global_ctx_in, gate_logits_in);
  check_on_device(local_in, "local");
  const DType dt = kernel_dtype(local_in, "local");
  DeviceCtx ctx(local_in);
  const Tensor grad_out = grad_out_in.to(local_in.scalar_type()).contiguous();
  const Tensor local = local_in.contiguous(), global_ctx = global_ctx_in.contiguous(),
               gate_logits = gate_logits_in.contiguous();
  Tensor dlocal = at::empty_like(local), dglobal_ctx = at::empty_like(global_ctx),
         dgate_logits = at::empty_like(gate_logits);
  GateBwdParams p{};
  p.grad_out = grad_out.data_ptr();
  p.local = local.data_ptr();
  p.global_ctx = global_ctx.data_ptr();
  p.gate_logits = gate_logits.data_ptr();
  p.dlocal = dlocal.data_ptr();
  p.dglobal_ctx = dglobal_ctx.data_ptr();
  p.dgate_logits = dgate_logits.data_ptr();
  p.rows = local.size(0) * local.size(1);
  p.dim = local.size(2);
  p.dtype = dt;
  launch_gate_fusion_bwd(p, ctx.stream());
  return {dlocal, dglobal_ctx, dgate_logits};
}

// ---- the one-token step (inference only) ------------------------------------------------------
// Capture-safe for CUDA graphs: no host synchronisation; the only allocations are the output and
// the retrieval workspace (and conversions of parameters that are not already fp32 / of the
// activation dtype), all from the caching allocator.

Tensor seqlens_i32(const c10::optional<Tensor>& cache_seqlens) {
  return cache_seqlens.has_value() ? cache_seqlens->to(at::kInt).contiguous() : Tensor();
}

Tensor causal_conv1d_update(const Tensor& x_in, Tensor& conv_state, const Tensor& weight,
                            const c10::optional<Tensor>& bias,
                            const c10::optional<Tensor>& cache_seqlens) {
  check_conv_update_args(x_in, conv_state, weight, bias, cache_seqlens);
  check_on_device(x_in, "x");
  const DType dt = kernel_dtype(x_in, "x");
  DeviceCtx ctx(x_in);
  const Tensor x = x_in.contiguous();
  const Tensor w = f32_contig(weight);
  const Tensor b = bias.has_value() ? f32_contig(*bias) : Tensor();
  const Tensor pos = seqlens_i32(cache_seqlens);
  Tensor y = at::empty_like(x);
  ConvUpdateParams p{};
  p.x = x.data_ptr();
  p.conv_state = conv_state.data_ptr();
  p.weight = w.data_ptr<float>();
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.cache_seqlens = pos.defined() ? pos.data_ptr<int>() : nullptr;
  p.y = y.data_ptr();
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.dim = x.size(2);
  p.state_len = conv_state.size(1);
  p.kwidth = static_cast<int>(w.size(1));
  p.dtype = dt;
  launch_causal_conv1d_update(p, ctx.stream());
  return y;
}

Tensor gam_mixer_step(const Tensor& h_in, Tensor& conv_state, const Tensor& conv_weight,
                      const c10::optional<Tensor>& conv_bias, const Tensor& memory,
                      const Tensor& gate_logits_in, const c10::optional<Tensor>& cache_seqlens,
                      double scale) {
  check_mixer_step_args(h_in, conv_state, conv_weight, conv_bias, memory, gate_logits_in,
                        cache_seqlens);
  check_on_device(h_in, "h");
  const DType dt = kernel_dtype(h_in, "h");
  DeviceCtx ctx(h_in);
  const Tensor h = h_in.contiguous();
  const Tensor z = gate_logits_in.contiguous();
  const Tensor m = memory_in_activation_dtype(memory, h);
  const Tensor w = f32_contig(conv_weight);
  const Tensor b = conv_bias.has_value() ? f32_contig(*conv_bias) : Tensor();
  const Tensor pos = seqlens_i32(cache_seqlens);
  const int64_t batch = h.size(0), dim = h.size(1), slots = m.size(0);
  Tensor out = at::empty_like(h);
  Tensor ws = at::empty({gam_mixer_step_workspace_floats(batch, slots, dim)},
                        h.options().dtype(at::kFloat));
  MixerStepParams p{};
  p.h = h.data_ptr();
  p.conv_state = conv_state.data_ptr();
  p.weight = w.data_ptr<float>();
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.cache_seqlens = pos.defined() ? pos.data_ptr<int>() : nullptr;
  p.memory = m.data_ptr();
  p.gate_logits = z.data_ptr();
  p.out = out.data_ptr();
  p.partials = ws.data_ptr<float>();
  p.batch = batch;
  p.dim = dim;
  p.slots = slots;
  p.state_len = conv_state.size(1);
  p.kwidth = static_cast<int>(w.size(1));
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  launch_gam_mixer_step(p, ctx.stream());
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace gam

#ifdef GAM_EMULATE

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace gc = gam::cuda;
  m.doc() = "gam_ext CUDA kernels run by the SIMT emulator on CPU tensors (test-only)";
  m.def("causal_conv1d_fwd", &gc::causal_conv1d_fwd, py::arg("x"), py::arg("weight"),
        py::arg("bias"));
  m.def("causal_conv1d_bwd", &gc::causal_conv1d_bwd);
  m.def("memory_retrieval_fwd", &gc::memory_retrieval_fwd);
  m.def("memory_retrieval_bwd", &gc::memory_retrieval_bwd);
  m.def("gate_fusion_fwd", &gc::gate_fusion_fwd);
  m.def("gate_fusion_bwd", &gc::gate_fusion_bwd);
  m.def("set_retrieval_path", [](bool tensor_cores, int max_smem_bytes) {
    gc::g_tensor_cores = tensor_cores;
    gc::g_max_smem = max_smem_bytes;
  });
  m.def("memory_retrieval_fwd_tc_smem_bytes", &gc::memory_retrieval_fwd_tc_smem_bytes);
  m.def("causal_conv1d_update", &gc::causal_conv1d_update, py::arg("x"), py::arg("conv_state"),
        py::arg("weight"), py::arg("bias"), py::arg("cache_seqlens"));
  m.def("gam_mixer_step", &gc::gam_mixer_step);
}

#else

TORCH_LIBRARY_IMPL(gam_ext, CUDA, m) {
  m.impl("causal_conv1d_fwd", &gam::cuda::causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &gam::cuda::causal_conv1d_bwd);
  m.impl("memory_retrieval_fwd", &gam::cuda::memory_retrieval_fwd);
  m.impl("memory_retrieval_bwd", &gam::cuda::memory_retrieval_bwd);
  m.impl("gate_fusion_fwd", &gam::cuda::gate_fusion_fwd);
  m.impl("gate_fusion_bwd", &gam::cuda::gate_fusion_bwd);
  m.impl("causal_conv1d_update", &gam::cuda::causal_conv1d_update);
  m.impl("gam_mixer_step", &gam::cuda::gam_mixer_step);
}

#endif
