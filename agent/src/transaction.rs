//! The update transaction as a pure state machine, in the Mender client's manner: events in, the
//! next effect out, no I/O. It owns the order of the steps (prepare → install → reboot → verify the
//! boot → health check → commit, or roll back), what a restart at each step means, and which final
//! outcome a transaction ends with. The shell (`driver`) journals the transaction after every
//! transition *before* it performs the effect, so a restart always finds the step that was under way.
//!
//! Restart rules (the `Resumed` event), after Mender's `LoadStateFromDb`:
//! - `Downloaded`, `Preparing`: start or redo preparation (nothing on the system has changed).
//! - `Installing`, `Verifying`, `HealthCheck`, `Committing`: the step may have half happened, so
//!   roll back (or, for an installer without rollback, end as `Failed`).
//! - `Rebooting`: a new boot id means the reboot happened: verify that the new image booted; the
//!   same boot id means it did not: ask again (bounded), then roll back.
//! - `RollingBack`, `VerifyingRollback`, `Failing`, `Cleanup`: redo that step (they are idempotent).
//! - `RollbackRebooting`: like `Rebooting`, towards the previous image.
//!
//! `Installed` is only ever the outcome of a commit that followed a verified boot (when the
//! installer needed a reboot) and a passed health check, so the agent never reports success for an
//! image that is not running. A transaction that takes more than [`MAX_STEPS`] transitions (a crash
//! loop) ends as `Failed` without further actions.

use serde::{Deserialize, Serialize};

/// Transitions after which a transaction is abandoned as a state loop.
pub const MAX_STEPS: u32 = 64;
/// Reboot requests per reboot phase before the agent gives up on the system rebooting.
pub const MAX_REBOOT_REQUESTS: u32 = 3;

/// The verified image a transaction installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    /// Version the image carries (semver).
    pub version: String,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Who performs a reboot the installer asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootBy {
    /// The agent asks the system (the configured reboot command).
    System,
    /// The installer reboots itself (a Mender update module that answered `Yes`).
    Installer,
}

/// The step of a transaction that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Preparing the install (unpacking, the installer's pre-checks).
    Prepare,
    /// Writing the image.
    Install,
    /// Rebooting into the new image.
    Reboot,
    /// Checking that the new image is what booted.
    VerifyBoot,
    /// The configured health check.
    HealthCheck,
    /// Making the new image permanent.
    Commit,
    /// Too many transitions (a crash loop).
    StateLoop,
}

impl Step {
    /// A short label (also a metric label).
    pub fn label(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Install => "install",
            Step::Reboot => "reboot",
            Step::VerifyBoot => "verify-boot",
            Step::HealthCheck => "health-check",
            Step::Commit => "commit",
            Step::StateLoop => "state-loop",
        }
    }
}

/// Why a transaction did not end as `Installed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// The step that failed.
    pub step: Step,
    /// What happened, for a person.
    pub detail: String,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step.label(), self.detail)
    }
}

/// The final outcome of a transaction, as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// The new image runs, passed its health check and is committed.
    Installed {
        /// Its version.
        version: String,
    },
    /// The new image does not run; the previous one does (it was rolled back, or never replaced).
    RolledBack {
        /// Why.
        reason: Reason,
    },
    /// The install failed and could not be rolled back (the installer has no rollback, or the
    /// rollback failed): what runs is not known for sure.
    Failed {
        /// Why.
        reason: Reason,
    },
}

impl Outcome {
    /// A short label: `installed`, `rolled-back`, `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Installed { .. } => "installed",
            Outcome::RolledBack { .. } => "rolled-back",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// Where a transaction is. Each variant is journaled before its action starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// The verified image is staged; nothing has started.
    Downloaded,
    /// The installer prepares (unpacks, asks whether it can roll back); no system change.
    Preparing,
    /// The installer writes the image.
    Installing,
    /// A reboot into the new image was asked for, from the boot with this id.
    Rebooting {
        /// Boot id when the reboot was requested.
        #[serde(rename = "bootId")]
        boot_id: String,
    },
    /// After the reboot: is the new image what booted?
    Verifying,
    /// The configured health check runs on the new image.
    HealthCheck,
    /// The installer makes the new image permanent.
    Committing,
    /// The installer rolls back.
    RollingBack {
        /// Why the transaction is rolled back.
        reason: Reason,
    },
    /// A reboot back into the previous image was asked for, from the boot with this id.
    RollbackRebooting {
        /// Why the transaction is rolled back.
        reason: Reason,
        /// Boot id when the reboot was requested.
        #[serde(rename = "bootId")]
        boot_id: String,
    },
    /// After the rollback reboot: is the previous image what booted?
    VerifyingRollback {
        /// Why the transaction is rolled back.
        reason: Reason,
    },
    /// The installer's failure handling (Mender's `ArtifactFailure`).
    Failing {
        /// Why the transaction failed.
        reason: Reason,
        /// Whether the previous image runs again.
        #[serde(rename = "rolledBack")]
        rolled_back: bool,
    },
    /// The installer cleans up; the outcome is decided.
    Cleanup {
        /// The outcome to report once clean.
        outcome: Outcome,
    },
}

