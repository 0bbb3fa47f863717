//! Binary deltas between two firmware images, the one codec the manager (to make them) and the
//! devices (to rebuild the image) share: zstd with the base image as a reference prefix, what
//! `zstd --patch-from` does (chosen over bsdiff by measurement: docs/protocol.md, "Delta
//! updates"). It owns the codec's parameters, so both sides always agree on them, and the bound
//! on the rebuilt size (a delta cannot expand past the size the signed manifest declares). It
//! checks no hash: the caller checks the base's SHA-256 before and the rebuilt image's SHA-256
//! (and release signature) after. Both sides need the whole base addressable (zstd's reference
//! prefix; the operator maps it from its cache file, see [`make_to`]); the delta is read and the
//! image written as streams.

use std::io::{BufRead, Read, Write};

/// zstd level of the deltas the manager makes up to [`OPTIMAL_PARSER_REACH`] (19: the ratio
/// matters more than the one-off time, a delta is made once per base version; measured in the
/// bench).
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

/// The larger side (base or target) up to which deltas are made at [`LEVEL`]. zstd's optimal
/// parser (levels 16 to 19) reaches the base only through its own match tables, which at level 19
/// index the last 2^25 bytes of it; in single-threaded mode it does not take long-distance matches
/// from further back (measured with zstd 1.5.7 and the 1.5.4 CLI with `--single-thread`: a
/// 128 MiB pair with one MiB changed gave a "delta" as large as the image at levels 16-19 and
/// 1.06 MB at levels 9-13).
const OPTIMAL_PARSER_REACH: u64 = 32 << 20;
/// zstd level above [`OPTIMAL_PARSER_REACH`]: binary-tree lazy matching, which takes the
/// long-distance matches from anywhere in the base (the 128 MiB pair above: 6.7 s).
const LARGE_LEVEL: i32 = 13;
/// Ceilings on the match finder's tables above [`OPTIMAL_PARSER_REACH`] (log2 of entries): zstd
/// sizes them from the level and the input (about 50 MiB at level 13); these keep them near
/// 30 MiB at any size, long-distance matching still covering the whole window.
const LARGE_CHAIN_LOG: u32 = 22;
const LARGE_HASH_LOG: u32 = 21;
const LARGE_LDM_HASH_LOG: u32 = 20;

/// The delta that turns `base` into `target`.
pub fn make(base: &[u8], target: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    make_to(base, target, &mut out)?;
    Ok(out)
}

/// Writes the delta that turns `base` into `target` to `out`. Neither image is copied: zstd
/// references the base (its `--patch-from` prefix) and reads the target where they lie (stable
/// input), so a caller that maps both from files (the operator's cache) holds no image in its own
/// memory; the delta leaves through a 1 MiB buffer. Above [`OPTIMAL_PARSER_REACH`] the level is
/// [`LARGE_LEVEL`] and zstd's own tables are bounded ([`LARGE_CHAIN_LOG`] and its neighbours).
pub fn make_to(base: &[u8], target: &[u8], mut out: impl Write) -> Result<(), DeltaError> {
    use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, CCtx, CParameter, InBuffer, OutBuffer};
    let span = (base.len() as u64).max(target.len() as u64);
    let log = window_log(span)?;
    let zstd = |code: usize| write(std::io::Error::other(zstd::zstd_safe::get_error_name(code)));
    let mut cctx = CCtx::create();
    let mut parameters = vec![
        CParameter::WindowLog(log),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::StableInBuffer(true),
    ];
    if span <= OPTIMAL_PARSER_REACH {
        parameters.push(CParameter::CompressionLevel(LEVEL));
    } else {
        parameters.extend([
            CParameter::CompressionLevel(LARGE_LEVEL),
            CParameter::ChainLog(LARGE_CHAIN_LOG),
            CParameter::HashLog(LARGE_HASH_LOG),
            CParameter::LdmHashLog(LARGE_LDM_HASH_LOG),
        ]);
    }
    for parameter in parameters {
        cctx.set_parameter(parameter).map_err(zstd)?;
    }
    cctx.set_pledged_src_size(Some(target.len() as u64))
        .map_err(zstd)?;
    cctx.ref_prefix(base).map_err(zstd)?;
    let mut input = InBuffer::around(target);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut output = OutBuffer::around(&mut buf[..]);
        let left = cctx
            .compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_end)
            .map_err(zstd)?;
        out.write_all(output.as_slice()).map_err(write)?;
        if left == 0 {
            return Ok(());
        }
    }
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

    /// Above the optimal parser's reach a delta still finds the base's first bytes (a level
    /// whose parser ignored long-distance matches would send them again: about 16 MiB here).
    #[test]
    fn a_delta_of_images_larger_than_the_optimal_parser_s_reach_still_uses_the_whole_base() {
        use rand::{RngCore, SeedableRng};
        let mut base = vec![0u8; 48 << 20];
        rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut base);
        let mut target = base.clone();
        rand::rngs::StdRng::seed_from_u64(10).fill_bytes(&mut target[..1 << 20]);
        let delta = make(&base, &target).unwrap();
        assert!(delta.len() < 2 << 20, "{} bytes", delta.len());
        let mut rebuilt = Vec::new();
        apply(&base, &delta[..], &mut rebuilt, target.len() as u64).unwrap();
        assert!(rebuilt == target, "the rebuilt image differs");
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
