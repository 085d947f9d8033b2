// Pieces shared by the memory retrieval forward and backward kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include <vector>

#include "common.cuh"
#include "warp_mma.cuh"

namespace gam {
namespace cuda {

// ---- tensor-core (mma.sync) paths ---------------------------------------------------------
//
// Swizzled shared-memory tiles of 16-bit elements: rows of `width` elements (a power of two, at
// least 64), the 16-byte chunk c of row r stored at chunk c ^ (r & 7). An ldmatrix phase reads
// the same logical chunk of 8 consecutive rows and a warp's cp.async stores write consecutive
// chunks of a row: both land in 8 different 16-byte bank groups, so neither conflicts.
__host__ __device__ __forceinline__ int swz(int row, int col, int width) {
  return row * width + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// The same offsets, cheaply, for the ldmatrix loads of a warp over a 128-column span: a thread
// whose rows all share row & 7 and whose 8-column group in the span is 2 j + hi (hi = 0 or 1
// from its lane, j = 0..7 at compile time) finds group 2 j + hi of a row at
//   row * width + span start + swz_hi(hi, row) + swz_step(j, swz_x8(row))
// (= swz(row, span start + 16 j + 8 hi, width) for a span start that is a multiple of 128): one
// XOR and one add per load instead of the whole swz. hi only flips bit 3 of the offset, which j
// never touches, so it goes into the thread's base offset, and loads of different lane-to-matrix
// orders (the A and the B operands) share one swz_x8.
__device__ __forceinline__ int swz_x8(int row) { return (row & 6) << 3; }
__device__ __forceinline__ int swz_hi(int hi, int row) { return ((hi ^ row) & 1) << 3; }
__device__ __forceinline__ int swz_step(int j, int x8) {
  return 64 * (j >> 2) + ((16 * (j & 3)) ^ x8);
}

// Waits until at most n (0..2) cp.async groups of the thread are in flight.
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  if (n <= 0) {
    cp_async_wait<0>();
  } else if (n == 1) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<2>();
  }
}

// Copies rows [0, nrows) x columns [0, width) of a row-major block with row stride `stride` (src
// points at its first element) into the swizzled tile dst; rows >= limit and columns >= cols
// become zeros. vec (stride and the first column a multiple of 8 elements, src 16-byte aligned):
// 16-byte cp.async copies, which land at the caller's cp_async_wait; else element loads and
// shared stores. Every thread calls it; rows and chunks are spread over the block. 32-bit
// offsets: nrows * stride < 2^31.
template <typename T>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int nrows,
                                                int64_t limit, int stride, int cols, int width_log2,
                                                bool vec) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int rows_ok = limit < nrows ? static_cast<int>(limit) : nrows;
  if (vec) {
    const int cpr_log2 = width_log2 - 3;  // 16-byte chunks per row
    for (int q = tid; q < (nrows << cpr_log2); q += nthreads) {
      const int r = q >> cpr_log2, c = (q & ((1 << cpr_log2) - 1)) << 3;
      const bool ok = r < rows_ok && c < cols;
      cp_async_16(dst + swz(r, c, 1 << width_log2), ok ? src + r * stride + c : src, ok);
    }
  } else {
    const T zero = from_f32<T>(0.f);
    for (int q = tid; q < (nrows << width_log2); q += nthreads) {
      const int r = q >> width_log2, c = q & ((1 << width_log2) - 1);
      dst[swz(r, c, 1 << width_log2)] = r < rows_ok && c < cols ? src[r * stride + c] : zero;
    }
  }
}

// Stores rows [0, min(nrows, limit)) x columns [0, dim) of the swizzled tile src to the
// row-major block dst: 16-byte stores with vec (dim a multiple of 8, dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_tile(T* __restrict__ dst, const T* src, int nrows,
                                           int64_t limit, int dim, int width_log2, bool vec) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int rows_ok = limit < nrows ? static_cast<int>(limit) : nrows;
  if (vec) {
    const int cpr_log2 = width_log2 - 3;
    for (int q = tid; q < (rows_ok << cpr_log2); q += nthreads) {
      const int r = q >> cpr_log2, c = (q & ((1 << cpr_log2) - 1)) << 3;
      if (c < dim)
        __stcg(reinterpret_cast<uint4*>(dst + r * dim + c),
               *reinterpret_cast<const uint4*>(src + swz(r, c, 1 << width_log2)));
    }
  } else {
    for (int q = tid; q < rows_ok * dim; q += nthreads) {
      const int r = q / dim, c = q - r * dim;
      dst[r * dim + c] = src[swz(r, c, 1 << width_log2)];
    }
  }
}

