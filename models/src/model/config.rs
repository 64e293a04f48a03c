//! The model's hyperparameters (SPEC §2, §6 `config.json`) and the presets of SPEC §3.
//!
//! One config describes either architecture of the same decoder: a TokenFormer, whose
//! projections are Pattentions over parameter tokens, or the Transformer baseline, whose
//! projections are ordinary linear layers (q, k, v, o of d×d with bias, and an MLP d→d_ff→d).
//! `config.json` holds only the fields of its architecture: token counts and Θ for a
//! TokenFormer, `d_ff` for a Transformer. A file without `arch` is a TokenFormer (checkpoints
//! written before the baseline existed).

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use tokenformer_core::{Error, Result};

pub use tokenformer_ops::pattention_norm::Theta;

/// The groups of Pattentions that share a token count (SPEC §2): a layer's query, key and value
/// Pattentions, its output projection, and its FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenGroup {
    Qkv,
    Proj,
    Ffn,
}

impl TokenGroup {
    pub const ALL: [TokenGroup; 3] = [TokenGroup::Qkv, TokenGroup::Proj, TokenGroup::Ffn];

    /// The short name used by growth specs and `grow` flags (`qkv=+64`, `--qkv 64`).
    pub fn name(self) -> &'static str {
        match self {
            TokenGroup::Qkv => "qkv",
            TokenGroup::Proj => "proj",
            TokenGroup::Ffn => "ffn",
        }
    }

    /// What the group's Pattentions are, in words.
    pub fn describe(self) -> &'static str {
        match self {
            TokenGroup::Qkv => "query/key/value",
            TokenGroup::Proj => "proj",
            TokenGroup::Ffn => "ffn",
        }
    }

    /// The `config.json` fields of the group: (token count n, creation count n₀ of τ = √n₀).
    pub fn fields(self) -> (&'static str, &'static str) {
        match self {
            TokenGroup::Qkv => ("qkv_tokens", "qkv_scale_tokens"),
            TokenGroup::Proj => ("proj_tokens", "proj_scale_tokens"),
            TokenGroup::Ffn => ("ffn_tokens", "ffn_scale_tokens"),
        }
    }

    /// (n, n₀) of the group in `config`.
    pub fn counts(self, config: &ModelConfig) -> (usize, usize) {
        let c = config;
        match self {
            TokenGroup::Qkv => (c.qkv_tokens, c.qkv_scale_tokens),
            TokenGroup::Proj => (c.proj_tokens, c.proj_scale_tokens),
            TokenGroup::Ffn => (c.ffn_tokens, c.ffn_scale_tokens),
        }
    }

    /// The token count n of the group in `config`, to change.
    pub fn tokens_mut(self, config: &mut ModelConfig) -> &mut usize {
        match self {
            TokenGroup::Qkv => &mut config.qkv_tokens,
            TokenGroup::Proj => &mut config.proj_tokens,
            TokenGroup::Ffn => &mut config.ffn_tokens,
        }
    }

    /// n₀ of the group in `config` (τ = √n₀), to change.
    pub fn scale_tokens_mut(self, config: &mut ModelConfig) -> &mut usize {
        match self {
            TokenGroup::Qkv => &mut config.qkv_scale_tokens,
            TokenGroup::Proj => &mut config.proj_scale_tokens,
            TokenGroup::Ffn => &mut config.ffn_scale_tokens,
        }
    }
}

/// One of a layer's five projections: its name under `layers.{i}.` in a checkpoint (SPEC §6),
/// the group whose counts size it in a TokenFormer, and whether its output is added to the
/// residual stream (the attention output and the FFN; their value tokens are zero in a new
/// layer of depth growth, their weights get the smaller residual init in a Transformer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: &'static str,
    pub group: TokenGroup,
    pub writes_residual: bool,
}

