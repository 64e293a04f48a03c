//! The loss plot a run leaves next to its checkpoint: training and validation loss against
//! step, as a PNG, with a dashed line at every step where the model grew. The loss is a
//! cross-entropy in nats per token, which the y axis says (nats per byte for the byte
//! tokenizer, read from the run's `config.json`). And curves against a
//! logarithmic axis (`plot_curves`: the growth experiment's validation loss against FLOPs).
//!
//! Text in a bitmap needs a font, and no font is guaranteed to be installed (containers, CI),
//! so DejaVu Sans (Bitstream Vera licence, see `models/assets/DejaVuSans-LICENSE.txt`) is built
//! into the binary and registered with plotters as its `sans-serif` family.

use std::path::Path;
use std::sync::OnceLock;

use crate::checkpoint::CONFIG_FILE;
use crate::files::TempFile;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use tokenformer_core::{Error, Result};

use crate::metrics::Record;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (1000, 600);
/// The loss plot's margins and label areas, in pixels: what is left of `SIZE.0` is the width of
/// the plotting area.
const MARGIN: (u32, u32) = (16, 32);
const Y_LABEL_AREA: u32 = 64;
/// The radius of a validation point's dot, in pixels.
const DOT_RADIUS: u32 = 4;

/// Registers the built-in font as plotters' `sans-serif` family (once per process). Call it
/// before drawing any text with plotters; `plot_run` does.
pub fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::format("models/assets/DejaVuSans.ttf", "not a usable font"))
    }
}

/// The steps after which a run's model grew: where the `stage` of its metrics rows changes
/// (rows without a stage count as stage 0).
pub fn growth_steps(records: &[Record]) -> Vec<u64> {
    let stage = |r: &Record| r.extra.get("stage").and_then(|s| s.as_u64()).unwrap_or(0);
    records.windows(2).filter(|w| stage(&w[1]) != stage(&w[0])).map(|w| w[0].step).collect()
}

/// The unit of a run's loss: a cross-entropy over tokens is in nats per token, and a token of
/// the byte tokenizer is a byte. Read from the `config.json` in `run_dir`; without a readable
/// one the answer is "nats per token", which holds for every tokenizer.
pub fn loss_unit(run_dir: &Path) -> &'static str {
    let tokenizer = std::fs::read(run_dir.join(CONFIG_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|config| config.get("tokenizer")?.as_str().map(str::to_owned));
    match tokenizer.as_deref() {
        Some("byte") => "nats per byte",
        _ => "nats per token",
    }
}

/// The step axis from 0 to a little past the last step, so that the last point's dot is drawn
/// whole rather than cut in half by the plot's right edge.
fn step_axis(x_max: f64) -> std::ops::Range<f64> {
    let end = x_max.max(1.0);
    let plot_width = (SIZE.0 - MARGIN.0 - MARGIN.1 - Y_LABEL_AREA) as f64;
    // Room for the dot and as much again, in steps: `pad` is that many pixels of the final axis.
    let pixels = 2.0 * DOT_RADIUS as f64 + 2.0;
    let pad = end * pixels / (plot_width - pixels);
    0.0..end + pad
}

