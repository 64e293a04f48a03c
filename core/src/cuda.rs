//! The CUDA device: one context, one stream and one cuBLAS handle per GPU, opened on first use
//! and shared by every tensor on it. The CUDA libraries are loaded at run time (cudarc's
//! dynamic loading), so this module builds on machines without CUDA; there, opening a device
//! returns an error naming the missing library instead of a panic.
//!
//! Kernels are CUDA C source strings compiled by NVRTC on first use, to machine code for the
//! device's own architecture, and cached for the life of the process (`CudaBackend::function`).
//! All work is queued on one stream created at device open (not the legacy default stream,
//! which cannot be captured into a CUDA graph), so kernels, copies and cuBLAS calls run in the
//! order they were issued.
//!
//! `TOKENFORMER_CUDA_SYNC=1` makes every launch wait for its kernel and report a failure under
//! the kernel's name: a fault is then reported where it happens, not at a later copy.

use crate::{Error, Result, Shape, Storage, Tensor};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub mod emulator;

/// Threads per block for the elementwise kernels and for the one-block-per-row kernels. The
/// row kernels reduce with a tree whose shape depends only on this number, never on the row
/// length, so appending exact zeros to a row leaves its sums bit-identical (exact growth).
pub const BLOCK: u32 = 256;

/// A scalar kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U32(u32),
    I32(i32),
    F32(f32),
    /// Axis sizes or strides, a C struct `{ unsigned int v[MAX_RANK]; }` on the device side.
    Dims([u32; MAX_RANK]),
}

/// One open GPU.
pub struct CudaBackend {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The cuBLAS handle and whether it currently allows TF32. The lock is held from setting
    /// the math mode until the GEMM is queued, so a call always runs in the mode it asked for.
    blas: Mutex<(CudaBlas, bool)>,
    /// Whether to wait for every kernel and name it in the error (`TOKENFORMER_CUDA_SYNC=1`).
    sync_each_launch: bool,
    /// Compiled modules by name, with the functions already looked up in each.
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
    /// Bytes held by live `CudaStorage` buffers of this device, and the most ever held at once.
    allocated_bytes: AtomicUsize,
    peak_bytes: AtomicUsize,
}

struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// A buffer of f32 on a GPU, with the backend that owns it.
pub struct CudaStorage {
    pub slice: CudaSlice<f32>,
    pub backend: Arc<CudaBackend>,
    /// Number of f32 values (the slice holds at least one, since CUDA cannot allocate 0 bytes).
    len: usize,
}

/// Memory use of one device, for `bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by tensors now.
    pub allocated_bytes: usize,
    /// The most bytes held by tensors at once since the device was opened.
    pub peak_bytes: usize,
    /// Free and total device memory as the driver reports them (all processes, all
    /// allocations, including cuBLAS workspaces and the memory pool's reserve).
    pub free_bytes: usize,
    pub total_bytes: usize,
}

/// An error of a CUDA call, naming what was being done.
pub fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

static TF32: AtomicBool = AtomicBool::new(false);

/// Lets cuBLAS run f32 GEMMs on TF32 tensor cores (10-bit mantissa products, f32 sums): several
/// times faster on Ampere and newer, at about 1e-3 relative error. Off by default; applies to
/// every device of the process from the next GEMM on.
pub fn set_tf32(enabled: bool) {
    TF32.store(enabled, Ordering::Relaxed);
}

/// Whether TF32 GEMMs are allowed (see `set_tf32`).
pub fn tf32_enabled() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Whether `TOKENFORMER_REQUIRE_CUDA=1` is set: then a GPU test that cannot open a device
/// fails instead of skipping (set on GPU machines, where a skip would hide a broken setup).
pub fn cuda_required() -> bool {
    std::env::var("TOKENFORMER_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

fn missing_library(what: &str, file: &str) -> Error {
    Error::Cuda(format!(
        "the {what} library ({file}) was not found: add the folder that holds it to \
         LD_LIBRARY_PATH"
    ))
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
             the folder that holds libcuda.so to LD_LIBRARY_PATH (without a GPU, \
             TOKENFORMER_CUDA_EMU=1 runs the CUDA path on the CPU emulator)"
                .into(),
        ))
    }
}

