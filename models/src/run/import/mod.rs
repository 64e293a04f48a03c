//! `tokenformer import`: the authors' released checkpoints as checkpoints of this project.
//!
//! The released models are `torch.save` files: a zip archive holding a pickle (the
//! state_dict's structure) and one raw file per storage (the numbers). Training checkpoints of
//! the official code are DeepSpeed directories whose `mp_rank_00_model_states.pt` wraps the
//! state_dict as `{'module': …}` (or, for a pipeline-parallel run, keeps it in one
//! `layer_NN-model_00-model_states.pt` per layer). A safetensors file under the same names is
//! read as well. This module reads all three without PyTorch and without running anything the
//! file says: [`zip`] reads the archive with every size checked, [`pickle`] interprets the
//! pickle with an allow-list of globals, and here each tensor's view is checked against its
//! storage before a byte of it is read.
//!
//! Names map one to one (SPEC §6.3): `sequential.0.word_embeddings.weight` is `embed.weight`,
//! `sequential.{i+2}.` is `layers.{i}.` and `sequential.{L+3}.norm.` is `final_norm.`; the
//! matrices have the same orientation, so nothing is transposed. The shapes give L, d, V and
//! the token counts; heads, context length, tokenizer and Θ come from the released config the
//! shapes match, or from the caller. Every value becomes f32 (fp16 and bf16 exactly), and must
//! be finite. The result is written by `save_checkpoint`, with the same crash-safe commit as
//! every other save, and only after the whole source has been read and checked: a refused
//! source leaves nothing behind.

pub mod pickle;
pub mod zip;

use crate::checkpoint::{expected_shapes, is_checkpoint_dir, save_checkpoint, Checkpoint};
use crate::config::{ModelConfig, Theta};
use crate::files::{bytes_text, open_regular};
use crate::memory;
use crate::run_dir::{check_writable_dir, RunLock};
use memmap2::Mmap;
use pickle::{StorageDtype, TensorRef, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tokenformer_core::{Error, Result, Tensor};

/// The DeepSpeed file that holds the model states of a single-rank checkpoint directory.
pub const DEEPSPEED_MODEL_FILE: &str = "mp_rank_00_model_states.pt";

/// The configs the authors released, by the preset that equals each (SPEC §3), with what each
/// is (read after "the released").
pub const RELEASED: &[(&str, &str)] = &[
    ("150M", "TokenFormer 150M trained on the Pile"),
    ("450M", "TokenFormer 450M trained on the Pile"),
    ("900M", "TokenFormer 900M trained on the Pile"),
    ("1.5B", "TokenFormer 1.5B trained on the Pile"),
    ("354M", "354M OpenWebText2 base of the incremental-scaling experiment"),
    ("757M", "757M incremental-scaling model, grown from the 354M base"),
];

/// The settings the tensors' shapes cannot give. Each one given overrides the released
/// config's; `config` gives them all at once (its shape fields must agree with the tensors).
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    pub heads: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub tokenizer: Option<String>,
    pub norm: Option<Theta>,
    pub config: Option<ModelConfig>,
}

pub struct ImportReport {
    pub config: ModelConfig,
    /// The released config the shapes match: (preset name, description).
    pub recognised: Option<(&'static str, &'static str)>,
    /// What the source was, in words (format, wrapper, dtypes).
    pub source: String,
}

/// The released model whose shapes `config` has (depth, width, vocabulary, token counts).
pub fn recognise(config: &ModelConfig) -> Option<(&'static str, &'static str)> {
    RELEASED.iter().copied().find(|(name, _)| {
        ModelConfig::preset(name).is_ok_and(|p| {
            (p.n_layers, p.d_model, p.vocab_size, p.qkv_tokens, p.proj_tokens, p.ffn_tokens)
                == (
                    config.n_layers,
                    config.d_model,
                    config.vocab_size,
                    config.qkv_tokens,
                    config.proj_tokens,
                    config.ffn_tokens,
                )
        })
    })
}

