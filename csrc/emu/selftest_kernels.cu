// Self-test kernels of the SIMT emulation layer, written against the kernel
// source contract of csrc/cuda/compat.cuh (they also compile with nvcc).
// Each exercises one feature; the fault_* ones plant a bug the emulated
// build must catch.
#include "../cuda/compat.cuh"
#include "../cuda/retrieval_common.cuh"
#include "../cuda/warp_mma.cuh"
#include "../cuda/warpgroup_mma.cuh"
#include "selftest_kernels.h"

namespace gam_selftest {
namespace {

constexpr unsigned kFull = 0xffffffffu;

inline unsigned blocks_for(int n, int block) {
  return static_cast<unsigned>((n + block - 1) / block);
}

// ---- block reduction through shared memory --------------------------------
__global__ void block_reduce_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  GAM_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  // blockDim.x is a power of two here.
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// ---- warp reductions ------------------------------------------------------
__global__ void warp_reduce_kernel(const float* __restrict__ x, float* __restrict__ out_xor,
                                   float* __restrict__ out_down, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : 0.0f;
  float a = v, b = v;
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(kFull, a, off);
    b += __shfl_down_sync(kFull, b, off);
  }
  const int lane = threadIdx.x % warpSize;
  const int warp = i / warpSize;
  if (lane == 0) out_down[warp] = b;  // only lane 0 holds the full sum
  if (lane == 7) out_xor[warp] = a;   // every lane holds it
}

__global__ void warp_scan_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  float v = i < n ? x[i] : 0.0f;
  for (int off = 1; off < 32; off <<= 1) {
    const float up = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += up;
  }
  if (i < n) out[i] = v;
}

__global__ void shfl_types_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int lane = threadIdx.x;
  const float v = x[lane];
  const int i = __shfl_sync(kFull, static_cast<int>(v), 3);
  const unsigned u = __shfl_xor_sync(kFull, static_cast<unsigned>(lane), 5);
  const double d = __shfl_xor_sync(kFull, static_cast<double>(v), 1);
  const __half h = __shfl_down_sync(kFull, __float2half(v), 1);
  const __nv_bfloat16 b = __shfl_up_sync(kFull, __float2bfloat16(v), 2);
  out[lane] = static_cast<float>(i);
  out[32 + lane] = static_cast<float>(u);
  out[64 + lane] = static_cast<float>(d);
  out[96 + lane] = __half2float(h);
  out[128 + lane] = __bfloat162float(b);
}

// The 4 x 4 word transpose across each quad of a warp (retrieval_common.cuh).
__global__ void __launch_bounds__(32) quad_transpose_kernel(const unsigned* in, unsigned* out) {
  const int lane = threadIdx.x;
  uint32_t w[4];
  for (int j = 0; j < 4; ++j) w[j] = in[4 * lane + j];
  gam::cuda::quad_transpose(w, lane & 3);
  for (int j = 0; j < 4; ++j) out[4 * lane + j] = w[j];
}

__global__ void warp_vote_kernel(const float* __restrict__ x, int* ballot, int* any, int* all,
                                 int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int pred = i < n && x[i] > 0.0f;
  const unsigned b = __ballot_sync(kFull, pred);
  const int an = __any_sync(kFull, pred);
  const int al = __all_sync(kFull, pred);
  if (threadIdx.x % warpSize == 0) {
    const int w = i / warpSize;
    ballot[w] = static_cast<int>(b);
    any[w] = an;
    all[w] = al;
  }
}

// ---- halo exchange through static shared memory -----------------------------
constexpr int kHaloBlock = 128;

__global__ void __launch_bounds__(kHaloBlock)
    halo_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  GAM_SHARED(float, tile, kHaloBlock + 2);
  const int t = threadIdx.x;
  const int i = blockIdx.x * kHaloBlock + t;
  tile[t + 1] = i < n ? x[i] : 0.0f;
  if (t == 0) tile[0] = i > 0 && i - 1 < n ? x[i - 1] : 0.0f;
  if (t == kHaloBlock - 1) tile[kHaloBlock + 1] = i + 1 < n ? x[i + 1] : 0.0f;
  __syncthreads();
  if (i < n) y[i] = tile[t] + tile[t + 1] + tile[t + 2];
}

// ---- atomics -----------------------------------------------------------------
__global__ void atomic_sum_kernel(const float* __restrict__ x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(out, x[i]);
}

// ---- dynamic shared memory ---------------------------------------------------
__global__ void dynamic_reverse_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  GAM_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  const int len = min(static_cast<int>(blockDim.x), n - base);
  if (t < len) buf[t] = x[base + t];
  __syncthreads();
  if (t < len) y[base + t] = buf[len - 1 - t];
}