impl Phase {
    /// The phase's name in the journal and in crash points.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Downloaded => "downloaded",
            Phase::Preparing => "preparing",
            Phase::Installing => "installing",
            Phase::Rebooting { .. } => "rebooting",
            Phase::Verifying => "verifying",
            Phase::HealthCheck => "health-check",
            Phase::Committing => "committing",
            Phase::RollingBack { .. } => "rolling-back",
            Phase::RollbackRebooting { .. } => "rollback-rebooting",
            Phase::VerifyingRollback { .. } => "verifying-rollback",
            Phase::Failing { .. } => "failing",
            Phase::Cleanup { .. } => "cleanup",
        }
    }

    /// Every phase name, in the order of a transaction (for tests that visit each).
    pub const NAMES: [&'static str; 12] = [
        "downloaded",
        "preparing",
        "installing",
        "rebooting",
        "verifying",
        "health-check",
        "committing",
        "rolling-back",
        "rollback-rebooting",
        "verifying-rollback",
        "failing",
        "cleanup",
    ];
}

/// What the shell does next. Each effect is answered by one [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Prepare the install → `Prepared` or `PrepareFailed`.
    Prepare,
    /// Write the image → `Installed` or `InstallFailed`.
    Install,
    /// Ask for a reboot into the new image → `RebootRequested` or `RebootRequestFailed`.
    Reboot(RebootBy),
    /// Wait for the requested reboot to stop the agent → `RebootDidNotHappen` if it does not.
    AwaitReboot,
    /// Check that the new image booted → `BootVerified` or `BootNotVerified`.
    VerifyBoot,
    /// Run the health check → `HealthPassed` or `HealthFailed`.
    HealthCheck,
    /// Make the new image permanent → `Committed` or `CommitFailed`.
    Commit,
    /// Roll back → `RolledBack` or `RollbackFailed`.
    Rollback,
    /// Ask for a reboot into the previous image → `RebootRequested` or `RebootRequestFailed`.
    RollbackReboot(RebootBy),
    /// Check that the previous image booted → `RollbackBootVerified` or `RollbackBootNotVerified`.
    VerifyRollbackBoot,
    /// The installer's failure handling → `FailureHandled`.
    Failure,
    /// The installer's cleanup → `CleanedUp`.
    Cleanup,
    /// The transaction is over: archive it with this outcome and report it.
    Finish(Outcome),
}

/// What happened, fed to [`Transaction::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start a freshly staged transaction.
    Begin,
    /// The agent started and found this transaction unfinished in the journal.
    Resumed,
    /// Preparation succeeded.
    Prepared {
        /// Whether the installer can roll this install back.
        supports_rollback: bool,
        /// The slot that runs, when the installer knows slots (RAUC).
        booted_slot: Option<String>,
    },
    /// Preparation failed (nothing on the system changed).
    PrepareFailed(String),
    /// The image is written.
    Installed {
        /// Whether (and by whom) a reboot is needed to run it.
        reboot: Option<RebootBy>,
        /// The slot the image was written to, when the installer knows slots.
        target_slot: Option<String>,
    },
    /// Writing the image failed.
    InstallFailed(String),
    /// The reboot was asked for; the system should stop the agent soon.
    RebootRequested,
    /// Asking for the reboot failed.
    RebootRequestFailed(String),
    /// The agent waited and is still running: the reboot did not happen.
    RebootDidNotHappen,
    /// The new image is what booted.
    BootVerified,
    /// The new image is not what booted.
    BootNotVerified(String),
    /// The health check passed.
    HealthPassed,
    /// The health check failed.
    HealthFailed(String),
    /// The new image is committed.
    Committed,
    /// The commit failed.
    CommitFailed(String),
    /// The rollback is done.
    RolledBack {
        /// The reboot needed to run the previous image again, if any.
        reboot: Option<RebootBy>,
    },
    /// The rollback failed.
    RollbackFailed(String),
    /// The previous image is what booted.
    RollbackBootVerified,
    /// The previous image is not what booted.
    RollbackBootNotVerified(String),
    /// The failure handling ran (its errors are logged, not fatal, as in Mender).
    FailureHandled,
    /// The cleanup ran (its errors are logged, not fatal).
    CleanedUp,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Begin => "Begin",
            Event::Resumed => "Resumed",
            Event::Prepared { .. } => "Prepared",
            Event::PrepareFailed(_) => "PrepareFailed",
            Event::Installed { .. } => "Installed",
            Event::InstallFailed(_) => "InstallFailed",
            Event::RebootRequested => "RebootRequested",
            Event::RebootRequestFailed(_) => "RebootRequestFailed",
            Event::RebootDidNotHappen => "RebootDidNotHappen",
            Event::BootVerified => "BootVerified",
            Event::BootNotVerified(_) => "BootNotVerified",
            Event::HealthPassed => "HealthPassed",
            Event::HealthFailed(_) => "HealthFailed",
            Event::Committed => "Committed",
            Event::CommitFailed(_) => "CommitFailed",
            Event::RolledBack { .. } => "RolledBack",
            Event::RollbackFailed(_) => "RollbackFailed",
            Event::RollbackBootVerified => "RollbackBootVerified",
            Event::RollbackBootNotVerified(_) => "RollbackBootNotVerified",
            Event::FailureHandled => "FailureHandled",
            Event::CleanedUp => "CleanedUp",
        }
    }
}

