//! Exact growth preserves the model (docs/SPEC.md §4, docs/growth.md), checked over random
//! small configs, random token sequences and random growth amounts: logits, loss and the
//! gradients of every old parameter are bit-identical; new value tokens get exactly zero
//! gradient; new key tokens a non-zero one; growing by a then b equals growing by a+b; a saved
//! and reloaded model is bit-identical. Depth growth, for all three Θ and both placements of the
//! new layers: the same identities, and at the first step only the new layers' output values
//! learn.
//!
//! What equivalence cannot see, checked against values from outside the grown model: the AdamW
//! moments growth hands on and the training step that follows, the distributions new tokens and
//! layers are drawn from, and every option of a growth spec reaching the grown model.

use proptest::prelude::*;
use std::collections::BTreeMap;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::models::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use tokenformer::models::config::TokenGroup;
use tokenformer::models::growth::{grow_model, GrowSpec, GrowthTarget, LayerPlacement, TauRule};
use tokenformer::models::optim::Optimizer;
use tokenformer::models::{GrowInit, ModelConfig, Theta, TokenFormer};
use tokenformer::ops::adamw::AdamW;
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
    assert!((grown_mlp.tau() - 22.627_417).abs() < 2e-6, "τ = √512 = 16·√2, not √542");
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
    // No old layer to follow: every layer is new, wherever they are placed.
    assert_eq!(show(0, 2, LayerPlacement::Interleave), "n n");
    assert_eq!(show(0, 2, LayerPlacement::End), "n n");
    assert_eq!(show(3, 0, LayerPlacement::Interleave), "0 1 2");
}

