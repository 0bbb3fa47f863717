//! The emulated device's image slots: the installed image (`firmware.bin` and its record
//! `firmware.json`) and the previous one kept for a rollback (`firmware.prev`), in the device's
//! directory. The install is split into the switch (the previous image kept), and the commit or
//! rollback, so that the session saves "pending install" before the switch and a boot after a
//! crash can tell what happened. Every step is crash-safe (renames, fsync). It makes no protocol
//! decision.
//!
//! ```text
//! <dir>/download.part       image being received (the shared runner writes it)
//! <dir>/firmware.bin        installed image
//! <dir>/firmware.json       version and SHA-256 of firmware.bin
//! <dir>/firmware.prev       the image before the last switch, until commit or rollback
//! <dir>/firmware.staging    half an image: what a power loss during the install leaves
//! <dir>/firmware.dropped     benchmarks only (`run --drop-installed-images`): the SHA-256 of
//!                            the committed image as hashed on disk before it was removed
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sealed_ota_device::durable::{self, FileError, Mode};
use sealed_ota_device::store::{hash_file, Download, ImageError};
use serde::{Deserialize, Serialize};

/// Record of the installed image, next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstalledImage {
    /// Version of the image.
    pub version: String,
    /// SHA-256 of `firmware.bin`, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The image slots of one emulated device.
#[derive(Debug, Clone)]
pub struct ImageSlots {
    root: PathBuf,
}

impl ImageSlots {
    /// The slots in the device directory `root`.
    pub fn in_dir(root: impl Into<PathBuf>) -> Self {
        ImageSlots { root: root.into() }
    }

    /// Where the image being received is written (one per device, whatever the campaign).
    pub fn download_path(&self) -> PathBuf {
        self.root.join("download.part")
    }

    fn download(&self) -> Download {
        Download::at(self.download_path(), true)
    }

    fn staging_path(&self) -> PathBuf {
        self.root.join("firmware.staging")
    }

    /// Path of the installed image.
    pub fn firmware_path(&self) -> PathBuf {
        self.root.join("firmware.bin")
    }

    fn firmware_record_path(&self) -> PathBuf {
        self.root.join("firmware.json")
    }

    fn previous_firmware_path(&self) -> PathBuf {
        self.root.join("firmware.prev")
    }

    fn previous_record_path(&self) -> PathBuf {
        self.root.join("firmware.prev.json")
    }

    /// Cleans what a power loss during an install leaves: a half-written staging image.
    pub fn recover_after_crash(&self) -> Result<(), FileError> {
        durable::remove_all(&self.staging_path())
    }

    /// Starts an install and stops half-way, as a device that loses power while writing its
    /// flash: half the received image lands in the staging slot, nothing is switched.
    pub fn interrupt_install(&self) -> Result<(), FileError> {
        let download = self.download_path();
        let bytes = fs::read(&download).map_err(|e| FileError::new("reading", &download, e))?;
        durable::write_atomic(
            &self.staging_path(),
            &bytes[..bytes.len() / 2],
            Mode::Public,
        )
    }

    /// Makes the received (and checked) image the installed one, keeping the previous image and
    /// its record for a rollback: the previous files are hard-linked aside, then the new image
    /// replaces `firmware.bin` with one rename and its record is written; everything is fsynced.
    /// A crash at any point leaves `firmware.bin` whole (old or new).
    pub fn switch_image(
        &self,
        version: &str,
        size: u64,
        sha256: &[u8; 32],
    ) -> Result<InstalledImage, FileError> {
        for (current, previous) in [
            (self.firmware_path(), self.previous_firmware_path()),
            (self.firmware_record_path(), self.previous_record_path()),
        ] {
            durable::remove_all(&previous)?;
            match fs::hard_link(&current, &previous) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FileError::new("keeping the previous image", &current, e)),
            }
        }
        let download = self.download_path();
        File::open(&download)
            .and_then(|f| f.sync_all())
            .map_err(|e| FileError::new("syncing", &download, e))?;
        durable::rename_durable(&download, &self.firmware_path())?;
        let record = InstalledImage {
            version: version.to_string(),
            sha256: hex::encode(sha256),
            size,
        };
        durable::write_json(&self.firmware_record_path(), &record, Mode::Public, true)?;
        Ok(record)
    }

    /// The new image stays: the previous one is no longer needed.
    pub fn commit_image(&self) -> Result<(), FileError> {
        durable::remove_all(&self.previous_firmware_path())?;
        durable::remove_all(&self.previous_record_path())
    }

    /// The new image failed its self-test: the previous image (and record) come back, each with
    /// one rename. Without a previous image (a device's first install) the new one is removed.
    pub fn roll_back_image(&self) -> Result<(), FileError> {
        for (current, previous) in [
            (self.firmware_path(), self.previous_firmware_path()),
            (self.firmware_record_path(), self.previous_record_path()),
        ] {
            if previous.exists() {
                durable::rename_durable(&previous, &current)?;
            } else {
                durable::remove_all(&current)?;
            }
        }
        durable::sync_dir(&self.root)
    }

    /// SHA-256 of the installed image as it is on disk (not as its record says), if there is one.
    pub fn installed_sha256(&self) -> Result<Option<[u8; 32]>, FileError> {
        let path = self.firmware_path();
        if !path.exists() {
            return Ok(None);
        }
        hash_file(&path).map(|(_, sha)| Some(sha))
    }

    /// Whether the image being received is there and hashes to `sha256`.
    pub fn download_matches(&self, sha256: &[u8; 32]) -> Result<bool, FileError> {
        self.download().matches(sha256)
    }

    /// Installs the received image in one go (check, switch, commit): for tools and tests that
    /// have no self-test to run.
    pub fn install(
        &self,
        version: &str,
        expected_size: u64,
        expected_sha256: &[u8; 32],
    ) -> Result<InstalledImage, ImageError> {
        self.download().check(expected_size, expected_sha256)?;
        let record = self.switch_image(version, expected_size, expected_sha256)?;
        self.commit_image()?;
        Ok(record)
    }

    /// Benchmarks only (`run --drop-installed-images`): hashes the committed image on disk,
    /// writes that hash (hex) to `firmware.dropped` and removes the image, so a run of many
    /// devices with a large image does not keep N copies on one disk. The record stays.
    pub fn drop_installed_image(&self) -> Result<(), FileError> {
        let path = self.firmware_path();
        let (_, sha) = hash_file(&path)?;
        durable::write_atomic(
            &self.dropped_path(),
            hex::encode(sha).as_bytes(),
            Mode::Public,
        )?;
        durable::remove_all(&path)
    }

    /// Where [`Self::drop_installed_image`] writes the hash of the image it removed.
    pub fn dropped_path(&self) -> PathBuf {
        self.root.join("firmware.dropped")
    }

    /// The installed image's record, if any.
    pub fn installed_image(&self) -> Result<Option<InstalledImage>, FileError> {
        durable::read_json(&self.firmware_record_path())
    }
}

