//! Moving data without arithmetic: permute (and transpose), narrow, concat.
//!
//! Forward: permute moves axis `perm[k]` of x to position k (`out.dims[k] = x.dims[perm[k]]`);
//! narrow keeps indices `start..start+len` of one axis; concat joins tensors along one axis.
//!
//! Backward: each op only moves elements, so the gradient moves them back: permute by the
//! inverse permutation, narrow by writing g into zeros at the same offset, concat by narrowing
//! g back into one piece per input.

mod cpu;
mod cuda;

pub(crate) use cuda::strided_gather as strided_gather_cuda;

use tokenformer_core::{Device, Error, Result, Shape, Tensor};

fn check_perm(op: &'static str, dims: &[usize], perm: &[usize]) -> Result<()> {
    let mut seen = vec![false; dims.len()];
    let valid = perm.len() == dims.len()
        && perm.iter().all(|&p| p < dims.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::shape(
            op,
            format!("{perm:?} is not a permutation of the axes of shape {}", Shape::new(dims)),
        ));
    }
    Ok(())
}

/// Reorders the axes: `out.dims[k] = x.dims[perm[k]]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    check_perm("permute", x.dims(), perm)?;
    match x.device() {
        Device::Cpu => cpu::permute(x, perm),
        Device::Cuda(_) => cuda::permute(x, perm),
    }
}

/// Swaps axes `a` and `b` (a permute).
pub fn transpose(x: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    x.shape().check_axis("transpose", a)?;
    x.shape().check_axis("transpose", b)?;
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.swap(a, b);
    permute(x, &perm)
}

/// Indices start..start+len of `axis`.
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    x.shape().check_axis("narrow", axis)?;
    if start.checked_add(len).is_none_or(|end| end > x.dims()[axis]) {
        return Err(Error::shape(
            "narrow",
            format!("range {start}..{start}+{len} exceeds axis {axis} of shape {}", x.shape()),
        ));
    }
    match x.device() {
        Device::Cpu => cpu::narrow(x, axis, start, len),
        Device::Cuda(_) => cuda::narrow(x, axis, start, len),
    }
}

/// Joins tensors along `axis`; every other axis must agree.
pub fn concat(xs: &[Tensor], axis: usize) -> Result<Tensor> {
    let refs: Vec<&Tensor> = xs.iter().collect();
    let device = crate::same_device("concat", &refs)?;
    let first = &xs[0];
    first.shape().check_axis("concat", axis)?;
    for x in &xs[1..] {
        let compatible = x.rank() == first.rank()
            && x.dims().iter().zip(first.dims()).enumerate().all(|(i, (a, b))| i == axis || a == b);
        if !compatible {
            return Err(Error::shape(
                "concat",
                format!("shapes {} and {} differ off axis {axis}", first.shape(), x.shape()),
            ));
        }
    }
    match device {
        Device::Cpu => cpu::concat(xs, axis),
        Device::Cuda(_) => cuda::concat(xs, axis),
    }
}

pub fn permute_backward(g: &Tensor, perm: &[usize]) -> Result<Tensor> {
    check_perm("permute_backward", g.dims(), perm)?;
    // The inverse permutation undoes the forward one.
    let mut inverse = vec![0; perm.len()];
    for (k, &p) in perm.iter().enumerate() {
        inverse[p] = k;
    }
    permute(g, &inverse)
}

/// ∂L/∂x of `narrow(x, axis, start, g.dims[axis])` for x shaped `input_dims`.
pub fn narrow_backward(
    g: &Tensor,
    input_dims: &[usize],
    axis: usize,
    start: usize,
) -> Result<Tensor> {
    let input = Shape::new(input_dims);
    input.check_axis("narrow_backward", axis)?;
    let fits = g.rank() == input.rank()
        && g.dims().iter().zip(input_dims).enumerate().all(|(i, (&gd, &xd))| {
            if i == axis {
                start.checked_add(gd).is_some_and(|end| end <= xd)
            } else {
                gd == xd
            }
        });
    if !fits {
        return Err(Error::shape(
            "narrow_backward",
            format!(
                "gradient of shape {} does not fit shape {input} at offset {start} of axis {axis}",
                g.shape()
            ),
        ));
    }
    match g.device() {
        Device::Cpu => cpu::narrow_backward(g, input_dims, axis, start),
        Device::Cuda(_) => cuda::narrow_backward(g, input_dims, axis, start),
    }
}

