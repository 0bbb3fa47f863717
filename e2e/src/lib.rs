//! Access to the running test bed for the end-to-end tests: it finds the test bed that
//! `e2e/testbed up` started (or starts one), hands out kube clients and MQTT connection
//! settings, and gives every test a namespace of its own. It starts no server itself: the
//! `e2e/testbed` script owns every process, so `e2e/testbed down` stops them all.

pub mod bench;
pub mod delta_bench;
pub mod http;
pub mod interop;
pub mod large_bench;
pub mod oci;
pub mod product;
pub mod prometheus;
pub mod rogue;
pub mod scale;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, CustomResourceExt};
use rand::Rng;
use sealed_ota_operator::crd::{Device, UpdateCampaign};
use sealed_ota_operator::shard_crd::CampaignShard;

/// Label put on every namespace a test creates, so they can be found and removed together.
pub const TEST_NAMESPACE_LABEL: &str = "e2e.sealed-ota.dev/test";

/// The running test bed: where its apiserver, brokers and PKI are.
#[derive(Debug, Clone)]
pub struct TestBed {
    /// State directory of the test bed (`target/testbed` by default).
    pub state_dir: PathBuf,
    /// Kubeconfig with the admin identity (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// Plain MQTT listener, `mqtt://127.0.0.1:PORT` (anonymous allowed).
    pub mqtt_url: String,
    /// TLS MQTT listener, `mqtts://127.0.0.1:PORT` (client certificate required; CN is the username).
    /// For a clustered broker, node 1's.
    pub mqtts_url: String,
    /// The broker kind `e2e/testbed up --broker` started: `mosquitto`, `mochi` or `rmqtt-cluster`.
    pub broker: String,
    /// Its version.
    pub broker_version: String,
    /// Its binary (`PrivateBroker` starts another instance of it).
    pub broker_bin: Option<PathBuf>,
    /// Every node's plain listener (one for a single broker), node 1 first.
    pub mqtt_urls: Vec<String>,
    /// Every node's TLS listener, node 1 first.
    pub mqtts_urls: Vec<String>,
    /// The test CA (EC P-256, PEM) that signed every certificate of the test bed.
    pub ca_file: PathBuf,
    /// The test CA's private key (PKCS#8 PEM), so tests can issue client certificates Mosquitto accepts.
    pub ca_key_file: PathBuf,
    /// A client certificate Mosquitto's TLS listener accepts (CN `testbed-client`).
    pub client_cert: PathBuf,
    /// The key of `client_cert`.
    pub client_key: PathBuf,
    /// The OCI registry (`distribution`, htpasswd auth, plain HTTP on loopback) and the `oras`
    /// client, when the test bed runs one.
    pub registry: Option<Registry>,
}

/// The test bed's OCI registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// User of its htpasswd file.
    pub user: String,
    /// That user's password.
    pub password: String,
    /// The `oras` binary built for the test bed.
    pub oras: PathBuf,
}

static TESTBED: OnceLock<std::result::Result<TestBed, String>> = OnceLock::new();

