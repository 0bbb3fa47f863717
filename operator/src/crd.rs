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
    /// The device's own maintenance: its time zone (a site's night) and windows. Campaigns read
    /// their spec.schedule.windows in this time zone for this device, and a device with windows of
    /// its own starts only when one of them and one of the campaign's are open together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<DeviceMaintenanceSpec>,
}

/// A device's own maintenance time zone and windows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMaintenanceSpec {
    /// IANA time zone of the device's site (for example America/Chicago): campaign windows and
    /// the device's own windows are read in it for this device. Unset: the campaign's time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Windows in which this device may start an update (none: whenever the campaign's are open).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<WindowSpec>,
}

/// A recurring maintenance window: on the given days, from a local start time, for a duration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct WindowSpec {
    /// Days of the week the window opens on (Mon, Tue, Wed, Thu, Fri, Sat, Sun), in the window's
    /// time zone. Empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// Local time the window opens, HH:MM or HH:MM:SS (24 h). In a daylight-saving gap it opens
    /// when the local clock resumes.
    #[schemars(length(min = 5, max = 8))]
    #[x_kube(validation = Rule::new("self.matches('^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$')").message("windows[].start must be a local time HH:MM or HH:MM:SS, for example 02:00"))]
    pub start: String,
    /// How long the window stays open: hours, minutes and seconds such as 4h, 90m, 1h30m or 45s
    /// (1s to 168h). A device in flight when it closes finishes.
    #[schemars(length(min = 2, max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$') && self.matches('[0-9]')").message("windows[].duration must be hours, minutes and seconds such as 4h, 90m, 1h30m or 45s"))]
    pub duration: String,
}

/// A day of the week.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
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
    /// Why the device failed: Timeout, RolledBack, NotNewer, Expired, ImageHashMismatch, PacketTooLarge, DeclinedByDevice, InstallFailed, InvalidVersion, BadCredentials, ManifestMismatch, ReleaseSignature or DeltaBaseMismatch (see docs/reasons.md).
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
    /// The device left the campaign before it finished (it stopped matching the selector): its
    /// session was ended with the signed abort.
    Released,
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
        description = "Pending, Planned, Progressing, Paused, Succeeded, Completed, Failed or Aborted"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.devices.succeeded",
        description = "Devices that installed the update (signed receipt)"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.devices.failed",
        description = "Devices that refused, rolled back or timed out"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.devices.selected",
        description = "Devices the selector picks"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.targetVersion",
        description = "Version the campaign delivers"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Devices finished (succeeded or failed) / devices selected",
        priority = 1
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
    /// When devices may start: not before a time, not after a deadline, only inside recurring
    /// maintenance windows (in an IANA time zone; a Device's spec.maintenance can carry its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
    /// Rank among running campaigns that select the same Device (-1000 to 1000, default 0): a
    /// device belongs to one campaign at a time, the one that already started it, else the one
    /// with the highest priority, then the older one, then by name. The others count it in
    /// status.devices.waiting and take it when the holder is done with it.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Plan only: status.plan shows the waves with their sizes and first devices, the devices
    /// excluded and why, the bytes the broker would carry and policy warnings; no device is
    /// touched and nothing is published. Set it to false to start exactly that plan (it cannot be
    /// set back to true).
    #[serde(default)]
    #[x_kube(validation = Rule::new("!self || oldSelf").message("spec.dryRun can only be turned off (which starts the campaign): create a new campaign to plan again"))]
    pub dry_run: bool,
    /// Promote past waves: waves 0 to N count as passed whatever their gate said, so the campaign
    /// may open wave N+1 (a gate with manual: true waits for exactly this; a gate that failed with
    /// onFailure: Pause resumes). It only grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("spec.promoteThroughWave only grows: a wave once promoted stays promoted"))]
    pub promote_through_wave: Option<u32>,
    /// Exclude devices without spec.certificateFingerprint: only pinned devices are updated
    /// (status.plan and status.devices.excluded count the others).
    #[serde(default)]
    pub require_certificate_pin: bool,
}

