// Execution engine of the SIMT emulation layer (see simt.h): blocks, barriers, warp
// collectives, shared memory, launches and the deadlock report.
//
// A launch runs its blocks one after another on the calling OS thread. The threads of a block
// are fibers (fiber.h) with their own stacks; a fiber runs until it waits (block barrier, warp
// collective) or exits, then hands control directly to the next runnable fiber. The fiber that
// completes a barrier or a warp collective computes everyone's results, marks them runnable and
// keeps going. When no fiber is runnable control returns to the launching context: either every
// thread exited, or the block is deadlocked, which is reported as an error instead of hanging.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <vector>

#include "emu/fiber.h"
#include "emu/runtime.h"
#include "emu/simt.h"

namespace gam_emu {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr uint64_t kPoison = ~uint64_t{0};

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kGroup, kDone };

struct WarpOp {
  WarpOpKind kind;
  unsigned mask;
  uint64_t value;
  int arg;
  int width;
  uint64_t result;
  const char* what;
  const char* file;
  int line;
  ExchangeFn resolve;  // kExchange only
};

// One cp.async of a thread, waiting to land (see cp_async in simt.h).
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;
};

struct Fiber {
  fiber::Context ctx;
  fiber::Stack* stack = nullptr;
  uint3 tid;
  int linear = 0;
  int warp = 0;
  int lane = 0;
  State state = State::kRunnable;
  WarpOp op{};
  const char* bar_file = nullptr;
  int bar_line = 0;
  int bar_id = 0;                // 0: __syncthreads; 1..15: a named barrier (bar.sync id, count)
  void* group_record = nullptr;  // kGroup: the warpgroup exchange this thread waits in
  ExchangeFn group_resolve = nullptr;
  const char* group_what = nullptr;
  const char* group_file = nullptr;
  int group_line = 0;
  std::vector<AsyncCopy> cp_open;                 // cp.async not yet committed
  std::vector<std::vector<AsyncCopy>> cp_groups;  // committed groups, oldest first
  std::vector<uint32_t> unfenced;  // 16-byte chunks its cp.async landed since its last proxy fence
  bool wgmma_fenced = false;       // a wgmma.fence since its last wgmma.wait_group
};

struct SharedAlloc {
  const void* site;
  void* ptr;
  size_t bytes;
};

struct Engine {
  const LaunchSpec* spec = nullptr;
  void (*thunk)(void*) = nullptr;
  void* closure = nullptr;
  int nthreads = 0;
  int nwarps = 0;
  std::vector<Fiber> fibers;
  std::vector<uint32_t> warp_exists;
  std::vector<uint32_t> warp_done;
  int n_runnable = 0;
  int n_done = 0;
  int bar_arrived = 0;
  int named_arrived[16] = {};      // threads waiting at each named barrier (index 0 unused)
  std::vector<int> group_arrived;  // per warpgroup: threads in its exchange
  std::vector<std::shared_ptr<void>> group_state;  // per warpgroup (warpgroup_state)
  fiber::Context main;
  Fiber* cur = nullptr;
  uint3 block{};
  std::vector<SharedAlloc> shared;
  size_t static_smem_bytes = 0;
  void* dyn_smem = nullptr;
  // Per 16-byte chunk of dynamic shared memory: the thread whose cp.async landed there and has not
  // run fence.proxy.async since (-1: none), for wgmma's operand check (async_unfenced_writer).
  std::vector<int> async_writer;
  bool faulted = false;
  std::string fault;
  bool reverse = false;  // run this block's threads from the last to the first
};

// Odd-numbered blocks run their threads in reverse order, so a shared-memory
// read that lacks a barrier sees the 0xFF (NaN) fill in one direction or the
// other, whichever thread it reads from. GAM_EMU_SCHEDULE=forward turns it off.
bool alternate_order() {
  static const bool on = [] {
    const char* env = std::getenv("GAM_EMU_SCHEDULE");
    return env == nullptr || std::strcmp(env, "forward") != 0;
  }();
  return on;
}

thread_local Engine* t_engine = nullptr;
thread_local fiber::StackPool t_stacks;

