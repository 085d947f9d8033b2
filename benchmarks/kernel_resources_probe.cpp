// Host-only probe for benchmarks/kernel_resources.py: prints the kernel launches the retrieval
// launchers pick (kernel, threads, dynamic shared memory) for one shape on one device, one per
// line, tab separated:  op  dtype  kernel  threads  smem_bytes
// It links the host code of csrc/cuda/memory_retrieval_{fwd,bwd}.cu and never calls the CUDA
// runtime, so it runs without a GPU.
//   probe SM SMEM_OPTIN SMEM_PER_SM ROWS SLOTS DIM
#include <cstdio>
#include <cstdlib>

#include "cuda/launchers.h"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s SM SMEM_OPTIN SMEM_PER_SM ROWS SLOTS DIM\n", argv[0]);
    return 2;
  }
  using namespace gam::cuda;
  const int sm = std::atoi(argv[1]), optin = std::atoi(argv[2]), per_sm = std::atoi(argv[3]);
  const long long rows = std::atoll(argv[4]), slots = std::atoll(argv[5]), dim = std::atoll(argv[6]);
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  const char* names[] = {"bfloat16", "float16", "float32"};
  for (int i = 0; i < 3; ++i) {
    RetrievalFwdParams f{};
    f.rows = rows;
    f.slots = slots;
    f.dim = dim;
    f.dtype = dtypes[i];
    f.tensor_cores = true;
    f.sm = sm;
    f.max_smem_bytes = optin;
    f.smem_per_sm = per_sm;
    for (const KernelLaunch& k : memory_retrieval_fwd_kernels(f))
      std::printf("fwd\t%s\t%s\t%d\t%lld\n", names[i], k.kernel.c_str(), k.threads,
                  static_cast<long long>(k.smem_bytes));
    RetrievalBwdParams b{};
    b.rows = rows;
    b.slots = slots;
    b.dim = dim;
    b.dtype = dtypes[i];
    b.row_splits = memory_retrieval_bwd_row_splits(rows);
    b.tensor_cores = true;
    b.sm = sm;
    b.max_smem_bytes = optin;
    b.smem_per_sm = per_sm;
    for (const KernelLaunch& k : memory_retrieval_bwd_kernels(b))
      std::printf("bwd\t%s\t%s\t%d\t%lld\n", names[i], k.kernel.c_str(), k.threads,
                  static_cast<long long>(k.smem_bytes));
  }
  return 0;
}