/// Checks that NVRTC (the run-time CUDA C compiler) can be loaded.
pub fn check_nvrtc_present() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(missing_library("NVRTC", "libnvrtc.so"))
    }
}

/// The CUDA version the installed driver supports, e.g. (12, 8). Needs the driver library.
pub fn driver_cuda_version() -> Result<(i32, i32)> {
    check_driver_present()?;
    let mut version = 0;
    // SAFETY: the driver writes one int; cuDriverGetVersion needs no initialised context.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| cuda_err("asking the driver for its CUDA version", e))?;
    Ok((version / 1000, (version % 1000) / 10))
}

/// Checks that the driver can load the machine code NVRTC makes: a CUBIN carries the CUDA
/// version of the compiler, and a driver loads those of its own major version or older only.
fn check_versions_compatible(driver: (i32, i32), nvrtc: (i32, i32)) -> Result<()> {
    if nvrtc.0 > driver.0 {
        return Err(Error::Cuda(format!(
            "the CUDA driver supports CUDA {}.{} but NVRTC is from CUDA {}.{}, whose kernels it \
             cannot load: update the NVIDIA driver, or put an NVRTC of CUDA {} on LD_LIBRARY_PATH",
            driver.0, driver.1, nvrtc.0, nvrtc.1, driver.0
        )));
    }
    Ok(())
}

/// Whether `TOKENFORMER_CUDA_SYNC=1` is set (see the module's documentation).
fn sync_each_launch_requested() -> bool {
    std::env::var("TOKENFORMER_CUDA_SYNC").is_ok_and(|v| v == "1")
}

/// Checks that cuBLAS can be loaded.
pub fn check_cublas_present() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(missing_library("cuBLAS", "libcublas.so"))
    }
}

/// A launch of `n` independent threads, `BLOCK` per block.
pub fn launch_1d(n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of one block of `BLOCK` threads per row.
pub fn launch_rows(rows: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A launch of one block per row whose size fits the row: a multiple of the 32-thread warp
/// (as block_sum needs), about four values per thread, at most `BLOCK` (256 threads on a
/// 128-wide row would leave half of them idle). For row kernels whose reduction tree may
/// depend on the row length; the Θ kernels keep `launch_rows`, whose tree must not (exact
/// growth). With `fitted` false, `launch_rows`: the plain kernels' `BLOCK` threads.
pub fn launch_rows_fitted(rows: u32, len: usize, fitted: bool) -> LaunchConfig {
    if !fitted {
        return launch_rows(rows);
    }
    let threads = len.div_ceil(4).div_ceil(32) * 32;
    let threads = threads.clamp(32, BLOCK as usize) as u32;
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Compiles an NVRTC program and returns its CUBIN, or the error with the compiler's log.
///
/// # Safety
/// `program` must be a live program from `nvrtc::create_program`.
unsafe fn compile_to_cubin(
    program: cudarc::nvrtc::sys::nvrtcProgram,
    options: &[String],
) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result as nvrtc, sys};
    if let Err(e) = nvrtc::compile_program(program, options) {
        let log = nvrtc::get_program_log(program).unwrap_or_default();
        let log: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
        return Err(format!("{e:?}\n{}", String::from_utf8_lossy(&log)));
    }
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| format!("{e:?}"))?;
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast())
        .result()
        .map_err(|e| format!("{e:?}"))?;
    Ok(cubin)
}

/// The version of the NVRTC library found, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    check_nvrtc_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| cuda_err("asking NVRTC for its version", e))?;
    Ok((major, minor))
}

