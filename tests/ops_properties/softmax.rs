//! Softmax, log-softmax and the causal softmax; and a wrong backward that gradcheck must catch.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::{gradcheck, GradcheckOptions, Var};
use tokenformer::core::{Device, Result, Rng, Tensor};
use tokenformer::ops::{binary, reduce, softmax};

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_softmax_log_softmax(dims in shape(), seed in any::<u64>()) {
        let x = Tensor::randn(&dims, 2.0, &mut Rng::new(seed));
        check(|v| v[0].softmax(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].log_softmax(), &[x], seed)?;
    }

    #[test]
    fn grad_causal_softmax_kernel(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..6,
        scale in 0.2f32..2.0,
        seed in any::<u64>(),
    ) {
        // causal_softmax has no Var method of its own (attention uses it); its backward kernel
        // is checked here through a user-defined op.
        let dims = [lead.as_slice(), &[t, t]].concat();
        let x = randn(&dims, &mut Rng::new(seed));
        let op = |v: &[Var]| -> Result<Var> {
            let p = softmax::causal_softmax(v[0].value(), scale)?;
            let saved = p.clone();
            Ok(Var::from_op("causal_softmax", p, &[&v[0]], Box::new(move |g| {
                Ok(vec![Some(softmax::causal_softmax_backward(&saved, g, scale)?)])
            })))
        };
        check(op, &[x], seed)?;
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn softmax_rows_are_distributions(
        dims in shape(),
        std in prop::sample::select(vec![0.1f32, 1.0, 10.0, 100.0]),
        seed in any::<u64>(),
    ) {
        // Large spreads check the max subtraction: exp of unshifted scores would overflow.
        let x = Tensor::randn(&dims, std, &mut Rng::new(seed));
        let row = *dims.last().unwrap();
        let xv = values(&x);
        let y = values(&softmax::softmax(&x).unwrap());
        let ly = values(&softmax::log_softmax(&x).unwrap());
        for (r, (p, lp)) in y.chunks(row).zip(ly.chunks(row)).enumerate() {
            prop_assert!(p.iter().all(|v| v.is_finite() && *v >= 0.0), "row {} {:?}", r, p);
            let s: f64 = p.iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() <= 1e-5, "row {} sums to {}", r, s);
            let ls: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
            prop_assert!(lp.iter().all(|v| v.is_finite() && *v <= 0.0), "log row {} {:?}", r, lp);
            // log_softmax subtracts max + ln Σ as one f32, which carries the rounding of the
            // max (reported; log_softmax_is_accurate_for_large_logits below): the tolerance
            // grows with the largest logit.
            let top = xv[r * row..][..row].iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let tol = 1e-5 + 2.0 * f32::EPSILON as f64 * top;
            prop_assert!((ls - 1.0).abs() <= tol, "exp(log_softmax) row {} sums to {}", r, ls);
        }
    }

    #[test]
    fn causal_softmax_is_masked_softmax(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..7,
        scale in 0.05f32..3.0,
        seed in any::<u64>(),
    ) {
        let dims = [lead.as_slice(), &[t, t]].concat();
        let x = Tensor::randn(&dims, 3.0, &mut Rng::new(seed));
        let xs = values(&x);
        let p = values(&softmax::causal_softmax(&x, scale).unwrap());
        prop_assert_eq!(p.len(), xs.len());
        for (r, (row, xrow)) in p.chunks(t).zip(xs.chunks(t)).enumerate() {
            let i = r % t;
            prop_assert!(row[i + 1..].iter().all(|&v| v == 0.0), "row {} above diagonal: {:?}", r, row);
            // Reference: softmax of scale·x over columns 0..=i, in f64.
            let m = xrow[..=i].iter().map(|&v| (scale * v) as f64).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = xrow[..=i].iter().map(|&v| ((scale * v) as f64 - m).exp()).sum();
            for j in 0..=i {
                let e = ((scale * xrow[j]) as f64 - m).exp() / z;
                prop_assert!(row[j] >= 0.0 && (row[j] as f64 - e).abs() <= 1e-6, "row {} col {}: {} vs {}", r, j, row[j], e);
            }
        }
    }
}

#[test]
fn log_softmax_is_accurate_for_large_logits() {
    let x = tensor(vec![1000.0, 999.3, 998.1, 1000.2, 990.0, 999.9], &[2, 3]);
    let got = values(&softmax::log_softmax(&x).unwrap());
    for (row, out) in values(&x).chunks(3).zip(got.chunks(3)) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        for (&v, &y) in row.iter().zip(out) {
            let want = (v as f64 - m) - lse;
            assert!((y as f64 - want).abs() <= 1e-6, "{y} vs {want} (row {row:?})");
        }
    }
}

/// softmax forward with a backward that subtracts the row mean of g instead of Σ g⊙y:
/// y⊙(g − mean g). For g = 1 (the gradient of a plain sum) both give exactly 0, so comparing
/// against the derivative of Σ y passes; any other g exposes the error.
fn softmax_with_wrong_backward(v: &[Var]) -> Result<Var> {
    let y = softmax::softmax(v[0].value())?;
    let saved = y.clone();
    Ok(Var::from_op(
        "softmax_wrong_backward",
        y,
        &[&v[0]],
        Box::new(move |g| {
            let last = g.dims().len() - 1;
            let mean = reduce::mean(g, &[last], true)?;
            let centred = binary::sub(g, &mean)?;
            Ok(vec![Some(binary::mul(&saved, &centred)?)])
        }),
    ))
}

#[test]
fn random_weights_catch_a_backward_that_a_plain_sum_hides() {
    let x = Tensor::randn(&[3, 5], 1.5, &mut Rng::new(11));

    // With a plain sum as the loss, the wrong backward agrees with the truth: d(Σ softmax)/dx
    // is 0 everywhere, and y⊙(1 − mean 1) is 0 too.
    let p = Var::param(x.clone());
    let out = softmax_with_wrong_backward(std::slice::from_ref(&p)).unwrap();
    let grads = out.backward_with(Tensor::ones(out.dims(), Device::Cpu).unwrap()).unwrap();
    let g = values(grads.get(&p).unwrap());
    assert!(g.iter().all(|v| v.abs() < 1e-6), "plain-sum gradient should vanish: {g:?}");

    // The right backward passes gradcheck, the wrong one does not.
    gradcheck(|v| v[0].softmax(), std::slice::from_ref(&x), &GradcheckOptions::default()).unwrap();
    let err = gradcheck(softmax_with_wrong_backward, &[x], &GradcheckOptions::default())
        .expect_err("gradcheck must reject y⊙(g − mean g)");
    assert!(err.to_string().contains("gradcheck: input 0"), "{err}");
}

#[test]
fn softmaxes_reject_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    assert_err(softmax::causal_softmax(&z(&[2, 3]), 1.0), "causal_softmax", &["[2, 3]"]);
    assert_err(softmax::softmax(&Tensor::scalar(0.0)), "softmax", &[]);
}
