//! Data for training: text → token ids → batches.
//!
//! The path a corpus takes:
//!
//! 1. `corpus`: files and directories → `Document`s (bytes, in a fixed order).
//! 2. `tokenizer`: bytes → ids (`byte`, `gpt2` or `neox`).
//! 3. `cache`: ids written once to a binary file, then memory-mapped on every later run.
//! 4. `Dataset` (here): the stream split into a training view and a validation view.
//! 5. `batch`: random training windows (resumable) and fixed validation windows.
//!
//! With no data paths, the corpus is tiny shakespeare, built into the binary.

mod batch;
mod cache;
mod corpus;
mod tokenizer;

use std::path::{Path, PathBuf};

use crate::progress::thousands;
use tokenformer_core::{Error, Result};

pub use batch::{val_windows, val_windows_spread, Batch, Batcher, ValWindows};
pub use cache::{load_or_build, source_hash, CacheStatus, TokenFile};
pub use corpus::{list_files, read_documents, read_files, Document};
pub use tokenizer::{StreamDecoder, Tokenizer};

/// Tiny shakespeare (1.1 MB, public domain; see data/README.md), the default corpus.
pub const DEFAULT_CORPUS: &[u8] = include_bytes!("../../../../data/tinyshakespeare.txt");

/// The share of the token stream held out for validation when no validation files are named.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// The default corpus as a document list.
pub fn default_documents() -> Vec<Document> {
    vec![Document { name: "tinyshakespeare.txt (built in)".into(), bytes: DEFAULT_CORPUS.to_vec() }]
}

/// Where the validation tokens come from.
#[derive(Clone, Debug)]
pub enum ValSplit {
    /// The last fraction (0 ≤ f < 1) of the token stream; the rest is training data.
    Tail(f64),
    /// Separate documents (`--val-data`); all of the main corpus is training data.
    Files(Vec<Document>),
}

/// What a run asks for, as the command line gives it.
#[derive(Clone, Debug)]
pub struct DataSpec {
    /// Files and directories; empty means the built-in corpus.
    pub data: Vec<PathBuf>,
    /// Validation files and directories; empty means a tail split of `data`.
    pub val_data: Vec<PathBuf>,
    /// Used only when `val_data` is empty.
    pub val_fraction: f64,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec { data: Vec::new(), val_data: Vec::new(), val_fraction: DEFAULT_VAL_FRACTION }
    }
}

/// A tokenised corpus split into training and validation views.
pub struct Dataset {
    tokenizer: Tokenizer,
    main: TokenFile,
    /// Set when validation comes from separate files.
    val_file: Option<TokenFile>,
    /// Training tokens are `main[..train_len]`; with a tail split, validation is the rest.
    train_len: usize,
    status: Vec<CacheStatus>,
}

impl Dataset {
    /// Reads, tokenises (or maps from `cache_dir`) and splits the data a `DataSpec` names.
    ///
    /// Validation files that also lie under `data` (a book held out of a directory of books)
    /// are left out of the training set, so the model is never validated on text it trained on.
    pub fn load(tokenizer: Tokenizer, spec: &DataSpec, cache_dir: &Path) -> Result<Dataset> {
        if spec.val_data.is_empty() {
            let docs = if spec.data.is_empty() {
                default_documents()
            } else {
                read_documents(&spec.data)?
            };
            return Dataset::from_documents(
                tokenizer,
                &docs,
                ValSplit::Tail(spec.val_fraction),
                cache_dir,
            );
        }
        let val_files = list_files(&spec.val_data)?;
        let docs = if spec.data.is_empty() {
            default_documents()
        } else {
            let held_out: Vec<PathBuf> =
                val_files.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
            let train_files: Vec<PathBuf> = list_files(&spec.data)?
                .into_iter()
                .filter(|p| std::fs::canonicalize(p).map_or(true, |c| !held_out.contains(&c)))
                .collect();
            if train_files.is_empty() {
                return Err(Error::invalid(
                    "every training file is also a validation file; nothing left to train on",
                ));
            }
            read_files(train_files)?
        };
        let val = ValSplit::Files(read_files(val_files)?);
        Dataset::from_documents(tokenizer, &docs, val, cache_dir)
    }

