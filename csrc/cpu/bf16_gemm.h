// bf16 x bf16 -> fp32 tile products on the CPU's bf16 matrix units (AMX), through torch's oneDNN
// BRGeMM micro-kernel (at::native::cpublas::brgemm). Used by the retrieval and fused-mixer kernels
// for bfloat16 inputs where torch has that micro-kernel for the CPU (docs/design.md, "Half
// precision on the CPU"); elsewhere they compute bf16 in fp32 tiles.
//
// The micro-kernel computes C (+)= A B with A row-major bf16, B packed into 256-column panels in
// the pair-interleaved order it reads, C fp32. It takes an even depth only (an odd one stops the
// process with an illegal instruction), so an odd last row of B is added as a rank-1 update.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_common.h"
#include "cpu/simd_avx512.h"

#if GAM_HAVE_ISA_BUILDS
#include <immintrin.h>
#endif

// torch declares these macros with the micro-kernel API used here (brgemm with add_C and is_vnni,
// brgemm_release(is_vnni)); an older torch builds the fp32 tiles only.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F32F32F32)
#define GAM_HAVE_BF16_BRGEMM 1
#else
#define GAM_HAVE_BF16_BRGEMM 0
#endif

namespace gam::cpu {

using bf16 = at::BFloat16;

// True when the bf16 kernels run their products on the bf16 micro-kernel: torch has one for this
// CPU and GAM_EXT_CPU_BF16_GEMM is unset or "auto". GAM_EXT_CPU_BF16_GEMM=fp32 forces the fp32
// tiles. Read on every call, so that tests and benchmarks can compare both in one process.
inline bool bf16_native_gemm() {
#if GAM_HAVE_BF16_BRGEMM
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
#else
  constexpr bool available = false;
#endif
  const char* env = std::getenv("GAM_EXT_CPU_BF16_GEMM");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return available;
  TORCH_CHECK(std::strcmp(env, "fp32") == 0, "GAM_EXT_CPU_BF16_GEMM must be auto or fp32, got '",
              env, "'");
  return false;
}

// True when activations of dtype st run their products on the bf16 micro-kernel.
inline bool bf16_products(at::ScalarType st) { return st == at::kBFloat16 && bf16_native_gemm(); }

#if GAM_HAVE_AVX512_KERNELS
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's intrinsics (simd_avx512.h)
#endif
// col[c] = column c of the 16 x 16 block of 32-bit values whose rows are r[0..15], in registers.
GAM_AVX512 inline __attribute__((always_inline)) void transpose16_avx512(const __m512 r[16],
                                                                         __m512 col[16]) {
  __m512 t[16], u[16];
  // Within each 128-bit lane L: t interleaves row pairs, then u[4g + k] holds column 4L + k of
  // rows 4g .. 4g+3.
  for (int q = 0; q < 16; q += 2) {
    t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512 *a = t + 4 * g, *b = t + 4 * g + 2;
    u[4 * g] = _mm512_shuffle_ps(a[0], b[0], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(a[0], b[0], 0xee);
    u[4 * g + 2] = _mm512_shuffle_ps(a[1], b[1], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(a[1], b[1], 0xee);
  }
  // Gather the lanes: column k + 4m (m = 0..3) of all 16 rows.
  for (int k = 0; k < 4; ++k) {
    const __m512 v_lo = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);       // cols k, 8+k; rows 0-7
    const __m512 v_hi = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);       // cols 4+k, 12+k
    const __m512 w_lo = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);  // rows 8-15
    const __m512 w_hi = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    col[k] = _mm512_shuffle_f32x4(v_lo, w_lo, 0x88);
    col[k + 4] = _mm512_shuffle_f32x4(v_hi, w_hi, 0x88);
    col[k + 8] = _mm512_shuffle_f32x4(v_lo, w_lo, 0xdd);
    col[k + 12] = _mm512_shuffle_f32x4(v_hi, w_hi, 0xdd);
  }
}

