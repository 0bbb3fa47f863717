//! The gate between waves (pure): a state machine over `status.gate`. When a wave finished and
//! the next is held, the gate soaks for `soakSeconds`, then judges its checks — device health (a
//! share of the wave's updated devices sent a signed healthy report), a Prometheus metric against
//! a threshold (the query's samples, fetched by the shell, judged here), a manual promotion
//! (`spec.promoteThroughWave`). All pass: the next wave opens. One fails: the campaign pauses or
//! aborts, as `onFailure` says, until a promotion past the wave. The state lives on the status,
//! so a restarted operator resumes the soak where it was. No clock, no I/O.

use crate::crd::{GateFailureAction, GateSpec, GateStatus};
use crate::time::{k8s_time, unix_secs};

/// The gate is soaking.
pub const SOAKING: &str = "Soaking";
/// The automatic checks passed; a manual promotion is awaited.
pub const WAITING_FOR_PROMOTION: &str = "WaitingForPromotion";
/// The gate passed (or the wave was promoted).
pub const PASSED: &str = "Passed";
/// A check failed.
pub const FAILED: &str = "Failed";

/// Health reports of the devices a wave updated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthTally {
    /// Devices of the wave that installed the update.
    pub updated: u32,
    /// Of them, those whose latest signed health report says healthy.
    pub healthy: u32,
    /// Of them, those that sent any report.
    pub reported: u32,
}

/// The samples of the metric query, or why there are none.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricResult {
    /// The query's samples (labels as text, value).
    Samples(Vec<(String, f64)>),
    /// The query failed (unreachable, bad query, bad answer).
    Error(String),
}

/// What one pass of the gate sees.
#[derive(Clone, Debug)]
pub struct GateInput<'a> {
    /// `spec.rollout.gate`.
    pub spec: &'a GateSpec,
    /// `status.gate` as stored.
    pub previous: Option<&'a GateStatus>,
    /// `spec.promoteThroughWave`.
    pub promoted_through: Option<u32>,
    /// The wave that finished and waits for this gate (from the rollout), if any.
    pub awaiting: Option<u32>,
    /// Unix seconds.
    pub now: u64,
    /// Health of the awaiting wave's updated devices.
    pub health: HealthTally,
    /// The metric query's result, when the shell ran it (see [`needs_metric`]).
    pub metric: Option<MetricResult>,
}

/// The gate after one pass.
#[derive(Clone, Debug, PartialEq)]
pub struct GateOutcome {
    /// The status to record.
    pub status: Option<GateStatus>,
    /// The gate failed: what the campaign does, and why.
    pub failed: Option<(GateFailureAction, String)>,
    /// When to look again (the soak's end).
    pub due: Option<u64>,
}

/// Waves the campaign may open up to (the rollout's wave limit): the waves whose gate passed,
/// or that `spec.promoteThroughWave` promoted.
pub fn wave_limit(previous: Option<&GateStatus>, promoted_through: Option<u32>) -> u32 {
    let passed = previous.map_or(0, |g| g.passed_waves);
    passed.max(promoted_through.map_or(0, |w| w.saturating_add(1)))
}

/// Whether this pass judges the gate and needs the metric query's result first.
pub fn needs_metric(
    input_spec: &GateSpec,
    previous: Option<&GateStatus>,
    awaiting: Option<u32>,
    now: u64,
) -> bool {
    let Some(wave) = awaiting else {
        return false;
    };
    if input_spec.metrics.is_none() {
        return false;
    }
    match previous.filter(|g| g.wave == wave) {
        Some(g) if g.state == SOAKING => g
            .soak_until
            .as_ref()
            .and_then(unix_secs)
            .is_none_or(|t| t <= now),
        Some(_) => false,
        None => input_spec.soak_seconds == 0,
    }
}

fn status(wave: u32, state: &str, passed_waves: u32, message: String) -> GateStatus {
    GateStatus {
        wave,
        state: state.to_owned(),
        passed_waves,
        soak_until: None,
        healthy: None,
        metric: None,
        message,
    }
}

