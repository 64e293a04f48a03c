// The emulated CUDA driver (libcuda.so): one device whose memory is the host's, and kernels run
// on the calling thread when they are launched. Streams are in-order queues, and since work
// runs as it is queued, a stream is always idle; events record the time they were reached.
//
// Strictness, so that what fails on a GPU fails here, reported through the driver's error codes:
//   - launches a GPU refuses: more than 1024 threads a block, block or grid dimensions out of
//     range, dynamic shared memory above 48 KiB without the opt-in attribute (227 KiB with it),
//     static and dynamic shared memory together above the limit, kernel arguments above
//     32,764 bytes (the CUDA 12.1+ limit), a null pointer among the kernel's arguments;
//   - calls without a current context, unknown handles, copies outside a live allocation;
//   - memory: each allocation ends at a guard page and a freed one is made inaccessible, so a
//     kernel that reads or writes past the end, or uses freed memory, faults; the fault is caught
//     and reported as CUDA_ERROR_ILLEGAL_ADDRESS. Fresh allocations and shared memory are filled
//     with NaN bytes, as a GPU's are with garbage;
//   - a __syncthreads that not every thread of the block reaches, a shuffle whose lanes have
//     returned or wait elsewhere: CUDA_ERROR_LAUNCH_FAILED, with the kernel, block and thread
//     on stderr.
// An error found while a kernel runs is returned by the next call on the context, as a GPU's
// asynchronous errors are (it is not sticky: the context stays usable).
//
// Races: CUDAEMU_ORDER=forward (default), reverse or random:SEED runs the blocks of a launch and
// the threads between two barriers in that order; a kernel whose output depends on the order
// has a race.
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define CUDAEMU_DRIVER
#include "../include/cudaemu_device.h"
#include "fiber.h"

#define API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
struct Context;
struct Stream;
struct Event;
struct Module;
struct Function;
typedef Context* CUcontext;
typedef Stream* CUstream;
typedef Event* CUevent;
typedef Module* CUmodule;
typedef Function* CUfunction;
typedef void* CUmemoryPool;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace {

constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
constexpr size_t kOptInSharedLimit = 227 * 1024;
constexpr size_t kParamLimit = 32764;
constexpr size_t kFiberStack = 256 * 1024;
constexpr size_t kQuarantine = 2048;

std::mutex g_lock;  // all state below; a launch holds it from start to end
bool g_initialized = false;

size_t page_size() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}
size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

void report(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cudaemu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

// ---------------------------------------------------------------------------------------------
// Memory: every allocation is placed so that it ends (rounded up to 16 bytes) where a guard
// page begins. Freed allocations are made inaccessible and kept in a quarantine, so that a
// stale pointer faults instead of reading the next tensor.

struct Allocation {
    char* map_base;
    size_t map_len;
    char* user;
    size_t bytes;
};
std::map<uintptr_t, Allocation> g_live;  // by user address
std::deque<Allocation> g_freed;
size_t g_live_bytes = 0;

char* allocate(size_t bytes) {
    size_t body = round_up(std::max<size_t>(bytes, 1), 16);
    size_t data_pages = round_up(body, page_size());
    size_t map_len = data_pages + page_size();
    void* base = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
    if (base == MAP_FAILED) return nullptr;
    if (mprotect(base, data_pages, PROT_READ | PROT_WRITE) != 0) {
        munmap(base, map_len);
        return nullptr;
    }
    char* user = static_cast<char*>(base) + data_pages - body;
    memset(user, 0xFF, body);  // NaN in every f32: uninitialised memory is not zero on a GPU
    g_live[(uintptr_t)user] = Allocation{static_cast<char*>(base), map_len, user, bytes};
    g_live_bytes += bytes;
    return user;
}

bool release(CUdeviceptr ptr) {
    auto it = g_live.find((uintptr_t)ptr);
    if (it == g_live.end()) return false;
    Allocation a = it->second;
    g_live.erase(it);
    g_live_bytes -= a.bytes;
    mprotect(a.map_base, a.map_len, PROT_NONE);
    g_freed.push_back(a);
    if (g_freed.size() > kQuarantine) {
        munmap(g_freed.front().map_base, g_freed.front().map_len);
        g_freed.pop_front();
    }
    return true;
}

// Whether [ptr, ptr + bytes) lies inside one live allocation.
bool in_live_allocation(CUdeviceptr ptr, size_t bytes) {
    auto it = g_live.upper_bound((uintptr_t)ptr);
    if (it == g_live.begin()) return false;
    --it;
    const Allocation& a = it->second;
    uintptr_t start = (uintptr_t)a.user;
    return ptr >= start && bytes <= a.bytes && ptr - start <= a.bytes - bytes;
}

// ---------------------------------------------------------------------------------------------
// Handles (declared outside the anonymous namespace: the API's handle types point to them).

}  // namespace

