//! Elementwise unary ops.
//!
//! ```text
//! Forward y = f(x)                        Backward g·f′, from x or y = f(x), whichever is cheaper
//!   neg      −x                             neg(g)  (linear: the op applied to g)
//!   exp      eˣ                             g·y
//!   log      ln x                           g/x
//!   sqrt     √x                             g/(2y)
//!   square   x²                             g·2x
//!   powf     x^p                            g·p·x^(p−1)
//!   affine   x·mul + add                    affine(g, mul, 0)  (linear)
//!   gelu     x·Φ(x) = ½x(1 + erf(x/√2))     g·(Φ(x) + x·φ(x)), φ the standard normal density
//!   relu     max(x, 0)                      g·[x > 0]
//!   tanh     tanh x                         g·(1 − y²), since tanh′ = 1 − tanh²
//!   sigmoid  σ(x) = 1/(1 + e⁻ˣ)             g·y·(1 − y), since σ′ = σ·(1 − σ)
//! ```
//!
//! GELU is the exact (erf) one. relu has no derivative at exactly 0; like PyTorch and JAX we
//! take 0 there (the indicator `[x > 0]`), so a unit sitting exactly at 0 passes no gradient.

pub(crate) mod cpu;
mod cuda;

use crate::{check_same_dims, same_device};
use tokenformer_core::{Device, Result, Tensor};

/// The elementwise unary ops: one table for the whole family. cpu.rs matches on it for the
/// reference loops; on the GPU the op travels as the code kernels.cu gives it,
/// `#define OP_<NAME>` (cuda.rs reads the codes from there when the crate is compiled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Square,
    Gelu,
    /// x^p, with the exponent p as the op's first parameter.
    Powf,
    /// x·mul + add, with mul and add as the op's two parameters.
    Affine,
    Relu,
    Tanh,
    Sigmoid,
}

impl Unary {
    /// Every op, in the order of declaration.
    pub(crate) const ALL: [Unary; 11] = [
        Unary::Neg,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Square,
        Unary::Gelu,
        Unary::Powf,
        Unary::Affine,
        Unary::Relu,
        Unary::Tanh,
        Unary::Sigmoid,
    ];

    /// The forward op's name (errors use it; kernels.cu spells it in capitals after `OP_`) and
    /// the backward op's.
    pub(crate) const fn names(self) -> (&'static str, &'static str) {
        match self {
            Unary::Neg => ("neg", "neg_backward"),
            Unary::Exp => ("exp", "exp_backward"),
            Unary::Log => ("log", "log_backward"),
            Unary::Sqrt => ("sqrt", "sqrt_backward"),
            Unary::Square => ("square", "square_backward"),
            Unary::Gelu => ("gelu", "gelu_backward"),
            Unary::Powf => ("powf", "powf_backward"),
            Unary::Affine => ("affine", "affine_backward"),
            Unary::Relu => ("relu", "relu_backward"),
            Unary::Tanh => ("tanh", "tanh_backward"),
            Unary::Sigmoid => ("sigmoid", "sigmoid_backward"),
        }
    }
}

/// y = f(x) elementwise, `p` and `q` being the parameters of powf (p) and affine (p, q).
fn forward(op: Unary, x: &Tensor, p: f32, q: f32) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::forward(op, x, p, q),
        Device::Cuda(_) => cuda::forward(op, x, p, q),
    }
}

/// ∂L/∂x = g·f′ elementwise, where `v` is x or y = f(x), whichever the op's rule reads.
fn backward(op: Unary, v: &Tensor, g: &Tensor, p: f32) -> Result<Tensor> {
    let name = op.names().1;
    let device = same_device(name, &[v, g])?;
    check_same_dims(name, v, g)?;
    match device {
        Device::Cpu => cpu::backward(op, v, g, p),
        Device::Cuda(_) => cuda::backward(op, v, g, p),
    }
}

pub fn neg(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Neg, x, 0.0, 0.0)
}

pub fn exp(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Exp, x, 0.0, 0.0)
}

pub fn log(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Log, x, 0.0, 0.0)
}

pub fn sqrt(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Sqrt, x, 0.0, 0.0)
}

pub fn square(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Square, x, 0.0, 0.0)
}

/// The exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Gelu, x, 0.0, 0.0)
}

/// max(x, 0); a NaN stays NaN, so a diverging network is seen rather than silently zeroed.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Relu, x, 0.0, 0.0)
}

pub fn tanh(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Tanh, x, 0.0, 0.0)
}

