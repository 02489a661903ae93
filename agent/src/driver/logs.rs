//! Task logs: size-rotated files `<dir>/<task>.<stream>.<n>` (the highest `n` is the newest)
//! written by [`RotatingWriter`], and read back as one byte stream (the concatenation of the
//! retained files) by [`LogReader`], which the `ClientService::Logs` RPC uses.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The largest chunk the reader returns at once (64 KiB).
pub const MAX_CHUNK: usize = 64 * 1024;

/// File name prefix for a task's stream: `<task>.stdout` or `<task>.stderr`.
pub fn log_base(task: &str, stderr: bool) -> String {
    format!("{task}.{}", if stderr { "stderr" } else { "stdout" })
}

/// Lists the retained files of a stream: (index, path, size), oldest first.
pub fn list_files(dir: &Path, base: &str) -> io::Result<Vec<(u64, PathBuf, u64)>> {
    let mut out = Vec::new();
    let prefix = format!("{base}.");
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(idx) = rest.parse::<u64>() else {
            continue;
        };
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        out.push((idx, entry.path(), size));
    }
    out.sort_by_key(|(i, _, _)| *i);
    Ok(out)
}

/// Writes a stream into size-rotated files, keeping the newest `max_files`.
#[derive(Debug)]
pub struct RotatingWriter {
    dir: PathBuf,
    base: String,
    max_bytes: u64,
    max_files: u32,
    index: u64,
    file: File,
    size: u64,
}

impl RotatingWriter {
    /// Opens the stream, appending to the newest existing file (a restarted task continues its
    /// logs) or creating `<base>.0`.
    pub fn open(dir: &Path, base: &str, max_bytes: u64, max_files: u32) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let existing = list_files(dir, base)?;
        let (index, size) = existing.last().map(|(i, _, s)| (*i, *s)).unwrap_or((0, 0));
        let file = OpenOptions::new().create(true).append(true).open(dir.join(format!("{base}.{index}")))?;
        let mut w = RotatingWriter {
            dir: dir.to_path_buf(),
            base: base.to_string(),
            max_bytes: max_bytes.max(1),
            max_files: max_files.max(1),
            index,
            file,
            size,
        };
        w.prune()?;
        Ok(w)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.index += 1;
        self.file = OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{}.{}", self.base, self.index)))?;
        self.size = 0;
        self.prune()
    }

    fn prune(&mut self) -> io::Result<()> {
        let keep_from = (self.index + 1).saturating_sub(u64::from(self.max_files));
        for (idx, path, _) in list_files(&self.dir, &self.base)? {
            if idx < keep_from {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends bytes, rotating whenever the current file reaches the size limit.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.size >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }
}

/// A position in a rotated stream: file index and byte offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPos {
    /// File index (`<base>.<index>`).
    pub index: u64,
    /// Offset in that file.
    pub offset: u64,
}

/// Reads a rotated stream as one sequence of bytes; follows rotation.
#[derive(Debug, Clone)]
pub struct LogReader {
    dir: PathBuf,
    base: String,
    pos: Option<LogPos>,
}

impl LogReader {
    /// A reader starting at `offset` bytes into the concatenation of the retained files, or
    /// `tail_bytes` before its end when `tail_bytes > 0`.
    pub fn new(dir: &Path, base: &str, offset: u64, tail_bytes: u64) -> io::Result<Self> {
        let files = list_files(dir, base)?;
        let total: u64 = files.iter().map(|(_, _, s)| *s).sum();
        let start = if tail_bytes > 0 { total.saturating_sub(tail_bytes) } else { offset };
        let mut pos = None;
        let mut acc = 0u64;
        for (idx, _, size) in &files {
            if start < acc + size {
                pos = Some(LogPos { index: *idx, offset: start - acc });
                break;
            }
            acc += size;
        }
        if pos.is_none() {
            // At (or past) the end: continue after the newest file's end.
            pos = files.last().map(|(idx, _, size)| LogPos { index: *idx, offset: *size });
        }
        Ok(LogReader { dir: dir.to_path_buf(), base: base.to_string(), pos })
    }

    /// The current position (None before any file exists).
    pub fn pos(&self) -> Option<LogPos> {
        self.pos
    }

