//! CPU reference kernels for the AdamW step (elementwise, parallel over chunks) and the sum
//! of squares (one f64 accumulator in index order).

use super::AdamW;
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use tokenformer_core::{Result, Tensor};

pub(crate) fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "adamw_step";
    let (p, g) = (param.cpu_slice(op)?, grad.cpu_slice(op)?);
    let (m_old, v_old) = (m.cpu_slice(op)?, v.cpu_slice(op)?);
    let t = step.min(i32::MAX as u64) as i32;
    let bias_correction1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bias_correction2 = 1.0 - (hp.beta2 as f64).powi(t);
    let step_size = (hp.lr as f64 / bias_correction1) as f32;
    let inv_sqrt_bc2 = (1.0 / bias_correction2.sqrt()) as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);

    let n = p.len();
    let (mut p_new, mut m_new, mut v_new) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    // Element `start + j` of the tensors is element j of the output chunks.
    let update = |start: usize, p_out: &mut [f32], m_out: &mut [f32], v_out: &mut [f32]| {
        for (j, ((po, mo), vo)) in
            p_out.iter_mut().zip(m_out.iter_mut()).zip(v_out.iter_mut()).enumerate()
        {
            let i = start + j;
            let gi = g[i];
            *mo = b1 * m_old[i] + (1.0 - b1) * gi;
            *vo = b2 * v_old[i] + (1.0 - b2) * gi * gi;
            let denom = vo.sqrt() * inv_sqrt_bc2 + eps;
            *po = p[i] * decay - step_size * *mo / denom;
        }
    };
    const CHUNK: usize = 8192;
    if n >= PARALLEL_MIN_ELEMS {
        p_new
            .par_chunks_mut(CHUNK)
            .zip(m_new.par_chunks_mut(CHUNK))
            .zip(v_new.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((p_out, m_out), v_out))| update(c * CHUNK, p_out, m_out, v_out));
    } else {
        update(0, &mut p_new, &mut m_new, &mut v_new);
    }
    let dims = param.dims();
    Ok((cpu_tensor(p_new, dims), cpu_tensor(m_new, dims), cpu_tensor(v_new, dims)))
}

pub(crate) fn sum_squares(x: &Tensor) -> Result<Tensor> {
    let total: f64 = x.cpu_slice("sum_squares")?.iter().map(|&v| v as f64 * v as f64).sum();
    Ok(Tensor::scalar(total as f32))
}
