//! Growth as a training workflow (docs/growth.md): `train --grow-at` grows the model exactly
//! in the middle of a run, so the first loss after each growth is the loss the smaller model
//! would have had; stopping and resuming across a growth point gives the run that never
//! stopped, bit for bit; metrics rows count parameters, stages and FLOPs; `--freeze-old`
//! leaves every old token and its moments untouched; and the Transformer baseline runs through
//! the same commands.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::Scratch;
use tokenformer::core::{Device, Tensor};
use tokenformer::models::checkpoint::load_checkpoint;
use tokenformer::models::growth::{grow_checkpoint, GrowSpec, GrowthPoint};
use tokenformer::models::metrics::{read_metrics, Record};
use tokenformer::models::train::{
    resume_plan, train_new, train_resume, train_resume_options, train_resume_with, ResumeOptions,
    StageLr, TrainControl, TrainSettings,
};
use tokenformer::models::ModelConfig;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");

impl Scratch {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(&self.0).stdin(Stdio::null());
        cmd
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "{args:?} failed\nstdout: {stdout}\nstderr: {stderr}");
        stdout
    }

    /// Runs a command that must fail with one `error:` line; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        let (_, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        errors[0].to_string()
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn metrics(dir: &Path) -> Vec<Record> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

fn field(r: &Record, name: &str) -> f64 {
    r.extra[name].as_f64().unwrap_or_else(|| panic!("row {} has no {name}", r.step))
}

/// (step, loss bits, val_loss bits, params, stage, flops bits) of one metrics row.
type Row = (u64, u64, Option<u64>, u64, u64, u64);

fn history(dir: &Path) -> Vec<Row> {
    metrics(dir)
        .iter()
        .map(|r| {
            let p = field(r, "params") as u64;
            let (stage, flops) = (field(r, "stage") as u64, field(r, "flops").to_bits());
            (r.step, r.loss.to_bits(), r.val_loss.map(f64::to_bits), p, stage, flops)
        })
        .collect()
}

