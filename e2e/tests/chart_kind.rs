//! The pieces of the kind path (`e2e/kind/`) that need no cluster, on the test bed: the scripts
//! parse (and pass shellcheck); the kind manifests, the chart with `values-kind.yaml` and the example
//! campaign are accepted by a real kube-apiserver (server-side dry run); the in-cluster Mosquitto
//! configuration runs in a real Mosquitto whose ACL lets the manager and a device talk and keeps
//! devices apart; the Dockerfiles default to the registry bases. The images themselves are built
//! and checked in images.rs; the cluster is checked by `make kind` (kind_cluster.rs).
mod chart_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chart_support::{apply_crds, chart_dir, documents, helm, kubectl, of_kind};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use sealed_ota_e2e::{repo_root, wait_for, TestBed};
use sealed_ota_protocol::TopicTree;

fn kind_dir() -> PathBuf {
    repo_root().join("e2e/kind")
}

/// The scripts parse (`bash -n`), and pass shellcheck at warning level where it is installed
/// (Debian package `shellcheck`).
#[test]
fn scripts_parse() -> Result<()> {
    let scripts = [
        "e2e/kind/kind.sh",
        "e2e/kind/node-image.sh",
        "e2e/kind/shim/docker",
        "scripts/docker.sh",
        "scripts/images.sh",
        "scripts/lib.sh",
        "scripts/helm-install.sh",
    ];
    for script in scripts {
        let out = Command::new("bash")
            .arg("-n")
            .arg(repo_root().join(script))
            .output()?;
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Ok(out) = Command::new("shellcheck")
        .args(["-S", "warning"])
        .args(scripts)
        .current_dir(repo_root())
        .output()
    {
        assert!(
            out.status.success(),
            "shellcheck: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        eprintln!("shellcheck not installed: only `bash -n` checked");
    }
    Ok(())
}

/// The kind manifests, with their namespaces mapped to test namespaces, pass a server-side dry run.
#[tokio::test]
async fn kind_manifests_and_values_are_accepted_by_the_apiserver() -> Result<()> {
    let bed = TestBed::get()?;
    apply_crds(&bed.kubeconfig)?;
    let mqtt = bed.namespace("kind-mqtt").await?;
    let fleet = bed.namespace("kind-fleet").await?;
    let system = bed.namespace("kind-system").await?;
    for (file, objects) in [("mosquitto.yaml", 4), ("devices.yaml", 4)] {
        let text = std::fs::read_to_string(kind_dir().join("manifests").join(file))?
            .replace("namespace: mqtt", &format!("namespace: {}", mqtt.name))
            .replace("namespace: fleet", &format!("namespace: {}", fleet.name))
            // Fixed NodePorts are cluster-wide: where the suite runs against the kind cluster
            // (e2e/kind/kind.sh test), its own Mosquitto holds them.
            .replace(", nodePort: 30884", "")
            .replace(", nodePort: 30883", "");
        let out = kubectl(
            &bed.kubeconfig,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&text),
        )
        .with_context(|| file.to_string())?;
        assert_eq!(
            out.matches("(server dry run)").count(),
            objects,
            "{file}: {out}"
        );
    }

    // The chart as kind.sh installs it.
    let chart = chart_dir();
    let values = kind_dir().join("values-kind.yaml");
    let watch = format!("watchNamespaces={{{}}}", fleet.name);
    let args = [
        "template",
        "sealed-ota",
        chart.to_str().context("chart")?,
        "--namespace",
        &system.name,
        "--values",
        values.to_str().context("values")?,
        "--set",
        &watch,
    ];
    let text = helm(&args, None)?;
    let docs = documents(&text)?;
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(
        deployment["metadata"]["name"], "sealed-ota",
        "kind.sh waits for deployment/sealed-ota"
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "sealed-ota/sealed-ota-operator:dev");
    assert_eq!(container["imagePullPolicy"], "Never");
    let out = kubectl(
        &bed.kubeconfig,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&text),
    )?;
    assert_eq!(out.matches("(server dry run)").count(), docs.len(), "{out}");

    // The campaign kind.sh applies.
    let campaign = std::fs::read_to_string(repo_root().join("examples/firmware-campaign.yaml"))?;
    let out = kubectl(
        &bed.kubeconfig,
        &["apply", "--dry-run=server", "-n", &fleet.name, "-f", "-"],
        Some(&campaign),
    )?;
    assert!(
        out.contains("updatecampaign.ota.sealed-ota.dev/firmware-1-1-0 created (server dry run)"),
        "{out}"
    );
    Ok(())
}

