// Fibers: a block's threads, each with its own stack, switched by hand. glibc's swapcontext
// saves and restores the signal mask with a system call at every switch; a block of 256
// threads with a dozen barriers makes thousands of switches, so we save only what the x86-64
// System V ABI says a callee must preserve (rbx, rbp, r12-r15, the stack pointer, and the
// MXCSR and x87 control words) and jump.
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#error "cudaemu's fibers are written for x86-64"
#endif

extern "C" {
// Saves the running context's stack pointer in *save and resumes the one whose stack pointer
// is `resume` (as saved by an earlier switch, or prepared by fiber_prepare).
void cudaemu_fiber_switch(void** save, void* resume);
}

// Lays out a fresh stack [stack, stack + size) so that switching to the returned stack pointer
// calls entry(arg) on it. `entry` must never return.
void* fiber_prepare(void* stack, size_t size, void (*entry)(void*), void* arg);
