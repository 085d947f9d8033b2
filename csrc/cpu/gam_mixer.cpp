// The fused GAM mixer on the CPU (docs/design.md, "Mixer"): with z = h Wg^T + bg,
//   out = sigmoid(z[:, :D]) * conv(h) + sigmoid(z[:, D:]) * softmax(scale * h M^T) M
// in one pass over tiles of rows, forward and backward, every intermediate in tile-sized scratch.
//
// Forward, per block of 256 rows (parallel over blocks): z = h Wg^T (one GEMM), the retrieval's
// online softmax over chunks of slots (scores and P M), then an epilogue per row: G = acc / l, the
// causal conv of the row (its K-1 halo rows read from h next to it), the two gates and out. It
// writes out, lse (fp32) and, for the backward, z and G (neither local nor the scores reach
// memory).
//
// Backward, per tile of 256 rows, in two phases:
//   A (parallel over sub-blocks of 128 rows): sigmoid(z), the conv of the row (recomputed),
//     dG = sg df, dL = sl df, dz = [df L sl (1 - sl), df G sg (1 - sg)], delta = rowsum(dG G);
//     dh = conv^T(dL) (its look-ahead rows' dL recomputed from z and df) + dz Wg, then per chunk
//     of slots S = h M^T and dP = dG M^T, p and scale * ds, dh += (scale ds) M;
//   B (parallel over blocks of output rows): dM += (scale ds)^T h + p^T dG and dWg += dz^T h.
// dM and dWg are summed tile after tile by one GEMM per block of rows, dbg, dw_conv and db_conv
// per sub-block then added in sub-block order: every reduction has a fixed order that depends on
// the shape only, so the results are the same on any thread count. Half inputs run in fp32 tiles,
// except bf16 products on a CPU with bf16 matrix units (bf16_gemm.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_ops.h"
#include "cpu/retrieval_tiles.h"
#include "op_checks.h"

namespace gam::cpu {
namespace {

// Row blocks of 256 (forward) and sub-blocks of 128 (backward) keep the GEMMs large enough to
// run near the BLAS rate: at B=4 N=512 D=S=512 fp32 on two AVX-512 cores they took the fused
// forward from 17.5 to 15.4 ms and the backward from 35.4 to 33.0 ms against 64-row blocks, with
// the same scratch at the backward's peak (the forward's is freed before).
constexpr int64_t kFwdRows = 256;      // forward: rows per parallel work item
constexpr int64_t kSlotChunk = 512;    // slots per score tile; larger banks use the online softmax
constexpr int64_t kBwdTileRows = 256;  // backward: rows per tile; dM, dWg accumulated per tile
constexpr int64_t kBwdSubRows = 128;   // backward: rows per phase-A work item inside a tile
constexpr int64_t kOutRows = 64;       // backward: rows of dM / dWg per phase-B work item

// lrow = bias + sum_j w[j] * x[r - (K-1) + j] for the row r at position pos of its sequence
// (taps before the start of the sequence read zeros); wt is (K, D) taps-major.
template <typename T, typename A>
GAM_INLINE void conv_row(const T* x, const A* wt, const A* bias, int64_t r, int64_t pos, int64_t d,
                         int64_t k, A* __restrict lrow) {
  for (int64_t c = 0; c < d; ++c) lrow[c] = bias[c];
  for (int64_t j = std::max<int64_t>(0, k - 1 - pos); j < k; ++j) {
    const T* __restrict xr = x + (r - (k - 1) + j) * d;
    const A* __restrict w = wt + j * d;
    for (int64_t c = 0; c < d; ++c) lrow[c] += w[c] * static_cast<A>(xr[c]);
  }
}

// x rounded to the activation dtype T (a no-op for fp32 / fp64): the fused op rounds z, conv(h)
// and G where the three-op path stores them, so both paths (and the one-token step, which rounds
// the same way) compute the same thing.
template <typename T, typename A>
GAM_INLINE A rounded(A x) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    return static_cast<A>(cast_to<T>(x));
  }
}

// z + bias (2D values) and G = acc / l (D values), rounded to T into z_out and g_out (the saved z
// and G, which the gates then read); in place for fp32 / fp64, where they are the same memory.
template <typename T, typename A>
GAM_INLINE void finish_z_and_g(A* __restrict z, const A* __restrict bias, A* __restrict g, A inv,
                               T* __restrict z_out, T* __restrict g_out, int64_t d) {
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t c = 0; c < 2 * d; ++c) z[c] += bias[c];
    for (int64_t c = 0; c < d; ++c) g[c] *= inv;
  } else {
    for (int64_t c = 0; c < 2 * d; ++c) z_out[c] = cast_to<T>(z[c] + bias[c]);
    for (int64_t c = 0; c < d; ++c) g_out[c] = cast_to<T>(g[c] * inv);
  }
}

