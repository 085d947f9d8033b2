// Memory retrieval forward on Hopper's warpgroup MMA (sm_90a; GAM_EXT_RETRIEVAL=wgmma): g =
// softmax(scale * h M^T) M and the fp32 lse, for fp16 / bf16 at D = 512, the scores never in
// global memory. The first kernel on warpgroup_mma.cuh; not measured on a GPU yet.
//
// A block of two warpgroups owns 64 rows. h (64 x 512) is loaded once; M streams through two
// stages of 64 slots x 512 columns. Both operands sit in shared memory as eight 128-byte-swizzled
// panels of 64 columns (8 KB each), the layout wgmma's descriptors read K-major for the scores
// and MN-major for P M, so one M tile serves both products. Per M tile, warpgroup w (columns
// 256 w .. 256 w + 255 of D):
//   * S_w = h[:, half w] M[:, half w]^T: 16 wgmma m64n64k16 from shared memory, then the two
//     partial score tiles are added through shared memory (16 KB each, fixed order), so both
//     warpgroups hold the same 64 x 64 scores without computing them twice;
//   * online softmax in registers (each thread two rows, the 4 lanes of a quad sharing a row),
//     exp2 with the scale folded in, P rounded to T;
//   * O_w = alpha O_w + P M[:, half w]: 4 wgmma m64n256k16 with P as the A registers (the score
//     accumulators, packed) and the M tile read MN-major: 128 fp32 accumulators per thread.
// The output goes through shared memory (h's space) to 16-byte global stores.
// Shared memory: h 64 KB + 2 x 64 KB of M + 32 KB of partial scores + 1 KB of alignment =
// 225 KB, one block per SM.
#include <cmath>
#include <string>

#include "common.cuh"
#include "launchers.h"
#include "retrieval_common.cuh"
#include "warp_mma.cuh"
#include "warpgroup_mma.cuh"

