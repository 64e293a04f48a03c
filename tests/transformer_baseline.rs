//! The Transformer baseline is the TokenFormer decoder with linear projections: over random
//! small configs, a model of either architecture computes the same logits, loss and gradients
//! when its layers are swapped for the other's (so embedding, RoPE, attention, norms and head
//! are shared code, and only the projections differ); parameter counts and FLOPs per token
//! agree with a count by hand; checkpoints record `arch`.

use proptest::prelude::*;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::models::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use tokenformer::models::{Arch, ModelConfig, Theta, TokenFormer};
use tokenformer::ops::testing::{bits, cases};

#[derive(Debug, Clone)]
struct Case {
    tokenformer: ModelConfig,
    d_ff: usize,
    seed: u64,
    batch: usize,
    seq: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=3,
        prop::sample::select(vec![(16, 2), (24, 3), (16, 1), (32, 4)]),
        prop::sample::select(Theta::ALL.to_vec()),
        (3usize..12, 3usize..12, 5usize..24, 1usize..40),
        (5usize..30, 2usize..9, 1usize..3, any::<u64>()),
    )
        .prop_map(
            |(layers, (d, h), norm, (qkv, proj, ffn, d_ff), (vocab, seq, batch, seed))| {
                let mut config = ModelConfig::preset("tiny").unwrap();
                config.n_layers = layers;
                config.d_model = d;
                config.n_heads = h;
                config.norm = norm;
                (config.qkv_tokens, config.proj_tokens, config.ffn_tokens) = (qkv, proj, ffn);
                (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens) =
                    (qkv, proj, ffn);
                config.vocab_size = vocab;
                config.max_seq_len = 12;
                Case { tokenformer: config, d_ff, seed, batch, seq }
            },
        )
}

fn ids(case: &Case, salt: u64) -> Tensor {
    let mut rng = Rng::new(case.seed ^ salt);
    let vocab = case.tokenformer.vocab_size as u64;
    let ids = (0..case.batch * case.seq).map(|_| rng.below(vocab) as f32).collect();
    Tensor::from_vec(ids, &[case.batch, case.seq]).unwrap()
}

/// Logits, loss and every gradient (in checkpoint order) of `model`.
fn outputs(model: &TokenFormer, ids: &Tensor, targets: &Tensor) -> (Vec<u32>, u32, Vec<Vec<u32>>) {
    let logits = bits(model.forward(ids).unwrap().value());
    let loss = model.loss(ids, targets).unwrap();
    let grads = loss.backward().unwrap();
    let grads = model
        .params()
        .into_iter()
        .map(|p| bits(grads.get(p).expect("every parameter gets a gradient")))
        .collect();
    (logits, loss.value().to_scalar().unwrap().to_bits(), grads)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn both_archs_share_every_op_but_the_projections(case in case()) {
        let transformer_config = case.tokenformer.to_transformer(case.d_ff);
        let tokenformer = TokenFormer::init(&case.tokenformer, case.seed, Device::Cpu).unwrap();
        let transformer = TokenFormer::init(&transformer_config, case.seed ^ 1, Device::Cpu).unwrap();
        let (x, y) = (ids(&case, 2), ids(&case, 3));
        let want_tokenformer = outputs(&tokenformer, &x, &y);
        let want_transformer = outputs(&transformer, &x, &y);

        // Each model with the other's layers, its own embedding and final norm swapped too:
        // the arch in the config must make no difference to anything outside the projections.
        let swap = |base: TokenFormer, other: TokenFormer| {
            let mut model = base;
            model.layers = other.layers;
            model.embed = other.embed;
            model.final_norm_weight = other.final_norm_weight;
            model.final_norm_bias = other.final_norm_bias;
            model
        };
        let tokenformer_again = TokenFormer::init(&case.tokenformer, case.seed, Device::Cpu).unwrap();
        let transformer_again = TokenFormer::init(&transformer_config, case.seed ^ 1, Device::Cpu).unwrap();
        let tokenformer_with_linear = swap(tokenformer_again, transformer);
        let transformer_with_tokens = swap(transformer_again, tokenformer);
        prop_assert_eq!(tokenformer_with_linear.config.arch, Arch::TokenFormer);
        prop_assert!(outputs(&tokenformer_with_linear, &x, &y) == want_transformer);
        prop_assert!(outputs(&transformer_with_tokens, &x, &y) == want_tokenformer);
    }

    #[test]
    fn parameter_counts_are_the_tensors_sizes(case in case()) {
        for config in [case.tokenformer.clone(), case.tokenformer.to_transformer(case.d_ff)] {
            let model = TokenFormer::init(&config, case.seed, Device::Cpu).unwrap();
            let total: usize = model.named_params().iter().map(|(_, p)| p.value().numel()).sum();
            prop_assert_eq!(total, config.param_count());
        }
    }
}

