// Memory retrieval forward: g = softmax(scale * h M^T) M over the S slots, lse kept in fp32.
// Flash-attention style: a block owns a tile of rows and streams tiles of memory slots through
// shared memory with an online softmax, so the (rows x S) scores never reach global memory.
//
// Tensor-core path (fp16/bf16, WMMA 16x16x16, fp32 accumulation), 8 warps:
//   * the block's 64 rows of h stay in shared memory (full D); each step loads 32 slots of M;
//   * scores S = h M^T: one 16x16 fragment per warp, stored to shared memory;
//   * softmax in scalar code, 4 threads per row: p = exp(s - m_ref) written as T to shared memory.
//     m_ref only moves when a row's max exceeds it by more than kRescaleSlack, so the output
//     fragments (opaque WMMA registers) rarely need the per-row rescale; that rescale goes through
//     a 16x16 shared scratch per warp. p <= exp(kRescaleSlack) keeps fp16 in range;
//   * O += P M: warps own 16 rows x NF fragments of the block's output column slice.
// fp32 SIMT path (fp32, or when the tensor-core path does not apply): 16 rows x 32 slots, the
// output accumulated in registers per 256-column slice.
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"

namespace gam {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kFwdTcRows = 64;
constexpr int kFwdTcSlots = 32;
constexpr int kFwdTcWarps = 8;
constexpr int kFwdTcThreads = kFwdTcWarps * 32;
constexpr int kFwdTcPadP = kFwdTcSlots + 8;  // row stride of P (keeps WMMA rows 32-byte aligned)
constexpr float kRescaleSlack = 8.f;

// Byte offsets of the shared-memory regions of the tensor-core kernel.
struct RetrievalFwdTcSmem {
  int64_t h, m, s, p, stats, total;
  __host__ __device__ explicit RetrievalFwdTcSmem(int64_t dim, int elem_bytes) {
    const int64_t ld = wmma_ld(dim);
    h = 0;
    m = h + kFwdTcRows * ld * elem_bytes;
    s = m + kFwdTcSlots * ld * elem_bytes;
    p = s + int64_t(kFwdTcRows) * kFwdTcSlots * 4;
    stats = p + int64_t(kFwdTcRows) * kFwdTcPadP * elem_bytes;
    total = stats + 3 * kFwdTcRows * 4 + 16 + kSmemBaseAlign;  // + room to align the base
  }
};

template <typename T, int NF>
__global__ void __launch_bounds__(kFwdTcThreads)
    retrieval_fwd_tc_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                            T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                            int64_t slots, int64_t dim, float scale, bool vec) {
  if constexpr (!kWmmaCompiled<T>) {
    __trap();
  } else {
    GAM_DYNAMIC_SHARED(unsigned char, smem_raw);
    unsigned char* smem = GAM_ALIGN_SMEM_BASE(smem_raw);
    const int64_t dpad = wmma_pad_dim(dim), ld = wmma_ld(dim);
    const RetrievalFwdTcSmem lay(dim, sizeof(T));
    T* hs = reinterpret_cast<T*>(smem + lay.h);
    T* ms = reinterpret_cast<T*>(smem + lay.m);
    float* ss = reinterpret_cast<float*>(smem + lay.s);
    T* ps = reinterpret_cast<T*>(smem + lay.p);
    float* m_ref = reinterpret_cast<float*>(smem + lay.stats);
    float* l_sum = m_ref + kFwdTcRows;
    float* alpha = l_sum + kFwdTcRows;
    int* flag = reinterpret_cast<int*>(alpha + kFwdTcRows);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp >> 1, wn = warp & 1;  // 4 row groups x 2 column halves
    const int64_t row0 = int64_t(blockIdx.x) * kFwdTcRows;
    const int64_t d0 = int64_t(blockIdx.y) * (2 * NF * 16);

    load_rows_to_smem(hs, ld, h, row0, kFwdTcRows, rows, dim, dpad, vec);
    if (tid < kFwdTcRows) {
      m_ref[tid] = -INFINITY;
      l_sum[tid] = 0.f;
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
    float* scratch = ss + warp * 256;  // per-warp 16x16 fp32, reuses the score tile

    for (int64_t s0 = 0; s0 < slots; s0 += kFwdTcSlots) {
      load_rows_to_smem(ms, ld, mem, s0, kFwdTcSlots, slots, dim, dpad, vec);
      if (tid == 0) *flag = 0;
      __syncthreads();

      {  // scores of rows 16*wm.., slots 16*wn..
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sc;
        wmma::fill_fragment(sc, 0.f);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        for (int64_t k = 0; k < dpad; k += 16) {
          wmma::load_matrix_sync(a, hs + (16 * wm) * ld + k, ld);
          wmma::load_matrix_sync(b, ms + (16 * wn) * ld + k, ld);
          wmma::mma_sync(sc, a, b, sc);
        }
        wmma::store_matrix_sync(ss + (16 * wm) * kFwdTcSlots + 16 * wn, sc, kFwdTcSlots,
                                wmma::mem_row_major);
      }
      __syncthreads();

      {  // online softmax: 4 threads per row, 8 slots each
        const int r = tid / 4, q = tid % 4;
        float s[8];
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int col = q * 8 + i;
          s[i] = s0 + col < slots ? scale * ss[r * kFwdTcSlots + col] : -INFINITY;
          mx = fmaxf(mx, s[i]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_old = m_ref[r];
        const bool move = mx > m_old + kRescaleSlack;  // always on the first tile
        const float m_new = move ? mx : m_old;
        const float a = move ? __expf(m_old - m_new) : 1.f;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const T p = from_f32<T>(__expf(s[i] - m_new));
          ps[r * kFwdTcPadP + q * 8 + i] = p;
          sum += to_f32(p);  // the rounded p, as the P M product sees it
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        __syncwarp();  // all lanes of row r have read m_ref[r]; shuffles do not order smem
        if (q == 0) {
          l_sum[r] = l_sum[r] * a + sum;
          m_ref[r] = m_new;
          alpha[r] = a;
          if (move && m_old != -INFINITY) *flag = 1;
        }
      }
      __syncthreads();

      if (*flag) {  // rare: rescale rows of the output fragments by alpha
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          wmma::store_matrix_sync(scratch, acc[f], 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += 32) scratch[e] *= alpha[16 * wm + e / 16];
          __syncwarp();
          wmma::load_matrix_sync(acc[f], scratch, 16, wmma::mem_row_major);
        }
      }

      {  // O += P M over this tile's slots
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
#pragma unroll
        for (int ks = 0; ks < kFwdTcSlots / 16; ++ks) {
          wmma::load_matrix_sync(a, ps + (16 * wm) * kFwdTcPadP + 16 * ks, kFwdTcPadP);
#pragma unroll
          for (int f = 0; f < NF; ++f) {
            const int64_t c = d0 + (wn * NF + f) * 16;
            if (c < dpad) {
              wmma::load_matrix_sync(b, ms + (16 * ks) * ld + c, ld);
              wmma::mma_sync(acc[f], a, b, acc[f]);
            }
          }
        }
      }
      __syncthreads();
    }

    // Epilogue: normalise by l per row, convert, store with bounds.
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int64_t c = d0 + (wn * NF + f) * 16;
      if (c < dpad) {
        wmma::store_matrix_sync(scratch, acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int rr = e / 16, cc = e % 16;
          const int64_t row = row0 + 16 * wm + rr;
          if (row < rows && c + cc < dim) {
            out[row * dim + c + cc] = from_f32<T>(scratch[e] / l_sum[16 * wm + rr]);
          }
        }
        __syncwarp();
      }
    }
    if (blockIdx.y == 0 && tid < kFwdTcRows && row0 + tid < rows) {
      lse[row0 + tid] = m_ref[tid] + logf(l_sum[tid]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    retrieval_fwd_simt_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                              T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                              int64_t slots, int64_t dim, float scale) {
  GAM_SHARED(float, hs, kSimtRows * kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots * (kSimtChunk + 1));
  GAM_SHARED(float, ps, kSimtRows * kSimtSlots);
  GAM_SHARED(float, mv, kSimtSlots * kSimtCols);
  const int tid = threadIdx.x;
  const int r = tid / 16, sl = tid % 16;
  const int64_t row0 = int64_t(blockIdx.x) * kSimtRows;
  const int64_t d0 = int64_t(blockIdx.y) * kSimtCols;
  float o[kSimtCols / 16];
#pragma unroll
  for (int i = 0; i < kSimtCols / 16; ++i) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t s0 = 0; s0 < slots; s0 += kSimtSlots) {
    float sa[2], sb[2];
    simt_scores<T, false>(h, nullptr, mem, rows, slots, dim, row0, s0, hs, nullptr, ms, sa, sb);
    float s[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) s[i] = s0 + sl + 16 * i < slots ? scale * sa[i] : -INFINITY;
    const float m_new = fmaxf(m, half_warp_max(fmaxf(s[0], s[1])));
    const float a = __expf(m - m_new);  // 0 on the first tile
    const float p0 = __expf(s[0] - m_new), p1 = __expf(s[1] - m_new);
    l = l * a + half_warp_sum(p0 + p1);
    m = m_new;
    ps[r * kSimtSlots + sl] = p0;
    ps[r * kSimtSlots + sl + 16] = p1;
    simt_load_cols(mem, slots, dim, s0, d0, kSimtSlots, mv);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSimtCols / 16; ++i) o[i] *= a;
    for (int ss = 0; ss < kSimtSlots; ++ss) {
      const float p = ps[r * kSimtSlots + ss];
#pragma unroll
      for (int i = 0; i < kSimtCols / 16; ++i) o[i] = fmaf(p, mv[ss * kSimtCols + sl + 16 * i], o[i]);
    }
    __syncthreads();
  }
  const int64_t row = row0 + r;
  if (row < rows) {
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < kSimtCols / 16; ++i) {
      const int64_t c = d0 + sl + 16 * i;
      if (c < dim) out[row * dim + c] = from_f32<T>(o[i] * inv);
    }
    if (blockIdx.y == 0 && sl == 0) lse[row] = m + logf(l);
  }
}

