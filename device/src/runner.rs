//! One device's session runner: its connection to the broker (rumqttc v5 over TLS with its own
//! certificate), its protocol session, its directory, and the seam to what differs between kinds
//! of device (`seam`). The protocol crate's `DeviceSession` decides everything about messages;
//! this module carries its actions to the broker, stores what it hands out (chunks, state,
//! credentials), checks a complete image against the signed manifest, stages the install
//! ("pending install" saved before the installer touches anything), hands it to the
//! [`Installer`], sends the signed receipt of the final outcome, and after a restart lets the
//! installer finish an install that was pending. The emulator runs thousands of these in one
//! process with its fault switches; the agent runs one with its journaled transaction.
//!
//! A device lives through *incarnations* (a power cycle: identity and state reloaded from disk)
//! made of *connections*. A crash ends an incarnation without saving; going offline or losing the
//! link ends a connection, and the session resumes on the next one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use sealed_ota_protocol::{
    Action, DeviceConfig, DeviceEvent, DeviceSession, DeviceState, FinalOutcome, Identity, Inbound,
    KeyLog, Manifest, PayloadKind, ReleaseKey, TopicKind, TopicTree, TrustAnchor,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::crashpoint::{self, CrashPoint};
use crate::error::{Error, Result};
use crate::link::{self, BrokerEndpoint};
use crate::pacing::{ConnectPacer, HandshakePermit};
use crate::seam::{Faults, InstallProgress, Installer, LateOutcome, Observer, Outcome};
use crate::store::{DeviceDir, Download};

/// What a device's session needs besides its directory (shared by every device of a fleet).
#[derive(Debug)]
pub struct Settings {
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
    /// Connection pacing shared by a fleet (`None`: connect at once).
    pub pacer: Option<ConnectPacer>,
    /// What the fleet counts.
    pub observer: Arc<dyn Observer>,
    /// Release public keys the device trusts (empty: not required).
    pub release_keys: Vec<ReleaseKey>,
    /// Where sessions report their secrets (tests only; see `KeyLog`).
    pub key_log: Option<Arc<dyn KeyLog>>,
    /// How long after a committed install the device sends its signed post-install health report
    /// (`None`: it sends none).
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
    /// The device is shutting down (state saved).
    Shutdown,
    /// Power loss: nothing saved since the last save; back after the delay.
    Crash(Duration),
    /// New credentials were stored: reload identity and reconnect with them.
    Reload,
}

/// How a connection ended (or must end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The device is shutting down.
    Shutdown,
    /// Power loss: nothing more is saved or sent; back after the delay.
    Crash(Duration),
    /// New credentials were stored: reconnect with them.
    Reload,
    /// The offline fault: come back after the delay.
    Offline(Duration),
    /// The link failed or the broker refused; try again after a backoff.
    Lost,
}

/// A freshly booted device.
#[derive(Debug)]
pub struct Boot {
    /// Its protocol session.
    pub session: DeviceSession,
    /// The session's first actions (subscriptions, a receipt finished at boot).
    pub actions: Vec<Action>,
    /// Set when resuming a pending install lost power again.
    pub power_lost: Option<Duration>,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet_size: u32,
}

/// What one received message leads to.
#[derive(Debug, Default)]
pub struct Step {
    /// To send, in order.
    pub actions: Vec<Action>,
    /// Set when the connection must end.
    pub end: Option<ConnectionEnd>,
    /// A firmware transfer starts with this step (its chunk-window subscription is in `actions`).
    pub transfer_starts: bool,
}

/// What the connection task reports.
enum Link {
    Connected,
    /// Boxed: the channel allocates its slots 32 at a time, so each slot costs a
    /// `Link` (a pointer here, 200 bytes unboxed) per connection.
    Message(Box<Publish>),
    /// A SUBACK refused some filters (their reason codes): they must be subscribed again.
    Refused(Vec<SubscribeReasonCode>),
    Lost(String),
}

