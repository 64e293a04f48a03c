//! What a command will need in memory, checked before it allocates anything.
//!
//! Sizes come from flags (`--batch`, `--grad-accum`, grow counts, `bench --matmul`) and from
//! files (`config.json` of a checkpoint someone handed over). An absurd size must end in one
//! line saying how much memory it would take, not in an allocation abort halfway through. The
//! estimates here are lower bounds — what the command needs at the very least — so a run that
//! fits is never refused; one that is refused could not have run.
//!
//! The ceiling is the machine's memory (RAM plus swap), read from `/proc/meminfo`; where that
//! is unavailable, only arithmetic overflow is refused.

use crate::config::{Arch, ModelConfig};
use crate::files::bytes_text;
use std::sync::OnceLock;
use tokenformer_core::{Error, Result};

/// Bytes of one f32.
const F32: u128 = 4;
/// What a tensor costs beyond its data (its shape, name and bookkeeping), at the least.
const PER_TENSOR: u128 = 128;

/// RAM plus swap, in bytes; `None` when the platform does not say.
pub fn machine_memory() -> Option<u128> {
    static MEMORY: OnceLock<Option<u128>> = OnceLock::new();
    *MEMORY.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u128> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kib: u128 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        };
        Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
    })
}

/// Refuses `need` bytes (`None`: more than fits in 128 bits of arithmetic) when the machine
/// does not have them; `what` says what would need them.
pub fn check(what: &str, need: Option<u128>) -> Result<()> {
    let have = machine_memory();
    match (need, have) {
        (Some(need), Some(have)) if need <= have => Ok(()),
        (Some(_), None) => Ok(()),
        (Some(need), Some(have)) => Err(Error::invalid(format!(
            "{what} would need at least {} of memory; this machine has {}",
            bytes_text(need),
            bytes_text(have)
        ))),
        (None, _) => Err(Error::invalid(format!(
            "{what} would need more memory than can be counted (its sizes overflow 128 bits)"
        ))),
    }
}

/// Parameters of a model with this config, without overflowing (the counts of
/// `ModelConfig::param_count`, for either architecture).
pub fn param_count(cfg: &ModelConfig) -> Option<u128> {
    let d = cfg.d_model as u128;
    let per_layer = match cfg.arch {
        Arch::TokenFormer => {
            let tokens = (3 * cfg.qkv_tokens as u128)
                .checked_add(cfg.proj_tokens as u128)?
                .checked_add(cfg.ffn_tokens as u128)?;
            (2 * d).checked_mul(tokens)?
        }
        // 4·(d² + d) for q, k, v, o, and d_ff·(2d + 1) + d for the MLP.
        Arch::Transformer => {
            let attention = d.checked_mul(d)?.checked_add(d)?.checked_mul(4)?;
            let mlp = (cfg.d_ff as u128).checked_mul(2 * d + 1)?.checked_add(d)?;
            attention.checked_add(mlp)?
        }
    };
    per_layer
        .checked_mul(cfg.n_layers as u128)?
        .checked_add((cfg.vocab_size as u128).checked_mul(d)?)?
        .checked_add(2 * d)
}

/// Tensors a model with this config has: the embedding, ten per layer (twelve in a
/// Transformer), the final norm's two.
pub fn tensor_count(cfg: &ModelConfig) -> Option<u128> {
    let per_layer = match cfg.arch {
        Arch::TokenFormer => 10,
        Arch::Transformer => 12,
    };
    (cfg.n_layers as u128).checked_mul(per_layer)?.checked_add(3)
}

/// A model in memory: its parameters, their bookkeeping and the rotary tables (cos and sin,
/// max_seq_len × rotary_dims/2 each).
pub fn model_bytes(cfg: &ModelConfig) -> Option<u128> {
    let params = param_count(cfg)?.checked_mul(F32)?;
    let tensors = tensor_count(cfg)?.checked_mul(PER_TENSOR)?;
    let rope =
        (cfg.max_seq_len as u128).checked_mul(cfg.rotary_dims() as u128)?.checked_mul(F32)?;
    params.checked_add(tensors)?.checked_add(rope)
}

