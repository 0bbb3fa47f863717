//! The reasons the operator records, as typed enums with one CamelCase spelling each: why a device
//! failed ([`FailureReason`], on Device status, campaign `status.failures` and the failure metric)
//! and why a campaign cannot run ([`BlockerReason`], its `Ready` condition reason and Warning Event).
//! Tests, docs and the GitOps health checks read [`FailureReason::ALL`] and [`BlockerReason::ALL`];
//! nothing else spells a reason.

use sealed_ota_protocol::RejectReason;

/// Why one device did not end at the target version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    /// No signed receipt within the attempts' time.
    Timeout,
    /// The device installed the update, failed its health check and rolled back (signed receipt).
    RolledBack,
    /// The device runs a version not older than the target (anti-rollback).
    NotNewer,
    /// The campaign's signed manifest expired before the device installed it.
    Expired,
    /// The stored image does not match the manifest's SHA-256.
    ImageHashMismatch,
    /// A message the update needs exceeds the device's Maximum Packet Size.
    PacketTooLarge,
    /// The device declined the update.
    DeclinedByDevice,
    /// The device's installer failed.
    InstallFailed,
    /// The device runs a version that is not SemVer.
    InvalidVersion,
    /// The delivered credentials were refused by the device.
    BadCredentials,
    /// The device's receipt does not match what the manager sent.
    ManifestMismatch,
    /// The image's release signature does not verify against the keys the device trusts.
    ReleaseSignature,
    /// The device was offered a delta for a base image it does not hold.
    DeltaBaseMismatch,
}

impl FailureReason {
    /// Every reason, in documentation order.
    pub const ALL: [FailureReason; 13] = [
        FailureReason::Timeout,
        FailureReason::RolledBack,
        FailureReason::NotNewer,
        FailureReason::Expired,
        FailureReason::ImageHashMismatch,
        FailureReason::PacketTooLarge,
        FailureReason::DeclinedByDevice,
        FailureReason::InstallFailed,
        FailureReason::InvalidVersion,
        FailureReason::BadCredentials,
        FailureReason::ManifestMismatch,
        FailureReason::ReleaseSignature,
        FailureReason::DeltaBaseMismatch,
    ];

    /// The CamelCase spelling stored in statuses and used as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "Timeout",
            FailureReason::RolledBack => "RolledBack",
            FailureReason::NotNewer => "NotNewer",
            FailureReason::Expired => "Expired",
            FailureReason::ImageHashMismatch => "ImageHashMismatch",
            FailureReason::PacketTooLarge => "PacketTooLarge",
            FailureReason::DeclinedByDevice => "DeclinedByDevice",
            FailureReason::InstallFailed => "InstallFailed",
            FailureReason::InvalidVersion => "InvalidVersion",
            FailureReason::BadCredentials => "BadCredentials",
            FailureReason::ManifestMismatch => "ManifestMismatch",
            FailureReason::ReleaseSignature => "ReleaseSignature",
            FailureReason::DeltaBaseMismatch => "DeltaBaseMismatch",
        }
    }

    /// A stored reason. Records written before reasons were typed used the protocol's snake_case
    /// labels: those are read too, so a restarted operator resumes them.
    pub fn parse(text: &str) -> Option<Self> {
        let legacy = match text {
            "not_newer" => Some(FailureReason::NotNewer),
            "expired" => Some(FailureReason::Expired),
            "image_hash_mismatch" => Some(FailureReason::ImageHashMismatch),
            "packet_too_large" => Some(FailureReason::PacketTooLarge),
            "declined" => Some(FailureReason::DeclinedByDevice),
            "install_failed" => Some(FailureReason::InstallFailed),
            "invalid_version" => Some(FailureReason::InvalidVersion),
            "bad_credentials" => Some(FailureReason::BadCredentials),
            "manifest_mismatch" => Some(FailureReason::ManifestMismatch),
            "release_signature" => Some(FailureReason::ReleaseSignature),
            "delta_base_mismatch" => Some(FailureReason::DeltaBaseMismatch),
            _ => None,
        };
        legacy.or_else(|| Self::ALL.into_iter().find(|r| r.as_str() == text))
    }

    /// The reason a device's signed refusal names.
    pub fn from_reject(reason: &RejectReason) -> Self {
        match reason {
            RejectReason::NotNewer { .. } => FailureReason::NotNewer,
            RejectReason::Expired => FailureReason::Expired,
            RejectReason::ImageHashMismatch => FailureReason::ImageHashMismatch,
            RejectReason::PacketTooLarge { .. } => FailureReason::PacketTooLarge,
            RejectReason::DeclinedByDevice(_) => FailureReason::DeclinedByDevice,
            RejectReason::InstallFailed(_) => FailureReason::InstallFailed,
            RejectReason::InvalidVersion(_) => FailureReason::InvalidVersion,
            RejectReason::BadCredentials(_) => FailureReason::BadCredentials,
            RejectReason::ManifestMismatch(_) => FailureReason::ManifestMismatch,
            RejectReason::ReleaseSignature(_) => FailureReason::ReleaseSignature,
            RejectReason::DeltaBaseMismatch => FailureReason::DeltaBaseMismatch,
        }
    }
}

