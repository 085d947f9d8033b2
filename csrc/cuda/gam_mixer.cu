// The fused mixer's elementwise kernels (gam_mixer_fwd / gam_mixer_bwd; dispatch.cpp runs them).
//
// Forward: mixer_epilogue_kernel applies the mixer's epilogue, out = sigmoid(zl) * conv(h) +
// sigmoid(zg) * G, to the G the retrieval wrote (any path), with the conv kernel's tiling
// (conv_common.cuh): a thread walks a span of time steps of VEC channels with the conv weights and
// the K-1 previous rows of h in registers, so each row of h is read once and no weight per row;
// conv(h) is never written. (The first version, grid-stride over (row, channel group) with the
// taps and weights read per row, issued about 38 loads per 16-byte group of output.)
// Backward: mixer_prologue_kernel, on the same tiling, turns df into the retrieval's and the conv's
// output gradients and the gate logits' gradient (dG, dL, dz); the retrieval's backward computes
// its own delta = rowsum(dG G) where its path needs one (the gemm path's softmax kernel sums
// P dP instead). (The first version ran one warp per row, with the taps and weights read per
// row, and also wrote delta.) The prologue writes dz into rows dz_ld elements apart: on the gemm
// and wgmma retrieval paths it lies between P and scale dS in one buffer, and dh is one cuBLAS
// product [dz | scale dS] [Wg; M] added to the conv's dx (dispatch.cpp). On the fused and SIMT
// paths, whose kernels compute the retrieval's dh themselves, mixer_dh_sum_kernel adds the three
// parts of dh (the gate linear's fp32 dz Wg, the retrieval's and the conv's) in one pass.
// Everything in fp32; no atomics.
#include "common.cuh"
#include "conv_common.cuh"
#include "launchers.h"

namespace gam {
namespace cuda {
namespace {

constexpr int kDhSumThreads = 256;
// Rows of h the prologue's conv_span loads at once (conv_fwd_kernel loads kConvStep = 4). In the
// epilogue, with the gates' loads beside them, 2 or 4 rows at once did not fit the 128 registers
// of 4 blocks of 128 threads per SM without spilling at K = 4; it now loads one row ahead instead
// (epilogue_span_prefetched).
constexpr int kSpanStep = 1;

// out = sigmoid(zl) * l + sigmoid(zg) * g over VEC channels.
template <int VEC>
__device__ __forceinline__ void gate_channels(const float (&zl)[VEC], const float (&zg)[VEC],
                                              const float (&l)[VEC], const float (&g)[VEC],
                                              float (&out)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = sigmoid_f32(zl[v]) * l[v] + sigmoid_f32(zg[v]) * g[v];
}

// The epilogue of row r, channels c .. c+VEC-1, given l, the conv of the row. l is rounded to T
// first, where the three-op path stores the conv's output (and the one-token step rounds it), so
// that both paths compute the same mixer.
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

// The conv of a thread's span of rows: conv_span for K = 2, 3, 4 (the weights and the K-1 previous
// rows of h in registers), conv_span_any_k for K = 0 (k at run time).
template <typename T, int VEC, int K, typename Emit>
__device__ __forceinline__ void mixer_conv_span(const T* __restrict__ hb,
                                                const float* __restrict__ w,
                                                const float* __restrict__ bias, int64_t c,
                                                int64_t dim, int64_t t0, int64_t t1, int k,
                                                Emit&& emit) {
  if constexpr (K > 0) {
    conv_span<T, VEC, K, kSpanStep>(hb, w, bias, c, dim, t0, t1, emit);
  } else {
    conv_span_any_k<T, VEC>(hb, w, bias, c, dim, t0, t1, k, emit);
  }
}

// The epilogue over a thread's span of rows for K = 2, 3, 4 with the next row's four loads (h, G,
// zl, zg) issued before this row is computed, held as loaded (Packed) until the next iteration:
// with only the current row's loads in flight, a thread waited out each row's DRAM latency (ncu,
// H200: 50% of DRAM bandwidth at 4 blocks of 128 threads per SM). The conv sums in conv_span's
// order, so out has the same bits as through conv_span. The last row is loaded twice (a cache hit)
// rather than predicated.
template <typename T, int VEC, int K>
__device__ __forceinline__ void epilogue_span_prefetched(
    const T* __restrict__ h, const T* __restrict__ z, const T* __restrict__ g,
    const float* __restrict__ w, const float* __restrict__ bias, T* __restrict__ out, int64_t row0,
    int64_t c, int64_t dim, int64_t t0, int64_t t1) {
  float wr[K][VEC], br[VEC];
  load_conv_taps<VEC, K>(w, bias, c, wr, br);
  const T* hb = h + row0 * dim + c;
  // halo[j] holds h at time t - (K-1) + j.
  float halo[K - 1][VEC];
  load_conv_halo<T, VEC, K>(hb, dim, t0, halo);
  struct Row {
    Packed<T, VEC> h, g, zl, zg;
  };
  auto load_row = [&](int64_t t) {
    const int64_t r = row0 + t;
    return Row{load_packed<T, VEC>(hb + t * dim), load_packed<T, VEC>(g + r * dim + c),
               load_packed<T, VEC>(z + r * 2 * dim + c),
               load_packed<T, VEC>(z + r * 2 * dim + dim + c)};
  };
  Row cur = load_row(t0);
  for (int64_t t = t0; t < t1; ++t) {
    const Row next = load_row(t + 1 < t1 ? t + 1 : t);
    float x[VEC], l[VEC], gv[VEC], zl[VEC], zg[VEC], f[VEC];
    unpack_f32<T, VEC>(cur.h, x);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float acc = br[v];
#pragma unroll
      for (int j = 0; j < K - 1; ++j) acc = fmaf(wr[j][v], halo[j][v], acc);
      acc = fmaf(wr[K - 1][v], x[v], acc);
      l[v] = to_f32(from_f32<T>(acc));  // rounded as epilogue_row rounds it
    }
    unpack_f32<T, VEC>(cur.g, gv);
    unpack_f32<T, VEC>(cur.zl, zl);
    unpack_f32<T, VEC>(cur.zg, zg);
    gate_channels<VEC>(zl, zg, l, gv, f);
    store_f32<T, VEC>(out + (row0 + t) * dim + c, f);
#pragma unroll
    for (int j = 0; j < K - 2; ++j) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) halo[j][v] = halo[j + 1][v];
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) halo[K - 2][v] = x[v];
    cur = next;
  }
}

