// SIMT emulation layer: lets the project's CUDA kernel sources (csrc/cuda/*.cu)
// compile with the host C++ compiler (-DGAM_EMULATE) and run on CPU memory.
//
// Include it only through csrc/cuda/compat.cuh. What it provides:
//   * CUDA qualifiers, vector types, half/bf16 (the real cuda_fp16.h /
//     cuda_bf16.h, whose host code paths compile under g++);
//   * threadIdx / blockIdx / blockDim / gridDim / warpSize;
//   * __syncthreads() as a real block barrier, warp shuffles and votes over
//     32 lanes, static and dynamic shared memory (GAM_SHARED /
//     GAM_DYNAMIC_SHARED), a few CUDA runtime calls on host pointers;
//   * gam_launch(), which runs the whole grid synchronously on the calling
//     thread: blocks one after another, the threads of a block as cooperative
//     fibers (one stack each), switched only at barriers, warp collectives and
//     thread exit. Faults (divergent barriers, deadlocked warp collectives,
//     bad launch configurations, bad ldmatrix or cp.async addresses,
//     mma.sync without all 32 lanes, wgmma without its whole warpgroup,
//     descriptors outside dynamic shared memory) become a
//     std::runtime_error naming the kernel.
// The device intrinsics the kernels use live in intrinsics.h, ldmatrix /
// mma.sync / cp.async (per-lane PTX fragment layouts) in warp_matrix.h,
// sm_90a's wgmma (warpgroup collectives, queued until their wait) in
// warpgroup_matrix.h.
// Behind this header: fiber.cpp (stacks and context switches), engine.cpp (blocks,
// barriers, warp collectives, shared memory, launches, the deadlock report) and
// runtime.cpp (the CUDA runtime stubs); csrc/emu/emulation.py builds them into a
// test module. Only what a kernel or a self-test uses is emulated.
//
// Deliberate differences from hardware (see also README.md, section "Tests", and
// docs/architecture.md, "The emulator: CUDA kernels without a GPU"):
//   * threads of a block are never preempted: they switch only at barriers,
//     warp collectives and exit. Shared memory starts as 0xFF bytes (NaN for
//     float/half/bf16, -1 for ints) and odd-numbered blocks run their threads
//     in reverse order, so a read of another thread's shared-memory write
//     without a barrier between them usually shows up as NaN in some block
//     (GAM_EMU_SCHEDULE=forward disables the reversal). Races on global
//     memory and memory-ordering bugs are not detected;
//   * a __syncthreads() that not every thread reaches (early return,
//     different call sites in divergent branches) is an error, although some
//     GPUs tolerate it;
//   * shuffles that read a lane that is not taking part (outside the mask,
//     exited, or past the end of a partial warp) return 0xFF bytes;
//   * __CUDA_ARCH__ is not defined; fast-math intrinsics (__expf, ...) are
//     computed with the accurate libm functions; inline PTX cannot run (the
//     kernels' PTX lives in csrc/cuda/warp_mma.cuh, emulated by warp_matrix.h).
#pragma once

#ifndef GAM_EMULATE
#error "csrc/emu/simt.h is for the emulated build only (-DGAM_EMULATE)"
#endif
#ifdef __CUDACC__
#error "csrc/emu/simt.h must not be compiled by nvcc"
#endif

