//! One writer per run directory, and only in directories the tool made its own.
//!
//! Every command that writes into a run directory (`train`, `init`, `grow --out`, and
//! `save_checkpoint` for any caller) first takes an advisory lock on `run.lock` in it: an
//! exclusive `flock`, which the kernel releases when the process exits however it exits, so a
//! killed run never leaves a directory locked. The file holds the holder's pid, so a second
//! writer is told who has the directory. Commands that only read (`info`, `eval`, `generate`,
//! the source of `grow`) take no lock and never write: they read the last committed checkpoint
//! while a run keeps saving (see `checkpoint`).
//!
//! Within one process the lock is reentrant: `train` holds it for the whole run, and the saves
//! it makes find it held. Holding the lock also makes the process the one that may tidy up:
//! when it first takes the lock it finishes a save a killed process committed but did not
//! complete, and removes the temporary files such processes left behind.
//!
//! The directory a user names may hold files of their own, some named like ours
//! (`notes.tmp-2024-1`, a `metrics.jsonl` of another tool). So the tool removes a file only
//! where it can prove the file is its own: in a directory it marked as a run directory when it
//! made it, by writing `tokenformer-run` into it before anything else. A directory that is
//! neither marked, nor empty, nor a checkpoint (runs made before the marker existed) is refused
//! before anything is written into it; and the lock file itself is only ever created afresh or
//! reused when it is a regular file holding a pid and no other name (a hard link to a file
//! elsewhere would otherwise have that file overwritten).

use crate::checkpoint::{finish_interrupted_save, is_checkpoint_dir};
use crate::files::{entry_exists, is_temp_name, remove_stray_temps};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

#[cfg(unix)]
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use tokenformer_core::{Error, Result};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = "run.lock";

/// The file that marks a directory as one the tool made for a run (or a model): written first,
/// into a directory that was new or empty, so every other file of ours there came after it.
pub const MARKER_FILE: &str = "tokenformer-run";

const MARKER_TEXT: &str = "This directory was made by tokenformer for a run or a model. Files in \
                           it named like tokenformer's temporary files are its own, and it may \
                           remove them.\n";

/// Whether `dir` carries the marker of a directory the tool made (a regular file, not a link).
pub fn is_marked(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join(MARKER_FILE)).is_ok_and(|m| m.is_file())
}

/// Whether `dir` exists and has no entries at all.
fn is_empty_dir(dir: &Path) -> Result<bool> {
    let mut entries = fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))?;
    Ok(entries.next().is_none())
}

/// Refuses, in one line, a directory the tool may not write into: one that exists, is not
/// empty, and is neither marked as the tool's nor holds a checkpoint. A directory that does not
/// exist yet is fine (it will be made, and marked). Call it before anything is written.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir.display(), e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(Error::io(dir.display(), "is a file, where a directory is expected"))
        }
        Ok(_) => {}
    }
    if is_marked(dir) || is_checkpoint_dir(dir) || is_empty_dir(dir)? {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} is not empty and is not a tokenformer run directory (no checkpoint, no \
         {MARKER_FILE} file); refusing to write into it: choose a new or empty directory",
        dir.display()
    )))
}

