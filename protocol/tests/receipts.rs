//! Receipts are evidence: the device signs its plaintext claim (outcome, version, image hash) bound
//! to the session; the manager accepts only a claim of exactly what the session delivered (the
//! campaign's image, or the certificate a rotation issued). The final outcome can be reported after
//! a restart (Installed only after commit, RolledBack after a failed health check) from what the
//! device persisted.

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

/// A firmware campaign where the device's receipts never reach the manager (held for the test).
fn receipts_held(image: &[u8]) -> (World, Arc<Identity>) {
    let mut w = World::new(Pki::new(), campaign(image.to_vec(), 512));
    w.publish_chunks();
    let id = w.add_device_id("s1", "1.0.0", 4);
    w.hook = Some(Box::new(|client, msg| {
        let receipt = sans_bucket(&msg.topic).ends_with("/update/status")
            && wire::decode_receipt(&msg.payload).is_ok();
        if client == "manager" && receipt {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.start(target("s1"));
    w.run();
    (w, id)
}

#[test]
fn an_installed_claim_with_the_wrong_version_or_hash_is_refused() {
    let image = firmware(3000);
    let (mut w, id) = receipts_held(&image);
    assert!(w.devices["s1"].installed);
    let th = w.transcript_of("s1");
    let sid = w.manager.sessions["s1"].session_id();
    let good_sha = sha256(&image);
    for (version, sha) in [
        ("2.0.1", good_sha),
        ("1.0.0", good_sha),
        ("2.0.0", [0u8; 32]),
        ("2.0.0", sha256(b"another image")),
    ] {
        let claim = Claim::Installed {
            version: version.into(),
            sha256: sha,
            release_key: None,
        };
        let forged = receipt_as(&id, "s1", sid, th, "c1", claim);
        let s = w.manager.sessions.get_mut("s1").unwrap();
        assert!(
            matches!(
                s.handle(&forged, w.now),
                Err(ProtocolError::Decode {
                    message: "receipt",
                    ..
                })
            ),
            "{version}"
        );
        assert!(matches!(s.state(), ManagerState::Transferring { .. }));
    }
    // A receipt for another campaign or another device, correctly bound otherwise.
    let ok = Claim::Installed {
        version: "2.0.0".into(),
        sha256: good_sha,
        release_key: None,
    };
    let s = w.manager.sessions.get_mut("s1").unwrap();
    let other_campaign = receipt_as(&id, "s1", sid, th, "c2", ok.clone());
    assert!(matches!(
        s.handle(&other_campaign, w.now),
        Err(ProtocolError::WrongCampaign { .. })
    ));
    let mut other_device = receipt_as(&id, "s2", sid, th, "c1", ok.clone());
    other_device.topic = "iot/p1/s1/update/status/232".into();
    assert!(matches!(
        s.handle(&other_device, w.now),
        Err(ProtocolError::WrongDevice { .. })
    ));
    // The device's genuine receipt counts.
    let genuine = w.last_from("s1", "/update/status");
    let s = w.manager.sessions.get_mut("s1").unwrap();
    let out = s.handle(&genuine, w.now).unwrap();
    assert!(matches!(out.events[0], ManagerEvent::Installed { .. }));
}

#[test]
fn a_rotation_receipt_must_name_the_certificate_issued() {
    let pki = Pki::new();
    let c = Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "rot1".into(),
            target_version: "1.0.0".into(),
            payload: CampaignPayload::RotateCredentials {
                mode: RotationMode::DeliverKey,
                ca: pki.ca.clone(),
                validity_days: 30,
            },
            expires_at: NOW + 3600,
            chunk_size: 1024,
            release: None,
        })
        .unwrap(),
    );
    let mut w = World::new(pki, c);
    let id = w.add_device_id("s1", "1.0.0", 4);
    w.hook = Some(Box::new(|client, msg| {
        if client == "manager" && sans_bucket(&msg.topic).ends_with("/update/status") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].credentials.is_some());
    let issued = w.manager.sessions["s1"].issued_certificate().unwrap();
    let th = w.transcript_of("s1");
    let sid = w.manager.sessions["s1"].session_id();
    // The device (or a thief of its old key) claims it installed some other certificate.
    for sha in [[0u8; 32], sha256(id.cert_der())] {
        let forged = receipt_as(
            &id,
            "s1",
            sid,
            th,
            "rot1",
            Claim::Installed {
                version: "1.0.0".into(),
                sha256: sha,
                release_key: None,
            },
        );
        let s = w.manager.sessions.get_mut("s1").unwrap();
        assert!(matches!(
            s.handle(&forged, w.now),
            Err(ProtocolError::Decode {
                message: "receipt",
                ..
            })
        ));
    }
    // The genuine receipt names the issued certificate.
    let genuine = w.last_from("s1", "/update/status");
    let body = verify_receipt(&genuine.payload, id.cert_der()).unwrap();
    assert!(matches!(body.claim, Claim::Installed { sha256, .. } if sha256 == issued.fingerprint));
    let s = w.manager.sessions.get_mut("s1").unwrap();
    assert!(matches!(
        s.handle(&genuine, w.now).unwrap().events[0],
        ManagerEvent::Installed { .. }
    ));
}

#[test]
fn a_staged_install_commits_after_a_restart_bound_to_its_session() {
    let image = firmware(2500);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 512));
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let mut dev = complete_with(&mut w, id.clone());
    let pending = dev.stage_install(w.now).unwrap();
    assert_eq!(pending.version, "2.0.0");
    assert_eq!(pending.sha256, sha256(&image));
    assert_eq!(dev.state().running_version, "1.0.0", "not switched yet");
    // Power cut after the image switch: boot from the persisted state.
    let state: DeviceState =
        serde_json::from_str(&serde_json::to_string(dev.state()).unwrap()).unwrap();
    assert_eq!(state.pending_install.as_ref(), Some(&pending));
    let (mut dev, _) = w.pki.device_with(id.clone(), state, 8);
    let actions = dev.report_final(FinalOutcome::Committed, w.now + 60);
    assert_eq!(dev.state().running_version, "2.0.0");
    assert!(dev.state().pending_install.is_none());
    assert!(dev
        .report_final(FinalOutcome::Committed, w.now + 60)
        .is_empty());
    w.broker.apply("s1", actions);
    w.run();
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
    let receipt = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::Installed { receipt, .. } => Some(receipt.clone()),
            _ => None,
        })
        .unwrap();
    let body = verify_receipt(&receipt, id.cert_der()).unwrap();
    assert_eq!(body.session_id, w.manager.sessions["s1"].session_id());
}

