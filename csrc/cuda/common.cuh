// Device helpers shared by the kernel sources: fp32 conversions, 16-byte vector access, dtype
// dispatch. Torch-free; compiles under nvcc and under the emulation layer (GAM_EMULATE).
#pragma once

#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "params.h"

// WMMA on bf16 needs sm_80; the emulation always has it.
#if defined(GAM_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GAM_HAS_BF16_WMMA 1
#else
#define GAM_HAS_BF16_WMMA 0
#endif

namespace gam {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Loads VEC consecutive elements as fp32: one 16- or 8-byte transaction when VEC * sizeof(T) is
// 16 or 8 (the caller guarantees alignment), element loads otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(e[i]);
  } else if constexpr (VEC * sizeof(T) == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else if constexpr (VEC * sizeof(T) == 8) {
    uint2 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_f32<T>(in[i]);
  }
}

// Copies rows [r0, r0 + nrows) x columns [0, dpad) of a row-major (limit x dim) tensor into shared
// memory with row stride ld (elements); rows >= limit and columns >= dim become zeros. With vec
// (dim a multiple of the 16-byte vector, src 16-byte aligned, dpad and ld multiples of it) the
// copy moves 16 bytes per access. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void load_rows_to_smem(T* dst, int64_t ld, const T* __restrict__ src,
                                                  int64_t r0, int nrows, int64_t limit,
                                                  int64_t dim, int64_t dpad, bool vec) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  if (vec) {
    constexpr int V = kVec16<T>;
    const int64_t groups = dpad / V;
    for (int64_t idx = tid; idx < nrows * groups; idx += nthreads) {
      const int64_t r = idx / groups, k = (idx - r * groups) * V;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < limit && k < dim) v = *reinterpret_cast<const uint4*>(src + (r0 + r) * dim + k);
      *reinterpret_cast<uint4*>(dst + r * ld + k) = v;
    }
  } else {
    const T zero = from_f32<T>(0.f);
    for (int64_t idx = tid; idx < nrows * dpad; idx += nthreads) {
      const int64_t r = idx / dpad, k = idx - r * dpad;
      dst[r * ld + k] = (r0 + r < limit && k < dim) ? src[(r0 + r) * dim + k] : zero;
    }
  }
}

__device__ __forceinline__ float sigmoid_f32(float z) { return 1.f / (1.f + __expf(-z)); }

inline bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}
inline bool aligned16(const void* p) { return aligned(p, 16); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}) with T the C++ type of dtype.
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace cuda
}  // namespace gam
