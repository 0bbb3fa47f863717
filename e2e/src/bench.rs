//! The baselines and probes of `make bench` (DESIGN.md section 5): a fleet of plain MQTT 5
//! subscribers built with the emulator's own client stack (rumqttc v5 over rustls, the same
//! connection options and pacing) that measures how long Mosquitto takes to relay bytes with no
//! crypto and no Kubernetes, the devices' windowed pull with and without the device-side work
//! (open each chunk message, store it at its offset, check the whole image), and the paper's
//! scheme (the whole image encrypted per device and published to each device's topic, with and
//! without storing); plus the probes that read the product's figures (the
//! operator's Prometheus metrics, a process's resident memory) and the budget table with its
//! JSON summary. The benchmark binary `sealed-ota-bench` strings them together.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use sealed_ota_device::store::Download;
use sealed_ota_device_emulator::mqtt_io::{device_options, BrokerEndpoint};
use sealed_ota_device_emulator::pacing::ConnectPacer;
use sealed_ota_protocol::crypto::{sha256, ChunkCipher};
use sealed_ota_protocol::sealer::SealedFirmware;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::TestBed;

/// The emulator's defaults (`run --connect-rate 500 --connect-concurrency 64`), so the
/// baseline fleet connects the way the product's devices do.
const CONNECT_RATE: f64 = 500.0;
const CONNECT_CONCURRENCY: usize = 64;
/// The emulator's default Maximum Packet Size (`run --max-packet-size`).
const MAX_PACKET_SIZE: u32 = 256 * 1024;
/// How long one relay round may take before its missing messages count as lost.
const ROUND_TIMEOUT: Duration = Duration::from_secs(600);

/// What one relay round measured.
#[derive(Debug, Clone)]
pub struct RelayRound {
    /// Seconds from the first message any subscriber received (or, with `from_publish`, from
    /// the first publish) to the moment the last subscriber had all of its messages.
    pub seconds: f64,
    /// Payload bytes the publisher sent.
    pub published_bytes: u64,
    /// Messages that never arrived before the round's timeout (summed over subscribers).
    pub lost_messages: u64,
    /// Messages that did not open or store, and stored images that failed their check.
    pub corrupt_messages: u64,
}

/// Where one round stands; subscriber tasks update it lock-free.
#[derive(Debug)]
struct Round {
    /// Topic prefix this round publishes under.
    prefix: String,
    /// Messages each subscriber must receive.
    expected: u64,
    /// What subscribers do with each message besides counting it.
    work: Work,
    /// Where subscribers store what they opened, as devices do (rounds with device-side work).
    storage: Option<Storage>,
    /// Windowed pull of retained messages (pull round): chunk topics per subscription.
    window: Option<u64>,
    received: Vec<AtomicU64>,
    corrupt: AtomicU64,
    first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    completed: AtomicU64,
    done: Notify,
}

/// What a subscriber does with each message it receives besides counting it.
#[derive(Debug, Clone)]
enum Work {
    /// Nothing: the transport alone.
    Count,
    /// The paper's devices: decrypt under the device's own key.
    PaperDecrypt(PaperKeys),
    /// The product's devices: open the chunk message (Merkle proof, then AES-GCM under the
    /// content key), with the protocol's own code.
    OpenChunk(Arc<SealedFirmware>),
}

/// The plaintext store of a round with device-side work: one file per subscriber, each chunk
/// written at its offset with the devices' own download code, the whole image checked (size,
/// SHA-256) once complete, as a device checks it before installing.
#[derive(Debug)]
struct Storage {
    dir: std::path::PathBuf,
    chunk_size: u64,
    image_size: u64,
    image_sha256: [u8; 32],
}

impl Storage {
    fn download(&self, subscriber: usize) -> Download {
        Download::at(self.dir.join(format!("{subscriber}.img")), false)
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone)]
struct PaperKeys {
    tag: String,
    chunk_count: u32,
}

impl PaperKeys {
    /// Device `i`'s key: both sides derive it, so no handshake muddies the relay figure.
    fn key(&self, i: usize) -> [u8; 32] {
        sha256(format!("{}/{i}", self.tag).as_bytes())
    }
}

/// What a pulling subscriber does after a window completed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NextWindow {
    unsubscribe: Vec<String>,
    subscribe: Vec<String>,
}

impl Round {
    fn new(prefix: String, expected: u64, subscribers: usize, work: Work) -> Self {
        Round {
            prefix,
            expected,
            work,
            storage: None,
            window: None,
            received: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
            corrupt: AtomicU64::new(0),
            first: OnceLock::new(),
            last: Mutex::new(None),
            completed: AtomicU64::new(0),
            done: Notify::new(),
        }
    }