// PackedB's panel of columns [j0, j0 + width) of B = b^T (b: element (i, j) of B at
// b[j * ld + i]), pair rows i < even, on AVX-512; the layout of PackedB::pack's scalar loops. A
// pair of B is the 32-bit word at b + j * ld + i, so a panel is a transpose of 32-bit words, done
// here in 16 x 16 blocks in registers (16 against 47 us for a 512 x 512 bank on one core; the
// plain packing is a row interleave that the compiler vectorises well already).
GAM_AVX512 inline void pack_transposed_panel_avx512(const uint16_t* b, int64_t ld, int64_t j0,
                                                    int64_t width, int64_t even,
                                                    int64_t panel_width, uint16_t* panel) {
  const int64_t pairs = even / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    const __mmask16 pm = lanes(pairs - p0);
    for (int64_t jb = 0; jb < panel_width; jb += 16) {
      __m512 r[16], col[16];
      for (int q = 0; q < 16; ++q) {
        const int64_t j = jb + q;
        const float* row = reinterpret_cast<const float*>(b + (j0 + j) * ld + 2 * p0);
        r[q] = j < width ? _mm512_maskz_loadu_ps(pm, row) : _mm512_setzero_ps();
      }
      transpose16_avx512(r, col);
      for (int c = 0; c < 16 && p0 + c < pairs; ++c) {
        _mm512_storeu_ps(reinterpret_cast<float*>(panel + 2 * (p0 + c) * panel_width + 2 * jb),
                         col[c]);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // GAM_HAVE_AVX512_KERNELS

// Columns per packed panel. The micro-kernel reuses each A tile across a panel's columns: on one
// AMX core, 256 x 512 x 512 products ran at about 1930 GFLOP/s with 256-column panels against 1620
// with 64 (1985 against 1600 at 128 rows); 512 gained nothing more.
constexpr int64_t kPanel = 256;

// One pair row of a panel: (r0[j], r1[j]) for j < width, zeros up to kPanel pairs.
inline void pack_pair_row(uint16_t* __restrict pair_row, const uint16_t* __restrict r0,
                          const uint16_t* __restrict r1, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    pair_row[2 * j] = r0[j];
    pair_row[2 * j + 1] = r1[j];
  }
  std::fill(pair_row + 2 * width, pair_row + 2 * kPanel, uint16_t{0});
}

// A bf16 matrix B (k x n) packed for the micro-kernel: panel p holds columns [256p, 256p + 256)
// of the first k rounded down to even rows, as (k / 2) x 256 pairs (B[2i][j], B[2i+1][j]), columns
// past n zero; the odd last row, if any, is kept in fp32. This is the layout torch's
// at::native::cpublas::pack writes for the micro-kernel; packing here reads B^T directly (a pair
// is then two adjacent elements) and needs no scratch.
struct PackedB {
  at::Tensor panels;    // (panel count, even rows, kPanel) bf16
  at::Tensor last_row;  // (n) fp32, when k is odd
  int64_t k = 0, n = 0;

  // b: element (i, j) at b[i * ld + j], or at b[j * ld + i] when trans is set.
  void pack(const bf16* b, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    k = rows;
    n = cols;
    const int64_t even = k & ~int64_t{1};
    const int64_t count = (n + kPanel - 1) / kPanel;
    panels = at::empty({count, even, kPanel}, at::TensorOptions().dtype(at::kBFloat16));
    const uint16_t* src = reinterpret_cast<const uint16_t*>(b);
    uint16_t* const dst = reinterpret_cast<uint16_t*>(panels.mutable_data_ptr<bf16>());
    // Panels are independent: packed in parallel (the backward packs a tile's operands between
    // two parallel phases, where a serial pack left the other threads idle).
    parallel_items(count, [&](int64_t p) {
      const int64_t j0 = p * kPanel, width = std::min(kPanel, n - j0);
      uint16_t* const panel = dst + p * even * kPanel;
#if GAM_HAVE_AVX512_KERNELS
      if (trans && cpu_isa() == CpuIsa::kAvx512) {
        pack_transposed_panel_avx512(src, ld, j0, width, even, kPanel, panel);
        return;
      }
#endif
      if (trans) {
        // Column j of the panel is row j0 + j of the source, read along its pairs, 32 pairs at a
        // time so that the block written (32 pair rows) stays in cache.
        for (int64_t i0 = 0; i0 < even; i0 += 64) {
          const int64_t i1 = std::min(even, i0 + 64);
          for (int64_t j = 0; j < width; ++j) {
            const uint16_t* __restrict col = src + (j0 + j) * ld;
            uint16_t* __restrict out = panel + 2 * j;
            for (int64_t i = i0; i < i1; i += 2) {
              out[i * kPanel] = col[i];
              out[i * kPanel + 1] = col[i + 1];
            }
          }
        }
      }
      for (int64_t i = 0; i < even; i += 2) {
        uint16_t* const pair_row = panel + i * kPanel;
        if (trans) {
          std::fill(pair_row + 2 * width, pair_row + 2 * kPanel, uint16_t{0});
        } else {
          pack_pair_row(pair_row, src + i * ld + j0, src + (i + 1) * ld + j0, width);
        }
      }
    });
    if (k % 2 == 1) {
      last_row = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
      float* lr = last_row.mutable_data_ptr<float>();
      for (int64_t j = 0; j < n; ++j)
        lr[j] = static_cast<float>(trans ? b[j * ld + k - 1] : b[(k - 1) * ld + j]);
    }
  }

  // Panels for a matrix of an even number of rows, to be filled pair of rows by pair of rows with
  // pack_pairs (by several threads at once, each on its own pairs): the retrieval backward packs
  // the rows of a tile where each thread has them in cache, rather than in a pass of its own.
  void allocate(int64_t rows, int64_t cols) {
    TORCH_INTERNAL_ASSERT(rows % 2 == 0);
    k = rows;
    n = cols;
    panels =
        at::empty({(n + kPanel - 1) / kPanel, k, kPanel}, at::TensorOptions().dtype(at::kBFloat16));
    last_row = at::Tensor();
  }

  // Packs the pairs [p0, p1): pair p holds rows 2p and 2p + 1, read from row(2p) and row(2p + 1)
  // (each a pointer to n bf16 values), so that a matrix stacked from several places needs no
  // copy first.
  template <typename RowFn>
  void pack_pairs(int64_t p0, int64_t p1, const RowFn& row) {
    uint16_t* const dst = reinterpret_cast<uint16_t*>(panels.mutable_data_ptr<bf16>());
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(row(2 * p));
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(row(2 * p + 1));
      for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
        pack_pair_row(dst + ((j0 / kPanel) * k + 2 * p) * kPanel, r0 + j0, r1 + j0,
                      std::min(kPanel, n - j0));
      }
    }
  }
};

