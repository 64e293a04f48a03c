//! One Pattention layer learns a linear map, then grows by parameter tokens in the middle of
//! training without losing what it learned.
//!
//! Pattention replaces a linear layer by attention from the input to n learnable parameter
//! tokens: scores A = x·Kᵀ, weights S = Θ(A), output S·V. Here it must learn a random linear
//! map y = W·x of 16-dimensional unit vectors. Near zero Θ is close to linear, so the layer
//! behaves like Vᵀ·c·K, a product through n tokens: with fewer tokens than dimensions it can
//! only draw a rank-n approximation of W, and the loss levels off. Then the layer grows:
//!
//! - `--init exact` (default): the new key tokens are exactly zero, so their scores are zero,
//!   Θ maps zero to zero and the output is unchanged, bit for bit: the loss right after the
//!   growth equals the loss right before. Then the new tokens learn and the loss falls further.
//! - `--init random`: new keys drawn at random, as a freshly built layer would have them; the
//!   output changes at once and the loss jumps before it recovers.
//!
//! The same layer trained without growing runs alongside for comparison. The picture shows the
//! losses against the step, the growth step marked, and every output of the layer against its
//! target, at the growth step and at the end.
//!
//! ```sh
//! cargo run --release --example pattention_layer
//! cargo run --release --example pattention_layer -- --init random
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use common::{draw_curves, out_file, Curve, Result, BLUE, GREEN, GREY, ORANGE, RED};
use plotters::prelude::*;
use tokenformer::autograd::{no_grad, Var};
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::models::{GrowInit, Pattention, Theta};
use tokenformer::ops::adamw::{adamw_step, AdamW};
use tokenformer::ops::layout::concat;
use tokenformer::ops::matmul::matmul;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Init {
    /// New keys exactly zero: the layer computes the same function after growing.
    Exact,
    /// New keys drawn at random: the function changes at the growth step.
    Random,
}

#[derive(Parser)]
#[command(about = "A Pattention layer learns a function and grows mid-training")]
struct Args {
    #[arg(long, value_enum, default_value = "exact")]
    init: Init,
    /// Parameter tokens before growth.
    #[arg(long, default_value_t = 4)]
    tokens: usize,
    /// Parameter tokens after growth.
    #[arg(long, default_value_t = 32)]
    grow_to: usize,
    /// Steps before the growth, and again after it.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    seed: u64,
    /// A few steps (for tests).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = common::DEFAULT_OUT)]
    out: PathBuf,
}

/// Width of the input and of the output.
const DIM: usize = 16;
/// Training points.
const POINTS: usize = 512;
const KEY_STD: f32 = 1.0;
const VALUE_STD: f32 = 0.1;

/// `n` random unit vectors of width `DIM`, as rows [n, DIM] (inputs after a normalisation
/// look like this).
fn unit_vectors(n: usize, rng: &mut Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let v: Vec<f64> = (0..DIM).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        out.extend(v.iter().map(|a| (a / norm) as f32));
    }
    out
}

/// A layer with its AdamW moments.
struct Learner {
    layer: Pattention,
    /// (m, v) for the keys, then for the values.
    moments: [(Tensor, Tensor); 2],
    step: u64,
    hp: AdamW,
}

impl Learner {
    fn new(layer: Pattention) -> Result<Learner> {
        let zeros = |v: &Var| -> Result<(Tensor, Tensor)> {
            Ok((Tensor::zeros(v.dims(), Device::Cpu)?, Tensor::zeros(v.dims(), Device::Cpu)?))
        };
        let moments = [zeros(&layer.key_tokens)?, zeros(&layer.value_tokens)?];
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        Ok(Learner { layer, moments, step: 0, hp })
    }

    /// Mean squared error of the layer on (x, y).
    fn loss(&self, x: &Var, y: &Var) -> Result<Var> {
        Ok(self.layer.forward(x)?.sub(y)?.square()?.mean(&[0, 1], false)?)
    }

