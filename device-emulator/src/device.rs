//! One emulated device: its connection to the broker (rumqttc v5 over TLS with its own
//! certificate), its protocol session, its directory, and its fault switches. The protocol
//! crate's `DeviceSession` decides everything about messages; this module carries its actions
//! to the broker, stores what it hands out (chunks, state, credentials), installs verified
//! images, and plays the faults.
//!
//! A device lives through *incarnations* (a power cycle: identity and state reloaded from
//! disk) made of *connections*. A crash ends an incarnation without saving; going offline or
//! losing the link ends a connection, and the session resumes on the next one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use sealed_ota_protocol::{
    Action, DeviceConfig, DeviceEvent, DeviceSession, DeviceState, Identity, Manifest, PayloadKind,
    TopicKind, TopicTree, TrustAnchor,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

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
enum ConnectionEnd {
    Shutdown,
    Crash(Duration),
    Reload,
    /// The offline fault: come back after the delay.
    Offline(Duration),
    /// The link failed or the broker refused; try again after a backoff.
    Lost,
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
        }
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

    /// Exponential backoff with jitter, 1 s to 60 s.
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

    fn save(&mut self, session: &DeviceSession) -> Result<()> {
        self.chunks_since_save = 0;
        self.running_version = session.state().running_version.clone();
        self.dir.save_state(session.state())
    }

    /// Boots from disk and runs connections until shutdown, crash or credential change.
    async fn incarnation(&mut self) -> Result<IncarnationEnd> {
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
        };
        let (mut session, mut first_actions) = DeviceSession::new(config, state);
        session.set_window_timeout(self.ctx.window_timeout);
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
        let options = mqtt_io::device_options(
            &self.ctx.endpoint,
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
                    let actions = session.poll(self.now());
                    if mqtt_io::perform(client, actions).await.is_err() {
                        return Ok(ConnectionEnd::Lost);
                    }
                }
                _ = self.shutdown.changed() => return Ok(ConnectionEnd::Shutdown),
            }
        }
    }

    /// Feeds one received message to the session and acts on what comes out.
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
        let mut inbound = mqtt_io::inbound_from(&publish);
        drop(publish);
        let is_chunk = matches!(
            self.ctx.topics.parse(&inbound.topic),
            Ok(TopicKind::Chunk { .. })
        );
        if is_chunk
            && self
                .faults
                .tamper_received(&mut inbound.payload, &mut rand::thread_rng())
        {
            debug!(device = %self.id, topic = %inbound.topic, "flipped a bit of a received message (fault switch)");
        }
        let now = self.now();
        let output = match session.handle(&inbound, now) {
            Ok(output) => output,
            Err(e) => {
                self.ctx.stats.message_rejected();
                debug!(device = %self.id, topic = %inbound.topic, error = %e, kind = e.metric_label(), "message rejected by the protocol");
                return Ok(None);
            }
        };
        let refused_offer = self.faults.refusal().is_some()
            && output
                .events
                .iter()
                .any(|e| matches!(e, DeviceEvent::UpdateOffered { .. }));
        if !refused_offer {
            // A refusing device sends neither the acceptance nor the chunk subscription.
            if mqtt_io::perform(client, output.actions).await.is_err() {
                return Ok(Some(ConnectionEnd::Lost));
            }
        }
        for event in output.events {
            if let Some(end) = self.on_event(session, client, event, now).await? {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    async fn on_event(
        &mut self,
        session: &mut DeviceSession,
        client: &AsyncClient,
        event: DeviceEvent,
        now: u64,
    ) -> Result<Option<ConnectionEnd>> {
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
                if let Some(down_for) = self.faults.crash_on_install() {
                    // Power loss half-way through writing the image: nothing else is saved.
                    self.dir.interrupt_install()?;
                    return Ok(Some(ConnectionEnd::Crash(down_for)));
                }
                let installed =
                    self.dir
                        .install(&manifest.version, manifest.size, &manifest.sha256);
                let result = match installed {
                    Ok(record) => {
                        info!(device = %self.id, version = %record.version, "image verified and installed");
                        self.set_outcome(Outcome::Installed);
                        Ok(())
                    }
                    Err(e) => {
                        warn!(device = %self.id, campaign = %manifest.campaign_id, error = %e, "install failed");
                        self.set_outcome(Outcome::Failed);
                        self.dir.discard_download()?;
                        Err(e.to_string())
                    }
                };
                actions = session.finish_install(result, now);
                self.save(session)?;
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
            DeviceEvent::Rejected { reason } => {
                info!(device = %self.id, %reason, "update rejected by the device");
                self.set_outcome(Outcome::Rejected);
                self.dir.discard_download()?;
                self.save(session)?;
            }
        }
        if mqtt_io::perform(client, actions).await.is_err() {
            return Ok(Some(ConnectionEnd::Lost));
        }
        Ok(end)
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
