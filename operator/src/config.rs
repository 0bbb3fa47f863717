//! Command-line and environment configuration of `sealed-ota-operator run`.
//!
//! Only plain values here; loading files and Secrets happens where they are used. The broker password
//! is wrapped so that `Debug` never prints it.

use std::path::PathBuf;

/// A secret string whose `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Redacted(s.to_owned()))
    }
}

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// Settings of a running operator.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Broker URL: mqtt://host:port or mqtts://host:port; for a clustered broker every node's URL,
    /// comma-separated (the replica starts at the first and moves to the next when a connection is
    /// lost).
    #[arg(long, env = "SEALED_OTA_BROKER_URL")]
    pub broker_url: String,
    /// PEM file with the CA that signs the broker's certificate (mqtts).
    #[arg(long, env = "SEALED_OTA_BROKER_CA_FILE")]
    pub broker_ca_file: Option<PathBuf>,
    /// PEM client certificate for the broker (mqtts with client authentication).
    #[arg(long, env = "SEALED_OTA_BROKER_CERT_FILE")]
    pub broker_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "SEALED_OTA_BROKER_KEY_FILE")]
    pub broker_key_file: Option<PathBuf>,
    /// Secret in the operator namespace with ca.crt, tls.crt and tls.key for the broker connection
    /// (instead of the files).
    #[arg(long, env = "SEALED_OTA_BROKER_TLS_SECRET")]
    pub broker_tls_secret: Option<String>,
    /// Username for the broker.
    #[arg(long, env = "SEALED_OTA_BROKER_USERNAME")]
    pub broker_username: Option<String>,
    /// Password for the broker.
    #[arg(long, env = "SEALED_OTA_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<Redacted>,
    /// Secret in the operator namespace with keys username and password for the broker.
    #[arg(long, env = "SEALED_OTA_BROKER_CREDENTIALS_SECRET")]
    pub broker_credentials_secret: Option<String>,
    /// Namespace of the operator itself: broker Secrets and the leader Lease live there.
    #[arg(
        long,
        env = "SEALED_OTA_OPERATOR_NAMESPACE",
        default_value = "sealed-ota"
    )]
    pub operator_namespace: String,
    /// MQTT topic prefix.
    #[arg(long, env = "SEALED_OTA_TOPIC_PREFIX", default_value = "iot")]
    pub topic_prefix: String,
    /// Manager id: the CN of the manager certificate and a topic level.
    #[arg(long, env = "SEALED_OTA_MANAGER_ID", default_value = "manager")]
    pub manager_id: String,
    /// Namespaces to watch (comma-separated); empty watches all namespaces.
    #[arg(
        long = "namespace",
        env = "SEALED_OTA_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Address of the /metrics, /healthz and /readyz listener.
    #[arg(long, env = "SEALED_OTA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
    /// Log format.
    #[arg(
        long,
        env = "SEALED_OTA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Run only while holding the leader Lease.
    #[arg(long, env = "SEALED_OTA_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "SEALED_OTA_LEASE_NAME",
        default_value = "sealed-ota-operator"
    )]
    pub lease_name: String,
    /// Identity of this replica in the Leases (defaults to the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Shards the fleet is split into (a power of two, 1-64, the same on every replica): each
    /// replica drives the devices of the shards whose Lease it holds; one replica (the holder of the
    /// leader Lease) adds the shards up into each campaign's status.
    #[arg(long, env = "SEALED_OTA_SHARDS", default_value_t = 1)]
    pub shards: u32,
    /// Directory for downloaded firmware images and their encrypted chunks (emptied at start; in
    /// the chart an emptyDir or PVC sized by `cache.size`). It needs room for the largest image
    /// twice while it is prepared, then once per running campaign.
    #[arg(
        long,
        env = "SEALED_OTA_CACHE_DIR",
        default_value = "/var/cache/sealed-ota"
    )]
    pub cache_dir: PathBuf,
    /// Most chunk bytes of one campaign kept retained on the broker at once. A campaign whose
    /// chunks fit is published whole when it starts; a larger one is served as devices ask
    /// (oldest chunks cleared first), so the broker never holds a whole large image.
    #[arg(long, env = "SEALED_OTA_RETAINED_CHUNK_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub retained_chunk_bytes: u64,
    /// Largest firmware image accepted from a URL or an OCI registry, in bytes.
    #[arg(long, env = "SEALED_OTA_MAX_IMAGE_BYTES", default_value_t = 4 * 1024 * 1024 * 1024)]
    pub max_image_bytes: u64,
}

impl Config {
    /// Identity of this replica.
    pub fn replica_identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into());
            // Two processes on one host are two replicas.
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn parses_flags_and_redacts_password() {
        let cli = Cli::try_parse_from([
            "x",
            "--broker-url",
            "mqtts://b:8883",
            "--broker-password",
            "hunter2",
            "--namespace",
            "a,b",
            "--leader-election",
            "false",
        ])
        .unwrap();
        assert_eq!(cli.config.namespaces, vec!["a", "b"]);
        assert_eq!(cli.config.topic_prefix, "iot");
        assert!(!cli.config.leader_election);
        let debug = format!("{:?}", cli.config);
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
