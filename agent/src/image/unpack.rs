//! Unpacking one image layer (a tar stream, plain, gzip or zstd) into a directory of the
//! store, the way overlayfs reads it as a lower layer:
//!
//! * the uncompressed stream is hashed while it is read and must equal the layer's `diff_id`
//!   from the image's config; a mismatch fails the unpack (the caller removes the directory);
//! * a whiteout `.wh.<name>` becomes overlayfs' whiteout (a character device 0/0 named
//!   `<name>`), an opaque marker `.wh..wh..opq` the `trusted.overlay.opaque=y` attribute of
//!   its directory;
//! * no entry may leave the layer's directory: absolute paths and `..` are refused, and so is
//!   any entry (or hard link target) whose parent inside the layer is a symlink, since writing
//!   through it would follow the symlink on the host. Symlinks themselves are created as they
//!   are (their targets mean something only inside the task's root).
//!
//! Ownership and modes come from the tar headers (the agent runs as root); the overlay is
//! mounted `nosuid,nodev`, so set-id bits and device nodes an image carries are inert.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry's path would leave the layer's directory.
    #[error("layer entry {path:?}: {reason}")]
    Escape {
        /// The entry's path as the tar has it.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The uncompressed layer does not hash to the config's `diff_id`.
    #[error("the uncompressed layer is {actual}, but the image config's diff_id is {expected}")]
    DiffId {
        /// From the image config.
        expected: String,
        /// What the stream hashed to.
        actual: String,
    },
    /// Reading the stream or writing the directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path (or entry) involved.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.into();
    move |source| UnpackError::Io { what, path, source }
}

/// Counts and hashes what passes through.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The layer's compression, from its first bytes (media types lie often enough, and Docker and
/// OCI name them differently): gzip `1f 8b`, zstd `28 b5 2f fd`, else a plain tar.
fn decompressed<'a, R: BufRead + 'a>(mut reader: R) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let head = reader.fill_buf().map_err(io_err("reading", "the layer"))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let dec = ruzstd::decoding::StreamingDecoder::new(reader).map_err(|e| UnpackError::Io {
            what: "reading the zstd frame of",
            path: "the layer".into(),
            source: io::Error::other(e),
        })?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(reader))
    }
}

/// A tar path made relative and checked: no root, no `..`; `.` parts dropped. Empty for the
/// layer's root itself.
pub fn clean_path(raw: &Path) -> Result<PathBuf, UnpackError> {
    let text = raw.to_string_lossy().into_owned();
    let mut out = PathBuf::new();
    for part in raw.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Escape { path: text, reason: "absolute paths are refused" })
            }
            Component::ParentDir => return Err(UnpackError::Escape { path: text, reason: "`..` is refused" }),
        }
    }
    Ok(out)
}

/// Refuses a path whose parents inside `root` include a symlink (or a non-directory), and
/// creates missing parents.
fn safe_parent(root: &Path, rel: &Path, raw: &str) -> Result<(), UnpackError> {
    let Some(parent) = rel.parent() else { return Ok(()) };
    let mut at = root.to_path_buf();
    for part in parent.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::Escape { path: raw.to_string(), reason: "a parent directory is a symlink" })
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(UnpackError::Escape { path: raw.to_string(), reason: "a parent is not a directory" }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(io_err("creating", at.display().to_string()))?;
            }
            Err(e) => return Err(io_err("inspecting", at.display().to_string())(e)),
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (not following a symlink); a directory stays when `keep_dir`.
fn clear(path: &Path, keep_dir: bool) -> Result<(), UnpackError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io_err("removing", path.display().to_string())),
        Ok(_) => std::fs::remove_file(path).map_err(io_err("removing", path.display().to_string())),
        Err(_) => Ok(()),
    }
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, mode: u32, dev: u64) -> Result<(), UnpackError> {
    nix::sys::stat::mknod(path, kind, nix::sys::stat::Mode::from_bits_truncate(mode), dev).map_err(|e| UnpackError::Io {
        what: "mknod",
        path: path.display().to_string(),
        source: io::Error::from(e),
    })
}

