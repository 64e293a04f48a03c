//! The CUDA device: one context, one stream and one cuBLAS handle per GPU, opened on first use
//! and shared by every tensor on it. The CUDA libraries are loaded at run time (cudarc's
//! dynamic loading), so this module builds on machines without CUDA; there, opening a device
//! returns an error naming the missing library instead of a panic.

use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One open GPU.
pub struct CudaBackend {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// A buffer of f32 on a GPU, with the backend that owns it.
pub struct CudaStorage {
    pub slice: CudaSlice<f32>,
    pub backend: Arc<CudaBackend>,
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Checks that the CUDA driver library can be loaded, before any cudarc call that would panic
/// on its absence.
pub fn check_driver_present() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Cuda(
            "the CUDA driver library (libcuda.so) was not found: install the NVIDIA driver, or add \
             the folder that holds libcuda.so to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

impl CudaBackend {
    /// The backend for GPU `ordinal`, opened once per process.
    pub fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = open.get(&ordinal) {
            return Ok(b.clone());
        }
        check_driver_present()?;
        let count = CudaContext::device_count().map_err(|e| cuda_err("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "no device cuda:{ordinal} ({count} CUDA devices found)"
            )));
        }
        let context = CudaContext::new(ordinal).map_err(|e| cuda_err("opening the device", e))?;
        let stream = context.default_stream();
        let backend = Arc::new(CudaBackend { ordinal, context, stream });
        open.insert(ordinal, backend.clone());
        Ok(backend)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Waits for all queued work on this device.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }
}

impl CudaStorage {
    pub fn ordinal(&self) -> usize {
        self.backend.ordinal
    }
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
    pub fn from_host(ordinal: usize, host: &[f32]) -> Result<CudaStorage> {
        let backend = CudaBackend::get(ordinal)?;
        let slice = backend.stream.clone_htod(host).map_err(|e| cuda_err("copy to device", e))?;
        Ok(CudaStorage { slice, backend })
    }
    pub fn full(ordinal: usize, len: usize, value: f32) -> Result<CudaStorage> {
        if value == 0.0 {
            let backend = CudaBackend::get(ordinal)?;
            let slice = backend.stream.alloc_zeros::<f32>(len).map_err(|e| cuda_err("alloc", e))?;
            return Ok(CudaStorage { slice, backend });
        }
        CudaStorage::from_host(ordinal, &vec![value; len])
    }
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.backend.stream.clone_dtoh(&self.slice).map_err(|e| cuda_err("copy to host", e))
    }
}
