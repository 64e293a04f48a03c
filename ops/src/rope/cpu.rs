//! CPU reference kernels for the rotary embedding: one rotation per (row, pair).

use crate::{cpu_tensor, for_each_row_mut};
use tokenformer_core::{Result, Tensor};

pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope", x, cos, sin, 1.0)
}

pub(crate) fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope_backward", g, cos, sin, -1.0)
}

/// Rotates every (x₁_i, x₂_i) pair of every row by `direction`·θ (±1: forward or inverse).
fn rotate(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    direction: f32,
) -> Result<Tensor> {
    let (cos_table, sin_table) = (cos.cpu_slice(op)?, sin.cpu_slice(op)?);
    let mut out = x.cpu_slice(op)?.to_vec();
    let (t, d) = (x.dims()[x.rank() - 2], x.dims()[x.rank() - 1]);
    let half = cos.dims()[1];
    if half == 0 {
        return Ok(cpu_tensor(out, x.dims()));
    }
    for_each_row_mut(&mut out, d, |row_index, row| {
        let position = row_index % t;
        let (cos_row, sin_row) =
            (&cos_table[position * half..][..half], &sin_table[position * half..][..half]);
        let (first, rest) = row.split_at_mut(half);
        for (((x1, x2), &c), &s) in
            first.iter_mut().zip(&mut rest[..half]).zip(cos_row).zip(sin_row)
        {
            let s = direction * s;
            (*x1, *x2) = (*x1 * c - *x2 * s, *x2 * c + *x1 * s);
        }
    });
    Ok(cpu_tensor(out, x.dims()))
}
