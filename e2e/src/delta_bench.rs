//! The delta-update figures of `make bench`: the bytes a delta saves against the full image on a
//! real pair of release binaries (the device agent built at two commits, `scripts/delta-pair.sh`),
//! for the codec the product uses (zstd with the base as reference prefix,
//! `sealed_ota_protocol::delta`) beside bsdiff (the `bsdiff` crate; its raw patch is mostly zero
//! bytes, so it is compressed with zstd at the same level, as bsdiff's own format compresses
//! with bzip2), with the time each takes to
//! make the delta and to rebuild the image; every rebuilt image is compared with the target, so
//! a figure is only reported for a delta that works. Wall times on this noisy machine: one run,
//! ratios compared within it.

use std::time::Instant;

use anyhow::{ensure, Result};

/// One codec's figures on one pair.
#[derive(Debug, Clone)]
pub struct CodecFigures {
    /// Bytes of the delta.
    pub delta_bytes: u64,
    /// Seconds to make it (once per base version, on the operator).
    pub make_seconds: f64,
    /// Seconds to rebuild the full image from base and delta (on the device).
    pub apply_seconds: f64,
}

/// Both codecs on one pair.
#[derive(Debug, Clone)]
pub struct DeltaFigures {
    /// Bytes of the base image.
    pub base_bytes: u64,
    /// Bytes of the full target image (what a device without the base receives).
    pub full_bytes: u64,
    /// zstd `--patch-from` (the product's codec).
    pub zstd: CodecFigures,
    /// bsdiff, its patch compressed with zstd.
    pub bsdiff: CodecFigures,
}

/// Measures both codecs on `base` → `target`; fails when either does not rebuild `target`.
pub fn measure(base: &[u8], target: &[u8]) -> Result<DeltaFigures> {
    let zstd = codec(
        "zstd",
        target,
        || Ok(sealed_ota_protocol::delta::make(base, target)?),
        |delta| {
            let mut rebuilt = Vec::with_capacity(target.len());
            sealed_ota_protocol::delta::apply(base, delta, &mut rebuilt, target.len() as u64)?;
            Ok(rebuilt)
        },
    )?;
    // The raw patch's length, for decompression (a patch file would carry it in a header).
    let raw_len = std::cell::Cell::new(0);
    let bsdiff = codec(
        "bsdiff",
        target,
        || {
            let mut raw = Vec::new();
            bsdiff::diff(base, target, &mut raw)?;
            raw_len.set(raw.len());
            Ok(zstd::bulk::compress(
                &raw,
                sealed_ota_protocol::delta::LEVEL,
            )?)
        },
        |patch| {
            let raw = zstd::bulk::decompress(patch, raw_len.get())?;
            let mut rebuilt = Vec::with_capacity(target.len());
            bsdiff::patch(base, &mut &raw[..], &mut rebuilt)?;
            Ok(rebuilt)
        },
    )?;
    Ok(DeltaFigures {
        base_bytes: base.len() as u64,
        full_bytes: target.len() as u64,
        zstd,
        bsdiff,
    })
}

/// Times `make` and `apply` of one codec and checks that the delta rebuilds `target`.
fn codec(
    name: &str,
    target: &[u8],
    make: impl FnOnce() -> Result<Vec<u8>>,
    apply: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
) -> Result<CodecFigures> {
    let started = Instant::now();
    let delta = make()?;
    let make_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let rebuilt = apply(&delta)?;
    let apply_seconds = started.elapsed().as_secs_f64();
    ensure!(
        rebuilt == target,
        "the {name} delta did not rebuild the target"
    );
    Ok(CodecFigures {
        delta_bytes: delta.len() as u64,
        make_seconds,
        apply_seconds,
    })
}

impl DeltaFigures {
    /// Delta bytes over full-image bytes, for the product's codec.
    pub fn zstd_ratio(&self) -> f64 {
        self.zstd.delta_bytes as f64 / self.full_bytes as f64
    }

    /// Delta bytes over full-image bytes, for bsdiff.
    pub fn bsdiff_ratio(&self) -> f64 {
        self.bsdiff.delta_bytes as f64 / self.full_bytes as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both codecs rebuild a pair with shared content and make deltas far smaller than it.
    #[test]
    fn both_codecs_rebuild_a_pair_and_report_their_sizes() {
        let base = crate::product::random_image(200_000);
        let mut target = base.clone();
        target[50_000..51_000].fill(7);
        target.extend_from_slice(b"release 2");
        let f = measure(&base, &target).unwrap();
        assert_eq!(f.full_bytes, target.len() as u64);
        assert!(f.zstd_ratio() < 0.1, "{f:?}");
        assert!(f.bsdiff_ratio() < 0.1, "{f:?}");
    }
}