/// Compiles the CUDA C `source` of module `module_name` with NVRTC to machine code (a CUBIN) for
/// compute capability `(major, minor)`. Needs NVRTC only, no GPU and no driver: this is how the
/// kernels are compile-checked on machines without a card.
///
/// Machine code for the exact GPU rather than PTX: nothing is left for the driver to compile,
/// so a driver of the same major CUDA version as NVRTC (even an older minor one) loads it.
pub fn compile_cubin(
    module_name: &str,
    source: &str,
    (major, minor): (i32, i32),
) -> Result<Vec<u8>> {
    use cudarc::nvrtc::result as nvrtc;
    check_nvrtc_present()?;
    let what = format!("compiling {module_name}.cu for sm_{major}{minor}");
    let src = CString::new(source).map_err(|e| cuda_err(&what, e))?;
    let file = CString::new(format!("{module_name}.cu")).map_err(|e| cuda_err(&what, e))?;
    let program = nvrtc::create_program(&src, Some(&file)).map_err(|e| cuda_err(&what, e))?;
    let options = [format!("--gpu-architecture=sm_{major}{minor}")];
    // SAFETY: `program` is alive until the destroy_program call below.
    let cubin = unsafe { compile_to_cubin(program, &options) };
    // SAFETY: `program` was created above and is destroyed exactly once.
    unsafe { nvrtc::destroy_program(program) }.map_err(|e| cuda_err(&what, e))?;
    cubin.map_err(|msg| Error::Cuda(format!("{what}: {msg}")))
}

/// A tensor of shape `dims` over `storage`.
pub fn cuda_tensor(storage: CudaStorage, dims: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), Shape::new(dims))
}

/// The most axes an index-walking kernel (broadcast, permute) takes.
pub const MAX_RANK: usize = 8;

/// Axis sizes or strides as a kernel argument: a fixed array of `MAX_RANK` u32 (a C struct
/// `{ unsigned int v[8]; }` on the device side), unused entries 0.
pub fn dims_arg(op: &str, values: &[usize]) -> Result<[u32; MAX_RANK]> {
    if values.len() > MAX_RANK {
        return Err(Error::Cuda(format!(
            "{op}: {} axes after merging, more than the {MAX_RANK} the kernels take",
            values.len()
        )));
    }
    let mut out = [0u32; MAX_RANK];
    for (o, &v) in out.iter_mut().zip(values) {
        *o = count_u32(op, v)?;
    }
    Ok(out)
}

/// Merges adjacent axes that every operand walks contiguously, and drops axes of size 1, so
/// index-walking kernels loop over as few axes as possible. `strides[k]` holds operand k's
/// stride for each axis of `dims` (0 on a broadcast axis). Returns at least one axis.
pub fn merge_axes(dims: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut merged_dims: Vec<usize> = Vec::new();
    let mut merged: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (axis, &d) in dims.iter().enumerate() {
        if d == 1 {
            continue;
        }
        let contiguous = !merged_dims.is_empty()
            && strides.iter().zip(&merged).all(|(s, m)| m[m.len() - 1] == s[axis] * d);
        if contiguous {
            let last = merged_dims.len() - 1;
            merged_dims[last] *= d;
            for (s, m) in strides.iter().zip(merged.iter_mut()) {
                m[last] = s[axis];
            }
        } else {
            merged_dims.push(d);
            for (s, m) in strides.iter().zip(merged.iter_mut()) {
                m.push(s[axis]);
            }
        }
    }
    if merged_dims.is_empty() {
        merged_dims.push(1);
        merged.iter_mut().for_each(|m| m.push(0));
    }
    (merged_dims, merged)
}

/// `n` as the 32-bit count the kernels index with, or an error naming `op`.
pub fn count_u32(op: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::Cuda(format!("{op}: {n} elements is more than the 32-bit indexing of the kernels"))
    })
}