// The toolkit headers have host paths: vector types, dim3, cudaError_t,
// cudaStream_t, and __half / __nv_bfloat16 with host conversions and
// operators. They also declare the CUDA runtime API, which this build never
// links: the calls kernels may make are redirected to gam_emu::rt below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// Qualifiers. __host__, __device__, __global__, __forceinline__, __align__
// and __restrict__ already work under g++ (crt/host_defines.h, GNU keyword).
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace gam_emu {

// Per-thread built-in variables of the fiber that is running now. Updated
// on every fiber switch; thread_local so that two OS threads may each run a
// launch.
struct Builtins {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local Builtins t_builtins{};

// ---- engine entry points (engine.cpp) -------------------------------------

enum class WarpOpKind : uint32_t {
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kSyncWarp,
  kExchange,
};

// A warp collective: blocks the calling lane until every non-exited lane of
// `mask` has called the same collective with the same mask, then returns the
// lane's result. Payloads are bit patterns of up to 8 bytes.
uint64_t warp_op(WarpOpKind kind, unsigned mask, uint64_t value, int arg, int width,
                 const char* what, const char* file, int line);

// A warp-collective exchange (the warp-level matrix instructions of warp_matrix.h): every lane
// passes a pointer to its own record; when all 32 lanes of the warp wait in the same exchange
// (same `what`, same resolve), resolve(records) runs once with the records indexed by lane and
// may read and write all of them; then every lane returns. Like the .sync.aligned instructions
// it models, all 32 lanes must take part: a lane that has exited (or a partial warp) is a fault.
using ExchangeFn = void (*)(void* const* records);
void warp_exchange(void* record, ExchangeFn resolve, const char* what, const char* file, int line);

// A warpgroup-collective exchange (wgmma, warpgroup_matrix.h): the same as warp_exchange over the
// 128 threads of the caller's warpgroup (warps 4g .. 4g + 3, g = warp / 4), records indexed by
// thread within the warpgroup. The block's thread count must be a multiple of 128.
void warpgroup_exchange(void* record, ExchangeFn resolve, const char* what, const char* file,
                        int line);
// State kept per warpgroup of the running block (the wgmma queue of warpgroup_matrix.h), dropped
// when the block ends.
std::shared_ptr<void>& warpgroup_state();

// Whether [p, p + bytes) lies inside one shared-memory array of the running block (dynamic
// shared memory or a GAM_SHARED array).
bool in_shared(const void* p, size_t bytes);
// Shared-window addresses, as the GPU's 32-bit shared addresses (cvta.to.shared) that matrix
// descriptors hold: offsets into the block's dynamic shared memory, whose base is 1024-byte
// aligned. Only dynamic shared memory has them here; anything else is a fault.
uint32_t shared_window_address(const void* p, const char* what, const char* file, int line);
void* shared_window_pointer(uint32_t address, size_t bytes, const char* what);

// cp.async of the calling thread (warp_matrix.h): the copy of `bytes` bytes (the first
// src_bytes read from src, the rest zero-filled) is recorded in the thread's open group and its
// destination filled with 0xFF bytes at once; it lands when a cp_async_wait retires its group.
void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* what,
              const char* file, int line);
// Closes the open group (possibly empty).
void cp_async_commit();
// Completes the oldest committed groups of the calling thread until at most `pending` remain.
// Their bytes in dynamic shared memory then belong to the generic proxy until the thread runs
// fence.proxy.async (proxy_fence_async_shared): wgmma, which reads shared memory through the
// async proxy, faults on such bytes (async_unfenced_writer).
void cp_async_wait(int pending);
// fence.proxy.async.shared::cta of the calling thread: its landed cp.async bytes become visible
// to the async proxy.
void proxy_fence_async_shared();
// The thread whose landed cp.async wrote the 16 bytes at this shared-window address and has not
// fenced them for the async proxy since, or -1.
int async_unfenced_writer(uint32_t address);
// The calling thread's wgmma.fence state: set by wgmma.fence, cleared by wgmma.wait_group (whose
// caller then usually touches the accumulators); a wgmma issued while it is clear faults.
void set_wgmma_fenced(bool fenced);
bool wgmma_fenced();

// __syncthreads(): blocks the calling thread until every thread of the block waits at the same
// call site.
void block_barrier(const char* file, int line);

// bar.sync id, count (named barrier, id 1..15): blocks the calling thread until `count` threads
// (a multiple of 32) wait at barrier id, wherever they call it from. As bar.sync is .aligned on
// the GPU (a warp arrives as a whole), a release where some but not all live threads of a warp
// wait at the barrier is a fault.
void named_barrier(int id, int count, const char* file, int line);

// Lanes of the caller's warp that exist and have not exited.
unsigned active_mask();
// Warp index of the calling thread within its block.
int current_warp();

// Shared memory of the running block. shared_array returns the same pointer
// to every thread calling it with the same site key.
void* shared_array(const void* site, size_t bytes, size_t align, const char* name, const char* file,
                   int line);
void* dynamic_shared();

// Aborts the running kernel (from inside a kernel) or throws (outside one).
[[noreturn]] void trap(const std::string& message);

struct LaunchSpec {
  const char* name;
  dim3 grid;
  dim3 block;
  size_t dynamic_smem_bytes;
  const void* kernel;  // key for cudaFuncSetAttribute limits
};
// Runs the grid; every thread calls thunk(closure). Throws
// std::runtime_error("gam_launch(<name>): ...") on any detected fault.
void launch(const LaunchSpec& spec, void (*thunk)(void*), void* closure);

// ---- helpers ---------------------------------------------------------------

template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp collectives move trivially copyable values of <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

template <typename T>
using shared_ptr_t = T*;  // lets GAM_SHARED take array types (float[33])

// ---- CUDA runtime calls that kernels' host launchers make (runtime.cpp) ----
namespace rt {

cudaError_t memset_async(void* ptr, int value, size_t count, cudaStream_t stream);
cudaError_t memcpy_async(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                         cudaStream_t stream);
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
const char* get_error_string(cudaError_t error);
inline cudaError_t stream_synchronize(cudaStream_t) { return cudaSuccess; }

}  // namespace rt
}  // namespace gam_emu

