//! Runs a [`Plan`]: the learning-rate sweep first (with `--tune-lr`), then every arm once per
//! seed, each in its own run directory of the experiment directory:
//!
//! ```text
//! OUT/experiment.json            the command that started it (a re-run must match it)
//! OUT/lr-sweep/MODEL-lrRATE/     a sweep run; MODEL-lrRATE.json beside it once it has finished
//! OUT/seed-S/ARM/                an arm at seed S; ARM.json beside it once it has finished
//! OUT/results.{json,md}, OUT/loss_vs_flops.png
//! ```
//!
//! A run's `NAME.json` (its evaluations and wall time) is written only when the run has
//! finished, and a run with one is never trained again. So the same command re-run on the same
//! `--out` after a stop or a kill keeps every finished run, resumes an interrupted one from its
//! last checkpoint (the trainer continues bit for bit), starts again one killed before its
//! first checkpoint, and ends with the results an uninterrupted experiment gives (but for wall
//! times). Nothing finished is deleted.

use super::report::{self, EvalPoint, RunRecord};
use super::{Arm, Plan, SweepModel, SweepRun, MAX_EXTRA_RATES};
use crate::checkpoint::is_checkpoint_dir;
use crate::files::{entry_exists, replace_file};
use crate::metrics::read_metrics;
use crate::progress::{thousands, Progress};
use crate::run_dir::{clear_unfinished, RunLock};
use crate::train::{
    absolute_paths, check_new_run, is_divergence, is_run_dir, saved_run, train_new, train_resume,
    TrainControl, TrainSettings,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenformer_core::{Device, Error, Result};

/// The file that says which experiment a directory holds.
const MANIFEST: &str = "experiment.json";

#[derive(Serialize, Deserialize)]
struct Manifest {
    experiment: String,
    command: String,
    /// The device its runs train on: a continued experiment keeps it.
    device: String,
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

/// One training run of the experiment: `PARENT/NAME/`, its record `PARENT/NAME.json`.
struct Job {
    /// How the progress bar and the messages name it, e.g. `grown, seed 1338`.
    label: String,
    parent: PathBuf,
    name: String,
    settings: TrainSettings,
    /// A sweep run may diverge (its rate too high): that is a result, not an error.
    may_diverge: bool,
}

impl Job {
    fn new(
        label: String,
        parent: PathBuf,
        name: String,
        mut settings: TrainSettings,
        may_diverge: bool,
    ) -> Job {
        // As the trainer saves them, so that a resumed run's saved settings compare equal.
        if let (Ok(data), Ok(val)) =
            (absolute_paths(&settings.data), absolute_paths(&settings.val_data))
        {
            (settings.data, settings.val_data) = (data, val);
        }
        Job { label, parent, name, settings, may_diverge }
    }

    fn dir(&self) -> PathBuf {
        self.parent.join(&self.name)
    }

    fn record_name(&self) -> String {
        format!("{}.json", self.name)
    }

    /// The checks made before the experiment trains anything: a run not begun yet must be able
    /// to start in its directory; one begun must have been begun with these settings (but for
    /// the learning rate when `rate_known` is false: a tuned rate is known after the sweep).
    fn check(&self, rate_known: bool) -> Result<()> {
        let dir = self.dir();
        if entry_exists(&self.parent.join(self.record_name())) {
            return Ok(());
        }
        if is_checkpoint_dir(&dir) {
            let ignored: &[&str] = if rate_known { &[] } else { &["lr", "min_lr"] };
            return self.check_saved(ignored);
        }
        if is_run_dir(&dir) {
            return Ok(());
        }
        check_new_run(&dir, &self.settings)
            .map(|_| ())
            .map_err(|e| Error::invalid(format!("{}: {e}", self.label)))
    }

    /// Refuses a run directory whose saved settings are not this job's (another build of the
    /// experiment, or other data), naming the settings that differ; `ignored` are not compared.
    fn check_saved(&self, ignored: &[&str]) -> Result<()> {
        let dir = self.dir();
        let (saved, _) =
            saved_run(&dir).map_err(|e| Error::invalid(format!("{}: {e}", self.label)))?;
        let as_map = |s: &TrainSettings| match serde_json::to_value(s) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let (saved, wanted) = (as_map(&saved), as_map(&self.settings));
        let differing: Vec<&str> = wanted
            .iter()
            .filter(|(key, value)| {
                !ignored.contains(&key.as_str()) && saved.get(*key) != Some(value)
            })
            .map(|(key, _)| key.as_str())
            .collect();
        if differing.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{}: {} holds a run whose settings differ from this experiment's in {}; move it \
             away, or choose another --out",
            self.label,
            dir.display(),
            differing.join(", ")
        )))
    }
}

