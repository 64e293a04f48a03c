//! CUDA glue for the elementwise unary ops: one kernel for every forward map and one for every
//! backward, told apart by the op's code, which kernels.cu defines.

use super::Unary;
use crate::kernels::KernelSource;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("unary");

/// Each op's code, indexed by `Unary as usize`: the `#define OP_<NAME>` lines of kernels.cu,
/// read when the crate is compiled.
const CODES: [i32; Unary::ALL.len()] = {
    let mut codes = [0; Unary::ALL.len()];
    let mut i = 0;
    while i < codes.len() {
        assert!(Unary::ALL[i] as usize == i, "Unary::ALL lists the ops in declaration order");
        codes[i] = crate::kernels::op_code(KERNELS, Unary::ALL[i].names().0);
        i += 1;
    }
    codes
};

/// y = f(x) elementwise, with the op's parameters `p` and `q`.
pub(crate) fn forward(op: Unary, x: &Tensor, p: f32, q: f32) -> Result<Tensor> {
    let (name, code) = (op.names().0, CODES[op as usize]);
    let xs = CudaStorage::of(x, name)?;
    let mut out = xs.backend.alloc(x.numel())?;
    let n = count_u32(name, x.numel())?;
    if n > 0 {
        let scalars = [Arg::U32(n), Arg::I32(code), Arg::F32(p), Arg::F32(q)];
        // SAFETY: matches unary_forward(x, y, n, op, p, q); x and out hold n values.
        unsafe {
            xs.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "unary_forward",
                launch_1d(n),
                &[&xs.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, x.dims()))
}

/// ∂L/∂x = g·f′(v) elementwise, where v is x or y as the op needs.
pub(crate) fn backward(op: Unary, v: &Tensor, g: &Tensor, p: f32) -> Result<Tensor> {
    let (name, code) = (op.names().1, CODES[op as usize]);
    let (vs, gs) = (CudaStorage::of(v, name)?, CudaStorage::of(g, name)?);
    let mut out = vs.backend.alloc(v.numel())?;
    let n = count_u32(name, v.numel())?;
    if n > 0 {
        let scalars = [Arg::U32(n), Arg::I32(code), Arg::F32(p)];
        // SAFETY: matches unary_backward(v, g, gx, n, op, p); v, g and out hold n values.
        unsafe {
            vs.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "unary_backward",
                launch_1d(n),
                &[&vs.slice, &gs.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, v.dims()))
}
