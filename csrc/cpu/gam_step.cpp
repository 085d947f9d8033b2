// The one-token step of a GAM model (text generation with a constant-size state).
//
// causal_conv1d_update: new rows x (B, L, D) of a causal depthwise conv whose K-1 previous inputs
// come from a state (B, W, D), W >= K-1, updated in place. Without cache_seqlens the state is a
// shift register holding the W rows before x, oldest first; with cache_seqlens (B) it is a
// circular buffer: the row at absolute position q of sequence b lives in state row q mod W, x's
// first row is at position cache_seqlens[b], and taps before position 0 read zeros.
//
// gam_mixer_step: one row h (B, D) per sequence through the whole mixer: the conv from the state
// (which then takes h), softmax(scale * h M^T) M, and the two sigmoid gates with the given gate
// logits. The retrieval splits the slots into fixed chunks: each (row, chunk) computes a partial
// max, sum and p M, and the chunks are combined in chunk order (flash-decoding), so the result
// does not depend on the thread count and a single row still runs on every thread.
// The conv and retrieval outputs are rounded to the activation dtype before the gates, as the
// full-sequence ops hand them to gate_fusion, so the step computes what the full ops compute.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_ops.h"
#include "op_checks.h"

namespace gam::cpu {
namespace {

// The previous inputs of one sequence's conv: its state rows and where the new rows start.
template <typename T>
struct ConvStateView {
  T* rows;        // (W, D) of this sequence
  int64_t width;  // W
  bool circular;  // cache_seqlens given
  int64_t pos;    // circular: absolute position of the first new row

  // The input row `rel` rows before the first new one (rel < 0), or nullptr for a zero row.
  const T* prev(int64_t rel, int64_t d) const {
    if (!circular) return rows + (width + rel) * d;
    const int64_t q = pos + rel;
    if (q < 0) return nullptr;
    return rows + (q % width) * d;
  }

