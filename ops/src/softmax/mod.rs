//! Softmax and log-softmax over the last axis, and the causal softmax of attention scores.
//!
//! ```text
//! Forward, for a row x, with m = max_l x_l:
//!   softmax:       p_j = e^(x_j − m) / Σ_l e^(x_l − m)
//!   log_softmax:   y_j = x_j − m − ln Σ_l e^(x_l − m)
//! Backward:
//!   softmax:       ∂p_j/∂x_l = p_j(δ_jl − p_l),   so g_x = p ⊙ (g − Σ_l g_l p_l)
//!   log_softmax:   ∂y_j/∂x_l = δ_jl − p_l,        so g_x = g − p·Σ_l g_l, with p = e^y
//! ```
//!
//! Subtracting the max changes nothing mathematically and keeps every exponent ≤ 0. The causal
//! softmax of a `[..., T, T]` score block keeps, in row i, the columns j ≤ i of scale·scores,
//! takes their softmax and writes 0 for j > i; its backward pass is the same over the kept
//! columns (p = 0 elsewhere makes that automatic), times `scale`.

pub(crate) mod cpu;
mod cuda;

use crate::{check_same_dims, rows_and_len, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    rows_and_len("softmax", x)?;
    match x.device() {
        Device::Cpu => cpu::softmax(x),
        Device::Cuda(_) => cuda::softmax(x),
    }
}

pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    rows_and_len("log_softmax", x)?;
    match x.device() {
        Device::Cpu => cpu::log_softmax(x),
        Device::Cuda(_) => cuda::log_softmax(x),
    }
}

/// ∂L/∂x of y = softmax(x), from the output y.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let device = same_device("softmax_backward", &[y, g])?;
    rows_and_len("softmax_backward", y)?;
    check_same_dims("softmax_backward", y, g)?;
    match device {
        Device::Cpu => cpu::softmax_backward(y, g),
        Device::Cuda(_) => cuda::softmax_backward(y, g),
    }
}

/// ∂L/∂x of y = log_softmax(x), from the output y.
pub fn log_softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let device = same_device("log_softmax_backward", &[y, g])?;
    rows_and_len("log_softmax_backward", y)?;
    check_same_dims("log_softmax_backward", y, g)?;
    match device {
        Device::Cpu => cpu::log_softmax_backward(y, g),
        Device::Cuda(_) => cuda::log_softmax_backward(y, g),
    }
}

fn check_square_blocks(op: &'static str, scores: &Tensor) -> Result<()> {
    let dims = scores.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        return Err(Error::shape(
            op,
            format!("expected scores of shape [..., T, T], got {}", scores.shape()),
        ));
    }
    Ok(())
}

/// Row i of each [T, T] block: softmax of scale·scores[i, 0..=i], zeros after.
pub fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    check_square_blocks("causal_softmax", scores)?;
    match scores.device() {
        Device::Cpu => cpu::causal_softmax(scores, scale),
        Device::Cuda(_) => cuda::causal_softmax(scores, scale),
    }
}

/// ∂L/∂scores of p = causal_softmax(scores, scale), from the output p.
pub fn causal_softmax_backward(p: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    let device = same_device("causal_softmax_backward", &[p, g])?;
    check_square_blocks("causal_softmax_backward", p)?;
    check_same_dims("causal_softmax_backward", p, g)?;
    match device {
        Device::Cpu => cpu::causal_softmax_backward(p, g, scale),
        Device::Cuda(_) => cuda::causal_softmax_backward(p, g, scale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, values};

    fn softmax_f64(row: &[f32]) -> Vec<f64> {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        exps.iter().map(|e| e / total).collect()
    }

    #[test]
    fn forward_matches_f64_formula() {
        let x = crate::unary::affine(&randn(&[4, 3, 13], 1), 5.0, 0.0).unwrap();
        let expected: Vec<f64> = values(&x).chunks(13).flat_map(softmax_f64).collect();
        assert_close(&values(&softmax(&x).unwrap()), &expected, 1e-7, 1e-5, "softmax");
        let expected_log: Vec<f64> = expected.iter().map(|p| p.ln()).collect();
        assert_close(&values(&log_softmax(&x).unwrap()), &expected_log, 1e-5, 1e-5, "log_softmax");

        let (t, scale) = (7, 0.37f32);
        let s = randn(&[2, t, t], 2);
        let mut expected = Vec::new();
        for (r, row) in values(&s).chunks(t).enumerate() {
            let i = r % t;
            let scaled: Vec<f32> = row[..=i].iter().map(|&v| v * scale).collect();
            expected.extend(softmax_f64(&scaled));
            expected.extend(std::iter::repeat_n(0.0, t - 1 - i));
        }
        assert_close(&values(&causal_softmax(&s, scale).unwrap()), &expected, 1e-7, 1e-5, "causal");
    }

    #[test]
    fn large_rows_are_stable_and_parallel() {
        let x = crate::unary::affine(&randn(&[300, 129], 3), 100.0, 1000.0).unwrap();
        let y = values(&softmax(&x).unwrap());
        assert!(y.iter().all(|v| v.is_finite()));
        let expected: Vec<f64> = values(&x).chunks(129).flat_map(softmax_f64).collect();
        assert_close(&y, &expected, 1e-6, 1e-4, "large");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = randn(&[3, 11], 4);
        let g = randn(&[3, 11], 5);
        let y = softmax(&x).unwrap();
        check_grad("softmax", &x, &g, &softmax_backward(&y, &g).unwrap(), |t| softmax(t).unwrap());
        let ly = log_softmax(&x).unwrap();
        check_grad("log_softmax", &x, &g, &log_softmax_backward(&ly, &g).unwrap(), |t| {
            log_softmax(t).unwrap()
        });
        let s = randn(&[2, 5, 5], 6);
        let g = randn(&[2, 5, 5], 7);
        let p = causal_softmax(&s, 0.6).unwrap();
        let gs = causal_softmax_backward(&p, &g, 0.6).unwrap();
        check_grad("causal", &s, &g, &gs, |t| causal_softmax(t, 0.6).unwrap());
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let err = causal_softmax(&randn(&[2, 3, 4], 1), 1.0).unwrap_err().to_string();
        assert!(err.contains("causal_softmax") && err.contains("[2, 3, 4]"), "{err}");
        assert!(softmax(&tokenformer_core::Tensor::scalar(1.0)).is_err());
        assert!(softmax_backward(&randn(&[2, 3], 1), &randn(&[3, 2], 2)).is_err());
    }
}
