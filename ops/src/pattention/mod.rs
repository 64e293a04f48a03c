//! Pattention as one op (SPEC §1): attention from input rows X to n parameter tokens.
//!
//! ```text
//! Forward, for X [..., d_in], keys K [n, d_in], values V [n, d_out]:
//!   A = X·Kᵀ      [..., n]     the scores, returned for the backward pass
//!   S = Θ(A)      row-wise     (the pattention_norm family)
//!   O = S·V       [..., d_out]
//! Backward, with g_O = ∂L/∂O and S recomputed from A (so S is never kept):
//!   g_V = Sᵀ·g_O,   g_S = g_O·Vᵀ,   g_A = Θ′(A; g_S),   g_K = g_Aᵀ·X,   g_X = g_A·K
//! ```
//!
//! What is fused, and why. Written as a chain of ops (`composed` below: two matmuls and Θ,
//! then their backward rules), every step is a full pass over a `[rows, n]` array in memory, its
//! own parallel region and its own allocation, and the Pattentions are where a step spends its
//! time (90% of a `tiny` 8 × 64 step in `bench --profile`). The CPU kernel instead walks the
//! rows in blocks that stay in cache: per block it computes the scores, Θ and the value product
//! (forward), or Θ again, g_S, g_A and g_X (backward) before moving on, so S and g_S never exist
//! in full. Only g_V and g_K, which sum over all rows, run as two products afterwards.
//!
//! Every product is the packed GEMM's one-FMA-chain-per-element and Θ is the pattention_norm
//! family's row function, so the fused op gives the composition's bits exactly (tested), and
//! inherits exact growth: the reductions over the n tokens (S·V, g_A·K, Θ's norms and dots)
//! group old terms the same way whatever n is. Elsewhere (CUDA, or a processor without the
//! packed GEMM) the composition itself runs.

mod cpu;

use crate::matmul::{matmul, matmul_backward};
use crate::pattention_norm::{pattention_norm, pattention_norm_backward, Theta};
use crate::same_device;
use tokenformer_core::{Device, Error, Result, Shape, Tensor};

/// (rows, d_in, n, d_out) after checking that x [..., d_in], keys [n, d_in] and
/// values [n, d_out] fit together.
fn check(op: &'static str, x: &Tensor, keys: &Tensor, values: &Tensor) -> Result<[usize; 4]> {
    same_device(op, &[x, keys, values])?;
    let fail = || {
        Err(Error::shape(
            op,
            format!(
                "expected x [..., d_in], keys [n, d_in], values [n, d_out]; got {}, {} and {}",
                x.shape(),
                keys.shape(),
                values.shape()
            ),
        ))
    };
    if x.rank() < 1 || keys.rank() != 2 || values.rank() != 2 {
        return fail();
    }
    let d_in = x.dims()[x.rank() - 1];
    let (n, d_out) = (values.dims()[0], values.dims()[1]);
    if keys.dims() != [n, d_in] {
        return fail();
    }
    Ok([x.numel() / d_in.max(1), d_in, n, d_out])
}

/// The packed GEMM the fused CPU kernel runs on, or `None` where the composition runs instead
/// (no packed GEMM, or `TOKENFORMER_FUSED` turns `pattention` or `matmul` off).
fn fused_isa() -> Result<Option<crate::matmul::packed::Isa>> {
    if !crate::fused::enabled("pattention")? {
        return Ok(None);
    }
    crate::matmul::packed::isa()
}

/// x's leading dims followed by `last`.
fn with_last(x: &Tensor, last: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank checked") = last;
    dims
}

/// (O [..., d_out], A [..., n]) for x [..., d_in], keys [n, d_in], values [n, d_out].
pub fn pattention(
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    theta: Theta,
    tau: f32,
) -> Result<(Tensor, Tensor)> {
    let [rows, d_in, n, d_out] = check("pattention", x, keys, values)?;
    // Empty operands take the composition, whose ops handle every zero-sized case.
    if rows == 0 || d_in == 0 || n == 0 || d_out == 0 {
        return composed(x, keys, values, theta, tau);
    }
    match (x.device(), fused_isa()?) {
        (Device::Cpu, Some(isa)) => cpu::pattention(isa, x, keys, values, theta, tau, d_out),
        _ => composed(x, keys, values, theta, tau),
    }
}