impl CudaBackend {
    /// The backend for GPU `ordinal`, opened once per process.
    pub fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = open.get(&ordinal) {
            return Ok(b.clone());
        }
        emulator::load_if_requested()?;
        check_driver_present()?;
        let count = CudaContext::device_count().map_err(|e| cuda_err("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "no device cuda:{ordinal} ({count} CUDA devices found)"
            )));
        }
        // Both libraries are checked before first use: cudarc panics when it cannot load one.
        check_nvrtc_present()?;
        check_cublas_present()?;
        check_versions_compatible(driver_cuda_version()?, nvrtc_version()?)?;
        let context = CudaContext::new(ordinal).map_err(|e| cuda_err("opening the device", e))?;
        // SAFETY: every buffer is used on the one stream below, where work runs in issue order,
        // so cudarc's per-buffer events (two created per allocation) would guard nothing.
        unsafe { context.disable_event_tracking() };
        keep_freed_memory_in_the_pool(&context)?;
        let stream = context.new_stream().map_err(|e| cuda_err("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("creating cuBLAS", e))?;
        let backend = Arc::new(CudaBackend {
            ordinal,
            context,
            stream,
            blas: Mutex::new((blas, false)),
            sync_each_launch: sync_each_launch_requested(),
            modules: Mutex::new(HashMap::new()),
            allocated_bytes: AtomicUsize::new(0),
            peak_bytes: AtomicUsize::new(0),
        });
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

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        self.context.name().map_err(|e| cuda_err("device name", e))
    }
    /// (major, minor), e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.context.compute_capability().map_err(|e| cuda_err("compute capability", e))
    }

    /// What our tensors hold now and at most, and what the driver reports free.
    pub fn memory_stats(&self) -> Result<MemoryStats> {
        let (free_bytes, total_bytes) =
            self.context.mem_get_info().map_err(|e| cuda_err("memory info", e))?;
        Ok(MemoryStats {
            allocated_bytes: self.allocated_bytes.load(Ordering::Relaxed),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
            free_bytes,
            total_bytes,
        })
    }

    /// Runs `call` (named `what` in errors) with the cuBLAS handle of this backend's stream, its
    /// math mode set to the TF32 switch for this call, and this device's context current on the
    /// calling thread (cuBLAS runs on whichever context is current). The handle stays locked
    /// until the call has queued its work, so no other thread can change the mode in between.
    pub fn with_blas<R, E: std::fmt::Debug>(
        &self,
        what: &str,
        call: impl FnOnce(&CudaBlas) -> std::result::Result<R, E>,
    ) -> Result<R> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode};
        self.context.bind_to_thread().map_err(|e| cuda_err("binding the device", e))?;
        let wanted = tf32_enabled();
        let mut guard = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        let (blas, uses_tf32) = &mut *guard;
        if *uses_tf32 != wanted {
            let mode = if wanted {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle is alive as long as `self`; the mode is a valid enum value.
            unsafe { cublasSetMathMode(*blas.handle(), mode) }
                .result()
                .map_err(|e| cuda_err("setting the cuBLAS math mode", e))?;
            *uses_tf32 = wanted;
        }
        let out = call(blas).map_err(|e| cuda_err(what, e))?;
        drop(guard);
        self.check_after_launch(what)?;
        Ok(out)
    }

    /// With `TOKENFORMER_CUDA_SYNC=1`, waits for the work just queued and names `what` if it
    /// failed on the device; otherwise does nothing.
    pub fn check_after_launch(&self, what: &str) -> Result<()> {
        if self.sync_each_launch {
            self.stream
                .synchronize()
                .map_err(|e| Error::Cuda(format!("{what} failed on the device: {e:?}")))?;
        }
        Ok(())
    }

    /// A CUDA event recorded at this point of the stream's work: timing with events measures
    /// the device's time without making the host wait for the device in between.
    pub fn record_event(&self) -> Result<DeviceEvent> {
        use cudarc::driver::sys::CUevent_flags;
        let event = self
            .context
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("creating an event", e))?;
        event.record(&self.stream).map_err(|e| cuda_err("recording an event", e))?;
        Ok(DeviceEvent(event))
    }

    /// The kernel `fn_name` of the CUDA C `source` known as `module_name`. The source is
    /// compiled by NVRTC for this device's architecture the first time any of its kernels is
    /// asked for; the module stays loaded for the life of the process.
    pub fn function(
        &self,
        module_name: &'static str,
        source: &'static str,
        fn_name: &str,
    ) -> Result<CudaFunction> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if !modules.contains_key(module_name) {
            let module = self.compile(module_name, source)?;
            modules.insert(module_name, LoadedModule { module, functions: HashMap::new() });
        }
        let Some(loaded) = modules.get_mut(module_name) else {
            return Err(Error::Cuda(format!("module {module_name} vanished from the cache")));
        };
        if let Some(f) = loaded.functions.get(fn_name) {
            return Ok(f.clone());
        }
        let f = loaded
            .module
            .load_function(fn_name)
            .map_err(|e| cuda_err(&format!("kernel {fn_name} of module {module_name}"), e))?;
        loaded.functions.insert(fn_name.to_string(), f.clone());
        Ok(f)
    }

    fn compile(&self, module_name: &str, source: &str) -> Result<Arc<CudaModule>> {
        let cubin = compile_cubin(module_name, source, self.compute_capability()?)?;
        self.context
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| cuda_err(&format!("loading {module_name}.cu"), e))
    }

    /// Launches `kernel` of module `module_name` with the arguments in the order every kernel
    /// of this project declares them: input buffers, output buffers, then scalars.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and the
    /// launch configuration and scalars must keep every access inside the buffers.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch(
        &self,
        module_name: &'static str,
        source: &'static str,
        kernel: &str,
        cfg: LaunchConfig,
        inputs: &[&CudaSlice<f32>],
        outputs: &mut [&mut CudaSlice<f32>],
        scalars: &[Arg],
    ) -> Result<()> {
        let f = self.function(module_name, source, kernel)?;
        let mut launch = self.stream.launch_builder(&f);
        for &x in inputs {
            launch.arg(x);
        }
        for y in outputs.iter_mut() {
            launch.arg(&mut **y);
        }
        for s in scalars {
            match s {
                Arg::U32(v) => launch.arg(v),
                Arg::I32(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
                Arg::Dims(v) => launch.arg(v),
            };
        }
        let what = format!("kernel {module_name}::{kernel}");
        launch.launch(cfg).map_err(|e| cuda_err(&what, e))?;
        self.check_after_launch(&what)
    }

    /// A buffer of `len` values whose contents are undefined: for outputs a kernel overwrites.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<CudaStorage> {
        // SAFETY: the memory is uninitialised; callers write every value before reading it.
        let slice = unsafe { self.stream.alloc::<f32>(len.max(1)) }
            .map_err(|e| cuda_err(&format!("allocating {len} floats"), e))?;
        Ok(CudaStorage::new(slice, len, self.clone()))
    }

    /// A buffer of `len` zeros.
    pub fn zeros(self: &Arc<Self>, len: usize) -> Result<CudaStorage> {
        let slice = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| cuda_err(&format!("allocating {len} floats"), e))?;
        Ok(CudaStorage::new(slice, len, self.clone()))
    }

    /// A buffer holding a copy of `host`.
    pub fn upload(self: &Arc<Self>, host: &[f32]) -> Result<CudaStorage> {
        let mut storage = self.alloc(host.len())?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut storage.slice)
                .map_err(|e| cuda_err("copy to device", e))?;
        }
        Ok(storage)
    }
}

