//! The Sealed OTA operator: custom resources, the campaign controller and
//! the MQTT side of the manager. The binary in `main.rs` only wires these
//! together; tests run the same [`run`] in-process.
#![forbid(unsafe_code)]

pub mod arbitration;
pub mod chunk_cache;
pub mod config;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod credentials;
pub mod device_status;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod firmware;
pub mod gates;
pub mod http;
pub mod inputs;
pub mod metrics;
pub mod mqtt;
pub mod oci;
pub mod plan;
pub mod policy;
pub mod preview;
pub mod prometheus;
pub mod ramp;
pub mod reasons;
pub mod retained;
pub mod rollout;
pub mod runs;
pub mod schedule;
pub mod status;
pub mod time;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use sealed_ota_protocol::TopicTree;
use tokio::sync::mpsc;

pub use config::Config;
pub use error::Error;
pub use metrics::Metrics;

use crate::mqtt::{BrokerSettings, MqttSession};
use sealed_ota_mqtt::BrokerUrl;

/// Aborts a spawned task when dropped, so that dropping [`run`]'s future (a killed operator in a test,
/// a lost lease) stops everything it started: no orphaned MQTT connection or lease renewal.
#[derive(Debug)]
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })
}

async fn secret_data(client: &Client, ns: &str, name: &str) -> Result<Secret, Error> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(Error::kube("reading a broker Secret"))
}

fn key_of(secret: &Secret, key: &str) -> Result<Vec<u8>, Error> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .ok_or_else(|| {
            Error::MqttConfig(format!(
                "Secret {} has no key {key:?}",
                secret.metadata.name.as_deref().unwrap_or_default()
            ))
        })
}

/// Build the broker settings from flags, files and Secrets (in the operator namespace).
pub async fn broker_settings(config: &Config, client: &Client) -> Result<BrokerSettings, Error> {
    let url = BrokerUrl::parse(&config.broker_url)?;
    let tls = if !url.tls {
        None
    } else {
        let (ca_pem, client_pair) = if let Some(name) = &config.broker_tls_secret {
            let s = secret_data(client, &config.operator_namespace, name).await?;
            let client_pair = match (key_of(&s, "tls.crt"), key_of(&s, "tls.key")) {
                (Ok(c), Ok(k)) => Some((c, zeroize::Zeroizing::new(k))),
                _ => None,
            };
            (key_of(&s, "ca.crt")?, client_pair)
        } else {
            let ca_file = config.broker_ca_file.as_ref().ok_or_else(|| {
                Error::MqttConfig("mqtts:// needs --broker-ca-file or --broker-tls-secret".into())
            })?;
            let client_pair = match (&config.broker_cert_file, &config.broker_key_file) {
                (Some(c), Some(k)) => Some((read_file(c)?, zeroize::Zeroizing::new(read_file(k)?))),
                (None, None) => None,
                _ => {
                    return Err(Error::MqttConfig(
                        "--broker-cert-file and --broker-key-file go together".into(),
                    ))
                }
            };
            (read_file(ca_file)?, client_pair)
        };
        let roots = sealed_ota_mqtt::tls::roots_from_pem(&ca_pem)?;
        Some(sealed_ota_mqtt::tls::client_config(
            roots,
            client_pair
                .as_ref()
                .map(|(c, k)| (c.as_slice(), k.as_slice())),
        )?)
    };
    let credentials = if let Some(name) = &config.broker_credentials_secret {
        let s = secret_data(client, &config.operator_namespace, name).await?;
        let user = String::from_utf8_lossy(&key_of(&s, "username")?).into_owned();
        let pass = String::from_utf8_lossy(&key_of(&s, "password")?).into_owned();
        Some((user, pass))
    } else {
        config.broker_username.as_ref().map(|u| {
            (
                u.clone(),
                config
                    .broker_password
                    .as_ref()
                    .map(|p| p.0.clone())
                    .unwrap_or_default(),
            )
        })
    };
    Ok(BrokerSettings {
        host: url.host,
        port: url.port,
        tls,
        credentials,
        client_id: format!("sealed-ota-manager-{}", config.manager_id),
    })
}

