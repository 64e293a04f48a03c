//! The whole model on a GPU against the CPU reference: preset `tiny`, forward, loss, every
//! parameter gradient, ten training steps, exact growth, determinism and the bench.
//!
//! Tolerances, and why the two devices differ at all:
//!
//! | what                         | passes when                                   |
//! |------------------------------|-----------------------------------------------|
//! | logits                       | \|cuda − cpu\| ≤ 1e-4 + 1e-3·\|cpu\|            |
//! | loss                         | \|cuda − cpu\| ≤ 1e-5·\|cpu\|                    |
//! | each parameter's gradient    | max \|cuda − cpu\| ≤ 2e-3·max \|cpu\| (+1e-9)    |
//! | ten training steps' losses   | \|cuda − cpu\| ≤ 1e-3·\|cpu\|                    |
//!
//! The matmuls are cuBLAS SGEMMs on the GPU and matrixmultiply on the CPU: both are f32 with
//! f32 accumulation, but each blocks the k loop its own way, so sums of the same terms are
//! rounded in a different order (about 1e-6 relative per product, growing a little through
//! four layers). TF32 stays off (no test here turns it on), so no product loses mantissa bits.
//! Row reductions (norms, softmax, cross-entropy) use a fixed tree on the GPU and a left-to-right
//! loop on the CPU: the same kind of difference, smaller. A gradient is compared against the
//! scale of its whole tensor, not element by element: the gradient of a key token is a
//! difference of nearly equal terms (the L2 norm's projection), so an element near zero can
//! carry a large relative error that means nothing. Training runs diverge slowly (AdamW divides
//! by √v, which magnifies differences in tiny gradients), so ten steps at the default warm-up
//! learning rate stay within 1e-3.
//!
//! On one device the same inputs give the same bits: two CUDA runs of the same seed must agree
//! exactly (no float atomics anywhere, fixed reduction trees, one stream).
//!
//! Where no CUDA driver is installed, the tests run on the CUDA emulator (cudaemu/); only where
//! there is neither a driver nor a C++ compiler does each test print "skipped: <test>: no CUDA
//! device (<reason>)" to stderr and return. With `TOKENFORMER_REQUIRE_CUDA=1` (set by
//! scripts/gpu-check.sh) a skip is a failure.
//! Nothing here reads the source tree (the executable also runs on a GPU machine where
//! the sources are absent): the training data is the corpus built into the binary.

use std::path::{Path, PathBuf};
use tokenformer::core::testing::cuda_device_or_skip;
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::models::bench::bench_train;
use tokenformer::models::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint};
use tokenformer::models::evaluate::evaluate_tokens;
use tokenformer::models::growth::{grow_checkpoint, GrowSpec};
use tokenformer::models::metrics::read_metrics;
use tokenformer::models::train::{train_new, TrainControl, TrainSettings};
use tokenformer::models::{GrowInit, ModelConfig, TokenFormer};
use tokenformer::ops::testing::{bits, values};

const GPU: Device = Device::Cuda(0);

macro_rules! require_cuda {
    () => {
        if !cuda_device_or_skip() {
            return;
        }
    };
}

/// A fresh scratch directory under the system's temporary folder.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tf-cuda-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

/// Random ids in [0, vocab) of shape [batch, seq].
fn token_ids(vocab: usize, batch: usize, seq: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let ids = (0..batch * seq).map(|_| rng.below(vocab as u64) as f32).collect();
    Tensor::from_vec(ids, &[batch, seq]).unwrap()
}

/// Asserts |a − b| ≤ atol + rtol·|b| elementwise, and returns the largest error.
fn assert_close(what: &str, a: &[f32], b: &[f32], atol: f64, rtol: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst = 0.0f64;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let err = (x as f64 - y as f64).abs();
        assert!(err <= atol + rtol * (y as f64).abs(), "{what}: element {i}: {x} vs {y} ({err:e})");
        worst = worst.max(err);
    }
    worst
}

/// Asserts max |a − b| ≤ rel·max |b| + 1e-9: closeness at the scale of the whole tensor.
fn assert_close_to_scale(what: &str, a: &[f32], b: &[f32], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let scale = b.iter().fold(0.0f64, |m, &y| m.max((y as f64).abs()));
    let worst = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    assert!(a.iter().all(|x| x.is_finite()), "{what}: a non-finite value on the GPU");
    assert!(worst <= rel * scale + 1e-9, "{what}: max error {worst:e} at scale {scale:e}");
}

