//! Forward secrecy: every session uses fresh ephemeral keys on both sides, the manager erases its
//! own when the session ends, and someone who later holds both static private keys and recorded
//! every message of a session still cannot derive its session keys (hence not the content key or a
//! delivered private key).

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

#[test]
fn ephemeral_keys_are_fresh_per_session_and_erased_at_its_end() {
    let mut w = World::new(Pki::new(), campaign(firmware(1500), 512));
    w.publish_chunks();
    let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
    let (mut s, a) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 4);
    let secrets = Arc::new(Secrets::default());
    s.set_key_log(secrets.clone());
    w.add_device_session("s1", s, a);
    // Three sessions of the same campaign with the same device (a manager that restarted twice
    // before the receipt reached it: the device answers each new session).
    let mut manager_eph = HashSet::new();
    let mut device_eph = HashSet::new();
    for round in 0..3 {
        w.now = NOW + 10 * round;
        w.start(target("s1"));
        assert!(w.manager.sessions["s1"].holds_ephemeral_key());
        w.run();
        assert_eq!(w.manager_state("s1"), &ManagerState::Installed, "{round}");
        assert!(
            !w.manager.sessions["s1"].holds_ephemeral_key(),
            "the manager's ephemeral key outlived its session"
        );
        let (_, n) = wire::decode_notify(&w.last_from("manager", "/s1/notify").payload).unwrap();
        let (_, r) = wire::decode_ready(&w.last_from("s1", "/ready").payload).unwrap();
        assert!(manager_eph.insert(n.ephemeral), "manager ephemeral reused");
        assert!(device_eph.insert(r.ephemeral), "device ephemeral reused");
    }
    let m2d = secrets.get("session-m2d");
    let d2m = secrets.get("session-d2m");
    assert_eq!(m2d.len(), 3);
    let distinct: HashSet<&Vec<u8>> = m2d.iter().chain(&d2m).collect();
    assert_eq!(distinct.len(), 6, "session keys repeat");

    // Later both static keys leak. With them and the recorded transcript, the static ECDH term and
    // the transcript hash are known; the ephemeral term is not, and without it the update of the
    // last session does not open (its real key, from the key log, does).
    let th = w.transcript_of("s1");
    let ss = crypto::ecdh(&secret_of(&w.pki.manager), &secret_of(&id).public_key());
    let update = wire::decode_update(&w.last_from("manager", "/s1/update").payload).unwrap();
    let aad = crypto::session_aad(b"sealed-ota/v2/update", &th, &[]);
    let real: [u8; 32] = m2d[2].clone().try_into().unwrap();
    assert!(crypto::open(&real, &update.nonce, &aad, &update.ct).is_some());
    let (_, n) = wire::decode_notify(&w.last_from("manager", "/s1/notify").payload).unwrap();
    let (_, r) = wire::decode_ready(&w.last_from("s1", "/ready").payload).unwrap();
    let static_only_guesses = [
        [0u8; 32],
        *ss,
        // ECDH of each static secret with the other side's ephemeral public key.
        *crypto::ecdh(
            &secret_of(&w.pki.manager),
            &crypto::parse_public(&r.ephemeral).unwrap(),
        ),
        *crypto::ecdh(
            &secret_of(&id),
            &crypto::parse_public(&n.ephemeral).unwrap(),
        ),
    ];
    for ee in static_only_guesses {
        let keys = crypto::derive_session_keys(&th, &ee, &ss);
        assert!(crypto::open(&keys.m2d, &update.nonce, &aad, &update.ct).is_none());
    }
}
