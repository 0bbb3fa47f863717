//! The Device status the operator owns, built by pure functions: what a handshake, a receipt or a
//! timeout means for `status` (running version, certificate, the campaign record with its signed
//! receipt, the `Ready` condition). Every write carries every owned field, because server-side
//! apply removes owned fields a later apply leaves out. No I/O here.

use std::sync::Arc;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::crd::{DeviceCampaignStatus, DevicePhase, DeviceStatus};
use crate::reasons::FailureReason;
use crate::time::k8s_time;

/// What the handshake told us about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// SHA-256 of the device certificate.
    pub fingerprint: [u8; 32],
    /// Certificate expiry, Unix seconds.
    pub not_after: u64,
    /// Version the device runs.
    pub running_version: String,
}

/// A Device status write for the writer task.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceWrite {
    /// Namespace of the Device.
    pub namespace: String,
    /// Name of the Device.
    pub name: String,
    /// Its device id (which shard it belongs to: only the shard's holder writes it).
    pub device_id: String,
    /// The complete status owned by the operator, shared with the registry's record of what was
    /// written last (one copy per device while the write waits in its lane).
    pub status: Arc<DeviceStatus>,
}

/// Build a Device status (pure): the fields we own are always all present, because server-side apply
/// removes owned fields that a later apply leaves out.
pub fn device_status(
    base: Option<&DeviceStatus>,
    handshake: Option<&Handshake>,
    installed_version: Option<&str>,
    campaign: DeviceCampaignStatus,
    now: u64,
) -> DeviceStatus {
    let base = base.cloned().unwrap_or_default();
    let seen = handshake.is_some() || installed_version.is_some();
    let (status, reason, message) = match campaign.phase {
        DevicePhase::Succeeded => (
            "True",
            "UpToDate".to_owned(),
            format!(
                "installed {} (campaign {})",
                campaign.target_version, campaign.name
            ),
        ),
        DevicePhase::Failed => (
            "False",
            campaign
                .reason
                .clone()
                .unwrap_or_else(|| "UpdateFailed".into()),
            campaign
                .message
                .clone()
                .unwrap_or_else(|| format!("campaign {} failed", campaign.name)),
        ),
        DevicePhase::Released => (
            "Unknown",
            "Released".to_owned(),
            format!(
                "left campaign {} before it finished (no longer selected): its session was ended with the signed abort",
                campaign.name
            ),
        ),
        DevicePhase::Transferring | DevicePhase::Pending => (
            "Unknown",
            "Updating".to_owned(),
            format!(
                "campaign {} is updating the device to {}",
                campaign.name, campaign.target_version
            ),
        ),
    };
    let last_transition_time = base
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| k8s_time(now));
    let ready = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason,
        message: crate::status::bounded(&message, 1024),
        observed_generation: None,
        last_transition_time,
    };
    DeviceStatus {
        running_version: installed_version
            .map(str::to_owned)
            .or_else(|| handshake.map(|h| h.running_version.clone()))
            .or(base.running_version),
        last_seen: if seen {
            Some(k8s_time(now))
        } else {
            base.last_seen
        },
        certificate_fingerprint: handshake
            .map(|h| hex::encode(h.fingerprint))
            .or(base.certificate_fingerprint),
        certificate_not_after: handshake
            .map(|h| k8s_time(h.not_after))
            .or(base.certificate_not_after),
        rotated_certificate_fingerprint: base.rotated_certificate_fingerprint,
        pending_certificates: base.pending_certificates,
        retired_certificate_fingerprints: base.retired_certificate_fingerprints,
        campaign: Some(campaign),
        conditions: vec![ready],
    }
}

/// The campaign record of a Device status (pure).
pub fn campaign_record(
    campaign: &str,
    run: &RunIds,
    phase: DevicePhase,
    attempts: u32,
    reason: Option<FailureReason>,
    message: Option<String>,
) -> DeviceCampaignStatus {
    DeviceCampaignStatus {
        name: campaign.to_owned(),
        uid: run.uid.clone(),
        target_version: run.target_version.clone(),
        phase,
        attempts,
        reason: reason.map(|r| r.as_str().to_owned()),
        message: message.map(|m| crate::status::bounded(&m, 512)),
        receipt: None,
        receipt_certificate_fingerprint: None,
        release_key_id: None,
    }
}

/// Longest receipt kept on a Device (base64 characters; the CRD's bound). Receipts are about 1 KiB.
pub const MAX_RECEIPT_TEXT: usize = 12288;