/// Judge the metric's samples against the thresholds: `Ok(text)` passes, `Err(text)` fails.
pub fn judge_metric(
    result: &MetricResult,
    max: Option<f64>,
    min: Option<f64>,
) -> Result<String, String> {
    let samples = match result {
        MetricResult::Error(e) => return Err(format!("the query failed: {e}")),
        MetricResult::Samples(s) if s.is_empty() => {
            return Err("the query returned no sample (no data is no evidence)".to_owned())
        }
        MetricResult::Samples(s) => s,
    };
    let shown: Vec<String> = samples
        .iter()
        .take(3)
        .map(|(labels, v)| {
            if labels.is_empty() {
                format!("{v}")
            } else {
                format!("{labels} {v}")
            }
        })
        .collect();
    let text = shown.join(", ");
    let bad = samples
        .iter()
        .find(|(_, v)| v.is_nan() || max.is_some_and(|m| *v > m) || min.is_some_and(|m| *v < m));
    match bad {
        Some((labels, v)) => Err(format!(
            "{labels} {v} is outside the threshold ({})",
            threshold_text(max, min)
        )),
        None => Ok(text),
    }
}

fn threshold_text(max: Option<f64>, min: Option<f64>) -> String {
    match (min, max) {
        (Some(a), Some(b)) => format!("{a} to {b}"),
        (Some(a), None) => format!("at least {a}"),
        (None, Some(b)) => format!("at most {b}"),
        (None, None) => "none".to_owned(),
    }
}

/// One pass of the gate.
pub fn step(input: &GateInput<'_>) -> GateOutcome {
    let spec = input.spec;
    let previous = input.previous;
    let passed_waves = wave_limit(previous, input.promoted_through);
    let keep = |g: Option<&GateStatus>| GateOutcome {
        status: g.cloned().map(|mut g| {
            g.passed_waves = passed_waves;
            g
        }),
        failed: None,
        due: None,
    };
    let Some(wave) = input.awaiting else {
        // No wave waits: a promotion may have moved the limit; a failed gate the promotion
        // passed is over.
        return match previous {
            Some(g) if g.state == FAILED && passed_waves > g.wave => {
                let mut g = g.clone();
                g.state = PASSED.to_owned();
                g.passed_waves = passed_waves;
                g.message = format!("promoted past wave {} by spec.promoteThroughWave", g.wave);
                GateOutcome {
                    status: Some(g),
                    failed: None,
                    due: None,
                }
            }
            Some(g) if g.state == FAILED => GateOutcome {
                status: Some(g.clone()),
                failed: Some((spec.on_failure, g.message.clone())),
                due: None,
            },
            g => keep(g),
        };
    };
    if passed_waves > wave {
        // Promoted past it (the rollout opens the next wave on its next pass).
        let mut g = status(
            wave,
            PASSED,
            passed_waves,
            format!("wave {wave} promoted by spec.promoteThroughWave"),
        );
        if let Some(p) = previous.filter(|p| p.wave == wave) {
            g.healthy = p.healthy.clone();
            g.metric = p.metric.clone();
        }
        return GateOutcome {
            status: Some(g),
            failed: None,
            due: None,
        };
    }
    let current = previous.filter(|g| g.wave == wave);
    match current {
        Some(g) if g.state == FAILED => GateOutcome {
            status: Some(GateStatus {
                passed_waves,
                ..g.clone()
            }),
            failed: Some((spec.on_failure, g.message.clone())),
            due: None,
        },
        Some(g) if g.state == WAITING_FOR_PROMOTION => keep(Some(g)),
        Some(g) if g.state == SOAKING => {
            let until = g
                .soak_until
                .as_ref()
                .and_then(unix_secs)
                .unwrap_or(input.now);
            if until > input.now {
                return GateOutcome {
                    due: Some(until),
                    ..keep(Some(g))
                };
            }
            judge(input, wave, passed_waves, Some(until))
        }
        _ if spec.soak_seconds > 0 => {
            let until = input.now + u64::from(spec.soak_seconds);
            let mut g = status(
                wave,
                SOAKING,
                passed_waves,
                format!(
                    "wave {wave} finished; soaking {} s before the gate is judged",
                    spec.soak_seconds
                ),
            );
            g.soak_until = Some(k8s_time(until));
            GateOutcome {
                status: Some(g),
                failed: None,
                due: Some(until),
            }
        }
        _ => judge(input, wave, passed_waves, None),
    }
}

