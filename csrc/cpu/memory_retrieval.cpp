// Memory retrieval g = softmax(scale * h M^T) M, forward and backward, flash-attention style.
//
// Rows of h (all B*N of them: keys = values = M are shared by every row, there is no mask) are
// processed in tiles against chunks of memory slots. The forward keeps a running max and sum per
// row (online softmax) and saves only lse = logsumexp of each row's scores. The backward recomputes
// p = exp(scale * h M^T - lse) chunk by chunk. Scores and probabilities live only in tile-sized
// scratch: extra memory is bounded by the tile sizes and the thread count, never B*N*S.
// GEMMs run on fp32 (or fp64) tiles through ATen's BLAS, half inputs converted tile by tile; bf16
// inputs on a CPU with bf16 matrix units run their products there instead (bf16_gemm.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <optional>

#include "cpu/bf16_gemm.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_ops.h"
#include "cpu/retrieval_tiles.h"
#include "op_checks.h"

namespace gam::cpu {
namespace {

// Tile sizes: large enough that the single-threaded tile GEMMs run near the core's peak (256-row
// tiles: the fp32 backward went from 19.9 to 17.2 ms with 128-row sub-blocks instead of 64 at B=4
// N=512 D=S=512 on two AVX-512 cores), small enough that the scratch (threads x 256 x 512 floats
// forward, 2 x 2 x 256 x (D + 512) floats backward) stays in the low MB.
constexpr int64_t kFwdRows = 256;  // forward: rows per parallel work item
// The forward on the bf16 micro-kernel takes 128 rows per item: at 256, an item's fp32 scores and
// accumulators, its bf16 p and h and the bank packed both ways come to about 2.5 MB, more than a
// core's 2 MB of L2 on the AVX-512 Xeon, and 128 measured faster there (B=4 N=512 D=S=512, two
// cores: median 1.09-1.12 -> 1.05-1.11 ms, min 1.05 -> 1.00; the same bits). The fused mixer's
// forward keeps 256: with 128 it read the gate weight's panels twice as often and was 4-7% slower.
constexpr int64_t kFwdRowsBf16 = 128;
constexpr int64_t kSlotChunk = 512;    // slots per score tile; larger banks use the online softmax
constexpr int64_t kBwdTileRows = 256;  // backward: rows per tile; dM is accumulated tile by tile
constexpr int64_t kBwdSubRows = 128;   // backward: rows per parallel work item inside a tile
constexpr int64_t kDmSlotRows = 64;    // backward: dM slot rows per parallel work item

// The end of the forward for t rows: out = acc / l (in place when acc is out, else converted in
// the same pass) and lse.
template <typename T>
GAM_INLINE void finish_rows(acc_t<T>* acc, const acc_t<T>* mrow, const acc_t<T>* lrow, T* out,
                            float* lse, int64_t t, int64_t d) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < t; ++i) {
    A* __restrict arow = acc + i * d;
    const A inv = A(1) / lrow[i];
    if constexpr (std::is_same_v<T, A>) {
      for (int64_t c = 0; c < d; ++c) arow[c] *= inv;
    } else {
      T* __restrict orow = out + i * d;
      for (int64_t c = 0; c < d; ++c) orow[c] = cast_to<T>(arow[c] * inv);
    }
    lse[i] = static_cast<float>(mrow[i] + std::log(lrow[i]));
  }
}

