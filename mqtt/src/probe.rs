//! The broker probe (`sealed-ota broker check`): connects to a broker with the caller's TLS
//! material and tries, one step at a time, every MQTT 5 feature and limit the product relies on —
//! QoS 1 delivery, retained messages (their size limit, clearing them, keeping them across a
//! reconnect), Response Topic, Correlation Data, User Properties, the Receive Maximum and Maximum
//! Packet Size the server announces in CONNACK, whether the server honours the *client's* Maximum
//! Packet Size, shared subscriptions and how many messages it queues for a slow client — and returns
//! a typed, serde-serialisable [`BrokerReport`] with what works, what is limited and which campaign
//! settings fit ([`CampaignFit`]). When several URLs are given (the nodes of a cluster), publishers
//! use the first node and subscribers the last, so every message crosses the cluster.
//!
//! The steps are thin I/O shells around pure judges (`judge_*`, [`campaign_fit`]) that turn what
//! was observed into verdicts; those carry the logic and the unit tests. Every wait is bounded by
//! [`ProbeConfig::step_timeout`]. The probe uses topics under a random prefix and clears every
//! retained message it published. It never logs payloads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAckProperties, Filter, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::BrokerUrl;

/// The MQTT 5 limit of a packet's size (the Remaining Length's largest value plus its header).
pub const MQTT_MAX_PACKET: u32 = 268_435_455 + 5;

/// Retained payload sizes tried, smallest first (those above the server's announced Maximum Packet
/// Size are skipped, and the largest size that fits that maximum is tried instead).
pub const RETAINED_SIZES: [u32; 6] = [1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// Messages published to a client that does not acknowledge them, to find the server's queue limit.
pub const QUEUE_PROBE_MESSAGES: u32 = 1500;

/// What the probe connects to and how.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The broker's URLs: one, or every node of a cluster (publishers use the first, subscribers
    /// the last).
    pub urls: Vec<BrokerUrl>,
    /// TLS client configuration (roots and client certificate) for `mqtts://` URLs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Client ids start with this (each connection adds a suffix).
    pub client_id_prefix: String,
    /// Topics live under this prefix (a random suffix is added).
    pub topic_prefix: String,
    /// Upper bound of every wait.
    pub step_timeout: Duration,
    /// What the campaign fit assumes about the devices and the image.
    pub assumptions: FitAssumptions,
}

impl ProbeConfig {
    /// A configuration with the defaults: client ids `sealed-ota-probe-*`, topics under
    /// `sealed-ota-probe/<random>`, 10 s per step, [`FitAssumptions::default`].
    pub fn new(urls: Vec<BrokerUrl>, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let tag = format!("{:08x}", rand::random::<u32>());
        ProbeConfig {
            urls,
            tls,
            client_id_prefix: format!("sealed-ota-probe-{tag}"),
            topic_prefix: format!("sealed-ota-probe/{tag}"),
            step_timeout: Duration::from_secs(10),
            assumptions: FitAssumptions::default(),
        }
    }
}

/// What the campaign fit assumes (the broker cannot tell these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitAssumptions {
    /// The smallest Maximum Packet Size a device of the fleet advertises (the emulator's default
    /// is 256 KiB).
    pub device_max_packet_size: u32,
    /// Size of the largest image a campaign will carry (it sets the Merkle proof's length).
    pub image_size: u64,
    /// Topic prefix of the campaigns.
    pub topic_prefix: String,
    /// The longest manager id.
    pub manager_id_len: usize,
}

impl Default for FitAssumptions {
    fn default() -> Self {
        FitAssumptions {
            device_max_packet_size: 256 * 1024,
            image_size: 1 << 30,
            topic_prefix: "iot".into(),
            manager_id_len: 32,
        }
    }
}

/// Everything the probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerReport {
    /// The URLs probed (publishers on the first, subscribers on the last).
    pub urls: Vec<String>,
    /// What the server announced in CONNACK (first node).
    pub server: ServerLimits,
    /// One entry per feature, in the order probed.
    pub checks: Vec<Check>,
    /// Limits measured by the probe.
    pub measured: MeasuredLimits,
    /// Campaign settings that fit this broker.
    pub fit: CampaignFit,
}

impl BrokerReport {
    /// The check of `feature`, if it ran.
    pub fn check(&self, feature: Feature) -> Option<&Check> {
        self.checks.iter().find(|c| c.feature == feature)
    }

    /// True when no check is [`Verdict::Broken`].
    pub fn usable(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Broken)
    }
}

/// The CONNACK properties that bound what a client may do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerLimits {
    /// QoS 1/2 publishes a client may have unacknowledged (absent: 65,535).
    pub receive_maximum: Option<u16>,
    /// Largest packet the server accepts (absent: no limit beyond MQTT's).
    pub maximum_packet_size: Option<u32>,
    /// Highest QoS the server supports (absent: 2).
    pub maximum_qos: Option<u8>,
    /// Retained messages supported (absent: yes).
    pub retain_available: Option<bool>,
    /// Shared subscriptions supported (absent: yes).
    pub shared_subscription_available: Option<bool>,
    /// Wildcard subscriptions supported (absent: yes).
    pub wildcard_subscription_available: Option<bool>,
    /// Topic aliases the server accepts (absent: 0).
    pub topic_alias_maximum: Option<u16>,
    /// Keep-alive the server imposes, in seconds.
    pub server_keep_alive: Option<u16>,
}

impl ServerLimits {
    fn from_connack(p: Option<&ConnAckProperties>) -> Self {
        let Some(p) = p else {
            return ServerLimits::default();
        };
        let flag = |v: Option<u8>| v.map(|v| v != 0);
        ServerLimits {
            receive_maximum: p.receive_max,
            maximum_packet_size: p.max_packet_size,
            maximum_qos: p.max_qos,
            retain_available: flag(p.retain_available),
            shared_subscription_available: flag(p.shared_subscription_available),
            wildcard_subscription_available: flag(p.wildcard_subscription_available),
            topic_alias_maximum: p.topic_alias_max,
            server_keep_alive: p.server_keep_alive,
        }
    }
}

