//! A task's `artifact` blocks (issue 14 §3): files fetched into the task dir before the task
//! starts, verified against their checksum, archives unpacked.
//!
//! * `http://` and `https://` through `reqwest` (rustls with ring, as the image puller), with a
//!   connect timeout, a whole-artifact deadline, a size cap and up to three attempts with
//!   backoff for network errors and 5xx answers (never for 4xx or a checksum mismatch).
//! * `file://` only under a directory the agent's `--artifact-file-root` names: a job must not
//!   read any file of the node by asking for it.
//! * The bytes go to a hidden temporary file in the task dir while they are hashed; a checksum
//!   that does not match refuses the task. Then the file is moved to its destination, or, for an
//!   archive (`.tar`, `.tar.gz`/`.tgz`, `.tar.zst`; mode `any` or `dir`), unpacked into the
//!   destination directory by the `tar` crate's `unpack_in`, which refuses entries that would
//!   land outside it (absolute paths, `..`, through symlinks).
//! * The destination is relative to the task dir; its resolved parent must stay inside the task
//!   dir (a symlink left by an earlier run cannot redirect the write).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mlp_proto::jobspec::artifact::{self, Archive, Mode, Source};
use mlp_proto::v1::Artifact;
use sha2::Digest as _;

/// The agent's artifact settings (`mlp agent --artifact-*`).
#[derive(Debug, Clone)]
pub struct ArtifactSettings {
    /// Directories `file://` sources may name files under; empty: `file://` is refused.
    pub file_roots: Vec<PathBuf>,
    /// Deadline for one artifact, all attempts together.
    pub timeout: Duration,
    /// Largest artifact accepted, in bytes (as fetched, before unpacking).
    pub max_bytes: u64,
}

impl Default for ArtifactSettings {
    fn default() -> Self {
        ArtifactSettings { file_roots: Vec::new(), timeout: Duration::from_secs(30 * 60), max_bytes: 20 << 30 }
    }
}

/// Why an artifact could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The block breaks a rule (only for jobs that bypassed the validator).
    #[error("artifact[{index}].{field}: {message}")]
    Invalid { index: usize, field: &'static str, message: String },
    /// The download or copy failed.
    #[error("artifact[{index}] {source_url}: {message}")]
    Fetch { index: usize, source_url: String, message: String },
    /// The bytes are not the ones the job pinned.
    #[error("artifact[{index}] {source_url}: checksum mismatch: expected {expected}, got {actual}")]
    Checksum { index: usize, source_url: String, expected: String, actual: String },
}