// ---- block size not a multiple of 32 -------------------------------------------
__global__ void odd_block_kernel(const float* __restrict__ x, float* __restrict__ y,
                                 unsigned* ballots, int n) {
  GAM_SHARED(float, partial, 32);
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  const float v = i < n ? x[i] : 0.0f;
  // Warp sum over the lanes that exist (the last warp is partial).
  const unsigned active = __activemask();
  float s = v;
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_down_sync(active, s, off);
    if ((t % 32) + off < 32 && ((active >> ((t % 32) + off)) & 1u)) s += o;
  }
  const unsigned ball = __ballot_sync(active, 1);
  if (t % 32 == 0) {
    partial[t / 32] = s;
    ballots[blockIdx.x * ((blockDim.x + 31) / 32) + t / 32] = ball;
  }
  __syncthreads();
  float total = 0.0f;
  const int nwarps = (blockDim.x + 31) / 32;
  for (int w = 0; w < nwarps; ++w) total += partial[w];
  if (i < n) y[i] = 2.0f * v + total;
}

// ---- warp-level matrix primitives (csrc/cuda/warp_mma.cuh) ---------------------------------
// Fragments are loaded and stored here by the PTX ISA's index formulas, written out
// independently of the emulator's implementation.
using gam::cuda::cp_async_16;
using gam::cuda::cp_async_commit;
using gam::cuda::cp_async_wait;
using gam::cuda::ldmatrix;

__device__ __forceinline__ uint32_t bits2(const uint16_t* m, int i0, int i1) {
  return static_cast<uint32_t>(m[i0]) | (static_cast<uint32_t>(m[i1]) << 16);
}

// d (16x8 f32, row major) = a (16xK row major) b (Kx8 row major) + c; a, b 16-bit elements.
template <typename T, int K>
__global__ void __launch_bounds__(32)
    mma_fragments_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d,
                         bool misplace) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
  uint32_t ra[K / 4], rb[K / 8];
  for (int r = 0; r < K / 4; ++r) {  // register r: row g (+8 when r is odd), cols 2t (+8 if r >= 2)
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    ra[r] = bits2(a, row * K + col, row * K + col + 1);
  }
  for (int r = 0; r < K / 8; ++r) {  // register r: rows 2t, 2t+1 (+8 when r = 1), col g
    const int k = 2 * t + 8 * r;
    rb[r] = bits2(b, k * 8 + g, (k + 1) * 8 + g);
  }
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) rc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)];
  if constexpr (K == 16) {
    if (misplace && lane == 0) {  // planted layout bug: two registers of lane 0 swapped
      const uint32_t x = ra[1];
      ra[1] = ra[2];
      ra[2] = x;
    }
  }
  if constexpr (K == 16) {
    gam::cuda::mma_m16n8k16<T>(rd, ra, rb, rc);
  } else {
    gam::cuda::mma_m16n8k8_f16(rd, ra, rb, rc);
  }
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = rd[i];
}

// N 8x8 matrices of 16-bit elements (src: N x 8 x 8, row major) copied to shared memory with a
// padded row stride; every lane gives the address of row lane % 8 of matrix (lane / 8) % N and
// stores the registers it receives: out[lane * N + j].
constexpr int kLdmStride = 24;  // elements per shared row: 48 bytes, rows stay 16-byte aligned

template <int N, bool kTrans>
__global__ void __launch_bounds__(32) ldmatrix_kernel(const uint16_t* src, uint32_t* out) {
  GAM_SHARED(uint16_t, tile, 4 * 8 * kLdmStride);
  const int lane = threadIdx.x;
  for (int e = lane; e < N * 64; e += 32) tile[(e / 8) * kLdmStride + e % 8] = src[e];
  __syncwarp();
  const int m = (lane / 8) % N, r = lane % 8;
  uint32_t regs[N];
  ldmatrix<N, kTrans>(regs, &tile[(m * 8 + r) * kLdmStride]);
  for (int j = 0; j < N; ++j) out[lane * N + j] = regs[j];
}

