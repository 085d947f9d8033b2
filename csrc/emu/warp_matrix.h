// Warp-level matrix instructions for the emulated build (included by simt.h): ldmatrix,
// mma.sync m16n8k16 / m16n8k8 and cp.async, as the kernels reach them through
// csrc/cuda/warp_mma.cuh.
//
// Emulation model: every lane holds exactly the registers it holds on the GPU, in the per-lane
// fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 / m16n8k8", "ldmatrix"). The
// instructions are warp collectives (gam_emu::warp_exchange): when all 32 lanes have arrived, the
// whole-warp operation is computed from the lanes' registers and each lane gets its own result
// registers back. So a kernel that puts one fragment element in the wrong register, or the wrong
// row address in one lane, gets a wrong product, as on the GPU.
//
//   groupID = lane >> 2, tig (threadID_in_group) = lane % 4;
//   mma m16n8k16, .f16/.bf16, f32 accumulate (row.col):
//     A (16x16): 4 .b32 registers, a0..a7 (two 16-bit elements each, the lower index in the low
//       half): row = groupID for a0,a1,a4,a5, groupID + 8 for a2,a3,a6,a7;
//       col = 2 tig + (i & 1), + 8 for a4..a7;
//     B (16x8): 2 registers, b0..b3: row (k) = 2 tig + (i & 1), + 8 for b2,b3; col = groupID;
//     C, D (16x8 f32): c0..c3: row = groupID for c0,c1, groupID + 8 for c2,c3;
//       col = 2 tig + (i & 1).
//   mma m16n8k8, .f16: A 2 registers (row groupID for a0,a1, groupID + 8 for a2,a3;
//     col = 2 tig + (i & 1)); B 1 register (row 2 tig + (i & 1), col groupID); C, D as above.
//   ldmatrix .m8n8 .b16 .x1/.x2/.x4: lanes 8j..8j+7 give the addresses of rows 0..7 of matrix
//     j (16 bytes each, 16-byte aligned, in shared memory); register j of lane l holds
//     elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix j, or with .trans
//     (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4). Addresses of lanes past 8 * num are
//     ignored.
//   cp.async .cg 16 bytes: see cp_async in simt.h. The copy lands at the cp_async_wait that
//     retires its group; until then the destination holds 0xFF bytes (NaN).
//
// Arithmetic: the products of two f16/bf16 values are exact in fp32; they are summed in fp32 in
// k order, starting from C. (The GPU's order and intermediate rounding may differ by an ulp.)
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

