// Device math intrinsics, atomics and bit tricks for the emulated build
// (included by simt.h). The threads of a block are fibers on one OS thread
// and never preempted, so a plain read-modify-write is atomic here; the
// accesses are still instrumented, so out-of-bounds atomics are caught.
#pragma once

#include <math.h>
#include <time.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- float math --------------------------------------------------------
// Fast-math intrinsics use the accurate libm functions: results are at least
// as accurate as the GPU's, so tolerances tuned here may be tight on a GPU.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) {
  // NaN -> 0, like the hardware's .sat modifier.
  return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

// ---- min / max, as the CUDA math headers provide them ----------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) {
  return a < b ? a : b;
}
inline unsigned long long max(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---- conversions and reinterpretation --------------------------------------
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline unsigned __float_as_uint(float x) {
  unsigned i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline float __uint_as_float(unsigned i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline long long __double_as_longlong(double x) {
  long long i;
  std::memcpy(&i, &x, 8);
  return i;
}
inline double __longlong_as_double(long long i) {
  double x;
  std::memcpy(&x, &i, 8);
  return x;
}
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }

// ---- bit manipulation ---------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) {
  return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x));
}
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}

// ---- cache-hinted loads and stores: plain accesses here ----------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldca(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwt(T* p, T v) {
  *p = v;
}

// ---- fences and timing ---------------------------------------------------------
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline long long clock64() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// ---- atomics ----------------------------------------------------------------------
namespace gam_emu {
template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  const T old = *address;
  *address = f(old);
  return old;
}
}  // namespace gam_emu

#define GAM_EMU_ATOMIC_ARITH(T)                                              \
  inline T atomicAdd(T* a, T v) {                                            \
    return ::gam_emu::atomic_update(a, [v](T o) { return static_cast<T>(o + v); });       \
  }                                                                          \
  inline T atomicAdd_block(T* a, T v) { return atomicAdd(a, v); }            \
  inline T atomicAdd_system(T* a, T v) { return atomicAdd(a, v); }           \
  inline T atomicExch(T* a, T v) {                                           \
    return ::gam_emu::atomic_update(a, [v](T) { return v; });                \
  }
GAM_EMU_ATOMIC_ARITH(float)
GAM_EMU_ATOMIC_ARITH(double)
GAM_EMU_ATOMIC_ARITH(int)
GAM_EMU_ATOMIC_ARITH(unsigned)
GAM_EMU_ATOMIC_ARITH(unsigned long long)
GAM_EMU_ATOMIC_ARITH(__half)
GAM_EMU_ATOMIC_ARITH(__nv_bfloat16)
#undef GAM_EMU_ATOMIC_ARITH

inline __half2 atomicAdd(__half2* a, __half2 v) {
  return ::gam_emu::atomic_update(a, [v](__half2 o) { return __hadd2(o, v); });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) {
  return ::gam_emu::atomic_update(
      a, [v](__nv_bfloat162 o) { return __hadd2(o, v); });
}

#define GAM_EMU_ATOMIC_INT(T)                                                 \
  inline T atomicSub(T* a, T v) {                                             \
    return ::gam_emu::atomic_update(a, [v](T o) { return static_cast<T>(o - v); });        \
  }                                                                           \
  inline T atomicMax(T* a, T v) {                                             \
    return ::gam_emu::atomic_update(a, [v](T o) { return o > v ? o : v; });   \
  }                                                                           \
  inline T atomicMin(T* a, T v) {                                             \
    return ::gam_emu::atomic_update(a, [v](T o) { return o < v ? o : v; });   \
  }                                                                           \
  inline T atomicAnd(T* a, T v) {                                             \
    return ::gam_emu::atomic_update(a, [v](T o) { return static_cast<T>(o & v); });        \
  }                                                                           \
  inline T atomicOr(T* a, T v) {                                              \
    return ::gam_emu::atomic_update(a, [v](T o) { return static_cast<T>(o | v); });        \
  }                                                                           \
  inline T atomicXor(T* a, T v) {                                             \
    return ::gam_emu::atomic_update(a, [v](T o) { return static_cast<T>(o ^ v); });        \
  }                                                                           \
  inline T atomicCAS(T* a, T compare, T v) {                                  \
    return ::gam_emu::atomic_update(                                          \
        a, [compare, v](T o) { return o == compare ? v : o; });               \
  }
GAM_EMU_ATOMIC_INT(int)
GAM_EMU_ATOMIC_INT(unsigned)
GAM_EMU_ATOMIC_INT(long long)
GAM_EMU_ATOMIC_INT(unsigned long long)
#undef GAM_EMU_ATOMIC_INT

inline unsigned short atomicCAS(unsigned short* a, unsigned short compare,
                                unsigned short v) {
  return ::gam_emu::atomic_update(
      a, [compare, v](unsigned short o) { return o == compare ? v : o; });
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return ::gam_emu::atomic_update(
      a, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return ::gam_emu::atomic_update(a, [limit](unsigned o) {
    return (o == 0u || o > limit) ? limit : o - 1u;
  });
}