#[test]
fn a_failed_health_check_is_reported_as_rolled_back_and_stays_rolled_back() {
    let image = firmware(2500);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 512));
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let mut dev = complete_with(&mut w, id.clone());
    dev.stage_install(w.now).unwrap();
    let actions = dev.report_final(
        FinalOutcome::RolledBack {
            reason: format!("health check failed\n{}", "x".repeat(5000)),
        },
        w.now,
    );
    assert_eq!(dev.state().running_version, "1.0.0");
    w.broker.apply("s1", actions);
    w.run();
    let (version, reason) = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::RolledBack {
                version, reason, ..
            } => Some((version.clone(), reason.clone())),
            _ => None,
        })
        .expect("rolled back");
    assert_eq!(version, "2.0.0");
    assert!(reason.starts_with("health check failed?") && reason.chars().count() <= 256);
    assert!(matches!(w.manager_state("s1"), ManagerState::RolledBack(_)));
    // The receipt of the rollback was lost: the manager's next session of the campaign gets a
    // fresh RolledBack receipt, without a second download or install.
    w.now += 10;
    let (mut dev2, a) = w.pki.device_with(id, dev.state().clone(), 8);
    w.broker.subs.remove("s1");
    w.broker.apply("s1", a);
    w.start(target("s1"));
    let chunks = drive(&mut w, &mut dev2, |_| {});
    assert_eq!(chunks, 0);
    assert!(matches!(w.manager_state("s1"), ManagerState::RolledBack(_)));
}