    /// One AdamW step on the full data set; returns the loss before the step.
    fn train_step(&mut self, x: &Var, y: &Var) -> Result<f64> {
        let loss = self.loss(x, y)?;
        let grads = loss.backward()?;
        self.step += 1;
        let params = [&mut self.layer.key_tokens, &mut self.layer.value_tokens];
        for (p, (m, v)) in params.into_iter().zip(self.moments.iter_mut()) {
            let g = grads.get(p).ok_or("a parameter got no gradient")?;
            let (new_p, new_m, new_v) = adamw_step(p.value(), g, m, v, &self.hp, self.step)?;
            *p = Var::param(new_p);
            (*m, *v) = (new_m, new_v);
        }
        Ok(loss.value().to_scalar()? as f64)
    }

    /// The layer with `extra` more tokens; the optimizer's moments get zero rows for them (the
    /// old tokens keep theirs), as `tokenformer grow` does for a training run.
    fn grow(&self, extra: usize, init: GrowInit, rng: &mut Rng) -> Result<Learner> {
        let layer = self.layer.grow(extra, init, KEY_STD, VALUE_STD, rng)?;
        let pad = |t: &Tensor| -> Result<Tensor> {
            Ok(concat(&[t.clone(), Tensor::zeros(&[extra, t.dims()[1]], Device::Cpu)?], 0)?)
        };
        let moments = [
            (pad(&self.moments[0].0)?, pad(&self.moments[0].1)?),
            (pad(&self.moments[1].0)?, pad(&self.moments[1].1)?),
        ];
        Ok(Learner { layer, moments, step: self.step, hp: self.hp })
    }

    fn predict(&self, x: &Var) -> Result<Vec<f32>> {
        Ok(no_grad(|| self.layer.forward(x))?.value().to_vec()?)
    }
}

