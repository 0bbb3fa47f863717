//! One device's files: its identity, the protocol state its session persists, and the image being
//! received. It owns their layout and crash safety: every replacement goes through `durable`
//! (write, fsync, rename, fsync of the directory); the key and certificate switch together with one
//! rename (a generation directory behind a symbolic link), so a crash never leaves a key beside a
//! certificate it does not match; a received image is flushed before the state that counts its
//! chunks is saved, and is only ever used after its size and SHA-256 match the signed manifest (a
//! received delta is first rebuilt against the installed image, see [`Download::complete`]). It
//! makes no protocol decision and installs nothing.
//!
//! Layout of a device directory:
//! ```text
//! <dir>/credentials       -> credentials.<generation> (symbolic link, swapped by rename)
//! <dir>/credentials.<n>/  cert.pem and key.pem (PKCS#8, mode 0600)
//! <dir>/cert.pem          -> credentials/cert.pem (stable path for tools)
//! <dir>/key.pem           -> credentials/key.pem
//! <dir>/state.json        the protocol's DeviceState
//! ```
//! Before the first credential rotation the pair is read from where the device was enrolled:
//! plain `cert.pem` and `key.pem` in the directory (the emulator's older layout), or the files the
//! agent's configuration names ([`DeviceDir::with_enrolled_credentials`]).
//!
//! Small files are written with blocking `std::fs` calls from async tasks on purpose: they go to
//! the page cache in microseconds, and a `spawn_blocking` per chunk would cost more.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sealed_ota_protocol::manifest::{bounded_text, Manifest, RejectReason, MAX_REASON_TEXT};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::durable::{self, FileError, Mode};

/// The directory of one device.
#[derive(Debug, Clone)]
pub struct DeviceDir {
    root: PathBuf,
    /// Whether protocol-state saves (and the chunk data they count) are fsynced.
    durable_state: bool,
    /// Certificate and key used until the first rotation stores a pair here.
    enrolled: Option<(PathBuf, PathBuf)>,
}

impl DeviceDir {
    /// The device directory at `root` (created when first written).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        DeviceDir {
            root: root.into(),
            durable_state: true,
            enrolled: None,
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