fn bytes(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// Flags of a short run on the built-in corpus (without --steps and --eval-every).
const RUN: [&str; 10] = [
    "--batch",
    "2",
    "--seq",
    "16",
    "--warmup",
    "2",
    "--sample-tokens",
    "0",
    "--stage-lr",
    "continue",
];

/// Nine steps, evaluated every three.
const NINE: [&str; 4] = ["--steps", "9", "--eval-every", "3"];

const FIRST: &str = "3:qkv=+5,proj=+3,ffn=+17";
const SECOND: &str = "6:layers=+2,layer-at=interleave,ffn=+4";

#[test]
fn each_growth_starts_from_the_loss_of_the_model_before_it() {
    let t = Scratch::new("two-growths");
    let run = |name: &str, grow: &[&str]| {
        let dir = t.path(name);
        let mut args = vec!["train", "--out", s(&dir)];
        args.extend(RUN);
        args.extend(NINE);
        for g in grow {
            args.extend(["--grow-at", g]);
        }
        let stderr = texts(&t.command(&args).output().unwrap()).1;
        assert!(stderr.contains("finished 9 steps"), "{stderr}");
        (history(&dir), stderr)
    };
    let (none, _) = run("none", &[]);
    let (first, _) = run("first", &[FIRST]);
    let (both, stderr) = run("both", &[FIRST, SECOND]);
    assert!(stderr.contains("grew (exact)"), "{stderr}");

    let loss = |h: &[Row], step: u64| h[step as usize - 1].1;
    // Steps 1-3 are the same run; step 4 is the first step of the grown model, on the batch the
    // small model would have seen: the same loss, bit for bit.
    for step in 1..=4 {
        assert_eq!(loss(&both, step), loss(&none, step), "step {step}");
    }
    // Likewise step 7, the first after the second growth, against the run that grew once.
    for step in 1..=7 {
        assert_eq!(loss(&both, step), loss(&first, step), "step {step}");
    }
    assert_ne!(loss(&both, 8), loss(&first, 8), "the grown model trained like the small one");

    // params and stage change exactly at the growth points.
    let tiny = ModelConfig::preset("tiny").unwrap();
    let g1: GrowthPoint = FIRST.parse().unwrap();
    let g2: GrowthPoint = SECOND.parse().unwrap();
    let c1 = g1.target.resolve(&tiny, 0).unwrap().apply(&tiny).unwrap();
    let c2 = g2.target.resolve(&c1, 0).unwrap().apply(&c1).unwrap();
    assert_eq!(c2.n_layers, 6);
    for (step, _, _, params, stage, _) in &both {
        let (want_params, want_stage) = match step {
            1..=3 => (tiny.param_count(), 0),
            4..=6 => (c1.param_count(), 1),
            _ => (c2.param_count(), 2),
        };
        assert_eq!((*params as usize, *stage), (want_params, want_stage), "step {step}");
    }
}

#[test]
fn flops_per_step_jump_at_a_growth_by_the_added_work() {
    let t = Scratch::new("flops");
    let dir = t.path("run");
    let mut args = vec!["train", "--out", s(&dir)];
    args.extend(RUN);
    args.extend(["--grow-at", FIRST, "--grow-at", SECOND, "--steps", "8", "--eval-every", "4"]);
    t.ok(&args);
    let rows = metrics(&dir);
    let flops: Vec<f64> = rows.iter().map(|r| field(r, "flops")).collect();
    let per_step: Vec<f64> =
        std::iter::once(flops[0]).chain(flops.windows(2).map(|w| w[1] - w[0])).collect();
    // 32 tokens a step (batch 2 × seq 16), tiny: L = 4, d = 128, V = 256.
    let tokens = 32.0;
    let (d, seq) = (128.0, 16.0);
    let tiny_per_token =
        6.0 * (2.0 * d * 4.0 * (3.0 * 128.0 + 128.0 + 512.0) + 256.0 * d) + 12.0 * 4.0 * d * seq;
    assert_eq!(per_step[0], tokens * tiny_per_token);
    assert!(per_step[..3].iter().all(|&f| f == per_step[0]), "{per_step:?}");
    // Growth 1 adds 3·5 + 3 + 17 = 35 tokens to each of 4 layers: 6·2·d·4·35 FLOPs a token.
    let jump1 = tokens * 6.0 * 2.0 * d * 4.0 * 35.0;
    assert_eq!(per_step[3] - per_step[2], jump1);
    // Growth 2 adds 4 FFN tokens to the 4 old layers, and 2 layers of 3·133 + 131 + 533 tokens
    // each, with their attention (12·d·T a token per layer).
    let new_layer = 2.0 * d * (3.0 * 133.0 + 131.0 + 533.0);
    let jump2 = tokens * (6.0 * (2.0 * d * 4.0 * 4.0 + 2.0 * new_layer) + 12.0 * 2.0 * d * seq);
    assert_eq!(per_step[6] - per_step[5], jump2);
    assert_eq!(per_step[7], per_step[6]);
}

#[test]
fn restarted_stages_warm_up_again() {
    let t = Scratch::new("restart");
    let dir = t.path("run");
    let mut args = vec!["train", "--out", s(&dir)];
    args.extend(&RUN[..8]);
    args.extend(NINE);
    args.extend(["--grow-at", "4:ffn=+8", "--stage-lr", "restart", "--min-lr", "0"]);
    t.ok(&args);
    let lr: Vec<f64> = metrics(&dir).iter().map(|r| r.lr).collect();
    // Warmup 2 then cosine to 0 over steps 1-4, and again over steps 5-9.
    assert_eq!(lr[0], lr[4]);
    assert_eq!(lr[1], lr[5]);
    assert!(lr[3] < lr[2] && lr[8] < lr[7], "{lr:?}");
    let saved: serde_json::Value =
        serde_json::from_slice(&bytes(&dir, "train_state.json")).unwrap();
    assert_eq!(saved["settings"]["stage_lr"], "restart");
    assert_eq!(saved["settings"]["grow_at"][0], "4:ffn=+8");
}

/// Waits until `dir` has `lines` metrics rows.
fn wait_for_lines(child: &mut Child, dir: &Path, lines: usize) {
    let start = Instant::now();
    let count =
        || std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    while count() < lines {
        assert!(child.try_wait().unwrap().is_none(), "training exited early");
        assert!(start.elapsed() < Duration::from_secs(60), "no {lines} rows after 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_run_interrupted_after_a_growth_resumes_bit_identically() {
    let t = Scratch::new("cli-resume");
    let (straight, stopped) = (t.path("straight"), t.path("stopped"));
    let flags = |dir: &Path| -> Vec<String> {
        let mut args: Vec<String> =
            ["train", "--out", s(dir)].into_iter().map(String::from).collect();
        args.extend(RUN.iter().map(|a| a.to_string()));
        args.extend(
            ["--steps", "40", "--eval-every", "10", "--grow-at", FIRST, "--grow-at"]
                .map(String::from),
        );
        args.push(SECOND.into());
        args
    };
    t.ok(&as_str(&flags(&straight)));

    let mut child = t.command(&as_str(&flags(&stopped))).stderr(Stdio::piped()).spawn().unwrap();
    // After the first growth (step 3), at a moment the signal decides.
    wait_for_lines(&mut child, &stopped, 5);
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resume"), "{stderr}");
    t.ok(&["train", "--resume", s(&stopped), "--sample-tokens", "0"]);

    assert_eq!(history(&straight), history(&stopped));
    for file in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(bytes(&straight, file) == bytes(&stopped, file), "{file} differs");
    }
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn settings(steps: u64, grow_at: &[&str]) -> TrainSettings {
    TrainSettings {
        steps,
        batch: 2,
        seq: 16,
        warmup: 2,
        eval_every: 3,
        eval_windows: 4,
        save_every: 100,
        grow_at: grow_at.iter().map(|g| g.parse().unwrap()).collect(),
        stage_lr: StageLr::Restart,
        ..TrainSettings::default()
    }
}

/// A control that requests a stop after micro-batch 0 of step `step` (0-based).
fn stop_at(step: u64) -> TrainControl {
    let control = TrainControl { quiet: true, ..TrainControl::default() };
    let stop = control.stop.clone();
    TrainControl {
        after_micro_batch: Some(Box::new(move |s, _| {
            if s == step {
                stop.store(true, Ordering::SeqCst);
            }
        })),
        ..control
    }
}

fn quiet() -> TrainControl {
    TrainControl { quiet: true, ..TrainControl::default() }
}

#[test]
fn stopping_just_before_or_just_after_a_growth_resumes_bit_identically() {
    let t = Scratch::new("lib-resume");
    let grow = [FIRST, SECOND];
    let straight = t.path("straight");
    let summary = train_new(&straight, settings(8, &grow), Device::Cpu, quiet()).unwrap();
    // The evaluations this process ran, with what had been spent to reach them.
    let steps: Vec<u64> = summary.evaluations.iter().map(|e| e.step).collect();
    assert_eq!(steps, [3, 6, 8]);
    assert!(summary.evaluations.windows(2).all(|w| w[1].flops > w[0].flops));
    assert_eq!(summary.evaluations[1].stage, 1);
    // Step index 3 is the first step of the grown model (the growth runs before it), index 2
    // the last of the small one; index 6 the first after the second growth.
    for stop in [2u64, 3, 6] {
        let dir = t.path(&format!("stop{stop}"));
        let summary = train_new(&dir, settings(8, &grow), Device::Cpu, stop_at(stop)).unwrap();
        assert!(summary.interrupted && summary.step == stop);
        train_resume(&dir, Device::Cpu, quiet()).unwrap();
        assert_eq!(history(&straight), history(&dir), "stopped at {stop}");
        for file in ["model.safetensors", "optimizer.safetensors", "config.json"] {
            assert!(bytes(&straight, file) == bytes(&dir, file), "stop {stop}: {file} differs");
        }
    }
}

/// (name, values) of every parameter, or of every moment of `which` ("m" or "v").
fn tensors(dir: &Path, which: Option<usize>) -> Vec<(String, Vec<f32>)> {
    let ckpt = load_checkpoint(dir).unwrap();
    let list = match which {
        None => ckpt.params,
        Some(0) => ckpt.optimizer.unwrap().0,
        Some(_) => ckpt.optimizer.unwrap().1,
    };
    list.into_iter().map(|(n, t): (String, Tensor)| (n, t.to_vec().unwrap())).collect()
}

/// Checks that the first `old[name]` rows' worth of values of each tensor are unchanged between
/// `before` and `after`, and that every tensor with new rows has changed somewhere in them.
fn assert_old_fixed_new_trained(
    before: &[(String, Vec<f32>)],
    after: &[(String, Vec<f32>)],
    old_len: &dyn Fn(&str, usize) -> usize,
    what: &str,
) {
    let mut trained = 0;
    for ((name, a), (name2, b)) in before.iter().zip(after) {
        assert_eq!(name, name2);
        let old = old_len(name, a.len());
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same(&a[..old], &b[..old]), "{what}: old part of {name} changed");
        if old < a.len() {
            assert!(!same(&a[old..], &b[old..]), "{what}: new part of {name} did not train");
            trained += 1;
        }
    }
    assert!(trained > 0, "{what}: nothing new");
}

#[test]
fn freeze_old_trains_only_what_the_growth_added() {
    let t = Scratch::new("freeze");
    let grown_at = t.path("run");
    let mut s = settings(7, &["3:qkv=+4,ffn=+8,layers=+1"]);
    s.freeze_old = true;
    // Stopped right after the growth: the saved state is the grown model before its first step.
    train_new(&grown_at, s, Device::Cpu, stop_at(3)).unwrap();
    let (params0, m0, v0) =
        (tensors(&grown_at, None), tensors(&grown_at, Some(0)), tensors(&grown_at, Some(1)));
    let state: serde_json::Value =
        serde_json::from_slice(&bytes(&grown_at, "train_state.json")).unwrap();
    let old_rows = state["old_rows"].clone();
    let d = 128;
    let old_len = |name: &str, len: usize| {
        let rows = old_rows[name].as_u64().unwrap() as usize;
        if name.starts_with("final_norm") { rows } else { rows * d }.min(len)
    };
    train_resume(&grown_at, Device::Cpu, quiet()).unwrap();
    assert_old_fixed_new_trained(&params0, &tensors(&grown_at, None), &old_len, "parameters");
    assert_old_fixed_new_trained(&m0, &tensors(&grown_at, Some(0)), &old_len, "first moments");
    assert_old_fixed_new_trained(&v0, &tensors(&grown_at, Some(1)), &old_len, "second moments");

    // The same through `grow` on a run and `--resume --freeze-old`.
    let small = t.path("small");
    train_new(&small, settings(6, &[]), Device::Cpu, stop_at(3)).unwrap();
    let grown = t.path("grown");
    let spec = GrowSpec { ffn: 6, layers: 1, seed: 2, ..GrowSpec::default() };
    grow_checkpoint(&small, &grown, &spec, Device::Cpu).unwrap();
    let before = tensors(&grown, None);
    let state: serde_json::Value =
        serde_json::from_slice(&bytes(&grown, "train_state.json")).unwrap();
    assert_eq!(state["stage"], 1);
    let old_rows = state["old_rows"].clone();
    let old_len = |name: &str, len: usize| {
        let rows = old_rows[name].as_u64().unwrap() as usize;
        if name.starts_with("final_norm") { rows } else { rows * d }.min(len)
    };
    train_resume_with(&grown, Device::Cpu, quiet(), true).unwrap();
    assert_old_fixed_new_trained(&before, &tensors(&grown, None), &old_len, "after grow");
    let saved: serde_json::Value =
        serde_json::from_slice(&bytes(&grown, "train_state.json")).unwrap();
    assert_eq!(saved["settings"]["freeze_old"], true);

    // Nothing is old in a run that never grew.
    let err = train_resume_with(&small, Device::Cpu, quiet(), true).unwrap_err().to_string();
    assert!(err.contains("nothing is old"), "{err}");
}

#[test]
fn grow_carries_the_run_files_and_nothing_else() {
    let t = Scratch::new("carry");
    let (run, grown) = (t.path("run"), t.path("grown"));
    t.ok(&[&["train", "--out", s(&run), "--steps", "2"][..], &RUN].concat());
    // Someone's notes, a folder, and a loss plot that is a link to a file outside the run.
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir(run.join("plots")).unwrap();
    let outside = t.path("outside.png");
    std::fs::write(&outside, "not ours").unwrap();
    std::fs::remove_file(run.join("loss.png")).ok();
    std::os::unix::fs::symlink(&outside, run.join("loss.png")).unwrap();
    t.ok(&["grow", "--checkpoint", s(&run), "--out", s(&grown), "--ffn", "2"]);
    assert_eq!(bytes(&grown, "metrics.jsonl"), bytes(&run, "metrics.jsonl"));
    let caches = std::fs::read_dir(&run).unwrap().filter_map(|e| {
        let name = e.unwrap().file_name().into_string().unwrap();
        name.ends_with(".tokens").then_some(name)
    });
    for cache in caches {
        assert_eq!(bytes(&grown, &cache), bytes(&run, &cache), "{cache}");
    }
    for name in ["notes.txt", "plots", "loss.png"] {
        assert!(!grown.join(name).exists(), "grow carried {name}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"not ours");
}

#[test]
fn growth_flags_are_checked_before_anything_is_written() {
    let t = Scratch::new("bad-flags");
    let dir = t.path("run");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--out", s(&dir), "--steps", "5"];
        args.extend(extra);
        let err = t.fails(&args);
        assert!(!dir.exists(), "{extra:?} left a directory");
        err
    };
    for (flags, says) in [
        (&["--grow-at", "ffn=+4"][..], "STEP:SPEC"),
        (&["--grow-at", "3:ffn=4x"], "not +N or N"),
        (&["--grow-at", "3:width=+4"], "unknown or repeated key 'width'"),
        (&["--grow-at", "5:ffn=+4"], "1..5"),
        (&["--grow-at", "3:ffn=+4", "--grow-at", "2:qkv=+1"], "increase"),
        (&["--grow-at", "3:ffn=10"], "ffn=10 is fewer than the model's 512"),
        (&["--grow-at", "3:preset=150M"], "d_model"),
        (&["--grow-at", "3:ffn=+4", "--arch", "transformer"], "no parameter tokens"),
        (&["--freeze-old"], "--grow-at"),
        (&["--stage-lr", "sometimes"], "restart or continue"),
    ] {
        let err = train(flags);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    // `grow` from a directory that holds no checkpoint, or from a file.
    let plain = t.path("plain");
    std::fs::create_dir(&plain).unwrap();
    let file = t.path("file");
    std::fs::write(&file, "").unwrap();
    for from in [&plain, &file] {
        let err = t.fails(&["grow", "--checkpoint", s(from), "--out", s(&dir), "--ffn", "2"]);
        assert!(err.contains("is not a checkpoint directory"), "{err}");
        assert!(!dir.exists(), "a refused grow left a directory");
    }
    // `grow` from a checkpoint into itself, or to a size that no memory holds.
    let ck = t.path("ck");
    t.ok(&["init", "--preset", "tiny", "--out", s(&ck)]);
    let err = t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&ck), "--ffn", "2"]);
    assert!(err.contains("--out must differ from --checkpoint"), "{err}");
    let err =
        t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&dir), "--ffn", "1000000000000"]);
    assert!(err.contains("would need") && err.contains("of memory"), "{err}");
    assert!(!dir.exists(), "a refused grow left a directory");
}

