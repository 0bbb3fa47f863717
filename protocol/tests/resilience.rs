//! Loss, duplication, reordering, reconnects and device restarts through the in-memory broker.

mod common;

use common::*;
use sealed_ota_protocol::*;

#[test]
fn duplicated_and_reordered_deliveries_are_harmless() {
    let image = firmware(6000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 256));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 8);
    w.start(target("s1"));
    // Deliver everything twice, in reverse order of each batch.
    let mut rounds = 0;
    while !w.broker.queue.is_empty() {
        rounds += 1;
        assert!(rounds < 10_000);
        let batch: Vec<_> = w.broker.queue.drain(..).collect();
        for (c, m) in batch.iter().rev() {
            w.deliver(c, m.clone());
            w.deliver(c, m.clone());
        }
    }
    let d = &w.devices["s1"];
    assert!(d.installed, "{:?}", d.errors);
    assert_eq!(d.image, image);
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
    assert_eq!(w.installed_events(), 1);
}

#[test]
fn lost_chunks_are_requested_and_republished() {
    let image = firmware(5000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 256));
    // Chunks are NOT published up front: every chunk the device asks for is published on request.
    w.add_device("s1", "1.0.0", 5);
    w.start(target("s1"));
    for _ in 0..20 {
        w.run();
        if w.devices["s1"].installed {
            break;
        }
        w.now += 31;
        w.poll_devices();
    }
    assert!(w.devices["s1"].installed);
    assert_eq!(w.devices["s1"].image, image);
    let requests = w
        .manager
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ManagerEvent::ChunksRequested { .. }))
        .count();
    assert!(requests >= 4, "{requests}");
}

/// Deliveries of retained chunks the broker dropped for one device (a full session queue) come
/// back through that device's own SUBSCRIBE at the window timeout, without asking the manager
/// (whose republish would reach every device on those chunk topics); what that does not bring is
/// asked of the manager at the next timeout.
#[test]
fn a_timed_out_window_subscribes_its_retained_chunks_again_before_asking_the_manager() {
    use std::collections::HashMap;
    let image = firmware(3000); // 6 chunks
    let requests = |w: &World| {
        w.manager
            .events
            .iter()
            .filter(|(_, e)| matches!(e, ManagerEvent::ChunksRequested { .. }))
            .count()
    };
    let delivered = |w: &World| {
        w.broker
            .published
            .iter()
            .filter(|(from, o)| from == "manager" && o.topic.contains("/_chunks/"))
            .count()
    };
    // `drops` first deliveries of every chunk to s1 are lost.
    let world = |drops: u32| {
        let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
        w.publish_chunks();
        w.add_device("s1", "1.0.0", 3);
        w.start(target("s1"));
        let mut seen: HashMap<String, u32> = HashMap::new();
        w.hook = Some(Box::new(move |client, msg| {
            if client != "s1" || !msg.topic.contains("/_chunks/") {
                return Verdict::Deliver;
            }
            let n = seen.entry(msg.topic.clone()).or_default();
            *n += 1;
            if *n <= drops {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }));
        w.run();
        w
    };

    // One lost delivery per chunk: each window's timeout subscribes it again, the broker sends the
    // retained copies to s1, and the manager is never asked.
    let mut w = world(1);
    let published = delivered(&w);
    for _ in 0..2 {
        assert!(!w.devices["s1"].installed);
        w.now += 31;
        w.poll_devices();
        w.run();
    }
    assert!(w.devices["s1"].installed);
    assert_eq!(w.devices["s1"].image, image);
    assert_eq!(requests(&w), 0, "no chunk was asked of the manager");
    assert_eq!(
        delivered(&w),
        published,
        "the manager published nothing again"
    );

    // Two lost deliveries per chunk: the subscription again does not bring them, the next
    // timeout asks the manager, and its republish does.
    let mut w = world(2);
    w.now += 31;
    w.poll_devices();
    w.run();
    assert_eq!(requests(&w), 0, "the first timeout only subscribes again");
    assert_eq!(w.devices["s1"].session.window(), &[0, 1, 2]);
    w.now += 31;
    w.poll_devices();
    w.run();
    assert_eq!(requests(&w), 1, "the second timeout asks the manager");
    assert_eq!(
        w.devices["s1"].session.window(),
        &[3, 4, 5],
        "window 1 complete"
    );
}

/// Copies of chunks that reach a device after it completed the campaign (republishes for other
/// devices still queued for it at the broker) are duplicates: ignored, not protocol errors.
#[test]
fn chunks_arriving_after_the_campaign_completed_are_duplicates_not_errors() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 3);
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
    let late = w.broker.retained[&w.pki.topics.chunk("c1", 4)].clone();
    w.deliver("s1", late);
    assert_eq!(
        w.devices["s1"].errors,
        vec![],
        "a late duplicate is no error"
    );
    // A chunk of a campaign the device never took part in is still refused.
    let other = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "c9".into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware { image },
        expires_at: NOW + 3600,
        chunk_size: 500,
        release: None,
    })
    .unwrap();
    let foreign = other.chunk_publish(&w.pki.topics, 0).to_inbound();
    w.deliver("s1", foreign);
    assert!(
        matches!(
            w.devices["s1"].errors[..],
            [ProtocolError::UnexpectedMessage { .. }]
        ),
        "{:?}",
        w.devices["s1"].errors
    );
}

