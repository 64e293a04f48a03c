#include "fiber.h"

#include <cstdint>

asm(R"(
    .text
    .globl cudaemu_fiber_switch
    .hidden cudaemu_fiber_switch
    .type cudaemu_fiber_switch, @function
cudaemu_fiber_switch:
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
    .size cudaemu_fiber_switch, .-cudaemu_fiber_switch

    .globl cudaemu_fiber_start
    .hidden cudaemu_fiber_start
    .type cudaemu_fiber_start, @function
cudaemu_fiber_start:
    movq %r13, %rdi
    andq $-16, %rsp
    callq *%r12
    ud2
    .size cudaemu_fiber_start, .-cudaemu_fiber_start
)");

extern "C" void cudaemu_fiber_start();

void* fiber_prepare(void* stack, size_t size, void (*entry)(void*), void* arg) {
    auto top = reinterpret_cast<uintptr_t>(stack) + size;
    top &= ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                                  // keeps the start aligned
    *--sp = reinterpret_cast<uint64_t>(&cudaemu_fiber_start);  // where the first ret goes
    *--sp = 0;                                                  // rbp
    *--sp = 0;                                                  // rbx
    *--sp = reinterpret_cast<uint64_t>(entry);                  // r12
    *--sp = reinterpret_cast<uint64_t>(arg);                    // r13
    *--sp = 0;                                                  // r14
    *--sp = 0;                                                  // r15
    // MXCSR with every exception masked and round-to-nearest, x87 control word likewise: the
    // defaults a new thread starts with.
    *--sp = (uint64_t(0x037F) << 32) | 0x1F80;
    return sp;
}
