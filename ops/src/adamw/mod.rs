//! AdamW, one fused elementwise step, and the sum of squares used for global-norm clipping.
//!
//! With gradient g at step t (1-based):
//!
//! ```text
//! m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²,
//! m̂ = m/(1 − β1ᵗ),   v̂ = v/(1 − β2ᵗ),
//! p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps)
//! ```
//!
//! Weight decay is decoupled and applied first, as in PyTorch's AdamW; the bias corrections
//! are computed in f64, and the update is applied as PyTorch does:
//! `p − (lr/(1 − β1ᵗ))·m/(√v/√(1 − β2ᵗ) + eps)`. An optimizer step has no backward.
//!
//! Global-norm clipping scales every gradient by
//!
//! ```text
//! factor = max_norm / max(√(Σ_tensors Σ g²) + 1e-6, max_norm)      (exactly 1 when unclipped)
//! ```
//!
//! The one-tensor ops (`adamw_step`, `sum_squares`) cost a few kernels and buffers per
//! parameter; the multi-tensor ones (`sum_squares_many`, `clip_factor`, `adamw_step_many`) do a
//! whole model's step in a handful of launches (on the GPU, with the clip factor read on the
//! device), scaling each gradient inside the update and updating the parameters and moments
//! that nothing else holds in place.

mod cpu;
mod cuda;

use crate::same_device;
use tokenformer_core::{Device, Error, Result, Tensor};

/// AdamW hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// The per-step scalars of the update, shared by the CPU and CUDA kernels: the bias
/// corrections are taken in f64 (βᵗ for large t is far below f32's resolution of 1 − βᵗ).
pub(crate) struct StepScalars {
    /// lr / (1 − β₁ᵗ)
    pub step_size: f32,
    /// 1 / √(1 − β₂ᵗ)
    pub inv_sqrt_bc2: f32,
    /// 1 − lr·wd, the decoupled weight decay
    pub decay: f32,
}

impl AdamW {
    pub(crate) fn step_scalars(&self, step: u64) -> StepScalars {
        let t = step.min(i32::MAX as u64) as i32;
        let bias_correction1 = 1.0 - (self.beta1 as f64).powi(t);
        let bias_correction2 = 1.0 - (self.beta2 as f64).powi(t);
        StepScalars {
            step_size: (self.lr as f64 / bias_correction1) as f32,
            inv_sqrt_bc2: (1.0 / bias_correction2.sqrt()) as f32,
            decay: 1.0 - self.lr * self.weight_decay,
        }
    }
}

/// (new param, new m, new v) after one AdamW step; `step` counts from 1.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = same_device("adamw_step", &[param, grad, m, v])?;
    if grad.dims() != param.dims() || m.dims() != param.dims() || v.dims() != param.dims() {
        return Err(Error::shape(
            "adamw_step",
            format!(
                "param {}, grad {}, m {} and v {} must have one shape",
                param.shape(),
                grad.shape(),
                m.shape(),
                v.shape()
            ),
        ));
    }
    if step == 0 {
        return Err(Error::argument("adamw_step", "step counts from 1, got 0"));
    }
    match device {
        Device::Cpu => cpu::adamw_step(param, grad, m, v, hp, step),
        Device::Cuda(_) => cuda::adamw_step(param, grad, m, v, hp, step),
    }
}

/// Σ x² over every element, as a scalar tensor (fixed summation order).
pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::sum_squares(x),
        Device::Cuda(_) => cuda::sum_squares(x),
    }
}

/// `sum_squares` of each tensor (on the CPU, the tensors in parallel).
pub fn sum_squares_each(xs: &[Tensor]) -> Result<Vec<Tensor>> {
    if xs.iter().all(|x| x.device() == Device::Cpu) {
        use rayon::prelude::*;
        return xs.par_iter().map(cpu::sum_squares).collect();
    }
    xs.iter().map(sum_squares).collect()
}

