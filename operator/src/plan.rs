//! Planning one reconcile pass of a campaign (pure): from the rollout's [`Decision`], what blocks
//! the campaign and what its status recorded, it settles the phase (a blocker holds it at
//! `Pending`, an expired campaign fails, a finished one waits until its Device writes landed),
//! what the session registry must do ([`Plan`]), which Events a person should see, and when the
//! campaign wakes again. The controller only fetches before it and acts after it.

use std::time::Duration;

use crate::crd::{CampaignPhase, GateFailureAction, UpdateCampaignStatus};
use crate::reasons::{BlockerReason, FailureReason};
use crate::rollout::{Decision, TimeoutOutcome};
use crate::runs::Plan;
use crate::status::Blocker;

/// What a pass is planned from.
#[derive(Clone, Debug)]
pub struct PassInput<'a> {
    /// Unix seconds.
    pub now: u64,
    /// The rollout's decision for this pass.
    pub decision: &'a Decision,
    /// What keeps the campaign from running, if anything.
    pub blocker: Option<&'a Blocker>,
    /// The status as stored.
    pub previous: &'a UpdateCampaignStatus,
    /// Whether the campaign's manifests expired (its recorded expiry passed).
    pub expired: bool,
    /// Device status writes of this replica not landed yet.
    pub writes_pending: bool,
    /// Seconds one device attempt may take.
    pub timeout_secs: u64,
    /// Whether this replica holds a run of the campaign.
    pub has_run: bool,
    /// spec.dryRun: plan only (phase Planned), start nothing.
    pub dry_run: bool,
    /// The gate after the current wave failed: what the spec says to do.
    pub gate_failed: Option<GateFailureAction>,
}

/// The plan of one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassPlan {
    /// The phase the status reports.
    pub phase: CampaignPhase,
    /// Whether the campaign failed because its manifests expired.
    pub expired: bool,
    /// What the session registry does.
    pub run: Plan,
    /// The campaign ended without a run here (an earlier process drove it): clear what the
    /// resources say it may have left retained; `Some(true)` also clears the devices' notify
    /// topics (only after success: otherwise they hold the devices' signed aborts).
    pub clear_recorded: Option<bool>,
    /// The campaign finished but holds its final phase until its Device writes landed.
    pub settling: bool,
}

/// The phase after a failed gate (pure): `onFailure: Abort` ends the campaign, `Pause` pauses a
/// progressing one (one replica or the coordinator of several).
pub fn gate_phase(phase: CampaignPhase, gate_failed: Option<GateFailureAction>) -> CampaignPhase {
    match gate_failed {
        Some(GateFailureAction::Abort) if !phase.is_terminal() => CampaignPhase::Aborted,
        Some(GateFailureAction::Pause) if phase == CampaignPhase::Progressing => {
            CampaignPhase::Paused
        }
        _ => phase,
    }
}

/// Plan the pass (pure).
pub fn plan_pass(input: &PassInput<'_>) -> PassPlan {
    let d = input.decision;
    let mut phase = gate_phase(d.phase, input.gate_failed);
    if input.blocker.is_some() && phase == CampaignPhase::Progressing {
        phase = CampaignPhase::Pending;
    }
    // A dry run plans and touches nothing; spec.abort still ends it.
    if input.dry_run && !phase.is_terminal() {
        phase = CampaignPhase::Planned;
    }
    // Past the expiry nothing of the campaign is installed any more: it fails (reason Expired).
    let expired = if input.previous.phase.is_terminal() {
        ready_reason(input.previous) == Some(FailureReason::Expired.as_str())
    } else {
        input.expired && !phase.is_terminal()
    };
    if expired {
        phase = CampaignPhase::Failed;
    }
    // The campaign says it ended only once the Device statuses it wrote have landed, so whoever
    // reads a finished campaign reads its devices' final records too.
    // This pass's own failures (timeouts out of attempts) are written after it: they count too.
    let writes_coming = d
        .timed_out
        .iter()
        .any(|t| matches!(t, TimeoutOutcome::Fail { .. }));
    let settling = phase.is_terminal()
        && !input.previous.phase.is_terminal()
        && (input.writes_pending || writes_coming);
    if settling {
        phase = CampaignPhase::Progressing;
    }
    let terminal = phase.is_terminal();
    let starts =
        !terminal && input.blocker.is_none() && phase == CampaignPhase::Progressing && !settling;
    PassPlan {
        phase,
        expired,
        run: Plan {
            timed_out: d.timed_out.clone(),
            start: if starts { d.start.clone() } else { Vec::new() },
            deadline: input.now + input.timeout_secs,
            end: terminal && input.has_run,
        },
        clear_recorded: (terminal && !input.has_run).then_some(phase == CampaignPhase::Succeeded),
        settling,
    }
}

