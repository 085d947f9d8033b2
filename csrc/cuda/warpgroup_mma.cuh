// Warpgroup-level matrix primitives (sm_90a): wgmma.mma_async m64nNk16 with f16 or bf16
// operands and f32 accumulators, A from shared memory or from registers and B from shared memory
// through 64-bit matrix descriptors, with wgmma.fence / commit_group / wait_group and the
// generic-to-async proxy fence that shared-memory operands written by ordinary stores need.
// Under nvcc they are inline PTX (sm_90a only: other targets compile a trap, and the host must
// not launch such kernels there); in the emulated build they are the emulator's warpgroup
// collectives (csrc/emu/warpgroup_matrix.h), which hold each thread's registers in the PTX ISA's
// layouts and queue each product until its wait_group, as the GPU does.
//
// A warpgroup is 4 consecutive warps (threads 128 g .. 128 g + 127); all 128 threads execute
// each of these together. Register layouts (thread t of the warpgroup, warp w = t / 32, lane l,
// g = l / 4, q = l % 4):
//   D (64 x N f32), d[N / 2]: d[4 j + 2 h + c] = D[16 w + g + 8 h][8 j + 2 q + c]
//   A (64 x 16), a[4], two elements per register, lower k in the low half: a[0] = A[16 w + g]
//     [2 q ..], a[1] = A[16 w + g + 8][2 q ..], a[2] = A[16 w + g][2 q + 8 ..], a[3] = A[16 w +
//     g + 8][2 q + 8 ..].
// So, as with mma.sync, two adjacent 8-column blocks of an accumulator, rounded to 16 bits, are
// the A registers of the next product (FlashAttention's S -> P reuse).
//
// Shared-memory operands: an operand is 64 x 16 (A) or N x 16 (B) elements; "K-major" when k is
// the contiguous dimension (transpose flag 0), "MN-major" when M or N is (flag 1). Their layouts
// in shared memory are the canonical ones of the PTX ISA, described by wgmma_descriptor's
// arguments; csrc/emu/warpgroup_matrix.h spells out the address of every element for each
// layout. The swizzled layouts (32, 64, 128 bytes) need the tile at an 8 x swizzle-byte aligned
// shared address.
//
// Order of operations (PTX ISA): write the shared operands, fence_proxy_async_shared(), a
// barrier; wgmma_fence() before the first wgmma_mma of a sequence (and whenever the accumulators
// or A registers were touched by other instructions since); issue the products; wgmma_commit();
// wgmma_wait<N>() before the accumulators are read or the operands overwritten.
#pragma once

#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "warp_mma.cuh"  // cp_async_16, for cp_async_rows_to_panels

#if GAM_IS_EMULATED
// Call sites recorded for the emulator's fault messages.
#define GAM_WG_SITE_ONLY \
  const char *gam_site_file = __builtin_FILE(), int gam_site_line = __builtin_LINE()
#define GAM_WG_SITE , GAM_WG_SITE_ONLY
#define GAM_WG_SITE_ARGS gam_site_file, gam_site_line
#else
#define GAM_WG_SITE_ONLY
#define GAM_WG_SITE
#endif

// Whether this compilation pass has wgmma: sm_90a device code, or the emulator.
#if GAM_IS_EMULATED || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GAM_WGMMA_COMPILED 1
#else
#define GAM_WGMMA_COMPILED 0
#endif

