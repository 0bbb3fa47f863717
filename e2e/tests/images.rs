//! The container images, built for real with Docker (`make e2e` starts a daemon through
//! `scripts/docker.sh`), both ways the project offers: the offline path (`scripts/images.sh build`:
//! binaries built here, the Dockerfiles' final stage on a runtime base made from Debian's
//! packages) and the registry path (`scripts/images.sh dockerfile`: the Dockerfiles unchanged,
//! compile stage with `--locked` included, against local stand-ins for their two base images).
//! Every image passes the same checks: a numeric non-root user, no shell or package manager in its
//! filesystem, a root-owned entrypoint binary the user cannot change, and it runs read-only with
//! every capability dropped. The Mosquitto image also serves a real MQTT client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

mod chart_support;

use anyhow::{ensure, Context, Result};
use rumqttc::v5::{AsyncClient, MqttOptions};
use sealed_ota_e2e::product::without_package_env;
use sealed_ota_e2e::repo_root;

/// The docker client `scripts/docker.sh` picks for the running daemon.
fn docker_cli() -> Result<PathBuf> {
    static CLI: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    CLI.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/docker.sh"))
            .arg("cli")
            .output()
            .map_err(|e| e.to_string())?;
        let cli = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let answers = Command::new(&cli)
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if out.status.success() && answers {
            Ok(cli)
        } else {
            Err("no Docker daemon answers: `make e2e` starts one (scripts/docker.sh up DIR)".into())
        }
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(out)
}

fn docker(args: &[&str]) -> Result<String> {
    let out = run(Command::new(docker_cli()?).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `scripts/images.sh` with `args`.
fn images_sh(args: &[&str]) -> Result<()> {
    docker_cli()?;
    // Its `build` mode runs `cargo build`: with this test's package environment, ring's build
    // script would rerun and the workspace's binaries rebuild, here and again in the next test.
    run(without_package_env(&mut Command::new(repo_root().join("scripts/images.sh"))).args(args))?;
    Ok(())
}

/// One entry of an image's filesystem.
#[derive(Debug)]
struct Entry {
    mode: String,
    uid: u32,
}

/// The image's filesystem as `docker export` gives it: path -> (mode, owner).
fn filesystem(image: &str) -> Result<BTreeMap<String, Entry>> {
    let dir = repo_root().join("target/image-tests");
    std::fs::create_dir_all(&dir)?;
    let tarball = dir.join(format!("{}.tar", image.replace(['/', ':'], "_")));
    let id = docker(&["create", image])?.trim().to_string();
    let exported = docker(&["export", "-o", &tarball.display().to_string(), &id]);
    docker(&["rm", &id])?;
    exported?;
    let listing = run(Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&tarball));
    std::fs::remove_file(&tarball)?;
    let listing = String::from_utf8_lossy(&listing?.stdout).into_owned();
    let mut entries = BTreeMap::new();
    for line in listing.lines() {
        // -rwxr-xr-x 0/0   1234 2026-01-01 00:00 usr/local/bin/x [-> target]
        let parts: Vec<&str> = line.split_whitespace().collect();
        ensure!(parts.len() >= 6, "unexpected tar line {line:?}");
        let uid = parts[1]
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("owner in {line:?}"))?;
        let path = parts[5]
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_string();
        entries.insert(
            path,
            Entry {
                mode: parts[0].to_string(),
                uid,
            },
        );
    }
    Ok(entries)
}

/// A shell or a package manager an attacker in the container could use.
const FORBIDDEN: &[&str] = &[
    "bin/sh",
    "bin/bash",
    "bin/dash",
    "bin/ash",
    "bin/busybox",
    "usr/bin/sh",
    "usr/bin/bash",
    "usr/bin/dash",
    "usr/bin/busybox",
    "usr/bin/dpkg",
    "usr/bin/apt",
    "usr/bin/apt-get",
];

