//! The engine: the I/O shell around the session registry ([`Runs`]). It owns the registry behind
//! one lock (never held across an `.await`), the shared MQTT session and the Device status
//! writers, and carries out the [`Effects`] the registry returns: a gating write first (a
//! rotation's issued certificate recorded as pending on the Device before the update that carries
//! it is published), then the writes, then the MQTT actions; notes become metrics and logs.
//! Decisions are the registry's and the rollout's; a device's writes stop the moment this replica
//! loses its shard's Lease, and `forget_shards` drops the shard's sessions. Chunks are read from
//! the cache directory one at a time, just before each is published, so serving a large image
//! holds one chunk in memory per publish. When the registry releases a run, the heap's free
//! pages go back to the system once its writes drained ([`crate::heap`]). A device's status write
//! is sent to the apiserver as soon as it is decided (a write held back until the transfers ended
//! was tried and removed: an operator killed while holding writes lost the outcomes they
//! recorded).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use sealed_ota_protocol::{Action, Inbound, TopicKind, TopicTree};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::crd::Device;
use crate::device_status::DeviceWrite;
use crate::error::Error;
use crate::heap::Trimmer;
use crate::metrics::Metrics;
use crate::mqtt::MqttSession;
use crate::rollout::Progress;
use crate::runs::{CampaignKey, CampaignRun, ChunkServe, Effects, Note, Plan, RunFacts, Runs};
use crate::shards::ShardCount;
use crate::time::unix_now;

/// Field manager of every status the operator writes.
pub const FIELD_MANAGER: &str = "sealed-ota-operator";

/// The shared engine of one leader term.
#[derive(Debug)]
pub struct Engine {
    /// Topic tree of this manager.
    pub topics: Arc<TopicTree>,
    /// The shared MQTT session.
    pub mqtt: MqttSession,
    /// Metrics.
    pub metrics: Metrics,
    /// Where firmware images are prepared and how their chunks are served.
    pub firmware: FirmwareSettings,
    runs: Mutex<Runs>,
    writes: DeviceWrites,
    /// Gives the heap's free pages back once a run is released.
    heap: Trimmer,
    /// Where a campaign whose device finished is sent to be reconciled again.
    wake: mpsc::UnboundedSender<CampaignKey>,
}

/// Where firmware images are prepared (the cache directory) and how their chunks are served.
#[derive(Clone, Debug)]
pub struct FirmwareSettings {
    /// The cache directory.
    pub cache: crate::chunk_cache::CacheDir,
    /// Most chunk bytes of one campaign retained on the broker at once.
    pub retained_chunk_bytes: u64,
    /// Largest image accepted from a URL or a registry.
    pub max_image_bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Create the engine; Device status writes go to `writes`, campaigns whose device finished to
    /// `wake`.
    pub fn new(
        topics: Arc<TopicTree>,
        mqtt: MqttSession,
        metrics: Metrics,
        writes: DeviceWrites,
        wake: mpsc::UnboundedSender<CampaignKey>,
        firmware: FirmwareSettings,
    ) -> Self {
        Self {
            topics,
            mqtt,
            metrics,
            firmware,
            runs: Mutex::new(Runs::new()),
            writes,
            heap: Trimmer::default(),
            wake,
        }
    }

    /// Device status writes queued or in progress (all campaigns).
    pub fn device_writes_pending(&self) -> usize {
        self.writes.pending()
    }

    /// Device status writes of devices of `shard` queued or in progress.
    pub fn device_writes_pending_in(&self, shard: u32) -> usize {
        self.writes.pending_in(shard)
    }

    /// Forget the devices of shards this replica no longer holds (see [`Runs::forget_devices`]).
    pub fn forget_shards(&self, lost: &BTreeSet<u32>, shards: ShardCount) {
        let n = lock(&self.runs).forget_devices(|id| lost.contains(&shards.of_device(id)));
        if n > 0 {
            tracing::info!(shards = ?lost, devices = n, "shards handed over: their devices' sessions dropped");
        }
    }

    /// Whether a run exists for the campaign (with this uid).
    pub fn has_run(&self, key: &CampaignKey, uid: &str) -> bool {
        lock(&self.runs).has(key, uid)
    }

    /// Install a run (replacing one of an older uid).
    pub fn insert_run(&self, key: CampaignKey, run: CampaignRun) {
        lock(&self.runs).insert(key, run);
    }

    /// What the campaign status reports about the run's prepared payload.
    pub fn run_facts(&self, key: &CampaignKey) -> Option<RunFacts> {
        lock(&self.runs).facts(key)
    }

