//! The operator against the real test bed (kube-apiserver + etcd + Mosquitto, from `e2e/testbed`).
//!
//! Each test gets its own namespace, manager id and in-process operator (`sealed_ota_operator::run`),
//! and drives its devices with the protocol crate's `DeviceSession` over real rumqttc connections.
//! Every wait has a timeout; a failed test keeps its namespace for inspection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_e2e::{wait_for, TestBed, TestNamespace};
use sealed_ota_operator::config::{Config, LogFormat};
use sealed_ota_operator::crd::{CampaignPhase, Device, DevicePhase, UpdateCampaign};
use sealed_ota_protocol::{
    Action, CertificateAuthority, DeviceConfig, DeviceEvent, DeviceSession, DeviceState,
    FinalOutcome, Identity, Inbound, Properties, Role, TopicTree, TrustAnchor,
};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(90);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// How a simulated device behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behavior {
    /// Installs whatever valid update it is offered.
    Install,
    /// Refuses every update (signed Rejected).
    Decline,
    /// Installs the image, fails its health check and rolls back (signed RolledBack).
    RollBack,
    /// Takes new credentials and switches to them, but its first rotation receipt is lost (as if
    /// the broker dropped it).
    LoseFirstRotationReceipt,
}

/// A device simulated inside the test.
struct SimDevice {
    offers: Arc<AtomicU32>,
    installs: Arc<AtomicU32>,
    /// The certificate it started with (DER).
    cert: Vec<u8>,
    task: JoinHandle<()>,
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Harness {
    bed: &'static TestBed,
    ns: TestNamespace,
    manager_id: String,
    ca: Arc<CertificateAuthority>,
    trust: Arc<TrustAnchor>,
}

struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), sealed_ota_operator::Error>>,
    metrics_addr: String,
}

impl Operator {
    /// Graceful stop (lease released).
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }

    /// Abrupt stop, as if the process were killed: nothing is released.
    fn kill(self) {
        self.task.abort();
    }

    async fn metric(&self, name: &str) -> Result<f64> {
        metric_at(&self.metrics_addr, name).await
    }
}

impl Harness {
    async fn new(prefix: &str) -> Result<Self> {
        // Operator logs for failed tests (RUST_LOG=info to see them); a second init is a no-op.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let bed = TestBed::get()?;
        let ns = bed.namespace(prefix).await?;
        sealed_ota_e2e::install_crds(&ns.client).await?;
        let ca = CertificateAuthority::from_pem(
            &std::fs::read_to_string(&bed.ca_file)?,
            &std::fs::read_to_string(&bed.ca_key_file)?,
        )?;
        let trust = Arc::new(ca.trust_anchor());
        Ok(Self {
            manager_id: ns.name.clone(),
            bed,
            ns,
            ca: Arc::new(ca),
            trust,
        })
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    fn topics(&self) -> Arc<TopicTree> {
        Arc::new(TopicTree::new("iot", &self.manager_id).unwrap())
    }

    fn start_operator(&self, identity: &str, tls: bool) -> Result<Operator> {
        let plain = self.bed.mqtt_url.clone();
        self.start_operator_with(identity, move |c| {
            if !tls {
                c.broker_url = plain;
                c.broker_ca_file = None;
                c.broker_cert_file = None;
                c.broker_key_file = None;
            }
        })
    }

    /// Start an operator over TLS with the test bed's client certificate, after `edit`.
    fn start_operator_with(
        &self,
        identity: &str,
        edit: impl FnOnce(&mut Config),
    ) -> Result<Operator> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let mut config = Config {
            broker_url: self.bed.mqtts_url.clone(),
            broker_ca_file: Some(self.bed.ca_file.clone()),
            broker_cert_file: Some(self.bed.client_cert.clone()),
            broker_key_file: Some(self.bed.client_key.clone()),
            broker_tls_secret: None,
            broker_username: None,
            broker_password: None,
            broker_credentials_secret: None,
            operator_namespace: self.ns.name.clone(),
            topic_prefix: "iot".into(),
            manager_id: self.manager_id.clone(),
            namespaces: vec![self.ns.name.clone()],
            metrics_addr: metrics_addr.clone(),
            log_format: LogFormat::Text,
            leader_election: true,
            lease_name: "sealed-ota-operator".into(),
            identity: Some(identity.into()),
            shards: 1,
            // Each operator of a test has a cache of its own (it empties it when it starts).
            cache_dir: std::env::temp_dir().join(format!(
                "sealed-ota-cache-{}-{identity}-{port}",
                self.ns.name
            )),
            retained_chunk_bytes: 64 * 1024 * 1024,
            max_image_bytes: 256 * 1024 * 1024,
        };
        edit(&mut config);
        let (tx, rx) = oneshot::channel();
        let client = self.client();
        let task = tokio::spawn(async move {
            sealed_ota_operator::run(config, client, async {
                let _ = rx.await;
            })
            .await
        });
        Ok(Operator {
            stop: Some(tx),
            task,
            metrics_addr,
        })
    }

    async fn manager_secret(&self, name: &str) -> Result<()> {
        let id = self
            .ca
            .issue(Role::Manager, &self.manager_id, now() - 60, 2)?;
        let data: BTreeMap<String, ByteString> = [
            ("tls.crt", id.cert_pem()),
            ("tls.key", id.key_pem().to_string()),
            ("ca.crt", self.ca.cert_pem()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
        .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    /// A Secret `name` with the test CA's certificate and key (tls.crt, tls.key), which rotation
    /// campaigns sign new device certificates with.
    async fn ca_secret(&self, name: &str) -> Result<()> {
        let ca = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    (
                        "tls.crt".to_string(),
                        ByteString(self.ca.cert_pem().into_bytes()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(self.ca.key_pem().as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &ca)
            .await?;
        Ok(())
    }

    async fn firmware(&self, name: &str, image: &[u8]) -> Result<String> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            binary_data: Some([("image".to_string(), ByteString(image.to_vec()))].into()),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &cm)
            .await?;
        Ok(hex::encode(Sha256::digest(image)))
    }

    async fn device(&self, name: &str, fleet: &str) -> Result<()> {
        let d: Device = serde_json::from_value(serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1",
            "kind": "Device",
            "metadata": {"name": name, "labels": {"fleet": fleet}},
            "spec": {}
        }))?;
        Api::<Device>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &d)
            .await?;
        Ok(())
    }

