//! CUDA glue for AdamW (one fused elementwise kernel) and the sum of squares (a square, then
//! the fixed-order sum of the reduce family).

use super::{AdamW, StepScalars};
use crate::kernels::KernelSource;
use crate::reduce::sum_all;
use crate::unary::square;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage};
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