// At least 4 blocks per SM (128 registers: without the bound, ptxas left a 4-byte spill in the
// fp32 variants).
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY, 4)
    mixer_epilogue_kernel(const T* __restrict__ h, const T* __restrict__ z, const T* __restrict__ g,
                          const float* __restrict__ w, const float* __restrict__ bias,
                          T* __restrict__ out, int64_t seqlen, int64_t dim, int tblocks_per_seq,
                          int span, int k) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  const int64_t row0 = th.b * seqlen;
  if constexpr (K >= 2) {
    epilogue_span_prefetched<T, VEC, K>(h, z, g, w, bias, out, row0, th.c, dim, th.t0, th.t1);
  } else {
    mixer_conv_span<T, VEC, K>(h + row0 * dim, w, bias, th.c, dim, th.t0, th.t1, k,
                               [&](int64_t t, float (&l)[VEC]) {
                                 epilogue_row<T, VEC>(z, g, out, row0 + t, th.c, dim, l);
                               });
  }
}

// The backward prologue of row r, channels c .. c+VEC-1, given l (the conv of the row, rounded to
// T first as the forward used it): dG = sg df (rounded to T: what the retrieval's backward reads),
// dL = sl df, dz = [df l sl (1 - sl), df G sg (1 - sg)] (rows of dz dz_ld elements apart).
template <typename T, int VEC>
__device__ __forceinline__ void prologue_row(const T* __restrict__ df, const T* __restrict__ z,
                                             const T* __restrict__ g, T* __restrict__ dglobal,
                                             T* __restrict__ dlocal, T* __restrict__ dz,
                                             int64_t dz_ld, int64_t r, int64_t c, int64_t dim,
                                             const float (&l)[VEC]) {
  float f[VEC], zl[VEC], zg[VEC], gv[VEC];
  load_f32<T, VEC>(df + r * dim + c, f);
  load_f32<T, VEC>(z + r * 2 * dim + c, zl);
  load_f32<T, VEC>(z + r * 2 * dim + dim + c, zg);
  load_f32<T, VEC>(g + r * dim + c, gv);
  float dgv[VEC], dlv[VEC], dzl[VEC], dzg[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const float lv = to_f32(from_f32<T>(l[v]));
    const float sl = sigmoid_f32(zl[v]), sg = sigmoid_f32(zg[v]);
    dgv[v] = sg * f[v];
    dlv[v] = sl * f[v];
    dzl[v] = f[v] * lv * sl * (1.f - sl);
    dzg[v] = f[v] * gv[v] * sg * (1.f - sg);
  }
  store_f32<T, VEC>(dglobal + r * dim + c, dgv);
  store_f32<T, VEC>(dlocal + r * dim + c, dlv);
  store_f32<T, VEC>(dz + r * dz_ld + c, dzl);
  store_f32<T, VEC>(dz + r * dz_ld + dim + c, dzg);
}

