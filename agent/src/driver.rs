//! The shell around the transaction state machine: [`Agent`] owns the state directory (its lock,
//! the journal, the staged images), the installer backend and the system commands, and runs the
//! loop *journal the transition, then perform its effect, feed the result back*. All decisions are
//! `transaction`'s; this module only carries them out and turns results into events. It is
//! blocking (installs take minutes): the MQTT session runs it on a thread of its own.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, Invalid};
use crate::crashpoint::{self, CrashPoint};
use crate::durable::{self, FileError};
use crate::installer::{self, Installer, StepContext, Towards};
use crate::journal::{Journal, JournalError, JournalState};
use crate::report::{Delivery, Reporter};
use crate::staging::{Expected, StageError, Staging};
use crate::system::{BootIdError, System};
use crate::transaction::{
    Effect, Event, ImageInfo, Outcome, RebootBy, Transaction, UnexpectedEvent,
};

/// Why the agent could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration's transaction part is invalid.
    #[error("the configuration is invalid:\n{0}")]
    Config(#[from] Invalid),
    /// The journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The image could not be staged.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The boot id could not be read.
    #[error(transparent)]
    BootId(#[from] BootIdError),
    /// Another agent holds the state directory.
    #[error("another sealed-ota-agent is using {} (it holds {}); stop it first", state_dir.display(), lock.display())]
    Locked {
        /// The state directory.
        state_dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The state machine refused an event: a bug in this program, never bad input.
    #[error("internal error: {0}")]
    Bug(#[from] UnexpectedEvent),
}

/// How a call to [`Agent::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// No transaction was under way.
    Idle,
    /// The transaction finished with this outcome (journaled and handed to the reporter).
    Finished(Outcome),
}

/// One device's update machinery on one state directory.
#[derive(Debug)]
pub struct Agent {
    journal: Journal,
    staging: Staging,
    installer: Box<dyn Installer>,
    system: System,
    boot_id: String,
    initial_version: String,
    _lock: File,
}

impl Agent {
    /// Checks the configuration's transaction part, creates the state directory (0700), takes its
    /// lock, opens the journal and reads the boot id.
    pub fn open(config: &Config) -> Result<Agent, AgentError> {
        config.check_transaction()?;
        let state_dir = &config.state_dir;
        durable::create_private_dir(state_dir)?;
        let lock = lock_state_dir(state_dir)?;
        let journal = Journal::open(state_dir)?;
        let staging = Staging::new(state_dir);
        staging.collect_garbage(journal.active().map(|t| t.id.as_str()))?;
        let system = System::new(config.reboot.clone(), config.health_check.clone());
        let boot_id = system.boot_id()?;
        let running = journal
            .running_version(&config.device.initial_version)
            .to_string();
        let backend = config.installer.backend().map_err(Invalid)?;
        let installer = installer::from_config(&backend, &running);
        Ok(Agent {
            journal,
            staging,
            installer,
            system,
            boot_id,
            initial_version: config.device.initial_version.clone(),
            _lock: lock,
        })
    }

    /// The version the device runs (the last one installed, else `device.initial_version`).
    pub fn running_version(&self) -> &str {
        self.journal.running_version(&self.initial_version)
    }

    /// The journal as last saved.
    pub fn journal(&self) -> &JournalState {
        self.journal.state()
    }

    /// The unfinished transaction, if any (a new one cannot begin while there is one).
    pub fn active(&self) -> Option<&Transaction> {
        self.journal.active()
    }

    /// The image areas of the state directory (the session writes `download_path(id)`).
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    /// Verifies the received image of transaction `id` (`staging().download_path(id)`) against
    /// `expected`, journals a new transaction for it and moves the image where the installer
    /// reads it. Nothing is installed until [`Agent::run`].
    pub fn begin(
        &mut self,
        id: &str,
        version: &str,
        expected: &Expected,
    ) -> Result<(), AgentError> {
        if let Some(active) = self.journal.active() {
            return Err(JournalError::Busy {
                active: active.id.clone(),
                phase: active.phase.name(),
            }
            .into());
        }
        self.staging.verify(id, expected)?;
        let image = ImageInfo {
            version: version.to_string(),
            sha256: expected.sha256.to_ascii_lowercase(),
            size: expected.size,
        };
        let transaction =
            Transaction::new(id.to_string(), image, self.running_version().to_string());
        self.journal.begin(transaction)?;
        // Journaled first, so a crash before the move is finished by `run` (see `Effect::Prepare`)
        // and the staged image is never collected as garbage.
        self.staging.promote(id)?;
        tracing::info!(transaction = id, version, "transaction begins");
        Ok(())
    }

    /// Offers every outcome not yet delivered to `reporter`, oldest first.
    pub fn report_pending(&mut self, reporter: &mut dyn Reporter) -> Result<(), AgentError> {
        let pending: Vec<_> = self.journal.unreported().cloned().collect();
        for finished in pending {
            match reporter.report(&finished) {
                Ok(Delivery::Delivered) => self.journal.mark_reported(&finished.id)?,
                Ok(Delivery::Pending) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(())
    }

    /// Offers the journaled outcome of transaction `id` to `reporter` again, even one already
    /// reported (the session may have lost it before a restart). False when the journal has no
    /// outcome for `id`.
    pub fn report_outcome_of(
        &mut self,
        id: &str,
        reporter: &mut dyn Reporter,
    ) -> Result<bool, AgentError> {
        let Some(finished) = self
            .journal
            .state()
            .finished
            .iter()
            .rev()
            .find(|f| f.id == id)
            .cloned()
        else {
            return Ok(false);
        };
        match reporter.report(&finished) {
            Ok(Delivery::Delivered) => self.journal.mark_reported(id)?,
            Ok(Delivery::Pending) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        Ok(true)
    }

    /// Drives the unfinished transaction until it finishes, then hands its outcome to `reporter`.
    /// A reboot stops the process on the way (the next start resumes); if the system does not
    /// reboot, the transaction decides what follows.
    pub fn run(&mut self, reporter: &mut dyn Reporter) -> Result<RunEnd, AgentError> {
        let Some(active) = self.journal.active() else {
            return Ok(RunEnd::Idle);
        };
        let mut tx = active.clone();
        let mut event = if tx.steps == 0 {
            Event::Begin
        } else {
            Event::Resumed
        };
        tracing::info!(transaction = %tx.id, phase = tx.phase.name(), boot = %self.boot_id, "driving the transaction");
        loop {
            let effect = tx.handle(event, &self.boot_id)?;
            if let Effect::Finish(outcome) = effect {
                self.journal.finish(&tx, &outcome)?;
                if let Err(e) = self.staging.discard(&tx.id) {
                    // Collected at the next start.
                    tracing::warn!("{e}");
                }
                crashpoint::reached(&CrashPoint::Before("report"));
                self.report_pending(reporter)?;
                crashpoint::reached(&CrashPoint::After("report"));
                return Ok(RunEnd::Finished(outcome));
            }
            self.journal.update(&tx)?;
            let phase = tx.phase.name();
            tracing::info!(transaction = %tx.id, phase, ?effect, "step");
            crashpoint::reached(&CrashPoint::Before(phase));
            event = self.perform(&tx, &effect)?;
            crashpoint::reached(&CrashPoint::After(phase));
        }
    }

    /// Performs one effect; its result becomes the next event.
    fn perform(&mut self, tx: &Transaction, effect: &Effect) -> Result<Event, AgentError> {
        let work_dir = self.staging.work_dir(&tx.id)?;
        let image = self.staging.image_path(&tx.id);
        let step = StepContext {
            transaction: tx,
            image: &image,
            work_dir: &work_dir,
        };
        let installer = &mut self.installer;
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(transaction = %tx.id, "{what} failed: {e}");
            e.to_string()
        };
        let event = match effect {
            Effect::Prepare if !image.exists() => {
                // The process stopped between journaling the transaction and moving its verified
                // image: move it now (verified again), or give up before anything changed.
                let expected = Expected {
                    sha256: tx.image.sha256.clone(),
                    size: tx.image.size,
                };
                match self.staging.stage(&tx.id, &expected) {
                    Ok(_) => self.perform(tx, effect)?,
                    Err(e) => Event::PrepareFailed(failed(
                        "staging the image",
                        &format!("the received image is gone or changed: {e}"),
                    )),
                }
            }
            Effect::Prepare => match installer.prepare(&step) {
                Ok(p) => Event::Prepared {
                    supports_rollback: p.supports_rollback,
                    booted_slot: p.booted_slot,
                },
                Err(e) => Event::PrepareFailed(failed("prepare", &e)),
            },
            Effect::Install => {
                let mut last_logged = None;
                let mut progress = |percent: u8, message: &str| {
                    let decile = percent / 10;
                    if last_logged != Some(decile) {
                        tracing::info!(transaction = %tx.id, percent, "install: {message}");
                        last_logged = Some(decile);
                    }
                };
                match installer.install(&step, &mut progress) {
                    Ok(i) => Event::Installed {
                        reboot: i.reboot,
                        target_slot: i.target_slot,
                    },
                    Err(e) => Event::InstallFailed(failed("install", &e)),
                }
            }
            Effect::Reboot(by) | Effect::RollbackReboot(by) => {
                let towards = if matches!(effect, Effect::Reboot(_)) {
                    Towards::New
                } else {
                    Towards::Previous
                };
                let result = match by {
                    RebootBy::System => self.system.request_reboot(tx).map_err(|e| e.to_string()),
                    RebootBy::Installer => {
                        installer.reboot(&step, towards).map_err(|e| e.to_string())
                    }
                };
                match result {
                    Ok(()) => Event::RebootRequested,
                    Err(e) => Event::RebootRequestFailed(failed("reboot request", &e)),
                }
            }
            Effect::AwaitReboot => {
                self.system.await_reboot();
                Event::RebootDidNotHappen
            }
            Effect::VerifyBoot => match installer.verify_boot(&step, Towards::New) {
                Ok(()) => Event::BootVerified,
                Err(e) => Event::BootNotVerified(failed("boot check", &e)),
            },
            Effect::HealthCheck => match self.system.health_check(tx) {
                Ok(()) => Event::HealthPassed,
                Err(e) => Event::HealthFailed(failed("health check", &e)),
            },
            Effect::Commit => match installer.commit(&step) {
                Ok(()) => Event::Committed,
                Err(e) => Event::CommitFailed(failed("commit", &e)),
            },
            Effect::Rollback => match installer.rollback(&step) {
                Ok(reboot) => Event::RolledBack { reboot },
                Err(e) => Event::RollbackFailed(failed("rollback", &e)),
            },
            Effect::VerifyRollbackBoot => match installer.verify_boot(&step, Towards::Previous) {
                Ok(()) => Event::RollbackBootVerified,
                Err(e) => Event::RollbackBootNotVerified(failed("rollback boot check", &e)),
            },
            Effect::Failure => {
                if let Err(e) = installer.failure(&step) {
                    failed("failure handling", &e);
                }
                Event::FailureHandled
            }
            Effect::Cleanup => {
                if let Err(e) = installer.cleanup(&step) {
                    failed("cleanup", &e);
                }
                Event::CleanedUp
            }
            Effect::Finish(_) => unreachable!("handled by run"),
        };
        Ok(event)
    }
}

/// Takes `<state_dir>/agent.lock` (released when the process ends, however it ends).
fn lock_state_dir(state_dir: &Path) -> Result<File, AgentError> {
    let path = state_dir.join("agent.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| FileError::new("opening", &path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(AgentError::Locked {
            state_dir: state_dir.to_path_buf(),
            lock: path,
        }),
        Err(e) => Err(FileError::new("locking", &path, e.into()).into()),
    }
}
