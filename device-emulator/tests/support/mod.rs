//! Test support for the emulator's end-to-end tests: a fleet enrolled with the test bed's CA
//! (which Mosquitto trusts for client certificates), and a manager played by the test with the
//! protocol crate's `ManagerSession` over a real rumqttc v5 client on the TLS listener.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_device_emulator::device::unix_now;
use sealed_ota_device_emulator::enroll::{self, CaSource, EnrollRequest};
use sealed_ota_device_emulator::fleet::FleetOptions;
use sealed_ota_device_emulator::mqtt_io::{self, BrokerEndpoint};
use sealed_ota_device_emulator::store::{FleetDir, FleetSettings};
use sealed_ota_e2e::TestBed;
use sealed_ota_protocol::{
    Action, CampaignPayload, CampaignSpec, CertificateAuthority, DeviceTarget, ManagerConfig,
    ManagerEvent, ManagerSession, PreparedCampaign, RejectReason, Role, TopicKind, TopicTree,
};
use tokio::sync::mpsc;

/// A random lower-case suffix so concurrent and repeated runs never share topics or client ids.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{:06x}",
        rand::thread_rng().gen_range(0..0xff_ffffu32)
    )
}

/// The test bed's CA, loaded as a CA.
pub fn testbed_ca(bed: &TestBed) -> Result<CertificateAuthority> {
    Ok(enroll::load_ca(
        &CaSource::Files {
            cert: bed.ca_file.clone(),
            key: bed.ca_key_file.clone(),
        },
        unix_now(),
        1,
    )?)
}

/// Enrolls `count` devices `<id_prefix>-NNNNN` under `root` for `manager_id`.
pub fn enroll_fleet(
    ca: &CertificateAuthority,
    root: &Path,
    id_prefix: &str,
    manager_id: &str,
    count: u32,
) -> Result<(FleetDir, Vec<String>)> {
    let fleet = FleetDir::new(root);
    let settings = FleetSettings {
        manager_id: manager_id.into(),
        topic_prefix: "iot".into(),
        initial_version: "1.0.0".into(),
        release_keys: Vec::new(),
    };
    let request = EnrollRequest {
        id_prefix: id_prefix.into(),
        first_index: 0,
        count,
        labels: BTreeMap::new(),
        namespace: "default".into(),
        validity_days: 1,
    };
    enroll::enroll(ca, &fleet, &settings, &request, unix_now())?;
    let ids = request.device_ids().collect();
    Ok((fleet, ids))
}

/// Fleet options for the test bed's TLS listener, with short timers.
pub fn fleet_options(bed: &TestBed, fleet: FleetDir) -> Result<FleetOptions> {
    let ca = std::fs::read(&bed.ca_file)?;
    let endpoint = BrokerEndpoint::parse(&bed.mqtts_url, Some(ca))?;
    let mut options = FleetOptions::new(fleet, endpoint);
    options.connect_rate = 400.0;
    options.window = 4;
    options.window_timeout = 2;
    options.save_every_chunks = 1;
    Ok(options)
}

/// A firmware image of `len` bytes, different in every run.
pub fn firmware(len: usize) -> Vec<u8> {
    let mut image = vec![0u8; len];
    rand::thread_rng().fill(&mut image[..]);
    image
}

/// The manager of one campaign, talking to the devices through the test bed's Mosquitto.
pub struct TestManager {
    client: AsyncClient,
    inbound: mpsc::UnboundedReceiver<sealed_ota_protocol::Inbound>,
    topics: Arc<TopicTree>,
    config: ManagerConfig,
    sessions: HashMap<String, ManagerSession>,
    campaign: Option<Arc<PreparedCampaign>>,
    /// Devices that sent a signed Installed status.
    pub installed: BTreeSet<String>,
    /// Devices that sent a signed rejection, with the reason.
    pub rejected: BTreeMap<String, RejectReason>,
    /// Chunks republished on a device's request.
    pub republished: u32,
    /// Messages the manager session refused.
    pub refused_messages: u32,
}

