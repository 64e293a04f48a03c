//! TokenFormer on the autodiff engine: Pattention, the language model (and its Transformer
//! baseline), presets, growth, AdamW, data, training and checkpoints.
//!
//! What the model computes, how it grows and what its files hold are specified in
//! `docs/SPEC.md` at the root of the repository; comments here cite it as "SPEC §n".

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod evaluate;
pub mod files;
pub mod generate;
pub mod growth;
pub mod linear;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod pattention;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod train;

pub use config::{Arch, ModelConfig, Theta};
pub use model::TokenFormer;
pub use pattention::{GrowInit, Pattention};
