//! CPU kernels for the fused cross-entropy: one pass per row for the log-sum-exp, one for the
//! gradient. The row loops are compiled a second time for AVX-512 and for AVX2 (with FMA) and
//! picked at run time; the exponential is the plain-arithmetic one of the unary family and the
//! row sums run in lanes, so both vectorise and give the same bits in every variant.

use crate::lanes;
use crate::unary::cpu::exp_nonpositive;
use crate::wide_loops::{width, Width};
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use tokenformer_core::{Result, Tensor};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// eˣ for x ≤ 0, exactly 0 below −87: a logit of −∞, or one so far below the rest that its
/// probability is under 1.6e-38 (where f32 turns subnormal), adds nothing to the sum and gets a
/// gradient of exactly 0. NaN stays NaN.
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    let e = exp_nonpositive(x);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// m + ln Σ e^(x − m), m = max(x). A NaN anywhere in the row makes it NaN.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + lanes::sum(row, |v| exp_or_zero(v - max)).ln()
}

/// The log-sum-exp of every row of length `v` of `x`, into `lse`.
#[inline(always)]
fn lse_rows_plain(x: &[f32], v: usize, lse: &mut [f32]) {
    for (row, l) in x.chunks_exact(v).zip(lse) {
        *l = log_sum_exp(row);
    }
}

/// ∂L/∂logits of rows of length `v`: `scale`·softmax, less `scale` at each row's target.
#[inline(always)]
fn grad_rows_plain(x: &[f32], v: usize, lse: &[f32], targets: &[f32], scale: f32, out: &mut [f32]) {
    for (((dst, row), &l), &target) in
        out.chunks_exact_mut(v).zip(x.chunks_exact(v)).zip(lse).zip(targets)
    {
        for (d, &logit) in dst.iter_mut().zip(row) {
            *d = exp_or_zero(logit - l) * scale;
        }
        dst[target as usize] -= scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn lse_rows_avx512(x: &[f32], v: usize, lse: &mut [f32]) {
        super::lse_rows_plain(x, v, lse)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lse_rows_avx2(x: &[f32], v: usize, lse: &mut [f32]) {
        super::lse_rows_plain(x, v, lse)
    }
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn grad_rows_avx512(
        x: &[f32],
        v: usize,
        lse: &[f32],
        targets: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        super::grad_rows_plain(x, v, lse, targets, scale, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn grad_rows_avx2(
        x: &[f32],
        v: usize,
        lse: &[f32],
        targets: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        super::grad_rows_plain(x, v, lse, targets, scale, out)
    }
}

fn lse_rows(width: Width, x: &[f32], v: usize, lse: &mut [f32]) {
    match width {
        // SAFETY: `width()` picks each variant only where the processor has its instructions.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::lse_rows_avx512(x, v, lse) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::lse_rows_avx2(x, v, lse) },
        Width::Plain => lse_rows_plain(x, v, lse),
    }
}

fn grad_rows(
    width: Width,
    x: &[f32],
    v: usize,
    lse: &[f32],
    targets: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    match width {
        // SAFETY: as in `lse_rows`.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::grad_rows_avx512(x, v, lse, targets, scale, out) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::grad_rows_avx2(x, v, lse, targets, scale, out) },
        Width::Plain => grad_rows_plain(x, v, lse, targets, scale, out),
    }
}

pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = logits.cpu_slice("cross_entropy")?;
    let t = targets.cpu_slice("cross_entropy")?;
    let v = logits.dims()[1];
    let n = t.len();
    let width = width();
    let mut lse = vec![0.0f32; n];
    if v > 0 {
        if x.len() >= PARALLEL_MIN_ELEMS {
            lse.par_chunks_mut(ROWS_PER_TASK)
                .zip(x.par_chunks(ROWS_PER_TASK * v))
                .for_each(|(lse, x)| lse_rows(width, x, v, lse));
        } else {
            lse_rows(width, x, v, &mut lse);
        }
    }
    // The mean of N row losses, accumulated in f64 in row order.
    let total: f64 = lse
        .iter()
        .zip(t)
        .enumerate()
        .map(|(i, (&l, &target))| (l - x[i * v + target as usize]) as f64)
        .sum();
    let loss = (total / n as f64) as f32;
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
    let width = width();
    let mut out = vec![0.0f32; x.len()];
    if v > 0 {
        let task = ROWS_PER_TASK * v;
        if x.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(task)
                .zip(x.par_chunks(task))
                .zip(lse.par_chunks(ROWS_PER_TASK).zip(t.par_chunks(ROWS_PER_TASK)))
                .for_each(|((out, x), (lse, t))| grad_rows(width, x, v, lse, t, scale, out));
        } else {
            grad_rows(width, x, v, lse, t, scale, &mut out);
        }
    }
    Ok(cpu_tensor(out, logits.dims()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, values};

    #[test]
    fn every_compiled_variant_gives_the_same_bits() {
        for v in [5, 16, 37, 300] {
            let rows = 7;
            let x = values(&randn(&[rows * v], v as u64));
            let targets: Vec<f32> = (0..rows).map(|i| ((i * 3) % v) as f32).collect();
            let mut lse = vec![0.0; rows];
            lse_rows_plain(&x, v, &mut lse);
            let mut grad = vec![0.0; rows * v];
            grad_rows_plain(&x, v, &lse, &targets, 0.3, &mut grad);
            #[cfg(target_arch = "x86_64")]
            for wide in [Width::Avx512, Width::Avx2] {
                let fma = std::arch::is_x86_feature_detected!("fma");
                let has = match wide {
                    Width::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                    _ => std::arch::is_x86_feature_detected!("avx2"),
                };
                if !(fma && has) {
                    continue;
                }
                let mut lse_wide = vec![0.0; rows];
                lse_rows(wide, &x, v, &mut lse_wide);
                let mut grad_wide = vec![0.0; rows * v];
                grad_rows(wide, &x, v, &lse, &targets, 0.3, &mut grad_wide);
                assert_eq!(lse, lse_wide, "lse, v {v}");
                assert_eq!(grad, grad_wide, "grad, v {v}");
            }
        }
    }
}
