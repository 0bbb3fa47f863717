//! The plan of a campaign (pure): what `spec.dryRun` shows before anything starts, and what the
//! status keeps showing once it runs — the waves with their sizes and first devices (the same
//! [`wave_cutoffs`] the rollout opens them by), the devices left out and why (the policy's
//! [`Exclusion`]s), the bytes the broker would carry, and warnings about settings that work
//! against each other. Because the plan and the rollout read the same inputs through the same
//! functions, turning `dryRun` off starts exactly the plan shown (as long as the devices, their
//! versions and the other campaigns stay as they were). [`preview`] is the same plan computed
//! outside the operator (the CLI's `sealed-ota campaign plan`), from the campaign and snapshots of
//! the Devices and the other campaigns, through the controller's own validation and the policy.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::SelectorExt;
use serde::{Deserialize, Serialize};

use crate::controller::{contender, recorded_standing, rivals, validate, Validated};
use crate::crd::{
    CampaignPhase, Device, HolderStatus, PlanExclusion, PlanStatus, PlannedWave, ScheduleStatus,
    UpdateCampaign, UpdateCampaignSpec, UpdateCampaignStatus, WaitingStatus,
};
use crate::policy::{assess, Exclusion, PolicyInput};
use crate::ramp::StartLog;
use crate::rollout::{decide, wave_cutoffs, DecideInput, Progress, RolloutParams};
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
    let cutoffs = wave_cutoffs(devices.len() as u32, params);
    plan_in_waves(devices, exclusions, &cutoffs, chunk_bytes)
}

