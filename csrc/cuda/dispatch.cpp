// Host dispatch of the CUDA kernels: argument checks (op_checks.h), contiguous inputs, parameter
// conversions, outputs and workspaces, then the torch-free launchers of csrc/cuda/*.cu.
//
// Real build: TORCH_LIBRARY_IMPL(gam_ext, CUDA) for every op, on the current stream.
// Emulated build (-DGAM_EMULATE, test-only): the same functions on CPU tensors, exposed as a
// pybind module (python_tests/test_cuda_emulated.py); the kernels run in the SIMT emulator.
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

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

// The retrieval path every call takes: the fused kernels (tensor cores for fp16/bf16, fp32 SIMT
// otherwise), the fp32 SIMT kernels for every dtype, cuBLAS products around a softmax kernel, or
// (opt-in; 0.71-0.77x the gemm path at B*N >= 65536 rows on an H200) the wgmma kernels where
// they apply: the forward, and the backward's score kernel before the gemm path's products; the
// gemm path's kernels elsewhere.
enum class RetrievalPath { kFused, kSimt, kGemm, kWgmma };

// GAM_EXT_RETRIEVAL (read on every call) when set, else the default for the activation dtype
// (csrc/cuda/README.md, "Retrieval paths", has the measurement and the reasoning): gemm for fp16
// and bf16, whose cuBLAS products measured 1.3-3.0x faster (fwd+bwd) than the fused kernels at
// every shape on an H200, and for fp32, where cuBLAS's fp32 products measured 8-10x faster
// (fwd+bwd) than the SIMT kernels, which read shared memory once per FMA. bf16 before
// sm_80, which has no bf16 tensor cores, stays on the fused path (its SIMT kernels).
RetrievalPath retrieval_path_from_env(DType dt, int sm) {
  const char* env = std::getenv("GAM_EXT_RETRIEVAL");
  if (env == nullptr || *env == '\0') {
    const bool gemm = dt != DType::kBFloat16 || sm >= 80;
    return gemm ? RetrievalPath::kGemm : RetrievalPath::kFused;
  }
  const std::string v(env);
  if (v == "fused") return RetrievalPath::kFused;
  if (v == "simt") return RetrievalPath::kSimt;
  if (v == "gemm") return RetrievalPath::kGemm;
  if (v == "wgmma") return RetrievalPath::kWgmma;
  TORCH_CHECK(false, "GAM_EXT_RETRIEVAL must be fused, gemm, simt or wgmma, got '", v, "'");
  return RetrievalPath::kFused;
}

// GAM_EXT_WGMMA_FORWARD (read on every call on the wgmma path): pipelined (the default),
// lockstep (the first wgmma forward) or seesaw, kept side by side so that one process can measure
// them (csrc/cuda/README.md, "The pipelined wgmma forward").
WgmmaForward wgmma_forward_from_env() {
  const char* env = std::getenv("GAM_EXT_WGMMA_FORWARD");
  if (env == nullptr || *env == '\0') return WgmmaForward::kPipelined;
  const std::string v(env);
  if (v == "pipelined") return WgmmaForward::kPipelined;
  if (v == "lockstep") return WgmmaForward::kLockstep;
  if (v == "seesaw") return WgmmaForward::kSeesaw;
  TORCH_CHECK(false, "GAM_EXT_WGMMA_FORWARD must be pipelined, lockstep or seesaw, got '", v, "'");
  return WgmmaForward::kPipelined;
}

// GAM_EXT_RETRIEVAL_SMEM_LIMIT=<bytes>: size the fused kernels for at most this much shared
// memory per block and per SM (reaches the configurations of smaller GPUs on a large one).
int smem_limit_from_env(int device_bytes) {
  const char* env = std::getenv("GAM_EXT_RETRIEVAL_SMEM_LIMIT");
  if (env == nullptr || *env == '\0') return device_bytes;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0,
              "GAM_EXT_RETRIEVAL_SMEM_LIMIT must be a positive number of bytes, got '", env, "'");
  return static_cast<int>(std::min<long>(v, device_bytes));
}

