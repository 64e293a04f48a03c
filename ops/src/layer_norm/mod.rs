//! Layer normalisation over the last axis (biased variance), with optional weight and bias.
//!
//! ```text
//! Forward, for a row x of length d (w = 1, b = 0 when absent):
//!   μ = Σx/d,   σ² = Σ(x − μ)²/d,   r = 1/√(σ² + eps),   x̂ = (x − μ)·r,   y = x̂ ⊙ w + b
//! Backward, with g = ∂L/∂y and ĝ = g ⊙ w:
//!   gb = Σ_rows g,   gw = Σ_rows g ⊙ x̂,
//!   and, since ∂x̂_j/∂x_l = r(δ_jl − 1/d − x̂_j x̂_l/d),
//!   gx = r·(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))
//! ```
//!
//! μ and r are kept for the backward pass.

mod cpu;
mod cuda;

use crate::{rows_and_len, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

/// What backward needs from the forward pass, one value per row (shape = x's leading dims).
#[derive(Clone, Debug)]
pub struct LayerNormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// Checks an optional per-feature parameter: shape `[d]`, on x's device.
fn check_param(op: &'static str, x: &Tensor, p: Option<&Tensor>, name: &str) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    same_device(op, &[x, p])?;
    let d = x.dims().last().copied().unwrap_or(0);
    if p.dims() != [d] {
        return Err(Error::shape(
            op,
            format!(
                "{name} of shape {} does not match input {} (expected [{d}])",
                p.shape(),
                x.shape()
            ),
        ));
    }
    Ok(())
}

/// (y, stats) of a layer norm over x's last axis.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, LayerNormStats)> {
    let (_, d) = rows_and_len("layer_norm", x)?;
    if d == 0 {
        return Err(Error::shape(
            "layer_norm",
            format!("cannot normalise empty rows of {}", x.shape()),
        ));
    }
    check_param("layer_norm", x, weight, "weight")?;
    check_param("layer_norm", x, bias, "bias")?;
    match x.device() {
        Device::Cpu => cpu::layer_norm(x, weight, bias, eps),
        Device::Cuda(_) => cuda::layer_norm(x, weight, bias, eps),
    }
}

/// (gx, gweight, gbias) of a layer norm; pass `weight` exactly as in the forward call, and
/// whether a bias was used (the bias enters no other gradient, so only its presence matters).
/// gweight and gbias are present when their parameter was used.
pub fn layer_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    has_bias: bool,
    stats: &LayerNormStats,
    g: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let op = "layer_norm_backward";
    let (_, d) = rows_and_len(op, x)?;
    if d == 0 {
        return Err(Error::shape(op, format!("cannot normalise empty rows of {}", x.shape())));
    }
    same_device(op, &[x, g, &stats.mean, &stats.rstd])?;
    crate::check_same_dims(op, x, g)?;
    check_param(op, x, weight, "weight")?;
    let leading = &x.dims()[..x.rank() - 1];
    if stats.mean.dims() != leading || stats.rstd.dims() != leading {
        return Err(Error::shape(
            op,
            format!(
                "stats of shapes {} and {} do not match input {}",
                stats.mean.shape(),
                stats.rstd.shape(),
                x.shape()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => cpu::layer_norm_backward(x, weight, has_bias, stats, g),
        Device::Cuda(_) => cuda::layer_norm_backward(x, weight, has_bias, stats, g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, values};

    fn reference(x: &[f32], d: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f64) -> Vec<f64> {
        let mut out = Vec::new();
        for row in x.chunks(d) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for (j, &v) in row.iter().enumerate() {
                let scale = w.map_or(1.0, |w| w[j] as f64);
                let shift = b.map_or(0.0, |b| b[j] as f64);
                out.push((v as f64 - mean) * rstd * scale + shift);
            }
        }
        out
    }

    #[test]
    fn forward_matches_f64_formula() {
        let d = 13;
        let x = crate::unary::affine(&randn(&[2, 3, d], 1), 3.0, 1.5).unwrap();
        let w = randn(&[d], 2);
        let b = randn(&[d], 3);
        let (y, stats) = layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap();
        assert_eq!(stats.mean.dims(), &[2, 3]);
        let (wv, bv) = (values(&w), values(&b));
        let expected = reference(&values(&x), d, Some(&wv), Some(&bv), 1e-5);
        assert_close(&values(&y), &expected, 1e-5, 1e-5, "affine");
        let (plain, _) = layer_norm(&x, None, None, 1e-5).unwrap();
        assert_close(
            &values(&plain),
            &reference(&values(&x), d, None, None, 1e-5),
            1e-5,
            1e-5,
            "plain",
        );
        let big = randn(&[301, 129], 4);
        let (y, _) = layer_norm(&big, None, None, 1e-5).unwrap();
        assert_close(
            &values(&y),
            &reference(&values(&big), 129, None, None, 1e-5),
            1e-5,
            1e-5,
            "big",
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let d = 7;
        let x = randn(&[5, d], 5);
        let w = crate::unary::affine(&randn(&[d], 6), 0.5, 1.0).unwrap();
        let b = randn(&[d], 7);
        let g = randn(&[5, d], 8);
        let eps = 1e-5;
        let (_, stats) = layer_norm(&x, Some(&w), Some(&b), eps).unwrap();
        let (gx, gw, gb) = layer_norm_backward(&x, Some(&w), true, &stats, &g).unwrap();
        let (gw, gb) = (gw.unwrap(), gb.unwrap());
        check_grad("gx", &x, &g, &gx, |t| layer_norm(t, Some(&w), Some(&b), eps).unwrap().0);
        check_grad("gw", &w, &g, &gw, |t| layer_norm(&x, Some(t), Some(&b), eps).unwrap().0);
        check_grad("gb", &b, &g, &gb, |t| layer_norm(&x, Some(&w), Some(t), eps).unwrap().0);

        let (_, stats) = layer_norm(&x, None, None, eps).unwrap();
        let (gx, gw, gb) = layer_norm_backward(&x, None, false, &stats, &g).unwrap();
        assert!(gw.is_none() && gb.is_none());
        check_grad("gx plain", &x, &g, &gx, |t| layer_norm(t, None, None, eps).unwrap().0);
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let x = randn(&[2, 4], 1);
        let err = layer_norm(&x, Some(&randn(&[3], 2)), None, 1e-5).unwrap_err().to_string();
        assert!(
            err.contains("layer_norm") && err.contains("[3]") && err.contains("[2, 4]"),
            "{err}"
        );
        assert!(layer_norm(&randn(&[2, 0], 1), None, None, 1e-5).is_err());
        let (_, stats) = layer_norm(&x, None, None, 1e-5).unwrap();
        assert!(layer_norm_backward(&randn(&[4, 2], 3), None, false, &stats, &randn(&[4, 2], 4))
            .is_err());
    }
}
