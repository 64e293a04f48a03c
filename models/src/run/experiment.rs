//! `experiment growth`: does growing a TokenFormer save compute against training it from
//! scratch at its final size?
//!
//! Five arms train on the same data, with the same seed, batch shape and token budget B, each
//! in an ordinary run directory (resumable, inspectable with `info`, `eval`, `generate`):
//!
//! - **scratch**: a TokenFormer at the final size, trained from scratch for B tokens;
//! - **grown**: the same TokenFormer started at a quarter of the final token counts (a quarter
//!   of the non-embedding parameters) and grown exactly, by parameter tokens, in equal
//!   increments at the scheduled steps, up to the final size, all within the same B tokens;
//! - **transformer**: a Transformer with the final size's parameter count, B tokens;
//! - **grown-random**: the grown schedule with new tokens drawn at random (`init=random`: the
//!   model's outputs change at each growth; τ stays frozen, unlike the official recipe);
//! - **grown-frozen**: the grown schedule with `freeze_old`: after each growth only the new
//!   tokens train.
//!
//! The measure is the paper's: training FLOPs (SPEC §2, counted by the trainer) against
//! validation loss on held-out books. Each arm's FLOPs at which it first reached scratch's final
//! validation loss says how much compute growth saved, if any. The results go to `results.json`,
//! `results.md` and `loss_vs_flops.png` in the experiment directory.

use crate::config::{ModelConfig, TokenGroup};
use crate::data::list_files;
use crate::files::replace_file;
use crate::growth::GrowthPoint;
use crate::plot::{plot_curves, Curve, CurvesChart};
use crate::progress::{thousands, Progress};
use crate::train::{check_new_run, train_new, Evaluation, StageLr, TrainControl, TrainSettings};
use crate::{Arch, GrowInit};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenformer_core::{Device, Error, Result};

/// Where the experiment's books are, relative to the repository root (the working directory the
/// command is meant to run from): `train/` and `val/` folders of `.txt` files.
pub const DEFAULT_DATA_DIR: &str = "data/gutenberg";

/// How big the experiment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// The whole pipeline in seconds, on a model too small to say anything (tests).
    Quick,
    /// Under half an hour on two CPU cores: a 1.08 M-parameter final model (preset `tiny`).
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

