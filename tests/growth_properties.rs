//! Exact growth preserves the model (docs/SPEC.md §4, docs/growth.md), checked over random
//! small configs, random token sequences and random growth amounts: logits, loss and the
//! gradients of every old parameter are bit-identical; new value tokens get exactly zero
//! gradient; new key tokens a non-zero one; growing by a then b equals growing by a+b; a saved
//! and reloaded model is bit-identical. Depth growth, for all three Θ and both placements of the
//! new layers: the same identities, and at the first step only the new layers' output values
//! learn.

use proptest::prelude::*;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::models::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use tokenformer::models::growth::{grow_model, GrowSpec, LayerPlacement};
use tokenformer::models::{GrowInit, ModelConfig, Theta, TokenFormer};
use tokenformer::ops::testing::{bits, cases};

#[derive(Debug, Clone)]
struct Case {
    config: ModelConfig,
    seed: u64,
    batch: usize,
    seq: usize,
    grow_a: (usize, usize, usize),
    grow_b: (usize, usize, usize),
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=3,                                                     // layers
        prop::sample::select(vec![(16, 2), (24, 3), (16, 1), (32, 2)]), // (d_model, heads): d_h 8, 8, 16, 16
        prop::sample::select(vec![Theta::L2NormGelu, Theta::GeluL2Norm]),
        (3usize..20, 3usize..20, 5usize..40), // qkv, proj, ffn tokens
        // vocab, seq, batch, seed. Two tokens at least: with one, attention ignores q and k, and
        // the loss does not depend on the query and key layers at all.
        (5usize..40, 2usize..9, 1usize..3, any::<u64>()),
        ((0usize..7, 0usize..7, 0usize..7), (0usize..7, 0usize..7, 1usize..7)),
    )
        .prop_map(
            |(layers, (d, h), norm, (qkv, proj, ffn), (vocab, seq, batch, seed), (a, b))| {
                let mut config = ModelConfig::preset("tiny").unwrap();
                config.n_layers = layers;
                config.d_model = d;
                config.n_heads = h;
                config.norm = norm;
                config.qkv_tokens = qkv;
                config.proj_tokens = proj;
                config.ffn_tokens = ffn;
                config.qkv_scale_tokens = qkv;
                config.proj_scale_tokens = proj;
                config.ffn_scale_tokens = ffn;
                config.vocab_size = vocab;
                config.max_seq_len = 16;
                Case { config, seed, batch, seq, grow_a: a, grow_b: b }
            },
        )
}

fn tokens(case: &Case, salt: u64) -> Tensor {
    let mut rng = Rng::new(case.seed ^ salt);
    let ids: Vec<f32> = (0..case.batch * case.seq)
        .map(|_| rng.below(case.config.vocab_size as u64) as f32)
        .collect();
    Tensor::from_vec(ids, &[case.batch, case.seq]).unwrap()
}

/// Loss and every parameter's gradient, by checkpoint name.
fn loss_and_grads(
    model: &TokenFormer,
    ids: &Tensor,
    targets: &Tensor,
) -> (f32, Vec<(String, Tensor)>) {
    let loss = model.loss(ids, targets).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .named_params()
        .into_iter()
        .map(|(name, p)| {
            let g = grads.get(&p).cloned().unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, g)
        })
        .collect();
    (loss.value().to_scalar().unwrap(), named)
}

