//! Property tests: chunking and reassembly stay correct under reordering, duplication and loss of
//! deliveries, plus a device restart (persisted state, JSON) at an arbitrary point.

mod common;

use common::*;
use proptest::prelude::*;
use sealed_ota_protocol::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn scenario(
    len: usize,
    chunk: u32,
    window: u32,
    seed: u64,
    dup: u64,
    loss: u64,
    restart_at: Option<usize>,
) {
    let image = firmware(len);
    let c = campaign(image.clone(), chunk);
    let count = c.chunk_count();
    let mut w = World::new(Pki::new(), c);
    w.publish_chunks();
    let id = std::sync::Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let (s, a) = w
        .pki
        .device_with(id.clone(), DeviceState::new("1.0.0"), window);
    w.add_device_session("s1", s, a);
    w.start(target("s1"));
    let mut rng = Rng(seed | 1);
    let mut steps = 0usize;
    let mut seen_chunks = std::collections::HashSet::new();
    let mut restarted = false;
    for _round in 0..400 {
        while !w.broker.queue.is_empty() {
            steps += 1;
            assert!(steps < 200_000, "no progress");
            if let Some(k) = restart_at {
                if !restarted && steps == k {
                    restarted = true;
                    let json = serde_json::to_string(w.devices["s1"].session.state()).unwrap();
                    let state: DeviceState = serde_json::from_str(&json).unwrap();
                    let stored = w.devices["s1"].image.clone();
                    let old_events = std::mem::take(&mut w.devices.get_mut("s1").unwrap().events);
                    // The application's "installed" flag survives the reboot (it is on disk).
                    let installed = w.devices["s1"].installed;
                    w.broker.subs.remove("s1");
                    w.broker.queue.retain(|(c, _)| c != "s1");
                    let (s, a) = w.pki.device_with(id.clone(), state, window);
                    w.add_device_session("s1", s, a);
                    let d = w.devices.get_mut("s1").unwrap();
                    d.image = stored;
                    d.events = old_events;
                    d.installed = installed;
                    continue;
                }
            }
            let i = (rng.next() % w.broker.queue.len() as u64) as usize;
            let (client, msg) = w.broker.queue.remove(i).unwrap();
            let is_chunk = msg.topic.contains("/_chunks/");
            if is_chunk && client == "s1" && rng.chance(loss) {
                continue;
            }
            if rng.chance(dup) {
                w.broker.queue.push_back((client.clone(), msg.clone()));
            }
            w.deliver(&client, msg);
        }
        if w.devices["s1"].installed && w.manager_state("s1") == &ManagerState::Installed {
            break;
        }
        w.now += 31;
        w.poll_devices();
    }
    let d = &w.devices["s1"];
    assert!(d.installed, "not installed; errors {:?}", d.errors);
    assert_eq!(d.image, image);
    assert_eq!(w.manager_state("s1"), &ManagerState::Installed);
    // Every chunk handed out exactly once, across the restart too (bitmap persisted with data).
    for e in &d.events {
        if let DeviceEvent::Chunk {
            index,
            data,
            offset,
        } = e
        {
            assert!(seen_chunks.insert(*index), "chunk {index} handed out twice");
            assert_eq!(*offset, u64::from(*index) * u64::from(chunk));
            assert!(data.len() <= chunk as usize);
        }
    }
    assert_eq!(seen_chunks.len() as u32, count);
    // Bounded in flight: the device never held more than `window` chunk subscriptions at once.
    let max_subs = w.broker.max_chunk_subs.get("s1").copied().unwrap_or(0);
    assert!(
        max_subs >= 1 && max_subs <= window as usize,
        "{max_subs} > {window}"
    );
    // No error other than the expected kinds (stale messages after restart, dropped ready/update).
    for e in &d.errors {
        assert!(
            matches!(
                e,
                ProtocolError::WrongSession
                    | ProtocolError::UnexpectedMessage { .. }
                    | ProtocolError::Decrypt { message: "update" }
            ),
            "unexpected device error {e:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn reorder_duplicate_lose_and_resume(
        len in 1usize..6000,
        chunk in 16u32..700,
        window in 1u32..9,
        seed in any::<u64>(),
        dup in 0u64..40,
        loss in 0u64..40,
        restart in proptest::option::of(1usize..200),
    ) {
        scenario(len, chunk, window, seed, dup, loss, restart);
    }
}

#[test]
fn heavy_loss_still_completes() {
    scenario(20_000, 100, 16, 42, 10, 60, Some(50));
}