namespace gam_emu {
namespace mat {

inline float decode(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t f = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, sizeof(bits));
  return __half2float(h);
}

inline uint16_t half_of(uint32_t reg, int hi) {
  return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
}

struct LdmatrixRecord {
  const void* addr;
  uint32_t regs[4];
};

template <int N, bool kTrans>
inline void resolve_ldmatrix(void* const* records) {
  auto rec = [&](int lane) { return static_cast<LdmatrixRecord*>(records[lane]); };
  uint16_t m[N][8][8];
  for (int j = 0; j < N; ++j)
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * j + r;
      const void* p = rec(lane)->addr;
      char msg[200];
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::snprintf(msg, sizeof(msg),
                      "ldmatrix.x%d: lane %d gives row address %p, not 16-byte aligned", N, lane,
                      p);
        trap(msg);
      }
      if (!in_shared(p, 16)) {
        std::snprintf(msg, sizeof(msg),
                      "ldmatrix.x%d: lane %d gives row address %p, not in shared memory", N, lane,
                      p);
        trap(msg);
      }
      std::memcpy(m[j][r], p, 16);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < N; ++j) {
      const int a = lane / 4, b = 2 * (lane % 4);
      const uint16_t lo = kTrans ? m[j][b][a] : m[j][a][b];
      const uint16_t hi = kTrans ? m[j][b + 1][a] : m[j][a][b + 1];
      rec(lane)->regs[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

template <int N, bool kTrans>
inline const char* ldmatrix_name() {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix takes .x1, .x2 or .x4");
  if (N == 1) return kTrans ? "ldmatrix.x1.trans" : "ldmatrix.x1";
  if (N == 2) return kTrans ? "ldmatrix.x2.trans" : "ldmatrix.x2";
  return kTrans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
}

// Where a lane's fragment elements sit, the PTX ISA's layouts shared by mma.sync and (per warp of
// a warpgroup, 16 rows further down for each warp) wgmma. Element i of the A fragment (16 x K,
// two per register, the lower k in the low half): row, column. Element i of the B fragment (K x 8,
// the same packing): row k, column n. Element i of the C / D fragment of one 8-column block
// (16 x 8): row, column. (python_tests/test_emulator.py checks them against CUTLASS's CuTe.)
struct FragmentPos {
  int row, col;
};
inline FragmentPos a_fragment_pos(int lane, int i) {
  return {(lane >> 2) + 8 * ((i / 2) % 2), 2 * (lane % 4) + (i & 1) + (i >= 4 ? 8 : 0)};
}
inline FragmentPos b_fragment_pos(int lane, int i) {
  return {2 * (lane % 4) + (i & 1) + (i >= 2 ? 8 : 0), lane >> 2};
}
inline FragmentPos c_fragment_pos(int lane, int i) {
  return {(lane >> 2) + (i < 2 ? 0 : 8), 2 * (lane % 4) + (i & 1)};
}

// K = 16 or 8; A has K / 4 registers, B K / 8.
template <int K>
struct MmaRecord {
  uint32_t a[K / 4];
  uint32_t b[K / 8];
  float c[4];
  float d[4];
};

template <int K, bool kBf16>
inline void resolve_mma(void* const* records) {
  auto rec = [&](int lane) { return static_cast<MmaRecord<K>*>(records[lane]); };
  float a[16][K], b[K][8], d[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaRecord<K>& r = *rec(lane);
    for (int i = 0; i < K / 2; ++i) {  // a_i is half (i & 1) of register i / 2
      const FragmentPos e = a_fragment_pos(lane, i);
      a[e.row][e.col] = decode(half_of(r.a[i / 2], i & 1), kBf16);
    }
    for (int i = 0; i < K / 4; ++i) {
      const FragmentPos e = b_fragment_pos(lane, i);
      b[e.row][e.col] = decode(half_of(r.b[i / 2], i & 1), kBf16);
    }
    for (int i = 0; i < 4; ++i) {
      const FragmentPos e = c_fragment_pos(lane, i);
      d[e.row][e.col] = r.c[i];
    }
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = d[i][j];
      for (int k = 0; k < K; ++k) acc += a[i][k] * b[k][j];
      d[i][j] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const FragmentPos e = c_fragment_pos(lane, i);
      rec(lane)->d[i] = d[e.row][e.col];
    }
  }
}

}  // namespace mat

// ldmatrix.sync.aligned.m8n8.x{N}{.trans}.shared.b16
template <int N, bool kTrans>
inline void ldmatrix(uint32_t (&regs)[N], const void* row_addr, const char* file, int line) {
  mat::LdmatrixRecord rec{row_addr, {0, 0, 0, 0}};
  warp_exchange(&rec, &mat::resolve_ldmatrix<N, kTrans>, mat::ldmatrix_name<N, kTrans>(), file,
                line);
  for (int j = 0; j < N; ++j) regs[j] = rec.regs[j];
}

// mma.sync.aligned.m16n8k{K}.row.col.f32.{f16,bf16}.{f16,bf16}.f32; d may alias c.
template <int K, bool kBf16>
inline void mma(float (&d)[4], const uint32_t (&a)[K / 4], const uint32_t (&b)[K / 8],
                const float (&c)[4], const char* file, int line) {
  static_assert(K == 16 || (K == 8 && !kBf16), "emulated mma: m16n8k16 f16/bf16, m16n8k8 f16");
  mat::MmaRecord<K> rec;
  std::memcpy(rec.a, a, sizeof(rec.a));
  std::memcpy(rec.b, b, sizeof(rec.b));
  std::memcpy(rec.c, c, sizeof(rec.c));
  const char* what =
      K == 16 ? (kBf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16") : "mma.m16n8k8.f16";
  warp_exchange(&rec, &mat::resolve_mma<K, kBf16>, what, file, line);
  std::memcpy(d, rec.d, sizeof(rec.d));
}

}  // namespace gam_emu
