//! CPU reference kernels for reductions and broadcasting.
//!
//! Every reduction works in the (outer, dim, inner) view of its axis; each output element is
//! accumulated by one thread in index order along the reduced axis, whatever the split.

use super::reduced_dims;
use crate::{cpu_tensor, for_each_row_mut, strided_row_offset, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use std::borrow::Cow;
use tokenformer_core::{Result, Shape, Tensor};

pub(crate) fn sum(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let reduced: Vec<bool> = (0..x.rank()).map(|axis| axes.contains(&axis)).collect();
    let data = sum_over(x.cpu_slice("sum")?, x.dims(), &reduced);
    Ok(cpu_tensor(data, &reduced_dims(x.dims(), axes, keepdim)))
}

pub(crate) fn mean(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let reduced: Vec<bool> = (0..x.rank()).map(|axis| axes.contains(&axis)).collect();
    let count: usize = axes.iter().map(|&axis| x.dims()[axis]).product();
    let mut data = sum_over(x.cpu_slice("mean")?, x.dims(), &reduced);
    let count = count as f32;
    data.iter_mut().for_each(|v| *v /= count);
    Ok(cpu_tensor(data, &reduced_dims(x.dims(), axes, keepdim)))
}

pub(crate) fn max(x: &Tensor, axis: usize, keepdim: bool) -> Result<Tensor> {
    let data = x.cpu_slice("max")?;
    let (outer, dim, inner) = x.shape().split_at_axis(axis);
    let winners = argmax_axis(data, outer, dim, inner);
    let values = winners.iter().map(|&i| data[i]).collect();
    Ok(cpu_tensor(values, &reduced_dims(x.dims(), &[axis], keepdim)))
}

pub(crate) fn sum_all(x: &Tensor) -> Result<Tensor> {
    // One scalar from possibly millions of terms: accumulate in f64, in index order.
    let total: f64 = x.cpu_slice("sum_all")?.iter().map(|&v| v as f64).sum();
    Ok(Tensor::scalar(total as f32))
}

pub(crate) fn broadcast_to(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let src = x.cpu_slice("broadcast_to")?;
    if x.dims() == dims {
        return Ok(x.clone());
    }
    let target = Shape::new(dims);
    let strides = x.shape().broadcast_strides(&target);
    let outer_rank = dims.len().saturating_sub(1);
    let row_len = dims.last().copied().unwrap_or(1);
    let last_step = strides.get(outer_rank).copied().unwrap_or(0);
    let mut out = vec![0.0; target.numel()];
    for_each_row_mut(&mut out, row_len, |row, dst| {
        let start = strided_row_offset(row, &dims[..outer_rank], &strides[..outer_rank]);
        if last_step == 1 {
            dst.copy_from_slice(&src[start..start + row_len]);
        } else {
            dst.fill(src[start]);
        }
    });
    Ok(cpu_tensor(out, dims))
}

pub(crate) fn sum_to_shape(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if x.dims() == dims {
        return Ok(x.clone());
    }
    let reduced = super::broadcast_axes(x.dims(), dims);
    Ok(cpu_tensor(sum_over(x.cpu_slice("sum_to_shape")?, x.dims(), &reduced), dims))
}

pub(crate) fn max_backward(x: &Tensor, axis: usize, _keepdim: bool, g: &Tensor) -> Result<Tensor> {
    // g holds one value per (outer, inner) position, with or without the kept 1.
    let (outer, dim, inner) = x.shape().split_at_axis(axis);
    let winners = argmax_axis(x.cpu_slice("max_backward")?, outer, dim, inner);
    let mut out = vec![0.0; x.numel()];
    for (&winner, &gv) in winners.iter().zip(g.cpu_slice("max_backward")?) {
        out[winner] = gv;
    }
    Ok(cpu_tensor(out, x.dims()))
}

/// Flat index of the first maximum along the middle axis of an (outer, dim, inner) view, for
/// every (outer, inner) position. `dim` must be at least 1.
fn argmax_axis(x: &[f32], outer: usize, dim: usize, inner: usize) -> Vec<usize> {
    let mut winners = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let first = o * dim * inner + i;
            let mut best = first;
            for d in 1..dim {
                let at = first + d * inner;
                if x[at] > x[best] {
                    best = at;
                }
            }
            winners.push(best);
        }
    }
    winners
}

/// Sums `x` (shaped `dims`) over the axes flagged in `reduced`; the result's layout is the
/// same with or without the reduced axes kept as 1s. Adjacent axes with the same flag are
/// merged first, so the common cases ([B, T, d] → [d], rows of a matrix) are one pass.
fn sum_over(x: &[f32], dims: &[usize], reduced: &[bool]) -> Vec<f32> {
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (&d, &r) in dims.iter().zip(reduced) {
        if d == 1 {
            continue; // a length-1 axis neither moves data nor sums anything
        }
        match groups.last_mut() {
            Some((size, flag)) if *flag == r => *size *= d,
            _ => groups.push((d, r)),
        }
    }
    let mut sizes: Vec<usize> = groups.iter().map(|&(size, _)| size).collect();
    let mut current = Cow::Borrowed(x);
    for (i, &(_, is_reduced)) in groups.iter().enumerate().rev() {
        if is_reduced {
            let outer = sizes[..i].iter().product();
            let inner = sizes[i + 1..].iter().product();
            current = Cow::Owned(sum_axis(&current, outer, sizes[i], inner));
            sizes[i] = 1;
        }
    }
    current.into_owned()
}

/// out[o, i] = Σ_d x[o, d, i], each sum taken in order of d.
fn sum_axis(x: &[f32], outer: usize, dim: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * inner];
    if out.is_empty() {
        return out;
    }
    let parallel = x.len() >= PARALLEL_MIN_ELEMS;
    if inner == 1 {
        let row_sum = |(o, dst): (usize, &mut f32)| {
            *dst = x[o * dim..(o + 1) * dim].iter().fold(0.0, |acc, &v| acc + v);
        };
        if parallel {
            out.par_iter_mut()
                .enumerate()
                .with_min_len((4096 / dim.max(1)).max(1))
                .for_each(row_sum);
        } else {
            out.iter_mut().enumerate().for_each(row_sum);
        }
        return out;
    }
    // Each task owns a block of columns of one outer slab and adds the `dim` rows into it: at
    // most 1024 columns, and at least eight blocks where the slab is wide enough, so that a
    // [rows, d] gradient summed to [d] (a bias's) spreads over the threads.
    let block = inner.div_ceil(8).next_multiple_of(16).min(1024);
    let add_rows = |o: usize, first_col: usize, dst: &mut [f32]| {
        for d in 0..dim {
            let src = &x[(o * dim + d) * inner + first_col..][..dst.len()];
            for (acc, &v) in dst.iter_mut().zip(src) {
                *acc += v;
            }
        }
    };
    if parallel {
        out.par_chunks_mut(inner).enumerate().for_each(|(o, slab)| {
            slab.par_chunks_mut(block).enumerate().for_each(|(b, dst)| add_rows(o, b * block, dst));
        });
    } else {
        out.chunks_mut(inner).enumerate().for_each(|(o, slab)| add_rows(o, 0, slab));
    }
    out
}
