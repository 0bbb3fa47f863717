//! Custom resources of group `ota.sealed-ota.dev/v1alpha1`: `Device` and `UpdateCampaign`.
//!
//! The Rust types are the source of truth: `crdgen` renders them (schemars + CEL rules) into
//! `crds/*.yaml`. Field docs become `kubectl explain` text, `#[schemars]` bounds keep every string and
//! list bounded, and `x_kube(validation)` rules make the apiserver refuse bad input with a message that
//! names the field. This module holds types and tiny accessors only; no I/O and no decisions.

// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes the derive's helper attributes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of every Sealed OTA resource.
pub const GROUP: &str = "ota.sealed-ota.dev";
/// Finalizer that guards the campaign's retained MQTT messages (notify per device, chunks).
pub const FINALIZER: &str = "ota.sealed-ota.dev/retained-cleanup";
/// Most failures listed on a campaign's status; the rest are only counted.
pub const MAX_LISTED_FAILURES: usize = 20;

/// A device that receives updates: its MQTT identity and the certificate it must present.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "ota.sealed-ota.dev",
    version = "v1alpha1",
    kind = "Device",
    namespaced,
    status = "DeviceStatus",
    shortname = "otadev",
    doc = "A device that receives Sealed OTA updates. Labels select it into UpdateCampaigns.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.runningVersion",
        description = "Firmware version the device reported in its last signed message"
    ),
    printcolumn(
        name = "Campaign",
        type_ = "string",
        json_path = ".status.campaign.name",
        description = "Last campaign that addressed this device"
    ),
    printcolumn(
        name = "Result",
        type_ = "string",
        json_path = ".status.campaign.phase",
        description = "Result of the last campaign on this device"
    ),
    printcolumn(
        name = "Last Seen",
        type_ = "date",
        json_path = ".status.lastSeen",
        description = "Last authenticated message from the device"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Device id used in MQTT topics and expected as the CN of the device certificate: 1-63 characters
    /// of lowercase letters, digits and '-'. Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.deviceId is immutable: create a new Device instead"))]
    pub device_id: Option<String>,
    /// Pinned SHA-256 fingerprint of the device certificate DER (64 lowercase hex characters). When set,
    /// a device presenting any other certificate (even one the CA signed) is refused, except the
    /// certificates the operator itself issued to this device in credential rotations
    /// (status.rotatedCertificateFingerprint, status.pendingCertificates), so that the campaigns
    /// after a rotation keep working without editing this field. Once a rotation settled, this
    /// certificate is retired (status.retiredCertificateFingerprints) and refused: the pin moves to
    /// the rotated certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(equal = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("spec.certificateFingerprint must be 64 lowercase hex characters (SHA-256 of the certificate DER)"))]
    pub certificate_fingerprint: Option<String>,
}

/// Observed state of a device, written by the operator only on transitions a person wants to see.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Firmware version the device reported in its last signed message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub running_version: Option<String>,
    /// Time of the last authenticated message from the device (written on transitions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// SHA-256 fingerprint (hex) of the device's certificate: the one it presented in its last
    /// handshake, or after a credential rotation succeeded, the new certificate the operator issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub certificate_fingerprint: Option<String>,
    /// Expiry (notAfter) of that certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
    /// SHA-256 fingerprint (hex) of the certificate the operator issued to the device in the last
    /// credential rotation that settled (a signed receipt, or the device presenting it). Accepted in
    /// addition to spec.certificateFingerprint when that pin is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub rotated_certificate_fingerprint: Option<String>,
    /// Certificates the operator issued to the device in rotations whose outcome no credential has
    /// proven yet (recorded before the new certificate was sent, so a lost receipt never locks the
    /// device out). Accepted until the device presents one of them or its previous certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub pending_certificates: Vec<PendingCertificate>,
    /// SHA-256 fingerprints (hex) of certificates a settled rotation retired: a device presenting one
    /// of them is refused even though the CA signed it (whoever holds that key no longer speaks for
    /// the device). The most recent 16 are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub retired_certificate_fingerprints: Vec<String>,
    /// The last campaign that addressed this device and its result there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<DeviceCampaignStatus>,
    /// `Ready`: True when the last campaign installed (signed receipt), False when it failed, Unknown
    /// while an update is in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub conditions: Vec<Condition>,
}

