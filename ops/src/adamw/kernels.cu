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