/// The current Unix time.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One device.
pub struct Device<I: Installer> {
    settings: Arc<Settings>,
    id: String,
    dir: DeviceDir,
    installer: I,
    faults: Box<dyn Faults>,
    shutdown: watch::Receiver<bool>,
    outcome: Outcome,
    running_version: String,
    connected_before: bool,
    chunks_this_run: u32,
    chunks_since_save: u32,
    failures_in_a_row: u32,
    /// The campaign whose image is being received (where its chunks go).
    receiving: Option<String>,
    /// Counted once at the fleet's transfer gate (when there is one).
    passed_transfer_gate: bool,
    /// Which of the broker's nodes the next connection goes to (modulo their number): devices
    /// start spread over the nodes and move to the next one when a connection is lost.
    node: usize,
    /// When the post-install health report is due (device clock, Unix seconds).
    health_due: Option<u64>,
}

impl<I: Installer> std::fmt::Debug for Device<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl<I: Installer> Device<I> {
    /// A device whose identity is in `dir`, installing with `installer`.
    pub fn new(
        settings: Arc<Settings>,
        id: String,
        dir: DeviceDir,
        installer: I,
        faults: Box<dyn Faults>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Device {
            running_version: settings.initial_version.clone(),
            settings,
            id,
            dir,
            installer,
            faults,
            shutdown,
            outcome: Outcome::Idle,
            connected_before: false,
            chunks_this_run: 0,
            chunks_since_save: 0,
            failures_in_a_row: 0,
            receiving: None,
            passed_transfer_gate: false,
            node: 0,
            health_due: None,
        }
    }

    /// Starts the device on node `node` of the broker (of several nodes; see [`BrokerEndpoint`]).
    pub fn starting_on_node(mut self, node: usize) -> Self {
        self.node = node;
        self
    }

    /// Outcome of the last campaign this device saw in this run.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The installer.
    pub fn installer(&self) -> &I {
        &self.installer
    }

    /// Runs until shutdown.
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

