// Memory retrieval forward: g = softmax(scale * h M^T) M over the S slots, lse kept in fp32.
// Flash-attention style: a block owns a tile of rows and streams tiles of memory slots through
// shared memory with an online softmax, so the (rows x S) scores never reach global memory.
//
// Tensor-core path (fp16/bf16; FlashAttention-2's structure with K = V = M; configurations in
// retrieval_common.cuh, FwdMmaConfig): warp (wm, wn) owns 16 rows and a chunk of dc output
// columns. Per M tile of block_n slots:
//   * S = h M^T over the warp's chunk with ldmatrix + mma.sync m16n8k16 (fp32 accumulators);
//     with several chunks (D > dc) the warps of a row group add their partial S in a fixed order
//     through shared memory, so every one holds the same full 16 x block_n tile;
//   * online softmax in registers (row max and sum over the 4 lanes of a quad with shuffles,
//     exact running max, exp2 with the scale folded in), P rounded to T;
//   * O = alpha O + P M: the S accumulators, packed to T, are the A operand (no shared-memory
//     round trip); the same M tile, read with ldmatrix.trans, is the B operand.
// M tiles stream through a cp.async ring of 1-3 stages in swizzled shared memory; h is loaded
// once. The epilogue writes O / l through shared memory as 16-byte stores.
// fp32 SIMT path (fp32 on the fused path, or GAM_EXT_RETRIEVAL=simt): 16 rows x 32 slots, the
// output accumulated in registers per 256-column slice.
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"

