//! Container images for the `oci` driver: pulled from a registry with `oci-client`, kept on the
//! node in a content-addressed store under `<data_dir>/oci/`, each layer unpacked once
//! ([`unpack`]) and shared by every image and task that uses it.
//!
//! Store layout:
//! ```text
//! oci/blobs/sha256/<hex>         a layer blob while it downloads (removed once unpacked)
//! oci/layers/<hex of diff_id>/   root/ (the unpacked layer, an overlay lower dir), size
//! oci/images/<hex of manifest>.json   the image's record: references, config, diff_ids, last use
//! oci/tmp/                       unpacks in progress (renamed into layers/ when verified)
//! ```
//!
//! Invariants: every blob (manifest, config, layer) is checked against its digest, and every
//! uncompressed layer against the config's `diff_ids`, before anything of it is used; a
//! reference pinned by digest whose manifest hashes otherwise is refused; a layer directory
//! exists under `layers/` only once it is complete and verified (unpacked under `tmp/`, then
//! renamed). Concurrent pulls of one image (or of images sharing a layer) wait for one another
//! instead of pulling twice. Images no task holds are removed, least recently used first,
//! while the store is over its disk budget ([`ImageStore::gc`]).
//!
//! Pull policy: an image already in the store is used without asking the registry (by digest,
//! or by the exact reference it was pulled as); anything else is pulled. Plain HTTP is used only
//! for registries on loopback and those listed insecure.

pub mod unpack;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use unpack::hex;

/// Agent-wide image settings.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Registries (`host:port`) reached over plain HTTP besides those on loopback.
    pub insecure_registries: Vec<String>,
    /// Disk budget of the store's layers; unused images beyond it are removed.
    pub budget_bytes: u64,
    /// Longest a whole pull may take.
    pub pull_timeout: Duration,
    /// Tries per registry request (manifest, config, each layer) before the pull fails.
    pub tries: u32,
    /// Wait before the second try; doubled for every further one.
    pub backoff: Duration,
    /// Credentials by registry (`host:port` as in image references), used when a job gives
    /// none (`--oci-auth-file`).
    pub credentials: BTreeMap<String, Credentials>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            insecure_registries: Vec::new(),
            budget_bytes: 20 * 1024 * 1024 * 1024,
            pull_timeout: Duration::from_secs(600),
            tries: 4,
            backoff: Duration::from_millis(500),
            credentials: BTreeMap::new(),
        }
    }
}

/// Why an image is not available.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error("invalid image reference {image:?}: {reason}")]
    Reference {
        /// The reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// The registry failed or refused a request.
    #[error("pulling {image}: {what}: {reason}")]
    Registry {
        /// The reference.
        image: String,
        /// The request.
        what: String,
        /// The registry's or the network's error.
        reason: String,
    },
    /// Content that does not match its digest.
    #[error("pulling {image}: {what} does not match its digest: expected {expected}, got {actual}")]
    Digest {
        /// The reference.
        image: String,
        /// What was checked.
        what: String,
        /// The digest asked for.
        expected: String,
        /// What the content hashed to.
        actual: String,
    },
    /// The image is not one this node can run.
    #[error("image {image}: {reason}")]
    Unusable {
        /// The reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// A layer could not be unpacked.
    #[error("image {image}: layer {digest}: {source}")]
    Unpack {
        /// The reference.
        image: String,
        /// The layer's digest.
        digest: String,
        /// The error.
        #[source]
        source: unpack::UnpackError,
    },
    /// The pull took longer than the agent allows.
    #[error("pulling {image}: timed out after {after:?}")]
    Timeout {
        /// The reference.
        image: String,
        /// The limit.
        after: Duration,
    },
    /// The store's files.
    #[error("image store {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { path, source }
}

/// The run configuration an image carries (its config's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`).
    pub user: String,
}

/// An image's record in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    manifest_digest: String,
    #[serde(default)]
    list_digest: Option<String>,
    refs: Vec<String>,
    config: RunConfig,
    /// Bottom layer first.
    diff_ids: Vec<String>,
    last_used_ms: u64,
}

/// An image ready to run: its config and its unpacked layers.
#[derive(Debug, Clone)]
pub struct Image {
    /// The (platform) manifest's digest, which names the image in the store.
    pub manifest_digest: String,
    /// How the image runs unless the job overrides it.
    pub config: RunConfig,
    /// Unpacked layer directories, the bottom layer first.
    pub layers: Vec<PathBuf>,
}