/// What became of a job.
enum Outcome {
    /// Finished, now or before (`kept`: by an earlier invocation).
    Finished { record: RunRecord, kept: bool },
    /// A stop request ended it; its run directory holds a checkpoint at `step`.
    Stopped { step: u64 },
}

/// Runs every arm of `plan` for every seed in `out` (new, empty, or an experiment this plan
/// started there, which it continues), and writes the results. Returns `None` when a stop
/// request ended it early (the run that was training is saved; the same command continues).
pub fn run_growth_experiment(
    out: &Path,
    plan: &Plan,
    device: Device,
    control: ExperimentControl,
) -> Result<Option<report::Results>> {
    plan.check()?;
    let arms = plan.arms()?;
    let sweep_runs = plan.sweep_runs()?;
    let default_lr = plan.common_settings().lr;
    let sweep_job = |r: &SweepRun| {
        let label = format!("lr sweep, {} at {}", r.model.name(), r.lr);
        Job::new(label, out.join("lr-sweep"), r.name(), r.settings.clone(), true)
    };
    let sweep_jobs: Vec<Job> = sweep_runs.iter().map(sweep_job).collect();
    let arm_job = |seed: u64, arm: &Arm, lr: f32| {
        let label = format!("{}, seed {seed}", arm.name);
        let parent = out.join(format!("seed-{seed}"));
        Job::new(label, parent, arm.name.to_string(), arm.settings_for(seed, lr), false)
    };
    // Every run's settings and directory are checked before the first one trains (the arms at
    // the scale's rate, which is theirs unless the sweep tunes it).
    for job in &sweep_jobs {
        job.check(true)?;
    }
    for seed in plan.seed_list() {
        for arm in &arms {
            arm_job(seed, arm, default_lr).check(!plan.tune_lr)?;
        }
    }
    open_experiment_dir(out, plan, device)?;
    let data = report::data_info(plan)?;

    let size = plan.scale.size();
    let say = |bar: &Progress, line: String| {
        if !control.quiet {
            bar.println(line)
        }
    };
    let sweep_steps: u64 = sweep_jobs.iter().map(|j| j.settings.steps).sum();
    let arm_steps = size.steps * (arms.len() * plan.seeds) as u64;
    let bar =
        if control.quiet { Progress::hidden() } else { Progress::new(sweep_steps + arm_steps, 0) };
    let (last, base) = (plan.final_config()?, plan.base_config()?);
    say(
        &bar,
        format!(
            "experiment growth in {}, scale {}, seeds {:?}: {} arms of {} tokens ({} steps of \
             {}×{}) on {} ({} training, {} validation bytes, byte-level){}",
            out.display(),
            plan.scale,
            plan.seed_list(),
            arms.len(),
            thousands(size.steps as usize * size.batch * size.seq),
            size.steps,
            size.batch,
            size.seq,
            plan.data_dir.display(),
            thousands(data.train.iter().map(|f| f.1 as usize).sum()),
            thousands(data.val.iter().map(|f| f.1 as usize).sum()),
            if sweep_jobs.is_empty() {
                String::new()
            } else {
                format!("; first a learning-rate sweep of {} runs", sweep_jobs.len())
            }
        ),
    );
    say(
        &bar,
        format!(
            "final model {} parameters; grown arms start at {} and grow after steps {:?}",
            thousands(last.param_count()),
            thousands(base.param_count()),
            plan.growth_steps()?
        ),
    );

    let started = Instant::now();
    let mut done_steps = 0u64;
    let mut total_jobs = sweep_jobs.len() + arms.len() * plan.seeds;
    let mut job_index = 0usize;
    let mut run =
        |job: &Job, done_steps: &mut u64, total_jobs: usize| -> Result<Option<RunRecord>> {
            job_index += 1;
            let label = format!("{} ({job_index}/{total_jobs})", job.label);
            bar.set_message(format!("{label}: starting"));
            bar.set_position(*done_steps);
            match run_job(job, &label, device, &control, &bar, *done_steps)? {
                Outcome::Stopped { step } => {
                    bar.finish();
                    say(
                        &bar,
                        format!(
                            "stopped during {} (saved at step {step}); run the same command with \
                         --out {} to continue: finished runs are kept",
                            job.label,
                            out.display()
                        ),
                    );
                    Ok(None)
                }
                Outcome::Finished { record, kept } => {
                    *done_steps += job.settings.steps;
                    let result = match (record.diverged, record.evaluations.last()) {
                        (true, _) => "diverged (non-finite loss)".to_string(),
                        (false, Some(e)) => format!(
                            "validation loss {:.4}, {} parameters, {:.3e} FLOPs",
                            e.val_loss,
                            thousands(e.params),
                            e.flops
                        ),
                        (false, None) => "no evaluation".to_string(),
                    };
                    let when = if kept {
                        "finished before, kept".to_string()
                    } else {
                        report::duration(record.wall_seconds)
                    };
                    say(&bar, format!("{:<28} {result}, {when}", job.label));
                    Ok(Some(record))
                }
            }
        };

    // Each model's grid, then past its end while the best rate is there.
    let mut swept: Vec<(SweepRun, RunRecord)> = Vec::new();
    for model in SweepModel::ALL {
        let mut pending: Vec<SweepRun> =
            sweep_runs.iter().filter(|r| r.model == model).cloned().collect();
        let mut extra = 0;
        while !pending.is_empty() {
            for sweep_run in pending.drain(..) {
                let Some(record) = run(&sweep_job(&sweep_run), &mut done_steps, total_jobs)? else {
                    return Ok(None);
                };
                swept.push((sweep_run, record));
            }
            let tried: Vec<(f32, Option<f64>)> = swept
                .iter()
                .filter(|(r, _)| r.model == model)
                .map(|(r, record)| (r.lr, record.final_val_loss()))
                .collect();
            if let Some(lr) = SweepRun::beyond_the_edge(&tried).filter(|_| extra < MAX_EXTRA_RATES)
            {
                extra += 1;
                let next = plan.sweep_run(model, lr)?;
                bar.add_steps(next.settings.steps);
                total_jobs += 1;
                pending.push(next);
            }
        }
    }
    let lr_sweep = report::lr_sweep(plan, &swept)?;
    let chosen: Vec<(SweepModel, f32)> = SweepModel::ALL
        .into_iter()
        .filter_map(|m| Some((m, lr_sweep.as_ref()?.chosen(m)?)))
        .collect();
    let lr_of = |model: SweepModel| -> f32 {
        chosen.iter().find(|c| c.0 == model).map_or(default_lr, |c| c.1)
    };

    let mut records: BTreeMap<(&'static str, u64), RunRecord> = BTreeMap::new();
    for seed in plan.seed_list() {
        for arm in &arms {
            let job = arm_job(seed, arm, lr_of(arm.lr_model));
            let Some(record) = run(&job, &mut done_steps, total_jobs)? else { return Ok(None) };
            records.insert((arm.name, seed), record);
        }
    }
    bar.clear();
    let results = report::results(
        plan,
        device,
        data,
        &arms,
        &lr_of,
        &records,
        lr_sweep,
        started.elapsed().as_secs_f64(),
    )?;
    report::write_results(out, &results)?;
    Ok(Some(results))
}

/// Makes `out` the experiment's directory: a new or empty one gets the manifest; one that has
/// it must have been started by the same command (it is continued); anything else is refused.
fn open_experiment_dir(out: &Path, plan: &Plan, device: Device) -> Result<()> {
    let command = plan.command_line();
    let device = device.to_string();
    let manifest_path = out.join(MANIFEST);
    if entry_exists(&manifest_path) {
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| Error::io(manifest_path.display(), e))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::format(manifest_path.display(), e.to_string()))?;
        if manifest.command != command {
            return Err(Error::invalid(format!(
                "{} holds the experiment `{}`; run that command to continue it, or choose \
                 another --out for `{command}`",
                out.display(),
                manifest.command
            )));
        }
        if manifest.device != device {
            return Err(Error::invalid(format!(
                "{} holds an experiment whose runs train on {}; continue it with --device {1}",
                out.display(),
                manifest.device
            )));
        }
        return Ok(());
    }
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out.display(), e))?;
        if entries.next().is_some() {
            return Err(Error::invalid(format!(
                "{} is not empty and holds no experiment ({MANIFEST}); choose another --out",
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display(), e))?;
    let manifest = Manifest { experiment: "growth".into(), command, device };
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::invalid(format!("{MANIFEST}: {e}")))?;
    replace_file(out, MANIFEST, format!("{json}\n").as_bytes())
}

