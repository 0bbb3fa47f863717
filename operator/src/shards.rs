//! Sharding of the fleet over operator replicas (pure): which shard a device belongs to, the label
//! selector a shard's reflector watches, which replica should hold which shard, and how a
//! campaign-wide amount (a wave's size, `maxInFlight`) is split over shards. No I/O here; the
//! Leases that make a holder exclusive live in `membership`, the reflectors in `controller`.
//!
//! A device's **bucket** is the first byte of the SHA-256 of its device id (256 buckets, fixed for
//! ever, so the label never changes) and is recorded on the Device as the label
//! `ota.sealed-ota.dev/bucket`; with `S` shards (a power of two up to 64) the device belongs to
//! shard `bucket mod S`. A shard's reflector selects `bucket in (s, s+S, ...)`, so it watches only
//! its own devices; changing `S` needs no relabelling.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// A device's bucket, the protocol's (its topics to the manager end with it).
pub use sealed_ota_protocol::topics::{bucket_of, BUCKETS};
use sealed_ota_protocol::TopicTree;
use sha2::{Digest, Sha256};

/// The label that records a device's bucket.
pub const BUCKET_LABEL: &str = "ota.sealed-ota.dev/bucket";
/// Most shards a deployment may have (bounds `status.shards` of a campaign).
pub const MAX_SHARDS: u32 = 64;

/// The number of shards of a deployment: a power of two from 1 to [`MAX_SHARDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardCount(u32);

/// `--shards` is not a power of two from 1 to 64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--shards {0}: must be a power of two from 1 to {MAX_SHARDS} (every replica must use the same value)")]
pub struct ShardCountError(pub u32);

impl ShardCount {
    /// One shard: one replica drives every device.
    pub const ONE: ShardCount = ShardCount(1);

    /// Validate a shard count.
    pub fn new(n: u32) -> Result<Self, ShardCountError> {
        if n.is_power_of_two() && n <= MAX_SHARDS {
            Ok(Self(n))
        } else {
            Err(ShardCountError(n))
        }
    }

    /// The count.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Every shard index.
    pub fn all(self) -> impl Iterator<Item = u32> {
        0..self.0
    }

    /// The shard of a bucket.
    pub fn of_bucket(self, bucket: u32) -> u32 {
        bucket % self.0
    }

    /// The shard of a device id.
    pub fn of_device(self, device_id: &str) -> u32 {
        self.of_bucket(bucket_of(device_id))
    }

    /// The MQTT filters of the devices' messages (`ready` and status) of the shards in `held`:
    /// the two every-device filters with one shard, else two per bucket of a held shard, so the
    /// broker delivers this replica only its own devices' messages. Empty when nothing is held.
    pub fn filters(self, held: &BTreeSet<u32>, topics: &TopicTree) -> Vec<String> {
        if self.0 == 1 {
            return if held.contains(&0) {
                vec![topics.ready_filter(), topics.status_filter()]
            } else {
                Vec::new()
            };
        }
        (0..BUCKETS)
            .filter(|b| held.contains(&self.of_bucket(*b)))
            .flat_map(|b| topics.bucket_filters(b))
            .collect()
    }

    /// The label selector of shard `shard`'s Devices, `None` with one shard (every Device, labelled
    /// or not).
    pub fn selector(self, shard: u32) -> Option<String> {
        if self.0 == 1 {
            return None;
        }
        let buckets: Vec<String> = (shard..BUCKETS)
            .step_by(self.0 as usize)
            .map(|b| b.to_string())
            .collect();
        Some(format!("{BUCKET_LABEL} in ({})", buckets.join(",")))
    }
}

impl std::fmt::Display for ShardCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The selector of Devices whose bucket label is missing or not a bucket: the ones no shard
/// reflector sees until they are labelled.
pub fn unlabelled_selector() -> String {
    let all: Vec<String> = (0..BUCKETS).map(|b| b.to_string()).collect();
    format!("{BUCKET_LABEL} notin ({})", all.join(","))
}

