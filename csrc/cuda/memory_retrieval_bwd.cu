// Memory retrieval backward (docs/design.md, "Memory retrieval"):
//   delta = rowsum(grad_out * out);  p = exp(scale * h M^T - lse);
//   ds = p * (grad_out M^T - delta);  dh = scale * ds M;  dM = scale * ds^T h + p^T grad_out
//   (dM summed over all rows)
// Tensor-core path (fp16/bf16, D <= 1024; configurations in retrieval_common.cuh): five GEMM
// units in two kernels after delta:
//   (1) row pass, one block per row tile, streaming M tiles as the forward does: S = h M^T and
//       dP = grad_out M^T (2 units, one M tile and the same B fragments for both), P and
//       scale * dS in registers, dh += (scale dS) M (1 unit, dS as the A operand); P and
//       scale * dS are stored once, as T, for (2); at the end, scale * dS and dh are corrected
//       from delta = rowsum(grad_out * out) to the exact rowsum(p dP) / rowsum(p) summed in the
//       sweep (csrc/cuda/README.md, "Numerics of delta");
//   (2) dM = [scale dS; P]^T [h; grad_out] (2 units as one GEMM with K = 2 R), split over row
//       ranges into fp32 partials, then (3) the partials added in a fixed order.
// Bitwise deterministic: fixed tiles, fixed split boundaries, fixed summation orders, no float
// atomics. Why P and scale * dS are stored rather than recomputed: csrc/cuda/README.md.
// fp32 SIMT path (fp32 on the fused path, GAM_EXT_RETRIEVAL=simt, or D > 1024): (1') dh per row
// tile and (2') dM per (slot tile, column slice, row range), each recomputing p and ds (7 units),
// then (3); (1') also writes each row's 1 / sum p and exact delta = rowsum(p dP) for (2').
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"

