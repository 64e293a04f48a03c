//! The `tokenformer` command: train, grow, evaluate, sample and benchmark TokenFormer models.
//! With no subcommand it runs the default training run on the built-in corpus.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
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
