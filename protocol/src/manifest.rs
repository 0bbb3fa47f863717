//! The update manifest (signed by the manager for one device) and the reasons a device refuses an
//! update. Owns anti-rollback (SemVer precedence) and expiry rules, and the bounding of the
//! device-controlled text a reason may carry; signing and transport live elsewhere.

use crate::prelude::*;

use serde::{Deserialize, Serialize};

use crate::release::ReleaseSignature;

/// Most characters of device-controlled text (reasons, versions) kept by the manager.
pub const MAX_REASON_TEXT: usize = 256;
/// Most characters of a version string kept by the manager.
pub const MAX_VERSION_TEXT: usize = 64;

/// Device-controlled text made safe for logs and Kubernetes status: control characters (newlines,
/// escapes, NUL) become `?`, and at most `max` characters are kept (an ellipsis marks a cut).
pub fn bounded_text(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

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
    /// Number of chunks transferred (0 for rotations): of the image, or of the delta.
    pub chunk_count: u32,
    /// Merkle root over the encrypted chunks transferred (zero for rotations).
    #[serde(with = "crate::codec::array")]
    pub merkle_root: [u8; 32],
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Whether this device may install a version not newer than the one it runs.
    pub allow_downgrade: bool,
    /// Payload kind.
    pub kind: PayloadKind,
    /// Detached signature of the image (version, size, SHA-256) by an offline release key, carried
    /// as the release pipeline made it. Devices enrolled with trusted release keys refuse firmware
    /// without a valid one, whatever the manager signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseSignature>,
    /// Chunks are published when devices ask for them, and the broker keeps only a bounded number
    /// retained (large images): the device requests each window as it subscribes to it. Absent
    /// (false): every chunk is retained from the start and a device asks only for what did not
    /// arrive in time.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub pull: bool,
    /// A binary delta from the image the device runs, sent instead of the full image: the chunks
    /// (`chunk_count`, `merkle_root`) carry the delta ([`DeltaManifest`]); `size`, `sha256` and
    /// `release` still describe the full image the device rebuilds, checks and installs. Absent:
    /// the chunks are the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaManifest>,
}

/// What a delta manifest adds: the base image the delta applies to, and the delta's size. The
/// manifest's `chunk_count` and `merkle_root` then describe the delta's chunks (what is
/// transferred), its `size`, `sha256` and `release` the full image the device rebuilds, checks and
/// installs. The device takes it only when its installed image hashes to `base_sha256`, and
/// installs the rebuilt image only when it hashes to the manifest's `sha256` (and the release
/// signature over that full image verifies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaManifest {
    /// Version of the base image (what `status.runningVersion` said).
    pub base_version: String,
    /// SHA-256 of the base image the delta was computed from.
    #[serde(with = "crate::codec::array")]
    pub base_sha256: [u8; 32],
    /// Size of the delta in bytes (what is transferred).
    pub size: u64,
}

/// The bytes a transfer moves: the full image, or the delta of a delta manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Plaintext bytes transferred.
    pub size: u64,
    /// Chunks transferred.
    pub chunk_count: u32,
    /// Merkle root the chunks are checked against.
    pub merkle_root: [u8; 32],
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
    /// A delta was offered for a base image the device does not hold (its installed image does not
    /// hash to the delta's base SHA-256): nothing was installed; the full image is what fits.
    DeltaBaseMismatch,
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
    /// The device trusts release keys and the firmware's release signature is missing, made by a
    /// key it does not trust, or does not verify for this image.
    ReleaseSignature(String),
}

