//! Device side: one sans-IO session answering notifies and signed aborts, decrypting the update,
//! checking the signed manifest (anti-rollback, expiry, release signature), pulling chunks in
//! bounded windows, sending signed status reports, and the signed receipt of the final outcome
//! (Installed after commit, RolledBack after a failed health check, Rejected), which it can send
//! after a restart from what [`DeviceState`] persisted. Plaintext chunks are handed out as events,
//! never buffered whole. No I/O here.
//!
//! Install flow: [`DeviceEvent::ImageComplete`] → the caller hashes what it stored →
//! [`DeviceSession::stage_install`] (refuses with a signed `Rejected(Expired)` past the expiry;
//! otherwise records [`PendingInstall`]: persist the state now, before switching the image) → the
//! caller switches the image (A/B, reboot, health check) → [`DeviceSession::report_final`] with
//! `Committed` (signed `Installed`) or `RolledBack` (signed `RolledBack`). After a restart the
//! persisted `pending_install` tells the caller to reconcile and report.

use crate::prelude::*;

use alloc::sync::Arc;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, SessionKeys, Transcript};
use crate::error::ProtocolError;
use crate::identity::{generate_csr, Identity, PeerCertificate, Role, TrustAnchor};
use crate::manifest::{bounded_text, Manifest, PayloadKind, RejectReason, MAX_REASON_TEXT};
use crate::mqtt::check_hints;
use crate::mqtt::{Action, Inbound, Outbound, Properties, CONTENT_TYPE, VERSION_PROPERTY};
use crate::release::{ReleaseKey, ReleaseSignature};
use crate::topics::{TopicKind, TopicTree};
use crate::wire::{
    self, Claim, Have, ReadyBody, ReceiptBody, SignedEnvelope, StatusBody, StatusMsg, UpdateBody,
};
use crate::wire::{STATUS_AAD_LABEL, UPDATE_AAD_LABEL};
use crate::WIRE_VERSION;

/// Campaigns remembered as finished (so a retained notify is not answered again).
pub const MAX_COMPLETED: usize = 32;
/// Default seconds to wait for a chunk window (or for the update after ready) before asking again.
pub const DEFAULT_WINDOW_TIMEOUT: u64 = 30;

/// Received-chunk bitmap, persisted as hex in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    bits: u32,
    #[serde(with = "hex_bytes")]
    words: Vec<u8>,
}

mod hex_bytes {
    use crate::prelude::*;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

impl Bitmap {
    /// All clear, `bits` long.
    pub fn new(bits: u32) -> Self {
        Self {
            bits,
            words: vec![0; (bits as usize).div_ceil(8)],
        }
    }
    /// Length in bits.
    pub fn len(&self) -> u32 {
        self.bits
    }
    /// Whether zero-length.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }
    /// Bit `i` (false beyond the end).
    pub fn get(&self, i: u32) -> bool {
        i < self.bits
            && self
                .words
                .get(i as usize / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
    /// Set bit `i`; returns whether it was newly set.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.bits || self.get(i) {
            return false;
        }
        if let Some(b) = self.words.get_mut(i as usize / 8) {
            *b |= 1 << (i % 8);
        }
        true
    }
    /// Number of set bits.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|b| b.count_ones()).sum()
    }
    fn consistent(&self) -> bool {
        self.words.len() == (self.bits as usize).div_ceil(8)
    }
}

/// A partially received image, persisted so that a restarted device resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferState {
    /// Campaign.
    pub campaign_id: String,
    /// Signed manifest content.
    pub manifest: Manifest,
    /// Chunks stored.
    pub received: Bitmap,
}

/// Device state persisted by the caller (JSON) between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceState {
    /// Firmware version running.
    pub running_version: String,
    /// Finished campaigns (bounded to [`MAX_COMPLETED`], oldest dropped).
    pub completed_campaigns: Vec<String>,
    /// Partial transfer.
    pub transfer: Option<TransferState>,
    /// How the most recent campaign ended on this device and which session ended it, so that a
    /// *new* session of that campaign (a restarted manager that never got the receipt) is answered
    /// instead of ignored. Absent in state saved by older versions (such a campaign stays ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_completion: Option<Completion>,
    /// An image staged for install whose final outcome has not been reported yet (set by
    /// [`DeviceSession::stage_install`] before the image is switched, cleared by
    /// [`DeviceSession::report_final`]). After a restart the caller reconciles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_install: Option<PendingInstall>,
    /// The newest signed abort seen: notifies of that campaign issued at or before it are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_abort: Option<AbortRecord>,
}

/// What binds a receipt to a session (all public values; no key is persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionBinding {
    /// Session id.
    #[serde(with = "hex_array")]
    pub session_id: [u8; 16],
    /// Transcript hash.
    #[serde(with = "hex_array")]
    pub transcript: [u8; 32],
    /// `issued_at` of the session's notify.
    pub issued_at: u64,
}

/// An install staged and not yet reported (persisted in [`DeviceState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInstall {
    /// Campaign.
    pub campaign_id: String,
    /// The session the image arrived in (the receipt is bound to it unless a newer session of the
    /// campaign is live when the outcome is reported).
    pub binding: SessionBinding,
    /// Version being installed.
    pub version: String,
    /// SHA-256 of the image (from the signed manifest).
    #[serde(with = "hex_array")]
    pub sha256: [u8; 32],
    /// Size in bytes.
    pub size: u64,
    /// Release key whose signature the device verified, if it checked one.
    #[serde(
        default,
        with = "hex_opt_array",
        skip_serializing_if = "Option::is_none"
    )]
    pub release_key: Option<[u8; 32]>,
}

/// A signed abort the device accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRecord {
    /// Campaign aborted.
    pub campaign_id: String,
    /// Sessions notified at or before this time ended.
    pub issued_at: u64,
}

/// The end of the most recent campaign on a device (persisted in [`DeviceState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// Campaign.
    pub campaign_id: String,
    /// Session that completed it (its retained notify seen again is ignored).
    #[serde(with = "hex_array")]
    pub session_id: [u8; 16],
    /// `issued_at` of that session's notify (an older notify of the campaign is ignored).
    pub issued_at: u64,
    /// What was installed, for a firmware campaign that succeeded (`None`: refused, rolled back, or
    /// credentials).
    pub installed: Option<InstalledImage>,
    /// What was tried and rolled back, for a firmware campaign whose health check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBackImage>,
}

/// A firmware image the device installed (from the signed manifest it verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledImage {
    /// Version.
    pub version: String,
    /// SHA-256 of the image.
    #[serde(with = "hex_array")]
    pub sha256: [u8; 32],
    /// Release key whose signature the device verified, if it checked one.
    #[serde(
        default,
        with = "hex_opt_array",
        skip_serializing_if = "Option::is_none"
    )]
    pub release_key: Option<[u8; 32]>,
}

/// A firmware image the device installed, found unhealthy and rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBackImage {
    /// Version tried.
    pub version: String,
    /// SHA-256 of the image tried.
    #[serde(with = "hex_array")]
    pub sha256: [u8; 32],
    /// Why (bounded).
    pub reason: String,
}

mod hex_array {
    use crate::prelude::*;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; N]>::try_from(v).map_err(|_| serde::de::Error::custom("wrong length"))
    }
}

mod hex_opt_array {
    use crate::prelude::*;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer, const N: usize>(
        v: &Option<[u8; N]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&hex::encode(v)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; N]>::try_from(v)
            .map(Some)
            .map_err(|_| serde::de::Error::custom("wrong length"))
    }
}

impl DeviceState {
    /// Fresh state for a device running `version`.
    pub fn new(version: &str) -> Self {
        Self {
            running_version: version.to_string(),
            ..Self::default()
        }
    }
    fn complete(&mut self, campaign: &str) {
        if !self.completed_campaigns.iter().any(|c| c == campaign) {
            if self.completed_campaigns.len() >= MAX_COMPLETED {
                self.completed_campaigns.remove(0);
            }
            self.completed_campaigns.push(campaign.to_string());
        }
    }
}

/// Device configuration.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device identity.
    pub identity: Arc<Identity>,
    /// CA trust anchor.
    pub trust: Arc<TrustAnchor>,
    /// Topic tree.
    pub topics: Arc<TopicTree>,
    /// Manager id expected in notifies (and its certificate name).
    pub manager_id: String,
    /// MQTT Maximum Packet Size this device accepts (0 = no limit).
    pub max_packet_size: u32,
    /// Chunk topics subscribed at once (at least 1).
    pub window: u32,
    /// Release public keys this device trusts (from enrollment). Empty: release signatures are not
    /// required. Otherwise firmware must carry a release signature by one of them that verifies for
    /// the image and version, or the device refuses it (signed `Rejected(ReleaseSignature)`).
    pub release_keys: Vec<ReleaseKey>,
}

