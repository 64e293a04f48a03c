//! CPU reference kernels for the elementwise unary ops.

use crate::{cpu_tensor, map1, map2};
use std::f32::consts::FRAC_1_SQRT_2;
use tokenformer_core::{Result, Tensor};

/// 1/√(2π), the peak of the standard normal density.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// GELU(x) = ½x(1 + erf(x/√2)).
pub(crate) fn gelu_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

/// GELU′(x) = Φ(x) + x·φ(x).
pub(crate) fn gelu_grad_scalar(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
    let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
    cdf + x * pdf
}

fn map(op: &'static str, x: &Tensor, f: impl Fn(f32) -> f32 + Sync + Send) -> Result<Tensor> {
    Ok(cpu_tensor(map1(x.cpu_slice(op)?, f), x.dims()))
}

fn zip(
    op: &'static str,
    x: &Tensor,
    g: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<Tensor> {
    Ok(cpu_tensor(map2(x.cpu_slice(op)?, g.cpu_slice(op)?, f), x.dims()))
}

pub(crate) fn neg(x: &Tensor) -> Result<Tensor> {
    map("neg", x, |v| -v)
}

pub(crate) fn exp(x: &Tensor) -> Result<Tensor> {
    map("exp", x, f32::exp)
}

pub(crate) fn log(x: &Tensor) -> Result<Tensor> {
    map("log", x, f32::ln)
}

pub(crate) fn sqrt(x: &Tensor) -> Result<Tensor> {
    map("sqrt", x, f32::sqrt)
}

pub(crate) fn square(x: &Tensor) -> Result<Tensor> {
    map("square", x, |v| v * v)
}

pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    map("gelu", x, gelu_scalar)
}

pub(crate) fn powf(x: &Tensor, p: f32) -> Result<Tensor> {
    map("powf", x, move |v| v.powf(p))
}

pub(crate) fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    map("affine", x, move |v| v * mul + add)
}

pub(crate) fn exp_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    zip("exp_backward", y, g, |y, g| g * y)
}

pub(crate) fn log_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    zip("log_backward", x, g, |x, g| g / x)
}

pub(crate) fn sqrt_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    zip("sqrt_backward", y, g, |y, g| g / (2.0 * y))
}

pub(crate) fn square_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    zip("square_backward", x, g, |x, g| 2.0 * x * g)
}

pub(crate) fn powf_backward(x: &Tensor, p: f32, g: &Tensor) -> Result<Tensor> {
    zip("powf_backward", x, g, move |x, g| g * p * x.powf(p - 1.0))
}

pub(crate) fn gelu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    zip("gelu_backward", x, g, |x, g| g * gelu_grad_scalar(x))
}
