//! CPU reference kernels for Θ: one fused pass per row forward, one per row backward.

use super::Theta;
use crate::softmax::cpu::softmax_in_place;
use crate::unary::cpu::{gelu_grad_scalar, gelu_scalar};
use crate::{cpu_tensor, for_each_row_mut};
use tokenformer_core::{Result, Tensor};

/// ‖v‖₂ with Σ v² taken left to right in f64, so that rows of very large or very small scores
/// neither overflow nor underflow to a zero norm.
pub(super) fn l2_norm(v: impl Iterator<Item = f32>) -> f32 {
    v.fold(0.0f64, |acc, x| acc + x as f64 * x as f64).sqrt() as f32
}

/// Σ x·y, left to right.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).fold(0.0f32, |acc, (&a, &b)| acc + a * b)
}

pub(crate) fn pattention_norm(a: &Tensor, theta: Theta, tau: f32) -> Result<Tensor> {
    let mut out = a.cpu_slice("pattention_norm")?.to_vec();
    let n = a.dims()[a.rank() - 1];
    for_each_row_mut(&mut out, n, |_, row| match theta {
        Theta::L2NormGelu => {
            let r = l2_norm(row.iter().copied());
            if r == 0.0 {
                return row.fill(0.0);
            }
            let scale = tau / r;
            row.iter_mut().for_each(|v| *v = gelu_scalar(*v * scale));
        }
        Theta::GeluL2Norm => {
            row.iter_mut().for_each(|v| *v = gelu_scalar(*v));
            let rho = l2_norm(row.iter().copied());
            if rho == 0.0 {
                return row.fill(0.0);
            }
            let scale = tau / rho;
            row.iter_mut().for_each(|v| *v *= scale);
        }
        Theta::Softmax => {
            softmax_in_place(row);
            row.iter_mut().for_each(|v| *v *= tau * tau);
        }
    });
    Ok(cpu_tensor(out, a.dims()))
}

pub(crate) fn pattention_norm_backward(
    a: &Tensor,
    theta: Theta,
    tau: f32,
    g: &Tensor,
) -> Result<Tensor> {
    let scores = a.cpu_slice("pattention_norm_backward")?;
    let mut out = g.cpu_slice("pattention_norm_backward")?.to_vec();
    let n = a.dims()[a.rank() - 1];
    let inv_tau2 = 1.0 / (tau * tau);
    // On entry `dst` holds the row of g; on exit, the row of g_a.
    for_each_row_mut(&mut out, n, |r, dst| {
        let row = &scores[r * n..][..n];
        match theta {
            Theta::L2NormGelu => {
                let radius = l2_norm(row.iter().copied());
                if radius == 0.0 {
                    return dst.fill(0.0);
                }
                let scale = tau / radius;
                // dst becomes g_z = g ⊙ GELU′(z), with z = a·τ/r: a pass without a running
                // sum, so it vectorises; the dot product follows in its own left-to-right pass.
                for (d, &x) in dst.iter_mut().zip(row) {
                    *d *= gelu_grad_scalar(x * scale);
                }
                let z_dot_gz = dot(row, dst) * scale;
                let projection = z_dot_gz * inv_tau2;
                for (d, &x) in dst.iter_mut().zip(row) {
                    *d = scale * (*d - x * scale * projection);
                }
            }
            Theta::GeluL2Norm => {
                let rho = l2_norm(row.iter().map(|&x| gelu_scalar(x)));
                if rho == 0.0 {
                    return dst.fill(0.0);
                }
                let scale = tau / rho;
                let s_dot_g = row
                    .iter()
                    .zip(dst.iter())
                    .fold(0.0f32, |acc, (&x, &gv)| acc + gelu_scalar(x) * scale * gv);
                let projection = s_dot_g * inv_tau2;
                for (d, &x) in dst.iter_mut().zip(row) {
                    let s = gelu_scalar(x) * scale;
                    *d = scale * (*d - s * projection) * gelu_grad_scalar(x);
                }
            }
            Theta::Softmax => {
                let mut p = row.to_vec();
                softmax_in_place(&mut p);
                let p_dot_g = dot(&p, dst);
                for (d, &pv) in dst.iter_mut().zip(&p) {
                    *d = tau * tau * pv * (*d - p_dot_g);
                }
            }
        }
    });
    Ok(cpu_tensor(out, a.dims()))
}
