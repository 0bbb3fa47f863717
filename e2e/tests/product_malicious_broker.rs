//! End to end, as real processes, with a malicious broker (issue 6, group 4). The "broker" is a
//! rogue client on the test bed's plain listener, which may publish anywhere: it sees what the
//! manager and the devices exchange and writes into their topics, which is what a
//! man-in-the-middle between the devices and Mosquitto could do.
//!
//! - Altered chunks (bit flips, a chunk moved to another index, truncation) overwrite the genuine
//!   retained chunks before any device comes online, and the emulator flips bits on the wire too:
//!   the devices reject every altered chunk, ask again, and install exactly the source image.
//! - An older campaign's messages (notify, update, ready, chunks) replayed into a newer campaign:
//!   refused on both sides, the newer campaign completes and nothing of the older is installed.
//! - Device Y's signed ready (Y's certificate) published on device X's ready topic: the manager
//!   refuses it (counted as `wrong_device`); X only ever completes with its own certificate.
//! - A campaign offering an older version: each device refuses with a signed NotNewer, the
//!   campaign fails with that reason on its status, its Events and each Device, and the devices
//!   keep running the newer image.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{certificate_fingerprint, metric, random_image, Product};
use sealed_ota_e2e::rogue::{retained, Msg, Rogue};
use sealed_ota_e2e::wait_for;
use sealed_ota_operator::crd::{CampaignPhase, Device, DevicePhase};
use sealed_ota_protocol::TopicTree;

// ---------------------------------------------------------------------------------------------
// Small readers of what the product exposes (the rogue is `sealed_ota_e2e::rogue`).
// ---------------------------------------------------------------------------------------------

/// Every device holds exactly `image` as its installed firmware.
fn assert_all_hold(product: &Product, image: &[u8], what: &str) -> Result<()> {
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image ({what})"))?;
        assert!(
            installed == image,
            "{id}: the installed image is not {what} byte for byte ({} bytes installed)",
            installed.len()
        );
    }
    Ok(())
}

/// The emulator's JSON summary of its run number `n` (written when it stops).
fn summary(product: &Product, n: u32) -> Result<serde_json::Value> {
    let path = product.dir.join(format!("emulator-{n}.json"));
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn number(summary: &serde_json::Value, key: &str) -> Result<u64> {
    summary[key]
        .as_u64()
        .with_context(|| format!("emulator summary has no {key}: {summary}"))
}

fn device<'a>(devices: &'a [Device], id: &str) -> Result<&'a Device> {
    devices
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(id))
        .with_context(|| format!("Device {id} not found"))
}

