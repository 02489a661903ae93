//! Artifacts uploaded through the server (`/api/2.0/mlflow-artifacts/artifacts/<path>`, issue
//! 17 §2): content-addressed blobs plus a replicated index.
//!
//! * [`ArtifactIndex`]: path → (sha256, size), part of the replicated tracking state
//!   (`TrackingState::artifacts`, changed by `TrackingCommand::PutArtifact` /
//!   `DeleteArtifacts` through Raft), so every server lists and finds every artifact.
//! * Blobs, by sha256, in one of two stores ([`BlobBackend`]):
//!   - `Disk` (the default): `<data dir>/artifacts/blobs/<sha[..2]>/<sha>` on the servers. The
//!     server that receives an upload streams it to a temporary file (hashed, fsync'd), pushes
//!     it to the other voters over `RaftService.PutBlob`, and commits the index entry only once
//!     a majority of voters (itself included) hold the blob. A download on a server that lacks
//!     the blob fetches it from a peer (`RaftService.GetBlob`) and keeps it.
//!   - `S3`: an S3-compatible bucket (`object_store`), key `<prefix>/<sha256>`; the servers'
//!     disks only stage uploads while they are hashed.
//! * GC ([`ArtifactService::gc_once`]): a blob no index entry names and older than the grace
//!   period is deleted, by every server on its own disk, and by the leader in the bucket; each
//!   sweep first waits for a linearizable read, so that a server that restarted and has not
//!   re-applied its log yet takes nothing for unreferenced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use mlp_proto::v1::raft_service_client::RaftServiceClient;
use mlp_proto::v1::{BlobChunk, GetBlobRequest, PutBlobResponse};
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use super::TrackingError;
use crate::raft::node::RaftNode;
use crate::state::StateHandle;

/// The default largest artifact accepted in one upload (`--artifact-max-mib`).
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// The longest artifact path, and the longest segment of one.
pub const MAX_PATH_CHARS: usize = 4096;
pub const MAX_SEGMENT_BYTES: usize = 255;
/// Bytes per `BlobChunk` and per read of a blob file.
const CHUNK_BYTES: usize = 256 * 1024;
/// Largest `BlobChunk.data` a receiver accepts.
const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// gRPC messages of the blob RPCs (a chunk plus framing).
pub const MAX_BLOB_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// Objects at most this large go to S3 in one PUT; larger ones as multipart uploads of parts
/// this large.
const S3_PART_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("invalid artifact path {0:?}: {1}")]
    BadPath(String, &'static str),
    #[error("artifact {0:?} not found")]
    NotFound(String),
    #[error("Workspace '{0}' does not exist")]
    NoWorkspace(String),
    #[error("artifact {0:?} conflicts with an existing {1}")]
    Conflict(String, &'static str),
    #[error("the artifact is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("reading the upload failed: {0}")]
    Upload(String),
    #[error("only {have} of the {need} servers needed hold the artifact: {why}")]
    NoQuorum { have: usize, need: usize, why: String },
    #[error("blob {0} is on no reachable server")]
    BlobMissing(String),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("artifact store i/o: {0}")]
    Io(#[from] io::Error),
}

impl From<ArtifactError> for TrackingError {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::NotFound(_) => TrackingError::not_found(e.to_string()),
            ArtifactError::NoWorkspace(ns) => TrackingError::no_workspace(&ns),
            ArtifactError::BadPath(..) | ArtifactError::Conflict(..) | ArtifactError::TooLarge(_) | ArtifactError::Upload(_) => {
                TrackingError::invalid(e.to_string())
            }
            ArtifactError::NoQuorum { .. } | ArtifactError::BlobMissing(_) => {
                tracing::warn!(error = %e, "artifact store unavailable");
                TrackingError::new(super::ErrorCode::TemporarilyUnavailable, e.to_string())
            }
            ArtifactError::ObjectStore(_) | ArtifactError::Io(_) => {
                tracing::warn!(error = %e, "artifact store failed");
                TrackingError::internal(e.to_string())
            }
        }
    }
}

/// Where one artifact's bytes are.
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

/// Checks a relative artifact path and returns its segments: no empty, `.` or `..` segments,
/// no backslashes or control characters, bounded length.
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

/// The index key of `path`: its clean segments joined by `/`.
fn key_of(path: &str) -> Result<String, ArtifactError> {
    Ok(clean_path(path)?.join("/"))
}

/// Whether `s` is a sha256 in lowercase hex (the only blob names accepted from anywhere).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The replicated path → blob map (`TrackingState::artifacts`). Keys are clean paths (see
/// [`clean_path`]) without leading or trailing `/`; a path is a file or a directory, never both.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ArtifactIndex {
    pub files: BTreeMap<String, Pointer>,
}