// out = sigmoid(zl) * l + sigmoid(zg) * g over one row, from the rounded z and G as saved (in T)
// and l rounded to T first. A loop of its own with restrict parameters: with the writes of z and
// G in the same loop the compiler could not prove the streams disjoint and left it scalar.
template <typename T, typename A>
GAM_INLINE void gate_row(const T* __restrict zl, const T* __restrict zg, const A* __restrict l,
                         const T* __restrict g, T* __restrict o, int64_t d) {
  for (int64_t c = 0; c < d; ++c) {
    const A sl = sigmoid(static_cast<A>(zl[c])), sg = sigmoid(static_cast<A>(zg[c]));
    o[c] = cast_to<T>(sl * rounded<T>(l[c]) + sg * static_cast<A>(g[c]));
  }
}

// Forward epilogue of rows r0 .. r0+t-1: zt (t x 2D) holds h Wg^T, acc (t x D) the unnormalised
// P M, lsum the softmax sums. Adds the gate bias to z, normalises G, runs the conv and the gates;
// writes out, and z and G (converted, unless they already are the outputs: fp32 / fp64).
template <typename T>
GAM_INLINE void mixer_fwd_rows(const T* h, const acc_t<T>* wt, const acc_t<T>* conv_bias,
                               const acc_t<T>* gate_bias, acc_t<T>* zt, acc_t<T>* acc,
                               const acc_t<T>* lsum, acc_t<T>* lconv, T* out, T* z_out, T* g_out,
                               int64_t r0, int64_t t, int64_t n, int64_t d, int64_t k) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t r = r0 + i;
    conv_row(h, wt, conv_bias, r, r % n, d, k, lconv);
    A* const z = zt + i * 2 * d;
    A* const g = acc + i * d;
    T* const zr = z_out + r * 2 * d;
    finish_z_and_g<T>(z, gate_bias, g, A(1) / lsum[i], zr, g_out + r * d, d);
    gate_row<T>(zr, zr + d, lconv, g_out + r * d, out + r * d, d);
  }
}