    /// Chunks of each delta of the run (see [`crate::runs::Runs::delta_chunk_counts`]).
    pub fn delta_chunk_counts(&self, key: &CampaignKey) -> Option<Vec<u32>> {
        lock(&self.runs).delta_chunk_counts(key)
    }

    /// What the run's deltas saved (see [`crate::runs::Runs::delta_tally`]).
    pub fn delta_tally(&self, key: &CampaignKey) -> Option<crate::crd::DeltaStatus> {
        lock(&self.runs).delta_tally(key).map(Into::into)
    }

    /// Progress of each selected device (see [`Runs::progress`]).
    pub fn progress(&self, key: &CampaignKey, uid: &str, devices: &[Arc<Device>]) -> Vec<Progress> {
        lock(&self.runs).progress(key, uid, devices)
    }

    /// Where a device stands in a run of this replica (see [`Runs::standing`]).
    pub fn standing(&self, key: &CampaignKey, uid: &str, device: &str) -> Option<Progress> {
        lock(&self.runs).standing(key, uid, device).cloned()
    }

    /// The latest signed health report of a device (see [`Runs::health`]).
    pub fn health(&self, key: &CampaignKey, uid: &str, device: &str) -> Option<bool> {
        lock(&self.runs).health(key, uid, device)
    }

