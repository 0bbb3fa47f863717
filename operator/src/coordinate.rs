//! Campaign decisions across shards (pure). The replica holding a shard decides which of its own
//! devices start, time out and retry (`rollout::decide` over the shard's devices, limited by its
//! assignment); the coordinator (the holder of the leader Lease) adds every shard's report up and
//! decides what is campaign-wide: the phase, the wave (a wave starts when every shard finished its
//! share of the one before), the failure threshold over all shards, and each shard's assignment —
//! its share of the current wave and of `maxInFlight`, apportioned to the shards' sizes
//! (`shards::apportion`), so a canary of 3 devices is 3 devices whatever the shard count. The
//! assignments travel in the campaign's status (`status.shards`), which every replica watches.
//! No I/O here.

use crate::crd::{
    CampaignPhase, DeviceCounts, DeviceFailure, ShardAssignment, UpdateCampaignStatus,
    MAX_LISTED_FAILURES,
};
use crate::reasons::{BlockerReason, FailureReason};
use crate::rollout::{done, wave_cutoffs, Decision, Hold, Progress, RolloutParams};
use crate::shard_crd::CampaignShardSpec;
use crate::shards::{apportion, ShardCount};
use crate::status::Blocker;

/// What the coordinator decides from.
#[derive(Clone, Debug)]
pub struct CoordinateInput<'a> {
    /// Shards of the deployment.
    pub shards: ShardCount,
    /// The report of each shard on this campaign (uid and shard count checked), by shard index.
    pub reports: &'a [Option<&'a CampaignShardSpec>],
    /// The campaign's rollout parameters.
    pub params: &'a RolloutParams,
    /// spec.paused.
    pub paused: bool,
    /// spec.abort.
    pub abort: bool,
    /// What keeps the whole campaign from running (its spec, its inputs), as the coordinator sees it.
    pub blocker: Option<&'a Blocker>,
    /// The status as stored.
    pub previous: &'a UpdateCampaignStatus,
    /// Whether the campaign's recorded expiry passed.
    pub expired: bool,
    /// Whether spec.schedule.deadline passed: no shard starts any more, the campaign ends
    /// (`Completed`) once nothing is in flight.
    pub deadline_passed: bool,
}

/// The coordinator's decision for one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coordination {
    /// The phase the status reports.
    pub phase: CampaignPhase,
    /// Whether it failed because its manifests expired.
    pub expired: bool,
    /// Every shard's devices added up.
    pub counts: DeviceCounts,
    /// Current wave (0 is the canary).
    pub current_wave: u32,
    /// Number of waves.
    pub total_waves: u32,
    /// What each shard may start.
    pub assignments: Vec<ShardAssignment>,
    /// Failed devices of every shard (the status lists the first by name).
    pub failures: Vec<DeviceFailure>,
    /// What the status names as keeping the campaign waiting: the coordinator's blocker, else a
    /// shard's when every shard with devices is blocked.
    pub blocker: Option<Blocker>,
    /// Every device finished but some final Device writes have not landed: the phase waits.
    pub settling: bool,
    /// Shards that have not reported on this campaign yet.
    pub unreported: Vec<u32>,
}

fn shard_blocker(r: &CampaignShardSpec) -> Option<Blocker> {
    let reason = r.blocker_reason.as_deref()?;
    let reason = BlockerReason::ALL
        .into_iter()
        .find(|b| b.as_str() == reason)?;
    Some(Blocker {
        reason,
        message: format!(
            "shard {} ({}): {}",
            r.shard,
            r.holder,
            r.blocker_message.as_deref().unwrap_or_default()
        ),
    })
}

fn add(total: &mut DeviceCounts, c: &DeviceCounts) {
    total.selected += c.selected;
    total.pending += c.pending;
    total.in_progress += c.in_progress;
    total.succeeded += c.succeeded;
    total.failed += c.failed;
    total.rolled_back += c.rolled_back;
    total.up_to_date += c.up_to_date;
    total.waiting += c.waiting;
    total.outside_window += c.outside_window;
    total.excluded += c.excluded;
}

