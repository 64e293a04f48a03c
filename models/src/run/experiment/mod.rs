//! `experiment growth`: does growing a TokenFormer save compute against training it from
//! scratch at its final size, and by more than the spread between seeds?
//!
//! Six arms train on the same data, batch shape and token budget B, each in an ordinary run
//! directory (resumable, inspectable with `info`, `eval`, `generate`):
//!
//! - **scratch**: a TokenFormer at the final size, trained from scratch for B tokens;
//! - **grown**: the same TokenFormer started at a quarter of the final token counts (a quarter
//!   of the non-embedding parameters) and grown exactly, by parameter tokens, in equal
//!   increments at the scheduled steps, up to the final size, all within the same B tokens;
//! - **transformer**: a Transformer with the final size's parameter count, B tokens;
//! - **grown-random**: the grown schedule with new tokens drawn at random (`init=random`: the
//!   model's outputs change at each growth, AdamW restarts; τ stays frozen);
//! - **grown-official**: the official code's growth: new tokens drawn at random, τ = √n of the
//!   current token count (`tau=current`), AdamW restarted at each growth;
//! - **grown-frozen**: the grown schedule with `freeze_old`: after each growth only the new
//!   tokens train.
//!
//! Every arm runs once per seed (`--seeds N`: model init and data order), and with `--tune-lr`
//! at its own learning rate, the best of a short sweep run first for each model the arms start
//! from ([`runner`]). The measure is the paper's: training FLOPs (SPEC §2, counted by the
//! trainer) against validation loss on held-out books; the target is scratch's mean final
//! validation loss, and each seed's FLOPs to reach it are interpolated between evaluations
//! ([`report`]). The results go to `results.json`, `results.md` and `loss_vs_flops.png` in the
//! experiment directory. An interrupted experiment re-run with the same command and `--out`
//! continues where it stopped.

mod report;
mod runner;

pub use report::{
    duration, results_table, write_results, ArmSummary, EvalPoint, GrowthMark, LrSweep, Paired,
    Results, SeedRun, Stat, SweepResult,
};
pub use runner::{default_experiment_dir, run_growth_experiment, ExperimentControl};

use crate::config::{ModelConfig, SizeOverrides, TokenGroup};
use crate::growth::{GrowthPoint, TauRule};
use crate::train::{StageLr, TrainSettings};
use crate::{Arch, GrowInit};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use tokenformer_core::{Error, Result};

/// Where the experiment's books are, relative to the repository root (the working directory the
/// command is meant to run from): `train/` and `val/` folders of `.txt` files.
pub const DEFAULT_DATA_DIR: &str = "data/gutenberg";

/// How big the experiment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// The whole pipeline in seconds, on a model too small to say anything (tests).
    Quick,
    /// A 1.08 M-parameter final model (preset `tiny`): about 15 minutes a seed for the six arms
    /// on two CPU cores, and the `--tune-lr` sweep's 15 to 18 shorter runs.
    Small,
    /// Sized for one GPU: a 19 M-parameter final model (preset `small`'s shape with 512/512/2048
    /// tokens).
    Medium,
}