impl TestBed {
    /// The test bed for this test process: the one `e2e/testbed` already runs, or a new one
    /// started through it. Started ones are left running for the next test process; `make test`
    /// and `e2e/testbed down` take them down.
    pub fn get() -> Result<&'static TestBed> {
        TESTBED
            .get_or_init(|| Self::discover().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("test bed unavailable: {e}"))
    }

    fn discover() -> Result<TestBed> {
        let script = || Command::new(repo_root().join("e2e/testbed"));
        let exports = match run_script(script(), &["env"]) {
            Ok(out) => out,
            Err(_) => {
                run_script(script(), &["up"])
                    .context("starting the test bed with `e2e/testbed up`")?;
                run_script(script(), &["env"])?
            }
        };
        Self::from_exports(&exports)
    }

    /// Builds the description from the `export NAME='value'` lines `e2e/testbed env` prints.
    pub fn from_exports(text: &str) -> Result<TestBed> {
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('\'')))
            .collect();
        let var = |name: &str| -> Result<String> {
            vars.get(name)
                .map(|v| v.to_string())
                .with_context(|| format!("`e2e/testbed env` did not print {name}"))
        };
        let state_dir = var("SEALED_OTA_TESTBED_DIR")?.into();
        let kubeconfig = var("KUBECONFIG")?.into();
        let mqtt_url = var("SEALED_OTA_MQTT_URL")?;
        let mqtts_url = var("SEALED_OTA_MQTTS_URL")?;
        let list = |name: &str, single: &str| -> Vec<String> {
            vars.get(name)
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_else(|| vec![single.to_string()])
        };
        Ok(TestBed {
            state_dir,
            kubeconfig,
            broker: vars
                .get("SEALED_OTA_BROKER")
                .unwrap_or(&"mosquitto")
                .to_string(),
            broker_version: vars
                .get("SEALED_OTA_BROKER_VERSION")
                .unwrap_or(&"unknown")
                .to_string(),
            broker_bin: vars.get("SEALED_OTA_BROKER_BIN").map(PathBuf::from),
            mqtt_urls: list("SEALED_OTA_MQTT_URLS", &mqtt_url),
            mqtts_urls: list("SEALED_OTA_MQTTS_URLS", &mqtts_url),
            mqtt_url,
            mqtts_url,
            ca_file: var("SEALED_OTA_CA_FILE")?.into(),
            ca_key_file: var("SEALED_OTA_CA_KEY_FILE")?.into(),
            client_cert: var("SEALED_OTA_CLIENT_CERT")?.into(),
            client_key: var("SEALED_OTA_CLIENT_KEY")?.into(),
            registry: match vars.get("SEALED_OTA_REGISTRY") {
                Some(addr) => Some(Registry {
                    addr: addr.to_string(),
                    user: var("SEALED_OTA_REGISTRY_USER")?,
                    password: var("SEALED_OTA_REGISTRY_PASSWORD")?,
                    oras: var("SEALED_OTA_ORAS")?.into(),
                }),
                None => None,
            },
        })
    }

    /// Runs `e2e/testbed ARGS...` against this test bed (for example `node kill 2`).
    pub fn script(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(repo_root().join("e2e/testbed"));
        command.env("SEALED_OTA_TESTBED_DIR", &self.state_dir);
        run_script(command, args)
    }

    /// A kube client with the admin identity.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .context("loading the test bed kubeconfig")?;
        Client::try_from(config).context("building a kube client")
    }

    /// A fresh namespace for one test, removed when the guard drops after the test called
    /// [`TestNamespace::pass`], and kept for inspection otherwise (a panic or an error return).
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let client = self.client().await?;
        let suffix: u32 = rand::thread_rng().gen_range(0..0xff_ffff);
        let name = format!("{prefix}-{suffix:06x}");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace {
            name,
            client,
            kubeconfig: self.kubeconfig.clone(),
            passed: AtomicBool::new(false),
            kept: AtomicBool::new(false),
        })
    }

    /// Host and port of an `mqtt://` or `mqtts://` URL of the test bed.
    pub fn host_port(url: &str) -> Result<(String, u16)> {
        let url = sealed_ota_mqtt::BrokerUrl::parse(url)?;
        Ok((url.host, url.port))
    }

    /// rumqttc v5 options for the TLS listener, authenticated with `cert`/`key` (PEM files).
    pub fn mqtts_options(
        &self,
        client_id: &str,
        cert: &Path,
        key: &Path,
    ) -> Result<rumqttc::v5::MqttOptions> {
        let (host, port) = Self::host_port(&self.mqtts_url)?;
        let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let roots = sealed_ota_mqtt::tls::roots_from_pem(&read(&self.ca_file)?)?;
        let config = sealed_ota_mqtt::tls::client_config(roots, Some((&read(cert)?, &read(key)?)))?;
        options.set_transport(sealed_ota_mqtt::tls::transport(config));
        options.set_keep_alive(Duration::from_secs(30));
        Ok(options)
    }

    /// rumqttc v5 options for the plain listener.
    pub fn mqtt_options(&self, client_id: &str) -> Result<rumqttc::v5::MqttOptions> {
        let (host, port) = Self::host_port(&self.mqtt_url)?;
        let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        Ok(options)
    }
}

/// A namespace owned by one test. It is deleted on drop only when the test said it passed
/// ([`TestNamespace::pass`]); a test that panics or returns an error keeps it for inspection.
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    /// An admin client.
    pub client: Client,
    kubeconfig: PathBuf,
    passed: AtomicBool,
    /// Kept on purpose (a benchmark's objects), not because the test failed.
    kept: AtomicBool,
}

impl TestNamespace {
    /// The test passed: delete the namespace when the guard drops.
    pub fn pass(&self) {
        self.passed.store(true, Ordering::SeqCst);
    }

    /// Keep the namespace when the guard drops, on purpose (a benchmark keeps its objects for
    /// the next run and for inspection): dropping says so, not that the test failed.
    pub fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// Whether the test said it passed.
    pub fn passed(&self) -> bool {
        self.passed.load(Ordering::SeqCst)
    }

