//! The training loop: data, AdamW, schedule, clipping, accumulation, evaluation, checkpoints,
//! metrics, plots, interruption and bit-identical resume.
//!
//! One optimizer step is `grad_accum` micro-batches: each micro-batch's loss is scaled by
//! 1/grad_accum before `backward`, and the gradients are summed in a fixed order. Everything a
//! step depends on — parameters, AdamW moments, the step count (which fixes the learning rate)
//! and the batch sampler's RNG state — is saved with the checkpoint, so a resumed run draws the
//! same batches and computes the same numbers as one that never stopped. A stop request
//! (SIGINT, SIGTERM) that arrives in the middle of a step abandons the partial step and saves
//! the state as it was when the last step completed; the resumed run recomputes that step from
//! its start.
//!
//! A run can grow while it trains (`grow_at`, docs/growth.md): at the scheduled step the model
//! grows exactly, AdamW's moments extend with zeros, the learning rate restarts its warmup and
//! cosine over the new stage or continues (`stage_lr`), and with `freeze_old` only what the
//! growth added is trained from then on. Every metrics row carries the model's parameter count,
//! its stage (growths so far) and the training FLOPs spent so far (SPEC §2 per token).

use crate::checkpoint::{
    inspect_checkpoint, is_checkpoint_dir, load_checkpoint, read_train_state, save_checkpoint,
    Checkpoint,
};
use crate::config::{Arch, ModelConfig};
use crate::data::{
    val_windows, val_windows_spread, Batcher, DataSpec, Dataset, Tokenizer, ValWindows,
};
use crate::files::entry_exists;
use crate::growth::{grow_model, GrowSpec, GrowthPoint};
use crate::memory;
use crate::metrics::{loss_series, read_metrics, MetricsWriter, Record};
use crate::model::TokenFormer;
use crate::optim::{lr_at, Optimizer};
use crate::plot::{growth_steps, plot_run};
use crate::progress::Progress;
use crate::run_dir::{check_writable_dir, is_marked, remove_unused_dir, RunLock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenformer_autograd::{no_grad, profile};
use tokenformer_core::{Device, Error, Result, Tensor};
use tokenformer_ops::adamw::AdamW;
use tokenformer_ops::binary;

/// Every setting of a run. Saved in the checkpoint, so `--resume` restores all of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub preset: String,
    /// The model, when it is not `preset` itself but a variant of it (other token counts or
    /// depth, as `experiment growth` trains): `preset` then names what it was derived from.
    #[serde(default)]
    pub model: Option<ModelConfig>,
    /// The decoder's projections: Pattentions (TokenFormer) or linear layers (Transformer).
    #[serde(default)]
    pub arch: Arch,
    /// A Transformer's MLP width; `None` means 4·d.
    #[serde(default)]
    pub d_ff: Option<usize>,
    /// Files and directories of text; empty means the built-in tiny shakespeare.
    pub data: Vec<PathBuf>,
    /// Validation files; empty means the last `val_fraction` of the data.
    pub val_data: Vec<PathBuf>,
    pub val_fraction: f64,
    pub tokenizer: String,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub clip: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub seed: u64,
    pub eval_every: u64,
    /// Validation windows (of `seq` predicted tokens each) per evaluation.
    pub eval_windows: usize,
    /// Spread the validation windows evenly over the validation tokens instead of taking the
    /// first `eval_windows` (a sample of every held-out book rather than the start of one).
    #[serde(default)]
    pub val_spread: bool,
    pub save_every: u64,
    /// Growths during the run, in step order (`STEP:SPEC`, see [`GrowthPoint`]).
    #[serde(default)]
    pub grow_at: Vec<GrowthPoint>,
    /// The learning rate after a growth: a new warmup and cosine over the stage, or the one
    /// schedule of the run going on. Runs saved before growth schedules existed continue.
    #[serde(default = "StageLr::of_older_runs")]
    pub stage_lr: StageLr,
    /// After a growth, train only what it added: every parameter token (and the embedding and
    /// final norm) that existed before stays fixed, its AdamW moments too.
    #[serde(default)]
    pub freeze_old: bool,
    /// The checkpoint directory whose model the run started from (`train --init-from`), instead
    /// of a fresh initialisation; `model` then holds that model's config.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

/// How the learning rate goes on after a growth.
///
/// The default is `Continue`, for `train` and `experiment growth` alike: it is the schedule the
/// growth experiment measured (docs/growth.md: the grown arm reached scratch's final loss with
/// 68% of its FLOPs), and it leaves an exact growth without a bump, where `Restart` warms up
/// to the peak rate again and the loss rises for a while after the growth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageLr {
    /// Each stage (the steps between two growths) gets its own warmup and cosine decay, as the
    /// paper's stagewise runs did.
    Restart,
    /// One warmup and cosine over the whole run, whatever grows.
    #[default]
    Continue,
}

impl StageLr {
    fn of_older_runs() -> StageLr {
        StageLr::Continue
    }
}

impl std::fmt::Display for StageLr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageLr::Restart => "restart",
            StageLr::Continue => "continue",
        })
    }
}

impl std::str::FromStr for StageLr {
    type Err = Error;
    fn from_str(s: &str) -> Result<StageLr> {
        match s {
            "restart" => Ok(StageLr::Restart),
            "continue" => Ok(StageLr::Continue),
            _ => Err(Error::invalid(format!("--stage-lr must be restart or continue, got '{s}'"))),
        }
    }
}

impl Default for TrainSettings {
    /// The default run: preset `tiny`, bytes of tiny shakespeare, sized to finish in a few
    /// minutes on two CPU cores.
    fn default() -> Self {
        TrainSettings {
            preset: "tiny".into(),
            model: None,
            arch: Arch::TokenFormer,
            d_ff: None,
            data: Vec::new(),
            val_data: Vec::new(),
            val_fraction: crate::data::DEFAULT_VAL_FRACTION,
            tokenizer: "byte".into(),
            steps: 1500,
            batch: 16,
            seq: 64,
            grad_accum: 1,
            lr: 5e-3,
            min_lr: 5e-4,
            warmup: 30,
            weight_decay: 0.1,
            clip: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            seed: 1337,
            eval_every: 250,
            eval_windows: 128,
            val_spread: false,
            save_every: 500,
            grow_at: Vec::new(),
            stage_lr: StageLr::default(),
            freeze_old: false,
            init_from: None,
        }
    }
}

