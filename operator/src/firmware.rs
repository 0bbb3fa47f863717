//! A campaign's firmware image, from its source to sealed chunks on disk: reads the source that
//! `spec.payload.firmware` names (a ConfigMap or Secret key, an HTTP(S) URL, an OCI artifact),
//! stores it in the campaign's cache directory (downloads streamed, never held whole in memory),
//! checks its digest, and seals it chunk by chunk ([`crate::chunk_cache`]); likewise each base
//! image of `spec.payload.firmware.deltas`, replaced by the delta from it to the image and
//! sealed under its own stream id ([`delta_stream_id`]). Every problem with the
//! input becomes a [`Blocker`] naming the field and the fix; nothing is published before this
//! returns. The rest of the campaign's preparation (manager identity, release signature, the
//! protocol's `PreparedCampaign`) is the controller's.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use sealed_ota_protocol::{DeltaManifest, SealedFirmware};

use crate::chunk_cache::{CacheError, CampaignFiles, ChunkFile};
use crate::crd::FirmwareSource;
use crate::engine::FirmwareSettings;
use crate::error::Error;
use crate::inputs;
use crate::reasons::BlockerReason;
use crate::status::Blocker;

/// How long a download may take, at most.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A sealed image and where its chunks are.
#[derive(Debug)]
pub struct PreparedImage {
    /// What the manifests say about it.
    pub sealed: SealedFirmware,
    /// Its chunk ciphertexts in the cache directory.
    pub chunks: ChunkFile,
    /// The OCI manifest digest the reference resolved to (recorded on the campaign status).
    pub resolved_digest: Option<String>,
    /// The deltas of `spec.payload.firmware.deltas`, in its order.
    pub deltas: Vec<PreparedDelta>,
    /// The OCI manifest digest each OCI base resolved to, by fromVersion (recorded on the
    /// campaign status like `resolved_digest`).
    pub delta_resolved_digests: BTreeMap<String, String>,
}

/// OCI digests an earlier preparation of the campaign resolved its references to (the campaign
/// status's `ociDigest` and `deltaOciDigests`): a later preparation pulls these, not the tags.
#[derive(Clone, Copy, Debug)]
pub struct RecordedDigests<'a> {
    /// The image's.
    pub image: Option<&'a str>,
    /// Each delta base's, by fromVersion.
    pub deltas: &'a BTreeMap<String, String>,
}

impl<'a> RecordedDigests<'a> {
    /// What the campaign `status` recorded.
    pub fn of(status: &'a crate::crd::UpdateCampaignStatus) -> Self {
        Self {
            image: status.oci_digest.as_deref(),
            deltas: &status.delta_oci_digests,
        }
    }

    fn delta(&self, from_version: &str) -> Option<&'a str> {
        self.deltas.get(from_version).map(String::as_str)
    }
}

fn blocker(reason: BlockerReason, message: String) -> Blocker {
    Blocker { reason, message }
}

async fn get_opt<K>(client: &Client, ns: &str, name: &str) -> Result<Option<K>, Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(Error::kube("reading a campaign input"))
}

/// The expected SHA-256 (hex) of the image, when the spec gives one.
fn expected_sha256(fw: &FirmwareSource) -> Option<&str> {
    fw.sha256
        .as_deref()
        .or(fw.url.as_ref().map(|u| u.sha256.as_str()))
}

/// The image a ConfigMap or Secret key holds (`None` when `fw` names neither): an absent object
/// is a blocker naming the field.
async fn object_image(
    client: &Client,
    ns: &str,
    fw: &FirmwareSource,
) -> Result<Option<Result<Vec<u8>, Blocker>>, Error> {
    let (found, kind, field, name, key) = if let Some(r) = &fw.config_map_key_ref {
        let found = get_opt::<ConfigMap>(client, ns, &r.name)
            .await?
            .map(|cm| inputs::firmware_from_config_map(&cm, &r.key));
        (found, "ConfigMap", "configMapKeyRef", &r.name, &r.key)
    } else if let Some(r) = &fw.secret_key_ref {
        let found = get_opt::<Secret>(client, ns, &r.name)
            .await?
            .map(|s| inputs::firmware_from_secret(&s, &r.key));
        (found, "Secret", "secretKeyRef", &r.name, &r.key)
    } else {
        return Ok(None);
    };
    Ok(Some(found.unwrap_or_else(|| {
        Err(blocker(
            BlockerReason::FirmwareUnreadable,
            format!("{kind} {name} (spec.payload.firmware.{field}) not found; create it with the image under key {key:?}"),
        ))
    })))
}

