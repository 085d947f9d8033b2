// Pieces shared by the memory retrieval forward and backward kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace gam {
namespace cuda {

// ---- tensor-core (WMMA) paths ---------------------------------------------------------------

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

// ---- fp32 SIMT paths --------------------------------------------------------------------------

// fp32 SIMT tiling (any dtype; the fallback and the fp32 path): 16 rows x 32 slots per step,
// scores accumulated over D in chunks of 32, outputs in 256-column slices (grid.y).
constexpr int kSimtRows = 16;
constexpr int kSimtSlots = 32;
constexpr int kSimtChunk = 32;
constexpr int kSimtCols = 256;
constexpr int kSimtThreads = 256;

// Scores of one (16 rows x 32 slots) tile for thread t: row t / 16, slots t % 16 and t % 16 + 16.
// Computes dot(a_row, M_slot) and, when B is given, dot(b_row, M_slot) too (the backward's dp).
// Every thread of the block must call it. hs/bs: kSimtRows * kSimtChunk floats,
// ms: kSimtSlots * (kSimtChunk + 1) floats.
template <typename T, bool kTwo>
__device__ __forceinline__ void simt_scores(const T* __restrict__ a, const T* __restrict__ b,
                                            const T* __restrict__ mem, int64_t rows,
                                            int64_t slots, int64_t dim, int64_t row0,
                                            int64_t s0, float* hs, float* bs, float* ms,
                                            float (&sa)[2], float (&sb)[2]) {
  const int tid = threadIdx.x;
  const int r = tid / 16, sl = tid % 16;
  sa[0] = sa[1] = sb[0] = sb[1] = 0.f;
  for (int64_t k0 = 0; k0 < dim; k0 += kSimtChunk) {
    for (int idx = tid; idx < kSimtRows * kSimtChunk; idx += kSimtThreads) {
      const int rr = idx / kSimtChunk, kk = idx % kSimtChunk;
      const bool ok = row0 + rr < rows && k0 + kk < dim;
      const int64_t off = (row0 + rr) * dim + k0 + kk;
      hs[idx] = ok ? to_f32(a[off]) : 0.f;
      if (kTwo) bs[idx] = ok ? to_f32(b[off]) : 0.f;
    }
    for (int idx = tid; idx < kSimtSlots * kSimtChunk; idx += kSimtThreads) {
      const int ss = idx / kSimtChunk, kk = idx % kSimtChunk;
      const bool ok = s0 + ss < slots && k0 + kk < dim;
      ms[ss * (kSimtChunk + 1) + kk] = ok ? to_f32(mem[(s0 + ss) * dim + k0 + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kSimtChunk; ++kk) {
      const float m0 = ms[sl * (kSimtChunk + 1) + kk];
      const float m1 = ms[(sl + 16) * (kSimtChunk + 1) + kk];
      const float hv = hs[r * kSimtChunk + kk];
      sa[0] = fmaf(hv, m0, sa[0]);
      sa[1] = fmaf(hv, m1, sa[1]);
      if (kTwo) {
        const float bv = bs[r * kSimtChunk + kk];
        sb[0] = fmaf(bv, m0, sb[0]);
        sb[1] = fmaf(bv, m1, sb[1]);
      }
    }
    __syncthreads();
  }
}

// Reductions over the 16 lanes that share a row (xor offsets < 16 stay in the half-warp).
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads a (kSimtSlots x kSimtCols) slice of rows of src (starting at row s0, column d0) as fp32,
// zero outside the tensor.
template <typename T>
__device__ __forceinline__ void simt_load_cols(const T* __restrict__ src, int64_t nrows,
                                               int64_t dim, int64_t r0, int64_t d0, int nr,
                                               float* dst) {
  for (int idx = threadIdx.x; idx < nr * kSimtCols; idx += kSimtThreads) {
    const int rr = idx / kSimtCols, cc = idx % kSimtCols;
    const bool ok = r0 + rr < nrows && d0 + cc < dim;
    dst[idx] = ok ? to_f32(src[(r0 + rr) * dim + d0 + cc]) : 0.f;
  }
}

}  // namespace cuda
}  // namespace gam