namespace gam {
namespace cuda {
namespace {

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
__global__ void __launch_bounds__(kSimtThreads, kSimtMinBlocks)
    retrieval_bwd_dh_simt_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                                 const T* __restrict__ mem, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const T* __restrict__ out,
                                 T* __restrict__ dh, float* __restrict__ inv_psum,
                                 float* __restrict__ delta_pdp, int64_t rows, int64_t slots,
                                 int64_t dim, float scale) {
  GAM_SHARED(float, hs, kSimtRows* kSimtChunk);
  GAM_SHARED(float, grad_out_s, kSimtRows* kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots*(kSimtChunk + 1));
  GAM_SHARED(float, dss, kSimtRows* kSimtSlots);
  GAM_SHARED(float, mv, kSimtSlots* kSimtCols);
  const int tid = threadIdx.x, r = tid / 16, sl = tid % 16;
  const int64_t row0 = int64_t(blockIdx.x) * kSimtRows, row = row0 + r;
  const int64_t d0 = int64_t(blockIdx.y) * kSimtCols;
  const bool row_ok = row < rows;
  const float lse_r = row_ok ? lse[row] : 0.f;
  const float delta_r = row_ok ? delta[row] : 0.f;
  float acc[kSimtCols / 16];
#pragma unroll
  for (int i = 0; i < kSimtCols / 16; ++i) acc[i] = 0.f;
  float psum = 0.f, pdp = 0.f;
  for (int64_t s0 = 0; s0 < slots; s0 += kSimtSlots) {
    float sa[2], sb[2], p[2], ds[2];
    simt_scores<T, true>(h, grad_out, mem, rows, slots, dim, row0, s0, hs, grad_out_s, ms, sa, sb);
    probs(sa, sb, row_ok, lse_r, delta_r, s0, slots, scale, p, ds);
    psum += p[0] + p[1];
    pdp = fmaf(p[0], sb[0], fmaf(p[1], sb[1], pdp));
    dss[r * kSimtSlots + sl] = ds[0];
    dss[r * kSimtSlots + sl + 16] = ds[1];
    simt_load_cols(mem, slots, dim, s0, d0, kSimtSlots, mv);
    __syncthreads();
    for (int ss = 0; ss < kSimtSlots; ++ss) {
      const float d = dss[r * kSimtSlots + ss];
#pragma unroll
      for (int i = 0; i < kSimtCols / 16; ++i)
        acc[i] = fmaf(d, mv[ss * kSimtCols + sl + 16 * i], acc[i]);
    }
    __syncthreads();
  }
  // The sweep took p = exp(scale s - lse) and delta from G as stored. With the row's sums, p is
  // renormalised (lse is fp32: rounded near |s| ~ 40 it leaves p off by a few 1e-6) and delta
  // becomes the exact rowsum(p dP) / sum p (G's rounding, not shared by dP, would stay whole in
  // dP - delta on rows where one slot holds nearly all of p): dh = scale (acc / sum p +
  // (delta_G - delta) G) (csrc/cuda/README.md, "Numerics of delta"); the dM kernel takes both
  // from inv_psum and delta_pdp.
  const float inv = 1.f / half_warp_sum(psum), dex = half_warp_sum(pdp) * inv;
  if (row_ok) {
    if (blockIdx.y == 0 && sl == 0) inv_psum[row] = inv, delta_pdp[row] = dex;
#pragma unroll
    for (int i = 0; i < kSimtCols / 16; ++i) {
      const int64_t c = d0 + sl + 16 * i;
      if (c < dim) {
        const float g = to_f32(out[row * dim + c]);
        dh[row * dim + c] = from_f32<T>(scale * fmaf(delta_r - dex, g, acc[i] * inv));
      }
    }
  }
}

// Block (slot tile, column slice, row range): partial dM of 32 slots x 256 columns.
template <typename T>
__global__ void __launch_bounds__(kSimtThreads, kSimtMinBlocks)
    retrieval_bwd_dm_simt_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                                 const T* __restrict__ mem, const float* __restrict__ lse,
                                 const float* __restrict__ delta_pdp,
                                 const float* __restrict__ inv_psum, float* __restrict__ partials,
                                 int64_t rows, int64_t slots, int64_t dim, float scale,
                                 int64_t rows_per_split) {
  GAM_SHARED(float, hs, kSimtRows* kSimtChunk);
  GAM_SHARED(float, grad_out_s, kSimtRows* kSimtChunk);
  GAM_SHARED(float, ms, kSimtSlots*(kSimtChunk + 1));
  GAM_SHARED(float, dss, kSimtRows* kSimtSlots);
  GAM_SHARED(float, pss, kSimtRows* kSimtSlots);
  GAM_SHARED(float, hv, kSimtRows* kSimtCols);
  GAM_SHARED(float, gv, kSimtRows* kSimtCols);
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
    const float delta_r = row_ok ? delta_pdp[row] : 0.f;  // both from the dh kernel
    const float inv = row_ok ? inv_psum[row] : 0.f;
    float sa[2], sb[2], p[2], ds[2];
    simt_scores<T, true>(h, grad_out, mem, rend, slots, dim, row0, s0, hs, grad_out_s, ms, sa, sb);
    probs(sa, sb, row_ok, lse_r, delta_r, s0, slots, scale, p, ds);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      dss[r * kSimtSlots + sl + 16 * i] = scale * ds[i] * inv;
      pss[r * kSimtSlots + sl + 16 * i] = p[i] * inv;
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

// The register-resident variant (up to 255 registers per thread) exists for the GPUs with at
// most 163 KB of shared memory per block (sm_75 .. sm_89, sm_120), the only ones whose
// configurations at D > 512 need it; sm_90 .. sm_11x get a trap body (and the host never picks it
// there, bwd_regs_variant_allowed), so their retrieval kernels all stay within 168 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDA_ARCH__ < 1200
constexpr bool kRegsVariantCompiled = false;
#else
constexpr bool kRegsVariantCompiled = true;
#endif

struct BwdMmaArgs {
  int warps_m, warps_n, stages, dpad_log2;
};

// Row pass. pds holds P (rows x sp, T) and then scale * dS (rows x sp): sp = S rounded up to 8.
// Threads: at most 12 warps (kBwdMaxThreads: the bound leaves 168 registers per thread; at 16
// warps, 128, ptxas spills), 8 with h and grad_out in registers (up to 255 registers each).
template <typename T, bool kHgRegs>
__global__ void __launch_bounds__(kHgRegs ? 256 : kBwdMaxThreads)
    retrieval_bwd_mma_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                             const T* __restrict__ mem, const T* __restrict__ out,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             T* __restrict__ dh, T* __restrict__ pds, int64_t rows, int slots,
                             int sp, int dim, float scale, float scale_log2, BwdMmaArgs cfg,
                             bool vec) {
  if constexpr (!kMmaCompiled<T> || (kHgRegs && !kRegsVariantCompiled)) {
    __trap();
  } else {
    constexpr int kDc = 128, kBlockN = 16;
    constexpr int kNS = kBlockN / 8;   // n-tiles of S and dP
    constexpr int kKS = kDc / 16;      // k-steps of S and dP over the warp's chunk
    constexpr int kNO = kDc / 8;       // n-tiles of the warp's dh slice
    constexpr int kKP = kBlockN / 16;  // k-steps of dS M
    GAM_DYNAMIC_SHARED(T, smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warps_n = cfg.warps_n, stages = cfg.stages, dpad_log2 = cfg.dpad_log2;
    const int dpad = 1 << dpad_log2;
    const int wn = warp & (warps_n - 1), wm = warp >> (dpad_log2 - 7);  // warps_n = dpad / 128
    const int rows_cta = 16 * cfg.warps_m;
    const int g = lane >> 2, t = lane & 3;
    const int64_t row0 = int64_t(blockIdx.x) * rows_cta;
    const int rows_left = static_cast<int>(rows - row0 < rows_cta ? rows - row0 : rows_cta);
    T* hs = smem;
    T* gs = hs + (kHgRegs ? 0 : rows_cta * dpad);
    T* ms = gs + (kHgRegs ? 0 : rows_cta * dpad);
    float* xs = reinterpret_cast<float*>(ms + stages * kBlockN * dpad);
    const int ntiles = (slots + kBlockN - 1) / kBlockN;
    const int col0 = wn * kDc;
    // ldmatrix offsets, as in the forward (swz_step): h, dg (A operands) and the transposed M
    // loads read rows lane % 16 and groups 2 j + lane / 16; the M loads of the S product (B
    // operand) slots (lane & 7) + 8 (lane / 16) and groups 2 j + (lane / 8) % 2, so that each
    // n-tile's two B registers are adjacent.
    const int x8 = swz_x8(lane) + swz_hi(lane >> 4, lane);
    const int xb8 = swz_x8(lane) + swz_hi((lane >> 3) & 1, lane);
    const int a_off = (16 * wm + (lane & 15)) * dpad + col0;
    const int m_off = (lane & 15) * dpad + col0;
    const int mb_off = ((lane & 7) | (lane >> 4 << 3)) * dpad + col0;

    auto load_m = [&](int tile) {
      load_tile_async(ms + (tile % stages) * kBlockN * dpad, mem + int64_t(tile) * kBlockN * dim,
                      kBlockN, slots - int64_t(tile) * kBlockN, dim, dim, dpad_log2, vec);
    };

    // h and grad_out fragments in registers (kHgRegs): staged once each through the M ring.
    uint32_t hf[kHgRegs ? kKS : 1][4], gf[kHgRegs ? kKS : 1][4];
    if constexpr (kHgRegs) {
#pragma unroll
      for (int which = 0; which < 2; ++which) {
        load_tile_async(ms, (which ? grad_out : h) + row0 * dim, 16, rows_left, dim, dim, dpad_log2,
                        vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kKS; ++kk)
          ldmatrix<4, false>(which ? gf[kk] : hf[kk],
                             ms + swz(lane & 15, col0 + kk * 16 + (lane >> 4) * 8, dpad));
        __syncthreads();
      }
    } else {
      load_tile_async(hs, h + row0 * dim, rows_cta, rows_left, dim, dim, dpad_log2, vec);
      load_tile_async(gs, grad_out + row0 * dim, rows_cta, rows_left, dim, dim, dpad_log2, vec);
    }
    if (stages == 1) {
      cp_async_commit();
    } else {
      for (int st = 0; st < stages - 1; ++st) {
        if (st < ntiles) load_m(st);
        cp_async_commit();
      }
    }

    // lse (base 2) and delta of the lane's two rows; rows past the end give p = 1, dP = 0,
    // ds = 0 and are never stored.
    float lse2[2], dlt[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int rr = 16 * wm + g + 8 * r;
      lse2[r] = rr < rows_left ? lse[row0 + rr] * kLog2e : 0.f;
      dlt[r] = rr < rows_left ? delta[row0 + rr] : 0.f;
    }
    float acc[kNO][4];
#pragma unroll
    for (int i = 0; i < kNO; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    // The lane's parts of rowsum(p) and rowsum(p dP), summed in fp32 for the exact delta.
    float p_sum[2] = {0.f, 0.f}, pdp_sum[2] = {0.f, 0.f};
    T* p_out = pds;
    T* ds_out = pds + rows * sp;

    for (int j = 0; j < ntiles; ++j) {
      if (stages == 1) {
        if (j > 0) __syncthreads();
        load_m(j);
        cp_async_commit();
      }
      cp_async_wait_dyn(stages == 1 ? 0 : stages - 2);
      __syncthreads();
      if (stages > 1) {
        if (j + stages - 1 < ntiles) load_m(j + stages - 1);
        cp_async_commit();
      }
      const T* mt = ms + (j % stages) * kBlockN * dpad;

      // Partial S and dP over the warp's chunk: one B fragment, two products.
      float s[kNS][4], dp[kNS][4];
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKS; ++kk) {
        uint32_t ah[4], ag[4];
        if constexpr (kHgRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) ah[r] = hf[kk][r], ag[r] = gf[kk][r];
        } else {
          const int off = a_off + swz_step(kk, x8);
          ldmatrix<4, false>(ah, hs + off);
          ldmatrix<4, false>(ag, gs + off);
        }
#pragma unroll
        for (int np = 0; np < kNS / 2; ++np) {
          uint32_t b[4];  // n-tiles 2 np and 2 np + 1: {b[0], b[1]}, {b[2], b[3]} (as forward)
          ldmatrix<4, false>(b, mt + mb_off + 16 * np * dpad + swz_step(kk, xb8));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<T>(s[2 * np], ah, b0, s[2 * np]);
          mma_m16n8k16<T>(s[2 * np + 1], ah, b1, s[2 * np + 1]);
          mma_m16n8k16<T>(dp[2 * np], ag, b0, dp[2 * np]);
          mma_m16n8k16<T>(dp[2 * np + 1], ag, b1, dp[2 * np + 1]);
        }
      }

      if (warps_n > 1) {  // add the row group's partials, in chunk order, in every warp
        float* mine = xs + warp * (2 * kNS * 128);
#pragma unroll
        for (int i = 0; i < kNS; ++i) {
          *reinterpret_cast<float4*>(mine + (i * 32 + lane) * 4) =
              make_float4(s[i][0], s[i][1], s[i][2], s[i][3]);
          *reinterpret_cast<float4*>(mine + ((kNS + i) * 32 + lane) * 4) =
              make_float4(dp[i][0], dp[i][1], dp[i][2], dp[i][3]);
        }
        named_barrier_sync(1 + wm, 32 * warps_n);  // only the row group's warps wait
#pragma unroll
        for (int i = 0; i < kNS; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
        }
        const float* grp = xs + (wm * warps_n) * (2 * kNS * 128);
        for (int w = 0; w < warps_n; ++w) {
#pragma unroll
          for (int i = 0; i < kNS; ++i) {
            const float4 u =
                *reinterpret_cast<const float4*>(grp + (w * 2 * kNS * 32 + i * 32 + lane) * 4);
            const float4 v = *reinterpret_cast<const float4*>(
                grp + (w * 2 * kNS * 32 + (kNS + i) * 32 + lane) * 4);
            s[i][0] += u.x, s[i][1] += u.y, s[i][2] += u.z, s[i][3] += u.w;
            dp[i][0] += v.x, dp[i][1] += v.y, dp[i][2] += v.z, dp[i][3] += v.w;
          }
        }
      }

      // P and scale * dS, rounded to T: the A operand of dS M, and stored for the dM product.
      const int sbase = j * kBlockN;
      uint32_t dsf[kKP][4];
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
        const int c = sbase + 8 * i + 2 * t;
        // The warps of a row group take turns storing the n-tiles of P and dS.
        const bool store = ((j * kNS + i) & (warps_n - 1)) == wn && c < sp;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float pv[2], dv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool ok = c + e < slots;
            pv[e] = ok ? fast_exp2(s[i][2 * r + e] * scale_log2 - lse2[r]) : 0.f;
            const float pdp = pv[e] * dp[i][2 * r + e];  // 0 past S (pv and dp both)
            p_sum[r] += pv[e];
            pdp_sum[r] += pdp;
            dv[e] = scale * (pdp - pv[e] * dlt[r]);
          }
          const uint32_t pk = pack2<T>(pv[0], pv[1]), dk = pack2<T>(dv[0], dv[1]);
          dsf[i / 2][(i & 1) * 2 + r] = dk;
          const int rr = 16 * wm + g + 8 * r;
          if (store && rr < rows_left) {
            const int64_t off = (row0 + rr) * sp + c;
            *reinterpret_cast<uint32_t*>(p_out + off) = pk;
            *reinterpret_cast<uint32_t*>(ds_out + off) = dk;
          }
        }
      }

