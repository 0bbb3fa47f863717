//! One emulated device: its connection to the broker (rumqttc v5 over TLS with its own
//! certificate), its protocol session, its directory, and its fault switches. The protocol
//! crate's `DeviceSession` decides everything about messages; this module carries its actions
//! to the broker, stores what it hands out (chunks, state, credentials), installs verified
//! images in steps (check, "pending install" persisted, switch, self-test, commit or rollback,
//! signed final receipt), reconciles an install a crash interrupted when it boots, and plays
//! the faults.
//!
//! A device lives through *incarnations* (a power cycle: identity and state reloaded from
//! disk) made of *connections*. A crash ends an incarnation without saving; going offline or
//! losing the link ends a connection, and the session resumes on the next one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use sealed_ota_protocol::{
    Action, DeviceConfig, DeviceEvent, DeviceSession, DeviceState, FinalOutcome, Identity, Inbound,
    KeyLog, Manifest, PayloadKind, PendingInstall, ReleaseKey, TopicKind, TopicTree, TrustAnchor,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::barrier::TransferBarrier;
use crate::error::{Error, Result};
use crate::faults::DeviceFaults;
use crate::mqtt_io::{self, BrokerEndpoint};
use crate::pacing::{ConnectPacer, HandshakePermit};
use crate::stats::{FleetStats, Outcome};
use crate::store::DeviceDir;

/// What every device of a fleet shares.
#[derive(Debug)]
pub struct FleetContext {
    /// The broker.
    pub endpoint: BrokerEndpoint,
    /// CA the manager's certificate must chain to.
    pub trust: Arc<TrustAnchor>,
    /// Topic tree (prefix and manager id).
    pub topics: Arc<TopicTree>,
    /// Version a device without saved state runs.
    pub initial_version: String,
    /// Maximum Packet Size advertised (unless a fault sets another).
    pub max_packet_size: u32,
    /// Chunk topics subscribed at once.
    pub window: u32,
    /// Seconds before a missing chunk window is requested again.
    pub window_timeout: u64,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How often the session's timers run.
    pub poll_interval: Duration,
    /// State is saved after this many chunks (and at every other event).
    pub save_every_chunks: u32,
    /// Connection pacing.
    pub pacer: ConnectPacer,
    /// Counters.
    pub stats: Arc<FleetStats>,
    /// `run --transfer-barrier`: first chunk windows wait until the whole fleet was offered.
    pub transfer_barrier: Option<TransferBarrier>,
    /// Release public keys the devices trust (from `fleet.json`; empty: not required).
    pub release_keys: Vec<ReleaseKey>,
    /// `run --key-log`: where sessions report their secrets (tests only).
    pub key_log: Option<Arc<dyn KeyLog>>,
    /// `run --health-report-after`: how long after a committed install the device sends its
    /// signed post-install health report (`None`: it sends none).
    pub health_report_after: Option<Duration>,
}

/// How a device ended the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// Device id.
    pub device_id: String,
    /// Version it runs.
    pub running_version: String,
    /// Outcome of the last campaign it saw.
    pub outcome: Outcome,
}

/// How an incarnation ended.
enum IncarnationEnd {
    /// The fleet is shutting down (state saved).
    Shutdown,
    /// Power loss: nothing saved since the last save; back after the delay.
    Crash(Duration),
    /// New credentials were stored: reload identity and reconnect with them.
    Reload,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum ConnectionEnd {
    Shutdown,
    Crash(Duration),
    Reload,
    /// The offline fault: come back after the delay.
    Offline(Duration),
    /// The link failed or the broker refused; try again after a backoff.
    Lost,
}

/// A freshly booted device.
struct Boot {
    session: DeviceSession,
    /// The session's first actions (subscriptions).
    actions: Vec<Action>,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet_size: u32,
}

/// What one received message leads to.
#[derive(Default)]
struct Step {
    /// To send, in order.
    actions: Vec<Action>,
    /// Set when the connection must end.
    end: Option<ConnectionEnd>,
    /// A firmware transfer starts with this step (its chunk-window subscription is in `actions`).
    transfer_starts: bool,
}

/// What the connection task reports.
enum Link {
    Connected,
    Message(Publish),
    Lost(String),
}

/// The current Unix time.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One device of the fleet.
pub struct Device {
    ctx: Arc<FleetContext>,
    id: String,
    dir: DeviceDir,
    faults: DeviceFaults,
    shutdown: watch::Receiver<bool>,
    outcome: Outcome,
    running_version: String,
    connected_before: bool,
    chunks_this_run: u32,
    chunks_since_save: u32,
    failures_in_a_row: u32,
    /// Counted once at the fleet's transfer barrier (when there is one).
    arrived_at_barrier: bool,
    /// Which of the broker's nodes the next connection goes to (modulo their number): devices
    /// start spread over the nodes and move to the next one when a connection is lost.
    node: usize,
    /// When the post-install health report is due (device clock, Unix seconds).
    health_due: Option<u64>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device that has been enrolled in `dir`.
    pub fn new(
        ctx: Arc<FleetContext>,
        id: String,
        dir: DeviceDir,
        faults: DeviceFaults,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Device {
            running_version: ctx.initial_version.clone(),
            ctx,
            id,
            dir,
            faults,
            shutdown,
            outcome: Outcome::Idle,
            connected_before: false,
            chunks_this_run: 0,
            chunks_since_save: 0,
            failures_in_a_row: 0,
            arrived_at_barrier: false,
            node: 0,
            health_due: None,
        }
    }

    /// Starts the device on node `node` of the broker (of several nodes; see [`BrokerEndpoint`]).
    pub fn starting_on_node(mut self, node: usize) -> Self {
        self.node = node;
        self
    }