namespace gam {
namespace cuda {
namespace {

// Runtime part of the configuration (the compile-time part is the template).
struct FwdMmaArgs {
  int warps_m, warps_n, stages, dpad_log2;
};

// Threads per block at most: 16 warps, 8 with h in registers. The bound caps registers at
// 65536 / threads (128 for 512 threads). sm_75's 64 KB configurations never exceed 256 threads,
// so there the bound is 256 (the sm_75 product is two m16n8k8, which needs a few more registers).
template <bool kHRegs>
constexpr int kFwdMaxThreads = kHRegs || GAM_MMA_SM75 ? 256 : 512;

template <typename T, int kDc, int kBlockN, bool kHRegs>
__global__ void __launch_bounds__(kFwdMaxThreads<kHRegs>)
    retrieval_fwd_mma_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                             T* __restrict__ out, float* __restrict__ lse, int64_t rows, int slots,
                             int dim, float scale_log2, FwdMmaArgs cfg, bool vec) {
  if constexpr (!kMmaCompiled<T>) {
    __trap();
  } else {
    constexpr int kNS = kBlockN / 8;   // n-tiles of S (8 slots each)
    constexpr int kKS = kDc / 16;      // k-steps of S over the warp's chunk
    constexpr int kNO = kDc / 8;       // n-tiles of the warp's output slice
    constexpr int kKP = kBlockN / 16;  // k-steps of P M
    GAM_DYNAMIC_SHARED(T, smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warps_n = cfg.warps_n, stages = cfg.stages, dpad_log2 = cfg.dpad_log2;
    const int dpad = 1 << dpad_log2;
    const int wn = warp % warps_n, wm = warp / warps_n;
    const int rows_cta = 16 * cfg.warps_m;
    const int g = lane >> 2, t = lane & 3;
    const int64_t row0 = int64_t(blockIdx.x) * rows_cta;
    const int64_t rows_left = rows - row0;
    T* hs = smem;
    T* ms = hs + (kHRegs ? 0 : rows_cta * dpad);
    float* xs = reinterpret_cast<float*>(ms + stages * kBlockN * dpad);
    const int ntiles = (slots + kBlockN - 1) / kBlockN;
    const int col0 = wn * kDc;  // first column of the warp's chunk
    const T* hsrc = h + row0 * dim;
    // ldmatrix offsets of the S product (swz_step). h, the A operand: row lane % 16 (+ 16 wm) and
    // 8-column group 2 j + lane / 16, the four A registers in order. M, the B operand: slot
    // (lane & 7) + 8 (lane / 16) (+ 16 per slot group) and group 2 j + (lane / 8) % 2, so that an
    // x4 load returns (slots 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) and each n-tile's
    // two B registers are adjacent, as HMMA reads them (in the A order ptxas copied them into
    // pairs: 2 IMAD.MOV per pair of HMMA).
    const int x8 = swz_x8(lane);
    const int a_off = (16 * wm + (lane & 15)) * dpad + col0 + swz_hi(lane >> 4, lane);
    const int m_off = ((lane & 7) | (lane >> 4 << 3)) * dpad + col0 + swz_hi((lane >> 3) & 1, lane);

    auto load_m = [&](int tile) {
      load_tile_async(ms + (tile % stages) * kBlockN * dpad, mem + int64_t(tile) * kBlockN * dim,
                      kBlockN, slots - int64_t(tile) * kBlockN, dim, dim, dpad_log2, vec);
    };

    // h fragments held in registers (kHRegs): staged once through the M ring.
    uint32_t hf[kHRegs ? kKS : 1][4];
    if constexpr (kHRegs) {
      load_tile_async(ms, hsrc, 16, rows_left, dim, dim, dpad_log2, vec);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kKS; ++kk)
        ldmatrix<4, false>(hf[kk], ms + swz(lane & 15, col0 + kk * 16 + (lane >> 4) * 8, dpad));
      __syncthreads();
    } else {
      load_tile_async(hs, hsrc, rows_cta, rows_left, dim, dim, dpad_log2, vec);
    }
    if (stages == 1) {
      cp_async_commit();
    } else {
      for (int st = 0; st < stages - 1; ++st) {
        if (st < ntiles) load_m(st);
        cp_async_commit();  // h travels with tile 0
      }
    }

    float o[kNO][4];
#pragma unroll
    for (int i = 0; i < kNO; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int j = 0; j < ntiles; ++j) {
      if (stages == 1) {
        if (j > 0) __syncthreads();  // every warp is done with tile j - 1
        load_m(j);
        cp_async_commit();
      }
      cp_async_wait_dyn(stages == 1 ? 0 : stages - 2);
      __syncthreads();  // tile j (and h) visible; every warp is done with tile j - 1
      if (stages > 1) {
        if (j + stages - 1 < ntiles) load_m(j + stages - 1);  // into tile j - 1's stage
        cp_async_commit();
      }
      const T* mt = ms + (j % stages) * kBlockN * dpad;

      // Partial scores over the warp's chunk.
      float s[kNS][4];
#pragma unroll
      for (int i = 0; i < kNS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKS; ++kk) {
        uint32_t a[4];
        if constexpr (kHRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = hf[kk][r];
        } else {
          ldmatrix<4, false>(a, hs + a_off + swz_step(kk, x8));
        }
#pragma unroll
        for (int np = 0; np < kNS / 2; ++np) {
          // The B fragments of n-tiles 2 np and 2 np + 1: {b[0], b[1]} and {b[2], b[3]}.
          uint32_t b[4];
          ldmatrix<4, false>(b, mt + m_off + 16 * np * dpad + swz_step(kk, x8));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<T>(s[2 * np], a, b0, s[2 * np]);
          mma_m16n8k16<T>(s[2 * np + 1], a, b1, s[2 * np + 1]);
        }
      }

      if (warps_n > 1) {  // add the row group's partials, in chunk order, in every warp
        float* mine = xs + warp * (kNS * 128);
#pragma unroll
        for (int i = 0; i < kNS; ++i)
          *reinterpret_cast<float4*>(mine + (i * 32 + lane) * 4) =
              make_float4(s[i][0], s[i][1], s[i][2], s[i][3]);
        named_barrier_sync(1 + wm, 32 * warps_n);  // only the row group's warps wait
#pragma unroll
        for (int i = 0; i < kNS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        const float* grp = xs + (wm * warps_n) * (kNS * 128);
        for (int w = 0; w < warps_n; ++w) {
#pragma unroll
          for (int i = 0; i < kNS; ++i) {
            const float4 v =
                *reinterpret_cast<const float4*>(grp + (w * kNS * 32 + i * 32 + lane) * 4);
            s[i][0] += v.x;
            s[i][1] += v.y;
            s[i][2] += v.z;
            s[i][3] += v.w;
          }
        }
      }

      // Online softmax (log2 domain; slots past S masked).
      const int sbase = j * kBlockN;
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = sbase + 8 * i + 2 * t + (e & 1) < slots;
          s[i][e] = ok ? s[i][e] * scale_log2 : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[i][e]);
        }
      }
      float alpha[2];
      online_softmax_max(mx, m_run, alpha);
      uint32_t p[kKP][4];
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          p[i / 2][(i & 1) * 2 + r] = probabilities<T>(s[i][2 * r], s[i][2 * r + 1], mx[r], rs[r]);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
#pragma unroll
      for (int i = 0; i < kNO; ++i) {
        o[i][0] *= alpha[0];
        o[i][1] *= alpha[0];
        o[i][2] *= alpha[1];
        o[i][3] *= alpha[1];
      }

      // O += P M over the warp's columns.
#pragma unroll
      for (int kp = 0; kp < kKP; ++kp) {
#pragma unroll
        for (int dp = 0; dp < kNO / 2; ++dp) {
          uint32_t b[4];
          // (The full swz here: hoisting these offsets too costs the spill-free 128 registers.)
          ldmatrix<4, true>(
              b, mt + swz(16 * kp + (lane & 15), col0 + 16 * dp + (lane >> 4) * 8, dpad));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<T>(o[2 * dp], p[kp], b0, o[2 * dp]);
          mma_m16n8k16<T>(o[2 * dp + 1], p[kp], b1, o[2 * dp + 1]);
        }
      }
    }
    cp_async_wait<0>();

