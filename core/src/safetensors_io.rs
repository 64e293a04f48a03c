//! Reading and writing f32 tensors in the safetensors format.
//!
//! A safetensors file is three parts, back to back:
//!
//! ```text
//!   [ n: u64, little-endian ][ n bytes of JSON header ][ raw tensor data ]
//!   header: { "name": { "dtype": "F32", "shape": [r, c], "data_offsets": [start, end] }, ... }
//! ```
//!
//! Offsets are relative to the start of the data section; the tensors tile it exactly, so a
//! file whose length disagrees with its header is truncated (or was appended to). Values are
//! little-endian and row-major, which is exactly our `Tensor` layout, so loading is a byte
//! copy plus `f32::from_le_bytes` (a no-op on x86 and ARM, correct everywhere).
//!
//! Reading maps the file with `memmap2` instead of reading it into memory: opening a 6 GB
//! checkpoint costs only the header parse, and each tensor is copied out of the page cache
//! when asked for. The `safetensors` crate validates the header (offsets, coverage, overflow);
//! this module turns its errors into messages that name the file and the tensor, and accepts
//! only F32 because the engine has no other dtype.
//!
//! `save_safetensors` writes to a temporary sibling file (created exclusively) that is flushed
//! to disk and then renamed over the target; `write_safetensors` writes to a file the caller
//! opened, for callers with a commit protocol of their own (checkpoints). The rename matters
//! beyond crash safety: a `SafetensorsFile` still mapping the old file keeps its (now unlinked)
//! inode, whereas truncating the file in place under a live map would make the next read of
//! that memory a SIGBUS.

use crate::{Error, Result, Storage, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The safetensors header length prefix, in bytes.
const HEADER_LEN_BYTES: usize = 8;

/// Writes `tensors` (f32, with their own dims, in the order given) to `path`.
///
/// Tensors on any device are copied to the host first. The file is written to a temporary
/// sibling, fsynced and renamed over `path`, so `path` holds either the old file or the
/// complete new one, never a prefix.
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let (tmp, file) = create_temp_sibling(path)?;
    let result = write_safetensors(file, &tmp, tensors)
        .and_then(|file| {
            file.sync_all().map_err(|e| Error::io(tmp.display(), format!("cannot write: {e}")))
        })
        .and_then(|()| {
            fs::rename(&tmp, path)
                .map_err(|e| Error::io(path.display(), format!("cannot write: {e}")))
        });
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent_dir(path)
}

/// Writes `tensors` (f32, with their own dims, in the order given) in the safetensors format
/// to `out`, a file the caller opened (and will sync and rename as its own protocol requires),
/// and hands it back flushed. `path` names the file in error messages.
pub fn write_safetensors<W: Write>(out: W, path: &Path, tensors: &[(String, Tensor)]) -> Result<W> {
    let header = header_bytes(path, tensors)?;
    let io_err = |e: std::io::Error| Error::io(path.display(), format!("cannot write: {e}"));
    let mut out = BufWriter::with_capacity(1 << 20, out);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_err)?;
    out.write_all(&header).map_err(io_err)?;
    let mut bytes = Vec::with_capacity(1 << 16);
    for (_, t) in tensors {
        // CPU tensors are borrowed, device tensors copied to the host one at a time, so the
        // peak extra memory is one tensor, not the whole model.
        let host;
        let values: &[f32] = match t.storage() {
            Storage::Cpu(v) => v,
            Storage::Cuda(_) => {
                host = t.to_vec()?;
                &host
            }
        };
        for chunk in values.chunks(1 << 14) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            out.write_all(&bytes).map_err(io_err)?;
        }
    }
    out.into_inner().map_err(|e| io_err(e.into_error()))
}

/// Reads every tensor of the file at `path`, in file order.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let file = SafetensorsFile::open(path)?;
    file.names()
        .into_iter()
        .map(|name| {
            let tensor = file.get(&name)?;
            Ok((name, tensor))
        })
        .collect()
}