/// Where a device session reports the secrets it handles, for tests that scan what a broker saw
/// for them (as rustls's `KeyLog`). ⚠️ Never set one in production: it exposes every session key,
/// content key and delivered private key.
pub trait KeyLog: Send + Sync + core::fmt::Debug {
    /// `label`: `session-m2d`, `session-d2m`, `content-key` or `delivered-key` (the delivered
    /// private key's 32-byte scalar).
    fn log(&self, label: &str, session_id: &[u8; 16], secret: &[u8]);
}

/// Result of feeding a message.
#[derive(Debug, Default)]
pub struct DeviceOutput {
    /// What to do on the connection.
    pub actions: Vec<Action>,
    /// What happened.
    pub events: Vec<DeviceEvent>,
}

/// Things the device application reacts to.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A signed manifest was accepted; chunks follow.
    UpdateOffered {
        /// The manifest.
        manifest: Manifest,
    },
    /// Plaintext chunk: write at `offset`.
    Chunk {
        /// Index.
        index: u32,
        /// Byte offset in the image.
        offset: u64,
        /// Plaintext.
        data: Vec<u8>,
    },
    /// Every chunk arrived: hash what was stored, then call `stage_install` (or `finish_install`).
    ImageComplete {
        /// The manifest.
        manifest: Manifest,
    },
    /// New credentials, validated (chain to the CA, names this device, key matches). The signed
    /// Installed receipt has already been sent.
    CredentialsDelivered {
        /// New certificate.
        cert_pem: String,
        /// New private key (PKCS#8 PEM).
        key_pem: Zeroizing<String>,
    },
    /// The device refused (a signed Rejected receipt has been sent).
    Rejected {
        /// Why.
        reason: RejectReason,
    },
    /// A signed abort ended the session of this campaign (nothing was sent; the transfer state
    /// is kept for a later session of the campaign).
    Aborted {
        /// Campaign.
        campaign_id: String,
    },
}

impl core::fmt::Debug for DeviceEvent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DeviceEvent::UpdateOffered { manifest } => f
                .debug_struct("UpdateOffered")
                .field("manifest", manifest)
                .finish(),
            DeviceEvent::Chunk {
                index,
                offset,
                data,
            } => f
                .debug_struct("Chunk")
                .field("index", index)
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            DeviceEvent::ImageComplete { manifest } => f
                .debug_struct("ImageComplete")
                .field("manifest", manifest)
                .finish(),
            DeviceEvent::CredentialsDelivered { .. } => {
                f.write_str("CredentialsDelivered(<redacted>)")
            }
            DeviceEvent::Rejected { reason } => {
                f.debug_struct("Rejected").field("reason", reason).finish()
            }
            DeviceEvent::Aborted { campaign_id } => f
                .debug_struct("Aborted")
                .field("campaign_id", campaign_id)
                .finish(),
        }
    }
}

/// The final outcome of a staged install, reported with [`DeviceSession::report_final`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalOutcome {
    /// The new image runs and is committed: a signed `Installed` receipt.
    Committed,
    /// The new image failed its health check and the previous one runs again: a signed
    /// `RolledBack` receipt.
    RolledBack {
        /// Why (device text; at most 256 characters are kept).
        reason: String,
    },
    /// The install failed and the device cannot say that the previous image runs again (an
    /// installer without rollback, a rollback that failed, an image lost before the install
    /// began): a signed `Rejected(InstallFailed(reason))`, which claims no version. The running
    /// version recorded stays what it was.
    Failed {
        /// Why, including whether anything was changed (device text; at most 256 characters are
        /// kept).
        reason: String,
    },
}

struct Handshake {
    session_id: [u8; 16],
    campaign_id: String,
    kind: PayloadKind,
    issued_at: u64,
    /// The campaign's expiry (notify, then the signed manifest's): the session ends there.
    expires_at: u64,
    manager_nonce: [u8; 32],
    manager: PeerCertificate,
    transcript: [u8; 32],
    keys: SessionKeys,
    ready: Outbound,
    ready_sent_at: u64,
    update_received: bool,
    seq: u32,
    csr_key: Option<Zeroizing<Vec<u8>>>,
    /// Release key verified for this session's firmware.
    release_key: Option<[u8; 32]>,
    finished: bool,
}

impl Handshake {
    fn binding(&self) -> SessionBinding {
        SessionBinding {
            session_id: self.session_id,
            transcript: self.transcript,
            issued_at: self.issued_at,
        }
    }
}

/// Device half of the protocol.
pub struct DeviceSession {
    config: DeviceConfig,
    state: DeviceState,
    hs: Option<Handshake>,
    content_key: Option<Zeroizing<[u8; 32]>>,
    window: Vec<u32>,
    window_deadline: u64,
    window_timeout: u64,
    /// What the next window timeout does: see [`WindowRecovery`].
    window_recovery: WindowRecovery,
    image_complete: bool,
    key_log: Option<Arc<dyn KeyLog>>,
    /// Ephemeral keys, nonces and AES-GCM nonces of status messages.
    rng: Box<dyn CryptoRngCore + Send>,
}