impl TrainSettings {
    /// Rejects settings no run can use, with one line naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.seq == 0 {
            return bad("--seq must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("--min-lr must be in [0, lr = {}], got {}", self.lr, self.min_lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("--weight-decay must be >= 0, got {}", self.weight_decay));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            return bad(format!("--clip must be >= 0 (0 disables clipping), got {}", self.clip));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("AdamW betas must be in [0, 1)".into());
        }
        if self.eval_every == 0 || self.save_every == 0 {
            return bad("--eval-every and --save-every must be at least 1".into());
        }
        if self.eval_windows == 0 {
            return bad("the number of validation windows must be at least 1".into());
        }
        Tokenizer::from_name(&self.tokenizer)?;
        let mut previous = 0;
        for point in &self.grow_at {
            if point.step <= previous || point.step >= self.steps {
                return bad(format!(
                    "--grow-at {point}: growth steps must increase and lie in 1..{} (--steps)",
                    self.steps
                ));
            }
            previous = point.step;
        }
        if !self.grow_at.is_empty() && self.arch != Arch::TokenFormer {
            return Err(crate::model::cannot_grow(self.arch));
        }
        Ok(())
    }

    /// The growth of each scheduled point and the config after it, resolved against the
    /// configs the run will have: checks before training that every growth of the plan can
    /// happen.
    pub fn growth_plan(&self, config: &ModelConfig) -> Result<Vec<(GrowSpec, ModelConfig)>> {
        self.remaining_growth_plan(config, 0)
    }

    /// `growth_plan` for a run that has made its first `done` scheduled growths and now has
    /// `config`: what the rest of its schedule does.
    pub fn remaining_growth_plan(
        &self,
        config: &ModelConfig,
        done: usize,
    ) -> Result<Vec<(GrowSpec, ModelConfig)>> {
        let mut config = config.clone();
        let mut plan = Vec::new();
        for (index, point) in self.grow_at.iter().enumerate().skip(done) {
            let fail = |e: String| Error::invalid(format!("--grow-at {point}: {e}"));
            let spec = point
                .target
                .resolve(&config, self.growth_seed(index))
                .map_err(|e| fail(e.to_string()))?;
            config = spec.apply(&config).ok_or_else(|| fail("a count overflows".into()))?;
            config.validate().map_err(|e| fail(e.to_string()))?;
            plan.push((spec, config.clone()));
        }
        Ok(plan)
    }

    /// Starts the run from the model of the checkpoint directory `ckpt` (made by `init`, `grow`
    /// or `train`): its config becomes the run's model, with its architecture and tokenizer.
    /// Only the model is taken: the run's step, optimizer and schedule start afresh.
    pub fn start_from(&mut self, ckpt: &Path) -> Result<()> {
        let config = inspect_checkpoint(ckpt)
            .map_err(|e| Error::invalid(format!("--init-from {}: {e}", ckpt.display())))?
            .config;
        self.arch = config.arch;
        self.d_ff = (config.arch == Arch::Transformer).then_some(config.d_ff);
        self.tokenizer = config.tokenizer.clone();
        self.model = Some(config);
        self.init_from =
            Some(std::path::absolute(ckpt).map_err(|e| Error::io(ckpt.display(), e.to_string()))?);
        Ok(())
    }

    /// The model of the run as its messages name it: the preset, a variant of it, or the
    /// checkpoint it started from.
    pub fn model_name(&self) -> String {
        match (&self.init_from, &self.model) {
            (Some(ckpt), _) => format!("{}'s", ckpt.display()),
            (None, Some(_)) => format!("a variant of {}", self.preset),
            (None, None) => self.preset.clone(),
        }
    }

    /// The seed of the new tokens of scheduled growth `index`.
    pub fn growth_seed(&self, index: usize) -> u64 {
        self.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(index as u64 + 1))
    }

    /// The model config: the preset (or `model`) in the run's architecture, with the
    /// vocabulary of the tokenizer.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let tokenizer = Tokenizer::from_name(&self.tokenizer)?;
        let base = ModelConfig::preset(&self.preset)?;
        let mut config = self.model.as_ref().unwrap_or(&base).with_arch(self.arch, self.d_ff)?;
        config.vocab_size = tokenizer.padded_vocab_size();
        config.tokenizer = tokenizer.name().into();
        config.validate()?;
        if self.seq > config.max_seq_len {
            return Err(Error::invalid(format!(
                "--seq {} exceeds the model's max_seq_len {}",
                self.seq, config.max_seq_len
            )));
        }
        Ok(config)
    }

    fn adamw(&self) -> AdamW {
        AdamW {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }

    /// The validation windows of an evaluation, over the validation tokens `val`.
    fn val_windows<'a>(&self, val: &'a [u32]) -> Result<ValWindows<'a>> {
        let (batch, seq, windows) = (self.batch, self.seq, self.eval_windows);
        if self.val_spread {
            val_windows_spread(val, batch, seq, windows)
        } else {
            val_windows(val, batch, seq, windows)
        }
    }

    fn data_spec(&self) -> DataSpec {
        DataSpec {
            data: self.data.clone(),
            val_data: self.val_data.clone(),
            val_fraction: self.val_fraction,
        }
    }
}

