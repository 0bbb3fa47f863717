//! GitOps health: the Argo CD custom health check (`deploy/argocd/updatecampaign-health.lua`) run in
//! Lua 5.1, as Argo CD's gopher-lua runs it, against sample statuses in the shape the operator writes
//! (operator/src/status.rs: phase, observedGeneration, progress, Ready/Progressing/Failed/Paused
//! conditions). `chart_install` runs it on a real Succeeded status as well.

mod chart_support;

use anyhow::{Context, Result};
use chart_support::{argocd_health, argocd_health_script};
use sealed_ota_e2e::repo_root;
use sealed_ota_operator::reasons::BlockerReason;
use serde_json::{json, Value};

/// A campaign with the status `operator/src/status.rs::compute` writes for this phase and Ready reason
/// (Stalled and Degraded True when it ended short of the target: Completed, Failed, Aborted).
fn campaign(
    generation: i64,
    observed: i64,
    phase: &str,
    ready: (&str, &str, &str),
    progress: &str,
) -> Value {
    let (ready_status, reason, message) = ready;
    // Stalled and Degraded: the campaign ended without every device at the target version.
    let ended_short = matches!(phase, "Completed" | "Failed" | "Aborted");
    let cond = |type_: &str, status: bool, reason: &str, message: &str| {
        json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "observedGeneration": observed,
            "lastTransitionTime": "2026-11-24T10:00:00Z",
        })
    };
    json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "UpdateCampaign",
        "metadata": {"name": "c", "namespace": "fleet", "generation": generation},
        "status": {
            "phase": phase,
            "observedGeneration": observed,
            "progress": progress,
            "devices": {"selected": 3, "pending": 0, "inProgress": 0, "succeeded": 3, "failed": 0},
            "currentWave": 0,
            "totalWaves": 1,
            "conditions": [
                cond("Ready", ready_status == "True", reason, message),
                cond("Progressing", phase == "Progressing", "Progressing", "wave 1 of 1"),
                cond("Failed", phase == "Failed", if phase == "Failed" { "FailureThresholdExceeded" } else { "NoFailureThreshold" }, "0 devices failed"),
                cond("Stalled", ended_short, if ended_short { reason } else { "NotStalled" }, message),
                cond("Paused", phase == "Paused", if phase == "Paused" { "Paused" } else { "NotPaused" }, "spec.paused"),
                cond("Degraded", ended_short, if ended_short { reason } else { "NotDegraded" }, message),
            ],
        },
    })
}

fn health(obj: &Value) -> Result<(String, String)> {
    argocd_health(&argocd_health_script()?, obj)
}

#[test]
fn health_follows_the_campaign_phase() -> Result<()> {
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            campaign(
                1,
                1,
                "Succeeded",
                (
                    "True",
                    "Succeeded",
                    "3 of 3 devices installed the update, 0 failed",
                ),
                "3/3",
            ),
            "Healthy",
            "3 of 3 devices installed",
        ),
        (
            campaign(
                1,
                1,
                "Progressing",
                ("False", "Progressing", "1 of 3 devices finished"),
                "1/3",
            ),
            "Progressing",
            "1 of 3 devices finished",
        ),
        (
            campaign(
                1,
                1,
                "Pending",
                (
                    "False",
                    "NoDevicesSelected",
                    "spec.selector matches no Device",
                ),
                "0/0",
            ),
            "Progressing",
            "matches no Device",
        ),
        (
            campaign(
                1,
                1,
                "Progressing",
                ("False", "BrokerUnavailable", "not connected to the broker"),
                "1/3",
            ),
            "Progressing",
            "not connected",
        ),
        (
            campaign(
                2,
                2,
                "Paused",
                ("False", "Paused", "spec.paused is set"),
                "1/3",
            ),
            "Suspended",
            "paused",
        ),
        (
            campaign(
                1,
                1,
                "Failed",
                (
                    "False",
                    "FailureThresholdExceeded",
                    "2 devices failed, more than spec.rollout.failureThreshold allows",
                ),
                "3/3",
            ),
            "Degraded",
            "2 devices failed",
        ),
        // Issue 15: every device timed out, no failure threshold: finished, not healthy.
        (
            campaign(
                1,
                1,
                "Completed",
                (
                    "False",
                    "DevicesFailed",
                    "0 of 5 devices installed the update, 5 failed",
                ),
                "5/5",
            ),
            "Degraded",
            "0 of 5 devices installed the update, 5 failed",
        ),
        (
            campaign(
                2,
                2,
                "Aborted",
                (
                    "False",
                    "Aborted",
                    "spec.abort is set: the campaign stopped",
                ),
                "1/3",
            ),
            "Degraded",
            "spec.abort",
        ),
        (
            campaign(
                1,
                1,
                "Pending",
                (
                    "False",
                    "ManagerSecretMissing",
                    "Secret manager (spec.managerSecretName) not found",
                ),
                "0/3",
            ),
            "Degraded",
            "ManagerSecretMissing: Secret manager",
        ),
        (
            campaign(
                1,
                1,
                "Pending",
                ("False", "FirmwareUnreadable", "ConfigMap fw not found"),
                "0/3",
            ),
            "Degraded",
            "FirmwareUnreadable",
        ),
    ];
    for (obj, status, message) in cases {
        let (got, msg) = health(&obj)?;
        assert_eq!(got, status, "{obj}: {msg}");
        assert!(msg.contains(message), "{got}: {msg:?} lacks {message:?}");
    }
    Ok(())
}

