//! The model, the part of the crate to read first, in this order: [`config`] (the
//! hyperparameters and presets), [`pattention`] (the layer whose weights are parameter tokens),
//! [`linear`] (the layers a Pattention replaces, for the Transformer baseline),
//! [`language_model`] (the decoder built from them, re-exported here), [`growth`] (more tokens
//! or more layers, the same function) and [`optim`] (AdamW, the schedule and clipping).

pub mod config;
pub mod growth;
pub mod language_model;
pub mod linear;
pub mod optim;
pub mod pattention;

pub use language_model::*;