/// A certificate issued in a rotation and not yet settled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCertificate {
    /// SHA-256 fingerprint (hex) of the certificate DER.
    #[schemars(length(max = 64))]
    pub fingerprint: String,
    /// Its expiry (notAfter).
    pub not_after: Time,
    /// Name of the UpdateCampaign that issued it.
    #[schemars(length(max = 253))]
    pub campaign: String,
}

/// The result of one campaign on one device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCampaignStatus {
    /// Name of the UpdateCampaign (same namespace).
    #[schemars(length(max = 253))]
    pub name: String,
    /// UID of the UpdateCampaign, so that a re-created campaign of the same name starts afresh.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// Version the campaign delivers.
    #[schemars(length(max = 64))]
    pub target_version: String,
    /// Where this device is in that campaign.
    pub phase: DevicePhase,
    /// Attempts made so far (1 for the first).
    pub attempts: u32,
    /// Why the device failed: Timeout, RolledBack, NotNewer, Expired, ImageHashMismatch, PacketTooLarge, DeclinedByDevice, InstallFailed, InvalidVersion, BadCredentials, ManifestMismatch or ReleaseSignature (see docs/reasons.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    /// Human-readable detail of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
    /// The device's signed receipt of the final outcome (base64 of the protocol's receipt: a
    /// plaintext claim of outcome, version and image hash bound to the session), kept as evidence.
    /// Verify it with the certificate named by receiptCertificateFingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12288))]
    pub receipt: Option<String>,
    /// SHA-256 fingerprint (hex) of the device certificate whose key signed the receipt (for a
    /// rotation: the certificate the device held before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub receipt_certificate_fingerprint: Option<String>,
    /// Key id (SHA-256 of the public key, hex) of the release key whose signature the device
    /// verified before installing, when it checks release signatures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub release_key_id: Option<String>,
}

/// Phase of one device inside a campaign.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, schemars::JsonSchema,
)]
pub enum DevicePhase {
    /// Selected, not started yet.
    #[default]
    Pending,
    /// Handshake done; the encrypted update is being transferred.
    Transferring,
    /// The device sent a signed receipt for the new version.
    Succeeded,
    /// The device refused, rolled back after install, or every attempt timed out.
    Failed,
}

impl DevicePhase {
    /// Whether the device is finished in its campaign.
    pub fn is_terminal(self) -> bool {
        matches!(self, DevicePhase::Succeeded | DevicePhase::Failed)
    }
}

/// An over-the-air update (firmware or credential rotation) rolled out to the Devices a selector picks.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ota.sealed-ota.dev",
    version = "v1alpha1",
    kind = "UpdateCampaign",
    namespaced,
    status = "UpdateCampaignStatus",
    shortname = "otac",
    shortname = "campaign",
    doc = "An over-the-air update rolled out to the Devices that spec.selector picks, in canary and waves.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Paused, Succeeded, Failed or Aborted"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Devices finished / devices selected"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.targetVersion",
        description = "Version the campaign delivers"
    ),
    printcolumn(
        name = "Wave",
        type_ = "integer",
        json_path = ".status.currentWave",
        description = "Current rollout wave (0 is the canary)",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("(has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0) || (has(self.selector.matchExpressions) && size(self.selector.matchExpressions) > 0)").message("spec.selector must set matchLabels or matchExpressions: an empty selector would update every Device"))]