// d (16x8) = a (16x16, row major) b (16x8) through ldmatrix + mma. b_mode: how b is stored and
// loaded: 0 n-major (8 rows of 16 k, "col") with one .x2; 1 k-major (16 rows of 8 n) with one
// .x2.trans; 2 n-major with two .x1; 3 k-major with two .x1.trans. a is loaded with one .x4.
template <typename T>
__global__ void __launch_bounds__(32)
    ldmatrix_mma_kernel(const uint16_t* a, const uint16_t* b, float* d, int b_mode) {
  GAM_SHARED(uint16_t, as, 16 * kLdmStride);
  GAM_SHARED(uint16_t, bs, 16 * kLdmStride);
  const int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
  for (int e = lane; e < 256; e += 32) as[(e / 16) * kLdmStride + e % 16] = a[e];
  const bool n_major = b_mode % 2 == 0;
  for (int e = lane; e < 128; e += 32) {
    if (n_major) {
      bs[(e / 16) * kLdmStride + e % 16] = b[(e % 16) * 8 + e / 16];  // bs[n][k] = b[k][n]
    } else {
      bs[(e / 8) * kLdmStride + e % 8] = b[e];  // bs[k][n] = b[k][n]
    }
  }
  __syncwarp();
  uint32_t ra[4], rb[2];
  // matrices of a: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15)
  ldmatrix<4, false>(ra, &as[(lane % 16) * kLdmStride + (lane / 16) * 8]);
  const int r = lane % 8, half = (lane / 8) % 2;  // matrix `half` of b: k 0-7 or k 8-15
  if (b_mode == 0) {
    ldmatrix<2, false>(rb, &bs[r * kLdmStride + half * 8]);
  } else if (b_mode == 1) {
    ldmatrix<2, true>(rb, &bs[(half * 8 + r) * kLdmStride]);
  } else {
    for (int h = 0; h < 2; ++h) {
      uint32_t one[1];
      if (b_mode == 2) {
        ldmatrix<1, false>(one, &bs[r * kLdmStride + h * 8]);
      } else {
        ldmatrix<1, true>(one, &bs[(h * 8 + r) * kLdmStride]);
      }
      rb[h] = one[0];
    }
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  gam::cuda::mma_m16n8k16<T>(acc, ra, rb, acc);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

// c (32 x 16, f32) = a (32 x k) b^T, b (16 x k), both 16-bit row major, k a multiple of 8: 4
// warps (2 x 2 tiles of 16 x 8), k streamed in tiles of 32 through a `stages`-deep cp.async
// pipeline; the k tail is zero-filled.
constexpr int kPipeK = 32;
constexpr int kPipeStride = kPipeK + 8;  // elements per shared row
constexpr int kPipeMaxStages = 3;

template <typename T>
__global__ void __launch_bounds__(128)
    cp_async_gemm_kernel(const T* a, const T* b, float* c, int k, int stages) {
  GAM_SHARED(T, as, kPipeMaxStages * 32 * kPipeStride);
  GAM_SHARED(T, bs, kPipeMaxStages * 16 * kPipeStride);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 2, wn = warp % 2, g = lane >> 2, t = lane % 4;
  const int ktiles = (k + kPipeK - 1) / kPipeK;
  auto load = [&](int kt) {  // 48 rows x 4 chunks of 16 bytes, over 128 threads
    const int st = kt % stages;
    for (int q = tid; q < 48 * 4; q += 128) {
      const int row = q / 4, col = kt * kPipeK + (q % 4) * 8;
      const bool ok = col < k;
      if (row < 32) {
        cp_async_16(&as[(st * 32 + row) * kPipeStride + (q % 4) * 8], a + row * k + (ok ? col : 0),
                    ok);
      } else {
        cp_async_16(&bs[(st * 16 + row - 32) * kPipeStride + (q % 4) * 8],
                    b + (row - 32) * k + (ok ? col : 0), ok);
      }
    }
  };
  for (int s = 0; s < stages - 1; ++s) {
    if (s < ktiles) load(s);
    cp_async_commit();
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int kt = 0; kt < ktiles; ++kt) {
    if (stages == 3) {
      cp_async_wait<1>();
    } else if (stages == 2) {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1
    if (stages > 1 && kt + stages - 1 < ktiles) load(kt + stages - 1);
    if (stages == 1) {
      load(kt);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    } else {
      cp_async_commit();
    }
    const int st = kt % stages;
    for (int kk = 0; kk < kPipeK; kk += 16) {
      uint32_t ra[4], rb[2];
      ldmatrix<4, false>(ra,
                         &as[(st * 32 + wm * 16 + lane % 16) * kPipeStride + kk + (lane / 16) * 8]);
      ldmatrix<2, false>(
          rb, &bs[(st * 16 + wn * 8 + lane % 8) * kPipeStride + kk + ((lane / 8) % 2) * 8]);
      gam::cuda::mma_m16n8k16<T>(acc, ra, rb, acc);
    }
    if (stages == 1) __syncthreads();  // the single stage is refilled next
  }
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i)
    c[(wm * 16 + g + 8 * (i / 2)) * 16 + wn * 8 + 2 * t + (i % 2)] = acc[i];
}

// __syncwarp orders shared-memory accesses within a warp: lane l reads what lane l + 1 wrote.
__global__ void __launch_bounds__(64) syncwarp_exchange_kernel(const float* x, float* y) {
  GAM_SHARED(float, buf, 64);
  const int tid = threadIdx.x, lane = tid % 32, base = tid - lane;
  buf[tid] = x[blockIdx.x * 64 + tid];
  __syncwarp();
  y[blockIdx.x * 64 + tid] = buf[base + (lane + 1) % 32];
}

// Two groups of two warps, each synchronising on its own named barrier: thread t of group g
// reads what thread (t + 1) % 64 of the same group wrote.
__global__ void __launch_bounds__(128) named_barrier_kernel(const float* x, float* y) {
  GAM_SHARED(float, buf, 128);
  const int tid = threadIdx.x, group = tid / 64, t = tid % 64;
  buf[tid] = x[blockIdx.x * 128 + tid];
  gam::cuda::named_barrier_sync(1 + group, 64);
  y[blockIdx.x * 128 + tid] = buf[group * 64 + (t + 1) % 64];
}

// ---- wgmma: one warpgroup, d (64 x N) = a (64 x 64) b^T (b: N x 64) -----------------------
// An operand's layout ("mode"): bits 0-1 the swizzle (0: 128 bytes, 1: 64, 2: 32, 3: none, the
// 8 x 16-byte core matrices), bit 2 MN-major (else K-major). The kernel stores each element at
// the address its layout gives and builds the descriptors from the same layout; the emulator
// decodes the descriptors by the PTX ISA's canonical-layout formulas (warpgroup_matrix.h), the
// GPU by its own.
constexpr int kWgK = 64;

__device__ inline uint32_t wg_swizzle_bytes(int mode) {
  return (mode & 3) == 3 ? 0u : 128u >> (mode & 3);
}

// Byte offset in the tile of element (i, k), i < rows (M or N), k < kWgK; `tile` is the tile's
// shared address (1024-byte aligned), which the swizzle reads.
__device__ inline uint32_t wg_offset(int mode, int rows, int i, int k, uint32_t tile) {
  const uint32_t w = wg_swizzle_bytes(mode);
  uint32_t off;
  if (!(mode & 4)) {  // K-major: each of i's rows holds k contiguously
    if (w) {
      const int per = static_cast<int>(w / 2);  // elements of k per row of a panel
      off = (k / per) * rows * w + i * w + (k % per) * 2;
    } else {
      off = ((k / 8) * (rows / 8) + i / 8) * 128 + (i % 8) * 16 + (k % 8) * 2;
    }
  } else {  // MN-major: each k row holds i contiguously
    if (w) {
      const int per = static_cast<int>(w / 2);  // elements of i per row of a panel
      off = (i / per) * kWgK * w + k * w + (i % per) * 2;
    } else {
      off = ((k / 8) * (rows / 8) + i / 8) * 128 + (k % 8) * 16 + (i % 8) * 2;
    }
  }
  const uint32_t a = tile + off;
  return (w ? a ^ (((a >> 7) & (w / 16 - 1)) << 4) : a) - tile;
}

// The descriptor of k step s (k = 16 s .. 16 s + 15) of the tile.
__device__ inline uint64_t wg_desc(int mode, int rows, int s, uint32_t tile) {
  using gam::cuda::WgmmaSwizzle;
  const uint32_t w = wg_swizzle_bytes(mode);
  const WgmmaSwizzle code = w == 128  ? WgmmaSwizzle::k128B
                            : w == 64 ? WgmmaSwizzle::k64B
                            : w == 32 ? WgmmaSwizzle::k32B
                                      : WgmmaSwizzle::kNone;
  if (!w) {  // core matrices, K- or MN-major alike: 128 bytes to the next 8 of i, a k-column on
    const uint32_t cores = static_cast<uint32_t>(rows / 8) * 128;  // one k-column of them
    return gam::cuda::wgmma_descriptor(tile + 2u * s * cores, cores, 128, code);
  }
  if (!(mode & 4)) {
    const uint32_t per = w / 2, k0 = 16u * s;
    return gam::cuda::wgmma_descriptor(tile + (k0 / per) * rows * w + (k0 % per) * 2, 16, 8 * w,
                                       code);
  }
  return gam::cuda::wgmma_descriptor(tile + 16u * s * w, kWgK * w, 8 * w, code);
}

// mode_a < 0: A from registers; mode_b + 8: B described with the wrong layout. misuse 1: the
// accumulators are read before the wait (the emulator shows NaN there); 2: B's shared memory is
// zeroed before the wait (the emulator reads operands at the wait: the product comes out 0).
template <typename T, int N, bool kTransA, bool kTransB, bool kRegsA>
__global__ void wgmma_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                  float* __restrict__ d, int mode_a, int mode_b, int misuse) {
  using namespace gam::cuda;
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  const uint32_t a_tile = window + pad, b_tile = a_tile + 64 * kWgK * 2;
  unsigned char* a_bytes = smem + pad;
  unsigned char* b_bytes = a_bytes + 64 * kWgK * 2;
  const int t = threadIdx.x;
  for (int e = t; e < 64 * kWgK; e += 128) {
    if (!kRegsA) {
      *reinterpret_cast<T*>(a_bytes + wg_offset(mode_a, 64, e / kWgK, e % kWgK, a_tile)) = a[e];
    }
  }
  for (int e = t; e < N * kWgK; e += 128)
    *reinterpret_cast<T*>(b_bytes + wg_offset(mode_b & 7, N, e / kWgK, e % kWgK, b_tile)) = b[e];
  // Bit 3 of mode_b: B described as core matrices (no swizzle), whatever its storage.
  const int desc_mode_b = (mode_b & 8) ? ((mode_b & 4) | 3) : mode_b;
  fence_proxy_async_shared();
  __syncthreads();
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  // A registers per k step, alive until the wait (they are read asynchronously).
  uint32_t ra[kWgK / 16][4];
  if (kRegsA) {
    for (int s = 0; s < kWgK / 16; ++s)
      for (int r = 0; r < 4; ++r) {
        const int row = 16 * w + g + 8 * (r % 2), k = 16 * s + 2 * q + 8 * (r / 2);
        __builtin_memcpy(&ra[s][r], a + row * kWgK + k, 4);
      }
  }
  float acc[N / 2];
  for (int v = 0; v < N / 2; ++v) acc[v] = 0.0f;
  wgmma_fence_registers(acc);
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < kWgK / 16; ++s) {
    const uint64_t db = wg_desc(desc_mode_b, N, s, b_tile);
    if constexpr (kRegsA) {
      wgmma_mma_regs<T, N, kTransB>(acc, ra[s], db, s > 0);
    } else {
      wgmma_mma<T, N, kTransA, kTransB>(acc, wg_desc(mode_a, 64, s, a_tile), db, s > 0);
    }
  }
  wgmma_commit();
  if (misuse == 1) {
    for (int v = 0; v < N / 2; ++v) d[t * (N / 2) + v] = acc[v];
    wgmma_wait<0>();
    return;
  }
  if (misuse == 2) {
    for (int e = t; e < N * kWgK * 2 / 16; e += 128) reinterpret_cast<uint4*>(b_bytes)[e] = uint4{};
    __syncthreads();
  }
  wgmma_wait<0>();
  wgmma_fence_registers(acc);
  for (int v = 0; v < N / 2; ++v) {
    const int row = 16 * w + g + 8 * ((v / 2) % 2), col = 8 * (v / 4) + 2 * q + v % 2;
    d[row * N + col] = acc[v];
  }
}

