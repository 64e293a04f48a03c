//! A bounded reader of the zip archives `torch.save` writes.
//!
//! `torch.save` stores every entry uncompressed (`archive/data.pkl`, the pickle, and
//! `archive/data/<key>`, the raw bytes of each storage), so an entry is simply a byte range of
//! the file. Only that is accepted: a compressed or encrypted entry is refused, which also rules
//! out zip bombs (nothing is ever inflated). Every size the archive declares is checked against
//! the file before it is used: a truncated file, an entry claiming more bytes than the file
//! holds, overlapping records and duplicate names are each refused in one line. Large archives
//! (a 1.5B-parameter model in f32 is 6 GB) use the zip64 records, which are read too.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use tokenformer_core::{Error, Result};

const END_OF_CENTRAL_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_END_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_END_OF_CENTRAL_DIRECTORY: u32 = 0x0606_4b50;
const CENTRAL_DIRECTORY_ENTRY: u32 = 0x0201_4b50;
const LOCAL_HEADER: u32 = 0x0403_4b50;
/// The end record is 22 bytes, followed by a comment of at most 65535.
const END_RECORD_LEN: usize = 22;
const MAX_COMMENT: usize = 0xffff;
/// A state_dict of the largest released model has a few hundred entries; an archive claiming
/// more than this is not one.
const MAX_ENTRIES: u64 = 1 << 20;
const STORED: u16 = 0;

/// The entries of an archive: each name with the byte range of its contents in the file.
pub struct ZipEntries {
    entries: HashMap<String, Range<usize>>,
    /// Names in the order of the central directory (for messages and for finding the prefix).
    names: Vec<String>,
}

