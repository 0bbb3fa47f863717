//! Which shards this replica holds (I/O shell over `coordination.k8s.io` Leases). Each replica holds
//! a member Lease of its own (`<lease>-member-<identity>`), renewed while it lives; every few
//! seconds it lists the live member Leases, computes the shards it should hold
//! (`shards::wanted_shards`, rendezvous hashing with bounded loads: every replica that sees the
//! same members agrees) and takes a Lease per wanted shard (`<lease>-shard-<k>-of-<S>`) with
//! kube-lease-manager, releasing the ones it no longer wants. A replica that dies stops renewing:
//! after the Lease duration its member Lease expires, the others see it gone and take its shards
//! once their Leases expire too. What it publishes is the set of shards whose Lease it holds right
//! now; it makes no other decision.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::shards::{wanted_shards, ShardCount};

/// Seconds a Lease (member, shard or leader) lasts without renewal.
pub const LEASE_SECONDS: u64 = 20;
/// Seconds before expiry a holder renews: every 5 s, so a holder survives 15 s in which its
/// renewals do not land. With 15 s Leases renewed 5 s before expiry, a 30,000-device campaign on
/// this 2-core machine (apiserver queued behind the Device writes, every core busy) let both
/// replicas' Leases lapse mid-campaign and the shards moved back and forth (docs/scale.md).
pub const GRACE_SECONDS: u64 = 15;
/// How often the member list is read.
const POLL: Duration = Duration::from_secs(2);

/// A Lease name made of `prefix` and `identity` (lowercase alphanumerics and '-', at most 253).
pub fn lease_name(prefix: &str, identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("{prefix}-{clean}");
    let name = crate::status::bounded(&name, 253);
    name.trim_end_matches(['-', '.']).to_owned()
}

/// Name of shard `shard`'s Lease.
pub fn shard_lease(lease: &str, shard: u32, shards: ShardCount) -> String {
    format!("{lease}-shard-{shard}-of-{shards}")
}

/// The holder of `lease` at `now` (Unix seconds), if one holds it: named, and its last renewal
/// not expired (pure).
fn live_holder(lease: &Lease, now: i64) -> Option<&str> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref()?.0.as_second();
    let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS as i32));
    (renewed + lasts > now).then_some(holder)
}

/// The holders of unexpired Leases named `<prefix>...` at `now` (Unix seconds): live members (pure).
pub fn live_holders(leases: &[Lease], prefix: &str, now: i64) -> BTreeSet<String> {
    leases
        .iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter_map(|l| live_holder(l, now).map(str::to_owned))
        .collect()
}

/// The names of the Leases nobody holds at `now` (Unix seconds): released (no holder) or expired
/// (pure).
pub fn free_leases(leases: &[Lease], now: i64) -> BTreeSet<String> {
    leases
        .iter()
        .filter(|l| live_holder(l, now).is_none())
        .filter_map(|l| l.metadata.name.clone())
        .collect()
}

