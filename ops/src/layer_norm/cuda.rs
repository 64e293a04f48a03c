//! CUDA glue for layer norm: a row kernel for the forward pass, one for the input gradient,
//! and one two-level pass for the weight and bias gradients together (with
//! `TOKENFORMER_FUSED=layer_norm:0`: blocks of `BLOCK` threads, a per-feature kernel for the
//! weight gradient and a column sum for the bias gradient).

use super::LayerNormStats;
use crate::kernels::KernelSource;
use crate::layout::narrow;
use crate::reduce::{sum, sum_to_shape};
use crate::rows_and_len;
use cudarc::driver::LaunchConfig;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, launch_1d, launch_rows_fitted, Arg, CudaStorage,
};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("layer_norm");

/// The buffer of an optional parameter, or `fallback` (never read) when it is absent.
fn optional<'t>(
    op: &'static str,
    p: Option<&'t Tensor>,
    fallback: &'t CudaStorage,
) -> Result<&'t CudaStorage> {
    p.map_or(Ok(fallback), |p| CudaStorage::of(p, op))
}

pub(crate) fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<(Tensor, LayerNormStats)> {
    let op = "layer_norm";
    let xs = CudaStorage::of(x, op)?;
    let (ws, bs) = (optional(op, weight, xs)?, optional(op, bias, xs)?);
    let (rows, d) = rows_and_len(op, x)?;
    count_u32(op, x.numel())?;
    let backend = &xs.backend;
    let (mut y, mut mean, mut rstd) =
        (backend.alloc(x.numel())?, backend.alloc(rows)?, backend.alloc(rows)?);
    if rows > 0 {
        let scalars = [
            Arg::U32(count_u32(op, d)?),
            Arg::F32(eps),
            Arg::I32(weight.is_some() as i32),
            Arg::I32(bias.is_some() as i32),
        ];
        // SAFETY: matches layer_norm_forward(x, w, b, y, mean, rstd, d, eps, has_w, has_b);
        // block r touches row r of x and y and entry r of mean and rstd; w and b hold d values
        // when present.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                "layer_norm_forward",
                launch_rows_fitted(count_u32(op, rows)?, d, crate::fused::enabled("layer_norm")?),
                &[&xs.slice, &ws.slice, &bs.slice],
                &mut [&mut y.slice, &mut mean.slice, &mut rstd.slice],
                &scalars,
            )
        }?;
    }
    let leading = &x.dims()[..x.rank() - 1];
    let stats =
        LayerNormStats { mean: cuda_tensor(mean, leading), rstd: cuda_tensor(rstd, leading) };
    Ok((cuda_tensor(y, x.dims()), stats))
}

pub(crate) fn layer_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    has_bias: bool,
    stats: &LayerNormStats,
    g: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let op = "layer_norm_backward";
    let xs = CudaStorage::of(x, op)?;
    let ws = optional(op, weight, xs)?;
    let (ms, rs) = (CudaStorage::of(&stats.mean, op)?, CudaStorage::of(&stats.rstd, op)?);
    let gs = CudaStorage::of(g, op)?;
    let (rows, d) = rows_and_len(op, x)?;
    count_u32(op, x.numel())?;
    let backend = &xs.backend;
    let (rows32, d32) = (count_u32(op, rows)?, count_u32(op, d)?);
    let fast = crate::fused::enabled("layer_norm")?;

    let mut gx = backend.alloc(x.numel())?;
    if rows > 0 {
        let scalars = [Arg::U32(d32), Arg::I32(weight.is_some() as i32)];
        // SAFETY: matches layer_norm_backward_input(x, w, mean, rstd, g, gx, d, has_w); block r
        // touches row r of x, g and gx and entry r of the stats.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                "layer_norm_backward_input",
                launch_rows_fitted(rows32, d, fast),
                &[&xs.slice, &ws.slice, &ms.slice, &rs.slice, &gs.slice],
                &mut [&mut gx.slice],
                &scalars,
            )
        }?;
    }

    let has_weight = weight.is_some();
    let (gweight, gbias) = if !has_weight && !has_bias {
        (None, None)
    } else if !fast || rows > MAX_GRID_Y * CHUNK_ROWS {
        let gweight = match weight {
            None => None,
            Some(_) => {
                let mut gw = backend.alloc(d)?;
                // SAFETY: matches layer_norm_weight_grad(x, mean, rstd, g, gw, rows, d); thread
                // j reads column j of every row and writes gw[j].
                unsafe {
                    backend.launch(
                        KERNELS.module,
                        KERNELS.source,
                        "layer_norm_weight_grad",
                        launch_1d(d32),
                        &[&xs.slice, &ms.slice, &rs.slice, &gs.slice],
                        &mut [&mut gw.slice],
                        &[Arg::U32(rows32), Arg::U32(d32)],
                    )
                }?;
                Some(cuda_tensor(gw, &[d]))
            }
        };
        (gweight, has_bias.then(|| sum_to_shape(g, &[d])).transpose()?)
    } else {
        param_grads(x, stats, g, has_weight, has_bias)?
    };
    Ok((cuda_tensor(gx, x.dims()), gweight, gbias))
}

