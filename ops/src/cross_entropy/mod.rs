//! Mean cross-entropy of logits against integer targets, fused with the log-softmax.
//!
//! ```text
//! Forward, for row i with target t_i (m_i the row max, for stability):
//!   lse_i = m_i + ln Σ_j e^(x_ij − m_i),   loss = (1/N)·Σ_i (lse_i − x_{i,t_i})
//! Backward, with g = ∂L/∂loss and [j = t_i] the indicator:
//!   ∂lse_i/∂x_ij = softmax(x_i)_j = e^(x_ij − lse_i),   ∂x_{i,t_i}/∂x_ij = [j = t_i],
//!   ∂L/∂x_ij = g·(softmax(x_i)_j − [j = t_i])/N
//! ```
//!
//! The per-row lse is returned for the backward pass.
//!
//! Targets: on the CPU a target that is not an integer in `[0, V)` is an error naming it. On a
//! GPU the targets are not copied back to be checked (that would stall every training step);
//! they are checked where they are made — the trainer, `eval` and `generate` check ids on the
//! host before the upload. An invalid target that reaches the GPU kernels anyway makes that
//! row's loss NaN (so the mean loss is NaN) and its gradient row NaN; no kernel reads out of
//! bounds.

mod cpu;
mod cuda;

use crate::{check_ids, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

/// Checks logits [N, V] (N, V ≥ 1) against targets [N], and on the CPU that the targets hold
/// integers in [0, V) (see the module comment for GPUs).
fn check_logits_targets(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<()> {
    let valid = logits.rank() == 2
        && targets.dims() == [logits.dims()[0]]
        && logits.dims().iter().all(|&d| d > 0);
    if !valid {
        return Err(Error::shape(
            op,
            format!(
                "expected logits [N, V] with N, V >= 1 and targets [N], got {} and {}",
                logits.shape(),
                targets.shape()
            ),
        ));
    }
    check_ids(op, targets, logits.dims()[1])
}

/// (mean loss as a scalar tensor, logsumexp of every row `[N]`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let device = same_device("cross_entropy", &[logits, targets])?;
    check_logits_targets("cross_entropy", logits, targets)?;
    match device {
        Device::Cpu => cpu::cross_entropy(logits, targets),
        Device::Cuda(_) => cuda::cross_entropy(logits, targets),
    }
}

/// ∂L/∂logits, given the forward's `lse` and g = ∂L/∂loss (one value).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let device = same_device(op, &[logits, targets, lse, g])?;
    check_logits_targets(op, logits, targets)?;
    if lse.dims() != targets.dims() || g.numel() != 1 {
        return Err(Error::shape(
            op,
            format!(
                "expected lse [N] and a one-value gradient, got {} and {} for logits {}",
                lse.shape(),
                g.shape(),
                logits.shape()
            ),
        ));
    }
    match device {
        Device::Cpu => cpu::cross_entropy_backward(logits, targets, lse, g),
        Device::Cuda(_) => cuda::cross_entropy_backward(logits, targets, lse, g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, tensor, values};

    #[test]
    fn forward_matches_f64_formula() {
        let (n, v) = (6, 13);
        let logits = crate::unary::affine(&randn(&[n, v], 1), 4.0, 50.0).unwrap();
        let targets = tensor(vec![0.0, 12.0, 5.0, 5.0, 7.0, 1.0], &[n]);
        let (loss, lse) = cross_entropy(&logits, &targets).unwrap();
        assert_eq!(loss.dims(), &[] as &[usize]);
        let (x, t) = (values(&logits), values(&targets));
        let mut expected_lse = Vec::new();
        let mut total = 0.0;
        for (i, row) in x.chunks(v).enumerate() {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &a| m.max(a as f64));
            let l = max + row.iter().map(|&a| (a as f64 - max).exp()).sum::<f64>().ln();
            expected_lse.push(l);
            total += l - row[t[i] as usize] as f64;
        }
        assert_close(&values(&lse), &expected_lse, 1e-5, 1e-6, "lse");
        assert_close(&values(&loss), &[total / n as f64], 1e-5, 1e-5, "loss");
    }

    #[test]
    fn a_nan_logit_makes_the_loss_nan() {
        // Rows long enough for the parallel path; the NaN sits in the last one.
        let (n, v) = (200, 257);
        let mut x = values(&randn(&[n, v], 3));
        x[n * v - 5] = f32::NAN;
        let logits = tensor(x, &[n, v]);
        let targets = tensor((0..n).map(|i| (i % v) as f32).collect(), &[n]);
        let (loss, lse) = cross_entropy(&logits, &targets).unwrap();
        assert!(values(&loss)[0].is_nan());
        assert!(
            values(&lse)[n - 1].is_nan() && values(&lse)[..n - 1].iter().all(|l| l.is_finite())
        );
    }

    #[test]
    fn a_masked_logit_gets_exactly_zero_gradient() {
        let (n, v) = (3, 40);
        let mut x = values(&randn(&[n, v], 4));
        x[5] = f32::NEG_INFINITY;
        x[v + 7] = -500.0;
        let logits = tensor(x, &[n, v]);
        let targets = tensor(vec![0.0, 1.0, 2.0], &[n]);
        let (loss, lse) = cross_entropy(&logits, &targets).unwrap();
        assert!(values(&loss)[0].is_finite());
        let g = cross_entropy_backward(&logits, &targets, &lse, &tensor(vec![1.0], &[])).unwrap();
        let g = values(&g);
        assert_eq!((g[5], g[v + 7]), (0.0, 0.0));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, v) = (5, 7);
        let logits = randn(&[n, v], 2);
        let targets = tensor(vec![6.0, 0.0, 3.0, 3.0, 1.0], &[n]);
        let (_, lse) = cross_entropy(&logits, &targets).unwrap();
        let g = tensor(vec![1.7], &[]);
        let gx = cross_entropy_backward(&logits, &targets, &lse, &g).unwrap();
        check_grad("cross_entropy", &logits, &g, &gx, |x| cross_entropy(x, &targets).unwrap().0);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let logits = randn(&[2, 3], 1);
        let err = cross_entropy(&logits, &tensor(vec![0.0, 3.0], &[2])).unwrap_err().to_string();
        assert!(err.contains("cross_entropy") && err.contains('3'), "{err}");
        assert!(cross_entropy(&logits, &tensor(vec![0.0], &[1])).is_err());
        assert!(cross_entropy(&randn(&[0, 3], 1), &tensor(vec![], &[0])).is_err());
        let targets = tensor(vec![0.0, 1.0], &[2]);
        let (_, lse) = cross_entropy(&logits, &targets).unwrap();
        assert!(cross_entropy_backward(&logits, &targets, &lse, &randn(&[2], 1)).is_err());
    }
}