// At least 3 blocks per SM (170 registers: K = 4 takes about 140).
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kConvThreadsX* kConvThreadsY, 3)
    mixer_prologue_kernel(const T* __restrict__ df, const T* __restrict__ h,
                          const T* __restrict__ z, const T* __restrict__ g,
                          const float* __restrict__ w, const float* __restrict__ bias,
                          T* __restrict__ dglobal, T* __restrict__ dlocal, T* __restrict__ dz,
                          int64_t dz_ld, int64_t seqlen, int64_t dim, int tblocks_per_seq, int span,
                          int k) {
  ConvThread th;
  if (!conv_thread(VEC, seqlen, dim, tblocks_per_seq, span, th)) return;
  const int64_t row0 = th.b * seqlen;
  mixer_conv_span<T, VEC, K>(
      h + row0 * dim, w, bias, th.c, dim, th.t0, th.t1, k, [&](int64_t t, const float (&l)[VEC]) {
        prologue_row<T, VEC>(df, z, g, dglobal, dlocal, dz, dz_ld, row0 + t, th.c, dim, l);
      });
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

// Launches an epilogue or prologue kernel on the conv kernels' tiling (32 x 4 threads): calls
// launch(vec, k, cg) with vec the 16-byte vector width where dim and the pointers allow it (else 1)
// and k = 2, 3, 4 or 0 (any K), both integral constants, and cg the ConvGrid for that width.
template <typename T, typename Launch>
void launch_on_conv_tiling(int64_t rows, int64_t seqlen, int64_t dim, int kwidth, bool aligned,
                           Launch&& launch) {
  constexpr int V = kVec16<T>;
  auto with_vec = [&](auto vtag) {
    constexpr int VEC = decltype(vtag)::value;
    const ConvGrid cg = conv_grid(rows / seqlen, seqlen, dim, VEC, /*backward=*/false);
    static_switch<2, 3, 4>([&](int k) { return k == kwidth; }, [&](auto k) { launch(vtag, k, cg); },
                           [&] { launch(vtag, std::integral_constant<int, 0>{}, cg); });
  };
  if (dim % V == 0 && aligned) {
    with_vec(std::integral_constant<int, V>{});
  } else {
    with_vec(std::integral_constant<int, 1>{});
  }
}

void launch_gam_mixer_epilogue(const MixerEpilogueParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned =
        aligned16(p.h) && aligned16(p.gate_logits) && aligned16(p.global_ctx) && aligned16(p.out);
    launch_on_conv_tiling<T>(
        p.rows, p.seqlen, p.dim, p.kwidth, aligned, [&](auto vtag, auto ktag, const ConvGrid& cg) {
          gam_launch("gam_mixer_epilogue",
                     mixer_epilogue_kernel<T, decltype(vtag)::value, decltype(ktag)::value>,
                     cg.grid(), dim3(kConvThreadsX, kConvThreadsY), 0, stream,
                     static_cast<const T*>(p.h), static_cast<const T*>(p.gate_logits),
                     static_cast<const T*>(p.global_ctx), p.conv_weight, p.conv_bias,
                     static_cast<T*>(p.out), p.seqlen, p.dim, cg.per_seq, cg.span, p.kwidth);
        });
  });
}

void launch_gam_mixer_prologue(const MixerPrologueParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = aligned16(p.grad_out) && aligned16(p.h) && aligned16(p.gate_logits) &&
                         aligned16(p.global_ctx) && aligned16(p.dglobal) && aligned16(p.dlocal) &&
                         aligned16(p.dgate_logits) && p.dz_ld % kVec16<T> == 0;
    launch_on_conv_tiling<T>(
        p.rows, p.seqlen, p.dim, p.kwidth, aligned, [&](auto vtag, auto ktag, const ConvGrid& cg) {
          gam_launch("gam_mixer_prologue",
                     mixer_prologue_kernel<T, decltype(vtag)::value, decltype(ktag)::value>,
                     cg.grid(), dim3(kConvThreadsX, kConvThreadsY), 0, stream,
                     static_cast<const T*>(p.grad_out), static_cast<const T*>(p.h),
                     static_cast<const T*>(p.gate_logits), static_cast<const T*>(p.global_ctx),
                     p.conv_weight, p.conv_bias, static_cast<T*>(p.dglobal),
                     static_cast<T*>(p.dlocal), static_cast<T*>(p.dgate_logits), p.dz_ld, p.seqlen,
                     p.dim, cg.per_seq, cg.span, p.kwidth);
        });
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
