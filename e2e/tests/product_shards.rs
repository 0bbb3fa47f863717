//! End to end, as real processes: two operator replicas share the fleet in shards (`--shards 4`, a
//! Lease per shard), and the one that also coordinates (the holder of the leader Lease) is killed
//! (SIGKILL) in the middle of a campaign. The other takes its shards and the coordinator's part
//! once their Leases expire and finishes the campaign from what the resources record: every device
//! holds the image, none that was done before the kill installs again, and the surviving replica
//! ends up holding every shard's Lease. Runs on whatever broker the test bed
//! runs (on the rmqtt cluster each replica starts at another node). And two replicas sharing a
//! campaign keep its rollout policy: no shard starts a device before its maintenance window, a
//! gate holds the next wave on every shard until it passes, a dry run plans every shard's devices,
//! and devices that leave the selection are released.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use sealed_ota_e2e::product::{random_image, unix_now, utc_clock, Product};
use sealed_ota_operator::crd::{CampaignPhase, UpdateCampaignStatus};
use sealed_ota_operator::shards::{bucket_of, BUCKET_LABEL};

const DEVICES: u32 = 24;

async fn leader_of(product: &mut Product) -> Result<usize> {
    for _ in 0..150 {
        for i in 0..2 {
            let addr = product.replica_metrics_addr(i)?;
            let url = format!("http://{addr}/metrics");
            if let Ok(text) = sealed_ota_e2e::http::get(&url).await {
                let leader = sealed_ota_e2e::http::metric_sum(&text, "sealed_ota_operator_leader");
                if leader == 1.0 {
                    return Ok(i);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no replica became the coordinator within 30 s")
}

async fn metric_of(product: &mut Product, i: usize, name: &str) -> Result<f64> {
    let addr = product.replica_metrics_addr(i)?;
    let text = sealed_ota_e2e::http::get(&format!("http://{addr}/metrics")).await?;
    Ok(sealed_ota_e2e::http::metric_sum(&text, name))
}

/// Devices' messages replica `i` received of the shards it holds (`held`) or does not.
async fn inbound_of(product: &mut Product, i: usize, held: bool) -> Result<f64> {
    let addr = product.replica_metrics_addr(i)?;
    let text = sealed_ota_e2e::http::get(&format!("http://{addr}/metrics")).await?;
    let series =
        format!("sealed_ota_operator_mqtt_inbound_messages_total{{shard_held=\"{held}\"}}");
    let samples = sealed_ota_e2e::http::samples(&text);
    Ok(samples
        .iter()
        .filter(|(k, _)| *k == series)
        .map(|(_, v)| v)
        .sum())
}

/// Start two replicas sharing `--shards 4` and wait until the coordinator labelled every Device
/// with its bucket (so that its shard's reflector sees it).
async fn start_two_replicas(product: &mut Product) -> Result<()> {
    product.operator_args = vec!["--shards".into(), "4".into()];
    product.start_replica(0)?;
    product.start_replica(1)?;
    let ids = product.device_ids.clone();
    sealed_ota_e2e::wait_for(
        "every Device labelled with its bucket",
        Duration::from_secs(60),
        || {
            let product = &product;
            let ids = &ids;
            async move {
                let devices = product.devices().await?;
                let labelled = devices.iter().all(|d| {
                    let id = d.metadata.name.clone().unwrap_or_default();
                    d.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(BUCKET_LABEL))
                        .is_some_and(|b| *b == bucket_of(&id).to_string())
                });
                Ok((labelled && devices.len() == ids.len()).then_some(()))
            }
        },
    )
    .await?;
    // And until both replicas hold shards (a state that lasts): before, the first replica may
    // hold every shard and run a short campaign alone.
    for _ in 0..300 {
        let mut both = true;
        for i in 0..2 {
            let held = metric_of(product, i, "sealed_ota_operator_shards_held").await;
            both &= held.is_ok_and(|h| h >= 1.0);
        }
        if both {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("both replicas did not hold shards within 60 s")
}

/// The replicas that reported a shard of the campaign, as its status names them.
fn holders(c: &sealed_ota_operator::crd::UpdateCampaign) -> std::collections::BTreeSet<String> {
    c.status
        .iter()
        .flat_map(|s| &s.shards)
        .filter_map(|a| a.holder.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_s_shards_and_coordination_are_taken_over_mid_campaign() -> Result<()> {
    let mut product = Product::new("shards", DEVICES).await?;
    let image = random_image(96 * 1024);
    product.firmware_configmap("fw", &image).await?;
    start_two_replicas(&mut product).await?;
    // A slow link (about 4 s a device) and a third of the devices in flight at a time (2 a shard,
    // 3 rounds) keep the campaign half done for many seconds: with every device in flight at once
    // they all finished together and the status never showed "some done, others in flight".
    product.start_emulator(&["--fault", "slow:rate=24k", "--window", "2"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({"rollout": {
            "maxInFlight": DEVICES / 3, "deviceTimeoutSeconds": 60, "retries": 3, "retryBackoffSeconds": 1}})),
    )?;
    let running = product
        .wait_campaign(
            "fw",
            "some devices done, others in flight",
            Duration::from_secs(180),
            |c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.devices.succeeded >= 2 && s.devices.in_progress >= 2)
            },
        )
        .await?;
    // Both replicas hold shards and drive their devices.
    let holders = holders(&running);
    assert_eq!(
        holders.len(),
        2,
        "the shards are split over both replicas: {holders:?}"
    );
    for i in 0..2 {
        let held = metric_of(&mut product, i, "sealed_ota_operator_shards_held").await?;
        assert!(held >= 1.0, "replica {i} holds {held} shards");
    }
    // Per-shard subscriptions: the broker delivers each replica its own shards' devices' messages
    // only (every replica subscribed to every device's before).
    for i in 0..2 {
        let (mine, others) = (
            inbound_of(&mut product, i, true).await?,
            inbound_of(&mut product, i, false).await?,
        );
        assert!(
            mine > 0.0 && others == 0.0,
            "replica {i} received {mine} messages of its shards and {others} of others'"
        );
    }
    let done_before = product.done_devices().await?;
    let victim = leader_of(&mut product).await?;
    let survivor = 1 - victim;
    product.kill_replica(victim);
    let finished = product
        .wait_campaign("fw", "campaign finished", Duration::from_secs(300), |c| {
            c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await?;
    let status = finished.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, DEVICES, "{status:?}");
    // The survivor takes every shard Lease once the victim's expire. (`status.shards` names the
    // replica that last reported a shard: a shard the victim finished before it died keeps its name.)
    let survivor_id = format!("{}-r{survivor}", product.ns.name);
    let leases: Api<Lease> = Api::namespaced(product.ns.client.clone(), &product.ns.name);
    sealed_ota_e2e::wait_for(
        "the survivor holds every shard Lease",
        Duration::from_secs(60),
        || {
            let leases = &leases;
            let survivor_id = &survivor_id;
            async move {
                let mut all = true;
                for k in 0..4 {
                    let name = format!("sealed-ota-operator-shard-{k}-of-4");
                    let holder = leases
                        .get_opt(&name)
                        .await?
                        .and_then(|l| l.spec)
                        .and_then(|s| s.holder_identity);
                    all &= holder.as_deref() == Some(survivor_id.as_str());
                }
                Ok(all.then_some(()))
            }
        },
    )
    .await?;
    assert!(
        status
            .shards
            .iter()
            .any(|a| a.holder.as_deref() == Some(survivor_id.as_str())),
        "the survivor reported shards: {:?}",
        status.shards
    );
    assert_eq!(
        status.shards.iter().map(|a| a.selected).sum::<u32>(),
        DEVICES
    );
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image"))?;
        assert!(installed == image, "{id}: installed image differs");
    }
    for (id, modified) in &done_before {
        let now = std::fs::metadata(product.device_dir(id).join("firmware.bin"))?.modified()?;
        assert_eq!(&now, modified, "{id} installed again after the hand-over");
    }
    // One Device status write per device: the killed replica's unwritten outcomes were written by
    // the survivor (resumed devices answer a new session with a fresh receipt).
    for d in product.devices().await? {
        let record = d.status.and_then(|s| s.campaign).context("record")?;
        assert_eq!(
            record.uid,
            finished.metadata.uid.clone().unwrap_or_default()
        );
        assert!(record.receipt.is_some(), "{:?}", d.metadata.name);
    }
    product.stop_emulator();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(product.dir.join("emulator-1.json"))?)?;
    assert_eq!(summary["outcomes"]["installed"], DEVICES, "{summary}");
    product.pass();
    Ok(())
}

/// Issue 16 with issue 15: two replicas share a campaign with a maintenance window (and a rate)
/// through the same policy step as one replica. Until the window opens no shard starts a device
/// (no Device records the campaign); once it opens, both replicas drive their shards' devices and
/// the campaign succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_start_no_device_before_the_maintenance_window() -> Result<()> {
    const FLEET: u32 = 8;
    let mut product = Product::new("shardwin", FLEET).await?;
    product
        .firmware_configmap("fw", &random_image(16 * 1024))
        .await?;
    start_two_replicas(&mut product).await?;
    product.start_emulator(&[])?;
    let open = unix_now() + 20;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({
                "rollout": {"maxInFlight": FLEET, "deviceTimeoutSeconds": 60, "maxPerMinute": 60},
                "schedule": {"windows": [{"start": utc_clock(open), "duration": "120s"}]},
            }),
        ),
    )?;
    // Every shard reports its devices waiting for the window (added up by the coordinator).
    product
        .wait_campaign(
            "fw",
            "the shards report the window",
            Duration::from_secs(open.saturating_sub(unix_now() + 2)),
            |c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.devices.outside_window == FLEET)
            },
        )
        .await?;
    // Until the window opens, no device is touched.
    product.untouched_until("fw", open).await?;
    let done = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert_eq!(done.devices.succeeded, FLEET, "{done:?}");
    let c = product.campaign("fw").await?;
    assert_eq!(
        holders(&c).len(),
        2,
        "both replicas drove shards: {:?}",
        done.shards
    );
    assert!(
        unix_now() >= open,
        "the campaign finished before its window opened"
    );
    product.pass();
    Ok(())
}