/// What to run: the scale, the seed, the data, and the growth schedule of the grown arms.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scale: Scale,
    pub seed: u64,
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
        let mut config = ModelConfig::preset(size.preset)?;
        if let Some(layers) = size.layers {
            config.n_layers = layers;
        }
        for (group, n) in TokenGroup::ALL.into_iter().zip(size.final_tokens) {
            *group.tokens_mut(&mut config) = n;
        }
        (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens) =
            (config.qkv_tokens, config.proj_tokens, config.ffn_tokens);
        Ok(config)
    }

    /// The grown arms' first model: a quarter of the final token counts, the same depth, so a
    /// quarter of the non-embedding parameters; τ's n₀ is these counts, and stays so as it grows.
    pub fn base_config(&self) -> Result<ModelConfig> {
        let mut config = self.final_config()?;
        for group in TokenGroup::ALL {
            *group.tokens_mut(&mut config) /= 4;
        }
        (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens) =
            (config.qkv_tokens, config.proj_tokens, config.ffn_tokens);
        Ok(config)
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
    /// between the base and the final counts (shares rounded so that they add up exactly).
    pub fn growth_points(&self, init: GrowInit) -> Result<Vec<GrowthPoint>> {
        let (base, last) = (self.base_config()?, self.final_config()?);
        let n = self.growths;
        let init = match init {
            GrowInit::Exact => String::new(),
            GrowInit::Random => ",init=random".to_string(),
        };
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
                format!("{step}:{}{init}", amounts.join(",")).parse()
            })
            .collect()
    }

    /// The settings every arm shares.
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
            // One checkpoint, at the end (and at a stop request).
            save_every: size.steps,
            ..defaults
        }
    }

    /// The five arms, in the order they run, and with `tau_control` a sixth: `scratch-tau`,
    /// the final model trained from scratch with the τ = √n₀ of the grown arms (n₀ the base's
    /// token counts, where scratch has the final counts). Growth keeps τ at its creation value,
    /// so the grown arms end with a smaller τ than scratch: this arm tells what growth did from
    /// what that τ does. `only_arms`, if given, chooses among all six.
    pub fn arms(&self) -> Result<Vec<Arm>> {
        let common = self.common_settings();
        let last = self.final_config()?;
        let grown = |init: GrowInit, freeze_old: bool| -> Result<TrainSettings> {
            Ok(TrainSettings {
                model: Some(self.base_config()?),
                grow_at: self.growth_points(init)?,
                stage_lr: self.stage_lr,
                freeze_old,
                ..common.clone()
            })
        };
        let mut arms = vec![
            Arm {
                name: "scratch",
                what: "TokenFormer at the final size, from scratch",
                settings: TrainSettings { model: Some(last.clone()), ..common.clone() },
            },
            Arm {
                name: "grown",
                what: "TokenFormer from a quarter of the final tokens, grown exactly",
                settings: grown(GrowInit::Exact, false)?,
            },
            Arm {
                name: "transformer",
                what: "Transformer with the final size's parameter count, from scratch",
                settings: TrainSettings {
                    model: Some(last.clone()),
                    arch: Arch::Transformer,
                    d_ff: Some(last.matching_transformer().d_ff),
                    ..common.clone()
                },
            },
            Arm {
                name: "grown-random",
                what: "as grown, new tokens drawn at random (init=random)",
                settings: grown(GrowInit::Random, false)?,
            },
            Arm {
                name: "grown-frozen",
                what: "as grown, only the new tokens train after each growth (freeze_old)",
                settings: grown(GrowInit::Exact, true)?,
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
                "--arms must include scratch: its final validation loss is the target",
            ));
        }
        let wanted = |arm: &Arm| self.only_arms.iter().any(|n| n == arm.name);
        Ok(arms
            .into_iter()
            .filter(|arm| wanted(arm) || (self.tau_control && arm.name == "scratch-tau"))
            .collect())
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
        if self.growths != default.growths {
            cmd.push_str(&format!(" --growths {}", self.growths));
        }
        if let Some(share) = self.base_share {
            cmd.push_str(&format!(" --base-share {share}"));
        }
        if self.stage_lr != default.stage_lr {
            cmd.push_str(&format!(" --stage-lr {}", stage_lr_name(self.stage_lr)));
        }
        if self.tau_control {
            cmd.push_str(" --tau-control");
        }
        if !self.only_arms.is_empty() {
            cmd.push_str(&format!(" --arms {}", self.only_arms.join(",")));
        }
        if self.data_dir != default.data_dir {
            cmd.push_str(&format!(" --data-dir {}", self.data_dir.display()));
        }
        cmd
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

fn stage_lr_name(stage_lr: StageLr) -> &'static str {
    match stage_lr {
        StageLr::Restart => "restart",
        StageLr::Continue => "continue",
    }
}

/// One arm: a name (also its run directory's), what it is, and its training settings.
pub struct Arm {
    pub name: &'static str,
    pub what: &'static str,
    pub settings: TrainSettings,
}

/// A growth of an arm, where it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrowthMark {
    /// The growth came after this step.
    pub step: u64,
    /// Training FLOPs spent before it.
    pub flops: f64,
    /// The validation loss of the model just before it.
    pub val_loss: f64,
    pub params_after: usize,
}

/// One validation point of an arm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalPoint {
    pub step: u64,
    pub flops: f64,
    pub val_loss: f64,
    pub params: usize,
    pub stage: u64,
}

