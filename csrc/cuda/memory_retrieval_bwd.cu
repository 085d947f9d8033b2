// Memory retrieval backward (docs/design.md, "Memory retrieval"):
//   delta = rowsum(grad_out * out);  p = exp(scale * h M^T - lse);
//   ds = p * (grad_out M^T - delta);  dh = scale * ds M;  dM = scale * ds^T h + p^T grad_out
//   (dM summed over all rows)
// Kernels: (1) delta per row; (2) dh per row tile, streaming slot tiles (p recomputed from lse);
// (3) dM per (slot tile, column slice, row range): each block walks its row range and writes an
// fp32 partial; (4) the partials summed in a fixed order (deterministic, no float atomics).
// Tensor-core path (fp16/bf16, WMMA, fp32 accumulation) for (2) and (3): tiles of 32 rows x 32
// slots; warps 0-3 compute the four 16x16 quadrants of h M^T and warps 4-7 those of
// grad_out M^T; scalar code turns them into P and scale * dS, stored as T (as flash-attention
// does) for the GEMMs dh += (scale dS) M and dM += (scale dS)^T h + P^T grad_out. fp32 SIMT path
// otherwise.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"

namespace gam {
namespace cuda {
namespace {

// ---- WMMA helpers (until the backward moves to mma.sync) ----
// WMMA on bf16 needs sm_80; the host pass and the emulation always have it.
#if defined(GAM_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GAM_HAS_BF16_WMMA 1
#else
#define GAM_HAS_BF16_WMMA 0
#endif

// Whether this compilation pass gets the body of a WMMA kernel on T: bf16 WMMA needs sm_80 (fp16
// needs sm_70, below every architecture the toolkit targets). Where it is missing the kernel
// body is a trap: the host never selects the tensor-core path there (DeviceCtx::tensor_cores).
template <typename T>
constexpr bool kWmmaCompiled = !std::is_same<T, __nv_bfloat16>::value || GAM_HAS_BF16_WMMA;

// Shared-memory rows of width dim: padded to whole 16-column WMMA tiles, and a row stride 8
// elements longer than that, which skews the shared-memory banks.
__host__ __device__ inline int64_t wmma_pad_dim(int64_t dim) { return (dim + 15) / 16 * 16; }
__host__ __device__ inline int64_t wmma_ld(int64_t dim) { return wmma_pad_dim(dim) + 8; }

// WMMA pointers need 32-byte alignment and dynamic shared memory only promises 16: the kernels
// align its base to kSmemBaseAlign bytes and ask for that much more. A macro, not a function:
// through an inline function nvcc allocates a few more registers to some backward kernels.
constexpr int kSmemBaseAlign = 128;
#define GAM_ALIGN_SMEM_BASE(raw)                                                    \
  ((raw) + ((kSmemBaseAlign - reinterpret_cast<uintptr_t>(raw) % kSmemBaseAlign) % \
            kSmemBaseAlign))


constexpr int kDeltaWarps = 8;
constexpr int kDmColsPerThread = kSimtCols / 8;  // thread: one slot, 32 columns

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
    retrieval_bwd_delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                               float* __restrict__ delta, int64_t rows, int64_t dim) {
  const int64_t row = int64_t(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  float s = 0.f;
  for (int64_t c = lane; c < dim; c += 32) {
    s = fmaf(to_f32(grad_out[row * dim + c]), to_f32(out[row * dim + c]), s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) delta[row] = s;
}

// p and ds of thread (row tid / 16, slots tid % 16 + 16 i) from the scores sa = h.M,
// sb = grad_out.M.
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
    retrieval_bwd_dh_simt_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                            const T* __restrict__ mem, const float* __restrict__ lse,
                            const float* __restrict__ delta, T* __restrict__ dh, int64_t rows,
                            int64_t slots, int64_t dim, float scale) {
  GAM_SHARED(float, hs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, grad_out_s, kSimtRows * kSimtChunk);
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
    simt_scores<T, true>(h, grad_out, mem, rows, slots, dim, row0, s0, hs, grad_out_s, ms, sa, sb);
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
    retrieval_bwd_dm_simt_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                            const T* __restrict__ mem, const float* __restrict__ lse,
                            const float* __restrict__ delta, float* __restrict__ partials,
                            int64_t rows, int64_t slots, int64_t dim, float scale,
                            int64_t rows_per_split) {
  GAM_SHARED(float, hs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, grad_out_s, kSimtRows * kSimtChunk);
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
    simt_scores<T, true>(h, grad_out, mem, rend, slots, dim, row0, s0, hs, grad_out_s, ms, sa, sb);
    probs(sa, sb, row_ok, lse_r, delta_r, s0, slots, scale, p, ds);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      dss[r * kSimtSlots + sl + 16 * i] = scale * ds[i];
      pss[r * kSimtSlots + sl + 16 * i] = p[i];
    }
    simt_load_cols(h, rend, dim, row0, d0, kSimtRows, hv);
    simt_load_cols(grad_out, rend, dim, row0, d0, kSimtRows, gv);
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

// ---- tensor-core path ---------------------------------------------------------------------------

using namespace nvcuda;

constexpr int kBwdTcRows = 32;
constexpr int kBwdTcSlots = 32;
constexpr int kBwdTcThreads = 256;
constexpr int kBwdTcPad = kBwdTcSlots + 8;  // row stride of the P / dS tiles

// Shared memory: three 32-row tiles of width D (h rows, grad_out rows, M slots), the two fp32 score
// tiles (also the per-warp epilogue scratch), P and dS as T, and lse / delta of the rows.
struct RetrievalBwdTcSmem {
  int64_t a, b, c, sc, ps, ds, stats, total;
  __host__ __device__ explicit RetrievalBwdTcSmem(int64_t dim, int elem_bytes) {
    const int64_t tile = kBwdTcRows * wmma_ld(dim) * elem_bytes;
    a = 0;
    b = a + tile;
    c = b + tile;
    sc = c + tile;
    ps = sc + 2 * kBwdTcRows * kBwdTcSlots * 4;
    ds = ps + kBwdTcRows * kBwdTcPad * elem_bytes;
    stats = ds + kBwdTcRows * kBwdTcPad * elem_bytes;
    total = stats + 2 * kBwdTcRows * 4 + kSmemBaseAlign;  // + room to align the base
  }
};

template <typename T>
struct RetrievalBwdTcTiles {
  T *hs, *grad_out_s, *ms, *ps, *ds;
  float *sc, *lse, *delta;
  __device__ RetrievalBwdTcTiles(unsigned char* raw, int64_t dim) {
    unsigned char* base = GAM_ALIGN_SMEM_BASE(raw);
    const RetrievalBwdTcSmem lay(dim, sizeof(T));
    hs = reinterpret_cast<T*>(base + lay.a);
    grad_out_s = reinterpret_cast<T*>(base + lay.b);
    ms = reinterpret_cast<T*>(base + lay.c);
    sc = reinterpret_cast<float*>(base + lay.sc);
    ps = reinterpret_cast<T*>(base + lay.ps);
    ds = reinterpret_cast<T*>(base + lay.ds);
    lse = reinterpret_cast<float*>(base + lay.stats);
    delta = lse + kBwdTcRows;
  }
};

// 32 rows of src from row r0 (rows >= limit and columns >= dim as zeros) into dst (stride ld).
template <typename T>
__device__ __forceinline__ void bwd_tc_load_rows(const T* __restrict__ src, int64_t r0,
                                                 int64_t limit, int64_t dim, T* dst, bool vec) {
  load_rows_to_smem(dst, wmma_ld(dim), src, r0, kBwdTcRows, limit, dim, wmma_pad_dim(dim), vec);
}

// sc[0:1024] = h M^T and sc[1024:2048] = grad_out M^T of the current tiles (row-major 32 x 32).
template <typename T>
__device__ __forceinline__ void bwd_tc_scores(const RetrievalBwdTcTiles<T>& s, int64_t dim) {
  const int64_t dpad = wmma_pad_dim(dim), ld = wmma_ld(dim);
  const int warp = threadIdx.x / 32, q = warp & 3, qr = q >> 1, qc = q & 1;
  const T* src = warp < 4 ? s.hs : s.grad_out_s;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
  for (int64_t k = 0; k < dpad; k += 16) {
    wmma::load_matrix_sync(a, src + (16 * qr) * ld + k, ld);
    wmma::load_matrix_sync(b, s.ms + (16 * qc) * ld + k, ld);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(
      s.sc + (warp < 4 ? 0 : kBwdTcRows * kBwdTcSlots) + (16 * qr) * kBwdTcSlots + 16 * qc, acc,
      kBwdTcSlots, wmma::mem_row_major);
}

// P and scale * dS of the tile as T; rows >= rlim and slots >= slots give 0.
template <typename T>
__device__ __forceinline__ void bwd_tc_probs(const RetrievalBwdTcTiles<T>& s, int64_t r0,
                                             int64_t rlim, int64_t s0, int64_t slots,
                                             float scale) {
  for (int e = threadIdx.x; e < kBwdTcRows * kBwdTcSlots; e += kBwdTcThreads) {
    const int r = e / kBwdTcSlots, c = e % kBwdTcSlots;
    const bool ok = r0 + r < rlim && s0 + c < slots;
    const float p = ok ? __expf(scale * s.sc[e] - s.lse[r]) : 0.f;
    const float ds = p * (s.sc[kBwdTcRows * kBwdTcSlots + e] - s.delta[r]);
    s.ps[r * kBwdTcPad + c] = from_f32<T>(p);
    s.ds[r * kBwdTcPad + c] = from_f32<T>(scale * ds);
  }
}

__device__ __forceinline__ void bwd_tc_load_stats(const float* __restrict__ lse,
                                                  const float* __restrict__ delta, int64_t r0,
                                                  int64_t rlim, float* lse_s, float* delta_s) {
  if (threadIdx.x < kBwdTcRows) {
    const int64_t row = r0 + threadIdx.x;
    lse_s[threadIdx.x] = row < rlim ? lse[row] : 0.f;
    delta_s[threadIdx.x] = row < rlim ? delta[row] : 0.f;
  }
}

// dh for 32 rows x (4 * NF * 16) columns; warps: 2 row groups x 4 column groups.
template <typename T, int NF>
__global__ void __launch_bounds__(kBwdTcThreads)
    retrieval_bwd_dh_tc_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                               const T* __restrict__ mem, const float* __restrict__ lse,
                               const float* __restrict__ delta, T* __restrict__ dh, int64_t rows,
                               int64_t slots, int64_t dim, float scale, bool vec) {
  if constexpr (!kWmmaCompiled<T>) {
    __trap();
  } else {
    GAM_DYNAMIC_SHARED(unsigned char, smem_raw);
    const RetrievalBwdTcTiles<T> s(smem_raw, dim);
    const int64_t dpad = wmma_pad_dim(dim), ld = wmma_ld(dim);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wr = warp >> 2, wc = warp & 3;
    const int64_t row0 = int64_t(blockIdx.x) * kBwdTcRows;
    const int64_t d0 = int64_t(blockIdx.y) * (4 * NF * 16);
    bwd_tc_load_rows(h, row0, rows, dim, s.hs, vec);
    bwd_tc_load_rows(grad_out, row0, rows, dim, s.grad_out_s, vec);
    bwd_tc_load_stats(lse, delta, row0, rows, s.lse, s.delta);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t s0 = 0; s0 < slots; s0 += kBwdTcSlots) {
      bwd_tc_load_rows(mem, s0, slots, dim, s.ms, vec);
      __syncthreads();
      bwd_tc_scores(s, dim);
      __syncthreads();
      bwd_tc_probs(s, row0, rows, s0, slots, scale);
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
#pragma unroll
      for (int ks = 0; ks < kBwdTcSlots / 16; ++ks) {
        wmma::load_matrix_sync(a, s.ds + (16 * wr) * kBwdTcPad + 16 * ks, kBwdTcPad);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          const int64_t c = d0 + (wc * NF + f) * 16;
          if (c < dpad) {
            wmma::load_matrix_sync(b, s.ms + (16 * ks) * ld + c, ld);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      }
      __syncthreads();
    }
    float* scratch = s.sc + warp * 256;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int64_t c = d0 + (wc * NF + f) * 16;
      if (c < dpad) {
        wmma::store_matrix_sync(scratch, acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t row = row0 + 16 * wr + e / 16, col = c + e % 16;
          if (row < rows && col < dim) dh[row * dim + col] = from_f32<T>(scratch[e]);
        }
        __syncwarp();
      }
    }
  }
}

// Partial dM of 32 slots x (4 * NF * 16) columns over one row range; warps: 2 slot groups x 4
// column groups.
template <typename T, int NF>
__global__ void __launch_bounds__(kBwdTcThreads)
    retrieval_bwd_dm_tc_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                               const T* __restrict__ mem, const float* __restrict__ lse,
                               const float* __restrict__ delta, float* __restrict__ partials,
                               int64_t rows, int64_t slots, int64_t dim, float scale,
                               int64_t rows_per_split, bool vec) {
  if constexpr (!kWmmaCompiled<T>) {
    __trap();
  } else {
    GAM_DYNAMIC_SHARED(unsigned char, smem_raw);
    const RetrievalBwdTcTiles<T> s(smem_raw, dim);
    const int64_t dpad = wmma_pad_dim(dim), ld = wmma_ld(dim);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, ws = warp >> 2, wc = warp & 3;
    const int64_t s0 = int64_t(blockIdx.x) * kBwdTcSlots;
    const int64_t d0 = int64_t(blockIdx.y) * (4 * NF * 16);
    const int64_t rbeg = int64_t(blockIdx.z) * rows_per_split;
    const int64_t rend = rbeg + rows_per_split < rows ? rbeg + rows_per_split : rows;
    bwd_tc_load_rows(mem, s0, slots, dim, s.ms, vec);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t r0 = rbeg; r0 < rend; r0 += kBwdTcRows) {
      bwd_tc_load_rows(h, r0, rend, dim, s.hs, vec);
      bwd_tc_load_rows(grad_out, r0, rend, dim, s.grad_out_s, vec);
      bwd_tc_load_stats(lse, delta, r0, rend, s.lse, s.delta);
      __syncthreads();
      bwd_tc_scores(s, dim);
      __syncthreads();
      bwd_tc_probs(s, r0, rend, s0, slots, scale);
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // dS^T, P^T
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
#pragma unroll
      for (int ks = 0; ks < kBwdTcRows / 16; ++ks) {
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          const int64_t c = d0 + (wc * NF + f) * 16;
          if (c < dpad) {
            wmma::load_matrix_sync(a, s.ds + (16 * ks) * kBwdTcPad + 16 * ws, kBwdTcPad);
            wmma::load_matrix_sync(b, s.hs + (16 * ks) * ld + c, ld);
            wmma::mma_sync(acc[f], a, b, acc[f]);
            wmma::load_matrix_sync(a, s.ps + (16 * ks) * kBwdTcPad + 16 * ws, kBwdTcPad);
            wmma::load_matrix_sync(b, s.grad_out_s + (16 * ks) * ld + c, ld);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      }
      __syncthreads();
    }
    float* scratch = s.sc + warp * 256;
    float* out = partials + int64_t(blockIdx.z) * slots * dim;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int64_t c = d0 + (wc * NF + f) * 16;
      if (c < dpad) {
        wmma::store_matrix_sync(scratch, acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t slot = s0 + 16 * ws + e / 16, col = c + e % 16;
          if (slot < slots && col < dim) out[slot * dim + col] = scratch[e];
        }
        __syncwarp();
      }
    }
  }
}

