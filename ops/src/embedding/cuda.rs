//! CUDA glue for the embedding: a gather forward, and a scatter-add backward made
//! deterministic without atomics by giving every output value one owner thread (see
//! kernels.cu). Both run entirely on the device: the ids are never copied to the host.

use crate::kernels::KernelSource;
use cudarc::driver::LaunchConfig;
use tokenformer_core::cuda::{count_u32, cuda_tensor, launch_1d, Arg, CudaStorage, BLOCK};
use tokenformer_core::{Result, Tensor};

const KERNELS: &KernelSource = crate::kernels::source("embedding");

pub(crate) fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let op = "embedding";
    let (ws, is) = (CudaStorage::of(weight, op)?, CudaStorage::of(ids, op)?);
    let (vocab, d) = (weight.dims()[0], weight.dims()[1]);
    let numel = ids.numel() * d;
    let mut out = ws.backend.alloc(numel)?;
    let n = count_u32(op, numel)?;
    count_u32(op, weight.numel())?;
    if n > 0 {
        let scalars = [Arg::U32(n), Arg::U32(count_u32(op, d)?), Arg::U32(count_u32(op, vocab)?)];
        // SAFETY: matches embedding_forward(weight, ids, out, n, d, vocab); the kernel reads
        // the table only for ids in [0, vocab) and writes NaN for any other.
        unsafe {
            ws.backend.launch(
                KERNELS.module,
                KERNELS.source,
                "embedding_forward",
                launch_1d(n),
                &[&ws.slice, &is.slice],
                &mut [&mut out.slice],
                &scalars,
            )
        }?;
    }
    let mut dims = ids.dims().to_vec();
    dims.push(d);
    Ok(cuda_tensor(out, &dims))
}

/// Table rows per block of the scatter-add: every block reads all the ids, so fewer rows per
/// block means more blocks at work and more id traffic. 256 rows keeps a GPT-2 vocabulary at a
/// few hundred blocks per column strip (see kernels.cu).
const ROWS_PER_BLOCK: u32 = 256;

pub(crate) fn embedding_backward(ids: &Tensor, g: &Tensor, vocab: usize) -> Result<Tensor> {
    let op = "embedding_backward";
    let (is, gs) = (CudaStorage::of(ids, op)?, CudaStorage::of(g, op)?);
    let backend = &gs.backend;
    let d = g.dims()[g.rank() - 1];
    // Zeros: rows that no position names keep a zero gradient.
    let mut table_grad = backend.zeros(vocab * d)?;
    count_u32(op, vocab * d)?;
    count_u32(op, g.numel())?;
    if d == 0 || vocab == 0 || ids.numel() == 0 {
        return Ok(cuda_tensor(table_grad, &[vocab, d]));
    }
    let vocab32 = count_u32(op, vocab)?;
    let cfg = LaunchConfig {
        grid_dim: (count_u32(op, d)?.div_ceil(BLOCK), vocab32.div_ceil(ROWS_PER_BLOCK), 1),
        block_dim: (BLOCK, 1, 1),
        // One staged row id per thread.
        shared_mem_bytes: BLOCK * std::mem::size_of::<u32>() as u32,
    };
    let scalars = [
        Arg::U32(count_u32(op, ids.numel())?),
        Arg::U32(count_u32(op, d)?),
        Arg::U32(vocab32),
        Arg::U32(ROWS_PER_BLOCK),
    ];
    // SAFETY: matches embedding_backward_rows(g, ids, table_grad, n, d, vocab, rows_per_block);
    // g holds n·d values, table_grad vocab·d, the tile BLOCK ids; the kernel skips ids outside
    // [0, vocab), so every write lands in table_grad.
    unsafe {
        backend.launch(
            KERNELS.module,
            KERNELS.source,
            "embedding_backward_rows",
            cfg,
            &[&gs.slice, &is.slice],
            &mut [&mut table_grad.slice],
            &scalars,
        )
    }?;
    Ok(cuda_tensor(table_grad, &[vocab, d]))
}