/// Σ over every tensor of Σ x², as a scalar tensor on their device, in a fixed order.
pub fn sum_squares_many(xs: &[Tensor]) -> Result<Tensor> {
    let refs: Vec<&Tensor> = xs.iter().collect();
    match same_device("sum_squares_many", &refs)? {
        Device::Cpu => cpu::sum_squares_many(xs),
        Device::Cuda(_) => cuda::sum_squares_many(xs),
    }
}

/// (norm, factor) of global-norm clipping from Σ g² (a scalar tensor, as `sum_squares_many`
/// gives): norm = √Σg², factor = max_norm / max(norm + 1e-6, max_norm). Both are one-element
/// tensors on the input's device, so the host never waits for them.
pub fn clip_factor(sum_of_squares: &Tensor, max_norm: f32) -> Result<(Tensor, Tensor)> {
    if sum_of_squares.numel() != 1 {
        return Err(Error::shape(
            "clip_factor",
            format!("expected one value, got shape {}", sum_of_squares.shape()),
        ));
    }
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::argument(
            "clip_factor",
            format!("max_norm must be positive, got {max_norm}"),
        ));
    }
    match sum_of_squares.device() {
        Device::Cpu => cpu::clip_factor(sum_of_squares, max_norm),
        Device::Cuda(_) => cuda::clip_factor(sum_of_squares, max_norm),
    }
}

