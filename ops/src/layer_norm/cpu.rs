//! CPU kernels for layer norm: one pass over each row for the statistics and the output, one
//! for its gradient; the parameter gradients add the rows in order, a block of columns per
//! task.
//!
//! The sums along a row (mean, variance, the two means of the backward pass) run in 16
//! interleaved lanes (`crate::lanes`): the same bits every time, and independent additions that
//! vectorise. Added as one running sum, each addition waits for the previous one, and those
//! chains were most of the op's time. The row loops are compiled a second time for AVX-512 and
//! for AVX2 and picked at run time; every element is the same scalar formula in every copy.

use super::LayerNormStats;
use crate::lanes::sum2 as row_sum;
use crate::wide_loops::{width, Width};
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

/// Rows per parallel task of the row loops.
const ROWS_PER_TASK: usize = 16;
/// Columns per parallel task of the parameter gradients.
const COLUMNS_PER_TASK: usize = 16;

/// What the row loops read besides the rows: the per-feature weight and bias (ones and zeros
/// where absent: x·1 and x + 0 are the values `x̂ ⊙ w + b` has without them) and eps.
struct Params<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

/// y, μ and r of `rows.len() / d` rows.
#[inline(always)]
fn forward_rows_plain(
    p: &Params,
    rows: &[f32],
    out: &mut [MaybeUninit<f32>],
    mean: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
) {
    let d = p.weight.len();
    let rows = rows.chunks_exact(d).zip(out.chunks_exact_mut(d));
    for ((row, y), (mu, rs)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        let m = row_sum(row, row, |v, _| v) / d as f32;
        let var = row_sum(row, row, |v, _| (v - m) * (v - m)) / d as f32;
        let r_std = 1.0 / (var + p.eps).sqrt();
        for (((o, &v), &scale), &shift) in y.iter_mut().zip(row).zip(p.weight).zip(p.bias) {
            o.write((v - m) * r_std * scale + shift);
        }
        mu.write(m);
        rs.write(r_std);
    }
}

/// ∂L/∂x of `rows.len() / d` rows, from g, μ and r, with ĝ = g ⊙ w:
/// r·(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)).
#[inline(always)]
fn backward_rows_plain(
    weight: Option<&[f32]>,
    d: usize,
    (rows, grads): (&[f32], &[f32]),
    (mean, rstd): (&[f32], &[f32]),
    out: &mut [MaybeUninit<f32>],
) {
    let rows = rows.chunks_exact(d).zip(grads.chunks_exact(d)).zip(out.chunks_exact_mut(d));
    for (((row, g_row), dst), (&m, &r_std)) in rows.zip(mean.iter().zip(rstd)) {
        // ĝ is recomputed where it is needed (the same product each time) rather than staged.
        let (sum_g, sum_gx) = match weight {
            Some(w) => (
                row_sum(g_row, w, |g, w| g * w),
                crate::lanes::sum3(g_row, w, row, |g, w, v| g * w * (v - m) * r_std),
            ),
            None => {
                (row_sum(g_row, g_row, |g, _| g), row_sum(g_row, row, |g, v| g * (v - m) * r_std))
            }
        };
        let (mean_g, mean_gx) = (sum_g / d as f32, sum_gx / d as f32);
        match weight {
            Some(w) => {
                for (((o, &g), &w), &v) in dst.iter_mut().zip(g_row).zip(w).zip(row) {
                    o.write(r_std * (g * w - mean_g - (v - m) * r_std * mean_gx));
                }
            }
            None => {
                for ((o, &g), &v) in dst.iter_mut().zip(g_row).zip(row) {
                    o.write(r_std * (g - mean_g - (v - m) * r_std * mean_gx));
                }
            }
        }
    }
}

