//! The `tokenformer` command: train, grow, evaluate, sample and benchmark TokenFormer models.
//! With no subcommand it runs the default training run on the built-in corpus.

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// A training step allocates and frees the same large buffers (activations, gradients, packed
/// GEMM operands) every time. By default glibc returns freed blocks above 128 KB to the kernel
/// and maps them again on the next allocation, and the page faults of that showed up as about
/// 6% of a `tiny` step; keeping such blocks in the heap makes the next step reuse them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator settings; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    // The main thread joins rayon's pool as one of its workers: a parallel kernel called from it
    // then runs its share of the work right there, instead of handing all of it to the pool and
    // sleeping until a worker wakes up and finishes, once per op.
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
