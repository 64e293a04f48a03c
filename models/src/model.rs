//! The TokenFormer language model (SPEC §2): a pre-norm decoder in which every projection is a
//! Pattention.
//!
//! ```text
//! x = E[tokens]
//! for each layer:
//!     y = LN₀(x)                               (no weight, no bias)
//!     q, k, v = Pq(y), Pk(y), Pv(y)
//!     q, k = RoPE(q), RoPE(k)                  first r dims of each head
//!     x = x + Po(causal_attention(q, k, v))
//!     x = x + Pffn(LN₀(x))
//! logits = LN_final(x)·Eᵀ                      tied embedding
//! ```
//!
//! Growth (SPEC §4) returns a new model with more parameter tokens; see [`TokenFormer::grow`].

use crate::config::ModelConfig;
use crate::pattention::{GrowInit, Pattention};
use tokenformer_autograd::{causal_attention, embedding, Var};
use tokenformer_core::{Device, Error, Result, Rng, Tensor};
use tokenformer_ops::rope::rope_tables;

const LN_EPS: f32 = 1e-5;
const KEY_STD: f32 = 0.02;

pub struct Layer {
    pub query: Pattention,
    pub key: Pattention,
    pub value: Pattention,
    pub proj: Pattention,
    pub mlp: Pattention,
}

