//! Loss of a model over a long token stream.
//!
//! The stream is cut into windows of at most max_seq_len + 1 ids starting at 0, T, 2T, …
//! (T = max_seq_len), so consecutive windows share one id: the last id of a window is the first
//! input of the next, and every id after the first is predicted exactly once. A last window of
//! fewer than 2 ids predicts nothing and is dropped. The result is the mean cross-entropy over
//! all predicted positions.

use crate::data::Tokenizer;
use crate::files::{bytes_text, open_regular, read_open};
use crate::memory;
use crate::model::TokenFormer;
use std::io::{Read, Write};
use std::path::Path;
use tokenformer_autograd::no_grad;
use tokenformer_core::{Error, Result, Tensor};
use tokenformer_ops::cross_entropy::cross_entropy;

pub struct EvalResult {
    /// Mean next-token cross-entropy in nats.
    pub loss: f64,
    /// Number of predicted positions.
    pub tokens: usize,
    /// With [`evaluate_tokens_per_position`]: the loss at every predicted position, in stream
    /// order. Entry i is −log p(ids[i+1] | the ids of its window before it): every id after
    /// the first is predicted exactly once, so there are `ids.len() − 1` of them.
    pub per_position: Option<Vec<f32>>,
}

/// Windows of equal length are stacked into batches of at most this many.
const EVAL_BATCH: usize = 8;

/// The mean loss of `model` over `ids`; `on_progress(windows_done, windows_total)` is called
/// after every batch (for a progress bar).
pub fn evaluate_tokens(
    model: &TokenFormer,
    ids: &[u32],
    on_progress: impl FnMut(usize, usize),
) -> Result<EvalResult> {
    evaluate(model, ids, false, on_progress)
}

/// [`evaluate_tokens`], also keeping the loss at every position (`per_position`), so that
/// another implementation can be compared token by token. Each is lse − logit of the target,
/// from the same logits and log-sum-exp as the mean, which is bit-identical to
/// `evaluate_tokens`'s.
pub fn evaluate_tokens_per_position(
    model: &TokenFormer,
    ids: &[u32],
    on_progress: impl FnMut(usize, usize),
) -> Result<EvalResult> {
    evaluate(model, ids, true, on_progress)
}

