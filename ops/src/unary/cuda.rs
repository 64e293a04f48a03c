//! CUDA glue for the elementwise unary ops: one kernel for every forward map and one for every
//! backward, told apart by an op code (the codes match the `#define`s of kernels.cu).

use crate::kernels::KernelSource;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("unary");

const OP_NEG: i32 = 0;
const OP_EXP: i32 = 1;
const OP_LOG: i32 = 2;
const OP_SQRT: i32 = 3;
const OP_SQUARE: i32 = 4;
const OP_GELU: i32 = 5;
const OP_POWF: i32 = 6;
const OP_AFFINE: i32 = 7;
const OP_RELU: i32 = 8;
const OP_TANH: i32 = 9;
const OP_SIGMOID: i32 = 10;

/// y = f(x) elementwise, with the op's parameters `p` and `q`.
fn forward(name: &'static str, code: i32, x: &Tensor, p: f32, q: f32) -> Result<Tensor> {
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
fn backward(name: &'static str, code: i32, v: &Tensor, g: &Tensor, p: f32) -> Result<Tensor> {
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

pub(crate) fn neg(x: &Tensor) -> Result<Tensor> {
    forward("neg", OP_NEG, x, 0.0, 0.0)
}

pub(crate) fn exp(x: &Tensor) -> Result<Tensor> {
    forward("exp", OP_EXP, x, 0.0, 0.0)
}

pub(crate) fn log(x: &Tensor) -> Result<Tensor> {
    forward("log", OP_LOG, x, 0.0, 0.0)
}

pub(crate) fn sqrt(x: &Tensor) -> Result<Tensor> {
    forward("sqrt", OP_SQRT, x, 0.0, 0.0)
}

pub(crate) fn square(x: &Tensor) -> Result<Tensor> {
    forward("square", OP_SQUARE, x, 0.0, 0.0)
}

pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    forward("gelu", OP_GELU, x, 0.0, 0.0)
}

pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    forward("relu", OP_RELU, x, 0.0, 0.0)
}

pub(crate) fn tanh(x: &Tensor) -> Result<Tensor> {
    forward("tanh", OP_TANH, x, 0.0, 0.0)
}

pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    forward("sigmoid", OP_SIGMOID, x, 0.0, 0.0)
}

pub(crate) fn powf(x: &Tensor, p: f32) -> Result<Tensor> {
    forward("powf", OP_POWF, x, p, 0.0)
}

pub(crate) fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    forward("affine", OP_AFFINE, x, mul, add)
}

pub(crate) fn exp_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("exp_backward", OP_EXP, y, g, 0.0)
}

pub(crate) fn log_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("log_backward", OP_LOG, x, g, 0.0)
}

pub(crate) fn sqrt_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("sqrt_backward", OP_SQRT, y, g, 0.0)
}

pub(crate) fn square_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("square_backward", OP_SQUARE, x, g, 0.0)
}

pub(crate) fn powf_backward(x: &Tensor, p: f32, g: &Tensor) -> Result<Tensor> {
    backward("powf_backward", OP_POWF, x, g, p)
}

pub(crate) fn gelu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("gelu_backward", OP_GELU, x, g, 0.0)
}

pub(crate) fn relu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("relu_backward", OP_RELU, x, g, 0.0)
}

pub(crate) fn tanh_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("tanh_backward", OP_TANH, y, g, 0.0)
}

pub(crate) fn sigmoid_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    backward("sigmoid_backward", OP_SIGMOID, y, g, 0.0)
}
