// Hand-written AVX-512 versions of the softmax loops of retrieval_tiles.h, for fp32 tiles: the
// online softmax of a chunk (with the bf16 copy of p that the bf16 products read) and the softmax
// backward. GCC's AVX-512 auto-vectorisation gained nothing on the softmax (it keeps 8-lane
// selects and scalar tails). With 16-lane intrinsics and masked tails, on one core of a Xeon with
// AVX-512: 62 against 108 us (the AVX2 build) for a 256 x 512 softmax chunk with its bf16 copy, and
// 34 against 52 us for a 128 x 512 softmax backward; 51 and 26 us (with its bf16 copy) since the
// clamp of exp16 became two float ops and the chunk stopped storing fp32 p that nothing reads. The
// math is fast_exp's and to_bf16's, lane by lane; only the order of the row sums differs (the
// same 16 partial sums, added in another tree).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/cpu_common.h"

#if GAM_HAVE_ISA_BUILDS
#include <immintrin.h>
#define GAM_HAVE_AVX512_KERNELS 1
#else
#define GAM_HAVE_AVX512_KERNELS 0
#endif

namespace gam::cpu {

#if GAM_HAVE_AVX512_KERNELS
// GCC 12's AVX-512 intrinsics initialise a placeholder from itself (`__m512 __Y = __Y;`), which
// -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define GAM_AVX512_INLINE GAM_AVX512 inline __attribute__((always_inline))

// The lanes [0, n) of a 16-lane block, n <= 16.
GAM_AVX512_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// fast_exp (cpu_common.h) on 16 lanes: the same clamps, reduction and polynomial. x is clamped to
// [-100, 100] by two float ops where fast_exp uses integer selects: max and min return their
// second operand when either is NaN, so NaN goes through as there. Both give the same bits for
// all 2^32 inputs (checked exhaustively when this was written).
GAM_AVX512_INLINE __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-100.0f), x));
  const __m512 shifted =
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(shifted, _mm512_set1_ps(12582912.0f));
  __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x4B400000));
  ni = _mm512_min_epi32(_mm512_max_epi32(ni, _mm512_set1_epi32(-127)), _mm512_set1_epi32(128));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}

// to_bf16 (cpu_common.h) on 16 lanes: round to nearest even, NaN a quiet NaN. Integer ops rather
// than the AVX512-BF16 conversion, which treats denormal inputs as zero.
GAM_AVX512_INLINE __m256i bf16_16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0)));
}

GAM_AVX512_INLINE float row_max16(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;  // independent chains: max has latency 4
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + j + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + j + 48));
  }
  for (; j < n; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(ninf, lanes(n - j), x + j));
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// softmax_chunk<float> (retrieval_tiles.h) on AVX-512.
GAM_AVX512 inline void softmax_chunk_avx512(float* sbuf, int64_t t, int64_t w, bool first,
                                            float* mrow, float* lrow, float* acc, int64_t d,
                                            int64_t ld, float scale, at::BFloat16* p_bf16) {
  for (int64_t i = 0; i < t; ++i) {
    float* const srow = sbuf + i * w;
    float sc = scale;
    if (!(scale > 0.0f)) {
      const __m512 vs = _mm512_set1_ps(scale);
      for (int64_t j = 0; j < w; j += 16) {
        const __mmask16 m = lanes(w - j);
        _mm512_mask_storeu_ps(srow + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, srow + j), vs));
      }
      sc = 1.0f;
    }
    const float mx = sc * row_max16(srow, w);
    const float m_new = first ? mx : std::max(mrow[i], mx);
    const float shift = std::isfinite(m_new) ? m_new : 0.0f;
    const __m512 vsc = _mm512_set1_ps(sc), vshift = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 m = lanes(w - j);
      const __m512 e = exp16(_mm512_fmsub_ps(vsc, _mm512_maskz_loadu_ps(m, srow + j), vshift));
      if (p_bf16 != nullptr) {
        _mm256_mask_storeu_epi16(p_bf16 + i * w + j, m, bf16_16(e));
      } else {
        _mm512_mask_storeu_ps(srow + j, m, e);
      }
      sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    end_softmax_chunk_row(first, _mm512_reduce_add_ps(sum), shift, mrow[i], lrow[i],
                          first ? nullptr : acc + i * ld, d);
  }
}

// p = exp(scale * s - lse) of the lanes m of 16 scores at s.
GAM_AVX512_INLINE __m512 probs16(const float* s, __mmask16 m, __m512 scale, __m512 lse) {
  return exp16(_mm512_fmsub_ps(scale, _mm512_maskz_loadu_ps(m, s), lse));
}

// scores_to_grads<float> (retrieval_tiles.h) on AVX-512, with the same optional bf16 copy of ds.
GAM_AVX512 inline void scores_to_grads_avx512(float* srows, float* dprows, int64_t ld, int64_t t,
                                              int64_t w, const float* lse, const float* delta,
                                              float scale, at::BFloat16* ds_bf16) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t q = 0; q < t; ++q) {
    float* const srow = srows + q * ld;
    float* const dprow = dprows + q * ld;
    const __m512 vl = _mm512_set1_ps(lse[q]);
    __m512 vdl, vinv = _mm512_set1_ps(1.0f);
    if (delta != nullptr) {
      vdl = _mm512_set1_ps(delta[q]);
    } else {  // p first (into srow), then the row's sums (retrieval_tiles.h)
      __m512 sum = _mm512_setzero_ps(), pdp = _mm512_setzero_ps();
      for (int64_t j = 0; j < w; j += 16) {
        const __mmask16 m = lanes(w - j);
        const __m512 p = _mm512_maskz_mov_ps(m, probs16(srow + j, m, vs, vl));  // 0 past w
        _mm512_mask_storeu_ps(srow + j, m, p);
        sum = _mm512_add_ps(sum, p);
        pdp = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m, dprow + j), pdp);
      }
      const float inv = 1.0f / _mm512_reduce_add_ps(sum);
      vinv = _mm512_set1_ps(inv);
      vdl = _mm512_set1_ps(_mm512_reduce_add_ps(pdp) * inv);
    }
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 m = lanes(w - j);
      const __m512 p = delta != nullptr ? probs16(srow + j, m, vs, vl)
                                        : _mm512_mul_ps(_mm512_maskz_loadu_ps(m, srow + j), vinv);
      const __m512 dp = _mm512_maskz_loadu_ps(m, dprow + j);
      const __m512 g = _mm512_mul_ps(_mm512_mul_ps(vs, p), _mm512_sub_ps(dp, vdl));
      _mm512_mask_storeu_ps(srow + j, m, g);
      if (ds_bf16 != nullptr) _mm256_mask_storeu_epi16(ds_bf16 + q * ld + j, m, bf16_16(g));
      _mm512_mask_storeu_ps(dprow + j, m, p);
    }
  }
}

#undef GAM_AVX512_INLINE
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // GAM_HAVE_AVX512_KERNELS

}  // namespace gam::cpu
