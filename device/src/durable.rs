//! Crash-safe file writes. It owns the one way a device replaces a file it must not lose or see
//! half-written (the agent's journal, the session state, keys and certificates, staged images):
//! write a temporary file next to it, fsync it, rename it over the target, fsync the directory.
//! After a power cut the target is either the old or the new content, never a mix. It also swaps
//! symbolic links the same way (the credential store). It knows nothing about what the files mean.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crashpoint::{self, CrashPoint};

/// A file operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    /// What the agent was doing ("writing", "renaming", ...).
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// Wraps an I/O error with what was done and where.
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Who may read a file the agent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 0600: private keys, the journal.
    Private,
    /// 0644: certificates, CSRs.
    Public,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Mode::Private => 0o600,
            Mode::Public => 0o644,
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync, rename, fsync dir).
/// The temporary file is created with `mode` already set, so a secret is never readable by others,
/// not even for an instant.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Mode) -> Result<(), FileError> {
    write_replacing(path, bytes, mode, true)
}

/// [`write_atomic`], with the fsyncs only when `durable`: readers still never see a mix, but a
/// power cut may lose the write (benchmarks of thousands of emulated devices on one disk).
pub fn write_replacing(
    path: &Path,
    bytes: &[u8],
    mode: Mode,
    durable: bool,
) -> Result<(), FileError> {
    let tmp = temp_path(path);
    // A temporary file left by a crash is stale: start over.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(&tmp)
        .map_err(|e| FileError::new("creating", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| FileError::new("writing", &tmp, e))?;
    if durable {
        file.sync_all()
            .map_err(|e| FileError::new("syncing", &tmp, e))?;
    }
    drop(file);
    crashpoint::reached(&CrashPoint::BeforeRename);
    if durable {
        rename_durable(&tmp, path)
    } else {
        fs::rename(&tmp, path).map_err(|e| FileError::new("renaming", &tmp, e))
    }
}

/// Writes `value` as JSON with [`write_replacing`].
pub fn write_json<T: Serialize>(
    path: &Path,
    value: &T,
    mode: Mode,
    durable: bool,
) -> Result<(), FileError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| FileError::new("encoding", path, io::Error::other(e)))?;
    write_replacing(path, &bytes, mode, durable)
}

/// Reads a JSON file; `None` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::new("reading", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| FileError::new("parsing JSON in", path, io::Error::other(e)))
}

/// Points `link` at `target` (relative to the link's directory) with one rename over whatever
/// `link` was, then fsyncs the directory.
pub fn replace_symlink(link: &Path, target: &Path) -> Result<(), FileError> {
    let tmp = temp_path(link);
    remove_all(&tmp)?;
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| FileError::new("linking", &tmp, e))?;
    rename_durable(&tmp, link)
}

/// Renames `from` to `to` (same directory or file system) and fsyncs the target's directory.
pub fn rename_durable(from: &Path, to: &Path) -> Result<(), FileError> {
    fs::rename(from, to).map_err(|e| FileError::new("renaming", from, e))?;
    sync_parent(to)
}

/// Fsyncs the directory holding `path`, so a rename or creation in it survives a power cut.
pub fn sync_parent(path: &Path) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// Fsyncs a directory.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new("syncing directory", dir, e))
}

/// Creates `dir` (and its parents) if missing, with mode 0700 for the directories it creates.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| FileError::new("creating directory", dir, e))?;
    sync_parent(dir)
}

/// Removes a file or directory tree if it exists.
pub fn remove_all(path: &Path) -> Result<(), FileError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| FileError::new("removing", path, e))
}

/// The permission bits of a file (for checks such as "the key is 0600").
pub fn mode_of(path: &Path) -> Result<u32, FileError> {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .map_err(|e| FileError::new("reading metadata of", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"one", Mode::Private).unwrap();
        write_atomic(&path, b"two", Mode::Private).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path).unwrap(), 0o600);
        assert!(
            !temp_path(&path).exists(),
            "no temporary file is left behind"
        );
    }

    #[test]
    fn a_stale_temporary_file_does_not_block_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        fs::write(temp_path(&path), b"half").unwrap();
        write_atomic(&path, b"{}", Mode::Public).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
        assert_eq!(mode_of(&path).unwrap(), 0o644);
    }

    #[test]
    fn private_dirs_are_0700() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_private_dir(&nested).unwrap();
        assert_eq!(mode_of(&nested).unwrap(), 0o700);
        remove_all(&dir.path().join("a")).unwrap();
        assert!(!nested.exists());
        remove_all(&dir.path().join("missing")).unwrap();
    }
}
