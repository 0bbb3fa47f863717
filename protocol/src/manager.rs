//! Manager side: campaign preparation (encrypt once, Merkle tree) and one sans-IO session per
//! device (notify → ready → update → status → receipt). Owns the manager's half of the handshake,
//! the acceptance of signed status reports and receipts, the limits on what a device may ask the
//! manager to republish, and the signed abort. It performs no I/O: actions are returned to the
//! caller.

use crate::prelude::*;

use alloc::sync::Arc;

use crate::crypto::{self, SessionKeys, Transcript};
use crate::error::ProtocolError;
use crate::identity::{CertificateAuthority, Identity, PeerCertificate, Role, TrustAnchor};
use crate::manifest::{
    bounded_text, check_version, Manifest, PayloadKind, RejectReason, MAX_REASON_TEXT,
    MAX_VERSION_TEXT,
};
use crate::mqtt::{
    check_hints, Action, Inbound, Outbound, Properties, CONTENT_TYPE, VERSION_PROPERTY,
};
use crate::release::ReleaseSignature;
use crate::sealer::SealedFirmware;
use crate::topics::{validate_id, TopicKind, TopicTree};
use crate::wire::{
    self, AbortBody, Claim, NotifyBody, SignedEnvelope, StatusBody, UpdateBody, UpdateMsg,
};
use crate::WIRE_VERSION;
use sha2::{Digest, Sha256};

pub use crate::wire::{PUBLISH_OVERHEAD, STATUS_AAD_LABEL, UPDATE_AAD_LABEL};
/// Validity of certificates issued by rotations when the spec says 0.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Most chunk indices one `ChunksRequested` republishes (the rest of the request is ignored; a
/// device asks for its window, a few dozen chunks).
pub const MAX_REPUBLISH_PER_REQUEST: usize = 256;
/// Seconds between two chunk requests of one session that the manager answers (a device asks
/// once per window timeout, 1 s at the least).
pub const MIN_REQUEST_INTERVAL_SECS: u64 = 1;
/// Chunks one session may have republished, as a multiple of the campaign's chunk count (plus
/// [`MAX_REPUBLISH_PER_REQUEST`]): a stolen device key can cost the manager a few images' worth of
/// publishes, not an unbounded stream.
pub const REPUBLISH_BUDGET_IMAGES: u64 = 4;

/// What a campaign delivers.
#[derive(Clone)]
pub enum CampaignPayload {
    /// A firmware image in memory (sealed by `prepare`, its ciphertext kept in memory).
    Firmware {
        /// The image bytes.
        image: Vec<u8>,
    },
    /// A firmware image the caller sealed chunk by chunk ([`crate::ChunkSealer`]) and whose
    /// ciphertext it keeps (the operator's cache directory).
    Sealed(SealedFirmware),
    /// A binary delta from `base` (the image the devices of `base_version` run) to `image`, made
    /// by `prepare` ([`crate::delta`]) and sealed in place of the image (its ciphertext kept in
    /// memory): the chunks carry the delta, the manifests describe `image` (size, SHA-256,
    /// release signature) and name the base ([`crate::manifest::DeltaManifest`]).
    #[cfg(feature = "delta")]
    Delta {
        /// Version of the base image.
        base_version: String,
        /// The base image.
        base: Vec<u8>,
        /// The image the devices rebuild and install.
        image: Vec<u8>,
    },
    /// A delta the caller made ([`crate::delta::make_to`]) and sealed chunk by chunk like
    /// [`CampaignPayload::Sealed`] (its ciphertext kept by the caller): `sealed` is the delta,
    /// `delta` names its base, `image_size` and `image_sha256` describe the image it rebuilds.
    SealedDelta {
        /// The sealed delta.
        sealed: SealedFirmware,
        /// The base it applies to (its `size` is the delta's).
        delta: crate::manifest::DeltaManifest,
        /// Size of the image the delta rebuilds.
        image_size: u64,
        /// SHA-256 of the image the delta rebuilds.
        image_sha256: [u8; 32],
    },
    /// New credentials issued by `ca`.
    RotateCredentials {
        /// Key delivery mode.
        mode: RotationMode,
        /// The CA that issues the new certificates.
        ca: Arc<CertificateAuthority>,
        /// Validity of the new certificates.
        validity_days: u32,
    },
}

impl core::fmt::Debug for CampaignPayload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CampaignPayload::Firmware { image } => write!(f, "Firmware({} bytes)", image.len()),
            CampaignPayload::Sealed(sealed) => write!(f, "Sealed({} bytes)", sealed.size()),
            #[cfg(feature = "delta")]
            CampaignPayload::Delta {
                base_version,
                image,
                ..
            } => write!(f, "Delta(from {base_version}, {} bytes)", image.len()),
            CampaignPayload::SealedDelta {
                delta, image_size, ..
            } => write!(
                f,
                "SealedDelta(from {}, {image_size} bytes)",
                delta.base_version
            ),
            CampaignPayload::RotateCredentials {
                mode,
                validity_days,
                ..
            } => {
                write!(f, "RotateCredentials({mode:?}, {validity_days} days)")
            }
        }
    }
}

/// Credential rotation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationMode {
    /// Manager issues key + certificate; the PKCS#8 key travels encrypted under the session key.
    DeliverKey,
    /// Device generates the key and sends a CSR; only the certificate travels.
    Csr,
}

/// A campaign as specified by the operator.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    /// Campaign id (1-63 chars of `[a-z0-9-]`).
    pub campaign_id: String,
    /// Target version (semver).
    pub target_version: String,
    /// What to deliver.
    pub payload: CampaignPayload,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Plaintext chunk size in bytes (1..=1 MiB).
    pub chunk_size: u32,
    /// Release signature of the firmware image, from the release pipeline (checked by `prepare`
    /// against the image and version; carried in every device's manifest). `None` for rotations
    /// and for fleets that do not use release keys.
    pub release: Option<ReleaseSignature>,
}

/// Encrypted once, shared by every device session of the campaign. It holds what the manifests
/// and proofs need ([`SealedFirmware`]); the chunk ciphertext is held here only when the campaign
/// was prepared from an image in memory ([`CampaignPayload::Firmware`]), otherwise the caller
/// keeps it (the operator: in its cache directory) and frames chunks with
/// [`PreparedCampaign::chunk_publish_from`].
pub struct PreparedCampaign {
    campaign_id: String,
    target_version: String,
    expires_at: u64,
    chunk_size: u32,
    kind: PayloadKind,
    firmware: Option<SealedFirmware>,
    /// Every chunk's ciphertext, concatenated (in-memory preparation only).
    held: Option<Vec<u8>>,
    rotation: Option<(RotationMode, Arc<CertificateAuthority>, u32)>,
    release: Option<ReleaseSignature>,
    /// Chunks are served on request (the manifest's `pull`).
    pull: bool,
    /// The full image when the sealed payload is a delta to it.
    delta_of: Option<DeltaOf>,
}

/// The full image a delta campaign's sealed delta rebuilds, and the base it applies to.
#[derive(Debug, Clone)]
struct DeltaOf {
    manifest: crate::manifest::DeltaManifest,
    size: u64,
    sha256: [u8; 32],
}