/// A signed receipt as the Device status keeps it: base64, and the certificate whose key signed it
/// (pure). A receipt over the bound is not kept (it would make the whole write fail).
pub fn kept_receipt(
    record: DeviceCampaignStatus,
    receipt: &[u8],
    signer_fingerprint: Option<[u8; 32]>,
    release_key: Option<[u8; 32]>,
) -> DeviceCampaignStatus {
    let text = base64::engine::general_purpose::STANDARD.encode(receipt);
    DeviceCampaignStatus {
        receipt: (text.len() <= MAX_RECEIPT_TEXT).then_some(text),
        receipt_certificate_fingerprint: signer_fingerprint.map(hex::encode),
        release_key_id: release_key.map(hex::encode),
        ..record
    }
}

/// The identifiers of a run that every Device record repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunIds {
    /// UID of the campaign.
    pub uid: String,
    /// Its target version.
    pub target_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials;
    use sealed_ota_protocol::IssuedCertificate;

    fn record(phase: DevicePhase) -> DeviceCampaignStatus {
        DeviceCampaignStatus {
            name: "c".into(),
            uid: "u".into(),
            target_version: "2.0.0".into(),
            phase,
            attempts: 1,
            reason: None,
            message: None,
            receipt: None,
            receipt_certificate_fingerprint: None,
            release_key_id: None,
        }
    }

    #[test]
    fn device_status_keeps_owned_fields_and_prefers_new_facts() {
        let base = DeviceStatus {
            running_version: Some("1.0.0".into()),
            last_seen: Some(k8s_time(10)),
            certificate_fingerprint: Some("aa".into()),
            certificate_not_after: Some(k8s_time(99)),
            rotated_certificate_fingerprint: None,
            pending_certificates: vec![],
            retired_certificate_fingerprints: vec![],
            campaign: None,
            conditions: vec![],
        };
        // Timeout without a handshake: nothing new was seen; keep what we had.
        let s = device_status(Some(&base), None, None, record(DevicePhase::Failed), 500);
        assert_eq!(s.running_version.as_deref(), Some("1.0.0"));
        assert_eq!(s.last_seen, Some(k8s_time(10)));
        assert_eq!(s.certificate_fingerprint.as_deref(), Some("aa"));
        assert_eq!(s.campaign.unwrap().phase, DevicePhase::Failed);

        let hs = Handshake {
            fingerprint: [1; 32],
            not_after: 1000,
            running_version: "1.0.0".into(),
        };
        let s = device_status(
            Some(&base),
            Some(&hs),
            Some("2.0.0"),
            record(DevicePhase::Succeeded),
            600,
        );
        assert_eq!(s.running_version.as_deref(), Some("2.0.0"));
        assert_eq!(s.last_seen, Some(k8s_time(600)));
        assert_eq!(s.certificate_fingerprint, Some(hex::encode([1u8; 32])));
        assert_eq!(s.certificate_not_after, Some(k8s_time(1000)));
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(ready.last_transition_time, k8s_time(600));
        // Same status again: the transition time stays.
        let again = device_status(
            Some(&s),
            Some(&hs),
            Some("2.0.0"),
            record(DevicePhase::Succeeded),
            900,
        );
        assert_eq!(again.conditions[0].last_transition_time, k8s_time(600));
        let failed = device_status(Some(&s), None, None, record(DevicePhase::Failed), 950);
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[0].reason, "UpdateFailed");
    }

    #[test]
    fn credential_fields_survive_every_later_write() {
        // Server-side apply drops an owned field a later apply leaves out: the credential lists
        // must be carried by every write built from the last status.
        let issued = IssuedCertificate {
            fingerprint: [2; 32],
            not_after: 5000,
        };
        let first = device_status(None, None, None, record(DevicePhase::Transferring), 600);
        let with_pending = credentials::record_issued(first, &issued, "rot");
        let later = device_status(
            Some(&with_pending),
            None,
            None,
            record(DevicePhase::Failed),
            700,
        );
        assert_eq!(
            later.pending_certificates,
            with_pending.pending_certificates
        );
        let settled = credentials::settle(later, None, [2; 32], 5000);
        let after = device_status(
            Some(&settled),
            None,
            None,
            record(DevicePhase::Pending),
            800,
        );
        assert_eq!(
            after.rotated_certificate_fingerprint,
            Some(hex::encode([2u8; 32]))
        );
        assert_eq!(
            after.retired_certificate_fingerprints,
            settled.retired_certificate_fingerprints
        );
    }

    #[test]
    fn receipts_are_kept_in_base64_with_their_signer_and_bounded() {
        let r = kept_receipt(
            record(DevicePhase::Succeeded),
            b"signed",
            Some([3; 32]),
            Some([4; 32]),
        );
        assert_eq!(r.receipt.as_deref(), Some("c2lnbmVk"));
        assert_eq!(
            r.receipt_certificate_fingerprint,
            Some(hex::encode([3u8; 32]))
        );
        assert_eq!(r.release_key_id, Some(hex::encode([4u8; 32])));
        let huge = kept_receipt(record(DevicePhase::Succeeded), &[0; 10_000], None, None);
        assert_eq!(huge.receipt, None, "over the CRD bound: not kept");
    }
}
