//! `keygen`: the device's P-256 key and a certificate signing request, made on the device so the
//! key never leaves it. It owns the key file's creation (mode 0600, never silently replacing an
//! existing key) and the CSR's PEM form; the CSR's content (common name, SAN URI) is the protocol
//! crate's `identity::generate_csr`, the same that the manager's CA expects.

use std::path::{Path, PathBuf};

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use sealed_ota_protocol::identity::{generate_csr, Role};
use sealed_ota_protocol::IdentityError;

use crate::durable::{self, FileError, Mode};

/// Why no key was made.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// A key already exists and `--force` was not given.
    #[error("{} already exists; keep it, or pass --force to replace it (the device's certificate then stops matching and must be issued again)", .0.display())]
    KeyExists(PathBuf),
    /// The device id or the key is not usable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The key file does not hold a P-256 private key.
    #[error("{}: not a P-256 private key in PKCS#8 PEM: {detail}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// Writing failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Makes a new key at `key_file` (mode 0600; its directory 0700 if created) and returns the CSR
/// (PEM) for `device_id`. With `replace` an existing key is overwritten.
pub fn generate(device_id: &str, key_file: &Path, replace: bool) -> Result<String, KeygenError> {
    if key_file.exists() && !replace {
        return Err(KeygenError::KeyExists(key_file.to_path_buf()));
    }
    let (pkcs8_der, csr_der) = generate_csr(Role::Device, device_id)?;
    let secret = p256::SecretKey::from_pkcs8_der(&pkcs8_der).map_err(|e| KeygenError::BadKey {
        path: key_file.to_path_buf(),
        detail: e.to_string(),
    })?;
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeygenError::BadKey {
            path: key_file.to_path_buf(),
            detail: e.to_string(),
        })?;
    if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        durable::create_private_dir(dir)?;
    }
    durable::write_atomic(key_file, pem.as_bytes(), Mode::Private)?;
    Ok(csr_pem(&csr_der))
}

fn csr_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealed_ota_protocol::identity::{CertificateAuthority, Identity};

    #[test]
    fn the_key_is_private_and_the_csr_is_signable_for_this_device() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("keys/device.key");
        let csr = generate("sensor-7", &key_file, false).unwrap();
        assert_eq!(durable::mode_of(&key_file).unwrap(), 0o600);
        assert_eq!(durable::mode_of(key_file.parent().unwrap()).unwrap(), 0o700);
        assert!(matches!(
            generate("sensor-7", &key_file, false),
            Err(KeygenError::KeyExists(_))
        ));

        let parsed = pem::parse(&csr).unwrap();
        assert_eq!(parsed.tag(), "CERTIFICATE REQUEST");
        let ca = CertificateAuthority::generate("ca", 1_800_000_000, 10).unwrap();
        let cert = ca
            .issue_for_csr(
                parsed.contents(),
                Role::Device,
                "sensor-7",
                1_800_000_000,
                10,
            )
            .unwrap();
        let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert));
        let key = std::fs::read_to_string(&key_file).unwrap();
        let identity = Identity::from_pem(&cert_pem, &key).unwrap();
        assert_eq!(identity.name(), "sensor-7");
    }

    #[test]
    fn a_bad_device_id_makes_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("device.key");
        assert!(matches!(
            generate("Not_An_Id", &key_file, false),
            Err(KeygenError::Identity(_))
        ));
        assert!(!key_file.exists());
    }
}