/// Marks `dir` (new or empty) as the tool's. The marker is created exclusively, never through
/// a link; one that is already there (another process marked it a moment ago) is fine.
fn mark(dir: &Path) -> Result<()> {
    let path = dir.join(MARKER_FILE);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW).mode(0o644);
    match options.open(&path) {
        Ok(mut file) => file
            .write_all(MARKER_TEXT.as_bytes())
            .map_err(|e| Error::io(path.display(), format!("cannot write: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && is_marked(dir) => Ok(()),
        Err(e) => Err(Error::io(dir.display(), format!("cannot write into this directory: {e}"))),
    }
}

/// The locks this process holds: canonical directory → (lock file, holders).
fn held() -> &'static Mutex<HashMap<PathBuf, (File, usize)>> {
    static HELD: OnceLock<Mutex<HashMap<PathBuf, (File, usize)>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// This process's hold on a run directory; the lock is released when the last `RunLock` of the
/// directory is dropped (or the process ends).
pub struct RunLock {
    key: PathBuf,
    dir: PathBuf,
}

impl RunLock {
    /// Locks `dir` (which must exist) for writing, or fails with one line naming the process
    /// that holds it. An empty `dir` is marked as the tool's first; a directory that is not
    /// empty, not marked and holds no checkpoint is refused (`check_writable_dir`).
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let key = dir
            .canonicalize()
            .map_err(|e| Error::io(dir.display(), format!("cannot use as a run directory: {e}")))?;
        let mut held = held().lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, holders)) = held.get_mut(&key) {
            *holders += 1;
            return Ok(RunLock { key, dir: dir.to_path_buf() });
        }
        check_writable_dir(dir)?;
        // A directory that is new (or empty) becomes the tool's before anything is written.
        if is_empty_dir(dir)? {
            mark(dir)?;
        }
        let path = dir.join(LOCK_FILE);
        let mut file = open_lock_file(dir, &path)?;
        match try_lock_patiently(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = match lock_holder(&file) {
                    Some(pid) => format!("another process (pid {pid})"),
                    None => "another process".to_string(),
                };
                return Err(Error::invalid(format!(
                    "{} is in use by {holder}, which is writing to it; wait for it to finish or \
                     stop it (one writer per run directory)",
                    dir.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io(path.display(), format!("cannot lock: {e}")))
            }
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(path.display(), format!("cannot write: {e}")))?;
        held.insert(key.clone(), (file, 1));
        drop(held);
        let lock = RunLock { key, dir: dir.to_path_buf() };
        // The first hold of this process: whatever temporary files are here belong to
        // processes that died, and a save one of them committed is finished now.
        lock.tidy()?;
        Ok(lock)
    }

    /// Creates `dir` if needed and locks it.
    pub fn create_and_acquire(dir: &Path) -> Result<RunLock> {
        check_writable_dir(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(dir.display(), format!("cannot create the directory: {e}")))?;
        RunLock::acquire(dir)
    }

    /// Whether this process holds the lock of `dir`.
    pub fn is_held(dir: &Path) -> bool {
        let Ok(key) = dir.canonicalize() else { return false };
        held().lock().unwrap_or_else(|e| e.into_inner()).contains_key(&key)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finishes a save a killed process committed, and removes the temporary files killed
    /// processes left behind. Returns the names removed.
    fn tidy(&self) -> Result<Vec<String>> {
        finish_interrupted_save(&self.dir)?;
        // Only where the marker proves that names like ours are ours.
        if !is_marked(&self.dir) {
            return Ok(Vec::new());
        }
        remove_stray_temps(&self.dir, &[])
    }
}

/// Opens the lock file of `dir` for writing: created afresh (exclusively, never through a link),
/// or reused when it is one of ours, a regular file with no other name holding a pid (or
/// nothing, if its creator died at once). Anything else there is refused, never written.
fn open_lock_file(dir: &Path, path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create_new(true);
    // Non-blocking so that a FIFO in its place cannot hang the open.
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).mode(0o644);
    match options.open(path) {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(dir.display(), format!("cannot write into this directory: {e}")))
        }
    }
    let refuse = |what: &str| {
        Err(Error::io(
            path.display(),
            format!("{what}; refusing to use it as the lock (remove it if it is not yours)"),
        ))
    };
    let kind = fs::symlink_metadata(path).map_err(|e| Error::io(path.display(), e))?.file_type();
    if kind.is_symlink() {
        return refuse("is a symbolic link");
    }
    if kind.is_dir() {
        return refuse("is a directory, where the lock file is expected");
    }
    options.create_new(false);
    let file = options.open(path).map_err(|e| Error::io(path.display(), e))?;
    let meta = file.metadata().map_err(|e| Error::io(path.display(), e))?;
    if !meta.is_file() {
        return refuse("is not a regular file");
    }
    #[cfg(unix)]
    if meta.nlink() > 1 {
        return refuse(&format!(
            "has {} names (hard links): writing the pid would change a file elsewhere",
            meta.nlink()
        ));
    }
    if meta.len() > 64 || (meta.len() > 0 && lock_holder(&file).is_none()) {
        return refuse("does not hold a process id, as a lock file of tokenformer does");
    }
    Ok(file)
}

