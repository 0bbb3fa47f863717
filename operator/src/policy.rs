//! The rollout policy of one pass (pure): which selected devices may start, and what the campaign
//! waits for. It weighs, per device, its version (already at the target: nothing to do), the
//! certificate pin (when one is required), its maintenance windows (the campaign's, in the
//! device's time zone, and its own, see [`crate::schedule`]) and the other running campaigns that
//! want it ([`crate::arbitration`]); per pass, the schedule's `notBefore` and deadline, the start
//! rate ([`crate::ramp`]) and the gates' wave limit ([`crate::gates`]). The result feeds
//! [`crate::rollout::decide`] as [`Hold`]s, a start cap and a wave limit, and the status as
//! [`PolicyStatus`]. The controller fetches what it needs first; nothing here does I/O.

use std::collections::HashMap;
use std::sync::Arc;

use crate::arbitration::{held_by, holder, Contender, Standing};
use crate::crd::{
    Device, DeviceMaintenanceSpec, HolderStatus, ScheduleStatus, UpdateCampaignSpec,
    UpdateCampaignStatus, WaitingStatus,
};
use crate::ramp::{Rate, StartLog};
use crate::reasons::BlockerReason;
use crate::rollout::{Hold, Progress};
use crate::schedule::{Calendar, Openness};
use crate::status::{Blocker, PolicyStatus};
use crate::time::k8s_time;

/// Why a device is left out of a campaign for good, or held back (the plan's reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exclusion {
    /// It already runs the target version.
    UpToDate,
    /// Another running campaign holds it.
    HeldByCampaign,
    /// It has no certificate pin and spec.requireCertificatePin is set.
    NoCertificatePin,
    /// Its own windows never meet the campaign's (or its maintenance spec is unusable).
    OutsideEveryWindow,
}

impl Exclusion {
    /// The CamelCase spelling in status.plan.
    pub fn as_str(self) -> &'static str {
        match self {
            Exclusion::UpToDate => "UpToDate",
            Exclusion::HeldByCampaign => "HeldByCampaign",
            Exclusion::NoCertificatePin => "NoCertificatePin",
            Exclusion::OutsideEveryWindow => "OutsideEveryWindow",
        }
    }
}

/// Everything one pass of the policy looks at.
#[derive(Debug)]
pub struct PolicyInput<'a> {
    /// Unix seconds.
    pub now: u64,
    /// The campaign's spec.
    pub spec: &'a UpdateCampaignSpec,
    /// This campaign, as arbitration ranks it.
    pub me: Contender<'a>,
    /// The selected devices, in wave order.
    pub devices: &'a [Arc<Device>],
    /// Their progress in this campaign (before this pass's decision).
    pub progress: &'a [Progress],
    /// Per device, the other running campaigns that select it and its standing there (empty:
    /// none; shorter than `devices`: none for the rest).
    pub rivals: &'a [Vec<(Contender<'a>, Standing)>],
    /// The campaign's own calendar (validated).
    pub calendar: &'a Calendar,
    /// The status as stored.
    pub previous: &'a UpdateCampaignStatus,
    /// The starts a minute this pass may make when the campaign's rate is shared among shards
    /// (`coordinate::rate_shares`: the coordinator's count of successes drives the ramp); `None`:
    /// the whole rate, ramped by the successes of `progress`.
    pub rate_share: Option<u32>,
}

/// The policy's say over one pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyDecision {
    /// Per device (in order), whether it may start.
    pub holds: Vec<Hold>,
    /// Per device, why it is left out or held back, if it is (for the plan).
    pub exclusions: Vec<Option<Exclusion>>,
    /// Cap on starts this pass (the rate).
    pub start_cap: Option<u32>,
    /// Highest wave that may open (the gates), if a gate is set.
    pub wave_limit: Option<u32>,
    /// The schedule's deadline passed.
    pub deadline_passed: bool,
    /// When the policy changes its mind next.
    pub due: Option<u64>,
    /// A campaign window that never opens: the campaign cannot run.
    pub blocker: Option<Blocker>,
    /// What the status reports (gate and plan are added by the controller).
    pub status: PolicyStatus,
}