    /// Topics `from..from + window` (capped at the expected count) of a pull round.
    fn window_topics(&self, from: u64) -> Vec<String> {
        let window = self.window.unwrap_or(self.expected);
        (from..(from + window).min(self.expected))
            .map(|j| format!("{}{j}", self.prefix))
            .collect()
    }

    /// Subscriber `i` received `payload` on `topic`; in a pull round, the window to move to
    /// when this message completed one.
    fn deliver(&self, i: usize, topic: &str, payload: &[u8]) -> Option<NextWindow> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        self.first.get_or_init(Instant::now);
        if !self.work_on(i, rest, payload) {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let received = self.received[i].fetch_add(1, Ordering::Relaxed) + 1;
        if received == self.expected {
            let stored_ok = self.storage.as_ref().is_none_or(|st| {
                st.download(i)
                    .check(st.image_size, &st.image_sha256)
                    .is_ok()
            });
            if !stored_ok {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            *lock(&self.last) = Some(Instant::now());
            if self.completed.fetch_add(1, Ordering::Relaxed) + 1 == self.received.len() as u64 {
                self.done.notify_one();
            }
        }
        let window = self.window?;
        (received % window == 0 || received == self.expected).then(|| NextWindow {
            unsubscribe: self.window_topics(received.saturating_sub(1) / window * window),
            subscribe: self.window_topics(received),
        })
    }

    /// Subscriber `i`'s device-side work on one message (`rest`: its topic after the prefix):
    /// whether it opened (and stored) it.
    fn work_on(&self, i: usize, rest: &str, payload: &[u8]) -> bool {
        let opened = match &self.work {
            Work::Count => return true,
            Work::PaperDecrypt(paper) => {
                // rest = "<device>/<chunk>"
                let index = rest.rsplit('/').next().and_then(|s| s.parse::<u32>().ok());
                index.and_then(|index| {
                    let cipher = ChunkCipher::new(&paper.key(i));
                    let plain = cipher.decrypt(&paper.tag, index, paper.chunk_count, payload)?;
                    Some((index, plain))
                })
            }
            Work::OpenChunk(sealed) => sealed.open_chunk_payload(payload).ok(),
        };
        let Some((index, plain)) = opened else {
            return false;
        };
        self.storage.as_ref().is_none_or(|st| {
            st.download(i)
                .write_chunk(u64::from(index) * st.chunk_size, &plain)
                .is_ok()
        })
    }

    fn lost(&self) -> u64 {
        self.received
            .iter()
            .map(|r| self.expected.saturating_sub(r.load(Ordering::Relaxed)))
            .sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `n` plain subscribers and one publisher on the test bed's TLS listener.
#[derive(Debug)]
pub struct RelayFleet {
    tag: String,
    subscribers: usize,
    publisher: AsyncClient,
    subscriber_clients: Vec<AsyncClient>,
    round: Arc<RwLock<Option<Arc<Round>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RelayFleet {
    /// Connects `n` subscribers (paced like the emulator's devices, each subscribed to the
    /// shared topic and to its own) and a publisher with the operator's connection options.
    pub async fn connect(bed: &TestBed, n: usize) -> Result<RelayFleet> {
        let tag = format!("bench-{:08x}", rand::random::<u32>());
        let ca = std::fs::read(&bed.ca_file).context("reading the test bed CA")?;
        let endpoint = BrokerEndpoint::parse(&bed.mqtts_url, Some(ca))?;
        let cert = std::fs::read_to_string(&bed.client_cert)?;
        let key = std::fs::read_to_string(&bed.client_key)?;
        let tls = endpoint.device_tls("bench", &cert, &key)?;
        let round: Arc<RwLock<Option<Arc<Round>>>> = Arc::new(RwLock::new(None));
        let pacer = Arc::new(ConnectPacer::new(CONNECT_RATE, CONNECT_CONCURRENCY));
        let ready = Arc::new(AtomicU64::new(0));
        let all_ready = Arc::new(Notify::new());
        let mut tasks = Vec::with_capacity(n + 1);
        let mut subscriber_clients = Vec::with_capacity(n);
        for i in 0..n {
            let options = device_options(
                &endpoint,
                &format!("{tag}-s{i:05}"),
                tls.clone(),
                MAX_PACKET_SIZE,
                Duration::from_secs(60),
            );
            let filters = vec![format!("{tag}/shared/+"), format!("{tag}/own/{i}/+")];
            let (client, eventloop) = AsyncClient::new(options, 64);
            subscriber_clients.push(client.clone());
            tasks.push(tokio::spawn(subscriber(
                i,
                client,
                eventloop,
                filters,
                Arc::clone(&pacer),
                Arc::clone(&round),
                Arc::clone(&ready),
                Arc::clone(&all_ready),
                n as u64,
            )));
        }
        let mut options = device_options(
            &endpoint,
            &format!("{tag}-publisher"),
            tls.clone(),
            16 * 1024 * 1024,
            Duration::from_secs(60),
        );
        // The operator's client keeps rumqttc's default outgoing in-flight window.
        options.set_outgoing_inflight_upper_limit(u16::MAX);
        let (publisher, mut eventloop) = AsyncClient::new(options, 1024);
        tasks.push(tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
        let wait = all_ready.notified();
        if ready.load(Ordering::Relaxed) < n as u64
            && tokio::time::timeout(Duration::from_secs(300), wait)
                .await
                .is_err()
        {
            bail!(
                "only {}/{n} relay subscribers connected and subscribed within 300 s",
                ready.load(Ordering::Relaxed)
            );
        }
        Ok(RelayFleet {
            tag,
            subscribers: n,
            publisher,
            subscriber_clients,
            round,
            tasks,
        })
    }

    /// Mosquitto relaying `payloads` (published once each, QoS 1, on one topic per payload) to
    /// every subscriber: no crypto on either side, no Kubernetes. Timed from the first delivery
    /// to the last subscriber's last message, as the emulator times the product's data phase.
    pub async fn shared_round(&self, name: &str, payloads: &[Vec<u8>]) -> Result<RelayRound> {
        let prefix = format!("{}/shared/", self.tag);
        let round = self.begin(prefix.clone(), payloads.len() as u64);
        let published = self
            .publish_all(&prefix, payloads.iter().cloned(), false)
            .await
            .with_context(|| format!("{name}: publishing"))?;
        self.finish(round, None, published).await
    }

    /// The product's transport without its crypto: `payloads` published once, retained, one topic
    /// each; every subscriber pulls them `window` topics at a time (SUBSCRIBE the window, receive
    /// the retained messages, UNSUBSCRIBE, next window), as the devices do. Timed like
    /// [`RelayFleet::shared_round`]: it tells the cost of the windowed pull apart from the
    /// product's crypto and Kubernetes.
    pub async fn pull_round(&self, payloads: &[Vec<u8>], window: u32) -> Result<RelayRound> {
        self.pull("pull", payloads, window, Work::Count, None).await
    }

    /// [`RelayFleet::pull_round`] with the devices' own work and no manager: `payloads` are the
    /// chunk messages of `sealed`, and every subscriber opens each (Merkle proof, AES-GCM under
    /// the content key), stores the plaintext at its offset in a file of its own and checks the
    /// whole file (size, SHA-256) once complete, with the protocol's and the devices' own code.
    /// The product's data phase beside this tells the manager's and Kubernetes' share apart
    /// from the transport and the device-side work.
    pub async fn pull_round_with_device_work(
        &self,
        sealed: &SealedFirmware,
        payloads: &[Vec<u8>],
        window: u32,
    ) -> Result<RelayRound> {
        let storage = self.storage("pull", sealed.chunk_size(), sealed.size(), sealed.sha256())?;
        let work = Work::OpenChunk(Arc::new(sealed.clone()));
        self.pull("pullwork", payloads, window, work, Some(storage))
            .await
    }

    async fn pull(
        &self,
        name: &str,
        payloads: &[Vec<u8>],
        window: u32,
        work: Work,
        storage: Option<Storage>,
    ) -> Result<RelayRound> {
        let prefix = format!("{}/{name}/", self.tag);
        let mut round = Round::new(
            prefix.clone(),
            payloads.len() as u64,
            self.subscribers,
            work,
        );
        round.window = Some(u64::from(window.max(1)));
        round.storage = storage;
        let round = Arc::new(round);
        let published = self
            .publish_all(&prefix, payloads.iter().cloned(), true)
            .await
            .with_context(|| format!("{name} baseline: publishing"))?;
        // Retained messages are stored once the broker has them; a short pause covers the
        // publisher's in-flight window before anyone subscribes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        *self.round.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&round));
        let first = round.window_topics(0);
        for client in &self.subscriber_clients {
            client
                .subscribe_many(
                    first
                        .iter()
                        .map(|t| Filter::new(t.clone(), QoS::AtLeastOnce)),
                )
                .await
                .with_context(|| format!("{name} baseline: subscribing"))?;
        }
        let result = self.finish(round, None, published).await;
        // Clear the retained messages (an empty retained payload each).
        self.publish_all(&prefix, payloads.iter().map(|_| Vec::new()), true)
            .await
            .with_context(|| format!("{name} baseline: clearing"))?;
        result
    }

    /// The paper's scheme: the whole image encrypted under each device's own key (AES-256-GCM,
    /// `chunk` bytes per message) and published to each device's topic; every subscriber
    /// decrypts what it gets and, with `store`, also stores it and checks the whole image as
    /// [`RelayFleet::pull_round_with_device_work`] does (a device must store and check an image
    /// before installing it, whichever scheme delivered it). Timed from the first publish
    /// (per-device encryption is on the critical path) to the last subscriber's last chunk.
    pub async fn paper_round(&self, image: &[u8], chunk: usize, store: bool) -> Result<RelayRound> {
        let chunk_count = image.len().div_ceil(chunk) as u32;
        let paper = PaperKeys {
            tag: format!("{}-paper", self.tag),
            chunk_count,
        };
        let prefix = format!("{}/own/", self.tag);
        let mut round = Round::new(
            prefix.clone(),
            u64::from(chunk_count),
            self.subscribers,
            Work::PaperDecrypt(paper.clone()),
        );
        if store {
            round.storage =
                Some(self.storage("paper", chunk as u32, image.len() as u64, sha256(image))?);
        }
        let round = Arc::new(round);
        *self.round.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&round));
        let started = Instant::now();
        let mut published = 0;
        for device in 0..self.subscribers {
            let cipher = ChunkCipher::new(&paper.key(device));
            for (j, plain) in image.chunks(chunk).enumerate() {
                let ct = cipher.encrypt(&paper.tag, j as u32, chunk_count, plain);
                published += ct.len() as u64;
                self.publisher
                    .publish(format!("{prefix}{device}/{j}"), QoS::AtLeastOnce, false, ct)
                    .await
                    .context("paper baseline: publishing")?;
            }
        }
        self.finish(round, Some(started), published).await
    }

    /// A fresh directory for the stored images of one round (removed with the round).
    fn storage(
        &self,
        name: &str,
        chunk_size: u32,
        image_size: u64,
        image_sha256: [u8; 32],
    ) -> Result<Storage> {
        let dir = std::env::temp_dir().join(format!("{}-{name}-store", self.tag));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Storage {
            dir,
            chunk_size: u64::from(chunk_size),
            image_size,
            image_sha256,
        })
    }

    /// Publishes `payloads` at QoS 1 on `<prefix><index>`; returns the payload bytes sent.
    async fn publish_all(
        &self,
        prefix: &str,
        payloads: impl Iterator<Item = Vec<u8>>,
        retain: bool,
    ) -> Result<u64> {
        let mut published = 0;
        for (j, payload) in payloads.enumerate() {
            published += payload.len() as u64;
            self.publisher
                .publish(format!("{prefix}{j}"), QoS::AtLeastOnce, retain, payload)
                .await?;
        }
        Ok(published)
    }

    fn begin(&self, prefix: String, expected: u64) -> Arc<Round> {
        let round = Arc::new(Round::new(prefix, expected, self.subscribers, Work::Count));
        *self.round.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&round));
        round
    }

