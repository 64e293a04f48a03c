//! LayerNorm, with and without its weight and bias.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::Var;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::layer_norm;

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_layer_norm(
        lead in prop::collection::vec(1usize..4, 0..=2),
        n in 1usize..6,
        has_w in any::<bool>(),
        has_b in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [lead.as_slice(), &[n]].concat();
        let x = spread_rows(&dims, 0.5, &mut rng);
        let w = randn(&[n], &mut rng);
        let b = randn(&[n], &mut rng);
        let mut inputs = vec![x];
        if has_w {
            inputs.push(w);
        }
        if has_b {
            inputs.push(b);
        }
        let op = |v: &[Var]| {
            let w = if has_w { Some(&v[1]) } else { None };
            let b = if has_b { Some(&v[if has_w { 2 } else { 1 }]) } else { None };
            v[0].layer_norm(w, b, 1e-5)
        };
        check(op, &inputs, seed)?;
    }
}

#[test]
fn layer_norm_rejects_bad_weight_bias_and_scalars() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    let x = z(&[2, 3]);
    assert_err(
        layer_norm::layer_norm(&x, Some(&z(&[4])), None, 1e-5),
        "layer_norm",
        &["[2, 3]", "[4]"],
    );
    assert_err(
        layer_norm::layer_norm(&x, None, Some(&z(&[2, 3])), 1e-5),
        "layer_norm",
        &["[2, 3]"],
    );
    assert_err(layer_norm::layer_norm(&Tensor::scalar(1.0), None, None, 1e-5), "layer_norm", &[]);
}
