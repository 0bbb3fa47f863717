//! On-disk state of an emulated fleet: one directory per device holding its identity, the
//! protocol state the session asks to persist, the image being received and the installed
//! image. It owns file layout and crash safety: every replacement is write, fsync, rename, fsync
//! of the directory; the key and certificate switch together with one rename (a generation
//! directory behind a symbolic link), so a crash never leaves a key beside a certificate it does
//! not match; the install is split into a check of the received image, the switch (the previous
//! image kept) and the commit or rollback, so that a caller persists "pending install" before
//! the switch and reconciles after a crash. It makes no protocol decision.
//!
//! Layout:
//! ```text
//! <fleet>/fleet.json                     manager id, topic prefix, initial version, release keys
//! <fleet>/ca.crt                         trust anchor (inner channel, and broker TLS by default)
//! <fleet>/devices/<id>/credentials       -> credentials.<generation> (symbolic link, swapped by rename)
//! <fleet>/devices/<id>/credentials.<n>/  cert.pem (CN = id) and key.pem (PKCS#8, mode 0600)
//! <fleet>/devices/<id>/cert.pem          -> credentials/cert.pem (stable path for tools)
//! <fleet>/devices/<id>/key.pem           -> credentials/key.pem
//! <fleet>/devices/<id>/state.json        the protocol's DeviceState
//! <fleet>/devices/<id>/download.part     image being received, written at chunk offsets
//! <fleet>/devices/<id>/firmware.bin      installed image
//! <fleet>/devices/<id>/firmware.json     version and SHA-256 of firmware.bin
//! <fleet>/devices/<id>/firmware.prev     the image before the last switch, until commit or rollback
//! ```
//! Small files are written with blocking `std::fs` calls from async tasks on purpose: they go
//! to the page cache in microseconds, and a `spawn_blocking` per chunk would cost more.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Settings shared by every device of a fleet, written at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetSettings {
    /// Manager id the devices expect (topic level and certificate name).
    pub manager_id: String,
    /// MQTT topic prefix.
    pub topic_prefix: String,
    /// Version a freshly enrolled device runs.
    pub initial_version: String,
    /// Release public keys the devices trust (hex of the uncompressed SEC1 point). Empty: the
    /// fleet does not use release keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_keys: Vec<String>,
}

/// The root directory of an enrolled fleet.
#[derive(Debug, Clone)]
pub struct FleetDir {
    root: PathBuf,
}