/// What an arm did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArmResult {
    pub name: String,
    pub what: String,
    pub arch: String,
    /// The run directory, relative to the experiment directory.
    pub dir: String,
    pub params_start: usize,
    pub params: usize,
    pub tokens: u64,
    pub flops: f64,
    pub final_val_loss: f64,
    /// FLOPs spent when the arm was first evaluated at or below scratch's final validation
    /// loss; `None`: never.
    pub flops_to_target: Option<f64>,
    pub step_to_target: Option<u64>,
    pub wall_seconds: f64,
    pub growths: Vec<GrowthMark>,
    pub evaluations: Vec<EvalPoint>,
}

/// The data the arms read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataInfo {
    pub dir: String,
    pub tokenizer: String,
    /// (file name, bytes) of the training and the validation books.
    pub train: Vec<(String, u64)>,
    pub val: Vec<(String, u64)>,
    /// Validation windows per evaluation (spread evenly over the validation books) and their
    /// length.
    pub val_windows: usize,
    pub val_window_tokens: usize,
}

/// Everything `results.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Results {
    pub experiment: String,
    pub command: String,
    pub scale: Scale,
    pub seed: u64,
    pub device: String,
    pub data: DataInfo,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    /// B: the training tokens of every arm.
    pub budget_tokens: u64,
    pub final_model: ModelConfig,
    pub base_model: ModelConfig,
    /// The grown arms' schedule, as `train --grow-at` takes it (the exact arms'; the random arm
    /// adds `init=random`).
    pub grow_at: Vec<String>,
    pub stage_lr: String,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    /// Scratch's final validation loss: what every arm is measured against.
    pub target_val_loss: f64,
    pub arms: Vec<ArmResult>,
}

/// How the caller stops the experiment (the signal handlers set `stop`), and whether it shows
/// progress.
#[derive(Default)]
pub struct ExperimentControl {
    pub stop: Arc<AtomicBool>,
    pub quiet: bool,
}

/// The first `runs/experiment-growth-N` that does not exist yet.
pub fn default_experiment_dir() -> PathBuf {
    (1..)
        .map(|n| PathBuf::from(format!("runs/experiment-growth-{n}")))
        .find(|p| !p.exists())
        .expect("unbounded")
}

