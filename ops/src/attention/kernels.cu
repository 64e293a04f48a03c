// Fused causal attention (the math is at the top of attention/mod.rs): the CUDA version of
// cpu.rs, written to be plainly correct rather than clever.
//
// What it fuses and why: the plain path runs q·kᵀ as a full [T, T] GEMM (the masked half
// included), a causal softmax over it, and P·v, and keeps [B, H, T, T] between them (4.8 GB at
// 150M with batch 8 × 1024); its backward pass makes two more such tensors. Here each block
// owns one tile of rows and walks the tiles of the other side in order, with the current tiles
// of q, k, v (and ∂L/∂out) in shared memory, an online softmax for the forward pass, and the
// probabilities of a tile recomputed from the saved log-sum-exp in the backward pass. Tiles
// wholly above the diagonal (every key after every query) are never visited.
//
//   attention_forward        block = (head, query tile): out and lse = ln Σ_j e^(s_ij)
//   attention_backward_delta thread = query row: D_i = Σ_c out_ic·g_ic
//   attention_backward_kv    block = (head, key tile): gk, gv summed over the query tiles
//   attention_backward_q     block = (head, query tile): gq summed over the key tiles
//
// The backward pass is two kernels over the two tile orders rather than one with atomic adds,
// so every sum runs in a fixed order and the results are the same bits on every run.
//
// Layout: q, k, v, out and the gradients are [B·H, T, D] row-major; lse and D are [B·H, T].
// Every block has ATTENTION_THREADS threads that stride over the elements of each step; one
// step ends at a __syncthreads before the next reads what it wrote. Tiles of T-long data are
// padded with zeros (rows past T) in shared memory. Shared rows of q, k, v and ∂L/∂out are
// `D | 1` floats apart: an odd stride puts the same column of 32 consecutive rows in 32
// different banks. The host (cuda.rs) picks `tile` so that the shared memory, laid out as
// written at the top of each kernel, fits in 48 KiB.

#define ATTENTION_THREADS 128

// Copies rows [row0, row0 + tile) of a [T, D] matrix into shared memory with row stride
// `stride`, zeros for rows at or past T.
__device__ void load_tile(float* dst, const float* src, unsigned int row0, unsigned int tile,
                          unsigned int T, unsigned int D, unsigned int stride) {
    for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) {
        unsigned int r = e / D, c = e % D;
        dst[r * stride + c] = row0 + r < T ? src[(size_t)(row0 + r) * D + c] : 0.0f;
    }
}

// Σ_c a[c]·b[c] over D columns, in order.
__device__ float dot_row(const float* a, const float* b, unsigned int D) {
    float acc = 0.0f;
    for (unsigned int c = 0; c < D; c++) acc += a[c] * b[c];
    return acc;
}

// Shared memory (floats): q [tile][stride], k or v [tile][stride], o [tile][D],
// p [tile][tile], then running max, running sum and correction [tile] each.
extern "C" __global__ void attention_forward(const float* q, const float* k, const float* v,
                                             float* out, float* lse, unsigned int T,
                                             unsigned int D, unsigned int tile, float scale) {
    extern __shared__ float smem[];
    const unsigned int stride = D | 1u;
    float* qs = smem;
    float* kvs = qs + tile * stride;
    float* os = kvs + tile * stride;
    float* ps = os + tile * D;
    float* row_max = ps + tile * tile;
    float* row_sum = row_max + tile;
    float* row_scale = row_sum + tile;

    const unsigned int tiles = (T + tile - 1) / tile;
    const unsigned int head = blockIdx.x / tiles;
    // The last query tiles have the most keys to visit: they go first.
    const unsigned int q0 = (tiles - 1 - blockIdx.x % tiles) * tile;
    const unsigned int rows = min(tile, T - q0);
    const size_t base = (size_t)head * T * D;

    load_tile(qs, q + base, q0, tile, T, D, stride);
    for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) os[e] = 0.0f;
    for (unsigned int r = threadIdx.x; r < tile; r += blockDim.x) {
        row_max[r] = NEG_INF;
        row_sum[r] = 0.0f;
    }
    __syncthreads();

    for (unsigned int k0 = 0; k0 < q0 + rows; k0 += tile) {
        load_tile(kvs, k + base, k0, tile, T, D, stride);
        __syncthreads();
        // Scores of the visible pairs (key ≤ query), −∞ elsewhere.
        for (unsigned int e = threadIdx.x; e < tile * tile; e += blockDim.x) {
            unsigned int r = e / tile, j = e % tile;
            float s = NEG_INF;
            if (r < rows && k0 + j <= q0 + r)
                s = dot_row(qs + r * stride, kvs + j * stride, D) * scale;
            ps[e] = s;
        }
        __syncthreads();
        // Online softmax, one thread per row: new maximum, rescaling factor, e^(s − max).
        for (unsigned int r = threadIdx.x; r < tile; r += blockDim.x) {
            float* p = ps + r * tile;
            float m_old = row_max[r], m = m_old;
            for (unsigned int j = 0; j < tile; j++) m = fmaxf(m, p[j]);
            float correction = 1.0f, sum = 0.0f;
            if (m == NEG_INF) {
                // No visible key so far (a padding row): nothing to add.
                for (unsigned int j = 0; j < tile; j++) p[j] = 0.0f;
            } else {
                correction = expf(m_old - m);  // 0 on the first visible tile (m_old = −∞)
                for (unsigned int j = 0; j < tile; j++) {
                    p[j] = expf(p[j] - m);  // e^−∞ = 0 for the masked pairs
                    sum += p[j];
                }
            }
            row_max[r] = m;
            row_sum[r] = row_sum[r] * correction + sum;
            row_scale[r] = correction;
        }
        __syncthreads();
        load_tile(kvs, v + base, k0, tile, T, D, stride);
        __syncthreads();
        for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) {
            unsigned int r = e / D, c = e % D;
            float acc = os[e] * row_scale[r];
            for (unsigned int j = 0; j < tile; j++) acc += ps[r * tile + j] * kvs[j * stride + c];
            os[e] = acc;
        }
        __syncthreads();
    }

    for (unsigned int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        unsigned int r = e / D, c = e % D;
        out[base + (size_t)(q0 + r) * D + c] = os[e] / row_sum[r];
    }
    for (unsigned int r = threadIdx.x; r < rows; r += blockDim.x)
        lse[(size_t)head * T + q0 + r] = row_max[r] + logf(row_sum[r]);
}

