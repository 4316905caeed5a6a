//! Reading JSONL records with errors that name the file and line, and writing outputs
//! atomically (temporary file in the destination folder, then rename), so an interrupted
//! run never leaves a partial file where a finished one is expected.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// `-` means stdin (for inputs) or stdout (for outputs).
pub const STDIO: &str = "-";

/// A record type of a JSONL file: every line carries `"kind"` and `"v"` so that a file of
/// the wrong type or an old version is refused with a clear message.
pub trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    const VERSION: u32;
}

/// Human name of an input path for error messages.
pub fn display_name(path: &str) -> String {
    if path == STDIO {
        "<stdin>".to_string()
    } else {
        path.to_string()
    }
}

/// Opens a file, or stdin for `-`.
pub fn open_input(path: &str) -> Result<Box<dyn BufRead>> {
    if path == STDIO {
        Ok(Box::new(BufReader::new(std::io::stdin())))
    } else {
        let f = File::open(path).with_context(|| format!("cannot open {path}"))?;
        Ok(Box::new(BufReader::new(f)))
    }
}

/// Reads all bytes of a file, or of stdin for `-`.
pub fn read_all(path: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_input(path)?
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {}", display_name(path)))?;
    Ok(buf)
}

#[derive(serde::Deserialize)]
struct Header {
    kind: Option<serde_json::Value>,
    v: Option<serde_json::Value>,
}

/// Parses one JSONL line as a record of type `T`, checking kind and version first so the
/// error says "wrong kind"/"wrong version" rather than a confusing missing-field message.
pub fn parse_record<T: Record>(line: &str) -> Result<T> {
    let header: Header =
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("malformed JSON: {e}"))?;
    match header.kind.as_ref().and_then(|k| k.as_str()) {
        Some(k) if k == T::KIND => {}
        Some(k) => bail!("a record of kind {k:?} where {:?} was expected", T::KIND),
        None => bail!("no \"kind\" field (expected \"kind\": {:?}, \"v\": {})", T::KIND, T::VERSION),
    }
    match header.v.as_ref().and_then(|v| v.as_u64()) {
        Some(v) if v == T::VERSION as u64 => {}
        Some(v) => bail!(
            "format version {v} of {:?} records; this build reads version {}: regenerate the file with this build's stages",
            T::KIND,
            T::VERSION
        ),
        None => bail!("no integer \"v\" (format version) field"),
    }
    serde_json::from_str(line).map_err(|e| anyhow::anyhow!("invalid {:?} record: {e}", T::KIND))
}

/// Reads every record of a JSONL file (or stdin for `-`). Errors name the file and the
/// 1-based line. Blank lines are refused except at the very end. An input without records
/// is an error unless `allow_empty`.
pub fn read_jsonl<T: Record>(path: &str, allow_empty: bool) -> Result<Vec<T>> {
    read_jsonl_from(open_input(path)?, &display_name(path), allow_empty)
}

/// The longest JSONL line a reader accepts. Records here are sentences and small reports
/// (well under 1 MiB); the bound keeps a file without newlines, or a hostile one, from
/// being read whole into one string.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// `read_jsonl` over any reader; `name` is used in error messages.
pub fn read_jsonl_from<T: Record>(mut reader: impl BufRead, name: &str, allow_empty: bool) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut blank_at: Option<usize> = None;
    let mut buf = Vec::new();
    for line_no in 1.. {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{name}:{line_no}: cannot read"))?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_RECORD_BYTES {
            bail!("{name}:{line_no}: a line longer than {} MiB; is this a JSONL file of this toolkit?", MAX_RECORD_BYTES >> 20);
        }
        let line = std::str::from_utf8(&buf).map_err(|e| anyhow::anyhow!("{name}:{line_no}: not UTF-8 text ({e})"))?;
        if line.trim().is_empty() {
            blank_at.get_or_insert(line_no);
            continue;
        }
        if let Some(b) = blank_at {
            bail!("{name}:{b}: blank line inside a JSONL file; remove it");
        }
        let rec = parse_record::<T>(line).with_context(|| format!("{name}:{line_no}"))?;
        out.push(rec);
    }
    if out.is_empty() && !allow_empty {
        bail!(
            "{name}: no {:?} records (empty input); check the path or the previous stage's output",
            T::KIND
        );
    }
    Ok(out)
}

/// sha256 of bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// An output that becomes visible only when `commit` is called: a temporary file beside
/// the destination, renamed over it on commit and deleted if dropped uncommitted. For `-`
/// it writes through to stdout (a pipe cannot be atomic; the reader sees EOF on error), as
/// it does to an existing destination that is not a regular file (`/dev/null`, a FIFO):
/// renaming a temporary file over it would replace the device.
pub struct Output {
    inner: OutputInner,
}

enum OutputInner {
    File { tmp: tempfile::NamedTempFile, writer: Option<BufWriter<File>>, dest: PathBuf },
    /// Stdout, or a device or pipe named as the destination: written in place.
    Direct(BufWriter<Box<dyn Write>>),
}

