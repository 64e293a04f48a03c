//! Causal scaled dot-product attention per head, built from the matmul and softmax families.
//!
//! Forward, per (batch, head), with q, k, v [T, d_h] and s = 1/√d_h:
//!   P = causal_softmax(q·kᵀ, s)    [T, T], row i over the keys j ≤ i
//!   out = P·v                      [T, d_h]
//! Backward, with G = ∂L/∂out:
//!   gv = Pᵀ·G,   gP = G·vᵀ,   gS = causal_softmax_backward(P, gP, s)   (gradient of q·kᵀ)
//!   gq = gS·k,   gk = gSᵀ·q.
//!
//! Every step is an op that dispatches on the device itself (GEMMs through cuBLAS on a GPU, the
//! fused causal softmax kernel), so attention needs no kernel of its own. The [T, T]
//! probabilities are materialised and kept for the backward pass.

use crate::matmul::matmul;
use crate::same_device;
use crate::softmax::{causal_softmax, causal_softmax_backward};
use tokenformer_core::{Error, Result, Tensor};

/// 1/√d_h, the score scale.
pub(crate) fn score_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

fn check_qkv(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    same_device(op, &[q, k, v])?;
    if q.rank() != 4 || k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(Error::shape(
            op,
            format!(
                "expected q, k, v all [B, H, T, d_h], got {}, {} and {}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    Ok(())
}

/// (out [B, H, T, d_h], probs [B, H, T, T]).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    check_qkv("causal_attention", q, k, v)?;
    let probs = causal_probs(q, k)?;
    let out = matmul(&probs, v, false, false)?;
    Ok((out, probs))
}

/// P = causal_softmax(q·kᵀ, 1/√d_h) [B, H, T, T] alone. The kernels are deterministic, so a
/// backward pass that recomputes P instead of keeping it from the forward gets the same bits.
pub fn causal_probs(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    check_qkv("causal_probs", q, k, k)?;
    causal_softmax(&matmul(q, k, false, true)?, score_scale(q.dims()[3]))
}

/// (gq, gk, gv) from the forward's probs and g_out = ∂L/∂out.
pub fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "causal_attention_backward";
    check_qkv(op, q, k, v)?;
    same_device(op, &[q, probs, g_out])?;
    let d = q.dims();
    if probs.dims() != [d[0], d[1], d[2], d[2]] || g_out.dims() != d {
        return Err(Error::shape(
            op,
            format!(
                "expected probs [B, H, T, T] and g_out like q {}, got {} and {}",
                q.shape(),
                probs.shape(),
                g_out.shape()
            ),
        ));
    }
    let scale = score_scale(q.dims()[3]);
    let gv = matmul(probs, g_out, true, false)?;
    let g_probs = matmul(g_out, v, false, true)?;
    let g_scores = causal_softmax_backward(probs, &g_probs, scale)?;
    let gq = matmul(&g_scores, k, false, false)?;
    let gk = matmul(&g_scores, q, true, false)?;
    Ok((gq, gk, gv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, values};

    #[test]
    fn forward_matches_explicit_loops() {
        let (b, h, t, d) = (2, 3, 5, 4);
        let (q, k, v) = (randn(&[b, h, t, d], 1), randn(&[b, h, t, d], 2), randn(&[b, h, t, d], 3));
        let (out, probs) = causal_attention(&q, &k, &v).unwrap();
        assert_eq!(probs.dims(), &[b, h, t, t]);
        let (qv, kv, vv) = (values(&q), values(&k), values(&v));
        let scale = 1.0 / (d as f64).sqrt();
        let (mut expected_out, mut expected_probs) = (Vec::new(), Vec::new());
        for head in 0..b * h {
            let base = head * t * d;
            for i in 0..t {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|c| qv[base + i * d + c] as f64 * kv[base + j * d + c] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / total).collect();
                for c in 0..d {
                    expected_out.push((0..=i).map(|j| p[j] * vv[base + j * d + c] as f64).sum());
                }
                expected_probs.extend(p.iter().copied().chain(std::iter::repeat_n(0.0, t - 1 - i)));
            }
        }
        assert_close(&values(&out), &expected_out, 1e-5, 1e-5, "out");
        assert_close(&values(&probs), &expected_probs, 1e-6, 1e-5, "probs");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let dims = [1, 2, 5, 3];
        let (q, k, v) = (randn(&dims, 4), randn(&dims, 5), randn(&dims, 6));
        let g = randn(&dims, 7);
        let (_, probs) = causal_attention(&q, &k, &v).unwrap();
        let (gq, gk, gv) = causal_attention_backward(&q, &k, &v, &probs, &g).unwrap();
        check_grad("gq", &q, &g, &gq, |t| causal_attention(t, &k, &v).unwrap().0);
        check_grad("gk", &k, &g, &gk, |t| causal_attention(&q, t, &v).unwrap().0);
        check_grad("gv", &v, &g, &gv, |t| causal_attention(&q, &k, t).unwrap().0);
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let q = randn(&[1, 2, 3, 4], 1);
        let err = causal_attention(&q, &randn(&[1, 2, 4, 4], 2), &q).unwrap_err().to_string();
        assert!(err.contains("causal_attention") && err.contains("[1, 2, 4, 4]"), "{err}");
        assert!(causal_attention(
            &randn(&[2, 3, 4], 1),
            &randn(&[2, 3, 4], 2),
            &randn(&[2, 3, 4], 3)
        )
        .is_err());
        let probs = randn(&[1, 2, 3, 4], 3);
        assert!(causal_attention_backward(&q, &q, &q, &probs, &q).is_err());
    }
}
