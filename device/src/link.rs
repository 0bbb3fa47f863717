//! A device's connection to the broker: its endpoint (URL and broker CA, parsed once for the
//! fleet) and its MQTT options (client id, its own certificate, the Maximum Packet Size it
//! advertises). Property conversion and action execution are the shared `sealed-ota-mqtt`
//! adapter's, re-exported here. No protocol logic lives here.
//!
//! Each device gets its own rustls `ClientConfig` (its certificate and key), sharing one root
//! store. A broker of several nodes (a cluster) is given as several URLs: devices spread over
//! them by position and move to the next node when a connection is lost.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use rustls::{ClientConfig, RootCertStore};
use sealed_ota_mqtt::{tls, BrokerUrl};

use crate::error::{Error, Result};

pub use sealed_ota_mqtt::{inbound_from, perform, refused, resubscribe};

/// Where the broker is and how to reach it.
#[derive(Debug, Clone)]
pub struct BrokerEndpoint {
    /// Host, port and whether TLS is used (the first node's).
    pub url: BrokerUrl,
    /// Every node, `url` first.
    pub nodes: Vec<BrokerUrl>,
    /// Roots that signed the broker's server certificate (TLS only).
    pub roots: Option<Arc<RootCertStore>>,
}

impl BrokerEndpoint {
    /// Parses the broker URL (see [`BrokerUrl`]), or several separated by commas (the nodes of
    /// a cluster, all TLS or all plain), and, for TLS, the broker's CA certificate(s).
    pub fn parse(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Self> {
        let nodes = url
            .split(',')
            .map(|u| BrokerUrl::parse(u.trim()).map_err(|e| Error::Config(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let parsed = nodes[0].clone();
        if nodes.iter().any(|n| n.tls != parsed.tls) {
            return Err(Error::Config(format!(
                "broker URLs {url:?}: mix mqtts:// and mqtt://; the nodes of one broker use one scheme"
            )));
        }
        let roots = match (parsed.tls, ca_pem) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::Config(format!(
                    "broker URL {url:?}: TLS needs the broker's CA certificate (--broker-ca)"
                )))
            }
            (true, Some(pem)) => Some(
                tls::roots_from_pem(&pem)
                    .map_err(|e| Error::Config(format!("broker URL {url:?}: {e}")))?,
            ),
        };
        Ok(BrokerEndpoint {
            url: parsed,
            nodes,
            roots,
        })
    }

    /// Node `n` modulo the number of nodes.
    pub fn node(&self, n: usize) -> &BrokerUrl {
        &self.nodes[n % self.nodes.len()]
    }

    /// The TLS client configuration of one device: the shared roots, its certificate and key.
    pub fn device_tls(
        &self,
        device_id: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Option<Arc<ClientConfig>>> {
        let Some(roots) = &self.roots else {
            return Ok(None);
        };
        tls::client_config(
            Arc::clone(roots),
            Some((cert_pem.as_bytes(), key_pem.as_bytes())),
        )
        .map(Some)
        .map_err(|e| Error::Tls {
            device: device_id.to_string(),
            reason: e.to_string(),
        })
    }
}

/// QoS 1 publishes a device may have unacknowledged at once.
pub const OUTGOING_INFLIGHT: u16 = 16;

/// Connection options of one device: client id = device id, clean start, the device's own
/// certificate for TLS client authentication, and the Maximum Packet Size it advertises (which
/// rumqttc also enforces on incoming packets).
pub fn device_options(
    endpoint: &BrokerEndpoint,
    device_id: &str,
    tls: Option<Arc<ClientConfig>>,
    max_packet_size: u32,
    keep_alive: Duration,
) -> MqttOptions {
    device_options_on(&endpoint.url, device_id, tls, max_packet_size, keep_alive)
}

/// [`device_options`] for one node of the broker.
pub fn device_options_on(
    node: &BrokerUrl,
    device_id: &str,
    tls: Option<Arc<ClientConfig>>,
    max_packet_size: u32,
    keep_alive: Duration,
) -> MqttOptions {
    let mut options = MqttOptions::new(device_id, node.host.clone(), node.port);
    options.set_keep_alive(keep_alive);
    options.set_clean_start(true);
    options.set_max_packet_size(Some(max_packet_size));
    options.set_connection_timeout(30);
    // rumqttc preallocates one slot per in-flight packet id (65,536 by default, ~10 MiB per
    // client); a device has a handful of publishes in flight at most.
    options.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    if let Some(config) = tls {
        options.set_transport(tls::transport(config));
    }
    options
}

/// Requests (publishes, subscriptions) a device may queue for its event loop.
const REQUEST_CAPACITY: usize = 32;

/// Events rumqttc's event loop holds for the device at first; the queue grows when needed.
pub const EVENT_QUEUE_START: usize = 4;

/// The client and event loop of one device connection. rumqttc preallocates room for 100
/// events a connection (about 38 KiB), which becomes resident as its ring buffer turns over
/// during a campaign: the emulator grew by about that much per device once every device had
/// installed. A device has a few events waiting at most, so the queue starts at
/// [`EVENT_QUEUE_START`] and grows on demand.
pub fn device_client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    eventloop.state.events.shrink_to(EVENT_QUEUE_START);
    (client, eventloop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let plain = BrokerEndpoint::parse("mqtt://127.0.0.1:1884", None).unwrap();
        assert_eq!(
            (plain.url.host.as_str(), plain.url.port, plain.url.tls),
            ("127.0.0.1", 1884, false)
        );
        let err =
            BrokerEndpoint::parse("mqtts://broker.example", Some(b"CA".to_vec())).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err = BrokerEndpoint::parse("mqtts://h:1", None).unwrap_err();
        assert!(err.to_string().contains("CA"), "{err}");
        assert!(BrokerEndpoint::parse("http://h:1", None).is_err());
        let cluster = BrokerEndpoint::parse("mqtt://a:1, mqtt://b:2,mqtt://c:3", None).unwrap();
        assert_eq!(cluster.url.host, "a");
        let hosts: Vec<&str> = (0..4).map(|n| cluster.node(n).host.as_str()).collect();
        assert_eq!(hosts, ["a", "b", "c", "a"]);
        let err = BrokerEndpoint::parse("mqtt://a:1,mqtts://b:2", None).unwrap_err();
        assert!(err.to_string().contains("one scheme"), "{err}");
        assert!(BrokerEndpoint::parse("mqtt://a:1,", None).is_err());
    }

    #[test]
    fn tls_options_carry_the_device_certificate() {
        crate::install_crypto_provider();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ca = sealed_ota_protocol::CertificateAuthority::generate("test-ca", now, 1).unwrap();
        let device = ca
            .issue(sealed_ota_protocol::Role::Device, "dev-00001", now, 1)
            .unwrap();
        let endpoint =
            BrokerEndpoint::parse("mqtts://127.0.0.1:8883", Some(ca.cert_pem().into_bytes()))
                .unwrap();
        let tls = endpoint
            .device_tls("dev-00001", &device.cert_pem(), &device.key_pem())
            .unwrap();
        assert!(tls.as_ref().unwrap().client_auth_cert_resolver.has_certs());
        let options = device_options(&endpoint, "dev-00001", tls, 4096, Duration::from_secs(30));
        assert_eq!(options.client_id(), "dev-00001");
        assert_eq!(options.max_packet_size(), Some(4096));
        assert_eq!(
            options.get_outgoing_inflight_upper_limit(),
            Some(OUTGOING_INFLIGHT)
        );
        assert!(matches!(
            options.transport(),
            rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(_))
        ));
        let (_client, eventloop) = device_client(options);
        assert!(
            eventloop.state.events.capacity() < 2 * EVENT_QUEUE_START,
            "rumqttc's 100-event queue is not trimmed: {}",
            eventloop.state.events.capacity()
        );
        let err = endpoint
            .device_tls("dev-00001", &device.cert_pem(), "not a key")
            .unwrap_err();
        assert!(err.to_string().contains("dev-00001"), "{err}");
    }
}