#[test]
fn info_counts_parameters_and_flops_of_both_archs() {
    let t = Scratch::new("info");
    let line = |out: &str, what: &str| -> String {
        let l = out
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("{what}: {out}"));
        l.rsplit(' ').next().unwrap().to_string()
    };
    let tokenformer = t.ok(&["info", "--preset", "tiny"]);
    assert_eq!(line(&tokenformer, "total parameters"), "1,081,600");
    // 6 · (2·128·4·1024 + 256·128) + 12·4·128·256
    assert_eq!(line(&tokenformer, "training FLOPs per token"), "8,060,928");
    assert!(tokenformer.contains("\"arch\": \"tokenformer\""), "{tokenformer}");

    let transformer = t.ok(&["info", "--preset", "tiny", "--arch", "transformer"]);
    assert!(transformer.contains("\"d_ff\": 512") && !transformer.contains("qkv_tokens"));
    // 256·128 + 4·(4·(128² + 128) + 2·128·512 + 512 + 128) + 2·128
    assert_eq!(line(&transformer, "total parameters"), "824,064");
    // 6 · (4·(4·128² + 2·128·512) + 256·128) + 12·4·128·256
    assert_eq!(line(&transformer, "training FLOPs per token"), "6,488,064");
    let matched = t.ok(&["info", "--preset", "tiny", "--arch", "transformer", "--d-ff", "match"]);
    assert!(matched.contains("\"d_ff\": 763"), "{matched}");
    assert_eq!(line(&matched, "total parameters"), "1,082,092");

    let err = t.fails(&["info", "--preset", "tiny", "--d-ff", "64"]);
    assert!(err.contains("--arch transformer"), "{err}");
    let err = t.fails(&["info", "--preset", "tiny", "--arch", "mamba"]);
    assert!(err.contains("mamba"), "{err}");
}