    /// Release the run's devices that are no longer selected (see [`Runs::release`]); returns
    /// their names.
    pub async fn release(
        &self,
        key: &CampaignKey,
        selected: &std::collections::HashSet<&str>,
        in_scope: impl Fn(&str) -> bool,
        exists: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, Error> {
        let (fx, released) = lock(&self.runs).release(key, selected, in_scope, exists, unix_now());
        self.perform(fx, Publishing::Await).await?;
        Ok(released)
    }

    /// Carry out a reconcile pass's plan (see [`Runs::apply`]).
    pub async fn apply(
        &self,
        key: &CampaignKey,
        uid: &str,
        devices: &[Arc<Device>],
        plan: &Plan,
    ) -> Result<(), Error> {
        let fx = lock(&self.runs).apply(key, uid, devices, plan, &self.topics, unix_now());
        self.perform(fx, Publishing::Await).await
    }

    /// Forget a run (campaign deleted) and clear what it left retained.
    pub async fn remove_run(&self, key: &CampaignKey) -> Result<(), Error> {
        let fx = lock(&self.runs).remove(key, &self.topics, unix_now());
        self.perform(fx, Publishing::Await).await
    }

    /// The device a `ready` or status message comes from (by its topic, a hint), if it is one.
    pub fn device_of(&self, msg: &Inbound) -> Option<String> {
        match self.topics.parse(&msg.topic) {
            Ok(TopicKind::Ready { device }) | Ok(TopicKind::Status { device }) => Some(device),
            _ => None,
        }
    }

    /// Feed one inbound message from `device` (see [`Engine::device_of`]) to the session it
    /// belongs to and carry out what follows. Its publishes are detached: the caller reads the
    /// inbound channel, which the MQTT event loop may be waiting to write to.
    pub async fn handle_inbound(&self, device: &str, msg: Inbound) {
        let fx = lock(&self.runs).dispatch(device, &msg, &self.topics, unix_now());
        if let Err(e) = self.perform(fx, Publishing::Detached).await {
            tracing::warn!(device = %device, error = %e, "publishing session output failed");
        }
    }

    /// Carry out effects: the gate, the writes, the MQTT actions; notes to metrics and logs.
    async fn perform(&self, fx: Effects, publishing: Publishing) -> Result<(), Error> {
        let Effects {
            gate,
            writes,
            chunks,
            actions,
            notes,
            wake,
            released,
        } = fx;
        if released {
            let writes = self.writes.clone();
            self.heap
                .after_release(async move { writes.pending.drained().await });
        }
        if let Some(key) = wake {
            let _ = self.wake.send(key);
        }
        for note in &notes {
            self.note(note);
        }
        if let Some(gate) = gate {
            if !self.writes.send_confirmed(gate.write).await {
                tracing::warn!(campaign = %gate.campaign.1, device = %gate.device, "the issued certificate could not be recorded on the Device: the update is held back until the device asks again");
                return Ok(());
            }
            lock(&self.runs).issued_recorded(&gate.campaign, &gate.device, gate.fingerprint);
        }
        for w in writes {
            self.writes.send(w);
        }
        for serve in chunks {
            self.serve_chunks(serve, publishing).await?;
        }
        self.publish(actions, publishing).await
    }

    async fn publish(&self, actions: Vec<Action>, publishing: Publishing) -> Result<(), Error> {
        match publishing {
            Publishing::Await => self.mqtt.execute(actions).await,
            Publishing::Detached => self.mqtt.execute_detached(actions),
        }
    }

    /// Publish and clear chunks, reading each ciphertext just before its publish.
    async fn serve_chunks(&self, serve: ChunkServe, publishing: Publishing) -> Result<(), Error> {
        let serve = Arc::new(serve);
        for &index in &serve.serve.publish {
            let (s, topics) = (serve.clone(), self.topics.clone());
            let publish = tokio::task::spawn_blocking(move || s.publish(&topics, index))
                .await
                .map_err(|e| Error::Join(e.to_string()))?;
            match publish {
                Ok(o) => {
                    self.metrics.chunks_served.inc();
                    self.publish(vec![Action::Publish(o)], publishing).await?;
                }
                Err(e) => {
                    tracing::warn!(campaign = %serve.prepared.campaign_id(), index, error = %e, "reading a chunk from the cache failed");
                }
            }
        }
        let clears = serve.clears(&self.topics);
        self.publish(
            clears.into_iter().map(Action::Publish).collect(),
            publishing,
        )
        .await
    }

    fn note(&self, note: &Note) {
        let m = &self.metrics;
        match note {
            Note::Started {
                campaign,
                device,
                attempt,
            } => {
                tracing::debug!(%campaign, %device, attempt, "device started");
            }
            Note::StartRefused {
                campaign,
                device,
                error,
            } => {
                tracing::warn!(%campaign, %device, %error, "cannot start a session for the device");
            }
            Note::ReadyRepeated => m.repeated_readies.inc(),
            Note::HandshakeCompleted {
                campaign,
                device,
                running_version,
            } => {
                m.handshakes.inc();
                tracing::debug!(%campaign, %device, running = %running_version, "handshake completed");
            }
            Note::Installed {
                campaign,
                device,
                version,
            } => {
                m.installs.inc();
                tracing::debug!(%campaign, %device, %version, "signed install receipt");
            }
            Note::Failed {
                campaign,
                device,
                reason,
                detail,
            } => {
                m.device_failures
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::warn!(%campaign, %device, %reason, %detail, "device failed");
            }
            Note::Retrying {
                campaign,
                device,
                attempt,
            } => {
                m.device_retries.inc();
                tracing::info!(%campaign, %device, attempt, "device attempt timed out, retrying after backoff");
            }
            Note::Health {
                campaign,
                device,
                healthy,
                detail,
            } => {
                m.health_reports
                    .with_label_values(&[if *healthy { "true" } else { "false" }])
                    .inc();
                tracing::info!(%campaign, %device, healthy, %detail, "signed health report");
            }
            Note::Ignored { device, label } => {
                m.protocol_errors.with_label_values(&[label]).inc();
                tracing::debug!(%device, reason = %label, "ignored an inbound message");
            }
        }
    }
}

/// Senders to the Device status writers. A device always goes to the same lane, so its writes
/// land in order, while different devices are written in parallel. A write lands only while this
/// replica holds the device's shard: after the shard's Lease is lost, queued writes are dropped
/// unwritten (the next holder resumes from what the resources record, and a device answers a new
/// session of a campaign it completed with a fresh receipt).
#[derive(Clone, Debug)]
pub struct DeviceWrites {
    lanes: Vec<mpsc::UnboundedSender<QueuedWrite>>,
    shards: ShardCount,
    pending: Arc<PendingWrites>,
}

/// Device status writes sent and not yet finished (written, dropped, or given up after the
/// retries), per shard, and a signal when none is left.
#[derive(Debug)]
struct PendingWrites {
    per_shard: Vec<AtomicUsize>,
    none_left: Notify,
}

impl PendingWrites {
    fn new(shards: ShardCount) -> Self {
        Self {
            per_shard: shards.all().map(|_| AtomicUsize::new(0)).collect(),
            none_left: Notify::new(),
        }
    }

    fn started(&self, shard: u32) {
        self.per_shard[shard as usize].fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self, shard: u32) {
        self.per_shard[shard as usize].fetch_sub(1, Ordering::AcqRel);
        if self.total() == 0 {
            self.none_left.notify_waiters();
        }
    }

    fn total(&self) -> usize {
        self.per_shard
            .iter()
            .map(|p| p.load(Ordering::Acquire))
            .sum()
    }

    fn of(&self, shard: u32) -> usize {
        self.per_shard
            .get(shard as usize)
            .map_or(0, |p| p.load(Ordering::Acquire))
    }

