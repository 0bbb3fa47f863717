//! A release key the operator cannot forge: a device enrolled with trusted release keys installs
//! only firmware whose release signature (made offline over version, size and SHA-256) verifies,
//! even when the manager's own signature on the manifest is perfect. Devices without release keys
//! (a fleet that does not use them) are unaffected.

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

fn signed_campaign(image: &[u8], release: Option<ReleaseSignature>) -> Arc<PreparedCampaign> {
    Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware {
                image: image.to_vec(),
            },
            expires_at: NOW + 3600,
            chunk_size: 512,
            release,
        })
        .unwrap(),
    )
}

/// A world with one device `s1` that trusts `trusted`; returns its key log.
fn world(campaign: Arc<PreparedCampaign>, trusted: Vec<ReleaseKey>) -> (World, Arc<Secrets>) {
    let mut w = World::new(Pki::new(), campaign);
    w.publish_chunks();
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let mut config = w.pki.device_config(id, 4);
    config.release_keys = trusted;
    let (mut s, a) = DeviceSession::new(config, DeviceState::new("1.0.0"));
    let secrets = Arc::new(Secrets::default());
    s.set_key_log(secrets.clone());
    w.add_device_session("s1", s, a);
    (w, secrets)
}

fn refused_for_release(w: &World) -> bool {
    matches!(
        w.manager_state("s1"),
        ManagerState::Rejected(RejectReason::ReleaseSignature(_))
    ) && !w.devices["s1"].installed
        && !w.devices["s1"]
            .events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Chunk { .. }))
}

#[test]
fn firmware_signed_by_a_trusted_release_key_installs_and_the_receipt_names_the_key() {
    let image = firmware(3000);
    let release = ReleaseSigner::generate();
    let sig = release.sign("2.0.0", image.len() as u64, &sha256(&image));
    let (mut w, _) = world(
        signed_campaign(&image, Some(sig)),
        vec![ReleaseSigner::generate().public(), release.public()],
    );
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
    let key = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::Installed { release_key, .. } => Some(*release_key),
            _ => None,
        })
        .expect("installed");
    assert_eq!(key, Some(release.public().id()));
}

#[test]
fn firmware_without_a_release_signature_or_by_an_untrusted_key_is_refused() {
    let image = firmware(3000);
    let trusted = ReleaseSigner::generate();
    let untrusted = ReleaseSigner::generate();
    for sig in [
        None,
        Some(untrusted.sign("2.0.0", image.len() as u64, &sha256(&image))),
    ] {
        let (mut w, _) = world(signed_campaign(&image, sig), vec![trusted.public()]);
        w.start(target("s1"));
        w.run();
        assert!(refused_for_release(&w), "{:?}", w.manager_state("s1"));
    }
}

/// Whoever holds the manager's key (a compromised operator namespace) signs a perfect manifest for
/// its own image and attaches a genuine release signature of another image: refused.
#[test]
fn a_manager_cannot_reuse_a_release_signature_for_another_image() {
    let genuine = firmware(3000);
    let evil: Vec<u8> = genuine.iter().map(|b| b ^ 0x5a).collect();
    let release = ReleaseSigner::generate();
    let genuine_sig = release.sign("2.0.0", genuine.len() as u64, &sha256(&genuine));
    // The honest preparation refuses the mismatch outright.
    let err = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "c1".into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware {
            image: evil.clone(),
        },
        expires_at: NOW + 3600,
        chunk_size: 512,
        release: Some(genuine_sig.clone()),
    })
    .unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidCampaign(_)), "{err}");
    // A malicious manager builds the update itself: its image, its signed manifest, the
    // genuine release signature.
    let (mut w, secrets) = world(signed_campaign(&evil, None), vec![release.public()]);
    w.hook = Some(Box::new(|client, msg| {
        if client == "s1" && msg.topic.ends_with("/update") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.start(target("s1"));
    w.run();
    let update = w.last_from("manager", "/s1/update");
    let m2d: [u8; 32] = secrets.get("session-m2d")[0].clone().try_into().unwrap();
    let th = w.transcript_of("s1");
    let msg = wire::decode_update(&update.payload).unwrap();
    let aad = crypto::session_aad(b"sealed-ota/v2/update", &th, &[]);
    let plain = crypto::open(&m2d, &msg.nonce, &aad, &msg.ct).unwrap();
    let decoded = wire::decode_update_body(&plain).unwrap();
    let wire::UpdateBody::Firmware {
        manifest,
        content_key,
    } = &decoded
    else {
        panic!()
    };
    let (_, mut mf) = wire::decode_manifest(manifest).unwrap();
    mf.release = Some(genuine_sig);
    let forged_manifest = sign_as(&w.pki.manager, wire::TYPE_MANIFEST, &mf);
    let body = wire::UpdateBody::Firmware {
        manifest: forged_manifest,
        content_key: *content_key,
    };
    let (nonce, ct) = crypto::seal(&m2d, &aad, &wire::encode_update_body(&body));
    let forged = Inbound {
        topic: update.topic.clone(),
        payload: wire::encode_msg(&wire::UpdateMsg {
            v: WIRE_VERSION,
            session_id: msg.session_id,
            nonce,
            ct,
        }),
        properties: Properties::default(),
    };
    w.hook = None;
    w.broker.queue.push_back(("s1".into(), forged));
    w.run();
    assert!(refused_for_release(&w), "{:?}", w.manager_state("s1"));
    // Without release keys the same device would have taken it: the manager's signature is fine.
    let (mut w2, _) = world(signed_campaign(&evil, None), vec![]);
    w2.start(target("s1"));
    w2.run();
    assert!(
        w2.devices["s1"].installed,
        "a fleet without release keys is unaffected"
    );
}

#[test]
fn a_rotation_never_carries_a_release_signature() {
    let pki = Pki::new();
    let sig = ReleaseSigner::generate().sign("1.0.0", 1, &[0; 32]);
    let err = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "rot".into(),
        target_version: "1.0.0".into(),
        payload: CampaignPayload::RotateCredentials {
            mode: RotationMode::Csr,
            ca: pki.ca.clone(),
            validity_days: 1,
        },
        expires_at: NOW + 10,
        chunk_size: 1024,
        release: Some(sig),
    })
    .unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidCampaign(_)));
}