// With mem_packed and wg_packed (bf16 only), the products run on the bf16 micro-kernel
// (bf16_gemm.h): h straight from the input, the probabilities of each chunk rounded to bf16.
template <typename T>
void mixer_fwd_kernel(const T* h, const acc_t<T>* mem, const acc_t<T>* wg,
                      const PackedBothWays* mem_packed, const PackedBothWays* wg_packed,
                      const acc_t<T>* wt, const acc_t<T>* conv_bias, const acc_t<T>* gate_bias,
                      T* out, float* lse, T* z_out, T* g_out, int64_t rows, int64_t n, int64_t d,
                      int64_t s, int64_t k, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // h read, z and G accumulated in place
  const bool native = mem_packed != nullptr;
  const int64_t sc = std::min(s, kSlotChunk);
  const int64_t nblocks = (rows + kFwdRows - 1) / kFwdRows;
  A* const mem_p = const_cast<A*>(mem);
  A* const wg_p = const_cast<A*>(wg);
  // Per-thread scratch through ATen: h, P M and z tiles (half inputs only), scores, running max
  // and sum, one conv row, and the bf16 probabilities (native).
  const int64_t hsize = kDirect ? 0 : kFwdRows * d;
  const int64_t hbuf_size = native ? 0 : hsize;                // the products read bf16 h directly
  const int64_t psize = native ? (kFwdRows * sc + 1) / 2 : 0;  // bf16 pairs in A units
  const int64_t per_thread = hbuf_size + 3 * hsize + kFwdRows * sc + 2 * kFwdRows + d + psize;
  const int64_t slots = thread_slots();
  at::Tensor scratch = at::empty({slots, per_thread}, c10::CppTypeToScalarType<A>::value);
  A* const scratch_p = scratch.mutable_data_ptr<A>();
  parallel_items(nblocks, [&](int64_t blk) {
    const int64_t slot = thread_slot(slots);
    A* const hbuf = scratch_p + slot * per_thread;
    A* const abuf = hbuf + hbuf_size;
    A* const zbuf = abuf + hsize;  // 2 * hsize
    A* const sbuf = zbuf + 2 * hsize;
    A* const mrow = sbuf + kFwdRows * sc;
    A* const lrow = mrow + kFwdRows;
    A* const lconv = lrow + kFwdRows;
    const int64_t r0 = blk * kFwdRows, t = std::min(kFwdRows, rows - r0);
    A* hs;
    A* acc;
    A* zt;
    if constexpr (kDirect) {
      hs = const_cast<A*>(h + r0 * d);
      acc = g_out + r0 * d;
      zt = z_out + r0 * 2 * d;
    } else {
      if (!native) {
        for (int64_t i = 0; i < t; ++i) convert_row(hbuf + i * d, h + (r0 + i) * d, d);
      }
      hs = hbuf;
      acc = abuf;
      zt = zbuf;
    }
    bool done = false;
    if constexpr (std::is_same_v<T, bf16>) {
      if (native) {
        bf16* const pb = reinterpret_cast<bf16*>(lconv + d);
        const bf16* hb = h + r0 * d;
        gemm_bf16(hb, d, t, wg_packed->xt, 0, d, zt, 2 * d, false, 0, 2 * d);
        for (int64_t c0 = 0; c0 < s; c0 += sc) {
          const int64_t w = std::min(sc, s - c0);
          gemm_bf16(hb, d, t, mem_packed->xt, 0, d, sbuf, w, false, c0, c0 + w);
          run_softmax_chunk<A>(sbuf, t, w, c0 == 0, mrow, lrow, acc, d, d, scale, pb);
          gemm_bf16(pb, w, t, mem_packed->x, c0, w, acc, d, c0 != 0, 0, d);
        }
        release_bf16_gemm();
        done = true;
      }
    }
    if (!done) {
      const Mat<A> hm{hs, t, d, d}, am{acc, t, d, d};
      gemm<A>(hm, false, Mat<A>{wg_p, 2 * d, d, d}, true, Mat<A>{zt, t, 2 * d, 2 * d}, A(1), A(0));
      for (int64_t c0 = 0; c0 < s; c0 += sc) {
        const int64_t w = std::min(sc, s - c0);
        const Mat<A> mc{mem_p + c0 * d, w, d, d}, sm{sbuf, t, w, w};
        gemm<A>(hm, false, mc, true, sm, scale, A(0));
        run_softmax_chunk<A>(sbuf, t, w, c0 == 0, mrow, lrow, acc, d, d, A(1));
        gemm<A>(sm, false, mc, false, am, A(1), c0 == 0 ? A(0) : A(1));
      }
    }
    run_best_isa<mixer_fwd_rows<T>>(h, wt, conv_bias, gate_bias, zt, acc, lrow, lconv, out, z_out,
                                    g_out, r0, t, n, d, k);
    for (int64_t i = 0; i < t; ++i) lse[r0 + i] = static_cast<float>(mrow[i] + std::log(lrow[i]));
  });
}

// The gate fusion's backward of one row: dG = sg df, dL = sl df (l rounded to T first, as the
// forward used it), dz = [df l sl (1 - sl), df g sg (1 - sg)]. A loop of its own with restrict
// parameters (the compiler keeps it vectorised; with the reductions in it, it did not).
template <typename T, typename A>
GAM_INLINE void gate_grads_row(const T* __restrict df, const T* __restrict zl,
                               const T* __restrict zg, const T* __restrict g, const A* __restrict l,
                               A* __restrict dg, A* __restrict dl, A* __restrict dzl,
                               A* __restrict dzg, int64_t d) {
  for (int64_t c = 0; c < d; ++c) {
    const A f = static_cast<A>(df[c]);
    const A sl = sigmoid(static_cast<A>(zl[c])), sg = sigmoid(static_cast<A>(zg[c]));
    dg[c] = sg * f;
    dl[c] = sl * f;
    dzl[c] = f * rounded<T>(l[c]) * sl * (A(1) - sl);
    dzg[c] = f * static_cast<A>(g[c]) * sg * (A(1) - sg);
  }
}

template <typename A>
GAM_INLINE void add_row(A* __restrict acc, const A* __restrict x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += x[c];
}

template <typename A, typename T>
GAM_INLINE void add_product_row(A* __restrict acc, const A* __restrict x, const T* __restrict y,
                                int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += x[c] * static_cast<A>(y[c]);
}