impl core::fmt::Debug for PreparedCampaign {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PreparedCampaign")
            .field("campaign_id", &self.campaign_id)
            .field("target_version", &self.target_version)
            .field("kind", &self.kind)
            .field("chunk_count", &self.chunk_count())
            .field("content_key", &"<redacted>")
            .finish()
    }
}

impl PreparedCampaign {
    /// Validate the spec and prepare the payload. An image in memory
    /// ([`CampaignPayload::Firmware`]) is sealed here under a fresh random content key (batches of
    /// 256 KiB or more on up to [`MAX_PREPARE_THREADS`] scoped threads; the result does not depend
    /// on the number of threads) and its ciphertext kept; an image sealed by the caller
    /// ([`CampaignPayload::Sealed`]) must have been sealed under this campaign id and chunk size.
    pub fn prepare(spec: CampaignSpec) -> Result<Self, ProtocolError> {
        let invalid = |m: String| ProtocolError::InvalidCampaign(m);
        validate_id(&spec.campaign_id).map_err(|e| invalid(e.to_string()))?;
        semver::Version::parse(&spec.target_version)
            .map_err(|e| invalid(format!("target version {:?}: {e}", spec.target_version)))?;
        if spec.chunk_size == 0 || spec.chunk_size > wire::MAX_CHUNK_SIZE {
            return Err(invalid(format!(
                "chunk size {} outside 1..={}",
                spec.chunk_size,
                wire::MAX_CHUNK_SIZE
            )));
        }
        let mut c = Self {
            campaign_id: spec.campaign_id,
            target_version: spec.target_version,
            expires_at: spec.expires_at,
            chunk_size: spec.chunk_size,
            kind: PayloadKind::Firmware,
            firmware: None,
            held: None,
            rotation: None,
            release: None,
            pull: false,
            delta_of: None,
        };
        let sealed = match spec.payload {
            CampaignPayload::Firmware { image } => {
                let (sealed, cts) = SealedFirmware::seal_all(&c.campaign_id, c.chunk_size, &image)?;
                c.held = Some(cts);
                Some(sealed)
            }
            #[cfg(feature = "delta")]
            CampaignPayload::Delta {
                base_version,
                base,
                image,
            } => {
                let delta = crate::delta::make(&base, &image)
                    .map_err(|e| invalid(format!("the delta cannot be made: {e}")))?;
                let (sealed, cts) = SealedFirmware::seal_all(&c.campaign_id, c.chunk_size, &delta)?;
                c.held = Some(cts);
                c.delta_of = Some(DeltaOf {
                    manifest: crate::manifest::DeltaManifest {
                        base_version,
                        base_sha256: crypto::sha256(&base),
                        size: delta.len() as u64,
                    },
                    size: image.len() as u64,
                    sha256: crypto::sha256(&image),
                });
                Some(sealed)
            }
            CampaignPayload::Sealed(sealed) => {
                c.check_sealed_as_this(&sealed)?;
                Some(sealed)
            }
            CampaignPayload::SealedDelta {
                sealed,
                delta,
                image_size,
                image_sha256,
            } => {
                c.check_sealed_as_this(&sealed)?;
                if delta.size != sealed.size() {
                    return Err(invalid(format!(
                        "the delta manifest says {} bytes but {} were sealed",
                        delta.size,
                        sealed.size()
                    )));
                }
                c.delta_of = Some(DeltaOf {
                    manifest: delta,
                    size: image_size,
                    sha256: image_sha256,
                });
                Some(sealed)
            }
            CampaignPayload::RotateCredentials {
                mode,
                ca,
                validity_days,
            } => {
                c.kind = match mode {
                    RotationMode::DeliverKey => PayloadKind::CredentialsDeliverKey,
                    RotationMode::Csr => PayloadKind::CredentialsCsr,
                };
                let days = if validity_days == 0 {
                    DEFAULT_VALIDITY_DAYS
                } else {
                    validity_days
                };
                if spec.release.is_some() {
                    return Err(invalid(
                        "a credential rotation carries no release signature (release keys sign firmware images)".into(),
                    ));
                }
                c.rotation = Some((mode, ca, days));
                None
            }
        };
        if let Some(sealed) = sealed {
            if let Some(sig) = spec.release {
                // What the release key signed: the full image (a delta's rebuilt image).
                let (size, sha256) = c
                    .delta_of
                    .as_ref()
                    .map_or((sealed.size(), sealed.sha256()), |d| (d.size, d.sha256));
                if !sig.verifies_for(&c.target_version, size, &sha256) {
                    return Err(invalid(format!(
                        "release signature by key {} does not verify for this image (version {}, {} bytes, SHA-256 {}): sign exactly this image and version with `sealed-ota release sign`",
                        hex::encode(sig.key_id()),
                        c.target_version,
                        size,
                        hex::encode(sha256)
                    )));
                }
                c.release = Some(sig);
            }
            c.firmware = Some(sealed);
        }
        Ok(c)
    }

    /// Refuses chunks sealed under another stream id or chunk size than this campaign's.
    fn check_sealed_as_this(&self, sealed: &SealedFirmware) -> Result<(), ProtocolError> {
        if sealed.stream_id() != self.campaign_id || sealed.chunk_size() != self.chunk_size {
            return Err(ProtocolError::InvalidCampaign(format!(
                "the image was sealed as {:?} in chunks of {} bytes, not as campaign {:?} in chunks of {}",
                sealed.stream_id(),
                sealed.chunk_size(),
                self.campaign_id,
                self.chunk_size
            )));
        }
        Ok(())
    }

    /// Serve chunks on request: every device's manifest says `pull`, so devices ask for each
    /// window as they subscribe to it, and the caller publishes (retained) only what is asked for
    /// and may clear what it published before (a bounded retained window on the broker).
    pub fn served_on_request(mut self) -> Self {
        self.pull = self.kind == PayloadKind::Firmware;
        self
    }
    /// Whether chunks are served on request.
    pub fn pull(&self) -> bool {
        self.pull
    }
    /// Campaign id.
    pub fn campaign_id(&self) -> &str {
        &self.campaign_id
    }
    /// Target version.
    pub fn target_version(&self) -> &str {
        &self.target_version
    }
    /// Payload kind.
    pub fn kind(&self) -> PayloadKind {
        self.kind
    }
    /// The sealed image (firmware campaigns).
    pub fn firmware(&self) -> Option<&SealedFirmware> {
        self.firmware.as_ref()
    }
    /// Number of chunks (0 for rotations).
    pub fn chunk_count(&self) -> u32 {
        self.firmware
            .as_ref()
            .map_or(0, SealedFirmware::chunk_count)
    }
    /// SHA-256 of the plaintext image (of the full image a delta rebuilds).
    pub fn image_sha256(&self) -> [u8; 32] {
        match &self.delta_of {
            Some(d) => d.sha256,
            None => self
                .firmware
                .as_ref()
                .map_or([0; 32], SealedFirmware::sha256),
        }
    }
    /// Image size (of the full image a delta rebuilds).
    pub fn image_size(&self) -> u64 {
        match &self.delta_of {
            Some(d) => d.size,
            None => self.firmware.as_ref().map_or(0, SealedFirmware::size),
        }
    }
    /// Bytes the chunks carry: the image, or the delta of a delta campaign.
    pub fn transfer_size(&self) -> u64 {
        self.firmware.as_ref().map_or(0, SealedFirmware::size)
    }
    /// The base a delta campaign's chunks apply to (`None`: the chunks carry the full image).
    pub fn delta(&self) -> Option<&crate::manifest::DeltaManifest> {
        self.delta_of.as_ref().map(|d| &d.manifest)
    }
    /// Merkle root over the encrypted chunks.
    pub fn merkle_root(&self) -> [u8; 32] {
        self.firmware
            .as_ref()
            .map_or([0; 32], SealedFirmware::merkle_root)
    }
    /// Expiry.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }
    /// Id of the release key that signed the image (verified by `prepare`), if any.
    pub fn release_key_id(&self) -> Option<[u8; 32]> {
        self.release.as_ref().map(ReleaseSignature::key_id)
    }
    /// Total bytes of all chunk payloads (what publishing every chunk once costs).
    pub fn chunk_bytes(&self) -> u64 {
        self.firmware.as_ref().map_or(0, |f| {
            (0..f.chunk_count())
                .map(|i| f.chunk_payload_len(i) as u64)
                .sum()
        })
    }