impl core::fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceSession")
            .field("device", &self.config.identity.name())
            .field("state", &self.state)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// Returns the subscription to this device's notify and update topics. Randomness comes from
    /// the operating system ([`rand_core::OsRng`]).
    #[cfg(feature = "std")]
    pub fn new(config: DeviceConfig, state: DeviceState) -> (Self, Vec<Action>) {
        Self::with_rng(config, state, Box::new(rand_core::OsRng))
    }

    /// As [`DeviceSession::new`], drawing every random value (ephemeral keys, nonces) from `rng`:
    /// the constructor of `no_std` builds, where the board's hardware RNG (or a CSPRNG seeded
    /// from it) is passed in.
    pub fn with_rng(
        config: DeviceConfig,
        state: DeviceState,
        rng: Box<dyn CryptoRngCore + Send>,
    ) -> (Self, Vec<Action>) {
        let mut state = state;
        if state.transfer.as_ref().is_some_and(|t| {
            !t.received.consistent() || t.received.len() != t.manifest.transfer().chunk_count
        }) {
            state.transfer = None; // corrupt persisted bitmap: start over
        }
        let s = Self {
            config,
            state,
            hs: None,
            content_key: None,
            window: Vec::new(),
            window_deadline: 0,
            window_timeout: DEFAULT_WINDOW_TIMEOUT,
            window_recovery: WindowRecovery::Resubscribe,
            image_complete: false,
            key_log: None,
            rng,
        };
        let actions = vec![s.base_subscribe()];
        (s, actions)
    }

    /// Change the window timeout (seconds).
    pub fn set_window_timeout(&mut self, secs: u64) {
        self.window_timeout = secs.max(1);
    }

    /// Report the secrets this session handles to `log` (tests only: see [`KeyLog`]).
    pub fn set_key_log(&mut self, log: Arc<dyn KeyLog>) {
        self.key_log = Some(log);
    }

    fn log_secret(&self, label: &str, session_id: &[u8; 16], secret: &[u8]) {
        if let Some(log) = &self.key_log {
            log.log(label, session_id, secret);
        }
    }

    fn me(&self) -> &str {
        self.config.identity.name()
    }

    fn base_subscribe(&self) -> Action {
        Action::Subscribe(self.base_filters())
    }

    /// The device's own notify and update topics.
    fn base_filters(&self) -> Vec<String> {
        let me = self.me();
        vec![self.config.topics.notify(me), self.config.topics.update(me)]
    }

    /// The chunk topics of the current window still missing (empty when no window is open or the
    /// content key is not known yet). A chunk already stored is not subscribed again: on a new
    /// connection the broker would deliver its retained copy again, and while subscribed every
    /// republish of it for another device would reach this one too.
    fn window_filters(&self) -> Vec<String> {
        match &self.state.transfer {
            Some(t) if !self.window.is_empty() && self.content_key.is_some() => self
                .window
                .iter()
                .filter(|&&i| !t.received.get(i))
                .map(|&i| self.config.topics.chunk(&t.campaign_id, i))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every filter the session wants subscribed now: its notify and update topics and the
    /// current window's chunks. A client subscribes them again when the broker refused some in a
    /// SUBACK (the session cannot see a SUBACK: it would wait for messages that never come).
    pub fn subscriptions(&self) -> Vec<String> {
        let mut filters = self.base_filters();
        filters.extend(self.window_filters());
        filters
    }

    /// Persistable state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Chunk indices currently subscribed.
    pub fn window(&self) -> &[u32] {
        &self.window
    }

    /// Replace the identity (after a credential rotation was persisted). Takes effect for the next
    /// handshake.
    pub fn set_identity(&mut self, identity: Arc<Identity>) {
        self.config.identity = identity;
    }

    /// Feed a message from notify, update or a chunk topic.
    pub fn handle(&mut self, msg: &Inbound, now: u64) -> Result<DeviceOutput, ProtocolError> {
        let kind = self.config.topics.parse(&msg.topic)?;
        let me = self.me().to_string();
        match kind {
            TopicKind::Notify { device } | TopicKind::Update { device } if device != me => {
                Err(ProtocolError::WrongDevice {
                    expected: me,
                    got: device,
                })
            }
            TopicKind::Notify { .. } => self.handle_notify(msg, now),
            TopicKind::Update { .. } => self.handle_update(msg, now),
            TopicKind::Chunk { campaign, index } => self.handle_chunk(msg, &campaign, index, now),
            _ => Err(ProtocolError::UnexpectedMessage {
                message: "publish",
                state: "device",
            }),
        }
    }

    /// End the current session: release the chunk window and the content key.
    fn end_session(&mut self, out: &mut DeviceOutput) {
        if let Some(a) = self.window_unsubscribe() {
            out.actions.push(a);
        }
        self.drop_window();
        self.content_key = None;
        self.image_complete = false;
        self.hs = None;
    }

    fn handle_notify(&mut self, msg: &Inbound, now: u64) -> Result<DeviceOutput, ProtocolError> {
        if msg.payload.is_empty() {
            // A cleared retained notify proves nothing (anyone on the broker can publish it): it
            // ends no session. Sessions end by a signed abort, completion, or expiry.
            return Ok(DeviceOutput::default());
        }
        if SignedEnvelope::peek_type(&msg.payload, "notify", wire::MAX_ABORT)? == wire::TYPE_ABORT {
            return self.handle_abort(msg, now);
        }
        let (env, body) = wire::decode_notify(&msg.payload)?;
        let me = self.me().to_string();
        let manager = self.verify_from_manager(
            &env,
            "notify",
            (&body.device_id, &body.manager_id),
            &body.manager_cert,
            now,
        )?;
        check_hints(
            &msg.properties,
            Some(&self.config.topics.ready(&me)),
            &body.session_id,
        )?;
        if now >= body.expires_at {
            return Err(ProtocolError::Expired);
        }
        if self
            .state
            .last_abort
            .as_ref()
            .is_some_and(|a| a.campaign_id == body.campaign_id && body.issued_at <= a.issued_at)
        {
            // A session the manager aborted (or an older one): replayed, ignored.
            return Ok(DeviceOutput::default());
        }
        if self
            .state
            .pending_install
            .as_ref()
            .is_some_and(|p| p.campaign_id != body.campaign_id)
        {
            // Busy installing another campaign's image until its outcome is reported.
            return Ok(DeviceOutput::default());
        }
        if self
            .state
            .completed_campaigns
            .iter()
            .any(|c| c == &body.campaign_id)
        {
            // Already finished. The retained notify of the session that finished it (or an older
            // one) is ignored; a newer session of the campaign this device completed last means the
            // manager never got the result (it restarted): answer it, and the update is answered
            // with a fresh receipt (firmware already installed or rolled back) or handled again
            // (see `handle_update`).
            let new_session_of_last = self.state.last_completion.as_ref().is_some_and(|c| {
                c.campaign_id == body.campaign_id
                    && c.session_id != body.session_id
                    && body.issued_at >= c.issued_at
            });
            if !new_session_of_last {
                return Ok(DeviceOutput::default());
            }
        }
        if let Some(hs) = &mut self.hs {
            if hs.session_id == body.session_id && hs.manager_nonce == body.nonce {
                if hs.update_received || hs.finished {
                    return Ok(DeviceOutput::default());
                }
                hs.ready_sent_at = now;
                return Ok(DeviceOutput {
                    actions: vec![Action::Publish(hs.ready.clone())],
                    events: vec![],
                });
            }
            if body.issued_at < hs.issued_at {
                return Err(ProtocolError::Replay);
            }
        }
        let manager_eph = crypto::parse_public(&body.ephemeral).ok_or(ProtocolError::Decode {
            message: "notify",
            detail: "ephemeral key".into(),
        })?;
        // A new session replaces any previous one.
        let mut out = DeviceOutput::default();
        self.end_session(&mut out);

        let eph = p256::SecretKey::random(&mut self.rng);
        let eph_pub = crypto::public_bytes(&eph.public_key());
        let nonce: [u8; 32] = crypto::random_with(&mut *self.rng);
        let (csr_key, csr) = if body.kind == PayloadKind::CredentialsCsr {
            let (k, c) = generate_csr(Role::Device, &me)?;
            (Some(k), Some(c))
        } else {
            (None, None)
        };
        let have = self
            .state
            .transfer
            .as_ref()
            .filter(|t| t.campaign_id == body.campaign_id)
            .map(|t| Have {
                campaign_id: t.campaign_id.clone(),
                merkle_root: t.manifest.transfer().merkle_root,
                received: t.received.count(),
            });
        let ready_body = ReadyBody {
            v: WIRE_VERSION,
            session_id: body.session_id,
            manager_id: body.manager_id.clone(),
            device_id: me.clone(),
            campaign_id: body.campaign_id.clone(),
            device_cert: self.config.identity.cert_der().to_vec(),
            ephemeral: eph_pub.clone(),
            nonce,
            manager_nonce: body.nonce,
            running_version: self.state.running_version.clone(),
            max_packet_size: self.config.max_packet_size,
            csr,
            have,
        };
        let env_r = SignedEnvelope::sign(
            self.config.identity.signing_key(),
            wire::TYPE_READY,
            wire::encode_msg(&ready_body),
        );
        let transcript = Transcript {
            manager_id: &body.manager_id,
            device_id: &me,
            campaign_id: &body.campaign_id,
            session_id: &body.session_id,
            manager_nonce: &body.nonce,
            device_nonce: &nonce,
            manager_ephemeral: &body.ephemeral,
            device_ephemeral: &eph_pub,
            manager_cert_fingerprint: &manager.fingerprint,
            device_cert_fingerprint: &self.config.identity.fingerprint(),
        }
        .hash();
        let ee = crypto::ecdh(&eph, &manager_eph);
        // The ephemeral secret is needed for nothing else: dropped (and zeroized) here.
        drop(eph);
        let ss = crypto::ecdh(self.config.identity.secret(), &manager.public_key);
        let keys = crypto::derive_session_keys(&transcript, &ee, &ss);
        self.log_secret("session-m2d", &body.session_id, &keys.m2d);
        self.log_secret("session-d2m", &body.session_id, &keys.d2m);
        let ready = Outbound {
            topic: self.config.topics.ready(&me),
            payload: env_r.encode(),
            retain: false,
            properties: Properties {
                response_topic: Some(self.config.topics.update(&me)),
                correlation_data: Some(body.session_id.to_vec()),
                user_properties: vec![(VERSION_PROPERTY.to_string(), WIRE_VERSION.to_string())],
                content_type: Some(CONTENT_TYPE.to_string()),
            },
        };
        out.actions.push(Action::Publish(ready.clone()));
        self.hs = Some(Handshake {
            session_id: body.session_id,
            campaign_id: body.campaign_id,
            kind: body.kind,
            issued_at: body.issued_at,
            expires_at: body.expires_at,
            manager_nonce: body.nonce,
            manager,
            transcript,
            keys,
            ready,
            ready_sent_at: now,
            update_received: false,
            seq: 0,
            csr_key,
            release_key: None,
            finished: false,
        });
        Ok(out)
    }

    /// A message the manager signed for this device (notify, abort): it names this device and the
    /// configured manager, the certificate it carries verifies as that manager's, and the signature
    /// is that certificate's. Returns the manager's certificate.
    fn verify_from_manager(
        &self,
        env: &SignedEnvelope,
        message: &'static str,
        (device_id, manager_id): (&str, &str),
        manager_cert: &[u8],
        now: u64,
    ) -> Result<PeerCertificate, ProtocolError> {
        let me = self.me();
        if device_id != me {
            return Err(ProtocolError::WrongDevice {
                expected: me.to_string(),
                got: device_id.to_string(),
            });
        }
        if manager_id != self.config.manager_id || manager_id != self.config.topics.manager_id() {
            return Err(ProtocolError::WrongManager {
                expected: self.config.manager_id.clone(),
                got: manager_id.to_string(),
            });
        }
        let manager =
            self.config
                .trust
                .verify(manager_cert, Role::Manager, &self.config.manager_id, now)?;
        env.verify(&manager.public_key, message)?;
        Ok(manager)
    }

    /// A signed abort on the notify topic: every session of that campaign notified at or before its
    /// `issued_at` ends here, whatever the broker delivers afterwards.
    fn handle_abort(&mut self, msg: &Inbound, now: u64) -> Result<DeviceOutput, ProtocolError> {
        let (env, body) = wire::decode_abort(&msg.payload)?;
        self.verify_from_manager(
            &env,
            "abort",
            (&body.device_id, &body.manager_id),
            &body.manager_cert,
            now,
        )?;
        let newer = self
            .state
            .last_abort
            .as_ref()
            .is_none_or(|a| a.campaign_id != body.campaign_id || a.issued_at < body.issued_at);
        if newer {
            self.state.last_abort = Some(AbortRecord {
                campaign_id: body.campaign_id.clone(),
                issued_at: body.issued_at,
            });
        }
        let mut out = DeviceOutput::default();
        let ends = self
            .hs
            .as_ref()
            .is_some_and(|hs| hs.campaign_id == body.campaign_id && hs.issued_at <= body.issued_at);
        if ends {
            self.end_session(&mut out);
            out.events.push(DeviceEvent::Aborted {
                campaign_id: body.campaign_id,
            });
        }
        Ok(out)
    }

    fn publish_status(&self, session_id: [u8; 16], payload: Vec<u8>) -> Action {
        let me = self.me();
        Action::Publish(Outbound {
            topic: self.config.topics.status(me),
            payload,
            retain: false,
            properties: Properties {
                response_topic: None,
                correlation_data: Some(session_id.to_vec()),
                user_properties: vec![(VERSION_PROPERTY.to_string(), WIRE_VERSION.to_string())],
                content_type: Some(CONTENT_TYPE.to_string()),
            },
        })
    }

    fn status(&mut self, body: &StatusBody) -> Option<Action> {
        let hs = self.hs.as_mut()?;
        hs.seq += 1;
        let aad = crypto::session_aad(STATUS_AAD_LABEL, &hs.transcript, &hs.seq.to_be_bytes());
        let plain = Zeroizing::new(wire::encode_msg(body));
        let (nonce, ct) = crypto::seal_with_rng(&mut *self.rng, &hs.keys.d2m, &aad, &plain);
        let sm = StatusMsg {
            v: WIRE_VERSION,
            session_id: hs.session_id,
            seq: hs.seq,
            nonce,
            ct,
        };
        let session_id = hs.session_id;
        let env = SignedEnvelope::sign(
            self.config.identity.signing_key(),
            wire::TYPE_STATUS,
            wire::encode_msg(&sm),
        );
        Some(self.publish_status(session_id, env.encode()))
    }

    /// The signed receipt of `claim`, bound to `binding` (a session of `campaign_id`).
    fn receipt_for(&self, binding: &SessionBinding, campaign_id: &str, claim: Claim) -> Action {
        let body = ReceiptBody {
            v: WIRE_VERSION,
            session_id: binding.session_id,
            transcript: binding.transcript,
            manager_id: self.config.manager_id.clone(),
            device_id: self.me().to_string(),
            campaign_id: campaign_id.to_string(),
            claim,
        };
        let env = SignedEnvelope::sign(
            self.config.identity.signing_key(),
            wire::TYPE_RECEIPT,
            wire::encode_msg(&body),
        );
        self.publish_status(binding.session_id, env.encode())
    }

    /// The signed receipt of `claim` for the current session (none without a session).
    fn receipt(&self, claim: Claim) -> Option<Action> {
        let hs = self.hs.as_ref()?;
        Some(self.receipt_for(&hs.binding(), &hs.campaign_id, claim))
    }

    fn reject(&mut self, reason: RejectReason, out: &mut DeviceOutput) {
        if let Some(a) = self.receipt(Claim::Rejected {
            reason: reason.clone(),
        }) {
            out.actions.push(a);
        }
        if let Some(a) = self.window_unsubscribe() {
            out.actions.push(a);
        }
        self.drop_window();
        self.content_key = None;
        self.image_complete = false;
        if let Some(hs) = &mut self.hs {
            hs.finished = true;
        }
        if !reason.is_transient() {
            self.record_current_completion(None, None);
        }
        self.state.transfer = None;
        out.events.push(DeviceEvent::Rejected { reason });
    }

    fn handle_update(&mut self, msg: &Inbound, now: u64) -> Result<DeviceOutput, ProtocolError> {
        if msg.payload.is_empty() {
            return Ok(DeviceOutput::default());
        }
        let m = wire::decode_update(&msg.payload)?;
        let Some(hs) = &self.hs else {
            return Err(ProtocolError::WrongSession);
        };
        if m.session_id != hs.session_id {
            return Err(ProtocolError::WrongSession);
        }
        if hs.update_received || hs.finished {
            return Ok(DeviceOutput::default()); // duplicate of an update already processed
        }
        check_hints(
            &msg.properties,
            Some(&self.config.topics.status(self.me())),
            &hs.session_id,
        )?;
        let aad = crypto::session_aad(UPDATE_AAD_LABEL, &hs.transcript, &[]);
        let plain = crypto::open(&hs.keys.m2d, &m.nonce, &aad, &m.ct)
            .ok_or(ProtocolError::Decrypt { message: "update" })?;
        let body = wire::decode_update_body(&plain)?;
        drop(plain);
        let manifest_bytes = match &body {
            UpdateBody::Firmware { manifest, .. } | UpdateBody::Credentials { manifest, .. } => {
                manifest
            }
        };
        let (menv, manifest) = wire::decode_manifest(manifest_bytes)?;
        menv.verify(&hs.manager.public_key, "manifest")?;
        let me = self.me().to_string();
        if manifest.device_id != me {
            return Err(ProtocolError::WrongDevice {
                expected: me,
                got: manifest.device_id,
            });
        }
        if manifest.campaign_id != hs.campaign_id {
            return Err(ProtocolError::WrongCampaign {
                expected: hs.campaign_id.clone(),
                got: manifest.campaign_id,
            });
        }
        let body_kind_ok = matches!(
            (&body, manifest.kind),
            (UpdateBody::Firmware { .. }, PayloadKind::Firmware)
                | (
                    UpdateBody::Credentials { key: Some(_), .. },
                    PayloadKind::CredentialsDeliverKey
                )
                | (
                    UpdateBody::Credentials { key: None, .. },
                    PayloadKind::CredentialsCsr
                )
        );
        if !body_kind_ok || manifest.kind != hs.kind {
            return Err(ProtocolError::Decode {
                message: "update",
                detail: "payload kind differs from the notify".into(),
            });
        }
        if manifest.kind == PayloadKind::Firmware
            && !manifest.chunking_consistent(wire::MAX_CHUNK_SIZE, wire::MAX_CHUNK_COUNT)
        {
            return Err(ProtocolError::Decode {
                message: "manifest",
                detail: "inconsistent chunking".into(),
            });
        }
        // Authenticated from here on: the update is for this device, this session.
        if let Some(hs) = &mut self.hs {
            hs.update_received = true;
            hs.expires_at = hs.expires_at.min(manifest.expires_at);
        }
        let mut out = DeviceOutput::default();
        if manifest.kind == PayloadKind::Firmware {
            if let Some(out) = self.answer_from_history(&manifest, now) {
                return Ok(out);
            }
        }
        if let Err(reason) = manifest.check(&self.state.running_version, now) {
            self.reject(reason, &mut out);
            return Ok(out);
        }
        let session_id = self.hs.as_ref().map(|h| h.session_id).unwrap_or_default();
        match &body {
            UpdateBody::Firmware { content_key, .. } => {
                if !self.config.release_keys.is_empty() {
                    match ReleaseSignature::check(
                        manifest.release.as_ref(),
                        &self.config.release_keys,
                        &manifest.version,
                        manifest.size,
                        &manifest.sha256,
                    ) {
                        Ok(key) => {
                            if let Some(hs) = &mut self.hs {
                                hs.release_key = Some(key);
                            }
                        }
                        Err(why) => {
                            self.reject(RejectReason::ReleaseSignature(why), &mut out);
                            return Ok(out);
                        }
                    }
                }
                let needed = self.chunk_packet_bound(&manifest);
                if self.config.max_packet_size != 0 && needed > self.config.max_packet_size {
                    self.reject(
                        RejectReason::PacketTooLarge {
                            max_packet_size: self.config.max_packet_size,
                            needed,
                        },
                        &mut out,
                    );
                    return Ok(out);
                }
                self.log_secret("content-key", &session_id, content_key);
                self.content_key = Some(Zeroizing::new(*content_key));
                let resume = self.state.transfer.as_ref().is_some_and(|t| {
                    t.campaign_id == manifest.campaign_id && t.manifest == manifest
                });
                if !resume {
                    self.state.transfer = Some(TransferState {
                        campaign_id: manifest.campaign_id.clone(),
                        manifest: manifest.clone(),
                        received: Bitmap::new(manifest.transfer().chunk_count),
                    });
                }
                let received = self
                    .state
                    .transfer
                    .as_ref()
                    .map(|t| t.received.count())
                    .unwrap_or(0);
                out.events.push(DeviceEvent::UpdateOffered { manifest });
                if let Some(a) = self.status(&StatusBody::Accepted { received }) {
                    out.actions.push(a);
                }
                self.advance_window(now, &mut out);
            }
            UpdateBody::Credentials { cert, key, .. } => {
                let key_der = match (key, self.hs.as_mut().and_then(|h| h.csr_key.take())) {
                    (Some(k), _) => Zeroizing::new(k.clone()),
                    (None, Some(k)) => k,
                    (None, None) => {
                        self.reject(
                            RejectReason::BadCredentials(
                                "no key for the delivered certificate".into(),
                            ),
                            &mut out,
                        );
                        return Ok(out);
                    }
                };
                if key.is_some() {
                    use p256::pkcs8::DecodePrivateKey;
                    if let Ok(k) = p256::SecretKey::from_pkcs8_der(&key_der) {
                        self.log_secret("delivered-key", &session_id, &k.to_bytes());
                    }
                }
                if crypto::sha256(cert) != manifest.sha256 {
                    self.reject(
                        RejectReason::BadCredentials(
                            "certificate hash differs from the manifest".into(),
                        ),
                        &mut out,
                    );
                    return Ok(out);
                }
                let checked = Identity::from_der(cert, &key_der).and_then(|id| {
                    self.config
                        .trust
                        .verify(cert, Role::Device, &me, now)
                        .map(|_| id)
                });
                match checked {
                    Ok(id) => {
                        if let Some(a) = self.receipt(Claim::Installed {
                            version: manifest.version.clone(),
                            sha256: manifest.sha256,
                            release_key: None,
                        }) {
                            out.actions.push(a);
                        }
                        if let Some(hs) = &mut self.hs {
                            hs.finished = true;
                        }
                        // A later session of this rotation (manager restarted before the
                        // receipt) is answered by rotating again: see docs/protocol.md.
                        self.record_current_completion(None, None);
                        out.events.push(DeviceEvent::CredentialsDelivered {
                            cert_pem: id.cert_pem(),
                            key_pem: id.key_pem(),
                        });
                    }
                    Err(e) => self.reject(RejectReason::BadCredentials(e.to_string()), &mut out),
                }
            }
        }
        Ok(out)
    }

    /// A firmware manifest this device already dealt with: the image it installed and runs (a
    /// fresh `Installed` receipt bound to this session, no download, no reinstall), the image it
    /// rolled back (a fresh `RolledBack` receipt), or the image it is installing right now (the
    /// outcome will be reported bound to this session by `report_final`). `None`: handle it as new.
    fn answer_from_history(&mut self, m: &Manifest, now: u64) -> Option<DeviceOutput> {
        let mut out = DeviceOutput::default();
        if self.state.pending_install.as_ref().is_some_and(|p| {
            p.campaign_id == m.campaign_id && p.version == m.version && p.sha256 == m.sha256
        }) {
            return Some(out);
        }
        let last = self
            .state
            .last_completion
            .as_ref()
            .filter(|c| {
                c.campaign_id == m.campaign_id
                    && self.state.completed_campaigns.contains(&m.campaign_id)
            })?
            .clone();
        let claim = if let Some(i) = last.installed.as_ref().filter(|i| {
            i.version == m.version
                && i.sha256 == m.sha256
                && self.state.running_version == m.version
        }) {
            Claim::Installed {
                version: i.version.clone(),
                sha256: i.sha256,
                release_key: i.release_key,
            }
        } else if let Some(r) = last
            .rolled_back
            .as_ref()
            .filter(|r| r.version == m.version && r.sha256 == m.sha256)
        {
            Claim::RolledBack {
                version: r.version.clone(),
                sha256: r.sha256,
                reason: r.reason.clone(),
            }
        } else {
            return None;
        };
        if now >= m.expires_at {
            self.reject(RejectReason::Expired, &mut out);
            return Some(out);
        }
        if let Some(a) = self.receipt(claim) {
            out.actions.push(a);
        }
        let installed = last.installed.clone();
        let rolled_back = last.rolled_back.clone();
        self.record_current_completion(installed, rolled_back);
        if let Some(hs) = &mut self.hs {
            hs.finished = true;
        }
        Some(out)
    }

    /// Remember that `binding`'s session completed `campaign_id` (and what it installed or rolled
    /// back).
    fn record_completion(
        &mut self,
        campaign_id: &str,
        binding: &SessionBinding,
        installed: Option<InstalledImage>,
        rolled_back: Option<RolledBackImage>,
    ) {
        self.state.last_completion = Some(Completion {
            campaign_id: campaign_id.to_string(),
            session_id: binding.session_id,
            issued_at: binding.issued_at,
            installed,
            rolled_back,
        });
        self.state.complete(campaign_id);
    }

    fn record_current_completion(
        &mut self,
        installed: Option<InstalledImage>,
        rolled_back: Option<RolledBackImage>,
    ) {
        let Some(hs) = &self.hs else {
            return;
        };
        let (campaign, binding) = (hs.campaign_id.clone(), hs.binding());
        self.record_completion(&campaign, &binding, installed, rolled_back);
    }

    fn chunk_packet_bound(&self, m: &Manifest) -> u32 {
        crate::wire::chunk_packet_bound(
            &self.config.topics,
            &m.campaign_id,
            m.chunk_size,
            m.transfer().chunk_count,
        )
    }

    fn window_unsubscribe(&self) -> Option<Action> {
        let t = self.state.transfer.as_ref()?;
        if self.window.is_empty() {
            return None;
        }
        Some(Action::Unsubscribe(
            self.window
                .iter()
                .map(|&i| self.config.topics.chunk(&t.campaign_id, i))
                .collect(),
        ))
    }

    fn drop_window(&mut self) {
        self.window.clear();
    }

    /// If the current window is done, unsubscribe it and subscribe the next; or report completion.
    fn advance_window(&mut self, now: u64, out: &mut DeviceOutput) {
        let Some(t) = &self.state.transfer else {
            return;
        };
        if self.window.iter().any(|&i| !t.received.get(i)) {
            return;
        }
        if let Some(a) = self.window_unsubscribe() {
            out.actions.push(a);
        }
        let n = self.config.window.max(1) as usize;
        let next: Vec<u32> = (0..t.manifest.transfer().chunk_count)
            .filter(|&i| !t.received.get(i))
            .take(n)
            .collect();
        if next.is_empty() {
            self.window.clear();
            if !self.image_complete {
                self.image_complete = true;
                out.events.push(DeviceEvent::ImageComplete {
                    manifest: t.manifest.clone(),
                });
            }
            return;
        }
        out.actions.push(Action::Subscribe(
            next.iter()
                .map(|&i| self.config.topics.chunk(&t.campaign_id, i))
                .collect(),
        ));
        // Chunks served on request: ask for the window right after subscribing to it (the broker
        // handles both in order, so what the manager publishes for it reaches this subscription).
        let ask = t.manifest.pull.then(|| next.clone());
        self.window = next;
        self.window_deadline = now.saturating_add(self.window_timeout);
        self.window_recovery = WindowRecovery::Resubscribe;
        if let Some(indices) = ask {
            out.actions
                .extend(self.status(&StatusBody::ChunksRequested { indices }));
        }
    }

    /// Whether the live session (if any) is past the campaign's expiry.
    fn session_expired(&self, now: u64) -> bool {
        self.hs
            .as_ref()
            .is_some_and(|hs| !hs.finished && now >= hs.expires_at)
    }

    fn handle_chunk(
        &mut self,
        msg: &Inbound,
        campaign: &str,
        index: u32,
        now: u64,
    ) -> Result<DeviceOutput, ProtocolError> {
        if msg.payload.is_empty() {
            return Ok(DeviceOutput::default()); // retained chunk cleared
        }
        let c = wire::decode_chunk(&msg.payload)?;
        if c.campaign_id != campaign || c.index != index {
            return Err(ProtocolError::HintMismatch { field: "topic" });
        }
        if self.content_key.is_some() && self.session_expired(now) {
            // Past the expiry nothing of this campaign is taken any more, however late the broker
            // delivers it: signed Rejected(Expired), and the session ends.
            let mut out = DeviceOutput::default();
            self.reject(RejectReason::Expired, &mut out);
            return Ok(out);
        }
        if self.state.transfer.is_none() && self.state.completed_campaigns.contains(&c.campaign_id)
        {
            // A late copy of a chunk of a campaign this device completed (the broker's queue for
            // it still held republishes): nothing is stored, so it is a duplicate, not a fault.
            return Ok(DeviceOutput::default());
        }
        let (Some(t), Some(key)) = (self.state.transfer.as_mut(), self.content_key.as_ref()) else {
            return Err(ProtocolError::UnexpectedMessage {
                message: "chunk",
                state: "no transfer",
            });
        };
        if c.campaign_id != t.campaign_id {
            return Err(ProtocolError::WrongCampaign {
                expected: t.campaign_id.clone(),
                got: c.campaign_id,
            });
        }
        let count = t.manifest.transfer().chunk_count;
        if c.index >= count || c.count != count {
            return Err(ProtocolError::ChunkOutOfRange {
                index: c.index,
                count,
            });
        }
        if t.received.get(c.index) {
            return Ok(DeviceOutput::default()); // duplicate
        }
        let plain = c.open(key, &t.manifest.transfer().merkle_root)?;
        let expected = t.manifest.chunk_len(c.index).unwrap_or(0);
        if plain.len() as u64 != expected {
            return Err(ProtocolError::ChunkOutOfRange {
                index: c.index,
                count,
            });
        }
        t.received.set(c.index);
        let offset = u64::from(c.index) * u64::from(t.manifest.chunk_size);
        let mut out = DeviceOutput::default();
        out.events.push(DeviceEvent::Chunk {
            index: c.index,
            offset,
            data: plain.to_vec(),
        });
        self.advance_window(now, &mut out);
        Ok(out)
    }

    /// After `ImageComplete` and the caller's check of what it stored: record the install as
    /// pending, before the image is switched. Past the campaign's expiry it refuses instead
    /// (signed `Rejected(Expired)`, returned as `Err` with the actions to send): the image must not
    /// be installed. On `Ok` the caller persists [`DeviceSession::state`] (it now holds
    /// `pending_install`), switches the image, checks its health, and calls
    /// [`DeviceSession::report_final`]. `Err(vec![])` when no image is complete.
    pub fn stage_install(&mut self, now: u64) -> Result<PendingInstall, Vec<Action>> {
        if !self.image_complete {
            return Err(Vec::new());
        }
        let (Some(t), Some(hs)) = (self.state.transfer.as_ref(), self.hs.as_ref()) else {
            return Err(Vec::new());
        };
        if now >= hs.expires_at.min(t.manifest.expires_at) {
            let mut out = DeviceOutput::default();
            self.reject(RejectReason::Expired, &mut out);
            return Err(out.actions);
        }
        let pending = PendingInstall {
            campaign_id: t.campaign_id.clone(),
            binding: hs.binding(),
            version: t.manifest.version.clone(),
            sha256: t.manifest.sha256,
            size: t.manifest.size,
            release_key: hs.release_key,
        };
        self.image_complete = false;
        self.content_key = None;
        self.state.pending_install = Some(pending.clone());
        Ok(pending)
    }

    /// The final outcome of the staged install (also after a restart: the binding was persisted),
    /// as a signed receipt: `Committed` → `Installed` and the running version moves to the new one;
    /// `RolledBack` → `RolledBack` and the running version stays; `Failed` → `Rejected(InstallFailed)`
    /// and the running version stays. The receipt is bound to the
    /// session the image arrived in, or to a newer live session of the same campaign (a manager
    /// that timed out and started again). Clears `pending_install`; persist the state afterwards.
    /// Nothing happens when no install is pending.
    pub fn report_final(&mut self, outcome: FinalOutcome, now: u64) -> Vec<Action> {
        let _ = now;
        let Some(p) = self.state.pending_install.take() else {
            return Vec::new();
        };
        let binding = self
            .hs
            .as_ref()
            .filter(|hs| hs.campaign_id == p.campaign_id && hs.update_received && !hs.finished)
            .map(Handshake::binding)
            .unwrap_or_else(|| p.binding.clone());
        let (claim, installed, rolled_back) = match outcome {
            FinalOutcome::Committed => {
                self.state.running_version = p.version.clone();
                (
                    Claim::Installed {
                        version: p.version.clone(),
                        sha256: p.sha256,
                        release_key: p.release_key,
                    },
                    Some(InstalledImage {
                        version: p.version.clone(),
                        sha256: p.sha256,
                        release_key: p.release_key,
                    }),
                    None,
                )
            }
            FinalOutcome::RolledBack { reason } => {
                let reason = bounded_text(&reason, MAX_REASON_TEXT);
                (
                    Claim::RolledBack {
                        version: p.version.clone(),
                        sha256: p.sha256,
                        reason: reason.clone(),
                    },
                    None,
                    Some(RolledBackImage {
                        version: p.version.clone(),
                        sha256: p.sha256,
                        reason,
                    }),
                )
            }
            FinalOutcome::Failed { reason } => (
                Claim::Rejected {
                    reason: RejectReason::InstallFailed(bounded_text(&reason, MAX_REASON_TEXT)),
                },
                None,
                None,
            ),
        };
        let action = self.receipt_for(&binding, &p.campaign_id, claim);
        self.record_completion(&p.campaign_id, &binding, installed, rolled_back);
        if self
            .state
            .transfer
            .as_ref()
            .is_some_and(|t| t.campaign_id == p.campaign_id)
        {
            self.state.transfer = None;
        }
        self.content_key = None;
        if let Some(hs) = self
            .hs
            .as_mut()
            .filter(|hs| hs.campaign_id == p.campaign_id)
        {
            hs.finished = true;
        }
        vec![action]
    }

    /// After `ImageComplete`, in one step, for a device with nothing to check after the switch:
    /// `Err(message)` sends a signed Rejected (`ImageHashMismatch` when the message mentions a hash
    /// ("hash", "sha256", "SHA-256"), `InstallFailed(message)` otherwise); `Ok` stages the install
    /// and commits it at once (`stage_install` then `report_final(Committed)`, so past the expiry it
    /// is a signed `Rejected(Expired)`). A caller that switches images uses `stage_install` and
    /// `report_final` instead, so that nothing is switched past the expiry. Does nothing when no
    /// image is complete.
    pub fn finish_install(&mut self, result: Result<(), String>, now: u64) -> Vec<Action> {
        if !self.image_complete || self.state.transfer.is_none() {
            return Vec::new();
        }
        match result {
            Ok(()) => match self.stage_install(now) {
                Ok(_) => self.report_final(FinalOutcome::Committed, now),
                Err(actions) => actions,
            },
            Err(msg) => {
                let reason =
                    if msg.contains("sha256") || msg.contains("SHA-256") || msg.contains("hash") {
                        RejectReason::ImageHashMismatch
                    } else {
                        RejectReason::InstallFailed(bounded_text(&msg, MAX_REASON_TEXT))
                    };
                self.refuse_image(reason, now)
            }
        }
    }

    /// After `ImageComplete`, when the caller's check of what it stored failed (the image's hash,
    /// a delta whose base is not the installed image): a signed `Rejected(reason)`, the transfer
    /// dropped, nothing installed. Does nothing when no image is complete.
    pub fn refuse_image(&mut self, reason: RejectReason, now: u64) -> Vec<Action> {
        let _ = now;
        if !self.image_complete || self.state.transfer.is_none() {
            return Vec::new();
        }
        let mut out = DeviceOutput::default();
        self.reject(reason, &mut out);
        out.actions
    }

    /// The signed post-install health report of the firmware the device installed last (its
    /// latest completion, when that was an install): the result of the health check the caller
    /// ran after committing it, bound to the session that installed it. `None` when the last
    /// campaign installed no firmware (refused, rolled back, credentials, or none yet).
    pub fn health_report(&self, healthy: bool, detail: &str, now: u64) -> Option<Action> {
        let last = self.state.last_completion.as_ref()?;
        let installed = last.installed.as_ref()?;
        let body = wire::HealthBody {
            v: WIRE_VERSION,
            session_id: last.session_id,
            manager_id: self.config.manager_id.clone(),
            device_id: self.me().to_string(),
            campaign_id: last.campaign_id.clone(),
            version: installed.version.clone(),
            sha256: installed.sha256,
            healthy,
            detail: bounded_text(detail, MAX_REASON_TEXT),
            reported_at: now,
        };
        let env = SignedEnvelope::sign(
            self.config.identity.signing_key(),
            wire::TYPE_HEALTH,
            wire::encode_msg(&body),
        );
        Some(self.publish_status(last.session_id, env.encode()))
    }

    /// Refuse the offered update with a reason (signed Rejected receipt).
    pub fn decline(&mut self, reason: &str, now: u64) -> Vec<Action> {
        let _ = now;
        if self.hs.as_ref().is_none_or(|h| h.finished) {
            return Vec::new();
        }
        let mut out = DeviceOutput::default();
        self.reject(
            RejectReason::DeclinedByDevice(bounded_text(reason, MAX_REASON_TEXT)),
            &mut out,
        );
        out.actions
    }

    /// Reconnected: resubscribe (of the current chunk window, the chunks still missing) and
    /// re-request the missing chunks.
    pub fn on_reconnect(&mut self, now: u64) -> Vec<Action> {
        let mut actions = vec![self.base_subscribe()];
        let mut ask = None;
        let window = self.window_filters();
        if let Some(t) = self.state.transfer.as_ref().filter(|_| !window.is_empty()) {
            actions.push(Action::Subscribe(window));
            self.window_deadline = now.saturating_add(self.window_timeout);
            // The subscription just made fetches the retained chunks again: what is still missing
            // at the next timeout is asked of the manager.
            self.window_recovery = WindowRecovery::Ask;
            if t.manifest.pull {
                ask = Some(
                    self.window
                        .iter()
                        .copied()
                        .filter(|&i| !t.received.get(i))
                        .collect::<Vec<u32>>(),
                );
            }
        }
        if let Some(indices) = ask.filter(|i| !i.is_empty()) {
            actions.extend(self.status(&StatusBody::ChunksRequested { indices }));
        }
        actions
    }

    /// Timers: end the session at the campaign's expiry (a signed `Rejected(Expired)` when it was
    /// still live), re-send ready when no update came, ask the manager to republish chunks of a
    /// window that did not arrive in time. The actions of [`DeviceSession::poll_output`].
    pub fn poll(&mut self, now: u64) -> Vec<Action> {
        self.poll_output(now).actions
    }

    /// Like [`DeviceSession::poll`], with the events: `Rejected { Expired }` when the timers
    /// ended a live session at the campaign's expiry.
    pub fn poll_output(&mut self, now: u64) -> DeviceOutput {
        if self.session_expired(now) && self.state.pending_install.is_none() {
            let mut out = DeviceOutput::default();
            self.reject(RejectReason::Expired, &mut out);
            self.end_session(&mut out);
            return out;
        }
        DeviceOutput {
            actions: self.poll_timers(now),
            events: Vec::new(),
        }
    }

    fn poll_timers(&mut self, now: u64) -> Vec<Action> {
        if self
            .hs
            .as_ref()
            .is_some_and(|hs| hs.finished && now >= hs.expires_at)
        {
            self.hs = None; // nothing more will come for it
        }
        let timeout = self.window_timeout;
        if let Some(hs) = &mut self.hs {
            if !hs.update_received
                && !hs.finished
                && now >= hs.ready_sent_at.saturating_add(timeout)
            {
                hs.ready_sent_at = now;
                return vec![Action::Publish(hs.ready.clone())];
            }
        }
        if self.window.is_empty() || now < self.window_deadline || self.content_key.is_none() {
            return Vec::new();
        }
        let Some(t) = &self.state.transfer else {
            return Vec::new();
        };
        let missing: Vec<u32> = self
            .window
            .iter()
            .copied()
            .filter(|&i| !t.received.get(i))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        self.window_deadline = now.saturating_add(timeout);
        match self.window_recovery {
            WindowRecovery::Resubscribe if !t.manifest.pull => {
                self.window_recovery = WindowRecovery::Ask;
                vec![Action::Subscribe(self.window_filters())]
            }
            _ => {
                self.window_recovery = WindowRecovery::Resubscribe;
                self.status(&StatusBody::ChunksRequested { indices: missing })
                    .into_iter()
                    .collect()
            }
        }
    }
}

/// How a device recovers chunks of its window that did not arrive before the window timed out.
/// In a campaign whose chunks are all retained (not `pull`), the first timeout subscribes the
/// missing chunk topics again: MQTT 5 sends the retained messages of a filter at every SUBSCRIBE
/// (Retain Handling 0), to this device alone, so a delivery the broker dropped (a full session
/// queue, a lost connection) costs one device one message. Only when that did not bring them does
/// the next timeout ask the manager (`ChunksRequested`), whose republish reaches every device
/// subscribed to those chunks; then the two alternate. A `pull` campaign asks at every timeout:
/// its chunks are retained only while devices ask for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WindowRecovery {
    /// Subscribe the missing chunks again (retained campaigns).
    Resubscribe,
    /// Ask the manager to publish the missing chunks again.
    Ask,
}

