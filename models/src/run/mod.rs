//! The product around the model: what `tokenformer train`, `eval`, `generate` and `bench`
//! need beyond the model itself. [`train`] is the training loop (its [`train::train_step`] is
//! one optimizer step: forward, backward, clipping, AdamW); [`checkpoint`] and [`run_dir`]
//! keep a run directory safe; [`data`] turns text into batches; [`metrics`], [`plot`] and
//! [`progress`] report; [`files`] and [`memory`] check input and sizes before anything is
//! written or allocated; [`evaluate`], [`generate`] and [`bench`](mod@bench) are the other
//! commands, and [`experiment`] runs `experiment growth` (growth against training from
//! scratch, arm by arm, through [`train`]). None of it is needed to understand what TokenFormer
//! computes.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod experiment;
pub mod files;
pub mod generate;
pub mod import;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod train;