#[test]
fn a_status_that_does_not_describe_the_current_generation_is_progressing() -> Result<()> {
    // Succeeded for generation 1, but the spec changed (generation 2) and the operator has not
    // caught up yet: not Healthy.
    let stale = campaign(2, 1, "Succeeded", ("True", "Succeeded", "done"), "3/3");
    assert_eq!(
        health(&stale)?,
        (
            "Progressing".into(),
            "Waiting for the operator to observe generation 2".into()
        )
    );
    // No status at all (just created) and a status without observedGeneration.
    let fresh = json!({"metadata": {"name": "c", "generation": 1}, "spec": {}});
    assert_eq!(health(&fresh)?.0, "Progressing");
    let mut partial = campaign(1, 1, "Succeeded", ("True", "Succeeded", "done"), "3/3");
    partial["status"]
        .as_object_mut()
        .context("status")?
        .remove("observedGeneration");
    assert_eq!(health(&partial)?.0, "Progressing");
    // No conditions: the phase alone decides.
    let bare = json!({"metadata": {"generation": 3}, "status": {"phase": "Succeeded", "observedGeneration": 3, "progress": "5/5"}});
    assert_eq!(
        health(&bare)?,
        (
            "Healthy".into(),
            "Campaign succeeded (5/5 devices finished)".into()
        )
    );
    Ok(())
}

/// Every blocker the operator can report is classified: transient ones stay Progressing, the rest
/// (a person must act) are Degraded. A new reason in operator/src fails here until it is classified.
#[test]
fn every_operator_blocker_reason_is_classified() -> Result<()> {
    let script = argocd_health_script()?;
    for blocker in BlockerReason::ALL {
        let reason = blocker.as_str();
        let obj = campaign(1, 1, "Pending", ("False", reason, "m"), "0/1");
        let (status, msg) = argocd_health(&script, &obj)?;
        let expected = if blocker.is_transient() {
            "Progressing"
        } else {
            "Degraded"
        };
        assert_eq!(
            status, expected,
            "reason {reason}: {msg} (classify it in deploy/argocd/updatecampaign-health.lua)"
        );
    }
    Ok(())
}

/// The ConfigMap patch users apply embeds exactly the tested script.
#[test]
fn argocd_cm_patch_embeds_the_tested_script() -> Result<()> {
    let text = std::fs::read_to_string(repo_root().join("deploy/argocd/argocd-cm-patch.yaml"))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let embedded = doc["data"]["resource.customizations.health.ota.sealed-ota.dev_UpdateCampaign"]
        .as_str()
        .context("health key in argocd-cm-patch.yaml")?;
    assert_eq!(
        embedded,
        argocd_health_script()?,
        "regenerate deploy/argocd/argocd-cm-patch.yaml (see deploy/README.md)"
    );
    Ok(())
}

/// Flux's health checks (kstatus) on the same statuses: Ready=True for the current generation is
/// Current; anything older or not Ready is InProgress; a campaign that ended short of its target
/// (Completed with failed devices, Failed, Aborted: Stalled=True) is Failed at once, so Flux does
/// not wait for its timeout. Without Stalled (an operator before it wrote it) Failed read as
/// InProgress.
#[test]
fn flux_kstatus_reads_the_campaign_conditions() -> Result<()> {
    let named = |name: &str, mut obj: Value| {
        obj["metadata"]["name"] = json!(name);
        obj
    };
    let mut without_stalled = campaign(
        1,
        1,
        "Failed",
        ("False", "FailureThresholdExceeded", "2 devices failed"),
        "3/3",
    );
    without_stalled["status"]["conditions"]
        .as_array_mut()
        .context("conditions")?
        .retain(|c| c["type"] != "Stalled");
    let objects = vec![
        named(
            "succeeded",
            campaign(
                1,
                1,
                "Succeeded",
                (
                    "True",
                    "Succeeded",
                    "3 of 3 devices installed the update, 0 failed",
                ),
                "3/3",
            ),
        ),
        named(
            "progressing",
            campaign(
                1,
                1,
                "Progressing",
                ("False", "Progressing", "1 of 3 devices finished"),
                "1/3",
            ),
        ),
        named(
            "stale",
            campaign(2, 1, "Succeeded", ("True", "Succeeded", "done"), "3/3"),
        ),
        named(
            "paused",
            campaign(
                1,
                1,
                "Paused",
                ("False", "Paused", "spec.paused is set"),
                "1/3",
            ),
        ),
        named(
            "blocked",
            campaign(
                1,
                1,
                "Pending",
                ("False", "ManagerSecretMissing", "Secret manager not found"),
                "0/3",
            ),
        ),
        named(
            "failed",
            campaign(
                1,
                1,
                "Failed",
                ("False", "FailureThresholdExceeded", "2 devices failed"),
                "3/3",
            ),
        ),
        named(
            "completed-with-failures",
            campaign(
                1,
                1,
                "Completed",
                ("False", "DevicesFailed", "0 of 5 devices installed"),
                "5/5",
            ),
        ),
        named(
            "aborted",
            campaign(1, 1, "Aborted", ("False", "Aborted", "spec.abort"), "1/3"),
        ),
        named("failed-without-stalled", without_stalled),
    ];
    let got = chart_support::kstatus(&objects)?;
    let status: std::collections::BTreeMap<&str, &str> = got
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_str()))
        .collect();
    let expected = [
        ("succeeded", "Current"),
        ("progressing", "InProgress"),
        ("stale", "InProgress"),
        ("paused", "InProgress"),
        ("blocked", "InProgress"),
        ("failed", "Failed"),
        ("completed-with-failures", "Failed"),
        ("aborted", "Failed"),
        ("failed-without-stalled", "InProgress"),
    ];
    for (name, want) in expected {
        assert_eq!(status.get(name).copied(), Some(want), "{name}: {got:?}");
    }
    let stale_message = &got
        .iter()
        .find(|(n, _, _)| n == "stale")
        .context("stale")?
        .2;
    assert!(stale_message.contains("generation is 2"), "{stale_message}");
    Ok(())
}
