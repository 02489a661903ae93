//! Artifacts uploaded through the server (`/api/2.0/mlflow-artifacts/artifacts/<path>`):
//! content-addressed blobs on this server's disk, `<data dir>/artifacts/blobs/<sha256>`, and a
//! tree of small pointer files, `<data dir>/artifacts/paths/<path>`, each holding the blob's
//! hash and size. Identical uploads share one blob.
//!
//! Not replicated yet: a blob lives on the server that received it (issue 17 §2 wants a quorum
//! of servers before the upload is acknowledged); blobs of deleted runs are not collected yet.

use std::io;
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The largest artifact accepted in one upload.
pub const MAX_ARTIFACT_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// The longest artifact path, and the longest segment of one.
pub const MAX_PATH_CHARS: usize = 4096;
pub const MAX_SEGMENT_BYTES: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("invalid artifact path {0:?}: {1}")]
    BadPath(String, &'static str),
    #[error("artifact {0:?} not found")]
    NotFound(String),
    #[error("artifact {0:?} conflicts with an existing {1}")]
    Conflict(String, &'static str),
    #[error("the artifact is larger than {MAX_ARTIFACT_BYTES} bytes")]
    TooLarge,
    #[error("reading the upload failed: {0}")]
    Upload(String),
    #[error("artifact store i/o: {0}")]
    Io(#[from] io::Error),
}

/// A pointer file's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pointer {
    pub sha256: String,
    pub size: u64,
}

/// One entry of a listing, as MLflow's `FileInfo` (`path` is the entry's name in the listed
/// directory).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileInfo {
    pub path: String,
    pub is_dir: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
}

pub struct ArtifactStore {
    root: PathBuf,
}

/// Checks a relative artifact path and returns its segments: no empty, `.` or `..` segments,
/// no backslashes or NULs.
pub fn clean_path(path: &str) -> Result<Vec<&str>, ArtifactError> {
    let bad = |why| Err(ArtifactError::BadPath(path.chars().take(200).collect(), why));
    if path.chars().count() > MAX_PATH_CHARS {
        return bad("too long");
    }
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for seg in trimmed.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, '.' and '..' segments are not allowed");
        }
        if seg.len() > MAX_SEGMENT_BYTES {
            return bad("a segment is longer than 255 bytes");
        }
        if seg.contains(['\\', '\0']) || seg.chars().any(char::is_control) {
            return bad("backslashes and control characters are not allowed");
        }
        out.push(seg);
    }
    Ok(out)
}

impl ArtifactStore {
    pub fn new(root: PathBuf) -> Self {
        ArtifactStore { root }
    }

    fn paths_dir(&self) -> PathBuf {
        self.root.join("paths")
    }

    fn pointer_path(&self, segs: &[&str]) -> PathBuf {
        let mut p = self.paths_dir();
        p.extend(segs);
        p
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        self.root.join("blobs").join(&sha[..2.min(sha.len())]).join(sha)
    }