// out = softmax(scale * h M^T) M and lse per row. h, out: (rows, d) in T; mem: (s, d) in A. With
// packed (bf16 only), the products run on the bf16 micro-kernel: h straight from the input, the
// probabilities of each chunk rounded to bf16 for P M.
template <typename T>
void retrieval_fwd_kernel(const T* h, const acc_t<T>* mem, const PackedBothWays* packed, T* out,
                          float* lse, int64_t rows, int64_t d, int64_t s, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // read h and accumulate into out in place
  const bool native = packed != nullptr;
  const int64_t block = native ? kFwdRowsBf16 : kFwdRows;
  const int64_t sc = std::min(s, kSlotChunk);
  const int64_t nblocks = (rows + block - 1) / block;
  A* const mem_p = const_cast<A*>(mem);
  // Per-thread scratch, allocated here through ATen (so memory profilers see it): h and out tiles
  // in A (half inputs only), scores, running max and sum, and the bf16 probabilities (native).
  const int64_t hsize = kDirect ? 0 : block * d;
  const int64_t hbuf_size = native ? 0 : hsize;             // the products read bf16 h directly
  const int64_t psize = native ? (block * sc + 1) / 2 : 0;  // bf16 pairs in A units
  const int64_t per_thread = hbuf_size + hsize + block * sc + 2 * block + psize;
  const int64_t slots = thread_slots();
  at::Tensor scratch = at::empty({slots, per_thread}, c10::CppTypeToScalarType<A>::value);
  A* const scratch_p = scratch.mutable_data_ptr<A>();
  parallel_items(nblocks, [&](int64_t blk) {
    const int64_t slot = thread_slot(slots);
    A* const hbuf = scratch_p + slot * per_thread;
    A* const obuf = hbuf + hbuf_size;
    A* const sbuf = obuf + hsize;
    A* const mrow = sbuf + block * sc;
    A* const lrow = mrow + block;
    const int64_t r0 = blk * block, t = std::min(block, rows - r0);
    A* hs = hbuf;
    A* acc = obuf;
    if constexpr (kDirect) {
      hs = const_cast<A*>(h + r0 * d);
      acc = out + r0 * d;
    } else if (!native) {
      for (int64_t i = 0; i < t; ++i) convert_row(hbuf + i * d, h + (r0 + i) * d, d);
    }
    const Mat<A> hm{hs, t, d, d}, am{acc, t, d, d};
    for (int64_t c0 = 0; c0 < s; c0 += sc) {
      const int64_t w = std::min(sc, s - c0);
      if constexpr (std::is_same_v<T, bf16>) {
        if (native) {
          bf16* const pb = reinterpret_cast<bf16*>(lrow + block);
          gemm_bf16(h + r0 * d, d, t, packed->xt, 0, d, sbuf, w, false, c0, c0 + w);
          run_softmax_chunk<A>(sbuf, t, w, c0 == 0, mrow, lrow, acc, d, d, scale, pb);
          gemm_bf16(pb, w, t, packed->x, c0, w, acc, d, c0 != 0, 0, d);
          continue;
        }
      }
      const Mat<A> mc{mem_p + c0 * d, w, d, d}, sm{sbuf, t, w, w};
      gemm<A>(hm, false, mc, true, sm, scale, A(0));
      run_softmax_chunk<A>(sbuf, t, w, c0 == 0, mrow, lrow, acc, d, d, A(1));
      gemm<A>(sm, false, mc, false, am, A(1), c0 == 0 ? A(0) : A(1));
    }
    run_best_isa<finish_rows<T>>(acc, mrow, lrow, out + r0 * d, lse + r0, t, d);
    if (native) release_bf16_gemm();
  });
}

// The stacked operand rows of backward sub-block rows r .. r+t-1: xs = [h rows ; grad_out rows]
// (converted to X; none when xs is null), and delta = rowsum(grad_out * out) per row.
template <typename X, typename T>
GAM_INLINE void stack_rows_and_delta(X* xs, const T* h, const T* grad_out, const T* out,
                                     acc_t<T>* delta, int64_t r, int64_t t, int64_t d) {
  for (int64_t q = 0; q < t; ++q) {
    if (xs != nullptr) {
      convert_row(xs + q * d, h + (r + q) * d, d);
      convert_row(xs + (t + q) * d, grad_out + (r + q) * d, d);
    }
    delta[q] = row_dot<acc_t<T>>(grad_out + (r + q) * d, out + (r + q) * d, d);
  }
}

