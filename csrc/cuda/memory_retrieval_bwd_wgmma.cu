// Memory retrieval backward on Hopper's warpgroup MMA (sm_90a; GAM_EXT_RETRIEVAL=wgmma): the
// score part of the backward in one kernel, for fp16 / bf16 at D = 64 .. 512 (D % 64 == 0). Per
// row and slot it computes s = h.M and dP = grad_out.M with wgmma, then p = exp(scale s - lse)
// and scale * dS = scale p (dP - delta) with delta = rowsum(grad_out * out), and writes P and
// scale * dS once, rounded to T, with the exact delta = rowsum(p dP) / rowsum(p) summed on the
// way (csrc/cuda/README.md, "Numerics of delta"): a warpgroup's last tile waits in registers for
// it, its earlier ones (S > 256) are corrected at the end. The scores and dP never reach global
// memory: the gemm path writes both as fp32 from cuBLAS and reads them back (26 bytes per score
// in all against this path's 10, up to 16 with the correction's second look at P and dS). cuBLAS
// then computes dh = (scale dS) M and dM = (scale dS)^T h + P^T grad_out, as on the gemm path.
// Measured on an H200: csrc/cuda/README.md, "The wgmma kernels on the H200".
//
// A block of two warpgroups owns 64 rows. h and grad_out (64 x D each) are loaded once into
// shared memory as D / 64 panels of 64 columns (128-byte rows, 128-byte swizzle), the K-major
// layout wgmma reads. Warpgroup w takes the 128-slot tiles w, w + 2, ... of the bank; per tile
// it streams M in chunks of 128 slots x 64 columns through its own ring of 3 stages (so the two
// warpgroups never wait on each other) and per chunk issues 4 + 4 wgmma m64n128k16 (scores and
// dP, the same M chunk as B). The 64 + 64 fp32 accumulators per thread then become P and
// scale * dS in registers, stored straight to global memory, 16 bytes (8 slots of a row) per
// store after a transpose across each quad.
// Shared memory at D = 512: h and grad_out 128 KB + 2 x 3 x 16 KB of M + lse and delta + 1 KB of
// alignment = 225.5 KB, one block per SM.
#include <cmath>
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

constexpr int kBwRows = 64;                              // rows per block: one m64 tile
constexpr int kBwSlots = 128;                            // slots per warpgroup tile (n128)
constexpr int kBwThreads = 256;                          // two warpgroups
constexpr int kBwStages = 3;                             // M chunks in flight per warpgroup
constexpr int kBwMaxDim = 512;                           // h and grad_out resident: 256 D bytes
constexpr int kBwChunkBytes = kBwSlots * 128;            // 128 slots x 64 columns
constexpr int kBwRingBytes = kBwStages * kBwChunkBytes;  // one warpgroup's ring

int bwd_wgmma_smem_bytes(int64_t dim) {
  return static_cast<int>(1024 + 2 * (dim / 64) * kPanelBytes + 2 * kBwRingBytes +
                          2 * kBwRows * sizeof(float));
}

