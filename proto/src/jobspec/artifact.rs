//! A task's `artifact` blocks (issue 14 §3): what the validator checks and what the agent reads
//! back, in one place, so both agree on every rule.

use std::path::{Component, Path, PathBuf};

use crate::v1::Artifact;

/// Longest source URL or destination, in bytes.
pub const MAX_ARTIFACT_FIELD_BYTES: usize = 4096;

/// Where an artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `http://` or `https://`.
    Http(String),
    /// `file:///absolute/path` on the node (only under the agent's `--artifact-file-root`).
    File(PathBuf),
}

/// What to do with what was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Archives (by name: `.tar`, `.tar.gz`, `.tgz`, `.tar.zst`) are unpacked into the
    /// destination directory; anything else is saved in it under its own name.
    Any,
    /// Saved as it is, at the destination path itself (a file name).
    File,
    /// Must be an archive, unpacked into the destination directory.
    Dir,
}

/// An archive format the agent unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    Tar,
    TarGz,
    TarZst,
}

/// An expected digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// `sha256` or `sha512`.
    pub algorithm: &'static str,
    /// Lower-case hex.
    pub hex: String,
}

/// One artifact, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub source: Source,
    /// Relative to the task dir, normalized, never escaping it.
    pub destination: PathBuf,
    pub checksum: Option<Checksum>,
    pub mode: Mode,
}

/// A rule an artifact breaks: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ArtifactError {
    ArtifactError { field, message: message.into() }
}

/// Checks an artifact (the validator's entry point).
pub fn check(a: &Artifact) -> Result<(), ArtifactError> {
    parse(a).map(|_| ())
}

/// Checks and reads an artifact.
pub fn parse(a: &Artifact) -> Result<Parsed, ArtifactError> {
    if a.source.is_empty() {
        return Err(err("source", "missing required field"));
    }
    for (field, v) in [("source", &a.source), ("destination", &a.destination)] {
        if v.len() > MAX_ARTIFACT_FIELD_BYTES || v.chars().any(char::is_control) {
            return Err(err(field, format!("at most {MAX_ARTIFACT_FIELD_BYTES} bytes without control characters")));
        }
    }
    let source = if let Some(path) = a.source.strip_prefix("file://") {
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            return Err(err(
                "source",
                format!("{:?}: a file:// source is an absolute path without `..` (file:///srv/data/x.tar)", a.source),
            ));
        }
        Source::File(p.to_path_buf())
    } else if a.source.starts_with("http://") || a.source.starts_with("https://") {
        let rest = a.source.split_once("://").map(|(_, r)| r).unwrap_or_default();
        if rest.is_empty() || rest.starts_with('/') {
            return Err(err("source", format!("{:?} has no host", a.source)));
        }
        Source::Http(a.source.clone())
    } else {
        return Err(err("source", format!("{:?}: the source must be an http://, https:// or file:// URL", a.source)));
    };
    let mode = match a.mode.as_str() {
        "" | "any" => Mode::Any,
        "file" => Mode::File,
        "dir" => Mode::Dir,
        other => return Err(err("mode", format!("{other:?} must be one of \"any\", \"file\", \"dir\""))),
    };
    let dest = if a.destination.is_empty() { "local/" } else { a.destination.as_str() };
    let dp = Path::new(dest);
    if dp.is_absolute() {
        return Err(err("destination", format!("{dest:?} must be relative to the task dir (local/…, alloc/…)")));
    }
    let mut destination = PathBuf::new();
    for c in dp.components() {
        match c {
            Component::Normal(n) => destination.push(n),
            Component::CurDir => {}
            _ => return Err(err("destination", format!("{dest:?} must stay inside the task dir (no `..`)"))),
        }
    }
    if destination.as_os_str().is_empty() {
        return Err(err("destination", format!("{dest:?} names the task dir itself; write local/ or a path under it")));
    }
    let checksum = if a.checksum.is_empty() {
        None
    } else {
        let (algo, hex) =
            a.checksum.split_once(':').ok_or_else(|| err("options.checksum", format!("{:?}: write it as sha256:<hex>", a.checksum)))?;
        let (algorithm, len) = match algo {
            "sha256" => ("sha256", 64),
            "sha512" => ("sha512", 128),
            other => return Err(err("options.checksum", format!("algorithm {other:?}: sha256 or sha512"))),
        };
        if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err("options.checksum", format!("a {algorithm} checksum is {len} hex digits, found {:?}", hex)));
        }
        Some(Checksum { algorithm, hex: hex.to_ascii_lowercase() })
    };
    if mode == Mode::Dir && archive_of(&a.source).is_none() {
        return Err(err("mode", format!("mode \"dir\" needs an archive (.tar, .tar.gz, .tgz, .tar.zst); {:?} is not one", a.source)));
    }
    Ok(Parsed { source, destination, checksum, mode })
}

