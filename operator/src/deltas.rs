//! A firmware campaign's delta groups (`spec.payload.firmware.deltas`), the pure part: the
//! validation of the field (each `fromVersion` a semantic version, none twice, none the target
//! version, exactly one source each) and which payload a device gets: the delta whose base
//! version is the device's `status.runningVersion`, unless that device already refused a delta
//! (`DeltaBaseMismatch`), else the full image. Fetching, making and sealing the deltas is
//! [`crate::firmware`]'s; serving them, [`crate::runs`]'.

use crate::crd::FirmwareSource;
use crate::reasons::BlockerReason;
use crate::status::Blocker;

/// The first problem of `fw.deltas` for a campaign of `target_version`, naming the field.
pub fn validate(fw: &FirmwareSource, target_version: &str) -> Result<(), Blocker> {
    let invalid = |message: String| Blocker {
        reason: BlockerReason::PayloadInvalid,
        message,
    };
    let target = semver::Version::parse(target_version).ok();
    let mut seen: Vec<semver::Version> = Vec::with_capacity(fw.deltas.len());
    for (i, d) in fw.deltas.iter().enumerate() {
        let field = format!("spec.payload.firmware.deltas[{i}]");
        let from = semver::Version::parse(&d.from_version).map_err(|e| {
            invalid(format!(
                "{field}.fromVersion {:?} is not a semantic version ({e}); write the version the devices report in status.runningVersion, e.g. 1.4.0",
                d.from_version
            ))
        })?;
        if target.as_ref() == Some(&from) {
            return Err(invalid(format!(
                "{field}.fromVersion {} is the campaign's targetVersion: a device on it needs no update; remove the entry",
                d.from_version
            )));
        }
        if seen.contains(&from) {
            return Err(invalid(format!(
                "{field}.fromVersion {} appears twice in spec.payload.firmware.deltas; keep one entry per base version",
                d.from_version
            )));
        }
        seen.push(from);
        let sources = [
            d.config_map_key_ref.is_some(),
            d.secret_key_ref.is_some(),
            d.url.is_some(),
            d.oci.is_some(),
        ];
        if sources.iter().filter(|&&s| s).count() != 1 {
            return Err(invalid(format!(
                "{field} must set exactly one of configMapKeyRef, secretKeyRef, url or oci (where the {} image is)",
                d.from_version
            )));
        }
    }
    Ok(())
}

/// The delta (an index into `bases`, the base versions in `spec.payload.firmware.deltas` order)
/// a device running `running_version` gets, `None`: the full image. A device that refused a
/// delta of this campaign (`refused_delta`) gets the full image.
pub fn payload_for(
    bases: &[String],
    running_version: Option<&str>,
    refused_delta: bool,
) -> Option<usize> {
    if refused_delta {
        return None;
    }
    let running = semver::Version::parse(running_version?).ok()?;
    bases
        .iter()
        .position(|b| semver::Version::parse(b).is_ok_and(|b| b == running))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeltaSource, KeyRef};

    fn delta(from: &str) -> DeltaSource {
        DeltaSource {
            from_version: from.into(),
            config_map_key_ref: Some(KeyRef {
                name: format!("fw-{from}"),
                key: "image".into(),
            }),
            secret_key_ref: None,
            url: None,
            oci: None,
            sha256: None,
        }
    }

    fn firmware(deltas: Vec<DeltaSource>) -> FirmwareSource {
        FirmwareSource {
            deltas,
            ..delta("0.0.0").image_source()
        }
    }

    #[test]
    fn bad_deltas_are_refused_naming_the_field() {
        assert!(validate(&firmware(vec![delta("1.0.0"), delta("1.1.0")]), "2.0.0").is_ok());
        let cases = [
            (
                vec![delta("one")],
                "deltas[0].fromVersion \"one\" is not a semantic version",
            ),
            (
                vec![delta("1.0.0"), delta("2.0.0")],
                "deltas[1].fromVersion 2.0.0 is the campaign's targetVersion",
            ),
            (
                vec![delta("1.0.0"), delta("1.0.0")],
                "deltas[1].fromVersion 1.0.0 appears twice",
            ),
            (
                vec![DeltaSource {
                    config_map_key_ref: None,
                    ..delta("1.0.0")
                }],
                "deltas[0] must set exactly one of",
            ),
            (
                vec![DeltaSource {
                    secret_key_ref: Some(KeyRef {
                        name: "s".into(),
                        key: "k".into(),
                    }),
                    ..delta("1.0.0")
                }],
                "deltas[0] must set exactly one of",
            ),
        ];
        for (deltas, expected) in cases {
            let b = validate(&firmware(deltas), "2.0.0").unwrap_err();
            assert_eq!(b.reason, BlockerReason::PayloadInvalid);
            assert!(b.message.contains(expected), "{}", b.message);
        }
    }

    #[test]
    fn a_device_on_a_base_gets_its_delta_every_other_the_full_image() {
        let bases = vec!["1.0.0".to_owned(), "1.1.0".to_owned()];
        assert_eq!(payload_for(&bases, Some("1.1.0"), false), Some(1));
        assert_eq!(payload_for(&bases, Some("1.0.0"), false), Some(0));
        assert_eq!(
            payload_for(&bases, Some("1.0.0"), true),
            None,
            "refused once"
        );
        assert_eq!(payload_for(&bases, Some("0.9.0"), false), None);
        assert_eq!(payload_for(&bases, Some("garbage"), false), None);
        assert_eq!(payload_for(&bases, None, false), None, "never reported");
    }
}