// What the retrieval launchers need to know of a device.
struct DeviceProps {
  int sm = 0;           // compute capability, 10 * major + minor
  int smem_optin = 0;   // shared memory per block (opt-in), bytes
  int smem_per_sm = 0;  // shared memory per SM, bytes
};

#ifdef GAM_EMULATE
// The emulated device (an H100's limits); tests change it to reach every per-arch
// configuration.
DeviceProps g_emulated_device{90, 227 * 1024, 228 * 1024};
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
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32 for the CUDA kernels, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

Tensor f32_contig(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

#ifndef GAM_EMULATE
// The attributes of device `dev`, queried once per device and cached.
const DeviceProps& device_props(int dev) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DeviceProps>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (dev >= static_cast<int>(cache.size())) cache.resize(static_cast<size_t>(dev) + 1);
  if (!cache[dev]) {
    auto props = std::make_unique<DeviceProps>();
    int major = 0, minor = 0;
    GAM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    GAM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    props->sm = 10 * major + minor;
    GAM_CUDA_CHECK(
        cudaDeviceGetAttribute(&props->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    GAM_CUDA_CHECK(cudaDeviceGetAttribute(&props->smem_per_sm,
                                          cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    cache[dev] = std::move(props);
  }
  return *cache[dev];
}
#endif

// Whether the current device runs the wgmma kernels' sm_90a code (a build with 9.0a in its arch
// list, on an sm_90 GPU), probed once per device by a one-thread kernel; the emulator runs it.
// Asked only on the wgmma path, so other paths never make the probe's synchronising copy.
bool wgmma_compiled_on_current_device() {
#ifdef GAM_EMULATE
  return true;
#else
  static std::mutex mutex;
  static std::vector<int> cache;  // -1 unknown, else 0 / 1
  int dev = 0;
  GAM_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mutex);
  if (dev >= static_cast<int>(cache.size())) cache.resize(static_cast<size_t>(dev) + 1, -1);
  if (cache[dev] < 0) {
    Tensor flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, dev));
    launch_wgmma_probe(flag.data_ptr<int>(), c10::cuda::getCurrentCUDAStream().stream());
    cache[dev] = flag.item<int>();
  }
  return cache[dev] == 1;
#endif
}

// What the launchers need from the device: the stream, and for the retrieval the path and the
// device's properties (with GAM_EXT_RETRIEVAL_SMEM_LIMIT applied).
struct DeviceCtx {
#ifdef GAM_EMULATE
  explicit DeviceCtx(const Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
  DeviceProps props() const { return g_emulated_device; }
#else
  explicit DeviceCtx(const Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  DeviceProps props() const {
    int dev = 0;
    GAM_CUDA_CHECK(cudaGetDevice(&dev));
    return device_props(dev);
  }
#endif
  // The retrieval fields of p (RetrievalFwdParams or RetrievalBwdParams).
  template <typename P>
  void fill_retrieval(P& p, RetrievalPath path) const {
    const DeviceProps d = props();
    p.tensor_cores = path != RetrievalPath::kSimt;
    p.sm = d.sm;
    p.max_smem_bytes = smem_limit_from_env(d.smem_optin);
    p.smem_per_sm = smem_limit_from_env(d.smem_per_sm);
  }
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

// a @ b with fp32 output (fp32 accumulation): cuBLAS through aten::mm.dtype for fp16/bf16 inputs
// (at::mm for fp32). The emulated build has no CPU kernel for mm.dtype: it multiplies fp32
// copies (the same products, summed in another order).
Tensor mm_f32(const Tensor& a, const Tensor& b) {
#ifdef GAM_EMULATE
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
#else
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  return at::mm(a, b, at::kFloat);
#endif
}

// The same product written into out (fp32, of the right shape): aten::mm.dtype_out, no temporary.
void mm_f32_out(Tensor& out, const Tensor& a, const Tensor& b) {
#ifdef GAM_EMULATE
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
#else
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
#endif
}

// c += a b: the products summed in fp32, c added in fp32, rounded once to c's dtype (cuBLAS's
// epilogue with beta = 1 on the GPU; the emulated build adds fp32 copies).
void addmm_in_place(Tensor& c, const Tensor& a, const Tensor& b) {
#ifdef GAM_EMULATE
  c.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)).add_(c.to(at::kFloat)));
#else
  c.addmm_(a, b);
#endif
}

// GAM_EXT_RETRIEVAL=gemm, forward: scores = h M^T (fp32), the softmax kernel (P as T, lse), P M.
void retrieval_fwd_gemm(const Tensor& h2, const Tensor& m, double scale, Tensor& out2, Tensor& lse,
                        DType dt, cudaStream_t stream) {
  const Tensor scores = mm_f32(h2, m.t());
  Tensor p = at::empty(scores.sizes(), h2.options());
  RetrievalSoftmaxParams sp{};
  sp.scores = scores.data_ptr<float>();
  sp.lse = lse.data_ptr<float>();
  sp.p = p.data_ptr();
  sp.rows = scores.size(0);
  sp.slots = scores.size(1);
  sp.scale = static_cast<float>(scale);
  sp.dtype = dt;
  launch_retrieval_softmax_fwd(sp, stream);
  at::mm_out(out2, p, m);
}

// The row stride of P and scale * dS on the gemm and wgmma paths: S rounded up to 8 elements,
// so that every row starts 16-byte aligned. Both paths write the slots past S as zeros.
int64_t pds_ld(int64_t slots) { return (slots + 7) / 8 * 8; }

// Whether the retrieval's backward on this path forms P and scale * dS for cuBLAS's products (the
// gemm path; the wgmma path, with its score kernel where that applies) rather than computing dh
// and dM in its own kernels (the fused and SIMT paths).
bool retrieval_bwd_forms_pds(RetrievalPath path) {
  return path == RetrievalPath::kGemm || path == RetrievalPath::kWgmma;
}

// The backward's P and scale * dS on the gemm or wgmma path (bp: shape, pointers and device
// filled in), into p_out and ds_out: views of h's dtype, rows x S, rows ld elements apart (ld % 8
// == 0, 16-byte aligned rows), slots S .. pds_ld(S) - 1 written as zeros. The wgmma score kernel
// where it applies; else scores and dP = grad_out M^T (cuBLAS, fp32) and the softmax backward
// kernel.
void retrieval_bwd_pds(RetrievalBwdParams& bp, RetrievalPath path, const Tensor& g2,
                       const Tensor& h2, const Tensor& m, const Tensor& lse, double scale,
                       Tensor& p_out, Tensor& ds_out, int64_t ld, cudaStream_t stream) {
  if (bp.rows == 0) return;
  if (path == RetrievalPath::kWgmma && retrieval_bwd_wgmma_applies(bp) &&
      wgmma_compiled_on_current_device()) {
    bp.pds = p_out.data_ptr();
    bp.ds = ds_out.data_ptr();
    bp.pds_ld = ld;
    launch_retrieval_bwd_wgmma(bp, stream);
    return;
  }
  const Tensor scores = mm_f32(h2, m.t());
  const Tensor dp = mm_f32(g2, m.t());
  RetrievalSoftmaxParams sp{};
  sp.scores = scores.data_ptr<float>();
  sp.dp = dp.data_ptr<float>();
  sp.lse = lse.data_ptr<float>();
  sp.p = p_out.data_ptr();
  sp.ds = ds_out.data_ptr();
  sp.rows = scores.size(0);
  sp.slots = scores.size(1);
  sp.ld = ld;
  sp.scale = static_cast<float>(scale);
  sp.dtype = bp.dtype;
  launch_retrieval_softmax_bwd(sp, stream);
}

// dM = (scale dS)^T h + P^T grad_out (fp32) from P and scale * dS. The key-path product goes
// straight into dm and the value path is added: one temporary and one elementwise pass fewer
// than copying both in (addmm.dtype cannot accumulate into an fp32 dm: it wants the added matrix
// in the inputs' dtype).
void retrieval_bwd_dm(const Tensor& p, const Tensor& ds, const Tensor& g2, const Tensor& h2,
                      Tensor& dm) {
  mm_f32_out(dm, ds.t(), h2);
  dm.add_(mm_f32(p.t(), g2));
}

// A buffer for rows of the backward's P and dS (and the fused mixer's dz); NaN in the emulated
// build, so that a slot no kernel writes shows in the tests.
Tensor pds_buffer(at::IntArrayRef sizes, const Tensor& like) {
  Tensor buf = at::empty(sizes, like.options());
#ifdef GAM_EMULATE
  buf.fill_(std::numeric_limits<float>::quiet_NaN());
#endif
  return buf;
}

// What the retrieval's forward and backward parameters share: h (B, N, D) and m (S, D), contiguous,
// of one dtype, their shape, the scale and the dtype.
template <typename Params>
void fill_retrieval_inputs(Params& p, const Tensor& h, const Tensor& m, double scale, DType dt) {
  p.h = h.data_ptr();
  p.memory = m.data_ptr();
  p.rows = h.size(0) * h.size(1);
  p.slots = m.size(0);
  p.dim = m.size(1);
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
}

// The retrieval's forward on a contiguous h and m rounded to its dtype, on the path
// GAM_EXT_RETRIEVAL picks: writes out (like h) and lse (B, N) fp32.
void retrieval_fwd(const Tensor& h, const Tensor& m, double scale, Tensor& out, Tensor& lse,
                   DType dt, const DeviceCtx& ctx) {
  RetrievalFwdParams p{};
  fill_retrieval_inputs(p, h, m, scale, dt);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const RetrievalPath path = retrieval_path_from_env(dt, ctx.props().sm);
  if (path == RetrievalPath::kWgmma) {
    ctx.fill_retrieval(p, path);
    p.wgmma_forward = wgmma_forward_from_env();
    if (retrieval_fwd_wgmma_applies(p) && wgmma_compiled_on_current_device()) {
      launch_retrieval_fwd_wgmma(p, ctx.stream());
      return;
    }
  }
  if (path == RetrievalPath::kGemm || path == RetrievalPath::kWgmma) {
    Tensor out2 = out.view({p.rows, p.dim});
    retrieval_fwd_gemm(h.view({p.rows, p.dim}), m, scale, out2, lse, dt, ctx.stream());
    return;
  }
  ctx.fill_retrieval(p, path);
  launch_memory_retrieval_fwd(p, ctx.stream());
}

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
  retrieval_fwd(h, m, scale, out, lse, dt, ctx);
  return {out, lse};
}

