//! The plan of a campaign (pure): what `spec.dryRun` shows before anything starts, and what the
//! status keeps showing once it runs — the waves with their sizes and first devices (the same
//! [`wave_cutoffs`] the rollout opens them by), the devices left out and why (the policy's
//! [`Exclusion`]s), the bytes the broker would carry, and warnings about settings that work
//! against each other. Because the plan and the rollout read the same inputs through the same
//! functions, turning `dryRun` off starts exactly the plan shown (as long as the devices, their
//! versions and the other campaigns stay as they were).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::crd::{Device, PlanExclusion, PlanStatus, PlannedWave, UpdateCampaignSpec};
use crate::policy::Exclusion;
use crate::rollout::{wave_cutoffs, RolloutParams};
use crate::schedule::{Calendar, Openness};

/// Waves listed in a plan (the status bound).
pub const MAX_PLANNED_WAVES: usize = 16;
/// Devices named per wave or exclusion.
pub const FIRST_DEVICES: usize = 5;
/// Bytes the operator publishes per device besides the chunks, estimated: the signed notify
/// (with the manager certificate, about 1 KiB), the encrypted update (with the signed manifest,
/// under 1 KiB) and the empty retained publish that clears the notify, with topics.
pub const PER_DEVICE_BYTES: u64 = 3 * 1024;

/// Build the plan over the selected `devices` (wave order) with each one's exclusion, if any.
/// `chunk_bytes` is the size of the encrypted chunks with their topics, when the payload was
/// prepared.
pub fn plan(
    devices: &[Arc<Device>],
    exclusions: &[Option<Exclusion>],
    params: &RolloutParams,
    chunk_bytes: Option<u64>,
) -> PlanStatus {
    let name = |d: &Arc<Device>| d.metadata.name.clone().unwrap_or_default();
    let cutoffs = wave_cutoffs(devices.len() as u32, params);
    let mut waves = Vec::new();
    let mut start = 0usize;
    for (wave, end) in cutoffs.iter().enumerate() {
        let end = *end as usize;
        let members: Vec<&Arc<Device>> = devices[start..end]
            .iter()
            .zip(&exclusions[start..end])
            .filter(|(_, e)| e.is_none())
            .map(|(d, _)| d)
            .collect();
        if waves.len() < MAX_PLANNED_WAVES {
            waves.push(PlannedWave {
                wave: wave as u32,
                size: members.len() as u32,
                first_devices: members
                    .iter()
                    .take(FIRST_DEVICES)
                    .map(|d| name(d))
                    .collect(),
            });
        }
        start = end;
    }
    let mut excluded: BTreeMap<Exclusion, (u32, Vec<String>)> = BTreeMap::new();
    for (d, e) in devices.iter().zip(exclusions) {
        if let Some(e) = e {
            let entry = excluded.entry(*e).or_default();
            entry.0 += 1;
            if entry.1.len() < FIRST_DEVICES {
                entry.1.push(name(d));
            }
        }
    }
    let updated = exclusions.iter().filter(|e| e.is_none()).count() as u32;
    PlanStatus {
        devices: updated,
        waves,
        excluded: excluded
            .into_iter()
            .map(|(reason, (count, devices))| PlanExclusion {
                reason: reason.as_str().to_owned(),
                count,
                devices,
            })
            .collect(),
        estimated_broker_bytes: chunk_bytes
            .map(|c| c.saturating_add(u64::from(updated) * PER_DEVICE_BYTES)),
    }
}

