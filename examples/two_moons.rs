//! A small MLP learns to separate two interleaved half-moons, micrograd's demo on this engine.
//!
//! The data set is generated here: two noisy half circles, one per class. The network is
//! 2 → 16 → 16 → 2, each hidden layer x·W + b followed by the chosen activation (relu by
//! default, or tanh or sigmoid), trained by full-batch gradient descent on the cross-entropy
//! with nothing but `Var` ops and `p ← p − lr·∂L/∂p`. It prints the loss and accuracy as it
//! learns and draws the decision boundary: every point of the plane coloured by the class the
//! network gives it, into `two_moons_<activation>.png`. The moons can be separated, so a run
//! that ends with points on the wrong side has not converged yet, and says so: sigmoid, whose
//! gradient is at most ¼, needs about 5000 steps where relu needs a few hundred.
//!
//! ```sh
//! cargo run --release --example two_moons                        # relu
//! cargo run --release --example two_moons -- --activation tanh
//! cargo run --release --example two_moons -- --activation sigmoid --steps 5000
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use common::{out_file, Result, BLUE, ORANGE};
use plotters::prelude::*;
use tokenformer::autograd::{no_grad, Var};
use tokenformer::core::{Rng, Tensor};
use tokenformer::ops::{binary, unary};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Activation {
    Relu,
    Tanh,
    Sigmoid,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
        }
    }
}

#[derive(Parser)]
#[command(about = "An MLP separates two moons; draws its decision boundary")]
struct Args {
    #[arg(long, value_enum, default_value = "relu")]
    activation: Activation,
    /// Gradient-descent steps over the whole data set.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Width of both hidden layers.
    #[arg(long, default_value_t = 16)]
    hidden: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A few steps and a coarse picture (for tests).
    #[arg(long)]
    quick: bool,
    /// Folder for the picture.
    #[arg(long, default_value = common::DEFAULT_OUT)]
    out: PathBuf,
}

/// `n` points, half on each moon, with Gaussian noise of standard deviation `noise`:
/// class 0 on the upper half circle (cos t, sin t), class 1 on the lower one
/// (1 − cos t, ½ − sin t), t uniform in [0, π]. Returns (points [n, 2], labels [n]).
fn two_moons(n: usize, noise: f64, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let mut points = Vec::with_capacity(2 * n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 2;
        let t = std::f64::consts::PI * rng.next_f64();
        let (x, y) = if class == 0 { (t.cos(), t.sin()) } else { (1.0 - t.cos(), 0.5 - t.sin()) };
        points.push((x + noise * rng.normal()) as f32);
        points.push((y + noise * rng.normal()) as f32);
        labels.push(class as f32);
    }
    (points, labels)
}

struct Mlp {
    /// (W [in, out], b [out]) per layer.
    layers: Vec<(Var, Var)>,
    activation: Activation,
}

impl Mlp {
    fn new(sizes: &[usize], activation: Activation, rng: &mut Rng) -> Result<Mlp> {
        let mut layers = Vec::new();
        for pair in sizes.windows(2) {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            // He initialisation for relu, Glorot's for the saturating activations.
            let gain = if matches!(activation, Activation::Relu) { 2.0 } else { 1.0 };
            let std = (gain / fan_in as f32).sqrt();
            let w = Var::param(Tensor::randn(&[fan_in, fan_out], std, rng));
            let b = Var::param(Tensor::zeros(&[fan_out], tokenformer::core::Device::Cpu)?);
            layers.push((w, b));
        }
        Ok(Mlp { layers, activation })
    }

    /// Logits [n, 2] for points [n, 2].
    fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(w)?.add(b)?;
            if i + 1 < self.layers.len() {
                h = match self.activation {
                    Activation::Relu => h.relu()?,
                    Activation::Tanh => h.tanh()?,
                    Activation::Sigmoid => h.sigmoid()?,
                };
            }
        }
        Ok(h)
    }

    fn params(&self) -> Vec<&Var> {
        self.layers.iter().flat_map(|(w, b)| [w, b]).collect()
    }

    /// One step of gradient descent: every parameter p becomes p − lr·∂L/∂p.
    fn descend(&mut self, loss: &Var, lr: f32) -> Result<()> {
        let grads = loss.backward()?;
        for (w, b) in &mut self.layers {
            for p in [w, b] {
                let g = grads.get(p).ok_or("a parameter got no gradient")?;
                *p = Var::param(binary::sub(p.value(), &unary::affine(g, lr, 0.0)?)?);
            }
        }
        Ok(())
    }
}

/// Fraction of rows whose larger logit is the label's.
fn accuracy(logits: &Tensor, labels: &[f32]) -> Result<f64> {
    let l = logits.to_vec()?;
    let right = labels.iter().enumerate().filter(|(i, &y)| (l[2 * i + 1] > l[2 * i]) == (y == 1.0));
    Ok(right.count() as f64 / labels.len() as f64)
}

/// One line for a run that ended with points on the wrong side: the moons can be separated, so
/// more steps would get there.
fn not_converged_hint(accuracy: f64, points: usize, steps: usize) -> Option<String> {
    let wrong = ((1.0 - accuracy) * points as f64).round() as usize;
    (wrong > 0).then(|| {
        format!(
            "not converged: {wrong} of {points} points are still on the wrong side after {steps} steps; try more, e.g. --steps {}",
            steps.saturating_mul(5)
        )
    })
}