// ---- speed ---------------------------------------------------------------------
__global__ void barrier_stress_kernel(float* data, int rounds) {
  GAM_SHARED(float, buf, 256);
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  for (int r = 0; r < rounds; ++r) {
    buf[t] = v;
    __syncthreads();
    v = 0.5f * (v + buf[(t + 1) % 256]);
    __syncthreads();
  }
  data[blockIdx.x * 256 + t] = v;
}

// ---- planted faults --------------------------------------------------------------
__global__ void oob_global_kernel(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) x[i] = 1.0f;  // off by one: writes x[n]
}

__global__ void oob_shared_kernel(float* out) {
  GAM_SHARED(float, s, 32);
  s[threadIdx.x + 1] = 1.0f;  // lane 31 writes s[32]
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void uninit_shared_kernel(float* out) {
  GAM_SHARED(float, s, 64);
  if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;  // upper half never written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void missing_barrier_kernel(float* out) {
  GAM_SHARED(float, s, 32);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  // __syncthreads() missing here: thread t reads what thread t-1 wrote.
  out[blockIdx.x * 32 + t] = t > 0 ? s[t - 1] : 0.0f;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 16) return;  // half the block leaves early ...
  __syncthreads();                // ... so this barrier can never complete
  out[threadIdx.x] = 1.0f;
}

