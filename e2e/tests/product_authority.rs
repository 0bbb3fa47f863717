//! End to end, as real processes (operator, emulator, Mosquitto, kube-apiserver): nothing outlives
//! its authority, whatever the broker does (issue 11).
//!
//! - A rotation whose receipt the broker drops (a Mosquitto ACL refuses the device's status
//!   publish) does not lock the pinned device out: the retry is answered, the rotation settles,
//!   and a later firmware campaign reaches the device.
//! - After a rotation, a thief holding the old key cannot answer the next rotation.
//! - The chunks of an aborted campaign, kept by the broker and delivered when the device comes
//!   back, install nothing: the signed abort ended the session.
//! - The same when the broker also withholds the abort and delivers the chunks days later (the
//!   device's clock is moved by the test): the expiry refuses them.
//! - A self-test that fails after install is reported as a signed RolledBack, at scale.
//! - Devices enrolled with a release key refuse firmware the operator signed but the release key
//!   did not, and install what it did.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{
    certificate_fingerprint, metric, random_image, PrivateBroker, Product,
};
use sealed_ota_e2e::rogue::Rogue;
use sealed_ota_e2e::{repo_root, wait_for, TestBed};
use sealed_ota_operator::crd::{CampaignPhase, DevicePhase};

/// Mosquitto ACL for one product: the manager (its CN is its id) owns its topic tree; a device
/// reads its notify and update topics and the chunks, and writes its ready and, unless
/// `drop_statuses`, its statuses and receipts.
fn acl(drop_statuses: bool) -> String {
    let mut acl = String::from(
        "pattern readwrite iot/%u/#\npattern read iot/+/%u/notify\npattern read iot/+/%u/update\n\
         pattern write iot/+/%u/ready/+\npattern read iot/+/_chunks/#\n",
    );
    if !drop_statuses {
        acl.push_str("pattern write iot/+/%u/update/status/+\n");
    }
    acl
}

fn fingerprint_on_disk(product: &Product, id: &str) -> Result<String> {
    certificate_fingerprint(&std::fs::read_to_string(
        product.device_dir(id).join("cert.pem"),
    )?)
}

