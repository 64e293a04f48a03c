//! TokenFormer: a transformer whose every linear projection is attention over learnable
//! parameter tokens, on a tensor and autodiff engine written from scratch.
//!
//! The crates, in the order a reader should take them (each depends only on those before it):
//!
//! - [`core`] — tensors (shape, CPU and CUDA storage, devices, errors, seeded RNG, safetensors)
//! - [`ops`] — kernels, one family per module, CPU reference and CUDA side by side, forward and
//!   backward
//! - [`autograd`] — the dynamic graph (`Var`, `backward`, `no_grad`, `gradcheck`)
//! - [`models`] — Pattention, the language model, presets, growth, AdamW, data, training,
//!   checkpoints
//!
//! The model, its growth rules and its file formats are specified in `docs/SPEC.md`; comments
//! throughout cite it as "SPEC §n".

pub use tokenformer_autograd as autograd;
pub use tokenformer_core as core;
pub use tokenformer_models as models;
pub use tokenformer_ops as ops;
