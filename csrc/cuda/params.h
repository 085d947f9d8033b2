// POD parameter structs shared by the CUDA kernel sources (torch-free) and their host dispatch.
// All tensors are contiguous; activations are token-major (B, N, D) with rows = B * N.
#pragma once

#include <cstdint>

namespace gam {
namespace cuda {

// Element type of the activation tensors. Parameters (conv weight/bias) are always fp32 here;
// the dispatch converts them. Every kernel accumulates in fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvFwdParams {
  const void* x;        // (B, N, D) activations
  const float* weight;  // (D, K)
  const float* bias;    // (D) or nullptr
  void* y;              // (B, N, D)
  int64_t batch, seqlen, dim;
  int kwidth;
  DType dtype;
};

struct ConvBwdParams {
  const void* dy;       // (B, N, D)
  const void* x;        // (B, N, D)
  const float* weight;  // (D, K)
  void* dx;             // (B, N, D)
  float* dweight;       // (D, K) fp32, written (not accumulated)
  float* dbias;         // (D) fp32, written
  float* partials;      // workspace: causal_conv1d_bwd_workspace_floats() floats
  int64_t batch, seqlen, dim;
  int kwidth;
  DType dtype;
};

// The fused mixer's forward epilogue (gam_mixer_fwd): with G the retrieval's output of a row,
//   out = sigmoid(z[:D]) * conv(h) + sigmoid(z[D:]) * G.
struct MixerEpilogueParams {
  const void* h;              // (R, D): the retrieval's queries are the conv's input
  const void* gate_logits;    // (R, 2D) z = h Wg^T + bg
  const void* global_ctx;     // (R, D) G
  const float* conv_weight;   // (D, K) fp32
  const float* conv_bias;     // (D) fp32 or nullptr
  void* out;                  // (R, D)
  int64_t rows, seqlen, dim;  // R = B * N; row r is step r % N of its sequence
  int kwidth;                 // K
  DType dtype;
};

// The wgmma path's forward kernels: pipelined (the default), lockstep (the first) and seesaw (the
// scores of each tile computed once, by one warpgroup).
enum class WgmmaForward : int { kPipelined = 0, kLockstep = 1, kSeesaw = 2 };

struct RetrievalFwdParams {
  const void* h;       // (R, D) rows of the queries, R = B * N
  const void* memory;  // (S, D), same dtype as h
  void* out;           // (R, D)
  float* lse;          // (R) fp32 logsumexp of the scaled scores
  int64_t rows, slots, dim;
  float scale;
  DType dtype;
  // The device, as the launcher sizes the fused kernels for it: tensor_cores false forces the
  // fp32 SIMT kernels (GAM_EXT_RETRIEVAL=simt); sm is the compute capability (75 = sm_75);
  // shared memory per block (opt-in) and per SM, in bytes.
  bool tensor_cores;
  int sm;
  int max_smem_bytes;
  int smem_per_sm;
  // GAM_EXT_WGMMA_FORWARD: which of the wgmma path's forward kernels runs
  // (memory_retrieval_fwd_wgmma.cu), so that one process can measure each.
  WgmmaForward wgmma_forward;
};

struct RetrievalBwdParams {
  const void* grad_out;  // (R, D) gradient of out
  const void* h;         // (R, D)
  const void* memory;    // (S, D), same dtype as h
  const void* out;       // (R, D) the forward's output
  const float* lse;      // (R)
  void* dh;              // (R, D)
  float* dmemory;        // (S, D) fp32, written
  float* delta;          // workspace (R) fp32
  float* inv_psum;       // workspace (R) fp32: 1 / rowsum(p), the SIMT kernels' renormalisation
  float* delta_pdp;      // workspace (R) fp32: rowsum(p dP), the SIMT kernels' exact delta
  float* partials;       // workspace: memory_retrieval_bwd_workspace_floats() floats
  void* pds;             // workspace: memory_retrieval_bwd_pds_elements() elements of h's dtype
                         // (P, then scale * dS, each rows x S rounded up to 8) or nullptr;
                         // the wgmma score kernel writes P here
  void* ds;              // the wgmma score kernel: where scale * dS goes
  int64_t pds_ld;        // the wgmma score kernel: the row stride of P and dS (a multiple of 8)
  int64_t rows, slots, dim;
  float scale;
  DType dtype;
  int row_splits;     // dM partial sums over this many row ranges (set by the launcher helper)
  bool tensor_cores;  // as in RetrievalFwdParams
  int sm;
  int max_smem_bytes;
  int smem_per_sm;
};

// The fused mixer's backward prologue (gam_mixer_bwd): from df, z, G and h it writes dG = sg df
// (the retrieval's grad_out), dL = sl df (the conv's) and dz = [df conv(h) sl (1 - sl), df G sg
// (1 - sg)].
struct MixerPrologueParams {
  const void* grad_out;      // (R, D) df
  const void* h;             // (R, D)
  const void* gate_logits;   // (R, 2D)
  const void* global_ctx;    // (R, D) G, kept by the forward
  const float* conv_weight;  // (D, K) fp32
  const float* conv_bias;    // (D) fp32 or nullptr
  void* dglobal;             // (R, D) dG
  void* dlocal;              // (R, D) dL
  void* dgate_logits;        // (R, 2D) dz, rows dz_ld elements apart
  int64_t dz_ld;             // >= 2D
  int64_t rows, seqlen, dim;
  int kwidth;
  DType dtype;
};

// The fused mixer's backward on the fused and SIMT retrieval paths, last step: dh = (gate part +
// retrieval part) + conv part, summed in fp32 in that order and rounded once to T, in one pass
// (the gate part is cuBLAS's fp32 dz Wg).
struct MixerDhSumParams {
  const float* gate_part;      // (R, D) fp32
  const void* retrieval_part;  // (R, D) T
  const void* conv_part;       // (R, D) T
  void* dh;                    // (R, D) T, written
  int64_t n;                   // R * D
  DType dtype;
};

// GAM_EXT_RETRIEVAL=gemm: the softmax kernels between the cuBLAS products (dispatch.cpp).
struct RetrievalSoftmaxParams {
  const float* scores;  // (R, S) fp32: h M^T (unscaled)
  const float* dp;      // backward: (R, S) fp32 grad_out M^T
  float* lse;           // forward: written (R); backward: read
  void* p;              // (R, S) in dtype: the probabilities
  void* ds;             // backward: (R, S) in dtype: scale * dS
  int64_t rows, slots;
  int64_t ld;  // backward: the row stride of p and ds (>= S rounded up to 8); the forward's p is
               // (R, S) contiguous
  float scale;
  DType dtype;
};

struct GateFwdParams {
  const void* local;        // (R, D)
  const void* global_ctx;   // (R, D)
  const void* gate_logits;  // (R, 2D): [zl, zg]
  void* out;                // (R, D)
  int64_t rows, dim;
  DType dtype;
};

struct GateBwdParams {
  const void* grad_out;  // (R, D)
  const void* local;
  const void* global_ctx;
  const void* gate_logits;  // (R, 2D)
  void* dlocal;             // (R, D)
  void* dglobal_ctx;        // (R, D)
  void* dgate_logits;       // (R, 2D)
  int64_t rows, dim;
  DType dtype;
};

}  // namespace cuda
}  // namespace gam
