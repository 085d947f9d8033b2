// Gate fusion f = sigmoid(zl) * local + sigmoid(zg) * global_ctx, forward and backward, one pass
// each.
// gate_logits rows are [zl (D) | zg (D)]; all loops are elementwise over contiguous rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/cpu_common.h"
#include "cpu/cpu_ops.h"
#include "op_checks.h"

namespace gam::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 32;

// Rows [r0, r1) of the forward.
template <typename T>
GAM_INLINE void gate_fwd_rows(const T* local, const T* global_ctx, const T* z, T* f, int64_t r0,
                              int64_t r1, int64_t d) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict l = local + r * d;
    const T* __restrict g = global_ctx + r * d;
    const T* __restrict zl = z + r * 2 * d;
    const T* __restrict zg = zl + d;
    T* __restrict out = f + r * d;
    for (int64_t c = 0; c < d; ++c) {
      const A sl = sigmoid(static_cast<A>(zl[c]));
      const A sg = sigmoid(static_cast<A>(zg[c]));
      out[c] = cast_to<T>(sl * static_cast<A>(l[c]) + sg * static_cast<A>(g[c]));
    }
  }
}

// Rows [r0, r1) of the backward.
template <typename T>
GAM_INLINE void gate_bwd_rows(const T* grad_out, const T* local, const T* global_ctx, const T* z,
                              T* dlocal, T* dglobal_ctx, T* dz, int64_t r0, int64_t r1, int64_t d) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict dfr = grad_out + r * d;
    const T* __restrict l = local + r * d;
    const T* __restrict g = global_ctx + r * d;
    const T* __restrict zl = z + r * 2 * d;
    const T* __restrict zg = zl + d;
    T* __restrict dl = dlocal + r * d;
    T* __restrict dg = dglobal_ctx + r * d;
    T* __restrict dzl = dz + r * 2 * d;
    T* __restrict dzg = dzl + d;
    // The local and the global half in two simple loops, each of which vectorises.
    for (int64_t c = 0; c < d; ++c) {
      const A grad = static_cast<A>(dfr[c]);
      const A sl = sigmoid(static_cast<A>(zl[c]));
      dl[c] = cast_to<T>(sl * grad);
      dzl[c] = cast_to<T>(grad * static_cast<A>(l[c]) * sl * (A(1) - sl));
    }
    for (int64_t c = 0; c < d; ++c) {
      const A grad = static_cast<A>(dfr[c]);
      const A sg = sigmoid(static_cast<A>(zg[c]));
      dg[c] = cast_to<T>(sg * grad);
      dzg[c] = cast_to<T>(grad * static_cast<A>(g[c]) * sg * (A(1) - sg));
    }
  }
}

template <typename T>
void gate_fwd_kernel(const T* local, const T* global_ctx, const T* z, T* f, int64_t rows,
                     int64_t d) {
  parallel_blocks(rows, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    run_best_isa<gate_fwd_rows<T>>(local, global_ctx, z, f, r0, r1, d);
  });
}

template <typename T>
void gate_bwd_kernel(const T* grad_out, const T* local, const T* global_ctx, const T* z, T* dlocal,
                     T* dglobal_ctx, T* dz, int64_t rows, int64_t d) {
  parallel_blocks(rows, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    run_best_isa<gate_bwd_rows<T>>(grad_out, local, global_ctx, z, dlocal, dglobal_ctx, dz, r0, r1,
                                   d);
  });
}

}  // namespace

at::Tensor gate_fusion_fwd(const at::Tensor& local_in, const at::Tensor& global_ctx_in,
                           const at::Tensor& gate_logits_in) {
  check_gate_args(local_in, global_ctx_in, gate_logits_in);
  const at::Tensor local = local_in.contiguous(), global_ctx = global_ctx_in.contiguous(),
                   z = gate_logits_in.contiguous();
  at::Tensor f = at::empty_like(local, at::MemoryFormat::Contiguous);
  const int64_t d = local.size(2), rows = local.size(0) * local.size(1);
  if (f.numel() == 0) return f;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, local.scalar_type(), "gate_fusion_fwd", [&] {
        gate_fwd_kernel<scalar_t>(
            local.const_data_ptr<scalar_t>(), global_ctx.const_data_ptr<scalar_t>(),
            z.const_data_ptr<scalar_t>(), f.mutable_data_ptr<scalar_t>(), rows, d);
      });
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_fusion_bwd(const at::Tensor& grad_out_in,
                                                               const at::Tensor& local_in,
                                                               const at::Tensor& global_ctx_in,
                                                               const at::Tensor& gate_logits_in) {
  check_gate_bwd_args(grad_out_in, local_in, global_ctx_in, gate_logits_in);
  const at::Tensor local = local_in.contiguous(), global_ctx = global_ctx_in.contiguous(),
                   z = gate_logits_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(local.scalar_type()).contiguous();
  at::Tensor dlocal = at::empty_like(local, at::MemoryFormat::Contiguous);
  at::Tensor dglobal_ctx = at::empty_like(global_ctx, at::MemoryFormat::Contiguous);
  at::Tensor dz = at::empty_like(z, at::MemoryFormat::Contiguous);
  const int64_t d = local.size(2), rows = local.size(0) * local.size(1);
  if (local.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, local.scalar_type(), "gate_fusion_bwd", [&] {
          gate_bwd_kernel<scalar_t>(
              grad_out.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(),
              global_ctx.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
              dlocal.mutable_data_ptr<scalar_t>(), dglobal_ctx.mutable_data_ptr<scalar_t>(),
              dz.mutable_data_ptr<scalar_t>(), rows, d);
        });
  }
  return {dlocal, dglobal_ctx, dz};
}

}  // namespace gam::cpu