/// A memory-mapped safetensors file whose header has been parsed and validated.
///
/// Tensors are copied out on `get`; the map itself stays read-only.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: Metadata,
    /// Where the data section starts: 8 + the header length.
    data_start: usize,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header. Fails with a message naming the file when it is
    /// missing, unreadable, truncated, or not a safetensors file at all.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(path.display(), e))?;
        SafetensorsFile::from_file(path, file)
    }

    /// Like `open`, for a file the caller has already opened (and checked, say, to be a regular
    /// file); `path` names it in messages.
    pub fn from_file(path: impl AsRef<Path>, file: File) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let len = file.metadata().map_err(|e| Error::io(path.display(), e))?.len();
        // Checked before mapping: mapping an empty file is an error on some platforms, and
        // "too short" is the clearer message anyway.
        if len < HEADER_LEN_BYTES as u64 {
            return Err(Error::format(
                path.display(),
                format!(
                    "not a safetensors file: only {len} bytes (the format starts with an 8-byte \
                     header length)"
                ),
            ));
        }
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped
        // would make reads fault; our own writers never truncate in place (they rename a new
        // file over the old one), which is the usual contract for memory-mapped model files.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path.display(), e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| describe(&path, &mmap, e))?;
        Ok(SafetensorsFile { path, mmap, metadata, data_start: HEADER_LEN_BYTES + header_len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file as bytes (for checksums).
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The dims of tensor `name`, as recorded in the header.
    pub fn dims(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.info(name)?.shape)
    }

    /// The dtype of tensor `name` as the format spells it ("F32", "F16", ...).
    pub fn dtype(&self, name: &str) -> Result<String> {
        Ok(self.info(name)?.dtype.to_string())
    }

    /// Copies tensor `name` into a CPU tensor. Only F32 is accepted.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        if info.dtype != Dtype::F32 {
            return Err(Error::format(
                self.path.display(),
                format!(
                    "tensor '{name}' has dtype {}, but only F32 is supported (convert the file \
                     to f32 first)",
                    info.dtype
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        // read_metadata has checked that the offsets tile the data section and that it ends
        // at the end of the file, so this slice is in bounds.
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        let data: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Tensor::from_vec(data, &info.shape)
            .map_err(|e| Error::format(self.path.display(), format!("tensor '{name}': {e}")))
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata.info(name).ok_or_else(|| {
            Error::format(self.path.display(), format!("tensor '{name}' is missing"))
        })
    }
}

/// Turns the crate's terse errors into a sentence about this file.
fn describe(path: &Path, bytes: &[u8], err: SafeTensorError) -> Error {
    let len = bytes.len();
    let declared = u64::from_le_bytes(bytes[..HEADER_LEN_BYTES].try_into().unwrap_or([0; 8]));
    let msg = match err {
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => format!(
            "not a safetensors file, or truncated: its first 8 bytes give a header length of \
             {declared} bytes but the file has {len}"
        ),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!(
                "not a safetensors file: its header is not a valid safetensors JSON header ({err})"
            )
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "truncated or corrupt: the header's tensor offsets do not end where the file ends \
             ({len} bytes)"
        ),
        other => format!("corrupt safetensors file: {other}"),
    };
    Error::format(path.display(), msg)
}

/// The JSON header, padded with spaces to a multiple of 8 bytes so the data section (and every
/// f32 in it, when the file is mapped at a page boundary) is aligned.
fn header_bytes(path: &Path, tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!(
                "{}: tensor name '{name}' is reserved or repeated",
                path.display()
            )));
        }
        let n = t.numel() * 4;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: t.dims().to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    // "format": "pt" is what Python loaders expect to find; it does not change the layout.
    let extra = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(extra), infos)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    let mut header = serde_json::to_vec(&metadata)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// Creates `dir/.name.tmp-<pid>-<n>`: hidden, in the same directory (so the rename cannot cross