/// A point of a stream's work (see `CudaBackend::record_event`).
pub struct DeviceEvent(cudarc::driver::CudaEvent);

impl DeviceEvent {
    /// Seconds of device time from `earlier` to this event; waits until both are reached.
    pub fn seconds_since(&self, earlier: &DeviceEvent) -> Result<f64> {
        let ms = earlier.0.elapsed_ms(&self.0).map_err(|e| cuda_err("timing with events", e))?;
        Ok(ms as f64 / 1e3)
    }
}

/// Sets the release threshold of the device's default memory pool (which serves the
/// stream-ordered allocations) to its maximum. At 0, the default, every synchronisation may
/// hand freed memory back to the driver, and the next training step maps it again.
fn keep_freed_memory_in_the_pool(context: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys::{self, CUmemPool_attribute};
    if !context.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is the context's own; the attribute takes a u64 (cuuint64_t).
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(|e| cuda_err("finding the memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| cuda_err("setting the memory pool's release threshold", e))
    }
}

impl CudaStorage {
    /// Wraps `slice` (at least `len` values), counting its bytes in the device's memory stats.
    fn new(slice: CudaSlice<f32>, len: usize, backend: Arc<CudaBackend>) -> CudaStorage {
        let bytes = slice.num_bytes();
        let now = backend.allocated_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        backend.peak_bytes.fetch_max(now, Ordering::Relaxed);
        CudaStorage { slice, backend, len }
    }

    /// The CUDA storage of `t`, or an error naming `op` when `t` lives elsewhere.
    pub fn of<'t>(t: &'t Tensor, op: &'static str) -> Result<&'t CudaStorage> {
        t.cuda_storage().ok_or_else(|| {
            Error::device(op, format!("expected a CUDA tensor, got one on {}", t.device()))
        })
    }

    pub fn ordinal(&self) -> usize {
        self.backend.ordinal
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn from_host(ordinal: usize, host: &[f32]) -> Result<CudaStorage> {
        CudaBackend::get(ordinal)?.upload(host)
    }
    pub fn full(ordinal: usize, len: usize, value: f32) -> Result<CudaStorage> {
        let backend = CudaBackend::get(ordinal)?;
        if value == 0.0 && value.is_sign_positive() {
            return backend.zeros(len);
        }
        // A fill on the device (the value's 32 bits, repeated), not an upload from the host.
        let mut storage = backend.alloc(len)?;
        backend.context.bind_to_thread().map_err(|e| cuda_err("binding the device", e))?;
        {
            let (ptr, _sync) = storage.slice.device_ptr_mut(&backend.stream);
            let stream = backend.stream.cu_stream();
            // SAFETY: the buffer holds at least `len` f32 values, each written as one word.
            unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), len, stream) }
                .result()
                .map_err(|e| cuda_err(&format!("filling {len} floats"), e))?;
        }
        backend.check_after_launch("fill")?;
        Ok(storage)
    }
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let host = self
            .backend
            .stream
            .clone_dtoh(&self.slice.slice(..self.len))
            .map_err(|e| cuda_err("copy to host", e))?;
        // The copy is queued on the stream: wait for it before the host reads the values.
        self.backend.synchronize()?;
        Ok(host)
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.backend.allocated_bytes.fetch_sub(self.slice.num_bytes(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_of_a_newer_cuda_than_the_driver_are_refused_by_name() {
        assert!(check_versions_compatible((13, 0), (13, 0)).is_ok());
        assert!(check_versions_compatible((13, 2), (13, 0)).is_ok());
        assert!(check_versions_compatible((13, 0), (12, 8)).is_ok());
        let err = check_versions_compatible((12, 8), (13, 0)).unwrap_err().to_string();
        assert!(err.contains("12.8") && err.contains("13.0"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn merging_axes_keeps_the_index_map() {
        // [2, 3, 4] + [3, 1]: the first operand is contiguous throughout, the second is
        // stretched along axes 0 and 2, so no axis can merge with a neighbour: all three stay.
        let (dims, strides) = merge_axes(&[2, 3, 4], &[vec![12, 4, 1], vec![0, 1, 0]]);
        assert_eq!(dims, vec![2, 3, 4]);
        assert_eq!(strides, vec![vec![12, 4, 1], vec![0, 1, 0]]);
        let (dims, strides) = merge_axes(&[2, 3, 4], &[vec![12, 4, 1], vec![12, 4, 1]]);
        assert_eq!((dims, strides), (vec![24], vec![vec![1], vec![1]]));
        let (dims, strides) = merge_axes(&[5, 1, 7], &[vec![7, 7, 1], vec![0, 0, 1]]);
        assert_eq!((dims, strides), (vec![5, 7], vec![vec![7, 1], vec![0, 1]]));
        let (dims, strides) = merge_axes(&[], &[vec![], vec![]]);
        assert_eq!((dims, strides), (vec![1], vec![vec![0], vec![0]]));
    }

    #[test]
    fn opening_a_device_never_panics() {
        // On a machine without CUDA this is an error naming the library; with CUDA it opens.
        match CudaBackend::get(0) {
            Ok(b) => assert_eq!(b.ordinal(), 0),
            Err(e) => assert!(e.to_string().contains("cuda"), "{e}"),
        }
    }
}