std::string dim_str(const uint3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}
std::string dim_str(const dim3& d) { return dim_str(uint3{d.x, d.y, d.z}); }

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string site(const char* file, int line) {
  return std::string(file ? file : "?") + ":" + std::to_string(line);
}

// ---- switching between the fibers of a block ------------------------------

// Leaves `from` for fiber `next`, or for the launching context when null.
void transfer(fiber::Context* from, Fiber* next, bool from_exits) {
  Engine& e = *t_engine;
  e.cur = next;
  if (next != nullptr) {
    t_builtins.thread_idx = next->tid;
    fiber::switch_to(from, &next->ctx, from_exits);
  } else {
    fiber::switch_to(from, &e.main, from_exits);
  }
}

Fiber* pick_next(Engine& e, int after) {
  if (e.n_runnable == 0) return nullptr;
  const int n = e.nthreads;
  const int step = e.reverse ? n - 1 : 1;  // -1 modulo n
  for (int k = 1, i = after; k <= n; ++k) {
    i = (i + step) % n;
    Fiber& f = e.fibers[i];
    if (f.state == State::kRunnable) return &f;
  }
  return nullptr;
}

// The calling fiber has just stopped being runnable (or exited).
void yield_from(Fiber* self) {
  Engine& e = *t_engine;
  transfer(&self->ctx, pick_next(e, self->linear), self->state == State::kDone);
}

[[noreturn]] void fault_in_fiber(const std::string& message) {
  Engine& e = *t_engine;
  Fiber* self = e.cur;
  if (!e.faulted) {
    e.faulted = true;
    e.fault = "thread " + dim_str(self->tid) + ": " + message;
  }
  transfer(&self->ctx, nullptr, /*from_exits=*/true);
  std::abort();  // never resumed
}

// ---- warp collectives ----------------------------------------------------

// Completes the collective `proto` of warp w if every non-exited lane of its
// mask waits in the same collective with the same mask. Returns true when
// done (all those lanes are runnable again with their results set).
bool try_resolve(Engine& e, int w, const WarpOp& proto) {
  const unsigned parts = proto.mask & e.warp_exists[w] & ~e.warp_done[w];
  Fiber* lanes = &e.fibers[static_cast<size_t>(w) * 32];
  if (proto.kind == WarpOpKind::kExchange && parts != 0xffffffffu)
    fault_in_fiber(std::string(proto.what) + " at " + site(proto.file, proto.line) +
                   " needs all 32 lanes of warp " + std::to_string(w) +
                   "; lanes taking part: " + hex(parts) + " (the others exited or do not exist)");
  for (int l = 0; l < 32; ++l) {
    if (!((parts >> l) & 1u)) continue;
    const Fiber& f = lanes[l];
    if (f.state != State::kWarp || f.op.kind != proto.kind || f.op.mask != proto.mask) return false;
    // Exchanges share one kind; different instructions must not complete each other.
    if (proto.kind == WarpOpKind::kExchange && std::strcmp(f.op.what, proto.what)) return false;
    if (proto.kind == WarpOpKind::kExchange && f.op.resolve != proto.resolve) return false;
  }
  if (proto.kind == WarpOpKind::kExchange) {
    void* records[32];
    for (int l = 0; l < 32; ++l)
      records[l] = reinterpret_cast<void*>(static_cast<uintptr_t>(lanes[l].op.value));
    proto.resolve(records);
  }
  auto value_of = [&](int src) -> uint64_t {
    return (src >= 0 && src < 32 && ((parts >> src) & 1u)) ? lanes[src].op.value : kPoison;
  };
  uint64_t ballot = 0;
  int n = 0;
  for (int l = 0; l < 32; ++l) {
    if (!((parts >> l) & 1u)) continue;
    ++n;
    if (lanes[l].op.value != 0) ballot |= 1ull << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!((parts >> l) & 1u)) continue;
    Fiber& f = lanes[l];
    const int width = f.op.width;
    const int seg = l & ~(width - 1);
    uint64_t r = 0;
    switch (proto.kind) {
      case WarpOpKind::kShfl:
        r = value_of(seg + (f.op.arg & (width - 1)));
        break;
      case WarpOpKind::kShflUp:
        r = (l - seg) >= f.op.arg ? value_of(l - f.op.arg) : f.op.value;
        break;
      case WarpOpKind::kShflDown:
        r = (l - seg) + f.op.arg < width ? value_of(l + f.op.arg) : f.op.value;
        break;
      case WarpOpKind::kShflXor: {
        const int src = l ^ f.op.arg;
        r = (src < seg + width) ? value_of(src) : f.op.value;
        break;
      }
      case WarpOpKind::kBallot:
        r = ballot;
        break;
      case WarpOpKind::kAny:
        r = ballot != 0;
        break;
      case WarpOpKind::kAll:
        r = __builtin_popcountll(ballot) == n;
        break;
      case WarpOpKind::kSyncWarp:
      case WarpOpKind::kExchange:
        break;
    }
    f.op.result = r;
    f.state = State::kRunnable;
    ++e.n_runnable;
  }
  return true;
}

