//! Pure rollout decisions: waves and canary, in-flight limit, timeouts and retries with backoff,
//! the failure threshold, pause and abort, and the policy's say over each device and each pass
//! ([`Hold`]s from arbitration, windows and versions; a start cap from the rate; a wave limit from
//! the gates; the schedule's deadline), which other modules decide.
//!
//! Everything here is a function of its inputs (including `now`): no clock, no I/O, no Kubernetes or
//! MQTT types. The controller feeds it what the resources and the in-memory sessions record and acts on
//! the returned [`Decision`].

use crate::crd::{CampaignPhase, DeviceCounts, RolloutSpec};
use crate::reasons::FailureReason;

/// A count ("3") or a percentage of the selected devices ("10%").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    /// An absolute number of devices.
    Count(u32),
    /// A percentage (0-100) of the selected devices, rounded up.
    Percent(u32),
}

/// A rollout field that the apiserver let through but that does not parse (older CRD, hand edits).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("spec.rollout.{field}: {value:?} is neither a count nor a percentage such as \"10%\"")]
pub struct AmountError {
    /// The field name under spec.rollout.
    pub field: &'static str,
    /// The offending value.
    pub value: String,
}

impl Amount {
    /// Parse "N" or "N%" (percentages up to 100).
    pub fn parse(field: &'static str, value: &str) -> Result<Self, AmountError> {
        let err = || AmountError {
            field,
            value: value.to_owned(),
        };
        if let Some(p) = value.strip_suffix('%') {
            let p: u32 = p.parse().map_err(|_| err())?;
            if p > 100 {
                return Err(err());
            }
            Ok(Amount::Percent(p))
        } else {
            value.parse().map(Amount::Count).map_err(|_| err())
        }
    }

    /// The number of devices this amount means out of `total`.
    pub fn resolve(self, total: u32) -> u32 {
        match self {
            Amount::Count(n) => n.min(total),
            Amount::Percent(p) => ((u64::from(total) * u64::from(p)).div_ceil(100)) as u32,
        }
    }
}

/// Validated rollout parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutParams {
    /// Canary size, if any.
    pub canary: Option<Amount>,
    /// Size of each later wave.
    pub wave_size: Amount,
    /// Most devices in flight at once.
    pub max_in_flight: u32,
    /// Seconds one attempt may take.
    pub timeout_secs: u64,
    /// Extra attempts after a timeout.
    pub retries: u32,
    /// Base backoff before a retry, doubled per further attempt.
    pub backoff_secs: u64,
    /// Failures tolerated before the campaign fails.
    pub failure_threshold: Option<Amount>,
}

impl RolloutParams {
    /// Validate the spec (pure).
    pub fn from_spec(spec: &RolloutSpec) -> Result<Self, AmountError> {
        let amount = |field, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| Amount::parse(field, v))
                .transpose()
        };
        Ok(Self::with_amounts(
            spec,
            amount("canary", &spec.canary)?,
            amount("waveSize", &spec.wave_size)?,
            amount("failureThreshold", &spec.failure_threshold)?,
        ))
    }

    /// The parameters of an empty `spec.rollout` (all defaults).
    pub fn defaults() -> Self {
        Self::with_amounts(&RolloutSpec::default(), None, None, None)
    }

    fn with_amounts(
        spec: &RolloutSpec,
        canary: Option<Amount>,
        wave_size: Option<Amount>,
        failure_threshold: Option<Amount>,
    ) -> Self {
        Self {
            canary,
            wave_size: wave_size.unwrap_or(Amount::Percent(100)),
            max_in_flight: spec.max_in_flight.max(1),
            timeout_secs: u64::from(spec.device_timeout_seconds.max(1)),
            retries: spec.retries,
            backoff_secs: u64::from(spec.retry_backoff_seconds.max(1)),
            failure_threshold,
        }
    }

    /// Backoff before attempt `next_attempt` (2 is the first retry).
    pub fn backoff(&self, next_attempt: u32) -> u64 {
        let doublings = next_attempt.saturating_sub(2).min(16);
        self.backoff_secs.saturating_mul(1 << doublings)
    }
}