/// An install that failed and could not be undone claims no version: a signed
/// `Rejected(InstallFailed)` whose reason says so, and the running version stays.
#[test]
fn a_failed_install_is_reported_as_install_failed_claiming_no_version() {
    let image = firmware(2500);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 512));
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let mut dev = complete_with(&mut w, id.clone());
    dev.stage_install(w.now).unwrap();
    let actions = dev.report_final(
        FinalOutcome::Failed {
            reason: "install: disk full; no rollback".into(),
        },
        w.now,
    );
    assert_eq!(dev.state().running_version, "1.0.0");
    assert!(dev.state().pending_install.is_none());
    w.broker.apply("s1", actions);
    w.run();
    let receipt = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::Rejected {
                reason: RejectReason::InstallFailed(text),
                receipt,
            } => {
                assert_eq!(text, "install: disk full; no rollback");
                receipt.clone()
            }
            _ => None,
        })
        .expect("a signed InstallFailed");
    let body = verify_receipt(&receipt, id.cert_der()).unwrap();
    assert!(matches!(body.claim, Claim::Rejected { .. }));
    assert!(matches!(w.manager_state("s1"), ManagerState::Rejected(_)));
}

#[test]
fn an_outcome_reported_during_a_newer_session_is_bound_to_it() {
    let image = firmware(2500);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 512));
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let mut dev = complete_with(&mut w, id.clone());
    dev.stage_install(w.now).unwrap();
    let state = dev.state().clone();
    // The reboot takes long: the manager times out and starts a new session.
    w.now += 400;
    let (mut dev, a) = w.pki.device_with(id.clone(), state, 8);
    w.broker.subs.remove("s1");
    w.broker.apply("s1", a);
    w.start(target("s1"));
    let chunks = drive(&mut w, &mut dev, |_| {});
    assert_eq!(chunks, 0, "the staged image is not downloaded again");
    assert!(matches!(
        w.manager_state("s1"),
        ManagerState::Transferring { .. }
    ));
    // Health check passed: the receipt is bound to the live (new) session.
    let actions = dev.report_final(FinalOutcome::Committed, w.now);
    w.broker.apply("s1", actions);
    w.run();
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
    // While an install is pending, another campaign is not started (the same device state
    // without that pending install would answer this notify).
    let (mut idle, _) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 8);
    let notify = w.last_from("manager", "/s1/notify");
    assert_eq!(idle.handle(&notify, w.now).unwrap().actions.len(), 1);
    let mut pending = DeviceState::new("1.0.0");
    pending.pending_install = Some(PendingInstall {
        campaign_id: "other".into(),
        binding: SessionBinding {
            session_id: [0; 16],
            transcript: [0; 32],
            issued_at: 0,
        },
        version: "9.0.0".into(),
        sha256: [0; 32],
        size: 1,
        release_key: None,
    });
    let (mut busy, _) = w.pki.device_with(id, pending, 8);
    let out = busy.handle(&notify, w.now).unwrap();
    assert!(out.actions.is_empty(), "no handshake while busy");
}

/// Drive a device with identity `id` by hand up to `ImageComplete`.
fn complete_with(w: &mut World, id: Arc<Identity>) -> DeviceSession {
    w.publish_chunks();
    let (mut dev, a) = w.pki.device_with(id, DeviceState::new("1.0.0"), 8);
    w.broker.apply("s1", a);
    w.start(target("s1"));
    let mut complete = false;
    drive(w, &mut dev, |e| {
        complete |= matches!(e, DeviceEvent::ImageComplete { .. })
    });
    assert!(complete);
    dev
}

/// Deliver the queued messages, those for `s1` to `dev` (driven by hand: nothing is installed on
/// its own), calling `seen` on each of its events; returns how many chunks it took.
fn drive(w: &mut World, dev: &mut DeviceSession, mut seen: impl FnMut(&DeviceEvent)) -> usize {
    let mut chunks = 0;
    while let Some((client, msg)) = w.broker.queue.pop_front() {
        if client == "s1" {
            let out = dev.handle(&msg, w.now).unwrap();
            for e in &out.events {
                chunks += usize::from(matches!(e, DeviceEvent::Chunk { .. }));
                seen(e);
            }
            w.broker.apply("s1", out.actions);
        } else {
            w.deliver(&client, msg);
        }
    }
    chunks
}
