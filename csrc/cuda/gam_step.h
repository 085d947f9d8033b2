// Params and host launchers of the one-token step kernels (gam_step.cu): causal_conv1d_update and
// gam_mixer_step. Torch-free, like params.h and launchers.h; kept apart from them because the
// step is a separate family of inference-only kernels.
#pragma once

#include <cstdint>

#include "compat.cuh"
#include "params.h"

namespace gam {
namespace cuda {

// The conv's previous inputs: conv_state (B, W, D) in the activation dtype, updated in place.
// cache_seqlens == nullptr: a shift register holding the W rows before the new ones, oldest
// first. Otherwise a circular buffer: the row at absolute position q of sequence b is state row
// q mod W, the first new row is at position cache_seqlens[b], taps before position 0 read 0.
struct ConvUpdateParams {
  const void* x;             // (B, L, D) new rows
  void* conv_state;          // (B, W, D)
  const float* weight;       // (D, K)
  const float* bias;         // (D) or nullptr
  const int* cache_seqlens;  // (B) int32 or nullptr
  void* y;                   // (B, L, D)
  int64_t batch, seqlen, dim, state_len;
  int kwidth;
  DType dtype;
};

struct MixerStepParams {
  const void* h;             // (B, D) one row per sequence
  void* conv_state;          // (B, W, D), as in ConvUpdateParams
  const float* weight;       // (D, K)
  const float* bias;         // (D) or nullptr
  const int* cache_seqlens;  // (B) int32 or nullptr
  const void* memory;        // (S, D) in h's dtype
  const void* gate_logits;   // (B, 2D): [zl, zg]
  void* out;                 // (B, D)
  float* partials;           // workspace: gam_mixer_step_workspace_floats() floats
  int64_t batch, dim, slots, state_len;
  int kwidth;
  float scale;
  DType dtype;
};

void launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream);
// Floats of fp32 workspace for the per-(row, slot split) retrieval partials of the step.
int64_t gam_mixer_step_workspace_floats(int64_t batch, int64_t slots, int64_t dim);
void launch_gam_mixer_step(const MixerStepParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace gam
