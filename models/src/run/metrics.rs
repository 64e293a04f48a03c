//! Run metrics as JSON lines: one object per logged step in `metrics.jsonl`, e.g.
//!
//! ```text
//! {"step":100,"loss":2.31,"lr":0.0006,"tokens_per_sec":51234.0,"val_loss":2.40,"grad_norm":0.8}
//! ```
//!
//! One line per record means a crash loses at most the line being written, any tool (`jq`,
//! pandas, a spreadsheet) reads the file, and resuming a run is appending. Each record is
//! written with a single `write` call straight to the file (no user-space buffer), so a line is
//! on disk, whole, before training continues.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Deserializer, Serialize};
use tokenformer_core::{Error, Result};

/// One logged step. `extra` holds any other fields (grad norm, MFU, ...), flattened into the
/// same JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub tokens_per_sec: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    pub fn new(step: u64, loss: f64, lr: f64, tokens_per_sec: f64) -> Record {
        Record { step, loss, lr, tokens_per_sec, val_loss: None, extra: Default::default() }
    }

    /// Adds a free field, builder style: `Record::new(..).with("grad_norm", 0.8)`.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Record {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

/// JSON has no NaN or infinity: serde_json writes them as `null` (a diverged loss, a rate over
/// zero seconds). Reading `null` back as NaN keeps such a run's file loadable, and the plot
/// simply skips the point.
fn null_as_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

/// Opens `path` for appending, creating it if needed, but never through a symbolic link (a
/// link planted in a run directory must not redirect the run's writes), only if it is a
/// regular file, and only if it has no other name: appending to (or cutting) a file that is
/// also a hard link elsewhere would change that file too.
fn open_for_append(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::io(path.display(), "is a symbolic link; refusing to write through it")
        } else {
            Error::io(path.display(), e)
        }
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path.display(), e))?;
    if !meta.is_file() {
        return Err(Error::io(path.display(), "is not a regular file; refusing to write to it"));
    }
    #[cfg(unix)]
    if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
        return Err(Error::io(
            path.display(),
            format!(
                "has {} names (hard links); refusing to write to it, as that would change the \
                 file elsewhere too",
                std::os::unix::fs::MetadataExt::nlink(&meta)
            ),
        ));
    }
    Ok(file)
}

impl MetricsWriter {
    /// Starts a fresh file (an existing one is emptied).
    pub fn create(path: &Path) -> Result<MetricsWriter> {
        let file = open_for_append(path)?;
        file.set_len(0).map_err(|e| Error::io(path.display(), e))?;
        Ok(MetricsWriter { file, path: path.to_path_buf() })
    }

    /// Continues a run resumed from a checkpoint taken at `checkpoint_step`: keeps the records
    /// up to that step, drops later ones (the resumed run will log those steps again) and a
    /// truncated last line, then appends. Without the clean-up a half-written line would end
    /// up glued to the first new record. A missing file is started fresh.
    ///
    /// The kept lines stay byte for byte as they were: the file is cut at the end of the last
    /// kept line, never rewritten, so a resumed run's metrics are the bytes an uninterrupted
    /// run would have written (a float printed, parsed and printed again can change its last
    /// digit).
    pub fn resume(path: &Path, checkpoint_step: u64) -> Result<MetricsWriter> {
        let file = open_for_append(path)?;
        let keep = kept_bytes(&file, path, checkpoint_step)?;
        file.set_len(keep).map_err(|e| Error::io(path.display(), e))?;
        Ok(MetricsWriter { file, path: path.to_path_buf() })
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let line = to_line(&self.path, record)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(self.path.display(), e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn to_line(path: &Path, record: &Record) -> Result<String> {
    let mut line =
        serde_json::to_string(record).map_err(|e| Error::format(path.display(), e.to_string()))?;
    line.push('\n');
    Ok(line)
}

/// The length of the prefix of a metrics file that holds the records up to `step`: it ends
/// before the first record of a later step, or before a last line the process did not finish.
fn kept_bytes(file: &File, path: &Path, step: u64) -> Result<u64> {
    #[derive(Deserialize)]
    struct Step {
        step: u64,
    }
    // A record is a few hundred bytes; a longer "line" (a file of zeros, say) is not one, and
    // is not read whole to find that out.
    const LONGEST_LINE: u64 = 1 << 20;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let (mut offset, mut number) = (0u64, 0usize);
    loop {
        line.clear();
        let n = (&mut reader)
            .take(LONGEST_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path.display(), e))?;
        number += 1;
        if n as u64 == LONGEST_LINE && !line.ends_with(b"\n") {
            return Err(Error::format(
                format!("{}:{number}", path.display()),
                "a line of a megabyte or more: this is not a metrics file",
            ));
        }
        if n == 0 || !line.ends_with(b"\n") {
            return Ok(offset); // the end, or a line cut short by a crash
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Step>(&line) {
                Ok(record) if record.step > step => return Ok(offset),
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::format(
                        format!("{}:{number}", path.display()),
                        e.to_string(),
                    ))
                }
            }
        }
        offset += n as u64;
    }
}