/// Cumulative end index of each wave over `total` devices sorted by name. Wave 0 is the canary when
/// there is one. Empty when there are no devices.
pub fn wave_cutoffs(total: u32, params: &RolloutParams) -> Vec<u32> {
    let mut cutoffs = Vec::new();
    if total == 0 {
        return cutoffs;
    }
    let mut end = 0;
    if let Some(canary) = params.canary {
        let c = canary.resolve(total);
        if c > 0 {
            end = c.min(total);
            cutoffs.push(end);
        }
    }
    let step = params.wave_size.resolve(total).max(1);
    while end < total {
        end = end.saturating_add(step).min(total);
        cutoffs.push(end);
    }
    cutoffs
}

/// Where one device is in the campaign, as far as the controller knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not started yet.
    NotStarted,
    /// A session is running; it times out at `deadline`.
    InFlight {
        /// Unix seconds after which the attempt counts as timed out.
        deadline: u64,
        /// Attempt number, 1-based.
        attempt: u32,
    },
    /// Waiting to retry.
    Backoff {
        /// Unix seconds when the next attempt may start.
        until: u64,
        /// Attempts made so far.
        attempt: u32,
    },
    /// Signed receipt received.
    Succeeded,
    /// Refused, rolled back or out of attempts.
    Failed {
        /// Why.
        reason: FailureReason,
    },
}

impl Progress {
    /// Whether the device is done with the campaign (succeeded or failed).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Progress::Succeeded | Progress::Failed { .. })
    }
}

/// Why a device that this campaign has not started (or waits to retry) may not start now, as the
/// policy outside the rollout decided it: the device's version, the arbitration between campaigns,
/// its maintenance window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Hold {
    /// It may start.
    #[default]
    Free,
    /// It already runs the target version (its signed report on the Device): nothing to do. It
    /// counts as done, not as failed. Applies to devices the campaign never started.
    UpToDate,
    /// Another running campaign holds it: it waits until that campaign is done with it. Applies
    /// to devices the campaign never started.
    HeldElsewhere,
    /// Its own maintenance window is closed (a retry waits for it too).
    OutsideWindow,
    /// Left out by the policy for good (no certificate pin while one is required, or windows
    /// that never meet): never started; the campaign cannot succeed with it. Applies to devices
    /// the campaign never started.
    Excluded,
}

/// What a device is, once the policy's hold is applied to its progress.
fn held(p: &Progress, hold: Hold) -> Hold {
    match (p, hold) {
        (Progress::NotStarted, h) => h,
        (Progress::Backoff { .. }, Hold::OutsideWindow) => Hold::OutsideWindow,
        _ => Hold::Free,
    }
}

/// Whether the device is done with the campaign: finished, never needed (up to date) or left out.
pub fn done(p: &Progress, hold: Hold) -> bool {
    p.is_terminal() || matches!(held(p, hold), Hold::UpToDate | Hold::Excluded)
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct DecideInput<'a> {
    /// Unix seconds.
    pub now: u64,
    /// Progress of each selected device, in wave order (sorted by name).
    pub devices: &'a [Progress],
    /// Validated rollout parameters.
    pub params: &'a RolloutParams,
    /// spec.paused.
    pub paused: bool,
    /// spec.abort.
    pub abort: bool,
    /// Something keeps the campaign from starting devices (a blocker): nothing starts, and the
    /// counts say so.
    pub blocked: bool,
    /// Phase recorded on the status (terminal phases stick).
    pub previous_phase: CampaignPhase,
    /// Wave recorded on the status (waves never go back).
    pub previous_wave: u32,
    /// Sharded: how many of these devices, in wave order, the coordinator lets start (this shard's
    /// share of the current wave, see `coordinate`); waves are then the coordinator's and this
    /// decision starts nothing past it. `None`: the waves of `params` over these devices.
    pub eligible_limit: Option<u32>,
    /// The policy's hold of each device, in the order of `devices` (empty: every device free).
    pub holds: &'a [Hold],
    /// Most devices that may start in this pass beyond the in-flight limit's say (the rate limit;
    /// `Some(0)` while the campaign's schedule keeps every device waiting). `None`: no cap.
    pub start_cap: Option<u32>,
    /// Highest wave that may open (health gates: a wave opens once the gate after the previous
    /// one passed). `None`: no gate.
    pub wave_limit: Option<u32>,
    /// The schedule's deadline passed: nothing starts any more, and the campaign ends once no
    /// device is in flight.
    pub deadline_passed: bool,
    /// When the policy changes its mind next (a window opens, the rate allows more, a soak ends),
    /// folded into [`Decision::next_due`].
    pub policy_due: Option<u64>,
}