fn main() -> ExitCode {
    common::exit_code(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    common::check_count("tokens", args.tokens, 1..=4095)?;
    common::check_count("steps", args.steps, 1..=usize::MAX)?;
    let started = Instant::now();
    let steps = if args.quick { args.steps.min(40) } else { args.steps };
    if args.grow_to <= args.tokens {
        return Err(
            format!("--grow-to {} must exceed --tokens {}", args.grow_to, args.tokens).into()
        );
    }
    common::check_count("grow-to", args.grow_to, 2..=4096)?;
    let init = match args.init {
        Init::Exact => GrowInit::Exact,
        Init::Random => GrowInit::Random,
    };

    // The data: unit vectors x and their images y = W·x under a fixed random W (entries
    // N(0, 1), so every y has variance 1: a layer that outputs 0 scores a loss of 1).
    let mut rng = Rng::new(args.seed);
    let x = Tensor::from_vec(unit_vectors(POINTS, &mut rng), &[POINTS, DIM])?;
    let w = Tensor::randn(&[DIM, DIM], 1.0, &mut rng);
    let y_true = matmul(&x, &w, false, true)?;
    let (x, y) = (Var::constant(x), Var::constant(y_true.clone()));

    let layer = Pattention {
        key_tokens: Var::param(Tensor::randn(&[args.tokens, DIM], KEY_STD, &mut rng)),
        value_tokens: Var::param(Tensor::randn(&[args.tokens, DIM], VALUE_STD, &mut rng)),
        // τ = √n₀ is fixed when the layer is made; growth never changes it.
        scale_tokens: args.tokens,
        norm: Theta::L2NormGelu,
    };
    println!(
        "one Pattention layer (Θ = {}, τ = √{}) learns a random linear map of {DIM}-dimensional unit vectors ({POINTS} points)",
        layer.norm, args.tokens
    );
    println!("phase 1: {} tokens, {steps} steps of AdamW", args.tokens);
    let mut small = Learner::new(layer)?;
    let mut grown_curve = Vec::new();
    let every = (steps / 4).max(1);
    for step in 0..steps {
        let loss = small.train_step(&x, &y)?;
        grown_curve.push((step as f64, loss));
        if step % every == 0 {
            println!("  step {step:>5}: loss {loss:.6}");
        }
    }
    let before = small.loss(&x, &y)?.value().to_scalar()?;
    let fit_before = small.predict(&x)?;

    let mut grown = small.grow(args.grow_to - args.tokens, init, &mut rng)?;
    let after = grown.loss(&x, &y)?.value().to_scalar()?;
    let init_name = if args.init == Init::Exact { "exact (zero keys)" } else { "random keys" };
    println!("growth at step {steps}: {} → {} tokens, {init_name}", args.tokens, args.grow_to);
    println!("  loss just before: {before:.9}");
    println!("  loss just after:  {after:.9}");
    if before.to_bits() == after.to_bits() {
        println!("  identical, bit for bit: the new keys are zero, so the layer computes the same function");
    } else {
        println!("  {:.1}× higher: the new random keys move every output at once", after / before);
    }
    if args.init == Init::Exact && before.to_bits() != after.to_bits() {
        return Err("exact growth changed the loss".into());
    }

    println!(
        "phase 2: {} tokens, {steps} more steps (the {}-token layer trains on alongside, ungrown)",
        args.grow_to, args.tokens
    );
    let mut baseline_curve = Vec::new();
    for step in steps..2 * steps {
        let loss = grown.train_step(&x, &y)?;
        let base = small.train_step(&x, &y)?;
        grown_curve.push((step as f64, loss));
        baseline_curve.push((step as f64, base));
        if (step - steps) % every == 0 {
            println!("  step {step:>5}: loss {loss:.6} (ungrown {base:.6})");
        }
    }
    let end = grown.loss(&x, &y)?.value().to_scalar()? as f64;
    let end_small = small.loss(&x, &y)?.value().to_scalar()? as f64;
    println!(
        "final loss: {end:.6} with {} tokens, {end_small:.6} ungrown with {} ({:.1}× lower after growth)",
        args.grow_to,
        args.tokens,
        end_small / end
    );
    let fit_after = grown.predict(&x)?;

    let name = format!(
        "pattention_layer_{}.png",
        if args.init == Init::Exact { "exact" } else { "random" }
    );
    let path = out_file(&args.out, &name)?;
    let root = BitMapBackend::new(&path, (1800, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, rest) = root.split_horizontally(700);
    let (middle, right) = rest.split_horizontally(560);
    let grown_color = if args.init == Init::Exact { BLUE } else { RED };
    let grown_label = format!("grown to {} tokens, {init_name}", args.grow_to);
    let baseline_label = format!("{} tokens throughout", args.tokens);
    let curves = |range: std::ops::Range<f64>| {
        let within =
            |c: &[(f64, f64)]| c.iter().copied().filter(|p| range.contains(&p.0)).collect();
        [
            Curve {
                label: baseline_label.clone(),
                color: GREY,
                points: within(&baseline_curve),
                dots: false,
            },
            Curve {
                label: grown_label.clone(),
                color: grown_color,
                points: within(&grown_curve),
                dots: false,
            },
        ]
    };
    let mark = [(steps as f64, format!("growth {} → {} tokens", args.tokens, args.grow_to))];
    let all = curves(0.0..f64::INFINITY);
    draw_curves(
        &left,
        "training loss (mean squared error)",
        ("step", "loss"),
        true,
        &all,
        &mark,
        SeriesLabelPosition::UpperRight,
    )?;
    let around = (steps as f64 - 6.0).max(0.0)..(steps as f64 + 6.0);
    let zoom = curves(around);
    draw_curves(
        &middle,
        "around the growth step",
        ("step", "loss"),
        true,
        &zoom,
        &mark,
        SeriesLabelPosition::LowerLeft,
    )?;
    draw_fit(
        &right,
        &y_true.to_vec()?,
        &[
            (format!("{} tokens, at the growth step", args.tokens), ORANGE, fit_before),
            (format!("{} tokens, at the end", args.grow_to), BLUE, fit_after),
        ],
    )?;
    root.present()?;
    println!("wrote {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Every output of the layer against its target: a perfect fit lies on the diagonal.
fn draw_fit(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    target: &[f32],
    fits: &[(String, RGBColor, Vec<f32>)],
) -> Result<()> {
    let lim = target.iter().map(|v| v.abs()).fold(0.0f32, f32::max) as f64 * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption("outputs against targets", common::font(20))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-lim..lim, -lim..lim)?;
    chart
        .configure_mesh()
        .x_desc("target W·x")
        .y_desc("layer output")
        .label_style(common::font(14))
        .axis_desc_style(common::font(16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new([(-lim, -lim), (lim, lim)], GREEN.stroke_width(1)))?;
    for (label, color, fit) in fits {
        let color = *color;
        let dots = target
            .iter()
            .zip(fit)
            .map(|(&t, &f)| Circle::new((t as f64, f as f64), 1, color.mix(0.5).filled()));
        chart
            .draw_series(dots)?
            .label(label.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(common::font(14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
