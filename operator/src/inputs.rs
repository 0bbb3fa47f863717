//! Validation of a campaign's inputs (pure): the manager Secret, the firmware source, the CA Secret of
//! a credential rotation. Each problem becomes a [`Blocker`] whose message names the object, the field
//! and the fix. Fetching the objects is the controller's job; parsing them is this module's.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use sealed_ota_protocol::{CertificateAuthority, Identity, ReleaseSignature, TrustAnchor};
use sha2::{Digest, Sha256};

use crate::crd::ReleaseSignatureSpec;
use crate::reasons::BlockerReason;
use crate::status::Blocker;

/// Keys of a manager Secret.
pub const TLS_CRT: &str = "tls.crt";
/// Private key entry.
pub const TLS_KEY: &str = "tls.key";
/// CA certificate entry.
pub const CA_CRT: &str = "ca.crt";

fn blocker(reason: BlockerReason, message: String) -> Blocker {
    Blocker { reason, message }
}

fn secret_text(
    data: &BTreeMap<String, ByteString>,
    key: &str,
    reason: BlockerReason,
    what: &str,
) -> Result<String, Blocker> {
    let v = data
        .get(key)
        .ok_or_else(|| blocker(reason, format!("{what} has no key {key:?}; add it")))?;
    String::from_utf8(v.0.clone()).map_err(|_| {
        blocker(
            reason,
            format!("{what} key {key:?} is not PEM text; store PEM"),
        )
    })
}

/// Parse the manager Secret: type kubernetes.io/tls with tls.crt, tls.key and ca.crt; the certificate
/// must name `manager_id`.
pub fn manager_identity(
    secret: &Secret,
    manager_id: &str,
) -> Result<(Identity, TrustAnchor), Blocker> {
    const R: BlockerReason = BlockerReason::ManagerSecretInvalid;
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let what = format!("Secret {name} (spec.managerSecretName)");
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err(blocker(
            R,
            format!("{what} must be of type kubernetes.io/tls with tls.crt, tls.key and ca.crt"),
        ));
    }
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let cert = secret_text(data, TLS_CRT, R, &what)?;
    let key = secret_text(data, TLS_KEY, R, &what)?;
    let ca = secret_text(data, CA_CRT, R, &what)?;
    let identity = Identity::from_pem(&cert, &key).map_err(|e| {
        blocker(
            R,
            format!("{what}: tls.crt/tls.key do not form a P-256 identity ({e}); issue a manager certificate from the CA"),
        )
    })?;
    if identity.name() != manager_id {
        return Err(blocker(
            R,
            format!(
                "{what}: certificate names {:?} but this operator's manager id is {manager_id:?}; issue a certificate with CN {manager_id}",
                identity.name()
            ),
        ));
    }
    let trust = TrustAnchor::from_pem(&ca)
        .map_err(|e| blocker(R, format!("{what}: ca.crt is not a CA certificate ({e})")))?;
    Ok((identity, trust))
}

/// The CA of a credential rotation: tls.crt and tls.key of the CA Secret.
pub fn rotation_ca(secret: &Secret) -> Result<CertificateAuthority, Blocker> {
    const R: BlockerReason = BlockerReason::CaSecretInvalid;
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let what = format!("Secret {name} (spec.payload.rotateCredentials.caSecretName)");
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let cert = secret_text(data, TLS_CRT, R, &what)?;
    let key = secret_text(data, TLS_KEY, R, &what)?;
    CertificateAuthority::from_pem(&cert, &key)
        .map_err(|e| blocker(R, format!("{what}: not a CA certificate and key ({e})")))
}

/// Firmware bytes from a ConfigMap key (binaryData first, then data as UTF-8).
pub fn firmware_from_config_map(cm: &ConfigMap, key: &str) -> Result<Vec<u8>, Blocker> {
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    if let Some(v) = cm.binary_data.as_ref().and_then(|d| d.get(key)) {
        return Ok(v.0.clone());
    }
    if let Some(v) = cm.data.as_ref().and_then(|d| d.get(key)) {
        return Ok(v.clone().into_bytes());
    }
    Err(blocker(BlockerReason::FirmwareUnreadable,
        format!("ConfigMap {name} (spec.payload.firmware.configMapKeyRef) has no key {key:?} in binaryData or data; add the image under that key"),
    ))
}

/// Firmware bytes from a Secret key.
pub fn firmware_from_secret(secret: &Secret, key: &str) -> Result<Vec<u8>, Blocker> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .ok_or_else(|| {
            blocker(BlockerReason::FirmwareUnreadable,
                format!("Secret {name} (spec.payload.firmware.secretKeyRef) has no key {key:?}; add the image under that key"),
            )
        })
}

/// Check the image against the expected SHA-256 (hex), when one is given.
pub fn check_digest(image: &[u8], expected: Option<&str>) -> Result<(), Blocker> {
    check_sha256(&Sha256::digest(image).into(), expected)
}

/// Check an image's SHA-256 (computed while it was stored) against the expected one (hex).
pub fn check_sha256(sha256: &[u8; 32], expected: Option<&str>) -> Result<(), Blocker> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = hex::encode(sha256);
    if actual != expected.to_ascii_lowercase() {
        return Err(blocker(BlockerReason::FirmwareDigestMismatch,
            format!("firmware SHA-256 is {actual} but spec.payload.firmware.sha256 says {expected}; fix the image or the digest"),
        ));
    }
    Ok(())
}

