//! AdamW with decoupled weight decay, the learning-rate schedule and global-norm clipping.
//!
//! Per parameter p with gradient g at step t (1-based):
//!
//! ```text
//! m = β₁m + (1−β₁)g          v = β₂v + (1−β₂)g²
//! p = p·(1 − lr·wd) − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)
//! ```
//!
//! The update kernel is the `adamw` family in tokenformer-ops. Weight decay applies to the
//! token matrices and the embedding, never to LayerNorm parameters (SPEC §3).
//!
//! Frozen rows (`--freeze-old` after a growth): the leading rows of a parameter that existed
//! before the growth get no update at all — no step, no weight decay — and their moments stay
//! as they were; their gradients are zeroed before clipping, so the clip sees only what trains.

use crate::checkpoint::NamedTensors;
use crate::model::TokenFormer;
use tokenformer_autograd::Var;
use tokenformer_core::Device;
use tokenformer_core::{Error, Result, Tensor};
use tokenformer_ops::adamw::{
    adamw_step, adamw_step_many, clip_factor, sum_squares_each, sum_squares_many, AdamW,
};
use tokenformer_ops::{binary, layout, reduce, unary};

/// Linear warmup from 0 over `warmup` steps, then cosine from `lr` down to `min_lr` at
/// `total` steps. `step` counts from 0.
pub fn lr_at(step: u64, warmup: u64, total: u64, lr: f32, min_lr: f32) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / warmup as f32;
    }
    if total <= warmup {
        return lr;
    }
    let progress = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    (min_lr as f64 + (lr - min_lr) as f64 * cosine) as f32
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`, and returns the
/// norm before clipping as a one-element tensor. Everything stays on the gradients' device (no
/// host round trip inside a training step):
///
/// ```text
/// norm   = √(Σ_params Σ g²)           summed in parameter order, for determinism
/// factor = max_norm / max(norm + 1e-6, max_norm)     exactly 1 when no clipping is needed
/// g      = g · factor
/// ```
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f32) -> Result<Tensor> {
    let (norm, factor) = global_norm_and_factor(grads, max_norm)?;
    for g in grads.iter_mut() {
        *g = binary::mul(g, &factor)?;
    }
    Ok(norm)
}

/// (norm, factor) of [`clip_global_norm`], as one-element tensors, leaving the gradients alone.
fn global_norm_and_factor(grads: &[Tensor], max_norm: f32) -> Result<(Tensor, Tensor)> {
    let Some(first) = grads.first() else {
        return Err(Error::invalid("clip_global_norm: no gradients"));
    };
    let device = first.device();
    let squares = sum_squares_each(grads)?;
    let mut total = squares[0].clone();
    for s in &squares[1..] {
        total = binary::add(&total, s)?;
    }
    let norm = unary::sqrt(&total)?.reshape(&[1])?;
    let limit = Tensor::full(&[1], max_norm, device)?;
    let denominator = reduce::max(
        &layout::concat(&[unary::affine(&norm, 1.0, 1e-6)?, limit.clone()], 0)?,
        0,
        false,
    )?;
    let factor = binary::div(&limit, &denominator)?;
    Ok((norm, factor))
}

/// The optimizer's state: one pair of moments per parameter, in the model's checkpoint order.
pub struct Optimizer {
    pub hp: AdamW,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates applied so far (the t of the bias corrections is `step + 1` for the next one).
    pub step: u64,
    /// For each parameter, how many leading rows updates leave alone (0: none).
    pub frozen_rows: Vec<usize>,
}

/// The rows of a parameter along its first axis (1 for a scalar).
fn rows(t: &Tensor) -> usize {
    t.dims().first().copied().unwrap_or(1)
}

/// Rows `from..` of `t`.
fn tail(t: &Tensor, from: usize) -> Result<Tensor> {
    layout::narrow(t, 0, from, rows(t) - from)
}

/// The first `to` rows of `t`.
fn head(t: &Tensor, to: usize) -> Result<Tensor> {
    layout::narrow(t, 0, 0, to)
}

/// Whether a parameter gets weight decay (everything but the final LayerNorm).
pub fn decays(name: &str) -> bool {
    !name.starts_with("final_norm.")
}

impl Optimizer {
    pub fn new(model: &TokenFormer, hp: AdamW) -> Result<Optimizer> {
        let zeros = |v: &Var| Tensor::zeros(v.dims(), v.value().device());
        let params = model.named_params();
        Ok(Optimizer {
            hp,
            m: params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
            v: params.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
            step: 0,
            frozen_rows: vec![0; params.len()],
        })
    }

