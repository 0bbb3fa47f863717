//! Prometheus metrics (one registry, prefix `sealed_ota_operator`) and the tiny HTTP listener that
//! serves `/metrics`, `/healthz` and `/readyz`.
//!
//! The listener speaks just enough HTTP/1.1 for probes and scrapers: one request per connection,
//! bounded request size, no bodies. It never exposes anything but these three paths.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::error::Error;

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
    /// Signed install receipts.
    pub installs: IntCounter,
    /// Device failures by reason.
    pub device_failures: IntCounterVec,
    /// Invalid inbound protocol messages by reason.
    pub protocol_errors: IntCounterVec,
    /// Bytes of MQTT payload published.
    pub bytes_published: IntCounter,
    /// MQTT messages published.
    pub messages_published: IntCounter,
    /// 1 while the broker connection is up.
    pub mqtt_connected: IntGauge,
    /// Broker connection losses.
    pub mqtt_disconnects: IntCounter,
    /// Status writes to the apiserver by kind (campaign, device).
    pub status_writes: IntCounterVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
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
            installs: counter("installs_total", "Signed install receipts received"),
            device_failures: counter_vec("device_failures_total", "Device failures", &["reason"]),
            protocol_errors: counter_vec(
                "protocol_errors_total",
                "Invalid inbound protocol messages (forged, replayed, wrong session)",
                &["reason"],
            ),
            bytes_published: counter("mqtt_published_bytes_total", "Payload bytes published"),
            messages_published: counter("mqtt_published_messages_total", "Messages published"),
            mqtt_connected: gauge("mqtt_connected", "1 while the broker connection is up"),
            mqtt_disconnects: counter("mqtt_disconnects_total", "Broker connection losses"),
            status_writes: counter_vec(
                "status_writes_total",
                "Status writes to the apiserver",
                &["kind"],
            ),
            leader: gauge("leader", "1 while this replica holds the leader Lease"),
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

    /// Answer for one request path: (status line, content type, body).
    fn respond(&self, path: &str) -> (&'static str, &'static str, String) {
        match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", self.render()),
            "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                ("200 OK", "text/plain", "ready\n".into())
            }
            "/readyz" => (
                "503 Service Unavailable",
                "text/plain",
                "not ready\n".into(),
            ),
            _ => ("404 Not Found", "text/plain", "not found\n".into()),
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

    /// Serve connections from `listener` forever.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while len < buf.len() {
                        match sock.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => len += n,
                        }
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap_or(path);
                let (status, ctype, body) = this.respond(path);
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
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
        assert_eq!(m.respond("/healthz").0, "200 OK");
        assert_eq!(m.respond("/readyz").0, "503 Service Unavailable");
        m.set_ready(true);
        assert_eq!(m.respond("/readyz").0, "200 OK");
        assert_eq!(m.respond("/secret").0, "404 Not Found");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
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
    }
}
