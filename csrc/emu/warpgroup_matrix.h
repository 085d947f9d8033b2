// Warpgroup-level matrix instructions for the emulated build (included by simt.h): wgmma
// (sm_90a's wgmma.mma_async m64nNk16, f16 / bf16 in, f32 accumulate) with its fence, commit
// and wait, as the kernels reach them through csrc/cuda/warpgroup_mma.cuh.
//
// Emulation model. A warpgroup is the 128 threads of warps 4g .. 4g + 3. wgmma.mma_async,
// commit_group and wait_group are warpgroup collectives (gam_emu::warpgroup_exchange): all 128
// threads must reach the same one. mma_async only queues the product, as the GPU does: it fills
// the accumulator registers with NaN at once (their old values kept as the product's C) and
// computes nothing; the product runs when a wait_group retires its group, reading shared
// memory and the A registers then. So a kernel that reads the accumulators before the wait, or
// overwrites an operand in shared memory or the A registers before the wait, gets NaN or wrong
// values, as it would on the GPU (there, undefined results).
//
// Operands, in the PTX ISA's layouts (16-bit elements; T = 8 elements = 16 bytes):
//   D (64 x N f32), d[N / 2] per thread: thread t of the warpgroup, warp w = t / 32, lane l,
//     g = l / 4, q = l % 4: d[4 j + 2 h + c] = D[16 w + g + 8 h][8 j + 2 q + c].
//   A from registers (64 x 16), a[4] per thread (two elements each, lower k in the low half):
//     a[0] = A[16 w + g][2 q ..], a[1] = A[16 w + g + 8][2 q ..], a[2] = A[16 w + g][2 q + 8 ..],
//     a[3] = A[16 w + g + 8][2 q + 8 ..] (mma.sync's A fragment, warp w taking rows 16 w ..).
//   A (64 x 16) and B (N x 16) from shared memory through a 64-bit matrix descriptor: start
//     address >> 4 in bits 0-13, leading byte offset (LBO) >> 4 in 16-29, stride byte offset
//     (SBO) >> 4 in 32-45, base offset in 49-51 (must be 0 here), swizzle in 62-63 (0 none,
//     1 128-byte, 2 64-byte, 3 32-byte). Element (i, k) of the operand (i its M or N index):
//     K-major (transpose flag 0), swizzle width W bytes: start + (i % 8) W + (i / 8) SBO
//       + (k / 8) 16 + (k % 8) 2; without swizzle: start + (i % 8) 16 + (i / 8) SBO
//       + (k / 8) LBO + (k % 8) 2.
//     MN-major (transpose flag 1), W = 16 w bytes: start + (i % 8) 2 + ((i / 8) % w) 16
//       + (i / (8 w)) LBO + (k % 8) W + (k / 8) SBO; without swizzle: start + (i % 8) 2
//       + (i / 8) SBO + (k % 8) 16 + (k / 8) LBO.
//     The swizzle then permutes 16-byte chunks by address: with W = 128, 64, 32, address bits
//     4-6, 4-5, 4 are XORed with bits 7-9, 7-8, 7 (so tiles must sit at W * 8-byte aligned
//     shared addresses, as on the GPU).
//   Shared addresses are shared_window_address's: offsets into dynamic shared memory.
//
// fence.proxy.async is modelled for cp.async only: a wgmma whose shared-memory operand holds
// bytes a cp.async landed, not fenced by their writer since, faults at issue (the engine tracks
// them per 16-byte chunk); ordinary stores are not tracked. wgmma.fence is checked more strictly
// than the PTX ISA asks: every wgmma must follow a wgmma.fence of its thread issued after that
// thread's last wait_group (or the kernel's start), since the code after a wait usually touches
// the accumulators; register accesses themselves are not tracked. A kernel that exits with
// products still queued loses them silently.
//
// Arithmetic: as mma.sync's emulation, exact products summed in fp32 in k order from C.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <vector>

