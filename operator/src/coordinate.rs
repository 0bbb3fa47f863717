//! Campaign decisions across shards (pure). The replica holding a shard decides which of its own
//! devices start, time out and retry (`rollout::decide` over the shard's devices, limited by its
//! assignment); the coordinator (the holder of the leader Lease) adds every shard's report up and
//! decides what is campaign-wide: the phase, the wave (a wave starts when every shard finished its
//! share of the one before), the failure threshold over all shards, and each shard's assignment —
//! its share of the current wave, of `maxInFlight` and of the start rate, apportioned to the
//! shards' sizes (`shards::apportion`), so a canary of 3 devices is 3 devices whatever the shard
//! count. The gates hold the next wave over all shards (the coordinator judges them on the
//! shards' health reports), a dry run's plan is the shards' plans added up ([`merge_policy`]),
//! and the campaign's policy status (waiting, heldBy, plan) is the shards' put together. The
//! assignments travel in the campaign's status (`status.shards`), which every replica watches.
//! No I/O here.

use crate::crd::{
    CampaignPhase, DeviceCounts, DeviceFailure, GateFailureAction, HolderStatus, PlanStatus,
    ShardAssignment, UpdateCampaignStatus, WaitingStatus, MAX_LISTED_FAILURES,
};
use crate::gates::HealthTally;
use crate::ramp::{Rate, WINDOW_SECS};
use crate::reasons::{BlockerReason, FailureReason};
use crate::rollout::{done, wave_cutoffs, Decision, Hold, Progress, RolloutParams};
use crate::shard_crd::{CampaignShardSpec, WaveHealth};
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
    /// Unix seconds.
    pub now: u64,
    /// The highest wave the gates let open (`gates::wave_limit`), if a gate is set.
    pub wave_limit: Option<u32>,
    /// spec.dryRun: plan over every shard, start nothing.
    pub dry_run: bool,
    /// The campaign's start rate (ramped by every shard's successes).
    pub rate: &'a Rate,
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
    /// Every shard finished its share of this wave and the next is held by the gate after it.
    pub awaiting_gate: Option<u32>,
    /// The campaign-wide start rate in force, if one is set.
    pub rate_per_minute: Option<u32>,
    /// When the assignments change by themselves (a finished shard's rate share is handed on).
    pub due: Option<u64>,
    /// The shards' delta tallies added up (`None`: no shard reported one).
    pub delta: Option<crate::crd::DeltaStatus>,
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
    total.joined += c.joined;
    total.left += c.left;
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
    let wave_done = |w: u32| share(w).iter().zip(&done).all(|(s, d)| d >= s);
    let gate_holds = |w: u32| input.wave_limit.is_some_and(|l| w >= l);
    while complete
        && !threshold_exceeded
        && current_wave + 1 < total_waves
        && wave_done(current_wave)
        && !gate_holds(current_wave)
    {
        current_wave += 1;
    }
    let awaiting = (complete
        && !threshold_exceeded
        && current_wave + 1 < total_waves
        && wave_done(current_wave)
        && gate_holds(current_wave))
    .then_some(current_wave);

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
    } else if input.dry_run && complete {
        // A dry run plans and touches nothing (spec.abort still ends it).
        CampaignPhase::Planned
    } else if input.paused {
        CampaignPhase::Paused
    } else if !complete || total == 0 || blocker.is_some() || input.dry_run {
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
    let wave_start = match current_wave.checked_sub(1) {
        Some(w) if complete => share(w),
        _ => vec![0; n],
    };
    let rate_per_minute = input.rate.per_minute(counts.succeeded);
    let last_starts: Vec<Option<u64>> = (0..n)
        .map(|k| {
            report(k)
                .and_then(|r| r.last_start.as_ref())
                .and_then(crate::time::unix_secs)
        })
        .collect();
    let finished_of = |k: usize| {
        report(k).map_or(0, |r| {
            let d = &r.devices;
            d.succeeded + d.failed + d.up_to_date + d.excluded
        })
    };
    let rate = rate_per_minute.map(|r| {
        let left: Vec<bool> = (0..n).map(|k| finished_of(k) < sizes[k]).collect();
        rate_shares(r, &sizes, &left, &last_starts, input.now)
    });
    let assignments = (0..n)
        .map(|k| ShardAssignment {
            shard: k as u32,
            holder: report(k).map(|r| r.holder.clone()),
            selected: sizes[k],
            finished: finished_of(k),
            wave_end: wave_end[k],
            max_in_flight: in_flight[k],
            wave_start: wave_start[k].min(wave_end[k]),
            rate_per_minute: rate.as_ref().map(|r| r.shares[k]),
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
        awaiting_gate: awaiting.filter(|_| phase == CampaignPhase::Progressing),
        rate_per_minute,
        due: rate.and_then(|r| r.due),
        delta: (0..n)
            .filter_map(report)
            .filter_map(|r| r.delta)
            .reduce(std::ops::Add::add),
    }
}

/// Apply a failed gate to the coordinator's decision (pure): the campaign pauses or aborts as
/// `onFailure` says (`plan::gate_phase`, as with one replica) and no shard starts any more.
pub fn hold_for_gate(co: &mut Coordination, failed: Option<GateFailureAction>) {
    co.phase = crate::plan::gate_phase(co.phase, failed);
    if co.phase != CampaignPhase::Progressing {
        co.awaiting_gate = None;
        for a in &mut co.assignments {
            a.max_in_flight = 0;
        }
    }
}

/// The shards' shares of a campaign-wide rate of `per_minute` starts a minute, and when they
/// change by themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateShares {
    /// Per shard, the starts a minute it may make.
    pub shares: Vec<u32>,
    /// When a shard's last start leaves the minute and its share goes to the others.
    pub due: Option<u64>,
}