// The fused tensor-core kernels take rows of up to this many columns (fp32 SIMT beyond).
constexpr int64_t kMaxMmaDim = 1024;

// Reductions over the 4 lanes of a quad (the lanes that share a row of an mma fragment).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A 4 x 4 transpose of 32-bit words across the lanes of a quad (q = lane % 4): on entry lane q
// holds w[j] = word j of lane q, on exit w[k] = word q of lane k. For an accumulator fragment,
// whose quad holds a row's 8 columns of each group of 8 as one pair (2 columns) per lane, the
// words of groups j0 .. j0 + 3 become, in lane q, the 8 columns of group j0 + q in order: one
// 16-byte store in place of four 4-byte ones. Two butterflies (lane bit 0 with word bit 0, then
// bit 1 with bit 1), each two shuffles of the words the partner needs.
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int q) {
#pragma unroll
  for (int bit = 0; bit < 2; ++bit) {
    const int m = 1 << bit;
    const bool upper = (q & m) != 0;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      // The pair of word indices that differ in this bit: lo has it clear, hi set.
      const int lo = bit == 0 ? 2 * t : t, hi = lo + m;
      const uint32_t got = __shfl_xor_sync(0xffffffffu, upper ? w[lo] : w[hi], m);
      if (upper) {
        w[lo] = got;
      } else {
        w[hi] = got;
      }
    }
  }
}

// One tile of the tensor-core forwards' online softmax (log2 domain) for a thread's two rows (an
// accumulator fragment's rows g and g + 8): mx holds the running max raised by the thread's own
// scores of the tile; it becomes the row's max over the quad, alpha the factor 2^(old - new) that
// rescales the row's sums and outputs (0 on the first tile), and m_run the new max.
__device__ __forceinline__ void online_softmax_max(float (&mx)[2], float (&m_run)[2],
                                                   float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = quad_max(mx[r]);
    alpha[r] = fast_exp2(m_run[r] - mx[r]);
    m_run[r] = mx[r];
  }
}

// p = 2^(s - max) of two adjacent scores of a row, rounded to T and packed: a register of P as
// the A operand of P M; rs (the row's sum) gets the rounded values, as the product sees them.
template <typename T>
__device__ __forceinline__ uint32_t probabilities(float s0, float s1, float mx, float& rs) {
  const uint32_t pk = pack2<T>(fast_exp2(s0 - mx), fast_exp2(s1 - mx));
  float lo, hi;
  unpack2<T>(pk, lo, hi);
  rs += lo + hi;
  return pk;
}

// The backward's delta correction (csrc/cuda/README.md, "Numerics of delta"): a pair of
// scale dS plus corr times the pair of P, each packed as T.
template <typename T>
__device__ __forceinline__ uint32_t corrected_ds(uint32_t ds, uint32_t p, float corr) {
  float d0, d1, p0, p1;
  unpack2<T>(ds, d0, d1);
  unpack2<T>(p, p0, p1);
  return pack2<T>(fmaf(corr, p0, d0), fmaf(corr, p1, d1));
}

// The end of the online softmax for a thread's two rows (rows row and row + 8 of the block,
// whose first row is block_lse[0]): l summed over the quad, inv = 1 / l, and, where `write` and
// the row exists (< rows_left), lse = ln 2 * max2 + ln l.
__device__ __forceinline__ void online_softmax_finish(float (&l_run)[2], const float (&m_run)[2],
                                                      float (&inv)[2], float* block_lse, int row,
                                                      int64_t rows_left, bool write) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] = quad_sum(l_run[r]);
    inv[r] = 1.f / l_run[r];
    const int rr = row + 8 * r;
    if (write && rr < rows_left) block_lse[rr] = m_run[r] * kLn2 + logf(l_run[r]);
  }
}

// The C++ name of a dtype's element type, as demangled kernel symbols spell it.
inline const char* type_name(DType dt) {
  return dt == DType::kFloat16 ? "__half" : dt == DType::kBFloat16 ? "__nv_bfloat16" : "float";
}

