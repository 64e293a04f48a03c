//! Matrix multiplication with transpose flags, batched or with one operand shared.
//!
//! ```text
//! Forward:   C = op(A)·op(B),   op(X) = Xᵀ when its flag is set,
//!            C[i,j] = Σ_p op(A)[i,p]·op(B)[p,j]
//! Backward, with G = ∂L/∂C (transposed back when the operand was stored transposed):
//!   gA = G·op(B)ᵀ          (trans_a: gA = op(B)·Gᵀ)
//!   gB = op(A)ᵀ·G          (trans_b: gB = Gᵀ·op(A))
//! ```
//!
//! A is `[..., m, k]` (`[..., k, m]` when trans_a), B is `[..., k, n]` (`[..., n, k]` when
//! trans_b); the batch dims agree, or one operand is a rank-2 matrix shared by every batch of
//! the other. Transposes are read through strides, never copied. A shared operand was used by every batch, so its gradient sums over the batch; when A's
//! batch can be folded into its rows, that sum is one GEMM over the folded rows.

pub mod blocking;
mod cpu;
mod cuda;
pub(crate) mod packed;

pub use packed::cpu_gemm_choice;

use tokenformer_core::{Device, Error, Result, Shape, Tensor};

/// How a product is laid out: `batch` products of (m × k)·(k × n), with A or B shared.
pub(crate) struct Plan {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_shared: bool,
    pub b_shared: bool,
    pub out_dims: Vec<usize>,
}

/// Checks ranks, inner dimensions and batch dims, and lays the product out.
pub(crate) fn plan(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Plan> {
    let describe = || {
        format!(
            "{}{} times {}{}",
            a.shape(),
            if trans_a { "ᵀ" } else { "" },
            b.shape(),
            if trans_b { "ᵀ" } else { "" }
        )
    };
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(op, format!("both operands need rank >= 2: {}", describe())));
    }
    let (a_batch, a_mat) = a.dims().split_at(a.rank() - 2);
    let (b_batch, b_mat) = b.dims().split_at(b.rank() - 2);
    let (m, k) = if trans_a { (a_mat[1], a_mat[0]) } else { (a_mat[0], a_mat[1]) };
    let (k_b, n) = if trans_b { (b_mat[1], b_mat[0]) } else { (b_mat[0], b_mat[1]) };
    if k != k_b {
        return Err(Error::shape(
            op,
            format!("inner dimensions {k} and {k_b} differ: {}", describe()),
        ));
    }
    let (batch_dims, a_shared, b_shared) = if a_batch == b_batch {
        (a_batch, false, false)
    } else if b_batch.is_empty() {
        (a_batch, false, true)
    } else if a_batch.is_empty() {
        (b_batch, true, false)
    } else {
        return Err(Error::shape(op, format!("batch dimensions differ: {}", describe())));
    };
    let mut out_dims = batch_dims.to_vec();
    out_dims.extend([m, n]);
    Ok(Plan { batch: batch_dims.iter().product(), m, k, n, a_shared, b_shared, out_dims })
}

/// op(a)·op(b), batched over leading dims (see the module doc for the accepted shapes).
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let device = crate::same_device("matmul", &[a, b])?;
    plan("matmul", a, b, trans_a, trans_b)?;
    match device {
        Device::Cpu => cpu::matmul(a, b, trans_a, trans_b),
        Device::Cuda(_) => cuda::matmul(a, b, trans_a, trans_b),
    }
}