/// The archive format a source names by its extension (query and fragment ignored).
pub fn archive_of(source: &str) -> Option<Archive> {
    let path = source.split(['?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    if path.ends_with(".tar.gz") || path.ends_with(".tgz") {
        Some(Archive::TarGz)
    } else if path.ends_with(".tar.zst") || path.ends_with(".tzst") {
        Some(Archive::TarZst)
    } else if path.ends_with(".tar") {
        Some(Archive::Tar)
    } else {
        None
    }
}

/// The file name a source is saved under (its last path segment; `artifact` when it has none).
pub fn file_name(source: &str) -> String {
    let path = source.split(['?', '#']).next().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default();
    if last.is_empty() || last == "." || last == ".." {
        "artifact".into()
    } else {
        last.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(source: &str, destination: &str, checksum: &str, mode: &str) -> Artifact {
        Artifact { source: source.into(), destination: destination.into(), checksum: checksum.into(), mode: mode.into() }
    }

    #[test]
    fn good_artifacts_parse() {
        let p = parse(&art("https://example.test/m/model.tar.gz?x=1", "", "", "")).expect("parses");
        assert_eq!(p.destination, PathBuf::from("local"));
        assert_eq!(p.mode, Mode::Any);
        assert_eq!(archive_of("https://example.test/m/model.tar.gz?x=1"), Some(Archive::TarGz));
        assert_eq!(file_name("https://example.test/m/weights.bin?sig=abc"), "weights.bin");
        let sum = format!("sha256:{}", "A".repeat(64));
        let p = parse(&art("file:///srv/data/x.bin", "./local/data/x.bin", &sum, "file")).expect("parses");
        assert_eq!(p.source, Source::File(PathBuf::from("/srv/data/x.bin")));
        assert_eq!(p.destination, PathBuf::from("local/data/x.bin"));
        assert_eq!(p.checksum.map(|c| c.hex), Some("a".repeat(64)));
    }

    #[test]
    fn bad_artifacts_name_the_field() {
        let cases = [
            (art("", "", "", ""), "source"),
            (art("ftp://x/y", "", "", ""), "source"),
            (art("file://relative/x", "", "", ""), "source"),
            (art("file:///a/../etc/shadow", "", "", ""), "source"),
            (art("https://", "", "", ""), "source"),
            (art("https://h/x", "/etc", "", ""), "destination"),
            (art("https://h/x", "local/../../x", "", ""), "destination"),
            (art("https://h/x", ".", "", ""), "destination"),
            (art("https://h/x", "", "md5:abc", ""), "options.checksum"),
            (art("https://h/x", "", "sha256:abc", ""), "options.checksum"),
            (art("https://h/x", "", "", "zip"), "mode"),
            (art("https://h/x.bin", "", "", "dir"), "mode"),
        ];
        for (a, field) in cases {
            let e = parse(&a).expect_err(&format!("{a:?} is refused"));
            assert_eq!(e.field, field, "{a:?}: {}", e.message);
        }
    }
}
