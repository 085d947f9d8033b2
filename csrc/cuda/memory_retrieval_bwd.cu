// Memory retrieval backward (DESIGN.md):
//   delta = rowsum(dg * g);  p = exp(scale * h M^T - lse);  ds = p * (dg M^T - delta)
//   dh = scale * ds M;  dM = scale * ds^T h + p^T dg   (summed over all rows)
// Kernels: (1) delta per row; (2) dh per row tile, streaming slot tiles (p recomputed from lse);
// (3) dM per (slot tile, column slice, row range): each block walks its row range and writes an
// fp32 partial; (4) the partials summed in a fixed order (deterministic, no float atomics).
// fp32 SIMT math for every dtype.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"

namespace gam {
namespace cuda {
namespace {

constexpr int kDeltaWarps = 8;
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;
constexpr int kDmColsPerThread = kSimtCols / 8;  // thread: one slot, 32 columns

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
    retrieval_delta_kernel(const T* __restrict__ dg, const T* __restrict__ g,
                           float* __restrict__ delta, int64_t rows, int64_t dim) {
  const int64_t row = int64_t(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  float s = 0.f;
  for (int64_t c = lane; c < dim; c += 32) s = fmaf(to_f32(dg[row * dim + c]), to_f32(g[row * dim + c]), s);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) delta[row] = s;
}

// p and ds of thread (row tid / 16, slots tid % 16 + 16 i) from the scores sa = h.M, sb = dg.M.
__device__ __forceinline__ void probs(const float (&sa)[2], const float (&sb)[2], bool row_ok,
                                      float lse_r, float delta_r, int64_t s0, int64_t slots,
                                      float scale, float (&p)[2], float (&ds)[2]) {
  const int sl = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool ok = row_ok && s0 + sl + 16 * i < slots;
    p[i] = ok ? __expf(scale * sa[i] - lse_r) : 0.f;
    ds[i] = p[i] * (sb[i] - delta_r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    retrieval_bwd_dh_kernel(const T* __restrict__ dg, const T* __restrict__ h,
                            const T* __restrict__ mem, const float* __restrict__ lse,
                            const float* __restrict__ delta, T* __restrict__ dh, int64_t rows,
                            int64_t slots, int64_t dim, float scale) {
  GAM_SHARED(float, hs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, gs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots * (kSimtChunk + 1));
  GAM_SHARED(float, dss, kSimtRows * kSimtSlots);
  GAM_SHARED(float, mv, kSimtSlots * kSimtCols);
  const int tid = threadIdx.x, r = tid / 16, sl = tid % 16;
  const int64_t row0 = int64_t(blockIdx.x) * kSimtRows, row = row0 + r;
  const int64_t d0 = int64_t(blockIdx.y) * kSimtCols;
  const bool row_ok = row < rows;
  const float lse_r = row_ok ? lse[row] : 0.f;
  const float delta_r = row_ok ? delta[row] : 0.f;
  float acc[kSimtCols / 16];
#pragma unroll
  for (int i = 0; i < kSimtCols / 16; ++i) acc[i] = 0.f;
  for (int64_t s0 = 0; s0 < slots; s0 += kSimtSlots) {
    float sa[2], sb[2], p[2], ds[2];
    simt_scores<T, true>(h, dg, mem, rows, slots, dim, row0, s0, hs, gs, ms, sa, sb);
    probs(sa, sb, row_ok, lse_r, delta_r, s0, slots, scale, p, ds);
    dss[r * kSimtSlots + sl] = ds[0];
    dss[r * kSimtSlots + sl + 16] = ds[1];
    simt_load_cols(mem, slots, dim, s0, d0, kSimtSlots, mv);
    __syncthreads();
    for (int ss = 0; ss < kSimtSlots; ++ss) {
      const float d = dss[r * kSimtSlots + ss];
#pragma unroll
      for (int i = 0; i < kSimtCols / 16; ++i) acc[i] = fmaf(d, mv[ss * kSimtCols + sl + 16 * i], acc[i]);
    }
    __syncthreads();
  }
  if (row_ok) {
#pragma unroll
    for (int i = 0; i < kSimtCols / 16; ++i) {
      const int64_t c = d0 + sl + 16 * i;
      if (c < dim) dh[row * dim + c] = from_f32<T>(scale * acc[i]);
    }
  }
}

// Block (slot tile, column slice, row range): partial dM of 32 slots x 256 columns.
template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    retrieval_bwd_dm_kernel(const T* __restrict__ dg, const T* __restrict__ h,
                            const T* __restrict__ mem, const float* __restrict__ lse,
                            const float* __restrict__ delta, float* __restrict__ partials,
                            int64_t rows, int64_t slots, int64_t dim, float scale,
                            int64_t rows_per_split) {
  GAM_SHARED(float, hs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, gs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots * (kSimtChunk + 1));
  GAM_SHARED(float, dss, kSimtRows * kSimtSlots);
  GAM_SHARED(float, pss, kSimtRows * kSimtSlots);
  GAM_SHARED(float, hv, kSimtRows * kSimtCols);
  GAM_SHARED(float, gv, kSimtRows * kSimtCols);
  const int tid = threadIdx.x, r = tid / 16, sl = tid % 16;
  const int64_t s0 = int64_t(blockIdx.x) * kSimtSlots;
  const int64_t d0 = int64_t(blockIdx.y) * kSimtCols;
  const int64_t rbeg = int64_t(blockIdx.z) * rows_per_split;
  const int64_t rend = rbeg + rows_per_split < rows ? rbeg + rows_per_split : rows;
  const int js = tid / 8, jc = tid % 8;  // accumulator slot and first column
  float acc[kDmColsPerThread];
#pragma unroll
  for (int i = 0; i < kDmColsPerThread; ++i) acc[i] = 0.f;
  for (int64_t row0 = rbeg; row0 < rend; row0 += kSimtRows) {
    const int64_t row = row0 + r;
    const bool row_ok = row < rend;
    const float lse_r = row_ok ? lse[row] : 0.f;
    const float delta_r = row_ok ? delta[row] : 0.f;
    float sa[2], sb[2], p[2], ds[2];
    simt_scores<T, true>(h, dg, mem, rend, slots, dim, row0, s0, hs, gs, ms, sa, sb);
    probs(sa, sb, row_ok, lse_r, delta_r, s0, slots, scale, p, ds);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      dss[r * kSimtSlots + sl + 16 * i] = scale * ds[i];
      pss[r * kSimtSlots + sl + 16 * i] = p[i];
    }
    simt_load_cols(h, rend, dim, row0, d0, kSimtRows, hv);
    simt_load_cols(dg, rend, dim, row0, d0, kSimtRows, gv);
    __syncthreads();
    for (int rr = 0; rr < kSimtRows; ++rr) {
      const float a = dss[rr * kSimtSlots + js], b = pss[rr * kSimtSlots + js];
#pragma unroll
      for (int i = 0; i < kDmColsPerThread; ++i) {
        const int c = jc + 8 * i;
        acc[i] = fmaf(a, hv[rr * kSimtCols + c], fmaf(b, gv[rr * kSimtCols + c], acc[i]));
      }
    }
    __syncthreads();
  }
  const int64_t slot = s0 + js;
  if (slot < slots) {
    float* out = partials + (int64_t(blockIdx.z) * slots + slot) * dim;
#pragma unroll
    for (int i = 0; i < kDmColsPerThread; ++i) {
      const int64_t c = d0 + jc + 8 * i;
      if (c < dim) out[c] = acc[i];
    }
  }
}

// out[q] = sum_p partials[p * cols + q], p in a fixed order.
__global__ void __launch_bounds__(kReduceCols * kReduceRows)
    reduce_partials_kernel(const float* __restrict__ partials, int64_t nparts, int64_t cols,
                           float* __restrict__ out) {
  GAM_SHARED(float, red, kReduceCols * kReduceRows);
  const int64_t col = int64_t(blockIdx.x) * kReduceCols + threadIdx.x;
  float s = 0.f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < nparts; p += kReduceRows) s += partials[p * cols + col];
  }
  red[threadIdx.y * kReduceCols + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
    for (int r = 0; r < kReduceRows; ++r) total += red[r * kReduceCols + threadIdx.x];
    out[col] = total;
  }
}

int64_t rows_per_split(int64_t rows, int splits) {
  return ceil_div(ceil_div(rows, splits), kSimtRows) * kSimtRows;
}

}  // namespace

int memory_retrieval_bwd_row_splits(int64_t rows, int64_t slots, int64_t dim) {
  (void)slots;
  (void)dim;
  // Enough blocks to fill the GPU without a large partial workspace (splits x S x D floats).
  return static_cast<int>(std::clamp<int64_t>(ceil_div(rows, 128), 1, 16));
}

int64_t memory_retrieval_bwd_workspace_floats(int64_t rows, int64_t slots, int64_t dim,
                                              int row_splits) {
  (void)rows;
  return int64_t(row_splits) * slots * dim;
}

void memory_retrieval_bwd(const RetrievalBwdParams& p, cudaStream_t stream) {
  if (p.dim == 0) return;
  if (p.rows == 0) {
    GAM_CUDA_CHECK(cudaMemsetAsync(p.dmemory, 0, sizeof(float) * p.slots * p.dim, stream));
    return;
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* dg = static_cast<const T*>(p.grad_out);
    const auto* h = static_cast<const T*>(p.h);
    const auto* mem = static_cast<const T*>(p.memory);
    gam_launch("retrieval_bwd_delta", retrieval_delta_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.rows, kDeltaWarps))), dim3(kDeltaWarps * 32),
               0, stream, dg, static_cast<const T*>(p.out), p.delta, p.rows, p.dim);
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(p.dim, kSimtCols));
    gam_launch("retrieval_bwd_dh", retrieval_bwd_dh_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.rows, kSimtRows)), col_blocks),
               dim3(kSimtThreads), 0, stream, dg, h, mem, p.lse, p.delta,
               static_cast<T*>(p.dh), p.rows, p.slots, p.dim, p.scale);
    gam_launch("retrieval_bwd_dm", retrieval_bwd_dm_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.slots, kSimtSlots)), col_blocks,
                    static_cast<unsigned>(p.row_splits)),
               dim3(kSimtThreads), 0, stream, dg, h, mem, p.lse, p.delta, p.partials, p.rows,
               p.slots, p.dim, p.scale, rows_per_split(p.rows, p.row_splits));
  });
  const int64_t cols = p.slots * p.dim;
  gam_launch("retrieval_bwd_reduce", reduce_partials_kernel,
             dim3(static_cast<unsigned>(ceil_div(cols, kReduceCols))),
             dim3(kReduceCols, kReduceRows), 0, stream, p.partials, int64_t(p.row_splits), cols,
             p.dmemory);
}

}  // namespace cuda
}  // namespace gam
