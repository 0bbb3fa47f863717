//! Images in the state directory. It owns the layout below and the rule that an installer only ever
//! sees a complete, verified image: bytes arrive in `downloads/<id>.part`, are hashed and compared
//! with the expected SHA-256 and size, and only then renamed (atomically, durably) to
//! `transactions/<id>/image`, the one path an installer reads. A transaction's directory also holds
//! its installer work tree; it is removed when the transaction ends.
//!
//! ```text
//! <state_dir>/journal.json                  the journal (see `journal`)
//! <state_dir>/agent.lock                    held by the running agent (one per state directory)
//! <state_dir>/downloads/<id>.part           an image being received (never read by an installer)
//! <state_dir>/transactions/<id>/image       the verified image of transaction <id>
//! <state_dir>/transactions/<id>/work/       the installer's work directory for <id>
//! ```

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use sealed_ota_device::store::{check_image, ImageError};

use crate::durable::{self, FileError};

/// Why an image was not staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The bytes are not the expected image (size or SHA-256), or could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The expected SHA-256 is not 64 hex characters.
    #[error("expected SHA-256 {0:?} is not 64 hex characters")]
    BadHash(String),
    /// The transaction id cannot name a file.
    #[error("transaction id {0:?} is not 1-63 characters of a-z, 0-9 and '-'")]
    BadId(String),
    /// The file system failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// What an image must be, from the signed manifest (or the `install` command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The state directory's image areas.
#[derive(Debug, Clone)]
pub struct Staging {
    root: PathBuf,
}

impl Staging {
    /// The areas under `state_dir` (created when first written).
    pub fn new(state_dir: &Path) -> Self {
        Staging {
            root: state_dir.to_path_buf(),
        }
    }

    /// Where the image of transaction `id` is received (phase 2's session writes chunks here).
    pub fn download_path(&self, id: &str) -> PathBuf {
        self.root.join("downloads").join(format!("{id}.part"))
    }

    /// The directory of transaction `id`.
    pub fn transaction_dir(&self, id: &str) -> PathBuf {
        self.root.join("transactions").join(id)
    }