// The retrieval backward's parameters for contiguous inputs of h's dtype (m rounded to it): the
// inputs, shape and device; the outputs and workspaces left null.
RetrievalBwdParams retrieval_bwd_params(const Tensor& grad_out, const Tensor& h, const Tensor& m,
                                        const Tensor& out, const Tensor& lse, double scale,
                                        DType dt, RetrievalPath path, const DeviceCtx& ctx) {
  RetrievalBwdParams p{};
  fill_retrieval_inputs(p, h, m, scale, dt);
  p.grad_out = grad_out.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  ctx.fill_retrieval(p, path);
  return p;
}

// The retrieval's backward on contiguous inputs of h's dtype (m rounded to it): (dh, dM in
// fp32).
std::tuple<Tensor, Tensor> retrieval_bwd(const Tensor& grad_out, const Tensor& h, const Tensor& m,
                                         const Tensor& out, const Tensor& lse, double scale,
                                         DType dt, const DeviceCtx& ctx) {
  const int64_t rows = h.size(0) * h.size(1), slots = m.size(0), dim = m.size(1);
  Tensor dh = at::empty_like(h);
  Tensor dm = at::empty({slots, dim}, h.options().dtype(at::kFloat));
  const RetrievalPath path = retrieval_path_from_env(dt, ctx.props().sm);
  RetrievalBwdParams p = retrieval_bwd_params(grad_out, h, m, out, lse, scale, dt, path, ctx);
  p.dh = dh.data_ptr();
  p.dmemory = dm.data_ptr<float>();
  if (retrieval_bwd_forms_pds(path)) {
    const int64_t ld = pds_ld(slots);
    Tensor pds = pds_buffer({2, rows, ld}, h);
    Tensor pr = pds[0].narrow(1, 0, slots), ds = pds[1].narrow(1, 0, slots);
    const Tensor g2 = grad_out.view({rows, dim}), h2 = h.view({rows, dim});
    retrieval_bwd_pds(p, path, g2, h2, m, lse.view({rows}), scale, pr, ds, ld, ctx.stream());
    Tensor dh2 = dh.view({rows, dim});
    at::mm_out(dh2, ds, m);
    retrieval_bwd_dm(pr, ds, g2, h2, dm);
    return {dh, dm};
  }
  const int splits = memory_retrieval_bwd_row_splits(rows);
  // delta, inv_psum, delta_pdp: a float per row each.
  Tensor row_ws = at::empty({3 * rows}, h.options().dtype(at::kFloat));
  Tensor ws = at::empty({memory_retrieval_bwd_workspace_floats(slots, dim, splits)},
                        h.options().dtype(at::kFloat));
  p.delta = row_ws.data_ptr<float>();
  p.inv_psum = p.delta + rows;
  p.delta_pdp = p.delta + 2 * rows;
  p.partials = ws.data_ptr<float>();
  p.row_splits = splits;
  Tensor pds = at::empty({memory_retrieval_bwd_pds_elements(p)}, h.options());
  p.pds = pds.numel() > 0 ? pds.data_ptr() : nullptr;
  launch_memory_retrieval_bwd(p, ctx.stream());
  return {dh, dm};
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
  auto [dh, dm] = retrieval_bwd(grad_out, h, m, out, lse, scale, dt, ctx);
  return {dh, dm.to(memory.scalar_type())};
}

