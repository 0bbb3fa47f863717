//! Where a transaction's final outcome goes. It owns the [`Reporter`] trait the driver calls once
//! an outcome is journaled (and again at every start for outcomes not yet delivered), and the
//! reporter of this version, which logs. The MQTT session plugs in here: its reporter sends the
//! signed receipt (`Installed` / `RolledBack{reason}`) and answers `Delivered` once the manager
//! has it.

use crate::journal::Finished;
use crate::transaction::Outcome;

/// Whether a reporter delivered an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered: the journal marks it reported and it is not offered again.
    Delivered,
    /// Not yet (no session, not acknowledged): offered again at the next start.
    Pending,
}

/// Why a reporter failed (the outcome stays pending).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reporting the outcome of {transaction}: {detail}")]
pub struct ReportError {
    /// The transaction.
    pub transaction: String,
    /// What went wrong.
    pub detail: String,
}

/// Receives final outcomes, oldest first.
pub trait Reporter {
    /// Hands over one finished transaction.
    fn report(&mut self, finished: &Finished) -> Result<Delivery, ReportError>;
}

/// The reporter of this version: logs the outcome and keeps it pending for the session.
#[derive(Debug, Default)]
pub struct LogReporter {
    /// Outcomes seen (for the command line's exit status).
    pub seen: Vec<Finished>,
}

impl Reporter for LogReporter {
    fn report(&mut self, finished: &Finished) -> Result<Delivery, ReportError> {
        match &finished.outcome {
            Outcome::Installed { version } => {
                tracing::info!(transaction = %finished.id, %version, "outcome: installed")
            }
            Outcome::RolledBack { reason } => {
                tracing::warn!(transaction = %finished.id, version = %finished.version, %reason, "outcome: rolled back")
            }
            Outcome::Failed { reason } => {
                tracing::error!(transaction = %finished.id, version = %finished.version, %reason, "outcome: failed")
            }
        }
        self.seen.push(finished.clone());
        Ok(Delivery::Pending)
    }
}
