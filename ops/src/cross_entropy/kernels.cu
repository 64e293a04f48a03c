// Cross-entropy of logits [N, V] against integer targets [N], fused with the log-softmax.
//
// Forward   lse_i = m_i + ln Σ_j e^(x_ij − m_i)   (m_i the row max, so no e^x overflows)
//           loss_i = lse_i − x_{i, t_i}; the mean over rows is taken on the host side by a
//           fixed-order sum of the loss_i (see cuda.rs).
// Backward  ∂L/∂x_ij = g·(e^(x_ij − lse_i) − [j = t_i]) / N.
//
// Targets on the GPU are not checked by the host (see `check_ids` in lib.rs). A target that is
// not an integer in [0, V) gives a NaN loss for its row and a NaN gradient row, never a read
// outside the logits.

// One block per row: lse[row] and loss[row] (NaN for an invalid target).
extern "C" __global__ void cross_entropy_rows(const float* logits, const float* targets,
                                              float* lse, float* loss, unsigned int V,
                                              int single_pass) {
    const float* x = logits + blockIdx.x * V;
    float m, sum;
    row_max_and_sum_exp(x, V, 1.0f, single_pass, &m, &sum);
    float row_lse = m + logf(sum);
    if (threadIdx.x == 0) {
        float t = targets[blockIdx.x];
        lse[blockIdx.x] = row_lse;
        loss[blockIdx.x] = is_valid_id(t, V) ? row_lse - x[(unsigned int)t] : NAN_F;
    }
}

// One thread per logit (a NaN row for an invalid target). `g` holds the one incoming gradient
// value (read on the device, so the host never waits for it).
extern "C" __global__ void cross_entropy_backward(const float* logits, const float* targets,
                                                  const float* lse, const float* g, float* grad,
                                                  unsigned int n, unsigned int V,
                                                  unsigned int rows) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int row = i / V, j = i % V;
    float scale = g[0] / (float)rows;
    float t = targets[row];
    if (!is_valid_id(t, V)) {
        grad[i] = NAN_F;
        return;
    }
    float p = expf(logits[i] - lse[row]) * scale;
    grad[i] = j == (unsigned int)t ? p - scale : p;
}
