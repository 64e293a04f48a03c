//! Builds the CUDA emulator (../cudaemu: libcuda.so, libnvrtc.so and libcublas.so that run the
//! CUDA path on the CPU) into the target directory with the system C++ compiler, and tells the
//! crate where it is (`TOKENFORMER_CUDAEMU_DIR`, empty where no compiler was found). The
//! emulator is used only when asked for: by the GPU tests on a machine without a CUDA driver,
//! or with `TOKENFORMER_CUDA_EMU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C++ compiler: $CXX, else the first of c++, g++, clang++ that runs.
fn compiler() -> Option<String> {
    let candidates =
        std::env::var("CXX").into_iter().chain(["c++", "g++", "clang++"].map(String::from));
    candidates
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

fn build(cxx: &str, root: &Path, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let header = root.join("include/cudaemu_device.h");
    std::fs::copy(&header, out.join("cudaemu_device.h"))
        .map_err(|e| format!("copying {}: {e}", header.display()))?;
    let libraries: [(&str, &[&str]); 3] = [
        ("libcuda.so", &["driver.cpp", "fiber.cpp"]),
        ("libnvrtc.so", &["nvrtc.cpp"]),
        ("libcublas.so", &["cublas.cpp"]),
    ];
    for (name, sources) in libraries {
        let target = out.join(name);
        let partial = out.join(format!("{name}.partial"));
        let status = Command::new(cxx)
            .args(["-std=c++17", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra"])
            .arg(format!("-Wl,-soname,{name}"))
            .args(sources.iter().map(|s| root.join("src").join(s)))
            .args(["-ldl", "-lpthread", "-o"])
            .arg(&partial)
            .status()
            .map_err(|e| format!("running {cxx}: {e}"))?;
        if !status.success() {
            return Err(format!("{cxx} failed to build {name} ({status})"));
        }
        std::fs::rename(&partial, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    Ok(())
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.join("../cudaemu");
    println!("cargo:rerun-if-changed={}", root.join("src").display());
    println!("cargo:rerun-if-changed={}", root.join("include").display());
    println!("cargo:rerun-if-env-changed=CXX");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("cudaemu");
    // The emulator's fibers are written for x86-64 Linux, and it is loaded into the programs
    // built here: elsewhere, or when cross-compiling, it is not built.
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let supported = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("HOST") == var("TARGET");
    let built = match compiler().filter(|_| supported) {
        // A compiler that cannot build our own C++ is a broken checkout, not a missing tool.
        Some(cxx) => match build(&cxx, &root, &out) {
            Ok(()) => out.display().to_string(),
            Err(e) => panic!("building the CUDA emulator: {e}"),
        },
        None if !supported => {
            println!("cargo:warning=the CUDA emulator is built for x86-64 Linux hosts only: GPU tests skip on machines without a GPU");
            String::new()
        }
        None => {
            println!("cargo:warning=no C++ compiler found: the CUDA emulator is not built, and GPU tests skip on machines without a GPU");
            String::new()
        }
    };
    println!("cargo:rustc-env=TOKENFORMER_CUDAEMU_DIR={built}");
}
