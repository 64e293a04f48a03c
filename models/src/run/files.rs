//! Careful file access for run directories.
//!
//! A run directory is input the user may have been handed by someone else, so every file in it
//! is treated as untrusted:
//!
//! - Reads open the file without blocking (a FIFO planted in place of a checkpoint file would
//!   otherwise hang the open) and then insist, on the open file itself, that it is a regular
//!   file of a plausible size: `/dev/zero` or a FIFO is refused, and a file larger than its
//!   limit is refused before any of it is read.
//! - Writes never go through a name that already exists. A new file is created under a fresh,
//!   unique temporary name (`<name>.tmp-<pid>-<n>`) with `O_CREAT | O_EXCL | O_NOFOLLOW`, so a
//!   symbolic link planted at any name cannot redirect the write, and then renamed into place;
//!   a rename replaces a link at the destination instead of following it.
//! - Temporary names have one shape, so the files a killed process left behind can be found
//!   and removed by the next process that holds the directory's lock — only in a directory the
//!   tool marked as its own (`run_dir`): elsewhere a name of that shape may be the user's.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use tokenformer_core::{Error, Result};

/// Opens `path` for reading and returns it with its length, after checking on the open file
/// that it is a regular file (not a directory, FIFO, socket or device).
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    open_regular_if_exists(path)?.ok_or_else(|| Error::io(path.display(), "no such file"))
}

/// `open_regular`, with `None` for a file that does not exist (or stopped existing a moment
/// ago: a reader racing a writer's rename sees this).
pub fn open_regular_if_exists(path: &Path) -> Result<Option<(File, u64)>> {
    let mut options = OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading blocks until someone writes to it; non-blocking, the open
    // returns at once and the check below refuses it. Regular files ignore the flag.
    #[cfg(unix)]
    options.custom_flags(libc::O_NONBLOCK);
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path.display(), e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(path.display(), e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok(Some((file, meta.len())))
}

fn not_regular(path: &Path, kind: &fs::FileType) -> Error {
    let what = if kind.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            if kind.is_fifo() {
                "a FIFO (named pipe)"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
        #[cfg(not(unix))]
        "not a regular file"
    };
    Error::io(path.display(), format!("is {what}, where a regular file is expected"))
}

/// Reads the whole regular file `path`, which may hold at most `limit` bytes (`what` names it
/// in the message, e.g. "a checkpoint manifest").
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    read_regular_if_exists(path, limit, what)?
        .ok_or_else(|| Error::io(path.display(), "no such file"))
}

/// `read_regular`, with `None` for a file that does not exist.
pub fn read_regular_if_exists(path: &Path, limit: u64, what: &str) -> Result<Option<Vec<u8>>> {
    let Some((file, len)) = open_regular_if_exists(path)? else { return Ok(None) };
    if len > limit {
        return Err(Error::format(
            path.display(),
            format!("is {}, more than {} for {what}", bytes_text(len), bytes_text(limit)),
        ));
    }
    read_open(file, path, len, limit, what).map(Some)
}

/// Reads an open regular file of `len` bytes (as `open_regular` reported it), stopping past
/// `limit` in case the file grows while it is read.
pub fn read_open(file: File, path: &Path, len: u64, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len as usize)
        .map_err(|_| Error::io(path.display(), format!("cannot allocate {}", bytes_text(len))))?;
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path.display(), e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::format(
            path.display(),
            format!("grew past {} while being read, for {what}", bytes_text(limit)),
        ));
    }
    Ok(bytes)
}