__global__ void warp_deadlock_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = static_cast<float>(lane);
  if (lane < 16)
    v = __shfl_sync(kFull, v, 0);  // full mask, but the other half ...
  else
    v = static_cast<float>(__ballot_sync(kFull, 1));  // ... votes instead
  out[threadIdx.x] = v;
}

// cp.async into shared memory, then read without waiting for the group (or, on the GPU, racing
// the copy): out reads NaN in the emulator.
__global__ void cp_async_unwaited_kernel(const float* x, float* out) {
  GAM_SHARED(float, buf, 128);
  const int t = threadIdx.x;
  cp_async_16(&buf[4 * t], x + 4 * t, true);
  cp_async_commit();
  // cp_async_wait<0>() missing
  out[t] = buf[4 * t];
  cp_async_wait<0>();
}

// Each thread waits for its own copy but reads a neighbour's without a barrier.
__global__ void cp_async_no_barrier_kernel(const float* x, float* out) {
  GAM_SHARED(float, buf, 128);
  const int t = threadIdx.x;
  cp_async_16(&buf[4 * t], x + 4 * t, true);
  cp_async_commit();
  cp_async_wait<0>();
  // __syncthreads() missing
  out[t] = buf[4 * ((t + 1) % 32)];
}

__global__ void ldmatrix_misaligned_kernel(float* out) {
  GAM_SHARED(uint16_t, tile, 8 * 16);
  for (int e = threadIdx.x; e < 128; e += 32) tile[e] = 0;
  __syncwarp();
  uint32_t r[1];
  ldmatrix<1, false>(r, &tile[(threadIdx.x % 8) * 16 + 1]);  // 2 bytes off the 16-byte grid
  out[threadIdx.x] = static_cast<float>(r[0]);
}

