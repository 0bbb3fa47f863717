//! Bit flips anywhere in a genuine message, delivered to a live session, are always rejected with a
//! typed error, never accepted and never a panic; the session keeps working afterwards.

mod common;

use common::*;
use sealed_ota_protocol::*;

fn flips(len: usize, step: usize) -> impl Iterator<Item = usize> {
    (0..len)
        .step_by(step)
        .chain(std::iter::once(len.saturating_sub(1)))
}

#[test]
fn every_flip_of_every_message_is_rejected() {
    let mut w = World::new(Pki::new(), campaign(firmware(2000), 512));
    w.publish_chunks();
    w.add_device("s1", "1.0.0", 8);
    w.start(target("s1"));
    // Record what goes where, without processing: drive by hand.
    let notify = w.broker.retained["iot/p1/s1/notify"].clone();
    let d = &mut w.devices.get_mut("s1").unwrap().session;

    // Notify: signed; a flip must fail (sampled: signature checks are slow in debug builds).
    for i in flips(notify.payload.len(), 5) {
        let mut m = notify.clone();
        m.payload[i] ^= 0x01;
        assert!(d.handle(&m, NOW).is_err(), "notify flip at {i} accepted");
    }
    let out = d.handle(&notify, NOW).unwrap();
    let Action::Publish(ready) = &out.actions[0] else {
        panic!()
    };
    let ready = ready.to_inbound();

    let ms = w.manager.sessions.get_mut("s1").unwrap();
    for i in flips(ready.payload.len(), 5) {
        let mut m = ready.clone();
        m.payload[i] ^= 0x01;
        assert!(ms.handle(&m, NOW).is_err(), "ready flip at {i} accepted");
    }
    assert_eq!(ms.state(), &ManagerState::NotifySent);
    let out = ms.handle(&ready, NOW).unwrap();
    let Action::Publish(update) = &out.actions[0] else {
        panic!()
    };
    let update = update.to_inbound();

    for i in flips(update.payload.len(), 1) {
        let mut m = update.clone();
        m.payload[i] ^= 0x80;
        assert!(d.handle(&m, NOW).is_err(), "update flip at {i} accepted");
    }
    let out = d.handle(&update, NOW).unwrap();
    assert!(matches!(out.events[0], DeviceEvent::UpdateOffered { .. }));
    let status = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Publish(o) => Some(o.to_inbound()),
            _ => None,
        })
        .unwrap();
    for i in flips(status.payload.len(), 3) {
        let mut m = status.clone();
        m.payload[i] ^= 0x01;
        assert!(ms.handle(&m, NOW).is_err(), "status flip at {i} accepted");
    }
    ms.handle(&status, NOW).unwrap();

    let chunk = w
        .manager
        .campaign
        .chunk_publish(&w.pki.topics, 0)
        .to_inbound();
    for i in flips(chunk.payload.len(), 1) {
        let mut m = chunk.clone();
        m.payload[i] ^= 0x01;
        assert!(d.handle(&m, NOW).is_err(), "chunk flip at {i} accepted");
        let mut t = chunk.clone();
        t.payload.truncate(i);
        assert!(
            d.handle(&t, NOW).is_err() || i == 0,
            "chunk truncated to {i} accepted"
        );
    }
    let out = d.handle(&chunk, NOW).unwrap();
    assert!(matches!(out.events[0], DeviceEvent::Chunk { index: 0, .. }));
}