/// The release signature of the campaign, checked against the image and version it must sign.
pub fn release_signature(
    spec: &ReleaseSignatureSpec,
    size: u64,
    sha: &[u8; 32],
    version: &str,
) -> Result<ReleaseSignature, Blocker> {
    const R: BlockerReason = BlockerReason::ReleaseSignatureInvalid;
    let sig = ReleaseSignature::from_hex(&spec.public_key, &spec.signature).map_err(|e| {
        blocker(
            R,
            format!("spec.payload.firmware.releaseSignature cannot be read ({e}); paste what `sealed-ota release sign` prints"),
        )
    })?;
    if !sig.verifies_for(version, size, sha) {
        return Err(blocker(
            R,
            format!(
                "spec.payload.firmware.releaseSignature (key {}) does not sign this image as version {version} ({} bytes, SHA-256 {}): sign exactly this image with `sealed-ota release sign --version {version}`",
                hex::encode(sig.key_id()),
                size,
                hex::encode(sha)
            ),
        ));
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_secret(name: &str, entries: &[(&str, &str)], type_: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_release_signature_must_sign_this_image_and_version() {
        let signer = sealed_ota_protocol::ReleaseSigner::generate();
        let image = b"firmware image".to_vec();
        let sha: [u8; 32] = Sha256::digest(&image).into();
        let sig = signer.sign("1.2.0", image.len() as u64, &sha);
        let spec = ReleaseSignatureSpec {
            public_key: hex::encode(&sig.public_key),
            signature: hex::encode(sig.signature),
        };
        let check = |spec: &ReleaseSignatureSpec, img: &[u8], version: &str| {
            release_signature(spec, img.len() as u64, &Sha256::digest(img).into(), version)
        };
        assert_eq!(check(&spec, &image, "1.2.0").unwrap(), sig);
        for (img, version) in [(&b"another image"[..], "1.2.0"), (&image[..], "1.2.1")] {
            let b = check(&spec, img, version).unwrap_err();
            assert_eq!(b.reason, BlockerReason::ReleaseSignatureInvalid);
            assert!(
                b.message.contains("releaseSignature")
                    && b.message.contains("sealed-ota release sign")
            );
        }
        let garbled = ReleaseSignatureSpec {
            signature: "00".into(),
            ..spec
        };
        assert!(check(&garbled, &image, "1.2.0")
            .unwrap_err()
            .message
            .contains("cannot be read"));
    }

    #[test]
    fn manager_secret_checks_type_keys_and_name() {
        let now = 1_800_000_000;
        let ca = CertificateAuthority::generate("test-ca", now - 10, 10).unwrap();
        let id = ca
            .issue(sealed_ota_protocol::Role::Manager, "mgr-a", now - 10, 10)
            .unwrap();
        let cert = id.cert_pem();
        let key = id.key_pem();
        let ca_pem = ca.cert_pem();
        let good = tls_secret(
            "m",
            &[(TLS_CRT, &cert), (TLS_KEY, &key), (CA_CRT, &ca_pem)],
            "kubernetes.io/tls",
        );
        let (identity, _) = manager_identity(&good, "mgr-a").unwrap();
        assert_eq!(identity.name(), "mgr-a");

        let wrong_name = manager_identity(&good, "mgr-b").unwrap_err();
        assert!(
            wrong_name.message.contains("CN mgr-b"),
            "{}",
            wrong_name.message
        );

        let opaque = tls_secret("m", &[(TLS_CRT, &cert)], "Opaque");
        assert!(manager_identity(&opaque, "mgr-a")
            .unwrap_err()
            .message
            .contains("kubernetes.io/tls"));

        let no_ca = tls_secret(
            "m",
            &[(TLS_CRT, &cert), (TLS_KEY, &key)],
            "kubernetes.io/tls",
        );
        let b = manager_identity(&no_ca, "mgr-a").unwrap_err();
        assert_eq!(b.reason, BlockerReason::ManagerSecretInvalid);
        assert!(b.message.contains("ca.crt"));
        assert!(
            !b.message.contains("PRIVATE KEY"),
            "never echo key material"
        );

        let garbage = tls_secret(
            "m",
            &[(TLS_CRT, "x"), (TLS_KEY, "y"), (CA_CRT, &ca_pem)],
            "kubernetes.io/tls",
        );
        assert!(manager_identity(&garbage, "mgr-a").is_err());

        let ca_secret = tls_secret(
            "ca",
            &[(TLS_CRT, &ca_pem), (TLS_KEY, &ca.key_pem())],
            "kubernetes.io/tls",
        );
        assert!(rotation_ca(&ca_secret).is_ok());
        let no_key = tls_secret("ca", &[(TLS_CRT, &ca_pem)], "kubernetes.io/tls");
        assert_eq!(
            rotation_ca(&no_key).unwrap_err().reason,
            BlockerReason::CaSecretInvalid
        );
    }

    #[test]
    fn firmware_sources_and_digest() {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("fw".into()),
                ..Default::default()
            },
            binary_data: Some([("bin".to_string(), ByteString(vec![1, 2, 3]))].into()),
            data: Some([("txt".to_string(), "abc".to_string())].into()),
            ..Default::default()
        };
        assert_eq!(firmware_from_config_map(&cm, "bin").unwrap(), vec![1, 2, 3]);
        assert_eq!(
            firmware_from_config_map(&cm, "txt").unwrap(),
            b"abc".to_vec()
        );
        let missing = firmware_from_config_map(&cm, "nope").unwrap_err();
        assert_eq!(missing.reason, BlockerReason::FirmwareUnreadable);
        assert!(missing.message.contains("\"nope\""));

        let digest = hex::encode(Sha256::digest(b"abc"));
        assert!(check_digest(b"abc", Some(&digest)).is_ok());
        assert!(check_digest(b"abc", None).is_ok());
        let bad = check_digest(b"abd", Some(&digest)).unwrap_err();
        assert_eq!(bad.reason, BlockerReason::FirmwareDigestMismatch);
    }
}