    /// Runs until the fleet shuts down.
    pub async fn run(mut self) -> DeviceReport {
        loop {
            match self.incarnation().await {
                Ok(IncarnationEnd::Shutdown) => break,
                Ok(IncarnationEnd::Reload) => continue,
                Ok(IncarnationEnd::Crash(down_for)) => {
                    info!(device = %self.id, ?down_for, "crashed during install (fault switch)");
                    if self.sleep_unless_shutdown(down_for).await {
                        break;
                    }
                }
                Err(e) => {
                    warn!(device = %self.id, error = %e, "device stopped on an error; restarting");
                    let wait = self.backoff();
                    if self.sleep_unless_shutdown(wait).await {
                        break;
                    }
                }
            }
        }
        DeviceReport {
            device_id: self.id,
            running_version: self.running_version,
            outcome: self.outcome,
        }
    }

    /// Exponential backoff with up to 1 s of jitter: 2 s after the first failure, doubling, at
    /// most 60 s.
    fn backoff(&mut self) -> Duration {
        use rand::Rng;
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let base = 1u64 << self.failures_in_a_row.min(6);
        let jitter = rand::thread_rng().gen_range(0..1000);
        Duration::from_secs(base.min(60)) + Duration::from_millis(jitter)
    }

    /// Sleeps; true when the fleet shut down meanwhile.
    async fn sleep_unless_shutdown(&mut self, duration: Duration) -> bool {
        if *self.shutdown.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => *self.shutdown.borrow(),
            _ = self.shutdown.changed() => true,
        }
    }

    fn set_outcome(&mut self, outcome: Outcome) {
        self.ctx.stats.transition(self.outcome, outcome);
        self.outcome = outcome;
    }

    fn now(&self) -> u64 {
        self.faults.device_now(unix_now())
    }

    /// Persists the session state (fsynced). The chunks it says are stored are flushed first, so
    /// after a power loss the state never claims data the disk lost.
    fn save(&mut self, session: &DeviceSession) -> Result<()> {
        if self.chunks_since_save > 0 {
            self.dir.sync_download()?;
        }
        self.chunks_since_save = 0;
        self.running_version = session.state().running_version.clone();
        self.dir.save_state(session.state())
    }

    /// Power on: clean what a crash left, load identity and state from the directory, and
    /// start a protocol session (its first actions subscribe to notify and update).
    fn boot(&mut self) -> Result<Boot> {
        self.dir.recover_after_crash()?;
        let (cert_pem, key_pem) = self.dir.read_credentials()?;
        let identity =
            Identity::from_pem(&cert_pem, &key_pem).map_err(|source| Error::Identity {
                subject: self.id.clone(),
                source,
            })?;
        let tls = self
            .ctx
            .endpoint
            .device_tls(&self.id, &cert_pem, &key_pem)?;
        drop(key_pem);
        let state = self
            .dir
            .load_state::<DeviceState>()?
            .unwrap_or_else(|| DeviceState::new(&self.ctx.initial_version));
        self.running_version = state.running_version.clone();
        let max_packet_size = self.faults.max_packet_size(self.ctx.max_packet_size);
        let config = DeviceConfig {
            identity: Arc::new(identity),
            trust: Arc::clone(&self.ctx.trust),
            topics: Arc::clone(&self.ctx.topics),
            manager_id: self.ctx.topics.manager_id().to_string(),
            max_packet_size,
            window: self.ctx.window,
            release_keys: self.ctx.release_keys.clone(),
        };
        let (mut session, mut actions) = DeviceSession::new(config, state);
        session.set_window_timeout(self.ctx.window_timeout);
        if let Some(log) = &self.ctx.key_log {
            session.set_key_log(Arc::clone(log));
        }
        if let Some(pending) = session.state().pending_install.clone() {
            // Power was lost between "pending install" and the final receipt: finish the install
            // from what is on disk and report the outcome once connected.
            actions.extend(self.reconcile_install(&mut session, &pending)?);
        }
        Ok(Boot {
            session,
            actions,
            tls,
            max_packet_size,
        })
    }

    /// Boots from disk and runs connections until shutdown, crash or credential change.
    async fn incarnation(&mut self) -> Result<IncarnationEnd> {
        let Boot {
            mut session,
            actions: mut first_actions,
            tls,
            max_packet_size,
        } = self.boot()?;
        let mut resumed_connection = false;
        loop {
            if *self.shutdown.borrow() {
                self.save(&session)?;
                return Ok(IncarnationEnd::Shutdown);
            }
            let actions = if resumed_connection {
                session.on_reconnect(self.now())
            } else {
                std::mem::take(&mut first_actions)
            };
            let end = self
                .connection(&mut session, tls.clone(), max_packet_size, actions)
                .await?;
            resumed_connection = true;
            match end {
                ConnectionEnd::Shutdown => {
                    self.save(&session)?;
                    return Ok(IncarnationEnd::Shutdown);
                }
                ConnectionEnd::Crash(down_for) => return Ok(IncarnationEnd::Crash(down_for)),
                ConnectionEnd::Reload => {
                    self.save(&session)?;
                    return Ok(IncarnationEnd::Reload);
                }
                ConnectionEnd::Offline(away_for) => {
                    self.save(&session)?;
                    info!(device = %self.id, ?away_for, "going offline (fault switch)");
                    if self.sleep_unless_shutdown(away_for).await {
                        return Ok(IncarnationEnd::Shutdown);
                    }
                }
                ConnectionEnd::Lost => {
                    // A lost node may be gone for good: try the next one.
                    self.node = self.node.wrapping_add(1);
                    let wait = self.backoff();
                    if self.sleep_unless_shutdown(wait).await {
                        self.save(&session)?;
                        return Ok(IncarnationEnd::Shutdown);
                    }
                }
            }
        }
    }

