//! The checkpoint format: which tensors a config implies (names, shapes, order), and the strict
//! parsing of `config.json`. Nothing here touches the disk except through the files it is given.

use crate::ModelConfig;
use std::collections::HashMap;
use std::path::Path;
use tokenformer_core::safetensors_io::SafetensorsFile;
use tokenformer_core::{Error, Result, Tensor};

/// One expected tensor, plus the config fields that determine its rows, for error messages
/// that say *why* a shape was expected.
pub(super) struct Expected {
    pub(super) name: String,
    pub(super) dims: Vec<usize>,
    pub(super) because: String,
}

pub(super) fn expected(cfg: &ModelConfig) -> Vec<Expected> {
    let d = cfg.d_model;
    let mut out = Vec::with_capacity(5 * 2 * cfg.n_layers + 3);
    let mut push = |name: String, dims: Vec<usize>, because: String| {
        out.push(Expected { name, dims, because })
    };
    push(
        "embed.weight".into(),
        vec![cfg.vocab_size, d],
        format!("vocab_size = {}, d_model = {d}", cfg.vocab_size),
    );
    for i in 0..cfg.n_layers {
        let blocks = [
            ("attention.query", cfg.qkv_tokens, "qkv_tokens"),
            ("attention.key", cfg.qkv_tokens, "qkv_tokens"),
            ("attention.value", cfg.qkv_tokens, "qkv_tokens"),
            ("attention.proj", cfg.proj_tokens, "proj_tokens"),
            ("mlp", cfg.ffn_tokens, "ffn_tokens"),
        ];
        for (block, n, field) in blocks {
            for side in ["key", "value"] {
                push(
                    format!("layers.{i}.{block}.{side}_param_tokens"),
                    vec![n, d],
                    format!("{field} = {n}, d_model = {d}"),
                );
            }
        }
    }
    push("final_norm.weight".into(), vec![d], format!("d_model = {d}"));
    push("final_norm.bias".into(), vec![d], format!("d_model = {d}"));
    out
}

/// `params` reordered into SPEC order, after checking names and shapes against the config.
pub(super) fn ordered_params(
    cfg: &ModelConfig,
    params: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>> {
    order_by_name(cfg, params, "checkpoint params", "")
}

/// The moments as `m.<name>`, `v.<name>` tensors in SPEC order, checked like the params.
pub(super) fn optimizer_tensors(
    cfg: &ModelConfig,
    m: &[(String, Tensor)],
    v: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>> {
    let mut out = order_by_name(cfg, m, "optimizer m", "m.")?;
    out.extend(order_by_name(cfg, v, "optimizer v", "v.")?);
    Ok(out)
}

fn order_by_name(
    cfg: &ModelConfig,
    given: &[(String, Tensor)],
    what: &str,
    prefix: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut by_name: HashMap<&str, &Tensor> = HashMap::with_capacity(given.len());
    for (name, t) in given {
        if by_name.insert(name.as_str(), t).is_some() {
            return Err(Error::invalid(format!("{what}: tensor '{name}' appears twice")));
        }
    }
    let expected = expected(cfg);
    let mut out = Vec::with_capacity(expected.len());
    for e in &expected {
        let t = by_name.remove(e.name.as_str()).ok_or_else(|| {
            Error::invalid(format!("{what}: tensor '{}' is missing ({})", e.name, e.because))
        })?;
        if t.dims() != e.dims.as_slice() {
            return Err(Error::invalid(format!(
                "{what}: tensor '{}' has shape {:?} but the config ({}) gives {:?}",
                e.name,
                t.dims(),
                e.because,
                e.dims
            )));
        }
        out.push((format!("{prefix}{}", e.name), t.clone()));
    }
    if let Some(extra) = by_name.keys().min() {
        return Err(Error::invalid(format!("{what}: unexpected tensor '{extra}'")));
    }
    Ok(out)
}

/// Reads the tensors `<prefix><expected name>` from `file`, insisting that the file holds
/// exactly those under `prefix` (and nothing else at all when `prefix` is empty).
pub(super) fn read_tensors(
    file: &SafetensorsFile,
    cfg: &ModelConfig,
    expected: &[Expected],
    prefix: &str,
) -> Result<Vec<(String, Tensor)>> {
    let path = file.path().display();
    let mut out = Vec::with_capacity(expected.len());
    for e in expected {
        let name = format!("{prefix}{}", e.name);
        if !file.contains(&name) {
            return Err(Error::format(
                &path,
                format!("tensor '{name}' is missing (config.json: {})", e.because),
            ));
        }
        let dims = file.dims(&name)?;
        if dims != e.dims.as_slice() {
            return Err(Error::format(
                &path,
                format!(
                    "tensor '{name}' has shape {dims:?} but config.json ({}) gives {:?}: the \
                     config and the tensors disagree",
                    e.because, e.dims
                ),
            ));
        }
        out.push((e.name.clone(), file.get(&name)?));
    }
    // Unexpected tensors: for the model file, any name not expected; for the optimizer file,
    // any name that is neither an expected `m.` nor an expected `v.` tensor.
    let known: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    for name in file.names() {
        let ok = match prefix {
            "" => known.contains(name.as_str()),
            _ => ["m.", "v."]
                .iter()
                .any(|p| name.strip_prefix(p).is_some_and(|rest| known.contains(rest))),
        };
        if !ok {
            let hint = if name.starts_with("sequential.") {
                " (this is a released-checkpoint name; convert the names to SPEC §6 first)"
            } else {
                ""
            };
            return Err(Error::format(
                &path,
                format!(
                    "unexpected tensor '{name}' (config.json has n_layers = {}){hint}",
                    cfg.n_layers
                ),
            ));
        }
    }
    Ok(out)
}

/// Parses config.json strictly: unknown fields are errors (a typo such as `ffn_token` would
/// otherwise be silently dropped), and the values must pass `ModelConfig::validate`.
pub(super) fn parse_config(path: &Path, bytes: &[u8]) -> Result<ModelConfig> {
    let bad = |msg: String| Error::format(path.display(), msg);
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Some(fields) = value.as_object() else {
        return Err(bad("expected a JSON object of model hyperparameters".into()));
    };
    let config: ModelConfig = serde_json::from_value(value.clone())
        .map_err(|e| bad(format!("invalid model config: {e}")))?;
    // The known fields are exactly those ModelConfig serialises to.
    let known = serde_json::to_value(&config).map_err(|e| bad(e.to_string()))?;
    if let Some(known) = known.as_object() {
        if let Some(unknown) = fields.keys().find(|k| !known.contains_key(*k)) {
            let expected: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(bad(format!(
                "unknown field '{unknown}' (expected: {})",
                expected.join(", ")
            )));
        }
    }
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}
