//! What the growth experiment reports: every run's evaluations gathered per arm, the spread
//! over seeds (mean and sample standard deviation, and every seed's value), the FLOPs each seed
//! needed to reach the target, same-seed differences between arms, the learning-rate sweep, and
//! `results.json`, `results.md` and `loss_vs_flops.png`.
//!
//! **FLOPs to the target.** The target is scratch's mean final validation loss over the seeds.
//! A run reaches it between two evaluations, (f₀, l₀) with l₀ above it and (f₁, l₁) at or below
//! it; its FLOPs to the target are read off the straight line between them,
//! f₀ + (l₀ − target)/(l₀ − l₁)·(f₁ − f₀) (f₁ itself if its first evaluation is already at or
//! below). A growth comes right after an evaluation, so such a segment may begin at the loss
//! just before a growth: for exact growth that is also the loss just after it; for random
//! growth, whose loss jumps at the growth, the line then runs from the loss before the jump.

use super::{best_rate, Arm, Plan, Scale, SweepModel, SweepRun, MAX_EXTRA_RATES};
use crate::config::ModelConfig;
use crate::data::list_files;
use crate::files::replace_file;
use crate::growth::TauRule;
use crate::plot::{plot_curves, Curve, CurvesChart};
use crate::progress::thousands;
use crate::GrowInit;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tokenformer_core::{Device, Error, Result};

/// One validation point of a run: step, loss, FLOPs so far, parameters and stage.
pub use crate::train::Evaluation as EvalPoint;

/// What a finished run left: `NAME.json` beside its run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// It stopped on a non-finite loss (a sweep's rate too high).
    pub diverged: bool,
    /// Wall time of the invocation that finished it (a resumed run's last part only).
    pub wall_seconds: f64,
    pub evaluations: Vec<EvalPoint>,
}

impl RunRecord {
    /// The last evaluation's loss; `None` for a run that diverged or never evaluated.
    pub fn final_val_loss(&self) -> Option<f64> {
        let last = self.evaluations.last().filter(|_| !self.diverged)?;
        last.val_loss.is_finite().then_some(last.val_loss)
    }
}

/// A growth of a run, where it happened.
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

/// A quantity over the seeds: every seed's value (`None` where a seed has none: a target not
/// reached), and the mean and sample standard deviation (n − 1) of those it has (`None` when
/// there are none, or fewer than two for the deviation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stat {
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub by_seed: Vec<Option<f64>>,
}

impl Stat {
    pub fn of(by_seed: Vec<Option<f64>>) -> Stat {
        let values: Vec<f64> = by_seed.iter().flatten().copied().collect();
        let n = values.len() as f64;
        let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / n);
        let sd = mean
            .filter(|_| values.len() > 1)
            .map(|m| (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0)).sqrt());
        Stat { mean, sd, by_seed }
    }

    /// How many seeds have a value.
    pub fn count(&self) -> usize {
        self.by_seed.iter().flatten().count()
    }

    /// `1.6157 ± 0.0042` (`digits` after the point), the mean alone for one seed, `–` for none.
    fn show(&self, digits: usize) -> String {
        match (self.mean, self.sd) {
            (Some(m), Some(s)) => format!("{m:.digits$} ± {s:.digits$}"),
            (Some(m), None) => format!("{m:.digits$}"),
            _ => "–".into(),
        }
    }
}

/// One seed of an arm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeedRun {
    pub seed: u64,
    /// The run directory, relative to the experiment directory.
    pub dir: String,
    pub final_val_loss: f64,
    /// FLOPs at which its validation curve first reached the target (interpolated); `None`:
    /// never.
    pub flops_to_target: Option<f64>,
    pub wall_seconds: f64,
    pub growths: Vec<GrowthMark>,
    pub evaluations: Vec<EvalPoint>,
}

/// What an arm did over the seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArmSummary {
    pub name: String,
    pub what: String,
    pub arch: String,
    /// The peak learning rate it trained at (the sweep's choice for its model with
    /// `--tune-lr`), and the floor of its cosine.
    pub lr: f32,
    pub min_lr: f32,
    pub params_start: usize,
    pub params: usize,
    pub tokens: u64,
    /// Training FLOPs of one run (the same for every seed).
    pub flops: f64,
    pub final_val_loss: Stat,
    pub flops_to_target: Stat,
    /// Wall time of all its seeds.
    pub wall_seconds: f64,
    pub runs: Vec<SeedRun>,
}