/// An event that makes no sense in the current phase (a bug in the shell, never input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transaction {id}: event {event} in phase {phase}")]
pub struct UnexpectedEvent {
    /// The transaction.
    pub id: String,
    /// The event's name.
    pub event: &'static str,
    /// The phase's name.
    pub phase: &'static str,
}

/// One update transaction, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transaction {
    /// Identifier (the campaign id, or `local-...` for a local install); a file name in the state
    /// directory.
    pub id: String,
    /// The image.
    pub image: ImageInfo,
    /// The version that ran when the transaction began.
    pub previous_version: String,
    /// Where the transaction is.
    pub phase: Phase,
    /// Whether the installer can roll back (known after preparation).
    pub supports_rollback: bool,
    /// The reboot the install needs (known after the install).
    pub reboot: Option<RebootBy>,
    /// The slot that ran when the install started (installers with slots: RAUC).
    pub previous_slot: Option<String>,
    /// The slot the image was written to (known once the install finished).
    pub target_slot: Option<String>,
    /// The boot id when the install started.
    pub install_boot_id: Option<String>,
    /// Whether the system rebooted since the install started (the boot id changed).
    pub rebooted: bool,
    /// Reboot requests in the current reboot phase.
    pub reboot_requests: u32,
    /// Transitions so far.
    pub steps: u32,
}

const INTERRUPTED: &str = "the agent stopped during this step (power loss, crash or restart)";

impl Transaction {
    /// A transaction for a staged, verified image.
    pub fn new(id: String, image: ImageInfo, previous_version: String) -> Self {
        Transaction {
            id,
            image,
            previous_version,
            phase: Phase::Downloaded,
            supports_rollback: false,
            reboot: None,
            previous_slot: None,
            target_slot: None,
            install_boot_id: None,
            rebooted: false,
            reboot_requests: 0,
            steps: 0,
        }
    }