// A lane exited: collectives that were only waiting for it may complete.
void on_lane_exit(Engine& e, const Fiber& f) {
  e.warp_done[f.warp] |= 1u << f.lane;
  Fiber* lanes = &e.fibers[static_cast<size_t>(f.warp) * 32];
  for (int l = 0; l < 32; ++l) {
    if (!((e.warp_exists[f.warp] >> l) & 1u)) continue;
    if (lanes[l].state == State::kWarp) try_resolve(e, f.warp, lanes[l].op);
  }
}

// ---- cp.async ------------------------------------------------------------

void land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    if (c.bytes > c.src_bytes)
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0,
                  static_cast<size_t>(c.bytes - c.src_bytes));
  }
}

// ---- fiber body ----------------------------------------------------------

[[noreturn]] void fiber_main() {
  Engine& e = *t_engine;
  Fiber* self = e.cur;
  fiber::started(&self->ctx);
  // Leave the handler before faulting: a fiber that never returns must not
  // keep an exception "being handled" in the thread's C++ runtime state.
  std::string error;
  try {
    e.thunk(e.closure);
  } catch (const std::exception& ex) {
    error = std::string("exception escaped the kernel: ") + ex.what();
  } catch (...) {
    error = "exception escaped the kernel";
  }
  if (!error.empty()) fault_in_fiber(error);
  // cp.async still in flight at exit land anyway, as on the GPU.
  self->cp_groups.push_back(std::move(self->cp_open));
  self->cp_open.clear();
  for (const auto& group : self->cp_groups) land(group);
  self->cp_groups.clear();
  self->state = State::kDone;
  ++e.n_done;
  --e.n_runnable;
  on_lane_exit(e, *self);
  yield_from(self);
  std::abort();  // a finished fiber is never resumed
}

// ---- blocks and launches -----------------------------------------------

