//! Growth (SPEC §4, docs/growth.md): more parameter tokens or more layers, the same model
//! function.
//!
//! `grow_checkpoint` loads a checkpoint, appends tokens to its Pattentions and layers to its
//! depth (see [`TokenFormer::grow_with`] and docs/growth.md) and writes the result to a new
//! directory; the source is only read.
//! A training checkpoint stays resumable: exact growth extends each AdamW moment with zero rows
//! for the new tokens and new layers (old rows keep theirs), paper-style random growth restarts
//! the optimizer (every moment zero), and the run's state records a new stage and which rows
//! are old (for `train --resume --freeze-old`). The run's other files (metrics, plot, token
//! cache) are copied so a resumed run continues its history in the new directory.
//!
//! The same growth runs inside `train` at the steps of a growth schedule ([`GrowthPoint`]).
//!
//! The growth itself runs on the device the caller names: the parameters and moments are moved
//! there, the new rows are appended there (a concat on the device), and the result is copied
//! back when it is saved. The new tokens are drawn on the host from the same seeded RNG on every
//! device, so growing on a GPU writes the same checkpoint as growing on the CPU.

use crate::checkpoint::{
    inspect_checkpoint, is_checkpoint_dir, load_checkpoint, save_checkpoint, Checkpoint,
    NamedTensors,
};
use crate::config::{Arch, ModelConfig, Theta, TokenGroup};
use crate::files::copy_into;
use crate::memory;
use crate::model::{cannot_grow, TokenFormer};
use crate::pattention::GrowInit;
use crate::run_dir::{RunLock, RUN_FILES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use tokenformer_core::{Device, Error, Result, Tensor};
use tokenformer_ops::layout::concat;

impl GrowInit {
    pub fn name(self) -> &'static str {
        match self {
            GrowInit::Exact => "exact",
            GrowInit::Random => "random",
        }
    }
}

impl FromStr for GrowInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<GrowInit> {
        [GrowInit::Exact, GrowInit::Random]
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| Error::invalid(format!("init must be exact or random, got '{s}'")))
    }
}

/// Where depth growth puts its new layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerPlacement {
    /// After the last layer.
    #[default]
    End,
    /// Spread evenly among the old layers, each right after an old one: old layer i is
    /// followed by ⌊(i+1)·N/L⌋ − ⌊i·N/L⌋ of the N new layers (the last new layer comes last).
    Interleave,
}

impl LayerPlacement {
    pub fn name(self) -> &'static str {
        match self {
            LayerPlacement::End => "end",
            LayerPlacement::Interleave => "interleave",
        }
    }

    /// For each layer of a model of `old + new` layers, the index of the old layer it is
    /// (`None` for a new one).
    pub fn origins(self, old: usize, new: usize) -> Vec<Option<usize>> {
        let mut out = Vec::with_capacity(old + new);
        match self {
            LayerPlacement::End => {
                out.extend((0..old).map(Some));
                out.extend(std::iter::repeat_n(None, new));
            }
            LayerPlacement::Interleave if old == 0 => out.extend(std::iter::repeat_n(None, new)),
            LayerPlacement::Interleave => {
                for i in 0..old {
                    out.push(Some(i));
                    let after = (i + 1) * new / old - i * new / old;
                    out.extend(std::iter::repeat_n(None, after));
                }
            }
        }
        out
    }
}

impl FromStr for LayerPlacement {
    type Err = Error;
    fn from_str(s: &str) -> Result<LayerPlacement> {
        [LayerPlacement::End, LayerPlacement::Interleave]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!("layer placement must be end or interleave, got '{s}'"))
            })
    }
}

/// What τ of each Pattention is after a growth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TauRule {
    /// τ = √n₀ keeps the n₀ of creation (SPEC §1): what exact growth needs.
    #[default]
    Frozen,
    /// τ = √n of the grown layer (n₀ becomes the new token count), as the official code
    /// computes it: with `GrowInit::Random` and a restarted optimizer, the official growth.
    /// It changes every output.
    Current,
}

