// Embedding lookup and its deterministic scatter-add.
//
// Forward   out[p, :] = W[ids[p], :]                     (ids are f32 holding integers)
// Backward  gW[v, :] = Σ_{p : ids[p] = v} g[p, :]          in increasing order of p
//
// The backward pass uses no atomics (float atomics would add in a different order on every
// run). The host groups the positions by id (a counting sort, stable, so each group lists its
// positions in increasing order); then one thread per (group, feature) owns one output value
// and adds its group's gradients in that order, the same sum as the CPU reference's loop.

extern "C" __global__ void embedding_forward(const float* weight, const float* ids, float* out,
                                             unsigned int n, unsigned int d,
                                             unsigned int vocab) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int position = i / d, feature = i % d;
    unsigned int id = (unsigned int)ids[position];
    // Ids were validated on the host; the bound check keeps a stray one from reading past W.
    out[i] = id < vocab ? weight[id * d + feature] : 0.0f;
}

// Block (group, chunk): thread `feature` sums column `feature` of the group's gradient rows.
// `positions[starts[group] .. starts[group + 1]]` are the positions holding id rows[group].
extern "C" __global__ void embedding_backward_grouped(const float* g, const unsigned int* positions,
                                                      const unsigned int* starts,
                                                      const unsigned int* rows, float* table_grad,
                                                      unsigned int d) {
    unsigned int group = blockIdx.x;
    unsigned int feature = blockIdx.y * blockDim.x + threadIdx.x;
    if (feature >= d) return;
    float acc = 0.0f;
    for (unsigned int k = starts[group]; k < starts[group + 1]; ++k)
        acc += g[positions[k] * d + feature];
    table_grad[rows[group] * d + feature] = acc;
}
