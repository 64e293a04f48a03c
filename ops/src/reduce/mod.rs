//! Reductions and their inverse, broadcasting.
//!
//! Forward: sum and mean over a set of axes, max over one axis, the sum of everything, and
//! broadcast_to / sum_to_shape, which copy a tensor along stretched axes and sum it back.
//!
//! Backward: every input element contributes once to its sum, so ∂sum/∂x = 1 and the gradient
//! of a sum is g broadcast back over the reduced axes; a mean divides that by the count. A max
//! passes g only to the element that won (the first one, when several tie). broadcast_to and
//! sum_to_shape are each other's adjoint: the gradient of a broadcast is a sum over the
//! stretched axes, and the gradient of that sum is a broadcast.

mod cpu;
mod cuda;

use tokenformer_core::{Device, Error, Result, Shape, Tensor};

/// Checks that `axes` are distinct axes of a tensor shaped `dims`.
fn check_axes(op: &'static str, dims: &[usize], axes: &[usize]) -> Result<()> {
    for (i, &axis) in axes.iter().enumerate() {
        if axis >= dims.len() {
            return Err(Error::shape(
                op,
                format!("axis {axis} is out of range for shape {}", Shape::new(dims)),
            ));
        }
        if axes[..i].contains(&axis) {
            return Err(Error::shape(op, format!("axis {axis} appears twice in {axes:?}")));
        }
    }
    Ok(())
}

/// The shape left after reducing `axes` of `dims` (kept as 1s when `keepdim`).
fn reduced_dims(dims: &[usize], axes: &[usize], keepdim: bool) -> Vec<usize> {
    dims.iter()
        .enumerate()
        .filter_map(|(i, &d)| match (axes.contains(&i), keepdim) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}

/// Checks that an incoming gradient has the shape the reduction produced.
fn check_reduced_grad(
    op: &'static str,
    g: &Tensor,
    input_dims: &[usize],
    axes: &[usize],
    keepdim: bool,
) -> Result<()> {
    check_axes(op, input_dims, axes)?;
    let expected = reduced_dims(input_dims, axes, keepdim);
    if g.dims() != expected.as_slice() {
        return Err(Error::shape(
            op,
            format!(
                "gradient of shape {} does not match shape {} reduced over axes {axes:?} \
                 (keepdim {keepdim}), which is {}",
                g.shape(),
                Shape::new(input_dims),
                Shape::new(&expected)
            ),
        ));
    }
    Ok(())
}

/// Sum over `axes` (none: a copy), dropping them unless `keepdim`.
pub fn sum(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    check_axes("sum", x.dims(), axes)?;
    match x.device() {
        Device::Cpu => cpu::sum(x, axes, keepdim),
        Device::Cuda(_) => cuda::sum(x, axes, keepdim),
    }
}

/// Mean over `axes`, dropping them unless `keepdim`.
pub fn mean(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    check_axes("mean", x.dims(), axes)?;
    match x.device() {
        Device::Cpu => cpu::mean(x, axes, keepdim),
        Device::Cuda(_) => cuda::mean(x, axes, keepdim),
    }
}

/// Maximum over one axis.
pub fn max(x: &Tensor, axis: usize, keepdim: bool) -> Result<Tensor> {
    x.shape().check_axis("max", axis)?;
    if x.dims()[axis] == 0 {
        return Err(Error::shape("max", format!("axis {axis} of shape {} is empty", x.shape())));
    }
    match x.device() {
        Device::Cpu => cpu::max(x, axis, keepdim),
        Device::Cuda(_) => cuda::max(x, axis, keepdim),
    }
}

/// The sum of every element, as a scalar tensor (dims []).
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::sum_all(x),
        Device::Cuda(_) => cuda::sum_all(x),
    }
}

/// `x` copied along the axes where `dims` is larger (NumPy broadcasting).
pub fn broadcast_to(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let target = Shape::new(dims);
    if Shape::broadcast("broadcast_to", x.shape(), &target)? != target {
        return Err(Error::shape(
            "broadcast_to",
            format!("shape {} cannot be broadcast to {target}", x.shape()),
        ));
    }
    match x.device() {
        Device::Cpu => cpu::broadcast_to(x, dims),
        Device::Cuda(_) => cuda::broadcast_to(x, dims),
    }
}