    /// One MQTT connection: handshake (paced), then messages and timers until it ends.
    async fn connection(
        &mut self,
        session: &mut DeviceSession,
        tls: Option<Arc<rustls::ClientConfig>>,
        max_packet_size: u32,
        actions: Vec<Action>,
    ) -> Result<ConnectionEnd> {
        let permit = tokio::select! {
            permit = self.ctx.pacer.acquire() => permit,
            _ = self.shutdown.changed() => return Ok(ConnectionEnd::Shutdown),
        };
        self.ctx.stats.connect_attempt();
        let options = mqtt_io::device_options_on(
            self.ctx.endpoint.node(self.node),
            &self.id,
            tls,
            max_packet_size,
            self.ctx.keep_alive,
        );
        let (client, eventloop) = AsyncClient::new(options, 32);
        let (link_tx, mut link_rx) = mpsc::channel(4);
        let pump = tokio::spawn(pump(eventloop, link_tx, permit));
        let connected = tokio::select! {
            link = link_rx.recv() => matches!(link, Some(Link::Connected)),
            _ = self.shutdown.changed() => {
                pump.abort();
                return Ok(ConnectionEnd::Shutdown);
            }
        };
        if !connected {
            self.ctx.stats.connect_failed();
            pump.abort();
            return Ok(ConnectionEnd::Lost);
        }
        self.ctx.stats.connected(!self.connected_before);
        self.connected_before = true;
        self.failures_in_a_row = 0;
        let end = self
            .connected(session, &client, &mut link_rx, actions)
            .await;
        self.ctx.stats.disconnected();
        drop(link_rx);
        finish_connection(&client, pump, matches!(end, Ok(ConnectionEnd::Crash(_)))).await;
        end
    }

