//! Sampling text from a model, one token at a time.
//!
//! Each step runs the model on the last max_seq_len tokens, takes the logits of the final
//! position, divides them by the temperature, keeps the `top_k` largest (when given) and draws
//! from the softmax with our seeded RNG, so the same seed gives the same text. Temperature 0
//! means greedy decoding.

use crate::model::TokenFormer;
use tokenformer_autograd::no_grad;
use tokenformer_core::{Error, Result, Rng, Tensor};

pub struct SampleOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// Draws one id from `logits` (one row) with temperature and top-k.
pub fn sample_from_logits(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    rng: &mut Rng,
) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best })
    };
    if temperature <= 0.0 {
        return argmax() as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let keep = top_k.unwrap_or(logits.len()).clamp(1, logits.len());
    let kept = &order[..keep];
    let max = logits[kept[0]];
    let weights: Vec<f64> =
        kept.iter().map(|&i| (((logits[i] - max) / temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (w, &i) in weights.iter().zip(kept) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    kept[keep - 1] as u32
}

/// Continues `prompt` by up to `opts.max_tokens` tokens, calling `on_token` with each new id as
/// soon as it is drawn (for streaming). Returns the new ids.
pub fn generate(
    model: &TokenFormer,
    prompt: &[u32],
    opts: &SampleOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::invalid("generate: the prompt must hold at least one token"));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::invalid(format!(
            "generate: prompt token {bad} is outside the vocabulary ({vocab})"
        )));
    }
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "generate: temperature {} must be >= 0",
            opts.temperature
        )));
    }
    let mut rng = Rng::new(opts.seed);
    let mut context: Vec<u32> = prompt.to_vec();
    // Not preallocated: --max-tokens is a limit, and may be far larger than what is drawn.
    let mut produced = Vec::new();
    for _ in 0..opts.max_tokens {
        let window = &context[context.len().saturating_sub(model.config.max_seq_len)..];
        let ids: Vec<f32> = window.iter().map(|&x| x as f32).collect();
        let ids = Tensor::from_vec(ids, &[1, window.len()])?.to_device(model.device())?;
        let logits = no_grad(|| model.forward(&ids))?;
        let last =
            tokenformer_ops::layout::narrow(logits.value(), 1, window.len() - 1, 1)?.to_vec()?;
        if let Some(bad) = last.iter().find(|x| !x.is_finite()) {
            let what = format!("generate: a logit is {bad}");
            return Err(crate::evaluate::non_finite(model, &ids, &what));
        }
        let next = sample_from_logits(&last, opts.temperature, opts.top_k, &mut rng);
        on_token(next)?;
        context.push(next);
        produced.push(next);
    }
    Ok(produced)
}
