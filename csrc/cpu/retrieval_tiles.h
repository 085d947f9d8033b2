// Row-wise pieces of the flash-style softmax retrieval shared by the CPU retrieval kernels
// (memory_retrieval.cpp) and the fused mixer (gam_mixer.cpp): vectorisable row reductions, the
// online softmax over one chunk of slots, and the softmax backward of one tile.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/cpu_common.h"
#include "cpu/simd_avx512.h"

namespace gam::cpu {

#if defined(__GNUC__)
// Eight float lanes as one value: GCC does not vectorise a max over an array of eight maxima (it
// does a sum), so the float max is written on this vector type (a GCC / Clang extension).
typedef float Float8 __attribute__((vector_size(32)));
#define GAM_HAVE_FLOAT8 1
#else
#define GAM_HAVE_FLOAT8 0
#endif

template <typename A>
GAM_INLINE A row_max(const A* x, int64_t n) {
#if GAM_HAVE_FLOAT8
  if constexpr (std::is_same_v<A, float>) {
    const float ninf = -std::numeric_limits<float>::infinity();
    Float8 m8 = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      Float8 v;
      std::memcpy(&v, x + j, sizeof(v));
      m8 = m8 < v ? v : m8;
    }
    float m = ninf;
    for (int q = 0; q < 8; ++q) m = std::max(m, m8[q]);
    for (; j < n; ++j) m = std::max(m, x[j]);
    return m;
  }
#endif
  // Eight independent maxima (fp64, a checking dtype; float without the vector extension).
  A m[8];
  for (auto& v : m) v = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int q = 0; q < 8; ++q) m[q] = std::max(m[q], x[j + q]);
  }
  for (; j < n; ++j) m[0] = std::max(m[0], x[j]);
  for (int q = 1; q < 8; ++q) m[0] = std::max(m[0], m[q]);
  return m[0];
}

// Online softmax over one chunk of slots for t rows: turns the scores in sbuf (t x w), times
// scale, into p = exp(s - running max) in place, updates the running max and sum, and rescales
// the rows of acc (the p @ M accumulated over earlier chunks, row stride ld) to the new max. With
// p_bf16 (t x w), p is written there rounded to bf16 (the operand of a bf16 product) and sbuf is
// left unspecified: the AVX-512 build does not store p in fp32 when nothing reads it.
template <typename A>
GAM_INLINE void softmax_chunk(A* sbuf, int64_t t, int64_t w, bool first, A* mrow, A* lrow, A* acc,
                              int64_t d, int64_t ld, A scale, at::BFloat16* p_bf16) {
  for (int64_t i = 0; i < t; ++i) {
    A* __restrict srow = sbuf + i * w;
    // max(scale * s) is scale * max(s) for scale > 0 (rounding is monotonic); other scales
    // multiply first.
    A sc = scale;
    if (!(scale > A(0))) {
      for (int64_t j = 0; j < w; ++j) srow[j] *= scale;
      sc = A(1);
    }
    const A mx = sc * row_max(srow, w);
    const A m_new = first ? mx : std::max(mrow[i], mx);
    // A row of all -inf scores cannot happen with finite inputs; keep exp() finite anyway.
    const A shift = std::isfinite(m_new) ? m_new : A(0);
    if constexpr (std::is_same_v<A, float>) {
      if (p_bf16 != nullptr) {
        at::BFloat16* __restrict prow = p_bf16 + i * w;
        for (int64_t j = 0; j < w; ++j) {
          srow[j] = fast_exp(sc * srow[j] - shift);
          prow[j] = to_bf16(srow[j]);
        }
      } else {
        for (int64_t j = 0; j < w; ++j) srow[j] = fast_exp(sc * srow[j] - shift);
      }
    } else {
      for (int64_t j = 0; j < w; ++j) srow[j] = fast_exp(sc * srow[j] - shift);
    }
    end_softmax_chunk_row(first, row_sum(srow, w), shift, mrow[i], lrow[i],
                          first ? nullptr : acc + i * ld, d);
  }
}

