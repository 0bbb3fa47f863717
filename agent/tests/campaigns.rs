//! End to end, as real processes: `sealed-ota-agent run` on simulated boards, enrolled from CSRs
//! made on the board (`sealed-ota device enroll --csr`), completes campaigns the operator drives
//! through the test bed's Mosquitto: firmware through the command hook (with SIGKILL at every step
//! of the whole flow, download included, each on a board of its own in one campaign), through the
//! real RAUC and through Mender update modules (Debian's and our self-test module: a failed
//! self-test ends as `RolledBack` on the Device and in the campaign status; an install that cannot
//! be rolled back ends as `InstallFailed`, never as a rollback), credential rotations in both
//! modes, and release keys enforced. Every Device status is checked against the agent's journal
//! and against what the board actually runs.

mod service;
mod support;

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{certificate_fingerprint, Product};
use sealed_ota_operator::crd::{CampaignPhase, DeviceCampaignStatus, DevicePhase};
use service::{enroll, Service};
use support::ab::{AbDevice, Mode, OLD};
use support::modules::ModuleDevice;
use support::rauc::RaucDevice;
use support::Crash;

/// The campaign status of device `id` in `product`.
async fn device_campaign(product: &Product, id: &str) -> Result<DeviceCampaignStatus> {
    let device = product
        .devices()
        .await?
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some(id))
        .with_context(|| format!("no Device {id}"))?;
    device
        .status
        .and_then(|s| s.campaign)
        .with_context(|| format!("Device {id} has no campaign status"))
}

/// A firmware campaign over the devices labelled `group=<group>`.
fn group_campaign(
    product: &Product,
    group: &str,
    version: &str,
    configmap: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = product.firmware_spec(
        version,
        configmap,
        serde_json::json!({
            "selector": {"matchLabels": {"fleet": product.fleet_label(), "group": group}},
            "rollout": {"maxInFlight": 50, "deviceTimeoutSeconds": 60, "retries": 3,
                        "retryBackoffSeconds": 1},
        }),
    );
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    spec
}

/// The image of the A/B hook boards: what `running()` reads back from the booted slot.
fn ab_image(version: &str) -> String {
    format!("firmware {version}\n{}", "0123456789abcdef\n".repeat(1200))
}

/// Where a crash point lies in the whole flow, and what the campaign must make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Outside the transaction's install steps (download, staging, receipt, report): installed.
    Installed,
    /// Inside the install steps: a restart rolls back (the step may have half happened) or
    /// finishes, and the Device, the journal and the board must agree.
    Consistent,
}

/// Every step of the whole flow on an A/B board with a command hook: the download (after a chunk
/// is written, after the state counting it is saved), the staged install, the receipt, every phase
/// of the transaction, the report, and the journal writes of the first two processes. Alternate
/// points restart after a power cut.
fn flow_crash_points() -> Vec<(Crash, bool, Expect)> {
    let session = [
        "after:chunk#1",
        "after:chunk#4",
        "after:save#2",
        "before:stage",
        "after:stage",
        "before:receipt",
        "after:receipt",
    ];
    session
        .into_iter()
        .map(Crash::at)
        .chain(
            support::crash_points(support::INSTALL_WITH_REBOOT, 2, 3)
                .into_iter()
                // The reboot stops the agent before its request returns: it never fires.
                .filter(|crash| crash.point != "after:rebooting"),
        )
        .enumerate()
        .map(|(i, crash)| {
            let expect = expect_at(&crash.point);
            (crash, i % 2 == 1, expect)
        })
        .collect()
}

/// What a crash at `point` must end in: a consistent end inside the install steps (a journal
/// write, installing, the reboot, its check, the health check, the commit), installed elsewhere.
fn expect_at(point: &str) -> Expect {
    let install_steps = [
        "installing",
        "rebooting",
        "verifying",
        "health-check",
        "committing",
    ];
    let phase = point.split_once(':').map_or("", |(_, phase)| phase);
    if point.starts_with("journal-rename") || install_steps.contains(&phase) {
        Expect::Consistent
    } else {
        Expect::Installed
    }
}