#[test]
fn logits_loss_and_every_gradient_match_the_cpu() {
    require_cuda!();
    let config = tiny();
    let cpu = TokenFormer::init(&config, 7, Device::Cpu).unwrap();
    let gpu = cpu.to_device(GPU).unwrap();
    assert_eq!(gpu.device(), GPU);
    // Sizes that are not multiples of the kernels' 256-thread blocks.
    let (batch, seq) = (3, 45);
    let ids = token_ids(config.vocab_size, batch, seq, 1);
    let targets = token_ids(config.vocab_size, batch, seq, 2);
    let (gpu_ids, gpu_targets) = (ids.to_device(GPU).unwrap(), targets.to_device(GPU).unwrap());

    let c_logits = gpu.forward(&gpu_ids).unwrap();
    let r_logits = cpu.forward(&ids).unwrap();
    assert_eq!(c_logits.value().device(), GPU);
    assert_eq!(c_logits.dims(), r_logits.dims());
    let worst =
        assert_close("logits", &values(c_logits.value()), &values(r_logits.value()), 1e-4, 1e-3);
    eprintln!("logits: max error {worst:e}");

    let c_loss = gpu.loss(&gpu_ids, &gpu_targets).unwrap();
    let r_loss = cpu.loss(&ids, &targets).unwrap();
    let (c, r) = (c_loss.value().to_scalar().unwrap(), r_loss.value().to_scalar().unwrap());
    eprintln!("loss: cuda {c}, cpu {r}");
    assert!(((c - r) as f64).abs() <= 1e-5 * (r as f64).abs(), "loss: cuda {c}, cpu {r}");

    let (c_grads, r_grads) = (c_loss.backward().unwrap(), r_loss.backward().unwrap());
    for ((name, c_param), (_, r_param)) in gpu.named_params().iter().zip(cpu.named_params()) {
        let c = c_grads.get(c_param).unwrap_or_else(|| panic!("no CUDA gradient for {name}"));
        let r = r_grads.get(&r_param).unwrap_or_else(|| panic!("no CPU gradient for {name}"));
        assert_eq!(c.device(), GPU, "{name}: the gradient left the GPU");
        assert_eq!(c.dims(), r.dims(), "{name}: gradient shapes differ");
        assert_close_to_scale(&format!("gradient of {name}"), &values(c), &values(r), 2e-3);
    }
}

/// Small runs: batch 4 × seq 32, ten steps, one evaluation at the end.
fn ten_steps() -> TrainSettings {
    TrainSettings {
        steps: 10,
        batch: 4,
        seq: 32,
        grad_accum: 1,
        eval_every: 10,
        eval_windows: 8,
        save_every: 10,
        ..TrainSettings::default()
    }
}

fn quiet() -> TrainControl {
    TrainControl { quiet: true, ..TrainControl::default() }
}

/// (loss, validation loss) of every logged step of the run in `dir`.
fn losses(dir: &Path) -> Vec<(f64, Option<f64>)> {
    let records = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    records.iter().map(|r| (r.loss, r.val_loss)).collect()
}