/// Run the operator until `shutdown` completes: metrics listener, leader election, and while leader
/// the MQTT session, the engine and one controller per watched namespace.
pub async fn run(
    config: Config,
    client: Client,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    // One TLS crypto provider for the process (kube and rumqttc both use rustls with ring). A second
    // install attempt (tests run several operators) fails harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Metrics::new();
    let (listener, addr) = metrics.bind(&config.metrics_addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    let _server = AbortOnDrop(tokio::spawn(metrics.clone().serve(listener)));
    run_with_metrics(config, client, metrics, shutdown).await
}

async fn run_with_metrics(
    config: Config,
    client: Client,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    if !config.leader_election {
        metrics.set_ready(true);
        metrics.leader.set(1);
        // Without election this replica leads for its whole life.
        let (_leads, leading) = tokio::sync::watch::channel(true);
        return active(&config, &client, &metrics, shutdown, leading).await;
    }
    let identity = config.replica_identity();
    let lease = LeaseManagerBuilder::new(client.clone(), config.lease_name.clone())
        .with_namespace(config.operator_namespace.clone())
        .with_identity(identity.clone())
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (mut leader, lease_task) = lease.watch().await;
    let mut lease_task = AbortOnDrop(lease_task);
    metrics.set_ready(true);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            changed = leader.wait_for(|l| *l) => {
                if changed.is_err() {
                    break Err(Error::Lease("lease watcher stopped".into()));
                }
            }
        }
        tracing::info!(%identity, lease = %config.lease_name, "became leader");
        metrics.leader.set(1);
        let mut lost = leader.clone();
        let lost = async move {
            let _ = lost.wait_for(|l| !*l).await;
        };
        let outcome = tokio::select! {
            _ = &mut shutdown => Some(Ok(())),
            r = active(&config, &client, &metrics, lost, leader.clone()) => match r {
                Ok(()) => None,
                Err(e) => Some(Err(e)),
            },
        };
        metrics.leader.set(0);
        if let Some(r) = outcome {
            break r;
        }
        tracing::warn!(%identity, "lost the leader lease; stopped publishing");
    };
    // Dropping the receiver releases the lease so a standby replica takes over at once.
    drop(leader);
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut lease_task.0).await;
    result
}

/// The leader's work: MQTT session, engine, device-status writers, controllers. Returns when `stop`
/// completes (shutdown or lost lease); everything it started is stopped. The writers write only
/// while `leading` is true: after a lost Lease nothing more is written, while a shutdown (still
/// leading) lets queued writes land for up to 5 s.
async fn active(
    config: &Config,
    client: &Client,
    metrics: &Metrics,
    stop: impl Future<Output = ()>,
    leading: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let topics = Arc::new(TopicTree::new(&config.topic_prefix, &config.manager_id)?);
    let settings = broker_settings(config, client).await?;
    tracing::info!(broker = ?settings, manager = %config.manager_id, "starting MQTT session");
    let (inbound_tx, mut inbound_rx) = mpsc::channel(16 * 1024);
    let (mqtt, mqtt_task) = MqttSession::start(
        settings,
        vec![topics.ready_filter(), topics.status_filter()],
        inbound_tx,
        metrics.clone(),
    );
    let _mqtt_task = AbortOnDrop(mqtt_task);
    // Device status writes: 8 ordered shards, so 10,000 devices do not queue behind one writer.
    let (writes, writer_tasks) = engine::DeviceWrites::spawn(client, metrics, 8, leading);
    let mut writers: Vec<_> = writer_tasks.into_iter().map(AbortOnDrop).collect();
    let cache_root = config.cache_dir.clone();
    let cache = tokio::task::spawn_blocking(move || chunk_cache::CacheDir::open(&cache_root))
        .await
        .map_err(|e| Error::Join(e.to_string()))?
        .map_err(|e| Error::Cache(e.to_string()))?;
    let engine = Arc::new(engine::Engine::new(
        topics,
        mqtt.clone(),
        metrics.clone(),
        writes,
        engine::FirmwareSettings {
            cache,
            retained_chunk_bytes: config.retained_chunk_bytes,
            max_image_bytes: config.max_image_bytes,
        },
    ));
    let dispatcher = {
        let engine = engine.clone();
        AbortOnDrop(tokio::spawn(async move {
            while let Some(msg) = inbound_rx.recv().await {
                engine.handle_inbound(msg).await;
            }
        }))
    };
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let instance = config.replica_identity();
    let controllers = futures::future::join_all(namespaces.into_iter().map(|ns| {
        controller::run(
            client.clone(),
            ns,
            engine.clone(),
            config.manager_id.clone(),
            instance.clone(),
        )
    }));
    tokio::select! {
        _ = stop => {}
        _ = controllers => {}
    }
    drop(dispatcher);
    // Let queued Device status writes land before stopping (bounded).
    drop(engine);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join_all(writers.iter_mut().map(|w| &mut w.0)),
    )
    .await;
    mqtt.disconnect().await;
    Ok(())
}