/// A feature or limit the product relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Feature {
    /// TLS and MQTT 5 connect with the given material.
    Connect,
    /// The Receive Maximum announced in CONNACK.
    ServerReceiveMaximum,
    /// The Maximum Packet Size announced in CONNACK.
    ServerMaximumPacketSize,
    /// QoS 1 messages arrive once each, in order.
    Qos1Delivery,
    /// Response Topic arrives unchanged.
    ResponseTopic,
    /// Correlation Data arrives byte for byte.
    CorrelationData,
    /// User Properties arrive unchanged, in order, repeated keys kept.
    UserProperties,
    /// A retained message reaches a later subscriber, flagged retained.
    Retained,
    /// The largest retained payload kept and delivered.
    RetainedSize,
    /// A retained message is still delivered after its publisher left and the subscriber reconnected.
    RetainedAfterReconnect,
    /// Subscribing a filter again on the same connection (Retain Handling 0) sends its retained
    /// message again: a device fetches a retained chunk the broker failed to deliver this way.
    RetainedOnResubscribe,
    /// An empty retained publish clears the retained message.
    RetainedClear,
    /// A message above the client's Maximum Packet Size is dropped for that client alone, which
    /// stays connected and receives the next message.
    ClientMaximumPacketSize,
    /// `$share/<group>/...` delivers each message to one member of the group.
    SharedSubscriptions,
    /// Messages the server queues for a client that does not acknowledge them.
    QueuedMessages,
}

impl Feature {
    /// A short human name.
    pub fn title(self) -> &'static str {
        match self {
            Feature::Connect => "TLS + MQTT 5 connect",
            Feature::ServerReceiveMaximum => "server Receive Maximum (CONNACK)",
            Feature::ServerMaximumPacketSize => "server Maximum Packet Size (CONNACK)",
            Feature::Qos1Delivery => "QoS 1 delivery",
            Feature::ResponseTopic => "Response Topic",
            Feature::CorrelationData => "Correlation Data",
            Feature::UserProperties => "User Properties",
            Feature::Retained => "retained messages",
            Feature::RetainedSize => "retained message size",
            Feature::RetainedAfterReconnect => "retained after a reconnect",
            Feature::RetainedOnResubscribe => "retained again on a new SUBSCRIBE",
            Feature::RetainedClear => "clearing a retained message",
            Feature::ClientMaximumPacketSize => "client Maximum Packet Size honoured",
            Feature::SharedSubscriptions => "shared subscriptions",
            Feature::QueuedMessages => "messages queued per client",
        }
    }
}

/// How a feature fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Works as the product needs.
    Works,
    /// Works within a limit the operator must respect (the detail says which).
    Limited,
    /// Does not work as MQTT 5 says; the detail says what happened.
    Broken,
    /// Not probed (an earlier step failed, or nothing to probe).
    NotTested,
}

/// One feature's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// The feature.
    pub feature: Feature,
    /// How it fared.
    pub verdict: Verdict,
    /// What was observed.
    pub detail: String,
}

impl Check {
    fn new(feature: Feature, verdict: Verdict, detail: impl Into<String>) -> Self {
        Check {
            feature,
            verdict,
            detail: detail.into(),
        }
    }
}

/// Limits the probe measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeasuredLimits {
    /// Largest retained payload (bytes) kept and delivered intact.
    pub largest_retained_payload: Option<u32>,
    /// Smallest retained payload tried that was not kept or delivered.
    pub retained_payload_refused: Option<u32>,
    /// Messages a client that acknowledged none received in the end, of [`QUEUE_PROBE_MESSAGES`].
    pub queued_delivered: Option<u32>,
    /// Whether a message above the client's Maximum Packet Size was dropped for it alone.
    pub client_maximum_packet_size_honoured: Option<bool>,
}

/// Campaign settings that fit the broker (and [`FitAssumptions`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignFit {
    /// The largest PUBLISH a chunk may take: the least of the server's Maximum Packet Size, the
    /// largest retained message it kept (chunks are retained) and the devices' Maximum Packet Size.
    pub chunk_packet_limit: u32,
    /// The largest `chunkSize` (a multiple of 1 KiB) whose chunk messages stay within that limit.
    pub max_chunk_size: Option<u32>,
    /// The largest chunk window (chunk topics a device subscribes at once) the server queues
    /// without dropping, when a limit was found.
    pub max_window: Option<u32>,
    /// QoS 1 publishes the operator may have in flight (the server's Receive Maximum, at most
    /// [`crate::MANAGER_OUTGOING_INFLIGHT`]).
    pub operator_inflight: u16,
    /// What the operator must respect on this broker, in words.
    pub notes: Vec<String>,
}

/// Why the probe could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No URL given.
    #[error("no broker URL given: pass at least one mqtt:// or mqtts:// URL")]
    NoUrl,
    /// An `mqtts://` URL without TLS material.
    #[error("broker URL {0}: TLS needs the broker's CA (and the client certificate it requires)")]
    NoTls(String),
}

// ---------------------------------------------------------------------------------------------
// Pure judges: observations in, verdicts out.
// ---------------------------------------------------------------------------------------------

/// QoS 1: `received` are the sequence numbers that arrived, in arrival order, of `0..sent`.
pub fn judge_qos1(sent: u32, received: &[u32]) -> Check {
    let mut seen = std::collections::BTreeSet::new();
    // First arrivals, in arrival order: QoS 1 may repeat a message, never reorder new ones.
    let first: Vec<u32> = received
        .iter()
        .copied()
        .filter(|n| seen.insert(*n))
        .collect();
    let duplicates = received.len() - first.len();
    let missing = (0..sent).filter(|n| !seen.contains(n)).count();
    let in_order = first.windows(2).all(|w| w[0] < w[1]);
    let (verdict, detail) = if missing > 0 {
        (
            Verdict::Broken,
            format!("{missing} of {sent} QoS 1 messages never arrived"),
        )
    } else if !in_order {
        (
            Verdict::Broken,
            format!("all {sent} arrived but out of order"),
        )
    } else if duplicates > 0 {
        (
            Verdict::Limited,
            format!("all {sent} arrived in order, {duplicates} duplicated (QoS 1 allows it)"),
        )
    } else {
        (
            Verdict::Works,
            format!("{sent} of {sent} arrived once each, in order"),
        )
    };
    Check::new(Feature::Qos1Delivery, verdict, detail)
}

