//! Every example in `examples/` builds and runs in its quick mode (`--quick`: a few training
//! steps, small pictures), so none of them rots. Each run must succeed, print the lines that
//! show its point and write its pictures. The examples check their own claims (exact growth
//! keeps the loss bit for bit, backward matches finite differences) and exit with an error when
//! one fails, so a passing run is a passing check.
//!
//! The examples are built once, with `cargo build --release --examples`, the way a reader runs
//! them (`cargo run --release --example NAME`); a fresh build makes that a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The examples' folder of binaries, after building them.
fn examples_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--examples", "--quiet"])
            .current_dir(root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --release --examples failed");
        // The test binary is target/<profile>/deps/examples-<hash>; the examples are in
        // target/release/examples.
        let exe = std::env::current_exe().expect("the test knows its own path");
        let target = exe.ancestors().nth(3).expect("the test binary lies under target/");
        target.join("release").join("examples")
    })
}

/// Runs example `name` in quick mode with `args`, writing its pictures (if any) into a fresh
/// folder; returns its standard output and the folder.
fn run(name: &str, args: &[&str]) -> (String, PathBuf) {
    let out = std::env::temp_dir().join(format!("tf-example-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let binary = examples_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} was not built", binary.display());
    let mut command = Command::new(&binary);
    command.arg("--quick");
    if name != "autograd_by_hand" {
        command.arg("--out").arg(&out);
    }
    let output =
        command.args(args).env("RAYON_NUM_THREADS", "2").output().expect("the example runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} {args:?} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    (stdout, out)
}

fn assert_prints(name: &str, stdout: &str, lines: &[&str]) {
    for line in lines {
        assert!(stdout.contains(line), "{name} did not print {line:?}:\n{stdout}");
    }
}

/// Checks that `dir/file` is a PNG of some substance, then removes `dir`.
fn assert_pngs(dir: &Path, files: &[&str]) {
    for file in files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&bytes[1..4], b"PNG", "{} is not a PNG", path.display());
        assert!(bytes.len() > 5_000, "{} is nearly empty ({} bytes)", path.display(), bytes.len());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn autograd_by_hand() {
    let (stdout, _) = run("autograd_by_hand", &[]);
    assert_prints(
        "autograd_by_hand",
        &stdout,
        &[
            "o      = tanh(n)",
            "g      = g1 + t5",
            "138.8338",
            "645.5773",
            "gradcheck (central differences on the f32 engine, ε = 1e-3): passed",
        ],
    );
}

#[test]
fn two_moons() {
    for activation in ["relu", "tanh", "sigmoid"] {
        let (stdout, out) = run("two_moons", &["--activation", activation]);
        // Each activation has a picture of its own, so that they can be compared side by side.
        let picture = format!("two_moons_{activation}.png");
        assert_prints("two_moons", &stdout, &["final: loss", "accuracy", &picture]);
        assert_pngs(&out, &[&picture]);
        if activation == "sigmoid" {
            // Sigmoid learns slowly: the quick run (60 steps) ends short of separating the
            // moons, and says what to do about it.
            let hint = ["not converged: ", "try more, e.g. --steps 300"];
            assert_prints("two_moons --activation sigmoid", &stdout, &hint);
        }
    }
}

#[test]
fn pattention_layer() {
    let (stdout, out) = run("pattention_layer", &[]);
    assert_prints(
        "pattention_layer",
        &stdout,
        &["growth at step 40: 4 → 32 tokens", "identical, bit for bit", "final loss"],
    );
    assert_pngs(&out, &["pattention_layer_exact.png"]);
    let (stdout, out) = run("pattention_layer", &["--init", "random"]);
    assert_prints("pattention_layer --init random", &stdout, &["× higher: the new random keys"]);
    assert_pngs(&out, &["pattention_layer_random.png"]);
}

#[test]
fn attention_heads() {
    let (stdout, out) = run("attention_heads", &[]);
    assert_prints(
        "attention_heads",
        &stdout,
        &[
            "the written-out forward matches TokenFormer::forward",
            "layer 3",
            "head 3:",
            "what its most active parameter tokens respond to",
            "the strongest token of each group that responds most to the same character",
        ],
    );
    assert_pngs(&out, &["attention_heads.png", "pattention_scores.png"]);
}

#[test]
fn grow_a_language_model() {
    let (stdout, out) = run("grow_a_language_model", &[]);
    assert_prints(
        "grow_a_language_model",
        &stdout,
        &[
            "1,081,600 → 1,605,888 parameters",
            "the same loss, bit for bit: yes; the same sampled text: yes",
            "text at step 6:",
        ],
    );
    assert_pngs(&out, &["grow_a_language_model.png"]);
}

/// A new example must be added here too.
#[test]
fn every_example_is_run_here() {
    let tested = [
        "attention_heads",
        "autograd_by_hand",
        "grow_a_language_model",
        "pattention_layer",
        "two_moons",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .expect("the examples folder")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    found.sort();
    assert_eq!(found, tested, "examples/ and the tests in tests/examples.rs differ");
}

#[test]
fn bad_flags_end_in_one_error_line() {
    let max = u64::MAX.to_string();
    let cases: [(&str, Vec<&str>, &str); 10] = [
        ("two_moons", vec!["--hidden", "1000000000"], "--hidden must be in 1..=4096"),
        ("two_moons", vec!["--hidden", &max], "--hidden must be in 1..=4096"),
        ("two_moons", vec!["--steps", "0"], "--steps must be in 1.."),
        ("attention_heads", vec!["--layer", "99"], "--layer 99: the model has layers 0..4"),
        ("attention_heads", vec!["--tokens", "0"], "--tokens must be in 1.."),
        ("grow_a_language_model", vec!["--qkv", "100000000000"], "--qkv must be in 0..=4096"),
        ("pattention_layer", vec!["--tokens", "0"], "--tokens must be in 1..=4095"),
        ("pattention_layer", vec!["--tokens", "1", "--grow-to", &max], "--grow-to must be in"),
        ("pattention_layer", vec!["--grow-to", "2"], "--grow-to 2 must exceed --tokens 4"),
        ("pattention_layer", vec!["--steps", "0"], "--steps must be in 1.."),
    ];
    for (name, args, want) in cases {
        let binary = examples_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        let output = Command::new(&binary).arg("--quick").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name} {args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name} {args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(want),
            "{name} {args:?}: {stderr}"
        );
    }
}