impl core::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RejectReason::NotNewer { running, offered } => {
                write!(
                    f,
                    "offered version {offered} is not newer than running {running}"
                )
            }
            RejectReason::Expired => f.write_str("expired"),
            RejectReason::ImageHashMismatch => f.write_str("image SHA-256 mismatch"),
            RejectReason::DeltaBaseMismatch => {
                f.write_str("the delta's base image is not the installed image")
            }
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
            RejectReason::ReleaseSignature(r) => write!(f, "release signature refused: {r}"),
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
            RejectReason::DeltaBaseMismatch => "delta_base_mismatch",
            RejectReason::PacketTooLarge { .. } => "packet_too_large",
            RejectReason::DeclinedByDevice(_) => "declined",
            RejectReason::InstallFailed(_) => "install_failed",
            RejectReason::InvalidVersion(_) => "invalid_version",
            RejectReason::BadCredentials(_) => "bad_credentials",
            RejectReason::ManifestMismatch(_) => "manifest_mismatch",
            RejectReason::ReleaseSignature(_) => "release_signature",
        }
    }

    /// The same reason with every device-controlled string passed through [`bounded_text`], so that
    /// what a device (or a thief of its key) sends cannot flood logs or overflow a status field.
    pub fn bounded(&self) -> Self {
        let t = |s: &str| bounded_text(s, MAX_REASON_TEXT);
        let v = |s: &str| bounded_text(s, MAX_VERSION_TEXT);
        match self {
            RejectReason::NotNewer { running, offered } => RejectReason::NotNewer {
                running: v(running),
                offered: v(offered),
            },
            RejectReason::Expired => RejectReason::Expired,
            RejectReason::ImageHashMismatch => RejectReason::ImageHashMismatch,
            RejectReason::DeltaBaseMismatch => RejectReason::DeltaBaseMismatch,
            RejectReason::PacketTooLarge {
                max_packet_size,
                needed,
            } => RejectReason::PacketTooLarge {
                max_packet_size: *max_packet_size,
                needed: *needed,
            },
            RejectReason::DeclinedByDevice(r) => RejectReason::DeclinedByDevice(t(r)),
            RejectReason::InstallFailed(r) => RejectReason::InstallFailed(t(r)),
            RejectReason::InvalidVersion(r) => RejectReason::InvalidVersion(v(r)),
            RejectReason::BadCredentials(r) => RejectReason::BadCredentials(t(r)),
            RejectReason::ManifestMismatch(r) => RejectReason::ManifestMismatch(t(r)),
            RejectReason::ReleaseSignature(r) => RejectReason::ReleaseSignature(t(r)),
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

/// A SemVer 2.0 version with its build metadata dropped: SemVer section 10 says build metadata
/// MUST be ignored when determining precedence (the `semver` crate's `Ord` compares it).
fn precedence_version(text: &str) -> Result<semver::Version, RejectReason> {
    let mut v = semver::Version::parse(text)
        .map_err(|_| RejectReason::InvalidVersion(bounded_text(text, MAX_VERSION_TEXT)))?;
    v.build = semver::BuildMetadata::EMPTY;
    Ok(v)
}

/// Anti-rollback: `offered` must be strictly newer than `running` by SemVer precedence (build
/// metadata ignored, so `1.0.0+b` is not newer than `1.0.0+a`), unless downgrades are allowed for
/// this device. An unparsable running version is refused (`InvalidVersion`): the device cannot
/// tell what is newer than something it cannot read.
pub fn check_version(
    running: &str,
    offered: &str,
    allow_downgrade: bool,
) -> Result<(), RejectReason> {
    let offered_v = precedence_version(offered)?;
    if allow_downgrade {
        return Ok(());
    }
    let running_v = precedence_version(running)?;
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

    /// What the chunks carry: the delta of a delta manifest, the full image otherwise.
    pub fn transfer(&self) -> Transfer {
        Transfer {
            size: self.delta.as_ref().map_or(self.size, |d| d.size),
            chunk_count: self.chunk_count,
            merkle_root: self.merkle_root,
        }
    }

    /// Whether the chunking is consistent: a count of whole chunks of `chunk_size` covering what
    /// is transferred, within the wire bounds.
    pub fn chunking_consistent(&self, max_chunk_size: u32, max_chunk_count: u32) -> bool {
        let t = self.transfer();
        self.chunk_size != 0
            && self.chunk_size <= max_chunk_size
            && t.chunk_count != 0
            && t.chunk_count <= max_chunk_count
            && u64::from(t.chunk_count) == t.size.div_ceil(u64::from(self.chunk_size))
    }

    /// Plaintext length of transferred chunk `index` (`None` beyond the declared count).
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        let t = self.transfer();
        if index >= t.chunk_count {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        Some(t.size.saturating_sub(start).min(u64::from(self.chunk_size)))
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
        assert!(matches!(
            check_version("1.0.0", "1.0.0-rc.1", false),
            Err(RejectReason::NotNewer { .. })
        ));
        assert!(check_version("1.0.0-rc.1", "1.0.0", false).is_ok());
    }

    /// SemVer 2.0 section 10: build metadata does not take part in precedence. `1.0.0+b` is the
    /// same release as `1.0.0+a` (the `semver` crate's ordering would call it newer).
    #[test]
    fn build_metadata_is_ignored_for_precedence() {
        for (running, offered) in [
            ("1.0.0+a", "1.0.0+b"),
            ("1.0.0", "1.0.0+build.7"),
            ("2.1.0+zzz", "2.1.0+aaa"),
        ] {
            assert!(
                matches!(
                    check_version(running, offered, false),
                    Err(RejectReason::NotNewer { .. })
                ),
                "{running} -> {offered}"
            );
        }
        assert!(check_version("1.0.0+z", "1.0.1+a", false).is_ok());
    }

    /// A running version the device cannot parse is refused, not read as 0.0.0 (which would
    /// accept any offered version, including an old one).
    #[test]
    fn an_unparsable_running_version_is_refused() {
        for running in ["garbage", "", "1.0", "v1.0.0"] {
            assert_eq!(
                check_version(running, "0.0.1", false),
                Err(RejectReason::InvalidVersion(running.into())),
                "{running:?}"
            );
        }
        // An explicit downgrade permission does not need to read the running version.
        assert!(check_version("garbage", "0.0.1", true).is_ok());
    }

    #[test]
    fn device_text_is_bounded_and_without_control_characters() {
        let long = "x".repeat(10_000);
        assert_eq!(bounded_text(&long, 64).chars().count(), 64);
        assert!(bounded_text(&long, 64).ends_with('…'));
        assert_eq!(bounded_text("a\nb\u{1b}[31m", 64), "a?b?[31m");
        assert_eq!(bounded_text("short", 64), "short");
        let r = RejectReason::InstallFailed(format!("line1\nline2{long}")).bounded();
        let RejectReason::InstallFailed(text) = r else {
            panic!()
        };
        assert!(text.chars().count() <= MAX_REASON_TEXT && !text.contains('\n'));
    }
}