    /// Keeps the first `old_rows[name]` rows of each parameter of `model` fixed from now on
    /// (a parameter's whole length freezes it entirely).
    pub fn freeze(
        &mut self,
        model: &TokenFormer,
        old_rows: &std::collections::BTreeMap<String, usize>,
    ) -> Result<()> {
        let params = model.named_params();
        let mut frozen = Vec::with_capacity(params.len());
        for (name, p) in &params {
            let r = *old_rows.get(name).ok_or_else(|| {
                Error::invalid(format!("freeze: the growth record has no entry for {name}"))
            })?;
            frozen.push(r.min(rows(p.value())));
        }
        if old_rows.len() != params.len() {
            return Err(Error::invalid(format!(
                "freeze: the growth record names {} parameters, the model has {}",
                old_rows.len(),
                params.len()
            )));
        }
        self.frozen_rows = frozen;
        Ok(())
    }

    /// Zeroes the gradient of every frozen row, so that clipping measures what trains.
    pub fn mask_frozen(&self, grads: &mut [Tensor]) -> Result<()> {
        for (g, &r) in grads.iter_mut().zip(&self.frozen_rows) {
            if r == 0 {
                continue;
            }
            let mut dims = g.dims().to_vec();
            if r >= rows(g) {
                *g = Tensor::zeros(&dims, g.device())?;
            } else {
                dims[0] = r;
                *g = layout::concat(&[Tensor::zeros(&dims, g.device())?, tail(g, r)?], 0)?;
            }
        }
        Ok(())
    }

    /// An error unless there is one gradient and one pair of moments per parameter.
    fn check_counts(&self, grads: usize, params: usize) -> Result<()> {
        if grads != params || self.m.len() != params {
            return Err(Error::invalid(format!(
                "optimizer: {grads} gradients and {} moment pairs for {params} parameters",
                self.m.len()
            )));
        }
        Ok(())
    }

