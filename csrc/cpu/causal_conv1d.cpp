// Causal depthwise conv over time on token-major (B, N, D) tensors, forward and backward.
//
// Every output row y[b, t, :] reads the K input rows x[b, t-K+1 .. t, :]; rows are contiguous over
// channels, so the inner loops run over D with unit stride and vectorise, and no (B, D, N) permuted
// copy is ever made. Work is split over flattened (b, t) rows. dw and dbias are summed per fixed
// chunk of rows, then the chunk partials are added in chunk order: the result does not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_ops.h"
#include "op_checks.h"

namespace gam::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 64;     // forward rows per parallel work item
constexpr int64_t kMinRowsPerChunk = 32;  // backward: rows per chunk partial of dw, dbias ...
constexpr int64_t kMaxChunks = 64;        // ... and at most this many partials (bounded memory)

// (K, D) copy of the (D, K) weight in the accumulation type: each tap becomes a contiguous row.
at::Tensor taps_major(const at::Tensor& weight, at::ScalarType acc) {
  return weight.to(acc).t().contiguous();
}

template <typename T>
void conv_fwd_kernel(const T* x, const acc_t<T>* wt, const acc_t<T>* bias, T* y, int64_t rows,
                     int64_t n, int64_t d, int64_t k) {
  using A = acc_t<T>;
  parallel_blocks(rows, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    std::vector<A> acc(d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % n;
      A* __restrict a = acc.data();
      if (bias != nullptr) {
        std::copy(bias, bias + d, a);
      } else {
        std::fill(a, a + d, A(0));
      }
      // Tap j reads row t - (K-1) + j; taps before the start of the sequence read zeros.
      for (int64_t j = std::max<int64_t>(0, k - 1 - t); j < k; ++j) {
        const T* __restrict xr = x + (r - (k - 1) + j) * d;
        const A* __restrict w = wt + j * d;
        for (int64_t c = 0; c < d; ++c) a[c] += w[c] * static_cast<A>(xr[c]);
      }
      convert_row(y + r * d, a, d);
    }
  });
}

// One pass over the rows: dx from the K future rows of dy, and dw, dbias partials of each chunk.
// partials: (chunks, K + 1, D); row K of a chunk holds its dbias.
template <typename T>
void conv_bwd_kernel(const T* dy, const T* x, const acc_t<T>* wt, T* dx, acc_t<T>* partials,
                     int64_t chunks, int64_t chunk_rows, int64_t rows, int64_t n, int64_t d,
                     int64_t k) {
  using A = acc_t<T>;
  parallel_items(chunks, [&](int64_t ch) {
    std::vector<A> acc(d), dyr(d);
    {
      A* __restrict part = partials + ch * (k + 1) * d;
      std::fill(part, part + (k + 1) * d, A(0));
      A* __restrict db = part + k * d;
      const int64_t r_end = std::min(rows, (ch + 1) * chunk_rows);
      for (int64_t r = ch * chunk_rows; r < r_end; ++r) {
        const int64_t t = r % n;
        // dx[t] = sum_j w[j] * dy[t + (K-1) - j]; rows past the end of the sequence are zero.
        A* __restrict a = acc.data();
        std::fill(a, a + d, A(0));
        for (int64_t j = std::max<int64_t>(0, t + k - n); j < k; ++j) {
          const T* __restrict dr = dy + (r + (k - 1) - j) * d;
          const A* __restrict w = wt + j * d;
          for (int64_t c = 0; c < d; ++c) a[c] += w[c] * static_cast<A>(dr[c]);
        }
        convert_row(dx + r * d, a, d);
        // dw[j] += dy[t] * x[t - (K-1) + j]; dbias += dy[t].
        A* __restrict g = dyr.data();
        convert_row(g, dy + r * d, d);
        for (int64_t c = 0; c < d; ++c) db[c] += g[c];
        for (int64_t j = std::max<int64_t>(0, k - 1 - t); j < k; ++j) {
          const T* __restrict xr = x + (r - (k - 1) + j) * d;
          A* __restrict dwj = part + j * d;
          for (int64_t c = 0; c < d; ++c) dwj[c] += g[c] * static_cast<A>(xr[c]);
        }
      }
    }
  });
}

// dw[c, j] and dbias[c]: the chunk partials summed in chunk order, in parallel over channels.
template <typename A>
void reduce_partials(const A* partials, int64_t chunks, int64_t d, int64_t k, A* dw, A* db) {
  parallel_blocks(d, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t j = 0; j <= k; ++j) {
      for (int64_t c = c0; c < c1; ++c) {
        A sum = A(0);
        for (int64_t ch = 0; ch < chunks; ++ch) sum += partials[(ch * (k + 1) + j) * d + c];
        if (j < k) {
          dw[c * k + j] = sum;
        } else {
          db[c] = sum;
        }
      }
    }
  });
}

}  // namespace

at::Tensor causal_conv1d_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_conv_args(x_in, weight, bias);
  const at::Tensor x = x_in.contiguous();
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), k = weight.size(1);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor wt = taps_major(weight, acc);
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_fwd", [&] {
        using A = acc_t<scalar_t>;
        conv_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), wt.const_data_ptr<A>(),
                                  bias_acc.defined() ? bias_acc.const_data_ptr<A>() : nullptr,
                                  y.mutable_data_ptr<scalar_t>(), b * n, n, d, k);
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(const at::Tensor& grad_y,
                                                                 const at::Tensor& x_in,
                                                                 const at::Tensor& weight) {
  check_conv_bwd_args(grad_y, x_in, weight);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous();
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), k = weight.size(1);
  const int64_t rows = b * n;
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros({d, k}, weight.options().dtype(acc));
  at::Tensor db = at::zeros({d}, weight.options().dtype(acc));
  if (rows > 0 && d > 0) {
    const at::Tensor wt = taps_major(weight, acc);
    // The chunking depends on the number of rows only, so the sums are the same on any thread
    // count.
    const int64_t chunks = std::min(kMaxChunks, (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
    const int64_t chunk_rows = (rows + chunks - 1) / chunks;
    at::Tensor partials = at::empty({chunks, k + 1, d}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_bwd", [&] {
          using A = acc_t<scalar_t>;
          conv_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    wt.const_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(),
                                    partials.mutable_data_ptr<A>(), chunks, chunk_rows, rows, n, d,
                                    k);
          reduce_partials<A>(partials.const_data_ptr<A>(), chunks, d, k, dw.mutable_data_ptr<A>(),
                             db.mutable_data_ptr<A>());
        });
  }
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace gam::cpu