impl ArtifactIndex {
    /// The entries under directory `key` (`""`: all), in key order.
    fn under<'a>(&'a self, key: &str) -> impl Iterator<Item = (&'a String, &'a Pointer)> + 'a {
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        self.files.range(prefix.clone()..).take_while(move |(k, _)| k.starts_with(&prefix))
    }

    /// Whether a file may be stored at `path`: `Ok(key)`, or why not (the path is a directory,
    /// or one of its parents is a file).
    pub fn check_put(&self, path: &str) -> Result<String, ArtifactError> {
        let segs = clean_path(path)?;
        if segs.is_empty() {
            return Err(ArtifactError::BadPath(path.into(), "names no file"));
        }
        let key = segs.join("/");
        if self.under(&key).next().is_some() {
            return Err(ArtifactError::Conflict(path.into(), "directory"));
        }
        for i in 1..segs.len() {
            if self.files.contains_key(&segs[..i].join("/")) {
                return Err(ArtifactError::Conflict(path.into(), "file"));
            }
        }
        Ok(key)
    }

    /// `PutArtifact`'s apply: `path` names blob `sha256` of `size` bytes from now on.
    pub fn apply_put(&mut self, path: &str, sha256: &str, size: u64) -> Result<(), TrackingError> {
        if !is_sha256(sha256) {
            return Err(TrackingError::invalid(format!("invalid blob name {sha256:?}")));
        }
        let key = self.check_put(path)?;
        self.files.insert(key, Pointer { sha256: sha256.into(), size });
        Ok(())
    }

    /// `DeleteArtifacts`' apply: removes the file at `path` or everything under it.
    pub fn apply_delete(&mut self, path: &str) -> Result<(), TrackingError> {
        let key = key_of(path)?;
        if key.is_empty() {
            return Err(ArtifactError::BadPath(path.into(), "names no file").into());
        }
        if self.files.remove(&key).is_none() && self.remove_prefix(&key) == 0 {
            return Err(ArtifactError::NotFound(path.into()).into());
        }
        Ok(())
    }

    /// The blob at `path`, if `path` names a file.
    pub fn get(&self, path: &str) -> Result<&Pointer, ArtifactError> {
        let key = key_of(path)?;
        self.files.get(&key).ok_or_else(|| ArtifactError::NotFound(path.into()))
    }

    /// The entries directly under `path` (none when it is absent or a file), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<FileInfo>, ArtifactError> {
        let key = key_of(path)?;
        let prefix = if key.is_empty() { String::new() } else { format!("{key}/") };
        let mut out: BTreeMap<&str, FileInfo> = BTreeMap::new();
        let mut from = prefix.clone();
        // Each directory costs one range lookup, not one step per file under it: after a
        // directory `d`, go on from `d0` (`'0'` is the character after `'/'`).
        while let Some((k, p)) = self.files.range(from.clone()..).next() {
            let Some(rest) = k.strip_prefix(&prefix) else { break };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    out.insert(dir, FileInfo { path: dir.into(), is_dir: true, file_size: None });
                    from = format!("{prefix}{dir}0");
                }
                None => {
                    out.insert(rest, FileInfo { path: rest.into(), is_dir: false, file_size: Some(p.size) });
                    from = format!("{k}\0");
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// Removes every entry under directory `path`; answers how many went.
    pub fn remove_prefix(&mut self, path: &str) -> usize {
        let Ok(key) = key_of(path) else { return 0 };
        if key.is_empty() {
            return 0;
        }
        let gone: Vec<String> = self.under(&key).map(|(k, _)| k.clone()).collect();
        for k in &gone {
            self.files.remove(k);
        }
        gone.len()
    }

    /// For a purged run or experiment: removes every artifact under its artifact location
    /// (`mlflow-artifacts:/<experiment>/<run>/artifacts`, or `mlflow-artifacts:/<experiment>`)
    /// and answers how many went. Locations outside mlp's own store remove nothing. The blobs
    /// themselves go with the next GC sweep.
    pub fn remove_run(&mut self, artifact_uri: &str) -> usize {
        match path_of_uri(artifact_uri) {
            Some(p) => {
                let n = self.remove_prefix(p);
                n + usize::from(self.files.remove(p.trim_matches('/')).is_some())
            }
            None => 0,
        }
    }

    /// Every blob some entry names.
    pub fn referenced(&self) -> HashSet<&str> {
        self.files.values().map(|p| p.sha256.as_str()).collect()
    }
}

/// The artifact path of a `mlflow-artifacts:` URI (`mlflow-artifacts:/1/r/artifacts`,
/// `mlflow-artifacts://host:port/1/r/artifacts`): `1/r/artifacts`.
pub fn path_of_uri(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let rest = match rest.strip_prefix("//") {
        Some(authority_and_path) => authority_and_path.split_once('/').map(|(_, p)| p).unwrap_or(""),
        None => rest,
    };
    let p = rest.trim_matches('/');
    (!p.is_empty()).then_some(p)
}

/// Where the blobs live (`--artifact-store`).
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// On the servers' disks, on a quorum of voters.
    #[default]
    Disk,
    /// In an S3-compatible bucket.
    S3(S3Config),
}