/// Whether a device's signed report says it runs `target` already (SemVer precedence; build
/// metadata ignored).
pub fn runs_target(device: &Device, target: &str) -> bool {
    let Some(running) = device
        .status
        .as_ref()
        .and_then(|s| s.running_version.as_deref())
    else {
        return false;
    };
    match (
        semver::Version::parse(running),
        semver::Version::parse(target),
    ) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b).is_eq(),
        _ => running == target,
    }
}

/// Whether a device has nothing to do in a campaign it never started: it runs the firmware the
/// campaign installs. A credential rotation changes no version, so it always has work to do.
pub fn up_to_date(device: &Device, spec: &UpdateCampaignSpec) -> bool {
    spec.payload.rotate_credentials.is_none() && runs_target(device, &spec.target_version)
}

/// Decide the policy of one pass.
pub fn assess(input: &PolicyInput<'_>, start_log: &mut StartLog) -> PolicyDecision {
    let now = input.now;
    let spec = input.spec;
    let mut out = PolicyDecision::default();

    // The campaign's own calendar: notBefore, deadline, windows.
    let campaign_open = input.calendar.at(now);
    out.deadline_passed = input.calendar.deadline().is_some_and(|d| d <= now);
    if input.calendar.has_windows() {
        out.status.schedule = Some(match campaign_open {
            Openness::Open { closes } => ScheduleStatus {
                open: true,
                next_open: None,
                closes_at: closes.map(k8s_time),
            },
            Openness::Closed { opens } => ScheduleStatus {
                open: false,
                next_open: opens.map(k8s_time),
                closes_at: None,
            },
        });
    }
    if let Openness::Closed { opens: None } = campaign_open {
        if !out.deadline_passed {
            out.blocker = Some(Blocker {
                reason: BlockerReason::WindowNeverOpens,
                message: "spec.schedule.windows never open (within a year, or before spec.schedule.deadline): fix the windows, the time zone or the deadline".to_owned(),
            });
        }
    }

    // Per device.
    let mut calendars: HashMap<&DeviceMaintenanceSpec, Option<Openness>> = HashMap::new();
    let mut holders: Vec<&str> = Vec::new();
    let mut window_opens: Option<u64> = None;
    for (i, (device, progress)) in input.devices.iter().zip(input.progress).enumerate() {
        let not_started = *progress == Progress::NotStarted;
        let retry = matches!(progress, Progress::Backoff { .. });
        let (hold, why) = if !(not_started || retry) {
            (Hold::Free, None)
        } else if not_started && up_to_date(device, spec) {
            (Hold::UpToDate, Some(Exclusion::UpToDate))
        } else if not_started
            && spec.require_certificate_pin
            && device.spec.certificate_fingerprint.is_none()
        {
            (Hold::Excluded, Some(Exclusion::NoCertificatePin))
        } else {
            // The device's windows: the campaign's, unless it has its own time zone or windows.
            let openness = match device.spec.maintenance.as_ref() {
                None => Some(campaign_open),
                Some(m) => *calendars.entry(m).or_insert_with(|| {
                    Calendar::for_device(spec.schedule.as_ref(), Some(m))
                        .ok()
                        .map(|c| c.at(now))
                }),
            };
            match openness {
                // Past the deadline nothing opens again: the device was not started in time
                // (counted as unstarted, the campaign ends DeadlinePassed), not left out.
                _ if out.deadline_passed => (Hold::OutsideWindow, None),
                None | Some(Openness::Closed { opens: None }) if not_started => {
                    (Hold::Excluded, Some(Exclusion::OutsideEveryWindow))
                }
                None | Some(Openness::Closed { opens: None }) => (Hold::OutsideWindow, None),
                Some(Openness::Closed { opens: Some(t) }) => {
                    window_opens = Some(window_opens.map_or(t, |w| w.min(t)));
                    (Hold::OutsideWindow, None)
                }
                Some(Openness::Open { .. }) if not_started => {
                    let rivals = input.rivals.get(i).map(Vec::as_slice).unwrap_or(&[]);
                    match holder(&input.me, rivals.iter().copied()) {
                        Some(name) => {
                            holders.push(name);
                            (Hold::HeldElsewhere, Some(Exclusion::HeldByCampaign))
                        }
                        None => (Hold::Free, None),
                    }
                }
                Some(Openness::Open { .. }) => (Hold::Free, None),
            }
        };
        out.holds.push(hold);
        out.exclusions.push(why);
    }
    out.status.held_by = held_by(holders.iter().copied(), 8)
        .into_iter()
        .map(|(campaign, devices)| HolderStatus { campaign, devices })
        .collect();

    // The rate.
    let rate = Rate::from_spec(&spec.rollout);
    let mut rate_wait = None;
    if rate.is_limited() {
        let succeeded = input
            .progress
            .iter()
            .filter(|p| **p == Progress::Succeeded)
            .count() as u32;
        let per_minute = input
            .rate_share
            .or_else(|| rate.per_minute(succeeded))
            .unwrap_or(u32::MAX);
        let allowance = start_log.allowance(per_minute, now);
        out.start_cap = Some(allowance.starts);
        out.status.rate_per_minute = Some(per_minute);
        if allowance.starts == 0 {
            rate_wait = allowance.next;
        }
    }

    // The gates.
    if spec.rollout.gate.is_some() {
        out.wave_limit = Some(crate::gates::wave_limit(
            input.previous.gate.as_ref(),
            spec.promote_through_wave,
        ));
    }

    // What the campaign waits for, the most telling first.
    let free = out.holds.iter().zip(input.progress).any(|(h, p)| {
        *h == Hold::Free && matches!(p, Progress::NotStarted | Progress::Backoff { .. })
    });
    let windowed = out.holds.contains(&Hold::OutsideWindow);
    let waiting_elsewhere = out.holds.contains(&Hold::HeldElsewhere);
    out.status.waiting = if out.deadline_passed {
        None
    } else if free && rate_wait.is_some() {
        Some(WaitingStatus {
            reason: "RateLimited".into(),
            message: format!(
                "{} devices started in the last minute, as many as the rate allows ({} a minute)",
                start_log.recent(now),
                out.status.rate_per_minute.unwrap_or(0)
            ),
            until: rate_wait.map(k8s_time),
        })
    } else if !free && windowed {
        let not_before = spec
            .schedule
            .as_ref()
            .and_then(|s| s.not_before.as_ref())
            .and_then(crate::time::unix_secs)
            .filter(|t| *t > now);
        Some(match not_before {
            Some(t) => WaitingStatus {
                reason: "NotBefore".into(),
                message: "spec.schedule.notBefore is ahead: no device starts before it".into(),
                until: Some(k8s_time(t)),
            },
            None => WaitingStatus {
                reason: "OutsideWindow".into(),
                message: "every device that may start waits for its maintenance window to open"
                    .into(),
                until: window_opens.map(k8s_time),
            },
        })
    } else if !free && waiting_elsewhere {
        let names: Vec<String> = out
            .status
            .held_by
            .iter()
            .map(|h| format!("{} ({} devices)", h.campaign, h.devices))
            .collect();
        Some(WaitingStatus {
            reason: "HeldByCampaign".into(),
            message: format!(
                "the devices left wait for other campaigns to finish with them: {}",
                names.join(", ")
            ),
            until: None,
        })
    } else {
        None
    };
    out.due = [
        window_opens,
        rate_wait,
        input.calendar.deadline().filter(|d| *d > now),
    ]
    .into_iter()
    .flatten()
    .min();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceSpec, DeviceStatus, RampSpec, ScheduleSpec, Weekday, WindowSpec};

    fn spec(extra: serde_json::Value) -> UpdateCampaignSpec {
        let mut base = serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a"}},
            "targetVersion": "2.0.0",
            "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
            "managerSecretName": "manager"
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn device(name: &str, running: Option<&str>) -> Arc<Device> {
        let mut d = Device::new(
            name,
            DeviceSpec {
                certificate_fingerprint: Some("0".repeat(64)),
                ..DeviceSpec::default()
            },
        );
        d.status = running.map(|v| DeviceStatus {
            running_version: Some(v.into()),
            ..DeviceStatus::default()
        });
        Arc::new(d)
    }

    fn me() -> Contender<'static> {
        Contender {
            name: "me",
            priority: 0,
            created: 100,
        }
    }

    fn run(
        spec: &UpdateCampaignSpec,
        devices: &[Arc<Device>],
        rivals: &[Vec<(Contender<'static>, Standing)>],
        now: u64,
        log: &mut StartLog,
    ) -> PolicyDecision {
        run_shared(spec, devices, rivals, now, log, None)
    }

    fn run_shared(
        spec: &UpdateCampaignSpec,
        devices: &[Arc<Device>],
        rivals: &[Vec<(Contender<'static>, Standing)>],
        now: u64,
        log: &mut StartLog,
        rate_share: Option<u32>,
    ) -> PolicyDecision {
        let progress = vec![Progress::NotStarted; devices.len()];
        let calendar = Calendar::for_campaign(spec.schedule.as_ref()).unwrap();
        let previous = UpdateCampaignStatus::default();
        assess(
            &PolicyInput {
                now,
                spec,
                me: me(),
                devices,
                progress: &progress,
                rivals,
                calendar: &calendar,
                previous: &previous,
                rate_share,
            },
            log,
        )
    }

    #[test]
    fn devices_at_the_target_are_up_to_date_and_unpinned_ones_excluded_when_pins_are_required() {
        let s = spec(serde_json::json!({"requireCertificatePin": true}));
        let mut unpinned = (*device("c", Some("1.0.0"))).clone();
        unpinned.spec.certificate_fingerprint = None;
        let devices = vec![
            device("a", Some("2.0.0+build.7")),
            device("b", Some("1.0.0")),
            Arc::new(unpinned),
        ];
        let d = run(&s, &devices, &[], 1000, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::UpToDate, Hold::Free, Hold::Excluded]);
        assert_eq!(
            d.exclusions,
            vec![
                Some(Exclusion::UpToDate),
                None,
                Some(Exclusion::NoCertificatePin)
            ]
        );
        assert!(d.status.waiting.is_none());
    }

    #[test]
    fn a_credential_rotation_is_never_up_to_date() {
        let s = spec(serde_json::json!({"payload": {"rotateCredentials": {
            "mode": "Csr", "caSecretName": "ca"}}}));
        let devices = vec![device("a", Some("2.0.0"))];
        let d = run(&s, &devices, &[], 1000, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::Free]);
        assert_eq!(d.exclusions, vec![None]);
    }

    #[test]
    fn a_device_wanted_by_a_stronger_campaign_waits_and_the_status_names_it() {
        let s = spec(serde_json::json!({}));
        let devices = vec![device("a", None), device("b", None)];
        let urgent = Contender {
            name: "urgent",
            priority: 10,
            created: 500,
        };
        let rivals = vec![
            vec![(urgent, Standing::NotStarted)],
            vec![(urgent, Standing::NotStarted)],
        ];
        let d = run(&s, &devices, &rivals, 1000, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::HeldElsewhere; 2]);
        assert_eq!(
            d.status.held_by,
            vec![HolderStatus {
                campaign: "urgent".into(),
                devices: 2
            }]
        );
        let w = d.status.waiting.unwrap();
        assert_eq!(w.reason, "HeldByCampaign");
        assert!(w.message.contains("urgent (2 devices)"), "{}", w.message);
    }

    #[test]
    fn a_closed_window_holds_devices_and_says_when_it_opens() {
        // 1970-01-01 was a Thursday; a window at 00:00:10 for 5 s every day.
        let s = spec(serde_json::json!({"schedule": {"windows": [
            {"start": "00:00:10", "duration": "5s"}]}}));
        let devices = vec![device("a", None)];
        let d = run(&s, &devices, &[], 3, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::OutsideWindow]);
        let w = d.status.waiting.clone().unwrap();
        assert_eq!(
            (w.reason.as_str(), w.until),
            ("OutsideWindow", Some(k8s_time(10)))
        );
        assert_eq!(d.due, Some(10));
        let sched = d.status.schedule.unwrap();
        assert_eq!((sched.open, sched.next_open), (false, Some(k8s_time(10))));
        let d = run(&s, &devices, &[], 12, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::Free]);
        assert_eq!(d.status.schedule.unwrap().closes_at, Some(k8s_time(15)));
    }

    #[test]
    fn a_device_time_zone_and_windows_are_honoured_per_device() {
        let s = spec(serde_json::json!({"schedule": {"windows": [
            {"start": "00:00", "duration": "2h"}]}}));
        let mut far = (*device("far", None)).clone();
        far.spec.maintenance = Some(DeviceMaintenanceSpec {
            time_zone: Some("Asia/Tokyo".into()),
            windows: vec![],
        });
        let mut never = (*device("never", None)).clone();
        never.spec.maintenance = Some(DeviceMaintenanceSpec {
            time_zone: None,
            windows: vec![WindowSpec {
                days: vec![Weekday::Mon],
                start: "12:00".into(),
                duration: "1h".into(),
            }],
        });
        let devices = vec![device("here", None), Arc::new(far), Arc::new(never)];
        // 00:30 UTC: the UTC window is open; in Tokyo it is 09:30, closed.
        let d = run(&s, &devices, &[], 1800, &mut StartLog::default());
        assert_eq!(
            d.holds,
            vec![Hold::Free, Hold::OutsideWindow, Hold::Excluded]
        );
        assert_eq!(d.exclusions[2], Some(Exclusion::OutsideEveryWindow));
        // Tokyo midnight is 15:00 UTC.
        assert_eq!(d.due, Some(15 * 3600));
    }

    #[test]
    fn not_before_deadline_and_never() {
        let s = spec(serde_json::json!({"schedule": {
            "notBefore": "1970-01-01T00:01:40Z", "deadline": "1970-01-01T00:03:20Z"}}));
        let devices = vec![device("a", None)];
        let d = run(&s, &devices, &[], 50, &mut StartLog::default());
        assert_eq!(d.holds, vec![Hold::OutsideWindow]);
        let w = d.status.waiting.unwrap();
        assert_eq!(
            (w.reason.as_str(), w.until),
            ("NotBefore", Some(k8s_time(100)))
        );
        assert!(!d.deadline_passed);
        let d = run(&s, &devices, &[], 250, &mut StartLog::default());
        assert!(d.deadline_passed && d.blocker.is_none() && d.status.waiting.is_none());
        // A device not started by the deadline is held back (unstarted), not left out.
        assert_eq!((d.holds[0], d.exclusions[0]), (Hold::OutsideWindow, None));
        // Windows that never open before the deadline: a blocker naming the fields.
        let s = spec(
            serde_json::json!({"schedule": {"deadline": "1970-01-01T00:03:20Z",
            "windows": [{"start": "12:00", "duration": "1h"}]}}),
        );
        let d = run(&s, &devices, &[], 50, &mut StartLog::default());
        let b = d.blocker.unwrap();
        assert_eq!(b.reason, BlockerReason::WindowNeverOpens);
        assert!(b.message.contains("spec.schedule.windows"));
    }

    #[test]
    fn the_rate_caps_starts_and_waits_for_the_minute() {
        let mut s = spec(serde_json::json!({}));
        s.rollout.max_per_minute = Some(10);
        s.rollout.ramp = Some(RampSpec {
            start_per_minute: 2,
            factor: 2.0,
            successes_per_step: 2,
        });
        let devices = vec![device("a", None), device("b", None), device("c", None)];
        let mut log = StartLog::default();
        let d = run(&s, &devices, &[], 1000, &mut log);
        assert_eq!((d.start_cap, d.status.rate_per_minute), (Some(2), Some(2)));
        log.record(1000, 2);
        let d = run(&s, &devices, &[], 1010, &mut log);
        assert_eq!(d.start_cap, Some(0));
        let w = d.status.waiting.unwrap();
        assert_eq!(
            (w.reason.as_str(), w.until),
            ("RateLimited", Some(k8s_time(1060)))
        );
        assert_eq!(d.due, Some(1060));
        let _ = ScheduleSpec::default();
    }

    #[test]
    fn a_shard_starts_only_its_share_of_the_rate() {
        let mut s = spec(serde_json::json!({}));
        s.rollout.max_per_minute = Some(10);
        let devices = vec![device("a", None), device("b", None), device("c", None)];
        let mut log = StartLog::default();
        let d = run_shared(&s, &devices, &[], 1000, &mut log, Some(1));
        assert_eq!((d.start_cap, d.status.rate_per_minute), (Some(1), Some(1)));
        log.record(1000, 1);
        let d = run_shared(&s, &devices, &[], 1010, &mut log, Some(1));
        assert_eq!(d.start_cap, Some(0));
        assert_eq!(d.due, Some(1060));
    }
}
