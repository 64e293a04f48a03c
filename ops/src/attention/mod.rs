//! Causal scaled dot-product attention per head, in two versions of the same function.
//!
//! ```text
//! Forward, per (batch, head), with q, k, v [T, d_h] and s = 1/√d_h:
//!   S = s·q·kᵀ                       [T, T]
//!   P = causal_softmax(S)            row i over the keys j ≤ i, zero beyond
//!   out = P·v                        [T, d_h]
//! Backward, with G = ∂L/∂out:
//!   gv = Pᵀ·G,   gP = G·vᵀ,   gS = P ⊙ (gP − D),  D_i = Σ_j P_ij·gP_ij   (softmax's Jacobian)
//!   gq = s·gS·k,   gk = s·gSᵀ·q.
//! ```
//!
//! **Plain** (`causal_attention`, `causal_attention_backward`): the lines above as ops of the
//! matmul and softmax families, each dispatching on the device itself (GEMMs through cuBLAS on
//! a GPU). It materialises P [B, H, T, T], the forward's and again the backward's (the autograd
//! op keeps only q, k, v and recomputes P). It is the version to read first, and the oracle the
//! fused version is tested against.
//!
//! **Fused** (`causal_attention_fused`, `causal_attention_fused_backward`): one kernel per
//! direction, on the CPU (cpu.rs) and on CUDA (kernels.cu), that never holds more than a tile
//! of P. Why: the plain version stores B·H·T² floats per layer and runs full T×T products
//! although half of P is masked. At 150M (batch 8 × 1024) that is 4.8 GB more memory than the
//! fused one on a GPU; on the CPU, at `tiny` batch 16 × 256, plain attention was about a third
//! of a training step (forward and backward of [16, 4, 256, 32]: about 140 ms a layer on a
//! 2-core AVX2 machine, against 30 ms fused) and its T² buffers raised the peak resident memory
//! from 195 to 224 MiB.
//! The fused kernels walk key tiles in order for each tile of query rows, skip the tiles that
//! lie wholly after the row tile (masked), and keep per row a running maximum m, a running sum
//! l and an unnormalised output o (the online softmax). For each key tile J:
//!
//! ```text
//! m′ = max(m, max_{j∈J} S_ij),   c = e^(m − m′)
//! l′ = c·l + Σ_{j∈J} e^(S_ij − m′),   o′ = c·o + Σ_{j∈J} e^(S_ij − m′)·v_j
//! ```
//!
//! and at the end `out_i = o/l = Σ_j e^(S_ij)·v_j / Σ_j e^(S_ij)` (the factors `e^−m` cancel),
//! and `lse_i = m + ln l = ln Σ_j e^(S_ij)`, the only thing kept for the backward pass besides
//! out. The backward pass recomputes each tile of P as `P_ij = e^(S_ij − lse_i)` and takes D
//! from out:
//!
//! ```text
//! D_i = Σ_j P_ij·(G_i·v_j) = G_i·(Σ_j P_ij·v_j) = G_i·out_i,
//! ```
//!
//! so no row of P is needed whole; then gv, gk, gq gather their tile terms as above.
//!
//! Which one runs is chosen at run time by the autograd op (`fused_enabled`); both stay
//! callable directly on either device.

pub(crate) mod cpu;
mod cuda;

use crate::matmul::matmul;
use crate::same_device;
use crate::softmax::{causal_softmax, causal_softmax_backward};
use tokenformer_core::{Device, Error, Result, Tensor};

/// Whether attention runs fused (`TOKENFORMER_FUSED`, see `crate::fused`).
pub fn fused_enabled() -> Result<bool> {
    crate::fused::enabled("attention")
}

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

/// (out [B, H, T, d_h], lse [B, H, T]) with lse_i = ln Σ_{j≤i} e^(S_ij): the fused kernel.
pub fn causal_attention_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "causal_attention_fused";
    check_qkv(op, q, k, v)?;
    match q.device() {
        Device::Cpu => cpu::causal_attention_fused(q, k, v),
        Device::Cuda(_) => cuda::causal_attention_fused(q, k, v),
    }
}

/// (gq, gk, gv) of the fused kernel, from its out and lse and g_out = ∂L/∂out.
pub fn causal_attention_fused_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "causal_attention_fused_backward";
    check_qkv(op, q, k, v)?;
    same_device(op, &[q, out, lse, g_out])?;
    let d = q.dims();
    if out.dims() != d || g_out.dims() != d || lse.dims() != &d[..3] {
        return Err(Error::shape(
            op,
            format!(
                "expected out and g_out like q {} and lse [B, H, T], got {}, {} and {}",
                q.shape(),
                out.shape(),
                g_out.shape(),
                lse.shape()
            ),
        ));
    }
    match q.device() {
        Device::Cpu => cpu::causal_attention_fused_backward(q, k, v, out, lse, g_out),
        Device::Cuda(_) => cuda::causal_attention_fused_backward(q, k, v, out, lse, g_out),
    }
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

