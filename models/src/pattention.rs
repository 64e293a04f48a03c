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

use crate::config::NormKind;
use tokenformer_autograd::{ops::Theta, Var};
use tokenformer_core::{Result, Rng, Tensor};
use tokenformer_ops::layout;

pub struct Pattention {
    pub key_tokens: Var,
    pub value_tokens: Var,
    /// n₀, the token count the layer was created with; τ = √n₀ never changes with growth.
    pub scale_tokens: usize,
    pub norm: NormKind,
}

impl From<NormKind> for Theta {
    fn from(n: NormKind) -> Theta {
        match n {
            NormKind::L2NormGelu => Theta::L2NormGelu,
            NormKind::GeluL2Norm => Theta::GeluL2Norm,
            NormKind::Softmax => Theta::Softmax,
        }
    }
}

/// How new parameter tokens are initialised when a layer grows (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrowInit {
    /// New keys exactly zero, new values from the value init: outputs unchanged (L2 variants).
    Exact,
    /// New keys and values from the normal init, as the paper's runs did: outputs change.
    Random,
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
        let scores = x.matmul_t(&self.key_tokens, false, true)?;
        let weights = scores.pattention_norm(self.norm.into(), self.tau())?;
        weights.matmul(&self.value_tokens)
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
