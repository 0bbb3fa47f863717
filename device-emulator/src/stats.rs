//! Fleet-wide counters, the live one-line progress display and the final summary (text or
//! JSON). Devices update lock-free atomics; one task renders them. Memory is read from
//! `/proc/self/status`, so the per-device cost is measured, not estimated.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

pub use sealed_ota_device::Outcome;

/// Counters shared by every device of the fleet.
#[derive(Debug)]
pub struct FleetStats {
    started: Instant,
    /// `started` as Unix seconds (the summary reports when the data phase started).
    started_unix_seconds: f64,
    devices: u64,
    connected: AtomicU64,
    ever_connected: AtomicU64,
    connect_attempts: AtomicU64,
    connect_failures: AtomicU64,
    chunks_received: AtomicU64,
    chunk_deliveries: AtomicU64,
    bytes_received: AtomicU64,
    messages_rejected: AtomicU64,
    subscriptions_refused: AtomicU64,
    outcomes: [AtomicU64; 6],
    /// Health reports sent: [healthy, unhealthy].
    health_reports: [AtomicU64; 2],
    all_connected_after: Mutex<Option<Duration>>,
    rss_before_devices: u64,
    rss_all_connected: AtomicU64,
    /// Microseconds after `started` of the first and the latest accepted chunk (any device).
    first_chunk_micros: AtomicU64,
    last_chunk_micros: AtomicU64,
}

impl FleetStats {
    /// Counters for `devices` devices, all idle; reads the memory baseline now.
    pub fn new(devices: u64) -> Self {
        let outcomes = [0; 6].map(AtomicU64::new);
        outcomes[Outcome::Idle.index()].store(devices, Ordering::Relaxed);
        FleetStats {
            started: Instant::now(),
            started_unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            devices,
            connected: AtomicU64::new(0),
            ever_connected: AtomicU64::new(0),
            connect_attempts: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            chunks_received: AtomicU64::new(0),
            chunk_deliveries: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            messages_rejected: AtomicU64::new(0),
            subscriptions_refused: AtomicU64::new(0),
            health_reports: [AtomicU64::new(0), AtomicU64::new(0)],
            outcomes,
            all_connected_after: Mutex::new(None),
            rss_before_devices: resident_set_bytes().unwrap_or(0),
            rss_all_connected: AtomicU64::new(0),
            first_chunk_micros: AtomicU64::new(u64::MAX),
            last_chunk_micros: AtomicU64::new(0),
        }
    }

