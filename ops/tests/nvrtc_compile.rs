//! Every kernel file the crate embeds, compiled by NVRTC to machine code for sm_80 (A100) and
//! sm_90 (H100, H200) with the options used at run time. This needs NVRTC only, no GPU and no
//! driver, so a kernel that does not compile fails here, on any machine, not on a rare card.
//!
//! NVRTC is looked for on the library path first, then in the `nvidia` Python packages (the
//! wheel `nvidia-cuda-nvrtc`, which `.ci/run` installs). Where it is found nowhere, the test
//! prints "skipped: ..." to stderr and passes; with `TOKENFORMER_REQUIRE_CUDA=1` a skip is a
//! failure.

use std::io::Write;
use std::path::PathBuf;
use tokenformer_core::cuda::{check_nvrtc_present, compile_cubin, cuda_required, nvrtc_version};
use tokenformer_ops::kernels;

const ARCHITECTURES: [(i32, i32); 2] = [(8, 0), (9, 0)];

/// Folders of the `nvidia` Python packages that may hold NVRTC (CUDA 13 wheels put it in
/// nvidia/cu13/lib, CUDA 12 wheels in nvidia/cuda_nvrtc/lib).
fn python_nvrtc_dirs() -> Vec<PathBuf> {
    let script = "import nvidia, os\n\
                  for p in nvidia.__path__:\n    \
                  for sub in ('cu13/lib', 'cuda_nvrtc/lib'):\n        \
                  d = os.path.join(p, sub)\n        \
                  if os.path.isdir(d): print(d)";
    let Ok(out) = std::process::Command::new("python3").args(["-c", script]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect()
}

/// Loads NVRTC (and its builtins library, which it opens by name at compile time) from `dir`
/// into the process, so that the later lookups by name find the libraries already loaded.
fn preload_from(dir: &std::path::Path) -> bool {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // The builtins first: libnvrtc needs them, not the other way round.
    files.sort_by_key(|p| !p.to_string_lossy().contains("builtins"));
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("libnvrtc") && name.contains(".so") && !name.contains(".alt.") {
            // SAFETY: loading NVRTC runs no initialiser beyond the C runtime's.
            if let Ok(lib) = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
                // Kept loaded for the life of the process.
                std::mem::forget(lib);
            }
        }
    }
    check_nvrtc_present().is_ok()
}

/// Makes NVRTC loadable, or says why it is not.
fn find_nvrtc() -> Result<String, String> {
    if check_nvrtc_present().is_ok() {
        return Ok("the library path".into());
    }
    for dir in python_nvrtc_dirs() {
        if preload_from(&dir) {
            return Ok(dir.display().to_string());
        }
    }
    Err("NVRTC (libnvrtc.so) is neither on the library path nor in a Python `nvidia` \
         package (pip install nvidia-cuda-nvrtc)"
        .into())
}

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90() {
    let found = match find_nvrtc() {
        Ok(found) => found,
        Err(why) => {
            assert!(!cuda_required(), "TOKENFORMER_REQUIRE_CUDA=1 but {why}");
            tokenformer_core::testing::report_skip(&why);
            return;
        }
    };
    let (major, minor) = nvrtc_version().unwrap();
    let mut report = format!("NVRTC {major}.{minor} from {found}\n");
    assert!(!kernels::ALL.is_empty(), "no kernel file is registered");
    let mut failures = Vec::new();
    for k in kernels::ALL {
        for arch in ARCHITECTURES {
            let started = std::time::Instant::now();
            match compile_cubin(k.module, k.source, arch) {
                Ok(cubin) => {
                    report += &format!(
                        "compiled {:<36} sm_{}{}  {:>7} bytes  {:>4} ms\n",
                        k.file,
                        arch.0,
                        arch.1,
                        cubin.len(),
                        started.elapsed().as_millis()
                    )
                }
                Err(e) => failures.push(format!("{} for sm_{}{}: {e}", k.file, arch.0, arch.1)),
            }
        }
    }
    report += &format!(
        "{} kernel files x {} architectures, {} failed\n",
        kernels::ALL.len(),
        ARCHITECTURES.len(),
        failures.len()
    );
    // Past the harness's capture: CI's log shows what was compiled.
    let _ = write!(std::io::stderr(), "{report}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