/// What the trainer saves next to the checkpoint, besides parameters and moments.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainState {
    settings: TrainSettings,
    /// Optimizer steps completed.
    step: u64,
    /// The batch sampler's RNG state at the start of step `step`.
    batcher_rng: [u64; 4],
    /// Training tokens consumed so far.
    tokens_seen: u64,
    /// Growths so far, scheduled or by `grow`: the stage of the next step.
    #[serde(default)]
    stage: u64,
    /// The step the current stage began at.
    #[serde(default)]
    stage_start: u64,
    /// Scheduled growths (`grow_at`) applied so far.
    #[serde(default)]
    scheduled: usize,
    /// Training FLOPs so far; absent in runs saved before they were counted.
    #[serde(default)]
    flops: Option<f64>,
    /// The source hashes of the data (`Dataset::source_hashes`, 16 hex digits each) the run
    /// started with; absent in runs saved before they were recorded.
    #[serde(default)]
    data_hashes: Option<Vec<String>>,
    /// For each parameter, the leading rows that existed before the latest growth (what
    /// `freeze_old` keeps fixed); absent before the first growth.
    #[serde(default)]
    old_rows: Option<BTreeMap<String, usize>>,
}

/// Records in a run's saved training state that its model was just grown (by `grow`): a new
/// stage begins at the saved step, and `old_rows` says what existed before it.
pub fn record_growth(
    train_state: &serde_json::Value,
    old_rows: BTreeMap<String, usize>,
) -> Result<serde_json::Value> {
    let mut state: TrainState = serde_json::from_value(train_state.clone())
        .map_err(|e| Error::invalid(format!("train state: {e}")))?;
    state.stage += 1;
    state.stage_start = state.step;
    state.old_rows = Some(old_rows);
    serde_json::to_value(&state).map_err(|e| Error::invalid(format!("train state: {e}")))
}

/// How the caller can stop a run and watch it. `stop` is what the signal handlers set.
#[derive(Default)]
pub struct TrainControl {
    pub stop: Arc<AtomicBool>,
    /// Called after every micro-batch with (step being computed, micro-batch index); tests use
    /// it to stop a run at an exact point.
    pub after_micro_batch: Option<Box<dyn FnMut(u64, usize) + Send>>,
    /// No progress bar or log lines (tests).
    pub quiet: bool,
}

#[derive(Debug)]
pub struct TrainSummary {
    /// Optimizer steps completed (including those before a resume).
    pub step: u64,
    pub steps: u64,
    pub interrupted: bool,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub seconds: f64,
    /// Every evaluation this process ran, in order.
    pub evaluations: Vec<Evaluation>,
}

/// One validation loss of a run, with what had been spent to reach it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub step: u64,
    pub val_loss: f64,
    /// Training FLOPs so far.
    pub flops: f64,
    pub params: usize,
    pub stage: u64,
}

/// How the error of a run stopped by a non-finite loss begins.
const DIVERGED: &str = "the loss became non-finite";

/// Whether `e` is the error of a run stopped by a non-finite loss (a learning-rate sweep
/// records such a rate as diverged and goes on).
pub fn is_divergence(e: &Error) -> bool {
    matches!(e, Error::Invalid(msg) if msg.starts_with(DIVERGED))
}

/// True when `dir` holds a training run: a checkpoint, or the metrics of a run the tool started
/// there (in a directory it marked; anyone else's `metrics.jsonl` is no run of ours).
pub fn is_run_dir(dir: &Path) -> bool {
    is_checkpoint_dir(dir) || (is_marked(dir) && entry_exists(&dir.join("metrics.jsonl")))
}

/// The checks `train_new` makes before it touches anything: valid settings that fit in memory,
/// and an `out` that does not hold a run already. Returns the model config of the run.
pub fn check_new_run(out: &Path, settings: &TrainSettings) -> Result<ModelConfig> {
    settings.validate()?;
    let config = settings.model_config()?;
    if let Some(ckpt) = &settings.init_from {
        check_start_model(ckpt, &config)?;
    }
    // The largest model of the run is the one its last growth makes.
    let plan = settings.growth_plan(&config)?;
    let largest = plan.last().map_or(&config, |(_, grown)| grown);
    memory::check_training(largest, settings.batch, settings.seq, settings.grad_accum)?;
    if settings.freeze_old && settings.grow_at.is_empty() {
        return Err(Error::invalid(
            "--freeze-old keeps what existed before a growth fixed: give --grow-at too",
        ));
    }
    if is_checkpoint_dir(out) {
        return Err(Error::invalid(format!(
            "{} already holds a run; use --resume {0} to continue it, or choose another --out",
            out.display()
        )));
    }
    if is_run_dir(out) {
        return Err(Error::invalid(format!(
            "{} holds a run that stopped before its first checkpoint; start again in it with \
             --overwrite, or choose another --out",
            out.display()
        )));
    }
    check_writable_dir(out)?;
    Ok(config)
}

/// Refuses a run whose model (`config`, from its settings) is not the model of the checkpoint
/// it starts from: another tokenizer gives another vocabulary.
fn check_start_model(ckpt: &Path, config: &ModelConfig) -> Result<()> {
    let source = inspect_checkpoint(ckpt)?.config;
    if source.tokenizer != config.tokenizer || source.vocab_size != config.vocab_size {
        return Err(Error::invalid(format!(
            "--init-from {}: its model reads tokenizer {} (vocab_size {}); the run's tokenizer {} \
             has vocab_size {} (leave out --tokenizer to use the checkpoint's)",
            ckpt.display(),
            source.tokenizer,
            source.vocab_size,
            config.tokenizer,
            config.vocab_size
        )));
    }
    if source != *config {
        return Err(Error::invalid(format!(
            "--init-from {}: the run's model differs from the checkpoint's",
            ckpt.display()
        )));
    }
    Ok(())
}

/// `paths` made absolute against the current directory, so that a run resumed from another
/// directory reads the same files.
pub fn absolute_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    paths.iter().map(|p| std::path::absolute(p).map_err(|e| Error::io(p.display(), e))).collect()
}