    async fn finish(
        &self,
        round: Arc<Round>,
        from: Option<Instant>,
        published_bytes: u64,
    ) -> Result<RelayRound> {
        self.finish_within(round, from, published_bytes, ROUND_TIMEOUT)
            .await
    }

    async fn finish_within(
        &self,
        round: Arc<Round>,
        from: Option<Instant>,
        published_bytes: u64,
        timeout: Duration,
    ) -> Result<RelayRound> {
        let wait = round.done.notified();
        if round.completed.load(Ordering::Relaxed) < self.subscribers as u64 {
            // A timeout is a result (messages lost), not an error.
            let _ = tokio::time::timeout(timeout, wait).await;
        }
        *self.round.write().unwrap_or_else(|e| e.into_inner()) = None;
        let first = from.or(round.first.get().copied());
        let last = *lock(&round.last);
        let seconds = match (first, last) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => f64::NAN,
        };
        Ok(RelayRound {
            seconds,
            published_bytes,
            lost_messages: round.lost(),
            corrupt_messages: round.corrupt.load(Ordering::Relaxed),
        })
    }
}

// The large-image row (`large_bench`): the plain relay of a file too large to hold in memory.
impl RelayFleet {
    /// [`RelayFleet::shared_round`] of the file at `path`, read and published `chunk` bytes at a
    /// time (QoS 1, one topic each), so a 1 GiB image is never in memory; timed the same way,
    /// missing messages counted as lost after `timeout`.
    pub async fn file_round(
        &self,
        name: &str,
        path: &Path,
        chunk: usize,
        timeout: Duration,
    ) -> Result<RelayRound> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("{name}: reading {}", path.display()))?
            .len();
        let prefix = format!("{}/shared/", self.tag);
        let round = self.begin(prefix.clone(), len.div_ceil(chunk as u64));
        let mut file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("{name}: opening {}", path.display()))?;
        let mut published = 0u64;
        let mut index = 0u64;
        while published < len {
            let mut payload = vec![0u8; chunk.min((len - published) as usize)];
            file.read_exact(&mut payload)
                .await
                .with_context(|| format!("{name}: reading {}", path.display()))?;
            published += payload.len() as u64;
            self.publisher
                .publish(format!("{prefix}{index}"), QoS::AtLeastOnce, false, payload)
                .await
                .with_context(|| format!("{name}: publishing"))?;
            index += 1;
        }
        self.finish_within(round, None, published, timeout).await
    }
}

