//! CPU reference kernels for the broadcasting binary ops.

use super::Binary;
use crate::{cpu_tensor, for_each_row_mut, map1, map2, strided_row_offset};
use tokenformer_core::{Result, Shape, Tensor};

/// a ∘ b for the op `op`, over the broadcast shape.
pub(crate) fn forward(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = op.name();
    match op {
        Binary::Add => zip_broadcast(name, a, b, |x, y| x + y),
        Binary::Sub => zip_broadcast(name, a, b, |x, y| x - y),
        Binary::Mul => zip_broadcast(name, a, b, |x, y| x * y),
        Binary::Div => zip_broadcast(name, a, b, |x, y| x / y),
    }
}

/// x += y element by element (equal lengths), in parallel chunks when large.
pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 8192;
    let add = |(x, y): (&mut [f32], &[f32])| x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
    if x.len() >= crate::PARALLEL_MIN_ELEMS {
        x.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(add);
    } else {
        add((x, y));
    }
}

/// out = f(a, b) over the broadcast shape. Equal shapes and a one-element operand take plain
/// slice loops; the general case walks output rows, locating each operand's row through its
/// broadcast strides once per row.
fn zip_broadcast<F>(op: &'static str, a: &Tensor, b: &Tensor, f: F) -> Result<Tensor>
where
    F: Fn(f32, f32) -> f32 + Sync + Send + Copy,
{
    let (x, y) = (a.cpu_slice(op)?, b.cpu_slice(op)?);
    if a.dims() == b.dims() {
        return Ok(cpu_tensor(map2(x, y, f), a.dims()));
    }
    let out = Shape::broadcast(op, a.shape(), b.shape())?;
    if b.numel() == 1 && out.dims() == a.dims() {
        let s = y[0];
        return Ok(cpu_tensor(map1(x, move |v| f(v, s)), a.dims()));
    }
    if a.numel() == 1 && out.dims() == b.dims() {
        let s = x[0];
        return Ok(cpu_tensor(map1(y, move |v| f(s, v)), b.dims()));
    }

    let dims = out.dims();
    let outer_rank = dims.len().saturating_sub(1);
    let (outer_dims, row_len) = (&dims[..outer_rank], dims.last().copied().unwrap_or(1));
    let a_strides = a.shape().broadcast_strides(&out);
    let b_strides = b.shape().broadcast_strides(&out);
    let (a_outer, a_step) =
        (&a_strides[..outer_rank], a_strides.get(outer_rank).copied().unwrap_or(0));
    let (b_outer, b_step) =
        (&b_strides[..outer_rank], b_strides.get(outer_rank).copied().unwrap_or(0));

    let mut data = vec![0.0; out.numel()];
    for_each_row_mut(&mut data, row_len, |row, dst| {
        let a_start = strided_row_offset(row, outer_dims, a_outer);
        let b_start = strided_row_offset(row, outer_dims, b_outer);
        match (a_step, b_step) {
            (1, 1) => {
                let (ar, br) = (&x[a_start..a_start + row_len], &y[b_start..b_start + row_len]);
                for ((d, &u), &v) in dst.iter_mut().zip(ar).zip(br) {
                    *d = f(u, v);
                }
            }
            (1, _) => {
                let v = y[b_start];
                for (d, &u) in dst.iter_mut().zip(&x[a_start..a_start + row_len]) {
                    *d = f(u, v);
                }
            }
            (_, 1) => {
                let u = x[a_start];
                for (d, &v) in dst.iter_mut().zip(&y[b_start..b_start + row_len]) {
                    *d = f(u, v);
                }
            }
            _ => dst.fill(f(x[a_start], y[b_start])),
        }
    });
    Ok(cpu_tensor(data, dims))
}