/// The same-seed difference of two arms' final validation losses, `arm` − `other`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Paired {
    pub question: String,
    pub arm: String,
    pub other: String,
    pub difference: Stat,
    /// Seeds at which `arm` ended lower than `other`.
    pub arm_lower: usize,
}

/// One model's row of the learning-rate sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepResult {
    pub model: SweepModel,
    pub what: String,
    /// The rates tried, lowest first: the grid, and any tried past its ends.
    pub lrs: Vec<f32>,
    /// The final validation loss at each of `lrs`; `None`: diverged.
    pub final_val_loss: Vec<Option<f64>>,
    pub chosen_lr: f32,
    /// Whether a rate tried on each side of the chosen one did worse (or diverged). `false`:
    /// the best was still at an end when the sweep had gone as far past it as it goes.
    pub bracketed: bool,
}

/// The learning-rate sweep of `--tune-lr`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LrSweep {
    pub steps: u64,
    pub seed: u64,
    /// The grid every model tries first.
    pub grid: Vec<f32>,
    pub models: Vec<SweepResult>,
    pub wall_seconds: f64,
}

impl LrSweep {
    /// The rate chosen for `model`, if the sweep ran it.
    pub fn chosen(&self, model: SweepModel) -> Option<f32> {
        self.models.iter().find(|m| m.model == model).map(|m| m.chosen_lr)
    }
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
    pub seeds: Vec<u64>,
    pub device: String,
    pub data: DataInfo,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    /// B: the training tokens of every run of an arm.
    pub budget_tokens: u64,
    pub final_model: ModelConfig,
    pub base_model: ModelConfig,
    /// The grown arms' schedule, as `train --grow-at` takes it (the exact arms'; grown-random
    /// adds `init=random`, grown-official `init=random,tau=current`).
    pub grow_at: Vec<String>,
    pub stage_lr: String,
    /// The scale's peak rate and floor (each arm's own are in `arms`).
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub lr_sweep: Option<LrSweep>,
    /// Scratch's mean final validation loss: what every run is measured against.
    pub target_val_loss: f64,
    pub arms: Vec<ArmSummary>,
    pub paired: Vec<Paired>,
    /// The wall times of every sweep run and every arm's runs, added up (a run resumed after a
    /// stop counts from its resume): the experiment's cost, however many invocations it took.
    pub runs_wall_seconds: f64,
    /// Wall time of this invocation (an experiment continued after a stop: its last part; one
    /// re-run after it finished: seconds).
    pub wall_seconds: f64,
}

/// The comparisons `results.md` makes, each (question, arm, other).
const PAIRS: [(&str, &str, &str); 6] = [
    ("(a) growth against scratch", "grown", "scratch"),
    ("(b) exact against random growth", "grown", "grown-random"),
    ("(c) the official recipe against exact growth", "grown-official", "grown"),
    ("(d) TokenFormer against Transformer, equal size", "scratch", "transformer"),
    ("(e) freezing the old tokens", "grown-frozen", "grown"),
    ("τ control: scratch with the grown arms' τ", "scratch-tau", "scratch"),
];

/// The sweep's table from its finished runs: for each model, the loss at each rate tried and
/// the rate with the lowest final validation loss (the lower rate on a tie). `None` without a
/// sweep.
pub(super) fn lr_sweep(plan: &Plan, swept: &[(SweepRun, RunRecord)]) -> Result<Option<LrSweep>> {
    let Some(first) = swept.first() else { return Ok(None) };
    let mut models = Vec::new();
    for model in SweepModel::ALL {
        let mut tried: Vec<(f32, Option<f64>)> = swept
            .iter()
            .filter(|(r, _)| r.model == model)
            .map(|(r, record)| (r.lr, record.final_val_loss()))
            .collect();
        if tried.is_empty() {
            continue;
        }
        tried.sort_by(|a, b| a.0.total_cmp(&b.0));
        let chosen_lr = best_rate(&tried).ok_or_else(|| {
            Error::invalid(format!(
                "lr sweep: every rate diverged for {} ({:?})",
                model.name(),
                tried.iter().map(|t| t.0).collect::<Vec<_>>()
            ))
        })?;
        models.push(SweepResult {
            model,
            what: model.what().into(),
            lrs: tried.iter().map(|t| t.0).collect(),
            final_val_loss: tried.iter().map(|t| t.1).collect(),
            chosen_lr,
            bracketed: SweepRun::beyond_the_edge(&tried).is_none(),
        });
    }
    Ok(Some(LrSweep {
        steps: first.0.settings.steps,
        seed: plan.seed,
        grid: plan.lr_grid(),
        models,
        wall_seconds: swept.iter().map(|(_, r)| r.wall_seconds).sum(),
    }))
}

