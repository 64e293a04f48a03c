// Softmax over the last axis, one block of threads per row.
//
// Forward   softmax:     y_j = e^(x_j − m) / Σ_k e^(x_k − m),  m = max_k x_k (so no e^x overflows)
//           log_softmax: y_j = x_j − m − ln Σ_k e^(x_k − m)
//           causal:      row i of a [T, T] score matrix keeps columns j ≤ i of scale·s and
//                        takes the softmax over them; columns j > i are 0.
// Backward  softmax:     g_x = y ⊙ (g − Σ_k g_k·y_k)          (the Jacobian is diag(y) − y·yᵀ)
//           log_softmax: g_x = g − e^y · Σ_k g_k               (e^y is the softmax)
//           causal:      g_s = scale · p ⊙ (g − Σ_{k≤i} g_k·p_k) on j ≤ i, 0 beyond.
//
// The row sums use a fixed tree (block_sum), so results do not depend on timing.


// Softmax (log_output = 0) or log-softmax (log_output = 1) of each row of length `len`.
extern "C" __global__ void softmax_rows(const float* x, float* y, unsigned int len,
                                        int log_output, int single_pass) {
    const float* xr = x + blockIdx.x * len;
    float* yr = y + blockIdx.x * len;
    float m, sum;
    row_max_and_sum_exp(xr, len, 1.0f, single_pass, &m, &sum);
    if (log_output) {
        float log_sum = logf(sum);
        for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) yr[j] = xr[j] - m - log_sum;
    } else {
        float inv_sum = 1.0f / sum;
        for (unsigned int j = threadIdx.x; j < len; j += blockDim.x)
            yr[j] = expf(xr[j] - m) * inv_sum;
    }
}

extern "C" __global__ void softmax_backward_rows(const float* y, const float* g, float* gx,
                                                 unsigned int len) {
    unsigned int base = blockIdx.x * len;
    float dot = 0.0f;
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) dot += g[base + j] * y[base + j];
    dot = block_sum(dot);
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x)
        gx[base + j] = y[base + j] * (g[base + j] - dot);
}

extern "C" __global__ void log_softmax_backward_rows(const float* y, const float* g, float* gx,
                                                     unsigned int len) {
    unsigned int base = blockIdx.x * len;
    float total = 0.0f;
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) total += g[base + j];
    total = block_sum(total);
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x)
        gx[base + j] = g[base + j] - expf(y[base + j]) * total;
}

// Row r of the flattened [..., T, T] scores is query i = r mod T.
extern "C" __global__ void causal_softmax_rows(const float* s, float* p, unsigned int T,
                                               float scale, int single_pass) {
    unsigned int base = blockIdx.x * T, i = blockIdx.x % T;
    float m, sum;
    row_max_and_sum_exp(s + base, i + 1, scale, single_pass, &m, &sum);
    float inv_sum = 1.0f / sum;
    for (unsigned int j = threadIdx.x; j < T; j += blockDim.x)
        p[base + j] = j <= i ? expf(scale * s[base + j] - m) * inv_sum : 0.0f;
}

extern "C" __global__ void causal_softmax_backward_rows(const float* p, const float* g,
                                                        float* gs, unsigned int T, float scale) {
    unsigned int base = blockIdx.x * T, i = blockIdx.x % T;
    float dot = 0.0f;
    for (unsigned int j = threadIdx.x; j <= i; j += blockDim.x) dot += g[base + j] * p[base + j];
    dot = block_sum(dot);
    for (unsigned int j = threadIdx.x; j < T; j += blockDim.x)
        gs[base + j] = j <= i ? p[base + j] * (g[base + j] - dot) * scale : 0.0f;
}