/// Starts a new run in `out`, which must not hold a run already.
pub fn train_new(
    out: &Path,
    mut settings: TrainSettings,
    device: Device,
    control: TrainControl,
) -> Result<TrainSummary> {
    settings.data = absolute_paths(&settings.data)?;
    settings.val_data = absolute_paths(&settings.val_data)?;
    check_new_run(out, &settings)?;
    let new_dir = !entry_exists(out);
    let lock = RunLock::create_and_acquire(out)?;
    // Again under the lock: another process may have started a run here meanwhile.
    let config = check_new_run(out, &settings)?;
    let model = match &settings.init_from {
        Some(ckpt) => load_model(ckpt, device)?,
        None => TokenFormer::init(&config, settings.seed, device)?,
    };
    let optimizer = Optimizer::new(&model, settings.adamw())?;
    let batcher = Batcher::new(settings.seed, settings.batch, settings.seq)?;
    let state = TrainState {
        settings,
        step: 0,
        batcher_rng: batcher.state(),
        tokens_seen: 0,
        stage: 0,
        stage_start: 0,
        scheduled: 0,
        flops: Some(0.0),
        data_hashes: None,
        old_rows: None,
    };
    match Run::open(out, model, optimizer, state, control) {
        Ok(run) => drive(run),
        // Bad data shows only now: a directory made for this run a moment ago is taken away
        // again, so that it does not stand in the way of the corrected command.
        Err(e) => {
            if new_dir {
                remove_unused_dir(lock);
            }
            Err(e)
        }
    }
}

/// The settings a run directory was started with and the step its checkpoint is at (for
/// `--resume` flag checks), read without loading tensors and checked as `--resume` checks them.
pub fn saved_run(dir: &Path) -> Result<(TrainSettings, u64)> {
    let state = saved_state(dir)?;
    Ok((state.settings, state.step))
}

fn saved_state(dir: &Path) -> Result<TrainState> {
    check_run_dir(dir)?;
    let config = inspect_checkpoint(dir)?.config;
    parse_state(dir, read_train_state(dir)?, &config)
}

/// What `train --resume` may change of a run. Everything else a run keeps; these change what
/// is still ahead of it, never what it has done.
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Train only what the latest growth added from now on (docs/growth.md §4).
    pub freeze_old: bool,
    /// Train to this many steps. More than a finished run asked for extends it by a new stage
    /// that begins at its last step; a run that has just grown (`grow`) or that is at the start
    /// of a stage may be given another end for that stage.
    pub steps: Option<u64>,
    /// The learning rate of the stage that begins now (allowed only at the start of a stage:
    /// an extension, or a run that has just grown).
    pub stage_lr: Option<StageLr>,
}

/// A run as `train --resume` with some [`ResumeOptions`] will continue it.
#[derive(Clone, Debug)]
pub struct ResumePlan {
    /// The run's settings, with the options applied.
    pub settings: TrainSettings,
    /// The step its checkpoint is at.
    pub step: u64,
    /// The steps the run asked for before, when the options extend it by a new stage.
    pub extends: Option<u64>,
}

/// What `train --resume DIR` with `options` will do, read without loading tensors: the CLI
/// checks its flags against the settings this returns, and says what will happen.
pub fn resume_plan(dir: &Path, options: &ResumeOptions) -> Result<ResumePlan> {
    let mut state = saved_state(dir)?;
    let before = state.settings.steps;
    options.apply(dir, &mut state)?;
    let extends = (state.settings.steps != before && state.step >= before).then_some(before);
    Ok(ResumePlan { settings: state.settings, step: state.step, extends })
}

impl ResumeOptions {
    /// Applies the options to the saved state of the run in `dir`, refusing a change of
    /// schedule in the middle of a stage (it would change the steps already taken, which a
    /// resumed run could then not reproduce).
    fn apply(&self, dir: &Path, state: &mut TrainState) -> Result<()> {
        let s = &mut state.settings;
        if let Some(steps) = self.steps.filter(|&n| n != s.steps) {
            let finished = state.step >= s.steps;
            if steps <= state.step {
                return Err(Error::invalid(format!(
                    "--steps {steps}: the run in {} has taken {} steps already; give more to \
                     train it further",
                    dir.display(),
                    state.step
                )));
            }
            if !finished && state.stage_start != state.step {
                return Err(Error::invalid(format!(
                    "--steps {steps} contradicts the run in {} (steps {}, at step {} of a stage \
                     that began at step {}): a run takes more steps once it has finished, or \
                     right after a growth",
                    dir.display(),
                    s.steps,
                    state.step,
                    state.stage_start
                )));
            }
            if finished {
                state.stage_start = state.step;
            }
            s.steps = steps;
        }
        if let Some(stage_lr) = self.stage_lr.filter(|&l| l != s.stage_lr) {
            if state.stage_start != state.step {
                return Err(Error::invalid(format!(
                    "--stage-lr {stage_lr} contradicts the run in {} (stage-lr {}, at step {} of \
                     a stage that began at step {}): the learning rate of a stage is chosen \
                     where it begins (after a growth, or with --steps on a finished run)",
                    dir.display(),
                    s.stage_lr,
                    state.step,
                    state.stage_start
                )));
            }
            s.stage_lr = stage_lr;
        }
        if self.freeze_old && !s.freeze_old {
            if state.old_rows.is_none() && state.scheduled >= s.grow_at.len() {
                return Err(Error::invalid(format!(
                    "--freeze-old: the run in {} has not grown and has no growth ahead; nothing \
                     is old",
                    dir.display()
                )));
            }
            s.freeze_old = true;
        }
        Ok(())
    }
}

fn check_run_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!("{}: no such run directory", dir.display())));
    }
    if !is_checkpoint_dir(dir) {
        if is_run_dir(dir) {
            return Err(Error::invalid(format!(
                "{0} has no checkpoint yet (its run stopped before the first save): remove it, \
                 or start again in it with `train --out {0} --overwrite`",
                dir.display()
            )));
        }
        return Err(Error::invalid(format!(
            "{} is not a run directory (no checkpoint in it)",
            dir.display()
        )));
    }
    Ok(())
}