      // dh += (scale dS) M over the warp's columns.
#pragma unroll
      for (int kp = 0; kp < kKP; ++kp) {
#pragma unroll
        for (int dd = 0; dd < kNO / 2; ++dd) {
          uint32_t b[4];
          ldmatrix<4, true>(b, mt + m_off + 16 * kp * dpad + swz_step(dd, x8));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<T>(acc[2 * dd], dsf[kp], b0, acc[2 * dd]);
          mma_m16n8k16<T>(acc[2 * dd + 1], dsf[kp], b1, acc[2 * dd + 1]);
        }
      }
    }
    cp_async_wait<0>();

    // The sweep used delta from G as stored (rounded to T); rowsum(p dP) / rowsum(p) is the exact
    // one. scale dS = scale P (dP - delta) gains P corr with corr = scale (delta_G - delta), and
    // dh = sum (scale dS) M gains corr G (csrc/cuda/README.md, "Numerics of delta"). Each thread
    // corrects the P / dS pairs it stored: n-tiles f = j kNS + i with f % warps_n = wn, columns
    // 8 f + 2 t; kFix n-tiles' loads in flight before their stores (which may alias the loads as
    // far as the compiler knows).
    static_assert(kBlockN == 8 * kNS, "n-tile f starts at slot 8 f");
    constexpr int kFix = 4;
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      corr[r] = scale * (dlt[r] - quad_sum(pdp_sum[r]) / quad_sum(p_sum[r]));
    for (int f0 = wn; f0 < ntiles * kNS; f0 += kFix * warps_n) {
      auto pair_offset = [&](int u, int r) -> int64_t {  // -1: past S or past the rows
        const int c = 8 * (f0 + u * warps_n) + 2 * t, rr = 16 * wm + g + 8 * r;
        return c < sp && rr < rows_left ? (row0 + rr) * sp + c : -1;
      };
      uint32_t pk[kFix][2], dk[kFix][2];
#pragma unroll
      for (int u = 0; u < kFix; ++u) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t off = pair_offset(u, r);
          if (off >= 0) {
            pk[u][r] = *reinterpret_cast<const uint32_t*>(p_out + off);
            dk[u][r] = *reinterpret_cast<const uint32_t*>(ds_out + off);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kFix; ++u) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t off = pair_offset(u, r);
          if (off >= 0)
            *reinterpret_cast<uint32_t*>(ds_out + off) =
                corrected_ds<T>(dk[u][r], pk[u][r], corr[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int rr = 16 * wm + g + 8 * r;
      if (rr >= rows_left) continue;
      const T* g_row = out + (row0 + rr) * dim;
#pragma unroll
      for (int i = 0; i < kNO; ++i) {
        const int c = col0 + 8 * i + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (c + e < dim)
            acc[i][2 * r + e] = fmaf(corr[r], to_f32(g_row[c + e]), acc[i][2 * r + e]);
        }
      }
    }

    // dh through shared memory (h's tile, or the M ring), 16-byte stores.
    T* os = kHgRegs ? ms : hs;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kNO; ++i) {
      const int c = col0 + 8 * i + 2 * t;
      *reinterpret_cast<uint32_t*>(os + swz(16 * wm + g, c, dpad)) = pack2<T>(acc[i][0], acc[i][1]);
      *reinterpret_cast<uint32_t*>(os + swz(16 * wm + g + 8, c, dpad)) =
          pack2<T>(acc[i][2], acc[i][3]);
    }
    __syncthreads();
    store_tile(dh + row0 * dim, os, rows_cta, rows_left, dim, dpad_log2, vec);
  }
}