    /// Largest MQTT packet a chunk publish of this campaign needs under `topics`: the bound the
    /// device computes from its manifest (never below the actual size), so both sides agree.
    pub fn max_chunk_packet(&self, topics: &TopicTree) -> u32 {
        match &self.firmware {
            Some(f) => wire::chunk_packet_bound(
                topics,
                &self.campaign_id,
                self.chunk_size,
                f.chunk_count(),
            ),
            None => 0,
        }
    }

    /// The retained publish of chunk `index` framed around its stored ciphertext `ct`. For an
    /// index beyond the count, or a ciphertext of the wrong length, the payload is empty and
    /// `retain` false, which a broker treats as an ordinary empty message (harmless).
    pub fn chunk_publish_from(&self, topics: &TopicTree, index: u32, ct: &[u8]) -> Outbound {
        let topic = topics.chunk(&self.campaign_id, index);
        match self
            .firmware
            .as_ref()
            .and_then(|f| f.chunk_payload(index, ct))
        {
            Some(payload) => Outbound {
                topic,
                payload,
                retain: true,
                properties: Properties::default(),
            },
            None => Outbound {
                topic,
                payload: Vec::new(),
                retain: false,
                properties: Properties::default(),
            },
        }
    }

    /// The retained publish of chunk `index` of a campaign prepared from an image in memory (see
    /// [`PreparedCampaign::chunk_publish_from`] for a ciphertext the caller stored).
    pub fn chunk_publish(&self, topics: &TopicTree, index: u32) -> Outbound {
        let ct = match (&self.firmware, &self.held) {
            (Some(f), Some(held)) if index < f.chunk_count() => {
                let start = f.ciphertext_offset(index) as usize;
                held.get(start..start + f.ciphertext_len(index))
                    .unwrap_or_default()
            }
            _ => &[],
        };
        self.chunk_publish_from(topics, index, ct)
    }

    /// Every chunk publish (retained), index order (in-memory preparation).
    pub fn chunk_publishes(&self, topics: &TopicTree) -> Vec<Outbound> {
        (0..self.chunk_count())
            .map(|i| self.chunk_publish(topics, i))
            .collect()
    }

    /// Empty retained publishes clearing every chunk (campaign ended).
    pub fn clear_chunks(&self, topics: &TopicTree) -> Vec<Outbound> {
        (0..self.chunk_count())
            .map(|i| Outbound {
                topic: topics.chunk(&self.campaign_id, i),
                payload: Vec::new(),
                retain: true,
                properties: Properties::default(),
            })
            .collect()
    }

    fn manifest_for(&self, target: &DeviceTarget, size: u64, sha256: [u8; 32]) -> Manifest {
        Manifest {
            campaign_id: self.campaign_id.clone(),
            device_id: target.device_id.clone(),
            version: self.target_version.clone(),
            size,
            sha256,
            chunk_size: self.chunk_size,
            chunk_count: self.chunk_count(),
            merkle_root: self.merkle_root(),
            expires_at: self.expires_at,
            allow_downgrade: target.allow_downgrade,
            kind: self.kind,
            release: self.release.clone(),
            pull: self.pull,
            delta: self.delta().cloned(),
        }
    }
}

/// Manager configuration shared by all sessions.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Manager identity.
    pub identity: Arc<Identity>,
    /// CA trust anchor.
    pub trust: Arc<TrustAnchor>,
    /// Topic tree.
    pub topics: Arc<TopicTree>,
}

/// One device of a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTarget {
    /// Device id.
    pub device_id: String,
    /// Expected certificate fingerprint (SHA-256 of DER), if pinned.
    pub pinned_fingerprint: Option<[u8; 32]>,
    /// Whether this device may install a version not newer than its running one.
    pub allow_downgrade: bool,
}

/// Result of feeding a message.
#[derive(Debug, Default)]
pub struct ManagerOutput {
    /// What to do on the connection.
    pub actions: Vec<Action>,
    /// What happened.
    pub events: Vec<ManagerEvent>,
}

/// Things the operator reacts to. Every string that came from the device is bounded and free of
/// control characters ([`bounded_text`]) before it is handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerEvent {
    /// Device authenticated; update sent.
    HandshakeCompleted {
        /// Device certificate fingerprint.
        device_cert_fingerprint: [u8; 32],
        /// Device certificate expiry.
        device_cert_not_after: u64,
        /// Version the device runs (device text, at most 64 characters).
        running_version: String,
    },
    /// Device accepted the manifest / reported progress.
    Progress {
        /// Chunks the device holds.
        chunks_received: u32,
        /// Total.
        chunk_count: u32,
    },
    /// The device could not get these chunks: republish them.
    ChunksRequested {
        /// Indices.
        indices: Vec<u32>,
    },
    /// Chunks served on request: the device subscribed to these (further into the image than it
    /// asked before) and asks for them. Publish those not retained on the broker already.
    ChunksPulled {
        /// Indices.
        indices: Vec<u32>,
    },
    /// Signed end-to-end receipt: the only success.
    Installed {
        /// Installed version.
        version: String,
        /// The signed receipt (the device's plaintext claim bound to this session), kept as
        /// evidence: [`wire::verify_receipt`] checks it with the device certificate.
        receipt: Vec<u8>,
        /// Id of the release key whose signature the device verified, if it checked one.
        release_key: Option<[u8; 32]>,
    },
    /// The device installed the image, its health check failed and it went back to the version
    /// it ran before (signed receipt).
    RolledBack {
        /// Version that was tried.
        version: String,
        /// Why (device text, at most 256 characters).
        reason: String,
        /// The signed receipt.
        receipt: Vec<u8>,
    },
    /// A ready byte for byte the same as one this session verified and answered arrived again
    /// (a QoS 1 duplicate, or the device re-sent it while its update was on the way): its update
    /// was sent again without verifying the ready again.
    ReadyRepeated,
    /// The device refused (signed receipt), or the manager refused it (packet size: no receipt).
    Rejected {
        /// Why (device text bounded).
        reason: RejectReason,
        /// The signed receipt, when the device sent the refusal.
        receipt: Option<Vec<u8>>,
    },
}

