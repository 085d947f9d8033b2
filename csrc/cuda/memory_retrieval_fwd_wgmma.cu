// Memory retrieval forward on Hopper's warpgroup MMA (sm_90a; GAM_EXT_RETRIEVAL=wgmma): g =
// softmax(scale * h M^T) M and the fp32 lse, for fp16 / bf16 at D = 128, 256 or 512, the scores
// never in global memory. Two kernels: the pipelined one (the default; below) and the lockstep
// one, the first, kept so that one process can measure both (GAM_EXT_WGMMA_FORWARD=lockstep).
// The lockstep kernel is measured on an H200 (csrc/cuda/README.md, "The wgmma kernels on the
// H200"); the pipelined one not yet.
//
// The lockstep kernel: a block of two warpgroups owns 64 rows. h (64 x D) is loaded once; M streams
// through two stages of 64 slots x D columns. Both operands sit in shared memory as D / 64
// 128-byte-swizzled panels of 64 columns (8 KB each), the layout wgmma's descriptors read K-major
// for the scores and MN-major for P M, so one M tile serves both products. Per M tile, warpgroup w
// (columns (D / 2) w .. (D / 2) (w + 1) - 1 of D, "its half"):
//   * S_w = h[:, half w] M[:, half w]^T: D / 32 wgmma m64n64k16 from shared memory, then the two
//     partial score tiles are added through shared memory (16 KB each, fixed order), so both
//     warpgroups hold the same 64 x 64 scores without computing them twice;
//   * online softmax in registers (each thread two rows, the 4 lanes of a quad sharing a row),
//     exp2 with the scale folded in, P rounded to T;
//   * O_w = alpha O_w + P M[:, half w]: 4 wgmma m64n(D/2)k16 with P as the A registers (the score
//     accumulators, packed) and the M tile read MN-major: D / 4 fp32 accumulators per thread.
// The output goes through shared memory (h's space) to 16-byte global stores.
// Shared memory at D = 512: h 64 KB + 2 x 64 KB of M + 32 KB of partial scores + 1 KB of
// alignment = 225 KB, one block per SM (D = 256: 129 KB; D = 128: 81 KB).
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"
#include "warp_mma.cuh"
#include "warpgroup_mma.cuh"