/// `--artifact-store s3://bucket/prefix` with `--s3-endpoint` / `--s3-region`; credentials
/// from AWS's usual variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
#[derive(Clone, Debug)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl StoreConfig {
    /// Parses `--artifact-store`: `disk` or `s3://bucket[/prefix]`.
    pub fn parse(s: &str, endpoint: Option<String>, region: Option<String>) -> Result<StoreConfig, String> {
        if s == "disk" || s.is_empty() {
            return Ok(StoreConfig::Disk);
        }
        let Some(rest) = s.strip_prefix("s3://") else {
            return Err(format!("--artifact-store {s:?}: expected `disk` or `s3://bucket/prefix`"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!("--artifact-store {s:?}: {bucket:?} is not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && clean_path(prefix).is_err() {
            return Err(format!("--artifact-store {s:?}: invalid prefix"));
        }
        Ok(StoreConfig::S3(S3Config { bucket: bucket.into(), prefix: prefix.into(), endpoint, region }))
    }
}

/// The artifact settings of a server (`ServerConfig::artifacts`).
#[derive(Clone, Debug)]
pub struct ArtifactSettings {
    pub store: StoreConfig,
    /// The largest artifact accepted (`--artifact-max-mib`).
    pub max_bytes: u64,
    /// How old an unreferenced blob must be before GC deletes it (`--artifact-gc-grace`): an
    /// upload's blob exists before its index entry commits.
    pub gc_grace: Duration,
}

impl Default for ArtifactSettings {
    fn default() -> Self {
        ArtifactSettings { store: StoreConfig::Disk, max_bytes: DEFAULT_MAX_ARTIFACT_BYTES, gc_grace: Duration::from_secs(3600) }
    }
}

impl ArtifactSettings {
    /// Between GC sweeps: half the grace period, between 1 s and a minute.
    pub fn gc_interval(&self) -> Duration {
        (self.gc_grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// How long one blob transfer to or from a peer may take: 30 s plus 1 s per 4 MiB.
fn transfer_timeout(size: u64) -> Duration {
    Duration::from_secs(30 + size / (4 * 1024 * 1024))
}

/// The opened blob store.
enum BlobBackend {
    Disk,
    S3 { store: Arc<dyn ObjectStore>, prefix: String },
}

/// A blob received into a temporary file, hashed and fsync'd.
struct Staged {
    tmp: PathBuf,
    sha256: String,
    size: u64,
}

/// Blobs, their transfers between servers, and GC; shared by the REST handlers and the
/// `RaftService` blob RPCs.
pub struct ArtifactService {
    root: PathBuf,
    backend: BlobBackend,
    settings: ArtifactSettings,
    raft: Arc<RaftNode>,
    state: Arc<StateHandle>,
    peers: std::sync::Mutex<HashMap<String, RaftServiceClient<Channel>>>,
}

impl ArtifactService {
    /// Opens the store under `root` (`<data dir>/artifacts`); with S3, builds the client (no
    /// request is made yet).
    pub fn new(root: PathBuf, settings: ArtifactSettings, raft: Arc<RaftNode>, state: Arc<StateHandle>) -> Result<Self, ArtifactError> {
        let backend = match &settings.store {
            StoreConfig::Disk => BlobBackend::Disk,
            StoreConfig::S3(c) => {
                // reqwest over rustls needs a process-wide crypto provider: ring, as everywhere
                // in mlp (an error means one is installed already); ring lacks only the
                // post-quantum key exchange, hence the deprecation.
                #[allow(deprecated)]
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&c.bucket);
                if let Some(region) = &c.region {
                    b = b.with_region(region);
                }
                if let Some(endpoint) = &c.endpoint {
                    b = b.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                BlobBackend::S3 { store: Arc::new(b.build()?), prefix: c.prefix.clone() }
            }
        };
        Ok(ArtifactService { root, backend, settings, raft, state, peers: Default::default() })
    }

    pub fn settings(&self) -> &ArtifactSettings {
        &self.settings
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        self.root.join("blobs").join(&sha[..2]).join(sha)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn s3_key(prefix: &str, sha: &str) -> object_store::path::Path {
        if prefix.is_empty() {
            object_store::path::Path::from(sha)
        } else {
            object_store::path::Path::from(format!("{prefix}/{sha}"))
        }
    }

    /// Streams `body` into a temporary file, hashing it; at most `max_bytes`. When `expect` is
    /// given (a peer's push), the bytes must be exactly that size and hash.
    async fn receive<S, E>(&self, body: &mut S, expect: Option<(&str, u64)>) -> Result<Staged, ArtifactError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dir = self.tmp_dir();
        tokio::fs::create_dir_all(&dir).await?;
        let tmp = dir.join(uuid::Uuid::new_v4().simple().to_string());
        let result = async {
            // Batched: an HTTP body arrives in frames of a few KiB, each write a blocking-pool trip.
            let mut file = tokio::io::BufWriter::with_capacity(1024 * 1024, tokio::fs::File::create(&tmp).await?);
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            let limit = expect.map_or(self.settings.max_bytes, |(_, n)| n);
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactError::Upload(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(match expect {
                        Some(_) => ArtifactError::Upload("more bytes than announced".into()),
                        None => ArtifactError::TooLarge(self.settings.max_bytes),
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            file.flush().await?;
            file.get_mut().sync_all().await?;
            let sha256: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if let Some((want, n)) = expect {
                if size != n || sha256 != want {
                    return Err(ArtifactError::Upload(format!("got {size} bytes hashing to {sha256}, expected {n} bytes of {want}")));
                }
            }
            Ok(Staged { tmp: tmp.clone(), sha256, size })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Moves a staged file to its place among the disk blobs (a blob already there stays).
    async fn install(&self, staged: &Staged) -> Result<(), ArtifactError> {
        let blob = self.blob_path(&staged.sha256);
        if let Some(dir) = blob.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        if tokio::fs::metadata(&blob).await.is_ok() {
            let _ = tokio::fs::remove_file(&staged.tmp).await;
            // Refresh its age so that a GC sweep racing this upload keeps it.
            let _ = std::fs::File::open(&blob).and_then(|f| f.set_modified(SystemTime::now()));
        } else {
            tokio::fs::rename(&staged.tmp, &blob).await?;
            if let Some(dir) = blob.parent() {
                if let Ok(d) = tokio::fs::File::open(dir).await {
                    let _ = d.sync_all().await;
                }
            }
        }
        Ok(())
    }

    /// An upload's blob, stored durably before its index entry may commit: on a majority of
    /// the voters (disk) or in the bucket (S3). `path` is checked against the index first so
    /// that a conflicting upload fails before its bytes travel. `namespace`: the MLflow
    /// workspace whose index names it (blobs themselves are shared by content).
    pub async fn store<S, E>(&self, namespace: &str, path: &str, mut body: S) -> Result<Pointer, ArtifactError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        match self.state.read().tracking_in(namespace) {
            Some(t) => t.artifacts.check_put(path)?,
            None => return Err(ArtifactError::NoWorkspace(namespace.to_string())),
        };
        let staged = self.receive(&mut body, None).await?;
        let pointer = Pointer { sha256: staged.sha256.clone(), size: staged.size };
        match &self.backend {
            BlobBackend::Disk => {
                self.install(&staged).await?;
                self.replicate(&pointer).await?;
            }
            BlobBackend::S3 { store, prefix } => {
                let r = self.s3_put(store.as_ref(), &Self::s3_key(prefix, &staged.sha256), &staged).await;
                let _ = tokio::fs::remove_file(&staged.tmp).await;
                r?;
            }
        }
        Ok(pointer)
    }

    async fn s3_put(&self, store: &dyn ObjectStore, key: &object_store::path::Path, staged: &Staged) -> Result<(), ArtifactError> {
        if store.head(key).await.is_ok() {
            return Ok(());
        }
        let mut file = tokio::fs::File::open(&staged.tmp).await?;
        if staged.size <= S3_PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(staged.size as usize);
            file.read_to_end(&mut buf).await?;
            store.put(key, buf.into()).await?;
            return Ok(());
        }
        let upload = store.put_multipart(key).await?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, S3_PART_BYTES);
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            // At most two parts in flight: bounded memory whatever the object's size.
            if let Err(e) = w.wait_for_capacity(2).await {
                return Err(e.into());
            }
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]);
        }
        w.finish().await?;
        Ok(())
    }

    /// The voters (id, address) and this server's id.
    fn voters(&self) -> Vec<(u64, String)> {
        let rx = self.raft.raft.metrics();
        let m = rx.borrow();
        let membership = m.membership_config.membership();
        membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone()))).collect()
    }

    /// Every other member (voters and learners), for fetching.
    fn other_members(&self) -> Vec<String> {
        let rx = self.raft.raft.metrics();
        let m = rx.borrow();
        m.membership_config.membership().nodes().filter(|(id, _)| **id != self.raft.node_id).map(|(_, n)| n.addr.clone()).collect()
    }

    fn peer(&self, addr: &str) -> Result<RaftServiceClient<Channel>, ArtifactError> {
        let mut map = self.peers.lock().map_err(|_| ArtifactError::Io(io::Error::other("peer cache poisoned")))?;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let tls = self.raft.peers.tls();
        let endpoint = Endpoint::from_shared(mlp_tls::net::uri_for(addr, tls.is_some()))
            .map_err(|e| ArtifactError::Io(io::Error::other(format!("invalid server address {addr:?}: {e}"))))?
            .connect_timeout(Duration::from_secs(5));
        let client = RaftServiceClient::new(mlp_tls::net::channel_lazy(endpoint, tls, mlp_tls::Role::Server))
            .max_decoding_message_size(MAX_BLOB_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_BLOB_MESSAGE_BYTES);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Pushes a local blob to the other voters until a majority of all voters (this server
    /// included, when it votes) hold it. Pushes still running then go on in the background.
    async fn replicate(&self, p: &Pointer) -> Result<(), ArtifactError> {
        let voters = self.voters();
        let need = voters.len() / 2 + 1;
        let mut have = usize::from(voters.iter().any(|(id, _)| *id == self.raft.node_id));
        if have >= need {
            return Ok(());
        }
        let mut pushes = tokio::task::JoinSet::new();
        for (id, addr) in voters.into_iter().filter(|(id, _)| *id != self.raft.node_id) {
            let client = self.peer(&addr);
            let (file, p) = (self.blob_path(&p.sha256), p.clone());
            pushes.spawn(async move {
                let r = match client {
                    Ok(c) => tokio::time::timeout(transfer_timeout(p.size), push(c, file, p))
                        .await
                        .unwrap_or_else(|_| Err("timed out".to_string())),
                    Err(e) => Err(e.to_string()),
                };
                (id, addr, r)
            });
        }
        let mut why = Vec::new();
        while let Some(joined) = pushes.join_next().await {
            match joined {
                Ok((_, _, Ok(()))) => {
                    have += 1;
                    if have >= need {
                        pushes.detach_all();
                        return Ok(());
                    }
                }
                Ok((id, addr, Err(e))) => {
                    tracing::warn!(peer = id, addr, sha256 = p.sha256, error = e, "pushing an artifact blob failed");
                    why.push(format!("{addr}: {e}"));
                }
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(ArtifactError::NoQuorum { have, need, why: why.join("; ") })
    }

    /// The bytes of the blob behind `p`: a stream and its size. A disk blob missing here is
    /// fetched from a peer first (and kept).
    pub async fn open(&self, p: &Pointer) -> Result<futures::stream::BoxStream<'static, io::Result<bytes::Bytes>>, ArtifactError> {
        if !is_sha256(&p.sha256) {
            return Err(ArtifactError::BlobMissing(p.sha256.clone()));
        }
        match &self.backend {
            BlobBackend::Disk => {
                let path = self.blob_path(&p.sha256);
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.fetch(p).await?;
                        tokio::fs::File::open(&path).await?
                    }
                    Err(e) => return Err(e.into()),
                };
                Ok(file_stream(file).boxed())
            }
            BlobBackend::S3 { store, prefix } => {
                let r = store.get(&Self::s3_key(prefix, &p.sha256)).await?;
                Ok(r.into_stream().map(|c| c.map_err(io::Error::other)).boxed())
            }
        }
    }

    /// Copies blob `p` from the first peer that has it.
    async fn fetch(&self, p: &Pointer) -> Result<(), ArtifactError> {
        for addr in self.other_members() {
            let Ok(mut client) = self.peer(&addr) else { continue };
            let attempt = async {
                let stream = client
                    .get_blob(GetBlobRequest { sha256: p.sha256.clone() })
                    .await
                    .map_err(|s| ArtifactError::Upload(s.message().to_string()))?
                    .into_inner();
                let mut data = stream.map(|c| c.map(|c| bytes::Bytes::from(c.data)).map_err(|s| s.message().to_string()));
                let staged = self.receive(&mut data, Some((&p.sha256, p.size))).await?;
                self.install(&staged).await
            };
            match tokio::time::timeout(transfer_timeout(p.size), attempt).await {
                Ok(Ok(())) => {
                    tracing::info!(peer = addr, sha256 = p.sha256, size = p.size, "fetched an artifact blob from a peer");
                    return Ok(());
                }
                Ok(Err(e)) => tracing::debug!(peer = addr, sha256 = p.sha256, error = %e, "fetching an artifact blob failed"),
                Err(_) => tracing::warn!(peer = addr, sha256 = p.sha256, "fetching an artifact blob timed out"),
            }
        }
        Err(ArtifactError::BlobMissing(p.sha256.clone()))
    }

    // ---- the RaftService blob RPCs (server side) ----

    /// `PutBlob`: a peer's push. The first chunk names the blob; a blob already here is
    /// acknowledged without reading the rest.
    // `tonic::Status` is what the generated service trait returns; boxing it buys nothing.
    #[allow(clippy::result_large_err)]
    pub async fn receive_push(&self, mut chunks: tonic::Streaming<BlobChunk>) -> Result<PutBlobResponse, tonic::Status> {
        if !matches!(self.backend, BlobBackend::Disk) {
            return Err(tonic::Status::failed_precondition("this server keeps artifact blobs in an object store"));
        }
        let first = chunks.message().await?.ok_or_else(|| tonic::Status::invalid_argument("empty blob stream"))?;
        let (sha, size) = (first.sha256.clone(), first.size);
        if !is_sha256(&sha) {
            return Err(tonic::Status::invalid_argument("the first chunk must name the blob by its sha256"));
        }
        if size > self.settings.max_bytes {
            return Err(tonic::Status::invalid_argument(format!("blob of {size} bytes exceeds the limit of {}", self.settings.max_bytes)));
        }
        if tokio::fs::metadata(self.blob_path(&sha)).await.is_ok() {
            return Ok(PutBlobResponse { already_had: true });
        }
        let rest = chunks.map(|c| {
            let c = c?;
            if c.data.len() > MAX_CHUNK_BYTES {
                return Err(tonic::Status::invalid_argument("chunk too large"));
            }
            Ok(bytes::Bytes::from(c.data))
        });
        let mut data = futures::stream::iter([Ok::<_, tonic::Status>(bytes::Bytes::from(first.data))]).chain(rest);
        let staged = self.receive(&mut data, Some((&sha, size))).await.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.install(&staged).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
        tracing::debug!(sha256 = sha, size, "stored an artifact blob pushed by a peer");
        Ok(PutBlobResponse { already_had: false })
    }

    /// `GetBlob`: a local blob, in chunks (the first names it).
    #[allow(clippy::result_large_err)]
    pub async fn serve_blob(
        &self,
        req: GetBlobRequest,
    ) -> Result<futures::stream::BoxStream<'static, Result<BlobChunk, tonic::Status>>, tonic::Status> {
        if !is_sha256(&req.sha256) {
            return Err(tonic::Status::invalid_argument("not a sha256"));
        }
        let path = self.blob_path(&req.sha256);
        let file = tokio::fs::File::open(&path).await.map_err(|_| tonic::Status::not_found("no such blob here"))?;
        let size = file.metadata().await.map_err(|e| tonic::Status::internal(e.to_string()))?.len();
        let sha = req.sha256;
        let head = futures::stream::iter([Ok(BlobChunk { sha256: sha, size, data: Vec::new() })]);
        let body = file_stream(file).map(|r| match r {
            Ok(b) => Ok(BlobChunk { sha256: String::new(), size: 0, data: b.to_vec() }),
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        });
        Ok(head.chain(body).boxed())
    }

    // ---- artifacts of older versions ----

    /// Imports what an mlp from before the replicated index stored on this server alone
    /// (pointer files under `<root>/paths/`, blobs in the same `blobs/` layout): each blob is
    /// pushed to a quorum and its entry committed (unless the path is taken already), then the
    /// pointer file goes. Retries while there is no leader or quorum; answers how many
    /// artifacts were imported.
    pub async fn import_legacy(&self) -> usize {
        let paths = self.root.join("paths");
        if tokio::fs::metadata(&paths).await.is_err() {
            return 0;
        }
        let (mut imported, mut left) = (0, 0);
        let mut stack = vec![paths.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(mut rd) = tokio::fs::read_dir(&dir).await else { continue };
            while let Ok(Some(e)) = rd.next_entry().await {
                let Ok(ft) = e.file_type().await else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                let Some(path) = e.path().strip_prefix(&paths).ok().and_then(|p| p.to_str()).map(str::to_string) else { continue };
                let Ok(text) = tokio::fs::read(e.path()).await else { continue };
                let Ok(p) = serde_json::from_slice::<Pointer>(&text) else { continue };
                if !is_sha256(&p.sha256) || tokio::fs::metadata(self.blob_path(&p.sha256)).await.is_err() {
                    tracing::warn!(path, "an older artifact's blob is missing: not imported");
                    continue;
                }
                let mut pause = Duration::from_millis(500);
                let mut done = false;
                for _ in 0..30 {
                    if self.state.read().tracking.artifacts.check_put(&path).is_err() {
                        done = true;
                        break;
                    }
                    let cmd = super::TrackingCommand::PutArtifact { path: path.clone(), sha256: p.sha256.clone(), size: p.size };
                    let req = crate::state::Request { now_ms: crate::leader::now_ms(), command: crate::state::Command::Tracking(cmd) };
                    let durable = match &self.backend {
                        BlobBackend::Disk => self.replicate(&p).await,
                        BlobBackend::S3 { store, prefix } => {
                            let staged = Staged { tmp: self.blob_path(&p.sha256), sha256: p.sha256.clone(), size: p.size };
                            self.s3_put(store.as_ref(), &Self::s3_key(prefix, &p.sha256), &staged).await
                        }
                    };
                    let r = match durable {
                        Ok(()) => self.raft.submit(req).await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match r {
                        Ok(()) => {
                            imported += 1;
                            done = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(path, error = e, "importing an older artifact: retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
                if done {
                    let _ = tokio::fs::remove_file(e.path()).await;
                } else {
                    left += 1;
                }
            }
        }
        if imported > 0 {
            tracing::info!(artifacts = imported, "imported artifacts stored by an older version into the replicated index");
        }
        if left == 0 {
            let _ = tokio::fs::remove_dir_all(&paths).await;
        } else {
            tracing::warn!(artifacts = left, "artifacts of an older version not imported yet (no quorum): retried at the next start");
        }
        imported
    }

    // ---- GC ----

    /// One sweep: deletes the blobs no index entry names that are older than the grace
    /// period (and stale temporary files): on this server's disk; in the bucket when this
    /// server leads. Answers how many blobs went.
    pub async fn gc_once(&self) -> Result<usize, ArtifactError> {
        // Only with a state as recent as the leader's commit index: a server that restarted and
        // has not re-applied its log yet (or lags) must not take its blobs for unreferenced.
        if let Err(e) = self.raft.linearizable_read().await {
            tracing::debug!(error = %e, "artifact GC skipped: the local state is not known to be current");
            return Ok(0);
        }
        let referenced: HashSet<String> = {
            let st = self.state.read();
            st.all_tracking().flat_map(|(_, t)| t.artifacts.referenced()).map(str::to_string).collect()
        };
        let grace = self.settings.gc_grace;
        let old = |t: SystemTime| SystemTime::now().duration_since(t).is_ok_and(|age| age >= grace);
        let mut removed = 0;
        match &self.backend {
            // Not while artifacts of an older version wait to be imported: their blobs are
            // named by no index entry yet.
            BlobBackend::Disk if tokio::fs::metadata(self.root.join("paths")).await.is_ok() => {}
            BlobBackend::Disk => {
                let root = self.root.join("blobs");
                let mut fans = match tokio::fs::read_dir(&root).await {
                    Ok(rd) => rd,
                    Err(_) => return Ok(0),
                };
                while let Some(fan) = fans.next_entry().await? {
                    let Ok(mut rd) = tokio::fs::read_dir(fan.path()).await else { continue };
                    while let Some(e) = rd.next_entry().await? {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if referenced.contains(&name) {
                            continue;
                        }
                        let Ok(meta) = e.metadata().await else { continue };
                        if meta.modified().is_ok_and(old) {
                            tokio::fs::remove_file(e.path()).await?;
                            tracing::debug!(sha256 = name, "artifact blob collected");
                            removed += 1;
                        }
                    }
                }
            }
            BlobBackend::S3 { store, prefix } => {
                if self.raft.is_leader() {
                    let base = (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix.as_str()));
                    let mut objects = store.list(base.as_ref());
                    while let Some(meta) = objects.next().await {
                        let meta = meta?;
                        let Some(name) = meta.location.filename() else { continue };
                        if !is_sha256(name) || referenced.contains(name) {
                            continue;
                        }
                        if old(meta.last_modified.into()) {
                            store.delete(&meta.location).await?;
                            tracing::debug!(sha256 = name, "artifact blob collected from the object store");
                            removed += 1;
                        }
                    }
                }
            }
        }
        if let Ok(mut rd) = tokio::fs::read_dir(self.tmp_dir()).await {
            while let Some(e) = rd.next_entry().await? {
                if e.metadata()
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .is_some_and(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age >= grace.max(Duration::from_secs(24 * 3600))))
                {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            }
        }
        Ok(removed)
    }

    /// Sweeps every [`ArtifactSettings::gc_interval`], forever.
    pub async fn gc_loop(self: Arc<Self>) {
        let every = self.settings.gc_interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.gc_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(blobs = n, "artifact GC removed unreferenced blobs"),
                Err(e) => tracing::warn!(error = %e, "artifact GC failed"),
            }
        }
    }
}

/// A file as a stream of chunks.
fn file_stream(file: tokio::fs::File) -> impl Stream<Item = io::Result<bytes::Bytes>> + Send + 'static {
    futures::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Pushes one local blob to a peer over `PutBlob`.
async fn push(mut client: RaftServiceClient<Channel>, file: PathBuf, p: Pointer) -> Result<(), String> {
    let f = tokio::fs::File::open(&file).await.map_err(|e| format!("opening {}: {e}", file.display()))?;
    let head = futures::stream::iter([BlobChunk { sha256: p.sha256.clone(), size: p.size, data: Vec::new() }]);
    // A read error ends the stream early; the receiver then refuses the short blob.
    let body = file_stream(f)
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| async move { r.ok().map(|b| BlobChunk { sha256: String::new(), size: 0, data: b.to_vec() }) });
    client.put_blob(head.chain(body)).await.map(|_| ()).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(sha: char, size: u64) -> (String, u64) {
        (sha.to_string().repeat(64), size)
    }

    #[test]
    fn tracking_artifact_paths_are_checked() {
        assert_eq!(clean_path("/a/b.txt/").expect("ok"), vec!["a", "b.txt"]);
        assert!(clean_path("").expect("root").is_empty());
        for bad in ["a/../b", "a//b", "./a", "a\\b", "a/\0"] {
            assert!(clean_path(bad).is_err(), "{bad}");
        }
        assert!(clean_path(&"a/".repeat(3000)).is_err());
        assert!(is_sha256(&"0a".repeat(32)));
        assert!(!is_sha256(&"0A".repeat(32)) && !is_sha256("../etc") && !is_sha256(&"0".repeat(63)));
    }

    #[test]
    fn tracking_artifact_index_lists_files_and_directories() {
        let mut ix = ArtifactIndex::default();
        let (a, n) = ptr('a', 5);
        ix.apply_put("0/r/artifacts/a.txt", &a, n).expect("put");
        ix.apply_put("0/r/artifacts/sub/b.txt", &a, n).expect("put");
        ix.apply_put("0/r/artifacts/sub/deeper/c.txt", &a, 7).expect("put");
        ix.apply_put("0/r/artifacts/sub0", &a, 1).expect("put");
        ix.apply_put("0/r/artifacts/sub-x/d", &a, 1).expect("put");
        let list = ix.list("0/r/artifacts").expect("list");
        assert_eq!(
            list,
            vec![
                FileInfo { path: "a.txt".into(), is_dir: false, file_size: Some(5) },
                FileInfo { path: "sub".into(), is_dir: true, file_size: None },
                FileInfo { path: "sub-x".into(), is_dir: true, file_size: None },
                FileInfo { path: "sub0".into(), is_dir: false, file_size: Some(1) },
            ]
        );
        assert_eq!(ix.list("/0/r/artifacts/sub/").expect("list").len(), 2);
        assert!(ix.list("nothing/here").expect("absent").is_empty());
        assert!(ix.list("0/r/artifacts/a.txt").expect("a file").is_empty());
        assert_eq!(ix.get("0/r/artifacts/sub/deeper/c.txt").expect("get").size, 7);
        assert!(matches!(ix.get("0/r/artifacts/sub"), Err(ArtifactError::NotFound(_))));
        // A path is a file or a directory, never both.
        assert!(ix.apply_put("0/r/artifacts/a.txt/x", &a, 1).is_err());
        assert!(ix.apply_put("0/r/artifacts/sub", &a, 1).is_err());
        assert!(ix.apply_put("0/r/../x", &a, 1).is_err());
        assert!(ix.apply_put("0/r/x", "nothex", 1).is_err());
        // Replacing a file is allowed.
        ix.apply_put("0/r/artifacts/a.txt", &ptr('b', 9).0, 9).expect("replace");
        assert_eq!(ix.referenced().len(), 2);
        ix.apply_delete("0/r/artifacts/sub").expect("delete a directory");
        assert!(ix.apply_delete("0/r/artifacts/sub").is_err());
        assert_eq!(ix.files.len(), 3);
    }

    #[test]
    fn tracking_artifact_index_remove_run_drops_its_tree() {
        let mut ix = ArtifactIndex::default();
        let (a, n) = ptr('c', 1);
        ix.apply_put("1/r1/artifacts/m/model.pkl", &a, n).expect("put");
        ix.apply_put("1/r1/artifacts/x", &a, n).expect("put");
        ix.apply_put("1/r10/artifacts/x", &a, n).expect("put");
        ix.apply_put("2/r2/artifacts/x", &a, n).expect("put");
        assert_eq!(ix.remove_run("mlflow-artifacts:/1/r1/artifacts"), 2);
        assert_eq!(ix.files.len(), 2, "r10 is another run");
        assert_eq!(ix.remove_run("s3://elsewhere/1"), 0);
        assert_eq!(ix.remove_run("mlflow-artifacts://host:1/1"), 1, "a whole experiment");
        assert_eq!(ix.files.keys().collect::<Vec<_>>(), vec!["2/r2/artifacts/x"]);
        assert_eq!(path_of_uri("mlflow-artifacts:/"), None);
    }

    #[test]
    fn tracking_artifact_commands_apply_through_the_tracking_state() {
        use super::super::points::PendingPoints;
        use super::super::{ErrorCode, TrackingCommand as C, TrackingState};
        let mut st = TrackingState::default();
        let put = C::PutArtifact { path: "0/r/artifacts/a".into(), sha256: "d".repeat(64), size: 3 };
        let wire = serde_json::to_string(&put).expect("encode");
        assert_eq!(serde_json::from_str::<C>(&wire).expect("decode"), put);
        st.apply(1, 1, &put, &mut PendingPoints::default()).expect("put");
        assert_eq!(st.artifacts.get("0/r/artifacts/a").expect("get").size, 3);
        let e = st
            .apply(
                2,
                2,
                &C::PutArtifact { path: "0/r/artifacts/a/b".into(), sha256: "d".repeat(64), size: 1 },
                &mut PendingPoints::default(),
            )
            .expect_err("conflict");
        assert_eq!(e.code, ErrorCode::InvalidParameterValue);
        let e = st.apply(3, 3, &C::DeleteArtifacts { path: "0/r/nothing".into() }, &mut PendingPoints::default()).expect_err("absent");
        assert_eq!(e.code, ErrorCode::ResourceDoesNotExist);
        st.apply(4, 4, &C::DeleteArtifacts { path: "0/r".into() }, &mut PendingPoints::default()).expect("delete a directory");
        assert!(st.artifacts.files.is_empty());
        // A snapshot from before the index loads with none.
        let mut v = serde_json::to_value(&st).expect("encode");
        v.as_object_mut().expect("object").remove("artifacts");
        assert_eq!(serde_json::from_value::<TrackingState>(v).expect("decode").artifacts, ArtifactIndex::default());
    }

    #[test]
    fn tracking_artifact_store_flag_parses() {
        assert!(matches!(StoreConfig::parse("disk", None, None), Ok(StoreConfig::Disk)));
        match StoreConfig::parse("s3://my-bucket/a/b/", Some("http://127.0.0.1:9".into()), None) {
            Ok(StoreConfig::S3(c)) => assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("my-bucket", "a/b")),
            other => panic!("{other:?}"),
        }
        for bad in ["s3://", "s3://UPPER", "gs://b", "s3://bucket/../x", "/tmp/x"] {
            assert!(StoreConfig::parse(bad, None, None).is_err(), "{bad}");
        }
    }
}