/// Session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerState {
    /// Notify published, waiting for ready.
    NotifySent,
    /// Update sent; transfer under way.
    Transferring {
        /// Chunks the device reported.
        chunks_received: u32,
    },
    /// Signed Installed receipt received.
    Installed,
    /// Refused by the manager (packet size) or the device (signed).
    Rejected(RejectReason),
    /// Signed RolledBack receipt received (the reason, bounded).
    RolledBack(String),
}

impl ManagerState {
    fn name(&self) -> &'static str {
        match self {
            ManagerState::NotifySent => "NotifySent",
            ManagerState::Transferring { .. } => "Transferring",
            ManagerState::Installed => "Installed",
            ManagerState::Rejected(_) => "Rejected",
            ManagerState::RolledBack(_) => "RolledBack",
        }
    }

    /// Whether the session is over (nothing more is accepted).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ManagerState::Installed | ManagerState::Rejected(_) | ManagerState::RolledBack(_)
        )
    }
}

/// One handshake the manager completed: the keys of one ready it answered.
struct Established {
    device: PeerCertificate,
    device_nonce: [u8; 32],
    /// SHA-256 of the ready's payload as it arrived (see [`ManagerSession::repeated_ready`]).
    ready_digest: [u8; 32],
    /// When its update was last sent (unix seconds; see [`ManagerSession::answer_again`]).
    update_sent_at: u64,
    transcript: [u8; 32],
    keys: SessionKeys,
    update_payload: Vec<u8>,
    last_seq: u32,
    /// For a rotation: the certificate this handshake's update issued.
    issued: Option<IssuedCertificate>,
}

const MAX_SEEN_NONCES: usize = 16;

/// Shortest time between two sends of one handshake's update (see
/// [`ManagerSession::answer_again`]), in seconds.
pub const UPDATE_RESEND_SECS: u64 = 2;

/// Handshakes kept after a newer ready replaced them (see [`ManagerSession::superseded`]).
const MAX_SUPERSEDED: usize = 3;

/// Manager half of one device session.
pub struct ManagerSession {
    identity: Arc<Identity>,
    trust: Arc<TrustAnchor>,
    topics: Arc<TopicTree>,
    campaign: Arc<PreparedCampaign>,
    target: DeviceTarget,
    session_id: [u8; 16],
    /// Dropped (and zeroized) once the session reached Installed or Rejected.
    ephemeral: Option<p256::SecretKey>,
    ephemeral_pub: Vec<u8>,
    nonce: [u8; 32],
    state: ManagerState,
    established: Option<Established>,
    /// Handshakes of this session that a newer ready replaced, newest last, at most
    /// [`MAX_SUPERSEDED`]. A device that restarts before the update arrives answers the retained
    /// notify again, and its two readies can reach the manager in either order: the manager cannot
    /// tell which one the device still holds keys for, so the device's next authenticated message
    /// (a re-sent ready, a status, a receipt) decides, and that handshake becomes `established`.
    superseded: Vec<Established>,
    seen_device_nonces: Vec<[u8; 32]>,
    issued: Option<IssuedCertificate>,
    also_pinned: Vec<[u8; 32]>,
    refused: Vec<[u8; 32]>,
    last_request_at: Option<u64>,
    /// Lowest index a fresh pull may ask for (one above every index asked for before).
    fresh_from: u32,
    republished: u64,
    /// After an `Installed` firmware receipt: what checks the device's later health reports.
    health: Option<HealthVerifier>,
}

/// Checks a device's signed post-install health reports ([`wire::HealthBody`]) after its
/// session installed firmware: signed by the device key of that session, naming that session,
/// device, manager, campaign, version and image. It holds public values only, so it outlives the
/// session (whose keys are gone).
#[derive(Clone)]
pub struct HealthVerifier {
    device_key: p256::PublicKey,
    session_id: [u8; 16],
    manager_id: String,
    device_id: String,
    campaign_id: String,
    version: String,
    sha256: [u8; 32],
}

impl core::fmt::Debug for HealthVerifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HealthVerifier")
            .field("device", &self.device_id)
            .field("campaign", &self.campaign_id)
            .field("session_id", &hex::encode(self.session_id))
            .finish_non_exhaustive()
    }
}

/// A verified health report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Whether the device's health check passed.
    pub healthy: bool,
    /// What it found (device text, bounded, control characters replaced).
    pub detail: String,
    /// When the device made it (its clock).
    pub reported_at: u64,
}

impl HealthVerifier {
    /// Verify a health report from the device's status topic.
    pub fn verify(&self, payload: &[u8]) -> Result<HealthReport, ProtocolError> {
        let (env, body) = wire::decode_health(payload)?;
        env.verify(&self.device_key, "health")?;
        if body.session_id != self.session_id {
            return Err(ProtocolError::WrongSession);
        }
        if body.device_id != self.device_id {
            return Err(ProtocolError::WrongDevice {
                expected: self.device_id.clone(),
                got: body.device_id,
            });
        }
        if body.manager_id != self.manager_id {
            return Err(ProtocolError::WrongManager {
                expected: self.manager_id.clone(),
                got: body.manager_id,
            });
        }
        if body.campaign_id != self.campaign_id {
            return Err(ProtocolError::WrongCampaign {
                expected: self.campaign_id.clone(),
                got: body.campaign_id,
            });
        }
        if body.version != self.version || body.sha256 != self.sha256 {
            return Err(ProtocolError::Decode {
                message: "health",
                detail: "version or image hash differs from what the session installed".into(),
            });
        }
        Ok(HealthReport {
            healthy: body.healthy,
            detail: bounded_text(&body.detail, MAX_REASON_TEXT),
            reported_at: body.reported_at,
        })
    }
}

/// The certificate a rotation session issued to its device (kept after the session ends, so the
/// caller can record what the device now holds once its signed receipt arrived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// SHA-256 of the certificate DER (the manifest's `sha256`).
    pub fingerprint: [u8; 32],
    /// Expiry, Unix seconds.
    pub not_after: u64,
}

impl core::fmt::Debug for ManagerSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ManagerSession")
            .field("device", &self.target.device_id)
            .field("campaign", &self.campaign.campaign_id)
            .field("session_id", &hex::encode(self.session_id))
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn hint_properties(response_topic: Option<String>, session_id: &[u8; 16]) -> Properties {
    Properties {
        response_topic,
        correlation_data: Some(session_id.to_vec()),
        user_properties: vec![(VERSION_PROPERTY.to_string(), WIRE_VERSION.to_string())],
        content_type: Some(CONTENT_TYPE.to_string()),
    }
}