/// One campaign to one A/B command-hook board per crash point (and one without): every armed
/// point fires, every board ends with what its Device says (Succeeded ⇔ the journal says installed
/// ⇔ the booted slot holds the new image; RolledBack ⇔ rolled back ⇔ the old image runs), points
/// outside the install steps end installed, and the campaign counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_hook_campaign_with_sigkill_at_every_step() -> Result<()> {
    support::debian_packages();
    let mut product = Product::new("agent-kill", 0).await?;
    let image = ab_image("2.0.0");
    let points = flow_crash_points();
    let mut services = Vec::new();
    for (i, (crash, power_cut, expect)) in std::iter::once((None, false, Expect::Installed))
        .chain(points.into_iter().map(|(c, p, e)| (Some(c), p, e)))
        .enumerate()
    {
        let device = AbDevice::new(Mode::Ab, true);
        let id = format!("{}-k{i:02}", product.manager_id);
        enroll(&device.board, &product, &id, &[("group", "kill")]);
        let name = crash.as_ref().map_or("none".to_string(), Crash::name);
        let service = Service::start(device, crash, power_cut);
        services.push((id, name, power_cut, expect, service));
    }
    product.firmware_configmap("fw-2", image.as_bytes()).await?;
    product.start_operator()?;
    product.apply_campaign(
        "fw-2",
        group_campaign(&product, "kill", "2.0.0", "fw-2", serde_json::json!({})),
    )?;
    let status = product.finished("fw-2", Duration::from_secs(420)).await?;
    let mut installed = 0;
    let mut rolled_back = 0;
    for (id, name, power_cut, expect, service) in services {
        let context = format!("{id} crash at {name} power_cut={power_cut}");
        let device_status = device_campaign(&product, &id).await?;
        let (mut device, record) = service.stop();
        assert!(record.unexpected.is_empty(), "{context}: {record:?}");
        if name != "none" {
            assert!(record.crash_fired, "{context}: the crash point never fired");
        }
        let journal = device.board.journal();
        let outcome = journal["finished"]
            .as_array()
            .and_then(|f| f.last())
            .map(|f| f["outcome"]["result"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| "none".into());
        match device_status.phase {
            DevicePhase::Succeeded => {
                installed += 1;
                assert_eq!(outcome, "installed", "{context}: {journal:#}");
                assert_eq!(device.running(), image, "{context}");
                assert!(
                    device_status.receipt.is_some(),
                    "{context}: no receipt kept"
                );
            }
            DevicePhase::Failed => {
                rolled_back += 1;
                assert_eq!(
                    device_status.reason.as_deref(),
                    Some("RolledBack"),
                    "{context}: {device_status:?}"
                );
                assert_eq!(outcome, "rolled-back", "{context}: {journal:#}");
                assert_eq!(device.running(), OLD, "{context}");
                assert!(
                    expect == Expect::Consistent,
                    "{context}: a crash outside the install steps rolled back: {device_status:?}"
                );
            }
            other => panic!("{context}: device phase {other:?} after the campaign ended"),
        }
        // What the journal says still holds after one more reboot.
        let running = device.running();
        support::Device::power_cycle(&mut device);
        assert_eq!(device.running(), running, "{context}: changed by a reboot");
    }
    // A campaign with failed devices (rolled back) ends Completed, never Succeeded.
    let phase = if rolled_back == 0 {
        CampaignPhase::Succeeded
    } else {
        CampaignPhase::Completed
    };
    assert_eq!(status.phase, phase, "{status:?}");
    assert_eq!(status.devices.succeeded, installed);
    assert_eq!(status.devices.rolled_back, rolled_back);
    assert!(installed > 0);
    product.pass();
    Ok(())
}

