// Elementwise binary ops with NumPy broadcasting: out = a ∘ b, ∘ ∈ {+, −, ×, ÷}.
//
// Each operand is read as if stretched to the output shape: the host passes the output dims
// and, for each operand, one stride per output axis (0 on an axis the operand is stretched
// along). Adjacent axes that are contiguous in both operands are merged on the host first, so
// the usual cases (same shape, a row vector, a scalar) have rank 1 or 2 here.
// (The backward passes are sums of these products: see cuda.rs.)

// The op codes; the host reads them from these lines by name (kernels::op_code).
#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3

__device__ float apply(int op, float x, float y) {
    switch (op) {
        case OP_ADD: return x + y;
        case OP_SUB: return x - y;
        case OP_MUL: return x * y;
        case OP_DIV: return x / y;
        default: return NAN_F;  // an unknown code: NaN, never another op's result
    }
}

// Operands of the same shape: out[i] = a[i] ∘ b[i].
extern "C" __global__ void binary_same(const float* a, const float* b, float* out,
                                       unsigned int n, int op) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = apply(op, a[i], b[i]);
}

// General broadcast: split the output index into coordinates (last axis fastest) and take the
// dot product of the coordinates with each operand's strides.
extern "C" __global__ void binary_broadcast(const float* a, const float* b, float* out,
                                            unsigned int n, int op, int rank, Dims dims,
                                            Dims a_strides, Dims b_strides) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int rest = i, ia = 0, ib = 0;
    for (int axis = rank - 1; axis >= 0; --axis) {
        unsigned int coord = rest % dims.v[axis];
        rest /= dims.v[axis];
        ia += coord * a_strides.v[axis];
        ib += coord * b_strides.v[axis];
    }
    out[i] = apply(op, a[ia], b[ib]);
}
