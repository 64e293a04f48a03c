//! What the tests measure the kernels against, in one place for the unit tests of every op
//! family, the property tests (`tests/ops_properties/`) and the GPU parity tests.
//!
//! The oracles are the slow, obvious versions of the ops: an index at a time, sums in f64,
//! written without the kernels' shape code so that a mistake there cannot hide in both. The
//! helpers make seeded inputs, compare with a tolerance and take gradients by central finite
//! differences. The library itself never calls this module; the helpers panic on a failed
//! check, as test helpers do.

use tokenformer_core::{Rng, Tensor};

// ---------------------------------------------------------------------------------------------
// Inputs and comparisons
// ---------------------------------------------------------------------------------------------

/// Standard normal values from the seeded generator.
pub fn randn(dims: &[usize], seed: u64) -> Tensor {
    Tensor::randn(dims, 1.0, &mut Rng::new(seed))
}

/// The values of a tensor (copied to the host first when it lives on a GPU).
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().expect("a test tensor can be read")
}

/// The bit patterns of a tensor's values, for comparisons that must be exact (−0 ≠ 0).
pub fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

pub fn tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims).expect("test data fills its shape")
}

/// Asserts |actual − expected| <= atol + rtol·|expected| element by element.
pub fn assert_close(actual: &[f32], expected: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a as f64 - e).abs();
        assert!(
            err <= atol + rtol * e.abs(),
            "{what}: element {i}: got {a}, expected {e} (error {err:e})"
        );
    }
}

/// ∂/∂x of Σ weights ⊙ f(x), by central differences with step `h`, the loss summed in f64.
pub fn numeric_grad(
    x: &Tensor,
    weights: &[f32],
    h: f32,
    f: impl Fn(&Tensor) -> Tensor,
) -> Vec<f64> {
    let base = values(x);
    let loss = |data: Vec<f32>| -> f64 {
        let y = values(&f(&tensor(data, x.dims())));
        assert_eq!(y.len(), weights.len(), "weights must match the forward's output");
        y.iter().zip(weights).map(|(&v, &w)| v as f64 * w as f64).sum()
    };
    (0..base.len())
        .map(|i| {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += h;
            minus[i] -= h;
            let step = plus[i] as f64 - minus[i] as f64;
            (loss(plus) - loss(minus)) / step
        })
        .collect()
}

/// Checks an analytic gradient against central differences of `f` at `x`.
pub fn check_grad(
    what: &str,
    x: &Tensor,
    weights: &Tensor,
    analytic: &Tensor,
    f: impl Fn(&Tensor) -> Tensor,
) {
    assert_eq!(analytic.dims(), x.dims(), "{what}: gradient shape");
    let numeric = numeric_grad(x, &values(weights), 1e-2, f);
    assert_close(&values(analytic), &numeric, 1e-3, 5e-3, what);
}

// ---------------------------------------------------------------------------------------------
// Oracles
// ---------------------------------------------------------------------------------------------

/// The multi-index of the element at row-major position `flat` of a shape `dims`.
pub fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for axis in (0..dims.len()).rev() {
        index[axis] = flat % dims[axis];
        flat /= dims[axis];
    }
    index
}

/// The row-major position of the multi-index `index` in a shape `dims`.
pub fn ravel(index: &[usize], dims: &[usize]) -> usize {
    index.iter().zip(dims).fold(0, |flat, (&i, &d)| flat * d + i)
}

/// NumPy's broadcast shape of `a` and `b`, assuming they broadcast: trailing dims aligned, the
/// larger of each pair (a 1 stretches).
pub fn broadcast_dims(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    let dim = |d: &[usize], i: usize| if i < rank - d.len() { 1 } else { d[i - (rank - d.len())] };
    (0..rank).map(|i| dim(a, i).max(dim(b, i))).collect()
}