impl TauRule {
    pub fn name(self) -> &'static str {
        match self {
            TauRule::Frozen => "frozen",
            TauRule::Current => "current",
        }
    }
}

impl FromStr for TauRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<TauRule> {
        [TauRule::Frozen, TauRule::Current]
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::invalid(format!("tau must be frozen or current, got '{s}'")))
    }
}

/// One growth: tokens added to every Pattention of each group, and new layers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrowSpec {
    pub qkv: usize,
    pub proj: usize,
    pub ffn: usize,
    /// New layers, inserted where `layer_at` says.
    pub layers: usize,
    pub layer_at: LayerPlacement,
    pub init: GrowInit,
    /// Seeds the draws of the new tokens and layers.
    pub seed: u64,
    pub tau: TauRule,
}

impl GrowSpec {
    /// The growth that turns `from` into preset `to`, which may differ from it only in token
    /// counts and depth (each at least as large); new layers go where `layer_at` says.
    pub fn to_preset(
        from: &ModelConfig,
        to: &str,
        layer_at: LayerPlacement,
        init: GrowInit,
        seed: u64,
    ) -> Result<GrowSpec> {
        check_growable(from)?;
        let target = ModelConfig::preset(to)?;
        let same = |what: &str, a: usize, b: usize| -> Result<()> {
            if a != b {
                return Err(Error::invalid(format!(
                    "cannot grow to preset {to}: it has {what} {b}, the checkpoint has {a} (growth changes only token counts and depth)"
                )));
            }
            Ok(())
        };
        same("d_model", from.d_model, target.d_model)?;
        same("n_heads", from.n_heads, target.n_heads)?;
        same("max_seq_len", from.max_seq_len, target.max_seq_len)?;
        let more = |field: &str, a: usize, b: usize| {
            b.checked_sub(a).ok_or_else(|| {
                Error::invalid(format!(
                    "cannot grow to preset {to}: its {field} {b} is fewer than the checkpoint's {a}"
                ))
            })
        };
        let mut spec = GrowSpec { layer_at, init, seed, ..GrowSpec::default() };
        spec.layers = more("n_layers", from.n_layers, target.n_layers)?;
        for group in TokenGroup::ALL {
            let field = group.fields().0;
            *spec.extra_mut(group) = more(field, group.counts(from).0, group.counts(&target).0)?;
        }
        Ok(spec)
    }

    /// True when the growth adds nothing.
    pub fn is_empty(&self) -> bool {
        self.layers == 0 && TokenGroup::ALL.iter().all(|&g| self.extra(g) == 0)
    }

    /// The config of a model with config `config` grown by this spec (`None` when a count
    /// overflows).
    pub fn apply(&self, config: &ModelConfig) -> Option<ModelConfig> {
        let mut grown = config.clone();
        for group in TokenGroup::ALL {
            let n = group.tokens_mut(&mut grown);
            *n = n.checked_add(self.extra(group))?;
        }
        grown.n_layers = grown.n_layers.checked_add(self.layers)?;
        Some(grown)
    }

    /// The tokens added to each Pattention of `group`.
    pub fn extra(&self, group: TokenGroup) -> usize {
        match group {
            TokenGroup::Qkv => self.qkv,
            TokenGroup::Proj => self.proj,
            TokenGroup::Ffn => self.ffn,
        }
    }

    fn extra_mut(&mut self, group: TokenGroup) -> &mut usize {
        match group {
            TokenGroup::Qkv => &mut self.qkv,
            TokenGroup::Proj => &mut self.proj,
            TokenGroup::Ffn => &mut self.ffn,
        }
    }

