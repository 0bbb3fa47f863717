//! ManagerSession and DeviceSession driven against each other through an in-memory broker.

mod common;

use common::*;
use sealed_ota_protocol::*;

#[test]
fn firmware_happy_path_many_devices() {
    let image = firmware(10_000);
    let c = campaign(image.clone(), 512);
    assert_eq!(c.chunk_count(), 20);
    let mut w = World::new(Pki::new(), c);
    w.publish_chunks();
    for i in 0..5 {
        let name = format!("s{i}");
        w.add_device(&name, "1.0.0", 4);
        w.start(target(&name));
    }
    w.run();
    assert!(w.manager.errors.is_empty(), "{:?}", w.manager.errors);
    for (name, d) in &w.devices {
        assert!(d.errors.is_empty(), "{name}: {:?}", d.errors);
        assert!(d.installed, "{name}");
        assert_eq!(d.image, image);
        assert_eq!(d.session.state().running_version, "2.0.0");
        assert!(d.session.state().transfer.is_none());
        assert_eq!(
            d.session.state().completed_campaigns,
            vec!["c1".to_string()]
        );
        assert_eq!(w.manager_state(name), &ManagerState::Installed);
    }
    assert_eq!(w.installed_events(), 5);
    // Every device saw each chunk exactly once as an event.
    for d in w.devices.values() {
        let n = d
            .events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Chunk { .. }))
            .count();
        assert_eq!(n, 20);
    }
    // Egress: chunks once + per-device small messages.
    let manager_bytes: usize = w
        .broker
        .published
        .iter()
        .filter(|(f, _)| f == "manager")
        .map(|(_, o)| o.payload.len())
        .sum();
    let chunk_bytes = w.manager.campaign.chunk_bytes() as usize;
    let per_device = (manager_bytes - chunk_bytes) / 5;
    assert!(per_device < 4096, "per-device bytes {per_device}");
    assert!(chunk_bytes < image.len() + 20 * (16 + 5 * 33 + 40));
}

/// The receipt is the device's signed plaintext claim (outcome, version, image hash) bound to the
/// session: a person can verify it later with the device certificate alone, and it says exactly
/// what was installed.
#[test]
fn receipt_is_kept_and_signed() {
    let image = firmware(100);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 64));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 8);
    w.start(target("s1"));
    w.run();
    let receipt = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::Installed {
                receipt, version, ..
            } => {
                assert_eq!(version, "2.0.0");
                Some(receipt.clone())
            }
            _ => None,
        })
        .expect("installed");
    let cert = cert_der_of(&w, "s1");
    w.pki.trust.verify(&cert, Role::Device, "s1", NOW).unwrap();
    let body = verify_receipt(&receipt, &cert).unwrap();
    assert_eq!(
        body.claim,
        Claim::Installed {
            version: "2.0.0".into(),
            sha256: sha256(&image),
            release_key: None,
        }
    );
    assert_eq!(
        (body.device_id.as_str(), body.campaign_id.as_str()),
        ("s1", "c1")
    );
    assert_eq!(body.session_id, w.manager.sessions["s1"].session_id());
    // Any other certificate (another device's key) does not verify it.
    let other = w.pki.ca.issue(Role::Device, "s2", NOW, 30).unwrap();
    assert!(matches!(
        verify_receipt(&receipt, other.cert_der()),
        Err(ProtocolError::BadSignature { .. })
    ));
    // A changed claim does not verify.
    let (mut env, mut b) = wire::decode_receipt(&receipt).unwrap();
    b.claim = Claim::Installed {
        version: "2.0.1".into(),
        sha256: sha256(&image),
        release_key: None,
    };
    env.body = wire::encode_msg(&b);
    assert!(verify_receipt(&env.encode(), &cert).is_err());
}

fn cert_der_of(w: &World, device: &str) -> Vec<u8> {
    // The ready message carries the device certificate.
    let ready = w
        .broker
        .published
        .iter()
        .find(|(from, o)| from == device && sans_bucket(&o.topic).ends_with("/ready"))
        .unwrap();
    let (_, body) = wire::decode_ready(&ready.1.payload).unwrap();
    body.device_cert
}

#[test]
fn handshake_and_update_message_counts() {
    let mut w = World::new(Pki::new(), campaign(firmware(1000), 1000));
    w.publish_chunks();
    let before = *w.broker.packets.get("manager").unwrap_or(&0);
    w.add_device("s1", "1.0.0", 8);
    w.start(target("s1"));
    w.run();
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
    // Device: SUBSCRIBE(notify+update), PUBLISH ready, PUBLISH accepted, SUBSCRIBE window,
    // UNSUBSCRIBE window, PUBLISH installed.
    assert_eq!(w.broker.packets["s1"], 6);
    // Manager per device: PUBLISH notify, PUBLISH update (chunks are published once for the whole
    // campaign by `publish_chunks`, which bypasses the counter; subscriptions are shared).
    assert_eq!(w.broker.packets["manager"] - before, 2);
}

#[test]
fn egress_is_image_plus_n_small_wraps() {
    // DESIGN budget: bytes the manager publishes <= 1.05 x (image + N x wrap).
    let image = firmware(256 * 1024);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 32 * 1024));
    w.publish_chunks();
    let n = 8;
    for i in 0..n {
        let name = format!("d{i}");
        w.add_device(&name, "1.0.0", 4);
        w.start(target(&name));
    }
    w.run();
    assert_eq!(w.installed_events(), n);
    let sent: usize = w
        .broker
        .published
        .iter()
        .filter(|(f, _)| f == "manager")
        .map(|(_, o)| o.payload.len())
        .sum();
    let chunks = w.manager.campaign.chunk_bytes() as usize;
    let wraps = sent - chunks; // notify + update per device
    let wrap = wraps / n;
    assert!(wrap < 2048, "wrap {wrap} bytes");
    let budget = 1.05 * (image.len() + wraps) as f64;
    assert!((sent as f64) <= budget, "{sent} > {budget}");
    // The paper's per-device encryption would publish N x image.
    assert!(sent < 2 * image.len());
}
