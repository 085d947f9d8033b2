// The fused mixer's elementwise kernels (gam_mixer_fwd / gam_mixer_bwd; dispatch.cpp runs them).
//
// Forward: mixer_epilogue_kernel applies the mixer's epilogue, out = sigmoid(zl) * conv(h) +
// sigmoid(zg) * G, to the G the retrieval wrote (any path), with the conv kernel's tiling
// (conv_common.cuh): a thread walks a span of time steps of VEC channels with the conv weights and
// the K-1 previous rows of h in registers, so each row of h is read once and no weight per row;
// conv(h) is never written. (The first version, grid-stride over (row, channel group) with the
// taps and weights read per row, issued about 38 loads per 16-byte group of output.)
// Backward: mixer_prologue_kernel, one warp per row, turns df into the retrieval's and the conv's
// output gradients and the gate logits' gradient (dG, dL, dz) and delta = rowsum(dG G) for the
// retrieval's backward. mixer_dh_sum_kernel adds the three parts of dh (the gate linear's fp32
// dz Wg, the retrieval's and the conv's) in one pass. Everything in fp32; no atomics.
#include "common.cuh"
#include "conv_common.cuh"
#include "launchers.h"

namespace gam {
namespace cuda {
namespace {

constexpr int kDhSumThreads = 256;
constexpr int kPrologueWarps = 8;
// Rows of h the epilogue loads at once (conv_fwd_kernel loads kConvStep = 4): with the gates'
// loads beside them, 2 or 4 rows did not fit the 128 registers of 4 blocks of 128 threads per SM
// without spilling at K = 4.
constexpr int kEpilogueStep = 1;

// The causal conv of VEC channels c .. c+VEC-1 of row r, step pos of its sequence:
// l = bias + sum_j w[:, j] h[r - (K-1) + j] (taps before the start of the sequence read zeros).
// h is (R, D), 16-byte aligned rows at c when VEC * sizeof(T) == 16; w is (D, K) fp32. l is
// rounded to T, where the three-op path stores the conv's output (and the one-token step rounds
// it), so that both paths compute the same mixer.
template <typename T, int VEC>
__device__ __forceinline__ void conv_channels(const T* __restrict__ h, const float* __restrict__ w,
                                              const float* __restrict__ bias, int64_t r,
                                              int64_t pos, int64_t c, int64_t dim, int k,
                                              float (&l)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) l[v] = bias != nullptr ? bias[c + v] : 0.f;
  const int j0 = pos >= k - 1 ? 0 : static_cast<int>(k - 1 - pos);
  for (int j = j0; j < k; ++j) {
    float xv[VEC];
    load_f32<T, VEC>(h + (r - (k - 1) + j) * dim + c, xv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) l[v] = fmaf(w[(c + v) * k + j], xv[v], l[v]);
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) l[v] = to_f32(from_f32<T>(l[v]));
}

// out = sigmoid(zl) * l + sigmoid(zg) * g over VEC channels.
template <int VEC>
__device__ __forceinline__ void gate_channels(const float (&zl)[VEC], const float (&zg)[VEC],
                                              const float (&l)[VEC], const float (&g)[VEC],
                                              float (&out)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = sigmoid_f32(zl[v]) * l[v] + sigmoid_f32(zg[v]) * g[v];
}

// The epilogue of rows row0 + t, t in [t0, t1), channels c .. c+VEC-1, given l (the conv of the
// row, unrounded).
template <typename T, int VEC>
__device__ __forceinline__ void epilogue_row(const T* __restrict__ z, const T* __restrict__ g,
                                             T* __restrict__ out, int64_t r, int64_t c, int64_t dim,
                                             float (&l)[VEC]) {
  float gv[VEC], zl[VEC], zg[VEC], f[VEC];
  load_f32<T, VEC>(g + r * dim + c, gv);
  load_f32<T, VEC>(z + r * 2 * dim + c, zl);
  load_f32<T, VEC>(z + r * 2 * dim + dim + c, zg);
#pragma unroll
  for (int v = 0; v < VEC; ++v) l[v] = to_f32(from_f32<T>(l[v]));
  gate_channels<VEC>(zl, zg, l, gv, f);
  store_f32<T, VEC>(out + r * dim + c, f);
}

// K = 2, 3, 4: weights and the window of h in registers, as conv_fwd_kernel; at least 4 blocks per
// SM (128 registers: without the bound, ptxas left a 4-byte spill in the fp32 variants).
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY, 4)
    mixer_epilogue_kernel(const T* __restrict__ h, const T* __restrict__ z, const T* __restrict__ g,
                          const float* __restrict__ w, const float* __restrict__ bias,
                          T* __restrict__ out, int64_t seqlen, int64_t dim, int tblocks_per_seq,
                          int span) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  const int64_t row0 = th.b * seqlen;
  conv_span<T, VEC, K, kEpilogueStep>(
      h + row0 * dim, w, bias, th.c, dim, th.t0, th.t1,
      [&](int64_t t, float (&l)[VEC]) { epilogue_row<T, VEC>(z, g, out, row0 + t, th.c, dim, l); });
}