std::string deadlock_report(const Engine& e) {
  std::ostringstream m;
  int at_bar = 0, at_warp = 0, at_group = 0;
  const Fiber* first_bar = nullptr;
  const Fiber* first_warp = nullptr;
  const Fiber* first_group = nullptr;
  for (const Fiber& f : e.fibers) {
    if (f.state == State::kGroup) {
      ++at_group;
      if (!first_group) first_group = &f;
    } else if (f.state == State::kBarrier) {
      ++at_bar;
      if (!first_bar) first_bar = &f;
    } else if (f.state == State::kWarp) {
      ++at_warp;
      if (!first_warp) first_warp = &f;
    }
  }
  m << "deadlock in block " << dim_str(e.block) << ": ";
  if (first_group) {
    const int g = first_group->warp / 4;
    int waiting = 0;
    for (const Fiber& f : e.fibers) waiting += f.state == State::kGroup && f.warp / 4 == g;
    m << first_group->group_what << " at " << site(first_group->group_file, first_group->group_line)
      << " was reached by " << waiting << " of the 128 threads of warpgroup " << g << " ("
      << at_group << " threads wait in warpgroup collectives, " << e.n_done << " had exited)";
  } else if (first_bar && first_bar->bar_id != 0) {
    int waiting = 0;
    for (const Fiber& f : e.fibers)
      waiting += f.state == State::kBarrier && f.bar_id == first_bar->bar_id;
    m << "named barrier " << first_bar->bar_id << " at "
      << site(first_bar->bar_file, first_bar->bar_line) << " was reached by " << waiting
      << " threads, fewer than its count; " << at_bar << " threads wait at barriers, " << e.n_done
      << " had exited";
  } else if (first_bar) {
    m << "divergent __syncthreads(): the barrier at "
      << site(first_bar->bar_file, first_bar->bar_line) << " was reached by " << at_bar << " of "
      << e.nthreads << " threads; " << e.n_done << " threads had already exited";
    if (at_warp) m << " and " << at_warp << " wait in warp collectives";
    if (e.n_done) {
      for (const Fiber& f : e.fibers)
        if (f.state == State::kDone) {
          m << " (first exited thread " << dim_str(f.tid) << ")";
          break;
        }
    }
  } else if (first_warp) {
    // List every distinct collective the lanes of that warp wait in.
    const int w = first_warp->warp;
    m << "warp collectives in warp " << w << " never completed (lanes exited "
      << hex(e.warp_done[w]) << "):";
    std::vector<const Fiber*> shown;
    for (int l = 0; l < 32; ++l) {
      const size_t i = static_cast<size_t>(w) * 32 + l;
      if (i >= e.fibers.size() || e.fibers[i].state != State::kWarp) continue;
      const WarpOp& op = e.fibers[i].op;
      bool seen = false;
      for (const Fiber* s : shown)
        seen |= s->op.line == op.line && s->op.kind == op.kind && s->op.mask == op.mask &&
                !std::strcmp(s->op.file, op.file);
      if (seen) continue;
      shown.push_back(&e.fibers[i]);
      unsigned lanes = 0;
      for (int k = 0; k < 32; ++k) {
        const size_t j = static_cast<size_t>(w) * 32 + k;
        if (j < e.fibers.size() && e.fibers[j].state == State::kWarp &&
            e.fibers[j].op.line == op.line && e.fibers[j].op.kind == op.kind &&
            e.fibers[j].op.mask == op.mask)
          lanes |= 1u << k;
      }
      m << " " << op.what << " (mask " << hex(op.mask) << ") at " << site(op.file, op.line)
        << " by lanes " << hex(lanes) << ";";
    }
    m << " every non-exited lane of a mask must call the same collective "
         "with the same mask";
  } else {
    m << "no runnable thread";
  }
  return m.str();
}

void release_shared(Engine& e) {
  e.group_state.clear();
  for (SharedAlloc& a : e.shared) std::free(a.ptr);
  e.shared.clear();
  e.static_smem_bytes = 0;
  std::free(e.dyn_smem);
  e.dyn_smem = nullptr;
}

void run_block(Engine& e, const uint3& block) {
  e.block = block;
  t_builtins.block_idx = block;
  const dim3& bd = e.spec->block;
  for (int i = 0; i < e.nthreads; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % bd.x), static_cast<unsigned>((i / bd.x) % bd.y),
                  static_cast<unsigned>(i / (bd.x * bd.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::kRunnable;
    f.cp_open.clear();
    f.cp_groups.clear();
    f.unfenced.clear();
    f.wgmma_fenced = false;
    f.stack = &t_stacks.get(i);
    fiber::prepare(f.ctx, *f.stack, &fiber_main);
  }
  std::fill(e.warp_done.begin(), e.warp_done.end(), 0u);
  e.n_runnable = e.nthreads;
  e.n_done = 0;
  e.bar_arrived = 0;
  std::fill(std::begin(e.named_arrived), std::end(e.named_arrived), 0);
  e.group_arrived.assign(static_cast<size_t>((e.nwarps + 3) / 4), 0);
  e.group_state.assign(e.group_arrived.size(), nullptr);
  // Dynamic shared memory: one exact-size allocation per block, 1024-byte aligned like the
  // shared-window addresses of shared_window_address (the largest swizzle atom of wgmma).
  const size_t dyn = e.spec->dynamic_smem_bytes;
  if (posix_memalign(&e.dyn_smem, 1024, dyn == 0 ? 1 : dyn) != 0) throw std::bad_alloc();
  std::memset(e.dyn_smem, 0xff, dyn == 0 ? 1 : dyn);
  e.async_writer.assign((dyn + 15) / 16, -1);

  const uint64_t linear_block =
      block.x + uint64_t{e.spec->grid.x} * (block.y + uint64_t{e.spec->grid.y} * block.z);
  e.reverse = alternate_order() && (linear_block & 1u);
  transfer(&e.main, &e.fibers[e.reverse ? e.nthreads - 1 : 0], false);
  // Back on the launching stack: every fiber exited, faulted or is stuck.
  release_shared(e);
  if (e.faulted || e.n_done != e.nthreads) {
    // Abandoned fibers leave poisoned redzones on their stacks.
    for (Fiber& f : e.fibers)
      if (f.state != State::kDone) f.stack->dirty = true;
  }
  if (e.faulted) throw std::runtime_error("block " + dim_str(block) + ", " + e.fault);
  if (e.n_done != e.nthreads) throw std::runtime_error(deadlock_report(e));
}

void validate(const LaunchSpec& s) {
  auto fail = [&](const std::string& what) {
    throw std::runtime_error(std::string("gam_launch(") + s.name +
                             "): invalid configuration: " + what);
  };
  const dim3& b = s.block;
  const dim3& g = s.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > 1024 || b.y > 1024 || b.z > 64)
    fail("block " + dim_str(b) + " (at most 1024 threads, z <= 64, none 0)");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || g.x > 2147483647u)
    fail("grid " + dim_str(g) +
         " (every dimension >= 1; y, z <= 65535); skip the launch for empty "
         "inputs");
  const size_t limit = dynamic_smem_limit(s.kernel);
  if (s.dynamic_smem_bytes > limit)
    fail(std::to_string(s.dynamic_smem_bytes) +
         " bytes of dynamic shared memory exceed the kernel's limit of " + std::to_string(limit) +
         " (raise it with cudaFuncSetAttribute("
         "cudaFuncAttributeMaxDynamicSharedMemorySize))");
}

}  // namespace