struct Context {
    int refs = 0;
    CUresult pending = CUDA_SUCCESS;  // an error of a kernel, returned by the next call
};
struct Stream {
    Context* ctx;
};
struct Event {
    std::chrono::steady_clock::time_point at{};
    bool recorded = false;
};
struct Module {
    void* handle = nullptr;
    cudaemu_block_state* state = nullptr;
    char* shared_begin = nullptr;
    char* shared_end = nullptr;
    std::map<std::string, std::unique_ptr<Function>> functions;
};
struct Function {
    Module* module;
    std::string name;
    void (*entry)(void**);
    const unsigned long long* params;  // count, then (size, alignment) per parameter
    size_t max_dynamic_shared = kDefaultDynamicSharedLimit;
};

namespace {

Context g_context;  // the primary context of device 0
thread_local Context* t_current = nullptr;
Stream g_null_stream{&g_context};
std::vector<std::unique_ptr<Stream>> g_streams;
std::vector<std::unique_ptr<Module>> g_modules;
std::vector<std::unique_ptr<Event>> g_events;
int g_mempool_dummy;

template <typename T>
bool owns(const std::vector<std::unique_ptr<T>>& v, const T* p) {
    for (auto& x : v)
        if (x.get() == p) return true;
    return false;
}

// Destroys the handle `p` of `v`; false when `v` holds no such handle.
template <typename T>
bool destroy(std::vector<std::unique_ptr<T>>& v, const T* p) {
    for (auto it = v.begin(); it != v.end(); ++it) {
        if (it->get() == p) {
            v.erase(it);
            return true;
        }
    }
    return false;
}

// The check at the top of every call that needs a context: initialised, a context current,
// and no error left over from a kernel.
CUresult enter() {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    if (t_current->pending != CUDA_SUCCESS) {
        CUresult e = t_current->pending;
        t_current->pending = CUDA_SUCCESS;
        return e;
    }
    return CUDA_SUCCESS;
}

bool valid_stream(CUstream s) { return s == nullptr || s == &g_null_stream || owns(g_streams, s); }

// ---------------------------------------------------------------------------------------------
// Kernel execution: the blocks one after another; in a block, every thread a fiber.

enum class ThreadState { Runnable, AtBarrier, AtWarp, Done };

struct Thread {
    void* sp = nullptr;
    ThreadState state = ThreadState::Runnable;
    cudaemu_dim3 idx{};
    unsigned linear = 0;
    unsigned warp_mask = 0;  // the mask of the warp operation it waits in
};

// A warp's exchange: each lane posts its value when it arrives at a warp operation; when the
// operation's group is complete, the posted values are delivered, and the lanes read them as
// they resume (all in the next pass, before any later delivery to this warp).
struct Warp {
    unsigned long long posted[32] = {};
    unsigned long long delivered[32] = {};
    unsigned delivered_lanes = 0;  // lanes whose value the last delivery holds
    unsigned present = 0;          // lanes that exist (a last warp may be partial)
};

enum class Order { Forward, Reverse, Random };

struct Launch {
    Function* fn = nullptr;
    void** params = nullptr;
    cudaemu_dim3 grid{}, block{};
    unsigned thread_count = 0;
    std::vector<Thread> thread;  // the block's threads, by linear index
    std::vector<Warp> warps;
    std::vector<unsigned> order;
    size_t pass_position = 0;  // where in `order` the current pass is
    unsigned current = 0;
    void* scheduler_sp = nullptr;
    cudaemu_dim3 block_idx{};
    std::string error;  // set by a thread or the scheduler; stops the launch
    CUresult error_code = CUDA_SUCCESS;
};

Launch* g_launch = nullptr;  // the launch running now (under g_lock)
std::vector<char*> g_stacks;  // fiber stacks, reused between launches
char* g_dynamic_shared = nullptr;
size_t g_dynamic_shared_len = 0;
Order g_order = Order::Forward;
unsigned long long g_seed = 0;
bool g_order_from_env = false;
std::mt19937_64 g_rng;

// Where a fault in a kernel jumps to, and on which thread. Plain globals, not thread-locals:
// launches take turns (g_lock), and a thread-local of a library loaded with dlopen may need
// an allocation on first access, which a signal handler must not make.
sigjmp_buf* volatile g_fault_jump = nullptr;
volatile pid_t g_fault_thread = 0;
volatile sig_atomic_t g_fault_signal = 0;
void* volatile g_fault_address = nullptr;
struct sigaction g_previous_segv, g_previous_bus;

void fault_handler(int sig, siginfo_t* info, void* ucontext) {
    if (g_fault_jump && g_fault_thread == (pid_t)syscall(SYS_gettid)) {
        g_fault_signal = sig;
        g_fault_address = info ? info->si_addr : nullptr;
        siglongjmp(*g_fault_jump, 1);
    }
    // Not ours: hand the signal to whoever handled it before, as if we were not here.
    const struct sigaction& prev = sig == SIGSEGV ? g_previous_segv : g_previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) {
            prev.sa_sigaction(sig, info, ucontext);
            return;
        }
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler) {
        prev.sa_handler(sig);
        return;
    }
    sigaction(sig, &prev, nullptr);  // default action: the fault happens again and kills
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_previous_segv);
        sigaction(SIGBUS, &sa, &g_previous_bus);
    });
    // A fiber that overflows its stack faults with no stack left: the handler needs its own.
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
        stack_t alt;
        alt.ss_size = 64 * 1024;
        alt.ss_sp = malloc(alt.ss_size);  // one per thread that launches, kept for its life
        alt.ss_flags = 0;
        if (alt.ss_sp) sigaltstack(&alt, nullptr);
    }
}