// Chunk (slots s0 .. s0 + 127, columns 64 p .. 64 p + 63) of M into a ring stage, by the 128
// threads of one warpgroup (t = its thread index); slots past `slots` are zero-filled.
template <typename T>
__device__ __forceinline__ void load_chunk(unsigned char* dst, const T* mem, int slots, int dim,
                                           int s0, int p, int t) {
#pragma unroll
  for (int i = 0; i < kBwSlots * 8 / 128; ++i) {
    const int q = t + 128 * i, r = q >> 3, c = q & 7;
    const bool ok = s0 + r < slots;
    cp_async_16(dst + swizzle128_offset(r, c),
                mem + (ok ? int64_t(s0 + r) * dim + 64 * p + 8 * c : 0), ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBwThreads, 1)
    retrieval_bwd_scores_wgmma_kernel(const T* __restrict__ grad_out, const T* __restrict__ h,
                                      const T* __restrict__ mem, const T* __restrict__ out,
                                      const float* __restrict__ lse, T* __restrict__ p_out,
                                      T* __restrict__ ds_out, int64_t rows, int slots, int ld,
                                      int dim, float scale, float scale_log2) {
#if GAM_WGMMA_COMPILED
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  const int panels = dim / 64;
  unsigned char* hs = smem + pad;
  unsigned char* gs = hs + panels * kPanelBytes;
  unsigned char* ring = gs + panels * kPanelBytes;
  float* lse2_s = reinterpret_cast<float*>(ring + 2 * kBwRingBytes);
  float* delta_s = lse2_s + kBwRows;
  const uint32_t hs_addr = window + pad, gs_addr = hs_addr + panels * kPanelBytes;
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
  const int warp = t >> 5, lane = t & 31, g = lane >> 2, q = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kBwRows;
  const int64_t rows_left = rows - row0;
  unsigned char* my_ring = ring + wg * kBwRingBytes;
  const uint32_t ring_addr = hs_addr + 2 * panels * kPanelBytes + wg * kBwRingBytes;
  // This warpgroup's tiles: w, w + 2, ...; chunk c is panel c % panels of tile c / panels.
  const int tiles = (slots + kBwSlots - 1) / kBwSlots;
  const int my_tiles = (tiles - wg + 1) / 2;
  const int chunks = my_tiles * panels;
  auto chunk_slot0 = [&](int c) { return (2 * (c / panels) + wg) * kBwSlots; };

  // delta = rowsum(grad_out * out) for rows 8 w' .. 8 w' + 7 of warp w' of the block. The warp's
  // rows of `out` are loaded first, all at once (a lane's 16-byte chunks lane and lane + 32 of
  // each row), through ld_global_16 and before the copies are issued, so that ptxas keeps them
  // there: they cost one memory latency, under the copies'. grad_out is read from its panels once
  // they land. (The first H200 profile had this prologue, then a row at a time, as the kernel's top
  // stall.)
  constexpr int kLaneChunks = kBwMaxDim / 8 / 32;
  const int row_chunks = dim / 8, warp_row0 = 8 * (tid >> 5);
  uint4 out_chunks[8][kLaneChunks];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int k = 0; k < kLaneChunks; ++k) {
      const int r = warp_row0 + i, c = lane + 32 * k;
      out_chunks[i][k] = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_left && c < row_chunks)
        out_chunks[i][k] = ld_global_16(out + (row0 + r) * dim + 8 * c);
    }
  }
  const float lse_row = tid < kBwRows && tid < rows_left ? lse[row0 + tid] : 0.f;
  cp_async_rows_to_panels<kBwThreads>(hs, h + row0 * dim, rows_left, dim, tid);
  cp_async_rows_to_panels<kBwThreads>(gs, grad_out + row0 * dim, rows_left, dim, tid);
  cp_async_commit();  // h and grad_out
  for (int c = 0; c < kBwStages; ++c) {
    if (c < chunks)
      load_chunk(my_ring + c * kBwChunkBytes, mem, slots, dim, chunk_slot0(c), c % panels, t);
    cp_async_commit();  // chunk c (or nothing)
  }
  cp_async_wait<kBwStages>();  // h and grad_out
  fence_proxy_async_shared();
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = warp_row0 + i;
    float acc = 0.f;  // rows past rows_left: grad_out's panels are zero-filled there