// ---- public entry points -------------------------------------------------

void launch(const LaunchSpec& spec, void (*thunk)(void*), void* closure) {
  validate(spec);
  if (t_engine != nullptr)
    throw std::runtime_error(std::string("gam_launch(") + spec.name +
                             "): launch from inside a kernel is not supported");
  Engine e;
  e.spec = &spec;
  e.thunk = thunk;
  e.closure = closure;
  e.nthreads = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  e.nwarps = (e.nthreads + 31) / 32;
  e.fibers.resize(e.nthreads);
  e.warp_exists.assign(e.nwarps, 0xffffffffu);
  e.warp_done.assign(e.nwarps, 0u);
  if (e.nthreads % 32) e.warp_exists.back() = (1u << (e.nthreads % 32)) - 1u;

  const Builtins saved = t_builtins;
  t_builtins.block_dim = spec.block;
  t_builtins.grid_dim = spec.grid;
  t_engine = &e;
  struct Restore {
    Engine* engine;
    Builtins saved;
    ~Restore() {
      release_shared(*engine);
      t_engine = nullptr;
      t_builtins = saved;
    }
  } restore{&e, saved};
  try {
    for (unsigned z = 0; z < spec.grid.z; ++z)
      for (unsigned y = 0; y < spec.grid.y; ++y)
        for (unsigned x = 0; x < spec.grid.x; ++x) run_block(e, uint3{x, y, z});
  } catch (const std::bad_alloc&) {
    throw std::runtime_error(std::string("gam_launch(") + spec.name + "): out of host memory");
  } catch (const std::exception& ex) {
    throw std::runtime_error(std::string("gam_launch(") + spec.name + "): " + ex.what());
  }
}

uint64_t warp_op(WarpOpKind kind, unsigned mask, uint64_t value, int arg, int width,
                 const char* what, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  if (!((mask >> self->lane) & 1u))
    fault_in_fiber(std::string(what) + " at " + site(file, line) + ": mask " + hex(mask) +
                   " does not include the calling lane " + std::to_string(self->lane));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault_in_fiber(std::string(what) + " at " + site(file, line) + ": width " +
                   std::to_string(width) + " is not a power of two in [1, 32]");
  self->op = WarpOp{kind, mask, value, arg, width, 0, what, file, line, nullptr};
  self->state = State::kWarp;
  --e.n_runnable;
  if (!try_resolve(e, self->warp, self->op)) yield_from(self);
  return self->op.result;
}