    async fn connected(
        &mut self,
        session: &mut DeviceSession,
        client: &AsyncClient,
        link_rx: &mut mpsc::Receiver<Link>,
        actions: Vec<Action>,
    ) -> Result<ConnectionEnd> {
        if mqtt_io::perform(client, actions).await.is_err() {
            return Ok(ConnectionEnd::Lost);
        }
        let mut timers = tokio::time::interval(self.ctx.poll_interval);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                link = link_rx.recv() => match link {
                    Some(Link::Message(publish)) => {
                        if let Some(end) = self.on_message(session, client, publish).await? {
                            return Ok(end);
                        }
                    }
                    Some(Link::Connected) => {}
                    Some(Link::Lost(reason)) => {
                        debug!(device = %self.id, %reason, "connection lost");
                        return Ok(ConnectionEnd::Lost);
                    }
                    None => return Ok(ConnectionEnd::Lost),
                },
                _ = timers.tick() => {
                    let now = self.now();
                    let output = session.poll_output(now);
                    let mut actions = output.actions;
                    actions.extend(self.health_report(session, now));
                    for event in output.events {
                        // Only the end of a session at the campaign's expiry (Rejected): nothing
                        // here ends the connection.
                        actions.extend(self.on_event(session, event, now)?.0);
                    }
                    if mqtt_io::perform(client, actions).await.is_err() {
                        return Ok(ConnectionEnd::Lost);
                    }
                }
                _ = self.shutdown.changed() => return Ok(ConnectionEnd::Shutdown),
            }
        }
    }

    /// Receives one message: the slow-link fault, then [`Device::process`], then the actions go
    /// out (unless the device crashed: a power loss sends nothing).
    async fn on_message(
        &mut self,
        session: &mut DeviceSession,
        client: &AsyncClient,
        publish: Publish,
    ) -> Result<Option<ConnectionEnd>> {
        self.ctx.stats.received(publish.payload.len());
        if let Some(delay) = self.faults.slow_link_delay(publish.payload.len()) {
            // Not reading meanwhile: the broker's queue and TCP window fill, as on a slow link.
            tokio::time::sleep(delay).await;
        }
        let inbound = mqtt_io::inbound_from(&publish);
        drop(publish);
        let step = self.process(session, inbound)?;
        if matches!(step.end, Some(ConnectionEnd::Crash(_))) {
            return Ok(step.end);
        }
        let mut actions = step.actions;
        if let (true, Some(barrier)) = (step.transfer_starts, &self.ctx.transfer_barrier) {
            if !self.arrived_at_barrier {
                self.arrived_at_barrier = true;
                barrier.arrive();
            }
            // The window subscription waits for the fleet; the connection keeps being served.
            let (windows, now): (Vec<Action>, Vec<Action>) = actions
                .into_iter()
                .partition(|a| matches!(a, Action::Subscribe(_)));
            actions = now;
            let ctx = Arc::clone(&self.ctx);
            let client = client.clone();
            tokio::spawn(async move {
                if let Some(barrier) = &ctx.transfer_barrier {
                    barrier.wait().await;
                }
                // A lost connection shows in the device's own loop, which resubscribes.
                let _ = mqtt_io::perform(&client, windows).await;
            });
        }
        if mqtt_io::perform(client, actions).await.is_err() {
            return Ok(Some(ConnectionEnd::Lost));
        }
        Ok(step.end)
    }

    /// Feeds one message to the session (after the wire bit-flip fault) and acts on its events:
    /// stores chunks, installs, stores credentials, plays the faults. Returns what to send and
    /// whether the connection ends. No network I/O, so tests drive it with an in-memory broker.
    fn process(&mut self, session: &mut DeviceSession, mut inbound: Inbound) -> Result<Step> {
        let is_chunk = matches!(
            self.ctx.topics.parse(&inbound.topic),
            Ok(TopicKind::Chunk { .. })
        );
        if is_chunk
            && self
                .faults
                .tamper_received(&mut inbound.payload, &mut rand::thread_rng())
        {
            debug!(device = %self.id, topic = %inbound.topic, "flipped a bit of a received chunk (fault switch)");
        }
        let now = self.now();
        let output = match session.handle(&inbound, now) {
            Ok(output) => output,
            Err(e) => {
                self.ctx.stats.message_rejected();
                debug!(device = %self.id, topic = %inbound.topic, error = %e, kind = e.metric_label(), "message rejected by the protocol");
                return Ok(Step::default());
            }
        };
        let refused_offer = self.faults.refusal().is_some()
            && output
                .events
                .iter()
                .any(|e| matches!(e, DeviceEvent::UpdateOffered { .. }));
        let transfer_starts = !refused_offer
            && output.events.iter().any(|e| {
                matches!(e, DeviceEvent::UpdateOffered { manifest } if manifest.kind == PayloadKind::Firmware)
            });
        // A refusing device sends neither the acceptance nor the chunk subscription.
        let mut step = Step {
            actions: if refused_offer {
                Vec::new()
            } else {
                output.actions
            },
            end: None,
            transfer_starts,
        };
        // Every event is handled even when one ends the connection (going offline on the last
        // chunk must not lose the ImageComplete that follows it); only a crash stops at once.
        for event in output.events {
            let (actions, end) = self.on_event(session, event, now)?;
            step.actions.extend(actions);
            match end {
                Some(ConnectionEnd::Crash(down_for)) => {
                    step.end = Some(ConnectionEnd::Crash(down_for));
                    break;
                }
                Some(end) if step.end.is_none() => step.end = Some(end),
                _ => {}
            }
        }
        Ok(step)
    }

    fn on_event(
        &mut self,
        session: &mut DeviceSession,
        event: DeviceEvent,
        now: u64,
    ) -> Result<(Vec<Action>, Option<ConnectionEnd>)> {
        let mut actions = Vec::new();
        let mut end = None;
        match event {
            DeviceEvent::UpdateOffered { manifest } => {
                if let Some(reason) = self.faults.refusal() {
                    info!(device = %self.id, campaign = %manifest.campaign_id, "declining the update (fault switch)");
                    actions = session.decline(reason, now);
                    self.set_outcome(Outcome::Rejected);
                } else {
                    self.start_transfer(session, &manifest)?;
                }
                self.save(session)?;
            }
            DeviceEvent::Chunk { offset, data, .. } => {
                self.dir.write_chunk(offset, &data)?;
                if let Some((at, bit)) = self
                    .faults
                    .storage_flip(data.len(), &mut rand::thread_rng())
                {
                    self.dir.flip_stored_bit(offset + at, bit)?;
                }
                self.ctx.stats.chunk();
                self.chunks_this_run += 1;
                self.chunks_since_save += 1;
                if self.outcome != Outcome::Transferring {
                    self.set_outcome(Outcome::Transferring);
                }
                if let Some(away_for) = self.faults.offline_now(self.chunks_this_run) {
                    end = Some(ConnectionEnd::Offline(away_for));
                } else if self.chunks_since_save >= self.ctx.save_every_chunks {
                    self.save(session)?;
                }
            }
            DeviceEvent::ImageComplete { manifest } => {
                if let Err(e) = self.dir.check_download(manifest.size, &manifest.sha256) {
                    warn!(device = %self.id, campaign = %manifest.campaign_id, error = %e, "received image refused");
                    self.set_outcome(Outcome::Failed);
                    self.dir.discard_download()?;
                    actions = session.finish_install(Err(e.to_string()), now);
                    self.save(session)?;
                    return Ok((actions, end));
                }
                let pending = match session.stage_install(now) {
                    Ok(pending) => pending,
                    Err(refusal) => {
                        info!(device = %self.id, campaign = %manifest.campaign_id, "not installing: the campaign expired");
                        self.set_outcome(Outcome::Rejected);
                        self.dir.discard_download()?;
                        self.save(session)?;
                        return Ok((refusal, end));
                    }
                };
                // "Pending install" is on disk before the image is switched.
                self.save(session)?;
                if let Some(down_for) = self.faults.crash_on_install() {
                    // Power loss half-way through writing the image: nothing else is saved.
                    self.dir.interrupt_install()?;
                    return Ok((Vec::new(), Some(ConnectionEnd::Crash(down_for))));
                }
                actions = self.install_staged(session, &pending, now)?;
            }
            DeviceEvent::CredentialsDelivered { cert_pem, key_pem } => {
                // Validated by the session (chain, name, key match); the signed Installed status
                // already went out with the old identity. The next connection uses the new one.
                self.dir.write_credentials(&cert_pem, &key_pem)?;
                info!(device = %self.id, "new credentials stored; reconnecting with them");
                self.set_outcome(Outcome::Installed);
                self.save(session)?;
                end = Some(ConnectionEnd::Reload);
            }
            DeviceEvent::Aborted { campaign_id } => {
                info!(device = %self.id, campaign = %campaign_id, "the manager aborted the session (signed abort)");
                if self.outcome == Outcome::Transferring {
                    self.set_outcome(Outcome::Idle);
                }
                self.save(session)?;
            }
            DeviceEvent::Rejected { reason } => {
                info!(device = %self.id, %reason, "update rejected by the device");
                self.set_outcome(Outcome::Rejected);
                self.dir.discard_download()?;
                self.save(session)?;
            }
        }
        Ok((actions, end))
    }

    /// Switches to the staged image, then finishes the install ([`Device::finish_switched`]).
    fn install_staged(
        &mut self,
        session: &mut DeviceSession,
        pending: &PendingInstall,
        now: u64,
    ) -> Result<Vec<Action>> {
        self.dir
            .switch_image(&pending.version, pending.size, &pending.sha256)?;
        self.finish_switched(session, pending, now)
    }

    /// The staged image is in place: run the self-test (the `selftest-fail` fault fails it),
    /// commit or roll back, and return the signed final receipt; the state is saved after.
    fn finish_switched(
        &mut self,
        session: &mut DeviceSession,
        pending: &PendingInstall,
        now: u64,
    ) -> Result<Vec<Action>> {
        let failure = self.faults.self_test_failure().map(str::to_string);
        let outcome = match failure {
            Some(reason) => {
                self.dir.roll_back_image()?;
                warn!(device = %self.id, campaign = %pending.campaign_id, version = %pending.version, %reason, "self-test failed: rolled back (fault switch)");
                self.set_outcome(Outcome::RolledBack);
                FinalOutcome::RolledBack { reason }
            }
            None => {
                self.dir.commit_image()?;
                info!(device = %self.id, version = %pending.version, "image verified, installed and committed");
                self.set_outcome(Outcome::Installed);
                self.health_due = self
                    .ctx
                    .health_report_after
                    .map(|after| now + after.as_secs());
                FinalOutcome::Committed
            }
        };
        let actions = session.report_final(outcome, now);
        self.save(session)?;
        Ok(actions)
    }

    /// The signed post-install health report, once it is due: healthy unless the `unhealthy`
    /// fault says otherwise.
    fn health_report(&mut self, session: &DeviceSession, now: u64) -> Option<Action> {
        if self.health_due.is_none_or(|due| due > now) {
            return None;
        }
        self.health_due = None;
        let failure = self.faults.unhealthy();
        let detail = failure.unwrap_or("post-install health check passed");
        let report = session.health_report(failure.is_none(), detail, now)?;
        info!(device = %self.id, healthy = failure.is_none(), %detail, "signed health report");
        self.ctx.stats.health_reported(failure.is_none());
        Some(report)
    }

    /// After a boot with an install pending: what is on disk decides (see [`reconcile`]).
    fn reconcile_install(
        &mut self,
        session: &mut DeviceSession,
        pending: &PendingInstall,
    ) -> Result<Vec<Action>> {
        let installed = self.dir.installed_sha256()?;
        let download = self.dir.download_matches(&pending.sha256)?;
        let now = self.now();
        match reconcile(pending, installed, download) {
            Reconcile::Switched => {
                info!(device = %self.id, campaign = %pending.campaign_id, "install was switched before the restart: finishing it");
                self.finish_switched(session, pending, now)
            }
            Reconcile::SwitchAgain => {
                info!(device = %self.id, campaign = %pending.campaign_id, "install interrupted before the switch: installing again");
                self.install_staged(session, pending, now)
            }
            Reconcile::Lost => {
                warn!(device = %self.id, campaign = %pending.campaign_id, "install interrupted and the received image is gone: reporting a rollback");
                self.set_outcome(Outcome::RolledBack);
                let actions = session.report_final(
                    FinalOutcome::RolledBack {
                        reason: "install interrupted by a power loss; the received image was lost"
                            .into(),
                    },
                    now,
                );
                self.save(session)?;
                Ok(actions)
            }
        }
    }

    /// An update was accepted: a fresh transfer starts from an empty image file, a resumed one
    /// keeps what is on disk.
    fn start_transfer(&mut self, session: &DeviceSession, manifest: &Manifest) -> Result<()> {
        if manifest.kind != PayloadKind::Firmware {
            return Ok(());
        }
        let resumed = session
            .state()
            .transfer
            .as_ref()
            .is_some_and(|t| t.campaign_id == manifest.campaign_id && t.received.count() > 0);
        if !resumed {
            self.dir.discard_download()?;
        }
        debug!(device = %self.id, campaign = %manifest.campaign_id, resumed, "transfer starts");
        self.set_outcome(Outcome::Transferring);
        Ok(())
    }
}

