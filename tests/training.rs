//! Training runs stop and resume bit-identically, and a run grown mid-way continues from
//! exactly the loss the smaller model had.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use tokenformer::core::Device;
use tokenformer::models::growth::{grow_checkpoint, GrowSpec};
use tokenformer::models::metrics::read_metrics;
use tokenformer::models::train::{train_new, train_resume, TrainControl, TrainSettings};
use tokenformer::models::GrowInit;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tf-training-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn settings(steps: u64, grad_accum: usize) -> TrainSettings {
    TrainSettings {
        steps,
        batch: 2,
        seq: 16,
        grad_accum,
        warmup: 2,
        eval_every: 3,
        eval_windows: 4,
        save_every: 100,
        ..TrainSettings::default()
    }
}

fn quiet() -> TrainControl {
    TrainControl { quiet: true, ..TrainControl::default() }
}

/// A control that requests a stop right after micro-batch `micro` of step `step` (0-based).
fn stop_at(step: u64, micro: usize) -> TrainControl {
    let control = quiet();
    let stop = control.stop.clone();
    TrainControl {
        after_micro_batch: Some(Box::new(move |s, m| {
            if s == step && m == micro {
                stop.store(true, Ordering::SeqCst);
            }
        })),
        ..control
    }
}

/// (step, loss bits, val_loss bits) of every logged step.
fn losses(dir: &Path) -> Vec<(u64, u64, Option<u64>)> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss.to_bits(), r.val_loss.map(f64::to_bits)))
        .collect()
}

fn model_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn check_resume_matches(name: &str, grad_accum: usize, stop_step: u64, stop_micro: usize) {
    let straight = temp_dir(&format!("{name}-straight"));
    let summary = train_new(&straight, settings(7, grad_accum), Device::Cpu, quiet()).unwrap();
    assert!(!summary.interrupted);

    let stopped = temp_dir(&format!("{name}-stopped"));
    let summary =
        train_new(&stopped, settings(7, grad_accum), Device::Cpu, stop_at(stop_step, stop_micro))
            .unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.step, stop_step, "a stop inside a step saves the last completed step");
    assert_eq!(losses(&stopped).len() as u64, stop_step);
    let summary = train_resume(&stopped, Device::Cpu, quiet()).unwrap();
    assert!(!summary.interrupted);
    assert_eq!(summary.step, 7);

    assert_eq!(losses(&straight), losses(&stopped));
    assert_eq!(model_bytes(&straight), model_bytes(&stopped));
    assert_eq!(
        std::fs::read(straight.join("optimizer.safetensors")).unwrap(),
        std::fs::read(stopped.join("optimizer.safetensors")).unwrap()
    );
    assert!(stopped.join("loss.png").is_file());
    for d in [straight, stopped] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    check_resume_matches("plain", 1, 4, 0);
}

#[test]
fn interruption_midway_through_gradient_accumulation_resumes_bit_identically() {
    check_resume_matches("accum", 3, 2, 1);
}

#[test]
fn same_seed_same_run() {
    let a = temp_dir("seed-a");
    let b = temp_dir("seed-b");
    train_new(&a, settings(3, 1), Device::Cpu, quiet()).unwrap();
    train_new(&b, settings(3, 1), Device::Cpu, quiet()).unwrap();
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(model_bytes(&a), model_bytes(&b));
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn grown_run_resumes_from_the_loss_the_smaller_model_had() {
    // The smaller model trained straight through gives the reference loss of step 4's batch.
    let small = temp_dir("grow-small");
    train_new(&small, settings(6, 1), Device::Cpu, quiet()).unwrap();
    let reference = losses(&small);

    let stopped = temp_dir("grow-stopped");
    train_new(&stopped, settings(6, 1), Device::Cpu, stop_at(3, 0)).unwrap();
    let grown = temp_dir("grow-grown");
    let spec = GrowSpec {
        qkv: 5,
        proj: 3,
        ffn: 17,
        init: GrowInit::Exact,
        seed: 9,
        ..GrowSpec::default()
    };
    let before = model_bytes(&stopped);
    let report = grow_checkpoint(&stopped, &grown, &spec, Device::Cpu).unwrap();
    assert!(report.preserves_outputs && report.had_optimizer);
    assert_eq!(model_bytes(&stopped), before, "grow never modifies its source");

    train_resume(&grown, Device::Cpu, quiet()).unwrap();
    let after = losses(&grown);
    // Steps 1..=3 are the small run's history, copied along; step 4 is the grown model's first.
    assert_eq!(after[..3], reference[..3]);
    assert_eq!(after[3].0, 4);
    assert_eq!(after[3].1, reference[3].1, "first loss after growth equals the smaller model's");
    assert_eq!(after.len(), 6);
    for d in [small, stopped, grown] {
        let _ = std::fs::remove_dir_all(d);
    }
}