/// What happens to a device whose attempt timed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeoutOutcome {
    /// Retry after a backoff.
    Retry {
        /// Index of the device.
        index: usize,
        /// When the retry may start.
        until: u64,
        /// Attempts made so far.
        attempt: u32,
    },
    /// Out of attempts: the device failed with reason `Timeout`.
    Fail {
        /// Index of the device.
        index: usize,
        /// Attempts made.
        attempts: u32,
    },
}

/// The reconciler's marching orders for one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Campaign phase after this pass.
    pub phase: CampaignPhase,
    /// Current wave after this pass.
    pub current_wave: u32,
    /// Number of waves.
    pub total_waves: u32,
    /// Attempts that timed out, and what becomes of each.
    pub timed_out: Vec<TimeoutOutcome>,
    /// Devices to start now: (index, attempt number).
    pub start: Vec<(usize, u32)>,
    /// Device counts after this pass (timeouts and starts applied).
    pub counts: DeviceCounts,
    /// Whether the failure threshold is exceeded.
    pub threshold_exceeded: bool,
    /// Earliest time something becomes due (deadline or backoff), for the requeue.
    pub next_due: Option<u64>,
    /// The current wave finished but the next one is held by [`DecideInput::wave_limit`]: the
    /// gate after this wave decides.
    pub awaiting_gate: Option<u32>,
    /// Progress of each device after this pass (timeouts and starts applied), in input order.
    pub progress: Vec<Progress>,
}

