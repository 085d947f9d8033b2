// Causal depthwise conv backward:
//   dx[b,t,c] = sum_j w[c,j] * dy[b, t+(K-1)-j, c]
//   dw[c,j]   = sum_{b,t} dy[b,t,c] * x[b, t-(K-1)+j, c],  dbias[c] = sum_{b,t} dy[b,t,c]
// One pass reads dy and x once (plus halos), writes dx, and leaves per-block fp32 partials of
// dw/dbias in a workspace; a second pass sums the partials in a fixed order (deterministic, no
// float atomics).
#include "common.cuh"
#include "conv_common.cuh"
#include "launchers.h"

namespace gam {
namespace cuda {
namespace {

// 16-byte vectors: 8 channels per thread for fp16/bf16, 4 for fp32. With 8 channels the K*VEC
// weights and dw accumulators double, so those threads keep 2 time steps in flight instead of 4
// (kBwdStep) to stay within registers.
template <typename T>
constexpr int kBwdVec = 16 / static_cast<int>(sizeof(T));
template <int VEC>
constexpr int kBwdStep = VEC >= 8 ? 2 : kConvStep;

// Sums each thread's VEC values of `val` over the kConvThreadsY time spans of the block, in a fixed
// order, into partials[q * dim + c]. Every thread of the block must call it.
template <int VEC>
__device__ __forceinline__ void block_partial(float* red, const float (&val)[VEC], bool active_c,
                                              int64_t c, float* __restrict__ out) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (active_c) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[(ty * kConvThreadsX + tx) * VEC + v] = val[v];
  }
  __syncthreads();
  if (ty == 0 && active_c) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float s = 0.f;
      for (int r = 0; r < kConvThreadsY; ++r) s += red[(r * kConvThreadsX + tx) * VEC + v];
      out[c + v] = s;
    }
  }
  __syncthreads();
}

template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY)
    conv_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                    T* __restrict__ dx, float* __restrict__ partials, int64_t seqlen, int64_t dim,
                    int tblocks_per_seq, int span) {
  GAM_SHARED(float, red, kConvThreadsX * kConvThreadsY * VEC);
  ConvThread th;
  const bool active = conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th);
  const bool active_c = th.c < dim;
  float dw[K][VEC], db[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    db[v] = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) dw[j][v] = 0.f;
  }
  if (active) {
    const int64_t base = th.b * seqlen * dim + th.c;
    const T* xb = x + base;
    const T* gb = dy + base;
    T* dxb = dx + base;
    float wr[K][VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
      for (int j = 0; j < K; ++j) wr[j][v] = w[(th.c + v) * K + j];
    }
    // bx[i] = x at t - (K-1) + i (causal halo behind); bg[i] = dy at t + i (halo ahead).
    constexpr int kStep = kBwdStep<VEC>;
    float bx[K - 1 + kStep][VEC], bg[K - 1 + kStep][VEC];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      const int64_t tx_ = th.t0 - (K - 1) + j;
      const int64_t tg = th.t0 + j;
#pragma unroll
      for (int v = 0; v < VEC; ++v) bx[j][v] = bg[j][v] = 0.f;
      if (tx_ >= 0) load_f32<T, VEC>(xb + tx_ * dim, bx[j]);
      if (tg < seqlen) load_f32<T, VEC>(gb + tg * dim, bg[j]);
    }
    for (int64_t t = th.t0; t < th.t1; t += kStep) {
#pragma unroll
      for (int i = 0; i < kStep; ++i) {
        const int64_t tg = t + (K - 1) + i;
#pragma unroll
        for (int v = 0; v < VEC; ++v) bx[K - 1 + i][v] = bg[K - 1 + i][v] = 0.f;
        if (t + i < th.t1) load_f32<T, VEC>(xb + (t + i) * dim, bx[K - 1 + i]);
        if (tg < seqlen) load_f32<T, VEC>(gb + tg * dim, bg[K - 1 + i]);
      }
#pragma unroll
      for (int i = 0; i < kStep; ++i) {
        if (t + i < th.t1) {
          float out[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < K; ++j) acc = fmaf(wr[j][v], bg[i + K - 1 - j][v], acc);
            out[v] = acc;
            const float g = bg[i][v];
            db[v] += g;
#pragma unroll
            for (int j = 0; j < K; ++j) dw[j][v] = fmaf(g, bx[i + j][v], dw[j][v]);
          }
          store_f32<T, VEC>(dxb + (t + i) * dim, out);
        }
      }
#pragma unroll
      for (int j = 0; j < K - 1; ++j) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          bx[j][v] = bx[kStep + j][v];
          bg[j][v] = bg[kStep + j][v];
        }
      }
    }
  }
  float* part = partials + int64_t(blockIdx.x) * (K + 1) * dim;
#pragma unroll
  for (int j = 0; j < K; ++j) block_partial<VEC>(red, dw[j], active_c, th.c, part + j * dim);
  block_partial<VEC>(red, db, active_c, th.c, part + K * dim);
}