/// An image in the store, for node status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// The manifest's digest.
    pub manifest_digest: String,
    /// References it was pulled as.
    pub refs: Vec<String>,
    /// Bytes of its layers (shared layers counted in full).
    pub bytes: u64,
    /// Last use, ms since the epoch.
    pub last_used_ms: u64,
}

/// Registry credentials.
#[derive(Clone, Default)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: <redacted> }}", self.username)
    }
}

/// Reads an agent's registry credentials file (`--oci-auth-file`): a JSON object from registry
/// (`host:port`) to `{"username": ..., "password": ...}`. Errors name the file and the entry,
/// never a password.
pub fn load_credentials(path: &Path) -> Result<BTreeMap<String, Credentials>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        username: String,
        password: String,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: BTreeMap<String, Entry> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: expected {{\"host:port\": {{\"username\": ..., \"password\": ...}}}}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (registry, entry) in raw {
        if registry.is_empty() || entry.username.is_empty() || entry.username.contains(':') {
            return Err(format!("{}: entry {registry:?}: needs a registry name and a username without ':'", path.display()));
        }
        out.insert(registry, Credentials { username: entry.username, password: entry.password });
    }
    Ok(out)
}

/// Where pull progress goes (allocation events).
pub type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

/// The node's image store.
pub struct ImageStore {
    root: PathBuf,
    settings: ImageSettings,
    /// One lock per image reference and per layer: concurrent pulls wait for each other.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Images held by tasks (manifest digest → holders); never collected.
    in_use: Arc<Mutex<HashMap<String, usize>>>,
    /// Serialises collection with record writes.
    gc_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Keeps an image from collection while a task uses it.
#[derive(Debug)]
pub struct ImageHold {
    digest: String,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        let mut map = self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.digest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The hex part of `sha256:<hex>`, checked (it names files).
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

/// The error and its sources, one after the other: reqwest's own message alone says little.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = s.source();
    }
    text
}