// D_i = Σ_c out_ic·g_ic for each of `rows` rows of length D.
extern "C" __global__ void attention_backward_delta(const float* out, const float* g,
                                                    float* delta, unsigned int rows,
                                                    unsigned int D) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows) delta[i] = dot_row(out + (size_t)i * D, g + (size_t)i * D, D);
}

// P_ij and ∂L/∂s_ij of the tile pair (query tile q0, key tile k0) into p and ds [tile][tile],
// zeros where the pair is masked or padding:
//   P = e^(s·scale − lse_i),  ∂L/∂s = scale · P·(g_i·v_j − D_i).
__device__ void probs_and_score_grads(float* p, float* ds, const float* qs, const float* gs,
                                      const float* ks, const float* vs, const float* lse_s,
                                      const float* delta_s, unsigned int q0, unsigned int k0,
                                      unsigned int T, unsigned int D, unsigned int tile,
                                      unsigned int stride, float scale) {
    for (unsigned int e = threadIdx.x; e < tile * tile; e += blockDim.x) {
        unsigned int r = e / tile, j = e % tile;
        float pv = 0.0f, dsv = 0.0f;
        if (q0 + r < T && k0 + j <= q0 + r) {
            float s = dot_row(qs + r * stride, ks + j * stride, D) * scale;
            pv = expf(s - lse_s[r]);
            float dp = dot_row(gs + r * stride, vs + j * stride, D);
            dsv = pv * (dp - delta_s[r]) * scale;
        }
        p[e] = pv;
        ds[e] = dsv;
    }
}

// Copies lse and D of rows [q0, q0 + tile) into shared memory (0 past T).
__device__ void load_row_stats(float* lse_s, float* delta_s, const float* lse,
                               const float* delta, unsigned int q0, unsigned int tile,
                               unsigned int T) {
    for (unsigned int r = threadIdx.x; r < tile; r += blockDim.x) {
        lse_s[r] = q0 + r < T ? lse[q0 + r] : 0.0f;
        delta_s[r] = q0 + r < T ? delta[q0 + r] : 0.0f;
    }
}