namespace gam {
namespace cuda {
namespace {

constexpr int kWgDim = 512;                    // the D this kernel takes
constexpr int kWgRows = 64;                    // rows per block: one m64 tile
[[maybe_unused]] constexpr int kWgSlots = 64;  // slots per M tile
constexpr int kWgThreads = 256;                // two warpgroups, one half of D each
constexpr int kPanelBytes = 64 * 128;          // 64 rows x 64 16-bit columns
constexpr int kTileBytes = 8 * kPanelBytes;    // 64 rows x 512 columns
constexpr int kScoreBytes = 2 * 64 * 64 * 4;   // both warpgroups' partial scores
constexpr int kWgSmemBytes = 1024 + 3 * kTileBytes + kScoreBytes;

// Byte offset of 16-byte chunk c (0..63) of row r (0..63) in a tile: panel c / 8, rows of 128
// bytes, the chunk's index in its row XORed with r % 8 (the 128-byte swizzle, panels 1024-byte
// aligned).
[[maybe_unused]] __device__ __forceinline__ uint32_t tile_chunk(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * kPanelBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Rows [0, 64) of a (rows_left x 512) matrix into a tile; rows past rows_left are zero-filled.
template <typename T>
__device__ __forceinline__ void load_tile(unsigned char* dst, const T* src, int64_t rows_left,
                                          int tid) {
  for (int q = tid; q < 64 * 64; q += kWgThreads) {
    const int r = q >> 6, c = q & 63;
    const bool ok = r < rows_left;
    cp_async_16(dst + tile_chunk(r, c), src + (ok ? int64_t(r) * kWgDim + c * 8 : 0), ok);
  }
}

[[maybe_unused]] __device__ __forceinline__ uint64_t panel_desc(uint32_t addr, uint32_t lbo) {
  return wgmma_descriptor(addr, lbo, 1024, WgmmaSwizzle::k128B);
}

template <typename T>
__global__ void __launch_bounds__(kWgThreads, 1)
    retrieval_fwd_wgmma_kernel(const T* __restrict__ h, const T* __restrict__ mem,
                               T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                               int slots, float scale_log2) {
#if GAM_WGMMA_COMPILED
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  unsigned char* hs = smem + pad;
  unsigned char* ms = hs + kTileBytes;
  float4* xs = reinterpret_cast<float4*>(ms + 2 * kTileBytes);
  const uint32_t hs_addr = window + pad, ms_addr = hs_addr + kTileBytes;
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
  const int warp = t >> 5, g = (t & 31) >> 2, q = t & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kWgRows;
  const int64_t rows_left = rows - row0;
  const int ntiles = (slots + kWgSlots - 1) / kWgSlots;

  load_tile(hs, h + row0 * kWgDim, rows_left, tid);
  load_tile(ms, mem, slots, tid);
  cp_async_commit();  // h and M tile 0
  if (ntiles > 1)
    load_tile(ms + kTileBytes, mem + int64_t(kWgSlots) * kWgDim, slots - kWgSlots, tid);
  cp_async_commit();  // M tile 1 (or nothing)

  float o[128];
#pragma unroll
  for (int v = 0; v < 128; ++v) o[v] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const uint32_t half = 4u * wg * kPanelBytes;  // this warpgroup's 4 panels (256 columns)

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait<1>();
    fence_proxy_async_shared();  // the cp.async writes, for wgmma's reads
    __syncthreads();             // tile j (and h) landed for every thread
    const uint32_t mt = ms_addr + (j & 1) * kTileBytes;

    // Partial scores over this warpgroup's 256 columns: 16 k steps of 16 columns.
    float s[32];
#pragma unroll
    for (int v = 0; v < 32; ++v) s[v] = 0.f;
    wgmma_fence_registers(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const uint32_t off = half + (kk >> 2) * kPanelBytes + (kk & 3) * 32;
      wgmma_mma<T, 64, false, false>(s, panel_desc(hs_addr + off, 16), panel_desc(mt + off, 16),
                                     kk > 0);
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

    // Online softmax (log2 domain; slots past S masked). s[v]: row 16 warp + g + 8 ((v / 2) % 2),
    // slot 8 (v / 4) + 2 q + v % 2 of the tile.
    const int sbase = j * kWgSlots;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int v = 0; v < 32; ++v) {
      const bool ok = sbase + 8 * (v >> 2) + 2 * q + (v & 1) < slots;
      s[v] = ok ? s[v] * scale_log2 : -INFINITY;
      mx[(v >> 1) & 1] = fmaxf(mx[(v >> 1) & 1], s[v]);
    }
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
    for (int v = 0; v < 128; ++v) o[v] *= alpha[(v >> 1) & 1];

    // O += P M[:, half]: M read MN-major, 16 slots (2 KB of rows) per k step, the 4 panels of
    // the half LBO apart.
    wgmma_fence_registers(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_mma_regs<T, 256, true>(o, p[kk], panel_desc(mt + half + kk * 16 * 128, kPanelBytes),
                                   true);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_registers(o);

    __syncthreads();  // both warpgroups are done with tile j and the partial scores
    if (j + 2 < ntiles) {
      load_tile(ms + (j & 1) * kTileBytes, mem + int64_t(j + 2) * kWgSlots * kWgDim,
                slots - int64_t(j + 2) * kWgSlots, tid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Epilogue: l over the quad, lse (warpgroup 0), O / l into h's space, 16-byte stores.
  float inv[2];
  online_softmax_finish(l_run, m_run, inv, lse + row0, 16 * warp + g, rows_left, wg == 0 && q == 0);
#pragma unroll
  for (int v = 0; v < 128; v += 2) {
    const int rr = 16 * warp + g + 8 * ((v >> 1) & 1);
    const int col = 256 * wg + 8 * (v >> 2) + 2 * q;
    const float f = inv[(v >> 1) & 1];
    *reinterpret_cast<uint32_t*>(hs + tile_chunk(rr, col >> 3) + (col & 7) * 2) =
        pack2<T>(o[v] * f, o[v + 1] * f);
  }
  __syncthreads();
  for (int i = tid; i < 64 * 64; i += kWgThreads) {
    const int r = i >> 6, c = i & 63;
    if (r < rows_left) {
      *reinterpret_cast<uint4*>(out + (row0 + r) * kWgDim + c * 8) =
          *reinterpret_cast<const uint4*>(hs + tile_chunk(r, c));
    }
  }
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
  return p.dtype != DType::kFloat32 && p.dim == kWgDim && p.slots >= 1 && p.sm == 90 &&
         p.max_smem_bytes >= kWgSmemBytes && bits % 16 == 0;
}

void launch_wgmma_probe(int* compiled, cudaStream_t stream) {
  gam_launch("wgmma_probe_kernel", wgmma_probe_kernel, dim3(1), dim3(1), 0, stream, compiled);
}

void launch_retrieval_fwd_wgmma(const RetrievalFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>((p.rows + kWgRows - 1) / kWgRows));
  const float scale_log2 = p.scale * kLog2e;
  if (p.dtype == DType::kFloat16) {
    auto kernel = retrieval_fwd_wgmma_kernel<__half>;
    GAM_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgSmemBytes));
    gam_launch("retrieval_fwd_wgmma_kernel<__half>", kernel, grid, dim3(kWgThreads), kWgSmemBytes,
               stream, static_cast<const __half*>(p.h), static_cast<const __half*>(p.memory),
               static_cast<__half*>(p.out), p.lse, p.rows, static_cast<int>(p.slots), scale_log2);
  } else {
    auto kernel = retrieval_fwd_wgmma_kernel<__nv_bfloat16>;
    GAM_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgSmemBytes));
    gam_launch("retrieval_fwd_wgmma_kernel<__nv_bfloat16>", kernel, grid, dim3(kWgThreads),
               kWgSmemBytes, stream, static_cast<const __nv_bfloat16*>(p.h),
               static_cast<const __nv_bfloat16*>(p.memory), static_cast<__nv_bfloat16*>(p.out),
               p.lse, p.rows, static_cast<int>(p.slots), scale_log2);
  }
}

std::string describe_retrieval_fwd_wgmma(const RetrievalFwdParams& p) {
  return std::string("wgmma: retrieval_fwd_wgmma_kernel<") + type_name(p.dtype) +
         ">, 64 rows x 64 slots, 2 warpgroups (256 columns of D each), 2 stages, " +
         std::to_string(kWgSmemBytes) + " bytes of shared memory";
}

}  // namespace cuda
}  // namespace gam
