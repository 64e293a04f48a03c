//! Reductions and broadcasts: sum, mean, max and broadcast_to with their gradients.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::Var;
use tokenformer::core::{Device, Result, Rng, Tensor};
use tokenformer::ops::reduce;
use tokenformer::ops::testing::broadcast_dims;

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_sum_mean_over_axes(
        dims in shape(),
        pick in prop::collection::vec(any::<bool>(), 4),
        keepdim in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let mut axes: Vec<usize> = (0..dims.len()).filter(|&i| pick[i]).collect();
        if axes.is_empty() {
            axes.push(rng.below(dims.len() as u64) as usize);
        }
        // Axes in any order name the same reduction.
        shuffle(&mut axes, &mut rng);
        let x = randn(&dims, &mut rng);
        check(|v| v[0].sum(&axes, keepdim), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].mean(&axes, keepdim), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sum_all(), &[x], seed)?;
    }

    #[test]
    fn grad_max_over_axis(
        dims in shape(),
        axis in 0usize..4,
        keepdim in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let axis = axis % dims.len();
        // Grid spacing 0.1 against a finite-difference step of 0.01: the winner never changes.
        let x = distinct(&dims, 0.1, &mut Rng::new(seed));
        check(|v| v[0].max(axis, keepdim), &[x], seed)?;
    }

    #[test]
    fn grad_broadcast_to_kernel((small, big) in broadcast_pair(), seed in any::<u64>()) {
        // broadcast_to and sum_to_shape are each other's adjoint; checked as a user-defined op.
        let target = broadcast_dims(&small, &big);
        let x = randn(&small, &mut Rng::new(seed));
        let op = |v: &[Var]| -> Result<Var> {
            let y = reduce::broadcast_to(v[0].value(), &target)?;
            let dims = v[0].dims().to_vec();
            Ok(Var::from_op("broadcast_to", y, &[&v[0]], Box::new(move |g| {
                Ok(vec![Some(reduce::sum_to_shape(g, &dims)?)])
            })))
        };
        check(op, &[x], seed)?;
    }
}

#[test]
fn max_gradient_goes_to_the_first_of_tied_maxima() {
    let x = tensor(vec![1.0, 3.0, 3.0, 2.0, 5.0, 5.0], &[2, 3]);
    let g = tensor(vec![10.0, 20.0], &[2]);
    let gx = values(&reduce::max_backward(&x, 1, false, &g).unwrap());
    assert_eq!(gx, vec![0.0, 10.0, 0.0, 0.0, 20.0, 0.0]);
    assert_eq!(values(&reduce::max(&x, 1, false).unwrap()), vec![3.0, 5.0]);
}

#[test]
fn reductions_reject_bad_axes() {
    let x = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
    assert_err(reduce::sum(&x, &[2], false), "sum", &["[2, 3]"]);
    assert_err(reduce::mean(&x, &[0, 0], false), "mean", &[]);
    assert_err(reduce::max(&x, 5, true), "max", &["[2, 3]"]);
    assert_err(reduce::max(&Tensor::scalar(1.0), 0, false), "max", &["[]"]);
}
