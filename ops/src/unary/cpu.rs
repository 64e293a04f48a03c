//! CPU reference kernels for the elementwise unary ops.

use super::Unary;
use crate::vector::Real;
use crate::{cpu_tensor, map1, map2};
use std::f32::consts::FRAC_1_SQRT_2;
use tokenformer_core::{Error, Result, Tensor};

/// 1/√(2π), the peak of the standard normal density.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The polynomial with `coefficients` (highest degree first) at x, by Horner's rule with one
/// fused multiply-add per step. `mul_add` is an FMA instruction where the loop is compiled with
/// FMA (every AVX2 and AVX-512 copy here, and aarch64) and the correctly rounded library `fmaf`
/// elsewhere, so the bits are the same on every processor; and half the instructions of
/// separate multiplies and adds, in the loops that evaluate it for every Pattention score.
#[inline(always)]
fn horner<R: Real, const N: usize>(x: R, coefficients: [f32; N]) -> R {
    let mut p = R::splat(coefficients[0]);
    for &c in &coefficients[1..] {
        p = p.mul_add(x, R::splat(c));
    }
    p
}

/// exp(x) for x ≤ 0 in plain arithmetic (no library call), so that loops over rows of scores
/// vectorise: x = n·ln2 + r with |r| ≤ ln2/2, exp(r) from its degree-6 Taylor polynomial
/// (error below 2e-8 relative on that range), and 2ⁿ put straight into the exponent bits, as
/// 2^⌊n/2⌋·2^(n−⌊n/2⌋) so that each factor stays a normal number down to n = −150. Below −87
/// the result is subnormal, rounded once, as the C library's expf gives it: a row of Pattention
/// scores deep in GELU's tail is scaled back up by τ/‖row‖ (up to 1e32), so a clamp there would
/// show. Below about −103.97 (half the smallest subnormal) the result is 0. Where the
/// result is normal, the two factors multiply exactly, to the bits of p·2ⁿ. NaN returns NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive<R: Real>(x: R) -> R {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, with LN2_HI short enough (9 bits) that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to an integer.
    const ROUND: f32 = 12_582_912.0;
    // A select rather than `max`, which would turn NaN into −110 (whose e^x rounds to 0).
    let lowest = R::splat(-110.0);
    let x = x.if_less(lowest, lowest, x);
    let shifted = x.mul_add(R::splat(LOG2_E), R::splat(ROUND));
    let minus_n = -(shifted - R::splat(ROUND));
    let r = minus_n.mul_add(R::splat(LN2_LO), minus_n.mul_add(R::splat(LN2_HI), x));
    let p = horner(r, [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]);
    // The integer n sits in the low mantissa bits of `shifted` (|n| < 2²²): reading it there
    // instead of through `n as i32`, whose saturating semantics do not vectorise, gives the
    // same 2ⁿ in integer lanes.
    let (two_half, two_rest) = shifted.pow2_halves(ROUND);
    (p * two_half) * two_rest
}

/// erfc(z) for z ≥ 0 with a relative error below 1.2e-7 (in exact arithmetic) all the way into
/// the tail: the Chebyshev fit t·exp(−z² + P(t)), t = 1/(1 + z/2), of Numerical Recipes'
/// `erfcc`. Relative accuracy in the tail is what matters here: a Pattention row can sit wholly
/// in GELU's negative tail, where GELU(x) = ½x·erfc(−x/√2) is tiny but its L2-normalised row is
/// not, and the cancelling form ½x(1 + erf(x/√2)) rounds such a row to zero.
#[inline(always)]
fn erfc_nonnegative<R: Real>(z: R) -> R {
    let one = R::splat(1.0);
    let t = one / R::splat(0.5).mul_add(z, one);
    let p = horner(
        t,
        [
            0.170_872_77,
            -0.822_152_2,
            1.488_515_9,
            -1.135_204,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_7,
            -1.265_512_2,
        ],
    );
    t * exp_nonpositive((-z).mul_add(z, p))
}

