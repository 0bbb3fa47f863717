//! The crash test hook: `SEALED_OTA_AGENT_CRASH_AT=<point>` makes the agent SIGKILL itself when it
//! reaches that point, so tests can stop the real process at every step of an update transaction and
//! check what a restart makes of it. It owns the names of the points and nothing else; with the
//! variable unset (always, outside tests) `reached` does nothing.
//!
//! Points: `before:<phase>` (the journal says `<phase>`, its action has not started),
//! `after:<phase>` (the action finished, the next phase is not journaled yet), `journal-rename`
//! (a new journal is written and synced under its temporary name, not yet renamed) and
//! `before:report` / `after:report` around handing the outcome to the reporter. Phase names are the
//! journal's (`preparing`, `installing`, `rebooting`, ...).

use std::sync::OnceLock;

/// The environment variable that arms the hook.
pub const ENV: &str = "SEALED_OTA_AGENT_CRASH_AT";

/// A point in the agent where a test may stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashPoint {
    /// The journal names this phase; its action has not started.
    Before(&'static str),
    /// This phase's action finished; the next phase is not journaled.
    After(&'static str),
    /// A new journal is synced under its temporary name, not yet renamed over the old one.
    BeforeRename,
}

impl CrashPoint {
    fn name(&self) -> String {
        match self {
            CrashPoint::Before(phase) => format!("before:{phase}"),
            CrashPoint::After(phase) => format!("after:{phase}"),
            CrashPoint::BeforeRename => "journal-rename".to_string(),
        }
    }
}

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Called at each point; kills the process with SIGKILL when the hook is armed for it.
pub fn reached(point: &CrashPoint) {
    let Some(target) = armed() else { return };
    if target == point.name() {
        eprintln!("sealed-ota-agent: {ENV}={target}: stopping with SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(CrashPoint::Before("installing").name(), "before:installing");
        assert_eq!(CrashPoint::After("committing").name(), "after:committing");
        assert_eq!(CrashPoint::BeforeRename.name(), "journal-rename");
    }
}
