// Causal depthwise conv forward: y[b,t,c] = bias[c] + sum_j w[c,j] * x[b, t-(K-1)+j, c].
// Fast paths with K in registers (K = 2, 3, 4); a generic path for any other K.
#include "common.cuh"
#include "conv_common.cuh"
#include "launchers.h"

namespace gam {
namespace cuda {
namespace {

template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY)
    conv_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                    const float* __restrict__ bias, T* __restrict__ y, int64_t seqlen, int64_t dim,
                    int tblocks_per_seq, int span) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  T* yb = y + th.b * seqlen * dim + th.c;
  conv_span<T, VEC, K, kConvStep>(
      x + th.b * seqlen * dim, w, bias, th.c, dim, th.t0, th.t1,
      [&](int64_t t, const float (&acc)[VEC]) { store_f32<T, VEC>(yb + t * dim, acc); });
}

// Any K: taps read straight from global memory (conv_span_any_k).
template <typename T, int VEC>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY)
    conv_fwd_generic_kernel(const T* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ bias, T* __restrict__ y, int64_t seqlen,
                            int64_t dim, int tblocks_per_seq, int span, int k) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  T* yb = y + th.b * seqlen * dim + th.c;
  conv_span_any_k<T, VEC>(
      x + th.b * seqlen * dim, w, bias, th.c, dim, th.t0, th.t1, k,
      [&](int64_t t, const float (&acc)[VEC]) { store_f32<T, VEC>(yb + t * dim, acc); });
}

template <typename T, int VEC>
void launch_conv_fwd(const ConvFwdParams& p, cudaStream_t stream) {
  const ConvGrid g = conv_grid(p.batch, p.seqlen, p.dim, VEC, /*backward=*/false);
  const int per_seq = g.per_seq;
  const dim3 block(kConvThreadsX, kConvThreadsY);
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.y);
  // Weights in registers for K = 2, 3, 4; any other K reads its taps from memory.
  static_switch<2, 3, 4>(
      [&](int k) { return k == p.kwidth; },
      [&](auto k) {
        gam_launch("conv_fwd_kernel", conv_fwd_kernel<T, VEC, decltype(k)::value>, g.grid(), block,
                   0, stream, x, p.weight, p.bias, y, p.seqlen, p.dim, per_seq, g.span);
      },
      [&] {
        gam_launch("conv_fwd_generic_kernel", conv_fwd_generic_kernel<T, VEC>, g.grid(), block, 0,
                   stream, x, p.weight, p.bias, y, p.seqlen, p.dim, per_seq, g.span, p.kwidth);
      });
}

}  // namespace

void launch_causal_conv1d_fwd(const ConvFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    if (p.dim % V == 0 && aligned16(p.x) && aligned16(p.y)) {
      launch_conv_fwd<T, V>(p, stream);
    } else {
      launch_conv_fwd<T, 1>(p, stream);
    }
  });
}

}  // namespace cuda
}  // namespace gam
