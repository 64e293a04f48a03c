//! The token cache: a corpus is tokenised once, written to a binary file, and from then on
//! memory-mapped, so a run over a large corpus starts in milliseconds and the operating system,
//! not our process, decides which pages of the token stream sit in memory.
//!
//! File layout (all little-endian), a 64-byte header then the tokens:
//!
//! | bytes  | field                                                         |
//! |--------|---------------------------------------------------------------|
//! | 0..8   | magic `TFTOKENS`                                              |
//! | 8..12  | format version (u32, currently 2)                             |
//! | 12..16 | zero                                                          |
//! | 16..32 | tokenizer name, UTF-8, zero-padded                            |
//! | 32..40 | token count (u64)                                             |
//! | 40..48 | source hash (u64, see `source_hash`)                          |
//! | 48..56 | checksum of the token bytes (u64, `files::content_hash`)      |
//! | 56..64 | zero                                                          |
//! | 64..   | tokens, u32 each                                              |
//!
//! Tokens are always u32, even when the vocabulary would fit u16: one format for every
//! tokenizer, and a 10 M-token corpus is still only 40 MB. The header is 64 bytes so the tokens
//! start 4-byte aligned (a memory map starts on a page boundary), which lets us read them in
//! place as `&[u32]` instead of copying.
//!
//! The file name carries the tokenizer and the source hash, so a changed corpus gets a new file
//! and a stale one is never read. A file that is truncated, foreign or from another version is
//! detected by its header and size, and one whose tokens were changed in place by the checksum
//! of its body (checked on every open: a few milliseconds per ten million tokens); either is
//! rebuilt. The cache sits in the run directory, so it is read as untrusted input: only a
//! regular file is mapped, and a new one is written under an exclusive temporary name.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use tokenformer_core::{Error, Result};

use super::corpus::Document;
use super::tokenizer::Tokenizer;
use crate::files::{content_hash, open_regular, Hasher, TempFile};

// The tokens are read in place as native u32; on a big-endian machine they would be wrong.
#[cfg(not(target_endian = "little"))]
compile_error!("token cache files are little-endian u32 and are read in place");

const MAGIC: &[u8; 8] = b"TFTOKENS";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 64;

/// A memory-mapped token file: the whole token stream as a read-only `&[u32]`.
pub struct TokenFile {
    map: Mmap,
    len: usize,
    path: PathBuf,
    tokenizer: String,
    source_hash: u64,
}

/// What `load_or_build` did, for the run log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// A valid cache file was found and mapped.
    Reused,
    /// No cache file existed; the corpus was tokenised and written.
    Built,
    /// A cache file existed but was unusable (the reason says why); it was rewritten.
    Rebuilt(String),
}

impl TokenFile {
    /// Maps a token file and checks its header against the file size.
    pub fn open(path: &Path) -> Result<TokenFile> {
        let name = path.display();
        let (file, _) = open_regular(path)?;
        // SAFETY: the mapping is read-only, and cache files are only ever replaced by rename,
        // never written in place, so the bytes under the map do not change while we hold it.
        // (Another program truncating the file by hand could still fault us; that is the
        // accepted contract of every memory-mapped reader.)
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&name, e))?;
        let bad = |msg: &str| Err(Error::format(&name, format!("not a usable token file: {msg}")));
        if map.len() < HEADER_LEN || &map[0..8] != MAGIC {
            return bad("no TFTOKENS header");
        }
        let version = u32::from_le_bytes(field(&map, 8));
        if version != VERSION {
            return bad(&format!("format version {version}, expected {VERSION}"));
        }
        let tokenizer = String::from_utf8_lossy(&map[16..32]).trim_end_matches('\0').to_string();
        let count = u64::from_le_bytes(field(&map, 32));
        let source_hash = u64::from_le_bytes(field(&map, 40));
        let expected = (count as u128) * 4 + HEADER_LEN as u128;
        if map.len() as u128 != expected {
            return bad(&format!(
                "header promises {count} tokens ({expected} bytes) but the file has {} bytes",
                map.len()
            ));
        }
        if !(map.as_ptr() as usize + HEADER_LEN).is_multiple_of(std::mem::align_of::<u32>()) {
            return bad("token data is not 4-byte aligned in memory");
        }
        if content_hash(&map[HEADER_LEN..]) != u64::from_le_bytes(field(&map, 48)) {
            return bad(
                "the tokens do not match the checksum in its header (the file was modified)",
            );
        }
        Ok(TokenFile { map, len: count as usize, path: path.to_path_buf(), tokenizer, source_hash })
    }

    /// The whole token stream.
    pub fn tokens(&self) -> &[u32] {
        let bytes = &self.map[HEADER_LEN..HEADER_LEN + 4 * self.len];
        // SAFETY: `open` checked that these 4·len bytes exist and start 4-byte aligned; every
        // bit pattern is a valid u32, and the target is little-endian like the file.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u32>(), self.len) }
    }

    /// `len` tokens from `start`, or `None` if that runs past the end.
    pub fn slice(&self, start: usize, len: usize) -> Option<&[u32]> {
        self.tokens().get(start..start.checked_add(len)?)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokenizer_name(&self) -> &str {
        &self.tokenizer
    }

    pub fn source_hash(&self) -> u64 {
        self.source_hash
    }
}

