//! Binary deltas between two firmware images, the one codec the manager (to make them) and the
//! devices (to rebuild the image) share: zstd with the base image as a reference prefix, what
//! `zstd --patch-from` does (chosen over bsdiff by measurement: docs/protocol.md, "Delta
//! updates"). It owns the codec's parameters, so both sides always agree on them, and the bound
//! on the rebuilt size (a delta cannot expand past the size the signed manifest declares). It
//! checks no hash: the caller checks the base's SHA-256 before and the rebuilt image's SHA-256
//! (and release signature) after. Needs the whole base in memory (zstd's reference prefix);
//! the delta is read and the image written as streams.

use std::io::{BufRead, Read, Write};

/// zstd level of the deltas the manager makes (19: the ratio matters more than the one-off time,
/// a delta is made once per base version; measured in the bench).
pub const LEVEL: i32 = 19;
/// Largest zstd window (2 GiB): bounds the base and target sizes a delta can span.
const MAX_WINDOW_LOG: u32 = 31;

/// Why a delta could not be made or applied.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The base or target image is larger than the zstd window can span.
    #[error("images of {0} bytes are too large for a delta (at most 2 GiB)")]
    TooLarge(u64),
    /// The delta is not a valid zstd frame for this base (corrupt, tampered, or made from another
    /// base).
    #[error("the delta does not decode against the base image: {0}")]
    Corrupt(std::io::Error),
    /// Applying the delta yields more bytes than the manifest declares for the image.
    #[error("the delta rebuilds more than the declared {limit} bytes")]
    TooLong {
        /// The declared image size.
        limit: u64,
    },
    /// Writing the rebuilt image failed.
    #[error("writing the rebuilt image: {0}")]
    Write(std::io::Error),
}

/// The window log spanning `len` bytes (zstd's `--patch-from` sets the window to the larger of
/// base and target, so every base byte stays referable).
fn window_log(len: u64) -> Result<u32, DeltaError> {
    let bits = u64::BITS - len.max(1).leading_zeros();
    if bits > MAX_WINDOW_LOG {
        return Err(DeltaError::TooLarge(len));
    }
    Ok(bits.max(10))
}

/// The delta that turns `base` into `target`.
pub fn make(base: &[u8], target: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    make_to(base, target, target.len() as u64, &mut out)?;
    Ok(out)
}

/// Writes the delta that turns `base` into the `target_len` bytes read from `target` to `out`
/// (the target and the delta as streams: the operator reads both from its cache directory).
pub fn make_to(
    base: &[u8],
    mut target: impl Read,
    target_len: u64,
    out: impl Write,
) -> Result<(), DeltaError> {
    let log = window_log((base.len() as u64).max(target_len))?;
    let mut encoder =
        zstd::stream::write::Encoder::with_ref_prefix(out, LEVEL, base).map_err(write)?;
    encoder.window_log(log).map_err(write)?;
    encoder.long_distance_matching(true).map_err(write)?;
    let copied = std::io::copy(&mut target, &mut encoder).map_err(write)?;
    if copied != target_len {
        return Err(write(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the target image has {copied} bytes, not {target_len}"),
        )));
    }
    encoder.finish().map_err(write)?;
    Ok(())
}

fn write(e: std::io::Error) -> DeltaError {
    DeltaError::Write(e)
}

/// Rebuilds the image from `base` and the buffered `delta` stream into `out`, at most `limit` bytes (the
/// manifest's image size); returns the bytes written.
pub fn apply(
    base: &[u8],
    delta: impl BufRead,
    mut out: impl Write,
    limit: u64,
) -> Result<u64, DeltaError> {
    let log = window_log(base.len().max(1) as u64)?.max(window_log(limit)?);
    let mut decoder =
        zstd::stream::read::Decoder::with_ref_prefix(delta, base).map_err(DeltaError::Corrupt)?;
    decoder.window_log_max(log).map_err(DeltaError::Corrupt)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DeltaError::Corrupt(e)),
        };
        written += n as u64;
        if written > limit {
            return Err(DeltaError::TooLong { limit });
        }
        out.write_all(&buf[..n]).map_err(write)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base and a target that shares most of it (an inserted, a changed and a removed range),
    /// like two builds of one program.
    fn pair() -> (Vec<u8>, Vec<u8>) {
        use rand::{RngCore, SeedableRng};
        let mut base = vec![0u8; 300_000];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut base);
        let mut target = base[..100_000].to_vec();
        target.extend_from_slice(b"a new function in the new release");
        target.extend(base[100_000..200_000].iter().map(|b| b.wrapping_add(1)));
        target.extend_from_slice(&base[250_000..]);
        (base, target)
    }

    #[test]
    fn a_delta_rebuilds_the_target_and_is_much_smaller() {
        let (base, target) = pair();
        let delta = make(&base, &target).unwrap();
        let mut rebuilt = Vec::new();
        let n = apply(&base, &delta[..], &mut rebuilt, target.len() as u64).unwrap();
        assert_eq!(n, target.len() as u64);
        assert!(rebuilt == target, "the rebuilt image differs");
        // The changed 100 kB range is random data: it costs its size; the rest almost nothing.
        assert!(delta.len() < 150_000, "{} bytes", delta.len());
    }

    #[test]
    fn another_base_or_a_tampered_delta_does_not_rebuild_the_target() {
        let (base, target) = pair();
        let delta = make(&base, &target).unwrap();
        let mut other = base.clone();
        other[50_000] ^= 0xff; // in the range the target copies from the base
        let mut rebuilt = Vec::new();
        // zstd cannot tell another base: the output differs, which the caller's SHA-256 check of
        // the rebuilt image refuses (and the base's hash is checked before).
        let _ = apply(&other, &delta[..], &mut rebuilt, target.len() as u64);
        assert!(rebuilt != target, "another base rebuilt the target");
        let mut tampered = delta.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 0x55;
        let mut rebuilt = Vec::new();
        let r = apply(&base, &tampered[..], &mut rebuilt, target.len() as u64);
        assert!(r.is_err() || rebuilt != target);
    }

    #[test]
    fn a_delta_rebuilding_more_than_the_declared_size_stops() {
        let (base, target) = pair();
        let delta = make(&base, &target).unwrap();
        let err = apply(&base, &delta[..], std::io::sink(), target.len() as u64 - 1).unwrap_err();
        assert!(matches!(err, DeltaError::TooLong { .. }), "{err}");
        assert!(matches!(
            apply(&base, &b"not zstd"[..], std::io::sink(), 10).unwrap_err(),
            DeltaError::Corrupt(_)
        ));
    }
}