/// Runs every arm of `plan` in `out` (which must not exist or be empty) and writes the results.
/// Returns `None` when a stop request ended it early (the arm that was running is saved and
/// can be resumed with `train --resume`; no results are written).
pub fn run_growth_experiment(
    out: &Path,
    plan: &Plan,
    device: Device,
    control: ExperimentControl,
) -> Result<Option<Results>> {
    plan.check_data()?;
    let arms = plan.arms()?;
    if out.exists() {
        let mut entries =
            std::fs::read_dir(out).map_err(|e| Error::io(out.display(), e.to_string()))?;
        if entries.next().is_some() {
            return Err(Error::invalid(format!(
                "{} is not empty; the experiment needs a new directory (choose another --out)",
                out.display()
            )));
        }
    }
    // Every arm's settings are checked before the first one trains.
    for arm in &arms {
        check_new_run(&out.join(arm.name), &arm.settings)
            .map_err(|e| Error::invalid(format!("arm {}: {e}", arm.name)))?;
    }
    let data = data_info(plan)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display(), e.to_string()))?;

    let size = plan.scale.size();
    let say = |bar: &Progress, line: String| {
        if !control.quiet {
            bar.println(line)
        }
    };
    let total_steps = size.steps * arms.len() as u64;
    let bar = if control.quiet { Progress::hidden() } else { Progress::new(total_steps, 0) };
    let (last, base) = (plan.final_config()?, plan.base_config()?);
    let growth_steps = plan.growth_steps()?;
    say(
        &bar,
        format!(
            "experiment growth in {}, scale {}, seed {}: {} arms of {} tokens ({} steps of {}×{}) \
             on {} ({} training, {} validation bytes, byte-level)",
            out.display(),
            plan.scale,
            plan.seed,
            arms.len(),
            thousands(size.steps as usize * size.batch * size.seq),
            size.steps,
            size.batch,
            size.seq,
            plan.data_dir.display(),
            thousands(data.train.iter().map(|f| f.1 as usize).sum()),
            thousands(data.val.iter().map(|f| f.1 as usize).sum()),
        ),
    );
    say(
        &bar,
        format!(
            "final model {} parameters; grown arms start at {} and grow after steps {:?}",
            thousands(last.param_count()),
            thousands(base.param_count()),
            growth_steps
        ),
    );

    let mut results = Vec::with_capacity(arms.len());
    for (index, arm) in arms.iter().enumerate() {
        let done_before = size.steps * index as u64;
        let label = format!("{} ({}/{})", arm.name, index + 1, arms.len());
        bar.set_message(format!("{label}: starting"));
        bar.set_position(done_before);
        let hook_bar = bar.clone();
        let steps = size.steps;
        let train_control = TrainControl {
            stop: control.stop.clone(),
            after_micro_batch: Some(Box::new(move |step, _micro| {
                hook_bar.set_message(format!("{label}: step {}/{steps}", step + 1));
                hook_bar.set_position(done_before + step + 1);
            })),
            quiet: true,
        };
        let dir = out.join(arm.name);
        let started = Instant::now();
        let summary = train_new(&dir, arm.settings.clone(), device, train_control)
            .map_err(|e| Error::invalid(format!("arm {}: {e}", arm.name)))?;
        let wall_seconds = started.elapsed().as_secs_f64();
        if summary.interrupted || control.stop.load(Ordering::SeqCst) {
            bar.finish();
            say(
                &bar,
                format!(
                    "stopped during arm {} (saved at step {}; `tokenformer train --resume {}` \
                     finishes it); no results written",
                    arm.name,
                    summary.step,
                    dir.display()
                ),
            );
            return Ok(None);
        }
        remove_token_caches(&dir)?;
        let result = arm_result(arm, &summary.evaluations, &growth_steps, wall_seconds, &size)?;
        say(
            &bar,
            format!(
                "{:<13} validation loss {:.4}, {} parameters, {:.3e} FLOPs, {}",
                arm.name,
                result.final_val_loss,
                thousands(result.params),
                result.flops,
                duration(wall_seconds)
            ),
        );
        results.push(result);
    }
    bar.clear();

    let target = results[0].final_val_loss;
    for result in &mut results {
        let reached = result.evaluations.iter().find(|e| e.val_loss <= target);
        result.flops_to_target = reached.map(|e| e.flops);
        result.step_to_target = reached.map(|e| e.step);
    }
    let common = plan.common_settings();
    let results = Results {
        experiment: "growth".into(),
        command: plan.command_line(),
        scale: plan.scale,
        seed: plan.seed,
        device: device.to_string(),
        data,
        steps: size.steps,
        batch: size.batch,
        seq: size.seq,
        budget_tokens: size.steps * (size.batch * size.seq) as u64,
        final_model: last,
        base_model: base,
        grow_at: plan.growth_points(GrowInit::Exact)?.iter().map(|p| p.to_string()).collect(),
        stage_lr: stage_lr_name(plan.stage_lr).into(),
        lr: common.lr,
        min_lr: common.min_lr,
        warmup: common.warmup,
        target_val_loss: target,
        arms: results,
    };
    write_results(out, &results)?;
    Ok(Some(results))
}