    // Epilogue: l over the quad, lse, O / l through shared memory, 16-byte stores.
    float inv[2];
    online_softmax_finish(l_run, m_run, inv, lse + row0, 16 * wm + g, rows_left, wn == 0 && t == 0);
    T* os = kHRegs ? ms : hs;  // rows_cta x dpad, swizzled like h
    __syncthreads();           // every warp is done with h and M
#pragma unroll
    for (int i = 0; i < kNO; ++i) {
      const int c = col0 + 8 * i + 2 * t;
      *reinterpret_cast<uint32_t*>(os + swz(16 * wm + g, c, dpad)) =
          pack2<T>(o[i][0] * inv[0], o[i][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(os + swz(16 * wm + g + 8, c, dpad)) =
          pack2<T>(o[i][2] * inv[1], o[i][3] * inv[1]);
    }
    __syncthreads();
    store_tile(out + row0 * dim, os, rows_cta, rows_left, dim, dpad_log2, vec);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads, kSimtMinBlocks)
    retrieval_fwd_simt_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                              T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                              int64_t slots, int64_t dim, float scale) {
  GAM_SHARED(float, hs, kSimtRows* kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots*(kSimtChunk + 1));
  GAM_SHARED(float, ps, kSimtRows* kSimtSlots);
  GAM_SHARED(float, mv, kSimtSlots* kSimtCols);
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
      for (int i = 0; i < kSimtCols / 16; ++i)
        o[i] = fmaf(p, mv[ss * kSimtCols + sl + 16 * i], o[i]);
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

template <typename T, int kDc, int kBlockN, bool kHRegs>
void launch_fwd_mma(const RetrievalFwdParams& p, const FwdMmaConfig& c, cudaStream_t stream) {
  auto kernel = retrieval_fwd_mma_kernel<T, kDc, kBlockN, kHRegs>;
  const int64_t smem = c.smem_bytes();
  GAM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const FwdMmaArgs args{c.warps_m, c.warps_n, c.stages, ilog2(c.dpad())};
  const bool vec = p.dim % 8 == 0 && aligned16(p.h) && aligned16(p.memory) && aligned16(p.out);
  gam_launch("retrieval_fwd_mma", kernel, dim3(static_cast<unsigned>(ceil_div(p.rows, c.rows()))),
             dim3(static_cast<unsigned>(c.threads())), static_cast<size_t>(smem), stream,
             static_cast<const T*>(p.h), static_cast<const T*>(p.memory), static_cast<T*>(p.out),
             p.lse, p.rows, static_cast<int>(p.slots), static_cast<int>(p.dim), p.scale * kLog2e,
             args, vec);
}

// Calls f(dc, block_n, h_in_regs) as integral constants for the kernel variant of c: (128, 32),
// (128, 16), and (128, 16, h in registers) for fp16.
template <typename T, typename F>
void with_fwd_variant(const FwdMmaConfig& c, F&& f) {
  const bool known = c.dc == 128 && (c.block_n == 16 || (c.block_n == 32 && !c.h_in_regs));
  if (!known)
    throw std::runtime_error("retrieval_fwd_mma: no kernel variant for this configuration");
  if (c.h_in_regs) {
    if constexpr (std::is_same<T, __half>::value) {
      f(std::integral_constant<int, 128>{}, std::integral_constant<int, 16>{}, std::true_type{});
    } else {
      throw std::runtime_error("retrieval_fwd_mma: h in registers is an fp16 (sm_75) variant");
    }
  } else if (c.block_n == 32) {
    f(std::integral_constant<int, 128>{}, std::integral_constant<int, 32>{}, std::false_type{});
  } else {
    f(std::integral_constant<int, 128>{}, std::integral_constant<int, 16>{}, std::false_type{});
  }
}

// ---- gemm path: softmax between the cuBLAS products ------------------------------------------

constexpr int kSoftmaxWarps = 8;

// (m, l) of an online softmax in base 2 merged with another's; m = -inf means empty.
__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = (m == -INFINITY ? 0.f : l * fast_exp2(m - mn)) +
      (m2 == -INFINITY ? 0.f : l2 * fast_exp2(m2 - mn));
  m = mn;
}

// One warp per row: lse = logsumexp(scale * s), P = exp(scale * s - lse) rounded to T.
template <typename T>
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    retrieval_softmax_fwd_kernel(const float* __restrict__ scores, T* __restrict__ p,
                                 float* __restrict__ lse, int64_t rows, int slots,
                                 float scale_log2) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  const float* s = scores + row * slots;
  float m = -INFINITY, l = 0.f;
  for (int c = lane; c < slots; c += 32) merge_max_sum(m, l, s[c] * scale_log2, 1.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    merge_max_sum(m, l, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, l, o));
  const float lse2 = m + __log2f(l);
  if (lane == 0) lse[row] = lse2 * kLn2;
  T* out = p + row * slots;
  for (int c = lane; c < slots; c += 32) out[c] = from_f32<T>(fast_exp2(s[c] * scale_log2 - lse2));
}

// The same for rows of at most 128 * kVecs slots with S % 4 == 0 and 16-byte aligned scores:
// each lane keeps its float4s of the row in registers, so the scores are read once, with 16-byte
// loads (the kernel above reads every row twice, 4 bytes per load); the exact row max, then the
// sum, then P stored as 4 values per access (8 bytes for fp16/bf16). Same formula for P and lse.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    retrieval_softmax_fwd_vec_kernel(const float* __restrict__ scores, T* __restrict__ p,
                                     float* __restrict__ lse, int64_t rows, int slots,
                                     float scale_log2) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  const int nvec = slots >> 2;
  const float* s = scores + row * slots;
  float x[kVecs][4];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = lane + 32 * i;
    if (c < nvec) {
      load_f32<float, 4>(s + 4 * c, x[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[i][j] *= scale_log2;
        m = fmaxf(m, x[i][j]);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float l = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
    if (lane + 32 * i < nvec) {
#pragma unroll
      for (int j = 0; j < 4; ++j) l += fast_exp2(x[i][j] - m);
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  const float lse2 = m + __log2f(l);
  if (lane == 0) lse[row] = lse2 * kLn2;
  T* out = p + row * slots;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = lane + 32 * i;
    if (c < nvec) {
#pragma unroll
      for (int j = 0; j < 4; ++j) x[i][j] = fast_exp2(x[i][j] - lse2);
      store_f32<T, 4>(out + 4 * c, x[i]);
    }
  }
}

__global__ void __launch_bounds__(256)
    retrieval_fwd_fill_kernel(float* __restrict__ x, int64_t n, float v) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = v;
}

}  // namespace