/// Reads the released checkpoint `src` (a torch.save file, a DeepSpeed directory or a
/// safetensors file), checks it, and writes it as a checkpoint directory `out`.
pub fn import_checkpoint(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    if is_checkpoint_dir(out) {
        return Err(Error::invalid(format!(
            "import: {} already holds a checkpoint; choose another --out",
            out.display()
        )));
    }
    // Before the (possibly long) read: an --out the tool may not write into is refused now.
    check_writable_dir(out)?;
    let source = Source::open(src)?;
    let mapped = map_names(&source)?;
    let shapes = Shapes::of(&mapped, &source)?;
    let (config, recognised) = shapes.config(opts)?;
    check_shapes(&config, &mapped, &source)?;
    memory::check(
        &format!("importing {}", src.display()),
        memory::checkpoint_bytes(&config, false),
    )?;
    let mut params = Vec::with_capacity(mapped.len());
    for (ours, index) in &mapped {
        let entry = &source.tensors[*index];
        params.push((ours.clone(), source.read(entry)?));
    }
    let _lock = RunLock::create_and_acquire(out)?;
    if is_checkpoint_dir(out) {
        return Err(Error::invalid(format!(
            "import: {} already holds a checkpoint; choose another --out",
            out.display()
        )));
    }
    save_checkpoint(
        out,
        &Checkpoint { config: config.clone(), params, optimizer: None, train_state: None },
    )?;
    Ok(ImportReport { config, recognised, source: source.describe() })
}

/// One tensor of the source, located but not read.
struct SourceTensor {
    /// The name in the released checkpoint (`sequential.…`).
    name: String,
    dims: Vec<usize>,
    dtype: StorageDtype,
    /// Which mapped file, and where in it.
    file: usize,
    place: Place,
}

enum Place {
    /// A view of a torch storage: the entry's bytes, and the view's offset and strides in
    /// elements.
    Storage { bytes: std::ops::Range<usize>, offset: u64, strides: Vec<u64> },
    /// A contiguous safetensors tensor.
    Contiguous(std::ops::Range<usize>),
}

struct Source {
    files: Vec<(PathBuf, Mmap)>,
    tensors: Vec<SourceTensor>,
    /// Format and wrapper, in words.
    kind: Vec<&'static str>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let (file, len) = open_regular(path)?;
    if len == 0 {
        return Err(Error::format(path.display(), "is empty"));
    }
    // SAFETY: the map is read-only and only read; a file truncated by another process while it
    // is read would fault, the usual contract for memory-mapped model files.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path.display(), e))
}

impl Source {
    fn open(src: &Path) -> Result<Source> {
        let mut source = Source { files: Vec::new(), tensors: Vec::new(), kind: Vec::new() };
        if src.is_dir() {
            source.open_deepspeed(src)?;
        } else if !src.exists() {
            return Err(Error::io(src.display(), "no such file or directory"));
        } else {
            let bytes = map_file(src)?;
            if bytes.starts_with(b"PK\x03\x04") {
                source.files.push((src.to_path_buf(), bytes));
                source.note("torch.save archive");
                if !source.add_torch_file(0, "", true)? {
                    return Err(Error::format(
                        src.display(),
                        "its 'module' is None: the weights of this DeepSpeed checkpoint are in \
                         its layer_NN-model_00-model_states.pt files (import the folder instead)",
                    ));
                }
            } else if bytes.starts_with(&[0x80]) {
                return Err(Error::format(
                    src.display(),
                    "a torch.save file in the legacy format of PyTorch before 1.6 (not a zip \
                     archive); load and save it again with a current PyTorch",
                ));
            } else {
                source.files.push((src.to_path_buf(), bytes));
                source.open_safetensors(0)?;
            }
        }
        Ok(source)
    }

    fn describe(&self) -> String {
        let dtypes: BTreeSet<&str> = self.tensors.iter().map(|t| t.dtype.name()).collect();
        let dtypes = dtypes.into_iter().collect::<Vec<_>>().join(" and ");
        format!("{}, {dtypes}", self.kind.join(", "))
    }

    fn path(&self, file: usize) -> &Path {
        &self.files[file].0
    }

