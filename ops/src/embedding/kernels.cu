// Embedding lookup and its deterministic scatter-add.
//
// Forward   out[p, :] = W[ids[p], :]                     (ids are f32 holding integers)
// Backward  gW[v, :] = Σ_{p : ids[p] = v} g[p, :]          in increasing order of p
//
// Ids on the GPU are not checked by the host (that would stall every step on a copy; see
// `check_ids` in lib.rs). Instead every kernel tests each id itself: the forward pass writes NaN
// for an id that is not an integer in [0, vocab), so the mistake surfaces as a NaN loss, and the
// backward pass skips it. No kernel reads or writes outside its buffers whatever the ids hold.
//
// The backward pass uses no atomics: float atomics would add the same terms in a different
// order on every run, and the sums would differ in their last bits. Instead each output value
// has exactly one owner thread, which adds its terms in position order, the same sum in the
// same order as the CPU reference's loop (so the two agree bit for bit).

// One thread per output value.
extern "C" __global__ void embedding_forward(const float* weight, const float* ids, float* out,
                                             unsigned int n, unsigned int d,
                                             unsigned int vocab) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int position = i / d, feature = i % d;
    float id = ids[position];
    out[i] = is_valid_id(id, vocab) ? weight[(unsigned int)id * d + feature] : NAN_F;
}

// The scatter-add, split so that every output value has one owner:
//   block (x, y) owns the columns [x·blockDim, (x+1)·blockDim) of the table rows
//   [y·rows_per_block, (y+1)·rows_per_block); thread t owns one column of those rows.
// Every thread walks all n positions in order and adds g[p, column] into row ids[p] when that
// row is one of its block's. The ids are staged through shared memory a tile at a time (one id
// per thread), so each id is read from global memory once per block, not once per thread.
//
// Work: every block reads all n ids, so the id traffic grows with the number of row blocks;
// with 256 rows per block a GPT-2 vocabulary (50304) gives 197 row blocks, a few hundred
// thousand shared-memory reads per thread, well under a millisecond. The table gradient
// `table_grad` must be zero on entry (rows no position names stay zero).
extern "C" __global__ void embedding_backward_rows(const float* g, const float* ids,
                                                   float* table_grad, unsigned int n,
                                                   unsigned int d, unsigned int vocab,
                                                   unsigned int rows_per_block) {
    extern __shared__ unsigned int tile[];  // blockDim.x row ids; vocab marks "not ours"
    unsigned int column = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int first_row = blockIdx.y * rows_per_block;
    unsigned int end_row = first_row + min(rows_per_block, vocab - first_row);  // no overflow
    for (unsigned int tile_start = 0; tile_start < n; tile_start += blockDim.x) {
        // Every thread loads one id of the tile, including threads past the last column: they
        // own no output but must still help fill the tile and reach both barriers.
        unsigned int p = tile_start + threadIdx.x;
        unsigned int row = vocab;
        if (p < n) {
            float id = ids[p];
            if (is_valid_id(id, vocab)) row = (unsigned int)id;
        }
        tile[threadIdx.x] = row;
        __syncthreads();
        if (column < d) {
            unsigned int count = min(blockDim.x, n - tile_start);
            for (unsigned int k = 0; k < count; ++k) {
                unsigned int r = tile[k];
                if (r >= first_row && r < end_row)
                    table_grad[r * d + column] += g[(tile_start + k) * d + column];
            }
        }
        __syncthreads();  // the tile is read by everyone before it is overwritten
    }
}