impl Layer {
    /// The five Pattentions with their checkpoint names (SPEC §6), in checkpoint order.
    fn pattentions(&self) -> [(&'static str, &Pattention); 5] {
        [
            ("attention.query", &self.query),
            ("attention.key", &self.key),
            ("attention.value", &self.value),
            ("attention.proj", &self.proj),
            ("mlp", &self.mlp),
        ]
    }
}

pub struct TokenFormer {
    pub config: ModelConfig,
    pub embed: Var,
    pub layers: Vec<Layer>,
    pub final_norm_weight: Var,
    pub final_norm_bias: Var,
    rope_cos: Tensor,
    rope_sin: Tensor,
}

/// σ of the value-token init: 2/(L·√d).
fn value_std(cfg: &ModelConfig) -> f32 {
    (2.0 / (cfg.n_layers as f64 * (cfg.d_model as f64).sqrt())) as f32
}

impl TokenFormer {
    /// A freshly initialised model (SPEC §2): E and every key-token matrix ~ N(0, 0.02²), every
    /// value-token matrix ~ N(0, σ²) with σ = 2/(L·√d), LN_final weight 1 and bias 0. Draws are
    /// taken in checkpoint order from one RNG seeded with `seed`.
    pub fn init(config: &ModelConfig, seed: u64, device: Device) -> Result<TokenFormer> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let d = config.d_model;
        let sigma = value_std(config);
        let mut params = vec![(
            "embed.weight".to_string(),
            Tensor::randn(&[config.vocab_size, d], KEY_STD, &mut rng),
        )];
        for i in 0..config.n_layers {
            for (name, n) in [
                ("attention.query", config.qkv_tokens),
                ("attention.key", config.qkv_tokens),
                ("attention.value", config.qkv_tokens),
                ("attention.proj", config.proj_tokens),
                ("mlp", config.ffn_tokens),
            ] {
                let keys = Tensor::randn(&[n, d], KEY_STD, &mut rng);
                let values = Tensor::randn(&[n, d], sigma, &mut rng);
                params.push((format!("layers.{i}.{name}.key_param_tokens"), keys));
                params.push((format!("layers.{i}.{name}.value_param_tokens"), values));
            }
        }
        params.push(("final_norm.weight".into(), Tensor::ones(&[d], Device::Cpu)?));
        params.push(("final_norm.bias".into(), Tensor::zeros(&[d], Device::Cpu)?));
        let params = params
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(device)?)))
            .collect::<Result<Vec<_>>>()?;
        TokenFormer::from_named(config.clone(), params)
    }

    /// Builds a model from named tensors (checkpoint names, any order), checking that every
    /// tensor is present with the shape the config implies.
    pub fn from_named(config: ModelConfig, params: Vec<(String, Tensor)>) -> Result<TokenFormer> {
        config.validate()?;
        let mut by_name: std::collections::HashMap<String, Tensor> = params.into_iter().collect();
        let mut take = |name: &str, dims: &[usize]| -> Result<Var> {
            let t = by_name
                .remove(name)
                .ok_or_else(|| Error::invalid(format!("model: missing parameter {name}")))?;
            if t.dims() != dims {
                return Err(Error::invalid(format!(
                    "model: parameter {name} has shape {}, the config implies {:?}",
                    t.shape(),
                    dims
                )));
            }
            Ok(Var::param(t))
        };
        let d = config.d_model;
        let embed = take("embed.weight", &[config.vocab_size, d])?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let mut pattention = |name: &str, n: usize, n0: usize| -> Result<Pattention> {
                Ok(Pattention {
                    key_tokens: take(&format!("layers.{i}.{name}.key_param_tokens"), &[n, d])?,
                    value_tokens: take(&format!("layers.{i}.{name}.value_param_tokens"), &[n, d])?,
                    scale_tokens: n0,
                    norm: config.norm,
                })
            };
            let (qkv, qkv0) = (config.qkv_tokens, config.qkv_scale_tokens);
            layers.push(Layer {
                query: pattention("attention.query", qkv, qkv0)?,
                key: pattention("attention.key", qkv, qkv0)?,
                value: pattention("attention.value", qkv, qkv0)?,
                proj: pattention("attention.proj", config.proj_tokens, config.proj_scale_tokens)?,
                mlp: pattention("mlp", config.ffn_tokens, config.ffn_scale_tokens)?,
            });
        }
        let final_norm_weight = take("final_norm.weight", &[d])?;
        let final_norm_bias = take("final_norm.bias", &[d])?;
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::invalid(format!("model: unexpected parameter {extra}")));
        }
        let device = embed.value().device();
        let (cos, sin) = rope_tables(config.max_seq_len, config.rotary_dims(), config.rotary_base)?;
        Ok(TokenFormer {
            embed,
            layers,
            final_norm_weight,
            final_norm_bias,
            rope_cos: cos.to_device(device)?,
            rope_sin: sin.to_device(device)?,
            config,
        })
    }

    pub fn device(&self) -> Device {
        self.embed.value().device()
    }

    /// Every parameter with its checkpoint name, in checkpoint order (SPEC §6).
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![("embed.weight".to_string(), self.embed.clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, p) in layer.pattentions() {
                out.push((format!("layers.{i}.{name}.key_param_tokens"), p.key_tokens.clone()));
                out.push((format!("layers.{i}.{name}.value_param_tokens"), p.value_tokens.clone()));
            }
        }
        out.push(("final_norm.weight".into(), self.final_norm_weight.clone()));
        out.push(("final_norm.bias".into(), self.final_norm_bias.clone()));
        out
    }

    /// The parameters as plain tensors, for checkpoints.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_params().into_iter().map(|(n, v)| (n, v.value().clone())).collect()
    }

    /// Every parameter slot, in checkpoint order, for an optimizer to replace.
    pub fn params_mut(&mut self) -> Vec<&mut Var> {
        let mut out = vec![&mut self.embed];
        for layer in &mut self.layers {
            for p in [
                &mut layer.query,
                &mut layer.key,
                &mut layer.value,
                &mut layer.proj,
                &mut layer.mlp,
            ] {
                out.push(&mut p.key_tokens);
                out.push(&mut p.value_tokens);
            }
        }
        out.push(&mut self.final_norm_weight);
        out.push(&mut self.final_norm_bias);
        out
    }

    /// Moves every parameter to `device`.
    pub fn to_device(&self, device: Device) -> Result<TokenFormer> {
        let params = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(device)?)))
            .collect::<Result<Vec<_>>>()?;
        TokenFormer::from_named(self.config.clone(), params)
    }

    /// [B, T, d] → [B, H, T, d_h].
    fn split_heads(&self, x: &Var) -> Result<Var> {
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let h = self.config.n_heads;
        x.reshape(&[b, t, h, self.config.head_dim()])?.permute(&[0, 2, 1, 3])
    }

    /// Logits [B, T, V] for token ids [B, T] (f32 holding integers).
    pub fn forward(&self, ids: &Tensor) -> Result<Var> {
        if ids.rank() != 2 {
            return Err(Error::shape(
                "forward",
                format!("token ids must be [B, T], got {}", ids.shape()),
            ));
        }
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        if t == 0 || t > self.config.max_seq_len {
            return Err(Error::shape(
                "forward",
                format!("sequence length {t} must be in 1..={}", self.config.max_seq_len),
            ));
        }
        let d = self.config.d_model;
        let rotate = self.config.rotary_dims() > 0;
        let mut x = embedding(&self.embed, ids)?;
        for layer in &self.layers {
            let y = x.layer_norm(None, None, LN_EPS)?;
            let mut q = self.split_heads(&layer.query.forward(&y)?)?;
            let mut k = self.split_heads(&layer.key.forward(&y)?)?;
            let v = self.split_heads(&layer.value.forward(&y)?)?;
            if rotate {
                q = q.rope(&self.rope_cos, &self.rope_sin)?;
                k = k.rope(&self.rope_cos, &self.rope_sin)?;
            }
            let attended =
                causal_attention(&q, &k, &v)?.permute(&[0, 2, 1, 3])?.reshape(&[b, t, d])?;
            x = x.add(&layer.proj.forward(&attended)?)?;
            x = x.add(&layer.mlp.forward(&x.layer_norm(None, None, LN_EPS)?)?)?;
        }
        let h = x.layer_norm(Some(&self.final_norm_weight), Some(&self.final_norm_bias), LN_EPS)?;
        h.matmul_t(&self.embed, false, true)
    }

    /// Mean next-token cross-entropy of `ids` [B, T] against `targets` [B, T].
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Var> {
        if targets.dims() != ids.dims() {
            return Err(Error::shape(
                "loss",
                format!("targets {} do not match ids {}", targets.shape(), ids.shape()),
            ));
        }
        let logits = self.forward(ids)?;
        let n = ids.numel();
        logits.reshape(&[n, self.config.vocab_size])?.cross_entropy(&targets.reshape(&[n])?)
    }

    /// A larger model: `qkv` tokens appended to every query/key/value Pattention, `proj` to
    /// every output Pattention and `ffn` to every mlp Pattention (SPEC §4). τ keeps its n₀.
    /// New tokens are drawn from one RNG seeded with `seed`, layer by layer in checkpoint order.
    /// With `GrowInit::Exact` and an L2 norm the new model computes the same outputs, bit for bit.
    pub fn grow(
        &self,
        qkv: usize,
        proj: usize,
        ffn: usize,
        init: GrowInit,
        seed: u64,
    ) -> Result<TokenFormer> {
        let mut rng = Rng::new(seed);
        let sigma = value_std(&self.config);
        let mut config = self.config.clone();
        config.qkv_tokens += qkv;
        config.proj_tokens += proj;
        config.ffn_tokens += ffn;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut grow = |p: &Pattention, m: usize| p.grow(m, init, KEY_STD, sigma, &mut rng);
            layers.push(Layer {
                query: grow(&layer.query, qkv)?,
                key: grow(&layer.key, qkv)?,
                value: grow(&layer.value, qkv)?,
                proj: grow(&layer.proj, proj)?,
                mlp: grow(&layer.mlp, ffn)?,
            });
        }
        Ok(TokenFormer {
            config,
            embed: Var::param(self.embed.value().clone()),
            layers,
            final_norm_weight: Var::param(self.final_norm_weight.value().clone()),
            final_norm_bias: Var::param(self.final_norm_bias.value().clone()),
            rope_cos: self.rope_cos.clone(),
            rope_sin: self.rope_sin.clone(),
        })
    }

    /// Whether exact growth of this model preserves its outputs (not for the softmax Θ, where
    /// exp(0) = 1 changes every row's denominator).
    pub fn exact_growth_preserves_outputs(&self) -> bool {
        self.config.norm != crate::config::NormKind::Softmax
    }
}
