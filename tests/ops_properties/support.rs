//! Generators, shape strategies and gradcheck wrappers shared by the property files.

pub use proptest::test_runner::TestCaseError;
pub use tokenformer::ops::testing::{bits, tensor, values};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tokenformer::autograd::{gradcheck, GradcheckOptions, Var};
use tokenformer::core::{Result, Rng, Tensor};

pub type TestResult = std::result::Result<(), TestCaseError>;

/// The configuration of every property here: `cases` cases, or `PROPTEST_CASES` where it is
/// set; failures are kept in a `.proptest-regressions` file beside the property's own file and
/// run first every time.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: tokenformer::ops::testing::cases(cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

pub fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

pub fn randn(dims: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(dims, 1.0, rng)
}

pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Magnitudes in [lo, hi] with random signs: far enough from 0 that a finite-difference step
/// never crosses a pole (div), a sign flip (normalisations) or a kink.
pub fn away_from_zero(dims: &[usize], lo: f32, hi: f32, rng: &mut Rng) -> Tensor {
    let data = (0..numel(dims))
        .map(|_| {
            let m = lo + (hi - lo) * rng.next_f32();
            if rng.next_f32() < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect();
    tensor(data, dims)
}

/// Distinct values on a shuffled grid of spacing `step`: no ties, and no finite-difference step
/// smaller than step/2 can change which element is the largest.
pub fn distinct(dims: &[usize], step: f32, rng: &mut Rng) -> Tensor {
    let n = numel(dims);
    let mut data: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * step).collect();
    shuffle(&mut data, rng);
    tensor(data, dims)
}

/// Rows (over the last axis) whose values are spread at least `step` apart around a random
/// offset: every row of length >= 2 has a standard deviation bounded away from 0, which keeps
/// layer norm's 1/σ well conditioned for finite differences.
pub fn spread_rows(dims: &[usize], step: f32, rng: &mut Rng) -> Tensor {
    let row = *dims.last().unwrap();
    let rows = numel(dims) / row.max(1);
    let mut data = Vec::with_capacity(numel(dims));
    for _ in 0..rows {
        let offset = rng.normal() as f32;
        let mut grid: Vec<f32> = (0..row).map(|i| (i as f32 - row as f32 / 2.0) * step).collect();
        shuffle(&mut grid, rng);
        data.extend(grid.iter().map(|g| offset + g + 0.05 * rng.normal() as f32));
    }
    tensor(data, dims)
}

/// Exact integers in [0, n) stored as f32 (how ids and targets travel).
pub fn ints(dims: &[usize], n: usize, rng: &mut Rng) -> Tensor {
    tensor((0..numel(dims)).map(|_| rng.below(n as u64) as f32).collect(), dims)
}

pub fn opts(seed: u64) -> GradcheckOptions {
    GradcheckOptions { seed, ..GradcheckOptions::default() }
}

pub fn check<F>(f: F, inputs: &[Tensor], seed: u64) -> TestResult
where
    F: Fn(&[Var]) -> Result<Var>,
{
    check_with(f, inputs, &opts(seed))
}

pub fn check_with<F>(f: F, inputs: &[Tensor], opts: &GradcheckOptions) -> TestResult
where
    F: Fn(&[Var]) -> Result<Var>,
{
    let shapes: Vec<String> = inputs.iter().map(|t| t.shape().to_string()).collect();
    gradcheck(f, inputs, opts)
        .map_err(|e| TestCaseError::fail(format!("{e} (inputs shaped {})", shapes.join(", "))))
}

/// Rank 1..=4, each dim 1..=5.
pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..=4)
}

/// Two shapes that broadcast together: dims of a common shape, each operand with some dims set
/// to 1 and some leading dims dropped (down to a scalar).
pub fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        prop::collection::vec(1usize..5, 1..=4),
        prop::collection::vec(any::<bool>(), 4),
        prop::collection::vec(any::<bool>(), 4),
        0usize..5,
        0usize..5,
    )
        .prop_map(|(full, ones_a, ones_b, drop_a, drop_b)| {
            let make = |ones: &[bool], drop: usize| -> Vec<usize> {
                full.iter()
                    .zip(ones)
                    .skip(drop.min(full.len()))
                    .map(|(&d, &one)| if one { 1 } else { d })
                    .collect()
            };
            (make(&ones_a, drop_a), make(&ones_b, drop_b))
        })
}

pub fn assert_err<T: std::fmt::Debug>(r: Result<T>, op: &str, needles: &[&str]) {
    let msg = match r {
        Ok(v) => panic!("{op}: expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(op), "error message {msg:?} does not name the op {op:?}");
    for needle in needles {
        assert!(msg.contains(needle), "error message {msg:?} does not mention {needle:?}");
    }
}
