//! CPU reference kernels for layer norm: one pass over each row for the statistics and the
//! output, one for its gradient; the parameter gradients add the rows in order.
//!
//! The sums along a row (mean, variance, the two means of the backward pass) run in 16
//! interleaved lanes (`crate::lanes`): the same bits every time, and independent additions that
//! vectorise. Added as one running sum, each addition waits for the previous one, and those
//! chains were most of the op's time.

use super::LayerNormStats;
use crate::lanes::sum2 as row_sum;
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use tokenformer_core::{Result, Tensor};

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
    let mut out = vec![0.0f32; src.len()];
    let mut mean = vec![0.0f32; rows];
    let mut rstd = vec![0.0f32; rows];

    let normalise_row = |((r, y), (mu, rs)): ((usize, &mut [f32]), (&mut f32, &mut f32))| {
        let row = &src[r * d..][..d];
        let m = row_sum(row, row, |v, _| v) / d as f32;
        let var = row_sum(row, row, |v, _| (v - m) * (v - m)) / d as f32;
        let r_std = 1.0 / (var + eps).sqrt();
        for (j, (o, &v)) in y.iter_mut().zip(row).enumerate() {
            let scale = weight.map_or(1.0, |w| w[j]);
            let shift = bias.map_or(0.0, |b| b[j]);
            *o = (v - m) * r_std * scale + shift;
        }
        (*mu, *rs) = (m, r_std);
    };
    if src.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(d)
            .enumerate()
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(normalise_row);
    } else {
        out.chunks_mut(d)
            .enumerate()
            .zip(mean.iter_mut().zip(rstd.iter_mut()))
            .for_each(normalise_row);
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
    let mut gx = vec![0.0f32; src.len()];

    crate::for_each_row_mut(&mut gx, d, |r, dst| {
        let (row, g_row, m, r_std) = (&src[r * d..][..d], &grad[r * d..][..d], mean[r], rstd[r]);
        // ĝ = g ⊙ w is staged in dst; then its mean and its mean against x̂.
        match weight {
            Some(w) => dst.iter_mut().zip(g_row.iter().zip(w)).for_each(|(o, (&g, &w))| *o = g * w),
            None => dst.copy_from_slice(g_row),
        }
        let sum_g = row_sum(dst, dst, |g_hat, _| g_hat);
        let sum_gx = row_sum(dst, row, |g_hat, v| g_hat * (v - m) * r_std);
        let (mean_g, mean_gx) = (sum_g / d as f32, sum_gx / d as f32);
        for (o, &v) in dst.iter_mut().zip(row) {
            *o = r_std * (*o - mean_g - (v - m) * r_std * mean_gx);
        }
    });

    let gweight = weight.map(|_| {
        let mut gw = vec![0.0f32; d];
        for (r, (row, g_row)) in src.chunks(d).zip(grad.chunks(d)).enumerate() {
            for ((acc, &v), &gv) in gw.iter_mut().zip(row).zip(g_row) {
                *acc += gv * (v - mean[r]) * rstd[r];
            }
        }
        cpu_tensor(gw, &[d])
    });
    let gbias = has_bias.then(|| crate::reduce::sum_to_shape(g, &[d])).transpose()?;
    Ok((cpu_tensor(gx, x.dims()), gweight, gbias))
}