namespace gam {
namespace cuda {

// The 32-bit shared-window address of a pointer into shared memory (dynamic shared memory in the
// emulated build).
__device__ __forceinline__ uint32_t shared_address(const void* p GAM_WG_SITE) {
#if GAM_IS_EMULATED
  return ::gam_emu::shared_window_address(p, "shared_address", GAM_WG_SITE_ARGS);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The descriptor's swizzle codes.
enum class WgmmaSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

// A shared-memory matrix descriptor: the operand's start address and its leading and stride byte
// offsets (multiples of 16; see warpgroup_matrix.h for what each means per layout).
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t shared_addr, uint32_t lbo_bytes,
                                                     uint32_t sbo_bytes, WgmmaSwizzle swizzle) {
  return static_cast<uint64_t>((shared_addr & 0x3ffffu) >> 4) |
         static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16 |
         static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32 |
         static_cast<uint64_t>(swizzle) << 62;
}

// The layout both retrieval kernels keep their operands in: panels of 64 16-bit columns (one
// 128-byte row each) and 8-row groups 1024 bytes apart, 16-byte chunks swizzled by row (the
// PTX ISA's 128-byte swizzle; panels 1024-byte aligned). Read K-major when the columns are k,
// MN-major (LBO = the panel stride) when they are m or n.
// The bytes of a 64-row panel.
constexpr int kPanelBytes = 64 * 128;

// Byte offset of 16-byte chunk c (0..7) of row r in a panel.
[[maybe_unused]] __device__ __forceinline__ uint32_t swizzle128_offset(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}

// Byte offset of 16-byte chunk c of row r in a tile of 64-row panels (panel c / 8).
[[maybe_unused]] __device__ __forceinline__ uint32_t swizzle128_tile_offset(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * kPanelBytes) + swizzle128_offset(r, c & 7);
}

// Rows [0, kRows) of a row-major (rows_left x dim) matrix of 16-bit elements (dim % 64 == 0)
// into a tile of kRows-row panels of 64 columns laid out as above (64-row panels: such a tile),
// by kThreads threads (tid < kThreads), one cp.async per 16-byte chunk; rows past rows_left are
// zero-filled. With parts > 1 only the columns of part `part` of `parts` equal parts of each
// row (the caller's share of D), into their own panels. Unsigned index math, so a constant dim
// divides by shifts.
template <int kThreads, int kRows = 64, typename T>
__device__ __forceinline__ void cp_async_rows_to_panels(unsigned char* dst, const T* src,
                                                        int64_t rows_left, int dim, int tid,
                                                        int parts = 1, int part = 0) {
  const unsigned per_row = static_cast<unsigned>(dim) / 8 / parts;  // 16-byte chunks per part
  for (int q = tid; q < kRows * static_cast<int>(per_row); q += kThreads) {
    const int r = unsigned(q) / per_row;
    const int c = static_cast<int>(unsigned(q) % per_row + part * per_row);
    const bool ok = r < rows_left;
    cp_async_16(dst + (c >> 3) * (kRows * 128) + swizzle128_offset(r, c & 7),
                src + (ok ? int64_t(r) * dim + c * 8 : 0), ok);
  }
}

// The descriptor of such an operand at shared address addr (LBO: unused K-major, the panel
// stride MN-major).
[[maybe_unused]] __device__ __forceinline__ uint64_t swizzle128_descriptor(uint32_t addr,
                                                                           uint32_t lbo) {
  return wgmma_descriptor(addr, lbo, 1024, WgmmaSwizzle::k128B);
}

// Makes this thread's ordinary shared-memory stores visible to the async proxy that wgmma reads
// shared memory through (then a barrier, for other threads' stores).
__device__ __forceinline__ void fence_proxy_async_shared() {
#if GAM_IS_EMULATED
  ::gam_emu::proxy_fence_async_shared();
#elif GAM_WGMMA_COMPILED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if GAM_IS_EMULATED
  ::gam_emu::set_wgmma_fenced(true);
#elif GAM_WGMMA_COMPILED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the warpgroup's queued products into a group.
__device__ __forceinline__ void wgmma_commit(GAM_WG_SITE_ONLY) {
#if GAM_IS_EMULATED
  ::gam_emu::wgmma_commit_group(GAM_WG_SITE_ARGS);
#elif GAM_WGMMA_COMPILED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N of the warpgroup's committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait(GAM_WG_SITE_ONLY) {
#if GAM_IS_EMULATED
  ::gam_emu::wgmma_wait_group(N, GAM_WG_SITE_ARGS);
#elif GAM_WGMMA_COMPILED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving other uses of the accumulators (float) or of A operands held in
// registers (uint32_t, wgmma_mma_regs) across the asynchronous product: the registers are in
// flight from wgmma_fence until the wait.
template <typename V, int R>
__device__ __forceinline__ void wgmma_fence_registers(V (&x)[R]) {
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, uint32_t>,
                "wgmma_fence_registers takes accumulators (float) or A registers (uint32_t)");
#if !GAM_IS_EMULATED
#pragma unroll
  for (int i = 0; i < R; ++i) {
    if constexpr (std::is_same_v<V, float>) {
      asm volatile("" : "+f"(x[i])::"memory");
    } else {
      asm volatile("" : "+r"(x[i])::"memory");
    }
  }
#else
  (void)x;
#endif
}

// The accumulator operand lists of the asm statements below (N / 2 registers for N = 32, 64, 128
// and 256) and their "{%0, ..., %(N / 2 - 1)}" strings.
#define GAM_WG_D8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define GAM_WG_D16_OPS GAM_WG_D8(0), GAM_WG_D8(8)
#define GAM_WG_D32_OPS GAM_WG_D16_OPS, GAM_WG_D8(16), GAM_WG_D8(24)
#define GAM_WG_D64_OPS GAM_WG_D32_OPS, GAM_WG_D8(32), GAM_WG_D8(40), GAM_WG_D8(48), GAM_WG_D8(56)
#define GAM_WG_D128_OPS                                                                      \
  GAM_WG_D64_OPS, GAM_WG_D8(64), GAM_WG_D8(72), GAM_WG_D8(80), GAM_WG_D8(88), GAM_WG_D8(96), \
      GAM_WG_D8(104), GAM_WG_D8(112), GAM_WG_D8(120)
#define GAM_WG_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define GAM_WG_D32                                                                 \
  "{"                                                                              \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "         \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
  "}"
#define GAM_WG_D64                                                                   \
  "{"                                                                                \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"   \
  "}"
#define GAM_WG_D128                                                                                \
  "{"                                                                                              \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                         \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "               \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "               \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "               \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "               \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "               \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "   \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
  "}"

// One wgmma.mma_async with both operands in shared memory: SHAPE "m64nNk16", TY "f16" or "bf16",
// D the accumulator string and operand list, then the operand numbers (as strings) of desc_a,
// desc_b, scale_d and the two transpose flags, which follow the N / 2 accumulators.
#define GAM_WGMMA_SS(SHAPE, TY, D, D_OPS, IA, IB, IS, ITA, ITB)                                \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS                                         \
               ", 0;\n"                                                                        \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " D ", %" IA ", %" IB \
               ", p, 1, 1, %" ITA ", %" ITB ";\n}\n"                                           \
               : D_OPS                                                                         \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(ta), "n"(tb))
