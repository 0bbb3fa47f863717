//! Nothing outlives its authority: the campaign's expiry is checked on every chunk, before install
//! and by the device's timers, and a signed abort ends a session; a broker that keeps an expired
//! or aborted campaign's messages and delivers them later gets nothing installed.

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

const EXPIRES: u64 = NOW + 100;

fn device(w: &mut World) -> &mut DeviceSession {
    &mut w.devices.get_mut("s1").unwrap().session
}

fn short_lived(image: Vec<u8>) -> Arc<PreparedCampaign> {
    Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware { image },
            expires_at: EXPIRES,
            chunk_size: 500,
            release: None,
        })
        .unwrap(),
    )
}

/// The device accepted the update (it holds the content key) and the broker withholds the chunks
/// until after the expiry.
fn accepted_then_chunks_withheld() -> World {
    let mut w = World::new(Pki::new(), short_lived(firmware(3000)));
    w.add_device("s1", "1.0.0", 2);
    w.start(target("s1"));
    w.run(); // chunks are not published yet
    assert!(matches!(
        w.manager_state("s1"),
        ManagerState::Transferring { .. }
    ));
    assert_eq!(w.devices["s1"].session.window(), &[0, 1]);
    w
}

fn rejected_expired(w: &World) -> bool {
    w.devices["s1"].events.contains(&DeviceEvent::Rejected {
        reason: RejectReason::Expired,
    })
}

#[test]
fn chunks_delivered_after_the_expiry_are_refused_with_a_signed_expired() {
    let mut w = accepted_then_chunks_withheld();
    // Days later the broker delivers every chunk.
    w.now = EXPIRES + 3 * 86_400;
    for i in 0..w.manager.campaign.chunk_count() {
        let c = w.manager.campaign.chunk_publish(&w.pki.topics, i);
        w.broker.queue.push_back(("s1".into(), c.to_inbound()));
    }
    w.run();
    let d = &w.devices["s1"];
    assert!(!d.installed);
    assert!(
        !d.events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Chunk { .. })),
        "no chunk was taken past the expiry"
    );
    assert!(rejected_expired(&w));
    assert_eq!(d.session.state().running_version, "1.0.0");
    assert!(d.session.state().transfer.is_none());
    // The refusal is a signed receipt the manager accepts.
    assert_eq!(
        w.manager_state("s1"),
        &ManagerState::Rejected(RejectReason::Expired)
    );
}

#[test]
fn an_image_completed_before_the_expiry_is_not_installed_after_it() {
    let mut w = World::new(Pki::new(), short_lived(firmware(3000)));
    w.publish_chunks();
    let (mut dev, _) = w.pki.device("s1", "1.0.0", 8);
    let (mut ms, a) = ManagerSession::start(
        &w.pki.manager_config(),
        w.manager.campaign.clone(),
        target("s1"),
        NOW,
    )
    .unwrap();
    let Action::Publish(notify) = &a[0] else {
        panic!()
    };
    let out = dev.handle(&notify.to_inbound(), NOW).unwrap();
    let Action::Publish(ready) = &out.actions[0] else {
        panic!()
    };
    let out = ms.handle(&ready.to_inbound(), NOW).unwrap();
    let Action::Publish(update) = &out.actions[0] else {
        panic!()
    };
    dev.handle(&update.to_inbound(), NOW).unwrap();
    let mut complete = false;
    for i in 0..w.manager.campaign.chunk_count() {
        let c = w.manager.campaign.chunk_publish(&w.pki.topics, i);
        let out = dev.handle(&c.to_inbound(), NOW).unwrap();
        complete |= out
            .events
            .iter()
            .any(|e| matches!(e, DeviceEvent::ImageComplete { .. }));
    }
    assert!(complete);
    // The device gets around to installing only after the expiry.
    let actions = dev.finish_install(Ok(()), EXPIRES);
    assert_eq!(dev.state().running_version, "1.0.0", "not installed");
    let Action::Publish(receipt) = &actions[0] else {
        panic!()
    };
    let out = ms.handle(&receipt.to_inbound(), EXPIRES).unwrap();
    assert_eq!(
        out.events,
        vec![ManagerEvent::Rejected {
            reason: RejectReason::Expired,
            receipt: Some(receipt.payload.clone()),
        }]
    );
}

#[test]
fn stage_install_refuses_past_the_expiry() {
    let mut w = World::new(Pki::new(), short_lived(firmware(1000)));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 8);
    // The harness installs on ImageComplete; hold the last chunk to stage by hand.
    w.hook = Some(Box::new(|client, msg| {
        if client == "s1" && msg.topic.ends_with("/_chunks/c1/1") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.start(target("s1"));
    w.run();
    let last = w
        .manager
        .campaign
        .chunk_publish(&w.pki.topics, 1)
        .to_inbound();
    let d = w.devices.get_mut("s1").unwrap();
    let out = d.session.handle(&last, NOW).unwrap();
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::ImageComplete { .. })));
    let refused = d.session.stage_install(EXPIRES).unwrap_err();
    assert_eq!(refused.len(), 1, "a signed Rejected(Expired)");
    assert!(d.session.state().pending_install.is_none());
    assert_eq!(d.session.state().running_version, "1.0.0");
}