/// The signed abort of `campaign_id` for `device_id` (retained, on the device's notify topic, in
/// place of its notify): every session of the campaign with that device notified at or before `now`
/// ends when the device receives it. A broker can withhold it (nothing stops a broker from dropping
/// a message); the manifest's expiry, checked by the device on every chunk and before install, is
/// what bounds an abort the device never saw.
pub fn abort_publish(
    identity: &Identity,
    topics: &TopicTree,
    device_id: &str,
    campaign_id: &str,
    now: u64,
) -> Outbound {
    let body = AbortBody {
        v: WIRE_VERSION,
        manager_id: topics.manager_id().to_string(),
        device_id: device_id.to_string(),
        campaign_id: campaign_id.to_string(),
        manager_cert: identity.cert_der().to_vec(),
        issued_at: now,
    };
    let env = SignedEnvelope::sign(
        identity.signing_key(),
        wire::TYPE_ABORT,
        wire::encode_msg(&body),
    );
    Outbound {
        topic: topics.notify(device_id),
        payload: env.encode(),
        retain: true,
        properties: Properties {
            user_properties: vec![(VERSION_PROPERTY.to_string(), WIRE_VERSION.to_string())],
            content_type: Some(CONTENT_TYPE.to_string()),
            ..Properties::default()
        },
    }
}

impl ManagerSession {
    /// Fresh ephemeral key, nonce and session id; returns the retained notify publish.
    pub fn start(
        config: &ManagerConfig,
        campaign: Arc<PreparedCampaign>,
        target: DeviceTarget,
        now: u64,
    ) -> Result<(Self, Vec<Action>), ProtocolError> {
        validate_id(&target.device_id)?;
        if config.identity.role() != Role::Manager {
            return Err(ProtocolError::Identity(crate::IdentityError::WrongRole {
                expected: Role::Manager,
                got: config.identity.role(),
            }));
        }
        if config.identity.name() != config.topics.manager_id() {
            return Err(ProtocolError::WrongManager {
                expected: config.topics.manager_id().to_string(),
                got: config.identity.name().to_string(),
            });
        }
        if now >= campaign.expires_at {
            return Err(ProtocolError::Expired);
        }
        let ephemeral = p256::SecretKey::random(&mut rand_core::OsRng);
        let ephemeral_pub = crypto::public_bytes(&ephemeral.public_key());
        let s = Self {
            identity: config.identity.clone(),
            trust: config.trust.clone(),
            topics: config.topics.clone(),
            campaign,
            target,
            session_id: crypto::random(),
            ephemeral: Some(ephemeral),
            ephemeral_pub,
            nonce: crypto::random(),
            state: ManagerState::NotifySent,
            established: None,
            superseded: Vec::new(),
            seen_device_nonces: Vec::new(),
            issued: None,
            also_pinned: Vec::new(),
            refused: Vec::new(),
            last_request_at: None,
            fresh_from: 0,
            republished: 0,
            health: None,
        };
        let action = Action::Publish(s.notify_publish(now));
        Ok((s, vec![action]))
    }

    fn notify_publish(&self, now: u64) -> Outbound {
        let body = NotifyBody {
            v: WIRE_VERSION,
            session_id: self.session_id,
            manager_id: self.topics.manager_id().to_string(),
            device_id: self.target.device_id.clone(),
            campaign_id: self.campaign.campaign_id.clone(),
            manager_cert: self.identity.cert_der().to_vec(),
            ephemeral: self.ephemeral_pub.clone(),
            nonce: self.nonce,
            issued_at: now,
            expires_at: self.campaign.expires_at,
            kind: self.campaign.kind,
        };
        let env = SignedEnvelope::sign(
            self.identity.signing_key(),
            wire::TYPE_NOTIFY,
            wire::encode_msg(&body),
        );
        Outbound {
            topic: self.topics.notify(&self.target.device_id),
            payload: env.encode(),
            retain: true,
            properties: hint_properties(
                Some(self.topics.ready(&self.target.device_id)),
                &self.session_id,
            ),
        }
    }

    /// Session state.
    pub fn state(&self) -> &ManagerState {
        &self.state
    }
    /// Device id.
    pub fn device_id(&self) -> &str {
        &self.target.device_id
    }
    /// Session id (Correlation Data of this session's messages).
    pub fn session_id(&self) -> [u8; 16] {
        self.session_id
    }
    /// The campaign.
    pub fn campaign(&self) -> &Arc<PreparedCampaign> {
        &self.campaign
    }
    /// When the target pins a fingerprint, also accept a device certificate with this one (for
    /// example the certificate this manager issued to the device in a rotation it completed).
    /// Without a pin every certificate that verifies is accepted anyway.
    pub fn also_accept_fingerprint(&mut self, fingerprint: [u8; 32]) {
        if !self.also_pinned.contains(&fingerprint) {
            self.also_pinned.push(fingerprint);
        }
    }

    /// Refuse a device certificate with this fingerprint even though it chains to the CA and
    /// matches the pin: a certificate a credential rotation retired (the device holds a newer one,
    /// so whoever presents this one holds a key that no longer speaks for the device).
    pub fn refuse_fingerprint(&mut self, fingerprint: [u8; 32]) {
        if !self.refused.contains(&fingerprint) {
            self.refused.push(fingerprint);
        }
    }

    /// For a rotation: the certificate issued to the device in this session's update (the one the
    /// device holds once `Installed` was received). `None` for firmware or before the update. It is
    /// known as soon as `handle` returned the update publish, so the caller can record it before
    /// sending the update.
    pub fn issued_certificate(&self) -> Option<IssuedCertificate> {
        self.issued
    }

    /// Whether the session still holds its ephemeral private key: from `start` until the session
    /// ends (Installed, Rejected, RolledBack); then it is dropped and zeroized (`p256::SecretKey`
    /// zeroizes on drop). Forward secrecy rests on this.
    pub fn holds_ephemeral_key(&self) -> bool {
        self.ephemeral.is_some()
    }

    /// The signed abort of this session's campaign for its device (retained on the notify topic):
    /// a device that receives it ends every session of the campaign notified at or before `now`.
    pub fn abort_publish(&self, now: u64) -> Outbound {
        abort_publish(
            &self.identity,
            &self.topics,
            &self.target.device_id,
            &self.campaign.campaign_id,
            now,
        )
    }

    /// Empty retained publish on this device's notify topic (campaign ended / deleted).
    pub fn clear_notify(&self) -> Outbound {
        Outbound {
            topic: self.topics.notify(&self.target.device_id),
            payload: Vec::new(),
            retain: true,
            properties: Properties::default(),
        }
    }

    /// Feed a message whose topic parsed as Ready or Status for this device. On error the state is
    /// unchanged.
    pub fn handle(&mut self, msg: &Inbound, now: u64) -> Result<ManagerOutput, ProtocolError> {
        match self.topics.parse(&msg.topic)? {
            TopicKind::Ready { device } => {
                self.check_device(&device)?;
                self.handle_ready(msg, now)
            }
            TopicKind::Status { device } => {
                self.check_device(&device)?;
                match SignedEnvelope::peek_type(&msg.payload, "status", wire::MAX_STATUS)? {
                    wire::TYPE_RECEIPT => self.handle_receipt(msg),
                    _ => self.handle_status(msg, now),
                }
            }
            _ => Err(ProtocolError::UnexpectedMessage {
                message: "publish",
                state: self.state.name(),
            }),
        }
    }