fn status_of(c: &sealed_ota_operator::crd::UpdateCampaign) -> UpdateCampaignStatus {
    c.status.clone().unwrap_or_default()
}

/// Issue 16 with issue 15's gates: two replicas share a campaign whose canary (2 devices, spread
/// over the shards by the coordinator) is followed by a gate (device health, then a manual
/// promotion). The coordinator judges the gate on every shard's health reports and holds the next
/// wave on every shard: nothing but the canary is touched while it waits (a state that lasts until
/// the promotion, so the check cannot race), and the promotion lets every shard finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gate_holds_the_next_wave_on_every_shard_until_promoted() -> Result<()> {
    const FLEET: u32 = 8;
    let mut product = Product::new("shardgate", FLEET).await?;
    product
        .firmware_configmap("fw", &random_image(8 * 1024))
        .await?;
    start_two_replicas(&mut product).await?;
    product.start_emulator(&["--health-report-after", "1s"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
                "canary": "2", "maxInFlight": FLEET, "deviceTimeoutSeconds": 60,
                "gate": {"soakSeconds": 6, "manual": true,
                         "deviceHealth": {"minHealthyPercent": 100}}}}),
        ),
    )?;
    let waiting = product
        .wait_campaign(
            "fw",
            "the gate waits for the promotion",
            Duration::from_secs(120),
            |c| {
                status_of(c)
                    .gate
                    .is_some_and(|g| g.state == "WaitingForPromotion")
            },
        )
        .await?;
    let s = status_of(&waiting);
    let gate = s.gate.clone().context("gate")?;
    assert_eq!(gate.wave, 0, "{gate:?}");
    assert_eq!(
        gate.healthy.as_deref(),
        Some("2/2"),
        "health over every shard: {gate:?}"
    );
    assert_eq!(s.waiting.as_ref().map(|w| w.reason.as_str()), Some("Gate"));
    assert_eq!((s.current_wave, s.devices.succeeded), (0, 2), "{s:?}");
    assert_eq!(s.phase, CampaignPhase::Progressing);
    // The gate holds for as long as nobody promotes: still only the canary, seconds later.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let touched = product.touched("fw").await?;
    assert_eq!(touched.len(), 2, "only the canary: {touched:?}");
    let held = status_of(&product.campaign("fw").await?);
    assert_eq!(
        (
            held.current_wave,
            held.devices.succeeded,
            held.devices.in_progress
        ),
        (0, 2, 0),
        "{held:?}"
    );
    assert!(
        held.shards.iter().all(|a| a.max_in_flight == 0),
        "no shard may start: {:?}",
        held.shards
    );
    product.patch_spec("fw", serde_json::json!({"promoteThroughWave": 0}))?;
    let done = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert_eq!(done.devices.succeeded, FLEET, "{done:?}");
    assert_eq!(
        done.gate.map(|g| g.passed_waves),
        Some(1),
        "promoted past the canary"
    );
    product.pass();
    Ok(())
}

