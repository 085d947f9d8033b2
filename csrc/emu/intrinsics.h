// Device intrinsics for the emulated build (included by simt.h): the ones the kernels and the
// emulator self-tests use, no more (a kernel that needs another one adds it here, with a
// self-test). The threads of a block are fibers on one OS thread and never preempted, so a
// plain read-modify-write is atomic here; the accesses are still instrumented, so out-of-bounds
// atomics are caught.
#pragma once

#include <math.h>

// ---- float math --------------------------------------------------------------
// Fast-math intrinsics use the accurate libm functions: results are at least as accurate as the
// GPU's, so tolerances tuned here may be tight on a GPU.
inline float __expf(float x) { return expf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float x, float y) { return x / y; }

// ---- min, as the CUDA math headers provide it -----------------------------------
inline int min(int a, int b) { return a < b ? a : b; }

// ---- atomics ----------------------------------------------------------------------
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

// ---- cache-hinted stores ----------------------------------------------------------
// __stcg (store, cache global: L2 only) is a plain store here.
template <typename T>
inline void __stcg(T* address, const T& value) {
  *address = value;
}