    /// Sleeps; true when the device shut down meanwhile.
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
        self.settings
            .observer
            .outcome_changed(self.outcome, outcome);
        self.outcome = outcome;
    }

    fn now(&self) -> u64 {
        self.faults.clock(unix_now())
    }

    /// The image of campaign `campaign_id` as it is received.
    fn download(&self, campaign_id: &str) -> Download {
        Download::at(
            self.installer.download_path(campaign_id),
            self.dir.durable_state(),
        )
    }

    /// Persists the session state (fsynced). The chunks it says are stored are flushed first, so
    /// after a power loss the state never claims data the disk lost.
    fn save(&mut self, session: &DeviceSession) -> Result<()> {
        if self.dir.durable_state() {
            off_the_workers(|| self.save_now(session))
        } else {
            self.save_now(session)
        }
    }

    fn save_now(&mut self, session: &DeviceSession) -> Result<()> {
        if self.chunks_since_save > 0 {
            if let Some(campaign) = &self.receiving {
                self.download(campaign).sync()?;
            }
        }
        self.chunks_since_save = 0;
        self.running_version = session.state().running_version.clone();
        self.dir.save_state(session.state())?;
        crashpoint::reached(&CrashPoint::After("save"));
        Ok(())
    }

    /// Power on: clean what a crash left, load identity and state from the directory, and start
    /// a protocol session (its first actions subscribe to notify and update). An install that was
    /// pending when the power went is handed back to the installer to finish.
    pub fn boot(&mut self) -> Result<Boot> {
        self.dir.recover_after_crash()?;
        self.installer.on_boot()?;
        let (cert_pem, key_pem) = self.dir.read_credentials()?;
        let identity =
            Identity::from_pem(&cert_pem, &key_pem).map_err(|source| Error::Identity {
                subject: self.id.clone(),
                source,
            })?;
        let tls = self
            .settings
            .endpoint
            .device_tls(&self.id, &cert_pem, &key_pem)?;
        drop(key_pem);
        let mut state = self
            .dir
            .load_state::<DeviceState>()?
            .unwrap_or_else(|| DeviceState::new(&self.settings.initial_version));
        if let Some(running) = self.installer.running_version() {
            // The installer's record of what runs wins (it also sees installs made without a
            // manager).
            state.running_version = running;
        }
        self.running_version = state.running_version.clone();
        self.receiving = state.transfer.as_ref().map(|t| t.campaign_id.clone());
        let max_packet_size = self.faults.max_packet_size(self.settings.max_packet_size);
        let config = DeviceConfig {
            identity: Arc::new(identity),
            trust: Arc::clone(&self.settings.trust),
            topics: Arc::clone(&self.settings.topics),
            manager_id: self.settings.topics.manager_id().to_string(),
            max_packet_size,
            window: self.settings.window,
            release_keys: self.settings.release_keys.clone(),
        };
        let (mut session, mut actions) = DeviceSession::new(config, state);
        session.set_window_timeout(self.settings.window_timeout);
        if let Some(log) = &self.settings.key_log {
            session.set_key_log(Arc::clone(log));
        }
        let mut power_lost = None;
        if let Some(pending) = session.state().pending_install.clone() {
            // The power went between "pending install" and the final receipt: the installer
            // finishes the install from what is on the device; the outcome is reported once
            // connected.
            info!(device = %self.id, campaign = %pending.campaign_id, version = %pending.version, "an install was pending at boot: finishing it");
            let image = self.installer.download_path(&pending.campaign_id);
            let progress = self.installer.resume(&pending, &image)?;
            let now = self.now();
            match self.after_install(&mut session, progress, now)? {
                (more, None) => actions.extend(more),
                (_, Some(ConnectionEnd::Crash(down_for))) => power_lost = Some(down_for),
                (more, Some(_)) => actions.extend(more),
            }
        }
        Ok(Boot {
            session,
            actions,
            power_lost,
            tls,
            max_packet_size,
        })
    }

    /// Boots from disk and runs connections until shutdown, crash or credential change.
    async fn incarnation(&mut self) -> Result<IncarnationEnd> {
        let Boot {
            mut session,
            actions: mut first_actions,
            power_lost,
            tls,
            max_packet_size,
        } = self.boot()?;
        if let Some(down_for) = power_lost {
            return Ok(IncarnationEnd::Crash(down_for));
        }
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
        let permit = match &self.settings.pacer {
            Some(pacer) => tokio::select! {
                permit = pacer.acquire() => Some(permit),
                _ = self.shutdown.changed() => return Ok(ConnectionEnd::Shutdown),
            },
            None => None,
        };
        let observer = Arc::clone(&self.settings.observer);
        observer.connect_attempt();
        let options = link::device_options_on(
            self.settings.endpoint.node(self.node),
            &self.id,
            tls,
            max_packet_size,
            self.settings.keep_alive,
        );
        let (client, eventloop) = link::device_client(options);
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
            observer.connect_failed();
            pump.abort();
            return Ok(ConnectionEnd::Lost);
        }
        observer.connected(!self.connected_before);
        self.connected_before = true;
        self.failures_in_a_row = 0;
        debug!(device = %self.id, "connected");
        let end = self
            .connected(session, &client, &mut link_rx, actions)
            .await;
        observer.disconnected();
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
        if link::perform(client, actions).await.is_err() {
            return Ok(ConnectionEnd::Lost);
        }
        let mut timers = tokio::time::interval(self.settings.poll_interval);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the filters a SUBACK refused are subscribed again (at the next timer tick after).
        let mut resubscribe_at: Option<tokio::time::Instant> = None;
        let mut refusals: u32 = 0;
        loop {
            tokio::select! {
                link = link_rx.recv() => match link {
                    Some(Link::Message(publish)) => {
                        if let Some(end) = self.on_message(session, client, *publish).await? {
                            return Ok(end);
                        }
                    }
                    Some(Link::Refused(codes)) => {
                        refusals = refusals.saturating_add(1);
                        let wait = Duration::from_secs(1 << refusals.min(5));
                        warn!(device = %self.id, ?codes, retry_in = ?wait, "the broker refused subscriptions; subscribing again");
                        self.settings.observer.subscriptions_refused(codes.len());
                        resubscribe_at.get_or_insert(tokio::time::Instant::now() + wait);
                    }
                    Some(Link::Connected) => {}
                    Some(Link::Lost(reason)) => {
                        debug!(device = %self.id, %reason, "connection lost");
                        return Ok(ConnectionEnd::Lost);
                    }
                    None => return Ok(ConnectionEnd::Lost),
                },
                late = self.installer.next_outcome() => {
                    let actions = self.on_late_outcome(session, late)?;
                    if link::perform(client, actions).await.is_err() {
                        return Ok(ConnectionEnd::Lost);
                    }
                }
                _ = timers.tick() => {
                    if resubscribe_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        resubscribe_at = None;
                        if link::resubscribe(client, &session.subscriptions()).await.is_err() {
                            return Ok(ConnectionEnd::Lost);
                        }
                    }
                    let now = self.now();
                    let output = session.poll_output(now);
                    let mut actions = output.actions;
                    actions.extend(self.health_report(session, now));
                    for event in output.events {
                        // Only the end of a session at the campaign's expiry (Rejected): nothing
                        // here ends the connection.
                        actions.extend(self.on_event(session, event, now)?.0);
                    }
                    if link::perform(client, actions).await.is_err() {
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
        self.settings.observer.received(publish.payload.len());
        if let Some(delay) = self.faults.slow_link_delay(publish.payload.len()) {
            // Not reading meanwhile: the broker's queue and TCP window fill, as on a slow link.
            tokio::time::sleep(delay).await;
        }
        let inbound = link::inbound_from(&publish);
        drop(publish);
        let step = self.process(session, inbound)?;
        if matches!(step.end, Some(ConnectionEnd::Crash(_))) {
            return Ok(step.end);
        }
        let mut actions = step.actions;
        if step.transfer_starts && !self.passed_transfer_gate {
            if let Some(gate) = self.settings.observer.transfer_gate() {
                self.passed_transfer_gate = true;
                // The window subscription waits for the gate; the connection keeps being served.
                let (windows, now): (Vec<Action>, Vec<Action>) = actions
                    .into_iter()
                    .partition(|a| matches!(a, Action::Subscribe(_)));
                actions = now;
                let client = client.clone();
                tokio::spawn(async move {
                    gate.await;
                    // A lost connection shows in the device's own loop, which resubscribes.
                    let _ = link::perform(&client, windows).await;
                });
            }
        }
        if link::perform(client, actions).await.is_err() {
            return Ok(Some(ConnectionEnd::Lost));
        }
        Ok(step.end)
    }

    /// Why this device declines offers now, if it does.
    fn refusal(&self) -> Option<String> {
        self.faults.refusal().or_else(|| self.installer.busy())
    }

    /// Feeds one message to the session (after the wire fault switch) and acts on its events:
    /// stores chunks, stages and hands over installs, stores credentials, plays the faults.
    /// Returns what to send and whether the connection ends. No network I/O, so tests drive it
    /// with a broker in memory.
    pub fn process(&mut self, session: &mut DeviceSession, mut inbound: Inbound) -> Result<Step> {
        let is_chunk = matches!(
            self.settings.topics.parse(&inbound.topic),
            Ok(TopicKind::Chunk { .. })
        );
        if is_chunk {
            self.settings.observer.chunk_delivered();
        }
        if is_chunk && self.faults.tamper_received(&mut inbound.payload) {
            debug!(device = %self.id, topic = %inbound.topic, "flipped a bit of a received chunk (fault switch)");
        }
        let now = self.now();
        let output = match session.handle(&inbound, now) {
            Ok(output) => output,
            Err(e) => {
                self.settings.observer.message_rejected();
                debug!(device = %self.id, topic = %inbound.topic, error = %e, kind = e.metric_label(), "message rejected by the protocol");
                return Ok(Step::default());
            }
        };
        let refused_offer = output
            .events
            .iter()
            .any(|e| matches!(e, DeviceEvent::UpdateOffered { .. }))
            && self.refusal().is_some();
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
                if let Some(reason) = self.refusal() {
                    info!(device = %self.id, campaign = %manifest.campaign_id, %reason, "declining the update");
                    actions = session.decline(&reason, now);
                    self.set_outcome(Outcome::Rejected);
                } else {
                    self.start_transfer(session, &manifest)?;
                }
                self.save(session)?;
            }
            DeviceEvent::Chunk { offset, data, .. } => {
                let campaign = session
                    .state()
                    .transfer
                    .as_ref()
                    .map(|t| t.campaign_id.clone())
                    .unwrap_or_default();
                let download = self.download(&campaign);
                download.write_chunk(offset, &data)?;
                if self
                    .faults
                    .after_chunk_stored(&download, offset, data.len())?
                {
                    debug!(device = %self.id, offset, "flipped a bit of a stored chunk (fault switch)");
                }
                self.receiving = Some(campaign);
                self.settings.observer.chunk_stored();
                crashpoint::reached(&CrashPoint::After("chunk"));
                self.chunks_this_run += 1;
                self.chunks_since_save += 1;
                if self.outcome != Outcome::Transferring {
                    self.set_outcome(Outcome::Transferring);
                }
                if let Some(away_for) = self.faults.offline_now(self.chunks_this_run) {
                    end = Some(ConnectionEnd::Offline(away_for));
                } else if self.chunks_since_save >= self.settings.save_every_chunks {
                    self.save(session)?;
                }
            }
            DeviceEvent::ImageComplete { manifest } => {
                // Hashing the image and the install's fsyncs take milliseconds of disk time: off
                // the worker thread, so the other devices of a fleet keep receiving meanwhile.
                return off_the_workers(|| self.on_image_complete(session, &manifest, now));
            }
            DeviceEvent::CredentialsDelivered { cert_pem, key_pem } => {
                // Validated by the session (chain, name, key match); the signed Installed status
                // already went out with the old identity. The next connection uses the new one.
                self.dir.write_credentials(&cert_pem, &key_pem)?;
                info!(device = %self.id, "new credentials stored; reconnecting with them");
                self.set_outcome(Outcome::Installed);
                self.save(session)?;
                crashpoint::reached(&CrashPoint::After("credentials"));
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
                if let Some(campaign) = self.receiving.take() {
                    self.download(&campaign).discard()?;
                }
                self.save(session)?;
            }
        }
        Ok((actions, end))
    }

    /// Every chunk is stored: check the image against the signed manifest (a delta rebuilt against
    /// the installed image first), stage the install
    /// (refused past the campaign's expiry), save it as pending, then hand it to the installer.
    fn on_image_complete(
        &mut self,
        session: &mut DeviceSession,
        manifest: &Manifest,
        now: u64,
    ) -> Result<(Vec<Action>, Option<ConnectionEnd>)> {
        let download = self.download(&manifest.campaign_id);
        let installed = self.installer.installed_image_path();
        if let Err(e) = download.complete(manifest, installed.as_deref()) {
            warn!(device = %self.id, campaign = %manifest.campaign_id, error = %e, "received image refused");
            self.set_outcome(Outcome::Failed);
            download.discard()?;
            self.receiving = None;
            let actions = session.refuse_image(e.reject_reason(), now);
            self.save(session)?;
            return Ok((actions, None));
        }
        crashpoint::reached(&CrashPoint::Before("stage"));
        let pending = match session.stage_install(now) {
            Ok(pending) => pending,
            Err(refusal) => {
                info!(device = %self.id, campaign = %manifest.campaign_id, "not installing: the campaign expired");
                self.set_outcome(Outcome::Rejected);
                download.discard()?;
                self.receiving = None;
                self.save(session)?;
                return Ok((refusal, None));
            }
        };
        // "Pending install" is on disk before the installer touches anything.
        self.save(session)?;
        crashpoint::reached(&CrashPoint::After("stage"));
        info!(device = %self.id, campaign = %pending.campaign_id, version = %pending.version, "image verified; installing");
        let progress = self.installer.install(&pending, download.path())?;
        self.after_install(session, progress, now)
    }

    /// Acts on what the installer made of an install: a finished one is reported (signed
    /// receipt), one under way reports later, a power loss ends the incarnation.
    fn after_install(
        &mut self,
        session: &mut DeviceSession,
        progress: InstallProgress,
        now: u64,
    ) -> Result<(Vec<Action>, Option<ConnectionEnd>)> {
        match progress {
            InstallProgress::Finished(outcome) => Ok((self.report(session, outcome, now)?, None)),
            InstallProgress::Underway => Ok((Vec::new(), None)),
            InstallProgress::PowerLost(down_for) => {
                Ok((Vec::new(), Some(ConnectionEnd::Crash(down_for))))
            }
        }
    }

    /// The signed receipt of the pending install's final outcome; the state saved after.
    fn report(
        &mut self,
        session: &mut DeviceSession,
        outcome: FinalOutcome,
        now: u64,
    ) -> Result<Vec<Action>> {
        let (next, verb) = match &outcome {
            FinalOutcome::Committed => (Outcome::Installed, "installed and committed"),
            FinalOutcome::RolledBack { .. } => (Outcome::RolledBack, "rolled back"),
            FinalOutcome::Failed { .. } => (Outcome::Failed, "failed"),
        };
        let version = session
            .state()
            .pending_install
            .as_ref()
            .map(|p| p.version.clone())
            .unwrap_or_default();
        info!(device = %self.id, %version, ?outcome, "update {verb}; sending the signed receipt");
        if outcome == FinalOutcome::Committed {
            self.health_due = self
                .settings
                .health_report_after
                .map(|after| now + after.as_secs());
        }
        self.set_outcome(next);
        crashpoint::reached(&CrashPoint::Before("receipt"));
        let actions = session.report_final(outcome, now);
        self.receiving = None;
        self.save(session)?;
        crashpoint::reached(&CrashPoint::After("receipt"));
        Ok(actions)
    }

    /// The signed post-install health report, once it is due: healthy unless the fault switches
    /// say otherwise (a real device's health check already passed before its commit).
    pub fn health_report(&mut self, session: &DeviceSession, now: u64) -> Option<Action> {
        if self.health_due.is_none_or(|due| due > now) {
            return None;
        }
        self.health_due = None;
        let failure = self.faults.unhealthy();
        let healthy = failure.is_none();
        let detail = failure.unwrap_or_else(|| "post-install health check passed".to_string());
        let report = session.health_report(healthy, &detail, now)?;
        info!(device = %self.id, healthy, %detail, "signed health report");
        self.settings.observer.health_reported(healthy);
        Some(report)
    }

    /// An install that was under way finished: its receipt, if its install is the pending one
    /// (otherwise it was reported before a restart, or was not a campaign's); the installer is told
    /// once the state is saved.
    pub fn on_late_outcome(
        &mut self,
        session: &mut DeviceSession,
        late: LateOutcome,
    ) -> Result<Vec<Action>> {
        let pending = session
            .state()
            .pending_install
            .as_ref()
            .is_some_and(|p| p.campaign_id == late.campaign_id);
        let actions = if pending {
            let now = self.now();
            self.report(session, late.outcome, now)?
        } else {
            debug!(device = %self.id, campaign = %late.campaign_id, "outcome with no pending install: nothing to report");
            Vec::new()
        };
        if let Some(saved) = late.receipt_saved {
            let _ = saved.send(());
        }
        Ok(actions)
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
            self.download(&manifest.campaign_id).discard()?;
        }
        self.receiving = Some(manifest.campaign_id.clone());
        debug!(device = %self.id, campaign = %manifest.campaign_id, resumed, "transfer starts");
        self.set_outcome(Outcome::Transferring);
        Ok(())
    }
}