/// Trains `job` to its end, or takes its record from an earlier invocation: a run directory
/// with a checkpoint is resumed (its saved settings must be the job's), one without is started
/// again.
fn run_job(
    job: &Job,
    label: &str,
    device: Device,
    control: &ExperimentControl,
    bar: &Progress,
    done_before: u64,
) -> Result<Outcome> {
    let (dir, record_name) = (job.dir(), job.record_name());
    let record_path = job.parent.join(&record_name);
    if entry_exists(&record_path) {
        let text = std::fs::read_to_string(&record_path)
            .map_err(|e| Error::io(record_path.display(), e))?;
        let record = serde_json::from_str(&text)
            .map_err(|e| Error::format(record_path.display(), e.to_string()))?;
        return Ok(Outcome::Finished { record, kept: true });
    }
    let hook_bar = bar.clone();
    let (steps, hook_label) = (job.settings.steps, label.to_string());
    let train_control = TrainControl {
        stop: control.stop.clone(),
        after_micro_batch: Some(Box::new(move |step, _micro| {
            hook_bar.set_message(format!("{hook_label}: step {}/{steps}", step + 1));
            hook_bar.set_position(done_before + step + 1);
        })),
        quiet: true,
    };
    let started = Instant::now();
    let fail = |e: Error| Error::invalid(format!("{}: {e}", job.label));
    let trained = if is_checkpoint_dir(&dir) {
        job.check_saved(&[])?;
        let (_, step) = saved_run(&dir).map_err(fail)?;
        if step >= job.settings.steps {
            Ok(None)
        } else {
            train_resume(&dir, device, train_control).map(Some)
        }
    } else {
        if is_run_dir(&dir) {
            // Killed before its first checkpoint: nothing of it is kept but its metrics.
            let lock = RunLock::acquire(&dir).map_err(fail)?;
            clear_unfinished(&lock).map_err(fail)?;
        }
        train_new(&dir, job.settings.clone(), device, train_control).map(Some)
    };
    let diverged = match trained {
        Ok(Some(summary)) if summary.interrupted || control.stop.load(Ordering::SeqCst) => {
            return Ok(Outcome::Stopped { step: summary.step });
        }
        Ok(_) => false,
        Err(e) if job.may_diverge && is_divergence(&e) => true,
        Err(e) => return Err(fail(e)),
    };
    let record = RunRecord {
        diverged,
        wall_seconds: started.elapsed().as_secs_f64(),
        evaluations: evaluations_in(&dir)?,
    };
    remove_token_caches(&dir)?;
    let json = serde_json::to_string_pretty(&record)
        .map_err(|e| Error::invalid(format!("{}: {e}", record_path.display())))?;
    replace_file(&job.parent, &record_name, format!("{json}\n").as_bytes())?;
    Ok(Outcome::Finished { record, kept: false })
}

