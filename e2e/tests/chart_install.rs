//! The chart installed into the test bed with `helm install`, and its RBAC proven with the real
//! token of the chart's ServiceAccount (TokenRequest):
//!
//! - every API call the operator makes is allowed (SelfSubjectAccessReview), and the actions outside
//!   the chart's RBAC (a Secret in another namespace, another Secret of its own namespace, deleting a
//!   campaign, cluster-wide reads) are denied, by review and by real API calls;
//! - the operator binary, configured from the Deployment the chart installed (its env) and
//!   authenticated only with that token, completes a firmware campaign for emulated devices over
//!   Mosquitto TLS, and logs no authorization failure; run as two replicas (the chart's
//!   `replicas=2`), one leads, and the other takes the Lease over when the leader dies;
//! - in cluster-wide mode (`watchNamespaces` empty) the ClusterRole grants the same rules everywhere
//!   and nothing else, and `helm uninstall` removes it.
//!
//! The test bed has no kubelet, so the Deployment's pods never run; the test runs the same binary
//! as a local process with the pod's configuration instead. The CRDs are applied from `crds/` with
//! the field manager the other test-bed tests use (the chart's CRD rendering is checked by
//! `chart_render`); the release installs with `crds.enabled=false` so it never takes ownership of
//! the shared cluster-scoped CRDs.