impl Output {
    pub fn create(path: &str) -> Result<Output> {
        if path == STDIO {
            return Ok(Output { inner: OutputInner::Direct(BufWriter::new(Box::new(std::io::stdout()))) });
        }
        let dest = PathBuf::from(path);
        if std::fs::metadata(&dest).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let f = std::fs::OpenOptions::new().write(true).open(&dest).with_context(|| format!("cannot write to {path}"))?;
            return Ok(Output { inner: OutputInner::Direct(BufWriter::new(Box::new(f))) });
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", dest.file_name().map(|s| s.to_string_lossy()).unwrap_or_default()))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        let writer = BufWriter::new(tmp.reopen()?);
        Ok(Output { inner: OutputInner::File { tmp, writer: Some(writer), dest } })
    }

    /// Refuses to write binary data to a terminal (like gzip does).
    pub fn refuse_terminal(path: &str, what: &str) -> Result<()> {
        use std::io::IsTerminal;
        if path == STDIO && std::io::stdout().is_terminal() {
            bail!("refusing to write {what} (binary) to a terminal; redirect stdout or pass -o FILE");
        }
        Ok(())
    }

    /// Serialises one record as a JSON line.
    pub fn write_record<T: Serialize>(&mut self, rec: &T) -> Result<()> {
        jsonl::write(&mut *self, rec).map_err(|e| match e {
            jsonl::WriteError::Io(io) => anyhow::Error::new(io),
            jsonl::WriteError::Serialize(s) => anyhow::Error::new(s),
        })
    }

    /// Flushes and makes the output visible at its destination.
    pub fn commit(self) -> Result<()> {
        match self.inner {
            OutputInner::Direct(mut w) => {
                w.flush()?;
                Ok(())
            }
            OutputInner::File { tmp, mut writer, dest } => {
                let w = writer.take().expect("writer present until commit");
                let f = w.into_inner().map_err(|e| e.into_error())?;
                f.sync_all()?;
                // Temporary files are created 0600; a finished output is an ordinary file.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                }
                tmp.persist(&dest).with_context(|| format!("cannot move output into {}", dest.display()))?;
                Ok(())
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            OutputInner::Direct(w) => w.write(buf),
            OutputInner::File { writer, .. } => writer.as_mut().expect("open").write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            OutputInner::Direct(w) => w.flush(),
            OutputInner::File { writer, .. } => writer.as_mut().expect("open").flush(),
        }
    }
}

/// An output folder that appears whole or not at all: files are written into a temporary
/// folder beside the destination, which `commit` renames into place (replacing an older
/// folder of that name). Dropped uncommitted, the temporary folder is removed.
pub struct OutputDir {
    tmp: tempfile::TempDir,
    dest: PathBuf,
}

impl OutputDir {
    pub fn create(dest: &str) -> Result<OutputDir> {
        let dest = PathBuf::from(dest);
        let name = dest.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if name.is_empty() || name == ".." {
            bail!("{}: not a folder name to write into", dest.display());
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create folder {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        Ok(OutputDir { tmp, dest })
    }

    /// Where to write the file `name` before the commit.
    pub fn path(&self, name: &str) -> String {
        self.tmp.path().join(name).to_string_lossy().into_owned()
    }

    pub fn commit(self) -> Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.tmp.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let dest = self.dest;
        let old = if dest.exists() {
            let parent = self.tmp.path().parent().expect("temporary folder has a parent").to_path_buf();
            let old = tempfile::Builder::new().prefix(".old.").suffix(".tmp").tempdir_in(&parent)?.keep();
            std::fs::rename(&dest, old.join("folder")).with_context(|| format!("cannot move the old {} aside", dest.display()))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(self.tmp.keep(), &dest).with_context(|| format!("cannot move the output into {}", dest.display()))?;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        Ok(())
    }
}

/// Writes all records to `path` (or stdout) atomically.
pub fn write_jsonl<T: Serialize>(path: &str, records: &[T]) -> Result<()> {
    let mut out = Output::create(path)?;
    for r in records {
        out.write_record(r)?;
    }
    out.commit()
}

/// Writes bytes to `path` (or stdout) atomically.
pub fn write_bytes(path: &str, bytes: &[u8]) -> Result<()> {
    let mut out = Output::create(path)?;
    out.write_all(bytes)?;
    out.commit()
}

/// Records serialised as JSON Lines in memory (to hash and then write atomically).
pub fn jsonl_bytes<T: Serialize>(records: &[T]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for r in records {
        jsonl::write(&mut bytes, r).map_err(|e| anyhow::anyhow!("cannot serialise a record: {e}"))?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `-o /dev/null` or a named pipe must be written in place: the atomic rename would
    /// replace the device or pipe with a regular file (it once replaced /dev/null here).
    #[test]
    fn outputs_that_are_not_regular_files_are_written_in_place() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_bytes(fifo.to_str().unwrap(), b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the pipe was replaced by a file");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file: {leftovers:?}");
    }
}