// dM product: block (slot tile, column tile, split) computes the fp32 partial
// sum over its K range of A^T B, A = [scale dS; P] (2 rows x sp, from pds), B = [h; grad_out];
// warps 2 x 2, each 32 slots x 64 columns.
template <typename T>
__global__ void __launch_bounds__(kDmThreads)
    retrieval_bwd_dm_mma_kernel(const T* __restrict__ pds, const T* __restrict__ h,
                                const T* __restrict__ grad_out, float* __restrict__ partials,
                                int64_t rows, int slots, int sp, int dim, int ktiles_per_split,
                                bool vec) {
  if constexpr (!kMmaCompiled<T>) {
    __trap();
  } else {
    GAM_DYNAMIC_SHARED(T, smem);
    T* as = smem;                              // kDmStages x (kDmK x kDmSlots), swizzled
    T* bs = as + kDmStages * kDmK * kDmSlots;  // kDmStages x (kDmK x kDmCols), swizzled
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int ws = warp >> 1, wd = warp & 1, g = lane >> 2, t = lane & 3;
    const int s0 = blockIdx.x * kDmSlots, d0 = blockIdx.y * kDmCols;
    const int half_tiles = static_cast<int>((rows + kDmK - 1) / kDmK);
    const int kt_begin = blockIdx.z * ktiles_per_split;
    const int kt_end = min(kt_begin + ktiles_per_split, 2 * half_tiles);
    const int nk = kt_end > kt_begin ? kt_end - kt_begin : 0;

    auto load = [&](int i) {  // K tile kt_begin + i into stage i % kDmStages
      const int kt = kt_begin + i;
      const bool second = kt >= half_tiles;  // rows of P with grad_out
      const int64_t r0 = int64_t(kt - (second ? half_tiles : 0)) * kDmK;
      const T* a = pds + (second ? 0 : rows * sp) + r0 * sp + s0;
      const T* b = (second ? grad_out : h) + r0 * dim + d0;
      const int st = i % kDmStages;
      load_tile_async(as + st * kDmK * kDmSlots, a, kDmK, rows - r0, sp, sp - s0, 6, true);
      load_tile_async(bs + st * kDmK * kDmCols, b, kDmK, rows - r0, dim, dim - d0, 7, vec);
    };
    for (int i = 0; i < kDmStages - 1; ++i) {
      if (i < nk) load(i);
      cp_async_commit();
    }
    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
        acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
    }
    for (int i = 0; i < nk; ++i) {
      cp_async_wait<kDmStages - 2>();
      __syncthreads();
      if (i + kDmStages - 1 < nk) load(i + kDmStages - 1);
      cp_async_commit();
      const T* at = as + (i % kDmStages) * kDmK * kDmSlots;
      const T* bt = bs + (i % kDmStages) * kDmK * kDmCols;
#pragma unroll
      for (int kk = 0; kk < kDmK; kk += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)  // A[slot][row] = stored[row][slot]: .trans
          ldmatrix<4, true>(a[mi], at + swz(kk + (lane & 7) + ((lane >> 4) << 3),
                                            32 * ws + 16 * mi + ((lane >> 3) & 1) * 8, kDmSlots));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldmatrix<4, true>(
              b, bt + swz(kk + (lane & 15), 64 * wd + 16 * np + (lane >> 4) * 8, kDmCols));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_m16n8k16<T>(acc[mi][2 * np], a[mi], b0, acc[mi][2 * np]);
            mma_m16n8k16<T>(acc[mi][2 * np + 1], a[mi], b1, acc[mi][2 * np + 1]);
          }
        }
      }
    }
    cp_async_wait<0>();
    float* out = partials + int64_t(blockIdx.z) * slots * dim;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int slot = s0 + 32 * ws + 16 * mi + g + 8 * (e >> 1);
          const int col = d0 + 64 * wd + 8 * ni + 2 * t + (e & 1);
          if (slot < slots && col < dim) out[int64_t(slot) * dim + col] = acc[mi][ni][e];
        }
      }
    }
  }
}

