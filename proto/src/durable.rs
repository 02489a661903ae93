//! Small files that must survive a power loss once written: node ids and node secrets.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` (created with `mode`, or replacing what is there) so that after
/// a crash or a power loss the path holds either its old contents or all of the new ones: a
/// temporary file beside it is written and fsync'd, renamed over `path`, and the directory is
/// fsync'd so that the rename itself is on disk. A write-and-rename without the syncs can leave
/// an empty file under the final name after a power loss (ext4 with delayed allocation).
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A temporary file left by a crash in the middle of an earlier write is stale.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_whole_with_its_mode_and_leaves_no_temporary() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("mlp-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("node-id");
        // A stale temporary from an interrupted write does not get in the way.
        std::fs::write(dir.join("node-id.tmp"), "half")?;
        replace_file(&path, b"first\n", 0o600)?;
        assert_eq!(std::fs::read_to_string(&path)?, "first\n");
        assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        replace_file(&path, b"second\n", 0o644)?;
        assert_eq!(std::fs::read_to_string(&path)?, "second\n");
        assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o644);
        assert!(!dir.join("node-id.tmp").exists());
        let missing = dir.join("no-such-dir").join("x");
        assert!(replace_file(&missing, b"x", 0o600).is_err(), "a missing directory is an error");
        std::fs::remove_dir_all(&dir)
    }
}