/// Share a campaign-wide rate among the shards (pure): `per_minute` apportioned to the sizes of
/// the shards that hold a share — those with devices `left`, and those whose `last_start` is less
/// than a minute ago (a shard that just finished keeps its share until its starts leave the
/// sliding minute). Every shard counts its own starts over the last minute against its share, so
/// the campaign starts at most `per_minute` in any minute: a share moves only from a shard with
/// no start in the minute, and the apportionment (a divisor method: one shard dropping out and
/// the rate rising never lower another's share) never takes from a shard that has started.
pub fn rate_shares(
    per_minute: u32,
    sizes: &[u32],
    left: &[bool],
    last_starts: &[Option<u64>],
    now: u64,
) -> RateShares {
    let recent = |k: usize| {
        last_starts
            .get(k)
            .copied()
            .flatten()
            .filter(|t| t.saturating_add(WINDOW_SECS) > now)
    };
    let has_left = |k: usize| left.get(k).copied().unwrap_or(false);
    let holding: Vec<u32> = sizes
        .iter()
        .enumerate()
        .map(|(k, &size)| {
            if has_left(k) || recent(k).is_some() {
                size
            } else {
                0
            }
        })
        .collect();
    let due = (0..sizes.len())
        .filter(|&k| !has_left(k))
        .filter_map(recent)
        .map(|t| t + WINDOW_SECS)
        .min();
    RateShares {
        shares: apportion(per_minute, &holding),
        due,
    }
}

/// Shard `shard`'s share of each of the campaign's wave ends (pure): `cutoffs` (over every
/// shard's devices, `rollout::wave_cutoffs`) apportioned to the shards' `sizes`, as the
/// coordinator assigns them; the shard's own plan is cut by these.
pub fn shard_cutoffs(cutoffs: &[u32], sizes: &[u32], shard: u32) -> Vec<u32> {
    let mut end = 0;
    cutoffs
        .iter()
        .map(|&c| {
            end = apportion(c, sizes)
                .get(shard as usize)
                .copied()
                .unwrap_or(0)
                .max(end);
            end
        })
        .collect()
}

/// The campaign's policy status put together from the shards' (pure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergedPolicy {
    /// What the campaign waits for: a shard's, when every shard with devices left waits.
    pub waiting: Option<WaitingStatus>,
    /// The campaigns holding selected devices, over every shard (at most 8, most devices first).
    pub held_by: Vec<HolderStatus>,
    /// The plan over every shard's devices (`None` until every shard reported one).
    pub plan: Option<PlanStatus>,
    /// The health of the `wave`'s devices over every shard.
    pub health: HealthTally,
}