/// A Dockerfile's logical instructions (continuations joined, comments dropped), split into the
/// global part before the first FROM and its stages: (FROM line, instructions).
fn stages(text: &str) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    let mut global = Vec::new();
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(t);
        let instr = std::mem::take(&mut logical);
        if let Some(from) = instr.strip_prefix("FROM ") {
            out.push((from.to_string(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(instr);
        } else {
            global.push(instr);
        }
    }
    (global, out)
}

/// Binary targets of the workspace packages: (package, binary).
fn workspace_bins() -> Result<Vec<(String, String)>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--locked",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()?;
    if !out.status.success() {
        bail!(
            "cargo metadata --locked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut bins = Vec::new();
    for p in meta["packages"].as_array().context("packages")? {
        for t in p["targets"].as_array().context("targets")? {
            if t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            {
                bins.push((
                    p["name"].as_str().unwrap_or_default().to_string(),
                    t["name"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    Ok(bins)
}

/// What a user with a registry gets from the Dockerfiles by default (the builds in images.rs
/// replace both base images with local stand-ins, so they cannot see the defaults): the official
/// Rust image compiles a workspace binary with `--locked`, and the final stage is distroless.
#[test]
fn dockerfiles_default_to_the_registry_bases() -> Result<()> {
    let bins = workspace_bins()?;
    for (file, package, bin) in [
        (
            "docker/operator.Dockerfile",
            "sealed-ota-operator",
            "sealed-ota-operator",
        ),
        (
            "docker/device-emulator.Dockerfile",
            "sealed-ota-device-emulator",
            "sealed-ota-device-emulator",
        ),
    ] {
        assert!(
            bins.contains(&(package.to_string(), bin.to_string())),
            "{package}/{bin} not in {bins:?}"
        );
        let text = std::fs::read_to_string(repo_root().join(file))?;
        let (global, stages) = stages(&text);
        let default = |arg: &str| {
            global
                .iter()
                .find_map(|i| i.strip_prefix(&format!("ARG {arg}=")))
                .map(str::to_string)
                .with_context(|| format!("{file}: no ARG {arg}=... before the first FROM"))
        };
        assert!(
            default("BUILDER_IMAGE")?.starts_with("docker.io/library/rust:"),
            "{file}"
        );
        assert!(
            default("RUNTIME_IMAGE")?.starts_with("gcr.io/distroless/cc-debian12:nonroot"),
            "{file}"
        );
        assert_eq!(default("BINARY")?, "compiled", "{file}");
        assert_eq!(default("CARGO_PROFILE")?, "release", "{file}");
        let compiled = stages
            .iter()
            .find(|(from, _)| from == "${BUILDER_IMAGE} AS compiled")
            .with_context(|| format!("{file}: no compiled stage"))?;
        assert!(
            compiled.1.join("\n").contains(&format!(
                "cargo build --profile \"$CARGO_PROFILE\" --locked -p {package} --bin {bin}"
            )),
            "{file}: {compiled:?}"
        );
        let (last, _) = stages.last().context("final stage")?;
        assert_eq!(last, "${RUNTIME_IMAGE}", "{file}");
        // The build context filter keeps target/ (gigabytes) and .git out.
        let ignore = std::fs::read_to_string(repo_root().join(format!("{file}.dockerignore")))?;
        assert!(ignore.lines().any(|l| l == "target/") && ignore.lines().any(|l| l == ".git/"));
    }
    Ok(())
}

/// The Mosquitto configuration in the kind ConfigMap.
fn kind_mosquitto_config() -> Result<(String, String)> {
    let text = std::fs::read_to_string(kind_dir().join("manifests/mosquitto.yaml"))?;
    let docs = documents(&text)?;
    let cm = of_kind(&docs, "ConfigMap")[0];
    Ok((
        cm["data"]["mosquitto.conf"]
            .as_str()
            .context("conf")?
            .to_string(),
        cm["data"]["acl"].as_str().context("acl")?.to_string(),
    ))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

struct Broker(Child);
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client certificate with common name `cn`, signed by the test bed CA.
fn issue(bed: &TestBed, dir: &Path, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{cn}.key"));
    let csr = dir.join(format!("{cn}.csr"));
    let crt = dir.join(format!("{cn}.crt"));
    let ext = dir.join(format!("{cn}.ext"));
    std::fs::write(&ext, "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")?;
    let steps: Vec<Vec<String>> = vec![
        vec![
            "genpkey".into(),
            "-algorithm".into(),
            "EC".into(),
            "-pkeyopt".into(),
            "ec_paramgen_curve:P-256".into(),
            "-out".into(),
            key.display().to_string(),
        ],
        vec![
            "req".into(),
            "-new".into(),
            "-key".into(),
            key.display().to_string(),
            "-subj".into(),
            format!("/CN={cn}"),
            "-out".into(),
            csr.display().to_string(),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            csr.display().to_string(),
            "-CA".into(),
            bed.ca_file.display().to_string(),
            "-CAkey".into(),
            bed.ca_key_file.display().to_string(),
            "-CAcreateserial".into(),
            "-days".into(),
            "1".into(),
            "-extfile".into(),
            ext.display().to_string(),
            "-out".into(),
            crt.display().to_string(),
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((crt, key))
}

struct Client {
    client: AsyncClient,
    events: EventLoop,
}

async fn connect(bed: &TestBed, port: u16, id: &str, cert: &Path, key: &Path) -> Result<Client> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: std::fs::read(&bed.ca_file)?,
            alpn: None,
            client_auth: Some((std::fs::read(cert)?, std::fs::read(key)?)),
        },
    ));
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    chart_support::await_connack(&mut events, id, Duration::from_secs(20), false).await?;
    Ok(Client { client, events })
}

/// Subscribes and waits for the SUBACK, returning its reason codes as text.
async fn subscribe(c: &mut Client, filter: &str) -> Result<()> {
    c.client.subscribe(filter, QoS::AtLeastOnce).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.events.poll()).await?? {
            Event::Incoming(Packet::SubAck(_)) => return Ok(()),
            _ => continue,
        }
    }
}

/// Payloads received on `c` within `window`, while also driving `others` (so their publishes go out).
async fn received(
    c: &mut Client,
    others: &mut [&mut Client],
    window: Duration,
) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return got;
        }
        let step = (deadline - now).min(Duration::from_millis(100));
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(step, c.events.poll()).await
        {
            got.push((
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.payload.to_vec(),
            ));
        }
        for o in others.iter_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(10), o.events.poll()).await;
        }
    }
}