/// Loads a metrics file. A last line without its newline (the process died mid-write) is
/// ignored if it does not parse; a bad line anywhere else is an error naming its line number.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    // A metrics line is about 200 bytes: 1 GiB is five million logged steps.
    let bytes = crate::files::read_regular(path, 1 << 30, "a metrics file")?;
    let text = String::from_utf8_lossy(&bytes);
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => {
                return Err(Error::format(format!("{}:{}", path.display(), i + 1), e.to_string()))
            }
        }
    }
    Ok(records)
}

/// (step, loss) points, as `plot_run` takes them.
pub type Series = Vec<(u64, f64)>;

/// The (step, loss) and (step, val_loss) series of a metrics file, ready for `plot_run`.
pub fn loss_series(records: &[Record]) -> (Series, Series) {
    let train = records.iter().map(|r| (r.step, r.loss)).collect();
    let val = records.iter().filter_map(|r| Some((r.step, r.val_loss?))).collect();
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn append_reload_and_resume() {
        let dir = std::env::temp_dir().join(format!("tf-metrics-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");

        let mut w = MetricsWriter::create(&path).unwrap();
        let mut written = Vec::new();
        for step in 1..=4u64 {
            let mut r = Record::new(step, 5.0 / step as f64, 6e-4, 1234.5).with("grad_norm", 0.5);
            if step % 2 == 0 {
                r.val_loss = Some(4.0);
            }
            w.write(&r).unwrap();
            written.push(r);
        }
        w.write(&Record::new(5, f64::NAN, 6e-4, 1000.0)).unwrap();
        drop(w);
        let back = read_metrics(&path).unwrap();
        assert_eq!(back[..4], written[..]);
        assert!(back[4].loss.is_nan());

        // A crash mid-line: the partial record is ignored on read...
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\":6,\"lo").unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 5);
        // ...and resuming from the step-3 checkpoint keeps steps 1..=3 and appends after them.
        let mut w = MetricsWriter::resume(&path, 3).unwrap();
        w.write(&Record::new(4, 1.0, 6e-4, 1.0)).unwrap();
        let back = read_metrics(&path).unwrap();
        assert_eq!(back.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let (train, val) = loss_series(&back);
        assert_eq!((train.len(), val), (4, vec![(2, 4.0)]));

        // A bad line in the middle is an error that names the line.
        let good = "{\"step\":1,\"loss\":2.0,\"lr\":0.1,\"tokens_per_sec\":9.0}";
        fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:2"), "{err}");

        // A huge file of zeros is refused after its first megabyte, whatever its size...
        File::create(&path).unwrap().set_len(1 << 40).unwrap();
        let err = MetricsWriter::resume(&path, 3).err().unwrap().to_string();
        assert!(err.contains("metrics.jsonl:1") && err.contains("not a metrics file"), "{err}");
        assert!(read_metrics(&path).unwrap_err().to_string().contains("more than"));
        // ...and a link is never written through.
        fs::remove_file(&path).unwrap();
        let target = dir.join("elsewhere");
        fs::write(&target, "kept\n").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = MetricsWriter::resume(&path, 3).err().unwrap().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(MetricsWriter::create(&path).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "kept\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
