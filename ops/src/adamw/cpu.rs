//! CPU reference kernels for the AdamW step (elementwise, parallel over chunks) and the sum
//! of squares (f64 accumulators in a fixed order).

use super::{AdamW, StepScalars};
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
    let StepScalars { step_size, inv_sqrt_bc2, decay } = hp.step_scalars(step);
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

pub(crate) fn sum_squares_many(xs: &[Tensor]) -> Result<Tensor> {
    let mut total = 0.0f64;
    for x in xs {
        total += x.cpu_slice("sum_squares_many")?.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    }
    Ok(Tensor::scalar(total as f32))
}

pub(crate) fn clip_factor(sum_of_squares: &Tensor, max_norm: f32) -> Result<(Tensor, Tensor)> {
    let norm = sum_of_squares.cpu_slice("clip_factor")?[0].sqrt();
    let factor = max_norm / (norm + 1e-6).max(max_norm);
    Ok((cpu_tensor(vec![norm], &[1]), cpu_tensor(vec![factor], &[1])))
}

/// The reference: each parameter's gradient scaled, then `adamw_step`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_step_many(
    params: &mut [Tensor],
    grads: &[Tensor],
    m: &mut [Tensor],
    v: &mut [Tensor],
    weight_decays: &[f32],
    hp: &AdamW,
    step: u64,
    grad_scale: Option<&Tensor>,
) -> Result<()> {
    for i in 0..params.len() {
        let g = match grad_scale {
            Some(scale) => crate::binary::mul(&grads[i], scale)?,
            None => grads[i].clone(),
        };
        let hp = AdamW { weight_decay: weight_decays[i], ..*hp };
        (params[i], m[i], v[i]) = adamw_step(&params[i], &g, &m[i], &v[i], &hp, step)?;
    }
    Ok(())
}

pub(crate) fn sum_squares(x: &Tensor) -> Result<Tensor> {
    // Eight f64 lanes (element i into lane i mod 8), added pairwise at the end: the order is
    // fixed, and the lanes vectorise where one running sum would wait on each addition.
    const LANES: usize = 8;
    let data = x.cpu_slice("sum_squares")?;
    let mut lanes = [0.0f64; LANES];
    let chunks = data.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64 * v as f64;
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(tail) {
        *lane += v as f64 * v as f64;
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    let total = ((a + e) + (c + g)) + ((b + f) + (d + h));
    Ok(Tensor::scalar(total as f32))
}
