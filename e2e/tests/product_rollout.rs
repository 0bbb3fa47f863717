//! End to end, as real processes: the rollout is steered with spec fields through
//! `kubectl patch` (pause, resume, abort), as a person or a GitOps tool would, and a failure
//! threshold stops a campaign whose canaries fail before the rest of the fleet is touched.

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{random_image, Product};
use sealed_ota_operator::crd::{CampaignPhase, Device};

fn attempted(device: &Device, campaign: &str) -> bool {
    device
        .status
        .as_ref()
        .and_then(|s| s.campaign.as_ref())
        .is_some_and(|c| c.name == campaign && c.attempts > 0)
}

fn condition(c: &sealed_ota_operator::crd::UpdateCampaign, kind: &str) -> Option<String> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .find(|x| x.type_ == kind)
        .map(|x| x.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_resume_and_abort_with_kubectl_patch() -> Result<()> {
    let mut product = Product::new("steer", 8).await?;
    product
        .firmware_configmap("fw", &random_image(32 * 1024))
        .await?;
    product.start_operator()?;
    product.start_emulator(&["--fault", "slow:rate=8k"])?;
    // One device at a time, so pausing leaves most of the fleet untouched.
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
            "maxInFlight": 1, "deviceTimeoutSeconds": 60}}),
        ),
    )?;
    product
        .wait_campaign("fw", "first device started", Duration::from_secs(60), |c| {
            c.status.as_ref().is_some_and(|s| s.devices.in_progress > 0)
        })
        .await?;
    product.patch_spec("fw", serde_json::json!({"paused": true}))?;
    let paused = product
        .wait_campaign("fw", "phase Paused", Duration::from_secs(60), |c| {
            c.status.as_ref().map(|s| s.phase) == Some(CampaignPhase::Paused)
        })
        .await?;
    assert_eq!(condition(&paused, "Paused").as_deref(), Some("True"));
    // While paused, no new device starts: the in-flight one may finish, nothing more. (Counted
    // from the campaign's status: a Device's status is written once, with its final outcome.)
    let started = |c: &sealed_ota_operator::crd::UpdateCampaign| {
        c.status
            .as_ref()
            .map_or(0, |s| s.devices.selected - s.devices.pending)
    };
    let started_at_pause = started(&paused);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let started_later = started(&product.campaign("fw").await?);
    assert_eq!(
        started_later, started_at_pause,
        "devices started while the campaign was paused"
    );
    assert!(
        started_later < 8,
        "the whole fleet started before the pause took effect"
    );

    product.patch_spec("fw", serde_json::json!({"paused": false}))?;
    product
        .wait_campaign(
            "fw",
            "more devices after resume",
            Duration::from_secs(90),
            |c| {
                c.status.as_ref().is_some_and(|s| {
                    s.phase == CampaignPhase::Progressing
                        && (s.devices.succeeded + s.devices.in_progress) > started_later
                })
            },
        )
        .await?;

    product.patch_spec("fw", serde_json::json!({"abort": true}))?;
    let aborted = product
        .wait_campaign("fw", "phase Aborted", Duration::from_secs(60), |c| {
            c.status.as_ref().map(|s| s.phase) == Some(CampaignPhase::Aborted)
        })
        .await?;
    let status = aborted.status.context("status")?;
    assert!(
        status.devices.succeeded < 8,
        "the abort came after the end: {status:?}"
    );
    // Abort cannot be undone: the apiserver refuses it, naming the field.
    let err = product
        .patch_spec("fw", serde_json::json!({"abort": false}))
        .expect_err("un-aborting must be refused");
    assert!(err.to_string().contains("spec.abort"), "{err}");
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_canaries_stop_the_campaign_before_the_fleet() -> Result<()> {
    let mut product = Product::new("canary", 8).await?;
    product
        .firmware_configmap("fw", &random_image(16 * 1024))
        .await?;
    product.start_operator()?;
    // Every device refuses this update (a signed refusal): the canaries fail.
    product.start_emulator(&["--fault", "refuse:reason=battery-low"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
            "canary": "2", "waveSize": "3", "maxInFlight": 8, "failureThreshold": "1",
            "deviceTimeoutSeconds": 30, "retries": 0}}),
        ),
    )?;
    let failed = product
        .wait_campaign("fw", "campaign finished", Duration::from_secs(120), |c| {
            c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await?;
    let status = failed.status.clone().context("status")?;
    assert_eq!(status.phase, CampaignPhase::Failed, "{status:?}");
    assert_eq!(condition(&failed, "Failed").as_deref(), Some("True"));
    assert!(
        !status.failures.is_empty(),
        "the failures list names the devices"
    );
    assert!(
        status
            .failures
            .iter()
            .any(|f| f.message.contains("battery-low")
                || f.reason.to_lowercase().contains("declin")
                || f.reason.to_lowercase().contains("reject")),
        "the device's signed reason is reported: {:?}",
        status.failures
    );
    let touched = product
        .devices()
        .await?
        .iter()
        .filter(|d| attempted(d, "fw"))
        .count();
    assert!(
        touched <= 2,
        "{touched} devices were attempted; only the 2 canaries should be"
    );
    product.pass();
    Ok(())
}