// Phase-A prologue of the backward for rows r0+i0 .. r0+i1-1 of tile r0 (q = tile-local row):
// converts h (half inputs on fp32 tiles; hs is null on bf16 products), recomputes the gates and
// the conv, and writes dG (gs), dz (dzs), delta, the conv's dL of the rows and of the K-1 rows
// after them (dl, (i1-i0+K-1) x D), and this sub-block's partial sums of dbg, db_conv and dw_conv
// (part: [dbg (2D) | dw (K x D) | db (D)]). On bf16 products (gb and dzb given) dG and dz are only
// the products' bf16 operands: gs and dzs are then one row each, rounded into gb and dzb while
// the row is in cache (a pass over fp32 tiles of its own was 3% of a one-thread bf16 mixer).
template <typename T>
GAM_INLINE void mixer_bwd_prologue(const T* df, const T* h, const T* z, const T* g,
                                   const acc_t<T>* wt, const acc_t<T>* conv_bias, acc_t<T>* hs,
                                   acc_t<T>* gs, acc_t<T>* dzs, acc_t<T>* delta, acc_t<T>* dl,
                                   acc_t<T>* lconv, acc_t<T>* part, bf16* gb, bf16* dzb, int64_t r0,
                                   int64_t i0, int64_t i1, int64_t rows, int64_t n, int64_t d,
                                   int64_t k) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;
  const bool rows_only = gb != nullptr;
  A* const dbg = part;
  A* const dw = part + 2 * d;
  A* const db = dw + k * d;
  std::fill(part, part + (k + 3) * d, A(0));
  for (int64_t q = i0; q < i1; ++q) {
    const int64_t r = r0 + q, pos = r % n;
    if constexpr (!kDirect) {
      if (hs != nullptr) convert_row(hs + q * d, h + r * d, d);
    }
    conv_row(h, wt, conv_bias, r, pos, d, k, lconv);
    const T* zr = z + r * 2 * d;
    A* const gsr = rows_only ? gs : gs + q * d;
    A* const dzr = rows_only ? dzs : dzs + q * 2 * d;
    A* const dlr = dl + (q - i0) * d;
    gate_grads_row<T>(df + r * d, zr, zr + d, g + r * d, lconv, gsr, dlr, dzr, dzr + d, d);
    add_row(dbg, dzr, 2 * d);
    add_row(db, dlr, d);
    delta[q] = row_dot<A>(gsr, g + r * d, d);
    if constexpr (std::is_same_v<A, float>) {
      if (rows_only) {
        convert_row(gb + q * d, gsr, d);
        convert_row(dzb + q * 2 * d, dzr, 2 * d);
      }
    }
    // dw[j] += dL * x[r - (K-1) + j].
    for (int64_t j = std::max<int64_t>(0, k - 1 - pos); j < k; ++j) {
      add_product_row(dw + j * d, dlr, h + (r - (k - 1) + j) * d, d);
    }
  }
  // dL of the K-1 rows after the sub-block (the conv's dx of its rows reads them).
  for (int64_t q = i1; q < std::min(i1 + k - 1, rows - r0); ++q) {
    const int64_t r = r0 + q;
    const T* __restrict dfr = df + r * d;
    const T* __restrict zl = z + r * 2 * d;
    A* __restrict dlr = dl + (q - i0) * d;
    for (int64_t c = 0; c < d; ++c)
      dlr[c] = sigmoid(static_cast<A>(zl[c])) * static_cast<A>(dfr[c]);
  }
}

// dx of the conv for rows r0+i0 .. r0+i1-1 into dhs (row q at dhs + q * d): dx[t] = sum_j w[j] *
// dL[t + (K-1) - j], terms past the end of the sequence zero; dl as the prologue left it.
template <typename A>
GAM_INLINE void conv_dx_rows(const A* wt, const A* dl, A* dhs, int64_t r0, int64_t i0, int64_t i1,
                             int64_t n, int64_t d, int64_t k) {
  for (int64_t q = i0; q < i1; ++q) {
    const int64_t pos = (r0 + q) % n;
    A* __restrict o = dhs + q * d;
    std::fill(o, o + d, A(0));
    for (int64_t j = std::max<int64_t>(0, pos + k - n); j < k; ++j) {
      const A* __restrict src = dl + (q - i0 + (k - 1) - j) * d;
      const A* __restrict w = wt + j * d;
      for (int64_t c = 0; c < d; ++c) o[c] += w[c] * src[c];
    }
  }
}

