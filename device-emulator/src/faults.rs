//! Fault switches: what can go wrong on a device, which devices it hits, and the small pure
//! decisions the device runner asks at each step (go offline now? delay this message? flip a
//! bit? refuse? crash?). Parsing and selection are deterministic, so the same command line hits
//! the same devices after a restart. It never touches a socket or a file itself.
//!
//! Syntax of one `--fault`: `KIND[:key=value,...][@SELECTOR]`
//!
//! | kind | parameters | effect |
//! |---|---|---|
//! | `offline` | `after=K` chunks, `for=T` | drop the connection after K chunks, reconnect after T (once) |
//! | `slow` | `rate=BYTES_PER_SECOND` (`k`/`m` suffixes) | hold each received message len/rate |
//! | `bitflip` | `p=PROBABILITY`, `where=wire\|storage` | flip one bit of a firmware chunk as received, or as stored |
//! | `refuse` | `reason=TEXT` | decline every offered update (signed rejection) |
//! | `crash-install` | `restart-after=T` | power loss half-way through installing, restart from disk (once) |
//! | `clock-skew` | `seconds=N` (may be negative) | the device's clock is off by N seconds |
//! | `clock-file` | `path=FILE` | the device's clock is off by the seconds written in FILE (re-read at every use; absent or unreadable: 0), so a test moves it while the fleet runs |
//! | `max-packet` | `bytes=N` | advertise Maximum Packet Size N in CONNECT |
//! | `selftest-fail` | `reason=TEXT` | the installed image fails its self-test: the device rolls back and reports it (signed RolledBack) |
//! | `unhealthy` | `reason=TEXT` | the installed image passes its self-test and is committed, but its post-install health check fails: the signed health report says unhealthy |
//!
//! Selectors: `@all` (the default), `@10%` or `@fraction=0.1` (evenly spread over the fleet, a
//! different set for each `--fault`), `@devices=dev-00001+dev-00002`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

use crate::error::{Error, Result};

/// Where a bit flip happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipPlace {
    /// In a firmware chunk message as it arrives from the broker (the protocol must reject it).
    Wire,
    /// In a decrypted chunk after it was written to disk (the install's SHA-256 check must fail).
    Storage,
}

/// One kind of fault with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Disconnect after `after_chunks` chunks and stay away `duration`.
    Offline {
        /// Chunks received in this run before going away.
        after_chunks: u32,
        /// Time offline.
        duration: Duration,
    },
    /// Hold received messages to emulate a link of this throughput.
    SlowLink {
        /// Bytes per second.
        bytes_per_second: u64,
    },
    /// Flip one random bit with this probability per received message or stored chunk.
    BitFlip {
        /// Probability in [0, 1].
        probability: f64,
        /// Where.
        place: FlipPlace,
    },
    /// Decline every offered update.
    RefuseUpdate {
        /// The reason sent (signed) to the manager.
        reason: String,
    },
    /// Lose power half-way through the install, then restart from disk.
    CrashDuringInstall {
        /// Time before the device comes back.
        restart_after: Duration,
    },
    /// Shift the device's clock.
    ClockSkew {
        /// Seconds added to the real time (negative: behind).
        seconds: i64,
    },
    /// Shift the device's clock by the seconds a file holds (read at every use).
    ClockFile {
        /// The file.
        path: PathBuf,
    },
    /// Advertise a Maximum Packet Size in CONNECT.
    MaxPacketSize {
        /// Bytes.
        bytes: u32,
    },
    /// The installed image fails its self-test: roll back and report it.
    SelfTestFails {
        /// The reason reported (signed RolledBack).
        reason: String,
    },
    /// The committed image's post-install health check fails (signed health report).
    Unhealthy {
        /// What the report says.
        reason: String,
    },
}

/// Which devices a fault hits.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Every device.
    All,
    /// This fraction of the fleet, evenly spread.
    Fraction(f64),
    /// These device ids.
    Devices(Vec<String>),
}

/// A parsed `--fault` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// The fault.
    pub fault: Fault,
    /// The devices it hits.
    pub selector: Selector,
}

