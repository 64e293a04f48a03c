//! Inputs large enough for the CPU kernels to split them across threads: the same bits as
//! row by row (or slice by slice), and the naive loops' values.

use crate::support::*;
use tokenformer::autograd::ops::Theta;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::testing::{assert_close, naive_matmul, naive_scatter_add, naive_sum};
use tokenformer::ops::{
    attention, binary, cross_entropy, embedding, layer_norm, layout, matmul, pattention_norm,
    reduce, rope, softmax,
};

/// Applies `f` to each row [1, n] of `x` [rows, n] separately (each call small enough to run
/// sequentially) and joins the results.
fn row_by_row(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Vec<u32> {
    let n = x.dims()[1];
    (0..x.dims()[0])
        .flat_map(|r| bits(&f(&layout::narrow(x, 0, r, 1).unwrap().reshape(&[1, n]).unwrap())))
        .collect()
}

#[test]
fn large_row_ops_match_row_by_row_bit_for_bit() {
    // 48 × 1024 = 49152 elements: above the size where the CPU kernels split work over threads.
    let mut rng = Rng::new(21);
    let (rows, n) = (48, 1024);
    let x = Tensor::randn(&[rows, n], 2.0, &mut rng);
    let g = randn(&[rows, n], &mut rng);
    let w = randn(&[n], &mut rng);
    let b = randn(&[n], &mut rng);
    let whole = |t: Tensor| bits(&t);
    let g_row = |r: &Tensor| {
        if r.dims()[0] == rows {
            return g.clone();
        }
        // The matching row of g, found by the row's first value (rows of randn are distinct).
        let first = values(r)[0];
        let xv = values(&x);
        let i = (0..rows).find(|&i| xv[i * n] == first).unwrap();
        layout::narrow(&g, 0, i, 1).unwrap()
    };

    type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, Op<'_>)> = vec![
        ("softmax", Box::new(|t| softmax::softmax(t).unwrap())),
        ("log_softmax", Box::new(|t| softmax::log_softmax(t).unwrap())),
        ("gelu", Box::new(|t| tokenformer::ops::unary::gelu(t).unwrap())),
        ("exp", Box::new(|t| tokenformer::ops::unary::exp(t).unwrap())),
        ("add broadcast row", Box::new(|t| binary::add(t, &w).unwrap())),
        ("sum last axis", Box::new(|t| reduce::sum(t, &[1], true).unwrap())),
        ("max last axis", Box::new(|t| reduce::max(t, 1, true).unwrap())),
        (
            "layer_norm",
            Box::new(|t| layer_norm::layer_norm(t, Some(&w), Some(&b), 1e-5).unwrap().0),
        ),
        (
            "layer_norm backward",
            Box::new(|t| {
                let (_, stats) = layer_norm::layer_norm(t, Some(&w), Some(&b), 1e-5).unwrap();
                layer_norm::layer_norm_backward(t, Some(&w), true, &stats, &g_row(t)).unwrap().0
            }),
        ),
        (
            "softmax backward",
            Box::new(|t| {
                softmax::softmax_backward(&softmax::softmax(t).unwrap(), &g_row(t)).unwrap()
            }),
        ),
        (
            "log_softmax backward",
            Box::new(|t| {
                softmax::log_softmax_backward(&softmax::log_softmax(t).unwrap(), &g_row(t)).unwrap()
            }),
        ),
        (
            "cross_entropy lse",
            Box::new(|t| {
                let r = t.dims()[0];
                cross_entropy::cross_entropy(t, &Tensor::zeros(&[r], Device::Cpu).unwrap())
                    .unwrap()
                    .1
            }),
        ),
    ];
    for (name, f) in &cases {
        assert_eq!(whole(f(&x)), row_by_row(&x, f), "{name}");
    }
    for th in [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax] {
        let fwd = |t: &Tensor| pattention_norm::pattention_norm(t, th, 3.0).unwrap();
        assert_eq!(whole(fwd(&x)), row_by_row(&x, fwd), "pattention_norm {th:?}");
        let bwd =
            |t: &Tensor| pattention_norm::pattention_norm_backward(t, th, 3.0, &g_row(t)).unwrap();
        assert_eq!(whole(bwd(&x)), row_by_row(&x, bwd), "pattention_norm backward {th:?}");
    }
}