/// Rows per chunk of `layer_norm_param_grad_chunks`, its block shape (LN_TILE features ×
/// LN_ROW_THREADS rows, as in kernels.cu) and the grid's y limit.
const CHUNK_ROWS: usize = 64;
const TILE: u32 = 32;
const ROW_THREADS: u32 = 8;
const MAX_GRID_Y: usize = 65_535;

/// (gweight, gbias), each when wanted, by the fused two-level kernel: per-chunk partial sums of
/// both, then the chunks of each summed by the reduce family's column sum.
fn param_grads(
    x: &Tensor,
    stats: &LayerNormStats,
    g: &Tensor,
    has_weight: bool,
    has_bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let op = "layer_norm_backward";
    let xs = CudaStorage::of(x, op)?;
    let (ms, rs) = (CudaStorage::of(&stats.mean, op)?, CudaStorage::of(&stats.rstd, op)?);
    let gs = CudaStorage::of(g, op)?;
    let (rows, d) = rows_and_len(op, x)?;
    let slots = has_weight as usize + has_bias as usize;
    let chunks = rows.div_ceil(CHUNK_ROWS).max(1);
    // Every value is written when there are rows; with none, the sums are zeros.
    let len = slots * chunks * d;
    let mut partial = if rows > 0 { xs.backend.alloc(len)? } else { xs.backend.zeros(len)? };
    if rows > 0 {
        let cfg = LaunchConfig {
            grid_dim: (count_u32(op, d)?.div_ceil(TILE), count_u32(op, chunks)?, 1),
            block_dim: (TILE, ROW_THREADS, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [
            Arg::U32(count_u32(op, rows)?),
            Arg::U32(count_u32(op, d)?),
            Arg::U32(count_u32(op, CHUNK_ROWS)?),
            Arg::I32(has_weight as i32),
            Arg::I32(has_bias as i32),
        ];
        // SAFETY: matches layer_norm_param_grad_chunks(x, mean, rstd, g, partial, rows, d,
        // chunk_rows, has_w, has_b); block (t, c) reads rows of chunk c below `rows` and
        // features below d, and writes partial[(slot·chunks + c)·d + j] for slot < slots.
        unsafe {
            xs.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "layer_norm_param_grad_chunks",
                cfg,
                &[&xs.slice, &ms.slice, &rs.slice, &gs.slice],
                &mut [&mut partial.slice],
                &scalars,
            )
        }?;
    }
    let sums = sum(&cuda_tensor(partial, &[slots, chunks, d]), &[1], false)?;
    let gweight = has_weight.then(|| narrow(&sums, 0, 0, 1)?.reshape(&[d])).transpose()?;
    let gbias = has_bias.then(|| narrow(&sums, 0, slots - 1, 1)?.reshape(&[d])).transpose()?;
    Ok((gweight, gbias))
}