/// What a boot finds of an install that was pending when power was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconcile {
    /// The installed image is the pending one: the switch happened; finish it.
    Switched,
    /// The old image still runs and the received one is intact: switch again.
    SwitchAgain,
    /// Neither: the install cannot be finished (reported as a rollback).
    Lost,
}

/// Decide how to finish a pending install from what is on disk (pure).
fn reconcile(
    pending: &PendingInstall,
    installed_sha256: Option<[u8; 32]>,
    download_matches: bool,
) -> Reconcile {
    if installed_sha256 == Some(pending.sha256) {
        Reconcile::Switched
    } else if download_matches {
        Reconcile::SwitchAgain
    } else {
        Reconcile::Lost
    }
}

/// Drives rumqttc's event loop and forwards what the device needs. Holds the pacing permit
/// until the handshake ends. Ends at the first error: the device decides when to reconnect.
/// Once the device stops listening it keeps polling, so a queued DISCONNECT still goes out.
async fn pump(mut eventloop: EventLoop, link: mpsc::Sender<Link>, permit: HandshakePermit) {
    let mut permit = Some(permit);
    loop {
        let report = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                permit.take();
                Link::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Link::Message(publish),
            Ok(Event::Incoming(Packet::Disconnect(disconnect))) => {
                let reason = format!("broker disconnected: {:?}", disconnect.reason_code);
                let _ = link.send(Link::Lost(reason)).await;
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                let _ = link.send(Link::Lost(e.to_string())).await;
                return;
            }
        };
        if !link.is_closed() {
            let _ = link.send(report).await;
        }
    }
}

/// Ends a connection: a graceful DISCONNECT (flushing queued publishes) unless the device
/// crashed, then stops the event loop.
async fn finish_connection(client: &AsyncClient, mut pump: JoinHandle<()>, crashed: bool) {
    if !crashed && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut pump).await;
    }
    pump.abort();
}

#[cfg(test)]
mod tests {
    //! The device's handling of a campaign and of each fault switch, against a manager session
    //! and a broker in memory (retained messages, exact-topic subscriptions): the same
    //! `Device::process` the connection loop uses, without sockets.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use rand::Rng;
    use sealed_ota_protocol::{
        CampaignPayload, CampaignSpec, CertificateAuthority, DeviceTarget, ManagerConfig,
        ManagerEvent, ManagerSession, Outbound, PreparedCampaign, RejectReason, Role, RotationMode,
    };

    use super::*;
    use crate::faults::FaultSpec;

    const CHUNK: u32 = 1024;
    const CHUNKS: u32 = 10;
    const DEVICE: &str = "dev-00000";

    struct World {
        _tmp: tempfile::TempDir,
        ctx: Arc<FleetContext>,
        dir: DeviceDir,
        device: Device,
        session: DeviceSession,
        manager: ManagerSession,
        campaign: Arc<PreparedCampaign>,
        retained: BTreeMap<String, Outbound>,
        subscribed: BTreeSet<String>,
        to_device: VecDeque<Inbound>,
        manager_events: Vec<ManagerEvent>,
        image: Vec<u8>,
        _shutdown: watch::Sender<bool>,
    }

