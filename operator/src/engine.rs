//! The campaign engine: in-memory runs of the campaigns this replica drives, one protocol
//! `ManagerSession` per device in flight, and the dispatcher that feeds inbound MQTT messages to them.
//!
//! It owns the sessions, never the rollout decisions (those are in `rollout`) and never the campaign
//! status (the controller writes it). What must survive a restart is written to `Device` status by the
//! device-status writer: a device counts as done only after its signed receipt (`Installed`,
//! `RolledBack`) or signed refusal, never on a broker acknowledgement, and the receipt is kept on the
//! Device. The certificate a rotation issues is recorded on the Device (`credentials`) before the
//! update that carries it is published. Sessions end with the manager's signed abort. Locks are
//! never held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use sealed_ota_protocol::{
    Action, DeviceTarget, Inbound, IssuedCertificate, ManagerConfig, ManagerEvent, ManagerSession,
    Outbound, PreparedCampaign, Properties, ProtocolError, TopicKind, TopicTree,
};
use tokio::sync::{mpsc, oneshot};

use crate::crd::{Device, DeviceCampaignStatus, DevicePhase, DeviceStatus};
use crate::credentials;
use crate::metrics::Metrics;
use crate::mqtt::MqttSession;
use crate::rollout::{Progress, TimeoutOutcome};

/// Field manager of every status the operator writes.
pub const FIELD_MANAGER: &str = "sealed-ota-operator";

/// (namespace, name) of a campaign.
pub type CampaignKey = (String, String);

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Kubernetes time from Unix seconds.
pub fn k8s_time(secs: u64) -> Time {
    Time(Timestamp::from_second(secs as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// What the handshake told us about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// SHA-256 of the device certificate.
    pub fingerprint: [u8; 32],
    /// Certificate expiry, Unix seconds.
    pub not_after: u64,
    /// Version the device runs.
    pub running_version: String,
}

/// A Device status write for the writer task.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceWrite {
    /// Namespace of the Device.
    pub namespace: String,
    /// Name of the Device.
    pub name: String,
    /// The complete status owned by the operator.
    pub status: DeviceStatus,
}

/// Build a Device status (pure): the fields we own are always all present, because server-side apply
/// removes owned fields that a later apply leaves out.
pub fn device_status(
    base: Option<&DeviceStatus>,
    handshake: Option<&Handshake>,
    installed_version: Option<&str>,
    campaign: DeviceCampaignStatus,
    now: u64,
) -> DeviceStatus {
    let base = base.cloned().unwrap_or_default();
    let seen = handshake.is_some() || installed_version.is_some();
    let (status, reason, message) = match campaign.phase {
        DevicePhase::Succeeded => (
            "True",
            "UpToDate".to_owned(),
            format!(
                "installed {} (campaign {})",
                campaign.target_version, campaign.name
            ),
        ),
        DevicePhase::Failed => (
            "False",
            campaign
                .reason
                .clone()
                .unwrap_or_else(|| "UpdateFailed".into()),
            campaign
                .message
                .clone()
                .unwrap_or_else(|| format!("campaign {} failed", campaign.name)),
        ),
        DevicePhase::Transferring | DevicePhase::Pending => (
            "Unknown",
            "Updating".to_owned(),
            format!(
                "campaign {} is updating the device to {}",
                campaign.name, campaign.target_version
            ),
        ),
    };
    let last_transition_time = base
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| k8s_time(now));
    let ready = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason,
        message: crate::status::bounded(&message, 1024),
        observed_generation: None,
        last_transition_time,
    };
    DeviceStatus {
        running_version: installed_version
            .map(str::to_owned)
            .or_else(|| handshake.map(|h| h.running_version.clone()))
            .or(base.running_version),
        last_seen: if seen {
            Some(k8s_time(now))
        } else {
            base.last_seen
        },
        certificate_fingerprint: handshake
            .map(|h| hex::encode(h.fingerprint))
            .or(base.certificate_fingerprint),
        certificate_not_after: handshake
            .map(|h| k8s_time(h.not_after))
            .or(base.certificate_not_after),
        rotated_certificate_fingerprint: base.rotated_certificate_fingerprint,
        pending_certificates: base.pending_certificates,
        retired_certificate_fingerprints: base.retired_certificate_fingerprints,
        campaign: Some(campaign),
        conditions: vec![ready],
    }
}