// ---- gemm path: the softmax backward between the cuBLAS products ------------------------------

constexpr int kSoftmaxWarps = 8;

__device__ __forceinline__ int padded_to_8(int slots) { return (slots + 7) & ~7; }

// One warp per row: p = exp(scale * s - lse) renormalised to sum to 1 (lse is fp32: rounded near
// |s| ~ 40 it leaves p off by a few 1e-6, and on a row where one slot holds nearly all of p that
// error, times delta, stays whole in dP - delta), delta = sum p dP, ds = scale * p (dP - delta);
// P and ds rounded to T, in rows ld elements apart (the fused mixer's ds is part of a wider
// buffer), and slots S .. S rounded up to 8 of each row as zeros (as the wgmma score kernel
// writes them: rows of P and dS start 16-byte aligned and hold no undefined values).
template <typename T>
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    retrieval_softmax_bwd_kernel(const float* __restrict__ scores, const float* __restrict__ dps,
                                 const float* __restrict__ lse, T* __restrict__ p_out,
                                 T* __restrict__ ds_out, int64_t rows, int slots, int64_t ld,
                                 float scale, float scale_log2) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  const float* s = scores + row * slots;
  const float* dp = dps + row * slots;
  const float lse2 = lse[row] * kLog2e;
  float sum = 0.f, pdp = 0.f;
  for (int c = lane; c < slots; c += 32) {
    const float pv = fast_exp2(s[c] * scale_log2 - lse2);
    sum += pv;
    pdp = fmaf(pv, dp[c], pdp);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    pdp += __shfl_xor_sync(0xffffffffu, pdp, o);
  }
  const float inv = 1.f / sum, delta = pdp * inv;
  for (int c = lane; c < slots; c += 32) {
    const float pv = fast_exp2(s[c] * scale_log2 - lse2) * inv;
    p_out[row * ld + c] = from_f32<T>(pv);
    ds_out[row * ld + c] = from_f32<T>(scale * (pv * (dp[c] - delta)));
  }
  for (int c = slots + lane; c < padded_to_8(slots); c += 32) {
    p_out[row * ld + c] = from_f32<T>(0.f);
    ds_out[row * ld + c] = from_f32<T>(0.f);
  }
}

