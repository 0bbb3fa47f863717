//! The crash test hook: `SEALED_OTA_AGENT_CRASH_AT=<point>` makes the agent SIGKILL itself when it
//! reaches that point, so tests can stop the real process at every step of an update transaction and
//! check what a restart makes of it. It owns the names of the points and nothing else; with the
//! variable unset (always, outside tests) `reached` does nothing.
//!
//! Points: `before:<phase>` (the journal says `<phase>`, its action has not started),
//! `after:<phase>` (the action finished, the next phase is not journaled yet), `during:installing`
//! (RAUC accepted the bundle and installs it while the agent waits), `journal-rename`
//! (a new journal is written and synced under its temporary name, not yet renamed) and
//! `before:report` / `after:report` around handing the outcome to the reporter. Phase names are the
//! journal's (`preparing`, `installing`, `rebooting`, ...). A suffix `#N` stops at the N-th time
//! the point is reached in the process (`journal-rename#3`: the third journal write).

use std::sync::atomic::{AtomicU32, Ordering};
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
    /// This phase's action is under way in another process (RAUC installing).
    During(&'static str),
    /// A new journal is synced under its temporary name, not yet renamed over the old one.
    BeforeRename,
}

impl CrashPoint {
    fn name(&self) -> String {
        match self {
            CrashPoint::Before(phase) => format!("before:{phase}"),
            CrashPoint::After(phase) => format!("after:{phase}"),
            CrashPoint::During(phase) => format!("during:{phase}"),
            CrashPoint::BeforeRename => "journal-rename".to_string(),
        }
    }
}

/// The armed point's name and at which occurrence it fires.
fn parse(value: &str) -> (String, u32) {
    match value.rsplit_once('#') {
        Some((name, nth)) => (name.to_string(), nth.parse().unwrap_or(1).max(1)),
        None => (value.to_string(), 1),
    }
}

fn armed() -> Option<&'static (String, u32)> {
    static ARMED: OnceLock<Option<(String, u32)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var(ENV)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| parse(&v))
        })
        .as_ref()
}

/// Called at each point; kills the process with SIGKILL when the hook is armed for it.
pub fn reached(point: &CrashPoint) {
    static SEEN: AtomicU32 = AtomicU32::new(0);
    let Some((target, nth)) = armed() else { return };
    if *target == point.name() && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        eprintln!("sealed-ota-agent: {ENV}={target}#{nth}: stopping with SIGKILL");
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
        assert_eq!(parse("journal-rename#3"), ("journal-rename".to_string(), 3));
        assert_eq!(
            parse("before:installing"),
            ("before:installing".to_string(), 1)
        );
    }
}