impl FleetDir {
    /// A fleet rooted at `root` (not checked until read).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FleetDir { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the CA certificate the devices trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    fn settings_path(&self) -> PathBuf {
        self.root.join("fleet.json")
    }

    fn devices_root(&self) -> PathBuf {
        self.root.join("devices")
    }

    /// Writes `fleet.json` and `ca.crt`, creating the directories.
    pub fn initialise(&self, settings: &FleetSettings, ca_cert_pem: &str) -> Result<()> {
        create_dir(&self.devices_root())?;
        write_json_atomic(&self.settings_path(), settings)?;
        write_atomic(&self.ca_cert_path(), ca_cert_pem.as_bytes(), false)
    }

    /// Reads `fleet.json`.
    pub fn settings(&self) -> Result<FleetSettings> {
        read_json(&self.settings_path())?.ok_or_else(|| {
            Error::Config(format!(
                "{} is not an enrolled fleet (no fleet.json): run `enroll` first",
                self.root.display()
            ))
        })
    }

    /// The directory of device `id`.
    pub fn device(&self, id: &str) -> DeviceDir {
        DeviceDir {
            durable_state: true,
            root: self.devices_root().join(id),
        }
    }

    /// Ids of every enrolled device, sorted.
    pub fn device_ids(&self) -> Result<Vec<String>> {
        let root = self.devices_root();
        let entries = fs::read_dir(&root).map_err(|e| Error::io("listing", &root, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &root, e))?;
            if entry.path().join("cert.pem").is_file() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

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

/// Why an install did not happen. The device reports it, signed, through the protocol.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The received image does not hash to the manifest's SHA-256.
    #[error("image SHA-256 mismatch: manifest {expected}, received {actual}")]
    HashMismatch {
        /// Hex SHA-256 from the signed manifest.
        expected: String,
        /// Hex SHA-256 of what was received.
        actual: String,
    },
    /// The received image has the wrong size.
    #[error("image size mismatch: manifest {expected} bytes, received {actual}")]
    SizeMismatch {
        /// Size from the manifest.
        expected: u64,
        /// Size received.
        actual: u64,
    },
    /// The disk failed.
    #[error(transparent)]
    Storage(#[from] Error),
}

/// The directory of one device.
#[derive(Debug, Clone)]
pub struct DeviceDir {
    root: PathBuf,
    /// Whether protocol-state saves (and the chunk data they count) are fsynced.
    durable_state: bool,
}

impl DeviceDir {
    /// A device directory at `root` (for tests and tools; fleets use [`FleetDir::device`]).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        DeviceDir {
            root: root.into(),
            durable_state: true,
        }
    }

    /// Benchmarks only (`run --no-state-fsync`): the frequent protocol-state saves and the chunk
    /// data they count are not fsynced (thousands of emulated devices share one disk, where each
    /// real device has its own). A power cut may then lose the last saves; credentials and installs
    /// are fsynced regardless.
    pub fn without_state_fsync(mut self) -> Self {
        self.durable_state = false;
        self
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn credentials_link(&self) -> PathBuf {
        self.root.join("credentials")
    }
    fn cert_path(&self) -> PathBuf {
        self.root.join("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.root.join("key.pem")
    }
    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }
    fn download_path(&self) -> PathBuf {
        self.root.join("download.part")
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

    /// The generation the `credentials` link points at (0 when there is none yet).
    fn credentials_generation(&self) -> Option<u64> {
        let target = fs::read_link(self.credentials_link()).ok()?;
        target.to_str()?.strip_prefix("credentials.")?.parse().ok()
    }

    /// Writes the device's certificate and key, replacing any previous pair in one step: the pair
    /// goes into a new generation directory (both files fsynced, the key mode 0600), then the
    /// `credentials` link is swapped to it with one rename. A crash at any point leaves either the
    /// old pair or the new one, never a mix; a half-written generation is not linked and is
    /// removed at the next boot.
    pub fn write_credentials(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        create_dir(&self.root)?;
        let generation = self.credentials_generation().map_or(1, |g| g + 1);
        let name = format!("credentials.{generation}");
        let dir = self.root.join(&name);
        remove_dir_if_present(&dir)?;
        create_dir(&dir)?;
        write_atomic(&dir.join("key.pem"), key_pem.as_bytes(), true)?;
        write_atomic(&dir.join("cert.pem"), cert_pem.as_bytes(), false)?;
        replace_with_symlink(&self.credentials_link(), Path::new(&name))?;
        for (file, path) in [("cert.pem", self.cert_path()), ("key.pem", self.key_path())] {
            let target = Path::new("credentials").join(file);
            if fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
                replace_with_symlink(&path, &target)?;
            }
        }
        self.remove_unlinked_credentials()
    }

    /// Removes credential generations the `credentials` link does not point at (older pairs, or a
    /// pair a crash left half-written).
    fn remove_unlinked_credentials(&self) -> Result<()> {
        let current = self.credentials_generation();
        let entries = fs::read_dir(&self.root).map_err(|e| Error::io("listing", &self.root, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let generation = name
                .to_str()
                .and_then(|n| n.strip_prefix("credentials."))
                .and_then(|g| g.parse::<u64>().ok());
            if generation.is_some() && generation != current {
                remove_dir_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Reads the certificate and key (PEM); the key is zeroized on drop. Both come from the one
    /// generation the `credentials` link names (a device enrolled by an older version, with plain
    /// `cert.pem` and `key.pem` files, is read from those).
    pub fn read_credentials(&self) -> Result<(String, zeroize::Zeroizing<String>)> {
        let dir = self.credentials_link();
        let (cert, key) = if dir.exists() {
            (dir.join("cert.pem"), dir.join("key.pem"))
        } else {
            (self.cert_path(), self.key_path())
        };
        let cert = read_string(&cert)?;
        let key = zeroize::Zeroizing::new(read_string(&key)?);
        Ok((cert, key))
    }

    /// Loads the persisted protocol state, `None` for a device that never saved one.
    pub fn load_state<S: DeserializeOwned>(&self) -> Result<Option<S>> {
        read_json(&self.state_path())
    }

    /// Persists the protocol state (write, fsync, rename, fsync of the directory).
    pub fn save_state<S: Serialize>(&self, state: &S) -> Result<()> {
        let path = self.state_path();
        let bytes = serde_json::to_vec(state).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        write_file_atomic(&path, &bytes, false, self.durable_state)
    }

    /// Flushes the image being received to disk, so that the state saved next (which says which
    /// chunks are stored) never claims more than the disk holds after a power loss.
    pub fn sync_download(&self) -> Result<()> {
        if !self.durable_state {
            return Ok(());
        }
        let path = self.download_path();
        match File::open(&path) {
            Ok(file) => file.sync_data().map_err(|e| Error::io("syncing", &path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("opening", &path, e)),
        }
    }

    /// Writes received plaintext at `offset` of the image being received.
    pub fn write_chunk(&self, offset: u64, data: &[u8]) -> Result<()> {
        let path = self.download_path();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(data))
            .map_err(|e| Error::io("writing", &path, e))
    }

    /// Removes the image being received (a new campaign starts from zero).
    pub fn discard_download(&self) -> Result<()> {
        remove_if_present(&self.download_path())
    }

    /// Cleans what a crash can leave behind: a half-written staging image, a credential
    /// generation that was never linked.
    pub fn recover_after_crash(&self) -> Result<()> {
        remove_if_present(&self.staging_path())?;
        if self.root.is_dir() {
            self.remove_unlinked_credentials()?;
        }
        Ok(())
    }

    /// Starts an install and stops half-way, as a device that loses power while writing its
    /// flash: half the received image lands in the staging slot, nothing is switched.
    pub fn interrupt_install(&self) -> Result<()> {
        let download = self.download_path();
        let bytes = fs::read(&download).map_err(|e| Error::io("reading", &download, e))?;
        write_atomic(&self.staging_path(), &bytes[..bytes.len() / 2], false)
    }

    /// Checks the received image against the signed manifest (size and SHA-256) without
    /// installing anything.
    pub fn check_download(
        &self,
        expected_size: u64,
        expected_sha256: &[u8; 32],
    ) -> Result<(), InstallError> {
        let (actual_size, actual_sha256) = hash_file(&self.download_path())?;
        if actual_size != expected_size {
            return Err(InstallError::SizeMismatch {
                expected: expected_size,
                actual: actual_size,
            });
        }
        if &actual_sha256 != expected_sha256 {
            return Err(InstallError::HashMismatch {
                expected: hex::encode(expected_sha256),
                actual: hex::encode(actual_sha256),
            });
        }
        Ok(())
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
    ) -> Result<InstalledImage> {
        for (current, previous) in [
            (self.firmware_path(), self.previous_firmware_path()),
            (self.firmware_record_path(), self.previous_record_path()),
        ] {
            remove_if_present(&previous)?;
            match fs::hard_link(&current, &previous) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("keeping the previous image", &current, e)),
            }
        }
        let download = self.download_path();
        let firmware = self.firmware_path();
        File::open(&download)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("syncing", &download, e))?;
        fs::rename(&download, &firmware).map_err(|e| Error::io("installing", &firmware, e))?;
        sync_dir(&self.root)?;
        let record = InstalledImage {
            version: version.to_string(),
            sha256: hex::encode(sha256),
            size,
        };
        write_json_atomic(&self.firmware_record_path(), &record)?;
        Ok(record)
    }

    /// The new image stays: the previous one is no longer needed.
    pub fn commit_image(&self) -> Result<()> {
        remove_if_present(&self.previous_firmware_path())?;
        remove_if_present(&self.previous_record_path())
    }

    /// The new image failed its self-test: the previous image (and record) come back, each with
    /// one rename. Without a previous image (a device's first install) the new one is removed.
    pub fn roll_back_image(&self) -> Result<()> {
        for (current, previous) in [
            (self.firmware_path(), self.previous_firmware_path()),
            (self.firmware_record_path(), self.previous_record_path()),
        ] {
            if previous.exists() {
                fs::rename(&previous, &current)
                    .map_err(|e| Error::io("rolling back", &current, e))?;
            } else {
                remove_if_present(&current)?;
            }
        }
        sync_dir(&self.root)
    }

    /// SHA-256 of the installed image as it is on disk (not as its record says), if there is one.
    pub fn installed_sha256(&self) -> Result<Option<[u8; 32]>> {
        let path = self.firmware_path();
        if !path.exists() {
            return Ok(None);
        }
        hash_file(&path).map(|(_, sha)| Some(sha))
    }

    /// Whether the image being received is there and hashes to `sha256`.
    pub fn download_matches(&self, sha256: &[u8; 32]) -> Result<bool> {
        if !self.download_path().exists() {
            return Ok(false);
        }
        hash_file(&self.download_path()).map(|(_, sha)| &sha == sha256)
    }

    /// Installs the received image in one go (check, switch, commit): for tools and tests that
    /// have no self-test to run.
    pub fn install(
        &self,
        version: &str,
        expected_size: u64,
        expected_sha256: &[u8; 32],
    ) -> Result<InstalledImage, InstallError> {
        self.check_download(expected_size, expected_sha256)?;
        let record = self.switch_image(version, expected_size, expected_sha256)?;
        self.commit_image()?;
        Ok(record)
    }

    /// The installed image's record, if any.
    pub fn installed_image(&self) -> Result<Option<InstalledImage>> {
        read_json(&self.firmware_record_path())
    }

    /// Flips one bit of the image being received at `offset` (the storage bit-flip fault:
    /// the SHA-256 check at install must catch it).
    pub fn flip_stored_bit(&self, offset: u64, bit: u8) -> Result<()> {
        let path = self.download_path();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        let mut byte = [0u8; 1];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut byte))
            .map_err(|e| Error::io("reading", &path, e))?;
        byte[0] ^= 1 << (bit % 8);
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&byte))
            .map_err(|e| Error::io("writing", &path, e))
    }
}