// The same with A in registers: IA0 .. IA3 the operand numbers of its four registers, then those
// of desc_b, scale_d and B's transpose flag.
#define GAM_WGMMA_RS(SHAPE, TY, D, D_OPS, IA0, IA1, IA2, IA3, IB, IS, ITB)                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS                                            \
               ", 0;\n"                                                                           \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " D ", {%" IA0 ", %" IA1 \
               ", %" IA2 ", %" IA3 "}, %" IB ", p, 1, 1, %" ITB ";\n}\n"                          \
               : D_OPS                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(tb))

// d (64 x N, f32) = A B (+ d when accumulate), A (64 x 16) and B (N x 16) in shared memory
// through their descriptors; kTransA / kTransB: the operand is MN-major (else K-major).
// T: __half or __nv_bfloat16; N: 32, 64, 128 or 256 (32 only with B K-major: the project uses
// it for the scores of 32-slot tiles, and the self-test covers no MN-major B of 32 columns).
template <typename T, int N, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_mma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                          bool accumulate GAM_WG_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "wgmma_mma takes __half or __nv_bfloat16");
  static_assert(N == 32 || N == 64 || N == 128 || N == 256, "wgmma_mma: N is 32, 64, 128 or 256");
  static_assert(N != 32 || !kTransB, "wgmma_mma: N = 32 takes B K-major");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if GAM_IS_EMULATED
  ::gam_emu::wgmma_mma_async(d, nullptr, desc_a, desc_b, N, kBf16, kTransA, kTransB, accumulate,
                             GAM_WG_SITE_ARGS);