#[test]
fn the_transformer_baseline_runs_through_every_command() {
    let t = Scratch::new("transformer");
    let ck = t.path("ck");
    let out = t.ok(&[
        "init",
        "--preset",
        "tiny",
        "--arch",
        "transformer",
        "--d-ff",
        "64",
        "--out",
        s(&ck),
    ]);
    assert!(out.contains("transformer") && out.contains("363,520"), "{out}");
    let ids = t.path("ids");
    std::fs::write(
        &ids,
        (0..300).map(|i| ((i * 7) % 256).to_string()).collect::<Vec<_>>().join(" "),
    )
    .unwrap();
    let eval = t.ok(&["eval", "--checkpoint", s(&ck), "--tokens", s(&ids), "--json"]);
    assert!(eval.contains("\"tokens\":299"), "{eval}");
    let sample =
        t.command(&["generate", "--checkpoint", s(&ck), "--max-tokens", "8"]).output().unwrap();
    assert!(sample.status.success());
    let err = t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&t.path("g")), "--ffn", "4"]);
    assert!(err.contains("transformer has no parameter tokens"), "{err}");
    assert!(!t.path("g").exists());
    let err = t.fails(&[
        "init",
        "--preset",
        "tiny",
        "--arch",
        "transformer",
        "--norm",
        "softmax",
        "--out",
        s(&t.path("x")),
    ]);
    assert!(err.contains("--norm"), "{err}");

    let run = t.path("run");
    let mut args = vec!["train", "--out", s(&run), "--arch", "transformer", "--d-ff", "match"];
    args.extend(RUN);
    args.extend(NINE);
    t.ok(&args);
    let config: serde_json::Value = serde_json::from_slice(&bytes(&run, "config.json")).unwrap();
    assert_eq!(
        (config["arch"].as_str(), config["d_ff"].as_u64()),
        (Some("transformer"), Some(763))
    );
    let rows = metrics(&run);
    assert_eq!(field(&rows[0], "params") as u64, 1_082_092);
    // A resumed transformer run keeps its arch; contradicting it is refused.
    let err = t.fails(&["train", "--resume", s(&run), "--arch", "tokenformer"]);
    assert!(err.contains("arch"), "{err}");
    let bench = t.ok(&[
        "bench",
        "--arch",
        "transformer",
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq",
        "8",
        "--matmul",
        "0",
        "--json",
    ]);
    let bench: serde_json::Value = serde_json::from_str(bench.trim()).unwrap();
    assert_eq!(bench["params"], 824_064);
}