// Reads an order (forward, reverse, random:SEED); false for anything else.
bool parse_order(const char* v) {
    if (!v || !*v || strcmp(v, "forward") == 0) {
        g_order = Order::Forward;
    } else if (strcmp(v, "reverse") == 0) {
        g_order = Order::Reverse;
    } else if (strncmp(v, "random", 6) == 0 && (v[6] == 0 || v[6] == ':')) {
        g_order = Order::Random;
        g_seed = v[6] == ':' ? strtoull(v + 7, nullptr, 10) : 0;
    } else {
        return false;
    }
    g_rng.seed(g_seed);
    return true;
}

void read_order_from_env() {
    const char* v = getenv("CUDAEMU_ORDER");
    if (!parse_order(v)) {
        report("CUDAEMU_ORDER=%s is not forward, reverse or random:SEED; using forward", v);
        parse_order("forward");
    }
}

void arrange(std::vector<unsigned>& order, unsigned n) {
    order.resize(n);
    for (unsigned i = 0; i < n; i++) order[i] = i;
    if (g_order == Order::Reverse) std::reverse(order.begin(), order.end());
    if (g_order == Order::Random) std::shuffle(order.begin(), order.end(), g_rng);
}

void fail(Launch& l, CUresult code, const std::string& what) {
    if (l.error.empty()) {
        l.error = what;
        l.error_code = code;
    }
}

std::string thread_name(const Launch& l, const Thread& t) {
    char buf[160];
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", l.block_idx.x, l.block_idx.y,
             l.block_idx.z, t.idx.x, t.idx.y, t.idx.z);
    return buf;
}

void set_coordinates(Launch& l, const Thread& t);

// From the running fiber (its stack pointer saved in *save) straight to the next runnable
// thread of this pass, or back to the scheduler when the pass is over or the launch failed:
// one switch per thread resumed instead of two through the scheduler.
void resume_next(void** save) {
    Launch& l = *g_launch;
    if (l.error.empty()) {
        while (++l.pass_position < l.order.size()) {
            unsigned i = l.order[l.pass_position];
            if (l.thread[i].state == ThreadState::Runnable) {
                l.current = i;
                set_coordinates(l, l.thread[i]);
                cudaemu_fiber_switch(save, l.thread[i].sp);
                return;
            }
        }
    }
    cudaemu_fiber_switch(save, l.scheduler_sp);
}

// Gives up the processor, from the running fiber, until the scheduler makes it runnable again.
void yield_to_scheduler() {
    Launch& l = *g_launch;
    resume_next(&l.thread[l.current].sp);
}

void fiber_main(void* arg) {
    Launch& l = *static_cast<Launch*>(arg);
    l.fn->entry(l.params);
    l.thread[l.current].state = ThreadState::Done;
    yield_to_scheduler();
    __builtin_unreachable();
}

// Stops the launch with `what`; the fiber is never resumed.
[[noreturn]] void abort_launch(const std::string& what) {
    Launch& l = *g_launch;
    fail(l, CUDA_ERROR_LAUNCH_FAILED, thread_name(l, l.thread[l.current]) + ": " + what);
    yield_to_scheduler();
    __builtin_unreachable();
}

void rt_syncthreads() {
    Launch& l = *g_launch;
    l.thread[l.current].state = ThreadState::AtBarrier;
    yield_to_scheduler();
}

// Posts `bits` and waits until every lane of `mask` in this thread's warp has arrived at an
// operation with the same mask (or has returned from the kernel).
void warp_meet(unsigned mask, unsigned long long bits) {
    Launch& l = *g_launch;
    Thread& t = l.thread[l.current];
    Warp& w = l.warps[t.linear / 32];
    unsigned lane = t.linear % 32;
    char buf[96];
    if (!(mask >> lane & 1u)) {
        snprintf(buf, sizeof buf, "warp operation with mask 0x%08x, which leaves out lane %u", mask,
                 lane);
        abort_launch(buf);
    }
    if (mask & ~w.present) {
        snprintf(buf, sizeof buf, "warp operation's mask 0x%08x names lanes that do not exist",
                 mask);
        abort_launch(buf);
    }
    w.posted[lane] = bits;
    t.warp_mask = mask;
    t.state = ThreadState::AtWarp;
    yield_to_scheduler();
}

void rt_syncwarp(unsigned mask) { warp_meet(mask, 0); }

