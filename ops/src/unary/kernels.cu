// Elementwise unary ops, one thread per element.
//
// Forward  y = f(x):  neg −x, exp eˣ, log ln x, sqrt √x, square x², powf x^p, affine x·p + q,
//                     gelu ½x(1 + erf(x/√2)) (the exact GELU, not the tanh approximation),
//                     relu max(x, 0), tanh, sigmoid σ(x) = 1/(1 + e⁻ˣ).
// Backward ∂L/∂x = g·f′, from whichever of x or y is at hand:
//                     exp g·y, log g/x, sqrt g/(2y), square 2x·g, powf g·p·x^(p−1),
//                     gelu g·(Φ(x) + x·φ(x)) with Φ, φ the standard normal cdf and density,
//                     relu g·[x > 0] (0 at x = 0), tanh g·(1 − y²), sigmoid g·y·(1 − y).

// The op codes; the host reads them from these lines by name (kernels::op_code).
#define OP_NEG 0
#define OP_EXP 1
#define OP_LOG 2
#define OP_SQRT 3
#define OP_SQUARE 4
#define OP_GELU 5
#define OP_POWF 6
#define OP_AFFINE 7
#define OP_RELU 8
#define OP_TANH 9
#define OP_SIGMOID 10

// σ(x) through the exponential of a non-positive number only: eˣ/(1 + eˣ) for x < 0 keeps
// its relative accuracy in the negative tail, as the CPU reference does.
__device__ float sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// y[i] = f(x[i]); `p` and `q` are the parameters of powf (p) and affine (p, q).
extern "C" __global__ void unary_forward(const float* x, float* y, unsigned int n, int op,
                                         float p, float q) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float r;
    switch (op) {
        case OP_NEG: r = -v; break;
        case OP_EXP: r = expf(v); break;
        case OP_LOG: r = logf(v); break;
        case OP_SQRT: r = sqrtf(v); break;
        case OP_SQUARE: r = v * v; break;
        case OP_GELU: r = gelu(v); break;
        case OP_POWF: r = powf(v, p); break;
        case OP_RELU: r = v < 0.0f ? 0.0f : v; break;  // a NaN passes through
        case OP_TANH: r = tanhf(v); break;
        case OP_SIGMOID: r = sigmoid(v); break;
        case OP_AFFINE: r = v * p + q; break;
        default: r = NAN_F; break;  // an unknown code: NaN, never another op's result
    }
    y[i] = r;
}

// gx[i] = g[i]·f′ where `v` is x[i] (log, square, powf, gelu, relu) or y[i] (exp, sqrt,
// tanh, sigmoid).
extern "C" __global__ void unary_backward(const float* v_in, const float* g, float* gx,
                                          unsigned int n, int op, float p) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = v_in[i];
    float gi = g[i];
    float r;
    switch (op) {
        case OP_EXP: r = gi * v; break;
        case OP_LOG: r = gi / v; break;
        case OP_SQRT: r = gi / (2.0f * v); break;
        case OP_SQUARE: r = 2.0f * v * gi; break;
        case OP_POWF: r = gi * p * powf(v, p - 1.0f); break;
        case OP_RELU: r = v > 0.0f ? gi : 0.0f; break;
        case OP_TANH: r = gi * (1.0f - v * v); break;
        case OP_SIGMOID: r = gi * v * (1.0f - v); break;
        case OP_GELU: r = gi * gelu_grad(v); break;
        default: r = NAN_F; break;  // an unknown code (neg and affine need no kernel)
    }
    gx[i] = r;
}
