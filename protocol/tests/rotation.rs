//! Credential rotation end to end, both modes: DeliverKey (the paper's flow, the PKCS#8 key travels
//! encrypted under the session key) and Csr (only the certificate travels).

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

fn rotation(pki: &Pki, mode: RotationMode) -> Arc<PreparedCampaign> {
    Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "rot1".into(),
            target_version: "1.0.0".into(),
            payload: CampaignPayload::RotateCredentials {
                mode,
                ca: pki.ca.clone(),
                validity_days: 90,
            },
            expires_at: NOW + 3600,
            chunk_size: 1024,
            release: None,
        })
        .unwrap(),
    )
}

fn run_rotation(mode: RotationMode) -> World {
    let pki = Pki::new();
    let c = rotation(&pki, mode);
    assert_eq!(c.chunk_count(), 0);
    let mut w = World::new(pki, c);
    w.add_device("s1", "1.0.0", 4);
    w.add_device("s2", "1.0.0", 4);
    w.start(target("s1"));
    w.start(target("s2"));
    w.run();
    w
}

fn private_scalar(id: &Identity) -> Vec<u8> {
    use p256::pkcs8::DecodePrivateKey;
    p256::SecretKey::from_pkcs8_der(&id.key_pkcs8_der())
        .unwrap()
        .to_bytes()
        .to_vec()
}

fn check_delivered(w: &World, name: &str) -> Identity {
    let d = &w.devices[name];
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let (cert, key) = d.credentials.clone().expect("credentials delivered");
    let id = Identity::from_pem(&cert, &key).unwrap();
    assert_eq!(id.name(), name);
    assert_eq!(id.role(), Role::Device);
    w.pki
        .trust
        .verify(id.cert_der(), Role::Device, name, NOW)
        .unwrap();
    assert_eq!(w.manager_state(name), &ManagerState::Installed);
    assert!(d
        .session
        .state()
        .completed_campaigns
        .contains(&"rot1".to_string()));
    id
}

#[test]
fn deliver_key_mode_end_to_end() {
    let w = run_rotation(RotationMode::DeliverKey);
    let a = check_delivered(&w, "s1");
    let b = check_delivered(&w, "s2");
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_eq!(w.installed_events(), 2);
    // The private key never appears in clear on the wire.
    let needle = &private_scalar(&a)[..];
    for (_, o) in &w.broker.published {
        assert!(!o.payload.windows(needle.len()).any(|win| win == needle));
    }
}

#[test]
fn csr_mode_end_to_end() {
    let w = run_rotation(RotationMode::Csr);
    let a = check_delivered(&w, "s1");
    check_delivered(&w, "s2");
    // The ready message carried a CSR and the update carried no key.
    let ready = w
        .broker
        .published
        .iter()
        .find(|(f, o)| f == "s1" && sans_bucket(&o.topic).ends_with("/ready"))
        .unwrap();
    let (_, body) = wire::decode_ready(&ready.1.payload).unwrap();
    assert!(body.csr.is_some());
    // The key was generated on the device: it is nowhere on the wire.
    let needle = &private_scalar(&a)[..];
    for (_, o) in &w.broker.published {
        assert!(!o.payload.windows(needle.len()).any(|win| win == needle));
    }
}

#[test]
fn rotated_identity_is_usable_for_the_next_campaign() {
    let w = run_rotation(RotationMode::Csr);
    let id = Arc::new(check_delivered(&w, "s1"));
    let pki = w.pki;
    let mut w2 = World::new(pki, campaign(firmware(700), 256));
    w2.publish_chunks();
    let (s, a) = w2.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 2);
    w2.add_device_session("s1", s, a);
    w2.start(DeviceTarget {
        pinned_fingerprint: Some(id.fingerprint()),
        ..target("s1")
    });
    w2.run();
    assert!(w2.devices["s1"].installed);
}

/// The pin still names the certificate from before the rotation: refused, unless the manager also
/// accepts the certificate it issued in the rotation.
#[test]
fn old_pin_plus_the_issued_certificate_accepts_the_rotated_device() {
    let w = run_rotation(RotationMode::DeliverKey);
    let issued = w.manager.sessions["s1"].issued_certificate().unwrap();
    let id = Arc::new(check_delivered(&w, "s1"));
    let old_pin = w
        .pki
        .ca
        .issue(Role::Device, "s1", NOW, 30)
        .unwrap()
        .fingerprint();
    let pki = w.pki;
    for accept_issued in [false, true] {
        let pki = Pki {
            ca: pki.ca.clone(),
            trust: pki.trust.clone(),
            topics: pki.topics.clone(),
            manager: pki.manager.clone(),
        };
        let mut w2 = World::new(pki, campaign(firmware(700), 256));
        w2.publish_chunks();
        let (s, a) = w2.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 2);
        w2.add_device_session("s1", s, a);
        w2.start(DeviceTarget {
            pinned_fingerprint: Some(old_pin),
            ..target("s1")
        });
        if accept_issued {
            w2.manager
                .sessions
                .get_mut("s1")
                .unwrap()
                .also_accept_fingerprint(issued.fingerprint);
        }
        w2.run();
        if accept_issued {
            assert!(w2.devices["s1"].installed);
        } else {
            assert!(!w2.devices["s1"].installed);
            assert!(matches!(
                w2.manager.errors.as_slice(),
                [(_, ProtocolError::Identity(IdentityError::PinMismatch))]
            ));
        }
    }
}