impl FromStr for FaultSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = |reason: String| Error::FaultSpec {
            spec: text.to_string(),
            reason,
        };
        let (body, selector) = match text.split_once('@') {
            Some((body, selector)) => (body, parse_selector(selector).map_err(invalid)?),
            None => (text, Selector::All),
        };
        let (kind, params) = body.split_once(':').unwrap_or((body, ""));
        let params = Params::parse(params).map_err(invalid)?;
        let fault = match kind {
            "offline" => Fault::Offline {
                after_chunks: params.required("after", parse_u32).map_err(invalid)?,
                duration: params.required("for", parse_duration).map_err(invalid)?,
            },
            "slow" => Fault::SlowLink {
                bytes_per_second: params.required("rate", parse_rate).map_err(invalid)?,
            },
            "bitflip" => Fault::BitFlip {
                probability: params
                    .optional("p", parse_probability)
                    .map_err(invalid)?
                    .unwrap_or(1.0),
                place: params
                    .optional("where", parse_flip_place)
                    .map_err(invalid)?
                    .unwrap_or(FlipPlace::Wire),
            },
            "refuse" => Fault::RefuseUpdate {
                reason: params
                    .optional("reason", |v| Ok(v.to_string()))
                    .map_err(invalid)?
                    .unwrap_or_else(|| "refused by the device operator".to_string()),
            },
            "crash-install" => Fault::CrashDuringInstall {
                restart_after: params
                    .optional("restart-after", parse_duration)
                    .map_err(invalid)?
                    .unwrap_or(Duration::from_secs(2)),
            },
            "clock-skew" => Fault::ClockSkew {
                seconds: params
                    .required("seconds", |v| {
                        v.parse::<i64>().map_err(|e| format!("seconds {v:?}: {e}"))
                    })
                    .map_err(invalid)?,
            },
            "clock-file" => Fault::ClockFile {
                path: params
                    .required("path", |v| Ok(PathBuf::from(v)))
                    .map_err(invalid)?,
            },
            "max-packet" => Fault::MaxPacketSize {
                bytes: params.required("bytes", parse_u32).map_err(invalid)?,
            },
            "selftest-fail" => Fault::SelfTestFails {
                reason: params
                    .optional("reason", |v| Ok(v.to_string()))
                    .map_err(invalid)?
                    .unwrap_or_else(|| "self-test failed after install".to_string()),
            },
            "unhealthy" => Fault::Unhealthy {
                reason: params
                    .optional("reason", |v| Ok(v.to_string()))
                    .map_err(invalid)?
                    .unwrap_or_else(|| "post-install health check failed".to_string()),
            },
            other => {
                return Err(invalid(format!(
                    "unknown fault {other:?}; expected offline, slow, bitflip, refuse, \
                     crash-install, clock-skew, clock-file, max-packet, selftest-fail or unhealthy"
                )))
            }
        };
        params.reject_unused().map_err(invalid)?;
        Ok(FaultSpec { fault, selector })
    }
}

/// `key=value` parameters of one fault, each to be used exactly once.
struct Params<'a> {
    pairs: Vec<(&'a str, &'a str)>,
    used: std::cell::RefCell<Vec<&'a str>>,
}

impl<'a> Params<'a> {
    fn parse(text: &'a str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("parameter {item:?} is not key=value"))?;
            pairs.push((key, value));
        }
        Ok(Params {
            pairs,
            used: Default::default(),
        })
    }

    fn optional<T>(
        &self,
        key: &'a str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        self.used.borrow_mut().push(key);
        self.pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| parse(v))
            .transpose()
    }

    fn required<T>(
        &self,
        key: &'a str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        self.optional(key, parse)?
            .ok_or_else(|| format!("missing parameter {key}="))
    }

    fn reject_unused(&self) -> Result<(), String> {
        let used = self.used.borrow();
        match self.pairs.iter().find(|(k, _)| !used.contains(k)) {
            Some((key, _)) => Err(format!("unknown parameter {key:?}")),
            None => Ok(()),
        }
    }
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    if text == "all" {
        return Ok(Selector::All);
    }
    if let Some(percent) = text.strip_suffix('%') {
        let value: f64 = percent
            .parse()
            .map_err(|e| format!("selector {text:?}: {e}"))?;
        return parse_probability(&(value / 100.0).to_string()).map(Selector::Fraction);
    }
    if let Some(fraction) = text.strip_prefix("fraction=") {
        return parse_probability(fraction).map(Selector::Fraction);
    }
    if let Some(devices) = text.strip_prefix("devices=") {
        let ids: Vec<String> = devices
            .split('+')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if ids.is_empty() {
            return Err("devices= names no device".into());
        }
        return Ok(Selector::Devices(ids));
    }
    Err(format!(
        "selector {text:?}: expected all, N%, fraction=F or devices=a+b"
    ))
}