impl ZipEntries {
    pub fn get(&self, name: &str) -> Option<Range<usize>> {
        self.entries.get(name).cloned()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Little-endian reads that fail, naming the file, instead of reading past the end.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
}

impl Cursor<'_> {
    fn slice(&self, at: u64, len: u64, what: &str) -> Result<&[u8]> {
        let end = at.checked_add(len).filter(|&end| end <= self.bytes.len() as u64);
        match end {
            Some(end) => Ok(&self.bytes[at as usize..end as usize]),
            None => Err(truncated(self.path, what, at, len, self.bytes.len())),
        }
    }
    fn u16(&self, at: u64, what: &str) -> Result<u16> {
        let b = self.slice(at, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: u64, what: &str) -> Result<u32> {
        let b = self.slice(at, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: u64, what: &str) -> Result<u64> {
        let b = self.slice(at, 8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

fn truncated(path: &Path, what: &str, at: u64, len: u64, file_len: usize) -> Error {
    Error::format(
        path.display(),
        format!(
            "truncated or damaged zip archive: the {what} ({len} bytes at offset {at}) runs past \
             the end of the file ({file_len} bytes)"
        ),
    )
}

/// Reads the central directory of the archive `bytes` (the whole file), checking every entry.
pub fn read_entries(path: &Path, bytes: &[u8]) -> Result<ZipEntries> {
    let bad = |msg: String| Error::format(path.display(), msg);
    let at = Cursor { path, bytes };
    let end = find_end_record(path, bytes)?;
    let mut count = u64::from(at.u16(end as u64 + 10, "end record")?);
    let mut dir_len = u64::from(at.u32(end as u64 + 12, "end record")?);
    let mut dir_start = u64::from(at.u32(end as u64 + 16, "end record")?);
    // Everything before the end records: where the central directory and the data must lie.
    let mut limit = end as u64;
    if count == 0xffff || dir_len == 0xffff_ffff || dir_start == 0xffff_ffff {
        let locator = (end as u64)
            .checked_sub(20)
            .ok_or_else(|| bad("damaged zip64 archive: no room for its locator".into()))?;
        if at.u32(locator, "zip64 locator")? != ZIP64_END_LOCATOR {
            return Err(bad("damaged zip archive: sizes need zip64, but it has no locator".into()));
        }
        let record = at.u64(locator + 8, "zip64 locator")?;
        if record >= locator
            || at.u32(record, "zip64 end record")? != ZIP64_END_OF_CENTRAL_DIRECTORY
        {
            return Err(bad(format!(
                "damaged zip64 archive: no zip64 end record at offset {record}"
            )));
        }
        count = at.u64(record + 32, "zip64 end record")?;
        dir_len = at.u64(record + 40, "zip64 end record")?;
        dir_start = at.u64(record + 48, "zip64 end record")?;
        limit = record;
    }
    if count > MAX_ENTRIES {
        return Err(bad(format!(
            "the zip archive declares {count} entries; a saved state_dict has at most {MAX_ENTRIES}"
        )));
    }
    match dir_start.checked_add(dir_len) {
        Some(dir_end) if dir_end <= limit => {}
        _ => {
            return Err(bad(format!(
                "truncated or damaged zip archive: its central directory ({dir_len} bytes at \
                 offset {dir_start}) does not fit before its end record (offset {limit})"
            )))
        }
    }

    let mut entries = HashMap::new();
    let mut names = Vec::new();
    let mut pos = dir_start;
    for _ in 0..count {
        if pos >= dir_start + dir_len
            || at.u32(pos, "central directory")? != CENTRAL_DIRECTORY_ENTRY
        {
            return Err(bad(format!(
                "damaged zip archive: the central directory ends after {} of its {count} entries",
                names.len()
            )));
        }
        let flags = at.u16(pos + 8, "central directory entry")?;
        let method = at.u16(pos + 10, "central directory entry")?;
        let mut packed = u64::from(at.u32(pos + 20, "central directory entry")?);
        let mut size = u64::from(at.u32(pos + 24, "central directory entry")?);
        let name_len = u64::from(at.u16(pos + 28, "central directory entry")?);
        let extra_len = u64::from(at.u16(pos + 30, "central directory entry")?);
        let comment_len = u64::from(at.u16(pos + 32, "central directory entry")?);
        let mut local = u64::from(at.u32(pos + 42, "central directory entry")?);
        let name_bytes = at.slice(pos + 46, name_len, "entry name")?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| bad(format!("zip entry {} has a name that is not UTF-8", names.len())))?;
        let extra = at.slice(pos + 46 + name_len, extra_len, "entry's extra field")?;
        read_zip64_sizes(path, &name, extra, &mut size, &mut packed, &mut local)?;
        if flags & 1 != 0 {
            return Err(bad(format!("zip entry '{name}' is encrypted; torch.save never encrypts")));
        }
        if method != STORED {
            return Err(bad(format!(
                "zip entry '{name}' is compressed (method {method}); torch.save stores entries \
                 uncompressed, and compressed ones are not read (nothing is inflated)"
            )));
        }
        if packed != size {
            return Err(bad(format!(
                "zip entry '{name}' is stored but declares {packed} bytes in the archive and \
                 {size} bytes of contents"
            )));
        }
        let data = entry_data(&at, &name, local, size, dir_start)?;
        if entries.insert(name.clone(), data).is_some() {
            return Err(bad(format!("zip entry '{name}' appears twice")));
        }
        names.push(name);
        pos += 46 + name_len + extra_len + comment_len;
    }
    Ok(ZipEntries { entries, names })
}

/// The offset of the end-of-central-directory record, searched backwards over the space a
/// comment may take.
fn find_end_record(path: &Path, bytes: &[u8]) -> Result<usize> {
    let signature = END_OF_CENTRAL_DIRECTORY.to_le_bytes();
    let lowest = bytes.len().saturating_sub(END_RECORD_LEN + MAX_COMMENT);
    let found = (lowest..=bytes.len().saturating_sub(END_RECORD_LEN))
        .rev()
        .filter(|&i| bytes.len() >= END_RECORD_LEN && bytes[i..i + 4] == signature)
        .find(|&i| {
            let comment = u16::from_le_bytes([bytes[i + 20], bytes[i + 21]]) as usize;
            i + END_RECORD_LEN + comment == bytes.len()
        });
    found.ok_or_else(|| {
        Error::format(
            path.display(),
            format!(
                "not a zip archive, or a truncated one: no end-of-central-directory record in \
                 its last bytes ({} bytes in all; torch.save writes a zip archive)",
                bytes.len()
            ),
        )
    })
}

/// Replaces the 32-bit fields that say "see zip64" (all ones) with the zip64 extra field's
/// 64-bit values, in the order the format lists them.
fn read_zip64_sizes(
    path: &Path,
    name: &str,
    mut extra: &[u8],
    size: &mut u64,
    packed: &mut u64,
    local: &mut u64,
) -> Result<()> {
    let wanted = [*size == 0xffff_ffff, *packed == 0xffff_ffff, *local == 0xffff_ffff];
    if !wanted.iter().any(|&w| w) {
        return Ok(());
    }
    while extra.len() >= 4 {
        let id = u16::from_le_bytes([extra[0], extra[1]]);
        let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        let body = extra.get(4..4 + len).unwrap_or(&[]);
        if id == 1 {
            let mut values =
                body.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
            for (want, slot) in wanted.into_iter().zip([size, packed, local]) {
                if want {
                    *slot = values.next().ok_or_else(|| {
                        Error::format(
                            path.display(),
                            format!("zip entry '{name}': its zip64 field is too short"),
                        )
                    })?;
                }
            }
            return Ok(());
        }
        extra = extra.get(4 + len..).unwrap_or(&[]);
    }
    Err(Error::format(
        path.display(),
        format!("zip entry '{name}' needs a zip64 field and has none"),
    ))
}

/// The byte range of an entry's contents, after its local header, checked to lie before the
/// central directory.
fn entry_data(
    at: &Cursor,
    name: &str,
    local: u64,
    size: u64,
    dir_start: u64,
) -> Result<Range<usize>> {
    let bad = |msg: String| Error::format(at.path.display(), msg);
    if local >= dir_start || at.u32(local, "local header")? != LOCAL_HEADER {
        return Err(bad(format!(
            "damaged zip archive: no local header for entry '{name}' at offset {local}"
        )));
    }
    let name_len = u64::from(at.u16(local + 26, "local header")?);
    let extra_len = u64::from(at.u16(local + 28, "local header")?);
    let start = local + 30 + name_len + extra_len;
    match start.checked_add(size) {
        Some(end) if end <= dir_start => Ok(start as usize..end as usize),
        _ => Err(bad(format!(
            "zip entry '{name}' declares {size} bytes at offset {start}, but only {} bytes of \
             the file lie before the central directory: the archive is truncated or damaged",
            dir_start
        ))),
    }
}