#elif GAM_WGMMA_COMPILED
  const uint32_t scale_d = accumulate ? 1u : 0u;
  constexpr int ta = kTransA ? 1 : 0, tb = kTransB ? 1 : 0;
  if constexpr (N == 32 && kBf16) {
    GAM_WGMMA_SS("m64n32k16", "bf16", GAM_WG_D16, GAM_WG_D16_OPS, "16", "17", "18", "19", "20");
  } else if constexpr (N == 32) {
    GAM_WGMMA_SS("m64n32k16", "f16", GAM_WG_D16, GAM_WG_D16_OPS, "16", "17", "18", "19", "20");
  } else if constexpr (N == 64 && kBf16) {
    GAM_WGMMA_SS("m64n64k16", "bf16", GAM_WG_D32, GAM_WG_D32_OPS, "32", "33", "34", "35", "36");
  } else if constexpr (N == 64) {
    GAM_WGMMA_SS("m64n64k16", "f16", GAM_WG_D32, GAM_WG_D32_OPS, "32", "33", "34", "35", "36");
  } else if constexpr (N == 128 && kBf16) {
    GAM_WGMMA_SS("m64n128k16", "bf16", GAM_WG_D64, GAM_WG_D64_OPS, "64", "65", "66", "67", "68");
  } else if constexpr (N == 128) {
    GAM_WGMMA_SS("m64n128k16", "f16", GAM_WG_D64, GAM_WG_D64_OPS, "64", "65", "66", "67", "68");
  } else if constexpr (kBf16) {
    GAM_WGMMA_SS("m64n256k16", "bf16", GAM_WG_D128, GAM_WG_D128_OPS, "128", "129", "130", "131",
                 "132");
  } else {
    GAM_WGMMA_SS("m64n256k16", "f16", GAM_WG_D128, GAM_WG_D128_OPS, "128", "129", "130", "131",
                 "132");
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate, (void)kBf16;
  __trap();
#endif
}

// The same with A (64 x 16) in registers, a[4] per thread in the layout above.
template <typename T, int N, bool kTransB>
__device__ __forceinline__ void wgmma_mma_regs(float (&d)[N / 2], const uint32_t (&a)[4],
                                               uint64_t desc_b, bool accumulate GAM_WG_SITE) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "wgmma_mma_regs takes __half or __nv_bfloat16");
  static_assert(N == 32 || N == 64 || N == 128 || N == 256,
                "wgmma_mma_regs: N is 32, 64, 128 or 256");
  static_assert(N != 32 || !kTransB, "wgmma_mma_regs: N = 32 takes B K-major");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if GAM_IS_EMULATED
  ::gam_emu::wgmma_mma_async(d, a, 0, desc_b, N, kBf16, false, kTransB, accumulate,
                             GAM_WG_SITE_ARGS);
#elif GAM_WGMMA_COMPILED
  const uint32_t scale_d = accumulate ? 1u : 0u;
  constexpr int tb = kTransB ? 1 : 0;
  if constexpr (N == 32 && kBf16) {
    GAM_WGMMA_RS("m64n32k16", "bf16", GAM_WG_D16, GAM_WG_D16_OPS, "16", "17", "18", "19", "20",
                 "21", "22");
  } else if constexpr (N == 32) {
    GAM_WGMMA_RS("m64n32k16", "f16", GAM_WG_D16, GAM_WG_D16_OPS, "16", "17", "18", "19", "20", "21",
                 "22");
  } else if constexpr (N == 64 && kBf16) {
    GAM_WGMMA_RS("m64n64k16", "bf16", GAM_WG_D32, GAM_WG_D32_OPS, "32", "33", "34", "35", "36",
                 "37", "38");
  } else if constexpr (N == 64) {
    GAM_WGMMA_RS("m64n64k16", "f16", GAM_WG_D32, GAM_WG_D32_OPS, "32", "33", "34", "35", "36", "37",
                 "38");
  } else if constexpr (N == 128 && kBf16) {
    GAM_WGMMA_RS("m64n128k16", "bf16", GAM_WG_D64, GAM_WG_D64_OPS, "64", "65", "66", "67", "68",
                 "69", "70");
  } else if constexpr (N == 128) {
    GAM_WGMMA_RS("m64n128k16", "f16", GAM_WG_D64, GAM_WG_D64_OPS, "64", "65", "66", "67", "68",
                 "69", "70");
  } else if constexpr (kBf16) {
    GAM_WGMMA_RS("m64n256k16", "bf16", GAM_WG_D128, GAM_WG_D128_OPS, "128", "129", "130", "131",
                 "132", "133", "134");
  } else {
    GAM_WGMMA_RS("m64n256k16", "f16", GAM_WG_D128, GAM_WG_D128_OPS, "128", "129", "130", "131",
                 "132", "133", "134");
  }
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate, (void)kBf16;
  __trap();
#endif
}

#undef GAM_WGMMA_SS
#undef GAM_WGMMA_RS
#undef GAM_WG_D8
#undef GAM_WG_D16_OPS
#undef GAM_WG_D32_OPS
#undef GAM_WG_D64_OPS
#undef GAM_WG_D128_OPS
#undef GAM_WG_D16
#undef GAM_WG_D32
#undef GAM_WG_D64
#undef GAM_WG_D128

}  // namespace cuda
}  // namespace gam