/// One device inside a run.
#[derive(Debug)]
pub struct DeviceRun {
    /// Device id (topic level, certificate CN).
    pub device_id: String,
    /// Where the device is.
    pub progress: Progress,
    session: Option<ManagerSession>,
    handshake: Option<Handshake>,
    /// The Device status as last written (or read): every write starts from it.
    base: Option<DeviceStatus>,
    /// spec.certificateFingerprint when the session started.
    pin: Option<String>,
    /// The certificate of this session's rotation once its pending record landed on the Device.
    issued_recorded: Option<[u8; 32]>,
}

/// A campaign this replica drives.
#[derive(Debug)]
pub struct CampaignRun {
    /// UID of the campaign (also the protocol campaign id).
    pub uid: String,
    /// Version delivered.
    pub target_version: String,
    /// The encrypted-once payload; released when the run ends (only its chunk count is kept).
    prepared: Option<Arc<PreparedCampaign>>,
    chunk_count: u32,
    expires_at: u64,
    release_key_id: Option<[u8; 32]>,
    /// Manager identity, trust anchor, topics.
    pub manager: ManagerConfig,
    /// spec.allowDowngrade.
    pub allow_downgrade: bool,
    /// Devices by resource name.
    pub devices: HashMap<String, DeviceRun>,
    by_id: HashMap<String, String>,
    chunks_published: bool,
    ended: bool,
}

impl CampaignRun {
    /// A fresh run.
    pub fn new(
        uid: String,
        target_version: String,
        prepared: Arc<PreparedCampaign>,
        manager: ManagerConfig,
        allow_downgrade: bool,
    ) -> Self {
        Self {
            uid,
            target_version,
            chunk_count: prepared.chunk_count(),
            expires_at: prepared.expires_at(),
            release_key_id: prepared.release_key_id(),
            prepared: Some(prepared),
            manager,
            allow_downgrade,
            devices: HashMap::new(),
            by_id: HashMap::new(),
            chunks_published: false,
            ended: false,
        }
    }
}

/// What the campaign status reports about a run's prepared payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunFacts {
    /// Chunks of the prepared image.
    pub chunk_count: u32,
    /// When its manifests expire (Unix seconds).
    pub expires_at: u64,
    /// The release key that signed the image.
    pub release_key_id: Option<[u8; 32]>,
}

/// The shared engine.
#[derive(Debug)]
pub struct Engine {
    /// Topic tree of this manager.
    pub topics: Arc<TopicTree>,
    /// The shared MQTT session.
    pub mqtt: MqttSession,
    /// Metrics.
    pub metrics: Metrics,
    runs: Mutex<HashMap<CampaignKey, CampaignRun>>,
    routes: Mutex<HashMap<String, CampaignKey>>,
    writes: DeviceWrites,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn campaign_record(
    key: &CampaignKey,
    run: &RunIds,
    phase: DevicePhase,
    attempts: u32,
    reason: Option<String>,
    message: Option<String>,
) -> DeviceCampaignStatus {
    DeviceCampaignStatus {
        name: key.1.clone(),
        uid: run.uid.clone(),
        target_version: run.target_version.clone(),
        phase,
        attempts,
        reason,
        message: message.map(|m| crate::status::bounded(&m, 512)),
        receipt: None,
        receipt_certificate_fingerprint: None,
        release_key_id: None,
    }
}

/// Longest receipt kept on a Device (base64 characters; the CRD's bound). Receipts are about 1 KiB.
pub const MAX_RECEIPT_TEXT: usize = 12288;

/// A signed receipt as the Device status keeps it: base64, and the certificate whose key signed it
/// (pure). A receipt over the bound is not kept (it would make the whole write fail).
pub fn kept_receipt(
    record: DeviceCampaignStatus,
    receipt: &[u8],
    signer_fingerprint: Option<[u8; 32]>,
    release_key: Option<[u8; 32]>,
) -> DeviceCampaignStatus {
    let text = base64::engine::general_purpose::STANDARD.encode(receipt);
    DeviceCampaignStatus {
        receipt: (text.len() <= MAX_RECEIPT_TEXT).then_some(text),
        receipt_certificate_fingerprint: signer_fingerprint.map(hex::encode),
        release_key_id: release_key.map(hex::encode),
        ..record
    }
}

/// The identifiers of a run that every Device record repeats.
struct RunIds {
    uid: String,
    target_version: String,
}

impl CampaignRun {
    /// Chunks of the prepared payload.
    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    fn ids(&self) -> RunIds {
        RunIds {
            uid: self.uid.clone(),
            target_version: self.target_version.clone(),
        }
    }
}

fn attempt_of(p: &Progress) -> u32 {
    match p {
        Progress::InFlight { attempt, .. } | Progress::Backoff { attempt, .. } => *attempt,
        _ => 1,
    }
}

impl Engine {
    /// Create the engine; Device status writes go to `writes`.
    pub fn new(
        topics: Arc<TopicTree>,
        mqtt: MqttSession,
        metrics: Metrics,
        writes: DeviceWrites,
    ) -> Self {
        Self {
            topics,
            mqtt,
            metrics,
            runs: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            writes,
        }
    }