/// Flips bit `bit` of the byte at `offset` of `path` (the storage bit-flip fault: the SHA-256
/// check before the install must catch it).
pub fn flip_stored_bit(path: &Path, offset: u64, bit: u8) -> Result<(), FileError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| FileError::new("opening", path, e))?;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut byte))
        .map_err(|e| FileError::new("reading", path, e))?;
    byte[0] ^= 1 << (bit % 8);
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(&byte))
        .map_err(|e| FileError::new("writing", path, e))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// Slots in a fresh directory with "old firmware" installed as 1.0.0 (the directory lives as
    /// long as the returned guard).
    fn slots_running_old_firmware() -> (tempfile::TempDir, ImageSlots, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let slots = ImageSlots::in_dir(tmp.path());
        let old = b"old firmware".to_vec();
        receive(&slots, &old);
        slots
            .install("1.0.0", old.len() as u64, &sha256(&old))
            .unwrap();
        (tmp, slots, old)
    }

    fn receive(slots: &ImageSlots, image: &[u8]) {
        Download::at(slots.download_path(), true)
            .write_chunk(0, image)
            .unwrap();
    }

    #[test]
    fn a_flipped_bit_fails_the_install_and_keeps_the_old_firmware() {
        let (_tmp, slots, old) = slots_running_old_firmware();
        let new = vec![7u8; 3000];
        receive(&slots, &new);
        flip_stored_bit(&slots.download_path(), 1234, 3).unwrap();
        let err = slots
            .install("1.1.0", new.len() as u64, &sha256(&new))
            .unwrap_err();
        assert!(matches!(err, ImageError::HashMismatch { .. }), "{err}");
        assert_eq!(fs::read(slots.firmware_path()).unwrap(), old);
        assert_eq!(slots.installed_image().unwrap().unwrap().version, "1.0.0");
    }

    #[test]
    fn an_interrupted_install_leaves_staging_that_recovery_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let slots = ImageSlots::in_dir(tmp.path());
        let image = vec![9u8; 1000];
        receive(&slots, &image);
        slots.interrupt_install().unwrap();
        assert_eq!(
            fs::read(tmp.path().join("firmware.staging")).unwrap().len(),
            500
        );
        assert!(!slots.firmware_path().exists(), "nothing was switched");
        slots.recover_after_crash().unwrap();
        assert!(!tmp.path().join("firmware.staging").exists());
        // The download survived the crash: the install can be redone.
        slots.install("1.1.0", 1000, &sha256(&image)).unwrap();
    }

    #[test]
    fn a_switch_keeps_the_previous_image_until_commit_or_rollback() {
        let (tmp, slots, old) = slots_running_old_firmware();
        let new = vec![5u8; 4000];
        receive(&slots, &new);
        slots
            .switch_image("2.0.0", new.len() as u64, &sha256(&new))
            .unwrap();
        assert_eq!(slots.installed_sha256().unwrap(), Some(sha256(&new)));
        slots.roll_back_image().unwrap();
        assert_eq!(fs::read(slots.firmware_path()).unwrap(), old);
        assert_eq!(slots.installed_image().unwrap().unwrap().version, "1.0.0");
        // Again, committed this time.
        receive(&slots, &new);
        slots
            .switch_image("2.0.0", new.len() as u64, &sha256(&new))
            .unwrap();
        slots.commit_image().unwrap();
        assert!(!tmp.path().join("firmware.prev").exists());
        assert_eq!(slots.installed_image().unwrap().unwrap().version, "2.0.0");
        assert!(
            !slots.download_matches(&sha256(&new)).unwrap(),
            "moved, not copied"
        );
    }

    #[test]
    fn a_dropped_image_leaves_its_hash_as_stored_and_its_record() {
        let (_tmp, slots, old) = slots_running_old_firmware();
        let mut stored = fs::read(slots.firmware_path()).unwrap();
        stored[0] ^= 1;
        fs::write(slots.firmware_path(), &stored).unwrap();
        slots.drop_installed_image().unwrap();
        assert!(!slots.firmware_path().exists());
        assert_eq!(
            fs::read_to_string(slots.dropped_path()).unwrap(),
            hex::encode(sha256(&stored)),
            "the hash of the bytes on disk, not of the record"
        );
        assert_ne!(stored, old);
        assert_eq!(slots.installed_image().unwrap().unwrap().version, "1.0.0");
    }
}