/// (g_x, g_keys, g_values) from the forward's scores A and g_out = ∂L/∂O.
#[allow(clippy::too_many_arguments)]
pub fn pattention_backward(
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    scores: &Tensor,
    theta: Theta,
    tau: f32,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "pattention_backward";
    let [rows, d_in, n, d_out] = check(op, x, keys, values)?;
    same_device(op, &[x, scores, g_out])?;
    for (what, t, last) in [("scores", scores, n), ("gradient", g_out, d_out)] {
        if t.dims() != with_last(x, last).as_slice() {
            return Err(Error::shape(
                op,
                format!(
                    "{what} of shape {} do not match x {} (expected {})",
                    t.shape(),
                    x.shape(),
                    Shape::new(&with_last(x, last))
                ),
            ));
        }
    }
    if rows == 0 || d_in == 0 || n == 0 || d_out == 0 {
        return composed_backward(x, keys, values, scores, theta, tau, g_out);
    }
    match (x.device(), fused_isa()?) {
        (Device::Cpu, Some(isa)) => {
            cpu::pattention_backward(isa, x, keys, values, scores, theta, tau, g_out)
        }
        _ => composed_backward(x, keys, values, scores, theta, tau, g_out),
    }
}

/// The forward as a chain of ops, on any device: the reference the fused kernel must match.
pub fn composed(
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    theta: Theta,
    tau: f32,
) -> Result<(Tensor, Tensor)> {
    let scores = matmul(x, keys, false, true)?;
    let weights = pattention_norm(&scores, theta, tau)?;
    Ok((matmul(&weights, values, false, false)?, scores))
}

