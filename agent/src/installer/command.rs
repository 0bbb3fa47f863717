//! The `command` backend: a plain executable hook the integrator writes, for anything RAUC and the
//! Mender modules do not cover. It owns the hook's calling contract, documented in the agent's
//! README:
//!
//! `<path> <action>`, with the action also in `SEALED_OTA_ACTION`; exit status 0 is success, and an
//! action the hook does not know must exit 0 (new actions may be added). Actions: `install`,
//! `verify` (after the reboot into the new image: is it what runs?), `commit`, `rollback`,
//! `verify-rollback` (after the reboot back: does the previous image run?), `failure`, `cleanup`.
//! Environment: `SEALED_OTA_TRANSACTION`, `SEALED_OTA_VERSION`, `SEALED_OTA_PREVIOUS_VERSION`,
//! `SEALED_OTA_IMAGE` (the verified image file), `SEALED_OTA_IMAGE_SHA256`, `SEALED_OTA_IMAGE_SIZE`,
//! `SEALED_OTA_WORK_DIR` (a directory kept for the transaction, for backups and notes),
//! `SEALED_OTA_REBOOTED` (`1` once the system rebooted into the new image), `SEALED_OTA_REASON`
//! (for `rollback` and `failure`: why).
//!
//! With `reboot = true` the new image runs only after a reboot, which the agent asks the system for;
//! a rollback after the system booted (since the install began) needs one too.

use std::time::Duration;

use super::{Installed, Installer, InstallerError, Prepared, StepContext, Towards};
use crate::config::CommandConfig;
use crate::process::Program;
use crate::transaction::{Phase, RebootBy};

/// The command hook backend.
#[derive(Debug)]
pub struct CommandHook {
    config: CommandConfig,
}

impl CommandHook {
    /// A hook as configured.
    pub fn new(config: CommandConfig) -> Self {
        CommandHook { config }
    }

    fn call(&self, action: &str, step: &StepContext<'_>) -> Result<(), InstallerError> {
        let tx = step.transaction;
        let reason = match &tx.phase {
            Phase::RollingBack { reason }
            | Phase::RollbackRebooting { reason, .. }
            | Phase::VerifyingRollback { reason }
            | Phase::Failing { reason, .. } => reason.to_string(),
            _ => String::new(),
        };
        Program::new(format!("hook {action}"), [self.config.path.as_os_str()])
            .arg(action)
            .env("SEALED_OTA_ACTION", action)
            .env("SEALED_OTA_TRANSACTION", &tx.id)
            .env("SEALED_OTA_VERSION", &tx.image.version)
            .env("SEALED_OTA_PREVIOUS_VERSION", &tx.previous_version)
            .env("SEALED_OTA_IMAGE", step.image)
            .env("SEALED_OTA_IMAGE_SHA256", &tx.image.sha256)
            .env("SEALED_OTA_IMAGE_SIZE", tx.image.size.to_string())
            .env("SEALED_OTA_WORK_DIR", step.work_dir)
            .env("SEALED_OTA_REBOOTED", if tx.rebooted { "1" } else { "0" })
            .env("SEALED_OTA_REASON", reason)
            .cwd(step.work_dir)
            .timeout(Duration::from_secs(self.config.timeout_secs))
            .run()?;
        Ok(())
    }
}

impl Installer for CommandHook {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn prepare(&mut self, _step: &StepContext<'_>) -> Result<Prepared, InstallerError> {
        Ok(Prepared {
            supports_rollback: self.config.supports_rollback,
            booted_slot: None,
        })
    }

    fn install(
        &mut self,
        step: &StepContext<'_>,
        progress: &mut dyn FnMut(u8, &str),
    ) -> Result<Installed, InstallerError> {
        progress(0, "hook install");
        self.call("install", step)?;
        progress(100, "hook install done");
        Ok(Installed {
            reboot: self.config.reboot.then_some(RebootBy::System),
            target_slot: None,
        })
    }

    fn verify_boot(
        &mut self,
        step: &StepContext<'_>,
        towards: Towards,
    ) -> Result<(), InstallerError> {
        match towards {
            Towards::New => self.call("verify", step),
            Towards::Previous => self.call("verify-rollback", step),
        }
    }

    fn commit(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        self.call("commit", step)
    }

    fn rollback(&mut self, step: &StepContext<'_>) -> Result<Option<RebootBy>, InstallerError> {
        self.call("rollback", step)?;
        // The system booted since the install began (a requested reboot or a power cut): the
        // previous image runs again only after another.
        Ok((self.config.reboot && step.transaction.rebooted).then_some(RebootBy::System))
    }

    fn failure(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        self.call("failure", step)
    }

    fn cleanup(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        self.call("cleanup", step)
    }
}