    /// Device status writes queued or in progress (all campaigns).
    pub fn device_writes_pending(&self) -> usize {
        self.writes.pending()
    }

    /// Whether a run exists for the campaign (with this uid).
    pub fn has_run(&self, key: &CampaignKey, uid: &str) -> bool {
        lock(&self.runs).get(key).is_some_and(|r| r.uid == uid)
    }

    /// Install a run (replacing one of an older uid).
    pub fn insert_run(&self, key: CampaignKey, run: CampaignRun) {
        let old = lock(&self.runs).insert(key, run);
        if let Some(old) = old {
            let mut routes = lock(&self.routes);
            for d in old.devices.values() {
                routes.remove(&d.device_id);
            }
        }
    }

    /// Progress of each selected device (in the given order): the run's memory first, then what the
    /// Device status records for this campaign uid (restart resume), else not started.
    pub fn progress_of(
        &self,
        key: &CampaignKey,
        uid: &str,
        devices: &[Arc<Device>],
    ) -> Vec<Progress> {
        let mut runs = lock(&self.runs);
        let mut run = runs.get_mut(key).filter(|r| r.uid == uid);
        devices
            .iter()
            .map(|d| {
                let name = d.metadata.name.as_deref().unwrap_or_default();
                if let Some(dr) = run.as_ref().and_then(|r| r.devices.get(name)) {
                    return dr.progress.clone();
                }
                let recorded = d
                    .status
                    .as_ref()
                    .and_then(|s| s.campaign.as_ref())
                    .filter(|c| c.uid == uid);
                let progress = match recorded {
                    Some(c) if c.phase == DevicePhase::Succeeded => Progress::Succeeded,
                    Some(c) if c.phase == DevicePhase::Failed => Progress::Failed {
                        reason: c.reason.clone().unwrap_or_else(|| "Failed".into()),
                    },
                    // Started before a restart: the next start counts as a further attempt.
                    Some(c) => Progress::Backoff {
                        until: 0,
                        attempt: c.attempts.max(1),
                    },
                    None => Progress::NotStarted,
                };
                if progress.clone() != Progress::NotStarted {
                    if let Some(r) = run.as_mut() {
                        r.devices.insert(
                            name.to_owned(),
                            DeviceRun {
                                device_id: d.device_id(),
                                progress: progress.clone(),
                                session: None,
                                handshake: None,
                                base: d.status.clone(),
                                pin: d.spec.certificate_fingerprint.clone(),
                                issued_recorded: None,
                            },
                        );
                    }
                }
                progress
            })
            .collect()
    }

