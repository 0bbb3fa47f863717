//! End to end, as real processes (the operator and emulator binaries against the test bed): the
//! rollout policy of issue 15. An honest outcome (a campaign whose devices failed never reads
//! `Succeeded`), maintenance windows, rate and ramp, health gates, the plan of a dry run, one
//! campaign per device, and devices that join or leave a running campaign. Time is the test's:
//! windows of a few seconds, timeouts of a few seconds, never a long sleep.

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{random_image, Product};
use sealed_ota_operator::crd::{CampaignPhase, UpdateCampaign};

fn condition<'a>(c: &'a UpdateCampaign, kind: &str) -> Option<(&'a str, &'a str)> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .find(|x| x.type_ == kind)
        .map(|x| (x.status.as_str(), x.reason.as_str()))
}

/// Issue 15, item 0, as a new user met it: five devices, no failure threshold, every device
/// times out (none is online). The campaign used to end `Succeeded` with PROGRESS 5/5; it must
/// end `Completed` with `Degraded=True` (reason `DevicesFailed`), `Ready=False`, `Stalled=True`,
/// and `kubectl get` must show succeeded, failed and total apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_campaign_whose_devices_all_timed_out_completes_degraded_never_succeeded() -> Result<()> {
    let mut product = Product::new("honest", 5).await?;
    product
        .firmware_configmap("fw", &random_image(8 * 1024))
        .await?;
    product.start_operator()?;
    // No emulator: every device stays offline, so every attempt times out.
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {"maxInFlight": 5, "deviceTimeoutSeconds": 5,
                                           "retries": 0}}),
        ),
    )?;
    let status = product.finished("fw", Duration::from_secs(90)).await?;
    let c = product.campaign("fw").await?;
    assert_eq!(status.phase, CampaignPhase::Completed, "{status:?}");
    assert_eq!(
        (status.devices.succeeded, status.devices.failed),
        (0, 5),
        "{status:?}"
    );
    assert_eq!(condition(&c, "Ready"), Some(("False", "DevicesFailed")));
    assert_eq!(condition(&c, "Degraded"), Some(("True", "DevicesFailed")));
    assert_eq!(condition(&c, "Stalled"), Some(("True", "DevicesFailed")));
    assert_eq!(
        condition(&c, "Failed").map(|c| c.0),
        Some("False"),
        "no threshold was exceeded"
    );
    assert!(
        status.failures.iter().all(|f| f.reason == "Timeout") && status.failures.len() == 5,
        "{:?}",
        status.failures
    );
    // The printer columns say it apart: PHASE Completed, SUCCEEDED 0, FAILED 5, TOTAL 5.
    let table = product.kubectl(&["get", "updatecampaign", "fw"])?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().context("header")?.split_whitespace().collect();
    let row: Vec<&str> = lines.next().context("row")?.split_whitespace().collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| row.get(i).copied())
    };
    assert_eq!(column("PHASE"), Some("Completed"), "{table}");
    assert_eq!(column("SUCCEEDED"), Some("0"), "{table}");
    assert_eq!(column("FAILED"), Some("5"), "{table}");
    assert_eq!(column("TOTAL"), Some("5"), "{table}");
    // A Warning Event says the campaign ended with failed devices.
    let events = product.events().await?;
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "Completed" && note.contains("5 failed")),
        "{events:?}"
    );
    product.pass();
    Ok(())
}