#[test]
fn runs_saved_before_growth_schedules_resume() {
    let t = Scratch::new("old-state");
    let dir = t.path("run");
    train_new(&dir, settings(4, &[]), Device::Cpu, stop_at(2)).unwrap();
    // Strip what this version added to the train state and settings, as an older run has it.
    let mut state: serde_json::Value =
        serde_json::from_slice(&bytes(&dir, "train_state.json")).unwrap();
    for key in ["stage", "stage_start", "scheduled", "flops", "old_rows"] {
        state.as_object_mut().unwrap().remove(key);
    }
    for key in ["arch", "d_ff", "grow_at", "stage_lr", "freeze_old"] {
        state["settings"].as_object_mut().unwrap().remove(key);
    }
    std::fs::write(dir.join("train_state.json"), state.to_string()).unwrap();
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    train_resume(&dir, Device::Cpu, quiet()).unwrap();
    let rows = metrics(&dir);
    assert_eq!(rows.len(), 4);
    // FLOPs of the steps before the resume are counted as the model now is: 32 tokens a step.
    let per_step = 32.0 * ModelConfig::preset("tiny").unwrap().train_flops_per_token(16);
    assert_eq!(field(&rows[3], "flops"), 4.0 * per_step);
    let saved: serde_json::Value =
        serde_json::from_slice(&bytes(&dir, "train_state.json")).unwrap();
    assert_eq!(saved["settings"]["stage_lr"], "continue");
}