/// Whether a failed request is worth another try (the network, a 5xx), or final (refused,
/// not found, a digest mismatch).
fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        _ => false,
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub(crate) fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // ring, not aws-lc-rs (a C/cmake build): the post-quantum key exchange it lacks is not
        // needed to pull images. Another part of the process may have installed a provider
        // already: that one is kept.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl ImageStore {
    /// A store under `root` (created on first use). Unpacks a previous agent left unfinished
    /// (under `tmp/`) and partial downloads are removed.
    pub fn new(root: PathBuf, settings: ImageSettings) -> Self {
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        if let Ok(dir) = std::fs::read_dir(root.join("blobs").join("sha256")) {
            for e in dir.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        ImageStore {
            root,
            settings,
            locks: Mutex::new(HashMap::new()),
            in_use: Arc::new(Mutex::new(HashMap::new())),
            gc_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Drop locks nobody holds any more, so the map stays small.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(key.to_string()).or_default().clone()
    }

    fn layer_dir(&self, diff_id: &str) -> Option<PathBuf> {
        digest_hex(diff_id).map(|h| self.root.join("layers").join(h))
    }

    fn record_path(&self, manifest_digest: &str) -> Option<PathBuf> {
        digest_hex(manifest_digest).map(|h| self.root.join("images").join(format!("{h}.json")))
    }

    fn records(&self) -> Vec<ImageRecord> {
        let Ok(dir) = std::fs::read_dir(self.root.join("images")) else { return Vec::new() };
        dir.filter_map(|e| {
            let path = e.ok()?.path();
            if path.extension()? != "json" {
                return None;
            }
            serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
        })
        .collect()
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&rec.manifest_digest).ok_or_else(|| ImageError::Unusable {
            image: rec.manifest_digest.clone(),
            reason: "the manifest digest is not sha256:<hex>".into(),
        })?;
        let dir = self.root.join("images");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| io_err(&tmp)(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn layer_ready(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id).is_some_and(|d| d.join("size").is_file())
    }

    /// The stored image for `reference` (by digest, or pulled as this exact reference) whose
    /// layers are all present.
    fn cached(&self, reference: &Reference, whole: &str) -> Option<ImageRecord> {
        self.records().into_iter().find(|r| {
            let by_digest = reference.digest().is_some_and(|d| r.manifest_digest == d || r.list_digest.as_deref() == Some(d));
            (by_digest || r.refs.iter().any(|x| x == whole)) && r.diff_ids.iter().all(|d| self.layer_ready(d))
        })
    }

    fn image_of(&self, rec: &ImageRecord) -> Image {
        Image {
            manifest_digest: rec.manifest_digest.clone(),
            config: rec.config.clone(),
            layers: rec.diff_ids.iter().filter_map(|d| self.layer_dir(d)).map(|d| d.join("root")).collect(),
        }
    }

    /// Keeps the image from collection until the hold is dropped.
    pub fn hold(&self, manifest_digest: &str) -> ImageHold {
        *self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(manifest_digest.to_string()).or_default() += 1;
        ImageHold { digest: manifest_digest.to_string(), in_use: self.in_use.clone() }
    }

    /// The image `image`, from the store or pulled (with `auth`, reporting progress), held
    /// for the caller. Collects unused images beyond the budget after a pull.
    pub async fn ensure(&self, image: &str, auth: Option<&Credentials>, progress: Progress<'_>) -> Result<(Image, ImageHold), ImageError> {
        let reference: Reference =
            image.parse().map_err(|e: oci_client::ParseError| ImageError::Reference { image: image.to_string(), reason: e.to_string() })?;
        let whole = reference.whole();
        let lock = self.lock_for(&format!("image {whole}"));
        let _guard = lock.lock().await;
        if let Some(mut rec) = self.cached(&reference, &whole) {
            let hold = self.hold(&rec.manifest_digest);
            rec.last_used_ms = now_ms();
            if let Err(e) = self.write_record(&rec) {
                tracing::warn!(error = %e, "recording an image's use failed");
            }
            return Ok((self.image_of(&rec), hold));
        }
        let after = self.settings.pull_timeout;
        let rec = match tokio::time::timeout(after, self.pull(&reference, &whole, auth, progress)).await {
            Ok(r) => r?,
            Err(_) => return Err(ImageError::Timeout { image: whole, after }),
        };
        let hold = self.hold(&rec.manifest_digest);
        let removed = self.gc().await;
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, "images removed to stay within the disk budget");
        }
        Ok((self.image_of(&rec), hold))
    }

    fn client(&self, reference: &Reference) -> Client {
        install_crypto();
        let mut plain = self.settings.insecure_registries.clone();
        let registry = reference.resolve_registry().to_string();
        if is_loopback(&registry) {
            plain.push(registry);
        }
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            ..ClientConfig::default()
        })
    }

    /// Runs `op` up to the configured number of tries, with backoff, while it fails in a way
    /// worth retrying.
    async fn with_retries<T, F, Fut>(&self, whole: &str, what: &str, mut op: F) -> Result<T, ImageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let tries = self.settings.tries.max(1);
        let mut wait = self.settings.backoff;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if let OciDistributionError::DigestError(d) = &e {
                        return Err(ImageError::Registry { image: whole.to_string(), what: what.to_string(), reason: chain(d) });
                    }
                    if !retryable(&e) || attempt >= tries {
                        let reason = if attempt > 1 { format!("{} (after {attempt} tries)", chain(&e)) } else { chain(&e) };
                        return Err(ImageError::Registry { image: whole.to_string(), what: what.to_string(), reason });
                    }
                    tracing::debug!(image = whole, what, attempt, error = %chain(&e), "registry request failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
            }
        }
    }

    async fn pull(
        &self,
        reference: &Reference,
        whole: &str,
        auth: Option<&Credentials>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, ImageError> {
        let began = Instant::now();
        let client = self.client(reference);
        // The job's credentials, else the agent's for this registry.
        let auth = match auth.or_else(|| self.settings.credentials.get(reference.resolve_registry())) {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        progress(format!("Pulling image {whole}"));
        let (manifest, digest, list_digest) =
            self.with_retries(whole, "manifest", || client.pull_image_manifest_and_list_digest(reference, &auth)).await?;
        // oci-client checks a pinned digest against what it fetched; checked here again, since
        // running the wrong image is what a pin exists to prevent.
        if let Some(pinned) = reference.digest() {
            if pinned != digest && list_digest.as_deref() != Some(pinned) {
                return Err(ImageError::Digest {
                    image: whole.to_string(),
                    what: "the manifest".into(),
                    expected: pinned.into(),
                    actual: digest,
                });
            }
        }
        if digest_hex(&digest).is_none() {
            return Err(ImageError::Unusable { image: whole.to_string(), reason: format!("manifest digest {digest:?} is not sha256") });
        }
        let config_bytes = self
            .with_retries(whole, "config", || async {
                let mut out = Vec::new();
                client.pull_blob(reference, &manifest.config, &mut out).await?;
                Ok(out)
            })
            .await?;
        let actual = format!("sha256:{}", hex(&Sha256::digest(&config_bytes)));
        if actual != manifest.config.digest {
            return Err(ImageError::Digest {
                image: whole.to_string(),
                what: "the config".into(),
                expected: manifest.config.digest.clone(),
                actual,
            });
        }
        let (config, diff_ids) = parse_config(whole, &config_bytes)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Unusable {
                image: whole.to_string(),
                reason: format!("the manifest has {} layers but the config {} diff_ids", manifest.layers.len(), diff_ids.len()),
            });
        }
        let total = manifest.layers.len();
        for (i, (layer, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
            self.layer(reference, whole, &client, layer, diff_id, (i + 1, total), progress).await?;
        }
        let mut refs = vec![whole.to_string()];
        let mut last =
            ImageRecord { manifest_digest: digest.clone(), list_digest, refs: Vec::new(), config, diff_ids, last_used_ms: now_ms() };
        let _gc = self.gc_lock.lock().await;
        // A reference moves to the image it names now.
        for mut other in self.records() {
            if other.manifest_digest == digest {
                refs.extend(other.refs.drain(..).filter(|r| r != whole));
            } else if other.refs.iter().any(|r| r == whole) {
                other.refs.retain(|r| r != whole);
                self.write_record(&other)?;
            }
        }
        last.refs = refs;
        self.write_record(&last)?;
        let bytes: u64 = manifest.layers.iter().map(|l| u64::try_from(l.size).unwrap_or(0)).sum();
        progress(format!("Pulled image {whole} ({total} layers, {}) in {:.1}s", mib(bytes), began.elapsed().as_secs_f64()));
        Ok(last)
    }

    /// One layer: downloaded (digest checked) and unpacked (diff_id checked) unless present.
    #[allow(clippy::too_many_arguments)]
    async fn layer(
        &self,
        reference: &Reference,
        whole: &str,
        client: &Client,
        layer: &OciDescriptor,
        diff_id: &str,
        (n, total): (usize, usize),
        progress: Progress<'_>,
    ) -> Result<(), ImageError> {
        let unusable = |reason: String| ImageError::Unusable { image: whole.to_string(), reason };
        let (Some(blob_hex), Some(dir)) = (digest_hex(&layer.digest), self.layer_dir(diff_id)) else {
            return Err(unusable(format!("layer {} (diff_id {diff_id}) is not sha256:<hex>", layer.digest)));
        };
        let short = &blob_hex[..12];
        let lock = self.lock_for(&format!("layer {diff_id}"));
        let _guard = lock.lock().await;
        if self.layer_ready(diff_id) {
            progress(format!("Layer {n}/{total} {short}: already on this node"));
            return Ok(());
        }
        let blobs = self.root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let blob = blobs.join(blob_hex);
        let size = u64::try_from(layer.size).unwrap_or(0);
        self.with_retries(whole, &format!("layer {}", layer.digest), || {
            self.download(client, reference, layer, &blob, size, (n, total), progress)
        })
        .await?;
        // Unpack under tmp/, then rename: a directory in layers/ is always complete.
        let tmp_root = self.root.join("tmp");
        std::fs::create_dir_all(&tmp_root).map_err(io_err(&tmp_root))?;
        let tmp = tmp_root.join(format!("{}-{}", &blob_hex[..16], std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("root")).map_err(io_err(&tmp))?;
        progress(format!("Layer {n}/{total} {short}: unpacking"));
        let (blob2, tmp2, diff) = (blob.clone(), tmp.clone(), diff_id.to_string());
        let unpacked = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&blob2).map_err(|e| unpack::UnpackError::Io {
                what: "opening",
                path: blob2.display().to_string(),
                source: e,
            })?;
            unpack::unpack_layer(file, &tmp2.join("root"), &diff)
        })
        .await
        .map_err(|e| unusable(format!("unpacking layer {}: {e}", layer.digest)))?;
        let _ = std::fs::remove_file(&blob);
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(ImageError::Unpack { image: whole.to_string(), digest: layer.digest.clone(), source });
            }
        };
        std::fs::write(tmp.join("size"), unpacked.tar_bytes.to_string()).map_err(io_err(&tmp))?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        progress(format!("Layer {n}/{total} {short}: done ({} unpacked)", mib(unpacked.tar_bytes)));
        Ok(())
    }

    /// Downloads a blob to `path`, hashing it on the way; a blob whose hash differs from its
    /// digest is deleted and refused.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &OciDescriptor,
        path: &Path,
        size: u64,
        (n, total): (usize, usize),
        progress: Progress<'_>,
    ) -> Result<(), OciDistributionError> {
        let short = layer.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
        let mut stream = client.pull_blob_stream(reference, layer).await?;
        let partial = path.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut last_report = Instant::now();
        progress(format!("Layer {n}/{total} {short}: downloading {}", mib(size)));
        while let Some(chunk) = stream.stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    // A digest mismatch detected by the client's own verifying stream is final.
                    if e.to_string().contains("igest") {
                        return Err(OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
                            expected: layer.digest.clone(),
                            actual: e.to_string(),
                        }));
                    }
                    return Err(e.into());
                }
            };
            hash.update(&chunk);
            got += chunk.len() as u64;
            file.write_all(&chunk).await?;
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress(format!("Layer {n}/{total} {short}: {} of {}", mib(got), mib(size)));
            }
        }
        file.flush().await?;
        drop(file);
        let actual = format!("sha256:{}", hex(&hash.finalize()));
        if actual != layer.digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
                expected: layer.digest.clone(),
                actual,
            }));
        }
        tokio::fs::rename(&partial, path).await?;
        progress(format!("Layer {n}/{total} {short}: downloaded {}", mib(got)));
        Ok(())
    }

    /// The images in the store, most recently used first.
    pub fn list(&self) -> Vec<StoredImage> {
        let mut out: Vec<StoredImage> = self
            .records()
            .into_iter()
            .map(|r| StoredImage {
                bytes: r.diff_ids.iter().map(|d| self.layer_size(d)).sum(),
                manifest_digest: r.manifest_digest,
                refs: r.refs,
                last_used_ms: r.last_used_ms,
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used_ms));
        out
    }

    fn layer_size(&self, diff_id: &str) -> u64 {
        self.layer_dir(diff_id).and_then(|d| std::fs::read_to_string(d.join("size")).ok()).and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Removes images no task holds, least recently used first, while the layers of the
    /// store's images together exceed the budget; layers no remaining image uses go with them.
    /// Returns the manifest digests removed.
    pub async fn gc(&self) -> Vec<String> {
        let _gc = self.gc_lock.lock().await;
        let mut records = self.records();
        records.sort_by_key(|r| r.last_used_ms);
        let total = |records: &[ImageRecord]| -> u64 {
            let mut seen = std::collections::BTreeSet::new();
            records.iter().flat_map(|r| r.diff_ids.iter()).filter(|d| seen.insert(d.as_str())).map(|d| self.layer_size(d)).sum()
        };
        let mut removed = Vec::new();
        while total(&records) > self.settings.budget_bytes {
            let held = self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let Some(i) = records.iter().position(|r| !held.contains_key(&r.manifest_digest)) else { break };
            let rec = records.remove(i);
            if let Some(path) = self.record_path(&rec.manifest_digest) {
                let _ = std::fs::remove_file(path);
            }
            for d in &rec.diff_ids {
                if !records.iter().any(|r| r.diff_ids.contains(d)) {
                    if let Some(dir) = self.layer_dir(d) {
                        if let Err(e) = std::fs::remove_dir_all(&dir) {
                            tracing::warn!(dir = %dir.display(), error = %e, "removing an image layer failed");
                        }
                    }
                }
            }
            removed.push(rec.manifest_digest);
        }
        removed
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The run config and diff_ids of an image config; only linux/amd64 images run here.
fn parse_config(whole: &str, bytes: &[u8]) -> Result<(RunConfig, Vec<String>), ImageError> {
    use oci_spec::image::{Arch, ImageConfiguration, Os};
    let unusable = |reason: String| ImageError::Unusable { image: whole.to_string(), reason };
    let cfg: ImageConfiguration = serde_json::from_slice(bytes).map_err(|e| unusable(format!("its config does not parse: {e}")))?;
    if *cfg.os() != Os::Linux || *cfg.architecture() != Arch::Amd64 {
        return Err(unusable(format!("it is for {}/{}, this node runs linux/amd64", cfg.os(), cfg.architecture())));
    }
    let run = cfg.config().as_ref().map(|c| RunConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    });
    Ok((run.unwrap_or_default(), cfg.rootfs().diff_ids().clone()))
}

/// The image's environment as a map (`KEY=value` entries; later ones win).
pub fn env_map(env: &[String]) -> BTreeMap<String, String> {
    env.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_digests() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1"));
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(digest_hex("sha256:../../etc").is_none());
        assert_eq!(env_map(&["A=1".into(), "B=x=y".into(), "junk".into()]).get("B").map(String::as_str), Some("x=y"));
    }
}