/// The result of one finished arm (its reach of the target is filled in once scratch's is known).
fn arm_result(
    arm: &Arm,
    evaluations: &[Evaluation],
    growth_steps: &[u64],
    wall_seconds: f64,
    size: &Size,
) -> Result<ArmResult> {
    let last = evaluations
        .last()
        .ok_or_else(|| Error::invalid(format!("arm {}: the run made no evaluation", arm.name)))?;
    let points: Vec<EvalPoint> = evaluations
        .iter()
        .map(|e| EvalPoint {
            step: e.step,
            flops: e.flops,
            val_loss: e.val_loss,
            params: e.params,
            stage: e.stage,
        })
        .collect();
    let mut growths = Vec::new();
    if !arm.settings.grow_at.is_empty() {
        for &step in growth_steps {
            let before = points.iter().find(|e| e.step == step);
            let after = points.iter().find(|e| e.step > step);
            if let (Some(before), Some(after)) = (before, after) {
                growths.push(GrowthMark {
                    step,
                    flops: before.flops,
                    val_loss: before.val_loss,
                    params_after: after.params,
                });
            }
        }
    }
    Ok(ArmResult {
        name: arm.name.into(),
        what: arm.what.into(),
        arch: arm.settings.arch.to_string(),
        dir: arm.name.into(),
        params_start: arm.settings.model_config()?.param_count(),
        params: last.params,
        tokens: last.step * (size.batch * size.seq) as u64,
        flops: last.flops,
        final_val_loss: last.val_loss,
        flops_to_target: None,
        step_to_target: None,
        wall_seconds,
        growths,
        evaluations: points,
    })
}

/// Removes the token caches of a finished arm: each is four bytes per byte of the books (some
/// 30 MB an arm at the shipped corpus), and a resumed or extended run rebuilds them in seconds.
fn remove_token_caches(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir.display(), e.to_string()))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && entry.file_name().to_string_lossy().ends_with(".tokens") {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path().display(), e))?;
        }
    }
    Ok(())
}

fn data_info(plan: &Plan) -> Result<DataInfo> {
    let sizes = |sub: &str| -> Result<Vec<(String, u64)>> {
        list_files(&[plan.data_dir.join(sub)])?
            .into_iter()
            .map(|p| {
                let len = std::fs::metadata(&p).map_err(|e| Error::io(p.display(), e))?.len();
                let name = p.file_name().map_or(String::new(), |n| n.to_string_lossy().into());
                Ok((name, len))
            })
            .collect()
    };
    let size = plan.scale.size();
    Ok(DataInfo {
        dir: plan.data_dir.display().to_string(),
        tokenizer: "byte".into(),
        train: sizes("train")?,
        val: sizes("val")?,
        val_windows: size.eval_windows,
        val_window_tokens: size.seq,
    })
}

/// `results.json`, `results.md` and `loss_vs_flops.png` in `out`.
pub fn write_results(out: &Path, results: &Results) -> Result<()> {
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| Error::invalid(format!("results.json: {e}")))?;
    replace_file(out, "results.json", format!("{json}\n").as_bytes())?;
    replace_file(out, "results.md", results_markdown(results).as_bytes())?;
    plot_results(&out.join("loss_vs_flops.png"), results)
}

/// 1234.5 s → "20m 34s".
pub fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The results table, one row per arm, as Markdown.
pub fn results_table(results: &Results) -> String {
    let scratch_flops = results.arms[0].flops;
    let mut table = String::from(
        "| arm | parameters (end) | tokens | training FLOPs | final val loss | FLOPs to reach scratch's final loss | wall time |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for arm in &results.arms {
        let reached = match arm.flops_to_target {
            Some(f) => format!("{f:.3e} ({:.0}%)", 100.0 * f / scratch_flops),
            None => "not reached".into(),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {:.3e} | {:.4} | {} | {} |\n",
            arm.name,
            thousands(arm.params),
            thousands(arm.tokens as usize),
            arm.flops,
            arm.final_val_loss,
            reached,
            duration(arm.wall_seconds)
        ));
    }
    table
}