fn hash_file(path: &Path) -> Result<(u64, [u8; 32])> {
    let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|e| Error::io("reading", path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((size, hasher.finalize().into()))
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| Error::io("creating directory", path, e))
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", path, e)),
    }
}

/// fsync a directory, so that a rename or a new file in it survives a power loss.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing directory", dir, e))
}

/// Points `link` at `target` (relative) with one rename over whatever `link` was.
fn replace_with_symlink(link: &Path, target: &Path) -> Result<()> {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    remove_if_present(&tmp)?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io("linking", &tmp, e))?;
    #[cfg(not(unix))]
    return Err(Error::Config(format!(
        "{}: the device store needs symbolic links (Unix)",
        link.display()
    )));
    #[cfg(unix)]
    {
        fs::rename(&tmp, link).map_err(|e| Error::io("renaming into", link, e))?;
        sync_dir(link.parent().unwrap_or(Path::new(".")))
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing", path, e)),
    }
}

fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes, false)
}

/// Writes `bytes` to a temporary file next to `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory, so readers see the old or the new content, never a mix, and the new
/// content survives a power loss once this returns.
fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    write_file_atomic(path, bytes, private, true)
}

/// `write_atomic`, fsyncs only when `durable`.
fn write_file_atomic(path: &Path, bytes: &[u8], private: bool, durable: bool) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&tmp)
        .map_err(|e| Error::io("creating", &tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| if durable { file.sync_all() } else { Ok(()) })
        .map_err(|e| Error::io("writing", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io("renaming into", path, e))?;
    if durable {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ExampleState {
        running_version: String,
        received: Vec<u32>,
    }

    #[test]
    fn state_round_trips_and_is_absent_before_the_first_save() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path().join("dev-1"));
        dir.write_credentials("CERT", "KEY").unwrap();
        assert_eq!(dir.load_state::<ExampleState>().unwrap(), None);
        let state = ExampleState {
            running_version: "1.0.0".into(),
            received: vec![0, 2],
        };
        dir.save_state(&state).unwrap();
        assert_eq!(dir.load_state::<ExampleState>().unwrap(), Some(state));
        assert!(!tmp.path().join("dev-1/state.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        fs::write(tmp.path().join("state.json"), b"{not json").unwrap();
        let err = dir.load_state::<ExampleState>().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path().join("d"));
        dir.write_credentials("CERT", "KEY").unwrap();
        let mode = fs::metadata(tmp.path().join("d/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!((cert.as_str(), key.as_str()), ("CERT", "KEY"));
    }

    #[test]
    fn chunks_written_out_of_order_install_when_the_hash_matches() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        dir.write_chunk(4096, &image[4096..8192]).unwrap();
        dir.write_chunk(8192, &image[8192..]).unwrap();
        dir.write_chunk(0, &image[..4096]).unwrap();
        // A duplicate chunk rewrites the same bytes: harmless.
        dir.write_chunk(4096, &image[4096..8192]).unwrap();
        let record = dir
            .install("1.1.0", image.len() as u64, &sha256(&image))
            .unwrap();
        assert_eq!(record.version, "1.1.0");
        assert_eq!(fs::read(dir.firmware_path()).unwrap(), image);
        assert_eq!(dir.installed_image().unwrap(), Some(record));
        assert!(!tmp.path().join("download.part").exists());
    }

    #[test]
    fn a_flipped_bit_fails_the_install_and_keeps_the_old_firmware() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        let old = b"old firmware".to_vec();
        dir.write_chunk(0, &old).unwrap();
        dir.install("1.0.0", old.len() as u64, &sha256(&old))
            .unwrap();
        let new = vec![7u8; 3000];
        dir.write_chunk(0, &new).unwrap();
        dir.flip_stored_bit(1234, 3).unwrap();
        let err = dir
            .install("1.1.0", new.len() as u64, &sha256(&new))
            .unwrap_err();
        assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
        assert_eq!(fs::read(dir.firmware_path()).unwrap(), old);
        assert_eq!(dir.installed_image().unwrap().unwrap().version, "1.0.0");
    }

    #[test]
    fn a_short_image_is_a_size_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        let image = vec![1u8; 100];
        dir.write_chunk(0, &image[..50]).unwrap();
        let err = dir.install("2.0.0", 100, &sha256(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::SizeMismatch {
                    expected: 100,
                    actual: 50
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_interrupted_install_leaves_staging_that_recovery_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        let image = vec![9u8; 1000];
        dir.write_chunk(0, &image).unwrap();
        dir.interrupt_install().unwrap();
        assert_eq!(
            fs::read(tmp.path().join("firmware.staging")).unwrap().len(),
            500
        );
        assert!(!dir.firmware_path().exists(), "nothing was switched");
        dir.recover_after_crash().unwrap();
        assert!(!tmp.path().join("firmware.staging").exists());
        // The download survived the crash: the install can be redone.
        dir.install("1.1.0", 1000, &sha256(&image)).unwrap();
    }

    #[test]
    fn rotated_credentials_replace_the_old_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        dir.write_credentials("OLD CERT", "OLD KEY").unwrap();
        dir.write_credentials("NEW CERT", "NEW KEY").unwrap();
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!((cert.as_str(), key.as_str()), ("NEW CERT", "NEW KEY"));
    }

    /// The key and certificate switch together: a crash while a new pair is written leaves the old
    /// pair (which match each other) in use, and the next boot removes the half-written one.
    #[test]
    fn an_interrupted_credential_write_boots_the_old_matching_pair() {
        use sealed_ota_protocol::{CertificateAuthority, Identity, Role};
        let now = 1_800_000_000;
        let ca = CertificateAuthority::generate("ca", now, 1).unwrap();
        let old = ca.issue(Role::Device, "d", now, 1).unwrap();
        let new = ca.issue(Role::Device, "d", now, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path().join("d"));
        dir.write_credentials(&old.cert_pem(), &old.key_pem())
            .unwrap();
        // Power lost while the next pair was being written: its key is there, its certificate not,
        // and the link still names the old generation.
        let half = tmp.path().join("d/credentials.2");
        fs::create_dir_all(&half).unwrap();
        fs::write(half.join("key.pem"), new.key_pem().as_bytes()).unwrap();
        let (cert, key) = dir.read_credentials().unwrap();
        let booted = Identity::from_pem(&cert, &key).expect("a matching pair");
        assert_eq!(booted.fingerprint(), old.fingerprint());
        dir.recover_after_crash().unwrap();
        assert!(!half.exists(), "the half-written generation is removed");
        // A complete write switches both at once; the stable paths follow.
        dir.write_credentials(&new.cert_pem(), &new.key_pem())
            .unwrap();
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!(
            Identity::from_pem(&cert, &key).unwrap().fingerprint(),
            new.fingerprint()
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("d/cert.pem")).unwrap(),
            new.cert_pem()
        );
        let generations = fs::read_dir(tmp.path().join("d"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("credentials.") && !name.ends_with(".tmp")
            })
            .count();
        assert_eq!(generations, 1, "older generations are removed");
    }

    #[test]
    fn credentials_of_the_older_plain_layout_still_load() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("cert.pem"), "CERT").unwrap();
        fs::write(tmp.path().join("key.pem"), "KEY").unwrap();
        let dir = DeviceDir::at(tmp.path());
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!((cert.as_str(), key.as_str()), ("CERT", "KEY"));
        // The next write moves it to the new layout.
        dir.write_credentials("CERT2", "KEY2").unwrap();
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!((cert.as_str(), key.as_str()), ("CERT2", "KEY2"));
        assert_eq!(
            fs::read_to_string(tmp.path().join("key.pem")).unwrap(),
            "KEY2"
        );
    }

    #[test]
    fn a_switch_keeps_the_previous_image_until_commit_or_rollback() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DeviceDir::at(tmp.path());
        let old = b"old firmware".to_vec();
        dir.write_chunk(0, &old).unwrap();
        dir.install("1.0.0", old.len() as u64, &sha256(&old))
            .unwrap();
        let new = vec![5u8; 4000];
        dir.write_chunk(0, &new).unwrap();
        dir.check_download(new.len() as u64, &sha256(&new)).unwrap();
        dir.switch_image("2.0.0", new.len() as u64, &sha256(&new))
            .unwrap();
        assert_eq!(dir.installed_sha256().unwrap(), Some(sha256(&new)));
        dir.roll_back_image().unwrap();
        assert_eq!(fs::read(dir.firmware_path()).unwrap(), old);
        assert_eq!(dir.installed_image().unwrap().unwrap().version, "1.0.0");
        // Again, committed this time.
        dir.write_chunk(0, &new).unwrap();
        dir.switch_image("2.0.0", new.len() as u64, &sha256(&new))
            .unwrap();
        dir.commit_image().unwrap();
        assert!(!tmp.path().join("firmware.prev").exists());
        assert_eq!(dir.installed_image().unwrap().unwrap().version, "2.0.0");
        assert!(
            !dir.download_matches(&sha256(&new)).unwrap(),
            "moved, not copied"
        );
    }

    #[test]
    fn fleet_lists_enrolled_devices_sorted_and_reads_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = FleetDir::new(tmp.path());
        let settings = FleetSettings {
            manager_id: "manager".into(),
            topic_prefix: "iot".into(),
            initial_version: "1.0.0".into(),
            release_keys: Vec::new(),
        };
        fleet.initialise(&settings, "CA").unwrap();
        for id in ["dev-2", "dev-10", "dev-1"] {
            fleet.device(id).write_credentials("C", "K").unwrap();
        }
        fs::create_dir_all(tmp.path().join("devices/not-enrolled")).unwrap();
        assert_eq!(fleet.device_ids().unwrap(), ["dev-1", "dev-10", "dev-2"]);
        assert_eq!(fleet.settings().unwrap(), settings);
        assert_eq!(fs::read_to_string(fleet.ca_cert_path()).unwrap(), "CA");
    }

    #[test]
    fn an_unenrolled_directory_says_to_enroll() {
        let tmp = tempfile::tempdir().unwrap();
        let err = FleetDir::new(tmp.path()).settings().unwrap_err();
        assert!(err.to_string().contains("enroll"), "{err}");
    }
}