static FwdMmaConfig memory_retrieval_fwd_config(const RetrievalFwdParams& p) {
  if (p.dtype == DType::kFloat32 || !p.tensor_cores || p.dim == 0 || p.dim > kMaxMmaDim)
    return FwdMmaConfig{};
  if (p.dtype == DType::kBFloat16 && p.sm < 80) return FwdMmaConfig{};  // no bf16 mma on sm_75
  return select_fwd_mma(p.dim, p.max_smem_bytes, p.smem_per_sm,
                        p.dtype == DType::kFloat16 && p.sm < 80);
}

std::vector<KernelLaunch> memory_retrieval_fwd_kernels(const RetrievalFwdParams& p) {
  if (p.rows == 0) return {};
  if (p.dim == 0) return {{"retrieval_fwd_fill_kernel", 256, 0}};
  const FwdMmaConfig c = memory_retrieval_fwd_config(p);
  if (c.dc == 0)
    return {
        {std::string("retrieval_fwd_simt_kernel<") + type_name(p.dtype) + ">", kSimtThreads, 0}};
  return {{std::string("retrieval_fwd_mma_kernel<") + type_name(p.dtype) + ", " +
               std::to_string(c.dc) + ", " + std::to_string(c.block_n) + ", " +
               (c.h_in_regs ? "true" : "false") + ">",
           c.threads(), c.smem_bytes()}};
}