/// Issue 16 with issue 15's dry run: with two replicas the plan in the campaign's status counts
/// every shard's devices (the coordinator adds up the shards' plans, cut by the campaign's
/// waves), names the device the policy leaves out, and nothing starts; turning the dry run off
/// runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_with_two_replicas_plans_every_shard_s_devices() -> Result<()> {
    const FLEET: u32 = 8;
    let mut product = Product::new("sharddry", FLEET).await?;
    let image = random_image(16 * 1024);
    product.firmware_configmap("fw", &image).await?;
    let unpinned = product.device_ids[5].clone();
    product.kubectl(&[
        "patch",
        "device",
        &unpinned,
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/certificateFingerprint"}]"#,
    ])?;
    start_two_replicas(&mut product).await?;
    product.start_emulator(&[])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"dryRun": true, "requireCertificatePin": true,
                "rollout": {"canary": "2", "waveSize": "3",
                            "maxInFlight": FLEET, "deviceTimeoutSeconds": 60}}),
        ),
    )?;
    let planned = product
        .wait_campaign(
            "fw",
            "planned over every shard",
            Duration::from_secs(90),
            |c| {
                let s = status_of(c);
                s.phase == CampaignPhase::Planned
                    && s.plan.as_ref().is_some_and(|p| {
                        p.devices == FLEET - 1
                            && p.estimated_broker_bytes.is_some()
                            && p.waves.iter().map(|w| w.size).sum::<u32>() == FLEET - 1
                    })
            },
        )
        .await?;
    let s = status_of(&planned);
    let plan = s.plan.clone().context("plan")?;
    assert_eq!(plan.waves.len(), 3, "canary 2, then waves of 3: {plan:?}");
    assert_eq!(plan.excluded.len(), 1, "{plan:?}");
    assert_eq!(
        (plan.excluded[0].reason.as_str(), plan.excluded[0].count),
        ("NoCertificatePin", 1)
    );
    assert_eq!(plan.excluded[0].devices, vec![unpinned.clone()]);
    assert!(
        plan.estimated_broker_bytes.context("estimate")? > image.len() as u64,
        "{plan:?}"
    );
    assert_eq!(s.devices.selected, FLEET, "{s:?}");
    assert_eq!(
        s.shards.iter().map(|a| a.selected).sum::<u32>(),
        FLEET,
        "{:?}",
        s.shards
    );
    assert_eq!(
        s.expires_at, None,
        "a dry run does not start the manifests' clock"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        product.touched("fw").await?.is_empty(),
        "a dry run touched a device"
    );
    let still = status_of(&product.campaign("fw").await?);
    assert_eq!(
        (still.phase, still.devices.in_progress),
        (CampaignPhase::Planned, 0)
    );

    product.patch_spec("fw", serde_json::json!({"dryRun": false}))?;
    let done = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(done.phase, CampaignPhase::Completed, "{done:?}");
    assert_eq!(
        (done.devices.succeeded, done.devices.excluded),
        (FLEET - 1, 1),
        "{done:?}"
    );
    assert!(!product.touched("fw").await?.contains(&unpinned));
    product.pass();
    Ok(())
}

