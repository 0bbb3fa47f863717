//! End to end, as real processes (the operator and emulator binaries against the test bed): the
//! rollout policy of issue 15. An honest outcome (a campaign whose devices failed never reads
//! `Succeeded`), maintenance windows, rate and ramp, health gates, the plan of a dry run, one
//! campaign per device, and devices that join or leave a running campaign. Time is the test's:
//! windows of a few seconds, timeouts of a few seconds, never a long sleep.

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{random_image, unix_now as now, utc_clock, Product};
use sealed_ota_e2e::wait_for;
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

/// RFC 3339 of a Unix time, as the apiserver writes times.
fn rfc3339(t: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(t as i64)
        .unwrap()
        .to_string()
}

fn unix(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> u64 {
    t.0.as_second() as u64
}

fn status(c: &UpdateCampaign) -> sealed_ota_operator::crd::UpdateCampaignStatus {
    c.status.clone().unwrap_or_default()
}

/// Issue 15, item 1: a maintenance window of a few seconds. Nothing starts before it opens (the
/// status says what it waits for and when); devices in flight when it closes finish; a device
/// whose own time zone puts the window at another hour, after the deadline, is left out
/// (`Completed`, reason `DevicesExcluded`, the plan says `OutsideEveryWindow`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_start_only_inside_their_window_and_the_deadline_ends_the_rest() -> Result<()> {
    let mut product = Product::new("window", 4).await?;
    product
        .firmware_configmap("fw", &random_image(64 * 1024))
        .await?;
    let far = product.device_ids[3].clone();
    product.kubectl(&[
        "patch",
        "device",
        &far,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"maintenance":{"timeZone":"Pacific/Kiritimati"}}}"#,
    ])?;
    product.start_operator()?;
    // 64 KiB at 8 KiB/s: each transfer takes about 8 s, longer than the window.
    product.start_emulator(&["--fault", "slow:rate=8k"])?;
    let open = now() + 15;
    let deadline = open + 35;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({
                "rollout": {"maxInFlight": 4, "deviceTimeoutSeconds": 60, "retries": 0},
                "schedule": {"deadline": rfc3339(deadline),
                             "windows": [{"start": utc_clock(open), "duration": "5s"}]},
            }),
        ),
    )?;
    let waiting = product
        .wait_campaign(
            "fw",
            "waiting for the window",
            Duration::from_secs(30),
            |c| {
                status(c)
                    .waiting
                    .is_some_and(|w| w.reason == "OutsideWindow")
            },
        )
        .await?;
    let s = status(&waiting);
    let w = s.waiting.clone().context("waiting")?;
    assert_eq!(w.until.as_ref().map(unix), Some(open), "{s:?}");
    let sched = s.schedule.clone().context("schedule")?;
    assert!(
        !sched.open && sched.next_open.as_ref().map(unix) == Some(open),
        "{sched:?}"
    );
    assert_eq!(
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.reason.as_str()),
        Some("OutsideWindow")
    );
    // Until the window opens, no device is touched.
    product.untouched_until("fw", open).await?;
    let done = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(done.phase, CampaignPhase::Completed, "{done:?}");
    assert_eq!(done.devices.succeeded, 3, "{done:?}");
    // The far device's window opens (in its own time zone) only after the deadline: it is left
    // out, and the plan says why.
    assert_eq!(done.devices.excluded, 1, "{done:?}");
    let plan = done.plan.clone().context("plan")?;
    assert!(
        plan.excluded
            .iter()
            .any(|e| e.reason == "OutsideEveryWindow" && e.devices == vec![far.clone()]),
        "{plan:?}"
    );
    let c = product.campaign("fw").await?;
    assert_eq!(condition(&c, "Ready"), Some(("False", "DevicesExcluded")));
    assert_eq!(condition(&c, "Degraded"), Some(("True", "DevicesExcluded")));
    assert!(
        !product.touched("fw").await?.contains(&far),
        "the device whose window is at another hour was started"
    );
    // The devices that started in the window finished after it closed (in flight, not cut).
    let last_seen = product
        .devices()
        .await?
        .iter()
        .filter_map(|d| d.status.as_ref()?.last_seen.as_ref().map(unix))
        .max()
        .context("lastSeen")?;
    assert!(
        last_seen > open + 5,
        "every device finished inside the 5 s window: the test proves nothing about in-flight devices"
    );
    product.pass();
    Ok(())
}