/// Draws `train` and `val` (step, loss) points as two lines. Non-finite losses (a diverged step)
/// are left out. The picture is drawn in memory, encoded as PNG into a new temporary file
/// (created exclusively: never through a link planted in the run directory) and renamed over
/// `path`, so a reader (or a crash) never sees half a PNG.
///
/// A vertical dashed line marks each step of `growth` (the model grew there). The y axis names
/// the loss's unit ([`loss_unit`] of the directory `path` is in).
pub fn plot_run(
    path: &Path,
    train: &[(u64, f64)],
    val: &[(u64, f64)],
    growth: &[u64],
    title: &str,
) -> Result<()> {
    ensure_font()?;
    let finite = |pts: &[(u64, f64)]| -> Vec<(f64, f64)> {
        pts.iter().filter(|p| p.1.is_finite()).map(|&(s, l)| (s as f64, l)).collect()
    };
    let (train, val) = (finite(train), finite(val));
    let all = train.iter().chain(&val);
    let Some(x_max) = all.clone().map(|p| p.0).reduce(f64::max) else {
        return Err(Error::invalid(format!("{}: no finite losses to plot", path.display())));
    };
    let y_min = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    // A little headroom, and a non-empty range even when every loss is equal.
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let x_range = step_axis(x_max);
    let y_desc = format!("loss ({})", loss_unit(path.parent().unwrap_or(Path::new("."))));
    let y_range = (y_min - pad).max(0.0)..y_max + pad;
    let chart_y = y_range.clone();

    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(MARGIN.0)
            .margin_right(MARGIN.1)
            .x_label_area_size(48)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(x_range, chart_y)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc.as_str())
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let grey = RGBColor(110, 110, 110);
        let (y_low, y_high) = (y_range.start, y_range.end);
        for (i, &step) in growth.iter().enumerate() {
            let x = step as f64;
            let dashes =
                DashedLineSeries::new([(x, y_low), (x, y_high)], 8, 6, grey.stroke_width(2));
            let drawn = chart.draw_series(dashes)?;
            if i == 0 {
                drawn.label("growth").legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(2))
                });
            }
        }
        if !train.is_empty() {
            chart.draw_series(LineSeries::new(train, blue.stroke_width(2)))?.label("train").legend(
                move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue.stroke_width(2)),
            );
        }
        if !val.is_empty() {
            // Validation runs every few hundred steps: mark its points, not just the line.
            chart
                .draw_series(LineSeries::new(val.clone(), orange.stroke_width(2)))?
                .label("validation")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], orange.stroke_width(2))
                });
            chart.draw_series(val.iter().map(|&p| Circle::new(p, DOT_RADIUS, orange.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    })();
    // Drawing into memory fails only on a plotting bug; say so in a sentence.
    drawn.map_err(|e| Error::invalid(format!("{}: cannot draw the plot: {e}", path.display())))?;
    write_png(path, &pixels, SIZE)
}

/// One line of [`plot_curves`]: its (x, y) points and the points to mark on it.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn as triangles on the line (growth points, in the growth experiment).
    pub marks: Vec<(f64, f64)>,
    /// (x, low, high): a shaded band around the line (the spread over seeds); empty for none.
    pub band: Vec<(f64, f64, f64)>,
}

/// What [`plot_curves`] draws besides the curves.
pub struct CurvesChart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// The legend entry of the marks.
    pub marks_label: &'a str,
    /// A horizontal dashed line at this y, with its legend entry.
    pub reference: Option<(f64, &'a str)>,
}