    /// Whether growing a model with this config computes exactly what the original did (the
    /// one place this rule is written). Only `Exact` growth can: new tokens with zero keys
    /// leave every output unchanged for the two L2 variants of Θ, not for softmax (exp(0) = 1
    /// changes every row's denominator); new layers with zero output values add exact zeros to
    /// the residual stream whatever Θ is.
    ///
    /// `TauRule::Current` preserves them only where no τ changes.
    pub fn preserves_outputs(&self, config: &ModelConfig) -> bool {
        let widens = TokenGroup::ALL.iter().any(|&g| self.extra(g) > 0);
        self.init == GrowInit::Exact
            && (!widens || config.norm != Theta::Softmax)
            && !self.changes_tau(config)
    }

    /// Whether any τ of a model with this config changes (only under `TauRule::Current`).
    pub fn changes_tau(&self, config: &ModelConfig) -> bool {
        self.tau == TauRule::Current
            && TokenGroup::ALL.iter().any(|&g| {
                let (n, n0) = g.counts(config);
                n + self.extra(g) != n0
            })
    }

    /// Whether the grown run's AdamW moments restart at zero: the paper's random growth and
    /// the official recipe (`TauRule::Current`) do; exact growth keeps every old moment.
    pub fn restarts_optimizer(&self) -> bool {
        self.init == GrowInit::Random || self.tau == TauRule::Current
    }

    /// The rule [`Grown::moments`] applies to the optimizer state: `Random` (every moment
    /// restarts at zero) for any growth that restarts the optimizer, else `Exact`.
    pub fn moments_rule(&self) -> GrowInit {
        if self.restarts_optimizer() {
            GrowInit::Random
        } else {
            GrowInit::Exact
        }
    }
}

/// Refuses a model that has no parameter tokens (a Transformer), in one line.
pub fn check_growable(config: &ModelConfig) -> Result<()> {
    match config.arch {
        Arch::TokenFormer => Ok(()),
        arch => Err(cannot_grow(arch)),
    }
}

/// How much a scheduled growth adds to a token count or to the depth: `+N` more, or `N` in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Add(usize),
    To(usize),
}

impl Amount {
    /// What to add to `current`.
    fn extra(self, what: &str, current: usize) -> Result<usize> {
        match self {
            Amount::Add(n) => Ok(n),
            Amount::To(n) => n.checked_sub(current).ok_or_else(|| {
                Error::invalid(format!("{what}={n} is fewer than the model's {current}"))
            }),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Add(n) => write!(f, "+{n}"),
            Amount::To(n) => write!(f, "{n}"),
        }
    }
}

/// What one growth of a schedule does, written as `preset=NAME` (grow to that preset) or as
/// comma-separated amounts `qkv=+64,proj=+64,ffn=+256,layers=+2` (`+N` adds N, a bare `N`
/// grows to N), either way optionally followed by `layer-at=end|interleave`,
/// `init=exact|random` and `tau=frozen|current`. It is resolved against the model as it is when
/// the growth happens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrowthTarget {
    pub preset: Option<String>,
    /// (`qkv`, `proj`, `ffn` or `layers`, amount), in the order written.
    pub amounts: Vec<(&'static str, Amount)>,
    pub layer_at: LayerPlacement,
    pub init: GrowInit,
    pub tau: TauRule,
}

/// The keys of a growth target's amounts: the token groups, then the depth.
const AMOUNT_KEYS: [&str; 4] = ["qkv", "proj", "ffn", "layers"];

impl GrowthTarget {
    /// The growth this target asks of a model with config `config`, its draws seeded by `seed`.
    pub fn resolve(&self, config: &ModelConfig, seed: u64) -> Result<GrowSpec> {
        let (layer_at, init) = (self.layer_at, self.init);
        let spec = match &self.preset {
            Some(name) => GrowSpec::to_preset(config, name, layer_at, init, seed)?,
            None => {
                check_growable(config)?;
                let mut spec = GrowSpec { layer_at, init, seed, ..GrowSpec::default() };
                for &(key, amount) in &self.amounts {
                    match TokenGroup::ALL.into_iter().find(|g| g.name() == key) {
                        Some(group) => {
                            *spec.extra_mut(group) = amount.extra(key, group.counts(config).0)?
                        }
                        None => spec.layers = amount.extra(key, config.n_layers)?,
                    }
                }
                spec
            }
        };
        if spec.is_empty() {
            return Err(Error::invalid(format!("growth '{self}' adds nothing to the model")));
        }
        Ok(GrowSpec { tau: self.tau, ..spec })
    }
}