    /// Stores `body` at `path`, replacing what was there. Nothing is visible at `path` until the
    /// whole body arrived and is on disk.
    pub async fn put<S, E>(&self, path: &str, mut body: S) -> Result<Pointer, ArtifactError>
    where
        S: Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let segs = clean_path(path)?;
        if segs.is_empty() {
            return Err(ArtifactError::BadPath(path.into(), "names no file"));
        }
        let pointer_path = self.pointer_path(&segs);
        if tokio::fs::metadata(&pointer_path).await.is_ok_and(|m| m.is_dir()) {
            return Err(ArtifactError::Conflict(path.into(), "directory"));
        }
        // A parent that is a file would make the path both.
        let mut parent = self.paths_dir();
        for seg in &segs[..segs.len() - 1] {
            parent.push(seg);
            if tokio::fs::metadata(&parent).await.is_ok_and(|m| m.is_file()) {
                return Err(ArtifactError::Conflict(path.into(), "file"));
            }
        }
        let tmp_dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir).await?;
        let tmp = tmp_dir.join(uuid::Uuid::new_v4().simple().to_string());
        let result = self.receive(&tmp, &mut body).await;
        let (sha, size) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let blob = self.blob_path(&sha);
        if let Some(dir) = blob.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        if tokio::fs::metadata(&blob).await.is_ok() {
            let _ = tokio::fs::remove_file(&tmp).await;
        } else {
            tokio::fs::rename(&tmp, &blob).await?;
        }
        let pointer = Pointer { sha256: sha, size };
        let text = serde_json::to_vec(&pointer).map_err(|e| ArtifactError::Io(io::Error::other(e)))?;
        if let Some(dir) = pointer_path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = tmp_dir.join(uuid::Uuid::new_v4().simple().to_string());
        tokio::fs::write(&tmp, &text).await?;
        tokio::fs::rename(&tmp, &pointer_path).await?;
        Ok(pointer)
    }

    async fn receive<S, E>(&self, tmp: &Path, body: &mut S) -> Result<(String, u64), ArtifactError>
    where
        S: Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut file = tokio::fs::File::create(tmp).await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ArtifactError::Upload(e.to_string()))?;
            size += chunk.len() as u64;
            if size > MAX_ARTIFACT_BYTES {
                return Err(ArtifactError::TooLarge);
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok((sha, size))
    }

    /// The blob file behind `path`, with its size.
    pub async fn open(&self, path: &str) -> Result<(tokio::fs::File, u64), ArtifactError> {
        let segs = clean_path(path)?;
        let pointer_path = self.pointer_path(&segs);
        let meta = tokio::fs::metadata(&pointer_path).await.map_err(|_| ArtifactError::NotFound(path.into()))?;
        if segs.is_empty() || !meta.is_file() {
            return Err(ArtifactError::NotFound(path.into()));
        }
        let text = tokio::fs::read(&pointer_path).await?;
        let pointer: Pointer = serde_json::from_slice(&text).map_err(|e| ArtifactError::Io(io::Error::other(e)))?;
        let file = tokio::fs::File::open(self.blob_path(&pointer.sha256)).await?;
        Ok((file, pointer.size))
    }

    /// The entries directly under `path` (none when it is absent or a file), sorted by name.
    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>, ArtifactError> {
        let segs = clean_path(path)?;
        let dir = self.pointer_path(&segs);
        let mut rd = match tokio::fs::read_dir(&dir).await {
            Ok(rd) => rd,
            Err(_) => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        while let Some(entry) = rd.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ft = entry.file_type().await?;
            if ft.is_dir() {
                out.push(FileInfo { path: name, is_dir: true, file_size: None });
            } else if ft.is_file() {
                let size =
                    tokio::fs::read(entry.path()).await.ok().and_then(|t| serde_json::from_slice::<Pointer>(&t).ok()).map(|p| p.size);
                out.push(FileInfo { path: name, is_dir: false, file_size: size });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Removes `path` (a file or a whole directory) from the tree; blobs stay (no GC yet).
    pub async fn delete(&self, path: &str) -> Result<(), ArtifactError> {
        let segs = clean_path(path)?;
        if segs.is_empty() {
            return Err(ArtifactError::BadPath(path.into(), "names no file"));
        }
        let p = self.pointer_path(&segs);
        match tokio::fs::metadata(&p).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&p).await?,
            Ok(_) => tokio::fs::remove_file(&p).await?,
            Err(_) => return Err(ArtifactError::NotFound(path.into())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<axum::body::Bytes, std::convert::Infallible>> + Unpin {
        futures::stream::iter(parts.iter().map(|p| Ok(axum::body::Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[test]
    fn tracking_artifact_paths_are_checked() {
        assert_eq!(clean_path("/a/b.txt/").expect("ok"), vec!["a", "b.txt"]);
        assert!(clean_path("").expect("root").is_empty());
        for bad in ["a/../b", "a//b", "./a", "a\\b", "a/\0"] {
            assert!(clean_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn tracking_artifacts_are_content_addressed() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::new(dir.path().to_path_buf());
        let p1 = store.put("0/r/artifacts/a.txt", body(&[b"hel", b"lo"])).await.expect("put");
        let p2 = store.put("0/r/artifacts/sub/b.txt", body(&[b"hello"])).await.expect("put");
        assert_eq!(p1, p2, "same bytes, same blob");
        assert_eq!(p1.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        let blobs = std::fs::read_dir(dir.path().join("blobs").join("2c")).expect("blobs").count();
        assert_eq!(blobs, 1);
        let (mut f, size) = store.open("0/r/artifacts/sub/b.txt").await.expect("open");
        let mut s = String::new();
        f.read_to_string(&mut s).await.expect("read");
        assert_eq!((s.as_str(), size), ("hello", 5));
        let list = store.list("0/r/artifacts").await.expect("list");
        assert_eq!(
            list,
            vec![
                FileInfo { path: "a.txt".into(), is_dir: false, file_size: Some(5) },
                FileInfo { path: "sub".into(), is_dir: true, file_size: None }
            ]
        );
        assert!(store.list("nothing/here").await.expect("absent").is_empty());
        assert!(matches!(store.open("0/r/artifacts/sub").await, Err(ArtifactError::NotFound(_))));
        assert!(matches!(store.put("0/r/artifacts/a.txt/x", body(&[b"x"])).await, Err(ArtifactError::Conflict(..))));
        assert!(matches!(store.put("0/r/artifacts/sub", body(&[b"x"])).await, Err(ArtifactError::Conflict(..))));
    }
}