/// Issue 15, item 1: a deadline without windows. One device at a time, 6 s each, a deadline 8 s
/// after the campaign is applied: the device in flight at the deadline finishes, the devices not
/// started by then never start, and the campaign ends `Completed` (reason `DeadlinePassed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_deadline_nothing_starts_and_the_campaign_completes() -> Result<()> {
    let mut product = Product::new("deadline", 3).await?;
    product
        .firmware_configmap("fw", &random_image(48 * 1024))
        .await?;
    product.start_operator()?;
    // 48 KiB at 8 KiB/s: about 6 s a device, so the third cannot start before the deadline.
    product.start_emulator(&["--fault", "slow:rate=8k"])?;
    let deadline = now() + 8;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({
                "rollout": {"maxInFlight": 1, "deviceTimeoutSeconds": 60},
                "schedule": {"deadline": rfc3339(deadline)},
            }),
        ),
    )?;
    let done = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(done.phase, CampaignPhase::Completed, "{done:?}");
    let c = product.campaign("fw").await?;
    assert_eq!(condition(&c, "Ready"), Some(("False", "DeadlinePassed")));
    assert_eq!(condition(&c, "Degraded"), Some(("True", "DeadlinePassed")));
    let started = product.touched("fw").await?;
    assert!(
        !started.is_empty() && started.len() < 3,
        "{started:?} started: the deadline held nothing back, or nothing started"
    );
    assert_eq!(
        (done.devices.succeeded, done.devices.failed),
        (started.len() as u32, 0),
        "the device in flight at the deadline finished: {done:?}"
    );
    // Not started by the deadline: held back for good (outside every window from then on).
    assert_eq!(
        done.devices.outside_window,
        3 - started.len() as u32,
        "{done:?}"
    );
    assert!(
        // Whole seconds on both sides: the operator ends it in the deadline's own second.
        now() >= deadline,
        "the campaign completed before its deadline: {done:?}"
    );
    product.pass();
    Ok(())
}

/// Issue 15, item 2: an exponential ramp under maxPerMinute. One device starts first; each
/// success raises the rate (x2 per success) up to 4 a minute; then the rate holds the rest back
/// for the rest of the minute, and the status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ramp_grows_with_successes_and_max_per_minute_holds_the_rest() -> Result<()> {
    let mut product = Product::new("ramp", 6).await?;
    product
        .firmware_configmap("fw", &random_image(32 * 1024))
        .await?;
    product.start_operator()?;
    // 32 KiB at 8 KiB/s: 4 s a device, so the test sees the first device alone in flight.
    product.start_emulator(&["--fault", "slow:rate=8k"])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
                "maxInFlight": 6, "deviceTimeoutSeconds": 60,
                "maxPerMinute": 4,
                "ramp": {"startPerMinute": 1, "factor": 2, "successesPerStep": 1}}}),
        ),
    )?;
    let first = product
        .wait_campaign("fw", "the first start", Duration::from_secs(60), |c| {
            let d = status(c).devices;
            d.in_progress + d.succeeded > 0
        })
        .await?;
    let started_at = now();
    let d = status(&first).devices;
    assert_eq!(
        d.in_progress + d.succeeded,
        1,
        "the ramp starts one device: {d:?}"
    );
    assert_eq!(status(&first).rate_per_minute, Some(1));
    let held = product
        .wait_campaign(
            "fw",
            "rate limited at 4 a minute",
            Duration::from_secs(60),
            |c| {
                let s = status(c);
                s.waiting.is_some_and(|w| w.reason == "RateLimited") && s.devices.succeeded == 4
            },
        )
        .await?;
    let s = status(&held);
    assert_eq!(s.rate_per_minute, Some(4), "{s:?}");
    assert_eq!(s.devices.pending, 2, "{s:?}");
    let until = s.waiting.and_then(|w| w.until).context("until")?;
    assert!(
        unix(&until) >= started_at.saturating_sub(2) + 55,
        "{until:?}"
    );
    let done = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert!(
        now() >= started_at + 55,
        "the last two devices started before the minute was over"
    );
    product.pass();
    Ok(())
}

