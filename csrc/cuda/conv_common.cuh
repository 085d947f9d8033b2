// Tiling shared by the causal conv forward and backward kernels.
//
// Token-major (B, N, D): channels are contiguous, so a warp covers 32 consecutive channel groups
// of VEC channels at one time step (coalesced rows) and each thread walks a span of consecutive
// time steps, keeping the K-1 previous inputs in registers (sliding window). Block = 32 channel
// groups x 4 time spans; grid.x = B * time blocks (no 65535 limit), grid.y = channel blocks.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace gam {
namespace cuda {

constexpr int kConvThreadsX = 32;  // channel groups per block
constexpr int kConvThreadsY = 4;   // time spans per block
constexpr int kConvStep = 4;       // time steps loaded at once (loads in flight per thread)

struct ConvGrid {
  int span;         // time steps per thread
  int per_seq;      // time blocks per sequence
  int64_t xblocks;  // batch * per_seq
  int64_t cblocks;  // channel blocks
  dim3 grid() const { return dim3(static_cast<unsigned>(xblocks), static_cast<unsigned>(cblocks)); }
};

// Backward: longer spans on long inputs bound the number of dw partials (workspace traffic).
inline ConvGrid conv_grid(int64_t batch, int64_t seqlen, int64_t dim, int vec, bool backward) {
  ConvGrid g;
  g.span = 32;
  auto tblocks = [&](int span) { return ceil_div(seqlen, int64_t(kConvThreadsY) * span); };
  if (backward) {
    while (batch * tblocks(g.span) > 2048 && g.span < 512) g.span *= 2;
  }
  g.per_seq = static_cast<int>(tblocks(g.span));
  g.xblocks = batch * g.per_seq;
  g.cblocks = ceil_div(ceil_div(dim, vec), kConvThreadsX);
  return g;
}

// Thread coordinates shared by the conv kernels; false when the thread has no work.
struct ConvThread {
  int64_t c, b, t0, t1;
};
__device__ __forceinline__ bool conv_thread(int vec, int64_t seqlen, int64_t dim,
                                            int tblocks_per_seq, int span, ConvThread& th) {
  th.c = (int64_t(blockIdx.y) * kConvThreadsX + threadIdx.x) * vec;
  th.b = blockIdx.x / tblocks_per_seq;
  const int64_t tb = blockIdx.x % tblocks_per_seq;
  th.t0 = (tb * kConvThreadsY + threadIdx.y) * int64_t(span);
  th.t1 = th.t0 + span < seqlen ? th.t0 + span : seqlen;
  return th.c < dim && th.t0 < seqlen;
}

// The K weights and the bias (0 without one) of channels c .. c+VEC-1, for a span's registers.
template <int VEC, int K>
__device__ __forceinline__ void load_conv_taps(const float* __restrict__ w,
                                               const float* __restrict__ bias, int64_t c,
                                               float (&wr)[K][VEC], float (&br)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    br[v] = bias != nullptr ? bias[c + v] : 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) wr[j][v] = w[(c + v) * K + j];
  }
}

// x at times t0 - (K-1) .. t0 - 1 into buf[0 .. K-2] (xb: the sequence's first row, at the
// thread's channels), zeros before the sequence: a span's halo.
template <typename T, int VEC, int K, int N>
__device__ __forceinline__ void load_conv_halo(const T* __restrict__ xb, int64_t dim, int64_t t0,
                                               float (&buf)[N][VEC]) {
  static_assert(N >= K - 1, "the halo takes K - 1 rows of buf");
#pragma unroll
  for (int j = 0; j < K - 1; ++j) {
    const int64_t t = t0 - (K - 1) + j;
    if (t >= 0) {
      load_f32<T, VEC>(xb + t * dim, buf[j]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) buf[j][v] = 0.f;
    }
  }
}

// The causal conv of VEC channels c .. c+VEC-1 over time steps [t0, t1) of one sequence (xb: its
// first row, at channel 0), with the K weights and the K-1 previous inputs in registers and STEP
// inputs loaded at once: calls emit(t, acc), in time order, with acc = bias + sum_j w[c, j] *
// x[t - (K-1) + j] (inputs before the sequence read zeros). The conv forward and the fused mixer's
// prologue use it; the mixer's epilogue sums in the same order in a span loop of its own, which
// loads a row ahead (gam_mixer.cu).
template <typename T, int VEC, int K, int STEP, typename Emit>
__device__ __forceinline__ void conv_span(const T* __restrict__ xb, const float* __restrict__ w,
                                          const float* __restrict__ bias, int64_t c, int64_t dim,
                                          int64_t t0, int64_t t1, Emit&& emit) {
  float wr[K][VEC], br[VEC];
  load_conv_taps<VEC, K>(w, bias, c, wr, br);
  xb += c;
  // buf[i] holds x at time t - (K-1) + i: K-1 halo steps, then STEP new ones.
  float buf[K - 1 + STEP][VEC];
  load_conv_halo<T, VEC, K>(xb, dim, t0, buf);
  for (int64_t t = t0; t < t1; t += STEP) {
#pragma unroll
    for (int i = 0; i < STEP; ++i) {
      if (t + i < t1) load_f32<T, VEC>(xb + (t + i) * dim, buf[K - 1 + i]);
    }
#pragma unroll
    for (int i = 0; i < STEP; ++i) {
      if (t + i < t1) {
        float acc[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          acc[v] = br[v];
#pragma unroll
          for (int j = 0; j < K; ++j) acc[v] = fmaf(wr[j][v], buf[i + j][v], acc[v]);
        }
        emit(t + i, acc);
      }
    }
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) buf[j][v] = buf[STEP + j][v];
    }
  }
}

// conv_span for any K (k at run time): the taps read from memory at every step (the K-1 re-reads
// hit L1), inputs before the sequence skipped.
template <typename T, int VEC, typename Emit>
__device__ __forceinline__ void conv_span_any_k(const T* __restrict__ xb,
                                                const float* __restrict__ w,
                                                const float* __restrict__ bias, int64_t c,
                                                int64_t dim, int64_t t0, int64_t t1, int k,
                                                Emit&& emit) {
  xb += c;
  for (int64_t t = t0; t < t1; ++t) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = bias != nullptr ? bias[c + v] : 0.f;
    const int j0 = t - (k - 1) >= 0 ? 0 : static_cast<int>((k - 1) - t);
    for (int j = j0; j < k; ++j) {
      float xv[VEC];
      load_f32<T, VEC>(xb + (t - (k - 1) + j) * dim, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w[(c + v) * k + j], xv[v], acc[v]);
    }
    emit(t, acc);
  }
}

}  // namespace cuda
}  // namespace gam
