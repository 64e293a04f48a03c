//! CPU reference kernels for the AdamW step (elementwise, parallel over chunks) and the sum
//! of squares (f64 accumulators in a fixed order).

use super::{AdamW, StepScalars};
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

pub(crate) fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    // g·1 is g, bit for bit.
    adamw_step_scaled("adamw_step", param, grad, 1.0, m, v, hp, step)
}

/// The step with gradient `grad`·`grad_scale`, the product taken per element inside the update
/// loop: the bits of `binary::mul` followed by `adamw_step`, without a gradient-sized
/// intermediate (one fewer pass over memory in a step that is all memory traffic).
#[allow(clippy::too_many_arguments)]
fn adamw_step_scaled(
    op: &'static str,
    param: &Tensor,
    grad: &Tensor,
    grad_scale: f32,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (p, g) = (param.cpu_slice(op)?, grad.cpu_slice(op)?);
    let (m_old, v_old) = (m.cpu_slice(op)?, v.cpu_slice(op)?);
    let StepScalars { step_size, inv_sqrt_bc2, decay } = hp.step_scalars(step);
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);

    let n = p.len();
    if [g.len(), m_old.len(), v_old.len()].iter().any(|&len| len != n) {
        // mod.rs checks the shapes; the buffers below rely on it, so it is checked again here.
        return Err(tokenformer_core::Error::shape(
            op,
            format!(
                "param {:?}, grad {:?}, m {:?}, v {:?} differ",
                param.dims(),
                grad.dims(),
                m.dims(),
                v.dims()
            ),
        ));
    }
    let element = Element { grad_scale, b1, b2, eps, step_size, inv_sqrt_bc2, decay };
    // The outputs are written once each, straight into fresh buffers: zeroing them first cost
    // as much as the update itself (three parameter-sized memsets a step).
    let (mut p_new, mut m_new, mut v_new) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    // Element `start + j` of the tensors is element j of the output chunks. The loop runs over
    // zipped slices (no index, so no bounds checks) in the widest vector unit: square roots and
    // divisions are exact in every width, so the bits are those of the scalar loop.
    type Out<'a> = &'a mut [MaybeUninit<f32>];
    let update = |start: usize, p_out: Out, m_out: Out, v_out: Out| {
        let end = start + p_out.len();
        let (p, g) = (&p[start..end], &g[start..end]);
        let (m_old, v_old) = (&m_old[start..end], &v_old[start..end]);
        crate::wide_loops::widest(|| {
            let outs = p_out.iter_mut().zip(m_out.iter_mut()).zip(v_out.iter_mut());
            let ins = p.iter().zip(g).zip(m_old).zip(v_old);
            for (((po, mo), vo), (((&pi, &gi), &mi), &vi)) in outs.zip(ins) {
                let (p_next, m_next, v_next) = element.step(pi, gi, mi, vi);
                mo.write(m_next);
                vo.write(v_next);
                po.write(p_next);
            }
        })
    };
    {
        let (p_out, m_out, v_out) = (
            &mut p_new.spare_capacity_mut()[..n],
            &mut m_new.spare_capacity_mut()[..n],
            &mut v_new.spare_capacity_mut()[..n],
        );
        const CHUNK: usize = 8192;
        if n >= PARALLEL_MIN_ELEMS {
            p_out
                .par_chunks_mut(CHUNK)
                .zip(m_out.par_chunks_mut(CHUNK))
                .zip(v_out.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, ((p_out, m_out), v_out))| update(c * CHUNK, p_out, m_out, v_out));
        } else {
            update(0, p_out, m_out, v_out);
        }
    }
    // SAFETY: the chunks above cover all n elements of each buffer, and the update loop writes
    // every element of its chunks (the four inputs have n elements each, checked above).
    unsafe {
        p_new.set_len(n);
        m_new.set_len(n);
        v_new.set_len(n);
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

/// Each parameter's step with its gradient times the scale: the bits of the gradient scaled
/// by `binary::mul` and then `adamw_step`, the product taken inside the update loop.
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
    let op = "adamw_step_many";
    let scale = match grad_scale {
        Some(scale) => scale.cpu_slice(op)?[0],
        None => 1.0,
    };
    for i in 0..params.len() {
        let hp = AdamW { weight_decay: weight_decays[i], ..*hp };
        let g = grads[i].cpu_slice(op)?;
        // In place where nothing else holds the three buffers (mod.rs checked the shapes).
        if let (Some(p_i), Some(m_i), Some(v_i)) =
            (params[i].cpu_data_mut(), m[i].cpu_data_mut(), v[i].cpu_data_mut())
        {
            adamw_step_in_place(p_i, g, scale, m_i, v_i, &hp, step);
            continue;
        }
        (params[i], m[i], v[i]) =
            adamw_step_scaled(op, &params[i], &grads[i], scale, &m[i], &v[i], &hp, step)?;
    }
    Ok(())
}

/// The update of one element: what every CPU loop of this family computes, in this order.
#[derive(Clone, Copy)]
struct Element {
    grad_scale: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    decay: f32,
}

impl Element {
    /// (p, m, v) after the step, from p, g (before scaling), m and v.
    #[inline(always)]
    fn step(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
        let m = self.b1 * m + (1.0 - self.b1) * g;
        let v = self.b2 * v + (1.0 - self.b2) * g * g;
        let denom = v.sqrt() * self.inv_sqrt_bc2 + self.eps;
        (p * self.decay - self.step_size * m / denom, m, v)
    }
}

/// The step of `adamw_step_scaled`, written over p, m and v themselves: the same bits, and no
/// fresh parameter-sized buffers, whose pages the kernel would fault in and zero every step.
#[allow(clippy::too_many_arguments)]
fn adamw_step_in_place(
    p: &mut [f32],
    g: &[f32],
    grad_scale: f32,
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamW,
    step: u64,
) {
    let StepScalars { step_size, inv_sqrt_bc2, decay } = hp.step_scalars(step);
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let element = Element { grad_scale, b1, b2, eps, step_size, inv_sqrt_bc2, decay };
    let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        crate::wide_loops::widest(|| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                (*p, *m, *v) = element.step(*p, g, *m, *v);
            }
        })
    };
    const CHUNK: usize = 8192;
    if p.len() >= PARALLEL_MIN_ELEMS {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update(p, g, m, v));
    } else {
        update(p, g, m, v);
    }
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
