//! CPU reference kernels for the fused cross-entropy: one pass per row.

use crate::{cpu_tensor, for_each_row_mut, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use tokenformer_core::{Result, Tensor};

/// m + ln Σ e^(x − m), m = max(x), summed left to right.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let total = row.iter().fold(0.0f32, |acc, &v| acc + (v - max).exp());
    max + total.ln()
}

pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = logits.cpu_slice("cross_entropy")?;
    let t = targets.cpu_slice("cross_entropy")?;
    let v = logits.dims()[1];
    let lse: Vec<f32> = if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_chunks(v).map(log_sum_exp).collect()
    } else {
        x.chunks(v).map(log_sum_exp).collect()
    };
    // The mean of N row losses, accumulated in f64 in row order.
    let total: f64 = lse
        .iter()
        .zip(t)
        .enumerate()
        .map(|(i, (&l, &target))| (l - x[i * v + target as usize]) as f64)
        .sum();
    let loss = (total / lse.len() as f64) as f32;
    let n = lse.len();
    Ok((Tensor::scalar(loss), cpu_tensor(lse, &[n])))
}

pub(crate) fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let x = logits.cpu_slice(op)?;
    let (t, lse) = (targets.cpu_slice(op)?, lse.cpu_slice(op)?);
    let v = logits.dims()[1];
    let scale = g.cpu_slice(op)?[0] / t.len() as f32;
    let mut out = vec![0.0f32; x.len()];
    for_each_row_mut(&mut out, v, |i, dst| {
        for (d, &logit) in dst.iter_mut().zip(&x[i * v..][..v]) {
            *d = (logit - lse[i]).exp() * scale;
        }
        dst[t[i] as usize] -= scale;
    });
    Ok(cpu_tensor(out, logits.dims()))
}
