//! The model's input and loss: the embedding lookup and cross-entropy over ids.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::{self, Var};
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::{cross_entropy, embedding};

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn grad_embedding_weight(
        vocab in 1usize..6,
        d in 1usize..5,
        id_dims in prop::collection::vec(1usize..5, 1..=2),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let weight = randn(&[vocab, d], &mut rng);
        let mut ids = values(&ints(&id_dims, vocab, &mut rng));
        // At least one repeated id whenever there are two, so the scatter-add must accumulate.
        if ids.len() >= 2 {
            let last = ids.len() - 1;
            ids[last] = ids[0];
        }
        let ids = tensor(ids, &id_dims);
        check(|v| autograd::embedding(&v[0], &ids), &[weight], seed)?;
    }

    #[test]
    fn grad_cross_entropy_logits(n in 1usize..6, vocab in 1usize..6, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let logits = Tensor::randn(&[n, vocab], 2.0, &mut rng);
        let targets = ints(&[n], vocab, &mut rng);
        check(|v| v[0].cross_entropy(&targets), &[logits], seed)?;
    }
}

#[test]
fn cross_entropy_matches_naive_log_softmax() {
    let logits = Tensor::randn(&[4, 6], 2.0, &mut Rng::new(9));
    let targets = tensor(vec![0.0, 5.0, 2.0, 2.0], &[4]);
    let (loss, lse) = cross_entropy::cross_entropy(&logits, &targets).unwrap();
    assert_eq!(loss.dims(), &[] as &[usize]);
    assert_eq!(lse.dims(), &[4]);
    let lv = values(&logits);
    let mut total = 0.0f64;
    for (r, row) in lv.chunks(6).enumerate() {
        let lse_r = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((values(&lse)[r] as f64 - lse_r).abs() < 1e-5);
        total += lse_r - row[values(&targets)[r] as usize] as f64;
    }
    assert!((loss.to_scalar().unwrap() as f64 - total / 4.0).abs() < 1e-5);
}

#[test]
fn cross_entropy_rejects_bad_targets_and_shapes() {
    let logits = Tensor::zeros(&[2, 4], Device::Cpu).unwrap();
    let t = |v: Vec<f32>| tensor(v.clone(), &[v.len()]);
    // Out of range: V itself, negative, not an integer, not a number.
    assert_err(cross_entropy::cross_entropy(&logits, &t(vec![1.0, 4.0])), "cross_entropy", &["4"]);
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![-1.0, 0.0])),
        "cross_entropy",
        &["-1"],
    );
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![0.5, 0.0])),
        "cross_entropy",
        &["0.5"],
    );
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![f32::NAN, 0.0])),
        "cross_entropy",
        &[],
    );
    // Targets that do not match the rows, logits of the wrong rank.
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![0.0, 1.0, 2.0])),
        "cross_entropy",
        &["[2, 4]", "[3]"],
    );
    assert_err(
        cross_entropy::cross_entropy(&t(vec![0.0; 4]), &t(vec![0.0])),
        "cross_entropy",
        &["[4]"],
    );
    assert!(Var::param(logits).cross_entropy(&t(vec![7.0, 0.0])).is_err());
}

#[test]
fn embedding_rejects_bad_ids() {
    let weight = Tensor::zeros(&[5, 3], Device::Cpu).unwrap();
    let ids = |v: Vec<f32>| tensor(v.clone(), &[v.len()]);
    assert_err(embedding::embedding(&weight, &ids(vec![0.0, 9.0])), "embedding", &["9"]);
    assert_err(embedding::embedding(&weight, &ids(vec![5.0])), "embedding", &["5"]);
    assert_err(embedding::embedding(&weight, &ids(vec![-1.0])), "embedding", &["-1"]);
    assert_err(embedding::embedding(&weight, &ids(vec![2.5])), "embedding", &["2.5"]);
    assert_err(embedding::embedding(&weight, &ids(vec![f32::INFINITY])), "embedding", &[]);
    // Weight not a matrix.
    assert_err(
        embedding::embedding(&Tensor::zeros(&[5], Device::Cpu).unwrap(), &ids(vec![0.0])),
        "embedding",
        &["[5]"],
    );
    assert!(autograd::embedding(&Var::param(weight), &ids(vec![11.0])).is_err());
}
