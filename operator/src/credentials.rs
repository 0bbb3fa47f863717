//! Device credentials across rotations (pure): which certificates a device may present, and how a
//! rotation moves them on the Device status. The certificate a rotation issues is recorded as
//! *pending* before it is sent and accepted from then on, so a receipt the broker drops never locks
//! the device out; when a credential proves itself (the device presents a pending certificate, or
//! signs the rotation's receipt) the rotation *settles*: that certificate becomes the device's, and
//! every certificate it held before is *retired* and refused from then on, pin or no pin, so a thief
//! of an old key cannot answer the next rotation. When the device presents its previous certificate
//! instead, the pending ones were never installed and are retired. No I/O here.

use sealed_ota_protocol::IssuedCertificate;

use crate::crd::{DeviceStatus, PendingCertificate};
use crate::time::k8s_time;

/// Pending certificates kept per device (the oldest beyond it is retired).
pub const MAX_PENDING: usize = 4;
/// Retired fingerprints kept per device (the oldest beyond it is forgotten).
pub const MAX_RETIRED: usize = 16;

/// What a session of this device accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// spec.certificateFingerprint.
    pub pin: Option<[u8; 32]>,
    /// Accepted besides the pin: the rotated certificate and the pending ones.
    pub also_accept: Vec<[u8; 32]>,
    /// Refused even when pinned or CA-valid: retired certificates.
    pub refuse: Vec<[u8; 32]>,
}

/// Parse a hex fingerprint (anything else is ignored: the CRD validates the pin).
pub fn fingerprint(hex_text: &str) -> Option<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
}

/// The policy of a device from its pin and status.
pub fn policy(pin: Option<&str>, status: Option<&DeviceStatus>) -> CredentialPolicy {
    let Some(status) = status else {
        return CredentialPolicy {
            pin: pin.and_then(fingerprint),
            ..CredentialPolicy::default()
        };
    };
    CredentialPolicy {
        pin: pin.and_then(fingerprint),
        also_accept: status
            .rotated_certificate_fingerprint
            .iter()
            .map(String::as_str)
            .chain(
                status
                    .pending_certificates
                    .iter()
                    .map(|p| p.fingerprint.as_str()),
            )
            .filter_map(fingerprint)
            .collect(),
        refuse: status
            .retired_certificate_fingerprints
            .iter()
            .filter_map(|f| fingerprint(f))
            .collect(),
    }
}

fn retire(status: &mut DeviceStatus, fp: String) {
    status.retired_certificate_fingerprints.retain(|f| f != &fp);
    status.retired_certificate_fingerprints.push(fp);
    let excess = status
        .retired_certificate_fingerprints
        .len()
        .saturating_sub(MAX_RETIRED);
    status.retired_certificate_fingerprints.drain(..excess);
}

/// Record a certificate a rotation issued, before it is sent (idempotent).
pub fn record_issued(
    mut status: DeviceStatus,
    issued: &IssuedCertificate,
    campaign: &str,
) -> DeviceStatus {
    let fp = hex::encode(issued.fingerprint);
    if status
        .pending_certificates
        .iter()
        .any(|p| p.fingerprint == fp)
    {
        return status;
    }
    status.pending_certificates.push(PendingCertificate {
        fingerprint: fp,
        not_after: k8s_time(issued.not_after),
        campaign: campaign.to_owned(),
    });
    while status.pending_certificates.len() > MAX_PENDING {
        let oldest = status.pending_certificates.remove(0);
        retire(&mut status, oldest.fingerprint);
    }
    status
}

/// The rotation settled on `current` (valid until `not_after`): it becomes the device's certificate
/// and everything the device may have held before is retired (its previous certificate, the pin,
/// an earlier rotated certificate, the other pending ones).
pub fn settle(
    mut status: DeviceStatus,
    pin: Option<&str>,
    current: [u8; 32],
    not_after: u64,
) -> DeviceStatus {
    let current = hex::encode(current);
    let before: Vec<String> = status
        .certificate_fingerprint
        .iter()
        .chain(status.rotated_certificate_fingerprint.iter())
        .cloned()
        .chain(pin.map(str::to_owned))
        .chain(status.pending_certificates.drain(..).map(|p| p.fingerprint))
        .filter(|f| f != &current)
        .collect();
    for fp in before {
        retire(&mut status, fp);
    }
    status
        .retired_certificate_fingerprints
        .retain(|f| f != &current);
    status.certificate_fingerprint = Some(current.clone());
    status.certificate_not_after = Some(k8s_time(not_after));
    status.rotated_certificate_fingerprint = Some(current);
    status
}

