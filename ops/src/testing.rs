//! Helpers shared by the unit tests: seeded inputs, tolerant comparison, and gradients by
//! central finite differences of a forward function.

use tokenformer_core::{Rng, Tensor};

pub(crate) fn randn(dims: &[usize], seed: u64) -> Tensor {
    Tensor::randn(dims, 1.0, &mut Rng::new(seed))
}

pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().expect("test tensors live on the CPU")
}

pub(crate) fn tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims).expect("test data fills its shape")
}

/// Asserts |actual − expected| <= atol + rtol·|expected| element by element.
pub(crate) fn assert_close(actual: &[f32], expected: &[f64], atol: f64, rtol: f64, what: &str) {
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
pub(crate) fn numeric_grad(
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
pub(crate) fn check_grad(
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
