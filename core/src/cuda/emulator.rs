//! The CUDA emulator: CPU versions of the three libraries the CUDA path loads (the driver
//! libcuda.so, the run-time compiler libnvrtc.so and libcublas.so), built from ../cudaemu into
//! the target directory by this crate's build script. Loaded into a process before anything
//! opens the real libraries, they are found by cudarc under their usual names, and the whole
//! CUDA path runs on the CPU, down to the C ABI: kernels compiled from the same source strings,
//! launched with the same arguments, one fiber per GPU thread. See cudaemu/README.md for what
//! it models and what it cannot tell.
//!
//! Used in two ways: `TOKENFORMER_CUDA_EMU=1` (or `=DIR`, a folder holding the three libraries)
//! makes `--device cuda` run on it; the GPU tests load it themselves where no CUDA driver is
//! installed ([`use_for_tests_if_no_driver`]).

use crate::{Error, Result};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The libraries, in the order they are loaded (the driver first: the others call into it).
const LIBRARIES: [&str; 3] = ["libcuda.so", "libnvrtc.so", "libcublas.so"];

/// The emulator built with this crate, or None where no C++ compiler was found at build time.
pub fn built_dir() -> Option<&'static Path> {
    let dir = env!("TOKENFORMER_CUDAEMU_DIR");
    (!dir.is_empty()).then(|| Path::new(dir))
}

/// The folder loaded into this process, once loaded.
static LOADED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Whether the emulator is loaded into this process.
pub fn is_loaded() -> bool {
    LOADED.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Whether a library of this `name` is already mapped into the process.
fn already_loaded(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: RTLD_NOLOAD only looks the name up; the handle's reference is dropped at once.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if !handle.is_null() {
            libc::dlclose(handle);
        }
        !handle.is_null()
    }
}

/// Loads the emulated libraries from `dir` into this process for good, so that every later CUDA
/// call runs on the CPU. Refused when a CUDA driver is already loaded; loading the same folder
/// twice does nothing.
pub fn load(dir: &Path) -> Result<()> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(current) = loaded.as_ref() {
        return if current == dir {
            Ok(())
        } else {
            Err(Error::Cuda(format!(
                "the CUDA emulator from {} is loaded already; cannot switch to {}",
                current.display(),
                dir.display()
            )))
        };
    }
    if already_loaded("libcuda.so") || already_loaded("libcuda.so.1") {
        return Err(Error::Cuda(
            "a CUDA driver is already loaded in this process: the emulator must be chosen before \
             the first CUDA call"
                .into(),
        ));
    }
    for name in LIBRARIES {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::Cuda(format!(
                "the CUDA emulator's {name} is not in {}",
                dir.display()
            )));
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Cuda(format!("{}: a path with a NUL byte", path.display())))?;
        // SAFETY: loads a library of ours; RTLD_GLOBAL makes its SONAME (the usual name) the
        // one that cudarc's later dlopen by name finds. The handle is kept for the process.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            return Err(Error::Cuda(format!(
                "loading the CUDA emulator's {}: {}",
                path.display(),
                last_dl_error()
            )));
        }
    }
    *loaded = Some(dir.to_path_buf());
    Ok(())
}

/// With `TOKENFORMER_CUDA_EMU` set (`1` for the emulator built with this crate, or a folder),
/// loads the emulator; does nothing otherwise.
pub fn load_if_requested() -> Result<()> {
    let Some(value) = std::env::var_os("TOKENFORMER_CUDA_EMU") else { return Ok(()) };
    if value.is_empty() || value == "0" {
        return Ok(());
    }
    let dir = if value == "1" {
        built_dir().map(Path::to_path_buf).ok_or_else(|| {
            Error::Cuda(
                "TOKENFORMER_CUDA_EMU=1, but the CUDA emulator was not built with this program (it \
                 needs a C++ compiler at build time, on x86-64 Linux)"
                    .into(),
            )
        })?
    } else {
        PathBuf::from(value)
    };
    load(&dir)
}

/// For the GPU tests: where no CUDA driver is installed, loads the emulator built with this
/// crate and says so once on stderr. Returns whether the tests run on the emulator; an error
/// when there is neither a driver nor an emulator (the tests then skip, saying why).
///
/// Decided once per process, by the first caller, while the others wait: a test thread that
/// looked for a driver while another was loading the emulator's three libraries would find its
/// libcuda.so already there, take it for a real driver, and miss its NVRTC.
pub fn use_for_tests_if_no_driver() -> Result<bool> {
    static DECISION: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    let message = |e: Error| match e {
        Error::Cuda(m) => m,
        other => other.to_string(),
    };
    DECISION.get_or_init(|| decide_for_tests().map_err(message)).clone().map_err(Error::Cuda)
}

fn decide_for_tests() -> Result<bool> {
    load_if_requested()?;
    if is_loaded() {
        return Ok(true);
    }
    if super::check_driver_present().is_ok() {
        return Ok(false);
    }
    let Some(dir) = built_dir() else {
        return Err(Error::Cuda(
            "no CUDA driver, and no CUDA emulator (it is built where a C++ compiler is found, on \
             x86-64 Linux)"
                .into(),
        ));
    };
    load(dir)?;
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "no CUDA driver on this machine: the GPU tests run on the CUDA emulator (CPU) from {}",
        dir.display()
    );
    Ok(true)
}

/// Sets the order in which the emulator runs the blocks of a launch and the threads between
/// two barriers: `forward`, `reverse` or `random:SEED` (as `CUDAEMU_ORDER` does). A kernel
/// whose results differ between orders has a race.
pub fn set_order(order: &str) -> Result<()> {
    if !is_loaded() {
        return Err(Error::Cuda("the CUDA emulator is not loaded".into()));
    }
    let name = CString::new("cudaemu_set_order").expect("no NUL");
    // SAFETY: looks up a symbol of the loaded emulator; its type is `int (*)(const char*)`.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if f.is_null() {
        return Err(Error::Cuda("the loaded libcuda.so is not the emulator's".into()));
    }
    // SAFETY: the symbol is the emulator's `int cudaemu_set_order(const char*)`.
    let set: extern "C" fn(*const libc::c_char) -> libc::c_int = unsafe { std::mem::transmute(f) };
    let c = CString::new(order).map_err(|_| Error::Cuda("an order with a NUL byte".into()))?;
    if set(c.as_ptr()) != 0 {
        return Err(Error::Cuda(format!(
            "unknown emulator order '{order}': forward, reverse or random:SEED"
        )));
    }
    Ok(())
}