    /// What the world's campaign delivers.
    #[derive(Clone, Copy)]
    enum Delivers {
        Firmware,
        Credentials(RotationMode),
    }

    impl World {
        fn new(faults: &[&str]) -> Self {
            Self::with(faults, 1, Delivers::Firmware)
        }

        fn with(faults: &[&str], save_every_chunks: u32, delivers: Delivers) -> Self {
            Self::build(faults, save_every_chunks, delivers, Vec::new())
        }

        fn build(
            faults: &[&str],
            save_every_chunks: u32,
            delivers: Delivers,
            release_keys: Vec<ReleaseKey>,
        ) -> Self {
            let now = unix_now();
            let tmp = tempfile::tempdir().unwrap();
            let ca = Arc::new(CertificateAuthority::generate("test-ca", now, 1).unwrap());
            let topics = Arc::new(TopicTree::new("iot", "manager").unwrap());
            let dir = DeviceDir::at(tmp.path().join(DEVICE));
            let identity = ca.issue(Role::Device, DEVICE, now, 1).unwrap();
            dir.write_credentials(&identity.cert_pem(), &identity.key_pem())
                .unwrap();
            let ctx = Arc::new(FleetContext {
                endpoint: BrokerEndpoint::parse("mqtt://127.0.0.1:1883", None).unwrap(),
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::clone(&topics),
                initial_version: "1.0.0".into(),
                max_packet_size: 64 * 1024,
                window: 4,
                window_timeout: 30,
                keep_alive: Duration::from_secs(60),
                poll_interval: Duration::from_secs(1),
                save_every_chunks,
                pacer: ConnectPacer::new(1000.0, 10),
                stats: Arc::new(FleetStats::new(1)),
                transfer_barrier: None,
                release_keys,
                key_log: None,
                health_report_after: Some(Duration::from_secs(2)),
            });
            let specs: Vec<FaultSpec> = faults.iter().map(|f| f.parse().unwrap()).collect();
            let (shutdown, shutdown_rx) = watch::channel(false);
            let mut device = Device::new(
                Arc::clone(&ctx),
                DEVICE.into(),
                dir.clone(),
                DeviceFaults::for_device(&specs, DEVICE, 0),
                shutdown_rx,
            );
            let mut image = vec![0u8; (CHUNK * CHUNKS - 100) as usize];
            rand::thread_rng().fill(&mut image[..]);
            let payload = match delivers {
                Delivers::Firmware => CampaignPayload::Firmware {
                    image: image.clone(),
                },
                Delivers::Credentials(mode) => CampaignPayload::RotateCredentials {
                    mode,
                    ca: Arc::clone(&ca),
                    validity_days: 1,
                },
            };
            let campaign = Arc::new(
                PreparedCampaign::prepare(CampaignSpec {
                    campaign_id: "fw-1".into(),
                    target_version: "1.1.0".into(),
                    payload,
                    expires_at: now + 3600,
                    chunk_size: CHUNK,
                    release: None,
                })
                .unwrap(),
            );
            let manager_config = ManagerConfig {
                identity: Arc::new(ca.issue(Role::Manager, "manager", now, 1).unwrap()),
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::clone(&topics),
            };
            let target = DeviceTarget {
                device_id: DEVICE.into(),
                pinned_fingerprint: None,
                allow_downgrade: false,
            };
            let (manager, notify) =
                ManagerSession::start(&manager_config, Arc::clone(&campaign), target, now).unwrap();
            let boot = device.boot().unwrap();
            let mut world = World {
                _tmp: tmp,
                ctx,
                dir,
                device,
                session: boot.session,
                manager,
                campaign,
                retained: BTreeMap::new(),
                subscribed: BTreeSet::new(),
                to_device: VecDeque::new(),
                manager_events: Vec::new(),
                image,
                _shutdown: shutdown,
            };
            let chunks = world.campaign.chunk_publishes(&world.ctx.topics);
            chunks.into_iter().for_each(|c| world.publish(c));
            world.route_manager_actions(notify);
            world.route_device_actions(boot.actions);
            world
        }

        fn publish(&mut self, out: Outbound) {
            if out.retain {
                if out.payload.is_empty() {
                    self.retained.remove(&out.topic);
                } else {
                    self.retained.insert(out.topic.clone(), out.clone());
                }
            }
            if self.subscribed.contains(&out.topic) {
                self.to_device.push_back(out.to_inbound());
            }
        }

        fn route_manager_actions(&mut self, actions: Vec<Action>) {
            for action in actions {
                if let Action::Publish(out) = action {
                    self.publish(out);
                }
            }
        }

        fn route_device_actions(&mut self, actions: Vec<Action>) {
            for action in actions {
                match action {
                    Action::Subscribe(topics) => {
                        for topic in topics {
                            if let Some(retained) = self.retained.get(&topic) {
                                self.to_device.push_back(retained.to_inbound());
                            }
                            self.subscribed.insert(topic);
                        }
                    }
                    Action::Unsubscribe(topics) => {
                        topics.iter().for_each(|t| {
                            self.subscribed.remove(t);
                        });
                    }
                    Action::Publish(out) => {
                        let Ok(output) = self.manager.handle(&out.to_inbound(), unix_now()) else {
                            continue;
                        };
                        self.route_manager_actions(output.actions);
                        for event in output.events {
                            if let ManagerEvent::ChunksRequested { indices } = &event {
                                for &index in indices {
                                    let chunk =
                                        self.campaign.chunk_publish(&self.ctx.topics, index);
                                    self.publish(chunk);
                                }
                            }
                            self.manager_events.push(event);
                        }
                    }
                }
            }
        }

