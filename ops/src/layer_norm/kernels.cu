// Layer norm over the last axis (biased variance), one block of threads per row of length d.
//
// Forward   μ = Σx/d,  σ² = Σ(x − μ)²/d,  r = 1/√(σ² + eps),  x̂ = (x − μ)·r,  y = x̂ ⊙ w + b
//           (w = 1 and b = 0 when absent); μ and r are saved per row for the backward pass.
// Backward  with g = ∂L/∂y and ĝ = g ⊙ w:
//           gx = r·(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)),   gw = Σ_rows g ⊙ x̂,   gb = Σ_rows g.
//
// The variance is taken around the mean in a second pass over the row (not as E[x²] − μ²),
// which loses no precision when |μ| is large next to σ.

// `w` and `b` are read only when has_w / has_b are set (otherwise any valid pointer).
extern "C" __global__ void layer_norm_forward(const float* x, const float* w, const float* b,
                                              float* y, float* mean_out, float* rstd_out,
                                              unsigned int d, float eps, int has_w, int has_b) {
    const float* xr = x + blockIdx.x * d;
    float* yr = y + blockIdx.x * d;
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) sum += xr[j];
    float mean = block_sum(sum) / d;
    float sq = 0.0f;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        float centred = xr[j] - mean;
        sq += centred * centred;
    }
    float rstd = 1.0f / sqrtf(block_sum(sq) / d + eps);
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        float scale = has_w ? w[j] : 1.0f;
        float shift = has_b ? b[j] : 0.0f;
        yr[j] = (xr[j] - mean) * rstd * scale + shift;
    }
    if (threadIdx.x == 0) {
        mean_out[blockIdx.x] = mean;
        rstd_out[blockIdx.x] = rstd;
    }
}

extern "C" __global__ void layer_norm_backward_input(const float* x, const float* w,
                                                     const float* mean, const float* rstd,
                                                     const float* g, float* gx, unsigned int d,
                                                     int has_w) {
    unsigned int base = blockIdx.x * d;
    float m = mean[blockIdx.x], r = rstd[blockIdx.x];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        float g_hat = g[base + j] * (has_w ? w[j] : 1.0f);
        sum_g += g_hat;
        sum_gx += g_hat * (x[base + j] - m) * r;
    }
    float mean_g = block_sum(sum_g) / d;
    float mean_gx = block_sum(sum_gx) / d;
    for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
        float g_hat = g[base + j] * (has_w ? w[j] : 1.0f);
        gx[base + j] = r * (g_hat - mean_g - (x[base + j] - m) * r * mean_gx);
    }
}

// gw = Σ_rows g ⊙ x̂ and gb = Σ_rows g in one pass over g and x, in two levels: the design of
// reduce's sum_column_chunks (32 features × 8 row threads per block, a constant chunk of rows
// per block, a fixed tree over the 8 row threads), writing partial[slot, chunk, feature] with
// slot 0 for gw (when has_w) and the next for gb (when has_b). The host sums the chunks.
// This replaces a pass over the rows per parameter (layer_norm_weight_grad, and a column sum
// of g for the bias), and does no bias work for the norms that have no bias.
#define LN_TILE 32
#define LN_ROW_THREADS 8

extern "C" __global__ void layer_norm_param_grad_chunks(const float* x, const float* mean,
                                                        const float* rstd, const float* g,
                                                        float* partial, unsigned int rows,
                                                        unsigned int d, unsigned int chunk_rows,
                                                        int has_w, int has_b) {
    __shared__ float sums_w[LN_ROW_THREADS][LN_TILE + 1];
    __shared__ float sums_b[LN_ROW_THREADS][LN_TILE + 1];
    unsigned int j = blockIdx.x * LN_TILE + threadIdx.x;
    unsigned int chunk = blockIdx.y, chunks = gridDim.y;
    unsigned int start = chunk * chunk_rows;
    unsigned int end = min(start + chunk_rows, rows);
    float acc_w = 0.0f, acc_b = 0.0f;
    if (j < d) {
        for (unsigned int r = start + threadIdx.y; r < end; r += LN_ROW_THREADS) {
            float gv = g[r * d + j];
            if (has_w) acc_w += gv * (x[r * d + j] - mean[r]) * rstd[r];
            acc_b += gv;
        }
    }
    sums_w[threadIdx.y][threadIdx.x] = acc_w;
    sums_b[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    for (unsigned int half = LN_ROW_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.y < half) {
            sums_w[threadIdx.y][threadIdx.x] += sums_w[threadIdx.y + half][threadIdx.x];
            sums_b[threadIdx.y][threadIdx.x] += sums_b[threadIdx.y + half][threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && j < d) {
        unsigned int slot = 0;
        if (has_w) partial[(slot++ * chunks + chunk) * d + j] = sums_w[0][threadIdx.x];
        if (has_b) partial[(slot * chunks + chunk) * d + j] = sums_b[0][threadIdx.x];
    }
}

// The plain path (TOKENFORMER_FUSED=layer_norm:0): gw[j] = Σ_rows g·x̂, one thread per feature j
// adding the rows in order (coalesced: the threads of a warp read neighbouring features of the
// same row).
extern "C" __global__ void layer_norm_weight_grad(const float* x, const float* mean,
                                                  const float* rstd, const float* g, float* gw,
                                                  unsigned int rows, unsigned int d) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (unsigned int r = 0; r < rows; ++r)
        acc += g[r * d + j] * (x[r * d + j] - mean[r]) * rstd[r];
    gw[j] = acc;
}
