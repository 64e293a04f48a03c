//! `tokenformer grow` in library form: train a small language model, give it more parameter
//! tokens in the middle of training, and keep training, without losing a step.
//!
//! 1. Train preset `tiny` byte-level on tiny shakespeare for a few hundred steps.
//! 2. Grow every Pattention with `TokenFormer::grow` (new key tokens exactly zero): the
//!    validation loss before and after is the same number, bit for bit, and so is the text the
//!    model writes from a fixed seed.
//! 3. Extend the AdamW moments with zero rows for the new tokens (the old rows keep theirs) and
//!    train on. The loss curve continues from where it was, with no bump at the growth step.
//!
//! It prints the losses and the text before and after, and draws the loss curve with the
//! growth step marked, above a zoom on the steps around the growth: there the validation loss
//! is measured every few steps, and the training loss is shown with its running mean taken on
//! each side of the growth separately, so that a bump could not be averaged away.
//!
//! ```sh
//! cargo run --release --example grow_a_language_model
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use common::{
    draw_curves, out_file, print_sample, sample, validation_loss, Corpus, Curve, Result, Trainer,
    BLUE, ORANGE, PALE_BLUE,
};
use plotters::prelude::*;
use tokenformer::core::{Device, Error, Tensor};
use tokenformer::models::optim::Optimizer;
use tokenformer::models::progress::thousands;
use tokenformer::models::{GrowInit, TokenFormer};
use tokenformer::ops::layout::concat;

#[derive(Parser)]
#[command(about = "Train a small model, grow it mid-training, train on")]
struct Args {
    /// Training steps before the growth (batch 8 × 64 bytes).
    #[arg(long, default_value_t = 200)]
    steps_before: u64,
    /// Training steps after it.
    #[arg(long, default_value_t = 120)]
    steps_after: u64,
    /// Parameter tokens added to every query, key and value Pattention.
    #[arg(long, default_value_t = 64)]
    qkv: usize,
    /// Parameter tokens added to every attention-output Pattention.
    #[arg(long, default_value_t = 64)]
    proj: usize,
    /// Parameter tokens added to every feed-forward Pattention.
    #[arg(long, default_value_t = 256)]
    ffn: usize,
    /// The start of the generated text.
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// A few steps and short samples (for tests).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = common::DEFAULT_OUT)]
    out: PathBuf,
}

const SEQ: usize = 64;
/// Steps between two measurements of the validation loss.
const EVAL_EVERY: u64 = 50;
/// The zoom shows this many steps on each side of the growth step...
const ZOOM_HALF_WIDTH: u64 = 40;
/// ...with the validation loss measured every this many steps there...
const ZOOM_EVAL_EVERY: u64 = 5;
/// ...and the training loss's running mean over this many steps.
const ZOOM_MEAN_OVER: usize = 10;

/// The steps around the growth step and the validation losses measured in them.
struct Zoom {
    steps: std::ops::RangeInclusive<u64>,
    val: Vec<(f64, f64)>,
}

/// The running mean of `losses` (step, loss) over up to `over` steps, restarted after step
/// `growth` so that no mean mixes steps from before and after it.
fn running_mean(losses: &[(f64, f64)], growth: f64, over: usize) -> Vec<(f64, f64)> {
    let mut means = Vec::with_capacity(losses.len());
    let mut start = 0;
    for (i, &(step, _)) in losses.iter().enumerate() {
        if step > growth && losses[start].0 <= growth {
            start = i;
        }
        let from = start.max((i + 1).saturating_sub(over));
        let window = &losses[from..=i];
        means.push((step, window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64));
    }
    means
}

/// Every moment tensor of `old` padded with zero rows to the shape of the grown model's
/// parameter of the same name: the new tokens start with no history, the old ones keep theirs.
fn grow_optimizer(old: &Optimizer, small: &TokenFormer, grown: &TokenFormer) -> Result<Optimizer> {
    let (m, v) = old.named_moments(small);
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        grown.named_params().into_iter().map(|(name, p)| (name, p.dims().to_vec())).collect();
    let pad = |moments: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        moments
            .into_iter()
            .map(|(name, t)| {
                let dims = shapes
                    .get(&name)
                    .ok_or_else(|| Error::invalid(format!("no parameter {name}")))?;
                let missing = dims[0] - t.dims()[0];
                let t = if missing == 0 {
                    t
                } else {
                    let zeros = Tensor::zeros(&[missing, dims[1]], Device::Cpu)?;
                    concat(&[t, zeros], 0)?
                };
                Ok((name, t))
            })
            .collect()
    };
    Ok(Optimizer::from_named(grown, old.hp, old.step, pad(m)?, pad(v)?)?)
}