        /// Delivers queued messages until none is left, the connection ends, or `stop` holds.
        fn run_until(&mut self, stop: impl Fn(&World) -> bool) -> Option<ConnectionEnd> {
            while let Some(message) = self.to_device.pop_front() {
                let step = self.device.process(&mut self.session, message).unwrap();
                if !matches!(step.end, Some(ConnectionEnd::Crash(_))) {
                    self.route_device_actions(step.actions);
                }
                if step.end.is_some() {
                    return step.end;
                }
                if stop(self) {
                    return None;
                }
            }
            None
        }

        fn run(&mut self) -> Option<ConnectionEnd> {
            self.run_until(|_| false)
        }

        /// The connection drops; the same session continues on a new one.
        fn reconnect(&mut self) {
            self.subscribed.clear();
            self.to_device.clear();
            let actions = self.session.on_reconnect(unix_now());
            self.route_device_actions(actions);
        }

        /// The device loses power (or the emulator is killed) and boots from its directory.
        fn reboot(&mut self) {
            self.subscribed.clear();
            self.to_device.clear();
            let boot = self.device.boot().unwrap();
            self.session = boot.session;
            self.route_device_actions(boot.actions);
        }

        fn chunks(&self) -> u64 {
            self.ctx.stats.summary(Default::default()).chunks_received
        }

        fn installed(&self) -> bool {
            self.manager_events
                .iter()
                .any(|e| matches!(e, ManagerEvent::Installed { version, .. } if version == "1.1.0"))
        }

        fn rejection(&self) -> Option<RejectReason> {
            self.manager_events.iter().find_map(|e| match e {
                ManagerEvent::Rejected { reason, .. } => Some(reason.clone()),
                _ => None,
            })
        }

        fn state_on_disk(&self) -> DeviceState {
            self.dir.load_state().unwrap().expect("state saved")
        }
    }

    #[test]
    fn installs_only_after_the_hash_check_then_switches_the_version() {
        let mut world = World::new(&[]);
        assert_eq!(world.run(), None);
        assert!(world.installed(), "{:?}", world.manager_events);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
        assert_eq!(
            std::fs::read(world.dir.firmware_path()).unwrap(),
            world.image
        );
        let state = world.state_on_disk();
        assert_eq!(state.running_version, "1.1.0");
        assert!(state.transfer.is_none());
        assert_eq!(world.device.outcome, Outcome::Installed);
        // The retained notify seen again after a reboot does not start the campaign over.
        world.reboot();
        assert_eq!(world.run(), None);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
    }