    /// Waits until `check` accepts the campaign `name`; the error says what the campaign's status
    /// last was.
    pub async fn wait_campaign(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&UpdateCampaign) -> bool,
    ) -> Result<UpdateCampaign> {
        let api = Api::<UpdateCampaign>::namespaced(self.client.clone(), &self.name);
        let result = wait_for(&format!("campaign {name}: {what}"), timeout, || async {
            let c = api.get(name).await?;
            Ok(check(&c).then_some(c))
        })
        .await;
        match result {
            Ok(c) => Ok(c),
            Err(e) => {
                let last = api.get(name).await.ok().and_then(|c| c.status);
                bail!("{e:#}; campaign status: {last:?}")
            }
        }
    }
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.kept.load(Ordering::SeqCst) {
            eprintln!(
                "e2e: namespace {} kept (KUBECONFIG={})",
                self.name,
                self.kubeconfig.display()
            );
            return;
        }
        if !self.passed() {
            eprintln!(
                "e2e: test did not pass; namespace {} kept for inspection (KUBECONFIG={})",
                self.name,
                self.kubeconfig.display()
            );
            return;
        }
        // Drop cannot await, and the test's runtime is blocked here (the test's client drives
        // its connections on it): delete with a new client on a thread with its own runtime.
        // Without a kube-controller-manager the namespace stays Terminating, which is harmless.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let config = Config::from_custom_kubeconfig(
                    Kubeconfig::read_from(&kubeconfig)?,
                    &KubeConfigOptions::default(),
                )
                .await?;
                Api::<Namespace>::all(Client::try_from(config)?)
                    .delete(&name, &DeleteParams::default())
                    .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = deleted {
            eprintln!("e2e: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e crate lives in the workspace")
        .to_path_buf()
}

/// Runs `command ARGS...`; its stdout, or an error carrying its stderr.
fn run_script(mut command: Command, args: &[&str]) -> Result<String> {
    let what = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        args.join(" ")
    );
    let out = command
        .args(args)
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static CRDS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Applies the CRDs from the operator's Rust types (server-side, field manager
/// `sealed-ota-tests`; `crds_in_sync` proves `crds/` holds the same) and waits until they are
/// established. Once per test process; idempotent across processes.
pub async fn install_crds(client: &Client) -> Result<()> {
    CRDS.get_or_try_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in [Device::crd(), UpdateCampaign::crd(), CampaignShard::crd()] {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("sealed-ota-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("applying CRD {name}"))?;
            wait_for(
                &format!("CRD {name} established"),
                Duration::from_secs(60),
                || {
                    let api = api.clone();
                    let name = name.clone();
                    async move {
                        let established = api
                            .get(&name)
                            .await?
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        Ok(established.then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .copied()
}

/// Polls `check` every 200 ms until it yields `Some`, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exports_that_testbed_env_prints() {
        let text = "export SEALED_OTA_TESTBED_DIR='/t'\nexport KUBECONFIG='/t/kubeconfig'\n\
            export SEALED_OTA_MQTT_URL='mqtt://127.0.0.1:1883'\n\
            export SEALED_OTA_MQTTS_URL='mqtts://127.0.0.1:8883'\n\
            export SEALED_OTA_CA_FILE='/t/pki/ca.crt'\nexport SEALED_OTA_CA_KEY_FILE='/t/pki/ca.key'\n\
            export SEALED_OTA_CLIENT_CERT='/t/pki/c.crt'\nexport SEALED_OTA_CLIENT_KEY='/t/pki/c.key'\n";
        let bed = TestBed::from_exports(text).unwrap();
        assert_eq!(bed.kubeconfig, PathBuf::from("/t/kubeconfig"));
        // Without the broker exports (a state directory e2e/kind filled): one Mosquitto.
        assert_eq!(bed.broker, "mosquitto");
        assert_eq!(bed.mqtts_urls, ["mqtts://127.0.0.1:8883"]);
        let cluster = format!(
            "{text}export SEALED_OTA_BROKER='rmqtt-cluster'\n\
             export SEALED_OTA_MQTTS_URLS='mqtts://127.0.0.1:8883,mqtts://127.0.0.1:8884'\n"
        );
        let bed = TestBed::from_exports(&cluster).unwrap();
        assert_eq!(bed.broker, "rmqtt-cluster");
        assert_eq!(bed.mqtts_urls.len(), 2);
        assert_eq!(
            TestBed::host_port(&bed.mqtts_url).unwrap(),
            ("127.0.0.1".into(), 8883)
        );
    }

    #[test]
    fn a_missing_export_is_named() {
        let err = TestBed::from_exports("export KUBECONFIG='/k'\n").unwrap_err();
        assert!(err.to_string().contains("SEALED_OTA_TESTBED_DIR"), "{err}");
    }
}
