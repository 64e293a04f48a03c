//! CUDA glue for AdamW (one fused elementwise kernel) and the sum of squares (a square, then
//! the fixed-order sum of the reduce family), and for their multi-tensor versions: the tensors'
//! device pointers go to the kernels in a struct passed by value, up to MULTI_MAX a launch (see
//! kernels.cu).

use super::{AdamW, StepScalars};
use crate::kernels::KernelSource;
use crate::reduce::sum_all;
use crate::unary::square;
use cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use tokenformer_core::cuda::{
    count_u32, cuda_err, cuda_tensor, launch_1d, Arg, CudaBackend, CudaStorage, BLOCK,
};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("adamw");

pub(crate) fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "adamw_step";
    let (ps, gs) = (CudaStorage::of(param, op)?, CudaStorage::of(grad, op)?);
    let (ms, vs) = (CudaStorage::of(m, op)?, CudaStorage::of(v, op)?);
    let StepScalars { step_size, inv_sqrt_bc2, decay } = hp.step_scalars(step);

    let backend = &ps.backend;
    let len = param.numel();
    let (mut p_new, mut m_new, mut v_new) =
        (backend.alloc(len)?, backend.alloc(len)?, backend.alloc(len)?);
    let n = count_u32(op, len)?;
    if n > 0 {
        let scalars = [
            Arg::U32(n),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(decay),
            Arg::F32(step_size),
            Arg::F32(inv_sqrt_bc2),
        ];
        // SAFETY: matches adamw_step(p, g, m, v, p_out, m_out, v_out, n, beta1, beta2, eps,
        // decay, step_size, inv_sqrt_bc2); all seven buffers hold n values.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                "adamw_step",
                launch_1d(n),
                &[&ps.slice, &gs.slice, &ms.slice, &vs.slice],
                &mut [&mut p_new.slice, &mut m_new.slice, &mut v_new.slice],
                &scalars,
            )
        }?;
    }
    let dims = param.dims();
    Ok((cuda_tensor(p_new, dims), cuda_tensor(m_new, dims), cuda_tensor(v_new, dims)))
}

pub(crate) fn sum_squares(x: &Tensor) -> Result<Tensor> {
    sum_all(&square(x)?)
}

/// Tensors per multi-tensor launch, and values per chunk (MULTI_MAX and MULTI_CHUNK of
/// kernels.cu).
const MULTI_MAX: usize = 32;
const MULTI_CHUNK: usize = 4096;

/// kernels.cu's `SquaresList`, field for field (pointers as 64-bit addresses).
#[repr(C)]
#[derive(Clone, Copy)]
struct SquaresList {
    x: [u64; MULTI_MAX],
    len: [u32; MULTI_MAX],
    chunk_start: [u32; MULTI_MAX + 1],
    count: u32,
}

// SAFETY: plain old data laid out as the C struct the kernel takes.
unsafe impl DeviceRepr for SquaresList {}

/// kernels.cu's `AdamWList`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWList {
    p: [u64; MULTI_MAX],
    g: [u64; MULTI_MAX],
    m: [u64; MULTI_MAX],
    v: [u64; MULTI_MAX],
    p_out: [u64; MULTI_MAX],
    m_out: [u64; MULTI_MAX],
    v_out: [u64; MULTI_MAX],
    decay: [f32; MULTI_MAX],
    len: [u32; MULTI_MAX],
    chunk_start: [u32; MULTI_MAX + 1],
    count: u32,
}

// SAFETY: plain old data laid out as the C struct the kernel takes.
unsafe impl DeviceRepr for AdamWList {}

/// The device address of a buffer.
fn address(backend: &CudaBackend, s: &CudaStorage) -> u64 {
    s.slice.device_ptr(backend.stream()).0
}

/// (first chunk of each tensor, then the total) for tensors of these lengths.
fn chunk_starts(op: &str, lens: &[usize]) -> Result<[u32; MULTI_MAX + 1]> {
    let mut starts = [0u32; MULTI_MAX + 1];
    let mut total = 0usize;
    for (i, &len) in lens.iter().enumerate() {
        count_u32(op, len)?;
        total += len.div_ceil(MULTI_CHUNK);
        starts[i + 1] = count_u32(op, total)?;
    }
    for i in lens.len() + 1..=MULTI_MAX {
        starts[i] = starts[lens.len()];
    }
    Ok(starts)
}