namespace gam {
namespace cuda {
namespace {

constexpr int kWgRows = 64;                    // rows per block: one m64 tile
[[maybe_unused]] constexpr int kWgSlots = 64;  // slots per M tile
constexpr int kWgThreads = 256;                // two warpgroups, one half of D each
constexpr int kScoreBytes = 2 * 64 * 64 * 4;   // both warpgroups' partial scores

// 64 rows x D columns, and the kernel's shared memory: h, two M stages, the partial scores.
constexpr int tile_bytes(int dim) { return dim / 64 * kPanelBytes; }
constexpr int fwd_wgmma_smem_bytes(int dim) { return 1024 + 3 * tile_bytes(dim) + kScoreBytes; }

// Both forwards' epilogue, for a block of two warpgroups (warpgroup w holding O's columns
// (D / 2) w ..): l over the quad, lse (warpgroup 0), O / l rounded to T into h's space in shared
// memory (each warpgroup into its own half, which only its own finished products read), then
// 16-byte stores of whole rows.
template <typename T, int kDim>
__device__ __forceinline__ void wgmma_epilogue(const float (&o)[kDim / 4], float (&l_run)[2],
                                               const float (&m_run)[2], unsigned char* hs,
                                               T* __restrict__ out, float* __restrict__ lse,
                                               int64_t row0, int64_t rows_left) {
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
  const int warp = t >> 5, g = (t & 31) >> 2, q = t & 3;
  float inv[2];
  online_softmax_finish(l_run, m_run, inv, lse + row0, 16 * warp + g, rows_left, wg == 0 && q == 0);
#pragma unroll
  for (int v = 0; v < kDim / 4; v += 2) {
    const int rr = 16 * warp + g + 8 * ((v >> 1) & 1);
    const int col = kDim / 2 * wg + 8 * (v >> 2) + 2 * q;
    const float f = inv[(v >> 1) & 1];
    *reinterpret_cast<uint32_t*>(hs + swizzle128_tile_offset(rr, col >> 3) + (col & 7) * 2) =
        pack2<T>(o[v] * f, o[v + 1] * f);
  }
  __syncthreads();
  for (int i = tid; i < 64 * (kDim / 8); i += kWgThreads) {
    const int r = unsigned(i) / (kDim / 8), c = unsigned(i) % (kDim / 8);
    if (r < rows_left) {
      *reinterpret_cast<uint4*>(out + (row0 + r) * kDim + c * 8) =
          *reinterpret_cast<const uint4*>(hs + swizzle128_tile_offset(r, c));
    }
  }
}

// A thread's kN scores of a tile whose first slot is sbase (accumulator v: row 16 warp + g +
// 8 ((v / 2) % 2), slot sbase + 8 (v / 4) + 2 q + v % 2): scaled to the log2 domain in place,
// slots past S masked to -inf, and its two rows' maxima raised into mx (this thread's own; the
// quad's max is the caller's).
template <int kN>
__device__ __forceinline__ void scale_mask_max(float (&s)[kN], int sbase, int slots, int q,
                                               float scale_log2, float (&mx)[2]) {
#pragma unroll
  for (int v = 0; v < kN; ++v) {
    const bool ok = sbase + 8 * (v >> 2) + 2 * q + (v & 1) < slots;
    s[v] = ok ? s[v] * scale_log2 : -INFINITY;
    mx[(v >> 1) & 1] = fmaxf(mx[(v >> 1) & 1], s[v]);
  }
}

template <typename T, int kDim>
__global__ void __launch_bounds__(kWgThreads, 1)
    retrieval_fwd_wgmma_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                               T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                               int slots, float scale_log2) {
#if GAM_WGMMA_COMPILED
  constexpr int kHalf = kDim / 2;  // output columns per warpgroup: the P M product's N
  constexpr int kAcc = kDim / 4;   // its fp32 accumulators per thread
  constexpr int kTileBytes = tile_bytes(kDim);
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  unsigned char* hs = smem + pad;
  unsigned char* ms = hs + kTileBytes;
  float4* xs = reinterpret_cast<float4*>(ms + 2 * kTileBytes);
  const uint32_t hs_addr = window + pad, ms_addr = hs_addr + kTileBytes;
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127, q = t & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kWgRows;
  const int64_t rows_left = rows - row0;
  const int ntiles = (slots + kWgSlots - 1) / kWgSlots;

  cp_async_rows_to_panels<kWgThreads>(hs, h + row0 * kDim, rows_left, kDim, tid);
  cp_async_rows_to_panels<kWgThreads>(ms, mem, slots, kDim, tid);
  cp_async_commit();  // h and M tile 0
  if (ntiles > 1)
    cp_async_rows_to_panels<kWgThreads>(ms + kTileBytes, mem + int64_t(kWgSlots) * kDim,
                                        slots - kWgSlots, kDim, tid);
  cp_async_commit();  // M tile 1 (or nothing)

  float o[kAcc];
#pragma unroll
  for (int v = 0; v < kAcc; ++v) o[v] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const uint32_t half = (kDim / 128) * wg * kPanelBytes;  // this warpgroup's D / 128 panels

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait<1>();
    fence_proxy_async_shared();  // the cp.async writes, for wgmma's reads
    __syncthreads();             // tile j (and h) landed for every thread
    const uint32_t mt = ms_addr + (j & 1) * kTileBytes;

    // Partial scores over this warpgroup's D / 2 columns: D / 32 k steps of 16 columns.
    float s[32];
#pragma unroll
    for (int v = 0; v < 32; ++v) s[v] = 0.f;
    wgmma_fence_registers(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDim / 32; ++kk) {
      const uint32_t off = half + (kk >> 2) * kPanelBytes + (kk & 3) * 32;
      wgmma_mma<T, 64, false, false>(s, swizzle128_descriptor(hs_addr + off, 16),
                                     swizzle128_descriptor(mt + off, 16), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_registers(s);

    // The other warpgroup's partial, thread for thread the same elements: p0 + p1 in both.
#pragma unroll
    for (int i = 0; i < 8; ++i)
      xs[wg * 1024 + i * 128 + t] = make_float4(s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 v = xs[(1 - wg) * 1024 + i * 128 + t];
      s[4 * i] += v.x;
      s[4 * i + 1] += v.y;
      s[4 * i + 2] += v.z;
      s[4 * i + 3] += v.w;
    }

    // Online softmax (log2 domain; slots past S masked).
    float mx[2] = {m_run[0], m_run[1]};
    scale_mask_max(s, j * kWgSlots, slots, q, scale_log2, mx);
    float alpha[2];
    online_softmax_max(mx, m_run, alpha);
    // P as the A registers of the 4 k steps (16 slots each): two 8-slot blocks of S per step.
    uint32_t p[4][4];
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 16; ++i)  // s[2 i], s[2 i + 1] (row i % 2): register i % 4 of step i / 4
      p[i >> 2][i & 3] = probabilities<T>(s[2 * i], s[2 * i + 1], mx[i & 1], rs[i & 1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
#pragma unroll
    for (int v = 0; v < kAcc; ++v) o[v] *= alpha[(v >> 1) & 1];

    // O += P M[:, half]: M read MN-major, 16 slots (2 KB of rows) per k step, the panels of the
    // half LBO apart.
    wgmma_fence_registers(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_fence_registers(p[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_mma_regs<T, kHalf, true>(
          o, p[kk], swizzle128_descriptor(mt + half + kk * 16 * 128, kPanelBytes), true);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_registers(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_fence_registers(p[kk]);

    __syncthreads();  // both warpgroups are done with tile j and the partial scores
    if (j + 2 < ntiles) {
      cp_async_rows_to_panels<kWgThreads>(ms + (j & 1) * kTileBytes,
                                          mem + int64_t(j + 2) * kWgSlots * kDim,
                                          slots - int64_t(j + 2) * kWgSlots, kDim, tid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  wgmma_epilogue<T, kDim>(o, l_run, m_run, hs, out, lse, row0, rows_left);
#else
  (void)h, (void)mem, (void)out, (void)lse, (void)rows, (void)slots, (void)scale_log2;
  __trap();
#endif
}

// ---- the pipelined forward (the default of GAM_EXT_RETRIEVAL=wgmma) ----------------------------
//
// The lockstep kernel above leaves the tensor cores idle through each tile's exchange and
// softmax (ncu on the H200: barrier and wait stalls on top). This one overlaps them with products,
// FlashAttention-3's intra-warpgroup pipelining: warpgroup w issues the partial scores of tile
// j + 1 and then P_j M_j back to back, waits for the scores only, and runs their exchange and
// softmax while P_j M_j runs. Tiles j and j + 1 are then read together while tiles j + 2 and
// j + 3 land, so M streams in 32-slot tiles through 4 stages (the 64-slot tiles of the lockstep
// kernel fit only 2 at D = 512). Each warpgroup loads, and waits for, only its own half of D's
// columns of h and of each M tile (all that its products read), so the warpgroups meet once per
// tile, at the partial-score exchange (double-buffered, one block barrier).
// Per tile j < last, warpgroup w, with P_j (registers) and alpha_j from the previous step:
//   1. O_w *= alpha_j; waits for its half of tile j + 1 (a warpgroup barrier, which also says
//      that every warp of it is done with tile j - 1) and loads tile j + 3 into j - 1's stage;
//   2. issues S_{j+1} = h[:, half w] M_{j+1}[:, half w]^T (D / 32 wgmma m64n32k16), then
//      O_w += P_j M_j[:, half w] (2 wgmma m64n(D/2)k16, P as the A registers);
//   3. waits for S_{j+1}, adds the other warpgroup's partial, online softmax (alpha_{j+1}), while
//      P_j M_j runs; waits for it, and rounds P_{j+1} to T.
// 190 registers at D = 512 (sm_90a), no spills, no product serialised by ptxas.
// Shared memory at D = 512: h 64 KB + 4 x 32 KB of M + 2 x 16 KB of partial scores + 1 KB of
// alignment = 225 KB (D = 256: 129 KB; D = 128: 81 KB).
constexpr int kPipeSlots = 32;                    // slots per M tile
constexpr int kPipeStages = 4;                    // M tiles in shared memory
constexpr int kPipeSlotPanel = kPipeSlots * 128;  // bytes of a 32-row panel of 64 columns
constexpr int kPipeScoreBytes = 2 * 2 * 64 * kPipeSlots * 4;  // 2 buffers x 2 partials

constexpr int pipe_stage_bytes(int dim) { return dim / 64 * kPipeSlotPanel; }
constexpr int fwd_wgmma_pipe_smem_bytes(int dim) {
  return 1024 + tile_bytes(dim) + kPipeStages * pipe_stage_bytes(dim) + kPipeScoreBytes;
}

template <typename T, int kDim>
__global__ void __launch_bounds__(kWgThreads, 1)
    retrieval_fwd_wgmma_pipelined_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                                         T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                                         int slots, float scale_log2) {
#if GAM_WGMMA_COMPILED
  constexpr int kHalf = kDim / 2;  // output columns per warpgroup: the P M product's N
  constexpr int kAcc = kDim / 4;   // its fp32 accumulators per thread
  constexpr int kStageBytes = pipe_stage_bytes(kDim);
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  unsigned char* hs = smem + pad;
  unsigned char* ms = hs + tile_bytes(kDim);
  float4* xs = reinterpret_cast<float4*>(ms + kPipeStages * kStageBytes);
  const uint32_t hs_addr = window + pad, ms_addr = hs_addr + tile_bytes(kDim);
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127, q = t & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kWgRows;
  const int64_t rows_left = rows - row0;
  const int ntiles = (slots + kPipeSlots - 1) / kPipeSlots;
  auto load_tile = [&](int j) {
    if (j < ntiles)
      cp_async_rows_to_panels<128, kPipeSlots>(ms + (j % kPipeStages) * kStageBytes,
                                               mem + int64_t(j) * kPipeSlots * kDim,
                                               slots - int64_t(j) * kPipeSlots, kDim, t, 2, wg);
    cp_async_commit();  // a group per tile, empty past the last, so that the counts below hold
  };
  // This warpgroup's first panel of h and of an M tile.
  const uint32_t h_half = hs_addr + (kDim / 128) * wg * kPanelBytes;
  const uint32_t m_half = (kDim / 128) * wg * kPipeSlotPanel;
  float s[kPipeSlots / 2];  // this warpgroup's partial scores, then the tile's 2^(s - max)
  auto issue_scores = [&](int j) {
    const uint32_t mt = ms_addr + (j % kPipeStages) * kStageBytes + m_half;
    wgmma_fence_registers(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDim / 32; ++kk) {
      const uint32_t col = (kk & 3) * 32;  // 16 columns into the 128-byte row of panel kk / 4
      wgmma_mma<T, kPipeSlots, false, false>(
          s, swizzle128_descriptor(h_half + (kk >> 2) * kPanelBytes + col, 16),
          swizzle128_descriptor(mt + (kk >> 2) * kPipeSlotPanel + col, 16), kk > 0);
    }
    wgmma_commit();
  };
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2] = {0.f, 0.f};
  // The scores of tile j (its partial done): the other warpgroup's partial added, thread for
  // thread the same elements (p0 + p1 in both; the buffer of tile j is next written for tile
  // j + 2, after the next exchange's barrier), then the online softmax's max and alpha, and s
  // becomes 2^(s - max) (slots past S masked). s[v]: row 16 warp + g + 8 ((v / 2) % 2), slot
  // 8 (v / 4) + 2 q + v % 2 of the tile.
  auto softmax_tile = [&](int j) {
    wgmma_fence_registers(s);
    float4* mine = xs + ((j & 1) * 2 + wg) * (kPipeSlots / 8 * 128);
    const float4* theirs = xs + ((j & 1) * 2 + (1 - wg)) * (kPipeSlots / 8 * 128);
#pragma unroll
    for (int i = 0; i < kPipeSlots / 8; ++i)
      mine[i * 128 + t] = make_float4(s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPipeSlots / 8; ++i) {
      const float4 v = theirs[i * 128 + t];
      s[4 * i] += v.x;
      s[4 * i + 1] += v.y;
      s[4 * i + 2] += v.z;
      s[4 * i + 3] += v.w;
    }
    float mx[2] = {m_run[0], m_run[1]};
    scale_mask_max(s, j * kPipeSlots, slots, q, scale_log2, mx);
    online_softmax_max(mx, m_run, alpha);
#pragma unroll
    for (int v = 0; v < kPipeSlots / 2; ++v) s[v] = fast_exp2(s[v] - mx[(v >> 1) & 1]);
  };
  // P of a tile as the A registers of P M's 2 k steps (p[i / 4][i % 4] = s[2 i], s[2 i + 1],
  // row i % 2, rounded to T), the row sums from the rounded values, as the product sees them.
  uint32_t p[2][4];
  auto pack_probabilities = [&] {
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kPipeSlots / 4; ++i) {
      p[i >> 2][i & 3] = pack2<T>(s[2 * i], s[2 * i + 1]);
      float lo, hi;
      unpack2<T>(p[i >> 2][i & 3], lo, hi);
      rs[i & 1] += lo + hi;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
  };

  float o[kAcc];
#pragma unroll
  for (int v = 0; v < kAcc; ++v) o[v] = 0.f;
  wgmma_fence_registers(o);

  // h's half and tile 0 (group 0), tiles 1 and 2; then S_0 and P_0.
  cp_async_rows_to_panels<128>(hs, h + row0 * kDim, rows_left, kDim, t, 2, wg);
  load_tile(0);
  load_tile(1);
  load_tile(2);
  cp_async_wait<2>();
  fence_proxy_async_shared();  // the cp.async writes, for wgmma's reads
  named_barrier_sync(1 + wg, 128);
  issue_scores(0);
  wgmma_wait<0>();
  softmax_tile(0);
  pack_probabilities();

  // O = alpha O + P_j M_j[:, half]: O rescaled before any product is issued, M read MN-major,
  // 16 slots (2 KB of rows) per k step, the panels of the half LBO apart.
  auto rescale_o = [&] {
    // D / 4 multiplies per thread and tile; skipped where neither row's max moved (alpha is then
    // exactly 1), as on most tiles past the first few.
    if (alpha[0] != 1.f || alpha[1] != 1.f) {
#pragma unroll
      for (int v = 0; v < kAcc; ++v) o[v] *= alpha[(v >> 1) & 1];
    }
    wgmma_fence_registers(o);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) wgmma_fence_registers(p[kk]);
  };
  auto issue_pm = [&](int j) {
    const uint32_t mt = ms_addr + (j % kPipeStages) * kStageBytes + m_half;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      wgmma_mma_regs<T, kHalf, true>(
          o, p[kk], swizzle128_descriptor(mt + kk * 16 * 128, kPipeSlotPanel), true);
    wgmma_commit();
  };

  // Every tile but the last, with no branch around a product: ptxas serialises every wgmma of a
  // kernel where it cannot prove that the registers of one in flight are left alone (a product
  // issued on one path and waited for on another, or registers of one in flight copied, as a
  // value carried over a loop's back edge can be), so nothing is in flight there either.
  for (int j = 0; j + 1 < ntiles; ++j) {
    rescale_o();
    // Tile j + 1 landed (group j + 1 of j + 3); after the barrier every warp of this warpgroup is
    // past tile j - 1's P M, so its stage takes tile j + 3.
    cp_async_wait<1>();
    fence_proxy_async_shared();
    named_barrier_sync(1 + wg, 128);
    load_tile(j + 3);
    issue_scores(j + 1);
    issue_pm(j);
    wgmma_wait<1>();  // S_{j+1}; its softmax runs while P_j M_j does
    softmax_tile(j + 1);
    wgmma_wait<0>();
    wgmma_fence_registers(o);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) wgmma_fence_registers(p[kk]);
    pack_probabilities();
  }
  rescale_o();
  issue_pm(ntiles - 1);
  wgmma_wait<0>();
  wgmma_fence_registers(o);
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) wgmma_fence_registers(p[kk]);
  cp_async_wait<0>();

  wgmma_epilogue<T, kDim>(o, l_run, m_run, hs, out, lse, row0, rows_left);
#else
  (void)h, (void)mem, (void)out, (void)lse, (void)rows, (void)slots, (void)scale_log2;
  __trap();
#endif
}

// ---- the seesaw forward (GAM_EXT_WGMMA_FORWARD=seesaw) ------------------------------------------
//
// The scores of each 64-slot tile computed once, over the whole depth D, by one warpgroup:
// warpgroup 0 takes the even tiles (a = 2 i), warpgroup 1 the odd ones (b = 2 i + 1), and each
// hands its tile's P to the other through shared memory, so that both accumulate their half of
// O's columns from every tile (FlashMLA's schedule for the same shape class; csrc/cuda/README.md,
// "A forward with the scores computed once per tile"). No fp32 partial scores are exchanged and
// each softmax runs once. Per pair of tiles (m the running max, both warpgroups keep the same):
//   1. [0] S_a = h M_a^T; [1] S_b = h M_b^T (each 64 x 64, D / 16 wgmma m64n64k16).
//   2. [0] m_a = max(m, max S_a), P_a = 2^(S_a - m_a) into shared memory.
//   3. [0] O_L = 2^(m - m_a) O_L + P_a M_a[:, L]; [1] the same for O_R, while it computes
//      m_b = max(m_a, max S_b) and P_b = 2^(S_b - m_b) into shared memory.
//   4. [0] O_L = 2^(m_a - m_b) O_L + P_b M_b[:, L]; [1] the same for O_R. m = m_b.
// P M reads P from shared memory in both warpgroups (wgmma's A operand there, not registers:
// the warpgroup that computes P_b does so while its P_a M product holds O's 128 registers).
// Both halves see the same rounded P of every tile. Each warpgroup sums its own tiles' rows of P
// (rescaled as its O is), and the two sums are added at the end. M tiles stream through two
// buffers (even tiles, odd tiles): as soon as a warpgroup's last product on a buffer is done it
// loads its half of D of the next tile there; the other half comes from the other warpgroup, and
// four block-wide named barriers per pair order it all (A: tile a landed; B: tile b landed; X:
// m_a and P_a written; Y: m_b and P_b written). With an odd tile count the last pair's b is past
// S: loaded as zeros and masked, it changes nothing.
// Shared memory at D = 512: h 64 KB + 2 x 64 KB of M + 2 x 8 KB of P + 2 x 256 B of row maxima +
// 2 KB for the final sums + 1 KB of alignment = 211.5 KB (D = 256: 115.5 KB; D = 128: 67.5 KB).
constexpr int kSeesawPBytes = 64 * 64 * 2;                      // one tile of P, a 64-row panel
constexpr int kSeesawStatBytes = 2 * 64 * 4 + 2 * 128 * 2 * 4;  // m_a, m_b; the final l parts
constexpr int fwd_wgmma_seesaw_smem_bytes(int dim) {
  return 1024 + 3 * tile_bytes(dim) + 2 * kSeesawPBytes + kSeesawStatBytes;
}

// The shared memory of the kernel p selects.
int fwd_wgmma_smem(const RetrievalFwdParams& p) {
  const int dim = static_cast<int>(p.dim);
  switch (p.wgmma_forward) {
    case WgmmaForward::kLockstep:
      return fwd_wgmma_smem_bytes(dim);
    case WgmmaForward::kSeesaw:
      return fwd_wgmma_seesaw_smem_bytes(dim);
    default:
      return fwd_wgmma_pipe_smem_bytes(dim);
  }
}

// The block-wide (256-thread) named barriers of a pair of tiles.
enum SeesawBarrier : int { kTileALanded = 3, kTileBLanded = 4, kPaWritten = 5, kPbWritten = 6 };

template <typename T, int kDim>
__global__ void __launch_bounds__(kWgThreads, 1)
    retrieval_fwd_wgmma_seesaw_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                                      T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                                      int slots, float scale_log2) {
#if GAM_WGMMA_COMPILED
  constexpr int kHalf = kDim / 2;  // output columns per warpgroup: the P M product's N
  constexpr int kAcc = kDim / 4;   // its fp32 accumulators per thread
  constexpr int kTileBytes = tile_bytes(kDim);
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  unsigned char* hs = smem + pad;
  unsigned char* ms = hs + kTileBytes;      // buffer 0 (even tiles), then buffer 1
  unsigned char* ps = ms + 2 * kTileBytes;  // P_a, then P_b
  float* m_shared = reinterpret_cast<float*>(ps + 2 * kSeesawPBytes);  // m_a[64], m_b[64]
  float* l_shared = m_shared + 2 * 64;                                 // [warpgroup][thread][2]
  const uint32_t hs_addr = window + pad, ms_addr = hs_addr + kTileBytes;
  const uint32_t ps_addr = ms_addr + 2 * kTileBytes;
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127, warp = t >> 5, g = (t & 31) >> 2,
            q = t & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kWgRows;
  const int64_t rows_left = rows - row0;
  const int ntiles = (slots + kWgSlots - 1) / kWgSlots;
  const int npairs = (ntiles + 1) / 2;
  // This warpgroup's half of D: the columns it loads and the columns of O it owns.
  const uint32_t half = (kDim / 128) * wg * kPanelBytes;
  auto load_half = [&](int j) {  // this warpgroup's half of tile j into buffer j % 2
    if (j < 2 * npairs)          // the tile past S (odd counts): zeros, from a valid address
      cp_async_rows_to_panels<128>(ms + (j & 1) * kTileBytes,
                                   mem + (j < ntiles ? int64_t(j) * kWgSlots * kDim : 0),
                                   slots - int64_t(j) * kWgSlots, kDim, t, 2, wg);
    cp_async_commit();  // a group per tile, empty past the last pair, so the counts below hold
  };

  // h and tiles 0 and 1, each warpgroup its half of the columns.
  cp_async_rows_to_panels<128>(hs, h + row0 * kDim, rows_left, kDim, t, 2, wg);
  load_half(0);
  load_half(1);

  float o[kAcc];
#pragma unroll
  for (int v = 0; v < kAcc; ++v) o[v] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float s[32];
  const int row_lo = 16 * warp + g;  // the rows of this thread's fragments: row_lo, row_lo + 8

  // S_j = h M_j^T over the whole depth, issued (committed, not waited for).
  auto issue_scores = [&](int j) {
    const uint32_t mt = ms_addr + (j & 1) * kTileBytes;
    wgmma_fence_registers(s);  // the first product overwrites s (accumulate off)
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kPanelBytes + (kk & 3) * 32;
      wgmma_mma<T, 64, false, false>(s, swizzle128_descriptor(hs_addr + off, 16),
                                     swizzle128_descriptor(mt + off, 16), kk > 0);
    }
    wgmma_commit();
  };
  // The row maxima of tile j's scores over the quad (slots past S masked to -inf, scaled to the
  // log2 domain in place), raised to at least `floor`.
  auto tile_max = [&](int j, const float (&floor)[2], float (&mx)[2]) {
    mx[0] = floor[0];
    mx[1] = floor[1];
    scale_mask_max(s, j * kWgSlots, slots, q, scale_log2, mx);
#pragma unroll
    for (int r = 0; r < 2; ++r) mx[r] = quad_max(mx[r]);
  };
  // P = 2^(s - mx) rounded to T into P panel `which` (0: P_a, 1: P_b), the A operand of both
  // warpgroups' products (kept out of registers: the warpgroup that computes P_b does so while
  // its P_a M product holds O); rs gets the rounded values' row sums.
  auto make_p = [&](const float (&mx)[2], float (&rs)[2], int which) {
    unsigned char* panel = ps + which * kSeesawPBytes;
    rs[0] = rs[1] = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      // s[2 i], s[2 i + 1]: row row_lo + 8 (i % 2), slots 8 (i / 2) + 2 q and the next.
      *reinterpret_cast<uint32_t*>(panel + swizzle128_offset(row_lo + 8 * (i & 1), i >> 1) +
                                   4 * q) =
          probabilities<T>(s[2 * i], s[2 * i + 1], mx[i & 1], rs[i & 1]);
    }
    fence_proxy_async_shared();  // the P panel, for the wgmma of both warpgroups
  };
  // This thread's two rows of m (m_a: which 0, m_b: 1) for the other warpgroup, by one lane of
  // the quad (all four hold them).
  auto publish_max = [&](const float (&m)[2], int which) {
    if (q == 0) {
      m_shared[64 * which + row_lo] = m[0];
      m_shared[64 * which + row_lo + 8] = m[1];
    }
  };
  auto rescale_o = [&](const float (&f)[2]) {
    if (f[0] != 1.f || f[1] != 1.f) {
#pragma unroll
      for (int v = 0; v < kAcc; ++v) o[v] *= f[(v >> 1) & 1];
    }
  };
  // O += P_j M_j[:, half], P_j from panel `which`, M read MN-major.
  auto issue_pm = [&](int j, int which) {
    const uint32_t mt = ms_addr + (j & 1) * kTileBytes + half;
    const uint32_t pa = ps_addr + which * kSeesawPBytes;
    wgmma_fence_registers(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_mma<T, kHalf, false, true>(o, swizzle128_descriptor(pa + kk * 32, 16),
                                       swizzle128_descriptor(mt + kk * 16 * 128, kPanelBytes),
                                       true);
    wgmma_commit();
  };
  auto wait_all = [&] {
    wgmma_wait<0>();
    wgmma_fence_registers(o);
    wgmma_fence_registers(s);
  };

  for (int i = 0; i < npairs; ++i) {
    const int a = 2 * i, b = a + 1;
    // This warpgroup's half of tile a landed (its group of two back), then the other's (A).
    cp_async_wait<1>();
    fence_proxy_async_shared();
    named_barrier_sync(kTileALanded, kWgThreads);
    if (wg == 0) {
      issue_scores(a);
      cp_async_wait<0>();
      fence_proxy_async_shared();
      named_barrier_sync(kTileBLanded, kWgThreads);
      wgmma_wait<0>();
      wgmma_fence_registers(s);
      float m_a[2], rs[2], alpha[2];
      tile_max(a, m_run, m_a);
#pragma unroll
      for (int r = 0; r < 2; ++r) alpha[r] = fast_exp2(m_run[r] - m_a[r]);
      publish_max(m_a, 0);
      make_p(m_a, rs, 0);
      named_barrier_sync(kPaWritten, kWgThreads);
      rescale_o(alpha);
#pragma unroll
      for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
      issue_pm(a, 0);
      named_barrier_sync(kPbWritten, kWgThreads);
      float m_b[2], beta[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        m_b[r] = m_shared[64 + row_lo + 8 * r];
        beta[r] = fast_exp2(m_a[r] - m_b[r]);
        m_run[r] = m_b[r];
        l_run[r] *= beta[r];
      }
      wait_all();
      load_half(a + 2);  // P_a M_a[:, L] done: the L half of buffer 0 is free
      rescale_o(beta);
      issue_pm(b, 1);
      wait_all();
      load_half(b + 2);
    } else {
      cp_async_wait<0>();
      fence_proxy_async_shared();
      named_barrier_sync(kTileBLanded, kWgThreads);
      issue_scores(b);
      wgmma_wait<0>();
      wgmma_fence_registers(s);
      float mx_b[2];
      const float none[2] = {-INFINITY, -INFINITY};
      tile_max(b, none, mx_b);
      named_barrier_sync(kPaWritten, kWgThreads);
      float m_a[2], m_b[2], alpha[2], beta[2], rs[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        m_a[r] = m_shared[row_lo + 8 * r];
        m_b[r] = fmaxf(m_a[r], mx_b[r]);
        alpha[r] = fast_exp2(m_run[r] - m_a[r]);
        beta[r] = fast_exp2(m_a[r] - m_b[r]);
        m_run[r] = m_b[r];
        l_run[r] *= alpha[r];
      }
      rescale_o(alpha);
      issue_pm(a, 0);
      // P_b while P_a M_a[:, R] runs (s is not the product's register).
      publish_max(m_b, 1);
      make_p(m_b, rs, 1);
      named_barrier_sync(kPbWritten, kWgThreads);
      wait_all();
      load_half(a + 2);  // P_a M_a[:, R] done: the R half of buffer 0 is free
      rescale_o(beta);
#pragma unroll
      for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * beta[r] + rs[r];
      issue_pm(b, 1);
      wait_all();
      load_half(b + 2);
    }
  }
  cp_async_wait<0>();

  // l over both warpgroups' tiles, added in the same order in both; then O / l.
  l_shared[(wg * 128 + t) * 2] = l_run[0];
  l_shared[(wg * 128 + t) * 2 + 1] = l_run[1];
  __syncthreads();  // also: every product of both warpgroups is done, so h's space is free
#pragma unroll
  for (int r = 0; r < 2; ++r) l_run[r] = l_shared[t * 2 + r] + l_shared[(128 + t) * 2 + r];
  wgmma_epilogue<T, kDim>(o, l_run, m_run, hs, out, lse, row0, rows_left);
#else
  (void)h, (void)mem, (void)out, (void)lse, (void)rows, (void)slots, (void)scale_log2;
  __trap();
#endif
}

__global__ void wgmma_probe_kernel(int* compiled) { *compiled = GAM_WGMMA_COMPILED; }

}  // namespace

bool retrieval_fwd_wgmma_applies(const RetrievalFwdParams& p) {
  // 16-byte copies in and out: h, M and out must be 16-byte aligned (a tensor that starts inside
  // a larger allocation may not be; null pointers, as backend_info passes, count as aligned).
  const auto bits = reinterpret_cast<uintptr_t>(p.h) | reinterpret_cast<uintptr_t>(p.memory) |
                    reinterpret_cast<uintptr_t>(p.out);
  const bool dim_ok = p.dim == 128 || p.dim == 256 || p.dim == 512;
  return p.dtype != DType::kFloat32 && dim_ok && p.slots >= 1 && p.sm == 90 &&
         p.max_smem_bytes >= fwd_wgmma_smem(p) && bits % 16 == 0;
}

void launch_wgmma_probe(int* compiled, cudaStream_t stream) {
  gam_launch("wgmma_probe_kernel", wgmma_probe_kernel, dim3(1), dim3(1), 0, stream, compiled);
}

void launch_retrieval_fwd_wgmma(const RetrievalFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>((p.rows + kWgRows - 1) / kWgRows));
  const float scale_log2 = p.scale * kLog2e;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      static_switch<128, 256, 512>(
          [&](int d) { return d == p.dim; },
          [&](auto d) {
            constexpr int kDim = decltype(d)::value;
            auto kernel = retrieval_fwd_wgmma_pipelined_kernel<T, kDim>;
            const char* name = "retrieval_fwd_wgmma_pipelined_kernel";
            if (p.wgmma_forward == WgmmaForward::kLockstep) {
              kernel = retrieval_fwd_wgmma_kernel<T, kDim>;
              name = "retrieval_fwd_wgmma_kernel";
            } else if (p.wgmma_forward == WgmmaForward::kSeesaw) {
              kernel = retrieval_fwd_wgmma_seesaw_kernel<T, kDim>;
              name = "retrieval_fwd_wgmma_seesaw_kernel";
            }
            const int smem = fwd_wgmma_smem(p);
            GAM_CUDA_CHECK(
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            gam_launch(name, kernel, grid, dim3(kWgThreads), static_cast<size_t>(smem), stream,
                       static_cast<const T*>(p.h), static_cast<const T*>(p.memory),
                       static_cast<T*>(p.out), p.lse, p.rows, static_cast<int>(p.slots),
                       scale_log2);
          },
          [&] {
            throw std::runtime_error("launch_retrieval_fwd_wgmma: D must be 128, 256 or 512");
          });
    }
  });
}

