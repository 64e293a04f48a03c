//! CUDA glue for the softmax family: every op is one kernel with a block of threads per row.

use crate::kernels::KernelSource;
use crate::rows_and_len;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_rows_fitted, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("softmax");

/// Runs the row kernel `kernel` over the rows of `inputs[0]` (all inputs share its shape) and
/// returns its output, shaped like the inputs. The kernel takes the inputs, the output, the row
/// length and then `params`. Blocks are fitted to the row unless `TOKENFORMER_FUSED` turns
/// `softmax` off.
fn over_rows(
    name: &'static str,
    kernel: &str,
    inputs: &[&Tensor],
    params: &[Arg],
) -> Result<Tensor> {
    let first = inputs[0];
    let (rows, len) = rows_and_len(name, first)?;
    let backend = &CudaStorage::of(first, name)?.backend;
    let slices =
        inputs.iter().map(|t| Ok(&CudaStorage::of(t, name)?.slice)).collect::<Result<Vec<_>>>()?;
    let mut out = backend.alloc(first.numel())?;
    count_u32(name, first.numel())?;
    if rows > 0 && len > 0 {
        let mut scalars = vec![Arg::U32(count_u32(name, len)?)];
        scalars.extend_from_slice(params);
        // SAFETY: every kernel of kernels.cu takes (inputs..., out, len, params...) and block r
        // touches only row r, inside the rows·len values of each buffer.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                kernel,
                launch_rows_fitted(count_u32(name, rows)?, len, crate::fused::enabled("softmax")?),
                &slices,
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, first.dims()))
}

/// The kernels' `single_pass` flag: one read for the row's max and sum (see common.cuh), unless
/// `TOKENFORMER_FUSED` turns `softmax` off.
fn single_pass() -> Result<Arg> {
    Ok(Arg::I32(crate::fused::enabled("softmax")? as i32))
}

pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    over_rows("softmax", "softmax_rows", &[x], &[Arg::I32(0), single_pass()?])
}

pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    over_rows("log_softmax", "softmax_rows", &[x], &[Arg::I32(1), single_pass()?])
}

pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    over_rows("softmax_backward", "softmax_backward_rows", &[y, g], &[])
}

pub(crate) fn log_softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    over_rows("log_softmax_backward", "log_softmax_backward_rows", &[y, g], &[])
}

pub(crate) fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    over_rows(
        "causal_softmax",
        "causal_softmax_rows",
        &[scores],
        &[Arg::F32(scale), single_pass()?],
    )
}

pub(crate) fn causal_softmax_backward(p: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    over_rows(
        "causal_softmax_backward",
        "causal_softmax_backward_rows",
        &[p, g],
        &[Arg::F32(scale)],
    )
}