/// One block of BLOCK threads per chunk.
fn chunk_launch(chunks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (chunks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn sum_squares_many(xs: &[Tensor]) -> Result<Tensor> {
    let op = "sum_squares_many";
    let backend = CudaStorage::of(&xs[0], op)?.backend.clone();
    let nonempty: Vec<&CudaStorage> = xs
        .iter()
        .filter(|t| t.numel() > 0)
        .map(|t| CudaStorage::of(t, op))
        .collect::<Result<_>>()?;
    let total: usize = nonempty.iter().map(|s| s.len().div_ceil(MULTI_CHUNK)).sum();
    if total == 0 {
        return Ok(cuda_tensor(backend.zeros(1)?, &[]));
    }
    let partial = backend.alloc(total)?;
    let base = partial.slice.device_ptr(backend.stream()).0;
    let f = backend.function(KERNELS.module, KERNELS.source, "sum_squares_chunks")?;
    let mut offset = 0u64;
    for group in nonempty.chunks(MULTI_MAX) {
        let lens: Vec<usize> = group.iter().map(|s| s.len()).collect();
        let chunk_start = chunk_starts(op, &lens)?;
        let mut list =
            SquaresList { x: [0; MULTI_MAX], len: [0; MULTI_MAX], chunk_start, count: 0 };
        for (i, s) in group.iter().enumerate() {
            list.x[i] = address(&backend, s);
            list.len[i] = count_u32(op, s.len())?;
        }
        list.count = group.len() as u32;
        let chunks = chunk_start[group.len()];
        let out = base + offset * std::mem::size_of::<f32>() as u64;
        let mut launch = backend.stream().launch_builder(&f);
        launch.arg(&list).arg(&out);
        // SAFETY: matches sum_squares_chunks(SquaresList, float* partial): every tensor of the
        // list is alive for the call, block b reads chunk b of its tensor inside its length,
        // and writes partial[offset + b], inside the `total` values allocated.
        unsafe { launch.launch(chunk_launch(chunks)) }
            .map_err(|e| cuda_err("kernel adamw::sum_squares_chunks", e))?;
        backend.check_after_launch("kernel adamw::sum_squares_chunks")?;
        offset += chunks as u64;
    }
    sum_all(&cuda_tensor(partial, &[total]))
}

pub(crate) fn clip_factor(sum_of_squares: &Tensor, max_norm: f32) -> Result<(Tensor, Tensor)> {
    let op = "clip_factor";
    let s = CudaStorage::of(sum_of_squares, op)?;
    let (mut norm, mut factor) = (s.backend.alloc(1)?, s.backend.alloc(1)?);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches clip_factor(sum_of_squares, norm_out, factor_out, max_norm); one thread
    // reads one value and writes one of each output.
    unsafe {
        s.backend.launch(
            KERNELS.module,
            KERNELS.source,
            "clip_factor",
            one,
            &[&s.slice],
            &mut [&mut norm.slice, &mut factor.slice],
            &[Arg::F32(max_norm)],
        )
    }?;
    Ok((cuda_tensor(norm, &[1]), cuda_tensor(factor, &[1])))
}

/// The buffer a tensor's update is written to: its own when nothing else holds it (None), or a
/// new one.
fn output_for(
    backend: &std::sync::Arc<CudaBackend>,
    t: &mut Tensor,
) -> Result<Option<CudaStorage>> {
    if t.cuda_storage_mut().is_some() {
        Ok(None)
    } else {
        Ok(Some(backend.alloc(t.numel())?))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_step_many(
    params: &mut [Tensor],
    grads: &[Tensor],
    m: &mut [Tensor],
    v: &mut [Tensor],
    weight_decays: &[f32],
    hp: &AdamW,
    step: u64,
    grad_scale: Option<&Tensor>,
) -> Result<()> {
    let op = "adamw_step_many";
    let Some(first) = grads.first() else { return Ok(()) };
    let backend = CudaStorage::of(first, op)?.backend.clone();
    let StepScalars { step_size, inv_sqrt_bc2, .. } = hp.step_scalars(step);
    let f = backend.function(KERNELS.module, KERNELS.source, "adamw_step_chunks")?;
    let scale_address = match grad_scale {
        Some(t) => address(&backend, CudaStorage::of(t, op)?),
        // Not read when has_scale is 0; any valid address will do.
        None => address(&backend, CudaStorage::of(first, op)?),
    };
    let has_scale = grad_scale.is_some() as i32;
    let order: Vec<usize> = (0..params.len()).filter(|&i| params[i].numel() > 0).collect();
    for group in order.chunks(MULTI_MAX) {
        // Where each tensor's update goes: in place, or a new buffer swapped in afterwards.
        let mut fresh: Vec<[Option<CudaStorage>; 3]> = Vec::with_capacity(group.len());
        for &i in group {
            fresh.push([
                output_for(&backend, &mut params[i])?,
                output_for(&backend, &mut m[i])?,
                output_for(&backend, &mut v[i])?,
            ]);
        }
        let lens: Vec<usize> = group.iter().map(|&i| params[i].numel()).collect();
        let chunk_start = chunk_starts(op, &lens)?;
        let mut list = AdamWList {
            p: [0; MULTI_MAX],
            g: [0; MULTI_MAX],
            m: [0; MULTI_MAX],
            v: [0; MULTI_MAX],
            p_out: [0; MULTI_MAX],
            m_out: [0; MULTI_MAX],
            v_out: [0; MULTI_MAX],
            decay: [0.0; MULTI_MAX],
            len: [0; MULTI_MAX],
            chunk_start,
            count: group.len() as u32,
        };
        for (k, &i) in group.iter().enumerate() {
            let inputs = [&params[i], &m[i], &v[i]];
            let addresses = inputs
                .iter()
                .map(|t| Ok(address(&backend, CudaStorage::of(t, op)?)))
                .collect::<Result<Vec<u64>>>()?;
            let out =
                |j: usize| fresh[k][j].as_ref().map_or(addresses[j], |s| address(&backend, s));
            (list.p[k], list.m[k], list.v[k]) = (addresses[0], addresses[1], addresses[2]);
            (list.p_out[k], list.m_out[k], list.v_out[k]) = (out(0), out(1), out(2));
            list.g[k] = address(&backend, CudaStorage::of(&grads[i], op)?);
            list.decay[k] =
                AdamW { weight_decay: weight_decays[i], ..*hp }.step_scalars(step).decay;
            list.len[k] = count_u32(op, lens[k])?;
        }
        let scalars = (has_scale, hp.beta1, hp.beta2, hp.eps, step_size, inv_sqrt_bc2);
        let mut launch = backend.stream().launch_builder(&f);
        launch
            .arg(&list)
            .arg(&scale_address)
            .arg(&scalars.0)
            .arg(&scalars.1)
            .arg(&scalars.2)
            .arg(&scalars.3)
            .arg(&scalars.4)
            .arg(&scalars.5);
        // SAFETY: matches adamw_step_chunks(AdamWList, grad_scale, has_scale, beta1, beta2,
        // eps, step_size, inv_sqrt_bc2); every buffer of the list is alive and holds `len`
        // values; an output is its input's buffer only when the tensor is held by nobody else.
        unsafe { launch.launch(chunk_launch(chunk_start[group.len()])) }
            .map_err(|e| cuda_err("kernel adamw::adamw_step_chunks", e))?;
        backend.check_after_launch("kernel adamw::adamw_step_chunks")?;
        for (k, &i) in group.iter().enumerate() {
            let [p_new, m_new, v_new] = std::mem::take(&mut fresh[k]);
            let dims = params[i].dims().to_vec();
            if let Some(s) = p_new {
                params[i] = cuda_tensor(s, &dims);
            }
            if let Some(s) = m_new {
                m[i] = cuda_tensor(s, &dims);
            }
            if let Some(s) = v_new {
                v[i] = cuda_tensor(s, &dims);
            }
        }
    }
    Ok(())
}
