//! What a small TokenFormer looks at: attention probabilities and Pattention scores, drawn.
//!
//! Trains preset `tiny` (4 layers, 4 heads, byte-level) for a few hundred steps on tiny
//! shakespeare, then runs it on one sentence with the forward pass written out kernel by
//! kernel, so that the values the model computes and throws away can be kept:
//!
//! - the attention probabilities of every head of one layer, P = softmax(q·kᵀ/√d_h) over the
//!   earlier positions: which earlier characters each character reads from;
//! - the scores S = Θ(x·Kᵀ) of that layer's feed-forward Pattention against its 512 parameter
//!   tokens: which tokens each character switches on. A token that responds to a few
//!   characters only is a learned detector; its value vector is what it writes back.
//!
//! The written-out forward is checked against `TokenFormer::forward` (same logits), so the
//! pictures show the model itself. Both heatmaps are written as PNGs.
//!
//! ```sh
//! cargo run --release --example attention_heads
//! cargo run --release --example attention_heads -- --layer 1 --text "KING RICHARD III:"
//! ```
//!
//! After 300 steps the heads of layer 0 are already specialised: one reads the character
//! itself, others the one or two before it or the start of the current word. In layer 1 most
//! queries park their attention on one early position (the line break), a common pattern in
//! trained transformers. The feed-forward Pattention tokens of layer 0 sort themselves into
//! detectors: of spaces, of punctuation and line breaks, of vowels, of the last letter of a
//! word, of a few consonants. The program prints the strongest token of each such group (the
//! tokens that respond most to the same character).
//!
//! Every character of the sentence is labelled on both axes of the attention heatmaps (the
//! picture grows with the sentence, up to a limit past which every k-th one is, as the title
//! then says). The Pattention heatmap's colours span the scores' own range, lowest to highest.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use common::{byte_label, draw_heatmap, heatmap_side, out_file, Corpus, Heatmap, Result, Trainer};
use plotters::prelude::*;
use tokenformer::autograd::no_grad;
use tokenformer::core::Tensor;
use tokenformer::models::model::Projection;
use tokenformer::models::TokenFormer;
use tokenformer::ops::{
    binary, embedding, layer_norm, layout, matmul, pattention_norm, rope, softmax,
};

#[derive(Parser)]
#[command(about = "Heatmaps of attention probabilities and Pattention scores of a small model")]
struct Args {
    /// Training steps before looking (batch 8 × 64 bytes).
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// The layer to draw (0-based).
    #[arg(long, default_value_t = 0)]
    layer: usize,
    /// The sentence to look at.
    #[arg(long, default_value = "First Citizen:\nBefore we proceed any further, hear me speak.")]
    text: String,
    /// Parameter tokens shown in the Pattention heatmap (the most active ones).
    #[arg(long, default_value_t = 48)]
    tokens: usize,
    /// A few training steps (for tests).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = common::DEFAULT_OUT)]
    out: PathBuf,
}

/// LayerNorm's ε, as in the model.
const LN_EPS: f32 = 1e-5;

/// What one layer computed for the sentence.
struct LayerView {
    /// [H, T, T]: row i of head h is the distribution of query i over keys 0..=i.
    attention: Vec<f32>,
    /// [T, n]: Θ-normalised scores of each position against the feed-forward parameter tokens.
    ffn_scores: Vec<f32>,
}

/// S = Θ(x·Kᵀ) and O = S·V of one Pattention, on plain tensors.
fn pattention(p: &Projection, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = p.pattention().ok_or("this example looks inside a TokenFormer's Pattentions")?;
    let scores = matmul::matmul(x, p.key_tokens.value(), false, true)?;
    let s = pattention_norm::pattention_norm(&scores, p.norm, p.tau())?;
    let out = matmul::matmul(&s, p.value_tokens.value(), false, false)?;
    Ok((s, out))
}

