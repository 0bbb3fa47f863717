//! MQTT interaction counts and per-device bytes of one campaign, measured by driving a real
//! `ManagerSession` and `DeviceSession` through an in-memory broker (sans-IO, as
//! `protocol/tests/common` does, but self-contained for the benchmark). Every count comes from the
//! actions the sessions emit, classified by topic as docs/protocol.md section 8 does: a PUBLISH
//! counts once towards the broker and once from it, a SUBSCRIBE or UNSUBSCRIBE once; the manager's
//! shared subscriptions and the once-per-campaign chunk publishes are not per-device. It owns no
//! timing and must not type in any expected count.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use sealed_ota_protocol::*;

const NOW: u64 = 1_800_000_000;
const MANAGER: &str = "manager";
const DEVICE: &str = "s1";

/// What went wrong while driving the sessions.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A protocol call failed where the honest run must succeed.
    #[error("{step}: {source}")]
    Protocol {
        /// Which step.
        step: &'static str,
        /// The error.
        #[source]
        source: ProtocolError,
    },
    /// The campaign did not end with a signed Installed receipt.
    #[error("{campaign} campaign ended in manager state {state}, device installed: {installed}")]
    NotInstalled {
        /// Firmware or rotation.
        campaign: &'static str,
        /// Final manager state.
        state: String,
        /// Whether the device stored an image with the manifest's hash / got credentials.
        installed: bool,
    },
}

/// Wrap an error of `step` (any error the crate converts into a `ProtocolError`).
fn at<E: Into<ProtocolError>>(step: &'static str) -> impl Fn(E) -> SimError {
    move |e| SimError::Protocol {
        step,
        source: e.into(),
    }
}

/// Which phase of docs/protocol.md section 8 an interaction belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// Notify, ready and the device's subscription to its notify + update topics.
    InnerChannel,
    /// Update and the signed status reports.
    Update,
    /// Window SUBSCRIBE / UNSUBSCRIBE of chunk topics.
    TransferControl,
    /// Chunk deliveries to the device.
    ChunkDelivery,
}

/// Per-device counts of one campaign, by phase.
#[derive(Debug, Default)]
pub struct Counts {
    by_phase: HashMap<Phase, u64>,
    /// Window SUBSCRIBE packets of the device (one per window).
    pub windows: u64,
    /// Bytes of every per-device PUBLISH payload of the manager (notify, update).
    pub wrap_bytes: u64,
}

