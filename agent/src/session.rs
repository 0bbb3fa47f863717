//! The agent's session with the manager: the shared device runner of `sealed-ota-device` (connect,
//! subscribe, feed the protocol session, store chunks and credentials, stage installs, send signed
//! receipts) with the agent's side of its seam, [`AgentInstaller`]. The update transaction
//! (`driver::Agent`) blocks for minutes and may end in a reboot, so it runs on a worker thread of
//! its own: the installer hands it each verified image as a job, and the worker's reporter brings
//! each journaled outcome back to the runner, which sends the signed receipt, saves the session
//! state, and only then lets the journal mark the outcome reported. After a restart the worker
//! first finishes what was under way; an install the session saved as pending is resumed,
//! reported again from the journal, or (lost before the journal knew of it) begun again from the
//! received image. The worker makes no decision of its own: `transaction` decides the steps and
//! [`final_outcome`] maps their end onto the receipt.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use sealed_ota_device::link::BrokerEndpoint;
use sealed_ota_device::store::DeviceDir;
use sealed_ota_device::{
    Device, DeviceReport, InstallProgress, Installer, LateOutcome, NoFaults, NoObserver, Settings,
};
use sealed_ota_protocol::{FinalOutcome, PendingInstall, TopicTree, TrustAnchor};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, Invalid};
use crate::driver::{Agent, AgentError};
use crate::journal::Finished;
use crate::report::{Delivery, ReportError, Reporter};
use crate::staging::{Expected, Staging};
use crate::transaction::Outcome;

/// Why the session could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The configuration is invalid (every field's problem is listed).
    #[error("the configuration is invalid:\n{0}")]
    Config(#[from] Invalid),
    /// A file the configuration names could not be used.
    #[error("{field}: {detail}")]
    Setting {
        /// The configuration field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The update machinery could not be opened or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The update worker stopped (its error is in the log).
    #[error("the update worker stopped: {0}")]
    Worker(String),
}

/// How the agent's receipt reports a journaled outcome: `Installed` after a commit, `RolledBack`
/// when the previous image runs again (rolled back, or never replaced), and `Failed` — installed
/// and not rolled back, so the previous version may not run — as a signed `InstallFailed` that
/// claims no version (never as `RolledBack`, which would claim the previous image runs).
pub fn final_outcome(outcome: &Outcome) -> FinalOutcome {
    match outcome {
        Outcome::Installed { .. } => FinalOutcome::Committed,
        Outcome::RolledBack { reason } => FinalOutcome::RolledBack {
            reason: reason.to_string(),
        },
        Outcome::Failed { reason } => FinalOutcome::Failed {
            reason: format!("not rolled back, the previous version may not run: {reason}"),
        },
    }
}

/// The runner's settings from the configuration (checked before by `check_session`).
pub fn settings(config: &Config) -> Result<Settings, SessionError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| SessionError::Setting {
            field,
            detail: format!("cannot read {}: {e}", path.display()),
        })
    };
    let broker_ca = read("broker.ca_file", &config.broker.ca_file)?;
    let endpoint = BrokerEndpoint::parse(&config.broker.url, Some(broker_ca)).map_err(|e| {
        SessionError::Setting {
            field: "broker.url",
            detail: e.to_string(),
        }
    })?;
    let manager_ca = read("manager.ca_file", config.manager_ca_file())?;
    let trust = TrustAnchor::from_pem(&String::from_utf8_lossy(&manager_ca)).map_err(|e| {
        SessionError::Setting {
            field: "manager.ca_file",
            detail: e.to_string(),
        }
    })?;
    let topics = TopicTree::new(&config.manager.topic_prefix, &config.manager.id).map_err(|e| {
        SessionError::Setting {
            field: "manager.topic_prefix",
            detail: e.to_string(),
        }
    })?;
    let session = &config.session;
    Ok(Settings {
        endpoint,
        trust: Arc::new(trust),
        topics: Arc::new(topics),
        initial_version: config.device.initial_version.clone(),
        max_packet_size: session.max_packet_size,
        window: session.window,
        window_timeout: session.window_timeout_secs,
        keep_alive: Duration::from_secs(session.keep_alive_secs),
        poll_interval: Duration::from_secs(1),
        save_every_chunks: 16,
        pacer: None,
        observer: Arc::new(NoObserver),
        release_keys: config.release_keys()?,
        key_log: None,
        // The transaction commits only after `[health_check]` passed: the signed health report
        // (healthy) follows the commit's receipt at the next timer tick.
        health_report_after: Some(Duration::ZERO),
    })
}