/// The logistic function 1/(1 + e⁻ˣ).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    forward(Unary::Sigmoid, x, 0.0, 0.0)
}

pub fn powf(x: &Tensor, p: f32) -> Result<Tensor> {
    forward(Unary::Powf, x, p, 0.0)
}

/// x·mul + add: scalar multiplication and scalar addition in one op.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    forward(Unary::Affine, x, mul, add)
}

/// ∂L/∂x of y = eˣ, from the output y.
pub fn exp_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Exp, y, g, 0.0)
}

pub fn log_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Log, x, g, 0.0)
}

/// ∂L/∂x of y = √x, from the output y.
pub fn sqrt_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Sqrt, y, g, 0.0)
}

pub fn square_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Square, x, g, 0.0)
}

pub fn powf_backward(x: &Tensor, p: f32, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Powf, x, g, p)
}

pub fn gelu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Gelu, x, g, 0.0)
}

/// ∂L/∂x of y = relu(x), from the input x: g where x > 0, and 0 elsewhere (also at x = 0).
pub fn relu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Relu, x, g, 0.0)
}

/// ∂L/∂x of y = tanh(x), from the output y.
pub fn tanh_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Tanh, y, g, 0.0)
}

/// ∂L/∂x of y = σ(x), from the output y.
pub fn sigmoid_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward(Unary::Sigmoid, y, g, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, tensor, values};

    fn gelu_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn forward_matches_f64_formulas() {
        let x = randn(&[3, 7], 1);
        let positive = affine(&square(&x).unwrap(), 1.0, 0.5).unwrap();
        let (xv, pv) = (values(&x), values(&positive));
        let map = |v: &[f32], f: fn(f64) -> f64| v.iter().map(|&a| f(a as f64)).collect::<Vec<_>>();
        assert_close(&values(&neg(&x).unwrap()), &map(&xv, |a| -a), 0.0, 0.0, "neg");
        assert_close(&values(&exp(&x).unwrap()), &map(&xv, f64::exp), 0.0, 1e-6, "exp");
        assert_close(&values(&log(&positive).unwrap()), &map(&pv, f64::ln), 1e-7, 1e-6, "log");
        assert_close(&values(&sqrt(&positive).unwrap()), &map(&pv, f64::sqrt), 0.0, 1e-6, "sqrt");
        assert_close(&values(&square(&x).unwrap()), &map(&xv, |a| a * a), 0.0, 1e-6, "square");
        assert_close(&values(&gelu(&x).unwrap()), &map(&xv, gelu_f64), 1e-6, 1e-5, "gelu");
        assert_close(
            &values(&powf(&positive, 1.7).unwrap()),
            &map(&pv, |a| a.powf(1.7)),
            0.0,
            1e-5,
            "powf",
        );
        assert_close(
            &values(&affine(&x, -2.5, 0.75).unwrap()),
            &map(&xv, |a| a * -2.5 + 0.75),
            1e-6,
            1e-6,
            "affine",
        );
        let at_zero = values(&gelu(&tensor(vec![0.0], &[1])).unwrap());
        assert_eq!(at_zero, vec![0.0]);
        assert_close(&values(&relu(&x).unwrap()), &map(&xv, |a| a.max(0.0)), 0.0, 0.0, "relu");
        assert_close(&values(&tanh(&x).unwrap()), &map(&xv, f64::tanh), 1e-7, 1e-6, "tanh");
        let logistic = |a: f64| 1.0 / (1.0 + (-a).exp());
        assert_close(&values(&sigmoid(&x).unwrap()), &map(&xv, logistic), 1e-7, 1e-6, "sigmoid");
    }

    #[test]
    fn activations_at_the_edges() {
        let x = tensor(vec![-200.0, -30.0, -0.0, 0.0, 30.0, 200.0, f32::NAN], &[7]);
        let relu_y = values(&relu(&x).unwrap());
        assert_eq!(relu_y[..6], [0.0, 0.0, 0.0, 0.0, 30.0, 200.0]);
        assert!(relu_y[6].is_nan(), "relu must not hide a NaN");
        let tanh_y = values(&tanh(&x).unwrap());
        assert_eq!(tanh_y[..6], [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]);
        let sig = values(&sigmoid(&x).unwrap());
        assert_eq!((sig[0], sig[2], sig[3], sig[5]), (0.0, 0.5, 0.5, 1.0));
        // In the negative tail σ(x) ≈ eˣ keeps its relative accuracy (no 1 − (1 − ε) rounding).
        let tail = (-30.0f64).exp() / (1.0 + (-30.0f64).exp());
        assert!(((sig[1] as f64 - tail) / tail).abs() < 1e-6, "σ(−30) = {}", sig[1]);
        assert!(sig.iter().take(6).all(|v| v.is_finite()));
    }

    #[test]
    fn relu_gradient_at_zero_is_zero() {
        // The convention at the kink: the indicator [x > 0], so exactly 0 passes nothing.
        let x = tensor(vec![-1.0, -0.0, 0.0, 1e-30, 2.0], &[5]);
        let g = tensor(vec![3.0; 5], &[5]);
        assert_eq!(values(&relu_backward(&x, &g).unwrap()), vec![0.0, 0.0, 0.0, 3.0, 3.0]);
    }

    #[test]
    fn the_parallel_path_gives_the_same_bits_as_the_serial_one() {
        let x = randn(&[129, 301], 2);
        let whole = values(&gelu(&x).unwrap());
        let row = tensor(values(&x)[..301].to_vec(), &[301]);
        assert_eq!(values(&gelu(&row).unwrap()), whole[..301].to_vec());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = randn(&[4, 5], 3);
        let positive = affine(&square(&x).unwrap(), 1.0, 0.5).unwrap();
        let g = randn(&[4, 5], 4);
        let y = exp(&x).unwrap();
        check_grad("exp", &x, &g, &exp_backward(&y, &g).unwrap(), |t| exp(t).unwrap());
        check_grad("log", &positive, &g, &log_backward(&positive, &g).unwrap(), |t| {
            log(t).unwrap()
        });
        let root = sqrt(&positive).unwrap();
        check_grad("sqrt", &positive, &g, &sqrt_backward(&root, &g).unwrap(), |t| sqrt(t).unwrap());
        check_grad("square", &x, &g, &square_backward(&x, &g).unwrap(), |t| square(t).unwrap());
        check_grad("powf", &positive, &g, &powf_backward(&positive, 2.5, &g).unwrap(), |t| {
            powf(t, 2.5).unwrap()
        });
        check_grad("gelu", &x, &g, &gelu_backward(&x, &g).unwrap(), |t| gelu(t).unwrap());
        // relu's finite difference straddles the kink when |x| < h = 1e-2: keep away from it.
        let shifted = values(&x).into_iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { v });
        let away = tensor(shifted.collect(), &[4, 5]);
        check_grad("relu", &away, &g, &relu_backward(&away, &g).unwrap(), |t| relu(t).unwrap());
        let y = tanh(&x).unwrap();
        check_grad("tanh", &x, &g, &tanh_backward(&y, &g).unwrap(), |t| tanh(t).unwrap());
        let y = sigmoid(&x).unwrap();
        check_grad("sigmoid", &x, &g, &sigmoid_backward(&y, &g).unwrap(), |t| sigmoid(t).unwrap());
        check_grad("neg", &x, &g, &neg(&g).unwrap(), |t| neg(t).unwrap());
        check_grad("affine", &x, &g, &affine(&g, 1.3, 0.0).unwrap(), |t| {
            affine(t, 1.3, -0.4).unwrap()
        });
    }

    #[test]
    fn gelu_of_nan_is_nan() {
        let nan = tensor(vec![f32::NAN, 1.0], &[2]);
        assert!(values(&gelu(&nan).unwrap())[0].is_nan());
        let grad = values(&gelu_backward(&nan, &tensor(vec![1.0, 1.0], &[2])).unwrap());
        assert!(grad[0].is_nan() && grad[1].is_finite());
    }

    #[test]
    fn gelu_derivative_at_zero_is_one_half() {
        let zero = tensor(vec![0.0], &[1]);
        let one = tensor(vec![1.0], &[1]);
        assert_eq!(values(&gelu_backward(&zero, &one).unwrap()), vec![0.5]);
    }

    #[test]
    fn the_op_table_matches_the_kernel_file() {
        let names: Vec<&str> = Unary::ALL.iter().map(|op| op.names().0).collect();
        crate::kernels::check_op_table("unary", &names);
    }

    #[test]
    fn backward_rejects_mismatched_shapes() {
        let err = exp_backward(&randn(&[2, 3], 1), &randn(&[3, 2], 2)).unwrap_err().to_string();
        assert!(err.contains("exp_backward") && err.contains("[2, 3]"), "{err}");
    }
}
