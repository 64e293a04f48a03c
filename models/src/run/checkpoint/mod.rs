//! Checkpoints: a model (and optionally its training state) as a directory of files (SPEC §6).
//!
//! ```text
//!   run/
//!     config.json            ModelConfig, pretty JSON
//!     model.safetensors      f32 parameters under the SPEC §6 names
//!     optimizer.safetensors  AdamW moments `m.<param name>`, `v.<param name>`   (optional,
//!     train_state.json       whatever the trainer needs to resume: step, RNG…)  both or neither)
//!     checkpoint.json        manifest: step, and the size and checksum of every file above
//!     metrics.jsonl, loss.png, …   other files of the run, never touched here
//! ```
//!
//! How a save stays safe when the process dies halfway, and how a reader gets the last
//! committed checkpoint while a run keeps saving, is the business of `commit`; what a config
//! implies for the tensors (names, shapes, order) and how `config.json` is read, of `format`.
//!
//! Loading never writes: `info`, `eval`, `generate` and `grow` can read a directory another
//! process is training into, or one they may not write to. Saving takes the directory's lock
//! (`run_dir`), so two processes never save into one directory at once. Every file is read as
//! untrusted input (`files`): only regular files of sane sizes, and nothing is allocated
//! before the config has shown that the model fits in memory.
//!
//! A directory without `checkpoint.json` (for instance one converted from the released
//! checkpoints by hand) still loads; it only lacks the cross-file check. For the same reason,
//! editing `config.json` of a saved checkpoint by hand means deleting `checkpoint.json` too.
//! Tensors are saved from any device and always load onto the CPU.

mod commit;
mod format;

use crate::files::{entry_exists, read_open};
use crate::memory;
use crate::run_dir::RunLock;
use crate::ModelConfig;
use commit::*;
use format::*;
use std::path::Path;
use tokenformer_core::safetensors_io::SafetensorsFile;
use tokenformer_core::{Error, Result, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAIN_STATE_FILE: &str = "train_state.json";
pub const MANIFEST_FILE: &str = "checkpoint.json";

/// Tensors with their names, in a meaningful order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// A model, and optionally the state needed to resume training it bit-identically.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    /// Parameters under the SPEC §6 names; `load_checkpoint` returns them in SPEC order.
    pub params: Vec<(String, Tensor)>,
    /// AdamW moments (m, v), each keyed by the *parameter* name (not `m.<name>`).
    pub optimizer: Option<(NamedTensors, NamedTensors)>,
    /// The trainer's own state (step, RNG, data position, run settings); opaque here.
    pub train_state: Option<serde_json::Value>,
}

/// What a checkpoint is, read without loading its tensors (see `inspect_checkpoint`).
#[derive(Clone, Debug)]
pub struct CheckpointSummary {
    pub config: ModelConfig,
    /// The training step the manifest records, if any.
    pub step: Option<u64>,
    /// Whether it holds optimizer and train state (it can be resumed).
    pub has_training_state: bool,
}

/// Every parameter a model with this config has, with its dims, in SPEC §6 order: `embed`,
/// then each layer's query, key, value, proj and mlp Pattentions (keys before values), then
/// the final LayerNorm's weight and bias.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    expected(cfg).into_iter().map(|e| (e.name, e.dims)).collect()
}

/// True when `dir` holds a checkpoint (committed, or committed and awaiting roll-forward), so a
/// command can refuse to overwrite a run by accident.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    entry_exists(&dir.join(MANIFEST_FILE))
        || entry_exists(&dir.join(PENDING_FILE))
        || (entry_exists(&dir.join(CONFIG_FILE)) && entry_exists(&dir.join(MODEL_FILE)))
}