/// The campaign's secret seed and target version: the content key is derived from them and the
/// image's digest ([`sealed_ota_protocol::crypto::seeded_content_key`]), so that every operator
/// replica seals the same chunks.
pub struct Seed<'a> {
    /// The seed (`status.sealedSeed`, opened).
    pub seed: &'a [u8; 32],
    /// spec.targetVersion.
    pub target_version: &'a str,
}

impl std::fmt::Debug for Seed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("seed", &"<redacted>")
            .field("target_version", &self.target_version)
            .finish()
    }
}

/// A delta prepared for the devices of one base version: made from the base image to the
/// campaign's image and sealed once, like the image, in its own cache directory.
#[derive(Debug)]
pub struct PreparedDelta {
    /// Its campaign id on the wire ([`delta_stream_id`]): its chunks have their own topics.
    pub stream_id: String,
    /// The base it applies to and its size.
    pub manifest: DeltaManifest,
    /// What the manifests say about the delta's chunks.
    pub sealed: SealedFirmware,
    /// Its chunk ciphertexts in the cache directory.
    pub chunks: ChunkFile,
}

/// The wire campaign id of delta `index` of campaign `uid` (`spec.payload.firmware.deltas`
/// order): every replica names it alike, and its chunk topics differ from the image's.
pub fn delta_stream_id(uid: &str, index: usize) -> String {
    format!("{uid}-d{index}")
}

/// An image fetched into its cache directory and its SHA-256.
struct Fetched {
    files: CampaignFiles,
    digest: [u8; 32],
    resolved_digest: Option<String>,
}