  // After the outputs are computed: the state takes the new rows x (L, D).
  void push(const T* x, int64_t l_rows, int64_t d) const {
    if (width == 0) return;
    if (circular) {
      for (int64_t l = std::max<int64_t>(0, l_rows - width); l < l_rows; ++l) {
        std::memcpy(rows + ((pos + l) % width) * d, x + l * d, sizeof(T) * d);
      }
      return;
    }
    // Shift register: row i takes row i + L of [state ; x]; ascending i reads before it writes.
    for (int64_t i = 0; i < width; ++i) {
      const int64_t src = i + l_rows;
      const T* from = src < width ? rows + src * d : x + (src - width) * d;
      std::memcpy(rows + i * d, from, sizeof(T) * d);
    }
  }
};

// acc = bias + sum_j w[j] * input[l - (K-1) + j] for new row l; wt is (K, D) in A.
template <typename T, typename A>
GAM_INLINE void conv_row(const T* x, int64_t l, const ConvStateView<T>& sv, const A* wt,
                         const A* bias, int64_t k, int64_t d, A* __restrict acc) {
  if (bias != nullptr) {
    std::copy(bias, bias + d, acc);
  } else {
    std::fill(acc, acc + d, A(0));
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t rel = l - (k - 1) + j;
    const T* __restrict row = rel >= 0 ? x + rel * d : sv.prev(rel, d);
    if (row == nullptr) continue;
    const A* __restrict w = wt + j * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += w[c] * static_cast<A>(row[c]);
  }
}

template <typename T>
ConvStateView<T> state_view(T* state, int64_t b, int64_t width, int64_t d, const int64_t* pos) {
  return ConvStateView<T>{state + b * width * d, width, pos != nullptr,
                          pos != nullptr ? pos[b] : 0};
}

// Slots per retrieval work item: about 64k multiply-adds each, fixed by D (never by the thread
// count), so the chunk partials and their combination do not depend on the machine.
int64_t step_slot_chunk(int64_t d) {
  return std::min<int64_t>(4096,
                           std::max<int64_t>(16, (65536 / std::max<int64_t>(d, 1)) / 16 * 16));
}

// src[0 .. 16) widened to A, as one vector-extension value.
template <typename Vec, typename A, typename M>
GAM_INLINE void widened_block(const M* src, Vec& out) {
  A v[16];
  for (int q = 0; q < 16; ++q) v[q] = static_cast<A>(src[q]);
  std::memcpy(&out, v, sizeof(Vec));
}

// row_dot<A>(h, mem + k * d, d) for k < 4, side by side: one row_dot is a single chain of
// dependent FMAs, four independent chains keep the FMA units busy. Each sum is row_dot's, in
// row_dot's order (16 partial sums, sum_partials). The partial sums are vector-extension values,
// which GCC keeps in registers (as plain arrays, 4 x 16 of them went to the stack).
template <typename A, typename M>
GAM_INLINE void row_dots4(const A* h, const M* mem, int64_t d, A* out) {
  typedef A Vec __attribute__((vector_size(16 * sizeof(A))));
  Vec acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  const int64_t blocks = d / 16;
  for (int64_t i = 0; i < blocks; ++i) {
    Vec x, y0, y1, y2, y3;
    std::memcpy(&x, h + i * 16, sizeof(Vec));
    widened_block<Vec, A>(mem + i * 16, y0);
    widened_block<Vec, A>(mem + d + i * 16, y1);
    widened_block<Vec, A>(mem + 2 * d + i * 16, y2);
    widened_block<Vec, A>(mem + 3 * d + i * 16, y3);
    acc0 += x * y0;
    acc1 += x * y1;
    acc2 += x * y2;
    acc3 += x * y3;
  }
  const Vec* accs[4] = {&acc0, &acc1, &acc2, &acc3};
  for (int k = 0; k < 4; ++k) {
    A s[16];
    std::memcpy(s, accs[k], sizeof(Vec));
    for (int64_t c = blocks * 16; c < d; ++c) s[0] += h[c] * static_cast<A>(mem[k * d + c]);
    out[k] = sum_partials(s);
  }
}

// One (row, slot chunk) of the retrieval: scores of the w slots of mem, their max mx, the sum of
// exp(score - mx) and acc = sum_j exp(score_j - mx) mem[j]. part = [acc (D) | mx | sum]. With
// round_p, exp(score - mx) enters acc rounded to bf16, as in the full-sequence kernels when they
// run bf16 products (bf16_gemm.h).
template <typename A, typename M>
GAM_INLINE void retrieval_chunk(const A* h, const M* mem, int64_t w, int64_t d, A scale, A* scores,
                                A* part, bool round_p) {
  A mx = -std::numeric_limits<A>::infinity();
  const int64_t w4 = w / 4 * 4;  // slots scored four at a time
  for (int64_t j = 0; j < w4; j += 4) {
    A dots[4];
    row_dots4(h, mem + j * d, d, dots);
    for (int k = 0; k < 4; ++k) {
      scores[j + k] = scale * dots[k];
      mx = std::max(mx, scores[j + k]);
    }
  }
  for (int64_t j = w4; j < w; ++j) {
    scores[j] = scale * row_dot<A>(h, mem + j * d, d);
    mx = std::max(mx, scores[j]);
  }
  // A chunk of all -inf scores cannot happen with finite inputs; keep exp() finite anyway.
  const A shift = std::isfinite(mx) ? mx : A(0);
  for (int64_t j = 0; j < w; ++j) scores[j] = fast_exp(scores[j] - shift);
  const A sum = row_sum(scores, w);
  A* __restrict acc = part;
  std::fill(acc, acc + d, A(0));
  for (int64_t j = 0; j < w; ++j) {
    A p = scores[j];
    if constexpr (std::is_same_v<A, float>) {
      if (round_p) p = static_cast<float>(to_bf16(p));
    }
    const M* __restrict row = mem + j * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += p * static_cast<A>(row[c]);
  }
  part[d] = shift;
  part[d + 1] = sum;
}

// Row b: combine the chunk partials into g, the conv from the state into local, both rounded to
// T as the full ops store them, then f = sigmoid(zl) * local + sigmoid(zg) * g.
template <typename T>
GAM_INLINE void mixer_step_row(const T* h, const T* z, const acc_t<T>* parts, int64_t chunks,
                               const ConvStateView<T>* sv, const acc_t<T>* wt, const acc_t<T>* bias,
                               int64_t k, int64_t d, acc_t<T>* g, acc_t<T>* local, T* f) {
  using A = acc_t<T>;
  const int64_t stride = d + 2;
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t ch = 0; ch < chunks; ++ch) mx = std::max(mx, parts[ch * stride + d]);
  A total = A(0);
  std::fill(g, g + d, A(0));
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const A* part = parts + ch * stride;
    const A corr = fast_exp(part[d] - mx);
    total += part[d + 1] * corr;
    for (int64_t c = 0; c < d; ++c) g[c] += corr * part[c];
  }
  const A inv = A(1) / total;
  conv_row(h, 0, *sv, wt, bias, k, d, local);
  const T* __restrict zl = z;
  const T* __restrict zg = z + d;
  for (int64_t c = 0; c < d; ++c) {
    const A lc = static_cast<A>(cast_to<T>(local[c]));
    const A gc = static_cast<A>(cast_to<T>(g[c] * inv));
    f[c] = cast_to<T>(sigmoid(static_cast<A>(zl[c])) * lc + sigmoid(static_cast<A>(zg[c])) * gc);
  }
}

// cache_seqlens as int64 on the host, or an undefined tensor.
at::Tensor positions_or_none(const c10::optional<at::Tensor>& cache_seqlens) {
  return cache_seqlens.has_value() ? cache_seqlens->to(at::kLong).contiguous() : at::Tensor();
}

}  // namespace