    /// A message of this session names this device and this manager.
    fn check_addressed(&self, device_id: &str, manager_id: &str) -> Result<(), ProtocolError> {
        self.check_device(device_id)?;
        if manager_id != self.topics.manager_id() {
            return Err(ProtocolError::WrongManager {
                expected: self.topics.manager_id().to_string(),
                got: manager_id.to_string(),
            });
        }
        Ok(())
    }

    fn check_device(&self, device: &str) -> Result<(), ProtocolError> {
        if device != self.target.device_id {
            return Err(ProtocolError::WrongDevice {
                expected: self.target.device_id.clone(),
                got: device.to_string(),
            });
        }
        Ok(())
    }

    fn handle_ready(&mut self, msg: &Inbound, now: u64) -> Result<ManagerOutput, ProtocolError> {
        if self.state.is_final() {
            return Err(ProtocolError::UnexpectedMessage {
                message: "ready",
                state: self.state.name(),
            });
        }
        let ready_digest: [u8; 32] = Sha256::digest(&msg.payload).into();
        if let Some(out) = self.repeated_ready(&ready_digest, msg, now)? {
            return Ok(out);
        }
        let (env, body) = wire::decode_ready(&msg.payload)?;
        self.check_addressed(&body.device_id, &body.manager_id)?;
        if body.session_id != self.session_id || body.manager_nonce != self.nonce {
            return Err(ProtocolError::WrongSession);
        }
        if body.campaign_id != self.campaign.campaign_id {
            return Err(ProtocolError::WrongCampaign {
                expected: self.campaign.campaign_id.clone(),
                got: body.campaign_id,
            });
        }
        let device =
            self.trust
                .verify(&body.device_cert, Role::Device, &self.target.device_id, now)?;
        if self.refused.contains(&device.fingerprint) {
            return Err(crate::IdentityError::Retired.into());
        }
        if let Some(pin) = self.target.pinned_fingerprint {
            if pin != device.fingerprint && !self.also_pinned.contains(&device.fingerprint) {
                return Err(crate::IdentityError::PinMismatch.into());
            }
        }
        env.verify(&device.public_key, "ready")?;
        check_hints(
            &msg.properties,
            Some(&self.topics.update(&self.target.device_id)),
            &self.session_id,
        )?;
        // Same ready again (QoS 1 duplicate, or the device re-sent it because the update was
        // lost): send the same update again (of a superseded handshake too: the device may wait on
        // that one; it becomes the established one when the device's status proves it).
        if let Some(actions) = self.answer_again(|e| e.device_nonce == body.nonce, now) {
            return Ok(ManagerOutput {
                actions,
                events: vec![],
            });
        }
        if self.seen_device_nonces.contains(&body.nonce) {
            return Err(ProtocolError::Replay);
        }
        if now >= self.campaign.expires_at {
            return Err(ProtocolError::Expired);
        }
        let device_eph = crypto::parse_public(&body.ephemeral).ok_or(ProtocolError::Decode {
            message: "ready",
            detail: "ephemeral key".into(),
        })?;
        let transcript = Transcript {
            manager_id: self.topics.manager_id(),
            device_id: &self.target.device_id,
            campaign_id: &self.campaign.campaign_id,
            session_id: &self.session_id,
            manager_nonce: &self.nonce,
            device_nonce: &body.nonce,
            manager_ephemeral: &self.ephemeral_pub,
            device_ephemeral: &body.ephemeral,
            manager_cert_fingerprint: &self.identity.fingerprint(),
            device_cert_fingerprint: &device.fingerprint,
        }
        .hash();
        let Some(ephemeral) = self.ephemeral.as_ref() else {
            return Err(ProtocolError::UnexpectedMessage {
                message: "ready",
                state: self.state.name(),
            });
        };
        let ee = crypto::ecdh(ephemeral, &device_eph);
        let ss = crypto::ecdh(self.identity.secret(), &device.public_key);
        let keys = crypto::derive_session_keys(&transcript, &ee, &ss);

        let mut out = ManagerOutput::default();
        // Packet size: a manager-side rejection with a clear reason.
        let max = if body.max_packet_size == 0 {
            u32::MAX
        } else {
            body.max_packet_size
        };
        let needed = self.campaign.max_chunk_packet(&self.topics);
        if needed > max {
            let reason = RejectReason::PacketTooLarge {
                max_packet_size: max,
                needed,
            };
            self.remember_nonce(body.nonce);
            self.state = ManagerState::Rejected(reason.clone());
            self.forget_keys();
            out.events.push(ManagerEvent::Rejected {
                reason,
                receipt: None,
            });
            return Ok(out);
        }
        let update_body = self.build_update_body(&body, now)?;
        let issued = match &update_body {
            UpdateBody::Credentials { cert, .. } => Some(IssuedCertificate {
                fingerprint: crypto::sha256(cert),
                not_after: crate::identity::cert_not_after(cert)?,
            }),
            UpdateBody::Firmware { .. } => None,
        };
        let plain = wire::encode_update_body(&update_body);
        drop(update_body);
        let aad = crypto::session_aad(UPDATE_AAD_LABEL, &transcript, &[]);
        let (nonce, ct) = crypto::seal(&keys.m2d, &aad, &plain);
        let payload = wire::encode_msg(&UpdateMsg {
            v: WIRE_VERSION,
            session_id: self.session_id,
            nonce,
            ct,
        });
        let update_len = payload.len()
            + self.topics.update(&self.target.device_id).len()
            + PUBLISH_OVERHEAD
            + 64;
        if update_len as u64 > u64::from(max) {
            let reason = RejectReason::PacketTooLarge {
                max_packet_size: max,
                needed: update_len as u32,
            };
            self.remember_nonce(body.nonce);
            self.state = ManagerState::Rejected(reason.clone());
            self.forget_keys();
            out.events.push(ManagerEvent::Rejected {
                reason,
                receipt: None,
            });
            return Ok(out);
        }
        out.actions
            .push(Action::Publish(self.update_publish(payload.clone())));
        out.events.push(ManagerEvent::HandshakeCompleted {
            device_cert_fingerprint: device.fingerprint,
            device_cert_not_after: device.not_after,
            running_version: bounded_text(&body.running_version, MAX_VERSION_TEXT),
        });
        self.remember_nonce(body.nonce);
        self.issued = issued;
        if let Some(previous) = self.established.take() {
            if self.superseded.len() >= MAX_SUPERSEDED {
                self.superseded.remove(0);
            }
            self.superseded.push(previous);
        }
        self.established = Some(Established {
            device,
            device_nonce: body.nonce,
            ready_digest,
            update_sent_at: now,
            transcript,
            keys,
            update_payload: payload,
            last_seq: 0,
            issued,
        });
        let received = body
            .have
            .as_ref()
            .filter(|h| {
                h.campaign_id == self.campaign.campaign_id
                    && h.merkle_root == self.campaign.merkle_root()
            })
            .map(|h| h.received.min(self.campaign.chunk_count()))
            .unwrap_or(0);
        self.state = ManagerState::Transferring {
            chunks_received: received,
        };
        Ok(out)
    }