// The same for rows of at most 128 * kVecs slots with S % 4 == 0 and aligned rows: each lane
// keeps its float4s of s and dP in registers, so both are read once, with 16-byte loads (the
// kernel above reads them twice, 4 bytes per load, and computes every p twice), and stores 4
// values of P and ds per access. Same formulas.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    retrieval_softmax_bwd_vec_kernel(const float* __restrict__ scores,
                                     const float* __restrict__ dps, const float* __restrict__ lse,
                                     T* __restrict__ p_out, T* __restrict__ ds_out, int64_t rows,
                                     int slots, int64_t ld, float scale, float scale_log2) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave; no block barrier follows
  const int nvec = slots >> 2;
  const float* s = scores + row * slots;
  const float* dp = dps + row * slots;
  const float lse2 = lse[row] * kLog2e;
  float pv[kVecs][4], dpv[kVecs][4];
  float sum = 0.f, pdp = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = lane + 32 * i;
    if (c < nvec) {
      load_f32<float, 4>(s + 4 * c, pv[i]);
      load_f32<float, 4>(dp + 4 * c, dpv[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        pv[i][j] = fast_exp2(pv[i][j] * scale_log2 - lse2);
        sum += pv[i][j];
        pdp = fmaf(pv[i][j], dpv[i][j], pdp);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    pdp += __shfl_xor_sync(0xffffffffu, pdp, o);
  }
  const float inv = 1.f / sum, delta = pdp * inv;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = lane + 32 * i;
    if (c < nvec) {
      float ds[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        pv[i][j] *= inv;
        ds[j] = scale * (pv[i][j] * (dpv[i][j] - delta));
      }
      store_f32<T, 4>(p_out + row * ld + 4 * c, pv[i]);
      store_f32<T, 4>(ds_out + row * ld + 4 * c, ds);
    }
  }
  if (lane == 0 && slots % 8 != 0) {  // S % 4 == 0 here: slots S .. S + 3
    const float zeros[4] = {0.f, 0.f, 0.f, 0.f};
    store_f32<T, 4>(p_out + row * ld + slots, zeros);
    store_f32<T, 4>(ds_out + row * ld + slots, zeros);
  }
}

