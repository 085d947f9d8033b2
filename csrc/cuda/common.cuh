// Device helpers shared by the kernel sources: fp32 conversions, 16-byte vector access, dtype
// dispatch. Torch-free; compiles under nvcc and under the emulation layer (GAM_EMULATE).
#pragma once

#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "params.h"
#include "warp_mma.cuh"

namespace gam {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC consecutive elements of T as loaded: one 16- or 8-byte word when VEC * sizeof(T) is 16 or 8
// (the caller guarantees alignment), else the elements. unpack_f32 converts them where they are
// used, so a loop can issue the next row's loads before it computes this one and hold them in
// half the registers of fp32 values (16-bit types).
template <typename T, int VEC>
struct Packed {
  static constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  struct Elems {
    T e[VEC];
  };
  using Word =
      std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, Elems>>;
  Word w;
};

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> load_packed(const T* __restrict__ p) {
  using Word = typename Packed<T, VEC>::Word;
  Packed<T, VEC> v;
  if constexpr (Packed<T, VEC>::kBytes == 16 || Packed<T, VEC>::kBytes == 8) {
    v.w = *reinterpret_cast<const Word*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.w.e[i] = p[i];
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack_f32(const Packed<T, VEC>& v, float (&out)[VEC]) {
  if constexpr (Packed<T, VEC>::kBytes == 16 || Packed<T, VEC>::kBytes == 8) {
    const T* e = reinterpret_cast<const T*>(&v.w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f32(v.w.e[i]);
  }
}

// Loads VEC consecutive elements as fp32 (one transaction where Packed makes one).
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[VEC]) {
  unpack_f32<T, VEC>(load_packed<T, VEC>(p), out);
}

// Stores VEC values converted to T: one 16- or 8-byte transaction when VEC * sizeof(T) is 16 or
// 8. Through __stcg: a plain store of the uint4 that the element writes assemble is split by
// nvcc into 32-bit stores (no STG.128 in the SASS); the intrinsic keeps it whole (and skips L1,
// which written activations do not need).
template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f32<T>(in[i]);
    __stcg(reinterpret_cast<uint4*>(p), raw);
  } else if constexpr (VEC * sizeof(T) == 8) {
    uint2 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f32<T>(in[i]);
    __stcg(reinterpret_cast<uint2*>(p), raw);
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
                                                  int64_t r0, int nrows, int64_t limit, int64_t dim,
                                                  int64_t dpad, bool vec) {
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

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 1 / (1 + e^-z) with e^-z = 2^(-z log2 e) on the special function unit (fast_exp2: the same
// MUFU.EX2 as __expf, without __expf's three instructions that keep denormal results, which cannot
// change a sigmoid) and the fast reciprocal (MUFU.RCP, within 2 ulp, below the exp's own error).
// The IEEE division "1.f / x" compiled to about 15 instructions with a branch to a slow path,
// which in the mixer's epilogue made up more than half of each row's instructions (16 sigmoids
// per thread). z < -87 gives 0 (e^-z = inf), as the exact form does.
__device__ __forceinline__ float sigmoid_f32(float z) {
  return __fdividef(1.f, 1.f + fast_exp2(z * -kLog2e));
}

inline bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}
inline bool aligned16(const void* p) { return aligned(p, 16); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride elementwise kernel: enough blocks to fill any current GPU several times
// over (at most 8192, at least 1); the kernel's loop strides past the rest.
inline dim3 grid_stride_grid(int64_t work_items, int threads) {
  const int64_t blocks = ceil_div(work_items, threads);
  return dim3(static_cast<unsigned>(blocks < 8192 ? (blocks > 0 ? blocks : 1) : 8192));
}

// Static switch: calls f(std::integral_constant<int, V>{}) for the first V of Vs with pick(V)
// true, or fallback() when there is none. Turns a run-time value (a kernel width, a column slice)
// into a template argument without a hand-written ladder of cases.
template <int... Vs, typename Pick, typename F, typename Fallback>
inline void static_switch(Pick&& pick, F&& f, Fallback&& fallback) {
  const bool matched = ((pick(Vs) ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  if (!matched) fallback();
}

// Fixed-order reduction of per-block fp32 partials (the conv's dw/dbias, the retrieval's dM):
// total[q] = sum over p < nparts of partials[p * cols + q], summed by kReduceRows threads with a
// stride of kReduceRows rows, then those sums added in order, so the result does not depend on
// the schedule (no float atomics). store(q, total[q]) writes each column where it belongs.
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;

template <typename Store>
__global__ void __launch_bounds__(kReduceCols* kReduceRows)
    reduce_partials_kernel(const float* __restrict__ partials, int64_t nparts, int64_t cols,
                           Store store) {
  GAM_SHARED(float, red, kReduceCols* kReduceRows);
  const int64_t col = int64_t(blockIdx.x) * kReduceCols + threadIdx.x;
  float s = 0.f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < nparts; p += kReduceRows) s += partials[p * cols + col];
  }
  red[threadIdx.y * kReduceCols + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
    for (int r = 0; r < kReduceRows; ++r) total += red[r * kReduceCols + threadIdx.x];
    store(col, total);
  }
}

// Stores the reduced partials as a contiguous array.
struct StoreContiguous {
  float* out;
  __device__ __forceinline__ void operator()(int64_t col, float total) const { out[col] = total; }
};

template <typename Store>
inline void launch_reduce_partials(const char* name, const float* partials, int64_t nparts,
                                   int64_t cols, Store store, cudaStream_t stream) {
  gam_launch(name, reduce_partials_kernel<Store>,
             dim3(static_cast<unsigned>(ceil_div(cols, kReduceCols))),
             dim3(kReduceCols, kReduceRows), 0, stream, partials, nparts, cols, store);
}

// Calls f(T{}) with T the C++ type of dtype.
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
  }
}

}  // namespace cuda
}  // namespace gam