// dh (rows, d) in T and dm_acc (s, d) in A, from grad_out, the saved out and lse.
//
// Rows go tile by tile (kBwdTileRows); inside a tile, fixed sub-blocks of rows run in parallel:
//   [s ; dp] = [h ; grad_out] M^T    one GEMM on the stacked rows
//   p = exp(scale*s - lse), ds = p * (dp - delta), with delta = rowsum(grad_out * out)
//   dh = scale * ds M                 (accumulated over slot chunks)
// then, in parallel over fixed blocks of slots,
//   dM += [scale*ds ; p]^T [h ; grad_out]   one GEMM over the tile's stacked rows.
// Each dM element is summed tile after tile in a fixed order by one GEMM call per block, so dM has
// the same bits whatever the thread count, and no per-thread copies of dM are needed. With packed
// (bf16 only) the products run on the bf16 micro-kernel, with scale*ds and p rounded to bf16; then
// each sub-block also leaves its part of dM's operands in place for the dM phase, while its rows
// are in its thread's cache: its pairs of [h ; grad_out] rows packed (read straight from the
// inputs, no stacked copy) and its [scale*ds ; p] transposed to bf16. Packed in a pass of their
// own between the phases, the rows did not pack faster on a second thread, and the dM phase read
// fp32 rows that the other core had written: at B=4 N=512 D=S=512 the backward went from 3.5-3.8
// to 3.3-3.5 ms on two cores (the same on one).
template <typename T>
void retrieval_bwd_kernel(const T* grad_out, const T* h, const acc_t<T>* mem,
                          const PackedBothWays* packed, const T* out, const float* lse, T* dh,
                          acc_t<T>* dm_acc, int64_t rows, int64_t d, int64_t s, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // accumulate dh in the output itself
  // fp64 (a checking dtype) takes all slots of a row at once, to renormalise p exactly.
  constexpr bool kExactRows = std::is_same_v<A, double>;
  const bool native = packed != nullptr;
  const int64_t sc = kExactRows ? s : std::min(s, kSlotChunk);
  const int64_t tile = std::min(kBwdTileRows, rows);
  A* const mem_p = const_cast<A*>(mem);
  // Stacked operands of the tile: sub-block i occupies rows [2*i*sub, 2*i*sub + 2*t_i) as
  // [its h rows ; its grad_out rows] in x2 (packed in x2_packed when native), and [scale*ds ; p]
  // in p2 (transposed to bf16 in p2t when native), so the whole tile is contiguous.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  const auto bf16_opts = opts.dtype(at::kBFloat16);
  at::Tensor x2_t = at::empty({native ? 0 : 2 * tile * d}, opts);
  at::Tensor p2_t = at::empty({2 * tile * sc}, opts);
  at::Tensor delta_t = at::empty({tile}, opts), dh_t = at::empty({kDirect ? 0 : tile * d}, opts);
  // Native only: scale*ds in bf16 for dh, and the tile's [scale*ds ; p] transposed (w x 2*tile,
  // row stride 2 * tile whatever the tile's rows: one kernel shape, bf16_gemm.h) for dM.
  at::Tensor dsb_t = at::empty({native ? tile * sc : 0}, bf16_opts);
  at::Tensor p2t_t = at::empty({native ? sc * 2 * tile : 0}, bf16_opts);
  A* const x2 = x2_t.mutable_data_ptr<A>();
  A* const p2 = p2_t.mutable_data_ptr<A>();
  A* const delta = delta_t.mutable_data_ptr<A>();
  A* const dh_buf = dh_t.mutable_data_ptr<A>();
  bf16* const dsb = dsb_t.mutable_data_ptr<bf16>();
  bf16* const p2t = p2t_t.mutable_data_ptr<bf16>();
  PackedB x2_packed;
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t tr = std::min(tile, rows - r0);
    if (native) x2_packed.allocate(2 * tr, d);
    for (int64_t c0 = 0; c0 < s; c0 += sc) {
      const int64_t w = std::min(sc, s - c0);
      const bool first_chunk = c0 == 0, last_chunk = c0 + w >= s;
      parallel_blocks(tr, kBwdSubRows, [&](int64_t i0, int64_t i1) {
        const int64_t t = i1 - i0;
        A* ps = p2 + 2 * i0 * w;
        A* dhs;
        if constexpr (kDirect) {
          dhs = dh + (r0 + i0) * d;
        } else {
          dhs = dh_buf + i0 * d;
        }
        bool done = false;
        if constexpr (std::is_same_v<T, bf16>) {
          if (native) {
            const T* const hr = h + (r0 + i0) * d;
            const T* const gr = grad_out + (r0 + i0) * d;
            if (first_chunk) {
              run_best_isa<stack_rows_and_delta<bf16, T>>(nullptr, h, grad_out, out, delta + i0,
                                                          r0 + i0, t, d);
              // Stacked row 2*i0 + q is h row q, then grad_out row q - t.
              x2_packed.pack_pairs(i0, i0 + t, [&](int64_t row) {
                const int64_t q = row - 2 * i0;
                return q < t ? hr + q * d : gr + (q - t) * d;
              });
            }
            gemm_bf16(hr, d, t, packed->xt, 0, d, ps, w, false, c0, c0 + w);
            gemm_bf16(gr, d, t, packed->xt, 0, d, ps + t * w, w, false, c0, c0 + w);
            run_scores_to_grads<A>(ps, ps + t * w, w, t, w, lse + r0 + i0,
                                   chunk_delta(delta + i0, w, s), scale, dsb + i0 * w);
            gemm_bf16(dsb + i0 * w, w, t, packed->x, c0, w, dhs, d, !first_chunk, 0, d);
            release_bf16_gemm();
            transpose_to_bf16(ps, w, 2 * t, w, p2t + 2 * i0, 2 * tile);
            done = true;
          }
        }
        if (!done) {
          const Mat<A> mc{mem_p + c0 * d, w, d, d};
          A* xs = x2 + 2 * i0 * d;
          if (first_chunk) {
            run_best_isa<stack_rows_and_delta<A, T>>(xs, h, grad_out, out, delta + i0, r0 + i0, t,
                                                     d);
          }
          gemm<A>(Mat<A>{xs, 2 * t, d, d}, false, mc, true, Mat<A>{ps, 2 * t, w, w}, A(1), A(0));
          run_scores_to_grads<A>(ps, ps + t * w, w, t, w, lse + r0 + i0,
                                 chunk_delta(delta + i0, w, s), scale);
          gemm<A>(Mat<A>{ps, t, w, w}, false, mc, false, Mat<A>{dhs, t, d, d}, A(1),
                  first_chunk ? A(0) : A(1));
        }
        if constexpr (!kDirect) {
          if (last_chunk) run_best_isa<convert_rows<T, A>>(dh + (r0 + i0) * d, d, dhs, d, t, d);
        }
      });
      if (native) {
        parallel_blocks(w, kDmSlotRows, [&](int64_t j0, int64_t j1) {
          if constexpr (std::is_same_v<A, float>) {
            gemm_bf16(p2t + j0 * 2 * tile, 2 * tile, j1 - j0, x2_packed, 0, 2 * tr,
                      dm_acc + (c0 + j0) * d, d, r0 != 0, 0, d);
            release_bf16_gemm();
          }
        });
        continue;
      }
      const Mat<A> xm{x2, 2 * tr, d, d};
      parallel_blocks(w, kDmSlotRows, [&](int64_t j0, int64_t j1) {
        gemm<A>(Mat<A>{p2 + j0, 2 * tr, j1 - j0, w}, true, xm, false,
                Mat<A>{dm_acc + (c0 + j0) * d, j1 - j0, d, d}, A(1), r0 == 0 ? A(0) : A(1));
      });
    }
  }
}

