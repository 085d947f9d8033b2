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

}  // namespace cuda
}  // namespace gam
