//! CPU reference kernels for the softmax family: one pass per row, each row owned by one
//! thread and reduced left to right.

use crate::{cpu_tensor, for_each_row_mut};
use tokenformer_core::{Result, Tensor};

/// Overwrites `row` with its softmax.
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut total = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    let inv_total = 1.0 / total;
    row.iter_mut().for_each(|v| *v *= inv_total);
}

/// g − ⟨g, p⟩ times p, written into `dst` (which holds g on entry), for softmax rows p.
fn softmax_row_backward(p: &[f32], dst: &mut [f32]) {
    let dot = p.iter().zip(dst.iter()).fold(0.0f32, |acc, (&pv, &gv)| acc + pv * gv);
    for (d, &pv) in dst.iter_mut().zip(p) {
        *d = pv * (*d - dot);
    }
}

pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    let mut out = x.cpu_slice("softmax")?.to_vec();
    let row_len = x.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, row_len, |_, row| softmax_in_place(row));
    Ok(cpu_tensor(out, x.dims()))
}

pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let mut out = x.cpu_slice("log_softmax")?.to_vec();
    let row_len = x.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, row_len, |_, row| {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let total = row.iter().fold(0.0f32, |acc, &v| acc + (v - max).exp());
        // (v − max) − ln Σ, not v − (max + ln Σ): the latter rounds ln Σ to the precision of a
        // large max and loses digits of every log-probability.
        let log_total = total.ln();
        row.iter_mut().for_each(|v| *v = (*v - max) - log_total);
    });
    Ok(cpu_tensor(out, x.dims()))
}

pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let p = y.cpu_slice("softmax_backward")?;
    let mut out = g.cpu_slice("softmax_backward")?.to_vec();
    let row_len = y.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, row_len, |r, dst| {
        softmax_row_backward(&p[r * row_len..][..row_len], dst)
    });
    Ok(cpu_tensor(out, y.dims()))
}

pub(crate) fn log_softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let log_p = y.cpu_slice("log_softmax_backward")?;
    let mut out = g.cpu_slice("log_softmax_backward")?.to_vec();
    let row_len = y.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, row_len, |r, dst| {
        let total = dst.iter().fold(0.0f32, |acc, &v| acc + v);
        for (d, &lp) in dst.iter_mut().zip(&log_p[r * row_len..][..row_len]) {
            *d -= lp.exp() * total;
        }
    });
    Ok(cpu_tensor(out, y.dims()))
}

pub(crate) fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    let mut out = scores.cpu_slice("causal_softmax")?.to_vec();
    let t = scores.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, t, |r, row| {
        let (kept, masked) = row.split_at_mut(r % t + 1);
        kept.iter_mut().for_each(|v| *v *= scale);
        softmax_in_place(kept);
        masked.fill(0.0);
    });
    Ok(cpu_tensor(out, scores.dims()))
}

pub(crate) fn causal_softmax_backward(p: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    let probs = p.cpu_slice("causal_softmax_backward")?;
    let mut out = g.cpu_slice("causal_softmax_backward")?.to_vec();
    let t = p.dims().last().copied().unwrap_or(1);
    for_each_row_mut(&mut out, t, |r, row| {
        let (kept, masked) = row.split_at_mut(r % t + 1);
        softmax_row_backward(&probs[r * t..][..kept.len()], kept);
        kept.iter_mut().for_each(|v| *v *= scale);
        masked.fill(0.0);
    });
    Ok(cpu_tensor(out, p.dims()))
}