// With mem_packed and wg_packed (bf16 only), the products run on the bf16 micro-kernel: dz, dG,
// scale * ds and p rounded to bf16 as their operands.
template <typename T>
void mixer_bwd_kernel(const T* df, const T* h, const acc_t<T>* mem, const acc_t<T>* wg,
                      const PackedBothWays* mem_packed, const PackedBothWays* wg_packed,
                      const acc_t<T>* wt, const acc_t<T>* conv_bias, const float* lse, const T* z,
                      const T* g, T* dh, acc_t<T>* dm, acc_t<T>* dwg, acc_t<T>* dbg, acc_t<T>* dwt,
                      acc_t<T>* dcb, int64_t rows, int64_t n, int64_t d, int64_t s, int64_t k,
                      acc_t<T> scale) {
  using A = acc_t<T>;
  const bool native = mem_packed != nullptr;
  constexpr bool kDirect = std::is_same_v<T, A>;  // h read and dh accumulated in place
  // fp64 (a checking dtype) takes all slots of a row at once, to renormalise p exactly.
  constexpr bool kExactRows = std::is_same_v<A, double>;
  const int64_t sc = kExactRows ? s : std::min(s, kSlotChunk);
  const int64_t tile = std::min(kBwdTileRows, rows);
  const int64_t nsub = (tile + kBwdSubRows - 1) / kBwdSubRows;
  const int64_t dl_rows = kBwdSubRows + k - 1;
  const int64_t part_size = (k + 3) * d;
  A* const mem_p = const_cast<A*>(mem);
  A* const wg_p = const_cast<A*>(wg);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t hsize = kDirect ? 0 : tile * d;
  const int64_t hs_size = native ? 0 : hsize;  // the products read bf16 h directly
  // dG and dz in A: tiles (tile x D, tile x 2D), or on bf16 products one row of each per
  // sub-block (the tiles are then bf16 only).
  const int64_t grad_tiles = native ? 0 : 3 * tile * d;
  const int64_t grad_rows = native ? 3 * d : 0;
  const int64_t sub_size = dl_rows * d + d + part_size + grad_rows;
  at::Tensor scratch =
      at::empty({hs_size + hsize + grad_tiles + 2 * tile * sc + tile + nsub * sub_size}, opts);
  A* const hs_buf = scratch.mutable_data_ptr<A>();
  A* const dh_buf = hs_buf + hs_size;
  A* const gs = dh_buf + hsize;                 // dG: tile x D (not on bf16 products)
  A* const dzs = gs + (native ? 0 : tile * d);  // dz: tile x 2D (not on bf16 products)
  A* const sbuf = dh_buf + hsize + grad_tiles;  // scores, then scale * ds: tile x w
  A* const pbuf = sbuf + tile * sc;             // dP, then p: tile x w
  A* const delta = pbuf + tile * sc;
  // Per sub-block: dL (dl_rows x D), a conv row, partials, and on bf16 products a dG and a dz row.
  A* const sub_scratch = delta + tile;
  // Native only, in bf16: dz (tile x 2D), dG (tile x D) and scale * ds (tile x w) as operands, a
  // transposed block of rows per thread for dM and dWg, and the tile's h and dG packed.
  const int64_t slots = thread_slots();
  at::Tensor bf16_scratch = at::empty(
      {native ? 3 * tile * d + tile * sc + slots * kOutRows * tile : 0}, opts.dtype(at::kBFloat16));
  bf16* const dzb = bf16_scratch.mutable_data_ptr<bf16>();
  bf16* const gb = dzb + (native ? 2 * tile * d : 0);
  bf16* const dsb = gb + (native ? tile * d : 0);
  bf16* const ptb = dsb + (native ? tile * sc : 0);
  PackedB h_packed, g_packed;
  std::fill(dbg, dbg + 2 * d, A(0));
  std::fill(dwt, dwt + k * d, A(0));
  std::fill(dcb, dcb + d, A(0));
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t tr = std::min(tile, rows - r0);
    A* hs = native ? nullptr : hs_buf;  // h in A (half inputs on fp32 tiles only)
    A* dhs = dh_buf;
    if constexpr (kDirect) {
      hs = const_cast<A*>(h + r0 * d);
      dhs = dh + r0 * d;
    }
    for (int64_t c0 = 0; c0 < s; c0 += sc) {
      const int64_t w = std::min(sc, s - c0);
      const bool first_chunk = c0 == 0, last_chunk = c0 + w >= s;
      parallel_blocks(tr, kBwdSubRows, [&](int64_t i0, int64_t i1) {
        const int64_t t = i1 - i0;
        if (first_chunk) {
          A* const sub = sub_scratch + (i0 / kBwdSubRows) * sub_size;
          A* const dl = sub;
          A* const lconv = dl + dl_rows * d;
          A* const part = lconv + d;
          A* const grad_row = part + part_size;  // bf16 products: the dG row, then the dz row
          run_best_isa<mixer_bwd_prologue<T>>(df, h, z, g, wt, conv_bias, hs,
                                              native ? grad_row : gs, native ? grad_row + d : dzs,
                                              delta, dl, lconv, part, native ? gb : nullptr,
                                              native ? dzb : nullptr, r0, i0, i1, rows, n, d, k);
          run_best_isa<conv_dx_rows<A>>(wt, dl, dhs, r0, i0, i1, n, d, k);
          // dh += dz Wg (the gate linear's input gradient).
          if (native) {
            if constexpr (std::is_same_v<A, float>) {
              gemm_bf16(dzb + i0 * 2 * d, 2 * d, t, wg_packed->x, 0, 2 * d, dhs + i0 * d, d, true,
                        0, d);
            }
          } else {
            gemm<A>(Mat<A>{dzs + i0 * 2 * d, t, 2 * d, 2 * d}, false, Mat<A>{wg_p, 2 * d, d, d},
                    false, Mat<A>{dhs + i0 * d, t, d, d}, A(1), A(1));
          }
        }
        A* const srows = sbuf + i0 * w;
        A* const prows = pbuf + i0 * w;
        bool done = false;
        if constexpr (std::is_same_v<T, bf16>) {
          if (native) {
            gemm_bf16(h + (r0 + i0) * d, d, t, mem_packed->xt, 0, d, srows, w, false, c0, c0 + w);
            gemm_bf16(gb + i0 * d, d, t, mem_packed->xt, 0, d, prows, w, false, c0, c0 + w);
            run_scores_to_grads<A>(srows, prows, w, t, w, lse + r0 + i0,
                                   chunk_delta(delta + i0, w, s), scale, dsb + i0 * w);
            gemm_bf16(dsb + i0 * w, w, t, mem_packed->x, c0, w, dhs + i0 * d, d, true, 0, d);
            release_bf16_gemm();
            done = true;
          }
        }
        if (!done) {
          const Mat<A> mc{mem_p + c0 * d, w, d, d};
          gemm<A>(Mat<A>{hs + i0 * d, t, d, d}, false, mc, true, Mat<A>{srows, t, w, w}, A(1),
                  A(0));
          gemm<A>(Mat<A>{gs + i0 * d, t, d, d}, false, mc, true, Mat<A>{prows, t, w, w}, A(1),
                  A(0));
          run_scores_to_grads<A>(srows, prows, w, t, w, lse + r0 + i0,
                                 chunk_delta(delta + i0, w, s), scale);
          gemm<A>(Mat<A>{srows, t, w, w}, false, mc, false, Mat<A>{dhs + i0 * d, t, d, d}, A(1),
                  A(1));
        }
        if constexpr (!kDirect) {
          if (last_chunk) {
            run_best_isa<convert_rows<T, A>>(dh + (r0 + i0) * d, d, dhs + i0 * d, d, t, d);
          }
        }
      });
      if (first_chunk) {
        // This tile's partial sums of dbg, dw_conv and db_conv, in sub-block order.
        for (int64_t sb = 0; sb * kBwdSubRows < tr; ++sb) {
          const A* part = sub_scratch + sb * sub_size + dl_rows * d + d;
          for (int64_t c = 0; c < 2 * d; ++c) dbg[c] += part[c];
          for (int64_t c = 0; c < k * d; ++c) dwt[c] += part[2 * d + c];
          for (int64_t c = 0; c < d; ++c) dcb[c] += part[(k + 2) * d + c];
        }
      }
      // dM[c0 .. c0 + w) += (scale ds)^T h + p^T dG, and (first chunk) dWg += dz^T h, in
      // parallel over fixed blocks of output rows; each block summed tile after tile.
      const int64_t slot_blocks = (w + kOutRows - 1) / kOutRows;
      const int64_t gate_blocks = first_chunk ? (2 * d + kOutRows - 1) / kOutRows : 0;
      const A beta = r0 == 0 ? A(0) : A(1);
      if (native) {
        if constexpr (std::is_same_v<T, bf16>) {
          if (first_chunk) {
            h_packed.pack(h + r0 * d, tr, d, d, false);
            g_packed.pack(gb, tr, d, d, false);
          }
          parallel_items(slot_blocks + gate_blocks, [&](int64_t item) {
            const int64_t slot = thread_slot(slots);
            bf16* const ptile = ptb + slot * kOutRows * tile;
            if (item < slot_blocks) {
              const int64_t j0 = item * kOutRows, jb = std::min(w, j0 + kOutRows) - j0;
              float* const out = dm + (c0 + j0) * d;
              // Row stride tile whatever the tile's rows: one kernel shape (bf16_gemm.h).
              transpose_to_bf16(sbuf + j0, w, tr, jb, ptile, tile);
              gemm_bf16(ptile, tile, jb, h_packed, 0, tr, out, d, r0 != 0, 0, d);
              transpose_to_bf16(pbuf + j0, w, tr, jb, ptile, tile);
              gemm_bf16(ptile, tile, jb, g_packed, 0, tr, out, d, true, 0, d);
            } else {
              const int64_t q0 = (item - slot_blocks) * kOutRows;
              const int64_t qb = std::min(2 * d, q0 + kOutRows) - q0;
              transpose_to_bf16(dzb + q0, 2 * d, tr, qb, ptile, tile);
              gemm_bf16(ptile, tile, qb, h_packed, 0, tr, dwg + q0 * d, d, r0 != 0, 0, d);
            }
            release_bf16_gemm();
          });
        }
        continue;
      }
      const Mat<A> hm{hs, tr, d, d}, gm{gs, tr, d, d};
      parallel_items(slot_blocks + gate_blocks, [&](int64_t item) {
        if (item < slot_blocks) {
          const int64_t j0 = item * kOutRows, j1 = std::min(w, j0 + kOutRows);
          const Mat<A> out{dm + (c0 + j0) * d, j1 - j0, d, d};
          gemm<A>(Mat<A>{sbuf + j0, tr, j1 - j0, w}, true, hm, false, out, A(1), beta);
          gemm<A>(Mat<A>{pbuf + j0, tr, j1 - j0, w}, true, gm, false, out, A(1), A(1));
        } else {
          const int64_t q0 = (item - slot_blocks) * kOutRows, q1 = std::min(2 * d, q0 + kOutRows);
          gemm<A>(Mat<A>{dzs + q0, tr, q1 - q0, 2 * d}, true, hm, false,
                  Mat<A>{dwg + q0 * d, q1 - q0, d, d}, A(1), beta);
        }
      });
    }
  }
}

