//! Firmware from an OCI registry (`spec.payload.firmware.oci`), where platform teams keep release
//! artifacts (ORAS, Flux OCIRepository): the reference is resolved once to a manifest digest (a
//! digest in the reference is the integrity check; a tag's digest is recorded on the campaign
//! status and used from then on), the artifact's one file (layer) is streamed into the cache
//! directory and its SHA-256 compared with the layer digest. Registry credentials come from a
//! `kubernetes.io/dockerconfigjson` Secret. The client is the ORAS project's `oci-client`; this
//! module maps what it says to [`Blocker`]s naming the field and the fix. Parsing the Secret and
//! the reference is pure and tested on its own.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

use crate::crd::OciSource;
use crate::error::Error;
use crate::fetch::{FetchError, HashingFile};
use crate::reasons::BlockerReason;
use crate::status::Blocker;

/// What a pull stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// The manifest digest the reference resolved to (`sha256:...`).
    pub manifest_digest: String,
    /// Bytes of the image.
    pub size: u64,
    /// SHA-256 of the image (equal to the layer digest).
    pub sha256: [u8; 32],
}

fn blocker(reason: BlockerReason, message: String) -> Blocker {
    Blocker { reason, message }
}

/// Parse `spec.payload.firmware.oci.reference` (pure). With `recorded`, the digest an earlier
/// preparation resolved the reference to, the reference is pinned to it.
pub fn parse_reference(reference: &str, recorded: Option<&str>) -> Result<Reference, Blocker> {
    let parsed: Reference = reference.parse().map_err(|e| {
        blocker(
            BlockerReason::OciReferenceInvalid,
            format!("spec.payload.firmware.oci.reference {reference:?} is not an OCI reference ({e}); write registry/repository:tag or registry/repository@sha256:<64 hex>"),
        )
    })?;
    if !reference.contains('/') {
        return Err(blocker(
            BlockerReason::OciReferenceInvalid,
            format!("spec.payload.firmware.oci.reference {reference:?} names no registry; write registry/repository:tag or @sha256:<digest> (the operator never guesses a default registry)"),
        ));
    }
    if let Some(d) = parsed.digest() {
        if !d.starts_with("sha256:") {
            return Err(blocker(
                BlockerReason::OciReferenceInvalid,
                format!("spec.payload.firmware.oci.reference pins digest {d:?}; only sha256 digests are accepted"),
            ));
        }
    }
    Ok(match (parsed.digest(), recorded) {
        (None, Some(digest)) => parsed.clone_with_digest(digest.to_owned()),
        _ => parsed,
    })
}

/// The credentials for `registry` in a `kubernetes.io/dockerconfigjson` Secret (pure).
pub fn auth_from_secret(secret: &Secret, registry: &str) -> Result<RegistryAuth, Blocker> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let what = format!("Secret {name} (spec.payload.firmware.oci.pullSecretName)");
    let invalid =
        |detail: String| blocker(BlockerReason::PullSecretInvalid, format!("{what} {detail}"));
    if secret.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") {
        return Err(invalid(
            "must be of type kubernetes.io/dockerconfigjson (kubectl create secret docker-registry)".into(),
        ));
    }
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .ok_or_else(|| invalid("has no key .dockerconfigjson".into()))?;
    let config: serde_json::Value = serde_json::from_slice(&raw.0)
        .map_err(|e| invalid(format!("holds no JSON in .dockerconfigjson ({e})")))?;
    let auths = config
        .get("auths")
        .and_then(|a| a.as_object())
        .ok_or_else(|| invalid("has no \"auths\" in .dockerconfigjson".into()))?;
    let host = |key: &str| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        key.split('/').next().unwrap_or_default().to_owned()
    };
    let entry = auths
        .iter()
        .find(|(k, _)| host(k) == registry)
        .map(|(_, v)| v)
        .ok_or_else(|| {
            invalid(format!(
                "has no credentials for registry {registry:?}: add an auths entry for it"
            ))
        })?;
    let text = |k: &str| entry.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (user, password) = if !text("username").is_empty() {
        (text("username").to_owned(), text("password").to_owned())
    } else {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text("auth"))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "has no readable username/password or auth for registry {registry:?}"
                ))
            })?;
        let (u, p) = decoded.split_once(':').ok_or_else(|| {
            invalid(format!(
                "auth for registry {registry:?} is not base64 of user:password"
            ))
        })?;
        (u.to_owned(), p.to_owned())
    };
    Ok(RegistryAuth::Basic(user, password))
}