/// A handshake proved the device holds the certificate `presented`: a pending one settles the
/// rotation that issued it; otherwise the device still holds its previous credential, so the
/// pending certificates were never installed and are retired.
pub fn on_proof(status: DeviceStatus, pin: Option<&str>, presented: [u8; 32]) -> DeviceStatus {
    let hex_presented = hex::encode(presented);
    let pending = status
        .pending_certificates
        .iter()
        .find(|p| p.fingerprint == hex_presented)
        .cloned();
    match pending {
        Some(p) => {
            let not_after = u64::try_from(p.not_after.0.as_second()).unwrap_or(0);
            settle(status, pin, presented, not_after)
        }
        None => {
            let mut status = status;
            let stale: Vec<String> = status
                .pending_certificates
                .drain(..)
                .map(|p| p.fingerprint)
                .collect();
            for fp in stale {
                retire(&mut status, fp);
            }
            status
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: [u8; 32] = [1; 32];

    fn hexed(b: u8) -> String {
        hex::encode([b; 32])
    }

    fn issued(b: u8) -> IssuedCertificate {
        IssuedCertificate {
            fingerprint: [b; 32],
            not_after: 5000 + u64::from(b),
        }
    }

    fn enrolled() -> DeviceStatus {
        DeviceStatus {
            certificate_fingerprint: Some(hexed(1)),
            ..DeviceStatus::default()
        }
    }

    /// The receipt is dropped: the issued certificate was recorded before it was sent, so the
    /// device presenting it next time is accepted (pinned), and that settles the rotation.
    #[test]
    fn a_pending_certificate_is_accepted_and_settles_when_presented() {
        let pin = hexed(1);
        let s = record_issued(enrolled(), &issued(2), "rot");
        let p = policy(Some(&pin), Some(&s));
        assert_eq!(p.pin, Some(PIN));
        assert!(p.also_accept.contains(&[2; 32]));
        assert!(p.refuse.is_empty());
        let s = on_proof(s, Some(&pin), [2; 32]);
        assert_eq!(s.rotated_certificate_fingerprint, Some(hexed(2)));
        assert_eq!(s.certificate_fingerprint, Some(hexed(2)));
        assert_eq!(s.certificate_not_after, Some(k8s_time(5002)));
        assert!(s.pending_certificates.is_empty());
        let p = policy(Some(&pin), Some(&s));
        assert_eq!(
            p.refuse,
            vec![PIN],
            "the old certificate (the pin) is retired"
        );
        assert_eq!(p.also_accept, vec![[2; 32]]);
    }

    #[test]
    fn a_rotation_receipt_settles_and_retires_everything_before() {
        let s = record_issued(enrolled(), &issued(2), "rot-1");
        let s = record_issued(s, &issued(3), "rot-1"); // a re-keyed session issued again
        let s = settle(s, None, [3; 32], 5003);
        let p = policy(None, Some(&s));
        assert_eq!(p.also_accept, vec![[3; 32]]);
        let mut refused = p.refuse.clone();
        refused.sort();
        assert_eq!(
            refused,
            vec![[1; 32], [2; 32]],
            "previous and unused pending"
        );
        // The next rotation settles on 4: 3 is retired too.
        let s = settle(record_issued(s, &issued(4), "rot-2"), None, [4; 32], 5004);
        assert!(policy(None, Some(&s)).refuse.contains(&[3; 32]));
        assert!(!policy(None, Some(&s)).refuse.contains(&[4; 32]));
    }

    #[test]
    fn the_old_certificate_proving_itself_retires_the_pending_ones() {
        let s = record_issued(enrolled(), &issued(2), "rot");
        let s = on_proof(s, Some(&hexed(1)), PIN);
        assert!(s.pending_certificates.is_empty());
        assert_eq!(s.retired_certificate_fingerprints, vec![hexed(2)]);
        assert_eq!(s.rotated_certificate_fingerprint, None);
        // Without anything pending, a proof changes nothing.
        assert_eq!(on_proof(enrolled(), None, PIN), enrolled());
    }

    #[test]
    fn lists_stay_bounded_and_recording_is_idempotent() {
        let mut s = enrolled();
        for b in 2..10 {
            s = record_issued(s, &issued(b), "rot");
            s = record_issued(s, &issued(b), "rot");
        }
        assert_eq!(s.pending_certificates.len(), MAX_PENDING);
        assert_eq!(
            s.retired_certificate_fingerprints.len(),
            4,
            "evicted pending retired"
        );
        let mut s = enrolled();
        for b in 2..40 {
            s = settle(record_issued(s, &issued(b), "rot"), None, [b; 32], 1);
        }
        assert_eq!(s.retired_certificate_fingerprints.len(), MAX_RETIRED);
        assert!(!s.retired_certificate_fingerprints.contains(&hexed(39)));
    }
}
