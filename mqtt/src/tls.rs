//! The outer channel's TLS client configuration (rustls with the ring provider, the one crypto
//! provider of the whole workspace): the broker's CA roots, an optional client certificate, and
//! no TLS session resumption (rustls's cache costs ~20 KiB per client, and an MQTT client
//! reconnects too rarely to gain from it). Errors say which PEM input failed, never its bytes.

use std::sync::Arc;

use rumqttc::{TlsConfiguration, Transport};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why TLS material was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The broker CA PEM could not be read or holds no certificate.
    #[error("broker CA: {0}")]
    Roots(String),
    /// The client certificate chain could not be read.
    #[error("client certificate: {0}")]
    Certificate(String),
    /// The client private key could not be read.
    #[error("client private key: {0}")]
    Key(String),
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("client certificate and key: {0}")]
    Config(String),
}

/// Install ring as the process-wide rustls crypto provider (the workspace builds rustls without a
/// default one). Harmless when one is already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Root store from the PEM certificates that signed the broker's server certificate.
pub fn roots_from_pem(pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Roots(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Roots("the PEM holds no certificate".into()));
    }
    Ok(Arc::new(roots))
}

/// A client configuration trusting `roots`, authenticating with `client` (certificate chain PEM,
/// private key PEM) when given.
pub fn client_config(
    roots: Arc<RootCertStore>,
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Certificate(e.to_string()))?;
            if chain.is_empty() {
                return Err(TlsError::Certificate("the PEM holds no certificate".into()));
            }
            let key =
                PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(e.to_string()))?
        }
    };
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The rumqttc transport for a TLS client configuration.
pub fn transport(config: Arc<ClientConfig>) -> Transport {
    Transport::Tls(TlsConfiguration::Rustls(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String, String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ca = sealed_ota_protocol::CertificateAuthority::generate("test-ca", now, 1).unwrap();
        let device = ca
            .issue(sealed_ota_protocol::Role::Device, "dev-00001", now, 1)
            .unwrap();
        (
            ca.cert_pem(),
            device.cert_pem(),
            device.key_pem().to_string(),
        )
    }

    #[test]
    fn a_client_pair_is_loaded_and_bad_material_is_named() {
        let (ca, cert, key) = pair();
        let roots = roots_from_pem(ca.as_bytes()).unwrap();
        let config = client_config(roots.clone(), Some((cert.as_bytes(), key.as_bytes()))).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        assert!(!client_config(roots.clone(), None)
            .unwrap()
            .client_auth_cert_resolver
            .has_certs());
        assert!(matches!(roots_from_pem(b"CA"), Err(TlsError::Roots(_))));
        assert!(matches!(
            client_config(roots.clone(), Some((cert.as_bytes(), b"not a key"))),
            Err(TlsError::Key(_))
        ));
        assert!(matches!(
            client_config(roots, Some((b"", key.as_bytes()))),
            Err(TlsError::Certificate(_))
        ));
    }
}