std::string describe_memory_retrieval_fwd(const RetrievalFwdParams& p) {
  const FwdMmaConfig c = memory_retrieval_fwd_config(p);
  if (c.dc == 0) {
    std::string why = p.dtype == DType::kFloat32 ? "fp32"
                      : !p.tensor_cores          ? "GAM_EXT_RETRIEVAL=simt"
                      : p.dim > kMaxMmaDim       ? "D > 1024"
                      : p.sm < 80                ? "no bf16 tensor cores before sm_80"
                                                 : "no tensor-core tile fits the shared memory";
    return "simt (" + why + "): retrieval_fwd_simt_kernel, 16 rows x 32 slots x 256 columns";
  }
  return "mma: retrieval_fwd_mma_kernel<" + std::to_string(c.dc) + ", " +
         std::to_string(c.block_n) + (c.h_in_regs ? ", h in registers" : "") + ">, " +
         std::to_string(c.rows()) + " rows x " + std::to_string(c.block_n) + " slots, " +
         std::to_string(c.warps_n) + " column chunks of " + std::to_string(c.dc) + ", " +
         std::to_string(c.stages) + " stages, " + std::to_string(c.threads()) + " threads, " +
         std::to_string(c.smem_bytes()) + " bytes of shared memory";
}

int retrieval_softmax_vecs(const RetrievalSoftmaxParams& p) {
  const bool f32 = p.dtype == DType::kFloat32;
  const int vec_bytes = f32 ? 16 : 8;  // 4 elements of P or dS
  if (p.slots % 4 != 0 || !aligned16(p.scores) || !aligned(p.p, vec_bytes)) return 0;
  if (p.ds != nullptr && p.ld % 4 != 0) return 0;  // the backward's rows of P and dS
  if (!aligned16(p.dp) || !aligned(p.ds, vec_bytes)) return 0;
  for (int v : {1, 2, 4, 8})
    if (p.slots <= 128 * v && v <= softmax_max_vecs(f32)) return v;
  return 0;
}

void launch_retrieval_softmax_fwd(const RetrievalSoftmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kSoftmaxWarps)));
  const int vecs = retrieval_softmax_vecs(p);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    static_switch<1, 2, 4, 8>(
        [&](int v) { return v == vecs; },
        [&](auto v) {
          constexpr int V = decltype(v)::value;
          if constexpr (V <= softmax_max_vecs(std::is_same<T, float>::value)) {
            auto kernel = retrieval_softmax_fwd_vec_kernel<T, V>;
            gam_launch("retrieval_softmax_fwd_vec", kernel, grid, dim3(kSoftmaxWarps * 32), 0,
                       stream, p.scores, static_cast<T*>(p.p), p.lse, p.rows,
                       static_cast<int>(p.slots), p.scale * kLog2e);
          }
        },
        [&] {
          gam_launch("retrieval_softmax_fwd", retrieval_softmax_fwd_kernel<T>, grid,
                     dim3(kSoftmaxWarps * 32), 0, stream, p.scores, static_cast<T*>(p.p), p.lse,
                     p.rows, static_cast<int>(p.slots), p.scale * kLog2e);
        });
  });
}

void launch_memory_retrieval_fwd(const RetrievalFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  if (p.dim == 0) {  // softmax over zero scores: out is empty, lse = log(S)
    gam_launch("retrieval_fwd_fill_lse", retrieval_fwd_fill_kernel,
               dim3(static_cast<unsigned>(ceil_div(p.rows, 256))), dim3(256), 0, stream, p.lse,
               p.rows, std::log(static_cast<float>(p.slots)));
    return;
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      const FwdMmaConfig c = memory_retrieval_fwd_config(p);
      if (c.dc != 0) {
        with_fwd_variant<T>(c, [&](auto dc, auto bn, auto hr) {
          launch_fwd_mma<T, decltype(dc)::value, decltype(bn)::value, decltype(hr)::value>(p, c,
                                                                                           stream);
        });
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