impl fmt::Display for GrowthTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = match &self.preset {
            Some(name) => vec![format!("preset={name}")],
            None => self.amounts.iter().map(|(k, a)| format!("{k}={a}")).collect(),
        };
        if self.layer_at != LayerPlacement::default() {
            parts.push(format!("layer-at={}", self.layer_at.name()));
        }
        if self.init != GrowInit::default() {
            parts.push(format!("init={}", self.init.name()));
        }
        if self.tau != TauRule::default() {
            parts.push(format!("tau={}", self.tau.name()));
        }
        f.write_str(&parts.join(","))
    }
}

impl FromStr for GrowthTarget {
    type Err = Error;
    fn from_str(text: &str) -> Result<GrowthTarget> {
        let bad = |why: String| {
            Error::invalid(format!(
                "growth spec '{text}': {why} (expected e.g. qkv=+64,ffn=+256,layers=+2 or preset=NAME)"
            ))
        };
        let mut target = GrowthTarget::default();
        for part in text.split(',') {
            let (key, value) =
                part.split_once('=').ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let seen = target.amounts.iter().any(|(k, _)| *k == key);
            match key {
                "preset" if target.preset.is_none() => target.preset = Some(value.to_string()),
                "layer-at" => target.layer_at = value.parse().map_err(|e| bad(format!("{e}")))?,
                "init" => target.init = value.parse().map_err(|e| bad(format!("{e}")))?,
                "tau" => target.tau = value.parse().map_err(|e| bad(format!("{e}")))?,
                _ => {
                    let key = AMOUNT_KEYS
                        .into_iter()
                        .find(|k| *k == key && !seen)
                        .ok_or_else(|| bad(format!("unknown or repeated key '{key}'")))?;
                    let amount = match value.strip_prefix('+') {
                        Some(n) => n.parse().map(Amount::Add),
                        None => value.parse().map(Amount::To),
                    }
                    .map_err(|_| bad(format!("{key}={value} is not +N or N")))?;
                    target.amounts.push((key, amount));
                }
            }
        }
        if target.preset.is_some() && !target.amounts.is_empty() {
            return Err(bad("preset= and amounts do not go together".into()));
        }
        if target.preset.is_none() && target.amounts.is_empty() {
            return Err(bad("nothing to grow".into()));
        }
        Ok(target)
    }
}

/// One growth of a training run: `STEP:SPEC`, applied after `step` optimizer steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrowthPoint {
    pub step: u64,
    pub target: GrowthTarget,
}

impl fmt::Display for GrowthPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.step, self.target)
    }
}

impl FromStr for GrowthPoint {
    type Err = Error;
    fn from_str(text: &str) -> Result<GrowthPoint> {
        let (step, spec) = text.split_once(':').ok_or_else(|| {
            Error::invalid(format!("--grow-at '{text}': expected STEP:SPEC, e.g. 500:ffn=+256"))
        })?;
        let step = step.trim().parse().map_err(|_| {
            Error::invalid(format!("--grow-at '{text}': '{step}' is not a step number"))
        })?;
        Ok(GrowthPoint { step, target: spec.parse()? })
    }
}

/// Saved in a run's settings as the text a user writes.
impl Serialize for GrowthPoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GrowthPoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

pub struct GrowReport {
    pub from: ModelConfig,
    pub to: ModelConfig,
    pub preserves_outputs: bool,
    /// Whether some τ changed (`TauRule::Current` with a token count that moved).
    pub changed_tau: bool,
    pub had_optimizer: bool,
}

