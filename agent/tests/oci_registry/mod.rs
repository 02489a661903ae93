//! A real registry on loopback for the `oci` driver's tests (Debian's `docker-registry`, the
//! CNCF distribution registry), images built here from `/bin/busybox` (busybox-static) and
//! pushed with the distribution API over plain HTTP, and a TCP proxy that can cut a pull short.
//! Shared by `agent/tests/oci_driver.rs` and the end-to-end `tests/oci.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Programs these tests need, with the Debian package that has each.
pub const PROGRAMS: &[(&str, &str)] = &[("docker-registry", "docker-registry"), ("htpasswd", "apache2-utils")];
/// The static busybox the images are built from.
pub const BUSYBOX: &str = "/bin/busybox";

fn in_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Fails (never skips) when something this helper needs is missing, naming it.
pub fn require_tools() {
    let mut missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(p, _)| !in_path(p))
        .map(|(p, pkg)| format!("the `{p}` program (install it with `apt-get install {pkg}`)"))
        .collect();
    if !Path::new(BUSYBOX).is_file() {
        missing.push(format!("{BUSYBOX} (install it with `apt-get install busybox-static`)"));
    }
    assert!(missing.is_empty(), "this test cannot run: missing\n  - {}\n(`.ci/run` installs them)", missing.join("\n  - "));
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `docker-registry` process with its storage in a temporary directory.
pub struct Registry {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Basic-auth credentials, when the registry asks for them.
    pub auth: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry; with `auth`, it requires those credentials (htpasswd, bcrypt).
    pub fn start(auth: Option<(&str, &str)>) -> Res<Registry> {
        require_tools();
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        if let Some((user, pass)) = auth {
            let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output()?;
            assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            std::fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", dir.path().join("htpasswd").display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut reg = Registry { child: Some(child), dir, addr, auth: auth.map(|(u, p)| (u.to_string(), p.to_string())) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(resp) = reg.request("GET", "/v2/", &[], &[]) {
                if resp.status == 200 || resp.status == 401 {
                    return Ok(reg);
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default();
                reg.kill();
                return Err(format!("docker-registry did not answer on {} within 20 s; its log:\n{log}", reg.addr).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry (its port then refuses connections).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("storage/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// One HTTP/1.1 request (Connection: close), with the registry's credentials if any.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Res<Response> {
        http(&self.addr, method, path, headers, body, self.auth.as_ref())
    }

    /// Pushes a blob (POST an upload, PUT its bytes).
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> Res<String> {
        let digest = sha256(bytes);
        let r = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])?;
        if r.status != 202 {
            return Err(format!("starting an upload: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)).into());
        }
        let location = r.header("location").ok_or("no Location for the upload")?;
        let path = location.strip_prefix(&format!("http://{}", self.addr)).unwrap_or(&location).to_string();
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = self.request("PUT", &format!("{path}{sep}digest={digest}"), &[("Content-Type", "application/octet-stream")], bytes)?;
        if r.status != 201 {
            return Err(format!("uploading {digest}: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)).into());
        }
        Ok(digest)
    }

    /// Pushes an image (its layers in order, bottom first, each already compressed as its
    /// media type says) as `repo:tag`; returns the manifest's digest.
    pub fn push_image(&self, repo: &str, tag: &str, image: &TestImage) -> Res<String> {
        for (bytes, _, _) in &image.layers {
            self.push_blob(repo, bytes)?;
        }
        self.push_blob(repo, &image.config)?;
        let manifest = image.manifest();
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            &manifest,
        )?;
        if r.status != 201 {
            return Err(format!("pushing the manifest: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)).into());
        }
        Ok(sha256(&manifest))
    }
}

impl Registry {
    /// Pushes `image` and `decoy` and an OCI index naming `decoy` linux/arm64 (first) and
    /// `image` linux/amd64 as `repo:tag`; returns the index's digest.
    pub fn push_index(&self, repo: &str, tag: &str, image: &TestImage, decoy: &TestImage) -> Res<String> {
        let digest = self.push_image(repo, "amd64-only", image)?;
        let decoy_digest = self.push_image(repo, "arm64-only", decoy)?;
        let manifest = image.manifest();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": decoy_digest,
                 "size": decoy.manifest().len(), "platform": {"architecture": "arm64", "os": "linux"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
            ],
        }))?;
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
            &index,
        )?;
        if r.status != 201 {
            return Err(format!("pushing the index: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)).into());
        }
        Ok(sha256(&index))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], auth: Option<&(String, String)>) -> Res<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((u, p)) = auth {
        req.push_str(&format!("Authorization: Basic {}\r\n", base64(format!("{u}:{p}").as_bytes())));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or("no status")?;
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok(Response { status, headers, body: raw[end + 4..].to_vec() })
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer's entries.
pub enum Entry {
    Dir(&'static str),
    File(&'static str, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
    HardLink(&'static str, &'static str),
}

/// A layer as a tar stream (uncompressed).
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::HardLink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The busybox base layer: `/bin/busybox` and the applets the tests use.
pub fn busybox_layer(extra: Vec<Entry>) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).expect("reading /bin/busybox (busybox-static)");
    let mut entries = vec![Entry::Dir("bin"), Entry::File("bin/busybox", busybox, 0o755)];
    entries.push(Entry::HardLink("bin/sh", "bin/busybox"));
    for applet in ["echo", "cat", "ls", "test", "true", "sleep", "id", "pwd", "env", "printf"] {
        entries.push(Entry::Symlink(Box::leak(format!("bin/{applet}").into_boxed_str()), "busybox"));
    }
    entries.extend(extra);
    layer_tar(&entries)
}

/// An image being built: its layers (compressed bytes, media type, diff_id) and config.
pub struct TestImage {
    pub layers: Vec<(Vec<u8>, &'static str, String)>,
    pub config: Vec<u8>,
}

impl TestImage {
    /// An image of these uncompressed layers with this run config (`config` JSON object).
    pub fn new(layers: Vec<(Vec<u8>, Compression)>, config: serde_json::Value) -> TestImage {
        let mut out = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, c) in layers {
            let diff_id = sha256(&tar);
            let (bytes, media) = match c {
                Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
                Compression::Gzip => {
                    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&tar).unwrap();
                    (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
                }
                Compression::Zstd => (
                    ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            diff_ids.push(diff_id.clone());
            out.push((bytes, media, diff_id));
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        TestImage { layers: out, config: serde_json::to_vec(&config).unwrap() }
    }

    pub fn manifest(&self) -> Vec<u8> {
        let layers: Vec<serde_json::Value> =
            self.layers.iter().map(|(b, media, _)| serde_json::json!({"mediaType": media, "digest": sha256(b), "size": b.len()})).collect();
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&self.config), "size": self.config.len()},
            "layers": layers,
        });
        serde_json::to_vec(&m).unwrap()
    }
}

/// A TCP proxy in front of a registry that, once one response stream has carried `cut_after`
/// bytes, drops every connection and stops listening: a registry going away mid-pull.
pub struct CuttingProxy {
    pub addr: String,
    pub cut: Arc<AtomicBool>,
}

impl CuttingProxy {
    pub fn start(upstream: &str, cut_after: u64) -> Res<CuttingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        listener.set_nonblocking(true)?;
        let cut = Arc::new(AtomicBool::new(false));
        let (up, flag) = (upstream.to_string(), cut.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (up, flag) = (up.clone(), flag.clone());
                        std::thread::spawn(move || pump(client, &up, cut_after, &flag));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // The listener is dropped here: later connections are refused.
        });
        Ok(CuttingProxy { addr, cut })
    }
}

fn pump(client: TcpStream, upstream: &str, cut_after: u64, cut: &Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(upstream) else { return };
    let _ = client.set_nonblocking(false);
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let mut buf = [0u8; 16 * 1024];
    let mut sent = 0u64;
    loop {
        if cut.load(Ordering::SeqCst) {
            break;
        }
        let n = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sent + n as u64 > cut_after {
            let _ = c_write.write_all(&buf[..(cut_after - sent) as usize]);
            cut.store(true, Ordering::SeqCst);
            break;
        }
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = c_write.shutdown(std::net::Shutdown::Both);
    let _ = s_read.shutdown(std::net::Shutdown::Both);
}