/// The checks every image of the project passes, whichever way it was built.
fn check_hardened(image: &str, entrypoint: &str, expect_uid: u32) -> Result<()> {
    let user = docker(&["image", "inspect", "--format", "{{.Config.User}}", image])?;
    let user = user.trim();
    let (uid, gid) = user
        .split_once(':')
        .with_context(|| format!("{image}: USER {user:?} is not uid:gid"))?;
    let uid: u32 = uid.parse().with_context(|| {
        format!("{image}: USER {user:?} is not numeric (runAsNonRoot needs a number)")
    })?;
    let _: u32 = gid
        .parse()
        .with_context(|| format!("{image}: group of {user:?} not numeric"))?;
    ensure!(uid != 0, "{image}: runs as root");
    assert_eq!(uid, expect_uid, "{image}: user");
    let entry = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        image,
    ])?;
    assert_eq!(entry.trim(), format!("[\"/{entrypoint}\"]"), "{image}");

    let files = filesystem(image)?;
    for bad in FORBIDDEN {
        ensure!(!files.contains_key(*bad), "{image} contains /{bad}");
    }
    let binary = files
        .get(entrypoint)
        .with_context(|| format!("{image}: no /{entrypoint}"))?;
    ensure!(
        binary.uid == 0 && binary.mode.starts_with("-rwxr-xr-x"),
        "{image}: /{entrypoint} must be root-owned and not writable by its user: {binary:?}"
    );
    Ok(())
}

/// The binary starts in the image under the restrictions the chart puts on it.
fn check_runs(image: &str, args: &[&str], expect: &str) -> Result<()> {
    let mut all = vec![
        "run",
        "--rm",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--network=none",
        image,
    ];
    all.extend_from_slice(args);
    let out = docker(&all)?;
    ensure!(out.contains(expect), "{image} {args:?}: {out}");
    Ok(())
}

fn check_products(tag: &str) -> Result<()> {
    for bin in ["sealed-ota-operator", "sealed-ota-device-emulator"] {
        let image = format!("sealed-ota/{bin}:{tag}");
        check_hardened(&image, &format!("usr/local/bin/{bin}"), 65532)?;
        check_runs(&image, &["--version"], &format!("{bin} 0.1.0"))?;
    }
    Ok(())
}

/// The offline path: the images `make kind` loads into the cluster (here from debug binaries, to
/// reuse `make e2e`'s build; `make kind` uses release ones), and the Mosquitto image.
#[test]
fn offline_images_are_hardened_and_run() -> Result<()> {
    images_sh(&["build", "--profile", "debug", "--tag", "e2e-offline"])?;
    check_products("e2e-offline")
}

/// The registry path: the Dockerfiles as they are (compile stage with `--locked` in a build
/// context filtered by their .dockerignore), so a context that lacks a workspace member or a lock
/// file that does not resolve fails here. Their compile stage builds the dev profile here
/// (`CARGO_PROFILE=dev`, the one build argument that differs from a user's default): the cold
/// release build in the container made this file the longest group of a cold `make test` (636 s),
/// which has a 45-minute budget; `make images` and a user's `docker build` build release.
#[test]
fn dockerfile_images_are_hardened_and_run() -> Result<()> {
    images_sh(&[
        "dockerfile",
        "--profile",
        "debug",
        "--tag",
        "e2e-dockerfile",
    ])?;
    check_products("e2e-dockerfile")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The Mosquitto image: hardened like the others, and it serves an MQTT 5 client as its user.
#[tokio::test]
async fn mosquitto_image_is_hardened_and_serves_mqtt() -> Result<()> {
    images_sh(&["mosquitto", "--tag", "e2e"])?;
    let image = "sealed-ota/mosquitto:e2e";
    check_hardened(image, "usr/sbin/mosquitto", 1883)?;

    let dir = repo_root()
        .join("target/image-tests")
        .join(format!("mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )?;
    let mount = format!("{}:/mosquitto/config:ro", dir.display());
    let name = format!("sealed-ota-image-test-{}", std::process::id());
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--network=host",
        "-v",
        &mount,
        image,
    ])?;
    let served = serves_mqtt(port).await;
    let logs = docker(&["logs", &name]).unwrap_or_default();
    docker(&["rm", "-f", &name])?;
    std::fs::remove_dir_all(&dir)?;
    served.with_context(|| format!("mosquitto log: {logs}"))
}

async fn serves_mqtt(port: u16) -> Result<()> {
    let options = MqttOptions::new("image-test", "127.0.0.1", port);
    let (_client, mut events) = AsyncClient::new(options, 8);
    chart_support::await_connack(&mut events, "image-test", Duration::from_secs(20), true).await
}