/// The line colours of [`plot_curves`], in curve order (matplotlib's first six).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws several curves against a logarithmic x axis (points with x ≤ 0 or a non-finite
/// coordinate are left out), each with its marks, and an optional horizontal reference line;
/// written as [`plot_run`] writes its PNG.
pub fn plot_curves(path: &Path, curves: &[Curve], chart: &CurvesChart) -> Result<()> {
    ensure_font()?;
    let keep = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        pts.iter().copied().filter(|&(x, y)| x > 0.0 && x.is_finite() && y.is_finite()).collect()
    };
    let curves: Vec<Curve> = curves
        .iter()
        .map(|c| Curve {
            label: c.label.clone(),
            points: keep(&c.points),
            marks: keep(&c.marks),
            band: c
                .band
                .iter()
                .copied()
                .filter(|&(x, lo, hi)| x > 0.0 && x.is_finite() && lo.is_finite() && hi.is_finite())
                .collect(),
        })
        .collect();
    let band_edges =
        curves.iter().flat_map(|c| c.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter().chain(&c.marks))
        .copied()
        .chain(band_edges)
        .collect();
    if all.is_empty() {
        return Err(Error::invalid(format!("{}: no points to plot", path.display())));
    }
    let x_min = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let reference = chart.reference.filter(|r| r.0.is_finite());
    let ys = all.iter().map(|p| p.1).chain(reference.map(|r| r.0));
    let y_min = ys.clone().fold(f64::INFINITY, f64::min);
    let y_max = ys.fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let y_range = (y_min - pad).max(0.0)..y_max + pad;
    // A little room either side on the log axis, and a non-empty range for a single point.
    let x_range = (x_min / 1.15)..(x_max * 1.15);

    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut plot = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 24))
            .margin(16)
            .margin_right(32)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.log_scale(), y_range.clone())?;
        plot.configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .x_label_formatter(&log_label)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let grey = RGBColor(110, 110, 110);
        if let Some((y, label)) = reference {
            let line = DashedLineSeries::new(
                [(x_min / 1.15, y), (x_max * 1.15, y)],
                8,
                6,
                grey.stroke_width(2),
            );
            plot.draw_series(line)?.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(2))
            });
        }
        for (i, curve) in curves.iter().enumerate().filter(|(_, c)| c.band.len() > 1) {
            let colour = PALETTE[i % PALETTE.len()];
            let outline: Vec<(f64, f64)> = curve
                .band
                .iter()
                .map(|&(x, _, hi)| (x, hi))
                .chain(curve.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                .collect();
            plot.draw_series(std::iter::once(Polygon::new(outline, colour.mix(0.18).filled())))?;
        }
        for (i, curve) in curves.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let points = &curve.points;
            plot.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(curve.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            plot.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
        let mut first_marks = true;
        for (i, curve) in curves.iter().enumerate() {
            let (colour, marks) = (PALETTE[i % PALETTE.len()], &curve.marks);
            let drawn = plot.draw_series(marks.iter().map(|&p| {
                EmptyElement::at(p)
                    + TriangleMarker::new((0, 0), 9, colour.filled())
                    + TriangleMarker::new((0, 0), 9, BLACK.stroke_width(1))
            }))?;
            if first_marks && !marks.is_empty() {
                first_marks = false;
                drawn
                    .label(chart.marks_label)
                    .legend(|(x, y)| TriangleMarker::new((x + 10, y), 9, BLACK.stroke_width(1)));
            }
        }
        plot.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    })();
    drawn.map_err(|e| Error::invalid(format!("{}: cannot draw the plot: {e}", path.display())))?;
    write_png(path, &pixels, SIZE)
}

/// A label for a tick of a logarithmic axis: 1, 2 and 5 times a power of ten get one (`2e12`),
/// the ticks between them none, so labels do not run into each other.
fn log_label(x: &f64) -> String {
    if !(*x > 0.0 && x.is_finite()) {
        return String::new();
    }
    let power = x.log10().floor();
    let mantissa = x / 10f64.powf(power);
    let near = |m: f64| (mantissa - m).abs() < 0.05 || (mantissa - 10.0 * m).abs() < 0.5;
    if near(1.0) || near(2.0) || near(5.0) {
        format!("{x:.0e}")
    } else {
        String::new()
    }
}

/// Encodes RGB `pixels` as a PNG at `path` through an exclusive temporary file and a rename.
fn write_png(path: &Path, pixels: &[u8], (width, height): (u32, u32)) -> Result<()> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            (if dir.as_os_str().is_empty() { Path::new(".") } else { dir }, name.to_string_lossy())
        }
        _ => return Err(Error::invalid(format!("{}: not a file path", path.display()))),
    };
    let mut temp = TempFile::create(dir, &name)?;
    encode_png(temp.file(), pixels, (width, height))
        .and_then(|()| temp.file().sync_all())
        .map_err(|e| Error::io(path.display(), format!("cannot write the plot: {e}")))?;
    temp.rename_to_final()
}