    /// Returns once no write is pending (at once when none is).
    async fn drained(&self) {
        loop {
            let none_left = self.none_left.notified();
            tokio::pin!(none_left);
            // Registered before the count is read: a last write finishing in between wakes it.
            none_left.as_mut().enable();
            if self.total() == 0 {
                return;
            }
            none_left.await;
        }
    }
}

impl DeviceWrites {
    /// Start `lanes` writer tasks that write a device's status while `held` holds its shard;
    /// returns the senders and tasks.
    pub fn spawn(
        client: &Client,
        metrics: &Metrics,
        lanes: usize,
        shards: ShardCount,
        held: watch::Receiver<BTreeSet<u32>>,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let pending = Arc::new(PendingWrites::new(shards));
        let (senders, tasks): (Vec<_>, Vec<_>) = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(run_device_writer(
                    client.clone(),
                    rx,
                    metrics.clone(),
                    Arc::clone(&pending),
                    held.clone(),
                ));
                (tx, task)
            })
            .unzip();
        (
            Self {
                lanes: senders,
                shards,
                pending,
            },
            tasks,
        )
    }

    /// Writes sent and not yet finished, over every shard.
    pub fn pending(&self) -> usize {
        self.pending.total()
    }

    /// Writes of devices of `shard` sent and not yet finished.
    pub fn pending_in(&self, shard: u32) -> usize {
        self.pending.of(shard)
    }

    /// Queue a write on the device's lane.
    pub fn send(&self, w: DeviceWrite) {
        self.queue(w, None);
    }

    /// Queue a write on the device's lane (after the ones queued before it) and wait until it
    /// landed: `false` when it could not be written.
    pub async fn send_confirmed(&self, w: DeviceWrite) -> bool {
        let (done, landed) = oneshot::channel();
        self.queue(w, Some(done));
        landed.await.unwrap_or(false)
    }

    fn queue(&self, write: DeviceWrite, done: Option<oneshot::Sender<bool>>) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&write.namespace, &write.name).hash(&mut h);
        let lane = (h.finish() % self.lanes.len() as u64) as usize;
        let shard = self.shards.of_device(&write.device_id);
        self.pending.started(shard);
        let queued = QueuedWrite { write, done, shard };
        if self.lanes[lane].send(queued).is_err() {
            // The writer is gone (shutting down): nothing will finish this write.
            self.pending.finished(shard);
        }
    }
}

/// A write, its shard and, when the sender waits for it, where to say whether it landed.
#[derive(Debug)]
struct QueuedWrite {
    write: DeviceWrite,
    done: Option<oneshot::Sender<bool>>,
    shard: u32,
}

/// Write Device statuses in order for the devices of one lane, while their shard is held.
async fn run_device_writer(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<QueuedWrite>,
    metrics: Metrics,
    pending: Arc<PendingWrites>,
    held: watch::Receiver<BTreeSet<u32>>,
) {
    while let Some(QueuedWrite {
        write: w,
        done,
        shard,
    }) = rx.recv().await
    {
        let api: Api<Device> = Api::namespaced(client.clone(), &w.namespace);
        let patch = serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1",
            "kind": "Device",
            "status": &*w.status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut delay = Duration::from_millis(200);
        let mut landed = false;
        for attempt in 1..=6 {
            if !held.borrow().contains(&shard) {
                tracing::debug!(device = %w.name, shard, "shard not held: device status write dropped");
                break;
            }
            match api.patch_status(&w.name, &pp, &Patch::Apply(&patch)).await {
                Ok(_) => {
                    metrics.status_writes.with_label_values(&["device"]).inc();
                    landed = true;
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(e) => {
                    tracing::warn!(device = %w.name, namespace = %w.namespace, attempt, error = %e, "device status write failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        if let Some(done) = done {
            let _ = done.send(landed);
        }
        pending.finished(shard);
    }
}

/// How the engine hands its MQTT actions to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publishing {
    /// Wait for room in the client's request channel (reconcile passes: back-pressure).
    Await,
    /// Queue without waiting (the inbound dispatcher: see
    /// [`crate::mqtt::MqttSession::execute_detached`]).
    Detached,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap trim waits for the queued Device status writes (they hold the last statuses):
    /// `drained` returns once the last pending write of any shard finished, and not before.
    #[tokio::test]
    async fn pending_writes_drain_when_the_last_one_finishes() {
        let pending = Arc::new(PendingWrites::new(ShardCount::new(2).unwrap()));
        pending.drained().await; // none pending: at once
        pending.started(0);
        pending.started(1);
        let waiter = tokio::spawn({
            let pending = pending.clone();
            async move { pending.drained().await }
        });
        pending.finished(0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "shard 1 still has a write pending");
        assert_eq!((pending.of(0), pending.of(1), pending.total()), (0, 1, 1));
        pending.finished(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("drained once the last write finished")
            .unwrap();
    }
}
