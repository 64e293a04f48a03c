//! The commit protocol: the manifest, staging new files, the commit point and the roll-forward,
//! and how a reader finds the last committed checkpoint without changing anything.
//!
//! # How a save stays safe when the process dies halfway
//!
//! The guarantee: a crash at any instant never leaves a directory that loads a *different*
//! model — a mix of weights from one save with the config, optimizer or step of another. After
//! a crash, `load_checkpoint` gives either the complete old checkpoint or the complete new one.
//!
//! The checkpoint lives inside the run directory, next to files a training run keeps appending
//! to (metrics, the loss plot), so the directory itself is never swapped: each checkpoint file
//! is replaced individually, and a small manifest acts as a commit record, the way a database
//! journal does. Only the process holding the directory's lock (`run_dir`) saves:
//!
//! 1. Write every new file under a fresh temporary name, `<name>.tmp-<pid>-<n>`, created
//!    exclusively (see `files`), and fsync it. The checksum is computed as the bytes go out.
//!    The old checkpoint is untouched; a crash here leaves stray temporary files that loading
//!    ignores and the next writer removes.
//! 2. Write the new manifest — size and checksum of each new file, and the temporary name it
//!    sits under — to a temporary file, fsync it, rename it to `checkpoint.json.pending`, and
//!    fsync the directory. This rename is the commit point: from now on the new checkpoint is
//!    the one that counts, and everything it needs is durable on disk.
//! 3. Roll forward: rename each temporary file over its name, delete optional files the new
//!    checkpoint does not have, fsync the directory, write `checkpoint.json` (the manifest
//!    without the temporary names, through a temporary file and a rename), and delete
//!    `checkpoint.json.pending`.
//!
//! Each file is written once and renamed once: one layer of temporary names, no more.
//!
//! A crash during step 3 leaves some files old and some new. The next *writer* (the next save,
//! `train --resume`) finishes step 3 first, checking each remaining temporary file against the
//! pending manifest before renaming it. A *reader* never renames or deletes anything: it reads
//! the pending checkpoint where it lies, each file from its temporary name if that is still
//! there, else from its final name (a temporary name only ever disappears by being renamed to
//! the final one, so this order cannot miss a file). Every file a reader uses is checked
//! against the manifest from the very bytes it then parses; if a save commits while a reader
//! is busy, the reader notices that the manifests changed under it and starts again. A mixed
//! set of files that arose any other way (a file copied in by hand, a partial `rsync`) is
//! reported, naming the file, instead of loaded.
//!
//! A run directory is untrusted input, so a manifest may name only the four checkpoint files,
//! and a temporary name only in the form above: a crafted manifest cannot make a writer rename
//! or delete anything else, inside the directory or out of it.

