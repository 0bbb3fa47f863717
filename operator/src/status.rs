//! Pure computation of an `UpdateCampaign` status: phase, counts, progress, bounded failure list and
//! kstatus-style conditions (`Ready`, `Progressing`, `Failed`, `Stalled`, `Paused`) with `observedGeneration`.
//!
//! A condition's `lastTransitionTime` changes only when its status changes, so an unchanged campaign
//! produces an identical status and the controller skips the write. No I/O here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    CampaignPhase, DeviceCounts, DeviceFailure, UpdateCampaignStatus, MAX_LISTED_FAILURES,
};
use crate::reasons::BlockerReason;

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
}

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

    let finished = counts.succeeded + counts.failed;
    let (ready, ready_reason, ready_message) = match (&blocker, phase) {
        (_, CampaignPhase::Succeeded) => (
            true,
            "Succeeded",
            format!(
                "{} of {} devices installed the update, {} failed",
                counts.succeeded, counts.selected, counts.failed
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
        (_, CampaignPhase::Aborted) => (
            false,
            "Aborted",
            "spec.abort is set: the campaign stopped and its retained messages were cleared".to_owned(),
        ),
        (Some(b), _) => (false, b.reason.as_str(), bounded(&b.message, 1024)),
        (None, CampaignPhase::Paused) => (
            false,
            "Paused",
            "spec.paused is set: no new device starts; set it to false to resume".to_owned(),
        ),
        (None, CampaignPhase::Pending) => (
            false,
            "NoDevicesSelected",
            "spec.selector matches no Device in this namespace; label Devices or fix the selector"
                .to_owned(),
        ),
        (None, CampaignPhase::Progressing) => (
            false,
            "Progressing",
            format!("{finished} of {} devices finished", counts.selected),
        ),
    };
    let progressing = phase == CampaignPhase::Progressing && blocker.is_none();
    let stalled = matches!(phase, CampaignPhase::Failed | CampaignPhase::Aborted);
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
            match phase {
                CampaignPhase::Failed => failed_reason,
                CampaignPhase::Aborted => "Aborted",
                _ => "NotStalled",
            },
            match phase {
                CampaignPhase::Failed => format!(
                    "{} devices failed, more than spec.rollout.failureThreshold allows; the campaign will not continue",
                    counts.failed
                ),
                CampaignPhase::Aborted => "spec.abort is set; the campaign will not continue".to_owned(),
                _ => "the campaign can still make progress".to_owned(),
            },
        ),
        (
            "Paused",
            phase == CampaignPhase::Paused,
            if phase == CampaignPhase::Paused {
                "Paused"
            } else {
                "NotPaused"
            },
            if phase == CampaignPhase::Paused {
                "spec.paused is set".to_owned()
            } else {
                "spec.paused is not set".to_owned()
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
        failures,
        conditions,
        // Set by the coordinator from the shards' reports (`coordinate`) and its seed.
        shards: Vec::new(),
        sealed_seed: None,
    }
}

fn phase_reason(phase: CampaignPhase) -> &'static str {
    match phase {
        CampaignPhase::Pending => "Pending",
        CampaignPhase::Progressing => "Blocked",
        CampaignPhase::Paused => "Paused",
        CampaignPhase::Succeeded => "Succeeded",
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
                rolled_back: 0,
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
        }
    }

    fn cond<'a>(s: &'a UpdateCampaignStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
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
    fn stalled_is_true_exactly_for_failed_and_aborted() {
        // kstatus reads Stalled=True as "Failed" at once (Flux stops waiting for its timeout).
        for phase in [
            CampaignPhase::Pending,
            CampaignPhase::Progressing,
            CampaignPhase::Paused,
            CampaignPhase::Succeeded,
            CampaignPhase::Failed,
            CampaignPhase::Aborted,
        ] {
            let mut i = base(None, 1);
            i.phase = phase;
            let s = compute(i);
            let stalled = cond(&s, "Stalled");
            let expected = matches!(phase, CampaignPhase::Failed | CampaignPhase::Aborted);
            assert_eq!(stalled.status == "True", expected, "{phase:?}");
            assert_eq!(stalled.status == "False", !expected, "{phase:?}");
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
            rolled_back: 0,
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
        assert!(size < 16 * 1024, "in fact far smaller: {size} bytes");
    }
}
