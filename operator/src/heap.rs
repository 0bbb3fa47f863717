//! Giving the heap's free pages back to the system once a campaign's work is over.
//!
//! glibc's malloc keeps the pages a process freed in the middle of its heap (only the top of the
//! heap shrinks by itself), so after a 10,000-device campaign the operator stayed at its peak
//! resident size although the session registry had let go of the run (docs/scale.md, the tenth
//! change). This module owns the one call that returns them, `malloc_trim(0)` (every arena, free
//! pages anywhere in it, `madvise`d away), and when it is made: [`Trimmer::after_release`] is
//! told when the registry released a run, waits until the Device status writes queued for it
//! have drained (they hold the last statuses) and the burst is over, then trims once, off the
//! async workers. Other platforms and allocators: a no-op that says so in the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long after a release (and after the writes drained) the heap is trimmed: releases of
/// several campaigns ending together make one trim.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Longest wait for the queued Device status writes to drain before trimming anyway.
const MOST_WAIT_FOR_WRITES: Duration = Duration::from_secs(120);

/// Trims the heap a little after runs are released; at most one trim waits at a time.
#[derive(Clone, Debug, Default)]
pub struct Trimmer {
    scheduled: Arc<AtomicBool>,
}

impl Trimmer {
    /// A run was released: trim once `writes_pending` reads 0 (or after
    /// [`MOST_WAIT_FOR_WRITES`]) and [`SETTLE`] has passed. Needs a Tokio runtime.
    pub fn after_release(&self, writes_pending: impl Fn() -> usize + Send + 'static) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let scheduled = self.scheduled.clone();
        tokio::spawn(async move {
            let waited = tokio::time::Instant::now();
            while writes_pending() > 0 && waited.elapsed() < MOST_WAIT_FOR_WRITES {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(SETTLE).await;
            // Releases from here on schedule a trim of their own.
            scheduled.store(false, Ordering::Release);
            match tokio::task::spawn_blocking(trim).await {
                Ok(Trimmed::Done {
                    before,
                    after,
                    in_use,
                }) => tracing::info!(
                    resident_before = before,
                    resident_after = after,
                    heap_in_use = in_use,
                    "runs released: freed heap pages given back"
                ),
                Ok(Trimmed::Unsupported) => {
                    tracing::debug!("runs released: this allocator keeps its free pages")
                }
                Err(e) => tracing::warn!(error = %e, "trimming the heap failed"),
            }
        });
    }
}

/// What a trim did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trimmed {
    /// The resident set size in bytes before and after (0 when /proc could not be read), and
    /// the heap bytes the program holds (allocated and not freed: what no trim can give back).
    Done {
        /// Before the trim.
        before: u64,
        /// After it.
        after: u64,
        /// Heap bytes in use.
        in_use: u64,
    },
    /// Not glibc on Linux: nothing to call.
    Unsupported,
}

/// Give every free heap page back to the system now (blocking: it walks the whole heap).
pub fn trim() -> Trimmed {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let before = resident_bytes().unwrap_or(0);
        malloc_trim();
        let after = resident_bytes().unwrap_or(0);
        Trimmed::Done {
            before,
            after,
            in_use: heap_in_use(),
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        Trimmed::Unsupported
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn malloc_trim() {
    // SAFETY: malloc_trim takes a byte count, touches only the allocator's own free lists (under
    // its arena locks) and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Heap bytes the program holds, in every arena and in mmapped blocks (glibc's `mallinfo2`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 reads the allocator's counters (under its arena locks) and returns them
    // by value.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// This process's resident set size in bytes (VmRSS in /proc/self/status).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
