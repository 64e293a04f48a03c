//! Matrix products: every transpose flag, batched and shared operands, against the naive
//! triple loop; gradients; errors.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::matmul;
use tokenformer::ops::testing::naive_matmul;

/// A matmul case: shapes of a and b and the flags.
#[derive(Clone, Debug)]
struct MatmulCase {
    a: Vec<usize>,
    b: Vec<usize>,
    m: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    /// Batch dims of the output (empty for a plain GEMM).
    batch: Vec<usize>,
}

/// Mode 0: a and b share their batch dims (possibly none); mode 1: b is rank 2 and shared by
/// every batch of a; mode 2: a is rank 2 and shared by every batch of b.
fn matmul_case() -> impl Strategy<Value = MatmulCase> {
    (
        (1usize..6, 1usize..6, 1usize..6),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(1usize..4, 0..=2),
        0u8..3,
    )
        .prop_map(|((m, k, n), trans_a, trans_b, batch, mode)| {
            let a2 = if trans_a { vec![k, m] } else { vec![m, k] };
            let b2 = if trans_b { vec![n, k] } else { vec![k, n] };
            let with_batch = |mat: &[usize]| [batch.as_slice(), mat].concat();
            let (a_batched, b_batched) = match mode {
                0 => (true, true),
                1 => (true, false),
                _ => (false, true),
            };
            let a = if a_batched { with_batch(&a2) } else { a2 };
            let b = if b_batched { with_batch(&b2) } else { b2 };
            MatmulCase { a, b, m, n, trans_a, trans_b, batch }
        })
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_matmul(case in matmul_case(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&case.a, &mut rng), randn(&case.b, &mut rng));
        let (ta, tb) = (case.trans_a, case.trans_b);
        check(|v| v[0].matmul_t(&v[1], ta, tb), &[a, b], seed)?;
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn matmul_equals_naive_triple_loop(case in matmul_case(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&case.a, &mut rng), randn(&case.b, &mut rng));
        let got = matmul::matmul(&a, &b, case.trans_a, case.trans_b).unwrap();
        let expect_dims = [case.batch.as_slice(), &[case.m, case.n]].concat();
        prop_assert_eq!(got.dims(), expect_dims.as_slice());
        let (naive, mag) = naive_matmul(&a, &b, case.trans_a, case.trans_b);
        for (i, (g, (e, m))) in values(&got).iter().zip(naive.iter().zip(&mag)).enumerate() {
            let tol = 1e-5 * (1.0 + m);
            prop_assert!(((*g as f64) - e).abs() <= tol, "element {}: {} vs naive {} ({:?})", i, g, e, case);
        }
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    // Inner dimensions differ.
    assert_err(
        matmul::matmul(&z(&[2, 3]), &z(&[4, 5]), false, false),
        "matmul",
        &["[2, 3]", "[4, 5]"],
    );
    // ... also after the transpose flags are applied.
    assert_err(matmul::matmul(&z(&[2, 3]), &z(&[2, 3]), false, false), "matmul", &["[2, 3]"]);
    assert_err(
        matmul::matmul(&z(&[3, 2]), &z(&[4, 3]), false, true),
        "matmul",
        &["[3, 2]", "[4, 3]"],
    );
    // Rank 1 operand.
    assert_err(matmul::matmul(&z(&[3]), &z(&[3, 2]), false, false), "matmul", &["[3]", "[3, 2]"]);
    // Batch dims that neither match nor are shared.
    assert_err(
        matmul::matmul(&z(&[2, 3, 4]), &z(&[3, 4, 5]), false, false),
        "matmul",
        &["[2, 3, 4]", "[3, 4, 5]"],
    );
    assert_err(
        matmul::matmul(&z(&[2, 2, 3, 4]), &z(&[2, 4, 5]), false, false),
        "matmul",
        &["[2, 2, 3, 4]", "[2, 4, 5]"],
    );
}
