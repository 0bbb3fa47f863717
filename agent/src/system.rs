//! What the agent asks of the system around an install: which boot it runs in (the boot id), a
//! reboot (the configured command, then a bounded wait for the system to stop the agent), and the
//! health check. It owns the environment these commands get; whether their result means commit or
//! roll back is decided by `transaction`.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::config::{HealthCheckConfig, RebootConfig};
use crate::process::{ProcessError, Program};
use crate::transaction::Transaction;

/// Why the boot id could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the boot id from {}: {source} (reboot.boot_id_file)", path.display())]
pub struct BootIdError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The system's reboot and health-check commands.
#[derive(Debug, Clone)]
pub struct System {
    reboot: RebootConfig,
    health: Option<HealthCheckConfig>,
}

impl System {
    /// As configured.
    pub fn new(reboot: RebootConfig, health: Option<HealthCheckConfig>) -> Self {
        System { reboot, health }
    }

    /// The id of the boot the agent runs in (changes on every boot).
    pub fn boot_id(&self) -> Result<String, BootIdError> {
        fs::read_to_string(&self.reboot.boot_id_file)
            .map(|s| s.trim().to_string())
            .map_err(|source| BootIdError {
                path: self.reboot.boot_id_file.clone(),
                source,
            })
    }

    /// Asks the system to reboot (the command may return before the reboot happens).
    pub fn request_reboot(&self, transaction: &Transaction) -> Result<(), ProcessError> {
        let (program, args) = self
            .reboot
            .command
            .split_first()
            .expect("reboot.command is checked to be non-empty");
        tracing::info!(transaction = %transaction.id, command = ?self.reboot.command, "asking the system to reboot");
        Program::new("reboot command", [program])
            .args(args)
            .env("SEALED_OTA_AGENT_PID", std::process::id().to_string())
            .env("SEALED_OTA_TRANSACTION", &transaction.id)
            .timeout(Duration::from_secs(120))
            .run()
            .map(drop)
    }

    /// Waits for the requested reboot to stop the agent; returns if it did not within
    /// `reboot.wait_secs`.
    pub fn await_reboot(&self) {
        tracing::info!(seconds = self.reboot.wait_secs, "waiting for the reboot");
        thread::sleep(self.reboot.wait());
    }

    /// Runs the health check (none configured: healthy). `Err` carries why it failed.
    pub fn health_check(&self, transaction: &Transaction) -> Result<(), ProcessError> {
        let Some(health) = &self.health else {
            return Ok(());
        };
        let (program, args) = health
            .command
            .split_first()
            .expect("health_check.command is checked to be non-empty");
        Program::new("health check", [program])
            .args(args)
            .env("SEALED_OTA_TRANSACTION", &transaction.id)
            .env("SEALED_OTA_VERSION", &transaction.image.version)
            .env("SEALED_OTA_PREVIOUS_VERSION", &transaction.previous_version)
            .env(
                "SEALED_OTA_REBOOTED",
                if transaction.rebooted { "1" } else { "0" },
            )
            .timeout(Duration::from_secs(health.timeout_secs))
            .run()
            .map(drop)
    }
}
