//! The journal: the one place the agent keeps what must survive a power cut — the version the device
//! runs, the unfinished transaction (if any) and the last finished ones with whether their outcome
//! was reported. It owns the file `<state_dir>/journal.json`, replaced atomically and durably on
//! every change (see `durable`). It makes no decision about transactions; `transaction` does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::{self, FileError, Mode};
use crate::transaction::{Outcome, Transaction};

/// Finished transactions kept for `status` and for outcomes still to report.
pub const HISTORY: usize = 16;
const FORMAT: u32 = 1;

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file system failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The journal exists but is not one this agent can read. Nothing is overwritten: a person
    /// must look at it (it is only ever replaced atomically, so this means disk corruption or an
    /// edit by hand).
    #[error("{}: not a readable journal ({detail}); move it aside to start with an empty journal (the unfinished update, if any, is then forgotten)", path.display())]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A transaction is already under way; a second one cannot begin.
    #[error("transaction {active} is still under way (phase {phase}); a new one cannot begin until it finishes")]
    Busy {
        /// The unfinished transaction.
        active: String,
        /// Its phase.
        phase: &'static str,
    },
}

/// What ran, as far as the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    /// The version the device runs.
    pub version: String,
    /// SHA-256 of the image the agent installed last (none for the enrolment image).
    pub sha256: Option<String>,
    /// The transaction that installed it (none for the enrolment image).
    pub transaction: Option<String>,
}

/// A transaction that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    /// The transaction's id.
    pub id: String,
    /// The version it tried to install.
    pub version: String,
    /// SHA-256 of its image.
    pub sha256: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether the reporter confirmed delivery of the outcome.
    pub reported: bool,
}

/// The journal's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JournalState {
    /// Format of this file.
    pub format: u32,
    /// What runs (absent until the first install or until `initial_version` is recorded).
    pub running: Option<Running>,
    /// The unfinished transaction.
    pub active: Option<Transaction>,
    /// Finished transactions, oldest first, at most [`HISTORY`].
    pub finished: Vec<Finished>,
}

impl Default for JournalState {
    fn default() -> Self {
        JournalState {
            format: FORMAT,
            running: None,
            active: None,
            finished: Vec::new(),
        }
    }
}

/// The journal file and its last saved content.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    state: JournalState,
}