namespace gam_emu {
namespace wg {

struct Operand {
  uint32_t start, lbo, sbo, swizzle_bytes;  // swizzle_bytes 0 (none), 32, 64 or 128
};

// Register v of thread t's accumulators (64 x N): row, column. Element i of thread t's A
// registers (64 x 16, two per register, the lower k in the low half): row, column. Each warp of
// the warpgroup holds mma.sync's fragments of its 16 rows, the accumulators of the 8-column
// block v / 4.
inline mat::FragmentPos accumulator_pos(int t, int v) {
  const mat::FragmentPos e = mat::c_fragment_pos(t % 32, v % 4);
  return {16 * (t / 32) + e.row, 8 * (v / 4) + e.col};
}
inline mat::FragmentPos a_register_pos(int t, int i) {
  const mat::FragmentPos e = mat::a_fragment_pos(t % 32, i);
  return {16 * (t / 32) + e.row, e.col};
}

inline Operand decode_descriptor(uint64_t desc, const char* what) {
  if ((desc >> 49) & 7u)
    trap(std::string(what) + ": matrix descriptor with a base offset (unsupported)");
  static const uint32_t kSwizzle[4] = {0, 128, 64, 32};
  return Operand{static_cast<uint32_t>(desc & 0x3fffu) << 4,
                 static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4,
                 static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4, kSwizzle[(desc >> 62) & 3u]};
}

// Shared-window address of element (i, k) of a 16-bit operand (i < 64 or N, k < 16).
inline uint32_t element_address(const Operand& o, bool mn_major, int i, int k) {
  const uint32_t w = o.swizzle_bytes;
  uint32_t off;
  if (!mn_major) {
    off = w ? (i % 8) * w + (i / 8) * o.sbo + (k / 8) * 16 + (k % 8) * 2
            : (i % 8) * 16 + (i / 8) * o.sbo + (k / 8) * o.lbo + (k % 8) * 2;
  } else if (w) {
    const int chunks = static_cast<int>(w / 16);
    off = (i % 8) * 2 + ((i / 8) % chunks) * 16 + (i / (8 * chunks)) * o.lbo + (k % 8) * w +
          (k / 8) * o.sbo;
  } else {
    off = (i % 8) * 2 + (i / 8) * o.sbo + (k % 8) * 16 + (k / 8) * o.lbo;
  }
  uint32_t a = o.start + off;
  if (w) a ^= ((a >> 7) & (w / 16 - 1)) << 4;
  return a;
}

// One thread's part of a wgmma.mma_async.
struct IssueRecord {
  float* d;
  const uint32_t* a;  // A in registers, or null
  uint64_t desc_a, desc_b;
  int n;
  bool bf16, trans_a, trans_b, scale_d;
};

struct Product {
  IssueRecord op;                 // thread 0's (the operands are uniform)
  float* d[128];                  // each thread's accumulators
  const uint32_t* a[128];         // each thread's A registers (register A only)
  std::vector<float> c;           // C per thread (n / 2 each) where the chain starts here
  std::vector<uint8_t> c_from_d;  // per thread: C is the accumulator's value at retirement
};

struct Queue {
  std::vector<Product> open;
  std::vector<std::vector<Product>> committed;  // oldest first
  std::map<float*, int> in_flight;              // accumulators with queued products
};

inline Queue& queue() {
  std::shared_ptr<void>& s = warpgroup_state();
  if (!s) s = std::make_shared<Queue>();
  return *static_cast<Queue*>(s.get());
}

inline const char* issue_name(const IssueRecord& r) {
  if (r.a)
    return r.bf16 ? "wgmma.mma_async (A in registers, bf16)"
                  : "wgmma.mma_async (A in registers, f16)";
  return r.bf16 ? "wgmma.mma_async (bf16)" : "wgmma.mma_async (f16)";
}

// wgmma reads shared memory through the async proxy: bytes that a cp.async landed must have been
// fenced by their writer (fence.proxy.async after its wait_group, then a barrier) before the
// product is issued. Checked at issue, over every shared-memory element of A and B.
inline void check_operands_fenced(const IssueRecord& op, const char* what) {
  auto check = [&](uint64_t desc, bool mn_major, int rows, const char* name) {
    const Operand o = decode_descriptor(desc, what);
    for (int i = 0; i < rows; ++i)
      for (int k = 0; k < 16; ++k) {
        const uint32_t addr = element_address(o, mn_major, i, k);
        const int writer = async_unfenced_writer(addr);
        if (writer >= 0)
          trap(std::string(what) + ": operand " + name + " reads shared address " +
               std::to_string(addr) + ", which a cp.async of thread " + std::to_string(writer) +
               " wrote and that thread has not made visible to the async proxy (a "
               "fence.proxy.async after its cp.async wait, then a barrier, before the wgmma)");
      }
  };
  if (op.a == nullptr) check(op.desc_a, op.trans_a, 64, "A");
  check(op.desc_b, op.trans_b, op.n, "B");
}

inline void resolve_issue(void* const* records) {
  auto rec = [&](int t) { return static_cast<IssueRecord*>(records[t]); };
  const IssueRecord& r0 = *rec(0);
  const char* what = issue_name(r0);
  for (int t = 1; t < 128; ++t) {
    const IssueRecord& r = *rec(t);
    if (r.desc_a != r0.desc_a || r.desc_b != r0.desc_b || r.n != r0.n || r.scale_d != r0.scale_d ||
        r.trans_a != r0.trans_a || r.trans_b != r0.trans_b || (r.a == nullptr) != (r0.a == nullptr))
      trap(std::string(what) +
           ": threads of one warpgroup pass different descriptors, shapes or "
           "flags (thread " +
           std::to_string(t) + " differs from thread 0)");
  }
  check_operands_fenced(r0, what);
  Queue& q = queue();
  Product p;
  p.op = r0;
  const int per = r0.n / 2;
  p.c.assign(static_cast<size_t>(128 * per), 0.0f);
  p.c_from_d.assign(128, 0);
  for (int t = 0; t < 128; ++t) {
    p.d[t] = rec(t)->d;
    p.a[t] = rec(t)->a;
    int& queued = q.in_flight[p.d[t]];
    if (queued > 0) {
      p.c_from_d[t] = 1;  // chained on a queued product: its result, at retirement
    } else {
      std::memcpy(&p.c[static_cast<size_t>(t * per)], p.d[t], sizeof(float) * per);
      for (int i = 0; i < per; ++i) p.d[t][i] = std::numeric_limits<float>::quiet_NaN();
    }
    ++queued;
  }
  q.open.push_back(std::move(p));
}

inline void compute(Product& p) {
  const IssueRecord& op = p.op;
  const char* what = issue_name(op);
  const int n = op.n, per = n / 2;
  auto element = [&](const Operand& o, bool mn_major, int i, int k) {
    const uint32_t addr = element_address(o, mn_major, i, k);
    uint16_t bits;
    std::memcpy(&bits, shared_window_pointer(addr, 2, what), 2);
    return mat::decode(bits, op.bf16);
  };
  std::vector<float> a(64 * 16), b(static_cast<size_t>(n) * 16);
  if (op.a == nullptr) {
    const Operand oa = decode_descriptor(op.desc_a, what);
    for (int i = 0; i < 64; ++i)
      for (int k = 0; k < 16; ++k) a[i * 16 + k] = element(oa, op.trans_a, i, k);
  } else {
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < 8; ++i) {
        const mat::FragmentPos e = a_register_pos(t, i);
        a[e.row * 16 + e.col] = mat::decode(mat::half_of(p.a[t][i / 2], i & 1), op.bf16);
      }
  }
  const Operand ob = decode_descriptor(op.desc_b, what);
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < 16; ++k) b[static_cast<size_t>(j) * 16 + k] = element(ob, op.trans_b, j, k);
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < per; ++v) {
      const mat::FragmentPos e = accumulator_pos(t, v);
      float acc = 0.0f;
      if (op.scale_d) acc = p.c_from_d[t] ? p.d[t][v] : p.c[static_cast<size_t>(t * per + v)];
      for (int k = 0; k < 16; ++k)
        acc += a[e.row * 16 + k] * b[static_cast<size_t>(e.col) * 16 + k];
      p.d[t][v] = acc;
    }
  }
}

