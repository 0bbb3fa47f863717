//! In-memory MQTT "broker" and fleet harness: routes the sessions' Actions by topic, keeps retained
//! messages, and lets tests tamper with, drop, replay or swap messages in flight.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use sealed_ota_protocol::*;

pub const NOW: u64 = 1_800_000_000;

/// MQTT topic filter matching (`+` one level, `#` rest).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Verdict of a tamper hook on one delivery.
pub enum Verdict {
    Deliver,
    Drop,
}

pub type Hook = Box<dyn FnMut(&str, &mut Inbound) -> Verdict>;

#[derive(Default)]
pub struct Broker {
    pub subs: HashMap<String, Vec<String>>,
    pub retained: BTreeMap<String, Inbound>,
    pub queue: VecDeque<(String, Inbound)>,
    pub published: Vec<(String, Outbound)>,
    pub packets: HashMap<String, usize>,
    /// Most chunk topic filters a client held at once (bounded in-flight data).
    pub max_chunk_subs: HashMap<String, usize>,
}

impl Broker {
    fn count(&mut self, client: &str) {
        *self.packets.entry(client.to_string()).or_default() += 1;
    }

    pub fn apply(&mut self, client: &str, actions: Vec<Action>) {
        for a in actions {
            self.count(client);
            match a {
                Action::Subscribe(filters) => {
                    for f in &filters {
                        let list = self.subs.entry(client.to_string()).or_default();
                        if !list.contains(f) {
                            list.push(f.clone());
                        }
                        let hits: Vec<Inbound> = self
                            .retained
                            .iter()
                            .filter(|(t, _)| matches(f, t))
                            .map(|(_, m)| m.clone())
                            .collect();
                        for m in hits {
                            self.queue.push_back((client.to_string(), m));
                        }
                    }
                    let n = self.subs[client]
                        .iter()
                        .filter(|f| f.contains("/_chunks/"))
                        .count();
                    let max = self.max_chunk_subs.entry(client.to_string()).or_default();
                    *max = (*max).max(n);
                }
                Action::Unsubscribe(filters) => {
                    if let Some(list) = self.subs.get_mut(client) {
                        list.retain(|f| !filters.contains(f));
                    }
                }
                Action::Publish(o) => self.publish(client, o),
            }
        }
    }

    pub fn publish(&mut self, from: &str, o: Outbound) {
        self.published.push((from.to_string(), o.clone()));
        if o.retain {
            if o.payload.is_empty() {
                self.retained.remove(&o.topic);
            } else {
                self.retained.insert(o.topic.clone(), o.to_inbound());
            }
        }
        // MQTT 5 3.3.1.3: an empty retained PUBLISH clears the retained message and is still
        // forwarded to current subscribers.
        let mut targets: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, fs)| fs.iter().any(|f| matches(f, &o.topic)))
            .map(|(c, _)| c.clone())
            .collect();
        targets.sort();
        for c in targets {
            self.queue.push_back((c, o.to_inbound()));
        }
    }
}

pub struct Pki {
    pub ca: Arc<CertificateAuthority>,
    pub trust: Arc<TrustAnchor>,
    pub topics: Arc<TopicTree>,
    pub manager: Arc<Identity>,
}