/// Runs `work`, which blocks on the disk (fsyncs, hashing a whole image), without stalling the
/// other tasks of a multi-threaded runtime: the emulator runs a thousand devices on two worker
/// threads, where one device's install would otherwise hold up every device queued on that
/// thread (a real device has its own CPU and disk). On a current-thread runtime, or outside one
/// (unit tests), `work` just runs.
fn off_the_workers<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Drives rumqttc's event loop and forwards what the device needs. Holds the pacing permit
/// until the handshake ends. Ends at the first error: the device decides when to reconnect.
/// Once the device stops listening it keeps polling, so a queued DISCONNECT still goes out.
async fn pump(mut eventloop: EventLoop, link: mpsc::Sender<Link>, permit: Option<HandshakePermit>) {
    let mut permit = permit;
    loop {
        let report = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                permit.take();
                Link::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Link::Message(Box::new(publish)),
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let codes = link::refused(&suback);
                if codes.is_empty() {
                    continue;
                }
                Link::Refused(codes)
            }
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
    use std::sync::mpsc;
    use std::time::Duration;

    use super::off_the_workers;

    /// Blocking work waits for a message that only another task of the same one-worker runtime
    /// can send: it arrives only if the work left the worker thread to the other tasks.
    #[test]
    fn blocking_work_leaves_the_worker_to_the_other_tasks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let got = runtime.block_on(async {
            let (tx, rx) = mpsc::channel::<()>();
            let blocked = tokio::spawn(async move {
                off_the_workers(|| rx.recv_timeout(Duration::from_secs(20)).is_ok())
            });
            // Spawned after, so it can only run on the one worker once the first task let go.
            tokio::spawn(async move { tx.send(()).unwrap() });
            blocked.await.unwrap()
        });
        assert!(got, "the other task never ran while the work blocked");
    }

    #[test]
    fn on_a_current_thread_runtime_or_none_the_work_just_runs() {
        assert_eq!(off_the_workers(|| 7), 7);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(async { off_the_workers(|| 8) }), 8);
    }
}