impl Scale {
    pub fn name(self) -> &'static str {
        match self {
            Scale::Quick => "quick",
            Scale::Small => "small",
            Scale::Medium => "medium",
        }
    }

    /// The model and training shape of the scale.
    fn size(self) -> Size {
        match self {
            Scale::Quick => Size {
                preset: "tiny",
                layers: Some(2),
                final_tokens: [32, 32, 128],
                steps: 120,
                batch: 4,
                seq: 32,
                eval_every: 10,
                eval_windows: 16,
                warmup: 10,
                lr: None,
            },
            Scale::Small => Size {
                preset: "tiny",
                layers: None,
                final_tokens: [128, 128, 512],
                steps: 1600,
                batch: 16,
                seq: 128,
                eval_every: 50,
                eval_windows: 256,
                warmup: 30,
                lr: None,
            },
            // 800 × 32 × 256 = 6.6 M tokens: one pass over the shipped books. The learning rate
            // is nanoGPT's for this shape (d = 384, L = 6).
            Scale::Medium => Size {
                preset: "small",
                layers: None,
                final_tokens: [512, 512, 2048],
                steps: 800,
                batch: 32,
                seq: 256,
                eval_every: 25,
                eval_windows: 256,
                warmup: 40,
                lr: Some((1e-3, 1e-4)),
            },
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scale {
    type Err = Error;
    fn from_str(s: &str) -> Result<Scale> {
        [Scale::Quick, Scale::Small, Scale::Medium].into_iter().find(|x| x.name() == s).ok_or_else(
            || Error::invalid(format!("--scale must be small or medium (or --quick), got '{s}'")),
        )
    }
}

/// The model and training shape of a scale. The final model is `preset` with `final_tokens`
/// (qkv, proj, ffn) and, if set, `layers`; the grown arms start at a quarter of those counts.
struct Size {
    preset: &'static str,
    layers: Option<usize>,
    final_tokens: [usize; 3],
    steps: u64,
    batch: usize,
    seq: usize,
    eval_every: u64,
    eval_windows: usize,
    warmup: u64,
    /// (peak, final) learning rate; `None`: the trainer's defaults.
    lr: Option<(f32, f32)>,
}

/// The learning rates a sweep tries, as multiples of the scale's rate: a factor of 2 apart.
pub const LR_FACTORS: [f32; 5] = [0.25, 0.5, 1.0, 2.0, 4.0];

/// Every arm's name, in the order the arms run.
const ARM_NAMES: [&str; 7] = [
    "scratch",
    "grown",
    "transformer",
    "grown-random",
    "grown-official",
    "grown-frozen",
    "scratch-tau",
];

/// The most seeds an experiment takes (each is a full run of every arm).
const MAX_SEEDS: usize = 100;

/// A sweep run trains for this share of the arms' steps (its cosine ends there).
const SWEEP_SHARE: u64 = 4;

/// What to run: the scale, the seeds, the data, and the growth schedule of the grown arms.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scale: Scale,
    /// The first seed; seed k (0-based) of `seeds` is `seed + k`.
    pub seed: u64,
    /// How many seeds every arm runs with (model init and data order).
    pub seeds: usize,
    /// Sweep the learning rate of each model the arms start from first, and train every arm at
    /// its own best rate (see [`Plan::sweep_runs`]).
    pub tune_lr: bool,
    /// A folder with `train/` and `val/` subfolders of `.txt` files.
    pub data_dir: PathBuf,
    /// Growths from the base to the final size (each adds an equal share of the tokens).
    pub growths: usize,
    /// The share of the steps the base model trains before the first growth; the other stages
    /// share the rest equally. `None`: all stages equally long.
    pub base_share: Option<f64>,
    /// The learning rate of the grown arms after a growth.
    pub stage_lr: StageLr,
    /// Adds a sixth arm, `scratch-tau`: scratch with the grown arms' τ (see [`Plan::arms`]).
    pub tau_control: bool,
    /// Runs only these arms (by name; `scratch` must be one, its final loss is the target).
    /// Empty: the five, and `scratch-tau` with `tau_control`.
    pub only_arms: Vec<String>,
}

impl Plan {
    /// The default plan of `scale`: three growths, equal stages, one learning-rate schedule over
    /// the whole run (the same schedule as the scratch arm's).
    pub fn new(scale: Scale) -> Plan {
        Plan {
            scale,
            seed: TrainSettings::default().seed,
            seeds: 1,
            tune_lr: false,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            growths: 3,
            base_share: None,
            stage_lr: StageLr::default(),
            tau_control: false,
            only_arms: Vec::new(),
        }
    }

    fn base_share(&self) -> f64 {
        self.base_share.unwrap_or(1.0 / (self.growths as f64 + 1.0))
    }

    /// The final model: every arm but `grown*` starts at it, those end at it.
    pub fn final_config(&self) -> Result<ModelConfig> {
        let size = self.scale.size();
        let [qkv, proj, ffn] = size.final_tokens;
        let sizes = SizeOverrides {
            n_layers: size.layers,
            qkv_tokens: Some(qkv),
            proj_tokens: Some(proj),
            ffn_tokens: Some(ffn),
            ..SizeOverrides::default()
        };
        sizes.apply(&ModelConfig::preset(size.preset)?)
    }

    /// The grown arms' first model: a quarter of the final token counts, the same depth, so a
    /// quarter of the non-embedding parameters; τ's n₀ is these counts, and stays so as it grows.
    pub fn base_config(&self) -> Result<ModelConfig> {
        let last = self.final_config()?;
        let sizes = SizeOverrides {
            qkv_tokens: Some(last.qkv_tokens / 4),
            proj_tokens: Some(last.proj_tokens / 4),
            ffn_tokens: Some(last.ffn_tokens / 4),
            ..SizeOverrides::default()
        };
        sizes.apply(&last)
    }

    /// The steps after which the grown arms grow: the base trains `base_share` of the steps,
    /// the other stages share the rest equally; each step is rounded to a multiple of the
    /// evaluation interval, so the model just before each growth is evaluated.
    pub fn growth_steps(&self) -> Result<Vec<u64>> {
        let size = self.scale.size();
        if self.growths == 0 {
            return Err(Error::invalid("--growths must be at least 1"));
        }
        let share = self.base_share();
        if !(share > 0.0 && share < 1.0) {
            return Err(Error::invalid(format!("--base-share must be in (0, 1), got {share}")));
        }
        // Each growth needs an evaluation of its own before the last step: a count beyond that
        // cannot fit whatever the share, and is refused before anything is allocated for it.
        let most = (size.steps / size.eval_every).saturating_sub(1);
        if self.growths as u64 > most {
            return Err(Error::invalid(format!(
                "--growths {}: at most {most} growths fit {} steps evaluated every {}; use fewer \
                 --growths",
                self.growths, size.steps, size.eval_every
            )));
        }
        let n = self.growths as f64;
        let mut steps: Vec<u64> = Vec::with_capacity(self.growths);
        for k in 0..self.growths {
            let at = size.steps as f64 * (share + (1.0 - share) * k as f64 / n);
            let snapped = (at / size.eval_every as f64).round() as u64 * size.eval_every;
            let previous = steps.last().copied().unwrap_or(0);
            if snapped <= previous || snapped >= size.steps {
                return Err(Error::invalid(format!(
                    "{} growths with a base share of {share} do not fit {} steps evaluated every {} \
                     (two growths would fall at the same evaluation); use fewer --growths",
                    self.growths, size.steps, size.eval_every
                )));
            }
            steps.push(snapped);
        }
        Ok(steps)
    }

    /// The growth schedule of the grown arms: growth k adds the k-th equal share of the tokens
    /// between the base and the final counts (shares rounded so that they add up exactly), its
    /// new tokens drawn as `init` says, τ as `tau` says.
    pub fn growth_points(&self, init: GrowInit, tau: TauRule) -> Result<Vec<GrowthPoint>> {
        let (base, last) = (self.base_config()?, self.final_config()?);
        let n = self.growths;
        let mut options = String::new();
        if init != GrowInit::default() {
            options.push_str(&format!(",init={}", init.name()));
        }
        if tau != TauRule::default() {
            options.push_str(&format!(",tau={}", tau.name()));
        }
        self.growth_steps()?
            .into_iter()
            .enumerate()
            .map(|(k, step)| {
                let amounts: Vec<String> = TokenGroup::ALL
                    .iter()
                    .map(|&g| {
                        let delta = g.counts(&last).0 - g.counts(&base).0;
                        format!("{}=+{}", g.name(), (k + 1) * delta / n - k * delta / n)
                    })
                    .collect();
                format!("{step}:{}{options}", amounts.join(",")).parse()
            })
            .collect()
    }

    /// The seeds every arm runs with.
    pub fn seed_list(&self) -> Vec<u64> {
        (0..self.seeds as u64).map(|k| self.seed.wrapping_add(k)).collect()
    }

    /// The settings every arm shares (at the scale's learning rate and the first seed).
    fn common_settings(&self) -> TrainSettings {
        let size = self.scale.size();
        let defaults = TrainSettings::default();
        let (lr, min_lr) = size.lr.unwrap_or((defaults.lr, defaults.min_lr));
        TrainSettings {
            lr,
            min_lr,
            preset: size.preset.into(),
            data: vec![self.data_dir.join("train")],
            val_data: vec![self.data_dir.join("val")],
            tokenizer: "byte".into(),
            steps: size.steps,
            batch: size.batch,
            seq: size.seq,
            grad_accum: 1,
            warmup: size.warmup,
            seed: self.seed,
            eval_every: size.eval_every,
            eval_windows: size.eval_windows,
            val_spread: true,
            // A killed experiment loses at most this much of an arm.
            save_every: 4 * size.eval_every,
            ..defaults
        }
    }

    /// The six arms, in the order they run, and with `tau_control` a seventh: `scratch-tau`,
    /// the final model trained from scratch with the τ = √n₀ of the grown arms (n₀ the base's
    /// token counts, where scratch has the final counts). Exact growth keeps τ at its creation
    /// value, so `grown` ends with a smaller τ than scratch: this arm tells what growth did from
    /// what that τ does. `only_arms`, if given, chooses among all seven. The settings are at the
    /// scale's learning rate and the first seed; the runner sets each arm's own.
    pub fn arms(&self) -> Result<Vec<Arm>> {
        let common = self.common_settings();
        let last = self.final_config()?;
        let grown = |init: GrowInit, tau: TauRule, freeze_old: bool| -> Result<TrainSettings> {
            Ok(TrainSettings {
                model: Some(self.base_config()?),
                grow_at: self.growth_points(init, tau)?,
                stage_lr: self.stage_lr,
                freeze_old,
                ..common.clone()
            })
        };
        let frozen = TauRule::Frozen;
        let mut arms = vec![
            Arm {
                name: "scratch",
                what: "TokenFormer at the final size, from scratch",
                lr_model: SweepModel::TokenFormer,
                settings: TrainSettings { model: Some(last.clone()), ..common.clone() },
            },
            Arm {
                name: "grown",
                what: "TokenFormer from a quarter of the final tokens, grown exactly",
                lr_model: SweepModel::TokenFormerBase,
                settings: grown(GrowInit::Exact, frozen, false)?,
            },
            Arm {
                name: "transformer",
                what: "Transformer with the final size's parameter count, from scratch",
                lr_model: SweepModel::Transformer,
                settings: TrainSettings {
                    model: Some(last.clone()),
                    arch: Arch::Transformer,
                    d_ff: Some(last.matching_transformer().d_ff),
                    ..common.clone()
                },
            },
            Arm {
                name: "grown-random",
                what: "as grown, new tokens drawn at random and AdamW restarted (init=random), τ \
                       frozen",
                lr_model: SweepModel::TokenFormerBase,
                settings: grown(GrowInit::Random, frozen, false)?,
            },
            Arm {
                name: "grown-official",
                what: "the official growth: new tokens drawn at random, τ = √n of the current \
                       token count (tau=current), AdamW restarted",
                lr_model: SweepModel::TokenFormerBase,
                settings: grown(GrowInit::Random, TauRule::Current, false)?,
            },
            Arm {
                name: "grown-frozen",
                what: "as grown, only the new tokens train after each growth (freeze_old)",
                lr_model: SweepModel::TokenFormerBase,
                settings: grown(GrowInit::Exact, frozen, true)?,
            },
        ];
        if self.tau_control || !self.only_arms.is_empty() {
            let base = self.base_config()?;
            let mut model = last.clone();
            (model.qkv_scale_tokens, model.proj_scale_tokens, model.ffn_scale_tokens) =
                (base.qkv_scale_tokens, base.proj_scale_tokens, base.ffn_scale_tokens);
            arms.push(Arm {
                name: "scratch-tau",
                what: "as scratch, with the grown arms' τ (n₀ = the base's token counts)",
                lr_model: SweepModel::TokenFormer,
                settings: TrainSettings { model: Some(model), ..common.clone() },
            });
        }
        if self.only_arms.is_empty() {
            return Ok(arms);
        }
        let names: Vec<&str> = arms.iter().map(|a| a.name).collect();
        if let Some(unknown) = self.only_arms.iter().find(|n| !names.contains(&n.as_str())) {
            return Err(Error::invalid(format!(
                "--arms: no arm '{unknown}' (the arms are {})",
                names.join(", ")
            )));
        }
        if !self.only_arms.iter().any(|n| n == "scratch") {
            return Err(Error::invalid(
                "--arms must include scratch: its mean final validation loss is the target",
            ));
        }
        let wanted = |arm: &Arm| self.only_arms.iter().any(|n| n == arm.name);
        Ok(arms
            .into_iter()
            .filter(|arm| wanted(arm) || (self.tau_control && arm.name == "scratch-tau"))
            .collect())
    }

    /// The sweep's first runs with `--tune-lr`: for each model the chosen arms start from,
    /// every rate of [`Plan::lr_grid`]. Empty without `tune_lr`. (A model whose best rate is at
    /// an end of the grid goes on past it: see [`SweepRun::beyond_the_edge`].)
    pub fn sweep_runs(&self) -> Result<Vec<SweepRun>> {
        if !self.tune_lr {
            return Ok(Vec::new());
        }
        let arms = self.arms()?;
        let mut runs = Vec::new();
        for model in SweepModel::ALL {
            if arms.iter().any(|a| a.lr_model == model) {
                for lr in self.lr_grid() {
                    runs.push(self.sweep_run(model, lr)?);
                }
            }
        }
        Ok(runs)
    }

    /// One run of the sweep: `model` at peak rate `lr`, at the first seed, for a quarter of the
    /// arms' steps (a warmup and a cosine to a tenth of the rate within them), evaluated once at
    /// the end.
    pub fn sweep_run(&self, model: SweepModel, lr: f32) -> Result<SweepRun> {
        let arms = self.arms()?;
        let arm = arms.iter().find(|a| a.lr_model == model).ok_or_else(|| {
            Error::invalid(format!("lr sweep: no arm starts from {}", model.name()))
        })?;
        let size = self.scale.size();
        let steps = (size.steps / SWEEP_SHARE).max(1);
        // The grown arms' first model: their settings without the growths.
        let start = TrainSettings {
            grow_at: Vec::new(),
            freeze_old: false,
            stage_lr: StageLr::default(),
            ..arm.settings.clone()
        };
        let settings = TrainSettings {
            steps,
            eval_every: steps,
            save_every: steps,
            warmup: size.warmup.min(steps / 4),
            ..with_lr(&start, lr)
        };
        Ok(SweepRun { model, lr, settings })
    }

    /// The rates a sweep tries: the scale's rate times each of [`LR_FACTORS`].
    pub fn lr_grid(&self) -> Vec<f32> {
        let lr = self.common_settings().lr;
        LR_FACTORS.iter().map(|f| lr * f).collect()
    }

    /// The command line that runs this plan.
    pub fn command_line(&self) -> String {
        let mut cmd = String::from("tokenformer experiment growth");
        match self.scale {
            Scale::Quick => cmd.push_str(" --quick"),
            scale => cmd.push_str(&format!(" --scale {scale}")),
        }
        cmd.push_str(&format!(" --seed {}", self.seed));
        let default = Plan::new(self.scale);
        if self.seeds != default.seeds {
            cmd.push_str(&format!(" --seeds {}", self.seeds));
        }
        if self.tune_lr {
            cmd.push_str(" --tune-lr");
        }
        if self.growths != default.growths {
            cmd.push_str(&format!(" --growths {}", self.growths));
        }
        if let Some(share) = self.base_share {
            cmd.push_str(&format!(" --base-share {share}"));
        }
        if self.stage_lr != default.stage_lr {
            cmd.push_str(&format!(" --stage-lr {}", self.stage_lr));
        }
        if self.tau_control {
            cmd.push_str(" --tau-control");
        }
        if !self.only_arms.is_empty() {
            // In the order the arms run, so that the same choice is the same experiment.
            let order = |name: &String| ARM_NAMES.iter().position(|a| a == name);
            let mut arms = self.only_arms.clone();
            arms.sort_by_key(order);
            arms.dedup();
            cmd.push_str(&format!(" --arms {}", arms.join(",")));
        }
        if self.data_dir != default.data_dir {
            cmd.push_str(&format!(" --data-dir {}", self.data_dir.display()));
        }
        cmd
    }

    /// Refuses a plan that cannot run, in one line, before anything is written: the seed
    /// count, the growth schedule, the arms and the data folder.
    pub fn check(&self) -> Result<()> {
        if !(1..=MAX_SEEDS).contains(&self.seeds) {
            return Err(Error::invalid(format!(
                "--seeds must be 1 to {MAX_SEEDS}, got {}",
                self.seeds
            )));
        }
        self.growth_steps()?;
        self.arms()?;
        self.check_data()
    }

    /// Refuses a data folder without `train/` and `val/` in one line, naming `--data-dir`.
    pub fn check_data(&self) -> Result<()> {
        let dir = &self.data_dir;
        for sub in ["train", "val"] {
            if !dir.join(sub).is_dir() {
                return Err(Error::invalid(format!(
                    "experiment data not found: {} has no {sub}/ folder (run from the repository \
                     root, or give --data-dir DIR with train/ and val/ folders of .txt books)",
                    dir.display()
                )));
            }
        }
        Ok(())
    }
}

/// `settings` at peak rate `lr`, its floor moved with it (the same ratio of floor to peak).
fn with_lr(settings: &TrainSettings, lr: f32) -> TrainSettings {
    let min_lr = lr * (settings.min_lr / settings.lr);
    TrainSettings { lr, min_lr, ..settings.clone() }
}

/// One arm: a name (also its run directory's), what it is, the model whose swept rate it trains
/// at under `--tune-lr`, and its training settings.
pub struct Arm {
    pub name: &'static str,
    pub what: &'static str,
    pub lr_model: SweepModel,
    pub settings: TrainSettings,
}

impl Arm {
    /// The arm's settings for one seed at peak rate `lr`.
    pub fn settings_for(&self, seed: u64, lr: f32) -> TrainSettings {
        TrainSettings { seed, ..with_lr(&self.settings, lr) }
    }
}

/// One run of the learning-rate sweep.
#[derive(Clone)]
pub struct SweepRun {
    pub model: SweepModel,
    pub lr: f32,
    pub settings: TrainSettings,
}

/// A model whose best rate is at an end of the rates tried gets at most this many more, a
/// factor of 2 at a time past that end.
pub const MAX_EXTRA_RATES: usize = 3;

impl SweepRun {
    /// Its run directory's name, e.g. `tokenformer-base-lr0.005`.
    pub fn name(&self) -> String {
        format!("{}-lr{}", self.model.name(), self.lr)
    }

    /// The next rate to try for a model, given its finished runs as (rate, final validation
    /// loss or `None` for diverged): half the lowest rate when the lowest is the best, twice
    /// the highest when the highest is; `None` when the best lies inside (or none converged).
    /// The best is the lowest loss, the lower rate on a tie.
    pub fn beyond_the_edge(tried: &[(f32, Option<f64>)]) -> Option<f32> {
        let best = best_rate(tried)?;
        let lowest = tried.iter().map(|t| t.0).fold(f32::INFINITY, f32::min);
        let highest = tried.iter().map(|t| t.0).fold(f32::NEG_INFINITY, f32::max);
        if best == lowest {
            Some(lowest / 2.0)
        } else if best == highest {
            Some(highest * 2.0)
        } else {
            None
        }
    }
}

/// The rate with the lowest final loss among `tried` (the lower rate on a tie); `None` if every
/// run diverged.
pub fn best_rate(tried: &[(f32, Option<f64>)]) -> Option<f32> {
    tried
        .iter()
        .filter_map(|&(lr, loss)| Some((lr, loss.filter(|l| l.is_finite())?)))
        .fold(None, |best: Option<(f32, f64)>, (lr, l)| match best {
            Some((b_lr, b)) if b < l || (b == l && b_lr < lr) => best,
            _ => Some((lr, l)),
        })
        .map(|b| b.0)
}

/// A model the arms start from, whose learning rate `--tune-lr` sweeps.
/// Serialized by [`SweepModel::name`], which also names its sweep runs' directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SweepModel {
    /// The final TokenFormer: scratch (and scratch-tau).
    #[serde(rename = "tokenformer")]
    TokenFormer,
    /// The grown arms' base, a quarter of the final tokens: every grown arm.
    #[serde(rename = "tokenformer-base")]
    TokenFormerBase,
    /// The Transformer of the final size's parameter count.
    #[serde(rename = "transformer")]
    Transformer,
}

