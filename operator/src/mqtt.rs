//! The one shared MQTT 5 session of the manager (rumqttc `v5`).
//!
//! A task drives the rumqttc event loop: it reconnects with exponential backoff, resubscribes the
//! manager's `ready` and `status` filters on every CONNACK, and forwards inbound PUBLISHes to the
//! engine over a channel. Everything the broker says is a hint; this module only moves bytes and
//! reports the connection state. It never logs payloads or credentials.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use sealed_ota_protocol::{Action, Inbound, Outbound, Properties};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::metrics::Metrics;

/// Where and how to connect.
#[derive(Clone)]
pub struct BrokerSettings {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS material; `None` for plain mqtt://.
    pub tls: Option<TlsMaterial>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// MQTT client id.
    pub client_id: String,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// PEM TLS material for the broker connection.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA certificate(s) that sign the broker's certificate.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key, for brokers that require them.
    pub client: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem_len", &self.ca_pem.len())
            .field("client_auth", &self.client.is_some())
            .finish()
    }
}

/// Parse `mqtt://host:port` or `mqtts://host:port` into (tls, host, port). Pure.
pub fn parse_broker_url(url: &str) -> Result<(bool, String, u16), Error> {
    let bad = |why: &str| Error::MqttConfig(format!("broker URL {url:?}: {why}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| bad("port is not a number"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(bad("host is empty"));
    }
    Ok((tls, host.trim_matches(['[', ']']).to_owned(), port))
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

/// Handle to the shared session: publish and observe the connection.
#[derive(Clone, Debug)]
pub struct MqttSession {
    client: AsyncClient,
    state: watch::Receiver<ConnState>,
    metrics: Metrics,
}

fn to_properties(p: &Properties) -> PublishProperties {
    PublishProperties {
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Into::into),
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
        ..PublishProperties::default()
    }
}

fn from_properties(p: Option<PublishProperties>) -> Properties {
    let Some(p) = p else {
        return Properties::default();
    };
    Properties {
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(|b| b.to_vec()),
        user_properties: p.user_properties,
        content_type: p.content_type,
    }
}

/// Receive Maximum the manager announces in CONNECT (the protocol's largest).
pub const MANAGER_RECEIVE_MAXIMUM: u16 = u16::MAX;

impl MqttSession {
    /// Start the session task. Inbound PUBLISHes go to `inbound`; `filters` are (re)subscribed on
    /// every connection.
    pub fn start(
        settings: BrokerSettings,
        filters: Vec<String>,
        inbound: mpsc::Sender<Inbound>,
        metrics: Metrics,
    ) -> (Self, JoinHandle<()>) {
        let mut opts = MqttOptions::new(
            settings.client_id.clone(),
            settings.host.clone(),
            settings.port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(16 * 1024 * 1024));
        // MQTT 5 Receive Maximum: the broker may have this many QoS 1 messages in flight towards
        // the manager. Thousands of devices answer at once; with the broker's default window
        // (Mosquitto: 20) the rest wait in the manager's queue there, and past
        // max_queued_messages (1,000) Mosquitto silently drops them (a lost receipt then costs a
        // device timeout). In-flight messages do not count towards that queue.
        opts.set_receive_maximum(Some(MANAGER_RECEIVE_MAXIMUM));
        if let Some((user, pass)) = &settings.credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        if let Some(tls) = &settings.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: tls.ca_pem.clone(),
                alpn: None,
                client_auth: tls.client.as_ref().map(|(c, k)| (c.clone(), k.to_vec())),
            }));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        let (state_tx, state) = watch::channel(ConnState::Connecting);
        let task_client = client.clone();
        let task_metrics = metrics.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(500);
                        task_metrics.mqtt_connected.set(1);
                        tracing::info!(host = %settings.host, port = settings.port, "connected to broker");
                        for f in &filters {
                            if let Err(e) = task_client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                tracing::warn!(filter = %f, error = %e, "subscribe request failed");
                            }
                        }
                        let _ = state_tx.send(ConnState::Connected);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Inbound {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            properties: from_properties(p.properties),
                        };
                        if inbound.send(msg).await.is_err() {
                            return;
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
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
        (
            Self {
                client,
                state,
                metrics,
            },
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
        self.metrics.messages_published.inc();
        self.metrics
            .bytes_published
            .inc_by(out.payload.len() as u64);
        let props = to_properties(&out.properties);
        self.client
            .publish_with_properties(out.topic, QoS::AtLeastOnce, out.retain, out.payload, props)
            .await?;
        Ok(())
    }

    /// Carry out a protocol session's actions in order.
    pub async fn execute(&self, actions: Vec<Action>) -> Result<(), Error> {
        for a in actions {
            match a {
                Action::Publish(out) => self.publish(out).await?,
                Action::Subscribe(filters) => {
                    for f in filters {
                        self.client.subscribe(f, QoS::AtLeastOnce).await?;
                    }
                }
                Action::Unsubscribe(filters) => {
                    for f in filters {
                        self.client.unsubscribe(f).await?;
                    }
                }
            }
        }
        Ok(())
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
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1883").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.example").unwrap(),
            (true, "broker.example".into(), 8883)
        );
        assert!(parse_broker_url("http://x").is_err());
        assert!(parse_broker_url("mqtt://:1").is_err());
        assert!(parse_broker_url("mqtt://h:port").is_err());
    }

    #[test]
    fn properties_round_trip() {
        let p = Properties {
            response_topic: Some("a/b".into()),
            correlation_data: Some(vec![1, 2]),
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("x".into()),
        };
        assert_eq!(from_properties(Some(to_properties(&p))), p);
        assert_eq!(from_properties(None), Properties::default());
    }
}