#[test]
fn ten_training_steps_match_the_cpu_and_repeat_bit_for_bit() {
    require_cuda!();
    let (cpu_dir, gpu_a, gpu_b) = (temp_dir("train-cpu"), temp_dir("train-a"), temp_dir("train-b"));
    train_new(&cpu_dir, ten_steps(), Device::Cpu, quiet()).unwrap();
    train_new(&gpu_a, ten_steps(), GPU, quiet()).unwrap();
    train_new(&gpu_b, ten_steps(), GPU, quiet()).unwrap();
    let (cpu, a, b) = (losses(&cpu_dir), losses(&gpu_a), losses(&gpu_b));
    assert_eq!(cpu.len(), 10);
    assert_eq!(a.len(), 10);
    for (step, ((c, c_val), (r, r_val))) in a.iter().zip(&cpu).enumerate() {
        eprintln!("step {}: cuda {c}, cpu {r}", step + 1);
        assert!((c - r).abs() <= 1e-3 * r.abs(), "step {}: cuda loss {c}, cpu {r}", step + 1);
        if let (Some(c), Some(r)) = (c_val, r_val) {
            assert!((c - r).abs() <= 1e-3 * r.abs(), "step {}: val loss {c} vs {r}", step + 1);
        }
    }
    // The same seed on the same device: the same bits, in the losses and in the saved model.
    let to_bits = |l: &[(f64, Option<f64>)]| -> Vec<(u64, Option<u64>)> {
        l.iter().map(|(a, v)| (a.to_bits(), v.map(f64::to_bits))).collect()
    };
    assert_eq!(to_bits(&a), to_bits(&b), "two CUDA runs of one seed gave different losses");
    let model = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(model(&gpu_a) == model(&gpu_b), "two CUDA runs of one seed saved different models");
    for dir in [cpu_dir, gpu_a, gpu_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_checkpoint_trained_on_the_gpu_evaluates_to_the_same_loss_on_the_cpu() {
    // Checkpoints are portable across devices: the model trained on the GPU, loaded on each
    // device, gives the same evaluation loss within the logits' tolerance.
    require_cuda!();
    let dir = temp_dir("portable");
    train_new(&dir, TrainSettings { steps: 3, ..ten_steps() }, GPU, quiet()).unwrap();
    let ckpt = load_checkpoint(&dir).unwrap();
    let cpu = TokenFormer::from_named(ckpt.config.clone(), ckpt.params).unwrap();
    let gpu = cpu.to_device(GPU).unwrap();
    let mut rng = Rng::new(9);
    let ids: Vec<u32> = (0..700).map(|_| rng.below(ckpt.config.vocab_size as u64) as u32).collect();
    let on_cpu = evaluate_tokens(&cpu, &ids, |_, _| {}).unwrap().loss;
    let on_gpu = evaluate_tokens(&gpu, &ids, |_, _| {}).unwrap().loss;
    eprintln!("loss of a GPU-trained checkpoint: cuda {on_gpu}, cpu {on_cpu}");
    assert!((on_gpu - on_cpu).abs() <= 1e-4 * on_cpu.abs(), "cuda {on_gpu}, cpu {on_cpu}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exact_growth_on_the_gpu_keeps_the_logits() {
    require_cuda!();
    let config = tiny();
    let model = TokenFormer::init(&config, 11, Device::Cpu).unwrap().to_device(GPU).unwrap();
    let ids = token_ids(config.vocab_size, 2, 53, 3).to_device(GPU).unwrap();
    let before = model.forward(&ids).unwrap();
    let grown = model.grow(5, 7, 130, GrowInit::Exact, 4).unwrap();
    assert_eq!(grown.device(), GPU);
    assert_eq!(grown.layers[0].mlp.pattention().unwrap().tokens(), config.ffn_tokens + 130);
    let after = grown.forward(&ids).unwrap();
    // The row kernels keep every bit when zero scores are appended (their reduction tree does
    // not depend on the row length, and x + 0 = x), and the new scores are exact zeros (zero
    // keys). What is not guaranteed is cuBLAS: with more tokens, S·V has a longer k and X·Kᵀ a
    // wider n, and cuBLAS may then pick another kernel that groups the same k-sums differently
    // (another tile size or split-K). So the bound is the GEMM rounding bound, and the test
    // reports whether the bits happened to match.
    let same_bits = bits(before.value()) == bits(after.value());
    eprintln!("exact growth on the GPU: logits bit-identical: {same_bits}");
    let worst =
        assert_close("grown logits", &values(after.value()), &values(before.value()), 1e-5, 1e-4);
    eprintln!("exact growth on the GPU: max logit change {worst:e}");
    // The new value tokens get exactly zero gradient at the first step (their scores are 0).
    let targets = token_ids(config.vocab_size, 2, 53, 5).to_device(GPU).unwrap();
    let grads = grown.loss(&ids, &targets).unwrap().backward().unwrap();
    let mlp = grown.layers[1].mlp.pattention().unwrap();
    let g = values(grads.get(&mlp.value_tokens).unwrap());
    let d = config.d_model;
    assert!(g[config.ffn_tokens * d..].iter().all(|&v| v == 0.0), "new value tokens moved");
}

#[test]
fn growing_a_checkpoint_on_the_gpu_writes_what_the_cpu_writes() {
    require_cuda!();
    // A run with optimizer state, so the moments are extended too.
    let src = temp_dir("grow-src");
    let settings = TrainSettings { steps: 2, ..ten_steps() };
    train_new(&src, settings, Device::Cpu, quiet()).unwrap();
    let bare = temp_dir("grow-bare");
    let config = tiny();
    let model = TokenFormer::init(&config, 3, Device::Cpu).unwrap();
    let ckpt =
        Checkpoint { config, params: model.named_tensors(), optimizer: None, train_state: None };
    save_checkpoint(&bare, &ckpt).unwrap();
    for (source, files) in [
        (&src, &["model.safetensors", "optimizer.safetensors"][..]),
        (&bare, &["model.safetensors"][..]),
    ] {
        for init in [GrowInit::Exact, GrowInit::Random] {
            let spec = GrowSpec { qkv: 3, ffn: 17, init, seed: 9, ..GrowSpec::default() };
            let (on_cpu, on_gpu) = (temp_dir("grown-cpu"), temp_dir("grown-gpu"));
            grow_checkpoint(source, &on_cpu, &spec, Device::Cpu).unwrap();
            grow_checkpoint(source, &on_gpu, &spec, GPU).unwrap();
            for file in files {
                let read = |dir: &Path| std::fs::read(dir.join(file)).unwrap();
                assert!(read(&on_cpu) == read(&on_gpu), "{init:?}: {file} differs by device");
            }
            let _ = std::fs::remove_dir_all(on_cpu);
            let _ = std::fs::remove_dir_all(on_gpu);
        }
    }
    let _ = std::fs::remove_dir_all(src);
    let _ = std::fs::remove_dir_all(bare);
}

#[test]
fn bench_runs_on_the_gpu() {
    require_cuda!();
    // TF32 off: the switch is process-wide, and the other tests here compare against the CPU.
    let r = bench_train("tiny", &tiny(), 4, 64, 2, GPU, false, false).unwrap();
    eprintln!(
        "bench tiny on {}: {:.0} tokens/s, peak {} bytes",
        r.device_name, r.tokens_per_sec, r.peak_memory_bytes
    );
    assert_eq!(r.device, GPU.to_string());
    assert!(!r.device_name.is_empty());
    assert!(r.tokens_per_sec > 0.0 && r.tokens_per_sec.is_finite());
    assert!(r.peak_memory_bytes > 0);
}