impl SweepModel {
    pub const ALL: [SweepModel; 3] =
        [SweepModel::TokenFormer, SweepModel::TokenFormerBase, SweepModel::Transformer];

    pub fn name(self) -> &'static str {
        match self {
            SweepModel::TokenFormer => "tokenformer",
            SweepModel::TokenFormerBase => "tokenformer-base",
            SweepModel::Transformer => "transformer",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            SweepModel::TokenFormer => "TokenFormer, final size (scratch, scratch-tau)",
            SweepModel::TokenFormerBase => "TokenFormer, the grown arms' base (every grown arm)",
            SweepModel::Transformer => "Transformer, final size (transformer)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn non_embedding(c: &ModelConfig) -> usize {
        c.param_count() - c.vocab_size * c.d_model - 2 * c.d_model
    }

    #[test]
    fn grown_arms_start_at_a_quarter_and_end_at_the_final_size() {
        for scale in [Scale::Quick, Scale::Small, Scale::Medium] {
            for (growths, share) in [(3, None), (6, Some(0.5))] {
                let plan = Plan { growths, base_share: share, ..Plan::new(scale) };
                let (base, last) = (plan.base_config().unwrap(), plan.final_config().unwrap());
                assert_eq!(4 * non_embedding(&base), non_embedding(&last), "{scale}");
                let arms = plan.arms().unwrap();
                assert_eq!(arms.len(), 6);
                for arm in &arms {
                    let s = &arm.settings;
                    // Same data, seed, batch shape and budget for every arm.
                    assert_eq!(
                        (s.steps, s.batch, s.seq, s.seed),
                        (
                            arms[0].settings.steps,
                            arms[0].settings.batch,
                            arms[0].settings.seq,
                            plan.seed
                        )
                    );
                    s.validate().unwrap();
                    let start = s.model_config().unwrap();
                    let end = s
                        .growth_plan(&start)
                        .unwrap()
                        .last()
                        .map_or(start.clone(), |g| g.1.clone());
                    let tokens = |c: &ModelConfig| (c.qkv_tokens, c.proj_tokens, c.ffn_tokens);
                    match arm.name {
                        // The toy scale's attention alone outweighs its TokenFormer.
                        "transformer" if scale != Scale::Quick => {
                            let diff = end.param_count().abs_diff(last.param_count());
                            assert!(diff <= last.n_layers * (2 * last.d_model + 1), "{diff}");
                        }
                        "transformer" => {}
                        _ => {
                            assert_eq!(tokens(&end), tokens(&last), "{}", arm.name);
                            assert_eq!(end.param_count(), last.param_count(), "{}", arm.name);
                        }
                    }
                    if arm.name.starts_with("grown") {
                        assert_eq!(s.grow_at.len(), growths);
                        assert_eq!(start, base);
                    }
                }
                let targets = |i: usize| arms[i].settings.grow_at.iter().map(|g| &g.target);
                assert!(targets(1).all(|t| (t.init, t.tau) == (GrowInit::Exact, TauRule::Frozen)));
                assert!(targets(3).all(|t| (t.init, t.tau) == (GrowInit::Random, TauRule::Frozen)));
                assert!(targets(4).all(|t| (t.init, t.tau) == (GrowInit::Random, TauRule::Current)));
                assert!(arms[5].settings.freeze_old && !arms[1].settings.freeze_old);
                let with_control = Plan { tau_control: true, ..plan.clone() }.arms().unwrap();
                assert_eq!(with_control.len(), 7);
                let control = with_control[6].settings.model_config().unwrap();
                let scales = |c: &ModelConfig| (c.qkv_scale_tokens, c.ffn_scale_tokens);
                assert_eq!(scales(&control), scales(&base));
                assert_eq!(control.param_count(), last.param_count());
                let only = |names: &[&str]| Plan {
                    only_arms: names.iter().map(|n| n.to_string()).collect(),
                    ..plan.clone()
                };
                let chosen = only(&["scratch-tau", "scratch"]).arms().unwrap();
                let chosen: Vec<&str> = chosen.iter().map(|a| a.name).collect();
                assert_eq!(chosen, ["scratch", "scratch-tau"]);
                assert!(only(&["grown"]).arms().is_err());
                assert!(only(&["scratch", "grown-twice"]).arms().is_err());
            }
        }
    }

