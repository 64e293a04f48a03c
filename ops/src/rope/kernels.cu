// Rotary position embedding (GPT-NeoX style) on the first r = 2·half dims of each row of
// x [..., T, d_h]; the row of flat index `row` is position t = row mod T.
//
// Forward   x₁ = x[0 .. half], x₂ = x[half .. r], θ = the angles of position t:
//           out₁ = x₁·cos θ − x₂·sin θ,   out₂ = x₂·cos θ + x₁·sin θ,   out[r ..] = x[r ..]
// Backward  the rotation by −θ (its transpose): the same kernel with direction = −1.

// One thread per output value; cos and sin are [seq, half] tables with seq ≥ T.
extern "C" __global__ void rope_rotate(const float* x, const float* cos_table,
                                       const float* sin_table, float* out, unsigned int n,
                                       unsigned int T, unsigned int d, unsigned int half,
                                       float direction) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int row = i / d, col = i % d;
    if (col >= 2 * half) {
        out[i] = x[i];
        return;
    }
    unsigned int pair = col < half ? col : col - half;
    unsigned int table = (row % T) * half + pair;
    float c = cos_table[table];
    float s = direction * sin_table[table];
    const float* xr = x + row * d;
    float x1 = xr[pair], x2 = xr[pair + half];
    out[i] = col < half ? x1 * c - x2 * s : x2 * c + x1 * s;
}