unsigned long long rt_shfl(unsigned mask, unsigned long long bits, int kind, int arg, int width) {
    Launch& l = *g_launch;
    Thread& t = l.thread[l.current];
    if (width <= 0 || width > 32 || (width & (width - 1)))
        abort_launch("shuffle width is not a power of 2 up to 32");
    warp_meet(mask, bits);
    // The source lane as PTX's shfl.sync computes it: within the lane's segment of `width`
    // lanes, only the low 5 bits of a delta or xor mask counting; out of range, the own lane.
    int lane = (int)(t.linear % 32), base = lane & ~(width - 1), src = lane;
    switch (kind) {
        case CUDAEMU_SHFL_IDX: src = base + (arg & (width - 1)); break;
        case CUDAEMU_SHFL_UP: src = lane - (arg & 31) >= base ? lane - (arg & 31) : lane; break;
        case CUDAEMU_SHFL_DOWN:
            src = lane + (arg & 31) < base + width ? lane + (arg & 31) : lane;
            break;
        default: src = (lane ^ (arg & 31)) < base + width ? (lane ^ (arg & 31)) : lane; break;
    }
    const Warp& w = l.warps[t.linear / 32];
    char buf[96];
    if (!(mask >> src & 1u)) {
        snprintf(buf, sizeof buf, "shuffle reads lane %d, which is not in its mask 0x%08x", src,
                 mask);
        abort_launch(buf);
    }
    if (!(w.delivered_lanes >> src & 1u)) {
        snprintf(buf, sizeof buf, "shuffle reads lane %d, which has returned from the kernel", src);
        abort_launch(buf);
    }
    return w.delivered[src];
}

void rt_trap(const char* what) { abort_launch(what); }

const cudaemu_runtime g_runtime = {rt_syncthreads, rt_syncwarp, rt_shfl, rt_trap};

void set_coordinates(Launch& l, const Thread& t) {
    cudaemu_block_state* s = l.fn->module->state;
    s->threadIdx = t.idx;
    s->blockIdx = l.block_idx;
}

// Runs one block to its end or to the first error.
void run_block(Launch& l) {
    for (unsigned i = 0; i < l.thread_count; i++) {
        Thread& t = l.thread[i];
        t = Thread{};
        t.linear = i;
        t.idx = {i % l.block.x, i / l.block.x % l.block.y, i / (l.block.x * l.block.y)};
        t.sp = fiber_prepare(g_stacks[i], kFiberStack, fiber_main, &l);
    }
    for (auto& w : l.warps) w.present = 0;
    for (unsigned i = 0; i < l.thread_count; i++) l.warps[i / 32].present |= 1u << (i % 32);

    for (;;) {
        // One pass: every runnable thread in turn, each running until it blocks or returns and
        // then resuming the next one itself (resume_next); the last comes back here.
        arrange(l.order, l.thread_count);
        for (l.pass_position = 0; l.pass_position < l.order.size(); l.pass_position++) {
            unsigned i = l.order[l.pass_position];
            if (l.thread[i].state != ThreadState::Runnable) continue;
            l.current = i;
            set_coordinates(l, l.thread[i]);
            cudaemu_fiber_switch(&l.scheduler_sp, l.thread[i].sp);
            break;
        }
        if (!l.error.empty()) return;
        // Every thread now waits at a barrier or a warp operation, or is done.
        unsigned done = 0, at_barrier = 0;
        for (const Thread& t : l.thread) {
            done += t.state == ThreadState::Done;
            at_barrier += t.state == ThreadState::AtBarrier;
        }
        if (done == l.thread_count) return;
        bool released = false;
        for (unsigned w = 0; w < l.warps.size(); w++) {
            // A group, the lanes waiting with one mask, goes on once every lane of the mask
            // has arrived with that mask or returned (returned lanes count as arrived, as on a
            // GPU; reading a returned lane's value is the error, in rt_shfl).
            Warp& warp = l.warps[w];
            unsigned waiting = 0, gone = 0;
            for (unsigned lane = 0; lane < 32; lane++) {
                if (!(warp.present >> lane & 1u)) continue;
                ThreadState st = l.thread[w * 32 + lane].state;
                if (st == ThreadState::AtWarp) waiting |= 1u << lane;
                if (st == ThreadState::Done) gone |= 1u << lane;
            }
            bool delivered_now = false;
            while (waiting) {
                unsigned mask = l.thread[w * 32 + __builtin_ctz(waiting)].warp_mask, group = 0;
                for (unsigned lane = 0; lane < 32; lane++)
                    if ((waiting >> lane & 1u) && l.thread[w * 32 + lane].warp_mask == mask)
                        group |= 1u << lane;
                waiting &= ~group;
                if (mask & ~(group | gone)) continue;  // lanes still elsewhere
                if (!delivered_now) warp.delivered_lanes = 0;
                delivered_now = true;
                for (unsigned lane = 0; lane < 32; lane++) {
                    if (!(group >> lane & 1u)) continue;
                    warp.delivered[lane] = warp.posted[lane];
                    l.thread[w * 32 + lane].state = ThreadState::Runnable;
                }
                warp.delivered_lanes |= group;
                released = true;
            }
        }
        if (released) continue;
        if (at_barrier > 0 && at_barrier + done == l.thread_count) {
            if (done > 0) {
                const Thread* gone = nullptr;
                for (const Thread& t : l.thread)
                    if (t.state == ThreadState::Done) { gone = &t; break; }
                fail(l, CUDA_ERROR_LAUNCH_FAILED,
                     "__syncthreads not reached by every thread of the block: " +
                         thread_name(l, *gone) + " returned while others wait at the barrier");
                return;
            }
            for (Thread& t : l.thread) t.state = ThreadState::Runnable;
            continue;
        }
        // Nothing can go on: threads wait at __syncthreads while others wait at a warp
        // operation, or a warp operation waits for lanes that are at another one.
        const Thread* barrier = nullptr;
        const Thread* warp = nullptr;
        for (const Thread& t : l.thread) {
            if (!barrier && t.state == ThreadState::AtBarrier) barrier = &t;
            if (!warp && t.state == ThreadState::AtWarp) warp = &t;
        }
        std::string what = "deadlock: ";
        if (barrier) what += thread_name(l, *barrier) + " waits at __syncthreads";
        if (barrier && warp) what += " while ";
        if (warp) {
            char mask[48];
            snprintf(mask, sizeof mask, " (mask 0x%08x)", warp->warp_mask);
            what += thread_name(l, *warp) + " waits at a warp operation" + mask +
                    " for lanes that wait elsewhere";
        }
        fail(l, CUDA_ERROR_LAUNCH_FAILED, what);
        return;
    }
}