/// Whether `path` exists as a directory entry of any kind (a dangling link counts).
pub fn entry_exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// A byte count for people: `512 bytes`, `3.4 MiB`, `1.5 TiB`.
pub fn bytes_text(bytes: impl Into<u128>) -> String {
    let bytes = bytes.into();
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

// ---------------------------------------------------------------------------------------------
// New files: exclusive, uniquely named, renamed into place.

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file created exclusively under a temporary name next to its final `name`. Dropped without
/// `keep` or `rename_to_final`, it removes itself, so an error halfway leaves nothing behind.
pub struct TempFile {
    file: Option<File>,
    path: PathBuf,
    dir: PathBuf,
    name: String,
    keep: bool,
}

impl TempFile {
    /// Creates `dir/<name>.tmp-<pid>-<n>`, a name no other process and no earlier call uses.
    /// A name that exists already (a planted file or link) is skipped, never opened.
    pub fn create(dir: &Path, name: &str) -> Result<TempFile> {
        let mut last_err = None;
        for _ in 0..64 {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let temp_name = format!("{name}.tmp-{}-{n}", std::process::id());
            let path = dir.join(&temp_name);
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            options.custom_flags(libc::O_NOFOLLOW).mode(0o644);
            match options.open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        file: Some(file),
                        path,
                        dir: dir.to_path_buf(),
                        name: name.to_string(),
                        keep: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(Error::io(dir.display(), format!("cannot create a file here: {e}")))
                }
            }
        }
        Err(Error::io(
            dir.display(),
            format!("cannot create a temporary file for {name}: {}", last_err.expect("tried")),
        ))
    }

    /// Creates a temporary file holding `bytes`, synced to disk.
    pub fn with_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<TempFile> {
        let mut temp = TempFile::create(dir, name)?;
        let path = temp.path.clone();
        let io_err = |e: std::io::Error| Error::io(path.display(), format!("cannot write: {e}"));
        temp.file().write_all(bytes).map_err(io_err)?;
        temp.file().sync_all().map_err(io_err)?;
        Ok(temp)
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is open until the TempFile is consumed")
    }

    /// Takes the open file out (to hand it to a writer); the TempFile still owns the name.
    pub fn take_file(&mut self) -> File {
        self.file.take().expect("the file is taken once")
    }

    pub fn put_file(&mut self, file: File) {
        self.file = Some(file);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary name, within the directory.
    pub fn temp_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Leaves the file on disk under its temporary name (it is now referenced elsewhere).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Renames the file over its final name in the same directory (replacing whatever entry is
    /// there, a link included, without following it). Not synced: call `sync_dir` after.
    pub fn rename_to_final(mut self) -> Result<()> {
        let target = self.dir.join(&self.name);
        fs::rename(&self.path, &target).map_err(|e| {
            Error::io(target.display(), format!("cannot rename {} here: {e}", self.path.display()))
        })?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename: readers see the old or
/// the new file, never part of one, and a link at `dir/name` is replaced, not followed.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    TempFile::with_bytes(dir, name, bytes)?.rename_to_final()?;
    tokenformer_core::safetensors_io::sync_dir(dir)
}

/// Copies the regular file `from` to `dir/name` the same way (used to carry a run's history to
/// a new directory).
pub fn copy_into(from: &Path, dir: &Path, name: &str) -> Result<()> {
    let (mut source, _) = open_regular(from)?;
    let mut temp = TempFile::create(dir, name)?;
    let path = temp.path().to_path_buf();
    std::io::copy(&mut source, temp.file())
        .and_then(|_| temp.file().sync_all())
        .map_err(|e| Error::io(path.display(), format!("cannot write: {e}")))?;
    temp.rename_to_final()
}

/// Whether `name` is a temporary file of ours: `<name>.tmp-<pid>-<n>`, or one of the names
/// earlier versions used (`<name>.tmp`, `.<name>.tmp-<pid>`, `checkpoint.json.partial`,
/// `metrics.jsonl.tmp`, `loss.tmp<pid>.png`, `<cache>.tmp<pid>`).
pub fn is_temp_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((stem, rest)) = name.rsplit_once(".tmp-") {
        if let Some((pid, n)) = rest.split_once('-') {
            if !stem.is_empty() && digits(pid) && digits(n) {
                return true;
            }
        }
        // `.model.safetensors.tmp-<pid>`: the safetensors writer's own temporary name.
        if stem.starts_with('.') && digits(rest) {
            return true;
        }
    }
    const OLD_CHECKPOINT_TEMPS: [&str; 7] = [
        "config.json.tmp",
        "model.safetensors.tmp",
        "optimizer.safetensors.tmp",
        "train_state.json.tmp",
        "checkpoint.json.partial",
        "metrics.jsonl.tmp",
        "checkpoint.json.pending.tmp",
    ];
    if OLD_CHECKPOINT_TEMPS.contains(&name) {
        return true;
    }
    if let Some(pid) = name.strip_prefix("loss.tmp").and_then(|r| r.strip_suffix(".png")) {
        return digits(pid);
    }
    // Token caches: `<tokenizer>-<16 hex digits>.tmp<pid>`.
    if let Some((stem, pid)) = name.rsplit_once(".tmp") {
        if let Some((_, hash)) = stem.rsplit_once('-') {
            return digits(pid) && hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        }
    }
    false
}

/// Removes every temporary file of ours from `dir` except those named in `keep`. Only the
/// process holding the directory's lock may call this, and only in a directory the tool marked
/// as its own: any other process's temporaries are then leftovers of one that died. Directories are never removed, and a link is removed
/// itself, never its target.
pub fn remove_stray_temps(dir: &Path, keep: &[String]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir.display(), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if !is_temp_name(&name) || keep.contains(&name) {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(entry.path().display(), e))?;
        if kind.is_dir() {
            continue;
        }
        fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path().display(), e))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

// ---------------------------------------------------------------------------------------------
// Checksums.

/// A fast 64-bit checksum: for each little-endian 8-byte word w, h ← (rotl(h, 5) ⊕ w)·K with K
/// odd (the FxHash step), then the zero-padded tail and the length. Multiplying by an odd K and
/// xoring a fixed word are both bijections of h, so a change in one word can never cancel out
/// later. About one multiply per 8 bytes: hashing a 6 GB checkpoint costs a fraction of reading
/// it. It tells two saves apart; it does not resist tampering.
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = Hasher::default();
    h.update(bytes);
    h.finish()
}

