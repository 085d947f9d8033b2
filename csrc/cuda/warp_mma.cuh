// Warp-level matrix primitives of the project's kernels: ldmatrix, mma.sync m16n8k16 (f16 and
// bf16 in, f32 accumulate), cp.async 16-byte copies with commit / wait groups, named barriers,
// and the register packing they need. Under nvcc they are inline PTX; in the emulated build
// (GAM_EMULATE) they are the SIMT emulator's warp collectives (csrc/emu/warp_matrix.h), which give
// every lane exactly the registers it holds on the GPU, in the PTX ISA's fragment layouts:
//
//   groupID g = lane >> 2, tig t = lane % 4 (threadID_in_group)
//   A (16x16, row major), 4 registers of two 16-bit elements (lower column in the low half):
//     a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//     a[2] = A[g][2t+8..+9]    a[3] = A[g+8][2t+8..+9]
//   B (16x8, k x n, "col": read as n rows of k), 2 registers:
//     b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C, D (16x8 f32): c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
//   ldmatrix .x{1,2,4}: lanes 8j..8j+7 give the row addresses of 8x8 matrix j (16 bytes per
//     row, 16-byte aligned, shared memory); register j of lane l gets row l/4, columns
//     2(l%4)..+1 of matrix j, or with .trans column l/4, rows 2(l%4)..+1.
//
// So an accumulator tile of S (16 x 16, two n-tiles) is, register for register, the A operand
// of the next product: {c[0..1] of n-tile 0, c[2..3] of n-tile 0, c[0..1] of n-tile 1,
// c[2..3] of n-tile 1} packed to 16 bits are a[0..3] (FlashAttention-2's register reuse).
//
// Architecture: mma m16n8k16 and cp.async need sm_80. On sm_75 (fp16 only) the m16n8k16 product
// is two m16n8k8 products and cp.async a plain 16-byte copy (commit / wait are then no-ops);
// bf16 products trap there (the host never picks a bf16 tensor-core kernel below sm_80).
// ldmatrix needs sm_75. Emulation takes the sm_80 path.
#pragma once

#include <cstdint>
#include <type_traits>

#include "compat.cuh"

#if GAM_IS_EMULATED
// Call sites recorded for the emulator's fault messages.
#define GAM_MMA_SITE \
  , const char *gam_site_file = __builtin_FILE(), int gam_site_line = __builtin_LINE()
#define GAM_MMA_SITE_ARGS gam_site_file, gam_site_line
#else
#define GAM_MMA_SITE
#endif

#if !GAM_IS_EMULATED && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GAM_MMA_SM75 1
#else
#define GAM_MMA_SM75 0
#endif

namespace gam {
namespace cuda {

// Whether this compilation pass has a tensor-core product for T (bf16 needs sm_80).
template <typename T>
constexpr bool kMmaCompiled = !(GAM_MMA_SM75 && std::is_same<T, __nv_bfloat16>::value);

#if !GAM_IS_EMULATED
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ---- ldmatrix -------------------------------------------------------------------------------

template <int N, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row GAM_MMA_SITE) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if GAM_IS_EMULATED
  ::gam_emu::ldmatrix<N, kTrans>(r, smem_row, GAM_MMA_SITE_ARGS);
#else
  const uint32_t a = smem_u32(smem_row);
  if constexpr (N == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(a));
  } else if constexpr (N == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
#endif
}

// ---- mma.sync ---------------------------------------------------------------------------------

// d = a b + c (16x8x16, f32 accumulate); d may alias c. T: __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2],
                                             const float (&c)[4] GAM_MMA_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_m16n8k16 takes __half or __nv_bfloat16");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if GAM_IS_EMULATED
  ::gam_emu::mma<16, kBf16>(d, a, b, c, GAM_MMA_SITE_ARGS);
#elif GAM_MMA_SM75
  if constexpr (kBf16) {
    __trap();
  } else {  // two k8 halves: a[0..1] / b[0] are k 0..7, a[2..3] / b[1] k 8..15
    float t[4];
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(t[0]), "=f"(t[1]), "=f"(t[2]), "=f"(t[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b[1]), "f"(t[0]), "f"(t[1]), "f"(t[2]), "f"(t[3]));
  }
#else
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
#endif
}