/// When devices may start.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// No device starts before this time (RFC 3339, for example 2026-12-01T22:00:00Z).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    /// No device starts after this time: devices in flight finish, the others are left and the
    /// campaign ends Completed (Ready reason DeadlinePassed) unless every device was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// IANA time zone of the windows (for example Europe/Berlin; default UTC). A Device's
    /// spec.maintenance.timeZone overrides it for that device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Maintenance windows: devices start only while one is open (none: at any time). A device in
    /// flight when its window closes finishes. status.schedule shows the next opening.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<WindowSpec>,
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
#[x_kube(validation = Rule::new("(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) + (has(self.url) ? 1 : 0) + (has(self.oci) ? 1 : 0) == 1").message("spec.payload.firmware must set exactly one of configMapKeyRef, secretKeyRef, url or oci"))]
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
    /// An artifact in an OCI registry (pushed with `oras push REF image.bin`): its one file is the
    /// image, pulled by digest (a tag is resolved once, the digest recorded in status.ociDigest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
    /// Expected SHA-256 (hex) of the image; required for url, optional for the others, checked
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
    /// Binary deltas offered to the devices that run an earlier release: per entry the release
    /// a device must run (`fromVersion`, compared with its status.runningVersion) and where that
    /// release's image is (the same sources as the image). The operator computes each delta
    /// itself (zstd --patch-from, once per base version) and seals it once; a device on that
    /// version receives only the delta and rebuilds this image, every other device the full
    /// image, and a device whose installed image is not that base refuses the delta and gets
    /// the full image next (docs/protocol.md, "Delta updates").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub deltas: Vec<DeltaSource>,
}

/// A release devices may run, and where its image is: the base of a delta to the campaign's
/// image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) + (has(self.url) ? 1 : 0) + (has(self.oci) ? 1 : 0) == 1").message("each of spec.payload.firmware.deltas must set exactly one of configMapKeyRef, secretKeyRef, url or oci (where the fromVersion image is)"))]
#[serde(rename_all = "camelCase")]
pub struct DeltaSource {
    /// The version (semver) the devices that get this delta run: their status.runningVersion.
    #[schemars(length(min = 1, max = 64))]
    pub from_version: String,
    /// A key of a ConfigMap in this namespace holding the base image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret in this namespace holding the base image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// An HTTP(S) URL of the base image with its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// The base image as an OCI artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
    /// Expected SHA-256 (hex) of the base image; required for url, optional for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(equal = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("spec.payload.firmware.deltas[].sha256 must be 64 lowercase hex characters"))]
    pub sha256: Option<String>,
}

impl DeltaSource {
    /// The base image's source in the shape of an image source (what the firmware fetch reads).
    pub fn image_source(&self) -> FirmwareSource {
        FirmwareSource {
            config_map_key_ref: self.config_map_key_ref.clone(),
            secret_key_ref: self.secret_key_ref.clone(),
            url: self.url.clone(),
            oci: self.oci.clone(),
            sha256: self.sha256.clone(),
            release_signature: None,
            deltas: Vec::new(),
        }
    }
}

/// What a campaign's deltas saved, over the devices that installed the target version in it
/// (added up over the shards): devices that rebuilt it from a delta, the bytes their transfers
/// carried and the bytes full images would have. Counted by the operator that served them since
/// it last prepared the campaign.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct DeltaStatus {
    /// Devices that installed from a delta.
    pub devices: u32,
    /// Bytes the installed devices' transfers carried (deltas, and full images to the others).
    pub bytes_sent: u64,
    /// Bytes full images to the same devices would have carried.
    pub bytes_full: u64,
}

impl std::ops::Add for DeltaStatus {
    type Output = Self;