/// Runs the device until `shutdown` turns true (or the update worker fails): the session runner
/// with the agent's installer. Session state and rotated credentials live in `state_dir`.
pub async fn run(
    config: &Config,
    shutdown: watch::Receiver<bool>,
) -> Result<DeviceReport, SessionError> {
    sealed_ota_device::install_crypto_provider();
    let settings = Arc::new(settings(config)?);
    let (installer, mut worker_failed) = AgentInstaller::start(config)?;
    let dir = DeviceDir::at(&config.state_dir).with_enrolled_credentials(
        config.device.cert_file.clone(),
        config.device.key_file.clone(),
    );
    let (stop, stopping) = watch::channel(false);
    let device = Device::new(
        settings,
        config.device.id.clone(),
        dir,
        installer,
        Box::new(NoFaults),
        stopping,
    );
    let mut runner = tokio::spawn(device.run());
    let mut shutdown = shutdown;
    let failure = tokio::select! {
        report = &mut runner => return report.map_err(|e| SessionError::Worker(e.to_string())),
        _ = shutdown.wait_for(|stop| *stop) => None,
        failure = &mut worker_failed => failure.ok(),
    };
    // Stop the runner (it saves the session state and disconnects), then report why.
    let _ = stop.send(true);
    let report = runner
        .await
        .map_err(|e| SessionError::Worker(e.to_string()))?;
    match failure {
        Some(message) => Err(SessionError::Worker(message)),
        None => Ok(report),
    }
}

/// A verified image for the worker.
#[derive(Debug, Clone)]
struct Image {
    /// The campaign (the transaction id).
    id: String,
    version: String,
    expected: Expected,
}

impl Image {
    fn of(pending: &PendingInstall) -> Self {
        Image {
            id: pending.campaign_id.clone(),
            version: pending.version.clone(),
            expected: Expected {
                sha256: hex::encode(pending.sha256),
                size: pending.size,
            },
        }
    }
}

/// What the runner asks of the worker.
#[derive(Debug)]
enum Job {
    /// Begin a transaction for this verified image and drive it to its end.
    Install(Image),
    /// This install was pending when the agent started: resume it, report it again, or begin it.
    Resume(Image),
}

/// What the worker shows the runner between jobs.
#[derive(Debug, Clone)]
struct WorkerView {
    running_version: String,
    active: Option<String>,
}

/// The agent's installer: hands verified images to the update worker and brings its outcomes
/// back.
#[derive(Debug)]
pub struct AgentInstaller {
    staging: Staging,
    jobs: std_mpsc::Sender<Job>,
    outcomes: mpsc::Receiver<LateOutcome>,
    view: Arc<Mutex<WorkerView>>,
}

