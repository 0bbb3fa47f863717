//! The Sealed OTA operator: custom resources, the campaign controller and
//! the MQTT side of the manager. The binary in `main.rs` only wires these
//! together; tests run the same [`run`] in-process.
#![deny(unsafe_code)] // allowed in chunk_cache::map (a read-only file map) and heap (allocator calls)

pub mod arbitration;
pub mod chunk_cache;
pub mod config;
pub mod controller;
pub mod coordinate;
pub mod crd;
pub mod crdgen;
pub mod credentials;
pub mod deltas;
pub mod device_status;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod firmware;
pub mod gates;
pub mod heap;
pub mod http;
pub mod inputs;
pub mod membership;
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
pub mod shard_crd;
pub mod shards;
pub mod status;
pub mod throttle;
pub mod time;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use sealed_ota_protocol::TopicTree;
use tokio::sync::{mpsc, watch};

pub use config::Config;
pub use error::Error;
pub use metrics::Metrics;

use crate::mqtt::{BrokerSettings, MqttSession};
use crate::shards::ShardCount;
use sealed_ota_mqtt::BrokerUrl;

/// Aborts a spawned task when dropped, so that dropping [`run`]'s future (a killed operator in a test,
/// a lost lease) stops everything it started: no orphaned MQTT connection or lease renewal.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

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
    let nodes = config
        .broker_url
        .split(',')
        .map(|u| BrokerUrl::parse(u.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let url = nodes[0].clone();
    if nodes.iter().any(|n| n.tls != url.tls) {
        return Err(Error::MqttConfig(
            "--broker-url mixes mqtts:// and mqtt://: the nodes of one broker use one scheme"
                .into(),
        ));
    }
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
        nodes: nodes.into_iter().map(|n| (n.host, n.port)).collect(),
        tls,
        credentials,
        client_id: mqtt::client_id(&config.manager_id, &config.replica_identity()),
        keep_alive: mqtt::KEEP_ALIVE,
        receive_maximum: mqtt::MANAGER_RECEIVE_MAXIMUM,
    })
}

/// Run the operator until `shutdown` completes: metrics listener, the Leases (this replica's member
/// Lease, the Leases of the shards it should hold, the leader Lease of the coordinator), the MQTT
/// session, the engine and one controller per watched namespace.
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
    let shards = ShardCount::new(config.shards)?;
    let identity = config.replica_identity();
    let (held_tx, held) = watch::channel(BTreeSet::new());
    let (coordinating_tx, coordinating) = watch::channel(false);
    let mut membership = None;
    let mut leader_lease = None;
    if !config.leader_election {
        // Without election this replica holds every shard and coordinates for its whole life.
        held_tx.send_replace(shards.all().collect());
        coordinating_tx.send_replace(true);
    } else {
        // One shard: the leader Lease is the shard's Lease too (below); several: a Lease each.
        let held_tx = if shards == ShardCount::ONE {
            Some(held_tx)
        } else {
            membership = Some(AbortOnDrop(tokio::spawn(membership::run(
                client.clone(),
                config.operator_namespace.clone(),
                config.lease_name.clone(),
                identity.clone(),
                shards,
                held_tx,
            ))));
            None
        };
        let lease = LeaseManagerBuilder::new(client.clone(), config.lease_name.clone())
            .with_namespace(config.operator_namespace.clone())
            .with_identity(identity.clone())
            .with_duration(membership::LEASE_SECONDS)
            .with_grace(membership::GRACE_SECONDS)
            .build()
            .await
            .map_err(|e| Error::Lease(e.to_string()))?;
        let (mut leader, lease_task) = lease.watch().await;
        let (who, lease_name) = (identity.clone(), config.lease_name.clone());
        let forward = tokio::spawn(async move {
            loop {
                let leading = *leader.borrow_and_update();
                if let Some(held_tx) = &held_tx {
                    held_tx.send_replace(if leading {
                        BTreeSet::from([0])
                    } else {
                        BTreeSet::new()
                    });
                }
                if coordinating_tx.send_if_modified(|c| std::mem::replace(c, leading) != leading) {
                    if leading {
                        tracing::info!(identity = %who, lease = %lease_name, "became leader (coordinator)");
                    } else {
                        tracing::warn!(identity = %who, lease = %lease_name, "lost the leader Lease");
                    }
                }
                if leader.changed().await.is_err() {
                    return;
                }
            }
        });
        leader_lease = Some((AbortOnDrop(forward), lease_task));
    }
    let gauges = {
        let (metrics, mut held, mut coordinating) =
            (metrics.clone(), held.clone(), coordinating.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                metrics
                    .shards_held
                    .set(held.borrow_and_update().len() as i64);
                let leading = *coordinating.borrow_and_update();
                metrics.leader.set(i64::from(leading));
                tokio::select! {
                    r = held.changed() => if r.is_err() { return },
                    r = coordinating.changed() => if r.is_err() { return },
                }
            }
        }))
    };
    tracing::info!(%identity, %shards, "replica starting");
    metrics.set_ready(true);
    let result = active(
        &config,
        &client,
        &metrics,
        shards,
        held,
        coordinating,
        shutdown,
    )
    .await;
    drop(gauges);
    // Dropping the Lease holders releases the Leases so that other replicas take over at once.
    drop(membership);
    if let Some((forward, mut lease_task)) = leader_lease {
        drop(forward);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut lease_task).await;
    }
    result
}

