//! The seam between the session runner (`runner`), which is the same on every device, and what
//! differs between kinds of device: how a verified image is installed and its outcome learnt
//! ([`Installer`]: the emulator's simulated A/B slots, the agent's journaled transaction with RAUC,
//! Mender update modules or a command hook), the switches tests use to make things go wrong
//! ([`Faults`]: the emulator's `--fault`s), and what a fleet counts ([`Observer`]: the emulator's
//! statistics and its benchmark barrier). Every hook has a do-nothing default, so a real device
//! implements [`Installer`] and nothing else. No I/O here.

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use sealed_ota_protocol::{FinalOutcome, PendingInstall};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::durable::FileError;
use crate::error::Result;
use crate::store::Download;

/// Where a device stands in the campaign it last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// No campaign seen in this run.
    Idle,
    /// An update was offered and the image is arriving (or being installed).
    Transferring,
    /// The image was verified and installed, or new credentials were stored.
    Installed,
    /// The device refused the update (fault switch, expiry, packet size, anti-rollback...).
    Rejected,
    /// The install failed (hash mismatch, storage, an installer that could not roll back).
    Failed,
    /// The image was installed, failed its self-test and the previous one runs again.
    RolledBack,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`].
    pub const ALL: [Outcome; 6] = [
        Outcome::Idle,
        Outcome::Transferring,
        Outcome::Installed,
        Outcome::Rejected,
        Outcome::Failed,
        Outcome::RolledBack,
    ];

    /// Position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, as in the emulator's JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Idle => "idle",
            Outcome::Transferring => "transferring",
            Outcome::Installed => "installed",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolledBack",
        }
    }
}

/// What became of an install the runner handed to the [`Installer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallProgress {
    /// It finished: the runner sends the signed receipt of this outcome now.
    Finished(FinalOutcome),
    /// It goes on elsewhere (a thread, a reboot); its outcome comes through
    /// [`Installer::next_outcome`], in this process or after a restart.
    Underway,
    /// The device lost power half-way (the emulator's `crash-install` fault): the runner stops at
    /// once, saving nothing, and boots from disk after this long.
    PowerLost(Duration),
}

/// The outcome of an install that was [`InstallProgress::Underway`].
#[derive(Debug)]
pub struct LateOutcome {
    /// The campaign (the pending install's).
    pub campaign_id: String,
    /// How it ended.
    pub outcome: FinalOutcome,
    /// Answered once the signed receipt is made and the state that records it saved (or when no
    /// install of that campaign was pending: nothing is owed). Dropped unanswered when the runner
    /// stops first: the installer offers the outcome again after the next start.
    pub receipt_saved: Option<oneshot::Sender<()>>,
}

/// How a device installs a verified image. The runner calls it after the image's size and SHA-256
/// matched the signed manifest and the install was staged and saved as pending
/// (`DeviceSession::stage_install`): from then on the install must end in exactly one
/// [`FinalOutcome`], also across power cuts ([`Installer::resume`]).
pub trait Installer: Send {
    /// Where the chunks of campaign `campaign_id` are written (kept across restarts, so a
    /// transfer resumes).
    fn download_path(&self, campaign_id: &str) -> PathBuf;

    /// The version the device runs, when the installer keeps it (the agent's journal, which also
    /// sees local installs); `None`: the session state's own record is used.
    fn running_version(&self) -> Option<String> {
        None
    }

    /// The installed image, the base a delta update is applied to (`None`: the device keeps no
    /// readable copy, and a delta offered to it is refused with `DeltaBaseMismatch`).
    fn installed_image_path(&self) -> Option<PathBuf> {
        None
    }

    /// A reason to decline a new offer now (the agent: a local update is under way).
    fn busy(&self) -> Option<String> {
        None
    }

    /// Called at every boot, before the session starts: clean what a power loss left behind.
    fn on_boot(&mut self) -> Result<()> {
        Ok(())
    }

    /// Installs the verified image at `image` for `pending`.
    fn install(&mut self, pending: &PendingInstall, image: &Path) -> Result<InstallProgress>;

