//! Which chunks of a campaign the broker keeps retained (pure): a bounded window, filled as
//! devices ask. A campaign whose chunks fit in the window is published whole when its first device
//! starts (every chunk retained, as before); a larger one is served on request — a device's pull
//! publishes what is not retained yet, a device's retry republishes what it names, and once more
//! than `capacity` chunks are retained the ones published longest ago are cleared. So the broker
//! never holds more than `capacity` chunks of a campaign, whatever the image size, and 20 devices
//! moving through a 1 GiB image together cost one publish per chunk. Nothing here does I/O: the
//! caller publishes and clears what [`Serve`] says. Retries are coalesced: a chunk still retained
//! that a retry republished less than [`REPUBLISH_COALESCE_SECONDS`] ago is not republished for
//! the next device that asks (every device subscribed to it then got that publish, and one that
//! subscribes later gets the retained copy), so a thousand devices timing out on one chunk under
//! load cost one republish, not a thousand each delivered to every subscriber.

use std::collections::{HashMap, VecDeque};

/// Seconds during which a chunk a retry republished (and still retained) is not republished
/// again for another retry: a third of the devices' default window timeout, so a device whose
/// copy was lost again gets a new publish on its next retry.
pub const REPUBLISH_COALESCE_SECONDS: u64 = 10;

/// Chunks to publish (retained) and to clear (an empty retained publish), in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Serve {
    /// Indices to publish.
    pub publish: Vec<u32>,
    /// Indices to clear.
    pub clear: Vec<u32>,
}

impl Serve {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty() && self.clear.is_empty()
    }
}

/// One retained chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    /// The publish that made it retained (its sequence number in `RetainedChunks::order`).
    seq: u64,
    /// When (Unix seconds) a retry last republished it, if one did.
    retried_at: Option<u64>,
}

/// The retained window of one campaign.
#[derive(Clone, Debug)]
pub struct RetainedChunks {
    count: u32,
    capacity: u32,
    /// Retained index → how it came to be retained.
    retained: HashMap<u32, Held>,
    /// Publishes in order (index, sequence); an entry whose sequence is no longer the index's is
    /// stale (the index was published again since) and skipped.
    order: VecDeque<(u32, u64)>,
    seq: u64,
    /// Chunks published over the campaign (first publishes and republishes).
    published: u64,
}

impl RetainedChunks {
    /// The window of a campaign of `count` chunks keeping at most `capacity` (at least 1) retained.
    pub fn new(count: u32, capacity: u32) -> Self {
        Self {
            count,
            capacity: capacity.max(1),
            retained: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            published: 0,
        }
    }

    /// Whether the whole campaign fits in the window (then it is published whole up front and
    /// devices need not ask).
    pub fn fits(&self) -> bool {
        self.count <= self.capacity
    }

    /// Chunks retained now.
    pub fn len(&self) -> usize {
        self.retained.len()
    }

    /// Whether none is retained.
    pub fn is_empty(&self) -> bool {
        self.retained.is_empty()
    }

    /// Chunks published so far (first publishes and republishes).
    pub fn published(&self) -> u64 {
        self.published
    }

    /// The first device starts: a campaign that fits is published whole; one served on request
    /// waits for the devices' pulls.
    pub fn start(&mut self) -> Serve {
        if !self.fits() || !self.retained.is_empty() {
            return Serve::default();
        }
        let all: Vec<u32> = (0..self.count).collect();
        self.publish(&all, true)
    }

    /// A device's pull: publish what is not retained yet.
    pub fn pull(&mut self, indices: &[u32]) -> Serve {
        self.publish(indices, false)
    }