/// The train state of a checkpoint, refusing anything a run could not have written: unknown
/// fields, an unknown preset or tokenizer, a tokenizer other than the model's.
fn parse_state(
    dir: &Path,
    state: Option<serde_json::Value>,
    config: &ModelConfig,
) -> Result<TrainState> {
    let path = dir.join("train_state.json");
    let state = state.ok_or_else(|| {
        Error::invalid(format!(
            "{0} holds a model but no training state (made by `init` or `grow` of a model, not by \
             `train`): start a run from it with `train --init-from {0}`",
            dir.display()
        ))
    })?;
    let state: TrainState =
        serde_json::from_value(state).map_err(|e| Error::format(path.display(), e.to_string()))?;
    let s = &state.settings;
    let bad = |e: Error| Error::format(path.display(), e.to_string());
    ModelConfig::preset(&s.preset).map_err(bad)?;
    Tokenizer::from_name(&s.tokenizer).map_err(bad)?;
    if s.tokenizer != config.tokenizer {
        return Err(Error::format(
            path.display(),
            format!(
                "tokenizer {:?} differs from the model's ({:?} in config.json)",
                s.tokenizer, config.tokenizer
            ),
        ));
    }
    Ok(state)
}

fn load_run(dir: &Path) -> Result<(Checkpoint, TrainState)> {
    check_run_dir(dir)?;
    let ckpt = load_checkpoint(dir)?;
    let state = parse_state(dir, ckpt.train_state.clone(), &ckpt.config)?;
    Ok((ckpt, state))
}

/// Continues the run in `dir` to its original number of steps, with its own settings.
pub fn train_resume(dir: &Path, device: Device, control: TrainControl) -> Result<TrainSummary> {
    train_resume_with(dir, device, control, false)
}

/// [`train_resume`], with `freeze_old` turned on from now if asked: for a run grown by `grow`,
/// or one whose schedule grows later.
pub fn train_resume_with(
    dir: &Path,
    device: Device,
    control: TrainControl,
    freeze_old: bool,
) -> Result<TrainSummary> {
    let options = ResumeOptions { freeze_old, ..ResumeOptions::default() };
    train_resume_options(dir, device, control, &options)
}

/// Continues the run in `dir` with what [`ResumeOptions`] may change: with more `steps` than a
/// finished run asked for, it trains on as a new stage (its learning rate as `stage_lr` says:
/// a new warmup and cosine to the new end, or the run's one schedule stretched to it).
pub fn train_resume_options(
    dir: &Path,
    device: Device,
    control: TrainControl,
    options: &ResumeOptions,
) -> Result<TrainSummary> {
    check_run_dir(dir)?;
    let _lock = RunLock::acquire(dir)?;
    let (ckpt, mut state) = load_run(dir)?;
    options.apply(dir, &mut state)?;
    state.settings.validate()?;
    let s = &state.settings;
    // The largest model the rest of the schedule reaches must fit too, checked now rather than
    // at the growth step: the schedule may have been edited, or the machine may be smaller than
    // the one the run started on.
    let plan = s.remaining_growth_plan(&ckpt.config, state.scheduled)?;
    let largest = plan.last().map_or(&ckpt.config, |(_, grown)| grown);
    memory::check_training(largest, s.batch, s.seq, s.grad_accum).map_err(|e| {
        match plan.last() {
            Some(_) => Error::invalid(format!(
                "resuming {}: its growth schedule ({}) reaches a model too large: {e}",
                dir.display(),
                s.grow_at[state.scheduled..]
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => e,
        }
    })?;
    let params = ckpt
        .params
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(device)?)))
        .collect::<Result<Vec<_>>>()?;
    let model = TokenFormer::from_named(ckpt.config, params)?;
    let (m, v) = ckpt.optimizer.ok_or_else(|| {
        Error::invalid(format!(
            "{}: the checkpoint has no optimizer state to resume from",
            dir.display()
        ))
    })?;
    let optimizer = Optimizer::from_named(&model, state.settings.adamw(), state.step, m, v)?;
    run(dir, model, optimizer, state, control)
}

fn save(dir: &Path, model: &TokenFormer, optimizer: &Optimizer, state: &TrainState) -> Result<()> {
    let state_json =
        serde_json::to_value(state).map_err(|e| Error::invalid(format!("train state: {e}")))?;
    save_checkpoint(
        dir,
        &Checkpoint {
            config: model.config.clone(),
            params: model.named_tensors(),
            optimizer: Some(optimizer.named_moments(model)),
            train_state: Some(state_json),
        },
    )
}

/// Mean loss over the fixed validation windows.
fn validation_loss(model: &TokenFormer, data: &Dataset, s: &TrainSettings) -> Result<f64> {
    let mut total = 0.0f64;
    let mut count = 0usize;
    for batch in s.val_windows(data.val())? {
        let dims = [batch.batch, batch.seq];
        batch.check_ids(model.config.vocab_size)?;
        let inputs = Tensor::from_vec(batch.inputs, &dims)?.to_device(model.device())?;
        let targets = Tensor::from_vec(batch.targets, &dims)?.to_device(model.device())?;
        let loss = no_grad(|| model.loss(&inputs, &targets))?.value().to_scalar()? as f64;
        total += loss * (batch.batch * batch.seq) as f64;
        count += batch.batch * batch.seq;
    }
    Ok(total / count as f64)
}

fn redraw_plot(dir: &Path, arch: Arch) -> Result<()> {
    let records = read_metrics(&dir.join("metrics.jsonl"))?;
    let (train, val) = loss_series(&records);
    let title = match arch {
        Arch::TokenFormer => "TokenFormer training loss",
        Arch::Transformer => "Transformer training loss",
    };
    plot_run(&dir.join("loss.png"), &train, &val, &growth_steps(&records), title)
}

