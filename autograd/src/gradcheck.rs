//! Checks analytic gradients against central finite differences.
//!
//! The function's output is first reduced to a scalar L = Σ w⊙f(x) with fixed random weights w
//! (a plain sum would hide mistakes that cancel, such as a softmax gradient off by a constant
//! per row). Then for every input element x_j:
//!
//! ```text
//! numeric_j = (L(x + ε·e_j) − L(x − ε·e_j)) / 2ε
//! ```
//!
//! is compared with the analytic ∂L/∂x_j from `backward`: they must agree within
//! atol + rtol·|numeric|. The engine is f32, so ε is large-ish (1e-2 by default) and L is
//! accumulated in f64 to keep rounding below the tolerance.

use crate::var::{no_grad, Var};
use tokenformer_core::{Device, Error, Result, Rng, Tensor};

#[derive(Clone, Debug)]
pub struct GradcheckOptions {
    pub eps: f32,
    pub atol: f32,
    pub rtol: f32,
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-2, atol: 2e-3, rtol: 2e-2, seed: 0 }
    }
}

/// Σ w⊙y in f64, on the host.
fn weighted_sum(y: &Tensor, w: &[f32]) -> Result<f64> {
    Ok(y.to_vec()?.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
}

/// Returns `Ok(())` when every input's gradient matches, or an error naming the input, the
/// element, and both values of the worst mismatch.
pub fn gradcheck<F>(f: F, inputs: &[Tensor], opts: &GradcheckOptions) -> Result<()>
where
    F: Fn(&[Var]) -> Result<Var>,
{
    let params: Vec<Var> = inputs.iter().map(|t| Var::param(t.clone())).collect();
    let out = f(&params)?;
    let mut rng = Rng::new(opts.seed);
    let w_values: Vec<f32> = (0..out.value().numel()).map(|_| 0.5 + rng.next_f32()).collect();
    let w = Var::constant(
        Tensor::from_vec(w_values.clone(), out.dims())?.to_device(out.value().device())?,
    );
    let loss = out.mul(&w)?.sum_all()?;
    let grads = loss.backward()?;

    for (i, input) in inputs.iter().enumerate() {
        let analytic = match grads.get(&params[i]) {
            Some(g) => g.to_vec()?,
            // An input the output does not depend on has a zero gradient.
            None => vec![0.0; input.numel()],
        };
        let device: Device = input.device();
        let base = input.to_vec()?;
        let mut worst: Option<(usize, f32, f32, f32)> = None;
        for j in 0..base.len() {
            let eval_at = |delta: f32| -> Result<f64> {
                let mut x = base.clone();
                x[j] += delta;
                let xt = Tensor::from_vec(x, input.dims())?.to_device(device)?;
                let vars: Vec<Var> = params
                    .iter()
                    .enumerate()
                    .map(|(k, p)| if k == i { Var::constant(xt.clone()) } else { p.detach() })
                    .collect();
                no_grad(|| weighted_sum(f(&vars)?.value(), &w_values))
            };
            let numeric =
                ((eval_at(opts.eps)? - eval_at(-opts.eps)?) / (2.0 * opts.eps as f64)) as f32;
            let err = (analytic[j] - numeric).abs();
            let allowed = opts.atol + opts.rtol * numeric.abs();
            // Written so that a NaN on either side counts as a mismatch.
            let within = err <= allowed;
            if !within && worst.is_none_or(|(_, e, _, _)| err > e) {
                worst = Some((j, err, analytic[j], numeric));
            }
        }
        if let Some((j, err, a, n)) = worst {
            return Err(Error::invalid(format!(
                "gradcheck: input {i} (shape {}) element {j}: analytic {a} vs numeric {n} (error {err})",
                input.shape()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_a_correct_backward() {
        let x = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
        gradcheck(|v| v[0].square()?.exp(), &[x], &GradcheckOptions::default()).unwrap();
    }

    #[test]
    fn catches_a_wrong_backward() {
        // x² with a backward of x instead of 2x.
        let wrong_square = |v: &[Var]| -> Result<Var> {
            let x = v[0].value().clone();
            let y = tokenformer_ops::unary::square(&x)?;
            Ok(Var::from_op(
                "wrong_square",
                y,
                &[&v[0]],
                Box::new(move |g| Ok(vec![Some(tokenformer_ops::binary::mul(g, &x)?)])),
            ))
        };
        let x = Tensor::randn(&[5], 1.0, &mut Rng::new(2));
        let err = gradcheck(wrong_square, &[x], &GradcheckOptions::default()).unwrap_err();
        assert!(err.to_string().contains("gradcheck: input 0"), "{err}");
    }
}
