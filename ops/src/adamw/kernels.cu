// One fused AdamW step, one thread per parameter, writing the new p, m and v together.
//
//   m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
//   p ← p·(1 − lr·wd) − step_size·m/(√v·inv_sqrt_bc2 + eps)
// with step_size = lr/(1 − β1ᵗ) and inv_sqrt_bc2 = 1/√(1 − β2ᵗ) computed on the host in f64
// (PyTorch's arrangement of m̂/(√v̂ + eps); decoupled weight decay applied first).

extern "C" __global__ void adamw_step(const float* p, const float* g, const float* m,
                                      const float* v, float* p_out, float* m_out, float* v_out,
                                      unsigned int n, float beta1, float beta2, float eps,
                                      float decay, float step_size, float inv_sqrt_bc2) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
    p_out[i] = p[i] * decay - step_size * mi / denom;
    m_out[i] = mi;
    v_out[i] = vi;
}

// ---- Multi-tensor kernels: a whole model's clipping and AdamW step in a handful of launches.
//
// The design: a launch takes up to MULTI_MAX tensors, their pointers and lengths passed by
// value in one struct (kernel parameters may take 4 KB), each tensor cut into chunks of
// MULTI_CHUNK values; `chunk_start[t]` is the first chunk of tensor t and block b works on
// chunk b of the launch, finding its tensor by a scan of at most MULTI_MAX entries. So one
// launch replaces a square, a sum, a multiply and an AdamW kernel per parameter, and needs no
// buffer per parameter. The one-tensor kernels above stay as the plain path
// (TOKENFORMER_FUSED=adamw:0); both are tested against the CPU reference.
#define MULTI_MAX 32
#define MULTI_CHUNK 4096

struct SquaresList {
    const float* x[MULTI_MAX];
    unsigned int len[MULTI_MAX];
    unsigned int chunk_start[MULTI_MAX + 1];
    unsigned int count;
};

__device__ unsigned int tensor_of_chunk(const unsigned int* chunk_start, unsigned int count,
                                        unsigned int chunk) {
    unsigned int t = 0;
    while (t + 1 < count && chunk >= chunk_start[t + 1]) ++t;
    return t;
}

// partial[b] = Σ x² over chunk b of the launch: thread i adds values i, i + blockDim, ... of the
// chunk in order, then block_sum's fixed tree. The host sums the partials with the reduce
// family's fixed-order sum, so the bits depend on the sizes only.
extern "C" __global__ void sum_squares_chunks(SquaresList list, float* partial) {
    unsigned int b = blockIdx.x;
    unsigned int t = tensor_of_chunk(list.chunk_start, list.count, b);
    unsigned int start = (b - list.chunk_start[t]) * MULTI_CHUNK;
    unsigned int end = min(start + MULTI_CHUNK, list.len[t]);
    const float* x = list.x[t];
    float acc = 0.0f;
    for (unsigned int i = start + threadIdx.x; i < end; i += blockDim.x) acc += x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[b] = acc;
}

// norm = √Σg², factor = max_norm / max(norm + 1e-6, max_norm): one thread.
extern "C" __global__ void clip_factor(const float* sum_of_squares, float* norm_out,
                                       float* factor_out, float max_norm) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float norm = sqrtf(sum_of_squares[0]);
    norm_out[0] = norm;
    factor_out[0] = max_norm / fmaxf(norm + 1e-6f, max_norm);
}

// Each output pointer is its input's own buffer when that tensor is updated in place.
struct AdamWList {
    const float* p[MULTI_MAX];
    const float* g[MULTI_MAX];
    const float* m[MULTI_MAX];
    const float* v[MULTI_MAX];
    float* p_out[MULTI_MAX];
    float* m_out[MULTI_MAX];
    float* v_out[MULTI_MAX];
    float decay[MULTI_MAX];  // 1 − lr·wd of each parameter
    unsigned int len[MULTI_MAX];
    unsigned int chunk_start[MULTI_MAX + 1];
    unsigned int count;
};

// adamw_step's arithmetic, value for value, on every chunk of the launch; the gradient is first
// multiplied by grad_scale[0] when has_scale (the clip factor, read on the device). Each thread
// reads its own values before writing them, so updating in place is safe.
extern "C" __global__ void adamw_step_chunks(AdamWList list, const float* grad_scale,
                                             int has_scale, float beta1, float beta2, float eps,
                                             float step_size, float inv_sqrt_bc2) {
    unsigned int b = blockIdx.x;
    unsigned int t = tensor_of_chunk(list.chunk_start, list.count, b);
    unsigned int start = (b - list.chunk_start[t]) * MULTI_CHUNK;
    unsigned int end = min(start + MULTI_CHUNK, list.len[t]);
    float scale = has_scale ? grad_scale[0] : 1.0f;
    const float *p = list.p[t], *g = list.g[t], *m = list.m[t], *v = list.v[t];
    float *p_out = list.p_out[t], *m_out = list.m_out[t], *v_out = list.v_out[t];
    float decay = list.decay[t];
    for (unsigned int i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gi = has_scale ? g[i] * scale : g[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
        p_out[i] = p[i] * decay - step_size * mi / denom;
        m_out[i] = mi;
        v_out[i] = vi;
    }
}