// Any K: the taps read from h per row (conv_channels), as conv_fwd_generic_kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY)
    mixer_epilogue_generic_kernel(const T* __restrict__ h, const T* __restrict__ z,
                                  const T* __restrict__ g, const float* __restrict__ w,
                                  const float* __restrict__ bias, T* __restrict__ out,
                                  int64_t seqlen, int64_t dim, int tblocks_per_seq, int span,
                                  int k) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  const int64_t row0 = th.b * seqlen;
  for (int64_t t = th.t0; t < th.t1; ++t) {
    float l[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) l[v] = bias != nullptr ? bias[th.c + v] : 0.f;
    const int j0 = t - (k - 1) >= 0 ? 0 : static_cast<int>((k - 1) - t);
    for (int j = j0; j < k; ++j) {
      float xv[VEC];
      load_f32<T, VEC>(h + (row0 + t - (k - 1) + j) * dim + th.c, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) l[v] = fmaf(w[(th.c + v) * k + j], xv[v], l[v]);
    }
    epilogue_row<T, VEC>(z, g, out, row0 + t, th.c, dim, l);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kPrologueWarps * 32)
    mixer_prologue_kernel(const T* __restrict__ df, const T* __restrict__ h,
                          const T* __restrict__ z, const T* __restrict__ g,
                          const float* __restrict__ w, const float* __restrict__ bias,
                          T* __restrict__ dglobal, T* __restrict__ dlocal, T* __restrict__ dz,
                          float* __restrict__ delta, int64_t rows, int64_t seqlen, int64_t dim,
                          int k) {
  const int64_t row = int64_t(blockIdx.x) * kPrologueWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  const int64_t pos = row % seqlen;
  float s = 0.f;
  for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
    float f[VEC], zl[VEC], zg[VEC], gv[VEC], l[VEC];
    load_f32<T, VEC>(df + row * dim + c, f);
    load_f32<T, VEC>(z + row * 2 * dim + c, zl);
    load_f32<T, VEC>(z + row * 2 * dim + dim + c, zg);
    load_f32<T, VEC>(g + row * dim + c, gv);
    conv_channels<T, VEC>(h, w, bias, row, pos, c, dim, k, l);
    float dgv[VEC], dlv[VEC], dzl[VEC], dzg[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float sl = sigmoid_f32(zl[v]), sg = sigmoid_f32(zg[v]);
      // dG as the retrieval's backward sees it (rounded to T), so that delta = sum p dP.
      dgv[v] = to_f32(from_f32<T>(sg * f[v]));
      dlv[v] = sl * f[v];
      dzl[v] = f[v] * l[v] * sl * (1.f - sl);
      dzg[v] = f[v] * gv[v] * sg * (1.f - sg);
      s = fmaf(dgv[v], gv[v], s);
    }
    store_f32<T, VEC>(dglobal + row * dim + c, dgv);
    store_f32<T, VEC>(dlocal + row * dim + c, dlv);
    store_f32<T, VEC>(dz + row * 2 * dim + c, dzl);
    store_f32<T, VEC>(dz + row * 2 * dim + dim + c, dzg);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) delta[row] = s;
}

