//! CUDA glue for the broadcasting binary ops. Operands of the same shape take a flat kernel;
//! otherwise each operand's broadcast strides are passed to an index-walking kernel, after
//! merging the axes both walk contiguously. The backward passes are products and sums built
//! from the public ops, exactly as on the CPU.

use crate::kernels::KernelSource;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, dims_arg, launch_1d, merge_axes, Arg, CudaStorage,
};
use tokenformer_core::{Result, Shape, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("binary");

const OP_ADD: i32 = 0;
const OP_SUB: i32 = 1;
const OP_MUL: i32 = 2;
const OP_DIV: i32 = 3;

fn zip_broadcast(name: &'static str, code: i32, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (sa, sb) = (CudaStorage::of(a, name)?, CudaStorage::of(b, name)?);
    let out_shape = Shape::broadcast(name, a.shape(), b.shape())?;
    let mut out = sa.backend.alloc(out_shape.numel())?;
    let n = count_u32(name, out_shape.numel())?;
    if n == 0 {
        return Ok(cuda_tensor(out, out_shape.dims()));
    }
    let strides =
        [a.shape().broadcast_strides(&out_shape), b.shape().broadcast_strides(&out_shape)];
    let (dims, strides) = merge_axes(out_shape.dims(), &strides);
    let (kernel, scalars) = if dims.len() == 1 && strides[0][0] == 1 && strides[1][0] == 1 {
        ("binary_same", vec![Arg::U32(n), Arg::I32(code)])
    } else {
        let scalars = vec![
            Arg::U32(n),
            Arg::I32(code),
            Arg::I32(dims.len() as i32),
            Arg::Dims(dims_arg(name, &dims)?),
            Arg::Dims(dims_arg(name, &strides[0])?),
            Arg::Dims(dims_arg(name, &strides[1])?),
        ];
        ("binary_broadcast", scalars)
    };
    // SAFETY: matches binary_same(a, b, out, n, op) or binary_broadcast(a, b, out, n, op,
    // rank, dims, a_strides, b_strides); every coordinate is below its axis size (or the
    // stride is 0), so the strided reads stay inside a and b.
    unsafe {
        sa.backend.launch(
            KERNELS.module,
            KERNELS.source,
            kernel,
            launch_1d(n),
            &[&sa.slice, &sb.slice],
            &mut [&mut out.slice],
            &scalars,
        )
    }?;
    Ok(cuda_tensor(out, out_shape.dims()))
}

pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_broadcast("add", OP_ADD, a, b)
}

pub(crate) fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_broadcast("sub", OP_SUB, a, b)
}

pub(crate) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_broadcast("mul", OP_MUL, a, b)
}

pub(crate) fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_broadcast("div", OP_DIV, a, b)
}