/// Issue 16 with issue 15's joiners and leavers: with two replicas, a device that stops matching
/// the selector while its shard updates it is released (its session ended with the signed abort,
/// its Device status says Released) and one that starts matching joins; the coordinator adds the
/// shards' counts up. One device in flight at a time over a slow link (about 16 s a device) keeps
/// the first device in flight long after the test has seen it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_replicas_leavers_are_released_and_joiners_join() -> Result<()> {
    let mut product = Product::new("shardmembers", 5).await?;
    product
        .firmware_configmap("fw", &random_image(32 * 1024))
        .await?;
    let ids = product.device_ids.clone();
    for id in &ids[..4] {
        product.kubectl(&["label", "device", id, "ring=a"])?;
    }
    start_two_replicas(&mut product).await?;
    product.start_emulator(&["--fault", "slow:rate=2k"])?;
    let mut spec = product.firmware_spec(
        "1.1.0",
        "fw",
        serde_json::json!({"rollout": {"maxInFlight": 1, "deviceTimeoutSeconds": 120}}),
    );
    spec["selector"] = serde_json::json!({"matchLabels": {"ring": "a"}});
    product.apply_campaign("fw", spec)?;
    let flying = product
        .wait_campaign(
            "fw",
            "the first device in flight",
            Duration::from_secs(60),
            |c| status_of(c).devices.in_progress == 1,
        )
        .await?;
    // The device in flight: the first (by name) of the shard allowed one in flight.
    let shards = sealed_ota_operator::shards::ShardCount::new(4)?;
    let shard = status_of(&flying)
        .shards
        .iter()
        .find(|a| a.max_in_flight == 1)
        .map(|a| a.shard)
        .context("a shard with a device in flight")?;
    let mut candidates: Vec<&String> = ids[..4]
        .iter()
        .filter(|id| shards.of_device(id) == shard)
        .collect();
    candidates.sort();
    let leaver = candidates[0].clone();
    product.kubectl(&["label", "device", &leaver, "ring-"])?;
    product.kubectl(&["label", "device", &ids[4], "ring=a"])?;
    let done = product.finished("fw", Duration::from_secs(240)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert_eq!(done.devices.selected, 4, "{done:?}");
    assert_eq!((done.devices.joined, done.devices.left), (1, 1), "{done:?}");
    let record = product
        .devices()
        .await?
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some(leaver.as_str()))
        .and_then(|d| d.status)
        .and_then(|s| s.campaign)
        .context("the leaver's campaign record")?;
    assert_eq!(
        record.phase,
        sealed_ota_operator::crd::DevicePhase::Released,
        "{record:?}"
    );
    assert!(product.touched("fw").await?.contains(&ids[4]));
    product.pass();
    Ok(())
}