    /// Two tallies added up (two shards').
    fn add(self, other: Self) -> Self {
        Self {
            devices: self.devices + other.devices,
            bytes_sent: self.bytes_sent + other.bytes_sent,
            bytes_full: self.bytes_full + other.bytes_full,
        }
    }
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

/// A firmware image kept as an OCI artifact.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OciSource {
    /// registry/repository:tag or registry/repository@sha256:<digest>. A digest is the integrity
    /// check; a tag is resolved to a digest when the campaign is first prepared and that digest is
    /// used from then on (status.ociDigest).
    #[schemars(length(min = 3, max = 1024))]
    #[x_kube(validation = Rule::new("self.contains('/')").message("spec.payload.firmware.oci.reference must name the registry: registry/repository:tag or registry/repository@sha256:<digest>"))]
    pub reference: String,
    /// A Secret of type kubernetes.io/dockerconfigjson (same namespace) with credentials for the
    /// registry (kubectl create secret docker-registry). Unset: anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pull_secret_name: Option<String>,
    /// Speak plain HTTP to the registry (only for a registry on a trusted network, as Flux's
    /// OCIRepository insecure). Default: HTTPS with the system trust roots.
    #[serde(default)]
    pub insecure: bool,
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
    /// Most devices started in any 60 seconds (1-100000), on top of maxInFlight; the ceiling of
    /// the ramp. Unset: no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_per_minute: Option<u32>,
    /// An exponential ramp of the start rate, as AWS IoT Jobs' exponential rollout: it starts at
    /// startPerMinute and grows by factor after every successesPerStep successes, up to
    /// maxPerMinute. status.ratePerMinute shows the rate in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampSpec>,
    /// A gate held after the canary and after each wave: the next wave opens only once it passes
    /// (device health, a Prometheus metric, a manual promotion). status.gate shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
}

/// An exponential ramp of the start rate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RampSpec {
    /// Starts per minute at first (1-100000).
    #[schemars(range(min = 1, max = 100000))]
    pub start_per_minute: u32,
    /// What the rate is multiplied by at each step (1.1 to 5).
    #[schemars(range(min = 1.1, max = 5.0))]
    pub factor: f64,
    /// Successful devices per step (1-100000): the rate is startPerMinute x factor^(succeeded /
    /// successesPerStep, rounded down), at most maxPerMinute.
    #[schemars(range(min = 1, max = 100000))]
    pub successes_per_step: u32,
}

/// The gate between waves. At least one check: deviceHealth, metrics or manual.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.deviceHealth) || has(self.metrics) || (has(self.manual) && self.manual)").message("spec.rollout.gate needs at least one check: deviceHealth, metrics or manual: true"))]
#[serde(rename_all = "camelCase")]
pub struct GateSpec {
    /// Seconds to wait after a wave finished before the gate is judged (0-86400): devices report
    /// their health and metrics settle meanwhile.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub soak_seconds: u32,
    /// What a failed gate does: Pause (phase Paused, Ready reason GateFailed, an Event; set
    /// spec.promoteThroughWave past the wave to go on anyway) or Abort (phase Aborted).
    #[serde(default)]
    pub on_failure: GateFailureAction,
    /// Device health: at least this share of the devices the wave updated must have sent a
    /// signed healthy report (their post-install health check) by the end of the soak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_health: Option<DeviceHealthGate>,
    /// A PromQL query against Prometheus, judged against a threshold (as Flagger and Argo
    /// Rollouts analyses do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsGate>,
    /// Wait for a person (or a Git commit): the gate after wave N passes once
    /// spec.promoteThroughWave is at least N.
    #[serde(default)]
    pub manual: bool,
}

/// What a failed gate does.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum GateFailureAction {
    /// Hold the campaign (phase Paused, reason GateFailed) until spec.promoteThroughWave passes the
    /// wave, or spec.abort.
    #[default]
    Pause,
    /// End the campaign (phase Aborted, reason GateFailed): devices in flight get the signed abort.
    Abort,
}

/// The device-health check of a gate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceHealthGate {
    /// Least share of the wave's updated devices that reported healthy, in percent (0-100).
    #[schemars(range(min = 0, max = 100))]
    pub min_healthy_percent: u32,
}