/// One AdamW step over many parameters: `params[i]`, `m[i]` and `v[i]` are replaced by their
/// updated values, from gradient `grads[i]` times `grad_scale` (a one-element tensor such as
/// `clip_factor`'s factor; none means 1). Parameter i decays with `weight_decays[i]`, every
/// other hyperparameter is `hp`'s. The result is the one `adamw_step` gives on each parameter
/// with its gradient scaled first. The buffers of tensors that nothing else holds are updated in
/// place (on the CPU, a parameter whose value, m and v are all unshared); a shared one gets a
/// new buffer, so no other holder sees it change.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_many(
    params: &mut [Tensor],
    grads: &[Tensor],
    m: &mut [Tensor],
    v: &mut [Tensor],
    weight_decays: &[f32],
    hp: &AdamW,
    step: u64,
    grad_scale: Option<&Tensor>,
) -> Result<()> {
    let op = "adamw_step_many";
    let count = params.len();
    if [grads.len(), m.len(), v.len(), weight_decays.len()].iter().any(|&n| n != count) {
        return Err(Error::shape(
            op,
            format!(
                "{count} parameters, {} gradients, {} and {} moments, {} weight decays",
                grads.len(),
                m.len(),
                v.len(),
                weight_decays.len()
            ),
        ));
    }
    if step == 0 {
        return Err(Error::argument(op, "step counts from 1, got 0"));
    }
    if let Some(scale) = grad_scale {
        if scale.numel() != 1 {
            return Err(Error::shape(op, format!("grad_scale of shape {}", scale.shape())));
        }
    }
    let mut all: Vec<&Tensor> =
        params.iter().chain(grads).chain(m.iter()).chain(v.iter()).collect();
    all.extend(grad_scale);
    if all.is_empty() {
        return Ok(());
    }
    let device = same_device(op, &all)?;
    for i in 0..count {
        let dims = params[i].dims();
        if grads[i].dims() != dims || m[i].dims() != dims || v[i].dims() != dims {
            return Err(Error::shape(
                op,
                format!(
                    "parameter {i}: param {}, grad {}, m {} and v {} must have one shape",
                    params[i].shape(),
                    grads[i].shape(),
                    m[i].shape(),
                    v[i].shape()
                ),
            ));
        }
    }
    match device {
        Device::Cpu => {
            cpu::adamw_step_many(params, grads, m, v, weight_decays, hp, step, grad_scale)
        }
        Device::Cuda(_) => {
            cuda::adamw_step_many(params, grads, m, v, weight_decays, hp, step, grad_scale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn, values};

    /// Sizes that take the parallel path with a partial last chunk, and the empty tensor: every
    /// element is the scalar formula's, bit for bit.
    #[test]
    fn every_element_of_a_large_or_empty_step_is_the_scalar_formula() {
        let hp = AdamW { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        for n in [32_768 + 3 * 8192 + 37, 0] {
            let (p, g, m) = (randn(&[n], 1), randn(&[n], 2), randn(&[n], 3));
            let v = crate::unary::square(&randn(&[n], 4)).unwrap();
            let (p2, m2, v2) = adamw_step(&p, &g, &m, &v, &hp, 7).unwrap();
            let StepScalars { step_size, inv_sqrt_bc2, decay } = hp.step_scalars(7);
            let (pv, gv, mv, vv) = (values(&p), values(&g), values(&m), values(&v));
            let (mut pe, mut me, mut ve) = (vec![], vec![], vec![]);
            for i in 0..n {
                let mi = hp.beta1 * mv[i] + (1.0 - hp.beta1) * gv[i];
                let vi = hp.beta2 * vv[i] + (1.0 - hp.beta2) * gv[i] * gv[i];
                me.push(mi);
                ve.push(vi);
                pe.push(pv[i] * decay - step_size * mi / (vi.sqrt() * inv_sqrt_bc2 + hp.eps));
            }
            assert_eq!(values(&p2), pe, "param, n {n}");
            assert_eq!(values(&m2), me, "m, n {n}");
            assert_eq!(values(&v2), ve, "v, n {n}");
        }
    }

    #[test]
    fn many_tensors_step_as_one_tensor_at_a_time() {
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let dims: [&[usize]; 3] = [&[5, 7], &[300], &[2, 3, 4]];
        let mut params: Vec<Tensor> =
            dims.iter().enumerate().map(|(i, d)| randn(d, i as u64)).collect();
        let grads: Vec<Tensor> =
            dims.iter().enumerate().map(|(i, d)| randn(d, 10 + i as u64)).collect();
        let mut m: Vec<Tensor> =
            dims.iter().enumerate().map(|(i, d)| randn(d, 20 + i as u64)).collect();
        let mut v: Vec<Tensor> =
            dims.iter().map(|d| Tensor::full(d, 0.01, Device::Cpu).unwrap()).collect();
        let decays = [0.1, 0.0, 0.1];
        let squares = sum_squares_many(&grads).unwrap();
        let expected: f64 = grads.iter().flat_map(values).map(|g| g as f64 * g as f64).sum();
        assert_close(&values(&squares), &[expected], 1e-5, 1e-6, "sum_squares_many");
        let (norm, factor) = clip_factor(&squares, 0.5).unwrap();
        assert_close(&values(&norm), &[expected.sqrt()], 1e-5, 1e-6, "norm");
        assert_close(&values(&factor), &[0.5 / (expected.sqrt() + 1e-6)], 1e-6, 1e-6, "factor");
        let (_, one) = clip_factor(&squares, 1e9).unwrap();
        assert_eq!(values(&one), [1.0]);

        let expected: Vec<(Tensor, Tensor, Tensor)> = (0..3)
            .map(|i| {
                let g = crate::binary::mul(&grads[i], &factor).unwrap();
                let hp_i = AdamW { weight_decay: decays[i], ..hp };
                adamw_step(&params[i], &g, &m[i], &v[i], &hp_i, 4).unwrap()
            })
            .collect();
        // Buffers that something else holds get new ones (on the CPU the others are updated
        // in place): the holders see no change, and the values are the same either way.
        let (held_param, held_m) = (params[0].clone(), m[2].clone());
        let (param_before, m_before) = (values(&held_param), values(&held_m));
        adamw_step_many(&mut params, &grads, &mut m, &mut v, &decays, &hp, 4, Some(&factor))
            .unwrap();
        assert_eq!(values(&held_param), param_before, "a held parameter changed");
        assert_eq!(values(&held_m), m_before, "a held moment changed");
        assert!(!params[0].same_storage(&held_param) && !m[2].same_storage(&held_m));
        for (i, (p, mi, vi)) in expected.iter().enumerate() {
            assert_eq!(values(&params[i]), values(p), "param {i}");
            assert_eq!(values(&m[i]), values(mi), "m {i}");
            assert_eq!(values(&v[i]), values(vi), "v {i}");
        }
        // A step in place, at a size that takes the parallel path.
        let n = 32_768 + 8192 + 5;
        let (p1, g1, m1) = (randn(&[n], 31), randn(&[n], 32), randn(&[n], 33));
        let v1 = crate::unary::square(&randn(&[n], 34)).unwrap();
        let want =
            adamw_step(&p1, &crate::binary::mul(&g1, &factor).unwrap(), &m1, &v1, &hp, 9).unwrap();
        let (mut ps, mut ms, mut vs) = (vec![p1], vec![m1], vec![v1]);
        let storage = |t: &Tensor| t.cpu_data().unwrap().as_ptr();
        let before = [storage(&ps[0]), storage(&ms[0]), storage(&vs[0])];
        adamw_step_many(&mut ps, &[g1], &mut ms, &mut vs, &[0.1], &hp, 9, Some(&factor)).unwrap();
        assert_eq!([storage(&ps[0]), storage(&ms[0]), storage(&vs[0])], before, "not in place");
        assert_eq!(values(&ps[0]), values(&want.0), "param in place");
        assert_eq!(values(&ms[0]), values(&want.1), "m in place");
        assert_eq!(values(&vs[0]), values(&want.2), "v in place");
        let err = adamw_step_many(&mut params, &grads[..2], &mut m, &mut v, &decays, &hp, 5, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adamw_step_many"), "{err}");
    }

    #[test]
    fn steps_match_an_f64_reference() {
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let n = 70_001; // large enough for the parallel path, not a power of two
        let mut p = randn(&[n], 1);
        let mut m = Tensor::zeros(&[n], Device::Cpu).unwrap();
        let mut v = Tensor::zeros(&[n], Device::Cpu).unwrap();
        let mut p_ref: Vec<f64> = values(&p).iter().map(|&x| x as f64).collect();
        let (mut m_ref, mut v_ref) = (vec![0.0f64; n], vec![0.0f64; n]);
        for step in 1..=3u64 {
            let g = randn(&[n], 10 + step);
            (p, m, v) = adamw_step(&p, &g, &m, &v, &hp, step).unwrap();
            let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
            for (i, &gi) in values(&g).iter().enumerate() {
                let gi = gi as f64;
                m_ref[i] = b1 * m_ref[i] + (1.0 - b1) * gi;
                v_ref[i] = b2 * v_ref[i] + (1.0 - b2) * gi * gi;
                let m_hat = m_ref[i] / (1.0 - b1.powi(step as i32));
                let v_hat = v_ref[i] / (1.0 - b2.powi(step as i32));
                p_ref[i] = p_ref[i] * (1.0 - hp.lr as f64 * hp.weight_decay as f64)
                    - hp.lr as f64 * m_hat / (v_hat.sqrt() + hp.eps as f64);
            }
        }
        assert_close(&values(&m), &m_ref, 1e-6, 1e-5, "m");
        assert_close(&values(&v), &v_ref, 1e-7, 1e-5, "v");
        assert_close(&values(&p), &p_ref, 1e-6, 1e-5, "param");
    }

    #[test]
    fn sum_squares_and_errors() {
        let x = randn(&[3, 7], 2);
        let expected: f64 = values(&x).iter().map(|&a| a as f64 * a as f64).sum();
        let s = sum_squares(&x).unwrap();
        assert_eq!(s.dims(), &[] as &[usize]);
        assert_close(&values(&s), &[expected], 1e-6, 1e-6, "sum_squares");

        let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let err = adamw_step(&x, &randn(&[7, 3], 3), &x, &x, &hp, 1).unwrap_err().to_string();
        assert!(err.contains("adamw_step") && err.contains("[7, 3]"), "{err}");
        assert!(adamw_step(&x, &x, &x, &x, &hp, 0).is_err());
    }
}
