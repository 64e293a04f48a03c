//! Tensors for the TokenFormer engine: shape, storage on CPU or CUDA, devices, errors, a seeded
//! RNG and safetensors I/O. Everything here is data; the arithmetic lives in `tokenformer-ops`.

pub mod cuda;
pub mod device;
pub mod error;
pub mod rng;
pub mod safetensors_io;
pub mod shape;
pub mod tensor;

pub use device::Device;
pub use error::{Error, Result};
pub use rng::Rng;
pub use shape::Shape;
pub use tensor::{Storage, Tensor};