// A parameter rounded to the activation dtype (the one rule of op_checks.h for the memory bank,
// here for the gate linear too), then widened exactly to the accumulation type.
at::Tensor rounded_param(const at::Tensor& p, const at::Tensor& h, at::ScalarType acc) {
  return p.to(h.scalar_type()).to(acc).contiguous();
}

// The operands of the products, on one of two paths. bf16 products (h bf16 and the CPU has a bf16
// micro-kernel, unless GAM_EXT_CPU_BF16_GEMM says fp32): the memory bank packed both ways and the
// gate weight packed as the direction reads it (Wg^T forward, Wg backward). Otherwise: both in
// the accumulation type, rounded to h's dtype first (the one rule of op_checks.h for the bank,
// here for the gate weight too).
class MixerOperands {
 public:
  MixerOperands(const at::Tensor& memory, const at::Tensor& gate_weight, const at::Tensor& h,
                bool backward) {
    if (bf16_products(h.scalar_type())) {
      mem_packed_.emplace(memory_in_activation_dtype(memory, h), true, true);
      wg_packed_.emplace(gate_weight.to(at::kBFloat16), backward, !backward);
    } else {
      const auto acc = acc_scalar_type(h.scalar_type());
      mem_ = memory_in_activation_dtype(memory, h).to(acc).contiguous();
      wg_ = rounded_param(gate_weight, h, acc);
    }
  }
  template <typename A>
  const A* mem() const {
    return data_or_null<A>(mem_);
  }
  template <typename A>
  const A* wg() const {
    return data_or_null<A>(wg_);
  }
  const PackedBothWays* mem_packed() const { return mem_packed_ ? &*mem_packed_ : nullptr; }
  const PackedBothWays* wg_packed() const { return wg_packed_ ? &*wg_packed_ : nullptr; }

