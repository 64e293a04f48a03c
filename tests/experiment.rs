//! `tokenformer experiment growth --quick` end to end: six arms over two seeds after a
//! learning-rate sweep, each run an ordinary run directory; results.json's statistics (means,
//! sample deviations, FLOPs to the target interpolated between evaluations) recomputed from its
//! own evaluations; the same seeds giving the same numbers, bit for bit, whatever the thread
//! count; an experiment killed in its third arm and run again ending with the results of an
//! uninterrupted one, its finished runs untouched. Plus the one-line refusals of bad input.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::Scratch;
use tokenformer::models::metrics::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");
/// The repository root, where the experiment's books are (`data/gutenberg`).
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ARMS: [&str; 6] =
    ["scratch", "grown", "transformer", "grown-random", "grown-official", "grown-frozen"];
const SEEDS: [u64; 2] = [1337, 1338];

/// Runs the command from the repository root (as a user would).
fn run(args: &[&str], threads: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(ROOT).stdin(Stdio::null());
    if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n);
    }
    cmd.output().expect("the tokenformer binary runs")
}

fn texts(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn experiment(out: &Path, extra: &[&str], threads: &str) -> (serde_json::Value, String) {
    let mut args = vec!["experiment", "growth", "--quick", "--seeds", "2", "--out", s(out)];
    args.extend_from_slice(extra);
    let output = run(&args, Some(threads));
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The table on stdout: a header, a rule and one row per arm.
    for arm in ARMS {
        assert!(stdout.contains(&format!("| {arm} |")), "{stdout}");
    }
    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    (serde_json::from_str(&json).unwrap(), stderr)
}

/// results.json without its wall times: what must repeat exactly.
fn without_wall_times(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .filter(|(k, _)| k.as_str() != "wall_seconds")
            .map(|(k, v)| (k.clone(), without_wall_times(v)))
            .collect(),
        serde_json::Value::Array(items) => items.iter().map(without_wall_times).collect(),
        other => other.clone(),
    }
}

fn f64s(value: &serde_json::Value) -> Vec<Option<f64>> {
    value.as_array().unwrap().iter().map(|v| v.as_f64()).collect()
}

