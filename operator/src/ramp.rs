//! The start rate (pure): `spec.rollout.maxPerMinute` and the exponential ramp (as AWS IoT Jobs'
//! `exponentialRate`: a base rate, a factor, and successes per step), and the sliding minute of
//! starts it is held to. The rate is `startPerMinute x factor^(succeeded / successesPerStep)`,
//! capped by `maxPerMinute`; at most that many devices start in any 60 seconds, on top of
//! `maxInFlight`. The log of starts lives in the controller's memory: an operator that restarts
//! forgets the last minute, so at most one minute's worth more may start right after it.

use std::collections::VecDeque;

use crate::crd::RolloutSpec;

/// The sliding window the rate counts starts over.
pub const WINDOW_SECS: u64 = 60;

/// The rate settings of a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct Rate {
    max_per_minute: Option<u32>,
    ramp: Option<(u32, f64, u32)>,
}

impl Rate {
    /// From `spec.rollout` (the apiserver enforced the bounds).
    pub fn from_spec(spec: &RolloutSpec) -> Self {
        Self {
            max_per_minute: spec.max_per_minute,
            ramp: spec.ramp.as_ref().map(|r| {
                (
                    r.start_per_minute.max(1),
                    r.factor.max(1.0),
                    r.successes_per_step.max(1),
                )
            }),
        }
    }

    /// Whether any rate applies.
    pub fn is_limited(&self) -> bool {
        self.max_per_minute.is_some() || self.ramp.is_some()
    }

    /// Starts allowed per minute after `succeeded` successes (`None`: unlimited).
    pub fn per_minute(&self, succeeded: u32) -> Option<u32> {
        let ramped = self.ramp.map(|(start, factor, per_step)| {
            let steps = (succeeded / per_step).min(64) as i32;
            let rate = f64::from(start) * factor.powi(steps);
            if rate >= f64::from(u32::MAX) {
                u32::MAX
            } else {
                rate.floor() as u32
            }
        });
        match (ramped, self.max_per_minute) {
            (Some(r), Some(m)) => Some(r.min(m)),
            (r, m) => r.or(m),
        }
    }
}

/// When devices started in the last minute (the controller keeps one per campaign).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartLog {
    starts: VecDeque<u64>,
}

/// What the rate allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    /// Devices that may start now.
    pub starts: u32,
    /// When one more may start, if none may now.
    pub next: Option<u64>,
}

impl StartLog {
    fn forget_before(&mut self, now: u64) {
        while self
            .starts
            .front()
            .is_some_and(|t| t.saturating_add(WINDOW_SECS) <= now)
        {
            self.starts.pop_front();
        }
    }

    /// Starts in the last minute, at `now`.
    pub fn recent(&mut self, now: u64) -> u32 {
        self.forget_before(now);
        self.starts.len() as u32
    }

    /// What `per_minute` allows at `now`.
    pub fn allowance(&mut self, per_minute: u32, now: u64) -> Allowance {
        let recent = self.recent(now);
        let starts = per_minute.saturating_sub(recent);
        let next = (starts == 0)
            .then(|| {
                // The start that makes room again: the (recent - per_minute + 1)th oldest.
                let index = (recent - per_minute) as usize;
                self.starts
                    .get(index)
                    .map(|t| t.saturating_add(WINDOW_SECS))
            })
            .flatten();
        Allowance { starts, next }
    }

    /// Record `n` starts at `now`.
    pub fn record(&mut self, now: u64, n: usize) {
        self.starts.extend(std::iter::repeat_n(now, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RampSpec;

    fn rate(max: Option<u32>, ramp: Option<(u32, f64, u32)>) -> Rate {
        Rate::from_spec(&RolloutSpec {
            max_per_minute: max,
            ramp: ramp.map(|(s, f, p)| RampSpec {
                start_per_minute: s,
                factor: f,
                successes_per_step: p,
            }),
            ..RolloutSpec::default()
        })
    }

    #[test]
    fn no_settings_no_limit() {
        let r = rate(None, None);
        assert!(!r.is_limited());
        assert_eq!(r.per_minute(1000), None);
    }

    #[test]
    fn the_ramp_grows_by_its_factor_per_step_up_to_the_cap() {
        // AWS IoT Jobs' example shape: base 2/min, x2 every 5 successes, at most 20/min.
        let r = rate(Some(20), Some((2, 2.0, 5)));
        let seen: Vec<_> = [0, 4, 5, 9, 10, 15, 20, 1000]
            .iter()
            .map(|s| r.per_minute(*s).unwrap())
            .collect();
        assert_eq!(seen, vec![2, 2, 4, 4, 8, 16, 20, 20]);
        assert_eq!(rate(None, Some((3, 1.5, 1))).per_minute(2), Some(6)); // 3 x 2.25 = 6.75
        assert_eq!(rate(Some(7), None).per_minute(0), Some(7));
    }

    #[test]
    fn a_sliding_minute_counts_starts() {
        let mut log = StartLog::default();
        assert_eq!(
            log.allowance(3, 100),
            Allowance {
                starts: 3,
                next: None
            }
        );
        log.record(100, 2);
        log.record(110, 1);
        assert_eq!(
            log.allowance(3, 120),
            Allowance {
                starts: 0,
                next: Some(160)
            }
        );
        assert_eq!(log.allowance(3, 160).starts, 2, "the two of t=100 left");
        assert_eq!(log.allowance(3, 170).starts, 3);
        // A rate lowered below what started: the wait is until enough left.
        let mut log = StartLog::default();
        log.record(0, 5);
        log.record(30, 5);
        assert_eq!(
            log.allowance(4, 40),
            Allowance {
                starts: 0,
                next: Some(90)
            }
        );
    }
}