fn parse_u32(text: &str) -> Result<u32, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

fn parse_probability(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{text} is not between 0 and 1"))
    }
}

fn parse_flip_place(text: &str) -> Result<FlipPlace, String> {
    match text {
        "wire" => Ok(FlipPlace::Wire),
        "storage" => Ok(FlipPlace::Storage),
        other => Err(format!("where={other:?}: expected wire or storage")),
    }
}

/// Bytes per second, with optional `k` (1000) or `m` (1,000,000) suffix.
fn parse_rate(text: &str) -> Result<u64, String> {
    let (digits, multiplier) = match text.to_ascii_lowercase() {
        t if t.ends_with('k') => (t.trim_end_matches('k').to_string(), 1_000),
        t if t.ends_with('m') => (t.trim_end_matches('m').to_string(), 1_000_000),
        t => (t, 1),
    };
    let value: u64 = digits.parse().map_err(|e| format!("rate {text:?}: {e}"))?;
    match value * multiplier {
        0 => Err("rate must be positive".into()),
        rate => Ok(rate),
    }
}

/// `500ms`, `5s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|e| format!("duration {text:?}: {e}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "" | "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        "h" => Ok(Duration::from_secs(value * 3600)),
        other => Err(format!("duration {text:?}: unknown unit {other:?}")),
    }
}

/// The golden ratio's fractional part: shifts each fault's evenly spread set so two faults with
/// the same fraction hit different devices.
const PHASE_STEP: f64 = 0.618_033_988_749_895;

impl Selector {
    /// Whether the device at `position` of a fleet (sorted ids) is hit; `spec_index` is the
    /// position of the `--fault` on the command line.
    fn selects(&self, device_id: &str, position: usize, spec_index: usize) -> bool {
        match self {
            Selector::All => true,
            Selector::Devices(ids) => ids.iter().any(|id| id == device_id),
            Selector::Fraction(fraction) => {
                let phase = (spec_index as f64 * PHASE_STEP).fract();
                let before = (position as f64 * fraction + phase).floor();
                let after = ((position + 1) as f64 * fraction + phase).floor();
                after > before
            }
        }
    }
}

/// The faults that apply to one device, with the little state they need (each one-shot fault
/// fires once per process).
#[derive(Debug, Clone, Default)]
pub struct DeviceFaults {
    offline: Option<(u32, Duration)>,
    offline_fired: bool,
    slow_link_bytes_per_second: Option<u64>,
    wire_flip_probability: Option<f64>,
    storage_flip_probability: Option<f64>,
    refusal: Option<String>,
    crash_install: Option<Duration>,
    crash_fired: bool,
    clock_skew_seconds: i64,
    clock_file: Option<PathBuf>,
    max_packet_size: Option<u32>,
    self_test_failure: Option<String>,
    unhealthy: Option<String>,
}

impl DeviceFaults {
    /// The faults of `specs` that hit the device `device_id` at `position` in the fleet.
    /// When two specs set the same switch, the later one wins.
    pub fn for_device(specs: &[FaultSpec], device_id: &str, position: usize) -> Self {
        let mut faults = DeviceFaults::default();
        for (index, spec) in specs.iter().enumerate() {
            if !spec.selector.selects(device_id, position, index) {
                continue;
            }
            match &spec.fault {
                Fault::Offline {
                    after_chunks,
                    duration,
                } => faults.offline = Some((*after_chunks, *duration)),
                Fault::SlowLink { bytes_per_second } => {
                    faults.slow_link_bytes_per_second = Some(*bytes_per_second)
                }
                Fault::BitFlip {
                    probability,
                    place: FlipPlace::Wire,
                } => faults.wire_flip_probability = Some(*probability),
                Fault::BitFlip {
                    probability,
                    place: FlipPlace::Storage,
                } => faults.storage_flip_probability = Some(*probability),
                Fault::RefuseUpdate { reason } => faults.refusal = Some(reason.clone()),
                Fault::CrashDuringInstall { restart_after } => {
                    faults.crash_install = Some(*restart_after)
                }
                Fault::ClockSkew { seconds } => faults.clock_skew_seconds = *seconds,
                Fault::ClockFile { path } => faults.clock_file = Some(path.clone()),
                Fault::MaxPacketSize { bytes } => faults.max_packet_size = Some(*bytes),
                Fault::SelfTestFails { reason } => faults.self_test_failure = Some(reason.clone()),
                Fault::Unhealthy { reason } => faults.unhealthy = Some(reason.clone()),
            }
        }
        faults
    }