/// What one optimizer step leaves for the caller to read. The values stay on the model's
/// device until read, so that reading them does not stall the queue of device work.
pub struct StepResult {
    /// The loss of every micro-batch.
    pub losses: Vec<Tensor>,
    /// The global gradient norm before clipping, when clipping is on.
    pub grad_norm: Option<Tensor>,
}

impl StepResult {
    /// The mean loss over the micro-batches (non-finite if any of them is).
    pub fn mean_loss(&self) -> Result<f64> {
        let mut sum = 0.0f64;
        for loss in &self.losses {
            sum += loss.to_scalar()? as f64;
        }
        Ok(sum / self.losses.len() as f64)
    }

    pub fn grad_norm(&self) -> Result<Option<f32>> {
        self.grad_norm.as_ref().map(Tensor::to_scalar).transpose()
    }
}

/// One optimizer step: forward and backward over `micro_batches` (inputs, targets) pairs drawn
/// from `next_batch`, each loss scaled by 1/micro_batches and the gradients summed in a fixed
/// order, then clipped to global norm `clip` (0: no clipping) and applied by AdamW at `lr`.
///
/// `after_micro_batch(i)` runs after micro-batch i's backward pass; when it returns true the
/// step is abandoned before the update (the model and optimizer are left as they were) and
/// `None` is returned.
pub fn train_step(
    model: &mut TokenFormer,
    optimizer: &mut Optimizer,
    micro_batches: usize,
    mut next_batch: impl FnMut() -> Result<(Tensor, Tensor)>,
    clip: f32,
    lr: f32,
    mut after_micro_batch: impl FnMut(usize) -> bool,
) -> Result<Option<StepResult>> {
    let params = model.named_params();
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut losses = Vec::with_capacity(micro_batches);
    for micro in 0..micro_batches {
        let (inputs, targets) = next_batch()?;
        // `bench --profile` counts from here: drawing the batch is no op's forward time.
        profile::mark();
        let loss = model.loss(&inputs, &targets)?;
        losses.push(loss.value().clone());
        let step_grads = loss.scale(1.0 / micro_batches as f32)?.backward()?;
        for (slot, (name, param)) in grads.iter_mut().zip(&params) {
            let g = step_grads
                .get(param)
                .ok_or_else(|| Error::invalid(format!("no gradient reached {name}")))?;
            *slot = Some(match slot.take() {
                Some(acc) => binary::add(&acc, g)?,
                None => g.clone(),
            });
        }
        profile::time("free graph", || drop((loss, step_grads)));
        if after_micro_batch(micro) {
            return Ok(None);
        }
    }
    // No clone of a parameter outlives the graph: the update may then work in place.
    drop(params);
    let grads = grads
        .into_iter()
        .collect::<Option<Vec<Tensor>>>()
        .ok_or_else(|| Error::invalid("a step ran no micro-batch"))?;
    let clip = (clip > 0.0).then_some(clip);
    let grad_norm =
        profile::time("adamw + clip", || optimizer.clip_and_update(model, grads, lr, clip))?;
    Ok(Some(StepResult { losses, grad_norm }))
}

/// A run in progress: the model and optimizer, the data, and the files it writes.
struct Run<'a> {
    evaluations: Vec<Evaluation>,
    dir: &'a Path,
    settings: TrainSettings,
    model: TokenFormer,
    optimizer: Optimizer,
    state: TrainState,
    data: Dataset,
    batcher: Batcher,
    metrics: MetricsWriter,
    progress: Progress,
    control: TrainControl,
    started: Instant,
    last_loss: Option<f64>,
    last_val_loss: Option<f64>,
}

/// One completed step, as logged.
struct Logged {
    loss: f64,
    lr: f32,
    grad_norm: Option<f32>,
    seconds: f64,
}