__global__ void ldmatrix_global_kernel(const uint16_t* src, float* out) {
  uint32_t r[1];
  ldmatrix<1, false>(r, src + (threadIdx.x % 8) * 8);  // global memory, not shared
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// A named barrier whose count (128) exceeds the threads that reach it (64).
__global__ void named_barrier_count_kernel(float* out) {
  if (threadIdx.x >= 64) return;
  gam::cuda::named_barrier_sync(1, 128);
  out[threadIdx.x] = 1.0f;
}

// Half of each of two warps at a named barrier whose count (32) the two halves make up; the other
// halves go on to the block barrier. On the GPU warp 0's arrival alone counts 32.
__global__ void named_barrier_split_warp_kernel(float* out) {
  if (threadIdx.x % 32 < 16) gam::cuda::named_barrier_sync(1, 32);
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void mma_exited_lane_kernel(float* out) {
  if (threadIdx.x == 31) return;  // mma.sync needs all 32 lanes
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  gam::cuda::mma_m16n8k16<__half>(acc, a, b, acc);
  out[threadIdx.x] = acc[0];
}

#if GAM_IS_EMULATED  // nvcc itself rejects this kernel
__global__ void smem_limit_kernel(float* out) {
  GAM_SHARED(float, big, 16384);  // 64 KiB static: over the 48 KiB limit
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}
#endif

}  // namespace

void block_reduce(const float* x, float* out, int n, int block, cudaStream_t stream) {
  gam_launch("block_reduce_kernel", block_reduce_kernel, dim3(blocks_for(n, block)), dim3(block),
             block * sizeof(float), stream, x, out, n);
}

void warp_reduce(const float* x, float* out_xor, float* out_down, int n, cudaStream_t stream) {
  gam_launch("warp_reduce_kernel", warp_reduce_kernel, dim3(blocks_for(n, 64)), dim3(64), 0, stream,
             x, out_xor, out_down, n);
}

void warp_scan(const float* x, float* out, int n, cudaStream_t stream) {
  gam_launch("warp_scan_kernel", warp_scan_kernel, dim3(blocks_for(n, 96)), dim3(96), 0, stream, x,
             out, n);
}

void shfl_types(const float* x, float* out, cudaStream_t stream) {
  gam_launch("shfl_types_kernel", shfl_types_kernel, dim3(1), dim3(32), 0, stream, x, out);
}

void quad_transpose(const unsigned* in, unsigned* out, cudaStream_t stream) {
  gam_launch("quad_transpose_kernel", quad_transpose_kernel, dim3(1), dim3(32), 0, stream, in, out);
}

void warp_vote(const float* x, int* ballot, int* any, int* all, int n, cudaStream_t stream) {
  gam_launch("warp_vote_kernel", warp_vote_kernel, dim3(blocks_for(n, 64)), dim3(64), 0, stream, x,
             ballot, any, all, n);
}

void halo_stencil(const float* x, float* y, int n, int block, cudaStream_t stream) {
  (void)block;  // fixed by the kernel's tile size
  gam_launch("halo_kernel", halo_kernel, dim3(blocks_for(n, kHaloBlock)), dim3(kHaloBlock), 0,
             stream, x, y, n);
}

void atomic_sum(const float* x, float* out, int n, cudaStream_t stream) {
  GAM_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream));
  gam_launch("atomic_sum_kernel", atomic_sum_kernel, dim3(blocks_for(n, 128)), dim3(128), 0, stream,
             x, out, n);
}

void dynamic_reverse(const float* x, float* y, int n, int block, cudaStream_t stream) {
  gam_launch("dynamic_reverse_kernel", dynamic_reverse_kernel, dim3(blocks_for(n, block)),
             dim3(block), block * sizeof(float), stream, x, y, n);
}

void odd_block(const float* x, float* y, unsigned* ballots, int n, int block, cudaStream_t stream) {
  gam_launch("odd_block_kernel", odd_block_kernel, dim3(blocks_for(n, block)), dim3(block), 0,
             stream, x, y, ballots, n);
}

void mma_fragments(const void* a, const void* b, const float* c, float* d, int dtype, int k,
                   bool misplace, cudaStream_t stream) {
  const auto* pa = static_cast<const uint16_t*>(a);
  const auto* pb = static_cast<const uint16_t*>(b);
  if (k == 8) {
    gam_launch("mma_fragments_kernel<half,8>", mma_fragments_kernel<__half, 8>, dim3(1), dim3(32),
               0, stream, pa, pb, c, d, misplace);
  } else if (dtype == 0) {
    gam_launch("mma_fragments_kernel<half,16>", mma_fragments_kernel<__half, 16>, dim3(1), dim3(32),
               0, stream, pa, pb, c, d, misplace);
  } else {
    gam_launch("mma_fragments_kernel<bf16,16>", mma_fragments_kernel<__nv_bfloat16, 16>, dim3(1),
               dim3(32), 0, stream, pa, pb, c, d, misplace);
  }
}

void ldmatrix_fragments(const void* src, unsigned* out, int num, bool trans, cudaStream_t stream) {
  const auto* p = static_cast<const uint16_t*>(src);
  auto run = [&](auto kernel, const char* name) {
    gam_launch(name, kernel, dim3(1), dim3(32), 0, stream, p, out);
  };
  if (num == 1) {
    trans ? run(ldmatrix_kernel<1, true>, "ldmatrix_kernel<1,trans>")
          : run(ldmatrix_kernel<1, false>, "ldmatrix_kernel<1>");
  } else if (num == 2) {
    trans ? run(ldmatrix_kernel<2, true>, "ldmatrix_kernel<2,trans>")
          : run(ldmatrix_kernel<2, false>, "ldmatrix_kernel<2>");
  } else {
    trans ? run(ldmatrix_kernel<4, true>, "ldmatrix_kernel<4,trans>")
          : run(ldmatrix_kernel<4, false>, "ldmatrix_kernel<4>");
  }
}

void ldmatrix_mma(const void* a, const void* b, float* d, int dtype, int b_mode,
                  cudaStream_t stream) {
  const auto* pa = static_cast<const uint16_t*>(a);
  const auto* pb = static_cast<const uint16_t*>(b);
  if (dtype == 0) {
    gam_launch("ldmatrix_mma_kernel<half>", ldmatrix_mma_kernel<__half>, dim3(1), dim3(32), 0,
               stream, pa, pb, d, b_mode);
  } else {
    gam_launch("ldmatrix_mma_kernel<bf16>", ldmatrix_mma_kernel<__nv_bfloat16>, dim3(1), dim3(32),
               0, stream, pa, pb, d, b_mode);
  }
}