/// The flat index into an operand shaped `dims` of the element read at multi-index `index` of
/// the broadcast shape (a stretched axis always reads index 0).
pub fn broadcast_index(index: &[usize], dims: &[usize]) -> usize {
    let offset = index.len() - dims.len();
    dims.iter()
        .enumerate()
        .fold(0, |flat, (axis, &d)| flat * d + if d == 1 { 0 } else { index[offset + axis] })
}

/// (shape, values) of f(a, b) over the broadcast shape, one element at a time. In f32, the
/// kernels' precision, so that an elementwise op can be compared bit for bit.
pub fn naive_broadcast(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32,
) -> (Vec<usize>, Vec<f32>) {
    let out = broadcast_dims(a.dims(), b.dims());
    let (av, bv) = (values(a), values(b));
    let data = (0..out.iter().product())
        .map(|flat| {
            let index = unravel(flat, &out);
            f(av[broadcast_index(&index, a.dims())], bv[broadcast_index(&index, b.dims())])
        })
        .collect();
    (out, data)
}

/// The product op(a)·op(b) by the triple loop in f64, op being a transpose where its flag is
/// set, with Σ|a·b| per output element beside it (for a tolerance that scales with rounding).
///
/// Batch layouts as matmul takes them: both operands with the same batch dims, or one of them
/// a plain matrix shared by every batch of the other.
pub fn naive_matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> (Vec<f64>, Vec<f64>) {
    let (ad, bd) = (a.dims(), b.dims());
    let (ra, rb) = (ad.len(), bd.len());
    let (m, k) = if trans_a { (ad[ra - 1], ad[ra - 2]) } else { (ad[ra - 2], ad[ra - 1]) };
    let n = if trans_b { bd[rb - 2] } else { bd[rb - 1] };
    let batches: usize =
        if ra > 2 { ad[..ra - 2].iter().product() } else { bd[..rb - 2].iter().product() };
    let (a_batched, b_batched) = (ra > 2, rb > 2);
    let (av, bv) = (values(a), values(b));
    let mut out = vec![0.0; batches * m * n];
    let mut magnitude = vec![0.0; batches * m * n];
    for t in 0..batches {
        let a0 = if a_batched { t * m * k } else { 0 };
        let b0 = if b_batched { t * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut sum_abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let x = if trans_a { av[a0 + p * m + i] } else { av[a0 + i * k + p] };
                    let y = if trans_b { bv[b0 + j * k + p] } else { bv[b0 + p * n + j] };
                    sum += x as f64 * y as f64;
                    sum_abs += (x as f64 * y as f64).abs();
                }
                out[t * m * n + i * n + j] = sum;
                magnitude[t * m * n + i * n + j] = sum_abs;
            }
        }
    }
    (out, magnitude)
}

/// Σ over `axes` of x in f64, by adding every element to its output slot; the result in the
/// row-major order of the kept axes (with or without keepdim, the order is the same).
pub fn naive_sum(x: &Tensor, axes: &[usize]) -> Vec<f64> {
    let dims = x.dims();
    let kept: Vec<usize> =
        dims.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let mut out = vec![0.0f64; kept.iter().product()];
    for (flat, &v) in values(x).iter().enumerate() {
        let mut index = unravel(flat, dims);
        for &axis in axes {
            index[axis] = 0;
        }
        out[ravel(&index, &kept)] += v as f64;
    }
    out
}

/// ∂L/∂weight of an embedding lookup: the gradient row of every position added, in f64, to the
/// row of its id (a `vocab × d` table).
pub fn naive_scatter_add(ids: &Tensor, g: &Tensor, vocab: usize) -> Vec<f64> {
    let d = g.dims().last().copied().unwrap_or(0);
    let gv = values(g);
    let mut out = vec![0.0f64; vocab * d];
    for (position, &id) in values(ids).iter().enumerate() {
        for j in 0..d {
            out[id as usize * d + j] += gv[position * d + j] as f64;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// The number of cases a property runs: `PROPTEST_CASES` when it is set (to run the properties
/// harder, or quicker), else the test's own `default`. proptest reads the variable only for a
/// configuration that names no count, and each property here names its own.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}