#[cfg(test)]
mod tests {
    //! Crafted updates and chunks that only an insider (holder of some key) could build.
    use super::*;
    use crate::identity::CertificateAuthority;
    use crate::manager::{
        CampaignPayload, CampaignSpec, DeviceTarget, ManagerConfig, ManagerSession,
        PreparedCampaign,
    };
    use crate::wire::{ChunkMsg, UpdateMsg};

    const NOW: u64 = 1_800_000_000;

    struct Setup {
        manager_id: Arc<Identity>,
        campaign: Arc<PreparedCampaign>,
        topics: Arc<TopicTree>,
        dev: DeviceSession,
        update: Inbound,
    }

    /// A manager session that published its notify, and the configuration of the device it
    /// notified.
    struct Notified {
        manager_id: Arc<Identity>,
        campaign: Arc<PreparedCampaign>,
        topics: Arc<TopicTree>,
        manager: ManagerSession,
        notify: Inbound,
        device_config: DeviceConfig,
    }

    fn notified(image_len: usize, chunk: u32) -> Notified {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let trust = Arc::new(ca.trust_anchor());
        let topics = Arc::new(TopicTree::new("iot", "p1").unwrap());
        let manager_id = Arc::new(ca.issue(Role::Manager, "p1", NOW, 10).unwrap());
        let campaign = Arc::new(
            PreparedCampaign::prepare(CampaignSpec {
                campaign_id: "c1".into(),
                target_version: "2.0.0".into(),
                payload: CampaignPayload::Firmware {
                    image: vec![7u8; image_len],
                },
                expires_at: NOW + 100,
                chunk_size: chunk,
                release: None,
            })
            .unwrap(),
        );
        let cfg = ManagerConfig {
            identity: manager_id.clone(),
            trust: trust.clone(),
            topics: topics.clone(),
        };
        let target = DeviceTarget {
            device_id: "s1".into(),
            pinned_fingerprint: None,
            allow_downgrade: false,
        };
        let (manager, a) = ManagerSession::start(&cfg, campaign.clone(), target, NOW).unwrap();
        let Action::Publish(notify) = &a[0] else {
            panic!("notify")
        };
        let device_config = DeviceConfig {
            identity: Arc::new(ca.issue(Role::Device, "s1", NOW, 10).unwrap()),
            trust,
            topics: topics.clone(),
            manager_id: "p1".into(),
            max_packet_size: 0,
            window: 2,
            release_keys: Vec::new(),
        };
        Notified {
            manager_id,
            campaign,
            topics,
            manager,
            notify: notify.to_inbound(),
            device_config,
        }
    }