/// The pid a lock file names, if it names one.
fn lock_holder(file: &File) -> Option<u32> {
    let mut text = String::new();
    let mut reader = file;
    reader.rewind().ok()?;
    reader.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// `try_lock`, waiting up to a second while the holder is this very process. That happens only
/// for an instant: a lock this process just released is still held by a copy of its file
/// descriptor in a child being spawned by another thread, between its fork and its exec (which
/// closes the copy). Any other holder is reported at once.
fn try_lock_patiently(file: &File) -> std::result::Result<(), TryLockError> {
    for _ in 0..100 {
        match file.try_lock() {
            Err(TryLockError::WouldBlock) if lock_holder(file) == Some(std::process::id()) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
    file.try_lock()
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let mut held = held().lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, holders)) = held.get_mut(&self.key) {
            *holders -= 1;
            if *holders == 0 {
                // Closing the file releases the flock.
                held.remove(&self.key);
            }
        }
    }
}

/// Removes a directory this process made and marked a moment ago, before anything but the
/// marker, the lock, token caches and temporary files went into it (a run whose data turned
/// out unusable). Only those names are removed, and the directory only if that empties it.
pub fn remove_unused_dir(lock: RunLock) {
    let dir = lock.dir().to_path_buf();
    if !is_marked(&dir) {
        return;
    }
    let ours = |name: &str| {
        name == MARKER_FILE || name == LOCK_FILE || name.ends_with(".tokens") || is_temp_name(name)
    };
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && entry.file_name().to_str().is_some_and(ours) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    drop(lock);
    let _ = fs::remove_dir(&dir);
}

/// The files a run leaves besides its checkpoint.
pub const RUN_FILES: [&str; 2] = ["metrics.jsonl", "loss.png"];

/// Clears a run directory that holds no checkpoint — a run or grow killed before its first
/// save — so a new run can start in it (`--overwrite`). A directory with a checkpoint is
/// refused: a checkpoint is never deleted; so is one the tool did not mark as its own (the
/// files there may be anyone's). The token caches stay (they are checked on use).
pub fn clear_unfinished(lock: &RunLock) -> Result<()> {
    let dir = lock.dir();
    if !is_marked(dir) && !is_checkpoint_dir(dir) {
        return Err(Error::invalid(format!(
            "{} is not a tokenformer run directory (no {MARKER_FILE} file); --overwrite only \
             clears a run the tool started there, and never deletes anything else",
            dir.display()
        )));
    }
    if is_checkpoint_dir(dir) {
        return Err(Error::invalid(format!(
            "{} holds a checkpoint; --overwrite only starts again in a run that stopped before \
             its first checkpoint, and never deletes one (remove the directory yourself, or \
             choose another --out)",
            dir.display()
        )));
    }
    for name in RUN_FILES {
        let path = dir.join(name);
        if entry_exists(&path) {
            std::fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_reentrant_in_a_process_and_exclusive_across_open_files() {
        let dir = std::env::temp_dir().join(format!("tf-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = RunLock::create_and_acquire(&dir).unwrap();
        let b = RunLock::acquire(&dir).unwrap();
        assert!(RunLock::is_held(&dir));
        let pid: u32 =
            std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap().trim().parse().unwrap();
        assert_eq!(pid, std::process::id());
        // Another open file description of the lock (as another process would have) cannot
        // take it while it is held...
        let other = File::open(dir.join(LOCK_FILE)).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(a);
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(b);
        // ...and can once the last holder is gone.
        assert!(!RunLock::is_held(&dir));
        other.try_lock().unwrap();
        let e = RunLock::acquire(&dir).err().unwrap().to_string();
        assert!(e.contains("is in use by another process (pid") && !e.contains('\n'), "{e}");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_held_for_an_instant_by_a_copy_in_this_process_is_waited_for() {
        // The copy stands for the duplicate of the lock's descriptor that a child being spawned
        // by another thread holds between its fork and its exec; it names this process.
        let dir = std::env::temp_dir().join(format!("tf-lock-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        drop(RunLock::create_and_acquire(&dir).unwrap());
        let copy = File::open(dir.join(LOCK_FILE)).unwrap();
        copy.try_lock().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(copy);
        });
        let lock = RunLock::acquire(&dir).unwrap();
        release.join().unwrap();
        drop(lock);
        // Another process's hold is reported at once, naming it.
        std::fs::write(dir.join(LOCK_FILE), "1\n").unwrap();
        let other = File::open(dir.join(LOCK_FILE)).unwrap();
        other.try_lock().unwrap();
        let started = std::time::Instant::now();
        let e = RunLock::acquire(&dir).err().unwrap().to_string();
        assert!(e.contains("another process (pid 1)"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