// SIMT dM row ranges: a multiple of the 16-row tile.
int64_t rows_per_split(int64_t rows, int splits) {
  return ceil_div(ceil_div(rows, splits), kSimtRows) * kSimtRows;
}

// Slots rounded up to 8: the row stride of the P / dS workspace (16-byte aligned rows).
int64_t padded_slots(int64_t slots) { return ceil_div(slots, 8) * 8; }

BwdMmaConfig bwd_mma_config(const RetrievalBwdParams& p) {
  if (p.dtype == DType::kFloat32 || !p.tensor_cores || p.dim == 0 || p.dim > kMaxMmaDim)
    return BwdMmaConfig{};
  if (p.dtype == DType::kBFloat16 && p.sm < 80) return BwdMmaConfig{};
  return select_bwd_mma(p.dim, p.max_smem_bytes, p.smem_per_sm, p.sm < 90 || p.sm >= 120);
}

// K tiles of the dM product per split (the last split may have fewer).
int dm_ktiles_per_split(int64_t rows, int splits) {
  const int64_t ktiles = 2 * ceil_div(rows, kDmK);
  return static_cast<int>(ceil_div(ktiles, splits));
}

template <typename T, bool kHgRegs>
void launch_bwd_mma(const RetrievalBwdParams& p, const BwdMmaConfig& c, cudaStream_t stream) {
  auto row_kernel = retrieval_bwd_mma_kernel<T, kHgRegs>;
  auto dm_kernel = retrieval_bwd_dm_mma_kernel<T>;
  GAM_CUDA_CHECK(cudaFuncSetAttribute(row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(c.smem_bytes())));
  GAM_CUDA_CHECK(cudaFuncSetAttribute(dm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(kDmSmemBytes)));
  const auto* grad_out = static_cast<const T*>(p.grad_out);
  const auto* h = static_cast<const T*>(p.h);
  auto* pds = static_cast<T*>(p.pds);
  const int sp = static_cast<int>(padded_slots(p.slots));
  const bool vec = p.dim % 8 == 0 && aligned16(p.grad_out) && aligned16(p.h) &&
                   aligned16(p.memory) && aligned16(p.dh);
  const BwdMmaArgs args{c.warps_m, c.warps_n, c.stages, ilog2(c.dpad())};
  gam_launch("retrieval_bwd_mma", row_kernel,
             dim3(static_cast<unsigned>(ceil_div(p.rows, c.rows()))),
             dim3(static_cast<unsigned>(c.threads())), static_cast<size_t>(c.smem_bytes()), stream,
             grad_out, h, static_cast<const T*>(p.memory), static_cast<const T*>(p.out), p.lse,
             p.delta, static_cast<T*>(p.dh), pds, p.rows, static_cast<int>(p.slots), sp,
             static_cast<int>(p.dim), p.scale, p.scale * kLog2e, args, vec);
  const bool dm_vec = p.dim % 8 == 0 && aligned16(p.grad_out) && aligned16(p.h);
  gam_launch(
      "retrieval_bwd_dm_mma", dm_kernel,
      dim3(static_cast<unsigned>(ceil_div(p.slots, kDmSlots)),
           static_cast<unsigned>(ceil_div(p.dim, kDmCols)), static_cast<unsigned>(p.row_splits)),
      dim3(kDmThreads), static_cast<size_t>(kDmSmemBytes), stream, static_cast<const T*>(pds), h,
      grad_out, p.partials, p.rows, static_cast<int>(p.slots), sp, static_cast<int>(p.dim),
      dm_ktiles_per_split(p.rows, p.row_splits), dm_vec);
}

}  // namespace

int memory_retrieval_bwd_row_splits(int64_t rows) {
  // Enough blocks to fill the GPU without a large partial workspace (splits x S x D floats).
  return static_cast<int>(std::clamp<int64_t>(ceil_div(rows, 128), 1, 16));
}

int64_t memory_retrieval_bwd_workspace_floats(int64_t slots, int64_t dim, int row_splits) {
  return int64_t(row_splits) * slots * dim;
}

int64_t memory_retrieval_bwd_pds_elements(const RetrievalBwdParams& p) {
  return bwd_mma_config(p).dc == 0 ? 0 : 2 * p.rows * padded_slots(p.slots);
}

