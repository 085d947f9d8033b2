// The CUDA runtime calls that kernels' host launchers and dispatch make, on host pointers, for
// the emulated build (simt.h sends the cuda* names here). Nothing else of the runtime is
// emulated: a call of another one fails to link, and the emulated build reports it by name.
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "emu/runtime.h"
#include "emu/simt.h"

namespace gam_emu {
namespace {

std::mutex g_attr_mutex;
std::unordered_map<const void*, int>& max_dyn_smem_attr() {
  static std::unordered_map<const void*, int> m;
  return m;
}

}  // namespace

size_t dynamic_smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = max_dyn_smem_attr().find(kernel);
  return it != max_dyn_smem_attr().end() ? static_cast<size_t>(it->second)
                                         : kDefaultDynamicSmemLimit;
}

namespace rt {

cudaError_t memset_async(void* ptr, int value, size_t count, cudaStream_t) {
  if (count != 0 && ptr == nullptr) return cudaErrorInvalidValue;
  if (count != 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t memcpy_async(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                         cudaStream_t) {
  if (static_cast<int>(kind) < 0 || static_cast<int>(kind) > 4)
    return cudaErrorInvalidMemcpyDirection;
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxSmemOptin) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    max_dyn_smem_attr()[func] = value;
  }
  return cudaSuccess;
}

const char* get_error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error (emulated)";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated)";
    case cudaErrorInvalidMemcpyDirection:
      return "invalid copy direction (emulated)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    default:
      return "CUDA error (emulated)";
  }
}

}  // namespace rt
}  // namespace gam_emu
