// Execution engine of the SIMT emulation layer (see simt.h).
//
// A launch runs its blocks one after another on the calling OS thread. The
// threads of a block are fibers with their own stacks; a fiber runs until it
// waits (block barrier, warp collective) or exits, then hands control
// directly to the next runnable fiber. The fiber that completes a barrier or
// a warp collective computes everyone's results, marks them runnable and
// keeps going. When no fiber is runnable control returns to the launching
// context: either every thread exited, or the block is deadlocked, which is
// reported as an error instead of hanging.
//
// On x86-64 fibers switch with a few instructions of assembly (swapcontext
// makes a signal-mask syscall per switch, ~10x slower); elsewhere ucontext is
// used. Switches are annotated for AddressSanitizer so it knows which stack
// is live.
#include "emu/simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define GAM_EMU_ASAN 1
#else
#define GAM_EMU_ASAN 0
#endif

#if defined(__x86_64__) && !defined(GAM_EMU_USE_UCONTEXT)  // -D to test the fallback
#define GAM_EMU_ASM_SWITCH 1
#else
#define GAM_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if GAM_EMU_ASM_SWITCH
// gam_emu_swap(save, next): pushes the callee-saved registers and the SSE /
// x87 control words on the current stack, stores the stack pointer in *save,
// loads `next` as the stack pointer and pops the same frame from there.
extern "C" void gam_emu_swap(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .hidden gam_emu_swap
  .globl gam_emu_swap
  .type gam_emu_swap, @function
gam_emu_swap:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size gam_emu_swap, .-gam_emu_swap
)");
#endif

namespace gam_emu {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;
constexpr size_t kMaxSmemOptin = 227 * 1024;  // H100 opt-in limit per block
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr uint64_t kPoison = ~uint64_t{0};

struct Context {
#if GAM_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  void* fake_stack = nullptr;  // ASan fake stack while suspended
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
};

// Stacks are mmap'ed once per OS thread and reused by later launches, with
// a PROT_NONE guard page below each so an overflow faults instead of
// corrupting a neighbour.
struct Stack {
  char* mapping = nullptr;
  size_t mapping_bytes = 0;
  char* bottom = nullptr;  // lowest usable address
  size_t bytes = 0;
  bool dirty = false;  // abandoned mid-kernel: ASan shadow may be poisoned
};

size_t stack_bytes_from_env() {
  size_t kib = 256;
  if (const char* env = std::getenv("GAM_EMU_STACK_KB")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 16) kib = static_cast<size_t>(v);
  }
  return kib * 1024;
}

class StackPool {
 public:
  ~StackPool() {
    for (Stack& s : stacks_) munmap(s.mapping, s.mapping_bytes);
  }
  Stack& get(size_t i) {
    while (stacks_.size() <= i) stacks_.push_back(make());
    return stacks_[i];
  }

 private:
  static Stack make() {
    static const size_t bytes = stack_bytes_from_env();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    Stack s;
    s.bytes = (bytes + page - 1) / page * page;
    s.mapping_bytes = s.bytes + page;
    void* m = mmap(nullptr, s.mapping_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("gam_emu: cannot map a fiber stack");
    s.mapping = static_cast<char*>(m);
    mprotect(s.mapping, page, PROT_NONE);
    s.bottom = s.mapping + page;
    return s;
  }
  std::deque<Stack> stacks_;  // deque: growing keeps Stack& valid
};

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kDone };

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
};