/// Decide one pass of the rollout.
pub fn decide(input: &DecideInput<'_>) -> Decision {
    let params = input.params;
    let mut devices: Vec<Progress> = input.devices.to_vec();
    let total = devices.len() as u32;

    // 1. Timeouts (even when paused or aborted, so counts stay true).
    let mut timed_out = Vec::new();
    for (index, p) in devices.iter_mut().enumerate() {
        if let Progress::InFlight { deadline, attempt } = *p {
            if deadline <= input.now {
                if attempt <= params.retries {
                    let until = input.now + params.backoff(attempt + 1);
                    timed_out.push(TimeoutOutcome::Retry {
                        index,
                        until,
                        attempt,
                    });
                    *p = Progress::Backoff { until, attempt };
                } else {
                    timed_out.push(TimeoutOutcome::Fail {
                        index,
                        attempts: attempt,
                    });
                    *p = Progress::Failed {
                        reason: FailureReason::Timeout,
                    };
                }
            }
        }
    }

    let hold = |i: usize| input.holds.get(i).copied().unwrap_or_default();
    let failed = devices
        .iter()
        .filter(|p| matches!(p, Progress::Failed { .. }))
        .count() as u32;
    let excluded = devices
        .iter()
        .enumerate()
        .any(|(i, p)| held(p, hold(i)) == Hold::Excluded);
    let threshold_exceeded = params
        .failure_threshold
        .is_some_and(|t| failed > t.resolve(total));

    let cutoffs = wave_cutoffs(total, params);
    let total_waves = cutoffs.len() as u32;
    let wave_done = |w: u32| {
        devices[..cutoffs[w as usize] as usize]
            .iter()
            .enumerate()
            .all(|(i, p)| done(p, hold(i)))
    };
    let mut current_wave = input.previous_wave.min(total_waves.saturating_sub(1));
    let mut awaiting_gate = None;
    while (current_wave as usize) + 1 < cutoffs.len()
        && wave_done(current_wave)
        && !threshold_exceeded
    {
        if input.wave_limit.is_some_and(|l| current_wave >= l) {
            awaiting_gate = Some(current_wave);
            break;
        }
        current_wave += 1;
    }

    let all_done = total > 0 && devices.iter().enumerate().all(|(i, p)| done(p, hold(i)));
    // Past the schedule's deadline nothing starts: the campaign ends once nothing is in flight.
    let out_of_time = input.deadline_passed
        && total > 0
        && !devices
            .iter()
            .any(|p| matches!(p, Progress::InFlight { .. }));
    // Unusable inputs (a missing Secret, an unreadable image) before this campaign started any
    // device: it vouches for nothing, even when every device already runs the version it names.
    let blocked_before_start =
        input.blocked && devices.iter().all(|p| matches!(p, Progress::NotStarted));
    let phase = if input.previous_phase.is_terminal() {
        input.previous_phase
    } else if input.abort {
        CampaignPhase::Aborted
    } else if blocked_before_start {
        CampaignPhase::Progressing
    } else if threshold_exceeded {
        CampaignPhase::Failed
    } else if all_done && failed == 0 && !excluded {
        CampaignPhase::Succeeded
    } else if all_done || out_of_time {
        // Finished (or out of time), but not every device runs the target version: never called
        // a success.
        CampaignPhase::Completed
    } else if input.paused {
        CampaignPhase::Paused
    } else if total == 0 {
        CampaignPhase::Pending
    } else {
        CampaignPhase::Progressing
    };

    // 2. Starts: only while progressing and not blocked, inside the current wave, under the
    //    in-flight limit.
    let mut start = Vec::new();
    if phase == CampaignPhase::Progressing && !input.blocked && !input.deadline_passed {
        let in_flight = devices
            .iter()
            .filter(|p| matches!(p, Progress::InFlight { .. }))
            .count() as u32;
        let mut budget = params.max_in_flight.saturating_sub(in_flight);
        if let Some(cap) = input.start_cap {
            budget = budget.min(cap);
        }
        let eligible = input
            .eligible_limit
            .or_else(|| cutoffs.get(current_wave as usize).copied())
            .unwrap_or(0) as usize;
        for (index, p) in devices.iter_mut().enumerate().take(eligible) {
            if budget == 0 {
                break;
            }
            if held(p, hold(index)) != Hold::Free {
                continue;
            }
            let attempt = match *p {
                Progress::NotStarted => 1,
                Progress::Backoff { until, attempt } if until <= input.now => attempt + 1,
                _ => continue,
            };
            start.push((index, attempt));
            *p = Progress::InFlight {
                deadline: input.now + params.timeout_secs,
                attempt,
            };
            budget -= 1;
        }
    }

    let next_due = if phase.is_terminal() {
        None
    } else {
        devices
            .iter()
            .filter_map(|p| match *p {
                Progress::InFlight { deadline, .. } => Some(deadline),
                Progress::Backoff { until, .. } => Some(until),
                _ => None,
            })
            .chain(input.policy_due)
            .min()
    };

    Decision {
        phase,
        current_wave,
        total_waves,
        timed_out,
        start,
        counts: count(&devices, input.holds),
        threshold_exceeded,
        next_due,
        awaiting_gate: awaiting_gate.filter(|_| phase == CampaignPhase::Progressing),
        progress: devices,
    }
}