/// The training FLOPs at which `evaluations` first reach `target` (see the module comment).
pub fn flops_to_target(evaluations: &[EvalPoint], target: f64) -> Option<f64> {
    let at = evaluations.iter().position(|e| e.val_loss <= target)?;
    let hit = &evaluations[at];
    let Some(before) = at.checked_sub(1).map(|i| &evaluations[i]) else { return Some(hit.flops) };
    let share = (before.val_loss - target) / (before.val_loss - hit.val_loss);
    Some(before.flops + share * (hit.flops - before.flops))
}

/// The growths of a run, from its evaluations: at each growth step, the evaluation just before
/// and the model size just after.
fn growth_marks(evaluations: &[EvalPoint], growth_steps: &[u64]) -> Vec<GrowthMark> {
    growth_steps
        .iter()
        .filter_map(|&step| {
            let before = evaluations.iter().find(|e| e.step == step)?;
            let after = evaluations.iter().find(|e| e.step > step)?;
            Some(GrowthMark {
                step,
                flops: before.flops,
                val_loss: before.val_loss,
                params_after: after.params,
            })
        })
        .collect()
}

/// The results of a finished experiment, from the records of every arm at every seed.
#[allow(clippy::too_many_arguments)]
pub(super) fn results(
    plan: &Plan,
    device: Device,
    data: DataInfo,
    arms: &[Arm],
    lr_of: &dyn Fn(SweepModel) -> f32,
    records: &BTreeMap<(&'static str, u64), RunRecord>,
    lr_sweep: Option<LrSweep>,
    wall_seconds: f64,
) -> Result<Results> {
    let seeds = plan.seed_list();
    let size = plan.scale.size();
    let growth_steps = plan.growth_steps()?;
    fn record<'a>(
        records: &'a BTreeMap<(&'static str, u64), RunRecord>,
        arm: &'static str,
        seed: u64,
    ) -> Result<&'a RunRecord> {
        records
            .get(&(arm, seed))
            .ok_or_else(|| Error::invalid(format!("{arm}, seed {seed}: no record")))
    }
    let record_of = |arm: &'static str, seed: u64| record(records, arm, seed);
    let final_loss = |arm: &'static str, seed: u64| -> Result<f64> {
        let last = record_of(arm, seed)?.evaluations.last().ok_or_else(|| {
            Error::invalid(format!("{arm}, seed {seed}: the run made no evaluation"))
        })?;
        Ok(last.val_loss)
    };
    let scratch: Vec<f64> =
        seeds.iter().map(|&s| final_loss("scratch", s)).collect::<Result<_>>()?;
    let target = scratch.iter().sum::<f64>() / scratch.len() as f64;

    let mut summaries = Vec::with_capacity(arms.len());
    for arm in arms {
        let lr = lr_of(arm.lr_model);
        let settings = arm.settings_for(seeds[0], lr);
        let mut runs = Vec::with_capacity(seeds.len());
        for &seed in &seeds {
            let r = record_of(arm.name, seed)?;
            let growths = if arm.settings.grow_at.is_empty() {
                Vec::new()
            } else {
                growth_marks(&r.evaluations, &growth_steps)
            };
            runs.push(SeedRun {
                seed,
                dir: format!("seed-{seed}/{}", arm.name),
                final_val_loss: final_loss(arm.name, seed)?,
                flops_to_target: flops_to_target(&r.evaluations, target),
                wall_seconds: r.wall_seconds,
                growths,
                evaluations: r.evaluations.clone(),
            });
        }
        let last = runs[0].evaluations.last().expect("checked by final_loss");
        summaries.push(ArmSummary {
            name: arm.name.into(),
            what: arm.what.into(),
            arch: arm.settings.arch.to_string(),
            lr,
            min_lr: settings.min_lr,
            params_start: arm.settings.model_config()?.param_count(),
            params: last.params,
            tokens: last.step * (size.batch * size.seq) as u64,
            flops: last.flops,
            final_val_loss: Stat::of(runs.iter().map(|r| Some(r.final_val_loss)).collect()),
            flops_to_target: Stat::of(runs.iter().map(|r| r.flops_to_target).collect()),
            wall_seconds: runs.iter().map(|r| r.wall_seconds).sum(),
            runs,
        });
    }

    let mut paired = Vec::new();
    for (question, arm, other) in PAIRS {
        let (Some(a), Some(b)) =
            (summaries.iter().find(|s| s.name == arm), summaries.iter().find(|s| s.name == other))
        else {
            continue;
        };
        let differences: Vec<f64> =
            a.runs.iter().zip(&b.runs).map(|(x, y)| x.final_val_loss - y.final_val_loss).collect();
        paired.push(Paired {
            question: question.into(),
            arm: arm.into(),
            other: other.into(),
            arm_lower: differences.iter().filter(|d| **d < 0.0).count(),
            difference: Stat::of(differences.into_iter().map(Some).collect()),
        });
    }

    let common = plan.common_settings();
    let sweep_seconds = lr_sweep.as_ref().map_or(0.0, |s| s.wall_seconds);
    let runs_wall_seconds = sweep_seconds + summaries.iter().map(|a| a.wall_seconds).sum::<f64>();
    Ok(Results {
        experiment: "growth".into(),
        command: plan.command_line(),
        scale: plan.scale,
        seeds,
        device: device.to_string(),
        data,
        steps: size.steps,
        batch: size.batch,
        seq: size.seq,
        budget_tokens: size.steps * (size.batch * size.seq) as u64,
        final_model: plan.final_config()?,
        base_model: plan.base_config()?,
        grow_at: plan
            .growth_points(GrowInit::Exact, TauRule::Frozen)?
            .iter()
            .map(|p| p.to_string())
            .collect(),
        stage_lr: plan.stage_lr.to_string(),
        lr: common.lr,
        min_lr: common.min_lr,
        warmup: common.warmup,
        lr_sweep,
        target_val_loss: target,
        arms: summaries,
        paired,
        runs_wall_seconds,
        wall_seconds,
    })
}