/// `content_hash` computed piece by piece, for data that is written or read in chunks.
#[derive(Clone, Default)]
pub struct Hasher {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
    total: u64,
}

const HASH_K: u64 = 0x517c_c1b7_2722_0a95;

fn hash_step(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(HASH_K)
}

impl Hasher {
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 8 {
                return;
            }
            self.state = hash_step(self.state, u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let word = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            self.state = hash_step(self.state, word);
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    pub fn finish(&self) -> u64 {
        let mut tail = [0u8; 8];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        let h = hash_step(self.state, u64::from_le_bytes(tail));
        hash_step(h, self.total)
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// A writer that hashes what passes through it, so a file's checksum is known the moment it is
/// written, without reading it back.
pub struct HashingWriter<W: Write> {
    pub inner: W,
    pub hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The checksum and length of an open file, read in chunks.
pub fn hash_file(file: &mut File, path: &Path) -> Result<Hasher> {
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path.display(), e))?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time definition, written out plainly.
    fn reference_hash(bytes: &[u8]) -> u64 {
        let mut words = bytes.chunks_exact(8);
        let mut h = 0u64;
        for w in &mut words {
            h = hash_step(h, u64::from_le_bytes(w.try_into().unwrap()));
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        h = hash_step(h, u64::from_le_bytes(tail));
        hash_step(h, bytes.len() as u64)
    }

    #[test]
    fn the_streaming_hash_equals_the_one_shot_hash_for_any_split() {
        let data: Vec<u8> = (0..100u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 100] {
            let bytes = &data[..len];
            let want = reference_hash(bytes);
            assert_eq!(content_hash(bytes), want);
            for split in 0..=len {
                for split2 in split..=len {
                    let mut h = Hasher::default();
                    h.update(&bytes[..split]);
                    h.update(&bytes[split..split2]);
                    h.update(&bytes[split2..]);
                    assert_eq!(h.finish(), want, "len {len}, splits {split} {split2}");
                }
            }
        }
        // One changed word changes the hash.
        let mut other = data.clone();
        other[40] ^= 1;
        assert_ne!(content_hash(&data), content_hash(&other));
    }

    #[test]
    fn temporary_names_are_recognised_and_others_are_not() {
        for name in [
            "model.safetensors.tmp-123-0",
            "checkpoint.json.pending.tmp-9-17",
            "loss.png.tmp-4-2",
            "model.safetensors.tmp",
            ".model.safetensors.tmp-4242",
            "checkpoint.json.partial",
            "metrics.jsonl.tmp",
            "loss.tmp77.png",
            "byte-e7d40b4ec9e5d33c.tmp901",
        ] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in [
            "model.safetensors",
            "notes.tmp",
            "a.tmp-x-1",
            ".tmp-1-2",
            "byte-e7d40b4ec9e5d33c.tokens",
            "metrics.jsonl",
            "run.lock",
            "my-draft.tmp1",
        ] {
            assert!(!is_temp_name(name), "{name}");
        }
    }

    #[test]
    fn temporary_files_never_open_an_existing_name() {
        let dir = std::env::temp_dir().join(format!("tf-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let outside = dir.join("outside");
        fs::write(&outside, "precious").unwrap();
        // Plant links at the next few names this process would use.
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        for n in next..next + 4 {
            let name = format!("x.tmp-{}-{n}", std::process::id());
            std::os::unix::fs::symlink(&outside, dir.join(name)).unwrap();
        }
        replace_file(&dir, "x", b"new").unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        assert_eq!(fs::read(dir.join("x")).unwrap(), b"new");
        // A link at the final name is replaced, not followed.
        std::os::unix::fs::symlink(&outside, dir.join("y")).unwrap();
        replace_file(&dir, "y", b"mine").unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        assert!(fs::symlink_metadata(dir.join("y")).unwrap().is_file());
        // The planted links are strays; the files and the outside target stay.
        let removed = remove_stray_temps(&dir, &[]).unwrap();
        assert_eq!(removed.len(), 4);
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_refuse_what_is_not_a_regular_file_of_a_sane_size() {
        let dir = std::env::temp_dir().join(format!("tf-files-read-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let e = read_regular(Path::new("/dev/zero"), 1 << 20, "a test").unwrap_err().to_string();
        assert!(e.contains("is a device"), "{e}");
        let e = read_regular(&dir, 1 << 20, "a test").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_regular(&fifo, 1 << 20, "a test").unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let big = dir.join("big");
        File::create(&big).unwrap().set_len(1 << 40).unwrap();
        let e = read_regular(&big, 1 << 20, "a test").unwrap_err().to_string();
        assert!(e.contains("1.0 TiB, more than 1.0 MiB for a test"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
