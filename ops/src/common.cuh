// Helpers shared by the kernel files. NVRTC compiles one source string, not a tree of files, so
// this file is put in front of every kernel file (the registry in kernels.rs does it).

#define NEG_INF (-__int_as_float(0x7f800000))
#define NAN_F __int_as_float(0x7fc00000)

// Axis sizes or strides of an index-walking kernel, passed by value; unused entries are 0.
// Mirrored by `MAX_RANK` and `Arg::Dims` in core/src/cuda.rs.
#define MAX_RANK 8
struct Dims { unsigned int v[MAX_RANK]; };

// GELU and its derivative, GELU′(x) = Φ(x) + x·φ(x) (unary and pattention_norm).
#define FRAC_1_SQRT_2 0.70710678118654752f
#define FRAC_1_SQRT_2PI 0.39894228040143268f

// ½x·erfc(−x/√2) rather than ½x(1 + erf(x/√2)): the same value, without the cancellation that
// rounds GELU of a large negative x to zero (a Pattention row can lie wholly in that tail).
__device__ float gelu(float x) { return 0.5f * x * erfcf(-x * FRAC_1_SQRT_2); }

__device__ float gelu_grad(float x) {
    float cdf = 0.5f * erfcf(-x * FRAC_1_SQRT_2);
    float pdf = FRAC_1_SQRT_2PI * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

// Sum over a block of threads, returned to every thread. Each warp adds its 32 values by a
// butterfly of shuffles (every lane ends with the same bits: a + b == b + a exactly), then
// every warp adds the per-warp sums the same way. The tree's shape depends on blockDim only, so
// the same input gives the same bits on every run.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // an earlier call's reads of `partial` are finished
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// block_sum in double, with the same tree: for sums whose terms can underflow or overflow f32
// (the squared norms of Θ), where the CPU reference sums in f64 too.
__device__ double block_sum_double(double v) {
    __shared__ double partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Maximum over a block of threads, returned to every thread (the same tree as block_sum).
__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : NEG_INF;
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// (max, Σ e^(v − max)) over v = scale·x[j], j < count, in one read of the row (the design):
// each thread keeps a running maximum m and a sum s of e^(v − m), rescaling s by e^(m_old − m)
// whenever m grows; the block then takes M = max m and S = Σ s·e^(m − M) with the fixed trees
// of block_max and block_sum. Three reads of a row (max, sum, write) become two (this and the
// write). The result is the two-pass one up to rounding; the two-pass loops stay as the plain
// path (single_pass = 0, TOKENFORMER_FUSED=softmax:0 or cross_entropy:0).
__device__ void row_max_and_sum_exp(const float* x, unsigned int count, float scale,
                                    int single_pass, float* max_out, float* sum_out) {
    if (!single_pass) {
        float m = NEG_INF;
        for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) m = fmaxf(m, scale * x[j]);
        m = block_max(m);
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) s += expf(scale * x[j] - m);
        *max_out = m;
        *sum_out = block_sum(s);
        return;
    }
    float m = NEG_INF, s = 0.0f;
    for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) {
        float v = scale * x[j];
        if (v == NEG_INF) continue;  // adds e^(−∞) = 0; skipped so that m = −∞ never meets it
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    float row_max = block_max(m);
    *max_out = row_max;
    *sum_out = block_sum(m == NEG_INF ? 0.0f : s * expf(m - row_max));
}

// Whether the f32 `x` holds an integer in [0, bound). NaN fails every comparison; the 2^32
// bound keeps the conversion to unsigned defined.
__device__ bool is_valid_id(float x, unsigned int bound) {
    return x >= 0.0f && x < 4294967296.0f && truncf(x) == x && (unsigned int)x < bound;
}