impl Pki {
    pub fn new() -> Self {
        let ca = Arc::new(CertificateAuthority::generate("sealed-ota-ca", NOW, 30).unwrap());
        let trust = Arc::new(ca.trust_anchor());
        let topics = Arc::new(TopicTree::new("iot", "p1").unwrap());
        let manager = Arc::new(ca.issue(Role::Manager, "p1", NOW, 30).unwrap());
        Self {
            ca,
            trust,
            topics,
            manager,
        }
    }

    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            identity: self.manager.clone(),
            trust: self.trust.clone(),
            topics: self.topics.clone(),
        }
    }

    pub fn device(&self, name: &str, version: &str, window: u32) -> (DeviceSession, Vec<Action>) {
        let id = Arc::new(self.ca.issue(Role::Device, name, NOW, 30).unwrap());
        self.device_with(id, DeviceState::new(version), window)
    }

    pub fn device_with(
        &self,
        id: Arc<Identity>,
        state: DeviceState,
        window: u32,
    ) -> (DeviceSession, Vec<Action>) {
        DeviceSession::new(self.device_config(id, window), state)
    }

    /// The configuration of a device of this PKI (no release keys: add them to the result).
    pub fn device_config(&self, id: Arc<Identity>, window: u32) -> DeviceConfig {
        DeviceConfig {
            identity: id,
            trust: self.trust.clone(),
            topics: self.topics.clone(),
            manager_id: "p1".into(),
            max_packet_size: 256 * 1024,
            window,
            release_keys: Vec::new(),
        }
    }
}

pub fn firmware(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

pub fn campaign(image: Vec<u8>, chunk_size: u32) -> Arc<PreparedCampaign> {
    Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware { image },
            expires_at: NOW + 3600,
            chunk_size,
            release: None,
        })
        .unwrap(),
    )
}

pub fn target(name: &str) -> DeviceTarget {
    DeviceTarget {
        device_id: name.into(),
        pinned_fingerprint: None,
        allow_downgrade: false,
    }
}

/// One device as the emulator would run it: stores chunks, verifies the hash, installs.
pub struct DeviceApp {
    pub session: DeviceSession,
    pub image: Vec<u8>,
    pub events: Vec<DeviceEvent>,
    pub errors: Vec<ProtocolError>,
    pub installed: bool,
    pub credentials: Option<(String, String)>,
    pub max_chunk_events_seen: usize,
}

/// Manager with one session per device.
pub struct ManagerApp {
    pub sessions: HashMap<String, ManagerSession>,
    pub events: Vec<(String, ManagerEvent)>,
    pub errors: Vec<(String, ProtocolError)>,
    pub campaign: Arc<PreparedCampaign>,
}

pub struct World {
    pub pki: Pki,
    pub broker: Broker,
    pub manager: ManagerApp,
    pub devices: BTreeMap<String, DeviceApp>,
    pub hook: Option<Hook>,
    pub now: u64,
}

impl World {
    pub fn new(pki: Pki, campaign: Arc<PreparedCampaign>) -> Self {
        let mut broker = Broker::default();
        broker.apply(
            "manager",
            vec![Action::Subscribe(vec![
                pki.topics.ready_filter(),
                pki.topics.status_filter(),
            ])],
        );
        Self {
            pki,
            broker,
            manager: ManagerApp {
                sessions: HashMap::new(),
                events: vec![],
                errors: vec![],
                campaign,
            },
            devices: BTreeMap::new(),
            hook: None,
            now: NOW,
        }
    }

    pub fn publish_chunks(&mut self) {
        let pubs = self.manager.campaign.chunk_publishes(&self.pki.topics);
        for p in pubs {
            self.broker.publish("manager", p);
        }
    }

    pub fn add_device(&mut self, name: &str, version: &str, window: u32) {
        let (s, actions) = self.pki.device(name, version, window);
        self.add_device_session(name, s, actions);
    }

    /// Like `add_device`, returning the device's identity (to sign as the device: what a thief of
    /// its key could do).
    pub fn add_device_id(&mut self, name: &str, version: &str, window: u32) -> Arc<Identity> {
        let id = Arc::new(self.pki.ca.issue(Role::Device, name, NOW, 30).unwrap());
        let (s, actions) = self
            .pki
            .device_with(id.clone(), DeviceState::new(version), window);
        self.add_device_session(name, s, actions);
        id
    }

    /// Every message `from` published on a topic ending with `suffix`, in order.
    pub fn published_by(&self, from: &str, suffix: &str) -> Vec<Inbound> {
        self.broker
            .published
            .iter()
            .filter(|(f, o)| f == from && sans_bucket(&o.topic).ends_with(suffix))
            .map(|(_, o)| o.to_inbound())
            .collect()
    }