    fn setup(image_len: usize, chunk: u32) -> Setup {
        let Notified {
            manager_id,
            campaign,
            topics,
            manager: mut ms,
            notify,
            device_config,
        } = notified(image_len, chunk);
        let (mut dev, _) = DeviceSession::new(device_config, DeviceState::new("1.0.0"));
        let out = dev.handle(&notify, NOW).unwrap();
        let Action::Publish(ready) = &out.actions[0] else {
            panic!("ready")
        };
        let out = ms.handle(&ready.to_inbound(), NOW).unwrap();
        let Action::Publish(update) = &out.actions[0] else {
            panic!("update")
        };
        Setup {
            manager_id,
            campaign,
            topics,
            dev,
            update: update.to_inbound(),
        }
    }

    #[test]
    fn with_rng_draws_the_handshake_randomness_from_the_rng_passed_in() {
        // What a no_std board relies on: the session takes its ephemeral key and nonce from the
        // RNG it was given, not from the OS. Equally seeded RNGs answer a notify with the same
        // ready (ECDSA signatures are deterministic), another seed with another one.
        use rand::SeedableRng;
        let Notified {
            notify,
            device_config,
            ..
        } = notified(100, 64);
        let ready_with_seed = |seed: u64| {
            let rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (mut dev, _) = DeviceSession::with_rng(
                device_config.clone(),
                DeviceState::new("1.0.0"),
                Box::new(rng),
            );
            let out = dev.handle(&notify, NOW).unwrap();
            let Action::Publish(ready) = &out.actions[0] else {
                panic!("ready")
            };
            ready.payload.clone()
        };
        assert_eq!(ready_with_seed(1), ready_with_seed(1));
        assert_ne!(ready_with_seed(1), ready_with_seed(2));
    }

