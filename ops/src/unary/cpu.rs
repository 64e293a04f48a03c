//! CPU reference kernels for the elementwise unary ops.

use crate::{cpu_tensor, map1, map2};
use std::f32::consts::FRAC_1_SQRT_2;
use tokenformer_core::{Result, Tensor};

/// 1/√(2π), the peak of the standard normal density.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// exp(x) for x ≤ 0 in plain arithmetic (no library call), so that loops over rows of scores
/// vectorise: x = n·ln2 + r with |r| ≤ ln2/2, exp(r) from its degree-6 Taylor polynomial
/// (error below 2e-8 relative on that range), and 2ⁿ put straight into the exponent bits.
/// Arguments below −87 return exp(−87) ≈ 1.6e-38, indistinguishable from 0 where it is used.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, with LN2_HI short enough (9 bits) that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf(u) given e = exp(−u²): Abramowitz & Stegun 7.1.26, a rational fit whose error is below
/// 1.5e-7, or 6e-7 absolute once evaluated in f32. GELU uses it as ½x(1 + erf), where that is a
/// relative error of at most 6e-7. It is several times faster than a fully rounded erff, and
/// GELU runs on every Pattention score, so it dominates the non-matmul time of a TokenFormer;
/// sharing e with GELU′'s density term saves the second exp.
#[inline(always)]
fn erf_with_exp(u: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * u.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * e).copysign(u)
}

/// erf(u), to within 6e-7 (see `erf_with_exp`).
#[inline(always)]
pub(crate) fn erf(u: f32) -> f32 {
    erf_with_exp(u, exp_nonpositive(-u * u))
}

/// GELU(x) = ½x(1 + erf(x/√2)). GELU(0) is exactly 0, which exact growth relies on.
#[inline(always)]
pub(crate) fn gelu_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// GELU′(x) = Φ(x) + x·φ(x), with Φ(x) = ½(1 + erf(x/√2)) and φ(x) = exp(−x²/2)/√(2π).
#[inline(always)]
pub(crate) fn gelu_grad_scalar(x: f32) -> f32 {
    let u = x * FRAC_1_SQRT_2;
    let e = exp_nonpositive(-u * u);
    0.5 * (1.0 + erf_with_exp(u, e)) + x * FRAC_1_SQRT_2PI * e
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

#[cfg(test)]
mod tests {
    #[test]
    fn fast_erf_is_within_a_few_ulps() {
        let mut worst = 0.0f64;
        for i in -80_000..=80_000 {
            let u = i as f32 * 1e-4;
            let err = (super::erf(u) as f64 - libm::erf(u as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 6e-7, "max |erf error| {worst}");
        let mut worst_exp = 0.0f64;
        for i in 0..=86_900 {
            let x = -(i as f32) * 1e-3;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((super::exp_nonpositive(x) as f64 - exact).abs() / exact);
        }
        assert!(worst_exp < 4e-7, "max relative exp error {worst_exp}");
        assert_eq!(super::gelu_scalar(0.0), 0.0);
        assert!((super::gelu_grad_scalar(0.0) - 0.5).abs() < 1e-7);
    }
}
