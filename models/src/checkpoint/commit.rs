//! The commit protocol: the manifest, staging new files, the commit point and the roll-forward.
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
//! journal does:
//!
//! 1. Write every new file as `<name>.tmp` (straight into that file: one temporary name per
//!    file, not a second layer inside the safetensors writer) and fsync it. The old checkpoint is untouched; a
//!    crash here leaves stray `.tmp` files that loading ignores and the next save overwrites.
//! 2. Write the new manifest (size and checksum of each new file) to `checkpoint.json.partial`,
//!    fsync it, and rename it to `checkpoint.json.pending`, then fsync the directory. This
//!    rename is the commit point: from now on the new checkpoint is the one that counts, and
//!    everything it needs is durable on disk under a `.tmp` name.
//! 3. Roll forward: rename each `<name>.tmp` over `<name>`, delete optional files the new
//!    checkpoint does not have, fsync the directory, rename `checkpoint.json.pending` to
//!    `checkpoint.json`.
//!
//! A crash during step 3 leaves some files old and some new. `load_checkpoint` (and the next
//! `save_checkpoint`) sees `checkpoint.json.pending` and finishes step 3 first, checking each
//! remaining `.tmp` file against the manifest before renaming it. Finally, every load checks
//! every file against `checkpoint.json`, so a mixed set that arose any other way (a file copied
//! in by hand, a partial `rsync`) is reported, naming the file, instead of loaded.
//!
//! The checksum is a 64-bit word-wise multiply-rotate hash: it is there to tell two saves of
//! the same model apart (their files have identical sizes), not to resist tampering. Each step
//! of it is a bijection of the running state for a fixed input word, so two files that differ in
//! a single 8-byte word always hash differently.

use super::{MANIFEST_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use tokenformer_core::safetensors_io::{sync_dir, write_safetensors, SafetensorsFile};
use tokenformer_core::{Error, Result, Tensor};

/// The committed-but-not-yet-rolled-forward manifest (step 2 above).
pub(super) const PENDING_FILE: &str = "checkpoint.json.pending";
pub(super) const PARTIAL_FILE: &str = "checkpoint.json.partial";
pub(super) const MANIFEST_FORMAT: &str = "tokenformer-checkpoint";
pub(super) const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    pub(super) format: String,
    pub(super) version: u32,
    /// The training step, when the train state records one (for humans and scripts).
    pub(super) step: Option<u64>,
    /// Every file of this checkpoint, by name within the directory.
    pub(super) files: BTreeMap<String, FileRecord>,
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
        FileRecord { bytes: bytes.len() as u64, checksum: format!("{:016x}", content_hash(bytes)) }
    }
}

impl Manifest {
    /// Checks that `bytes`, read from `dir/name`, are the file this manifest recorded.
    pub(super) fn check(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let path = dir.join(name);
        let Some(want) = self.files.get(name) else {
            return Err(Error::format(
                path.display(),
                format!(
                    "not listed in {MANIFEST_FILE}; refusing to mix files from different saves"
                ),
            ));
        };
        let got = FileRecord::of(bytes);
        if &got != want {
            return Err(Error::format(
                path.display(),
                format!(
                    "does not match {MANIFEST_FILE} (size {} vs {}, checksum {} vs {}): the \
                     files come from different saves (an interrupted copy, or a file replaced \
                     by hand); refusing to load a mixed checkpoint (if you edited it on \
                     purpose, delete {MANIFEST_FILE} to skip this check)",
                    got.bytes, want.bytes, got.checksum, want.checksum
                ),
            ));
        }
        Ok(())
    }
}

pub(super) fn read_manifest(path: &Path) -> Result<Option<Manifest>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path.display(), e)),
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(path.display(), format!("invalid checkpoint manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
        return Err(Error::format(
            path.display(),
            format!(
                "unsupported manifest (format '{}' version {}; expected '{MANIFEST_FORMAT}' \
                 version {MANIFEST_VERSION})",
                m.format, m.version
            ),
        ));
    }
    Ok(Some(m))
}

