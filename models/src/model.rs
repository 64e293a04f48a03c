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

use crate::config::{ModelConfig, TokenGroup, LAYER_SLOTS};
use crate::pattention::{GrowInit, Pattention};
use tokenformer_autograd::{causal_attention, embedding, Var};
use tokenformer_core::{Device, Error, Result, Rng, Tensor};
use tokenformer_ops::rope::rope_tables;

const LN_EPS: f32 = 1e-5;
const KEY_STD: f32 = 0.02;

/// One decoder layer: its five Pattentions, in the order of [`LAYER_SLOTS`].
pub struct Layer {
    pub query: Pattention,
    pub key: Pattention,
    pub value: Pattention,
    pub proj: Pattention,
    pub mlp: Pattention,
}

impl Layer {
    /// The Pattentions in [`LAYER_SLOTS`] order.
    pub fn slots(&self) -> [&Pattention; 5] {
        [&self.query, &self.key, &self.value, &self.proj, &self.mlp]
    }

    fn slots_mut(&mut self) -> [&mut Pattention; 5] {
        [&mut self.query, &mut self.key, &mut self.value, &mut self.proj, &mut self.mlp]
    }

    /// A layer from its Pattentions in [`LAYER_SLOTS`] order.
    fn from_slots(slots: Vec<Pattention>) -> Layer {
        let [query, key, value, proj, mlp] = <[Pattention; 5]>::try_from(slots)
            .unwrap_or_else(|s| panic!("a layer has 5 projections, not {}", s.len()));
        Layer { query, key, value, proj, mlp }
    }
}

/// One parameter of a model, as a checkpoint stores it (SPEC §6).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub dims: Vec<usize>,
    /// The config fields that fix the shape, for messages that say why a shape is expected.
    pub because: String,
    /// How `TokenFormer::init` draws it.
    pub init: Init,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

/// Every parameter of a model with this config, in checkpoint order (SPEC §6): `embed.weight`,
/// then each layer's Pattentions in [`LAYER_SLOTS`] order (keys before values), then the final
/// LayerNorm's weight and bias. Init, loading, saving and checkpoint checks all follow it.
pub fn parameter_layout(config: &ModelConfig) -> Vec<ParamSpec> {
    let (v, d) = (config.vocab_size, config.d_model);
    let spec = |name: String, dims: Vec<usize>, because: String, init: Init| ParamSpec {
        name,
        dims,
        because,
        init,
    };
    let mut out = vec![spec(
        "embed.weight".into(),
        vec![v, d],
        format!("vocab_size = {v}, d_model = {d}"),
        Init::Normal(KEY_STD),
    )];
    let sigma = value_std(config);
    for i in 0..config.n_layers {
        for slot in LAYER_SLOTS {
            let (field, n) = (slot.group.fields().0, slot.group.counts(config).0);
            for (side, init) in [("key", Init::Normal(KEY_STD)), ("value", Init::Normal(sigma))] {
                out.push(spec(
                    format!("layers.{i}.{}.{side}_param_tokens", slot.name),
                    vec![n, d],
                    format!("{field} = {n}, d_model = {d}"),
                    init,
                ));
            }
        }
    }
    for (leaf, init) in [("weight", Init::Ones), ("bias", Init::Zeros)] {
        out.push(spec(format!("final_norm.{leaf}"), vec![d], format!("d_model = {d}"), init));
    }
    out
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
        let params = parameter_layout(config)
            .into_iter()
            .map(|p| {
                let t = match p.init {
                    Init::Normal(std) => Tensor::randn(&p.dims, std, &mut rng),
                    Init::Zeros => Tensor::zeros(&p.dims, Device::Cpu)?,
                    Init::Ones => Tensor::ones(&p.dims, Device::Cpu)?,
                };
                Ok((p.name, t.to_device(device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        TokenFormer::from_named(config.clone(), params)
    }

    /// Builds a model from named tensors (checkpoint names, any order), checking that every
    /// tensor is present with the shape the config implies.
    pub fn from_named(config: ModelConfig, params: Vec<(String, Tensor)>) -> Result<TokenFormer> {
        config.validate()?;
        let mut by_name: std::collections::HashMap<String, Tensor> = params.into_iter().collect();
        let mut taken = parameter_layout(&config).into_iter().map(|spec| {
            let t = by_name
                .remove(&spec.name)
                .ok_or_else(|| Error::invalid(format!("model: missing parameter {}", spec.name)))?;
            if t.dims() != spec.dims {
                return Err(Error::invalid(format!(
                    "model: parameter {} has shape {}, the config implies {:?}",
                    spec.name,
                    t.shape(),
                    spec.dims
                )));
            }
            Ok(Var::param(t))
        });
        let mut take = || taken.next().expect("the layout lists every parameter");
        let embed = take()?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for _ in 0..config.n_layers {
            let mut slots = Vec::with_capacity(LAYER_SLOTS.len());
            for slot in LAYER_SLOTS {
                slots.push(Pattention {
                    key_tokens: take()?,
                    value_tokens: take()?,
                    scale_tokens: slot.group.counts(&config).1,
                    norm: config.norm,
                });
            }
            layers.push(Layer::from_slots(slots));
        }
        let final_norm_weight = take()?;
        let final_norm_bias = take()?;
        drop(taken);
        if let Some(extra) = by_name.keys().min() {
            return Err(Error::invalid(format!("model: unexpected parameter {extra}")));
        }
        TokenFormer::assemble(config, embed, layers, final_norm_weight, final_norm_bias)
    }

    /// The model from its parts, with the RoPE tables for its context on its device.
    fn assemble(
        config: ModelConfig,
        embed: Var,
        layers: Vec<Layer>,
        final_norm_weight: Var,
        final_norm_bias: Var,
    ) -> Result<TokenFormer> {
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
        let names = parameter_layout(&self.config).into_iter().map(|p| p.name);
        names.zip(self.params()).map(|(name, p)| (name, p.clone())).collect()
    }

    /// Every parameter, in checkpoint order.
    fn params(&self) -> Vec<&Var> {
        let mut out = vec![&self.embed];
        for layer in &self.layers {
            for p in layer.slots() {
                out.extend([&p.key_tokens, &p.value_tokens]);
            }
        }
        out.extend([&self.final_norm_weight, &self.final_norm_bias]);
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
            for p in layer.slots_mut() {
                out.extend([&mut p.key_tokens, &mut p.value_tokens]);
            }
        }
        out.extend([&mut self.final_norm_weight, &mut self.final_norm_bias]);
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
    /// Whether the outputs stay the same is [`crate::growth::GrowSpec::preserves_outputs`].
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
        let extra = |group| match group {
            TokenGroup::Qkv => qkv,
            TokenGroup::Proj => proj,
            TokenGroup::Ffn => ffn,
        };
        for group in TokenGroup::ALL {
            *group.tokens_mut(&mut config) += extra(group);
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut slots = Vec::with_capacity(LAYER_SLOTS.len());
            for (slot, p) in LAYER_SLOTS.iter().zip(layer.slots()) {
                slots.push(p.grow(extra(slot.group), init, KEY_STD, sigma, &mut rng)?);
            }
            layers.push(Layer::from_slots(slots));
        }
        TokenFormer::assemble(
            config,
            Var::param(self.embed.value().clone()),
            layers,
            Var::param(self.final_norm_weight.value().clone()),
            Var::param(self.final_norm_bias.value().clone()),
        )
    }
}