#[serde(rename_all = "camelCase")]
pub struct UpdateCampaignSpec {
    /// Label selector over Devices in this namespace. Devices that start matching while the campaign runs
    /// join it.
    pub selector: LabelSelector,
    /// Semantic version the campaign delivers (for example `1.4.2`). Devices refuse a version that is not
    /// newer than what they run unless allowDowngrade is set.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+\\\\.[0-9]+\\\\.[0-9]+([-+][0-9A-Za-z.+-]*)?$')").message("spec.targetVersion must be a semantic version such as 1.4.2"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.targetVersion is immutable: create a new UpdateCampaign"))]
    pub target_version: String,
    /// What the campaign delivers: exactly one of firmware or rotateCredentials.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.payload is immutable: create a new UpdateCampaign"))]
    pub payload: CampaignPayloadSpec,
    /// Name of a Secret (same namespace) of type kubernetes.io/tls holding the manager's certificate and
    /// key (tls.crt, tls.key) and the CA certificate (ca.crt). The certificate's CN must be the operator's
    /// manager id.
    #[schemars(length(min = 1, max = 253))]
    pub manager_secret_name: String,
    /// How the rollout proceeds: canary, waves, concurrency, timeouts, retries, failure threshold.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Let devices install a version older than the one they run.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Pause the rollout: no new device starts; transfers in flight finish. Set back to false to resume.
    #[serde(default)]
    pub paused: bool,
    /// Abort the campaign: no new device starts, transfers in flight are dropped, retained messages are
    /// cleared, phase becomes Aborted. Cannot be undone.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.abort cannot be set back to false once a campaign is aborted"))]
    pub abort: bool,
    /// Size of one encrypted chunk in bytes (1024-262144).
    #[serde(default = "default_chunk_size")]
    #[schemars(range(min = 1024, max = 262144))]
    pub chunk_size: u32,
    /// Seconds the signed manifest stays valid after the operator prepares the campaign (60-2592000).
    #[serde(default = "default_expires")]
    #[schemars(range(min = 60, max = 2592000))]
    pub expires_after_seconds: u32,
}

fn default_chunk_size() -> u32 {
    16 * 1024
}
fn default_expires() -> u32 {
    7 * 24 * 3600
}

/// The campaign payload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.firmware) != has(self.rotateCredentials)").message("spec.payload must set exactly one of firmware or rotateCredentials"))]
#[serde(rename_all = "camelCase")]
pub struct CampaignPayloadSpec {
    /// A firmware image, encrypted once and delivered in chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareSource>,
    /// A credential rotation: each device receives a new certificate signed by the CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_credentials: Option<RotateCredentialsSpec>,
}

/// Where the firmware image comes from: exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1").message("spec.payload.firmware must set exactly one of configMapKeyRef, secretKeyRef or url"))]
#[serde(rename_all = "camelCase")]
pub struct FirmwareSource {
    /// A key of a ConfigMap in this namespace (binaryData, or data as UTF-8 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// An HTTP(S) URL with the image's SHA-256, downloaded by the operator (system trust roots, no
    /// redirects, at most 256 MiB) and checked before anything is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// Expected SHA-256 (hex) of the image; required for url, optional for key references, checked
    /// before anything is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(equal = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("spec.payload.firmware.sha256 must be 64 lowercase hex characters"))]
    pub sha256: Option<String>,
    /// Detached signature of the image by an offline release key, as `sealed-ota release sign`
    /// prints it. Devices enrolled with release keys install only firmware whose release signature
    /// verifies; the operator checks it against the image and version before anything is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_signature: Option<ReleaseSignatureSpec>,
}

/// A release signature of a firmware image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSignatureSpec {
    /// The release public key: 130 lowercase hex characters (uncompressed P-256 point, starting 04).
    #[schemars(length(equal = 130))]
    #[x_kube(validation = Rule::new("self.matches('^04[0-9a-f]{128}$')").message("spec.payload.firmware.releaseSignature.publicKey must be 130 lowercase hex characters starting with 04 (the uncompressed P-256 public key, as `sealed-ota release sign` prints it)"))]
    pub public_key: String,
    /// The ECDSA P-256 signature r||s: 128 lowercase hex characters.
    #[schemars(length(equal = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{128}$')").message("spec.payload.firmware.releaseSignature.signature must be 128 lowercase hex characters (as `sealed-ota release sign` prints it)"))]
    pub signature: String,
}

/// A key inside a ConfigMap or Secret of the campaign's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Object name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside data or binaryData.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A firmware image served over HTTP(S).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// http:// or https:// URL of the image.
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.payload.firmware.url.url must start with https:// or http://"))]
    pub url: String,
    /// SHA-256 (hex) the downloaded image must have.
    #[schemars(length(equal = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("spec.payload.firmware.url.sha256 must be 64 lowercase hex characters"))]
    pub sha256: String,
}