/// A RAUC system (the real `rauc service`, bundles signed by `rauc bundle`): the first campaign
/// installs through a reboot into the other slot and marks it good; with the health check failing,
/// the next one is rolled back (the new slot marked bad, the good one booted again), recorded as
/// `RolledBack` on the Device and counted toward the campaign's failure threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rauc_campaigns_install_then_roll_back_a_failed_health_check() -> Result<()> {
    let mut product = Product::new("agent-rauc", 0).await?;
    let device = RaucDevice::new(true);
    let board = device.board.path().to_path_buf();
    let id = format!("{}-rauc", product.manager_id);
    enroll(&device.board, &product, &id, &[("group", "rauc")]);
    let rootfs =
        |version: &str| format!("rootfs {version} {}", "sealed-ota ".repeat(4000)).into_bytes();
    for version in ["2.0.0", "3.0.0"] {
        let bundle = device.bundle(
            &format!("v{version}"),
            "sealed-ota-test",
            version,
            &rootfs(version),
        );
        product
            .firmware_configmap(&format!("rauc-{}", &version[..1]), &fs::read(bundle)?)
            .await?;
    }
    let service = Service::start(device, None, false);
    product.start_operator()?;
    product.apply_campaign(
        "rauc-2",
        group_campaign(&product, "rauc", "2.0.0", "rauc-2", serde_json::json!({})),
    )?;
    let status = product.finished("rauc-2", Duration::from_secs(240)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(
        device_campaign(&product, &id).await?.phase,
        DevicePhase::Succeeded
    );

    fs::write(board.join("unhealthy"), "")?;
    product.apply_campaign(
        "rauc-3",
        group_campaign(
            &product,
            "rauc",
            "3.0.0",
            "rauc-3",
            serde_json::json!({"rollout": {"maxInFlight": 10, "deviceTimeoutSeconds": 120,
                                           "failureThreshold": "0"}}),
        ),
    )?;
    let status = product.finished("rauc-3", Duration::from_secs(240)).await?;
    let record = device_campaign(&product, &id).await?;
    let (device, service_record) = service.stop();
    assert!(service_record.unexpected.is_empty(), "{service_record:?}");
    assert_eq!(service_record.reboots, 3, "into 2.0.0, into 3.0.0, back");
    assert_eq!(status.phase, CampaignPhase::Failed, "{status:?}");
    assert_eq!(status.devices.rolled_back, 1, "{status:?}");
    assert_eq!(record.phase, DevicePhase::Failed);
    assert_eq!(record.reason.as_deref(), Some("RolledBack"), "{record:?}");
    assert!(
        record
            .message
            .as_deref()
            .unwrap_or("")
            .contains("health-check"),
        "{record:?}"
    );
    assert!(record.receipt.is_some(), "the signed receipt is kept");
    // What runs: slot B with 2.0.0 (committed by the first campaign), 3.0.0's slot marked bad.
    let expected = rootfs("2.0.0");
    let (slot, bytes) = device.running(expected.len());
    assert_eq!(bytes, expected, "booted slot {slot}");
    let devices = product.devices().await?;
    let running = devices[0]
        .status
        .as_ref()
        .and_then(|s| s.running_version.clone());
    assert_eq!(running.as_deref(), Some("2.0.0"));
    product.pass();
    Ok(())
}