// The micro-kernel for an (m x kPanel-or-fewer) block of c over `depth` (even) rows of a panel.
// torch generates and caches one kernel per shape and stride, per thread, for the life of the
// process, so callers keep the shapes to a bounded set (split_block below).
inline void brgemm_block(const bf16* a, int64_t lda, int64_t m, const bf16* panel_rows,
                         int64_t width, int64_t depth, float* c, int64_t ldc, bool accumulate) {
#if GAM_HAVE_BF16_BRGEMM
  at::native::cpublas::brgemm(m, width, depth, lda, kPanel, ldc, accumulate, a, panel_rows, c,
                              true);
#else
  TORCH_INTERNAL_ASSERT(false, "gemm_bf16 without torch's bf16 micro-kernel");
#endif
}

// The first block of a length n split into few distinct sizes: min(cap, n rounded down to 64)
// while n >= 64, then the rest (< 64). Rows (cap 256) and depths (cap 512) of every product go
// through it, so that a process sees a bounded set of sizes whatever its sequence lengths
// (torch's kernel cache would otherwise grow with every new tail).
inline int64_t split_block(int64_t n, int64_t cap) {
  return n >= 64 ? std::min(cap, n / 64 * 64) : n;
}

// c[:, 0 : n1 - n0] (+)= a @ B[k0 : k0 + kk, n0 : n1] with a (m x kk) row-major bf16 (row stride
// lda) and c fp32 (row stride ldc): accumulate adds to c, else c is overwritten. k0 must be even,
// n0 a multiple of kPanel, and an odd kk must end at B's last row.
inline void gemm_bf16(const bf16* a, int64_t lda, int64_t m, const PackedB& b, int64_t k0,
                      int64_t kk, float* c, int64_t ldc, bool accumulate, int64_t n0, int64_t n1) {
  TORCH_INTERNAL_ASSERT(k0 % 2 == 0 && n0 % kPanel == 0 && n1 <= b.n);
  TORCH_INTERNAL_ASSERT(kk % 2 == 0 || k0 + kk == b.k);
  if (m == 0 || n1 <= n0) return;
  const int64_t even = kk & ~int64_t{1};
  const int64_t packed_rows = b.panels.size(1);
  const bf16* panels = b.panels.const_data_ptr<bf16>();
  for (int64_t p = n0 / kPanel; p * kPanel < n1; ++p) {
    const int64_t width = std::min(kPanel, n1 - p * kPanel);
    const bf16* panel = panels + (p * packed_rows + k0) * kPanel;
    for (int64_t i0 = 0; i0 < m; i0 += split_block(m - i0, 256)) {
      const int64_t rows = split_block(m - i0, 256);
      float* cp = c + i0 * ldc + (p * kPanel - n0);
      const bf16* ap = a + i0 * lda;
      if (even == 0 && !accumulate) {
        for (int64_t i = 0; i < rows; ++i) std::fill(cp + i * ldc, cp + i * ldc + width, 0.0f);
      }
      // The depth in blocks too (each even, so the pairs stay aligned); the first block
      // overwrites c unless accumulating, the others add.
      for (int64_t d0 = 0; d0 < even; d0 += split_block(even - d0, 512)) {
        brgemm_block(ap + d0, lda, rows, panel + d0 * kPanel, width, split_block(even - d0, 512),
                     cp, ldc, accumulate || d0 > 0);
      }
      if (kk % 2 == 1) {
        const float* __restrict lr = b.last_row.const_data_ptr<float>() + p * kPanel;
        for (int64_t i = 0; i < rows; ++i) {
          const float ai = static_cast<float>(ap[i * lda + kk - 1]);
          float* __restrict ci = cp + i * ldc;
          for (int64_t j = 0; j < width; ++j) ci[j] += ai * lr[j];
        }
      }
    }
  }
}

