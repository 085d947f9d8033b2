// Registers the CPU kernels of every gam_ext op (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "cpu/cpu_ops.h"

TORCH_LIBRARY_IMPL(gam_ext, CPU, m) {
  m.impl("causal_conv1d_fwd", &gam::cpu::causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &gam::cpu::causal_conv1d_bwd);
  m.impl("memory_retrieval_fwd", &gam::cpu::memory_retrieval_fwd);
  m.impl("memory_retrieval_bwd", &gam::cpu::memory_retrieval_bwd);
  m.impl("gate_fusion_fwd", &gam::cpu::gate_fusion_fwd);
  m.impl("gate_fusion_bwd", &gam::cpu::gate_fusion_bwd);
  m.impl("gam_mixer_fwd", &gam::cpu::gam_mixer_fwd);
  m.impl("gam_mixer_bwd", &gam::cpu::gam_mixer_bwd);
  m.impl("causal_conv1d_update", &gam::cpu::causal_conv1d_update);
  m.impl("gam_mixer_step", &gam::cpu::gam_mixer_step);
}