/// The metrics check of a gate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.max) || has(self.min)").message("spec.rollout.gate.metrics needs a threshold: max, min or both"))]
#[serde(rename_all = "camelCase")]
pub struct MetricsGate {
    /// Base URL of the Prometheus HTTP API, for example http://prometheus.monitoring:9090.
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.rollout.gate.metrics.prometheusUrl must start with http:// or https://"))]
    pub prometheus_url: String,
    /// A PromQL instant query, evaluated when the soak ends. Every sample it returns must meet
    /// the threshold; a query that returns no sample fails the gate (no data is no evidence).
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
    /// The gate passes only when every sample is at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The gate passes only when every sample is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
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
            max_per_minute: None,
            ramp: None,
            gate: None,
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
    /// spec.dryRun is set: status.plan shows what the campaign would do; nothing is touched.
    Planned,
    /// Devices are being updated.
    Progressing,
    /// spec.paused is set.
    Paused,
    /// Every selected device runs the target version: each installed it (signed receipt).
    Succeeded,
    /// Every selected device finished but some failed (within spec.rollout.failureThreshold, or
    /// with none set): the Degraded condition is True with reason DevicesFailed and
    /// status.failures names them. Not healthy for Argo CD or Flux.
    Completed,
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
            CampaignPhase::Succeeded
                | CampaignPhase::Completed
                | CampaignPhase::Failed
                | CampaignPhase::Aborted
        )
    }
}

/// Observed state of a campaign. Bounded: counts, not per-device lists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateCampaignStatus {
    /// Pending, Planned (spec.dryRun), Progressing, Paused, Succeeded (every device runs the target
    /// version), Completed (finished, some devices failed or left), Failed or Aborted.
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
    /// Chunks of each delta of spec.payload.firmware.deltas, in that order (kept, like
    /// chunkCount, so that a restarted operator can clear them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub delta_chunk_counts: Vec<u32>,
    /// When the signed manifests expire: fixed when the operator first prepares the campaign
    /// (spec.expiresAfterSeconds later) and kept across operator restarts. Past it devices refuse
    /// every chunk and install of this campaign and the campaign fails with reason Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Key id (SHA-256 of the public key, hex) of the release key that signed the firmware image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub release_key_id: Option<String>,
    /// The manifest digest (sha256:...) spec.payload.firmware.oci.reference resolved to when the
    /// campaign was first prepared; a restarted operator pulls this digest, never the tag again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub oci_digest: Option<String>,
    /// The manifest digest (sha256:...) each OCI base of spec.payload.firmware.deltas resolved to
    /// when the campaign was first prepared, by fromVersion: a restarted operator or another
    /// replica pulls these digests, never the tags again, so every delta is made from one base.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delta_oci_digests: BTreeMap<String, String>,
    /// What the deltas of spec.payload.firmware.deltas saved (set when the campaign offers one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaStatus>,
    /// Some failed devices with their reasons (at most 20; devices.failed counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<DeviceFailure>,
    /// Ready, Progressing, Failed, Stalled, Paused and Degraded conditions (kstatus-compatible
    /// with observedGeneration). Ready is True only for Succeeded; Stalled and Degraded are True
    /// when the campaign ended without every device at the target version (Completed, Failed,
    /// Aborted).
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
    /// What the campaign waits for when its policy holds devices back (NotBefore, OutsideWindow,
    /// RateLimited, Gate, HeldByCampaign), and until when if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingStatus>,
    /// The maintenance windows: whether one is open now, when the next opens or this one closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleStatus>,
    /// Start rate in force (devices per minute) under spec.rollout.maxPerMinute and the ramp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
    /// The gate after the current wave (spec.rollout.gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
    /// Other campaigns holding some of the selected devices, with how many (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub held_by: Vec<HolderStatus>,
    /// The plan: what the campaign does (spec.dryRun shows it before anything starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanStatus>,
    /// Settings that work against each other (for example a failure threshold the canary cannot
    /// reach, a window that never opens); at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub warnings: Vec<String>,
}

/// What a campaign waits for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitingStatus {
    /// NotBefore, OutsideWindow, RateLimited, Gate or HeldByCampaign.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// What it waits for, in words.
    #[schemars(length(max = 512))]
    pub message: String,
    /// When the wait ends, if the operator knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
}

/// The maintenance windows as the campaign sees them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// Whether a campaign window is open now (in the campaign's time zone).
    pub open: bool,
    /// When the next window opens (while none is open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_open: Option<Time>,
    /// When the open window closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<Time>,
}

