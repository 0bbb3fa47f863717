//! Prometheus metrics (one registry, prefix `sealed_ota_operator`) and the routes of the HTTP
//! listener (`crate::http`): `/metrics`, `/healthz` and `/readyz`, nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::StatusCode;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::error::Error;
use crate::http::Reply;

/// Every metric the operator exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes.
    pub reconciliations: IntCounter,
    /// Reconcile errors by `Error::metric_label`.
    pub reconcile_errors: IntCounterVec,
    /// Devices per campaign and phase.
    pub campaign_devices: IntGaugeVec,
    /// Completed manager-side handshakes.
    pub handshakes: IntCounter,
    /// Readies that came again byte for byte (QoS 1 duplicates, or re-sent while their update
    /// was on the way), answered with the same update without verifying them again.
    pub repeated_readies: IntCounter,
    /// Signed install receipts.
    pub installs: IntCounter,
    /// Device failures by reason.
    pub device_failures: IntCounterVec,
    /// Device attempts that timed out and were retried (a broker that drops messages shows here
    /// before any device fails).
    pub device_retries: IntCounter,
    /// Signed post-install health reports by result (`healthy` = "true" or "false").
    pub health_reports: IntCounterVec,
    /// Invalid inbound protocol messages by reason.
    pub protocol_errors: IntCounterVec,
    /// Bytes of MQTT payload published.
    pub bytes_published: IntCounter,
    /// MQTT messages published.
    pub messages_published: IntCounter,
    /// Chunk messages published (first publishes and republishes, from the cache).
    pub chunks_served: IntCounter,
    /// 1 while the broker connection is up.
    pub mqtt_connected: IntGauge,
    /// Broker connection losses.
    pub mqtt_disconnects: IntCounter,
    /// Subscriptions the broker refused in a SUBACK (each refusal is followed by a
    /// resubscription of the current filters).
    pub mqtt_subscriptions_refused: IntCounter,
    /// Messages read from the broker and not yet taken by the dispatcher (unacknowledged, so at
    /// most the Receive Maximum the manager announces).
    pub mqtt_inbound_queued: IntGauge,
    /// Status writes to the apiserver by kind (campaign, device, shard report).
    pub status_writes: IntCounterVec,
    /// 1 while this replica holds the leader Lease (it coordinates campaigns).
    pub leader: IntGauge,
    /// Shards whose Lease this replica holds.
    pub shards_held: IntGauge,
    /// Devices' messages received, by whether their shard is held here (`false`: a message the
    /// broker need not have sent this replica; per-shard subscriptions keep it near 0).
    pub inbound_messages: IntCounterVec,
    ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("sealed_ota_operator")
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |n: &str, h: &str| {
            let c = IntCounter::with_opts(opts(n, h)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |n: &str, h: &str, l: &[&str]| {
            let c = IntCounterVec::new(opts(n, h), l).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |n: &str, h: &str| {
            let g = IntGauge::with_opts(opts(n, h)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let campaign_devices = IntGaugeVec::new(
            opts("campaign_devices", "Devices of a campaign per phase"),
            &["namespace", "campaign", "phase"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(campaign_devices.clone()))
            .expect("unique metric");
        Self {
            reconciliations: counter("reconciliations_total", "Reconcile passes"),
            reconcile_errors: counter_vec("reconcile_errors_total", "Reconcile errors", &["error"]),
            campaign_devices,
            handshakes: counter("handshakes_total", "Completed manager-side handshakes"),
            repeated_readies: counter(
                "repeated_readies_total",
                "Readies that came again byte for byte, answered without verifying them again",
            ),
            installs: counter("installs_total", "Signed install receipts received"),
            device_failures: counter_vec("device_failures_total", "Device failures", &["reason"]),
            device_retries: counter(
                "device_retries_total",
                "Device attempts that timed out and were retried after a backoff",
            ),
            health_reports: counter_vec(
                "health_reports_total",
                "Signed post-install health reports from devices",
                &["healthy"],
            ),
            protocol_errors: counter_vec(
                "protocol_errors_total",
                "Invalid inbound protocol messages (forged, replayed, wrong session)",
                &["reason"],
            ),
            bytes_published: counter("mqtt_published_bytes_total", "Payload bytes published"),
            messages_published: counter("mqtt_published_messages_total", "Messages published"),
            chunks_served: counter(
                "chunks_served_total",
                "Chunk messages published (first publishes and republishes)",
            ),
            mqtt_connected: gauge("mqtt_connected", "1 while the broker connection is up"),
            mqtt_disconnects: counter("mqtt_disconnects_total", "Broker connection losses"),
            mqtt_subscriptions_refused: counter(
                "mqtt_subscriptions_refused_total",
                "Subscriptions the broker refused in a SUBACK (subscribed again)",
            ),
            mqtt_inbound_queued: gauge(
                "mqtt_inbound_queued",
                "Messages read from the broker, not yet taken by the dispatcher nor acknowledged",
            ),
            status_writes: counter_vec(
                "status_writes_total",
                "Status writes to the apiserver",
                &["kind"],
            ),
            leader: gauge("leader", "1 while this replica holds the leader Lease"),
            shards_held: gauge("shards_held", "Shards whose Lease this replica holds"),
            inbound_messages: counter_vec(
                "mqtt_inbound_messages_total",
                "Devices' ready and status messages received, by whether this replica holds their shard",
                &["shard_held"],
            ),
            ready: Arc::new(AtomicBool::new(false)),
            registry,
        }
    }

    /// Mark the operator ready (or not) for /readyz.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The reply for one request path.
    fn respond(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4",
                body: self.render().into(),
            },
            "/healthz" => Reply::text(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                Reply::text(StatusCode::OK, "ready\n")
            }
            "/readyz" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Bind the listener; serve until the task is dropped.
    pub async fn bind(&self, addr: &str) -> Result<(TcpListener, std::net::SocketAddr), Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Metrics {
                addr: addr.to_owned(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| Error::Metrics {
            addr: addr.to_owned(),
            source,
        })?;
        Ok((listener, local))
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` from `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        crate::http::serve(listener, move |path| self.respond(path)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_prefixed_metrics_and_probes() {
        let m = Metrics::new();
        m.handshakes.inc();
        m.device_failures.with_label_values(&["Timeout"]).inc();
        let text = m.render();
        assert!(text.contains("sealed_ota_operator_handshakes_total 1"));
        assert!(text.contains("sealed_ota_operator_device_failures_total{reason=\"Timeout\"} 1"));
        assert_eq!(m.respond("/healthz").status, StatusCode::OK);
        assert_eq!(m.respond("/readyz").status, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready(true);
        assert_eq!(m.respond("/readyz").status, StatusCode::OK);
        assert_eq!(m.respond("/secret").status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Metrics::new();
        let (listener, addr) = m.bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(m.clone().serve(listener));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"));
        assert!(out.contains("sealed_ota_operator_reconciliations_total"));
        // Anything but GET is refused.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    }
}