/// Put the shards' policy reports together (pure); `wave` is the wave whose health counts and
/// `chunk_bytes` the prepared payload's size (for the plan's broker estimate).
pub fn merge_policy(
    reports: &[Option<&CampaignShardSpec>],
    wave: Option<u32>,
    chunk_bytes: Option<u64>,
) -> MergedPolicy {
    let reported: Vec<&CampaignShardSpec> = reports.iter().flatten().copied().collect();
    let with_work: Vec<&CampaignShardSpec> = reported
        .iter()
        .copied()
        .filter(|r| {
            let d = &r.devices;
            d.succeeded + d.failed + d.up_to_date + d.excluded < d.selected
        })
        .collect();
    let waiting = if with_work.iter().all(|r| r.waiting.is_some()) {
        with_work.first().and_then(|r| r.waiting.clone())
    } else {
        None
    };
    let mut holders: std::collections::BTreeMap<&str, u32> = Default::default();
    for h in reported.iter().flat_map(|r| &r.held_by) {
        *holders.entry(h.campaign.as_str()).or_default() += h.devices;
    }
    let mut held_by: Vec<HolderStatus> = holders
        .into_iter()
        .map(|(campaign, devices)| HolderStatus {
            campaign: campaign.to_owned(),
            devices,
        })
        .collect();
    held_by.sort_by(|a, b| {
        b.devices
            .cmp(&a.devices)
            .then_with(|| a.campaign.cmp(&b.campaign))
    });
    held_by.truncate(8);
    // Every shard's plan, cut by the sizes every shard reports now (else a plan cut by older
    // sizes would show waves that add up wrong).
    let sizes: Vec<u32> = reports
        .iter()
        .map(|r| r.map_or(0, |r| r.devices.selected))
        .collect();
    let every_plan = !reports.is_empty()
        && reports
            .iter()
            .all(|r| r.is_some_and(|r| r.plan.is_some() && r.plan_sizes == sizes));
    let plan = every_plan.then(|| {
        let parts: Vec<&PlanStatus> = reported.iter().filter_map(|r| r.plan.as_ref()).collect();
        crate::preview::merge_plans(&parts, chunk_bytes)
    });
    let mut health = HealthTally::default();
    for h in reported
        .iter()
        .filter_map(|r| r.health)
        .filter(|h| Some(h.wave) == wave)
    {
        health.updated += h.updated;
        health.healthy += h.healthy;
        health.reported += h.reported;
    }
    MergedPolicy {
        waiting,
        held_by,
        plan,
        health,
    }
}