fn main() -> ExitCode {
    common::exit_code(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    common::check_count("hidden", args.hidden, 1..=4096)?;
    common::check_count("steps", args.steps, 1..=usize::MAX)?;
    let started = Instant::now();
    let (steps, grid) = if args.quick { (args.steps.min(60), 40) } else { (args.steps, 200) };
    let mut rng = Rng::new(args.seed);
    let n = 200;
    let (points, labels) = two_moons(n, 0.1, &mut rng);
    let x = Var::constant(Tensor::from_vec(points.clone(), &[n, 2])?);
    let y = Tensor::from_vec(labels.clone(), &[n])?;
    let sizes = [2, args.hidden, args.hidden, 2];
    let mut mlp = Mlp::new(&sizes, args.activation, &mut rng)?;
    let n_params: usize = mlp.params().iter().map(|p| p.value().numel()).sum();
    println!(
        "two moons: {n} points; MLP {sizes:?} with {}, {n_params} parameters; {steps} steps of gradient descent",
        args.activation.name()
    );

    let lr0 = 0.5f32;
    let mut last = (f64::NAN, 0.0);
    for step in 0..steps {
        let logits = mlp.forward(&x)?;
        let loss = logits.cross_entropy(&y)?;
        let value = loss.value().to_scalar()? as f64;
        if !value.is_finite() {
            return Err(format!("the loss became {value} at step {step}").into());
        }
        let acc = accuracy(logits.value(), &labels)?;
        last = (value, acc);
        if step % 100 == 0 {
            println!("  step {step:>4}: loss {value:.4}, accuracy {:.1}%", 100.0 * acc);
        }
        // The step size decays linearly to a tenth of its start, as in micrograd's demo.
        let lr = lr0 * (1.0 - 0.9 * step as f32 / steps as f32);
        mlp.descend(&loss, lr)?;
    }
    let logits = no_grad(|| mlp.forward(&x))?;
    let acc = accuracy(logits.value(), &labels)?;
    println!(
        "final: loss {:.4}, accuracy {:.1}% ({} of {n} points)",
        last.0,
        100.0 * acc,
        (acc * n as f64).round()
    );
    if let Some(hint) = not_converged_hint(acc, n, steps) {
        println!("{hint}");
    }

    // The decision boundary: the probability of class 1 on a grid over the plane.
    let (x_range, y_range) = ((-1.6f64, 2.6f64), (-1.1f64, 1.6f64));
    let cell = |i: usize, range: (f64, f64)| {
        range.0 + (range.1 - range.0) * (i as f64 + 0.5) / grid as f64
    };
    let mut plane = Vec::with_capacity(2 * grid * grid);
    for j in 0..grid {
        for i in 0..grid {
            plane.push(cell(i, x_range) as f32);
            plane.push(cell(j, y_range) as f32);
        }
    }
    let plane = Var::constant(Tensor::from_vec(plane, &[grid * grid, 2])?);
    let probs = no_grad(|| -> Result<Var> { Ok(mlp.forward(&plane)?.softmax()?) })?;
    let probs = probs.value().to_vec()?;

    let path = out_file(&args.out, &format!("two_moons_{}.png", args.activation.name()))?;
    let root = BitMapBackend::new(&path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "two moons: {} MLP {}-{}-{}-2, accuracy {:.0}%",
        args.activation.name(),
        2,
        args.hidden,
        args.hidden,
        100.0 * acc
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, common::font(22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    chart.configure_mesh().disable_mesh().label_style(common::font(14)).draw()?;
    let tint = |p: f64| {
        // Pale blue where the network says class 0, pale orange for class 1, darker near ½.
        let (a, b) = (RGBColor(198, 219, 239), RGBColor(253, 208, 162));
        let mix = |u: u8, v: u8| (u as f64 + (v as f64 - u as f64) * p) as u8;
        let edge = 1.0 - 0.25 * (1.0 - (2.0 * p - 1.0).abs()).powi(8);
        let c = RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2));
        RGBColor((c.0 as f64 * edge) as u8, (c.1 as f64 * edge) as u8, (c.2 as f64 * edge) as u8)
    };
    let (dx, dy) = ((x_range.1 - x_range.0) / grid as f64, (y_range.1 - y_range.0) / grid as f64);
    chart.draw_series((0..grid * grid).map(|k| {
        let (i, j) = (k % grid, k / grid);
        let (x0, y0) = (x_range.0 + i as f64 * dx, y_range.0 + j as f64 * dy);
        Rectangle::new([(x0, y0), (x0 + dx, y0 + dy)], tint(probs[2 * k + 1] as f64).filled())
    }))?;
    for (class, color) in [(0.0, BLUE), (1.0, ORANGE)] {
        let pts = (0..n).filter(|&i| labels[i] == class);
        chart
            .draw_series(pts.map(|i| {
                let p = (points[2 * i] as f64, points[2 * i + 1] as f64);
                EmptyElement::at(p)
                    + Circle::new((0, 0), 5, color.filled())
                    + Circle::new((0, 0), 5, BLACK)
            }))?
            .label(format!("class {class}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(common::font(14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    println!("wrote {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}
