//! Every byte of every message, flipped, delivered to a live session, is rejected with a typed error,
//! never accepted and never a panic; the session keeps working afterwards. The messages: notify,
//! ready, update, status, chunk, receipt and abort of one firmware campaign.

mod common;

use common::*;
use sealed_ota_protocol::*;

/// Flip each byte of `msg` in turn (XOR 0x01) and feed it to `handle`: every one must be refused.
fn every_flip_refused(
    what: &str,
    msg: &Inbound,
    mut handle: impl FnMut(&Inbound) -> Result<(), ProtocolError>,
) {
    assert!(!msg.payload.is_empty(), "{what}: empty");
    for i in 0..msg.payload.len() {
        let mut m = msg.clone();
        m.payload[i] ^= 0x01;
        assert!(handle(&m).is_err(), "{what}: flip of byte {i} accepted");
    }
}

fn first_publish(actions: &[Action]) -> Inbound {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Publish(o) => Some(o.to_inbound()),
            _ => None,
        })
        .expect("a publish")
}

#[test]
fn every_flip_of_every_message_is_rejected() {
    let mut w = World::new(Pki::new(), campaign(firmware(700), 512));
    w.add_device("s1", "1.0.0", 8);
    w.start(target("s1"));
    let notify = w.broker.retained["iot/p1/s1/notify"].clone();
    let mut d = w.devices.remove("s1").unwrap().session;
    let mut ms = w.manager.sessions.remove("s1").unwrap();

    every_flip_refused("notify", &notify, |m| d.handle(m, NOW).map(drop));
    let ready = first_publish(&d.handle(&notify, NOW).unwrap().actions);

    every_flip_refused("ready", &ready, |m| ms.handle(m, NOW).map(drop));
    assert_eq!(ms.state(), &ManagerState::NotifySent);
    let update = first_publish(&ms.handle(&ready, NOW).unwrap().actions);

    every_flip_refused("update", &update, |m| d.handle(m, NOW).map(drop));
    let out = d.handle(&update, NOW).unwrap();
    assert!(matches!(out.events[0], DeviceEvent::UpdateOffered { .. }));
    let accepted = first_publish(&out.actions);

    every_flip_refused("status", &accepted, |m| ms.handle(m, NOW).map(drop));
    ms.handle(&accepted, NOW).unwrap();

    let chunks: Vec<Inbound> = (0..w.manager.campaign.chunk_count())
        .map(|i| {
            w.manager
                .campaign
                .chunk_publish(&w.pki.topics, i)
                .to_inbound()
        })
        .collect();
    for (i, chunk) in chunks.iter().enumerate() {
        every_flip_refused(&format!("chunk {i}"), chunk, |m| d.handle(m, NOW).map(drop));
        for n in 1..chunk.payload.len() {
            let mut t = chunk.clone();
            t.payload.truncate(n);
            assert!(d.handle(&t, NOW).is_err(), "chunk {i} truncated to {n}");
        }
    }
    let mut image = Vec::new();
    for chunk in &chunks {
        for e in d.handle(chunk, NOW).unwrap().events {
            if let DeviceEvent::Chunk { data, .. } = e {
                image.extend(data);
            }
        }
    }
    assert_eq!(image, firmware(700));
    let receipt = first_publish(&d.finish_install(Ok(()), NOW));

    every_flip_refused("receipt", &receipt, |m| ms.handle(m, NOW).map(drop));
    assert!(matches!(ms.state(), ManagerState::Transferring { .. }));
    let out = ms.handle(&receipt, NOW).unwrap();
    assert!(matches!(out.events[0], ManagerEvent::Installed { .. }));

    // The abort, to a second session of another device (the first one finished).
    let mut w2 = World::new(Pki::new(), campaign(firmware(700), 512));
    w2.add_device("s2", "1.0.0", 8);
    w2.start(target("s2"));
    w2.run();
    let abort = w2.manager.sessions["s2"]
        .abort_publish(NOW + 1)
        .to_inbound();
    let mut d2 = w2.devices.remove("s2").unwrap().session;
    let refuse_or_ignore = |d: &mut DeviceSession, m: &Inbound| match d.handle(m, NOW + 1) {
        Ok(out) if !out.events.is_empty() => Ok(()),
        Ok(_) => Err(ProtocolError::Replay), // verified but ended nothing: not accepted either
        Err(e) => Err(e),
    };
    let mut abort_accepted = 0;
    for i in 0..abort.payload.len() {
        let mut m = abort.clone();
        m.payload[i] ^= 0x01;
        match refuse_or_ignore(&mut d2, &m) {
            Err(_) => {}
            Ok(()) => abort_accepted += 1,
        }
    }
    assert_eq!(abort_accepted, 0, "a flipped abort ended the session");
    assert_eq!(d2.window().len(), 2, "still transferring");
    let out = d2.handle(&abort, NOW + 1).unwrap();
    assert!(matches!(out.events[0], DeviceEvent::Aborted { .. }));
}