mod chart_support;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chart_support::{apply_crds, argocd_health, argocd_health_script, binary, chart_dir, helm};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::ByteString;
use kube::api::{
    ApiResource, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use sealed_ota_e2e::{repo_root, wait_for, TestBed};

const RELEASE: &str = "sota";
const FULLNAME: &str = "sota-sealed-ota";
const DEVICES: u32 = 3;
const WAIT: Duration = Duration::from_secs(180);

/// A child process killed (by its own pid) when the test ends, pass or fail.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        eprintln!("chart_install: stopped {}", self.name);
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A kubeconfig for the same apiserver that authenticates with `token` only.
fn token_kubeconfig(admin: &Path, token: &str, out: &Path) -> Result<()> {
    let admin: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(admin)?)?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: Config\nusers: [{name: sa, user: {}}]\n\
         contexts: [{name: sa, context: {user: sa}}]\ncurrent-context: sa\n",
    )?;
    let cluster = admin["clusters"][0].clone();
    doc["contexts"][0]["context"]["cluster"] = cluster["name"].clone();
    doc["clusters"] = serde_yaml::Value::Sequence(vec![cluster]);
    doc["users"][0]["user"]["token"] = token.into();
    std::fs::write(out, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let k = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(k, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// One question for SelfSubjectAccessReview: verb, group, resource (with /subresource), namespace, name.
type Access<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

async fn allowed(client: &Client, (verb, group, resource, ns, name): Access<'_>) -> Result<bool> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: ns.map(str::to_string),
                name: name.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let out = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("SelfSubjectAccessReview")?;
    Ok(out.status.context("review status")?.allowed)
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (what the kubelet's httpGet probe does): status code and body.
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

fn is_forbidden<T: std::fmt::Debug>(r: kube::Result<T>) -> bool {
    matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403)
}

fn secret(name: &str, data: &[(&str, Vec<u8>)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
                .collect(),
        ),
        ..Secret::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_is_enough_for_a_campaign_and_nothing_more() -> Result<()> {
    let operator_bin = binary("sealed-ota-operator")?;
    let emulator_bin = binary("sealed-ota-device-emulator")?;
    let bed = TestBed::get()?;
    apply_crds(&bed.kubeconfig)?;
    let op = bed.namespace("chart-op").await?;
    let fleet = bed.namespace("chart-fleet").await?;
    let other = bed.namespace("chart-other").await?;
    let admin = op.client.clone();
    let work = repo_root().join("target/chart-tests").join(&op.name);
    std::fs::create_dir_all(&work)?;
    let manager_id = format!("mgr-{}", op.name.rsplit('-').next().unwrap_or("x"));

    // PKI (the test bed's CA signs the manager and the devices), the manager Secret in the fleet
    // namespace, and the broker TLS Secret (manager certificate as MQTT client) in the operator's.
    let pki = work.join("pki");
    run(
        Command::new(&emulator_bin)
            .env("KUBECONFIG", &bed.kubeconfig)
            .args(["pki-init", "--ca-cert"])
            .arg(&bed.ca_file)
            .arg("--ca-key")
            .arg(&bed.ca_key_file)
            .arg("--out")
            .arg(&pki)
            .args(["--manager-id", &manager_id, "-n", &fleet.name, "--apply"]),
        "device emulator pki-init",
    )?;
    let secrets_op: Api<Secret> = Api::namespaced(admin.clone(), &op.name);
    secrets_op
        .create(
            &PostParams::default(),
            &secret(
                "broker-tls",
                &[
                    ("ca.crt", std::fs::read(&bed.ca_file)?),
                    ("tls.crt", std::fs::read(pki.join("manager.crt"))?),
                    ("tls.key", std::fs::read(pki.join("manager.key"))?),
                ],
            ),
        )
        .await?;
    secrets_op
        .create(
            &PostParams::default(),
            &secret("unrelated", &[("k", b"v".to_vec())]),
        )
        .await?;
    Api::<Secret>::namespaced(admin.clone(), &other.name)
        .create(
            &PostParams::default(),
            &secret("private", &[("k", b"v".to_vec())]),
        )
        .await?;

    // helm install, watching only the fleet namespace.
    let chart = chart_dir();
    let watch = format!("watchNamespaces={{{}}}", fleet.name);
    let url = format!("broker.url={}", bed.mqtts_url);
    let manager = format!("manager.id={manager_id}");
    let out = helm(
        &[
            "install",
            RELEASE,
            chart.to_str().context("chart path")?,
            "--namespace",
            &op.name,
            "--set",
            &url,
            "--set",
            "broker.tls.secretName=broker-tls",
            "--set",
            &watch,
            "--set",
            &manager,
            "--set",
            "crds.enabled=false",
            "--set",
            "replicas=2",
        ],
        Some(&bed.kubeconfig),
    )?;
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(
        out.contains(&format!("Watching:   {}", fleet.name)),
        "NOTES.txt: {out}"
    );
    let status = helm(
        &["status", RELEASE, "--namespace", &op.name],
        Some(&bed.kubeconfig),
    )?;
    assert!(status.contains("STATUS: deployed"), "{status}");

    // A real token of the chart's ServiceAccount.
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &op.name)
        .create_token_request(
            FULLNAME,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                },
                ..TokenRequest::default()
            },
        )
        .await
        .context("TokenRequest for the chart's ServiceAccount")?
        .status
        .context("token status")?
        .token;
    let sa_kubeconfig = work.join("kubeconfig-sa");
    token_kubeconfig(&bed.kubeconfig, &token, &sa_kubeconfig)?;
    let sa = client_from(&sa_kubeconfig).await?;

    // Every call the operator makes (operator/src: controller watches, finalizer and status
    // patches, input reads, Recorder, leader Lease, broker Secret) is allowed.
    let (f, o) = (Some(fleet.name.as_str()), Some(op.name.as_str()));
    let group = "ota.sealed-ota.dev";
    let must_allow: Vec<Access> = vec![
        ("list", group, "updatecampaigns", f, None),
        ("watch", group, "updatecampaigns", f, None),
        ("patch", group, "updatecampaigns", f, Some("c")),
        ("patch", group, "updatecampaigns/status", f, Some("c")),
        ("list", group, "devices", f, None),
        ("watch", group, "devices", f, None),
        ("patch", group, "devices/status", f, Some("d")),
        ("get", "", "secrets", f, Some("sealed-ota-manager")),
        ("list", "", "secrets", f, None),
        ("watch", "", "secrets", f, None),
        ("get", "", "configmaps", f, Some("firmware")),
        ("list", "", "configmaps", f, None),
        ("watch", "", "configmaps", f, None),
        ("create", "events.k8s.io", "events", f, None),
        ("patch", "events.k8s.io", "events", f, Some("e")),
        ("create", "coordination.k8s.io", "leases", o, None),
        (
            "get",
            "coordination.k8s.io",
            "leases",
            o,
            Some("sealed-ota-operator"),
        ),
        (
            "patch",
            "coordination.k8s.io",
            "leases",
            o,
            Some("sealed-ota-operator-shard-0-of-1"),
        ),
        // Members learn who is alive from the member Leases.
        ("list", "coordination.k8s.io", "leases", o, None),
        ("list", group, "campaignshards", f, None),
        ("watch", group, "campaignshards", f, None),
        ("create", group, "campaignshards", f, None),
        (
            "patch",
            group,
            "campaignshards",
            f,
            Some("c-0123abcd-s0of1"),
        ),
        ("get", "", "secrets", o, Some("broker-tls")),
    ];
    let must_deny: Vec<Access> = vec![
        (
            "get",
            "",
            "secrets",
            Some(other.name.as_str()),
            Some("private"),
        ),
        ("list", "", "secrets", Some(other.name.as_str()), None),
        ("list", "", "secrets", None, None),
        ("get", "", "secrets", o, Some("unrelated")),
        ("list", "", "secrets", o, None),
        (
            "list",
            group,
            "updatecampaigns",
            Some(other.name.as_str()),
            None,
        ),
        ("list", group, "updatecampaigns", None, None),
        ("delete", group, "updatecampaigns", f, Some("c")),
        ("update", group, "updatecampaigns", f, Some("c")),
        ("create", group, "updatecampaigns", f, None),
        ("create", group, "devices", f, None),
        // One shard (the default): Devices are not labelled, so not patched.
        ("patch", group, "devices", f, Some("d")),
        ("delete", group, "devices", f, Some("d")),
        ("create", "", "secrets", f, None),
        ("update", "", "secrets", f, Some("sealed-ota-manager")),
        ("delete", "", "secrets", f, Some("sealed-ota-manager")),
        ("patch", "", "configmaps", f, Some("firmware")),
        (
            "delete",
            group,
            "campaignshards",
            f,
            Some("c-0123abcd-s0of1"),
        ),
        (
            "get",
            "coordination.k8s.io",
            "leases",
            Some(other.name.as_str()),
            Some("someone-else"),
        ),
        (
            "delete",
            "coordination.k8s.io",
            "leases",
            o,
            Some("sealed-ota-operator"),
        ),
        ("list", "", "pods", f, None),
        ("list", "", "namespaces", None, None),
        (
            "get",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            Some("updatecampaigns.ota.sealed-ota.dev"),
        ),
        ("create", "", "events", f, None),
    ];
    for a in &must_allow {
        assert!(
            allowed(&sa, *a).await?,
            "the chart's ServiceAccount may not {a:?}"
        );
    }
    for a in &must_deny {
        assert!(
            !allowed(&sa, *a).await?,
            "the chart's ServiceAccount may {a:?}"
        );
    }

    // The same with real API calls under that token.
    let sa_secrets_op: Api<Secret> = Api::namespaced(sa.clone(), &op.name);
    assert!(sa_secrets_op.get("broker-tls").await.is_ok());
    assert!(is_forbidden(sa_secrets_op.get("unrelated").await));
    assert!(is_forbidden(
        sa_secrets_op.list(&ListParams::default()).await
    ));
    let sa_secrets_other: Api<Secret> = Api::namespaced(sa.clone(), &other.name);
    assert!(is_forbidden(sa_secrets_other.get("private").await));
    assert!(is_forbidden(
        sa_secrets_other.list(&ListParams::default()).await
    ));
    assert!(is_forbidden(
        Api::<Secret>::all(sa.clone())
            .list(&ListParams::default())
            .await
    ));
    let campaigns = ApiResource {
        group: group.into(),
        version: "v1alpha1".into(),
        api_version: format!("{group}/v1alpha1"),
        kind: "UpdateCampaign".into(),
        plural: "updatecampaigns".into(),
    };
    let sa_campaigns: Api<DynamicObject> =
        Api::namespaced_with(sa.clone(), &fleet.name, &campaigns);
    assert!(sa_campaigns.list(&ListParams::default()).await.is_ok());
    let sa_other_campaigns: Api<DynamicObject> =
        Api::namespaced_with(sa.clone(), &other.name, &campaigns);
    assert!(is_forbidden(
        sa_other_campaigns.list(&ListParams::default()).await
    ));

    // The operator's configuration is the Deployment the chart installed.
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &op.name)
        .get(FULLNAME)
        .await?;
    let container = deployment
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers)
        .and_then(|c| c.into_iter().next())
        .context("operator container")?;
    assert_eq!(container.args.as_deref(), Some(&["run".to_string()][..]));
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in container.env.unwrap_or_default() {
        let value = match (e.value, e.value_from) {
            (Some(v), _) => v,
            (None, Some(from)) => match from.field_ref.map(|f| f.field_path).as_deref() {
                Some("metadata.namespace") => op.name.clone(),
                Some("metadata.name") => String::new(), // set per replica below
                other => bail!("unexpected fieldRef {other:?} in the chart's env"),
            },
            (None, None) => String::new(),
        };
        env.insert(e.name, value);
    }
    assert_eq!(env.get("SEALED_OTA_WATCH_NAMESPACES"), Some(&fleet.name));
    // A log filter for debugging this test (the chart's logLevel is what a pod gets).
    if let Ok(filter) = std::env::var("SEALED_OTA_CHART_TEST_RUST_LOG") {
        env.insert("RUST_LOG".into(), filter);
    }
    // Two replicas, like the chart's replicas=2: each with its own pod name and metrics port.
    let start_operator = |replica: u32| -> Result<(Proc, u16)> {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let proc = Proc {
            name: if replica == 0 {
                "operator replica 0"
            } else {
                "operator replica 1"
            },
            child: Command::new(&operator_bin)
                .arg("run")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(&env)
                .env("POD_NAME", format!("{FULLNAME}-local-{replica}"))
                // The pod's 0.0.0.0:8080 is a free local port here.
                .env(
                    "SEALED_OTA_METRICS_ADDR",
                    format!("127.0.0.1:{metrics_port}"),
                )
                .env("KUBECONFIG", &sa_kubeconfig)
                .stdout(File::create(work.join(format!("operator-{replica}.log")))?)
                .stderr(File::create(
                    work.join(format!("operator-{replica}.stderr.log")),
                )?)
                .spawn()
                .context("starting the operator")?,
        };
        Ok((proc, metrics_port))
    };
    let read_log = |replica: u32| {
        std::fs::read_to_string(work.join(format!("operator-{replica}.log"))).unwrap_or_default()
    };
    let (replica0, port0) = start_operator(0)?;
    wait_for(
        "replica 0 to become leader",
        Duration::from_secs(60),
        || {
            let log = read_log(0);
            async move { Ok(log.contains("became leader").then_some(())) }
        },
    )
    .await?;
    let (_replica1, port1) = start_operator(1)?;
    // The Deployment's probes: both replicas are live and ready (the standby too, so a rollout
    // with maxUnavailable 0 proceeds); only the leader reports the leader gauge as 1.
    for (port, leader) in [(port0, 1), (port1, 0)] {
        let metrics = wait_for(
            "the probes to answer",
            Duration::from_secs(30),
            || async move {
                if !matches!(http_get(port, "/healthz"), Ok((200, _))) {
                    return Ok(None);
                }
                match http_get(port, "/readyz") {
                    Ok((200, _)) => Ok(Some(http_get(port, "/metrics")?.1)),
                    _ => Ok(None),
                }
            },
        )
        .await?;
        let gauge = metrics
            .lines()
            .find(|l| l.starts_with("sealed_ota_operator_leader "))
            .with_context(|| format!("no leader gauge in:\n{metrics}"))?;
        assert_eq!(
            gauge,
            format!("sealed_ota_operator_leader {leader}"),
            "port {port}"
        );
    }
    let operator_log = work.join("operator-0.log");

    // Devices, firmware and a campaign in the fleet namespace.
    let fleet_dir = work.join("fleet");
    let label = format!("chart-test={}", fleet.name);
    run(
        Command::new(&emulator_bin)
            .env("KUBECONFIG", &bed.kubeconfig)
            .args(["enroll", "--ca-cert"])
            .arg(&bed.ca_file)
            .arg("--ca-key")
            .arg(&bed.ca_key_file)
            .arg("--fleet")
            .arg(&fleet_dir)
            .args([
                "--count",
                &DEVICES.to_string(),
                "--label",
                &label,
                "--manager-id",
                &manager_id,
            ])
            .args(["-n", &fleet.name, "--apply"]),
        "device emulator enroll",
    )?;
    let image: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    Api::<ConfigMap>::namespaced(admin.clone(), &fleet.name)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("firmware".into()),
                    ..ObjectMeta::default()
                },
                binary_data: Some([("image.bin".to_string(), ByteString(image))].into()),
                ..ConfigMap::default()
            },
        )
        .await?;
    let emulator_log = work.join("emulator.log");
    let mut emulator = Proc {
        name: "device emulator",
        child: Command::new(&emulator_bin)
            .args(["run", "--fleet"])
            .arg(&fleet_dir)
            .args(["--broker", &bed.mqtts_url, "--broker-ca"])
            .arg(&bed.ca_file)
            .args([
                "--exit-when",
                "settled",
                "--duration",
                "170s",
                "--no-progress",
                "--json",
            ])
            .stdout(File::create(work.join("emulator.json"))?)
            .stderr(File::create(&emulator_log)?)
            .stdin(Stdio::null())
            .spawn()
            .context("starting the device emulator")?,
    };
    let api_campaigns: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), &fleet.name, &campaigns);
    let campaign: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{group}/v1alpha1"),
        "kind": "UpdateCampaign",
        "metadata": {"name": "chart-campaign"},
        "spec": {
            "selector": {"matchLabels": {"chart-test": fleet.name}},
            "targetVersion": "1.1.0",
            "payload": {"firmware": {"configMapKeyRef": {"name": "firmware", "key": "image.bin"}}},
            "managerSecretName": "sealed-ota-manager",
            "rollout": {"maxInFlight": 3, "deviceTimeoutSeconds": 60}
        }
    }))?;
    api_campaigns
        .patch(
            "chart-campaign",
            &PatchParams::apply("chart-test"),
            &Patch::Apply(&campaign),
        )
        .await?;

    let done = wait_for(
        "the campaign to succeed under the chart's ServiceAccount",
        WAIT,
        || {
            let api = api_campaigns.clone();
            async move {
                let c = api.get("chart-campaign").await?;
                let phase = c.data["status"]["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match phase.as_str() {
                    "Succeeded" => Ok(Some(c)),
                    "Failed" | "Aborted" => bail!("campaign ended {phase}: {}", c.data["status"]),
                    _ => Ok(None),
                }
            }
        },
    )
    .await;
    let log = std::fs::read_to_string(&operator_log).unwrap_or_default();
    let done = match done {
        Ok(c) => c,
        Err(e) => {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{e:#}\noperator log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
    };

    // kstatus reads Ready with observedGeneration: both must describe the current generation.
    let generation = done.metadata.generation.context("generation")?;
    let status = &done.data["status"];
    assert_eq!(status["observedGeneration"], generation, "{status}");
    assert_eq!(
        status["progress"],
        format!("{DEVICES}/{DEVICES}"),
        "{status}"
    );
    let ready = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .context("Ready condition")?;
    assert_eq!(ready["status"], "True", "{ready}");
    assert_eq!(ready["observedGeneration"], generation, "{ready}");
    // The Argo CD health check reads the real status as Healthy.
    let live = serde_json::json!({"metadata": done.metadata, "status": status});
    let (health, message) = argocd_health(&argocd_health_script()?, &live)?;
    assert_eq!(health, "Healthy", "{message}: {live}");
    // And Flux's kstatus reads it as Current.
    let mut live = live;
    live["apiVersion"] = serde_json::json!(format!("{group}/v1alpha1"));
    live["kind"] = serde_json::json!("UpdateCampaign");
    let flux = chart_support::kstatus(&[live])?;
    assert_eq!(flux[0].1, "Current", "{flux:?}");

    // The operator's Events (events.k8s.io, created under the token) are there.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(admin.clone(), &fleet.name);
    let ours = wait_for("the operator's Events", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            let ours: Vec<_> = list
                .items
                .into_iter()
                .filter(|e| e.reporting_controller.as_deref() == Some("sealed-ota-operator"))
                .collect();
            Ok((!ours.is_empty()).then_some(ours))
        }
    })
    .await?;
    assert!(
        ours.iter().any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("chart-campaign")),
        "{ours:?}"
    );

    // The operator ran into no authorization failure, and only replica 0 was leader.
    for replica in [0, 1] {
        let log = read_log(replica);
        for needle in ["forbidden", "Forbidden", "code: 403"] {
            assert!(
                !log.contains(needle),
                "replica {replica}'s log mentions {needle:?}:\n{log}"
            );
        }
    }
    assert!(log.contains("became leader"), "{log}");
    assert!(
        !read_log(1).contains("became leader"),
        "two leaders:\n{}",
        read_log(1)
    );
    // The emulator exits by itself once every device settled.
    let settled = wait_for("the emulator to exit", Duration::from_secs(60), || {
        let exited = emulator.child.try_wait().map(|s| s.is_some());
        async move { Ok(exited?.then_some(())) }
    })
    .await;
    settled.with_context(|| std::fs::read_to_string(&emulator_log).unwrap_or_default())?;

    // Fail-over under the same RBAC: replica 0 dies without releasing the Lease; replica 1 takes it
    // over once it expires (20 s), reading and patching the Lease by name.
    drop(replica0);
    wait_for(
        "replica 1 to take over the Lease",
        Duration::from_secs(60),
        || {
            let log = read_log(1);
            async move { Ok(log.contains("became leader").then_some(())) }
        },
    )
    .await?;
    let log1 = read_log(1);
    for needle in ["forbidden", "Forbidden", "code: 403"] {
        assert!(
            !log1.contains(needle),
            "replica 1's log mentions {needle:?}:\n{log1}"
        );
    }
    drop(_replica1);
    let out = helm(
        &["uninstall", RELEASE, "--namespace", &op.name],
        Some(&bed.kubeconfig),
    )?;
    assert!(out.contains("uninstalled"), "{out}");
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), &op.name)
        .get_opt(FULLNAME)
        .await?
        .is_none());
    fleet.pass();
    op.pass();
    other.pass();
    Ok(())
}