/// Every evaluation a run directory's metrics record, the resumed parts included.
fn evaluations_in(dir: &Path) -> Result<Vec<EvalPoint>> {
    let path = dir.join("metrics.jsonl");
    if !entry_exists(&path) {
        return Ok(Vec::new());
    }
    let records = read_metrics(&path)?;
    records
        .iter()
        .filter_map(|r| r.val_loss.map(|val_loss| (r, val_loss)))
        .map(|(r, val_loss)| {
            let field = |key: &str| {
                r.extra.get(key).cloned().ok_or_else(|| {
                    Error::format(path.display(), format!("step {}: no {key} field", r.step))
                })
            };
            let number = |key: &str| -> Result<f64> {
                field(key)?.as_f64().ok_or_else(|| {
                    Error::format(path.display(), format!("step {}: {key} is not a number", r.step))
                })
            };
            let count = |key: &str| -> Result<u64> {
                field(key)?.as_u64().ok_or_else(|| {
                    Error::format(path.display(), format!("step {}: {key} is not a count", r.step))
                })
            };
            Ok(EvalPoint {
                step: r.step,
                flops: number("flops")?,
                val_loss,
                params: count("params")? as usize,
                stage: count("stage")?,
            })
        })
        .collect()
}

/// Removes the token caches of a finished run: each is four bytes per byte of the books (some
/// 30 MB a run at the shipped corpus), and a resumed or extended run rebuilds them in seconds.
fn remove_token_caches(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
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