std::vector<KernelLaunch> memory_retrieval_bwd_kernels(const RetrievalBwdParams& p) {
  if (p.dim == 0 || p.rows == 0) return {};
  const std::string t = type_name(p.dtype);
  std::vector<KernelLaunch> out;
  out.push_back({"retrieval_bwd_delta_kernel<" + t + ">", kDeltaWarps * 32, 0});
  const BwdMmaConfig c = bwd_mma_config(p);
  if (c.dc != 0) {
    out.push_back({"retrieval_bwd_mma_kernel<" + t + ", " + (c.hg_in_regs ? "true" : "false") + ">",
                   c.threads(), c.smem_bytes()});
    out.push_back({"retrieval_bwd_dm_mma_kernel<" + t + ">", kDmThreads, kDmSmemBytes});
  } else {
    out.push_back({"retrieval_bwd_dh_simt_kernel<" + t + ">", kSimtThreads, 0});
    out.push_back({"retrieval_bwd_dm_simt_kernel<" + t + ">", kSimtThreads, 0});
  }
  out.push_back({"reduce_partials_kernel", kReduceCols * kReduceRows, 0});
  return out;
}

std::string describe_memory_retrieval_bwd(const RetrievalBwdParams& p) {
  const BwdMmaConfig c = bwd_mma_config(p);
  if (c.dc == 0) {
    std::string why = p.dtype == DType::kFloat32 ? "fp32"
                      : !p.tensor_cores          ? "GAM_EXT_RETRIEVAL=simt"
                      : p.dim > kMaxMmaDim       ? "D > 1024"
                      : p.sm < 80                ? "no bf16 tensor cores before sm_80"
                                                 : "no tensor-core tile fits the shared memory";
    return "simt (" + why +
           "): retrieval_bwd_dh_simt_kernel + retrieval_bwd_dm_simt_kernel, p "
           "and ds recomputed in both";
  }
  return std::string("mma: retrieval_bwd_mma_kernel") +
         (c.hg_in_regs ? "<h and grad_out in registers>" : "") + ", " + std::to_string(c.rows()) +
         " rows x " + std::to_string(c.block_n) + " slots, " + std::to_string(c.warps_n) +
         " column chunks of " + std::to_string(c.dc) + ", " + std::to_string(c.stages) +
         " stages, " + std::to_string(c.threads()) + " threads, " + std::to_string(c.smem_bytes()) +
         " bytes of shared memory; then " + "retrieval_bwd_dm_mma_kernel, " +
         std::to_string(kDmSlots) + " slots x " + std::to_string(kDmCols) + " columns x " +
         std::to_string(kDmK) + " rows, " + std::to_string(p.row_splits) + " row splits";
}

void launch_retrieval_softmax_bwd(const RetrievalSoftmaxParams& p, cudaStream_t stream) {
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
            auto kernel = retrieval_softmax_bwd_vec_kernel<T, V>;
            gam_launch("retrieval_softmax_bwd_vec", kernel, grid, dim3(kSoftmaxWarps * 32), 0,
                       stream, p.scores, p.dp, p.lse, static_cast<T*>(p.p), static_cast<T*>(p.ds),
                       p.rows, static_cast<int>(p.slots), p.ld, p.scale, p.scale * kLog2e);
          }
        },
        [&] {
          gam_launch("retrieval_softmax_bwd", retrieval_softmax_bwd_kernel<T>, grid,
                     dim3(kSoftmaxWarps * 32), 0, stream, p.scores, p.dp, p.lse,
                     static_cast<T*>(p.p), static_cast<T*>(p.ds), p.rows, static_cast<int>(p.slots),
                     p.ld, p.scale, p.scale * kLog2e);
        });
  });
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
      const BwdMmaConfig c = bwd_mma_config(p);
      if (c.dc != 0) {
        if (p.pds == nullptr)
          throw std::runtime_error("launch_memory_retrieval_bwd: no P / dS workspace (pds)");
        if (c.hg_in_regs) {
          launch_bwd_mma<T, true>(p, c, stream);
        } else {
          launch_bwd_mma<T, false>(p, c, stream);
        }
        return;
      }
    }
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(p.dim, kSimtCols));
    gam_launch("retrieval_bwd_dh_simt", retrieval_bwd_dh_simt_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.rows, kSimtRows)), col_blocks),
               dim3(kSimtThreads), 0, stream, grad_out, h, mem, p.lse, p.delta,
               static_cast<const T*>(p.out), static_cast<T*>(p.dh), p.inv_psum, p.delta_pdp, p.rows,
               p.slots, p.dim, p.scale);
    gam_launch("retrieval_bwd_dm_simt", retrieval_bwd_dm_simt_kernel<T>,
               dim3(static_cast<unsigned>(ceil_div(p.slots, kSimtSlots)), col_blocks,
                    static_cast<unsigned>(p.row_splits)),
               dim3(kSimtThreads), 0, stream, grad_out, h, mem, p.lse, p.delta_pdp, p.inv_psum,
               p.partials, p.rows, p.slots, p.dim, p.scale, rows_per_split(p.rows, p.row_splits));
  });
  launch_reduce_partials("retrieval_bwd_reduce", p.partials, int64_t(p.row_splits), p.slots * p.dim,
                         StoreContiguous{p.dmemory}, stream);
}

}  // namespace cuda
}  // namespace gam