/// The gate after a wave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// The wave it follows (0: the canary, or the first wave without one).
    pub wave: u32,
    /// Soaking, WaitingForPromotion, Passed or Failed.
    #[schemars(length(max = 32))]
    pub state: String,
    /// Waves whose gate passed or that were promoted: the campaign may open wave passedWaves.
    pub passed_waves: u32,
    /// When the soak ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_until: Option<Time>,
    /// Devices of the wave that reported healthy / devices it updated, when judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub healthy: Option<String>,
    /// The metric query's result when judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub metric: Option<String>,
    /// Why it passed, failed or waits.
    #[schemars(length(max = 512))]
    pub message: String,
}

/// A campaign that holds some of the selected devices.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HolderStatus {
    /// Its name (same namespace).
    #[schemars(length(max = 253))]
    pub campaign: String,
    /// Selected devices it holds.
    pub devices: u32,
}

/// The plan of a campaign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStatus {
    /// Devices that would be updated.
    pub devices: u32,
    /// The waves (the first 16): size and first devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub waves: Vec<PlannedWave>,
    /// Devices left out, by reason (UpToDate, HeldByCampaign, NoCertificatePin,
    /// OutsideEveryWindow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub excluded: Vec<PlanExclusion>,
    /// Bytes the broker would carry from the operator: the encrypted chunks once, plus each
    /// device's signed notify and encrypted update (an estimate; republished chunks not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_broker_bytes: Option<u64>,
}

/// One planned wave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedWave {
    /// Wave number (0 is the canary, if any).
    pub wave: u32,
    /// Devices in it.
    pub size: u32,
    /// Its first devices by name (at most 5).
    #[schemars(length(max = 5))]
    pub first_devices: Vec<String>,
}

/// Devices a plan leaves out for one reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanExclusion {
    /// UpToDate, HeldByCampaign, NoCertificatePin or OutsideEveryWindow.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// How many.
    pub count: u32,
    /// The first of them by name (at most 5).
    #[schemars(length(max = 5))]
    pub devices: Vec<String>,
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
    /// Where its share of the current wave begins (its share of the waves before): the devices
    /// whose health the gate after the wave judges are `waveStart..waveEnd`.
    #[serde(default)]
    pub wave_start: u32,
    /// Its share of the campaign's start rate (spec.rollout.maxPerMinute and the ramp), if one is
    /// set. A shard keeps its share for a minute after its last start, so the campaign never
    /// starts more than the rate in any minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
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
    /// Not started (or waiting for a retry), and free to start.
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
    /// Already at the target version (their Device status says so): nothing to do, not started.
    #[serde(default)]
    pub up_to_date: u32,
    /// Held by another running campaign (higher spec.priority, or older at equal priority, or
    /// already updating them): they join once it is done with them (status.heldBy names it).
    #[serde(default)]
    pub waiting: u32,
    /// Not started because a maintenance window is closed (the campaign's, or the device's own
    /// spec.maintenance), or spec.schedule.notBefore is still ahead.
    #[serde(default)]
    pub outside_window: u32,
    /// Left out: no certificate pin while spec.requireCertificatePin is set, or their own
    /// windows never meet the campaign's (status.plan lists them by reason).
    #[serde(default)]
    pub excluded: u32,
    /// Devices that started matching spec.selector while the campaign ran and joined it.
    #[serde(default)]
    pub joined: u32,
    /// Devices that stopped matching spec.selector (or were deleted) while the campaign ran: a
    /// session in flight was ended with the signed abort.
    #[serde(default)]
    pub left: u32,
}

/// One failed device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFailure {
    /// Device resource name.
    #[schemars(length(max = 253))]
    pub device: String,
    /// Why the device failed: Timeout, RolledBack, NotNewer, Expired, ImageHashMismatch, PacketTooLarge, DeclinedByDevice, InstallFailed, InvalidVersion, BadCredentials, ManifestMismatch, ReleaseSignature or DeltaBaseMismatch (see docs/reasons.md).
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
