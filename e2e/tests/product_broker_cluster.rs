//! End to end, as real processes, on the rmqtt Raft cluster of the test bed (`e2e/testbed up
//! --broker rmqtt-cluster`; `make e2e-cluster`, part of `make test`, and `make interop` run these):
//! the devices spread over the three nodes, the operator on node 1 first, and a broker node is
//! killed (SIGKILL) in the middle of a campaign. The campaign still finishes, every device holds the
//! source image, and no device that was done before the kill installs again. The tests are
//! `#[ignore]`d so that the e2e run on Mosquitto does not count them as passed; on any other broker
//! they fail, saying why.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sealed_ota_e2e::product::{random_image, Product};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::crd::CampaignPhase;

/// One node loss at a time: two at once would leave the Raft cluster without a quorum.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Restarts the killed node when the test ends, passed or not, so later tests see three nodes.
struct NodeBack<'a> {
    bed: &'a TestBed,
    node: &'a str,
}

impl Drop for NodeBack<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.bed.script(&["node", "start", self.node]) {
            eprintln!("could not restart rmqtt node {}: {e:#}", self.node);
        }
    }
}

fn cluster() -> Result<&'static TestBed> {
    let bed = TestBed::get()?;
    if bed.broker != "rmqtt-cluster" || bed.mqtts_urls.len() < 3 {
        bail!(
            "this test needs the rmqtt cluster (e2e/testbed up --broker rmqtt-cluster, or make \
             interop); the test bed runs {} with {} node(s)",
            bed.broker,
            bed.mqtts_urls.len()
        );
    }
    Ok(bed)
}

/// Kills node `node` once some devices are done, keeps it down while the campaign runs, and checks
/// that the campaign completes without losing or reinstalling anything.
async fn campaign_survives_losing_node(node: &str, restart_after: Option<Duration>) -> Result<()> {
    let bed = cluster()?;
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut product = Product::new(&format!("nodekill{node}"), 12).await?;
    assert_eq!(
        product.device_broker_urls.split(',').count(),
        3,
        "the devices are spread over the three nodes"
    );
    let image = random_image(96 * 1024);
    product.firmware_configmap("fw", &image).await?;
    product.start_operator()?;
    // A slow link keeps transfers going while the node dies.
    product.start_emulator(&["--fault", "slow:rate=24k", "--window", "2"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec("1.1.0", "fw", serde_json::json!({"rollout": {
            "maxInFlight": 12, "deviceTimeoutSeconds": 60, "retries": 3, "retryBackoffSeconds": 1}})),
    )?;
    product
        .wait_campaign("fw", "transfer under way", Duration::from_secs(120), |c| {
            c.status.as_ref().is_some_and(|s| s.devices.in_progress > 0)
        })
        .await?;
    let done_before = product.done_devices().await?;
    bed.script(&["node", "kill", node])?;
    let back = NodeBack { bed, node };
    if let Some(after) = restart_after {
        tokio::time::sleep(after).await;
        drop(back);
    }
    let finished = product
        .wait_campaign("fw", "campaign finished", Duration::from_secs(300), |c| {
            c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await?;
    let status = finished.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, 12, "{status:?}");
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image"))?;
        assert!(installed == image, "{id}: installed image differs");
    }
    for (id, modified) in &done_before {
        let now = std::fs::metadata(product.device_dir(id).join("firmware.bin"))?.modified()?;
        assert_eq!(&now, modified, "{id} installed again after the node loss");
    }
    product.stop_emulator();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(product.dir.join("emulator-1.json"))?)?;
    // The devices of the killed node reconnected (to the next node).
    assert!(
        summary["connectAttempts"].as_u64().unwrap_or(0) > 12,
        "no device reconnected after the node was killed: {summary}"
    );
    assert_eq!(summary["outcomes"]["installed"], 12, "{summary}");
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the rmqtt cluster: make e2e-cluster (e2e/testbed up --broker rmqtt-cluster)"]
async fn a_device_node_killed_mid_campaign_its_devices_move_on() -> Result<()> {
    // Node 2 serves a third of the devices and not the operator; it stays down until the end.
    campaign_survives_losing_node("2", None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the rmqtt cluster: make e2e-cluster (e2e/testbed up --broker rmqtt-cluster)"]
async fn the_leader_and_operator_node_killed_and_restarted_mid_campaign() -> Result<()> {
    // Node 1 is the first Raft leader and the first node of the operator's list: the operator and
    // node 1's devices move on to the next node.
    campaign_survives_losing_node("1", Some(Duration::from_secs(5))).await
}