/// Finishes a save that committed (wrote `checkpoint.json.pending`) but did not complete.
pub(super) fn recover(dir: &Path) -> Result<()> {
    match read_manifest(&dir.join(PENDING_FILE))? {
        Some(manifest) => roll_forward(dir, &manifest, true),
        None => Ok(()),
    }
}

/// Step 3 of the protocol. Idempotent: each rename either already happened or happens now, so
/// it can be interrupted and rerun any number of times.
pub(super) fn roll_forward(dir: &Path, manifest: &Manifest, verify: bool) -> Result<()> {
    for (name, record) in &manifest.files {
        let tmp = dir.join(tmp_name(name));
        if !tmp.exists() {
            // Renamed before the interruption; the load that follows checks its contents.
            continue;
        }
        if verify {
            let bytes = fs::read(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
            if &FileRecord::of(&bytes) != record {
                return Err(Error::format(
                    tmp.display(),
                    format!(
                        "does not match the pending manifest {PENDING_FILE}; the interrupted \
                         save cannot be completed"
                    ),
                ));
            }
        }
        rename(&tmp, &dir.join(name))?;
        crash_point(Stage::MidRollForward)?;
    }
    // Optional files the new checkpoint does not have belong to an older save.
    for name in [OPTIMIZER_FILE, TRAIN_STATE_FILE] {
        let path = dir.join(name);
        if !manifest.files.contains_key(name) && path.exists() {
            fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
        }
    }
    sync_dir(dir)?;
    rename(&dir.join(PENDING_FILE), &dir.join(MANIFEST_FILE))?;
    sync_dir(dir)
}

pub(super) fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

pub(super) fn write_tmp_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileRecord> {
    write_durably(&dir.join(tmp_name(name)), bytes).map_err(|e| not_writable(dir, e))?;
    Ok(FileRecord::of(bytes))
}

pub(super) fn write_tmp_tensors(
    dir: &Path,
    name: &str,
    tensors: &[(String, Tensor)],
) -> Result<FileRecord> {
    let tmp = dir.join(tmp_name(name));
    let file = File::create(&tmp).map_err(|e| not_writable(dir, e))?;
    let file = write_safetensors(file, &tmp, tensors)?;
    file.sync_all().map_err(|e| not_writable(dir, e))?;
    // Checksum what is actually in the file, read back through a map.
    let written = SafetensorsFile::open(&tmp)?;
    Ok(FileRecord::of(written.bytes()))
}

pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub(super) fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to)
        .map_err(|e| Error::io(to.display(), format!("cannot rename {} here: {e}", from.display())))
}

pub(super) fn not_writable(dir: &Path, e: std::io::Error) -> Error {
    Error::io(dir.display(), format!("cannot write a checkpoint into this directory: {e}"))
}

pub(super) fn to_pretty_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::invalid(format!("checkpoint: cannot serialise JSON: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A fast 64-bit checksum: for each little-endian 8-byte word w, h ← (rotl(h, 5) ⊕ w)·K with K
/// odd (the FxHash step), then the length. Multiplying by an odd K and xoring a fixed word are
/// both bijections of h, so a change in one word can never cancel out later. About one
/// multiply per 8 bytes: hashing a 6 GB checkpoint costs a fraction of reading it.
fn content_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    let mut h = 0u64;
    for w in &mut words {
        h = step(h, u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = step(h, u64::from_le_bytes(tail));
    step(h, bytes.len() as u64)
}

// ---------------------------------------------------------------------------------------------
// Crash injection for the tests: a save can be told to stop dead at one of these points, as if
// the process had been killed there. In normal builds `crash_point` is a no-op.

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
pub(super) fn crash_point(stage: Stage) -> Result<()> {
    if CRASH_AT.with(|c| c.get()) == Some(stage) {
        CRASH_AT.with(|c| c.set(None));
        return Err(Error::invalid(format!("simulated crash at {stage:?}")));
    }
    Ok(())
}

#[cfg(not(test))]
#[inline(always)]
pub(super) fn crash_point(_stage: Stage) -> Result<()> {
    Ok(())
}