struct Fiber {
  Context ctx;
  Stack* stack = nullptr;
  uint3 tid;
  int linear = 0;
  int warp = 0;
  int lane = 0;
  State state = State::kRunnable;
  WarpOp op{};
  const char* bar_file = nullptr;
  int bar_line = 0;
  int bar_pred = 0;
  int bar_result = 0;
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
  Context main;
  Context* switching_from = nullptr;
  Fiber* cur = nullptr;
  uint3 block{};
  std::vector<SharedAlloc> shared;
  size_t static_smem_bytes = 0;
  void* dyn_smem = nullptr;
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
thread_local StackPool t_stacks;

std::mutex g_attr_mutex;
std::unordered_map<const void*, int>& max_dyn_smem_attr() {
  static std::unordered_map<const void*, int> m;
  return m;
}

std::string dim_str(const uint3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," +
         std::to_string(d.z) + ")";
}
std::string dim_str(const dim3& d) {
  return dim_str(uint3{d.x, d.y, d.z});
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::string site(const char* file, int line) {
  return std::string(file ? file : "?") + ":" + std::to_string(line);
}

// ---- context switching -------------------------------------------------

void after_switch(Context* self) {
  Engine& e = *t_engine;
#if GAM_EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(self->fake_stack, &bottom, &size);
  // The launching thread's stack bounds are only known once we left it.
  if (e.switching_from == &e.main) {
    e.main.stack_bottom = bottom;
    e.main.stack_size = size;
  }
#else
  (void)self;
  (void)e;
#endif
}

void switch_context(Context* from, Context* to, bool from_exits) {
  Engine& e = *t_engine;
  e.switching_from = from;
#if GAM_EMU_ASAN
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &from->fake_stack,
                                 to->stack_bottom, to->stack_size);
#else
  (void)from_exits;
#endif
#if GAM_EMU_ASM_SWITCH
  gam_emu_swap(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
  after_switch(from);
}

// Leaves `from` for fiber `next`, or for the launching context when null.
void transfer(Context* from, Fiber* next, bool from_exits) {
  Engine& e = *t_engine;
  e.cur = next;
  if (next != nullptr) {
    t_builtins.thread_idx = next->tid;
    switch_context(from, &next->ctx, from_exits);
  } else {
    switch_context(from, &e.main, from_exits);
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
  transfer(&self->ctx, pick_next(e, self->linear),
           self->state == State::kDone);
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
  for (int l = 0; l < 32; ++l) {
    if (!((parts >> l) & 1u)) continue;
    const Fiber& f = lanes[l];
    if (f.state != State::kWarp || f.op.kind != proto.kind ||
        f.op.mask != proto.mask)
      return false;
    // load/mma/store share one kind; they must not complete each other.
    if (proto.kind == WarpOpKind::kWmma && std::strcmp(f.op.what, proto.what))
      return false;
  }
  auto value_of = [&](int src) -> uint64_t {
    return (src >= 0 && src < 32 && ((parts >> src) & 1u)) ? lanes[src].op.value
                                                           : kPoison;
  };
  uint64_t ballot = 0, matched_or = 0;
  uint64_t sum = 0, umin = ~0u, umax = 0;
  int32_t imin = INT32_MAX, imax = INT32_MIN;
  int n = 0;
  for (int l = 0; l < 32; ++l) {
    if (!((parts >> l) & 1u)) continue;
    const uint64_t v = lanes[l].op.value;
    ++n;
    if (v != 0) ballot |= 1ull << l;
    sum += v & 0xffffffffu;
    umin = std::min<uint64_t>(umin, v & 0xffffffffu);
    umax = std::max<uint64_t>(umax, v & 0xffffffffu);
    imin = std::min(imin, static_cast<int32_t>(static_cast<uint32_t>(v)));
    imax = std::max(imax, static_cast<int32_t>(static_cast<uint32_t>(v)));
  }
  (void)matched_or;
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
      case WarpOpKind::kBallot: r = ballot; break;
      case WarpOpKind::kAny: r = ballot != 0; break;
      case WarpOpKind::kAll: r = __builtin_popcountll(ballot) == n; break;
      case WarpOpKind::kMatchAny: {
        for (int m = 0; m < 32; ++m)
          if (((parts >> m) & 1u) && lanes[m].op.value == f.op.value)
            r |= 1ull << m;
        break;
      }
      case WarpOpKind::kReduceAddU: r = static_cast<uint32_t>(sum); break;
      case WarpOpKind::kReduceMinU: r = umin; break;
      case WarpOpKind::kReduceMaxU: r = umax; break;
      case WarpOpKind::kReduceMinI: r = static_cast<uint32_t>(imin); break;
      case WarpOpKind::kReduceMaxI: r = static_cast<uint32_t>(imax); break;
      case WarpOpKind::kSyncWarp:
      case WarpOpKind::kWmma: break;
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

// ---- fiber body ----------------------------------------------------------

[[noreturn]] void fiber_main() {
  Engine& e = *t_engine;
  Fiber* self = e.cur;
  after_switch(&self->ctx);
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
  self->state = State::kDone;
  ++e.n_done;
  --e.n_runnable;
  on_lane_exit(e, *self);
  yield_from(self);
  std::abort();  // a finished fiber is never resumed
}

#if !GAM_EMU_ASM_SWITCH
void fiber_entry_ucontext() { fiber_main(); }
#endif

void init_fiber(Engine& e, Fiber& f, Stack& s) {
  (void)e;
#if GAM_EMU_ASAN
  // A fiber never returns from fiber_main, so the redzones of its last few
  // frames stay poisoned near the top of its stack; a fiber abandoned by a
  // faulting launch may have left them anywhere.
  if (s.dirty) {
    __asan_unpoison_memory_region(s.bottom, s.bytes);
  } else {
    const size_t top = std::min<size_t>(s.bytes, 16 * 1024);
    __asan_unpoison_memory_region(s.bottom + s.bytes - top, top);
  }
#endif
  s.dirty = false;
  f.stack = &s;
  f.ctx.stack_bottom = s.bottom;
  f.ctx.stack_size = s.bytes;
  f.ctx.fake_stack = nullptr;
#if GAM_EMU_ASM_SWITCH
  // Frame consumed by gam_emu_swap's epilogue: control words, r15..rbp, the
  // "return" address fiber_main, and a null slot standing in for
  // fiber_main's own return address (keeps the ABI's 16-byte alignment).
  uint64_t* sp = reinterpret_cast<uint64_t*>(s.bottom + s.bytes) - 9;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // rbp = 0 ends frame-pointer walks
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = s.bottom;
  f.ctx.uc.uc_stack.ss_size = s.bytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry_ucontext, 0);
#endif
}

// ---- blocks and launches -----------------------------------------------

std::string deadlock_report(const Engine& e) {
  std::ostringstream m;
  int at_bar = 0, at_warp = 0;
  const Fiber* first_bar = nullptr;
  const Fiber* first_warp = nullptr;
  for (const Fiber& f : e.fibers) {
    if (f.state == State::kBarrier) {
      ++at_bar;
      if (!first_bar) first_bar = &f;
    } else if (f.state == State::kWarp) {
      ++at_warp;
      if (!first_warp) first_warp = &f;
    }
  }
  m << "deadlock in block " << dim_str(e.block) << ": ";
  if (first_bar) {
    m << "divergent __syncthreads(): the barrier at "
      << site(first_bar->bar_file, first_bar->bar_line) << " was reached by "
      << at_bar << " of " << e.nthreads << " threads; " << e.n_done
      << " threads had already exited";
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
        seen |= s->op.line == op.line && s->op.kind == op.kind &&
                s->op.mask == op.mask && !std::strcmp(s->op.file, op.file);
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
      m << " " << op.what << " (mask " << hex(op.mask) << ") at "
        << site(op.file, op.line) << " by lanes " << hex(lanes) << ";";
    }
    m << " every non-exited lane of a mask must call the same collective "
         "with the same mask";
  } else {
    m << "no runnable thread";
  }
  return m.str();
}

void release_shared(Engine& e) {
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
    f.tid = uint3{static_cast<unsigned>(i % bd.x),
                  static_cast<unsigned>((i / bd.x) % bd.y),
                  static_cast<unsigned>(i / (bd.x * bd.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::kRunnable;
    init_fiber(e, f, t_stacks.get(i));
  }
  std::fill(e.warp_done.begin(), e.warp_done.end(), 0u);
  e.n_runnable = e.nthreads;
  e.n_done = 0;
  e.bar_arrived = 0;
  // Dynamic shared memory: one exact-size allocation per block.
  const size_t dyn = e.spec->dynamic_smem_bytes;
  if (posix_memalign(&e.dyn_smem, 16, dyn == 0 ? 1 : dyn) != 0)
    throw std::bad_alloc();
  std::memset(e.dyn_smem, 0xff, dyn == 0 ? 1 : dyn);

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
  if (e.faulted)
    throw std::runtime_error("block " + dim_str(block) + ", " + e.fault);
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
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > 1024 ||
      b.y > 1024 || b.z > 64)
    fail("block " + dim_str(b) + " (at most 1024 threads, z <= 64, none 0)");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 ||
      g.x > 2147483647u)
    fail("grid " + dim_str(g) +
         " (every dimension >= 1; y, z <= 65535); skip the launch for empty "
         "inputs");
  size_t limit = kDefaultDynamicSmemLimit;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = max_dyn_smem_attr().find(s.kernel);
    if (it != max_dyn_smem_attr().end()) limit = static_cast<size_t>(it->second);
  }
  if (s.dynamic_smem_bytes > limit)
    fail(std::to_string(s.dynamic_smem_bytes) +
         " bytes of dynamic shared memory exceed the kernel's limit of " +
         std::to_string(limit) +
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
  if (e.nthreads % 32)
    e.warp_exists.back() = (1u << (e.nthreads % 32)) - 1u;

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
    throw std::runtime_error(std::string("gam_launch(") + spec.name +
                             "): out of host memory");
  } catch (const std::exception& ex) {
    throw std::runtime_error(std::string("gam_launch(") + spec.name + "): " +
                             ex.what());
  }
}

uint64_t warp_op(WarpOpKind kind, unsigned mask, uint64_t value, int arg,
                 int width, const char* what, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr)
    trap(std::string(what) + " called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  if (!((mask >> self->lane) & 1u))
    fault_in_fiber(std::string(what) + " at " + site(file, line) + ": mask " +
                   hex(mask) + " does not include the calling lane " +
                   std::to_string(self->lane));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault_in_fiber(std::string(what) + " at " + site(file, line) +
                   ": width " + std::to_string(width) +
                   " is not a power of two in [1, 32]");
  self->op = WarpOp{kind, mask, value, arg, width, 0, what, file, line};
  self->state = State::kWarp;
  --e.n_runnable;
  if (!try_resolve(e, self->warp, self->op)) yield_from(self);
  return self->op.result;
}

int block_barrier(int mode, int predicate, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr)
    trap("__syncthreads() called outside a kernel");
  Engine& e = *ep;
  Fiber* self = e.cur;
  self->state = State::kBarrier;
  self->bar_file = file;
  self->bar_line = line;
  self->bar_pred = predicate;
  --e.n_runnable;
  if (++e.bar_arrived < e.nthreads) {
    yield_from(self);
    return self->bar_result;
  }
  // Last arrival: every thread waits here. All must be at the same call.
  int count = 0;
  for (const Fiber& f : e.fibers) {
    if (f.bar_line != self->bar_line ||
        std::strcmp(f.bar_file, self->bar_file) != 0)
      fault_in_fiber("divergent __syncthreads(): threads wait at " +
                     site(f.bar_file, f.bar_line) + " and at " +
                     site(self->bar_file, self->bar_line));
    count += f.bar_pred;
  }
  const int result = mode == 1   ? count
                     : mode == 2 ? (count == e.nthreads)
                     : mode == 3 ? (count > 0)
                                 : 0;
  for (Fiber& f : e.fibers) {
    f.state = State::kRunnable;
    f.bar_result = result;
  }
  e.n_runnable = e.nthreads;
  e.bar_arrived = 0;
  return result;
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

void* shared_array(const void* site_key, size_t bytes, size_t align,
                   const char* name, const char* file, int line) {
  Engine* ep = t_engine;
  if (ep == nullptr || ep->cur == nullptr)
    trap(std::string("GAM_SHARED(") + name + ") used outside a kernel");
  Engine& e = *ep;
  for (const SharedAlloc& a : e.shared)
    if (a.site == site_key) {
      if (a.bytes != bytes)
        fault_in_fiber(std::string("GAM_SHARED(") + name + ") at " +
                       site(file, line) + ": threads disagree on its size");
      return a.ptr;
    }
  e.static_smem_bytes += bytes;
  if (e.static_smem_bytes > kStaticSmemLimit)
    fault_in_fiber("static shared memory (" +
                   std::to_string(e.static_smem_bytes) + " bytes at GAM_SHARED(" +
                   name + ") " + site(file, line) +
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
  if (e == nullptr || e->cur == nullptr)
    trap("GAM_DYNAMIC_SHARED used outside a kernel");
  return e->dyn_smem;
}

void trap(const std::string& message) {
  Engine* e = t_engine;
  if (e != nullptr && e->cur != nullptr) fault_in_fiber(message);
  throw std::runtime_error("gam_emu: " + message);
}

namespace rt {

cudaError_t memset_async(void* ptr, int value, size_t count, cudaStream_t) {
  if (count != 0 && ptr == nullptr) return cudaErrorInvalidValue;
  if (count != 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t memcpy_async(void* dst, const void* src, size_t count,
                         cudaMemcpyKind kind, cudaStream_t) {
  if (static_cast<int>(kind) < 0 || static_cast<int>(kind) > 4)
    return cudaErrorInvalidMemcpyDirection;
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr,
                               int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxSmemOptin)
      return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    max_dyn_smem_attr()[func] = value;
  }
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  if (value == nullptr) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: {
      // Small by default so "one block per SM" grids stay cheap to emulate.
      const char* env = std::getenv("GAM_EMU_SM_COUNT");
      *value = env ? std::max(1, std::atoi(env)) : 4;
      return cudaSuccess;
    }
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(kMaxSmemOptin);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = 228 * 1024;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; return cudaSuccess;
    default: return cudaErrorInvalidValue;  // not emulated: make it visible
  }
}

cudaError_t get_device(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t get_last_error() { return cudaSuccess; }

const char* get_error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidMemcpyDirection:
      return "invalid copy direction (emulated)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    default: return "CUDA error (emulated)";
  }
}

}  // namespace rt
}  // namespace gam_emu