void cp_async_gemm(const void* a, const void* b, float* c, int k, int stages, int dtype,
                   cudaStream_t stream) {
  if (dtype == 0) {
    gam_launch("cp_async_gemm_kernel<half>", cp_async_gemm_kernel<__half>, dim3(1), dim3(128), 0,
               stream, static_cast<const __half*>(a), static_cast<const __half*>(b), c, k, stages);
  } else {
    gam_launch("cp_async_gemm_kernel<bf16>", cp_async_gemm_kernel<__nv_bfloat16>, dim3(1),
               dim3(128), 0, stream, static_cast<const __nv_bfloat16*>(a),
               static_cast<const __nv_bfloat16*>(b), c, k, stages);
  }
}

void named_barrier_groups(const float* x, float* y, int blocks, cudaStream_t stream) {
  gam_launch("named_barrier_kernel", named_barrier_kernel, dim3(blocks), dim3(128), 0, stream, x,
             y);
}

void syncwarp_exchange(const float* x, float* y, int blocks, cudaStream_t stream) {
  gam_launch("syncwarp_exchange_kernel", syncwarp_exchange_kernel, dim3(blocks), dim3(64), 0,
             stream, x, y);
}

template <typename T, int N, bool kTransA, bool kTransB, bool kRegsA>
void launch_wgmma_gemm(const void* a, const void* b, float* d, int mode_a, int mode_b, int misuse,
                       cudaStream_t stream) {
  auto kernel = wgmma_gemm_kernel<T, N, kTransA, kTransB, kRegsA>;
  const int smem = 1024 + (64 + N) * kWgK * 2;
  GAM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  gam_launch("wgmma_gemm_kernel", kernel, dim3(1), dim3(128), smem, stream,
             static_cast<const T*>(a), static_cast<const T*>(b), d, mode_a, mode_b, misuse);
}

template <typename T, int N>
void wgmma_gemm_n(const void* a, const void* b, float* d, int mode_a, int mode_b, int misuse,
                  cudaStream_t stream) {
  const bool tb = (mode_b & 4) != 0;
  if constexpr (N == 32) {  // B K-major only (warpgroup_mma.cuh); the binding checks mode_b
    if (mode_a < 0) {
      launch_wgmma_gemm<T, N, false, false, true>(a, b, d, mode_a, mode_b, misuse, stream);
    } else if (mode_a & 4) {
      launch_wgmma_gemm<T, N, true, false, false>(a, b, d, mode_a, mode_b, misuse, stream);
    } else {
      launch_wgmma_gemm<T, N, false, false, false>(a, b, d, mode_a, mode_b, misuse, stream);
    }
  } else if (mode_a < 0) {
    (tb ? launch_wgmma_gemm<T, N, false, true, true>
        : launch_wgmma_gemm<T, N, false, false, true>)(a, b, d, mode_a, mode_b, misuse, stream);
  } else if (mode_a & 4) {
    (tb ? launch_wgmma_gemm<T, N, true, true, false>
        : launch_wgmma_gemm<T, N, true, false, false>)(a, b, d, mode_a, mode_b, misuse, stream);
  } else {
    (tb ? launch_wgmma_gemm<T, N, false, true, false>
        : launch_wgmma_gemm<T, N, false, false, false>)(a, b, d, mode_a, mode_b, misuse, stream);
  }
}

void wgmma_gemm(const void* a, const void* b, float* d, int n, int dtype, int mode_a, int mode_b,
                int misuse, cudaStream_t stream) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    (n == 32    ? wgmma_gemm_n<T, 32>
     : n == 64  ? wgmma_gemm_n<T, 64>
     : n == 128 ? wgmma_gemm_n<T, 128>
                : wgmma_gemm_n<T, 256>)(a, b, d, mode_a, mode_b, misuse, stream);
  };
  if (dtype == 0) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
}

void barrier_stress(float* data, int blocks, int rounds, cudaStream_t stream) {
  gam_launch("barrier_stress_kernel", barrier_stress_kernel, dim3(blocks), dim3(256), 0, stream,
             data, rounds);
}

void fault_oob_global(float* x, int n, cudaStream_t stream) {
  gam_launch("oob_global_kernel", oob_global_kernel, dim3(blocks_for(n + 1, 64)), dim3(64), 0,
             stream, x, n);
}

void fault_oob_shared(float* out, cudaStream_t stream) {
  gam_launch("oob_shared_kernel", oob_shared_kernel, dim3(1), dim3(32), 0, stream, out);
}

void fault_uninit_shared(float* out, cudaStream_t stream) {
  gam_launch("uninit_shared_kernel", uninit_shared_kernel, dim3(1), dim3(64), 0, stream, out);
}

void fault_missing_barrier(float* out, cudaStream_t stream) {
  gam_launch("missing_barrier_kernel", missing_barrier_kernel, dim3(2), dim3(32), 0, stream, out);
}