/// Refuses growth whose result (with the source, both in memory at once) cannot fit, before
/// anything is loaded: the counts come from flags, and may be absurd.
fn check_fits(src: &Path, spec: &GrowSpec) -> Result<()> {
    let summary = inspect_checkpoint(src)?;
    let from = &summary.config;
    let grown = (|| {
        let to = spec.apply(from)?;
        let opt = summary.has_training_state;
        memory::checkpoint_bytes(from, opt)?.checked_add(memory::checkpoint_bytes(&to, opt)?)
    })();
    memory::check(
        &format!(
            "growing by {} qkv, {} proj and {} ffn tokens and {} layers",
            spec.qkv, spec.proj, spec.ffn, spec.layers
        ),
        grown,
    )
}

/// A grown model, and where each of its parameters came from.
pub struct Grown {
    pub model: TokenFormer,
    /// For each parameter of `model`, in checkpoint order: its name before the growth and the
    /// number of leading rows it had then (the old tokens of a token matrix; all of any other
    /// parameter), or `None` for a parameter of a new layer.
    pub origins: Vec<Option<(String, usize)>>,
}

/// Grows `model` by `spec` (see [`TokenFormer::grow_with`]) and records where each parameter of
/// the result came from.
pub fn grow_model(model: &TokenFormer, spec: &GrowSpec) -> Result<Grown> {
    let (mut grown, layer_origins) = model.grow_with(spec)?;
    if spec.tau == TauRule::Current {
        // τ = √n of the grown layers: n₀ becomes the token count.
        let mut config = grown.config.clone();
        config.set_tau_from_token_counts();
        grown = TokenFormer::from_named(config, grown.named_tensors())?;
    }
    let old_rows: std::collections::HashMap<String, usize> = model
        .named_params()
        .into_iter()
        .map(|(name, p)| (name, p.dims().first().copied().unwrap_or(1)))
        .collect();
    let origins = grown
        .named_params()
        .into_iter()
        .map(|(name, _)| {
            let old_name = match layer_of(&name) {
                None => Some(name),
                Some((layer, rest)) => layer_origins[layer].map(|i| format!("layers.{i}.{rest}")),
            };
            old_name.map(|n| {
                let rows = old_rows[&n];
                (n, rows)
            })
        })
        .collect();
    Ok(Grown { model: grown, origins })
}

/// (i, rest) of a parameter named `layers.{i}.{rest}`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.strip_prefix("layers.")?.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

impl Grown {
    /// AdamW moments (one set, m or v, by parameter name) for the grown model. `Exact` growth
    /// keeps every old row's moments and starts new rows and new layers at zero; `Random`
    /// growth restarts the optimizer (every moment zero), as the paper's runs did.
    pub fn moments(&self, old: Vec<(String, Tensor)>, init: GrowInit) -> Result<NamedTensors> {
        let mut old: std::collections::HashMap<String, Tensor> = old.into_iter().collect();
        self.model
            .named_params()
            .into_iter()
            .zip(&self.origins)
            .map(|((name, p), origin)| {
                let device = p.value().device();
                let moment = match (origin, init) {
                    (Some((old_name, _)), GrowInit::Exact) => {
                        let t = old.remove(old_name).ok_or_else(|| {
                            Error::invalid(format!("grow: no optimizer moment for {old_name}"))
                        })?;
                        pad_rows(&t.to_device(device)?, p.dims())?
                    }
                    _ => Tensor::zeros(p.dims(), device)?,
                };
                Ok((name, moment))
            })
            .collect()
    }

    /// For each parameter (by name), the number of leading rows that existed before the growth:
    /// what `--freeze-old` keeps fixed.
    pub fn old_rows(&self) -> BTreeMap<String, usize> {
        self.model
            .named_params()
            .into_iter()
            .zip(&self.origins)
            .map(|((name, _), origin)| (name, origin.as_ref().map_or(0, |(_, rows)| *rows)))
            .collect()
    }
}

/// `t` with zero rows appended until it has shape `dims` (only the first axis may differ).
fn pad_rows(t: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if t.dims() == dims {
        return Ok(t.clone());
    }
    let n = t.dims()[0];
    if t.dims()[1..] != dims[1..] || n > dims[0] {
        return Err(Error::invalid(format!(
            "grow: a moment of shape {} cannot grow to {dims:?}",
            t.shape()
        )));
    }
    let mut extra = dims.to_vec();
    extra[0] -= n;
    concat(&[t.clone(), Tensor::zeros(&extra, t.device())?], 0)
}