/// Saves `ckpt` into `dir` (created if needed), replacing any checkpoint there, atomically in
/// the sense of the module doc. Files in `dir` that are not checkpoint files are kept. Takes
/// the directory's lock for the save, unless this process holds it already.
pub fn save_checkpoint(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    // Refuse to write something load_checkpoint would reject, before touching the disk.
    ckpt.config.validate()?;
    check_tokenizer(Path::new(CONFIG_FILE), &ckpt.config)?;
    let params = ordered_params(&ckpt.config, &ckpt.params)?;
    let optimizer = match &ckpt.optimizer {
        Some((m, v)) => Some(optimizer_tensors(&ckpt.config, m, v)?),
        None => None,
    };
    if optimizer.is_some() != ckpt.train_state.is_some() {
        return Err(Error::invalid(
            "checkpoint: optimizer state and train state must be saved together (both or neither)",
        ));
    }

    std::fs::create_dir_all(dir).map_err(|e| not_writable(dir, e))?;
    let _lock = RunLock::acquire(dir)?;
    // A save that died after its commit point is finished first, so the one below starts from
    // a committed checkpoint.
    finish_interrupted(dir)?;

    // Step 1: every new file under a temporary name, durable.
    let mut staged = vec![
        stage_bytes(dir, CONFIG_FILE, &to_pretty_json(&ckpt.config)?)?,
        stage_tensors(dir, MODEL_FILE, &params)?,
    ];
    if let (Some(opt), Some(state)) = (&optimizer, &ckpt.train_state) {
        staged.push(stage_tensors(dir, OPTIMIZER_FILE, opt)?);
        staged.push(stage_bytes(dir, TRAIN_STATE_FILE, &to_pretty_json(state)?)?);
    }
    // Steps 2 and 3: the commit point and the roll-forward.
    let step = ckpt.train_state.as_ref().and_then(|s| s.get("step")).and_then(|s| s.as_u64());
    commit(dir, step, staged)
}

/// Parses a config.json (`path` names it in messages) as a checkpoint's is parsed: unknown
/// fields are errors, and the values must form a valid config with a known tokenizer.
pub fn parse_config_json(path: &Path, bytes: &[u8]) -> Result<ModelConfig> {
    parse_config(path, bytes)
}

/// Finishes a save that a killed process committed but did not complete. For writers that
/// hold the directory's lock; `save_checkpoint` does it itself.
pub fn finish_interrupted_save(dir: &Path) -> Result<()> {
    finish_interrupted(dir)
}

/// Loads the last committed checkpoint in `dir`, checking every file against the config and
/// the manifest. Never writes: a save interrupted after its commit point is read where it
/// lies, and a save made meanwhile by another process is waited out.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    check_is_dir(dir)?;
    read_consistently(dir, load_committed)
}

/// The config, step and kind of the checkpoint in `dir`, checking `config.json` against the
/// manifest and the model file's header against the config, without reading any tensor.
pub fn inspect_checkpoint(dir: &Path) -> Result<CheckpointSummary> {
    check_is_dir(dir)?;
    read_consistently(dir, |view| {
        let config = read_config(view, true)?;
        let model = view
            .read_file(MODEL_FILE, false, open_safetensors, SafetensorsFile::bytes)?
            .ok_or_else(|| missing(dir, MODEL_FILE))?;
        check_header(&model, &config)?;
        Ok(CheckpointSummary {
            config,
            step: view.step(),
            has_training_state: view.has(OPTIMIZER_FILE) && view.has(TRAIN_STATE_FILE),
        })
    })
}

/// The train state of the checkpoint in `dir` (checked against the manifest), without the
/// tensors; `None` for a checkpoint of a model only.
pub fn read_train_state(dir: &Path) -> Result<Option<serde_json::Value>> {
    check_is_dir(dir)?;
    read_consistently(dir, |view| read_state(view, true))
}

fn check_is_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(Error::io(dir.display(), "is a file; a checkpoint is a directory"))
    } else {
        Err(Error::io(dir.display(), "no checkpoint here: not a directory"))
    }
}

fn missing(dir: &Path, name: &str) -> Error {
    Error::io(
        dir.join(name).display(),
        "missing: not a checkpoint directory (expected config.json and model.safetensors)",
    )
}

fn open_safetensors(path: &Path, file: std::fs::File, _len: u64) -> Result<SafetensorsFile> {
    SafetensorsFile::from_file(path, file)
}

fn read_json(path: &Path, file: std::fs::File, len: u64) -> Result<Vec<u8>> {
    if len > JSON_LIMIT {
        return Err(Error::format(
            path.display(),
            format!(
                "is {}, far more than a checkpoint's JSON file holds",
                crate::files::bytes_text(len)
            ),
        ));
    }
    read_open(file, path, len, JSON_LIMIT, "a checkpoint's JSON file")
}

