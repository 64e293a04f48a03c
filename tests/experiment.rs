//! `tokenformer experiment growth --quick` end to end: five arms, each an ordinary run
//! directory; the table, results.json and the plot written; FLOPs increasing in every arm's
//! metrics, the growths recorded in the grown arms' metrics; and the same seed giving the same
//! table, bit for bit, whatever the thread count. Plus the one-line refusals of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tokenformer::models::metrics::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");
/// The repository root, where the experiment's books are (`data/gutenberg`).
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ARMS: [&str; 5] = ["scratch", "grown", "transformer", "grown-random", "grown-frozen"];

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tf-experiment-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

fn quick(out: &Path, threads: &str) -> serde_json::Value {
    let output = run(&["experiment", "growth", "--quick", "--out", s(out)], Some(threads));
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The table on stdout: a header, a rule and one row per arm.
    for arm in ARMS {
        assert!(stdout.contains(&format!("| {arm} |")), "{stdout}");
    }
    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

/// The numbers of a results.json that must repeat exactly: everything but wall times.
fn losses_and_flops(results: &serde_json::Value) -> Vec<(String, u64, f64, f64)> {
    let mut out = Vec::new();
    for arm in results["arms"].as_array().unwrap() {
        for e in arm["evaluations"].as_array().unwrap() {
            out.push((
                arm["name"].as_str().unwrap().to_string(),
                e["step"].as_u64().unwrap(),
                e["val_loss"].as_f64().unwrap(),
                e["flops"].as_f64().unwrap(),
            ));
        }
    }
    out
}

#[test]
fn quick_growth_experiment_end_to_end_and_reproducible() {
    let scratch = Scratch::new("quick");
    let (a, b) = (scratch.path("a"), scratch.path("b"));
    let results = quick(&a, "2");

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
    let target = results["target_val_loss"].as_f64().unwrap();
    assert_eq!(target, arms[0]["final_val_loss"].as_f64().unwrap());
    let budget = results["budget_tokens"].as_u64().unwrap();
    let final_params = arms[0]["params"].as_u64().unwrap();
    for arm in arms {
        let name = arm["name"].as_str().unwrap();
        assert_eq!(arm["tokens"].as_u64().unwrap(), budget, "{name}");
        let dir = a.join(name);
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
        // Growth steps: where the stage changes, the parameter count jumps.
        let stage = extra("stage");
        let params = extra("params");
        let grew: Vec<u64> = records
            .windows(2)
            .filter(|w| w[1].extra["stage"] != w[0].extra["stage"])
            .map(|w| w[0].step)
            .collect();
        let marks: Vec<u64> = arm["growths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["step"].as_u64().unwrap())
            .collect();
        if name.starts_with("grown") {
            assert_eq!(grew, grow_at, "{name}: growth steps in metrics.jsonl");
            assert_eq!(marks, grow_at, "{name}: growth points in results.json");
            assert_eq!(*stage.last().unwrap() as usize, grow_at.len(), "{name}");
            assert!(params.windows(2).all(|w| w[1] >= w[0]), "{name}: {params:?}");
            assert!(params[0] < *params.last().unwrap(), "{name}: {params:?}");
            assert_eq!(*params.last().unwrap() as u64, final_params, "{name}");
        } else {
            assert!(grew.is_empty() && marks.is_empty(), "{name}: no growth");
        }
        // FLOPs to the target: the first evaluation at or below scratch's final loss.
        let evaluations = arm["evaluations"].as_array().unwrap();
        let first = evaluations.iter().find(|e| e["val_loss"].as_f64().unwrap() <= target);
        assert_eq!(
            arm["flops_to_target"],
            first.map_or(serde_json::Value::Null, |e| e["flops"].clone())
        );
    }
    // The grown arms see the same tokens with fewer FLOPs.
    let scratch_flops = arms[0]["flops"].as_f64().unwrap();
    assert!(arms[1]["flops"].as_f64().unwrap() < scratch_flops);

    let md = std::fs::read_to_string(a.join("results.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| arm")).count(), 5);
    assert!(md.contains("FLOPs to reach scratch's final loss"), "{md}");
    let png = std::fs::read(a.join("loss_vs_flops.png")).unwrap();
    assert!(png.len() > 10_000 && &png[1..4] == b"PNG");

    // Same seed, one thread instead of two: the same table, bit for bit.
    let again = quick(&b, "1");
    assert_eq!(losses_and_flops(&again), losses_and_flops(&results));
    assert_eq!(again["target_val_loss"], results["target_val_loss"]);
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
    // A directory that holds anything is not overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    refused(&["experiment", "growth", "--quick", "--out", s(&out)], &["not empty"]);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
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
fn an_interrupted_experiment_exits_with_an_error() {
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
    let metrics = out.join("scratch").join("metrics.jsonl");
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
        last.starts_with("error: experiment growth was stopped before it finished"),
        "{stderr}"
    );
    assert!(!out.join("results.json").exists());
}
