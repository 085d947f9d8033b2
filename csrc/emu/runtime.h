// Device limits and per-kernel attributes of the SIMT emulation layer, shared by its engine
// (engine.cpp) and its CUDA runtime stubs (runtime.cpp). Internal to csrc/emu.
#pragma once

#include <cstddef>

namespace gam_emu {

constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;
constexpr size_t kMaxSmemOptin = 227 * 1024;  // H100 opt-in limit per block

// The dynamic shared memory a kernel may use: what cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, ...) allowed, else 48 KiB.
size_t dynamic_smem_limit(const void* kernel);

}  // namespace gam_emu
