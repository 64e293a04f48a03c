// Reductions and broadcasting, in the (outer, dim, inner) view of the reduced axis:
//   sum: out[o, i] = Σ_d x[o, d, i]      max: out[o, i] = max_d x[o, d, i]
//   broadcast: out[idx] = x[Σ coord·stride] with stride 0 on every stretched axis (the strided
//              gather of the layout family).
// Backward: a sum's gradient is g broadcast back; a max's gradient is g at the first index
// holding the maximum and 0 elsewhere.
//
// Every sum here has a fixed order that depends only on the sizes, never on timing: there are
// no atomics, so the same input gives the same bits on every run.

// One thread per output (o, i), adding the `dim` terms in order: reads are coalesced across
// threads when inner > 1 (neighbouring threads read neighbouring columns), and the sum is the
// same left-to-right sum as the CPU reference.
extern "C" __global__ void sum_strided(const float* x, float* out, unsigned int outer,
                                       unsigned int dim, unsigned int inner) {
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= outer * inner) return;
    unsigned int o = idx / inner, i = idx % inner;
    const float* src = x + o * dim * inner + i;
    float acc = 0.0f;
    for (unsigned int d = 0; d < dim; ++d) acc += src[d * inner];
    out[idx] = acc;
}

// Sums of contiguous rows, split into chunks of `chunk` values: block (row, c) writes the sum
// of x[row, c·chunk .. (c+1)·chunk) to out[row, c]. With more than one chunk per row the host
// runs this again on the partial sums, until one value per row is left.
extern "C" __global__ void sum_row_chunks(const float* x, float* out, unsigned int len,
                                          unsigned int chunk) {
    unsigned int row = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
    const float* src = x + row * len;
    unsigned int start = c * chunk;
    unsigned int end = start + chunk < len ? start + chunk : len;
    float acc = 0.0f;
    for (unsigned int j = start + threadIdx.x; j < end; j += blockDim.x) acc += src[j];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[row * chunks + c] = acc;
}

// Index along `dim` of the first maximum of x[o, :, i] (dim >= 1).
__device__ unsigned int first_argmax(const float* x, unsigned int o, unsigned int dim,
                                     unsigned int inner, unsigned int i) {
    const float* src = x + o * dim * inner + i;
    unsigned int best = 0;
    float best_value = src[0];
    for (unsigned int d = 1; d < dim; ++d) {
        float v = src[d * inner];
        if (v > best_value) {
            best_value = v;
            best = d;
        }
    }
    return best;
}

extern "C" __global__ void max_axis(const float* x, float* out, unsigned int outer,
                                    unsigned int dim, unsigned int inner) {
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= outer * inner) return;
    unsigned int o = idx / inner, i = idx % inner;
    unsigned int best = first_argmax(x, o, dim, inner, i);
    out[idx] = x[(o * dim + best) * inner + i];
}

// One thread per (o, i) writes its whole column of the gradient: g at the winner, 0 elsewhere.
extern "C" __global__ void max_axis_backward(const float* x, const float* g, float* gx,
                                             unsigned int outer, unsigned int dim,
                                             unsigned int inner) {
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= outer * inner) return;
    unsigned int o = idx / inner, i = idx % inner;
    unsigned int best = first_argmax(x, o, dim, inner, i);
    float gv = g[idx];
    float* dst = gx + o * dim * inner + i;
    for (unsigned int d = 0; d < dim; ++d) dst[d * inner] = d == best ? gv : 0.0f;
}