fn lchown(path: &Path, uid: u64, gid: u64) -> Result<(), UnpackError> {
    let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path.display().to_string()))
}

/// What an unpack produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
}

/// Unpacks the layer `reader` (compressed or not) into `dest` (an empty directory) and checks
/// the uncompressed stream against `diff_id` (`sha256:<hex>`). On error `dest` is left
/// half-written for the caller to remove.
pub fn unpack_layer(reader: impl Read, dest: &Path, diff_id: &str) -> Result<Unpacked, UnpackError> {
    let buffered = BufReader::with_capacity(256 * 1024, reader);
    let mut hashing = Hashing { inner: decompressed(buffered)?, hash: Sha256::new(), bytes: 0 };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive.entries().map_err(io_err("reading", "the layer's tar stream"))?;
        for entry in entries {
            let mut entry = entry.map_err(io_err("reading", "the layer's tar stream"))?;
            unpack_entry(&mut entry, dest)?;
        }
    }
    // The tar's end padding, and anything after it, belong to the hashed stream too.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err("reading", "the layer's tar stream"))?;
    let actual = format!("sha256:{}", hex(&hashing.hash.finalize()));
    if actual != diff_id {
        return Err(UnpackError::DiffId { expected: diff_id.to_string(), actual });
    }
    Ok(Unpacked { tar_bytes: hashing.bytes })
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unpack_entry<R: Read>(entry: &mut tar::Entry<'_, R>, dest: &Path) -> Result<(), UnpackError> {
    use tar::EntryType;
    let raw_path = entry.path().map_err(io_err("reading an entry's path in", "the layer"))?.into_owned();
    let raw = raw_path.to_string_lossy().into_owned();
    let rel = clean_path(&raw_path)?;
    let kind = entry.header().entry_type();
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    safe_parent(dest, &rel, &raw)?;
    let at = dest.join(&rel);
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Whiteouts.
    if name == ".wh..wh..opq" {
        let dir = at.parent().unwrap_or(dest);
        return xattr_set(dir, "trusted.overlay.opaque", b"y");
    }
    if let Some(hidden) = name.strip_prefix(".wh.") {
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(UnpackError::Escape { path: raw, reason: "a whiteout must name an entry" });
        }
        let target = at.with_file_name(hidden);
        clear(&target, false)?;
        return mknod(&target, nix::sys::stat::SFlag::S_IFCHR, 0, 0);
    }
    let header = entry.header();
    let mode = header.mode().map_err(io_err("reading the mode of", raw.clone()))? & 0o7777;
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    match kind {
        EntryType::Directory => {
            clear(&at, true)?;
            if !at.is_dir() {
                std::fs::create_dir(&at).map_err(io_err("creating", at.display().to_string()))?;
            }
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", at.display().to_string()))?;
            lchown(&at, uid, gid)
        }
        EntryType::Regular | EntryType::Continuous => {
            clear(&at, false)?;
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).open(&at).map_err(io_err("creating", at.display().to_string()))?;
            io::copy(entry, &mut file).map_err(io_err("writing", at.display().to_string()))?;
            lchown(&at, uid, gid)?;
            // After chown, which clears set-id bits.
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode)).map_err(io_err("chmod", at.display().to_string()))
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(io_err("reading the link of", raw.clone()))?
                .ok_or(UnpackError::Escape { path: raw.clone(), reason: "a symlink without a target" })?;
            clear(&at, false)?;
            std::os::unix::fs::symlink(&target, &at).map_err(io_err("creating symlink", at.display().to_string()))?;
            lchown(&at, uid, gid)
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(io_err("reading the link of", raw.clone()))?
                .ok_or(UnpackError::Escape { path: raw.clone(), reason: "a hard link without a target" })?;
            let target_rel = clean_path(&target)?;
            let target_raw = target.to_string_lossy().into_owned();
            if target_rel.as_os_str().is_empty() {
                return Err(UnpackError::Escape { path: raw, reason: "a hard link to the layer's root" });
            }
            safe_parent(dest, &target_rel, &target_raw)?;
            let source = dest.join(&target_rel);
            clear(&at, false)?;
            std::fs::hard_link(&source, &at).map_err(io_err("linking", at.display().to_string()))
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let flag = match kind {
                EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                _ => nix::sys::stat::SFlag::S_IFIFO,
            };
            let major = u64::from(header.device_major().ok().flatten().unwrap_or(0));
            let minor = u64::from(header.device_minor().ok().flatten().unwrap_or(0));
            clear(&at, false)?;
            mknod(&at, flag, mode, nix::sys::stat::makedev(major, minor))?;
            lchown(&at, uid, gid)
        }
        // PAX and GNU extension headers are read by the tar crate; anything else is skipped.
        other => {
            tracing::debug!(path = %raw, kind = ?other, "layer entry of an unsupported kind skipped");
            Ok(())
        }
    }
}