    async fn campaign(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let c: UpdateCampaign = serde_json::from_value(serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1",
            "kind": "UpdateCampaign",
            "metadata": {"name": name},
            "spec": spec
        }))?;
        Api::<UpdateCampaign>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &c)
            .await?;
        Ok(())
    }

    async fn patch_campaign(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        Api::<UpdateCampaign>::namespaced(self.client(), &self.ns.name)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    async fn wait_campaign(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&UpdateCampaign) -> bool,
    ) -> Result<UpdateCampaign> {
        self.ns.wait_campaign(name, what, WAIT, pred).await
    }

    async fn get_device(&self, name: &str) -> Result<Device> {
        Ok(Api::<Device>::namespaced(self.client(), &self.ns.name)
            .get(name)
            .await?)
    }

    /// Run a device over a real MQTT connection (plain listener) with the protocol's DeviceSession.
    fn spawn_device(&self, id: &str, version: &str, behavior: Behavior) -> Result<SimDevice> {
        let identity = Arc::new(self.ca.issue(Role::Device, id, now() - 60, 2)?);
        let mut opts = self
            .bed
            .mqtt_options(&format!("{}-{id}", self.manager_id))?;
        opts.set_max_packet_size(Some(4 * 1024 * 1024));
        let cert = identity.cert_der().to_vec();
        let config = DeviceConfig {
            identity,
            trust: self.trust.clone(),
            topics: self.topics(),
            manager_id: self.manager_id.clone(),
            max_packet_size: 4 * 1024 * 1024,
            window: 8,
            release_keys: Vec::new(),
        };
        let offers = Arc::new(AtomicU32::new(0));
        let installs = Arc::new(AtomicU32::new(0));
        let (o, i) = (offers.clone(), installs.clone());
        let state = DeviceState::new(version);
        let task = tokio::spawn(async move {
            if let Err(e) = device_loop(opts, config, state, behavior, o, i).await {
                eprintln!("sim device stopped: {e:#}");
            }
        });
        Ok(SimDevice {
            offers,
            installs,
            cert,
            task,
        })
    }
}

async fn execute(client: &AsyncClient, actions: Vec<Action>) -> Result<()> {
    Ok(sealed_ota_mqtt::perform(client, actions).await?)
}

async fn device_loop(
    opts: rumqttc::v5::MqttOptions,
    config: DeviceConfig,
    state: DeviceState,
    behavior: Behavior,
    offers: Arc<AtomicU32>,
    installs: Arc<AtomicU32>,
) -> Result<()> {
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let (mut session, initial) = DeviceSession::new(config, state);
    let mut pending = initial;
    let mut connected_once = false;
    let mut image: Vec<u8> = Vec::new();
    let mut receipts_lost = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let actions = tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let mut a = std::mem::take(&mut pending);
                    if connected_once {
                        a.extend(session.on_reconnect(now()));
                    }
                    connected_once = true;
                    a
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let msg = Inbound {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        properties: p.properties.map(|pp| Properties {
                            response_topic: pp.response_topic,
                            correlation_data: pp.correlation_data.map(|b| b.to_vec()),
                            user_properties: pp.user_properties,
                            content_type: pp.content_type,
                        }).unwrap_or_default(),
                    };
                    let Ok(out) = session.handle(&msg, now()) else { continue };
                    let mut a = out.actions;
                    for e in out.events {
                        match e {
                            DeviceEvent::UpdateOffered { manifest } => {
                                offers.fetch_add(1, Ordering::SeqCst);
                                image = vec![0; manifest.size as usize];
                                if behavior == Behavior::Decline {
                                    a.extend(session.decline("test device declines", now()));
                                }
                            }
                            DeviceEvent::Chunk { offset, data, .. } => {
                                let o = offset as usize;
                                if o + data.len() <= image.len() {
                                    image[o..o + data.len()].copy_from_slice(&data);
                                }
                            }
                            DeviceEvent::ImageComplete { manifest } => {
                                let ok = <[u8; 32]>::from(Sha256::digest(&image)) == manifest.sha256;
                                if ok && behavior == Behavior::RollBack {
                                    if session.stage_install(now()).is_ok() {
                                        a.extend(session.report_final(
                                            FinalOutcome::RolledBack { reason: "health check failed".into() },
                                            now(),
                                        ));
                                    }
                                    continue;
                                }
                                let r = if ok { Ok(()) } else { Err("hash mismatch".to_string()) };
                                a.extend(session.finish_install(r, now()));
                                if ok {
                                    installs.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            DeviceEvent::CredentialsDelivered { cert_pem, key_pem } => {
                                installs.fetch_add(1, Ordering::SeqCst);
                                if behavior == Behavior::LoseFirstRotationReceipt {
                                    session.set_identity(Arc::new(Identity::from_pem(&cert_pem, &key_pem)?));
                                    if receipts_lost == 0 {
                                        receipts_lost += 1;
                                        a.retain(|x| !matches!(x, Action::Publish(o) if o.topic.contains("/update/status/")));
                                    }
                                }
                            }
                            DeviceEvent::Rejected { .. } | DeviceEvent::Aborted { .. } => {}
                        }
                    }
                    a
                }
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            },
            _ = tick.tick() => session.poll(now()),
        };
        if connected_once {
            execute(&client, actions).await?;
        } else {
            pending.extend(actions);
        }
    }
}

fn fw_spec(fleet: &str, version: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "selector": {"matchLabels": {"fleet": fleet}},
        "targetVersion": version,
        "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
        "managerSecretName": "manager",
        "rollout": {"maxInFlight": 2, "deviceTimeoutSeconds": 30, "retries": 1, "retryBackoffSeconds": 1}
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn condition<'a>(
    c: &'a UpdateCampaign,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    c.status.as_ref()?.conditions.iter().find(|x| x.type_ == t)
}

