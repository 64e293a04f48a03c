//! CUDA glue for the fused cross-entropy: a row kernel gives lse and the per-row losses, whose
//! mean is a fixed-order sum; the backward pass is one elementwise kernel.

use crate::kernels::KernelSource;
use crate::reduce::sum_all;
use crate::unary::affine;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, launch_1d, launch_rows_fitted, Arg, CudaStorage,
};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("cross_entropy");

pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    let (xs, ts) = (CudaStorage::of(logits, op)?, CudaStorage::of(targets, op)?);
    let (n, v) = (logits.dims()[0], logits.dims()[1]);
    count_u32(op, logits.numel())?;
    let (mut lse, mut row_loss) = (xs.backend.alloc(n)?, xs.backend.alloc(n)?);
    let fast = crate::fused::enabled("cross_entropy")?;
    // SAFETY: matches cross_entropy_rows(logits, targets, lse, loss, V, single_pass); block i
    // reads row i and target i and writes entry i of lse and loss.
    unsafe {
        xs.backend.launch(
            KERNELS.module,
            KERNELS.source,
            "cross_entropy_rows",
            launch_rows_fitted(count_u32(op, n)?, v, fast),
            &[&xs.slice, &ts.slice],
            &mut [&mut lse.slice, &mut row_loss.slice],
            &[Arg::U32(count_u32(op, v)?), Arg::I32(fast as i32)],
        )
    }?;
    let loss = affine(&sum_all(&cuda_tensor(row_loss, &[n]))?, 1.0 / n as f32, 0.0)?;
    Ok((loss, cuda_tensor(lse, &[n])))
}

pub(crate) fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let xs = CudaStorage::of(logits, op)?;
    let (ts, ls, gs) =
        (CudaStorage::of(targets, op)?, CudaStorage::of(lse, op)?, CudaStorage::of(g, op)?);
    let (rows, v) = (logits.dims()[0], logits.dims()[1]);
    let n = count_u32(op, logits.numel())?;
    let mut grad = xs.backend.alloc(logits.numel())?;
    let scalars = [Arg::U32(n), Arg::U32(count_u32(op, v)?), Arg::U32(count_u32(op, rows)?)];
    // SAFETY: matches cross_entropy_backward(logits, targets, lse, g, grad, n, V, rows);
    // thread i touches logit i, its row's target and lse, and g[0].
    unsafe {
        xs.backend.launch(
            KERNELS.module,
            KERNELS.source,
            "cross_entropy_backward",
            launch_1d(n),
            &[&xs.slice, &ts.slice, &ls.slice, &gs.slice],
            &mut [&mut grad.slice],
            &scalars,
        )
    }?;
    Ok(cuda_tensor(grad, logits.dims()))
}
