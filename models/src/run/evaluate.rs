//! Loss of a model over a long token stream.
//!
//! The stream is cut into windows of at most max_seq_len + 1 ids starting at 0, T, 2T, …
//! (T = max_seq_len), so consecutive windows share one id: the last id of a window is the first
//! input of the next, and every id after the first is predicted exactly once. A last window of
//! fewer than 2 ids predicts nothing and is dropped. The result is the mean cross-entropy over
//! all predicted positions.

use crate::model::TokenFormer;
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