/// The bucket label a Device should carry, when its labels do not carry exactly that already.
pub fn relabel(
    device_id: &str,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<String> {
    let want = bucket_of(device_id).to_string();
    let has = labels.and_then(|l| l.get(BUCKET_LABEL));
    (has != Some(&want)).then_some(want)
}

/// Which member should hold each shard: rendezvous (highest random weight) hashing with bounded
/// loads — shard by shard in order, the member of highest weight for that shard that holds fewer
/// than ⌈shards / members⌉ so far. Every replica that sees the same members computes the same
/// owners, and the shards split evenly (plain rendezvous hashing may give one of two replicas every
/// shard). Indexed by shard; empty without members.
pub fn owners(members: &BTreeSet<String>, shards: ShardCount) -> Vec<&str> {
    if members.is_empty() {
        return Vec::new();
    }
    let cap = shards.get().div_ceil(members.len() as u32);
    let mut load: BTreeMap<&str, u32> = BTreeMap::new();
    shards
        .all()
        .map(|shard| {
            let mut ranked: Vec<&str> = members.iter().map(String::as_str).collect();
            ranked.sort_by_key(|m| {
                let mut h = Sha256::new();
                h.update(shard.to_be_bytes());
                h.update(m.as_bytes());
                let d = h.finalize();
                std::cmp::Reverse((u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8])), *m))
            });
            let owner = ranked
                .into_iter()
                .find(|m| load.get(m).copied().unwrap_or(0) < cap)
                .unwrap_or_default();
            *load.entry(owner).or_default() += 1;
            owner
        })
        .collect()
}

/// The shards `me` should hold among `members` (`me` counts as a member).
pub fn wanted_shards(me: &str, members: &BTreeSet<String>, shards: ShardCount) -> BTreeSet<u32> {
    let mut all = members.clone();
    all.insert(me.to_owned());
    owners(&all, shards)
        .into_iter()
        .zip(shards.all())
        .filter(|(owner, _)| *owner == me)
        .map(|(_, shard)| shard)
        .collect()
}