#[allow(unsafe_code)]
fn xattr_set(path: &Path, name: &str, value: &[u8]) -> Result<(), UnpackError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source: io::Error| UnpackError::Io { what: "setting the opaque attribute on", path: path.display().to_string(), source };
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| err(io::Error::other(e)))?;
    let cname = std::ffi::CString::new(name).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: both strings are valid NUL-terminated C strings that outlive the call, and
    // `value` is a valid buffer of `value.len()` bytes.
    let rc = unsafe { libc::lsetxattr(cpath.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            // Raw names: the builder's own checks would refuse the hostile ones.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn diff_id(bytes: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(bytes)))
    }

    #[test]
    fn files_links_and_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_of(&[
            ("./etc/", tar::EntryType::Directory, b"", ""),
            ("etc/motd", tar::EntryType::Regular, b"hi\n", ""),
            ("etc/motd2", tar::EntryType::Link, b"", "etc/motd"),
            ("etc/link", tar::EntryType::Symlink, b"", "/etc/motd"),
            ("etc/.wh.gone", tar::EntryType::Regular, b"", ""),
            ("opt/.wh..wh..opq", tar::EntryType::Regular, b"", ""),
        ]);
        let out = unpack_layer(&t[..], dir.path(), &diff_id(&t)).unwrap();
        assert_eq!(out.tar_bytes, t.len() as u64);
        assert_eq!(std::fs::read_to_string(dir.path().join("etc/motd2")).unwrap(), "hi\n");
        assert_eq!(std::fs::read_link(dir.path().join("etc/link")).unwrap(), Path::new("/etc/motd"));
        let wh = std::fs::symlink_metadata(dir.path().join("etc/gone")).unwrap();
        assert!(wh.file_type().is_char_device(), "{wh:?}");
        assert!(dir.path().join("opt").is_dir());
    }

    #[test]
    fn gzip_and_a_wrong_diff_id() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let t = tar_of(&[("a", tar::EntryType::Regular, b"x", "")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let gz = gz.finish().unwrap();
        unpack_layer(&gz[..], dir.path(), &diff_id(&t)).unwrap();
        let other = tempfile::tempdir().unwrap();
        let err = unpack_layer(&gz[..], other.path(), &diff_id(b"nope")).unwrap_err();
        assert!(matches!(err, UnpackError::DiffId { .. }), "{err}");
    }

    #[test]
    fn escapes_are_refused() {
        for entries in [
            vec![("../evil", tar::EntryType::Regular, &b"x"[..], "")],
            vec![("/abs", tar::EntryType::Regular, &b"x"[..], "")],
            vec![("l", tar::EntryType::Symlink, &b""[..], "/tmp"), ("l/evil", tar::EntryType::Regular, &b"x"[..], "")],
            vec![("h", tar::EntryType::Link, &b""[..], "../../etc/passwd")],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let t = tar_of(&entries);
            let err = unpack_layer(&t[..], dir.path(), &diff_id(&t)).unwrap_err();
            assert!(matches!(err, UnpackError::Escape { .. }), "{entries:?}: {err}");
        }
    }
}