// The runtime API is declared by the toolkit headers above but not linked:
// these macros send kernel-side and launcher-side uses to the host versions.
#define cudaMemsetAsync(...) ::gam_emu::rt::memset_async(__VA_ARGS__)
#define cudaMemcpyAsync(...) ::gam_emu::rt::memcpy_async(__VA_ARGS__)
#define cudaFuncSetAttribute(func, attr, value) \
  ::gam_emu::rt::func_set_attribute(reinterpret_cast<const void*>(func), (attr), (value))
#define cudaGetErrorString(e) ::gam_emu::rt::get_error_string(e)
#define cudaStreamSynchronize(stream) ::gam_emu::rt::stream_synchronize(stream)

// ---------------------------------------------------------------------------
// Built-in variables (read-only, like on the device).
#define threadIdx (static_cast<const uint3&>(::gam_emu::t_builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::gam_emu::t_builtins.block_idx))
#define blockDim (static_cast<const dim3&>(::gam_emu::t_builtins.block_dim))
#define gridDim (static_cast<const dim3&>(::gam_emu::t_builtins.grid_dim))
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Block barriers. File/line of the call site are recorded so that threads
// waiting at different barriers can be reported.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::gam_emu::block_barrier(file, line);
}

// ---------------------------------------------------------------------------
// Warp collectives.
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::gam_emu::warp_op(::gam_emu::WarpOpKind::kSyncWarp, mask, 0, 0, 32, "__syncwarp", file, line);
}

inline unsigned __activemask() { return ::gam_emu::active_mask(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::gam_emu::from_bits<T>(::gam_emu::warp_op(::gam_emu::WarpOpKind::kShfl, mask,
                                                    ::gam_emu::to_bits(var), src_lane, width,
                                                    "__shfl_sync", file, line));
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::gam_emu::from_bits<T>(
      ::gam_emu::warp_op(::gam_emu::WarpOpKind::kShflUp, mask, ::gam_emu::to_bits(var),
                         static_cast<int>(delta), width, "__shfl_up_sync", file, line));
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::gam_emu::from_bits<T>(
      ::gam_emu::warp_op(::gam_emu::WarpOpKind::kShflDown, mask, ::gam_emu::to_bits(var),
                         static_cast<int>(delta), width, "__shfl_down_sync", file, line));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::gam_emu::from_bits<T>(::gam_emu::warp_op(::gam_emu::WarpOpKind::kShflXor, mask,
                                                    ::gam_emu::to_bits(var), lane_mask, width,
                                                    "__shfl_xor_sync", file, line));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(::gam_emu::warp_op(
      ::gam_emu::WarpOpKind::kBallot, mask, predicate != 0, 0, 32, "__ballot_sync", file, line));
}

inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(::gam_emu::warp_op(::gam_emu::WarpOpKind::kAny, mask, predicate != 0, 0,
                                             32, "__any_sync", file, line));
}

inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(::gam_emu::warp_op(::gam_emu::WarpOpKind::kAll, mask, predicate != 0, 0,
                                             32, "__all_sync", file, line));
}

inline void __trap() { ::gam_emu::trap("__trap() called"); }

// ---------------------------------------------------------------------------
// Shared memory. Every block gets fresh heap allocations (AddressSanitizer
// sees overflows), filled with 0xFF bytes (reads before writes give NaN).
// The static local is a per-site (and per template instantiation) key, so all
// threads of a block get the same array. static_assert keeps `count` a
// compile-time constant, as nvcc requires.
#define GAM_SHARED(type, name, count)                                                             \
  static_assert((count) > 0,                                                                      \
                "GAM_SHARED(" #name "): count must be a positive compile-time constant");         \
  static char gam_shared_site_##name;                                                             \
  ::gam_emu::shared_ptr_t<type> const name = static_cast<::gam_emu::shared_ptr_t<type>>(          \
      ::gam_emu::shared_array(&gam_shared_site_##name, sizeof(type) * static_cast<size_t>(count), \
                              alignof(type), #name, __FILE__, __LINE__))

#define GAM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::gam_emu::dynamic_shared())

// ---------------------------------------------------------------------------
// Launch. Arguments are converted to the kernel's parameter types once (as a
// real launch copies them into the parameter buffer); each thread then gets
// its own by-value copy.
template <typename... KArgs, typename... Args>
inline void gam_launch(const char* kernel_name, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                       size_t dynamic_smem_bytes, cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "gam_launch: wrong number of kernel arguments");
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  auto body = [&]() { std::apply(kernel, params); };
  ::gam_emu::LaunchSpec spec{kernel_name, grid, block, dynamic_smem_bytes,
                             reinterpret_cast<const void*>(kernel)};
  ::gam_emu::launch(spec, [](void* closure) { (*static_cast<decltype(body)*>(closure))(); }, &body);
}

#include "emu/intrinsics.h"
#include "emu/warp_matrix.h"
#include "emu/warpgroup_matrix.h"