/// Φ(x) = ½·erfc(−x/√2), the standard normal CDF, accurate in relative terms on both sides.
/// Φ(0) is exactly ½ (the fit alone gives ½ − 1e-7), so that GELU′(0) = ½ as SPEC §1 states.
/// Φ(NaN) is NaN.
#[inline(always)]
fn normal_cdf<R: Real>(x: R) -> R {
    let tail = R::splat(0.5) * erfc_nonnegative(x.abs() * R::splat(FRAC_1_SQRT_2));
    // Two selects rather than an if/else-if chain, so that loops over this vectorise.
    let zero = R::splat(0.0);
    let cdf = x.if_greater(zero, R::splat(1.0) - tail, tail);
    x.if_equal(zero, R::splat(0.5), cdf)
}

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)). GELU(0) is exactly 0, which exact growth relies on.
#[inline(always)]
pub(crate) fn gelu<R: Real>(x: R) -> R {
    x * normal_cdf(x)
}

/// GELU′(x) = Φ(x) + x·φ(x), with φ(x) = exp(−x²/2)/√(2π).
#[inline(always)]
pub(crate) fn gelu_grad<R: Real>(x: R) -> R {
    let density = exp_nonpositive(R::splat(-0.5) * x * x);
    (x * R::splat(FRAC_1_SQRT_2PI)).mul_add(density, normal_cdf(x))
}

