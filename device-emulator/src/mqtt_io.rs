//! The seam between the protocol's plain-data MQTT view and rumqttc's v5 client: connection
//! options for one device (TLS with its own certificate, MQTT 5 properties), received
//! PUBLISH → [`Inbound`], and [`Action`] → client requests. No protocol logic lives here.
//!
//! Each device gets its own rustls `ClientConfig` (its certificate and key), sharing one root
//! store, with TLS session resumption off: rustls's default cache would cost ~20 KiB per device
//! and a device reconnects too rarely to gain from it.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use sealed_ota_protocol::{Action, Inbound, Properties};

use crate::error::{Error, Result};

/// Where the broker is and how to reach it.
#[derive(Debug, Clone)]
pub struct BrokerEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS (`mqtts://`) or plain (`mqtt://`).
    pub tls: bool,
    /// Roots that signed the broker's server certificate (TLS only).
    pub roots: Option<Arc<RootCertStore>>,
}

impl BrokerEndpoint {
    /// Parses `mqtt://host:port` or `mqtts://host:port`.
    pub fn parse(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Self> {
        let bad = |why: &str| Error::Config(format!("broker URL {url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected mqtt://host:port or mqtts://host:port"))?;
        let tls = match scheme {
            "mqtts" | "ssl" => true,
            "mqtt" | "tcp" => false,
            _ => return Err(bad("scheme must be mqtt or mqtts")),
        };
        let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| bad("bad port"))?),
            None => (rest.trim_end_matches('/'), if tls { 8883 } else { 1883 }),
        };
        let roots = match (tls, ca_pem) {
            (false, _) => None,
            (true, None) => return Err(bad("TLS needs the broker's CA certificate")),
            (true, Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| bad(&format!("broker CA: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad(&format!("broker CA: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(bad("the broker CA file holds no certificate"));
                }
                Some(Arc::new(roots))
            }
        };
        Ok(BrokerEndpoint {
            host: host.to_string(),
            port,
            tls,
            roots,
        })
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
        let tls_error = |reason: String| Error::Tls {
            device: device_id.to_string(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| tls_error(format!("certificate: {e}")))?;
        // The parse error says which PEM section failed, never the key's bytes.
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| tls_error(format!("private key: {e}")))?;
        let mut config = ClientConfig::builder()
            .with_root_certificates(Arc::clone(roots))
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_error(e.to_string()))?;
        config.resumption = Resumption::disabled();
        Ok(Some(Arc::new(config)))
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
    let mut options = MqttOptions::new(device_id, endpoint.host.clone(), endpoint.port);
    options.set_keep_alive(keep_alive);
    options.set_clean_start(true);
    options.set_max_packet_size(Some(max_packet_size));
    options.set_connection_timeout(30);
    // rumqttc preallocates one slot per in-flight packet id (65,536 by default, ~10 MiB per
    // client); a device has a handful of publishes in flight at most.
    options.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    if let Some(config) = tls {
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    }
    options
}

/// A received PUBLISH as the protocol sees it. The payload is copied once (the session owns it).
pub fn inbound_from(publish: &Publish) -> Inbound {
    let properties = publish
        .properties
        .as_ref()
        .map(|p| Properties {
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_ref().map(|d| d.to_vec()),
            user_properties: p.user_properties.clone(),
            content_type: p.content_type.clone(),
        })
        .unwrap_or_default();
    Inbound {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: publish.payload.to_vec(),
        properties,
    }
}

/// Hands the protocol's actions to the client (QoS 1 always). The client's request channel is
/// drained by the connection task, so awaiting here cannot deadlock.
pub async fn perform(client: &AsyncClient, actions: Vec<Action>) -> Result<(), ClientError> {
    for action in actions {
        match action {
            Action::Publish(out) => {
                let properties = PublishProperties {
                    response_topic: out.properties.response_topic,
                    correlation_data: out.properties.correlation_data.map(Into::into),
                    user_properties: out.properties.user_properties,
                    content_type: out.properties.content_type,
                    ..PublishProperties::default()
                };
                client
                    .publish_with_properties(
                        out.topic,
                        QoS::AtLeastOnce,
                        out.retain,
                        out.payload,
                        properties,
                    )
                    .await?;
            }
            Action::Subscribe(filters) => {
                let filters: Vec<Filter> = filters
                    .into_iter()
                    .map(|f| Filter::new(f, QoS::AtLeastOnce))
                    .collect();
                if !filters.is_empty() {
                    client.subscribe_many(filters).await?;
                }
            }
            Action::Unsubscribe(filters) => {
                for filter in filters {
                    client.unsubscribe(filter).await?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let plain = BrokerEndpoint::parse("mqtt://127.0.0.1:1884", None).unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.tls),
            ("127.0.0.1", 1884, false)
        );
        let err =
            BrokerEndpoint::parse("mqtts://broker.example", Some(b"CA".to_vec())).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err = BrokerEndpoint::parse("mqtts://h:1", None).unwrap_err();
        assert!(err.to_string().contains("CA"), "{err}");
        assert!(BrokerEndpoint::parse("http://h:1", None).is_err());
    }

    #[test]
    fn publish_properties_become_protocol_properties() {
        let mut publish = Publish::new("iot/m/d/notify", QoS::AtLeastOnce, vec![1, 2, 3], None);
        publish.properties = Some(PublishProperties {
            response_topic: Some("iot/m/d/ready".into()),
            correlation_data: Some(vec![9u8].into()),
            user_properties: vec![("sealed-ota-version".into(), "1".into())],
            content_type: Some("application/cbor".into()),
            ..PublishProperties::default()
        });
        let inbound = inbound_from(&publish);
        assert_eq!(inbound.topic, "iot/m/d/notify");
        assert_eq!(inbound.payload, [1, 2, 3]);
        assert_eq!(
            inbound.properties.response_topic.as_deref(),
            Some("iot/m/d/ready")
        );
        assert_eq!(inbound.properties.correlation_data, Some(vec![9]));
        assert_eq!(inbound.properties.user_properties.len(), 1);
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
            Transport::Tls(TlsConfiguration::Rustls(_))
        ));
        let err = endpoint
            .device_tls("dev-00001", &device.cert_pem(), "not a key")
            .unwrap_err();
        assert!(err.to_string().contains("dev-00001"), "{err}");
    }
}