/// Issue 15, item 3 (a, c): a device-health gate after the canary. The canary device installs and
/// then reports (signed) that its health check fails: the gate fails, the campaign pauses (Ready
/// reason GateFailed, a Warning Event) and no other device starts; promoting past wave 0 with a
/// spec field (GitOps, no imperative command) lets the rest go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unhealthy_canary_fails_the_gate_and_a_promotion_field_goes_on() -> Result<()> {
    let mut product = Product::new("health", 4).await?;
    product
        .firmware_configmap("fw", &random_image(8 * 1024))
        .await?;
    product.start_operator()?;
    let canary = product.device_ids[0].clone();
    product.start_emulator(&[
        "--health-report-after",
        "1s",
        "--fault",
        &format!("unhealthy:reason=watchdog resets@devices={canary}"),
    ])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
                "canary": "1", "maxInFlight": 4, "deviceTimeoutSeconds": 60,
                "gate": {"soakSeconds": 4, "deviceHealth": {"minHealthyPercent": 100},
                         "onFailure": "Pause"}}}),
        ),
    )?;
    let paused = product
        .wait_campaign("fw", "paused by the gate", Duration::from_secs(90), |c| {
            status(c).phase == CampaignPhase::Paused
        })
        .await?;
    let s = status(&paused);
    assert_eq!(condition(&paused, "Ready"), Some(("False", "GateFailed")));
    let gate = s.gate.clone().context("gate")?;
    assert_eq!((gate.wave, gate.state.as_str()), (0, "Failed"), "{gate:?}");
    assert_eq!(gate.healthy.as_deref(), Some("0/1"), "{gate:?}");
    assert!(gate.message.contains("fewer than 100%"), "{gate:?}");
    // The operator writes the status first and records its Events after: wait for the Warning.
    wait_for("the GateFailed Event", Duration::from_secs(60), || async {
        let events = product.events().await?;
        Ok(events.iter().any(|(r, _)| r == "GateFailed").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        product.touched("fw").await?,
        vec![canary.clone()],
        "only the canary was touched while the gate held"
    );
    product.patch_spec("fw", serde_json::json!({"promoteThroughWave": 0}))?;
    let done = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert_eq!(done.devices.succeeded, 4);
    product.pass();
    Ok(())
}

/// Issue 15, item 3 (b, c): metrics gates against a real Prometheus (Debian's package) scraping
/// the operator's and the emulator's metrics. A query that meets its threshold passes, and a
/// manual gate then waits for `spec.promoteThroughWave`; a query that does not fails the gate and
/// (onFailure: Abort) aborts the campaign before the rest of the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_gates_query_a_real_prometheus() -> Result<()> {
    let mut product = Product::new("metrics", 4).await?;
    product
        .firmware_configmap("fw", &random_image(8 * 1024))
        .await?;
    product
        .firmware_configmap("fw2", &random_image(8 * 1024))
        .await?;
    product.start_operator()?;
    let metrics_file = product.dir.join("emulator.prom");
    product.start_emulator(&[
        "--health-report-after",
        "1s",
        "--metrics-file",
        metrics_file.to_str().context("path")?,
    ])?;
    let emulator_metrics = sealed_ota_e2e::http::FileServer::of_path(metrics_file).await?;
    let prometheus = sealed_ota_e2e::prometheus::Prometheus::start(
        &product.dir.join("prometheus"),
        &[
            ("operator", &product.metrics_addr),
            ("emulator", &emulator_metrics.addr()),
        ],
    )
    .await?;
    prometheus
        .wait_targets_up(&["operator", "emulator"])
        .await?;
    // Passes: no device reported unhealthy, to the emulator or to the operator.
    let healthy_query = "sum(sealed_ota_emulator_health_reports_total{healthy=\"false\"}) + sum(sealed_ota_operator_health_reports_total{healthy=\"false\"} or vector(0))";
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"rollout": {
                "canary": "1", "maxInFlight": 4, "deviceTimeoutSeconds": 60,
                "gate": {"soakSeconds": 3, "manual": true,
                         "metrics": {"prometheusUrl": prometheus.url(),
                                     "query": healthy_query, "max": 0}}}}),
        ),
    )?;
    let waiting = product
        .wait_campaign(
            "fw",
            "waiting for the promotion",
            Duration::from_secs(90),
            |c| {
                status(c)
                    .gate
                    .is_some_and(|g| g.state == "WaitingForPromotion")
            },
        )
        .await?;
    let gate = status(&waiting).gate.context("gate")?;
    assert!(
        gate.metric.as_deref().is_some_and(|m| m.contains('0')),
        "{gate:?}"
    );
    assert_eq!(
        status(&waiting).waiting.map(|w| w.reason),
        Some("Gate".to_owned())
    );
    assert_eq!(product.touched("fw").await?.len(), 1, "only the canary");
    product.patch_spec("fw", serde_json::json!({"promoteThroughWave": 0}))?;
    let done = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");

    // Fails: the emulator has devices, and the threshold says it must have none.
    product.apply_campaign(
        "fw2",
        product.firmware_spec(
            "1.2.0",
            "fw2",
            serde_json::json!({"rollout": {
                "canary": "1", "maxInFlight": 4, "deviceTimeoutSeconds": 60,
                "gate": {"soakSeconds": 2, "onFailure": "Abort",
                         "metrics": {"prometheusUrl": prometheus.url(),
                                     "query": "sum(sealed_ota_emulator_devices)", "max": 0}}}}),
        ),
    )?;
    let aborted = product.finished("fw2", Duration::from_secs(90)).await?;
    assert_eq!(aborted.phase, CampaignPhase::Aborted, "{aborted:?}");
    let c = product.campaign("fw2").await?;
    assert_eq!(condition(&c, "Ready"), Some(("False", "GateFailed")));
    let gate = aborted.gate.clone().context("gate")?;
    assert!(gate.message.contains("outside the threshold"), "{gate:?}");
    assert_eq!(aborted.devices.succeeded, 1, "only the canary: {aborted:?}");
    product.pass();
    Ok(())
}