impl Drop for RelayFleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One subscriber: connect when the pacer allows, subscribe, then hand every PUBLISH to the
/// current round.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    i: usize,
    client: AsyncClient,
    mut eventloop: EventLoop,
    filters: Vec<String>,
    pacer: Arc<ConnectPacer>,
    round: Arc<RwLock<Option<Arc<Round>>>>,
    ready: Arc<AtomicU64>,
    all_ready: Arc<Notify>,
    n: u64,
) {
    let mut permit = Some(pacer.acquire().await);
    let mut subscribed = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                permit = None;
                for filter in &filters {
                    // The request channel is drained by this same loop: try_ is enough.
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                subscribed = true;
                if ready.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    all_ready.notify_one();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let current = round.read().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(current) = current else { continue };
                let Ok(topic) = std::str::from_utf8(&p.topic) else {
                    continue;
                };
                if let Some(next) = current.deliver(i, topic, &p.payload) {
                    // As the emulator does: one UNSUBSCRIBE per topic, one SUBSCRIBE per window.
                    for t in next.unsubscribe {
                        let _ = client.try_unsubscribe(t);
                    }
                    if !next.subscribe.is_empty() {
                        let filters = next
                            .subscribe
                            .into_iter()
                            .map(|t| Filter::new(t, QoS::AtLeastOnce));
                        let _ = client.try_subscribe_many(filters);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                drop(permit.take());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The bytes the manager publishes for one device of a firmware campaign besides the shared
/// chunks (the notify with its certificate and ephemeral key, the update with the signed
/// manifest and the wrapped content key): the "wrap" of the egress budget. Measured by running
/// the protocol's own sessions with the run's real identifiers, whose lengths are in the bytes.
pub fn wrap_bytes(
    manager_id: &str,
    device_id: &str,
    campaign_id: &str,
    image: &[u8],
    chunk_bytes: u32,
) -> Result<u64> {
    use sealed_ota_protocol::{
        CampaignPayload, CampaignSpec, CertificateAuthority, DeviceConfig, DeviceSession,
        DeviceState, DeviceTarget, ManagerConfig, ManagerSession, PreparedCampaign, Role,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let ca = CertificateAuthority::generate("bench-ca", now, 10)?;
    let trust = Arc::new(ca.trust_anchor());
    let topics = Arc::new(sealed_ota_protocol::TopicTree::new("iot", manager_id)?);
    let manager = ManagerConfig {
        identity: Arc::new(ca.issue(Role::Manager, manager_id, now, 10)?),
        trust: Arc::clone(&trust),
        topics: Arc::clone(&topics),
    };
    let device = DeviceConfig {
        identity: Arc::new(ca.issue(Role::Device, device_id, now, 10)?),
        trust,
        topics,
        manager_id: manager_id.into(),
        max_packet_size: MAX_PACKET_SIZE,
        window: 8,
        release_keys: Vec::new(),
    };
    let campaign = Arc::new(PreparedCampaign::prepare(CampaignSpec {
        campaign_id: campaign_id.into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware {
            image: image.to_vec(),
        },
        expires_at: now + 3600,
        chunk_size: chunk_bytes,
        release: None,
    })?);
    let target = DeviceTarget {
        device_id: device_id.into(),
        pinned_fingerprint: None,
        allow_downgrade: false,
    };
    let published =
        |actions: &[sealed_ota_protocol::Action]| -> Vec<sealed_ota_protocol::Outbound> {
            actions
                .iter()
                .filter_map(|a| match a {
                    sealed_ota_protocol::Action::Publish(o) => Some(o.clone()),
                    _ => None,
                })
                .collect()
        };
    let (mut session, actions) = ManagerSession::start(&manager, campaign, target, now)?;
    let notify = published(&actions);
    let (mut device_session, _) = DeviceSession::new(device, DeviceState::new("1.0.0"));
    let ready = notify
        .iter()
        .find_map(|n| {
            let out = device_session.handle(&n.to_inbound(), now).ok()?;
            published(&out.actions).into_iter().next()
        })
        .context("the device session did not answer the notify")?;
    let update = published(&session.handle(&ready.to_inbound(), now)?.actions);
    ensure!(!update.is_empty(), "the manager session sent no update");
    Ok(notify
        .iter()
        .chain(&update)
        .map(|o| o.payload.len() as u64)
        .sum())
}

/// The operator's metrics (`GET http://ADDR/metrics`), as `name{labels}` -> value.
pub async fn scrape_metrics(addr: &str) -> Result<BTreeMap<String, f64>> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the operator's metrics at {addr}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("metrics response without a body")?;
    Ok(parse_metrics(body))
}

/// The operator's metrics once its Device status writes stopped (no new one for `quiet`, at
/// most `limit`), and how long after the call the last write landed. Device status writes queue
/// behind the apiserver, so they can land after the campaign's own status says it ended.
pub async fn drained_metrics(
    addr: &str,
    quiet: Duration,
    limit: Duration,
) -> Result<(BTreeMap<String, f64>, f64)> {
    const DEVICE_WRITES: &str = "sealed_ota_operator_status_writes_total{kind=\"device\"}";
    let started = Instant::now();
    let mut metrics = scrape_metrics(addr).await?;
    let mut last_change = started;
    while last_change.elapsed() < quiet {
        if started.elapsed() > limit {
            bail!("Device status writes still running {limit:?} after the campaign ended");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = scrape_metrics(addr).await?;
        if now.get(DEVICE_WRITES) != metrics.get(DEVICE_WRITES) {
            last_change = Instant::now();
        }
        metrics = now;
    }
    Ok((metrics, last_change.duration_since(started).as_secs_f64()))
}

/// Parses the Prometheus text format (comments skipped).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Process id of a test-bed server (`<state dir>/<name>.pid`).
pub fn testbed_pid(state_dir: &std::path::Path, name: &str) -> Result<u32> {
    let path = state_dir.join(format!("{name}.pid"));
    std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("pid in {}", path.display()))
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
pub fn process_memory(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    memory_field(&status, field).with_context(|| format!("{field} in {path}"))
}

fn memory_field(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    cpu_seconds(&stat, clock_ticks_per_second()).with_context(|| format!("parsing {path}"))
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its closing parenthesis.
fn cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// USER_HZ (`getconf CLK_TCK`, 100 on every Linux this runs on), asked once per process.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of a set of processes sampled over time, so the CPU each used can be charged to
/// a window known only afterwards (the campaign's data phase, from the emulator's summary). On a
/// machine shared with other work the wall-clock time of a phase depends on the load; the CPU
/// seconds it took do much less.
#[derive(Debug, Default, Clone)]
pub struct CpuTimeline {
    /// (Unix seconds, CPU seconds per process so far), in time order.
    samples: Vec<(f64, BTreeMap<&'static str, f64>)>,
}

impl CpuTimeline {
    /// Records the processes' CPU seconds so far at `at` (Unix seconds, after every earlier one).
    pub fn push(&mut self, at: f64, cpu: BTreeMap<&'static str, f64>) {
        self.samples.push((at, cpu));
    }

    /// CPU seconds each process used from `from` to `to` (Unix seconds), measured from the last
    /// sample at or before `from` to the first at or after `to` (so a little more than the window,
    /// never less); `None` when the samples do not cover the window.
    pub fn between(&self, from: f64, to: f64) -> Option<BTreeMap<&'static str, f64>> {
        let start = self.samples.iter().rev().find(|(at, _)| *at <= from)?;
        let end = self.samples.iter().find(|(at, _)| *at >= to)?;
        Some(
            end.1
                .iter()
                .map(|(name, after)| (*name, after - start.1.get(name).copied().unwrap_or(0.0)))
                .collect(),
        )
    }
}

/// The current time in Unix seconds.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One row of the budget table.
#[derive(Debug, Clone)]
pub struct Budget {
    /// The summary key.
    pub key: &'static str,
    /// The measured figure.
    pub value: f64,
    /// The budget, in words (`<= 1.25`).
    pub budget: String,
    /// Whether the figure meets it (None: no budget, reported for comparison).
    pub met: Option<bool>,
    /// How it was measured.
    pub how: String,
}

impl Budget {
    /// A figure that must be at most `limit`.
    pub fn at_most(key: &'static str, value: f64, limit: f64, how: String) -> Self {
        Budget {
            key,
            value,
            budget: format!("<= {limit}"),
            met: Some(value <= limit),
            how,
        }
    }

    /// A figure that must be at least `limit`.
    pub fn at_least(key: &'static str, value: f64, limit: f64, how: String) -> Self {
        Budget {
            key,
            value,
            budget: format!(">= {limit}"),
            met: Some(value >= limit),
            how,
        }
    }

    /// A figure reported without a budget.
    pub fn report(key: &'static str, value: f64, how: String) -> Self {
        Budget {
            key,
            value,
            budget: "-".into(),
            met: None,
            how,
        }
    }
}

/// The table `make bench` prints.
pub fn render_table(rows: &[Budget]) -> String {
    let mut out = format!(
        "{:<36} {:>14}  {:<10} {:<5}  {}\n",
        "figure", "value", "budget", "met", "how"
    );
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        out += &format!(
            "{:<36} {:>14}  {:<10} {:<5}  {}\n",
            row.key,
            format_value(row.value),
            row.budget,
            met,
            row.how
        );
    }
    out
}

/// The same rows as a Markdown table (the summary's `.md` beside its JSON).
pub fn render_markdown(rows: &[Budget]) -> String {
    let mut out = String::from("| figure | value | budget | met | how |\n|---|---|---|---|---|\n");
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        out += &format!(
            "| {} | {} | {} | {met} | {} |\n",
            row.key,
            format_value(row.value),
            row.budget,
            row.how.replace('|', "\\|")
        );
    }
    out
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes `summary` as pretty JSON to `path` (parent directories created).
pub fn write_json(path: &Path, summary: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(summary)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrap_is_small_and_grows_with_the_identifiers() {
        let image = vec![7u8; 100_000];
        let short = wrap_bytes("m1", "d1", "c1", &image, 16384).unwrap();
        let long = wrap_bytes("m1", "d1", &"c".repeat(36), &image, 16384).unwrap();
        assert!(short > 500 && short < 4096, "{short}");
        assert!(long > short, "{long} <= {short}");
    }

    #[test]
    fn parses_prometheus_text() {
        let m = parse_metrics(
            "# HELP x y\n# TYPE x counter\nsealed_ota_operator_status_writes_total{kind=\"device\"} 2000\nsealed_ota_operator_mqtt_published_bytes_total 1.5e6\n",
        );
        assert_eq!(
            m["sealed_ota_operator_status_writes_total{kind=\"device\"}"],
            2000.0
        );
        assert_eq!(m["sealed_ota_operator_mqtt_published_bytes_total"], 1.5e6);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn reads_memory_fields() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(memory_field(status, "VmRSS"), Some(1024 * 1024));
        assert_eq!(memory_field(status, "VmHWM"), Some(2048 * 1024));
        assert_eq!(memory_field(status, "VmSwap"), None);
        assert!(process_memory(std::process::id(), "VmRSS").unwrap() > 1024 * 1024);
    }

    #[test]
    fn reads_cpu_seconds_past_a_command_name_with_spaces() {
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("42 (x) S 1", 100.0), None);
        assert!(process_cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    #[test]
    fn cpu_is_charged_to_a_window_from_the_samples_around_it() {
        let mut timeline = CpuTimeline::default();
        for (at, emu, op) in [
            (10.0, 1.0, 0.5),
            (11.0, 2.0, 0.5),
            (12.0, 4.0, 1.0),
            (13.0, 5.0, 1.0),
        ] {
            timeline.push(at, BTreeMap::from([("emu", emu), ("op", op)]));
        }
        let cpu = timeline.between(10.5, 12.0).unwrap();
        assert_eq!(cpu, BTreeMap::from([("emu", 3.0), ("op", 0.5)]));
        assert_eq!(timeline.between(10.0, 13.0).unwrap()["emu"], 4.0);
        assert_eq!(
            timeline.between(9.0, 12.0),
            None,
            "starts before the first sample"
        );
        assert_eq!(
            timeline.between(11.0, 13.5),
            None,
            "ends after the last sample"
        );
    }

    #[test]
    fn budgets_say_whether_they_are_met() {
        let rows = [
            Budget::at_most("fanout_ratio", 1.3, 1.25, "x".into()),
            Budget::at_least("crypto_ratio", 0.9, 0.8, "y".into()),
            Budget::report("paper_egress_bytes", 1e9, "z".into()),
        ];
        let met: Vec<Option<bool>> = rows.iter().map(|r| r.met).collect();
        assert_eq!(met, [Some(false), Some(true), None]);
        let table = render_table(&rows);
        assert!(table.contains("fanout_ratio"));
        assert!(table.contains("NO"));
        assert!(table.contains("1000000000"));
        let markdown = render_markdown(&[Budget::at_most("broker_rss", 3.0, 2.0, "a | b".into())]);
        assert_eq!(
            markdown.lines().nth(2),
            Some("| broker_rss | 3 | <= 2 | **no** | a \\| b |")
        );
    }

    #[test]
    fn a_round_completes_when_every_subscriber_has_everything() {
        let round = Round::new("t/shared/".into(), 2, 2, Work::Count);
        round.deliver(0, "t/shared/0", b"a");
        round.deliver(0, "other/0", b"ignored");
        round.deliver(0, "t/shared/1", b"b");
        round.deliver(1, "t/shared/0", b"a");
        assert_eq!(round.completed.load(Ordering::Relaxed), 1);
        assert_eq!(round.lost(), 1);
        round.deliver(1, "t/shared/1", b"b");
        assert_eq!(round.completed.load(Ordering::Relaxed), 2);
        assert_eq!(round.lost(), 0);
    }

    #[test]
    fn a_pull_round_moves_window_by_window() {
        let mut round = Round::new("t/pull/".into(), 5, 1, Work::Count);
        round.window = Some(2);
        assert_eq!(round.window_topics(0), ["t/pull/0", "t/pull/1"]);
        assert_eq!(round.deliver(0, "t/pull/0", b"a"), None);
        assert_eq!(
            round.deliver(0, "t/pull/1", b"b"),
            Some(NextWindow {
                unsubscribe: vec!["t/pull/0".into(), "t/pull/1".into()],
                subscribe: vec!["t/pull/2".into(), "t/pull/3".into()],
            })
        );
        round.deliver(0, "t/pull/2", b"c");
        round.deliver(0, "t/pull/3", b"d");
        assert_eq!(
            round.deliver(0, "t/pull/4", b"e"),
            Some(NextWindow {
                unsubscribe: vec!["t/pull/4".into()],
                subscribe: vec![],
            })
        );
        assert_eq!(round.lost(), 0);
    }

    #[test]
    fn the_paper_round_decrypts_with_each_devices_key() {
        let paper = PaperKeys {
            tag: "p".into(),
            chunk_count: 1,
        };
        let round = Round::new("t/own/".into(), 1, 2, Work::PaperDecrypt(paper.clone()));
        let for_device_1 = ChunkCipher::new(&paper.key(1)).encrypt("p", 0, 1, b"image");
        // Device 0 cannot open device 1's chunk.
        round.deliver(0, "t/own/0/0", &for_device_1);
        assert_eq!(round.corrupt.load(Ordering::Relaxed), 1);
        round.deliver(1, "t/own/1/0", &for_device_1);
        assert_eq!(round.lost(), 1);
    }

    #[test]
    fn the_device_work_round_opens_stores_and_checks_every_image() {
        let image: Vec<u8> = (0..2500u32).map(|i| (i * 13) as u8).collect();
        let (sealed, cts) = SealedFirmware::seal_all("bench", 1000, &image).unwrap();
        let payloads: Vec<Vec<u8>> = (0..sealed.chunk_count())
            .map(|i| {
                let at = sealed.ciphertext_offset(i) as usize;
                sealed
                    .chunk_payload(i, &cts[at..at + sealed.ciphertext_len(i)])
                    .unwrap()
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("bench-work-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut round = Round::new(
            "t/w/".into(),
            3,
            2,
            Work::OpenChunk(Arc::new(sealed.clone())),
        );
        round.storage = Some(Storage {
            dir: dir.clone(),
            chunk_size: 1000,
            image_size: image.len() as u64,
            image_sha256: sha256(&image),
        });
        // Subscriber 0 gets every chunk, last first; subscriber 1 a changed one.
        for j in [2usize, 0, 1] {
            round.deliver(0, &format!("t/w/{j}"), &payloads[j]);
        }
        assert_eq!(std::fs::read(dir.join("0.img")).unwrap(), image);
        assert_eq!(round.completed.load(Ordering::Relaxed), 1);
        assert_eq!(round.corrupt.load(Ordering::Relaxed), 0);
        let mut changed = payloads[1].clone();
        changed[40] ^= 1;
        round.deliver(1, "t/w/1", &changed);
        assert_eq!(round.corrupt.load(Ordering::Relaxed), 1);
        drop(round);
        assert!(!dir.exists(), "the round's store is removed with it");
    }
}