fn field<const N: usize>(map: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&map[at..at + N]);
    out
}

/// A 64-bit FNV-1a hash of the documents' contents, each preceded by its length (so moving
/// bytes from one file to the next changes the hash). Contents, not names or mtimes: the same
/// text copied elsewhere reuses its cache, and an edit that keeps size and mtime is still seen.
/// Hashing is ~1 ns per byte, far below the cost of tokenising.
pub fn source_hash(docs: &[Document]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for doc in docs {
        eat(&(doc.bytes.len() as u64).to_le_bytes());
        eat(&doc.bytes);
    }
    h
}

/// Returns the token stream of `docs` under `tokenizer`, from `cache_dir` if a valid cache file
/// is there, else by tokenising (files in parallel) and writing one. Each document is encoded
/// on its own and the results concatenated, so no BPE merge spans two files.
pub fn load_or_build(
    cache_dir: &Path,
    tokenizer: Tokenizer,
    docs: &[Document],
) -> Result<(TokenFile, CacheStatus)> {
    if docs.is_empty() {
        return Err(Error::invalid("no documents to tokenise"));
    }
    let hash = source_hash(docs);
    let path = cache_dir.join(format!("{}-{hash:016x}.tokens", tokenizer.name()));
    // Every token covers at least one byte: a larger file is not this corpus's cache (and is
    // not worth reading whole to find that out).
    let total_bytes: u64 = docs.iter().map(|d| d.bytes.len() as u64).sum();
    let too_large =
        fs::metadata(&path).is_ok_and(|m| m.len() > HEADER_LEN as u64 + 4 * total_bytes);
    let status = if too_large {
        CacheStatus::Rebuilt("larger than the corpus could give".into())
    } else if crate::files::entry_exists(&path) {
        match TokenFile::open(&path) {
            Ok(f) if f.tokenizer_name() == tokenizer.name() && f.source_hash() == hash => {
                return Ok((f, CacheStatus::Reused));
            }
            Ok(_) => CacheStatus::Rebuilt("header names another tokenizer or corpus".into()),
            Err(e) => CacheStatus::Rebuilt(e.to_string()),
        }
    } else {
        CacheStatus::Built
    };

    let parts: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|d| {
            tokenizer.encode_bytes(&d.bytes).map_err(|e| Error::format(&d.name, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let tokens: Vec<u32> = parts.concat();
    if tokens.is_empty() {
        return Err(Error::invalid(format!("{}: the corpus gives no tokens", docs[0].name)));
    }
    write_atomic(&path, tokenizer.name(), hash, &tokens)?;
    Ok((TokenFile::open(&path)?, status))
}

/// Writes a token file under a temporary name and renames it into place, so a crash or a
/// concurrent reader never sees half a file.
pub fn write_atomic(path: &Path, tokenizer: &str, hash: u64, tokens: &[u32]) -> Result<()> {
    let name = tokenizer.as_bytes();
    if name.len() > 16 {
        return Err(Error::invalid(format!("tokenizer name {tokenizer:?} is over 16 bytes")));
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    }
    let (dir, file_name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            (if dir.as_os_str().is_empty() { Path::new(".") } else { dir }, name.to_string_lossy())
        }
        _ => return Err(Error::invalid(format!("{}: not a file path", path.display()))),
    };
    let mut checksum = Hasher::default();
    let mut bytes = Vec::with_capacity(4 * CHUNK);
    for chunk in tokens.chunks(CHUNK) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
        checksum.update(&bytes);
    }
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..16 + name.len()].copy_from_slice(name);
    header[32..40].copy_from_slice(&(tokens.len() as u64).to_le_bytes());
    header[40..48].copy_from_slice(&hash.to_le_bytes());
    header[48..56].copy_from_slice(&checksum.finish().to_le_bytes());

    let mut temp = TempFile::create(dir, &file_name)?;
    (|| -> std::io::Result<()> {
        let mut w = BufWriter::new(temp.file());
        w.write_all(&header)?;
        for chunk in tokens.chunks(CHUNK) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
            w.write_all(&bytes)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })()
    .map_err(|e| Error::io(path.display(), format!("cannot write: {e}")))?;
    temp.rename_to_final()
}

