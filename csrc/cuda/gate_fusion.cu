// Gate fusion f = sigmoid(zl) * local + sigmoid(zg) * global_ctx and its backward, one pass each.
// Memory-bound: each thread handles 16-byte groups of channels (grid-stride), fp32 math.
#include "common.cuh"
#include "launchers.h"

namespace gam {
namespace cuda {
namespace {

constexpr int kGateThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kGateThreads)
    gate_fwd_kernel(const T* __restrict__ local, const T* __restrict__ global_ctx,
                    const T* __restrict__ gate_logits, T* __restrict__ out, int64_t rows,
                    int64_t dim) {
  const int64_t groups = dim / VEC;  // VEC divides dim on every path
  const int64_t total = rows * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups;
    const int64_t c = (i - r * groups) * VEC;
    float l[VEC], g[VEC], zl[VEC], zg[VEC], f[VEC];
    load_f32<T, VEC>(local + r * dim + c, l);
    load_f32<T, VEC>(global_ctx + r * dim + c, g);
    load_f32<T, VEC>(gate_logits + r * 2 * dim + c, zl);
    load_f32<T, VEC>(gate_logits + r * 2 * dim + dim + c, zg);
#pragma unroll
    for (int v = 0; v < VEC; ++v) f[v] = sigmoid_f32(zl[v]) * l[v] + sigmoid_f32(zg[v]) * g[v];
    store_f32<T, VEC>(out + r * dim + c, f);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kGateThreads)
    gate_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ local,
                    const T* __restrict__ global_ctx, const T* __restrict__ gate_logits,
                    T* __restrict__ dlocal, T* __restrict__ dglobal_ctx,
                    T* __restrict__ dgate_logits, int64_t rows, int64_t dim) {
  const int64_t groups = dim / VEC;
  const int64_t total = rows * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups;
    const int64_t c = (i - r * groups) * VEC;
    float df[VEC], l[VEC], g[VEC], zl[VEC], zg[VEC];
    load_f32<T, VEC>(grad_out + r * dim + c, df);
    load_f32<T, VEC>(local + r * dim + c, l);
    load_f32<T, VEC>(global_ctx + r * dim + c, g);
    load_f32<T, VEC>(gate_logits + r * 2 * dim + c, zl);
    load_f32<T, VEC>(gate_logits + r * 2 * dim + dim + c, zg);
    float dl[VEC], dg[VEC], dzl[VEC], dzg[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float sl = sigmoid_f32(zl[v]);
      const float sg = sigmoid_f32(zg[v]);
      dl[v] = sl * df[v];
      dg[v] = sg * df[v];
      dzl[v] = df[v] * l[v] * sl * (1.f - sl);
      dzg[v] = df[v] * g[v] * sg * (1.f - sg);
    }
    store_f32<T, VEC>(dlocal + r * dim + c, dl);
    store_f32<T, VEC>(dglobal_ctx + r * dim + c, dg);
    store_f32<T, VEC>(dgate_logits + r * 2 * dim + c, dzl);
    store_f32<T, VEC>(dgate_logits + r * 2 * dim + dim + c, dzg);
  }
}

}  // namespace

void launch_gate_fusion_fwd(const GateFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = p.dim % V == 0 && aligned16(p.local) && aligned16(p.global_ctx) &&
                     aligned16(p.gate_logits) && aligned16(p.out);
    const auto* l = static_cast<const T*>(p.local);
    const auto* g = static_cast<const T*>(p.global_ctx);
    const auto* z = static_cast<const T*>(p.gate_logits);
    auto* o = static_cast<T*>(p.out);
    if (vec) {
      gam_launch("gate_fwd_vec", gate_fwd_kernel<T, V>,
                 grid_stride_grid(p.rows * p.dim / V, kGateThreads), dim3(kGateThreads), 0, stream,
                 l, g, z, o, p.rows, p.dim);
    } else {
      gam_launch("gate_fwd_scalar", gate_fwd_kernel<T, 1>,
                 grid_stride_grid(p.rows * p.dim, kGateThreads), dim3(kGateThreads), 0, stream, l,
                 g, z, o, p.rows, p.dim);
    }
  });
}

void launch_gate_fusion_bwd(const GateBwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = p.dim % V == 0 && aligned16(p.grad_out) && aligned16(p.local) &&
                     aligned16(p.global_ctx) && aligned16(p.gate_logits) && aligned16(p.dlocal) &&
                     aligned16(p.dglobal_ctx) && aligned16(p.dgate_logits);
    const auto* df = static_cast<const T*>(p.grad_out);
    const auto* l = static_cast<const T*>(p.local);
    const auto* g = static_cast<const T*>(p.global_ctx);
    const auto* z = static_cast<const T*>(p.gate_logits);
    auto* dl = static_cast<T*>(p.dlocal);
    auto* dg = static_cast<T*>(p.dglobal_ctx);
    auto* dz = static_cast<T*>(p.dgate_logits);
    if (vec) {
      gam_launch("gate_bwd_vec", gate_bwd_kernel<T, V>,
                 grid_stride_grid(p.rows * p.dim / V, kGateThreads), dim3(kGateThreads), 0, stream,
                 df, l, g, z, dl, dg, dz, p.rows, p.dim);
    } else {
      gam_launch("gate_bwd_scalar", gate_bwd_kernel<T, 1>,
                 grid_stride_grid(p.rows * p.dim, kGateThreads), dim3(kGateThreads), 0, stream, df,
                 l, g, z, dl, dg, dz, p.rows, p.dim);
    }
  });
}

}  // namespace cuda
}  // namespace gam