/// What a registry error means for the campaign (pure).
fn registry_blocker(e: &OciDistributionError, reference: &str) -> Blocker {
    use OciDistributionError as E;
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => blocker(
            BlockerReason::RegistryAuthFailed,
            format!("the registry refused the credentials for spec.payload.firmware.oci.reference {reference:?} ({e}); fix the Secret spec.payload.firmware.oci.pullSecretName"),
        ),
        E::ImageManifestNotFoundError(_) => blocker(
            BlockerReason::FirmwareUnreadable,
            format!("spec.payload.firmware.oci.reference {reference:?} is not in the registry ({e}); push it (oras push) or fix the tag or digest"),
        ),
        E::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::BlobUnknown
                )
            }) =>
        {
            blocker(
                BlockerReason::FirmwareUnreadable,
                format!("spec.payload.firmware.oci.reference {reference:?} is not in the registry ({e}); push it (oras push) or fix the tag or digest"),
            )
        }
        E::RegistryError { .. } | E::ServerError { .. } if is_unauthorized(e) => blocker(
            BlockerReason::RegistryAuthFailed,
            format!("the registry refused access to spec.payload.firmware.oci.reference {reference:?} ({e}); set or fix spec.payload.firmware.oci.pullSecretName"),
        ),
        _ => blocker(
            BlockerReason::FirmwareDownloadFailed,
            format!("pulling spec.payload.firmware.oci.reference {reference:?} failed ({e}); make the registry reachable from the operator"),
        ),
    }
}

fn is_unauthorized(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
            matches!(
                x.code,
                oci_client::errors::OciErrorCode::Unauthorized
                    | oci_client::errors::OciErrorCode::Denied
            )
        }),
        _ => false,
    }
}

/// Pull the artifact of `source` into `path` (at most `max_bytes`, within `timeout`), pinned to
/// `recorded` (the digest an earlier preparation resolved a tag to) when given.
pub async fn pull_to_file(
    client: &Client,
    ns: &str,
    source: &OciSource,
    recorded: Option<&str>,
    path: &Path,
    max_bytes: u64,
    timeout: Duration,
) -> Result<Result<Pulled, Blocker>, Error> {
    let reference = match parse_reference(&source.reference, recorded) {
        Ok(r) => r,
        Err(b) => return Ok(Err(b)),
    };
    let auth = match &source.pull_secret_name {
        None => RegistryAuth::Anonymous,
        Some(name) => match Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(Error::kube("reading the registry pull Secret"))?
        {
            None => {
                return Ok(Err(blocker(
                    BlockerReason::PullSecretInvalid,
                    format!("Secret {name} (spec.payload.firmware.oci.pullSecretName) not found; create it with kubectl create secret docker-registry"),
                )))
            }
            Some(secret) => match auth_from_secret(&secret, reference.resolve_registry()) {
                Ok(a) => a,
                Err(b) => return Ok(Err(b)),
            },
        },
    };
    let oci = oci_client::Client::new(ClientConfig {
        protocol: if source.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    });
    let shown = source.reference.as_str();
    let pull = async {
        let (manifest, manifest_digest) = match oci.pull_image_manifest(&reference, &auth).await {
            Ok(m) => m,
            Err(e) => return Ok(Err(registry_blocker(&e, shown))),
        };
        let [layer] = manifest.layers.as_slice() else {
            return Ok(Err(blocker(
                BlockerReason::FirmwareUnreadable,
                format!("the artifact spec.payload.firmware.oci.reference {shown:?} has {} files; push the firmware image as its only file (oras push REF image.bin)", manifest.layers.len()),
            )));
        };
        let Some(expected) = layer
            .digest
            .strip_prefix("sha256:")
            .and_then(|h| hex::decode(h).ok())
        else {
            return Ok(Err(blocker(
                BlockerReason::FirmwareUnreadable,
                format!("the artifact spec.payload.firmware.oci.reference {shown:?} has a layer digest {:?} that is not sha256", layer.digest),
            )));
        };
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > max_bytes {
            return Ok(Err(blocker(
                BlockerReason::FirmwareUnreadable,
                format!("the image of spec.payload.firmware.oci.reference {shown:?} has {} bytes, more than the operator accepts (--max-image-bytes {max_bytes})", layer.size),
            )));
        }
        let mut stream = match oci.pull_blob_stream(&reference, layer).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(registry_blocker(&e, shown))),
        };
        let mut out = HashingFile::create(path, max_bytes)
            .await
            .map_err(fetch_error)?;
        while let Some(bytes) = stream.next().await {
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    return Ok(Err(blocker(
                        BlockerReason::FirmwareDownloadFailed,
                        format!("pulling spec.payload.firmware.oci.reference {shown:?} broke off ({e}); retried"),
                    )))
                }
            };
            if let Err(e) = out.write(&bytes).await {
                return match e {
                    FetchError::TooLarge(_) => Ok(Err(blocker(
                        BlockerReason::FirmwareUnreadable,
                        format!("the image of spec.payload.firmware.oci.reference {shown:?} is larger than the operator accepts (--max-image-bytes {max_bytes})"),
                    ))),
                    e => Err(fetch_error(e)),
                };
            }
        }
        let got = out.finish().await.map_err(fetch_error)?;
        if got.sha256.as_slice() != expected.as_slice() {
            return Ok(Err(blocker(
                BlockerReason::FirmwareDigestMismatch,
                format!("the registry served an image whose SHA-256 {} differs from its layer digest {} (spec.payload.firmware.oci.reference {shown:?}): nothing was published", hex::encode(got.sha256), layer.digest),
            )));
        }
        Ok(Ok(Pulled {
            manifest_digest,
            size: got.size,
            sha256: got.sha256,
        }))
    };
    match tokio::time::timeout(timeout, pull).await {
        Ok(r) => r,
        Err(_) => Ok(Err(blocker(
            BlockerReason::FirmwareDownloadFailed,
            format!("pulling spec.payload.firmware.oci.reference {shown:?} did not finish within {timeout:?}"),
        ))),
    }
}