    /// A device's retry at `now` (Unix seconds; it did not get these in time): publish them
    /// again, retained or not, except those still retained that a retry republished less than
    /// [`REPUBLISH_COALESCE_SECONDS`] ago.
    pub fn retry(&mut self, indices: &[u32], now: u64) -> Serve {
        let due: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| {
                self.retained
                    .get(i)
                    .and_then(|held| held.retried_at)
                    .is_none_or(|at| now >= at.saturating_add(REPUBLISH_COALESCE_SECONDS))
            })
            .collect();
        let serve = self.publish(&due, true);
        for i in &serve.publish {
            if let Some(held) = self.retained.get_mut(i) {
                held.retried_at = Some(now);
            }
        }
        serve
    }

    /// The campaign ended: clear whatever is retained (the caller also clears every index a
    /// restarted operator may have left, from the recorded chunk count).
    pub fn end(&mut self) -> Serve {
        let mut clear: Vec<u32> = self.retained.drain().map(|(i, _)| i).collect();
        clear.sort_unstable();
        self.order.clear();
        Serve {
            publish: Vec::new(),
            clear,
        }
    }

    fn publish(&mut self, indices: &[u32], again: bool) -> Serve {
        let mut serve = Serve::default();
        for &i in indices {
            if i >= self.count || (!again && self.retained.contains_key(&i)) {
                continue;
            }
            if serve.publish.contains(&i) {
                continue;
            }
            self.seq += 1;
            self.retained.insert(
                i,
                Held {
                    seq: self.seq,
                    retried_at: None,
                },
            );
            self.order.push_back((i, self.seq));
            self.published += 1;
            serve.publish.push(i);
        }
        while self.retained.len() > self.capacity as usize {
            let Some((i, seq)) = self.order.pop_front() else {
                break;
            };
            if self.retained.get(&i).is_some_and(|held| held.seq == seq) {
                self.retained.remove(&i);
                // Published and cleared in one go: only the clear is worth sending... but a
                // device subscribed right now gets the publish, so send both, in order.
                serve.clear.push(i);
            }
        }
        serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaign_that_fits_is_published_whole_once() {
        let mut r = RetainedChunks::new(5, 8);
        assert!(r.fits());
        assert_eq!(r.start().publish, vec![0, 1, 2, 3, 4]);
        assert!(r.start().is_empty(), "published once");
        // Pulls of retained chunks cost nothing; a retry republishes.
        assert!(r.pull(&[1, 2]).is_empty());
        assert_eq!(r.retry(&[2], 1000).publish, vec![2]);
        assert_eq!(r.published(), 6);
        assert_eq!(r.end().clear, vec![0, 1, 2, 3, 4]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_large_campaign_keeps_at_most_capacity_retained_and_clears_the_oldest() {
        let mut r = RetainedChunks::new(100, 4);
        assert!(!r.fits());
        assert!(r.start().is_empty(), "served on request");
        // Twenty devices pulling the same windows publish each chunk once.
        let mut published = Vec::new();
        let mut cleared = Vec::new();
        for window in (0..100u32).collect::<Vec<_>>().chunks(2) {
            for _device in 0..20 {
                let s = r.pull(window);
                published.extend(s.publish);
                cleared.extend(s.clear);
                assert!(r.len() <= 4);
            }
        }
        assert_eq!(published, (0..100).collect::<Vec<_>>());
        assert_eq!(cleared, (0..96).collect::<Vec<_>>(), "oldest first");
        // A device far behind pulls a cleared chunk: published again, and the oldest goes.
        let s = r.pull(&[3]);
        assert_eq!(s.publish, vec![3]);
        assert_eq!(s.clear, vec![96]);
        // Out-of-range indices are never published.
        assert!(r.pull(&[100, 5000]).is_empty());
        let mut end = r.end().clear;
        end.sort_unstable();
        assert_eq!(end, vec![3, 97, 98, 99]);
    }

    #[test]
    fn retries_of_a_retained_chunk_are_coalesced_for_a_while() {
        let mut r = RetainedChunks::new(4, 8);
        r.start();
        assert_eq!(r.retry(&[1, 2], 1000).publish, vec![1, 2]);
        // Other devices ask for the same chunks soon after: served by that publish.
        assert!(r.retry(&[1], 1001).is_empty());
        assert_eq!(r.retry(&[1, 3], 1009).publish, vec![3]);
        // Once the interval passed, a retry publishes again.
        assert_eq!(
            r.retry(&[1, 2], 1000 + REPUBLISH_COALESCE_SECONDS).publish,
            vec![1, 2]
        );
        assert_eq!(r.published(), 4 + 2 + 1 + 2);
        // A chunk no longer retained is published at once, however recent its last retry.
        let mut small = RetainedChunks::new(10, 1);
        small.retry(&[0], 1000);
        small.pull(&[1]);
        assert_eq!(small.retry(&[0], 1001).publish, vec![0]);
    }

    #[test]
    fn a_republished_chunk_counts_from_its_latest_publish() {
        let mut r = RetainedChunks::new(10, 2);
        r.pull(&[0, 1]);
        // 0 again (a retry): now 1 is the oldest.
        assert!(r.retry(&[0], 1000).clear.is_empty());
        assert_eq!(r.pull(&[2]).clear, vec![1]);
        assert_eq!(r.pull(&[3]).clear, vec![0]);
        assert_eq!(r.len(), 2);
    }
}
