// Helpers shared by the CPU kernels: accumulation types, row conversions, a vectorisable exp,
// GEMM on raw fp32/fp64 tiles, and the fixed work partitions that keep reductions deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// The extension is compiled for the baseline x86-64 ISA (SSE2). The elementwise loops with exp
// (gates, softmax) and the conversions are compute-bound there, so they are also built for AVX2+FMA
// and for AVX-512, and the build for the CPU is chosen at run time: GAM_AVX2 / GAM_AVX512 mark a
// function compiled for that ISA; the loop bodies are GAM_INLINE templates that run_best_isa
// (below) compiles into one wrapper per ISA. The hottest loops of the softmax also have
// hand-written AVX-512 versions (simd_avx512.h).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GAM_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define GAM_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), min_vector_width(512)))
#else
// GCC keeps to 256-bit vectors on AVX-512 unless told otherwise.
#define GAM_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#define GAM_INLINE inline __attribute__((always_inline))
#define GAM_HAVE_ISA_BUILDS 1
#else
#define GAM_AVX2
#define GAM_AVX512
#define GAM_INLINE inline
#define GAM_HAVE_ISA_BUILDS 0
#endif

namespace gam::cpu {

// The instruction sets the CPU kernels have builds for, in order.
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA that both the CPU and GAM_EXT_CPU_ISA allow: the environment variable (auto, the
// default, or avx512, avx2, baseline) caps it, so that the tests can run every build on one
// machine. Read on the first call, then fixed for the process.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kBaseline;
#if GAM_HAVE_ISA_BUILDS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
    if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = CpuIsa::kAvx512;
    }
#endif
    const char* env = std::getenv("GAM_EXT_CPU_ISA");
    if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
    CpuIsa cap;
    if (std::strcmp(env, "avx512") == 0) {
      cap = CpuIsa::kAvx512;
    } else if (std::strcmp(env, "avx2") == 0) {
      cap = CpuIsa::kAvx2;
    } else if (std::strcmp(env, "baseline") == 0) {
      cap = CpuIsa::kBaseline;
    } else {
      TORCH_CHECK(false, "GAM_EXT_CPU_ISA must be auto, avx512, avx2 or baseline, got '", env, "'");
    }
    return std::min(best, cap);
  }();
  return isa;
}

// Runs Fn(args...) (a GAM_INLINE function) compiled for the ISA cpu_isa() picks: each wrapper
// below inlines its own copy of Fn's loops, vectorised for its ISA.
template <auto Fn, typename... Args>
void run_baseline(Args... args) {
  Fn(args...);
}
template <auto Fn, typename... Args>
GAM_AVX2 void run_avx2(Args... args) {
  Fn(args...);
}
template <auto Fn, typename... Args>
GAM_AVX512 void run_avx512(Args... args) {
  Fn(args...);
}
template <auto Fn, typename... Args>
inline void run_best_isa(Args... args) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      run_avx512<Fn>(args...);
      break;
    case CpuIsa::kAvx2:
      run_avx2<Fn>(args...);
      break;
    default:
      run_baseline<Fn>(args...);
  }
}

// Half types accumulate in fp32 (their products too, except bf16 products on CPUs with bf16 matrix
// units: bf16_gemm.h and docs/design.md, "Half precision on the CPU"), fp64 in fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// x rounded to the nearest bf16 (ties to even), NaN kept a quiet NaN: what c10::BFloat16(x)
// computes, written with integer selects only so that loops over it vectorise (c10's branches on
// NaN keep them scalar).
GAM_INLINE at::BFloat16 to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return at::BFloat16(static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded), at::BFloat16::from_bits());
}

// x converted to T: to_bf16 for float to bf16 (the same bits as c10's conversion, whose branch on
// NaN kept some loops scalar: with it in one loop of the mixer's forward epilogue, the one-thread
// bf16 mixer forward took 7.7 instead of 5.6 ms), else the plain conversion.
template <typename T, typename S>
GAM_INLINE T cast_to(S x) {
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<S, float>) {
    return to_bf16(x);
  } else {
    return static_cast<T>(x);
  }
}

