//! Growing a checkpoint (SPEC §4): more parameter tokens, the same model function.
//!
//! `grow_checkpoint` loads a checkpoint, appends tokens to its Pattentions (see
//! [`TokenFormer::grow`]) and writes the result to a new directory; the source is only read.
//! A training checkpoint stays resumable: exact growth extends each AdamW moment with zero rows
//! for the new tokens (old rows keep theirs), paper-style random growth restarts the optimizer
//! (every moment zero). The run's other files (metrics, plot, token cache) are copied so a
//! resumed run continues its history in the new directory.
//!
//! The growth itself runs on the device the caller names: the parameters and moments are moved
//! there, the new rows are appended there (a concat on the device), and the result is copied
//! back when it is saved. The new tokens are drawn on the host from the same seeded RNG on every
//! device, so growing on a GPU writes the same checkpoint as growing on the CPU.

use crate::checkpoint::{
    inspect_checkpoint, is_checkpoint_dir, load_checkpoint, save_checkpoint, Checkpoint,
};
use crate::config::{Arch, ModelConfig, Theta, TokenGroup};
use crate::files::copy_into;
use crate::memory;
use crate::model::{cannot_grow, TokenFormer};
use crate::pattention::GrowInit;
use crate::run_dir::{RunLock, RUN_FILES};
use std::path::Path;
use tokenformer_core::{Device, Error, Result, Tensor};
use tokenformer_ops::layout::concat;

#[derive(Clone, Debug)]
pub struct GrowSpec {
    pub qkv: usize,
    pub proj: usize,
    pub ffn: usize,
    pub init: GrowInit,
    /// Seeds the draws of the new value tokens (and keys, for `Random`).
    pub seed: u64,
}

impl GrowSpec {
    /// The token counts that turn `from` into preset `to`, which may differ from it only in
    /// token counts (all at least as large).
    pub fn to_preset(from: &ModelConfig, to: &str, init: GrowInit, seed: u64) -> Result<GrowSpec> {
        check_growable(from)?;
        let target = ModelConfig::preset(to)?;
        let same = |what: &str, a: usize, b: usize| -> Result<()> {
            if a != b {
                return Err(Error::invalid(format!(
                    "cannot grow to preset {to}: it has {what} {b}, the checkpoint has {a} (growth changes only token counts)"
                )));
            }
            Ok(())
        };
        same("n_layers", from.n_layers, target.n_layers)?;
        same("d_model", from.d_model, target.d_model)?;
        same("n_heads", from.n_heads, target.n_heads)?;
        same("max_seq_len", from.max_seq_len, target.max_seq_len)?;
        let mut spec = GrowSpec { qkv: 0, proj: 0, ffn: 0, init, seed };
        for group in TokenGroup::ALL {
            let (field, (a, b)) =
                (group.fields().0, (group.counts(from).0, group.counts(&target).0));
            *spec.extra_mut(group) = b.checked_sub(a).ok_or_else(|| {
                Error::invalid(format!(
                    "cannot grow to preset {to}: its {field} {b} is fewer than the checkpoint's {a}"
                ))
            })?;
        }
        Ok(spec)
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

    /// Whether growing a model with this config computes exactly what the original did: with
    /// zero keys, for the two L2 variants of Θ (with softmax, exp(0) = 1 changes every row's
    /// denominator). The one place this rule is written.
    pub fn preserves_outputs(&self, config: &ModelConfig) -> bool {
        self.init == GrowInit::Exact && config.norm != Theta::Softmax
    }
}

/// Refuses a model that has no parameter tokens (a Transformer), in one line.
pub fn check_growable(config: &ModelConfig) -> Result<()> {
    match config.arch {
        Arch::TokenFormer => Ok(()),
        arch => Err(cannot_grow(arch)),
    }
}

pub struct GrowReport {
    pub from: ModelConfig,
    pub to: ModelConfig,
    pub preserves_outputs: bool,
    pub had_optimizer: bool,
}

/// Refuses growth whose result (with the source, both in memory at once) cannot fit, before
/// anything is loaded: the counts come from flags, and may be absurd.
fn check_fits(src: &Path, spec: &GrowSpec) -> Result<()> {
    let summary = inspect_checkpoint(src)?;
    let from = &summary.config;
    let mut to = from.clone();
    let add = |n: usize, more: usize| n.checked_add(more);
    let grown = (|| {
        to.qkv_tokens = add(from.qkv_tokens, spec.qkv)?;
        to.proj_tokens = add(from.proj_tokens, spec.proj)?;
        to.ffn_tokens = add(from.ffn_tokens, spec.ffn)?;
        let opt = summary.has_training_state;
        memory::checkpoint_bytes(from, opt)?.checked_add(memory::checkpoint_bytes(&to, opt)?)
    })();
    memory::check(
        &format!("growing by {} qkv, {} proj and {} ffn tokens", spec.qkv, spec.proj, spec.ffn),
        grown,
    )
}

/// Appends zero rows to `t` [n, d] until it has `rows` rows.
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, d) = (t.dims()[0], t.dims()[1]);
    if n == rows {
        return Ok(t.clone());
    }
    concat(&[t.clone(), Tensor::zeros(&[rows - n, d], t.device())?], 0)
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
    }
    if spec.qkv + spec.proj + spec.ffn == 0 {
        return Err(Error::invalid(
            "grow: nothing to add (give --qkv, --proj, --ffn or --to-preset)",
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
    let grown = model.grow(spec.qkv, spec.proj, spec.ffn, spec.init, spec.seed)?;
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        grown.named_params().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
    let optimizer = match ckpt.optimizer {
        None => None,
        Some((m, v)) => {
            let extend = |moments: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
                to_device(moments)?
                    .iter()
                    .map(|(name, t)| {
                        let dims = shapes.get(name).ok_or_else(|| {
                            Error::invalid(format!(
                                "grow: optimizer moment for unknown parameter {name}"
                            ))
                        })?;
                        let t = match spec.init {
                            GrowInit::Exact if t.rank() == 2 => pad_rows(t, dims[0])?,
                            GrowInit::Exact => t.clone(),
                            GrowInit::Random => Tensor::zeros(dims, device)?,
                        };
                        Ok((name.clone(), t))
                    })
                    .collect()
            };
            Some((extend(m)?, extend(v)?))
        }
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
        to: grown.config.clone(),
        preserves_outputs: spec.preserves_outputs(&ckpt.config),
        had_optimizer: optimizer.is_some(),
    };
    save_checkpoint(
        dst,
        &Checkpoint {
            config: grown.config.clone(),
            params: grown.named_tensors(),
            optimizer,
            train_state: ckpt.train_state,
        },
    )?;
    Ok(report)
}