/// Mender update modules: Debian's `single-file` installs; Debian's `script` module cannot roll
/// back, so a failed health check after it ends as `InstallFailed` (the receipt claims no version,
/// never a rollback); our own module failing its self-test after the reboot is rolled back and
/// recorded as `RolledBack`, failing the campaign at its threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_module_campaigns_install_roll_back_and_fail_honestly() -> Result<()> {
    let mut product = Product::new("agent-modules", 0).await?;
    let debian = ModuleDevice::debian(true);
    debian.file("dest/app.conf", "version 1\n");
    let debian_board = debian.board.path().to_path_buf();
    let debian_id = format!("{}-debian", product.manager_id);
    enroll(&debian.board, &product, &debian_id, &[("group", "debian")]);
    let single_file = debian.single_file_artifact("version 2\n");
    let script = debian.file(
        "run.sh",
        &format!("#!/bin/sh\necho ran > {}\n", debian.path("ran").display()),
    );
    let script = debian.artifact("script", "test-board", &[script], "gzip");
    product
        .firmware_configmap("single-file", &fs::read(single_file)?)
        .await?;
    product
        .firmware_configmap("script", &fs::read(script)?)
        .await?;

    let ours = ModuleDevice::ours(true);
    ours.file("app.bin", "app 1.0.0\n");
    let ours_id = format!("{}-ours", product.manager_id);
    enroll(&ours.board, &product, &ours_id, &[("group", "ours")]);
    let payload = ours.file("src/payload.bin", "app 2.0.0\nselftest=fail\n");
    let selftest = ours.artifact("sealed-ota-selftest", "test-board", &[payload], "gzip");
    product
        .firmware_configmap("selftest", &fs::read(selftest)?)
        .await?;

    let debian_service = Service::start(debian, None, false);
    let ours_service = Service::start(ours, None, false);
    product.start_operator()?;
    let threshold = serde_json::json!({"rollout": {"maxInFlight": 10, "deviceTimeoutSeconds": 120,
                                                   "failureThreshold": "0"}});
    product.apply_campaign(
        "single-file",
        group_campaign(
            &product,
            "debian",
            "2.0.0",
            "single-file",
            serde_json::json!({}),
        ),
    )?;
    product.apply_campaign(
        "selftest",
        group_campaign(&product, "ours", "2.0.0", "selftest", threshold.clone()),
    )?;
    let status = product
        .finished("single-file", Duration::from_secs(240))
        .await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(
        fs::read_to_string(debian_board.join("dest/app.conf"))?,
        "version 2\n"
    );

    let status = product
        .finished("selftest", Duration::from_secs(240))
        .await?;
    assert_eq!(status.phase, CampaignPhase::Failed, "{status:?}");
    assert_eq!(status.devices.rolled_back, 1, "{status:?}");
    let record = device_campaign(&product, &ours_id).await?;
    assert_eq!(record.reason.as_deref(), Some("RolledBack"), "{record:?}");
    let (ours, ours_record) = ours_service.stop();
    assert!(ours_record.unexpected.is_empty(), "{ours_record:?}");
    assert_eq!(fs::read_to_string(ours.path("app.bin"))?, "app 1.0.0\n");
    assert_eq!(ours.board.last_outcome().unwrap()["result"], "rolled-back");

    fs::write(debian_board.join("unhealthy"), "")?;
    product.apply_campaign(
        "script",
        group_campaign(&product, "debian", "3.0.0", "script", threshold),
    )?;
    let status = product.finished("script", Duration::from_secs(240)).await?;
    let record = device_campaign(&product, &debian_id).await?;
    let (debian, debian_record) = debian_service.stop();
    assert!(debian_record.unexpected.is_empty(), "{debian_record:?}");
    assert!(debian.path("ran").exists(), "the script ran");
    assert_eq!(debian.board.last_outcome().unwrap()["result"], "failed");
    assert_eq!(status.phase, CampaignPhase::Failed, "{status:?}");
    assert_eq!(status.devices.rolled_back, 0, "not a rollback: {status:?}");
    assert_eq!(
        record.reason.as_deref(),
        Some("InstallFailed"),
        "{record:?}"
    );
    assert!(
        record
            .message
            .as_deref()
            .unwrap_or("")
            .contains("may not run"),
        "{record:?}"
    );
    let devices = product.devices().await?;
    let debian_device = devices
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(debian_id.as_str()))
        .context("debian Device")?;
    assert_eq!(
        debian_device
            .status
            .as_ref()
            .and_then(|s| s.running_version.as_deref()),
        Some("2.0.0"),
        "the failed 3.0.0 is not recorded as running"
    );
    product.pass();
    Ok(())
}