// The 16 partial sums of row_sum and row_dot, added in a fixed tree. Each block of 16 is converted
// into an array first and then accumulated lane by lane: written as one loop of s[q] += a * b,
// GCC 12 left row_dot on bf16 rows scalar (its SLP vectoriser gave up on the conversions); this
// form builds vectors in every ISA build. The order is the source's, so every build sums the same.
template <typename A>
GAM_INLINE A sum_partials(A (&s)[16]) {
  for (int q = 0; q < 8; ++q) s[q] += s[q + 8];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename A>
GAM_INLINE A row_sum(const A* x, int64_t n) {
  A s[16] = {};
  const int64_t blocks = n / 16;
  for (int64_t i = 0; i < blocks; ++i) {
    for (int q = 0; q < 16; ++q) s[q] += x[i * 16 + q];
  }
  for (int64_t j = blocks * 16; j < n; ++j) s[0] += x[j];
  return sum_partials(s);
}

// sum_j a[j] * b[j] in A (both rows converted to A).
template <typename A, typename U, typename V>
GAM_INLINE A row_dot(const U* a, const V* b, int64_t n) {
  A s[16] = {};
  const int64_t blocks = n / 16;
  for (int64_t i = 0; i < blocks; ++i) {
    A x[16], y[16];
    for (int q = 0; q < 16; ++q) x[q] = static_cast<A>(a[i * 16 + q]);
    for (int q = 0; q < 16; ++q) y[q] = static_cast<A>(b[i * 16 + q]);
    for (int q = 0; q < 16; ++q) s[q] += x[q] * y[q];
  }
  for (int64_t j = blocks * 16; j < n; ++j) s[0] += static_cast<A>(a[j]) * static_cast<A>(b[j]);
  return sum_partials(s);
}

// dst[i] = src[i] converted; plain loops so the compiler vectorises them.
template <typename D, typename S>
GAM_INLINE void convert_row(D* __restrict dst, const S* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<D, S>) {
    std::memcpy(dst, src, sizeof(D) * n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cast_to<D>(static_cast<float>(src[i]));
  }
}

// rows x cols of src (row stride ld_src) converted into dst (row stride ld_dst); a GAM_INLINE
// body for run_best_isa, so that hot conversions get the vectorised builds.
template <typename D, typename S>
GAM_INLINE void convert_rows(D* dst, int64_t ld_dst, const S* src, int64_t ld_src, int64_t rows,
                             int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) convert_row(dst + i * ld_dst, src + i * ld_src, cols);
}