/// Decide the campaign-wide state from the shards' reports (pure).
pub fn coordinate(input: &CoordinateInput<'_>) -> Coordination {
    let n = input.shards.get() as usize;
    let report = |k: usize| input.reports.get(k).copied().flatten();
    let unreported: Vec<u32> = (0..n)
        .filter(|&k| report(k).is_none_or(|r| !r.prepared))
        .map(|k| k as u32)
        .collect();
    let complete = unreported.is_empty();
    let mut counts = DeviceCounts::default();
    let mut failures = Vec::new();
    for r in (0..n).filter_map(report) {
        add(&mut counts, &r.devices);
        failures.extend(r.failures.iter().cloned());
    }
    let sizes: Vec<u32> = (0..n)
        .map(|k| report(k).map_or(0, |r| r.devices.selected))
        .collect();
    let done: Vec<u32> = (0..n)
        .map(|k| report(k).map_or(0, |r| r.done_through))
        .collect();
    let total = counts.selected;
    let params = input.params;

    let threshold_exceeded = params
        .failure_threshold
        .is_some_and(|t| counts.failed > t.resolve(total));
    let cutoffs = wave_cutoffs(total, params);
    let total_waves = cutoffs.len() as u32;
    let share = |w: u32| apportion(cutoffs.get(w as usize).copied().unwrap_or(0), &sizes);
    let mut current_wave = input
        .previous
        .current_wave
        .min(total_waves.saturating_sub(1));
    while complete
        && !threshold_exceeded
        && current_wave + 1 < total_waves
        && share(current_wave).iter().zip(&done).all(|(s, d)| d >= s)
    {
        current_wave += 1;
    }

    // Up to date and left out (by the policy of the shard's replica) are done as well.
    let finished = counts.succeeded + counts.failed + counts.up_to_date + counts.excluded;
    let all_done = complete && total > 0 && finished >= total;
    let out_of_time = complete && total > 0 && input.deadline_passed && counts.in_progress == 0;
    let writes_pending = (0..n).filter_map(report).any(|r| r.writes_pending > 0);
    let previous = input.previous.phase;
    let expired = if previous.is_terminal() {
        crate::plan::ready_reason(input.previous) == Some(FailureReason::Expired.as_str())
    } else {
        input.expired
    };
    let mut settling = false;
    let blocked_shards: Vec<Blocker> = (0..n)
        .filter_map(report)
        .filter(|r| r.devices.selected > 0)
        .filter_map(shard_blocker)
        .collect();
    let every_shard_blocked = !blocked_shards.is_empty()
        && blocked_shards.len()
            == (0..n)
                .filter_map(report)
                .filter(|r| r.devices.selected > 0)
                .count();
    let blocker = input
        .blocker
        .cloned()
        .or_else(|| every_shard_blocked.then(|| blocked_shards[0].clone()));
    let phase = if previous.is_terminal() {
        previous
    } else if input.abort {
        CampaignPhase::Aborted
    } else if expired || threshold_exceeded {
        CampaignPhase::Failed
    } else if all_done && writes_pending {
        // The campaign says it ended only once the Device statuses it wrote have landed, so
        // whoever reads a finished campaign reads its devices' final records too.
        settling = true;
        CampaignPhase::Progressing
    } else if all_done && counts.failed == 0 && counts.excluded == 0 {
        CampaignPhase::Succeeded
    } else if all_done || out_of_time {
        // Finished (or out of time), but not every device runs the target version: never called
        // a success (as `rollout::decide` says for one shard).
        CampaignPhase::Completed
    } else if input.paused {
        CampaignPhase::Paused
    } else if !complete || total == 0 || blocker.is_some() {
        CampaignPhase::Pending
    } else {
        CampaignPhase::Progressing
    };

    let starting = phase == CampaignPhase::Progressing && !settling;
    let wave_end = if complete {
        share(current_wave)
    } else {
        vec![0; n]
    };
    let open: Vec<u32> = wave_end
        .iter()
        .zip(&done)
        .map(|(&end, &d)| end.saturating_sub(d))
        .collect();
    let in_flight = if starting {
        apportion(params.max_in_flight, &open)
    } else {
        vec![0; n]
    };
    let assignments = (0..n)
        .map(|k| ShardAssignment {
            shard: k as u32,
            holder: report(k).map(|r| r.holder.clone()),
            selected: sizes[k],
            finished: report(k).map_or(0, |r| {
                let d = &r.devices;
                d.succeeded + d.failed + d.up_to_date + d.excluded
            }),
            wave_end: wave_end[k],
            max_in_flight: in_flight[k],
            blocker: report(k).and_then(|r| r.blocker_reason.clone()),
        })
        .collect();
    Coordination {
        phase,
        expired: expired && phase == CampaignPhase::Failed,
        counts,
        current_wave,
        total_waves,
        assignments,
        failures,
        blocker,
        settling,
        unreported,
    }
}