#[cfg(test)]
mod fused_tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, values};

    /// Shapes [B, H, T, d_h] that reach every edge of the CPU tiles (64 query rows × 128 keys,
    /// head dim padded to 16): one position, odd head dims, T at and just past a query tile,
    /// and several tiles of both kinds with partial last ones.
    const SHAPES: [[usize; 4]; 7] = [
        [1, 1, 1, 1],
        [2, 3, 5, 7],
        [1, 2, 64, 16],
        [1, 1, 65, 3],
        [2, 1, 130, 33],
        [1, 2, 200, 32],
        [1, 1, 129, 64],
    ];

    /// The fused kernel against the plain composition, forward and all three gradients:
    /// |fused − plain| ≤ 2e-5 + 2e-4·|plain|. They differ only in rounding: the order of the
    /// sums (tiles and the online rescaling against whole rows) and the exp (a polynomial
    /// within 2 ulp against the C library's).
    #[test]
    fn fused_matches_plain() {
        for (n, dims) in SHAPES.iter().enumerate() {
            let seed = 10 * n as u64;
            let (q, k, v) = (randn(dims, seed), randn(dims, seed + 1), randn(dims, seed + 2));
            let g = randn(dims, seed + 3);
            let (out, lse) = causal_attention_fused(&q, &k, &v).unwrap();
            assert_eq!(lse.dims(), &dims[..3]);
            let (plain_out, probs) = causal_attention(&q, &k, &v).unwrap();
            let close = |got: &Tensor, want: &Tensor, what: &str| {
                let want: Vec<f64> = values(want).iter().map(|&x| x as f64).collect();
                assert_close(&values(got), &want, 2e-5, 2e-4, &format!("{what} {dims:?}"));
            };
            close(&out, &plain_out, "out");
            let fused = causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
            let plain = causal_attention_backward(&q, &k, &v, &probs, &g).unwrap();
            close(&fused.0, &plain.0, "gq");
            close(&fused.1, &plain.1, "gk");
            close(&fused.2, &plain.2, "gv");
        }
    }

    #[test]
    fn lse_is_the_log_sum_exp_of_the_visible_scores() {
        let dims = [1, 2, 70, 5];
        let (q, k) = (randn(&dims, 1), randn(&dims, 2));
        let (_, lse) = causal_attention_fused(&q, &k, &randn(&dims, 3)).unwrap();
        let (qv, kv) = (values(&q), values(&k));
        let (t, d) = (dims[2], dims[3]);
        let scale = 1.0 / (d as f64).sqrt();
        let mut expected = Vec::new();
        for head in 0..2 {
            let row = |x: &[f32], i: usize| x[(head * t + i) * d..][..d].to_vec();
            for i in 0..t {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let (qi, kj) = (row(&qv, i), row(&kv, j));
                        qi.iter().zip(&kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                    })
                    .collect();
                expected.push(scores.iter().map(|s| s.exp()).sum::<f64>().ln());
            }
        }
        assert_close(&values(&lse), &expected, 1e-5, 1e-5, "lse");
    }

    #[test]
    fn fused_backward_matches_finite_differences() {
        // Three query tiles and two key tiles, partial last ones, an odd head dim.
        for dims in [[1, 1, 131, 3], [2, 1, 4, 5]] {
            let (q, k, v) = (randn(&dims, 4), randn(&dims, 5), randn(&dims, 6));
            let g = randn(&dims, 7);
            let (out, lse) = causal_attention_fused(&q, &k, &v).unwrap();
            let (gq, gk, gv) = causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
            let forward =
                |q: &Tensor, k: &Tensor, v: &Tensor| causal_attention_fused(q, k, v).unwrap().0;
            check_grad("gq", &q, &g, &gq, |t| forward(t, &k, &v));
            check_grad("gk", &k, &g, &gk, |t| forward(&q, t, &v));
            check_grad("gv", &v, &g, &gv, |t| forward(&q, &k, t));
        }
    }

    #[test]
    fn fused_is_the_same_bits_whatever_the_thread_count() {
        // Large enough for the parallel path (36,000 values); several query tiles per head, a
        // partial key tile, and a head dim padded to the register block's width.
        let dims = [2, 3, 150, 40];
        let (q, k, v) = (randn(&dims, 8), randn(&dims, 9), randn(&dims, 10));
        let g = randn(&dims, 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (out, lse) = causal_attention_fused(&q, &k, &v).unwrap();
                let (gq, gk, gv) =
                    causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
                [out, lse, gq, gk, gv]
                    .map(|t| values(&t).iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn extreme_scores_stay_finite() {
        // Scores in the thousands: the online maximum must keep every exponent ≤ 0.
        let dims = [1, 1, 100, 8];
        let big = |seed| crate::unary::affine(&randn(&dims, seed), 40.0, 0.0).unwrap();
        let (q, k, v) = (big(1), big(2), randn(&dims, 3));
        let (out, lse) = causal_attention_fused(&q, &k, &v).unwrap();
        let (plain, _) = causal_attention(&q, &k, &v).unwrap();
        assert!(values(&out).iter().chain(&values(&lse)).all(|x| x.is_finite()));
        let want: Vec<f64> = values(&plain).iter().map(|&x| x as f64).collect();
        assert_close(&values(&out), &want, 1e-5, 1e-4, "out");
    }

    #[test]
    fn fused_rejects_bad_shapes() {
        let q = randn(&[1, 2, 3, 4], 1);
        let err = causal_attention_fused(&q, &randn(&[1, 2, 4, 4], 2), &q).unwrap_err().to_string();
        assert!(err.contains("causal_attention_fused") && err.contains("[1, 2, 4, 4]"), "{err}");
        let lse = randn(&[1, 2, 3], 3);
        assert!(causal_attention_fused_backward(&q, &q, &q, &q, &lse, &q).is_ok());
        let err = causal_attention_fused_backward(&q, &q, &q, &q, &randn(&[1, 2, 4], 4), &q)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("causal_attention_fused_backward") && err.contains("[1, 2, 4]"),
            "{err}"
        );
        assert!(causal_attention_fused_backward(&q, &q, &q, &randn(&[1, 2, 3, 5], 5), &lse, &q)
            .is_err());
    }
}