// Softmax backward of t rows, in place on the raw scores s = h M^T (rows of srows) and
// dp = grad M^T (rows of dprows), both with row stride ld: p = exp(scale*s - lse); srows become
// scale * ds = scale * p * (dp - delta), dprows become p. Where delta is null the w slots are the
// whole row: p is renormalised to sum to 1 (lse is fp32: rounded near |s| ~ 40 it leaves p off by
// a few 1e-6) and delta = rowsum(p dp) is summed here, which keeps dp - delta's cancellation on
// rows where one slot holds nearly all of p (docs/design.md, "Numerics"). Chunks of a longer row
// take delta as given (rowsum(dG G), per row). With ds_bf16 (fp32 only; row stride ld), scale * ds
// is also written there rounded to bf16 (the operand of a bf16 product).
template <typename A>
GAM_INLINE void scores_to_grads(A* srows, A* dprows, int64_t ld, int64_t t, int64_t w,
                                const float* lse, const A* delta, A scale, at::BFloat16* ds_bf16) {
  at::BFloat16* drow = nullptr;
  for (int64_t q = 0; q < t; ++q) {
    A* __restrict srow = srows + q * ld;
    A* __restrict dprow = dprows + q * ld;
    if constexpr (std::is_same_v<A, float>) {
      if (ds_bf16 != nullptr) drow = ds_bf16 + q * ld;
    }
    const A l = static_cast<A>(lse[q]);
    A dl = 0, inv = 1;
    if (delta != nullptr) {
      dl = delta[q];
    } else {  // p first (into srow), then the row's sums
      A sum = 0, pdp = 0;
      for (int64_t j = 0; j < w; ++j) {
        const A p = fast_exp(scale * srow[j] - l);
        srow[j] = p;
        sum += p;
        pdp += p * dprow[j];
      }
      inv = A(1) / sum;
      dl = pdp * inv;
    }
    for (int64_t j = 0; j < w; ++j) {
      const A p = delta != nullptr ? fast_exp(scale * srow[j] - l) : srow[j] * inv;
      const A g = scale * p * (dprow[j] - dl);
      srow[j] = g;
      if constexpr (std::is_same_v<A, float>) {
        if (drow != nullptr) drow[j] = to_bf16(g);
      }
      dprow[j] = p;
    }
  }
}

// softmax_chunk and scores_to_grads on the fastest build for the CPU: the hand-written AVX-512
// versions (simd_avx512.h) for fp32 tiles where cpu_isa() is AVX-512, else run_best_isa.
template <typename A>
inline void run_softmax_chunk(A* sbuf, int64_t t, int64_t w, bool first, A* mrow, A* lrow, A* acc,
                              int64_t d, int64_t ld, A scale, at::BFloat16* p_bf16 = nullptr) {
#if GAM_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<A, float>) {
    if (cpu_isa() == CpuIsa::kAvx512) {
      softmax_chunk_avx512(sbuf, t, w, first, mrow, lrow, acc, d, ld, scale, p_bf16);
      return;
    }
  }
#endif
  run_best_isa<softmax_chunk<A>>(sbuf, t, w, first, mrow, lrow, acc, d, ld, scale, p_bf16);
}

// scores_to_grads's delta for a chunk of w of a row's s slots: null where the chunk is the whole
// row (delta is then summed exactly there), else the rows' rowsum(dG G).
template <typename A>
inline const A* chunk_delta(const A* delta, int64_t w, int64_t s) {
  return w == s ? nullptr : delta;
}

template <typename A>
inline void run_scores_to_grads(A* srows, A* dprows, int64_t ld, int64_t t, int64_t w,
                                const float* lse, const A* delta, A scale,
                                at::BFloat16* ds_bf16 = nullptr) {
#if GAM_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<A, float>) {
    if (cpu_isa() == CpuIsa::kAvx512) {
      scores_to_grads_avx512(srows, dprows, ld, t, w, lse, delta, scale, ds_bf16);
      return;
    }
  }
#endif
  run_best_isa<scores_to_grads<A>>(srows, dprows, ld, t, w, lse, delta, scale, ds_bf16);
}

}  // namespace gam::cpu
