// Fiber stacks and context switches of the SIMT emulation layer (see fiber.h).
#include "emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if GAM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
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
namespace fiber {
namespace {

// The context the running code was switched away from (its ASan stack bounds may be unknown).
thread_local Context* t_switched_from = nullptr;
thread_local Counters t_counters;

size_t stack_bytes_from_env() {
  size_t kib = 256;
  if (const char* env = std::getenv("GAM_EMU_STACK_KB")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 16) kib = static_cast<size_t>(v);
  }
  return kib * 1024;
}

Stack make_stack() {
  static const size_t bytes = stack_bytes_from_env();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  Stack s;
  s.bytes = (bytes + page - 1) / page * page;
  s.mapping_bytes = s.bytes + page;
  void* m = mmap(nullptr, s.mapping_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("gam_emu: cannot map a fiber stack");
  ++t_counters.stacks_mapped;
  s.mapping = static_cast<char*>(m);
  mprotect(s.mapping, page, PROT_NONE);
  s.bottom = s.mapping + page;
  return s;
}

}  // namespace

StackPool::~StackPool() {
  for (Stack& s : stacks_) munmap(s.mapping, s.mapping_bytes);
}

Stack& StackPool::get(size_t i) {
  while (stacks_.size() <= i) stacks_.push_back(make_stack());
  return stacks_[i];
}

void prepare(Context& ctx, Stack& s, void (*entry)()) {
#if GAM_EMU_ASAN
  // A fiber never returns from its entry function, so the redzones of its last few frames stay
  // poisoned near the top of its stack; a fiber abandoned by a faulting launch may have left
  // them anywhere.
  if (s.dirty) {
    __asan_unpoison_memory_region(s.bottom, s.bytes);
  } else {
    const size_t top = std::min<size_t>(s.bytes, 16 * 1024);
    __asan_unpoison_memory_region(s.bottom + s.bytes - top, top);
  }
#endif
  s.dirty = false;
  ctx.stack_bottom = s.bottom;
  ctx.stack_size = s.bytes;
  ctx.fake_stack = nullptr;
#if GAM_EMU_ASM_SWITCH
  // Frame consumed by gam_emu_swap's epilogue: control words, r15..rbp, the "return" address
  // entry, and a null slot standing in for entry's own return address (keeps the ABI's 16-byte
  // alignment).
  uint64_t* sp = reinterpret_cast<uint64_t*>(s.bottom + s.bytes) - 9;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // rbp = 0 ends frame-pointer walks
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;
  ctx.sp = sp;
#else
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = s.bottom;
  ctx.uc.uc_stack.ss_size = s.bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
#endif
}

void started(Context* self) {
#if GAM_EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(self->fake_stack, &bottom, &size);
  // The launching thread's stack bounds are only known once we have left it.
  Context* from = t_switched_from;
  if (from != nullptr && from->stack_bottom == nullptr) {
    from->stack_bottom = bottom;
    from->stack_size = size;
  }
#else
  (void)self;
#endif
}

Counters counters() { return t_counters; }

void switch_to(Context* from, Context* to, bool from_exits) {
  t_switched_from = from;
  ++t_counters.switches;
#if GAM_EMU_ASAN
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &from->fake_stack, to->stack_bottom,
                                 to->stack_size);
#else
  (void)from_exits;
#endif
#if GAM_EMU_ASM_SWITCH
  gam_emu_swap(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
  started(from);
}

}  // namespace fiber
}  // namespace gam_emu
