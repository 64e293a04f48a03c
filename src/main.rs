//! The `tokenformer` command: train, grow, evaluate, sample and benchmark TokenFormer models.
//! With no subcommand it runs the default training run on the built-in corpus.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
