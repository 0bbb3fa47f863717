//! End to end, as real processes, when things break mid-campaign: devices that drop offline
//! resume where they stopped; the broker killed (SIGKILL) and restarted; the operator killed and
//! restarted — and each campaign still completes, without redoing devices already done.

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{random_image, PrivateBroker, Product};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::crd::CampaignPhase;

fn assert_all_hold(product: &Product, image: &[u8]) -> Result<()> {
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image"))?;
        assert!(
            installed == image,
            "{id}: installed image differs from the source"
        );
    }
    Ok(())
}

async fn finished(product: &Product, name: &str, timeout: Duration) -> Result<CampaignPhase> {
    let c = product
        .wait_campaign(name, "campaign finished", timeout, |c| {
            c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await?;
    Ok(c.status.context("status")?.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_offline_mid_transfer_resume_when_back() -> Result<()> {
    let mut product = Product::new("offline", 8).await?;
    let image = random_image(96 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    // Half the fleet drops its connection after 5 chunks and comes back 4 s later.
    product.start_emulator(&["--fault", "offline:after=5,for=4s@50%", "--window", "2"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({})),
    )?;
    assert_eq!(
        finished(&product, "fw", Duration::from_secs(180)).await?,
        CampaignPhase::Succeeded
    );
    assert_all_hold(&product, &image)?;
    product.stop_emulator();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(product.dir.join("emulator-1.json"))?)?;
    assert!(
        summary["connectAttempts"].as_u64().unwrap_or(0) >= 8 + 4,
        "the offline devices did reconnect: {summary}"
    );
    // Resumed, not restarted: 24 chunks per device, and no device fetched the image twice.
    let chunks = summary["chunksReceived"]
        .as_u64()
        .context("chunksReceived")?;
    assert!(
        chunks < 2 * 8 * 24,
        "devices re-fetched whole images: {chunks} chunks for 8 x 24"
    );
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_killed_and_restarted_mid_campaign() -> Result<()> {
    let bed = TestBed::get()?;
    let run =
        sealed_ota_e2e::repo_root().join(format!("target/e2e-runs/broker-{}", std::process::id()));
    let mut broker = PrivateBroker::start(bed, &run.join("mosquitto"))?;
    let mut product = Product::with_broker("brokerkill", 6, broker.url()).await?;
    let image = random_image(128 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    // A slow link keeps the transfer going long enough to kill the broker in the middle.
    product.start_emulator(&["--fault", "slow:rate=16k", "--window", "2"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({})),
    )?;
    product
        .wait_campaign("fw", "transfer under way", Duration::from_secs(60), |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.devices.in_progress > 0 || s.devices.succeeded > 0)
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart()?;
    assert_eq!(
        finished(&product, "fw", Duration::from_secs(240)).await?,
        CampaignPhase::Succeeded
    );
    assert_all_hold(&product, &image)?;
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_killed_mid_campaign_finishes_without_redoing_devices() -> Result<()> {
    let mut product = Product::new("opkill", 10).await?;
    let image = random_image(64 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    product.start_emulator(&["--fault", "slow:rate=24k@50%"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({"rollout": {
            "maxInFlight": 10, "deviceTimeoutSeconds": 60, "retries": 3, "retryBackoffSeconds": 1}})),
    )?;
    product
        .wait_campaign("fw", "some devices done", Duration::from_secs(120), |c| {
            c.status.as_ref().is_some_and(|s| s.devices.succeeded >= 2)
        })
        .await?;
    product.kill_operator();

    // What was done when the operator died: recorded on the Devices, installed on disk.
    let done_before = product.done_devices().await?;
    assert!(
        !done_before.is_empty(),
        "no device was recorded as done before the kill"
    );

    product.start_operator()?;
    assert_eq!(
        finished(&product, "fw", Duration::from_secs(180)).await?,
        CampaignPhase::Succeeded
    );
    assert_all_hold(&product, &image)?;
    for (id, modified) in &done_before {
        let now = std::fs::metadata(product.device_dir(id).join("firmware.bin"))?.modified()?;
        assert_eq!(
            &now, modified,
            "{id} was updated again after the operator restarted"
        );
    }
    let attempts: Vec<u32> = product
        .devices()
        .await?
        .iter()
        .filter(|d| done_before.contains_key(d.metadata.name.as_deref().unwrap_or_default()))
        .filter_map(|d| d.status.as_ref()?.campaign.as_ref().map(|c| c.attempts))
        .collect();
    assert!(
        attempts.iter().all(|&a| a == 1),
        "done devices were retried: {attempts:?}"
    );
    product.pass();
    Ok(())
}
