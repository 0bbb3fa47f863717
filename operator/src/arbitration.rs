//! One campaign per device at a time (pure): when running campaigns select the same device, it
//! belongs to one of them. A campaign that already started the device keeps it until it is done
//! with it; otherwise the highest `spec.priority` wins, then the older campaign (creation time),
//! then the name. The others count the device as waiting, name the holder in their status, and
//! pick it up once the holder is done. Whether a campaign started or finished a device comes from
//! the caller (the session registry and the Device status); nothing here reads a resource.

use std::cmp::Reverse;

/// A running campaign that selects a device, as arbitration sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contender<'a> {
    /// Campaign name (same namespace).
    pub name: &'a str,
    /// `spec.priority` (higher wins).
    pub priority: i32,
    /// Creation time, Unix seconds (older wins at equal priority).
    pub created: u64,
}

impl<'a> Contender<'a> {
    /// The ranking key: higher priority, then older, then the name.
    fn rank(&self) -> (Reverse<i32>, u64, &'a str) {
        (Reverse(self.priority), self.created, self.name)
    }
}

/// Where a device stands in one campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The campaign has not started it (and still means to).
    NotStarted,
    /// The campaign started it (in flight or waiting to retry): it keeps it until done.
    Started,
    /// The campaign is done with it (finished, or it needs nothing).
    Done,
}

/// The campaign that holds a device `me` has not started: `None` when `me` may take it, or the
/// name of the other campaign it must wait for. `others` are the other running campaigns that
/// select the device, each with its standing there.
pub fn holder<'a>(
    me: &Contender<'a>,
    others: impl IntoIterator<Item = (Contender<'a>, Standing)>,
) -> Option<&'a str> {
    let mut best: Option<Contender<'a>> = None;
    for (other, standing) in others {
        match standing {
            Standing::Started => return Some(other.name),
            Standing::Done => {}
            Standing::NotStarted => {
                if other.rank() < best.map_or(me.rank(), |b| b.rank()) {
                    best = Some(other);
                }
            }
        }
    }
    best.map(|b| b.name)
}

/// The campaigns this one waits for, with how many devices each holds, most devices first, at
/// most `limit` of them (for `status.heldBy`).
pub fn held_by<'a>(holders: impl IntoIterator<Item = &'a str>, limit: usize) -> Vec<(String, u32)> {
    let mut counts: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for h in holders {
        *counts.entry(h).or_default() += 1;
    }
    let mut list: Vec<(String, u32)> = counts
        .into_iter()
        .map(|(name, n)| (name.to_owned(), n))
        .collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    list.truncate(limit);
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, priority: i32, created: u64) -> Contender<'_> {
        Contender {
            name,
            priority,
            created,
        }
    }

    #[test]
    fn alone_a_campaign_takes_its_device() {
        assert_eq!(holder(&c("a", 0, 10), []), None);
    }

    #[test]
    fn higher_priority_wins_then_the_older_then_the_name() {
        let me = c("me", 0, 10);
        assert_eq!(
            holder(&me, [(c("urgent", 5, 99), Standing::NotStarted)]),
            Some("urgent")
        );
        assert_eq!(
            holder(&me, [(c("low", -1, 1), Standing::NotStarted)]),
            None,
            "lower priority waits even when older"
        );
        assert_eq!(
            holder(&me, [(c("older", 0, 5), Standing::NotStarted)]),
            Some("older")
        );
        assert_eq!(
            holder(&me, [(c("newer", 0, 11), Standing::NotStarted)]),
            None
        );
        assert_eq!(
            holder(&me, [(c("ma", 0, 10), Standing::NotStarted)]),
            Some("ma"),
            "same priority and age: by name"
        );
        assert_eq!(
            holder(
                &me,
                [
                    (c("b", 3, 50), Standing::NotStarted),
                    (c("a", 3, 40), Standing::NotStarted),
                    (c("z", 1, 1), Standing::NotStarted),
                ]
            ),
            Some("a")
        );
    }

    #[test]
    fn a_campaign_that_started_the_device_keeps_it_whatever_its_rank() {
        let me = c("urgent", 100, 1);
        assert_eq!(
            holder(&me, [(c("slow", -5, 99), Standing::Started)]),
            Some("slow")
        );
    }

    #[test]
    fn a_campaign_done_with_the_device_releases_it() {
        let me = c("late", 0, 99);
        assert_eq!(holder(&me, [(c("first", 9, 1), Standing::Done)]), None);
    }

    #[test]
    fn held_by_counts_devices_per_holder() {
        let list = held_by(["a", "b", "a", "c", "a", "b"], 2);
        assert_eq!(list, vec![("a".into(), 3), ("b".into(), 2)]);
    }
}