/// For `x_dims` broadcast from `dims` (already checked), which axes of `x_dims` were stretched:
/// the extra leading ones, and those where `dims` has a 1. Summing over them undoes the broadcast.
pub(crate) fn broadcast_axes(x_dims: &[usize], dims: &[usize]) -> Vec<bool> {
    let leading = x_dims.len() - dims.len();
    x_dims
        .iter()
        .enumerate()
        .map(|(axis, &d)| axis < leading || (dims[axis - leading] == 1 && d != 1))
        .collect()
}

/// Sums `x` over the axes that broadcasting `dims` to x's shape would stretch, giving a tensor
/// shaped `dims`: the inverse of `broadcast_to`.
pub fn sum_to_shape(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let target = Shape::new(dims);
    if Shape::broadcast("sum_to_shape", &target, x.shape())? != *x.shape() {
        return Err(Error::shape(
            "sum_to_shape",
            format!("shape {} cannot be summed to {target}", x.shape()),
        ));
    }
    match x.device() {
        Device::Cpu => cpu::sum_to_shape(x, dims),
        Device::Cuda(_) => cuda::sum_to_shape(x, dims),
    }
}

pub fn sum_backward(
    g: &Tensor,
    input_dims: &[usize],
    axes: &[usize],
    keepdim: bool,
) -> Result<Tensor> {
    check_reduced_grad("sum_backward", g, input_dims, axes, keepdim)?;
    // Device-independent: g's layout is the same with or without the kept 1s, so it is g
    // reshaped with them, broadcast back over the reduced axes.
    broadcast_to(&g.reshape(&reduced_dims(input_dims, axes, true))?, input_dims)
}

pub fn mean_backward(
    g: &Tensor,
    input_dims: &[usize],
    axes: &[usize],
    keepdim: bool,
) -> Result<Tensor> {
    check_reduced_grad("mean_backward", g, input_dims, axes, keepdim)?;
    let count: usize = axes.iter().map(|&axis| input_dims[axis]).product();
    sum_backward(&crate::unary::affine(g, 1.0 / count as f32, 0.0)?, input_dims, axes, keepdim)
}