impl Counts {
    fn get(&self, p: Phase) -> u64 {
        self.by_phase.get(&p).copied().unwrap_or(0)
    }
    /// Notify x2, ready x2 and the device's SUBSCRIBE.
    pub fn inner_channel(&self) -> u64 {
        self.get(Phase::InnerChannel)
    }
    /// Update and status PUBLISHes, each counted towards and from the broker.
    pub fn update(&self) -> u64 {
        self.get(Phase::Update)
    }
    /// Window SUBSCRIBE and UNSUBSCRIBE packets.
    pub fn transfer_control(&self) -> u64 {
        self.get(Phase::TransferControl)
    }
    /// Chunk PUBLISHes delivered to the device.
    pub fn chunk_deliveries(&self) -> u64 {
        self.get(Phase::ChunkDelivery)
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
fn matches(filter: &str, topic: &str) -> bool {
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

/// In-memory broker with retained messages that counts what concerns the one device.
struct Net {
    topics: Arc<TopicTree>,
    subs: HashMap<String, Vec<String>>,
    retained: BTreeMap<String, Inbound>,
    queue: VecDeque<(String, Inbound)>,
    counts: Counts,
}

impl Net {
    fn new(topics: Arc<TopicTree>) -> Self {
        Self {
            topics,
            subs: HashMap::new(),
            retained: BTreeMap::new(),
            queue: VecDeque::new(),
            counts: Counts::default(),
        }
    }

    /// Phase of a per-device message on `topic`; `None` for chunk topics (shared by all devices)
    /// and topics outside the tree.
    fn phase(&self, topic: &str) -> Option<Phase> {
        match self.topics.parse(topic).ok()? {
            TopicKind::Notify { .. } | TopicKind::Ready { .. } => Some(Phase::InnerChannel),
            TopicKind::Update { .. } | TopicKind::Status { .. } => Some(Phase::Update),
            TopicKind::Chunk { .. } => None,
        }
    }

    /// Phase of a device's SUBSCRIBE or UNSUBSCRIBE: chunk filters belong to the transfer; the
    /// subscription to its own notify and update topics is made once, in the inner channel.
    fn filters_phase(&self, filters: &[String]) -> Phase {
        let chunk = |f: &String| matches!(self.topics.parse(f), Ok(TopicKind::Chunk { .. }));
        if filters.iter().any(chunk) {
            Phase::TransferControl
        } else {
            Phase::InnerChannel
        }
    }

    fn count(&mut self, phase: Phase) {
        *self.counts.by_phase.entry(phase).or_default() += 1;
    }

    fn apply(&mut self, client: &str, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Subscribe(filters) => {
                    if client == DEVICE {
                        let phase = self.filters_phase(&filters);
                        if phase == Phase::TransferControl {
                            self.counts.windows += 1;
                        }
                        self.count(phase);
                    }
                    for f in &filters {
                        self.subs.entry(client.into()).or_default().push(f.clone());
                        let hits: Vec<Inbound> = self
                            .retained
                            .iter()
                            .filter(|(t, _)| matches(f, t))
                            .map(|(_, m)| m.clone())
                            .collect();
                        for m in hits {
                            self.deliver(client, m);
                        }
                    }
                }
                Action::Unsubscribe(filters) => {
                    if client == DEVICE {
                        let phase = self.filters_phase(&filters);
                        self.count(phase);
                    }
                    if let Some(list) = self.subs.get_mut(client) {
                        list.retain(|f| !filters.contains(f));
                    }
                }
                Action::Publish(o) => self.publish(client, o),
            }
        }
    }

    /// A PUBLISH towards the broker, then one delivery per matching subscriber.
    fn publish(&mut self, from: &str, o: Outbound) {
        let phase = self.phase(&o.topic);
        if let Some(p) = phase {
            self.count(p);
            if from == MANAGER {
                self.counts.wrap_bytes += o.payload.len() as u64;
            }
        }
        if o.retain {
            if o.payload.is_empty() {
                self.retained.remove(&o.topic);
            } else {
                self.retained.insert(o.topic.clone(), o.to_inbound());
            }
        }
        let mut targets: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, fs)| fs.iter().any(|f| matches(f, &o.topic)))
            .map(|(c, _)| c.clone())
            .collect();
        targets.sort();
        for c in targets {
            self.deliver(&c, o.to_inbound());
        }
    }

    /// A PUBLISH from the broker to `client`.
    fn deliver(&mut self, client: &str, m: Inbound) {
        let phase = self.phase(&m.topic).unwrap_or(Phase::ChunkDelivery);
        self.count(phase);
        self.queue.push_back((client.to_string(), m));
    }
}

/// The CA, the manager identity and the topic tree of one simulated campaign.
struct Pki {
    ca: Arc<CertificateAuthority>,
    trust: Arc<TrustAnchor>,
    topics: Arc<TopicTree>,
    manager: Arc<Identity>,
}

impl Pki {
    fn new() -> Result<Self, SimError> {
        let ca = Arc::new(CertificateAuthority::generate("ca", NOW, 30).map_err(at("ca"))?);
        let manager = Arc::new(
            ca.issue(Role::Manager, "p1", NOW, 30)
                .map_err(at("manager identity"))?,
        );
        Ok(Self {
            trust: Arc::new(ca.trust_anchor()),
            topics: Arc::new(TopicTree::new("iot", "p1").map_err(at("topics"))?),
            ca,
            manager,
        })
    }
}

/// One manager and one device through one campaign.
struct World {
    net: Net,
    manager: ManagerSession,
    device: DeviceSession,
    campaign: Arc<PreparedCampaign>,
    image: Vec<u8>,
    installed: bool,
}

