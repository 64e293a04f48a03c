//! A run directory is untrusted input: these tests drive the `tokenformer` command the way an
//! unlucky user or a hostile directory would — crafted manifests, planted links, readers and a
//! second writer during training, absurd sizes, endless files, NaN weights, a tampered token
//! cache, a run killed before its first save — and check that each ends in one clear line (or
//! a correct result), and that nothing outside the directory, and no checkpoint, is touched.
//!
//! Runs that must stop at an exact step are made in-process with the library (its stop hook);
//! everything a user does goes through the binary.

mod support;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::Scratch;

use tokenformer_core::safetensors_io::{load_safetensors, save_safetensors};
use tokenformer_core::Device;
use tokenformer_models::run_dir::RunLock;
use tokenformer_models::train::{train_new, TrainControl, TrainSettings};

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");

/// The file that marks a directory as one the tool made (`run_dir::MARKER_FILE`).
const MARKER_FILE: &str = "tokenformer-run";

/// Commands run with the scratch directory as their working directory.
impl Scratch {
    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(&self.0).stdin(Stdio::null());
        cmd
    }

    /// Runs a command to its end; one that takes over a minute has hung, and fails the test.
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let child = self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let mut child = child.expect("the tokenformer binary runs");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{} hung", show(args));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns (stdout, stderr).
    fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> (String, String) {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "{} failed ({:?})\n{stdout}\n{stderr}",
            show(args),
            out.status
        );
        (stdout, stderr)
    }

    /// Runs a command that must fail with exit status 1 and exactly one `error:` line, said
    /// last, no panic, no abort; returns that line.
    fn fails<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {:?}\n{stdout}\n{stderr}",
            show(args),
            out.status
        );
        assert!(!stderr.contains("panicked"), "{}: {stderr}", show(args));
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{}: want one error line:\n{stderr}", show(args));
        assert_eq!(stderr.lines().last(), Some(errors[0]), "{}:\n{stderr}", show(args));
        errors[0].to_string()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn show<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

/// Every entry of `dir` (not recursive) with its bytes; a link is recorded as its target. The
/// lock file is left out: a writer that is refused may still have taken the lock to look.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "run.lock")
        .map(|e| {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let content = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                format!("-> {}", target.display()).into_bytes()
            } else if meta.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                b"(not a file)".to_vec()
            };
            (e.file_name().into_string().unwrap(), content)
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

/// The settings of the small runs here: preset tiny on the built-in corpus, 2×16 tokens a
/// step, evaluated (on 128 windows) only at the end.
fn small_settings(steps: u64) -> TrainSettings {
    TrainSettings {
        steps,
        batch: 2,
        seq: 16,
        warmup: 2,
        eval_every: 1000,
        save_every: 1000,
        ..TrainSettings::default()
    }
}

/// The flags of `small_settings` for the command line, evaluating every `eval_every` steps.
fn small_flags(steps: u64, eval_every: u64) -> Vec<String> {
    let flags = ["--batch", "2", "--seq", "16", "--warmup", "2", "--save-every", "1000"];
    let mut out: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    out.extend(["--sample-tokens".into(), "0".into(), "--steps".into(), steps.to_string()]);
    out.extend(["--eval-every".into(), eval_every.to_string()]);
    out
}

fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// Starts a run in `dir` in this process and stops it as step `stop_at` begins, as a signal
/// would: the checkpoint is then at step `stop_at`, with metrics for steps 1..=stop_at.
fn run_stopped_at(dir: &Path, settings: TrainSettings, stop_at: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let control = TrainControl {
        stop,
        after_micro_batch: Some(Box::new(move |step, _| {
            if step == stop_at {
                flag.store(true, Ordering::SeqCst);
            }
        })),
        quiet: true,
    };
    let summary = train_new(dir, settings, Device::Cpu, control).unwrap();
    assert!(summary.interrupted && summary.step == stop_at, "{summary:?}");
}

fn manifest_step(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("checkpoint.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["step"].as_u64().unwrap()
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.matches('\n').count())
}

