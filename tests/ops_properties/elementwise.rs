//! The element-wise families, binary (with broadcasting) and unary: gradients, broadcasting
//! against explicit expansion and a naive loop, and errors.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::Var;
use tokenformer::core::{Device, Result, Rng, Tensor};
use tokenformer::ops::testing::{broadcast_dims, naive_broadcast};
use tokenformer::ops::{binary, reduce};

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_add_sub_broadcast((da, db) in broadcast_pair(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&da, &mut rng), randn(&db, &mut rng));
        check(|v| v[0].add(&v[1]), &[a.clone(), b.clone()], seed)?;
        check(|v| v[0].sub(&v[1]), &[a, b], seed)?;
    }

    #[test]
    fn grad_mul_div_broadcast((da, db) in broadcast_pair(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let a = randn(&da, &mut rng);
        let b = away_from_zero(&db, 0.5, 2.0, &mut rng);
        check(|v| v[0].mul(&v[1]), &[a.clone(), b.clone()], seed)?;
        check(|v| v[0].div(&v[1]), &[a, b], seed)?;
    }

    #[test]
    fn grad_same_operand_twice(dims in shape(), seed in any::<u64>()) {
        // x·x and x/x: both operands are the same Var, so the two gradients must add up.
        let mut rng = Rng::new(seed);
        let x = away_from_zero(&dims, 0.5, 2.0, &mut rng);
        check(|v| v[0].mul(&v[0]), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].div(&v[0])?.add(&v[0]), &[x], seed)?;
    }

    #[test]
    fn grad_neg_affine_scale_add_scalar(
        dims in shape(),
        seed in any::<u64>(),
        mul in -3.0f32..3.0,
        add in -3.0f32..3.0,
    ) {
        let x = randn(&dims, &mut Rng::new(seed));
        check(|v| v[0].neg(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].affine(mul, add), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].scale(mul), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].add_scalar(add), &[x], seed)?;
    }

    #[test]
    fn grad_exp_square_gelu(dims in shape(), seed in any::<u64>()) {
        let x = randn(&dims, &mut Rng::new(seed));
        check(|v| v[0].exp(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].square(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].gelu(), &[x], seed)?;
    }

    #[test]
    fn grad_relu_tanh_sigmoid(dims in shape(), seed in any::<u64>()) {
        // relu away from its kink: a finite difference across 0 measures neither side's slope.
        let mut rng = Rng::new(seed);
        let away = away_from_zero(&dims, 0.1, 3.0, &mut rng);
        check(|v| v[0].relu(), std::slice::from_ref(&away), seed)?;
        // The three chained, as in a small MLP (tanh keeps the sign, so relu's input stays
        // away from 0 too).
        check(|v| v[0].tanh()?.relu()?.sigmoid(), &[away], seed)?;
        let x = Tensor::randn(&dims, 2.0, &mut rng);
        check(|v| v[0].tanh(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sigmoid(), &[x], seed)?;
    }

    #[test]
    fn grad_log_sqrt_powf(
        dims in shape(),
        seed in any::<u64>(),
        p in prop_oneof![
            prop::sample::select(vec![-1.5f32, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0]),
            -2.0f32..3.0,
        ],
    ) {
        // Positive inputs well away from 0, where log, sqrt and x^p are smooth.
        let x = Tensor::rand_uniform(&dims, 0.5, 2.0, &mut Rng::new(seed));
        check(|v| v[0].log(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sqrt(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].powf(p), &[x], seed)?;
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn broadcasting_equals_expansion_and_naive_loop(
        (da, db) in broadcast_pair(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&da, &mut rng), randn(&db, &mut rng));
        let out = broadcast_dims(&da, &db);
        let a_full = reduce::broadcast_to(&a, &out).unwrap();
        let b_full = reduce::broadcast_to(&b, &out).unwrap();
        prop_assert_eq!(a_full.dims(), out.as_slice());
        type Kernel = fn(&Tensor, &Tensor) -> Result<Tensor>;
        type Naive = fn(f32, f32) -> f32;
        let cases: [(&str, Kernel, Naive); 4] = [
            ("add", binary::add, |x, y| x + y),
            ("mul", binary::mul, |x, y| x * y),
            ("sub", binary::sub, |x, y| x - y),
            ("div", binary::div, |x, y| x / y),
        ];
        for (name, kernel, f) in cases {
            let got = kernel(&a, &b).unwrap();
            let expanded = kernel(&a_full, &b_full).unwrap();
            let (naive_dims, naive) = naive_broadcast(&a, &b, f);
            prop_assert_eq!(got.dims(), naive_dims.as_slice(), "{} dims", name);
            prop_assert_eq!(bits(&got), bits(&expanded), "{} vs expanded operands", name);
            let naive_bits: Vec<u32> = naive.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(bits(&got), naive_bits, "{} vs naive loop", name);
        }
        // sum_to_shape undoes broadcast_to up to the multiplicity of each element.
        let count = (numel(&out) / numel(&da).max(1)) as f32;
        let back = values(&reduce::sum_to_shape(&a_full, &da).unwrap());
        for (x, y) in values(&a).iter().zip(&back) {
            prop_assert!((x * count - y).abs() <= 1e-5 * (1.0 + y.abs()), "{} vs {}", x * count, y);
        }
    }
}

#[test]
fn binary_rejects_shapes_that_do_not_broadcast() {
    let a = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], Device::Cpu).unwrap();
    assert_err(binary::add(&a, &b), "add", &["[2, 3]", "[4]"]);
    assert_err(binary::sub(&a, &b), "sub", &["[2, 3]", "[4]"]);
    assert_err(binary::mul(&b, &a), "mul", &["[2, 3]", "[4]"]);
    assert_err(binary::div(&a, &b), "div", &["[2, 3]", "[4]"]);
    let c = Tensor::zeros(&[3, 2, 3], Device::Cpu).unwrap();
    assert_err(
        binary::add(&c, &Tensor::zeros(&[2, 2, 3], Device::Cpu).unwrap()),
        "add",
        &["[3, 2, 3]", "[2, 2, 3]"],
    );
    assert_err(reduce::broadcast_to(&a, &[3, 3]), "broadcast_to", &["[2, 3]", "[3, 3]"]);
    // A Var op passes the kernel's error through.
    let err = Var::param(a).add(&Var::param(b)).unwrap_err().to_string();
    assert!(err.contains("add") && err.contains("[2, 3]") && err.contains("[4]"), "{err}");
}
