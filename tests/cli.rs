//! End-to-end tests of the `tokenformer` command: the model flows (info, init, eval, grow,
//! generate, bench), bad input (one clear error line, no panic, checkpoints left alone), a real
//! SIGINT during training, and a diverging run.

mod support;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");

/// Flags of a short training run on the built-in corpus.
const SHORT: [&str; 10] =
    ["--steps", "2", "--batch", "2", "--seq", "16", "--eval-every", "1", "--sample-tokens", "0"];

/// Commands run with the scratch directory as their working directory.
impl Scratch {
    /// Writes `text` to `name` and returns its path.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(&self.0).stdin(Stdio::null());
        cmd
    }

    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("the tokenformer binary runs")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "{} failed ({:?})\nstdout: {stdout}\nstderr: {stderr}",
            show(args),
            out.status
        );
        assert!(!stderr.contains("panicked"), "{}: {stderr}", show(args));
        stdout
    }

    /// Runs a command that must fail with exactly one `error:` line on stderr, said last, and
    /// no panic; returns that line.
    fn fails<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: status {:?}\nstdout: {stdout}\nstderr: {stderr}",
            show(args),
            out.status
        );
        assert!(!stderr.contains("panicked"), "{}: {stderr}", show(args));
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{}: want one error line, stderr:\n{stderr}", show(args));
        assert_eq!(
            stderr.lines().last(),
            Some(errors[0]),
            "{}: the error is not the last line:\n{stderr}",
            show(args)
        );
        errors[0].to_string()
    }

    /// Runs a command that clap itself must refuse (its usage errors may span lines).
    fn usage_error<S: AsRef<OsStr>>(&self, args: &[S]) {
        let out = self.run(args);
        let (_, stderr) = texts(&out);
        assert!(!out.status.success(), "{} succeeded", show(args));
        assert!(!stderr.contains("panicked"), "{}: {stderr}", show(args));
        assert!(stderr.starts_with("error:"), "{}: {stderr}", show(args));
    }

    /// A 2-step training run in `name`.
    fn short_run(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        self.ok(&[&["train", "--out", s(&dir)][..], &SHORT].concat());
        dir
    }

    /// A freshly initialised tiny checkpoint in `name`.
    fn init(&self, name: &str, extra: &[&str]) -> PathBuf {
        let dir = self.path(name);
        let stdout =
            self.ok(&[&["init", "--preset", "tiny", "--out", s(&dir)][..], extra].concat());
        assert!(stdout.contains("1,081,600"), "{stdout}");
        dir
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

/// Every file of `dir` (recursively) and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    assert!(!out.is_empty(), "{} is empty", dir.display());
    out
}

fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, after_what: &str) {
    let after = snapshot(dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{after_what} changed the files of {}",
        dir.display()
    );
    for (name, bytes) in before {
        assert!(after[name] == *bytes, "{after_what} modified {}", dir.join(name).display());
    }
}

/// A file of `n` whitespace-separated byte-vocabulary token ids.
fn id_text(n: usize) -> String {
    (0..n).map(|i| ((i * 37 + 11) % 256).to_string()).collect::<Vec<_>>().join(" ")
}

/// The single JSON object a `--json` command printed.
fn one_json(stdout: &str) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(stdout.lines().count(), 1, "want one line of JSON, got:\n{stdout}");
    match serde_json::from_str(stdout.trim()).expect("stdout is JSON") {
        serde_json::Value::Object(map) => map,
        other => panic!("not a JSON object: {other}"),
    }
}

/// (loss, tokens) of `eval --json`.
fn eval(t: &Scratch, ckpt: &Path, ids: &Path) -> (f64, u64, String) {
    let stdout = t.ok(&["eval", "--checkpoint", s(ckpt), "--tokens", s(ids), "--json"]);
    let obj = one_json(&stdout);
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["loss", "tokens"], "{stdout}");
    let loss = obj["loss"].as_f64().expect("loss is a number");
    assert!(loss.is_finite() && loss > 0.0, "{stdout}");
    (loss, obj["tokens"].as_u64().expect("tokens is an integer"), stdout)
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.matches('\n').count())
}

fn saved_step(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("train_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["step"].as_u64().expect("train_state.json has a step")
}

/// The line of `info` output that names `what`, e.g. `total parameters: 1,081,600`.
fn info_line<'a>(stdout: &'a str, what: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(what))
        .unwrap_or_else(|| panic!("no '{what}' line in:\n{stdout}"))
}

#[test]
fn info_counts_the_parameters_of_presets() {
    let t = Scratch::new("info");
    let tiny = t.ok(&["info", "--preset", "tiny"]);
    let large = t.ok(&["info", "--preset", "150M"]);
    for (stdout, counts) in [
        (
            &tiny,
            [
                ("embedding", "32,768"),
                ("query/key/value", "393,216"),
                ("proj", "131,072"),
                ("ffn", "524,288"),
                ("final norm", "256"),
                ("total parameters", "1,081,600"),
            ],
        ),
        (
            &large,
            [
                ("embedding", "38,633,472"),
                ("query/key/value", "42,467,328"),
                ("proj", "14,155,776"),
                ("ffn", "56,623,104"),
                ("final norm", "1,536"),
                ("total parameters", "151,881,216"),
            ],
        ),
    ] {
        for (what, n) in counts {
            let line = info_line(stdout, what);
            assert_eq!(line.rsplit(' ').next(), Some(n), "{line}");
        }
    }
    assert!(tiny.contains("\"d_model\": 128") && tiny.contains("\"max_seq_len\": 256"), "{tiny}");
    assert!(
        large.contains("\"d_model\": 768") && large.contains("\"vocab_size\": 50304"),
        "{large}"
    );
}

