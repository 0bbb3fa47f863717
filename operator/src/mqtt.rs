//! The one shared MQTT 5 session of the manager (rumqttc `v5`).
//!
//! A task drives the rumqttc event loop: it reconnects with exponential backoff (moving to the
//! next node of a clustered broker when a connection is lost), subscribes the manager's current
//! `ready` and `status` filters on every CONNACK, and forwards inbound PUBLISHes to the engine
//! over a channel. A second task follows the filters as they change (a replica's shards come and
//! go): it subscribes what was added and unsubscribes what was removed. A SUBACK that refuses
//! filters (a clustered broker under load answers `Unspecified`) is counted and the current
//! filters are subscribed again after a backoff: a refused filter would otherwise silently cut a
//! bucket of devices off. Everything the broker says is a hint; this module only moves bytes and
//! reports the connection state. It never logs payloads or credentials.
//!
//! The event loop task never waits for the dispatcher: it keeps reading the broker (and sending
//! the keep-alive's PINGREQ, and reading its PINGRESP) however far behind the dispatcher is.
//! Back-pressure is MQTT 5's own flow control instead: the manager acknowledges a message only
//! when the dispatcher takes it from the [`InboundQueue`] (in the order received, as MQTT
//! requires), so the broker has at most [`MANAGER_RECEIVE_MAXIMUM`] messages in flight towards
//! the manager and the queue never holds more. (It used to wait for room in a bounded channel;
//! behind a long burst it then stopped reading for longer than the keep-alive, and rumqttc called
//! the connection dead on "Last pingreq isn't acked": once per 30,000-device run.)
//!
//! The dispatcher must never wait for the event loop either: it hands its actions to
//! [`MqttSession::execute_detached`], a FIFO that a third task feeds to the client. Had it waited
//! for room in the client's request channel while the event loop waited for it, each would wait
//! for the other: at 30,000 devices both replicas stopped reading from the broker this way.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sealed_ota_protocol::{Action, Inbound, Outbound};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::metrics::Metrics;

/// Where and how to connect.
#[derive(Clone)]
pub struct BrokerSettings {
    /// Host name or address and TCP port of each broker node, in the order this replica tries them
    /// (a cluster's nodes; one for a single broker). On a lost connection the session moves to the
    /// next node.
    pub nodes: Vec<(String, u16)>,
    /// TLS client configuration (broker CA, optional client certificate); `None` for plain mqtt://.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// MQTT client id (unique per replica: a broker disconnects an older session of the same id).
    pub client_id: String,
    /// MQTT keep-alive ([`KEEP_ALIVE`] in the operator; tests shorten it).
    pub keep_alive: Duration,
    /// MQTT 5 Receive Maximum announced in CONNECT ([`MANAGER_RECEIVE_MAXIMUM`] in the operator):
    /// the broker's in-flight window towards the manager, so the most the [`InboundQueue`] holds.
    pub receive_maximum: u16,
}

/// The manager's MQTT keep-alive: a PINGREQ at least this often, and the connection is called
/// dead when its PINGRESP has not been read by the next one. 60 s, the common default (Mosquitto's
/// and Paho's clients): with 30 s, an rmqtt cluster node busy with 30,000 devices connecting
/// answered a PINGREQ more than 30 s late, and one replica lost its connection in each of five
/// 30,000-device runs (docs/scale.md).
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("nodes", &self.nodes)
            .field("tls", &self.tls.is_some())
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("client_id", &self.client_id)
            .field("keep_alive", &self.keep_alive)
            .field("receive_maximum", &self.receive_maximum)
            .finish()
    }
}