// exp(x) for float in the style of Cephes expf: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a
// degree-6 polynomial, 2^n built in the exponent bits; max relative error ~1e-7. Every select is on
// integers: GCC (with the default -ftrapping-math) will not if-convert float compares, and a loop
// with control flow does not vectorise (std::exp does not either). |x| is clamped to 100 (NaN
// kept), then 2^n to [0, inf]: exp(x) is 0 below about -87.3 (no denormals) and inf above 88.7.
GAM_INLINE float fast_exp(float x) {
  int32_t xb;
  std::memcpy(&xb, &x, sizeof(xb));
  const int32_t mag = xb & 0x7fffffff;
  const int32_t clamped = mag > 0x7f800000 ? mag : std::min(mag, int32_t{0x42c80000});  // 100.0f
  xb = (xb & static_cast<int32_t>(0x80000000u)) | clamped;
  std::memcpy(&x, &xb, sizeof(x));
  // Round x*log2(e) to the nearest integer with the 1.5*2^23 trick (exact for |v| < 2^22).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const int32_t ni = std::min(std::max(bits - 0x4B400000, int32_t{-127}), int32_t{128});
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t pow_bits = (ni + 127) << 23;  // ni = -127 gives +0, ni = 128 gives +inf
  float pow2;
  std::memcpy(&pow2, &pow_bits, sizeof(pow2));
  return y * pow2;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename A>
GAM_INLINE A sigmoid(A z) {
  return A(1) / (A(1) + fast_exp(-z));
}

// The online softmax's end of a chunk for one row, given the chunk's sum l of exp(s - shift):
// the running sum becomes l on the first chunk, else the old sum rescaled from the old max to
// shift plus l, and acc_row (the p M accumulated so far, d values; unused on the first chunk) is
// rescaled the same way; the running max becomes shift. Shared by softmax_chunk
// (retrieval_tiles.h) and its AVX-512 version, so both update the same way.
template <typename A>
GAM_INLINE void end_softmax_chunk_row(bool first, A l, A shift, A& m_run, A& l_run,
                                      A* __restrict acc_row, int64_t d) {
  if (first) {
    l_run = l;
  } else {
    const A corr = fast_exp(m_run - shift);
    l_run = l_run * corr + l;
    for (int64_t c = 0; c < d; ++c) acc_row[c] *= corr;
  }
  m_run = shift;
}

// t's data, or nullptr for an undefined tensor (an operand that the path taken does not read).
template <typename A>
inline const A* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// A row-major matrix view of raw memory: rows x cols with a leading dimension (row stride).
template <typename A>
struct Mat {
  A* data;
  int64_t rows, cols, ld;
};

template <typename A>
inline at::Tensor as_tensor(const Mat<A>& m) {
  return at::from_blob(m.data, {m.rows, m.cols}, {m.ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// c = alpha * op(a) @ op(b) + beta * c on fp32/fp64 tiles (op = transpose when the flag is set),
// through ATen's BLAS (MKL here). Called inside at::parallel_for, where it runs single-threaded,
// so every call gives the same bits whatever the thread count.
template <typename A>
inline void gemm(const Mat<A>& a, bool trans_a, const Mat<A>& b, bool trans_b, Mat<A> c, A alpha,
                 A beta) {
  const int64_t k = trans_a ? a.rows : a.cols;
  if (c.rows == 0 || c.cols == 0) return;
  at::Tensor ct = as_tensor(c);
  if (k == 0) {
    if (beta == A(0))
      ct.zero_();
    else
      ct.mul_(beta);
    return;
  }
  at::Tensor at_ = as_tensor(a), bt = as_tensor(b);
  if (trans_a) at_ = at_.t();
  if (trans_b) bt = bt.t();
  // With beta == 0 BLAS never reads c, so uninitialised scratch in it cannot leak through.
  at::addmm_out(ct, ct, at_, bt, beta, alpha);
}

// How many threads parallel_items can run on: the intra-op threads, or 1 nested inside someone's
// parallel region (parallel_for then runs inline on this thread). Per-thread scratch has as many
// slots.
inline int64_t thread_slots() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// The scratch slot of the calling thread inside parallel_items, given slots = thread_slots() taken
// before it.
inline int64_t thread_slot(int64_t slots) {
  const int64_t slot = slots == 1 ? 0 : at::get_thread_num();
  TORCH_INTERNAL_ASSERT(slot < slots);
  return slot;
}

// Runs fn(item) for every item in [0, n) on the intra-op threads. Items are handed out from an
// atomic counter rather than in fixed per-thread ranges, so a thread slowed down by other load on
// the machine does not hold the others up. What an item computes never depends on which thread
// runs it, so results do not depend on the thread count or the schedule.
template <typename F>
inline void parallel_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, thread_slots());
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// Splits [0, n) into ceil(n / block) fixed blocks and runs fn(block_begin, block_end) on each in
// parallel. The blocks depend only on n and block, never on the thread count.
template <typename F>
inline void parallel_blocks(int64_t n, int64_t block, const F& fn) {
  if (n <= 0) return;
  parallel_items((n + block - 1) / block,
                 [&](int64_t blk) { fn(blk * block, std::min(n, (blk + 1) * block)); });
}

}  // namespace gam::cpu