/// The gradients of concat's inputs, whose extents along `axis` were `sizes`.
pub fn concat_backward(g: &Tensor, sizes: &[usize], axis: usize) -> Result<Vec<Tensor>> {
    g.shape().check_axis("concat_backward", axis)?;
    if sizes.iter().sum::<usize>() != g.dims()[axis] {
        return Err(Error::shape(
            "concat_backward",
            format!("sizes {sizes:?} do not add up to axis {axis} of shape {}", g.shape()),
        ));
    }
    // Device-independent: the pieces are narrows of g.
    let mut start = 0;
    let mut pieces = Vec::with_capacity(sizes.len());
    for &len in sizes {
        pieces.push(narrow(g, axis, start, len)?);
        start += len;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, randn, ravel, unravel, values};

    #[test]
    fn permute_matches_index_definition() {
        let x = randn(&[2, 3, 4, 5], 1);
        let xv = values(&x);
        for perm in [[0, 2, 1, 3], [3, 2, 1, 0], [1, 3, 0, 2], [0, 1, 2, 3]] {
            let y = permute(&x, &perm).unwrap();
            let yv = values(&y);
            for (flat, &v) in yv.iter().enumerate() {
                let out_index = unravel(flat, y.dims());
                let mut in_index = vec![0; 4];
                for (k, &p) in perm.iter().enumerate() {
                    in_index[p] = out_index[k];
                }
                assert_eq!(v, xv[ravel(&in_index, x.dims())], "perm {perm:?}");
            }
            let back = permute_backward(&y, &perm).unwrap();
            assert_eq!(values(&back), xv);
        }
        let t = transpose(&randn(&[3, 7], 2), 0, 1).unwrap();
        assert_eq!(t.dims(), &[7, 3]);
        assert_eq!(values(&t)[1], values(&randn(&[3, 7], 2))[7]);
    }

    #[test]
    fn narrow_concat_and_their_backwards() {
        let x = randn(&[3, 5, 2], 3);
        let n = narrow(&x, 1, 1, 3).unwrap();
        assert_eq!(n.dims(), &[3, 3, 2]);
        let (xv, nv) = (values(&x), values(&n));
        for (flat, &v) in nv.iter().enumerate() {
            let mut index = unravel(flat, n.dims());
            index[1] += 1;
            assert_eq!(v, xv[ravel(&index, x.dims())]);
        }
        let g = randn(&[3, 3, 2], 4);
        check_grad("narrow", &x, &g, &narrow_backward(&g, x.dims(), 1, 1).unwrap(), |t| {
            narrow(t, 1, 1, 3).unwrap()
        });

        let parts = [randn(&[3, 2, 2], 5), randn(&[3, 1, 2], 6), randn(&[3, 4, 2], 7)];
        let joined = concat(&parts, 1).unwrap();
        assert_eq!(joined.dims(), &[3, 7, 2]);
        let pieces = concat_backward(&joined, &[2, 1, 4], 1).unwrap();
        for (piece, part) in pieces.iter().zip(&parts) {
            assert_eq!(values(piece), values(part));
        }
        assert_eq!(values(&narrow(&joined, 1, 2, 1).unwrap()), values(&parts[1]));
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let x = randn(&[2, 3], 1);
        assert!(permute(&x, &[0, 0]).is_err());
        assert!(permute(&x, &[0]).is_err());
        assert!(transpose(&x, 0, 2).is_err());
        let err = narrow(&x, 1, 2, 2).unwrap_err().to_string();
        assert!(err.contains("narrow") && err.contains("[2, 3]"), "{err}");
        assert!(narrow(&x, 1, usize::MAX, 2).is_err());
        assert!(concat(&[], 0).is_err());
        assert!(concat(&[x.clone(), randn(&[3, 3], 2)], 1).is_err());
        assert!(concat_backward(&x, &[1, 1], 1).is_err());
        assert!(narrow_backward(&x, &[2, 4], 1, 2).is_err());
    }
}