/// A layer's projections in checkpoint order. Every list of a layer's parameters (init,
/// loading, saving, growth, the expected shapes of a checkpoint) walks this table.
pub const LAYER_SLOTS: [Slot; 5] = [
    Slot { name: "attention.query", group: TokenGroup::Qkv, writes_residual: false },
    Slot { name: "attention.key", group: TokenGroup::Qkv, writes_residual: false },
    Slot { name: "attention.value", group: TokenGroup::Qkv, writes_residual: false },
    Slot { name: "attention.proj", group: TokenGroup::Proj, writes_residual: true },
    Slot { name: "mlp", group: TokenGroup::Ffn, writes_residual: true },
];

/// Which projections the decoder uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Pattentions over parameter tokens (SPEC §1-2).
    #[default]
    TokenFormer,
    /// Ordinary linear layers: the baseline of the paper's comparisons.
    Transformer,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::TokenFormer => "tokenformer",
            Arch::Transformer => "transformer",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        [Arch::TokenFormer, Arch::Transformer].into_iter().find(|a| a.name() == s).ok_or_else(
            || Error::invalid(format!("unknown arch '{s}' (expected tokenformer or transformer)")),
        )
    }
}

impl Serialize for Arch {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// `config.json` stores Θ under its name (`"l2_norm_gelu"`, ...).
fn theta_by_name<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Theta, D::Error> {
    let name = String::deserialize(d)?;
    name.parse().map_err(serde::de::Error::custom)
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub max_seq_len: usize,
    /// Parameter tokens of each query/key/value Pattention (TokenFormer; 0 in a Transformer).
    #[serde(default)]
    pub qkv_tokens: usize,
    #[serde(default)]
    pub proj_tokens: usize,
    #[serde(default)]
    pub ffn_tokens: usize,
    /// n₀ of τ = √n₀ for the query/key/value Pattentions: the count they were created with.
    #[serde(default)]
    pub qkv_scale_tokens: usize,
    #[serde(default)]
    pub proj_scale_tokens: usize,
    #[serde(default)]
    pub ffn_scale_tokens: usize,
    /// Θ of every Pattention (TokenFormer; unused by a Transformer).
    #[serde(default, deserialize_with = "theta_by_name")]
    pub norm: Theta,
    /// Width of the MLP's hidden layer (Transformer; 0 in a TokenFormer).
    #[serde(default)]
    pub d_ff: usize,
    pub rotary_pct: f64,
    pub rotary_base: f64,
    pub tokenizer: String,
}

/// `config.json` holds the fields of the config's architecture only (see the module doc), in
/// the SPEC §6 order.
impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("arch", &self.arch)?;
        map.serialize_entry("vocab_size", &self.vocab_size)?;
        map.serialize_entry("d_model", &self.d_model)?;
        map.serialize_entry("n_layers", &self.n_layers)?;
        map.serialize_entry("n_heads", &self.n_heads)?;
        map.serialize_entry("max_seq_len", &self.max_seq_len)?;
        match self.arch {
            Arch::TokenFormer => {
                for group in TokenGroup::ALL {
                    map.serialize_entry(group.fields().0, &group.counts(self).0)?;
                }
                for group in TokenGroup::ALL {
                    map.serialize_entry(group.fields().1, &group.counts(self).1)?;
                }
                map.serialize_entry("norm", self.norm.name())?;
            }
            Arch::Transformer => map.serialize_entry("d_ff", &self.d_ff)?,
        }
        map.serialize_entry("rotary_pct", &self.rotary_pct)?;
        map.serialize_entry("rotary_base", &self.rotary_base)?;
        map.serialize_entry("tokenizer", &self.tokenizer)?;
        map.end()
    }
}

