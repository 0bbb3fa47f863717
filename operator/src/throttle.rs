//! How often a campaign is reconciled when things keep happening to it (pure): at most once per
//! interval, with the first request of a quiet campaign at once and the ones that arrive during
//! the interval folded into one at its end. At 100,000 devices a campaign hears of a device every
//! few milliseconds; each pass looks at all of a shard's devices, so without this the passes run
//! back to back and cost more than the devices themselves. No clock or I/O here: the caller passes
//! `now` and sleeps.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Pass it on now.
    Now,
    /// Pass it on after this long (the caller then calls [`Throttle::fire`]).
    Later(Duration),
    /// Already scheduled: folded into that one.
    Folded,
}

/// Per-key state of the throttle.
#[derive(Debug)]
pub struct Throttle<K> {
    interval: Duration,
    last: HashMap<K, Instant>,
    scheduled: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    /// At most one request per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
            scheduled: HashMap::new(),
        }
    }

    /// A request for `key` at `now`.
    pub fn offer(&mut self, key: &K, now: Instant) -> Offer {
        if self.scheduled.contains_key(key) {
            return Offer::Folded;
        }
        match self.last.get(key) {
            Some(&at) if now.duration_since(at) < self.interval => {
                let due = at + self.interval;
                self.scheduled.insert(key.clone(), due);
                Offer::Later(due - now)
            }
            _ => {
                self.last.insert(key.clone(), now);
                Offer::Now
            }
        }
    }

    /// The scheduled request for `key` is passed on at `now`.
    pub fn fire(&mut self, key: &K, now: Instant) {
        self.scheduled.remove(key);
        self.last.insert(key.clone(), now);
    }

    /// Forget keys quiet for longer than the interval (bounded memory).
    pub fn prune(&mut self, now: Instant) {
        let interval = self.interval;
        self.last.retain(|_, at| now.duration_since(*at) < interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_passes_and_a_burst_folds_into_one_at_the_interval_end() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Throttle::new(ms(250));
        assert_eq!(t.offer(&"c", t0), Offer::Now);
        assert_eq!(t.offer(&"c", t0 + ms(10)), Offer::Later(ms(240)));
        assert_eq!(t.offer(&"c", t0 + ms(20)), Offer::Folded);
        assert_eq!(t.offer(&"other", t0 + ms(20)), Offer::Now, "per key");
        t.fire(&"c", t0 + ms(250));
        assert_eq!(t.offer(&"c", t0 + ms(300)), Offer::Later(ms(200)));
        t.fire(&"c", t0 + ms(500));
        assert_eq!(t.offer(&"c", t0 + ms(800)), Offer::Now, "quiet again");
        t.prune(t0 + ms(2000));
        assert!(t.last.is_empty());
    }
}