/// A machine reason with case and separators ignored (`NotNewer`, `not_newer`).
fn normalized(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// (a) Altered chunks.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn altered_chunks_are_rejected_and_only_the_source_image_is_installed() -> Result<()> {
    let mut product = Product::new("mitm-chunks", 6).await?;
    let m = product.manager_id.clone();
    let rogue = Rogue::start(product.bed, &product.ns.name, &format!("iot/{m}/_chunks/#")).await?;
    let image = random_image(64 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    // The devices are still offline: the operator publishes the retained chunks and notifies.
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({})),
    )?;
    let campaign = product
        .wait_campaign(
            "fw",
            "chunks published, every device started",
            Duration::from_secs(60),
            |c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.chunk_count.is_some() && s.devices.in_progress == 6)
            },
        )
        .await?;
    let uid = campaign.metadata.uid.clone().context("uid")?;
    let count = campaign
        .status
        .as_ref()
        .and_then(|s| s.chunk_count)
        .context("chunkCount")?;
    assert_eq!(count, 16, "64 KiB in 4 KiB chunks");
    let prefix = format!("iot/{m}/_chunks/{uid}/");
    let genuine: BTreeMap<u32, Msg> = rogue
        .until(
            "every genuine chunk seen by the broker",
            Duration::from_secs(30),
            |seen| {
                let chunks: BTreeMap<u32, Msg> = seen
                    .iter()
                    .filter(|m| !m.payload.is_empty())
                    .filter_map(|m| Some((m.topic.strip_prefix(&prefix)?.parse().ok()?, m.clone())))
                    .collect();
                (chunks.len() == count as usize).then_some(chunks)
            },
        )
        .await?;

    // The broker replaces every retained chunk: a flipped bit in the ciphertext, a genuine chunk
    // moved to another index, or a truncated message.
    let mut tampered = BTreeMap::new();
    for (&i, msg) in &genuine {
        let mut payload = msg.payload.clone();
        match i % 3 {
            0 => {
                let at = payload.len() / 2;
                payload[at] ^= 0x10;
            }
            1 => payload = genuine[&((i + 1) % count)].payload.clone(),
            _ => payload.truncate(payload.len() / 2),
        }
        assert_ne!(payload, msg.payload);
        rogue
            .publish(&msg.topic, payload.clone(), true, msg.props.as_ref())
            .await?;
        tampered.insert(msg.topic.clone(), payload);
    }
    let held = retained(product.bed, &format!("{prefix}#")).await?;
    assert_eq!(
        held, tampered,
        "the broker does not hold the altered chunks: the attack did not take place"
    );

    // The devices come online; half of them also see bits flipped on the wire (emulator fault).
    product.start_emulator(&["--fault", "bitflip:p=0.2,where=wire@50%"])?;
    let status = product.finished("fw", Duration::from_secs(150)).await?;
    assert_eq!(
        status.phase,
        CampaignPhase::Succeeded,
        "the genuine chunks, requested again, should complete every device: {status:?}"
    );
    assert_eq!(status.devices.succeeded, 6, "{status:?}");
    assert!(status.failures.is_empty(), "{:?}", status.failures);
    assert_all_hold(&product, &image, "the source image")?;
    for d in product.devices().await? {
        let s = d.status.as_ref().context("device status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.1.0"), "{d:?}");
    }

    // Every altered chunk was refused; none was ever accepted (one accepted chunk per index).
    product.stop_emulator();
    let run = summary(&product, 1)?;
    let rejected = number(&run, "messagesRejected")?;
    assert!(
        rejected >= 6,
        "each device was offered altered chunks but the emulator rejected only {rejected} messages: {run}"
    );
    assert_eq!(
        number(&run, "chunksReceived")?,
        6 * u64::from(count),
        "devices accepted more (or fewer) chunks than one genuine copy of each: {run}"
    );

    // The campaign ended: the operator cleared its retained chunks, the broker's junk included.
    let left = wait_for(
        "retained chunks cleared",
        Duration::from_secs(10),
        || async {
            let left = retained(product.bed, &format!("{prefix}#")).await?;
            Ok(left.is_empty().then_some(()))
        },
    )
    .await;
    assert!(
        left.is_ok(),
        "retained chunks remain after the campaign: {left:?}"
    );
    product.pass();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (b) Replay of an older campaign.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_campaign_replayed_into_a_newer_one_is_refused() -> Result<()> {
    const N: usize = 5;
    let mut product = Product::new("mitm-replay", N as u32).await?;
    let m = product.manager_id.clone();
    let rogue = Rogue::start(product.bed, &product.ns.name, &format!("iot/{m}/#")).await?;
    let image_a = random_image(64 * 1024);
    let image_b = random_image(64 * 1024);
    product.firmware_configmap("fw-a", &image_a).await?;
    product.firmware_configmap("fw-b", &image_b).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;

    // Campaign A, recorded by the broker.
    product.apply_campaign(
        "a",
        product.firmware_spec("1.1.0", "fw-a", serde_json::json!({})),
    )?;
    let status = product.finished("a", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_all_hold(&product, &image_a, "image A")?;
    let uid_a = product.campaign("a").await?.metadata.uid.context("uid")?;
    let recorded = rogue.seen();
    let topics = TopicTree::new("iot", &m)?;
    let last = |topic: &str| {
        recorded
            .iter()
            .rev()
            .find(|x| x.topic == topic && !x.payload.is_empty())
            .cloned()
            .with_context(|| format!("the broker saw no {topic} during campaign A"))
    };
    let mut a_notify = BTreeMap::new();
    let mut a_update = BTreeMap::new();
    let mut a_ready = BTreeMap::new();
    for id in &product.device_ids {
        a_notify.insert(id.clone(), last(&format!("iot/{m}/{id}/notify"))?);
        a_update.insert(id.clone(), last(&format!("iot/{m}/{id}/update"))?);
        a_ready.insert(id.clone(), last(&topics.ready(id))?);
    }
    let a_prefix = format!("iot/{m}/_chunks/{uid_a}/");
    let a_chunks: BTreeMap<u32, Vec<u8>> = recorded
        .iter()
        .filter(|x| !x.payload.is_empty())
        .filter_map(|x| {
            Some((
                x.topic.strip_prefix(&a_prefix)?.parse().ok()?,
                x.payload.clone(),
            ))
        })
        .collect();
    assert_eq!(
        a_chunks.len(),
        16,
        "the broker saw every chunk of campaign A"
    );

    // 1. Replay to the idle fleet: A's notify (retained, as the manager sent it) and A's update.
    let before = product.metrics().await?;
    for id in &product.device_ids {
        let n = &a_notify[id];
        rogue
            .publish(&n.topic, n.payload.clone(), true, n.props.as_ref())
            .await?;
        let u = &a_update[id];
        rogue
            .publish(&u.topic, u.payload.clone(), false, u.props.as_ref())
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = product.metrics().await?;
    for name in [
        "sealed_ota_operator_handshakes_total",
        "sealed_ota_operator_installs_total",
    ] {
        assert_eq!(
            metric(&after, name, None),
            metric(&before, name, None),
            "{name} moved: a replayed notify of a finished campaign started a new session"
        );
    }
    product.stop_emulator();
    let run1 = summary(&product, 1)?;
    assert_eq!(
        number(&run1, "chunksReceived")?,
        (N * 16) as u64,
        "a device fetched chunks again after the replay: {run1}"
    );
    assert_all_hold(&product, &image_a, "image A, still")?;

    // 2. Campaign B starts while the devices are offline. The broker swaps B's retained chunks
    //    for A's and feeds A's signed readies to the manager.
    let mark = rogue.seen().len();
    product.apply_campaign(
        "b",
        product.firmware_spec("1.2.0", "fw-b", serde_json::json!({})),
    )?;
    let campaign_b = product
        .wait_campaign(
            "b",
            "campaign B started on every device",
            Duration::from_secs(60),
            |c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.chunk_count == Some(16) && s.devices.in_progress == N as u32)
            },
        )
        .await?;
    let uid_b = campaign_b.metadata.uid.context("uid")?;
    let b_prefix = format!("iot/{m}/_chunks/{uid_b}/");
    let ids = product.device_ids.clone();
    rogue
        .until(
            "B's chunks and notifies at the broker",
            Duration::from_secs(30),
            |seen| {
                let new = &seen[mark.min(seen.len())..];
                let chunks = new
                    .iter()
                    .filter(|x| x.topic.starts_with(&b_prefix))
                    .count();
                let notifies = ids
                    .iter()
                    .filter(|id| {
                        let t = format!("iot/{m}/{id}/notify");
                        new.iter().any(|x| x.topic == t && !x.payload.is_empty())
                    })
                    .count();
                (chunks >= 16 && notifies == N).then_some(())
            },
        )
        .await?;
    for (i, payload) in &a_chunks {
        rogue
            .publish(&format!("{b_prefix}{i}"), payload.clone(), true, None)
            .await?;
    }
    let wrong_session = "reason=\"wrong_session\"";
    let errors = "sealed_ota_operator_protocol_errors_total";
    let before = metric(&product.metrics().await?, errors, Some(wrong_session));
    for id in &product.device_ids {
        let r = &a_ready[id];
        rogue
            .publish(&r.topic, r.payload.clone(), false, r.props.as_ref())
            .await?;
    }
    wait_for(
        "the manager refused every replayed ready",
        Duration::from_secs(15),
        || async {
            let now = metric(&product.metrics().await?, errors, Some(wrong_session));
            Ok((now >= before + N as f64).then_some(()))
        },
    )
    .await?;

    // 3. The devices come online; once each has B's update, the broker replays A's update.
    product.start_emulator(&[])?;
    let ids = product.device_ids.clone();
    rogue
        .until(
            "B's update to every device",
            Duration::from_secs(60),
            |seen| {
                let new = &seen[mark.min(seen.len())..];
                ids.iter()
                    .all(|id| {
                        let t = format!("iot/{m}/{id}/update");
                        new.iter().any(|x| x.topic == t && !x.payload.is_empty())
                    })
                    .then_some(())
            },
        )
        .await?;
    for id in &product.device_ids {
        let u = &a_update[id];
        rogue
            .publish(&u.topic, u.payload.clone(), false, u.props.as_ref())
            .await?;
    }
    let status = product.finished("b", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, N as u32, "{status:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    product.stop_emulator();

    assert_all_hold(&product, &image_b, "image B (nothing of A reinstalled)")?;
    let devices = product.devices().await?;
    for id in &product.device_ids {
        let s = device(&devices, id)?
            .status
            .clone()
            .context("device status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.2.0"), "{id}: {s:?}");
        let c = s.campaign.context("device campaign")?;
        assert_eq!(
            (c.name.as_str(), c.phase),
            ("b", DevicePhase::Succeeded),
            "{id}"
        );
    }
    let run2 = summary(&product, 2)?;
    assert_eq!(
        number(&run2, "chunksReceived")?,
        (N * 16) as u64,
        "a replayed chunk of A was accepted into B: {run2}"
    );
    let rejected = number(&run2, "messagesRejected")?;
    assert!(
        rejected >= 2 * N as u64,
        "each device saw A's chunks in B's topics and A's update in B's session, yet only \
         {rejected} messages were rejected: {run2}"
    );
    assert_eq!(
        run2["runningVersions"],
        serde_json::json!({"1.2.0": N}),
        "{run2}"
    );
    product.pass();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (c) A swapped device certificate.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_devices_ready_on_a_devices_topic_is_refused() -> Result<()> {
    let mut product = Product::new("mitm-cert", 5).await?;
    let m = product.manager_id.clone();
    let (y, x) = (product.device_ids[0].clone(), product.device_ids[4].clone());
    let rogue = Rogue::start(product.bed, &product.ns.name, &format!("iot/{m}/+/ready/+")).await?;
    let image = random_image(32 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    // X (the last device) stays offline for now: its session waits for its ready.
    product.start_emulator(&["--devices", "4"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({})),
    )?;
    let status = product
        .wait_campaign(
            "fw",
            "every online device done, X waiting",
            Duration::from_secs(90),
            |c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.devices.succeeded == 4 && s.devices.in_progress == 1)
            },
        )
        .await?
        .status
        .context("status")?;
    assert_eq!(status.devices.failed, 0, "{status:?}");
    let topics = TopicTree::new("iot", &m)?;
    let y_topic = topics.ready(&y);
    let y_ready = rogue
        .until("Y's signed ready", Duration::from_secs(10), |seen| {
            seen.iter()
                .find(|x| x.topic == y_topic && !x.payload.is_empty())
                .cloned()
        })
        .await?;

    // The broker presents Y's signed ready (Y's certificate) as X's: with Y's properties, and
    // with them stripped.
    let series = product.metrics().await?;
    let errors = "sealed_ota_operator_protocol_errors_total";
    let wrong_device = metric(&series, errors, Some("reason=\"wrong_device\""));
    let handshakes = metric(&series, "sealed_ota_operator_handshakes_total", None);
    assert_eq!(handshakes, 4.0, "one handshake per online device");
    // On X's own topic (its bucket), or the manager would not even read it as X's.
    let x_topic = topics.ready(&x);
    rogue
        .publish(
            &x_topic,
            y_ready.payload.clone(),
            false,
            y_ready.props.as_ref(),
        )
        .await?;
    rogue
        .publish(&x_topic, y_ready.payload.clone(), false, None)
        .await?;
    wait_for(
        "the manager refused Y's ready on X's topic",
        Duration::from_secs(15),
        || async {
            let now = metric(
                &product.metrics().await?,
                errors,
                Some("reason=\"wrong_device\""),
            );
            Ok((now >= wrong_device + 2.0).then_some(()))
        },
    )
    .await?;
    let series = product.metrics().await?;
    assert_eq!(
        metric(&series, "sealed_ota_operator_handshakes_total", None),
        handshakes,
        "the manager completed a handshake on Y's ready for X"
    );
    let x_cert = std::fs::read_to_string(product.device_dir(&x).join("cert.pem"))?;
    let y_cert = std::fs::read_to_string(product.device_dir(&y).join("cert.pem"))?;
    let (x_fp, y_fp) = (
        certificate_fingerprint(&x_cert)?,
        certificate_fingerprint(&y_cert)?,
    );
    assert_ne!(x_fp, y_fp);
    let devices = product.devices().await?;
    let xs = device(&devices, &x)?.status.clone().unwrap_or_default();
    assert_ne!(
        xs.certificate_fingerprint.as_deref(),
        Some(y_fp.as_str()),
        "X's Device status records Y's certificate"
    );
    assert!(
        xs.campaign
            .as_ref()
            .is_none_or(|c| !matches!(c.phase, DevicePhase::Succeeded | DevicePhase::Transferring)),
        "X went past the handshake on Y's word: {xs:?}"
    );
    let c = product.campaign("fw").await?.status.context("status")?;
    assert_eq!(
        (c.devices.succeeded, c.devices.in_progress, c.devices.failed),
        (4, 1, 0),
        "{c:?}"
    );
    assert!(
        !product.device_dir(&x).join("firmware.bin").exists(),
        "X installed something while offline"
    );

    // X comes online and completes with its own certificate.
    product.start_emulator(&[])?;
    let status = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, 5, "{status:?}");
    assert_all_hold(&product, &image, "the source image")?;
    let devices = product.devices().await?;
    let recorded = |id: &str| -> Result<Option<String>> {
        Ok(device(&devices, id)?
            .status
            .as_ref()
            .and_then(|s| s.certificate_fingerprint.clone()))
    };
    assert_eq!(
        recorded(&x)?.as_deref(),
        Some(x_fp.as_str()),
        "X's recorded certificate"
    );
    assert_eq!(
        recorded(&y)?.as_deref(),
        Some(y_fp.as_str()),
        "Y's recorded certificate"
    );
    product.pass();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (d) A downgrade.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downgrade_is_refused_with_not_newer_and_devices_keep_their_version() -> Result<()> {
    const N: u32 = 5;
    let mut product = Product::new("mitm-down", N).await?;
    let newer = random_image(32 * 1024);
    let older = random_image(32 * 1024);
    product.firmware_configmap("fw-newer", &newer).await?;
    product.firmware_configmap("fw-older", &older).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign(
        "up",
        product.firmware_spec("1.1.0", "fw-newer", serde_json::json!({})),
    )?;
    let status = product.finished("up", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_all_hold(&product, &newer, "1.1.0")?;

    // 1.0.5 is older than the 1.1.0 every device runs, and allowDowngrade is false. Up to 4
    // refusals are tolerated, so the campaign fails only once all 5 devices refused.
    product.apply_campaign(
        "down",
        product.firmware_spec(
            "1.0.5",
            "fw-older",
            serde_json::json!({"allowDowngrade": false, "rollout": {
                "maxInFlight": 50, "deviceTimeoutSeconds": 60, "retries": 2,
                "retryBackoffSeconds": 1, "failureThreshold": "4"}}),
        ),
    )?;
    let status = product.finished("down", Duration::from_secs(120)).await?;
    assert_eq!(status.phase, CampaignPhase::Failed, "{status:?}");
    // The failure details come from the Device statuses, written right after the refusals.
    let status = product
        .wait_campaign(
            "down",
            "every failure listed with its detail",
            Duration::from_secs(20),
            |c| {
                c.status.as_ref().is_some_and(|s| {
                    s.failures.len() == N as usize
                        && s.failures.iter().all(|f| f.message.contains("1.0.5"))
                })
            },
        )
        .await?
        .status
        .context("status")?;
    assert_eq!(
        (status.devices.succeeded, status.devices.failed),
        (0, N),
        "{status:?}"
    );
    assert_eq!(status.failures.len(), N as usize, "{status:?}");
    for f in &status.failures {
        assert_eq!(
            normalized(&f.reason),
            "notnewer",
            "failure of {} does not name NotNewer: {f:?}",
            f.device
        );
        assert!(
            f.message.contains("1.0.5") && f.message.contains("1.1.0"),
            "the failure message names neither the offered nor the running version: {f:?}"
        );
    }
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(
        condition("Failed"),
        Some(("True".into(), "FailureThresholdExceeded".into())),
        "{status:?}"
    );
    assert_eq!(
        condition("Ready").map(|(s, _)| s).as_deref(),
        Some("False"),
        "{status:?}"
    );

    // Events name the failure.
    let events = wait_for(
        "DeviceFailed and Failed Events",
        Duration::from_secs(15),
        || async {
            let events = product.events().await?;
            let has = |r: &str| events.iter().any(|(reason, _)| reason == r);
            Ok((has("DeviceFailed") && has("Failed")).then_some(events))
        },
    )
    .await?;
    assert!(
        events
            .iter()
            .any(|(r, msg)| r == "Failed" && msg.contains(&format!("{N} failed"))),
        "the Failed Event does not count the refusals: {events:?}"
    );

    // Each Device: still 1.1.0, last campaign failed with NotNewer (also on its Ready condition).
    let devices = product.devices().await?;
    for id in &product.device_ids {
        let s = device(&devices, id)?
            .status
            .clone()
            .context("device status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.1.0"), "{id}: {s:?}");
        let c = s.campaign.clone().context("device campaign")?;
        assert_eq!(
            (c.name.as_str(), c.phase),
            ("down", DevicePhase::Failed),
            "{id}: {s:?}"
        );
        assert_eq!(
            normalized(c.reason.as_deref().unwrap_or("")),
            "notnewer",
            "{id}: {s:?}"
        );
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .context("Ready")?;
        assert_eq!(ready.status, "False", "{id}: {s:?}");
        assert_eq!(normalized(&ready.reason), "notnewer", "{id}: {s:?}");
    }
    let series = product.metrics().await?;
    assert_eq!(
        metric(
            &series,
            "sealed_ota_operator_device_failures_total",
            Some("reason=\"NotNewer\"")
        ),
        f64::from(N),
        "device_failures_total{{reason=NotNewer}}"
    );
    assert_all_hold(
        &product,
        &newer,
        "the 1.1.0 image (nothing older installed)",
    )?;
    product.stop_emulator();
    let run = summary(&product, 1)?;
    assert_eq!(
        number(&run, "chunksReceived")?,
        u64::from(N) * 8,
        "devices fetched chunks of the refused downgrade: {run}"
    );
    assert_eq!(
        run["runningVersions"],
        serde_json::json!({"1.1.0": N}),
        "{run}"
    );
    product.pass();
    Ok(())
}
