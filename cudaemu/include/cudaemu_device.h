// The CUDA execution model on a CPU: what a kernel file sees in place of the CUDA headers when
// the emulated NVRTC compiles it with the system C++ compiler (put in front of the source with
// -include). Each thread of a block is a fiber run by the emulated driver (libcuda.so), which
// switches fibers at __syncthreads and at warp shuffles; everything a kernel asks of the
// execution model goes through `cudaemu_state` and the runtime functions it points to.
//
// Kept in C-compatible layout: driver.cpp includes this file too, for the ABI between a kernel
// module and the driver (cudaemu_dim3, cudaemu_runtime, cudaemu_block_state).
#ifndef CUDAEMU_DEVICE_H
#define CUDAEMU_DEVICE_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <climits>
#include <cfloat>
#include <type_traits>

struct cudaemu_dim3 {
    unsigned int x, y, z;
};

// What the driver gives a module: the operations that need more than one thread.
struct cudaemu_runtime {
    // Waits until every thread of the block has arrived.
    void (*syncthreads)(void);
    // Waits until the lanes in `mask` of the calling warp have arrived.
    void (*syncwarp)(unsigned int mask);
    // A warp shuffle of 64 bits: `kind` is one of CUDAEMU_SHFL_*, `arg` the lane, delta or
    // xor mask, `width` the shuffle's segment width.
    unsigned long long (*shfl)(unsigned int mask, unsigned long long bits, int kind, int arg,
                               int width);
    // Stops the launch with an error (a trap or a failed device-side assert).
    void (*trap)(const char* what);
};

enum { CUDAEMU_SHFL_IDX = 0, CUDAEMU_SHFL_UP = 1, CUDAEMU_SHFL_DOWN = 2, CUDAEMU_SHFL_XOR = 3 };

// The running thread's coordinates, written by the driver before it resumes each fiber.
struct cudaemu_block_state {
    cudaemu_dim3 threadIdx, blockIdx, blockDim, gridDim;
    void* dynamic_smem;
    const cudaemu_runtime* rt;
};

#ifndef CUDAEMU_DRIVER  // what follows is for kernel sources only

extern "C" __attribute__((visibility("default"))) cudaemu_block_state cudaemu_state;
cudaemu_block_state cudaemu_state;

typedef cudaemu_dim3 dim3;
typedef cudaemu_dim3 uint3;
#define threadIdx (cudaemu_state.threadIdx)
#define blockIdx (cudaemu_state.blockIdx)
#define blockDim (cudaemu_state.blockDim)
#define gridDim (cudaemu_state.gridDim)
#define warpSize 32

// Function qualifiers. A kernel is an ordinary C function (its `extern "C"` keeps its name).
// Device functions and constants get internal linkage, so that the compiler drops the ones a
// module does not use, with their static shared arrays, as a GPU's compiler does (those arrays
// count against each launch's shared memory). Member functions marked __device__ are therefore
// not supported.
#define __global__
#define __device__ static
#define __host__
#define __forceinline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__ static
// Static shared memory: one copy per module, reused by each block in turn (blocks run one at
// a time). The section lets the driver fill it with NaN bytes before every block, so a read
// of shared memory that no thread of the block wrote shows up as NaN, as garbage would on a GPU.
#define __shared__ static __attribute__((section("cudaemu_shared"), aligned(16)))

extern "C" char __start_cudaemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_cudaemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" __attribute__((visibility("default"))) void cudaemu_shared_bounds(char** begin,
                                                                             char** end) {
    *begin = __start_cudaemu_shared;
    *end = __stop_cudaemu_shared;
}

// Dynamic shared memory (`extern __shared__ T name[];` is rewritten by the emulated NVRTC into
// a pointer to this buffer, sized by the launch).
#define cudaemu_dynamic_smem() (cudaemu_state.dynamic_smem)

// Each call that lets other threads run is also a compiler barrier: shared memory written
// before it is stored, and read again after it.
#define CUDAEMU_MEMORY_BARRIER() asm volatile("" ::: "memory")
static inline void __syncthreads() {
    CUDAEMU_MEMORY_BARRIER();
    cudaemu_state.rt->syncthreads();
    CUDAEMU_MEMORY_BARRIER();
}
static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    CUDAEMU_MEMORY_BARRIER();
    cudaemu_state.rt->syncwarp(mask);
    CUDAEMU_MEMORY_BARRIER();
}
static inline void __trap() { cudaemu_state.rt->trap("__trap() called"); }

// Warp shuffles on every 32- and 64-bit type a kernel may move between lanes.
template <typename T>
static inline T cudaemu_shfl(unsigned int mask, T v, int kind, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    CUDAEMU_MEMORY_BARRIER();
    bits = cudaemu_state.rt->shfl(mask, bits, kind, arg, width);
    CUDAEMU_MEMORY_BARRIER();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T>
static inline T __shfl_sync(unsigned int mask, T v, int lane, int width = 32) {
    return cudaemu_shfl(mask, v, CUDAEMU_SHFL_IDX, lane, width);
}
template <typename T>
static inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return cudaemu_shfl(mask, v, CUDAEMU_SHFL_UP, (int)delta, width);
}
template <typename T>
static inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    return cudaemu_shfl(mask, v, CUDAEMU_SHFL_DOWN, (int)delta, width);
}
template <typename T>
static inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    return cudaemu_shfl(mask, v, CUDAEMU_SHFL_XOR, lane_mask, width);
}

// Bit casts and the intrinsics whose results the CUDA documentation defines exactly.
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int i; std::memcpy(&i, &f, 4); return i; }
static inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
static inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// The fast approximate intrinsics: the accurate functions (a GPU is less accurate here).
// (Macros: glibc's headers declare functions of these names already.)
#define __expf expf
#define __logf logf
#define __sinf sinf
#define __cosf cosf
#define __powf powf
template <typename T> static inline T __ldg(const T* p) { return *p; }

// min and max on mixed operands convert as C does, like CUDA's overloads.
template <typename A, typename B>
static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}

#define assert(cond) \
    ((cond) ? (void)0 : cudaemu_state.rt->trap("device-side assert failed: " #cond))

#endif  // CUDAEMU_DRIVER
#endif  // CUDAEMU_DEVICE_H