    /// Runs the pickle of torch.save file `file`; returns the value it builds, the archive's
    /// entries and the folder they sit in (`archive/` for most files).
    fn torch_file(&self, file: usize) -> Result<(Value, zip::ZipEntries, String)> {
        let (path, bytes) = &self.files[file];
        let entries = zip::read_entries(path, bytes)?;
        let pickles: Vec<&String> = entries
            .names()
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let [pickle_name] = pickles.as_slice() else {
            return Err(Error::format(
                path.display(),
                format!(
                    "a zip archive with {} '<name>/data.pkl' entries; torch.save writes exactly one",
                    pickles.len()
                ),
            ));
        };
        let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
        if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
            if &bytes[order] != b"little" {
                return Err(Error::format(
                    path.display(),
                    "was saved on a big-endian machine; only little-endian storages are read",
                ));
            }
        }
        let range = entries.get(pickle_name).expect("listed");
        if range.len() as u64 > pickle::PICKLE_LIMIT {
            return Err(Error::format(
                path.display(),
                format!(
                    "its pickle is {}, far more than a state_dict's",
                    bytes_text(range.len() as u64)
                ),
            ));
        }
        let value = pickle::load(path, &bytes[range])?;
        Ok((value, entries, prefix))
    }

    /// Adds the tensors of torch.save file `file`: its top value is a state_dict, or (with
    /// `unwrap`) a dict whose `'module'` is one; `prefix` goes before every name (the
    /// `sequential.NN.` of a per-layer file).
    fn add_torch_file(&mut self, file: usize, name_prefix: &str, unwrap: bool) -> Result<bool> {
        let (top, entries, folder) = self.torch_file(file)?;
        let path = self.path(file).to_path_buf();
        let Value::Dict(items) = &top else {
            return Err(Error::format(
                path.display(),
                format!("holds {}, not a state_dict (a dict of tensors)", top.kind()),
            ));
        };
        let module = items.iter().find(|(k, _)| matches!(k, Value::Str(s) if &**s == "module"));
        let state_dict = match module {
            Some((_, Value::None)) if unwrap => return Ok(false),
            Some((_, inner @ Value::Dict(_))) if unwrap => {
                self.note("{'module': state_dict}");
                inner.clone()
            }
            Some((_, other)) if unwrap => {
                return Err(Error::format(
                    path.display(),
                    format!("its 'module' is {}, not a state_dict", other.kind()),
                ))
            }
            _ => top.clone(),
        };
        let Value::Dict(items) = &state_dict else { unreachable!("matched as a dict") };
        for (key, value) in items.iter() {
            let Value::Str(key) = key else {
                return Err(Error::format(
                    path.display(),
                    format!("its state_dict has {} for a name", key.kind()),
                ));
            };
            let name = format!("{name_prefix}{key}");
            let Value::Tensor(view) = value else {
                return Err(Error::format(
                    path.display(),
                    format!("'{name}' is {}, not a tensor", value.kind()),
                ));
            };
            let tensor = self.locate(file, &entries, &folder, &name, view)?;
            self.tensors.push(tensor);
        }
        Ok(true)
    }

    /// Finds the bytes of `view`'s storage and checks that the storage is as long as the pickle
    /// says and that the view stays inside it.
    fn locate(
        &self,
        file: usize,
        entries: &zip::ZipEntries,
        folder: &str,
        name: &str,
        view: &TensorRef,
    ) -> Result<SourceTensor> {
        let path = self.path(file);
        let storage = &view.storage;
        let entry = format!("{folder}data/{}", storage.key);
        let bytes = entries.get(&entry).ok_or_else(|| {
            Error::format(
                path.display(),
                format!("tensor '{name}': its storage '{entry}' is not in the archive"),
            )
        })?;
        let want = storage.numel.checked_mul(storage.dtype.size());
        if want != Some(bytes.len() as u64) {
            return Err(Error::format(
                path.display(),
                format!(
                    "tensor '{name}': storage '{entry}' holds {} bytes, but the pickle says {} \
                     {} elements ({} bytes): the archive is damaged",
                    bytes.len(),
                    storage.numel,
                    storage.dtype.name(),
                    want.map_or_else(|| "more than can be counted".into(), |w| w.to_string())
                ),
            ));
        }
        // The pickle checked the view against `numel`; the entry now matches `numel`.
        let dims = view
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::format(path.display(), format!("tensor '{name}' is too large")))?;
        Ok(SourceTensor {
            name: name.to_string(),
            dims,
            dtype: storage.dtype,
            file,
            place: Place::Storage { bytes, offset: view.offset, strides: view.strides.clone() },
        })
    }

    fn note(&mut self, what: &'static str) {
        if !self.kind.contains(&what) {
            self.kind.push(what);
        }
    }

    /// A DeepSpeed checkpoint directory: `mp_rank_00_model_states.pt` with the state_dict under
    /// `'module'`, or (a pipeline-parallel run) `'module': None` and one
    /// `layer_NN-model_00-model_states.pt` per entry of `sequential`.
    fn open_deepspeed(&mut self, dir: &Path) -> Result<()> {
        let main = dir.join(DEEPSPEED_MODEL_FILE);
        if !main.is_file() {
            return Err(Error::io(
                dir.display(),
                format!(
                    "a directory without {DEEPSPEED_MODEL_FILE}: not a DeepSpeed checkpoint \
                     (give a .bin/.pt file, a safetensors file, or a DeepSpeed checkpoint folder)"
                ),
            ));
        }
        self.note("DeepSpeed checkpoint directory");
        self.files.push((main.clone(), map_file(&main)?));
        if self.add_torch_file(0, "", true)? {
            return Ok(());
        }
        let mut layers = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))? {
            let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let index = name
                .strip_prefix("layer_")
                .and_then(|r| r.strip_suffix("-model_00-model_states.pt"))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(index) = index {
                layers.insert(index, entry.path());
            }
        }
        if layers.is_empty() {
            return Err(Error::format(
                main.display(),
                "its 'module' is None and the folder has no layer_NN-model_00-model_states.pt \
                 files: no weights to import",
            ));
        }
        self.note("per-layer files");
        for (index, path) in layers {
            let file = self.files.len();
            self.files.push((path.clone(), map_file(&path)?));
            self.add_torch_file(file, &format!("sequential.{index}."), false)?;
        }
        Ok(())
    }

    fn open_safetensors(&mut self, file: usize) -> Result<()> {
        self.note("safetensors file");
        let (path, bytes) = &self.files[file];
        let bad = |msg: String| Error::format(path.display(), msg);
        let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            bad(format!("neither a torch.save zip archive nor a safetensors file ({e})"))
        })?;
        let mut tensors = Vec::new();
        for (name, view) in parsed.iter() {
            use safetensors::Dtype;
            let dtype = match view.dtype() {
                Dtype::F32 => StorageDtype::F32,
                Dtype::F16 => StorageDtype::F16,
                Dtype::BF16 => StorageDtype::Bf16,
                Dtype::F64 => StorageDtype::F64,
                other => {
                    return Err(bad(format!(
                        "tensor '{name}' has dtype {other}; weights are F32, F16, BF16 or F64"
                    )))
                }
            };
            // The view's bytes are a slice of the map: its offset is where it starts.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            let range = start..start + view.data().len();
            tensors.push(SourceTensor {
                name: name.to_string(),
                dims: view.shape().to_vec(),
                dtype,
                file,
                place: Place::Contiguous(range),
            });
        }
        self.tensors = tensors;
        Ok(())
    }

    /// The tensor's values as f32 (fp16 and bf16 convert exactly), in row-major order, every
    /// one finite.
    fn read(&self, t: &SourceTensor) -> Result<Tensor> {
        let (path, bytes) = &self.files[t.file];
        let size = t.dtype.size() as usize;
        let numel: usize = t.dims.iter().product();
        let mut values: Vec<f32> = Vec::with_capacity(numel);
        match &t.place {
            Place::Contiguous(range) => {
                let chunks = bytes[range.clone()].chunks_exact(size);
                values.extend(chunks.map(|b| decode(t.dtype, b) as f32));
            }
            Place::Storage { bytes: range, offset, strides } => {
                let entry = &bytes[range.clone()];
                let mut index = vec![0usize; t.dims.len()];
                for _ in 0..numel {
                    let flat = offset
                        + index.iter().zip(strides).map(|(&i, &s)| i as u64 * s).sum::<u64>();
                    let at = flat as usize * size;
                    values.push(decode(t.dtype, &entry[at..at + size]) as f32);
                    // The next multi-index in row-major order.
                    for axis in (0..index.len()).rev() {
                        index[axis] += 1;
                        if index[axis] < t.dims[axis] {
                            break;
                        }
                        index[axis] = 0;
                    }
                }
            }
        }
        // An f64 beyond f32's range has become an infinity, and is refused with the others.
        if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::format(
                path.display(),
                format!(
                    "tensor '{}' holds a non-finite value ({x} at flat index {i} of {numel}); a \
                     model with it computes nothing useful",
                    t.name
                ),
            ));
        }
        Tensor::from_vec(values, &t.dims)
    }
}