    pub fn from_documents(
        tokenizer: Tokenizer,
        docs: &[Document],
        val: ValSplit,
        cache_dir: &Path,
    ) -> Result<Dataset> {
        let (main, main_status) = load_or_build(cache_dir, tokenizer, docs)?;
        let mut status = vec![main_status];
        let (val_file, train_len) = match val {
            ValSplit::Tail(f) => {
                if !(0.0..1.0).contains(&f) {
                    return Err(Error::invalid(format!(
                        "validation fraction must be in [0, 1), got {f}"
                    )));
                }
                let n_val = (main.len() as f64 * f).floor() as usize;
                (None, main.len() - n_val)
            }
            ValSplit::Files(val_docs) => {
                let (file, s) = load_or_build(cache_dir, tokenizer, &val_docs)?;
                status.push(s);
                let n = main.len();
                (Some(file), n)
            }
        };
        Ok(Dataset { tokenizer, main, val_file, train_len, status })
    }

    pub fn tokenizer(&self) -> Tokenizer {
        self.tokenizer
    }

    pub fn train(&self) -> &[u32] {
        &self.main.tokens()[..self.train_len]
    }

    pub fn val(&self) -> &[u32] {
        match &self.val_file {
            Some(f) => f.tokens(),
            None => &self.main.tokens()[self.train_len..],
        }
    }

    /// The source hash (`source_hash`) of the main corpus and, if separate, of the validation
    /// files: what a resumed run compares to tell that it reads the data its run started with.
    pub fn source_hashes(&self) -> Vec<u64> {
        std::iter::once(&self.main).chain(&self.val_file).map(TokenFile::source_hash).collect()
    }

    /// What the cache did for the main corpus and (if separate) the validation files.
    pub fn cache_status(&self) -> &[CacheStatus] {
        &self.status
    }

    /// One line for the run log, e.g. `gpt2: 304,223 train + 33,802 val tokens (cache reused)`.
    pub fn summary(&self) -> String {
        let status: Vec<String> = self
            .status
            .iter()
            .map(|s| match s {
                CacheStatus::Reused => "cache reused".to_string(),
                CacheStatus::Built => "tokenised, cached".to_string(),
                CacheStatus::Rebuilt(why) => format!("cache rebuilt: {why}"),
            })
            .collect();
        format!(
            "{}: {} train + {} val tokens ({})",
            self.tokenizer,
            thousands(self.train().len()),
            thousands(self.val().len()),
            status.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tf-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn default_corpus_tail_split_sizes() {
        let dir = temp_dir("split");
        let ds = Dataset::load(Tokenizer::Byte, &DataSpec::default(), &dir).unwrap();
        assert_eq!(DEFAULT_CORPUS.len(), 1_115_394);
        assert_eq!(ds.val().len(), 111_539);
        assert_eq!(ds.train().len() + ds.val().len(), DEFAULT_CORPUS.len());
        // The views are the stream, cut once, in order.
        assert_eq!(ds.train()[..5], [70, 105, 114, 115, 116]); // "First"
        assert_eq!(*ds.val().last().unwrap(), u32::from(*DEFAULT_CORPUS.last().unwrap()));
        assert!(ds.summary().contains("1,003,855 train + 111,539 val"), "{}", ds.summary());

        let again = Dataset::load(Tokenizer::Byte, &DataSpec::default(), &dir).unwrap();
        assert_eq!(again.cache_status(), &[CacheStatus::Reused]);
        let spec = DataSpec { val_fraction: 1.0, ..DataSpec::default() };
        assert!(Dataset::load(Tokenizer::Byte, &spec, &dir).is_err());
        let spec = DataSpec { val_fraction: 0.0, ..DataSpec::default() };
        assert!(Dataset::load(Tokenizer::Byte, &spec, &dir).unwrap().val().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn named_validation_files() {
        let dir = temp_dir("valfiles");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("train.txt"), "to be or not to be").unwrap();
        std::fs::write(dir.join("val.txt"), "that is the question").unwrap();
        // The directory holds both files; the validation file is held out of training.
        let spec = DataSpec {
            data: vec![dir.clone()],
            val_data: vec![dir.join("val.txt")],
            ..DataSpec::default()
        };
        let ds = Dataset::load(Tokenizer::Gpt2, &spec, &dir.join("cache")).unwrap();
        assert_eq!(ds.tokenizer().decode(ds.train()), "to be or not to be");
        assert_eq!(ds.tokenizer().decode(ds.val()), "that is the question");
        assert_eq!(ds.cache_status().len(), 2);
        let spec = DataSpec { data: vec![dir.join("val.txt")], ..spec };
        assert!(Dataset::load(Tokenizer::Gpt2, &spec, &dir.join("cache")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