/// The rollout parameters one shard decides with: its assignment's share of `maxInFlight`, and no
/// failure threshold (that is counted over every shard by the coordinator).
pub fn shard_params(params: &RolloutParams, assignment: Option<&ShardAssignment>) -> RolloutParams {
    RolloutParams {
        max_in_flight: assignment.map_or(0, |a| a.max_in_flight),
        failure_threshold: None,
        ..params.clone()
    }
}

/// Shard `shard`'s share of a campaign-wide rate of `per_minute` starts a minute (pure): the rate
/// apportioned to the sizes of the shards with devices left (`status.shards` as the coordinator
/// last wrote it). The shares add up to the rate and change only when the ramp raises it or a
/// shard finishes its last device and hands its share to the others (for the minute after that
/// the campaign may start up to that share more than its rate: README, unfinished). Before the
/// coordinator assigned anything the share is 0.
pub fn rate_share(per_minute: u32, assignments: &[ShardAssignment], shard: u32) -> u32 {
    let remaining: Vec<u32> = assignments
        .iter()
        .map(|a| {
            if a.finished < a.selected {
                a.selected
            } else {
                0
            }
        })
        .collect();
    assignments
        .iter()
        .position(|a| a.shard == shard)
        .map_or(0, |k| apportion(per_minute, &remaining)[k])
}

/// How many of the shard's devices, in wave order, are done (finished, up to date or left out by
/// the policy's `holds`) from the first one without a gap.
pub fn done_through(progress: &[Progress], holds: &[Hold]) -> u32 {
    progress
        .iter()
        .enumerate()
        .take_while(|(i, p)| done(p, holds.get(*i).copied().unwrap_or_default()))
        .count() as u32
}

