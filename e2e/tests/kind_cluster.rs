//! The product as pods on a real cluster: the checks `make kind` runs (`e2e/kind/kind.sh check`)
//! once the chart is installed with 2 operator replicas, Mosquitto and the emulated devices run, and
//! a firmware campaign and a credential rotation have succeeded. They read the cluster the kind path
//! made (`SEALED_OTA_KIND_DIR`, default target/kind): probes and the leader Lease, the restricted
//! Pod Security Standard, metrics through the Service, Events and printer columns, and disruption
//! mid-campaign (the leader deleted, the leader evicted through the PodDisruptionBudget, the
//! emulator killed): the campaign finishes and no device installs twice.
//!
//! They need that cluster, so `make test` skips them (`#[ignore]`); they share its one fleet, so
//! they run one at a time (a lock here, and `--test-threads=1` in kind.sh).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use sealed_ota_e2e::product::random_image;
use sealed_ota_e2e::{repo_root, wait_for};
use sealed_ota_operator::crd::{CampaignPhase, Device, DevicePhase, UpdateCampaign};

const OPERATOR_NS: &str = "sealed-ota-system";
const FLEET_NS: &str = "fleet";
const MQTT_NS: &str = "mqtt";
const LEASE: &str = "sealed-ota-operator";
const DEVICES: usize = 20;

/// The checks share one fleet: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one check against the cluster, with a client for it.
fn in_cluster<F, Fut>(check: F) -> Result<()>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let _one_at_a_time = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async { check(client().await?).await })
}

fn state_dir() -> PathBuf {
    std::env::var_os("SEALED_OTA_KIND_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/kind"))
}

fn cluster_name() -> String {
    std::env::var("SEALED_OTA_KIND_CLUSTER").unwrap_or_else(|_| "sealed-ota".into())
}