/// Issue 15, item 4: a dry run shows the plan in status and touches nothing; turning it off starts
/// exactly that plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_plans_without_touching_a_device_then_starts_that_plan() -> Result<()> {
    let mut product = Product::new("dryrun", 5).await?;
    // The example with windows, a ramp and a health gate is a valid campaign (schema and CEL
    // rules of the apiserver; nothing is stored).
    let example = sealed_ota_e2e::repo_root().join("examples/policy-campaign.yaml");
    product.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        example.to_str().context("path")?,
    ])?;
    let image = random_image(16 * 1024);
    product.firmware_configmap("fw", &image).await?;
    let unpinned = product.device_ids[4].clone();
    product.kubectl(&[
        "patch",
        "device",
        &unpinned,
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/certificateFingerprint"}]"#,
    ])?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"dryRun": true, "requireCertificatePin": true,
                "rollout": {"canary": "2", "waveSize": "2", "failureThreshold": "2",
                            "maxInFlight": 5, "deviceTimeoutSeconds": 60}}),
        ),
    )?;
    let planned = product
        .wait_campaign("fw", "planned", Duration::from_secs(60), |c| {
            let s = status(c);
            s.phase == CampaignPhase::Planned
                && s.plan
                    .as_ref()
                    .is_some_and(|p| p.estimated_broker_bytes.is_some())
        })
        .await?;
    let plan = status(&planned).plan.context("plan")?;
    assert_eq!(plan.devices, 4, "{plan:?}");
    let sizes: Vec<u32> = plan.waves.iter().map(|w| w.size).collect();
    assert_eq!(sizes, vec![2, 2, 0], "{plan:?}");
    let ids = &product.device_ids;
    assert_eq!(
        plan.waves[0].first_devices,
        vec![ids[0].clone(), ids[1].clone()]
    );
    assert_eq!(plan.excluded.len(), 1, "{plan:?}");
    assert_eq!(
        (plan.excluded[0].reason.as_str(), plan.excluded[0].count),
        ("NoCertificatePin", 1)
    );
    assert_eq!(plan.excluded[0].devices, vec![unpinned.clone()]);
    let bytes = plan.estimated_broker_bytes.context("estimate")?;
    assert!(bytes > image.len() as u64, "{bytes}");
    assert!(
        status(&planned)
            .warnings
            .iter()
            .any(|w| w.contains("failureThreshold (2 devices) is not smaller than the canary")),
        "{:?}",
        status(&planned).warnings
    );
    assert_eq!(condition(&planned, "Ready"), Some(("False", "DryRun")));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        product.touched("fw").await?.is_empty(),
        "a dry run touched a device"
    );
    assert_eq!(
        product
            .campaign("fw")
            .await?
            .status
            .and_then(|s| s.expires_at),
        None,
        "a dry run does not start the manifests' clock"
    );

    product.patch_spec("fw", serde_json::json!({"dryRun": false}))?;
    let started = product
        .wait_campaign("fw", "the canary started", Duration::from_secs(60), |c| {
            let d = status(c).devices;
            d.in_progress + d.succeeded > 0
        })
        .await?;
    assert_eq!(
        status(&started).plan,
        Some(plan.clone()),
        "the plan it runs"
    );
    let first = product.touched("fw").await?;
    assert!(
        first
            .iter()
            .all(|d| plan.waves[0].first_devices.contains(d)),
        "{first:?} started before the canary {:?} finished",
        plan.waves[0].first_devices
    );
    let done = product.finished("fw", Duration::from_secs(90)).await?;
    assert_eq!(done.phase, CampaignPhase::Completed, "{done:?}");
    assert_eq!((done.devices.succeeded, done.devices.excluded), (4, 1));
    let c = product.campaign("fw").await?;
    assert_eq!(condition(&c, "Ready"), Some(("False", "DevicesExcluded")));
    assert!(!product.touched("fw").await?.contains(&unpinned));
    product.pass();
    Ok(())
}