// Shared memory (floats): k, v, q, g [tile][stride] each, p and ds [tile][tile] each,
// gk and gv [tile][D] each, lse and D [tile] each.
extern "C" __global__ void attention_backward_kv(const float* q, const float* k, const float* v,
                                                 const float* g, const float* lse,
                                                 const float* delta, float* gk, float* gv,
                                                 unsigned int T, unsigned int D,
                                                 unsigned int tile, float scale) {
    extern __shared__ float smem[];
    const unsigned int stride = D | 1u;
    float* ks = smem;
    float* vs = ks + tile * stride;
    float* qs = vs + tile * stride;
    float* gs = qs + tile * stride;
    float* ps = gs + tile * stride;
    float* dss = ps + tile * tile;
    float* gks = dss + tile * tile;
    float* gvs = gks + tile * D;
    float* lse_s = gvs + tile * D;
    float* delta_s = lse_s + tile;

    const unsigned int tiles = (T + tile - 1) / tile;
    const unsigned int head = blockIdx.x / tiles;
    // The first key tiles are seen by the most query tiles: they go first.
    const unsigned int k0 = (blockIdx.x % tiles) * tile;
    const unsigned int keys = min(tile, T - k0);
    const size_t base = (size_t)head * T * D;
    const float* lse_h = lse + (size_t)head * T;
    const float* delta_h = delta + (size_t)head * T;

    load_tile(ks, k + base, k0, tile, T, D, stride);
    load_tile(vs, v + base, k0, tile, T, D, stride);
    for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) {
        gks[e] = 0.0f;
        gvs[e] = 0.0f;
    }
    // Query tiles before k0 see none of these keys: start at the diagonal tile.
    for (unsigned int q0 = k0; q0 < T; q0 += tile) {
        __syncthreads();  // the previous tile's sums are done with qs, gs, ps, dss
        load_tile(qs, q + base, q0, tile, T, D, stride);
        load_tile(gs, g + base, q0, tile, T, D, stride);
        load_row_stats(lse_s, delta_s, lse_h, delta_h, q0, tile, T);
        __syncthreads();
        probs_and_score_grads(ps, dss, qs, gs, ks, vs, lse_s, delta_s, q0, k0, T, D, tile, stride,
                              scale);
        __syncthreads();
        // gv_j += Σ_i P_ij·g_i,  gk_j += Σ_i ∂L/∂s_ij·q_i, over this tile's queries in order.
        for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) {
            unsigned int j = e / D, c = e % D;
            float acc_v = gvs[e], acc_k = gks[e];
            for (unsigned int r = 0; r < tile; r++) {
                acc_v += ps[r * tile + j] * gs[r * stride + c];
                acc_k += dss[r * tile + j] * qs[r * stride + c];
            }
            gvs[e] = acc_v;
            gks[e] = acc_k;
        }
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < keys * D; e += blockDim.x) {
        gk[base + (size_t)k0 * D + e] = gks[e];
        gv[base + (size_t)k0 * D + e] = gvs[e];
    }
}

// Shared memory (floats): q, g, k, v [tile][stride] each, ds [tile][tile] (with p before it,
// [tile][tile], holding the probabilities), gq [tile][D], lse and D [tile] each.
extern "C" __global__ void attention_backward_q(const float* q, const float* k, const float* v,
                                                const float* g, const float* lse,
                                                const float* delta, float* gq, unsigned int T,
                                                unsigned int D, unsigned int tile, float scale) {
    extern __shared__ float smem[];
    const unsigned int stride = D | 1u;
    float* qs = smem;
    float* gs = qs + tile * stride;
    float* ks = gs + tile * stride;
    float* vs = ks + tile * stride;
    float* ps = vs + tile * stride;
    float* dss = ps + tile * tile;
    float* gqs = dss + tile * tile;
    float* lse_s = gqs + tile * D;
    float* delta_s = lse_s + tile;

    const unsigned int tiles = (T + tile - 1) / tile;
    const unsigned int head = blockIdx.x / tiles;
    const unsigned int q0 = (tiles - 1 - blockIdx.x % tiles) * tile;
    const unsigned int rows = min(tile, T - q0);
    const size_t base = (size_t)head * T * D;

    load_tile(qs, q + base, q0, tile, T, D, stride);
    load_tile(gs, g + base, q0, tile, T, D, stride);
    load_row_stats(lse_s, delta_s, lse + (size_t)head * T, delta + (size_t)head * T, q0, tile, T);
    for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) gqs[e] = 0.0f;
    // Key tiles after the last query of this tile are masked: never visited.
    for (unsigned int k0 = 0; k0 < q0 + rows; k0 += tile) {
        __syncthreads();  // the previous tile's sums are done with ks and dss
        load_tile(ks, k + base, k0, tile, T, D, stride);
        load_tile(vs, v + base, k0, tile, T, D, stride);
        __syncthreads();
        probs_and_score_grads(ps, dss, qs, gs, ks, vs, lse_s, delta_s, q0, k0, T, D, tile, stride,
                              scale);
        __syncthreads();
        // gq_i += Σ_j ∂L/∂s_ij·k_j over this tile's keys in order.
        for (unsigned int e = threadIdx.x; e < tile * D; e += blockDim.x) {
            unsigned int r = e / D, c = e % D;
            float acc = gqs[e];
            for (unsigned int j = 0; j < tile; j++) acc += dss[r * tile + j] * ks[j * stride + c];
            gqs[e] = acc;
        }
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < rows * D; e += blockDim.x)
        gq[base + (size_t)q0 * D + e] = gqs[e];
}