/// ∂L/∂x of max(x, axis): g goes to the first index holding each maximum, zeros elsewhere.
pub fn max_backward(x: &Tensor, axis: usize, keepdim: bool, g: &Tensor) -> Result<Tensor> {
    crate::same_device("max_backward", &[x, g])?;
    check_reduced_grad("max_backward", g, x.dims(), &[axis], keepdim)?;
    if x.dims()[axis] == 0 {
        return Err(Error::shape(
            "max_backward",
            format!("axis {axis} of shape {} is empty", x.shape()),
        ));
    }
    match g.device() {
        Device::Cpu => cpu::max_backward(x, axis, keepdim, g),
        Device::Cuda(_) => cuda::max_backward(x, axis, keepdim, g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, naive_sum, randn, tensor, values};

    #[test]
    fn sum_and_mean_match_naive() {
        let x = randn(&[3, 5, 7, 2], 1);
        for axes in [&[][..], &[0], &[2], &[3], &[1, 2], &[0, 3], &[3, 0, 1], &[0, 1, 2, 3]] {
            let expected = naive_sum(&x, axes);
            let s = sum(&x, axes, false).unwrap();
            assert_eq!(s.dims(), reduced_dims(x.dims(), axes, false).as_slice());
            assert_close(&values(&s), &expected, 1e-5, 1e-5, &format!("sum {axes:?}"));
            let m = mean(&x, axes, true).unwrap();
            assert_eq!(m.dims(), reduced_dims(x.dims(), axes, true).as_slice());
            let count: usize = axes.iter().map(|&a| x.dims()[a]).product();
            let expected_mean: Vec<f64> = expected.iter().map(|v| v / count as f64).collect();
            assert_close(&values(&m), &expected_mean, 1e-6, 1e-5, &format!("mean {axes:?}"));
        }
        let big = randn(&[3, 70_001], 2);
        assert_close(
            &values(&sum(&big, &[0], false).unwrap()),
            &naive_sum(&big, &[0]),
            1e-5,
            1e-5,
            "par",
        );
        assert_close(
            &values(&sum(&big, &[1], false).unwrap()),
            &naive_sum(&big, &[1]),
            1e-2,
            1e-4,
            "rows",
        );
    }

    #[test]
    fn row_sums_ignore_appended_zeros() {
        let x = randn(&[4, 37], 3);
        let mut padded = Vec::new();
        for row in values(&x).chunks(37) {
            padded.extend_from_slice(row);
            padded.extend_from_slice(&[0.0; 11]);
        }
        let padded = tensor(padded, &[4, 48]);
        assert_eq!(
            values(&sum(&x, &[1], false).unwrap()),
            values(&sum(&padded, &[1], false).unwrap())
        );
    }

    #[test]
    fn max_sum_all_broadcast_and_sum_to_shape() {
        let x = tensor(vec![1.0, 5.0, 5.0, -2.0, 0.5, 3.0], &[2, 3]);
        assert_eq!(values(&max(&x, 1, false).unwrap()), vec![5.0, 3.0]);
        assert_eq!(values(&max(&x, 0, true).unwrap()), vec![1.0, 5.0, 5.0]);
        let g = tensor(vec![10.0, 20.0], &[2]);
        // The tie in row 0 sends the gradient to the first maximum only.
        assert_eq!(
            values(&max_backward(&x, 1, false, &g).unwrap()),
            vec![0.0, 10.0, 0.0, 0.0, 0.0, 20.0]
        );
        assert_eq!(sum_all(&x).unwrap().dims(), &[] as &[usize]);
        assert_eq!(values(&sum_all(&x).unwrap()), vec![12.5]);

        let row = tensor(vec![1.0, 2.0, 3.0], &[3, 1]);
        let b = broadcast_to(&row, &[2, 3, 4]).unwrap();
        assert_eq!(b.dims(), &[2, 3, 4]);
        assert_eq!(values(&b)[..8], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
        let back = sum_to_shape(&b, &[3, 1]).unwrap();
        assert_eq!(values(&back), vec![8.0, 16.0, 24.0]);
        let y = randn(&[4, 3, 5], 4);
        assert_close(
            &values(&sum_to_shape(&y, &[5]).unwrap()),
            &naive_sum(&y, &[0, 1]),
            1e-5,
            1e-5,
            "to [5]",
        );
        assert_close(
            &values(&sum_to_shape(&y, &[3, 1]).unwrap()),
            &naive_sum(&y, &[0, 2]),
            1e-5,
            1e-5,
            "to [3,1]",
        );
        assert_close(
            &values(&sum_to_shape(&y, &[]).unwrap()),
            &naive_sum(&y, &[0, 1, 2]),
            1e-5,
            1e-5,
            "to []",
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = randn(&[3, 4, 5], 5);
        for (axes, keepdim) in [(&[1][..], false), (&[0, 2], true), (&[2, 0], false)] {
            let g = randn(&reduced_dims(x.dims(), axes, keepdim), 6);
            let what = format!("{axes:?} keepdim {keepdim}");
            let gs = sum_backward(&g, x.dims(), axes, keepdim).unwrap();
            check_grad(&format!("sum {what}"), &x, &g, &gs, |t| sum(t, axes, keepdim).unwrap());
            let gm = mean_backward(&g, x.dims(), axes, keepdim).unwrap();
            check_grad(&format!("mean {what}"), &x, &g, &gm, |t| mean(t, axes, keepdim).unwrap());
        }
        let g = randn(&[3, 5], 7);
        let gx = max_backward(&x, 1, false, &g).unwrap();
        check_grad("max", &x, &g, &gx, |t| max(t, 1, false).unwrap());
        let small = randn(&[2, 1, 3], 8);
        let g = randn(&[4, 2, 5, 3], 9);
        let gb = sum_to_shape(&g, small.dims()).unwrap();
        check_grad("broadcast_to", &small, &g, &gb, |t| broadcast_to(t, &[4, 2, 5, 3]).unwrap());
    }

    #[test]
    fn errors_name_op_and_shapes() {
        let x = randn(&[2, 3], 1);
        let err = sum(&x, &[2], false).unwrap_err().to_string();
        assert!(err.contains("sum") && err.contains("[2, 3]"), "{err}");
        assert!(sum(&x, &[1, 1], false).is_err());
        assert!(broadcast_to(&x, &[3, 3]).is_err());
        assert!(sum_to_shape(&x, &[2, 2]).is_err());
        assert!(max(&randn(&[2, 0], 1), 1, false).is_err());
        let err = sum_backward(&randn(&[3], 1), &[2, 3], &[1], false).unwrap_err().to_string();
        assert!(err.contains("sum_backward"), "{err}");
    }
}
