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

/// At most this many threads per core: beyond it the threads only take turns (100,000 of them
/// ran a short run for minutes without a line of output).
const MOST_THREADS_PER_CORE: usize = 4;

/// The thread count `RAYON_NUM_THREADS` asks for, capped at `MOST_THREADS_PER_CORE` per core
/// (saying so in one line); `None` when it is not set (rayon then uses one per core). Zero and
/// anything that is not a whole number are refused.
fn thread_count() -> Result<Option<usize>, String> {
    let Some(value) = std::env::var_os("RAYON_NUM_THREADS") else { return Ok(None) };
    let text = value.to_string_lossy();
    let asked = match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => n,
        _ => {
            return Err(format!(
                "RAYON_NUM_THREADS must be a whole number of threads, at least 1; got '{text}' \
                 (unset it to use one thread per core)"
            ))
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = cores.saturating_mul(MOST_THREADS_PER_CORE);
    if asked > most {
        eprintln!(
            "RAYON_NUM_THREADS={asked} is more than {MOST_THREADS_PER_CORE} threads for each of \
             the {cores} cores: using {most} threads"
        );
        return Ok(Some(most));
    }
    Ok(Some(asked))
}

fn main() -> ExitCode {
    keep_freed_memory();
    let threads = match thread_count() {
        Ok(threads) => threads,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The main thread joins rayon's pool as one of its workers: a parallel kernel called from it
    // then runs its share of the work right there, instead of handing all of it to the pool and
    // sleeping until a worker wakes up and finishes, once per op.
    let pool = rayon::ThreadPoolBuilder::new().use_current_thread();
    let _ = match threads {
        Some(n) => pool.num_threads(n),
        None => pool,
    }
    .build_global();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
