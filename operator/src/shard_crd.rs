//! The `CampaignShard` custom resource: one shard's progress in one campaign, written by the replica
//! holding that shard and read by the coordinator, which adds every shard up into the
//! `UpdateCampaign` status (the EndpointSlice pattern: bounded objects per shard instead of one
//! growing list or many writers on one object). One object per (campaign, shard), at most one write
//! per second each; types and tiny accessors only, no I/O and no decisions.

// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes the derive's helper attributes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{DeviceCounts, DeviceFailure, HolderStatus, PlanStatus, WaitingStatus};

/// Label of a CampaignShard naming its campaign.
pub const CAMPAIGN_LABEL: &str = "ota.sealed-ota.dev/campaign";

/// One shard's report on one campaign (written by the replica holding the shard's Lease).
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "ota.sealed-ota.dev",
    version = "v1alpha1",
    kind = "CampaignShard",
    namespaced,
    shortname = "otashard",
    doc = "One shard's progress in one UpdateCampaign, written by the operator replica holding the shard; the coordinator adds the shards up into the campaign's status.",
    printcolumn(
        name = "Campaign",
        type_ = "string",
        json_path = ".spec.campaign",
        description = "The UpdateCampaign"
    ),
    printcolumn(
        name = "Shard",
        type_ = "integer",
        json_path = ".spec.shard",
        description = "Shard index"
    ),
    printcolumn(
        name = "Holder",
        type_ = "string",
        json_path = ".spec.holder",
        description = "Operator replica holding the shard"
    ),
    printcolumn(
        name = "Selected",
        type_ = "integer",
        json_path = ".spec.devices.selected",
        description = "Devices of this shard the campaign selects"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".spec.devices.succeeded",
        description = "Devices with a signed receipt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CampaignShardSpec {
    /// Name of the UpdateCampaign (same namespace).
    #[schemars(length(max = 253))]
    pub campaign: String,
    /// Its UID: a report of an earlier campaign of the same name is ignored.
    #[schemars(length(max = 64))]
    pub campaign_uid: String,
    /// Shard index (0-based).
    pub shard: u32,
    /// Shards of the deployment when this was written: reports of another shard count are ignored.
    pub shards: u32,
    /// Identity of the replica that wrote this.
    #[schemars(length(max = 253))]
    pub holder: String,
    /// Devices of this shard per phase.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// How many of this shard's selected devices, in wave order (by name), are finished from the
    /// first one on without a gap: the coordinator starts the next wave when every shard's is at
    /// least its share of the current wave.
    #[serde(default)]
    pub done_through: u32,
    /// Final Device status writes of this shard not landed yet: the campaign says it ended only when
    /// every shard's are.
    #[serde(default)]
    pub writes_pending: u32,
    /// Whether the replica holds a prepared run of the campaign (or found it ended).
    #[serde(default)]
    pub prepared: bool,
    /// What the deltas saved on this shard's devices (when the campaign offers one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::crd::DeltaStatus>,
    /// Some failed devices of this shard (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<DeviceFailure>,
    /// What keeps this replica from running the campaign (for example the broker unreachable from
    /// it): a reason of docs/reasons.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub blocker_reason: Option<String>,
    /// What is wrong and how to fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub blocker_message: Option<String>,
    /// When this shard last started a device (its share of the rate is kept for a minute after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start: Option<Time>,
    /// What this shard's devices wait for (the rollout policy), if every one that may start waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingStatus>,
    /// Other campaigns holding this shard's selected devices (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub held_by: Vec<HolderStatus>,
    /// The plan of this shard's devices, in the campaign's waves (its share of each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanStatus>,
    /// The shards' sizes (selected devices, by shard) the plan's waves were apportioned by: the
    /// coordinator adds the plans up only when every shard's were cut by the sizes it sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub plan_sizes: Vec<u32>,
    /// Health reports of this shard's devices of the current wave (the gate's device-health check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<WaveHealth>,
}

/// Health reports of one shard's devices of one wave.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct WaveHealth {
    /// The wave.
    pub wave: u32,
    /// Devices of the wave that installed the update.
    pub updated: u32,
    /// Of them, those whose latest signed health report says healthy.
    pub healthy: u32,
    /// Of them, those that sent any report.
    pub reported: u32,
}

/// Name of the report of `shard` (of `shards`) on campaign `campaign` with uid `uid`: the campaign's
/// name (cut to fit) and the shard, unique per uid.
pub fn report_name(campaign: &str, uid: &str, shard: u32, shards: u32) -> String {
    let tail = format!("-{}-s{shard}of{shards}", &uid[..uid.len().min(8)]);
    let head = crate::status::bounded(campaign, 253 - tail.len());
    format!("{}{tail}", head.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_fit_and_differ_per_shard_and_uid() {
        let a = report_name("fw", "0123456789ab", 3, 8);
        assert_eq!(a, "fw-01234567-s3of8");
        assert_ne!(a, report_name("fw", "0123456789ab", 4, 8));
        assert_ne!(a, report_name("fw", "99999999", 3, 8));
        let long = report_name(&"c".repeat(253), "u", 63, 64);
        assert!(long.len() <= 253, "{}", long.len());
    }
}
