// Self-test kernels of the SIMT emulation layer, written against the kernel
// source contract of csrc/cuda/compat.cuh (they also compile with nvcc).
// Each exercises one feature; the fault_* ones plant a bug the emulated
// build must catch.
#include "../cuda/compat.cuh"
#include "selftest_kernels.h"

namespace gam_selftest {
namespace {

constexpr unsigned kFull = 0xffffffffu;

inline unsigned blocks_for(int n, int block) {
  return static_cast<unsigned>((n + block - 1) / block);
}

// ---- block reduction through shared memory --------------------------------
__global__ void block_reduce_kernel(const float* __restrict__ x,
                                    float* __restrict__ out, int n) {
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
__global__ void warp_reduce_kernel(const float* __restrict__ x,
                                   float* __restrict__ out_xor,
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

__global__ void warp_scan_kernel(const float* __restrict__ x,
                                 float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  float v = i < n ? x[i] : 0.0f;
  for (int off = 1; off < 32; off <<= 1) {
    const float up = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += up;
  }
  if (i < n) out[i] = v;
}

__global__ void shfl_types_kernel(const float* __restrict__ x,
                                  float* __restrict__ out) {
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

__global__ void warp_vote_kernel(const float* __restrict__ x, int* ballot,
                                 int* any, int* all, int n) {
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
__global__ void atomic_sum_kernel(const float* __restrict__ x, float* out,
                                  int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(out, x[i]);
}

// ---- dynamic shared memory ---------------------------------------------------
__global__ void dynamic_reverse_kernel(const float* __restrict__ x,
                                       float* __restrict__ y, int n) {
  GAM_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  const int len = min(static_cast<int>(blockDim.x), n - base);
  if (t < len) buf[t] = x[base + t];
  __syncthreads();
  if (t < len) y[base + t] = buf[len - 1 - t];
}

// ---- block size not a multiple of 32 -------------------------------------------
__global__ void odd_block_kernel(const float* __restrict__ x,
                                 float* __restrict__ y, unsigned* ballots,
                                 int n) {
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

// ---- tensor cores --------------------------------------------------------------
template <typename T, typename BLayout>
__global__ void wmma_tile_kernel(const T* a, const T* b, float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  // Uniform element-wise update of the accumulator, then add it once more.
  for (int k = 0; k < fc.num_elements; ++k) fc.x[k] *= 0.5f;
  wmma::mma_sync(fc, fa, fb, fc);  // = 1.5 * a b
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
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

__global__ void wmma_misaligned_kernel(const __half* a, float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 1, 16);  // 2-byte offset: not 256-bit aligned
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

#if GAM_IS_EMULATED  // nvcc itself rejects this kernel
__global__ void smem_limit_kernel(float* out) {
  GAM_SHARED(float, big, 16384);  // 64 KiB static: over the 48 KiB limit
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}
#endif

}  // namespace

void block_reduce(const float* x, float* out, int n, int block,
                  cudaStream_t stream) {
  gam_launch("block_reduce_kernel", block_reduce_kernel,
             dim3(blocks_for(n, block)), dim3(block), block * sizeof(float),
             stream, x, out, n);
}

void warp_reduce(const float* x, float* out_xor, float* out_down, int n,
                 cudaStream_t stream) {
  gam_launch("warp_reduce_kernel", warp_reduce_kernel, dim3(blocks_for(n, 64)),
             dim3(64), 0, stream, x, out_xor, out_down, n);
}

void warp_scan(const float* x, float* out, int n, cudaStream_t stream) {
  gam_launch("warp_scan_kernel", warp_scan_kernel, dim3(blocks_for(n, 96)),
             dim3(96), 0, stream, x, out, n);
}

void shfl_types(const float* x, float* out, cudaStream_t stream) {
  gam_launch("shfl_types_kernel", shfl_types_kernel, dim3(1), dim3(32), 0,
             stream, x, out);
}

void warp_vote(const float* x, int* ballot, int* any, int* all, int n,
               cudaStream_t stream) {
  gam_launch("warp_vote_kernel", warp_vote_kernel, dim3(blocks_for(n, 64)),
             dim3(64), 0, stream, x, ballot, any, all, n);
}

void halo_stencil(const float* x, float* y, int n, int block,
                  cudaStream_t stream) {
  (void)block;  // fixed by the kernel's tile size
  gam_launch("halo_kernel", halo_kernel, dim3(blocks_for(n, kHaloBlock)),
             dim3(kHaloBlock), 0, stream, x, y, n);
}

void atomic_sum(const float* x, float* out, int n, cudaStream_t stream) {
  GAM_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream));
  gam_launch("atomic_sum_kernel", atomic_sum_kernel, dim3(blocks_for(n, 128)),
             dim3(128), 0, stream, x, out, n);
}

void dynamic_reverse(const float* x, float* y, int n, int block,
                     cudaStream_t stream) {
  gam_launch("dynamic_reverse_kernel", dynamic_reverse_kernel,
             dim3(blocks_for(n, block)), dim3(block), block * sizeof(float),
             stream, x, y, n);
}

void odd_block(const float* x, float* y, unsigned* ballots, int n, int block,
               cudaStream_t stream) {
  gam_launch("odd_block_kernel", odd_block_kernel, dim3(blocks_for(n, block)),
             dim3(block), 0, stream, x, y, ballots, n);
}

void wmma_tile(const void* a, const void* b, float* c, int dtype,
               bool b_col_major, cudaStream_t stream) {
  namespace wmma = nvcuda::wmma;
  if (dtype == 0) {
    const auto* pa = static_cast<const __half*>(a);
    const auto* pb = static_cast<const __half*>(b);
    if (b_col_major)
      gam_launch("wmma_tile_kernel<half,col>",
                 wmma_tile_kernel<__half, wmma::col_major>, dim3(1), dim3(32),
                 0, stream, pa, pb, c);
    else
      gam_launch("wmma_tile_kernel<half,row>",
                 wmma_tile_kernel<__half, wmma::row_major>, dim3(1), dim3(32),
                 0, stream, pa, pb, c);
  } else {
    const auto* pa = static_cast<const __nv_bfloat16*>(a);
    const auto* pb = static_cast<const __nv_bfloat16*>(b);
    if (b_col_major)
      gam_launch("wmma_tile_kernel<bf16,col>",
                 wmma_tile_kernel<__nv_bfloat16, wmma::col_major>, dim3(1),
                 dim3(32), 0, stream, pa, pb, c);
    else
      gam_launch("wmma_tile_kernel<bf16,row>",
                 wmma_tile_kernel<__nv_bfloat16, wmma::row_major>, dim3(1),
                 dim3(32), 0, stream, pa, pb, c);
  }
}

void barrier_stress(float* data, int blocks, int rounds, cudaStream_t stream) {
  gam_launch("barrier_stress_kernel", barrier_stress_kernel, dim3(blocks),
             dim3(256), 0, stream, data, rounds);
}

void fault_oob_global(float* x, int n, cudaStream_t stream) {
  gam_launch("oob_global_kernel", oob_global_kernel, dim3(blocks_for(n + 1, 64)),
             dim3(64), 0, stream, x, n);
}

void fault_oob_shared(float* out, cudaStream_t stream) {
  gam_launch("oob_shared_kernel", oob_shared_kernel, dim3(1), dim3(32), 0,
             stream, out);
}

void fault_uninit_shared(float* out, cudaStream_t stream) {
  gam_launch("uninit_shared_kernel", uninit_shared_kernel, dim3(1), dim3(64),
             0, stream, out);
}

void fault_missing_barrier(float* out, cudaStream_t stream) {
  gam_launch("missing_barrier_kernel", missing_barrier_kernel, dim3(2),
             dim3(32), 0, stream, out);
}

void fault_divergent_barrier(float* out, cudaStream_t stream) {
  gam_launch("divergent_barrier_kernel", divergent_barrier_kernel, dim3(2),
             dim3(32), 0, stream, out);
}

void fault_warp_deadlock(float* out, cudaStream_t stream) {
  gam_launch("warp_deadlock_kernel", warp_deadlock_kernel, dim3(1), dim3(32),
             0, stream, out);
}

void fault_wmma_misaligned(const void* a, float* c, cudaStream_t stream) {
  gam_launch("wmma_misaligned_kernel", wmma_misaligned_kernel, dim3(1),
             dim3(32), 0, stream, static_cast<const __half*>(a), c);
}

void fault_empty_grid(float* out, cudaStream_t stream) {
  gam_launch("atomic_sum_kernel", atomic_sum_kernel, dim3(0), dim3(128), 0,
             stream, static_cast<const float*>(out), out, 0);
}

void fault_smem_limit(float* out, cudaStream_t stream) {
#if GAM_IS_EMULATED
  gam_launch("smem_limit_kernel", smem_limit_kernel, dim3(1), dim3(32), 0,
             stream, out);
#else
  (void)out;
  (void)stream;
#endif
}

}  // namespace gam_selftest
