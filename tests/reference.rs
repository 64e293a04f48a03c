//! `tokenformer eval` against the independent float64 NumPy reference (scripts/reference.py):
//! random small configs of all three Θ variants, relative loss difference under 1e-5, and
//! exact growth leaving the eval output bit-identical. Skipped when python3 with numpy is not
//! available. The seed is fixed so that the run is reproducible; set TOKENFORMER_REFCHECK_SEED
//! to another one to explore (or run the script directly, whose default seed is random).

use std::path::Path;
use std::process::Command;

fn python_with_numpy() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn eval_matches_float64_reference() {
    if !python_with_numpy() {
        tokenformer::core::testing::report_skip("python3 with numpy not available");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("python3");
    cmd.current_dir(root)
        .arg("scripts/reference_check.py")
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_tokenformer"))
        .args(["--cases", "12"]);
    let seed = std::env::var("TOKENFORMER_REFCHECK_SEED").unwrap_or_else(|_| "1".into());
    cmd.args(["--seed", seed.trim()]);
    let out = cmd.output().expect("failed to start python3 scripts/reference_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "scripts/reference_check.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(" 0 failed"),
        "scripts/reference_check.py printed no clean summary:\n{stdout}"
    );
}