/// A hash over the fetched bytes, of the pinned algorithm (sha256 when none is pinned).
enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: &str) -> Hasher {
        if algorithm == "sha512" {
            Hasher::Sha512(sha2::Sha512::new())
        } else {
            Hasher::Sha256(sha2::Sha256::new())
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }
    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Fetches every artifact of a task into `task_dir`, in order; `progress` gets one line per
/// artifact (for the task's events).
pub async fn fetch_all(
    settings: &ArtifactSettings,
    task_dir: &Path,
    artifacts: &[Artifact],
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ArtifactError> {
    for (index, a) in artifacts.iter().enumerate() {
        let began = Instant::now();
        let bytes = fetch_one(settings, task_dir, index, a).await?;
        progress(format!("artifact {} fetched: {} bytes in {} ms", a.source, bytes, began.elapsed().as_millis()));
    }
    Ok(())
}

async fn fetch_one(settings: &ArtifactSettings, task_dir: &Path, index: usize, a: &Artifact) -> Result<u64, ArtifactError> {
    let parsed = artifact::parse(a).map_err(|e| ArtifactError::Invalid { index, field: e.field, message: e.message })?;
    let fail = |message: String| ArtifactError::Fetch { index, source_url: a.source.clone(), message };
    let tmp = task_dir.join(format!(".artifact-{index}.part"));
    let algorithm = parsed.checksum.as_ref().map_or("sha256", |c| c.algorithm);
    let deadline = Instant::now() + settings.timeout;
    let (size, actual) = match &parsed.source {
        Source::File(path) => copy_file(settings, path, &tmp, algorithm).await.map_err(fail)?,
        Source::Http(url) => {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, download(settings, url, &tmp, algorithm)).await {
                    Ok(Ok(done)) => break done,
                    Ok(Err((message, retryable))) if retryable && attempt < 3 && Instant::now() < deadline => {
                        tracing::info!(url = %url, attempt, error = %message, "artifact download failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                    }
                    Ok(Err((message, _))) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(fail(format!("{message} (after {attempt} attempt{})", if attempt == 1 { "" } else { "s" })));
                    }
                    Err(_) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(fail(format!("not fetched within {:?}", settings.timeout)));
                    }
                }
            }
        }
    };
    if let Some(expected) = &parsed.checksum {
        if expected.hex != actual {
            let _ = std::fs::remove_file(&tmp);
            return Err(ArtifactError::Checksum {
                index,
                source_url: a.source.clone(),
                expected: format!("{}:{}", expected.algorithm, expected.hex),
                actual: format!("{}:{actual}", expected.algorithm),
            });
        }
    }
    let archive = match parsed.mode {
        Mode::File => None,
        Mode::Any | Mode::Dir => artifact::archive_of(&a.source),
    };
    let dest = task_dir.join(&parsed.destination);
    let (task_dir, tmp2, source) = (task_dir.to_path_buf(), tmp.clone(), a.source.clone());
    let placed = tokio::task::spawn_blocking(move || place(&task_dir, &tmp2, &dest, archive, parsed.mode, &source))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    let _ = std::fs::remove_file(&tmp);
    placed.map_err(fail)?;
    Ok(size)
}

/// Downloads `url` into `tmp`, hashing; the error says whether another attempt may help.
async fn download(settings: &ArtifactSettings, url: &str, tmp: &Path, algorithm: &str) -> Result<(u64, String), (String, bool)> {
    crate::image::install_crypto();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| (format!("building the HTTP client: {e}"), false))?;
    let mut resp = client.get(url).send().await.map_err(|e| (chain(&e), true))?;
    let status = resp.status();
    if !status.is_success() {
        return Err((format!("the server answered {status}"), status.is_server_error()));
    }
    if resp.content_length().is_some_and(|n| n > settings.max_bytes) {
        return Err((format!("larger than the agent's limit of {} bytes", settings.max_bytes), false));
    }
    let mut file = std::fs::File::create(tmp).map_err(|e| (format!("creating {}: {e}", tmp.display()), false))?;
    let mut hasher = Hasher::new(algorithm);
    let mut size = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| (chain(&e), true))? {
        size += chunk.len() as u64;
        if size > settings.max_bytes {
            return Err((format!("larger than the agent's limit of {} bytes", settings.max_bytes), false));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| (format!("writing {}: {e}", tmp.display()), false))?;
    }
    file.sync_all().map_err(|e| (format!("writing {}: {e}", tmp.display()), false))?;
    Ok((size, hasher.hex()))
}