    #[test]
    fn growth_steps_split_the_run_and_fall_on_evaluations() {
        let plan = Plan::new(Scale::Small);
        assert_eq!(plan.growth_steps().unwrap(), [400, 800, 1200]);
        let paper = Plan { growths: 6, base_share: Some(0.5), ..Plan::new(Scale::Small) };
        assert_eq!(paper.growth_steps().unwrap(), [800, 950, 1050, 1200, 1350, 1450]);
        // Amounts add up exactly when the token gap does not divide evenly.
        let seven = Plan { growths: 7, base_share: Some(0.3), ..Plan::new(Scale::Small) };
        let points = seven.growth_points(GrowInit::Exact, TauRule::Frozen).unwrap();
        let start = seven.base_config().unwrap();
        let settings = TrainSettings { grow_at: points, ..TrainSettings::default() };
        let grown = settings.growth_plan(&start).unwrap();
        assert_eq!(grown.last().unwrap().1.ffn_tokens, 512);
        let crowded = Plan { growths: 40, ..Plan::new(Scale::Quick) };
        assert!(crowded.growth_steps().unwrap_err().to_string().contains("fewer --growths"));
        let bad = Plan { base_share: Some(1.0), ..Plan::new(Scale::Small) };
        assert!(bad.growth_steps().is_err());
        assert_eq!(
            paper.command_line(),
            "tokenformer experiment growth --scale small --seed 1337 --growths 6 --base-share 0.5"
        );
    }

