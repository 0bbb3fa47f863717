//! MQTT topic tree of the paper's Figure 5, with a configurable prefix. Owns topic construction and
//! parsing only; a topic is a broker-alterable hint and never proves anything by itself.
//!
//! Layout: `<prefix>/<manager>/<device>/{notify,update}` (manager to device),
//! `<prefix>/<manager>/<device>/{ready,update/status}/<bucket>` (device to manager) and
//! `<prefix>/<manager>/_chunks/<campaign>/<index>`. The default prefix is `iot`. The paper's `$iot`
//! is accepted, but MQTT 5 section 4.7.2 reserves topics starting with `$` for the broker, and
//! Mosquitto's persistence does not keep retained `$` topics: prefer `iot`.
//!
//! A device's **bucket** ([`bucket_of`]: the first byte of the SHA-256 of its id, in decimal) ends
//! the topics it publishes to, so that a manager split over replicas subscribes only to the
//! buckets of the shards it holds (`<prefix>/<manager>/+/ready/<bucket>`) and the broker delivers
//! each replica only its own devices' messages; one manager takes every bucket with
//! [`TopicTree::ready_filter`]. A topic whose bucket is not its device's is not in the tree.

use crate::prelude::*;

use crate::error::TopicError;

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "iot";
/// Topic level holding published chunks; ids cannot start with `_`, so it never collides.
pub const CHUNKS_LEVEL: &str = "_chunks";

/// Buckets a device id hashes to ([`bucket_of`]).
pub const BUCKETS: u32 = 256;

/// The bucket of a device id: the first byte of its SHA-256. Fixed for ever for an id.
pub fn bucket_of(device_id: &str) -> u32 {
    use sha2::Digest;
    u32::from(sha2::Sha256::digest(device_id.as_bytes())[0])
}

/// Check an id (manager, device or campaign): 1-63 chars of `[a-z0-9-]`.
pub fn validate_id(id: &str) -> Result<(), TopicError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TopicError::InvalidId(id.chars().take(80).collect()))
    }
}

/// Builder and parser of the topic tree of one manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTree {
    prefix: String,
    manager: String,
}

/// What a topic of the tree stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `<prefix>/<manager>/<device>/notify`
    Notify {
        /// Device id.
        device: String,
    },
    /// `<prefix>/<manager>/<device>/ready/<bucket>`
    Ready {
        /// Device id.
        device: String,
    },
    /// `<prefix>/<manager>/<device>/update`
    Update {
        /// Device id.
        device: String,
    },
    /// `<prefix>/<manager>/<device>/update/status/<bucket>`
    Status {
        /// Device id.
        device: String,
    },
    /// `<prefix>/<manager>/_chunks/<campaign>/<index>`
    Chunk {
        /// Campaign id.
        campaign: String,
        /// Chunk index.
        index: u32,
    },
}

