//! CUDA glue for the embedding: a gather forward, and a scatter-add backward made
//! deterministic by grouping the positions by id on the host (see kernels.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tokenformer_core::cuda::{
    count_u32, cuda_err, cuda_tensor, launch_1d, Arg, CudaStorage, BLOCK,
};
use tokenformer_core::{Result, Tensor};

const KERNELS: &str = include_str!("kernels.cu");

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
        // SAFETY: matches embedding_forward(weight, ids, out, n, d, vocab); reads of the
        // table are bounds-checked against vocab.
        unsafe {
            ws.backend.launch(
                "embedding",
                KERNELS,
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

/// Positions grouped by id: (positions, starts, rows) where positions[starts[k]..starts[k+1]]
/// are, in increasing order, the positions holding id rows[k]. Ids are valid (checked by the
/// caller).
fn group_positions(ids: &[f32], vocab: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut first_slot = vec![0u32; vocab + 1];
    for &id in ids {
        first_slot[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        first_slot[v + 1] += first_slot[v];
    }
    let mut next = first_slot.clone();
    let mut positions = vec![0u32; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        positions[next[id as usize] as usize] = p as u32;
        next[id as usize] += 1;
    }
    let rows: Vec<u32> = (0..vocab as u32)
        .filter(|&v| first_slot[v as usize + 1] > first_slot[v as usize])
        .collect();
    let mut starts: Vec<u32> = rows.iter().map(|&v| first_slot[v as usize]).collect();
    starts.push(ids.len() as u32);
    (positions, starts, rows)
}

pub(crate) fn embedding_backward(ids: &Tensor, g: &Tensor, vocab: usize) -> Result<Tensor> {
    let op = "embedding_backward";
    let gs = CudaStorage::of(g, op)?;
    let backend = &gs.backend;
    let d = g.dims()[g.rank() - 1];
    let mut table_grad = backend.zeros(vocab * d)?;
    count_u32(op, vocab * d)?;
    count_u32(op, g.numel())?;
    if d == 0 || ids.numel() == 0 {
        return Ok(cuda_tensor(table_grad, &[vocab, d]));
    }
    let (positions, starts, rows) = group_positions(&ids.to_vec()?, vocab);
    let stream = backend.stream();
    let upload = |v: &Vec<u32>| stream.clone_htod(v).map_err(|e| cuda_err(op, e));
    let (positions, starts, rows_dev) = (upload(&positions)?, upload(&starts)?, upload(&rows)?);
    let d32 = count_u32(op, d)?;
    let cfg = LaunchConfig {
        grid_dim: (count_u32(op, rows.len())?, d32.div_ceil(BLOCK), 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = backend.function("embedding", KERNELS, "embedding_backward_grouped")?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&gs.slice).arg(&positions).arg(&starts).arg(&rows_dev);
    launch.arg(&mut table_grad.slice).arg(&d32);
    // SAFETY: matches embedding_backward_grouped(g, positions, starts, rows, table_grad, d);
    // every position is a row of g and every row id is below vocab.
    unsafe { launch.launch(cfg) }.map_err(|e| cuda_err(op, e))?;
    Ok(cuda_tensor(table_grad, &[vocab, d]))
}