/// Properties: what was sent against what arrived (`None`: the message never arrived).
pub fn judge_properties(sent: &PublishProperties, got: Option<&PublishProperties>) -> Vec<Check> {
    let features = [
        Feature::ResponseTopic,
        Feature::CorrelationData,
        Feature::UserProperties,
    ];
    let Some(got) = got else {
        return features
            .into_iter()
            .map(|f| Check::new(f, Verdict::Broken, "the message carrying it never arrived"))
            .collect();
    };
    let one = |feature, same: bool, what: String| {
        if same {
            Check::new(feature, Verdict::Works, "arrived unchanged")
        } else {
            Check::new(feature, Verdict::Broken, what)
        }
    };
    vec![
        one(
            Feature::ResponseTopic,
            sent.response_topic == got.response_topic,
            format!(
                "sent {:?}, got {:?}",
                sent.response_topic, got.response_topic
            ),
        ),
        one(
            Feature::CorrelationData,
            sent.correlation_data == got.correlation_data,
            format!(
                "sent {} bytes, got {:?}",
                sent.correlation_data.as_ref().map_or(0, |d| d.len()),
                got.correlation_data.as_ref().map(|d| d.len())
            ),
        ),
        one(
            Feature::UserProperties,
            sent.user_properties == got.user_properties,
            format!(
                "sent {:?}, got {:?}",
                sent.user_properties, got.user_properties
            ),
        ),
    ]
}

/// Retained sizes: `results` maps each size tried to whether it came back intact.
pub fn judge_retained_sizes(results: &BTreeMap<u32, bool>, server_max: Option<u32>) -> Check {
    let largest_ok = results.iter().filter(|(_, ok)| **ok).map(|(s, _)| *s).max();
    let refused = results
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(s, _)| *s)
        .min();
    let server = server_max.map_or("no server maximum announced".to_string(), |m| {
        format!("server Maximum Packet Size {m}")
    });
    match (largest_ok, refused) {
        (None, _) => Check::new(
            Feature::RetainedSize,
            Verdict::Broken,
            "no retained message came back intact",
        ),
        (Some(ok), Some(bad)) if bad > ok => Check::new(
            Feature::RetainedSize,
            Verdict::Limited,
            format!("{ok} bytes kept, {bad} bytes not ({server})"),
        ),
        (Some(ok), Some(bad)) => Check::new(
            Feature::RetainedSize,
            Verdict::Broken,
            format!("{bad} bytes lost but {ok} bytes kept: retained messages are unreliable"),
        ),
        (Some(ok), None) => Check::new(
            Feature::RetainedSize,
            Verdict::Works,
            format!("every size up to {ok} bytes kept ({server})"),
        ),
    }
}

/// Client Maximum Packet Size: the subscriber advertised a maximum, then a message above it and a
/// small one were published.
pub fn judge_client_max_packet(
    advertised: u32,
    big_delivered: bool,
    small_delivered: bool,
    disconnected: Option<&str>,
) -> Check {
    let f = Feature::ClientMaximumPacketSize;
    match (big_delivered, small_delivered, disconnected) {
        (false, true, None) => Check::new(
            f,
            Verdict::Works,
            format!("the message above {advertised} bytes was dropped for this client alone; the next one arrived"),
        ),
        (_, small, Some(why)) => Check::new(
            f,
            Verdict::Broken,
            format!(
                "the server sent a message above the client's {advertised}-byte maximum and the connection closed ({why}); the next message {}",
                if small { "still arrived" } else { "was lost" }
            ),
        ),
        (true, _, None) => Check::new(
            f,
            Verdict::Broken,
            format!("a message above the client's {advertised}-byte maximum was delivered"),
        ),
        (false, false, None) => Check::new(
            f,
            Verdict::Broken,
            "neither the large nor the following small message arrived",
        ),
    }
}

/// Shared subscriptions: the sequence numbers each of two group members received, of `0..sent`.
pub fn judge_shared(sent: u32, suback_ok: bool, member_a: &[u32], member_b: &[u32]) -> Check {
    let f = Feature::SharedSubscriptions;
    if !suback_ok {
        return Check::new(f, Verdict::Broken, "SUBACK refused the $share/ filter");
    }
    let mut count: BTreeMap<u32, u32> = BTreeMap::new();
    for n in member_a.iter().chain(member_b) {
        *count.entry(*n).or_default() += 1;
    }
    let missing = (0..sent).filter(|n| !count.contains_key(n)).count();
    let twice = count.values().filter(|c| **c > 1).count();
    let split = format!("split {}/{}", member_a.len(), member_b.len());
    if twice as u32 == sent && missing == 0 {
        Check::new(
            f,
            Verdict::Broken,
            format!("every message went to both members: not shared ({split})"),
        )
    } else if missing > 0 {
        Check::new(
            f,
            Verdict::Broken,
            format!("{missing} of {sent} messages reached no member ({split})"),
        )
    } else if twice > 0 {
        Check::new(
            f,
            Verdict::Limited,
            format!("{twice} of {sent} messages reached both members ({split})"),
        )
    } else {
        Check::new(
            f,
            Verdict::Works,
            format!("each of {sent} messages reached one member ({split})"),
        )
    }
}

/// A second SUBSCRIBE of a filter on the connection that already got its retained message:
/// `None` when that connection did not get it in the first place. A broker that does not send it
/// again limits recovery (a device whose chunk delivery the broker dropped must ask the manager,
/// whose republish reaches every device on that chunk) but breaks nothing.
pub fn judge_resubscribe(again: Option<bool>) -> Check {
    let f = Feature::RetainedOnResubscribe;
    match again {
        Some(true) => Check::new(
            f,
            Verdict::Works,
            "sent again to the subscribing connection",
        ),
        Some(false) => Check::new(
            f,
            Verdict::Limited,
            "not sent again (MQTT 5 3.8.3.1, Retain Handling 0, says it is): a device asks the \
             manager for each chunk the broker failed to deliver, and the republish reaches every \
             device subscribed to it",
        ),
        None => Check::new(
            f,
            Verdict::NotTested,
            "the retained message was not delivered after the reconnect",
        ),
    }
}

/// Queue: `delivered` of `sent` messages reached a client that acknowledged none of them until the
/// publisher was done.
pub fn judge_queue(sent: u32, delivered: u32) -> Check {
    if delivered >= sent {
        Check::new(
            Feature::QueuedMessages,
            Verdict::Works,
            format!("all {sent} queued and delivered"),
        )
    } else {
        Check::new(
            Feature::QueuedMessages,
            Verdict::Limited,
            format!(
                "{delivered} of {sent} reached a client that took none until the publisher was done \
                 (Receive Maximum 10): the rest were dropped or held back"
            ),
        )
    }
}