/// A checkpoint loaded whole: the model, plus the two AdamW moments when it has them.
pub fn checkpoint_bytes(cfg: &ModelConfig, with_optimizer: bool) -> Option<u128> {
    let model = model_bytes(cfg)?;
    let moments = if with_optimizer { 2 * param_count(cfg)?.checked_mul(F32)? } else { 0 };
    model.checked_add(moments)
}

/// A training step: the model with its gradients and both moments, and the activations of one
/// micro-batch — at least the logits (V floats per token) and, per layer, the residual stream
/// (d floats) and one score row per Pattention (3·n_qkv + n_proj + n_ffn floats; in a
/// Transformer, the MLP's hidden row of d_ff floats) — and one loss value kept per micro-batch
/// until the step completes.
pub fn training_bytes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    grad_accum: usize,
) -> Option<u128> {
    let params = param_count(cfg)?.checked_mul(F32)?;
    let state = model_bytes(cfg)?.checked_add(params.checked_mul(3)?)?;
    let per_layer = (3 * cfg.qkv_tokens as u128)
        .checked_add(cfg.proj_tokens as u128)?
        .checked_add(cfg.ffn_tokens as u128)?
        .checked_add(cfg.d_ff as u128)?
        .checked_add(cfg.d_model as u128)?;
    let per_token =
        (cfg.vocab_size as u128).checked_add(per_layer.checked_mul(cfg.n_layers as u128)?)?;
    let tokens = (batch as u128).checked_mul(seq as u128)?;
    let activations = tokens.checked_mul(per_token)?.checked_mul(F32)?;
    let losses = (grad_accum as u128).checked_mul(PER_TENSOR)?;
    state.checked_add(activations)?.checked_add(losses)
}

/// Refuses a training run (or benchmark) of `cfg` at these sizes that cannot fit.
pub fn check_training(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    grad_accum: usize,
) -> Result<()> {
    let what = format!(
        "training {} parameters with --batch {batch} --seq {seq} --grad-accum {grad_accum}",
        param_count(cfg).map_or_else(|| "an uncountable number of".into(), |n| n.to_string())
    );
    check(&what, training_bytes(cfg, batch, seq, grad_accum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_are_exact_counts_and_overflow_is_caught() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert_eq!(param_count(&tiny), Some(tiny.param_count() as u128));
        assert_eq!(tensor_count(&tiny), Some(43));
        let transformer = tiny.to_transformer(300);
        assert_eq!(param_count(&transformer), Some(transformer.param_count() as u128));
        assert_eq!(tensor_count(&transformer), Some(51));
        let e = check("a wide MLP", model_bytes(&tiny.to_transformer(1 << 50)));
        assert!(e.unwrap_err().to_string().contains("would need at least"));
        // The default run fits any machine that can build this crate.
        check_training(&tiny, 16, 64, 1).unwrap();
        check("a small thing", checkpoint_bytes(&tiny, true)).unwrap();

        let mut huge = tiny.clone();
        huge.n_layers = 100_000_000;
        let e = check("loading it", model_bytes(&huge)).unwrap_err().to_string();
        assert!(e.starts_with("loading it would need at least") && e.contains("TiB"), "{e}");
        huge.n_layers = usize::MAX;
        huge.d_model = usize::MAX;
        assert_eq!(model_bytes(&huge), None);
        let e = check("x", None).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");

        let e = check_training(&tiny, 1_000_000_000, 64, 1).unwrap_err().to_string();
        assert!(e.contains("--batch 1000000000") && e.contains("would need at least"), "{e}");
        let e = check_training(&tiny, 1, 1, 1 << 60).unwrap_err().to_string();
        assert!(e.contains("--grad-accum") && e.contains("would need at least"), "{e}");
    }
}