impl BrokerSettings {
    /// The rumqttc options of node `n` (modulo the node count).
    fn options(&self, n: usize) -> MqttOptions {
        let (host, port) = &self.nodes[n % self.nodes.len()];
        let mut opts = MqttOptions::new(self.client_id.clone(), host.clone(), *port);
        opts.set_keep_alive(self.keep_alive);
        opts.set_clean_start(true);
        // Acknowledged when the dispatcher takes a message (`InboundQueue::recv`): flow control.
        opts.set_manual_acks(true);
        opts.set_max_packet_size(Some(16 * 1024 * 1024));
        // MQTT 5 Receive Maximum: the broker may have this many QoS 1 messages in flight towards
        // the manager. Thousands of devices answer at once; with the broker's default window
        // (Mosquitto: 20) the rest wait in the manager's queue there, and past
        // max_queued_messages (1,000) Mosquitto silently drops them (a lost receipt then costs a
        // device timeout). In-flight messages do not count towards that queue.
        opts.set_receive_maximum(Some(self.receive_maximum));
        // And the other way: rumqttc allocates a slot per publish it may have in flight.
        opts.set_outgoing_inflight_upper_limit(sealed_ota_mqtt::MANAGER_OUTGOING_INFLIGHT);
        if let Some((user, pass)) = &self.credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        if let Some(tls) = &self.tls {
            opts.set_transport(sealed_ota_mqtt::tls::transport(tls.clone()));
        }
        opts
    }
}

/// Filters per SUBSCRIBE packet (a replica holding shards has two per bucket, up to 512).
const FILTERS_PER_SUBSCRIBE: usize = 64;

/// `filters` at the protocol's QoS, in SUBSCRIBE-sized batches.
fn subscribe_batches(filters: &[String]) -> impl Iterator<Item = Vec<Filter>> + '_ {
    filters.chunks(FILTERS_PER_SUBSCRIBE).map(|batch| {
        batch
            .iter()
            .map(|f| Filter::new(f.clone(), sealed_ota_mqtt::QOS))
            .collect()
    })
}

/// Subscribe the filters added and unsubscribe those removed, each time `filters` changes. (A
/// new connection subscribes the whole current set itself.)
async fn follow_filters(client: AsyncClient, mut filters: watch::Receiver<Vec<String>>) {
    use std::collections::BTreeSet;
    let mut before: BTreeSet<String> = filters.borrow_and_update().iter().cloned().collect();
    while filters.changed().await.is_ok() {
        let now: BTreeSet<String> = filters.borrow_and_update().iter().cloned().collect();
        let added: Vec<String> = now.difference(&before).cloned().collect();
        for batch in subscribe_batches(&added) {
            if let Err(e) = client.subscribe_many(batch).await {
                tracing::warn!(error = %e, "subscribe request failed");
            }
        }
        for f in before.difference(&now) {
            if let Err(e) = client.unsubscribe(f.clone()).await {
                tracing::warn!(filter = %f, error = %e, "unsubscribe request failed");
            }
        }
        tracing::info!(
            filters = now.len(),
            added = added.len(),
            removed = before.len() + added.len() - now.len(),
            "subscriptions follow the shards held"
        );
        before = now;
    }
}

/// Subscribe the current `filters` again after `wait` (a SUBACK refused some); `pending` is
/// cleared when done, so refusals arriving meanwhile share this one resubscription.
fn resubscribe_later(
    client: AsyncClient,
    filters: watch::Receiver<Vec<String>>,
    pending: Arc<AtomicBool>,
    wait: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        pending.store(false, Ordering::SeqCst);
        let current = filters.borrow().clone();
        for batch in current.chunks(FILTERS_PER_SUBSCRIBE) {
            if let Err(e) = sealed_ota_mqtt::resubscribe(&client, batch).await {
                tracing::warn!(error = %e, "subscribe request failed");
            }
        }
    });
}

/// State of the broker connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected yet.
    Connecting,
    /// CONNACK received, subscriptions requested.
    Connected,
    /// The last attempt failed with this error; retrying with backoff.
    Down(String),
}

/// The devices' messages read from the broker, in the order received, until the dispatcher takes
/// them. Each is acknowledged to the broker as it is taken, so the broker's in-flight window (the
/// manager's Receive Maximum) bounds what waits here; the event loop never waits for this queue.
#[derive(Debug)]
pub struct InboundQueue {
    /// Each message with the connection it came on (see `connection`).
    messages: mpsc::UnboundedReceiver<(u64, Publish)>,
    client: AsyncClient,
    /// The current connection, counted up at each CONNACK: a message read on an earlier one is
    /// not acknowledged, because its packet id means nothing on (or names another message of)
    /// the new clean-start connection.
    connection: Arc<AtomicU64>,
    queued: IntGauge,
}