    /// The session is final: drop the ephemeral key and every handshake's session keys
    /// (zeroized), keep ~nothing.
    fn forget_keys(&mut self) {
        self.ephemeral = None;
        self.established = None;
        self.superseded.clear();
    }

    fn remember_nonce(&mut self, n: [u8; 32]) {
        if self.seen_device_nonces.len() >= MAX_SEEN_NONCES {
            self.seen_device_nonces.remove(0);
        }
        self.seen_device_nonces.push(n);
    }

    fn build_update_body(
        &self,
        ready: &wire::ReadyBody,
        now: u64,
    ) -> Result<UpdateBody, ProtocolError> {
        let sign_manifest = |m: &Manifest| {
            SignedEnvelope::sign(
                self.identity.signing_key(),
                wire::TYPE_MANIFEST,
                wire::encode_msg(m),
            )
            .encode()
        };
        match &self.campaign.rotation {
            None => {
                let Some(firmware) = &self.campaign.firmware else {
                    return Err(ProtocolError::InvalidCampaign("no sealed image".into()));
                };
                let m = self.campaign.manifest_for(
                    &self.target,
                    self.campaign.image_size(),
                    self.campaign.image_sha256(),
                );
                Ok(UpdateBody::Firmware {
                    manifest: sign_manifest(&m),
                    content_key: *firmware.content_key(),
                })
            }
            Some((mode, ca, days)) => {
                let (cert, key) = match mode {
                    RotationMode::DeliverKey => {
                        let id = ca.issue(Role::Device, &self.target.device_id, now, *days)?;
                        (id.cert_der().to_vec(), Some(id.key_pkcs8_der().to_vec()))
                    }
                    RotationMode::Csr => {
                        let csr = ready.csr.as_ref().ok_or(ProtocolError::Decode {
                            message: "ready",
                            detail: "CSR rotation but no CSR".into(),
                        })?;
                        (
                            ca.issue_for_csr(
                                csr,
                                Role::Device,
                                &self.target.device_id,
                                now,
                                *days,
                            )?,
                            None,
                        )
                    }
                };
                let m = self.campaign.manifest_for(
                    &self.target,
                    cert.len() as u64,
                    crypto::sha256(&cert),
                );
                Ok(UpdateBody::Credentials {
                    manifest: sign_manifest(&m),
                    cert,
                    key,
                })
            }
        }
    }

    fn update_publish(&self, payload: Vec<u8>) -> Outbound {
        Outbound {
            topic: self.topics.update(&self.target.device_id),
            payload,
            retain: false,
            properties: hint_properties(
                Some(self.topics.status(&self.target.device_id)),
                &self.session_id,
            ),
        }
    }

    /// A ready whose payload is byte for byte one of this session's answered readies (`digest`):
    /// the same update again, without the certificate chain and signature checks (about half of
    /// a ready's cost). Bytes that verified once verify again, and the answer is the update
    /// already sent, so this releases nothing new; a ready that differs in any byte (a tampered
    /// signature, certificate or body) misses here and is verified in full. At 30,000 devices
    /// the readies devices re-sent while their update waited in the manager's queue were verified
    /// about three times per device, which made the operator's cost per device grow with the fleet.
    fn repeated_ready(
        &mut self,
        digest: &[u8; 32],
        msg: &Inbound,
        now: u64,
    ) -> Result<Option<ManagerOutput>, ProtocolError> {
        if !self.handshakes().any(|e| e.ready_digest == *digest) {
            return Ok(None);
        }
        check_hints(
            &msg.properties,
            Some(&self.topics.update(&self.target.device_id)),
            &self.session_id,
        )?;
        let actions = self
            .answer_again(|e| e.ready_digest == *digest, now)
            .unwrap_or_default();
        Ok(Some(ManagerOutput {
            actions,
            events: vec![ManagerEvent::ReadyRepeated],
        }))
    }

    /// The update of the handshake that `answered` (its ready came again) once more, unless it
    /// went out less than [`UPDATE_RESEND_SECS`] ago: a device re-sends its ready when no update
    /// came within its window timeout (30 s by default), and when the manager's queue is long
    /// the first ready and its re-sends are answered back to back; each answer after the first
    /// would only add a duplicate update to the broker's load. An update lost on the way is sent
    /// again at the device's next re-send. `None` when no handshake matches.
    fn answer_again(
        &mut self,
        answered: impl Fn(&Established) -> bool,
        now: u64,
    ) -> Option<Vec<Action>> {
        let e = self
            .established
            .iter_mut()
            .chain(self.superseded.iter_mut().rev())
            .find(|e| answered(e))?;
        if now < e.update_sent_at.saturating_add(UPDATE_RESEND_SECS) {
            return Some(Vec::new());
        }
        e.update_sent_at = now;
        let payload = e.update_payload.clone();
        Some(vec![Action::Publish(self.update_publish(payload))])
    }

    /// This session's handshakes: the established one, then the superseded ones, newest first.
    fn handshakes(&self) -> impl Iterator<Item = &Established> {
        self.established.iter().chain(self.superseded.iter().rev())
    }

    /// The first of this live session's [`handshakes`](Self::handshakes) that `matches` (a check
    /// only the device holding that handshake's keys can pass); a superseded one becomes the
    /// established handshake. `None` when none matches or the session is over.
    fn select_handshake(
        &mut self,
        mut matches: impl FnMut(&Established) -> bool,
    ) -> Option<&Established> {
        if self.state.is_final() {
            return None;
        }
        if !self.established.as_ref().is_some_and(&mut matches) {
            let i = self.superseded.iter().rposition(&mut matches)?;
            let chosen = self.superseded.remove(i);
            self.issued = chosen.issued;
            if let Some(previous) = self.established.replace(chosen) {
                self.superseded.push(previous);
            }
        }
        self.established.as_ref()
    }

    /// The established session, when the session is live (not final).
    fn live(&self, message: &'static str) -> Result<&Established, ProtocolError> {
        match &self.established {
            Some(est) if !self.state.is_final() => Ok(est),
            _ => Err(ProtocolError::UnexpectedMessage {
                message,
                state: self.state.name(),
            }),
        }
    }