    /// Whether any switch is set.
    pub fn any(&self) -> bool {
        self.offline.is_some()
            || self.slow_link_bytes_per_second.is_some()
            || self.wire_flip_probability.is_some()
            || self.storage_flip_probability.is_some()
            || self.refusal.is_some()
            || self.crash_install.is_some()
            || self.clock_skew_seconds != 0
            || self.clock_file.is_some()
            || self.max_packet_size.is_some()
            || self.self_test_failure.is_some()
            || self.unhealthy.is_some()
    }

    /// After `chunks_this_run` chunks: time to stay offline, the first time the threshold is met.
    pub fn offline_now(&mut self, chunks_this_run: u32) -> Option<Duration> {
        match self.offline {
            Some((after, duration)) if !self.offline_fired && chunks_this_run >= after => {
                self.offline_fired = true;
                Some(duration)
            }
            _ => None,
        }
    }

    /// How long to hold a received message of `bytes` bytes on a slow link.
    pub fn slow_link_delay(&self, bytes: usize) -> Option<Duration> {
        self.slow_link_bytes_per_second
            .map(|rate| Duration::from_secs_f64(bytes as f64 / rate as f64))
    }

    /// Maybe flips one bit of a received message; true when it did.
    pub fn tamper_received(&self, payload: &mut [u8], rng: &mut impl Rng) -> bool {
        match self.wire_flip_probability {
            Some(p) if !payload.is_empty() && rng.gen_bool(p) => {
                let bit = rng.gen_range(0..payload.len() * 8);
                payload[bit / 8] ^= 1 << (bit % 8);
                true
            }
            _ => false,
        }
    }

    /// Maybe picks a bit (offset in the chunk, bit number) to flip in a stored chunk of `len`.
    pub fn storage_flip(&self, len: usize, rng: &mut impl Rng) -> Option<(u64, u8)> {
        match self.storage_flip_probability {
            Some(p) if len > 0 && rng.gen_bool(p) => {
                Some((rng.gen_range(0..len as u64), rng.gen_range(0..8)))
            }
            _ => None,
        }
    }

    /// The reason to decline an offered update, if this device refuses updates.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// When an install starts: the time to stay down after a crash, the first time only.
    pub fn crash_on_install(&mut self) -> Option<Duration> {
        match self.crash_install {
            Some(restart_after) if !self.crash_fired => {
                self.crash_fired = true;
                Some(restart_after)
            }
            _ => None,
        }
    }

    /// The device's idea of the current time (Unix seconds).
    pub fn device_now(&self, real_now: u64) -> u64 {
        let from_file = self
            .clock_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| text.trim().parse::<i64>().ok())
            .unwrap_or(0);
        real_now
            .saturating_add_signed(self.clock_skew_seconds)
            .saturating_add_signed(from_file)
    }

    /// Why the installed image fails its self-test, if this device's image does.
    pub fn self_test_failure(&self) -> Option<&str> {
        self.self_test_failure.as_deref()
    }

    /// Why the committed image's post-install health check fails, if this device's does.
    pub fn unhealthy(&self) -> Option<&str> {
        self.unhealthy.as_deref()
    }

    /// The Maximum Packet Size to advertise, `default` unless the fault sets one.
    pub fn max_packet_size(&self, default: u32) -> u32 {
        self.max_packet_size.unwrap_or(default)
    }
}

/// The runner's fault switches: the emulator's `--fault`s that act on messages, chunks, the
/// clock and the connection (the install faults are the emulated installer's).
impl sealed_ota_device::Faults for DeviceFaults {
    fn clock(&self, real_now: u64) -> u64 {
        self.device_now(real_now)
    }

