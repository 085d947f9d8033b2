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

// Slots per retrieval work item: about 64k multiply-adds per row, fixed by D (never by the thread
// count or the batch), so the chunk partials and their combination do not depend on the machine's
// threads. Several chunks let a single row (batch 1, the common case) run on every thread.
int64_t step_slot_chunk(int64_t d) {
  return std::min<int64_t>(4096,
                           std::max<int64_t>(16, (65536 / std::max<int64_t>(d, 1)) / 16 * 16));
}

// Slot chunks of a bank of s slots at width d.
int64_t step_slot_chunks(int64_t s, int64_t d) {
  const int64_t chunk = step_slot_chunk(d);
  return (s + chunk - 1) / chunk;
}

// Rows per retrieval work item: the rows of a batch share each slot chunk's two tile products
// (one pass over the chunk for all of them) instead of one matrix-vector pass per row.
constexpr int64_t kStepRows = 64;

// One (row block, slot chunk) item after its score product: the t x w scores in sbuf become
// p = exp(score - shift) in place, shift = the row's max over the chunk, and each row's part tail
// (stride ld) takes [shift, sum of p]. With round_p, p is then rounded to bf16 for the P M
// product, as in the full-sequence kernels when they run bf16 products (bf16_gemm.h); the sum
// is of the unrounded p, as there.
template <typename A>
GAM_INLINE void chunk_probabilities(A* sbuf, int64_t t, int64_t w, bool round_p, A* tails,
                                    int64_t ld) {
  for (int64_t i = 0; i < t; ++i) {
    A* __restrict srow = sbuf + i * w;
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < w; ++j) mx = std::max(mx, srow[j]);
    // A chunk of all -inf scores cannot happen with finite inputs; keep exp() finite anyway.
    const A shift = std::isfinite(mx) ? mx : A(0);
    for (int64_t j = 0; j < w; ++j) srow[j] = fast_exp(srow[j] - shift);
    tails[i * ld] = shift;
    tails[i * ld + 1] = row_sum(srow, w);
    if constexpr (std::is_same_v<A, float>) {
      if (round_p) {
        for (int64_t j = 0; j < w; ++j) srow[j] = static_cast<float>(to_bf16(srow[j]));
      }
    }
  }
}

// The retrieval of the step as chunk partials: for every row and slot chunk, part = [sum_j p_j
// M_j (D) | shift | sum_j p_j] with p_j = exp(scale h.M_j - shift) (parts: (b, chunks, d + 2)).
// Each item runs its two products on tiles through ATen's BLAS, single-threaded inside the
// parallel region (cpu_common.h: the same bits whatever the thread count); a half bank is widened
// chunk by chunk into the item's scratch, once per row block.
template <typename T>
void step_retrieval_parts(const acc_t<T>* h, const T* mem, int64_t b, int64_t s, int64_t d,
                          acc_t<T> scale, bool round_p, acc_t<T>* parts) {
  using A = acc_t<T>;
  constexpr bool kWide = std::is_same_v<T, A>;
  const int64_t chunk = step_slot_chunk(d), chunks = step_slot_chunks(s, d);
  const int64_t rows = std::min(b, kStepRows);
  const int64_t blocks = (b + rows - 1) / rows;
  const int64_t ld = chunks * (d + 2);  // parts: one row's stride
  const int64_t per_thread = rows * chunk + (kWide ? 0 : chunk * d);
  const int64_t slots = thread_slots();
  at::Tensor scratch = at::empty({slots, per_thread}, c10::CppTypeToScalarType<A>::value);
  A* const scratch_p = scratch.mutable_data_ptr<A>();
  // Chunk-major items: the row blocks of one chunk run one after another while it is in cache.
  parallel_items(blocks * chunks, [&](int64_t item) {
    const int64_t ch = item / blocks, blk = item % blocks;
    const int64_t j0 = ch * chunk, w = std::min(chunk, s - j0);
    const int64_t r0 = blk * rows, t = std::min(rows, b - r0);
    A* const sbuf = scratch_p + thread_slot(slots) * per_thread;
    A* mc = sbuf + rows * chunk;
    if constexpr (kWide) {
      mc = const_cast<A*>(mem + j0 * d);
    } else {
      run_best_isa<convert_rows<A, T>>(mc, d, mem + j0 * d, d, w, d);
    }
    A* const part0 = parts + r0 * ld + ch * (d + 2);
    const Mat<A> hm{const_cast<A*>(h + r0 * d), t, d, d}, mm{mc, w, d, d}, sm{sbuf, t, w, w};
    gemm<A>(hm, false, mm, true, sm, scale, A(0));
    run_best_isa<chunk_probabilities<A>>(sbuf, t, w, round_p, part0 + d, ld);
    gemm<A>(sm, false, mm, false, Mat<A>{part0, t, d, ld}, A(1), A(0));
  });
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
  // Rounded to h's dtype (op_checks.h), as the full ops read it; widened chunk by chunk.
  const at::Tensor mem = memory_in_activation_dtype(memory, h).contiguous();
  const at::Tensor h_acc = h.to(acc).contiguous();
  const at::Tensor pos = positions_or_none(cache_seqlens);
  const int64_t chunks = step_slot_chunks(s, d);
  at::Tensor parts = at::empty({b, chunks, d + 2}, h.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gam_mixer_step", [&] {
    using A = acc_t<scalar_t>;
    A* partp = parts.mutable_data_ptr<A>();
    step_retrieval_parts<scalar_t>(h_acc.const_data_ptr<A>(), mem.const_data_ptr<scalar_t>(), b, s,
                                   d, static_cast<A>(scale), bf16_products(st), partp);
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