at::Tensor causal_conv1d_update(const at::Tensor& x_in, at::Tensor& conv_state,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& cache_seqlens) {
  check_conv_update_args(x_in, conv_state, weight, bias, cache_seqlens);
  const at::Tensor x = x_in.contiguous();
  const int64_t b = x.size(0), l_rows = x.size(1), d = x.size(2), k = weight.size(1);
  const int64_t width = conv_state.size(1);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor wt = weight.to(acc).t().contiguous();  // (K, D): each tap a contiguous row
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor pos = positions_or_none(cache_seqlens);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_update", [&] {
        using A = acc_t<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        scalar_t* sp = conv_state.mutable_data_ptr<scalar_t>();
        const A* wp = wt.const_data_ptr<A>();
        const A* bp = bias_acc.defined() ? bias_acc.const_data_ptr<A>() : nullptr;
        const int64_t* pp = pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr;
        parallel_items(b, [&](int64_t bi) {
          std::vector<A> acc_row(d);
          const ConvStateView<scalar_t> sv = state_view(sp, bi, width, d, pp);
          const scalar_t* xb = xp + bi * l_rows * d;
          for (int64_t l = 0; l < l_rows; ++l) {
            conv_row(xb, l, sv, wp, bp, k, d, acc_row.data());
            convert_row(yp + (bi * l_rows + l) * d, acc_row.data(), d);
          }
          sv.push(xb, l_rows, d);
        });
      });
  return y;
}

at::Tensor gam_mixer_step(const at::Tensor& h_in, at::Tensor& conv_state,
                          const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                          const at::Tensor& memory, const at::Tensor& gate_logits_in,
                          const std::optional<at::Tensor>& cache_seqlens, double scale) {
  check_mixer_step_args(h_in, conv_state, conv_weight, conv_bias, memory, gate_logits_in,
                        cache_seqlens);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor z = gate_logits_in.contiguous();
  const int64_t b = h.size(0), d = h.size(1), k = conv_weight.size(1), s = memory.size(0);
  const int64_t width = conv_state.size(1);
  at::Tensor f = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (b == 0) return f;
  const auto st = h.scalar_type();
  const auto acc = acc_scalar_type(st);
  const at::Tensor wt = conv_weight.to(acc).t().contiguous();
  const at::Tensor bias_acc =
      conv_bias.has_value() ? conv_bias->to(acc).contiguous() : at::Tensor();
  // Rounded to h's dtype (op_checks.h) and read in it: the loops widen each value exactly to the
  // accumulation type (a widened copy of the bank per token took a third of a bf16 step).
  const at::Tensor mem = memory_in_activation_dtype(memory, h).contiguous();
  const at::Tensor h_acc = h.to(acc).contiguous();
  const at::Tensor pos = positions_or_none(cache_seqlens);
  const int64_t chunk = step_slot_chunk(d);
  const int64_t chunks = (s + chunk - 1) / chunk;
  at::Tensor parts = at::empty({b, chunks, d + 2}, h.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gam_mixer_step", [&] {
    using A = acc_t<scalar_t>;
    const A* hp = h_acc.const_data_ptr<A>();
    const scalar_t* mp = mem.const_data_ptr<scalar_t>();
    A* partp = parts.mutable_data_ptr<A>();
    const A scale_a = static_cast<A>(scale);
    const bool round_p = bf16_products(st);
    // Chunk-major items: the rows of one slot chunk run one after another, so that the chunk is
    // read from memory once per step rather than once per row.
    parallel_items(b * chunks, [&](int64_t item) {
      const int64_t ch = item / b, bi = item % b;
      const int64_t j0 = ch * chunk, w = std::min(chunk, s - j0);
      std::vector<A> scores(w);
      run_best_isa<retrieval_chunk<A, scalar_t>>(hp + bi * d, mp + j0 * d, w, d, scale_a,
                                                 scores.data(),
                                                 partp + (bi * chunks + ch) * (d + 2), round_p);
    });
    const scalar_t* hT = h.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* fp = f.mutable_data_ptr<scalar_t>();
    scalar_t* sp = conv_state.mutable_data_ptr<scalar_t>();
    const A* wp = wt.const_data_ptr<A>();
    const A* bp = bias_acc.defined() ? bias_acc.const_data_ptr<A>() : nullptr;
    const int64_t* pp = pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr;
    parallel_items(b, [&](int64_t bi) {
      std::vector<A> g(d), local(d);
      const ConvStateView<scalar_t> sv = state_view(sp, bi, width, d, pp);
      run_best_isa<mixer_step_row<scalar_t>>(
          hT + bi * d, zp + bi * 2 * d, static_cast<const A*>(partp + bi * chunks * (d + 2)),
          chunks, &sv, wp, bp, k, d, g.data(), local.data(), fp + bi * d);
      sv.push(hT + bi * d, 1, d);
    });
  });
  return f;
}

}  // namespace gam::cpu
