//! Causal attention, plain and fused, and the rotary position embedding.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::testing::assert_close;
use tokenformer::ops::{attention, rope};

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_rope(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..6,
        extra_rows in 0usize..3,
        head_dim in 1usize..8,
        mode in 0u8..3,
        base in prop::sample::select(vec![10.0f64, 100.0, 10000.0]),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        // Mode 0: no rotation; mode 1: the full (even) head dim; mode 2: any even prefix.
        let (head_dim, rotary) = match mode {
            0 => (head_dim, 0),
            1 => (head_dim + head_dim % 2, head_dim + head_dim % 2),
            _ => (head_dim, 2 * rng.below(head_dim as u64 / 2 + 1) as usize),
        };
        let (cos, sin) = rope::rope_tables(t + extra_rows, rotary, base).unwrap();
        let dims = [lead.as_slice(), &[t, head_dim]].concat();
        let x = randn(&dims, &mut rng);
        check(|v| v[0].rope(&cos, &sin), &[x], seed)?;
    }

    #[test]
    fn grad_causal_attention(
        (b, h, t, dh) in (1usize..3, 1usize..3, 1usize..6, 1usize..5),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [b, h, t, dh];
        let (q, k, v) = (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
        let inputs = [q, k, v];
        check(|x| autograd::causal_attention_fused(&x[0], &x[1], &x[2]), &inputs, seed)?;
        check(|x| autograd::causal_attention_plain(&x[0], &x[1], &x[2]), &inputs, seed)?;
    }

    /// The fused kernel's tiles (64 query rows and 128 keys on the CPU) matter past one tile.
    #[test]
    fn grad_causal_attention_fused_across_tiles(t in 60usize..140, dh in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let dims = [1, 1, t, dh];
        let inputs = [randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng)];
        check(|x| autograd::causal_attention_fused(&x[0], &x[1], &x[2]), &inputs, seed)?;
    }

    /// Fused attention against the plain composition on random shapes (T up to past two CPU
    /// tiles, odd head dims), forward and all three gradients, within 1e-4·(1 + |plain|): they
    /// differ only in the order of their sums and in the exp.
    #[test]
    fn fused_attention_matches_plain(
        (b, h, t, dh) in (1usize..3, 1usize..3, 1usize..150, 1usize..40),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [b, h, t, dh];
        let (q, k, v, g) =
            (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
        let (out, lse) = attention::causal_attention_fused(&q, &k, &v).unwrap();
        let (plain, probs) = attention::causal_attention(&q, &k, &v).unwrap();
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            let want: Vec<f64> = values(want).iter().map(|&x| x as f64).collect();
            assert_close(&values(got), &want, 1e-4, 1e-4, &format!("{what} {dims:?}"));
        };
        close(&out, &plain, "out");
        let fused = attention::causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
        let reference = attention::causal_attention_backward(&q, &k, &v, &probs, &g).unwrap();
        close(&fused.0, &reference.0, "gq");
        close(&fused.1, &reference.1, "gk");
        close(&fused.2, &reference.2, "gv");
    }
}

#[test]
fn rope_with_zero_rotary_dims_is_the_identity() {
    let x = randn(&[2, 3, 4], &mut Rng::new(5));
    let (cos, sin) = rope::rope_tables(3, 0, 10000.0).unwrap();
    assert_eq!(bits(&rope::rope(&x, &cos, &sin).unwrap()), bits(&x));
}

#[test]
fn attention_and_rope_reject_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    let q = z(&[1, 2, 3, 4]);
    assert_err(
        attention::causal_attention(&q, &z(&[1, 2, 3, 5]), &q),
        "attention",
        &["[1, 2, 3, 4]", "[1, 2, 3, 5]"],
    );
    assert_err(
        attention::causal_attention(&z(&[2, 3, 4]), &z(&[2, 3, 4]), &z(&[2, 3, 4])),
        "attention",
        &["[2, 3, 4]"],
    );
    assert_err(
        attention::causal_attention_fused(&q, &q, &z(&[1, 2, 4, 4])),
        "causal_attention_fused",
        &["[1, 2, 3, 4]", "[1, 2, 4, 4]"],
    );
    assert_err(
        attention::causal_attention_fused_backward(&q, &q, &q, &q, &z(&[1, 2]), &q),
        "causal_attention_fused_backward",
        &["[1, 2]"],
    );

    let (cos, sin) = rope::rope_tables(4, 4, 10000.0).unwrap();
    // Fewer head dims than rotary dims; more positions than the tables hold.
    assert_err(rope::rope(&z(&[4, 2]), &cos, &sin), "rope", &["[4, 2]"]);
    assert_err(rope::rope(&z(&[5, 4]), &cos, &sin), "rope", &["[5, 4]"]);
    assert!(rope::rope_tables(4, 3, 10000.0).is_err(), "odd rotary dims must be rejected");
}