/// The soak is over: judge every check.
fn judge(input: &GateInput<'_>, wave: u32, passed_waves: u32, soaked: Option<u64>) -> GateOutcome {
    let spec = input.spec;
    let mut failures = Vec::new();
    let mut g = status(wave, PASSED, passed_waves, String::new());
    g.soak_until = soaked.map(k8s_time);
    if let Some(h) = &spec.device_health {
        let t = input.health;
        g.healthy = Some(format!("{}/{}", t.healthy, t.updated));
        if u64::from(t.healthy) * 100 < u64::from(h.min_healthy_percent) * u64::from(t.updated) {
            failures.push(format!(
                "{} of {} updated devices reported healthy ({} reported), fewer than {}%",
                t.healthy, t.updated, t.reported, h.min_healthy_percent
            ));
        }
    }
    if let Some(m) = &spec.metrics {
        let result = input
            .metric
            .clone()
            .unwrap_or_else(|| MetricResult::Error("not queried".to_owned()));
        match judge_metric(&result, m.max, m.min) {
            Ok(text) => g.metric = Some(crate::status::bounded(&text, 256)),
            Err(why) => {
                g.metric = Some(crate::status::bounded(&why, 256));
                failures.push(format!("metric: {why}"));
            }
        }
    }
    if !failures.is_empty() {
        g.state = FAILED.to_owned();
        g.message = crate::status::bounded(
            &format!("the gate after wave {wave} failed: {}", failures.join("; ")),
            512,
        );
        return GateOutcome {
            failed: Some((spec.on_failure, g.message.clone())),
            status: Some(g),
            due: None,
        };
    }
    if spec.manual && input.promoted_through.is_none_or(|p| p < wave) {
        g.state = WAITING_FOR_PROMOTION.to_owned();
        g.message = format!(
            "the checks after wave {wave} passed; waiting for spec.promoteThroughWave: {wave}"
        );
        return GateOutcome {
            status: Some(g),
            failed: None,
            due: None,
        };
    }
    g.passed_waves = passed_waves.max(wave + 1);
    g.message = format!("the gate after wave {wave} passed");
    GateOutcome {
        status: Some(g),
        failed: None,
        due: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceHealthGate, MetricsGate};

    fn spec(soak: u32) -> GateSpec {
        GateSpec {
            soak_seconds: soak,
            on_failure: GateFailureAction::Pause,
            device_health: Some(DeviceHealthGate {
                min_healthy_percent: 80,
            }),
            metrics: None,
            manual: false,
        }
    }

    fn input<'a>(spec: &'a GateSpec, previous: Option<&'a GateStatus>, now: u64) -> GateInput<'a> {
        GateInput {
            spec,
            previous,
            promoted_through: None,
            awaiting: Some(0),
            now,
            health: HealthTally {
                updated: 5,
                healthy: 5,
                reported: 5,
            },
            metric: None,
        }
    }

    #[test]
    fn a_finished_wave_soaks_then_passes_and_opens_the_next() {
        let s = spec(30);
        let out = step(&input(&s, None, 100));
        let g = out.status.clone().unwrap();
        assert_eq!((g.state.as_str(), g.passed_waves), (SOAKING, 0));
        assert_eq!(out.due, Some(130));
        assert_eq!(wave_limit(Some(&g), None), 0, "the next wave stays shut");
        // Still soaking.
        let again = step(&input(&s, Some(&g), 120));
        assert_eq!(again.status.as_ref().unwrap().state, SOAKING);
        assert_eq!(again.due, Some(130));
        // Soaked: 5/5 healthy passes.
        let done = step(&input(&s, Some(&g), 130));
        let passed = done.status.unwrap();
        assert_eq!((passed.state.as_str(), passed.passed_waves), (PASSED, 1));
        assert_eq!(passed.healthy.as_deref(), Some("5/5"));
        assert_eq!(wave_limit(Some(&passed), None), 1);
        assert!(done.failed.is_none());
    }

    #[test]
    fn too_few_healthy_devices_fail_the_gate_and_it_stays_failed_until_promoted() {
        let s = spec(0);
        let mut i = input(&s, None, 100);
        i.health = HealthTally {
            updated: 5,
            healthy: 3,
            reported: 4,
        };
        let out = step(&i);
        let g = out.status.clone().unwrap();
        assert_eq!(g.state, FAILED);
        let (action, why) = out.failed.unwrap();
        assert_eq!(action, GateFailureAction::Pause);
        assert!(
            why.contains("3 of 5 updated devices reported healthy"),
            "{why}"
        );
        // Health recovering later does not reopen it: a failed gate waits for a person.
        let mut later = input(&s, Some(&g), 200);
        later.health = HealthTally {
            updated: 5,
            healthy: 5,
            reported: 5,
        };
        assert!(step(&later).failed.is_some());
        // A promotion past the wave does.
        let mut promoted = input(&s, Some(&g), 300);
        promoted.promoted_through = Some(0);
        let out = step(&promoted);
        assert!(out.failed.is_none());
        assert_eq!(out.status.unwrap().passed_waves, 1);
    }

    #[test]
    fn eighty_percent_of_five_is_four() {
        let s = spec(0);
        let mut i = input(&s, None, 100);
        i.health = HealthTally {
            updated: 5,
            healthy: 4,
            reported: 5,
        };
        assert!(step(&i).failed.is_none());
    }

    #[test]
    fn a_manual_gate_waits_for_the_promotion_field() {
        let s = GateSpec {
            device_health: None,
            manual: true,
            ..spec(0)
        };
        let out = step(&input(&s, None, 100));
        let g = out.status.unwrap();
        assert_eq!(
            (g.state.as_str(), g.passed_waves),
            (WAITING_FOR_PROMOTION, 0)
        );
        let mut i = input(&s, Some(&g), 200);
        assert_eq!(step(&i).status.unwrap().state, WAITING_FOR_PROMOTION);
        i.promoted_through = Some(0);
        let out = step(&i);
        assert_eq!(out.status.unwrap().passed_waves, 1);
        assert_eq!(wave_limit(None, Some(0)), 1);
    }

    #[test]
    fn metrics_are_judged_against_the_threshold() {
        let m = |max, min| MetricsGate {
            prometheus_url: "http://p:9090".into(),
            query: "q".into(),
            max,
            min,
        };
        let s = GateSpec {
            device_health: None,
            metrics: Some(m(Some(0.05), None)),
            ..spec(10)
        };
        let soaking = step(&input(&s, None, 100)).status.unwrap();
        assert!(!needs_metric(&s, Some(&soaking), Some(0), 105));
        assert!(needs_metric(&s, Some(&soaking), Some(0), 110));
        assert!(!needs_metric(&s, Some(&soaking), None, 110));
        let mut i = input(&s, Some(&soaking), 110);
        i.metric = Some(MetricResult::Samples(vec![("{job=\"a\"}".into(), 0.01)]));
        let out = step(&i);
        assert_eq!(out.status.as_ref().unwrap().state, PASSED);
        assert!(out.status.unwrap().metric.unwrap().contains("0.01"));
        i.metric = Some(MetricResult::Samples(vec![("{job=\"a\"}".into(), 0.2)]));
        let out = step(&i);
        assert!(out
            .failed
            .unwrap()
            .1
            .contains("outside the threshold (at most 0.05)"));
        i.metric = Some(MetricResult::Samples(vec![]));
        assert!(step(&i).failed.unwrap().1.contains("no sample"));
        i.metric = Some(MetricResult::Error("connection refused".into()));
        assert!(step(&i).failed.unwrap().1.contains("connection refused"));
        assert!(judge_metric(
            &MetricResult::Samples(vec![("".into(), f64::NAN)]),
            Some(1.0),
            None
        )
        .is_err());
        assert!(judge_metric(
            &MetricResult::Samples(vec![("".into(), 3.0)]),
            None,
            Some(2.0)
        )
        .is_ok());
        assert!(judge_metric(
            &MetricResult::Samples(vec![("".into(), 1.0)]),
            None,
            Some(2.0)
        )
        .is_err());
    }

    #[test]
    fn abort_is_what_the_spec_says() {
        let s = GateSpec {
            on_failure: GateFailureAction::Abort,
            ..spec(0)
        };
        let mut i = input(&s, None, 100);
        i.health = HealthTally {
            updated: 2,
            healthy: 0,
            reported: 0,
        };
        assert_eq!(step(&i).failed.unwrap().0, GateFailureAction::Abort);
    }

    #[test]
    fn the_gate_of_a_later_wave_starts_afresh_and_keeps_what_passed() {
        let s = spec(0);
        let first = step(&input(&s, None, 100)).status.unwrap();
        assert_eq!(first.passed_waves, 1);
        let mut i = input(&s, Some(&first), 200);
        i.awaiting = Some(1);
        let second = step(&i).status.unwrap();
        assert_eq!((second.wave, second.passed_waves), (1, 2));
        // Nothing awaiting: the record is kept as it is.
        let mut idle = input(&s, Some(&second), 300);
        idle.awaiting = None;
        assert_eq!(step(&idle).status.unwrap(), second);
    }
}