// A row-major bf16 matrix X (rows x cols) packed as B = X (for a @ X) and as B = X^T (for
// a @ X^T), each where asked for: the memory bank is used both ways, the gate weight one way in
// each direction.
struct PackedBothWays {
  PackedB x, xt;

  PackedBothWays(const at::Tensor& x_bf16, bool plain, bool transposed) {
    const at::Tensor c = x_bf16.contiguous();
    const int64_t rows = c.size(0), cols = c.size(1);
    if (plain) x.pack(c.const_data_ptr<bf16>(), rows, cols, cols, false);
    if (transposed) xt.pack(c.const_data_ptr<bf16>(), cols, rows, cols, true);
  }
};

// Returns the micro-kernel's hardware state (AMX tile configuration) at the end of a work item,
// as torch does after its own uses.
inline void release_bf16_gemm() {
#if GAM_HAVE_BF16_BRGEMM
  at::native::cpublas::brgemm_release(true);
#endif
}

// x as bf16: rounded (to_bf16) from fp32, as is from bf16.
inline bf16 as_bf16(float x) { return to_bf16(x); }
inline bf16 as_bf16(bf16 x) { return x; }

// The blocked scalar transpose of transpose_to_bf16 below, over rows [i0, i1) x columns [j0, j1)
// in 32 x 32 blocks, so that the writes stay in cache.
template <typename S>
inline void transpose_to_bf16_scalar(const S* src, int64_t ld_src, int64_t i0, int64_t i1,
                                     int64_t j0, int64_t j1, bf16* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 32;
  for (int64_t ib = i0; ib < i1; ib += kBlock) {
    const int64_t ie = std::min(i1, ib + kBlock);
    for (int64_t jb = j0; jb < j1; jb += kBlock) {
      const int64_t je = std::min(j1, jb + kBlock);
      for (int64_t j = jb; j < je; ++j) {
        for (int64_t i = ib; i < ie; ++i) dst[j * ld_dst + i] = as_bf16(src[i * ld_src + j]);
      }
    }
  }
}

#if GAM_HAVE_ISA_BUILDS
// to_bf16 on 8 lanes, each result in the low 16 bits of its 32-bit lane.
GAM_AVX2 inline __attribute__((always_inline)) __m256i bf16_8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

// transpose_to_bf16 in 8 x 8 blocks held in registers (the scalar loop gathers every element with
// a strided load); the edges that do not fill a block go through the scalar loop.
GAM_AVX2 inline void transpose_to_bf16_avx2(const float* src, int64_t ld_src, int64_t rows,
                                            int64_t cols, bf16* dst, int64_t ld_dst) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t i0 = 0; i0 < rows8; i0 += 8) {
    for (int64_t j0 = 0; j0 < cols8; j0 += 8) {
      __m256 r[8], u[8], v[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + (i0 + q) * ld_src + j0);
      for (int q = 0; q < 8; q += 2) {
        u[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        u[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
      }
      for (int q = 0; q < 8; q += 4) {
        v[q] = _mm256_shuffle_ps(u[q], u[q + 2], 0x44);
        v[q + 1] = _mm256_shuffle_ps(u[q], u[q + 2], 0xee);
        v[q + 2] = _mm256_shuffle_ps(u[q + 1], u[q + 3], 0x44);
        v[q + 3] = _mm256_shuffle_ps(u[q + 1], u[q + 3], 0xee);
      }
      // Column c of the block: v[c % 4] (rows 0-3) and v[c % 4 + 4] (rows 4-7), in the low
      // 128-bit half for c < 4, in the high half otherwise.
      for (int c = 0; c < 8; c += 2) {
        const int lane = c / 4, k = c % 4;
        const __m256 col0 = lane == 0 ? _mm256_permute2f128_ps(v[k], v[k + 4], 0x20)
                                      : _mm256_permute2f128_ps(v[k], v[k + 4], 0x31);
        const __m256 col1 = lane == 0 ? _mm256_permute2f128_ps(v[k + 1], v[k + 5], 0x20)
                                      : _mm256_permute2f128_ps(v[k + 1], v[k + 5], 0x31);
        // packus gives [col0 0-3, col1 0-3 | col0 4-7, col1 4-7]; the permute puts each column in
        // one half.
        const __m256i packed =
            _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_8(col0), bf16_8(col1)), 0xd8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j0 + c) * ld_dst + i0),
                         _mm256_castsi256_si128(packed));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j0 + c + 1) * ld_dst + i0),
                         _mm256_extracti128_si256(packed, 1));
      }
    }
    transpose_to_bf16_scalar(src, ld_src, i0, i0 + 8, cols8, cols, dst, ld_dst);
  }
  transpose_to_bf16_scalar(src, ld_src, rows8, rows, 0, cols, dst, ld_dst);
}

