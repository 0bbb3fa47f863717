//! What a device (or a thief of its key) can make the manager do is bounded: chunk republishing is
//! capped per request, rate-limited and budgeted per session, and device-controlled text reaches the
//! operator bounded and without control characters.

mod common;

use std::sync::Arc;

use common::*;
use sealed_ota_protocol::*;

/// A session in transfer whose device key and session keys the test holds.
struct Insider {
    w: World,
    id: Arc<Identity>,
    d2m: [u8; 32],
    th: [u8; 32],
    seq: u32,
}

impl Insider {
    fn new(image_len: usize, chunk: u32) -> Self {
        Self::with(campaign(firmware(image_len), chunk))
    }

    fn with(c: Arc<PreparedCampaign>) -> Self {
        let mut w = World::new(Pki::new(), c);
        // No chunk reaches the device: the transfer stays open (also when it pulls).
        w.hook = Some(Box::new(|client, msg| {
            if client == "s1" && msg.topic.contains("/_chunks/") {
                Verdict::Drop
            } else {
                Verdict::Deliver
            }
        }));
        let id = Arc::new(w.pki.ca.issue(Role::Device, "s1", NOW, 30).unwrap());
        let (mut s, a) = w.pki.device_with(id.clone(), DeviceState::new("1.0.0"), 4);
        let secrets = Arc::new(Secrets::default());
        s.set_key_log(secrets.clone());
        w.add_device_session("s1", s, a);
        w.start(target("s1"));
        w.run(); // chunks never published: the transfer stays open
        let d2m = secrets.get("session-d2m")[0].clone().try_into().unwrap();
        let th = w.transcript_of("s1");
        Self {
            w,
            id,
            d2m,
            th,
            seq: 100,
        }
    }

    /// A signed, correctly encrypted status of this session.
    fn status(&mut self, body: &wire::StatusBody) -> Inbound {
        self.seq += 1;
        let aad = crypto::session_aad(b"sealed-ota/v2/status", &self.th, &self.seq.to_be_bytes());
        let (nonce, ct) = crypto::seal(&self.d2m, &aad, &wire::encode_msg(body));
        let sm = wire::StatusMsg {
            v: WIRE_VERSION,
            session_id: self.w.manager.sessions["s1"].session_id(),
            seq: self.seq,
            nonce,
            ct,
        };
        Inbound {
            topic: "iot/p1/s1/update/status/232".into(),
            payload: sign_as(&self.id, wire::TYPE_STATUS, &sm),
            properties: Properties::default(),
        }
    }

    fn request(&mut self, indices: Vec<u32>, now: u64) -> Result<Vec<u32>, ProtocolError> {
        let msg = self.status(&wire::StatusBody::ChunksRequested { indices });
        let s = self.w.manager.sessions.get_mut("s1").unwrap();
        let out = s.handle(&msg, now)?;
        Ok(out
            .events
            .into_iter()
            .flat_map(|e| match e {
                ManagerEvent::ChunksRequested { indices }
                | ManagerEvent::ChunksPulled { indices } => indices,
                _ => Vec::new(),
            })
            .collect())
    }
}