void warp_exchange(void* record, ExchangeFn resolve, const char* what, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  self->op = WarpOp{WarpOpKind::kExchange,
                    0xffffffffu,
                    static_cast<uint64_t>(reinterpret_cast<uintptr_t>(record)),
                    0,
                    32,
                    0,
                    what,
                    file,
                    line,
                    resolve};
  self->state = State::kWarp;
  --e.n_runnable;
  if (!try_resolve(e, self->warp, self->op)) yield_from(self);
}

void warpgroup_exchange(void* record, ExchangeFn resolve, const char* what, const char* file,
                        int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  if (e.nthreads % 128 != 0)
    fault_in_fiber(std::string(what) + " at " + site(file, line) + ": the block's " +
                   std::to_string(e.nthreads) +
                   " threads are not whole warpgroups (a multiple of 128)");
  const int g = self->warp / 4;
  self->group_record = record;
  self->group_resolve = resolve;
  self->group_what = what;
  self->group_file = file;
  self->group_line = line;
  self->state = State::kGroup;
  --e.n_runnable;
  if (++e.group_arrived[g] < 128) {
    yield_from(self);
    return;
  }
  // Last arrival: all 128 threads wait in an exchange; it must be the same one.
  Fiber* members = &e.fibers[static_cast<size_t>(g) * 128];
  void* records[128];
  for (int i = 0; i < 128; ++i) {
    const Fiber& f = members[i];
    if (f.group_resolve != resolve || std::strcmp(f.group_what, what) != 0)
      fault_in_fiber(std::string("divergent warpgroup collectives in warpgroup ") +
                     std::to_string(g) + ": " + f.group_what + " at " +
                     site(f.group_file, f.group_line) + " and " + what + " at " + site(file, line));
    records[i] = f.group_record;
  }
  resolve(records);
  for (int i = 0; i < 128; ++i) members[i].state = State::kRunnable;
  e.n_runnable += 128;
  e.group_arrived[g] = 0;
}

std::shared_ptr<void>& warpgroup_state() {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("warpgroup state used outside a kernel");
  return e->group_state[static_cast<size_t>(e->cur->warp / 4)];
}

uint32_t shared_window_address(const void* p, const char* what, const char* file, int line) {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(e->dyn_smem);
  if (a < base || a >= base + e->spec->dynamic_smem_bytes) {
    char msg[240];
    std::snprintf(msg, sizeof(msg),
                  "%s at %s:%d: %p is not in the block's dynamic shared memory (%p, %zu bytes); "
                  "the emulator gives shared-window addresses to dynamic shared memory only",
                  what, file, line, p, e->dyn_smem, e->spec->dynamic_smem_bytes);
    trap(msg);
  }
  return static_cast<uint32_t>(a - base);
}

void* shared_window_pointer(uint32_t address, size_t bytes, const char* what) {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  if (uint64_t{address} + bytes > e->spec->dynamic_smem_bytes) {
    char msg[200];
    std::snprintf(msg, sizeof(msg),
                  "%s: shared address 0x%x (%zu bytes) is past the block's %zu bytes of dynamic "
                  "shared memory",
                  what, address, bytes, e->spec->dynamic_smem_bytes);
    trap(msg);
  }
  return static_cast<char*>(e->dyn_smem) + address;
}