/// The `Ready` condition's reason of a status.
pub fn ready_reason(s: &UpdateCampaignStatus) -> Option<&str> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.as_str())
}

/// An Event to publish on the campaign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning (a person should look) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub note: String,
}

/// The Events a transition from `previous` to `status` is worth (pure).
pub fn events(
    previous: &UpdateCampaignStatus,
    status: &UpdateCampaignStatus,
    blocker: Option<&Blocker>,
) -> Vec<PlannedEvent> {
    let mut out = Vec::new();
    let mut push = |warning, reason: &str, note: String| {
        out.push(PlannedEvent {
            warning,
            reason: reason.to_owned(),
            note,
        })
    };
    if let Some(b) = blocker {
        if ready_reason(previous) != Some(b.reason.as_str()) {
            push(true, b.reason.as_str(), b.message.clone());
        }
    }
    if previous.phase != status.phase || previous.observed_generation.is_none() {
        let n = &status.devices;
        match status.phase {
            CampaignPhase::Completed | CampaignPhase::Failed | CampaignPhase::Aborted => push(
                true,
                &format!("{:?}", status.phase),
                format!(
                    "campaign {:?}: {} succeeded, {} failed",
                    status.phase, n.succeeded, n.failed
                ),
            ),
            p => push(
                false,
                &format!("{p:?}"),
                format!(
                    "campaign {p:?}: {} of {} devices finished",
                    n.succeeded + n.failed,
                    n.selected
                ),
            ),
        }
    }
    if status.current_wave > previous.current_wave && status.phase == CampaignPhase::Progressing {
        push(
            false,
            "WaveStarted",
            format!(
                "wave {} of {} started",
                status.current_wave + 1,
                status.total_waves
            ),
        );
    }
    if status.devices.rolled_back > previous.devices.rolled_back {
        let names: Vec<&str> = status
            .failures
            .iter()
            .filter(|f| f.reason == FailureReason::RolledBack.as_str())
            .map(|f| f.device.as_str())
            .collect();
        push(
            true,
            "DeviceRolledBack",
            format!(
                "{} devices installed the update, failed their health check and rolled back (signed receipts on their Device status){}",
                status.devices.rolled_back,
                if names.is_empty() {
                    String::new()
                } else {
                    format!(": {}", names.join(", "))
                }
            ),
        );
    }
    if status.devices.joined > previous.devices.joined {
        push(
            false,
            "DevicesJoined",
            format!(
                "{} devices started matching spec.selector and joined the campaign ({} so far)",
                status.devices.joined - previous.devices.joined,
                status.devices.joined
            ),
        );
    }
    if status.devices.left > previous.devices.left {
        push(
            false,
            "DevicesLeft",
            format!(
                "{} devices stopped matching spec.selector or were deleted and were released ({} so far)",
                status.devices.left - previous.devices.left,
                status.devices.left
            ),
        );
    }
    let gate_state = |s: &UpdateCampaignStatus| s.gate.as_ref().map(|g| (g.wave, g.state.clone()));
    if let Some(g) = status
        .gate
        .as_ref()
        .filter(|_| gate_state(previous) != gate_state(status))
    {
        match g.state.as_str() {
            crate::gates::FAILED => push(true, crate::status::GATE_FAILED, g.message.clone()),
            crate::gates::PASSED => push(false, "GatePassed", g.message.clone()),
            crate::gates::WAITING_FOR_PROMOTION => push(false, "GateWaiting", g.message.clone()),
            _ => push(false, "GateSoaking", g.message.clone()),
        }
    }
    if status.devices.failed > previous.devices.failed {
        push(
            true,
            "DeviceFailed",
            format!(
                "{} devices failed so far (see status.failures and Device status)",
                status.devices.failed
            ),
        );
    }
    out
}

/// When the campaign is reconciled again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Only when something it watches changes (the campaign, its Devices, Secrets, ConfigMaps).
    OnChange,
    /// After this long (or earlier on a change).
    After(Duration),
}

/// Delay before the `n`th consecutive retry of something transient: 1 s doubling to 5 min.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(8)).min(Duration::from_secs(300))
}