/// A shard's health report on `wave` from its tally.
pub fn wave_health(wave: u32, tally: HealthTally) -> WaveHealth {
    WaveHealth {
        wave,
        updated: tally.updated,
        healthy: tally.healthy,
        reported: tally.reported,
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
        // The policy's part is the controller's to add (the shard's plan, waits and health).
        ..CampaignShardSpec::default()
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
        run_with(reports, params, previous, |_| {})
    }

    fn run_with(
        reports: &[CampaignShardSpec],
        params: &RolloutParams,
        previous: &UpdateCampaignStatus,
        change: impl FnOnce(&mut CoordinateInput<'_>),
    ) -> Coordination {
        run_rated(
            reports,
            params,
            previous,
            &crate::crd::RolloutSpec::default(),
            change,
        )
    }

    fn run_rated(
        reports: &[CampaignShardSpec],
        params: &RolloutParams,
        previous: &UpdateCampaignStatus,
        rollout: &crate::crd::RolloutSpec,
        change: impl FnOnce(&mut CoordinateInput<'_>),
    ) -> Coordination {
        let refs: Vec<Option<&CampaignShardSpec>> = reports.iter().map(Some).collect();
        let rate = Rate::from_spec(rollout);
        let mut input = CoordinateInput {
            shards: ShardCount::new(4).unwrap(),
            reports: &refs,
            params,
            paused: false,
            abort: false,
            blocker: None,
            previous,
            expired: false,
            deadline_passed: false,
            now: 1000,
            wave_limit: None,
            dry_run: false,
            rate: &rate,
        };
        change(&mut input);
        coordinate(&input)
    }

    /// Campaign-wide starts over time with `shards` sharing a rate of `per_minute`, each shard
    /// keeping its share by its own sliding minute (as `policy::assess` does) and every device
    /// done 5 s after it starts; `hand_over` passes the shards' last starts to `rate_shares`
    /// (without them a finished shard's share goes to the others at once). Returns the most
    /// starts seen in any 60 s.
    fn busiest_minute(per_minute: u32, sizes: &[u32], hand_over: bool) -> u32 {
        let n = sizes.len();
        let mut logs = vec![crate::ramp::StartLog::default(); n];
        let mut started: Vec<Vec<u64>> = vec![Vec::new(); n];
        let mut all: Vec<u64> = Vec::new();
        for t in 0..1200u64 {
            let finished = |k: usize| started[k].iter().filter(|s| **s + 5 <= t).count() as u32;
            let left: Vec<bool> = (0..n).map(|k| finished(k) < sizes[k]).collect();
            let last: Vec<Option<u64>> = (0..n)
                .map(|k| started[k].last().copied().filter(|_| hand_over))
                .collect();
            let shares = rate_shares(per_minute, sizes, &left, &last, t).shares;
            for k in 0..n {
                let waiting = sizes[k] - started[k].len() as u32;
                let go = logs[k].allowance(shares[k], t).starts.min(waiting);
                logs[k].record(t, go as usize);
                started[k].extend(std::iter::repeat_n(t, go as usize));
                all.extend(std::iter::repeat_n(t, go as usize));
            }
        }
        assert_eq!(
            all.len() as u32,
            sizes.iter().sum::<u32>(),
            "every device started"
        );
        all.iter()
            .map(|&t| all.iter().filter(|&&s| s >= t && s < t + 60).count() as u32)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn the_campaign_never_starts_more_than_its_rate_in_any_minute_when_a_shard_finishes() {
        for (rate, sizes) in [
            (6, vec![2, 10]),
            (6, vec![2, 30]),
            (4, vec![1, 3, 9, 9]),
            (10, vec![5, 5, 30, 2]),
            (3, vec![1, 1, 1, 20]),
        ] {
            assert!(
                busiest_minute(rate, &sizes, true) <= rate,
                "rate {rate}, shards {sizes:?}"
            );
        }
        // Handing a finished shard's share on at once overshoots (the bug this guards against).
        assert!(busiest_minute(6, &[2, 30], false) > 6);
    }

    #[test]
    fn a_finished_shard_keeps_its_rate_share_for_a_minute_after_its_last_start() {
        let sizes = [10, 10];
        let shares = rate_shares(4, &sizes, &[true, true], &[None, None], 100);
        assert_eq!(shares.shares, vec![2, 2]);
        // Shard 0 finished, its last start 30 s ago: it keeps its share until 130.
        let kept = rate_shares(4, &sizes, &[false, true], &[Some(70), Some(95)], 100);
        assert_eq!((kept.shares, kept.due), (vec![2, 2], Some(130)));
        let handed = rate_shares(4, &sizes, &[false, true], &[Some(70), Some(95)], 130);
        assert_eq!((handed.shares, handed.due), (vec![0, 4], None));
        // An odd rate: the shares add up to it, not more.
        let odd = rate_shares(2, &[5, 5, 5], &[true; 3], &[None; 3], 0);
        assert_eq!(odd.shares.iter().sum::<u32>(), 2, "{odd:?}");
        // The coordinator assigns the shares with the ramp of every shard's successes.
        let p = params(8);
        let mut reports: Vec<_> = (0..4).map(|k| report(k, 10, 0, 0)).collect();
        reports[0] = report(0, 10, 10, 10);
        reports[0].last_start = Some(crate::time::k8s_time(990));
        let rollout = crate::crd::RolloutSpec {
            max_per_minute: Some(8),
            ..crate::crd::RolloutSpec::default()
        };
        let c = run_rated(
            &reports,
            &p,
            &UpdateCampaignStatus::default(),
            &rollout,
            |_| {},
        );
        let shares: Vec<u32> = c
            .assignments
            .iter()
            .filter_map(|a| a.rate_per_minute)
            .collect();
        assert_eq!(shares, vec![2, 2, 2, 2]);
        assert_eq!((c.rate_per_minute, c.due), (Some(8), Some(1050)));
    }

    #[test]
    fn a_gate_holds_the_next_wave_over_every_shard_until_it_passes() {
        let mut p = params(100);
        p.canary = Some(Amount::Count(3));
        let previous = UpdateCampaignStatus::default();
        let fresh: Vec<_> = (0..4).map(|k| report(k, 10, 0, 0)).collect();
        let ends: Vec<u32> = run(&fresh, &p, &previous)
            .assignments
            .iter()
            .map(|a| a.wave_end)
            .collect();
        let mut canary_done = fresh.clone();
        for (k, r) in canary_done.iter_mut().enumerate() {
            r.done_through = ends[k];
        }
        // The gate after wave 0 has not passed: wave 0 stays, nothing more may start.
        let held = run_with(&canary_done, &p, &previous, |i| i.wave_limit = Some(0));
        assert_eq!((held.current_wave, held.awaiting_gate), (0, Some(0)));
        assert_eq!(held.phase, CampaignPhase::Progressing);
        assert!(held.assignments.iter().all(|a| a.max_in_flight == 0));
        // Before every shard finished its canary share, no gate is awaited yet.
        let partly = run_with(&fresh, &p, &previous, |i| i.wave_limit = Some(0));
        assert_eq!(partly.awaiting_gate, None);
        // Passed (or promoted): wave 1 opens on every shard; its health range starts after the
        // canary share.
        let open = run_with(&canary_done, &p, &previous, |i| i.wave_limit = Some(1));
        assert_eq!((open.current_wave, open.awaiting_gate), (1, None));
        let starts: Vec<u32> = open.assignments.iter().map(|a| a.wave_start).collect();
        assert_eq!(starts, ends);
        // A failed gate pauses (or aborts) the campaign: no shard starts.
        let mut failed = held.clone();
        hold_for_gate(&mut failed, Some(GateFailureAction::Pause));
        assert_eq!(failed.phase, CampaignPhase::Paused);
        let mut aborted = run_with(&fresh, &p, &previous, |_| {});
        hold_for_gate(&mut aborted, Some(GateFailureAction::Abort));
        assert_eq!(aborted.phase, CampaignPhase::Aborted);
        assert!(aborted.assignments.iter().all(|a| a.max_in_flight == 0));
    }

    #[test]
    fn a_dry_run_is_planned_once_every_shard_reported_and_starts_nothing() {
        let previous = UpdateCampaignStatus::default();
        let reports: Vec<_> = (0..4).map(|k| report(k, 5, 0, 0)).collect();
        let c = run_with(&reports, &params(10), &previous, |i| i.dry_run = true);
        assert_eq!(c.phase, CampaignPhase::Planned);
        assert!(c.assignments.iter().all(|a| a.max_in_flight == 0));
    }

    #[test]
    fn the_policy_status_is_every_shard_s_put_together() {
        use crate::crd::{PlanExclusion, PlannedWave};
        let wave = |wave, size, first: &[&str]| PlannedWave {
            wave,
            size,
            first_devices: first.iter().map(|s| s.to_string()).collect(),
        };
        let waiting = |reason: &str| WaitingStatus {
            reason: reason.into(),
            message: "m".into(),
            until: None,
        };
        let mut a = report(0, 4, 0, 0);
        a.plan = Some(PlanStatus {
            devices: 3,
            waves: vec![wave(0, 1, &["a0"]), wave(1, 2, &["a1", "a2"])],
            excluded: vec![PlanExclusion {
                reason: "UpToDate".into(),
                count: 1,
                devices: vec!["a3".into()],
            }],
            estimated_broker_bytes: None,
        });
        a.held_by = vec![HolderStatus {
            campaign: "other".into(),
            devices: 2,
        }];
        a.waiting = Some(waiting("OutsideWindow"));
        a.health = Some(WaveHealth {
            wave: 0,
            updated: 1,
            healthy: 1,
            reported: 1,
        });
        let mut b = report(1, 2, 0, 0);
        b.plan = Some(PlanStatus {
            devices: 2,
            waves: vec![wave(0, 1, &["b0"]), wave(1, 1, &["b1"])],
            excluded: vec![],
            estimated_broker_bytes: None,
        });
        b.held_by = vec![HolderStatus {
            campaign: "other".into(),
            devices: 1,
        }];
        b.health = Some(WaveHealth {
            wave: 0,
            updated: 1,
            healthy: 0,
            reported: 1,
        });
        a.plan_sizes = vec![4, 2];
        b.plan_sizes = vec![4, 1];
        assert_eq!(
            merge_policy(&[Some(&a), Some(&b)], Some(0), None).plan,
            None,
            "a plan cut by other sizes"
        );
        b.plan_sizes = vec![4, 2];
        let m = merge_policy(&[Some(&a), Some(&b)], Some(0), Some(1000));
        let plan = m.plan.clone().unwrap();
        assert_eq!(plan.devices, 5);
        let sizes: Vec<u32> = plan.waves.iter().map(|w| w.size).collect();
        assert_eq!(sizes, vec![2, 3]);
        assert_eq!(plan.waves[0].first_devices, vec!["a0", "b0"]);
        assert_eq!((plan.excluded[0].count, plan.excluded.len()), (1, 1));
        assert_eq!(
            plan.estimated_broker_bytes,
            Some(1000 + 5 * crate::preview::PER_DEVICE_BYTES)
        );
        assert_eq!(
            m.held_by,
            vec![HolderStatus {
                campaign: "other".into(),
                devices: 3
            }]
        );
        assert_eq!(
            m.health,
            HealthTally {
                updated: 2,
                healthy: 1,
                reported: 2
            }
        );
        // One shard with devices left does not wait: neither does the campaign.
        assert_eq!(m.waiting, None);
        b.waiting = Some(waiting("RateLimited"));
        let m = merge_policy(&[Some(&a), Some(&b)], Some(1), None);
        assert_eq!(m.waiting.map(|w| w.reason), Some("OutsideWindow".into()));
        assert_eq!(m.health, HealthTally::default(), "another wave's reports");
        // A shard without a plan yet: no plan.
        assert_eq!(merge_policy(&[Some(&a), None], None, None).plan, None);
    }

    #[test]
    fn a_shard_s_wave_ends_add_up_to_the_campaign_s() {
        let sizes = [7, 0, 12, 5];
        let cutoffs = [3, 13, 24];
        let per_shard: Vec<Vec<u32>> = (0..4).map(|k| shard_cutoffs(&cutoffs, &sizes, k)).collect();
        for (w, &c) in cutoffs.iter().enumerate() {
            assert_eq!(
                per_shard.iter().map(|s| s[w]).sum::<u32>(),
                c,
                "{per_shard:?}"
            );
        }
        assert_eq!(per_shard[1], vec![0, 0, 0]);
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
            now: 1000,
            wave_limit: None,
            dry_run: false,
            rate: &Rate::from_spec(&crate::crd::RolloutSpec::default()),
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
        let mut input = CoordinateInput {
            shards: ShardCount::new(4).unwrap(),
            reports: &refs,
            params: &params(100),
            paused: false,
            abort: false,
            blocker: None,
            previous: &UpdateCampaignStatus::default(),
            expired: false,
            deadline_passed: false,
            now: 1000,
            wave_limit: None,
            dry_run: false,
            rate: &Rate::from_spec(&crate::crd::RolloutSpec::default()),
        };
        let c = coordinate(&input);
        assert_eq!(c.phase, CampaignPhase::Pending);
        assert_eq!(c.unreported, vec![1, 3]);
        assert!(c.assignments.iter().all(|a| a.max_in_flight == 0));
        assert_eq!(c.counts.selected, 20);
        // A dry run's plan is not whole yet either: not Planned.
        input.dry_run = true;
        assert_eq!(coordinate(&input).phase, CampaignPhase::Pending);
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
        assert_eq!(c.delta, None, "no shard offered a delta");
        // The deltas' tallies of the shards that report one, added up.
        let tally = |devices: u32, sent: u64| crate::crd::DeltaStatus {
            devices,
            bytes_sent: sent,
            bytes_full: 500,
        };
        done[0].delta = Some(tally(2, 100));
        done[3].delta = Some(tally(1, 300));
        let c = run(&done, &params(10), &previous);
        assert_eq!(
            c.delta,
            Some(crate::crd::DeltaStatus {
                devices: 3,
                bytes_sent: 400,
                bytes_full: 1000
            })
        );
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
            wave_start: 0,
            rate_per_minute: None,
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
