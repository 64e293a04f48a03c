//! CUDA attention: batched cuBLAS GEMMs over the (batch, head) pairs around the fused causal
//! softmax kernel. No kernel of its own: the [T, T] scores are materialised, which keeps the
//! code short and the probabilities at hand for the backward pass.

use super::score_scale;
use crate::matmul::matmul;
use crate::softmax::{causal_softmax, causal_softmax_backward};
use tokenformer_core::{Result, Tensor};

pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let scale = score_scale(q.dims()[3]);
    let probs = causal_softmax(&matmul(q, k, false, true)?, scale)?;
    let out = matmul(&probs, v, false, false)?;
    Ok((out, probs))
}

pub(crate) fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let scale = score_scale(q.dims()[3]);
    let gv = matmul(probs, g_out, true, false)?;
    let g_probs = matmul(g_out, v, false, true)?;
    let g_scores = causal_softmax_backward(probs, &g_probs, scale)?;
    let gq = matmul(&g_scores, k, false, false)?;
    let gk = matmul(&g_scores, q, true, false)?;
    Ok((gq, gk, gv))
}