/// Count devices per phase (with the policy's holds, in the same order; empty: none).
pub fn count(devices: &[Progress], holds: &[Hold]) -> DeviceCounts {
    let mut c = DeviceCounts {
        selected: devices.len() as u32,
        ..DeviceCounts::default()
    };
    for (i, p) in devices.iter().enumerate() {
        match (p, held(p, holds.get(i).copied().unwrap_or_default())) {
            (_, Hold::UpToDate) => c.up_to_date += 1,
            (_, Hold::HeldElsewhere) => c.waiting += 1,
            (_, Hold::OutsideWindow) => c.outside_window += 1,
            (_, Hold::Excluded) => c.excluded += 1,
            (Progress::NotStarted | Progress::Backoff { .. }, _) => c.pending += 1,
            (Progress::InFlight { .. }, _) => c.in_progress += 1,
            (Progress::Succeeded, _) => c.succeeded += 1,
            (Progress::Failed { reason }, _) => {
                c.failed += 1;
                if *reason == FailureReason::RolledBack {
                    c.rolled_back += 1;
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RolloutParams {
        RolloutParams::from_spec(&RolloutSpec::default()).unwrap()
    }

    fn input<'a>(devices: &'a [Progress], params: &'a RolloutParams) -> DecideInput<'a> {
        DecideInput {
            now: 1000,
            devices,
            params,
            paused: false,
            abort: false,
            blocked: false,
            previous_phase: CampaignPhase::Pending,
            previous_wave: 0,
            eligible_limit: None,
            holds: &[],
            start_cap: None,
            wave_limit: None,
            deadline_passed: false,
            policy_due: None,
        }
    }

    #[test]
    fn amounts_parse_and_resolve() {
        assert_eq!(Amount::parse("canary", "3"), Ok(Amount::Count(3)));
        assert_eq!(Amount::parse("canary", "10%"), Ok(Amount::Percent(10)));
        assert!(Amount::parse("canary", "101%").is_err());
        assert!(Amount::parse("canary", "x").is_err());
        assert_eq!(Amount::Percent(10).resolve(15), 2, "rounded up");
        assert_eq!(Amount::Percent(0).resolve(15), 0);
        assert_eq!(Amount::Count(30).resolve(15), 15, "capped at total");
    }

    #[test]
    fn waves_with_canary_then_fixed_size() {
        let mut p = params();
        p.canary = Some(Amount::Count(2));
        p.wave_size = Amount::Percent(25);
        assert_eq!(wave_cutoffs(10, &p), vec![2, 5, 8, 10]);
        p.canary = None;
        p.wave_size = Amount::Percent(100);
        assert_eq!(wave_cutoffs(10, &p), vec![10]);
        assert!(wave_cutoffs(0, &p).is_empty());
        p.canary = Some(Amount::Percent(100));
        assert_eq!(
            wave_cutoffs(4, &p),
            vec![4],
            "canary covering all is one wave"
        );
    }

    #[test]
    fn a_blocked_campaign_starts_nothing_and_counts_it_pending() {
        let p = params();
        let devices = vec![Progress::NotStarted; 3];
        let d = decide(&DecideInput {
            blocked: true,
            ..input(&devices, &p)
        });
        assert!(d.start.is_empty());
        assert_eq!((d.counts.pending, d.counts.in_progress), (3, 0));
        assert_eq!(d.phase, CampaignPhase::Progressing);
    }

    #[test]
    fn a_campaign_blocked_before_its_first_start_never_finishes_on_devices_already_up_to_date() {
        let p = params();
        let devices = vec![Progress::NotStarted; 3];
        let holds = vec![Hold::UpToDate; 3];
        let blocked = decide(&DecideInput {
            blocked: true,
            holds: &holds,
            ..input(&devices, &p)
        });
        assert_eq!(blocked.phase, CampaignPhase::Progressing);
        assert_eq!(blocked.counts.up_to_date, 3);
        let unblocked = decide(&DecideInput {
            holds: &holds,
            ..input(&devices, &p)
        });
        assert_eq!(unblocked.phase, CampaignPhase::Succeeded);
    }

    #[test]
    fn starts_respect_in_flight_limit_and_wave() {
        let mut p = params();
        p.max_in_flight = 3;
        p.canary = Some(Amount::Count(2));
        let devices = vec![Progress::NotStarted; 10];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.phase, CampaignPhase::Progressing);
        assert_eq!(d.start, vec![(0, 1), (1, 1)], "only the canary starts");
        assert_eq!(d.counts.in_progress, 2);
        assert_eq!(d.next_due, Some(1000 + 300));

        // Canary done: wave 1 opens, limited to 3 in flight.
        let mut devices = devices;
        devices[0] = Progress::Succeeded;
        devices[1] = Progress::Succeeded;
        let d = decide(&input(&devices, &p));
        assert_eq!(d.current_wave, 1);
        assert_eq!(d.start, vec![(2, 1), (3, 1), (4, 1)]);
    }

    #[test]
    fn in_flight_devices_use_up_the_budget() {
        let mut p = params();
        p.max_in_flight = 2;
        let devices = vec![
            Progress::InFlight {
                deadline: 2000,
                attempt: 1,
            },
            Progress::NotStarted,
            Progress::NotStarted,
        ];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.start, vec![(1, 1)]);
    }

    #[test]
    fn timeout_retries_with_backoff_then_fails() {
        let mut p = params();
        p.retries = 1;
        p.backoff_secs = 10;
        let devices = vec![Progress::InFlight {
            deadline: 1000,
            attempt: 1,
        }];
        let d = decide(&input(&devices, &p));
        assert_eq!(
            d.timed_out,
            vec![TimeoutOutcome::Retry {
                index: 0,
                until: 1010,
                attempt: 1
            }]
        );
        assert!(d.start.is_empty(), "backoff not over yet");
        assert_eq!(d.next_due, Some(1010));

        let devices = vec![Progress::Backoff {
            until: 1000,
            attempt: 1,
        }];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.start, vec![(0, 2)], "retry is attempt 2");

        let devices = vec![Progress::InFlight {
            deadline: 999,
            attempt: 2,
        }];
        let d = decide(&input(&devices, &p));
        assert_eq!(
            d.timed_out,
            vec![TimeoutOutcome::Fail {
                index: 0,
                attempts: 2
            }]
        );
        assert_eq!(
            d.phase,
            CampaignPhase::Completed,
            "all finished with a failure and no threshold: completed, not succeeded"
        );
        assert_eq!(d.counts.failed, 1);
    }

    #[test]
    fn succeeded_only_when_every_device_installed() {
        let p = params();
        let timeout = || Progress::Failed {
            reason: FailureReason::Timeout,
        };
        // The report of issue 15: every device timed out, no threshold set.
        let devices = vec![timeout(); 5];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.phase, CampaignPhase::Completed);
        assert_eq!((d.counts.succeeded, d.counts.failed), (0, 5));
        let devices = vec![Progress::Succeeded, timeout()];
        assert_eq!(decide(&input(&devices, &p)).phase, CampaignPhase::Completed);
        let devices = vec![Progress::Succeeded; 3];
        assert_eq!(decide(&input(&devices, &p)).phase, CampaignPhase::Succeeded);
        // Within a threshold, failures still complete the campaign rather than succeed it.
        let mut p = params();
        p.failure_threshold = Some(Amount::Count(1));
        let devices = vec![Progress::Succeeded, timeout()];
        assert_eq!(decide(&input(&devices, &p)).phase, CampaignPhase::Completed);
    }

    #[test]
    fn holds_keep_devices_back_and_count_apart() {
        let p = params();
        let devices = vec![
            Progress::NotStarted,
            Progress::NotStarted,
            Progress::NotStarted,
            Progress::Backoff {
                until: 0,
                attempt: 1,
            },
            Progress::NotStarted,
        ];
        let holds = [
            Hold::UpToDate,
            Hold::HeldElsewhere,
            Hold::OutsideWindow,
            Hold::OutsideWindow,
            Hold::Free,
        ];
        let d = decide(&DecideInput {
            holds: &holds,
            ..input(&devices, &p)
        });
        assert_eq!(d.start, vec![(4, 1)], "only the free device starts");
        let c = d.counts;
        assert_eq!(
            (
                c.up_to_date,
                c.waiting,
                c.outside_window,
                c.in_progress,
                c.pending
            ),
            (1, 1, 2, 1, 0)
        );
        // A device held elsewhere keeps the campaign running; one up to date does not.
        let devices = vec![Progress::Succeeded, Progress::NotStarted];
        for (hold, phase) in [
            (Hold::UpToDate, CampaignPhase::Succeeded),
            (Hold::Excluded, CampaignPhase::Completed),
            (Hold::HeldElsewhere, CampaignPhase::Progressing),
            (Hold::OutsideWindow, CampaignPhase::Progressing),
        ] {
            let holds = [Hold::Free, hold];
            let d = decide(&DecideInput {
                holds: &holds,
                ..input(&devices, &p)
            });
            assert_eq!(d.phase, phase, "{hold:?}");
        }
        // A hold does not touch a device this campaign already runs.
        let devices = vec![Progress::InFlight {
            deadline: 5000,
            attempt: 1,
        }];
        let d = decide(&DecideInput {
            holds: &[Hold::UpToDate],
            ..input(&devices, &p)
        });
        assert_eq!(d.counts.in_progress, 1);
    }

    #[test]
    fn a_start_cap_limits_the_pass_and_the_policy_wakes_it() {
        let p = params();
        let devices = vec![Progress::NotStarted; 6];
        let d = decide(&DecideInput {
            start_cap: Some(2),
            policy_due: Some(1030),
            ..input(&devices, &p)
        });
        assert_eq!(d.start, vec![(0, 1), (1, 1)]);
        assert_eq!(
            d.next_due,
            Some(1030),
            "earlier than the attempts' deadline"
        );
        let d = decide(&DecideInput {
            start_cap: Some(0),
            ..input(&devices, &p)
        });
        assert!(d.start.is_empty());
        assert_eq!(d.phase, CampaignPhase::Progressing);
    }

    #[test]
    fn a_wave_limit_holds_the_next_wave_for_the_gate() {
        let mut p = params();
        p.canary = Some(Amount::Count(1));
        let devices = vec![
            Progress::Succeeded,
            Progress::NotStarted,
            Progress::NotStarted,
        ];
        let d = decide(&DecideInput {
            wave_limit: Some(0),
            ..input(&devices, &p)
        });
        assert_eq!((d.current_wave, d.awaiting_gate), (0, Some(0)));
        assert!(d.start.is_empty());
        let d = decide(&DecideInput {
            wave_limit: Some(1),
            ..input(&devices, &p)
        });
        assert_eq!((d.current_wave, d.awaiting_gate), (1, None));
        assert_eq!(d.start, vec![(1, 1), (2, 1)]);
        // Not while the canary still runs.
        let devices = vec![Progress::NotStarted; 3];
        let d = decide(&DecideInput {
            wave_limit: Some(0),
            ..input(&devices, &p)
        });
        assert_eq!(d.awaiting_gate, None);
    }

    #[test]
    fn past_the_deadline_nothing_starts_and_the_campaign_completes_when_idle() {
        let p = params();
        let devices = vec![
            Progress::Succeeded,
            Progress::InFlight {
                deadline: 5000,
                attempt: 1,
            },
            Progress::NotStarted,
        ];
        let d = decide(&DecideInput {
            deadline_passed: true,
            ..input(&devices, &p)
        });
        assert!(d.start.is_empty());
        assert_eq!(d.phase, CampaignPhase::Progressing, "one still in flight");
        let devices = vec![
            Progress::Succeeded,
            Progress::Succeeded,
            Progress::NotStarted,
        ];
        let d = decide(&DecideInput {
            deadline_passed: true,
            ..input(&devices, &p)
        });
        assert_eq!(d.phase, CampaignPhase::Completed);
        assert_eq!(d.counts.pending, 1);
    }

    #[test]
    fn backoff_doubles() {
        let mut p = params();
        p.backoff_secs = 10;
        assert_eq!(p.backoff(2), 10);
        assert_eq!(p.backoff(3), 20);
        assert_eq!(p.backoff(4), 40);
    }

    #[test]
    fn failure_threshold_fails_the_campaign_and_stops_starts() {
        let mut p = params();
        p.failure_threshold = Some(Amount::Count(1));
        let fail = || Progress::Failed {
            reason: FailureReason::NotNewer,
        };
        let devices = vec![fail(), Progress::NotStarted, Progress::NotStarted];
        let d = decide(&input(&devices, &p));
        assert_eq!(
            d.phase,
            CampaignPhase::Progressing,
            "one failure is tolerated"
        );
        let devices = vec![fail(), fail(), Progress::NotStarted];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.phase, CampaignPhase::Failed);
        assert!(d.threshold_exceeded);
        assert!(d.start.is_empty());
        assert_eq!(d.next_due, None);
    }

    #[test]
    fn threshold_holds_the_wave() {
        let mut p = params();
        p.canary = Some(Amount::Count(1));
        p.failure_threshold = Some(Amount::Count(0));
        let devices = vec![
            Progress::Failed {
                reason: FailureReason::Timeout,
            },
            Progress::NotStarted,
        ];
        let d = decide(&input(&devices, &p));
        assert_eq!(d.current_wave, 0);
        assert_eq!(d.phase, CampaignPhase::Failed);
    }

    #[test]
    fn pause_holds_new_devices_back_but_counts_timeouts() {
        let p = params();
        let devices = vec![
            Progress::InFlight {
                deadline: 5000,
                attempt: 1,
            },
            Progress::NotStarted,
        ];
        let mut i = input(&devices, &p);
        i.paused = true;
        let d = decide(&i);
        assert_eq!(d.phase, CampaignPhase::Paused);
        assert!(d.start.is_empty());
        assert_eq!(d.counts.in_progress, 1);
        i.paused = false;
        assert_eq!(decide(&i).start, vec![(1, 1)], "resume starts it");
    }

    #[test]
    fn abort_wins_and_terminal_phases_stick() {
        let p = params();
        let devices = vec![Progress::NotStarted];
        let mut i = input(&devices, &p);
        i.abort = true;
        i.paused = true;
        let d = decide(&i);
        assert_eq!(d.phase, CampaignPhase::Aborted);
        assert!(d.start.is_empty());

        i.abort = false;
        i.previous_phase = CampaignPhase::Succeeded;
        let d = decide(&i);
        assert_eq!(
            d.phase,
            CampaignPhase::Succeeded,
            "a new device does not reopen it"
        );
        assert!(d.start.is_empty());
    }

    #[test]
    fn no_devices_is_pending() {
        let p = params();
        let d = decide(&input(&[], &p));
        assert_eq!(d.phase, CampaignPhase::Pending);
        assert_eq!(d.total_waves, 0);
        assert!(d.start.is_empty());
    }

    #[test]
    fn joining_device_in_open_wave_starts() {
        let p = params();
        let devices = vec![
            Progress::Succeeded,
            Progress::Succeeded,
            Progress::NotStarted,
        ];
        let mut i = input(&devices, &p);
        i.previous_phase = CampaignPhase::Progressing;
        let d = decide(&i);
        assert_eq!(d.start, vec![(2, 1)]);
        assert_eq!(d.counts.succeeded, 2);
    }

    #[test]
    fn waves_never_go_back() {
        let mut p = params();
        p.canary = Some(Amount::Count(1));
        let devices = vec![
            Progress::Succeeded,
            Progress::NotStarted,
            Progress::NotStarted,
        ];
        let mut i = input(&devices, &p);
        i.previous_wave = 1;
        let d = decide(&i);
        assert_eq!(d.current_wave, 1);
        assert_eq!(d.start, vec![(1, 1), (2, 1)]);
    }
}