/// gw[j] += Σ_rows g[r][j]·(x[r][j] − μ_r)·r_r for the columns of `gw`, which start at
/// column `first` of rows of length d, the rows in order.
#[inline(always)]
fn weight_grad_columns_plain(
    d: usize,
    first: usize,
    (rows, grads): (&[f32], &[f32]),
    (mean, rstd): (&[f32], &[f32]),
    gw: &mut [f32],
) {
    let columns = first..first + gw.len();
    let rows = rows.chunks_exact(d).zip(grads.chunks_exact(d));
    for ((row, g_row), (&m, &r_std)) in rows.zip(mean.iter().zip(rstd)) {
        let (row, g_row) = (&row[columns.clone()], &g_row[columns.clone()]);
        for ((acc, &v), &g) in gw.iter_mut().zip(row).zip(g_row) {
            *acc += g * (v - m) * r_std;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_rows_avx512(
        p: &Params,
        rows: &[f32],
        out: &mut [MaybeUninit<f32>],
        mean: &mut [MaybeUninit<f32>],
        rstd: &mut [MaybeUninit<f32>],
    ) {
        forward_rows_plain(p, rows, out, mean, rstd)
    }
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn forward_rows_avx2(
        p: &Params,
        rows: &[f32],
        out: &mut [MaybeUninit<f32>],
        mean: &mut [MaybeUninit<f32>],
        rstd: &mut [MaybeUninit<f32>],
    ) {
        forward_rows_plain(p, rows, out, mean, rstd)
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn backward_rows_avx512(
        weight: Option<&[f32]>,
        d: usize,
        inputs: (&[f32], &[f32]),
        stats: (&[f32], &[f32]),
        out: &mut [MaybeUninit<f32>],
    ) {
        backward_rows_plain(weight, d, inputs, stats, out)
    }
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn backward_rows_avx2(
        weight: Option<&[f32]>,
        d: usize,
        inputs: (&[f32], &[f32]),
        stats: (&[f32], &[f32]),
        out: &mut [MaybeUninit<f32>],
    ) {
        backward_rows_plain(weight, d, inputs, stats, out)
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad_columns_avx512(
        d: usize,
        first: usize,
        inputs: (&[f32], &[f32]),
        stats: (&[f32], &[f32]),
        gw: &mut [f32],
    ) {
        weight_grad_columns_plain(d, first, inputs, stats, gw)
    }
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weight_grad_columns_avx2(
        d: usize,
        first: usize,
        inputs: (&[f32], &[f32]),
        stats: (&[f32], &[f32]),
        gw: &mut [f32],
    ) {
        weight_grad_columns_plain(d, first, inputs, stats, gw)
    }
}

fn forward_rows(
    width: Width,
    p: &Params,
    rows: &[f32],
    out: &mut [MaybeUninit<f32>],
    mean: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
) {
    match width {
        // SAFETY: `width()` picks each variant only where the processor has its instructions.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::forward_rows_avx512(p, rows, out, mean, rstd) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::forward_rows_avx2(p, rows, out, mean, rstd) },
        Width::Plain => forward_rows_plain(p, rows, out, mean, rstd),
    }
}

fn backward_rows(
    width: Width,
    weight: Option<&[f32]>,
    d: usize,
    inputs: (&[f32], &[f32]),
    stats: (&[f32], &[f32]),
    out: &mut [MaybeUninit<f32>],
) {
    match width {
        // SAFETY: as in `forward_rows`.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::backward_rows_avx512(weight, d, inputs, stats, out) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::backward_rows_avx2(weight, d, inputs, stats, out) },
        Width::Plain => backward_rows_plain(weight, d, inputs, stats, out),
    }
}

fn weight_grad_columns(
    width: Width,
    d: usize,
    first: usize,
    inputs: (&[f32], &[f32]),
    stats: (&[f32], &[f32]),
    gw: &mut [f32],
) {
    match width {
        // SAFETY: as in `forward_rows`.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::weight_grad_columns_avx512(d, first, inputs, stats, gw) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::weight_grad_columns_avx2(d, first, inputs, stats, gw) },
        Width::Plain => weight_grad_columns_plain(d, first, inputs, stats, gw),
    }
}

pub(crate) fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, LayerNormStats)> {
    let src = x.cpu_slice("layer_norm")?;
    let weight = weight.map(|w| w.cpu_slice("layer_norm")).transpose()?;
    let bias = bias.map(|b| b.cpu_slice("layer_norm")).transpose()?;
    let d = x.dims()[x.rank() - 1];
    let rows = src.len() / d;
    // mod.rs checked these; the writes below rely on them (a row is written through the zip).
    assert!(weight.is_none_or(|w| w.len() == d) && bias.is_none_or(|b| b.len() == d));
    let (ones, zeros) = (vec![1.0f32; d], vec![0.0f32; d]);
    let p = Params { weight: weight.unwrap_or(&ones), bias: bias.unwrap_or(&zeros), eps };
    let width = width();
    let task = ROWS_PER_TASK * d;
    // Written once each, not zero-filled first.
    let (mut out, mut mean, mut rstd) =
        (Vec::with_capacity(src.len()), Vec::with_capacity(rows), Vec::with_capacity(rows));
    {
        let y = &mut out.spare_capacity_mut()[..src.len()];
        let (mu, rs) =
            (&mut mean.spare_capacity_mut()[..rows], &mut rstd.spare_capacity_mut()[..rows]);
        let run =
            |(((y, mu), rs), rows): (((_, _), _), &[f32])| forward_rows(width, &p, rows, y, mu, rs);
        if src.len() >= PARALLEL_MIN_ELEMS {
            y.par_chunks_mut(task)
                .zip(mu.par_chunks_mut(ROWS_PER_TASK))
                .zip(rs.par_chunks_mut(ROWS_PER_TASK))
                .zip(src.par_chunks(task))
                .for_each(run);
        } else {
            y.chunks_mut(task)
                .zip(mu.chunks_mut(ROWS_PER_TASK))
                .zip(rs.chunks_mut(ROWS_PER_TASK))
                .zip(src.chunks(task))
                .for_each(run);
        }
    }
    // SAFETY: the parts cover every row, and `forward_rows` wrote each row's outputs, μ and r.
    unsafe {
        out.set_len(src.len());
        mean.set_len(rows);
        rstd.set_len(rows);
    }
    let leading = &x.dims()[..x.rank() - 1];
    let stats = LayerNormStats { mean: cpu_tensor(mean, leading), rstd: cpu_tensor(rstd, leading) };
    Ok((cpu_tensor(out, x.dims()), stats))
}

pub(crate) fn layer_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    has_bias: bool,
    stats: &LayerNormStats,
    g: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let op = "layer_norm_backward";
    let (src, grad) = (x.cpu_slice(op)?, g.cpu_slice(op)?);
    let (mean, rstd) = (stats.mean.cpu_slice(op)?, stats.rstd.cpu_slice(op)?);
    let weight = weight.map(|w| w.cpu_slice(op)).transpose()?;
    let d = x.dims()[x.rank() - 1];
    // mod.rs checked these; the writes below rely on them.
    assert!(weight.is_none_or(|w| w.len() == d) && grad.len() == src.len());
    assert!(mean.len() * d == src.len() && rstd.len() == mean.len());
    let width = width();
    let task = ROWS_PER_TASK * d;
    let parallel = src.len() >= PARALLEL_MIN_ELEMS;
    let mut gx = Vec::with_capacity(src.len());
    {
        let dst = &mut gx.spare_capacity_mut()[..src.len()];
        let run = |(i, dst): (usize, &mut [MaybeUninit<f32>])| {
            let (first, n) = (i * ROWS_PER_TASK, dst.len() / d);
            let inputs = (&src[i * task..][..dst.len()], &grad[i * task..][..dst.len()]);
            let stats = (&mean[first..first + n], &rstd[first..first + n]);
            backward_rows(width, weight, d, inputs, stats, dst);
        };
        if parallel {
            dst.par_chunks_mut(task).enumerate().for_each(run);
        } else {
            dst.chunks_mut(task).enumerate().for_each(run);
        }
    }
    // SAFETY: the parts cover every row, and `backward_rows` wrote every element of each.
    unsafe { gx.set_len(src.len()) };
    let gweight = weight.map(|_| {
        let mut gw = vec![0.0f32; d];
        let columns = |(b, gw): (usize, &mut [f32])| {
            weight_grad_columns(width, d, b * COLUMNS_PER_TASK, (src, grad), (mean, rstd), gw)
        };
        if parallel {
            gw.par_chunks_mut(COLUMNS_PER_TASK).enumerate().for_each(columns);
        } else {
            gw.chunks_mut(COLUMNS_PER_TASK).enumerate().for_each(columns);
        }
        cpu_tensor(gw, &[d])
    });
    let gbias = has_bias.then(|| crate::reduce::sum_to_shape(g, &[d])).transpose()?;
    Ok((cpu_tensor(gx, x.dims()), gweight, gbias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, values};

    /// The formulas one row and one column at a time, in the order the kernels promise.
    fn scalar_reference(
        x: &[f32],
        d: usize,
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let eps = 1e-5;
        let (mut y, mut gx) = (vec![], vec![]);
        let mut gw = vec![0.0f32; d];
        for (row, g_row) in x.chunks(d).zip(g.chunks(d)) {
            let m = row_sum(row, row, |v, _| v) / d as f32;
            let var = row_sum(row, row, |v, _| (v - m) * (v - m)) / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (j, &v) in row.iter().enumerate() {
                y.push((v - m) * r * w.map_or(1.0, |w| w[j]) + b.map_or(0.0, |b| b[j]));
            }
            let g_hat: Vec<f32> =
                g_row.iter().enumerate().map(|(j, &g)| w.map_or(g, |w| g * w[j])).collect();
            let mean_g = row_sum(&g_hat, &g_hat, |a, _| a) / d as f32;
            let mean_gx = row_sum(&g_hat, row, |a, v| a * (v - m) * r) / d as f32;
            for (&a, &v) in g_hat.iter().zip(row) {
                gx.push(r * (a - mean_g - (v - m) * r * mean_gx));
            }
            for ((acc, &v), &gv) in gw.iter_mut().zip(row).zip(g_row) {
                *acc += gv * (v - m) * r;
            }
        }
        (y, gx, gw)
    }

    #[test]
    fn every_path_gives_the_bits_of_the_scalar_formulas() {
        // One shape on the calling thread, one in parallel tasks with a partial last one.
        for (rows, d) in [(5, 7), (301, 129)] {
            let x = randn(&[rows, d], 1);
            let g = randn(&[rows, d], 2);
            let (w, b) = (randn(&[d], 3), randn(&[d], 4));
            for (weight, bias) in [(Some(&w), Some(&b)), (None, None), (Some(&w), None)] {
                let (wv, bv) = (weight.map(values), bias.map(values));
                let (y_want, gx_want, gw_want) =
                    scalar_reference(&values(&x), d, wv.as_deref(), bv.as_deref(), &values(&g));
                let (y, stats) = layer_norm(&x, weight, bias, 1e-5).unwrap();
                assert_eq!(values(&y), y_want, "y, {rows}x{d}");
                let (gx, gw, _) =
                    layer_norm_backward(&x, weight, bias.is_some(), &stats, &g).unwrap();
                assert_eq!(values(&gx), gx_want, "gx, {rows}x{d}");
                if let Some(gw) = gw {
                    assert_eq!(values(&gw), gw_want, "gw, {rows}x{d}");
                }
            }
        }
    }
}
