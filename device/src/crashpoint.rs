//! The crash test hook: `SEALED_OTA_AGENT_CRASH_AT=<point>` makes the device process SIGKILL itself
//! when it reaches that point, so tests can stop the real process at every step of a campaign (the
//! download, the staged install, the agent's update transaction, the receipt) and check what a
//! restart makes of it. It owns the names of the points and nothing else; with the variable unset
//! (always, outside tests) `reached` does nothing.
//!
//! Points of the agent's transaction: `before:<phase>` (the journal says `<phase>`, its action has
//! not started), `after:<phase>` (the action finished, the next phase is not journaled yet),
//! `during:installing` (RAUC accepted the bundle and installs it while the agent waits),
//! `before:report` / `after:report` around handing the outcome to the reporter. Phase names are the
//! journal's (`preparing`, `installing`, `rebooting`, ...). Points of the session (the runner):
//! `after:chunk` (a chunk is written, the state saying so may not be), `after:save` (the session
//! state was saved), `before:stage` (the image is verified, the install not staged),
//! `after:stage` (the pending install is saved, the installer not called), `before:receipt` /
//! `after:receipt` (an outcome arrived; the receipt is not made / made and saved),
//! `after:credentials` (rotated credentials stored, not yet used). Any file write:
//! `journal-rename` (a file is written and synced under its temporary name, not yet renamed; the
//! name is kept from the journal, its first user). A suffix `#N` stops at the N-th time the point
//! is reached in the process (`after:chunk#3`: the third chunk).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms the hook.
pub const ENV: &str = "SEALED_OTA_AGENT_CRASH_AT";

/// A point in the agent where a test may stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashPoint {
    /// The journal names this phase (or the session reached this step); its action has not started.
    Before(&'static str),
    /// This phase's action (or session step) finished; the next is not journaled.
    After(&'static str),
    /// This phase's action is under way in another process (RAUC installing).
    During(&'static str),
    /// A new journal (or any other durable file) is synced under its temporary name, not yet
    /// renamed over the old one.
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
        eprintln!("sealed-ota: {ENV}={target}#{nth}: stopping with SIGKILL");
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