fn grow(model: &TokenFormer, (q, p, f): (usize, usize, usize), seed: u64) -> TokenFormer {
    model.grow(q, p, f, GrowInit::Exact, seed).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn exact_growth_preserves_logits_loss_and_old_gradients(case in case()) {
        let model = TokenFormer::init(&case.config, case.seed, Device::Cpu).unwrap();
        let ids = tokens(&case, 1);
        let targets = tokens(&case, 2);
        let grown = grow(&model, case.grow_a, case.seed.wrapping_add(7));

        let logits = model.forward(&ids).unwrap();
        let grown_logits = grown.forward(&ids).unwrap();
        prop_assert_eq!(bits(logits.value()), bits(grown_logits.value()));

        let (loss, grads) = loss_and_grads(&model, &ids, &targets);
        let (grown_loss, grown_grads) = loss_and_grads(&grown, &ids, &targets);
        prop_assert_eq!(loss.to_bits(), grown_loss.to_bits());

        for ((name, g), (grown_name, gg)) in grads.iter().zip(&grown_grads) {
            prop_assert_eq!(name, grown_name);
            let old_rows = g.dims().first().copied().unwrap_or(1);
            let row = g.numel() / old_rows.max(1);
            let gg_values = gg.to_vec().unwrap();
            // The first rows of a grown matrix are the old parameter's.
            let old_part: Vec<u32> = gg_values[..g.numel()].iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(&bits(g), &old_part, "gradient of old part of {}", name);
            let new_part = &gg_values[g.numel()..];
            if name.ends_with("value_param_tokens") {
                prop_assert!(new_part.iter().all(|&x| x == 0.0), "new value tokens of {} got a gradient", name);
            }
            // SPEC §4: new key tokens learn "whenever the loss depends on the layer". It does
            // not when, e.g., both positions of a two-token sequence hold the same id: their
            // values are equal, attention's output ignores the queries, and the query layer's
            // old keys get an exactly zero gradient too. That is the test of dependence used.
            let layer_matters = g.to_vec().unwrap().iter().any(|&x| x != 0.0);
            if name.ends_with("key_param_tokens") && !new_part.is_empty() && layer_matters {
                // Every new key token (row) learns.
                for (r, token) in new_part.chunks(row).enumerate() {
                    prop_assert!(token.iter().any(|&x| x != 0.0), "new key token {} of {} has zero gradient", r, name);
                }
            }
        }
    }

    #[test]
    fn growing_by_a_then_b_equals_growing_by_a_plus_b(case in case()) {
        let model = TokenFormer::init(&case.config, case.seed, Device::Cpu).unwrap();
        let ids = tokens(&case, 3);
        let (a, b) = (case.grow_a, case.grow_b);
        let stepwise = grow(&grow(&model, a, 11), b, 12);
        let at_once = grow(&model, (a.0 + b.0, a.1 + b.1, a.2 + b.2), 13);
        prop_assert_eq!(&stepwise.config, &at_once.config);
        let x = stepwise.forward(&ids).unwrap();
        let y = at_once.forward(&ids).unwrap();
        let z = model.forward(&ids).unwrap();
        prop_assert_eq!(bits(x.value()), bits(y.value()));
        prop_assert_eq!(bits(x.value()), bits(z.value()));
    }

    #[test]
    fn save_then_load_gives_identical_outputs(case in case()) {
        let model = grow(&TokenFormer::init(&case.config, case.seed, Device::Cpu).unwrap(), case.grow_a, 5);
        let dir = std::env::temp_dir().join(format!("tf-growth-save-{}-{}", std::process::id(), case.seed));
        let _ = std::fs::remove_dir_all(&dir);
        save_checkpoint(&dir, &Checkpoint {
            config: model.config.clone(),
            params: model.named_tensors(),
            optimizer: None,
            train_state: None,
        }).unwrap();
        let loaded = load_checkpoint(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        prop_assert_eq!(&loaded.config, &model.config);
        let reloaded = TokenFormer::from_named(loaded.config, loaded.params).unwrap();
        let ids = tokens(&case, 4);
        prop_assert_eq!(bits(model.forward(&ids).unwrap().value()), bits(reloaded.forward(&ids).unwrap().value()));
    }
}

#[test]
fn softmax_growth_is_reported_as_changing_outputs() {
    let mut config = ModelConfig::preset("tiny").unwrap();
    config.norm = Theta::Softmax;
    config.n_layers = 1;
    config.d_model = 16;
    config.n_heads = 2;
    config.qkv_tokens = 5;
    config.qkv_scale_tokens = 5;
    config.vocab_size = 20;
    let model = TokenFormer::init(&config, 0, Device::Cpu).unwrap();
    let spec = GrowSpec { qkv: 3, ..GrowSpec::default() };
    assert!(!spec.preserves_outputs(&config));
    let grown = model.grow(3, 0, 0, GrowInit::Exact, 0).unwrap();
    let ids = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[1, 3]).unwrap();
    assert_ne!(
        bits(model.forward(&ids).unwrap().value()),
        bits(grown.forward(&ids).unwrap().value())
    );
}

#[test]
fn tau_keeps_its_creation_value_through_growth() {
    let config = ModelConfig::preset("tiny").unwrap();
    let model = TokenFormer::init(&config, 0, Device::Cpu).unwrap();
    let grown = model.grow(10, 20, 30, GrowInit::Exact, 0).unwrap();
    assert_eq!(grown.config.qkv_tokens, 138);
    assert_eq!(grown.config.qkv_scale_tokens, 128);
    let (mlp, grown_mlp) =
        (model.layers[0].mlp.pattention().unwrap(), grown.layers[0].mlp.pattention().unwrap());
    assert_eq!(grown_mlp.tau(), mlp.tau());
    assert_eq!(grown_mlp.tokens(), 542);
}

#[derive(Debug, Clone)]
struct DepthCase {
    base: Case,
    spec: GrowSpec,
}