impl FailureReason {
    /// What it means, for the reason table in docs/reasons.md.
    pub fn meaning(self) -> &'static str {
        match self {
            FailureReason::Timeout => "no signed receipt within `deviceTimeoutSeconds`, after every retry",
            FailureReason::RolledBack => "the device installed the update, failed its health check and rolled back (signed receipt on the Device)",
            FailureReason::NotNewer => "the device runs a version not older than the target (anti-rollback; `allowDowngrade` for a deliberate downgrade)",
            FailureReason::Expired => "the campaign's signed manifest expired before the device installed it",
            FailureReason::ImageHashMismatch => "the image the device stored does not match the manifest's SHA-256",
            FailureReason::PacketTooLarge => "a message of the update exceeds the device's MQTT Maximum Packet Size (lower `chunkSize`)",
            FailureReason::DeclinedByDevice => "the device declined the update",
            FailureReason::InstallFailed => "the device's installer failed",
            FailureReason::InvalidVersion => "the device runs a version that is not SemVer",
            FailureReason::BadCredentials => "the device refused the delivered credentials",
            FailureReason::ManifestMismatch => "the device's receipt does not match what the manager sent",
            FailureReason::ReleaseSignature => "the image's release signature does not verify against the release keys the device trusts",
            FailureReason::DeltaBaseMismatch => "the device was offered a delta whose base image is not the image it has installed (nothing installed; the full image fits it)",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a campaign cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockerReason {
    /// spec.selector is not a valid label selector.
    InvalidSelector,
    /// A spec.rollout field does not parse.
    InvalidRollout,
    /// The manager Secret does not exist.
    ManagerSecretMissing,
    /// The manager Secret exists but its key, certificate or CA is unusable.
    ManagerSecretInvalid,
    /// The rotation CA Secret does not exist.
    CaSecretMissing,
    /// The rotation CA Secret exists but is unusable.
    CaSecretInvalid,
    /// The firmware source (ConfigMap, Secret key) is missing or empty.
    FirmwareUnreadable,
    /// Downloading spec.payload.firmware.url failed (the server may come back).
    FirmwareDownloadFailed,
    /// The image does not match its SHA-256.
    FirmwareDigestMismatch,
    /// spec.payload.firmware.releaseSignature does not verify over the image.
    ReleaseSignatureInvalid,
    /// spec.payload names neither firmware nor a rotation.
    PayloadMissing,
    /// The payload cannot be prepared (e.g. an invalid target version).
    PayloadInvalid,
    /// The MQTT broker refuses or drops the connection.
    BrokerUnavailable,
    /// spec.payload.firmware.oci.reference does not parse as a registry reference.
    OciReferenceInvalid,
    /// spec.payload.firmware.oci.pullSecretName is missing or holds no credentials for the registry.
    PullSecretInvalid,
    /// The registry refused the credentials (or access without them).
    RegistryAuthFailed,
    /// spec.schedule cannot be used (an unknown time zone, a deadline before notBefore).
    InvalidSchedule,
    /// spec.schedule.windows never open (within a year, or before the deadline).
    WindowNeverOpens,
}

impl BlockerReason {
    /// Every reason, in documentation order.
    pub const ALL: [BlockerReason; 18] = [
        BlockerReason::InvalidSelector,
        BlockerReason::InvalidRollout,
        BlockerReason::ManagerSecretMissing,
        BlockerReason::ManagerSecretInvalid,
        BlockerReason::CaSecretMissing,
        BlockerReason::CaSecretInvalid,
        BlockerReason::FirmwareUnreadable,
        BlockerReason::FirmwareDownloadFailed,
        BlockerReason::FirmwareDigestMismatch,
        BlockerReason::ReleaseSignatureInvalid,
        BlockerReason::PayloadMissing,
        BlockerReason::PayloadInvalid,
        BlockerReason::BrokerUnavailable,
        BlockerReason::OciReferenceInvalid,
        BlockerReason::PullSecretInvalid,
        BlockerReason::RegistryAuthFailed,
        BlockerReason::InvalidSchedule,
        BlockerReason::WindowNeverOpens,
    ];

    /// The CamelCase spelling: the `Ready` condition's reason and the Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockerReason::InvalidSelector => "InvalidSelector",
            BlockerReason::InvalidRollout => "InvalidRollout",
            BlockerReason::ManagerSecretMissing => "ManagerSecretMissing",
            BlockerReason::ManagerSecretInvalid => "ManagerSecretInvalid",
            BlockerReason::CaSecretMissing => "CaSecretMissing",
            BlockerReason::CaSecretInvalid => "CaSecretInvalid",
            BlockerReason::FirmwareUnreadable => "FirmwareUnreadable",
            BlockerReason::FirmwareDownloadFailed => "FirmwareDownloadFailed",
            BlockerReason::FirmwareDigestMismatch => "FirmwareDigestMismatch",
            BlockerReason::ReleaseSignatureInvalid => "ReleaseSignatureInvalid",
            BlockerReason::PayloadMissing => "PayloadMissing",
            BlockerReason::PayloadInvalid => "PayloadInvalid",
            BlockerReason::BrokerUnavailable => "BrokerUnavailable",
            BlockerReason::OciReferenceInvalid => "OciReferenceInvalid",
            BlockerReason::PullSecretInvalid => "PullSecretInvalid",
            BlockerReason::RegistryAuthFailed => "RegistryAuthFailed",
            BlockerReason::InvalidSchedule => "InvalidSchedule",
            BlockerReason::WindowNeverOpens => "WindowNeverOpens",
        }
    }