fn phase(c: &UpdateCampaign) -> CampaignPhase {
    c.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_updates_every_device_over_tls_and_records_status() -> Result<()> {
    let h = Harness::new("op-happy").await?;
    h.manager_secret("manager").await?;
    let digest = h.firmware("fw", &image(100_000)).await?;
    let names = ["dev-a", "dev-b", "dev-c"];
    let mut sims = Vec::new();
    for n in names {
        h.device(n, "blue").await?;
        sims.push(h.spawn_device(n, "1.0.0", Behavior::Install)?);
    }
    let op = h.start_operator("replica-1", true)?;
    let mut spec = fw_spec("blue", "1.1.0", serde_json::json!({}));
    spec["payload"]["firmware"]["sha256"] = serde_json::json!(digest);
    spec["rollout"]["canary"] = serde_json::json!("1");
    h.campaign("rollout", spec).await?;
    let c = h
        .wait_campaign("rollout", "Succeeded", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    let st = c.status.clone().unwrap();
    assert_eq!(st.devices.succeeded, 3);
    assert_eq!(st.devices.failed, 0);
    assert_eq!(st.progress.as_deref(), Some("3/3"));
    assert_eq!(st.total_waves, 2, "canary + one wave");
    let ready = condition(&c, "Ready").context("Ready condition")?;
    assert_eq!(ready.status, "True");
    assert_eq!(ready.observed_generation, c.metadata.generation);
    for (n, sim) in names.iter().zip(&sims) {
        let d = h.get_device(n).await?;
        let s = d.status.context("device status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.1.0"), "{n}");
        let rec = s.campaign.context("campaign record")?;
        assert_eq!(rec.phase, DevicePhase::Succeeded);
        assert_eq!(rec.attempts, 1);
        assert_eq!(s.certificate_fingerprint.map(|f| f.len()), Some(64));
        assert!(s.certificate_not_after.is_some());
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .context("Device Ready")?;
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "UpToDate")
        );
        assert_eq!(sim.installs.load(Ordering::SeqCst), 1, "{n} installed once");
        // The signed receipt is kept: a person verifies it later with the device certificate.
        use base64::Engine as _;
        let receipt = base64::engine::general_purpose::STANDARD
            .decode(rec.receipt.as_deref().context("receipt kept")?)?;
        assert_eq!(
            rec.receipt_certificate_fingerprint,
            Some(hex::encode(Sha256::digest(&sim.cert)))
        );
        let claim = sealed_ota_protocol::verify_receipt(&receipt, &sim.cert)?;
        assert_eq!(
            claim.claim,
            sealed_ota_protocol::Claim::Installed {
                version: "1.1.0".into(),
                sha256: hex::decode(&digest)?.try_into().unwrap(),
                release_key: None,
            }
        );
    }
    // The apiserver writes this campaign cost, read from the operator's own counters.
    let device_writes = op
        .metric("sealed_ota_operator_status_writes_total{kind=\"device\"}")
        .await?;
    let campaign_writes = op
        .metric("sealed_ota_operator_status_writes_total{kind=\"campaign\"}")
        .await?;
    eprintln!(
        "apiserver status writes for 3 devices: device={device_writes} campaign={campaign_writes}"
    );
    assert_eq!(
        device_writes, 3.0,
        "one Device status write per device: its final outcome"
    );
    assert!(
        campaign_writes <= 12.0,
        "campaign status writes bounded: {campaign_writes}"
    );
    assert!(op.metric("sealed_ota_operator_handshakes_total").await? >= 3.0);

    // Events a person reads.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client(), &h.ns.name);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Succeeded"), "{reasons:?}");

    // Retained messages are cleared when the campaign ends: a fresh subscriber gets none.
    let retained = retained_messages(&h, &format!("iot/{}/#", h.manager_id)).await?;
    assert_eq!(retained, 0, "retained notify/chunks left behind");
    op.stop().await;
    h.ns.pass();
    Ok(())
}

/// Count retained messages with a payload under `filter`, as seen by a fresh subscriber.
async fn retained_messages(h: &Harness, filter: &str) -> Result<usize> {
    Ok(retained_payloads(h, filter).await?.len())
}