    /// The last message `from` published on a topic ending with `suffix`.
    pub fn last_from(&self, from: &str, suffix: &str) -> Inbound {
        self.broker
            .published
            .iter()
            .rev()
            .find(|(f, o)| f == from && sans_bucket(&o.topic).ends_with(suffix))
            .expect("published")
            .1
            .to_inbound()
    }

    /// The transcript hash of the session made of the last notify the manager published for
    /// `device` and the last ready `device` answered with, computed from the wire alone.
    pub fn transcript_of(&self, device: &str) -> [u8; 32] {
        let notify = self.last_from("manager", &format!("/{device}/notify"));
        let ready = self.last_from(device, "/ready");
        let (_, n) = wire::decode_notify(&notify.payload).unwrap();
        let (_, r) = wire::decode_ready(&ready.payload).unwrap();
        crypto::Transcript {
            manager_id: &n.manager_id,
            device_id: &n.device_id,
            campaign_id: &n.campaign_id,
            session_id: &n.session_id,
            manager_nonce: &n.nonce,
            device_nonce: &r.nonce,
            manager_ephemeral: &n.ephemeral,
            device_ephemeral: &r.ephemeral,
            manager_cert_fingerprint: &crypto::sha256(&n.manager_cert),
            device_cert_fingerprint: &crypto::sha256(&r.device_cert),
        }
        .hash()
    }

    pub fn add_device_session(&mut self, name: &str, s: DeviceSession, actions: Vec<Action>) {
        self.broker.apply(name, actions);
        self.devices.insert(
            name.into(),
            DeviceApp {
                session: s,
                image: Vec::new(),
                events: vec![],
                errors: vec![],
                installed: false,
                credentials: None,
                max_chunk_events_seen: 0,
            },
        );
    }

    pub fn start(&mut self, target: DeviceTarget) {
        let name = target.device_id.clone();
        let (s, actions) = ManagerSession::start(
            &self.pki.manager_config(),
            self.manager.campaign.clone(),
            target,
            self.now,
        )
        .unwrap();
        self.manager.sessions.insert(name, s);
        self.broker.apply("manager", actions);
    }

    /// Deliver queued messages until the queue is empty (or a step limit).
    pub fn run(&mut self) {
        let mut steps = 0;
        while let Some((client, mut msg)) = self.broker.queue.pop_front() {
            steps += 1;
            assert!(steps < 1_000_000, "message loop");
            if let Some(h) = self.hook.as_mut() {
                if let Verdict::Drop = h(&client, &mut msg) {
                    continue;
                }
            }
            self.deliver(&client, msg);
        }
    }

    pub fn deliver(&mut self, client: &str, msg: Inbound) {
        let now = self.now;
        if client == "manager" {
            let device = match self.pki.topics.parse(&msg.topic) {
                Ok(TopicKind::Ready { device }) | Ok(TopicKind::Status { device }) => device,
                _ => return,
            };
            let Some(s) = self.manager.sessions.get_mut(&device) else {
                return;
            };
            match s.handle(&msg, now) {
                Ok(out) => {
                    for e in &out.events {
                        if let ManagerEvent::ChunksRequested { indices }
                        | ManagerEvent::ChunksPulled { indices } = e
                        {
                            for &i in indices {
                                let p = self.manager.campaign.chunk_publish(&self.pki.topics, i);
                                self.broker.publish("manager", p);
                            }
                        }
                    }
                    self.manager
                        .events
                        .extend(out.events.into_iter().map(|e| (device.clone(), e)));
                    self.broker.apply("manager", out.actions);
                }
                Err(e) => self.manager.errors.push((device, e)),
            }
            return;
        }
        let Some(d) = self.devices.get_mut(client) else {
            return;
        };
        match d.session.handle(&msg, now) {
            Ok(out) => {
                let mut actions = out.actions;
                for e in &out.events {
                    match e {
                        DeviceEvent::Chunk { offset, data, .. } => {
                            let end = *offset as usize + data.len();
                            if d.image.len() < end {
                                d.image.resize(end, 0);
                            }
                            d.image[*offset as usize..end].copy_from_slice(data);
                        }
                        DeviceEvent::ImageComplete { manifest } => {
                            let ok = sha256(&d.image) == manifest.sha256;
                            let r = if ok {
                                Ok(())
                            } else {
                                Err("image hash mismatch".to_string())
                            };
                            d.installed = ok;
                            actions.extend(d.session.finish_install(r, now));
                        }
                        DeviceEvent::CredentialsDelivered { cert_pem, key_pem } => {
                            d.credentials = Some((cert_pem.clone(), key_pem.to_string()));
                        }
                        _ => {}
                    }
                }
                d.events.extend(out.events);
                self.broker.apply(client, actions);
            }
            Err(e) => d.errors.push(e),
        }
    }

