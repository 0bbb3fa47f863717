//! Helpers shared by the `chart_*` and image tests: the pinned `helm` binary (installed by
//! `scripts/helm-install.sh`, outside the clone), rendering the chart, parsing the result, and
//! waiting for a broker's CONNACK.
#![allow(dead_code)] // Each test file uses a different subset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use sealed_ota_e2e::repo_root;
use serde_yaml::Value;

/// The chart under test.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/sealed-ota")
}

/// Path of the pinned helm binary, installed on first use.
pub fn helm_path() -> Result<PathBuf> {
    static HELM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/helm-install.sh"))
            .output()
            .map_err(|e| format!("running scripts/helm-install.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/helm-install.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(PathBuf::from(path))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Runs helm with `args`, returning its output whether it succeeded or not.
pub fn helm_output(args: &[&str], kubeconfig: Option<&Path>) -> Result<Output> {
    let mut cmd = Command::new(helm_path()?);
    cmd.args(args);
    // Keep helm's own state (repositories, cache) out of the user's home and the clone.
    let state = repo_root().join("target/helm-state");
    cmd.env("HELM_CACHE_HOME", state.join("cache"))
        .env("HELM_CONFIG_HOME", state.join("config"))
        .env("HELM_DATA_HOME", state.join("data"));
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd.env("KUBECONFIG", "/dev/null"),
    };
    cmd.output()
        .with_context(|| format!("running helm {}", args.join(" ")))
}

/// Runs helm and returns stdout; fails with stderr when helm fails.
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> Result<String> {
    let out = helm_output(args, kubeconfig)?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template` of the chart in `namespace` with `--set` values.
pub fn render(namespace: &str, sets: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "sealed-ota",
        chart.to_str().context("chart path")?,
        "--namespace",
        namespace,
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    helm(&args, None)
}

/// Parses a multi-document YAML stream (documents separated by `---` lines), dropping empty ones.
pub fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in yaml.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let blank = current
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
            if blank {
                current.clear();
                continue;
            }
            let v: Value = serde_yaml::from_str(&current).context("parsing YAML")?;
            if !v.is_null() {
                docs.push(v);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

/// The objects of one kind.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Minimal values that render: a TLS broker with its Secret.
pub const BASE: &[&str] = &[
    "broker.url=mqtts://mosquitto.example:8883",
    "broker.tls.secretName=broker-tls",
];

/// `BASE` plus more values.
pub fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    BASE.iter().copied().chain(extra.iter().copied()).collect()
}

/// The Argo CD health check for UpdateCampaign.
pub fn argocd_health_script() -> Result<String> {
    let path = repo_root().join("deploy/argocd/updatecampaign-health.lua");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn to_lua(lua: &mlua::Lua, v: &serde_json::Value) -> mlua::Result<mlua::Value> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => mlua::Value::Nil,
        J::Bool(b) => mlua::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => mlua::Value::Number(i as f64),
            None => mlua::Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => mlua::Value::String(lua.create_string(s)?),
        J::Array(items) => {
            let t = lua.create_table()?;
            for (i, x) in items.iter().enumerate() {
                t.set(i + 1, to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
        J::Object(map) => {
            let t = lua.create_table()?;
            for (k, x) in map {
                t.set(k.as_str(), to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
    })
}

/// Runs the health check the way Argo CD does (Lua 5.1, the live object in the global `obj`) and
/// returns (status, message).
pub fn argocd_health(script: &str, obj: &serde_json::Value) -> Result<(String, String)> {
    let lua = mlua::Lua::new();
    lua.globals()
        .set(
            "obj",
            to_lua(&lua, obj).map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hs: mlua::Table = lua
        .load(script)
        .set_name("updatecampaign-health.lua")
        .eval()
        .map_err(|e| anyhow::anyhow!("health check failed: {e}"))?;
    let status: String = hs
        .get("status")
        .map_err(|e| anyhow::anyhow!("status: {e}"))?;
    let message: String = hs
        .get("message")
        .map_err(|e| anyhow::anyhow!("message: {e}"))?;
    Ok((status, message))
}

/// Runs kubectl against `kubeconfig`, feeding `stdin`; returns stdout or fails with stderr.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (is it installed?)")?;
    let mut input = child.stdin.take().context("kubectl stdin")?;
    input.write_all(stdin.unwrap_or_default().as_bytes())?;
    drop(input);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes sure the CRDs exist (applying crds/ server-side, with the field manager the other test-bed
/// tests use, only when one is missing) and waits until they are established. A CRD that exists is
/// left alone: another engineer's test may have applied a newer schema from the Rust types. The
/// chart's own CRD rendering is checked by `chart_render` with a dry run instead.
pub fn apply_crds(kubeconfig: &Path) -> Result<()> {
    let names = [
        "crd/devices.ota.sealed-ota.dev",
        "crd/updatecampaigns.ota.sealed-ota.dev",
        "crd/campaignshards.ota.sealed-ota.dev",
    ];
    let missing = names
        .iter()
        .any(|name| kubectl(kubeconfig, &["get", name, "-o", "name"], None).is_err());
    if missing {
        let crds = repo_root().join("crds");
        let crds = crds.to_str().context("crds path")?;
        kubectl(
            kubeconfig,
            &[
                "apply",
                "--server-side",
                "--field-manager=sealed-ota-tests",
                "-f",
                crds,
            ],
            None,
        )?;
    }
    let mut wait = vec!["wait", "--for=condition=established", "--timeout=60s"];
    wait.extend(names);
    kubectl(kubeconfig, &wait, None)?;
    Ok(())
}

/// A workspace binary, built beforehand (`make chart-test` builds them; see charts/README.md).
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!(
        "SEALED_OTA_{}_BIN",
        name.trim_start_matches("sealed-ota-")
            .replace('-', "_")
            .to_uppercase()
    );
    if let Ok(p) = std::env::var(&var) {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} is not built under {}: run `cargo build -p sealed-ota-operator -p sealed-ota-device-emulator --bins` \
         with the same CARGO_TARGET_DIR first, or point {var} at it",
        target.display()
    )
}

/// Flux's view (kstatus, `sigs.k8s.io/cli-utils/pkg/kstatus`) of `objects`: (name, status, message)
/// per object, computed by the Go helper in deploy/flux/kstatus-check (built with the Go toolchain
/// the test bed needs anyway).
pub fn kstatus(objects: &[serde_json::Value]) -> Result<Vec<(String, String, String)>> {
    use std::io::Write;
    use std::process::Stdio;
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let bin = BUILT
        .get_or_init(|| {
            let out_dir = repo_root().join("target/chart-tests");
            std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
            let bin = out_dir.join("kstatus-check");
            let out = Command::new("go")
                .args(["build", "-o"])
                .arg(&bin)
                .arg(".")
                .current_dir(repo_root().join("deploy/flux/kstatus-check"))
                .output()
                .map_err(|e| format!("running go build (is Go installed?): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "go build kstatus-check: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(bin)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(&serde_json::to_vec(objects)?)?;
    drop(input);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("kstatus-check: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Ok((s("name"), s("status"), s("message")))
        })
        .collect()
}

/// Polls a new MQTT connection until the broker's CONNACK, for at most `timeout`. A connection error
/// fails at once, unless `retry_errors` (a broker that is still starting refuses connections).
pub async fn await_connack(
    events: &mut rumqttc::v5::EventLoop,
    id: &str,
    timeout: std::time::Duration,
    retry_errors: bool,
) -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    use std::time::Duration;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::time::Instant::now() >= deadline {
            bail!("{id}: no CONNACK within {timeout:?}");
        }
        match tokio::time::timeout(Duration::from_secs(2), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) if !retry_errors => bail!("{id}: {e}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