    #[test]
    fn a_rebooted_device_resumes_with_the_chunks_it_saved() {
        let mut world = World::new(&[]);
        world.run_until(|w| w.chunks() == 6);
        let saved = world.state_on_disk().transfer.unwrap().received.count();
        assert_eq!(saved, 6);
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            world.chunks(),
            u64::from(CHUNKS),
            "no chunk travelled twice"
        );
        assert_eq!(
            std::fs::read(world.dir.firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn state_saved_less_often_than_chunks_lags_the_data_never_leads_it() {
        let mut world = World::with(&[], 4, Delivers::Firmware);
        world.run_until(|w| w.chunks() == 6);
        assert_eq!(world.state_on_disk().transfer.unwrap().received.count(), 4);
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            world.chunks(),
            u64::from(CHUNKS) + 2,
            "two chunks fetched again"
        );
        assert_eq!(
            std::fs::read(world.dir.firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn refuse_sends_a_signed_decline_and_takes_no_chunk() {
        let mut world = World::new(&["refuse:reason=maintenance"]);
        world.run();
        assert_eq!(
            world.rejection(),
            Some(RejectReason::DeclinedByDevice("maintenance".into()))
        );
        assert_eq!(world.chunks(), 0);
        assert_eq!(world.device.outcome, Outcome::Rejected);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn storage_bitflip_fails_the_install_and_keeps_the_running_version() {
        let mut world = World::new(&["bitflip:p=1,where=storage"]);
        world.run();
        assert_eq!(world.rejection(), Some(RejectReason::ImageHashMismatch));
        assert_eq!(world.device.outcome, Outcome::Failed);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
        assert!(!world.dir.firmware_path().exists());
    }

    #[test]
    fn wire_bitflip_chunks_are_refused_and_requested_again() {
        let mut world = World::new(&["bitflip:p=1,where=wire"]);
        world.run();
        assert_eq!(world.chunks(), 0, "no tampered chunk is accepted");
        assert_eq!(
            world.ctx.stats.messages_rejected(),
            4,
            "the whole window refused"
        );
        // After the window timeout the device asks for the chunks again.
        let actions = world.session.poll(unix_now() + 31);
        world.route_device_actions(actions);
        assert!(world
            .manager_events
            .iter()
            .any(|e| matches!(e, ManagerEvent::ChunksRequested { indices } if indices.len() == 4)));
        world.run();
        assert_eq!(world.ctx.stats.messages_rejected(), 8);
        assert!(!world.installed());
    }

    #[test]
    fn offline_after_k_chunks_ends_the_connection_and_the_session_resumes() {
        let mut world = World::new(&["offline:after=3,for=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Offline(Duration::from_secs(1)))
        );
        assert_eq!(world.chunks(), 3);
        world.reconnect();
        assert_eq!(world.run(), None, "offline fires once");
        assert!(world.installed());
        assert_eq!(world.chunks(), u64::from(CHUNKS));
    }

    #[test]
    fn offline_on_the_last_chunk_still_completes_the_image() {
        let mut world = World::new(&[&format!("offline:after={CHUNKS},for=1s")]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Offline(Duration::from_secs(1)))
        );
        assert!(
            world.installed(),
            "the install went out before going offline"
        );
    }

    #[test]
    fn crash_during_install_keeps_the_old_version_and_installs_after_reboot() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Crash(Duration::from_secs(1)))
        );
        assert!(world.dir.root().join("firmware.staging").exists());
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
        assert!(!world.installed());
        world.reboot();
        assert!(!world.dir.root().join("firmware.staging").exists());
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            std::fs::read(world.dir.firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn a_small_maximum_packet_size_refuses_the_update() {
        let mut world = World::new(&["max-packet:bytes=1024"]);
        world.run();
        assert!(
            matches!(
                world.rejection(),
                Some(RejectReason::PacketTooLarge {
                    max_packet_size: 1024,
                    ..
                })
            ),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.chunks(), 0);
    }

    #[test]
    fn a_committed_install_is_followed_by_a_signed_health_report_the_fault_can_fail() {
        for (faults, healthy) in [
            (&[][..], true),
            (&["unhealthy:reason=watchdog resets"][..], false),
        ] {
            let mut world = World::new(faults);
            assert_eq!(world.run(), None);
            assert!(world.installed());
            let verifier = world.manager.health_verifier().expect("installed firmware");
            let now = unix_now();
            assert!(
                world.device.health_report(&world.session, now).is_none(),
                "not due before --health-report-after"
            );
            let Some(Action::Publish(report)) = world.device.health_report(&world.session, now + 3)
            else {
                panic!("the report is due");
            };
            let verified = verifier.verify(&report.payload).unwrap();
            assert_eq!(verified.healthy, healthy, "{faults:?}");
            if !healthy {
                assert_eq!(verified.detail, "watchdog resets");
            }
            assert!(
                world
                    .device
                    .health_report(&world.session, now + 10)
                    .is_none(),
                "sent once"
            );
            assert_eq!(
                world.ctx.stats.health_reports(),
                (u64::from(healthy), u64::from(!healthy))
            );
        }
    }

    #[test]
    fn a_failed_self_test_rolls_back_and_is_reported_signed() {
        let mut world = World::new(&["selftest-fail:reason=watchdog reset"]);
        assert_eq!(world.run(), None);
        assert!(!world.installed());
        assert!(
            world.manager_events.iter().any(|e| matches!(
                e,
                ManagerEvent::RolledBack { version, reason, .. }
                    if version == "1.1.0" && reason == "watchdog reset"
            )),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.device.outcome, Outcome::RolledBack);
        let state = world.state_on_disk();
        assert_eq!(state.running_version, "1.0.0");
        assert!(state.pending_install.is_none());
        // This was the device's first image: nothing to go back to, nothing installed.
        assert!(!world.dir.firmware_path().exists());
        // Rebooting does not try again.
        world.reboot();
        assert_eq!(world.run(), None);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
    }

    /// The install is persisted as pending before the switch: a power loss right after the switch
    /// is finished at boot, and the signed receipt goes out bound to the session the image came in.
    #[test]
    fn a_power_loss_after_the_switch_is_committed_at_boot() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Crash(Duration::from_secs(1)))
        );
        let pending = world
            .state_on_disk()
            .pending_install
            .expect("persisted first");
        assert_eq!(pending.version, "1.1.0");
        // The switch itself completed before the power went.
        world
            .dir
            .switch_image(&pending.version, pending.size, &pending.sha256)
            .unwrap();
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed(), "{:?}", world.manager_events);
        assert_eq!(world.state_on_disk().running_version, "1.1.0");
        assert!(world.state_on_disk().pending_install.is_none());
        assert_eq!(
            std::fs::read(world.dir.firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn a_pending_install_whose_image_was_lost_is_reported_as_rolled_back() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        world.run();
        std::fs::remove_file(world.dir.root().join("download.part")).unwrap();
        world.reboot();
        world.run();
        assert!(!world.installed());
        assert!(world
            .manager_events
            .iter()
            .any(|e| matches!(e, ManagerEvent::RolledBack { .. })));
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn reconciling_a_pending_install() {
        let pending = PendingInstall {
            campaign_id: "c".into(),
            binding: sealed_ota_protocol::SessionBinding {
                session_id: [0; 16],
                transcript: [0; 32],
                issued_at: 0,
            },
            version: "2.0.0".into(),
            sha256: [7; 32],
            size: 1,
            release_key: None,
        };
        assert_eq!(
            reconcile(&pending, Some([7; 32]), false),
            Reconcile::Switched
        );
        assert_eq!(
            reconcile(&pending, Some([7; 32]), true),
            Reconcile::Switched
        );
        assert_eq!(
            reconcile(&pending, Some([1; 32]), true),
            Reconcile::SwitchAgain
        );
        assert_eq!(reconcile(&pending, None, true), Reconcile::SwitchAgain);
        assert_eq!(reconcile(&pending, None, false), Reconcile::Lost);
    }

    #[test]
    fn a_device_enrolled_with_a_release_key_refuses_unsigned_firmware() {
        let key = sealed_ota_protocol::ReleaseSigner::generate().public();
        let mut world = World::build(&[], 1, Delivers::Firmware, vec![key]);
        world.run();
        assert!(
            matches!(world.rejection(), Some(RejectReason::ReleaseSignature(_))),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.chunks(), 0);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn a_clock_past_the_campaign_expiry_refuses_the_notify() {
        let mut world = World::new(&["clock-skew:seconds=7200"]);
        world.run();
        assert_eq!(world.ctx.stats.messages_rejected(), 1);
        assert!(world.manager_events.is_empty(), "no ready was sent");
    }

    #[test]
    fn rotated_credentials_replace_the_old_ones_and_trigger_a_reconnect() {
        for mode in [RotationMode::DeliverKey, RotationMode::Csr] {
            let mut world = World::with(&[], 1, Delivers::Credentials(mode));
            let (old_cert, _) = world.dir.read_credentials().unwrap();
            assert_eq!(world.run(), Some(ConnectionEnd::Reload), "{mode:?}");
            assert!(world.installed(), "{mode:?}: {:?}", world.manager_events);
            let (new_cert, new_key) = world.dir.read_credentials().unwrap();
            assert_ne!(new_cert, old_cert);
            let identity = Identity::from_pem(&new_cert, &new_key).unwrap();
            assert_eq!(identity.name(), DEVICE);
            // The next boot uses them.
            world.reboot();
            assert_eq!(world.run(), None);
        }
    }
}
