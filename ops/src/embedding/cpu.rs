//! CPU reference kernels for the embedding lookup and its scatter-add.

use crate::{cpu_tensor, rows_written};
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

pub(crate) fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let table = weight.cpu_slice("embedding")?;
    let ids_data = ids.cpu_slice("embedding")?;
    let d = weight.dims()[1];
    let copy_row = |p: usize, row: &mut [MaybeUninit<f32>]| {
        for (o, &v) in row.iter_mut().zip(&table[ids_data[p] as usize * d..][..d]) {
            o.write(v);
        }
    };
    // SAFETY: `copy_row` writes all d values of its row.
    let out = unsafe { rows_written(ids_data.len() * d, d, copy_row) };
    let mut dims = ids.dims().to_vec();
    dims.push(d);
    Ok(cpu_tensor(out, &dims))
}

pub(crate) fn embedding_backward(ids: &Tensor, g: &Tensor, vocab: usize) -> Result<Tensor> {
    let ids_data = ids.cpu_slice("embedding_backward")?;
    let grad = g.cpu_slice("embedding_backward")?;
    let d = g.dims()[g.rank() - 1];
    let mut table_grad = vec![0.0f32; vocab * d];
    if d > 0 {
        for (&id, g_row) in ids_data.iter().zip(grad.chunks(d)) {
            let dst = &mut table_grad[id as usize * d..][..d];
            for (acc, &v) in dst.iter_mut().zip(g_row) {
                *acc += v;
            }
        }
    }
    Ok(cpu_tensor(table_grad, &[vocab, d]))
}