// dh = T((gate + retrieval) + conv) over VEC elements per group: one read of each part and one
// write, where three ATen passes over the fp32 sum (two adds and the rounding) read and wrote it
// five times.
template <typename T, int VEC>
__global__ void __launch_bounds__(kDhSumThreads)
    mixer_dh_sum_kernel(const float* __restrict__ gate, const T* __restrict__ retrieval,
                        const T* __restrict__ conv, T* __restrict__ dh, int64_t n) {
  const int64_t groups = n / VEC;  // VEC divides n on every path
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC;
    float x[VEC], y[VEC], z[VEC];
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int q = 0; q < VEC; q += 4)
        load_f32<float, 4>(gate + e + q, *reinterpret_cast<float (*)[4]>(x + q));
    } else {
      load_f32<float, VEC>(gate + e, x);
    }
    load_f32<T, VEC>(retrieval + e, y);
    load_f32<T, VEC>(conv + e, z);
#pragma unroll
    for (int v = 0; v < VEC; ++v) x[v] = (x[v] + y[v]) + z[v];
    store_f32<T, VEC>(dh + e, x);
  }
}

}  // namespace

void launch_gam_mixer_epilogue(const MixerEpilogueParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = p.dim % V == 0 && aligned16(p.h) && aligned16(p.gate_logits) &&
                     aligned16(p.global_ctx) && aligned16(p.out);
    auto launch = [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      const ConvGrid cg = conv_grid(p.rows / p.seqlen, p.seqlen, p.dim, VEC, /*backward=*/false);
      const dim3 block(kConvThreadsX, kConvThreadsY);
      const auto* h = static_cast<const T*>(p.h);
      const auto* z = static_cast<const T*>(p.gate_logits);
      const auto* g = static_cast<const T*>(p.global_ctx);
      auto* out = static_cast<T*>(p.out);
      static_switch<2, 3, 4>(
          [&](int k) { return k == p.kwidth; },
          [&](auto k) {
            gam_launch("gam_mixer_epilogue", mixer_epilogue_kernel<T, VEC, decltype(k)::value>,
                       cg.grid(), block, 0, stream, h, z, g, p.conv_weight, p.conv_bias, out,
                       p.seqlen, p.dim, cg.per_seq, cg.span);
          },
          [&] {
            gam_launch("gam_mixer_epilogue_generic", mixer_epilogue_generic_kernel<T, VEC>,
                       cg.grid(), block, 0, stream, h, z, g, p.conv_weight, p.conv_bias, out,
                       p.seqlen, p.dim, cg.per_seq, cg.span, p.kwidth);
          });
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void launch_gam_mixer_prologue(const MixerPrologueParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = p.dim % V == 0 && aligned16(p.grad_out) && aligned16(p.h) &&
                     aligned16(p.gate_logits) && aligned16(p.global_ctx) && aligned16(p.dglobal) &&
                     aligned16(p.dlocal) && aligned16(p.dgate_logits);
    auto launch = [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      gam_launch("gam_mixer_prologue", mixer_prologue_kernel<T, VEC>,
                 dim3(static_cast<unsigned>(ceil_div(p.rows, kPrologueWarps))),
                 dim3(kPrologueWarps * 32), 0, stream, static_cast<const T*>(p.grad_out),
                 static_cast<const T*>(p.h), static_cast<const T*>(p.gate_logits),
                 static_cast<const T*>(p.global_ctx), p.conv_weight, p.conv_bias,
                 static_cast<T*>(p.dglobal), static_cast<T*>(p.dlocal),
                 static_cast<T*>(p.dgate_logits), p.delta, p.rows, p.seqlen, p.dim, p.kwidth);
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void launch_gam_mixer_dh_sum(const MixerDhSumParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = p.n % V == 0 && aligned16(p.gate_part) && aligned16(p.retrieval_part) &&
                     aligned16(p.conv_part) && aligned16(p.dh);
    auto launch = [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      gam_launch("gam_mixer_dh_sum", mixer_dh_sum_kernel<T, VEC>,
                 grid_stride_grid(p.n / VEC, kDhSumThreads), dim3(kDhSumThreads), 0, stream,
                 p.gate_part, static_cast<const T*>(p.retrieval_part),
                 static_cast<const T*>(p.conv_part), static_cast<T*>(p.dh), p.n);
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace cuda
}  // namespace gam