#[test]
fn csr_mode_without_csr_is_rejected_by_manager() {
    let pki = Pki::new();
    let c = rotation(&pki, RotationMode::Csr);
    let mut w = World::new(pki, c);
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    // The broker cannot strip the CSR without breaking the device signature.
    w.hook = Some(Box::new(|client, msg| {
        if client == "manager" && sans_bucket(&msg.topic).ends_with("/ready") {
            let (mut env, mut body) = wire::decode_ready(&msg.payload).unwrap();
            body.csr = None;
            env.body = wire::encode_msg(&body);
            msg.payload = env.encode();
        }
        Verdict::Deliver
    }));
    w.run();
    assert!(matches!(
        w.manager.errors.as_slice(),
        [(_, ProtocolError::BadSignature { message: "ready" })]
    ));
    assert!(w.devices["s1"].credentials.is_none());
}

#[test]
fn credentials_for_another_device_are_refused() {
    // A manager bug (or compromised CA use) issues s2's certificate into s1's session: the device
    // checks the name before reporting Installed.
    let pki = Pki::new();
    let c = rotation(&pki, RotationMode::DeliverKey);
    let other_ca = Arc::new(CertificateAuthority::generate("other", NOW, 30).unwrap());
    // A rotation campaign whose CA is not the one devices trust.
    let bad = Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "rot1".into(),
            target_version: "1.0.0".into(),
            payload: CampaignPayload::RotateCredentials {
                mode: RotationMode::DeliverKey,
                ca: other_ca,
                validity_days: 90,
            },
            expires_at: NOW + 3600,
            chunk_size: 1024,
            release: None,
        })
        .unwrap(),
    );
    drop(c);
    let mut w = World::new(pki, bad);
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    let d = &w.devices["s1"];
    assert!(d.credentials.is_none());
    assert!(matches!(
        d.events.as_slice(),
        [DeviceEvent::Rejected {
            reason: RejectReason::BadCredentials(_)
        }]
    ));
    assert!(matches!(
        w.manager_state("s1"),
        ManagerState::Rejected(RejectReason::BadCredentials(_))
    ));
}

/// A rotation the device completed, then a new session of the same campaign (the manager restarted
/// before the receipt reached it): the device rotates again (fresh certificate, fresh receipt bound
/// to the new session), and the manager reports the certificate it issued.
#[test]
fn new_session_of_a_completed_rotation_rotates_again() {
    for mode in [RotationMode::DeliverKey, RotationMode::Csr] {
        let mut w = run_rotation(mode);
        let first = check_delivered(&w, "s1");
        let issued = w.manager.sessions["s1"].issued_certificate().unwrap();
        assert_eq!(issued.fingerprint, first.fingerprint());
        assert_eq!(issued.not_after, first.not_after());
        // The device now uses the new credentials.
        w.devices
            .get_mut("s1")
            .unwrap()
            .session
            .set_identity(Arc::new(first));
        w.now += 10;
        w.start(target("s1"));
        w.run();
        let second = check_delivered(&w, "s1");
        assert_ne!(second.fingerprint(), issued.fingerprint, "{mode:?}");
        assert_eq!(
            w.manager.sessions["s1"]
                .issued_certificate()
                .unwrap()
                .fingerprint,
            second.fingerprint()
        );
        assert_eq!(w.installed_events(), 3, "{mode:?}");
    }
}

/// After a rotation whose receipt arrived, the old certificate is retired: a thief who copied the
/// old key cannot answer the next rotation (and receive the next key), while the device with its
/// new certificate can.
#[test]
fn a_retired_certificate_cannot_answer_the_next_rotation() {
    let mut w = run_rotation(RotationMode::DeliverKey);
    let new = Arc::new(check_delivered(&w, "s1"));
    let issued = w.manager.sessions["s1"].issued_certificate().unwrap();
    assert_eq!(issued.fingerprint, new.fingerprint());
    // The thief kept the key the device had before (its ready carried the old certificate).
    let (_, r) = wire::decode_ready(&w.last_from("s1", "/ready").payload).unwrap();
    let old_fingerprint = sha256(&r.device_cert);
    assert_ne!(old_fingerprint, new.fingerprint());
    // The next rotation, with the old certificate retired: a thief's ready is refused.
    w.now += 60;
    start_refusing(&mut w, old_fingerprint);
    w.run(); // the device still runs the old identity in this harness: it is the "thief"
    assert!(
        w.manager
            .errors
            .iter()
            .any(|(_, e)| matches!(e, ProtocolError::Identity(IdentityError::Retired))),
        "{:?}",
        w.manager.errors
    );
    assert_eq!(
        w.manager_state("s1"),
        &ManagerState::NotifySent,
        "no key sent"
    );
    // The device itself, on its new certificate, is answered.
    w.devices
        .get_mut("s1")
        .unwrap()
        .session
        .set_identity(new.clone());
    w.now += 60;
    start_refusing(&mut w, old_fingerprint);
    w.run();
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
}

/// A new session for s1 that refuses the certificate `retired`.
fn start_refusing(w: &mut World, retired: [u8; 32]) {
    w.start(target("s1"));
    w.manager
        .sessions
        .get_mut("s1")
        .unwrap()
        .refuse_fingerprint(retired);
}