impl<'a> Run<'a> {
    fn open(
        dir: &'a Path,
        model: TokenFormer,
        optimizer: Optimizer,
        state: TrainState,
        control: TrainControl,
    ) -> Result<Run<'a>> {
        let settings = state.settings.clone();
        let s = &settings;
        let tokenizer = Tokenizer::from_name(&s.tokenizer)?;
        let data = Dataset::load(tokenizer, &s.data_spec(), dir)?;
        let hashes: Vec<String> =
            data.source_hashes().iter().map(|h| format!("{h:016x}")).collect();
        match &state.data_hashes {
            Some(started) if *started != hashes => {
                return Err(Error::invalid(format!(
                    "{}: the data ({}) differs from what the run started with (source hash {}, \
                     now {}): a resumed run must read the same data; restore it, or start a new \
                     run",
                    dir.display(),
                    s.data
                        .iter()
                        .chain(&s.val_data)
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    started.join(", "),
                    hashes.join(", ")
                )))
            }
            _ => {}
        }
        let mut state = state;
        state.data_hashes = Some(hashes);
        // Both checks up front, so a bad corpus fails before the first step, not at evaluation.
        Batcher::new(0, s.batch, s.seq)?.next_batch(data.train())?;
        s.val_windows(data.val())?;
        let batcher = Batcher::from_state(state.batcher_rng, s.batch, s.seq)?;
        // Lines logged after this checkpoint by a run that died without saving would be
        // repeated by the resumed run: `resume` drops them.
        let metrics = MetricsWriter::resume(&dir.join("metrics.jsonl"), state.step)?;
        let progress =
            if control.quiet { Progress::hidden() } else { Progress::new(s.steps, state.step) };
        let run = Run {
            dir,
            model,
            optimizer,
            data,
            batcher,
            metrics,
            progress,
            control,
            started: Instant::now(),
            last_loss: None,
            last_val_loss: None,
            evaluations: Vec::new(),
            settings,
            state,
        };
        let mut run = run;
        if run.state.flops.is_none() {
            // A run saved before FLOPs were counted: as if every token so far had been seen by
            // the model as it is now.
            let per_token = run.model.config.train_flops_per_token(run.settings.seq);
            run.state.flops = Some(run.state.tokens_seen as f64 * per_token);
        }
        run.apply_freeze()?;
        run.say(format!(
            "training {} {} ({} parameters) on {}: {}; {} steps of {}×{}×{} tokens \
             (grad-accum × batch × seq)",
            run.settings.model_name(),
            run.settings.arch,
            crate::progress::thousands(run.model.config.param_count()),
            run.model.device(),
            run.data.summary(),
            run.settings.steps,
            run.settings.grad_accum,
            run.settings.batch,
            run.settings.seq
        ));
        // A stage that begins here (after `grow`, or extended by --steps): say what its
        // learning rate does.
        let at_stage_start = run.state.step == run.state.stage_start;
        if at_stage_start && run.state.step > 0 && run.state.step < run.settings.steps {
            run.say(format!("step {:>6}: {}", run.state.step, run.rate_ahead()));
        }
        Ok(run)
    }

    /// With `freeze_old` after a growth, tells the optimizer which rows to keep fixed.
    fn apply_freeze(&mut self) -> Result<()> {
        match (&self.state.old_rows, self.settings.freeze_old) {
            (Some(old_rows), true) => self.optimizer.freeze(&self.model, old_rows),
            _ => Ok(()),
        }
    }

    /// Applies the scheduled growth due at this step, if any.
    fn grow_if_due(&mut self) -> Result<()> {
        let index = self.state.scheduled;
        let Some(point) = self.settings.grow_at.get(index).cloned() else { return Ok(()) };
        if point.step != self.state.step {
            if point.step < self.state.step {
                return Err(Error::invalid(format!(
                    "the run is at step {} but its growth {point} has not happened",
                    self.state.step
                )));
            }
            return Ok(());
        }
        let fail = |e: Error| Error::invalid(format!("--grow-at {point}: {e}"));
        let spec = point
            .target
            .resolve(&self.model.config, self.settings.growth_seed(index))
            .map_err(fail)?;
        let (m, v) = self.optimizer.named_moments(&self.model);
        let grown = grow_model(&self.model, &spec).map_err(fail)?;
        let rule = spec.moments_rule();
        let (m, v) = (grown.moments(m, rule)?, grown.moments(v, rule)?);
        let optimizer =
            Optimizer::from_named(&grown.model, self.optimizer.hp, self.optimizer.step, m, v)?;
        let before = self.model.config.param_count();
        self.state.old_rows = Some(grown.old_rows());
        self.model = grown.model;
        self.optimizer = optimizer;
        self.state.stage += 1;
        self.state.stage_start = self.state.step;
        self.state.scheduled += 1;
        self.apply_freeze()?;
        let exact = if spec.preserves_outputs(&self.model.config) {
            "exact"
        } else {
            "not output-preserving"
        };
        self.say(format!(
            "step {:>6}: grew ({}): {} -> {} parameters, stage {}",
            self.state.step,
            exact,
            crate::progress::thousands(before),
            crate::progress::thousands(self.model.config.param_count()),
            self.state.stage
        ));
        self.say(format!("step {:>6}: {}", self.state.step, self.rate_ahead()));
        Ok(())
    }

    /// What the learning rate does from the current step on, in words, e.g. `learning rate:
    /// warmup restarts: 30 steps to 5e-3, then cosine to 5e-4 at step 600`.
    fn rate_ahead(&self) -> String {
        let s = &self.settings;
        let step = self.state.step;
        let stage_end = s.grow_at.get(self.state.scheduled).map_or(s.steps, |p| p.step);
        let end = if s.stage_lr == StageLr::Restart { stage_end } else { s.steps };
        let floor = format!("cosine to {} at step {end}", rate(s.min_lr));
        match s.stage_lr {
            StageLr::Restart if s.warmup == 0 => {
                format!(
                    "learning rate restarts at {}, then {floor} (--stage-lr restart)",
                    rate(s.lr)
                )
            }
            StageLr::Restart => format!(
                "learning rate: warmup restarts: {} steps to {}, then {floor} (--stage-lr restart)",
                s.warmup,
                rate(s.lr)
            ),
            StageLr::Continue => format!(
                "learning rate continues the run's one schedule over {} steps: {} now, {floor} \
                 (--stage-lr continue)",
                s.steps,
                rate(self.lr_at(step))
            ),
        }
    }

    /// The learning rate of step `step` (0-based).
    fn lr_at(&self, step: u64) -> f32 {
        let s = &self.settings;
        match s.stage_lr {
            StageLr::Continue => lr_at(step, s.warmup, s.steps, s.lr, s.min_lr),
            StageLr::Restart => {
                let start = self.state.stage_start;
                let end = s.grow_at.get(self.state.scheduled).map_or(s.steps, |p| p.step);
                lr_at(step - start, s.warmup, end.max(start + 1) - start, s.lr, s.min_lr)
            }
        }
    }

    fn say(&self, msg: String) {
        if !self.control.quiet {
            self.progress.println(msg)
        }
    }

    /// Computes step `state.step + 1` and advances the state, or returns `None` when a stop
    /// request arrived in the middle of it (the partial step is dropped).
    fn step(&mut self) -> Result<Option<Logged>> {
        let start = Instant::now();
        let s = &self.settings;
        let step = self.state.step;
        let lr = self.lr_at(step);
        let (device, vocab) = (self.model.device(), self.model.config.vocab_size);
        let (batcher, data) = (&mut self.batcher, &self.data);
        let next_batch = || -> Result<(Tensor, Tensor)> {
            let batch = batcher.next_batch(data.train())?;
            let dims = [batch.batch, batch.seq];
            // Checked here, on the host: the GPU kernels do not copy ids back to check them.
            batch.check_ids(vocab)?;
            let inputs = Tensor::from_vec(batch.inputs, &dims)?.to_device(device)?;
            let targets = Tensor::from_vec(batch.targets, &dims)?.to_device(device)?;
            Ok((inputs, targets))
        };
        let control = &mut self.control;
        let after_micro_batch = |micro| {
            if let Some(hook) = control.after_micro_batch.as_mut() {
                hook(step, micro);
            }
            control.stop.load(Ordering::SeqCst)
        };
        let Some(result) = train_step(
            &mut self.model,
            &mut self.optimizer,
            s.grad_accum,
            next_batch,
            s.clip,
            lr,
            after_micro_batch,
        )?
        else {
            return Ok(None);
        };
        let loss = result.mean_loss()?;
        if !loss.is_finite() {
            return Err(self.diverged(loss));
        }
        let tokens = (s.grad_accum * s.batch * s.seq) as u64;
        let flops = tokens as f64 * self.model.config.train_flops_per_token(s.seq);
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.state.flops = Some(self.state.flops.unwrap_or(0.0) + flops);
        self.state.batcher_rng = self.batcher.state();
        self.last_loss = Some(loss);
        let grad_norm = result.grad_norm()?;
        Ok(Some(Logged { loss, lr, grad_norm, seconds: start.elapsed().as_secs_f64() }))
    }

    /// The error for a non-finite loss. The update already used the bad gradients: nothing from
    /// this step is saved, and the checkpoint on disk (if any) is the last good state.
    fn diverged(&self, loss: f64) -> Error {
        self.progress.finish();
        let advice = if self.settings.clip > 0.0 {
            "a smaller --clip"
        } else {
            "a gradient clip, e.g. --clip 1"
        };
        let kept = if is_checkpoint_dir(self.dir) {
            format!("the last good checkpoint in {} is kept", self.dir.display())
        } else {
            format!("no checkpoint had been saved in {} yet", self.dir.display())
        };
        Error::invalid(format!(
            "{DIVERGED} ({loss}) at step {}; stopping: {kept} (try a lower --lr or {advice})",
            self.state.step + 1
        ))
    }

    /// Writes the metrics line of the step just completed, evaluating first when one is due.
    fn evaluate_and_log(&mut self, logged: &Logged) -> Result<()> {
        let s = &self.settings;
        let step = self.state.step;
        let tokens_per_sec = (s.grad_accum * s.batch * s.seq) as f64 / logged.seconds;
        let flops = self.state.flops.unwrap_or(0.0);
        let params = self.model.config.param_count();
        let mut record = Record::new(step, logged.loss, logged.lr as f64, tokens_per_sec)
            .with("tokens_seen", self.state.tokens_seen)
            .with("elapsed_sec", self.started.elapsed().as_secs_f64())
            .with("params", params)
            .with("stage", self.state.stage)
            .with("flops", flops);
        if let Some(norm) = logged.grad_norm {
            record = record.with("grad_norm", norm as f64);
        }
        let evaluate = step.is_multiple_of(s.eval_every) || step == s.steps;
        if evaluate {
            let val = validation_loss(&self.model, &self.data, s)?;
            record.val_loss = Some(val);
            self.last_val_loss = Some(val);
            let stage = self.state.stage;
            self.evaluations.push(Evaluation { step, val_loss: val, flops, params, stage });
        }
        self.metrics.write(&record)?;
        self.progress.update(step, logged.loss, logged.lr as f64, tokens_per_sec);
        if evaluate {
            self.say(format!(
                "step {step:>6}: train loss {:.4}, val loss {:.4}",
                logged.loss,
                record.val_loss.unwrap_or(f64::NAN)
            ));
            redraw_plot(self.dir, self.settings.arch)?;
        }
        Ok(())
    }

    fn save(&self) -> Result<()> {
        save(self.dir, &self.model, &self.optimizer, &self.state)
    }

    /// Closes the progress bar and says how the run ended.
    /// `redraw`: the plot is redrawn unless the run stopped in the middle of a step (its last
    /// step's metrics line was drawn at its evaluation, if it had one).
    fn finish(self, interrupted: bool, redraw: bool) -> Result<TrainSummary> {
        if redraw {
            redraw_plot(self.dir, self.settings.arch)?;
        }
        self.progress.finish();
        if interrupted {
            self.say(format!(
                "stopped: saved the run at step {} in {}",
                self.state.step,
                self.dir.display()
            ));
        }
        Ok(TrainSummary {
            step: self.state.step,
            steps: self.settings.steps,
            interrupted,
            last_loss: self.last_loss,
            last_val_loss: self.last_val_loss,
            seconds: self.started.elapsed().as_secs_f64(),
            evaluations: self.evaluations,
        })
    }
}