inline void resolve_commit(void* const*) {
  Queue& q = queue();
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}

struct WaitRecord {
  int pending;
};

inline void resolve_wait(void* const* records) {
  const int pending = static_cast<WaitRecord*>(records[0])->pending;
  for (int t = 1; t < 128; ++t)
    if (static_cast<WaitRecord*>(records[t])->pending != pending)
      trap("wgmma.wait_group: threads of one warpgroup wait for different group counts");
  Queue& q = queue();
  const size_t keep = static_cast<size_t>(pending < 0 ? 0 : pending);
  size_t done = 0;
  for (; q.committed.size() - done > keep; ++done)
    for (Product& p : q.committed[done]) {
      compute(p);
      for (float* d : p.d)
        if (--q.in_flight[d] == 0) q.in_flight.erase(d);
    }
  q.committed.erase(q.committed.begin(), q.committed.begin() + static_cast<std::ptrdiff_t>(done));
}

}  // namespace wg

// wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{f16,bf16}: d (N / 2 per thread) = A B (+ d).
inline void wgmma_mma_async(float* d, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b,
                            int n, bool bf16, bool trans_a, bool trans_b, bool scale_d,
                            const char* file, int line) {
  wg::IssueRecord rec{d, a_regs, desc_a, desc_b, n, bf16, trans_a, trans_b, scale_d};
  if (!wgmma_fenced())
    trap(std::string(wg::issue_name(rec)) + " at " + file + ":" + std::to_string(line) +
         ": no wgmma.fence since this thread's last wgmma.wait_group (or the kernel's start); "
         "one must precede the first wgmma and follow any other access to its accumulators or A "
         "registers");
  warpgroup_exchange(&rec, &wg::resolve_issue, wg::issue_name(rec), file, line);
}

inline void wgmma_commit_group(const char* file, int line) {
  warpgroup_exchange(nullptr, &wg::resolve_commit, "wgmma.commit_group", file, line);
}

inline void wgmma_wait_group(int pending, const char* file, int line) {
  wg::WaitRecord rec{pending};
  warpgroup_exchange(&rec, &wg::resolve_wait, "wgmma.wait_group", file, line);
  set_wgmma_fenced(false);
}

}  // namespace gam_emu