/// The ACL of the kind broker: the manager reaches each device and reads its ready topic; a device
/// cannot read another device's topics nor write into them.
#[tokio::test]
async fn kind_mosquitto_config_runs_and_its_acl_isolates_devices() -> Result<()> {
    let Some(mosquitto) = mosquitto_bin() else {
        bail!("mosquitto is not installed (`e2e/testbed up` installs it)");
    };
    let bed = TestBed::get()?;
    let dir = repo_root()
        .join("target/chart-tests")
        .join(format!("kind-mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (conf, acl) = kind_mosquitto_config()?;
    let (tls_acl, tls_open, plain) = (free_port()?, free_port()?, free_port()?);
    let pki = bed.state_dir.join("pki");
    let conf = conf
        .replace("listener 8883", &format!("listener {tls_acl} 127.0.0.1"))
        .replace("listener 8884", &format!("listener {tls_open} 127.0.0.1"))
        .replace("listener 1883", &format!("listener {plain} 127.0.0.1"))
        .replace(
            "/etc/mosquitto/certs/ca.crt",
            &bed.ca_file.display().to_string(),
        )
        .replace(
            "/etc/mosquitto/certs/server.crt",
            &pki.join("mosquitto.crt").display().to_string(),
        )
        .replace(
            "/etc/mosquitto/certs/server.key",
            &pki.join("mosquitto.key").display().to_string(),
        )
        .replace(
            "/mosquitto/config/acl",
            &dir.join("acl").display().to_string(),
        );
    // Started as root (CI containers), Mosquitto would drop to the `mosquitto` user, which cannot
    // read the test bed's key: stay the user the test runs as.
    let whoami = Command::new("id").arg("-un").output()?;
    let conf = format!(
        "user {}\n{conf}",
        String::from_utf8_lossy(&whoami.stdout).trim()
    );
    std::fs::write(dir.join("acl"), acl)?;
    std::fs::write(dir.join("mosquitto.conf"), &conf)?;
    let _broker = Broker(
        Command::new(&mosquitto)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(std::fs::File::create(dir.join("mosquitto.log"))?)
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_for("kind mosquitto listening", Duration::from_secs(10), || {
        let ok = std::net::TcpStream::connect(("127.0.0.1", tls_acl)).is_ok();
        async move { Ok(ok.then_some(())) }
    })
    .await
    .with_context(|| std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default())?;

    let (mc, mk) = issue(bed, &dir, "manager")?;
    let (ac, ak) = issue(bed, &dir, "dev-00000")?;
    let (bc, bk) = issue(bed, &dir, "dev-00001")?;
    let mut manager = connect(bed, tls_acl, "manager", &mc, &mk).await?;
    let mut dev_a = connect(bed, tls_acl, "dev-00000", &ac, &ak).await?;
    let mut dev_b = connect(bed, tls_acl, "dev-00001", &bc, &bk).await?;
    let topics = TopicTree::new("iot", "manager")?;
    subscribe(&mut manager, &topics.ready_filter()).await?;
    subscribe(&mut dev_a, "iot/manager/dev-00000/notify").await?;
    subscribe(&mut dev_b, "iot/manager/dev-00000/notify").await?; // not its own: the ACL hides it

    manager
        .client
        .publish(
            "iot/manager/dev-00000/notify",
            QoS::AtLeastOnce,
            false,
            b"for-a".to_vec(),
        )
        .await?;
    let got_a = received(&mut dev_a, &mut [&mut manager], Duration::from_secs(2)).await;
    assert_eq!(
        got_a,
        vec![(
            "iot/manager/dev-00000/notify".to_string(),
            b"for-a".to_vec()
        )]
    );
    let got_b = received(&mut dev_b, &mut [&mut manager], Duration::from_secs(1)).await;
    assert!(
        got_b.is_empty(),
        "dev-00001 read dev-00000's notify: {got_b:?}"
    );

    dev_a
        .client
        .publish(
            topics.ready("dev-00000"),
            QoS::AtLeastOnce,
            false,
            b"a-ready".to_vec(),
        )
        .await?;
    dev_b
        .client
        .publish(
            topics.ready("dev-00000"),
            QoS::AtLeastOnce,
            false,
            b"b-spoof".to_vec(),
        )
        .await?;
    let got_m = received(
        &mut manager,
        &mut [&mut dev_a, &mut dev_b],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        got_m,
        vec![(topics.ready("dev-00000"), b"a-ready".to_vec())],
        "the manager saw a spoofed ready"
    );
    Ok(())
}

/// `--flag` names of a subcommand, from the real binary's `--help`.
fn help_flags(bin: &Path, sub: &str) -> Result<Vec<String>> {
    let out = Command::new(bin).args([sub, "--help"]).output()?;
    assert!(out.status.success(), "{} {sub} --help", bin.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.', ']'])
                .split(['=', '<', '['])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect())
}

/// Every flag the kind path passes to the emulator exists (a renamed flag fails here, not in kind).
#[test]
fn kind_path_uses_real_emulator_flags() -> Result<()> {
    let bin = chart_support::binary("sealed-ota-device-emulator")?;
    let text = std::fs::read_to_string(kind_dir().join("manifests/devices.yaml"))?;
    let docs = documents(&text)?;
    let pod = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    let mut checked = 0;
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_sequence().context("containers")? {
            let args: Vec<&str> = c["args"]
                .as_sequence()
                .context("args")?
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            let known = help_flags(&bin, args[0])?;
            for flag in &args[1..] {
                let name = flag.split('=').next().unwrap_or_default();
                assert!(
                    known.iter().any(|k| k == name),
                    "{} {name}: not a flag ({known:?})",
                    args[0]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");
    // kind.sh's pki-init line.
    let script = std::fs::read_to_string(kind_dir().join("kind.sh"))?;
    let line = script
        .lines()
        .find(|l| l.contains("pki-init --ca-cert"))
        .context("pki-init in kind.sh")?;
    let next = script
        .lines()
        .skip_while(|l| !l.contains("pki-init --ca-cert"))
        .nth(1)
        .unwrap_or_default();
    let known = help_flags(&bin, "pki-init")?;
    for flag in line
        .split_whitespace()
        .chain(next.split_whitespace())
        .filter(|w| w.starts_with("--"))
    {
        assert!(
            known.iter().any(|k| k == flag),
            "pki-init {flag}: not a flag ({known:?})"
        );
    }
    Ok(())
}