/// One little-endian element of `dtype`.
fn decode(dtype: StorageDtype, b: &[u8]) -> f64 {
    match dtype {
        StorageDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        StorageDtype::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64,
        StorageDtype::Bf16 => {
            f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16) as f64
        }
        StorageDtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        _ => f64::NAN,
    }
}

/// IEEE half precision to single, exactly (every half is a single).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exponent = (h >> 10) & 0x1f;
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        // Subnormal: mantissa · 2⁻²⁴, exact in f32.
        0 => sign * mantissa as f32 * f32::from_bits(0x3380_0000),
        0x1f if mantissa == 0 => sign * f32::INFINITY,
        0x1f => f32::NAN,
        e => {
            let bits =
                (u32::from(h & 0x8000) << 16) | ((u32::from(e) + 112) << 23) | (mantissa << 13);
            f32::from_bits(bits)
        }
    }
}

/// The leaf names of a layer, the same in both naming schemes (SPEC §6.3).
const LAYER_LEAVES: [&str; 10] = [
    "attention.query.key_param_tokens",
    "attention.query.value_param_tokens",
    "attention.key.key_param_tokens",
    "attention.key.value_param_tokens",
    "attention.value.key_param_tokens",
    "attention.value.value_param_tokens",
    "attention.proj.key_param_tokens",
    "attention.proj.value_param_tokens",
    "mlp.key_param_tokens",
    "mlp.value_param_tokens",
];
const EMBED: &str = "sequential.0.word_embeddings.weight";

