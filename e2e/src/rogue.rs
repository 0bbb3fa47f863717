//! The malicious broker of the end-to-end tests: a rogue client on the test bed's plain
//! listener, which may subscribe and publish anywhere. It sees what the manager and the devices
//! exchange and writes into their topics (replays, alterations, held-back messages published
//! later, cleared retained messages), which is what a man-in-the-middle between the devices and
//! Mosquitto could do. It drops nothing in flight: tests that need a broker that drops messages use
//! `product::PrivateBroker` with an ACL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};

use crate::{wait_for, TestBed};

/// One message the rogue saw.
#[derive(Clone, Debug)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag as delivered (retain-as-published).
    pub retain: bool,
    /// Properties.
    pub props: Option<PublishProperties>,
}

/// A client of the plain listener (anonymous, allowed to publish anywhere): it records what it
/// is subscribed to (not its own publishes) and publishes whatever it likes, QoS 1, waiting for
/// the broker's acknowledgement.
pub struct Rogue {
    client: AsyncClient,
    seen: Arc<Mutex<Vec<Msg>>>,
    acked: Arc<AtomicU64>,
    sent: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Rogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rogue")
            .field("seen", &self.seen.lock().map(|s| s.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Rogue {
    /// Connects to the test bed's plain listener and subscribes to `filter` (retained messages
    /// delivered as retained).
    pub async fn start(bed: &TestBed, id: &str, filter: &str) -> Result<Self> {
        let client_id: String = format!("rogue-{id}-{:08x}", rand::random::<u32>());
        let mut options = bed.mqtt_options(&client_id)?;
        options.set_max_packet_size(Some(16 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let (sink, acks, sub, filter) = (
            seen.clone(),
            acked.clone(),
            client.clone(),
            filter.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // No local echo: what the rogue publishes is not recorded as seen.
                        let f = Filter {
                            nolocal: true,
                            preserve_retain: true,
                            ..Filter::new(filter.clone(), QoS::AtLeastOnce)
                        };
                        let _ = sub.subscribe_many([f]).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().unwrap().push(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            props: p.properties,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("rogue: no SUBACK")??;
        Ok(Rogue {
            client,
            seen,
            acked,
            sent: AtomicU64::new(0),
            task,
        })
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Msg> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `check` finds what it looks for in what was seen.
    pub async fn until<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Msg]) -> Option<T>,
    ) -> Result<T> {
        wait_for(what, timeout, || {
            let found = check(&self.seen.lock().unwrap());
            async move { Ok(found) }
        })
        .await
    }

    /// Publishes (QoS 1) and waits until the broker acknowledged it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        props: Option<&PublishProperties>,
    ) -> Result<()> {
        // Only what a publisher may send: no subscription identifiers, no topic alias.
        let props = props
            .map(|p| PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user_properties.clone(),
                content_type: p.content_type.clone(),
                ..PublishProperties::default()
            })
            .unwrap_or_default();
        let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props)
            .await?;
        let acked = self.acked.clone();
        wait_for(
            "the broker's PUBACK of a rogue publish",
            Duration::from_secs(10),
            || {
                let done = acked.load(Ordering::SeqCst) >= n;
                async move { Ok(done.then_some(())) }
            },
        )
        .await
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The retained messages the broker holds under `filter` right now (a fresh subscriber's view).
pub async fn retained(bed: &TestBed, filter: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let reader = Rogue::start(bed, "reader", filter).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(reader
        .seen()
        .into_iter()
        .filter(|m| m.retain && !m.payload.is_empty())
        .map(|m| (m.topic, m.payload))
        .collect())
}
