//! The installer trait and its three backends: `rauc` (RAUC over D-Bus), `update_module` (Mender
//! Update Modules, v3 file API) and `command` (a plain executable hook). A backend performs one
//! effect of the transaction at a time and answers whether it worked; the order of the steps, what a
//! restart means and the final outcome belong to `transaction`, never to a backend. Every method may
//! be called again after a crash (the transaction redoes a step it cannot know finished), so each
//! must be safe to repeat.

use std::path::Path;

use crate::config::InstallerConfig;
use crate::process::ProcessError;
use crate::transaction::{RebootBy, Transaction};

pub mod command;
pub mod mender_artifact;
pub mod rauc;
pub mod update_module;

/// What a backend's step gets: the transaction as journaled and where its files are.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The transaction (phase, image, what earlier steps recorded).
    pub transaction: &'a Transaction,
    /// The verified image.
    pub image: &'a Path,
    /// A directory the backend owns for this transaction (kept until the transaction ends).
    pub work_dir: &'a Path,
}

/// The result of [`Installer::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Whether this install can be rolled back.
    pub supports_rollback: bool,
    /// The slot that runs, for a backend with slots (journaled before the install starts, so a
    /// rollback after a crash knows where to go back to).
    pub booted_slot: Option<String>,
}

/// The result of [`Installer::install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The reboot the new image needs to run, if any.
    pub reboot: Option<RebootBy>,
    /// The slot written, for a backend with slots.
    pub target_slot: Option<String>,
}

/// Which image a reboot or a boot check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Towards {
    /// The image the transaction installs.
    New,
    /// The image that ran before (a rollback).
    Previous,
}

/// Why a backend's step failed. The message is what the device reports as the reason.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// An external program (module, hook) failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// RAUC's D-Bus service failed or refused.
    #[error("RAUC: {0}")]
    Rauc(String),
    /// The image is not what the backend can install (wrong format, device type, module).
    #[error("{0}")]
    Image(String),
    /// What booted is not what the step expected.
    #[error("{0}")]
    WrongBoot(String),
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] crate::durable::FileError),
    /// The backend cannot do this (for example a reboot it did not ask to perform).
    #[error("the {backend} installer does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The step.
        what: &'static str,
    },
}

/// One installer backend. Each method is one effect of the transaction; see the module doc.
pub trait Installer: Send + std::fmt::Debug {
    /// `rauc`, `update-module` or `command`.
    fn kind(&self) -> &'static str;

    /// Prepares the install without changing the system (unpack, pre-checks) and says whether
    /// it can be rolled back.
    fn prepare(&mut self, step: &StepContext<'_>) -> Result<Prepared, InstallerError>;

    /// Writes the image. `progress` receives a percentage and a message.
    fn install(
        &mut self,
        step: &StepContext<'_>,
        progress: &mut dyn FnMut(u8, &str),
    ) -> Result<Installed, InstallerError>;

    /// Reboots, for a backend that answered [`RebootBy::Installer`].
    fn reboot(&mut self, step: &StepContext<'_>, towards: Towards) -> Result<(), InstallerError> {
        let _ = (step, towards);
        Err(InstallerError::Unsupported {
            backend: self.kind(),
            what: "rebooting by itself",
        })
    }

    /// After a reboot: checks that the image `towards` names is what booted.
    fn verify_boot(
        &mut self,
        step: &StepContext<'_>,
        towards: Towards,
    ) -> Result<(), InstallerError>;

    /// Makes the new image permanent.
    fn commit(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError>;

    /// Rolls back; returns the reboot needed to run the previous image again, if any.
    fn rollback(&mut self, step: &StepContext<'_>) -> Result<Option<RebootBy>, InstallerError>;

    /// The failure handling after a failed (and possibly rolled back) install. Errors are logged.
    fn failure(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        let _ = step;
        Ok(())
    }

    /// Cleanup at the end of every transaction. Errors are logged.
    fn cleanup(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        let _ = step;
        Ok(())
    }
}

/// The backend the configuration names.
pub fn from_config(config: &InstallerConfig, running_version: &str) -> Box<dyn Installer> {
    match config {
        InstallerConfig::Rauc(c) => Box::new(rauc::Rauc::new(c.clone())),
        InstallerConfig::UpdateModule(c) => Box::new(update_module::UpdateModule::new(
            c.clone(),
            running_version.to_string(),
        )),
        InstallerConfig::Command(c) => Box::new(command::CommandHook::new(c.clone())),
    }
}
