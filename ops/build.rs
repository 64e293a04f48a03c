//! Gathers every CUDA C kernel file under src/ into one registry (`tokenformer_ops::kernels`),
//! so that a kernel file added later is embedded, compiled at run time and compile-checked by
//! the NVRTC test without being listed by hand anywhere.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Every `.cu` file under `dir`, recursively.
fn kernel_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            kernel_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "cu") {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let src = manifest.join("src");
    println!("cargo:rerun-if-changed=src");
    let mut files = Vec::new();
    kernel_files(&src, &mut files);
    files.sort();
    let common = src.join("common.cuh");
    let mut code = String::from("/// Every kernel file of the crate, sorted by path.\npub const ALL: &[KernelSource] = &[\n");
    for file in &files {
        let relative =
            file.strip_prefix(&src).expect("under src").to_string_lossy().replace('\\', "/");
        // The module name: the op family's folder, plus the file's stem when it is not the
        // family's `kernels.cu` (attention/flash.cu is `attention_flash`).
        let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let folder = relative.rsplit_once('/').map_or("", |(dir, _)| dir).replace('/', "_");
        let module = match (folder.is_empty(), stem == "kernels") {
            (true, _) => stem.to_string(),
            (false, true) => folder,
            (false, false) => format!("{folder}_{stem}"),
        };
        writeln!(
            code,
            "    KernelSource {{ module: {module:?}, file: {relative:?}, source: concat!(include_str!({common:?}), include_str!({file:?})) }},",
            common = common.to_string_lossy(),
            file = file.to_string_lossy(),
        )
        .expect("writing to a String");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    std::fs::write(out.join("kernel_sources.rs"), code).expect("writing the kernel registry");
}