#[test]
fn flops_per_token_match_a_hand_count() {
    // A TokenFormer with L = 2, d = 8, V = 10, n_qkv = 3, n_proj = 4, n_ffn = 5, at T = 6.
    let mut config = ModelConfig::preset("tiny").unwrap();
    (config.n_layers, config.d_model, config.n_heads, config.vocab_size) = (2, 8, 2, 10);
    (config.qkv_tokens, config.proj_tokens, config.ffn_tokens) = (3, 4, 5);
    // Per token and layer, each Pattention of n tokens multiplies x (8) by Kᵀ (8×n) and the n
    // scores by V (n×8): 2·8·n multiply-adds forward, twice that backward, 2 FLOPs each.
    let pattention = |n: f64| 3.0 * 2.0 * (2.0 * 8.0 * n);
    let per_layer = 3.0 * pattention(3.0) + pattention(4.0) + pattention(5.0);
    // Attention per head: q·kᵀ over T keys and p·v over T values, d_h each: 2·T·d per token
    // forward over all heads, ×3 for training, ×2 FLOPs per multiply-add: 12·d·T.
    let attention = 12.0 * 8.0 * 6.0;
    let head = 3.0 * 2.0 * (10.0 * 8.0); // the tied logits, 8 → 10
    let want = 2.0 * (per_layer + attention) + head;
    assert_eq!(config.train_flops_per_token(6), want);
    assert_eq!(config.train_flops_per_token(6), 6.0 * 656.0 + 12.0 * 2.0 * 8.0 * 6.0);

    // The Transformer of the same shape with d_ff = 7: four 8×8 matmuls and 8→7→8.
    let transformer = config.to_transformer(7);
    let linear = |i: f64, o: f64| 3.0 * 2.0 * i * o;
    let per_layer = 4.0 * linear(8.0, 8.0) + linear(8.0, 7.0) + linear(7.0, 8.0);
    assert_eq!(transformer.train_flops_per_token(6), 2.0 * (per_layer + attention) + head);
}

#[test]
fn matching_transformer_has_the_nearest_parameter_count() {
    for name in ["tiny", "150M", "owt-354M"] {
        let tokenformer = ModelConfig::preset(name).unwrap();
        let matched = tokenformer.matching_transformer();
        assert_eq!(matched.arch, Arch::Transformer);
        assert_eq!(
            (matched.n_layers, matched.d_model, matched.vocab_size),
            (tokenformer.n_layers, tokenformer.d_model, tokenformer.vocab_size)
        );
        let gap = |d_ff: usize| {
            (tokenformer.to_transformer(d_ff).param_count() as i64
                - tokenformer.param_count() as i64)
                .abs()
        };
        assert!(gap(matched.d_ff) <= gap(matched.d_ff + 1), "{name}");
        assert!(gap(matched.d_ff) <= gap(matched.d_ff - 1), "{name}");
        // Within half a step of d_ff: L·(2d + 1) / 2 parameters.
        let step = tokenformer.n_layers * (2 * tokenformer.d_model + 1);
        assert!(gap(matched.d_ff) as usize <= step / 2, "{name}: {}", gap(matched.d_ff));
    }
}

#[test]
fn checkpoints_record_the_arch_and_old_ones_load_as_tokenformer() {
    let dir = std::env::temp_dir().join(format!("tf-arch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = ModelConfig::preset("tiny").unwrap().to_transformer(40);
    (config.n_layers, config.d_model, config.n_heads, config.vocab_size) = (2, 16, 2, 20);
    let model = TokenFormer::init(&config, 5, Device::Cpu).unwrap();
    let checkpoint = |config: &ModelConfig, params| Checkpoint {
        config: config.clone(),
        params,
        optimizer: None,
        train_state: None,
    };
    save_checkpoint(&dir, &checkpoint(&config, model.named_tensors())).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["arch"], "transformer");
    assert_eq!(json["d_ff"], 40);
    assert!(json.get("qkv_tokens").is_none() && json.get("norm").is_none(), "{json}");
    let loaded = load_checkpoint(&dir).unwrap();
    assert_eq!(loaded.config, config);
    let names: Vec<String> = loaded.params.iter().map(|(n, _)| n.clone()).collect();
    assert!(names.contains(&"layers.1.attention.proj.weight".to_string()), "{names:?}");
    assert!(names.contains(&"layers.0.mlp.down.bias".to_string()), "{names:?}");

    // A config.json written before `arch` existed: a TokenFormer.
    let tokenformer = {
        let mut c = ModelConfig::preset("tiny").unwrap();
        (c.n_layers, c.d_model, c.n_heads, c.vocab_size) = (1, 16, 2, 20);
        c
    };
    let model = TokenFormer::init(&tokenformer, 6, Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    save_checkpoint(&dir, &checkpoint(&tokenformer, model.named_tensors())).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["arch"], "tokenformer");
    json.as_object_mut().unwrap().remove("arch");
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    // The manifest's checksum of config.json no longer holds: a hand-edited config goes with it.
    std::fs::remove_file(dir.join("checkpoint.json")).unwrap();
    assert_eq!(load_checkpoint(&dir).unwrap().config, tokenformer);
    std::fs::remove_dir_all(&dir).unwrap();
}