    pub fn poll_devices(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.devices.keys().cloned().collect();
        for n in names {
            let a = self.devices.get_mut(&n).unwrap().session.poll(now);
            self.broker.apply(&n, a);
        }
    }

    pub fn manager_state(&self, device: &str) -> &ManagerState {
        self.manager.sessions[device].state()
    }

    pub fn installed_events(&self) -> usize {
        self.manager
            .events
            .iter()
            .filter(|(_, e)| matches!(e, ManagerEvent::Installed { .. }))
            .count()
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    sealed_ota_protocol::crypto::sha256(data)
}

/// The P-256 secret of an identity (through its PKCS#8 export).
pub fn secret_of(id: &Identity) -> p256::SecretKey {
    use p256::pkcs8::DecodePrivateKey;
    p256::SecretKey::from_pkcs8_der(&id.key_pkcs8_der()).unwrap()
}

/// Sign a body as message type `t` with an identity's key: what a holder of that key can send.
pub fn sign_as<T: serde::Serialize>(id: &Identity, t: u8, body: &T) -> Vec<u8> {
    wire::SignedEnvelope::sign(
        &p256::ecdsa::SigningKey::from(&secret_of(id)),
        t,
        wire::encode_msg(body),
    )
    .encode()
}

/// A receipt of `claim` signed with `id`, bound to `session_id` and `transcript`.
pub fn receipt_as(
    id: &Identity,
    device: &str,
    session_id: [u8; 16],
    transcript: [u8; 32],
    campaign: &str,
    claim: Claim,
) -> Inbound {
    let body = ReceiptBody {
        v: WIRE_VERSION,
        session_id,
        transcript,
        manager_id: "p1".into(),
        device_id: device.into(),
        campaign_id: campaign.into(),
        claim,
    };
    Inbound {
        topic: TopicTree::new("iot", "p1").unwrap().status(device),
        payload: sign_as(id, wire::TYPE_RECEIPT, &body),
        properties: Properties::default(),
    }
}

/// A key log that keeps every secret a device session reports.
#[derive(Debug, Default)]
pub struct Secrets(std::sync::Mutex<Vec<LoggedSecret>>);

/// (label, session id, secret).
type LoggedSecret = (String, [u8; 16], Vec<u8>);

impl KeyLog for Secrets {
    fn log(&self, label: &str, session_id: &[u8; 16], secret: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .push((label.to_string(), *session_id, secret.to_vec()));
    }
}

impl Secrets {
    /// The secrets logged under `label`.
    pub fn get(&self, label: &str) -> Vec<Vec<u8>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _, _)| l == label)
            .map(|(_, _, s)| s.clone())
            .collect()
    }
}

/// A topic without the bucket that ends a device's `ready` and status topics (so tests can match
/// on their leaf: `sans_bucket(t).ends_with("/ready")`).
pub fn sans_bucket(topic: &str) -> &str {
    match topic.rsplit_once('/') {
        Some((head, bucket))
            if !bucket.is_empty()
                && bucket.bytes().all(|b| b.is_ascii_digit())
                && !head.contains("/_chunks/") =>
        {
            head
        }
        _ => topic,
    }
}