/// The model's forward pass on one sequence, written out with the kernels (see
/// `models/src/model/language_model.rs` for the same in `Var`s), keeping what each layer computed.
/// Returns the logits [1, T, V] and one view per layer.
fn forward_written_out(model: &TokenFormer, ids: &[u32]) -> Result<(Tensor, Vec<LayerView>)> {
    let cfg = &model.config;
    let (t, h, dh, d) = (ids.len(), cfg.n_heads, cfg.head_dim(), cfg.d_model);
    let ids = Tensor::from_vec(ids.iter().map(|&i| i as f32).collect(), &[1, t])?;
    let (cos, sin) = rope::rope_tables(cfg.max_seq_len, cfg.rotary_dims(), cfg.rotary_base)?;
    let heads = |x: Tensor| layout::permute(&x.reshape(&[1, t, h, dh])?, &[0, 2, 1, 3]);
    let mut x = embedding::embedding(model.embed.value(), &ids)?;
    let mut views = Vec::new();
    for layer in &model.layers {
        let y = layer_norm::layer_norm(&x, None, None, LN_EPS)?.0;
        let mut q = heads(pattention(&layer.query, &y)?.1)?;
        let mut k = heads(pattention(&layer.key, &y)?.1)?;
        let v = heads(pattention(&layer.value, &y)?.1)?;
        if cfg.rotary_dims() > 0 {
            q = rope::rope(&q, &cos, &sin)?;
            k = rope::rope(&k, &cos, &sin)?;
        }
        // P = causal softmax of q·kᵀ/√d_h; every head's [T, T] block.
        let scale = (1.0 / (dh as f64).sqrt()) as f32;
        let probs = softmax::causal_softmax(&matmul::matmul(&q, &k, false, true)?, scale)?;
        let attended = matmul::matmul(&probs, &v, false, false)?;
        let attended = layout::permute(&attended, &[0, 2, 1, 3])?.reshape(&[1, t, d])?;
        x = binary::add(&x, &pattention(&layer.proj, &attended)?.1)?;
        let z = layer_norm::layer_norm(&x, None, None, LN_EPS)?.0;
        let (ffn_scores, ffn_out) = pattention(&layer.mlp, &z)?;
        x = binary::add(&x, &ffn_out)?;
        views.push(LayerView { attention: probs.to_vec()?, ffn_scores: ffn_scores.to_vec()? });
    }
    let weight = model.final_norm_weight.value();
    let bias = model.final_norm_bias.value();
    let hidden = layer_norm::layer_norm(&x, Some(weight), Some(bias), LN_EPS)?.0;
    let logits = matmul::matmul(&hidden, model.embed.value(), false, true)?;
    Ok((logits, views))
}

/// Where head `head`'s attention goes on average: to the query itself, to the character just
/// before it, or further back (mean distance, in characters).
fn describe_head(probs: &[f32], t: usize, head: usize) -> String {
    let block = &probs[head * t * t..(head + 1) * t * t];
    let (mut own, mut previous, mut distance) = (0.0, 0.0, 0.0);
    for i in 0..t {
        own += block[i * t + i] as f64;
        if i > 0 {
            previous += block[i * t + i - 1] as f64;
        }
        distance += (0..=i).map(|j| block[i * t + j] as f64 * (i - j) as f64).sum::<f64>();
    }
    let n = t as f64;
    format!(
        "head {head}: {:>4.0}% on itself, {:>4.0}% on the previous character, mean distance {:.1} characters",
        100.0 * own / n,
        100.0 * previous / (n - 1.0),
        distance / n
    )
}

/// What a detector responds to, where its characters are all of one kind.
fn detector_kind(chars: &[u8]) -> Option<&'static str> {
    let all = |f: fn(&u8) -> bool| !chars.is_empty() && chars.iter().all(f);
    if all(|&c| c == b' ') {
        Some("spaces")
    } else if all(|c| c.is_ascii_punctuation() || c.is_ascii_whitespace()) {
        Some("punctuation and breaks")
    } else if all(|c| b"aeiouAEIOU".contains(c)) {
        Some("vowels")
    } else if all(|c| c.is_ascii_alphabetic() && !b"aeiouAEIOU".contains(c)) {
        Some("consonants")
    } else {
        None
    }
}