/// max(x, 0), written so that a NaN passes through (`f32::max` would turn it into 0).
#[inline(always)]
fn relu_scalar(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// σ(x) = 1/(1 + e⁻ˣ) for x ≥ 0 and eˣ/(1 + eˣ) for x < 0: the same value, but the exponential
/// is never of a large positive number, and in the negative tail σ(x) ≈ eˣ keeps its relative
/// accuracy.
#[inline(always)]
fn sigmoid_scalar(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// (GELU(x), GELU′(x)) sharing one Φ(x): the bits of `gelu` and `gelu_grad`.
#[inline(always)]
pub(crate) fn gelu_and_grad<R: Real>(x: R) -> (R, R) {
    let cdf = normal_cdf(x);
    let density = exp_nonpositive(R::splat(-0.5) * x * x);
    (x * cdf, (x * R::splat(FRAC_1_SQRT_2PI)).mul_add(density, cdf))
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

/// y = f(x) for the op `op`, with the parameters of powf (p) and affine (p, q).
pub(crate) fn forward(op: Unary, x: &Tensor, p: f32, q: f32) -> Result<Tensor> {
    let name = op.names().0;
    match op {
        Unary::Neg => map(name, x, |v| -v),
        Unary::Exp => map(name, x, f32::exp),
        Unary::Log => map(name, x, f32::ln),
        Unary::Sqrt => map(name, x, f32::sqrt),
        Unary::Square => map(name, x, |v| v * v),
        Unary::Gelu => map(name, x, gelu::<f32>),
        Unary::Powf => map(name, x, move |v| v.powf(p)),
        Unary::Affine => map(name, x, move |v| v * p + q),
        Unary::Relu => map(name, x, relu_scalar),
        Unary::Tanh => map(name, x, f32::tanh),
        Unary::Sigmoid => map(name, x, sigmoid_scalar),
    }
}

/// ∂L/∂x = g·f′ for the op `op`, from `v`: the input x or the output y, as the rule is
/// written (see mod.rs).
pub(crate) fn backward(op: Unary, v: &Tensor, g: &Tensor, p: f32) -> Result<Tensor> {
    let name = op.names().1;
    match op {
        Unary::Exp => zip(name, v, g, |y, g| g * y),
        Unary::Log => zip(name, v, g, |x, g| g / x),
        Unary::Sqrt => zip(name, v, g, |y, g| g / (2.0 * y)),
        Unary::Square => zip(name, v, g, |x, g| 2.0 * x * g),
        Unary::Gelu => zip(name, v, g, |x, g| g * gelu_grad(x)),
        Unary::Powf => zip(name, v, g, move |x, g| g * p * x.powf(p - 1.0)),
        Unary::Relu => zip(name, v, g, |x, g| if x > 0.0 { g } else { 0.0 }),
        Unary::Tanh => zip(name, v, g, |y, g| g * (1.0 - y * y)),
        Unary::Sigmoid => zip(name, v, g, |y, g| g * y * (1.0 - y)),
        Unary::Neg | Unary::Affine => Err(Error::argument(
            name,
            "a linear op has no backward kernel; its backward is the op applied to g",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_erf_and_gelu_are_accurate() {
        let mut worst = 0.0f64;
        for i in -80_000..=80_000 {
            let u = i as f32 * 1e-4;
            let erf = (1.0 - super::erfc_nonnegative(u.abs())).copysign(u);
            let err = (erf as f64 - libm::erf(u as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 4e-7, "max |erf error| {worst}");
        // GELU relative to an f64 reference, deep into the negative tail where the cancelling
        // form ½x(1 + erf) fails.
        let mut worst_gelu = 0.0f64;
        let mut worst_grad = 0.0f64;
        for i in -120_000..=120_000 {
            let x = i as f32 * 1e-4;
            let xd = x as f64;
            let cdf = 0.5 * libm::erfc(-xd / std::f64::consts::SQRT_2);
            let gelu = xd * cdf;
            let grad = cdf + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            if gelu != 0.0 {
                let e = (super::gelu(x) as f64 - gelu).abs() / gelu.abs();
                // exp(−x²/2) takes its argument in f32, rounded to about 6e-8·x²/2: in the far
                // tail that rounding, not the fit, sets the relative error.
                let bound = 1e-6 + 2e-7 * xd * xd;
                assert!(e < bound, "GELU({x}) relative error {e}");
                worst_gelu = worst_gelu.max(e);
            }
            // GELU′ = Φ + x·φ crosses zero near x = −0.75, so its error is measured against the
            // size of its two terms rather than against itself.
            let scale = cdf + (xd * (-0.5 * xd * xd).exp()).abs();
            worst_grad = worst_grad.max((super::gelu_grad(x) as f64 - grad).abs() / scale);
        }
        assert!(worst_gelu < 3e-5, "max relative GELU error {worst_gelu}");
        assert!(worst_grad < 1e-5, "max relative GELU' error {worst_grad}");
        assert_eq!(super::gelu(0.0), 0.0);
        assert!((super::gelu_grad(0.0) - 0.5).abs() < 1e-7);
        let mut worst_exp = 0.0f64;
        for i in 0..=86_900 {
            let x = -(i as f32) * 1e-3;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((super::exp_nonpositive(x) as f64 - exact).abs() / exact);
        }
        assert!(worst_exp < 4e-7, "max relative exp error {worst_exp}");
        // Into the subnormals, down to where e^x rounds to 0: one rounding, so within half a
        // subnormal step (2⁻¹⁵⁰) of the exact value, plus the polynomial's relative error.
        for i in 86_900..=104_500 {
            let x = -(i as f32) * 1e-3;
            let exact = (x as f64).exp();
            let got = super::exp_nonpositive(x) as f64;
            let bound = 4e-7 * exact + 2f64.powi(-150);
            assert!((got - exact).abs() <= bound, "exp({x}) = {got:e}, exact {exact:e}");
        }
        assert_eq!(super::exp_nonpositive(-200.0), 0.0);
        assert_eq!(super::exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(super::exp_nonpositive(f32::NAN).is_nan());
        // 2ⁿ read from the mantissa bits equals 2ⁿ through a float-to-int conversion.
        for i in 0..=87_000 {
            let x = -(i as f32) * 1e-3;
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let by_cast = f32::from_bits(((n as i32 + 127) as u32) << 23);
            let bits = (x * std::f32::consts::LOG2_E + 12_582_912.0).to_bits();
            let by_bits = f32::from_bits(
                bits.wrapping_sub(12_582_912.0f32.to_bits()).wrapping_add(127) << 23,
            );
            assert_eq!(by_cast.to_bits(), by_bits.to_bits(), "2^n at x = {x}");
        }
        assert_eq!(super::gelu(0.0), 0.0);
        assert!((super::gelu_grad(0.0) - 0.5).abs() < 1e-7);
    }
}
