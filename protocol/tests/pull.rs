//! Chunks served on request (large images: the broker keeps only what devices ask for): devices
//! ask for each window as they subscribe to it, the manager answers a device moving forward at
//! once, and answers a device asking again for what it asked before at most once a second.

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

fn pulled(image: Vec<u8>, chunk_size: u32) -> Arc<PreparedCampaign> {
    Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware { image },
            expires_at: NOW + 3600,
            chunk_size,
            release: None,
        })
        .unwrap()
        .served_on_request(),
    )
}

#[test]
fn devices_pull_every_window_without_waiting_for_a_timeout() {
    let image = firmware(40 * 512 + 100);
    let c = pulled(image.clone(), 512);
    assert!(c.pull());
    let mut w = World::new(Pki::new(), c);
    // Nothing is published up front: every chunk reaches the broker because a device asked.
    for i in 0..3 {
        let name = format!("s{i}");
        w.add_device(&name, "1.0.0", 4);
        w.start(target(&name));
    }
    w.run(); // no poll: no window timed out
    assert!(w.manager.errors.is_empty(), "{:?}", w.manager.errors);
    for (name, d) in &w.devices {
        // This test's manager publishes every request (the operator skips chunks it keeps
        // retained), so a device may see duplicates of its last window after it finished.
        assert!(
            d.errors.iter().all(|e| matches!(
                e,
                ProtocolError::UnexpectedMessage {
                    message: "chunk",
                    ..
                }
            )),
            "{name}: {:?}",
            d.errors
        );
        assert!(d.installed, "{name}");
        assert_eq!(d.image, image);
        assert_eq!(w.broker.max_chunk_subs[name.as_str()], 4);
    }
    // Each device asked once per window (41 chunks in windows of 4: 11 requests).
    for name in ["s0", "s1", "s2"] {
        let asked: usize = w
            .manager
            .events
            .iter()
            .filter(|(d, e)| d == name && matches!(e, ManagerEvent::ChunksPulled { .. }))
            .count();
        assert_eq!(asked, 11, "{name}");
    }
    // Without the pull, the same campaign waits for the devices' window timeout.
    let mut idle = World::new(Pki::new(), campaign(image.clone(), 512));
    idle.add_device("s0", "1.0.0", 4);
    idle.start(target("s0"));
    idle.run();
    assert!(!idle.devices["s0"].installed);
    assert!(!idle
        .manager
        .events
        .iter()
        .any(|(_, e)| matches!(e, ManagerEvent::ChunksRequested { .. })));
}

#[test]
fn the_manifest_says_pull_and_the_device_persists_it() {
    let mut w = World::new(Pki::new(), pulled(firmware(2000), 512));
    w.add_device("s0", "1.0.0", 1);
    // Hold every chunk request back: the transfer stays open after the first window.
    w.hook = Some(Box::new(|client, msg| {
        if client == "manager" && sans_bucket(&msg.topic).ends_with("/update/status") {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    }));
    w.start(target("s0"));
    w.run();
    let t = w.devices["s0"].session.state().transfer.clone().unwrap();
    assert!(t.manifest.pull);
    // A state written before this field existed reads as "no pull".
    let mut json = serde_json::to_value(&t.manifest).unwrap();
    json.as_object_mut().unwrap().remove("pull");
    let old: Manifest = serde_json::from_value(json).unwrap();
    assert!(!old.pull);
}
