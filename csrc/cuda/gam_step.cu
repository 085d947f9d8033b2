// The one-token step of generation: causal_conv1d_update and the fused step mixer.
//
// causal_conv1d_update: one thread per (sequence, channel) walks the L new rows, reading the K-1
// previous inputs from the state (shift register or circular buffer by position, gam_step.h),
// then pushes the new rows into the state. The thread owns its channel of the state, so the
// in-place update needs no synchronisation.
//
// gam_mixer_step, two kernels (flash-decoding style, so that one row per sequence still spreads
// over the GPU):
//   1. step_retrieval_partials: block (sequence b, split of kStepSlots slots). Each warp computes
//      scores h . M[j] for its slots (lanes stride over D, warp-shuffle sum); the block takes
//      their max m, p_j = exp(score_j - m), their sum l and acc = sum_j p_j M[j] (thread per
//      column), and writes [acc | m | l] as an fp32 partial.
//   2. step_combine: thread per (sequence, channel): the partials combined in split order
//      (g = sum acc * e^(m - max) / sum l * e^(m - max)), the conv from the state, both rounded
//      to T as the full-sequence ops store them, the two sigmoid gates, then the state update.
// No atomics, fixed summation order (bitwise repeatable), no host synchronisation and no
// allocation in the launchers (the workspace comes from the dispatch): capture-safe for CUDA
// graphs.
#include "common.cuh"
#include "gam_step.h"

namespace gam {
namespace cuda {
namespace {

constexpr int kStepThreads = 128;  // threads per block of every step kernel
constexpr int kStepWarps = kStepThreads / 32;
constexpr int kStepSlots = 32;  // slots per retrieval split

// q mod width for q >= 0 and width > 0: a 32-bit remainder where q fits in 32 bits (every cache
// position an int32 cache_seqlens can hold), which compiles inline; the 64-bit one is a call to a
// division subroutine (11-12 of them in these kernels' SASS, with a stack frame).
__device__ __forceinline__ int64_t ring_row(int64_t q, int64_t width) {
  return q <= 0xffffffffLL ? int64_t(uint32_t(q) % uint32_t(width)) : q % width;
}

// One channel of one sequence's conv state.
template <typename T>
struct StateColumn {
  T* col;          // &state[b][0][c]
  int64_t width;   // W
  int64_t dim;     // row stride
  const int* pos;  // &cache_seqlens[b], or nullptr (shift register)

  // The input `rel` rows before the first new one (rel < 0), as fp32; 0 before position 0.
  __device__ __forceinline__ float prev(int64_t rel) const {
    if (pos == nullptr) return to_f32(col[(width + rel) * dim]);
    const int64_t q = int64_t(*pos) + rel;
    return q < 0 ? 0.f : to_f32(col[ring_row(q, width) * dim]);
  }