/// Random models of all three Θ grown by 1-4 layers at either position; the L2 variants also
/// grow in width at the same time (softmax cannot, exactly).
fn depth_case() -> impl Strategy<Value = DepthCase> {
    (
        case(),
        prop::sample::select(Theta::ALL.to_vec()),
        1usize..=4,
        prop::sample::select(vec![LayerPlacement::End, LayerPlacement::Interleave]),
        any::<bool>(),
    )
        .prop_map(|(mut base, norm, layers, layer_at, widen)| {
            base.config.norm = norm;
            let (qkv, proj, ffn) =
                if widen && norm != Theta::Softmax { base.grow_a } else { (0, 0, 0) };
            let seed = base.seed.wrapping_add(3);
            let spec = GrowSpec { qkv, proj, ffn, layers, layer_at, seed, ..GrowSpec::default() };
            DepthCase { base, spec }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn depth_growth_preserves_logits_loss_and_old_gradients(case in depth_case()) {
        let DepthCase { base, spec } = &case;
        let model = TokenFormer::init(&base.config, base.seed, Device::Cpu).unwrap();
        prop_assert!(spec.preserves_outputs(&base.config));
        let grown = grow_model(&model, spec).unwrap();
        prop_assert_eq!(grown.model.config.n_layers, base.config.n_layers + spec.layers);
        let ids = tokens(base, 1);
        let targets = tokens(base, 2);
        prop_assert_eq!(
            bits(model.forward(&ids).unwrap().value()),
            bits(grown.model.forward(&ids).unwrap().value())
        );
        let (loss, grads) = loss_and_grads(&model, &ids, &targets);
        let (grown_loss, grown_grads) = loss_and_grads(&grown.model, &ids, &targets);
        prop_assert_eq!(loss.to_bits(), grown_loss.to_bits());

        let old: std::collections::HashMap<String, Tensor> = grads.into_iter().collect();
        for ((name, g), origin) in grown_grads.iter().zip(&grown.origins) {
            let values = g.to_vec().unwrap();
            match origin {
                Some((old_name, _)) => {
                    // An old parameter: its old rows' gradient is unchanged, bit for bit.
                    let want = bits(&old[old_name]);
                    let got: Vec<u32> = values[..want.len()].iter().map(|x| x.to_bits()).collect();
                    prop_assert_eq!(&got, &want, "gradient of {} (was {})", name, old_name);
                }
                None => {
                    // A new layer: at the first step only the value tokens of its output
                    // projection and FFN learn (their gradient is Sᵀ·g, every token non-zero);
                    // everything else sees the zeros those values multiply.
                    let outputs_value = name.ends_with("attention.proj.value_param_tokens")
                        || name.ends_with("mlp.value_param_tokens");
                    if outputs_value {
                        for (r, token) in values.chunks(base.config.d_model).enumerate() {
                            prop_assert!(token.iter().any(|&x| x != 0.0), "token {} of {} got no gradient", r, name);
                        }
                    } else {
                        prop_assert!(values.iter().all(|&x| x == 0.0), "{} got a gradient", name);
                    }
                }
            }
        }
    }
}

#[test]
fn adding_zero_keeps_every_value_but_negative_zero() {
    // The residual add of a new layer is x + y with y an exact zero. IEEE 754: x + (±0) = x for
    // every x except x = −0 with y = +0, which gives +0. docs/growth.md says why that case does
    // not arise in a model (x = −0 needs every term summed into it to be −0) and why it would
    // not change the logits if it did.
    let x = Tensor::from_vec(vec![1.5, -2.0, 0.0, -0.0, f32::MIN_POSITIVE, 1e-45], &[6]).unwrap();
    for zero in [0.0f32, -0.0] {
        let y = Tensor::from_vec(vec![zero; 6], &[6]).unwrap();
        let sum = tokenformer::ops::binary::add(&x, &y).unwrap();
        let (got, want) = (bits(&sum), bits(&x));
        for i in 0..6 {
            if i == 3 && zero.is_sign_positive() {
                assert_eq!(got[i], 0.0f32.to_bits(), "-0 + +0 is +0");
            } else {
                assert_eq!(got[i], want[i], "element {i} + {zero:?}");
            }
        }
    }
}

#[test]
fn layer_placement_spreads_new_layers() {
    let show = |old, new, at: LayerPlacement| -> String {
        at.origins(old, new)
            .iter()
            .map(|o| o.map_or("n".to_string(), |i| i.to_string()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(show(4, 2, LayerPlacement::End), "0 1 2 3 n n");
    assert_eq!(show(4, 2, LayerPlacement::Interleave), "0 1 n 2 3 n");
    assert_eq!(show(4, 4, LayerPlacement::Interleave), "0 n 1 n 2 n 3 n");
    assert_eq!(show(2, 3, LayerPlacement::Interleave), "0 n 1 n n");
    assert_eq!(show(3, 1, LayerPlacement::Interleave), "0 1 2 n");
}

#[test]
fn growing_a_transformer_is_refused() {
    let config = ModelConfig::preset("tiny").unwrap().to_transformer(64);
    let model = TokenFormer::init(&config, 0, Device::Cpu).unwrap();
    let err = grow_model(&model, &GrowSpec { layers: 1, ..GrowSpec::default() }).err().unwrap();
    assert!(err.to_string().contains("transformer has no parameter tokens"), "{err}");
}
