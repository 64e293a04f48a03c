//! CUDA glue for Θ: one fused kernel per direction, a block of threads per row of scores.

use super::Theta;
use crate::kernels::KernelSource;
use crate::rows_and_len;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_rows, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("pattention_norm");

/// The kernel's code for each variant (the `THETA_*` defines of kernels.cu).
fn theta_code(theta: Theta) -> i32 {
    match theta {
        Theta::L2NormGelu => 0,
        Theta::GeluL2Norm => 1,
        Theta::Softmax => 2,
    }
}

/// Runs `kernel` over the rows of `a` (with `g`, for the backward pass); the output has a's
/// shape.
fn over_rows(
    op: &'static str,
    kernel: &str,
    a: &Tensor,
    g: Option<&Tensor>,
    theta: Theta,
    tau: f32,
) -> Result<Tensor> {
    let a_s = CudaStorage::of(a, op)?;
    let mut inputs = vec![&a_s.slice];
    if let Some(g) = g {
        inputs.push(&CudaStorage::of(g, op)?.slice);
    }
    let (rows, n) = rows_and_len(op, a)?;
    count_u32(op, a.numel())?;
    let mut out = a_s.backend.alloc(a.numel())?;
    if rows > 0 && n > 0 {
        let scalars = [Arg::U32(count_u32(op, n)?), Arg::I32(theta_code(theta)), Arg::F32(tau)];
        // SAFETY: matches pattention_norm_forward(a, s, n, theta, tau) and
        // pattention_norm_backward(a, g, ga, n, theta, tau); block r touches row r only.
        unsafe {
            a_s.backend.launch(
                KERNELS.module,
                KERNELS.source,
                kernel,
                launch_rows(count_u32(op, rows)?),
                &inputs,
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, a.dims()))
}

pub(crate) fn pattention_norm(a: &Tensor, theta: Theta, tau: f32) -> Result<Tensor> {
    over_rows("pattention_norm", "pattention_norm_forward", a, None, theta, tau)
}

pub(crate) fn pattention_norm_backward(
    a: &Tensor,
    theta: Theta,
    tau: f32,
    g: &Tensor,
) -> Result<Tensor> {
    over_rows("pattention_norm_backward", "pattention_norm_backward", a, Some(g), theta, tau)
}