// Any K: dx taps and the K+1 partial sums each re-walk the span from global memory (L1/L2 hits).
template <typename T, int VEC>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY)
    conv_bwd_generic_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                            const float* __restrict__ w, T* __restrict__ dx,
                            float* __restrict__ partials, int64_t seqlen, int64_t dim,
                            int tblocks_per_seq, int span, int k) {
  GAM_SHARED(float, red, kConvThreadsX * kConvThreadsY * VEC);
  ConvThread th;
  const bool active = conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th);
  const bool active_c = th.c < dim;
  const int64_t base = th.b * seqlen * dim + th.c;
  if (active) {
    for (int64_t t = th.t0; t < th.t1; ++t) {
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
      for (int j = 0; j < k; ++j) {
        const int64_t tg = t + (k - 1) - j;
        if (tg >= seqlen) continue;
        float g[VEC];
        load_f32<T, VEC>(dy + base + tg * dim, g);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w[(th.c + v) * k + j], g[v], acc[v]);
      }
      store_f32<T, VEC>(dx + base + t * dim, acc);
    }
  }
  float* part = partials + int64_t(blockIdx.x) * (k + 1) * dim;
  for (int q = 0; q <= k; ++q) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    if (active) {
      for (int64_t t = th.t0; t < th.t1; ++t) {
        const int64_t tx_ = t - (k - 1) + q;  // q == k: the bias term, no x
        if (q < k && tx_ < 0) continue;
        float g[VEC], xv[VEC];
        load_f32<T, VEC>(dy + base + t * dim, g);
        if (q < k) {
          load_f32<T, VEC>(x + base + tx_ * dim, xv);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) xv[v] = 1.f;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(g[v], xv[v], acc[v]);
      }
    }
    block_partial<VEC>(red, acc, active_c, th.c, part + q * dim);
  }
}

// Where the reduced partials go: column q < K * D is dw[c, j] (c = q % D, j = q / D) of the (D, K)
// weight gradient, the last D columns are dbias.
struct ConvGradStore {
  float* dweight;
  float* dbias;
  int kwidth;
  int64_t dim;
  __device__ __forceinline__ void operator()(int64_t col, float total) const {
    const int64_t j = col / dim, c = col - j * dim;
    if (j < kwidth) {
      dweight[c * kwidth + j] = total;
    } else {
      dbias[c] = total;
    }
  }
};

template <typename T, int VEC>
void launch_conv_bwd(const ConvBwdParams& p, const ConvGrid& g, cudaStream_t stream) {
  const dim3 block(kConvThreadsX, kConvThreadsY);
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* x = static_cast<const T*>(p.x);
  auto* dx = static_cast<T*>(p.dx);
  // Weights in registers for K = 2, 3, 4; any other K reads its taps from memory.
  static_switch<2, 3, 4>(
      [&](int k) { return k == p.kwidth; },
      [&](auto k) {
        gam_launch("conv_bwd_kernel", conv_bwd_kernel<T, VEC, decltype(k)::value>, g.grid(), block,
                   0, stream, dy, x, p.weight, dx, p.partials, p.seqlen, p.dim, g.per_seq, g.span);
      },
      [&] {
        gam_launch("conv_bwd_generic_kernel", conv_bwd_generic_kernel<T, VEC>, g.grid(), block, 0,
                   stream, dy, x, p.weight, dx, p.partials, p.seqlen, p.dim, g.per_seq, g.span,
                   p.kwidth);
      });
}

template <typename T>
bool use_vec(const ConvBwdParams& p) {
  return p.dim % kBwdVec<T> == 0 && aligned16(p.dy) && aligned16(p.x) && aligned16(p.dx);
}

}  // namespace

int64_t causal_conv1d_bwd_workspace_floats(int64_t batch, int64_t seqlen, int64_t dim, int kwidth) {
  if (batch == 0 || seqlen == 0 || dim == 0) return 0;
  // The time tiling does not depend on the vector width (nor, so, on the dtype).
  const ConvGrid g = conv_grid(batch, seqlen, dim, 1, /*backward=*/true);
  return g.xblocks * (kwidth + 1) * dim;
}

void launch_causal_conv1d_bwd(const ConvBwdParams& p, cudaStream_t stream) {
  if (p.dim == 0) return;
  if (p.batch == 0 || p.seqlen == 0) {
    GAM_CUDA_CHECK(cudaMemsetAsync(p.dweight, 0, sizeof(float) * p.dim * p.kwidth, stream));
    GAM_CUDA_CHECK(cudaMemsetAsync(p.dbias, 0, sizeof(float) * p.dim, stream));
    return;
  }
  int64_t nparts = 0;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = use_vec<T>(p) ? kBwdVec<T> : 1;
    const ConvGrid g = conv_grid(p.batch, p.seqlen, p.dim, vec, /*backward=*/true);
    nparts = g.xblocks;
    if (vec == kBwdVec<T>) {
      launch_conv_bwd<T, kBwdVec<T>>(p, g, stream);
    } else {
      launch_conv_bwd<T, 1>(p, g, stream);
    }
  });
  launch_reduce_partials("conv_bwd_reduce", p.partials, nparts, (p.kwidth + 1) * p.dim,
                         ConvGradStore{p.dweight, p.dbias, p.kwidth, p.dim}, stream);
}

}  // namespace cuda
}  // namespace gam