/// The backward as a chain of ops, on any device.
pub fn composed_backward(
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    scores: &Tensor,
    theta: Theta,
    tau: f32,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let weights = pattention_norm(scores, theta, tau)?;
    let (g_weights, g_values) = matmul_backward(&weights, values, g_out, false, false)?;
    drop(weights);
    let g_scores = pattention_norm_backward(scores, theta, tau, &g_weights)?;
    drop(g_weights);
    let (g_x, g_keys) = matmul_backward(x, keys, &g_scores, false, true)?;
    Ok((g_x, g_keys, g_values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, randn, values};

    const THETAS: [Theta; 3] = [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax];

    fn bits(t: &Tensor) -> Vec<u32> {
        values(t).iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn fused_kernel_gives_the_bits_of_the_composition() {
        // Row counts across several row blocks and not multiples of them or of the GEMM tile;
        // the last one across several of the backward pass's row chunks.
        let cases = [
            (&[3, 5][..], 7, 9, 5),
            (&[2, 61][..], 20, 37, 33),
            (&[131][..], 64, 70, 48),
            (&[3, 301][..], 9, 13, 6),
        ];
        for (case, &(lead, d_in, n, d_out)) in cases.iter().enumerate() {
            let mut x_dims = lead.to_vec();
            x_dims.push(d_in);
            let x = randn(&x_dims, case as u64);
            let keys = randn(&[n, d_in], 10 + case as u64);
            let vals = randn(&[n, d_out], 20 + case as u64);
            let mut g_dims = lead.to_vec();
            g_dims.push(d_out);
            let g = randn(&g_dims, 30 + case as u64);
            for theta in THETAS {
                let what = format!("case {case} {theta:?}");
                let (out, scores) = pattention(&x, &keys, &vals, theta, 2.5).unwrap();
                let (out_ref, scores_ref) = composed(&x, &keys, &vals, theta, 2.5).unwrap();
                assert_eq!(bits(&out), bits(&out_ref), "{what} output");
                assert_eq!(bits(&scores), bits(&scores_ref), "{what} scores");
                let fused = pattention_backward(&x, &keys, &vals, &scores, theta, 2.5, &g).unwrap();
                let plain = composed_backward(&x, &keys, &vals, &scores, theta, 2.5, &g).unwrap();
                assert_eq!(bits(&fused.0), bits(&plain.0), "{what} g_x");
                assert_eq!(bits(&fused.1), bits(&plain.1), "{what} g_keys");
                assert_eq!(bits(&fused.2), bits(&plain.2), "{what} g_values");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = randn(&[2, 3, 5], 1);
        let keys = randn(&[6, 5], 2);
        let vals = randn(&[6, 4], 3);
        let g = randn(&[2, 3, 4], 4);
        for theta in THETAS {
            let (_, scores) = pattention(&x, &keys, &vals, theta, 2.0).unwrap();
            let (gx, gk, gv) =
                pattention_backward(&x, &keys, &vals, &scores, theta, 2.0, &g).unwrap();
            let f = |x: &Tensor, k: &Tensor, v: &Tensor| pattention(x, k, v, theta, 2.0).unwrap().0;
            check_grad(&format!("{theta:?} x"), &x, &g, &gx, |t| f(t, &keys, &vals));
            check_grad(&format!("{theta:?} keys"), &keys, &g, &gk, |t| f(&x, t, &vals));
            check_grad(&format!("{theta:?} values"), &vals, &g, &gv, |t| f(&x, &keys, t));
        }
    }

    #[test]
    fn appended_tokens_with_zero_keys_change_no_bit() {
        // Exact growth at the level of the op: outputs and the old tokens' gradients keep their
        // bits, the new values get a zero gradient. n crosses the GEMM's k-block (256).
        let (rows, d, n, extra) = (50, 16, 250, 300);
        let x = randn(&[rows, d], 5);
        let keys = randn(&[n, d], 6);
        let vals = randn(&[n, d], 7);
        let g = randn(&[rows, d], 8);
        let grow = |t: &Tensor, new: Vec<f32>| {
            let mut data = values(t);
            data.extend(new);
            crate::testing::tensor(data, &[n + extra, d])
        };
        let keys_grown = grow(&keys, vec![0.0; extra * d]);
        let vals_grown = grow(&vals, values(&randn(&[extra, d], 9)));
        for theta in [Theta::L2NormGelu, Theta::GeluL2Norm] {
            let (out, scores) = pattention(&x, &keys, &vals, theta, 3.0).unwrap();
            let (out_g, scores_g) = pattention(&x, &keys_grown, &vals_grown, theta, 3.0).unwrap();
            assert_eq!(bits(&out), bits(&out_g), "{theta:?} output");
            let (gx, gk, gv) =
                pattention_backward(&x, &keys, &vals, &scores, theta, 3.0, &g).unwrap();
            let (gx_g, gk_g, gv_g) =
                pattention_backward(&x, &keys_grown, &vals_grown, &scores_g, theta, 3.0, &g)
                    .unwrap();
            assert_eq!(bits(&gx), bits(&gx_g), "{theta:?} g_x");
            assert_eq!(bits(&gk), bits(&gk_g)[..n * d].to_vec(), "{theta:?} old g_keys");
            assert_eq!(bits(&gv), bits(&gv_g)[..n * d].to_vec(), "{theta:?} old g_values");
            assert!(values(&gv_g)[n * d..].iter().all(|&v| v == 0.0), "{theta:?} new g_values");
        }
    }

    #[test]
    fn empty_operands_give_the_composition_s_results() {
        // No rows, no output features, no input features, no tokens: every part of every result
        // is defined (the composition's values) and nothing panics.
        for (rows, d_in, n, d_out) in [(0, 4, 3, 2), (5, 4, 3, 0), (5, 0, 3, 2), (5, 4, 0, 2)] {
            let (x, keys, vals) =
                (randn(&[rows, d_in], 1), randn(&[n, d_in], 2), randn(&[n, d_out], 3));
            let g = randn(&[rows, d_out], 4);
            let what = format!("rows {rows} d_in {d_in} n {n} d_out {d_out}");
            let (out, scores) = pattention(&x, &keys, &vals, Theta::L2NormGelu, 1.5).unwrap();
            let (out_ref, scores_ref) = composed(&x, &keys, &vals, Theta::L2NormGelu, 1.5).unwrap();
            assert_eq!(bits(&out), bits(&out_ref), "{what} output");
            assert_eq!(bits(&scores), bits(&scores_ref), "{what} scores");
            let grads =
                pattention_backward(&x, &keys, &vals, &scores, Theta::L2NormGelu, 1.5, &g).unwrap();
            let want =
                composed_backward(&x, &keys, &vals, &scores, Theta::L2NormGelu, 1.5, &g).unwrap();
            assert_eq!(bits(&grads.0), bits(&want.0), "{what} g_x");
            assert_eq!(bits(&grads.1), bits(&want.1), "{what} g_keys");
            assert_eq!(bits(&grads.2), bits(&want.2), "{what} g_values");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_naming_the_op() {
        let x = randn(&[4, 5], 1);
        let err = pattention(&x, &randn(&[6, 4], 2), &randn(&[6, 3], 3), Theta::L2NormGelu, 1.0);
        let err = err.unwrap_err().to_string();
        assert!(err.contains("pattention") && err.contains("[6, 4]"), "{err}");
        let (keys, vals) = (randn(&[6, 5], 2), randn(&[6, 3], 3));
        let (_, scores) = pattention(&x, &keys, &vals, Theta::L2NormGelu, 1.0).unwrap();
        let bad_g = randn(&[4, 4], 4);
        let err = pattention_backward(&x, &keys, &vals, &scores, Theta::L2NormGelu, 1.0, &bad_g);
        assert!(err.unwrap_err().to_string().contains("pattention_backward"));
    }
}