    /// Applies one update with learning rate `lr` to every parameter of `model`.
    pub fn update(&mut self, model: &mut TokenFormer, grads: &[Tensor], lr: f32) -> Result<()> {
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        let slots = model.params_mut();
        self.check_counts(grads.len(), slots.len())?;
        self.step += 1;
        for (i, slot) in slots.into_iter().enumerate() {
            let hp = AdamW {
                lr,
                weight_decay: if decays(&names[i]) { self.hp.weight_decay } else { 0.0 },
                ..self.hp
            };
            let frozen = self.frozen_rows.get(i).copied().unwrap_or(0);
            let (p, m, v) = (slot.value(), &self.m[i], &self.v[i]);
            let (p, m, v) = if frozen == 0 {
                adamw_step(p, &grads[i], m, v, &hp, self.step)?
            } else if frozen >= rows(p) {
                continue;
            } else {
                // Only the rows after the frozen ones step; the frozen ones are copied.
                let (new_p, new_m, new_v) = adamw_step(
                    &tail(p, frozen)?,
                    &tail(&grads[i], frozen)?,
                    &tail(m, frozen)?,
                    &tail(v, frozen)?,
                    &hp,
                    self.step,
                )?;
                let join =
                    |old: &Tensor, new: Tensor| layout::concat(&[head(old, frozen)?, new], 0);
                (join(p, new_p)?, join(m, new_m)?, join(v, new_v)?)
            };
            *slot = Var::param(p);
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// One training step's update: clips the gradients to a global norm of `clip` when given
    /// (returning the norm before clipping) and applies AdamW with learning rate `lr`.
    ///
    /// This is the multi-tensor path: the clip factor, then the update of every parameter with
    /// its gradient scaled inside the update (on a GPU in a handful of launches, the factor read
    /// on the device, and parameters and moments that nothing else holds updated in place).
    /// With frozen rows, or with `TOKENFORMER_FUSED=adamw:0`, it is `clip_global_norm` then
    /// `update`. Both compute the same step; on the CPU, the same bits.
    pub fn clip_and_update(
        &mut self,
        model: &mut TokenFormer,
        mut grads: Vec<Tensor>,
        lr: f32,
        clip: Option<f32>,
    ) -> Result<Option<Tensor>> {
        let on_gpu = grads.first().is_some_and(|g| g.device().is_cuda());
        // Frozen rows take the plain path, which updates parameters row-range by row-range.
        let frozen = self.frozen_rows.iter().any(|&r| r > 0);
        if frozen || !tokenformer_ops::fused::enabled("adamw")? {
            self.mask_frozen(&mut grads)?;
            let norm = clip.map(|c| clip_global_norm(&mut grads, c)).transpose()?;
            self.update(model, &grads, lr)?;
            return Ok(norm);
        }
        let (norm, factor) = match clip {
            // The GPU sums all squares in one launch; the CPU keeps `clip_global_norm`'s sums,
            // so that both CPU paths give the same bits.
            Some(c) if on_gpu => {
                let (norm, factor) = clip_factor(&sum_squares_many(&grads)?, c)?;
                (Some(norm), Some(factor))
            }
            Some(c) => {
                let (norm, factor) = global_norm_and_factor(&grads, c)?;
                (Some(norm), Some(factor))
            }
            None => (None, None),
        };
        let decays: Vec<f32> = model
            .named_params()
            .iter()
            .map(|(name, _)| if decays(name) { self.hp.weight_decay } else { 0.0 })
            .collect();
        let mut slots = model.params_mut();
        self.check_counts(grads.len(), slots.len())?;
        self.step += 1;
        // The parameters are taken out of the model, so that those nothing else holds (no
        // graph of the last step is alive) are updated in their own buffers.
        let placeholder = Tensor::zeros(&[0], Device::Cpu)?;
        let mut values: Vec<Tensor> = slots
            .iter_mut()
            .map(|slot| std::mem::replace(&mut **slot, Var::constant(placeholder.clone())))
            .map(|var| var.value().clone())
            .collect();
        let hp = AdamW { lr, ..self.hp };
        let (m, v) = (&mut self.m, &mut self.v);
        let result =
            adamw_step_many(&mut values, &grads, m, v, &decays, &hp, self.step, factor.as_ref());
        for (slot, value) in slots.into_iter().zip(values) {
            *slot = Var::param(value);
        }
        result?;
        Ok(norm)
    }

    /// The moments with their parameter names, for checkpoints.
    pub fn named_moments(&self, model: &TokenFormer) -> (NamedTensors, NamedTensors) {
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        (
            names.iter().cloned().zip(self.m.iter().cloned()).collect(),
            names.into_iter().zip(self.v.iter().cloned()).collect(),
        )
    }

    /// Restores moments saved by `named_moments`, checking names and shapes against `model`.
    pub fn from_named(
        model: &TokenFormer,
        hp: AdamW,
        step: u64,
        m: Vec<(String, Tensor)>,
        v: Vec<(String, Tensor)>,
    ) -> Result<Optimizer> {
        let params = model.named_params();
        let pick = |saved: Vec<(String, Tensor)>, which: &str| -> Result<Vec<Tensor>> {
            let mut by_name: std::collections::HashMap<String, Tensor> =
                saved.into_iter().collect();
            params
                .iter()
                .map(|(name, p)| {
                    let t = by_name.remove(name).ok_or_else(|| {
                        Error::invalid(format!("optimizer state: no {which} moment for {name}"))
                    })?;
                    if t.dims() != p.dims() {
                        return Err(Error::invalid(format!(
                            "optimizer state: {which} moment of {name} has shape {}, parameter has {}",
                            t.shape(),
                            p.value().shape()
                        )));
                    }
                    t.to_device(p.value().device())
                })
                .collect()
        };
        let frozen_rows = vec![0; params.len()];
        Ok(Optimizer { hp, m: pick(m, "first")?, v: pick(v, "second")?, step, frozen_rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;
    use std::collections::BTreeMap;
    use tokenformer_core::Rng;

    const HP: AdamW = AdamW { lr: 1.0, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.5 };

    /// A one-layer TokenFormer, and gradients of its parameters' shapes drawn from `seed`.
    fn model_and_grads(seed: u64) -> (TokenFormer, Vec<Tensor>) {
        let config = ModelConfig::tokenformer(11, 16, 1, 2, 8, [5, 4, 6], "byte");
        let model = TokenFormer::init(&config, seed, Device::Cpu).unwrap();
        let mut rng = Rng::new(seed ^ 7);
        let grads = model
            .named_params()
            .iter()
            .map(|(_, p)| Tensor::randn(p.dims(), 1.0, &mut rng))
            .collect();
        (model, grads)
    }

    fn values(model: &TokenFormer) -> Vec<(String, Vec<f32>)> {
        model.named_tensors().into_iter().map(|(name, t)| (name, t.to_vec().unwrap())).collect()
    }

    /// The two ways a step is applied: the plain one (`update`) and the multi-tensor one.
    fn step(
        fused: bool,
        opt: &mut Optimizer,
        model: &mut TokenFormer,
        grads: Vec<Tensor>,
        lr: f32,
    ) {
        if fused {
            opt.clip_and_update(model, grads, lr, None).unwrap();
        } else {
            opt.update(model, &grads, lr).unwrap();
        }
    }

    #[test]
    fn weight_decay_at_the_scheduled_rate_spares_only_the_final_norm() {
        // With zero gradients the Adam term is 0/(0 + ε) = 0: what is left is p·(1 − lr·wd), at
        // the rate given to the step (0.1), not the optimizer's base rate (1.0).
        for fused in [false, true] {
            let (mut model, grads) = model_and_grads(3);
            let before = values(&model);
            let zeros =
                grads.iter().map(|g| Tensor::zeros(g.dims(), Device::Cpu).unwrap()).collect();
            let mut opt = Optimizer::new(&model, HP).unwrap();
            step(fused, &mut opt, &mut model, zeros, 0.1);
            for ((name, old), (_, new)) in before.iter().zip(values(&model)) {
                let keep = if decays(name) { 1.0 - 0.1 * 0.5 } else { 1.0 };
                for (&x, &y) in old.iter().zip(&new) {
                    assert!(
                        (y - x * keep).abs() <= 1e-6 * x.abs(),
                        "{name} (fused {fused}): {x} -> {y}"
                    );
                }
            }
            assert!(before.iter().any(|(name, _)| !decays(name)), "the model has a final norm");
            assert!(decays("embedding.weight") && decays("layers.0.ffn.in.key_param_tokens"));
        }
    }

    #[test]
    fn frozen_rows_keep_their_values_and_stay_out_of_the_clip() {
        let (mut model, grads) = model_and_grads(5);
        // The first row of every parameter is old.
        let old_rows: BTreeMap<String, usize> =
            model.named_params().into_iter().map(|(name, _)| (name, 1)).collect();
        let mut opt = Optimizer::new(&model, HP).unwrap();
        opt.freeze(&model, &old_rows).unwrap();
        let before = values(&model);
        let norm =
            opt.clip_and_update(&mut model, grads.clone(), 0.1, Some(1e-3)).unwrap().unwrap();
        // The norm the clip saw: the gradients without their first rows.
        let squares: f64 = grads
            .iter()
            .map(|g| {
                let row = g.numel() / rows(g);
                g.to_vec().unwrap()[row..].iter().map(|&x| (x as f64).powi(2)).sum::<f64>()
            })
            .sum();
        let norm = norm.to_vec().unwrap()[0] as f64;
        assert!((norm - squares.sqrt()).abs() <= 1e-5 * norm, "{norm} vs {}", squares.sqrt());
        for ((name, old), (_, new)) in before.iter().zip(values(&model)) {
            let row = old.len()
                / rows(model.named_params().iter().find(|(n, _)| n == name).unwrap().1.value());
            assert_eq!(old[..row], new[..row], "{name}: a frozen row moved");
            assert_ne!(old[row..], new[row..], "{name}: the trainable rows did not move");
        }
    }

    #[test]
    fn a_gradient_too_many_or_too_few_is_refused() {
        for fused in [false, true] {
            let (mut model, grads) = model_and_grads(1);
            let mut opt = Optimizer::new(&model, HP).unwrap();
            let extra = grads[0].clone();
            for wrong in [grads[1..].to_vec(), [grads.clone(), vec![extra]].concat()] {
                let err = if fused {
                    opt.clip_and_update(&mut model, wrong, 0.1, None).map(|_| ())
                } else {
                    opt.update(&mut model, &wrong, 0.1)
                };
                assert!(err.unwrap_err().to_string().contains("gradients"), "fused {fused}");
            }
        }
    }

    #[test]
    fn both_ways_of_stepping_with_a_clip_give_the_same_bits() {
        let bits = |t: &[Tensor]| -> Vec<Vec<u32>> {
            t.iter().map(|t| t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect()).collect()
        };
        let (mut plain, grads) = model_and_grads(9);
        let (mut fused, _) = model_and_grads(9);
        let (mut opt_plain, mut opt_fused) =
            (Optimizer::new(&plain, HP).unwrap(), Optimizer::new(&fused, HP).unwrap());
        for lr in [0.1, 0.05] {
            let mut clipped = grads.clone();
            let norm_plain = clip_global_norm(&mut clipped, 0.5).unwrap();
            opt_plain.update(&mut plain, &clipped, lr).unwrap();
            let norm_fused = opt_fused
                .clip_and_update(&mut fused, grads.clone(), lr, Some(0.5))
                .unwrap()
                .unwrap();
            assert_eq!(bits(&[norm_plain]), bits(&[norm_fused]));
        }
        let tensors =
            |m: &TokenFormer| m.named_tensors().into_iter().map(|(_, t)| t).collect::<Vec<_>>();
        assert_eq!(bits(&tensors(&plain)), bits(&tensors(&fused)));
        assert_eq!(bits(&opt_plain.m), bits(&opt_fused.m));
        assert_eq!(bits(&opt_plain.v), bits(&opt_fused.v));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(10, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-6);
        let mid = lr_at(55, 10, 100, 1.0, 0.1);
        assert!((mid - 0.55).abs() < 1e-3, "{mid}");
    }
}