    /// Applies `event` (the answer to the last effect, or `Begin`/`Resumed`) and returns the next
    /// effect. `boot_id` is the id of the boot the agent runs in. Pure: the caller journals `self`
    /// and then performs the effect.
    pub fn handle(&mut self, event: Event, boot_id: &str) -> Result<Effect, UnexpectedEvent> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            let reason = Reason {
                step: Step::StateLoop,
                detail: format!(
                    "abandoned after {MAX_STEPS} steps in phase {} (a crash or reboot loop)",
                    self.phase.name()
                ),
            };
            return Ok(Effect::Finish(Outcome::Failed { reason }));
        }
        if self
            .install_boot_id
            .as_deref()
            .is_some_and(|b| b != boot_id)
        {
            self.rebooted = true;
        }
        let unexpected = |tx: &Transaction, event: &Event| UnexpectedEvent {
            id: tx.id.clone(),
            event: event.name(),
            phase: tx.phase.name(),
        };
        let phase = self.phase.clone();
        let effect = match (phase, event) {
            (Phase::Downloaded, Event::Begin | Event::Resumed)
            | (Phase::Preparing, Event::Resumed) => self.enter(Phase::Preparing, Effect::Prepare),
            (
                Phase::Preparing,
                Event::Prepared {
                    supports_rollback,
                    booted_slot,
                },
            ) => {
                self.supports_rollback = supports_rollback;
                self.previous_slot = booted_slot;
                self.install_boot_id = Some(boot_id.to_string());
                self.enter(Phase::Installing, Effect::Install)
            }
            (Phase::Preparing, Event::PrepareFailed(detail)) => {
                // Nothing changed on the system: the previous image still runs.
                let reason = Reason {
                    step: Step::Prepare,
                    detail,
                };
                self.cleanup(Outcome::RolledBack { reason })
            }
            (
                Phase::Installing,
                Event::Installed {
                    reboot,
                    target_slot,
                },
            ) => {
                self.reboot = reboot;
                self.target_slot = target_slot;
                match reboot {
                    Some(by) => {
                        self.reboot_requests = 1;
                        self.enter(
                            Phase::Rebooting {
                                boot_id: boot_id.to_string(),
                            },
                            Effect::Reboot(by),
                        )
                    }
                    None => self.enter(Phase::HealthCheck, Effect::HealthCheck),
                }
            }
            (Phase::Installing, Event::InstallFailed(detail)) => self.fail(Step::Install, detail),
            (Phase::Installing, Event::Resumed) => self.fail(Step::Install, INTERRUPTED.into()),
            (Phase::Rebooting { .. }, Event::RebootRequested)
            | (Phase::RollbackRebooting { .. }, Event::RebootRequested) => Effect::AwaitReboot,
            (Phase::Rebooting { boot_id: before }, Event::Resumed) if before != boot_id => {
                self.enter(Phase::Verifying, Effect::VerifyBoot)
            }
            (Phase::Rebooting { .. }, Event::Resumed) => {
                self.retry_reboot("the system did not reboot".into())
            }
            (Phase::Rebooting { .. }, Event::RebootDidNotHappen) => {
                self.retry_reboot("the system did not reboot after the request".into())
            }
            (Phase::Rebooting { .. }, Event::RebootRequestFailed(detail)) => {
                self.retry_reboot(detail)
            }
            (Phase::Verifying, Event::BootVerified) => {
                self.enter(Phase::HealthCheck, Effect::HealthCheck)
            }
            (Phase::Verifying, Event::BootNotVerified(detail)) => {
                self.fail(Step::VerifyBoot, detail)
            }
            (Phase::Verifying, Event::Resumed) => self.fail(Step::VerifyBoot, INTERRUPTED.into()),
            (Phase::HealthCheck, Event::HealthPassed) => {
                self.enter(Phase::Committing, Effect::Commit)
            }
            (Phase::HealthCheck, Event::HealthFailed(detail)) => {
                self.fail(Step::HealthCheck, detail)
            }
            (Phase::HealthCheck, Event::Resumed) => {
                self.fail(Step::HealthCheck, INTERRUPTED.into())
            }
            (Phase::Committing, Event::Committed) => self.cleanup(Outcome::Installed {
                version: self.image.version.clone(),
            }),
            (Phase::Committing, Event::CommitFailed(detail)) => self.fail(Step::Commit, detail),
            (Phase::Committing, Event::Resumed) => self.fail(Step::Commit, INTERRUPTED.into()),
            (Phase::RollingBack { .. }, Event::Resumed) => Effect::Rollback,
            (Phase::RollingBack { reason }, Event::RolledBack { reboot: Some(by) }) => {
                // Later requests (retries) reboot the same way.
                self.reboot = Some(by);
                self.reboot_requests = 1;
                self.enter(
                    Phase::RollbackRebooting {
                        reason,
                        boot_id: boot_id.to_string(),
                    },
                    Effect::RollbackReboot(by),
                )
            }
            (Phase::RollingBack { reason }, Event::RolledBack { reboot: None }) => self.enter(
                Phase::Failing {
                    reason,
                    rolled_back: true,
                },
                Effect::Failure,
            ),
            (Phase::RollingBack { mut reason }, Event::RollbackFailed(detail)) => {
                reason.detail = format!("{}; the rollback failed too: {detail}", reason.detail);
                self.enter(
                    Phase::Failing {
                        reason,
                        rolled_back: false,
                    },
                    Effect::Failure,
                )
            }
            (
                Phase::RollbackRebooting {
                    reason,
                    boot_id: before,
                },
                Event::Resumed,
            ) if before != boot_id => self.enter(
                Phase::VerifyingRollback { reason },
                Effect::VerifyRollbackBoot,
            ),
            (
                Phase::RollbackRebooting { reason, .. },
                Event::Resumed | Event::RebootDidNotHappen,
            ) => self.retry_rollback_reboot(reason, "the system did not reboot".into(), boot_id),
            (Phase::RollbackRebooting { reason, .. }, Event::RebootRequestFailed(detail)) => {
                self.retry_rollback_reboot(reason, detail, boot_id)
            }
            (Phase::VerifyingRollback { .. }, Event::Resumed) => Effect::VerifyRollbackBoot,
            (Phase::VerifyingRollback { reason }, Event::RollbackBootVerified) => self.enter(
                Phase::Failing {
                    reason,
                    rolled_back: true,
                },
                Effect::Failure,
            ),
            (Phase::VerifyingRollback { reason }, Event::RollbackBootNotVerified(detail)) => {
                // As Mender: reboot towards the previous image again, a bounded number of times.
                self.retry_rollback_reboot(reason, detail, boot_id)
            }
            (Phase::Failing { .. }, Event::Resumed) => Effect::Failure,
            (
                Phase::Failing {
                    reason,
                    rolled_back,
                },
                Event::FailureHandled,
            ) => self.cleanup(if rolled_back {
                Outcome::RolledBack { reason }
            } else {
                Outcome::Failed { reason }
            }),
            (Phase::Cleanup { .. }, Event::Resumed) => Effect::Cleanup,
            (Phase::Cleanup { outcome }, Event::CleanedUp) => Effect::Finish(outcome),
            (_, event) => return Err(unexpected(self, &event)),
        };
        Ok(effect)
    }

    fn enter(&mut self, phase: Phase, effect: Effect) -> Effect {
        self.phase = phase;
        effect
    }

    fn cleanup(&mut self, outcome: Outcome) -> Effect {
        self.enter(Phase::Cleanup { outcome }, Effect::Cleanup)
    }

    /// A step after the install started failed: roll back if the installer can.
    fn fail(&mut self, step: Step, detail: String) -> Effect {
        let reason = Reason { step, detail };
        if self.supports_rollback {
            self.enter(Phase::RollingBack { reason }, Effect::Rollback)
        } else {
            self.enter(
                Phase::Failing {
                    reason,
                    rolled_back: false,
                },
                Effect::Failure,
            )
        }
    }

    fn retry_reboot(&mut self, detail: String) -> Effect {
        let by = self.reboot.unwrap_or(RebootBy::System);
        if self.reboot_requests < MAX_REBOOT_REQUESTS {
            self.reboot_requests += 1;
            // The phase keeps the boot id of the first request: any reboot since counts.
            Effect::Reboot(by)
        } else {
            let requests = self.reboot_requests;
            self.fail(Step::Reboot, format!("{detail} (asked {requests} times)"))
        }
    }

    fn retry_rollback_reboot(&mut self, mut reason: Reason, detail: String, now: &str) -> Effect {
        let by = self.reboot.unwrap_or(RebootBy::System);
        if self.reboot_requests < MAX_REBOOT_REQUESTS {
            self.reboot_requests += 1;
            let boot_id = match &self.phase {
                // Any reboot since the first request counts.
                Phase::RollbackRebooting { boot_id, .. } => boot_id.clone(),
                // Verification failed after a reboot: a new request starts from this boot.
                _ => now.to_string(),
            };
            self.phase = Phase::RollbackRebooting { reason, boot_id };
            Effect::RollbackReboot(by)
        } else {
            let requests = self.reboot_requests;
            reason.detail = format!(
                "{}; the previous image did not come back: {detail} (asked {requests} times)",
                reason.detail
            );
            self.enter(
                Phase::Failing {
                    reason,
                    rolled_back: false,
                },
                Effect::Failure,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOOT1: &str = "boot-1";
    const BOOT2: &str = "boot-2";
    const BOOT3: &str = "boot-3";

    fn tx() -> Transaction {
        Transaction::new(
            "campaign-1".into(),
            ImageInfo {
                version: "2.0.0".into(),
                sha256: "00".repeat(32),
                size: 3,
            },
            "1.0.0".into(),
        )
    }

    fn run(tx: &mut Transaction, steps: &[(Event, &str, Effect)]) {
        for (event, boot, expected) in steps {
            let effect = tx.handle(event.clone(), boot).unwrap();
            assert_eq!(
                &effect,
                expected,
                "after {event:?} in phase {}",
                tx.phase.name()
            );
        }
    }

    fn installed() -> Outcome {
        Outcome::Installed {
            version: "2.0.0".into(),
        }
    }

    /// A step of a scenario: the event, the boot it happens in, the effect expected.
    type Step3 = (Event, &'static str, Effect);

    fn prepared(supports_rollback: bool) -> Event {
        Event::Prepared {
            supports_rollback,
            booted_slot: None,
        }
    }

    fn installed_needing(reboot: Option<RebootBy>) -> Event {
        Event::Installed {
            reboot,
            target_slot: None,
        }
    }

    /// Begin, prepare (with or without rollback), install; then a reboot when `reboot`.
    fn through_install(t: &mut Transaction, supports_rollback: bool, reboot: bool) {
        let next = if reboot {
            (
                installed_needing(Some(RebootBy::System)),
                BOOT1,
                Effect::Reboot(RebootBy::System),
            )
        } else {
            (installed_needing(None), BOOT1, Effect::HealthCheck)
        };
        run(
            t,
            &[
                (Event::Begin, BOOT1, Effect::Prepare),
                (prepared(supports_rollback), BOOT1, Effect::Install),
                next,
            ],
        );
    }

    /// Through the install with a reboot, the reboot (boot 2) and a verified boot.
    fn until_health_check_after_reboot(t: &mut Transaction) {
        through_install(t, true, true);
        run(
            t,
            &[
                (Event::Resumed, BOOT2, Effect::VerifyBoot),
                (Event::BootVerified, BOOT2, Effect::HealthCheck),
            ],
        );
    }

    fn finishes_with(t: &mut Transaction, boot: &str, result: &str, step: Option<Step>) {
        match t.handle(Event::CleanedUp, boot).unwrap() {
            Effect::Finish(outcome) => {
                assert_eq!(outcome.label(), result, "{outcome:?}");
                if let Outcome::RolledBack { reason } | Outcome::Failed { reason } = &outcome {
                    assert_eq!(Some(reason.step), step, "{outcome:?}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn install_without_reboot_commits_after_the_health_check() {
        let mut t = tx();
        through_install(&mut t, true, false);
        let steps: [Step3; 3] = [
            (Event::HealthPassed, BOOT1, Effect::Commit),
            (Event::Committed, BOOT1, Effect::Cleanup),
            (Event::CleanedUp, BOOT1, Effect::Finish(installed())),
        ];
        run(&mut t, &steps);
    }

    #[test]
    fn install_with_reboot_verifies_the_boot_before_the_health_check() {
        let mut t = tx();
        through_install(&mut t, true, true);
        let steps: [Step3; 6] = [
            (Event::RebootRequested, BOOT1, Effect::AwaitReboot),
            (Event::Resumed, BOOT2, Effect::VerifyBoot),
            (Event::BootVerified, BOOT2, Effect::HealthCheck),
            (Event::HealthPassed, BOOT2, Effect::Commit),
            (Event::Committed, BOOT2, Effect::Cleanup),
            (Event::CleanedUp, BOOT2, Effect::Finish(installed())),
        ];
        run(&mut t, &steps);
        assert!(t.rebooted);
    }

    #[test]
    fn a_power_cut_during_the_install_counts_as_a_reboot_for_the_rollback() {
        let mut t = tx();
        run(
            &mut t,
            &[
                (Event::Begin, BOOT1, Effect::Prepare),
                (prepared(true), BOOT1, Effect::Install),
                (Event::Resumed, BOOT2, Effect::Rollback),
            ],
        );
        assert!(
            t.rebooted,
            "the rollback must know the system rebooted since the install began"
        );
    }

    #[test]
    fn a_failed_health_check_rolls_back_through_a_reboot_and_reports_why() {
        let mut t = tx();
        until_health_check_after_reboot(&mut t);
        let rollback_reboot = Event::RolledBack {
            reboot: Some(RebootBy::System),
        };
        run(
            &mut t,
            &[
                (
                    Event::HealthFailed("exit status 1".into()),
                    BOOT2,
                    Effect::Rollback,
                ),
                (
                    rollback_reboot,
                    BOOT2,
                    Effect::RollbackReboot(RebootBy::System),
                ),
                (Event::RebootRequested, BOOT2, Effect::AwaitReboot),
                (Event::Resumed, BOOT3, Effect::VerifyRollbackBoot),
                (Event::RollbackBootVerified, BOOT3, Effect::Failure),
                (Event::FailureHandled, BOOT3, Effect::Cleanup),
            ],
        );
        let reason = Reason {
            step: Step::HealthCheck,
            detail: "exit status 1".into(),
        };
        let done = Effect::Finish(Outcome::RolledBack { reason });
        run(&mut t, &[(Event::CleanedUp, BOOT3, done)]);
    }

    #[test]
    fn a_bootloader_fallback_is_caught_by_the_boot_check() {
        let mut t = tx();
        through_install(&mut t, true, true);
        let fallback = Event::BootNotVerified("booted A, expected B".into());
        run(
            &mut t,
            &[
                (Event::Resumed, BOOT2, Effect::VerifyBoot),
                (fallback, BOOT2, Effect::Rollback),
                (Event::RolledBack { reboot: None }, BOOT2, Effect::Failure),
                (Event::FailureHandled, BOOT2, Effect::Cleanup),
            ],
        );
        finishes_with(&mut t, BOOT2, "rolled-back", Some(Step::VerifyBoot));
    }

    #[test]
    fn a_reboot_that_never_happens_is_asked_for_three_times_then_rolled_back() {
        let mut t = tx();
        through_install(&mut t, true, true);
        let reboot = Effect::Reboot(RebootBy::System);
        run(
            &mut t,
            &[
                (Event::RebootRequested, BOOT1, Effect::AwaitReboot),
                (Event::RebootDidNotHappen, BOOT1, reboot.clone()),
                // A restart of the agent in the same boot is not a reboot.
                (Event::Resumed, BOOT1, reboot),
                (
                    Event::RebootRequestFailed("exit status 1".into()),
                    BOOT1,
                    Effect::Rollback,
                ),
            ],
        );
        assert!(matches!(&t.phase, Phase::RollingBack { reason } if reason.step == Step::Reboot));
    }

    #[test]
    fn without_rollback_support_a_failure_ends_as_failed() {
        let mut t = tx();
        run(
            &mut t,
            &[
                (Event::Begin, BOOT1, Effect::Prepare),
                (prepared(false), BOOT1, Effect::Install),
                (
                    Event::InstallFailed("disk full".into()),
                    BOOT1,
                    Effect::Failure,
                ),
                (Event::FailureHandled, BOOT1, Effect::Cleanup),
            ],
        );
        finishes_with(&mut t, BOOT1, "failed", Some(Step::Install));
    }

    #[test]
    fn a_failed_preparation_changed_nothing_and_reports_rolled_back() {
        let mut t = tx();
        let refused = Event::PrepareFailed("artifact is for another device type".into());
        run(
            &mut t,
            &[
                (Event::Begin, BOOT1, Effect::Prepare),
                (refused, BOOT1, Effect::Cleanup),
            ],
        );
        finishes_with(&mut t, BOOT1, "rolled-back", Some(Step::Prepare));
    }

    #[test]
    fn a_failed_rollback_ends_as_failed_with_both_reasons() {
        let mut t = tx();
        until_health_check_after_reboot(&mut t);
        run(
            &mut t,
            &[
                (
                    Event::HealthFailed("unhealthy".into()),
                    BOOT2,
                    Effect::Rollback,
                ),
                (
                    Event::RollbackFailed("no backup".into()),
                    BOOT2,
                    Effect::Failure,
                ),
                (Event::FailureHandled, BOOT2, Effect::Cleanup),
            ],
        );
        match t.handle(Event::CleanedUp, BOOT2).unwrap() {
            Effect::Finish(Outcome::Failed { reason }) => {
                assert_eq!(reason.step, Step::HealthCheck);
                assert!(reason.detail.contains("unhealthy") && reason.detail.contains("no backup"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The restart rules: what `Resumed` does in every phase.
    #[test]
    fn a_restart_in_each_phase() {
        let reason = Reason {
            step: Step::HealthCheck,
            detail: "x".into(),
        };
        let cases: Vec<(Phase, &str, Effect)> = vec![
            (Phase::Downloaded, BOOT1, Effect::Prepare),
            (Phase::Preparing, BOOT1, Effect::Prepare),
            (Phase::Installing, BOOT1, Effect::Rollback),
            (
                Phase::Rebooting {
                    boot_id: BOOT1.into(),
                },
                BOOT2,
                Effect::VerifyBoot,
            ),
            (
                Phase::Rebooting {
                    boot_id: BOOT1.into(),
                },
                BOOT1,
                Effect::Reboot(RebootBy::System),
            ),
            (Phase::Verifying, BOOT2, Effect::Rollback),
            (Phase::HealthCheck, BOOT2, Effect::Rollback),
            (Phase::Committing, BOOT2, Effect::Rollback),
            (
                Phase::RollingBack {
                    reason: reason.clone(),
                },
                BOOT2,
                Effect::Rollback,
            ),
            (
                Phase::RollbackRebooting {
                    reason: reason.clone(),
                    boot_id: BOOT2.into(),
                },
                BOOT3,
                Effect::VerifyRollbackBoot,
            ),
            (
                Phase::RollbackRebooting {
                    reason: reason.clone(),
                    boot_id: BOOT2.into(),
                },
                BOOT2,
                Effect::RollbackReboot(RebootBy::System),
            ),
            (
                Phase::VerifyingRollback {
                    reason: reason.clone(),
                },
                BOOT3,
                Effect::VerifyRollbackBoot,
            ),
            (
                Phase::Failing {
                    reason: reason.clone(),
                    rolled_back: true,
                },
                BOOT3,
                Effect::Failure,
            ),
            (
                Phase::Cleanup {
                    outcome: installed(),
                },
                BOOT3,
                Effect::Cleanup,
            ),
        ];
        let mut seen: Vec<&str> = Vec::new();
        for (phase, boot, expected) in cases {
            let mut t = tx();
            t.supports_rollback = true;
            t.reboot = Some(RebootBy::System);
            t.reboot_requests = 1;
            seen.push(phase.name());
            t.phase = phase;
            assert_eq!(
                t.handle(Event::Resumed, boot).unwrap(),
                expected,
                "phase {}",
                seen.last().unwrap()
            );
        }
        for name in Phase::NAMES {
            assert!(seen.contains(&name), "phase {name} has no restart case");
        }
    }

    #[test]
    fn a_crash_loop_ends_as_failed() {
        let mut t = tx();
        t.phase = Phase::Preparing;
        for _ in 0..MAX_STEPS {
            assert_eq!(t.handle(Event::Resumed, BOOT1).unwrap(), Effect::Prepare);
        }
        assert!(matches!(
            t.handle(Event::Resumed, BOOT1).unwrap(),
            Effect::Finish(Outcome::Failed { reason }) if reason.step == Step::StateLoop
        ));
    }

    #[test]
    fn an_event_out_of_place_is_an_error() {
        let mut t = tx();
        let err = t.handle(Event::Committed, BOOT1).unwrap_err();
        assert_eq!(err.phase, "downloaded");
        assert_eq!(err.event, "Committed");
    }

    #[test]
    fn the_journal_form_round_trips() {
        let mut t = tx();
        until_health_check_after_reboot(&mut t);
        t.previous_slot = Some("rootfs.0".into());
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("\"phase\":\"health-check\""), "{json}");
        assert_eq!(serde_json::from_str::<Transaction>(&json).unwrap(), t);
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Begin),
            Just(Event::Resumed),
            any::<bool>().prop_map(prepared),
            Just(Event::PrepareFailed("p".into())),
            prop_oneof![
                Just(None),
                Just(Some(RebootBy::System)),
                Just(Some(RebootBy::Installer))
            ]
            .prop_map(installed_needing),
            Just(Event::InstallFailed("i".into())),
            Just(Event::RebootRequested),
            Just(Event::RebootRequestFailed("r".into())),
            Just(Event::RebootDidNotHappen),
            Just(Event::BootVerified),
            Just(Event::BootNotVerified("b".into())),
            Just(Event::HealthPassed),
            Just(Event::HealthFailed("h".into())),
            Just(Event::Committed),
            Just(Event::CommitFailed("c".into())),
            prop_oneof![Just(None), Just(Some(RebootBy::System))]
                .prop_map(|reboot| Event::RolledBack { reboot }),
            Just(Event::RollbackFailed("f".into())),
            Just(Event::RollbackBootVerified),
            Just(Event::RollbackBootNotVerified("v".into())),
            Just(Event::FailureHandled),
            Just(Event::CleanedUp),
        ]
    }

    proptest! {
        /// Whatever happens (any events, restarts in any boot), `Installed` is reported only for
        /// an image that was committed after a passed health check, and after a verified boot when
        /// the install needed a reboot.
        #[test]
        fn installed_only_after_verified_boot_health_and_commit(
            events in proptest::collection::vec((any_event(), 0..3usize), 1..80)
        ) {
            let boots = [BOOT1, BOOT2, BOOT3];
            let mut t = tx();
            let (mut verified, mut healthy, mut committed) = (false, false, false);
            for (event, boot) in events {
                let before = t.phase.clone();
                let Ok(effect) = t.handle(event.clone(), boots[boot]) else { continue };
                match (&before, &event) {
                    (Phase::Installing, Event::Installed { .. }) => {
                        (verified, healthy, committed) = (false, false, false);
                    }
                    (Phase::Verifying, Event::BootVerified) => verified = true,
                    (Phase::HealthCheck, Event::HealthPassed) => healthy = true,
                    (Phase::Committing, Event::Committed) => committed = true,
                    _ => {}
                }
                if let Effect::Finish(outcome) = effect {
                    if matches!(outcome, Outcome::Installed { .. }) {
                        prop_assert!(committed && healthy);
                        prop_assert!(t.reboot.is_none() || verified);
                    }
                    break;
                }
            }
        }
    }
}