#[test]
fn init_info_and_eval_windows() {
    let t = Scratch::new("eval");
    let ck = t.init("ck", &["--seed", "3"]);
    for f in ["config.json", "model.safetensors"] {
        assert!(ck.join(f).is_file(), "init wrote no {f}");
    }
    let info = t.ok(&["info", "--checkpoint", s(&ck)]);
    assert!(info_line(&info, "total parameters").ends_with("1,081,600"), "{info}");
    t.fails(&["init", "--preset", "tiny", "--out", s(&ck)]);

    // T = max_seq_len = 256: windows of at most 257 ids start at 0, 256, 512, ...; a last
    // window of one id is dropped, so every id after the first is predicted exactly once.
    let ids: Vec<String> = id_text(600).split(' ').map(String::from).collect();
    let file = |name: &str, range: std::ops::Range<usize>| t.file(name, &ids[range].join(" "));
    let mut losses = BTreeMap::new();
    for n in [2usize, 257, 258, 513, 600] {
        let (loss, tokens, _) = eval(&t, &ck, &file(&format!("ids{n}"), 0..n));
        assert_eq!(tokens, n as u64 - 1, "{n} ids");
        losses.insert(n, loss);
    }
    // The windows themselves, evaluated one by one.
    let w0 = eval(&t, &ck, &file("w0", 0..257)).0;
    let w1 = eval(&t, &ck, &file("w1", 256..513)).0;
    let w1_short = eval(&t, &ck, &file("w1s", 256..258)).0;
    let w2 = eval(&t, &ck, &file("w2", 512..600)).0;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(1.0);
    assert!(close(losses[&257], w0), "{} vs {w0}", losses[&257]);
    assert!(close(losses[&258], (256.0 * w0 + w1_short) / 257.0), "{losses:?}");
    assert!(close(losses[&513], (w0 + w1) / 2.0), "{losses:?}");
    assert!(close(losses[&600], (256.0 * (w0 + w1) + 87.0 * w2) / 599.0), "{losses:?}");

    // Text output without --json.
    let plain = t.ok(&["eval", "--checkpoint", s(&ck), "--tokens", s(&t.path("ids600"))]);
    assert!(plain.contains("599"), "{plain}");

    for (name, text, says) in [
        ("one", "7", "no position to predict"),
        ("none", "  \n", "no position to predict"),
        ("big", "1 2 256 3", "256"),
        ("word", "1 2 x 3", "'x'"),
        ("negative", "1 -2 3", "'-2'"),
        ("float", "1 2.5 3", "'2.5'"),
    ] {
        let path = t.file(name, text);
        let err = t.fails(&["eval", "--checkpoint", s(&ck), "--tokens", s(&path), "--json"]);
        assert!(err.contains(says), "{name}: {err}");
    }
    let err = t.fails(&["eval", "--checkpoint", s(&ck), "--tokens", s(&t.path("big"))]);
    assert!(err.contains("vocabulary"), "{err}");
    let err = t.fails(&["eval", "--checkpoint", s(&ck), "--tokens", s(&t.path("missing-ids"))]);
    assert!(err.contains("missing-ids"), "{err}");
}

#[test]
fn grow_preserves_outputs_and_never_touches_the_source() {
    let t = Scratch::new("grow");
    let ck = t.init("ck", &["--seed", "3"]);
    let ids = t.file("ids", &id_text(300));
    let before = snapshot(&ck);
    let (loss, tokens, json) = eval(&t, &ck, &ids);

    let grown = t.path("grown");
    let stdout = t.ok(&[
        "grow",
        "--checkpoint",
        s(&ck),
        "--out",
        s(&grown),
        "--qkv",
        "5",
        "--proj",
        "3",
        "--ffn",
        "7",
    ]);
    assert!(stdout.contains("qkv 128 -> 133, proj 128 -> 131, ffn 512 -> 519"), "{stdout}");
    assert!(stdout.contains("exact growth"), "{stdout}");
    let (grown_loss, grown_tokens, grown_json) = eval(&t, &grown, &ids);
    assert_eq!(grown_json, json, "exact growth changed the loss");
    assert_eq!((grown_loss.to_bits(), grown_tokens), (loss.to_bits(), tokens));
    let info = t.ok(&["info", "--checkpoint", s(&grown)]);
    assert!(
        info.contains("\"qkv_tokens\": 133") && info.contains("\"qkv_scale_tokens\": 128"),
        "{info}"
    );
    assert_unchanged(&ck, &before, "grow");

    let random = t.path("random");
    let stdout = t.ok(&[
        "grow",
        "--checkpoint",
        s(&ck),
        "--out",
        s(&random),
        "--ffn",
        "8",
        "--init",
        "random",
        "--seed",
        "1",
    ]);
    assert!(stdout.contains("not output-preserving"), "{stdout}");
    assert_ne!(eval(&t, &random, &ids).2, json, "random growth left the loss unchanged");

    let soft = t.init("soft", &["--norm", "softmax"]);
    let stdout =
        t.ok(&["grow", "--checkpoint", s(&soft), "--out", s(&t.path("soft2")), "--ffn", "4"]);
    assert!(stdout.contains("softmax") && stdout.contains("not output-preserving"), "{stdout}");

    let grown_before = snapshot(&grown);
    let err = t.fails(&[
        "grow",
        "--checkpoint",
        s(&ck),
        "--out",
        s(&t.path("big")),
        "--to-preset",
        "150M",
    ]);
    assert!(err.contains("150M") && err.contains("d_model"), "{err}");
    assert!(!t.path("big").exists(), "a refused grow left a directory behind");
    let err = t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&grown), "--qkv", "1"]);
    assert!(err.contains("already holds a checkpoint"), "{err}");
    let err = t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&ck), "--qkv", "1"]);
    assert!(err.contains("--out must differ from --checkpoint"), "{err}");
    let err =
        t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&t.path("x")), "--init", "zeros"]);
    assert!(err.contains("--init"), "{err}");
    let err =
        t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&t.path("x")), "--device", "tpu"]);
    assert!(err.contains("tpu") && !t.path("x").exists(), "{err}");
    t.usage_error(&[
        "grow",
        "--checkpoint",
        s(&ck),
        "--out",
        s(&t.path("y")),
        "--qkv",
        "1",
        "--to-preset",
        "tiny",
    ]);
    assert_unchanged(&grown, &grown_before, "a refused grow");
    assert_unchanged(&ck, &before, "grow");
}