#pragma unroll
    for (int k = 0; k < kLaneChunks; ++k) {
      const int c = lane + 32 * k;
      if (c < row_chunks) {
        float a[8], b[8];
        load_f32<T, 8>(reinterpret_cast<const T*>(gs + swizzle128_tile_offset(r, c)), a);
        load_f32<T, 8>(reinterpret_cast<const T*>(&out_chunks[i][k]), b);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(a[e], b[e], acc);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta_s[r] = acc;
  }
  if (tid < kBwRows) lse2_s[tid] = lse_row * kLog2e;  // lse in log2 units
  __syncthreads();

  // This thread's rows (16 warp + g and + 8) of the 64.
  const int r_lo = 16 * warp + g;
  const float lse2[2] = {lse2_s[r_lo], lse2_s[r_lo + 8]};
  const float delta[2] = {delta_s[r_lo], delta_s[r_lo + 8]};
  // The thread's parts of rowsum(p) and rowsum(p dP), summed in fp32 for the exact delta.
  float p_sum[2] = {0.f, 0.f}, pdp_sum[2] = {0.f, 0.f};
  float s[64], dp[64];
  // Stores a tile's P and scale dS = scale (p dP - p delta), from p in s and p dP in dp. Element
  // v of the accumulators is row r_lo + 8 ((v / 2) % 2), slot s0 + 8 (v / 4) + 2 q + v % 2, so a
  // quad holds each group of 8 slots of a row as 4 pairs; quad_transpose turns 4 groups' pairs
  // into one group's 8 slots per lane, stored as 16 bytes (rows ld % 8 == 0 elements apart). A
  // group starting below S is stored whole: slots S .. S rounded up to 8 of the last tile get
  // zeros (p = p dP = 0 there), so a product that reads a few columns past S (times zero-padded
  // rows of its other operand, as the CPU's bf16 GEMM does under the emulator) does not meet NaN
  // there.
  auto store_tile = [&](int s0, const float (&row_delta)[2]) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int r = r_lo + 8 * hi;
#pragma unroll
      for (int j0 = 0; j0 < 16; j0 += 4) {
        uint32_t pw[4], dw[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int v = 4 * (j0 + k) + 2 * hi;
          pw[k] = pack2<T>(s[v], s[v + 1]);
          dw[k] = pack2<T>(scale * (dp[v] - s[v] * row_delta[hi]),
                           scale * (dp[v + 1] - s[v + 1] * row_delta[hi]));
        }
        quad_transpose(pw, q);
        quad_transpose(dw, q);
        const int slot = s0 + 8 * (j0 + q);
        if (r < rows_left && slot < slots) {
          const int64_t at = (row0 + r) * ld + slot;
          *reinterpret_cast<uint4*>(p_out + at) = make_uint4(pw[0], pw[1], pw[2], pw[3]);
          *reinterpret_cast<uint4*>(ds_out + at) = make_uint4(dw[0], dw[1], dw[2], dw[3]);
        }
      }
    }
  };
  for (int c0 = 0; c0 < chunks; c0 += panels) {  // one 128-slot tile per trip
    for (int p = 0; p < panels; ++p) {
      const int c = c0 + p;
      // Chunk c landed for every thread of the warpgroup, and chunk c - 1's products are
      // retired in all four warps (each waited for them), so its stage can be refilled.
      // Committed after chunk c: kBwStages - 2 groups for c >= 1 (one per trip, the refill being
      // one behind), kBwStages - 1 for c = 0, which therefore also waits for chunk 1.
      cp_async_wait<kBwStages - 2>();
      fence_proxy_async_shared();
      named_barrier_sync(1 + wg, 128);
      if (c >= 1) {
        const int next = c - 1 + kBwStages;
        if (next < chunks) {
          load_chunk(my_ring + ((c - 1) % kBwStages) * kBwChunkBytes, mem, slots, dim,
                     chunk_slot0(next), next % panels, t);
        }
        cp_async_commit();
      }
      const uint32_t stage = ring_addr + (c % kBwStages) * kBwChunkBytes;
      wgmma_fence_registers(s);
      wgmma_fence_registers(dp);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t k_off = static_cast<uint32_t>(p * kPanelBytes + kk * 32);
        const uint64_t b = swizzle128_descriptor(stage + kk * 32, 16);
        wgmma_mma<T, 128, false, false>(s, swizzle128_descriptor(hs_addr + k_off, 16), b,
                                        p > 0 || kk > 0);
        wgmma_mma<T, 128, false, false>(dp, swizzle128_descriptor(gs_addr + k_off, 16), b,
                                        p > 0 || kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_registers(s);
      wgmma_fence_registers(dp);
    }

    // p and p dP of the tile in place of its scores and dP, and the row sums of both. The
    // warpgroup's last tile stays in registers and is stored once the exact delta is known,
    // below; the others are stored now, with delta_G.
#pragma unroll
    for (int v = 0; v < 64; v += 2) {
      const int hi = (v >> 1) & 1;
      const int slot = chunk_slot0(c0) + 8 * (v >> 2) + 2 * q;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = slot + e < slots ? fast_exp2(s[v + e] * scale_log2 - lse2[hi]) : 0.f;
        const float pdp = pv * dp[v + e];  // 0 past S: pv = 0 there, and dp too (M zero-filled)
        p_sum[hi] += pv;
        pdp_sum[hi] += pdp;
        s[v + e] = pv;
        dp[v + e] = pdp;
      }
    }
    if (c0 + panels < chunks) store_tile(chunk_slot0(c0), delta);
  }
  cp_async_wait<0>();
  // Where S has an odd number of tiles, warpgroup 1 has one tile less: it passes the barriers of
  // the missing chunks too, so that both warpgroups reach the barriers below having passed the
  // same number of named barriers. The hardware needs no such thing; compute-sanitizer's
  // racecheck reported the exchange below as a race without it.
  for (int c = chunks; c < (tiles + 1) / 2 * panels; ++c) named_barrier_sync(1 + wg, 128);

  // The sweep used delta from G as stored (rounded to T); rowsum(p dP) / rowsum(p) is the exact
  // one (csrc/cuda/README.md, "Numerics of delta"). Both warpgroups' parts meet in the M ring,
  // free once every thread is past its sweep (the first barrier), added in a fixed order.
  float* parts = reinterpret_cast<float*>(ring);  // [warpgroup][p, p dP][row]
  const float part[2][2] = {{quad_sum(p_sum[0]), quad_sum(p_sum[1])},
                            {quad_sum(pdp_sum[0]), quad_sum(pdp_sum[1])}};
  __syncthreads();
  if (q == 0) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      parts[(2 * wg + k) * kBwRows + r_lo] = part[k][0];
      parts[(2 * wg + k) * kBwRows + r_lo + 8] = part[k][1];
    }
  }
  __syncthreads();
  float exact_delta[2], corr[2];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int r = r_lo + 8 * hi;
    const float p_row = parts[r] + parts[2 * kBwRows + r];
    const float pdp_row = parts[kBwRows + r] + parts[3 * kBwRows + r];
    exact_delta[hi] = pdp_row / p_row;
    corr[hi] = scale * (delta[hi] - exact_delta[hi]);
  }
  if (chunks == 0) return;  // warpgroup 1 where S <= 128: no tiles
  // The last tile, from registers, with the exact delta.
  store_tile(chunk_slot0(chunks - panels), exact_delta);
  // The earlier tiles (S > 256) were stored with delta_G: scale dS gains P corr, corr =
  // scale (delta_G - delta). Each thread takes its own two rows, 16-byte groups q, q + 4, ... of
  // a tile (any layout will do: corr is per row); a tile's loads come before its stores, which
  // may alias them as far as the compiler knows.
  for (int c0 = 0; c0 + panels < chunks; c0 += panels) {
    const int s0 = chunk_slot0(c0);
    // Group i of row r_lo + 8 hi: whether it lies inside the rows and S, and its offset in P and
    // dS.
    auto group = [&](int hi, int i, int64_t& at) {
      const int r = r_lo + 8 * hi, slot = s0 + 8 * (q + 4 * i);
      at = (row0 + r) * ld + slot;
      return r < rows_left && slot < slots;
    };
    uint4 pk[2][4], dk[2][4];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int64_t at;
        if (group(hi, i, at)) {
          pk[hi][i] = *reinterpret_cast<const uint4*>(p_out + at);
          dk[hi][i] = *reinterpret_cast<const uint4*>(ds_out + at);
        }
      }
    }
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int64_t at;
        if (group(hi, i, at)) {
          const uint4 p4 = pk[hi][i], d4 = dk[hi][i];
          *reinterpret_cast<uint4*>(ds_out + at) = make_uint4(
              corrected_ds<T>(d4.x, p4.x, corr[hi]), corrected_ds<T>(d4.y, p4.y, corr[hi]),
              corrected_ds<T>(d4.z, p4.z, corr[hi]), corrected_ds<T>(d4.w, p4.w, corr[hi]));
        }
      }
    }
  }