    fn handle_status(&mut self, msg: &Inbound, now: u64) -> Result<ManagerOutput, ProtocolError> {
        let est = self.live("status")?;
        let (env, sm) = wire::decode_status(&msg.payload)?;
        env.verify(&est.device.public_key, "status")?;
        if sm.session_id != self.session_id {
            return Err(ProtocolError::WrongSession);
        }
        // The handshake whose keys open the status, with a sequence number above its last one:
        // only then may a superseded handshake become the established one again.
        let seq = sm.seq.to_be_bytes();
        let open = |e: &Established| {
            let aad = crypto::session_aad(STATUS_AAD_LABEL, &e.transcript, &seq);
            crypto::open(&e.keys.d2m, &sm.nonce, &aad, &sm.ct)
        };
        let mut plain = None;
        let mut replayed = false;
        let fresh = self.select_handshake(|e| {
            plain = open(e);
            replayed |= plain.is_some() && sm.seq <= e.last_seq;
            plain.is_some() && sm.seq > e.last_seq
        });
        let plain = match (fresh, plain) {
            (Some(_), Some(plain)) => plain,
            _ if replayed => return Err(ProtocolError::Replay),
            _ => return Err(ProtocolError::Decrypt { message: "status" }),
        };
        let body = wire::decode_status_body(&plain)?;
        let count = self.campaign.chunk_count();
        let mut out = ManagerOutput::default();
        match body {
            StatusBody::Accepted { received } => {
                let received = received.min(count);
                out.events.push(ManagerEvent::Progress {
                    chunks_received: received,
                    chunk_count: count,
                });
                self.state = ManagerState::Transferring {
                    chunks_received: received,
                };
            }
            StatusBody::ChunksRequested { indices } => {
                if let Some(&bad) = indices.iter().find(|&&i| i >= count) {
                    return Err(ProtocolError::ChunkOutOfRange { index: bad, count });
                }
                let (indices, fresh) = self.admit_chunk_request(indices, now)?;
                out.events.push(if fresh {
                    ManagerEvent::ChunksPulled { indices }
                } else {
                    ManagerEvent::ChunksRequested { indices }
                });
            }
        }
        if let Some(est) = self.established.as_mut() {
            est.last_seq = sm.seq;
        }
        Ok(out)
    }

    /// The part of a chunk request this session answers: at most [`MAX_REPUBLISH_PER_REQUEST`]
    /// distinct indices, within a budget of [`REPUBLISH_BUDGET_IMAGES`] images per session, and at
    /// most one request per [`MIN_REQUEST_INTERVAL_SECS`] — except, when chunks are served on
    /// request, a *fresh* pull (every index above all this session asked for before: a device
    /// moving through the image window by window), which is answered at once. Beyond that:
    /// `RateLimited`. Also says whether the request was such a fresh pull.
    fn admit_chunk_request(
        &mut self,
        mut indices: Vec<u32>,
        now: u64,
    ) -> Result<(Vec<u32>, bool), ProtocolError> {
        indices.sort_unstable();
        indices.dedup();
        indices.truncate(MAX_REPUBLISH_PER_REQUEST);
        let fresh = self.campaign.pull && indices.first().is_some_and(|&i| i >= self.fresh_from);
        if !fresh
            && self
                .last_request_at
                .is_some_and(|t| now < t.saturating_add(MIN_REQUEST_INTERVAL_SECS))
        {
            return Err(ProtocolError::RateLimited("more than one request a second"));
        }
        let budget = REPUBLISH_BUDGET_IMAGES
            .saturating_mul(u64::from(self.campaign.chunk_count()))
            .saturating_add(MAX_REPUBLISH_PER_REQUEST as u64);
        let after = self.republished.saturating_add(indices.len() as u64);
        if after > budget {
            return Err(ProtocolError::RateLimited(
                "the session's republish budget is spent",
            ));
        }
        self.republished = after;
        if fresh {
            self.fresh_from = indices
                .last()
                .map_or(self.fresh_from, |&i| i.saturating_add(1));
        } else {
            self.last_request_at = Some(now);
        }
        Ok((indices, fresh))
    }

    /// A receipt: the device's signed plaintext claim of the final outcome, bound to this session.
    fn handle_receipt(&mut self, msg: &Inbound) -> Result<ManagerOutput, ProtocolError> {
        let est = self.live("receipt")?;
        let (env, body) = wire::decode_receipt(&msg.payload)?;
        env.verify(&est.device.public_key, "receipt")?;
        if body.session_id != self.session_id {
            return Err(ProtocolError::WrongSession);
        }
        let est = self
            .select_handshake(|e| e.transcript == body.transcript)
            .ok_or(ProtocolError::WrongSession)?;
        let device_key = est.device.public_key;
        self.check_addressed(&body.device_id, &body.manager_id)?;
        if body.campaign_id != self.campaign.campaign_id {
            return Err(ProtocolError::WrongCampaign {
                expected: self.campaign.campaign_id.clone(),
                got: body.campaign_id,
            });
        }
        // What the device must claim to have installed: the campaign's image, or for a rotation
        // the certificate this session issued.
        let expected_sha = match self.campaign.kind {
            PayloadKind::Firmware => Some(self.campaign.image_sha256()),
            _ => self.issued.map(|i| i.fingerprint),
        };
        let differs = |version: &str, sha: &[u8; 32]| {
            version != self.campaign.target_version || expected_sha.as_ref() != Some(sha)
        };
        let receipt = msg.payload.clone();
        let mut out = ManagerOutput::default();
        match body.claim {
            Claim::Installed {
                version,
                sha256,
                release_key,
            } => {
                if differs(&version, &sha256) {
                    return Err(ProtocolError::Decode {
                        message: "receipt",
                        detail:
                            "installed version or hash differs from what this session delivered"
                                .into(),
                    });
                }
                if self.campaign.kind == PayloadKind::Firmware {
                    self.health = Some(HealthVerifier {
                        device_key,
                        session_id: self.session_id,
                        manager_id: self.topics.manager_id().to_string(),
                        device_id: self.target.device_id.clone(),
                        campaign_id: self.campaign.campaign_id.clone(),
                        version: version.clone(),
                        sha256,
                    });
                }
                out.events.push(ManagerEvent::Installed {
                    version,
                    receipt,
                    release_key,
                });
                self.state = ManagerState::Installed;
            }
            Claim::RolledBack {
                version,
                sha256,
                reason,
            } => {
                if differs(&version, &sha256) {
                    return Err(ProtocolError::Decode {
                        message: "receipt",
                        detail:
                            "rolled-back version or hash differs from what this session delivered"
                                .into(),
                    });
                }
                let reason = bounded_text(&reason, MAX_REASON_TEXT);
                out.events.push(ManagerEvent::RolledBack {
                    version: bounded_text(&version, MAX_VERSION_TEXT),
                    reason: reason.clone(),
                    receipt,
                });
                self.state = ManagerState::RolledBack(reason);
            }
            Claim::Rejected { reason } => {
                let reason = reason.bounded();
                out.events.push(ManagerEvent::Rejected {
                    reason: reason.clone(),
                    receipt: Some(receipt),
                });
                self.state = ManagerState::Rejected(reason);
            }
        }
        self.forget_keys();
        Ok(out)
    }

    /// What checks the device's post-install health reports, once this session received a
    /// signed `Installed` receipt for firmware (`None` before, and for credential rotations).
    pub fn health_verifier(&self) -> Option<HealthVerifier> {
        self.health.clone()
    }

    /// Whether `running` would accept this campaign's target version (a hint for the operator; the
    /// device decides).
    pub fn would_accept(&self, running: &str) -> bool {
        self.campaign.kind != PayloadKind::Firmware
            || check_version(
                running,
                &self.campaign.target_version,
                self.target.allow_downgrade,
            )
            .is_ok()
    }
}
