// Launchers of the emulator self-test kernels (selftest_kernels.cu). Torch
// free, like every kernel header: POD params plus a cudaStream_t.
#pragma once

#include <driver_types.h>

#include <cstddef>

namespace gam_selftest {

// out[b] = sum of x[b*block .. b*block+block) (shared-memory tree).
void block_reduce(const float* x, float* out, int n, int block, cudaStream_t stream);
// One warp per 32 values: out_xor[w], out_down[w] = warp sums.
void warp_reduce(const float* x, float* out_xor, float* out_down, int n, cudaStream_t stream);
// Inclusive scan within each warp with __shfl_up_sync.
void warp_scan(const float* x, float* out, int n, cudaStream_t stream);
// Shuffles of other payload types within one warp of 32 lanes; out is 5x32:
// int broadcast from lane 3, unsigned xor 5, double xor 1, __half down 1,
// __nv_bfloat16 up 2 (each converted back to float).
void shfl_types(const float* x, float* out, cudaStream_t stream);
// One warp: lane l's words in[4 l .. 4 l + 3] through quad_transpose into out alike.
void quad_transpose(const unsigned* in, unsigned* out, cudaStream_t stream);
// Per warp of 32 inputs: ballot of x > 0, any, all (as int32).
void warp_vote(const float* x, int* ballot, int* any, int* all, int n, cudaStream_t stream);
// y[i] = x[i-1] + x[i] + x[i+1] (zero outside), tile + halo in shared.
void halo_stencil(const float* x, float* y, int n, int block, cudaStream_t stream);
// *out += sum(x) with one atomicAdd per thread.
void atomic_sum(const float* x, float* out, int n, cudaStream_t stream);
// Reverses each block-sized chunk through dynamic shared memory.
void dynamic_reverse(const float* x, float* y, int n, int block, cudaStream_t stream);
// Partial warps: y[i] = 2 x[i] + block sum; ballots[w] = active-lane ballot.
void odd_block(const float* x, float* y, unsigned* ballots, int n, int block, cudaStream_t stream);
// Warp-level matrix primitives (csrc/cuda/warp_mma.cuh). a, b point at 16-bit elements;
// dtype 0 half, 1 bf16.
// d (16x8) = a (16xk) b (kx8) + c, all row major, fragments loaded and stored by the PTX
// layout formulas; k 16 (half or bf16) or 8 (half). misplace swaps two A registers of lane 0.
void mma_fragments(const void* a, const void* b, const float* c, float* d, int dtype, int k,
                   bool misplace, cudaStream_t stream);
// The registers each lane gets from ldmatrix .x{num}{.trans} of the num 8x8 matrices in src:
// out[lane * num + j].
void ldmatrix_fragments(const void* src, unsigned* out, int num, bool trans, cudaStream_t stream);
// d (16x8) = a (16x16) b (16x8) with ldmatrix loads; b_mode 0..3: b stored n-major (.x2),
// k-major (.x2.trans), n-major (2 x .x1), k-major (2 x .x1.trans); b points at that storage.
void ldmatrix_mma(const void* a, const void* b, float* d, int dtype, int b_mode,
                  cudaStream_t stream);
// c (32x16 f32) = a (32xk) b^T with b (16xk): cp.async pipeline of `stages` (1..3) tiles.
void cp_async_gemm(const void* a, const void* b, float* c, int k, int stages, int dtype,
                   cudaStream_t stream);
// y[i] = x[group base + (t + 1) % 64] through shared memory and named barriers 1 and 2, one per
// group of 64 threads; blocks of 128.
void named_barrier_groups(const float* x, float* y, int blocks, cudaStream_t stream);
// y[i] = x[warp base + (lane + 1) % 32] through shared memory and __syncwarp; blocks of 64.
void syncwarp_exchange(const float* x, float* y, int blocks, cudaStream_t stream);
// 256 threads x `blocks` blocks x `rounds` barriers (speed check).
// d (64 x n f32, row major) = a (64 x 64) b^T, b (n x 64), n 32 (b K-major), 64, 128 or 256, by one
// warpgroup's wgmma with its operands in shared memory in layouts mode_a / mode_b
// (selftest_kernels.cu); mode_a < 0: a from registers; mode_b + 8: b described as unswizzled core
// matrices whatever its storage (a wrong descriptor). misuse 1: d gets each thread's accumulators,
// read before the wgmma wait, in thread order (t * n / 2 + v); 2: b's shared memory is zeroed
// before the wait.
void wgmma_gemm(const void* a, const void* b, float* d, int n, int dtype, int mode_a, int mode_b,
                int misuse, cudaStream_t stream);
void barrier_stress(float* data, int blocks, int rounds, cudaStream_t stream);

// Planted faults; each must be caught by the emulator or ASan.
void fault_oob_global(float* x, int n, cudaStream_t stream);
void fault_oob_shared(float* out, cudaStream_t stream);
void fault_uninit_shared(float* out, cudaStream_t stream);  // out[64] <- NaN
// Reads a neighbour's shared-memory write without a barrier; 2 blocks of 32,
// out[64]. Forward order hides it, the reversed second block shows NaN.
void fault_missing_barrier(float* out, cudaStream_t stream);
void fault_divergent_barrier(float* out, cudaStream_t stream);
void fault_warp_deadlock(float* out, cudaStream_t stream);
void fault_empty_grid(float* out, cudaStream_t stream);
// out[32] reads NaN: a cp.async destination read before its group was waited for.
void fault_cp_async_unwaited(const float* x, float* out, cudaStream_t stream);
// out[32] reads NaN: another thread's cp.async destination read without a barrier.
void fault_cp_async_no_barrier(const float* x, float* out, cudaStream_t stream);
void fault_ldmatrix_misaligned(float* out, cudaStream_t stream);
void fault_ldmatrix_global(const void* src, float* out, cudaStream_t stream);
void fault_mma_exited_lane(float* out, cudaStream_t stream);
void fault_wgmma_partial_warpgroup(cudaStream_t stream);  // 96 threads
void fault_wgmma_exited_thread(cudaStream_t stream);      // one thread of the warpgroup exits
// A wgmma on operands that arrived by cp.async (src: 4 KB of bf16), with (fences bit 0) or without
// the fence.proxy.async that must follow the cp.async wait, and with (bit 1) or without a
// wgmma.fence before it; out[128]. Without either, the emulator faults.
void wgmma_cp_async(const void* src, float* out, int fences, cudaStream_t stream);
void fault_named_barrier_count(float* out, cudaStream_t stream);
void fault_named_barrier_split_warp(float* out, cudaStream_t stream);
void fault_smem_limit(float* out, cudaStream_t stream);

}  // namespace gam_selftest