#[test]
fn chunk_requests_are_capped_rate_limited_and_budgeted() {
    // 400 chunks of 1 KiB.
    let mut t = Insider::new(400 * 1024, 1024);
    let all: Vec<u32> = (0..400).collect();
    // One request names every chunk, many times over: at most 256 distinct indices answered.
    let mut asked = all.clone();
    asked.extend(all.iter().copied());
    let first = t.request(asked, NOW).unwrap();
    assert_eq!(first.len(), manager::MAX_REPUBLISH_PER_REQUEST);
    // Again in the same second: refused.
    assert!(matches!(
        t.request(vec![1], NOW),
        Err(ProtocolError::RateLimited(_))
    ));
    // Once a second, until the session's budget (4 images + 256 chunks) is spent.
    let mut republished = first.len() as u64;
    let mut now = NOW;
    loop {
        now += 1;
        match t.request(all.clone(), now) {
            Ok(got) => republished += got.len() as u64,
            Err(ProtocolError::RateLimited(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(now < NOW + 100, "no budget");
    }
    assert!(republished <= 4 * 400 + 256, "{republished}");
    assert!(republished >= 4 * 400, "{republished}");
    // The device's own, honest requests still work in a fresh session.
    let mut honest = Insider::new(400 * 1024, 1024);
    assert_eq!(
        honest.request(vec![0, 1, 2, 3], NOW).unwrap(),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn a_pull_moving_forward_is_answered_at_once_and_a_repeat_at_most_once_a_second() {
    let c = Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware {
                image: firmware(400 * 1024),
            },
            expires_at: NOW + 3600,
            chunk_size: 1024,
            release: None,
        })
        .unwrap()
        .served_on_request(),
    );
    let mut t = Insider::with(c);
    // The device's own first window (0..4) was asked when it subscribed; the next windows are
    // answered back to back, in the same second.
    for start in (4..64).step_by(4) {
        let window: Vec<u32> = (start..start + 4).collect();
        assert_eq!(t.request(window.clone(), NOW).unwrap(), window);
    }
    // Asking again for what it asked before is a retry: one is answered, the next within the
    // same second refused (also when it adds a fresh index)...
    assert_eq!(t.request(vec![10], NOW).unwrap(), vec![10]);
    assert!(matches!(
        t.request(vec![11, 64], NOW),
        Err(ProtocolError::RateLimited(_))
    ));
    // ...and answered a second later.
    assert_eq!(t.request(vec![11, 64], NOW + 1).unwrap(), vec![11, 64]);
    // Moving forward is answered at once, however often: the whole image at most (each index is
    // fresh once), within the same per-session budget as every other request.
    let mut now = NOW + 1;
    let mut fresh = 65;
    let mut answered = 0u64;
    loop {
        let ask: Vec<u32> = (fresh..(fresh + 256).min(400)).collect();
        if ask.is_empty() {
            break;
        }
        answered += t.request(ask.clone(), now).unwrap().len() as u64;
        fresh += ask.len() as u32;
    }
    assert_eq!(answered, 400 - 65);
    // Past the image only retries remain: once a second, until the budget is spent.
    let all: Vec<u32> = (0..400).collect();
    let mut spent = 0;
    loop {
        now += 1;
        match t.request(all.clone(), now) {
            Ok(got) => spent += got.len(),
            Err(ProtocolError::RateLimited(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(now < NOW + 100, "no budget");
    }
    assert!(spent <= 4 * 400 + 256, "{spent}");
}

#[test]
fn device_text_reaches_the_operator_bounded() {
    // A device whose running version is 10 KiB of text with escape sequences and newlines.
    let mut w = World::new(Pki::new(), campaign(firmware(1000), 512));
    w.publish_chunks();
    let hostile = format!("1.0.0\n\u{1b}[2J{}", "A".repeat(10_000));
    w.add_device("s1", &hostile, 4);
    w.start(target("s1"));
    w.run();
    let running = w
        .manager
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ManagerEvent::HandshakeCompleted {
                running_version, ..
            } => Some(running_version.clone()),
            _ => None,
        })
        .unwrap();
    assert!(running.chars().count() <= 64, "{}", running.len());
    assert!(!running.chars().any(char::is_control));
    // The device refuses (it cannot read its own version); the reason it signs is bounded too.
    let ManagerState::Rejected(reason) = w.manager_state("s1") else {
        panic!("{:?}", w.manager_state("s1"))
    };
    let RejectReason::InvalidVersion(text) = reason else {
        panic!("{reason:?}")
    };
    assert!(text.chars().count() <= 64 && !text.chars().any(char::is_control));
    // A declined update with a huge reason.
    let mut w = World::new(Pki::new(), campaign(firmware(1000), 512));
    w.add_device("s1", "1.0.0", 4);
    w.start(target("s1"));
    w.run();
    let d = w.devices.get_mut("s1").unwrap();
    let a = d.session.decline(&"why\n".repeat(5000), w.now);
    w.broker.apply("s1", a);
    w.run();
    let ManagerState::Rejected(RejectReason::DeclinedByDevice(text)) = w.manager_state("s1") else {
        panic!()
    };
    assert!(text.chars().count() <= 256 && !text.contains('\n'));
}
