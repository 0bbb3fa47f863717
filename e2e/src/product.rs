//! The whole product as real processes, for the end-to-end tests: a namespace with the CRDs,
//! the PKI in Secrets, an enrolled fleet, the `sealed-ota-operator` binary and the
//! `sealed-ota-device-emulator` binary, all against the test bed (or a broker of the test's own
//! that it may stop and restart). Everything a test started stops when its `Product` drops;
//! the working directory (logs, fleet, PKI) stays under `target/e2e-runs/` for inspection.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Event as KubeEvent};
use k8s_openapi::ByteString;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::Api;
use rand::{Rng, RngCore};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_operator::crd::{Device, DevicePhase, UpdateCampaign};
use sha2::{Digest, Sha256};

use crate::{repo_root, TestBed, TestNamespace};

/// A private broker of the test bed's kind for tests that stop and restart the broker, or make it
/// drop messages: TLS with client certificates from the test bed's CA, like the test bed's own
/// listener, and persistence in its directory. With Mosquitto, optionally an ACL file
/// (`acl_file`, keyed on the certificate's CN as username) the test rewrites and makes the running
/// broker reload. Mosquitto for a Mosquitto test bed; mochi-mqtt (bbolt persistence) for a
/// mochi test bed; a single Mosquitto for the rmqtt cluster, whose node loss is tested on the
/// cluster itself (`product_broker_cluster.rs`).
#[derive(Debug)]
pub struct PrivateBroker {
    /// The broker's kind: `mosquitto` or `mochi`.
    pub kind: String,
    dir: PathBuf,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts a broker of the test bed's kind on a free loopback port with persistence in `dir`.
    pub fn start(bed: &TestBed, dir: &Path) -> Result<Self> {
        Self::start_with_acl(bed, dir, None)
    }