/// The PNG encoding itself, to any writer; failures come back as plain I/O errors (a full disk
/// reads "No space left on device"), never as debug text.
fn encode_png(
    out: impl std::io::Write,
    pixels: &[u8],
    (width, height): (u32, u32),
) -> std::io::Result<()> {
    let to_io = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    let mut buffered = std::io::BufWriter::new(out);
    let mut encoder = png::Encoder::new(&mut buffered, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(to_io)?;
    writer.write_image_data(pixels).map_err(to_io)?;
    writer.finish().map_err(to_io)?;
    std::io::Write::flush(&mut buffered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("tf-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let train: Vec<(u64, f64)> = (0..=500)
            .map(|s| (s, 1.5 + 3.0 * (-(s as f64) / 80.0).exp() + 0.05 * ((s as f64) * 0.7).sin()))
            .collect();
        let mut val: Vec<(u64, f64)> =
            (0..=5).map(|i| (i * 100, 1.6 + 3.0 * (-(i as f64) * 100.0 / 80.0).exp())).collect();
        val.push((550, f64::NAN));
        plot_run(&path, &train, &val, &[], "tiny on tinyshakespeare").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 1000);
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(plot_run(&dir.join("none.png"), &[], &[(1, f64::NAN)], &[], "x").is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        // A full disk is one plain sentence, not debug text.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let e = encode_png(full, &[0; 300 * 200 * 3], (300, 200)).unwrap_err().to_string();
        assert!(e.contains("No space left on device") && !e.contains("Os {"), "{e}");
        if std::env::var_os("KEEP_PLOT").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn the_last_point_is_drawn_whole() {
        let plot_width = (SIZE.0 - MARGIN.0 - MARGIN.1 - Y_LABEL_AREA) as f64;
        for x_max in [1.0, 7.0, 300.0, 20_000.0] {
            let axis = step_axis(x_max);
            let pixels_right = (axis.end - x_max) / (axis.end - axis.start) * plot_width;
            assert!(pixels_right >= DOT_RADIUS as f64 + 1.0, "{x_max}: {pixels_right} px");
            assert!(pixels_right < 20.0, "{x_max}: {pixels_right} px wasted");
        }
    }

    #[test]
    fn the_loss_unit_follows_the_tokenizer() {
        let dir = std::env::temp_dir().join(format!("tf-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(loss_unit(&dir), "nats per token");
        let config =
            |tokenizer: &str| format!("{{\"preset\": \"tiny\", \"tokenizer\": \"{tokenizer}\"}}");
        std::fs::write(dir.join(CONFIG_FILE), config("byte")).unwrap();
        assert_eq!(loss_unit(&dir), "nats per byte");
        std::fs::write(dir.join(CONFIG_FILE), config("gpt2")).unwrap();
        assert_eq!(loss_unit(&dir), "nats per token");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn curves_on_a_log_axis() {
        let dir = std::env::temp_dir().join(format!("tf-plot-curves-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let curve = |label: &str, scale: f64| Curve {
            label: label.into(),
            points: (1..=20).map(|i| (scale * 1e9 * i as f64, 3.0 / (i as f64).sqrt())).collect(),
            marks: vec![(scale * 5e9, 3.0 / 5f64.sqrt())],
            band: (1..=20)
                .map(|i| (scale * 1e9 * i as f64, 2.9 / (i as f64).sqrt(), 3.1 / (i as f64).sqrt()))
                .collect(),
        };
        let mut curves = vec![curve("a", 1.0), curve("b", 0.6)];
        // Points a log axis cannot show are left out, not an error.
        curves[0].points.push((0.0, 1.0));
        curves[1].points.push((2e9, f64::NAN));
        curves[1].band.push((2e9, f64::NAN, 1.0));
        let chart = CurvesChart {
            title: "t",
            x_desc: "FLOPs",
            y_desc: "loss",
            marks_label: "growth",
            reference: Some((0.8, "target")),
        };
        plot_curves(&path, &curves, &chart).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 1000 && &bytes[1..4] == b"PNG");
        let empty =
            [Curve { label: "x".into(), points: vec![(0.0, 1.0)], marks: vec![], band: vec![] }];
        assert!(plot_curves(&dir.join("none.png"), &empty, &chart).is_err());
        assert_eq!(
            [1e12, 2e12, 3e12, 5e12, 9.99e12].map(|x| log_label(&x)),
            ["1e12", "2e12", "", "5e12", "1e13"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