/// A learning rate as the run's messages write it: three significant digits, e.g. `2.75e-3`.
fn rate(lr: f32) -> String {
    let text = format!("{lr:.2e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exponent}")
}

fn run(
    dir: &Path,
    model: TokenFormer,
    optimizer: Optimizer,
    state: TrainState,
    control: TrainControl,
) -> Result<TrainSummary> {
    drive(Run::open(dir, model, optimizer, state, control)?)
}

/// Trains an opened run to its end or to a stop request.
fn drive(mut run: Run<'_>) -> Result<TrainSummary> {
    let steps = run.settings.steps;
    // (interrupted, redraw the plot)
    let (interrupted, redraw) = loop {
        if run.state.step >= steps {
            break (false, true);
        }
        run.grow_if_due()?;
        let Some(logged) = run.step()? else {
            // Stopped in the middle of a step: the checkpoint holds the state as of its start.
            run.save()?;
            break (true, false);
        };
        run.evaluate_and_log(&logged)?;
        let finished = run.state.step == steps;
        let stop = run.control.stop.load(Ordering::SeqCst);
        if run.state.step.is_multiple_of(run.settings.save_every) || finished || stop {
            run.save()?;
        }
        if stop && !finished {
            break (true, true);
        }
    };
    run.finish(interrupted, redraw)
}

/// Loads the model of a checkpoint directory (a run or a bare model) onto `device`.
pub fn load_model(dir: &Path, device: Device) -> Result<TokenFormer> {
    let ckpt = load_checkpoint(dir)?;
    let params = ckpt
        .params
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(device)?)))
        .collect::<Result<Vec<_>>>()?;
    TokenFormer::from_named(ckpt.config, params)
}