    /// Retained chunk publishes, the first time this run needs them.
    pub fn take_chunk_publishes(&self, key: &CampaignKey) -> Vec<Outbound> {
        let mut runs = lock(&self.runs);
        match runs.get_mut(key) {
            Some(run) if !run.chunks_published => {
                run.chunks_published = true;
                run.prepared
                    .as_ref()
                    .map(|p| p.chunk_publishes(&self.topics))
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Start (or restart) one device: a fresh session and its retained notify.
    pub fn start_device(
        &self,
        key: &CampaignKey,
        device: &Device,
        attempt: u32,
        deadline: u64,
        now: u64,
    ) -> Result<Vec<Action>, ProtocolError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let device_id = device.device_id();
        let pin = device.spec.certificate_fingerprint.clone();
        let mut runs = lock(&self.runs);
        let Some(run) = runs.get_mut(key) else {
            return Ok(Vec::new());
        };
        // What this replica wrote last is newer than what the reflector may have seen yet.
        let base = run
            .devices
            .get(&name)
            .and_then(|d| d.base.clone())
            .or_else(|| device.status.clone());
        let policy = credentials::policy(pin.as_deref(), base.as_ref());
        let target = DeviceTarget {
            device_id: device_id.clone(),
            pinned_fingerprint: policy.pin,
            allow_downgrade: run.allow_downgrade,
        };
        let Some(prepared) = run.prepared.clone() else {
            return Ok(Vec::new());
        };
        let (mut session, actions) = ManagerSession::start(&run.manager, prepared, target, now)?;
        // Certificates this operator issued (rotated, or pending: their receipt may have been
        // lost) are accepted like the pin; retired ones are refused even when pinned.
        for fp in policy.also_accept {
            session.also_accept_fingerprint(fp);
        }
        for fp in policy.refuse {
            session.refuse_fingerprint(fp);
        }
        run.by_id.insert(device_id.clone(), name.clone());
        run.devices.insert(
            name,
            DeviceRun {
                device_id: device_id.clone(),
                progress: Progress::InFlight { deadline, attempt },
                session: Some(session),
                handshake: None,
                base,
                pin,
                issued_recorded: None,
            },
        );
        lock(&self.routes).insert(device_id, key.clone());
        Ok(actions)
    }

    /// Apply timeouts decided by the rollout: drop the session, clear its notify, record failures.
    pub fn apply_timeouts(
        &self,
        key: &CampaignKey,
        names: &[String],
        outcomes: &[TimeoutOutcome],
        now: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut runs = lock(&self.runs);
        let Some(run) = runs.get_mut(key) else {
            return actions;
        };
        let ids = run.ids();
        for o in outcomes {
            let (index, progress) = match *o {
                TimeoutOutcome::Retry {
                    index,
                    until,
                    attempt,
                } => (index, Progress::Backoff { until, attempt }),
                TimeoutOutcome::Fail { index, .. } => (
                    index,
                    Progress::Failed {
                        reason: "Timeout".into(),
                    },
                ),
            };
            let Some(name) = names.get(index) else {
                continue;
            };
            let Some(dr) = run.devices.get_mut(name) else {
                continue;
            };
            if let Some(s) = dr.session.take() {
                actions.push(Action::Publish(s.abort_publish(now)));
            }
            lock(&self.routes).remove(&dr.device_id);
            if let TimeoutOutcome::Fail { attempts, .. } = *o {
                self.metrics
                    .device_failures
                    .with_label_values(&["Timeout"])
                    .inc();
                tracing::info!(campaign = %key.1, device = %name, attempts, "device timed out, out of attempts");
                let record = campaign_record(
                    key,
                    &ids,
                    DevicePhase::Failed,
                    attempts,
                    Some("Timeout".into()),
                    Some(format!("no signed receipt after {attempts} attempts")),
                );
                let status =
                    device_status(dr.base.as_ref(), dr.handshake.as_ref(), None, record, now);
                self.writes.send(DeviceWrite {
                    namespace: key.0.clone(),
                    name: name.clone(),
                    status,
                });
            } else {
                tracing::info!(campaign = %key.1, device = %name, "device attempt timed out, retrying after backoff");
            }
            dr.progress = progress;
        }
        actions
    }

    /// End the campaign on this replica: drop every session, send devices still in flight the
    /// signed abort (retained on their notify topic) and clear every chunk. Idempotent: the second
    /// call returns nothing.
    pub fn end_run(&self, key: &CampaignKey, now: u64) -> Vec<Action> {
        let mut runs = lock(&self.runs);
        let Some(run) = runs.get_mut(key) else {
            return Vec::new();
        };
        if run.ended {
            return Vec::new();
        }
        run.ended = true;
        let mut actions = Vec::new();
        let mut routes = lock(&self.routes);
        for dr in run.devices.values_mut() {
            if let Some(s) = dr.session.take() {
                actions.push(Action::Publish(s.abort_publish(now)));
            }
            routes.remove(&dr.device_id);
        }
        // The encrypted image is no longer needed: release it.
        if let Some(prepared) = run.prepared.take() {
            actions.extend(
                prepared
                    .clear_chunks(&self.topics)
                    .into_iter()
                    .map(Action::Publish),
            );
        }
        actions
    }

    /// Forget a run entirely (campaign deleted). Returns the clean-up publishes: the signed abort
    /// to every device still in flight (a connected device ends its session on it), then an empty
    /// retained publish on every notify topic of the run, so nothing of the campaign stays
    /// retained.
    pub fn remove_run(&self, key: &CampaignKey, now: u64) -> Vec<Action> {
        let mut actions = self.end_run(key, now);
        if let Some(run) = lock(&self.runs).remove(key) {
            actions.extend(
                run.devices
                    .values()
                    .map(|d| Action::Publish(clear_retained(self.topics.notify(&d.device_id)))),
            );
        }
        actions
    }

    /// What the campaign status reports about the run's prepared payload.
    pub fn run_facts(&self, key: &CampaignKey) -> Option<RunFacts> {
        lock(&self.runs).get(key).map(|r| RunFacts {
            chunk_count: r.chunk_count,
            expires_at: r.expires_at,
            release_key_id: r.release_key_id,
        })
    }

    /// Feed one inbound message to the session it belongs to and carry out what follows. When the
    /// output publishes the update of a rotation, the certificate it carries is first recorded as
    /// pending on the Device (awaited): if that write fails, nothing is published (the device asks
    /// again and the write is retried), so a certificate the Device does not know never leaves.
    pub async fn handle_inbound(&self, msg: Inbound) {
        let now = unix_now();
        let device = match self.topics.parse(&msg.topic) {
            Ok(TopicKind::Ready { device }) | Ok(TopicKind::Status { device }) => device,
            _ => return,
        };
        let Dispatched {
            actions,
            write,
            records_issued,
        } = self.dispatch(&device, &msg, now);
        match (write, records_issued) {
            (Some(w), Some((key, name, fp))) => {
                if !self.writes.send_confirmed(w).await {
                    tracing::warn!(device = %device, "the issued certificate could not be recorded on the Device: the update is held back until the device asks again");
                    return;
                }
                self.mark_issued_recorded(&key, &name, fp);
            }
            (Some(w), None) => self.writes.send(w),
            (None, _) => {}
        }
        if let Err(e) = self.mqtt.execute(actions).await {
            tracing::warn!(device = %device, error = %e, "publishing session output failed");
        }
    }

    fn mark_issued_recorded(&self, key: &CampaignKey, name: &str, fp: [u8; 32]) {
        if let Some(dr) = lock(&self.runs)
            .get_mut(key)
            .and_then(|r| r.devices.get_mut(name))
        {
            dr.issued_recorded = Some(fp);
        }
    }

    fn dispatch(&self, device: &str, msg: &Inbound, now: u64) -> Dispatched {
        let Some(key) = lock(&self.routes).get(device).cloned() else {
            // A device with no session here (finished, another replica's, or a stale retained).
            self.metrics
                .protocol_errors
                .with_label_values(&["no_session"])
                .inc();
            return Dispatched::default();
        };
        let mut runs = lock(&self.runs);
        let Some(run) = runs.get_mut(&key) else {
            return Dispatched::default();
        };
        let Some(name) = run.by_id.get(device).cloned() else {
            return Dispatched::default();
        };
        let Some(prepared) = run.prepared.clone() else {
            return Dispatched::default();
        };
        let ids = run.ids();
        let Some(dr) = run.devices.get_mut(&name) else {
            return Dispatched::default();
        };
        let attempts = attempt_of(&dr.progress);
        let Some(session) = dr.session.as_mut() else {
            return Dispatched::default();
        };
        let out = match session.handle(msg, now) {
            Ok(out) => out,
            Err(e) => {
                self.metrics
                    .protocol_errors
                    .with_label_values(&[e.metric_label()])
                    .inc();
                tracing::debug!(campaign = %key.1, device = %device, error = %e, "ignored invalid message");
                return Dispatched::default();
            }
        };
        let issued = session.issued_certificate();
        let mut actions = out.actions;
        let mut result: Option<Outcome> = None;
        let mut proof: Option<[u8; 32]> = None;
        for ev in out.events {
            match ev {
                ManagerEvent::HandshakeCompleted {
                    device_cert_fingerprint,
                    device_cert_not_after,
                    running_version,
                } => {
                    self.metrics.handshakes.inc();
                    tracing::info!(campaign = %key.1, device = %device, running = %running_version, "handshake completed");
                    proof = Some(device_cert_fingerprint);
                    dr.handshake = Some(Handshake {
                        fingerprint: device_cert_fingerprint,
                        not_after: device_cert_not_after,
                        running_version,
                    });
                    if result.is_none() {
                        result = Some(Outcome::phase(DevicePhase::Transferring));
                    }
                }
                ManagerEvent::Progress { .. } => {}
                ManagerEvent::ChunksRequested { indices } => {
                    actions.extend(
                        indices
                            .into_iter()
                            .filter(|i| *i < prepared.chunk_count())
                            .map(|i| Action::Publish(prepared.chunk_publish(&self.topics, i))),
                    );
                }
                ManagerEvent::Installed {
                    version,
                    receipt,
                    release_key,
                } => {
                    self.metrics.installs.inc();
                    tracing::info!(campaign = %key.1, device = %device, version = %version, "signed install receipt");
                    dr.progress = Progress::Succeeded;
                    result = Some(Outcome {
                        version: Some(version),
                        settles: issued,
                        receipt: Some(receipt),
                        release_key,
                        ..Outcome::phase(DevicePhase::Succeeded)
                    });
                }
                ManagerEvent::RolledBack {
                    version,
                    reason,
                    receipt,
                } => {
                    self.metrics
                        .device_failures
                        .with_label_values(&[ROLLED_BACK])
                        .inc();
                    tracing::warn!(campaign = %key.1, device = %device, version = %version, reason = %reason, "device rolled back after install (signed receipt)");
                    dr.progress = Progress::Failed {
                        reason: ROLLED_BACK.to_owned(),
                    };
                    result = Some(Outcome {
                        reason: Some(ROLLED_BACK.to_owned()),
                        message: Some(format!(
                            "installed {version}, failed its health check and rolled back: {reason}"
                        )),
                        receipt: Some(receipt),
                        ..Outcome::phase(DevicePhase::Failed)
                    });
                }
                ManagerEvent::Rejected { reason, receipt } => {
                    let label = reason.metric_label();
                    self.metrics
                        .device_failures
                        .with_label_values(&[label])
                        .inc();
                    tracing::info!(campaign = %key.1, device = %device, reason = %reason, "device refused the update");
                    dr.progress = Progress::Failed {
                        reason: label.to_owned(),
                    };
                    result = Some(Outcome {
                        reason: Some(label.to_owned()),
                        message: Some(reason.to_string()),
                        receipt,
                        ..Outcome::phase(DevicePhase::Failed)
                    });
                }
            }
        }
        // A rotation's update about to leave carries a certificate the Device does not list yet.
        let finished = matches!(dr.progress, Progress::Succeeded | Progress::Failed { .. });
        let unrecorded = issued.filter(|i| {
            !finished
                && dr.issued_recorded != Some(i.fingerprint)
                && actions.iter().any(|a| matches!(a, Action::Publish(_)))
        });
        if unrecorded.is_some() && result.is_none() {
            result = Some(Outcome::phase(DevicePhase::Transferring));
        }
        if finished {
            if let Some(s) = dr.session.take() {
                actions.push(Action::Publish(s.clear_notify()));
            }
            lock(&self.routes).remove(device);
        }
        let signer = dr.handshake.as_ref().map(|h| h.fingerprint);
        let write = result.map(|o| {
            let mut base = dr.base.clone().unwrap_or_default();
            if let Some(fp) = proof {
                base = credentials::on_proof(base, dr.pin.as_deref(), fp);
            }
            if let Some(i) = &unrecorded {
                base = credentials::record_issued(base, i, &key.1);
            }
            let mut record = campaign_record(&key, &ids, o.phase, attempts, o.reason, o.message);
            if let Some(receipt) = &o.receipt {
                record = kept_receipt(record, receipt, signer, o.release_key);
            }
            let mut status = device_status(
                Some(&base),
                dr.handshake.as_ref(),
                o.version.as_deref(),
                record,
                now,
            );
            if let Some(i) = &o.settles {
                // The signed receipt of a rotation: the device holds the certificate it issued.
                status = credentials::settle(status, dr.pin.as_deref(), i.fingerprint, i.not_after);
            }
            dr.base = Some(status.clone());
            DeviceWrite {
                namespace: key.0.clone(),
                name: name.clone(),
                status,
            }
        });
        Dispatched {
            actions,
            records_issued: unrecorded
                .filter(|_| write.is_some())
                .map(|i| (key.clone(), name.clone(), i.fingerprint)),
            write,
        }
    }
}

/// Reason recorded for a device whose signed receipt says it rolled back.
pub const ROLLED_BACK: &str = "RolledBack";

/// What one inbound message leads to.
#[derive(Debug, Default)]
struct Dispatched {
    actions: Vec<Action>,
    write: Option<DeviceWrite>,
    /// The write records this issued certificate as pending: the actions wait for it.
    records_issued: Option<(CampaignKey, String, [u8; 32])>,
}

/// A device transition worth a Device status write.
struct Outcome {
    phase: DevicePhase,
    version: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    /// For the receipt of a rotation: the certificate the device now holds.
    settles: Option<IssuedCertificate>,
    /// The signed receipt, kept on the Device.
    receipt: Option<Vec<u8>>,
    /// The release key the device verified.
    release_key: Option<[u8; 32]>,
}

impl Outcome {
    fn phase(phase: DevicePhase) -> Self {
        Self {
            phase,
            version: None,
            reason: None,
            message: None,
            settles: None,
            receipt: None,
            release_key: None,
        }
    }
}

/// An empty retained publish (clears a retained message).
pub fn clear_retained(topic: String) -> Outbound {
    Outbound {
        topic,
        payload: Vec::new(),
        retain: true,
        properties: Properties::default(),
    }
}

/// Senders to the Device status writers. A device always goes to the same writer, so its transitions
/// land in order, while different devices are written in parallel.
#[derive(Clone, Debug)]
pub struct DeviceWrites {
    shards: Vec<mpsc::UnboundedSender<QueuedWrite>>,
    /// Writes sent and not yet finished (written, or given up after the retries).
    pending: Arc<AtomicUsize>,
}

impl DeviceWrites {
    /// Start `shards` writer tasks; returns the senders and the tasks.
    pub fn spawn(
        client: &Client,
        metrics: &Metrics,
        shards: usize,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let pending = Arc::new(AtomicUsize::new(0));
        let (senders, tasks): (Vec<_>, Vec<_>) = (0..shards.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(run_device_writer(
                    client.clone(),
                    rx,
                    metrics.clone(),
                    Arc::clone(&pending),
                ));
                (tx, task)
            })
            .unzip();
        (
            Self {
                shards: senders,
                pending,
            },
            tasks,
        )
    }

    /// Writes sent and not yet finished.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Queue a write on the device's writer.
    pub fn send(&self, w: DeviceWrite) {
        self.queue(w, None);
    }

    /// Queue a write on the device's writer (after the ones queued before it) and wait until it
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
        let shard = (h.finish() % self.shards.len() as u64) as usize;
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.shards[shard]
            .send(QueuedWrite { write, done })
            .is_err()
        {
            // The writer is gone (shutting down): nothing will finish this write.
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A write and, when the sender waits for it, where to say whether it landed.
#[derive(Debug)]
struct QueuedWrite {
    write: DeviceWrite,
    done: Option<oneshot::Sender<bool>>,
}

/// Write Device statuses in order for the devices of one shard.
async fn run_device_writer(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<QueuedWrite>,
    metrics: Metrics,
    pending: Arc<AtomicUsize>,
) {
    while let Some(QueuedWrite { write: w, done }) = rx.recv().await {
        let api: Api<Device> = Api::namespaced(client.clone(), &w.namespace);
        let patch = serde_json::json!({
            "apiVersion": "ota.sealed-ota.dev/v1alpha1",
            "kind": "Device",
            "status": w.status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut delay = Duration::from_millis(200);
        let mut landed = false;
        for attempt in 1..=6 {
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
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: DevicePhase) -> DeviceCampaignStatus {
        DeviceCampaignStatus {
            name: "c".into(),
            uid: "u".into(),
            target_version: "2.0.0".into(),
            phase,
            attempts: 1,
            reason: None,
            message: None,
            receipt: None,
            receipt_certificate_fingerprint: None,
            release_key_id: None,
        }
    }

    #[test]
    fn device_status_keeps_owned_fields_and_prefers_new_facts() {
        let base = DeviceStatus {
            running_version: Some("1.0.0".into()),
            last_seen: Some(k8s_time(10)),
            certificate_fingerprint: Some("aa".into()),
            certificate_not_after: Some(k8s_time(99)),
            rotated_certificate_fingerprint: None,
            pending_certificates: vec![],
            retired_certificate_fingerprints: vec![],
            campaign: None,
            conditions: vec![],
        };
        // Timeout without a handshake: nothing new was seen; keep what we had.
        let s = device_status(Some(&base), None, None, record(DevicePhase::Failed), 500);
        assert_eq!(s.running_version.as_deref(), Some("1.0.0"));
        assert_eq!(s.last_seen, Some(k8s_time(10)));
        assert_eq!(s.certificate_fingerprint.as_deref(), Some("aa"));
        assert_eq!(s.campaign.unwrap().phase, DevicePhase::Failed);

        let hs = Handshake {
            fingerprint: [1; 32],
            not_after: 1000,
            running_version: "1.0.0".into(),
        };
        let s = device_status(
            Some(&base),
            Some(&hs),
            Some("2.0.0"),
            record(DevicePhase::Succeeded),
            600,
        );
        assert_eq!(s.running_version.as_deref(), Some("2.0.0"));
        assert_eq!(s.last_seen, Some(k8s_time(600)));
        assert_eq!(s.certificate_fingerprint, Some(hex::encode([1u8; 32])));
        assert_eq!(s.certificate_not_after, Some(k8s_time(1000)));
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(ready.last_transition_time, k8s_time(600));
        // Same status again: the transition time stays.
        let again = device_status(
            Some(&s),
            Some(&hs),
            Some("2.0.0"),
            record(DevicePhase::Succeeded),
            900,
        );
        assert_eq!(again.conditions[0].last_transition_time, k8s_time(600));
        let failed = device_status(Some(&s), None, None, record(DevicePhase::Failed), 950);
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[0].reason, "UpdateFailed");
    }

    #[test]
    fn credential_fields_survive_every_later_write() {
        // Server-side apply drops an owned field a later apply leaves out: the credential lists
        // must be carried by every write built from the last status.
        let issued = IssuedCertificate {
            fingerprint: [2; 32],
            not_after: 5000,
        };
        let first = device_status(None, None, None, record(DevicePhase::Transferring), 600);
        let with_pending = credentials::record_issued(first, &issued, "rot");
        let later = device_status(
            Some(&with_pending),
            None,
            None,
            record(DevicePhase::Failed),
            700,
        );
        assert_eq!(
            later.pending_certificates,
            with_pending.pending_certificates
        );
        let settled = credentials::settle(later, None, [2; 32], 5000);
        let after = device_status(
            Some(&settled),
            None,
            None,
            record(DevicePhase::Pending),
            800,
        );
        assert_eq!(
            after.rotated_certificate_fingerprint,
            Some(hex::encode([2u8; 32]))
        );
        assert_eq!(
            after.retired_certificate_fingerprints,
            settled.retired_certificate_fingerprints
        );
    }

    #[test]
    fn receipts_are_kept_in_base64_with_their_signer_and_bounded() {
        let r = kept_receipt(
            record(DevicePhase::Succeeded),
            b"signed",
            Some([3; 32]),
            Some([4; 32]),
        );
        assert_eq!(r.receipt.as_deref(), Some("c2lnbmVk"));
        assert_eq!(
            r.receipt_certificate_fingerprint,
            Some(hex::encode([3u8; 32]))
        );
        assert_eq!(r.release_key_id, Some(hex::encode([4u8; 32])));
        let huge = kept_receipt(record(DevicePhase::Succeeded), &[0; 10_000], None, None);
        assert_eq!(huge.receipt, None, "over the CRD bound: not kept");
    }

    #[test]
    fn clear_retained_is_empty_and_retained() {
        let o = clear_retained("iot/m/d/notify".into());
        assert!(o.retain && o.payload.is_empty());
    }
}