/// When to wake (pure): a finished campaign and one blocked by something a person must fix wait
/// for a change; a transient blocker retries with backoff (`blocked_retries` in a row); a running
/// campaign wakes at its next deadline or backoff end (at least 1 s, at most 5 s later while
/// progressing, 30 s otherwise: a safety net, since Device writes wake it anyway); a status write
/// held back by the rate limit (`held_back`) is written once the limit allows.
pub fn wake(
    plan: &PassPlan,
    decision: &Decision,
    blocker: Option<&Blocker>,
    blocked_retries: u32,
    held_back: Option<Duration>,
    now: u64,
) -> Wake {
    let earliest = |d: Duration| match held_back {
        Some(h) => Wake::After(d.min(h)),
        None => Wake::After(d),
    };
    if plan.phase.is_terminal() {
        return held_back.map_or(Wake::OnChange, Wake::After);
    }
    if let Some(b) = blocker {
        if b.reason.is_transient() {
            return earliest(backoff(blocked_retries));
        }
        // Devices in flight before the blocker appeared still time out.
        return match decision.next_due {
            Some(t) => earliest(Duration::from_secs(t.saturating_sub(now).max(1))),
            None => held_back.map_or(Wake::OnChange, Wake::After),
        };
    }
    let due = decision
        .next_due
        .map(|t| Duration::from_secs(t.saturating_sub(now).max(1)))
        .unwrap_or(Duration::from_secs(30));
    let cap = if plan.phase == CampaignPhase::Progressing {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    earliest(if plan.settling {
        due.min(Duration::from_secs(1))
    } else {
        due.min(cap)
    })
}

/// The blocker a broker connection that is down means.
pub fn broker_blocker(error: &str) -> Blocker {
    Blocker {
        reason: BlockerReason::BrokerUnavailable,
        message: format!("the MQTT broker refuses or drops the connection ({error}); check --broker-url, TLS material and credentials"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeviceCounts;
    use crate::rollout::TimeoutOutcome;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn decision(phase: CampaignPhase) -> Decision {
        Decision {
            phase,
            current_wave: 0,
            total_waves: 1,
            // A device out of attempts in a pass that ends the campaign would hold it settling.
            timed_out: if phase.is_terminal() {
                Vec::new()
            } else {
                vec![TimeoutOutcome::Fail {
                    index: 0,
                    attempts: 1,
                }]
            },
            start: vec![(1, 1)],
            counts: DeviceCounts::default(),
            threshold_exceeded: false,
            next_due: Some(130),
            awaiting_gate: None,
            progress: Vec::new(),
        }
    }

    fn input<'a>(d: &'a Decision, previous: &'a UpdateCampaignStatus) -> PassInput<'a> {
        PassInput {
            now: 100,
            decision: d,
            blocker: None,
            previous,
            expired: false,
            writes_pending: false,
            timeout_secs: 60,
            has_run: true,
            dry_run: false,
            gate_failed: None,
        }
    }

    fn blocked(reason: BlockerReason) -> Blocker {
        Blocker {
            reason,
            message: "m".into(),
        }
    }

    #[test]
    fn a_progressing_pass_starts_and_times_out_devices() {
        let d = decision(CampaignPhase::Progressing);
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&input(&d, &prev));
        assert_eq!(p.phase, CampaignPhase::Progressing);
        assert_eq!(p.run.start, vec![(1, 1)]);
        assert_eq!(p.run.timed_out.len(), 1);
        assert_eq!(p.run.deadline, 160);
        assert!(!p.run.end && p.clear_recorded.is_none());
    }

    #[test]
    fn a_blocker_holds_at_pending_starts_nothing_but_timeouts_still_apply() {
        let d = decision(CampaignPhase::Progressing);
        let prev = UpdateCampaignStatus::default();
        let b = blocked(BlockerReason::ManagerSecretMissing);
        let p = plan_pass(&PassInput {
            blocker: Some(&b),
            ..input(&d, &prev)
        });
        assert_eq!(p.phase, CampaignPhase::Pending);
        assert!(p.run.start.is_empty());
        assert_eq!(p.run.timed_out.len(), 1);
    }

    #[test]
    fn an_expired_campaign_fails_and_ends_its_run_and_stays_expired() {
        let mut d = decision(CampaignPhase::Progressing);
        d.timed_out.clear();
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&PassInput {
            expired: true,
            ..input(&d, &prev)
        });
        assert_eq!((p.phase, p.expired), (CampaignPhase::Failed, true));
        assert!(p.run.end && p.run.start.is_empty());
        // Recorded as failed with reason Expired: it stays expired on later passes.
        let failed = UpdateCampaignStatus {
            phase: CampaignPhase::Failed,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Expired".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: crate::time::k8s_time(1),
            }],
            ..UpdateCampaignStatus::default()
        };
        let d = decision(CampaignPhase::Failed);
        let again = plan_pass(&input(&d, &failed));
        assert!(again.expired);
    }

    #[test]
    fn a_finished_campaign_settles_until_its_device_writes_landed() {
        let d = decision(CampaignPhase::Succeeded);
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&PassInput {
            writes_pending: true,
            ..input(&d, &prev)
        });
        assert_eq!(p.phase, CampaignPhase::Progressing);
        assert!(p.settling && !p.run.end && p.run.start.is_empty());
        let done = plan_pass(&input(&d, &prev));
        assert_eq!(done.phase, CampaignPhase::Succeeded);
        assert!(done.run.end);
    }

    #[test]
    fn a_campaign_finished_by_its_own_timeouts_settles_until_their_writes_land() {
        // The last devices time out in this very pass: their Failed writes come after it.
        let mut d = decision(CampaignPhase::Completed);
        d.timed_out = vec![TimeoutOutcome::Fail {
            index: 0,
            attempts: 1,
        }];
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&input(&d, &prev));
        assert!(p.settling, "{p:?}");
        assert_eq!(p.phase, CampaignPhase::Progressing);
        let quiet = decision(CampaignPhase::Completed);
        assert_eq!(
            plan_pass(&input(&quiet, &prev)).phase,
            CampaignPhase::Completed
        );
    }

    #[test]
    fn a_campaign_that_ended_under_another_process_clears_what_it_left() {
        let d = decision(CampaignPhase::Succeeded);
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&PassInput {
            has_run: false,
            ..input(&d, &prev)
        });
        assert_eq!(p.clear_recorded, Some(true));
        let d = decision(CampaignPhase::Aborted);
        let p = plan_pass(&PassInput {
            has_run: false,
            ..input(&d, &prev)
        });
        assert_eq!(p.clear_recorded, Some(false), "signed aborts stay retained");
    }

    #[test]
    fn blockers_a_person_must_fix_wait_for_a_change_transient_ones_back_off() {
        let mut d = decision(CampaignPhase::Progressing);
        d.next_due = None;
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&input(&d, &prev));
        let missing = blocked(BlockerReason::ManagerSecretMissing);
        assert_eq!(wake(&p, &d, Some(&missing), 3, None, 100), Wake::OnChange);
        let broker = blocked(BlockerReason::BrokerUnavailable);
        assert_eq!(
            wake(&p, &d, Some(&broker), 1, None, 100),
            Wake::After(Duration::from_secs(1))
        );
        assert_eq!(
            wake(&p, &d, Some(&broker), 4, None, 100),
            Wake::After(Duration::from_secs(8))
        );
        assert_eq!(backoff(50), Duration::from_secs(256));
        // A held-back status write still gets written.
        assert_eq!(
            wake(
                &p,
                &d,
                Some(&missing),
                1,
                Some(Duration::from_millis(300)),
                100
            ),
            Wake::After(Duration::from_millis(300))
        );
    }

    #[test]
    fn a_running_campaign_wakes_at_its_next_deadline_within_bounds() {
        let mut d = decision(CampaignPhase::Progressing);
        let prev = UpdateCampaignStatus::default();
        let p = plan_pass(&input(&d, &prev));
        assert_eq!(
            wake(&p, &d, None, 0, None, 100),
            Wake::After(Duration::from_secs(5))
        );
        d.next_due = Some(102);
        assert_eq!(
            wake(&p, &d, None, 0, None, 100),
            Wake::After(Duration::from_secs(2))
        );
        let done = plan_pass(&input(&decision(CampaignPhase::Succeeded), &prev));
        assert_eq!(wake(&done, &d, None, 0, None, 100), Wake::OnChange);
    }

    #[test]
    fn events_follow_transitions_once() {
        let prev = UpdateCampaignStatus {
            observed_generation: Some(1),
            ..UpdateCampaignStatus::default()
        };
        let mut now = prev.clone();
        now.phase = CampaignPhase::Progressing;
        now.devices.failed = 2;
        now.devices.rolled_back = 1;
        let b = blocked(BlockerReason::ManagerSecretMissing);
        let ev = events(&prev, &now, Some(&b));
        let reasons: Vec<_> = ev.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "ManagerSecretMissing",
                "Progressing",
                "DeviceRolledBack",
                "DeviceFailed"
            ]
        );
        assert!(ev[0].warning && !ev[1].warning);
        // The same status again: nothing new to say (the blocker is already the Ready reason).
        let mut again = now.clone();
        again.conditions = vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "ManagerSecretMissing".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: crate::time::k8s_time(1),
        }];
        assert!(events(&again, &again, Some(&b)).is_empty());
    }
}