pub(super) fn data_info(plan: &Plan) -> Result<DataInfo> {
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

/// The results table, one row per arm (mean ± sample sd over the seeds), as Markdown.
pub fn results_table(results: &Results) -> String {
    let scratch_flops =
        results.arms.iter().find(|a| a.name == "scratch").map_or(f64::NAN, |a| a.flops);
    let seeds = results.seeds.len();
    let mut table = String::from(
        "| arm | lr | parameters (end) | training FLOPs | final val loss | FLOPs to reach the target | % of scratch's FLOPs | seeds reaching it | wall time |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for arm in &results.arms {
        let f = &arm.flops_to_target;
        let (reached, share) = match (f.mean, f.sd) {
            (Some(m), Some(s)) => (
                format!("{m:.3e} ± {s:.1e}"),
                format!("{:.1} ± {:.1}%", 100.0 * m / scratch_flops, 100.0 * s / scratch_flops),
            ),
            (Some(m), None) => (format!("{m:.3e}"), format!("{:.0}%", 100.0 * m / scratch_flops)),
            _ => ("not reached".into(), "–".into()),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {:.3e} | {} | {reached} | {share} | {} of {seeds} | {} |\n",
            arm.name,
            arm.lr,
            thousands(arm.params),
            arm.flops,
            arm.final_val_loss.show(4),
            f.count(),
            duration(arm.wall_seconds)
        ));
    }
    table
}