template <typename T, int NF>
void launch_retrieval_bwd_tc(const RetrievalBwdParams& p, int64_t smem, int64_t rps,
                             cudaStream_t stream) {
  auto dh_kernel = retrieval_bwd_dh_tc_kernel<T, NF>;
  auto dm_kernel = retrieval_bwd_dm_tc_kernel<T, NF>;
  GAM_CUDA_CHECK(cudaFuncSetAttribute(dh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  GAM_CUDA_CHECK(cudaFuncSetAttribute(dm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const auto* grad_out = static_cast<const T*>(p.grad_out);
  const auto* h = static_cast<const T*>(p.h);
  const auto* mem = static_cast<const T*>(p.memory);
  const unsigned col_blocks = static_cast<unsigned>(ceil_div(p.dim, 4 * NF * 16));
  const bool vec = p.dim % kVec16<T> == 0 && aligned16(p.grad_out) && aligned16(p.h) &&
                   aligned16(p.memory);
  gam_launch("retrieval_bwd_dh_tc", dh_kernel,
             dim3(static_cast<unsigned>(ceil_div(p.rows, kBwdTcRows)), col_blocks),
             dim3(kBwdTcThreads), static_cast<size_t>(smem), stream, grad_out, h, mem, p.lse,
             p.delta, static_cast<T*>(p.dh), p.rows, p.slots, p.dim, p.scale, vec);
  gam_launch("retrieval_bwd_dm_tc", dm_kernel,
             dim3(static_cast<unsigned>(ceil_div(p.slots, kBwdTcSlots)), col_blocks,
                  static_cast<unsigned>(p.row_splits)),
             dim3(kBwdTcThreads), static_cast<size_t>(smem), stream, grad_out, h, mem, p.lse,
             p.delta, p.partials, p.rows, p.slots, p.dim, p.scale, rps, vec);
}

// Multiple of both row tiles (16 SIMT, 32 tensor cores).
int64_t rows_per_split(int64_t rows, int splits) {
  return ceil_div(ceil_div(rows, splits), kBwdTcRows) * kBwdTcRows;
}

}  // namespace

int64_t memory_retrieval_bwd_tc_smem_bytes(int64_t dim) { return RetrievalBwdTcSmem(dim, 2).total; }

int memory_retrieval_bwd_row_splits(int64_t rows) {
  // Enough blocks to fill the GPU without a large partial workspace (splits x S x D floats).
  return static_cast<int>(std::clamp<int64_t>(ceil_div(rows, 128), 1, 16));
}

int64_t memory_retrieval_bwd_workspace_floats(int64_t slots, int64_t dim, int row_splits) {
  return int64_t(row_splits) * slots * dim;
}

std::vector<KernelLaunch> memory_retrieval_bwd_kernels(const RetrievalBwdParams& p) {
  if (p.dim == 0 || p.rows == 0) return {};
  const std::string t = type_name(p.dtype);
  std::vector<KernelLaunch> out{{"retrieval_bwd_delta_kernel<" + t + ">", kDeltaWarps * 32, 0}};
  const bool arch_ok = p.dtype != DType::kBFloat16 || p.sm >= 80;
  const int64_t smem = memory_retrieval_bwd_tc_smem_bytes(p.dim);
  if (p.dtype != DType::kFloat32 && p.tensor_cores && arch_ok && smem <= p.max_smem_bytes) {
    const int64_t dpad = wmma_pad_dim(p.dim);
    const int nf = dpad <= 64 ? 1 : dpad <= 128 ? 2 : dpad <= 256 ? 4 : 8;
    out.push_back({"retrieval_bwd_dh_tc_kernel<" + t + ", " + std::to_string(nf) + ">",
                   kBwdTcThreads, smem});
    out.push_back({"retrieval_bwd_dm_tc_kernel<" + t + ", " + std::to_string(nf) + ">",
                   kBwdTcThreads, smem});
  } else {
    out.push_back({"retrieval_bwd_dh_simt_kernel<" + t + ">", kSimtThreads, 0});
    out.push_back({"retrieval_bwd_dm_simt_kernel<" + t + ">", kSimtThreads, 0});
  }
  out.push_back({"reduce_partials_kernel", kReduceCols * kReduceRows, 0});
  return out;
}

std::string describe_memory_retrieval_bwd(const RetrievalBwdParams& p) {
  const bool arch_ok = p.dtype != DType::kBFloat16 || p.sm >= 80;
  if (p.dtype != DType::kFloat32 && p.tensor_cores && arch_ok &&
      memory_retrieval_bwd_tc_smem_bytes(p.dim) <= p.max_smem_bytes)
    return "wmma: retrieval_bwd_dh_tc_kernel + retrieval_bwd_dm_tc_kernel";
  return "simt: retrieval_bwd_dh_simt_kernel + retrieval_bwd_dm_simt_kernel";
}

void launch_memory_retrieval_bwd(const RetrievalBwdParams& p, cudaStream_t stream) {
  if (p.dim == 0) return;
  if (p.rows == 0) {
    GAM_CUDA_CHECK(cudaMemsetAsync(p.dmemory, 0, sizeof(float) * p.slots * p.dim, stream));
    return;
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* grad_out = static_cast<const T*>(p.grad_out);
    const auto* h = static_cast<const T*>(p.h);
    const auto* mem = static_cast<const T*>(p.memory);
    gam_launch("retrieval_bwd_delta", retrieval_bwd_delta_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.rows, kDeltaWarps))), dim3(kDeltaWarps * 32),
               0, stream, grad_out, static_cast<const T*>(p.out), p.delta, p.rows, p.dim);
    if constexpr (!std::is_same<T, float>::value) {
      const int64_t smem = memory_retrieval_bwd_tc_smem_bytes(p.dim);
      const bool arch_ok = !std::is_same<T, __nv_bfloat16>::value || p.sm >= 80;
      if (p.tensor_cores && arch_ok && smem <= p.max_smem_bytes) {
        const int64_t rps = rows_per_split(p.rows, p.row_splits);
        // Output columns per block (64 * NF): the smallest slice holding D (up to 512), else
        // 512-column slices.
        const int64_t dpad = wmma_pad_dim(p.dim);
        static_switch<1, 2, 4>(
            [&](int nf) { return dpad <= 64 * nf; },
            [&](auto nf) {
              launch_retrieval_bwd_tc<T, decltype(nf)::value>(p, smem, rps, stream);
            },
            [&] { launch_retrieval_bwd_tc<T, 8>(p, smem, rps, stream); });
        return;
      }
    }
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(p.dim, kSimtCols));
    gam_launch("retrieval_bwd_dh_simt", retrieval_bwd_dh_simt_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.rows, kSimtRows)), col_blocks),
               dim3(kSimtThreads), 0, stream, grad_out, h, mem, p.lse, p.delta,
               static_cast<T*>(p.dh), p.rows, p.slots, p.dim, p.scale);
    gam_launch("retrieval_bwd_dm_simt", retrieval_bwd_dm_simt_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.slots, kSimtSlots)), col_blocks,
                    static_cast<unsigned>(p.row_splits)),
               dim3(kSimtThreads), 0, stream, grad_out, h, mem, p.lse, p.delta, p.partials, p.rows,
               p.slots, p.dim, p.scale, rows_per_split(p.rows, p.row_splits));
  });
  launch_reduce_partials("retrieval_bwd_reduce", p.partials, int64_t(p.row_splits),
                         p.slots * p.dim, StoreContiguous{p.dmemory}, stream);
}

}  // namespace cuda
}  // namespace gam