/// A released name, parsed.
enum Official {
    Embed,
    /// `sequential.{index}.<one of LAYER_LEAVES>`
    Layer(usize),
    /// `sequential.{index}.norm.{weight,bias}`
    Norm(usize),
}

fn parse_official(name: &str) -> Option<Official> {
    if name == EMBED {
        return Some(Official::Embed);
    }
    let (index, leaf) = name.strip_prefix("sequential.")?.split_once('.')?;
    if index.starts_with('0') && index != "0" {
        return None;
    }
    let index: usize = index.parse().ok()?;
    if LAYER_LEAVES.contains(&leaf) {
        return (index >= 2).then_some(Official::Layer(index));
    }
    matches!(leaf, "norm.weight" | "norm.bias").then_some(Official::Norm(index))
}

/// Our name for each tensor of the source, with its index there; every name checked to map,
/// to appear once, and the layers to be numbered 2 … L+1 with the final norm at L+3.
fn map_names(source: &Source) -> Result<Vec<(String, usize)>> {
    let src = source.path(0).display();
    let mut seen = HashMap::new();
    let mut layers = BTreeSet::new();
    let mut norms = BTreeSet::new();
    for (i, t) in source.tensors.iter().enumerate() {
        if seen.insert(t.name.as_str(), i).is_some() {
            return Err(Error::format(&src, format!("tensor '{}' appears twice", t.name)));
        }
        match parse_official(&t.name) {
            Some(Official::Embed) => {}
            Some(Official::Layer(index)) => {
                layers.insert(index);
            }
            Some(Official::Norm(index)) => {
                norms.insert(index);
            }
            None => {
                let hint = if t.name.starts_with("embed.")
                    || t.name.starts_with("layers.")
                    || t.name.starts_with("final_norm.")
                {
                    " (that is already this project's name: put the file in a checkpoint \
                     directory as model.safetensors, next to a config.json)"
                } else {
                    ""
                };
                return Err(Error::format(
                    &src,
                    format!(
                        "tensor '{}' maps to nothing: the released checkpoints hold only {EMBED}, \
                         sequential.{{i+2}}.{{attention.{{query,key,value,proj}},mlp}}.\
                         {{key,value}}_param_tokens and sequential.{{L+3}}.norm.{{weight,bias}}{hint}",
                        t.name
                    ),
                ));
            }
        }
    }
    let n_layers = layers.len();
    if n_layers == 0 {
        return Err(Error::format(&src, "holds no layer (no sequential.N.attention… tensors)"));
    }
    if let Some(gap) = (2..2 + n_layers).find(|i| !layers.contains(i)) {
        return Err(Error::format(
            &src,
            format!(
                "the layers are not numbered sequential.2 … sequential.{}: sequential.{gap} is \
                 missing",
                n_layers + 1
            ),
        ));
    }
    let norm_index = n_layers + 3;
    if let Some(&other) = norms.iter().find(|&&i| i != norm_index) {
        return Err(Error::format(
            &src,
            format!(
                "the final norm is sequential.{other}, but with {n_layers} layers (sequential.2 \
                 … sequential.{}) it is sequential.{norm_index}",
                n_layers + 1
            ),
        ));
    }
    let mut out = Vec::with_capacity(2 + 10 * n_layers + 2);
    let mut take = |official: String, ours: String| -> Result<()> {
        let index = seen.get(official.as_str()).copied().ok_or_else(|| {
            Error::format(&src, format!("tensor '{official}' (our '{ours}') is missing"))
        })?;
        out.push((ours, index));
        Ok(())
    };
    take(EMBED.into(), "embed.weight".into())?;
    for layer in 0..n_layers {
        for leaf in LAYER_LEAVES {
            take(format!("sequential.{}.{leaf}", layer + 2), format!("layers.{layer}.{leaf}"))?;
        }
    }
    for leaf in ["weight", "bias"] {
        take(format!("sequential.{norm_index}.norm.{leaf}"), format!("final_norm.{leaf}"))?;
    }
    Ok(out)
}

