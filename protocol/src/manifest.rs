//! The update manifest (signed by the manager for one device) and the reasons a device refuses an
//! update. Owns anti-rollback and expiry rules; signing and transport live elsewhere.

use serde::{Deserialize, Serialize};

/// What a campaign delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PayloadKind {
    /// A firmware image, chunked.
    Firmware,
    /// New certificate and private key, the key encrypted on the inner channel (the paper's flow).
    CredentialsDeliverKey,
    /// New certificate for a key the device generated (CSR in the ready message).
    CredentialsCsr,
}

/// Signed description of one update for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Campaign id.
    pub campaign_id: String,
    /// Target device id.
    pub device_id: String,
    /// Version (semver) of the firmware, or of the credential set.
    pub version: String,
    /// Plaintext image size in bytes (certificate DER size for rotations).
    pub size: u64,
    /// SHA-256 of the plaintext image (of the certificate DER for rotations).
    #[serde(with = "crate::codec::array")]
    pub sha256: [u8; 32],
    /// Chunk size in bytes (plaintext).
    pub chunk_size: u32,
    /// Number of chunks (0 for rotations).
    pub chunk_count: u32,
    /// Merkle root over the encrypted chunks (zero for rotations).
    #[serde(with = "crate::codec::array")]
    pub merkle_root: [u8; 32],
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Whether this device may install a version not newer than the one it runs.
    pub allow_downgrade: bool,
    /// Payload kind.
    pub kind: PayloadKind,
}

/// Why a device refused or failed an update. Sent signed in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The offered version is not newer than the running one (anti-rollback).
    NotNewer {
        /// Running version.
        running: String,
        /// Offered version.
        offered: String,
    },
    /// The manifest or campaign expired.
    Expired,
    /// The reassembled image does not hash to the manifest's SHA-256.
    ImageHashMismatch,
    /// Chunk messages would exceed the device's Maximum Packet Size.
    PacketTooLarge {
        /// Device's Maximum Packet Size.
        max_packet_size: u32,
        /// Size the largest publish needs.
        needed: u32,
    },
    /// The device operator declined.
    DeclinedByDevice(String),
    /// Installation failed on the device.
    InstallFailed(String),
    /// A version string is not valid semver.
    InvalidVersion(String),
    /// Delivered credentials failed validation (chain, name, key match).
    BadCredentials(String),
    /// The manifest contradicts the session (kind, campaign, device).
    ManifestMismatch(String),
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::NotNewer { running, offered } => {
                write!(
                    f,
                    "offered version {offered} is not newer than running {running}"
                )
            }
            RejectReason::Expired => f.write_str("expired"),
            RejectReason::ImageHashMismatch => f.write_str("image SHA-256 mismatch"),
            RejectReason::PacketTooLarge {
                max_packet_size,
                needed,
            } => write!(
                f,
                "publish of {needed} bytes exceeds the device Maximum Packet Size {max_packet_size}"
            ),
            RejectReason::DeclinedByDevice(r) => write!(f, "declined by device: {r}"),
            RejectReason::InstallFailed(r) => write!(f, "install failed: {r}"),
            RejectReason::InvalidVersion(v) => write!(f, "invalid version {v:?}"),
            RejectReason::BadCredentials(r) => write!(f, "bad credentials: {r}"),
            RejectReason::ManifestMismatch(r) => write!(f, "manifest mismatch: {r}"),
        }
    }
}

impl RejectReason {
    /// Short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RejectReason::NotNewer { .. } => "not_newer",
            RejectReason::Expired => "expired",
            RejectReason::ImageHashMismatch => "image_hash_mismatch",
            RejectReason::PacketTooLarge { .. } => "packet_too_large",
            RejectReason::DeclinedByDevice(_) => "declined",
            RejectReason::InstallFailed(_) => "install_failed",
            RejectReason::InvalidVersion(_) => "invalid_version",
            RejectReason::BadCredentials(_) => "bad_credentials",
            RejectReason::ManifestMismatch(_) => "manifest_mismatch",
        }
    }

    /// Whether a later retry of the same campaign could succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RejectReason::InstallFailed(_) | RejectReason::ImageHashMismatch
        )
    }
}

/// Anti-rollback: `offered` must be strictly newer than `running` (semver), unless downgrades are
/// allowed for this device. An unparsable running version is treated as `0.0.0`.
pub fn check_version(
    running: &str,
    offered: &str,
    allow_downgrade: bool,
) -> Result<(), RejectReason> {
    let offered_v = semver::Version::parse(offered)
        .map_err(|_| RejectReason::InvalidVersion(offered.chars().take(64).collect()))?;
    if allow_downgrade {
        return Ok(());
    }
    let running_v = semver::Version::parse(running).unwrap_or(semver::Version::new(0, 0, 0));
    if offered_v > running_v {
        Ok(())
    } else {
        Err(RejectReason::NotNewer {
            running: running.to_string(),
            offered: offered.to_string(),
        })
    }
}

impl Manifest {
    /// The checks a device makes before accepting: expiry, then anti-rollback (firmware only).
    pub fn check(&self, running_version: &str, now: u64) -> Result<(), RejectReason> {
        if now >= self.expires_at {
            return Err(RejectReason::Expired);
        }
        if self.kind == PayloadKind::Firmware {
            check_version(running_version, &self.version, self.allow_downgrade)?;
        }
        Ok(())
    }

    /// Plaintext length of chunk `index` (`None` beyond the declared count).
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        if index >= self.chunk_count {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        Some(
            self.size
                .saturating_sub(start)
                .min(u64::from(self.chunk_size)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_rules() {
        assert!(check_version("1.0.0", "1.0.1", false).is_ok());
        assert!(matches!(
            check_version("1.0.1", "1.0.1", false),
            Err(RejectReason::NotNewer { .. })
        ));
        assert!(matches!(
            check_version("1.2.0", "1.0.1", false),
            Err(RejectReason::NotNewer { .. })
        ));
        assert!(check_version("1.2.0", "1.0.1", true).is_ok());
        assert!(matches!(
            check_version("1.0.0", "x", true),
            Err(RejectReason::InvalidVersion(_))
        ));
        assert!(check_version("garbage", "0.0.1", false).is_ok());
        assert!(matches!(
            check_version("1.0.0", "1.0.0-rc.1", false),
            Err(RejectReason::NotNewer { .. })
        ));
    }
}