/// (name, L, d, H, n_qkv, n_proj, n_ffn, T_max, V, tokenizer): SPEC §3.
type Preset = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize, &'static str);
const PRESETS: &[Preset] = &[
    ("tiny", 4, 128, 4, 128, 128, 512, 256, 256, "byte"),
    // The size of the usual character-level Shakespeare model: a CPU benchmark shape.
    ("small", 6, 384, 6, 384, 384, 1536, 256, 256, "byte"),
    // The released Pile models, with the GPT-NeoX-20B tokenizer they were trained with.
    ("150M", 12, 768, 12, 768, 768, 3072, 2048, 50304, "neox"),
    ("450M", 24, 1024, 16, 1024, 1024, 4096, 2048, 50304, "neox"),
    ("900M", 32, 1280, 16, 1280, 1280, 5120, 2048, 50304, "neox"),
    ("1.5B", 40, 1536, 16, 1536, 1536, 6144, 2048, 50304, "neox"),
    // The official incremental-scaling configs on OpenWebText2: a base grown to 757M.
    ("354M", 24, 1024, 16, 768, 768, 3072, 1024, 50304, "neox"),
    ("757M", 24, 1024, 16, 1792, 1792, 7168, 1024, 50304, "neox"),
    // The paper's progressive-scaling chain as its table describes it (one L12 d768 model).
    ("owt-124M", 12, 768, 12, 576, 576, 2304, 1024, 50304, "gpt2"),
    ("owt-354M", 12, 768, 12, 2140, 2140, 8560, 1024, 50304, "gpt2"),
    ("owt-757M", 12, 768, 12, 4850, 4850, 19400, 1024, 50304, "gpt2"),
    ("owt-1.4B", 12, 768, 12, 8620, 8620, 34480, 1024, 50304, "gpt2"),
];

/// Sizes that override a preset's (`init` and `train` flags `--layers`, `--d-model`, …): each
/// `None` keeps the preset's value. A token count given here is also the n₀ of τ = √n₀: the
/// model is created with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SizeOverrides {
    pub n_layers: Option<usize>,
    pub d_model: Option<usize>,
    pub n_heads: Option<usize>,
    pub qkv_tokens: Option<usize>,
    pub proj_tokens: Option<usize>,
    pub ffn_tokens: Option<usize>,
    pub max_seq_len: Option<usize>,
}

impl SizeOverrides {
    pub fn is_empty(&self) -> bool {
        *self == SizeOverrides::default()
    }

    /// The flags given, as the command line writes them (for messages).
    pub fn flags(&self) -> Vec<String> {
        [
            ("--layers", self.n_layers),
            ("--d-model", self.d_model),
            ("--heads", self.n_heads),
            ("--qkv-tokens", self.qkv_tokens),
            ("--proj-tokens", self.proj_tokens),
            ("--ffn-tokens", self.ffn_tokens),
            ("--max-seq-len", self.max_seq_len),
        ]
        .into_iter()
        .filter_map(|(flag, v)| v.map(|v| format!("{flag} {v}")))
        .collect()
    }

    /// `preset` (a TokenFormer config) with these sizes, checked against the rules of SPEC §2;
    /// nothing is allocated.
    pub fn apply(&self, preset: &ModelConfig) -> Result<ModelConfig> {
        let mut config = preset.clone();
        let set = |slot: &mut usize, v: Option<usize>| *slot = v.unwrap_or(*slot);
        set(&mut config.n_layers, self.n_layers);
        set(&mut config.d_model, self.d_model);
        set(&mut config.n_heads, self.n_heads);
        set(&mut config.max_seq_len, self.max_seq_len);
        set(&mut config.qkv_tokens, self.qkv_tokens);
        set(&mut config.proj_tokens, self.proj_tokens);
        set(&mut config.ffn_tokens, self.ffn_tokens);
        config.set_tau_from_token_counts();
        config.validate()?;
        Ok(config)
    }
}

