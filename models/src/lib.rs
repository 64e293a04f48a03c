//! TokenFormer on the autodiff engine: Pattention, the language model, presets, growth, AdamW,
//! data, training and checkpoints.

pub mod config;

pub use config::{ModelConfig, NormKind};