#[test]
fn the_device_session_ends_at_the_expiry() {
    let mut w = accepted_then_chunks_withheld();
    // Before the expiry, a missing window is asked for again.
    w.now = NOW + 31;
    let a = w.devices.get_mut("s1").unwrap().session.poll(w.now);
    assert_eq!(a.len(), 1, "ChunksRequested");
    // At the expiry the session ends with a signed Rejected(Expired): no more requests, the
    // window is released.
    w.now = EXPIRES;
    let out = w.devices.get_mut("s1").unwrap().session.poll_output(w.now);
    assert_eq!(
        out.events,
        vec![DeviceEvent::Rejected {
            reason: RejectReason::Expired
        }]
    );
    w.broker.apply("s1", out.actions);
    w.run();
    assert!(w.devices["s1"].session.state().transfer.is_none());
    assert_eq!(
        w.manager_state("s1"),
        &ManagerState::Rejected(RejectReason::Expired)
    );
    let d = w.devices.get_mut("s1").unwrap();
    assert!(d.session.window().is_empty());
    assert!(d.session.poll(EXPIRES + 1000).is_empty());
    // Chunks delivered afterwards find no session: a campaign this device ended, so they are
    // late duplicates, ignored (nothing stored, nothing sent).
    let c = w
        .manager
        .campaign
        .chunk_publish(&w.pki.topics, 0)
        .to_inbound();
    let d = w.devices.get_mut("s1").unwrap();
    let out = d
        .session
        .handle(&c, EXPIRES + 86_400)
        .expect("a late chunk of an ended campaign is ignored");
    assert!(out.events.is_empty() && out.actions.is_empty());
    assert!(!d.installed);
}

#[test]
fn a_signed_abort_ends_the_session_before_the_broker_delivers_the_chunks() {
    let mut w = accepted_then_chunks_withheld();
    w.now = NOW + 10;
    let abort = w.manager.sessions["s1"].abort_publish(w.now);
    w.broker.publish("manager", abort);
    w.run();
    // The broker now delivers the whole campaign.
    w.publish_chunks();
    for i in 0..w.manager.campaign.chunk_count() {
        let c = w.manager.campaign.chunk_publish(&w.pki.topics, i);
        w.broker.queue.push_back(("s1".into(), c.to_inbound()));
    }
    w.run();
    let d = &w.devices["s1"];
    assert!(!d.installed);
    assert!(!d
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::Chunk { .. })));
    // The aborted session's notify, replayed, starts nothing.
    let notify = w.last_from("manager", "/s1/notify");
    let first_notify = w
        .broker
        .published
        .iter()
        .find(|(f, o)| f == "manager" && o.topic.ends_with("/s1/notify"))
        .unwrap()
        .1
        .to_inbound();
    assert_ne!(
        notify.payload, first_notify.payload,
        "the abort replaced it"
    );
    let d = w.devices.get_mut("s1").unwrap();
    let out = d.session.handle(&first_notify, w.now).unwrap();
    assert!(out.actions.is_empty(), "no ready for an aborted session");
    // A later session of the campaign (the operator's retry) is answered and resumes.
    w.now += 5;
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
}

#[test]
fn forged_wrongly_addressed_and_stale_aborts_are_refused() {
    let mut w = accepted_then_chunks_withheld();
    let genuine = w.manager.sessions["s1"]
        .abort_publish(NOW + 10)
        .to_inbound();
    let (_, body) = wire::decode_abort(&genuine.payload).unwrap();
    // The same abort, carrying and signed by another identity's certificate and key.
    let signed_by = |id: &Identity| Inbound {
        payload: sign_as(
            id,
            wire::TYPE_ABORT,
            &wire::AbortBody {
                manager_cert: id.cert_der().to_vec(),
                ..body.clone()
            },
        ),
        ..genuine.clone()
    };
    // A device key (an insider) instead of the manager's.
    let insider = w.pki.ca.issue(Role::Device, "s2", NOW, 30).unwrap();
    assert!(matches!(
        device(&mut w).handle(&signed_by(&insider), NOW + 10),
        Err(ProtocolError::Identity(IdentityError::WrongRole { .. }))
    ));
    // A manager of another CA.
    let rogue_ca = CertificateAuthority::generate("rogue", NOW, 30).unwrap();
    let rogue = rogue_ca.issue(Role::Manager, "p1", NOW, 30).unwrap();
    assert!(matches!(
        device(&mut w).handle(&signed_by(&rogue), NOW + 10),
        Err(ProtocolError::Identity(IdentityError::Chain(_)))
    ));
    // Altered after signing.
    let (mut env, mut b) = wire::decode_abort(&genuine.payload).unwrap();
    b.issued_at += 1;
    env.body = wire::encode_msg(&b);
    let msg = Inbound {
        payload: env.encode(),
        ..genuine.clone()
    };
    assert!(matches!(
        device(&mut w).handle(&msg, NOW + 10),
        Err(ProtocolError::BadSignature { .. })
    ));
    // Another device's abort, moved to this device's notify topic.
    let other = abort_publish(&w.pki.manager, &w.pki.topics, "s2", "c1", NOW + 10);
    let msg = Inbound {
        topic: genuine.topic.clone(),
        ..other.to_inbound()
    };
    assert!(matches!(
        device(&mut w).handle(&msg, NOW + 10),
        Err(ProtocolError::WrongDevice { .. })
    ));
    // An abort issued before this session (an earlier attempt's) ends nothing.
    let stale = w.manager.sessions["s1"].abort_publish(NOW - 1).to_inbound();
    let out = device(&mut w).handle(&stale, NOW + 10).unwrap();
    assert!(out.events.is_empty());
    assert_eq!(device(&mut w).window(), &[0, 1], "the session goes on");
    // The genuine one ends it.
    let out = device(&mut w).handle(&genuine, NOW + 10).unwrap();
    assert_eq!(
        out.events,
        vec![DeviceEvent::Aborted {
            campaign_id: "c1".into()
        }]
    );
}
