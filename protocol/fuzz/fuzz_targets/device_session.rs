//! Fuzz a device session: arbitrary payloads on its notify, update and chunk topics must never
//! panic (every rejection is a typed error).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sealed_ota_protocol::*;

struct Fixture {
    config: DeviceConfig,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = 1_800_000_000;
        let ca = CertificateAuthority::generate("ca", now, 10).unwrap();
        let id = Arc::new(ca.issue(Role::Device, "s1", now, 10).unwrap());
        Fixture {
            config: DeviceConfig {
                identity: id,
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::new(TopicTree::new("iot", "p1").unwrap()),
                manager_id: "p1".into(),
                max_packet_size: 0,
                window: 4,
                release_keys: Vec::new(),
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let f = fixture();
    let (mut s, _) = DeviceSession::new(f.config.clone(), DeviceState::new("1.0.0"));
    let topic = match data[0] % 3 {
        0 => "iot/p1/s1/notify",
        1 => "iot/p1/s1/update",
        _ => "iot/p1/_chunks/c1/0",
    };
    let msg = Inbound { topic: topic.into(), payload: data[1..].to_vec(), properties: Properties::default() };
    let _ = s.handle(&msg, 1_800_000_000);
    let _ = s.poll(1_800_000_100);
});