#[test]
fn lost_update_is_recovered_by_ready_retry() {
    let mut w = World::new(Pki::new(), campaign(firmware(1000), 256));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    let mut dropped = false;
    w.hook = Some(Box::new(move |client, msg| {
        if client == "s1" && msg.topic.ends_with("/update") && !dropped {
            dropped = true;
            return Verdict::Drop;
        }
        Verdict::Deliver
    }));
    w.run();
    assert!(!w.devices["s1"].installed);
    w.now += 31;
    w.poll_devices(); // re-sends the same ready; manager re-sends the same update
    w.run();
    assert!(w.devices["s1"].installed);
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
}

#[test]
fn device_restart_mid_transfer_resumes_from_persisted_state() {
    let image = firmware(8000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.publish_chunks();
    let id = std::sync::Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let (s, a) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 4);
    w.add_device_session("s1", s, a);
    w.start(target("s1"));
    // Stop delivering chunks to the device after 6 of them.
    let mut seen = 0;
    w.hook = Some(Box::new(move |client, msg| {
        if client == "s1" && msg.topic.contains("/_chunks/") {
            seen += 1;
            if seen > 6 {
                return Verdict::Drop;
            }
        }
        Verdict::Deliver
    }));
    w.run();
    let persisted = w.devices["s1"].session.state().clone();
    let stored = w.devices["s1"].image.clone();
    let t = persisted.transfer.as_ref().expect("transfer persisted");
    assert_eq!(t.received.count(), 6);
    // Persist as JSON and "reboot": new DeviceSession, same identity, state from JSON.
    let json = serde_json::to_string(&persisted).unwrap();
    let restored: DeviceState = serde_json::from_str(&json).unwrap();
    w.hook = None;
    w.broker.subs.remove("s1");
    let (s, a) = w.pki.device_with(id, restored, 4);
    w.add_device_session("s1", s, a);
    w.devices.get_mut("s1").unwrap().image = stored;
    w.run();
    let d = &w.devices["s1"];
    assert!(d.installed, "{:?}", d.errors);
    assert_eq!(d.image, image);
    // Only the 10 missing chunks were delivered as events after the restart.
    let n = d
        .events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Chunk { .. }))
        .count();
    assert_eq!(n, 16 - 6);
    // The ready carried the resume summary.
    let ready = w
        .broker
        .published
        .iter()
        .rev()
        .find(|(f, o)| f == "s1" && sans_bucket(&o.topic).ends_with("/ready"))
        .unwrap();
    let (_, body) = wire::decode_ready(&ready.1.payload).unwrap();
    assert_eq!(body.have.unwrap().received, 6);
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
}

