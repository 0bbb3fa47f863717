//! The operator's error type: one `thiserror` enum at the crate boundary, each variant saying what
//! failed and with what, and a `metric_label()` for the reconcile-error counter.
//!
//! Problems a person must fix in the cluster (missing Secret, bad payload) are not errors here: the
//! controller turns them into a condition and a Warning Event and waits for a change.

use sealed_ota_protocol::{IdentityError, ProtocolError, TopicError};

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API {action}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The MQTT client refused a request (its request queue is closed).
    #[error("MQTT client: {0}")]
    Mqtt(#[source] Box<rumqttc::v5::ClientError>),
    /// The MQTT session's tasks have ended (the operator is shutting down).
    #[error("the MQTT session has ended")]
    MqttSessionEnded,
    /// The broker connection could not be configured.
    #[error("MQTT configuration: {0}")]
    MqttConfig(String),
    /// The broker URL (--broker-url) is invalid.
    #[error("--broker-url: {0}")]
    BrokerUrl(#[from] sealed_ota_mqtt::UrlError),
    /// The broker TLS material (CA, client certificate or key) is invalid.
    #[error("broker TLS material: {0}")]
    BrokerTls(#[from] sealed_ota_mqtt::tls::TlsError),
    /// The topic prefix or manager id is invalid.
    #[error("topics: {0}")]
    Topics(#[from] TopicError),
    /// An identity could not be loaded.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    /// The protocol crate refused to prepare a campaign.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// Reading a local file (TLS material) failed.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics listener could not bind.
    #[error("metrics listener on {addr}: {source}")]
    Metrics {
        /// Address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),
    /// The finalizer wrapper failed (adding/removing the finalizer, or the step inside it).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A blocking task panicked or was cancelled.
    #[error("background task: {0}")]
    Join(String),
    /// The firmware cache directory failed (disk full, permissions).
    #[error("firmware cache: {0}")]
    Cache(String),
    /// The broker is not connected and the step needs it.
    #[error("MQTT broker unavailable: {0}")]
    BrokerUnavailable(String),
    /// An object has no namespace or name (should not happen for namespaced resources).
    #[error("object without {0}")]
    MissingMetadata(&'static str),
    /// A watch cache stopped before its initial list was in (the operator is shutting down).
    #[error("the {0} cache stopped before its initial list")]
    CacheStopped(&'static str),
    /// `--shards` is not a power of two from 1 to 64.
    #[error("{0}")]
    Shards(#[from] crate::shards::ShardCountError),
}

impl From<rumqttc::v5::ClientError> for Error {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        Error::Mqtt(Box::new(e))
    }
}

impl Error {
    /// Short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Mqtt(_) | Error::MqttSessionEnded => "mqtt",
            Error::MqttConfig(_) | Error::BrokerUrl(_) | Error::BrokerTls(_) => "mqtt_config",
            Error::Topics(_) => "topics",
            Error::Identity(_) => "identity",
            Error::Protocol(_) => "protocol",
            Error::File { .. } => "file",
            Error::Metrics { .. } => "metrics",
            Error::Lease(_) => "lease",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Join(_) => "join",
            Error::Cache(_) => "cache",
            Error::BrokerUnavailable(_) => "broker_unavailable",
            Error::MissingMetadata(_) => "metadata",
            Error::CacheStopped(_) => "cache_stopped",
            Error::Shards(_) => "config",
        }
    }

    /// Wrap a kube error with what was being done.
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { action, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable() {
        assert_eq!(Error::Lease("x".into()).metric_label(), "lease");
        assert_eq!(Error::MissingMetadata("name").metric_label(), "metadata");
        assert_eq!(
            Error::MqttConfig("bad".into()).to_string(),
            "MQTT configuration: bad"
        );
    }
}