/// Split `total` over parts of sizes `sizes` in proportion, each part at most its size: part `k`'s
/// `i`-th item has the key `(i + 1/2) / size_k` and the `total` smallest keys are taken (ties to
/// the lower part). House-monotone: a larger total never gives a part less, so a wave that grows
/// never takes a device back. Returns one share per part; their sum is `min(total, Σ sizes)`.
pub fn apportion(total: u32, sizes: &[u32]) -> Vec<u32> {
    /// A part's next key `(2i + 1) / (2 size)`, compared exactly by cross-multiplication.
    #[derive(PartialEq, Eq)]
    struct Next {
        num: u64,
        den: u64,
        part: usize,
    }
    impl Ord for Next {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            // Smallest key first (BinaryHeap is a max-heap), then the lower part.
            (o.num * self.den)
                .cmp(&(self.num * o.den))
                .then(o.part.cmp(&self.part))
        }
    }
    impl PartialOrd for Next {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut shares = vec![0u32; sizes.len()];
    let available: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    let mut left = u64::from(total).min(available);
    if left == available {
        return sizes.to_vec();
    }
    let mut heap: BinaryHeap<Next> = sizes
        .iter()
        .enumerate()
        .filter(|(_, &s)| s > 0)
        .map(|(part, &s)| Next {
            num: 1,
            den: 2 * u64::from(s),
            part,
        })
        .collect();
    while left > 0 {
        let Some(next) = heap.pop() else { break };
        shares[next.part] += 1;
        left -= 1;
        if shares[next.part] < sizes[next.part] {
            heap.push(Next {
                num: next.num + 2,
                ..next
            });
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_subscribes_to_the_buckets_of_the_shards_it_holds_only() {
        let topics = TopicTree::new("iot", "m").unwrap();
        let none = BTreeSet::new();
        assert!(ShardCount::ONE.filters(&none, &topics).is_empty());
        assert_eq!(
            ShardCount::ONE.filters(&BTreeSet::from([0]), &topics),
            ["iot/m/+/ready/+", "iot/m/+/update/status/+"]
        );
        let four = ShardCount::new(4).unwrap();
        let held = BTreeSet::from([1, 2]);
        let filters = four.filters(&held, &topics);
        // Half the buckets, two filters each.
        assert_eq!(filters.len(), 256);
        for i in 0..400 {
            let id = format!("dev-{i:05}");
            let mine = held.contains(&four.of_device(&id));
            let received = [topics.ready(&id), topics.status(&id)]
                .iter()
                .all(|t| filters.iter().any(|f| matches(f, t)));
            let none_received = [topics.ready(&id), topics.status(&id)]
                .iter()
                .all(|t| !filters.iter().any(|f| matches(f, t)));
            assert!(if mine { received } else { none_received }, "{id}");
        }
    }

    /// MQTT topic matching for filters with `+` only (what `filters` builds).
    fn matches(filter: &str, topic: &str) -> bool {
        let (f, t): (Vec<_>, Vec<_>) = (filter.split('/').collect(), topic.split('/').collect());
        f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("dev-00000"), bucket_of("dev-00000"));
        // SHA-256("dev-00000") starts with this byte: the bucket is part of the contract (labels
        // written by one version are read by the next).
        assert_eq!(
            bucket_of("dev-00000"),
            u32::from(Sha256::digest(b"dev-00000")[0])
        );
        let four = ShardCount::new(4).unwrap();
        let mut per_shard = [0u32; 4];
        for i in 0..4000 {
            per_shard[four.of_device(&format!("dev-{i:05}")) as usize] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (850..1150).contains(&n)),
            "{per_shard:?}"
        );
    }

    #[test]
    fn shard_counts_are_powers_of_two_up_to_64() {
        for n in [1, 2, 4, 8, 16, 32, 64] {
            assert_eq!(ShardCount::new(n).unwrap().get(), n);
        }
        for n in [0, 3, 12, 128, 256] {
            assert_eq!(ShardCount::new(n), Err(ShardCountError(n)));
        }
        assert!(ShardCountError(3).to_string().contains("--shards 3"));
    }

    #[test]
    fn a_shard_selects_exactly_its_buckets() {
        assert_eq!(ShardCount::ONE.selector(0), None);
        let eight = ShardCount::new(8).unwrap();
        let sel = eight.selector(3).unwrap();
        assert!(sel.starts_with("ota.sealed-ota.dev/bucket in (3,11,19,"));
        assert!(sel.ends_with(",251)"));
        assert_eq!(sel.matches(',').count(), 31);
        let values = |sel: &str| -> Vec<u32> {
            let inner = &sel[sel.find('(').unwrap() + 1..sel.rfind(')').unwrap()];
            inner.split(',').map(|v| v.parse().unwrap()).collect()
        };
        let in_shard = values(&sel);
        assert!(in_shard.iter().all(|b| b % 8 == 3) && in_shard.len() == 32);
        let unlabelled = unlabelled_selector();
        assert!(unlabelled.starts_with("ota.sealed-ota.dev/bucket notin (0,1,2,"));
        assert_eq!(values(&unlabelled), (0..256).collect::<Vec<u32>>());
    }

    #[test]
    fn relabel_names_the_bucket_only_when_it_is_missing_or_wrong() {
        let right = bucket_of("d1").to_string();
        let labels = |v: &str| [(BUCKET_LABEL.to_string(), v.to_string())].into();
        assert_eq!(relabel("d1", None), Some(right.clone()));
        assert_eq!(relabel("d1", Some(&labels("999"))), Some(right.clone()));
        assert_eq!(relabel("d1", Some(&labels(&right))), None);
    }

    #[test]
    fn every_shard_has_one_owner_and_the_shards_split_evenly() {
        let four = ShardCount::new(4).unwrap();
        let eight = ShardCount::new(8).unwrap();
        // Many member names: plain rendezvous hashing gives one of two members all four shards
        // for about one pair in eight; bounded loads never do.
        for i in 0..200 {
            let two: BTreeSet<String> = [format!("ns{i}-r0"), format!("ns{i}-r1")].into();
            let held: Vec<BTreeSet<u32>> =
                two.iter().map(|m| wanted_shards(m, &two, four)).collect();
            assert!(held[0].is_disjoint(&held[1]));
            assert_eq!((held[0].len(), held[1].len()), (2, 2), "{two:?}");
        }
        let three: BTreeSet<String> = ["a".into(), "b".into(), "c".into()].into();
        let held: Vec<usize> = three
            .iter()
            .map(|m| wanted_shards(m, &three, eight).len())
            .collect();
        assert_eq!(held.iter().sum::<usize>(), 8);
        assert!(held.iter().all(|n| (2..=3).contains(n)), "{held:?}");
        // Every replica that sees the same members agrees.
        assert_eq!(owners(&three, eight), owners(&three.clone(), eight));
        // Alone, a replica wants everything (a member list without itself counts it in).
        assert_eq!(wanted_shards("a", &BTreeSet::new(), eight).len(), 8);
    }

    #[test]
    fn apportion_is_proportional_exact_and_house_monotone() {
        assert_eq!(apportion(3, &[10, 10, 10, 10]), vec![1, 1, 1, 0]);
        assert_eq!(apportion(10, &[50, 30, 20]), vec![5, 3, 2]);
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        assert_eq!(apportion(100, &[5, 0, 7]), vec![5, 0, 7]);
        assert_eq!(apportion(4, &[1, 100]), vec![0, 4]);
        let sizes = [13, 7, 0, 29, 1];
        let mut previous = vec![0; sizes.len()];
        for total in 0..=60 {
            let shares = apportion(total, &sizes);
            assert_eq!(
                shares.iter().sum::<u32>(),
                total.min(sizes.iter().sum()),
                "{total}"
            );
            for (k, (&now, &before)) in shares.iter().zip(&previous).enumerate() {
                assert!(now >= before, "part {k} shrank at {total}");
                assert!(now <= sizes[k]);
            }
            previous = shares;
        }
    }
}
