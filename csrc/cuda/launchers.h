// Host launchers of the CUDA kernels (defined in the .cu files of this folder), called by the
// dispatch. Torch-free: POD params and a stream.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "compat.cuh"

#include "params.h"

namespace gam {
namespace cuda {

// One kernel launch of an op, as the resource report (benchmarks/kernel_resources.py) matches
// it to the compiler's figures: the kernel's name as its demangled symbol spells it (function
// and template arguments), its block size and dynamic shared memory.
struct KernelLaunch {
  std::string kernel;
  int threads;
  int64_t smem_bytes;
};

void launch_causal_conv1d_fwd(const ConvFwdParams& p, cudaStream_t stream);
// Floats of fp32 workspace that the conv backward needs for the per-block dw/dbias partials.
int64_t causal_conv1d_bwd_workspace_floats(int64_t batch, int64_t seqlen, int64_t dim, int kwidth);
void launch_causal_conv1d_bwd(const ConvBwdParams& p, cudaStream_t stream);

void launch_memory_retrieval_fwd(const RetrievalFwdParams& p, cudaStream_t stream);
// The kernel and configuration launch_memory_retrieval_fwd picks for p, in words and as
// launches.
std::string describe_memory_retrieval_fwd(const RetrievalFwdParams& p);
std::vector<KernelLaunch> memory_retrieval_fwd_kernels(const RetrievalFwdParams& p);
// Row ranges the dM reduction is split over, and the workspace floats for its partials.
int memory_retrieval_bwd_row_splits(int64_t rows);
int64_t memory_retrieval_bwd_workspace_floats(int64_t slots, int64_t dim, int row_splits);
// Elements (of h's dtype) of the P / dS workspace the backward needs for p's shape, device and
// path (0 when it runs the SIMT kernels).
int64_t memory_retrieval_bwd_pds_elements(const RetrievalBwdParams& p);
void launch_memory_retrieval_bwd(const RetrievalBwdParams& p, cudaStream_t stream);
// The wgmma forward (memory_retrieval_fwd_wgmma.cu, GAM_EXT_RETRIEVAL=wgmma): whether p's shape,
// dtype, pointers and device suit it (fp16 / bf16, D = 128, 256 or 512, 16-byte aligned, sm_90, its
// shared memory), its launch, and its description. launch_wgmma_probe writes 1 to *compiled (device
// memory) where the device runs code built for sm_90a (the kernel has wgmma there), else 0.
bool retrieval_fwd_wgmma_applies(const RetrievalFwdParams& p);
void launch_retrieval_fwd_wgmma(const RetrievalFwdParams& p, cudaStream_t stream);
std::string describe_retrieval_fwd_wgmma(const RetrievalFwdParams& p);
void launch_wgmma_probe(int* compiled, cudaStream_t stream);
// The wgmma backward's score kernel (memory_retrieval_bwd_wgmma.cu): whether p suits it (fp16 /
// bf16, D = 64 .. 512 with D % 64 == 0, 16-byte aligned h, grad_out, memory and out, sm_90, its
// shared memory); its launch, which writes P to p.pds and scale * dS to p.ds (rounded to h's
// dtype, rows p.pds_ld elements apart, S rounded up to 8 slots per row, zeros past S); and its
// description.
bool retrieval_bwd_wgmma_applies(const RetrievalBwdParams& p);
void launch_retrieval_bwd_wgmma(const RetrievalBwdParams& p, cudaStream_t stream);
std::string describe_retrieval_bwd_wgmma(const RetrievalBwdParams& p);
// The kernels and configuration launch_memory_retrieval_bwd picks for p, in words.
std::string describe_memory_retrieval_bwd(const RetrievalBwdParams& p);
std::vector<KernelLaunch> memory_retrieval_bwd_kernels(const RetrievalBwdParams& p);

// The gemm path's softmax kernels, one warp per row: the forward writes P (dtype) and lse from
// fp32 scores; the backward recomputes P from scores and lse, delta = rowsum(P * dP), and writes
// P and scale * P * (dP - delta) (dtype).
void launch_retrieval_softmax_fwd(const RetrievalSoftmaxParams& p, cudaStream_t stream);
void launch_retrieval_softmax_bwd(const RetrievalSoftmaxParams& p, cudaStream_t stream);
// float4s per lane of their register-resident variants for p (1, 2, 4 or 8: rows of up to 128,
// 256, 512 or 1024 slots, read once with 16-byte loads), or 0 for the element-wise kernels: S not
// a multiple of 4, a pointer not aligned to its 4-element vector, or S > 128 * the largest
// variant (1024; 512 for fp32 P, whose 8-vector forward spills on sm_100).
constexpr int softmax_max_vecs(bool f32) { return f32 ? 4 : 8; }
int retrieval_softmax_vecs(const RetrievalSoftmaxParams& p);

// The fused mixer (gam_mixer.cu): the forward's epilogue on the G the retrieval (any path) wrote,
// the backward's prologue, and the sum of the backward's three parts of dh (on the retrieval
// paths that compute their own dh).
void launch_gam_mixer_epilogue(const MixerEpilogueParams& p, cudaStream_t stream);
void launch_gam_mixer_prologue(const MixerPrologueParams& p, cudaStream_t stream);
void launch_gam_mixer_dh_sum(const MixerDhSumParams& p, cudaStream_t stream);

void launch_gate_fusion_fwd(const GateFwdParams& p, cudaStream_t stream);
void launch_gate_fusion_bwd(const GateBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace gam
