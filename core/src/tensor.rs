//! The tensor: an immutable, cheaply cloned handle to row-major f32 data with a shape.
//!
//! There is one layout (contiguous, row-major) and no stride system: ops that need another
//! layout (transpose, narrow) make an explicit copy, and matmul takes transpose flags so that a
//! transposed operand is never materialised. Data lives on the CPU (a `Vec<f32>`) or on a CUDA
//! device.

use crate::cuda::CudaStorage;
use crate::{Device, Error, Result, Rng, Shape};
use std::fmt;
use std::sync::Arc;

pub enum Storage {
    Cpu(Vec<f32>),
    Cuda(CudaStorage),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Shape,
    storage: Arc<Storage>,
}

impl Tensor {
    /// Wraps storage that already holds `shape.numel()` values.
    ///
    /// Precondition: the storage holds exactly `shape.numel()` values. It is the constructor
    /// kernels use for their outputs, so it does not check this in release builds; a tensor
    /// built from user data goes through [`from_vec`](Tensor::from_vec), which does.
    pub fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        debug_assert_eq!(
            match &storage {
                Storage::Cpu(v) => v.len(),
                Storage::Cuda(s) => s.len(),
            },
            shape.numel(),
            "from_storage: storage length does not match shape {shape}"
        );
        Tensor { shape, storage: Arc::new(storage) }
    }

    pub fn from_vec(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        if shape.numel() != data.len() {
            return Err(Error::shape(
                "from_vec",
                format!("{} values cannot fill shape {shape}", data.len()),
            ));
        }
        Ok(Tensor::from_storage(Storage::Cpu(data), shape))
    }

    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_storage(Storage::Cpu(vec![value]), Shape::new(&[]))
    }

    pub fn full(dims: &[usize], value: f32, device: Device) -> Result<Tensor> {
        let shape = Shape::new(dims);
        match device {
            Device::Cpu => {
                Ok(Tensor::from_storage(Storage::Cpu(vec![value; shape.numel()]), shape))
            }
            Device::Cuda(ordinal) => {
                let storage = CudaStorage::full(ordinal, shape.numel(), value)?;
                Ok(Tensor::from_storage(Storage::Cuda(storage), shape))
            }
        }
    }

    pub fn zeros(dims: &[usize], device: Device) -> Result<Tensor> {
        Tensor::full(dims, 0.0, device)
    }

    pub fn ones(dims: &[usize], device: Device) -> Result<Tensor> {
        Tensor::full(dims, 1.0, device)
    }

    /// Samples from N(0, std²), drawn in row-major order from `rng` on the CPU.
    pub fn randn(dims: &[usize], std: f32, rng: &mut Rng) -> Tensor {
        let shape = Shape::new(dims);
        let data = (0..shape.numel()).map(|_| (rng.normal() * std as f64) as f32).collect();
        Tensor::from_storage(Storage::Cpu(data), shape)
    }

    /// Samples uniform in [low, high), drawn in row-major order from `rng` on the CPU.
    pub fn rand_uniform(dims: &[usize], low: f32, high: f32, rng: &mut Rng) -> Tensor {
        let shape = Shape::new(dims);
        let data = (0..shape.numel()).map(|_| low + (high - low) * rng.next_f32()).collect();
        Tensor::from_storage(Storage::Cpu(data), shape)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// The CPU data, or `None` for a tensor on another device.
    pub fn cpu_data(&self) -> Option<&[f32]> {
        match &*self.storage {
            Storage::Cpu(v) => Some(v),
            Storage::Cuda(_) => None,
        }
    }

    /// The CPU data, or an error naming `op` for a tensor on another device.
    pub fn cpu_slice(&self, op: &'static str) -> Result<&[f32]> {
        self.cpu_data().ok_or_else(|| {
            Error::device(op, format!("expected a CPU tensor, got one on {}", self.device()))
        })
    }

    /// The CPU data for writing in place, when this tensor is its only holder (no clone of it
    /// is alive, so no other holder can see it change); None otherwise or on another device.
    pub fn cpu_data_mut(&mut self) -> Option<&mut [f32]> {
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(v) => Some(v),
            Storage::Cuda(_) => None,
        }
    }

    /// The CUDA storage, or `None` for a tensor on another device.
    pub fn cuda_storage(&self) -> Option<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    /// The CUDA storage for writing in place, when this tensor is its only holder (no clone
    /// of it is alive, so no other holder can see it change); None otherwise or on the CPU.
    pub fn cuda_storage_mut(&mut self) -> Option<&mut CudaStorage> {
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    /// The same data under another shape with as many elements (no copy).
    pub fn reshape(&self, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot reshape {} into {shape}", self.shape),
            ));
        }
        Ok(Tensor { shape, storage: self.storage.clone() })
    }

    /// Copies the values to a Vec, from whichever device holds them.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda(s) => s.to_vec(),
        }
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor of shape {} has {} values", self.shape, self.numel()),
            ));
        }
        Ok(self.to_vec()?[0])
    }

    /// The same values on `device` (no copy when already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(self.to_vec()?),
            Device::Cuda(ordinal) => {
                let host = self.to_vec()?;
                Storage::Cuda(CudaStorage::from_host(ordinal, &host)?)
            }
        };
        Ok(Tensor::from_storage(storage, self.shape.clone()))
    }

    /// True when both handles share the same storage (used to check that ops did not copy).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}

impl fmt::Display for Tensor {
    /// Shape and device, then the values nested by dimension; long dimensions show their first
    /// and last three entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = match self.to_vec() {
            Ok(v) => v,
            Err(e) => {
                return write!(f, "Tensor{} on {} (unreadable: {e})", self.shape, self.device())
            }
        };
        writeln!(f, "Tensor{} on {}", self.shape, self.device())?;
        fn rec(f: &mut fmt::Formatter<'_>, v: &[f32], dims: &[usize], depth: usize) -> fmt::Result {
            if dims.is_empty() {
                return write!(f, "{:.4}", v[0]);
            }
            let n = dims[0];
            let step = v.len() / n.max(1);
            let shown: Vec<usize> =
                if n > 6 { (0..3).chain(n - 3..n).collect() } else { (0..n).collect() };
            write!(f, "[")?;
            for (j, &i) in shown.iter().enumerate() {
                if j > 0 {
                    if dims.len() > 1 {
                        write!(f, ",\n{}", " ".repeat(depth + 1))?;
                    } else {
                        write!(f, ", ")?;
                    }
                }
                if n > 6 && j == 3 {
                    write!(f, "...")?;
                    if dims.len() > 1 {
                        write!(f, ",\n{}", " ".repeat(depth + 1))?;
                    } else {
                        write!(f, ", ")?;
                    }
                }
                rec(f, &v[i * step..(i + 1) * step], &dims[1..], depth + 1)?;
            }
            write!(f, "]")
        }
        rec(f, &values, self.dims(), 0)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{} on {}", self.shape, self.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn constructors_shapes_and_errors() {
        let t = Tensor::from_vec((0..6).map(|x| x as f32).collect(), &[2, 3]).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        let r = t.reshape(&[3, 2]).unwrap();
        assert!(r.same_storage(&t));
        let err = t.reshape(&[4, 2]).unwrap_err().to_string();
        assert!(
            err.contains("reshape") && err.contains("[2, 3]") && err.contains("[4, 2]"),
            "{err}"
        );
        assert!(Tensor::from_vec(vec![1.0; 5], &[2, 3]).is_err());
        let a = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(3));
        let b = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(3));
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap());
        let s = format!("{t}");
        assert!(s.contains("[2, 3]") && s.contains("5.0000"), "{s}");
    }
}
