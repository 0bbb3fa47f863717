//! Starting and stopping a fleet: reads the enrolled devices, resolves each one's faults,
//! spawns one task per device sharing a pacer and the counters, and on stop collects every
//! device's report into the summary. Used by the `run` command and by the e2e tests, which
//! start, stop and restart fleets in-process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sealed_ota_device::seam::Gate;
use sealed_ota_device::{Observer, Outcome};
use sealed_ota_protocol::{KeyLog, ReleaseKey, TopicTree, TrustAnchor};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::barrier::TransferBarrier;
use crate::device::{DeviceReport, EmulatedDevice, EmulatedInstaller, Settings};
use crate::error::{Error, Result};
use crate::faults::{DeviceFaults, FaultSpec};
use crate::keylog::KeyLogFile;
use crate::mqtt_io::BrokerEndpoint;
use crate::pacing::ConnectPacer;
use crate::stats::{FleetStats, Summary};
use crate::store::FleetDir;

/// Part K of N of a fleet (`run --part K/N`, K counted from 1): the devices whose position in
/// the sorted list is K-1 modulo N, so the parts are disjoint, cover the fleet and differ in size
/// by at most one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    index: usize,
    of: usize,
}

impl Part {
    /// The devices of this part, in their order.
    pub fn select<T>(self, ids: Vec<T>) -> Vec<T> {
        ids.into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.of == self.index)
            .map(|(_, id)| id)
            .collect()
    }
}

impl std::str::FromStr for Part {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let (k, n) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}': expected K/N, for example 2/4"))?;
        let number = |v: &str, what: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{text}': {what} '{v}' is not a whole number"))
        };
        let (k, n) = (number(k, "K")?, number(n, "N")?);
        if n == 0 || k == 0 || k > n {
            return Err(format!("'{text}': K must be 1..N and N at least 1"));
        }
        Ok(Part {
            index: k - 1,
            of: n,
        })
    }
}

/// What the fleet's devices report as they run: the counters, and the transfer barrier of
/// `run --transfer-barrier`.
#[derive(Debug)]
pub struct FleetObserver {
    stats: Arc<FleetStats>,
    barrier: Option<Arc<TransferBarrier>>,
}

impl FleetObserver {
    /// Counts into `stats`; holds first chunk windows at `barrier` when there is one.
    pub fn new(stats: Arc<FleetStats>, barrier: Option<Arc<TransferBarrier>>) -> Self {
        FleetObserver { stats, barrier }
    }
}