/// Mean and sample standard deviation, as the experiment must give them.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (mean, (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn quick_growth_experiment_end_to_end_and_reproducible() {
    let scratch = Scratch::new("quick");
    let (a, b) = (scratch.path("a"), scratch.path("b"));
    let (results, _) = experiment(&a, &["--tune-lr"], "2");
    assert_eq!(results["seeds"], serde_json::json!(SEEDS));

    // The sweep: three models at five rates a factor of 2 apart, each going on past an end of
    // the grid while its best rate is there, and choosing its lowest final loss.
    let sweep = &results["lr_sweep"];
    let grid: Vec<f64> = f64s(&sweep["grid"]).into_iter().map(Option::unwrap).collect();
    assert_eq!(grid.len(), 5);
    assert!(grid.windows(2).all(|w| (w[1] / w[0] - 2.0).abs() < 1e-6), "{grid:?}");
    let mut chosen = std::collections::HashMap::new();
    for model in sweep["models"].as_array().unwrap() {
        let name = model["model"].as_str().unwrap().to_string();
        let lrs: Vec<f64> = f64s(&model["lrs"]).into_iter().map(Option::unwrap).collect();
        let losses = f64s(&model["final_val_loss"]);
        assert!(grid.iter().all(|g| lrs.contains(g)), "{name}: the whole grid");
        assert!(lrs.windows(2).all(|w| (w[1] / w[0] - 2.0).abs() < 1e-6), "{name}: {lrs:?}");
        let best = (0..lrs.len())
            .filter(|&i| losses[i].is_some())
            .min_by(|&i, &j| losses[i].unwrap().total_cmp(&losses[j].unwrap()))
            .unwrap();
        assert!((model["chosen_lr"].as_f64().unwrap() - lrs[best]).abs() < 1e-12, "{name}");
        let at_an_end = best == 0 || best == lrs.len() - 1;
        assert!(!at_an_end || lrs.len() == grid.len() + 3, "{name}: {lrs:?}, best {best}");
        for lr in &lrs {
            let dir = a.join("lr-sweep").join(format!("{name}-lr{}", *lr as f32));
            assert!(dir.join("metrics.jsonl").is_file(), "{}", dir.display());
        }
        chosen.insert(name, model["chosen_lr"].as_f64().unwrap());
    }
    assert_eq!(chosen.len(), 3);

    let arms = results["arms"].as_array().unwrap();
    let names: Vec<&str> = arms.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ARMS);
    let grow_at: Vec<u64> = results["grow_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().split(':').next().unwrap().parse().unwrap())
        .collect();
    assert!(grow_at.len() >= 3, "at least three growths: {grow_at:?}");
    // The target: scratch's mean final loss over the seeds.
    let scratch_losses: Vec<f64> =
        f64s(&arms[0]["final_val_loss"]["by_seed"]).into_iter().map(Option::unwrap).collect();
    let target = results["target_val_loss"].as_f64().unwrap();
    assert!(close(target, mean_sd(&scratch_losses).0));
    let budget = results["budget_tokens"].as_u64().unwrap();
    let final_params = arms[0]["params"].as_u64().unwrap();
    for arm in arms {
        let name = arm["name"].as_str().unwrap();
        assert_eq!(arm["tokens"].as_u64().unwrap(), budget, "{name}");
        let model = match name {
            "scratch" => "tokenformer",
            "transformer" => "transformer",
            _ => "tokenformer-base",
        };
        assert_eq!(arm["lr"].as_f64().unwrap(), chosen[model], "{name}: its model's rate");
        let runs = arm["runs"].as_array().unwrap();
        assert_eq!(runs.len(), SEEDS.len());
        let mut finals = Vec::new();
        for (run, seed) in runs.iter().zip(SEEDS) {
            assert_eq!(run["seed"], seed);
            let dir = a.join(format!("seed-{seed}")).join(name);
            assert_eq!(run["dir"], format!("seed-{seed}/{name}"));
            // An ordinary run directory: checkpoint, metrics and the run's own plot.
            for file in ["config.json", "model.safetensors", "metrics.jsonl", "loss.png"] {
                assert!(dir.join(file).is_file(), "{name}: no {file}");
            }
            let records = read_metrics(&dir.join("metrics.jsonl")).unwrap();
            let extra = |key: &str| -> Vec<f64> {
                records.iter().map(|r| r.extra[key].as_f64().unwrap()).collect()
            };
            let flops = extra("flops");
            assert!(flops.windows(2).all(|w| w[1] > w[0]), "{name}: FLOPs must increase");
            assert_eq!(*flops.last().unwrap(), arm["flops"].as_f64().unwrap(), "{name}");
            let params = extra("params");
            let grew: Vec<u64> = records
                .windows(2)
                .filter(|w| w[1].extra["stage"] != w[0].extra["stage"])
                .map(|w| w[0].step)
                .collect();
            let marks: Vec<u64> = run["growths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["step"].as_u64().unwrap())
                .collect();
            if name.starts_with("grown") {
                assert_eq!(grew, grow_at, "{name}: growth steps in metrics.jsonl");
                assert_eq!(marks, grow_at, "{name}: growth points in results.json");
                assert!(params[0] < *params.last().unwrap(), "{name}: {params:?}");
                assert_eq!(*params.last().unwrap() as u64, final_params, "{name}");
            } else {
                assert!(grew.is_empty() && marks.is_empty(), "{name}: no growth");
            }
            // The evaluations are the run's own, from its metrics.
            let evaluations: Vec<(f64, f64)> = run["evaluations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["flops"].as_f64().unwrap(), e["val_loss"].as_f64().unwrap()))
                .collect();
            let logged: Vec<(f64, f64)> = records
                .iter()
                .filter_map(|r| Some((r.extra["flops"].as_f64().unwrap(), r.val_loss?)))
                .collect();
            assert_eq!(evaluations, logged, "{name}");
            // FLOPs to the target: on the line between the evaluations around the crossing.
            let crossing = evaluations.iter().position(|e| e.1 <= target);
            let want = crossing.map(|i| match i {
                0 => evaluations[0].0,
                i => {
                    let ((f0, l0), (f1, l1)) = (evaluations[i - 1], evaluations[i]);
                    f0 + (l0 - target) / (l0 - l1) * (f1 - f0)
                }
            });
            let got = run["flops_to_target"].as_f64();
            match (got, want) {
                (Some(g), Some(w)) => assert!(close(g, w), "{name}: {g} against {w}"),
                (g, w) => assert_eq!(g, w, "{name}"),
            }
            if let (Some(g), Some(i)) = (got, crossing.filter(|&i| i > 0)) {
                assert!(evaluations[i - 1].0 < g && g <= evaluations[i].0, "{name}");
            }
            finals.push(evaluations.last().unwrap().1);
        }
        // Mean and sample deviation over the seeds, every seed's value beside them.
        let stat = &arm["final_val_loss"];
        assert_eq!(f64s(&stat["by_seed"]), finals.iter().map(|&x| Some(x)).collect::<Vec<_>>());
        let (mean, sd) = mean_sd(&finals);
        assert!(close(stat["mean"].as_f64().unwrap(), mean), "{name}");
        assert!(close(stat["sd"].as_f64().unwrap(), sd), "{name}");
        let reached: Vec<f64> = runs.iter().filter_map(|r| r["flops_to_target"].as_f64()).collect();
        let flops_stat = &arm["flops_to_target"];
        match reached.len() {
            0 => assert!(flops_stat["mean"].is_null(), "{name}"),
            1 => assert!(flops_stat["sd"].is_null(), "{name}"),
            _ => assert!(close(flops_stat["sd"].as_f64().unwrap(), mean_sd(&reached).1)),
        }
    }
    // The grown arms see the same tokens with fewer FLOPs.
    let scratch_flops = arms[0]["flops"].as_f64().unwrap();
    assert!(arms[1]["flops"].as_f64().unwrap() < scratch_flops);
    // Same-seed differences: grown − scratch, seed by seed.
    let paired = results["paired"].as_array().unwrap();
    let first = &paired[0];
    assert_eq!((first["arm"].as_str(), first["other"].as_str()), (Some("grown"), Some("scratch")));
    let grown_finals = f64s(&arms[1]["final_val_loss"]["by_seed"]);
    let differences: Vec<f64> =
        (0..2).map(|i| grown_finals[i].unwrap() - scratch_losses[i]).collect();
    assert_eq!(
        f64s(&first["difference"]["by_seed"]),
        differences.iter().map(|&d| Some(d)).collect::<Vec<_>>()
    );
    assert_eq!(paired.len(), 5, "the five questions whose arms ran");

    let md = std::fs::read_to_string(a.join("results.md")).unwrap();
    assert!(md.contains("## Learning-rate sweep") && md.contains("## Same-seed differences"));
    for arm in ARMS {
        let row = md.lines().find(|l| l.starts_with(&format!("| {arm} |"))).unwrap();
        assert!(row.contains(" ± "), "mean ± sd: {row}");
    }
    let png = std::fs::read(a.join("loss_vs_flops.png")).unwrap();
    assert!(png.len() > 10_000 && &png[1..4] == b"PNG");

    // The same seeds, one thread instead of two: the same results, bit for bit.
    let (again, _) = experiment(&b, &["--tune-lr"], "1");
    assert_eq!(without_wall_times(&again)["arms"], without_wall_times(&results)["arms"]);
    assert_eq!(without_wall_times(&again)["lr_sweep"], without_wall_times(&results)["lr_sweep"]);
}

/// Modification times of every file under `dir`.
fn mtimes(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            out.extend(mtimes(&entry.path()));
        } else {
            out.push((entry.path(), entry.metadata().unwrap().modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// Starts the experiment in `out` and kills it (SIGKILL: no chance to save) once the run in
/// `run_dir` has logged a step.
fn kill_once_running(out: &Path, extra: &[&str], run_dir: &Path) {
    let mut args = vec!["experiment", "growth", "--quick", "--seeds", "2", "--out", s(out)];
    args.extend_from_slice(extra);
    let mut child = Command::new(BIN)
        .args(&args)
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read(run_dir.join("metrics.jsonl")).is_ok_and(|m| !m.is_empty()) {
        assert!(child.try_wait().unwrap().is_none(), "ended before {}", run_dir.display());
        assert!(start.elapsed().as_secs() < 120, "{} not started after 120 s", run_dir.display());
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("results.json").exists());
    let name = run_dir.file_name().unwrap().to_str().unwrap();
    assert!(!run_dir.with_file_name(format!("{name}.json")).exists(), "killed in {name}");
}

#[test]
fn an_experiment_killed_in_its_third_arm_finishes_as_an_uninterrupted_one() {
    let scratch = Scratch::new("killed");
    let (whole, killed) = (scratch.path("whole"), scratch.path("killed"));
    let tune = ["--tune-lr"];
    let (uninterrupted, _) = experiment(&whole, &tune, "2");

    // Killed in the sweep, then in the third arm of the first seed.
    kill_once_running(&killed, &tune, &killed.join("lr-sweep").join("tokenformer-base-lr0.0025"));
    kill_once_running(&killed, &tune, &killed.join("seed-1337").join("transformer"));
    let finished: Vec<PathBuf> =
        ["scratch", "grown"].iter().map(|arm| killed.join("seed-1337").join(arm)).collect();
    let before: Vec<_> = finished.iter().map(|d| mtimes(d)).collect();

    let (resumed, stderr) = experiment(&killed, &tune, "2");
    let comparable = |r: &serde_json::Value| {
        let mut r = without_wall_times(r);
        r.as_object_mut().unwrap().remove("runs_wall_seconds");
        r
    };
    assert_eq!(comparable(&resumed), comparable(&uninterrupted));
    // The finished arms were kept as they were, not trained again.
    for (dir, before) in finished.iter().zip(before) {
        assert_eq!(mtimes(dir), before, "{}", dir.display());
    }
    for arm in ["scratch, seed 1337", "grown, seed 1337"] {
        let line = stderr.lines().find(|l| l.starts_with(arm)).unwrap_or_default();
        assert!(line.contains("finished before, kept"), "{arm}: {stderr}");
    }
    // Once more: everything is kept, and the results are the same again.
    let (third_time, _) = experiment(&killed, &tune, "1");
    assert_eq!(comparable(&third_time), comparable(&uninterrupted));
    // Continued on another device, or with other arms, it is refused.
    refused(
        &[
            "experiment",
            "growth",
            "--quick",
            "--seeds",
            "2",
            "--tune-lr",
            "--out",
            s(&killed),
            "--device",
            "cuda",
        ],
        &["continue it with --device cpu"],
    );
    refused(
        &["experiment", "growth", "--quick", "--seeds", "2", "--out", s(&killed)],
        &["holds the experiment", "--tune-lr"],
    );
}

#[test]
fn a_run_stopped_by_a_non_finite_loss_is_told_apart_from_other_errors() {
    use tokenformer::models::train::{is_divergence, train_new, TrainControl, TrainSettings};
    let scratch = Scratch::new("diverged");
    let settings = TrainSettings {
        lr: 1e6,
        clip: 0.0,
        warmup: 0,
        steps: 50,
        batch: 2,
        seq: 16,
        eval_every: 1000,
        save_every: 1000,
        ..TrainSettings::default()
    };
    let control =
        || TrainControl { stop: Default::default(), after_micro_batch: None, quiet: true };
    let err = train_new(
        &scratch.path("run"),
        settings.clone(),
        tokenformer::core::Device::Cpu,
        control(),
    )
    .unwrap_err();
    assert!(is_divergence(&err), "{err}");
    let bad = TrainSettings { batch: 0, ..settings };
    let err = train_new(&scratch.path("other"), bad, tokenformer::core::Device::Cpu, control())
        .unwrap_err();
    assert!(!is_divergence(&err), "{err}");
}

/// Runs a command that must fail with one line on stderr containing each of `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let output = run(args, None);
    let (stdout, stderr) = texts(&output);
    assert!(!output.status.success(), "{args:?} succeeded: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: '{needle}' not in: {stderr}");
    }
}

#[test]
fn bad_experiment_input_is_refused_in_one_line() {
    let scratch = Scratch::new("bad");
    let out = scratch.path("out");
    let missing = scratch.path("no-such-data");
    refused(
        &["experiment", "growth", "--quick", "--out", s(&out), "--data-dir", s(&missing)],
        &["experiment data not found", "--data-dir"],
    );
    assert!(!out.exists(), "nothing is made before the data is found");
    refused(&["experiment", "growth", "--quick", "--growths", "0"], &["--growths"]);
    refused(&["experiment", "growth", "--quick", "--growths", "40"], &["fewer --growths"]);
    refused(&["experiment", "growth", "--quick", "--base-share", "1.5"], &["--base-share"]);
    refused(&["experiment", "growth", "--scale", "huge"], &["--scale"]);
    refused(&["experiment", "growth", "--quick", "--stage-lr", "sometimes"], &["--stage-lr"]);
    refused(&["experiment", "growth", "--quick", "--arms", "grown"], &["must include scratch"]);
    refused(&["experiment", "growth", "--quick", "--arms", "scratch,nope"], &["no arm 'nope'"]);
    refused(&["experiment", "growth", "--quick", "--seeds", "0"], &["--seeds must be 1 to"]);
    refused(&["experiment", "growth", "--quick", "--seeds", "101"], &["--seeds must be 1 to"]);
    // A directory that holds anything is not overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    refused(&["experiment", "growth", "--quick", "--out", s(&out)], &["not empty"]);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    // Another experiment's directory is continued only by its own command.
    let other = scratch.path("other");
    std::fs::create_dir_all(&other).unwrap();
    let manifest = r#"{"experiment": "growth", "command": "tokenformer experiment growth --quick --seed 7",
        "device": "cpu"}"#;
    std::fs::write(other.join("experiment.json"), manifest).unwrap();
    refused(
        &["experiment", "growth", "--quick", "--out", s(&other)],
        &["holds the experiment `tokenformer experiment growth --quick --seed 7`"],
    );
    std::fs::write(other.join("experiment.json"), "{not json").unwrap();
    refused(&["experiment", "growth", "--quick", "--out", s(&other)], &["experiment.json"]);
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1, "nothing written");
}

#[test]
fn absurd_growth_counts_are_refused_before_anything_is_allocated() {
    for growths in ["10000000000", "18446744073709551615", "12"] {
        refused(
            &["experiment", "growth", "--quick", "--growths", growths],
            &[&format!("--growths {growths}: at most 11 growths fit 120 steps"), "fewer --growths"],
        );
    }
}

#[test]
fn an_interrupted_experiment_exits_with_an_error_and_the_same_command_continues_it() {
    let scratch = Scratch::new("interrupted");
    let out = scratch.path("out");
    let mut child = Command::new(BIN)
        .args(["experiment", "growth", "--quick", "--out", s(&out)])
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped as Ctrl-C would, once the first arm is training.
    let metrics = out.join("seed-1337").join("scratch").join("metrics.jsonl");
    let start = std::time::Instant::now();
    while !metrics.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the experiment ended before its first arm");
        assert!(start.elapsed().as_secs() < 60, "no metrics after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: experiment growth was stopped before it finished")
            && last.contains("continues it"),
        "{stderr}"
    );
    assert!(!out.join("results.json").exists());
    // The same command continues it from the checkpoint the stop saved.
    let output = run(&["experiment", "growth", "--quick", "--out", s(&out)], None);
    assert!(output.status.success(), "{:?}", texts(&output));
    assert!(out.join("results.json").is_file());
}