/// Tokens converted to bytes at a time when writing.
const CHUNK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tf-cache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn doc(text: &str) -> Document {
        Document { name: "mem".into(), bytes: text.as_bytes().to_vec() }
    }

    #[test]
    fn write_map_read_round_trip_and_reuse() {
        let dir = temp_dir("rt");
        let docs = [doc("First Citizen:\n"), doc("Before we proceed any further")];
        let (f, status) = load_or_build(&dir, Tokenizer::Gpt2, &docs).unwrap();
        assert_eq!(status, CacheStatus::Built);
        let mut expected = Tokenizer::Gpt2.encode("First Citizen:\n").unwrap();
        expected.extend(Tokenizer::Gpt2.encode("Before we proceed any further").unwrap());
        assert_eq!(f.tokens(), expected.as_slice());
        assert_eq!(f.len(), expected.len());
        assert_eq!(f.slice(1, 2), Some(&expected[1..3]));
        assert_eq!(f.slice(f.len(), 1), None);
        assert_eq!(f.tokenizer_name(), "gpt2");

        let (g, status) = load_or_build(&dir, Tokenizer::Gpt2, &docs).unwrap();
        assert_eq!(status, CacheStatus::Reused);
        assert_eq!(g.tokens(), f.tokens());
        // Another tokenizer on the same corpus gets its own file.
        let (b, status) = load_or_build(&dir, Tokenizer::Byte, &docs).unwrap();
        assert_eq!(status, CacheStatus::Built);
        assert_ne!(b.path(), f.path());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn changed_corpus_is_retokenised() {
        let dir = temp_dir("chg");
        let (a, _) = load_or_build(&dir, Tokenizer::Byte, &[doc("abc")]).unwrap();
        let (b, status) = load_or_build(&dir, Tokenizer::Byte, &[doc("abd")]).unwrap();
        assert_eq!(status, CacheStatus::Built);
        assert_eq!(b.tokens(), &[97, 98, 100]);
        assert_ne!(a.source_hash(), b.source_hash());
        // Same bytes split differently across files is a different corpus too.
        assert_ne!(source_hash(&[doc("ab"), doc("c")]), source_hash(&[doc("a"), doc("bc")]));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_or_foreign_file_is_detected_and_rebuilt() {
        let dir = temp_dir("trunc");
        let docs = [doc("hello, world")];
        let (f, _) = load_or_build(&dir, Tokenizer::Byte, &docs).unwrap();
        let path = f.path().to_path_buf();
        drop(f);
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 3]).unwrap();
        let err = TokenFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("header promises 12 tokens"), "{err}");
        let (f, status) = load_or_build(&dir, Tokenizer::Byte, &docs).unwrap();
        assert!(matches!(status, CacheStatus::Rebuilt(ref why) if why.contains("promises")));
        assert_eq!(f.tokens().len(), 12);

        // One token changed in place, header intact: the checksum of the body tells.
        drop(f);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN + 4] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = TokenFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("checksum") && err.contains("modified"), "{err}");
        let (f, status) = load_or_build(&dir, Tokenizer::Byte, &docs).unwrap();
        assert!(matches!(status, CacheStatus::Rebuilt(ref why) if why.contains("checksum")));
        assert_eq!(f.tokens(), Tokenizer::Byte.encode("hello, world").unwrap().as_slice());
        drop(f);

        fs::write(&path, b"PK\x03\x04 definitely a zip file, not tokens at all......").unwrap();
        let err = TokenFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("no TFTOKENS header"), "{err}");
        let (_, status) = load_or_build(&dir, Tokenizer::Byte, &docs).unwrap();
        assert!(matches!(status, CacheStatus::Rebuilt(_)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