/// Credential rotations with the agent, in both modes: the new certificate lands in the agent's
/// credential store and is the one the Device shows; in CSR mode the key is made on the board;
/// neither new key crosses the broker (a spy on `#` records everything relayed). The agent then
/// reconnects with the new certificate and installs only firmware its release key signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_in_both_modes_then_release_keys_enforced() -> Result<()> {
    use p256::pkcs8::DecodePrivateKey;
    use sealed_ota_e2e::product::{leaked_secrets, Spy};

    let mut product = Product::new("agent-rotate", 0).await?;
    let device = AbDevice::new(Mode::Ab, true);
    let board = device.board.path().to_path_buf();
    let id = format!("{}-rot", product.manager_id);
    enroll(&device.board, &product, &id, &[("group", "rot")]);
    // Release keys: the board trusts one; the operator never holds it.
    let cli = sealed_ota_e2e::product::sealed_ota_cli;
    let keys = board.join("release");
    cli(&[
        "release",
        "keygen",
        "--out",
        keys.to_str().context("utf-8")?,
    ])?;
    let config = fs::read_to_string(board.join("agent.toml"))?;
    fs::write(
        board.join("agent.toml"),
        format!(
            "{config}\n[release_keys]\ntrusted = [\"{}\"]\n",
            keys.join("release.pub").display()
        ),
    )?;
    let spy = Spy::start(product.bed, &product.ns.name).await?;
    let service = Service::start(device, None, false);
    product.start_operator()?;

    let mut new_keys = Vec::new();
    let mut fingerprints = Vec::new();
    for mode in ["DeliverKey", "Csr"] {
        let name = format!("rotate-{}", mode.to_lowercase());
        product.apply_campaign(
            &name,
            serde_json::json!({
                "selector": {"matchLabels": {"fleet": product.fleet_label(), "group": "rot"}},
                "targetVersion": "1.0.0",
                "payload": {"rotateCredentials": {"mode": mode, "caSecretName": "sealed-ota-ca",
                                                  "validityDays": 30}},
                "managerSecretName": "sealed-ota-manager",
                "rollout": {"maxInFlight": 10, "deviceTimeoutSeconds": 60},
            }),
        )?;
        let status = product.finished(&name, Duration::from_secs(180)).await?;
        assert_eq!(status.phase, CampaignPhase::Succeeded, "{mode}: {status:?}");
        let cert = fs::read_to_string(board.join("state/credentials/cert.pem"))
            .with_context(|| format!("{mode}: no rotated certificate in the agent's store"))?;
        let key = fs::read_to_string(board.join("state/credentials/key.pem"))?;
        let fingerprint = certificate_fingerprint(&cert)?;
        let devices = product.devices().await?;
        let shown = devices[0]
            .status
            .as_ref()
            .and_then(|s| s.certificate_fingerprint.clone());
        assert_eq!(shown.as_deref(), Some(fingerprint.as_str()), "{mode}");
        let scalar = p256::SecretKey::from_pkcs8_pem(&key)?.to_bytes().to_vec();
        new_keys.push((format!("{mode} key"), scalar));
        fingerprints.push(fingerprint);
    }
    assert_ne!(fingerprints[0], fingerprints[1]);
    assert_ne!(new_keys[0].1, new_keys[1].1, "CSR mode made a new key");

    // Firmware under release keys, over the rotated identity: unsigned is refused, signed installs.
    let image = ab_image("2.0.0");
    let image_file = board.join("fw.bin");
    fs::write(&image_file, &image)?;
    product.firmware_configmap("fw", image.as_bytes()).await?;
    product.apply_campaign(
        "unsigned",
        group_campaign(&product, "rot", "2.0.0", "fw", serde_json::json!({})),
    )?;
    let status = product
        .finished("unsigned", Duration::from_secs(120))
        .await?;
    assert_eq!(status.devices.failed, 1, "{status:?}");
    let record = device_campaign(&product, &id).await?;
    assert_eq!(
        record.reason.as_deref(),
        Some("ReleaseSignature"),
        "{record:?}"
    );
    let signed: serde_json::Value = serde_json::from_str(&cli(&[
        "release",
        "sign",
        "--key",
        keys.join("release.key").to_str().context("utf-8")?,
        "--image",
        image_file.to_str().context("utf-8")?,
        "--version",
        "2.0.0",
        "-o",
        "json",
    ])?)?;
    let mut spec = group_campaign(&product, "rot", "2.0.0", "fw", serde_json::json!({}));
    spec["payload"]["firmware"]["releaseSignature"] = signed["releaseSignature"].clone();
    product.apply_campaign("signed", spec)?;
    let status = product.finished("signed", Duration::from_secs(180)).await?;
    assert_eq!(status.devices.succeeded, 1, "{status:?}");
    let record = device_campaign(&product, &id).await?;
    assert_eq!(
        record.release_key_id.as_deref(),
        signed["keyId"].as_str(),
        "{record:?}"
    );
    let (device, service_record) = service.stop();
    assert!(service_record.unexpected.is_empty(), "{service_record:?}");
    assert_eq!(device.running(), image);

    let seen = spy.stop();
    assert!(seen.len() > image.len(), "the spy saw the transfers");
    assert!(
        leaked_secrets(&seen, &new_keys).is_empty(),
        "a rotated private key crossed the broker in the clear"
    );
    product.pass();
    Ok(())
}
