//! Pure computation of an `UpdateCampaign` status: phase, counts, progress, bounded failure list and
//! kstatus-style conditions (`Ready`, `Progressing`, `Failed`, `Stalled`, `Paused`, `Degraded`) with
//! `observedGeneration`. `Ready` is True only when every selected device runs the target version;
//! a campaign that ended short of that is `Stalled` and `Degraded`, so GitOps tools never read it
//! as healthy.
//!
//! A condition's `lastTransitionTime` changes only when its status changes, so an unchanged campaign
//! produces an identical status and the controller skips the write. No I/O here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    CampaignPhase, DeviceCounts, DeviceFailure, GateStatus, HolderStatus, PlanStatus,
    ScheduleStatus, UpdateCampaignStatus, WaitingStatus, MAX_LISTED_FAILURES,
};
use crate::reasons::BlockerReason;

/// Reason of a campaign that finished with failed devices (Ready, Stalled, Degraded).
pub const DEVICES_FAILED: &str = "DevicesFailed";
/// Reason of a campaign that finished with devices its policy left out (and none failed).
pub const DEVICES_EXCLUDED: &str = "DevicesExcluded";

/// Something that keeps a campaign from running, with what a person must do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    /// Why (the `Ready` reason and the Event reason).
    pub reason: BlockerReason,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// What the status is computed from.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    /// metadata.generation of the campaign.
    pub generation: Option<i64>,
    /// Phase decided for this pass.
    pub phase: CampaignPhase,
    /// Device counts.
    pub counts: DeviceCounts,
    /// Current and total waves.
    pub current_wave: u32,
    /// Number of waves.
    pub total_waves: u32,
    /// Chunks of the prepared image, if prepared.
    pub chunk_count: Option<u32>,
    /// When the campaign's manifests expire (fixed when it was first prepared).
    pub expires_at: Option<Time>,
    /// Whether that time has passed (the phase is then Failed, reason Expired).
    pub expired: bool,
    /// Key id of the release key that signed the image.
    pub release_key_id: Option<String>,
    /// Failed devices (any order; the first [`MAX_LISTED_FAILURES`] by name are listed).
    pub failures: Vec<DeviceFailure>,
    /// Why the campaign cannot run, if it cannot.
    pub blocker: Option<Blocker>,
    /// The status currently stored (for lastTransitionTime).
    pub previous: Option<&'a UpdateCampaignStatus>,
    /// Now, used only for conditions that change.
    pub now: Time,
    /// What the rollout policy reports (schedule, rate, gate, arbitration, plan, warnings).
    pub policy: PolicyStatus,
}

/// What the rollout policy adds to the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyStatus {
    /// What the campaign waits for.
    pub waiting: Option<WaitingStatus>,
    /// The maintenance windows.
    pub schedule: Option<ScheduleStatus>,
    /// The start rate in force.
    pub rate_per_minute: Option<u32>,
    /// The gate after the current wave.
    pub gate: Option<GateStatus>,
    /// Campaigns holding selected devices.
    pub held_by: Vec<HolderStatus>,
    /// The plan.
    pub plan: Option<PlanStatus>,
    /// Settings that work against each other.
    pub warnings: Vec<String>,
    /// Why the gate failed, when the campaign is paused or aborted for it (Ready reason
    /// GateFailed).
    pub gate_failed: Option<String>,
}

/// Reason of a campaign whose gate failed (Ready, Paused or Stalled).
pub const GATE_FAILED: &str = "GateFailed";
/// Reason of a campaign whose schedule's deadline passed with devices not started.
pub const DEADLINE_PASSED: &str = "DeadlinePassed";

