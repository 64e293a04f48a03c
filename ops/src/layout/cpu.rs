//! CPU reference kernels for the layout ops: plain copies, row by row.

use crate::{cpu_tensor, rows_written, strided_row_offset};
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

pub(crate) fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let src = x.cpu_slice("permute")?;
    if perm.iter().enumerate().all(|(k, &p)| k == p) {
        return Ok(x.clone());
    }
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
    let src_strides = x.shape().strides();
    // The stride in x of each output axis: output rows are read through these.
    let strides: Vec<usize> = perm.iter().map(|&p| src_strides[p]).collect();
    let (outer, last) = dims.split_at(dims.len() - 1);
    let (row_len, step) = (last[0], strides[dims.len() - 1]);
    let copy_row = |row: usize, dst: &mut [MaybeUninit<f32>]| {
        let start = strided_row_offset(row, outer, &strides[..outer.len()]);
        if step == 1 {
            for (d, &v) in dst.iter_mut().zip(&src[start..start + row_len]) {
                d.write(v);
            }
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                d.write(src[start + j * step]);
            }
        }
    };
    // SAFETY: `copy_row` writes all row_len values of its row.
    let out = unsafe { rows_written(x.numel(), row_len, copy_row) };
    Ok(cpu_tensor(out, &dims))
}

pub(crate) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let src = x.cpu_slice("narrow")?;
    let (outer, dim, inner) = x.shape().split_at_axis(axis);
    let block = len * inner;
    let mut out = Vec::with_capacity(outer * block);
    for o in 0..outer {
        out.extend_from_slice(&src[(o * dim + start) * inner..][..block]);
    }
    let mut dims = x.dims().to_vec();
    dims[axis] = len;
    Ok(cpu_tensor(out, &dims))
}

pub(crate) fn concat(xs: &[Tensor], axis: usize) -> Result<Tensor> {
    let mut dims = xs[0].dims().to_vec();
    dims[axis] = xs.iter().map(|x| x.dims()[axis]).sum();
    let (outer, _, _) = xs[0].shape().split_at_axis(axis);
    let sources = xs.iter().map(|x| x.cpu_slice("concat")).collect::<Result<Vec<_>>>()?;
    let blocks: Vec<usize> = xs.iter().map(|x| x.numel() / outer.max(1)).collect();
    let mut out = Vec::with_capacity(dims.iter().product());
    for o in 0..outer {
        for (src, &block) in sources.iter().zip(&blocks) {
            out.extend_from_slice(&src[o * block..][..block]);
        }
    }
    Ok(cpu_tensor(out, &dims))
}

pub(crate) fn narrow_backward(
    g: &Tensor,
    input_dims: &[usize],
    axis: usize,
    start: usize,
) -> Result<Tensor> {
    let src = g.cpu_slice("narrow_backward")?;
    let (outer, len, inner) = g.shape().split_at_axis(axis);
    let dim = input_dims[axis];
    let mut out = vec![0.0; input_dims.iter().product()];
    for o in 0..outer {
        out[(o * dim + start) * inner..][..len * inner]
            .copy_from_slice(&src[o * len * inner..][..len * inner]);
    }
    Ok(cpu_tensor(out, input_dims))
}
