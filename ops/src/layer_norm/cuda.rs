//! CUDA glue for layer norm: a row kernel for the forward pass, one for the input gradient,
//! and a per-feature kernel for the weight gradient. The bias gradient is a plain column sum.

use super::LayerNormStats;
use crate::kernels::KernelSource;
use crate::reduce::sum_to_shape;
use crate::rows_and_len;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, launch_rows, Arg, CudaStorage};
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
                launch_rows(count_u32(op, rows)?),
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
                launch_rows(rows32),
                &[&xs.slice, &ws.slice, &ms.slice, &rs.slice, &gs.slice],
                &mut [&mut gx.slice],
                &scalars,
            )
        }?;
    }

    let gweight = match weight {
        None => None,
        Some(_) => {
            let mut gw = backend.alloc(d)?;
            // SAFETY: matches layer_norm_weight_grad(x, mean, rstd, g, gw, rows, d); thread j
            // reads column j of every row and writes gw[j].
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
    let gbias = sum_to_shape(g, &[d])?;
    Ok((cuda_tensor(gx, x.dims()), gweight, Some(gbias)))
}