    fn craft(dev: &DeviceSession, body: &UpdateBody) -> Inbound {
        let hs = dev.hs.as_ref().unwrap();
        let aad = crypto::session_aad(UPDATE_AAD_LABEL, &hs.transcript, &[]);
        let (nonce, ct) = crypto::seal(&hs.keys.m2d, &aad, &wire::encode_msg(body));
        Inbound {
            topic: "iot/p1/s1/update".into(),
            payload: wire::encode_msg(&UpdateMsg {
                v: WIRE_VERSION,
                session_id: hs.session_id,
                nonce,
                ct,
            }),
            properties: Properties::default(),
        }
    }

    fn genuine(s: &Setup) -> (Vec<u8>, Manifest, [u8; 32]) {
        let hs = s.dev.hs.as_ref().unwrap();
        let m = wire::decode_update(&s.update.payload).unwrap();
        let aad = crypto::session_aad(UPDATE_AAD_LABEL, &hs.transcript, &[]);
        let plain = crypto::open(&hs.keys.m2d, &m.nonce, &aad, &m.ct).unwrap();
        match &wire::decode_update_body(&plain).unwrap() {
            UpdateBody::Firmware {
                manifest,
                content_key,
            } => {
                let (_, mf) = wire::decode_manifest(manifest).unwrap();
                (manifest.clone(), mf, *content_key)
            }
            _ => panic!(),
        }
    }