// The memory bank packed for the bf16 micro-kernel when h is bf16 and the CPU has one (and
// GAM_EXT_CPU_BF16_GEMM does not say fp32); empty otherwise.
std::optional<PackedBothWays> packed_memory(const at::Tensor& memory, const at::Tensor& h) {
  if (!bf16_products(h.scalar_type())) return std::nullopt;
  return PackedBothWays(memory_in_activation_dtype(memory, h), true, true);
}

// The memory bank in the accumulation type for the fp32 (fp64) tiles: rounded to h's dtype
// (op_checks.h), then widened exactly; undefined when the products run on bf16 units instead.
at::Tensor memory_for_tiles(const at::Tensor& memory, const at::Tensor& h, bool packed) {
  if (packed) return at::Tensor();
  return memory_in_activation_dtype(memory, h).to(acc_scalar_type(h.scalar_type())).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> memory_retrieval_fwd(const at::Tensor& h_in,
                                                        const at::Tensor& memory, double scale) {
  check_memory_args(h_in, memory);
  const at::Tensor h = h_in.contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), s = memory.size(0);
  at::Tensor out = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({b, n}, h.options().dtype(at::kFloat));
  if (b * n == 0) return {out, lse};
  if (d == 0) {
    // No features: every score is 0, p is uniform, out is empty and lse = log(S).
    lse.fill_(std::log(static_cast<double>(s)));
    return {out, lse};
  }
  const std::optional<PackedBothWays> packed = packed_memory(memory, h);
  const at::Tensor mem = memory_for_tiles(memory, h, packed.has_value());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "memory_retrieval_fwd", [&] {
        using A = acc_t<scalar_t>;
        retrieval_fwd_kernel<scalar_t>(
            h.const_data_ptr<scalar_t>(), data_or_null<A>(mem), packed ? &*packed : nullptr,
            out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), b * n, d, s,
            static_cast<A>(scale));
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> memory_retrieval_bwd(const at::Tensor& grad_out_in,
                                                        const at::Tensor& h_in,
                                                        const at::Tensor& memory,
                                                        const at::Tensor& out_in,
                                                        const at::Tensor& lse_in, double scale) {
  check_memory_bwd_args(grad_out_in, h_in, memory, out_in, lse_in);
  const at::Tensor h = h_in.contiguous();
  const auto st = h.scalar_type();
  const auto acc = acc_scalar_type(st);
  const at::Tensor grad_out = grad_out_in.to(st).contiguous();
  const at::Tensor out = out_in.to(st).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), s = memory.size(0);
  const int64_t rows = b * n;
  at::Tensor dh = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (rows == 0 || d == 0) return {dh, at::zeros_like(memory, at::MemoryFormat::Contiguous)};
  const std::optional<PackedBothWays> packed = packed_memory(memory, h);
  const at::Tensor mem = memory_for_tiles(memory, h, packed.has_value());
  // dM is accumulated in the accumulation type; straight into the result when the types agree.
  at::Tensor dm_acc = at::empty({s, d}, memory.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "memory_retrieval_bwd", [&] {
    using A = acc_t<scalar_t>;
    retrieval_bwd_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(),
                                   h.const_data_ptr<scalar_t>(), data_or_null<A>(mem),
                                   packed ? &*packed : nullptr, out.const_data_ptr<scalar_t>(),
                                   lse.const_data_ptr<float>(), dh.mutable_data_ptr<scalar_t>(),
                                   dm_acc.mutable_data_ptr<A>(), rows, d, s, static_cast<A>(scale));
  });
  return {dh, dm_acc.to(memory.scalar_type())};
}

std::string bf16_gemm_path() { return bf16_native_gemm() ? "bf16" : "fp32"; }

std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace gam::cpu