#[test]
fn generate_is_deterministic_per_seed() {
    let t = Scratch::new("generate");
    let ck = t.init("ck", &["--seed", "3"]);
    let sample = |seed: &str| {
        let out =
            t.run(&["generate", "--checkpoint", s(&ck), "--max-tokens", "20", "--seed", seed]);
        assert!(out.status.success(), "{}", texts(&out).1);
        out.stdout
    };
    let a = sample("1");
    // The default prompt "\n", then 20 bytes (some shown as U+FFFD), then a newline.
    assert!(a.len() >= 22 && a.starts_with(b"\n") && a.ends_with(b"\n"), "{a:?}");
    assert_eq!(a, sample("1"), "the same seed gave another sample");
    assert_ne!(a, sample("2"), "two seeds gave the same sample");
    let err = t.fails(&["generate", "--checkpoint", s(&ck), "--prompt", ""]);
    assert!(err.contains("--prompt"), "{err}");
}

#[test]
fn bench_prints_one_json_object() {
    let t = Scratch::new("bench");
    let stdout =
        t.ok(&["bench", "--steps", "1", "--batch", "2", "--seq", "8", "--matmul", "64", "--json"]);
    let obj = one_json(&stdout);
    let rate = obj["tokens_per_sec"].as_f64().expect("tokens_per_sec is a number");
    assert!(rate.is_finite() && rate > 0.0, "{stdout}");
    assert_eq!(obj["params"].as_u64(), Some(1_081_600), "{stdout}");
    assert_eq!(obj["matmul_size"].as_u64(), Some(64), "{stdout}");
}

#[test]
fn training_gives_the_same_bits_with_one_thread_or_two() {
    // Shapes large enough that every parallel kernel splits its work (several row blocks of
    // the fused Pattention, parallel GEMMs and element-wise ops).
    let t = Scratch::new("threads");
    let flags = ["--steps", "3", "--batch", "4", "--seq", "64", "--eval-every", "3"];
    let run = |threads: &str| {
        let dir = t.path(&format!("run-{threads}"));
        let args = [&["train", "--out", s(&dir), "--sample-tokens", "0"][..], &flags].concat();
        let out = t.command(&args).env("RAYON_NUM_THREADS", threads).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let losses: Vec<(Option<f64>, Option<f64>)> =
            std::fs::read_to_string(dir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (v["loss"].as_f64(), v["val_loss"].as_f64())
                })
                .collect();
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        (losses, read("model.safetensors"), read("optimizer.safetensors"))
    };
    let (one, two) = (run("1"), run("2"));
    assert_eq!(one.0, two.0, "losses differ between 1 and 2 threads");
    assert!(one.1 == two.1, "parameters differ between 1 and 2 threads");
    assert!(one.2 == two.2, "optimizer moments differ between 1 and 2 threads");
}

#[test]
fn a_thread_count_beyond_reason_is_capped_and_a_bad_one_refused() {
    let t = Scratch::new("threads");
    let with_threads = |threads: &str, args: &[&str]| -> Output {
        let mut child = t
            .command(args)
            .env("RAYON_NUM_THREADS", threads)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("RAYON_NUM_THREADS={threads} {}: still running after 60 s", show(args));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    };
    let train = [&["train", "--out", "run"][..], &SHORT].concat();
    let out = with_threads("100000", &train);
    let (_, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("RAYON_NUM_THREADS=100000 is more than 4 threads"), "{stderr}");
    for bad in ["0", "many", "-2", ""] {
        let out = with_threads(bad, &["info", "--preset", "tiny"]);
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "'{bad}': {stdout}{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: RAYON_NUM_THREADS must be a whole number"), "{stderr}");
    }
}