/// The non-empty retained messages under `filter`: (topic, payload).
async fn retained_payloads(h: &Harness, filter: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut opts = h.bed.mqtt_options(&format!("{}-probe", h.manager_id))?;
    // Chunks are larger than rumqttc's default incoming packet limit.
    opts.set_max_packet_size(Some(4 * 1024 * 1024));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await {
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) if p.retain && !p.payload.is_empty() => found
                .push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                )),
            Ok(_) => {}
            Err(e) => bail!("probe subscriber failed: {e}"),
        }
    }
    let _ = client.disconnect().await;
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_holds_devices_back_and_resume_finishes() -> Result<()> {
    let h = Harness::new("op-pause").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(20_000)).await?;
    let mut sims = Vec::new();
    for n in ["p-1", "p-2"] {
        h.device(n, "green").await?;
        sims.push(h.spawn_device(n, "1.0.0", Behavior::Install)?);
    }
    let op = h.start_operator("replica-1", false)?;
    h.campaign(
        "paused",
        fw_spec("green", "2.0.0", serde_json::json!({"paused": true})),
    )
    .await?;
    let c = h
        .wait_campaign("paused", "Paused", |c| phase(c) == CampaignPhase::Paused)
        .await?;
    assert_eq!(
        condition(&c, "Paused").map(|c| c.status.as_str()),
        Some("True")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        sims.iter().all(|s| s.offers.load(Ordering::SeqCst) == 0),
        "a paused campaign offered an update"
    );
    assert_eq!(
        h.get_device("p-1").await?.status.and_then(|s| s.campaign),
        None
    );

    h.patch_campaign("paused", serde_json::json!({"paused": false}))
        .await?;
    let c = h
        .wait_campaign("paused", "Succeeded after resume", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    assert_eq!(c.status.unwrap().devices.succeeded, 2);
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_stops_the_campaign_and_cannot_be_undone() -> Result<()> {
    let h = Harness::new("op-abort").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(10_000)).await?;
    // Devices exist but are offline: the campaign stays in flight until aborted.
    for n in ["a-1", "a-2", "a-3"] {
        h.device(n, "red").await?;
    }
    let op = h.start_operator("replica-1", false)?;
    h.campaign("stopme", fw_spec("red", "2.0.0", serde_json::json!({})))
        .await?;
    h.wait_campaign("stopme", "Progressing with devices in flight", |c| {
        c.status
            .as_ref()
            .is_some_and(|s| s.devices.in_progress == 2)
    })
    .await?;
    h.patch_campaign("stopme", serde_json::json!({"abort": true}))
        .await?;
    let c = h
        .wait_campaign("stopme", "Aborted", |c| phase(c) == CampaignPhase::Aborted)
        .await?;
    assert_eq!(
        condition(&c, "Ready").map(|c| c.reason.as_str()),
        Some("Aborted")
    );
    // Every chunk is cleared; each device in flight finds the manager's signed abort in place of
    // its notify.
    let retained = retained_payloads(&h, &format!("iot/{}/#", h.manager_id)).await?;
    assert_eq!(retained.len(), 2, "{retained:?}");
    for (topic, payload) in &retained {
        assert!(topic.ends_with("/notify"), "{topic}");
        let (_, abort) = sealed_ota_protocol::wire::decode_abort(payload)?;
        assert_eq!(abort.manager_id, h.manager_id);
    }
    // spec.abort is one-way: the apiserver refuses to unset it and names the field.
    let err = h
        .patch_campaign("stopme", serde_json::json!({"abort": false}))
        .await
        .expect_err("abort must not be unset");
    assert!(format!("{err:#}").contains("spec.abort"), "{err:#}");
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_threshold_fails_the_campaign_after_the_canary() -> Result<()> {
    let h = Harness::new("op-thresh").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(10_000)).await?;
    let mut sims = Vec::new();
    for n in ["f-1", "f-2", "f-3"] {
        h.device(n, "amber").await?;
        sims.push(h.spawn_device(n, "1.0.0", Behavior::Decline)?);
    }
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("amber", "2.0.0", serde_json::json!({}));
    spec["rollout"]["canary"] = serde_json::json!("1");
    spec["rollout"]["failureThreshold"] = serde_json::json!("0");
    h.campaign("risky", spec).await?;
    let c = h
        .wait_campaign("risky", "Failed", |c| phase(c) == CampaignPhase::Failed)
        .await?;
    let st = c.status.clone().unwrap();
    assert_eq!(st.devices.failed, 1, "only the canary ran");
    assert_eq!(st.failures.len(), 1);
    assert_eq!(st.failures[0].device, "f-1");
    assert_eq!(st.failures[0].reason, "DeclinedByDevice");
    assert_eq!(
        condition(&c, "Failed").map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(
        sims[1].offers.load(Ordering::SeqCst),
        0,
        "wave after a failed canary never starts"
    );
    let d = h.get_device("f-1").await?;
    assert_eq!(
        d.status.and_then(|s| s.campaign).map(|c| c.phase),
        Some(DevicePhase::Failed)
    );
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_manager_secret_is_reported_and_recovers() -> Result<()> {
    let h = Harness::new("op-secret").await?;
    h.firmware("fw", &image(5_000)).await?;
    let op = h.start_operator("replica-1", false)?;
    // No device yet either: the selector matches nothing.
    h.campaign("waiting", fw_spec("violet", "2.0.0", serde_json::json!({})))
        .await?;
    let c = h
        .wait_campaign("waiting", "ManagerSecretMissing", |c| {
            condition(c, "Ready").is_some_and(|r| r.reason == "ManagerSecretMissing")
        })
        .await?;
    let msg = &condition(&c, "Ready").unwrap().message;
    assert!(
        msg.contains("spec.managerSecretName") && msg.contains("create"),
        "{msg}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client(), &h.ns.name);
    wait_for("a ManagerSecretMissing event", WAIT, || {
        let events = events.clone();
        async move {
            let l = events.list(&ListParams::default()).await?;
            Ok(l.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ManagerSecretMissing"))
                .then_some(()))
        }
    })
    .await?;

    h.manager_secret("manager").await?;
    h.wait_campaign("waiting", "NoDevicesSelected", |c| {
        condition(c, "Ready").is_some_and(|r| r.reason == "NoDevicesSelected")
    })
    .await?;
    // A device that starts matching joins the running campaign.
    h.device("late", "violet").await?;
    let _sim = h.spawn_device("late", "1.0.0", Behavior::Install)?;
    let c = h
        .wait_campaign("waiting", "Succeeded", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    assert_eq!(c.status.unwrap().devices.succeeded, 1);
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_operator_resumes_without_redoing_finished_devices() -> Result<()> {
    let h = Harness::new("op-restart").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(20_000)).await?;
    let names = ["r-1", "r-2", "r-3", "r-4"];
    for n in names {
        h.device(n, "teal").await?;
    }
    // Only the first two devices are online at first.
    let early: Vec<SimDevice> = names[..2]
        .iter()
        .map(|n| h.spawn_device(n, "1.0.0", Behavior::Install))
        .collect::<Result<_>>()?;
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("teal", "3.0.0", serde_json::json!({}));
    spec["rollout"]["maxInFlight"] = serde_json::json!(4);
    spec["rollout"]["deviceTimeoutSeconds"] = serde_json::json!(300);
    h.campaign("resume", spec).await?;
    h.wait_campaign("resume", "two devices succeeded", |c| {
        c.status.as_ref().is_some_and(|s| s.devices.succeeded == 2)
    })
    .await?;
    op.kill();

    let late: Vec<SimDevice> = names[2..]
        .iter()
        .map(|n| h.spawn_device(n, "1.0.0", Behavior::Install))
        .collect::<Result<_>>()?;
    // A second replica: takes the lease once the killed one's expires, resumes from the resources.
    let op2 = h.start_operator("replica-2", false)?;
    let c = h
        .wait_campaign("resume", "Succeeded after restart", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    assert_eq!(c.status.unwrap().devices.succeeded, 4);
    for s in &early {
        assert_eq!(
            s.offers.load(Ordering::SeqCst),
            1,
            "a finished device was offered the update again"
        );
        assert_eq!(s.installs.load(Ordering::SeqCst), 1);
    }
    for s in &late {
        assert_eq!(s.installs.load(Ordering::SeqCst), 1);
    }
    // A campaign says Succeeded only once its Device status writes have landed.
    for n in names {
        let rec = h
            .get_device(n)
            .await?
            .status
            .and_then(|s| s.campaign)
            .context("record")?;
        assert_eq!(rec.phase, DevicePhase::Succeeded, "{n}");
    }
    op2.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test]
async fn invalid_resources_are_refused_with_the_field_named() -> Result<()> {
    let h = Harness::new("op-invalid").await?;
    let cases = [
        (
            serde_json::json!({
                "selector": {"matchLabels": {"a": "b"}}, "targetVersion": "1.0.0", "managerSecretName": "m",
                "payload": {"firmware": {"configMapKeyRef": {"name": "x", "key": "y"}},
                            "rotateCredentials": {"mode": "Csr", "caSecretName": "ca"}}
            }),
            "spec.payload must set exactly one",
        ),
        (
            serde_json::json!({
                "selector": {"matchLabels": {"a": "b"}}, "targetVersion": "v1", "managerSecretName": "m",
                "payload": {"firmware": {"configMapKeyRef": {"name": "x", "key": "y"}}}
            }),
            "spec.targetVersion",
        ),
        (
            serde_json::json!({
                "selector": {}, "targetVersion": "1.0.0", "managerSecretName": "m",
                "payload": {"firmware": {"configMapKeyRef": {"name": "x", "key": "y"}}}
            }),
            "spec.selector must set matchLabels or matchExpressions",
        ),
        (
            serde_json::json!({
                "selector": {"matchLabels": {"a": "b"}}, "targetVersion": "1.0.0", "managerSecretName": "m",
                "payload": {"firmware": {"url": {"url": "ftp://x/y", "sha256": "0".repeat(64)}}}
            }),
            "spec.payload.firmware.url.url must start with https://",
        ),
        (
            serde_json::json!({
                "selector": {"matchLabels": {"a": "b"}}, "targetVersion": "1.0.0", "managerSecretName": "m",
                "payload": {"firmware": {"configMapKeyRef": {"name": "x", "key": "y"}}},
                "rollout": {"canary": "150%"}
            }),
            "spec.rollout.canary",
        ),
    ];
    for (i, (spec, needle)) in cases.into_iter().enumerate() {
        let err = match h.campaign(&format!("bad-{i}"), spec).await {
            Ok(()) => bail!("case {i} was accepted; expected a refusal naming {needle:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(needle), "case {i}: {err}");
    }
    let bad_device: Device = serde_json::from_value(serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1", "kind": "Device",
        "metadata": {"name": "bad"}, "spec": {"certificateFingerprint": "Z".repeat(64)}
    }))?;
    let err = Api::<Device>::namespaced(h.client(), &h.ns.name)
        .create(&PostParams::default(), &bad_device)
        .await
        .expect_err("bad fingerprint must be refused");
    assert!(
        err.to_string().contains("spec.certificateFingerprint"),
        "{err}"
    );
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_a_condition_while_other_campaigns_run() -> Result<()> {
    let h = Harness::new("op-badin").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(8_000)).await?;
    h.device("ok-1", "lime").await?;
    let _sim = h.spawn_device("ok-1", "1.0.0", Behavior::Install)?;
    let op = h.start_operator("replica-1", false)?;
    // Digest that does not match the image.
    let mut bad = fw_spec("lime", "2.0.0", serde_json::json!({}));
    bad["payload"]["firmware"]["sha256"] = serde_json::json!("0".repeat(64));
    h.campaign("bad-digest", bad).await?;
    // A URL nothing answers at.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut url = fw_spec("lime", "2.0.0", serde_json::json!({}));
    url["payload"] = serde_json::json!({"firmware": {"url": {"url": format!("http://{closed}/fw.bin"), "sha256": "1".repeat(64)}}});
    h.campaign("by-url", url).await?;
    // Missing firmware ConfigMap.
    let mut missing = fw_spec("lime", "2.0.0", serde_json::json!({}));
    missing["payload"]["firmware"]["configMapKeyRef"]["name"] = serde_json::json!("nope");
    h.campaign("no-fw", missing).await?;
    // And a good one, served meanwhile.
    h.campaign("good", fw_spec("lime", "2.0.0", serde_json::json!({})))
        .await?;
    for (name, reason, needle) in [
        (
            "bad-digest",
            "FirmwareDigestMismatch",
            "spec.payload.firmware.sha256",
        ),
        (
            "by-url",
            "FirmwareDownloadFailed",
            "spec.payload.firmware.url",
        ),
        ("no-fw", "FirmwareUnreadable", "ConfigMap nope"),
    ] {
        let c = h
            .wait_campaign(name, reason, |c| {
                condition(c, "Ready").is_some_and(|r| r.reason == reason)
            })
            .await?;
        let msg = &condition(&c, "Ready").unwrap().message;
        assert!(msg.contains(needle), "{name}: {msg}");
        assert_eq!(phase(&c), CampaignPhase::Pending);
    }
    h.wait_campaign("good", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_broker_connection_is_a_condition() -> Result<()> {
    let h = Harness::new("op-broker").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(1_000)).await?;
    h.device("x-1", "gray").await?;
    // A port where nothing listens: every connection attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config_op = h.start_operator_with("replica-1", |c| {
        c.broker_url = format!("mqtt://127.0.0.1:{closed}");
    })?;
    h.campaign("nobroker", fw_spec("gray", "2.0.0", serde_json::json!({})))
        .await?;
    let c = h
        .wait_campaign("nobroker", "BrokerUnavailable", |c| {
            condition(c, "Ready").is_some_and(|r| r.reason == "BrokerUnavailable")
        })
        .await?;
    let msg = &condition(&c, "Ready").unwrap().message;
    assert!(msg.contains("--broker-url"), "{msg}");
    assert_eq!(
        config_op
            .metric("sealed_ota_operator_mqtt_connected")
            .await?,
        0.0
    );
    config_op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_lead_at_once_and_hand_over() -> Result<()> {
    let h = Harness::new("op-leader").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(4_000)).await?;
    let a = h.start_operator("replica-a", false)?;
    let b = h.start_operator("replica-b", false)?;
    let leaders = |a: &Operator, b: &Operator| {
        let (a, b) = (a.metrics_addr.clone(), b.metrics_addr.clone());
        async move {
            let ga = metric_at(&a, "sealed_ota_operator_leader")
                .await
                .unwrap_or(0.0);
            let gb = metric_at(&b, "sealed_ota_operator_leader")
                .await
                .unwrap_or(0.0);
            (ga, gb)
        }
    };
    wait_for("one leader", WAIT, || async {
        let (ga, gb) = leaders(&a, &b).await;
        Ok((ga + gb == 1.0).then_some(()))
    })
    .await?;
    for _ in 0..10 {
        let (ga, gb) = leaders(&a, &b).await;
        assert!(ga + gb <= 1.0, "two leaders at once: {ga} {gb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ga, _) = leaders(&a, &b).await;
    let (leader, standby) = if ga == 1.0 { (a, b) } else { (b, a) };
    // The campaign runs under the leader only.
    h.device("l-1", "cyan").await?;
    let sim = h.spawn_device("l-1", "1.0.0", Behavior::Install)?;
    h.campaign("led", fw_spec("cyan", "2.0.0", serde_json::json!({})))
        .await?;
    h.wait_campaign("led", "Succeeded", |c| phase(c) == CampaignPhase::Succeeded)
        .await?;
    assert_eq!(
        sim.offers.load(Ordering::SeqCst),
        1,
        "exactly one manager offered the update"
    );
    // One shard: exactly one replica (the holder of its Lease, leader or not) drove the device.
    let published = |addr: String| async move {
        metric_at(&addr, "sealed_ota_operator_mqtt_published_messages_total")
            .await
            .unwrap_or(0.0)
    };
    let (pa, pb) = (
        published(leader.metrics_addr.clone()).await,
        published(standby.metrics_addr.clone()).await,
    );
    assert!(
        (pa > 0.0) != (pb > 0.0),
        "exactly one replica publishes: {pa} {pb}"
    );
    // A graceful stop releases the lease: the standby takes over.
    leader.stop().await;
    let addr = standby.metrics_addr.clone();
    wait_for("standby takes over", WAIT, || {
        let addr = addr.clone();
        async move { Ok((metric_at(&addr, "sealed_ota_operator_leader").await? == 1.0).then_some(())) }
    })
    .await?;
    standby.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credential_rotation_delivers_new_keys() -> Result<()> {
    let h = Harness::new("op-rotate").await?;
    h.manager_secret("manager").await?;
    // The CA Secret the rotation signs with (the test CA).
    h.ca_secret("ota-ca").await?;
    let mut sims = Vec::new();
    for n in ["k-1", "k-2"] {
        h.device(n, "plum").await?;
        sims.push(h.spawn_device(n, "1.0.0", Behavior::Install)?);
    }
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("plum", "1.0.1", serde_json::json!({}));
    spec["payload"] = serde_json::json!({"rotateCredentials": {"mode": "DeliverKey", "caSecretName": "ota-ca", "validityDays": 30}});
    h.campaign("rotate", spec).await?;
    let c = h
        .wait_campaign("rotate", "Succeeded", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    assert_eq!(c.status.unwrap().devices.succeeded, 2);
    for s in &sims {
        assert_eq!(
            s.installs.load(Ordering::SeqCst),
            1,
            "new credentials delivered once"
        );
    }
    // The Device status names the NEW certificate (issued for 30 days), not the one the device
    // presented in the handshake (valid 2 days), and remembers it as accepted by the pin.
    for n in ["k-1", "k-2"] {
        let st = h.get_device(n).await?.status.context("device status")?;
        let fp = st.certificate_fingerprint.clone().context("fingerprint")?;
        assert_eq!(
            st.rotated_certificate_fingerprint.as_deref(),
            Some(fp.as_str())
        );
        let not_after = st.certificate_not_after.context("notAfter")?.0.as_second() as u64;
        assert!(
            not_after > now() + 20 * 86_400,
            "{n}: certificateNotAfter is the old certificate's"
        );
    }
    op.stop().await;
    h.ns.pass();
    Ok(())
}

async fn metric_at(addr: &str, name: &str) -> Result<f64> {
    let text = sealed_ota_e2e::http::get(&format!("http://{addr}/metrics")).await?;
    Ok(sealed_ota_e2e::http::metric_sum(&text, name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_running_campaign_clears_its_retained_messages() -> Result<()> {
    let h = Harness::new("op-delete").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(40_000)).await?;
    for n in ["z-1", "z-2"] {
        h.device(n, "navy").await?; // offline: the campaign stays in flight
    }
    let op = h.start_operator("replica-1", false)?;
    h.campaign("gone", fw_spec("navy", "2.0.0", serde_json::json!({})))
        .await?;
    let c = h
        .wait_campaign("gone", "in flight", |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.devices.in_progress == 2)
        })
        .await?;
    assert!(c
        .metadata
        .finalizers
        .unwrap_or_default()
        .iter()
        .any(|f| f == sealed_ota_operator::crd::FINALIZER));
    let filter = format!("iot/{}/#", h.manager_id);
    assert!(
        retained_messages(&h, &filter).await? >= 3,
        "notify x2 + chunks are retained while running"
    );
    let api = Api::<UpdateCampaign>::namespaced(h.client(), &h.ns.name);
    api.delete("gone", &Default::default()).await?;
    wait_for("campaign deleted", WAIT, || {
        let api = api.clone();
        async move { Ok(api.get_opt("gone").await?.is_none().then_some(())) }
    })
    .await?;
    assert_eq!(
        retained_messages(&h, &filter).await?,
        0,
        "retained messages left after delete"
    );
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_device_is_retried_with_backoff() -> Result<()> {
    let h = Harness::new("op-retry").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(6_000)).await?;
    h.device("slow", "olive").await?;
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("olive", "2.0.0", serde_json::json!({}));
    spec["rollout"]["deviceTimeoutSeconds"] = serde_json::json!(5);
    spec["rollout"]["retries"] = serde_json::json!(3);
    spec["rollout"]["retryBackoffSeconds"] = serde_json::json!(1);
    h.campaign("retry", spec).await?;
    h.wait_campaign("retry", "first attempt in flight", |c| {
        c.status
            .as_ref()
            .is_some_and(|s| s.devices.in_progress == 1)
    })
    .await?;
    // The device comes online only after the first attempt timed out.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let sim = h.spawn_device("slow", "1.0.0", Behavior::Install)?;
    h.wait_campaign("retry", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    let rec = h
        .get_device("slow")
        .await?
        .status
        .and_then(|s| s.campaign)
        .context("record")?;
    assert_eq!(rec.phase, DevicePhase::Succeeded);
    assert!(rec.attempts >= 2, "the success came on a retry: {rec:?}");
    assert_eq!(sim.installs.load(Ordering::SeqCst), 1);
    let retries = op
        .metric("sealed_ota_operator_device_retries_total")
        .await?;
    assert_eq!(
        retries,
        f64::from(rec.attempts - 1),
        "every timed-out attempt is counted as a retry"
    );
    op.stop().await;
    h.ns.pass();
    Ok(())
}

/// The apiserver writes a campaign costs: two Device status writes per device (Transferring,
/// Succeeded) and campaign status writes bounded by one per second. 20 devices by default;
/// `SEALED_OTA_WRITE_BUDGET_DEVICES=N` measures a larger fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_writes_stay_within_budget() -> Result<()> {
    let n: usize = std::env::var("SEALED_OTA_WRITE_BUDGET_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let h = Harness::new("op-writes").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(50_000)).await?;
    let mut sims = Vec::new();
    for i in 0..n {
        let n = format!("w-{i:02}");
        h.device(&n, "gold").await?;
        sims.push(h.spawn_device(&n, "1.0.0", Behavior::Install)?);
    }
    let op = h.start_operator("replica-1", false)?;
    let started = std::time::Instant::now();
    let mut spec = fw_spec("gold", "2.0.0", serde_json::json!({}));
    spec["rollout"]["maxInFlight"] = serde_json::json!(5);
    spec["rollout"]["canary"] = serde_json::json!("10%");
    spec["rollout"]["waveSize"] = serde_json::json!("50%");
    h.campaign("budget", spec).await?;
    let c = h
        .wait_campaign("budget", "Succeeded", |c| {
            phase(c) == CampaignPhase::Succeeded
        })
        .await?;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(c.status.as_ref().unwrap().devices.succeeded, n as u32);
    // Let the last queued writes land before reading the counters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let device = op
        .metric("sealed_ota_operator_status_writes_total{kind=\"device\"}")
        .await?;
    let campaign = op
        .metric("sealed_ota_operator_status_writes_total{kind=\"campaign\"}")
        .await?;
    eprintln!("{n} devices in {secs:.1}s: device status writes={device}, campaign status writes={campaign}");
    let shard = op
        .metric("sealed_ota_operator_status_writes_total{kind=\"shard\"}")
        .await?;
    eprintln!("shard report writes={shard}");
    // One write per device per campaign: its final outcome (with the handshake's facts).
    assert_eq!(device, n as f64);
    assert!(
        campaign <= secs.ceil() + 3.0,
        "campaign writes {campaign} in {secs:.1}s"
    );
    assert!(
        shard <= secs.ceil() + 3.0,
        "shard report writes {shard} in {secs:.1}s"
    );
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firmware_from_a_url_is_downloaded_and_checked() -> Result<()> {
    let h = Harness::new("op-url").await?;
    h.manager_secret("manager").await?;
    let img = image(70_000);
    let digest = hex::encode(Sha256::digest(&img));
    let server = sealed_ota_e2e::http::FileServer::start(img).await?;
    let url = server.url();
    h.device("u-1", "sand").await?;
    let sim = h.spawn_device("u-1", "1.0.0", Behavior::Install)?;
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("sand", "2.0.0", serde_json::json!({}));
    spec["payload"] =
        serde_json::json!({"firmware": {"url": {"url": url.clone(), "sha256": digest}}});
    h.campaign("from-url", spec).await?;
    // Same URL, wrong digest, no devices: refused before anything is published.
    let mut wrong = fw_spec("nobody", "2.0.0", serde_json::json!({}));
    wrong["payload"] =
        serde_json::json!({"firmware": {"url": {"url": url, "sha256": "2".repeat(64)}}});
    h.campaign("wrong-digest", wrong).await?;
    h.wait_campaign("from-url", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    assert_eq!(sim.installs.load(Ordering::SeqCst), 1);
    h.wait_campaign("wrong-digest", "FirmwareDigestMismatch", |c| {
        condition(c, "Ready").is_some_and(|r| r.reason == "FirmwareDigestMismatch")
    })
    .await?;
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_tls_material_can_come_from_a_secret() -> Result<()> {
    let h = Harness::new("op-brokersecret").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(3_000)).await?;
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &h.bed.ca_file),
        ("tls.crt", &h.bed.client_cert),
        ("tls.key", &h.bed.client_key),
    ]
    .into_iter()
    .map(|(k, p)| Ok((k.to_string(), ByteString(std::fs::read(p)?))))
    .collect::<Result<_>>()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("broker-tls".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    Api::<Secret>::namespaced(h.client(), &h.ns.name)
        .create(&PostParams::default(), &secret)
        .await?;
    h.device("s-1", "rose").await?;
    let _sim = h.spawn_device("s-1", "1.0.0", Behavior::Install)?;
    let op = h.start_operator_with("replica-1", |c| {
        c.broker_ca_file = None;
        c.broker_cert_file = None;
        c.broker_key_file = None;
        c.broker_tls_secret = Some("broker-tls".into());
    })?;
    h.campaign(
        "via-secret",
        fw_spec("rose", "2.0.0", serde_json::json!({})),
    )
    .await?;
    h.wait_campaign("via-secret", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    assert_eq!(op.metric("sealed_ota_operator_mqtt_connected").await?, 1.0);
    op.stop().await;
    h.ns.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_session_reconnects_and_resubscribes() -> Result<()> {
    let h = Harness::new("op-reconnect").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(3_000)).await?;
    let op = h.start_operator("replica-1", false)?;
    wait_for("operator connected", WAIT, || async {
        Ok((op.metric("sealed_ota_operator_mqtt_connected").await? == 1.0).then_some(()))
    })
    .await?;
    // A client with the operator's client id takes its session over: the broker drops the operator.
    let (thief, mut el) = AsyncClient::new(
        h.bed.mqtt_options(&sealed_ota_operator::mqtt::client_id(
            &h.manager_id,
            "replica-1",
        ))?,
        16,
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await
    .context("takeover CONNACK")??;
    let _ = thief.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    drop(el);
    wait_for(
        "operator saw the disconnect and reconnected",
        WAIT,
        || async {
            let lost = op
                .metric("sealed_ota_operator_mqtt_disconnects_total")
                .await?;
            let up = op.metric("sealed_ota_operator_mqtt_connected").await?;
            Ok((lost >= 1.0 && up == 1.0).then_some(()))
        },
    )
    .await?;
    // Ready/status only reach the operator if it resubscribed on the new (clean) session.
    h.device("rc-1", "ash").await?;
    let _sim = h.spawn_device("rc-1", "1.0.0", Behavior::Install)?;
    h.campaign(
        "after-reconnect",
        fw_spec("ash", "2.0.0", serde_json::json!({})),
    )
    .await?;
    h.wait_campaign("after-reconnect", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    op.stop().await;
    h.ns.pass();
    Ok(())
}

/// A device that installs, fails its health check and rolls back: its signed receipt says so, the
/// Device says RolledBack, it counts as a failure toward the threshold, and a Warning Event names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_device_is_a_failure_with_a_warning() -> Result<()> {
    let h = Harness::new("op-rollback").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(8_000)).await?;
    h.device("rb-1", "teal").await?;
    let _sim = h.spawn_device("rb-1", "1.0.0", Behavior::RollBack)?;
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("teal", "2.0.0", serde_json::json!({}));
    spec["rollout"]["failureThreshold"] = serde_json::json!("0");
    h.campaign("rb", spec).await?;
    let c = h
        .wait_campaign("rb", "Failed", |c| phase(c) == CampaignPhase::Failed)
        .await?;
    let st = c.status.context("status")?;
    assert_eq!((st.devices.failed, st.devices.rolled_back), (1, 1));
    assert_eq!(st.failures[0].reason, "RolledBack");
    let d = h
        .get_device("rb-1")
        .await?
        .status
        .context("device status")?;
    assert_eq!(d.running_version.as_deref(), Some("1.0.0"));
    let ready = d
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("Ready")?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RolledBack")
    );
    assert!(d.campaign.context("record")?.receipt.is_some());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client(), &h.ns.name);
    let warned = wait_for("a DeviceRolledBack Warning Event", WAIT, || {
        let events = events.clone();
        async move {
            let found = events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("DeviceRolledBack")
                        && e.type_.as_deref() == Some("Warning")
                });
            Ok(found)
        }
    })
    .await?;
    assert!(warned.note.unwrap_or_default().contains("rb-1"));
    op.stop().await;
    h.ns.pass();
    Ok(())
}

/// The notify retained for `device`.
async fn retained_notify(
    h: &Harness,
    device: &str,
) -> Result<sealed_ota_protocol::wire::NotifyBody> {
    let found = retained_payloads(h, &format!("iot/{}/{device}/notify", h.manager_id)).await?;
    let (_, payload) = found.first().context("a retained notify")?;
    Ok(sealed_ota_protocol::wire::decode_notify(payload)?.1)
}

/// The `expires_at` of the notify retained for `device`.
async fn notify_expiry(h: &Harness, device: &str) -> Result<u64> {
    Ok(retained_notify(h, device).await?.expires_at)
}

/// The `issued_at` of the notify retained for `device`.
async fn notify_issued_at(h: &Harness, device: &str) -> Result<u64> {
    Ok(retained_notify(h, device).await?.issued_at)
}

/// The expiry is fixed when the campaign is first prepared: recorded on the campaign status, and
/// the same in the signed notify after the operator restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_expiry_is_fixed_when_first_prepared_and_survives_a_restart() -> Result<()> {
    let h = Harness::new("op-expiry").await?;
    h.manager_secret("manager").await?;
    h.firmware("fw", &image(8_000)).await?;
    h.device("ex-1", "rust").await?; // offline: stays in flight
    let op = h.start_operator("replica-1", false)?;
    h.campaign(
        "ex",
        fw_spec(
            "rust",
            "2.0.0",
            serde_json::json!({"expiresAfterSeconds": 3600}),
        ),
    )
    .await?;
    let c = h
        .wait_campaign("ex", "expiresAt recorded", |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.expires_at.is_some() && s.devices.in_progress == 1)
        })
        .await?;
    let recorded = c.status.and_then(|s| s.expires_at).context("expiresAt")?;
    assert_eq!(
        notify_expiry(&h, "ex-1").await? as i64,
        recorded.0.as_second()
    );
    let first_issued = notify_issued_at(&h, "ex-1").await?;
    op.kill();
    // Restarted later: the new process signs the same expiry, not a fresh one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let op = h.start_operator("replica-2", false)?;
    wait_for("the restarted operator's notify", WAIT, || {
        let h = &h;
        async move {
            let issued = notify_issued_at(h, "ex-1").await?;
            Ok((issued > first_issued).then_some(()))
        }
    })
    .await?;
    assert_eq!(
        notify_expiry(&h, "ex-1").await? as i64,
        recorded.0.as_second()
    );
    let c = h
        .wait_campaign("ex", "in flight again", |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.devices.in_progress == 1)
        })
        .await?;
    assert_eq!(c.status.and_then(|s| s.expires_at), Some(recorded));
    op.stop().await;
    h.ns.pass();
    Ok(())
}

/// Rotation with a pinned device whose receipt is lost: the certificate it switched to was
/// recorded as pending before it was sent, so the retry is answered (not PinMismatch), the rotation
/// settles, the old certificate is retired, and a later firmware campaign reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_rotation_receipt_does_not_lock_a_pinned_device_out() -> Result<()> {
    let h = Harness::new("op-lockout").await?;
    h.manager_secret("manager").await?;
    h.ca_secret("ota-ca").await?;
    let sim = h.spawn_device("lo-1", "1.0.0", Behavior::LoseFirstRotationReceipt)?;
    let pin = hex::encode(Sha256::digest(&sim.cert));
    let d: Device = serde_json::from_value(serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "Device",
        "metadata": {"name": "lo-1", "labels": {"fleet": "sand"}},
        "spec": {"certificateFingerprint": pin}
    }))?;
    Api::<Device>::namespaced(h.client(), &h.ns.name)
        .create(&PostParams::default(), &d)
        .await?;
    let op = h.start_operator("replica-1", false)?;
    let mut spec = fw_spec("sand", "1.0.1", serde_json::json!({}));
    spec["payload"] = serde_json::json!({"rotateCredentials": {"mode": "Csr", "caSecretName": "ota-ca", "validityDays": 30}});
    spec["rollout"]["deviceTimeoutSeconds"] = serde_json::json!(5);
    spec["rollout"]["retries"] = serde_json::json!(2);
    spec["rollout"]["retryBackoffSeconds"] = serde_json::json!(1);
    h.campaign("rotate", spec).await?;
    let c = h
        .wait_campaign("rotate", "Succeeded on the retry", |c| {
            phase(c) == CampaignPhase::Succeeded || phase(c) == CampaignPhase::Failed
        })
        .await?;
    assert_eq!(phase(&c), CampaignPhase::Succeeded, "{:?}", c.status);
    let st = h.get_device("lo-1").await?.status.context("status")?;
    let rec = st.campaign.clone().context("record")?;
    assert!(rec.attempts >= 2, "succeeded on a retry: {rec:?}");
    assert!(st.retired_certificate_fingerprints.contains(&pin), "{st:?}");
    assert!(st.pending_certificates.is_empty(), "{st:?}");
    let rotated = st
        .rotated_certificate_fingerprint
        .clone()
        .context("rotated")?;
    assert_ne!(rotated, pin);
    // A later firmware campaign reaches the device (its pin still names the retired certificate).
    h.firmware("fw", &image(6_000)).await?;
    h.campaign("after", fw_spec("sand", "2.0.0", serde_json::json!({})))
        .await?;
    h.wait_campaign("after", "Succeeded", |c| {
        phase(c) == CampaignPhase::Succeeded
    })
    .await?;
    op.stop().await;
    h.ns.pass();
    Ok(())
}