CUresult run_launch(Launch& l, size_t dynamic_shared) {
    // Fiber stacks (with a guard page below each) and the dynamic shared memory, reused.
    while (g_stacks.size() < l.thread_count) {
        size_t len = kFiberStack + page_size();
        void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
        mprotect(p, page_size(), PROT_NONE);
        g_stacks.push_back(static_cast<char*>(p) + page_size());
    }
    // The buffer only grows (launches alternate between sizes); its used part is the end.
    size_t shared_len = round_up(std::max<size_t>(dynamic_shared, 16), page_size());
    if (shared_len > g_dynamic_shared_len) {
        if (g_dynamic_shared) munmap(g_dynamic_shared, g_dynamic_shared_len + page_size());
        void* p = mmap(nullptr, shared_len + page_size(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
        mprotect(static_cast<char*>(p) + shared_len, page_size(), PROT_NONE);
        g_dynamic_shared = static_cast<char*>(p);
        g_dynamic_shared_len = shared_len;
    }
    // The requested bytes end at the guard page: reading past them faults.
    char* dynamic = g_dynamic_shared + g_dynamic_shared_len -
                    round_up(std::max<size_t>(dynamic_shared, 1), 16);

    l.thread.resize(l.thread_count);
    l.warps.resize((l.thread_count + 31) / 32);
    cudaemu_block_state* s = l.fn->module->state;
    s->blockDim = l.block;
    s->gridDim = l.grid;
    s->dynamic_smem = dynamic_shared ? dynamic : nullptr;
    s->rt = &g_runtime;

    // The blocks' order as arithmetic on the block index, so that a grid of 2^31 blocks needs
    // no list: forward, reverse, or a random affine permutation b -> (a·b + c) mod blocks with
    // a coprime to the block count.
    unsigned long long blocks = (unsigned long long)l.grid.x * l.grid.y * l.grid.z;
    unsigned long long stride = 1, offset = 0;
    if (g_order == Order::Reverse) {
        stride = blocks - 1;  // -1 mod blocks
        offset = blocks - 1;
    } else if (g_order == Order::Random && blocks > 1) {
        stride = 1 + g_rng() % (blocks - 1);
        while (std::gcd(stride, blocks) != 1) stride = stride % (blocks - 1) + 1;
        offset = g_rng() % blocks;
    }
    const cudaemu_block_state launch_state = *s;

    install_fault_handler();
    sigjmp_buf jump;
    g_launch = &l;
    // However this function is left (an exception included), no fault jumps here afterwards.
    struct Scope {
        ~Scope() {
            g_fault_jump = nullptr;
            g_launch = nullptr;
        }
    } scope;
    if (sigsetjmp(jump, 1) != 0) {
        g_fault_jump = nullptr;
        g_launch = nullptr;
        report("kernel %s, block (%u,%u,%u): %s at address %p (outside every live allocation, "
               "past the end of shared memory, or beyond a thread's 256 KiB stack)",
               l.fn->name.c_str(), l.block_idx.x, l.block_idx.y, l.block_idx.z,
               g_fault_signal == SIGBUS ? "bus error" : "illegal memory access",
               (void*)g_fault_address);
        return CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    g_fault_thread = (pid_t)syscall(SYS_gettid);
    g_fault_jump = &jump;
    for (unsigned long long b = 0; b < blocks; b++) {
        unsigned long long id = (unsigned long long)(((unsigned __int128)stride * b + offset) % blocks);
        l.block_idx = {(unsigned)(id % l.grid.x), (unsigned)(id / l.grid.x % l.grid.y),
                       (unsigned)(id / ((unsigned long long)l.grid.x * l.grid.y))};
        if (l.fn->module->shared_end > l.fn->module->shared_begin)
            memset(l.fn->module->shared_begin, 0xFF,
                   l.fn->module->shared_end - l.fn->module->shared_begin);
        if (dynamic_shared) memset(dynamic, 0xFF, dynamic_shared);
        run_block(l);
        if (!l.error.empty()) break;
        // The module's state lies in memory next to its static shared arrays: a write past
        // the end of one lands there.
        if (memcmp(&s->blockDim, &launch_state.blockDim, sizeof s->blockDim) != 0 ||
            memcmp(&s->gridDim, &launch_state.gridDim, sizeof s->gridDim) != 0 ||
            s->dynamic_smem != launch_state.dynamic_smem || s->rt != launch_state.rt) {
            fail(l, CUDA_ERROR_ILLEGAL_ADDRESS,
                 "block (" + std::to_string(l.block_idx.x) + "," + std::to_string(l.block_idx.y) +
                     "," + std::to_string(l.block_idx.z) +
                     ") wrote past the end of a __shared__ array (over the module's own state)");
            *s = launch_state;
            break;
        }
    }
    g_fault_jump = nullptr;
    g_launch = nullptr;
    if (!l.error.empty()) {
        report("kernel %s: %s", l.fn->name.c_str(), l.error.c_str());
        return l.error_code;
    }
    return CUDA_SUCCESS;
}

}  // namespace

// =============================================================================================
// The driver API.

API CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (e) {
        case CUDA_SUCCESS: *s = "no error"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "initialization error"; break;
        case CUDA_ERROR_NO_DEVICE: *s = "no CUDA-capable device is detected"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "device kernel image is invalid"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "invalid device context"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "invalid resource handle"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
        case CUDA_ERROR_NOT_READY: *s = "device not ready"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "too many resources requested for launch"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "unspecified launch failure"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "operation not supported"; break;
        default: *s = "unknown error"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (!g_initialized) {
        g_initialized = true;
        if (!g_order_from_env) {
            read_order_from_env();
            g_order_from_env = true;
        }
    }
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "cudaemu (CUDA emulated on the CPU)");
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(void* uuid, CUdevice d) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    memcpy(uuid, "cudaemu-device-0", 16);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid_v2(void* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

namespace {
// (free, total) host memory in bytes, from /proc/meminfo.
void host_memory(size_t* free_bytes, size_t* total_bytes) {
    *free_bytes = 0;
    *total_bytes = 0;
    FILE* f = fopen("/proc/meminfo", "r");
    if (!f) return;
    char key[64];
    unsigned long long kb;
    while (fscanf(f, "%63s %llu kB\n", key, &kb) == 2) {
        if (strcmp(key, "MemTotal:") == 0) *total_bytes = kb * 1024;
        if (strcmp(key, "MemAvailable:") == 0) *free_bytes = kb * 1024;
    }
    fclose(f);
}
}  // namespace

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    size_t free_bytes;
    host_memory(&free_bytes, bytes);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice d) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
        case 1: *value = 1024; break;                          // max threads per block
        case 2: case 3: *value = 1024; break;                  // max block dim x, y
        case 4: *value = 64; break;                            // max block dim z
        case 5: *value = 2147483647; break;                    // max grid dim x
        case 6: case 7: *value = 65535; break;                 // max grid dim y, z
        case 8: *value = (int)kStaticSharedLimit; break;       // shared memory per block
        case 10: *value = 32; break;                           // warp size
        case 16: *value = 1; break;                            // multiprocessors
        case 41: *value = 1; break;                            // unified addressing
        case 75: *value = 9; break;                            // compute capability major
        case 76: *value = 0; break;                            // compute capability minor
        case 97: *value = (int)kOptInSharedLimit; break;       // opt-in shared per block
        case 115: *value = 1; break;                           // memory pools supported
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(g_lock);
    g_context.refs++;
    *ctx = &g_context;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(g_lock);
    if (g_context.refs > 0) g_context.refs--;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx && ctx != &g_context) return CUDA_ERROR_INVALID_CONTEXT;
    t_current = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize() {
    std::lock_guard<std::mutex> g(g_lock);
    return enter();
}

API CUresult cuCtxSetFlags(unsigned) {
    std::lock_guard<std::mutex> g(g_lock);
    return enter();
}

API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
    if (!free_bytes || !total_bytes) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    host_memory(free_bytes, total_bytes);
    return CUDA_SUCCESS;
}

