//! Maintenance windows and the campaign schedule (pure): when a device may start. A [`Calendar`]
//! is the campaign's `notBefore`/`deadline` and its recurring windows (days of the week, a local
//! start, a duration) read in an IANA time zone from the `chrono-tz` database, intersected, for a
//! device with its own `spec.maintenance`, with the device's windows (and read in the device's
//! time zone). It answers, for a given instant, whether it is open and until when, or when it
//! opens next — or that it never does. Local times that fall in a daylight-saving gap open when
//! the local clock resumes; an ambiguous local time opens at its first occurrence. No clock and no
//! I/O: `now` is passed in.

use chrono::{
    Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike,
};
use chrono_tz::Tz;

use crate::crd::{DeviceMaintenanceSpec, ScheduleSpec, Weekday, WindowSpec};
use crate::time::unix_secs;

/// How far ahead a window is looked for before it is called one that never opens: a little more
/// than a year, so every daylight-saving combination of two time zones is seen once.
const NEVER_HORIZON: u64 = 400 * 86_400;
/// The first look ahead (most windows open within a week or two).
const NEAR_HORIZON: u64 = 15 * 86_400;
/// The longest window.
const MAX_DURATION: u32 = 168 * 3600;

/// A schedule field the apiserver let through but that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// Not a time zone of the IANA database.
    #[error("{field}: {value:?} is not an IANA time zone (for example Europe/Berlin or UTC)")]
    TimeZone {
        /// The field.
        field: &'static str,
        /// What it says.
        value: String,
    },
    /// Not HH:MM or HH:MM:SS.
    #[error("{field}: {value:?} is not a local time HH:MM or HH:MM:SS")]
    Start {
        /// The field.
        field: &'static str,
        /// What it says.
        value: String,
    },
    /// Not a duration such as 4h, 90m, 1h30m or 45s between 1 s and 168 h.
    #[error(
        "{field}: {value:?} is not a duration between 1s and 168h such as 4h, 90m, 1h30m or 45s"
    )]
    Duration {
        /// The field.
        field: &'static str,
        /// What it says.
        value: String,
    },
    /// The deadline is not after notBefore.
    #[error("spec.schedule.deadline must be after spec.schedule.notBefore")]
    DeadlineBeforeNotBefore,
}

/// One recurring window.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    /// Bit `n` set: opens on weekday `n` (Monday 0). All bits: every day.
    days: u8,
    /// Seconds after local midnight.
    start: u32,
    /// Seconds open.
    duration: u32,
}

/// Windows read in one time zone: open when any of them is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Part {
    tz: Tz,
    windows: Vec<Window>,
}

/// When devices may start: open intervals of time, as the intersection of every part's windows
/// and `[notBefore, deadline)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    not_before: Option<u64>,
    deadline: Option<u64>,
    parts: Vec<Part>,
}

/// Whether a calendar is open at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Openness {
    /// Open; closes at this time (`None`: not within the look-ahead, or never).
    Open {
        /// Unix seconds.
        closes: Option<u64>,
    },
    /// Closed; opens at this time (`None`: never).
    Closed {
        /// Unix seconds.
        opens: Option<u64>,
    },
}

impl Openness {
    /// Whether it is open.
    pub fn is_open(self) -> bool {
        matches!(self, Openness::Open { .. })
    }
}

/// Seconds of `4h`, `90m`, `1h30m`, `45s` (hours, minutes, seconds in that order, each optional,
/// at least one), 1 s to 168 h.
pub fn parse_duration(text: &str) -> Option<u32> {
    let mut total: u64 = 0;
    let mut rest = text;
    let mut last_unit = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        let (unit, rank) = match rest[digits..].chars().next()? {
            'h' => (3600, 1),
            'm' => (60, 2),
            's' => (1, 3),
            _ => return None,
        };
        if rank <= last_unit {
            return None;
        }
        last_unit = rank;
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[digits + 1..];
    }
    u32::try_from(total)
        .ok()
        .filter(|d| (1..=MAX_DURATION).contains(d))
}