/// Issue 15, item 5: two running campaigns want the same devices. The one that already started a
/// device keeps it; the higher priority takes the rest; each counts the other's devices as waiting
/// and names the holder; when the holder is done, the device is at the target and the other
/// campaign has nothing left to do. No device is updated twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_campaign_per_device_by_priority_and_the_other_waits() -> Result<()> {
    let mut product = Product::new("arbiter", 4).await?;
    product
        .firmware_configmap("fw", &random_image(32 * 1024))
        .await?;
    product.start_operator()?;
    // 32 KiB at 2 KiB/s: 16 s a device, so the low campaign's first device is still in flight
    // while the test reads both statuses (at 4 s it once finished before the test looked).
    product.start_emulator(&["--fault", "slow:rate=2k"])?;
    let spec = |priority: i32, in_flight: u32| {
        product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"priority": priority,
                "rollout": {"maxInFlight": in_flight, "deviceTimeoutSeconds": 60}}),
        )
    };
    product.apply_campaign("low", spec(0, 1))?;
    product
        .wait_campaign(
            "low",
            "one device in flight",
            Duration::from_secs(60),
            |c| status(c).devices.in_progress == 1,
        )
        .await?;
    product.apply_campaign("high", spec(10, 4))?;
    let low = product
        .wait_campaign("low", "waiting for high", Duration::from_secs(30), |c| {
            status(c).held_by.iter().any(|h| h.campaign == "high")
        })
        .await?;
    let s = status(&low);
    assert!(s.devices.waiting >= 2, "{s:?}");
    let high = product
        .wait_campaign("high", "waiting for low", Duration::from_secs(30), |c| {
            status(c).held_by.iter().any(|h| h.campaign == "low")
        })
        .await?;
    assert_eq!(status(&high).held_by[0].devices, 1, "{:?}", status(&high));
    let high_done = product.finished("high", Duration::from_secs(120)).await?;
    let low_done = product.finished("low", Duration::from_secs(120)).await?;
    for (name, s) in [("high", &high_done), ("low", &low_done)] {
        assert_eq!(s.phase, CampaignPhase::Succeeded, "{name}: {s:?}");
        assert_eq!(
            s.devices.succeeded + s.devices.up_to_date,
            4,
            "{name}: {s:?}"
        );
        assert_eq!(s.devices.failed, 0, "{name}: {s:?}");
    }
    assert_eq!(
        high_done.devices.succeeded + low_done.devices.succeeded,
        4,
        "every device installed exactly once: {high_done:?} {low_done:?}"
    );
    product.pass();
    Ok(())
}