/// What the tensors' shapes say about the model.
struct Shapes {
    vocab: usize,
    d_model: usize,
    n_layers: usize,
    counts: [usize; 3],
}

impl Shapes {
    fn of(mapped: &[(String, usize)], source: &Source) -> Result<Shapes> {
        let dims = |ours: &str| -> &[usize] {
            let index = mapped.iter().find(|(n, _)| n == ours).expect("mapped").1;
            &source.tensors[index].dims
        };
        let src = source.path(0).display();
        let embed = dims("embed.weight");
        let [vocab, d_model] = *embed else {
            return Err(Error::format(
                &src,
                format!("tensor '{EMBED}' has shape {embed:?}; it is [vocab, d_model]"),
            ));
        };
        let rows = |leaf: &str| -> Result<usize> {
            let d = dims(&format!("layers.0.{leaf}"));
            d.first().copied().filter(|_| d.len() == 2).ok_or_else(|| {
                Error::format(
                    &src,
                    format!("tensor 'sequential.2.{leaf}' has shape {d:?}; it is [n, d]"),
                )
            })
        };
        Ok(Shapes {
            vocab,
            d_model,
            n_layers: (mapped.len() - 3) / LAYER_LEAVES.len(),
            counts: [
                rows("attention.query.key_param_tokens")?,
                rows("attention.proj.key_param_tokens")?,
                rows("mlp.key_param_tokens")?,
            ],
        })
    }

    fn describe(&self) -> String {
        let [qkv, proj, ffn] = self.counts;
        format!(
            "L {}, d {}, V {}, qkv {qkv}, proj {proj}, ffn {ffn}",
            self.n_layers, self.d_model, self.vocab
        )
    }