    /// Like `start`, with `acl` as Mosquitto's ACL file (every publish and delivery it does not
    /// allow is dropped by the broker, as a malicious broker would drop it). Mosquitto only.
    pub fn start_with_acl(bed: &TestBed, dir: &Path, acl: Option<&str>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        if acl.is_some() && bed.broker == "mochi" {
            bail!("a private broker with an ACL needs Mosquitto (the test bed runs mochi)");
        }
        let acl_line = match acl {
            Some(text) => {
                std::fs::write(dir.join("acl"), text)?;
                format!("acl_file {}/acl\n", dir.display())
            }
            None => String::new(),
        };
        let port = free_port()?;
        let pki = bed.state_dir.join("pki");
        let (kind, program, args): (&str, PathBuf, Vec<std::ffi::OsString>) = match (
            bed.broker.as_str(),
            &bed.broker_bin,
        ) {
            ("mochi", Some(bin)) => (
                "mochi",
                bin.clone(),
                vec![
                    "-tls".into(),
                    format!("127.0.0.1:{port}").into(),
                    "-ca".into(),
                    pki.join("ca.crt").into(),
                    "-cert".into(),
                    pki.join("mosquitto.crt").into(),
                    "-key".into(),
                    pki.join("mosquitto.key").into(),
                    "-data".into(),
                    dir.join("mochi.db").into(),
                ],
            ),
            _ => {
                let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
                std::fs::write(
                        dir.join("mosquitto.conf"),
                        format!(
                            "per_listener_settings false\nuser {user}\nallow_anonymous false\npersistence true\n\
                             persistence_location {d}/\nlog_dest file {d}/mosquitto.log\n{acl_line}\
                             listener {port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/mosquitto.crt\n\
                             keyfile {p}/mosquitto.key\nrequire_certificate true\nuse_identity_as_username true\n",
                            d = dir.display(),
                            p = pki.display(),
                        ),
                    )?;
                let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
                    .into_iter()
                    .find(|p| Path::new(p).exists())
                    .context("mosquitto not installed (e2e/testbed up installs it)")?;
                (
                    "mosquitto",
                    bin.into(),
                    vec!["-c".into(), dir.join("mosquitto.conf").into()],
                )
            }
        };
        let mut broker = PrivateBroker {
            kind: kind.to_string(),
            dir: dir.to_path_buf(),
            program,
            args,
            port,
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// `mqtts://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Replaces the ACL file and makes the running broker reload it (SIGHUP).
    pub fn set_acl(&self, acl: &str) -> Result<()> {
        std::fs::write(self.dir.join("acl"), acl)?;
        let child = self.child.as_ref().context("the broker is not running")?;
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -HUP {} failed", child.id());
        }
        // Mosquitto reloads on its next loop iteration.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Kills the broker without warning (SIGKILL): what it had not saved is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and persistence directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "private {} not listening on {} after 10 s",
                    self.kind,
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything the broker relayed to a subscriber of `#`, payload bytes concatenated.
pub struct Spy {
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Spy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.seen.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Spy").field("bytes_seen", &bytes).finish()
    }
}

impl Spy {
    /// Subscribes to `#` on the plain listener and returns once the broker acknowledged it.
    pub async fn start(bed: &TestBed, id: &str) -> Result<Self> {
        let mut options = bed.mqtt_options(&format!("spy-{id}"))?;
        // Retained messages of other tests arrive too: accept any size the broker relays.
        options.set_max_packet_size(Some(256 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    // (Re)subscribe on every new connection: a reconnect starts a clean session.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe("#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().unwrap().extend_from_slice(&p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("spy: no SUBACK")??;
        Ok(Spy { seen, task })
    }

    /// Stops recording and returns what was seen.
    pub fn stop(self) -> Vec<u8> {
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Sum of the series of `name` whose labels contain `label` (for example `reason="wrong_device"`).
pub fn metric(series: &[(String, f64)], name: &str, label: Option<&str>) -> f64 {
    series
        .iter()
        .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
        .filter(|(k, _)| label.is_none_or(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// The labels of the secrets any 32-byte window of which appears anywhere in `seen`: what a
/// broker that recorded everything could read of them (session and content keys are 32 bytes; a
/// delivered private key is its PKCS#8 DER, which holds the 32-byte scalar). One pass over `seen`.
pub fn leaked_secrets<'a>(seen: &[u8], secrets: &'a [(String, Vec<u8>)]) -> Vec<&'a str> {
    let mut windows: std::collections::HashMap<&[u8], &str> = std::collections::HashMap::new();
    for (label, secret) in secrets {
        for w in secret.windows(32) {
            windows.insert(w, label.as_str());
        }
    }
    let mut found: Vec<&str> = seen
        .windows(32)
        .filter_map(|w| windows.get(w).copied())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// 32-byte windows of `image` at every 16-byte offset found anywhere in `seen`.
pub fn leaked_windows(seen: &[u8], image: &[u8]) -> usize {
    let windows: HashSet<&[u8]> = (0..image.len().saturating_sub(32))
        .step_by(16)
        .map(|i| &image[i..i + 32])
        .collect();
    let found: HashSet<&[u8]> = seen.windows(32).filter(|w| windows.contains(w)).collect();
    found.len()
}

/// One product installation in its own namespace.
pub struct Product {
    /// The test bed.
    pub bed: &'static TestBed,
    /// The namespace of every object of this product.
    pub ns: TestNamespace,
    /// Working directory: `pki/`, `fleet/`, logs.
    pub dir: PathBuf,
    /// Manager id (unique per product, so products share the broker without crosstalk).
    pub manager_id: String,
    /// Ids of the enrolled devices.
    pub device_ids: Vec<String>,
    /// Broker URL the operator uses (node 1 of a cluster).
    pub broker_url: String,
    /// Broker URLs the devices use: every node of a cluster, comma-separated (the emulator
    /// spreads devices over them).
    pub device_broker_urls: String,
    /// Address of the operator's metrics listener.
    pub metrics_addr: String,
    /// The emulator's `--window-timeout` in seconds: short (3) by default so tests recover
    /// quickly from dropped windows; benchmarks set the product default (30).
    pub window_timeout_seconds: u32,
    /// Whether the emulator logs the devices' secrets (`run --key-log`) for the leak scans; the
    /// benchmark turns it off.
    pub log_keys: bool,
    /// Whether each emulator process writes its counters to `<summary name>.prom` every second
    /// (`run --metrics-file`; `emulator_metrics_files`), for benchmarks that follow a run live.
    pub emulator_metrics: bool,
    /// Extra arguments of every operator replica (for example `--shards 4`,
    /// `--retained-chunk-bytes N`).
    pub operator_args: Vec<String>,
    /// Running operator replicas by index (0 is the one `start_operator` starts).
    operators: std::collections::BTreeMap<usize, Child>,
    /// Metrics addresses of replicas other than 0 (fixed for the product's life).
    replica_addrs: std::collections::BTreeMap<usize, String>,
    /// The running emulator processes (several with `start_emulators`: parts of the fleet).
    emulators: Vec<Child>,
    operator_starts: u32,
    emulator_starts: u32,
    /// Processes of the emulator run started last.
    emulator_parts: usize,
}

impl std::fmt::Debug for Product {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Product")
            .field("ns", &self.ns.name)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Product {
    /// A namespace with the CRDs installed, the manager and CA Secrets, and `devices` enrolled
    /// devices labelled `fleet=<namespace>` (Device resources applied), using the test bed's broker.
    /// The operator connects to the broker's first node, the devices spread over every node.
    pub async fn new(prefix: &str, devices: u32) -> Result<Self> {
        let bed = TestBed::get()?;
        let mut product = Self::with_broker(prefix, devices, bed.mqtts_url.clone()).await?;
        product.device_broker_urls = bed.mqtts_urls.join(",");
        Ok(product)
    }

    /// Like `new`, against another broker (for example a `PrivateBroker`).
    pub async fn with_broker(prefix: &str, devices: u32, broker_url: String) -> Result<Self> {
        Self::with_enrollment(prefix, devices, broker_url, &[]).await
    }

    /// Like `with_broker`, with extra `enroll` arguments (for example `--release-key FILE`).
    pub async fn with_enrollment(
        prefix: &str,
        devices: u32,
        broker_url: String,
        enroll_args: &[&str],
    ) -> Result<Self> {
        let bed = TestBed::get()?;
        build_binaries()?;
        let ns = bed.namespace(prefix).await?;
        crate::install_crds(&ns.client).await?;
        let dir = repo_root().join("target/e2e-runs").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        let tag: u32 = rand::thread_rng().gen_range(0..0xff_ffff);
        let manager_id = format!("m{tag:06x}");
        let id_prefix = format!("d{tag:06x}");
        let product = Product {
            bed,
            ns,
            dir,
            manager_id,
            device_ids: (0..devices)
                .map(|i| format!("{id_prefix}-{i:05}"))
                .collect(),
            device_broker_urls: broker_url.clone(),
            broker_url,
            metrics_addr: format!("127.0.0.1:{}", free_port()?),
            window_timeout_seconds: 3,
            log_keys: true,
            emulator_metrics: false,
            operator_args: Vec::new(),
            operators: std::collections::BTreeMap::new(),
            replica_addrs: std::collections::BTreeMap::new(),
            emulators: Vec::new(),
            operator_starts: 0,
            emulator_starts: 0,
            emulator_parts: 0,
        };
        let ca = [
            "--ca-cert",
            path_str(&bed.ca_file)?,
            "--ca-key",
            path_str(&bed.ca_key_file)?,
        ];
        let pki = product.dir.join("pki");
        let mut args = vec!["pki", "init"];
        args.extend(ca);
        args.extend([
            "--out",
            path_str(&pki)?,
            "--manager-id",
            &product.manager_id,
        ]);
        args.extend(["-n", &product.ns.name, "--apply"]);
        product.cli(&args)?;
        let fleet = product.dir.join("fleet");
        let count = devices.to_string();
        let label = format!("fleet={}", product.ns.name);
        let mut args = vec!["device", "enroll"];
        args.extend(ca);
        args.extend(["--fleet", path_str(&fleet)?, "--count", &count]);
        args.extend([
            "--id-prefix",
            &id_prefix,
            "--manager-id",
            &product.manager_id,
        ]);
        args.extend(["--label", &label, "-n", &product.ns.name, "--apply"]);
        args.extend(enroll_args);
        product.cli(&args)?;
        Ok(product)
    }

    /// Runs `sealed-ota` (the CLI users run) with `args`; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_output(args)?;
        if !out.status.success() {
            bail!(
                "sealed-ota {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sealed-ota` with `args` against the test bed (its kubeconfig), whatever it exits with.
    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(binary("sealed-ota"))
            .args(args)
            .env("KUBECONFIG", &self.bed.kubeconfig)
            .output()?)
    }

    /// Where the emulator logs the secrets its devices handle (`run --key-log`, tests only).
    pub fn key_log(&self) -> PathBuf {
        self.dir.join("keys.log")
    }

    /// Every content key, session key and delivered private key the devices handled so far, as
    /// the emulator logged them: (label, secret).
    pub fn logged_secrets(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(sealed_ota_device_emulator::keylog::read(&self.key_log())?)
    }

    /// The label selector value every enrolled device carries (`fleet=<this>`).
    pub fn fleet_label(&self) -> &str {
        &self.ns.name
    }

    /// The fleet directory of device `id` (its `firmware.bin`, `cert.pem`, `key.pem`, ...).
    pub fn device_dir(&self, id: &str) -> PathBuf {
        self.dir.join("fleet/devices").join(id)
    }

    /// Starts the operator binary (leader election on, Leases in this namespace): replica 0.
    pub fn start_operator(&mut self) -> Result<()> {
        self.start_replica(0)
    }

    /// Metrics address of operator replica `i` (replica 0: `metrics_addr`).
    pub fn replica_metrics_addr(&mut self, i: usize) -> Result<String> {
        if i == 0 {
            return Ok(self.metrics_addr.clone());
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.replica_addrs.entry(i) {
            e.insert(format!("127.0.0.1:{}", free_port()?));
        }
        Ok(self.replica_addrs[&i].clone())
    }

    /// Starts operator replica `i` (identity `<namespace>-r<i>`, with `operator_args`), restarting
    /// it if it runs. On a clustered broker replica `i` starts at node `i` and moves on to the next
    /// node when its connection is lost.
    pub fn start_replica(&mut self, i: usize) -> Result<()> {
        self.stop_replica(i);
        self.operator_starts += 1;
        let log = std::fs::File::create(self.dir.join(if i == 0 {
            format!("operator-{}.log", self.operator_starts)
        } else {
            format!("operator-r{i}-{}.log", self.operator_starts)
        }))?;
        let metrics_addr = self.replica_metrics_addr(i)?;
        let nodes: Vec<&str> = self.device_broker_urls.split(',').collect();
        let broker = if nodes.len() > 1 {
            let first = i % nodes.len();
            nodes[first..]
                .iter()
                .chain(&nodes[..first])
                .copied()
                .collect::<Vec<_>>()
                .join(",")
        } else {
            self.broker_url.clone()
        };
        let pki = self.dir.join("pki");
        let child = Command::new(binary("sealed-ota-operator"))
            .args(["run", "--broker-url", &broker])
            .arg("--broker-ca-file")
            .arg(&self.bed.ca_file)
            .arg("--broker-cert-file")
            .arg(pki.join("manager.crt"))
            .arg("--broker-key-file")
            .arg(pki.join("manager.key"))
            .args(["--manager-id", &self.manager_id])
            .args(["--operator-namespace", &self.ns.name])
            .args(["--namespace", &self.ns.name])
            .args(["--metrics-addr", &metrics_addr])
            .args(["--identity", &format!("{}-r{i}", self.ns.name)])
            .arg("--cache-dir")
            .arg(self.dir.join(if i == 0 {
                "cache".to_owned()
            } else {
                format!("cache-r{i}")
            }))
            .args(&self.operator_args)
            .env("KUBECONFIG", &self.bed.kubeconfig)
            .env("RUST_LOG", log_filter("SEALED_OTA_OPERATOR_LOG"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sealed-ota-operator")?;
        self.operators.insert(i, child);
        Ok(())
    }

    /// Process id of the running operator (replica 0), if it runs.
    pub fn operator_pid(&self) -> Option<u32> {
        self.replica_pid(0)
    }

    /// Process id of operator replica `i`, if it runs.
    pub fn replica_pid(&self, i: usize) -> Option<u32> {
        self.operators.get(&i).map(Child::id)
    }

    /// Process id of the running emulator (the first part's), if one runs.
    pub fn emulator_pid(&self) -> Option<u32> {
        self.emulators.first().map(Child::id)
    }

    /// Process ids of every running emulator process.
    pub fn emulator_pids(&self) -> Vec<u32> {
        self.emulators.iter().map(Child::id).collect()
    }

    /// Kills the operator (replica 0) at once (SIGKILL), as a crash would.
    pub fn kill_operator(&mut self) {
        self.kill_replica(0);
    }

    /// Kills operator replica `i` at once (SIGKILL): it releases nothing, its Leases expire.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut child) = self.operators.remove(&i) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_replica(&mut self, i: usize) {
        if let Some(child) = self.operators.remove(&i) {
            terminate(child, "-TERM", Duration::from_secs(5));
        }
    }

    /// Starts the emulated fleet (every enrolled device) with extra `run` arguments, such as
    /// `--fault ...`. Its JSON summary goes to `emulator-N.json`.
    pub fn start_emulator(&mut self, extra: &[&str]) -> Result<()> {
        let fleet = self.dir.join("fleet");
        self.start_emulator_with_fleet(&fleet, extra)
    }

    /// Like `start_emulator`, running the devices of another fleet directory (for example a copy
    /// of this fleet's old credentials, as a thief would hold them).
    pub fn start_emulator_with_fleet(&mut self, fleet: &Path, extra: &[&str]) -> Result<()> {
        self.start_emulator_parts(fleet, 1, extra)
    }

    /// Starts the fleet as `parts` emulator processes, each running part K of N (`run --part
    /// K/N`): what a fleet larger than one process's open-file limit needs. Part 1's summary goes
    /// to `emulator-N.json`, part K's to `emulator-N.partK.json` (`emulator_summaries`).
    pub fn start_emulators(&mut self, parts: usize, extra: &[&str]) -> Result<()> {
        let fleet = self.dir.join("fleet");
        self.start_emulator_parts(&fleet, parts, extra)
    }

    /// The JSON summaries of the emulator run started last, one per part.
    pub fn emulator_summaries(&self) -> Vec<PathBuf> {
        (1..=self.emulator_parts)
            .map(|k| {
                self.dir
                    .join(format!("{}.json", self.emulator_part_name(k)))
            })
            .collect()
    }

    /// The metrics files of the emulator run started last (with `emulator_metrics`), one per part.
    pub fn emulator_metrics_files(&self) -> Vec<PathBuf> {
        (1..=self.emulator_parts)
            .map(|k| {
                self.dir
                    .join(format!("{}.prom", self.emulator_part_name(k)))
            })
            .collect()
    }

    fn emulator_part_name(&self, k: usize) -> String {
        let n = self.emulator_starts;
        if k == 1 {
            format!("emulator-{n}")
        } else {
            format!("emulator-{n}.part{k}")
        }
    }

    fn start_emulator_parts(&mut self, fleet: &Path, parts: usize, extra: &[&str]) -> Result<()> {
        self.stop_emulator();
        self.emulator_starts += 1;
        self.emulator_parts = parts;
        for k in 1..=parts {
            let name = self.emulator_part_name(k);
            let stdout = std::fs::File::create(self.dir.join(format!("{name}.json")))?;
            let stderr = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
            let part = format!("{k}/{parts}");
            let metrics_file = self.dir.join(format!("{name}.prom"));
            let child = Command::new(binary("sealed-ota-device-emulator"))
                .args(["run", "--broker", &self.device_broker_urls])
                .arg("--broker-ca")
                .arg(&self.bed.ca_file)
                .arg("--fleet")
                .arg(fleet)
                .args(["--no-progress", "--json", "--window-timeout"])
                .arg(self.window_timeout_seconds.to_string())
                .args(
                    self.log_keys
                        .then(|| ["--key-log".into(), self.key_log().into_os_string()])
                        .into_iter()
                        .flatten(),
                )
                .args(
                    (parts > 1)
                        .then_some(["--part", part.as_str()])
                        .into_iter()
                        .flatten(),
                )
                .args(
                    self.emulator_metrics
                        .then(|| ["--metrics-file".into(), metrics_file.into_os_string()])
                        .into_iter()
                        .flatten(),
                )
                .args(extra)
                .env("RUST_LOG", log_filter("SEALED_OTA_EMULATOR_LOG"))
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .context("starting sealed-ota-device-emulator")?;
            self.emulators.push(child);
        }
        Ok(())
    }

    /// The log of the emulator run started last (`emulator-N.log`).
    pub fn emulator_log(&self) -> PathBuf {
        self.dir
            .join(format!("emulator-{}.log", self.emulator_starts))
    }

    /// Stops the emulated fleet (SIGINT, as Ctrl-C: devices save their state and the JSON
    /// summary is written).
    pub fn stop_emulator(&mut self) {
        let children = std::mem::take(&mut self.emulators);
        // Every part at once: thousands of devices take a while to save their state and say
        // goodbye.
        for child in &children {
            send_signal(child, "-INT");
        }
        for child in children {
            wait_or_kill(child, Duration::from_secs(120));
        }
    }

    /// Runs the fleet until every device has connected once and returns the JSON summary.
    pub fn connect_fleet_once(&self) -> Result<serde_json::Value> {
        let out = Command::new(binary("sealed-ota-device-emulator"))
            .args(["run", "--broker", &self.device_broker_urls])
            .arg("--broker-ca")
            .arg(&self.bed.ca_file)
            .arg("--fleet")
            .arg(self.dir.join("fleet"))
            .args(["--no-progress", "--json", "--exit-when", "connected"])
            .args(["--duration", "60s"])
            .output()?;
        if !out.status.success() {
            bail!(
                "emulator run --exit-when connected failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("emulator JSON summary")
    }

    /// Stores `image` as key `image.bin` of ConfigMap `name`.
    pub async fn firmware_configmap(&self, name: &str, image: &[u8]) -> Result<()> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            binary_data: Some([("image.bin".to_string(), ByteString(image.to_vec()))].into()),
            ..ConfigMap::default()
        };
        Api::<ConfigMap>::namespaced(self.ns.client.clone(), &self.ns.name)
            .create(&PostParams::default(), &cm)
            .await?;
        Ok(())
    }

    /// The test bed's OCI registry (`e2e/testbed up` starts one).
    pub fn registry(&self) -> Result<&'static crate::Registry> {
        self.bed
            .registry
            .as_ref()
            .context("the test bed runs no OCI registry (e2e/testbed up starts one)")
    }

    /// Pushes `image` to the test bed's registry as `<namespace>/firmware:<tag>` and creates the
    /// pull Secret `regcred` for it; returns the repository and the manifest digest.
    pub async fn push_firmware(&self, image: &[u8], tag: &str) -> Result<(String, String)> {
        let reg = self.registry()?;
        let file = self.dir.join(format!("firmware-{tag}.bin"));
        std::fs::write(&file, image)?;
        let repository = format!("{}/firmware", self.ns.name);
        let digest = reg.push(&file, &repository, tag)?;
        reg.pull_secret(&self.ns.client, &self.ns.name, "regcred", &reg.password)
            .await?;
        Ok((repository, digest))
    }

    /// A firmware campaign spec over this fleet, from ConfigMap `configmap`, merged with `extra`
    /// (a JSON object whose keys replace the defaults, e.g. `{"rollout": {...}}`).
    pub fn firmware_spec(
        &self,
        version: &str,
        configmap: &str,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "selector": {"matchLabels": {"fleet": self.fleet_label()}},
            "targetVersion": version,
            "payload": {"firmware": {"configMapKeyRef": {"name": configmap, "key": "image.bin"}}},
            "managerSecretName": "sealed-ota-manager",
            "chunkSize": 4096,
            "rollout": {"maxInFlight": 50, "deviceTimeoutSeconds": 60, "retries": 2,
                        "retryBackoffSeconds": 1},
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                spec.insert(k.clone(), v.clone());
            }
        }
        spec
    }

    /// Applies a campaign with `kubectl apply -f -`, as a user would.
    pub fn apply_campaign(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let manifest = serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1",
            "kind": "UpdateCampaign",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": spec,
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string())
            .map(|_| ())
    }

    /// `kubectl patch updatecampaign NAME --type merge -p {"spec": SPEC}`, as a person would.
    pub fn patch_spec(&self, name: &str, spec: serde_json::Value) -> Result<String> {
        let patch = serde_json::json!({ "spec": spec }).to_string();
        self.kubectl(&[
            "patch",
            "updatecampaign",
            name,
            "--type",
            "merge",
            "-p",
            &patch,
        ])
    }

    /// Runs kubectl against the test bed; returns stdout, or an error carrying stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, "")
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .args(["-n", &self.ns.name])
            .args(args)
            .env("KUBECONFIG", &self.bed.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The campaign, as the apiserver has it.
    pub async fn campaign(&self, name: &str) -> Result<UpdateCampaign> {
        Ok(
            Api::<UpdateCampaign>::namespaced(self.ns.client.clone(), &self.ns.name)
                .get(name)
                .await?,
        )
    }

    /// Waits until `check` accepts the campaign; the error says what the campaign last looked
    /// like and where the logs are.
    pub async fn wait_campaign(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&UpdateCampaign) -> bool,
    ) -> Result<UpdateCampaign> {
        self.ns
            .wait_campaign(name, what, timeout, check)
            .await
            .with_context(|| format!("logs in {}", self.dir.display()))
    }

    /// Keep the namespace and the files when the product drops, on purpose (see
    /// [`TestNamespace::keep`]).
    pub fn keep(&self) {
        self.ns.keep();
    }

    /// The test passed: its namespace is deleted and its files removed when the product drops
    /// (otherwise both are kept for inspection).
    pub fn pass(&self) {
        self.ns.pass();
    }

    /// Devices whose status records campaign `campaign` (it started them), by name.
    pub async fn touched(&self, campaign: &str) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .devices()
            .await?
            .into_iter()
            .filter(|d| {
                d.status
                    .as_ref()
                    .and_then(|s| s.campaign.as_ref())
                    .is_some_and(|c| c.name == campaign)
            })
            .filter_map(|d| d.metadata.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Until Unix time `until` (less a second for clock rounding), check every half second that
    /// no Device records campaign `campaign`: nothing started it before then.
    pub async fn untouched_until(&self, campaign: &str, until: u64) -> Result<()> {
        while unix_now() + 1 < until {
            let touched = self.touched(campaign).await?;
            anyhow::ensure!(touched.is_empty(), "{touched:?} started before {until}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// Every Device of this product.
    pub async fn devices(&self) -> Result<Vec<Device>> {
        Ok(
            Api::<Device>::namespaced(self.ns.client.clone(), &self.ns.name)
                .list(&ListParams::default())
                .await?
                .items,
        )
    }

    /// Waits until the campaign is terminal and returns its status.
    pub async fn finished(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<sealed_ota_operator::crd::UpdateCampaignStatus> {
        let c = self
            .wait_campaign(name, &format!("campaign {name} finished"), timeout, |c| {
                c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
            })
            .await?;
        c.status.context("campaign status")
    }

    /// The operator's /metrics, as (series with labels, value).
    pub async fn metrics(&self) -> Result<Vec<(String, f64)>> {
        let text = crate::http::get(&format!("http://{}/metrics", self.metrics_addr)).await?;
        Ok(crate::http::samples(&text))
    }

    /// The devices recorded as done (Device status Succeeded), each with its installed image's
    /// modification time, so a test can prove later that none of them installed again.
    pub async fn done_devices(&self) -> Result<std::collections::BTreeMap<String, SystemTime>> {
        let mut done = std::collections::BTreeMap::new();
        for device in self.devices().await? {
            let succeeded = device
                .status
                .as_ref()
                .and_then(|s| s.campaign.as_ref())
                .is_some_and(|c| c.phase == DevicePhase::Succeeded);
            if succeeded {
                let id = device.metadata.name.clone().context("name")?;
                let installed = std::fs::metadata(self.device_dir(&id).join("firmware.bin"))?;
                done.insert(id, installed.modified()?);
            }
        }
        Ok(done)
    }

    /// The namespace's Events (reason, message) once `check` holds for them: the operator
    /// records an Event after the status write a test waited for, so a single read can miss it.
    pub async fn wait_events(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[(String, String)]) -> bool,
    ) -> Result<Vec<(String, String)>> {
        crate::wait_for(what, timeout, || async {
            let events = self.events().await?;
            Ok(check(&events).then_some(events))
        })
        .await
    }

    /// Reasons of the Events recorded in this namespace, with their messages.
    pub async fn events(&self) -> Result<Vec<(String, String)>> {
        Ok(
            Api::<KubeEvent>::namespaced(self.ns.client.clone(), &self.ns.name)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
                .collect(),
        )
    }
}

impl Drop for Product {
    fn drop(&mut self) {
        self.stop_emulator();
        let replicas: Vec<usize> = self.operators.keys().copied().collect();
        for i in replicas {
            self.stop_replica(i);
        }
        if self.ns.passed() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("e2e: product files kept in {}", self.dir.display());
        }
    }
}

/// `signal` (e.g. "-TERM"), then SIGKILL when the process is still there after `grace`.
fn terminate(child: Child, signal: &str, grace: Duration) {
    send_signal(&child, signal);
    wait_or_kill(child, grace);
}

fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

/// Waits up to `grace` for `child` to exit, then kills it.
fn wait_or_kill(mut child: Child, grace: Duration) {
    for _ in 0..grace.as_millis() / 100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// A free loopback port (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The cargo profile this process was built with, and so the one its binaries are built in:
/// tests run debug binaries, the release-built benchmark runs release binaries.
fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Path of a workspace binary (built by `build_binaries`).
pub fn binary(name: &str) -> PathBuf {
    target_dir().join(profile()).join(name)
}

/// Runs the project's CLI (`sealed-ota`, built) with `args`: its standard output, or an error
/// with its standard error.
pub fn sealed_ota_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(binary("sealed-ota")).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "sealed-ota {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes from `cmd`'s environment what `cargo test` gives this process for its own package
/// (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...), for a command that runs `cargo build` in the workspace
/// (directly, or through a script such as `scripts/images.sh`): build scripts that watch them
/// (ring's) would rerun, and every crate above them would rebuild (about 40 s on 2 cores) each
/// time such a build and a plain `cargo build` alternate.
pub fn without_package_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let per_package = name.to_str().is_some_and(|n| {
            n.starts_with("CARGO_PKG_")
                || matches!(
                    n,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
        });
        if per_package {
            cmd.env_remove(name);
        }
    }
    cmd
}

static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Builds the operator and emulator binaries once per process, in this process's profile (a
/// no-op when fresh).
pub fn build_binaries() -> Result<()> {
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .current_dir(repo_root())
                .args(["build", "--locked", "--workspace", "--bins"]);
            if profile() == "release" {
                build.arg("--release");
            }
            without_package_env(&mut build);
            let status = build
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("cargo build of the binaries failed: {status}"))
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Unix seconds now (a campaign's windows and deadlines are set from it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `HH:MM:SS` (UTC) of a Unix time: a window's local start in UTC.
pub fn utc_clock(t: u64) -> String {
    let s = t % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `len` random bytes: a firmware image that no other run shares.
pub fn random_image(len: usize) -> Vec<u8> {
    let mut image = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut image);
    image
}

/// (status, reason, message) of the campaign's condition `kind` (for example `Ready`).
pub fn condition(
    c: &sealed_ota_operator::crd::UpdateCampaign,
    kind: &str,
) -> Option<(String, String, String)> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .find(|x| x.type_ == kind)
        .map(|x| (x.status.clone(), x.reason.clone(), x.message.clone()))
}

/// SHA-256 (lowercase hex) of the DER of the first certificate in `pem`.
pub fn certificate_fingerprint(pem: &str) -> Result<String> {
    use base64::Engine;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("certificate PEM is not base64")?;
    Ok(Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The log filter (`RUST_LOG` syntax) for the product's processes: `info`, or the filter in the
/// environment variable `var` (`SEALED_OTA_OPERATOR_LOG`, `SEALED_OTA_EMULATOR_LOG`), e.g.
/// `info,sealed_ota_device=debug` to see why devices reject messages.
fn log_filter(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| "info".to_owned())
}