    /// Reads the next chunk (at most `max` bytes, capped at [`MAX_CHUNK`]). Returns the data
    /// and the file name it came from, or None when no new bytes are available right now.
    pub fn read_chunk(&mut self, max: usize) -> io::Result<Option<(Vec<u8>, String)>> {
        let max = max.clamp(1, MAX_CHUNK);
        loop {
            let files = list_files(&self.dir, &self.base)?;
            let Some(first) = files.first() else {
                return Ok(None);
            };
            let mut pos = self.pos.unwrap_or(LogPos { index: first.0, offset: 0 });
            // The file we were reading was rotated away: go to the oldest retained.
            if pos.index < first.0 {
                pos = LogPos { index: first.0, offset: 0 };
            }
            let cur = files.iter().find(|(i, _, _)| *i == pos.index);
            if let Some((_, path, size)) = cur {
                if *size > pos.offset {
                    let mut f = File::open(path)?;
                    f.seek(SeekFrom::Start(pos.offset))?;
                    let mut buf = vec![0u8; max];
                    let n = f.read(&mut buf)?;
                    buf.truncate(n);
                    if n > 0 {
                        pos.offset += n as u64;
                        self.pos = Some(pos);
                        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                        return Ok(Some((buf, name)));
                    }
                }
            }
            // Current file exhausted (or missing): move to the next newer file, if any.
            match files.iter().find(|(i, _, _)| *i > pos.index) {
                Some((idx, _, _)) => {
                    self.pos = Some(LogPos { index: *idx, offset: 0 });
                }
                None => {
                    self.pos = Some(pos);
                    return Ok(None);
                }
            }
        }
    }

    /// Reads everything available now (used by tests and non-follow readers).
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((chunk, _)) = self.read_chunk(MAX_CHUNK)? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_readback() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let base = log_base("t", false);
        let mut w = RotatingWriter::open(dir.path(), &base, 10, 3)?;
        // 0..=44 as bytes: 45 bytes -> files 0..=4 (10,10,10,10,5); keep newest 3: 2,3,4
        let data: Vec<u8> = (0u8..45).collect();
        w.write_all(&data[..7])?;
        w.write_all(&data[7..])?;
        let files = list_files(dir.path(), &base)?;
        let idx: Vec<u64> = files.iter().map(|f| f.0).collect();
        assert_eq!(idx, vec![2, 3, 4]);
        let sizes: Vec<u64> = files.iter().map(|f| f.2).collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        assert_eq!(fs::read(dir.path().join("t.stdout.4"))?, data[40..].to_vec());

        let mut r = LogReader::new(dir.path(), &base, 0, 0)?;
        assert_eq!(r.read_to_end()?, data[20..].to_vec());
        let mut r = LogReader::new(dir.path(), &base, 13, 0)?;
        assert_eq!(r.read_to_end()?, data[33..].to_vec());
        let mut r = LogReader::new(dir.path(), &base, 0, 8)?;
        assert_eq!(r.read_to_end()?, data[37..].to_vec());
        let mut r = LogReader::new(dir.path(), &base, 0, 1000)?;
        assert_eq!(r.read_to_end()?, data[20..].to_vec());
        let mut r = LogReader::new(dir.path(), &base, 1000, 0)?;
        assert_eq!(r.read_to_end()?, Vec::<u8>::new());

        // Following across rotation: the reader at the end sees new bytes in new files.
        let mut follow = LogReader::new(dir.path(), &base, 0, 0)?;
        assert_eq!(follow.read_to_end()?.len(), 25);
        let more: Vec<u8> = (100u8..125).collect();
        w.write_all(&more)?;
        assert_eq!(follow.read_to_end()?, more);

        // Reopening appends to the newest file.
        drop(w);
        let mut w = RotatingWriter::open(dir.path(), &base, 10, 3)?;
        w.write_all(b"xy")?;
        let files = list_files(dir.path(), &base)?;
        assert_eq!(files.last().map(|f| (f.0, f.2)), Some((7, 2)));
        Ok(())
    }

    #[test]
    fn chunks_are_bounded() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = RotatingWriter::open(dir.path(), "x.stderr", 1 << 20, 2)?;
        w.write_all(&vec![7u8; 200_000])?;
        let mut r = LogReader::new(dir.path(), "x.stderr", 0, 0)?;
        let mut total = 0;
        while let Some((c, name)) = r.read_chunk(usize::MAX)? {
            assert!(c.len() <= MAX_CHUNK);
            assert_eq!(name, "x.stderr.0");
            total += c.len();
        }
        assert_eq!(total, 200_000);
        Ok(())
    }
}
