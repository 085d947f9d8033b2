// compat.cuh: the one header CUDA kernel sources (csrc/cuda/*.cu) include.
//
// The same kernel source builds two ways:
//   * nvcc (__CUDACC__): real CUDA; this header pulls in cuda_runtime.h,
//     cuda_fp16.h and cuda_bf16.h;
//   * host C++ compiler with -DGAM_EMULATE (test-only, no GPU): the SIMT
//     emulation layer in csrc/emu/ provides the same names and runs kernels
//     on CPU memory, under AddressSanitizer in the test suite.
// (A host-only .cpp that includes this without GAM_EMULATE gets the CUDA
// types and GAM_CUDA_CHECK, but no kernel helpers.)
//
// Project helpers, identical in both builds (all in the global namespace):
//
//   gam_launch(const char* kernel_name, kernel, dim3 grid, dim3 block,
//              size_t dynamic_smem_bytes, cudaStream_t stream, args...);
//     The only way kernel files launch kernels (never <<< >>> directly).
//     CUDA: kernel<<<grid, block, smem, stream>>>(args...), then
//     cudaGetLastError(); throws std::runtime_error naming the kernel on
//     failure. Emulated: runs the whole grid synchronously; throws
//     std::runtime_error("gam_launch(<kernel_name>): ...") on any detected
//     fault (bad configuration, divergent __syncthreads, deadlocked warp
//     collective, bad ldmatrix / cp.async address, ...). A grid with a zero
//     dimension is an invalid configuration in both builds: skip the launch
//     for empty inputs.
//
//   GAM_SHARED(type, name, count);   static shared array, use as name[i].
//     CUDA: __shared__ type name[count]. Emulated: `type* const name`, a
//     fresh 0xFF-filled heap block per thread block. Never take
//     sizeof(name); count must be a compile-time constant; `type` may be
//     an array type (GAM_SHARED(float[33], tile, 32) -> tile[i][j]).
//
//   GAM_DYNAMIC_SHARED(type, name);  type* name = dynamic shared memory,
//     16-byte aligned, size given by gam_launch's dynamic_smem_bytes.
//     Above 48 KiB call cudaFuncSetAttribute(kernel,
//     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first (both
//     builds check it).
//
//   GAM_CUDA_CHECK(expr);  throws std::runtime_error if a CUDA runtime call
//     fails. In emulation cudaMemsetAsync / cudaMemcpyAsync work on host
//     pointers; cudaFuncSetAttribute, cudaStreamSynchronize and
//     cudaGetErrorString are emulated (csrc/emu/runtime.cpp); others do not
//     link, and the emulated build names them.
//
//   GAM_IS_EMULATED  1 in the emulated build, else 0. Use it to give inline
//     PTX a plain C++ fallback. __CUDA_ARCH__ is undefined in emulation, so
//     write arch checks as `#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800`
//     for the legacy path, letting emulation take the modern one.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#if defined(GAM_EMULATE) && !defined(__CUDACC__)

#define GAM_IS_EMULATED 1
#include "emu/simt.h"  // also defines GAM_SHARED, GAM_DYNAMIC_SHARED, gam_launch

#else  // real CUDA

#define GAM_IS_EMULATED 0
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace gam_compat {
template <typename T>
using identity_t = T;  // lets GAM_SHARED take array types (float[33])
}  // namespace gam_compat

#if defined(__CUDACC__)

#define GAM_SHARED(type, name, count) __shared__::gam_compat::identity_t<type> name[count]

#define GAM_DYNAMIC_SHARED(type, name)                          \
  extern __shared__ __align__(16) unsigned char gam_dyn_smem[]; \
  type* name = reinterpret_cast<type*>(gam_dyn_smem)

template <typename... KArgs, typename... Args>
inline void gam_launch(const char* kernel_name, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                       size_t dynamic_smem_bytes, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "gam_launch: wrong number of kernel arguments");
  // clang-format formats .cuh files as C++ and would split the >>> below into > > >.
  // clang-format off
  kernel<<<grid, block, dynamic_smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gam_launch(") + kernel_name +
                             "): " + cudaGetErrorString(err));
}

#endif  // __CUDACC__
#endif  // GAM_EMULATE

#define GAM_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t gam_cuda_check_err_ = (expr);                                            \
    if (gam_cuda_check_err_ != cudaSuccess)                                                    \
      throw std::runtime_error(std::string("CUDA error: ") +                                   \
                               cudaGetErrorString(gam_cuda_check_err_) + " at " __FILE__ ":" + \
                               std::to_string(__LINE__) + ": " #expr);                         \
  } while (0)