/// Every file of a checkpoint directory that holds numbers: the model and AdamW's moments.
fn checkpoint_bits(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .safetensors in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn train_grow_and_train_on_is_the_run_that_grew_on_schedule() {
    let t = Scratch::new("extend");
    // Twelve steps that grow at step 6, restarting the learning rate there ...
    let whole = t.path("whole");
    let mut args = vec!["train", "--out", s(&whole)];
    args.extend(&RUN[..8]);
    args.extend(["--steps", "12", "--eval-every", "3", "--grow-at", "6:ffn=+8"]);
    args.extend(["--stage-lr", "restart"]);
    t.ok(&args);

    // ... and six steps, `grow` with the same new tokens, then `--resume --steps 12`.
    let part = t.path("part");
    let mut args = vec!["train", "--out", s(&part)];
    args.extend(&RUN[..8]);
    args.extend(["--steps", "6", "--eval-every", "3", "--stage-lr", "restart"]);
    t.ok(&args);
    let grown = t.path("grown");
    let seed = TrainSettings::default().growth_seed(0).to_string();
    t.ok(&["grow", "--checkpoint", s(&part), "--out", s(&grown), "--ffn", "8", "--seed", &seed]);
    let mut finished = t.command(&["train", "--resume", s(&grown), "--sample-tokens", "0"]);
    let stderr = texts(&finished.output().unwrap()).1;
    assert!(stderr.contains("complete (step 6 of 6; --steps N"), "{stderr}");
    let mut out =
        t.command(&["train", "--resume", s(&grown), "--steps", "12", "--sample-tokens", "0"]);
    let out = out.output().unwrap();
    let stderr = texts(&out).1;
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("extending") && stderr.contains("from 6 to 12 steps"), "{stderr}");
    assert!(
        stderr.contains("step      6: learning rate: warmup restarts: 2 steps to 5e-3, then cosine to 5e-4 at step 12"),
        "{stderr}"
    );
    assert_eq!(history(&grown), history(&whole));
    assert_eq!(checkpoint_bits(&grown), checkpoint_bits(&whole));
    let saved: serde_json::Value =
        serde_json::from_slice(&bytes(&grown, "train_state.json")).unwrap();
    assert_eq!((saved["step"].as_u64(), saved["settings"]["steps"].as_u64()), (Some(12), Some(12)));

    // A finished run that never grew extends too; with `continue` its one schedule now runs
    // to the new end, and the growth-less run asked for 12 steps has the same rates from there.
    let mut out =
        t.command(&["train", "--resume", s(&part), "--steps", "12", "--stage-lr", "continue"]);
    let out = out.arg("--sample-tokens").arg("0").output().unwrap();
    let stderr = texts(&out).1;
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("continues the run's one schedule over 12 steps"), "{stderr}");
    let straight = t.path("straight");
    let mut args = vec!["train", "--out", s(&straight)];
    args.extend(RUN);
    args.extend(["--steps", "12", "--eval-every", "3"]);
    t.ok(&args);
    let rates = |dir: &Path| metrics(dir).iter().map(|r| r.lr.to_bits()).collect::<Vec<_>>();
    assert_eq!(rates(&part)[6..], rates(&straight)[6..]);
    assert_ne!(rates(&part)[..6], rates(&straight)[..6]);
}