impl Observer for FleetObserver {
    fn connect_attempt(&self) {
        self.stats.connect_attempt();
    }
    fn connect_failed(&self) {
        self.stats.connect_failed();
    }
    fn connected(&self, first: bool) {
        self.stats.connected(first);
    }
    fn disconnected(&self) {
        self.stats.disconnected();
    }
    fn received(&self, bytes: usize) {
        self.stats.received(bytes);
    }
    fn message_rejected(&self) {
        self.stats.message_rejected();
    }
    fn subscriptions_refused(&self, filters: usize) {
        self.stats.subscriptions_refused(filters);
    }
    fn chunk_delivered(&self) {
        self.stats.chunk_delivered();
    }
    fn chunk_stored(&self) {
        self.stats.chunk();
    }
    fn outcome_changed(&self, from: Outcome, to: Outcome) {
        self.stats.transition(from, to);
    }
    fn health_reported(&self, healthy: bool) {
        self.stats.health_reported(healthy);
    }
    fn transfer_gate(&self) -> Option<Gate> {
        let barrier = Arc::clone(self.barrier.as_ref()?);
        barrier.arrive();
        Some(Box::pin(async move { barrier.wait().await }))
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The enrolled fleet.
    pub fleet: FleetDir,
    /// The broker.
    pub endpoint: BrokerEndpoint,
    /// Manager id, when not the one in `fleet.json`.
    pub manager_id: Option<String>,
    /// Topic prefix, when not the one in `fleet.json`.
    pub topic_prefix: Option<String>,
    /// Run only the first N devices (sorted by id).
    pub device_limit: Option<usize>,
    /// Run only one part of the fleet (`run --part K/N`), after `device_limit`: several
    /// processes share a fleet larger than one process's file descriptors allow.
    pub part: Option<Part>,
    /// Connection attempts per second.
    pub connect_rate: f64,
    /// Concurrent TLS/MQTT handshakes.
    pub max_connecting: usize,
    /// Fault switches.
    pub faults: Vec<FaultSpec>,
    /// Maximum Packet Size advertised.
    pub max_packet_size: u32,
    /// Chunk topics subscribed at once.
    pub window: u32,
    /// Seconds before a missing chunk window is requested again.
    pub window_timeout: u64,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// State saved every N chunks.
    pub save_every_chunks: u32,
    /// Hold first chunk windows until every device of this run was offered the update
    /// (benchmarks: the data phase then times the transfer alone).
    pub transfer_barrier: bool,
    /// Append every session key, content key and delivered key to this file (tests only).
    pub key_log: Option<std::path::PathBuf>,
    /// Benchmarks only: do not fsync the protocol-state saves (see `DeviceDir::without_state_fsync`).
    pub no_state_fsync: bool,
    /// Benchmarks only: remove each committed image after hashing it (`ImageSlots::drop_installed_image`).
    pub drop_installed_images: bool,
    /// How long after a committed install a device sends its signed health report (`None`: no
    /// report).
    pub health_report_after: Option<Duration>,
}

impl FleetOptions {
    /// Defaults for everything but the fleet and the broker.
    pub fn new(fleet: FleetDir, endpoint: BrokerEndpoint) -> Self {
        FleetOptions {
            fleet,
            endpoint,
            manager_id: None,
            topic_prefix: None,
            device_limit: None,
            part: None,
            connect_rate: 500.0,
            max_connecting: 64,
            faults: Vec::new(),
            max_packet_size: 256 * 1024,
            window: 8,
            window_timeout: 30,
            keep_alive: Duration::from_secs(60),
            save_every_chunks: 16,
            transfer_barrier: false,
            key_log: None,
            no_state_fsync: false,
            drop_installed_images: false,
            health_report_after: Some(Duration::from_secs(2)),
        }
    }
}

/// A fleet whose devices are running.
#[derive(Debug)]
pub struct RunningFleet {
    stats: Arc<FleetStats>,
    shutdown: watch::Sender<bool>,
    devices: JoinSet<DeviceReport>,
}

impl RunningFleet {
    /// Spawns one task per device. Must be called inside a tokio runtime.
    pub fn start(options: FleetOptions) -> Result<Self> {
        crate::install_crypto_provider();
        let settings = options.fleet.settings()?;
        let manager_id = options.manager_id.unwrap_or(settings.manager_id);
        let prefix = options.topic_prefix.unwrap_or(settings.topic_prefix);
        let topics = TopicTree::new(&prefix, &manager_id).map_err(|source| Error::Topics {
            manager_id: manager_id.clone(),
            source,
        })?;
        let ca_path = options.fleet.ca_cert_path();
        let ca_pem =
            std::fs::read_to_string(&ca_path).map_err(|e| Error::io("reading", &ca_path, e))?;
        let trust = TrustAnchor::from_pem(&ca_pem).map_err(|source| Error::Identity {
            subject: "CA".into(),
            source,
        })?;
        let mut ids = options.fleet.device_ids()?;
        if let Some(limit) = options.device_limit {
            if limit > ids.len() {
                return Err(Error::Config(format!(
                    "--devices {limit}: only {} devices are enrolled in {}",
                    ids.len(),
                    options.fleet.root().display()
                )));
            }
            ids.truncate(limit);
        }
        if let Some(part) = options.part {
            ids = part.select(ids);
        }
        if ids.is_empty() {
            return Err(Error::Config(format!(
                "no device enrolled in {}",
                options.fleet.root().display()
            )));
        }
        ensure_open_file_limit(ids.len())?;
        let release_keys = settings
            .release_keys
            .iter()
            .map(|k| {
                ReleaseKey::parse(k).map_err(|source| Error::Identity {
                    subject: "a release key in fleet.json".into(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let stats = Arc::new(FleetStats::new(ids.len() as u64));
        let barrier = options
            .transfer_barrier
            .then(|| Arc::new(TransferBarrier::new(ids.len() as u64)));
        let settings = Arc::new(Settings {
            endpoint: options.endpoint,
            trust: Arc::new(trust),
            topics: Arc::new(topics),
            initial_version: settings.initial_version,
            max_packet_size: options.max_packet_size,
            window: options.window,
            window_timeout: options.window_timeout,
            keep_alive: options.keep_alive,
            poll_interval: Duration::from_secs(1),
            save_every_chunks: options.save_every_chunks.max(1),
            pacer: Some(ConnectPacer::new(
                options.connect_rate,
                options.max_connecting,
            )),
            observer: Arc::new(FleetObserver::new(Arc::clone(&stats), barrier)),
            release_keys,
            key_log: match &options.key_log {
                Some(path) => Some(Arc::new(KeyLogFile::open(path)?) as Arc<dyn KeyLog>),
                None => None,
            },
            health_report_after: options.health_report_after,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut devices = JoinSet::new();
        for (position, id) in ids.into_iter().enumerate() {
            let faults = DeviceFaults::for_device(&options.faults, &id, position);
            let mut dir = options.fleet.device(&id);
            if options.no_state_fsync {
                dir = dir.without_state_fsync();
            }
            let mut installer = EmulatedInstaller::new(&id, dir.root(), faults.clone());
            if options.drop_installed_images {
                installer = installer.dropping_installed_images();
            }
            let device = EmulatedDevice::new(
                Arc::clone(&settings),
                id,
                dir,
                installer,
                Box::new(faults),
                shutdown_rx.clone(),
            )
            .starting_on_node(position);
            devices.spawn(device.run());
        }
        Ok(RunningFleet {
            stats,
            shutdown,
            devices,
        })
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<FleetStats> {
        &self.stats
    }

    /// Asks every device to save its state and disconnect, waits for them, and summarises.
    pub async fn stop(mut self) -> (Summary, Vec<DeviceReport>) {
        let _ = self.shutdown.send(true);
        let mut reports = Vec::new();
        while let Some(joined) = self.devices.join_next().await {
            if let Ok(report) = joined {
                reports.push(report);
            }
        }
        reports.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let mut versions = BTreeMap::new();
        for report in &reports {
            *versions.entry(report.running_version.clone()).or_insert(0) += 1;
        }
        (self.stats.summary(versions), reports)
    }
}

/// Makes room for a socket per device: raises the soft open-file limit up to the hard limit
/// when needed, and fails early, with the fix, when even that is too low.
fn ensure_open_file_limit(devices: usize) -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = devices as u64 + 256;
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return Ok(());
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard >= needed {
        let raised = Rlimit {
            current: Some(needed.max(soft)),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return Ok(());
        }
    }
    Err(Error::Config(format!(
        "{devices} devices need about {needed} open files but the limit is {soft} (hard {hard}): \
         raise it (`ulimit -n {needed}`), run fewer devices, or split the fleet over processes (`run --part K/N`)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_disjoint_cover_the_fleet_and_are_balanced() {
        let ids: Vec<u32> = (0..10).collect();
        let parts: Vec<Vec<u32>> = (1..=3)
            .map(|k| {
                format!("{k}/3")
                    .parse::<Part>()
                    .unwrap()
                    .select(ids.clone())
            })
            .collect();
        assert_eq!(parts[0], [0, 3, 6, 9]);
        assert_eq!(parts[1], [1, 4, 7]);
        assert_eq!(parts[2], [2, 5, 8]);
        let mut all: Vec<u32> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, ids);
        assert_eq!("1/1".parse::<Part>().unwrap().select(ids.clone()), ids);
    }

    #[test]
    fn a_bad_part_names_what_is_wrong() {
        for (text, says) in [
            ("3", "expected K/N"),
            ("0/2", "K must be 1..N"),
            ("3/2", "K must be 1..N"),
            ("1/0", "K must be 1..N"),
            ("a/2", "K 'a' is not a whole number"),
            ("1/x", "N 'x' is not a whole number"),
        ] {
            let err = text.parse::<Part>().unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_open_file_limit_is_raised_when_needed_and_a_hopeless_one_explained() {
        use rustix::process::{getrlimit, Resource};
        let limit = getrlimit(Resource::Nofile);
        let soft = limit.current.expect("a finite soft limit");
        ensure_open_file_limit(soft.saturating_sub(256) as usize).unwrap();
        if limit.maximum.is_none_or(|hard| hard >= soft + 256) {
            // Room below the hard limit: the soft limit is raised.
            ensure_open_file_limit(soft as usize).unwrap();
            assert!(getrlimit(Resource::Nofile).current.unwrap() >= soft + 256);
        }
        let err = ensure_open_file_limit(usize::MAX / 2).unwrap_err();
        assert!(err.to_string().contains("ulimit -n"), "{err}");
    }
}
