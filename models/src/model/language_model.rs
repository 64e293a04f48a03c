//! The language model (SPEC §2): a pre-norm decoder in which every projection is a
//! Pattention, or, for the Transformer baseline, an ordinary linear layer.
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
//! The five P's of a layer are [`Projection`]s. In a TokenFormer each is a Pattention; in a
//! Transformer (`arch: transformer`) Pq, Pk, Pv, Po are linear layers d→d with bias and Pffn is
//! an MLP d→d_ff→d with GELU. Everything else — embedding, RoPE, attention, norms, head — is
//! the same code for both, so the two differ exactly in how a projection holds its parameters.
//!
//! Growth (SPEC §4) returns a new model with more parameter tokens; see [`TokenFormer::grow`].

use crate::config::{Arch, ModelConfig, TokenGroup, LAYER_SLOTS};
use crate::growth::GrowSpec;
use crate::linear::{Linear, Mlp};
use crate::pattention::{GrowInit, Pattention};
use tokenformer_autograd::{causal_attention, embedding, Var};
use tokenformer_core::{Device, Error, Result, Rng, Tensor};
use tokenformer_ops::rope::rope_tables;

const LN_EPS: f32 = 1e-5;
const KEY_STD: f32 = 0.02;

/// One of a layer's five projections.
pub enum Projection {
    /// TokenFormer: attention over parameter tokens (SPEC §1).
    Pattention(Pattention),
    /// Transformer: q, k, v and the attention output, d→d with bias.
    Linear(Linear),
    /// Transformer: the feed-forward block.
    Mlp(Mlp),
}

impl Projection {
    /// x [..., d] → [..., d].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        match self {
            Projection::Pattention(p) => p.forward(x),
            Projection::Linear(l) => l.forward(x),
            Projection::Mlp(m) => m.forward(x),
        }
    }

    /// The Pattention, in a TokenFormer.
    pub fn pattention(&self) -> Option<&Pattention> {
        match self {
            Projection::Pattention(p) => Some(p),
            _ => None,
        }
    }

    /// The parameters, in the order of [`slot_layout`].
    pub fn params(&self) -> Vec<&Var> {
        match self {
            Projection::Pattention(p) => vec![&p.key_tokens, &p.value_tokens],
            Projection::Linear(l) => vec![&l.weight, &l.bias],
            Projection::Mlp(m) => vec![&m.up.weight, &m.up.bias, &m.down.weight, &m.down.bias],
        }
    }

    fn params_mut(&mut self) -> Vec<&mut Var> {
        match self {
            Projection::Pattention(p) => vec![&mut p.key_tokens, &mut p.value_tokens],
            Projection::Linear(l) => vec![&mut l.weight, &mut l.bias],
            Projection::Mlp(m) => {
                vec![&mut m.up.weight, &mut m.up.bias, &mut m.down.weight, &mut m.down.bias]
            }
        }
    }
}

/// One decoder layer: its five projections, in the order of [`LAYER_SLOTS`].
pub struct Layer {
    pub query: Projection,
    pub key: Projection,
    pub value: Projection,
    pub proj: Projection,
    pub mlp: Projection,
}

impl Layer {
    /// The projections in [`LAYER_SLOTS`] order.
    pub fn slots(&self) -> [&Projection; 5] {
        [&self.query, &self.key, &self.value, &self.proj, &self.mlp]
    }

    fn slots_mut(&mut self) -> [&mut Projection; 5] {
        [&mut self.query, &mut self.key, &mut self.value, &mut self.proj, &mut self.mlp]
    }