    /// The config: the shapes, then the released config they match (or the caller's
    /// `--config`), then each flag given.
    fn config(
        &self,
        opts: &ImportOptions,
    ) -> Result<(ModelConfig, Option<(&'static str, &'static str)>)> {
        // The heads, context and tokenizer are not in the weights: set below.
        let mut config = ModelConfig::tokenformer(
            self.vocab,
            self.d_model,
            self.n_layers,
            0,
            0,
            self.counts,
            "",
        );
        let recognised = recognise(&config);
        if let Some(given) = &opts.config {
            let shape = |c: &ModelConfig| {
                (
                    c.arch,
                    c.n_layers,
                    c.d_model,
                    c.vocab_size,
                    c.qkv_tokens,
                    c.proj_tokens,
                    c.ffn_tokens,
                )
            };
            if shape(given) != shape(&config) {
                return Err(Error::invalid(format!(
                    "import: --config describes L {}, d {}, V {}, qkv {}, proj {}, ffn {} ({}), \
                     but the tensors have {}",
                    given.n_layers,
                    given.d_model,
                    given.vocab_size,
                    given.qkv_tokens,
                    given.proj_tokens,
                    given.ffn_tokens,
                    given.arch,
                    self.describe()
                )));
            }
            config = given.clone();
        } else if let Some((name, _)) = recognised {
            let preset = ModelConfig::preset(name)?;
            config.n_heads = preset.n_heads;
            config.max_seq_len = preset.max_seq_len;
            config.tokenizer = preset.tokenizer;
        }
        if let Some(h) = opts.heads {
            config.n_heads = h;
        }
        if let Some(t) = opts.max_seq_len {
            config.max_seq_len = t;
        }
        if let Some(norm) = opts.norm {
            config.norm = norm;
        }
        if let Some(name) = &opts.tokenizer {
            config.tokenizer = name.clone();
        }
        if config.tokenizer.is_empty() {
            // The official code's tokenizer, or bytes for a byte-sized vocabulary.
            config.tokenizer = if self.vocab == 256 { "byte".into() } else { "neox".into() };
        }
        let missing: Vec<&str> =
            [("--heads", config.n_heads), ("--max-seq-len", config.max_seq_len)]
                .into_iter()
                .filter(|(_, v)| *v == 0)
                .map(|(flag, _)| flag)
                .collect();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "import: the shapes ({}) match no released config; give {} (or --config FILE)",
                self.describe(),
                missing.join(" and ")
            )));
        }
        config.validate().map_err(|e| Error::invalid(format!("import: {e}")))?;
        Ok((config, recognised))
    }
}

/// Every tensor's shape against what the config implies, named as the source names it.
fn check_shapes(config: &ModelConfig, mapped: &[(String, usize)], source: &Source) -> Result<()> {
    let expected: HashMap<String, Vec<usize>> = expected_shapes(config).into_iter().collect();
    for (ours, index) in mapped {
        let t = &source.tensors[*index];
        let want = &expected[ours];
        if &t.dims != want {
            return Err(Error::format(
                source.path(t.file).display(),
                format!(
                    "tensor '{}' has shape {:?}, but the model its other tensors describe ({}) \
                     gives {want:?}",
                    t.name,
                    t.dims,
                    Shapes::of(mapped, source)?.describe()
                ),
            ));
        }
        if !matches!(
            t.dtype,
            StorageDtype::F32 | StorageDtype::F16 | StorageDtype::Bf16 | StorageDtype::F64
        ) {
            return Err(Error::format(
                source.path(t.file).display(),
                format!(
                    "tensor '{}' holds {} values; weights are floating point",
                    t.name,
                    t.dtype.name()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(decode(StorageDtype::Bf16, &0x3f80u16.to_le_bytes()), 1.0);
    }

    #[test]
    fn the_released_configs_are_recognised_from_their_shapes() {
        for (name, _) in RELEASED {
            let preset = ModelConfig::preset(name).unwrap();
            assert_eq!(recognise(&preset).map(|r| r.0), Some(*name));
            let shapes = Shapes {
                vocab: preset.vocab_size,
                d_model: preset.d_model,
                n_layers: preset.n_layers,
                counts: [preset.qkv_tokens, preset.proj_tokens, preset.ffn_tokens],
            };
            // With no flags the config is the preset, heads, context and tokenizer included.
            let (config, recognised) = shapes.config(&ImportOptions::default()).unwrap();
            assert_eq!(config, preset, "{name}");
            assert_eq!(recognised.map(|r| r.0), Some(*name));
            // A flag overrides what the released config says.
            let opts = ImportOptions { max_seq_len: Some(512), ..ImportOptions::default() };
            assert_eq!(shapes.config(&opts).unwrap().0.max_seq_len, 512);
        }
        let mut other = ModelConfig::preset("150M").unwrap();
        other.ffn_tokens += 1;
        assert_eq!(recognise(&other), None);
    }
}