    #[test]
    fn tampered_manifest_signature_is_rejected() {
        let mut s = setup(300, 100);
        let (menv, _, key) = genuine(&s);
        let (mut env, mut mf) = wire::decode_manifest(&menv).unwrap();
        mf.allow_downgrade = true; // change a field, keep the old signature
        env.body = wire::encode_msg(&mf);
        let body = UpdateBody::Firmware {
            manifest: env.encode(),
            content_key: key,
        };
        let msg = craft(&s.dev, &body);
        assert_eq!(
            s.dev.handle(&msg, NOW).unwrap_err(),
            ProtocolError::BadSignature {
                message: "manifest"
            }
        );
        // The genuine update still works afterwards (state unchanged).
        let out = s.dev.handle(&s.update, NOW).unwrap();
        assert!(matches!(out.events[0], DeviceEvent::UpdateOffered { .. }));
    }

    #[test]
    fn manifest_for_another_device_is_rejected() {
        let mut s = setup(300, 100);
        let (_, mut mf, key) = genuine(&s);
        mf.device_id = "s2".into();
        let env = SignedEnvelope::sign(
            s.manager_id.signing_key(),
            wire::TYPE_MANIFEST,
            wire::encode_msg(&mf),
        );
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: env.encode(),
                content_key: key,
            },
        );
        assert!(matches!(
            s.dev.handle(&msg, NOW),
            Err(ProtocolError::WrongDevice { .. })
        ));
    }

    #[test]
    fn tampered_wrap_makes_chunks_fail_opaquely() {
        let mut s = setup(300, 100);
        let (menv, _, mut key) = genuine(&s);
        key[0] ^= 1;
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: menv,
                content_key: key,
            },
        );
        s.dev.handle(&msg, NOW).unwrap();
        let chunk = s.campaign.chunk_publish(&s.topics, 0).to_inbound();
        assert_eq!(
            s.dev.handle(&chunk, NOW).unwrap_err(),
            ProtocolError::Decrypt { message: "chunk" }
        );
        assert_eq!(s.dev.state().transfer.as_ref().unwrap().received.count(), 0);
    }

    #[test]
    fn insider_forged_chunk_fails_merkle_proof() {
        // A compromised device knows the content key and can produce chunks that decrypt fine,
        // but it cannot make them match the Merkle root in the manager-signed manifest.
        let mut s = setup(300, 100);
        s.dev.handle(&s.update, NOW).unwrap();
        let (_, _, key) = genuine(&s);
        let ct = crypto::encrypt_chunk(&key, "c1", 1, 3, &[0x66; 100]);
        let genuine_chunk =
            wire::decode_chunk(&s.campaign.chunk_publish(&s.topics, 1).payload).unwrap();
        let forged = ChunkMsg {
            ct,
            ..genuine_chunk
        };
        let msg = Inbound {
            topic: s.topics.chunk("c1", 1),
            payload: wire::encode_msg(&forged),
            properties: Properties::default(),
        };
        assert_eq!(
            s.dev.handle(&msg, NOW).unwrap_err(),
            ProtocolError::BadProof { index: 1 }
        );
    }

    #[test]
    fn chunk_beyond_declared_size_is_rejected() {
        // The manager signs a manifest declaring a smaller image than the chunks carry.
        let mut s = setup(300, 100);
        let (_, mut mf, key) = genuine(&s);
        mf.size = 250; // last chunk should be 50 bytes, the published one has 100
        let env = SignedEnvelope::sign(
            s.manager_id.signing_key(),
            wire::TYPE_MANIFEST,
            wire::encode_msg(&mf),
        );
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: env.encode(),
                content_key: key,
            },
        );
        s.dev.handle(&msg, NOW).unwrap();
        let last = s.campaign.chunk_publish(&s.topics, 2).to_inbound();
        assert_eq!(
            s.dev.handle(&last, NOW).unwrap_err(),
            ProtocolError::ChunkOutOfRange { index: 2, count: 3 }
        );
        // Chunking inconsistent with the size is refused up front.
        let mut s = setup(300, 100);
        let (_, mut mf, key) = genuine(&s);
        mf.size = 10_000;
        let env = SignedEnvelope::sign(
            s.manager_id.signing_key(),
            wire::TYPE_MANIFEST,
            wire::encode_msg(&mf),
        );
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: env.encode(),
                content_key: key,
            },
        );
        assert!(matches!(
            s.dev.handle(&msg, NOW),
            Err(ProtocolError::Decode {
                message: "manifest",
                ..
            })
        ));
    }

    /// A delta manifest: the chunks carry the delta (its size; the manifest's count and root), the
    /// manifest's size and SHA-256 stay the full image's. Here the campaign's 300-byte sealed
    /// payload stands for the delta of a 1000-byte image: the device takes its 3 chunks and
    /// completes; read as a full-image transfer (1000 bytes in 3 chunks of 100) the manifest would
    /// be refused as inconsistent. A delta whose size the chunks do not cover is refused up front.
    #[test]
    fn a_delta_manifest_transfers_the_delta_s_chunks() {
        let mut s = setup(300, 100);
        let (_, mut mf, key) = genuine(&s);
        mf.delta = Some(crate::manifest::DeltaManifest {
            base_version: "1.0.0".into(),
            base_sha256: [3; 32],
            size: mf.size,
        });
        mf.size = 1000;
        mf.sha256 = [0x24; 32];
        let signed = |s: &Setup, mf: &Manifest| {
            SignedEnvelope::sign(
                s.manager_id.signing_key(),
                wire::TYPE_MANIFEST,
                wire::encode_msg(mf),
            )
            .encode()
        };
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: signed(&s, &mf),
                content_key: key,
            },
        );
        let out = s.dev.handle(&msg, NOW).unwrap();
        assert!(matches!(out.events[0], DeviceEvent::UpdateOffered { .. }));
        let mut complete = None;
        for i in 0..3 {
            let chunk = s.campaign.chunk_publish(&s.topics, i).to_inbound();
            let out = s.dev.handle(&chunk, NOW).unwrap();
            for e in out.events {
                if let DeviceEvent::ImageComplete { manifest } = e {
                    complete = Some(manifest);
                }
            }
        }
        assert_eq!(
            complete.as_ref(),
            Some(&mf),
            "complete after the delta's 3 chunks"
        );

        let mut s = setup(300, 100);
        let (_, _, key) = genuine(&s);
        let mut bad = mf.clone();
        bad.delta.as_mut().unwrap().size = 301;
        let msg = craft(
            &s.dev,
            &UpdateBody::Firmware {
                manifest: signed(&s, &bad),
                content_key: key,
            },
        );
        assert!(matches!(
            s.dev.handle(&msg, NOW),
            Err(ProtocolError::Decode {
                message: "manifest",
                ..
            })
        ));
    }

    #[test]
    fn payload_kind_mismatch_is_rejected() {
        let mut s = setup(300, 100);
        let (menv, _, _) = genuine(&s);
        let msg = craft(
            &s.dev,
            &UpdateBody::Credentials {
                manifest: menv,
                cert: vec![1],
                key: None,
            },
        );
        assert!(matches!(
            s.dev.handle(&msg, NOW),
            Err(ProtocolError::Decode {
                message: "update",
                ..
            })
        ));
    }

    #[test]
    fn garbage_update_body_is_a_decode_error() {
        let mut s = setup(300, 100);
        let hs = s.dev.hs.as_ref().unwrap();
        let aad = crypto::session_aad(UPDATE_AAD_LABEL, &hs.transcript, &[]);
        let (nonce, ct) = crypto::seal(&hs.keys.m2d, &aad, b"\xff\x00garbage");
        let msg = Inbound {
            topic: "iot/p1/s1/update".into(),
            payload: wire::encode_msg(&UpdateMsg {
                v: WIRE_VERSION,
                session_id: hs.session_id,
                nonce,
                ct,
            }),
            properties: Properties::default(),
        };
        assert!(matches!(
            s.dev.handle(&msg, NOW),
            Err(ProtocolError::Decode { .. })
        ));
    }

    #[test]
    fn bitmap_basics_and_persisted_state_round_trip() {
        let mut b = Bitmap::new(10);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(!b.set(10));
        assert!(b.get(3) && !b.get(4) && !b.get(99));
        assert_eq!(b.count(), 1);
        let st = DeviceState {
            running_version: "1.0.0".into(),
            completed_campaigns: vec!["a".into()],
            transfer: None,
            last_completion: Some(Completion {
                campaign_id: "a".into(),
                session_id: [7; 16],
                issued_at: 5,
                installed: Some(InstalledImage {
                    version: "1.0.0".into(),
                    sha256: [9; 32],
                    release_key: Some([3; 32]),
                }),
                rolled_back: None,
            }),
            pending_install: Some(PendingInstall {
                campaign_id: "b".into(),
                binding: SessionBinding {
                    session_id: [1; 16],
                    transcript: [2; 32],
                    issued_at: 9,
                },
                version: "2.0.0".into(),
                sha256: [4; 32],
                size: 10,
                release_key: None,
            }),
            last_abort: Some(AbortRecord {
                campaign_id: "c".into(),
                issued_at: 11,
            }),
        };
        // State saved by an older version (no last_completion) still loads.
        let old: DeviceState = serde_json::from_str(
            r#"{"running_version":"1.0.0","completed_campaigns":["a"],"transfer":null}"#,
        )
        .unwrap();
        assert_eq!(old.last_completion, None);
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), st);
    }
}