// --- Streams and events ----------------------------------------------------------------------

API CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    g_streams.push_back(std::unique_ptr<Stream>(new Stream{t_current}));
    *s = g_streams.back().get();
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}

API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}

API CUresult cuStreamDestroy_v2(CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    return destroy(g_streams, s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuStreamSynchronize(CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    return valid_stream(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }

API CUresult cuStreamWaitEvent(CUstream s, CUevent ev, unsigned) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_stream(s) || !owns(g_events, ev)) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

API CUresult cuEventCreate(CUevent* ev, unsigned) {
    if (!ev) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    g_events.push_back(std::unique_ptr<Event>(new Event));
    *ev = g_events.back().get();
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(CUevent ev) {
    std::lock_guard<std::mutex> g(g_lock);
    return destroy(g_events, ev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuEventRecord(CUevent ev, CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!owns(g_events, ev) || !valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    ev->at = std::chrono::steady_clock::now();
    ev->recorded = true;
    return CUDA_SUCCESS;
}

API CUresult cuEventSynchronize(CUevent ev) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    return owns(g_events, ev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuEventQuery(CUevent ev) { return cuEventSynchronize(ev); }

API CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!owns(g_events, start) || !owns(g_events, end)) return CUDA_ERROR_INVALID_HANDLE;
    if (!start->recorded || !end->recorded) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    return cuEventElapsedTime(ms, start, end);
}

// --- Memory ------------------------------------------------------------------------------------

API CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    if (!ptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    char* p = allocate(bytes);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream s) {
    {
        std::lock_guard<std::mutex> g(g_lock);
        if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    }
    return cuMemAlloc_v2(ptr, bytes);
}

// Frees first, then reports a kernel's pending error: the memory is released either way.
API CUresult cuMemFree_v2(CUdeviceptr ptr) {
    std::lock_guard<std::mutex> g(g_lock);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    bool freed = ptr == 0 || release(ptr);
    if (CUresult e = enter()) return e;
    return freed ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream s) {
    {
        std::lock_guard<std::mutex> g(g_lock);
        if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    }
    return cuMemFree_v2(ptr);
}

API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &g_mempool_dummy;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) {
    return cuDeviceGetDefaultMemPool(pool, d);
}

API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int, void* value) {
    if (pool != &g_mempool_dummy) return CUDA_ERROR_INVALID_HANDLE;
    return value ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int, void* value) {
    if (pool != &g_mempool_dummy) return CUDA_ERROR_INVALID_HANDLE;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    *static_cast<unsigned long long*>(value) = 0;
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t) {
    return pool == &g_mempool_dummy ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

namespace {
CUresult checked_copy(void* dst, const void* src, size_t bytes, bool dst_device, bool src_device,
                      CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!dst || !src) return CUDA_ERROR_INVALID_VALUE;
    if (dst_device && !in_live_allocation((CUdeviceptr)dst, bytes)) return CUDA_ERROR_INVALID_VALUE;
    if (src_device && !in_live_allocation((CUdeviceptr)src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    memmove(dst, src, bytes);
    return CUDA_SUCCESS;
}
}  // namespace

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return checked_copy((void*)dst, src, n, true, false, s);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return checked_copy((void*)dst, src, n, true, false, nullptr);
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return checked_copy(dst, (const void*)src, n, false, true, s);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return checked_copy(dst, (const void*)src, n, false, true, nullptr);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return checked_copy((void*)dst, (const void*)src, n, true, true, s);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return checked_copy((void*)dst, (const void*)src, n, true, true, nullptr);
}

API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    if (!in_live_allocation(dst, n)) return CUDA_ERROR_INVALID_VALUE;
    memset((void*)dst, value, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    return cuMemsetD8Async(dst, value, n, nullptr);
}

API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, CUstream s) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    if (dst % 4 != 0 || n > SIZE_MAX / 4 || !in_live_allocation(dst, n * 4))
        return CUDA_ERROR_INVALID_VALUE;
    auto* p = reinterpret_cast<unsigned*>(dst);
    for (size_t i = 0; i < n; i++) p[i] = value;
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned value, size_t n) {
    return cuMemsetD32Async(dst, value, n, nullptr);
}

// --- Modules and launches --------------------------------------------------------------------

API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    static const char marker[] = "CUDAEMU-MODULE\n";
    const char* text = static_cast<const char*>(image);
    if (strncmp(text, marker, sizeof marker - 1) != 0) {
        report("cuModuleLoadData: the image was not made by the emulated NVRTC (real PTX or "
               "CUBIN cannot run here)");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    const char* path = text + sizeof marker - 1;
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        report("cuModuleLoadData: %s", dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto m = std::unique_ptr<Module>(new Module);
    m->handle = handle;
    m->state = static_cast<cudaemu_block_state*>(dlsym(handle, "cudaemu_state"));
    auto bounds = reinterpret_cast<void (*)(char**, char**)>(dlsym(handle, "cudaemu_shared_bounds"));
    if (!m->state || !bounds) {
        dlclose(handle);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    bounds(&m->shared_begin, &m->shared_end);
    if (!m->shared_begin || !m->shared_end) m->shared_begin = m->shared_end = nullptr;
    *module = m.get();
    g_modules.push_back(std::move(m));
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(CUmodule module) {
    std::lock_guard<std::mutex> g(g_lock);
    // The shared object stays mapped: a function handle used after unloading its module is
    // then reported as an invalid handle rather than a jump into unmapped code.
    return destroy(g_modules, module) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuModuleGetFunction(CUfunction* fn, CUmodule module, const char* name) {
    if (!fn || !name) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!owns(g_modules, module)) return CUDA_ERROR_INVALID_HANDLE;
    auto found = module->functions.find(name);
    if (found != module->functions.end()) {
        *fn = found->second.get();
        return CUDA_SUCCESS;
    }
    std::string entry = std::string("cudaemu_entry_") + name;
    std::string params = std::string("cudaemu_params_") + name;
    auto* e = reinterpret_cast<void (*)(void**)>(dlsym(module->handle, entry.c_str()));
    auto* p = static_cast<const unsigned long long*>(dlsym(module->handle, params.c_str()));
    if (!e || !p) return CUDA_ERROR_NOT_FOUND;
    auto f = std::unique_ptr<Function>(new Function{module, name, e, p});
    *fn = f.get();
    module->functions[name] = std::move(f);
    return CUDA_SUCCESS;
}

namespace {
bool valid_function(CUfunction f) {
    for (auto& m : g_modules)
        for (auto& kv : m->functions)
            if (kv.second.get() == f) return true;
    return false;
}
}  // namespace

API CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_function(f)) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        size_t statics = f->module->shared_end - f->module->shared_begin;
        if (value < 0 || (size_t)value + statics > kOptInSharedLimit) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_shared = (size_t)value;
        return CUDA_SUCCESS;
    }
    return CUDA_SUCCESS;  // cache and carveout preferences do not apply
}

API CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction f) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_function(f)) return CUDA_ERROR_INVALID_HANDLE;
    switch (attribute) {
        case 0: *value = 1024; break;  // max threads per block
        case 1: *value = (int)(f->module->shared_end - f->module->shared_begin); break;
        case 8: *value = (int)f->max_dynamic_shared; break;
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuFuncSetCacheConfig(CUfunction f, int) {
    std::lock_guard<std::mutex> g(g_lock);
    return valid_function(f) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

namespace {
CUresult launch_kernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared_bytes, CUstream s,
                            void** params, void** extra) {
    std::lock_guard<std::mutex> g(g_lock);
    if (CUresult e = enter()) return e;
    if (!valid_function(f) || !valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) {
        report("cuLaunchKernel: the `extra` argument form is not supported; pass kernelParams");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    unsigned long long threads = (unsigned long long)bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 || bx > 1024 ||
        by > 1024 || bz > 64 || gx > 2147483647u || gy > 65535 || gz > 65535) {
        report("kernel %s: launch with grid (%u,%u,%u) and block (%u,%u,%u) is out of range",
               f->name.c_str(), gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > 1024) {
        report("kernel %s: %llu threads a block, more than 1024", f->name.c_str(), threads);
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t statics = f->module->shared_end - f->module->shared_begin;
    size_t block_limit =
        f->max_dynamic_shared > kDefaultDynamicSharedLimit ? kOptInSharedLimit : kStaticSharedLimit;
    if (statics > kStaticSharedLimit || shared_bytes > f->max_dynamic_shared ||
        statics + shared_bytes > block_limit) {
        report("kernel %s: %zu bytes of static and %u of dynamic shared memory, more than allowed "
               "(%zu dynamic without cuFuncSetAttribute)",
               f->name.c_str(), statics, shared_bytes, f->max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    unsigned long long count = f->params[0], total = 0;
    for (unsigned long long k = 0; k < count; k++) {
        unsigned long long size = f->params[1 + 2 * k], align = f->params[2 + 2 * k];
        total = (total + align - 1) / align * align + size;
    }
    if (total > kParamLimit) {
        report("kernel %s: %llu bytes of arguments, more than %zu", f->name.c_str(), total,
               kParamLimit);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (count > 0 && !params) return CUDA_ERROR_INVALID_VALUE;
    for (unsigned long long k = 0; k < count; k++)
        if (!params[k]) {
            report("kernel %s: argument %llu of %llu is a null pointer in kernelParams",
                   f->name.c_str(), k, count);
            return CUDA_ERROR_INVALID_VALUE;
        }
    Launch l;  // (the caller turns a failed allocation in here into an error code)
    l.fn = f;
    l.params = params;
    l.grid = {gx, gy, gz};
    l.block = {bx, by, bz};
    l.thread_count = (unsigned)threads;
    CUresult r = run_launch(l, shared_bytes);
    if (r == CUDA_ERROR_INVALID_VALUE || r == CUDA_ERROR_OUT_OF_MEMORY) return r;
    if (r != CUDA_SUCCESS) t_current->pending = r;  // reported by the next call, as on a GPU
    return CUDA_SUCCESS;
}
}  // namespace

// No C++ exception may cross the C ABI: an allocation that fails becomes an error code.
API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared_bytes, CUstream s,
                            void** params, void** extra) {
    try {
        return launch_kernel(f, gx, gy, gz, bx, by, bz, shared_bytes, s, params, extra);
    } catch (const std::bad_alloc&) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    } catch (...) {
        return CUDA_ERROR_UNKNOWN;
    }
}

// --- Hooks for tests and the other emulated libraries -----------------------------------------

// Sets the order of blocks and threads (forward, reverse, random:SEED), as CUDAEMU_ORDER does;
// returns 0, or -1 for an unknown order.
API int cudaemu_set_order(const char* order) {
    std::lock_guard<std::mutex> g(g_lock);
    g_order_from_env = true;  // a later cuInit keeps this order
    return parse_order(order) ? 0 : -1;
}

// For the emulated cuBLAS, which works on device memory like a kernel: it holds the device
// lock while it checks its operands and computes, so that no other thread frees them between.
API void cudaemu_lock_device() { g_lock.lock(); }
API void cudaemu_unlock_device() { g_lock.unlock(); }
// Whether [ptr, ptr + bytes) is inside one live allocation; the caller holds the device lock.
API int cudaemu_check_range(unsigned long long ptr, size_t bytes) {
    return bytes == 0 || in_live_allocation(ptr, bytes);
}