async fn client() -> Result<Client> {
    let path = state_dir().join("kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| {
        format!(
            "{}: no kind cluster (make kind brings one up)",
            path.display()
        )
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn kubectl(args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(state_dir().join("kubeconfig"))
        .args(args)
        .output()
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside the kind node container (crictl, kill).
fn on_node(args: &[&str]) -> Result<String> {
    let docker = std::env::var("SEALED_OTA_REAL_DOCKER").unwrap_or_else(|_| "docker".into());
    let node = format!("{}-control-plane", cluster_name());
    let out = Command::new(docker)
        .args(["exec", &node])
        .args(args)
        .output()
        .context("running docker exec")?;
    ensure!(
        out.status.success(),
        "on the node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn operator_pods(client: &Client) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=sealed-ota"))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

async fn lease_holder(client: &Client) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

/// Both operator replicas Ready and one of them holding the Lease: returns (leader, standby).
async fn settled_replicas(client: &Client) -> Result<(String, String)> {
    wait_for(
        "2 Ready operator replicas, one holding the Lease",
        Duration::from_secs(180),
        || async {
            let pods = operator_pods(client).await?;
            let ready: Vec<String> = pods.iter().filter(|p| is_ready(p)).map(name).collect();
            let holder = lease_holder(client).await?;
            Ok(match (ready.len(), holder) {
                (2, Some(h)) if ready.contains(&h) => {
                    let other = ready.iter().find(|p| **p != h).cloned().unwrap_or_default();
                    Some((h, other))
                }
                _ => None,
            })
        },
    )
    .await
}

/// A metric's value in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` of one pod, through the apiserver's pod proxy.
fn pod_metrics(pod: &str) -> Result<String> {
    kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{OPERATOR_NS}/pods/{pod}:8080/proxy/metrics"),
    ])
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn replicas_pass_their_probes_and_one_leads() -> Result<()> {
    in_cluster(|client| async move {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NS);
        let d = deployments.get("sealed-ota").await?;
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
        let (leader, standby) = settled_replicas(&client).await?;
        for pod in operator_pods(&client).await? {
            let c = &pod.spec.as_ref().context("spec")?.containers[0];
            let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
                p.as_ref()
                    .and_then(|p| p.http_get.as_ref())
                    .and_then(|h| h.path.clone())
            };
            assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
            assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
            // Ready means the kubelet's readiness probe on /readyz passed.
            assert!(is_ready(&pod), "{} not Ready", name(&pod));
        }
        // The leader publishes; the standby is Ready (it serves probes) but idle.
        assert_eq!(
            metric(&pod_metrics(&leader)?, "sealed_ota_operator_leader"),
            Some(1.0)
        );
        assert_eq!(
            metric(&pod_metrics(&standby)?, "sealed_ota_operator_leader"),
            Some(0.0)
        );
        assert_eq!(
            metric(&pod_metrics(&leader)?, "sealed_ota_operator_mqtt_connected"),
            Some(1.0),
            "the leader is connected to Mosquitto over TLS"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn metrics_are_scraped_through_the_service() -> Result<()> {
    in_cluster(|client| async move {
        settled_replicas(&client).await?;
        // The apiserver's service proxy picks an endpoint of the Service, as a scraper would.
        let text = kubectl(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/{OPERATOR_NS}/services/sealed-ota-metrics:metrics/proxy/metrics"
            ),
        ])?;
        for name in [
            "sealed_ota_operator_leader",
            "sealed_ota_operator_mqtt_connected",
            "sealed_ota_operator_reconciliations_total",
        ] {
            ensure!(metric(&text, name).is_some(), "{name} missing in:\n{text}");
        }
        // Both replicas are endpoints of the Service (both Ready).
        let slices = kubectl(&[
            "-n",
            OPERATOR_NS,
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=sealed-ota-metrics",
            "-o",
            "jsonpath={.items[*].endpoints[*].conditions.ready}",
        ])?;
        assert_eq!(
            slices.split_whitespace().collect::<Vec<_>>(),
            ["true", "true"]
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn restricted_pod_security_is_enforced() -> Result<()> {
    in_cluster(|client| async move {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for ns in [OPERATOR_NS, FLEET_NS, MQTT_NS] {
            let labels = namespaces
                .get(ns)
                .await?
                .metadata
                .labels
                .unwrap_or_default();
            assert_eq!(
                labels
                    .get("pod-security.kubernetes.io/enforce")
                    .map(String::as_str),
                Some("restricted"),
                "{ns}"
            );
        }
        // A copy of the running operator pod is admitted; the same pod asking for root is refused.
        let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
        let running = operator_pods(&client)
            .await?
            .pop()
            .context("no operator pod")?;
        let mut spec = running.spec.clone().context("spec")?;
        spec.node_name = None;
        let mut copy = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("pss-probe".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        };
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        pods.create(&dry, &copy)
            .await
            .context("the chart's pod was refused")?;
        let c = &mut copy.spec.as_mut().context("spec")?.containers[0];
        let sc = c.security_context.get_or_insert_with(Default::default);
        sc.run_as_non_root = Some(false);
        sc.run_as_user = Some(0);
        sc.allow_privilege_escalation = Some(true);
        match pods.create(&dry, &copy).await {
            Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity \"restricted") => {
            }
            other => bail!("a root pod was not refused by Pod Security admission: {other:?}"),
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn finished_campaigns_show_columns_and_events() -> Result<()> {
    in_cluster(|client| async move {
        let campaigns: Api<UpdateCampaign> = Api::namespaced(client.clone(), FLEET_NS);
        let c = campaigns.get("firmware-1-1-0").await?;
        // (Its counts are not checked here: later checks move the devices on to newer campaigns,
        // and the operator recounts a finished campaign from the Devices; see the README.)
        assert_eq!(c.status.context("status")?.phase, CampaignPhase::Succeeded);

        let table = kubectl(&["-n", FLEET_NS, "get", "updatecampaigns"])?;
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().context("header")?.split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME",
                "PHASE",
                "SUCCEEDED",
                "FAILED",
                "TOTAL",
                "VERSION",
                "AGE"
            ],
            "{table}"
        );
        // The wave column has priority 1: `-o wide` shows it.
        let wide = kubectl(&["-n", FLEET_NS, "get", "updatecampaigns", "-o", "wide"])?;
        let wide_header: Vec<&str> = wide
            .lines()
            .next()
            .context("header")?
            .split_whitespace()
            .collect();
        assert_eq!(
            wide_header,
            [
                "NAME",
                "PHASE",
                "SUCCEEDED",
                "FAILED",
                "TOTAL",
                "VERSION",
                "PROGRESS",
                "WAVE",
                "AGE"
            ],
            "{wide}"
        );
        let row: Vec<&str> = lines
            .find(|l| l.starts_with("firmware-1-1-0 "))
            .context("firmware-1-1-0 row")?
            .split_whitespace()
            .collect();
        // (SUCCEEDED is recounted from the Devices once they moved on: not checked, see above.)
        assert_eq!(
            (row[1], row[3], row[4], row[5]),
            ("Succeeded", "0", DEVICES.to_string().as_str(), "1.1.0"),
            "{table}"
        );

        let events: Api<Event> = Api::namespaced(client.clone(), FLEET_NS);
        let reasons: Vec<String> =
            events
                .list(&ListParams::default().fields(
                    "involvedObject.kind=UpdateCampaign,involvedObject.name=firmware-1-1-0",
                ))
                .await?
                .items
                .into_iter()
                .filter_map(|e| e.reason)
                .collect();
        for reason in ["Progressing", "Succeeded"] {
            ensure!(
                reasons.iter().any(|r| r == reason),
                "no {reason} Event: {reasons:?}"
            );
        }
        // The credential rotation kind.sh ran finished too.
        let rotation = campaigns.get("rotate-credentials-2027").await?;
        assert_eq!(
            rotation.status.context("status")?.phase,
            CampaignPhase::Succeeded
        );
        Ok(())
    })
}

// --- disruption mid-campaign -----------------------------------------------------------------------

/// The next firmware version for the fleet: one minor above the highest it runs (devices refuse a
/// version that is not newer).
async fn next_version(client: &Client) -> Result<String> {
    let devices: Api<Device> = Api::namespaced(client.clone(), FLEET_NS);
    let mut highest = (1u64, 1u64);
    for d in devices.list(&ListParams::default()).await? {
        if let Some(v) = d.status.and_then(|s| s.running_version) {
            let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
            highest = highest.max((parts.next().unwrap_or(0), parts.next().unwrap_or(0)));
        }
    }
    Ok(format!("{}.{}.0", highest.0, highest.1 + 1))
}

/// A firmware campaign over the whole fleet, slow enough (one device at a time, a large image) to
/// disrupt something in the middle of it.
async fn start_campaign(client: &Client, name: &str, version: &str) -> Result<()> {
    // A check that failed half-way left its campaign running: it would compete for the devices.
    let campaigns: Api<UpdateCampaign> = Api::namespaced(client.clone(), FLEET_NS);
    for c in campaigns.list(&ListParams::default()).await? {
        let finished = c.status.as_ref().is_some_and(|s| {
            matches!(
                s.phase,
                CampaignPhase::Succeeded | CampaignPhase::Failed | CampaignPhase::Aborted
            )
        });
        if !finished {
            let leftover = c.metadata.name.unwrap_or_default();
            eprintln!("deleting unfinished campaign {leftover} left by an earlier run");
            campaigns
                .delete(&leftover, &DeleteParams::default())
                .await?;
        }
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), FLEET_NS);
    let image = random_image(900 * 1024);
    let map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "binaryData": {"image.bin": base64_engine(&image)},
    }))?;
    maps.patch(
        name,
        &PatchParams::apply("kind-cluster-test").force(),
        &Patch::Apply(&map),
    )
    .await?;
    let campaign: UpdateCampaign = serde_json::from_value(serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "UpdateCampaign",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"fleet": "demo"}},
            "targetVersion": version,
            "payload": {"firmware": {"configMapKeyRef": {"name": name, "key": "image.bin"}}},
            "managerSecretName": "sealed-ota-manager",
            "rollout": {"maxInFlight": 1, "deviceTimeoutSeconds": 120, "retries": 2},
        },
    }))?;
    campaigns
        .patch(
            name,
            &PatchParams::apply("kind-cluster-test").force(),
            &Patch::Apply(&campaign),
        )
        .await?;
    Ok(())
}