/// The campaign settings that fit what was found (pure; see [`CampaignFit`]).
pub fn campaign_fit(
    server: &ServerLimits,
    measured: &MeasuredLimits,
    assumptions: &FitAssumptions,
) -> CampaignFit {
    use sealed_ota_protocol::wire;
    let mut notes = Vec::new();
    let server_max = server.maximum_packet_size.unwrap_or(MQTT_MAX_PACKET);
    // A retained payload of N bytes travels in a PUBLISH of N + topic + header bytes; allow the
    // longest chunk topic the fit assumes.
    let topics = sealed_ota_protocol::TopicTree::new(
        &assumptions.topic_prefix,
        &"m".repeat(assumptions.manager_id_len.max(1)),
    );
    let campaign_id = "00000000-0000-0000-0000-000000000000";
    let retained_packet = measured.largest_retained_payload.map(|p| {
        // Payload bound plus the largest chunk topic and PUBLISH header (what chunk_packet_bound adds).
        p.saturating_add(256)
    });
    let mut limit = server_max.min(assumptions.device_max_packet_size);
    if let Some(r) = retained_packet {
        limit = limit.min(r);
    }
    let max_chunk_size = topics.as_ref().ok().and_then(|topics| {
        let fits = |kib: u32| {
            let size = kib * 1024;
            let count = assumptions.image_size.div_ceil(u64::from(size)).max(1);
            let count = u32::try_from(count).unwrap_or(u32::MAX);
            count <= wire::MAX_CHUNK_COUNT
                && wire::chunk_packet_bound(topics, campaign_id, size, count) <= limit
        };
        let (mut lo, mut hi) = (0u32, wire::MAX_CHUNK_SIZE / 1024);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (lo > 0).then_some(lo * 1024)
    });
    if measured.client_maximum_packet_size_honoured == Some(false) {
        notes.push(format!(
            "the server does not drop messages above a client's Maximum Packet Size: it disconnects \
             the client instead. Never publish to a device more than it advertises (the protocol \
             refuses such campaigns with PacketTooLarge; keep chunkSize at most {} for devices \
             advertising {} bytes)",
            max_chunk_size.map_or("-".into(), |s| s.to_string()),
            assumptions.device_max_packet_size
        ));
    }
    if let Some(max) = server.maximum_packet_size {
        notes.push(format!(
            "the server accepts packets up to {max} bytes: notify, update and chunk messages must fit"
        ));
    }
    if let Some(refused) = measured.retained_payload_refused {
        notes.push(format!(
            "retained payloads of {refused} bytes were not kept: chunks are retained, so chunkSize must stay below"
        ));
    }
    let max_window = measured
        .queued_delivered
        .filter(|d| *d < QUEUE_PROBE_MESSAGES);
    if let Some(w) = max_window {
        notes.push(format!(
            "a stalled client received {w} of {QUEUE_PROBE_MESSAGES} messages: keep a device's chunk window (and anything else published to one device before it answers) below {w}"
        ));
    }
    let operator_inflight = server
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(crate::MANAGER_OUTGOING_INFLIGHT);
    if operator_inflight < 64 {
        notes.push(format!(
            "Receive Maximum {operator_inflight}: the operator has at most {operator_inflight} QoS 1 publishes in flight per connection"
        ));
    }
    CampaignFit {
        chunk_packet_limit: limit,
        max_chunk_size,
        max_window,
        operator_inflight,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// The I/O shell.
// ---------------------------------------------------------------------------------------------

/// What a probe connection saw.
#[derive(Debug)]
enum Seen {
    Publish(Publish),
    SubAck(Vec<SubscribeReasonCode>),
    PubAck(bool),
    Closed(String),
}

/// One probe connection: its client and what its event loop saw.
struct Conn {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
    server: ServerLimits,
    timeout: Duration,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    /// Connects (clean start) and waits for CONNACK.
    async fn open(
        config: &ProbeConfig,
        url: &BrokerUrl,
        name: &str,
        tune: impl FnOnce(&mut MqttOptions),
    ) -> Result<Conn, String> {
        let mut options = MqttOptions::new(
            format!("{}-{name}", config.client_id_prefix),
            url.host.clone(),
            url.port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        options.set_max_packet_size(Some(64 << 20));
        options.set_connection_timeout(config.step_timeout.as_secs().max(1));
        if url.tls {
            let tls = config
                .tls
                .clone()
                .ok_or_else(|| "no TLS material".to_string())?;
            options.set_transport(crate::tls::transport(tls));
        }
        tune(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let (tx, seen) = mpsc::unbounded_channel();
        let (connack_tx, connack) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connack_tx = Some(connack_tx);
            loop {
                let event = eventloop.poll().await;
                let report = match event {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        if let Some(tx) = connack_tx.take() {
                            let _ = tx.send(Ok(ServerLimits::from_connack(c.properties.as_ref())));
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(p),
                    Ok(Event::Incoming(Packet::SubAck(s))) => Seen::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(matches!(
                        a.reason,
                        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
                            | rumqttc::v5::mqttbytes::v5::PubAckReason::NoMatchingSubscribers
                    )),
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        Seen::Closed(format!("server DISCONNECT {:?}", d.reason_code))
                    }
                    Ok(_) => continue,
                    Err(e) => Seen::Closed(e.to_string()),
                };
                let closed = matches!(report, Seen::Closed(_));
                if let (Seen::Closed(why), Some(tx)) = (&report, connack_tx.take()) {
                    let _ = tx.send(Err(why.clone()));
                }
                if tx.send(report).is_err() || closed {
                    return;
                }
            }
        });
        let server = match timeout(config.step_timeout, connack).await {
            Ok(Ok(Ok(server))) => server,
            Ok(Ok(Err(why))) => return Err(why),
            Ok(Err(_)) => return Err("the connection task ended before CONNACK".into()),
            Err(_) => return Err(format!("no CONNACK within {:?}", config.step_timeout)),
        };
        Ok(Conn {
            client,
            seen,
            task,
            server,
            timeout: config.step_timeout,
        })
    }

    /// Subscribes and waits for SUBACK; true when every filter was granted.
    async fn subscribe(&mut self, filters: Vec<Filter>) -> Result<bool, String> {
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next_until(deadline).await {
                Some(Seen::SubAck(codes)) => {
                    return Ok(codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))))
                }
                Some(Seen::Closed(why)) => return Err(why),
                Some(_) => {}
                None => return Err("no SUBACK".into()),
            }
        }
    }

    /// Publishes QoS 1 and waits for the PUBACK; false when the server refused it.
    async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        props: PublishProperties,
    ) -> Result<bool, String> {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next_until(deadline).await {
                Some(Seen::PubAck(ok)) => return Ok(ok),
                Some(Seen::Closed(why)) => return Err(why),
                Some(_) => {}
                None => return Err("no PUBACK".into()),
            }
        }
    }

    /// Publishes `count` QoS 1 messages (payload: the sequence number) and waits for every PUBACK.
    async fn publish_sequence(&mut self, topic: &str, count: u32) -> Result<(), String> {
        for n in 0..count {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, n.to_be_bytes().to_vec())
                .await
                .map_err(|e| e.to_string())?;
        }
        let deadline = Instant::now() + self.timeout * 3;
        let mut acked = 0;
        while acked < count {
            match self.next_until(deadline).await {
                Some(Seen::PubAck(_)) => acked += 1,
                Some(Seen::Closed(why)) => return Err(why),
                Some(_) => {}
                None => return Err(format!("{acked} of {count} PUBACKs")),
            }
        }
        Ok(())
    }

    async fn next_until(&mut self, deadline: Instant) -> Option<Seen> {
        tokio::time::timeout_at(deadline, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes received until `done` says so or `quiet` passes without one; a close ends it too.
    async fn collect(
        &mut self,
        quiet: Duration,
        mut done: impl FnMut(&[Publish]) -> bool,
    ) -> (Vec<Publish>, Option<String>) {
        let mut got = Vec::new();
        let deadline = Instant::now() + self.timeout;
        loop {
            if done(&got) {
                return (got, None);
            }
            let until = deadline.min(Instant::now() + quiet);
            match self.next_until(until).await {
                Some(Seen::Publish(p)) => got.push(p),
                Some(Seen::Closed(why)) => return (got, Some(why)),
                Some(_) => {}
                None => return (got, None),
            }
        }
    }

    /// Subscribes `topic` (Retain Handling 0) and says whether its retained `payload` came,
    /// flagged retained.
    async fn retained_on_subscribe(&mut self, topic: &str, payload: &[u8]) -> Result<bool, String> {
        self.subscribe(vec![qos1_filter(topic.to_owned())]).await?;
        let (got, _) = self
            .collect(Duration::from_secs(3), |g| !g.is_empty())
            .await;
        Ok(got
            .iter()
            .any(|m| m.retain && m.payload.as_ref() == payload))
    }

    /// True when the server or the network closed this connection.
    fn is_closed(&self) -> bool {
        self.task.is_finished()
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sequence_numbers(got: &[Publish]) -> Vec<u32> {
    got.iter()
        .filter_map(|p| <[u8; 4]>::try_from(p.payload.as_ref()).ok())
        .map(u32::from_be_bytes)
        .collect()
}

fn qos1_filter(path: String) -> Filter {
    Filter::new(path, QoS::AtLeastOnce)
}

fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// Probes the broker (see the module doc). Connection failures become [`Verdict::Broken`] checks
/// in the report; only a configuration that cannot be tried at all is an error.
pub async fn probe(config: &ProbeConfig) -> Result<BrokerReport, ProbeError> {
    let first = config.urls.first().ok_or(ProbeError::NoUrl)?;
    let last = config.urls.last().ok_or(ProbeError::NoUrl)?;
    if let Some(u) = config.urls.iter().find(|u| u.tls && config.tls.is_none()) {
        return Err(ProbeError::NoTls(u.to_string()));
    }
    crate::tls::install_crypto_provider();
    let mut report = BrokerReport {
        urls: config.urls.iter().map(ToString::to_string).collect(),
        server: ServerLimits::default(),
        checks: Vec::new(),
        measured: MeasuredLimits::default(),
        fit: campaign_fit(
            &ServerLimits::default(),
            &MeasuredLimits::default(),
            &config.assumptions,
        ),
    };
    let p = &config.topic_prefix;
    // Connect: the publisher on the first node.
    let mut publisher = match Conn::open(config, first, "pub", |_| {}).await {
        Ok(c) => c,
        Err(why) => {
            report.checks.push(Check::new(
                Feature::Connect,
                Verdict::Broken,
                format!("{first}: {why}"),
            ));
            return Ok(report);
        }
    };
    report.server = publisher.server.clone();
    report.checks.push(Check::new(
        Feature::Connect,
        Verdict::Works,
        format!("connected to {} node(s)", config.urls.len()),
    ));
    report.checks.push(match report.server.receive_maximum {
        Some(n) => Check::new(
            Feature::ServerReceiveMaximum,
            Verdict::Limited,
            format!("{n} QoS 1 publishes in flight per client"),
        ),
        None => Check::new(
            Feature::ServerReceiveMaximum,
            Verdict::Works,
            "not announced (65,535)",
        ),
    });
    report.checks.push(match report.server.maximum_packet_size {
        Some(n) => Check::new(
            Feature::ServerMaximumPacketSize,
            Verdict::Limited,
            format!("{n} bytes"),
        ),
        None => Check::new(
            Feature::ServerMaximumPacketSize,
            Verdict::Works,
            "not announced (MQTT's 256 MiB)",
        ),
    });

    // QoS 1 delivery across nodes.
    let check = async {
        let mut sub = Conn::open(config, last, "qos1", |_| {}).await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/qos1"))])
            .await?;
        publisher.publish_sequence(&format!("{p}/qos1"), 50).await?;
        let (got, _) = sub.collect(Duration::from_secs(2), |g| g.len() >= 50).await;
        sub.close().await;
        Ok::<_, String>(judge_qos1(50, &sequence_numbers(&got)))
    }
    .await;
    report
        .checks
        .push(check.unwrap_or_else(|why| Check::new(Feature::Qos1Delivery, Verdict::Broken, why)));

    // Response Topic, Correlation Data, User Properties.
    reopen_if_closed(config, &mut publisher).await;
    let sent = PublishProperties {
        response_topic: Some(format!("{p}/props/response")),
        correlation_data: Some(vec![0u8, 1, 0xfe, 0xff, 0, 7].into()),
        user_properties: vec![
            ("sealed-ota".into(), "1".into()),
            ("k".into(), "v1".into()),
            ("k".into(), "v2 ünï".into()),
        ],
        ..PublishProperties::default()
    };
    let checks = async {
        let mut sub = Conn::open(config, last, "props", |_| {}).await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/props"))])
            .await?;
        publisher
            .publish(
                &format!("{p}/props"),
                b"props".to_vec(),
                false,
                sent.clone(),
            )
            .await?;
        let (got, _) = sub.collect(Duration::from_secs(3), |g| !g.is_empty()).await;
        sub.close().await;
        Ok::<_, String>(judge_properties(
            &sent,
            got.first().and_then(|p| p.properties.as_ref()),
        ))
    }
    .await;
    match checks {
        Ok(checks) => report.checks.extend(checks),
        Err(why) => report
            .checks
            .extend(judge_properties(&sent, None).into_iter().map(|mut c| {
                c.detail = why.clone();
                c
            })),
    }

    // Retained messages, their size limit, across a reconnect, and clearing them.
    retained_steps(config, &mut publisher, &mut report).await;

    // The client's Maximum Packet Size.
    reopen_if_closed(config, &mut publisher).await;
    let advertised = 2048u32;
    let check = async {
        let mut sub = Conn::open(config, last, "maxpkt", |o| {
            o.set_max_packet_size(Some(advertised));
        })
        .await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/maxpkt"))])
            .await?;
        let topic = format!("{p}/maxpkt");
        publisher
            .publish(
                &topic,
                random_bytes(2 * advertised as usize),
                false,
                Default::default(),
            )
            .await?;
        publisher
            .publish(&topic, b"small".to_vec(), false, Default::default())
            .await?;
        let (got, closed) = sub
            .collect(Duration::from_secs(3), |g| {
                g.iter().any(|m| m.payload.as_ref() == b"small")
            })
            .await;
        let big = got.iter().any(|m| m.payload.len() > advertised as usize);
        let small = got.iter().any(|m| m.payload.as_ref() == b"small");
        Ok::<_, String>(judge_client_max_packet(
            advertised,
            big,
            small,
            closed.as_deref(),
        ))
    }
    .await;
    let check = check
        .unwrap_or_else(|why| Check::new(Feature::ClientMaximumPacketSize, Verdict::Broken, why));
    report.measured.client_maximum_packet_size_honoured = Some(check.verdict == Verdict::Works);
    report.checks.push(check);

    // Shared subscriptions: members on the last and the first node.
    reopen_if_closed(config, &mut publisher).await;
    let check = async {
        let filter = format!("$share/sealed-ota-probe/{p}/shared");
        let mut a = Conn::open(config, last, "share-a", |_| {}).await?;
        let mut b = Conn::open(config, first, "share-b", |_| {}).await?;
        let granted = a.subscribe(vec![qos1_filter(filter.clone())]).await?
            && b.subscribe(vec![qos1_filter(filter)]).await?;
        if !granted {
            return Ok(judge_shared(40, false, &[], &[]));
        }
        publisher
            .publish_sequence(&format!("{p}/shared"), 40)
            .await?;
        let (got_a, _) = a.collect(Duration::from_millis(1500), |_| false).await;
        let (got_b, _) = b.collect(Duration::from_millis(500), |_| false).await;
        a.close().await;
        b.close().await;
        Ok::<_, String>(judge_shared(
            40,
            true,
            &sequence_numbers(&got_a),
            &sequence_numbers(&got_b),
        ))
    }
    .await;
    report.checks.push(
        check.unwrap_or_else(|why| Check::new(Feature::SharedSubscriptions, Verdict::Broken, why)),
    );

    // Queue: a client that acknowledges nothing (Receive Maximum 10) until the publisher is done.
    reopen_if_closed(config, &mut publisher).await;
    let check = async {
        let mut sub = Conn::open(config, last, "queue", |o| {
            o.set_manual_acks(true);
            o.set_receive_maximum(Some(10));
        })
        .await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/queue"))])
            .await?;
        publisher
            .publish_sequence(&format!("{p}/queue"), QUEUE_PROBE_MESSAGES)
            .await?;
        let mut delivered = std::collections::BTreeSet::new();
        let deadline = Instant::now() + config.step_timeout * 3;
        loop {
            let until = deadline.min(Instant::now() + Duration::from_secs(2));
            match sub.next_until(until).await {
                Some(Seen::Publish(m)) => {
                    if let Ok(n) = <[u8; 4]>::try_from(m.payload.as_ref()) {
                        delivered.insert(u32::from_be_bytes(n));
                    }
                    sub.client.ack(&m).await.map_err(|e| e.to_string())?;
                }
                Some(Seen::Closed(why)) => return Err(why),
                Some(_) => {}
                None => break,
            }
        }
        sub.close().await;
        Ok::<_, String>(delivered.len() as u32)
    }
    .await;
    match check {
        Ok(delivered) => {
            report.measured.queued_delivered = Some(delivered);
            report
                .checks
                .push(judge_queue(QUEUE_PROBE_MESSAGES, delivered));
        }
        Err(why) => report
            .checks
            .push(Check::new(Feature::QueuedMessages, Verdict::Broken, why)),
    }
    publisher.close().await;
    report.fit = campaign_fit(&report.server, &report.measured, &config.assumptions);
    Ok(report)
}

/// A step that broke the publisher's connection must not fail the next one: connect it again.
async fn reopen_if_closed(config: &ProbeConfig, publisher: &mut Conn) {
    if publisher.is_closed() {
        let first = config.urls.first().expect("checked by probe");
        if let Ok(c) = Conn::open(config, first, "pub-again", |_| {}).await {
            *publisher = c;
        }
    }
}

/// Retained steps: sizes (also the basic retained check), after a reconnect, clearing.
async fn retained_steps(config: &ProbeConfig, publisher: &mut Conn, report: &mut BrokerReport) {
    reopen_if_closed(config, publisher).await;
    let p = &config.topic_prefix;
    let last = config.urls.last().expect("checked by probe");
    let server_max = report.server.maximum_packet_size;
    // Sizes that fit the server's maximum, plus the largest payload that does.
    let mut sizes: Vec<u32> = RETAINED_SIZES
        .iter()
        .copied()
        .filter(|s| server_max.is_none_or(|m| *s + 512 <= m))
        .collect();
    if let Some(m) = server_max {
        if m > 1024 && m - 512 < RETAINED_SIZES[RETAINED_SIZES.len() - 1] {
            sizes.push(m - 512);
        }
    }
    let mut payloads = BTreeMap::new();
    let mut results: BTreeMap<u32, bool> = BTreeMap::new();
    let mut closed_on = None;
    for size in &sizes {
        let payload = random_bytes(*size as usize);
        let topic = format!("{p}/retained/{size}");
        match publisher
            .publish(&topic, payload.clone(), true, Default::default())
            .await
        {
            Ok(true) => {
                payloads.insert(topic, payload);
            }
            Ok(false) => {
                results.insert(*size, false);
            }
            Err(why) => {
                // The server closed the publisher: the size is refused; reconnect for the rest.
                results.insert(*size, false);
                closed_on = Some(format!(
                    "; publishing {size} bytes closed the connection ({why})"
                ));
                reopen_if_closed(config, publisher).await;
            }
        }
    }
    let fresh = async {
        let mut sub = Conn::open(config, last, "retained", |_| {}).await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/retained/+"))])
            .await?;
        let expected = payloads.len();
        let (got, _) = sub
            .collect(Duration::from_secs(3), |g| g.len() >= expected)
            .await;
        sub.close().await;
        Ok::<_, String>(got)
    }
    .await;
    let got = match fresh {
        Ok(got) => got,
        Err(why) => {
            report
                .checks
                .push(Check::new(Feature::Retained, Verdict::Broken, why));
            return;
        }
    };
    let intact = |topic: &str| {
        got.iter().any(|m| {
            m.retain
                && m.topic.as_ref() == topic.as_bytes()
                && Some(&m.payload[..]) == payloads.get(topic).map(|v| &v[..])
        })
    };
    for size in &sizes {
        let topic = format!("{p}/retained/{size}");
        results.entry(*size).or_insert_with(|| intact(&topic));
    }
    let smallest = sizes.first().copied();
    let basic_ok = smallest.is_some_and(|s| results.get(&s) == Some(&true));
    report.checks.push(if basic_ok {
        Check::new(
            Feature::Retained,
            Verdict::Works,
            "a later subscriber on another connection got it, flagged retained",
        )
    } else {
        Check::new(
            Feature::Retained,
            Verdict::Broken,
            "a later subscriber did not get the retained message",
        )
    });
    let mut sized = judge_retained_sizes(&results, server_max);
    sized
        .detail
        .push_str(closed_on.as_deref().unwrap_or_default());
    report.checks.push(sized);
    report.measured.largest_retained_payload =
        results.iter().filter(|(_, ok)| **ok).map(|(s, _)| *s).max();
    report.measured.retained_payload_refused = results
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(s, _)| *s)
        .min();

    // After a reconnect: the publisher has left; a subscriber connects, leaves and comes back.
    let topic = format!("{p}/retained/reconnect");
    let payload = b"kept across reconnects".to_vec();
    let check = async {
        let mut once = Conn::open(
            config,
            config.urls.first().expect("checked"),
            "ret-pub",
            |_| {},
        )
        .await?;
        once.publish(&topic, payload.clone(), true, Default::default())
            .await?;
        once.close().await;
        let mut got_twice = 0;
        let mut again = None;
        for round in 0..2 {
            let mut sub = Conn::open(config, last, &format!("ret-sub{round}"), |_| {}).await?;
            if sub.retained_on_subscribe(&topic, &payload).await? {
                got_twice += 1;
                if round == 1 {
                    // The same filter once more on the same connection.
                    again = Some(sub.retained_on_subscribe(&topic, &payload).await?);
                }
            }
            sub.close().await;
        }
        let reconnect = if got_twice == 2 {
            Check::new(
                Feature::RetainedAfterReconnect,
                Verdict::Works,
                "delivered after the publisher left, and again after the subscriber reconnected",
            )
        } else {
            Check::new(
                Feature::RetainedAfterReconnect,
                Verdict::Broken,
                format!("delivered on {got_twice} of 2 connections after the publisher left"),
            )
        };
        Ok::<_, String>((reconnect, judge_resubscribe(again)))
    }
    .await;
    match check {
        Ok((reconnect, resubscribe)) => report.checks.extend([reconnect, resubscribe]),
        Err(why) => report.checks.extend([
            Check::new(Feature::RetainedAfterReconnect, Verdict::Broken, why),
            Check::new(
                Feature::RetainedOnResubscribe,
                Verdict::NotTested,
                "the reconnect step failed",
            ),
        ]),
    }

    // Clearing: an empty retained publish on every topic used; a fresh subscriber gets nothing.
    let mut cleared = true;
    for t in payloads.keys().cloned().chain([topic]) {
        cleared &= matches!(
            publisher
                .publish(&t, Vec::new(), true, Default::default())
                .await,
            Ok(true)
        );
    }
    let check = async {
        let mut sub = Conn::open(config, last, "cleared", |_| {}).await?;
        sub.subscribe(vec![qos1_filter(format!("{p}/retained/+"))])
            .await?;
        let (got, _) = sub.collect(Duration::from_secs(2), |_| false).await;
        sub.close().await;
        let left = got.iter().filter(|m| !m.payload.is_empty()).count();
        Ok::<_, String>(if cleared && left == 0 {
            Check::new(
                Feature::RetainedClear,
                Verdict::Works,
                "an empty retained publish removed each one",
            )
        } else {
            Check::new(
                Feature::RetainedClear,
                Verdict::Broken,
                format!("{left} retained messages still delivered after clearing"),
            )
        })
    }
    .await;
    report
        .checks
        .push(check.unwrap_or_else(|why| Check::new(Feature::RetainedClear, Verdict::Broken, why)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos1_verdicts() {
        assert_eq!(judge_qos1(3, &[0, 1, 2]).verdict, Verdict::Works);
        assert_eq!(judge_qos1(3, &[0, 2]).verdict, Verdict::Broken);
        assert_eq!(judge_qos1(3, &[0, 2, 1]).verdict, Verdict::Broken);
        assert_eq!(judge_qos1(3, &[0, 1, 1, 2]).verdict, Verdict::Limited);
        assert_eq!(judge_qos1(2, &[0, 1, 0]).verdict, Verdict::Limited);
    }

    #[test]
    fn property_verdicts_name_what_changed() {
        let sent = PublishProperties {
            response_topic: Some("r".into()),
            correlation_data: Some(vec![0u8, 1].into()),
            user_properties: vec![("k".into(), "a".into()), ("k".into(), "b".into())],
            ..PublishProperties::default()
        };
        let all_ok = judge_properties(&sent, Some(&sent));
        assert!(all_ok.iter().all(|c| c.verdict == Verdict::Works));
        let mut altered = sent.clone();
        altered.user_properties.pop();
        let checks = judge_properties(&sent, Some(&altered));
        let user = checks
            .iter()
            .find(|c| c.feature == Feature::UserProperties)
            .unwrap();
        assert_eq!(user.verdict, Verdict::Broken);
        assert!(user.detail.contains("\"b\""), "{}", user.detail);
        assert!(judge_properties(&sent, None)
            .iter()
            .all(|c| c.verdict == Verdict::Broken));
    }

    #[test]
    fn retained_size_verdicts() {
        let r = |v: &[(u32, bool)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        assert_eq!(
            judge_retained_sizes(&r(&[(1024, true), (4096, true)]), None).verdict,
            Verdict::Works
        );
        let limited = judge_retained_sizes(&r(&[(1024, true), (4096, false)]), Some(5000));
        assert_eq!(limited.verdict, Verdict::Limited);
        assert!(
            limited.detail.contains("1024 bytes kept, 4096"),
            "{}",
            limited.detail
        );
        assert_eq!(
            judge_retained_sizes(&r(&[(1024, false), (4096, true)]), None).verdict,
            Verdict::Broken
        );
        assert_eq!(
            judge_retained_sizes(&r(&[(1024, false)]), None).verdict,
            Verdict::Broken
        );
    }

    #[test]
    fn client_max_packet_verdicts() {
        assert_eq!(
            judge_client_max_packet(2048, false, true, None).verdict,
            Verdict::Works
        );
        let broken = judge_client_max_packet(2048, false, false, Some("reset"));
        assert_eq!(broken.verdict, Verdict::Broken);
        assert!(broken.detail.contains("was lost"), "{}", broken.detail);
        assert_eq!(
            judge_client_max_packet(2048, true, true, None).verdict,
            Verdict::Broken
        );
        assert_eq!(
            judge_client_max_packet(2048, false, false, None).verdict,
            Verdict::Broken
        );
    }

    #[test]
    fn shared_subscription_verdicts() {
        assert_eq!(
            judge_shared(4, true, &[0, 2], &[1, 3]).verdict,
            Verdict::Works
        );
        assert_eq!(
            judge_shared(4, true, &[0, 1, 2, 3], &[]).verdict,
            Verdict::Works
        );
        assert_eq!(
            judge_shared(2, true, &[0, 1], &[0, 1]).verdict,
            Verdict::Broken,
            "not shared at all"
        );
        assert_eq!(judge_shared(3, true, &[0], &[1]).verdict, Verdict::Broken);
        assert_eq!(
            judge_shared(3, true, &[0, 1], &[1, 2]).verdict,
            Verdict::Limited
        );
        assert_eq!(judge_shared(3, false, &[], &[]).verdict, Verdict::Broken);
    }

    #[test]
    fn resubscribe_verdicts() {
        assert_eq!(judge_resubscribe(Some(true)).verdict, Verdict::Works);
        assert_eq!(judge_resubscribe(Some(false)).verdict, Verdict::Limited);
        assert_eq!(judge_resubscribe(None).verdict, Verdict::NotTested);
    }

    #[test]
    fn queue_verdicts() {
        assert_eq!(judge_queue(1500, 1500).verdict, Verdict::Works);
        assert_eq!(judge_queue(1500, 1010).verdict, Verdict::Limited);
    }

    #[test]
    fn the_fit_takes_the_least_limit_and_stays_under_it() {
        let assumptions = FitAssumptions::default();
        let open = campaign_fit(
            &ServerLimits::default(),
            &MeasuredLimits::default(),
            &assumptions,
        );
        assert_eq!(open.chunk_packet_limit, assumptions.device_max_packet_size);
        let chunk = open.max_chunk_size.unwrap();
        let topics = sealed_ota_protocol::TopicTree::new("iot", &"m".repeat(32)).unwrap();
        let id = "00000000-0000-0000-0000-000000000000";
        let count = |c: u32| assumptions.image_size.div_ceil(u64::from(c)) as u32;
        let bound =
            |c: u32| sealed_ota_protocol::wire::chunk_packet_bound(&topics, id, c, count(c));
        assert!(bound(chunk) <= open.chunk_packet_limit);
        assert!(
            bound(chunk + 1024) > open.chunk_packet_limit,
            "the largest that fits"
        );
        assert!(chunk > 200 * 1024, "{chunk}");
        assert_eq!(open.max_window, None);
        assert_eq!(open.operator_inflight, crate::MANAGER_OUTGOING_INFLIGHT);

        let server = ServerLimits {
            receive_maximum: Some(16),
            maximum_packet_size: Some(64 * 1024),
            ..ServerLimits::default()
        };
        let measured = MeasuredLimits {
            largest_retained_payload: Some(16 * 1024),
            retained_payload_refused: Some(32 * 1024),
            queued_delivered: Some(1010),
            client_maximum_packet_size_honoured: Some(false),
        };
        let tight = campaign_fit(&server, &measured, &assumptions);
        assert_eq!(tight.chunk_packet_limit, 16 * 1024 + 256);
        assert!(tight.max_chunk_size.unwrap() <= 16 * 1024);
        assert!(bound(tight.max_chunk_size.unwrap()) <= tight.chunk_packet_limit);
        assert_eq!(tight.max_window, Some(1010));
        assert_eq!(tight.operator_inflight, 16);
        assert!(
            tight.notes.iter().any(|n| n.contains("disconnects")),
            "{:?}",
            tight.notes
        );
        assert!(tight.notes.iter().any(|n| n.contains("Receive Maximum 16")));
    }

    #[test]
    fn the_report_round_trips_through_json() {
        let report = BrokerReport {
            urls: vec!["mqtts://127.0.0.1:8883".into()],
            server: ServerLimits {
                receive_maximum: Some(16),
                ..ServerLimits::default()
            },
            checks: vec![judge_queue(10, 5)],
            measured: MeasuredLimits::default(),
            fit: campaign_fit(
                &ServerLimits::default(),
                &MeasuredLimits::default(),
                &FitAssumptions::default(),
            ),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"queuedMessages\""), "{json}");
        assert_eq!(serde_json::from_str::<BrokerReport>(&json).unwrap(), report);
        assert!(report.usable());
    }
}
