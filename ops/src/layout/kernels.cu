// Layout changes: explicit copies, since tensors are always contiguous row-major.
//
// strided gather: out[c₀, …, c_{r−1}] = x[Σ_k c_k·stride_k], one thread per output value. It is
//          permute (x's strides, permuted: out axis k is x axis perm[k]) and broadcast_to
//          (x's strides with 0 on every stretched axis) alike.
// slab copy (narrow, concat and their backward): both tensors seen as (outer, dim, inner);
//          rows [src_start, src_start + len) of the source axis go to rows
//          [dst_start, dst_start + len) of the destination axis.
// Backward: permute by the inverse permutation; narrow's gradient is g copied into zeros;
//           concat's gradient is g narrowed back into the pieces.

extern "C" __global__ void strided_gather(const float* x, float* out, unsigned int n, int rank,
                                          Dims out_dims, Dims x_strides) {
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    unsigned int rest = idx, src = 0;
    for (int axis = rank - 1; axis >= 0; --axis) {
        src += (rest % out_dims.v[axis]) * x_strides.v[axis];
        rest /= out_dims.v[axis];
    }
    out[idx] = x[src];
}

// One thread per copied value: n = outer·len·inner.
extern "C" __global__ void copy_slab(const float* src, float* dst, unsigned int n,
                                     unsigned int len, unsigned int inner,
                                     unsigned int src_dim, unsigned int src_start,
                                     unsigned int dst_dim, unsigned int dst_start) {
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    unsigned int i = idx % inner;
    unsigned int r = (idx / inner) % len;
    unsigned int o = idx / (inner * len);
    dst[(o * dst_dim + dst_start + r) * inner + i] = src[(o * src_dim + src_start + r) * inner + i];
}