/// Grows the checkpoint in `src` into a new checkpoint in `dst` (`src` is only read), working on
/// `device`.
pub fn grow_checkpoint(
    src: &Path,
    dst: &Path,
    spec: &GrowSpec,
    device: Device,
) -> Result<GrowReport> {
    if !src.is_dir() || !is_checkpoint_dir(src) {
        return Err(Error::invalid(format!("{} is not a checkpoint directory", src.display())));
    }
    if dst.exists() {
        let same = match (src.canonicalize(), dst.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::invalid(
                "grow: --out must differ from --checkpoint (the source is never modified)",
            ));
        }
        if is_checkpoint_dir(dst) {
            return Err(Error::invalid(format!(
                "grow: {} already holds a checkpoint; choose another --out",
                dst.display()
            )));
        }
        if crate::train::is_run_dir(dst) {
            return Err(Error::invalid(format!(
                "grow: {} holds a run that stopped before its first checkpoint; grow into it \
                 again with --overwrite, or choose another --out",
                dst.display()
            )));
        }
        crate::run_dir::check_writable_dir(dst)?;
    }
    if spec.is_empty() {
        return Err(Error::invalid(
            "grow: nothing to add (give --qkv, --proj, --ffn, --layers or --to-preset)",
        ));
    }
    check_growable(&inspect_checkpoint(src)?.config)
        .map_err(|e| Error::invalid(format!("grow: {}: {e}", src.display())))?;
    check_fits(src, spec)?;
    let ckpt = load_checkpoint(src)?;
    let to_device = |named: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        named.into_iter().map(|(n, t)| Ok((n, t.to_device(device)?))).collect()
    };
    let model = TokenFormer::from_named(ckpt.config.clone(), to_device(ckpt.params)?)?;
    let grown = grow_model(&model, spec)?;
    let optimizer = match ckpt.optimizer {
        None => None,
        Some((m, v)) => {
            let rule = spec.moments_rule();
            Some((grown.moments(m, rule)?, grown.moments(v, rule)?))
        }
    };
    // A run's state learns that a new stage begins, and what is old (for `--freeze-old`).
    let train_state = match &ckpt.train_state {
        Some(state) => Some(crate::train::record_growth(state, grown.old_rows())?),
        None => None,
    };
    let _lock = RunLock::create_and_acquire(dst)?;
    if is_checkpoint_dir(dst) {
        return Err(Error::invalid(format!(
            "grow: {} already holds a checkpoint; choose another --out",
            dst.display()
        )));
    }
    // The run's history and data caches travel with it (regular files only, written anew in
    // `dst`, never through a link); the checkpoint files are written anew below.
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src.display(), e))? {
        let entry = entry.map_err(|e| Error::io(src.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && (RUN_FILES.contains(&name.as_str()) || name.ends_with(".tokens")) {
            copy_into(&entry.path(), dst, &name)?;
        }
    }
    let report = GrowReport {
        from: ckpt.config.clone(),
        to: grown.model.config.clone(),
        preserves_outputs: spec.preserves_outputs(&ckpt.config),
        changed_tau: spec.changes_tau(&ckpt.config),
        had_optimizer: optimizer.is_some(),
    };
    save_checkpoint(
        dst,
        &Checkpoint {
            config: grown.model.config.clone(),
            params: grown.model.named_tensors(),
            optimizer,
            train_state,
        },
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_points_parse_print_and_resolve() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        for text in [
            "100:qkv=+64,proj=+64,ffn=+256,layers=+2",
            "5:ffn=600,layer-at=interleave",
            "7:layers=+1,init=random",
            "9:preset=tiny",
        ] {
            let point: GrowthPoint = text.parse().unwrap();
            assert_eq!(point.to_string(), text);
            let json = serde_json::to_string(&point).unwrap();
            assert_eq!(serde_json::from_str::<GrowthPoint>(&json).unwrap(), point);
        }
        let point: GrowthPoint = "100:qkv=+64,proj=+64,ffn=+256,layers=+2".parse().unwrap();
        let spec = point.target.resolve(&tiny, 3).unwrap();
        assert_eq!((spec.qkv, spec.proj, spec.ffn, spec.layers, spec.seed), (64, 64, 256, 2, 3));
        let grown = spec.apply(&tiny).unwrap();
        assert_eq!((grown.qkv_tokens, grown.ffn_tokens, grown.n_layers), (192, 768, 6));
        // A bare number grows to it; growing to what the model has adds nothing.
        let to: GrowthTarget = "ffn=600,layer-at=interleave".parse().unwrap();
        let spec = to.resolve(&tiny, 0).unwrap();
        assert_eq!((spec.ffn, spec.layer_at), (88, LayerPlacement::Interleave));
        let same: GrowthTarget = "preset=tiny".parse().unwrap();
        assert!(same.resolve(&tiny, 0).unwrap_err().to_string().contains("adds nothing"));
        for bad in [
            "",
            "ffn",
            "ffn=+",
            "ffn=-3",
            "ffn=+1,ffn=+2",
            "preset=tiny,ffn=+1",
            "preset=tiny,preset=small",
            "init=exact",
        ] {
            assert!(bad.parse::<GrowthTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn moments_grow_by_zero_rows_only() {
        let m = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]).unwrap();
        let grown = pad_rows(&m, &[5, 2]).unwrap();
        assert_eq!(grown.dims(), [5, 2]);
        assert_eq!(grown.to_vec().unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(pad_rows(&m, &[3, 2]).unwrap().to_vec().unwrap(), m.to_vec().unwrap());
        // Fewer rows, or another row length (with as many rows or more): a moment that does
        // not belong to the parameter, refused in one line.
        for dims in [[2, 2], [3, 3], [5, 3], [2, 3]] {
            let err = pad_rows(&m, &dims).unwrap_err().to_string();
            assert!(err.contains("cannot grow to"), "{dims:?}: {err}");
        }
    }

    #[test]
    fn tau_current_changes_tau_where_a_grown_count_differs_from_its_n0() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let current =
            |qkv, layers| GrowSpec { qkv, layers, tau: TauRule::Current, ..GrowSpec::default() };
        assert!(current(64, 0).changes_tau(&tiny));
        // Depth alone keeps every count at its n₀; so does τ frozen.
        assert!(!current(0, 1).changes_tau(&tiny));
        assert!(!GrowSpec { qkv: 64, ..GrowSpec::default() }.changes_tau(&tiny));
        // Grown before with τ frozen (128 tokens, n₀ = 64): τ moves to √(128 + new), also
        // when the growth adds exactly n₀'s shortfall again, and with depth alone.
        let mut grown_before = tiny.clone();
        grown_before.qkv_scale_tokens = 64;
        assert!(current(64, 0).changes_tau(&grown_before));
        assert!(current(0, 1).changes_tau(&grown_before));
    }

    #[test]
    fn depth_growth_to_a_deeper_preset() {
        let mut from = ModelConfig::preset("owt-124M").unwrap();
        from.n_layers = 6;
        let spec = GrowSpec::to_preset(&from, "owt-354M", LayerPlacement::End, GrowInit::Exact, 0)
            .unwrap();
        assert_eq!((spec.layers, spec.qkv, spec.ffn), (6, 2140 - 576, 8560 - 2304));
        assert!(spec.preserves_outputs(&from));
        let mut softmax = from.clone();
        softmax.norm = Theta::Softmax;
        assert!(!spec.preserves_outputs(&softmax));
        let deeper_only = GrowSpec { layers: 2, ..GrowSpec::default() };
        assert!(deeper_only.preserves_outputs(&softmax), "depth growth is exact for every Θ");
    }
}