std::string describe_retrieval_fwd_wgmma(const RetrievalFwdParams& p) {
  const int dim = static_cast<int>(p.dim);
  if (p.wgmma_forward == WgmmaForward::kSeesaw) {
    return std::string("wgmma: retrieval_fwd_wgmma_seesaw_kernel<") + type_name(p.dtype) + ", " +
           std::to_string(dim) + ">, 64 rows x 64 slots, 2 warpgroups (" + std::to_string(dim / 2) +
           " columns of O each) taking the scores of alternate tiles over all of D, P handed " +
           "over in shared memory, 2 tile buffers, " + std::to_string(fwd_wgmma_smem(p)) +
           " bytes of shared memory";
  }
  if (p.wgmma_forward == WgmmaForward::kLockstep) {
    return std::string("wgmma: retrieval_fwd_wgmma_kernel<") + type_name(p.dtype) + ", " +
           std::to_string(dim) + ">, 64 rows x 64 slots, 2 warpgroups (" + std::to_string(dim / 2) +
           " columns of D each) in lockstep, 2 stages, " + std::to_string(fwd_wgmma_smem(p)) +
           " bytes of shared memory";
  }
  return std::string("wgmma: retrieval_fwd_wgmma_pipelined_kernel<") + type_name(p.dtype) + ", " +
         std::to_string(dim) + ">, 64 rows x 32 slots, 2 warpgroups (" + std::to_string(dim / 2) +
         " columns of D each), the next tile's scores in flight through the softmax, 4 stages, " +
         std::to_string(fwd_wgmma_smem(p)) + " bytes of shared memory";
}

}  // namespace cuda
}  // namespace gam