template <typename T, int NF>
void launch_retrieval_fwd_tc(const RetrievalFwdParams& p, int64_t smem, cudaStream_t stream) {
  auto kernel = retrieval_fwd_tc_kernel<T, NF>;
  GAM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kFwdTcRows)),
                  static_cast<unsigned>(ceil_div(p.dim, 2 * NF * 16)));
  gam_launch("retrieval_fwd_tc", kernel, grid, dim3(kFwdTcThreads), static_cast<size_t>(smem),
             stream, static_cast<const T*>(p.h), static_cast<const T*>(p.memory),
             static_cast<T*>(p.out), p.lse, p.rows, p.slots, p.dim, p.scale,
             p.dim % kVec16<T> == 0 && aligned16(p.h) && aligned16(p.memory));
}

}  // namespace

int64_t memory_retrieval_fwd_tc_smem_bytes(int64_t dim) {
  return RetrievalFwdTcSmem(dim, 2).total;
}

void launch_memory_retrieval_fwd(const RetrievalFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  if (p.dim == 0) {  // softmax over zero scores: out is empty, lse = log(S)
    std::vector<float> host(static_cast<size_t>(p.rows), std::log(static_cast<float>(p.slots)));
    GAM_CUDA_CHECK(cudaMemcpyAsync(p.lse, host.data(), sizeof(float) * host.size(),
                                   cudaMemcpyHostToDevice, stream));
    GAM_CUDA_CHECK(cudaStreamSynchronize(stream));  // host buffer goes out of scope
    return;
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t smem = memory_retrieval_fwd_tc_smem_bytes(p.dim);
    if constexpr (!std::is_same<T, float>::value) {
      if (p.tensor_cores && smem <= p.max_smem_bytes) {
        // Output columns per block (32 * NF): the smallest slice holding D (up to 512), else
        // 512-column slices (the scores are then recomputed per slice).
        const int64_t dpad = wmma_pad_dim(p.dim);
        static_switch<2, 4, 8>(
            [&](int nf) { return dpad <= 32 * nf; },
            [&](auto nf) { launch_retrieval_fwd_tc<T, decltype(nf)::value>(p, smem, stream); },
            [&] { launch_retrieval_fwd_tc<T, 16>(p, smem, stream); });
        return;
      }
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kSimtRows)),
                    static_cast<unsigned>(ceil_div(p.dim, kSimtCols)));
    gam_launch("retrieval_fwd_simt", retrieval_fwd_simt_kernel<T>, grid, dim3(kSimtThreads), 0,
               stream, static_cast<const T*>(p.h), static_cast<const T*>(p.memory),
               static_cast<T*>(p.out), p.lse, p.rows, p.slots, p.dim, p.scale);
  });
}

}  // namespace cuda
}  // namespace gam