fn fetch_error(e: FetchError) -> Error {
    Error::Cache(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn docker_secret(json: &str, type_: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("regcred".into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(
                [(
                    ".dockerconfigjson".to_string(),
                    ByteString(json.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn references_need_a_registry_and_sha256_digests_and_pin_to_what_was_recorded() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference("127.0.0.1:5000/fleet/fw:1.1.0", None).unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.tag(), Some("1.1.0"));
        let pinned = parse_reference("127.0.0.1:5000/fleet/fw:1.1.0", Some(&digest)).unwrap();
        assert_eq!(pinned.digest(), Some(digest.as_str()));
        let by_digest = format!("reg.example/fw@{digest}");
        assert_eq!(
            parse_reference(&by_digest, None).unwrap().digest(),
            Some(digest.as_str())
        );
        for bad in [
            "fw:1.0",
            "reg.example/FW:1.0",
            "reg.example/fw@sha256:xyz",
            "reg.example/fw@md5:abcd",
            "",
        ] {
            let b = parse_reference(bad, None).unwrap_err();
            assert_eq!(b.reason, BlockerReason::OciReferenceInvalid, "{bad}");
            assert!(
                b.message.contains("spec.payload.firmware.oci.reference"),
                "{}",
                b.message
            );
        }
    }

    #[test]
    fn pull_secrets_give_the_registry_credentials_or_say_what_is_wrong() {
        let json = r#"{"auths":{"https://reg.example:5000/v1/":{"username":"u","password":"p"},"other":{"auth":"eDp5"}}}"#;
        let s = docker_secret(json, "kubernetes.io/dockerconfigjson");
        assert!(matches!(
            auth_from_secret(&s, "reg.example:5000").unwrap(),
            RegistryAuth::Basic(u, p) if u == "u" && p == "p"
        ));
        assert!(matches!(
            auth_from_secret(&s, "other").unwrap(),
            RegistryAuth::Basic(u, p) if u == "x" && p == "y"
        ));
        let none = auth_from_secret(&s, "third").unwrap_err();
        assert_eq!(none.reason, BlockerReason::PullSecretInvalid);
        assert!(none.message.contains("\"third\"") && none.message.contains("pullSecretName"));
        let opaque = auth_from_secret(&docker_secret(json, "Opaque"), "other").unwrap_err();
        assert!(opaque.message.contains("kubernetes.io/dockerconfigjson"));
        let garbage = auth_from_secret(&docker_secret("{", "kubernetes.io/dockerconfigjson"), "x");
        assert!(garbage.unwrap_err().message.contains("JSON"));
        // The password never appears in a message.
        let bad = docker_secret(
            r#"{"auths":{"r":{"auth":"not base64!"}}}"#,
            "kubernetes.io/dockerconfigjson",
        );
        assert!(!auth_from_secret(&bad, "r")
            .unwrap_err()
            .message
            .contains("not base64!"));
    }
}
