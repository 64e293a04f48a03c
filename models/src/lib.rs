//! TokenFormer on the autodiff engine, in two folders:
//!
//! - [`model`] is the model: its hyperparameters and presets, Pattention, the language model
//!   (and its Transformer baseline), growth, and AdamW. This is what the paper describes and
//!   what a reader learning how TokenFormer works reads, in that order.
//! - [`run`] is the product around it: the training loop, checkpoints, data and tokenizers,
//!   metrics, plots, the progress bar, benchmarks, careful file access, run-directory locking,
//!   memory checks, evaluation and sampling, and the growth experiment. A learner can skip it,
//!   except perhaps [`train::train_step`], one optimizer step, where the model meets AdamW.
//!
//! Every module is also reachable from the crate root (`tokenformer_models::train`,
//! `tokenformer_models::config`, ...), as before the split.
//!
//! What the model computes, how it grows and what its files hold are specified in
//! `docs/SPEC.md` at the root of the repository; comments here cite it as "SPEC §n".

pub mod model;
pub mod run;

pub use model::{config, growth, linear, optim, pattention};
pub use run::{
    bench, checkpoint, data, evaluate, experiment, files, generate, import, memory, metrics, plot,
    progress, run_dir, train,
};

pub use config::{Arch, ModelConfig, Theta};
pub use model::TokenFormer;
pub use pattention::{GrowInit, Pattention};
