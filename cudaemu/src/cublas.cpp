// The emulated cuBLAS (libcublas.so): a reference SGEMM, plain and strided-batched, on the
// emulated device's memory (the host's). Column-major as cuBLAS is: C = α·op(A)·op(B) + β·C with
// op(A) m×k, op(B) k×n, C m×n. Each element is one dot product over k in order, in f32 with
// eight interleaved partial sums (a fixed tree, so the same bits every run), then α and β.
// With the TF32 math mode on, A and B are first rounded to TF32 (10 mantissa bits, to nearest
// even) as tensor cores do; the sums stay f32. With β = 0, C is written without being read, so
// NaN in an uninitialised C does not leak through (cuBLAS's rule); with α = 0 (or k = 0), A and B
// are not read at all.
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <thread>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))

typedef int cublasStatus_t;
enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum : int { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2, CUBLAS_TF32_TENSOR_OP_MATH = 3 };

struct Handle {
    void* stream = nullptr;
    int math_mode = CUBLAS_DEFAULT_MATH;
};
typedef Handle* cublasHandle_t;

namespace {

// The emulated driver's hooks: its device lock, held while a GEMM checks and uses its operands
// (so that no other thread frees them in between), and its check that a range is device
// memory. Absent when the driver is not the emulated one.
struct DriverHooks {
    void (*lock)() = nullptr;
    void (*unlock)() = nullptr;
    int (*check)(unsigned long long, size_t) = nullptr;
    DriverHooks() {
        lock = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "cudaemu_lock_device"));
        unlock = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "cudaemu_unlock_device"));
        check = reinterpret_cast<int (*)(unsigned long long, size_t)>(
            dlsym(RTLD_DEFAULT, "cudaemu_check_range"));
        if (!lock || !unlock || !check) lock = nullptr, unlock = nullptr, check = nullptr;
    }
};
const DriverHooks& hooks() {
    static DriverHooks h;
    return h;
}
struct DeviceLock {
    DeviceLock() { if (hooks().lock) hooks().lock(); }
    ~DeviceLock() { if (hooks().unlock) hooks().unlock(); }
};
bool in_device_memory(const void* p, size_t bytes) {
    return !hooks().check || hooks().check((unsigned long long)p, bytes);
}

float to_tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf and NaN stay
    u += 0x0fffu + ((u >> 13) & 1u);                 // round to nearest even at bit 13
    u &= 0xffffe000u;
    memcpy(&x, &u, 4);
    return x;
}

// Σ a[p]·b[p] in eight interleaved f32 partial sums, combined by a fixed tree.
float dot_in_eight_lanes(const float* a, const float* b, int k) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int p = 0;
    for (; p + 8 <= k; p += 8)
        for (int q = 0; q < 8; q++) part[q] += a[p + q] * b[p + q];
    for (; p < k; p++) part[p % 8] += a[p] * b[p];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Bytes spanned by a column-major rows×cols matrix with leading dimension ld.
size_t span(int rows, int cols, int ld) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * ld + rows) * sizeof(float);
}

cublasStatus_t sgemm_batched(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                             const float* alpha, const float* A, int lda, long long sa,
                             const float* B, int ldb, long long sb, const float* beta, float* C,
                             int ldc, long long sc, int batch) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!alpha || !beta || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T && ta != CUBLAS_OP_C) ||
        (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T && tb != CUBLAS_OP_C))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool trans_a = ta != CUBLAS_OP_N, trans_b = tb != CUBLAS_OP_N;
    int a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
    int b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
    if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    DeviceLock device_lock;
    bool tf32 = h->math_mode == CUBLAS_TF32_TENSOR_OP_MATH;
    // op(A) as m rows of k and op(B) as n columns of k, each contiguous, so that every output
    // is a dot product of two contiguous vectors.
    std::vector<float> arows((size_t)m * k), bcols((size_t)n * k);
    for (int b = 0; b < batch; b++) {
        const float* a = A + b * sa;
        const float* bm = B + b * sb;
        float* c = C + b * sc;
        if (!in_device_memory(c, span(m, n, ldc)) ||
            (k > 0 && (!in_device_memory(a, span(a_rows, a_cols, lda)) ||
                       !in_device_memory(bm, span(b_rows, b_cols, ldb))))) {
            fprintf(stderr, "cudaemu: cublasSgemm: batch %d of %d reads or writes outside device "
                            "memory\n", b, batch);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
        if (*alpha == 0.0f || k == 0) {
            // C = β·C without reading A and B, as the reference BLAS does (NaN in A or B
            // stays out); β = 0 writes zeros without reading C.
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    float& out = c[i + (size_t)j * ldc];
                    out = *beta == 0.0f ? 0.0f : *beta * out;
                }
            continue;
        }
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++) {
                float v = trans_a ? a[p + (size_t)i * lda] : a[i + (size_t)p * lda];
                arows[(size_t)i * k + p] = tf32 ? to_tf32(v) : v;
            }
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++) {
                float v = trans_b ? bm[j + (size_t)p * ldb] : bm[p + (size_t)j * ldb];
                bcols[(size_t)j * k + p] = tf32 ? to_tf32(v) : v;
            }
        // Columns of C split among threads: each output is the same dot product whichever
        // thread computes it, so the bits do not depend on the split.
        auto columns = [&](int j0, int j1) {
            for (int j = j0; j < j1; j++) {
                const float* bcol = &bcols[(size_t)j * k];
                for (int i = 0; i < m; i++) {
                    float dot = dot_in_eight_lanes(&arows[(size_t)i * k], bcol, k);
                    float& out = c[i + (size_t)j * ldc];
                    out = *beta == 0.0f ? *alpha * dot : *alpha * dot + *beta * out;
                }
            }
        };
        double work = (double)m * n * std::max(k, 1);
        int threads = (int)std::min<unsigned>(std::max(1u, std::thread::hardware_concurrency()), 8);
        threads = work < 4e6 ? 1 : std::min(threads, n);
        std::vector<std::thread> pool;
        for (int t = 1; t < threads; t++)
            pool.emplace_back(columns, (int)((long long)n * t / threads),
                              (int)((long long)n * (t + 1) / threads));
        columns(0, threads > 1 ? n / threads : n);
        for (auto& th : pool) th.join();
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

API cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new Handle;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGetVersion_v2(cublasHandle_t, int* version) {
    if (!version) return CUBLAS_STATUS_INVALID_VALUE;
    *version = 130000;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGetStream_v2(cublasHandle_t h, void** stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetMathMode(cublasHandle_t h, int mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    int base = mode & 0xf;
    if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_PEDANTIC_MATH &&
        base != CUBLAS_TF32_TENSOR_OP_MATH && base != 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    h->math_mode = base;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGetMathMode(cublasHandle_t h, int* mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = h->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, int mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    // Scalars on the device are host memory here too; both modes read them the same way.
    return mode == 0 || mode == 1 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

API cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void*, size_t) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

API cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* B,
                                  int ldb, const float* beta, float* C, int ldc) {
    return sgemm_batched(h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

API cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, int ta, int tb, int m, int n,
                                             int k, const float* alpha, const float* A, int lda,
                                             long long sa, const float* B, int ldb, long long sb,
                                             const float* beta, float* C, int ldc, long long sc,
                                             int batch) {
    return sgemm_batched(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc,
                         batch);
}

API const char* cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
API const char* cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }
