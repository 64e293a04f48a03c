//! CPU reference kernels for the rotary embedding: one rotation per (row, pair).

use crate::{cpu_tensor, rows_written};
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope", x, cos, sin, 1.0)
}

pub(crate) fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope_backward", g, cos, sin, -1.0)
}

/// Rotates every (x₁_i, x₂_i) pair of every row by `direction`·θ (±1: forward or inverse);
/// the features past the rotated pairs, if any, pass through.
fn rotate(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    direction: f32,
) -> Result<Tensor> {
    let (cos_table, sin_table) = (cos.cpu_slice(op)?, sin.cpu_slice(op)?);
    let src = x.cpu_slice(op)?;
    let (t, d) = (x.dims()[x.rank() - 2], x.dims()[x.rank() - 1]);
    let half = cos.dims()[1];
    if half == 0 || d == 0 {
        return Ok(x.clone());
    }
    let rotate_row = |row_index: usize, dst: &mut [MaybeUninit<f32>]| {
        let position = row_index % t;
        let (cos_row, sin_row) =
            (&cos_table[position * half..][..half], &sin_table[position * half..][..half]);
        let (first, rest) = src[row_index * d..][..d].split_at(half);
        let (second, tail) = rest.split_at(half);
        let (out_first, out_rest) = dst.split_at_mut(half);
        let (out_second, out_tail) = out_rest.split_at_mut(half);
        let pairs = out_first.iter_mut().zip(out_second.iter_mut()).zip(first.iter().zip(second));
        for (((o1, o2), (&x1, &x2)), (&c, &s)) in pairs.zip(cos_row.iter().zip(sin_row)) {
            let s = direction * s;
            o1.write(x1 * c - x2 * s);
            o2.write(x2 * c + x1 * s);
        }
        for (o, &v) in out_tail.iter_mut().zip(tail) {
            o.write(v);
        }
    };
    // SAFETY: `rotate_row` writes the `half` pairs and the tail: all d values of its row.
    let out = unsafe { rows_written(src.len(), d, rotate_row) };
    Ok(cpu_tensor(out, x.dims()))
}