fn read_config(view: &Committed, verify: bool) -> Result<ModelConfig> {
    let dir = view.dir();
    let bytes = view
        .read_file(CONFIG_FILE, verify, read_json, |b| b.as_slice())?
        .ok_or_else(|| missing(dir, CONFIG_FILE))?;
    parse_config(&dir.join(CONFIG_FILE), &bytes)
}

fn read_state(view: &Committed, verify: bool) -> Result<Option<serde_json::Value>> {
    let path = view.dir().join(TRAIN_STATE_FILE);
    let Some(bytes) = view.read_file(TRAIN_STATE_FILE, verify, read_json, |b| b.as_slice())? else {
        return Ok(None);
    };
    let state = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(path.display(), format!("invalid JSON: {e}")))?;
    Ok(Some(state))
}

fn load_committed(view: &Committed) -> Result<Checkpoint> {
    let dir = view.dir();
    let config = read_config(view, true)?;
    let (has_opt, has_state) = (view.has(OPTIMIZER_FILE), view.has(TRAIN_STATE_FILE));
    view.refuse_unlisted(OPTIMIZER_FILE)?;
    view.refuse_unlisted(TRAIN_STATE_FILE)?;
    if has_opt != has_state {
        let (present, absent) = if has_opt {
            (OPTIMIZER_FILE, TRAIN_STATE_FILE)
        } else {
            (TRAIN_STATE_FILE, OPTIMIZER_FILE)
        };
        return Err(Error::format(
            dir.join(present).display(),
            format!(
                "training state is incomplete: {} is missing (optimizer.safetensors and \
                 train_state.json come as a pair)",
                dir.join(absent).display()
            ),
        ));
    }
    // Before any tensor is allocated: a config someone handed over may describe a model far
    // larger than this machine (or than arithmetic).
    memory::check(
        &format!("loading the checkpoint in {}", dir.display()),
        memory::checkpoint_bytes(&config, has_opt),
    )?;

    let model = view
        .read_file(MODEL_FILE, true, open_safetensors, SafetensorsFile::bytes)?
        .ok_or_else(|| missing(dir, MODEL_FILE))?;
    let expected = expected(&config);
    let params = read_tensors(&model, &config, &expected, "")?;
    drop(model);

    let (optimizer, train_state) = if has_opt {
        let opt = view
            .read_file(OPTIMIZER_FILE, true, open_safetensors, SafetensorsFile::bytes)?
            .ok_or_else(|| missing(dir, OPTIMIZER_FILE))?;
        // read_tensors returns the moments under the parameter names.
        let m = read_tensors(&opt, &config, &expected, "m.")?;
        let v = read_tensors(&opt, &config, &expected, "v.")?;
        let state = read_state(view, true)?.ok_or_else(|| missing(dir, TRAIN_STATE_FILE))?;
        (Some((m, v)), Some(state))
    } else {
        (None, None)
    };
    Ok(Checkpoint { config, params, optimizer, train_state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arch, Theta};
    use std::collections::BTreeMap;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokenformer_core::safetensors_io::save_safetensors;
    use tokenformer_core::Rng;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("tf-ckpt-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A model small enough to write in microseconds, with every token count different so a
    /// swapped count shows up as a shape error.
    fn small_config() -> ModelConfig {
        ModelConfig {
            arch: Arch::TokenFormer,
            vocab_size: 11,
            d_model: 8,
            n_layers: 2,
            n_heads: 2,
            max_seq_len: 16,
            qkv_tokens: 3,
            proj_tokens: 4,
            ffn_tokens: 5,
            qkv_scale_tokens: 3,
            proj_scale_tokens: 4,
            ffn_scale_tokens: 5,
            norm: Theta::L2NormGelu,
            d_ff: 0,
            rotary_pct: 0.5,
            rotary_base: 10000.0,
            tokenizer: "byte".into(),
        }
    }

    fn random_tensors(cfg: &ModelConfig, seed: u64) -> Vec<(String, Tensor)> {
        let mut rng = Rng::new(seed);
        expected_shapes(cfg)
            .into_iter()
            .map(|(name, dims)| (name, Tensor::randn(&dims, 1.0, &mut rng)))
            .collect()
    }

    fn full_checkpoint(seed: u64) -> Checkpoint {
        let config = small_config();
        let params = random_tensors(&config, seed);
        let m = random_tensors(&config, seed + 1);
        let v = random_tensors(&config, seed + 2);
        let state = serde_json::json!({
            "step": seed,
            "rng": [1u64, 2, 3, u64::MAX],
            "data_position": 12345,
            "settings": {"lr": 6e-4, "batch": 8}
        });
        Checkpoint { config, params, optimizer: Some((m, v)), train_state: Some(state) }
    }

    fn bits(list: &[(String, Tensor)]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
        list.iter()
            .map(|(n, t)| {
                let b = t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect();
                (n.clone(), t.dims().to_vec(), b)
            })
            .collect()
    }

    fn assert_same(a: &Checkpoint, b: &Checkpoint) {
        assert_eq!(a.config, b.config);
        assert_eq!(bits(&a.params), bits(&b.params));
        match (&a.optimizer, &b.optimizer) {
            (Some((am, av)), Some((bm, bv))) => {
                assert_eq!(bits(am), bits(bm));
                assert_eq!(bits(av), bits(bv));
            }
            (None, None) => {}
            _ => panic!("optimizer state present in one checkpoint only"),
        }
        assert_eq!(a.train_state, b.train_state);
    }

    fn load_err(dir: &Path) -> String {
        load_checkpoint(dir).expect_err("load should fail").to_string()
    }

    /// A checkpoint written without a manifest, as a hand conversion would produce, so each
    /// corruption below reaches its own check instead of the manifest's.
    fn write_plain(dir: &Path, config_json: &str, tensors: &[(String, Tensor)]) {
        fs::write(dir.join(CONFIG_FILE), config_json).unwrap();
        save_safetensors(dir.join(MODEL_FILE), tensors).unwrap();
    }

    fn config_json(cfg: &ModelConfig) -> String {
        serde_json::to_string_pretty(cfg).unwrap()
    }

    #[test]
    fn expected_shapes_follow_spec_order_and_count() {
        let cfg = small_config();
        let shapes = expected_shapes(&cfg);
        let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "embed.weight");
        assert_eq!(
            &names[1..11],
            &[
                "layers.0.attention.query.key_param_tokens",
                "layers.0.attention.query.value_param_tokens",
                "layers.0.attention.key.key_param_tokens",
                "layers.0.attention.key.value_param_tokens",
                "layers.0.attention.value.key_param_tokens",
                "layers.0.attention.value.value_param_tokens",
                "layers.0.attention.proj.key_param_tokens",
                "layers.0.attention.proj.value_param_tokens",
                "layers.0.mlp.key_param_tokens",
                "layers.0.mlp.value_param_tokens",
            ]
        );
        assert_eq!(&names[names.len() - 2..], &["final_norm.weight", "final_norm.bias"]);
        assert_eq!(shapes[9].1, vec![5, 8]);
        let total: usize = shapes.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
        assert_eq!(total, cfg.param_count());
        let tiny = ModelConfig::preset("tiny").unwrap();
        let total: usize =
            expected_shapes(&tiny).iter().map(|(_, d)| d.iter().product::<usize>()).sum();
        assert_eq!(total, 1_081_600);
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = TempDir::new("rt");
        let ckpt = full_checkpoint(7);
        save_checkpoint(dir.path(), &ckpt).unwrap();
        assert!(is_checkpoint_dir(dir.path()));
        let back = load_checkpoint(dir.path()).unwrap();
        assert_same(&ckpt, &back);
        let manifest = manifest_in(dir.path(), MANIFEST_FILE);
        assert_eq!(manifest.step, Some(7));
        assert_eq!(manifest.files.len(), 4);
        // No temporaries are left behind.
        for entry in fs::read_dir(dir.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains("tmp") && !name.contains("pending"), "{name}");
        }

        // Params given in another order are stored (and returned) in SPEC order.
        let mut shuffled = ckpt.clone();
        shuffled.params.reverse();
        shuffled.optimizer = None;
        shuffled.train_state = None;
        save_checkpoint(dir.path(), &shuffled).unwrap();
        let back = load_checkpoint(dir.path()).unwrap();
        assert_eq!(bits(&back.params), bits(&ckpt.params));
        assert!(back.optimizer.is_none() && back.train_state.is_none());
        // The older save's training files went with it.
        assert!(!dir.path().join(OPTIMIZER_FILE).exists());
        assert!(!dir.path().join(TRAIN_STATE_FILE).exists());
    }

    #[test]
    fn saving_over_a_run_keeps_its_other_files() {
        let dir = TempDir::new("extra");
        save_checkpoint(dir.path(), &full_checkpoint(1)).unwrap();
        fs::write(dir.path().join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        fs::create_dir(dir.path().join("samples")).unwrap();
        let newer = full_checkpoint(2);
        save_checkpoint(dir.path(), &newer).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(), "{\"step\":1}\n");
        assert!(dir.path().join("samples").is_dir());
        assert_same(&newer, &load_checkpoint(dir.path()).unwrap());
    }

    #[test]
    fn a_crash_before_the_commit_point_leaves_the_old_checkpoint() {
        let dir = TempDir::new("crash-before");
        let old = full_checkpoint(1);
        save_checkpoint(dir.path(), &old).unwrap();
        CRASH_AT.with(|c| c.set(Some(Stage::BeforeCommit)));
        assert!(save_checkpoint(dir.path(), &full_checkpoint(2)).is_err());
        // Every new file is on disk under a temporary name, but nothing was committed.
        let strays = temp_files(dir.path());
        assert_eq!(strays.len(), 4, "{strays:?}");
        assert!(strays.iter().any(|n| n.starts_with("model.safetensors.tmp-")), "{strays:?}");
        assert_same(&old, &load_checkpoint(dir.path()).unwrap());
        // The next writer removes the strays.
        let newer = full_checkpoint(3);
        save_checkpoint(dir.path(), &newer).unwrap();
        assert_same(&newer, &load_checkpoint(dir.path()).unwrap());
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| crate::files::is_temp_name(n))
            .collect();
        names.sort();
        names
    }

    /// Every file of a directory with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_crash_after_the_commit_point_is_read_as_committed_and_rolled_forward_by_a_writer() {
        for stage in [Stage::AfterCommit, Stage::MidRollForward] {
            let dir = TempDir::new("crash-after");
            save_checkpoint(dir.path(), &full_checkpoint(1)).unwrap();
            let new = full_checkpoint(2);
            CRASH_AT.with(|c| c.set(Some(stage)));
            assert!(save_checkpoint(dir.path(), &new).is_err());
            assert!(dir.path().join(PENDING_FILE).exists(), "{stage:?}");
            if stage == Stage::MidRollForward {
                // The directory now really holds a mix: one new file, the rest old.
                let pending = manifest_in(dir.path(), PENDING_FILE);
                let renamed =
                    pending.staged.values().filter(|s| !dir.path().join(s).exists()).count();
                assert_eq!(renamed, 1);
            }
            assert!(is_checkpoint_dir(dir.path()));
            // Readers get the committed checkpoint and change nothing.
            let before = snapshot(dir.path());
            assert_same(&new, &load_checkpoint(dir.path()).unwrap());
            let summary = inspect_checkpoint(dir.path()).unwrap();
            assert_eq!((summary.step, summary.has_training_state), (Some(2), true));
            assert_eq!(read_train_state(dir.path()).unwrap(), new.train_state);
            assert_eq!(snapshot(dir.path()), before, "{stage:?}: a reader changed the directory");
            // The next writer to take the directory finishes the save.
            drop(RunLock::acquire(dir.path()).unwrap());
            assert!(!dir.path().join(PENDING_FILE).exists());
            assert_eq!(temp_files(dir.path()), Vec::<String>::new());
            assert_same(&new, &load_checkpoint(dir.path()).unwrap());
            assert_eq!(manifest_in(dir.path(), MANIFEST_FILE).step, Some(2));
        }
    }

    fn manifest_in(dir: &Path, file: &str) -> Manifest {
        let path = dir.join(file);
        Manifest::parse(&path, &fs::read(&path).unwrap(), file == PENDING_FILE).unwrap()
    }

    #[test]
    fn a_crafted_manifest_cannot_name_anything_but_the_checkpoint_files() {
        let outside = TempDir::new("outside");
        let victim = outside.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let crafted = [
            // A file name with a path in it, in the committed and the pending manifest.
            ("files", "../outside/victim", MANIFEST_FILE, "not a checkpoint file"),
            ("files", "../outside/victim", PENDING_FILE, "not a checkpoint file"),
            ("files", "/etc/passwd", PENDING_FILE, "not a checkpoint file"),
            // A temporary name that leads out of the directory, or to another file.
            ("staged", "../../victim", PENDING_FILE, "not a temporary name"),
            ("staged", "optimizer.safetensors", PENDING_FILE, "not a temporary name"),
            ("staged", "model.safetensors.tmp-1-2/../../x", PENDING_FILE, "not a temporary"),
        ];
        for (field, value, file, want) in crafted {
            let dir = TempDir::new("crafted");
            save_checkpoint(dir.path(), &full_checkpoint(1)).unwrap();
            let mut json: serde_json::Value =
                serde_json::from_slice(&fs::read(dir.path().join(MANIFEST_FILE)).unwrap()).unwrap();
            if field == "files" {
                let record = json["files"][MODEL_FILE].clone();
                json["files"][value] = record;
            } else {
                json["staged"] = serde_json::json!({ MODEL_FILE: value });
            }
            fs::write(dir.path().join(file), json.to_string()).unwrap();
            let before = snapshot(dir.path());
            let e = load_err(dir.path());
            assert!(e.contains(file) && e.contains(want), "{value}: {e}");
            assert_eq!(snapshot(dir.path()), before);
            if file == PENDING_FILE {
                // A writer refuses to finish such a save, and touches nothing.
                let e = save_checkpoint(dir.path(), &full_checkpoint(2)).unwrap_err().to_string();
                assert!(e.contains(want), "{value}: {e}");
                assert_eq!(snapshot(dir.path()), before);
            } else {
                // A writer never reads the committed manifest: it replaces it.
                save_checkpoint(dir.path(), &full_checkpoint(2)).unwrap();
                assert_same(&full_checkpoint(2), &load_checkpoint(dir.path()).unwrap());
            }
            assert_eq!(fs::read(&victim).unwrap(), b"precious");
        }
    }

    #[test]
    fn a_mixed_set_of_files_is_reported_not_loaded() {
        let a = TempDir::new("mix-a");
        let b = TempDir::new("mix-b");
        save_checkpoint(a.path(), &full_checkpoint(1)).unwrap();
        save_checkpoint(b.path(), &full_checkpoint(2)).unwrap();
        // Same shapes, same sizes: only the checksum can tell these apart.
        for name in [MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE] {
            let dir = TempDir::new("mix");
            for entry in fs::read_dir(a.path()).unwrap() {
                let entry = entry.unwrap();
                fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
            fs::copy(b.path().join(name), dir.path().join(name)).unwrap();
            let e = load_err(dir.path());
            assert!(e.contains(name) && e.contains("different saves"), "{e}");
        }
        // A training-state pair copied into a model-only checkpoint is not adopted either.
        let dir = TempDir::new("mix-opt");
        let mut model_only = full_checkpoint(1);
        model_only.optimizer = None;
        model_only.train_state = None;
        save_checkpoint(dir.path(), &model_only).unwrap();
        fs::copy(a.path().join(OPTIMIZER_FILE), dir.path().join(OPTIMIZER_FILE)).unwrap();
        fs::copy(a.path().join(TRAIN_STATE_FILE), dir.path().join(TRAIN_STATE_FILE)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(OPTIMIZER_FILE) && e.contains("different saves"), "{e}");
    }

    #[test]
    fn model_file_corruptions_name_file_and_tensor() {
        let cfg = small_config();
        let good = random_tensors(&cfg, 3);
        let json = config_json(&cfg);

        // Missing tensor.
        let dir = TempDir::new("missing");
        let without: Vec<_> =
            good.iter().filter(|(n, _)| n != "layers.1.mlp.value_param_tokens").cloned().collect();
        write_plain(dir.path(), &json, &without);
        let e = load_err(dir.path());
        assert!(
            e.contains(MODEL_FILE)
                && e.contains("'layers.1.mlp.value_param_tokens' is missing")
                && e.contains("ffn_tokens = 5"),
            "{e}"
        );

        // Wrong shape.
        let dir = TempDir::new("shape");
        let mut reshaped = good.clone();
        reshaped[0].1 = reshaped[0].1.reshape(&[8, 11]).unwrap();
        write_plain(dir.path(), &json, &reshaped);
        let e = load_err(dir.path());
        assert!(e.contains("'embed.weight' has shape [8, 11]") && e.contains("[11, 8]"), "{e}");

        // Unexpected tensor.
        let dir = TempDir::new("extra-tensor");
        let mut extra = good.clone();
        extra.push(("layers.2.mlp.key_param_tokens".into(), Tensor::scalar(0.0)));
        write_plain(dir.path(), &json, &extra);
        let e = load_err(dir.path());
        assert!(e.contains("unexpected tensor 'layers.2.mlp.key_param_tokens'"), "{e}");

        // Wrong dtype: final_norm.bias as F16, written with the safetensors crate itself.
        let dir = TempDir::new("dtype");
        fs::write(dir.path().join(CONFIG_FILE), &json).unwrap();
        let host: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = good
            .iter()
            .map(|(n, t)| {
                if n == "final_norm.bias" {
                    (n.clone(), vec![0u8; 2 * 8], vec![8], safetensors::Dtype::F16)
                } else {
                    let b = t.to_vec().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
                    (n.clone(), b, t.dims().to_vec(), safetensors::Dtype::F32)
                }
            })
            .collect();
        let views: Vec<_> = host
            .iter()
            .map(|(n, b, d, dt)| {
                (n.as_str(), safetensors::tensor::TensorView::new(*dt, d.clone(), b).unwrap())
            })
            .collect();
        fs::write(dir.path().join(MODEL_FILE), safetensors::serialize(views, None).unwrap())
            .unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains(MODEL_FILE) && e.contains("'final_norm.bias'") && e.contains("F16"),
            "{e}"
        );

        // Truncated.
        let dir = TempDir::new("truncated");
        write_plain(dir.path(), &json, &good);
        let path = dir.path().join(MODEL_FILE);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(MODEL_FILE) && e.contains("truncated"), "{e}");

        // Foreign files: random bytes, and a JSON file renamed.
        for content in [
            (0..1000u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect::<Vec<u8>>(),
            json.clone().into_bytes(),
        ] {
            let dir = TempDir::new("foreign");
            fs::write(dir.path().join(CONFIG_FILE), &json).unwrap();
            fs::write(dir.path().join(MODEL_FILE), content).unwrap();
            let e = load_err(dir.path());
            assert!(e.contains(MODEL_FILE) && e.contains("not a safetensors file"), "{e}");
        }
    }

    #[test]
    fn config_problems_are_reported_with_the_config_file() {
        let cfg = small_config();
        let good = random_tensors(&cfg, 4);

        // Missing config.
        let dir = TempDir::new("no-config");
        save_safetensors(dir.path().join(MODEL_FILE), &good).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(CONFIG_FILE) && e.contains("missing"), "{e}");
        assert!(!is_checkpoint_dir(dir.path()));

        // Config contradicting the tensors: more query/key/value tokens than stored.
        let dir = TempDir::new("contradict");
        let mut bigger = cfg.clone();
        bigger.qkv_tokens = 6;
        write_plain(dir.path(), &config_json(&bigger), &good);
        let e = load_err(dir.path());
        assert!(
            e.contains("'layers.0.attention.query.key_param_tokens' has shape [3, 8]")
                && e.contains("qkv_tokens = 6")
                && e.contains("disagree"),
            "{e}"
        );
        // ... and a vocabulary that does not match the embedding rows.
        let mut vocab = cfg.clone();
        vocab.vocab_size = 12;
        write_plain(dir.path(), &config_json(&vocab), &good);
        let e = load_err(dir.path());
        assert!(e.contains("'embed.weight'") && e.contains("vocab_size = 12"), "{e}");

        // Not JSON, an unknown field, an invalid value, a missing field, a rule violation.
        let mut with_typo: serde_json::Value = serde_json::to_value(&cfg).unwrap();
        with_typo["ffn_token"] = 5.into();
        let mut odd_rotary = cfg.clone();
        odd_rotary.rotary_pct = 0.25; // 0.25 · head dim 4 = 1 rotated dim: odd
        let mut no_field = serde_json::to_value(&cfg).unwrap();
        no_field.as_object_mut().unwrap().remove("n_heads");
        let cases = [
            ("{ not json".to_string(), "invalid JSON"),
            (with_typo.to_string(), "unknown field 'ffn_token'"),
            (json_with(&cfg, "norm", "\"layer_norm\""), "unknown norm 'layer_norm'"),
            (no_field.to_string(), "n_heads"),
            (config_json(&odd_rotary), "even"),
            ("[1, 2]".to_string(), "JSON object"),
        ];
        for (text, want) in cases {
            let dir = TempDir::new("bad-config");
            write_plain(dir.path(), &text, &good);
            let e = load_err(dir.path());
            assert!(e.contains(CONFIG_FILE) && e.contains(want), "want '{want}' in: {e}");
        }
    }

    fn json_with(cfg: &ModelConfig, field: &str, raw: &str) -> String {
        let mut v = serde_json::to_value(cfg).unwrap();
        v[field] = serde_json::from_str(raw).unwrap();
        v.to_string()
    }

    #[test]
    fn training_state_comes_in_pairs() {
        let dir = TempDir::new("pair");
        save_checkpoint(dir.path(), &full_checkpoint(5)).unwrap();
        fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        fs::remove_file(dir.path().join(TRAIN_STATE_FILE)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(OPTIMIZER_FILE) && e.contains(TRAIN_STATE_FILE), "{e}");

        let mut half = full_checkpoint(5);
        half.train_state = None;
        let e = save_checkpoint(dir.path(), &half).unwrap_err().to_string();
        assert!(e.contains("both or neither"), "{e}");
    }

    #[test]
    fn a_file_listed_in_the_manifest_must_exist() {
        let dir = TempDir::new("listed");
        save_checkpoint(dir.path(), &full_checkpoint(8)).unwrap();
        fs::remove_file(dir.path().join(OPTIMIZER_FILE)).unwrap();
        fs::remove_file(dir.path().join(TRAIN_STATE_FILE)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(OPTIMIZER_FILE) && e.contains("lists it"), "{e}");
    }

    #[test]
    fn optimizer_file_is_checked_like_the_model() {
        let dir = TempDir::new("opt");
        save_checkpoint(dir.path(), &full_checkpoint(6)).unwrap();
        fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        let opt = SafetensorsFile::open(dir.path().join(OPTIMIZER_FILE)).unwrap();
        let mut tensors = Vec::new();
        for name in opt.names() {
            if name != "v.final_norm.weight" {
                tensors.push((name.clone(), opt.get(&name).unwrap()));
            }
        }
        drop(opt);
        save_safetensors(dir.path().join(OPTIMIZER_FILE), &tensors).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains(OPTIMIZER_FILE) && e.contains("'v.final_norm.weight' is missing"),
            "{e}"
        );
    }

    #[test]
    fn invalid_checkpoints_are_refused_before_anything_is_written() {
        let dir = TempDir::new("refuse");
        let target = dir.path().join("run");
        let mut bad = full_checkpoint(1);
        bad.params[3].1 = Tensor::zeros(&[2, 2], tokenformer_core::Device::Cpu).unwrap();
        let e = save_checkpoint(&target, &bad).unwrap_err().to_string();
        assert!(e.contains(&bad.params[3].0) && e.contains("[2, 2]"), "{e}");
        assert!(!target.exists());

        let mut bad = full_checkpoint(1);
        if let Some((m, _)) = &mut bad.optimizer {
            m.pop();
        }
        let e = save_checkpoint(&target, &bad).unwrap_err().to_string();
        assert!(e.contains("optimizer m") && e.contains("final_norm.bias"), "{e}");
        assert!(!target.exists());
    }

    #[test]
    fn an_unwritable_directory_gives_one_clear_line() {
        let dir = TempDir::new("unwritable");
        // A path below a regular file can never be created, whoever runs the test.
        let blocker = dir.path().join("a-file");
        fs::write(&blocker, "x").unwrap();
        let target = blocker.join("run");
        let e = save_checkpoint(&target, &full_checkpoint(1)).unwrap_err().to_string();
        assert!(e.starts_with(&target.display().to_string()), "{e}");
        assert!(e.contains("cannot write a checkpoint") && !e.contains('\n'), "{e}");

        let e = load_err(&target);
        assert!(e.contains("run") && e.contains("not a directory"), "{e}");
    }
}