fn base64_engine(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn succeeded_devices(client: &Client, campaign: &str) -> Result<BTreeMap<String, u32>> {
    let devices: Api<Device> = Api::namespaced(client.clone(), FLEET_NS);
    let mut done = BTreeMap::new();
    for d in devices.list(&ListParams::default()).await? {
        if let Some(c) = d.status.and_then(|s| s.campaign) {
            if c.name == campaign && c.phase == DevicePhase::Succeeded {
                done.insert(d.metadata.name.unwrap_or_default(), c.attempts);
            }
        }
    }
    Ok(done)
}

/// Waits until `at_least` devices succeeded in the campaign (and the campaign is still running).
async fn some_done(
    client: &Client,
    campaign: &str,
    at_least: usize,
) -> Result<BTreeMap<String, u32>> {
    wait_for(
        &format!("{at_least} devices done in {campaign}"),
        Duration::from_secs(300),
        || async {
            let done = succeeded_devices(client, campaign).await?;
            Ok((done.len() >= at_least).then_some(done))
        },
    )
    .await
    .and_then(|done| {
        ensure!(
            done.len() < DEVICES,
            "{campaign} finished before it could be disrupted"
        );
        Ok(done)
    })
}

/// A firmware campaign under way, with the devices it had finished when it was disrupted.
struct UnderWay {
    campaign: String,
    version: String,
    done_before: BTreeMap<String, u32>,
}

/// Starts a campaign to the fleet's next version and waits until 3 devices are done.
async fn campaign_under_way(client: &Client, prefix: &str) -> Result<UnderWay> {
    let version = next_version(client).await?;
    let campaign = format!("{prefix}-{}", version.replace('.', "-"));
    start_campaign(client, &campaign, &version).await?;
    let done_before = some_done(client, &campaign, 3).await?;
    Ok(UnderWay {
        campaign,
        version,
        done_before,
    })
}

impl UnderWay {
    async fn finishes_without_redoing(&self, client: &Client) -> Result<()> {
        finishes_without_redoing(client, &self.campaign, &self.version, &self.done_before).await
    }
}

/// Waits for the campaign to succeed for the whole fleet; then checks that the devices done before
/// the disruption were not updated again: one attempt each in their Device status, and (from the
/// emulator's log, all its container runs) every device installed the version exactly once.
async fn finishes_without_redoing(
    client: &Client,
    campaign: &str,
    version: &str,
    done_before: &BTreeMap<String, u32>,
) -> Result<()> {
    let campaigns: Api<UpdateCampaign> = Api::namespaced(client.clone(), FLEET_NS);
    let phase = wait_for(
        &format!("{campaign} finished"),
        Duration::from_secs(600),
        || async {
            let c = campaigns.get(campaign).await?;
            Ok(c.status
                .map(|s| s.phase)
                .filter(|p| matches!(p, CampaignPhase::Succeeded | CampaignPhase::Failed)))
        },
    )
    .await?;
    assert_eq!(phase, CampaignPhase::Succeeded);
    let status = campaigns.get(campaign).await?.status.context("status")?;
    assert_eq!(status.devices.succeeded as usize, DEVICES, "{status:?}");
    assert_eq!(
        status.progress.as_deref(),
        Some(format!("{DEVICES}/{DEVICES}").as_str())
    );
    let after = succeeded_devices(client, campaign).await?;
    assert_eq!(after.len(), DEVICES, "{after:?}");
    for (device, attempts) in done_before {
        assert_eq!(
            after.get(device),
            Some(attempts),
            "{device}: attempts changed after the disruption"
        );
    }
    let installs = installs_logged(version)?;
    for device in after.keys() {
        assert_eq!(
            installs.get(device).copied().unwrap_or(0),
            1,
            "{device} installed {version} {} times ({installs:?})",
            installs.get(device).copied().unwrap_or(0)
        );
    }
    Ok(())
}

/// How often each device logged installing `version`, over the emulator container's current and
/// previous runs.
fn installs_logged(version: &str) -> Result<BTreeMap<String, usize>> {
    let mut text = kubectl(&[
        "-n",
        FLEET_NS,
        "logs",
        "deployment/device-emulator",
        "-c",
        "devices",
    ])?;
    if let Ok(previous) = kubectl(&[
        "-n",
        FLEET_NS,
        "logs",
        "deployment/device-emulator",
        "-c",
        "devices",
        "--previous",
    ]) {
        text.push_str(&previous);
    }
    let mut counts = BTreeMap::new();
    for line in text.lines().map(strip_ansi) {
        if !line.contains("update installed and committed") {
            continue;
        }
        let field = |key: &str| {
            line.split(&format!("{key}="))
                .nth(1)
                .and_then(|rest| rest.split([' ', '"']).find(|s| !s.is_empty()))
                .map(str::to_string)
        };
        if field("version").as_deref() == Some(version) {
            *counts
                .entry(field("device").unwrap_or_default())
                .or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// A log line without its terminal colour codes (ESC [ ... m).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn deleting_the_leader_mid_campaign_hands_over_without_redoing_devices() -> Result<()> {
    in_cluster(|client| async move {
        let (leader, standby) = settled_replicas(&client).await?;
        let run = campaign_under_way(&client, "failover").await?;

        let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
        pods.delete(&leader, &DeleteParams::default()).await?;
        // Another replica takes the Lease: the deleted leader released it on SIGTERM. Which one is
        // a race: the standby wakes when the Lease it last saw would expire (up to 20 s), the
        // replacement pod tries at once when it starts.
        let holder = wait_for(
            "another replica to take the Lease",
            Duration::from_secs(60),
            || async { Ok(lease_holder(&client).await?.filter(|h| *h != leader)) },
        )
        .await?;
        let live: Vec<String> = operator_pods(&client).await?.iter().map(name).collect();
        assert!(
            live.contains(&holder),
            "the Lease went to {holder}, not a live replica {live:?}"
        );
        eprintln!(
            "the Lease went to the {}",
            if holder == standby {
                "standby"
            } else {
                "replacement pod"
            }
        );
        run.finishes_without_redoing(&client).await?;
        settled_replicas(&client).await?;
        Ok(())
    })
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn an_evicted_leader_comes_back_and_the_campaign_resumes() -> Result<()> {
    in_cluster(|client| async move {
        let (leader, standby) = settled_replicas(&client).await?;
        let run = campaign_under_way(&client, "evict").await?;

        // Evicted through the Eviction API, as a node drain does: the PodDisruptionBudget allows
        // one; with it gone, the next is refused until the replacement is Ready (its readiness
        // probe starts after 2 s). kubectl, because kube's client retries a refused eviction.
        evict(&leader)?.map_err(anyhow::Error::msg)?;
        match evict(&standby)? {
            Err(refusal) if refusal.contains("disruption budget") => {}
            other => {
                bail!("the second eviction was not refused by the PodDisruptionBudget: {other:?}")
            }
        }
        let (new_leader, _) = settled_replicas(&client).await?;
        assert_ne!(new_leader, leader);
        let replacement = operator_pods(&client)
            .await?
            .into_iter()
            .map(|p| name(&p))
            .find(|p| *p != leader && *p != standby);
        assert!(replacement.is_some(), "no replacement pod came back");
        run.finishes_without_redoing(&client).await?;
        Ok(())
    })
}

#[test]
#[ignore = "needs the kind cluster: make kind"]
fn a_killed_emulator_restarts_and_its_devices_resume() -> Result<()> {
    in_cluster(|client| async move {
        settled_replicas(&client).await?;
        let restarts_before = emulator_restarts(&client).await?;
        let run = campaign_under_way(&client, "emulator-kill").await?;

        // SIGKILL, what the kernel's OOM killer sends: the kubelet restarts the container in the same
        // pod, whose emptyDir keeps every device's identity and installed firmware.
        let id = on_node(&["crictl", "ps", "--name", "^devices$", "-q"])?;
        let id = id
            .lines()
            .next()
            .context("no running devices container")?
            .to_string();
        let pid = on_node(&[
            "crictl",
            "inspect",
            "-o",
            "go-template",
            "--template",
            "{{.info.pid}}",
            &id,
        ])?;
        on_node(&["kill", "-9", pid.trim()])?;
        wait_for(
            "the emulator container restarted",
            Duration::from_secs(120),
            || async { Ok((emulator_restarts(&client).await? > restarts_before).then_some(())) },
        )
        .await?;
        run.finishes_without_redoing(&client).await?;
        Ok(())
    })
}

/// Asks the Eviction API to evict an operator pod: Ok(Err(refusal)) when the apiserver refused.
fn evict(pod: &str) -> Result<std::result::Result<(), String>> {
    let body = serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": OPERATOR_NS},
    });
    let file = state_dir().join(format!("eviction-{pod}.json"));
    std::fs::write(&file, body.to_string())?;
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(state_dir().join("kubeconfig"))
        .args(["create", "--raw"])
        .arg(format!(
            "/api/v1/namespaces/{OPERATOR_NS}/pods/{pod}/eviction"
        ))
        .arg("-f")
        .arg(&file)
        .output()?;
    std::fs::remove_file(&file)?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

async fn emulator_restarts(client: &Client) -> Result<i32> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), FLEET_NS);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=device-emulator"))
        .await?;
    let pod = list.items.first().context("no emulator pod")?;
    Ok(pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "devices"))
        .map(|c| c.restart_count)
        .unwrap_or(0))
}
