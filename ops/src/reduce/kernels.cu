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

// Column sums in two levels: the design. x is [outer, dim, inner] with inner > 1 (columns);
// summing `dim` rows of a column in one thread (sum_strided) leaves a 768-column matrix to 768
// threads walking 8,192 rows each. Here block (tile, chunk, o) owns COLUMN_TILE columns of one
// chunk of `chunk_rows` rows: thread (x, y) adds rows y, y + 8, y + 16, ... of the chunk for
// column x in order (a warp reads 32 neighbouring floats of one row: coalesced), then the 8
// partial sums of each column meet in a fixed tree (8 → 4 → 2 → 1) in shared memory and
// partial[o, chunk, column] is written. The host then sums the chunks of each column with
// sum_strided (few rows: one thread each is fine). The grouping depends only on the sizes
// (chunk_rows is a constant for all but giant sums), so the bits are the same on every run, and
// rows appended to the end only add +0 to old partial sums and new all-zero chunks.
#define COLUMN_TILE 32
#define COLUMN_ROW_THREADS 8

extern "C" __global__ void sum_column_chunks(const float* x, float* partial, unsigned int dim,
                                             unsigned int inner, unsigned int chunk_rows) {
    __shared__ float sums[COLUMN_ROW_THREADS][COLUMN_TILE + 1];
    unsigned int column = blockIdx.x * COLUMN_TILE + threadIdx.x;
    unsigned int chunk = blockIdx.y, chunks = gridDim.y, o = blockIdx.z;
    unsigned int start = chunk * chunk_rows;
    unsigned int end = min(start + chunk_rows, dim);
    float acc = 0.0f;
    if (column < inner) {
        const float* src = x + o * dim * inner + column;
        for (unsigned int r = start + threadIdx.y; r < end; r += COLUMN_ROW_THREADS)
            acc += src[r * inner];
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int half = COLUMN_ROW_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.y < half)
            sums[threadIdx.y][threadIdx.x] += sums[threadIdx.y + half][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && column < inner)
        partial[(o * chunks + chunk) * inner + column] = sums[0][threadIdx.x];
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