fn results_markdown(r: &Results) -> String {
    let total_bytes = |files: &[(String, u64)]| thousands(files.iter().map(|f| f.1 as usize).sum());
    let names =
        |files: &[(String, u64)]| files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", ");
    let model = |c: &ModelConfig| {
        format!(
            "L = {}, d = {}, H = {}, qkv/proj/ffn tokens {}/{}/{} (τ from n₀ = {}/{}/{}), {} parameters",
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.qkv_tokens,
            c.proj_tokens,
            c.ffn_tokens,
            c.qkv_scale_tokens,
            c.proj_scale_tokens,
            c.ffn_scale_tokens,
            thousands(c.param_count())
        )
    };
    let mut md = format!("# Growth experiment: scale {}, seed {}\n\n", r.scale, r.seed);
    md.push_str(&format!("Command: `{}` (device {})\n\n", r.command, r.device));
    md.push_str(&format!(
        "- Data: `{}`, byte-level tokens; training {} bytes ({}); validation on the held-out \
         books {} ({} bytes), {} windows of {} tokens spread evenly over them.\n",
        r.data.dir,
        total_bytes(&r.data.train),
        names(&r.data.train),
        names(&r.data.val),
        total_bytes(&r.data.val),
        r.data.val_windows,
        r.data.val_window_tokens
    ));
    md.push_str(&format!(
        "- Budget: {} tokens per arm ({} steps of {} × {}), AdamW at lr {} (warmup {}, cosine to {}).\n",
        thousands(r.budget_tokens as usize),
        r.steps,
        r.batch,
        r.seq,
        r.lr,
        r.warmup,
        r.min_lr
    ));
    md.push_str(&format!("- Final model: {}.\n", model(&r.final_model)));
    md.push_str(&format!("- Grown arms start at: {}.\n", model(&r.base_model)));
    md.push_str(&format!(
        "- Growth schedule (`--grow-at`): {}; learning rate after a growth: {}.\n",
        r.grow_at.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", "),
        r.stage_lr
    ));
    md.push_str(&format!(
        "- Target: scratch's final validation loss, {:.4}. FLOPs are training FLOPs (6 per matrix \
         entry per token plus 12·L·d·T), counted by the trainer; the percentage is of scratch's \
         total.\n\n",
        r.target_val_loss
    ));
    md.push_str(&results_table(r));
    md.push('\n');
    for arm in &r.arms {
        md.push_str(&format!("- **{}**: {}.", arm.name, arm.what));
        if !arm.growths.is_empty() {
            let list: Vec<String> = arm
                .growths
                .iter()
                .map(|g| format!("step {} → {}", g.step, thousands(g.params_after)))
                .collect();
            md.push_str(&format!(
                " Started at {} parameters; grew at {}.",
                thousands(arm.params_start),
                list.join(", ")
            ));
        }
        md.push('\n');
    }
    md
}

/// Validation loss against cumulative training FLOPs (log x) for every arm, growth points
/// marked, scratch's final loss as a dashed line.
fn plot_results(path: &Path, r: &Results) -> Result<()> {
    let curves: Vec<Curve> = r
        .arms
        .iter()
        .map(|arm| Curve {
            label: arm.name.clone(),
            points: arm.evaluations.iter().map(|e| (e.flops, e.val_loss)).collect(),
            marks: arm.growths.iter().map(|g| (g.flops, g.val_loss)).collect(),
        })
        .collect();
    let title = format!(
        "Growth experiment, scale {}: validation loss vs training FLOPs ({} tokens per arm)",
        r.scale,
        thousands(r.budget_tokens as usize)
    );
    let reference = format!("scratch final ({:.4})", r.target_val_loss);
    plot_curves(
        path,
        &curves,
        &CurvesChart {
            title: &title,
            x_desc: "training FLOPs (log scale)",
            y_desc: "validation loss (nats per byte)",
            marks_label: "growth",
            reference: Some((r.target_val_loss, &reference)),
        },
    )
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
                assert_eq!(arms.len(), 5);
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
                assert!(arms[3].settings.grow_at.iter().all(|g| g.target.init == GrowInit::Random));
                assert!(arms[4].settings.freeze_old && !arms[1].settings.freeze_old);
                let with_control = Plan { tau_control: true, ..plan.clone() }.arms().unwrap();
                assert_eq!(with_control.len(), 6);
                let control = with_control[5].settings.model_config().unwrap();
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
        let points = seven.growth_points(GrowInit::Exact).unwrap();
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
    fn durations_read_as_minutes() {
        assert_eq!(duration(4.4), "4s");
        assert_eq!(duration(754.0), "12m 34s");
        assert_eq!(duration(3725.0), "1h 02m");
    }
}