#else
  (void)grad_out, (void)h, (void)mem, (void)out, (void)lse, (void)p_out, (void)ds_out;
  (void)rows, (void)slots, (void)ld, (void)dim, (void)scale, (void)scale_log2;
  __trap();
#endif
}

}  // namespace

bool retrieval_bwd_wgmma_applies(const RetrievalBwdParams& p) {
  // 16-byte copies and loads of h, grad_out, M and out (null pointers, as backend_info passes,
  // count as aligned).
  const auto bits = reinterpret_cast<uintptr_t>(p.h) | reinterpret_cast<uintptr_t>(p.grad_out) |
                    reinterpret_cast<uintptr_t>(p.memory) | reinterpret_cast<uintptr_t>(p.out);
  return p.dtype != DType::kFloat32 && p.dim % 64 == 0 && p.dim >= 64 && p.dim <= kBwMaxDim &&
         p.slots >= 1 && p.sm == 90 && p.max_smem_bytes >= bwd_wgmma_smem_bytes(p.dim) &&
         bits % 16 == 0;
}

void launch_retrieval_bwd_wgmma(const RetrievalBwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kBwRows)));
  const int smem = bwd_wgmma_smem_bytes(p.dim);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      auto kernel = retrieval_bwd_scores_wgmma_kernel<T>;
      GAM_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      gam_launch("retrieval_bwd_scores_wgmma_kernel", kernel, grid, dim3(kBwThreads),
                 static_cast<size_t>(smem), stream, static_cast<const T*>(p.grad_out),
                 static_cast<const T*>(p.h), static_cast<const T*>(p.memory),
                 static_cast<const T*>(p.out), p.lse, static_cast<T*>(p.pds), static_cast<T*>(p.ds),
                 p.rows, static_cast<int>(p.slots), static_cast<int>(p.pds_ld),
                 static_cast<int>(p.dim), p.scale, p.scale * kLog2e);
    }
  });
}

std::string describe_retrieval_bwd_wgmma(const RetrievalBwdParams& p) {
  return std::string("wgmma: retrieval_bwd_scores_wgmma_kernel<") + type_name(p.dtype) +
         "> (64 rows x 128-slot tiles per warpgroup, 2 warpgroups, " + std::to_string(kBwStages) +
         " stages of M per warpgroup, " + std::to_string(bwd_wgmma_smem_bytes(p.dim)) +
         " bytes of shared memory; P and scale * dS as " + type_name(p.dtype) +
         "), then (scale dS) M, (scale dS)^T h + P^T grad_out (cuBLAS)";
}

}  // namespace cuda
}  // namespace gam