fn main() -> ExitCode {
    common::exit_code(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    common::check_count("tokens", args.tokens, 1..=usize::MAX)?;
    let started = Instant::now();
    let steps = if args.quick { args.steps.min(3) } else { args.steps };
    let corpus = Corpus::tiny_shakespeare()?;
    let config = common::tiny_config(corpus.tokenizer)?;
    if args.layer >= config.n_layers {
        return Err(
            format!("--layer {}: the model has layers 0..{}", args.layer, config.n_layers).into()
        );
    }
    let ids = corpus.tokenizer.encode(&args.text)?;
    if ids.is_empty() || ids.len() > config.max_seq_len {
        return Err(format!("--text must hold 1 to {} bytes", config.max_seq_len).into());
    }
    let model = TokenFormer::init(&config, 1337, tokenformer::core::Device::Cpu)?;
    println!(
        "training tiny ({} parameters) for {steps} steps of 8 × 64 bytes of tiny shakespeare",
        tokenformer::models::progress::thousands(config.param_count())
    );
    let mut trainer = Trainer::new(model, 8, 64, steps)?;
    trainer.run(&corpus.train, steps, 50)?;
    let model = trainer.model;
    let val = common::validation_loss(&model, &corpus.val, 64, if args.quick { 4 } else { 64 })?;
    println!("validation loss {val:.3} nats per byte ({:.1} s)", started.elapsed().as_secs_f64());

    let (logits, views) = no_grad(|| forward_written_out(&model, &ids))?;
    let reference = no_grad(|| {
        model.forward(&Tensor::from_vec(ids.iter().map(|&i| i as f32).collect(), &[1, ids.len()])?)
    })?;
    let worst = logits
        .to_vec()?
        .iter()
        .zip(reference.value().to_vec()?)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("the written-out forward matches TokenFormer::forward: largest logit difference {worst:.1e}");
    if worst > 1e-3 {
        return Err("the written-out forward disagrees with the model".into());
    }

    let t = ids.len();
    let labels: Vec<String> = args.text.bytes().map(byte_label).collect();
    let view = &views[args.layer];
    let h = config.n_heads;
    println!("\nwhere the attention of \"{}\" goes:", args.text.escape_debug());
    for (i, layer) in views.iter().enumerate() {
        println!("  layer {i}");
        for head in 0..h {
            println!("    {}", describe_head(&layer.attention, t, head));
        }
    }

    let path = out_file(&args.out, "attention_heads.png")?;
    // Large enough for a label on every character of the default sentence, and of any up to
    // about 125 characters; a 2×2 grid of panels.
    let side = 2 * heatmap_side(t, 700, 1600);
    let root = BitMapBackend::new(&path, (side, side)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    for (head, panel) in panels.iter().enumerate().take(h) {
        let block = &view.attention[head * t * t..(head + 1) * t * t];
        draw_heatmap(
            panel,
            &Heatmap {
                title: format!("layer {} head {head}: attention probabilities", args.layer),
                values: block,
                rows: t,
                cols: t,
                row_labels: labels.clone(),
                col_labels: labels.clone(),
                x_desc: "key (the character read from)".into(),
                y_desc: "query (the character reading)".into(),
                range: (0.0, 1.0),
                signed: false,
            },
        )?;
    }
    root.present()?;
    println!("wrote {}", path.display());

    // The feed-forward Pattention: the most active parameter tokens, grouped by the character
    // each responds to most (its mean score over that character's occurrences), so detectors
    // of the same character sit side by side.
    let n = config.ffn_tokens;
    let scores = &view.ffn_scores;
    let text = args.text.as_bytes();
    let mut distinct: Vec<u8> = text.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    // mean_score[j][c]: token j's mean score over the occurrences of distinct[c].
    let mean_score: Vec<Vec<f32>> = (0..n)
        .map(|j| {
            distinct
                .iter()
                .map(|&ch| {
                    let at: Vec<usize> = (0..t).filter(|&i| text[i] == ch).collect();
                    at.iter().map(|&i| scores[i * n + j]).sum::<f32>() / at.len() as f32
                })
                .collect()
        })
        .collect();
    let best = |j: usize| -> (usize, f32) {
        let row = &mean_score[j];
        let c = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
        (c, row[c])
    };
    let mut chosen: Vec<usize> = (0..n).collect();
    chosen.sort_by(|&a, &b| best(b).1.total_cmp(&best(a).1));
    chosen.truncate(args.tokens.min(n));
    chosen.sort_by(|&a, &b| best(a).0.cmp(&best(b).0).then(best(b).1.total_cmp(&best(a).1)));
    let shown: Vec<f32> =
        (0..t).flat_map(|i| chosen.iter().map(move |&j| scores[i * n + j])).collect();
    // The colour scale spans the scores' own range, from the lowest to the highest: GELU is
    // never below −0.17 while the positive scores reach several units, so a scale symmetric
    // about 0 would leave most of its negative half unused.
    let low = shown.iter().copied().fold(0.0f32, f32::min);
    let high = shown.iter().copied().fold(0.0f32, f32::max);
    let path = out_file(&args.out, "pattention_scores.png")?;
    let root = BitMapBackend::new(&path, (1100, 1200)).into_drawing_area();
    root.fill(&WHITE)?;
    draw_heatmap(
        &root,
        &Heatmap {
            title: format!(
                "layer {} feed-forward Pattention: Θ(x·Kᵀ) for the {} most active of {n} parameter tokens",
                args.layer,
                chosen.len()
            ),
            values: &shown,
            rows: t,
            cols: chosen.len(),
            row_labels: labels.clone(),
            col_labels: chosen.iter().map(|j| j.to_string()).collect(),
            x_desc: format!(
                "parameter token   (colours span the scores' range: {low:.2} dark purple to {high:.2} yellow)"
            ),
            y_desc: "input character".into(),
            range: (low, high),
            signed: false,
        },
    )?;
    root.present()?;

    println!(
        "\nlayer {} feed-forward Pattention: what its most active parameter tokens respond to",
        args.layer
    );
    println!(
        "(the strongest token of each group that responds most to the same character, and the"
    );
    println!("characters of the sentence where its mean score is at least half its best)");
    let mut seen: Vec<usize> = Vec::new();
    let mut by_strength = chosen.clone();
    by_strength.sort_by(|&a, &b| best(b).1.total_cmp(&best(a).1));
    for &j in &by_strength {
        let (group, top) = best(j);
        if seen.contains(&group) {
            continue;
        }
        seen.push(group);
        let mut chars: Vec<(u8, f32)> = distinct
            .iter()
            .copied()
            .zip(mean_score[j].iter().copied())
            .filter(|&(_, s)| s >= 0.5 * top)
            .collect();
        chars.sort_by(|a, b| b.1.total_cmp(&a.1));
        let set = chars.iter().map(|&(ch, _)| byte_label(ch)).collect::<Vec<_>>().join(" ");
        let kind = detector_kind(&chars.iter().map(|&(ch, _)| ch).collect::<Vec<_>>());
        println!(
            "  token {j:>3} (score {top:.2}){}: {set}",
            kind.map_or(String::new(), |k| format!(", {k}"))
        );
        if seen.len() == 10 {
            break;
        }
    }
    println!("wrote {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}