    #[test]
    fn the_sweep_runs_each_starting_model_at_every_rate_and_the_arms_take_their_models_rate() {
        let plan = Plan { tune_lr: true, seeds: 3, ..Plan::new(Scale::Small) };
        assert_eq!(plan.seed_list(), [1337, 1338, 1339]);
        assert_eq!(plan.lr_grid(), [1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2]);
        let runs = plan.sweep_runs().unwrap();
        assert_eq!(runs.len(), 3 * LR_FACTORS.len());
        let arms = plan.arms().unwrap();
        for run in &runs {
            let s = &run.settings;
            s.validate().unwrap();
            assert_eq!((s.steps, s.eval_every, s.seed, s.lr), (400, 400, 1337, run.lr));
            assert!(s.grow_at.is_empty() && !s.freeze_old);
            assert!((s.min_lr / s.lr - 0.1).abs() < 1e-6, "{}", run.name());
            // The model the sweep trains is the one its arms start from.
            let arm = arms.iter().find(|a| a.lr_model == run.model).unwrap();
            assert_eq!(s.model_config().unwrap(), arm.settings.model_config().unwrap());
            assert_eq!(s.arch, arm.settings.arch);
        }
        assert_eq!(runs[7].name(), "tokenformer-base-lr0.005");
        // Past an end of the grid while the best is there; inside, the sweep is done.
        let at = |losses: [f64; 3]| -> Vec<(f32, Option<f64>)> {
            [1e-3, 2e-3, 4e-3].into_iter().zip(losses.map(Some)).collect()
        };
        assert_eq!(SweepRun::beyond_the_edge(&at([1.0, 2.0, 3.0])), Some(5e-4));
        assert_eq!(SweepRun::beyond_the_edge(&at([3.0, 2.0, 1.0])), Some(8e-3));
        assert_eq!(SweepRun::beyond_the_edge(&at([3.0, 1.0, 2.0])), None);
        assert_eq!(best_rate(&at([1.0, 1.0, 2.0])), Some(1e-3), "the lower rate on a tie");
        let diverged = [(1e-3, Some(2.0)), (2e-3, Some(1.0)), (4e-3, None)];
        assert_eq!(SweepRun::beyond_the_edge(&diverged), None, "a higher rate diverged");
        assert_eq!(SweepRun::beyond_the_edge(&[(1e-3, None)]), None);
        let grown = &arms[1].settings_for(1339, 1e-2);
        assert_eq!((grown.seed, grown.lr, grown.min_lr), (1339, 1e-2, 1e-3));
        assert!(Plan::new(Scale::Small).sweep_runs().unwrap().is_empty());
        assert_eq!(
            plan.command_line(),
            "tokenformer experiment growth --scale small --seed 1337 --seeds 3 --tune-lr"
        );
        // Only the models of the arms chosen are swept.
        let two = Plan { only_arms: vec!["scratch".into(), "transformer".into()], ..plan };
        let models: Vec<SweepModel> = two.sweep_runs().unwrap().iter().map(|r| r.model).collect();
        assert!(!models.contains(&SweepModel::TokenFormerBase) && models.len() == 10);
        // The same arms in another order are the same experiment.
        let order = |names: &[&str]| Plan {
            only_arms: names.iter().map(|n| n.to_string()).collect(),
            ..Plan::new(Scale::Small)
        };
        assert_eq!(
            order(&["grown", "scratch"]).command_line(),
            order(&["scratch", "grown"]).command_line()
        );
    }

    #[test]
    fn durations_read_as_minutes() {
        assert_eq!(duration(4.4), "4s");
        assert_eq!(duration(754.0), "12m 34s");
        assert_eq!(duration(3725.0), "1h 02m");
    }
}