#[test]
fn a_schedule_changes_only_where_a_stage_begins() {
    let t = Scratch::new("extend-refused");
    let dir = t.path("run");
    train_new(&dir, settings(6, &[]), Device::Cpu, stop_at(3)).unwrap();
    let before = checkpoint_bits(&dir);
    let options = |steps, stage_lr| ResumeOptions { steps, stage_lr, ..ResumeOptions::default() };
    // In the middle of its only stage: the steps already taken assumed the old end.
    for (steps, stage_lr, flag) in
        [(Some(9), None, "--steps 9"), (None, Some(StageLr::Continue), "--stage-lr continue")]
    {
        let err = resume_plan(&dir, &options(steps, stage_lr)).unwrap_err().to_string();
        assert!(err.contains(flag) && err.contains("contradicts"), "{err}");
        let err = train_resume_options(&dir, Device::Cpu, quiet(), &options(steps, stage_lr))
            .unwrap_err()
            .to_string();
        assert!(err.contains(flag), "{err}");
    }
    assert_eq!(checkpoint_bits(&dir), before, "a refused resume changed the checkpoint");
    // Fewer steps than it has taken is no extension.
    let err = resume_plan(&dir, &options(Some(2), None)).unwrap_err().to_string();
    assert!(err.contains("has taken 3 steps"), "{err}");
    // Finished, it extends, and the new stage may choose its schedule.
    train_resume(&dir, Device::Cpu, quiet()).unwrap();
    let plan = resume_plan(&dir, &options(Some(9), Some(StageLr::Continue))).unwrap();
    assert_eq!((plan.step, plan.extends, plan.settings.steps), (6, Some(6), 9));
    train_resume_options(&dir, Device::Cpu, quiet(), &options(Some(9), Some(StageLr::Continue)))
        .unwrap();
    let rows = metrics(&dir);
    assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
}

