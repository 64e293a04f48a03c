//! What the examples share: where their pictures go, the two kinds of picture they draw
//! (curves against a step axis, and heatmaps), and for the language-model examples the corpus
//! and a plain training loop. Each example uses only a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use tokenformer::autograd::no_grad;
use tokenformer::core::{Device, Error, Tensor};
use tokenformer::models::data::{val_windows, Batch, Batcher, Tokenizer, DEFAULT_CORPUS};
use tokenformer::models::generate::{generate, SampleOptions};
use tokenformer::models::optim::{clip_global_norm, lr_at, Optimizer};
use tokenformer::models::{ModelConfig, TokenFormer};
use tokenformer::ops::adamw::AdamW;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How an example ends: an error is one line, `error: …`, and exit status 1, as the
/// `tokenformer` command does (returning the error from `main` would print its Rust form).
pub fn exit_code(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Refuses a count flag outside `range`, before anything is allocated for it.
pub fn check_count(flag: &str, value: usize, range: std::ops::RangeInclusive<usize>) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(format!("--{flag} must be in {}..={}, got {value}", range.start(), range.end()).into())
}

/// Where an example writes its pictures when no `--out` is given (ignored by git).
pub const DEFAULT_OUT: &str = "runs/examples";

/// Creates `dir` and registers the plot font; returns the path of `name` in it.
pub fn out_file(dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    tokenformer::models::plot::ensure_font()?;
    Ok(dir.join(name))
}

pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
/// BLUE faded towards white, for a noisy series drawn behind its smoothed one.
pub const PALE_BLUE: RGBColor = RGBColor(166, 203, 227);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const RED: RGBColor = RGBColor(214, 39, 40);
pub const GREY: RGBColor = RGBColor(120, 120, 120);

pub fn font(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&BLACK)
}

// ---- curves ----

pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (for sparse series such as validation losses).
    pub dots: bool,
}

