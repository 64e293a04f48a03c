// Θ, the normalisation of Pattention scores (SPEC §1), one block of threads per row a of
// length n, with τ a constant of the layer.
//
// Forward   L2NormGelu:  r = ‖a‖,  z = τ·a/r,  S = GELU(z)
//           GeluL2Norm:  h = GELU(a),  ρ = ‖h‖,  S = τ·h/ρ
//           Softmax:     S = τ²·softmax(a)
//           A row whose norm is 0 gives S = 0 and a zero gradient, never NaN.
// Backward  g = ∂L/∂S:
//           L2NormGelu:  g_z = g ⊙ GELU′(z),  g_a = (τ/r)·(g_z − z·(z·g_z)/τ²)
//           GeluL2Norm:  g_h = (τ/ρ)·(g − S·(S·g)/τ²),  g_a = g_h ⊙ GELU′(a)
//           Softmax:     g_a = τ²·p ⊙ (g − p·g),  p = softmax(a)
//           with GELU(u) = ½u(1 + erf(u/√2)) and GELU′(u) = Φ(u) + u·φ(u).
//
// The squared norm is summed in double (each square of an f32 is exact in double, and no f32
// row can overflow or underflow it), then rounded to f32, as on the CPU. In f32, a row wholly
// below about −10.5 (GeluL2Norm: GELU(a)² underflows) or with every score below ~1e-19 or above
// ~1.8e19 in magnitude would get a norm of 0 or ∞, and so an output and gradient of 0.
//
// Exact growth: thread t of a block always handles the elements t, t + blockDim, t + 2·blockDim,
// ... in that order, and block_sum's tree depends only on blockDim. Appending tokens whose
// scores are exact zeros only adds +0 at the end of some threads' partial sums, so every row
// sum, and so S and the gradients of the old scores, keeps its bits.

#define THETA_L2_NORM_GELU 0
#define THETA_GELU_L2_NORM 1
#define THETA_SOFTMAX 2

// (max, 1/Σ e^(a − max)) of a row: softmax(a)_j = e^(a_j − max) · inv_sum.
__device__ void softmax_stats(const float* a, unsigned int n, float* max_out, float* inv_sum) {
    float m = NEG_INF;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, a[j]);
    m = block_max(m);
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) sum += expf(a[j] - m);
    *max_out = m;
    *inv_sum = 1.0f / block_sum(sum);
}

// ‖u‖ of a row, u = a (L2NormGelu) or GELU(a) (GeluL2Norm): the one norm of the forward and
// backward kernels, so the two always agree on it bit for bit.
__device__ float theta_row_norm(const float* a, unsigned int n, int theta) {
    double sq = 0.0;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        double u = theta == THETA_L2_NORM_GELU ? a[j] : gelu(a[j]);
        sq += u * u;
    }
    return (float)sqrt(block_sum_double(sq));
}

extern "C" __global__ void pattention_norm_forward(const float* a, float* s, unsigned int n,
                                                   int theta, float tau) {
    const float* ar = a + blockIdx.x * n;
    float* sr = s + blockIdx.x * n;
    if (theta == THETA_SOFTMAX) {
        float m, inv_sum;
        softmax_stats(ar, n, &m, &inv_sum);
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x)
            sr[j] = expf(ar[j] - m) * inv_sum * (tau * tau);
        return;
    }
    float norm = theta_row_norm(ar, n, theta);
    float scale = norm == 0.0f ? 0.0f : tau / norm;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        if (norm == 0.0f) sr[j] = 0.0f;
        else if (theta == THETA_L2_NORM_GELU) sr[j] = gelu(ar[j] * scale);
        else sr[j] = gelu(ar[j]) * scale;
    }
}

extern "C" __global__ void pattention_norm_backward(const float* a, const float* g, float* ga,
                                                    unsigned int n, int theta, float tau) {
    const float* ar = a + blockIdx.x * n;
    const float* gr = g + blockIdx.x * n;
    float* out = ga + blockIdx.x * n;
    float inv_tau2 = 1.0f / (tau * tau);
    if (theta == THETA_SOFTMAX) {
        float m, inv_sum;
        softmax_stats(ar, n, &m, &inv_sum);
        float p_dot_g = 0.0f;
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x)
            p_dot_g += expf(ar[j] - m) * inv_sum * gr[j];
        p_dot_g = block_sum(p_dot_g);
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            float p = expf(ar[j] - m) * inv_sum;
            out[j] = tau * tau * p * (gr[j] - p_dot_g);
        }
        return;
    }
    float norm = theta_row_norm(ar, n, theta);
    if (norm == 0.0f) {
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) out[j] = 0.0f;
        return;
    }
    float scale = tau / norm;
    if (theta == THETA_L2_NORM_GELU) {
        float z_dot_gz = 0.0f;
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            float z = ar[j] * scale;
            z_dot_gz += z * (gr[j] * gelu_grad(z));
        }
        float projection = block_sum(z_dot_gz) * inv_tau2;
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            float gz = gr[j] * gelu_grad(ar[j] * scale);
            out[j] = scale * (gz - ar[j] * scale * projection);
        }
    } else {
        float s_dot_g = 0.0f;
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x)
            s_dot_g += gelu(ar[j]) * scale * gr[j];
        float projection = block_sum(s_dot_g) * inv_tau2;
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            float s = gelu(ar[j]) * scale;
            out[j] = scale * (gr[j] - s * projection) * gelu_grad(ar[j]);
        }
    }
}