void fault_divergent_barrier(float* out, cudaStream_t stream) {
  gam_launch("divergent_barrier_kernel", divergent_barrier_kernel, dim3(2), dim3(32), 0, stream,
             out);
}

void fault_warp_deadlock(float* out, cudaStream_t stream) {
  gam_launch("warp_deadlock_kernel", warp_deadlock_kernel, dim3(1), dim3(32), 0, stream, out);
}

void fault_cp_async_unwaited(const float* x, float* out, cudaStream_t stream) {
  gam_launch("cp_async_unwaited_kernel", cp_async_unwaited_kernel, dim3(1), dim3(32), 0, stream, x,
             out);
}

void fault_cp_async_no_barrier(const float* x, float* out, cudaStream_t stream) {
  gam_launch("cp_async_no_barrier_kernel", cp_async_no_barrier_kernel, dim3(1), dim3(32), 0, stream,
             x, out);
}

void fault_ldmatrix_misaligned(float* out, cudaStream_t stream) {
  gam_launch("ldmatrix_misaligned_kernel", ldmatrix_misaligned_kernel, dim3(1), dim3(32), 0, stream,
             out);
}

void fault_ldmatrix_global(const void* src, float* out, cudaStream_t stream) {
  gam_launch("ldmatrix_global_kernel", ldmatrix_global_kernel, dim3(1), dim3(32), 0, stream,
             static_cast<const uint16_t*>(src), out);
}

void fault_named_barrier_count(float* out, cudaStream_t stream) {
  gam_launch("named_barrier_count_kernel", named_barrier_count_kernel, dim3(1), dim3(128), 0,
             stream, out);
}

void fault_named_barrier_split_warp(float* out, cudaStream_t stream) {
  gam_launch("named_barrier_split_warp_kernel", named_barrier_split_warp_kernel, dim3(1), dim3(64),
             0, stream, out);
}

// A warpgroup collective in a block that is not whole warpgroups (96 threads), or that one
// thread of its warpgroup has left (exited = 5).
__global__ void wgmma_commit_kernel(int exited) {
  if (static_cast<int>(threadIdx.x) == exited) return;
  gam::cuda::wgmma_commit();
}

void fault_wgmma_partial_warpgroup(cudaStream_t stream) {
  gam_launch("wgmma_commit_kernel", wgmma_commit_kernel, dim3(1), dim3(96), 0, stream, -1);
}

void fault_wgmma_exited_thread(cudaStream_t stream) {
  gam_launch("wgmma_commit_kernel", wgmma_commit_kernel, dim3(1), dim3(128), 0, stream, 5);
}

// One wgmma m64n64k16 whose A and B (64 x 16 each, unswizzled core matrices: 8 rows of 16 bytes
// per core matrix, the next k-half 128 bytes on, the next 8 rows 256) arrive by cp.async from
// src (4 KB); fences: bit 0, each thread runs fence.proxy.async after its cp.async wait; bit 1,
// wgmma.fence before the product. out[t] = the thread's first accumulator.
__global__ void wgmma_cp_async_kernel(const uint16_t* __restrict__ src, float* __restrict__ out,
                                      int fences) {
  using namespace gam::cuda;
  GAM_DYNAMIC_SHARED(unsigned char, smem);
  const uint32_t window = shared_address(smem);
  const uint32_t pad = (1024u - window % 1024u) % 1024u;
  const int t = threadIdx.x;
  for (int c = t; c < 256; c += 128) cp_async_16(smem + pad + 16 * c, src + 8 * c, true);
  cp_async_commit();
  cp_async_wait<0>();
  if (fences & 1) fence_proxy_async_shared();
  __syncthreads();
  float acc[32];
  for (int v = 0; v < 32; ++v) acc[v] = 0.f;
  wgmma_fence_registers(acc);
  if (fences & 2) wgmma_fence();
  const uint32_t a = window + pad, b = a + 2048;
  wgmma_mma<__nv_bfloat16, 64, false, false>(
      acc, wgmma_descriptor(a, 128, 256, WgmmaSwizzle::kNone),
      wgmma_descriptor(b, 128, 256, WgmmaSwizzle::kNone), false);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_registers(acc);
  out[t] = acc[0];
}

void wgmma_cp_async(const void* src, float* out, int fences, cudaStream_t stream) {
  gam_launch("wgmma_cp_async_kernel", wgmma_cp_async_kernel, dim3(1), dim3(128), 1024 + 4096,
             stream, static_cast<const uint16_t*>(src), out, fences);
}

void fault_mma_exited_lane(float* out, cudaStream_t stream) {
  gam_launch("mma_exited_lane_kernel", mma_exited_lane_kernel, dim3(1), dim3(32), 0, stream, out);
}

void fault_empty_grid(float* out, cudaStream_t stream) {
  gam_launch("atomic_sum_kernel", atomic_sum_kernel, dim3(0), dim3(128), 0, stream,
             static_cast<const float*>(out), out, 0);
}

void fault_smem_limit(float* out, cudaStream_t stream) {
#if GAM_IS_EMULATED
  gam_launch("smem_limit_kernel", smem_limit_kernel, dim3(1), dim3(32), 0, stream, out);
#else
  (void)out;
  (void)stream;
#endif
}

}  // namespace gam_selftest