/// What a shard reports from its own pass (pure): counts, the finished prefix, failures (at most
/// [`MAX_LISTED_FAILURES`], by name), writes pending and its blocker.
#[allow(clippy::too_many_arguments)]
pub fn shard_report(
    campaign: &str,
    uid: &str,
    shard: u32,
    shards: ShardCount,
    holder: &str,
    decision: &Decision,
    progress: &[Progress],
    holds: &[Hold],
    mut failures: Vec<DeviceFailure>,
    writes_pending: u32,
    prepared: bool,
    blocker: Option<&Blocker>,
) -> CampaignShardSpec {
    failures.sort_by(|a, b| a.device.cmp(&b.device));
    failures.truncate(MAX_LISTED_FAILURES);
    CampaignShardSpec {
        campaign: campaign.to_owned(),
        campaign_uid: uid.to_owned(),
        shard,
        shards: shards.get(),
        holder: crate::status::bounded(holder, 253),
        devices: decision.counts.clone(),
        done_through: done_through(progress, holds),
        writes_pending,
        prepared,
        failures,
        blocker_reason: blocker.map(|b| b.reason.as_str().to_owned()),
        blocker_message: blocker.map(|b| crate::status::bounded(&b.message, 1024)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Amount;

    fn params(max_in_flight: u32) -> RolloutParams {
        RolloutParams {
            max_in_flight,
            ..RolloutParams::defaults()
        }
    }

    #[test]
    fn the_rate_is_shared_by_the_devices_left_and_never_exceeded() {
        let assign = |shard, selected, finished| ShardAssignment {
            shard,
            holder: None,
            selected,
            finished,
            wave_end: selected,
            max_in_flight: 1,
            blocker: None,
        };
        let a = [assign(0, 10, 0), assign(1, 10, 0)];
        let shares: Vec<u32> = (0..2).map(|k| rate_share(4, &a, k)).collect();
        assert_eq!(shares, vec![2, 2]);
        // Devices finishing do not move the shares (the starts of the last minute stay bounded).
        let a = [assign(0, 10, 7), assign(1, 10, 1)];
        let shares: Vec<u32> = (0..2).map(|k| rate_share(4, &a, k)).collect();
        assert_eq!(shares, vec![2, 2]);
        // A shard with nothing left gives its share to the others.
        let a = [assign(0, 10, 10), assign(1, 10, 3)];
        let shares: Vec<u32> = (0..2).map(|k| rate_share(4, &a, k)).collect();
        assert_eq!(shares, vec![0, 4]);
        // An odd rate: the shares add up to it, not more.
        let a = [assign(0, 5, 0), assign(1, 5, 0), assign(2, 5, 0)];
        let shares: Vec<u32> = (0..3).map(|k| rate_share(2, &a, k)).collect();
        assert_eq!(shares.iter().sum::<u32>(), 2, "{shares:?}");
        // Not assigned yet: nothing starts.
        assert_eq!(rate_share(4, &[], 0), 0);
    }

    fn report(shard: u32, selected: u32, succeeded: u32, done_through: u32) -> CampaignShardSpec {
        CampaignShardSpec {
            campaign: "c".into(),
            campaign_uid: "u".into(),
            shard,
            shards: 4,
            holder: format!("r{shard}"),
            devices: DeviceCounts {
                selected,
                pending: selected - succeeded,
                succeeded,
                ..DeviceCounts::default()
            },
            done_through,
            prepared: true,
            ..CampaignShardSpec::default()
        }
    }

    fn run(
        reports: &[CampaignShardSpec],
        params: &RolloutParams,
        previous: &UpdateCampaignStatus,
    ) -> Coordination {
        let refs: Vec<Option<&CampaignShardSpec>> = reports.iter().map(Some).collect();
        coordinate(&CoordinateInput {
            shards: ShardCount::new(4).unwrap(),
            reports: &refs,
            params,
            paused: false,
            abort: false,
            blocker: None,
            previous,
            expired: false,
            deadline_passed: false,
        })
    }

    #[test]
    fn devices_up_to_date_or_left_out_by_a_shard_s_policy_count_as_done() {
        let held = [
            Progress::NotStarted,
            Progress::Succeeded,
            Progress::NotStarted,
        ];
        let holds = [Hold::UpToDate, Hold::Free, Hold::OutsideWindow];
        assert_eq!(done_through(&held, &holds), 2);
        let previous = UpdateCampaignStatus {
            phase: CampaignPhase::Progressing,
            ..UpdateCampaignStatus::default()
        };
        let mut reports: Vec<_> = (0..4).map(|k| report(k, 2, 2, 2)).collect();
        reports[1].devices = DeviceCounts {
            selected: 2,
            succeeded: 1,
            up_to_date: 1,
            ..DeviceCounts::default()
        };
        assert_eq!(
            run(&reports, &params(8), &previous).phase,
            CampaignPhase::Succeeded
        );
        reports[2].devices = DeviceCounts {
            selected: 2,
            succeeded: 1,
            excluded: 1,
            ..DeviceCounts::default()
        };
        let c = run(&reports, &params(8), &previous);
        assert_eq!((c.phase, c.counts.excluded), (CampaignPhase::Completed, 1));
        // Past the deadline with devices never started and none in flight: Completed.
        reports[2].devices = DeviceCounts {
            selected: 2,
            succeeded: 1,
            outside_window: 1,
            ..DeviceCounts::default()
        };
        let refs: Vec<Option<&CampaignShardSpec>> = reports.iter().map(Some).collect();
        let mut input = CoordinateInput {
            shards: ShardCount::new(4).unwrap(),
            reports: &refs,
            params: &params(8),
            paused: false,
            abort: false,
            blocker: None,
            previous: &previous,
            expired: false,
            deadline_passed: false,
        };
        assert_eq!(coordinate(&input).phase, CampaignPhase::Progressing);
        input.deadline_passed = true;
        assert_eq!(coordinate(&input).phase, CampaignPhase::Completed);
    }

    #[test]
    fn nothing_starts_until_every_shard_reported() {
        let reports = [report(0, 10, 0, 0), report(1, 10, 0, 0)];
        let refs: Vec<Option<&CampaignShardSpec>> =
            vec![Some(&reports[0]), None, Some(&reports[1]), None];
        let c = coordinate(&CoordinateInput {
            shards: ShardCount::new(4).unwrap(),
            reports: &refs,
            params: &params(100),
            paused: false,
            abort: false,
            blocker: None,
            previous: &UpdateCampaignStatus::default(),
            expired: false,
            deadline_passed: false,
        });
        assert_eq!(c.phase, CampaignPhase::Pending);
        assert_eq!(c.unreported, vec![1, 3]);
        assert!(c.assignments.iter().all(|a| a.max_in_flight == 0));
        assert_eq!(c.counts.selected, 20);
    }

    #[test]
    fn a_canary_is_its_size_over_all_shards_and_the_waves_wait_for_every_shard() {
        let mut p = params(100);
        p.canary = Some(Amount::Count(3));
        let previous = UpdateCampaignStatus::default();
        let fresh: Vec<_> = (0..4).map(|k| report(k, 10, 0, 0)).collect();
        let c = run(&fresh, &p, &previous);
        assert_eq!(c.phase, CampaignPhase::Progressing);
        assert_eq!((c.current_wave, c.total_waves), (0, 2));
        let ends: Vec<u32> = c.assignments.iter().map(|a| a.wave_end).collect();
        assert_eq!(ends.iter().sum::<u32>(), 3, "{ends:?}");
        let flights: Vec<u32> = c.assignments.iter().map(|a| a.max_in_flight).collect();
        assert_eq!(
            flights, ends,
            "no shard may start more than its canary share"
        );
        // Two of three canary shards done: still wave 0.
        let mut partly = fresh.clone();
        for (k, r) in partly.iter_mut().enumerate().take(2) {
            r.done_through = ends[k];
        }
        assert_eq!(run(&partly, &p, &previous).current_wave, 0);
        // Every shard finished its share: wave 1, every device eligible.
        let mut all = fresh.clone();
        for (k, r) in all.iter_mut().enumerate() {
            r.done_through = ends[k];
        }
        let c = run(&all, &p, &previous);
        assert_eq!(c.current_wave, 1);
        assert!(c.assignments.iter().all(|a| a.wave_end == 10));
        assert_eq!(
            c.assignments.iter().map(|a| a.max_in_flight).sum::<u32>(),
            40 - 3
        );
    }

    #[test]
    fn max_in_flight_goes_to_shards_with_eligible_work_and_never_exceeds_the_spec() {
        let p = params(5);
        let previous = UpdateCampaignStatus::default();
        let mut reports: Vec<_> = (0..4).map(|k| report(k, 10, 0, 0)).collect();
        let c = run(&reports, &p, &previous);
        let flights: Vec<u32> = c.assignments.iter().map(|a| a.max_in_flight).collect();
        assert_eq!(flights.iter().sum::<u32>(), 5);
        assert!(flights.iter().all(|&f| f >= 1), "{flights:?}");
        // Shard 0 finished everything: its share moves to the others.
        reports[0] = report(0, 10, 10, 10);
        let c = run(&reports, &p, &previous);
        assert_eq!(c.assignments[0].max_in_flight, 0);
        assert_eq!(
            c.assignments.iter().map(|a| a.max_in_flight).sum::<u32>(),
            5
        );
    }

    #[test]
    fn the_phase_sums_every_shard_and_waits_for_the_final_writes() {
        let previous = UpdateCampaignStatus::default();
        let mut done: Vec<_> = (0..4).map(|k| report(k, 5, 5, 5)).collect();
        done[2].writes_pending = 3;
        let c = run(&done, &params(10), &previous);
        assert_eq!((c.phase, c.settling), (CampaignPhase::Progressing, true));
        assert!(c.assignments.iter().all(|a| a.max_in_flight == 0));
        done[2].writes_pending = 0;
        let c = run(&done, &params(10), &previous);
        assert_eq!(c.phase, CampaignPhase::Succeeded);
        assert_eq!(c.counts.succeeded, 20);
    }

    #[test]
    fn failures_over_all_shards_count_against_the_threshold() {
        let mut p = params(10);
        p.failure_threshold = Some(Amount::Count(1));
        let mut reports: Vec<_> = (0..4).map(|k| report(k, 5, 0, 0)).collect();
        for k in [1, 3] {
            reports[k].devices.pending -= 1;
            reports[k].devices.failed = 1;
            reports[k].failures = vec![DeviceFailure {
                device: format!("d{k}"),
                reason: "Timeout".into(),
                message: "m".into(),
            }];
        }
        let c = run(&reports, &p, &UpdateCampaignStatus::default());
        assert_eq!(c.phase, CampaignPhase::Failed);
        assert_eq!(c.failures.len(), 2);
        // A terminal phase sticks.
        let previous = UpdateCampaignStatus {
            phase: CampaignPhase::Failed,
            ..UpdateCampaignStatus::default()
        };
        let reports: Vec<_> = (0..4).map(|k| report(k, 5, 5, 5)).collect();
        assert_eq!(run(&reports, &p, &previous).phase, CampaignPhase::Failed);
    }

    #[test]
    fn one_blocked_shard_does_not_stop_the_others_but_all_blocked_is_pending() {
        let p = params(10);
        let mut reports: Vec<_> = (0..4).map(|k| report(k, 5, 0, 0)).collect();
        reports[1].blocker_reason = Some("BrokerUnavailable".into());
        reports[1].blocker_message = Some("connection refused".into());
        let c = run(&reports, &p, &UpdateCampaignStatus::default());
        assert_eq!(c.phase, CampaignPhase::Progressing);
        assert_eq!(
            c.assignments[1].blocker.as_deref(),
            Some("BrokerUnavailable")
        );
        for r in &mut reports {
            r.blocker_reason = Some("BrokerUnavailable".into());
        }
        let c = run(&reports, &p, &UpdateCampaignStatus::default());
        assert_eq!(c.phase, CampaignPhase::Pending);
        assert_eq!(c.blocker.unwrap().reason, BlockerReason::BrokerUnavailable);
    }

    #[test]
    fn a_shard_decides_with_its_share_and_no_threshold_of_its_own() {
        let mut p = params(10);
        p.failure_threshold = Some(Amount::Count(0));
        let a = ShardAssignment {
            shard: 0,
            holder: None,
            selected: 4,
            finished: 0,
            wave_end: 2,
            max_in_flight: 3,
            blocker: None,
        };
        let sp = shard_params(&p, Some(&a));
        assert_eq!((sp.max_in_flight, sp.failure_threshold), (3, None));
        assert_eq!(shard_params(&p, None).max_in_flight, 0);
        let progress = [
            Progress::Succeeded,
            Progress::Failed {
                reason: FailureReason::Timeout,
            },
            Progress::NotStarted,
            Progress::Succeeded,
        ];
        assert_eq!(done_through(&progress, &[]), 2);
        let d = crate::rollout::decide(&crate::rollout::DecideInput {
            now: 100,
            devices: &vec![Progress::NotStarted; 4],
            params: &sp,
            paused: false,
            abort: false,
            blocked: false,
            previous_phase: CampaignPhase::Progressing,
            previous_wave: 0,
            eligible_limit: Some(a.wave_end),
            holds: &[],
            start_cap: None,
            wave_limit: None,
            deadline_passed: false,
            policy_due: None,
        });
        assert_eq!(d.start, vec![(0, 1), (1, 1)], "only its share of the wave");
    }
}
