//! The operator's heap: its allocator's setup, and giving free pages back to the system once a
//! campaign's work is over.
//!
//! The binary runs on jemalloc (feature `jemalloc`, default; main.rs sets the global allocator).
//! glibc's malloc kept what a 10,000-device campaign freed on pages shared with live objects, so
//! the replicas stayed 4.6 KiB per device above idle after it; on jemalloc, 2.1 KiB (docs/scale.md,
//! the twelfth change). This module owns [`configure`] (jemalloc's background threads, which hand
//! freed pages back after its decay without waiting for the program to allocate again), the one
//! call that returns every free page at once ([`trim`]: jemalloc purges every arena; without the
//! feature, glibc's `malloc_trim(0)`), and when that call is made: [`Trimmer::after_release`] is
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
    /// A run was released: trim once `writes_drained` returned (or after
    /// [`MOST_WAIT_FOR_WRITES`]) and [`SETTLE`] has passed. Needs a Tokio runtime.
    pub fn after_release(
        &self,
        writes_drained: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let scheduled = self.scheduled.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(MOST_WAIT_FOR_WRITES, writes_drained).await;
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
    /// Neither jemalloc nor glibc on Linux: nothing to call.
    Unsupported,
}

/// Give every free heap page back to the system now (blocking: it walks the whole heap).
pub fn trim() -> Trimmed {
    let before = resident_bytes().unwrap_or(0);
    if !allocator::give_back() {
        return Trimmed::Unsupported;
    }
    let after = resident_bytes().unwrap_or(0);
    Trimmed::Done {
        before,
        after,
        in_use: allocator::in_use(),
    }
}

/// Set the allocator up for a long-running process (at start, before the work): jemalloc's
/// background threads return the pages freed for a while (its decay, 10 s) without waiting for
/// the program to allocate again. Nothing to do for glibc.
pub fn configure() {
    allocator::configure();
}

/// The binary's allocator with the feature `jemalloc` (main.rs makes it the global allocator).
#[cfg(feature = "jemalloc")]
#[allow(unsafe_code)]
mod allocator {
    pub fn configure() {
        if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
            tracing::warn!(error = %e, "jemalloc: no background threads, freed pages go back later");
        }
    }

    /// Purges every arena's unused pages ("arena.<MALLCTL_ARENAS_ALL>.purge").
    pub fn give_back() -> bool {
        // 4096: MALLCTL_ARENAS_ALL in jemalloc 5's jemalloc.h, every arena.
        const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
        // SAFETY: a NUL-terminated control name, and no old or new value (the purge control
        // takes neither): jemalloc reads only the name, under its own locks.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                PURGE_ALL.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        rc == 0
    }

    pub fn in_use() -> u64 {
        // The statistics are a snapshot taken when the epoch advances.
        if tikv_jemalloc_ctl::epoch::advance().is_err() {
            return 0;
        }
        tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as u64)
    }
}

/// glibc's malloc, on Linux without the feature `jemalloc`.
#[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod allocator {
    pub fn configure() {}

    pub fn give_back() -> bool {
        // SAFETY: malloc_trim takes a byte count, touches only the allocator's own free lists
        // (under its arena locks) and is safe to call from any thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        true
    }

    /// In every arena and in mmapped blocks (`mallinfo2`).
    pub fn in_use() -> u64 {
        // SAFETY: mallinfo2 reads the allocator's counters (under its arena locks) and returns
        // them by value.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64
    }
}

/// Any other allocator: nothing to call.
#[cfg(all(
    not(feature = "jemalloc"),
    not(all(target_os = "linux", target_env = "gnu"))
))]
mod allocator {
    pub fn configure() {}

    pub fn give_back() -> bool {
        false
    }

    pub fn in_use() -> u64 {
        0
    }
}

/// This process's resident set size in bytes (VmRSS in /proc/self/status).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