/// (∂L/∂a, ∂L/∂b) of matmul(a, b, trans_a, trans_b), given g = ∂L/∂out.
pub fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<(Tensor, Tensor)> {
    crate::same_device("matmul_backward", &[a, b, g])?;
    let plan = plan("matmul_backward", a, b, trans_a, trans_b)?;
    if g.dims() != plan.out_dims.as_slice() {
        return Err(Error::shape(
            "matmul_backward",
            format!(
                "gradient of shape {} does not match the product's shape {}",
                g.shape(),
                Shape::new(&plan.out_dims)
            ),
        ));
    }
    // Written with `matmul` and `sum` themselves, so one version serves every device.
    use crate::reduce::sum;
    let p = plan;
    let batch_axes: Vec<usize> = (0..p.out_dims.len() - 2).collect();

    let grad_a = |g: &Tensor| {
        if trans_a {
            matmul(b, g, trans_b, true)
        } else {
            matmul(g, b, false, !trans_b)
        }
    };
    let grad_b = |a: &Tensor, g: &Tensor| {
        if trans_b {
            matmul(g, a, true, trans_a)
        } else {
            matmul(a, g, !trans_a, false)
        }
    };

    let ga = if p.a_shared { sum(&grad_a(g)?, &batch_axes, false)? } else { grad_a(g)? };
    let gb = if p.b_shared && !trans_a {
        // Σ over the batch of op(A_i)ᵀ·G_i is one product over the folded rows.
        let rows = p.batch * p.m;
        grad_b(&a.reshape(&[rows, p.k])?, &g.reshape(&[rows, p.n])?)?
    } else if p.b_shared {
        sum(&grad_b(a, g)?, &batch_axes, false)?
    } else {
        grad_b(a, g)?
    };
    Ok((ga, gb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, tensor, values};

    /// The triple loop in f64 (the shared oracle), without its magnitudes.
    fn naive(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Vec<f64> {
        crate::testing::naive_matmul(a, b, trans_a, trans_b).0
    }

    /// Stored shape of an operand with `batch` dims, logical (rows × cols), maybe transposed.
    fn stored(batch: &[usize], rows: usize, cols: usize, transposed: bool) -> Vec<usize> {
        let mut dims = batch.to_vec();
        dims.extend(if transposed { [cols, rows] } else { [rows, cols] });
        dims
    }

    /// (a's batch dims, b's batch dims, m, k, n).
    type Case = (&'static [usize], &'static [usize], usize, usize, usize);

    const CASES: &[Case] = &[
        (&[], &[], 5, 7, 3),
        (&[2, 3], &[2, 3], 4, 6, 5),
        (&[3], &[], 5, 4, 7),
        (&[2, 2], &[], 3, 5, 2),
        (&[], &[3], 6, 2, 5),
        (&[], &[], 1, 9, 1),
    ];

    #[test]
    fn forward_matches_triple_loop_for_every_flag_and_layout() {
        for (case, &(a_batch, b_batch, m, k, n)) in CASES.iter().enumerate() {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = randn(&stored(a_batch, m, k, trans_a), case as u64);
                let b = randn(&stored(b_batch, k, n, trans_b), 100 + case as u64);
                let c = matmul(&a, &b, trans_a, trans_b).unwrap();
                let what = format!("case {case} trans {trans_a} {trans_b}");
                assert_close(&values(&c), &naive(&a, &b, trans_a, trans_b), 1e-5, 1e-5, &what);
            }
        }
    }

    #[test]
    fn large_products_split_across_threads_match_the_triple_loop() {
        for (trans_a, trans_b) in [(false, false), (true, true)] {
            let a = randn(&stored(&[], 300, 129, trans_a), 1);
            let b = randn(&stored(&[], 129, 70, trans_b), 2);
            let c = matmul(&a, &b, trans_a, trans_b).unwrap();
            assert_close(&values(&c), &naive(&a, &b, trans_a, trans_b), 1e-4, 1e-4, "split");
        }
        let a = randn(&[5, 67, 33], 3);
        let b = randn(&[5, 33, 81], 4);
        assert_close(
            &values(&matmul(&a, &b, false, false).unwrap()),
            &naive(&a, &b, false, false),
            1e-4,
            1e-4,
            "batched",
        );
    }

    #[test]
    fn the_reference_gemm_matches_the_triple_loop_and_the_fast_one() {
        // The reference (matrixmultiply) path checked on its own, and the path in use (the
        // packed kernel where the processor has one) checked against it.
        for (case, &(a_batch, b_batch, m, k, n)) in CASES.iter().enumerate() {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = randn(&stored(a_batch, m, k, trans_a), 40 + case as u64);
                let b = randn(&stored(b_batch, k, n, trans_b), 50 + case as u64);
                let reference = cpu::reference_matmul(&a, &b, trans_a, trans_b).unwrap();
                let expected = naive(&a, &b, trans_a, trans_b);
                let what = format!("case {case} trans {trans_a} {trans_b}");
                assert_close(&values(&reference), &expected, 1e-5, 1e-5, &what);
                let used = matmul(&a, &b, trans_a, trans_b).unwrap();
                let reference: Vec<f64> = values(&reference).iter().map(|&v| v as f64).collect();
                assert_close(&values(&used), &reference, 1e-5, 1e-5, &what);
            }
        }
    }

    #[test]
    fn row_blocks_give_the_same_bits_as_one_product() {
        // Rows of a split product are computed exactly as in the whole product.
        let a = randn(&[300, 129], 5);
        let b = randn(&[129, 70], 6);
        let whole = values(&matmul(&a, &b, false, false).unwrap());
        let top = values(
            &matmul(&crate::layout::narrow(&a, 0, 0, 7).unwrap(), &b, false, false).unwrap(),
        );
        assert_eq!(top, whole[..7 * 70].to_vec());
    }

    #[test]
    fn appending_zero_terms_keeps_every_bit() {
        // Exact growth: extra k terms that are exact zeros do not change any output, even when
        // k crosses the GEMM's internal blocking.
        let (m, k, n, extra) = (37, 250, 45, 300);
        let a = randn(&[m, k], 7);
        let b = randn(&[k, n], 8);
        let mut a_grown = Vec::new();
        for row in values(&a).chunks(k) {
            a_grown.extend_from_slice(row);
            a_grown.extend(std::iter::repeat_n(0.0, extra));
        }
        let mut b_grown = values(&b);
        b_grown.extend(values(&randn(&[extra, n], 9)));
        let grown = matmul(
            &tensor(a_grown, &[m, k + extra]),
            &tensor(b_grown, &[k + extra, n]),
            false,
            false,
        );
        assert_eq!(values(&grown.unwrap()), values(&matmul(&a, &b, false, false).unwrap()));
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (case, &(a_batch, b_batch, m, k, n)) in CASES.iter().enumerate() {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = randn(&stored(a_batch, m, k, trans_a), 10 + case as u64);
                let b = randn(&stored(b_batch, k, n, trans_b), 20 + case as u64);
                let p = plan("t", &a, &b, trans_a, trans_b).unwrap();
                let g = randn(&p.out_dims, 30 + case as u64);
                let (ga, gb) = matmul_backward(&a, &b, &g, trans_a, trans_b).unwrap();
                let what = format!("case {case} trans {trans_a} {trans_b}");
                check_grad(&format!("ga {what}"), &a, &g, &ga, |x| {
                    matmul(x, &b, trans_a, trans_b).unwrap()
                });
                check_grad(&format!("gb {what}"), &b, &g, &gb, |y| {
                    matmul(&a, y, trans_a, trans_b).unwrap()
                });
            }
        }
    }

    #[test]
    fn errors_name_op_and_shapes() {
        let err = matmul(&randn(&[2, 3], 1), &randn(&[4, 5], 2), false, false).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("matmul") && err.contains("[2, 3]") && err.contains("[4, 5]"),
            "{err}"
        );
        assert!(matmul(&randn(&[3], 1), &randn(&[3, 2], 2), false, false).is_err());
        assert!(matmul(&randn(&[2, 3, 4], 1), &randn(&[3, 4, 5], 2), false, false).is_err());
        let err = matmul_backward(
            &randn(&[2, 3], 1),
            &randn(&[3, 4], 2),
            &randn(&[2, 5], 3),
            false,
            false,
        );
        assert!(err.unwrap_err().to_string().contains("matmul_backward"));
    }
}