/// file systems), distinct per process and per call, and created exclusively, so an existing
/// file or a link planted at that name is never opened (a write through it could land
/// anywhere).
fn create_temp_sibling(path: &Path) -> Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1 << 20 => continue,
            Err(e) => return Err(Error::io(tmp.display(), format!("cannot write: {e}"))),
        }
    }
}

/// Makes a rename inside the parent directory durable (the new directory entry is data of
/// the directory, not of the file).
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// fsyncs a directory, so renames and creations inside it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io(dir.display(), e))?;
        d.sync_all()
            .map_err(|e| Error::io(dir.display(), format!("cannot sync directory: {e}")))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("tf-safetensors-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            (
                "b".into(),
                Tensor::from_vec(vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e38], &[2, 2]).unwrap(),
            ),
            ("a.weight".into(), Tensor::from_vec(vec![0.1, 0.2, 0.3], &[3]).unwrap()),
            ("s".into(), Tensor::scalar(-7.25)),
            ("empty".into(), Tensor::from_vec(vec![], &[0, 4]).unwrap()),
        ]
    }

    #[test]
    fn round_trip_is_bit_identical_and_keeps_order() {
        let dir = TempDir::new("rt");
        let path = dir.0.join("x.safetensors");
        let tensors = sample();
        save_safetensors(&path, &tensors).unwrap();
        let back = load_safetensors(&path).unwrap();
        assert_eq!(back.len(), tensors.len());
        for ((n0, t0), (n1, t1)) in tensors.iter().zip(&back) {
            assert_eq!(n0, n1);
            assert_eq!(t0.dims(), t1.dims());
            let bits =
                |t: &Tensor| t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(t0), bits(t1));
        }
        // The crate itself reads what we wrote, and no temporary file is left behind.
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().dtype(), Dtype::F32);
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn errors_name_the_file_and_the_tensor() {
        let dir = TempDir::new("err");
        let path = dir.0.join("x.safetensors");
        save_safetensors(&path, &sample()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let e = f.get("nope").unwrap_err().to_string();
        assert!(
            e.contains("x.safetensors") && e.contains("'nope'") && e.contains("missing"),
            "{e}"
        );

        // A half-precision tensor written by the crate directly.
        let half = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![2], &half).unwrap();
        let f16_path = dir.0.join("h.safetensors");
        fs::write(&f16_path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
        let e = SafetensorsFile::open(&f16_path).unwrap().get("w").unwrap_err().to_string();
        assert!(e.contains("h.safetensors") && e.contains("'w'") && e.contains("F16"), "{e}");

        // Truncated: drop the last byte of the data section.
        let bytes = fs::read(&path).unwrap();
        let cut = dir.0.join("cut.safetensors");
        fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
        let e = SafetensorsFile::open(&cut).err().unwrap().to_string();
        assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
        // Truncated inside the header.
        fs::write(&cut, &bytes[..20]).unwrap();
        let e = SafetensorsFile::open(&cut).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");

        // Foreign files: a JSON document, random bytes, an empty file, a header that is JSON
        // but not a safetensors header.
        let foreign = dir.0.join("foreign.safetensors");
        for content in [
            b"{\n  \"vocab_size\": 256\n}\n".to_vec(),
            (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            Vec::new(),
            [&4u64.to_le_bytes()[..], b"[1] "].concat(),
        ] {
            fs::write(&foreign, &content).unwrap();
            let e = SafetensorsFile::open(&foreign).err().unwrap().to_string();
            assert!(
                e.contains("foreign.safetensors") && e.contains("not a safetensors file"),
                "{e}"
            );
        }

        let e = SafetensorsFile::open(dir.0.join("absent.safetensors")).err().unwrap().to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn repeated_names_are_refused_before_writing() {
        let dir = TempDir::new("dup");
        let path = dir.0.join("x.safetensors");
        let t = Tensor::scalar(1.0);
        let e = save_safetensors(&path, &[("a".into(), t.clone()), ("a".into(), t)]).unwrap_err();
        assert!(e.to_string().contains("'a'"), "{e}");
        assert!(!path.exists());
    }
}