    /// A connection attempt starts.
    pub fn connect_attempt(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection attempt failed.
    pub fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A device got its CONNACK; `first` on its first connection of the run. When the last
    /// device connects for the first time, the time and the memory are recorded.
    pub fn connected(&self, first: bool) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        if first && self.ever_connected.fetch_add(1, Ordering::Relaxed) + 1 == self.devices {
            *self.all_connected_after.lock().expect("not poisoned") = Some(self.started.elapsed());
            self.rss_all_connected
                .store(resident_set_bytes().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// A connected device lost or dropped its connection.
    pub fn disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// A message of `bytes` payload bytes arrived.
    pub fn received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A firmware chunk was accepted.
    pub fn chunk(&self) {
        self.chunks_received.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.first_chunk_micros.fetch_min(now, Ordering::Relaxed);
        self.last_chunk_micros.fetch_max(now, Ordering::Relaxed);
    }

    /// A message arrived on a chunk topic (accepted, duplicate or rejected).
    pub fn chunk_delivered(&self) {
        self.chunk_deliveries.fetch_add(1, Ordering::Relaxed);
    }

    /// Seconds from the first chunk any device accepted to the last one: the fleet's data phase.
    fn data_phase_seconds(&self) -> Option<f64> {
        let first = self.first_chunk_micros.load(Ordering::Relaxed);
        let last = self.last_chunk_micros.load(Ordering::Relaxed);
        (first <= last).then(|| (last - first) as f64 / 1e6)
    }

    /// The Unix time of the first chunk any device accepted.
    fn data_phase_started_unix_seconds(&self) -> Option<f64> {
        let first = self.first_chunk_micros.load(Ordering::Relaxed);
        (first != u64::MAX).then(|| self.started_unix_seconds + first as f64 / 1e6)
    }

    /// A device sent its signed post-install health report.
    pub fn health_reported(&self, healthy: bool) {
        self.health_reports[usize::from(!healthy)].fetch_add(1, Ordering::Relaxed);
    }

    /// Health reports sent so far: (healthy, unhealthy).
    pub fn health_reports(&self) -> (u64, u64) {
        (
            self.health_reports[0].load(Ordering::Relaxed),
            self.health_reports[1].load(Ordering::Relaxed),
        )
    }

    /// The counters in the Prometheus text exposition format (`run --metrics-file`).
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            out.push_str(&format!(
                "# HELP sealed_ota_emulator_{name} {help}\n# TYPE sealed_ota_emulator_{name} {kind}\n"
            ));
            for (labels, v) in samples {
                out.push_str(&format!("sealed_ota_emulator_{name}{labels} {v}\n"));
            }
        };
        metric(
            "devices",
            "gauge",
            "Emulated devices",
            &[(String::new(), self.devices)],
        );
        metric(
            "connected_devices",
            "gauge",
            "Devices connected to the broker now",
            &[(String::new(), self.connected_now())],
        );
        let outcomes: Vec<(String, u64)> = Outcome::ALL
            .iter()
            .map(|o| (format!("{{outcome=\"{}\"}}", o.name()), self.count(*o)))
            .collect();
        metric(
            "device_outcomes",
            "gauge",
            "Devices per outcome of their last campaign",
            &outcomes,
        );
        let (healthy, unhealthy) = self.health_reports();
        metric(
            "health_reports_total",
            "counter",
            "Signed post-install health reports sent",
            &[
                ("{healthy=\"true\"}".to_owned(), healthy),
                ("{healthy=\"false\"}".to_owned(), unhealthy),
            ],
        );
        metric(
            "subscriptions_refused_total",
            "counter",
            "Subscriptions the broker refused in a SUBACK (subscribed again)",
            &[(
                String::new(),
                self.subscriptions_refused.load(Ordering::Relaxed),
            )],
        );
        metric(
            "chunks_received_total",
            "counter",
            "Firmware chunks accepted",
            &[(String::new(), self.chunks_received.load(Ordering::Relaxed))],
        );
        metric(
            "chunk_deliveries_total",
            "counter",
            "Messages received on chunk topics (accepted, duplicate or rejected): against \
             chunks_received_total, what the broker delivered more than once",
            &[(String::new(), self.chunk_deliveries.load(Ordering::Relaxed))],
        );
        out
    }

    /// The protocol rejected a message (forged, tampered, replayed, stale).
    pub fn message_rejected(&self) {
        self.messages_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// The broker refused `filters` subscriptions in a SUBACK (the device subscribes again).
    pub fn subscriptions_refused(&self, filters: usize) {
        self.subscriptions_refused
            .fetch_add(filters as u64, Ordering::Relaxed);
    }

    /// A device moved from one outcome to another.
    pub fn transition(&self, from: Outcome, to: Outcome) {
        if from != to {
            self.outcomes[from.index()].fetch_sub(1, Ordering::Relaxed);
            self.outcomes[to.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Devices currently at `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    /// Devices in the fleet.
    pub fn devices(&self) -> u64 {
        self.devices
    }

    /// Devices currently connected.
    pub fn connected_now(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Devices connected at least once.
    pub fn ever_connected(&self) -> u64 {
        self.ever_connected.load(Ordering::Relaxed)
    }

    /// Messages the protocol rejected so far.
    pub fn messages_rejected(&self) -> u64 {
        self.messages_rejected.load(Ordering::Relaxed)
    }

    /// The live progress line.
    pub fn progress_line(&self) -> String {
        format!(
            "[{:>7.1}s] connected {}/{}  idle {}  transferring {}  installed {}  rejected {}  \
             failed {}  chunks {}  {:.1} MiB  rejected msgs {}",
            self.started.elapsed().as_secs_f64(),
            self.connected_now(),
            self.devices,
            self.count(Outcome::Idle),
            self.count(Outcome::Transferring),
            self.count(Outcome::Installed),
            self.count(Outcome::Rejected),
            self.count(Outcome::Failed),
            self.chunks_received.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
            self.messages_rejected(),
        )
    }

    /// The final summary; `versions` counts the running version of every device.
    pub fn summary(&self, versions: BTreeMap<String, u64>) -> Summary {
        let rss_all_connected = self.rss_all_connected.load(Ordering::Relaxed);
        let connected_after = *self.all_connected_after.lock().expect("not poisoned");
        let per_device = match (connected_after, self.devices) {
            (Some(_), devices) if devices > 0 && rss_all_connected > 0 => {
                Some(rss_all_connected.saturating_sub(self.rss_before_devices) / devices)
            }
            _ => None,
        };
        Summary {
            devices: self.devices,
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
            all_connected_seconds: connected_after.map(|d| d.as_secs_f64()),
            connected_at_end: self.connected_now(),
            connect_attempts: self.connect_attempts.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.name().to_string(), self.count(*o)))
                .collect(),
            running_versions: versions,
            chunks_received: self.chunks_received.load(Ordering::Relaxed),
            chunk_deliveries: self.chunk_deliveries.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            messages_rejected: self.messages_rejected(),
            subscriptions_refused: self.subscriptions_refused.load(Ordering::Relaxed),
            data_phase_seconds: self.data_phase_seconds(),
            data_phase_started_unix_seconds: self.data_phase_started_unix_seconds(),
            rss_before_devices_bytes: self.rss_before_devices,
            rss_all_connected_bytes: (rss_all_connected > 0).then_some(rss_all_connected),
            memory_per_device_bytes: per_device,
        }
    }
}

/// What a run did, printed at the end (text, or JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Devices in the run.
    pub devices: u64,
    /// Wall time of the run.
    pub elapsed_seconds: f64,
    /// Time until every device had connected once.
    pub all_connected_seconds: Option<f64>,
    /// Devices connected when the run ended.
    pub connected_at_end: u64,
    /// Connection attempts (first connects and reconnects).
    pub connect_attempts: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Devices by outcome of the last campaign they saw.
    pub outcomes: BTreeMap<String, u64>,
    /// Devices by running version.
    pub running_versions: BTreeMap<String, u64>,
    /// Firmware chunks accepted.
    pub chunks_received: u64,
    /// Messages received on chunk topics, accepted or not: more than `chunks_received` when the
    /// broker delivered chunks more than once (retained chunks again after a reconnect, a
    /// republished chunk the device already held).
    pub chunk_deliveries: u64,
    /// Payload bytes received from the broker.
    pub bytes_received: u64,
    /// Messages the protocol rejected (tampered, forged, replayed).
    pub messages_rejected: u64,
    /// Subscriptions the broker refused in a SUBACK (each was subscribed again).
    pub subscriptions_refused: u64,
    /// Seconds from the first chunk any device accepted to the last chunk any device accepted
    /// (absent when no chunk arrived).
    pub data_phase_seconds: Option<f64>,
    /// When the data phase started (the first chunk any device accepted), Unix seconds, so a
    /// benchmark can charge what each process spent to it (absent when no chunk arrived).
    pub data_phase_started_unix_seconds: Option<f64>,
    /// Resident memory before any device started.
    pub rss_before_devices_bytes: u64,
    /// Resident memory when the last device connected.
    pub rss_all_connected_bytes: Option<u64>,
    /// (RSS when all connected - RSS before) / devices.
    pub memory_per_device_bytes: Option<u64>,
}

impl Summary {
    /// Human-readable multi-line summary.
    pub fn render_text(&self) -> String {
        let mut text = format!(
            "devices: {}  elapsed: {:.1} s  all connected after: {}\n",
            self.devices,
            self.elapsed_seconds,
            self.all_connected_seconds
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "never".into()),
        );
        text += &format!(
            "connections: {} attempts, {} failed, {} connected at the end\n",
            self.connect_attempts, self.connect_failures, self.connected_at_end
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        text += &format!("outcomes: {}\n", outcomes.join(", "));
        let versions: Vec<String> = self
            .running_versions
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        text += &format!("running versions: {}\n", versions.join(", "));
        text += &format!(
            "received: {} chunks ({} chunk messages), {:.2} MiB; messages rejected by the \
             protocol: {}; subscriptions refused by the broker: {}\n",
            self.chunks_received,
            self.chunk_deliveries,
            self.bytes_received as f64 / (1024.0 * 1024.0),
            self.messages_rejected,
            self.subscriptions_refused
        );
        text += &format!(
            "memory: RSS {:.1} MiB before devices, {} when all connected, {} per device\n",
            self.rss_before_devices_bytes as f64 / (1024.0 * 1024.0),
            self.rss_all_connected_bytes
                .map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
                .unwrap_or_else(|| "n/a".into()),
            self.memory_per_device_bytes
                .map(|b| format!("{:.1} KiB", b as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into()),
        );
        text
    }
}

/// Redraws the progress line on stderr every `every` until the returned handle is aborted.
pub fn spawn_progress_display(
    stats: std::sync::Arc<FleetStats>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let mut err = std::io::stderr().lock();
            // \r + clear to end of line: one line, redrawn in place.
            let _ = write!(err, "\r{}\x1b[K", stats.progress_line());
            let _ = err.flush();
        }
    })
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn resident_set_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Write `text` to `path` through a temporary file renamed over it, so a reader never sees
/// half of it.
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_metrics_text_counts_health_reports_and_outcomes() {
        let stats = FleetStats::new(3);
        stats.health_reported(true);
        stats.health_reported(false);
        stats.health_reported(false);
        stats.transition(Outcome::Idle, Outcome::Installed);
        let text = stats.prometheus_text();
        assert!(
            text.contains("sealed_ota_emulator_health_reports_total{healthy=\"true\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sealed_ota_emulator_health_reports_total{healthy=\"false\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sealed_ota_emulator_device_outcomes{outcome=\"installed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# TYPE sealed_ota_emulator_devices gauge\nsealed_ota_emulator_devices 3\n"
            ),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("emulator.prom");
        write_atomically(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[tokio::test]
    async fn outcomes_move_devices_between_buckets() {
        let stats = FleetStats::new(3);
        stats.transition(Outcome::Idle, Outcome::Transferring);
        stats.transition(Outcome::Idle, Outcome::Transferring);
        stats.transition(Outcome::Transferring, Outcome::Installed);
        stats.transition(Outcome::Transferring, Outcome::Transferring);
        assert_eq!(stats.count(Outcome::Idle), 1);
        assert_eq!(stats.count(Outcome::Transferring), 1);
        assert_eq!(stats.count(Outcome::Installed), 1);
        let summary = stats.summary(BTreeMap::from([("1.0.0".into(), 3)]));
        assert_eq!(summary.outcomes["installed"], 1);
        assert_eq!(summary.outcomes.values().sum::<u64>(), 3);
    }

    #[tokio::test]
    async fn the_last_first_connection_records_time_and_memory() {
        let stats = FleetStats::new(2);
        stats.connected(true);
        assert!(stats
            .summary(BTreeMap::new())
            .all_connected_seconds
            .is_none());
        stats.disconnected();
        stats.connected(false);
        stats.connected(true);
        let summary = stats.summary(BTreeMap::new());
        assert!(summary.all_connected_seconds.is_some());
        assert!(summary.rss_all_connected_bytes.unwrap() > 0);
        assert!(summary.memory_per_device_bytes.is_some());
        assert_eq!(summary.connected_at_end, 2);
        let json = serde_json::to_value(&summary).unwrap();
        assert!(json["memoryPerDeviceBytes"].is_u64());
        assert!(summary.render_text().contains("per device"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_data_phase_spans_the_first_to_the_last_chunk() {
        let stats = FleetStats::new(2);
        assert_eq!(stats.summary(BTreeMap::new()).data_phase_seconds, None);
        assert_eq!(
            stats
                .summary(BTreeMap::new())
                .data_phase_started_unix_seconds,
            None
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        stats.chunk();
        tokio::time::advance(Duration::from_millis(1500)).await;
        stats.chunk();
        stats.chunk();
        let summary = stats.summary(BTreeMap::new());
        assert_eq!(summary.data_phase_seconds, Some(1.5));
        assert_eq!(summary.chunks_received, 3);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["dataPhaseSeconds"], 1.5);
        // The first chunk came 5 s after the fleet started.
        let started = json["dataPhaseStartedUnixSeconds"].as_f64().unwrap();
        assert!((started - stats.started_unix_seconds - 5.0).abs() < 1e-3);
    }

    #[test]
    fn reads_its_own_rss() {
        assert!(resident_set_bytes().unwrap() > 1024 * 1024);
    }
}