impl TopicTree {
    /// A tree under `prefix` (may contain `/`, e.g. `fleet/iot`) for manager `manager_id`.
    pub fn new(prefix: &str, manager_id: &str) -> Result<Self, TopicError> {
        let bad = prefix.is_empty()
            || prefix.len() > 128
            || prefix.split('/').any(|l| l.is_empty())
            || prefix.contains(['+', '#', '\0']);
        if bad {
            return Err(TopicError::InvalidPrefix(
                prefix.chars().take(140).collect(),
            ));
        }
        validate_id(manager_id)?;
        Ok(Self {
            prefix: prefix.to_string(),
            manager: manager_id.to_string(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The manager id.
    pub fn manager_id(&self) -> &str {
        &self.manager
    }

    fn dev(&self, device: &str, leaf: &str) -> String {
        format!("{}/{}/{}/{}", self.prefix, self.manager, device, leaf)
    }

    /// `<prefix>/<manager>/<device>/notify`
    pub fn notify(&self, device: &str) -> String {
        self.dev(device, "notify")
    }
    /// `<prefix>/<manager>/<device>/ready/<bucket>`
    pub fn ready(&self, device: &str) -> String {
        self.dev(device, &format!("ready/{}", bucket_of(device)))
    }
    /// `<prefix>/<manager>/<device>/update`
    pub fn update(&self, device: &str) -> String {
        self.dev(device, "update")
    }
    /// `<prefix>/<manager>/<device>/update/status/<bucket>`
    pub fn status(&self, device: &str) -> String {
        self.dev(device, &format!("update/status/{}", bucket_of(device)))
    }
    /// `<prefix>/<manager>/+/ready/+`: every device's `ready`.
    pub fn ready_filter(&self) -> String {
        self.dev("+", "ready/+")
    }
    /// `<prefix>/<manager>/+/update/status/+`: every device's status.
    pub fn status_filter(&self) -> String {
        self.dev("+", "update/status/+")
    }
    /// The two filters of one bucket's devices, `ready` and status:
    /// `<prefix>/<manager>/+/ready/<bucket>` and `<prefix>/<manager>/+/update/status/<bucket>`.
    pub fn bucket_filters(&self, bucket: u32) -> [String; 2] {
        [
            self.dev("+", &format!("ready/{bucket}")),
            self.dev("+", &format!("update/status/{bucket}")),
        ]
    }
    /// `<prefix>/<manager>/_chunks/<campaign>/<index>`
    pub fn chunk(&self, campaign: &str, index: u32) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.prefix, self.manager, CHUNKS_LEVEL, campaign, index
        )
    }
    /// `<prefix>/<manager>/_chunks/<campaign>/+`
    pub fn chunk_filter(&self, campaign: &str) -> String {
        format!(
            "{}/{}/{}/{}/+",
            self.prefix, self.manager, CHUNKS_LEVEL, campaign
        )
    }

    /// Parse a topic of this tree.
    pub fn parse(&self, topic: &str) -> Result<TopicKind, TopicError> {
        let not_in = || TopicError::NotInTree(topic.chars().take(200).collect());
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(self.manager.as_str()))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in)?;
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            [CHUNKS_LEVEL, campaign, index] => {
                validate_id(campaign).map_err(|_| not_in())?;
                // Canonical decimal only: no sign, no leading zeros.
                if index.is_empty()
                    || !index.bytes().all(|b| b.is_ascii_digit())
                    || (index.len() > 1 && index.starts_with('0'))
                {
                    return Err(not_in());
                }
                let index: u32 = index.parse().map_err(|_| not_in())?;
                Ok(TopicKind::Chunk {
                    campaign: campaign.to_string(),
                    index,
                })
            }
            [device, leaf @ ..] => {
                validate_id(device).map_err(|_| not_in())?;
                let own_bucket = |b: &str| *b == bucket_of(device).to_string();
                let device = device.to_string();
                match leaf {
                    ["notify"] => Ok(TopicKind::Notify { device }),
                    ["ready", b] if own_bucket(b) => Ok(TopicKind::Ready { device }),
                    ["update"] => Ok(TopicKind::Update { device }),
                    ["update", "status", b] if own_bucket(b) => Ok(TopicKind::Status { device }),
                    _ => Err(not_in()),
                }
            }
            _ => Err(not_in()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let t = TopicTree::new(DEFAULT_PREFIX, "p1").unwrap();
        assert_eq!(t.notify("s1"), "iot/p1/s1/notify");
        // SHA-256("s1") starts with 0xe8 (232).
        assert_eq!(bucket_of("s1"), 0xe8);
        assert_eq!(t.ready("s1"), "iot/p1/s1/ready/232");
        assert_eq!(t.status("s1"), "iot/p1/s1/update/status/232");
        assert_eq!(t.ready_filter(), "iot/p1/+/ready/+");
        assert_eq!(t.status_filter(), "iot/p1/+/update/status/+");
        assert_eq!(
            t.bucket_filters(232),
            ["iot/p1/+/ready/232", "iot/p1/+/update/status/232"]
        );
        assert_eq!(t.chunk("c1", 7), "iot/p1/_chunks/c1/7");
        for (topic, kind) in [
            (
                t.notify("s1"),
                TopicKind::Notify {
                    device: "s1".into(),
                },
            ),
            (
                t.ready("s1"),
                TopicKind::Ready {
                    device: "s1".into(),
                },
            ),
            (
                t.update("s1"),
                TopicKind::Update {
                    device: "s1".into(),
                },
            ),
            (
                t.status("s1"),
                TopicKind::Status {
                    device: "s1".into(),
                },
            ),
            (
                t.chunk("c-1", 42),
                TopicKind::Chunk {
                    campaign: "c-1".into(),
                    index: 42,
                },
            ),
        ] {
            assert_eq!(t.parse(&topic).unwrap(), kind);
        }
    }

    #[test]
    fn dollar_prefix_allowed_and_multi_level() {
        let t = TopicTree::new("$iot", "p1").unwrap();
        assert_eq!(
            t.parse("$iot/p1/s1/ready/232").unwrap(),
            TopicKind::Ready {
                device: "s1".into()
            }
        );
        let t = TopicTree::new("a/b", "p1").unwrap();
        assert_eq!(
            t.parse("a/b/p1/s1/notify").unwrap(),
            TopicKind::Notify {
                device: "s1".into()
            }
        );
    }

    #[test]
    fn rejects_bad_ids_and_prefixes() {
        for id in ["", "_x", "A", "a/b", "a+b", &"a".repeat(64)] {
            assert!(
                matches!(TopicTree::new("iot", id), Err(TopicError::InvalidId(_))),
                "{id}"
            );
        }
        for p in ["", "a//b", "a/+", "#", "/a", "a/"] {
            assert!(
                matches!(TopicTree::new(p, "m"), Err(TopicError::InvalidPrefix(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn rejects_foreign_topics() {
        let t = TopicTree::new("iot", "p1").unwrap();
        for topic in [
            "iot/p2/s1/ready/232",
            "iot/p1/s1/other",
            "iot/p1/s1/update/status/x",
            // Without its bucket, or with another device's.
            "iot/p1/s1/ready",
            "iot/p1/s1/update/status",
            "iot/p1/s1/ready/231",
            "iot/p1/s1/update/status/0232",
            "iot/p1/s1/ready/232/x",
            "iot/p1/_chunks/c1/01",
            "iot/p1/_chunks/c1/-1",
            "iot/p1/_chunks/c1/99999999999",
            "iot/p1/_chunks/c1",
            "iot/p1/_x/ready",
            "iot/p1",
            "iot",
            "",
            "iotx/p1/s1/ready",
        ] {
            assert!(
                matches!(t.parse(topic), Err(TopicError::NotInTree(_))),
                "{topic}"
            );
        }
    }
}