bool in_shared(const void* p, size_t bytes) {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) return false;
  const auto lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
  auto inside = [&](const void* base, size_t size) {
    const auto b = reinterpret_cast<uintptr_t>(base);
    return lo >= b && hi <= b + size && hi >= lo;
  };
  if (e->dyn_smem != nullptr && inside(e->dyn_smem, e->spec->dynamic_smem_bytes)) return true;
  for (const SharedAlloc& a : e->shared)
    if (inside(a.ptr, a.bytes)) return true;
  return false;
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* what,
              const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap(std::string(what) + " called outside a kernel");
  char msg[320];
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % static_cast<uintptr_t>(bytes) != 0 || s % static_cast<uintptr_t>(bytes) != 0) {
    std::snprintf(msg, sizeof(msg),
                  "%s at %s:%d: addresses %p (shared) and %p (global) must be %d-byte aligned",
                  what, file, line, dst, src, bytes);
    trap(msg);
  }
  if (!in_shared(dst, static_cast<size_t>(bytes))) {
    std::snprintf(msg, sizeof(msg),
                  "%s at %s:%d: destination %p (%d bytes) is not in shared memory (dynamic: %p, "
                  "%zu bytes)",
                  what, file, line, dst, bytes, ep->dyn_smem, ep->spec->dynamic_smem_bytes);
    trap(msg);
  }
  if (in_shared(src, 1)) {
    std::snprintf(msg, sizeof(msg), "%s at %s:%d: source %p is in shared memory, not global", what,
                  file, line, src);
    trap(msg);
  }
  if (src_bytes < 0 || src_bytes > bytes) {
    std::snprintf(msg, sizeof(msg), "%s at %s:%d: src-size %d outside [0, %d]", what, file, line,
                  src_bytes, bytes);
    trap(msg);
  }
  // Until its group is waited for, the destination reads as NaN (0xFF bytes): a read of a
  // stage that was never waited for, or a copy into a stage still being read, shows up.
  std::memset(dst, 0xff, static_cast<size_t>(bytes));
  ep->cur->cp_open.push_back(AsyncCopy{dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("cp.async.commit_group called outside a kernel");
  Fiber* self = e->cur;
  self->cp_groups.push_back(std::move(self->cp_open));
  self->cp_open.clear();
}

void cp_async_wait(int pending) {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("cp.async.wait_group called outside a kernel");
  Fiber* self = e->cur;
  const size_t keep = static_cast<size_t>(std::max(pending, 0));
  size_t done = 0;
  const auto base = reinterpret_cast<uintptr_t>(e->dyn_smem);
  const size_t dyn = e->spec->dynamic_smem_bytes;
  while (self->cp_groups.size() - done > keep) {
    const std::vector<AsyncCopy>& group = self->cp_groups[done++];
    land(group);
    // The landed bytes are the generic proxy's until this thread's fence.proxy.async.
    for (const AsyncCopy& c : group) {
      const auto d = reinterpret_cast<uintptr_t>(c.dst);
      if (d < base || d >= base + dyn) continue;  // static shared memory: no wgmma operand
      for (uintptr_t k = (d - base) / 16; k <= (d - base + c.bytes - 1) / 16; ++k) {
        if (e->async_writer[k] == self->linear) continue;  // already listed, not fenced since
        e->async_writer[k] = self->linear;
        self->unfenced.push_back(static_cast<uint32_t>(k));
      }
    }
  }
  self->cp_groups.erase(self->cp_groups.begin(), self->cp_groups.begin() + done);
}

void proxy_fence_async_shared() {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("fence.proxy.async called outside a kernel");
  Fiber* self = e->cur;
  for (uint32_t k : self->unfenced)
    if (e->async_writer[k] == self->linear) e->async_writer[k] = -1;
  self->unfenced.clear();
}

void set_wgmma_fenced(bool fenced) {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("wgmma.fence / wait_group called outside a kernel");
  e->cur->wgmma_fenced = fenced;
}

bool wgmma_fenced() {
  Engine* e = t_engine;
  return e != nullptr && e->cur != nullptr && e->cur->wgmma_fenced;
}

int async_unfenced_writer(uint32_t address) {
  Engine* e = t_engine;
  if (e == nullptr || address / 16 >= e->async_writer.size()) return -1;
  return e->async_writer[address / 16];
}

void block_barrier(const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap("__syncthreads() called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  self->state = State::kBarrier;
  self->bar_file = file;
  self->bar_line = line;
  self->bar_id = 0;
  --e.n_runnable;
  if (++e.bar_arrived < e.nthreads) {
    yield_from(self);
    return;
  }
  // Last arrival: every thread waits here. All must be at the same call.
  for (const Fiber& f : e.fibers) {
    if (f.bar_line != self->bar_line || std::strcmp(f.bar_file, self->bar_file) != 0)
      fault_in_fiber("divergent __syncthreads(): threads wait at " + site(f.bar_file, f.bar_line) +
                     " and at " + site(self->bar_file, self->bar_line));
  }
  for (Fiber& f : e.fibers) f.state = State::kRunnable;
  e.n_runnable = e.nthreads;
  e.bar_arrived = 0;
}

void named_barrier(int id, int count, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr) trap("bar.sync called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  if (id < 1 || id > 15 || count < 32 || count % 32 != 0 || count > e.nthreads)
    fault_in_fiber("bar.sync at " + site(file, line) + ": barrier " + std::to_string(id) +
                   " with " + std::to_string(count) +
                   " threads (ids 1..15; a positive multiple of 32, at most the block's " +
                   std::to_string(e.nthreads) + ")");
  self->state = State::kBarrier;
  self->bar_file = file;
  self->bar_line = line;
  self->bar_id = id;
  --e.n_runnable;
  if (++e.named_arrived[id] < count) {
    yield_from(self);
    return;
  }
  // bar.sync is .aligned: on the GPU a warp arrives as a whole (its arrival counts 32 threads),
  // so every live thread of a warp that takes part must be waiting here; a warp split across
  // two arrivals deadlocks or releases early there, whatever it does here.
  std::vector<int> waiting(e.warp_exists.size(), 0), live(e.warp_exists.size(), 0);
  for (const Fiber& f : e.fibers) {
    if (f.state == State::kDone) continue;
    ++live[f.warp];
    if (f.state == State::kBarrier && f.bar_id == id) ++waiting[f.warp];
  }
  for (size_t w = 0; w < waiting.size(); ++w)
    if (waiting[w] != 0 && waiting[w] != live[w])
      fault_in_fiber("bar.sync " + std::to_string(id) + " at " + site(file, line) + ": warp " +
                     std::to_string(w) + " takes part with " + std::to_string(waiting[w]) +
                     " of its " + std::to_string(live[w]) +
                     " threads (bar.sync is .aligned: the whole warp must reach it together)");
  // Last arrival: release the threads waiting at this barrier (a fixed count, as on the GPU).
  int released = 0;
  for (Fiber& f : e.fibers) {
    if (f.state == State::kBarrier && f.bar_id == id) {
      f.state = State::kRunnable;
      ++released;
    }
  }
  if (released != count)
    fault_in_fiber("bar.sync " + std::to_string(id) + " at " + site(file, line) + ": " +
                   std::to_string(released) + " threads released, count is " +
                   std::to_string(count));
  e.n_runnable += released;
  e.named_arrived[id] = 0;
}

unsigned active_mask() {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) return 1u;
  return e->warp_exists[e->cur->warp] & ~e->warp_done[e->cur->warp];
}

int current_warp() {
  Engine* e = t_engine;
  return (e == nullptr || e->cur == nullptr) ? 0 : e->cur->warp;
}

void* shared_array(const void* site_key, size_t bytes, size_t align, const char* name,
                   const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr)
    trap(std::string("GAM_SHARED(") + name + ") used outside a kernel");
  Engine& e = *ep;
  for (const SharedAlloc& a : e.shared)
    if (a.site == site_key) {
      if (a.bytes != bytes)
        fault_in_fiber(std::string("GAM_SHARED(") + name + ") at " + site(file, line) +
                       ": threads disagree on its size");
      return a.ptr;
    }
  e.static_smem_bytes += bytes;
  if (e.static_smem_bytes > kStaticSmemLimit)
    fault_in_fiber("static shared memory (" + std::to_string(e.static_smem_bytes) +
                   " bytes at GAM_SHARED(" + name + ") " + site(file, line) +
                   ") exceeds the 48 KiB static limit; use dynamic shared "
                   "memory");
  if (e.static_smem_bytes + e.spec->dynamic_smem_bytes > kMaxSmemOptin)
    fault_in_fiber("static + dynamic shared memory exceed 227 KiB per block");
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, 16), bytes) != 0)
    fault_in_fiber("out of host memory for shared memory");
  std::memset(p, 0xff, bytes);
  e.shared.push_back(SharedAlloc{site_key, p, bytes});
  return p;
}

void* dynamic_shared() {
  Engine* e = t_engine;
  if (e == nullptr || e->cur == nullptr) trap("GAM_DYNAMIC_SHARED used outside a kernel");
  return e->dyn_smem;
}

void trap(const std::string& message) {
  Engine* e = t_engine;
  if (e != nullptr && e->cur != nullptr) fault_in_fiber(message);
  throw std::runtime_error("gam_emu: " + message);
}

}  // namespace gam_emu