fn rotation_spec(product: &Product, mode: &str) -> serde_json::Value {
    serde_json::json!({
        "selector": {"matchLabels": {"fleet": product.fleet_label()}},
        "targetVersion": "1.0.1",
        "payload": {"rotateCredentials": {"mode": mode, "caSecretName": "sealed-ota-ca",
                                          "validityDays": 30}},
        "managerSecretName": "sealed-ota-manager",
        "rollout": {"maxInFlight": 10, "deviceTimeoutSeconds": 8, "retries": 3,
                    "retryBackoffSeconds": 1},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_rotation_receipt_does_not_lock_a_pinned_device_out() -> Result<()> {
    let bed = TestBed::get()?;
    let broker_dir = repo_root()
        .join("target/e2e-runs")
        .join(format!("lockout-broker-{:08x}", rand::random::<u32>()));
    let broker = PrivateBroker::start_with_acl(bed, &broker_dir, Some(&acl(true)))?;
    let mut product = Product::with_broker("lockout", 1, broker.url()).await?;
    let id = product.device_ids[0].clone();
    let pin = fingerprint_on_disk(&product, &id)?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign("rotate", rotation_spec(&product, "Csr"))?;
    // The device validates its new certificate, switches to it and sends its receipt, which the
    // broker drops.
    wait_for(
        "the device switched to its new certificate",
        Duration::from_secs(60),
        || {
            let now = fingerprint_on_disk(&product, &id).ok();
            let pin = pin.clone();
            async move { Ok(now.filter(|f| f != &pin).map(|_| ())) }
        },
    )
    .await?;
    // From now on the broker relays the device's messages again.
    broker.set_acl(&acl(false))?;
    let status = product.finished("rotate", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    let device = &product.devices().await?[0];
    assert_eq!(
        device.spec.certificate_fingerprint.as_deref(),
        Some(pin.as_str()),
        "the pin is left as the user wrote it"
    );
    let st = device.status.as_ref().context("status")?;
    let record = st.campaign.as_ref().context("record")?;
    assert!(record.attempts >= 2, "succeeded on a retry: {record:?}");
    let now = fingerprint_on_disk(&product, &id)?;
    assert_eq!(
        st.rotated_certificate_fingerprint.as_deref(),
        Some(now.as_str())
    );
    assert!(st.retired_certificate_fingerprints.contains(&pin), "{st:?}");
    assert!(st.pending_certificates.is_empty(), "{st:?}");
    // A later firmware campaign reaches the device.
    later_firmware_reaches_the_fleet(&product).await?;
    product.pass();
    Ok(())
}

/// A firmware campaign (version 2.0.0) succeeds on every device, each holding the image.
async fn later_firmware_reaches_the_fleet(product: &Product) -> Result<()> {
    let image = random_image(16 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("2.0.0", "fw", serde_json::json!({})),
    )?;
    let status = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    for id in &product.device_ids {
        assert_eq!(
            std::fs::read(product.device_dir(id).join("firmware.bin"))?,
            image
        );
    }
    Ok(())
}

/// Copies a fleet directory with its symbolic links resolved (a thief's copy of the files).
fn copy_fleet(from: &Path, to: &Path) -> Result<()> {
    let status = std::process::Command::new("cp")
        .arg("-rL")
        .arg(from)
        .arg(to)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "cp -rL {} {}",
        from.display(),
        to.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thief_of_the_old_key_cannot_answer_the_next_rotation() -> Result<()> {
    let mut product = Product::new("thief", 1).await?;
    let id = product.device_ids[0].clone();
    // The thief copies the device's files before the first rotation.
    let stolen = product.dir.join("stolen-fleet");
    copy_fleet(&product.dir.join("fleet"), &stolen)?;
    let old = fingerprint_on_disk(&product, &id)?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign("rotate-1", rotation_spec(&product, "DeliverKey"))?;
    let status = product
        .finished("rotate-1", Duration::from_secs(120))
        .await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    // The device is switched off; the thief, with the old key and certificate, takes its place.
    product.stop_emulator();
    product.start_emulator_with_fleet(&stolen, &[])?;
    let mut spec = rotation_spec(&product, "DeliverKey");
    spec["targetVersion"] = serde_json::json!("1.0.2");
    spec["rollout"]["retries"] = serde_json::json!(0);
    product.apply_campaign("rotate-2", spec)?;
    let status = product
        .finished("rotate-2", Duration::from_secs(120))
        .await?;
    product.stop_emulator();
    assert_eq!(
        (status.devices.succeeded, status.devices.failed),
        (0, 1),
        "{status:?}"
    );
    let thief_now = certificate_fingerprint(&std::fs::read_to_string(
        stolen.join("devices").join(&id).join("cert.pem"),
    )?)?;
    assert_eq!(thief_now, old, "the thief received new credentials");
    let series = product.metrics().await?;
    let refused = metric(
        &series,
        "sealed_ota_operator_protocol_errors_total",
        Some("identity_retired"),
    );
    assert!(refused >= 1.0, "the retired certificate was not refused");
    // The device itself, on its new certificate, is still served.
    product.start_emulator(&[])?;
    later_firmware_reaches_the_fleet(&product).await?;
    Ok(())
}

/// A campaign whose one device goes offline after two chunks (for `offline_for`), while a rogue
/// on the broker records every chunk. Returns the product and the rogue once the device is away.
async fn device_away_with_chunks_recorded(
    prefix: &str,
    extra_faults: &[&str],
) -> Result<(Product, Rogue)> {
    let mut product = Product::new(prefix, 1).await?;
    let m = product.manager_id.clone();
    let rogue = Rogue::start(product.bed, &product.ns.name, &format!("iot/{m}/#")).await?;
    let image = random_image(64 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    let mut args = vec!["--window", "2", "--fault", "offline:after=2,for=25s"];
    for f in extra_faults {
        args.extend(["--fault", f]);
    }
    product.start_emulator(&args)?;
    product.apply_campaign(
        "c",
        product.firmware_spec(
            "2.0.0",
            "fw",
            serde_json::json!({"expiresAfterSeconds": 86400}),
        ),
    )?;
    let chunk_prefix = format!("iot/{m}/_chunks/");
    rogue
        .until(
            "the rogue recorded all 16 chunks",
            Duration::from_secs(60),
            |seen| {
                let n = seen
                    .iter()
                    .filter(|m| {
                        m.topic.starts_with(&chunk_prefix) && m.retain && !m.payload.is_empty()
                    })
                    .count();
                (n >= 16).then_some(())
            },
        )
        .await?;
    let log = product.emulator_log();
    wait_for("the device went offline", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { Ok(text.contains("going offline").then_some(())) }
    })
    .await?;
    Ok((product, rogue))
}

/// The rogue publishes again, retained, every chunk it recorded (the campaign's own bytes).
async fn redeliver_chunks(product: &Product, rogue: &Rogue) -> Result<()> {
    let chunk_prefix = format!("iot/{}/_chunks/", product.manager_id);
    let mut chunks: Vec<_> = rogue
        .seen()
        .into_iter()
        .filter(|m| m.topic.starts_with(&chunk_prefix) && !m.payload.is_empty())
        .collect();
    chunks.sort_by(|a, b| a.topic.cmp(&b.topic));
    chunks.dedup_by(|a, b| a.topic == b.topic);
    for c in chunks {
        rogue.publish(&c.topic, c.payload, true, None).await?;
    }
    Ok(())
}

/// `text` without ANSI escape sequences (the emulator's log is colored).
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Nothing of the campaign is installed on the device, well after it came back.
async fn nothing_installed(product: &Product, what: &str) -> Result<()> {
    let id = &product.device_ids[0];
    let log = product.emulator_log();
    let firmware = product.device_dir(id).join("firmware.bin");
    wait_for(
        &format!("the device back online and done with the campaign ({what:?} in its log)"),
        Duration::from_secs(90),
        || {
            let text = without_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
            let installed = firmware.exists();
            async move { Ok((installed || text.contains(what)).then_some(())) }
        },
    )
    .await?;
    // Give the chunks the broker redelivered time to arrive and be refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !product.device_dir(id).join("firmware.bin").exists(),
        "the device installed the campaign's image"
    );
    let state = std::fs::read_to_string(product.device_dir(id).join("state.json"))?;
    let state: serde_json::Value = serde_json::from_str(&state)?;
    assert_eq!(state["running_version"], "1.0.0", "{state}");
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_campaigns_chunks_delivered_later_install_nothing() -> Result<()> {
    let (product, rogue) = device_away_with_chunks_recorded("abort-late", &[]).await?;
    product.patch_spec("c", serde_json::json!({"abort": true}))?;
    let status = product.finished("c", Duration::from_secs(60)).await?;
    assert_eq!(status.phase, CampaignPhase::Aborted);
    // The broker keeps the chunks the operator cleared and delivers them when the device is back.
    redeliver_chunks(&product, &rogue).await?;
    nothing_installed(&product, "signed abort").await?;
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_campaigns_chunks_delivered_days_later_install_nothing() -> Result<()> {
    let clock = repo_root()
        .join("target/e2e-runs")
        .join(format!("clock-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(clock.parent().context("parent")?)?;
    let _ = std::fs::remove_file(&clock);
    let fault = format!("clock-file:path={}", clock.display());
    let (product, rogue) = device_away_with_chunks_recorded("expiry-late", &[&fault]).await?;
    product.patch_spec("c", serde_json::json!({"abort": true}))?;
    product.finished("c", Duration::from_secs(60)).await?;
    // The broker withholds the signed abort (it clears the retained message that carries it)...
    let notify = format!(
        "iot/{}/{}/notify",
        product.manager_id, product.device_ids[0]
    );
    rogue
        .until(
            "the signed abort published",
            Duration::from_secs(30),
            |seen| {
                seen.iter()
                    .any(|m| {
                        m.topic == notify && !m.payload.is_empty() && {
                            sealed_ota_protocol::wire::decode_abort(&m.payload).is_ok()
                        }
                    })
                    .then_some(())
            },
        )
        .await?;
    rogue.publish(&notify, Vec::new(), true, None).await?;
    // ...and delivers the campaign's chunks when the device is back, two days later by its clock.
    std::fs::write(&clock, (2 * 86_400).to_string())?;
    redeliver_chunks(&product, &rogue).await?;
    nothing_installed(&product, "reason=expired").await?;
    let _ = std::fs::remove_file(&clock);
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_self_tests_are_reported_as_rolled_back_at_scale() -> Result<()> {
    let mut product = Product::new("rollback", 10).await?;
    let image = random_image(16 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    let unlucky = format!(
        "selftest-fail:reason=watchdog@devices={}+{}",
        product.device_ids[3], product.device_ids[7]
    );
    product.start_emulator(&["--fault", &unlucky])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("2.0.0", "fw", serde_json::json!({})),
    )?;
    let status = product.finished("fw", Duration::from_secs(180)).await?;
    assert_eq!(
        (status.devices.failed, status.devices.rolled_back),
        (2, 2),
        "{status:?}"
    );
    assert_eq!(status.devices.succeeded, 8);
    let devices = product.devices().await?;
    let rolled: Vec<_> = devices
        .iter()
        .filter(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "RolledBack")
            })
        })
        .collect();
    assert_eq!(rolled.len(), 2);
    for d in rolled {
        let s = d.status.as_ref().context("status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.0.0"));
        let record = s.campaign.as_ref().context("record")?;
        assert_eq!(record.phase, DevicePhase::Failed);
        assert!(
            record.receipt.is_some(),
            "the signed RolledBack receipt is kept"
        );
        assert!(record.message.as_deref().unwrap_or("").contains("watchdog"));
    }
    let events = product
        .wait_events("a DeviceRolledBack Event", Duration::from_secs(30), |ev| {
            ev.iter().any(|(r, _)| r == "DeviceRolledBack")
        })
        .await?;
    assert!(
        events.iter().any(|(r, _)| r == "DeviceRolledBack"),
        "{events:?}"
    );
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_with_a_release_key_install_only_what_it_signed() -> Result<()> {
    let bed = TestBed::get()?;
    let keys = repo_root()
        .join("target/e2e-runs")
        .join(format!("release-{:08x}", rand::random::<u32>()));
    let cli = sealed_ota_e2e::product::sealed_ota_cli;
    sealed_ota_e2e::product::build_binaries()?;
    let trusted = keys.join("trusted");
    let rogue_key = keys.join("other");
    cli(&[
        "release",
        "keygen",
        "--out",
        trusted.to_str().context("utf-8")?,
    ])?;
    cli(&[
        "release",
        "keygen",
        "--out",
        rogue_key.to_str().context("utf-8")?,
    ])?;
    let pubkey = trusted.join("release.pub");
    let mut product = Product::with_enrollment(
        "release",
        3,
        bed.mqtts_url.clone(),
        &["--release-key", pubkey.to_str().context("utf-8")?],
    )
    .await?;
    let image = random_image(16 * 1024);
    let image_file = product.dir.join("fw.bin");
    std::fs::write(&image_file, &image)?;
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    let signed_by = |key: &Path| -> Result<(serde_json::Value, String)> {
        let out = cli(&[
            "release",
            "sign",
            "--key",
            key.join("release.key").to_str().context("utf-8")?,
            "--image",
            image_file.to_str().context("utf-8")?,
            "--version",
            "2.0.0",
            "-o",
            "json",
        ])?;
        let file: serde_json::Value = serde_json::from_str(&out)?;
        let key_id = file["keyId"].as_str().context("keyId")?.to_string();
        Ok((file["releaseSignature"].clone(), key_id))
    };
    // The operator's own signature, no release signature; then a perfectly valid signature by a
    // key the devices do not trust (what a compromised operator namespace can produce).
    for (name, release) in [
        ("unsigned", None),
        ("other-key", Some(signed_by(&rogue_key)?.0)),
    ] {
        let mut spec = product.firmware_spec("2.0.0", "fw", serde_json::json!({}));
        if let Some(sig) = release {
            spec["payload"]["firmware"]["releaseSignature"] = sig;
        }
        product.apply_campaign(name, spec)?;
        let status = product.finished(name, Duration::from_secs(120)).await?;
        assert_eq!(
            (status.devices.failed, status.devices.succeeded),
            (3, 0),
            "{status:?}"
        );
        for d in product.devices().await? {
            let record = d.status.and_then(|s| s.campaign).context("record")?;
            assert_eq!(
                record.reason.as_deref(),
                Some("ReleaseSignature"),
                "{record:?}"
            );
        }
    }
    for id in &product.device_ids {
        assert!(!product.device_dir(id).join("firmware.bin").exists());
    }
    // Signed by the trusted release key: installed, and the key shows on every status.
    let (signature, trusted_key_id) = signed_by(&trusted)?;
    let mut spec = product.firmware_spec("2.0.0", "fw", serde_json::json!({}));
    spec["payload"]["firmware"]["releaseSignature"] = signature;
    product.apply_campaign("signed", spec)?;
    let status = product.finished("signed", Duration::from_secs(120)).await?;
    assert_eq!(status.devices.succeeded, 3, "{status:?}");
    let expected = status
        .release_key_id
        .clone()
        .context("campaign releaseKeyId")?;
    assert_eq!(expected, trusted_key_id);
    for d in product.devices().await? {
        let record = d.status.and_then(|s| s.campaign).context("record")?;
        assert_eq!(record.release_key_id.as_deref(), Some(expected.as_str()));
    }
    for id in &product.device_ids {
        assert_eq!(
            std::fs::read(product.device_dir(id).join("firmware.bin"))?,
            image
        );
    }
    product.pass();
    Ok(())
}