/// A credential rotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotateCredentialsSpec {
    /// DeliverKey: the operator generates the new key and delivers it encrypted. Csr: the device
    /// generates the key and only the new certificate travels.
    pub mode: RotationModeSpec,
    /// Secret (same namespace) holding the CA certificate and key (tls.crt and tls.key) that sign the
    /// new device certificates.
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: String,
    /// Validity of the new certificates in days (1-3650).
    #[serde(default = "default_validity")]
    #[schemars(range(min = 1, max = 3650))]
    pub validity_days: u32,
}

fn default_validity() -> u32 {
    365
}

/// How new device credentials are produced.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RotationModeSpec {
    /// The operator generates the key and delivers it on the encrypted channel.
    DeliverKey,
    /// The device generates the key and sends a CSR; only the certificate travels.
    Csr,
}

/// Rollout strategy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Devices updated first, alone, as a count ("3") or a percentage of the selected devices ("10%").
    /// The waves start only when every canary device has finished and the failure threshold holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 8),
        regex(pattern = r"^([0-9]{1,6}|([0-9]{1,2}|100)%)$")
    )]
    pub canary: Option<String>,
    /// Size of each wave after the canary, as a count or a percentage of the selected devices. Default
    /// "100%": everything after the canary in one wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 8),
        regex(pattern = r"^([0-9]{1,6}|([0-9]{1,2}|100)%)$")
    )]
    #[x_kube(validation = Rule::new("self != '0' && self != '0%'").message("spec.rollout.waveSize must be greater than zero"))]
    pub wave_size: Option<String>,
    /// Most devices in a handshake or transfer at once (1-100000).
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: u32,
    /// Seconds one attempt on one device may take before it counts as timed out (5-86400).
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 5, max = 86400))]
    pub device_timeout_seconds: u32,
    /// Extra attempts after a timeout (0-10). A signed refusal from the device is final.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 10))]
    pub retries: u32,
    /// Seconds to wait before a retry; doubles on each further attempt (1-3600).
    #[serde(default = "default_backoff")]
    #[schemars(range(min = 1, max = 3600))]
    pub retry_backoff_seconds: u32,
    /// Failed devices tolerated, as a count or a percentage of the selected devices. One more failure
    /// and the campaign stops with phase Failed. Unset: never stop on failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 8),
        regex(pattern = r"^([0-9]{1,6}|([0-9]{1,2}|100)%)$")
    )]
    pub failure_threshold: Option<String>,
}

fn default_max_in_flight() -> u32 {
    10
}
fn default_timeout() -> u32 {
    300
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> u32 {
    10
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            canary: None,
            wave_size: None,
            max_in_flight: default_max_in_flight(),
            device_timeout_seconds: default_timeout(),
            retries: default_retries(),
            retry_backoff_seconds: default_backoff(),
            failure_threshold: None,
        }
    }
}

/// Phase of a campaign.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum CampaignPhase {
    /// Not started: waiting for devices, Secrets, payload or the broker.
    #[default]
    Pending,
    /// Devices are being updated.
    Progressing,
    /// spec.paused is set.
    Paused,
    /// Every selected device finished and the failure threshold held.
    Succeeded,
    /// The failure threshold was exceeded.
    Failed,
    /// spec.abort is set.
    Aborted,
}

impl CampaignPhase {
    /// Whether the campaign is over (its retained messages are cleared).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CampaignPhase::Succeeded | CampaignPhase::Failed | CampaignPhase::Aborted
        )
    }
}