/// Truncate a string to at most `max` bytes on a character boundary.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Compute the status.
pub fn compute(input: StatusInput<'_>) -> UpdateCampaignStatus {
    let StatusInput {
        generation,
        phase,
        counts,
        current_wave,
        total_waves,
        chunk_count,
        expires_at,
        expired,
        release_key_id,
        mut failures,
        blocker,
        previous,
        now,
        policy,
    } = input;
    let failed_reason = if expired {
        "Expired"
    } else {
        "FailureThresholdExceeded"
    };
    failures.sort_by(|a, b| a.device.cmp(&b.device));
    failures.truncate(MAX_LISTED_FAILURES);
    for f in &mut failures {
        f.device = bounded(&f.device, 253);
        f.reason = bounded(&f.reason, 64);
        f.message = bounded(&f.message, 256);
    }

    let finished = counts.succeeded + counts.failed + counts.up_to_date + counts.excluded;
    let unstarted = counts.pending + counts.waiting + counts.outside_window;
    // Why a Completed campaign ended short: devices left at the deadline, failed, or left out.
    let completed_reason = if unstarted > 0 {
        DEADLINE_PASSED
    } else if counts.failed > 0 || counts.excluded == 0 {
        DEVICES_FAILED
    } else {
        DEVICES_EXCLUDED
    };
    let gate_failed = policy.gate_failed.as_deref();
    let (ready, ready_reason, ready_message) = match (&blocker, phase) {
        (_, CampaignPhase::Succeeded) => (
            true,
            "Succeeded",
            format!(
                "{} of {} devices run the target version ({} installed it, {} already ran it)",
                counts.succeeded + counts.up_to_date,
                counts.selected,
                counts.succeeded,
                counts.up_to_date
            ),
        ),
        (_, CampaignPhase::Completed) => (
            false,
            completed_reason,
            format!(
                "{} of {} devices installed the update, {} failed, {} excluded, {} not started before spec.schedule.deadline (status.failures and each Device's status say why): the campaign ended without every device at the target version",
                counts.succeeded, counts.selected, counts.failed, counts.excluded, unstarted
            ),
        ),
        (_, CampaignPhase::Failed) if expired => (
            false,
            failed_reason,
            format!(
                "the campaign's signed manifests expired ({} devices installed, {} failed, {} unfinished): devices refuse everything of it now; create a new campaign",
                counts.succeeded,
                counts.failed,
                counts.selected.saturating_sub(finished)
            ),
        ),
        (_, CampaignPhase::Failed) => (
            false,
            failed_reason,
            format!(
                "{} devices failed, more than spec.rollout.failureThreshold allows; create a new campaign once the cause is fixed",
                counts.failed
            ),
        ),
        (_, CampaignPhase::Aborted) => match gate_failed {
            Some(why) => (
                false,
                GATE_FAILED,
                bounded(&format!("the gate failed and spec.rollout.gate.onFailure is Abort: {why}"), 1024),
            ),
            None => (
                false,
                "Aborted",
                "spec.abort is set: the campaign stopped and its retained messages were cleared"
                    .to_owned(),
            ),
        },
        (Some(b), _) => (false, b.reason.as_str(), bounded(&b.message, 1024)),
        (None, CampaignPhase::Paused) => match gate_failed {
            Some(why) => (
                false,
                GATE_FAILED,
                bounded(&format!("the gate failed: {why}; no new device starts: set spec.promoteThroughWave to this wave to go on, or spec.abort"), 1024),
            ),
            None => (
                false,
                "Paused",
                "spec.paused is set: no new device starts; set it to false to resume".to_owned(),
            ),
        },
        (None, CampaignPhase::Planned) => (
            false,
            "DryRun",
            "spec.dryRun is set: status.plan shows what the campaign would do and nothing is touched; set spec.dryRun to false to start it".to_owned(),
        ),
        (None, CampaignPhase::Pending) => (
            false,
            "NoDevicesSelected",
            "spec.selector matches no Device in this namespace; label Devices or fix the selector"
                .to_owned(),
        ),
        (None, CampaignPhase::Progressing) => match &policy.waiting {
            // Nothing in flight, and the policy holds the rest back: say what it waits for.
            Some(w) if counts.in_progress == 0 => {
                (false, w.reason.as_str(), bounded(&w.message, 1024))
            }
            _ => (
                false,
                "Progressing",
                format!("{finished} of {} devices finished", counts.selected),
            ),
        },
    };
    let progressing = phase == CampaignPhase::Progressing && blocker.is_none();
    // Ended without every selected device at the target version.
    let stalled = matches!(
        phase,
        CampaignPhase::Completed | CampaignPhase::Failed | CampaignPhase::Aborted
    );
    let end_reason = match phase {
        CampaignPhase::Completed => completed_reason,
        CampaignPhase::Failed => failed_reason,
        CampaignPhase::Aborted if gate_failed.is_some() => GATE_FAILED,
        CampaignPhase::Aborted => "Aborted",
        _ => "",
    };
    let desired = [
        ("Ready", ready, ready_reason, ready_message),
        (
            "Progressing",
            progressing,
            if progressing {
                "Progressing"
            } else {
                phase_reason(phase)
            },
            format!("wave {} of {}", current_wave + 1, total_waves.max(1)),
        ),
        (
            "Failed",
            phase == CampaignPhase::Failed,
            if phase == CampaignPhase::Failed {
                failed_reason
            } else {
                "WithinFailureThreshold"
            },
            format!("{} devices failed", counts.failed),
        ),
        // kstatus (Flux, `kubectl wait`): Stalled=True means the resource will not make progress
        // on its own, so tools report Failed at once instead of waiting for their timeout.
        (
            "Stalled",
            stalled,
            if stalled { end_reason } else { "NotStalled" },
            match phase {
                CampaignPhase::Completed => format!(
                    "the campaign ended with {} failed, {} excluded and {} unstarted devices; it will not continue",
                    counts.failed, counts.excluded, unstarted
                ),
                CampaignPhase::Failed => format!(
                    "{} devices failed, more than spec.rollout.failureThreshold allows; the campaign will not continue",
                    counts.failed
                ),
                CampaignPhase::Aborted if gate_failed.is_some() => {
                    "the gate failed and the campaign was aborted; it will not continue".to_owned()
                }
                CampaignPhase::Aborted => "spec.abort is set; the campaign will not continue".to_owned(),
                _ => "the campaign can still make progress".to_owned(),
            },
        ),
        // Degraded: the campaign is over and not every selected device runs the target version.
        (
            "Degraded",
            stalled,
            if stalled { end_reason } else { "NotDegraded" },
            if stalled {
                format!(
                    "{} of {} devices run the target version; {} failed",
                    counts.succeeded, counts.selected, counts.failed
                )
            } else {
                "the campaign has not ended short of its target".to_owned()
            },
        ),
        (
            "Paused",
            phase == CampaignPhase::Paused,
            match (phase, gate_failed) {
                (CampaignPhase::Paused, Some(_)) => GATE_FAILED,
                (CampaignPhase::Paused, None) => "Paused",
                _ => "NotPaused",
            },
            match (phase, gate_failed) {
                (CampaignPhase::Paused, Some(_)) => {
                    "the gate after the wave failed (status.gate)".to_owned()
                }
                (CampaignPhase::Paused, None) => "spec.paused is set".to_owned(),
                _ => "spec.paused is not set".to_owned(),
            },
        ),
    ];
    let conditions = desired
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let status = if status { "True" } else { "False" }.to_owned();
            let last_transition_time = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
                .filter(|c| c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect();

    UpdateCampaignStatus {
        phase,
        observed_generation: generation,
        progress: Some(format!("{finished}/{}", counts.selected)),
        devices: counts,
        current_wave,
        total_waves,
        chunk_count,
        expires_at,
        release_key_id,
        // Recorded by the controller at the campaign's first preparation and carried by every
        // later status (a server-side apply that left them out would remove them).
        oci_digest: previous.and_then(|p| p.oci_digest.clone()),
        delta_chunk_counts: previous
            .map(|p| p.delta_chunk_counts.clone())
            .unwrap_or_default(),
        delta_oci_digests: previous
            .map(|p| p.delta_oci_digests.clone())
            .unwrap_or_default(),
        delta: None,
        failures,
        conditions,
        // Set by the coordinator from the shards' reports (`coordinate`) and its seed.
        shards: Vec::new(),
        sealed_seed: None,
        waiting: policy.waiting.map(|w| WaitingStatus {
            reason: bounded(&w.reason, 64),
            message: bounded(&w.message, 512),
            until: w.until,
        }),
        schedule: policy.schedule,
        rate_per_minute: policy.rate_per_minute,
        gate: policy.gate,
        held_by: policy.held_by,
        plan: policy.plan,
        warnings: policy
            .warnings
            .iter()
            .take(8)
            .map(|w| bounded(w, 256))
            .collect(),
    }
}

fn phase_reason(phase: CampaignPhase) -> &'static str {
    match phase {
        CampaignPhase::Pending => "Pending",
        CampaignPhase::Planned => "DryRun",
        CampaignPhase::Progressing => "Blocked",
        CampaignPhase::Paused => "Paused",
        CampaignPhase::Succeeded => "Succeeded",
        CampaignPhase::Completed => "Completed",
        CampaignPhase::Failed => "Failed",
        CampaignPhase::Aborted => "Aborted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{UpdateCampaign, UpdateCampaignSpec};
    use k8s_openapi::jiff::Timestamp;

    fn time(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn base(previous: Option<&UpdateCampaignStatus>, now: i64) -> StatusInput<'_> {
        StatusInput {
            generation: Some(3),
            phase: CampaignPhase::Progressing,
            counts: DeviceCounts {
                selected: 50,
                pending: 10,
                in_progress: 3,
                succeeded: 35,
                failed: 2,
                ..DeviceCounts::default()
            },
            current_wave: 1,
            total_waves: 3,
            chunk_count: Some(4),
            expires_at: Some(time(5000)),
            expired: false,
            release_key_id: None,
            failures: vec![],
            blocker: None,
            previous,
            now: time(now),
            policy: PolicyStatus::default(),
        }
    }

    fn cond<'a>(s: &'a UpdateCampaignStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    /// What the first preparation recorded (the OCI digests the tags resolved to, the deltas'
    /// chunk counts) stays in every later status, whoever computes it.
    #[test]
    fn what_the_first_preparation_recorded_is_carried_on() {
        let previous = UpdateCampaignStatus {
            oci_digest: Some("sha256:aa".into()),
            delta_chunk_counts: vec![7],
            delta_oci_digests: [("1.0.0".to_string(), "sha256:bb".to_string())].into(),
            ..UpdateCampaignStatus::default()
        };
        let s = compute(base(Some(&previous), 100));
        assert_eq!(
            (&s.oci_digest, &s.delta_chunk_counts, &s.delta_oci_digests),
            (
                &previous.oci_digest,
                &previous.delta_chunk_counts,
                &previous.delta_oci_digests
            )
        );
    }

    #[test]
    fn progress_and_conditions() {
        let s = compute(base(None, 100));
        assert_eq!(s.progress.as_deref(), Some("37/50"));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Progressing").status, "True");
        assert_eq!(cond(&s, "Paused").status, "False");
        assert!(s
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn an_expired_campaign_fails_with_reason_expired_and_keeps_its_expiry() {
        let s = compute(StatusInput {
            phase: CampaignPhase::Failed,
            expired: true,
            ..base(None, 6000)
        });
        assert_eq!(cond(&s, "Ready").reason, "Expired");
        assert_eq!(cond(&s, "Stalled").reason, "Expired");
        assert_eq!(cond(&s, "Failed").reason, "Expired");
        assert_eq!(s.expires_at, Some(time(5000)));
        let t = compute(StatusInput {
            phase: CampaignPhase::Failed,
            ..base(None, 6000)
        });
        assert_eq!(cond(&t, "Ready").reason, "FailureThresholdExceeded");
    }

    #[test]
    fn unchanged_input_gives_identical_status_no_new_timestamps() {
        let first = compute(base(None, 100));
        let second = compute(base(Some(&first), 200));
        assert_eq!(first, second, "nothing changed, so nothing to write");
        let mut i = base(Some(&first), 300);
        i.phase = CampaignPhase::Succeeded;
        let third = compute(i);
        assert_eq!(cond(&third, "Ready").status, "True");
        assert_eq!(cond(&third, "Ready").last_transition_time, time(300));
        assert_eq!(
            cond(&third, "Failed").last_transition_time,
            time(100),
            "Failed stayed False"
        );
    }

    #[test]
    fn blocker_names_the_fix() {
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Pending;
        i.blocker = Some(Blocker {
            reason: BlockerReason::ManagerSecretMissing,
            message: "Secret manager not found: create it".into(),
        });
        let s = compute(i);
        let ready = cond(&s, "Ready");
        assert_eq!(ready.reason, "ManagerSecretMissing");
        assert!(ready.message.contains("create it"));
        assert_eq!(cond(&s, "Progressing").status, "False");
    }

    #[test]
    fn failed_and_paused_conditions() {
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Failed;
        let s = compute(i);
        assert_eq!(cond(&s, "Failed").status, "True");
        assert_eq!(cond(&s, "Ready").reason, "FailureThresholdExceeded");
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Paused;
        let s = compute(i);
        assert_eq!(cond(&s, "Paused").status, "True");
    }

    #[test]
    fn a_campaign_that_finished_with_failures_is_degraded_not_ready() {
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Completed;
        i.counts = DeviceCounts {
            selected: 5,
            failed: 5,
            ..DeviceCounts::default()
        };
        let s = compute(i);
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DevicesFailed")
        );
        assert!(
            ready.message.contains("0 of 5 devices installed"),
            "{}",
            ready.message
        );
        let degraded = cond(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "DevicesFailed")
        );
        assert_eq!(cond(&s, "Stalled").status, "True");
        assert_eq!(cond(&s, "Failed").status, "False", "the threshold held");
        assert_eq!(s.progress.as_deref(), Some("5/5"));
    }

    #[test]
    fn stalled_and_degraded_are_true_exactly_when_the_campaign_ended_short() {
        // kstatus reads Stalled=True as "Failed" at once (Flux stops waiting for its timeout).
        for phase in [
            CampaignPhase::Pending,
            CampaignPhase::Progressing,
            CampaignPhase::Paused,
            CampaignPhase::Succeeded,
            CampaignPhase::Completed,
            CampaignPhase::Failed,
            CampaignPhase::Aborted,
        ] {
            let mut i = base(None, 1);
            i.phase = phase;
            let s = compute(i);
            let stalled = cond(&s, "Stalled");
            let expected = matches!(
                phase,
                CampaignPhase::Completed | CampaignPhase::Failed | CampaignPhase::Aborted
            );
            assert_eq!(stalled.status == "True", expected, "{phase:?}");
            assert_eq!(stalled.status == "False", !expected, "{phase:?}");
            assert_eq!(cond(&s, "Degraded").status == "True", expected, "{phase:?}");
            assert_eq!(stalled.observed_generation, Some(3));
            assert_eq!(s.observed_generation, Some(3));
            // Ready keeps its meaning: True only for Succeeded.
            assert_eq!(
                cond(&s, "Ready").status == "True",
                phase == CampaignPhase::Succeeded
            );
        }
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Aborted;
        assert_eq!(cond(&compute(i), "Stalled").reason, "Aborted");
        let mut i = base(None, 1);
        i.phase = CampaignPhase::Failed;
        assert_eq!(
            cond(&compute(i), "Stalled").reason,
            "FailureThresholdExceeded"
        );
        // Unchanged phase: the transition time stays.
        let first = compute(base(None, 100));
        let second = compute(base(Some(&first), 200));
        assert_eq!(cond(&second, "Stalled").last_transition_time, time(100));
    }

    #[test]
    fn failures_are_bounded_and_sorted() {
        let mut i = base(None, 1);
        i.failures = (0..100)
            .rev()
            .map(|n| DeviceFailure {
                device: format!("dev-{n:03}"),
                reason: "Timeout".into(),
                message: "x".repeat(1000),
            })
            .collect();
        let s = compute(i);
        assert_eq!(s.failures.len(), MAX_LISTED_FAILURES);
        assert_eq!(s.failures[0].device, "dev-000");
        assert!(s.failures.iter().all(|f| f.message.len() <= 256));
    }

    #[test]
    fn campaign_object_stays_under_64_kib_at_10000_devices() {
        let mut i = base(None, 1);
        i.counts = DeviceCounts {
            selected: 10_000,
            pending: 0,
            in_progress: 0,
            succeeded: 9_000,
            failed: 1_000,
            ..DeviceCounts::default()
        };
        i.failures = (0..1000)
            .map(|n| DeviceFailure {
                device: format!("{}-{n}", "d".repeat(240)),
                reason: "R".repeat(200),
                message: "m".repeat(2000),
            })
            .collect();
        let status = compute(i);
        let spec: UpdateCampaignSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a".repeat(63)}},
            "targetVersion": "1.2.3",
            "payload": {"firmware": {"url": {"url": format!("https://{}", "u".repeat(2000)), "sha256": "0".repeat(64)}}},
            "managerSecretName": "m".repeat(253)
        }))
        .unwrap();
        let mut c = UpdateCampaign::new(&"c".repeat(253), spec);
        c.status = Some(status);
        let size = serde_json::to_vec(&c).unwrap().len();
        assert!(size < 64 * 1024, "campaign object is {size} bytes");
        assert!(size < 32 * 1024, "in fact far smaller: {size} bytes");
    }
}