impl Journal {
    /// Opens `<state_dir>/journal.json` (an empty journal if it does not exist yet).
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let path = state_dir.join("journal.json");
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let state: JournalState =
                    serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                if state.format != FORMAT {
                    return Err(JournalError::Corrupt {
                        path,
                        detail: format!("format {} (this agent reads {FORMAT})", state.format),
                    });
                }
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => JournalState::default(),
            Err(e) => return Err(FileError::new("reading", &path, e).into()),
        };
        Ok(Journal { path, state })
    }

    /// The journal's content as last saved.
    pub fn state(&self) -> &JournalState {
        &self.state
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version the device runs: the last installed one, else `initial`.
    pub fn running_version<'a>(&'a self, initial: &'a str) -> &'a str {
        self.state
            .running
            .as_ref()
            .map_or(initial, |r| r.version.as_str())
    }

    /// The unfinished transaction.
    pub fn active(&self) -> Option<&Transaction> {
        self.state.active.as_ref()
    }

    /// Records a new transaction (in phase `Downloaded`); refused while another is unfinished.
    pub fn begin(&mut self, transaction: Transaction) -> Result<(), JournalError> {
        if let Some(active) = &self.state.active {
            return Err(JournalError::Busy {
                active: active.id.clone(),
                phase: active.phase.name(),
            });
        }
        let mut next = self.state.clone();
        next.active = Some(transaction);
        self.save(next)
    }

    /// Saves the unfinished transaction as it is now (after a transition, before its effect).
    pub fn update(&mut self, transaction: &Transaction) -> Result<(), JournalError> {
        let mut next = self.state.clone();
        next.active = Some(transaction.clone());
        self.save(next)
    }

    /// Ends the unfinished transaction with `outcome`: it moves to the history (unreported) and, if
    /// it installed its image, becomes what runs. One atomic write.
    pub fn finish(
        &mut self,
        transaction: &Transaction,
        outcome: &Outcome,
    ) -> Result<(), JournalError> {
        let mut next = self.state.clone();
        next.active = None;
        if matches!(outcome, Outcome::Installed { .. }) {
            next.running = Some(Running {
                version: transaction.image.version.clone(),
                sha256: Some(transaction.image.sha256.clone()),
                transaction: Some(transaction.id.clone()),
            });
        }
        next.finished.push(Finished {
            id: transaction.id.clone(),
            version: transaction.image.version.clone(),
            sha256: transaction.image.sha256.clone(),
            outcome: outcome.clone(),
            reported: false,
        });
        let excess = next.finished.len().saturating_sub(HISTORY);
        next.finished.drain(..excess);
        self.save(next)
    }

    /// Finished transactions whose outcome was not reported yet, oldest first.
    pub fn unreported(&self) -> impl Iterator<Item = &Finished> {
        self.state.finished.iter().filter(|f| !f.reported)
    }

    /// Records that the outcome of transaction `id` was delivered. Unknown ids are ignored (the
    /// entry may have aged out of the history).
    pub fn mark_reported(&mut self, id: &str) -> Result<(), JournalError> {
        let mut next = self.state.clone();
        let mut changed = false;
        for f in next
            .finished
            .iter_mut()
            .filter(|f| f.id == id && !f.reported)
        {
            f.reported = true;
            changed = true;
        }
        if changed {
            self.save(next)?;
        }
        Ok(())
    }

    fn save(&mut self, next: JournalState) -> Result<(), JournalError> {
        let mut bytes = serde_json::to_vec_pretty(&next).expect("the journal serialises");
        bytes.push(b'\n');
        durable::write_atomic(&self.path, &bytes, Mode::Private)?;
        self.state = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::{ImageInfo, Phase, Reason, Step};

    fn tx(id: &str) -> Transaction {
        Transaction::new(
            id.into(),
            ImageInfo {
                version: "2.0.0".into(),
                sha256: "ab".repeat(32),
                size: 1,
            },
            "1.0.0".into(),
        )
    }

    #[test]
    fn survives_a_reopen_at_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.running_version("1.0.0"), "1.0.0");
        let mut t = tx("c1");
        j.begin(t.clone()).unwrap();
        t.phase = Phase::Installing;
        j.update(&t).unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.active().unwrap().phase, Phase::Installing);
        assert!(matches!(j.begin(tx("c2")), Err(JournalError::Busy { .. })));
        let outcome = Outcome::Installed {
            version: "2.0.0".into(),
        };
        j.finish(&t, &outcome).unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.active().is_none());
        assert_eq!(j.running_version("1.0.0"), "2.0.0");
        assert_eq!(j.unreported().count(), 1);
        j.mark_reported("c1").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.unreported().count(), 0);
        assert_eq!(durable::mode_of(j.path()).unwrap(), 0o600);
    }

    #[test]
    fn a_rollback_does_not_change_what_runs_and_history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        for i in 0..HISTORY + 3 {
            let t = tx(&format!("c{i}"));
            j.begin(t.clone()).unwrap();
            let reason = Reason {
                step: Step::HealthCheck,
                detail: "unhealthy".into(),
            };
            j.finish(&t, &Outcome::RolledBack { reason }).unwrap();
        }
        assert_eq!(j.running_version("1.0.0"), "1.0.0");
        assert_eq!(j.state().finished.len(), HISTORY);
        assert_eq!(j.state().finished[0].id, "c3");
    }

    #[test]
    fn a_corrupt_journal_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("journal.json"), b"{not json").unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("move it aside"), "{err}");
        assert_eq!(
            fs::read(dir.path().join("journal.json")).unwrap(),
            b"{not json"
        );
    }
}