    /// Transient blockers clear without anyone changing a resource (a broker or a download server
    /// comes back): the campaign retries them with backoff. Every other blocker needs a person to
    /// change something the campaign watches, so it waits for that change.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            BlockerReason::BrokerUnavailable | BlockerReason::FirmwareDownloadFailed
        )
    }
}

impl BlockerReason {
    /// What it means and the fix, for the reason table in docs/reasons.md.
    pub fn meaning(self) -> &'static str {
        match self {
            BlockerReason::InvalidSelector => "`spec.selector` is not a valid label selector: fix it",
            BlockerReason::InvalidRollout => "a `spec.rollout` amount is neither a count nor a percentage: fix it",
            BlockerReason::ManagerSecretMissing => "the Secret `spec.managerSecretName` does not exist: create it (kubernetes.io/tls with ca.crt)",
            BlockerReason::ManagerSecretInvalid => "the manager Secret's key, certificate or CA is unusable: replace it",
            BlockerReason::CaSecretMissing => "the rotation CA Secret does not exist: create it",
            BlockerReason::CaSecretInvalid => "the rotation CA Secret is unusable: replace it",
            BlockerReason::FirmwareUnreadable => "the firmware ConfigMap/Secret or its key, or the OCI artifact, is missing, empty or too large, or the artifact has more than one file: fix the source",
            BlockerReason::FirmwareDownloadFailed => "downloading `payload.firmware.url` or pulling `payload.firmware.oci` failed: retried with backoff until the server answers",
            BlockerReason::FirmwareDigestMismatch => "the image does not match its SHA-256: fix the image or the digest",
            BlockerReason::ReleaseSignatureInvalid => "`payload.firmware.releaseSignature` does not verify over the image: sign the right image",
            BlockerReason::PayloadMissing => "`spec.payload` names neither firmware nor a rotation",
            BlockerReason::PayloadInvalid => "the payload cannot be prepared (e.g. an invalid target version): fix the spec",
            BlockerReason::BrokerUnavailable => "the MQTT broker refuses or drops the connection: retried with backoff",
            BlockerReason::OciReferenceInvalid => "`payload.firmware.oci.reference` is not registry/repository:tag or @sha256:<digest>: fix it",
            BlockerReason::PullSecretInvalid => "`payload.firmware.oci.pullSecretName` is missing, not kubernetes.io/dockerconfigjson, or has no credentials for the registry: fix the Secret",
            BlockerReason::RegistryAuthFailed => "the registry refused the pull credentials (or anonymous access): fix the pull Secret",
            BlockerReason::InvalidSchedule => "`spec.schedule` cannot be used (an unknown IANA time zone, a bad window, a deadline before `notBefore`): fix it",
            BlockerReason::WindowNeverOpens => "`spec.schedule.windows` never open (within a year, or before the deadline): fix the windows, time zone or deadline",
        }
    }
}