DeviceProps current_device_props() {
#ifdef GAM_EMULATE
  return g_emulated_device;
#else
  int dev = 0;
  GAM_CUDA_CHECK(cudaGetDevice(&dev));
  return device_props(dev);
#endif
}

}  // namespace

// Which kernels memory_retrieval_fwd and _bwd run on the current device for S slots, rows of
// width dim and dtype ("float16", "bfloat16" or "float32"), under the environment as it is now:
// (path, forward, backward), in words. gam_ext.backend_info(retrieval=...) reports it.
std::tuple<std::string, std::string, std::string> retrieval_path(int64_t slots, int64_t dim,
                                                                 const std::string& dtype) {
  TORCH_CHECK(slots >= 1 && dim >= 0, "retrieval_path: need slots >= 1 and dim >= 0");
  DType dt;
  if (dtype == "float16") {
    dt = DType::kFloat16;
  } else if (dtype == "bfloat16") {
    dt = DType::kBFloat16;
  } else {
    TORCH_CHECK(dtype == "float32", "retrieval_path: dtype must be float16, bfloat16 or float32");
    dt = DType::kFloat32;
  }
  const DeviceProps d = current_device_props();
  const RetrievalPath path = retrieval_path_from_env(dt, d.sm);
  RetrievalFwdParams f{};
  f.rows = 1;
  f.slots = slots;
  f.dim = dim;
  f.dtype = dt;
  f.tensor_cores = path != RetrievalPath::kSimt;
  f.sm = d.sm;
  f.max_smem_bytes = smem_limit_from_env(d.smem_optin);
  f.smem_per_sm = smem_limit_from_env(d.smem_per_sm);
  f.wgmma_forward =
      path == RetrievalPath::kWgmma ? wgmma_forward_from_env() : WgmmaForward::kPipelined;
  RetrievalBwdParams b{};
  b.rows = 1;
  b.slots = slots;
  b.dim = dim;
  b.dtype = dt;
  b.tensor_cores = f.tensor_cores;
  b.sm = f.sm;
  b.max_smem_bytes = f.max_smem_bytes;
  b.smem_per_sm = f.smem_per_sm;
  if (path == RetrievalPath::kGemm || path == RetrievalPath::kWgmma) {
    // The softmax kernels for fresh (aligned) rows of S slots.
    RetrievalSoftmaxParams sp{};
    sp.slots = slots;
    sp.dtype = dt;
    const int vecs = retrieval_softmax_vecs(sp);
    const std::string kind = vecs == 0
                                 ? std::string("_kernel (element-wise, 4-byte loads)")
                                 : "_vec_kernel<" + std::to_string(vecs) + "> (" +
                                       std::to_string(vecs) + " float4 per lane, rows read once)";
    std::string fwd = "gemm: h M^T (cuBLAS, fp32 scores), retrieval_softmax_fwd" + kind +
                      " (P as " + dtype + ", fp32 lse), P M (cuBLAS)";
    std::string bwd = "gemm: h M^T and grad_out M^T (cuBLAS, fp32), retrieval_softmax_bwd" + kind +
                      " (P and scale * dS as " + dtype +
                      "), (scale dS) M, (scale dS)^T h + P^T grad_out (cuBLAS)";
    if (path == RetrievalPath::kGemm) return {"gemm", fwd, bwd};
    const char* sm90a = "on an sm_90 GPU, from a build for sm_90a): ";
    fwd = retrieval_fwd_wgmma_applies(f) && wgmma_compiled_on_current_device()
              ? describe_retrieval_fwd_wgmma(f)
              : "gemm path (the wgmma forward takes fp16 / bf16 at D = 128, 256 or 512 " +
                    (sm90a + fwd);
    bwd = retrieval_bwd_wgmma_applies(b) && wgmma_compiled_on_current_device()
              ? describe_retrieval_bwd_wgmma(b)
              : "gemm path (the wgmma backward takes fp16 / bf16 at D = 64 .. 512, D % 64 == 0, " +
                    (sm90a + bwd);
    return {"wgmma", fwd, bwd};
  }
  const char* name = path == RetrievalPath::kSimt ? "simt" : "fused";
  return {name, describe_memory_retrieval_fwd(f), describe_memory_retrieval_bwd(b)};
}

