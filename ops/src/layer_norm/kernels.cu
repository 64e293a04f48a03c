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

// gw[j] = Σ_rows g·x̂, one thread per feature j adding the rows in order (coalesced: the
// threads of a warp read neighbouring features of the same row).
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