impl World {
    fn new(pki: &Pki, campaign: PreparedCampaign, window: u32) -> Result<Self, SimError> {
        let campaign = Arc::new(campaign);
        let topics = pki.topics.clone();
        let mcfg = ManagerConfig {
            identity: pki.manager.clone(),
            trust: pki.trust.clone(),
            topics: topics.clone(),
        };
        let dcfg = DeviceConfig {
            identity: Arc::new(
                pki.ca
                    .issue(Role::Device, DEVICE, NOW, 30)
                    .map_err(at("device identity"))?,
            ),
            trust: pki.trust.clone(),
            topics: topics.clone(),
            manager_id: "p1".into(),
            max_packet_size: 0,
            window,
            release_keys: Vec::new(),
        };
        let mut net = Net::new(topics.clone());
        // Once per manager, shared by every device (not counted).
        net.apply(
            MANAGER,
            vec![Action::Subscribe(vec![
                topics.ready_filter(),
                topics.status_filter(),
            ])],
        );
        // Once per campaign, shared by every device (not counted; their deliveries are).
        for o in campaign.chunk_publishes(&topics) {
            net.publish(MANAGER, o);
        }
        let (device, actions) = DeviceSession::new(dcfg, DeviceState::new("1.0.0"));
        net.apply(DEVICE, actions);
        let target = DeviceTarget {
            device_id: DEVICE.into(),
            pinned_fingerprint: None,
            allow_downgrade: false,
        };
        let (manager, actions) =
            ManagerSession::start(&mcfg, campaign.clone(), target, NOW).map_err(at("start"))?;
        net.apply(MANAGER, actions);
        Ok(Self {
            net,
            manager,
            device,
            campaign,
            image: Vec::new(),
            installed: false,
        })
    }

    /// Deliver until the broker's queue is empty.
    fn run(&mut self) -> Result<(), SimError> {
        while let Some((client, msg)) = self.net.queue.pop_front() {
            if client == MANAGER {
                let out = self
                    .manager
                    .handle(&msg, NOW)
                    .map_err(at("manager handle"))?;
                for e in &out.events {
                    if let ManagerEvent::ChunksRequested { indices } = e {
                        for &i in indices {
                            let o = self.campaign.chunk_publish(&self.net.topics, i);
                            self.net.publish(MANAGER, o);
                        }
                    }
                }
                self.net.apply(MANAGER, out.actions);
                continue;
            }
            let out = self.device.handle(&msg, NOW).map_err(at("device handle"))?;
            let mut actions = out.actions;
            for e in out.events {
                match e {
                    DeviceEvent::Chunk { offset, data, .. } => {
                        let end = offset as usize + data.len();
                        if self.image.len() < end {
                            self.image.resize(end, 0);
                        }
                        self.image[offset as usize..end].copy_from_slice(&data);
                    }
                    DeviceEvent::ImageComplete { manifest } => {
                        self.installed = crypto::sha256(&self.image) == manifest.sha256;
                        let r = if self.installed {
                            Ok(())
                        } else {
                            Err("image hash mismatch".into())
                        };
                        actions.extend(self.device.finish_install(r, NOW));
                    }
                    DeviceEvent::CredentialsDelivered { .. } => self.installed = true,
                    _ => {}
                }
            }
            self.net.apply(DEVICE, actions);
        }
        Ok(())
    }

    fn finish(mut self, campaign: &'static str) -> Result<Counts, SimError> {
        self.run()?;
        if self.manager.state() != &ManagerState::Installed || !self.installed {
            return Err(SimError::NotInstalled {
                campaign,
                state: format!("{:?}", self.manager.state()),
                installed: self.installed,
            });
        }
        Ok(self.net.counts)
    }
}

/// One firmware campaign of `image_bytes` in chunks of `chunk_bytes`, device window `window`.
pub fn firmware(image_bytes: usize, chunk_bytes: u32, window: u32) -> Result<Counts, SimError> {
    let pki = Pki::new()?;
    let image: Vec<u8> = (0..image_bytes).map(|i| (i * 31 % 251) as u8).collect();
    let campaign = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "fw1".into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware { image },
        expires_at: NOW + 3600,
        chunk_size: chunk_bytes,
        release: None,
    })
    .map_err(at("prepare firmware"))?;
    World::new(&pki, campaign, window)?.finish("firmware")
}

/// One credential-rotation campaign (the manager delivers key and certificate).
pub fn rotation() -> Result<Counts, SimError> {
    let pki = Pki::new()?;
    let campaign = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "rot1".into(),
        target_version: "1.0.0".into(),
        payload: CampaignPayload::RotateCredentials {
            mode: RotationMode::DeliverKey,
            ca: pki.ca.clone(),
            validity_days: 90,
        },
        expires_at: NOW + 3600,
        chunk_size: 1024,
        release: None,
    })
    .map_err(at("prepare rotation"))?;
    World::new(&pki, campaign, 8)?.finish("rotation")
}
