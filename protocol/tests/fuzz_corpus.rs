//! Replays the committed fuzz corpus (`protocol/fuzz/corpus/<target>/*`) through the decoders, so
//! every seed (and any crash input added there) is checked by a normal `cargo test`.

use std::sync::Arc;

use sealed_ota_protocol::wire::Decoder;
use sealed_ota_protocol::*;

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn corpus_replays_through_every_decoder() {
    let mut files = 0;
    for d in Decoder::ALL {
        let seeds = corpus(d.name());
        assert!(!seeds.is_empty(), "no seeds for {}", d.name());
        for (name, bytes) in &seeds {
            files += 1;
            let r = d.decode(bytes);
            if name.starts_with("valid") {
                assert!(r.is_ok(), "{}/{name}: {r:?}", d.name());
            }
            if name.starts_with("truncated") {
                assert!(r.is_err(), "{}/{name} decoded", d.name());
            }
            // Cross-feeding every seed to every other decoder must not panic either.
            for other in Decoder::ALL {
                let _ = other.decode(bytes);
            }
        }
    }
    assert!(files >= 24);
}

#[test]
fn corpus_replays_through_a_device_session() {
    let now = 1_800_000_000;
    let ca = CertificateAuthority::generate("ca", now, 10).unwrap();
    let config = DeviceConfig {
        identity: Arc::new(ca.issue(Role::Device, "s1", now, 10).unwrap()),
        trust: Arc::new(ca.trust_anchor()),
        topics: Arc::new(TopicTree::new("iot", "p1").unwrap()),
        manager_id: "p1".into(),
        max_packet_size: 0,
        window: 4,
        release_keys: Vec::new(),
    };
    let seeds = corpus("device_session");
    assert!(!seeds.is_empty());
    for (name, data) in seeds {
        if data.len() < 2 {
            continue; // the fuzz target ignores these too
        }
        let (mut s, _) = DeviceSession::new(config.clone(), DeviceState::new("1.0.0"));
        let topic = match data[0] % 3 {
            0 => "iot/p1/s1/notify",
            1 => "iot/p1/s1/update",
            _ => "iot/p1/_chunks/c1/0",
        };
        let msg = Inbound {
            topic: topic.into(),
            payload: data[1..].to_vec(),
            properties: Properties::default(),
        };
        // No seed carries a message signed by a manager of this CA: never accepted.
        let r = s.handle(&msg, now);
        assert!(
            r.as_ref()
                .map_or(true, |o| o.actions.is_empty() && o.events.is_empty()),
            "{name}: {r:?}"
        );
        assert!(s.poll(now + 100).is_empty());
    }
}