/// reqwest's error and its sources (its own message alone says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Copies a `file://` source (under one of the allowed roots) into `tmp`, hashing.
async fn copy_file(settings: &ArtifactSettings, path: &Path, tmp: &Path, algorithm: &str) -> Result<(u64, String), String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let allowed = settings.file_roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|r| real.starts_with(&r));
    if !allowed {
        return Err(if settings.file_roots.is_empty() {
            "file:// sources are off on this node (the agent has no --artifact-file-root)".into()
        } else {
            format!("{} is not under the agent's --artifact-file-root", real.display())
        });
    }
    let (real, tmp, algorithm, max) = (real.clone(), tmp.to_path_buf(), algorithm.to_string(), settings.max_bytes);
    tokio::task::spawn_blocking(move || {
        let mut src = std::fs::File::open(&real).map_err(|e| format!("{}: {e}", real.display()))?;
        let mut dst = std::fs::File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let mut hasher = Hasher::new(&algorithm);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = std::io::Read::read(&mut src, &mut buf).map_err(|e| format!("{}: {e}", real.display()))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > max {
                return Err(format!("larger than the agent's limit of {max} bytes"));
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        }
        Ok((size, hasher.hex()))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Creates `dir` (and its parents) inside `task_dir` and returns its real path. The deepest part
/// that exists already must resolve inside the task dir (a symlink there cannot redirect the
/// write); what is missing is created under that resolved path, one directory at a time.
fn inside(task_dir: &Path, dir: &Path) -> Result<PathBuf, String> {
    let root = std::fs::canonicalize(task_dir).map_err(|e| format!("{}: {e}", task_dir.display()))?;
    let rel = dir.strip_prefix(task_dir).map_err(|_| format!("{} is not in the task dir", dir.display()))?;
    let mut existing = root.clone();
    let mut missing = Vec::new();
    let mut parts = rel.components();
    for c in parts.by_ref() {
        let next = existing.join(c);
        match std::fs::symlink_metadata(&next) {
            Ok(_) => {
                let real = std::fs::canonicalize(&next).map_err(|e| format!("{}: {e}", next.display()))?;
                if !real.starts_with(&root) {
                    return Err(format!("the destination {} resolves outside the task dir", dir.display()));
                }
                existing = real;
            }
            Err(_) => {
                missing.push(c.as_os_str().to_owned());
                break;
            }
        }
    }
    missing.extend(parts.map(|c| c.as_os_str().to_owned()));
    for m in missing {
        existing.push(m);
        match std::fs::create_dir(&existing) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && std::fs::symlink_metadata(&existing).is_ok_and(|m| m.is_dir()) => {}
            Err(e) => return Err(format!("creating {}: {e}", existing.display())),
        }
    }
    if !existing.is_dir() {
        return Err(format!("the destination {} is not a directory", dir.display()));
    }
    Ok(existing)
}

/// Moves or unpacks the fetched file to its destination.
fn place(task_dir: &Path, tmp: &Path, dest: &Path, archive: Option<Archive>, mode: Mode, source: &str) -> Result<(), String> {
    match (archive, mode) {
        (Some(kind), _) => {
            let dir = inside(task_dir, dest)?;
            let file = std::fs::File::open(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            let reader: Box<dyn std::io::Read> = match kind {
                Archive::Tar => Box::new(std::io::BufReader::new(file)),
                Archive::TarGz => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))),
                Archive::TarZst => Box::new(
                    ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
                        .map_err(|e| format!("reading the zstd archive: {e}"))?,
                ),
            };
            let mut ar = tar::Archive::new(reader);
            // No setuid/setgid/sticky bits (the agent unpacks as root; a task must not get a
            // setuid-root binary out of an archive) and nothing group- or world-writable.
            ar.set_preserve_permissions(false);
            ar.set_mask(0o022);
            ar.set_overwrite(true);
            let entries = ar.entries().map_err(|e| format!("reading the archive: {e}"))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
                // `unpack_in` refuses (returns false for) entries that would land outside `dir`.
                let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
                match entry.unpack_in(&dir) {
                    Ok(true) => {}
                    Ok(false) => return Err(format!("the archive's entry {path:?} would land outside the destination")),
                    Err(e) => return Err(format!("unpacking {path:?}: {e}")),
                }
            }
            Ok(())
        }
        (None, Mode::File) => {
            let parent = dest.parent().unwrap_or(task_dir);
            let real_parent = inside(task_dir, parent)?;
            let name = dest.file_name().ok_or_else(|| format!("{} has no file name", dest.display()))?;
            std::fs::rename(tmp, real_parent.join(name)).map_err(|e| format!("moving into {}: {e}", dest.display()))
        }
        (None, _) => {
            let dir = inside(task_dir, dest)?;
            let target = dir.join(artifact::file_name(source));
            std::fs::rename(tmp, &target).map_err(|e| format!("moving into {}: {e}", target.display()))
        }
    }
}
