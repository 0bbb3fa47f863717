//! The operator makes a delta without holding either image in its memory (issue 17: "the operator
//! never holds a whole image"): the base and the target are mapped from the cache files and zstd's
//! tables are bounded, so its anonymous memory (heap, zstd's C allocations; not the page cache the
//! maps use) grows by tens of MiB for a 128 MiB pair, not by the images' sizes. Its own test binary:
//! the process's memory is this test's alone.

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sealed_ota_operator::chunk_cache::CacheDir;
use sha2::{Digest, Sha256};

const IMAGE_MIB: usize = 128;
/// What the delta may add to the process's anonymous memory: zstd's bounded tables (about
/// 35 MiB) and buffers; reading either image whole would add 128 MiB, zstd's window buffer as much.
const GROWTH_BUDGET_MIB: u64 = 64;

/// `RssAnon` of this process, in KiB.
fn rss_anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A pseudo-random MiB (xorshift: no image is ever whole in memory, only the block in hand).
fn block(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

/// Writes the base (128 pseudo-random MiB) and the next release of it (one MiB changed, one
/// inserted) a MiB at a time; returns the target's SHA-256.
fn write_pair(base: &Path, target: &Path) -> [u8; 32] {
    let mut b = BufWriter::new(std::fs::File::create(base).unwrap());
    let mut t = BufWriter::new(std::fs::File::create(target).unwrap());
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..IMAGE_MIB as u64 {
        block(i, &mut buf);
        b.write_all(&buf).unwrap();
        if i == 40 {
            block(1_000 + i, &mut buf); // a changed MiB
        }
        t.write_all(&buf).unwrap();
        sha.update(&buf);
        if i == 90 {
            block(2_000, &mut buf); // an inserted MiB
            t.write_all(&buf).unwrap();
            sha.update(&buf);
        }
    }
    b.flush().unwrap();
    t.flush().unwrap();
    sha.finalize().into()
}

#[test]
fn making_a_delta_of_a_128_mib_image_holds_neither_image_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = CacheDir::open(&tmp.path().join("cache")).unwrap();
    let target = cache.campaign("uid-1").unwrap();
    let files = cache.campaign("uid-1-d0").unwrap();
    let target_sha = write_pair(&files.image_path(), &target.image_path());

    let before = rss_anon_kib();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_anon_kib());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        })
    };
    let (size, _) = files.replace_with_delta(&target.image_path()).unwrap();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap().max(rss_anon_kib());
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "RssAnon {} MiB before, {} MiB at the peak (+{growth_mib} MiB); delta {size} bytes",
        before / 1024,
        peak / 1024
    );
    assert!(
        growth_mib <= GROWTH_BUDGET_MIB,
        "making the delta grew anonymous memory by {growth_mib} MiB (budget {GROWTH_BUDGET_MIB})"
    );
    // Two changed MiB of random data cost about their size; the other 127 MiB almost nothing.
    assert!(size < 3 << 20, "the delta is {size} bytes");

    // The delta rebuilds the target (checked after the measurement: this reads the base whole).
    let mut rebuilt = Sha256::new();
    let mut delta = Vec::new();
    std::fs::File::open(files.image_path())
        .unwrap()
        .read_to_end(&mut delta)
        .unwrap();
    let base = {
        let mut out = Vec::with_capacity(IMAGE_MIB << 20);
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..IMAGE_MIB as u64 {
            block(i, &mut buf);
            out.extend_from_slice(&buf);
        }
        out
    };
    struct Hashing<'a>(&'a mut Sha256);
    impl Write for Hashing<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let limit = (IMAGE_MIB as u64 + 1) << 20;
    sealed_ota_protocol::delta::apply(&base, &delta[..], Hashing(&mut rebuilt), limit).unwrap();
    assert_eq!(
        <[u8; 32]>::from(rebuilt.finalize()),
        target_sha,
        "the rebuilt image differs"
    );
}