/// Issue 15, item 6: a device that starts matching the selector while the campaign runs joins it
/// (counted, an Event); one that stops matching is released (its session ended with the signed
/// abort, its Device status says Released).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_joiners_join_and_leavers_are_released() -> Result<()> {
    let mut product = Product::new("members", 4).await?;
    product
        .firmware_configmap("fw", &random_image(32 * 1024))
        .await?;
    let ids = product.device_ids.clone();
    for id in &ids[..3] {
        product.kubectl(&["label", "device", id, "ring=a"])?;
    }
    product.start_operator()?;
    product.start_emulator(&["--fault", "slow:rate=8k"])?;
    let mut spec = product.firmware_spec(
        "1.1.0",
        "fw",
        serde_json::json!({"rollout": {"maxInFlight": 1, "deviceTimeoutSeconds": 60}}),
    );
    spec["selector"] = serde_json::json!({"matchLabels": {"ring": "a"}});
    product.apply_campaign("fw", spec)?;
    product
        .wait_campaign(
            "fw",
            "the first device in flight",
            Duration::from_secs(60),
            |c| status(c).devices.in_progress == 1,
        )
        .await?;
    // The one in flight leaves; a fourth device joins.
    product.kubectl(&["label", "device", &ids[0], "ring-"])?;
    product.kubectl(&["label", "device", &ids[3], "ring=a"])?;
    let done = product.finished("fw", Duration::from_secs(120)).await?;
    assert_eq!(done.phase, CampaignPhase::Succeeded, "{done:?}");
    assert_eq!(done.devices.selected, 3, "{done:?}");
    assert_eq!((done.devices.joined, done.devices.left), (1, 1), "{done:?}");
    let events = product.events().await?;
    for reason in ["DevicesJoined", "DevicesLeft"] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "{reason}: {events:?}"
        );
    }
    let left = product
        .devices()
        .await?
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some(ids[0].as_str()))
        .context("the device that left")?;
    let record = left
        .status
        .and_then(|s| s.campaign)
        .context("its campaign record")?;
    assert_eq!(
        record.phase,
        sealed_ota_operator::crd::DevicePhase::Released,
        "{record:?}"
    );
    let joined: Vec<String> = product.touched("fw").await?;
    assert!(joined.contains(&ids[3]), "{joined:?}");
    product.pass();
    Ok(())
}