// d = a b + c (16x8x8, f16 in, f32 accumulate): the sm_75 product, also exposed for the
// emulator's self-tests.
__device__ __forceinline__ void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2],
                                                const uint32_t (&b)[1],
                                                const float (&c)[4] GAM_MMA_SITE) {
#if GAM_IS_EMULATED
  ::gam_emu::mma<8, false>(d, a, b, c, GAM_MMA_SITE_ARGS);
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// ---- cp.async ---------------------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1 (.cg); with valid false the destination is zero-filled
// and nothing is read (src must still be a valid address). Both 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src,
                                            bool valid GAM_MMA_SITE) {
#if GAM_IS_EMULATED
  ::gam_emu::cp_async(smem_dst, gmem_src, 16, valid ? 16 : 0, "cp.async.cg.shared.global",
                      GAM_MMA_SITE_ARGS);
#elif GAM_MMA_SM75
  *static_cast<uint4*>(smem_dst) =
      valid ? *static_cast<const uint4*>(gmem_src) : make_uint4(0u, 0u, 0u, 0u);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(valid ? 16 : 0));
#endif
}

// Closes the thread's current group of cp.async.
__device__ __forceinline__ void cp_async_commit() {
#if GAM_IS_EMULATED
  ::gam_emu::cp_async_commit();
#elif !GAM_MMA_SM75
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of the thread's committed groups are still in flight. Other threads'
// copies need a barrier after this before they are read.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if GAM_IS_EMULATED
  ::gam_emu::cp_async_wait(N);
#elif !GAM_MMA_SM75
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- ordered global loads ---------------------------------------------------------------------

// A 16-byte global load (16-byte aligned) that ptxas does not sink below a barrier. The compiler
// takes loads of const __restrict__ data through the read-only path (ld.global.nc), and ptxas
// sinks those below a barrier or a cp.async wait, next to their use, so their latency is paid
// after the wait instead of under it. A plain ld.global stays above a barrier, but may still
// move below a cp.async wait: issue it before the copies it should overlap (nvcc 13.0, read in
// the SASS of memory_retrieval_bwd_wgmma.cu).
__device__ __forceinline__ uint4 ld_global_16(const void* src) {
#if GAM_IS_EMULATED
  return *static_cast<const uint4*>(src);
#else
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
#endif
}

// ---- named barriers ----------------------------------------------------------------------------

// bar.sync id, nthreads: waits until nthreads threads (whole warps) of the block have reached
// barrier id (1..15; 0 is __syncthreads), and orders their shared-memory accesses like
// __syncthreads does. Lets groups of warps synchronise without stopping the rest of the block.
// The id is made an immediate (ids 1..8 here): with a register id ptxas reserves all 16 of the
// block's barriers.
__device__ __forceinline__ void named_barrier_sync(int id, int nthreads GAM_MMA_SITE) {
#if GAM_IS_EMULATED
  ::gam_emu::named_barrier(id, nthreads, GAM_MMA_SITE_ARGS);
#else
  switch (id) {
    case 1:
      asm volatile("bar.sync 1, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 2:
      asm volatile("bar.sync 2, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 3:
      asm volatile("bar.sync 3, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 4:
      asm volatile("bar.sync 4, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 5:
      asm volatile("bar.sync 5, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 6:
      asm volatile("bar.sync 6, %0;\n" ::"r"(nthreads) : "memory");
      break;
    case 7:
      asm volatile("bar.sync 7, %0;\n" ::"r"(nthreads) : "memory");
      break;
    default:
      asm volatile("bar.sync 8, %0;\n" ::"r"(nthreads) : "memory");
      break;
  }
#endif
}

// ---- math -------------------------------------------------------------------------------------

// 2^x with the special function unit (ex2.approx.ftz: about 2 ulp, denormal results flushed).
// The emulated build uses libm's exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#if GAM_IS_EMULATED
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---- register packing -------------------------------------------------------------------------

// Two floats rounded to T, packed as one .b32 register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    static_assert(sizeof(v) == 4, "bf16x2 is 4 bytes");
    __builtin_memcpy(&r, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    __builtin_memcpy(&r, &v, 4);
  }
  return r;
}

// The two T of a .b32 register as floats.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t r, float& lo, float& hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v;
    __builtin_memcpy(&v, &r, 4);
    lo = __low2float(v);
    hi = __high2float(v);
  } else {
    __half2 v;
    __builtin_memcpy(&v, &r, 4);
    lo = __low2float(v);
    hi = __high2float(v);
  }
}

}  // namespace cuda
}  // namespace gam