/// With `watchNamespaces` empty the chart grants the campaign rules cluster-wide (a ClusterRole, the
/// documented price of watching every namespace) and still nothing else; uninstall removes the
/// cluster-scoped objects.
#[tokio::test]
async fn cluster_wide_mode_grants_campaign_rules_everywhere_and_nothing_else() -> Result<()> {
    let bed = TestBed::get()?;
    let op = bed.namespace("chart-cw").await?;
    let any = bed.namespace("chart-cw-any").await?;
    let admin = op.client.clone();
    let release = format!("cw-{}", op.name.rsplit('-').next().unwrap_or("x"));
    let fullname = format!("{release}-sealed-ota");
    let chart = chart_dir();
    let out = helm(
        &[
            "install",
            &release,
            chart.to_str().context("chart path")?,
            "--namespace",
            &op.name,
            "--set",
            "broker.url=mqtt://127.0.0.1:1883",
            "--set",
            "broker.credentials.secretName=broker-login",
            "--set",
            "crds.enabled=false",
        ],
        Some(&bed.kubeconfig),
    )?;
    assert!(out.contains("all namespaces"), "NOTES.txt: {out}");
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &op.name)
        .create_token_request(&fullname, &PostParams::default(), &TokenRequest::default())
        .await?
        .status
        .context("token")?
        .token;
    let work = repo_root().join("target/chart-tests").join(&op.name);
    std::fs::create_dir_all(&work)?;
    let kubeconfig = work.join("kubeconfig-sa");
    token_kubeconfig(&bed.kubeconfig, &token, &kubeconfig)?;
    let sa = client_from(&kubeconfig).await?;
    let group = "ota.sealed-ota.dev";
    let (a, o) = (Some(any.name.as_str()), Some(op.name.as_str()));
    for access in [
        ("list", group, "updatecampaigns", None, None),
        ("watch", group, "devices", None, None),
        ("patch", group, "updatecampaigns/status", a, Some("c")),
        ("get", "", "secrets", a, Some("manager")),
        ("list", "", "configmaps", None, None),
        ("create", "events.k8s.io", "events", a, None),
        ("get", "", "secrets", o, Some("broker-login")),
        (
            "patch",
            "coordination.k8s.io",
            "leases",
            o,
            Some("sealed-ota-operator"),
        ),
    ] {
        assert!(allowed(&sa, access).await?, "may not {access:?}");
    }
    for access in [
        ("delete", group, "updatecampaigns", a, Some("c")),
        ("create", group, "devices", a, None),
        ("create", "", "secrets", a, None),
        ("list", "", "pods", None, None),
        ("create", "coordination.k8s.io", "leases", a, None),
        (
            "delete",
            "coordination.k8s.io",
            "leases",
            o,
            Some("another-lease"),
        ),
        ("list", "", "namespaces", None, None),
    ] {
        assert!(!allowed(&sa, access).await?, "may {access:?}");
    }
    // helm upgrade with changed values rolls the Deployment's configuration.
    let out = helm(
        &[
            "upgrade",
            &release,
            chart.to_str().context("chart path")?,
            "--namespace",
            &op.name,
            "--reuse-values",
            "--set",
            "logFormat=json",
            "--set",
            "replicas=2",
        ],
        Some(&bed.kubeconfig),
    )?;
    assert!(out.contains("has been upgraded"), "{out}");
    let d = Api::<Deployment>::namespaced(admin.clone(), &op.name)
        .get(&fullname)
        .await?;
    let spec = d.spec.context("spec")?;
    assert_eq!(spec.replicas, Some(2));
    let env = spec.template.spec.context("pod")?.containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(env
        .iter()
        .any(|e| e.name == "SEALED_OTA_LOG_FORMAT" && e.value.as_deref() == Some("json")));
    let out = helm(
        &["uninstall", &release, "--namespace", &op.name],
        Some(&bed.kubeconfig),
    )?;
    assert!(out.contains("uninstalled"), "{out}");
    let roles = ApiResource {
        group: "rbac.authorization.k8s.io".into(),
        version: "v1".into(),
        api_version: "rbac.authorization.k8s.io/v1".into(),
        kind: "ClusterRole".into(),
        plural: "clusterroles".into(),
    };
    let left = Api::<DynamicObject>::all_with(admin.clone(), &roles)
        .get_opt(&fullname)
        .await?;
    assert!(left.is_none(), "the ClusterRole outlived helm uninstall");
    any.pass();
    op.pass();
    Ok(())
}