    /// A layer from its projections in [`LAYER_SLOTS`] order.
    fn from_slots(slots: Vec<Projection>) -> Layer {
        let [query, key, value, proj, mlp] = <[Projection; 5]>::try_from(slots)
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

/// The parameters of slot `slot` (an index into [`LAYER_SLOTS`]) of layer `layer`, in order:
///
/// - TokenFormer: `key_param_tokens` `[n, d]` ~ N(0, 0.02²), `value_param_tokens` `[n, d]` ~
///   N(0, σ²) with σ = 2/(L·√d) (SPEC §2).
/// - Transformer: `weight` `[d, d]` and `bias` `[d]`; the mlp has `up.weight` `[d_ff, d]`,
///   `up.bias`, `down.weight` `[d, d_ff]`, `down.bias`. Weights ~ N(0, 0.02²), those of projections that
///   write into the residual stream ~ N(0, 0.02²/(2L)) (GPT-2's init), biases zero.
pub fn slot_layout(config: &ModelConfig, layer: usize, slot: usize) -> Vec<ParamSpec> {
    let d = config.d_model;
    let info = LAYER_SLOTS[slot];
    let prefix = format!("layers.{layer}.{}", info.name);
    let spec = |leaf: &str, dims: Vec<usize>, because: String, init| ParamSpec {
        name: format!("{prefix}.{leaf}"),
        dims,
        because,
        init,
    };
    match config.arch {
        Arch::TokenFormer => {
            let (field, n) = (info.group.fields().0, info.group.counts(config).0);
            let because = format!("{field} = {n}, d_model = {d}");
            vec![
                spec("key_param_tokens", vec![n, d], because.clone(), Init::Normal(KEY_STD)),
                spec("value_param_tokens", vec![n, d], because, Init::Normal(value_std(config))),
            ]
        }
        Arch::Transformer => {
            let out_std = if info.writes_residual {
                KEY_STD / (2.0 * config.n_layers as f32).sqrt()
            } else {
                KEY_STD
            };
            let dd = format!("d_model = {d}");
            if info.group != TokenGroup::Ffn {
                return vec![
                    spec("weight", vec![d, d], dd.clone(), Init::Normal(out_std)),
                    spec("bias", vec![d], dd, Init::Zeros),
                ];
            }
            let (f, dff) = (config.d_ff, format!("d_ff = {}, d_model = {d}", config.d_ff));
            vec![
                spec("up.weight", vec![f, d], dff.clone(), Init::Normal(KEY_STD)),
                spec("up.bias", vec![f], format!("d_ff = {f}"), Init::Zeros),
                spec("down.weight", vec![d, f], dff, Init::Normal(out_std)),
                spec("down.bias", vec![d], dd, Init::Zeros),
            ]
        }
    }
}

/// Every parameter of a model with this config, in checkpoint order (SPEC §6): `embed.weight`,
/// then each layer's projections in [`LAYER_SLOTS`] order (see [`slot_layout`]), then the final
/// LayerNorm's weight and bias. Init, loading, saving and checkpoint checks all follow it.
pub fn parameter_layout(config: &ModelConfig) -> Vec<ParamSpec> {
    let (v, d) = (config.vocab_size, config.d_model);
    let mut out = vec![ParamSpec {
        name: "embed.weight".into(),
        dims: vec![v, d],
        because: format!("vocab_size = {v}, d_model = {d}"),
        init: Init::Normal(KEY_STD),
    }];
    for layer in 0..config.n_layers {
        for slot in 0..LAYER_SLOTS.len() {
            out.extend(slot_layout(config, layer, slot));
        }
    }
    for (leaf, init) in [("weight", Init::Ones), ("bias", Init::Zeros)] {
        out.push(ParamSpec {
            name: format!("final_norm.{leaf}"),
            dims: vec![d],
            because: format!("d_model = {d}"),
            init,
        });
    }
    out
}

/// Draws the tensors of `specs` in order from `rng`, onto `device`.
fn draw(specs: Vec<ParamSpec>, rng: &mut Rng, device: Device) -> Result<Vec<(String, Tensor)>> {
    specs
        .into_iter()
        .map(|p| {
            let t = match p.init {
                Init::Normal(std) => Tensor::randn(&p.dims, std, rng),
                Init::Zeros => Tensor::zeros(&p.dims, Device::Cpu)?,
                Init::Ones => Tensor::ones(&p.dims, Device::Cpu)?,
            };
            Ok((p.name, t.to_device(device)?))
        })
        .collect()
}

/// The language model: a TokenFormer, or with `config.arch = Transformer` the baseline with
/// linear projections (see the module doc).
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

/// Builds slot `slot`'s projection from its parameters, taken in [`slot_layout`] order.
fn projection(
    config: &ModelConfig,
    slot: usize,
    take: &mut impl FnMut() -> Result<Var>,
) -> Result<Projection> {
    let group = LAYER_SLOTS[slot].group;
    Ok(match config.arch {
        Arch::TokenFormer => Projection::Pattention(Pattention {
            key_tokens: take()?,
            value_tokens: take()?,
            scale_tokens: group.counts(config).1,
            norm: config.norm,
        }),
        Arch::Transformer if group == TokenGroup::Ffn => Projection::Mlp(Mlp {
            up: Linear { weight: take()?, bias: take()? },
            down: Linear { weight: take()?, bias: take()? },
        }),
        Arch::Transformer => Projection::Linear(Linear { weight: take()?, bias: take()? }),
    })
}

impl TokenFormer {
    /// A freshly initialised model (SPEC §2 for a TokenFormer): E and every key-token matrix
    /// ~ N(0, 0.02²), every value-token matrix ~ N(0, σ²) with σ = 2/(L·√d), LN_final weight 1
    /// and bias 0; a Transformer's weights as [`slot_layout`] says. Draws are taken in
    /// checkpoint order from one RNG seeded with `seed`.
    pub fn init(config: &ModelConfig, seed: u64, device: Device) -> Result<TokenFormer> {
        config.validate()?;
        let params = draw(parameter_layout(config), &mut Rng::new(seed), device)?;
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
            let slots = (0..LAYER_SLOTS.len()).map(|slot| projection(&config, slot, &mut take));
            layers.push(Layer::from_slots(slots.collect::<Result<_>>()?));
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
    pub fn params(&self) -> Vec<&Var> {
        let mut out = vec![&self.embed];
        for layer in &self.layers {
            for p in layer.slots() {
                out.extend(p.params());
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
                out.extend(p.params_mut());
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
        self.forward_watched(ids, |_, _| Ok(()))
    }

    /// Where the forward pass of `ids` first produces a value that is not finite: `embedding`,
    /// `layer N (attention)`, `layer N (mlp)`, `final norm` or `logits`; `None` if nowhere. For
    /// saying why a loss or a sample went wrong (weights so large that float32 overflows), not
    /// for the hot path: it copies every intermediate result to the host.
    pub fn first_non_finite(&self, ids: &Tensor) -> Result<Option<String>> {
        let mut found = None;
        let watch = |place: &dyn Fn() -> String, value: &Var| -> Result<()> {
            if value.value().to_vec()?.iter().all(|x| x.is_finite()) {
                return Ok(());
            }
            found = Some(place());
            // Stops the pass: nothing after the first place is of interest.
            Err(Error::invalid("non-finite value"))
        };
        match tokenformer_autograd::no_grad(|| self.forward_watched(ids, watch)) {
            Ok(_) => Ok(None),
            Err(_) if found.is_some() => Ok(found),
            Err(e) => Err(e),
        }
    }

    /// The forward pass, handing each stage's output to `watch` with the stage's name (built
    /// only when asked for); an error from `watch` ends the pass.
    fn forward_watched(
        &self,
        ids: &Tensor,
        mut watch: impl FnMut(&dyn Fn() -> String, &Var) -> Result<()>,
    ) -> Result<Var> {
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
        watch(&|| "embedding".into(), &x)?;
        for (index, layer) in self.layers.iter().enumerate() {
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
            watch(&|| format!("layer {index} (attention)"), &x)?;
            x = x.add(&layer.mlp.forward(&x.layer_norm(None, None, LN_EPS)?)?)?;
            watch(&|| format!("layer {index} (mlp)"), &x)?;
        }
        let h = x.layer_norm(Some(&self.final_norm_weight), Some(&self.final_norm_bias), LN_EPS)?;
        watch(&|| "final norm".into(), &h)?;
        let logits = h.matmul_t(&self.embed, false, true)?;
        watch(&|| "logits".into(), &logits)?;
        Ok(logits)
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
    /// Whether the outputs stay the same is [`GrowSpec::preserves_outputs`]; [`Self::grow_with`]
    /// grows in depth too.
    pub fn grow(
        &self,
        qkv: usize,
        proj: usize,
        ffn: usize,
        init: GrowInit,
        seed: u64,
    ) -> Result<TokenFormer> {
        let spec = GrowSpec { qkv, proj, ffn, init, seed, ..GrowSpec::default() };
        Ok(self.grow_with(&spec)?.0)
    }

    /// A larger model grown by `spec` (SPEC §4 and docs/growth.md): first every old layer gets
    /// its extra tokens (the RNG draws of [`Self::grow`]), then `spec.layers` new layers are
    /// inserted where `spec.layer_at` says, each initialised as the config's init would, except
    /// that with `GrowInit::Exact` the value tokens of its attention-output and FFN
    /// Pattentions are exactly zero: the new layer then adds zeros to the residual stream.
    ///
    /// Also returns, for each layer of the grown model, the index of the layer it was before
    /// the growth (`None` for a new one).
    pub fn grow_with(&self, spec: &GrowSpec) -> Result<(TokenFormer, Vec<Option<usize>>)> {
        crate::growth::check_growable(&self.config)?;
        let mut rng = Rng::new(spec.seed);
        let sigma = value_std(&self.config);
        let config = spec
            .apply(&self.config)
            .ok_or_else(|| Error::invalid("grow: a token count or the depth overflows"))?;
        let mut widened = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut slots = Vec::with_capacity(LAYER_SLOTS.len());
            for (slot, p) in LAYER_SLOTS.iter().zip(layer.slots()) {
                let p = p.pattention().ok_or_else(|| cannot_grow(self.config.arch))?;
                let grown = p.grow(spec.extra(slot.group), spec.init, KEY_STD, sigma, &mut rng)?;
                slots.push(Projection::Pattention(grown));
            }
            widened.push(Layer::from_slots(slots));
        }
        let origins = spec.layer_at.origins(self.layers.len(), spec.layers);
        let mut widened = widened.into_iter();
        let mut layers = Vec::with_capacity(origins.len());
        for (index, origin) in origins.iter().enumerate() {
            layers.push(match origin {
                Some(_) => widened.next().expect("one widened layer per old layer"),
                None => self.new_layer(&config, index, spec.init, &mut rng)?,
            });
        }
        let model = TokenFormer::assemble(
            config,
            Var::param(self.embed.value().clone()),
            layers,
            Var::param(self.final_norm_weight.value().clone()),
            Var::param(self.final_norm_bias.value().clone()),
        )?;
        Ok((model, origins))
    }

    /// Layer `index` of a model with config `config`, as depth growth inserts it.
    fn new_layer(
        &self,
        config: &ModelConfig,
        index: usize,
        init: GrowInit,
        rng: &mut Rng,
    ) -> Result<Layer> {
        let mut slots = Vec::with_capacity(LAYER_SLOTS.len());
        for (slot, info) in LAYER_SLOTS.iter().enumerate() {
            let mut specs = slot_layout(config, index, slot);
            if init == GrowInit::Exact && info.writes_residual {
                for spec in specs.iter_mut().filter(|s| s.name.ends_with(".value_param_tokens")) {
                    spec.init = Init::Zeros;
                }
            }
            let mut params = draw(specs, rng, self.device())?.into_iter();
            let mut take = || Ok(Var::param(params.next().expect("one tensor per spec").1));
            slots.push(projection(config, slot, &mut take)?);
        }
        Ok(Layer::from_slots(slots))
    }
}

/// The one-line refusal to grow a model without parameter tokens.
pub fn cannot_grow(arch: Arch) -> Error {
    Error::invalid(format!("a {arch} has no parameter tokens to add; only tokenformer models grow"))
}