#[test]
fn large_slices_match_slice_by_slice() {
    let mut rng = Rng::new(22);
    // causal_softmax and rope over [2, 3, T, ·], each [T, ·] slice alone below the parallel size.
    let scores = randn(&[2, 3, 128, 128], &mut rng);
    let p = softmax::causal_softmax(&scores, 0.125).unwrap();
    let x = randn(&[2, 4, 130, 32], &mut rng);
    let (cos, sin) = rope::rope_tables(130, 16, 10000.0).unwrap();
    let r = rope::rope(&x, &cos, &sin).unwrap();
    let rb = rope::rope_backward(&x, &cos, &sin).unwrap();
    for (whole, input, f) in [
        (
            &p,
            &scores,
            &(|t: &Tensor| softmax::causal_softmax(t, 0.125).unwrap())
                as &dyn Fn(&Tensor) -> Tensor,
        ),
        (&r, &x, &|t: &Tensor| rope::rope(t, &cos, &sin).unwrap()),
        (&rb, &x, &|t: &Tensor| rope::rope_backward(t, &cos, &sin).unwrap()),
    ] {
        let d = input.dims();
        let slices = d[0] * d[1];
        let flat = input.reshape(&[slices, d[2], d[3]]).unwrap();
        let parts: Vec<u32> = (0..slices)
            .flat_map(|s| {
                let slice = layout::narrow(&flat, 0, s, 1).unwrap().reshape(&[d[2], d[3]]).unwrap();
                bits(&f(&slice))
            })
            .collect();
        assert_eq!(bits(whole), parts);
    }
    // Attention per head, to a tolerance (the batched products may group sums differently).
    let dims = [1, 2, 96, 64];
    let (q, k, v) = (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
    let (out, _) = attention::causal_attention(&q, &k, &v).unwrap();
    let (fused, _) = attention::causal_attention_fused(&q, &k, &v).unwrap();
    for h in 0..2 {
        let head = |t: &Tensor| layout::narrow(t, 1, h, 1).unwrap();
        let (oh, _) = attention::causal_attention(&head(&q), &head(&k), &head(&v)).unwrap();
        let want: Vec<f64> = values(&oh).iter().map(|&x| x as f64).collect();
        assert_close(&values(&head(&out)), &want, 1e-5, 1e-5, "attention head");
        // The fused kernel computes each head alone: the same bits per head.
        let (fh, _) = attention::causal_attention_fused(&head(&q), &head(&k), &head(&v)).unwrap();
        assert_eq!(bits(&head(&fused)), bits(&fh), "fused attention head {h}");
    }
}

#[test]
fn large_matmuls_sums_and_scatters_match_naive_loops() {
    let mut rng = Rng::new(23);
    // (a dims, b dims, trans_a, trans_b): plain, transposed, batched, and a shared operand on
    // either side.
    let cases: [(&[usize], &[usize], bool, bool); 5] = [
        (&[300, 64], &[64, 200], false, false),
        (&[64, 300], &[200, 64], true, true),
        (&[4, 64, 70], &[4, 70, 64], false, false),
        (&[4, 100, 64], &[50, 64], false, true),
        (&[64, 100], &[3, 64, 90], true, false),
    ];
    for (a_dims, b_dims, trans_a, trans_b) in cases {
        let (a, b) = (randn(a_dims, &mut rng), randn(b_dims, &mut rng));
        let got = matmul::matmul(&a, &b, trans_a, trans_b).unwrap();
        let (want, _) = naive_matmul(&a, &b, trans_a, trans_b);
        let what = format!("matmul {a_dims:?} {b_dims:?} {trans_a} {trans_b}");
        assert_close(&values(&got), &want, 1e-4, 1e-4, &what);
    }

    // Sums over a middle axis, where each task owns a block of columns.
    let x = randn(&[3, 40, 700], &mut rng);
    let s = values(&reduce::sum(&x, &[1], false).unwrap());
    assert_close(&s, &naive_sum(&x, &[1]), 1e-5, 1e-5, "sum over axis 1");

    // Scatter-add of many repeated ids.
    let (vocab, d, count) = (50, 64, 1000);
    let ids = ints(&[count], vocab, &mut rng);
    let g = randn(&[count, d], &mut rng);
    let gw = values(&embedding::embedding_backward(&ids, &g, vocab).unwrap());
    assert_close(&gw, &naive_scatter_add(&ids, &g, vocab), 1e-5, 1e-5, "embedding_backward");
}