/// A device that restarts before the update arrives answers the retained notify again: two readies
/// of one session, which the broker may hand to the manager in either order. Returns the world with
/// the restarted device waiting for its update and both readies held back (before the restart
/// first).
fn two_readies_of_one_session(image: &[u8]) -> (World, Vec<Inbound>) {
    use std::{cell::RefCell, rc::Rc};
    let mut w = World::new(Pki::new(), campaign(image.to_vec(), 500));
    w.publish_chunks();
    let id = std::sync::Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let (s, a) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 4);
    w.add_device_session("s1", s, a);
    w.start(target("s1"));
    // Hold back every ready on its way to the manager.
    let held: Rc<RefCell<Vec<Inbound>>> = Rc::default();
    let hold = held.clone();
    w.hook = Some(Box::new(move |client, msg| {
        if client == "manager" && sans_bucket(&msg.topic).ends_with("/ready") {
            hold.borrow_mut().push(msg.clone());
            return Verdict::Drop;
        }
        Verdict::Deliver
    }));
    w.run();
    // Power cut before the update: a new DeviceSession from the persisted state answers the
    // retained notify with a second ready (new ephemeral key and nonce).
    let json = serde_json::to_string(w.devices["s1"].session.state()).unwrap();
    w.broker.subs.remove("s1");
    let (s, a) = w
        .pki
        .device_with(id, serde_json::from_str(&json).unwrap(), 4);
    w.add_device_session("s1", s, a);
    w.run();
    w.hook = None;
    let readies = held.borrow().clone();
    assert_eq!(readies.len(), 2, "one ready before the restart, one after");
    (w, readies)
}

/// When the ready from before the restart reaches the manager last, the manager must still follow
/// the handshake the device holds keys for (its next authenticated message says which), not the
/// one it completed last.
#[test]
fn a_ready_from_before_a_restart_arriving_last_does_not_strand_the_session() {
    let image = firmware(3000);
    let (mut w, readies) = two_readies_of_one_session(&image);
    w.deliver("manager", readies[1].clone());
    w.deliver("manager", readies[0].clone());
    w.run();
    let d = &w.devices["s1"];
    assert!(
        d.installed,
        "device errors {:?}, manager errors {:?}",
        d.errors, w.manager.errors
    );
    assert_eq!(d.image, image);
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
}

/// The handshakes a newer ready replaced keep their own status sequence numbers: a status replayed
/// under one of them is refused as a replay, not taken as new progress.
#[test]
fn a_status_replayed_under_a_replaced_handshake_is_refused() {
    use std::{cell::RefCell, rc::Rc};
    let image = firmware(3000);
    let (mut w, readies) = two_readies_of_one_session(&image);
    w.deliver("manager", readies[1].clone());
    w.deliver("manager", readies[0].clone());
    // Hold back the device's statuses: the first one is delivered twice by hand.
    let held: Rc<RefCell<Vec<Inbound>>> = Rc::default();
    let hold = held.clone();
    w.hook = Some(Box::new(move |client, msg| {
        if client == "manager" && sans_bucket(&msg.topic).ends_with("/status") {
            hold.borrow_mut().push(msg.clone());
            return Verdict::Drop;
        }
        Verdict::Deliver
    }));
    w.run();
    let status = held
        .borrow()
        .first()
        .cloned()
        .expect("the device sent a status");
    let errors_before = w.manager.errors.len();
    w.deliver("manager", status.clone());
    assert_eq!(
        w.manager.errors.len(),
        errors_before,
        "{:?}",
        w.manager.errors
    );
    w.deliver("manager", status);
    assert!(
        matches!(w.manager.errors.last(), Some((_, ProtocolError::Replay))),
        "{:?}",
        w.manager.errors
    );
}