/// Settings that work against each other, in words (pure).
pub fn warnings(
    spec: &UpdateCampaignSpec,
    params: &RolloutParams,
    selected: u32,
    calendar: Option<&Calendar>,
    now: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let canary = params.canary.map(|c| c.resolve(selected));
    let threshold = params.failure_threshold.map(|t| t.resolve(selected));
    match (canary, threshold) {
        (Some(c), Some(t)) if c > 0 && t >= c => out.push(format!(
            "spec.rollout.failureThreshold ({t} devices) is not smaller than the canary ({c} devices): a canary that fails entirely cannot stop the campaign"
        )),
        (Some(c), None) if c > 0 => out.push(
            "spec.rollout.canary is set without spec.rollout.failureThreshold: failing canaries do not stop the campaign".to_owned(),
        ),
        _ => {}
    }
    if let Some(cal) = calendar {
        if let Openness::Closed { opens: None } = cal.at(now) {
            out.push("spec.schedule never opens (its windows, within a year, or before its deadline): no device would start".to_owned());
        }
    }
    if spec.rollout.gate.is_some() && wave_cutoffs(selected, params).len() < 2 && selected > 0 {
        out.push("spec.rollout.gate is set but the rollout has a single wave: set spec.rollout.canary or waveSize for the gate to hold anything".to_owned());
    }
    if let (Some(ramp), Some(max)) = (&spec.rollout.ramp, spec.rollout.max_per_minute) {
        if ramp.start_per_minute > max {
            out.push(format!(
                "spec.rollout.ramp.startPerMinute ({}) is above maxPerMinute ({max}): the ramp never shows",
                ramp.start_per_minute
            ));
        }
    }
    if let Some(gate) = &spec.rollout.gate {
        if gate.device_health.is_some() && gate.soak_seconds == 0 {
            out.push("spec.rollout.gate.deviceHealth with soakSeconds 0: devices have no time to report their health".to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeviceSpec, RolloutSpec};
    use crate::rollout::Amount;

    fn devices(n: usize) -> Vec<Arc<Device>> {
        (0..n)
            .map(|i| Arc::new(Device::new(&format!("d{i:02}"), DeviceSpec::default())))
            .collect()
    }

    fn params(canary: Option<Amount>, wave: Amount, threshold: Option<Amount>) -> RolloutParams {
        let mut p = RolloutParams::defaults();
        p.canary = canary;
        p.wave_size = wave;
        p.failure_threshold = threshold;
        p
    }

    #[test]
    fn waves_list_their_members_and_exclusions_are_grouped() {
        let d = devices(10);
        let mut ex = vec![None; 10];
        ex[1] = Some(Exclusion::UpToDate);
        ex[7] = Some(Exclusion::HeldByCampaign);
        ex[8] = Some(Exclusion::UpToDate);
        let p = params(Some(Amount::Count(2)), Amount::Count(4), None);
        let plan = plan(&d, &ex, &p, Some(10_000));
        assert_eq!(plan.devices, 7);
        let sizes: Vec<u32> = plan.waves.iter().map(|w| w.size).collect();
        assert_eq!(sizes, vec![1, 4, 2], "waves of 2, 4, 4 less the excluded");
        assert_eq!(plan.waves[0].first_devices, vec!["d00"]);
        assert_eq!(
            plan.waves[1].first_devices,
            vec!["d02", "d03", "d04", "d05"]
        );
        assert_eq!(plan.waves[2].first_devices, vec!["d06", "d09"]);
        let reasons: Vec<(&str, u32)> = plan
            .excluded
            .iter()
            .map(|e| (e.reason.as_str(), e.count))
            .collect();
        assert_eq!(reasons, vec![("UpToDate", 2), ("HeldByCampaign", 1)]);
        assert_eq!(plan.excluded[0].devices, vec!["d01", "d08"]);
        assert_eq!(
            plan.estimated_broker_bytes,
            Some(10_000 + 7 * PER_DEVICE_BYTES)
        );
    }

    #[test]
    fn policy_warnings_name_the_fields() {
        let spec: UpdateCampaignSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a"}},
            "targetVersion": "2.0.0",
            "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
            "managerSecretName": "manager",
            "rollout": {"gate": {"manual": true}}
        }))
        .unwrap();
        let p = params(
            Some(Amount::Count(2)),
            Amount::Percent(100),
            Some(Amount::Count(3)),
        );
        let w = warnings(&spec, &p, 10, None, 0);
        assert!(
            w[0].contains(
                "failureThreshold (3 devices) is not smaller than the canary (2 devices)"
            ),
            "{w:?}"
        );
        let p = params(None, Amount::Percent(100), None);
        let w = warnings(&spec, &p, 10, None, 0);
        assert!(w.iter().any(|x| x.contains("single wave")), "{w:?}");
        let _ = RolloutSpec::default();
    }
}