/// Observed state of a campaign. Bounded: counts, not per-device lists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateCampaignStatus {
    /// Pending, Progressing, Paused, Succeeded, Failed or Aborted.
    #[serde(default)]
    pub phase: CampaignPhase,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Finished devices / selected devices, for example "37/50".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub progress: Option<String>,
    /// Devices per phase.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// Current wave: 0 is the canary (or the first wave when there is no canary).
    #[serde(default)]
    pub current_wave: u32,
    /// Number of waves, canary included.
    #[serde(default)]
    pub total_waves: u32,
    /// Chunks of the prepared image (kept so that a restarted operator can clear them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_count: Option<u32>,
    /// When the signed manifests expire: fixed when the operator first prepares the campaign
    /// (spec.expiresAfterSeconds later) and kept across operator restarts. Past it devices refuse
    /// every chunk and install of this campaign and the campaign fails with reason Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Key id (SHA-256 of the public key, hex) of the release key that signed the firmware image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub release_key_id: Option<String>,
    /// Some failed devices with their reasons (at most 20; devices.failed counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<DeviceFailure>,
    /// Ready, Progressing, Failed, Stalled and Paused conditions (kstatus-compatible with
    /// observedGeneration; Stalled is True when the phase is Failed or Aborted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// The shards of the fleet (operator replicas each hold some): who holds each, its devices, and
    /// what the coordinator lets it start (its share of the current wave and of maxInFlight). At
    /// most 64 entries, one per shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub shards: Vec<ShardAssignment>,
    /// The campaign's content seed, sealed to the manager key (base64 of an ECIES box: only a
    /// holder of the manager's private key opens it): every replica derives the same content key
    /// from it, so all publish the same encrypted chunks. Set when the campaign is first prepared,
    /// removed when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub sealed_seed: Option<String>,
}

/// One shard's part of a campaign, decided by the coordinator from the shard's report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardAssignment {
    /// Shard index.
    pub shard: u32,
    /// Operator replica that reported for this shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub holder: Option<String>,
    /// Devices of this shard the campaign selects.
    pub selected: u32,
    /// Of them, finished (succeeded or failed).
    pub finished: u32,
    /// How many of the shard's devices, in wave order, may start: its share of the current wave.
    pub wave_end: u32,
    /// How many of its devices may be in flight at once: its share of spec.rollout.maxInFlight.
    pub max_in_flight: u32,
    /// What keeps this shard's replica from running the campaign, if anything (docs/reasons.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub blocker: Option<String>,
}

/// Device counts per phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Devices the selector picks.
    pub selected: u32,
    /// Not started (or waiting for a retry).
    pub pending: u32,
    /// In handshake or transfer.
    pub in_progress: u32,
    /// Signed receipt received.
    pub succeeded: u32,
    /// Refused, rolled back or out of attempts.
    pub failed: u32,
    /// Of the failed: installed, then rolled back after a failed health check (signed receipt).
    #[serde(default)]
    pub rolled_back: u32,
}

/// One failed device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFailure {
    /// Device resource name.
    #[schemars(length(max = 253))]
    pub device: String,
    /// Why the device failed: Timeout, RolledBack, NotNewer, Expired, ImageHashMismatch, PacketTooLarge, DeclinedByDevice, InstallFailed, InvalidVersion, BadCredentials, ManifestMismatch or ReleaseSignature (see docs/reasons.md).
    #[schemars(length(max = 64))]
    pub reason: String,
    /// Detail.
    #[schemars(length(max = 256))]
    pub message: String,
}

impl Device {
    /// The id used in MQTT topics and certificate names.
    pub fn device_id(&self) -> String {
        self.spec
            .device_id
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// Labels of the device (empty when none).
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.metadata.labels.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn schemas_carry_cel_rules_and_bounds() {
        let crd = serde_json::to_string(&UpdateCampaign::crd()).unwrap();
        assert!(crd.contains("spec.payload must set exactly one of firmware or rotateCredentials"));
        assert!(crd.contains("spec.selector must set matchLabels or matchExpressions"));
        assert!(crd.contains("\"maxLength\":64"));
        let dev = serde_json::to_string(&Device::crd()).unwrap();
        assert!(dev.contains("spec.certificateFingerprint must be 64 lowercase hex"));
    }

    #[test]
    fn spec_defaults_fill_in() {
        let spec: UpdateCampaignSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a"}},
            "targetVersion": "1.2.3",
            "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
            "managerSecretName": "manager"
        }))
        .unwrap();
        assert_eq!(spec.rollout, RolloutSpec::default());
        assert_eq!(spec.chunk_size, 16384);
        assert!(!spec.paused && !spec.abort);
    }
}