impl ModelConfig {
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// The preset called `name`, with τ's n₀ equal to the preset's token counts.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let &(_, l, d, h, qkv, proj, ffn, t, v, tokenizer) =
            PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown preset '{name}' (expected one of: {})",
                    ModelConfig::preset_names().join(", ")
                ))
            })?;
        Ok(ModelConfig::tokenformer(v, d, l, h, t, [qkv, proj, ffn], tokenizer))
    }

    /// A TokenFormer of these sizes with what every preset and every released model shares
    /// (SPEC §3): Θ = L2-norm + GELU, rotary embedding on a quarter of each head at base 10,000,
    /// and τ's n₀ the token counts `[qkv, proj, ffn]`.
    pub fn tokenformer(
        vocab_size: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        max_seq_len: usize,
        [qkv, proj, ffn]: [usize; 3],
        tokenizer: &str,
    ) -> ModelConfig {
        ModelConfig {
            arch: Arch::TokenFormer,
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            max_seq_len,
            qkv_tokens: qkv,
            proj_tokens: proj,
            ffn_tokens: ffn,
            qkv_scale_tokens: qkv,
            proj_scale_tokens: proj,
            ffn_scale_tokens: ffn,
            norm: Theta::L2NormGelu,
            d_ff: 0,
            rotary_pct: 0.25,
            rotary_base: 10000.0,
            tokenizer: tokenizer.into(),
        }
    }

    /// Makes every group's n₀ (τ = √n₀) its current token count, as a model created at this
    /// size has it.
    pub fn set_tau_from_token_counts(&mut self) {
        (self.qkv_scale_tokens, self.proj_scale_tokens, self.ffn_scale_tokens) =
            (self.qkv_tokens, self.proj_tokens, self.ffn_tokens);
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// r = ⌊rotary_pct · d_h⌋, the number of rotated dims per head.
    pub fn rotary_dims(&self) -> usize {
        (self.rotary_pct * self.head_dim() as f64).floor() as usize
    }

    /// Every rule SPEC §2 puts on a config; the message names the offending field.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::invalid(format!("invalid model config: {m}")));
        let mut positive = vec![
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("max_seq_len", self.max_seq_len),
        ];
        let mut token_fields = Vec::new();
        for group in TokenGroup::ALL {
            let ((n_field, n0_field), (n, n0)) = (group.fields(), group.counts(self));
            token_fields.extend([(n_field, n), (n0_field, n0)]);
        }
        match self.arch {
            Arch::TokenFormer => {
                positive.extend(&token_fields);
                if self.d_ff != 0 {
                    return fail("d_ff is a transformer setting; a tokenformer has none".into());
                }
            }
            Arch::Transformer => {
                positive.push(("d_ff", self.d_ff));
                if let Some((name, _)) = token_fields.iter().find(|(_, v)| *v != 0) {
                    return fail(format!(
                        "{name} is a tokenformer setting; a transformer has no parameter tokens"
                    ));
                }
            }
        }
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return fail(format!("{name} must be positive"));
        }
        if self.vocab_size > 1 << 24 {
            return fail(format!("vocab_size {} exceeds 2^24", self.vocab_size));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return fail(format!(
                "n_heads {} does not divide d_model {}",
                self.n_heads, self.d_model
            ));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return fail(format!("rotary_pct {} is not in [0, 1]", self.rotary_pct));
        }
        if !self.rotary_dims().is_multiple_of(2) {
            return fail(format!(
                "rotary dims {} (rotary_pct {} of head dim {}) must be even",
                self.rotary_dims(),
                self.rotary_pct,
                self.head_dim()
            ));
        }
        if !(self.rotary_base > 0.0 && self.rotary_base.is_finite()) {
            return fail(format!("rotary_base {} must be positive", self.rotary_base));
        }
        if self.checked_param_count().is_none() {
            let width = match self.arch {
                Arch::TokenFormer => format!(
                    "qkv, proj, ffn tokens {}, {}, {}",
                    self.qkv_tokens, self.proj_tokens, self.ffn_tokens
                ),
                Arch::Transformer => format!("d_ff {}", self.d_ff),
            };
            return fail(format!(
                "its parameter count overflows {} bits (d_model {}, n_layers {}, {width}, \
                 vocab_size {}, max_seq_len {})",
                usize::BITS,
                self.d_model,
                self.n_layers,
                self.vocab_size,
                self.max_seq_len
            ));
        }
        Ok(())
    }

    /// The parameter count in checked arithmetic, `None` where it overflows: every count this
    /// type computes (the breakdown, matmul parameters, L·d·T of the FLOPs) is at most this one
    /// or checked here too, so a config that passes `validate` computes them all without
    /// wrapping.
    fn checked_param_count(&self) -> Option<usize> {
        let (d, l) = (self.d_model, self.n_layers);
        let per_layer = match self.arch {
            Arch::TokenFormer => {
                let tokens = LAYER_SLOTS
                    .iter()
                    .try_fold(0usize, |sum, slot| sum.checked_add(slot.group.counts(self).0))?;
                d.checked_mul(2)?.checked_mul(tokens)?
            }
            Arch::Transformer => {
                let attention = d.checked_mul(d)?.checked_add(d)?.checked_mul(4)?;
                let mlp =
                    d.checked_mul(2)?.checked_add(1)?.checked_mul(self.d_ff)?.checked_add(d)?;
                attention.checked_add(mlp)?
            }
        };
        l.checked_mul(d)?.checked_mul(self.max_seq_len)?;
        per_layer.checked_mul(l)?.checked_add(self.vocab_size.checked_mul(d)?)?.checked_add(d * 2)
    }

    /// TokenFormer: 2·d·L·(3·n_qkv + n_proj + n_ffn) + V·d + 2·d (SPEC §2).
    /// Transformer: L·(4·(d² + d) + 2·d·d_ff + d_ff + d) + V·d + 2·d.
    pub fn param_count(&self) -> usize {
        self.param_breakdown().iter().map(|(_, n)| n).sum()
    }

    /// The parameter count by kind, as `info` prints it.
    pub fn param_breakdown(&self) -> Vec<(String, usize)> {
        let (d, l) = (self.d_model, self.n_layers);
        let mut kinds = vec![("embedding (tied)".to_string(), self.vocab_size * d)];
        match self.arch {
            Arch::TokenFormer => {
                for group in TokenGroup::ALL {
                    let slots = LAYER_SLOTS.iter().filter(|s| s.group == group).count();
                    let tokens = group.counts(self).0;
                    kinds
                        .push((format!("{} tokens", group.describe()), 2 * d * l * slots * tokens));
                }
            }
            Arch::Transformer => {
                kinds.push(("q, k, v, o weights+biases".into(), l * 4 * (d * d + d)));
                kinds.push(("mlp weights+biases".into(), l * (2 * d * self.d_ff + self.d_ff + d)));
            }
        }
        kinds.push(("final norm".into(), 2 * d));
        kinds
    }

    /// 3·n_qkv + n_proj + n_ffn: the parameter tokens of one layer (0 in a Transformer).
    pub fn tokens_per_layer(&self) -> usize {
        LAYER_SLOTS.iter().map(|slot| slot.group.counts(self).0).sum()
    }

    /// The entries of every matrix that multiplies activations, the tied embedding included:
    /// 2·d·L·(3·n_qkv + n_proj + n_ffn) + V·d for a TokenFormer, L·(4·d² + 2·d·d_ff) + V·d
    /// for a Transformer. Biases and norms are left out (O(d) work per token).
    pub fn matmul_params(&self) -> usize {
        let (d, l) = (self.d_model, self.n_layers);
        let layers = match self.arch {
            Arch::TokenFormer => 2 * d * l * self.tokens_per_layer(),
            Arch::Transformer => l * (4 * d * d + 2 * d * self.d_ff),
        };
        layers + self.vocab_size * d
    }

    /// Training FLOPs per token at sequence length `seq` (SPEC §2): 6 per matmul parameter
    /// (2 in the forward pass, 4 in the backward) plus 12·L·d·T for the attention scores and
    /// their weighted sum, counted non-causally as llm.c and PaLM do (the causal mask skips
    /// about half of that work, which is not subtracted).
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        6.0 * self.matmul_params() as f64 + 12.0 * (self.n_layers * self.d_model * seq) as f64
    }

    /// This config (a TokenFormer, as presets are) in architecture `arch`: for a Transformer,
    /// with MLP width `d_ff`, by default 4·d. `d_ff` is refused for a TokenFormer.
    pub fn with_arch(&self, arch: Arch, d_ff: Option<usize>) -> Result<ModelConfig> {
        match (arch, d_ff) {
            (Arch::TokenFormer, Some(_)) => Err(Error::invalid(
                "d_ff is a transformer setting; a tokenformer's FFN width is its ffn_tokens",
            )),
            (Arch::TokenFormer, None) => Ok(self.clone()),
            (Arch::Transformer, d_ff) => Ok(self.to_transformer(d_ff.unwrap_or(4 * self.d_model))),
        }
    }

    /// The same decoder as a Transformer with an MLP of width `d_ff`: token counts and Θ
    /// dropped, everything else kept.
    pub fn to_transformer(&self, d_ff: usize) -> ModelConfig {
        let mut config = self.clone();
        config.arch = Arch::Transformer;
        config.d_ff = d_ff;
        config.norm = Theta::default();
        for group in TokenGroup::ALL {
            *group.tokens_mut(&mut config) = 0;
        }
        (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens) = (0, 0, 0);
        config
    }

    /// The Transformer with this TokenFormer's L, d, H, context and vocabulary whose parameter
    /// count is nearest to this one's: the MLP width d_ff is what is solved for (at least 1).
    pub fn matching_transformer(&self) -> ModelConfig {
        let (d, l) = (self.d_model, self.n_layers);
        let fixed = self.to_transformer(0).param_count();
        let per_unit = l * (2 * d + 1); // each unit of d_ff: a column of up and down, and a bias
        let want = self.param_count().saturating_sub(fixed) as f64 / per_unit as f64;
        self.to_transformer((want.round() as usize).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn preset_parameter_counts_match_the_spec() {
        assert_eq!(ModelConfig::preset("tiny").unwrap().param_count(), 1_081_600);
        assert_eq!(ModelConfig::preset("small").unwrap().param_count(), 14_254_848);
        assert_eq!(ModelConfig::preset("150M").unwrap().param_count(), 151_881_216);
        // The official incremental-scaling base and its grown model.
        assert_eq!(ModelConfig::preset("354M").unwrap().param_count(), 353_503_232);
        assert_eq!(ModelConfig::preset("757M").unwrap().param_count(), 756_156_416);
        for name in ["150M", "450M", "900M", "1.5B", "354M", "757M"] {
            assert_eq!(ModelConfig::preset(name).unwrap().tokenizer, "neox", "{name}");
        }
        for name in ModelConfig::preset_names() {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        let approx = [
            ("450M", 454.2e6),
            ("900M", 903.3e6),
            ("1.5B", 1587.2e6),
            ("owt-124M", 123.6e6),
            ("owt-354M", 354.2e6),
            ("owt-757M", 753.8e6),
            ("owt-1.4B", 1309.7e6),
        ];
        for (name, want) in approx {
            let got = ModelConfig::preset(name).unwrap().param_count() as f64;
            assert!((got - want).abs() < 0.06e6, "{name}: {got}");
        }
        assert!(ModelConfig::preset("nope").unwrap_err().to_string().contains("unknown preset"));
    }
    #[test]
    fn validation_rejects_bad_configs() {
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.n_heads = 3;
        assert!(c.validate().unwrap_err().to_string().contains("n_heads"));
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.rotary_pct = 0.2; // 0.2·32 = 6.4 → 6, even: fine
        c.validate().unwrap();
        c.rotary_pct = 0.16; // 5.12 → 5: odd
        assert!(c.validate().unwrap_err().to_string().contains("even"));
    }
}
