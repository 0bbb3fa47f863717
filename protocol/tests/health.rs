//! Post-install health reports: after a committed install the device signs the result of its
//! health check, bound to the session that installed the image; the manager's verifier (which
//! outlives the session) accepts exactly that device's report of exactly that install, and
//! nothing a broker or another device can make.

mod common;

use common::*;
use sealed_ota_protocol::*;

fn installed() -> (World, Vec<u8>, std::sync::Arc<Identity>) {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 512));
    w.publish_chunks();
    let id = w.add_device_id("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    assert_eq!(w.installed_events(), 1);
    (w, image, id)
}

fn payload(a: Action) -> Outbound {
    match a {
        Action::Publish(o) => o,
        other => panic!("not a publish: {other:?}"),
    }
}

#[test]
fn a_device_reports_its_health_and_the_manager_verifies_it_after_the_session() {
    let (w, image, _) = installed();
    let verifier = w.manager.sessions["s1"]
        .health_verifier()
        .expect("an installed firmware session checks health reports");
    let device = &w.devices["s1"].session;
    let healthy = payload(
        device
            .health_report(true, "service up", w.now + 60)
            .unwrap(),
    );
    assert_eq!(healthy.topic, "iot/p1/s1/update/status/232");
    assert!(!healthy.retain);
    let report = verifier.verify(&healthy.payload).unwrap();
    assert_eq!(
        report,
        HealthReport {
            healthy: true,
            detail: "service up".into(),
            reported_at: w.now + 60
        }
    );
    let sick = payload(
        device
            .health_report(false, "watchdog\nreset", w.now + 90)
            .unwrap(),
    );
    let report = verifier.verify(&sick.payload).unwrap();
    assert!(!report.healthy);
    assert!(!report.detail.contains('\n'), "device text is cleaned");
    // The report names what was installed.
    let (_, body) = wire::decode_health(&sick.payload).unwrap();
    assert_eq!(
        (body.version.as_str(), body.sha256),
        ("2.0.0", sha256(&image))
    );
}

#[test]
fn a_forged_or_misbound_report_is_refused() {
    let (w, image, device_id) = installed();
    let verifier = w.manager.sessions["s1"].health_verifier().unwrap();
    let sid = w.manager.sessions["s1"].session_id();
    let body = |session_id, device: &str, campaign: &str, version: &str, sha| HealthBody {
        v: WIRE_VERSION,
        session_id,
        manager_id: "p1".into(),
        device_id: device.into(),
        campaign_id: campaign.into(),
        version: version.into(),
        sha256: sha,
        healthy: true,
        detail: String::new(),
        reported_at: w.now,
    };
    let good = sha256(&image);
    // Signed by another device of the same CA: the signature is not this device's.
    let other = std::sync::Arc::new(w.pki.ca.issue(Role::Device, "s2", w.now - 10, 10).unwrap());
    let forged = sign_as(
        &other,
        wire::TYPE_HEALTH,
        &body(sid, "s1", "c1", "2.0.0", good),
    );
    assert!(verifier.verify(&forged).is_err(), "another device's key");
    // Signed by the device itself but bound elsewhere: another session, campaign, version or image.
    for (b, what) in [
        (body([9; 16], "s1", "c1", "2.0.0", good), "session"),
        (body(sid, "s1", "c9", "2.0.0", good), "campaign"),
        (body(sid, "s1", "c1", "2.0.1", good), "version"),
        (body(sid, "s1", "c1", "2.0.0", [0; 32]), "image"),
        (body(sid, "s9", "c1", "2.0.0", good), "device"),
    ] {
        let signed = sign_as(&device_id, wire::TYPE_HEALTH, &b);
        assert!(verifier.verify(&signed).is_err(), "{what}");
    }
    // The right binding signed by the device passes (the loop above failed for its reasons).
    let signed = sign_as(
        &device_id,
        wire::TYPE_HEALTH,
        &body(sid, "s1", "c1", "2.0.0", good),
    );
    assert!(verifier.verify(&signed).is_ok());
    // A receipt is not a health report.
    let receipt = w.last_from("s1", "/update/status");
    assert!(wire::decode_receipt(&receipt.payload).is_ok());
    assert!(verifier.verify(&receipt.payload).is_err());
    let mut flipped = signed.clone();
    let n = flipped.len();
    flipped[n - 3] ^= 1;
    assert!(verifier.verify(&flipped).is_err(), "a flipped signature");
}

#[test]
fn no_health_verifier_before_an_install_or_for_a_refusal() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image, 512));
    w.publish_chunks();
    // Already runs a newer version: a signed refusal, nothing installed.
    w.add_device("s1", "3.0.0", 4);
    w.start(target("s1"));
    assert!(w.manager.sessions["s1"].health_verifier().is_none());
    w.run();
    assert!(matches!(w.manager_state("s1"), ManagerState::Rejected(_)));
    assert!(w.manager.sessions["s1"].health_verifier().is_none());
    assert!(w.devices["s1"]
        .session
        .health_report(true, "", w.now)
        .is_none());
}