/// The replica's work for its whole life: MQTT session, engine, Device status writers (each
/// writing only while this replica holds the device's shard), and one controller per watched
/// namespace (shard passes for the shards held, coordination while holding the leader Lease).
/// Returns when `stop` completes; everything it started is stopped, and queued Device status
/// writes get up to 5 s to land.
async fn active(
    config: &Config,
    client: &Client,
    metrics: &Metrics,
    shards: ShardCount,
    held: watch::Receiver<BTreeSet<u32>>,
    coordinating: watch::Receiver<bool>,
    stop: impl Future<Output = ()>,
) -> Result<(), Error> {
    let topics = Arc::new(TopicTree::new(&config.topic_prefix, &config.manager_id)?);
    let settings = broker_settings(config, client).await?;
    tracing::info!(broker = ?settings, manager = %config.manager_id, "starting MQTT session");
    // The devices' messages of the shards held: the broker delivers each replica only its own.
    let (filters_tx, filters) = watch::channel(shards.filters(&held.borrow(), &topics));
    let _follow_shards = {
        let (mut held, topics) = (held.clone(), topics.clone());
        AbortOnDrop(tokio::spawn(async move {
            while held.changed().await.is_ok() {
                let now = shards.filters(&held.borrow_and_update(), &topics);
                filters_tx.send_if_modified(|f| std::mem::replace(f, now) != *f);
            }
        }))
    };
    let (mqtt, mut inbound, mqtt_task) = MqttSession::start(settings, filters, metrics.clone());
    let _mqtt_task = AbortOnDrop(mqtt_task);
    // Device status writes: 8 ordered lanes, so 10,000 devices do not queue behind one writer.
    let (writes, writer_tasks) =
        engine::DeviceWrites::spawn(client, metrics, 8, shards, held.clone());
    let mut writers: Vec<_> = writer_tasks.into_iter().map(AbortOnDrop).collect();
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<runs::CampaignKey>();
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
        finished_tx,
        engine::FirmwareSettings {
            cache,
            retained_chunk_bytes: config.retained_chunk_bytes,
            max_image_bytes: config.max_image_bytes,
        },
    ));
    let dispatcher = {
        let (engine, held) = (engine.clone(), held.clone());
        AbortOnDrop(tokio::spawn(async move {
            while let Some(msg) = inbound.recv().await {
                let Some(device) = engine.device_of(&msg) else {
                    continue;
                };
                let mine = held.borrow().contains(&shards.of_device(&device));
                let label = if mine { "true" } else { "false" };
                engine
                    .metrics
                    .inbound_messages
                    .with_label_values(&[label])
                    .inc();
                engine.handle_inbound(&device, msg).await;
            }
        }))
    };
    // A shard whose Lease went elsewhere: its devices' sessions end here at once.
    let handover = {
        let (engine, mut held) = (engine.clone(), held.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut before = held.borrow_and_update().clone();
            while held.changed().await.is_ok() {
                let now = held.borrow_and_update().clone();
                let lost: BTreeSet<u32> = before.difference(&now).copied().collect();
                if !lost.is_empty() {
                    engine.forget_shards(&lost, shards);
                }
                before = now;
            }
        }))
    };
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    // Campaigns whose device finished go to the controller of their namespace.
    let mut routes = HashMap::new();
    let role = controller::Role {
        manager_id: config.manager_id.clone(),
        identity: config.replica_identity(),
        shards,
        held,
        coordinating,
    };
    let controllers = futures::future::join_all(namespaces.into_iter().map(|ns| {
        let (tx, rx) = mpsc::unbounded_channel();
        routes.insert(ns.clone(), tx);
        controller::run(client.clone(), ns, engine.clone(), role.clone(), rx)
    }));
    let router = AbortOnDrop(tokio::spawn(async move {
        while let Some(key) = finished_rx.recv().await {
            let route = routes
                .get(&Some(key.0.clone()))
                .or_else(|| routes.get(&None));
            if let Some(tx) = route {
                let _ = tx.send(key);
            }
        }
    }));
    tokio::select! {
        _ = stop => {}
        _ = controllers => {}
    }
    drop((dispatcher, handover, router));
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