    /// The verified image of transaction `id`.
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.transaction_dir(id).join("image")
    }

    /// The installer's work directory of transaction `id` (created by [`Staging::work_dir`]).
    pub fn work_path(&self, id: &str) -> PathBuf {
        self.transaction_dir(id).join("work")
    }

    /// Creates and returns the installer's work directory of transaction `id`.
    pub fn work_dir(&self, id: &str) -> Result<PathBuf, FileError> {
        let dir = self.work_path(id);
        durable::create_private_dir(&dir)?;
        Ok(dir)
    }

    /// Copies `source` into the download area of transaction `id` (for a local install), synced.
    pub fn receive_file(&self, id: &str, source: &Path) -> Result<PathBuf, StageError> {
        check_id(id)?;
        let part = self.download_path(id);
        durable::create_private_dir(part.parent().expect("has a parent"))?;
        let mut from = File::open(source).map_err(|e| FileError::new("opening", source, e))?;
        let mut to = File::create(&part).map_err(|e| FileError::new("creating", &part, e))?;
        io::copy(&mut from, &mut to).map_err(|e| FileError::new("copying into", &part, e))?;
        to.sync_all()
            .map_err(|e| FileError::new("syncing", &part, e))?;
        Ok(part)
    }

    /// Verifies the received `downloads/<id>.part` against `expected` and moves it to
    /// `transactions/<id>/image` ([`Staging::verify`], then [`Staging::promote`]).
    pub fn stage(&self, id: &str, expected: &Expected) -> Result<PathBuf, StageError> {
        self.verify(id, expected)?;
        self.promote(id)
    }

    /// Checks the received `downloads/<id>.part` against `expected` where it lies. A mismatch
    /// deletes the download.
    pub fn verify(&self, id: &str, expected: &Expected) -> Result<(), StageError> {
        check_id(id)?;
        let sha256: [u8; 32] = hex::decode(&expected.sha256)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| StageError::BadHash(expected.sha256.clone()))?;
        let part = self.download_path(id);
        match check_image(&part, expected.size, &sha256) {
            Ok(()) => Ok(()),
            Err(ImageError::Storage(e)) => Err(StageError::File(e)),
            Err(mismatch) => {
                durable::remove_all(&part)?;
                Err(mismatch.into())
            }
        }
    }

    /// Moves the verified `downloads/<id>.part` to `transactions/<id>/image` (atomically,
    /// durably), the one path an installer reads.
    pub fn promote(&self, id: &str) -> Result<PathBuf, StageError> {
        check_id(id)?;
        let dir = self.transaction_dir(id);
        // A directory left by an earlier attempt with this id holds nothing the journal refers to.
        durable::remove_all(&dir)?;
        durable::create_private_dir(&dir)?;
        let image = self.image_path(id);
        durable::rename_durable(&self.download_path(id), &image)?;
        Ok(image)
    }

    /// Removes the directory of transaction `id` (its image and work tree).
    pub fn discard(&self, id: &str) -> Result<(), FileError> {
        durable::remove_all(&self.transaction_dir(id))?;
        durable::remove_all(&self.download_path(id))
    }

    /// Removes transaction directories other than `keep`'s (left by a crash between the journal's
    /// last write and the removal). Downloads are left alone: a partial one may be resumed.
    pub fn collect_garbage(&self, keep: Option<&str>) -> Result<(), FileError> {
        let dir = self.root.join("transactions");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FileError::new("listing", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| FileError::new("listing", &dir, e))?;
            if Some(entry.file_name().to_string_lossy().as_ref()) != keep {
                durable::remove_all(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), StageError> {
    sealed_ota_protocol::topics::validate_id(id).map_err(|_| StageError::BadId(id.to_string()))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn expected_for(bytes: &[u8]) -> Expected {
        Expected {
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn only_a_verified_image_reaches_the_installer_path() {
        let state = tempfile::tempdir().unwrap();
        let staging = Staging::new(state.path());
        let source = state.path().join("firmware.bin");
        fs::write(&source, b"firmware v2").unwrap();

        staging.receive_file("c1", &source).unwrap();
        let err = staging
            .stage("c1", &expected_for(b"firmware v3"))
            .unwrap_err();
        assert!(
            matches!(err, StageError::Image(ImageError::HashMismatch { .. })),
            "{err}"
        );
        assert!(!staging.image_path("c1").exists());
        assert!(
            !staging.download_path("c1").exists(),
            "a bad download is not kept"
        );

        staging.receive_file("c1", &source).unwrap();
        let err = staging
            .stage(
                "c1",
                &Expected {
                    size: 3,
                    ..expected_for(b"firmware v2")
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, StageError::Image(ImageError::SizeMismatch { .. })),
            "{err}"
        );

        staging.receive_file("c1", &source).unwrap();
        let image = staging.stage("c1", &expected_for(b"firmware v2")).unwrap();
        assert_eq!(image, staging.image_path("c1"));
        assert_eq!(fs::read(&image).unwrap(), b"firmware v2");
        assert!(!staging.download_path("c1").exists());
    }

    #[test]
    fn ids_must_be_file_names() {
        let state = tempfile::tempdir().unwrap();
        let staging = Staging::new(state.path());
        assert!(matches!(
            staging.stage("../etc", &expected_for(b"")),
            Err(StageError::BadId(_))
        ));
    }

    #[test]
    fn garbage_is_collected_except_the_active_transaction() {
        let state = tempfile::tempdir().unwrap();
        let staging = Staging::new(state.path());
        let source = state.path().join("f");
        fs::write(&source, b"x").unwrap();
        for id in ["old", "active"] {
            staging.receive_file(id, &source).unwrap();
            staging.stage(id, &expected_for(b"x")).unwrap();
        }
        staging.receive_file("partial", &source).unwrap();
        staging.collect_garbage(Some("active")).unwrap();
        assert!(staging.image_path("active").exists());
        assert!(!staging.transaction_dir("old").exists());
        assert!(
            staging.download_path("partial").exists(),
            "a download may still resume"
        );
    }
}