#[test]
fn train_and_experiment_share_one_stage_schedule_and_say_what_it_does() {
    assert_eq!(TrainSettings::default().stage_lr, StageLr::Continue);
    let plan =
        tokenformer::models::experiment::Plan::new(tokenformer::models::experiment::Scale::Quick);
    assert_eq!(plan.stage_lr, TrainSettings::default().stage_lr);

    let t = Scratch::new("rate-lines");
    let dir = t.path("run");
    let mut args = vec!["train", "--out", s(&dir)];
    args.extend(&RUN[..4]);
    args.extend(["--steps", "9", "--eval-every", "3", "--grow-at", "3:ffn=+8"]);
    args.extend(["--grow-at", "6:ffn=+8", "--stage-lr", "restart", "--warmup", "0"]);
    args.extend(["--sample-tokens", "0"]);
    let stderr = texts(&t.command(&args).output().unwrap()).1;
    assert!(
        stderr
            .contains("step      3: learning rate restarts at 5e-3, then cosine to 5e-4 at step 6"),
        "{stderr}"
    );
    assert!(stderr.contains("restarts at 5e-3, then cosine to 5e-4 at step 9"), "{stderr}");
    let dir = t.path("default");
    let mut args = vec!["train", "--out", s(&dir)];
    args.extend(&RUN[..8]);
    args.extend(["--steps", "9", "--eval-every", "3", "--grow-at", "3:ffn=+8"]);
    let stderr = texts(&t.command(&args).output().unwrap()).1;
    let line =
        stderr.lines().find(|l| l.contains("learning rate")).unwrap_or_else(|| panic!("{stderr}"));
    let rate_at_4 = metrics(&dir)[3].lr as f32;
    assert!(
        line.ends_with(&format!(
            "learning rate continues the run's one schedule over 9 steps: {} now, cosine to 5e-4 at step 9 (--stage-lr continue)",
            shown_rate(rate_at_4)
        )),
        "{line}"
    );
}

/// A rate written as the run's messages write it (three significant digits).
fn shown_rate(lr: f32) -> String {
    let text = format!("{lr:.2e}");
    let (mantissa, exponent) = text.split_once('e').unwrap();
    format!("{}e{exponent}", mantissa.trim_end_matches('0').trim_end_matches('.'))
}