#if GAM_HAVE_AVX512_KERNELS
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's intrinsics (simd_avx512.h)
#endif
// transpose_to_bf16 in 16 x 16 blocks held in AVX-512 registers (a quarter of the AVX2 build's
// shuffles per element). A bf16 source is widened to one 32-bit lane per element, moved by the
// same transpose and narrowed back unchanged. The edges go through the AVX2 build (fp32) or the
// scalar loop (bf16).
template <typename S>
GAM_AVX512 inline void transpose_to_bf16_avx512(const S* src, int64_t ld_src, int64_t rows,
                                                int64_t cols, bf16* dst, int64_t ld_dst) {
  constexpr bool kFromBf16 = std::is_same_v<S, bf16>;
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i0 = 0; i0 < rows16; i0 += 16) {
    for (int64_t j0 = 0; j0 < cols16; j0 += 16) {
      __m512 r[16], col[16];
      for (int q = 0; q < 16; ++q) {
        const S* row = src + (i0 + q) * ld_src + j0;
        if constexpr (kFromBf16) {
          r[q] = _mm512_castsi512_ps(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))));
        } else {
          r[q] = _mm512_loadu_ps(row);
        }
      }
      transpose16_avx512(r, col);
      for (int c = 0; c < 16; ++c) {
        __m256i out;
        if constexpr (kFromBf16) {
          out = _mm512_cvtepi32_epi16(_mm512_castps_si512(col[c]));
        } else {
          out = bf16_16(col[c]);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j0 + c) * ld_dst + i0), out);
      }
    }
  }
  if constexpr (kFromBf16) {
    transpose_to_bf16_scalar(src, ld_src, 0, rows16, cols16, cols, dst, ld_dst);
    transpose_to_bf16_scalar(src, ld_src, rows16, rows, 0, cols, dst, ld_dst);
  } else {
    if (cols16 < cols) {
      transpose_to_bf16_avx2(src + cols16, ld_src, rows16, cols - cols16, dst + cols16 * ld_dst,
                             ld_dst);
    }
    transpose_to_bf16_avx2(src + rows16 * ld_src, ld_src, rows - rows16, cols, dst + rows16,
                           ld_dst);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // GAM_HAVE_AVX512_KERNELS
#endif

// dst (cols x rows, row stride ld_dst) = src (rows x cols, fp32 or bf16, row stride ld_src)
// transposed, fp32 rounded to bf16: the A operand of a product over the rows of src. to_bf16 rather
// than c10's conversion, whose NaN branch kept the loop scalar; on AVX-512 in 16 x 16 blocks, fp32
// on AVX2 CPUs in 8 x 8 register blocks (4x faster than the blocked scalar loop).
template <typename S>
inline void transpose_to_bf16(const S* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst,
                              int64_t ld_dst) {
#if GAM_HAVE_AVX512_KERNELS
  if (cpu_isa() == CpuIsa::kAvx512) {
    transpose_to_bf16_avx512(src, ld_src, rows, cols, dst, ld_dst);
    return;
  }
#endif
#if GAM_HAVE_ISA_BUILDS
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_isa() >= CpuIsa::kAvx2) {
      transpose_to_bf16_avx2(src, ld_src, rows, cols, dst, ld_dst);
      return;
    }
  }
#endif
  transpose_to_bf16_scalar(src, ld_src, 0, rows, 0, cols, dst, ld_dst);
}

}  // namespace gam::cpu
