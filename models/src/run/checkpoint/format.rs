//! The checkpoint format: which tensors a config implies (names, shapes, order), and the strict
//! parsing of `config.json`. Nothing here touches the disk except through the files it is given.

use crate::data::Tokenizer;
use crate::ModelConfig;
use std::collections::HashMap;
use std::path::Path;
use tokenformer_core::safetensors_io::SafetensorsFile;
use tokenformer_core::{Error, Result, Storage, Tensor};

/// One expected tensor, plus the config fields that determine its rows, for error messages
/// that say *why* a shape was expected.
pub(super) struct Expected {
    pub(super) name: String,
    pub(super) dims: Vec<usize>,
    pub(super) because: String,
}

/// Every tensor a model with this config has, in SPEC order: the model's parameter layout.
pub(super) fn expected(cfg: &ModelConfig) -> Vec<Expected> {
    crate::model::parameter_layout(cfg)
        .into_iter()
        .map(|p| Expected { name: p.name, dims: p.dims, because: p.because })
        .collect()
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
/// exactly those under `prefix` (and nothing else at all when `prefix` is empty), and that
/// every value is finite: a model with a NaN or an infinity in it computes nothing useful, and
/// would otherwise go on to print `loss NaN`, or be grown and called exact.
pub(super) fn read_tensors(
    file: &SafetensorsFile,
    cfg: &ModelConfig,
    expected: &[Expected],
    prefix: &str,
) -> Result<Vec<(String, Tensor)>> {
    check_names_and_shapes(file, cfg, expected, prefix)?;
    let mut out = Vec::with_capacity(expected.len());
    for e in expected {
        let name = format!("{prefix}{}", e.name);
        let tensor = file.get(&name)?;
        check_finite(file.path(), &name, &tensor)?;
        out.push((e.name.clone(), tensor));
    }
    Ok(out)
}

fn check_finite(path: &Path, name: &str, tensor: &Tensor) -> Result<()> {
    let Storage::Cpu(values) = tensor.storage() else { return Ok(()) };
    if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::format(
            path.display(),
            format!(
                "tensor '{name}' holds a non-finite value ({x} at flat index {i} of {}): the \
                 checkpoint is unusable (the run that wrote it diverged, or the file was damaged)",
                values.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the model file's header against the config, reading no tensor data: the tensor count
/// first (so a config claiming 10⁸ layers costs nothing), then every name and shape.
pub(super) fn check_header(file: &SafetensorsFile, cfg: &ModelConfig) -> Result<()> {
    let count = file.names().len();
    match crate::memory::tensor_count(cfg) {
        Some(want) if want == count as u128 => {}
        want => {
            return Err(Error::format(
                file.path().display(),
                format!(
                    "holds {count} tensors, but config.json (n_layers = {}) gives {}: the \
                     config and the tensors disagree",
                    cfg.n_layers,
                    want.map_or_else(|| "more than can be counted".into(), |w| w.to_string())
                ),
            ))
        }
    }
    check_names_and_shapes(file, cfg, &expected(cfg), "")
}

fn check_names_and_shapes(
    file: &SafetensorsFile,
    cfg: &ModelConfig,
    expected: &[Expected],
    prefix: &str,
) -> Result<()> {
    let path = file.path().display();
    // First, so that it is what the user reads: every other complaint about such a file (the
    // SPEC names all missing) would only follow from it.
    if let Some(name) = file.names().into_iter().find(|n| n.starts_with("sequential.")) {
        return Err(Error::format(
            &path,
            format!(
                "holds the released checkpoints' names ('{name}', …), not SPEC §6's: convert \
                 the original file with `tokenformer import`"
            ),
        ));
    }
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
            return Err(Error::format(
                &path,
                format!("unexpected tensor '{name}' (config.json has n_layers = {})", cfg.n_layers),
            ));
        }
    }
    Ok(())
}

/// The tokenizer a config names must be one this program has: the config is used to sample
/// and evaluate, and an unknown name would otherwise fail only then (after a whole run).
pub(super) fn check_tokenizer(path: &Path, config: &ModelConfig) -> Result<()> {
    if Tokenizer::NAMES.contains(&config.tokenizer.as_str()) {
        return Ok(());
    }
    Err(Error::format(
        path.display(),
        format!(
            "unknown tokenizer {:?} (expected one of: {})",
            config.tokenizer,
            Tokenizer::NAMES.join(", ")
        ),
    ))
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
    check_tokenizer(path, &config)?;
    Ok(config)
}