#[test]
fn growing_a_transformer_is_refused() {
    let config = ModelConfig::preset("tiny").unwrap().to_transformer(64);
    let model = TokenFormer::init(&config, 0, Device::Cpu).unwrap();
    let err = grow_model(&model, &GrowSpec { layers: 1, ..GrowSpec::default() }).err().unwrap();
    assert!(err.to_string().contains("transformer has no parameter tokens"), "{err}");
    // A growth schedule is refused when it is resolved, before training starts, not at its
    // step; in both of its forms.
    for text in ["qkv=+8,layers=+1", "preset=small"] {
        let target: GrowthTarget = text.parse().unwrap();
        let err = target.resolve(&config, 0).unwrap_err();
        assert!(err.to_string().contains("transformer has no parameter tokens"), "{text}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The optimizer state of a grown model (SPEC §4, rule 5): exact growth keeps every old row's
// AdamW moments and starts new rows and new layers at zero; random growth restarts the
// optimizer. `Grown::old_rows` says which rows are old, which `--freeze-old` keeps fixed.

const HP: AdamW = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

/// One unclipped AdamW step on the loss of `ids` against `targets`.
fn train_step(model: &mut TokenFormer, optimizer: &mut Optimizer, ids: &Tensor, targets: &Tensor) {
    let (_, grads) = loss_and_grads(model, ids, targets);
    let grads: Vec<Tensor> = grads.into_iter().map(|(_, g)| g).collect();
    optimizer.update(model, &grads, HP.lr).unwrap();
}

/// A model trained for a few steps, so that its moments are not zero, and an exact growth of
/// it: in width (the L2 variants of Θ, the ones that grow exactly), in depth at either place
/// (every Θ), or both.
#[derive(Debug, Clone)]
struct TrainedCase {
    base: Case,
    steps: usize,
    spec: GrowSpec,
}

fn trained_case() -> impl Strategy<Value = TrainedCase> {
    (
        case(),
        prop::sample::select(Theta::ALL.to_vec()),
        0usize..=3,
        prop::sample::select(vec![LayerPlacement::End, LayerPlacement::Interleave]),
        any::<bool>(),
        1usize..=3,
    )
        .prop_map(|(mut base, norm, layers, layer_at, widen, steps)| {
            base.config.norm = norm;
            let widen = norm != Theta::Softmax && (widen || layers == 0);
            let layers = if widen { layers } else { layers.max(1) };
            let (qkv, proj, ffn) = if widen { base.grow_b } else { (0, 0, 0) };
            let seed = base.seed.wrapping_add(5);
            let spec = GrowSpec { qkv, proj, ffn, layers, layer_at, seed, ..GrowSpec::default() };
            TrainedCase { base, steps, spec }
        })
}

/// For each parameter of the model `spec` grows from one of `old_layers` layers: the name it
/// had before the growth, or `None` for a parameter of a new layer. Worked out from the names
/// and [`LayerPlacement::origins`], independently of `grow_model`'s own bookkeeping.
fn name_before_growth(name: &str, spec: &GrowSpec, old_layers: usize) -> Option<String> {
    let Some(rest) = name.strip_prefix("layers.") else { return Some(name.to_string()) };
    let (index, leaf) = rest.split_once('.').unwrap();
    let origins = spec.layer_at.origins(old_layers, spec.layers);
    origins[index.parse::<usize>().unwrap()].map(|old| format!("layers.{old}.{leaf}"))
}

/// The moment `before` (one of m or v of the model before growth), as it should be for each
/// parameter of `grown` after exact growth: the old values, then +0.0 for every new row; +0.0
/// everywhere in a new layer. Built element by element, as a model built at the larger size
/// would be given them.
fn carried_by_hand(
    grown: &TokenFormer,
    before: &BTreeMap<String, Tensor>,
    spec: &GrowSpec,
    old_layers: usize,
) -> Vec<(String, Tensor)> {
    grown
        .named_params()
        .into_iter()
        .map(|(name, p)| {
            let mut values = match name_before_growth(&name, spec, old_layers) {
                Some(old) => before[&old].to_vec().unwrap(),
                None => Vec::new(),
            };
            values.resize(p.value().numel(), 0.0);
            (name, Tensor::from_vec(values, p.dims()).unwrap())
        })
        .collect()
}

fn bits_of_all(named: &[(String, Tensor)]) -> Vec<(String, Vec<u32>)> {
    named.iter().map(|(n, t)| (n.clone(), bits(t))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn growth_carries_the_optimizer_state_and_the_next_step(case in trained_case()) {
        let TrainedCase { base, steps, spec } = &case;
        let old_layers = base.config.n_layers;
        let mut model = TokenFormer::init(&base.config, base.seed, Device::Cpu).unwrap();
        let mut optimizer = Optimizer::new(&model, HP).unwrap();
        for s in 0..*steps as u64 {
            train_step(&mut model, &mut optimizer, &tokens(base, 10 + s), &tokens(base, 20 + s));
        }
        let (m, v) = optimizer.named_moments(&model);
        let old_m: BTreeMap<String, Tensor> = m.iter().cloned().collect();
        let old_v: BTreeMap<String, Tensor> = v.iter().cloned().collect();
        prop_assert!(old_m.values().any(|t| t.to_vec().unwrap().iter().any(|&x| x != 0.0)));

        let grown = grow_model(&model, spec).unwrap();
        let (grown_m, grown_v) =
            (grown.moments(m.clone(), GrowInit::Exact).unwrap(), grown.moments(v.clone(), GrowInit::Exact).unwrap());
        // Old rows bit-identical, new rows and new layers +0.0 (bits 0), one moment per
        // parameter of the grown model, in its order and with its shape.
        let want_m = carried_by_hand(&grown.model, &old_m, spec, old_layers);
        let want_v = carried_by_hand(&grown.model, &old_v, spec, old_layers);
        prop_assert_eq!(bits_of_all(&grown_m), bits_of_all(&want_m));
        prop_assert_eq!(bits_of_all(&grown_v), bits_of_all(&want_v));

        // What `--freeze-old` keeps: every row of an old parameter that existed before, none
        // of a new layer's.
        let before: BTreeMap<String, usize> =
            model.named_params().into_iter().map(|(n, p)| (n, p.dims()[0])).collect();
        let want_old_rows: BTreeMap<String, usize> = grown
            .model
            .named_params()
            .into_iter()
            .map(|(name, _)| {
                let rows = name_before_growth(&name, spec, old_layers).map_or(0, |old| before[&old]);
                (name, rows)
            })
            .collect();
        prop_assert_eq!(grown.old_rows(), want_old_rows.clone());

        // Random growth restarts the optimizer: every moment +0.0, with the grown shapes; the
        // old rows are the same.
        let random = grow_model(&model, &GrowSpec { init: GrowInit::Random, ..spec.clone() }).unwrap();
        let restarted = random.moments(m.clone(), GrowInit::Random).unwrap();
        prop_assert_eq!(restarted.len(), random.model.named_params().len());
        for ((name, t), (param_name, p)) in restarted.iter().zip(random.model.named_params()) {
            prop_assert_eq!(name, &param_name);
            prop_assert_eq!(t.dims(), p.dims());
            prop_assert!(bits(t).iter().all(|&b| b == 0), "moment of {} not restarted", name);
        }
        prop_assert_eq!(random.old_rows(), want_old_rows);

        // The next step, taken three ways. (1) The grown model with its carried moments.
        let (ids, targets) = (tokens(base, 30), tokens(base, 31));
        let mut built = TokenFormer::from_named(grown.model.config.clone(), grown.model.named_tensors()).unwrap();
        let mut after = grown.model;
        let mut after_opt = Optimizer::from_named(&after, HP, optimizer.step, grown_m, grown_v).unwrap();
        train_step(&mut after, &mut after_opt, &ids, &targets);
        // (2) A model built at the larger size from the same parameters, given the moments
        // written by hand: the same step, bit for bit.
        let mut built_opt = Optimizer::from_named(&built, HP, optimizer.step, want_m, want_v).unwrap();
        train_step(&mut built, &mut built_opt, &ids, &targets);
        prop_assert_eq!(bits_of_all(&after.named_tensors()), bits_of_all(&built.named_tensors()));
        let (after_m, after_v) = after_opt.named_moments(&after);
        let (built_m, built_v) = built_opt.named_moments(&built);
        prop_assert_eq!(bits_of_all(&after_m), bits_of_all(&built_m));
        prop_assert_eq!(bits_of_all(&after_v), bits_of_all(&built_v));
        // (3) The model before growth takes the same step: the old rows of the grown one moved
        // exactly as it did (same gradients, same moments, and AdamW works element by element).
        train_step(&mut model, &mut optimizer, &ids, &targets);
        let small: BTreeMap<String, Tensor> = model.named_tensors().into_iter().collect();
        let (small_m, _) = optimizer.named_moments(&model);
        let small_m: BTreeMap<String, Tensor> = small_m.into_iter().collect();
        for ((name, p), (_, mt)) in after.named_tensors().iter().zip(&after_m) {
            if let Some(old) = name_before_growth(name, spec, old_layers) {
                for (grown_t, small_t, what) in [(p, &small[&old], "parameter"), (mt, &small_m[&old], "m")] {
                    let want = bits(small_t);
                    prop_assert_eq!(&bits(grown_t)[..want.len()], &want[..], "{} {} (was {})", what, name, old);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What growth draws. Exact: new keys exactly zero, new values from the value init N(0, σ²) with
// σ = 2/(L·√d) of the model being grown; a new layer is drawn as the grown config's init would
// draw it, except that its output values (attention output and FFN) are zero. Random: new keys
// from N(0, 0.02²) too, and a new layer entirely from the init (SPEC §2 and §4).

/// Mean and standard deviation of `xs`, in f64.
fn mean_and_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn growth_draws_new_tokens_and_layers_from_the_stated_distributions() {
    let mut config = ModelConfig::preset("tiny").unwrap();
    (config.n_layers, config.d_model, config.n_heads, config.vocab_size) = (2, 32, 2, 50);
    (config.qkv_tokens, config.proj_tokens, config.ffn_tokens) = (8, 8, 16);
    (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens) = (8, 8, 16);
    let model = TokenFormer::init(&config, 1, Device::Cpu).unwrap();
    let d = config.d_model as f64;
    let key_std = 0.02;
    let old_value_std = 2.0 / (2.0 * d.sqrt()); // L = 2, the model being grown
    let new_layer_value_std = 2.0 / (3.0 * d.sqrt()); // L = 3, the grown config

    for init in [GrowInit::Exact, GrowInit::Random] {
        let spec = GrowSpec {
            qkv: 64,
            proj: 64,
            ffn: 128,
            layers: 1,
            init,
            seed: 9,
            ..GrowSpec::default()
        };
        let grown = grow_model(&model, &spec).unwrap();
        // The new entries, by what they should be drawn from (None: exactly zero).
        let mut drawn: BTreeMap<String, (Option<f64>, Vec<f32>)> = BTreeMap::new();
        for ((name, p), origin) in grown.model.named_params().into_iter().zip(&grown.origins) {
            let values = p.value().to_vec().unwrap();
            let is_key = name.ends_with("key_param_tokens");
            let writes_residual = name.ends_with("attention.proj.value_param_tokens")
                || name.ends_with("mlp.value_param_tokens");
            let (what, std, new) = match origin {
                Some((_, rows)) if is_key || name.ends_with("value_param_tokens") => {
                    let new = &values[rows * config.d_model..];
                    match (is_key, init) {
                        (true, GrowInit::Exact) => ("new keys", None, new),
                        (true, GrowInit::Random) => ("new keys", Some(key_std), new),
                        (false, _) => ("new values", Some(old_value_std), new),
                    }
                }
                Some(_) => continue,
                None if is_key => ("new layer's keys", Some(key_std), &values[..]),
                None if writes_residual && init == GrowInit::Exact => {
                    ("new layer's output values", None, &values[..])
                }
                None => ("new layer's values", Some(new_layer_value_std), &values[..]),
            };
            let entry = drawn.entry(what.to_string()).or_insert((std, Vec::new()));
            entry.1.extend_from_slice(new);
            // Each new token (a row of width d) is drawn, not left at zero.
            if std.is_some() {
                for (r, token) in new.chunks(config.d_model).enumerate() {
                    assert!(
                        token.iter().any(|&x| x != 0.0),
                        "{init:?}: token {r} of {name} is zero"
                    );
                }
            }
        }
        assert_eq!(
            drawn.len(),
            if init == GrowInit::Exact { 5 } else { 4 },
            "{init:?}: {:?}",
            drawn.keys()
        );
        for (what, (std, xs)) in &drawn {
            match std {
                None => assert!(bits_are_zero(xs), "{init:?}: {what} are not all +0.0"),
                Some(std) => {
                    // A fixed seed, so this is deterministic; the bounds are 6 standard errors
                    // of the estimates, far from the other distributions' σ.
                    let (mean, sample_std) = mean_and_std(xs);
                    let n = xs.len() as f64;
                    assert!(mean.abs() < 6.0 * std / n.sqrt(), "{init:?}: {what}: mean {mean}");
                    let rel = (sample_std / std - 1.0).abs();
                    assert!(
                        rel < 6.0 / (2.0 * n).sqrt(),
                        "{init:?}: {what}: std {sample_std}, want {std} (n = {n})"
                    );
                }
            }
        }
    }
}

fn bits_are_zero(xs: &[f32]) -> bool {
    xs.iter().all(|x| x.to_bits() == 0)
}

// ---------------------------------------------------------------------------------------------
// Every option of a growth spec reaches the growth: `GrowSpec::to_preset` (grow --to-preset)
// and `GrowthTarget::resolve` (a schedule's `preset=NAME` or amounts, with `layer-at=`,
// `init=` and `tau=`) give the spec written by hand, and the grown model shows its placement,
// its init, its τ and its seed.

#[derive(Debug, Clone)]
struct OptionsCase {
    from: ModelConfig,
    layer_at: LayerPlacement,
    init: GrowInit,
    /// τ in a schedule (`GrowSpec::to_preset` always keeps it frozen).
    tau: TauRule,
    seed: u64,
    /// How the schedule writes it: 0 `preset=tiny`; otherwise amounts, `+N` for the keys whose
    /// bit is set in the mask, `N` for the others.
    form: (bool, u8),
    /// Whether defaults (`layer-at=end`, `init=exact`, `tau=frozen`) are written out too.
    explicit: bool,
}

fn options_case() -> impl Strategy<Value = OptionsCase> {
    (
        (1usize..=3, 1usize..=128, 1usize..=128, 1usize..=512),
        // n₀ of each group as a fraction of its count: below 1 for a model grown before with τ
        // frozen.
        [0.25f64..=1.0, 0.25f64..=1.0, 0.25f64..=1.0],
        prop::sample::select(vec![LayerPlacement::End, LayerPlacement::Interleave]),
        prop::sample::select(vec![GrowInit::Exact, GrowInit::Random]),
        prop::sample::select(vec![TauRule::Frozen, TauRule::Current]),
        any::<u64>(),
        (any::<bool>(), 0u8..16),
        any::<bool>(),
    )
        .prop_map(
            |((layers, qkv, proj, ffn), n0, layer_at, init, tau, seed, form, explicit)| {
                let mut from = ModelConfig::preset("tiny").unwrap();
                from.n_layers = layers;
                (from.qkv_tokens, from.proj_tokens, from.ffn_tokens) = (qkv, proj, ffn);
                let part = |n: usize, f: f64| ((n as f64 * f).round() as usize).clamp(1, n);
                (from.qkv_scale_tokens, from.proj_scale_tokens, from.ffn_scale_tokens) =
                    (part(qkv, n0[0]), part(proj, n0[1]), part(ffn, n0[2]));
                OptionsCase { from, layer_at, init, tau, seed, form, explicit }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_option_of_a_growth_spec_reaches_the_grown_model(case in options_case()) {
        let OptionsCase { from, layer_at, init, tau, seed, form: (as_preset, plus_mask), explicit } = &case;
        let (layer_at, init, tau, seed) = (*layer_at, *init, *tau, *seed);
        let to = ModelConfig::preset("tiny").unwrap();
        let want = GrowSpec {
            qkv: to.qkv_tokens - from.qkv_tokens,
            proj: to.proj_tokens - from.proj_tokens,
            ffn: to.ffn_tokens - from.ffn_tokens,
            layers: to.n_layers - from.n_layers,
            layer_at,
            init,
            seed,
            tau: TauRule::Frozen,
        };
        prop_assert_eq!(GrowSpec::to_preset(from, "tiny", layer_at, init, seed).unwrap(), want.clone());
        let want = GrowSpec { tau, ..want };

        let mut parts = if *as_preset {
            vec!["preset=tiny".to_string()]
        } else {
            [("qkv", from.qkv_tokens, to.qkv_tokens), ("proj", from.proj_tokens, to.proj_tokens),
             ("ffn", from.ffn_tokens, to.ffn_tokens), ("layers", from.n_layers, to.n_layers)]
                .iter()
                .enumerate()
                .map(|(i, (key, a, b))| {
                    if plus_mask & (1 << i) != 0 { format!("{key}=+{}", b - a) } else { format!("{key}={b}") }
                })
                .collect()
        };
        if *explicit || layer_at != LayerPlacement::End {
            parts.push(format!("layer-at={}", layer_at.name()));
        }
        if *explicit || init != GrowInit::Exact {
            parts.push(format!("init={}", init.name()));
        }
        if *explicit || tau != TauRule::Frozen {
            parts.push(format!("tau={}", tau.name()));
        }
        let text = parts.join(",");
        let target: GrowthTarget = text.parse().unwrap();
        prop_assert_eq!(target.resolve(from, seed).unwrap(), want.clone(), "{}", text);

        // The grown model: its new layers where `layer_at` puts them, its new keys zero exactly
        // when the init is exact, and its draws those of the seed.
        let model = TokenFormer::init(from, seed ^ 1, Device::Cpu).unwrap();
        let grown = grow_model(&model, &target.resolve(from, seed).unwrap()).unwrap();
        let new_layers: Vec<bool> = grown.model.named_params().iter().zip(&grown.origins)
            .filter(|((name, _), _)| name.ends_with("attention.query.key_param_tokens"))
            .map(|(_, origin)| origin.is_none())
            .collect();
        let want_new: Vec<bool> = layer_at.origins(from.n_layers, want.layers).iter().map(Option::is_none).collect();
        prop_assert_eq!(new_layers, want_new);
        let query = grown.model.layers[0].query.pattention().unwrap().key_tokens.value().to_vec().unwrap();
        let new_keys = &query[from.qkv_tokens * from.d_model..];
        prop_assert_eq!(bits_are_zero(new_keys), init == GrowInit::Exact || new_keys.is_empty());
        // τ = √n₀: n₀ stays the base's count, or becomes the grown count under `tau=current`.
        let n0 = if tau == TauRule::Current { to.qkv_tokens } else { from.qkv_scale_tokens };
        prop_assert_eq!(grown.model.config.qkv_scale_tokens, n0);
        // What the spec says of its growth (the CLI reports it): τ changes exactly when some
        // group's n₀ does, and the outputs are kept exactly when the logits keep their bits.
        let tau_changed = TokenGroup::ALL
            .iter()
            .any(|group| group.counts(from).1 != group.counts(&grown.model.config).1);
        prop_assert_eq!(want.changes_tau(from), tau_changed);
        let ids = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[1, 3]).unwrap();
        let same_logits = bits(model.forward(&ids).unwrap().value())
            == bits(grown.model.forward(&ids).unwrap().value());
        prop_assert_eq!(want.preserves_outputs(from), same_logits, "{}", text);
        // The optimizer state the grown run starts from: every old moment kept under exact
        // growth with τ frozen; all of them restarted at zero under random growth or the
        // official recipe (τ current).
        let ones: Vec<(String, Tensor)> = model
            .named_tensors()
            .into_iter()
            .map(|(name, t)| (name, Tensor::full(t.dims(), 1.0, Device::Cpu).unwrap()))
            .collect();
        let moments = grown.moments(ones, want.moments_rule()).unwrap();
        let kept = moments.iter().any(|(_, m)| m.to_vec().unwrap().contains(&1.0));
        prop_assert_eq!(kept, init == GrowInit::Exact && tau == TauRule::Frozen, "{}", text);
        prop_assert_eq!(target.to_string().contains("tau=current"), tau == TauRule::Current);
        prop_assert_eq!(target.to_string().parse::<GrowthTarget>().unwrap(), target.clone());
        let reseeded = grow_model(&model, &GrowSpec { seed: seed ^ 2, ..want }).unwrap();
        prop_assert_ne!(bits_of_all(&grown.model.named_tensors()), bits_of_all(&reseeded.model.named_tensors()));
    }
}