/// One shard Lease this replica tries to hold: its holding flag. Dropping it closes the channel,
/// and kube-lease-manager's task then releases the Lease and ends (it is not aborted, so that the
/// release happens).
struct ShardLease {
    holding: watch::Receiver<bool>,
    /// When this manager started trying.
    since: tokio::time::Instant,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl ShardLease {
    /// Stop trying for the Lease and wait (at most `POLL`) until the manager's task has ended: a
    /// manager of the same identity started afterwards must not have its fresh lock released by
    /// this one's way out.
    async fn stop(self) {
        drop(self.holding);
        let _ = tokio::time::timeout(POLL, self.task).await;
    }
}

/// Hold this replica's member Lease and the shard Leases it should hold, publishing the set of
/// shards held on `held`, until the future is dropped (which releases every Lease it holds on the
/// way out, best effort).
pub async fn run(
    client: Client,
    namespace: String,
    lease: String,
    identity: String,
    shards: ShardCount,
    held: watch::Sender<BTreeSet<u32>>,
) {
    let member_prefix = format!("{lease}-member");
    let member = loop {
        match LeaseManagerBuilder::new(client.clone(), lease_name(&member_prefix, &identity))
            .with_namespace(namespace.clone())
            .with_identity(identity.clone())
            .with_duration(LEASE_SECONDS)
            .with_grace(GRACE_SECONDS)
            .build()
            .await
        {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the member Lease; retrying");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    // Held until this future is dropped; then the task releases it.
    let (_member_holding, _member_task) = member.watch().await;
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let mut leases: BTreeMap<u32, ShardLease> = BTreeMap::new();
    loop {
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let now = crate::time::unix_now() as i64;
                let members = live_holders(&list.items, &member_prefix, now);
                let wanted = wanted_shards(&identity, &members, shards);
                // kube-lease-manager (0.13) waiting for a Lease held by another replica sleeps
                // until that holder's last renewal would expire, even when the holder released
                // it at once (two replicas starting together hand shards over this way): a
                // wanted shard whose Lease is free now gets a fresh manager, which takes it at
                // once, instead of up to LEASE_SECONDS later.
                let free = free_leases(&list.items, now);
                let waiting_on_free: Vec<u32> = leases
                    .iter()
                    .filter(|(k, l)| {
                        // A manager just built is still taking its free Lease: leave it be.
                        !*l.holding.borrow()
                            && l.since.elapsed() >= 2 * POLL
                            && free.contains(&shard_lease(&lease, **k, shards))
                    })
                    .map(|(k, _)| *k)
                    .collect();
                for k in waiting_on_free {
                    if let Some(waiting) = leases.remove(&k) {
                        waiting.stop().await;
                    }
                }
                leases.retain(|k, _| wanted.contains(k));
                for k in wanted {
                    if leases.contains_key(&k) {
                        continue;
                    }
                    let name = shard_lease(&lease, k, shards);
                    match LeaseManagerBuilder::new(client.clone(), name.clone())
                        .with_namespace(namespace.clone())
                        .with_identity(identity.clone())
                        .with_duration(LEASE_SECONDS)
                        .with_grace(GRACE_SECONDS)
                        .build()
                        .await
                    {
                        Ok(m) => {
                            let (holding, task) = m.watch().await;
                            let since = tokio::time::Instant::now();
                            leases.insert(
                                k,
                                ShardLease {
                                    holding,
                                    since,
                                    task,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "cannot create a shard Lease")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list Leases; keeping the shards held"),
        }
        let now_held: BTreeSet<u32> = leases
            .iter()
            .filter(|(_, l)| *l.holding.borrow())
            .map(|(k, _)| *k)
            .collect();
        held.send_if_modified(|h| {
            if *h == now_held {
                return false;
            }
            tracing::info!(shards = ?now_held, "shards held");
            *h = now_held;
            true
        });
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(name: &str, holder: Option<&str>, renewed: i64) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap(),
                )),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn live_members_are_the_unexpired_holders_of_member_leases() {
        let leases = [
            lease("op-member-a", Some("a"), 100),
            lease("op-member-b", Some("b"), 80),
            lease("op-member-c", None, 100),
            lease("op-shard-0-of-8", Some("z"), 100),
        ];
        let live = live_holders(&leases, "op-member", 105);
        assert_eq!(live, ["a".to_string()].into());
    }

    #[test]
    fn free_leases_are_the_released_and_the_expired() {
        let mut released = lease("op-shard-1-of-4", None, 100);
        released.spec.as_mut().unwrap().renew_time = None;
        let leases = [
            lease("op-shard-0-of-4", Some("a"), 100),
            released,
            lease("op-shard-2-of-4", Some("b"), 80),
            lease("op-shard-3-of-4", Some(""), 100),
        ];
        assert_eq!(
            free_leases(&leases, 105),
            [
                "op-shard-1-of-4".to_string(),
                "op-shard-2-of-4".to_string(),
                "op-shard-3-of-4".to_string()
            ]
            .into()
        );
    }

    #[test]
    fn lease_names_are_valid_and_bounded() {
        assert_eq!(lease_name("op-member", "Pod_1.x"), "op-member-pod-1.x");
        assert!(lease_name("p", &"x".repeat(400)).len() <= 253);
        assert_eq!(
            shard_lease("op", 3, ShardCount::new(8).unwrap()),
            "op-shard-3-of-8"
        );
    }
}
