// Fibers of the SIMT emulation layer (internal to csrc/emu, never included by kernels): stacks
// and context switches for the threads of an emulated block.
//
// On x86-64 a switch is a few instructions of assembly (swapcontext makes a signal-mask syscall
// per switch, ~10x slower); elsewhere, or with -DGAM_EMU_USE_UCONTEXT, ucontext is used. Switches
// are annotated for AddressSanitizer so that it knows which stack is live.
#pragma once

#include <cstddef>
#include <deque>

#if defined(__SANITIZE_ADDRESS__)
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

namespace gam_emu {
namespace fiber {

// A suspended execution context: a fiber's, or the launching thread's own (whose stack bounds
// are learnt on the first switch away from it).
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

// Stacks are mmap'ed once per OS thread and reused by later launches, with a PROT_NONE guard
// page below each so that an overflow faults instead of corrupting a neighbour.
struct Stack {
  char* mapping = nullptr;
  size_t mapping_bytes = 0;
  char* bottom = nullptr;  // lowest usable address
  size_t bytes = 0;
  bool dirty = false;  // abandoned mid-kernel: ASan shadow may be poisoned
};

class StackPool {
 public:
  ~StackPool();
  Stack& get(size_t i);

 private:
  std::deque<Stack> stacks_;  // deque: growing keeps Stack& valid
};

// Makes ctx start entry() on stack s when it is first switched to. entry never returns.
void prepare(Context& ctx, Stack& s, void (*entry)());

// Suspends `from` and resumes `to`; from_exits: `from` is never resumed.
void switch_to(Context* from, Context* to, bool from_exits);

// The first call of a fiber's entry function, with the fiber's own context.
void started(Context* self);

// What the calling OS thread has done so far: context switches and stacks mapped. The emulator's
// self-tests check its cost model with them (a switch per thread per barrier, stacks reused
// across blocks and launches) instead of timing it.
struct Counters {
  unsigned long long switches = 0;
  unsigned long long stacks_mapped = 0;
};
Counters counters();
constexpr bool kAsmSwitch = GAM_EMU_ASM_SWITCH;

}  // namespace fiber
}  // namespace gam_emu