/// Fetch, check and seal the image of `fw` for campaign `uid` in chunks of `chunk_size` under the
/// content key of `seed`; an OCI reference (the image's or a base's) is pinned to what an
/// earlier preparation resolved it to (`recorded`). Each of `fw.deltas` is fetched, made into the
/// delta to the image and sealed under its own stream id before the image is sealed (the image's
/// plaintext is removed once sealed).
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    settings: &FirmwareSettings,
    client: &Client,
    ns: &str,
    uid: &str,
    fw: &FirmwareSource,
    chunk_size: u32,
    recorded: RecordedDigests<'_>,
    seed: Seed<'_>,
) -> Result<Result<PreparedImage, Blocker>, Error> {
    let target = match fetch(settings, client, ns, uid, fw, recorded.image).await? {
        Ok(t) => t,
        Err(b) => return Ok(Err(b)),
    };
    let mut deltas = Vec::with_capacity(fw.deltas.len());
    let mut delta_resolved_digests = BTreeMap::new();
    for (index, d) in fw.deltas.iter().enumerate() {
        let stream = delta_stream_id(uid, index);
        let pinned = recorded.delta(&d.from_version);
        let base = match fetch(settings, client, ns, &stream, &d.image_source(), pinned).await? {
            Ok(b) => b,
            Err(b) => return Ok(Err(of_delta(b, index))),
        };
        if let Some(digest) = &base.resolved_digest {
            delta_resolved_digests.insert(d.from_version.clone(), digest.clone());
        }
        let target_path = target.files.image_path();
        let files = base.files;
        let (files, made) = tokio::task::spawn_blocking(move || {
            let made = files.replace_with_delta(&target_path);
            (files, made)
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?;
        let (size, digest) = match made {
            Ok(made) => made,
            Err(CacheError::Delta(e)) => {
                return Ok(Err(blocker(
                    BlockerReason::PayloadInvalid,
                    format!("the delta from spec.payload.firmware.deltas[{index}] (fromVersion {}) cannot be made: {e}", d.from_version),
                )))
            }
            Err(e) => return Err(Error::Cache(e.to_string())),
        };
        let (sealed, chunks) = match seal(files, &stream, chunk_size, &seed, digest).await? {
            Ok(sealed) => sealed,
            Err(b) => return Ok(Err(of_delta(b, index))),
        };
        deltas.push(PreparedDelta {
            stream_id: stream,
            manifest: DeltaManifest {
                base_version: d.from_version.clone(),
                base_sha256: base.digest,
                size,
            },
            sealed,
            chunks,
        });
    }
    let (sealed, chunks) = match seal(target.files, uid, chunk_size, &seed, target.digest).await? {
        Ok(sealed) => sealed,
        Err(b) => return Ok(Err(b)),
    };
    Ok(Ok(PreparedImage {
        sealed,
        chunks,
        resolved_digest: target.resolved_digest,
        deltas,
        delta_resolved_digests,
    }))
}

/// A blocker of a delta's base: its fields are under spec.payload.firmware.deltas[index].
fn of_delta(b: Blocker, index: usize) -> Blocker {
    Blocker {
        reason: b.reason,
        message: b.message.replace(
            "spec.payload.firmware.",
            &format!("spec.payload.firmware.deltas[{index}]."),
        ),
    }
}

/// Fetch and check the image of `fw` into the cache directory `dir`.
async fn fetch(
    settings: &FirmwareSettings,
    client: &Client,
    ns: &str,
    dir: &str,
    fw: &FirmwareSource,
    recorded_digest: Option<&str>,
) -> Result<Result<Fetched, Blocker>, Error> {
    let cache = settings.cache.clone();
    let dir_owned = dir.to_owned();
    let files = tokio::task::spawn_blocking(move || cache.campaign(&dir_owned))
        .await
        .map_err(|e| Error::Join(e.to_string()))?
        .map_err(|e| Error::Cache(e.to_string()))?;
    let mut resolved_digest = None;
    let digest: [u8; 32];
    if let Some(image) = object_image(client, ns, fw).await? {
        let image =
            match image.and_then(|i| inputs::check_digest(&i, fw.sha256.as_deref()).map(|()| i)) {
                Ok(i) => i,
                Err(b) => return Ok(Err(b)),
            };
        digest = sealed_ota_protocol::crypto::sha256(&image);
        files
            .write_image(&image)
            .map_err(|e| Error::Cache(e.to_string()))?;
    } else if let Some(u) = &fw.url {
        let got = crate::fetch::fetch_to_file(
            &u.url,
            &files.image_path(),
            settings.max_image_bytes,
            DOWNLOAD_TIMEOUT,
        )
        .await;
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                return Ok(Err(blocker(
                    BlockerReason::FirmwareDownloadFailed,
                    format!("downloading spec.payload.firmware.url failed: {e}; make the image reachable from the operator or use configMapKeyRef/secretKeyRef"),
                )))
            }
        };
        if let Err(b) = inputs::check_sha256(&got.sha256, expected_sha256(fw)) {
            return Ok(Err(b));
        }
        digest = got.sha256;
    } else if let Some(o) = &fw.oci {
        match crate::oci::pull_to_file(
            client,
            ns,
            o,
            recorded_digest,
            &files.image_path(),
            settings.max_image_bytes,
            DOWNLOAD_TIMEOUT,
        )
        .await?
        {
            Ok(pulled) => {
                if let Err(b) = inputs::check_sha256(&pulled.sha256, fw.sha256.as_deref()) {
                    return Ok(Err(b));
                }
                resolved_digest = Some(pulled.manifest_digest);
                digest = pulled.sha256;
            }
            Err(b) => return Ok(Err(b)),
        }
    } else {
        return Ok(Err(blocker(
            BlockerReason::FirmwareUnreadable,
            "spec.payload.firmware names no source; set configMapKeyRef, secretKeyRef, url or oci"
                .into(),
        )));
    }
    Ok(Ok(Fetched {
        files,
        digest,
        resolved_digest,
    }))
}

/// Seal the fetched file of SHA-256 `digest` under `stream` with the content key of `seed`.
async fn seal(
    files: CampaignFiles,
    stream: &str,
    chunk_size: u32,
    seed: &Seed<'_>,
    digest: [u8; 32],
) -> Result<Result<(SealedFirmware, ChunkFile), Blocker>, Error> {
    let key = sealed_ota_protocol::crypto::seeded_content_key(
        seed.seed,
        stream,
        seed.target_version,
        chunk_size,
        &digest,
    );
    let stream_owned = stream.to_owned();
    let sealed =
        tokio::task::spawn_blocking(move || files.seal(&stream_owned, chunk_size, Some(key)))
            .await
            .map_err(|e| Error::Join(e.to_string()))?;
    match sealed {
        // The key is bound to the digest read before sealing: a file changed in between would
        // put two images under one key.
        Ok((sealed, _)) if sealed.sha256() != digest => Err(Error::Cache(format!(
            "the cached image of {stream} changed while it was sealed"
        ))),
        Ok(sealed) => Ok(Ok(sealed)),
        Err(CacheError::Seal(e)) => Ok(Err(blocker(
            BlockerReason::PayloadInvalid,
            format!("the payload cannot be prepared: {e}"),
        ))),
        Err(e) => Err(Error::Cache(e.to_string())),
    }
}
