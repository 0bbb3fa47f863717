//! End to end, as real processes: two operator replicas share the fleet in shards (`--shards 4`, a
//! Lease per shard), and the one that also coordinates (the holder of the leader Lease) is killed
//! (SIGKILL) in the middle of a campaign. The other takes its shards and the coordinator's part
//! once their Leases expire and finishes the campaign from what the resources record: every device
//! holds the image, none that was done before the kill installs again, and the surviving replica
//! ends up holding every shard's Lease. Runs on whatever broker the test bed
//! runs (on the rmqtt cluster each replica starts at another node). And two replicas sharing a
//! campaign keep its rollout policy: no shard starts a device before its maintenance window.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use sealed_ota_e2e::product::{random_image, unix_now, utc_clock, Product};
use sealed_ota_operator::crd::CampaignPhase;
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
    .await
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