/// The same-seed differences, as Markdown.
fn paired_table(r: &Results) -> String {
    let mut table = String::from(
        "| question | difference in final val loss | by seed | lower in |\n|---|---:|---|---:|\n",
    );
    for p in &r.paired {
        let by_seed: Vec<String> =
            p.difference.by_seed.iter().flatten().map(|d| format!("{d:+.4}")).collect();
        table.push_str(&format!(
            "| {}: {} − {} | {} | {} | {} {} of {} |\n",
            p.question,
            p.arm,
            p.other,
            p.difference.show(4),
            by_seed.join(", "),
            p.arm,
            p.arm_lower,
            p.difference.by_seed.len()
        ));
    }
    table
}

/// The sweep's table, as Markdown: a row per model, a column per rate any model tried, the
/// choice in bold.
fn sweep_table(sweep: &LrSweep) -> String {
    let mut rates: Vec<f32> = sweep.models.iter().flat_map(|m| m.lrs.iter().copied()).collect();
    rates.sort_by(f32::total_cmp);
    rates.dedup();
    let mut table = String::from("| model |");
    for lr in &rates {
        table.push_str(&format!(" lr {lr} |"));
    }
    table.push_str(" chosen |\n|---|");
    table.push_str(&"---:|".repeat(rates.len() + 1));
    table.push('\n');
    for m in &sweep.models {
        table.push_str(&format!("| {} |", m.what));
        for lr in &rates {
            let loss = m.lrs.iter().position(|x| x == lr).map(|i| m.final_val_loss[i]);
            let cell = match loss {
                Some(Some(l)) if *lr == m.chosen_lr => format!("**{l:.4}**"),
                Some(Some(l)) => format!("{l:.4}"),
                Some(None) => "diverged".into(),
                None => String::new(),
            };
            table.push_str(&format!(" {cell} |"));
        }
        let note = if m.bracketed { "" } else { " (still at an end of the rates tried)" };
        table.push_str(&format!(" {}{note} |\n", m.chosen_lr));
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
    let seeds: Vec<String> = r.seeds.iter().map(|s| s.to_string()).collect();
    let mut md = format!("# Growth experiment: scale {}, seeds {}\n\n", r.scale, seeds.join(", "));
    md.push_str(&format!(
        "Command: `{}` (device {}; the runs' wall times add up to {}, this invocation took {})\n\n",
        r.command,
        r.device,
        duration(r.runs_wall_seconds),
        duration(r.wall_seconds)
    ));
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
        "- Budget: {} tokens per run ({} steps of {} × {}), AdamW, warmup {} steps, cosine to a \
         tenth of the peak rate; the peak rate of each arm is in the table ({}).\n",
        thousands(r.budget_tokens as usize),
        r.steps,
        r.batch,
        r.seq,
        r.warmup,
        match &r.lr_sweep {
            Some(_) => "tuned: the sweep's choice for the model the arm starts from".to_string(),
            None => format!("the scale's {} for every arm, not tuned", r.lr),
        }
    ));
    md.push_str(&format!(
        "- Seeds: {} (each seeds the model's initialisation, the draws of new tokens and the \
         order of the batches); every arm runs once per seed.\n",
        seeds.join(", ")
    ));
    md.push_str(&format!("- Final model: {}.\n", model(&r.final_model)));
    md.push_str(&format!("- Grown arms start at: {}.\n", model(&r.base_model)));
    md.push_str(&format!(
        "- Growth schedule (`--grow-at`): {}; learning rate after a growth: {}.\n",
        r.grow_at.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", "),
        r.stage_lr
    ));
    md.push_str(&format!(
        "- Target: scratch's mean final validation loss, {:.4}. FLOPs to reach it: for each \
         seed, the training FLOPs at which its validation curve first reaches the target, \
         interpolated linearly between the two evaluations around the crossing; the table gives \
         the mean ± sample standard deviation over the seeds that reached it. FLOPs are training \
         FLOPs (6 per matrix entry per token plus 12·L·d·T), counted by the trainer; the \
         percentage is of scratch's total.\n\n",
        r.target_val_loss
    ));
    if let Some(sweep) = &r.lr_sweep {
        md.push_str(&format!(
            "## Learning-rate sweep\n\nEach model the arms start from, at each rate, for {} \
             steps (warmup, then cosine to a tenth of the rate within them), seed {}; final \
             validation loss on the same windows, the lowest in bold. A model whose best rate \
             was at an end of the rates tried went on past it, a factor of 2 at a time (at most \
             {MAX_EXTRA_RATES} more). The grown arms use their base's rate. {} of wall time.\n\n",
            sweep.steps,
            sweep.seed,
            duration(sweep.wall_seconds)
        ));
        md.push_str(&sweep_table(sweep));
        md.push('\n');
    }
    md.push_str("## Results\n\nMean ± sample standard deviation over the seeds.\n\n");
    md.push_str(&results_table(r));
    md.push_str(
        "\n## Same-seed differences\n\nFinal validation loss of one arm minus another's at the \
         same seed (same data order; negative: the first is lower), mean ± sample standard \
         deviation over the seeds.\n\n",
    );
    md.push_str(&paired_table(r));
    md.push_str("\n## The arms\n\n");
    for arm in &r.arms {
        md.push_str(&format!("- **{}**: {}.", arm.name, arm.what));
        if let Some(growths) = arm.runs.first().map(|run| &run.growths).filter(|g| !g.is_empty()) {
            let list: Vec<String> = growths
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

/// Each arm's mean validation loss over the seeds against cumulative training FLOPs (log x),
/// the band between the seeds' lowest and highest, growth points marked, the target as a dashed
/// line. The seeds of an arm evaluate at the same steps with the same FLOPs. The grown arms
/// share their base stage, so until the first growth their curves lie on one another (the
/// last drawn on top).
fn plot_results(path: &Path, r: &Results) -> Result<()> {
    let curves: Vec<Curve> = r
        .arms
        .iter()
        .map(|arm| {
            let first = &arm.runs[0];
            let mut points = Vec::new();
            let mut band = Vec::new();
            for (i, e) in first.evaluations.iter().enumerate() {
                let losses: Vec<f64> = arm
                    .runs
                    .iter()
                    .filter_map(|run| run.evaluations.get(i))
                    .map(|x| x.val_loss)
                    .collect();
                let mean = losses.iter().sum::<f64>() / losses.len() as f64;
                let low = losses.iter().copied().fold(f64::INFINITY, f64::min);
                let high = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                points.push((e.flops, mean));
                band.push((e.flops, low, high));
            }
            let marks = first
                .growths
                .iter()
                .filter_map(|g| {
                    let i = first.evaluations.iter().position(|e| e.step == g.step)?;
                    Some(points[i])
                })
                .collect();
            Curve { label: arm.name.clone(), points, marks, band }
        })
        .collect();
    let title = format!(
        "Growth experiment, scale {}: {} seeds (mean, min-max band)",
        r.scale,
        r.seeds.len()
    );
    let reference = format!("target: scratch mean final ({:.4})", r.target_val_loss);
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

    fn point(flops: f64, val_loss: f64) -> EvalPoint {
        EvalPoint { step: flops as u64, flops, val_loss, params: 1, stage: 0 }
    }

    #[test]
    fn flops_to_target_interpolate_between_the_evaluations_around_the_crossing() {
        let curve = [point(10.0, 3.0), point(20.0, 2.0), point(30.0, 1.0)];
        assert_eq!(flops_to_target(&curve, 1.5), Some(25.0));
        assert_eq!(flops_to_target(&curve, 2.0), Some(20.0));
        assert_eq!(flops_to_target(&curve, 3.5), Some(10.0));
        assert_eq!(flops_to_target(&curve, 0.5), None);
        // A curve that rises again after reaching the target keeps its first crossing.
        let bumpy = [point(10.0, 3.0), point(20.0, 1.0), point(30.0, 4.0), point(40.0, 0.5)];
        assert_eq!(flops_to_target(&bumpy, 2.0), Some(15.0));
    }

    #[test]
    fn stats_give_the_sample_deviation_over_the_seeds_that_have_a_value() {
        let s = Stat::of(vec![Some(1.0), Some(2.0), Some(3.0), None]);
        assert_eq!((s.mean, s.sd, s.count()), (Some(2.0), Some(1.0), 3));
        assert_eq!(s.show(2), "2.00 ± 1.00");
        let one = Stat::of(vec![Some(1.5)]);
        assert_eq!((one.mean, one.sd, one.show(1)), (Some(1.5), None, "1.5".to_string()));
        let none = Stat::of(vec![None, None]);
        assert_eq!((none.mean, none.sd, none.show(1)), (None, None, "–".to_string()));
    }
}
