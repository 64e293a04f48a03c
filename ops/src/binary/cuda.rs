//! CUDA glue for the broadcasting binary ops. Operands of the same shape take a flat kernel;
//! otherwise each operand's broadcast strides are passed to an index-walking kernel, after
//! merging the axes both walk contiguously. The backward passes are products and sums built
//! from the public ops, exactly as on the CPU.

use crate::reduce::sum_to_shape;
use crate::unary::neg;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, dims_arg, launch_1d, merge_axes, Arg, CudaStorage,
};
use tokenformer_core::{Result, Shape, Tensor};

const KERNELS: &str = include_str!("kernels.cu");

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
            "binary",
            KERNELS,
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

pub(crate) fn add_backward(
    a_dims: &[usize],
    b_dims: &[usize],
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    Ok((sum_to_shape(g, a_dims)?, sum_to_shape(g, b_dims)?))
}

pub(crate) fn sub_backward(
    a_dims: &[usize],
    b_dims: &[usize],
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    Ok((sum_to_shape(g, a_dims)?, neg(&sum_to_shape(g, b_dims)?)?))
}

pub(crate) fn mul_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let ga = sum_to_shape(&mul(g, b)?, a.dims())?;
    let gb = sum_to_shape(&mul(g, a)?, b.dims())?;
    Ok((ga, gb))
}

pub(crate) fn div_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    // −g·a/b² as −(g/b)·(a/b), the same grouping as the CPU reference.
    let g_over_b = div(g, b)?;
    let a_over_b = div(a, b)?;
    let gb = sum_to_shape(&neg(&mul(&g_over_b, &a_over_b)?)?, b.dims())?;
    let ga = sum_to_shape(&g_over_b, a.dims())?;
    Ok((ga, gb))
}