impl AgentInstaller {
    /// Opens the update machinery on the worker thread (its lock, journal, installer) and returns
    /// once it is open, with a receiver that yields a message if the worker fails later.
    pub fn start(config: &Config) -> Result<(Self, oneshot::Receiver<String>), SessionError> {
        let (opened_tx, opened_rx) = std_mpsc::channel();
        let (jobs, job_rx) = std_mpsc::channel();
        let (outcome_tx, outcomes) = mpsc::channel(4);
        let (failed_tx, failed_rx) = oneshot::channel();
        let worker_config = config.clone();
        thread::Builder::new()
            .name("update-worker".into())
            .spawn(move || {
                let agent = match Agent::open(&worker_config) {
                    Ok(agent) => agent,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let view = Arc::new(Mutex::new(view_of(&agent)));
                if opened_tx.send(Ok(Arc::clone(&view))).is_err() {
                    return;
                }
                let mut worker = Worker {
                    agent,
                    reporter: SessionReporter {
                        outcomes: outcome_tx,
                    },
                    view,
                };
                if let Err(e) = worker.serve(job_rx) {
                    tracing::error!("the update worker failed: {e}");
                    let _ = failed_tx.send(e.to_string());
                }
            })
            .map_err(|e| SessionError::Worker(format!("cannot start the update worker: {e}")))?;
        let view = opened_rx
            .recv()
            .map_err(|_| SessionError::Worker("the update worker did not start".into()))??;
        Ok((
            AgentInstaller {
                staging: Staging::new(&config.state_dir),
                jobs,
                outcomes,
                view,
            },
            failed_rx,
        ))
    }

    fn view(&self) -> WorkerView {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn send(&self, job: Job) -> sealed_ota_device::Result<InstallProgress> {
        self.jobs
            .send(job)
            .map(|()| InstallProgress::Underway)
            .map_err(|_| sealed_ota_device::Error::Installer("the update worker stopped".into()))
    }
}

impl Installer for AgentInstaller {
    fn download_path(&self, campaign_id: &str) -> std::path::PathBuf {
        self.staging.download_path(campaign_id)
    }

    fn running_version(&self) -> Option<String> {
        Some(self.view().running_version)
    }

    fn busy(&self) -> Option<String> {
        self.view()
            .active
            .map(|id| format!("update {id} is still under way on the device"))
    }

    fn install(
        &mut self,
        pending: &PendingInstall,
        _image: &std::path::Path,
    ) -> sealed_ota_device::Result<InstallProgress> {
        self.send(Job::Install(Image::of(pending)))
    }

    fn resume(
        &mut self,
        pending: &PendingInstall,
        _image: &std::path::Path,
    ) -> sealed_ota_device::Result<InstallProgress> {
        self.send(Job::Resume(Image::of(pending)))
    }

    async fn next_outcome(&mut self) -> LateOutcome {
        match self.outcomes.recv().await {
            Some(late) => late,
            // The worker is gone (its failure stops the session): nothing more will come.
            None => std::future::pending().await,
        }
    }
}

fn view_of(agent: &Agent) -> WorkerView {
    WorkerView {
        running_version: agent.running_version().to_string(),
        active: agent.active().map(|t| t.id.clone()),
    }
}

/// The update worker: owns the `driver::Agent`, takes jobs, reports outcomes.
struct Worker {
    agent: Agent,
    reporter: SessionReporter,
    view: Arc<Mutex<WorkerView>>,
}

impl Worker {
    /// Finishes what was under way, then serves jobs until the runner goes away.
    fn serve(&mut self, jobs: std_mpsc::Receiver<Job>) -> Result<(), AgentError> {
        self.drive()?;
        for job in jobs {
            match job {
                Job::Install(image) => self.install(&image)?,
                Job::Resume(image) => self.resume(&image)?,
            }
        }
        Ok(())
    }

    fn publish_view(&self) {
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = view_of(&self.agent);
    }

    /// Offers the outcomes not yet delivered, then drives the unfinished transaction (if any) to
    /// its end (a reboot stops the process on the way).
    fn drive(&mut self) -> Result<(), AgentError> {
        self.publish_view();
        self.agent.report_pending(&mut self.reporter)?;
        self.agent.run(&mut self.reporter)?;
        self.publish_view();
        Ok(())
    }

    fn install(&mut self, image: &Image) -> Result<(), AgentError> {
        match self.agent.begin(&image.id, &image.version, &image.expected) {
            Ok(()) => self.drive(),
            Err(e @ (AgentError::Stage(_) | AgentError::Journal(_))) => {
                // Nothing was journaled or changed: the receipt says the install failed.
                tracing::warn!(transaction = %image.id, "the install did not begin: {e}");
                self.reporter.report_unjournaled(
                    &image.id,
                    FinalOutcome::Failed {
                        reason: format!("the install did not begin, nothing was changed: {e}"),
                    },
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn resume(&mut self, image: &Image) -> Result<(), AgentError> {
        if self.agent.active().is_some_and(|t| t.id == image.id) {
            return self.drive();
        }
        if self
            .agent
            .report_outcome_of(&image.id, &mut self.reporter)?
        {
            return Ok(());
        }
        tracing::info!(transaction = %image.id, "the pending install never began: beginning it from the received image");
        self.install(image)
    }
}

/// Hands outcomes to the runner and waits until its receipt is saved.
struct SessionReporter {
    outcomes: mpsc::Sender<LateOutcome>,
}

impl SessionReporter {
    /// Sends `outcome` for campaign `id`; true once the runner saved its receipt (or owed none).
    fn deliver(&self, id: &str, outcome: FinalOutcome) -> bool {
        let (saved, receipt_saved) = oneshot::channel();
        let late = LateOutcome {
            campaign_id: id.to_string(),
            outcome,
            receipt_saved: Some(saved),
        };
        self.outcomes.blocking_send(late).is_ok() && receipt_saved.blocking_recv().is_ok()
    }

    /// An outcome the journal does not hold (the install never began).
    fn report_unjournaled(&self, id: &str, outcome: FinalOutcome) {
        if !self.deliver(id, outcome) {
            tracing::warn!(transaction = %id, "the session stopped before the outcome was reported; it is reported after the next start");
        }
    }
}

impl Reporter for SessionReporter {
    fn report(&mut self, finished: &Finished) -> Result<Delivery, ReportError> {
        Ok(
            if self.deliver(&finished.id, final_outcome(&finished.outcome)) {
                Delivery::Delivered
            } else {
                Delivery::Pending
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::{Reason, Step};

    #[test]
    fn outcomes_map_onto_receipts_without_claiming_more_than_is_known() {
        let reason = Reason {
            step: Step::HealthCheck,
            detail: "exit status 1".into(),
        };
        assert_eq!(
            final_outcome(&Outcome::Installed {
                version: "2.0.0".into()
            }),
            FinalOutcome::Committed
        );
        assert_eq!(
            final_outcome(&Outcome::RolledBack {
                reason: reason.clone()
            }),
            FinalOutcome::RolledBack {
                reason: "health-check: exit status 1".into()
            }
        );
        // Failed never becomes RolledBack (that would claim the previous image runs).
        match final_outcome(&Outcome::Failed { reason }) {
            FinalOutcome::Failed { reason } => {
                assert!(reason.contains("may not run"), "{reason}");
                assert!(reason.contains("health-check: exit status 1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