/// The SHORT run trained into `name` with the environment variable `var` set to `value`, or
/// unset: its directory and the training losses it logged.
fn short_run_with(t: &Scratch, name: &str, var: &str, value: Option<&str>) -> (PathBuf, Vec<f64>) {
    let dir = t.path(name);
    let args = [&["train", "--out", s(&dir)][..], &SHORT].concat();
    let mut cmd = t.command(&args);
    cmd.env_remove(var);
    if let Some(value) = value {
        cmd.env(var, value);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{var}={value:?}: {}", String::from_utf8_lossy(&out.stderr));
    let losses = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    (dir, losses)
}

#[test]
fn tokenformer_fused_selects_the_plain_paths() {
    let t = Scratch::new("fused");
    let losses =
        |name: &str, fused: Option<&str>| short_run_with(&t, name, "TOKENFORMER_FUSED", fused).1;
    let fast = losses("fast", None);
    assert!(!fast.is_empty());
    // The fused Pattention gives the bits of the composition it replaces.
    assert_eq!(losses("pattention", Some("pattention:0")), fast);
    // Every plain path: other GEMM and attention kernels, so other rounding, the same losses.
    let plain = losses("plain", Some("0"));
    assert_eq!(plain.len(), fast.len());
    for (p, f) in plain.iter().zip(&fast) {
        assert!((p - f).abs() <= 1e-4 * f.abs(), "plain {plain:?} vs fused {fast:?}");
    }
    let mut cmd = t.command(&["train", "--out", "bad", "--steps", "1"]);
    let out = cmd.env("TOKENFORMER_FUSED", "matmul:2").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TOKENFORMER_FUSED") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn tokenformer_cpu_isa_holds_the_kernels_to_narrower_vectors() {
    let t = Scratch::new("cpu-isa");
    let train = |name: &str, isa: Option<&str>| -> (Vec<f64>, Vec<u8>) {
        let (dir, losses) = short_run_with(&t, name, "TOKENFORMER_CPU_ISA", isa);
        (losses, std::fs::read(dir.join("model.safetensors")).unwrap())
    };
    let widest = train("widest", None);
    assert!(!widest.0.is_empty());
    // The AVX2 copies of every kernel compute the bits of the AVX-512 ones.
    let avx2 = train("avx2", Some("avx2"));
    assert_eq!(avx2.0, widest.0, "losses differ with TOKENFORMER_CPU_ISA=avx2");
    assert!(avx2.1 == widest.1, "parameters differ with TOKENFORMER_CPU_ISA=avx2");
    // The plain copies and the reference GEMM round otherwise: the same losses to 1e-4.
    let plain = train("plain", Some("plain")).0;
    assert_eq!(plain.len(), widest.0.len());
    for (p, w) in plain.iter().zip(&widest.0) {
        assert!((p - w).abs() <= 1e-4 * w.abs(), "plain {plain:?} vs widest {:?}", widest.0);
    }
    // bench names the width in use.
    let flags = ["bench", "--steps", "0", "--matmul", "64", "--json"];
    let out = t.command(&flags).env("TOKENFORMER_CPU_ISA", "plain").output().unwrap();
    let obj = one_json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(obj["cpu"]["vector_isa"].as_str(), Some("plain"), "{obj:?}");
    assert!(obj["cpu"]["gemm_blocking"].is_null(), "{obj:?}");
    let mut cmd = t.command(&["train", "--out", "bad", "--steps", "1"]);
    let out = cmd.env("TOKENFORMER_CPU_ISA", "sse9").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TOKENFORMER_CPU_ISA") && stderr.contains("avx2"), "{stderr}");
}

#[test]
fn bench_reports_the_processor_its_peak_and_mfu() {
    let t = Scratch::new("bench-cpu");
    let flags = ["bench", "--steps", "1", "--batch", "2", "--seq", "8", "--matmul", "96x64x80"];
    let stdout = t.ok(&[&flags[..], &["--matmul-backward"]].concat());
    for line in ["cpu: ", "GEMM blocking", "fp32 peak", "matmul 96x64x80", "backward", "MFU"] {
        assert!(stdout.contains(line), "no {line:?}: {stdout}");
    }
    assert!(!stdout.contains("n/a"), "{stdout}");
    let obj = one_json(&t.ok(&[&flags[..], &["--json"]].concat()));
    let cpu = &obj["cpu"];
    let peak = cpu["peak_gflops_all_threads"].as_f64().expect("a measured peak");
    assert!(peak > 0.0 && cpu["peak_gflops_one_thread"].as_f64().unwrap() > 0.0, "{obj:?}");
    assert!(!cpu["processor"].as_str().unwrap().is_empty(), "{obj:?}");
    let mfu = obj["mfu"].as_f64().expect("MFU on the CPU");
    let model_gflops = obj["model_tflops"].as_f64().unwrap() * 1e3;
    assert!((mfu - model_gflops / peak).abs() <= 1e-9 * mfu.abs().max(1.0), "{obj:?}");
    assert_eq!(obj["matmul_shape"], serde_json::json!([96, 64, 80]), "{obj:?}");
    let share = obj["matmul_peak_fraction"].as_f64().unwrap();
    assert!((share - obj["matmul_gflops"].as_f64().unwrap() / peak).abs() < 1e-9, "{obj:?}");
    // Only the matmul, and a shape that is not one.
    let only = t.ok(&["bench", "--steps", "0", "--matmul", "32"]);
    assert!(only.contains("matmul 32x32x32") && !only.contains("train step"), "{only}");
    let err = t.fails(&["bench", "--steps", "0", "--matmul", "3x4"]);
    assert!(err.contains("--matmul") && err.contains("MxKxN"), "{err}");
}

#[test]
fn bench_profile_prints_a_table_of_ops() {
    let t = Scratch::new("bench-profile");
    let flags = ["--steps", "1", "--batch", "2", "--seq", "8", "--matmul", "0", "--profile"];
    let stdout = t.ok(&[&["bench"][..], &flags].concat());
    assert!(stdout.contains("profile, per step"), "{stdout}");
    for op in ["matmul", "causal_attention", "adamw", "(outside ops)"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(op)), "no {op} row: {stdout}");
    }
    let obj = one_json(&t.ok(&[&["bench"][..], &flags, &["--json"]].concat()));
    let rows = obj["profile"].as_array().expect("profile rows");
    let share: f64 = rows.iter().map(|r| r["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 0.05, "shares add up to {share}: {obj:?}");
}

#[test]
fn bad_data_is_one_clear_error() {
    let t = Scratch::new("data");
    let train = |name: &str, data: &Path, seq: &str| -> String {
        let out = t.path(name);
        let flags = ["--steps", "2", "--batch", "2", "--eval-every", "1", "--sample-tokens", "0"];
        let err = t.fails(
            &[&["train", "--out", s(&out), "--data", s(data), "--seq", seq][..], &flags].concat(),
        );
        assert!(
            !out.join("model.safetensors").exists() && !out.join("metrics.jsonl").exists(),
            "{name}"
        );
        err
    };
    let missing = t.path("missing.txt");
    assert!(train("r-missing", &missing, "16").contains("missing.txt"));
    let empty = t.file("empty.txt", "");
    let err = train("r-empty", &empty, "16");
    assert!(err.contains("empty.txt") && err.contains("empty file"), "{err}");
    let looped = t.path("loop");
    std::os::unix::fs::symlink("loop", &looped).unwrap();
    let err = train("r-loop", &looped, "16");
    assert!(err.contains("loop:"), "{err}");
    let no_txt = t.path("no-txt");
    std::fs::create_dir(&no_txt).unwrap();
    std::fs::write(no_txt.join("notes.md"), "not a corpus").unwrap();
    let err = train("r-no-txt", &no_txt, "16");
    assert!(err.contains("no-txt") && err.contains(".txt"), "{err}");
    // A directory whose only .txt is a dangling link.
    let dangling = t.path("dangling");
    std::fs::create_dir(&dangling).unwrap();
    std::os::unix::fs::symlink("nowhere.txt", dangling.join("a.txt")).unwrap();
    let err = train("r-dangling", &dangling, "16");
    assert!(err.contains("dangling"), "{err}");
    // 10 bytes: fewer than one window of 64 + 1 tokens.
    let short = t.file("short.txt", "0123456789");
    let err = train("r-short", &short, "64");
    assert!(err.contains("window"), "{err}");
    let err = train("r-val", &short, "4");
    assert!(err.contains("validation") || err.contains("window"), "{err}");
}

#[test]
fn bad_settings_are_refused_and_runs_left_alone() {
    let t = Scratch::new("settings");
    let run = t.short_run("run");
    assert_eq!(metrics_lines(&run), 2);
    assert_eq!(saved_step(&run), 2);
    let before = snapshot(&run);
    let fresh = t.path("fresh");
    for (flags, says) in [
        (&["--batch", "0"][..], "--batch"),
        (&["--steps", "0"], "--steps"),
        (&["--lr", "0"], "--lr"),
        (&["--lr", "-1"], "--lr"),
        (&["--lr=-1"], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--min-lr", "1"], "--min-lr"),
        (&["--weight-decay", "-0.1"], "--weight-decay"),
        (&["--clip", "-1"], "--clip"),
        (&["--grad-accum", "0"], "--grad-accum"),
        (&["--seq", "0"], "--seq"),
        (&["--seq", "257"], "max_seq_len"),
        (&["--eval-every", "0"], "--eval-every"),
        (&["--save-every", "0"], "--save-every"),
        (&["--tokenizer", "nope"], "nope"),
        (&["--preset", "nope"], "nope"),
        (&["--device", "tpu"], "tpu"),
    ] {
        let args = [&["train", "--out", s(&fresh), "--sample-tokens", "0"][..], flags].concat();
        let err = t.fails(&args);
        assert!(err.contains(says), "{}: {err}", show(&args));
        assert!(
            !fresh.exists(),
            "{}: the refused run left {} behind",
            show(&args),
            fresh.display()
        );
        // The same flags aimed at the existing run: refused, and the run is not touched.
        t.fails(&[&["train", "--out", s(&run), "--sample-tokens", "0"][..], flags].concat());
        t.fails(&[&["train", "--resume", s(&run), "--sample-tokens", "0"][..], flags].concat());
    }
    for flags in [&["--batch", "-1"][..], &["--steps", "many"], &["--bogus"]] {
        t.usage_error(&[&["train", "--out", s(&fresh)][..], flags].concat());
    }
    assert_unchanged(&run, &before, "a refused train");

    let err = t.fails(&[&["train", "--out", s(&run)][..], &SHORT].concat());
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
    let err = t.fails(&["train", "--resume", s(&run), "--lr", "0.5"]);
    assert!(err.contains("--lr") && err.contains("contradicts"), "{err}");
    // More steps extend a finished run (tests/growth_workflow.rs); fewer than it took are refused.
    let err = t.fails(&["train", "--resume", s(&run), "--steps", "1"]);
    assert!(err.contains("--steps 1") && err.contains("has taken 2 steps"), "{err}");
    let err = t.fails(&["train", "--resume", s(&run), "--out", s(&fresh)]);
    assert!(err.contains("--out"), "{err}");
    assert_unchanged(&run, &before, "a refused train");

    // Flags that agree with the run are accepted; a finished run has nothing left to do.
    let out = t.run(&[
        "train",
        "--resume",
        s(&run),
        "--steps",
        "2",
        "--batch",
        "2",
        "--sample-tokens",
        "0",
    ]);
    let (_, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing to train: the run") && !stderr.contains("NaN"), "{stderr}");
    assert_eq!(metrics_lines(&run), 2);
    assert!(
        snapshot(&run)[Path::new("model.safetensors")] == before[Path::new("model.safetensors")]
    );
}

#[test]
fn invalid_model_configs_name_the_setting() {
    let t = Scratch::new("config");
    let ids = t.file("ids", &id_text(40));
    let ck = t.init("ck", &[]);
    let run = t.short_run("run");
    for (field, from, to, says) in [
        ("heads", "\"n_heads\": 4,", "\"n_heads\": 3,", "n_heads"),
        // Head dim 32: rotary_pct 0.1 gives 3 rotary dims.
        ("rotary", "\"rotary_pct\": 0.25,", "\"rotary_pct\": 0.1,", "rotary"),
    ] {
        for dir in [&ck, &run] {
            let config = dir.join("config.json");
            let text = std::fs::read_to_string(&config).unwrap();
            assert!(text.contains(from), "{text}");
            // An edit by hand: drop the manifest, which would refuse the changed file.
            std::fs::write(&config, text.replace(from, to)).unwrap();
            let _ = std::fs::remove_file(dir.join("checkpoint.json"));
            let before = snapshot(dir);
            for args in [
                vec!["info", "--checkpoint", s(dir)],
                vec!["eval", "--checkpoint", s(dir), "--tokens", s(&ids)],
                vec!["train", "--resume", s(dir), "--sample-tokens", "0"],
                vec!["generate", "--checkpoint", s(dir), "--max-tokens", "2"],
                vec!["grow", "--checkpoint", s(dir), "--out", s(&t.path("g")), "--qkv", "1"],
            ] {
                let err = t.fails(&args);
                assert!(
                    err.contains(says) && err.contains("config.json"),
                    "{field}: {}: {err}",
                    show(&args)
                );
            }
            assert!(!t.path("g").exists());
            assert_unchanged(dir, &before, "loading an invalid config");
            std::fs::write(&config, text).unwrap();
            t.ok(&["info", "--checkpoint", s(dir)]);
        }
    }
    // A config edited while the manifest remains: the mismatch is reported.
    let config = ck.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let manifested = t.init("manifested", &[]);
    std::fs::write(
        manifested.join("config.json"),
        text.replace("\"n_heads\": 4,", "\"n_heads\": 3,"),
    )
    .unwrap();
    let err = t.fails(&["info", "--checkpoint", s(&manifested)]);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn unknown_presets_are_named() {
    let t = Scratch::new("presets");
    for args in [
        vec!["train", "--preset", "nope", "--out", "r", "--sample-tokens", "0"],
        vec!["init", "--preset", "nope", "--out", "i"],
        vec!["info", "--preset", "nope"],
        vec!["bench", "--preset", "nope", "--steps", "1", "--matmul", "0"],
    ] {
        let err = t.fails(&args);
        assert!(err.contains("'nope'") && err.contains("tiny"), "{}: {err}", show(&args));
    }
    assert!(!t.path("r").exists() && !t.path("i").exists());
    t.usage_error(&["info"]);
    t.usage_error(&["info", "--preset", "tiny", "--checkpoint", "x"]);
}

#[test]
fn resume_needs_a_run() {
    let t = Scratch::new("resume");
    let empty = t.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = t.fails(&["train", "--resume", s(&empty)]);
    assert!(err.contains("empty") && err.contains("not a run"), "{err}");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "a refused resume wrote into {}",
        empty.display()
    );
    let missing = t.path("missing");
    let err = t.fails(&["train", "--resume", s(&missing)]);
    assert!(err.contains("missing"), "{err}");
    assert!(!missing.exists());
    let ck = t.init("ck", &[]);
    let before = snapshot(&ck);
    let err = t.fails(&["train", "--resume", s(&ck)]);
    assert!(err.contains("no training state"), "{err}");
    assert_unchanged(&ck, &before, "a refused resume");
    for args in [
        vec!["info", "--checkpoint", s(&missing)],
        vec!["info", "--checkpoint", s(&empty)],
        vec!["eval", "--checkpoint", s(&empty), "--tokens", "ids"],
        vec!["generate", "--checkpoint", s(&missing)],
        vec!["grow", "--checkpoint", s(&empty), "--out", "g", "--qkv", "1"],
    ] {
        t.fails(&args);
    }
}

#[test]
fn unwritable_outputs_are_one_clear_error() {
    let t = Scratch::new("unwritable");
    let file = t.file("file", "a regular file");
    let sub = file.join("sub");
    let err = t.fails(&[&["train", "--out", s(&sub)][..], &SHORT].concat());
    assert!(err.contains("file/sub"), "{err}");
    let err = t.fails(&["init", "--preset", "tiny", "--out", s(&sub)]);
    assert!(err.contains("file/sub"), "{err}");
    let ck = t.init("ck", &[]);
    let before = snapshot(&ck);
    let err = t.fails(&["grow", "--checkpoint", s(&ck), "--out", s(&sub), "--qkv", "1"]);
    assert!(err.contains("file/sub"), "{err}");
    assert_unchanged(&ck, &before, "a refused grow");
    assert_eq!(std::fs::read(&file).unwrap(), b"a regular file");
}

#[test]
fn a_corrupted_checkpoint_names_the_file() {
    let t = Scratch::new("corrupt");
    let ids = t.file("ids", &id_text(40));
    let ck = t.init("ck", &[]);
    let model = ck.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..1000]).unwrap();
    for args in [
        vec!["eval", "--checkpoint", s(&ck), "--tokens", s(&ids), "--json"],
        vec!["info", "--checkpoint", s(&ck)],
        vec!["generate", "--checkpoint", s(&ck)],
    ] {
        let err = t.fails(&args);
        assert!(err.contains("model.safetensors"), "{}: {err}", show(&args));
    }
    // Without the manifest the truncation is still found.
    std::fs::remove_file(ck.join("checkpoint.json")).unwrap();
    let err = t.fails(&["eval", "--checkpoint", s(&ck), "--tokens", s(&ids), "--json"]);
    assert!(err.contains("model.safetensors"), "{err}");
    // Same length, damaged tensor bytes.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 0x55;
    let ck2 = t.init("ck2", &[]);
    std::fs::write(ck2.join("model.safetensors"), &flipped).unwrap();
    let err = t.fails(&["eval", "--checkpoint", s(&ck2), "--tokens", s(&ids), "--json"]);
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Polls until `dir/metrics.jsonl` has at least `lines` lines (60 s at most).
fn wait_for_lines(child: &mut Child, dir: &Path, lines: usize) {
    let start = Instant::now();
    while metrics_lines(dir) < lines {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training exited early ({status})");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("no {lines} metrics lines in {} after 60 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGINT to `child` and waits for it; returns its exit status and stderr.
fn interrupt(child: Child) -> (std::process::ExitStatus, String) {
    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sigint_saves_a_resumable_run() {
    let t = Scratch::new("sigint");
    let dir = t.path("run");
    let long = [
        "--steps",
        "100000",
        "--batch",
        "2",
        "--seq",
        "16",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
    ];
    let spawn = |args: &[&str]| {
        t.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };

    let mut child =
        spawn(&[&["train", "--out", s(&dir)][..], &long, &["--sample-tokens", "0"]].concat());
    wait_for_lines(&mut child, &dir, 3);
    let (status, stderr) = interrupt(child);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("error:"), "{stderr}");
    assert!(stderr.contains("resume"), "{stderr}");
    let info = t.ok(&["info", "--checkpoint", s(&dir)]);
    assert!(info.contains("1,081,600"), "{info}");
    let steps = metrics_lines(&dir);
    assert!(steps >= 3);
    assert_eq!(saved_step(&dir), steps as u64, "the saved step is not the number of logged steps");

    // The run's own flags are accepted on resume; it goes on from where it stopped.
    let mut child = spawn(&[
        "train",
        "--resume",
        s(&dir),
        "--steps",
        "100000",
        "--batch",
        "2",
        "--sample-tokens",
        "0",
    ]);
    wait_for_lines(&mut child, &dir, steps + 2);
    let (status, stderr) = interrupt(child);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("resume"), "{stderr}");
    let more = metrics_lines(&dir);
    assert!(more >= steps + 2);
    assert_eq!(saved_step(&dir), more as u64);
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=more as u64).collect::<Vec<_>>(), "metrics steps are not 1, 2, 3, ...");
    t.ok(&["info", "--checkpoint", s(&dir)]);
}

#[test]
fn a_diverging_run_stops_with_one_error() {
    let t = Scratch::new("diverge");
    let dir = t.path("run");
    let err = t.fails(&[
        "train",
        "--out",
        s(&dir),
        "--lr",
        "1e6",
        "--clip",
        "0",
        "--warmup",
        "0",
        "--steps",
        "50",
        "--save-every",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--eval-every",
        "1000",
        "--sample-tokens",
        "0",
    ]);
    assert!(err.contains("loss became non-finite"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let info = t.ok(&["info", "--checkpoint", s(&dir)]);
    assert!(info.contains("1,081,600"), "{info}");
    let steps = metrics_lines(&dir);
    assert!((1..50).contains(&steps), "{steps} steps logged");
    assert_eq!(saved_step(&dir), steps as u64);
    assert!(err.contains(&format!("at step {}", steps + 1)), "{err}");
}

#[test]
fn init_from_starts_a_run_from_any_checkpoint() {
    let t = Scratch::new("init-from");
    // An `init` checkpoint with the run's own seed and size is the run's first model: training
    // from it is training from scratch, bit for bit.
    let size = ["--layers", "3", "--d-model", "192"];
    let ck = t.path("ck");
    let stdout =
        t.ok(
            &[&["init", "--preset", "tiny", "--out", s(&ck), "--seed", "1337"][..], &size].concat()
        );
    assert!(stdout.contains("tiny --layers 3 --d-model 192"), "{stdout}");
    let from = t.path("from");
    t.ok(&[&["train", "--out", s(&from), "--init-from", s(&ck)][..], &SHORT].concat());
    let scratch = t.path("scratch");
    t.ok(&[&["train", "--out", s(&scratch)][..], &size, &SHORT].concat());
    let model = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    let losses = |dir: &Path| std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(model(&from), model(&scratch));
    let config = |dir: &Path| std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert_eq!(config(&from), config(&ck));
    // Another seed is another starting model.
    let other = t.init("other", &["--seed", "7"]);
    let from_other = t.path("from-other");
    t.ok(&[&["train", "--out", s(&from_other), "--init-from", s(&other)][..], &SHORT].concat());
    let tiny = t.short_run("tiny");
    assert_ne!(model(&from_other), model(&tiny));

    // A trained run's checkpoint, and a grown one: the new run starts at step 0 from its model.
    let grown = t.path("grown");
    t.ok(&["grow", "--checkpoint", s(&from), "--out", s(&grown), "--ffn", "8"]);
    let again = t.path("again");
    t.ok(&[&["train", "--out", s(&again), "--init-from", s(&grown)][..], &SHORT].concat());
    assert_eq!(config(&again), config(&grown));
    assert_eq!(saved_step(&again), 2);
    assert_ne!(losses(&again), losses(&from));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["settings"]["init_from"], s(&std::path::absolute(&grown).unwrap()));

    // What the checkpoint fixes cannot be asked for differently; nothing is written.
    let bad = t.path("bad");
    let err = t.fails(&["train", "--out", s(&bad), "--init-from", s(&ck), "--tokenizer", "gpt2"]);
    assert!(err.contains("--init-from") && err.contains("vocab_size 256"), "{err}");
    t.usage_error(&["train", "--out", s(&bad), "--init-from", s(&ck), "--layers", "2"]);
    t.usage_error(&["train", "--resume", s(&from), "--init-from", s(&ck)]);
    let err = t.fails(&["train", "--out", s(&bad), "--init-from", s(&t.path("missing"))]);
    assert!(err.contains("--init-from") && err.contains("missing"), "{err}");
    assert!(!bad.exists());
    // An `init` checkpoint cannot be resumed; the error says what to do instead.
    let err = t.fails(&["train", "--resume", s(&ck)]);
    assert!(err.contains("--init-from"), "{err}");
}

#[test]
fn model_sizes_come_from_flags_over_a_preset() {
    let t = Scratch::new("sizes");
    let flags = [
        "--layers",
        "3",
        "--d-model",
        "96",
        "--heads",
        "3",
        "--qkv-tokens",
        "40",
        "--proj-tokens",
        "24",
        "--ffn-tokens",
        "80",
        "--max-seq-len",
        "48",
    ];
    let stdout = t.ok(&[&["info", "--preset", "tiny"][..], &flags].concat());
    let json: String = stdout.lines().take_while(|l| *l != "}").chain(["}"]).collect();
    let config: serde_json::Value = serde_json::from_str(&json).unwrap();
    for (key, want) in [
        ("n_layers", 3),
        ("d_model", 96),
        ("n_heads", 3),
        ("qkv_tokens", 40),
        ("proj_tokens", 24),
        ("ffn_tokens", 80),
        ("max_seq_len", 48),
        ("qkv_scale_tokens", 40),
        ("ffn_scale_tokens", 80),
    ] {
        assert_eq!(config[key], want, "{key} in\n{stdout}");
    }
    let ck = t.path("ck");
    t.ok(&[&["init", "--preset", "tiny", "--out", s(&ck)][..], &flags].concat());
    let info = t.ok(&["info", "--checkpoint", s(&ck)]);
    assert_eq!(info_line(&info, "total parameters"), info_line(&stdout, "total parameters"));
    let run = t.path("run");
    t.ok(&[&["train", "--out", s(&run)][..], &flags, &SHORT].concat());
    let info = t.ok(&["info", "--checkpoint", s(&run)]);
    assert_eq!(info_line(&info, "total parameters"), info_line(&stdout, "total parameters"));

    // Checked before anything is allocated or written.
    let bad = t.path("bad");
    let err = t.fails(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        s(&bad),
        "--d-model",
        "100",
        "--heads",
        "3",
    ]);
    assert!(err.contains("n_heads 3") && err.contains("d_model 100"), "{err}");
    let err = t.fails(&["init", "--preset", "tiny", "--out", s(&bad), "--d-model", "1000000000"]);
    assert!(err.contains("memory"), "{err}");
    let err =
        t.fails(&[&["train", "--out", s(&bad), "--ffn-tokens", "4000000000"][..], &SHORT].concat());
    assert!(err.contains("memory"), "{err}");
    let err = t.fails(&["train", "--out", s(&bad), "--arch", "transformer", "--qkv-tokens", "4"]);
    assert!(err.contains("--qkv-tokens") && err.contains("--d-ff"), "{err}");
    let err = t.fails(&[&["train", "--out", s(&bad), "--max-seq-len", "8"][..], &SHORT].concat());
    assert!(err.contains("--seq 16") && err.contains("max_seq_len 8"), "{err}");
    assert!(!bad.exists());
    let err = t.fails(&["train", "--resume", s(&run), "--layers", "2"]);
    assert!(err.contains("--layers 2") && err.contains("--init-from"), "{err}");
    let err = t.fails(&["info", "--checkpoint", s(&ck), "--layers", "2"]);
    assert!(err.contains("--preset"), "{err}");
}

#[test]
fn eval_reads_text_with_the_checkpoints_tokenizer() {
    let t = Scratch::new("eval-text");
    let ck = t.init("ck", &[]);
    let text = t.file("text.txt", "To be, or not to be, that is the question:\n");
    let ids = t.path("ids");
    t.ok(&["tokenize", s(&text), "--out", s(&ids)]);
    let written = std::fs::read_to_string(&ids).unwrap();
    let want: Vec<String> = "To be, or not".bytes().map(|b| b.to_string()).collect();
    assert!(written.starts_with(&want.join(" ")), "{written}");
    let (by_ids, tokens, _) = eval(&t, &ck, &ids);
    assert_eq!(tokens, 42, "43 bytes predict 42 tokens");
    let by_text = t.ok(&["eval", "--checkpoint", s(&ck), "--text", s(&text), "--json"]);
    assert_eq!(one_json(&by_text)["loss"].as_f64(), Some(by_ids));
    let mut stdin = t.command(&["eval", "--checkpoint", s(&ck), "--text", "-", "--json"]);
    stdin.stdin(std::fs::File::open(&text).unwrap());
    let out = stdin.output().unwrap();
    assert_eq!(one_json(&texts(&out).0)["loss"].as_f64(), Some(by_ids));
    // Without --out the ids go to stdout; another tokenizer gives other ids.
    assert_eq!(t.ok(&["tokenize", s(&text)]), written);
    let gpt2 = t.ok(&["tokenize", "--tokenizer", "gpt2", s(&text)]);
    assert!(gpt2.starts_with("2514 307 11"), "{gpt2}");

    // An existing --out is never replaced; a missing text is one error line.
    let before = std::fs::read(&ids).unwrap();
    let err = t.fails(&["tokenize", s(&text), "--out", s(&ids)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&ids).unwrap(), before);
    let err = t.fails(&["eval", "--checkpoint", s(&ck), "--text", "missing.txt"]);
    assert!(err.contains("missing.txt"), "{err}");
    t.usage_error(&["eval", "--checkpoint", s(&ck)]);
    t.usage_error(&["eval", "--checkpoint", s(&ck), "--text", s(&text), "--tokens", s(&ids)]);
}

#[test]
fn every_option_has_a_description_and_a_default() {
    let t = Scratch::new("help");
    let top = t.ok(&["--help"]);
    let mut commands: Vec<Vec<String>> = help_section(&top, "Commands:")
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(|c| vec![c.to_string()])
        .collect();
    assert!(commands.len() >= 9, "{top}");
    commands.push(vec!["experiment".into(), "growth".into()]);
    for command in commands {
        let mut args = command.clone();
        args.push("--help".into());
        let help = t.ok(&args);
        if help_section(&help, "Commands:").len() > 1 {
            continue;
        }
        // Options in the usage line outside [OPTIONS] are required: they need no default.
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
        for line in help_section(&help, "Options:") {
            let flag = line.split_whitespace().find(|w| w.starts_with("--")).unwrap().to_string();
            if flag == "--help" || flag == "--version" {
                continue;
            }
            let value = line.split_once(&flag).unwrap().1.trim_start();
            let value = value.strip_prefix('<').map_or(value, |v| v.split_once('>').unwrap().1);
            let value = value.trim_start_matches(['.']);
            assert!(value.trim().len() > 10, "{command:?} {flag} has no description: {line}");
            let required = usage.contains(&format!("{flag} <"));
            assert!(
                required || line.contains("[default: "),
                "{command:?} {flag} does not say its default: {line}"
            );
        }
        for line in help_section(&help, "Arguments:") {
            assert!(line.split_whitespace().count() > 3, "{command:?}: {line}");
        }
    }
    // The defaults the help states are the defaults a run has.
    let train = t.ok(&["train", "--help"]);
    let defaults = tokenformer::models::train::TrainSettings::default();
    for (flag, value) in [
        ("--steps", defaults.steps.to_string()),
        ("--batch", defaults.batch.to_string()),
        ("--seq", defaults.seq.to_string()),
        ("--warmup", defaults.warmup.to_string()),
        ("--seed", defaults.seed.to_string()),
        ("--eval-every", defaults.eval_every.to_string()),
        ("--save-every", defaults.save_every.to_string()),
        ("--grad-accum", defaults.grad_accum.to_string()),
        ("--lr", format!("{:e}", defaults.lr)),
        ("--min-lr", format!("{:e}", defaults.min_lr)),
        ("--weight-decay", defaults.weight_decay.to_string()),
        ("--clip", defaults.clip.to_string()),
        ("--stage-lr", defaults.stage_lr.to_string()),
        ("--preset", defaults.preset.clone()),
    ] {
        let line = train
            .lines()
            .find(|l| l.split_whitespace().next() == Some(flag))
            .unwrap_or_else(|| panic!("no {flag} in\n{train}"));
        assert!(line.ends_with(&format!("[default: {value}]")), "{line}");
    }
}

/// The lines of a `--help` section (after `title`, up to the next blank line).
fn help_section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines().skip_while(|l| *l != title).skip(1).take_while(|l| !l.trim().is_empty()).collect()
}
