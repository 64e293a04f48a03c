//! CUDA glue for the softmax family: every op is one kernel with a block of threads per row.

use crate::kernels::KernelSource;
use crate::rows_and_len;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_rows, Arg, CudaStorage};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("softmax");

/// Runs the row kernel `kernel` over the rows of `inputs[0]` (all inputs share its shape) and
/// returns its output, shaped like the inputs. The kernel takes the inputs, the output, the row
/// length and then `param`, when given.
fn over_rows(
    name: &'static str,
    kernel: &str,
    inputs: &[&Tensor],
    param: Option<Arg>,
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
        scalars.extend(param);
        // SAFETY: every kernel of kernels.cu takes (inputs..., out, len[, param]) and block r
        // touches only row r, inside the rows·len values of each buffer.
        unsafe {
            backend.launch(
                KERNELS.module,
                KERNELS.source,
                kernel,
                launch_rows(count_u32(name, rows)?),
                &slices,
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    Ok(cuda_tensor(out, first.dims()))
}

pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    over_rows("softmax", "softmax_rows", &[x], Some(Arg::I32(0)))
}

pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    over_rows("log_softmax", "softmax_rows", &[x], Some(Arg::I32(1)))
}

pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    over_rows("softmax_backward", "softmax_backward_rows", &[y, g], None)
}

pub(crate) fn log_softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    over_rows("log_softmax_backward", "log_softmax_backward_rows", &[y, g], None)
}

pub(crate) fn causal_softmax(scores: &Tensor, scale: f32) -> Result<Tensor> {
    over_rows("causal_softmax", "causal_softmax_rows", &[scores], Some(Arg::F32(scale)))
}

pub(crate) fn causal_softmax_backward(p: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    over_rows(
        "causal_softmax_backward",
        "causal_softmax_backward_rows",
        &[p, g],
        Some(Arg::F32(scale)),
    )
}