impl InboundQueue {
    /// The next message, acknowledged to the broker (which may then send one more); `None` when
    /// the session has ended.
    pub async fn recv(&mut self) -> Option<Inbound> {
        let (connection, publish) = self.messages.recv().await?;
        self.queued.dec();
        // Waits for room in the client's request channel, which the event loop always drains.
        if connection == self.connection.load(Ordering::Acquire) {
            if let Err(e) = self.client.ack(&publish).await {
                tracing::debug!(error = %e, "the MQTT client is gone; acknowledgement dropped");
            }
        }
        Some(sealed_ota_mqtt::inbound_from(&publish))
    }
}

/// Handle to the shared session: publish and observe the connection.
#[derive(Clone, Debug)]
pub struct MqttSession {
    client: AsyncClient,
    state: watch::Receiver<ConnState>,
    metrics: Metrics,
    /// Actions carried out in order by the forwarding task, without the caller waiting.
    detached: mpsc::UnboundedSender<Vec<Action>>,
}

/// The MQTT client id of replica `identity` of manager `manager_id`: one per replica, because a
/// broker disconnects the older of two sessions with the same client id.
pub fn client_id(manager_id: &str, identity: &str) -> String {
    use sha2::Digest;
    let replica = sha2::Sha256::digest(identity.as_bytes());
    format!("sealed-ota-{manager_id}-{}", hex::encode(&replica[..4]))
}

/// Requests (publishes, subscriptions) the client queues for the event loop.
pub const REQUEST_CHANNEL_CAPACITY: usize = 4096;

/// Receive Maximum the manager announces in CONNECT (the protocol's largest).
pub const MANAGER_RECEIVE_MAXIMUM: u16 = u16::MAX;

