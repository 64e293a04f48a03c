//! Pattention: attention from input tokens to learnable parameter tokens (SPEC §1).
//!
//! ```text
//! A = X·Kᵀ    (T×n)      K: n key tokens of width d_in
//! S = Θ(A)    row-wise   one of three normalisations, scaled by τ = √n₀
//! O = S·V     (T×d_out)  V: n value tokens of width d_out
//! ```
//!
//! It stands in for every linear layer of a transformer. Because the parameters are a *set of
//! tokens*, a layer can grow by appending tokens: with new keys exactly zero, their scores are
//! zero, Θ maps them to zero (for the two L2 variants) and the layer's output is unchanged.
//! Gradients flow through the two matmuls and Θ; see the matmul and pattention_norm families.
//!
//! Speed: [`pattention`] records the whole layer as one op, whose CPU kernel walks the rows in
//! blocks that stay in cache (the `pattention` family in tokenformer-ops says what it fuses and
//! why). The chain of ops it replaces stays here as the reference: [`Pattention::forward_plain`]
//! (two matmuls and Θ, the formula as written) and [`mix`] (Θ and S·V as one op); the tests
//! check that all three give the same bits, values and gradients.
//!
//! Memory: a training step keeps every value the backward pass needs until that pass is over.
//! A plain chain of ops would keep both A and S = Θ(A) (each T×n, and n is the largest width in
//! the model: 4·d for the FFN). Θ is one cheap pass over a row, so `mix` records Θ and S·V as a
//! single op that keeps only A and recomputes S during the backward pass: a few percent more
//! work for one fewer T×n activation per layer, which for the 150M preset at batch 8 × 1024 is
//! 200 MB per layer. The recomputed S has the same bits as the forward's (the kernels are
//! deterministic), so the gradients are exactly those of the plain chain.

use tokenformer_autograd::{ops::Theta, Var};
use tokenformer_core::{Result, Rng, Tensor};
use tokenformer_ops::{layout, matmul, pattention as fused, pattention_norm};

pub struct Pattention {
    pub key_tokens: Var,
    pub value_tokens: Var,
    /// n₀, the token count the layer was created with; τ = √n₀ never changes with growth.
    pub scale_tokens: usize,
    pub norm: Theta,
}

/// How new parameter tokens are initialised when a layer grows (SPEC §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrowInit {
    /// New keys exactly zero, new values from the value init: outputs unchanged (L2 variants).
    #[default]
    Exact,
    /// New keys and values from the normal init, as the paper's runs did: outputs change.
    Random,
}

/// O = Θ(A)·V as one recorded op that keeps A and V but not S = Θ(A) (see the module comment).
///
/// Backward, with S recomputed from A: g_V = Sᵀ·g_O, g_S = g_O·Vᵀ, and g_A from g_S by Θ's
/// backward rule (the pattention_norm family).
pub fn mix(scores: &Var, values: &Var, theta: Theta, tau: f32) -> Result<Var> {
    let weights = pattention_norm::pattention_norm(scores.value(), theta, tau)?;
    let out = matmul::matmul(&weights, values.value(), false, false)?;
    // `weights` is dropped here: the graph keeps only A and V.
    let (a, v) = (scores.value().clone(), values.value().clone());
    Ok(Var::from_op(
        "pattention_mix",
        out,
        &[scores, values],
        Box::new(move |g| {
            let weights = pattention_norm::pattention_norm(&a, theta, tau)?;
            let (g_weights, g_values) = matmul::matmul_backward(&weights, &v, g, false, false)?;
            drop(weights);
            let g_scores = pattention_norm::pattention_norm_backward(&a, theta, tau, &g_weights)?;
            Ok(vec![Some(g_scores), Some(g_values)])
        }),
    ))
}

/// O = Θ(X·Kᵀ)·V as one recorded op, for x [..., d_in], keys [n, d_in], values [n, d_out].
/// It keeps x, K, V and the scores A = X·Kᵀ; the backward pass recomputes S = Θ(A).
pub fn pattention(x: &Var, keys: &Var, values: &Var, theta: Theta, tau: f32) -> Result<Var> {
    let (out, scores) = fused::pattention(x.value(), keys.value(), values.value(), theta, tau)?;
    let (xv, kv, vv) = (x.value().clone(), keys.value().clone(), values.value().clone());
    Ok(Var::from_op(
        "pattention",
        out,
        &[x, keys, values],
        Box::new(move |g| {
            let (gx, gk, gv) = fused::pattention_backward(&xv, &kv, &vv, &scores, theta, tau, g)?;
            Ok(vec![Some(gx), Some(gk), Some(gv)])
        }),
    ))
}