/// Waits (polling, 60 s at most) until `ready` holds while `child` runs.
fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited ({status}) before {what}");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("no {what} after 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill_9(mut child: Child) {
    let kill = Command::new("kill").args(["-9", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let _ = child.wait();
}

/// A file of whitespace-separated byte-vocabulary token ids.
fn id_text(n: usize) -> String {
    (0..n).map(|i| ((i * 37 + 11) % 256).to_string()).collect::<Vec<_>>().join(" ")
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// 1. Manifest entries name only the checkpoint's own files.

#[test]
fn a_crafted_pending_manifest_cannot_move_or_delete_anything() {
    let t = Scratch::new("manifest");
    let outside = t.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let victim = t.file("outside/victim", "precious");
    let run = t.path("run");
    run_stopped_at(&run, small_settings(3), 1);
    let ids = t.file("ids.txt", id_text(40));
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint.json")).unwrap())
            .unwrap();

    let mut outside_name = committed.clone();
    outside_name["files"]["../outside/victim"] = committed["files"]["model.safetensors"].clone();
    let mut outside_staged = committed.clone();
    outside_staged["staged"] = serde_json::json!({ "model.safetensors": "../outside/victim" });
    let mut absolute = committed.clone();
    absolute["staged"] = serde_json::json!({ "config.json": "/etc/hostname" });
    // A model-only save: finishing it would delete the run's training state.
    let mut model_only = committed.clone();
    let files = model_only["files"].as_object_mut().unwrap();
    files.remove("optimizer.safetensors");
    files.remove("train_state.json");

    for (pending, want) in [
        (outside_name, Some("not a checkpoint file")),
        (outside_staged, Some("not a temporary name")),
        (absolute, Some("not a temporary name")),
        (model_only, None),
    ] {
        std::fs::write(run.join("checkpoint.json.pending"), pending.to_string()).unwrap();
        let before = snapshot(&run);
        for args in [
            vec!["info", "--checkpoint", s(&run)],
            vec!["eval", "--checkpoint", s(&run), "--tokens", s(&ids)],
            vec!["generate", "--checkpoint", s(&run), "--max-tokens", "3"],
        ] {
            match want {
                Some(want) => {
                    let err = t.fails(&args);
                    assert!(err.contains("checkpoint.json.pending") && err.contains(want), "{err}");
                }
                // A well-formed pending save is what the readers read; they finish nothing.
                None => drop(t.ok(&args)),
            }
            assert_eq!(snapshot(&run), before, "{} changed the run directory", show(&args));
        }
        if want.is_some() {
            // A writer refuses to finish such a save, and changes nothing either.
            let err =
                t.fails(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
            assert!(err.contains("checkpoint.json.pending"), "{err}");
            assert_eq!(snapshot(&run), before);
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
    assert!(run.join("optimizer.safetensors").exists() && run.join("train_state.json").exists());
}

// ---------------------------------------------------------------------------------------------
// 2. No write goes through a link planted in a run directory.

/// Links at every temporary name earlier versions wrote through, each to its own file outside,
/// in a run directory (made and marked by a process that died at once, if it is new).
fn plant_links(t: &Scratch, dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(MARKER_FILE), "").unwrap();
    let names = [
        "config.json.tmp",
        "model.safetensors.tmp",
        "optimizer.safetensors.tmp",
        "train_state.json.tmp",
        "checkpoint.json.partial",
        ".model.safetensors.tmp-1",
        "loss.tmp1.png",
        ".write-test",
        "loss.png",
    ];
    names
        .iter()
        .map(|name| {
            let target = t.file(
                &format!("target-{}-{name}", dir.file_name().unwrap().to_str().unwrap()),
                "precious",
            );
            symlink(&target, &dir.join(name));
            target
        })
        .collect()
}

#[test]
fn planted_links_never_redirect_a_write() {
    let t = Scratch::new("links");
    let run = t.path("run");
    run_stopped_at(&run, small_settings(2), 1);
    let mut targets = plant_links(&t, &run);
    let (_, stderr) =
        t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    assert!(stderr.contains("finished 1 step"), "{stderr}");
    assert_eq!(manifest_step(&run), 2);

    let model = t.path("model");
    targets.extend(plant_links(&t, &model));
    t.ok(&["init", "--preset", "tiny", "--out", s(&model)]);

    let grown = t.path("grown");
    targets.extend(plant_links(&t, &grown));
    t.ok(&["grow", "--checkpoint", s(&run), "--out", s(&grown), "--ffn", "4"]);

    for target in &targets {
        assert_eq!(std::fs::read(target).unwrap(), b"precious", "{} was written", target.display());
    }
    // The links at temporary names are gone as strays; where a file was written (the plot of
    // the resumed run, the one grow copies), the link was replaced, not followed.
    for dir in [&run, &model, &grown] {
        for (name, content) in snapshot(dir) {
            let temporary = tokenformer_models::files::is_temp_name(&name);
            assert!(
                !(temporary && content.starts_with(b"-> ")),
                "{}: {name} is left",
                dir.display()
            );
        }
    }
    for dir in [&run, &grown] {
        assert!(std::fs::symlink_metadata(dir.join("loss.png")).unwrap().is_file());
    }
    assert!(
        std::fs::read(grown.join("loss.png")).unwrap()
            == std::fs::read(run.join("loss.png")).unwrap()
    );

    // A link in place of the metrics file of a run being resumed is refused, not followed.
    let run2 = t.path("run2");
    run_stopped_at(&run2, small_settings(2), 1);
    let before = std::fs::read(run2.join("metrics.jsonl")).unwrap();
    std::fs::remove_file(run2.join("metrics.jsonl")).unwrap();
    let target = t.file("target-run2-metrics", before.clone());
    symlink(&target, &run2.join("metrics.jsonl"));
    let err = t.fails(&[&["train", "--resume", s(&run2)][..], &["--sample-tokens", "0"]].concat());
    assert!(err.contains("metrics.jsonl") && err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// 3. Readers never modify what they read.

#[test]
fn readers_read_a_committed_save_where_it_lies_and_change_nothing() {
    let t = Scratch::new("readers");
    let ids = t.file("ids.txt", id_text(300));
    // The same run twice, stopped at steps 1 and 2: `later` holds the save that follows.
    let run = t.path("run");
    let later = t.path("later");
    run_stopped_at(&run, small_settings(3), 1);
    run_stopped_at(&later, small_settings(3), 2);
    // Make `run` look like a process died right after committing the step-2 save: the new
    // files under temporary names, the pending manifest naming them.
    let mut pending: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(later.join("checkpoint.json")).unwrap())
            .unwrap();
    let mut staged = serde_json::Map::new();
    for name in ["config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"] {
        let temp = format!("{name}.tmp-4000000-{}", staged.len());
        std::fs::copy(later.join(name), run.join(&temp)).unwrap();
        staged.insert(name.into(), temp.into());
    }
    pending["staged"] = staged.into();
    std::fs::write(run.join("checkpoint.json.pending"), pending.to_string()).unwrap();
    let before = snapshot(&run);

    let eval =
        |dir: &Path| t.ok(&["eval", "--checkpoint", s(dir), "--tokens", s(&ids), "--json"]).0;
    assert_eq!(eval(&run), eval(&later), "the reader did not read the committed save");
    let gen = |dir: &Path| t.ok(&["generate", "--checkpoint", s(dir), "--max-tokens", "20"]).0;
    assert_eq!(gen(&run), gen(&later));
    t.ok(&["info", "--checkpoint", s(&run)]);
    t.ok(&["grow", "--checkpoint", s(&run), "--out", s(&t.path("grown")), "--qkv", "2"]);
    assert_eq!(snapshot(&run), before, "a reader changed the run directory");

    // The next writer finishes the save, then trains on from step 2 like `later` does.
    t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    t.ok(&[&["train", "--resume", s(&later)][..], &["--sample-tokens", "0"]].concat());
    assert!(!run.join("checkpoint.json.pending").exists());
    assert!(!names(&run).iter().any(|n| n.contains(".tmp")), "{:?}", names(&run));
    for name in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(run.join(name)).unwrap() == std::fs::read(later.join(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn reading_a_checkpoint_while_it_trains_disturbs_neither() {
    let t = Scratch::new("live");
    let run = t.path("run");
    let ids = t.file("ids.txt", id_text(100));
    let args = ["--steps", "40", "--batch", "1", "--seq", "8", "--eval-every", "1000"];
    let mut trainer = t
        .command(
            &[&["train", "--out", s(&run), "--save-every", "1", "--sample-tokens", "0"][..], &args]
                .concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut trainer, "a first checkpoint", || run.join("checkpoint.json").exists());
    let mut reads = 0;
    while trainer.try_wait().unwrap().is_none() {
        t.ok(&["info", "--checkpoint", s(&run)]);
        t.ok(&["eval", "--checkpoint", s(&run), "--tokens", s(&ids)]);
        reads += 1;
    }
    let out = trainer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the trainer failed while being read:\n{stderr}");
    assert!(reads >= 1);
    assert_eq!(manifest_step(&run), 40);
}

// ---------------------------------------------------------------------------------------------
// 4. One writer per run directory.

#[test]
fn a_second_writer_is_told_who_holds_the_directory() {
    let t = Scratch::new("writers");
    let run = t.path("run");
    run_stopped_at(&run, small_settings(3), 1);
    let before = snapshot(&run);
    let empty = t.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let model = t.path("model");
    t.ok(&["init", "--preset", "tiny", "--out", s(&model)]);
    {
        // This test process holds both directories, as a running trainer would.
        let _run = RunLock::acquire(&run).unwrap();
        let _empty = RunLock::acquire(&empty).unwrap();
        let empty_held = snapshot(&empty);
        let pid = format!("in use by another process (pid {})", std::process::id());
        for args in [
            vec!["train", "--resume", s(&run), "--sample-tokens", "0"],
            vec!["train", "--out", s(&empty), "--steps", "2", "--sample-tokens", "0"],
            vec!["init", "--preset", "tiny", "--out", s(&empty)],
            vec!["grow", "--checkpoint", s(&model), "--out", s(&empty), "--ffn", "2"],
        ] {
            let err = t.fails(&args);
            assert!(err.contains(&pid), "{}: {err}", show(&args));
        }
        assert_eq!(snapshot(&empty), empty_held, "a refused writer wrote into {empty:?}");
    }
    assert_eq!(snapshot(&run), before, "a refused writer changed the run");

    // A real trainer and a second one: the second is refused, naming the first.
    let live = t.path("live");
    let flags = ["--steps", "100000", "--batch", "1", "--seq", "8", "--eval-every", "100000"];
    let mut first = t
        .command(&[&["train", "--out", s(&live), "--sample-tokens", "0"][..], &flags].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(&mut first, "a metrics line", || metrics_lines(&live) >= 1);
    let err = t.fails(
        &[&["train", "--out", s(&live), "--overwrite", "--sample-tokens", "0"][..], &flags]
            .concat(),
    );
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    kill_9(first);
}

// ---------------------------------------------------------------------------------------------
// 5. The train state is what the user trained with, and is checked before anything runs.

#[test]
fn resume_says_what_it_reads_and_refuses_a_state_no_run_wrote() {
    let t = Scratch::new("state");
    let corpus = t.file("corpus.txt", "To be, or not to be, that is the question. ".repeat(40));
    let run = t.path("run");
    let settings =
        TrainSettings { data: vec![corpus.clone()], val_fraction: 0.25, ..small_settings(2) };
    run_stopped_at(&run, settings, 1);
    let (_, stderr) =
        t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    let first = stderr.lines().next().unwrap();
    assert!(
        first.starts_with("resuming") && first.contains(s(&corpus)) && first.contains("25%"),
        "{stderr}"
    );

    let edit = |dir: &Path, file: &str, field: &str, value: serde_json::Value| {
        let path = dir.join(file);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let target = if file == "train_state.json" && field != "surprise" {
            &mut json["settings"]
        } else {
            &mut json
        };
        target[field] = value;
        std::fs::write(&path, json.to_string()).unwrap();
        // Edited by hand: the manifest goes, as the documentation says.
        let _ = std::fs::remove_file(dir.join("checkpoint.json"));
    };
    for (file, field, value, want) in [
        ("train_state.json", "tokenizer", serde_json::json!("foo"), "unknown tokenizer"),
        ("train_state.json", "preset", serde_json::json!("huge"), "unknown preset"),
        ("train_state.json", "surprise", serde_json::json!(1), "unknown field"),
        ("train_state.json", "shuffle", serde_json::json!(true), "unknown field"),
        ("config.json", "tokenizer", serde_json::json!("foo"), "unknown tokenizer"),
    ] {
        let dir = t.path(&format!("edited-{file}-{field}"));
        run_stopped_at(&dir, small_settings(50), 1);
        edit(&dir, file, field, value);
        let before = snapshot(&dir);
        let start = Instant::now();
        let err = t.fails(&["train", "--resume", s(&dir), "--sample-tokens", "0"]);
        assert!(err.contains(file) && err.contains(want), "{err}");
        assert!(start.elapsed() < Duration::from_secs(20), "refused only after training");
        assert_eq!(snapshot(&dir), before);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Absurd sizes: one line saying how much memory they would take.

fn assert_memory_error(err: &str) {
    assert!(
        err.contains("would need") && err.contains("of memory") || err.contains("overflow"),
        "{err}"
    );
}

/// A tiny checkpoint whose config.json is then given `field = value` (manifest removed).
fn with_config(t: &Scratch, name: &str, field: &str, value: serde_json::Value) -> PathBuf {
    let dir = t.path(name);
    t.ok(&["init", "--preset", "tiny", "--out", s(&dir)]);
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json[field] = value;
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    dir
}

#[test]
fn absurd_sizes_end_in_one_line_about_memory() {
    let t = Scratch::new("sizes");
    let ids = t.file("ids.txt", id_text(40));
    let layers = with_config(&t, "layers", "n_layers", 100_000_000.into());
    let seq = with_config(&t, "seq", "max_seq_len", 1_000_000_000_000u64.into());
    for dir in [&layers, &seq] {
        assert_memory_error(&t.fails(&["eval", "--checkpoint", s(dir), "--tokens", s(&ids)]));
        assert_memory_error(&t.fails(&["generate", "--checkpoint", s(dir), "--max-tokens", "2"]));
        let err = t.fails(&["grow", "--checkpoint", s(dir), "--out", "grown", "--ffn", "2"]);
        assert!(err.contains("would need") || err.contains("holds 43 tensors"), "{err}");
    }
    // `info` only counts: it reads the config and the header, never the tensors.
    let err = t.fails(&["info", "--checkpoint", s(&layers)]);
    assert!(err.contains("holds 43 tensors") && err.contains("1000000003"), "{err}");
    let (stdout, _) = t.ok(&["info", "--checkpoint", s(&seq)]);
    assert!(stdout.contains("1000000000000") && stdout.contains("1,081,600"), "{stdout}");

    // Flags.
    let fresh = t.path("fresh");
    for flags in [
        vec!["--grad-accum", "1000000000000000"],
        vec!["--batch", "1000000000"],
        vec!["--batch", "18446744073709551615"],
    ] {
        let err = t.fails(&[&["train", "--out", s(&fresh), "--seq", "16"][..], &flags].concat());
        assert_memory_error(&err);
        assert!(err.contains(flags[0]), "{err}");
        assert!(!fresh.exists(), "a refused run created its directory");
    }
    let model = t.path("model");
    t.ok(&["init", "--preset", "tiny", "--out", s(&model)]);
    for flags in [["--ffn", "1000000000000"], ["--qkv", "18446744073709551615"]] {
        let err = t.fails(
            &[&["grow", "--checkpoint", s(&model), "--out", s(&fresh)][..], &flags].concat(),
        );
        assert_memory_error(&err);
    }
    assert_memory_error(&t.fails(&["bench", "--matmul", "100000000", "--steps", "1"]));
    assert_memory_error(&t.fails(&["bench", "--matmul", "0", "--batch", "1000000000000"]));

    // A model file that really declares tensors far larger than memory (a sparse file), with
    // a config that agrees with it.
    let big = t.path("big");
    std::fs::create_dir(&big).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = (1u64 << 24).into();
    config["d_model"] = (1u64 << 16).into();
    config["n_layers"] = 1.into();
    std::fs::write(big.join("config.json"), config.to_string()).unwrap();
    write_sparse_model(&big.join("model.safetensors"), &config);
    let err = t.fails(&["eval", "--checkpoint", s(&big), "--tokens", s(&ids)]);
    assert_memory_error(&err);
    let (stdout, _) = t.ok(&["info", "--checkpoint", s(&big)]);
    assert!(stdout.contains("total parameters"), "{stdout}");
}

/// A safetensors file whose header declares every tensor of `config` (f32), data left sparse.
fn write_sparse_model(path: &Path, config: &serde_json::Value) {
    let n = |k: &str| config[k].as_u64().unwrap();
    let d = n("d_model");
    let mut shapes = vec![("embed.weight".to_string(), vec![n("vocab_size"), d])];
    for i in 0..n("n_layers") {
        for (block, field) in [
            ("attention.query", "qkv_tokens"),
            ("attention.key", "qkv_tokens"),
            ("attention.value", "qkv_tokens"),
            ("attention.proj", "proj_tokens"),
            ("mlp", "ffn_tokens"),
        ] {
            for side in ["key", "value"] {
                shapes.push((format!("layers.{i}.{block}.{side}_param_tokens"), vec![n(field), d]));
            }
        }
    }
    shapes.push(("final_norm.weight".into(), vec![d]));
    shapes.push(("final_norm.bias".into(), vec![d]));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dims) in shapes {
        let bytes = 4 * dims.iter().product::<u64>();
        header.insert(
            name,
            serde_json::json!({ "dtype": "F32", "shape": dims, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    let head = bytes.len() as u64;
    std::fs::write(path, bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(head + offset).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 7. Endless or odd files end in one line, never a hang.

#[test]
fn endless_and_odd_files_are_refused() {
    let t = Scratch::new("reads");
    let fresh = t.path("fresh");
    let sparse = t.path("sparse.txt");
    std::fs::File::create(&sparse).unwrap().set_len(1 << 42).unwrap(); // 4 TiB, no blocks
    for flags in
        [vec!["--data", "/dev/zero"], vec!["--val-data", "/dev/zero"], vec!["--data", s(&sparse)]]
    {
        let err = t.fails(
            &[&["train", "--out", s(&fresh)][..], &flags, &strs(&small_flags(2, 2))].concat(),
        );
        assert!(err.contains(flags[1]), "{err}");
        assert!(err.contains("not a regular file") || err.contains("would need"), "{err}");
    }
    let model = t.path("model");
    t.ok(&["init", "--preset", "tiny", "--out", s(&model)]);
    for tokens in ["/dev/zero", s(&sparse)] {
        let err = t.fails(&["eval", "--checkpoint", s(&model), "--tokens", tokens]);
        assert!(
            err.contains(tokens) && (err.contains("is a device") || err.contains("would need")),
            "{err}"
        );
    }
    // Checkpoint files that are links to /dev/zero, or FIFOs (an open would block forever).
    for (file, kind) in [
        ("config.json", "zero"),
        ("checkpoint.json", "zero"),
        ("model.safetensors", "fifo"),
        ("config.json", "fifo"),
        ("checkpoint.json", "fifo"),
    ] {
        let dir = t.path(&format!("odd-{kind}-{file}"));
        t.ok(&["init", "--preset", "tiny", "--out", s(&dir)]);
        std::fs::remove_file(dir.join(file)).unwrap();
        match kind {
            "zero" => symlink(Path::new("/dev/zero"), &dir.join(file)),
            _ => mkfifo(&dir.join(file)),
        }
        for command in ["info", "generate"] {
            let err = t.fails(&[command, "--checkpoint", s(&dir)]);
            assert!(
                err.contains(file) && (err.contains("is a device") || err.contains("FIFO")),
                "{err}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Non-finite weights are found when a checkpoint is loaded.

#[test]
fn non_finite_weights_are_refused_at_load() {
    let t = Scratch::new("nan");
    let ids = t.file("ids.txt", id_text(40));
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let dir = t.path(&format!("model-{shown}"));
        t.ok(&["init", "--preset", "tiny", "--out", s(&dir)]);
        let path = dir.join("model.safetensors");
        let tensors: Vec<_> = load_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(name, tensor)| {
                if name != "layers.2.mlp.value_param_tokens" {
                    return (name, tensor);
                }
                let mut values = tensor.to_vec().unwrap();
                values[77] = bad;
                (name, tokenformer_core::Tensor::from_vec(values, tensor.dims()).unwrap())
            })
            .collect();
        save_safetensors(&path, &tensors).unwrap();
        std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
        for args in [
            vec!["eval", "--checkpoint", s(&dir), "--tokens", s(&ids)],
            vec!["generate", "--checkpoint", s(&dir), "--max-tokens", "2"],
            vec!["grow", "--checkpoint", s(&dir), "--out", "grown", "--ffn", "2"],
        ] {
            let err = t.fails(&args);
            assert!(
                err.contains("'layers.2.mlp.value_param_tokens'")
                    && err.contains("non-finite")
                    && err.contains(shown),
                "{err}"
            );
        }
        assert!(!t.path("grown").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// 9. A token cache changed in place is noticed and rebuilt.

#[test]
fn a_modified_token_cache_is_rebuilt() {
    let t = Scratch::new("cache");
    let run = t.path("run");
    let clean = t.path("clean");
    run_stopped_at(&run, small_settings(2), 1);
    run_stopped_at(&clean, small_settings(2), 1);
    let cache = names(&run).into_iter().find(|n| n.ends_with(".tokens")).expect("a token cache");
    let mut bytes = std::fs::read(run.join(&cache)).unwrap();
    bytes[64 + 4 * 1000] ^= 0x07; // one token of the body; the header is intact
    std::fs::write(run.join(&cache), &bytes).unwrap();
    let (_, stderr) =
        t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    assert!(stderr.contains("cache rebuilt") && stderr.contains("checksum"), "{stderr}");
    // Trained on the right tokens: the same result as the untouched run.
    t.ok(&[&["train", "--resume", s(&clean)][..], &["--sample-tokens", "0"]].concat());
    assert!(
        std::fs::read(run.join("model.safetensors")).unwrap()
            == std::fs::read(clean.join("model.safetensors")).unwrap()
    );
    assert!(std::fs::read(run.join(&cache)).unwrap() == std::fs::read(clean.join(&cache)).unwrap());
}

// ---------------------------------------------------------------------------------------------
// 10. A run or grow killed before its first checkpoint.

#[test]
fn a_run_killed_before_its_first_checkpoint_is_explained_and_taken_over() {
    let t = Scratch::new("killed");
    let run = t.path("run");
    let flags = [
        "--steps",
        "100000",
        "--batch",
        "1",
        "--seq",
        "8",
        "--eval-every",
        "100000",
        "--save-every",
        "100000",
    ];
    let mut child = t
        .command(&[&["train", "--out", s(&run), "--sample-tokens", "0"][..], &flags].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(&mut child, "two metrics lines", || metrics_lines(&run) >= 2);
    kill_9(child);
    // As if it died inside its first save, too.
    for stray in [
        "model.safetensors.tmp-4000000-3",
        "config.json.tmp-4000000-2",
        "checkpoint.json.pending.tmp-4000000-5",
        ".model.safetensors.tmp-4000000",
        "config.json.tmp",
    ] {
        t.file(&format!("run/{stray}"), "half a file");
    }
    assert!(!run.join("checkpoint.json").exists());

    let err = t.fails(&["train", "--resume", s(&run)]);
    assert!(err.contains("no checkpoint yet") && err.contains("--overwrite"), "{err}");
    let small = small_flags(2, 1000);
    let small = strs(&small);
    let err = t.fails(&[&["train", "--out", s(&run)][..], &small].concat());
    assert!(
        err.contains("stopped before its first checkpoint") && err.contains("--overwrite"),
        "{err}"
    );
    let (_, stderr) = t.ok(&[&["train", "--out", s(&run), "--overwrite"][..], &small].concat());
    assert!(stderr.contains("finished 2 steps"), "{stderr}");
    assert_eq!(metrics_lines(&run), 2);
    assert_eq!(manifest_step(&run), 2);
    let left = names(&run);
    assert!(!left.iter().any(|n| n.contains(".tmp")), "stray files left: {left:?}");

    // --overwrite never deletes a checkpoint.
    let before = snapshot(&run);
    let err = t.fails(&[&["train", "--out", s(&run), "--overwrite"][..], &small].concat());
    assert!(err.contains("holds a checkpoint") && err.contains("never deletes"), "{err}");
    assert_eq!(snapshot(&run), before);

    // A grow that died after copying the run's history, before its checkpoint.
    let grown = t.path("grown");
    std::fs::create_dir(&grown).unwrap();
    std::fs::write(grown.join(MARKER_FILE), "").unwrap();
    std::fs::copy(run.join("metrics.jsonl"), grown.join("metrics.jsonl")).unwrap();
    t.file("grown/model.safetensors.tmp-4000000-1", "half a file");
    let err = t.fails(&["train", "--resume", s(&grown)]);
    assert!(err.contains("no checkpoint yet"), "{err}");
    let err = t.fails(&["grow", "--checkpoint", s(&run), "--out", s(&grown), "--ffn", "2"]);
    assert!(
        err.contains("stopped before its first checkpoint") && err.contains("--overwrite"),
        "{err}"
    );
    t.ok(&["grow", "--checkpoint", s(&run), "--out", s(&grown), "--ffn", "2", "--overwrite"]);
    assert!(!names(&grown).iter().any(|n| n.contains(".tmp")), "{:?}", names(&grown));
    t.ok(&["info", "--checkpoint", s(&grown)]);
}

// ---------------------------------------------------------------------------------------------
// 11. A resumed run's metrics are the bytes an uninterrupted run writes.

/// A metrics line without the fields that measure time (they differ from run to run).
fn without_timing(line: &str) -> String {
    line.split(',')
        .filter(|f| !f.contains("\"tokens_per_sec\"") && !f.contains("\"elapsed_sec\""))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn resume_keeps_metrics_byte_identical() {
    let t = Scratch::new("metrics");
    let settings = TrainSettings { eval_every: 2, ..small_settings(4) };
    let whole = t.path("whole");
    t.ok(&[&["train", "--out", s(&whole)][..], &strs(&small_flags(4, 2))].concat());

    let run = t.path("run");
    run_stopped_at(&run, settings, 2);
    // The kept lines hold what a float printer may not give back: a value with more digits
    // than an f64 has, and spacing of another writer. A crash left a line for step 3 (logged
    // after the checkpoint) and half of a line for step 4.
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let loss_field = lines[0].split(',').nth(1).unwrap().to_string();
    lines[0] = lines[0].replacen(&loss_field, &format!("{loss_field}00000000000000000000001"), 1);
    lines[1] = lines[1].replace(":", ": ");
    let kept = format!("{}\n{}\n", lines[0], lines[1]);
    std::fs::write(&path, format!("{kept}{{\"step\":3,\"loss\":9.0,\"lr\":0.1,\"tokens_per_sec\":1.0}}\n{{\"step\":4,\"lo")).unwrap();

    t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    let resumed = std::fs::read_to_string(&path).unwrap();
    assert!(resumed.starts_with(&kept), "the kept lines were rewritten:\n{resumed}");
    let whole_text = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let a: Vec<String> = resumed.lines().skip(2).map(without_timing).collect();
    let b: Vec<String> = whole_text.lines().skip(2).map(without_timing).collect();
    assert_eq!(a, b, "steps 3 and 4 differ from the uninterrupted run");
    assert_eq!(resumed.lines().count(), 4);
}

// ---------------------------------------------------------------------------------------------
// 12. Clearer lines.

#[test]
fn clear_lines_for_common_mistakes() {
    let t = Scratch::new("lines");
    let run = t.path("run");
    run_stopped_at(&run, small_settings(3), 1);
    let (_, stderr) =
        t.ok(&[&["train", "--resume", s(&run)][..], &["--sample-tokens", "0"]].concat());
    // The steps this process ran, not the run's total.
    assert!(stderr.contains("finished 2 steps (now at step 3 of 3)"), "{stderr}");
    let before = snapshot(&run);
    let (_, stderr) = t.ok(&["train", "--resume", s(&run)]);
    assert!(
        stderr.contains("nothing to train: the run") && stderr.contains("complete (step 3 of 3;"),
        "{stderr}"
    );
    assert_eq!(snapshot(&run), before);

    // A folder where a file is expected, and the other way round.
    let err = t.fails(&["eval", "--checkpoint", s(&run), "--tokens", s(&run)]);
    assert!(err.contains("is a directory, where a regular file is expected"), "{err}");
    let ids = t.file("ids.txt", id_text(30));
    let err = t.fails(&["eval", "--checkpoint", s(&ids), "--tokens", s(&ids)]);
    assert!(err.contains("is a file; a checkpoint is a directory"), "{err}");

    let err = t.fails(&["generate", "--checkpoint", s(&run), "--top-k", "0"]);
    assert!(err.contains("--top-k must be at least 1"), "{err}");

    let commas =
        t.file("ids.csv", (0..5000).map(|i| (i % 256).to_string()).collect::<Vec<_>>().join(","));
    let err = t.fails(&["eval", "--checkpoint", s(&run), "--tokens", s(&commas)]);
    assert!(err.contains("not commas") && err.len() < 300, "{err}");
}

// ---------------------------------------------------------------------------------------------
// 13. A directory of the user's own files is never written into, and no write goes out through
// a hard link.

/// Every entry of `dir` with its bytes and its inode: a file replaced by another of the same
/// bytes shows up too. Nothing is left out, the lock file included.
fn every_entry(dir: &Path) -> BTreeMap<String, (Vec<u8>, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let bytes = if meta.is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
            (e.file_name().into_string().unwrap(), (bytes, meta.ino()))
        })
        .collect()
}

fn hard_link(target: &Path, link: &Path) {
    std::fs::hard_link(target, link).unwrap();
}

#[test]
fn a_directory_of_the_users_own_files_is_refused_and_left_byte_identical() {
    let t = Scratch::new("users");
    let ck = t.path("ck");
    t.ok(&["init", "--preset", "tiny", "--out", s(&ck)]);
    // Files outside, reachable from the directory through hard links.
    let notes = t.file("notes.txt", "my notes\n");
    let log = t.file("log.jsonl", "{\"step\":1,\"loss\":9.0,\"lr\":0.1,\"tokens_per_sec\":1}\n");
    let outside = [
        (notes.clone(), std::fs::read(&notes).unwrap()),
        (log.clone(), std::fs::read(&log).unwrap()),
    ];
    let mine = t.path("mine");
    std::fs::create_dir(&mine).unwrap();
    for name in [
        "x.tmp-2024-1",
        ".profile.tmp-4242",
        "model.safetensors.tmp",
        "config.json.tmp",
        "checkpoint.json.partial",
        "loss.tmp77.png",
        "byte-e7d40b4ec9e5d33c.tmp901",
        "loss.png",
    ] {
        t.file(&format!("mine/{name}"), format!("my own {name}"));
    }
    hard_link(&log, &mine.join("metrics.jsonl"));
    hard_link(&notes, &mine.join("run.lock"));
    hard_link(&notes, &mine.join("notes-again.txt"));
    let before = every_entry(&mine);

    let small = small_flags(2, 1000);
    let small = strs(&small);
    let books = t.path("books");
    std::fs::create_dir_all(books.join("train")).unwrap();
    std::fs::create_dir_all(books.join("val")).unwrap();
    let grow = ["grow", "--checkpoint", s(&ck), "--out", s(&mine), "--ffn", "2"];
    for args in [
        vec!["init", "--preset", "tiny", "--out", s(&mine)],
        [&["train", "--out", s(&mine)][..], &small].concat(),
        [&["train", "--out", s(&mine), "--overwrite"][..], &small].concat(),
        ["train", "--resume", s(&mine), "--sample-tokens", "0"].to_vec(),
        grow.to_vec(),
        [&grow[..], &["--overwrite"]].concat(),
        ["experiment", "growth", "--quick", "--out", s(&mine), "--data-dir", s(&books)].to_vec(),
    ] {
        let err = t.fails(&args);
        let why = ["not a tokenformer run directory", "not a run directory", "not empty"];
        assert!(why.iter().any(|w| err.contains(w)), "{}: {err}", show(&args));
        assert_eq!(every_entry(&mine), before, "{} changed the directory", show(&args));
        for (path, bytes) in &outside {
            assert_eq!(&std::fs::read(path).unwrap(), bytes, "{}: {path:?}", show(&args));
        }
    }
    // An empty directory is the tool's to use; a new one too.
    let empty = t.path("empty");
    std::fs::create_dir(&empty).unwrap();
    t.ok(&["init", "--preset", "tiny", "--out", s(&empty)]);
    assert!(empty.join(MARKER_FILE).is_file());
}

#[test]
fn a_hard_link_in_a_run_directory_never_carries_a_write_outside() {
    let t = Scratch::new("hardlinks");
    let notes = t.file("notes.txt", "my notes\n");
    // The lock of a new directory: `ln notes.txt D/run.lock; init --out D`.
    let d = t.path("d");
    std::fs::create_dir(&d).unwrap();
    hard_link(&notes, &d.join("run.lock"));
    let err = t.fails(&["init", "--preset", "tiny", "--out", s(&d)]);
    assert!(err.contains("not a tokenformer run directory"), "{err}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes\n");

    // The lock of a run directory.
    let run = t.path("run");
    run_stopped_at(&run, small_settings(3), 1);
    std::fs::remove_file(run.join("run.lock")).unwrap();
    hard_link(&notes, &run.join("run.lock"));
    let resume = ["train", "--resume", s(&run), "--sample-tokens", "0"];
    let err = t.fails(&resume);
    assert!(err.contains("run.lock") && err.contains("hard links"), "{err}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes\n");
    std::fs::remove_file(run.join("run.lock")).unwrap();

    // The metrics a resumed run appends to (and first cuts back to its checkpoint).
    let copy = t.file("metrics-copy.jsonl", std::fs::read(run.join("metrics.jsonl")).unwrap());
    let copied = std::fs::read(&copy).unwrap();
    std::fs::remove_file(run.join("metrics.jsonl")).unwrap();
    hard_link(&copy, &run.join("metrics.jsonl"));
    let err = t.fails(&resume);
    assert!(err.contains("metrics.jsonl") && err.contains("hard links"), "{err}");
    assert_eq!(std::fs::read(&copy).unwrap(), copied);

    // With its own files back, the run goes on.
    std::fs::remove_file(run.join("metrics.jsonl")).unwrap();
    std::fs::copy(&copy, run.join("metrics.jsonl")).unwrap();
    t.ok(&resume);
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes\n");
    assert_eq!(std::fs::read(&copy).unwrap(), copied);
}

// ---------------------------------------------------------------------------------------------
// 14. A resumed run checks what its schedule still has to do.

#[test]
fn resume_checks_the_growths_still_scheduled_against_memory() {
    let t = Scratch::new("schedule");
    let run = t.path("run");
    let settings =
        TrainSettings { grow_at: vec!["2:ffn=+4".parse().unwrap()], ..small_settings(3) };
    run_stopped_at(&run, settings, 1);
    // The growth still ahead edited to one no machine holds (the manifest goes too, as a hand
    // edit requires).
    let path = run.join("train_state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["settings"]["grow_at"] = serde_json::json!(["2:ffn=+10000000000"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    std::fs::remove_file(run.join("checkpoint.json")).unwrap();
    let before = snapshot(&run);
    let err = t.fails(&["train", "--resume", s(&run), "--sample-tokens", "0"]);
    assert!(
        err.contains("growth schedule (2:ffn=+10000000000)") && err.contains("would need at least"),
        "{err}"
    );
    // Refused before the first step: not a line of metrics, not a save.
    assert_eq!(snapshot(&run), before);
}

// ---------------------------------------------------------------------------------------------
// 15. A resumed run reads the data it started with, or says that it cannot.

#[test]
fn resume_reads_the_same_data_or_refuses() {
    let t = Scratch::new("samedata");
    // A relative --data path is stored absolute.
    t.file("corpus.txt", "To be, or not to be, that is the question. ".repeat(40));
    let relative = t.path("relative");
    let flags = small_flags(1, 1000);
    t.ok(&[&["train", "--out", s(&relative), "--data", "corpus.txt"][..], &strs(&flags)].concat());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(relative.join("train_state.json")).unwrap()).unwrap();
    let stored = state["settings"]["data"][0].as_str().unwrap().to_string();
    assert_eq!(Path::new(&stored), t.path("corpus.txt"), "{state}");

    // The data changed under a stopped run: the resume refuses, and changes nothing.
    let corpus = t.file("books.txt", "Whether 'tis nobler in the mind to suffer. ".repeat(40));
    let run = t.path("run");
    let settings =
        TrainSettings { data: vec![corpus.clone()], val_fraction: 0.25, ..small_settings(3) };
    run_stopped_at(&run, settings, 1);
    std::fs::write(&corpus, "The slings and arrows of outrageous fortune. ".repeat(40)).unwrap();
    let before = snapshot(&run);
    let resume = ["train", "--resume", s(&run), "--sample-tokens", "0"];
    let err = t.fails(&resume);
    assert!(
        err.contains("differs from what the run started with") && err.contains("books.txt"),
        "{err}"
    );
    assert_eq!(manifest_step(&run), 1);
    assert_eq!(metrics_lines(&run), 1);
    assert!(before.keys().all(|name| snapshot(&run).contains_key(name)));
    // With the data restored, it goes on.
    std::fs::write(&corpus, "Whether 'tis nobler in the mind to suffer. ".repeat(40)).unwrap();
    t.ok(&resume);
    assert_eq!(manifest_step(&run), 3);
}

// ---------------------------------------------------------------------------------------------
// 16. Finite weights whose arithmetic overflows, and counts that overflow, are errors too.

#[test]
fn overflowing_weights_and_counts_are_errors_not_numbers() {
    let t = Scratch::new("overflow");
    let ids = t.file("ids.txt", id_text(40));
    let dir = t.path("huge");
    t.ok(&["init", "--preset", "tiny", "--out", s(&dir)]);
    let path = dir.join("model.safetensors");
    // Every weight 3e38: finite, so loading accepts it, but no sum over them is.
    let tensors: Vec<_> = load_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| {
            let values = vec![3e38f32; tensor.numel()];
            (name, tokenformer_core::Tensor::from_vec(values, tensor.dims()).unwrap())
        })
        .collect();
    save_safetensors(&path, &tensors).unwrap();
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    for (args, what) in [
        (vec!["eval", "--checkpoint", s(&dir), "--tokens", s(&ids)], "eval: the loss is NaN"),
        (vec!["eval", "--checkpoint", s(&dir), "--tokens", s(&ids), "--json"], "the loss is NaN"),
        (vec!["generate", "--checkpoint", s(&dir), "--max-tokens", "2"], "generate: a logit is"),
    ] {
        let err = t.fails(&args);
        assert!(
            err.contains(what)
                && err.contains("the first non-finite value appears at layer 0 (attention)"),
            "{}: {err}",
            show(&args)
        );
    }
    // A width whose parameter count wraps around is refused, not printed.
    let max = u64::MAX.to_string();
    for args in [
        vec!["info", "--preset", "tiny", "--arch", "transformer", "--d-ff", &max],
        vec!["init", "--preset", "tiny", "--arch", "transformer", "--d-ff", &max, "--out", "w"],
    ] {
        let err = t.fails(&args);
        assert!(err.contains("parameter count overflows 64 bits") && err.contains(&max), "{err}");
    }
    assert!(!t.path("w").exists());
}

// ---------------------------------------------------------------------------------------------
// 17. Errors name the right thing, read as the command line is written, and leave nothing
// behind that would stand in the way of the corrected command.

#[test]
fn errors_name_the_right_thing_and_a_refused_run_leaves_nothing_behind() {
    let t = Scratch::new("messages");
    let run = t.path("run");
    let settings =
        TrainSettings { grow_at: vec!["2:ffn=+4".parse().unwrap()], ..small_settings(3) };
    run_stopped_at(&run, settings, 1);
    let resume = ["train", "--resume", s(&run), "--sample-tokens", "0"];
    let err = t.fails(&[&resume[..], &["--grow-at", "2:ffn=+8"]].concat());
    assert!(
        err.contains("--grow-at 2:ffn=+8 contradicts") && err.contains("(grow-at 2:ffn=+4)"),
        "{err}"
    );
    assert!(!err.contains("GrowthPoint") && !err.contains("Some("), "{err}");
    let err = t.fails(&[&resume[..], &["--d-ff", "300"]].concat());
    assert!(!err.contains("Some("), "{err}");

    // A lock file that is a directory is named, not the run directory.
    std::fs::remove_file(run.join("run.lock")).unwrap();
    std::fs::create_dir(run.join("run.lock")).unwrap();
    let err = t.fails(&resume);
    assert!(err.contains("run.lock: is a directory, where the lock file is expected"), "{err}");

    // Data that turns out unusable leaves no directory behind.
    let fresh = t.path("fresh");
    let flags = small_flags(1, 1000);
    for bad in [vec!["--data", "missing.txt"], vec!["--val-data", "/dev/zero"]] {
        let err = t.fails(&[&["train", "--out", s(&fresh)][..], &bad, &strs(&flags)].concat());
        assert!(err.contains("missing.txt") || err.contains("/dev/zero"), "{err}");
        assert!(!fresh.exists(), "{} was left behind: {:?}", fresh.display(), names(&fresh));
    }
    t.ok(&[&["train", "--out", s(&fresh)][..], &strs(&flags)].concat());
}