    fn max_packet_size(&self, configured: u32) -> u32 {
        DeviceFaults::max_packet_size(self, configured)
    }

    fn slow_link_delay(&self, bytes: usize) -> Option<Duration> {
        DeviceFaults::slow_link_delay(self, bytes)
    }

    fn tamper_received(&self, payload: &mut [u8]) -> bool {
        DeviceFaults::tamper_received(self, payload, &mut rand::thread_rng())
    }

    fn refusal(&self) -> Option<String> {
        DeviceFaults::refusal(self).map(str::to_string)
    }

    fn unhealthy(&self) -> Option<String> {
        DeviceFaults::unhealthy(self).map(str::to_string)
    }

    fn after_chunk_stored(
        &self,
        download: &sealed_ota_device::store::Download,
        offset: u64,
        len: usize,
    ) -> Result<bool, sealed_ota_device::durable::FileError> {
        match self.storage_flip(len, &mut rand::thread_rng()) {
            Some((at, bit)) => {
                crate::slots::flip_stored_bit(download.path(), offset + at, bit)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn offline_now(&mut self, chunks_this_run: u32) -> Option<Duration> {
        DeviceFaults::offline_now(self, chunks_this_run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn spec(text: &str) -> FaultSpec {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn faults(text: &str) -> DeviceFaults {
        DeviceFaults::for_device(&[spec(text)], "dev-00000", 0)
    }

    #[test]
    fn parses_every_kind_and_selector() {
        assert_eq!(
            spec("offline:after=20,for=5s@10%"),
            FaultSpec {
                fault: Fault::Offline {
                    after_chunks: 20,
                    duration: Duration::from_secs(5)
                },
                selector: Selector::Fraction(0.1),
            }
        );
        assert_eq!(
            spec("slow:rate=20k").fault,
            Fault::SlowLink {
                bytes_per_second: 20_000
            }
        );
        assert_eq!(
            spec("bitflip:p=0.5,where=storage@fraction=0.25"),
            FaultSpec {
                fault: Fault::BitFlip {
                    probability: 0.5,
                    place: FlipPlace::Storage
                },
                selector: Selector::Fraction(0.25),
            }
        );
        assert_eq!(
            spec("refuse:reason=maintenance window@devices=dev-1+dev-2"),
            FaultSpec {
                fault: Fault::RefuseUpdate {
                    reason: "maintenance window".into()
                },
                selector: Selector::Devices(vec!["dev-1".into(), "dev-2".into()]),
            }
        );
        assert_eq!(
            spec("crash-install").fault,
            Fault::CrashDuringInstall {
                restart_after: Duration::from_secs(2)
            }
        );
        assert_eq!(
            spec("clock-skew:seconds=-7200").fault,
            Fault::ClockSkew { seconds: -7200 }
        );
        assert_eq!(
            spec("max-packet:bytes=4096@all").fault,
            Fault::MaxPacketSize { bytes: 4096 }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (text, needle) in [
            ("explode", "unknown fault"),
            ("offline:after=3", "missing parameter for="),
            ("offline:after=3,for=5x", "unknown unit"),
            ("slow:rate=0", "positive"),
            ("bitflip:p=1.5", "between 0 and 1"),
            ("bitflip:where=ram", "wire or storage"),
            ("refuse:colour=red", "unknown parameter"),
            ("refuse@sometimes", "selector"),
            ("max-packet:bytes", "key=value"),
        ] {
            let err = text.parse::<FaultSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains(text), "the message names the spec: {err}");
        }
    }

    #[test]
    fn a_fraction_hits_that_share_of_the_fleet_and_each_spec_a_different_set() {
        let specs = [spec("refuse@10%"), spec("clock-skew:seconds=60@10%")];
        let ids: Vec<String> = (0..1000).map(|i| format!("dev-{i:05}")).collect();
        let per_device: Vec<DeviceFaults> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| DeviceFaults::for_device(&specs, id, i))
            .collect();
        let refusing = per_device.iter().filter(|f| f.refusal().is_some()).count();
        let skewed = per_device.iter().filter(|f| f.device_now(0) == 60).count();
        assert_eq!((refusing, skewed), (100, 100));
        let both = per_device
            .iter()
            .filter(|f| f.refusal().is_some() && f.device_now(0) == 60)
            .count();
        assert!(both < 100, "the two sets differ ({both} in common)");
        // Deterministic: the same devices again.
        let again = DeviceFaults::for_device(&specs, &ids[7], 7);
        assert_eq!(again.refusal().is_some(), per_device[7].refusal().is_some());
    }

    #[test]
    fn named_devices_only() {
        let specs = [spec("refuse@devices=dev-00003")];
        assert!(DeviceFaults::for_device(&specs, "dev-00003", 3)
            .refusal()
            .is_some());
        assert!(!DeviceFaults::for_device(&specs, "dev-00004", 4).any());
    }

    #[test]
    fn offline_fires_once_at_the_threshold() {
        let mut f = faults("offline:after=3,for=2s");
        assert_eq!(f.offline_now(2), None);
        assert_eq!(f.offline_now(3), Some(Duration::from_secs(2)));
        assert_eq!(f.offline_now(4), None, "once per process");
    }

    #[test]
    fn slow_link_delays_in_proportion_to_size() {
        let f = faults("slow:rate=1k");
        assert_eq!(f.slow_link_delay(500), Some(Duration::from_millis(500)));
        assert_eq!(faults("refuse").slow_link_delay(500), None);
    }

    #[test]
    fn wire_bitflip_changes_exactly_one_bit() {
        let f = faults("bitflip:p=1");
        let mut rng = StdRng::seed_from_u64(1);
        let original = vec![0u8; 64];
        let mut payload = original.clone();
        assert!(f.tamper_received(&mut payload, &mut rng));
        let flipped: u32 = original
            .iter()
            .zip(&payload)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(flipped, 1);
        let never = faults("bitflip:p=0");
        assert!(!never.tamper_received(&mut payload, &mut rng));
        assert!(never.storage_flip(100, &mut rng).is_none());
    }

    #[test]
    fn storage_bitflip_picks_an_offset_inside_the_chunk() {
        let f = faults("bitflip:p=1,where=storage");
        let mut rng = StdRng::seed_from_u64(2);
        let (offset, bit) = f.storage_flip(10, &mut rng).unwrap();
        assert!(offset < 10 && bit < 8);
        assert!(
            !f.tamper_received(&mut [0u8; 4], &mut rng),
            "not on the wire"
        );
    }

    #[test]
    fn refusal_crash_skew_and_packet_size() {
        assert_eq!(faults("refuse:reason=busy").refusal(), Some("busy"));
        let mut crash = faults("crash-install:restart-after=500ms");
        assert_eq!(crash.crash_on_install(), Some(Duration::from_millis(500)));
        assert_eq!(
            crash.crash_on_install(),
            None,
            "the restarted device installs"
        );
        assert_eq!(faults("clock-skew:seconds=-100").device_now(1000), 900);
        assert_eq!(faults("clock-skew:seconds=-100").device_now(50), 0);
        assert_eq!(
            faults("max-packet:bytes=2048").max_packet_size(1 << 20),
            2048
        );
        assert_eq!(faults("refuse").max_packet_size(1 << 20), 1 << 20);
    }

    #[test]
    fn a_clock_file_moves_the_clock_while_running_and_selftest_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("offset");
        let f = faults(&format!("clock-file:path={}", path.display()));
        assert_eq!(f.device_now(1000), 1000, "no file: no offset");
        std::fs::write(&path, "259200\n").unwrap();
        assert_eq!(f.device_now(1000), 1000 + 259_200);
        std::fs::write(&path, "-500").unwrap();
        assert_eq!(f.device_now(1000), 500);
        assert!(f.any());
        assert_eq!(
            faults("selftest-fail").self_test_failure(),
            Some("self-test failed after install")
        );
        assert_eq!(
            faults("selftest-fail:reason=boot loop").self_test_failure(),
            Some("boot loop")
        );
        assert!(
            "clock-file".parse::<FaultSpec>().is_err(),
            "path= is required"
        );
        assert_eq!(
            faults("unhealthy").unhealthy(),
            Some("post-install health check failed")
        );
        assert_eq!(
            faults("unhealthy:reason=watchdog resets").unhealthy(),
            Some("watchdog resets")
        );
        assert!(faults("unhealthy").any());
        assert_eq!(faults("selftest-fail").unhealthy(), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("m").is_err());
    }
}
