//! Reading a corpus from disk: a list of files and directories → documents, in a fixed order.
//!
//! Files named on the command line are read in the order given. A directory contributes every
//! `.txt` file below it (recursively), sorted by path, so the same directory always gives the
//! same token stream on every machine, whatever order the file system lists it in. Other files
//! in a directory (a `manifest.json`, a README) are skipped; name them explicitly to use them.
//!
//! Documents stay bytes here. The tokenizer decides what to do with bytes that are not UTF-8
//! (`byte` keeps them, the BPEs read them lossily), see `Tokenizer::encode_bytes`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::files::{bytes_text, open_regular, read_open};
use crate::memory;
use tokenformer_core::{Error, Result};

/// One source file's contents and where they came from (for error messages).
#[derive(Clone, Debug)]
pub struct Document {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Expands `paths` into the list of files to read (see the module comment for the order).
pub fn list_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        return Err(Error::invalid("no data paths given"));
    }
    let mut files = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| Error::io(path.display(), e))?;
        if !meta.is_dir() && !meta.is_file() {
            // `/dev/zero` or a FIFO would be read forever.
            return Err(Error::io(
                path.display(),
                "is not a regular file or a directory (a device, FIFO or socket); give text files",
            ));
        }
        if meta.is_dir() {
            let mut found = Vec::new();
            collect_txt(path, &mut found)?;
            if found.is_empty() {
                return Err(Error::format(path.display(), "directory holds no .txt files"));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
        let path = entry.path();
        // `file_type` does not follow symlinks, so a link to a parent directory cannot send
        // the walk round in a circle; a link to a file is followed with `metadata`.
        let kind = entry.file_type().map_err(|e| Error::io(path.display(), e))?;
        if kind.is_dir() {
            collect_txt(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "txt")
            && (kind.is_file() || fs::metadata(&path).is_ok_and(|m| m.is_file()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads every file `list_files` finds. A missing, unreadable or empty file is an error that
/// names it; nothing is skipped silently.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<Document>> {
    read_files(list_files(paths)?)
}

/// Reads the given files, in order (see `read_documents`). Only regular files are read, and
/// only as much text as memory allows: a corpus is read whole, then tokenised (at least as
/// many bytes again), so a file larger than memory — a huge sparse file, say — is refused
/// before any of it is read.
pub fn read_files(files: Vec<PathBuf>) -> Result<Vec<Document>> {
    let mut total: u128 = 0;
    files
        .into_iter()
        .map(|path| {
            let (file, len) = open_regular(&path)?;
            total += u128::from(len);
            memory::check(
                &format!("reading {} ({}) as text", path.display(), bytes_text(len)),
                Some(2 * total),
            )?;
            let bytes = read_open(file, &path, len, len, "a text file")?;
            if bytes.is_empty() {
                return Err(Error::format(path.display(), "empty file"));
            }
            Ok(Document { name: path.display().to_string(), bytes })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_walked_in_sorted_order_and_bad_paths_named() {
        let dir = std::env::temp_dir().join(format!("tf-corpus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("b.txt"), "bee").unwrap();
        fs::write(dir.join("a.txt"), "ay").unwrap();
        fs::write(dir.join("sub/c.txt"), "sea").unwrap();
        fs::write(dir.join("manifest.json"), "{}").unwrap();
        fs::write(dir.join("notes.md"), [0xff, 0xfe]).unwrap();

        let docs = read_documents(&[dir.clone(), dir.join("notes.md")]).unwrap();
        let texts: Vec<&[u8]> = docs.iter().map(|d| d.bytes.as_slice()).collect();
        assert_eq!(texts, [&b"ay"[..], b"bee", b"sea", &[0xff, 0xfe]]);

        let missing = dir.join("nope.txt");
        let err = read_documents(std::slice::from_ref(&missing)).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");

        fs::write(dir.join("empty.txt"), "").unwrap();
        let err = read_documents(std::slice::from_ref(&dir)).unwrap_err().to_string();
        assert!(err.contains("empty.txt") && err.contains("empty file"), "{err}");

        // One bad path spoils the list, whatever comes before it.
        assert!(read_documents(&[dir.join("a.txt"), dir.join("nothing")]).is_err());
        fs::create_dir_all(dir.join("void")).unwrap();
        let err = read_documents(&[dir.join("void")]).unwrap_err().to_string();
        assert!(err.contains("no .txt files"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