/// [`plan`] with the wave ends given: one shard's devices cut by its share of the campaign's
/// waves (`coordinate::shard_cutoffs`).
pub fn plan_in_waves(
    devices: &[Arc<Device>],
    exclusions: &[Option<Exclusion>],
    cutoffs: &[u32],
    chunk_bytes: Option<u64>,
) -> PlanStatus {
    let name = |d: &Arc<Device>| d.metadata.name.clone().unwrap_or_default();
    let mut waves = Vec::new();
    let mut start = 0usize;
    for (wave, end) in cutoffs.iter().enumerate() {
        let end = (*end as usize).clamp(start, devices.len());
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

/// The plans of several shards as one (pure): wave by wave the sizes added and the first devices
/// of the first shards, the exclusions by reason, the devices; the broker estimate from the
/// prepared chunks (`chunk_bytes`, carried once) and every device's messages.
pub fn merge_plans(parts: &[&PlanStatus], chunk_bytes: Option<u64>) -> PlanStatus {
    let mut waves: Vec<PlannedWave> = Vec::new();
    let mut excluded: BTreeMap<String, (u32, Vec<String>)> = BTreeMap::new();
    let mut devices = 0u32;
    for part in parts {
        devices += part.devices;
        for w in &part.waves {
            match waves.iter_mut().find(|m| m.wave == w.wave) {
                Some(m) => {
                    m.size += w.size;
                    let room = FIRST_DEVICES.saturating_sub(m.first_devices.len());
                    m.first_devices
                        .extend(w.first_devices.iter().take(room).cloned());
                }
                None => waves.push(w.clone()),
            }
        }
        for e in &part.excluded {
            let entry = excluded.entry(e.reason.clone()).or_default();
            entry.0 += e.count;
            let room = FIRST_DEVICES.saturating_sub(entry.1.len());
            entry.1.extend(e.devices.iter().take(room).cloned());
        }
    }
    waves.sort_by_key(|w| w.wave);
    waves.truncate(MAX_PLANNED_WAVES);
    PlanStatus {
        devices,
        waves,
        excluded: excluded
            .into_iter()
            .map(|(reason, (count, devices))| PlanExclusion {
                reason,
                count,
                devices,
            })
            .collect(),
        estimated_broker_bytes: chunk_bytes
            .map(|c| c.saturating_add(u64::from(devices) * PER_DEVICE_BYTES)),
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

/// What a campaign would do if it started now, computed outside the operator (`sealed-ota campaign
/// plan`): the devices it selects, its waves, the devices left out and why, the windows, what
/// blocks it, the devices its first pass would start and the warnings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignPreview {
    /// The campaign.
    pub campaign: String,
    /// Its namespace.
    pub namespace: String,
    /// Devices its selector matches.
    pub selected: u32,
    /// What keeps it from starting any device (a spec it cannot run, a window that never
    /// opens), with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<PreviewBlocker>,
    /// Other reasons nothing would start (paused, aborted, a dry run, already finished).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The waves and the devices left out, as `status.plan` shows them.
    pub plan: PlanStatus,
    /// Devices the first pass would start (before the in-flight limit, the rate and the windows
    /// let more in).
    pub starts_now: Vec<String>,
    /// The campaign's maintenance windows now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleStatus>,
    /// What the campaign would wait for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingStatus>,
    /// Running campaigns that hold selected devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<HolderStatus>,
    /// Settings that work against each other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Why a campaign would not start, as its `Ready` condition would say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewBlocker {
    /// The reason (CamelCase, docs/reasons.md).
    pub reason: String,
    /// What is wrong and the fix.
    pub message: String,
}

/// The plan of `campaign` if it started at `now`, over `devices` and the other `campaigns` of its
/// namespace (pure). A rival counts when its status says it runs (Progressing or Paused); a device
/// stands in it as its Device status records. The payload is not prepared, so the plan carries
/// no byte estimate and a missing Secret or image is not seen (the operator reports those).
pub fn preview(
    campaign: &UpdateCampaign,
    devices: Vec<Arc<Device>>,
    campaigns: Vec<Arc<UpdateCampaign>>,
    now: u64,
) -> CampaignPreview {
    let Validated {
        selected,
        params,
        calendar,
        blocker,
    } = validate(campaign, devices);
    let progress = vec![Progress::NotStarted; selected.len()];
    let running = |o: &UpdateCampaign| {
        matches!(
            o.status.as_ref().map(|s| s.phase),
            Some(CampaignPhase::Progressing | CampaignPhase::Paused)
        )
    };
    let others = rivals(campaign, campaigns, running);
    let rivals_of_device: Vec<Vec<_>> = selected
        .iter()
        .map(|d| {
            others
                .iter()
                .filter(|(_, sel)| sel.matches(kube::ResourceExt::labels(&**d)))
                .map(|(o, _)| (contender(o), recorded_standing(o, d)))
                .collect()
        })
        .collect();
    let before = UpdateCampaignStatus::default();
    let policy = assess(
        &PolicyInput {
            now,
            spec: &campaign.spec,
            me: contender(campaign),
            devices: &selected,
            progress: &progress,
            rivals: &rivals_of_device,
            calendar: &calendar,
            previous: &before,
            // The whole campaign, as one replica plans it.
            rate_share: None,
        },
        &mut StartLog::default(),
    );
    let blocker = blocker.or(policy.blocker.clone());
    let decision = decide(&DecideInput {
        now,
        devices: &progress,
        params: &params,
        paused: campaign.spec.paused,
        abort: campaign.spec.abort,
        blocked: blocker.is_some() || campaign.spec.dry_run,
        previous_phase: CampaignPhase::Pending,
        previous_wave: 0,
        holds: &policy.holds,
        start_cap: policy.start_cap,
        wave_limit: policy.wave_limit,
        eligible_limit: None,
        deadline_passed: policy.deadline_passed,
        policy_due: policy.due,
    });
    let spec = &campaign.spec;
    let recorded = campaign.status.as_ref().map(|s| s.phase);
    let notes = [
        (
            spec.dry_run,
            "spec.dryRun is set: the operator only shows this plan; set it to false to start"
                .to_owned(),
        ),
        (
            spec.paused,
            "spec.paused is set: nothing starts until it is false".to_owned(),
        ),
        (
            spec.abort,
            "spec.abort is set: the campaign stops and starts nothing".to_owned(),
        ),
        (
            recorded.is_some_and(CampaignPhase::is_terminal),
            format!(
                "the campaign already ended ({:?}): it starts nothing more",
                recorded.unwrap_or_default()
            ),
        ),
    ]
    .into_iter()
    .filter_map(|(on, note)| on.then_some(note))
    .collect();
    CampaignPreview {
        campaign: campaign.metadata.name.clone().unwrap_or_default(),
        namespace: campaign.metadata.namespace.clone().unwrap_or_default(),
        selected: selected.len() as u32,
        blocked: blocker.map(|b| PreviewBlocker {
            reason: b.reason.to_string(),
            message: b.message,
        }),
        notes,
        plan: plan(&selected, &policy.exclusions, &params, None),
        starts_now: decision
            .start
            .iter()
            .map(|(i, _)| selected[*i].metadata.name.clone().unwrap_or_default())
            .collect(),
        schedule: policy.status.schedule,
        waiting: policy.status.waiting,
        held_by: policy.status.held_by,
        warnings: warnings(spec, &params, selected.len() as u32, Some(&calendar), now),
    }
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

    fn campaign(name: &str, extra: serde_json::Value) -> UpdateCampaign {
        let mut spec = serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a"}},
            "targetVersion": "2.0.0",
            "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
            "managerSecretName": "manager",
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let mut c = UpdateCampaign::new(name, serde_json::from_value(spec).unwrap());
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some(format!("uid-{name}"));
        c
    }

    fn fleet_device(name: &str, fleet: &str, running: &str) -> Arc<Device> {
        let mut d: Device = serde_json::from_value(serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1", "kind": "Device",
            "metadata": {"name": name, "namespace": "ns", "labels": {"fleet": fleet}},
            "spec": {"deviceId": name},
            "status": {"runningVersion": running},
        }))
        .unwrap();
        d.metadata.namespace = Some("ns".into());
        Arc::new(d)
    }

    #[test]
    fn the_preview_selects_plans_waves_and_names_what_is_left_out_and_why() {
        let mut devices: Vec<Arc<Device>> = (0..6)
            .map(|i| fleet_device(&format!("d{i}"), "a", "1.0.0"))
            .collect();
        devices.push(fleet_device("d6", "a", "2.0.0"));
        devices.push(fleet_device("other", "b", "1.0.0"));
        let me = campaign(
            "fw",
            serde_json::json!({"rollout": {"canary": "1", "waveSize": "2", "maxInFlight": 1}}),
        );
        // A running rival that started d5 keeps it.
        let mut rival = campaign("older", serde_json::json!({}));
        rival.status = Some(UpdateCampaignStatus {
            phase: CampaignPhase::Progressing,
            ..UpdateCampaignStatus::default()
        });
        let mut held: Device = (*devices[5]).clone();
        held.status.as_mut().unwrap().campaign = Some(
            serde_json::from_value(serde_json::json!({
                "name": "older", "uid": "uid-older", "targetVersion": "2.0.0", "phase": "Transferring", "attempts": 1
            }))
            .unwrap(),
        );
        devices[5] = Arc::new(held);
        let p = preview(
            &me,
            devices.clone(),
            vec![Arc::new(rival), Arc::new(me.clone())],
            0,
        );
        assert_eq!(p.selected, 7, "fleet=a only");
        assert_eq!(p.blocked, None);
        assert_eq!(p.plan.devices, 5);
        let sizes: Vec<u32> = p.plan.waves.iter().map(|w| w.size).collect();
        assert_eq!(
            sizes,
            vec![1, 2, 2, 0],
            "canary 1, waves of 2, less d5 and d6"
        );
        let excluded: Vec<(&str, u32)> = p
            .plan
            .excluded
            .iter()
            .map(|e| (e.reason.as_str(), e.count))
            .collect();
        assert_eq!(excluded, vec![("UpToDate", 1), ("HeldByCampaign", 1)]);
        assert_eq!(p.starts_now, vec!["d0"], "the canary, one in flight");
        assert_eq!(p.held_by.len(), 1, "{:?}", p.held_by);
        assert_eq!(p.held_by[0].campaign, "older");

        // A selector that does not parse blocks it, with the field and the fix.
        let bad = campaign(
            "bad",
            serde_json::json!({"selector": {"matchExpressions": [{"key": "fleet", "operator": "Sideways"}]}}),
        );
        let p = preview(&bad, devices.clone(), vec![], 0);
        let blocked = p.blocked.expect("blocked");
        assert_eq!(blocked.reason, "InvalidSelector");
        assert!(p.starts_now.is_empty());
        // Paused: planned, nothing starts, and the note says why.
        let paused = campaign("p", serde_json::json!({"paused": true}));
        let p = preview(&paused, devices, vec![], 0);
        assert_eq!(p.plan.devices, 6);
        assert!(p.starts_now.is_empty(), "{:?}", p.starts_now);
        assert!(p.notes[0].contains("spec.paused"), "{:?}", p.notes);
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