namespace {

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

// ---- the fused mixer ---------------------------------------------------------------------------
//
// Forward: z = h Wg^T + bg (one cuBLAS GEMM through ATen, the gate parameters rounded to h's
// dtype as the memory bank is), the retrieval on the path GAM_EXT_RETRIEVAL picks, writing G,
// then the mixer's epilogue kernel (conv, gates, out) on G. Keeps lse, z and G for the backward.
// Backward: the prologue kernel (dG, dL, dz from df, z, G and h), the conv's backward on dL, the
// retrieval's backward on dG (it computes delta = rowsum(dG G) where its path needs it). On the
// gemm and wgmma paths, whose P and scale * dS land beside dz in one buffer, dh = dx_conv +
// [dz | scale dS] [Wg; M] is one cuBLAS product (K = 2D + S, fp32 accumulation, the conv's part
// added in its epilogue, rounded once): no fp32 dz Wg and no retrieval dh go to memory. On the
// fused and SIMT paths, dh = (dz Wg + dh_retrieval) + dx_conv, summed in fp32 by one kernel and
// rounded once. Then dWg = dz^T h and dbg = sum dz (fp32, cuBLAS and a sum through ATen).

Tensor mixer_gate_logits(const Tensor& h2, const Tensor& gate_weight,
                         const c10::optional<Tensor>& gate_bias) {
  const Tensor w = gate_weight.to(h2.scalar_type());
  if (gate_bias.has_value()) return at::addmm(gate_bias->to(h2.scalar_type()), h2, w.t());
  return at::mm(h2, w.t());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gam_mixer_fwd(
    const Tensor& h_in, const Tensor& conv_weight, const c10::optional<Tensor>& conv_bias,
    const Tensor& memory, const Tensor& gate_weight, const c10::optional<Tensor>& gate_bias,
    double scale) {
  check_mixer_args(h_in, conv_weight, conv_bias, memory, gate_weight, gate_bias);
  check_on_device(h_in, "h");
  const DType dt = kernel_dtype(h_in, "h");
  DeviceCtx ctx(h_in);
  const Tensor h = h_in.contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), rows = b * n;
  const Tensor m = memory_in_activation_dtype(memory, h);
  const Tensor h2 = h.view({rows, d});
  const Tensor z = mixer_gate_logits(h2, gate_weight, gate_bias).view({b, n, 2 * d});
  const Tensor w = f32_contig(conv_weight);
  const Tensor cb = conv_bias.has_value() ? f32_contig(*conv_bias) : Tensor();
  Tensor out = at::empty_like(h), g = at::empty_like(h);
  Tensor lse = at::empty({b, n}, h.options().dtype(at::kFloat));
  MixerEpilogueParams mp{};
  mp.h = h.data_ptr();
  mp.gate_logits = z.data_ptr();
  mp.global_ctx = g.data_ptr();
  mp.conv_weight = w.data_ptr<float>();
  mp.conv_bias = cb.defined() ? cb.data_ptr<float>() : nullptr;
  mp.out = out.data_ptr();
  mp.rows = rows;
  mp.seqlen = n;
  mp.dim = d;
  mp.kwidth = static_cast<int>(w.size(1));
  mp.dtype = dt;
  retrieval_fwd(h, m, scale, g, lse, dt, ctx);
  launch_gam_mixer_epilogue(mp, ctx.stream());
  return {out, lse, z, g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gam_mixer_bwd(
    const Tensor& grad_out, const Tensor& h_in, const Tensor& conv_weight,
    const c10::optional<Tensor>& conv_bias, const Tensor& memory, const Tensor& gate_weight,
    const Tensor& lse_in, const Tensor& z_in, const Tensor& g_in, double scale) {
  check_mixer_bwd_args(grad_out, h_in, conv_weight, conv_bias, memory, gate_weight, lse_in, z_in,
                       g_in);
  check_on_device(h_in, "h");
  const DType dt = kernel_dtype(h_in, "h");
  DeviceCtx ctx(h_in);
  const auto st = h_in.scalar_type();
  const Tensor h = h_in.contiguous();
  const Tensor df = grad_out.to(st).contiguous();
  const Tensor z = z_in.to(st).contiguous();
  const Tensor g = g_in.to(st).contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), rows = b * n;
  const int64_t s = memory.size(0), k = conv_weight.size(1);
  if (rows == 0 || d == 0) {
    return {at::zeros_like(h),
            at::zeros({d, k}, conv_weight.options()),
            at::zeros({d}, conv_weight.options()),
            at::zeros({s, d}, memory.options()),
            at::zeros({2 * d, d}, gate_weight.options()),
            at::zeros({2 * d}, gate_weight.options())};
  }
  const Tensor m = memory_in_activation_dtype(memory, h);
  const Tensor wg = gate_weight.to(st).contiguous();
  const Tensor w = f32_contig(conv_weight);
  const Tensor cb = conv_bias.has_value() ? f32_contig(*conv_bias) : Tensor();
  const RetrievalPath path = retrieval_path_from_env(dt, ctx.props().sm);
  const bool forms_pds = retrieval_bwd_forms_pds(path);
  // With P and scale * dS from the retrieval, rows of [P | dz | scale dS] in one buffer (P and dS
  // padded to pds_ld(S)), so that dh's gate and retrieval parts are one product, [dz | scale dS]
  // [Wg; M]. Else dz alone.
  const int64_t sp = pds_ld(s), ld = forms_pds ? 2 * sp + 2 * d : 2 * d;
  Tensor work = pds_buffer({rows, ld}, h);
  const Tensor dz2 = work.narrow(1, forms_pds ? sp : 0, 2 * d);
  const Tensor h2 = h.view({rows, d});
  Tensor dglobal = at::empty_like(h), dlocal = at::empty_like(h);
  MixerPrologueParams pp{};
  pp.grad_out = df.data_ptr();
  pp.h = h.data_ptr();
  pp.gate_logits = z.data_ptr();
  pp.global_ctx = g.data_ptr();
  pp.conv_weight = w.data_ptr<float>();
  pp.conv_bias = cb.defined() ? cb.data_ptr<float>() : nullptr;
  pp.dglobal = dglobal.data_ptr();
  pp.dlocal = dlocal.data_ptr();
  pp.dgate_logits = dz2.data_ptr();
  pp.dz_ld = ld;
  pp.rows = rows;
  pp.seqlen = n;
  pp.dim = d;
  pp.kwidth = static_cast<int>(k);
  pp.dtype = dt;
  launch_gam_mixer_prologue(pp, ctx.stream());
  auto [dx, dw, dcb] = causal_conv1d_bwd(dlocal, h, w);
  Tensor dh, dm;
  if (forms_pds) {
    RetrievalBwdParams bp = retrieval_bwd_params(dglobal, h, m, g, lse, scale, dt, path, ctx);
    Tensor pr = work.narrow(1, 0, s), ds = work.narrow(1, sp + 2 * d, s);
    const Tensor dg2 = dglobal.view({rows, d});
    retrieval_bwd_pds(bp, path, dg2, h2, m, lse.view({rows}), scale, pr, ds, ld, ctx.stream());
    dm = at::empty({s, d}, h.options().dtype(at::kFloat));
    retrieval_bwd_dm(pr, ds, dg2, h2, dm);
    // dh = dx_conv + [dz | scale dS] [Wg; M]: one product over 2D + S, added to the conv's part
    // in fp32 and rounded once (in place of the conv's dx).
    dh = dx;
    Tensor dh2 = dh.view({rows, d});
    addmm_in_place(dh2, work.narrow(1, sp, 2 * d + s), at::cat({wg, m}));
  } else {
    // The retrieval's kernels compute its dh and dM; dh = (dz Wg + dh_retrieval) + dx_conv, summed
    // in fp32 by one kernel and rounded once.
    Tensor dh_ret;
    std::tie(dh_ret, dm) = retrieval_bwd(dglobal, h, m, g, lse, scale, dt, ctx);
    const Tensor dh_gate = mm_f32(dz2, wg).contiguous();
    dh = at::empty_like(h);
    MixerDhSumParams sum{};
    sum.gate_part = dh_gate.data_ptr<float>();
    sum.retrieval_part = dh_ret.data_ptr();
    sum.conv_part = dx.data_ptr();
    sum.dh = dh.data_ptr();
    sum.n = rows * d;
    sum.dtype = dt;
    launch_gam_mixer_dh_sum(sum, ctx.stream());
  }
  const Tensor dwg = mm_f32(dz2.t(), h2);
  const Tensor dbg = at::sum(dz2, {0}, false, at::kFloat);
  const auto wdt = conv_weight.scalar_type();
  return {dh,
          dw.to(wdt),
          dcb.to(wdt),
          dm.to(memory.scalar_type()),
          dwg.to(gate_weight.scalar_type()),
          dbg.to(gate_weight.scalar_type())};
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
  m.def("gam_mixer_fwd", &gc::gam_mixer_fwd);
  m.def("gam_mixer_bwd", &gc::gam_mixer_bwd);
  m.def(
      "set_device",
      [](int sm, int smem_optin, int smem_per_sm) {
        gc::g_emulated_device = gc::DeviceProps{sm, smem_optin, smem_per_sm};
      },
      "The emulated device the retrieval launchers size their kernels for (default: sm 90, "
      "227 KiB per block, 228 KiB per SM).");
  m.def("retrieval_path", &gc::retrieval_path);
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
  m.impl("gam_mixer_fwd", &gam::cuda::gam_mixer_fwd);
  m.impl("gam_mixer_bwd", &gam::cuda::gam_mixer_bwd);
  m.impl("causal_conv1d_update", &gam::cuda::causal_conv1d_update);
  m.impl("gam_mixer_step", &gam::cuda::gam_mixer_step);
}

#endif