    /// Reads the certificate and key from these files until a rotation stores a new pair in the
    /// directory (the agent: the files its configuration names, made at enrolment).
    pub fn with_enrolled_credentials(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.enrolled = Some((cert, key));
        self
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether state saves are fsynced.
    pub fn durable_state(&self) -> bool {
        self.durable_state
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

    /// The generation the `credentials` link points at (`None` when there is none yet).
    fn credentials_generation(&self) -> Option<u64> {
        let target = fs::read_link(self.credentials_link()).ok()?;
        target.to_str()?.strip_prefix("credentials.")?.parse().ok()
    }

    /// Whether a rotation stored a pair in the directory (it then takes precedence over the
    /// enrolled files).
    pub fn has_stored_credentials(&self) -> bool {
        self.credentials_link().join("cert.pem").is_file()
    }

    /// Writes the device's certificate and key, replacing any previous pair in one step: the pair
    /// goes into a new generation directory (both files fsynced, the key mode 0600), then the
    /// `credentials` link is swapped to it with one rename. A crash at any point leaves either the
    /// old pair or the new one, never a mix; a half-written generation is not linked and is
    /// removed at the next boot.
    pub fn write_credentials(&self, cert_pem: &str, key_pem: &str) -> Result<(), FileError> {
        durable::create_private_dir(&self.root)?;
        let generation = self.credentials_generation().map_or(1, |g| g + 1);
        let name = format!("credentials.{generation}");
        let dir = self.root.join(&name);
        durable::remove_all(&dir)?;
        durable::create_private_dir(&dir)?;
        durable::write_atomic(&dir.join("key.pem"), key_pem.as_bytes(), Mode::Private)?;
        durable::write_atomic(&dir.join("cert.pem"), cert_pem.as_bytes(), Mode::Public)?;
        durable::replace_symlink(&self.credentials_link(), Path::new(&name))?;
        for (file, path) in [("cert.pem", self.cert_path()), ("key.pem", self.key_path())] {
            let target = Path::new("credentials").join(file);
            if fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
                durable::replace_symlink(&path, &target)?;
            }
        }
        self.remove_unlinked_credentials()
    }

    /// Removes credential generations the `credentials` link does not point at (older pairs, or a
    /// pair a crash left half-written).
    fn remove_unlinked_credentials(&self) -> Result<(), FileError> {
        let current = self.credentials_generation();
        let entries =
            fs::read_dir(&self.root).map_err(|e| FileError::new("listing", &self.root, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let generation = name
                .to_str()
                .and_then(|n| n.strip_prefix("credentials."))
                .and_then(|g| g.parse::<u64>().ok());
            if generation.is_some() && generation != current {
                durable::remove_all(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Reads the certificate and key (PEM); the key is zeroized on drop. Both come from the one
    /// generation the `credentials` link names; before the first rotation, from the enrolled
    /// files.
    pub fn read_credentials(&self) -> Result<(String, Zeroizing<String>), FileError> {
        let dir = self.credentials_link();
        let (cert, key) = if dir.exists() {
            (dir.join("cert.pem"), dir.join("key.pem"))
        } else if let Some((cert, key)) = &self.enrolled {
            (cert.clone(), key.clone())
        } else {
            (self.cert_path(), self.key_path())
        };
        let cert = read_string(&cert)?;
        let key = Zeroizing::new(read_string(&key)?);
        Ok((cert, key))
    }

    /// Loads the persisted protocol state, `None` for a device that never saved one.
    pub fn load_state<S: DeserializeOwned>(&self) -> Result<Option<S>, FileError> {
        durable::read_json(&self.state_path())
    }

    /// Persists the protocol state (write, fsync, rename, fsync of the directory).
    pub fn save_state<S: Serialize>(&self, state: &S) -> Result<(), FileError> {
        durable::write_json(&self.state_path(), state, Mode::Private, self.durable_state)
    }

    /// Cleans what a crash can leave behind: a credential generation that was never linked.
    pub fn recover_after_crash(&self) -> Result<(), FileError> {
        if self.root.is_dir() {
            self.remove_unlinked_credentials()?;
        }
        Ok(())
    }
}

/// Why a received image is not the one the signed manifest describes.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
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
    /// A delta was received but the installed image is not its base (another image, or none):
    /// nothing is rebuilt or installed.
    #[error("the delta's base image is not the installed image: delta base {expected}, installed {actual}")]
    DeltaBase {
        /// Hex SHA-256 of the base the signed delta manifest names.
        expected: String,
        /// Hex SHA-256 of the installed image ("none" when there is none).
        actual: String,
    },
    /// The received delta does not rebuild an image of the declared size.
    #[error(transparent)]
    Delta(#[from] sealed_ota_protocol::delta::DeltaError),
    /// The disk failed.
    #[error(transparent)]
    Storage(#[from] FileError),
}

impl ImageError {
    /// The reason the device signs in its refusal.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            ImageError::HashMismatch { .. } | ImageError::Delta(_) => {
                RejectReason::ImageHashMismatch
            }
            ImageError::DeltaBase { .. } => RejectReason::DeltaBaseMismatch,
            ImageError::SizeMismatch { .. } | ImageError::Storage(_) => {
                RejectReason::InstallFailed(bounded_text(&self.to_string(), MAX_REASON_TEXT))
            }
        }
    }
}

/// An image being received: plaintext chunks written at their offsets, in any order, duplicates
/// harmless. The file is never read by an installer before [`Download::check`] passed.
#[derive(Debug, Clone)]
pub struct Download {
    path: PathBuf,
    durable: bool,
}

impl Download {
    /// The image received at `path`; `durable`: [`Download::sync`] fsyncs (see
    /// [`DeviceDir::without_state_fsync`]).
    pub fn at(path: impl Into<PathBuf>, durable: bool) -> Self {
        Download {
            path: path.into(),
            durable,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes received plaintext at `offset`.
    pub fn write_chunk(&self, offset: u64, data: &[u8]) -> Result<(), FileError> {
        if let Some(parent) = self.path.parent() {
            if !parent.is_dir() {
                durable::create_private_dir(parent)?;
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(|e| FileError::new("opening", &self.path, e))?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(data))
            .map_err(|e| FileError::new("writing", &self.path, e))
    }

    /// Flushes the file to disk, so that the state saved next (which says which chunks are
    /// stored) never claims more than the disk holds after a power loss.
    pub fn sync(&self) -> Result<(), FileError> {
        if !self.durable {
            return Ok(());
        }
        match File::open(&self.path) {
            Ok(file) => file
                .sync_data()
                .map_err(|e| FileError::new("syncing", &self.path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FileError::new("opening", &self.path, e)),
        }
    }

    /// Removes the file (a new campaign starts from zero; a refused image is not kept).
    pub fn discard(&self) -> Result<(), FileError> {
        durable::remove_all(&self.path)
    }

    /// Checks the received image against the signed manifest (size and SHA-256).
    pub fn check(&self, expected_size: u64, expected_sha256: &[u8; 32]) -> Result<(), ImageError> {
        check_image(&self.path, expected_size, expected_sha256)
    }

    /// Makes what was received for `manifest` the image it describes, and checks it (size and
    /// SHA-256 of the signed manifest). A full-image transfer is only checked. A delta
    /// ([`Manifest::delta`]) is applied to the installed image at `installed` (refused as
    /// [`ImageError::DeltaBase`] unless it hashes to the delta's base SHA-256); the rebuilt image
    /// is written beside the download, fsynced, checked, and only then renamed over the received
    /// delta. A download that already is the full image (a restart after that rename) is only
    /// checked. On an error nothing is renamed: the caller discards the download.
    pub fn complete(
        &self,
        manifest: &Manifest,
        installed: Option<&Path>,
    ) -> Result<(), ImageError> {
        let Some(delta) = &manifest.delta else {
            return self.check(manifest.size, &manifest.sha256);
        };
        // Already rebuilt (a restart after the rename)? Only a file of the image's size can be;
        // the hash decides only when the delta happens to have that size too.
        let len = file_len(&self.path)?;
        if len == manifest.size && (len != delta.size || self.matches(&manifest.sha256)?) {
            return self.check(manifest.size, &manifest.sha256);
        }
        expect_size(delta.size, len)?;
        let base = match installed {
            Some(path) if path.exists() => {
                fs::read(path).map_err(|e| FileError::new("reading", path, e))?
            }
            _ => Vec::new(),
        };
        let base_sha256: [u8; 32] = Sha256::digest(&base).into();
        if base_sha256 != delta.base_sha256 || installed.is_none() {
            return Err(ImageError::DeltaBase {
                expected: hex::encode(delta.base_sha256),
                actual: if base.is_empty() {
                    "none".into()
                } else {
                    hex::encode(base_sha256)
                },
            });
        }
        let rebuilt = self.path.with_extension("rebuilt");
        let received =
            File::open(&self.path).map_err(|e| FileError::new("opening", &self.path, e))?;
        let out = File::create(&rebuilt).map_err(|e| FileError::new("creating", &rebuilt, e))?;
        let mut out = io::BufWriter::new(out);
        let applied = sealed_ota_protocol::delta::apply(
            &base,
            io::BufReader::new(received),
            &mut out,
            manifest.size,
        );
        let synced = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_data())
            .map_err(|e| FileError::new("writing", &rebuilt, e));
        let checked = applied
            .map_err(ImageError::from)
            .and(synced.map_err(ImageError::from))
            .and_then(|_| check_image(&rebuilt, manifest.size, &manifest.sha256));
        if let Err(e) = checked {
            durable::remove_all(&rebuilt)?;
            return Err(e);
        }
        Ok(durable::rename_durable(&rebuilt, &self.path)?)
    }

    /// Whether the file is there and hashes to `sha256`.
    pub fn matches(&self, sha256: &[u8; 32]) -> Result<bool, FileError> {
        if !self.path.exists() {
            return Ok(false);
        }
        hash_file(&self.path).map(|(_, sha)| &sha == sha256)
    }
}

/// The length of the file at `path`.
fn file_len(path: &Path) -> Result<u64, FileError> {
    Ok(fs::metadata(path)
        .map_err(|e| FileError::new("reading the size of", path, e))?
        .len())
}

/// Refuses a file of `actual` bytes where `expected` were declared.
fn expect_size(expected: u64, actual: u64) -> Result<(), ImageError> {
    if actual != expected {
        return Err(ImageError::SizeMismatch { expected, actual });
    }
    Ok(())
}

/// Checks the file at `path` against an expected size and SHA-256.
pub fn check_image(
    path: &Path,
    expected_size: u64,
    expected_sha256: &[u8; 32],
) -> Result<(), ImageError> {
    let (actual_size, actual_sha256) = hash_file(path)?;
    expect_size(expected_size, actual_size)?;
    if &actual_sha256 != expected_sha256 {
        return Err(ImageError::HashMismatch {
            expected: hex::encode(expected_sha256),
            actual: hex::encode(actual_sha256),
        });
    }
    Ok(())
}

/// Size and SHA-256 of a file.
pub fn hash_file(path: &Path) -> Result<(u64, [u8; 32]), FileError> {
    let mut file = File::open(path).map_err(|e| FileError::new("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|e| FileError::new("reading", path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((size, hasher.finalize().into()))
}

fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("reading", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
    fn chunks_written_out_of_order_check_against_the_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let download = Download::at(tmp.path().join("downloads/c1.part"), true);
        let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        download.write_chunk(4096, &image[4096..8192]).unwrap();
        download.write_chunk(8192, &image[8192..]).unwrap();
        download.write_chunk(0, &image[..4096]).unwrap();
        // A duplicate chunk rewrites the same bytes: harmless.
        download.write_chunk(4096, &image[4096..8192]).unwrap();
        download.sync().unwrap();
        download.check(image.len() as u64, &sha256(&image)).unwrap();
        assert!(download.matches(&sha256(&image)).unwrap());
        assert_eq!(fs::read(download.path()).unwrap(), image);
        let err = download
            .check(image.len() as u64, &sha256(b"other"))
            .unwrap_err();
        assert!(matches!(err, ImageError::HashMismatch { .. }), "{err}");
        download.discard().unwrap();
        assert!(!download.matches(&sha256(&image)).unwrap());
    }

    /// A base image, a release that shares most of it, the delta between them and a manifest
    /// describing the release with that delta.
    fn delta_release() -> (Vec<u8>, Vec<u8>, Vec<u8>, Manifest) {
        let base: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut target = base.clone();
        target[70_000..72_000].fill(0x5a);
        target.extend_from_slice(b"2.0.0");
        let delta = sealed_ota_protocol::delta::make(&base, &target).unwrap();
        let manifest = Manifest {
            campaign_id: "c1".into(),
            device_id: "d1".into(),
            version: "2.0.0".into(),
            size: target.len() as u64,
            sha256: sha256(&target),
            chunk_size: 4096,
            chunk_count: delta.len().div_ceil(4096) as u32,
            merkle_root: [0; 32],
            expires_at: u64::MAX,
            allow_downgrade: false,
            kind: sealed_ota_protocol::PayloadKind::Firmware,
            release: None,
            pull: false,
            delta: Some(sealed_ota_protocol::DeltaManifest {
                base_version: "1.0.0".into(),
                base_sha256: sha256(&base),
                size: delta.len() as u64,
            }),
        };
        (base, target, delta, manifest)
    }

    /// A received delta becomes the full image, checked against the manifest's SHA-256, and a
    /// second completion (a restart after the rename) finds the image already rebuilt.
    #[test]
    fn a_received_delta_is_rebuilt_against_the_installed_image() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, target, delta, manifest) = delta_release();
        let installed = tmp.path().join("firmware.bin");
        fs::write(&installed, &base).unwrap();
        let download = Download::at(tmp.path().join("download.part"), true);
        download.write_chunk(0, &delta).unwrap();
        download.complete(&manifest, Some(&installed)).unwrap();
        assert_eq!(fs::read(download.path()).unwrap(), target);
        assert!(!tmp.path().join("download.rebuilt").exists());
        download.complete(&manifest, Some(&installed)).unwrap();
        assert_eq!(fs::read(download.path()).unwrap(), target);
    }

    /// Another installed image, none, or a delta that rebuilds another image: a typed refusal,
    /// the received delta left as it was (the caller discards it), no rebuilt file.
    #[test]
    fn a_delta_for_another_base_or_a_tampered_delta_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, _, delta, manifest) = delta_release();
        let installed = tmp.path().join("firmware.bin");
        let mut other = base.clone();
        other[0] ^= 1;
        fs::write(&installed, &other).unwrap();
        let download = Download::at(tmp.path().join("download.part"), true);
        download.write_chunk(0, &delta).unwrap();
        let err = download.complete(&manifest, Some(&installed)).unwrap_err();
        assert!(matches!(err, ImageError::DeltaBase { .. }), "{err}");
        assert_eq!(err.reject_reason(), RejectReason::DeltaBaseMismatch);
        let err = download.complete(&manifest, None).unwrap_err();
        assert!(matches!(err, ImageError::DeltaBase { .. }), "{err}");
        assert_eq!(fs::read(download.path()).unwrap(), delta);

        fs::write(&installed, &base).unwrap();
        // The manifest signs another full image than the delta rebuilds (a delta swapped for
        // another one of the same size): the rebuilt image's SHA-256 refuses it.
        let mut swapped = manifest.clone();
        swapped.sha256[0] ^= 1;
        let err = download.complete(&swapped, Some(&installed)).unwrap_err();
        assert!(matches!(err, ImageError::HashMismatch { .. }), "{err}");
        assert_eq!(err.reject_reason(), RejectReason::ImageHashMismatch);
        assert!(!tmp.path().join("download.rebuilt").exists());
        assert_eq!(fs::read(download.path()).unwrap(), delta);
    }

    /// A received delta of another length than the manifest declares for the delta is refused
    /// before anything is decoded (the size check, no rebuilt file).
    #[test]
    fn a_short_delta_is_a_size_mismatch_of_the_delta() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, _, delta, manifest) = delta_release();
        let installed = tmp.path().join("firmware.bin");
        fs::write(&installed, &base).unwrap();
        let download = Download::at(tmp.path().join("download.part"), true);
        download.write_chunk(0, &delta[..delta.len() - 1]).unwrap();
        let err = download.complete(&manifest, Some(&installed)).unwrap_err();
        let expected = delta.len() as u64;
        assert!(
            matches!(err, ImageError::SizeMismatch { expected: e, .. } if e == expected),
            "{err}"
        );
        assert!(!tmp.path().join("download.rebuilt").exists());
    }

    #[test]
    fn a_short_image_is_a_size_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let download = Download::at(tmp.path().join("download.part"), true);
        let image = vec![1u8; 100];
        download.write_chunk(0, &image[..50]).unwrap();
        let err = download.check(100, &sha256(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::SizeMismatch {
                    expected: 100,
                    actual: 50
                }
            ),
            "{err}"
        );
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

    /// The agent: the enrolled pair (its configuration's files) is used until a rotation stores one.
    #[test]
    fn enrolled_credentials_are_used_until_a_rotation_stores_a_pair() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("device.crt"), "ENROLLED CERT").unwrap();
        fs::write(tmp.path().join("device.key"), "ENROLLED KEY").unwrap();
        let dir = DeviceDir::at(tmp.path().join("state")).with_enrolled_credentials(
            tmp.path().join("device.crt"),
            tmp.path().join("device.key"),
        );
        assert!(!dir.has_stored_credentials());
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!(
            (cert.as_str(), key.as_str()),
            ("ENROLLED CERT", "ENROLLED KEY")
        );
        dir.write_credentials("ROTATED CERT", "ROTATED KEY")
            .unwrap();
        assert!(dir.has_stored_credentials());
        let (cert, key) = dir.read_credentials().unwrap();
        assert_eq!(
            (cert.as_str(), key.as_str()),
            ("ROTATED CERT", "ROTATED KEY")
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("device.crt")).unwrap(),
            "ENROLLED CERT",
            "the enrolled files are left alone"
        );
    }
}
