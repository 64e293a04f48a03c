//! CUDA glue for the broadcasting binary ops. Operands of the same shape take a flat kernel;
//! otherwise each operand's broadcast strides are passed to an index-walking kernel, after
//! merging the axes both walk contiguously. The backward passes are products and sums built
//! from the public ops, exactly as on the CPU.

use super::Binary;
use crate::kernels::KernelSource;
use tokenformer_core::cuda::{
    count_u32, cuda_tensor, dims_arg, launch_1d, merge_axes, Arg, CudaStorage,
};
use tokenformer_core::{Result, Shape, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("binary");

/// Each op's code, indexed by `Binary as usize`: the `#define OP_<NAME>` lines of kernels.cu,
/// read when the crate is compiled.
const CODES: [i32; Binary::ALL.len()] = {
    let mut codes = [0; Binary::ALL.len()];
    let mut i = 0;
    while i < codes.len() {
        assert!(Binary::ALL[i] as usize == i, "Binary::ALL lists the ops in declaration order");
        codes[i] = crate::kernels::op_code(KERNELS, Binary::ALL[i].name());
        i += 1;
    }
    codes
};

/// a ∘ b over the broadcast shape.
pub(crate) fn forward(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (name, code) = (op.name(), CODES[op as usize]);
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