/// Curves of y against x in `area`, with a dashed vertical line at each of `marks` (named in
/// the legend). With `log_y` the y axis is logarithmic (losses that fall by decades).
pub fn draw_curves(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    log_y: bool,
    curves: &[Curve],
    marks: &[(f64, String)],
    legend: SeriesLabelPosition,
) -> Result<()> {
    // A log axis is drawn as a linear axis over log10(y), labelled with y itself.
    let to_axis = |y: f64| if log_y { y.log10() } else { y };
    let series: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|c| {
            let finite = c.points.iter().filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0));
            finite.map(|&(x, y)| (x, to_axis(y))).collect()
        })
        .collect();
    let all = || series.iter().flatten();
    let x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min).min(x_max - 1.0);
    let y_min = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if !y_min.is_finite() {
        return Err(Error::invalid(format!("{title}: nothing to plot")).into());
    }
    let pad = ((y_max - y_min) * 0.06).max(1e-3);
    let (lo, hi) = (y_min - pad, y_max + 2.5 * pad);
    let mut chart = ChartBuilder::on(area)
        .caption(title, font(20))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A little room past the last point, so that its dot is drawn whole.
        .build_cartesian_2d(x_min..x_max + (x_max - x_min) * 0.015, lo..hi)?;
    let y_label = |v: &f64| {
        if log_y {
            let y = 10f64.powf(*v);
            if (0.01..1000.0).contains(&y) {
                format!("{y:.3}")
            } else {
                format!("{y:.0e}")
            }
        } else {
            format!("{v:.2}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| if x_max >= 10.0 { format!("{x:.0}") } else { format!("{x:.1}") })
        .y_label_formatter(&y_label)
        .label_style(font(14))
        .axis_desc_style(font(16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (c, pts) in curves.iter().zip(&series) {
        let color = c.color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if c.dots {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    for (x, label) in marks {
        let at = |k: f64| lo + (hi - lo) * k / 60.0;
        let dashes = (0..60).step_by(2).map(|i| {
            PathElement::new([(*x, at(i as f64)), (*x, at(i as f64 + 1.0))], BLACK.stroke_width(1))
        });
        chart.draw_series(dashes)?.label(label.clone()).legend(|(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new([(0, 0), (6, 0)], BLACK.stroke_width(1))
                + PathElement::new([(12, 0), (18, 0)], BLACK.stroke_width(1))
        });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font(font(14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

// ---- heatmaps ----

/// A colour for t in [0, 1] on a perceptually even scale from dark purple to yellow (anchor
/// points of matplotlib's viridis).
pub fn sequential(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 5] =
        [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)];
    blend(&ANCHORS, t)
}

/// A colour for t in [−1, 1]: blue for negative, white at 0, red for positive.
pub fn diverging(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 5] =
        [(5, 48, 97), (103, 169, 207), (247, 247, 247), (239, 138, 98), (103, 0, 31)];
    blend(&ANCHORS, (t + 1.0) / 2.0)
}

fn blend(anchors: &[(u8, u8, u8)], t: f64) -> RGBColor {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (anchors.len() - 1) as f64;
    let i = (x.floor() as usize).min(anchors.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (anchors[i], anchors[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

pub struct Heatmap<'a> {
    pub title: String,
    /// rows × cols, row-major.
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    pub x_desc: String,
    pub y_desc: String,
    /// Values mapped to the ends of the colour scale.
    pub range: (f32, f32),
    /// Diverging scale centred on 0 (for signed values) instead of a sequential one.
    pub signed: bool,
}

/// Labels fit one per cell when the cell is at least this many pixels (the labels' font size
/// and a little air); with smaller cells only every k-th is written.
const LABEL_PIXELS: f64 = 11.0 * 1.1;

/// How many labels of `count` cells spread over `length` pixels are written: every k-th.
fn label_every(length: usize, count: usize) -> usize {
    let cell = length as f64 / count.max(1) as f64;
    ((LABEL_PIXELS / cell).ceil() as usize).max(1)
}

/// The side of a square heatmap panel, between `min` and `max` pixels, on which each of `cells`
/// rows and columns gets a label of its own where that fits (see [`draw_heatmap`]'s margins).
pub fn heatmap_side(cells: usize, min: u32, max: u32) -> u32 {
    let needed = (HEATMAP_MARGINS.0 + HEATMAP_MARGINS.2) as f64 + LABEL_PIXELS * cells as f64;
    (needed.ceil() as u32 + 2).clamp(min, max)
}

/// The margins of a heatmap around its cells: left, top, right (labels, title, colour bar)
/// and bottom.
const HEATMAP_MARGINS: (i32, i32, i32, i32) = (56, 34, 70, 46);

/// Draws a heatmap filling `area`: cells, row and column labels (every label when the cells
/// are large enough to hold one, else every k-th, which the title then says), a title and a
/// colour bar.
pub fn draw_heatmap(area: &DrawingArea<BitMapBackend, Shift>, h: &Heatmap) -> Result<()> {
    let (width, height) = area.dim_in_pixel();
    let (width, height) = (width as i32, height as i32);
    let (left, top, right, bottom) = HEATMAP_MARGINS;
    let cell_w = ((width - left - right) as f64 / h.cols as f64).max(1.0);
    let cell_h = ((height - top - bottom) as f64 / h.rows as f64).max(1.0);
    let x_at = |c: usize| left + (c as f64 * cell_w).round() as i32;
    let y_at = |r: usize| top + (r as f64 * cell_h).round() as i32;
    let row_every = label_every((height - top - bottom).max(1) as usize, h.rows);
    let col_every = label_every((width - left - right).max(1) as usize, h.cols);
    let title = match row_every.max(col_every) {
        1 => h.title.clone(),
        k => format!("{} (one label in {k} shown)", h.title),
    };
    area.draw(&Text::new(title, (left, 8), font(17)))?;
    let (lo, hi) = (h.range.0 as f64, h.range.1 as f64);
    let color_of = |v: f64| {
        if h.signed {
            let m = lo.abs().max(hi.abs()).max(1e-12);
            diverging(v / m)
        } else {
            sequential((v - lo) / (hi - lo).max(1e-12))
        }
    };
    for r in 0..h.rows {
        for c in 0..h.cols {
            let v = h.values[r * h.cols + c] as f64;
            let rect = [(x_at(c), y_at(r)), (x_at(c + 1), y_at(r + 1))];
            area.draw(&Rectangle::new(rect, color_of(v).filled()))?;
        }
    }
    let label_font = font(11);
    for (r, label) in h.row_labels.iter().enumerate().step_by(row_every) {
        let y = y_at(r) + (cell_h / 2.0) as i32;
        let anchor = Pos::new(HPos::Right, VPos::Center);
        area.draw(&Text::new(label.clone(), (left - 4, y), label_font.pos(anchor)))?;
    }
    for (c, label) in h.col_labels.iter().enumerate().step_by(col_every) {
        let x = x_at(c) + (cell_w / 2.0) as i32;
        let anchor = Pos::new(HPos::Center, VPos::Top);
        let y = y_at(h.rows) + 3;
        area.draw(&Text::new(label.clone(), (x, y), label_font.pos(anchor)))?;
    }
    let anchor = Pos::new(HPos::Center, VPos::Bottom);
    let x_mid = (x_at(0) + x_at(h.cols)) / 2;
    area.draw(&Text::new(h.x_desc.clone(), (x_mid, height - 4), font(13).pos(anchor)))?;
    let y_mid = (y_at(0) + y_at(h.rows)) / 2;
    let vertical =
        font(13).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Center, VPos::Top));
    area.draw(&Text::new(h.y_desc.clone(), (4, y_mid), vertical))?;
    // The colour bar, with its two ends labelled.
    let (bar_x, bar_top, bar_bottom) = (x_at(h.cols) + 14, y_at(0), y_at(h.rows));
    let steps = (bar_bottom - bar_top).max(1);
    for i in 0..steps {
        let t = 1.0 - i as f64 / steps as f64;
        let v = lo + (hi - lo) * t;
        let rect = [(bar_x, bar_top + i), (bar_x + 12, bar_top + i + 1)];
        area.draw(&Rectangle::new(rect, color_of(v).filled()))?;
    }
    // The two ends, and 0 where the range straddles it.
    let mut marks = vec![(hi, bar_top, VPos::Top), (lo, bar_bottom, VPos::Bottom)];
    if lo < 0.0 && hi > 0.0 {
        let zero_at = bar_top + ((hi / (hi - lo)) * (bar_bottom - bar_top) as f64).round() as i32;
        // Left out where it would overprint an end's label.
        if zero_at - bar_top > 14 && bar_bottom - zero_at > 14 {
            marks.push((0.0, zero_at, VPos::Center));
        }
    }
    for (v, y, v_pos) in marks {
        let text = format!("{v:.2}");
        area.draw(&Text::new(text, (bar_x + 15, y), font(11).pos(Pos::new(HPos::Left, v_pos))))?;
    }
    Ok(())
}

/// A byte as a one-character label: letters as they are, a space as ␣, a newline as ⏎.
pub fn byte_label(b: u8) -> String {
    match b {
        b' ' => "␣".into(),
        b'\n' => "⏎".into(),
        b if b.is_ascii_graphic() => (b as char).to_string(),
        b => format!("{b:02x}"),
    }
}

// ---- the language-model examples ----

/// Tiny shakespeare as bytes: the first 90% to train on, the rest to validate.
pub struct Corpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub tokenizer: Tokenizer,
}

impl Corpus {
    pub fn tiny_shakespeare() -> Result<Corpus> {
        let tokenizer = Tokenizer::from_name("byte")?;
        let mut train = tokenizer.encode_bytes(DEFAULT_CORPUS)?;
        let val = train.split_off(train.len() * 9 / 10);
        Ok(Corpus { train, val, tokenizer })
    }
}

/// The `tiny` preset for byte-level text.
pub fn tiny_config(tokenizer: Tokenizer) -> Result<ModelConfig> {
    let mut config = ModelConfig::preset("tiny")?;
    config.vocab_size = tokenizer.padded_vocab_size();
    config.tokenizer = tokenizer.name().into();
    Ok(config)
}

/// A batch as (inputs, targets) tensors on `device`.
pub fn batch_tensors(batch: Batch, device: Device) -> Result<(Tensor, Tensor)> {
    let dims = [batch.batch, batch.seq];
    let inputs = Tensor::from_vec(batch.inputs, &dims)?.to_device(device)?;
    let targets = Tensor::from_vec(batch.targets, &dims)?.to_device(device)?;
    Ok((inputs, targets))
}

/// The plain training loop the CLI's trainer runs, without its checkpoints and metrics files:
/// random windows, forward, backward, global-norm clipping, AdamW on a warmup-cosine schedule.
pub struct Trainer {
    pub model: TokenFormer,
    pub optimizer: Optimizer,
    pub batcher: Batcher,
    pub step: u64,
    /// The schedule's length: the learning rate reaches `min_lr` here.
    pub total_steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub clip: f32,
    /// (step, training loss) of every step so far.
    pub losses: Vec<(f64, f64)>,
}

impl Trainer {
    pub fn new(model: TokenFormer, batch: usize, seq: usize, total_steps: u64) -> Result<Trainer> {
        let hp = AdamW { lr: 5e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        Ok(Trainer {
            optimizer: Optimizer::new(&model, hp)?,
            model,
            batcher: Batcher::new(1337, batch, seq)?,
            step: 0,
            total_steps,
            lr: 5e-3,
            min_lr: 5e-4,
            warmup: 30.min(total_steps / 4),
            clip: 1.0,
            losses: Vec::new(),
        })
    }

    /// One optimizer step on a fresh random batch; returns its loss.
    pub fn step(&mut self, data: &[u32]) -> Result<f64> {
        let (inputs, targets) = batch_tensors(self.batcher.next_batch(data)?, self.model.device())?;
        let loss = self.model.loss(&inputs, &targets)?;
        let grads = loss.backward()?;
        let mut grads = self
            .model
            .named_params()
            .iter()
            .map(|(name, p)| {
                grads
                    .get(p)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("no gradient for {name}")))
            })
            .collect::<std::result::Result<Vec<Tensor>, Error>>()?;
        clip_global_norm(&mut grads, self.clip)?;
        let lr = lr_at(self.step, self.warmup, self.total_steps, self.lr, self.min_lr);
        self.optimizer.update(&mut self.model, &grads, lr)?;
        self.step += 1;
        let loss = loss.value().to_scalar()? as f64;
        self.losses.push((self.step as f64, loss));
        Ok(loss)
    }

    /// `n` steps, printing the loss every `every` steps.
    pub fn run(&mut self, data: &[u32], n: u64, every: u64) -> Result<()> {
        for _ in 0..n {
            let loss = self.step(data)?;
            if self.step.is_multiple_of(every) {
                println!("  step {:>4}: loss {loss:.4}", self.step);
            }
        }
        Ok(())
    }
}

/// Mean loss over the first `windows` validation windows of `seq` tokens (the same windows
/// every time, so two calls measure the model, not the draw).
pub fn validation_loss(
    model: &TokenFormer,
    val: &[u32],
    seq: usize,
    windows: usize,
) -> Result<f64> {
    let (mut total, mut count) = (0.0f64, 0usize);
    for batch in val_windows(val, 16, seq, windows)? {
        let n = batch.batch * batch.seq;
        let (inputs, targets) = batch_tensors(batch, model.device())?;
        let loss = no_grad(|| model.loss(&inputs, &targets))?.value().to_scalar()?;
        total += loss as f64 * n as f64;
        count += n;
    }
    Ok(total / count as f64)
}

/// `n` bytes of text continuing `prompt`, sampled at temperature 0.8 from the 40 likeliest.
pub fn sample(model: &TokenFormer, tokenizer: Tokenizer, prompt: &str, n: usize) -> Result<String> {
    let ids = tokenizer.encode(prompt)?;
    let opts = SampleOptions { max_tokens: n, temperature: 0.8, top_k: Some(40), seed: 7 };
    let out = generate(model, &ids, &opts, |_| Ok(()))?;
    Ok(format!("{prompt}{}", tokenizer.decode(&out)))
}

/// Shows a sample indented under a heading, one line per line of text.
pub fn print_sample(text: &str) {
    for line in text.lines() {
        println!("  | {line}");
    }
}