use super::{CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE};
use crate::files::{
    entry_exists, hash_file, open_regular, open_regular_if_exists, read_regular,
    read_regular_if_exists, replace_file, Hasher, HashingWriter, TempFile,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenformer_core::safetensors_io::{sync_dir, write_safetensors};
use tokenformer_core::{Error, Result, Tensor};

/// The committed-but-not-yet-rolled-forward manifest (step 2 above).
pub(super) const PENDING_FILE: &str = "checkpoint.json.pending";
const MANIFEST_FORMAT: &str = "tokenformer-checkpoint";
const MANIFEST_VERSION: u32 = 1;
/// The JSON files of a checkpoint (manifests, config, train state) are a few kilobytes; a
/// larger one is not ours, and is refused before it is read.
pub(super) const JSON_LIMIT: u64 = 64 << 20;
/// Every file a checkpoint can have.
const CHECKPOINT_FILES: [&str; 4] = [CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    format: String,
    version: u32,
    /// The training step, when the train state records one (for humans and scripts).
    pub(super) step: Option<u64>,
    /// Every file of this checkpoint, by name within the directory.
    pub(super) files: BTreeMap<String, FileRecord>,
    /// In a pending manifest only: the temporary name each file was written under.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) staged: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRecord {
    bytes: u64,
    /// `content_hash` of the file, as 16 hex digits.
    checksum: String,
}

impl FileRecord {
    pub(super) fn of(bytes: &[u8]) -> FileRecord {
        let mut h = Hasher::default();
        h.update(bytes);
        FileRecord::from_hasher(&h)
    }

    fn from_hasher(h: &Hasher) -> FileRecord {
        FileRecord { bytes: h.len(), checksum: format!("{:016x}", h.finish()) }
    }
}

/// Whether `staged` is a temporary name for checkpoint file `name`: `<name>.tmp-<pid>-<n>`, or
/// `<name>.tmp` as earlier versions wrote. Neither can hold a separator or `..`.
fn is_staged_name(name: &str, staged: &str) -> bool {
    let Some(rest) = staged.strip_prefix(name).and_then(|r| r.strip_prefix(".tmp")) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.is_empty()
        || rest
            .strip_prefix('-')
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

impl Manifest {
    fn new(step: Option<u64>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            step,
            files: BTreeMap::new(),
            staged: BTreeMap::new(),
        }
    }

    /// Parses and checks a manifest: the format, and that it names only checkpoint files (and,
    /// when `pending`, only well-formed temporary names for them).
    pub(super) fn parse(path: &Path, bytes: &[u8], pending: bool) -> Result<Manifest> {
        let bad = |msg: String| Error::format(path.display(), msg);
        let mut m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("invalid checkpoint manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "unsupported manifest (format '{}' version {}; expected '{MANIFEST_FORMAT}' \
                 version {MANIFEST_VERSION})",
                m.format, m.version
            )));
        }
        if let Some(name) = m.files.keys().find(|n| !CHECKPOINT_FILES.contains(&n.as_str())) {
            return Err(bad(format!(
                "names {name:?}, which is not a checkpoint file (expected {}); refusing to use \
                 this manifest",
                CHECKPOINT_FILES.join(", ")
            )));
        }
        for required in [CONFIG_FILE, MODEL_FILE] {
            if !m.files.contains_key(required) {
                return Err(bad(format!("does not list {required}, which every checkpoint has")));
            }
        }
        if m.files.contains_key(OPTIMIZER_FILE) != m.files.contains_key(TRAIN_STATE_FILE) {
            return Err(bad(format!(
                "lists only one of {OPTIMIZER_FILE} and {TRAIN_STATE_FILE}, which come as a pair"
            )));
        }
        if !pending && !m.staged.is_empty() {
            return Err(bad("a committed manifest names no temporary files".into()));
        }
        if pending && m.staged.is_empty() {
            // Written by an earlier version, which staged every file as `<name>.tmp`.
            m.staged = m.files.keys().map(|n| (n.clone(), format!("{n}.tmp"))).collect();
        }
        for (name, staged) in &m.staged {
            if !m.files.contains_key(name) || !is_staged_name(name, staged) {
                return Err(bad(format!(
                    "names {staged:?} as the new {name}, which is not a temporary name for a \
                     file of this checkpoint; refusing to use this manifest"
                )));
            }
        }
        Ok(m)
    }

    fn mismatch(&self, path: &Path, manifest_file: &str, got: &FileRecord) -> Error {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let want = &self.files[&name];
        Error::format(
            path.display(),
            format!(
                "does not match {manifest_file} (size {} vs {}, checksum {} vs {}): the files \
                 come from different saves (an interrupted copy, or a file replaced by hand); \
                 refusing to load a mixed checkpoint (if you edited it on purpose, delete \
                 {MANIFEST_FILE} to skip this check)",
                got.bytes, want.bytes, got.checksum, want.checksum
            ),
        )
    }
}