    /// After a boot that found `pending` saved (the process or the power stopped between staging
    /// the install and its receipt): finish it from what is on the device. `image` is where the
    /// verified image was received (it may be gone if the installer moved it).
    fn resume(&mut self, pending: &PendingInstall, image: &Path) -> Result<InstallProgress>;

    /// The next outcome of an install that was [`InstallProgress::Underway`]. Must be
    /// cancel-safe (the runner polls it beside the connection); never resolves for an installer
    /// that finishes every install at once.
    fn next_outcome(&mut self) -> impl Future<Output = LateOutcome> + Send;
}

/// Fault switches for tests: what the emulator's `--fault`s make go wrong on one device. A real
/// device uses [`NoFaults`].
pub trait Faults: Send {
    /// The device's idea of the current time (Unix seconds) when the real one is `real_now`.
    fn clock(&self, real_now: u64) -> u64 {
        real_now
    }

    /// The Maximum Packet Size to advertise instead of the configured one.
    fn max_packet_size(&self, configured: u32) -> u32 {
        configured
    }

    /// How long to hold a received message of `bytes` bytes (a slow link).
    fn slow_link_delay(&self, bytes: usize) -> Option<Duration> {
        let _ = bytes;
        None
    }

    /// May alter a received chunk message before the protocol sees it; true when it did.
    fn tamper_received(&self, payload: &mut [u8]) -> bool {
        let _ = payload;
        false
    }

    /// Why the committed image's post-install health check fails (the signed health report
    /// says unhealthy).
    fn unhealthy(&self) -> Option<String> {
        None
    }

    /// A reason to decline every offered update.
    fn refusal(&self) -> Option<String> {
        None
    }

    /// Called after a chunk of `len` bytes was written at `offset` of `download`; may corrupt
    /// what was stored. True when it did.
    fn after_chunk_stored(
        &self,
        download: &Download,
        offset: u64,
        len: usize,
    ) -> Result<bool, FileError> {
        let _ = (download, offset, len);
        Ok(false)
    }

    /// After `chunks_this_run` chunks: how long to go offline, if now.
    fn offline_now(&mut self, chunks_this_run: u32) -> Option<Duration> {
        let _ = chunks_this_run;
        None
    }
}

/// No fault switch set.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFaults;

impl Faults for NoFaults {}

/// A future the runner waits for.
pub type Gate = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a fleet counts as its devices run (the emulator's statistics). Every method does nothing
/// by default.
pub trait Observer: Send + Sync + Debug {
    /// A connection attempt starts.
    fn connect_attempt(&self) {}
    /// A connection attempt failed.
    fn connect_failed(&self) {}
    /// A device is connected; `first`: its first connection of the run.
    fn connected(&self, first: bool) {
        let _ = first;
    }
    /// A connection ended.
    fn disconnected(&self) {}
    /// A message of `bytes` bytes arrived.
    fn received(&self, bytes: usize) {
        let _ = bytes;
    }
    /// The protocol refused a message.
    fn message_rejected(&self) {}
    /// The broker refused `filters` subscriptions in a SUBACK (they are subscribed again).
    fn subscriptions_refused(&self, filters: usize) {
        let _ = filters;
    }
    /// A message arrived on a chunk topic (before the protocol reads it: duplicates and rejected
    /// chunks count too, so deliveries against chunks stored is the broker's redelivery).
    fn chunk_delivered(&self) {}
    /// A chunk was stored.
    fn chunk_stored(&self) {}
    /// A device sent its signed post-install health report.
    fn health_reported(&self, healthy: bool) {
        let _ = healthy;
    }
    /// A device's outcome changed.
    fn outcome_changed(&self, from: Outcome, to: Outcome) {
        let _ = (from, to);
    }
    /// A firmware transfer starts on a device (once per device and run): the first chunk window
    /// is subscribed once the returned gate opens (benchmarks time the transfer alone).
    fn transfer_gate(&self) -> Option<Gate> {
        None
    }
}

/// Counts nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}