/// Trains `steps` more steps, measuring the validation loss (kept in `val_points` and printed)
/// every `EVAL_EVERY` steps and at the last one.
fn train_phase(
    trainer: &mut Trainer,
    corpus: &Corpus,
    steps: u64,
    windows: usize,
    val_points: &mut Vec<(f64, f64)>,
    zoom: &mut Zoom,
) -> Result<()> {
    let last = trainer.step + steps;
    for _ in 0..steps {
        trainer.step(&corpus.train)?;
        let step = trainer.step;
        let printed = step.is_multiple_of(EVAL_EVERY) || step == last;
        let zoomed =
            zoom.steps.contains(&step) && (step.is_multiple_of(ZOOM_EVAL_EVERY) || step == last);
        if !(printed || zoomed) {
            continue;
        }
        // The validation windows are fixed and no random draw is made: measuring more often
        // does not change the training.
        let val = validation_loss(&trainer.model, &corpus.val, SEQ, windows)?;
        if zoomed {
            zoom.val.push((step as f64, val));
        }
        if printed {
            val_points.push((step as f64, val));
            println!(
                "  step {step:>4}: train loss {:.4}, validation {val:.4}",
                trainer.losses.last().map_or(f64::NAN, |l| l.1)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    common::exit_code(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    for (flag, tokens) in [("qkv", args.qkv), ("proj", args.proj), ("ffn", args.ffn)] {
        common::check_count(flag, tokens, 0..=4096)?;
    }
    let started = Instant::now();
    let (before_steps, after_steps, sample_len, windows) = if args.quick {
        (args.steps_before.min(3), args.steps_after.min(3), 16, 2)
    } else {
        (args.steps_before, args.steps_after, 160, 24)
    };
    let corpus = Corpus::tiny_shakespeare()?;
    let config = common::tiny_config(corpus.tokenizer)?;
    let model = TokenFormer::init(&config, 1337, Device::Cpu)?;
    println!(
        "phase 1: tiny, {} parameters ({} / {} / {} qkv / proj / ffn tokens per layer), {before_steps} steps",
        thousands(config.param_count()),
        config.qkv_tokens,
        config.proj_tokens,
        config.ffn_tokens
    );
    let total = before_steps + after_steps;
    let mut trainer = Trainer::new(model, 8, SEQ, total)?;
    let mut val_points = vec![(0.0, validation_loss(&trainer.model, &corpus.val, SEQ, windows)?)];
    let steps = before_steps.saturating_sub(ZOOM_HALF_WIDTH)..=before_steps + ZOOM_HALF_WIDTH;
    let mut zoom = Zoom { steps, val: Vec::new() };
    train_phase(&mut trainer, &corpus, before_steps, windows, &mut val_points, &mut zoom)?;
    let before = validation_loss(&trainer.model, &corpus.val, SEQ, windows)?;
    let text_before = sample(&trainer.model, corpus.tokenizer, &args.prompt, sample_len)?;
    println!("text at step {before_steps}:");
    print_sample(&text_before);

    let grown = trainer.model.grow(args.qkv, args.proj, args.ffn, GrowInit::Exact, 7)?;
    let after = validation_loss(&grown, &corpus.val, SEQ, windows)?;
    let text_after = sample(&grown, corpus.tokenizer, &args.prompt, sample_len)?;
    println!(
        "growth at step {before_steps}: +{} qkv, +{} proj, +{} ffn tokens per layer: {} → {} parameters",
        args.qkv,
        args.proj,
        args.ffn,
        thousands(config.param_count()),
        thousands(grown.config.param_count())
    );
    println!("  validation loss before growth: {before:.9}");
    println!("  validation loss after growth:  {after:.9}");
    let same_loss = before.to_bits() == after.to_bits();
    let same_text = text_before == text_after;
    println!(
        "  the same loss, bit for bit: {}; the same sampled text: {}",
        if same_loss { "yes" } else { "NO" },
        if same_text { "yes" } else { "NO" }
    );
    if !(same_loss && same_text) {
        return Err("exact growth changed the model's outputs".into());
    }
    trainer.optimizer = grow_optimizer(&trainer.optimizer, &trainer.model, &grown)?;
    trainer.model = grown;

    println!("phase 2: the grown model, {after_steps} more steps");
    train_phase(&mut trainer, &corpus, after_steps, windows, &mut val_points, &mut zoom)?;
    let end = validation_loss(&trainer.model, &corpus.val, SEQ, windows)?;
    println!(
        "validation loss: {before:.4} at the growth step, {end:.4} after {after_steps} more steps"
    );
    println!("text at step {total}:");
    print_sample(&sample(&trainer.model, corpus.tokenizer, &args.prompt, sample_len)?);

    let path = out_file(&args.out, "grow_a_language_model.png")?;
    let root = BitMapBackend::new(&path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (whole, zoomed) = root.split_vertically(560);
    let in_zoom = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        points.iter().copied().filter(|p| zoom.steps.contains(&(p.0 as u64))).collect()
    };
    let growth_step = before_steps as f64;
    let zoom_curves = [
        Curve {
            label: "training loss".into(),
            color: PALE_BLUE,
            points: in_zoom(&trainer.losses),
            dots: false,
        },
        Curve {
            label: format!(
                "training loss, mean of {ZOOM_MEAN_OVER} steps (restarted at the growth)"
            ),
            color: BLUE,
            points: in_zoom(&running_mean(&trainer.losses, growth_step, ZOOM_MEAN_OVER)),
            dots: false,
        },
        Curve {
            label: format!("validation loss, every {ZOOM_EVAL_EVERY} steps"),
            color: ORANGE,
            points: zoom.val.clone(),
            dots: true,
        },
    ];
    let curves = [
        Curve {
            label: "training loss".into(),
            color: BLUE,
            points: trainer.losses.clone(),
            dots: false,
        },
        Curve { label: "validation loss".into(), color: ORANGE, points: val_points, dots: true },
    ];
    let mark = [(
        before_steps as f64,
        format!(
            "growth: {} → {} parameters",
            thousands(config.param_count()),
            thousands(trainer.model.config.param_count())
        ),
    )];
    draw_curves(
        &whole,
        "tiny on tiny shakespeare, grown mid-training",
        ("step", "loss (nats per byte)"),
        false,
        &curves,
        &mark,
        SeriesLabelPosition::UpperRight,
    )?;
    let (first, last) = (zoom.steps.start(), zoom.steps.end().min(&total));
    draw_curves(
        &zoomed,
        &format!("zoom on the growth step: steps {first} to {last}"),
        ("step", "loss (nats per byte)"),
        false,
        &zoom_curves,
        &mark,
        SeriesLabelPosition::UpperRight,
    )?;
    root.present()?;
    println!("wrote {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}