  // After the outputs: the state takes the L new rows (x_col[l * x_stride]).
  __device__ __forceinline__ void push(const T* x_col, int64_t x_stride, int64_t l_rows) const {
    if (width == 0) return;
    if (pos != nullptr) {
      const int64_t p = *pos;
      for (int64_t l = l_rows > width ? l_rows - width : 0; l < l_rows; ++l) {
        col[ring_row(p + l, width) * dim] = x_col[l * x_stride];
      }
      return;
    }
    // Shift register: row i takes row i + L of [state ; x]; ascending i reads before it writes.
    for (int64_t i = 0; i < width; ++i) {
      const int64_t src = i + l_rows;
      col[i * dim] = src < width ? col[src * dim] : x_col[(src - width) * x_stride];
    }
  }
};

// bias + sum_j w[j] * input[l - (K-1) + j] for new row l of one channel.
template <typename T>
__device__ __forceinline__ float conv_tap_sum(const T* x_col, int64_t x_stride, int64_t l,
                                              const StateColumn<T>& st, const float* w, float bias,
                                              int k) {
  float acc = bias;
  for (int j = 0; j < k; ++j) {
    const int64_t rel = l - (k - 1) + j;
    const float v = rel >= 0 ? to_f32(x_col[rel * x_stride]) : st.prev(rel);
    acc = fmaf(w[j], v, acc);
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    conv_update_kernel(const T* __restrict__ x, T* __restrict__ state,
                       const float* __restrict__ weight, const float* __restrict__ bias,
                       const int* __restrict__ cache_seqlens, T* __restrict__ y, int64_t seqlen,
                       int64_t dim, int64_t width, int k) {
  const int64_t b = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kStepThreads + threadIdx.x;
  if (c >= dim) return;
  const StateColumn<T> st{state + b * width * dim + c, width, dim,
                          cache_seqlens != nullptr ? cache_seqlens + b : nullptr};
  const T* x_col = x + b * seqlen * dim + c;
  const float bc = bias != nullptr ? bias[c] : 0.f;
  const float* w = weight + c * k;
  for (int64_t l = 0; l < seqlen; ++l) {
    y[(b * seqlen + l) * dim + c] = from_f32<T>(conv_tap_sum(x_col, dim, l, st, w, bc, k));
  }
  st.push(x_col, dim, seqlen);
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    step_retrieval_partials(const T* __restrict__ h, const T* __restrict__ memory,
                            float* __restrict__ partials, int64_t dim, int64_t slots, int nsplit,
                            float scale) {
  GAM_SHARED(float, p_s, kStepSlots);
  const int64_t b = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j0 = int64_t(split) * kStepSlots;
  const int w = static_cast<int>(slots - j0 < kStepSlots ? slots - j0 : kStepSlots);
  const T* hb = h + b * dim;
  for (int jj = warp; jj < w; jj += kStepWarps) {  // warp-uniform loop
    const T* row = memory + (j0 + jj) * dim;
    float s = 0.f;
    for (int64_t c = lane; c < dim; c += 32) s = fmaf(to_f32(hb[c]), to_f32(row[c]), s);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) p_s[jj] = s * scale;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int jj = 0; jj < w; ++jj) mx = fmaxf(mx, p_s[jj]);
  // All -inf scores cannot happen with finite inputs; keep exp() finite anyway.
  const float shift = mx == -INFINITY ? 0.f : mx;
  __syncthreads();  // every thread has read the scores before they become probabilities
  if (threadIdx.x < w) p_s[threadIdx.x] = __expf(p_s[threadIdx.x] - shift);
  __syncthreads();
  float* part = partials + (b * nsplit + split) * (dim + 2);
  for (int64_t c = threadIdx.x; c < dim; c += kStepThreads) {
    float acc = 0.f;
    for (int jj = 0; jj < w; ++jj) acc = fmaf(p_s[jj], to_f32(memory[(j0 + jj) * dim + c]), acc);
    part[c] = acc;
  }
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int jj = 0; jj < w; ++jj) sum += p_s[jj];
    part[dim] = shift;
    part[dim + 1] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    step_combine(const T* __restrict__ h, T* __restrict__ state, const float* __restrict__ weight,
                 const float* __restrict__ bias, const int* __restrict__ cache_seqlens,
                 const T* __restrict__ gate_logits, const float* __restrict__ partials,
                 T* __restrict__ out, int64_t dim, int64_t width, int k, int nsplit) {
  const int64_t b = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kStepThreads + threadIdx.x;
  if (c >= dim) return;
  const float* parts = partials + b * nsplit * (dim + 2);
  float mx = -INFINITY;
  for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, parts[s * (dim + 2) + dim]);
  float total = 0.f, g = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const float* part = parts + s * (dim + 2);
    const float corr = __expf(part[dim] - mx);
    total = fmaf(part[dim + 1], corr, total);
    g = fmaf(part[c], corr, g);
  }
  const StateColumn<T> st{state + b * width * dim + c, width, dim,
                          cache_seqlens != nullptr ? cache_seqlens + b : nullptr};
  const T* h_col = h + b * dim + c;
  const float local =
      conv_tap_sum(h_col, dim, 0, st, weight + c * k, bias != nullptr ? bias[c] : 0.f, k);
  // Rounded to T as the full-sequence conv and retrieval store their outputs.
  const float lc = to_f32(from_f32<T>(local));
  const float gc = to_f32(from_f32<T>(g / total));
  const float zl = to_f32(gate_logits[b * 2 * dim + c]);
  const float zg = to_f32(gate_logits[b * 2 * dim + dim + c]);
  out[b * dim + c] = from_f32<T>(sigmoid_f32(zl) * lc + sigmoid_f32(zg) * gc);
  st.push(h_col, dim, 1);
}

inline int step_splits(int64_t slots) { return static_cast<int>(ceil_div(slots, kStepSlots)); }

inline dim3 step_column_grid(int64_t batch, int64_t dim) {
  return dim3(static_cast<unsigned>(batch), static_cast<unsigned>(ceil_div(dim, kStepThreads)));
}

}  // namespace

void launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen == 0 || p.dim == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    gam_launch("conv_update_kernel", conv_update_kernel<T>, step_column_grid(p.batch, p.dim),
               dim3(kStepThreads), 0, stream, static_cast<const T*>(p.x),
               static_cast<T*>(p.conv_state), p.weight, p.bias, p.cache_seqlens,
               static_cast<T*>(p.y), p.seqlen, p.dim, p.state_len, p.kwidth);
  });
}

int64_t gam_mixer_step_workspace_floats(int64_t batch, int64_t slots, int64_t dim) {
  return batch * step_splits(slots) * (dim + 2);
}

void launch_gam_mixer_step(const MixerStepParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  const int nsplit = step_splits(p.slots);
  if (nsplit > 65535) {
    throw std::runtime_error("gam_mixer_step: more than 65535 * 32 memory slots");
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* h = static_cast<const T*>(p.h);
    auto* state = static_cast<T*>(p.conv_state);
    gam_launch("step_retrieval_partials", step_retrieval_partials<T>,
               dim3(static_cast<unsigned>(p.batch), static_cast<unsigned>(nsplit)),
               dim3(kStepThreads), 0, stream, h, static_cast<const T*>(p.memory), p.partials, p.dim,
               p.slots, nsplit, p.scale);
    gam_launch("step_combine", step_combine<T>, step_column_grid(p.batch, p.dim),
               dim3(kStepThreads), 0, stream, h, state, p.weight, p.bias, p.cache_seqlens,
               static_cast<const T*>(p.gate_logits), static_cast<const float*>(p.partials),
               static_cast<T*>(p.out), p.dim, p.state_len, p.kwidth, nsplit);
  });
}

}  // namespace cuda
}  // namespace gam