/// The reason tables of docs/reasons.md, rendered from the enums (a unit test keeps the file equal).
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# Reasons the operator records\n\nGenerated from `operator/src/reasons.rs` (a unit test fails when this file differs).\n\n\
         ## Device failures\n\nOn `Device` `status.campaign.reason`, the campaign's `status.failures[].reason` and the\n\
         `sealed_ota_operator_device_failures_total{reason}` metric.\n\n| reason | meaning |\n|---|---|\n",
    );
    for r in FailureReason::ALL {
        out.push_str(&format!("| `{}` | {} |\n", r.as_str(), r.meaning()));
    }
    out.push_str(
        "\n## Campaign blockers\n\nThe campaign's `Ready` condition reason (phase `Pending`) and a Warning Event. Transient ones\n\
         are retried with backoff; the others wait until something the campaign watches changes.\n\n\
         | reason | transient | meaning and fix |\n|---|---|---|\n",
    );
    for r in BlockerReason::ALL {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            r.as_str(),
            if r.is_transient() { "yes" } else { "no" },
            r.meaning()
        ));
    }
    out
}

impl std::fmt::Display for BlockerReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_are_camel_case_unique_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for r in FailureReason::ALL {
            let s = r.as_str();
            assert!(s.chars().next().unwrap().is_ascii_uppercase() && !s.contains('_'));
            assert!(seen.insert(s));
            assert_eq!(FailureReason::parse(s), Some(r));
        }
        for r in BlockerReason::ALL {
            let s = r.as_str();
            assert!(s.chars().next().unwrap().is_ascii_uppercase() && !s.contains('_'));
            assert!(seen.insert(s), "{s} spelt twice");
        }
        assert_eq!(FailureReason::parse("nonsense"), None);
    }

    #[test]
    fn legacy_snake_case_records_are_read_and_every_refusal_maps() {
        assert_eq!(
            FailureReason::parse("not_newer"),
            Some(FailureReason::NotNewer)
        );
        let refusals = [
            RejectReason::NotNewer {
                running: "2.0.0".into(),
                offered: "1.0.0".into(),
            },
            RejectReason::Expired,
            RejectReason::ImageHashMismatch,
            RejectReason::PacketTooLarge {
                max_packet_size: 1,
                needed: 2,
            },
            RejectReason::DeclinedByDevice("no".into()),
            RejectReason::InstallFailed("disk".into()),
            RejectReason::InvalidVersion("x".into()),
            RejectReason::BadCredentials("x".into()),
            RejectReason::ManifestMismatch("x".into()),
            RejectReason::ReleaseSignature("x".into()),
            RejectReason::DeltaBaseMismatch,
        ];
        for r in &refusals {
            // The protocol's own label (what older records hold) reads back as the same reason.
            assert_eq!(
                FailureReason::parse(r.metric_label()),
                Some(FailureReason::from_reject(r)),
                "{r:?}"
            );
        }
    }

    #[test]
    fn docs_reasons_md_is_rendered_from_the_enums() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reasons.md");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == render_markdown(),
            "docs/reasons.md differs from operator/src/reasons.rs; run `cargo run -p sealed-ota-operator -- reasons > docs/reasons.md`"
        );
    }

    #[test]
    fn only_broker_and_download_trouble_is_transient() {
        let transient: Vec<_> = BlockerReason::ALL
            .into_iter()
            .filter(|r| r.is_transient())
            .collect();
        assert_eq!(
            transient,
            [
                BlockerReason::FirmwareDownloadFailed,
                BlockerReason::BrokerUnavailable
            ]
        );
    }
}