#[test]
fn reconnect_resubscribes_window() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 3);
    w.start(target("s1"));
    // The connection drops when the first window is subscribed: its retained chunks never arrive.
    w.hook = Some(Box::new(|client, msg| {
        if client == "s1" && msg.topic.contains("/_chunks/") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.run();
    assert_eq!(w.devices["s1"].session.window(), &[0, 1, 2]);
    w.hook = None;
    w.broker.subs.remove("s1"); // clean session
    let now = w.now;
    let a = w.devices.get_mut("s1").unwrap().session.on_reconnect(now);
    w.broker.apply("s1", a);
    w.run();
    assert!(w.devices["s1"].installed);
    assert_eq!(w.devices["s1"].image, image);
}

/// A broker that refuses some filters of a SUBACK (a clustered broker under load answers
/// `Unspecified`) leaves the window without its chunks; the session itself cannot see a SUBACK,
/// so the client subscribes `subscriptions()` again and the transfer completes.
#[test]
fn refused_subscriptions_are_taken_again_from_the_session() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 3);
    w.start(target("s1"));
    // The broker refuses the window's last filter: its chunk never arrives.
    w.hook = Some(Box::new(|client, msg| {
        if client == "s1" && msg.topic.ends_with("/_chunks/c1/2") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.run();
    let refused = w.pki.topics.chunk("c1", 2);
    w.broker
        .subs
        .get_mut("s1")
        .unwrap()
        .retain(|f| *f != refused);
    let session = &w.devices["s1"].session;
    assert_eq!(session.window(), &[0, 1, 2]);
    assert!(!w.devices["s1"].installed);
    let wanted = session.subscriptions();
    let chunks: Vec<&String> = wanted.iter().filter(|f| f.contains("/_chunks/")).collect();
    // Of the window, only the chunk still missing (the stored ones would come again as retained).
    assert_eq!(chunks, [&refused], "the window's missing chunk: {wanted:?}");
    assert!(
        wanted.contains(&w.pki.topics.notify("s1")) && wanted.contains(&w.pki.topics.update("s1"))
    );
    w.hook = None;
    w.broker.apply("s1", vec![Action::Subscribe(wanted)]);
    w.run();
    assert!(w.devices["s1"].installed);
    assert_eq!(w.devices["s1"].image, image);
}

#[test]
fn retained_notify_after_completion_is_ignored_and_declines_are_signed() {
    let mut w = World::new(Pki::new(), campaign(firmware(600), 256));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
    // Reconnect: the retained notify comes again and is ignored (campaign completed).
    let now = w.now;
    let before = w.broker.published.len();
    let a = w.devices.get_mut("s1").unwrap().session.on_reconnect(now);
    w.broker.apply("s1", a);
    w.run();
    assert_eq!(w.broker.published.len(), before);
    assert!(w.devices["s1"].errors.is_empty());

    // Decline path.
    let mut w = World::new(Pki::new(), campaign(firmware(600), 256));
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    let now = w.now;
    let a = w
        .devices
        .get_mut("s1")
        .unwrap()
        .session
        .decline("maintenance window", now);
    assert!(!a.is_empty());
    w.broker.apply("s1", a);
    w.run();
    assert_eq!(
        w.manager_state("s1"),
        &ManagerState::Rejected(RejectReason::DeclinedByDevice("maintenance window".into()))
    );
}

#[test]
fn image_hash_mismatch_is_reported() {
    let mut w = World::new(Pki::new(), campaign(firmware(600), 256));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    // The application "stores" badly: corrupt its buffer after the first chunk.
    w.hook = Some(Box::new(|_, _| Verdict::Deliver));
    let mut steps = 0;
    while let Some((c, m)) = w.broker.queue.pop_front() {
        steps += 1;
        if c == "s1" && m.topic.ends_with("/_chunks/c1/1") {
            w.deliver(&c, m);
            w.devices.get_mut("s1").unwrap().image[0] ^= 1;
            continue;
        }
        w.deliver(&c, m);
        assert!(steps < 10_000);
    }
    assert_eq!(
        w.manager_state("s1"),
        &ManagerState::Rejected(RejectReason::ImageHashMismatch)
    );
}

/// A cleared (empty) retained notify proves nothing, so it ends nothing; the manager's signed abort
/// ends the session: the window is released, retries stop, the resume state is kept, and chunks
/// the broker delivers afterwards are not taken.
#[test]
fn signed_abort_stops_retries_and_keeps_resume_state() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.add_device("s1", "1.0.0", 2);
    w.start(target("s1"));
    // Chunks are never published: the device waits on its first window.
    w.run();
    assert_eq!(w.devices["s1"].session.window(), &[0, 1]);
    // Anyone can publish an empty retained notify: it ends nothing.
    let clear = w.manager.sessions["s1"].clear_notify();
    w.broker.publish("manager", clear);
    w.run();
    assert_eq!(w.devices["s1"].session.window(), &[0, 1]);
    // The campaign is aborted: the operator publishes the signed abort.
    w.now += 1;
    let abort = w.manager.sessions["s1"].abort_publish(w.now);
    w.broker.publish("manager", abort);
    w.run();
    assert!(w.devices["s1"].session.window().is_empty());
    assert!(w.devices["s1"].session.state().transfer.is_some());
    assert!(w.devices["s1"].events.contains(&DeviceEvent::Aborted {
        campaign_id: "c1".into()
    }));
    // No more chunk requests or ready retries.
    w.now += 100;
    let a = w.devices.get_mut("s1").unwrap().session.poll(w.now);
    assert!(a.is_empty());
    // Unsubscribed from the window.
    assert!(!w.broker.subs["s1"].iter().any(|f| f.contains("/_chunks/")));
    // The chunks, delivered late by the broker, are not taken.
    let chunk = w
        .manager
        .campaign
        .chunk_publish(&w.pki.topics, 0)
        .to_inbound();
    let d = w.devices.get_mut("s1").unwrap();
    assert!(d.session.handle(&chunk, w.now).is_err());
    assert!(!d.installed);
}

/// A manager that restarted after the device installed (its receipt lost with the old process)
/// starts a new session of the same campaign: the device answers the new notify and, as the signed
/// manifest matches what it installed, sends a fresh receipt bound to the new session: no chunk,
/// no reinstall. Also after a device reboot (state from JSON).
#[test]
fn new_session_of_a_completed_campaign_gets_a_fresh_receipt_without_download() {
    let image = firmware(3000);
    let mut w = World::new(Pki::new(), campaign(image.clone(), 500));
    w.publish_chunks();
    let id = std::sync::Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let (s, a) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 4);
    w.add_device_session("s1", s, a);
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
    let first_session = w.manager.sessions["s1"].session_id();
    let completion = w.devices["s1"]
        .session
        .state()
        .last_completion
        .clone()
        .expect("completion recorded");
    assert_eq!(completion.session_id, first_session);

    for reboot in [false, true] {
        if reboot {
            let json = serde_json::to_string(w.devices["s1"].session.state()).unwrap();
            let restored: DeviceState = serde_json::from_str(&json).unwrap();
            w.broker.subs.remove("s1");
            let (s, a) = w.pki.device_with(id.clone(), restored, 4);
            w.add_device_session("s1", s, a);
        }
        // "Restarted manager": a new session (new notify replaces the retained one).
        w.now += 10;
        let events_before = w.manager.events.len();
        let published_before = w.broker.published.len();
        let device_events_before = w.devices["s1"].events.len();
        w.start(target("s1"));
        w.run();
        assert_eq!(
            w.manager_state("s1"),
            &ManagerState::Installed,
            "reboot={reboot}"
        );
        assert_ne!(w.manager.sessions["s1"].session_id(), first_session);
        let new_events: Vec<_> = w.manager.events[events_before..].to_vec();
        assert!(
            matches!(new_events.last(), Some((_, ManagerEvent::Installed { version, .. })) if version == "2.0.0"),
            "{new_events:?}"
        );
        assert!(
            !new_events
                .iter()
                .any(|(_, e)| matches!(e, ManagerEvent::Progress { .. })),
            "no Accepted: nothing to transfer"
        );
        // The device sent exactly ready + Installed: no chunk subscription, no chunk events.
        let from_device: Vec<_> = w.broker.published[published_before..]
            .iter()
            .filter(|(f, _)| f == "s1")
            .map(|(_, o)| o.topic.clone())
            .collect();
        assert_eq!(
            from_device,
            vec![
                "iot/p1/s1/ready/232".to_string(),
                "iot/p1/s1/update/status/232".to_string()
            ],
            "reboot={reboot}"
        );
        assert!(w.devices["s1"].events[device_events_before..].is_empty());
        assert!(
            w.devices["s1"].errors.is_empty(),
            "{:?}",
            w.devices["s1"].errors
        );
        assert_eq!(w.devices["s1"].session.state().running_version, "2.0.0");
        assert_eq!(
            w.devices["s1"]
                .session
                .state()
                .last_completion
                .as_ref()
                .unwrap()
                .session_id,
            w.manager.sessions["s1"].session_id()
        );
    }

    // The retained notify of the session that completed is still ignored on reconnect.
    let before = w.broker.published.len();
    let now = w.now;
    let a = w.devices.get_mut("s1").unwrap().session.on_reconnect(now);
    w.broker.apply("s1", a);
    w.run();
    assert_eq!(w.broker.published.len(), before);
}

/// Same campaign id, but the manifest differs from what was installed (another image): the device
/// does not claim it; the ordinary checks apply (here: not newer than the running version).
#[test]
fn new_session_with_a_different_image_is_not_answered_with_a_receipt() {
    let mut w = World::new(Pki::new(), campaign(firmware(3000), 500));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    assert!(w.devices["s1"].installed);
    let mut other = firmware(3000);
    other[0] ^= 0xff;
    w.manager.campaign = campaign(other, 500);
    w.now += 10;
    w.start(target("s1"));
    w.run();
    assert!(matches!(
        w.manager_state("s1"),
        ManagerState::Rejected(RejectReason::NotNewer { .. })
    ));
    assert_eq!(w.installed_events(), 1);
}

/// A ready that comes again byte for byte (a device re-sending it while its update is on the
/// way) is answered with the same update without verifying it again; a ready that differs in any
/// byte (here its signature) is verified in full and refused, so the shortcut answers nothing the
/// full check would not.
#[test]
fn a_repeated_ready_skips_verification_only_when_byte_identical() {
    let mut w = World::new(Pki::new(), campaign(firmware(1000), 256));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    // The device's updates are lost: it waits for one, as while its update sits in a queue.
    w.hook = Some(Box::new(|client, msg| {
        if client == "s1" && msg.topic.ends_with("/update") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.run();
    let ready = w.last_from("s1", "/ready");
    let repeated = |w: &World| {
        w.manager
            .events
            .iter()
            .filter(|(_, e)| matches!(e, ManagerEvent::ReadyRepeated))
            .count()
    };
    let updates = |w: &World| w.published_by("manager", "/s1/update");
    let first_update = updates(&w)
        .last()
        .expect("an update was sent")
        .payload
        .clone();
    assert_eq!(repeated(&w), 0);

    let sent = updates(&w).len();
    // Right after the update went out: counted, not sent again (it is likely still on its way).
    w.deliver("manager", ready.clone());
    assert_eq!(repeated(&w), 1, "errors: {:?}", w.manager.errors);
    assert!(w.manager.errors.is_empty(), "{:?}", w.manager.errors);
    assert_eq!(
        updates(&w).len(),
        sent,
        "no second update within the resend interval"
    );
    // Later: the same update again.
    w.now += sealed_ota_protocol::manager::UPDATE_RESEND_SECS;
    w.deliver("manager", ready.clone());
    assert_eq!(repeated(&w), 2);
    assert_eq!(updates(&w).len(), sent + 1);
    assert_eq!(
        updates(&w).last().unwrap().payload,
        first_update,
        "the same update again"
    );

    let mut tampered = ready.clone();
    let last = tampered.payload.len() - 1;
    tampered.payload[last] ^= 0x01;
    w.deliver("manager", tampered);
    assert_eq!(repeated(&w), 2, "a changed ready is not a repeat");
    assert_eq!(
        w.manager.errors.len(),
        1,
        "a changed ready is verified and refused"
    );

    w.deliver("manager", ready);
    assert_eq!(repeated(&w), 3);
    assert_eq!(w.manager.errors.len(), 1);
}