impl Pattention {
    pub fn tokens(&self) -> usize {
        self.key_tokens.dims()[0]
    }

    pub fn tau(&self) -> f32 {
        (self.scale_tokens as f64).sqrt() as f32
    }

    /// x [..., d_in] → [..., d_out].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        pattention(x, &self.key_tokens, &self.value_tokens, self.norm, self.tau())
    }

    /// The same layer as a chain of ops, the formula as written (the reference of `forward`).
    pub fn forward_plain(&self, x: &Var) -> Result<Var> {
        let scores = x.matmul_t(&self.key_tokens, false, true)?;
        scores.pattention_norm(self.norm, self.tau())?.matmul(&self.value_tokens)
    }

    /// The same layer with `extra` tokens appended. New key tokens are zero (`Exact`) or drawn
    /// from N(0, key_std²) (`Random`); new value tokens are drawn from N(0, value_std²).
    /// Draws come from `rng` keys first, then values.
    pub fn grow(
        &self,
        extra: usize,
        init: GrowInit,
        key_std: f32,
        value_std: f32,
        rng: &mut Rng,
    ) -> Result<Pattention> {
        let d_in = self.key_tokens.dims()[1];
        let d_out = self.value_tokens.dims()[1];
        let device = self.key_tokens.value().device();
        let new_keys = match init {
            GrowInit::Exact => Tensor::zeros(&[extra, d_in], device)?,
            GrowInit::Random => Tensor::randn(&[extra, d_in], key_std, rng).to_device(device)?,
        };
        let new_values = Tensor::randn(&[extra, d_out], value_std, rng).to_device(device)?;
        let append = |old: &Var, new: Tensor| -> Result<Var> {
            Ok(Var::param(layout::concat(&[old.value().clone(), new], 0)?))
        };
        Ok(Pattention {
            key_tokens: append(&self.key_tokens, new_keys)?,
            value_tokens: append(&self.value_tokens, new_values)?,
            scale_tokens: self.scale_tokens,
            norm: self.norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenformer_autograd::{gradcheck, GradcheckOptions};
    use tokenformer_core::Device;

    /// A layer whose value tokens are the n×n identity, so that its output rows are S = Θ(A).
    fn showing_scores(keys: Tensor, scale_tokens: usize, norm: Theta) -> Pattention {
        let n = keys.dims()[0];
        let identity = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        Pattention {
            key_tokens: Var::param(keys),
            value_tokens: Var::param(Tensor::from_vec(identity, &[n, n]).unwrap()),
            scale_tokens,
            norm,
        }
    }

    #[test]
    fn tau_is_the_square_root_of_the_creation_count_before_and_after_growth() {
        // τ against values worked out by hand: √16 = 4, √128 = 8·√2 = 11.3137085, √512 =
        // 16·√2 = 22.627417; growth keeps n₀, so a layer created with 16 tokens keeps τ = 4
        // after 9 more (not √25 = 5).
        let with_scale = |n0| {
            showing_scores(Tensor::zeros(&[1, 1], Device::Cpu).unwrap(), n0, Theta::L2NormGelu)
        };
        assert_eq!(with_scale(16).tau(), 4.0);
        assert!((with_scale(128).tau() - 11.313_708).abs() < 2e-6);
        assert!((with_scale(512).tau() - 22.627_417).abs() < 2e-6);

        // And τ is the one the layer computes with: for gelu_l2_norm every row of S has norm
        // τ, for softmax every row sums to τ².
        let mut rng = Rng::new(7);
        let x = Var::param(Tensor::randn(&[5, 3], 1.0, &mut rng));
        let keys = Tensor::randn(&[16, 3], 1.0, &mut rng);
        for norm in [Theta::GeluL2Norm, Theta::Softmax] {
            let layer = showing_scores(keys.clone(), 16, norm);
            let grown = layer.grow(9, GrowInit::Exact, 0.02, 0.1, &mut rng).unwrap();
            assert_eq!((grown.tokens(), grown.tau()), (25, 4.0));
            let grown = showing_scores(grown.key_tokens.value().clone(), 16, norm);
            for (what, layer) in [("created", &layer), ("grown", &grown)] {
                let out = layer.forward(&x).unwrap().value().to_vec().unwrap();
                for row in out.chunks(layer.tokens()) {
                    let (measured, want) = match norm {
                        Theta::Softmax => (row.iter().map(|&s| s as f64).sum::<f64>(), 16.0),
                        _ => (row.iter().map(|&s| (s as f64).powi(2)).sum::<f64>().sqrt(), 4.0),
                    };
                    assert!(
                        (measured - want).abs() < 1e-4,
                        "{norm:?}, {what}: {measured}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn mix_matches_the_plain_chain_bit_for_bit_and_passes_gradcheck() {
        let mut rng = Rng::new(5);
        // A batch of score rows [2, 3, 7] against 7 value tokens of width 4.
        let a = Tensor::randn(&[2, 3, 7], 1.0, &mut rng);
        let v = Tensor::randn(&[7, 4], 1.0, &mut rng);
        for theta in [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax] {
            let (sa, sv) = (Var::param(a.clone()), Var::param(v.clone()));
            let fused = mix(&sa, &sv, theta, 2.5).unwrap();
            let (pa, pv) = (Var::param(a.clone()), Var::param(v.clone()));
            let plain = pa.pattention_norm(theta, 2.5).unwrap().matmul(&pv).unwrap();
            assert_eq!(fused.value().to_vec().unwrap(), plain.value().to_vec().unwrap());
            let (gf, gp) = (
                fused.sum_all().unwrap().backward().unwrap(),
                plain.sum_all().unwrap().backward().unwrap(),
            );
            for (f, p) in [(&sa, &pa), (&sv, &pv)] {
                let (f, p) =
                    (gf.get(f).unwrap().to_vec().unwrap(), gp.get(p).unwrap().to_vec().unwrap());
                assert_eq!(f, p, "{theta:?}: gradients differ from the plain chain");
            }
            let f = |x: &[Var]| mix(&x[0], &x[1], theta, 2.5);
            gradcheck(f, &[a.clone(), v.clone()], &GradcheckOptions::default()).unwrap();
        }
    }

    #[test]
    fn the_fused_layer_matches_the_plain_chain_bit_for_bit_and_passes_gradcheck() {
        let mut rng = Rng::new(6);
        // 2 × 53 rows: more than one row block of the fused kernel, and not a multiple of it.
        let x = Tensor::randn(&[2, 53, 12], 1.0, &mut rng);
        let k = Tensor::randn(&[19, 12], 0.5, &mut rng);
        let v = Tensor::randn(&[19, 7], 0.5, &mut rng);
        for norm in Theta::ALL {
            let layer = || Pattention {
                key_tokens: Var::param(k.clone()),
                value_tokens: Var::param(v.clone()),
                scale_tokens: 16,
                norm,
            };
            let (fused_layer, plain_layer) = (layer(), layer());
            let (xf, xp) = (Var::param(x.clone()), Var::param(x.clone()));
            let fused = fused_layer.forward(&xf).unwrap();
            let plain = plain_layer.forward_plain(&xp).unwrap();
            assert_eq!(fused.value().to_vec().unwrap(), plain.value().to_vec().unwrap());
            let (gf, gp) = (
                fused.square().unwrap().sum_all().unwrap().backward().unwrap(),
                plain.square().unwrap().sum_all().unwrap().backward().unwrap(),
            );
            for (f, p) in [
                (&xf, &xp),
                (&fused_layer.key_tokens, &plain_layer.key_tokens),
                (&fused_layer.value_tokens, &plain_layer.value_tokens),
            ] {
                let (f, p) =
                    (gf.get(f).unwrap().to_vec().unwrap(), gp.get(p).unwrap().to_vec().unwrap());
                assert_eq!(f, p, "{norm:?}: gradients differ from the plain chain");
            }
            let small = [
                Tensor::randn(&[3, 4], 1.0, &mut rng),
                Tensor::randn(&[5, 4], 1.0, &mut rng),
                Tensor::randn(&[5, 3], 1.0, &mut rng),
            ];
            let f = |t: &[Var]| pattention(&t[0], &t[1], &t[2], norm, 2.0);
            gradcheck(f, &small, &GradcheckOptions::default()).unwrap();
        }
    }
}
