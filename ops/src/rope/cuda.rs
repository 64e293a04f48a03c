//! CUDA glue for the rotary embedding: one elementwise kernel, run with direction +1 for the
//! forward rotation and −1 for its transpose. (The tables are built on the host by
//! `rope_tables` and moved to the device by the caller.)

use crate::kernels::KernelSource;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("rope");

fn rotate(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    direction: f32,
) -> Result<Tensor> {
    let xs = CudaStorage::of(x, op)?;
    let (cs, ss) = (CudaStorage::of(cos, op)?, CudaStorage::of(sin, op)?);
    let (t, d) = (x.dims()[x.rank() - 2], x.dims()[x.rank() - 1]);
    let half = cos.dims()[1];
    if half == 0 {
        return Ok(x.clone());
    }
    let n = count_u32(op, x.numel())?;
    let mut out = xs.backend.alloc(x.numel())?;
    if n > 0 {
        let scalars = [
            Arg::U32(n),
            Arg::U32(count_u32(op, t)?),
            Arg::U32(count_u32(op, d)?),
            Arg::U32(count_u32(op, half)?),
            Arg::F32(direction),
        ];
        // SAFETY: matches rope_rotate(x, cos, sin, out, n, T, d, half, direction); positions
        // are below T ≤ seq and pairs below half, inside the [seq, half] tables.
        unsafe {
            xs.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "rope_rotate",
                launch_1d(n),
                &[&xs.slice, &cs.slice, &ss.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, x.dims()))
}

pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope", x, cos, sin, 1.0)
}

pub(crate) fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope_backward", g, cos, sin, -1.0)
}