fn evaluate(
    model: &TokenFormer,
    ids: &[u32],
    per_position: bool,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<EvalResult> {
    let vocab = model.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::invalid(format!(
            "eval: token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let t = model.config.max_seq_len;
    let windows: Vec<&[u32]> = (0..ids.len())
        .step_by(t)
        .map(|start| &ids[start..(start + t + 1).min(ids.len())])
        .filter(|w| w.len() >= 2)
        .collect();
    if windows.is_empty() {
        return Err(Error::invalid(format!(
            "eval: {} token ids give no position to predict (need at least 2)",
            ids.len()
        )));
    }
    let mut total = 0.0f64;
    let mut count = 0usize;
    let mut losses = Vec::new();
    // Full windows first in batches, then the shorter last one on its own.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < EVAL_BATCH && windows[j].len() == len {
            j += 1;
        }
        let batch = &windows[i..j];
        let inputs: Vec<f32> =
            batch.iter().flat_map(|w| w[..len - 1].iter().map(|&x| x as f32)).collect();
        let targets: Vec<f32> =
            batch.iter().flat_map(|w| w[1..].iter().map(|&x| x as f32)).collect();
        let device = model.device();
        let dims = [batch.len(), len - 1];
        let inputs = Tensor::from_vec(inputs, &dims)?.to_device(device)?;
        let targets = Tensor::from_vec(targets, &dims)?.to_device(device)?;
        let mean = if per_position {
            // What `model.loss` computes, keeping each row's log-sum-exp.
            let logits = no_grad(|| model.forward(&inputs))?;
            let vocab = model.config.vocab_size;
            let rows = dims[0] * dims[1];
            let logits = logits.value().reshape(&[rows, vocab])?;
            let targets = targets.reshape(&[rows])?;
            let (mean, lse) = cross_entropy(&logits, &targets)?;
            let (logits, lse, targets) = (logits.to_vec()?, lse.to_vec()?, targets.to_vec()?);
            for (row, (&lse, &target)) in lse.iter().zip(&targets).enumerate() {
                losses.push(lse - logits[row * vocab + target as usize]);
            }
            mean.to_scalar()?
        } else {
            no_grad(|| model.loss(&inputs, &targets))?.value().to_scalar()?
        };
        if !mean.is_finite() {
            return Err(non_finite(model, &inputs, &format!("eval: the loss is {mean}")));
        }
        let n = batch.len() * (len - 1);
        total += mean as f64 * n as f64;
        count += n;
        i = j;
        on_progress(i, windows.len());
    }
    let per_position = per_position.then_some(losses);
    Ok(EvalResult { loss: total / count as f64, tokens: count, per_position })
}

/// The error for a loss or logits that are not finite, naming where in the model the first
/// non-finite value appears (`what` says what was seen).
pub fn non_finite(model: &TokenFormer, inputs: &Tensor, what: &str) -> Error {
    let place = match model.first_non_finite(inputs) {
        Ok(Some(place)) => format!("the first non-finite value appears at {place}"),
        Ok(None) => "every layer's output is finite; the loss itself overflows".into(),
        Err(e) => format!("no layer could be named ({e})"),
    };
    Error::invalid(format!(
        "{what}, not a number: {place}; the weights are too large for float32 arithmetic"
    ))
}

/// Parses whitespace-separated token ids, naming the first bad one (shortened: a file of
/// comma-separated ids is one huge item, not worth echoing).
pub fn parse_token_ids(text: &str, source: &str) -> Result<Vec<u32>> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>().map_err(|_| {
                let shown: String = s.chars().take(24).collect();
                let shown = if shown.len() < s.len() { format!("{shown}…") } else { shown };
                let hint = if s.contains(',') {
                    " (token ids are separated by whitespace, not commas)"
                } else {
                    ""
                };
                Error::format(
                    source,
                    format!(
                        "item {} ('{shown}') is not a non-negative integer token id{hint}",
                        i + 1
                    ),
                )
            })
        })
        .collect()
}

/// The bytes of the file `path`, or of standard input when `path` is `-`. A file is checked
/// against the machine's memory before it is read: it and what is made of it take `per_byte`
/// bytes of memory for each of its bytes.
pub fn read_input(path: &Path, what: &str, per_byte: u128) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin().lock().read_to_end(&mut bytes).map_err(|e| Error::io("stdin", e))?;
        return Ok(bytes);
    }
    let (file, len) = open_regular(path)?;
    memory::check(
        &format!("reading {} ({}) as {what}", path.display(), bytes_text(len)),
        Some(per_byte * u128::from(len)),
    )?;
    read_open(file, path, len, len, what)
}

/// The token ids of the text in `path` (`-`: standard input) under `tokenizer`: what `eval
/// --text` evaluates and `tokenize` writes.
pub fn text_token_ids(path: &Path, tokenizer: Tokenizer) -> Result<Vec<u32>> {
    // The text, then at most one id (4 bytes) per byte of it.
    let bytes = read_input(path, "text", 5)?;
    tokenizer.encode_bytes(&bytes)
}

/// Writes `ids` as `eval --tokens` reads them: whitespace-separated, 20 to a line.
pub fn write_token_ids(out: &mut impl Write, ids: &[u32], name: &str) -> Result<()> {
    for line in ids.chunks(20) {
        let text: Vec<String> = line.iter().map(u32::to_string).collect();
        writeln!(out, "{}", text.join(" ")).map_err(|e| Error::io(name, e))?;
    }
    out.flush().map_err(|e| Error::io(name, e))
}

/// Writes `ids` to a new file `path` (as [`write_token_ids`]); an existing file is never
/// replaced, and a file left half-written by an error is removed.
pub fn save_token_ids(path: &Path, ids: &[u32]) -> Result<()> {
    let file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::io(
                    path.display(),
                    "already exists; choose another --out (it is left as it is)",
                )
            } else {
                Error::io(path.display(), e)
            }
        })?;
    let mut out = std::io::BufWriter::new(file);
    let written = write_token_ids(&mut out, ids, &path.display().to_string());
    drop(out);
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}