 private:
  at::Tensor mem_, wg_;
  std::optional<PackedBothWays> mem_packed_, wg_packed_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_mixer_fwd(
    const at::Tensor& h_in, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& memory,
    const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias, double scale) {
  check_mixer_args(h_in, conv_weight, conv_bias, memory, gate_weight, gate_bias);
  const at::Tensor h = h_in.contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), s = memory.size(0),
                k = conv_weight.size(1);
  const auto acc = acc_scalar_type(h.scalar_type());
  at::Tensor out = at::empty_like(h, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({b, n}, h.options().dtype(at::kFloat));
  at::Tensor z = at::empty({b, n, 2 * d}, h.options());
  at::Tensor g = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (b * n == 0) return {out, lse, z, g};
  if (d == 0) {
    lse.fill_(std::log(static_cast<double>(s)));
    return {out, lse, z, g};
  }
  const MixerOperands operands(memory, gate_weight, h, false);
  const at::Tensor gb = gate_bias.has_value() ? rounded_param(*gate_bias, h, acc)
                                              : at::zeros({2 * d}, h.options().dtype(acc));
  const at::Tensor wt = conv_weight.to(acc).t().contiguous();  // (K, D) taps-major
  const at::Tensor cb = conv_bias.has_value() ? conv_bias->to(acc).contiguous()
                                              : at::zeros({d}, h.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gam_mixer_fwd", [&] {
    using A = acc_t<scalar_t>;
    mixer_fwd_kernel<scalar_t>(h.const_data_ptr<scalar_t>(), operands.mem<A>(), operands.wg<A>(),
                               operands.mem_packed(), operands.wg_packed(), wt.const_data_ptr<A>(),
                               cb.const_data_ptr<A>(), gb.const_data_ptr<A>(),
                               out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(),
                               z.mutable_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(),
                               b * n, n, d, s, k, static_cast<A>(scale));
  });
  return {out, lse, z, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_mixer_bwd(
    const at::Tensor& grad_out, const at::Tensor& h_in, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& memory,
    const at::Tensor& gate_weight, const at::Tensor& lse_in, const at::Tensor& z_in,
    const at::Tensor& g_in, double scale) {
  check_mixer_bwd_args(grad_out, h_in, conv_weight, conv_bias, memory, gate_weight, lse_in, z_in,
                       g_in);
  const at::Tensor h = h_in.contiguous();
  const auto st = h.scalar_type();
  const auto acc = acc_scalar_type(st);
  const at::Tensor df = grad_out.to(st).contiguous();
  const at::Tensor z = z_in.to(st).contiguous();
  const at::Tensor g = g_in.to(st).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t b = h.size(0), n = h.size(1), d = h.size(2), s = memory.size(0),
                k = conv_weight.size(1);
  const int64_t rows = b * n;
  at::Tensor dh = at::empty_like(h, at::MemoryFormat::Contiguous);
  const auto pacc = h.options().dtype(acc);
  at::Tensor dm = at::zeros({s, d}, pacc), dwg = at::zeros({2 * d, d}, pacc);
  at::Tensor dbg = at::zeros({2 * d}, pacc), dwt = at::zeros({k, d}, pacc);
  at::Tensor dcb = at::zeros({d}, pacc);
  if (rows > 0 && d > 0) {
    const MixerOperands operands(memory, gate_weight, h, true);
    const at::Tensor wt = conv_weight.to(acc).t().contiguous();
    const at::Tensor cb =
        conv_bias.has_value() ? conv_bias->to(acc).contiguous() : at::zeros({d}, pacc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gam_mixer_bwd", [&] {
      using A = acc_t<scalar_t>;
      mixer_bwd_kernel<scalar_t>(
          df.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), operands.mem<A>(),
          operands.wg<A>(), operands.mem_packed(), operands.wg_packed(), wt.const_data_ptr<A>(),
          cb.const_data_ptr<A>(), lse.const_data_ptr<float>(), z.const_data_ptr<scalar_t>(),
          g.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), dm.mutable_data_ptr<A>(),
          dwg.mutable_data_ptr<A>(), dbg.mutable_data_ptr<A>(), dwt.mutable_data_ptr<A>(),
          dcb.mutable_data_ptr<A>(), rows, n, d, s, k, static_cast<A>(scale));
    });
  } else if (rows == 0) {
    dh.zero_();
  }
  const auto wdt = conv_weight.scalar_type();
  return {dh,
          dwt.t().to(wdt).contiguous(),
          dcb.to(wdt),
          dm.to(memory.scalar_type()),
          dwg.to(gate_weight.scalar_type()),
          dbg.to(gate_weight.scalar_type())};
}

}  // namespace gam::cpu