pub(super) fn to_pretty_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::invalid(format!("checkpoint: cannot serialise JSON: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Reading: the last committed checkpoint, touching nothing.

/// The bytes of `checkpoint.json` and `checkpoint.json.pending`, if present, as one snapshot.
///
/// Two files cannot be read at one instant, so `checkpoint.json` is read before and after the
/// pending manifest, until both reads agree. A writer replaces `checkpoint.json` (end of step
/// 3) only while a pending manifest exists, and deletes the pending manifest only after that;
/// so when `checkpoint.json` did not change around the read of the pending manifest, the pair
/// is one the directory really held at that moment.
fn manifest_bytes(dir: &Path) -> Result<[Option<Vec<u8>>; 2]> {
    let read = |name: &str| read_regular_if_exists(&dir.join(name), JSON_LIMIT, "a manifest");
    let mut committed = read(MANIFEST_FILE)?;
    loop {
        let pending = read(PENDING_FILE)?;
        let again = read(MANIFEST_FILE)?;
        if again == committed {
            return Ok([committed, pending]);
        }
        committed = again;
    }
}

/// A directory's last committed checkpoint, as a reader sees it: the pending manifest when a
/// save has committed but not finished, else `checkpoint.json`, else none (a checkpoint made
/// by hand, without a manifest).
pub(super) struct Committed {
    dir: PathBuf,
    manifest: Option<Manifest>,
    pending: bool,
    /// What the manifests were parsed from, to tell whether a save committed meanwhile.
    stamp: [Option<Vec<u8>>; 2],
}

impl Committed {
    pub(super) fn read(dir: &Path) -> Result<Committed> {
        let stamp = manifest_bytes(dir)?;
        let (manifest, pending) = match &stamp {
            [_, Some(p)] => (Some(Manifest::parse(&dir.join(PENDING_FILE), p, true)?), true),
            [Some(m), None] => (Some(Manifest::parse(&dir.join(MANIFEST_FILE), m, false)?), false),
            [None, None] => (None, false),
        };
        Ok(Committed { dir: dir.to_path_buf(), manifest, pending, stamp })
    }

    /// Whether the manifests still hold what they held when this view was read.
    pub(super) fn unchanged(&self) -> bool {
        manifest_bytes(&self.dir).is_ok_and(|now| now == self.stamp)
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn step(&self) -> Option<u64> {
        self.manifest.as_ref().and_then(|m| m.step)
    }

    /// Whether the committed checkpoint has file `name` (without a manifest: whether it is
    /// there).
    pub(super) fn has(&self, name: &str) -> bool {
        match &self.manifest {
            Some(m) => m.files.contains_key(name),
            None => entry_exists(&self.dir.join(name)),
        }
    }

    /// Fails when file `name` is in the directory although the committed manifest does not
    /// list it: without this check a training-state pair copied in from another run would be
    /// adopted. (Leftovers of the save a pending manifest replaces are about to be deleted.)
    pub(super) fn refuse_unlisted(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        match &self.manifest {
            Some(m) if !self.pending && !m.files.contains_key(name) && entry_exists(&path) => {
                Err(Error::format(
                    path.display(),
                    format!(
                        "not listed in {MANIFEST_FILE}; refusing to mix files from different saves"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    fn manifest_name(&self) -> &'static str {
        if self.pending {
            PENDING_FILE
        } else {
            MANIFEST_FILE
        }
    }

    /// Opens checkpoint file `name` as committed and hands it to `load` (which gets the path,
    /// the open regular file and its length); `bytes` gives back the file's bytes from what
    /// `load` returned, to check them against the manifest. `Ok(None)`: the checkpoint does not
    /// have this file. With `verify` false the checksum is skipped (for a quick look).
    pub(super) fn read_file<T>(
        &self,
        name: &str,
        verify: bool,
        load: impl Fn(&Path, File, u64) -> Result<T>,
        bytes: impl Fn(&T) -> &[u8],
    ) -> Result<Option<T>> {
        let path = self.dir.join(name);
        let Some(m) = &self.manifest else {
            let Some((file, len)) = open_regular_if_exists(&path)? else { return Ok(None) };
            return load(&path, file, len).map(Some);
        };
        let Some(record) = m.files.get(name) else {
            self.refuse_unlisted(name)?;
            return Ok(None);
        };
        // The temporary name first: it only ever disappears by becoming the final name.
        let candidates: Vec<PathBuf> = m
            .staged
            .get(name)
            .map(|s| self.dir.join(s))
            .into_iter()
            .chain([path.clone()])
            .collect();
        let mut mismatch = None;
        for candidate in &candidates {
            // A temporary file can vanish between two looks: renamed to the final name.
            let Some((file, len)) = open_regular_if_exists(candidate)? else { continue };
            let value = load(candidate, file, len)?;
            if !verify {
                return Ok(Some(value));
            }
            let got = FileRecord::of(bytes(&value));
            if &got == record {
                return Ok(Some(value));
            }
            mismatch.get_or_insert(m.mismatch(&path, self.manifest_name(), &got));
        }
        Err(mismatch.unwrap_or_else(|| {
            Error::format(
                path.display(),
                format!(
                    "missing, but {} lists it as part of this checkpoint",
                    self.manifest_name()
                ),
            )
        }))
    }
}

/// Runs `read` on the directory's committed checkpoint, starting again (a bounded number of
/// times) when it fails because a save committed while it ran.
pub(super) fn read_consistently<T>(
    dir: &Path,
    read: impl Fn(&Committed) -> Result<T>,
) -> Result<T> {
    const ATTEMPTS: u64 = 200;
    let mut attempt = 0;
    loop {
        let view = Committed::read(dir)?;
        match read(&view) {
            Ok(value) => return Ok(value),
            Err(e) if view.unchanged() => return Err(e),
            Err(e) if attempt + 1 == ATTEMPTS => {
                return Err(Error::io(
                    dir.display(),
                    format!("the checkpoint kept changing while it was read ({e}); try again"),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(attempt.min(20))),
        }
        attempt += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: only under the directory's lock.

/// A file of a save in progress, under its temporary name.
pub(super) struct Staged {
    name: &'static str,
    temp: TempFile,
    record: FileRecord,
}

pub(super) fn stage_bytes(dir: &Path, name: &'static str, bytes: &[u8]) -> Result<Staged> {
    let temp = TempFile::with_bytes(dir, name, bytes).map_err(|e| not_writable(dir, e))?;
    Ok(Staged { name, temp, record: FileRecord::of(bytes) })
}

pub(super) fn stage_tensors(
    dir: &Path,
    name: &'static str,
    tensors: &[(String, Tensor)],
) -> Result<Staged> {
    let mut temp = TempFile::create(dir, name).map_err(|e| not_writable(dir, e))?;
    let path = temp.path().to_path_buf();
    let out = HashingWriter { inner: temp.take_file(), hasher: Hasher::default() };
    let out = write_safetensors(out, &path, tensors)?;
    out.inner.sync_all().map_err(|e| Error::io(path.display(), format!("cannot write: {e}")))?;
    temp.put_file(out.inner);
    Ok(Staged { name, temp, record: FileRecord::from_hasher(&out.hasher) })
}

/// Steps 2 and 3 for files staged by `stage_*`.
pub(super) fn commit(dir: &Path, step: Option<u64>, mut staged: Vec<Staged>) -> Result<()> {
    let mut manifest = Manifest::new(step);
    for s in &staged {
        manifest.files.insert(s.name.into(), s.record.clone());
        manifest.staged.insert(s.name.into(), s.temp.temp_name());
    }
    let pending = TempFile::with_bytes(dir, PENDING_FILE, &to_pretty_json(&manifest)?)
        .map_err(|e| not_writable(dir, e))?;
    crash_point(Stage::BeforeCommit, &mut staged)?;
    pending.rename_to_final()?;
    // The temporary files now belong to the pending manifest.
    staged.into_iter().for_each(|s| s.temp.keep());
    sync_dir(dir)?;
    crash_point(Stage::AfterCommit, &mut Vec::new())?;
    // The same roll-forward the next writer would do, minus re-checking files whose checksums
    // were computed a moment ago.
    roll_forward(dir, &manifest, false)
}

/// Finishes a save that committed (wrote `checkpoint.json.pending`) but did not complete.
/// Writers only.
pub(super) fn finish_interrupted(dir: &Path) -> Result<()> {
    let path = dir.join(PENDING_FILE);
    if !entry_exists(&path) {
        return Ok(());
    }
    let bytes = read_regular(&path, JSON_LIMIT, "a checkpoint manifest")?;
    let manifest = Manifest::parse(&path, &bytes, true)?;
    roll_forward(dir, &manifest, true)
}

/// Step 3 of the protocol. Idempotent: each rename either already happened or happens now, so
/// it can be interrupted and rerun any number of times.
fn roll_forward(dir: &Path, manifest: &Manifest, verify: bool) -> Result<()> {
    for (name, record) in &manifest.files {
        let Some(staged) = manifest.staged.get(name) else { continue };
        let from = dir.join(staged);
        match fs::symlink_metadata(&from) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // renamed already
            Err(e) => return Err(Error::io(from.display(), e)),
            Ok(meta) if !meta.is_file() => {
                return Err(Error::format(
                    from.display(),
                    format!(
                        "is not a regular file; the save {PENDING_FILE} records cannot be \
                         completed"
                    ),
                ))
            }
            Ok(_) => {}
        }
        if verify {
            let (mut file, _) = open_regular(&from)?;
            if &FileRecord::from_hasher(&hash_file(&mut file, &from)?) != record {
                return Err(Error::format(
                    from.display(),
                    format!(
                        "does not match the pending manifest {PENDING_FILE}; the interrupted \
                         save cannot be completed"
                    ),
                ));
            }
        }
        let to = dir.join(name);
        fs::rename(&from, &to).map_err(|e| {
            Error::io(to.display(), format!("cannot rename {} here: {e}", from.display()))
        })?;
        crash_point(Stage::MidRollForward, &mut Vec::new())?;
    }
    // Optional files the new checkpoint does not have belong to an older save.
    for name in [OPTIMIZER_FILE, TRAIN_STATE_FILE] {
        let path = dir.join(name);
        if !manifest.files.contains_key(name) && entry_exists(&path) {
            fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
        }
    }
    sync_dir(dir)?;
    let committed = Manifest { staged: BTreeMap::new(), ..manifest.clone() };
    replace_file(dir, MANIFEST_FILE, &to_pretty_json(&committed)?)?;
    let pending = dir.join(PENDING_FILE);
    fs::remove_file(&pending).map_err(|e| Error::io(pending.display(), e))?;
    sync_dir(dir)
}

pub(super) fn not_writable(dir: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(dir.display(), format!("cannot write a checkpoint into this directory: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Crash injection for the tests: a save can be told to stop dead at one of these points, as if
// the process had been killed there (its temporary files stay, as a killed process's would).
// In normal builds `crash_point` is a no-op.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(super) enum Stage {
    BeforeCommit,
    AfterCommit,
    MidRollForward,
}

#[cfg(test)]
thread_local! {
    pub(super) static CRASH_AT: std::cell::Cell<Option<Stage>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn crash_point(stage: Stage, staged: &mut Vec<Staged>) -> Result<()> {
    if CRASH_AT.with(|c| c.get()) == Some(stage) {
        CRASH_AT.with(|c| c.set(None));
        staged.drain(..).for_each(|s| s.temp.keep());
        return Err(Error::invalid(format!("simulated crash at {stage:?}")));
    }
    Ok(())
}

#[cfg(not(test))]
#[inline(always)]
fn crash_point(_stage: Stage, _staged: &mut Vec<Staged>) -> Result<()> {
    Ok(())
}