impl MqttSession {
    /// Start the session task. Inbound PUBLISHes go to the returned [`InboundQueue`] (the task
    /// ends when it is dropped); the current `filters` are subscribed on every connection and
    /// followed as they change (until their sender is dropped).
    pub fn start(
        settings: BrokerSettings,
        filters: watch::Receiver<Vec<String>>,
        metrics: Metrics,
    ) -> (Self, InboundQueue, JoinHandle<()>) {
        let mut node = 0;
        let opts = settings.options(node);
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL_CAPACITY);
        let (inbound, messages) = mpsc::unbounded_channel::<(u64, Publish)>();
        let connection = Arc::new(AtomicU64::new(0));
        let queue = InboundQueue {
            messages,
            client: client.clone(),
            connection: connection.clone(),
            queued: metrics.mqtt_inbound_queued.clone(),
        };
        let (state_tx, state) = watch::channel(ConnState::Connecting);
        let (detached, mut detached_rx) = mpsc::unbounded_channel::<Vec<Action>>();
        let forward_client = client.clone();
        tokio::spawn(async move {
            while let Some(actions) = detached_rx.recv().await {
                if let Err(e) = sealed_ota_mqtt::perform(&forward_client, actions).await {
                    tracing::warn!(error = %e, "the MQTT client is gone; detached actions dropped");
                    return;
                }
            }
        });
        let task_client = client.clone();
        let task_metrics = metrics.clone();
        tokio::spawn(follow_filters(client.clone(), filters.clone()));
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            let resubscribing = Arc::new(AtomicBool::new(false));
            let mut refusals: u32 = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(500);
                        refusals = 0;
                        connection.fetch_add(1, Ordering::AcqRel);
                        task_metrics.mqtt_connected.set(1);
                        let (host, port) = &settings.nodes[node % settings.nodes.len()];
                        tracing::info!(%host, port, "connected to broker");
                        // Not awaited: this task drains the client's request channel.
                        let current = filters.borrow().clone();
                        for batch in subscribe_batches(&current) {
                            if let Err(e) = task_client.try_subscribe_many(batch) {
                                tracing::warn!(error = %e, "subscribe request failed");
                            }
                        }
                        let _ = state_tx.send(ConnState::Connected);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        task_metrics.mqtt_inbound_queued.inc();
                        if inbound
                            .send((connection.load(Ordering::Acquire), p))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(suback))) => {
                        let codes = sealed_ota_mqtt::refused(&suback);
                        if codes.is_empty() {
                            continue;
                        }
                        task_metrics
                            .mqtt_subscriptions_refused
                            .inc_by(codes.len() as u64);
                        refusals = refusals.saturating_add(1);
                        let wait = Duration::from_secs(1 << refusals.min(5));
                        tracing::warn!(?codes, retry_in = ?wait, "the broker refused subscriptions; subscribing again");
                        if !resubscribing.swap(true, Ordering::SeqCst) {
                            resubscribe_later(
                                task_client.clone(),
                                filters.clone(),
                                resubscribing.clone(),
                                wait,
                            );
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        tracing::warn!(reason = ?d.reason_code, "broker sent DISCONNECT");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let was_up = *state_tx.borrow() == ConnState::Connected;
                        if was_up {
                            task_metrics.mqtt_disconnects.inc();
                        }
                        task_metrics.mqtt_connected.set(0);
                        tracing::warn!(error = %e, retry_in = ?backoff, "broker connection failed");
                        let _ = state_tx.send(ConnState::Down(e.to_string()));
                        if inbound.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        if settings.nodes.len() > 1 {
                            // A cluster: try the next node (rumqttc reconnects with these options).
                            node += 1;
                            eventloop.options = settings.options(node);
                            backoff = Duration::from_millis(500);
                        } else {
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        });
        (
            Self {
                client,
                state,
                metrics,
                detached,
            },
            queue,
            task,
        )
    }

    /// Current connection state.
    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    /// Wait until connected or `timeout` passes; returns whether connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == ConnState::Connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Publish one message at QoS 1.
    pub async fn publish(&self, out: Outbound) -> Result<(), Error> {
        self.execute(vec![Action::Publish(out)]).await
    }

    /// Carry out a protocol session's actions in order, waiting for room in the client's
    /// request channel (back-pressure on a caller that publishes a lot, such as a campaign's
    /// start). Never from the task that reads the inbound channel: see
    /// [`MqttSession::execute_detached`].
    pub async fn execute(&self, actions: Vec<Action>) -> Result<(), Error> {
        self.count(&actions);
        sealed_ota_mqtt::perform(&self.client, actions).await?;
        Ok(())
    }

    /// Queue a protocol session's actions, in order with the other detached ones, without
    /// waiting: for the task that reads the inbound channel (the module's doc says why). What it
    /// queues is bounded by what it reads, which the broker's in-flight window bounds.
    pub fn execute_detached(&self, actions: Vec<Action>) -> Result<(), Error> {
        if actions.is_empty() {
            return Ok(());
        }
        self.count(&actions);
        self.detached
            .send(actions)
            .map_err(|_| Error::MqttSessionEnded)
    }

    fn count(&self, actions: &[Action]) {
        for a in actions {
            if let Action::Publish(out) = a {
                self.metrics.messages_published.inc();
                self.metrics
                    .bytes_published
                    .inc_by(out.payload.len() as u64);
            }
        }
    }

    /// Disconnect politely (best effort).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_bounds_its_publishes_in_flight_and_opens_its_receive_window() {
        let settings = BrokerSettings {
            nodes: vec![("broker-a".into(), 1883), ("broker-b".into(), 1884)],
            tls: None,
            credentials: None,
            client_id: "sealed-ota-m-1".into(),
            keep_alive: KEEP_ALIVE,
            receive_maximum: MANAGER_RECEIVE_MAXIMUM,
        };
        let opts = settings.options(1);
        assert_eq!(opts.broker_address(), ("broker-b".to_owned(), 1884));
        // Unset, rumqttc allocates 65,535 outgoing slots (14 MiB) per session.
        assert_eq!(
            opts.get_outgoing_inflight_upper_limit(),
            Some(sealed_ota_mqtt::MANAGER_OUTGOING_INFLIGHT)
        );
        assert_eq!(
            opts.connect_properties().and_then(|p| p.receive_maximum),
            Some(MANAGER_RECEIVE_MAXIMUM)
        );
        assert!(opts.manual_acks());
    }
}
