//! Tensors for the TokenFormer engine: shape, storage on CPU or CUDA, devices, errors, a seeded
//! RNG and safetensors I/O, plus the CUDA runtime every GPU kernel goes through (`cuda`: the
//! device's context, stream and cuBLAS handle, NVRTC compilation and kernel launches). No op
//! is defined here: what the kernels compute, on either device, lives in `tokenformer-ops`.

pub mod cuda;
pub mod device;
pub mod error;
pub mod rng;
pub mod safetensors_io;
pub mod shape;
pub mod tensor;
pub mod testing;

pub use device::Device;
pub use error::{Error, Result};
pub use rng::Rng;
pub use shape::Shape;
pub use tensor::{Storage, Tensor};