impl TestManager {
    /// Issues the manager identity from `ca`, connects with it over TLS and subscribes to the
    /// ready and status topics (SUBACK awaited).
    pub async fn connect(
        bed: &TestBed,
        ca: &CertificateAuthority,
        manager_id: &str,
        dir: &Path,
    ) -> Result<Self> {
        let now = unix_now();
        let identity = ca.issue(Role::Manager, manager_id, now, 1)?;
        let (cert, key) = (dir.join("manager.crt"), dir.join("manager.key"));
        std::fs::write(&cert, identity.cert_pem())?;
        std::fs::write(&key, identity.key_pem().as_bytes())?;
        sealed_ota_device_emulator::install_crypto_provider();
        let mut options = bed.mqtts_options(manager_id, &cert, &key)?;
        options.set_max_packet_size(Some(1024 * 1024));
        options.set_outgoing_inflight_upper_limit(100);
        // Mosquitto queues at most 1,000 messages per client and drops the rest: with thousands
        // of devices answering at once, the manager must let them all be in flight instead.
        options.set_receive_maximum(Some(u16::MAX));
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let topics = Arc::new(TopicTree::new("iot", manager_id)?);
        client
            .subscribe_many([
                Filter::new(topics.ready_filter(), QoS::AtLeastOnce),
                Filter::new(topics.status_filter(), QoS::AtLeastOnce),
            ])
            .await?;
        // Unbounded: while the test publishes thousands of notifies it is not reading, and a
        // bounded channel would stop the event loop that carries those publishes.
        let (tx, inbound) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(mqtt_io::inbound_from(&p)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test manager: connection error {e}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .context("manager: no SUBACK within 10 s")??;
        Ok(TestManager {
            client,
            inbound,
            config: ManagerConfig {
                identity: Arc::new(identity),
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::clone(&topics),
            },
            topics,
            sessions: HashMap::new(),
            campaign: None,
            installed: BTreeSet::new(),
            rejected: BTreeMap::new(),
            republished: 0,
            refused_messages: 0,
        })
    }

    async fn perform(&self, actions: Vec<Action>) -> Result<()> {
        Ok(mqtt_io::perform(&self.client, actions).await?)
    }

    /// Publishes the firmware's chunks (retained) and one notify per device.
    pub async fn start_firmware_campaign(
        &mut self,
        campaign_id: &str,
        version: &str,
        image: Vec<u8>,
        chunk_size: u32,
        devices: &[String],
    ) -> Result<Arc<PreparedCampaign>> {
        let spec = CampaignSpec {
            campaign_id: campaign_id.into(),
            target_version: version.into(),
            payload: CampaignPayload::Firmware { image },
            expires_at: unix_now() + 3600,
            chunk_size,
            release: None,
        };
        self.start_campaign(spec, devices).await
    }

    /// Starts a campaign: its chunks (retained, if any) and one notify per device. Outcomes of
    /// an earlier campaign are forgotten.
    pub async fn start_campaign(
        &mut self,
        spec: CampaignSpec,
        devices: &[String],
    ) -> Result<Arc<PreparedCampaign>> {
        let campaign = Arc::new(PreparedCampaign::prepare(spec)?);
        let chunks = campaign
            .chunk_publishes(&self.topics)
            .into_iter()
            .map(Action::Publish)
            .collect();
        self.perform(chunks).await?;
        self.installed.clear();
        self.rejected.clear();
        self.sessions.clear();
        for device in devices {
            let target = DeviceTarget {
                device_id: device.clone(),
                pinned_fingerprint: None,
                allow_downgrade: false,
            };
            let (session, actions) =
                ManagerSession::start(&self.config, Arc::clone(&campaign), target, unix_now())?;
            self.perform(actions).await?;
            self.sessions.insert(device.clone(), session);
        }
        self.campaign = Some(Arc::clone(&campaign));
        Ok(campaign)
    }

    /// Serves ready and status messages until `done` holds, failing after `timeout`.
    pub async fn serve_until(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&TestManager) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Wake at least every 200 ms: `done` may look at things other than messages (disk).
        while !done(self) {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}: {} installed, {} rejected",
                    self.installed.len(),
                    self.rejected.len()
                );
            }
            match tokio::time::timeout(Duration::from_millis(200), self.inbound.recv()).await {
                Ok(Some(message)) => self.handle(message).await?,
                Ok(None) => bail!("manager connection task ended"),
                Err(_) => {}
            }
        }
        Ok(())
    }

    async fn handle(&mut self, message: sealed_ota_protocol::Inbound) -> Result<()> {
        let device = match self.topics.parse(&message.topic) {
            Ok(TopicKind::Ready { device }) | Ok(TopicKind::Status { device }) => device,
            _ => return Ok(()),
        };
        let Some(session) = self.sessions.get_mut(&device) else {
            return Ok(());
        };
        let output = match session.handle(&message, unix_now()) {
            Ok(output) => output,
            Err(_) => {
                self.refused_messages += 1;
                return Ok(());
            }
        };
        let mut actions = output.actions;
        for event in output.events {
            match event {
                ManagerEvent::Installed { .. } => {
                    self.installed.insert(device.clone());
                }
                ManagerEvent::Rejected { reason, .. } => {
                    self.rejected.insert(device.clone(), reason);
                }
                ManagerEvent::ChunksRequested { indices }
                | ManagerEvent::ChunksPulled { indices } => {
                    let campaign = self.campaign.as_ref().context("no campaign")?;
                    for index in indices {
                        self.republished += 1;
                        actions.push(Action::Publish(campaign.chunk_publish(&self.topics, index)));
                    }
                }
                ManagerEvent::HandshakeCompleted { .. }
                | ManagerEvent::ReadyRepeated
                | ManagerEvent::Progress { .. }
                | ManagerEvent::RolledBack { .. } => {}
            }
        }
        self.perform(actions).await
    }

    /// Clears the retained chunks and notifies of the campaign.
    pub async fn clean_up(&self) -> Result<()> {
        let mut actions: Vec<Action> = self
            .sessions
            .values()
            .map(|s| Action::Publish(s.clear_notify()))
            .collect();
        if let Some(campaign) = &self.campaign {
            actions.extend(
                campaign
                    .clear_chunks(&self.topics)
                    .into_iter()
                    .map(Action::Publish),
            );
        }
        self.perform(actions).await?;
        // Let the event loop flush the clears before the client is dropped.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}