/// Seconds after midnight of `HH:MM` or `HH:MM:SS`.
pub fn parse_start(text: &str) -> Option<u32> {
    let t = NaiveTime::parse_from_str(text, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M"))
        .ok()?;
    Some(t.num_seconds_from_midnight())
}

/// The time zone named `text`.
pub fn parse_time_zone(field: &'static str, text: &str) -> Result<Tz, ScheduleError> {
    text.parse::<Tz>().map_err(|_| ScheduleError::TimeZone {
        field,
        value: text.to_owned(),
    })
}

fn weekday_bit(d: Weekday) -> u8 {
    1 << match d {
        Weekday::Mon => 0,
        Weekday::Tue => 1,
        Weekday::Wed => 2,
        Weekday::Thu => 3,
        Weekday::Fri => 4,
        Weekday::Sat => 5,
        Weekday::Sun => 6,
    }
}

fn windows(field: &'static str, specs: &[WindowSpec]) -> Result<Vec<Window>, ScheduleError> {
    specs
        .iter()
        .map(|w| {
            let days = w.days.iter().fold(0u8, |acc, d| acc | weekday_bit(*d));
            Ok(Window {
                days: if days == 0 { 0x7f } else { days },
                start: parse_start(&w.start).ok_or_else(|| ScheduleError::Start {
                    field,
                    value: w.start.clone(),
                })?,
                duration: parse_duration(&w.duration).ok_or_else(|| ScheduleError::Duration {
                    field,
                    value: w.duration.clone(),
                })?,
            })
        })
        .collect()
}

impl Calendar {
    /// Always open.
    pub fn always() -> Self {
        Self {
            not_before: None,
            deadline: None,
            parts: Vec::new(),
        }
    }

    /// The campaign's calendar (`None`: no schedule, always open).
    pub fn for_campaign(spec: Option<&ScheduleSpec>) -> Result<Self, ScheduleError> {
        Self::for_device(spec, None)
    }

    /// A device's calendar: the campaign's windows read in the device's time zone (when it has
    /// one), intersected with the device's own windows.
    pub fn for_device(
        spec: Option<&ScheduleSpec>,
        device: Option<&DeviceMaintenanceSpec>,
    ) -> Result<Self, ScheduleError> {
        let default = ScheduleSpec::default();
        let spec = spec.unwrap_or(&default);
        let campaign_tz = match &spec.time_zone {
            Some(tz) => parse_time_zone("spec.schedule.timeZone", tz)?,
            None => Tz::UTC,
        };
        let tz = match device.and_then(|d| d.time_zone.as_deref()) {
            Some(tz) => parse_time_zone("Device spec.maintenance.timeZone", tz)?,
            None => campaign_tz,
        };
        let mut parts = Vec::new();
        let own = windows("spec.schedule.windows", &spec.windows)?;
        if !own.is_empty() {
            parts.push(Part { tz, windows: own });
        }
        if let Some(d) = device {
            let theirs = windows("Device spec.maintenance.windows", &d.windows)?;
            if !theirs.is_empty() {
                parts.push(Part {
                    tz,
                    windows: theirs,
                });
            }
        }
        let not_before = spec.not_before.as_ref().and_then(unix_secs);
        let deadline = spec.deadline.as_ref().and_then(unix_secs);
        if let (Some(a), Some(b)) = (not_before, deadline) {
            if b <= a {
                return Err(ScheduleError::DeadlineBeforeNotBefore);
            }
        }
        Ok(Self {
            not_before,
            deadline,
            parts,
        })
    }

    /// Whether the calendar has windows (rather than only notBefore/deadline, or nothing).
    pub fn has_windows(&self) -> bool {
        !self.parts.is_empty()
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// The open intervals `[start, end)` overlapping `[from, to)`, clipped to it, sorted.
    pub fn intervals(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let lo = from.max(self.not_before.unwrap_or(0));
        let hi = to.min(self.deadline.unwrap_or(u64::MAX));
        if lo >= hi {
            return Vec::new();
        }
        let mut open = vec![(lo, hi)];
        for part in &self.parts {
            open = intersect(&open, &part.intervals(lo, hi));
        }
        open
    }

    /// Open or closed at `now`, and until or from when.
    pub fn at(&self, now: u64) -> Openness {
        for horizon in [NEAR_HORIZON, NEVER_HORIZON] {
            let list = self.intervals(now, now.saturating_add(horizon));
            let edge = now.saturating_add(horizon);
            match list.first() {
                Some(&(start, end)) if start <= now => {
                    return Openness::Open {
                        closes: (end < edge).then_some(end),
                    }
                }
                Some(&(start, _)) => return Openness::Closed { opens: Some(start) },
                None if self.deadline.is_some_and(|d| d <= edge) => break,
                None => {}
            }
        }
        Openness::Closed { opens: None }
    }
}

impl Part {
    /// The union of this part's windows overlapping `[from, to)`, merged and clipped.
    fn intervals(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let day = |t: u64| {
            self.tz
                .timestamp_opt(t as i64, 0)
                .single()
                .map(|d| d.date_naive())
        };
        let (Some(first), Some(last)) = (day(from), day(to)) else {
            return Vec::new();
        };
        let mut list = Vec::new();
        // A window opened up to 7 days (its longest) before `from` may still be open.
        let mut date = first - Duration::days(8);
        while date <= last {
            let bit = 1u8 << date.weekday().num_days_from_monday();
            for w in self.windows.iter().filter(|w| w.days & bit != 0) {
                if let Some(start) = local_instant(self.tz, date, w.start) {
                    let end = start.saturating_add(u64::from(w.duration));
                    if end > from && start < to {
                        list.push((start.max(from), end.min(to)));
                    }
                }
            }
            date = date.succ_opt().unwrap_or(date);
            if date == NaiveDate::MAX {
                break;
            }
        }
        merge(list)
    }
}

/// The instant local time `secs` after midnight of `date` names in `tz`: its first occurrence
/// when ambiguous, the end of the gap when the clock skips it.
fn local_instant(tz: Tz, date: NaiveDate, secs: u32) -> Option<u64> {
    let local: NaiveDateTime =
        date.and_time(NaiveTime::from_num_seconds_from_midnight_opt(secs, 0)?);
    let mut probe = local;
    // A gap lasts at most a few hours: the first valid local minute after it is when the clock
    // resumes.
    for _ in 0..=(4 * 60) {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return u64::try_from(t.timestamp()).ok(),
            LocalResult::Ambiguous(first, _) => return u64::try_from(first.timestamp()).ok(),
            LocalResult::None => {
                let next = probe + Duration::minutes(1);
                probe = next.with_second(0).unwrap_or(next);
            }
        }
    }
    None
}

fn merge(mut list: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    list.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(list.len());
    for (s, e) in list {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::k8s_time;

    fn window(days: &[Weekday], start: &str, duration: &str) -> WindowSpec {
        WindowSpec {
            days: days.to_vec(),
            start: start.into(),
            duration: duration.into(),
        }
    }

    fn utc(text: &str) -> u64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp() as u64
    }

    fn schedule(tz: Option<&str>, windows: Vec<WindowSpec>) -> ScheduleSpec {
        ScheduleSpec {
            time_zone: tz.map(str::to_owned),
            windows,
            ..ScheduleSpec::default()
        }
    }

    #[test]
    fn durations_and_starts_parse_strictly() {
        assert_eq!(parse_duration("4h"), Some(14_400));
        assert_eq!(parse_duration("1h30m"), Some(5_400));
        assert_eq!(parse_duration("90m"), Some(5_400));
        assert_eq!(parse_duration("45s"), Some(45));
        assert_eq!(parse_duration("168h"), Some(604_800));
        for bad in [
            "", "0s", "169h", "30m1h", "h", "4", "4d", "1h1h", "-1s", "1.5h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_start("02:00"), Some(7_200));
        assert_eq!(parse_start("23:59:30"), Some(86_370));
        assert_eq!(parse_start("24:00"), None);
        assert_eq!(parse_start("2am"), None);
    }

    #[test]
    fn a_nightly_window_in_berlin_opens_at_local_two_oclock() {
        let spec = schedule(Some("Europe/Berlin"), vec![window(&[], "02:00", "4h")]);
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        // 2026-01-15: Berlin is UTC+1, so 02:00 local is 01:00Z.
        assert_eq!(
            cal.at(utc("2026-01-15T00:30:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-01-15T01:00:00Z"))
            }
        );
        assert_eq!(
            cal.at(utc("2026-01-15T02:00:00Z")),
            Openness::Open {
                closes: Some(utc("2026-01-15T05:00:00Z"))
            }
        );
        // Summer (UTC+2): 02:00 local is 00:00Z.
        assert_eq!(
            cal.at(utc("2026-07-15T23:30:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-07-16T00:00:00Z"))
            }
        );
    }

    #[test]
    fn days_of_the_week_are_local_days() {
        // Sunday 23:00 in Auckland is Sunday 10:00Z in January (UTC+13).
        let spec = schedule(
            Some("Pacific/Auckland"),
            vec![window(&[Weekday::Sun], "23:00", "30m")],
        );
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        // Monday 2026-01-05T00:00Z is Monday 13:00 in Auckland: next is Sunday 2026-01-11 23:00 local.
        assert_eq!(
            cal.at(utc("2026-01-05T00:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-01-11T10:00:00Z"))
            }
        );
    }

    #[test]
    fn a_window_in_a_daylight_saving_gap_opens_when_the_clock_resumes() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29: a 02:30 window opens at 03:00 local (01:00Z).
        let spec = schedule(Some("Europe/Berlin"), vec![window(&[], "02:30", "1h")]);
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        assert_eq!(
            cal.at(utc("2026-03-29T00:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-03-29T01:00:00Z"))
            }
        );
        // On 2026-10-25 02:30 happens twice: the first one (00:30Z) opens it.
        assert_eq!(
            cal.at(utc("2026-10-24T23:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-10-25T00:30:00Z"))
            }
        );
    }

    #[test]
    fn a_device_time_zone_moves_the_campaign_window_to_its_night() {
        let spec = schedule(None, vec![window(&[], "01:00", "2h")]);
        let device = DeviceMaintenanceSpec {
            time_zone: Some("America/Chicago".into()),
            windows: vec![],
        };
        let cal = Calendar::for_device(Some(&spec), Some(&device)).unwrap();
        // 01:00 in Chicago in January is 07:00Z.
        assert_eq!(
            cal.at(utc("2026-01-15T02:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-01-15T07:00:00Z"))
            }
        );
        let campaign = Calendar::for_campaign(Some(&spec)).unwrap();
        assert!(campaign.at(utc("2026-01-15T02:00:00Z")).is_open());
    }

    #[test]
    fn device_windows_intersect_the_campaigns() {
        let spec = schedule(None, vec![window(&[], "00:00", "6h")]);
        let device = DeviceMaintenanceSpec {
            time_zone: None,
            windows: vec![window(&[Weekday::Sat], "04:00", "4h")],
        };
        let cal = Calendar::for_device(Some(&spec), Some(&device)).unwrap();
        // 2026-01-15 is a Thursday: next Saturday 04:00-06:00Z.
        assert_eq!(
            cal.at(utc("2026-01-15T05:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-01-17T04:00:00Z"))
            }
        );
        assert_eq!(
            cal.at(utc("2026-01-17T05:00:00Z")),
            Openness::Open {
                closes: Some(utc("2026-01-17T06:00:00Z"))
            }
        );
        // Windows that never meet: never open.
        let device = DeviceMaintenanceSpec {
            time_zone: None,
            windows: vec![window(&[], "12:00", "1h")],
        };
        let cal = Calendar::for_device(Some(&spec), Some(&device)).unwrap();
        assert_eq!(
            cal.at(utc("2026-01-15T05:00:00Z")),
            Openness::Closed { opens: None }
        );
    }

    #[test]
    fn not_before_and_deadline_bound_the_windows() {
        let mut spec = schedule(None, vec![window(&[], "10:00", "1h")]);
        spec.not_before = Some(k8s_time(utc("2026-01-15T10:30:00Z")));
        spec.deadline = Some(k8s_time(utc("2026-01-16T10:15:00Z")));
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        assert_eq!(
            cal.at(utc("2026-01-15T09:00:00Z")),
            Openness::Closed {
                opens: Some(utc("2026-01-15T10:30:00Z"))
            }
        );
        assert_eq!(
            cal.at(utc("2026-01-16T10:00:00Z")),
            Openness::Open {
                closes: Some(utc("2026-01-16T10:15:00Z"))
            }
        );
        assert_eq!(
            cal.at(utc("2026-01-16T10:20:00Z")),
            Openness::Closed { opens: None },
            "past the deadline"
        );
        // Only notBefore, no windows.
        let spec = ScheduleSpec {
            not_before: Some(k8s_time(1_000)),
            ..ScheduleSpec::default()
        };
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        assert_eq!(cal.at(500), Openness::Closed { opens: Some(1_000) });
        assert_eq!(cal.at(1_000), Openness::Open { closes: None });
        assert_eq!(Calendar::always().at(5), Openness::Open { closes: None });
        // A deadline before the next window: never opens.
        let mut spec = schedule(None, vec![window(&[], "10:00", "1h")]);
        spec.deadline = Some(k8s_time(utc("2026-01-15T09:00:00Z")));
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        assert_eq!(
            cal.at(utc("2026-01-15T08:00:00Z")),
            Openness::Closed { opens: None }
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let spec = schedule(Some("Mars/Olympus"), vec![]);
        let e = Calendar::for_campaign(Some(&spec)).unwrap_err();
        assert!(e.to_string().contains("spec.schedule.timeZone"), "{e}");
        let spec = schedule(None, vec![window(&[], "02:00", "0s")]);
        let e = Calendar::for_campaign(Some(&spec)).unwrap_err();
        assert!(e.to_string().contains("spec.schedule.windows"), "{e}");
        let device = DeviceMaintenanceSpec {
            time_zone: Some("Nowhere".into()),
            windows: vec![],
        };
        let e = Calendar::for_device(None, Some(&device)).unwrap_err();
        assert!(e.to_string().contains("spec.maintenance.timeZone"), "{e}");
        let spec = ScheduleSpec {
            not_before: Some(k8s_time(10)),
            deadline: Some(k8s_time(10)),
            ..ScheduleSpec::default()
        };
        assert_eq!(
            Calendar::for_campaign(Some(&spec)),
            Err(ScheduleError::DeadlineBeforeNotBefore)
        );
    }

    #[test]
    fn a_window_of_a_few_seconds_opens_and_closes_on_time() {
        // What the e2e tests use: a window that opens a few seconds from now.
        let now = utc("2026-01-15T12:00:00Z");
        let spec = schedule(None, vec![window(&[], "12:00:05", "10s")]);
        let cal = Calendar::for_campaign(Some(&spec)).unwrap();
        assert_eq!(
            cal.at(now),
            Openness::Closed {
                opens: Some(now + 5)
            }
        );
        assert_eq!(
            cal.at(now + 5),
            Openness::Open {
                closes: Some(now + 15)
            }
        );
        assert_eq!(
            cal.at(now + 15),
            Openness::Closed {
                opens: Some(now + 86_400 + 5)
            }
        );
    }
}