inline int ilog2(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

// ---- the fused tensor-core forward: configurations ---------------------------------------------
//
// A block owns 16 * warps_m rows of h and all D columns, split into warps_n chunks of dc columns
// (dpad = warps_n * dc >= D). Warp (wm, wn) owns rows 16 wm .. 16 wm + 15 and chunk wn: it
// computes the partial scores of its rows over its chunk, the warps of a row group add their
// partials in a fixed order through shared memory (only when warps_n > 1), and each then holds
// the whole 16 x block_n score tile, its softmax and P in registers, and accumulates its own
// 16 x dc slice of the output. One M tile of block_n slots (all dpad columns) serves both
// products; tiles stream through a `stages`-deep cp.async ring.
// Shared memory: h (16 warps_m x dpad), stages M tiles (block_n x dpad), and the score partials
// (64 block_n bytes per warp) when warps_n > 1. With h_in_regs (sm_75 at D > 512), h lives in
// registers (loaded once through the M ring) and only M and the partials use shared memory.
struct FwdMmaConfig {
  int dc = 0;       // columns per warp: 128 (0: no configuration)
  int block_n = 0;  // slots per step: 16 or 32
  int warps_m = 0, warps_n = 0, stages = 0;
  bool h_in_regs = false;
  int rows() const { return 16 * warps_m; }
  int threads() const { return 32 * warps_m * warps_n; }
  int dpad() const { return warps_n * dc; }
  int64_t smem_bytes() const {
    const int64_t h = h_in_regs ? 0 : int64_t(rows()) * dpad() * 2;
    const int64_t m = int64_t(stages) * block_n * dpad() * 2;
    const int64_t x = warps_n > 1 ? int64_t(warps_m) * warps_n * block_n * 64 : 0;
    return h + m + x;
  }
};

// CTAs per SM that shared memory and registers allow, for a kernel whose threads use at most
// `regs` registers (the fused kernels' __launch_bounds__ guarantee their bound).
inline int ctas_per_sm(int64_t smem, int threads, int smem_per_sm, int regs = 128) {
  const int64_t by_smem = smem_per_sm / (smem + 1024);  // 1 KB per block reserved by the driver
  const int by_regs = 65536 / (regs * threads);
  return static_cast<int>(by_smem < by_regs ? by_smem : by_regs);
}

// The configuration of the fused forward for rows of width dim (1 <= dim <= 1024) on a device
// with smem_optin bytes of shared memory per block and smem_per_sm per SM: among the candidates
// of dim's class that fit, the first with the most resident threads per SM (the candidates come
// in order of preference: more rows per block first, as they read M from L2 less often). dc == 0
// when none fits. allow_h_in_regs admits the fp16 variant that keeps h in registers (168
// registers per thread): sm_75's only configuration at D > 512.
inline FwdMmaConfig select_fwd_mma(int64_t dim, int smem_optin, int smem_per_sm,
                                   bool allow_h_in_regs) {
  std::vector<FwdMmaConfig> cands;
  auto add = [&](int dc, int bn, int wm, int wn, int st, bool hr = false) {
    FwdMmaConfig c;
    c.dc = dc;
    c.block_n = bn;
    c.warps_m = wm;
    c.warps_n = wn;
    c.stages = st;
    c.h_in_regs = hr;
    cands.push_back(c);
  };
  if (dim <= 128) {
    add(128, 32, 4, 1, 3), add(128, 32, 4, 1, 2), add(128, 16, 2, 1, 2);
  } else if (dim <= 256) {
    add(128, 32, 4, 2, 3), add(128, 32, 4, 2, 2), add(128, 32, 2, 2, 2), add(128, 16, 2, 2, 2);
  } else if (dim <= 512) {
    add(128, 32, 4, 4, 3), add(128, 32, 4, 4, 2), add(128, 16, 2, 4, 2), add(128, 16, 1, 4, 2);
  } else if (dim <= 1024) {
    add(128, 32, 2, 8, 2), add(128, 16, 2, 8, 2), add(128, 16, 1, 8, 2), add(128, 16, 1, 8, 1);
    if (allow_h_in_regs) add(128, 16, 1, 8, 1, true);
  }
  FwdMmaConfig best;
  int best_threads = 0;  // resident threads per SM
  for (const FwdMmaConfig& c : cands) {
    if (c.smem_bytes() > smem_optin) continue;
    const int threads = ctas_per_sm(c.smem_bytes(), c.threads(), smem_per_sm) * c.threads();
    if (threads > best_threads) best = c, best_threads = threads;
  }
  return best;
}

// ---- the fused tensor-core backward: configurations --------------------------------------------
//
// Row pass (retrieval_bwd_mma_kernel): the forward's layout with two score products per M tile,
// S = h M^T and dP = grad_out M^T (same B fragments), block_n = 16 slots per step; h and grad_out
// rows resident in shared memory (or, hg_in_regs, as registers: small-memory GPUs at D > 512);
// partials of both added across the chunks of a row as in the forward. Each warp then holds P and
// scale * dS of its rows in registers, accumulates dh += (scale dS) M on its chunk, and stores P
// and scale * dS once (as T) for the dM product.
// At most 12 warps per block: the launch bound then leaves each thread 168 registers.
constexpr int kBwdMaxThreads = 384;

struct BwdMmaConfig {
  int dc = 0;  // columns per warp: 128 (0: no configuration)
  int block_n = 16;
  int warps_m = 0, warps_n = 0, stages = 0;
  bool hg_in_regs = false;
  int rows() const { return 16 * warps_m; }
  int threads() const { return 32 * warps_m * warps_n; }
  int dpad() const { return warps_n * dc; }
  int64_t smem_bytes() const {
    const int64_t hg = hg_in_regs ? 0 : 2 * int64_t(rows()) * dpad() * 2;
    const int64_t m = int64_t(stages) * block_n * dpad() * 2;
    const int64_t x = warps_n > 1 ? 2 * int64_t(warps_m) * warps_n * block_n * 64 : 0;
    return hg + m + x;
  }
};

// As select_fwd_mma, for the row pass of the backward; allow_hg_in_regs admits the variant with h
// and grad_out in registers (D > 512 on GPUs with 99 or 64 KB of shared memory per block).
inline BwdMmaConfig select_bwd_mma(int64_t dim, int smem_optin, int smem_per_sm,
                                   bool allow_hg_in_regs) {
  std::vector<BwdMmaConfig> cands;
  auto add = [&](int wm, int wn, int st, bool regs = false) {
    BwdMmaConfig c;
    c.dc = 128;
    c.warps_m = wm;
    c.warps_n = wn;
    c.stages = st;
    c.hg_in_regs = regs;
    cands.push_back(c);
  };
  if (dim <= 128) {
    add(8, 1, 3), add(8, 1, 2), add(4, 1, 2), add(2, 1, 2);
  } else if (dim <= 256) {
    add(6, 2, 3), add(6, 2, 2), add(4, 2, 2), add(2, 2, 2), add(1, 2, 2);
  } else if (dim <= 512) {
    add(3, 4, 3), add(3, 4, 2), add(2, 4, 2), add(1, 4, 2), add(1, 4, 1);
  } else if (dim <= 1024) {
    add(1, 8, 2), add(1, 8, 1);
    if (allow_hg_in_regs) add(1, 8, 2, true), add(1, 8, 1, true);
  }
  BwdMmaConfig best;
  int best_threads = 0;
  for (const BwdMmaConfig& c : cands) {
    if (c.smem_bytes() > smem_optin) continue;
    const int ctas = ctas_per_sm(c.smem_bytes(), c.threads(), smem_per_sm,
                                 c.hg_in_regs ? 255 : 65536 / kBwdMaxThreads);
    const int threads = ctas * c.threads();
    if (threads > best_threads) best = c, best_threads = threads;
  }
  return best;
}

// dM product (retrieval_bwd_dm_mma_kernel): dM = [scale dS; P]^T [h; grad_out], one GEMM with
// K = 2 R (rows of scale dS with h, then rows of P with grad_out), tiles of 64 slots x 128
// columns, K in tiles of 32 rows through a cp.async ring; K is split into row ranges whose fp32
// partials reduce_partials_kernel adds in a fixed order.
constexpr int kDmSlots = 64;
constexpr int kDmCols = 128;
constexpr int kDmK = 32;
constexpr int kDmThreads = 128;
constexpr int kDmStages = 3;
constexpr int64_t kDmSmemBytes = int64_t(kDmStages) * kDmK * (kDmSlots + kDmCols) * 2;

// ---- fp32 SIMT paths --------------------------------------------------------------------------

// fp32 SIMT tiling (any dtype; the fallback and the fp32 path): 16 rows x 32 slots per step,
// scores accumulated over D in chunks of 32, outputs in 256-column slices (grid.y).
constexpr int kSimtRows = 16;
constexpr int kSimtSlots = 32;
constexpr int kSimtChunk = 32;
constexpr int kSimtCols = 256;
constexpr int kSimtThreads = 256;
// Two blocks per SM in __launch_bounds__: without it ptxas (CUDA 13, sm_90 / sm_100) keeps 48-64
// registers and spills the loop-carried softmax state.
constexpr int kSimtMinBlocks = 2;

// Scores of one (16 rows x 32 slots) tile for thread t: row t / 16, slots t % 16 and t % 16 + 16.
// Computes dot(a_row, M_slot) and, when B is given, dot(b_row, M_slot) too (the backward's dp).
// Every thread of the block must call it. hs/bs: kSimtRows * kSimtChunk floats,
// ms: kSimtSlots * (kSimtChunk + 1) floats.
template <typename T, bool kTwo>
__device__ __forceinline__ void simt_scores(const T* __restrict__ a, const T* __restrict__ b,
                                            const T* __restrict__ mem, int64_t rows, int64_t slots,
                                            int64_t dim, int64_t row0, int64_t s0, float* hs,
                                            float* bs, float* ms, float (&sa)[2], float (&sb)[2]) {
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
