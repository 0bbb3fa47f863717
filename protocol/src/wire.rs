//! Wire format v2: CBOR (ciborium) structures of every message, and their bounded decoders. Signed
//! messages travel in an envelope carrying the exact body bytes plus the signature, so nothing is
//! ever re-encoded before verification (no canonicalization issue). Every decoder checks a maximum
//! size first, limits nesting, rejects trailing bytes and never panics. Buffers that hold a
//! delivered private key (the update body) are encoded and decoded without leaving copies behind
//! (exact-size encoding, a zeroized decode scratch).

use crate::prelude::*;

use serde::{Deserialize, Serialize};

use zeroize::Zeroizing;

use crate::codec::{decode, decode_secret, encode, encode_secret};
#[cfg(feature = "manager")]
use crate::codec::{write_head, write_text, MAJOR_ARRAY, MAJOR_BYTES, MAJOR_MAP, MAJOR_UINT};
use crate::error::ProtocolError;
use crate::manifest::{PayloadKind, RejectReason};
use crate::WIRE_VERSION;

/// AAD label of the update message.
pub const UPDATE_AAD_LABEL: &[u8] = b"sealed-ota/v2/update";
/// AAD label of status messages.
pub const STATUS_AAD_LABEL: &[u8] = b"sealed-ota/v2/status";
/// Bytes an MQTT 5 PUBLISH adds around topic and payload, at most: fixed header (1) + remaining
/// length (4) + topic length (2) + packet id (2) + property length (1) + our properties.
pub const PUBLISH_OVERHEAD: usize = 10;

/// Message type byte: notify (manager → device, signed).
pub const TYPE_NOTIFY: u8 = 1;
/// Message type byte: ready (device → manager, signed).
pub const TYPE_READY: u8 = 2;
/// Message type byte: manifest (signed by the manager, inside the update).
pub const TYPE_MANIFEST: u8 = 3;
/// Message type byte: status (device → manager, signed, body encrypted).
pub const TYPE_STATUS: u8 = 4;
/// Message type byte: update (manager → device, encrypted), used in its AAD.
pub const TYPE_UPDATE: u8 = 5;
/// Message type byte: receipt of a final outcome (device → manager, signed plaintext claim).
pub const TYPE_RECEIPT: u8 = 6;
/// Message type byte: abort (manager → device, signed, retained on the notify topic).
pub const TYPE_ABORT: u8 = 7;
/// Message type byte: post-install health report (device → manager, signed plaintext).
pub const TYPE_HEALTH: u8 = 8;

/// Bound of a notify payload.
pub const MAX_NOTIFY: usize = 16 * 1024;
/// Bound of a ready payload (certificate + CSR).
pub const MAX_READY: usize = 16 * 1024;
/// Bound of an update payload.
pub const MAX_UPDATE: usize = 32 * 1024;
/// Bound of a status payload.
pub const MAX_STATUS: usize = 64 * 1024;
/// Bound of a receipt payload.
pub const MAX_RECEIPT: usize = 8 * 1024;
/// Bound of an abort payload (it carries the manager certificate).
pub const MAX_ABORT: usize = 16 * 1024;
/// Bound of a manifest body.
pub const MAX_MANIFEST: usize = 4 * 1024;
/// Bound of a health report payload.
pub const MAX_HEALTH: usize = 4 * 1024;
/// Largest chunk size a campaign may use.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Bound of a chunk payload.
pub const MAX_CHUNK_MSG: usize = MAX_CHUNK_SIZE as usize + 4 * 1024;
/// Most chunks a campaign may have.
pub const MAX_CHUNK_COUNT: u32 = 1 << 22;
/// Most indices one chunk request may name.
pub const MAX_REQUESTED: usize = 4096;

/// Signed envelope: the exact body bytes, their type and an ECDSA P-256 signature over
/// `"sealed-ota/v1/sig/" || type || body`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// Wire version.
    pub v: u8,
    /// Message type.
    pub t: u8,
    /// Body bytes (CBOR).
    #[serde(with = "crate::codec::bytes")]
    pub body: Vec<u8>,
    /// Signature, 64 bytes r||s.
    #[serde(with = "crate::codec::bytes")]
    pub sig: Vec<u8>,
}

impl SignedEnvelope {
    /// Sign `body` as message type `t`.
    pub fn sign(key: &p256::ecdsa::SigningKey, t: u8, body: Vec<u8>) -> Self {
        let sig = crate::crypto::sign(key, t, &body).to_vec();
        Self {
            v: WIRE_VERSION,
            t,
            body,
            sig,
        }
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decode an envelope of type `t` (signature not yet checked).
    pub fn decode(
        bytes: &[u8],
        t: u8,
        message: &'static str,
        max: usize,
    ) -> Result<Self, ProtocolError> {
        let env: SignedEnvelope = decode(bytes, message, max)?;
        if env.v != WIRE_VERSION {
            return Err(ProtocolError::Version(env.v));
        }
        if env.t != t {
            return Err(ProtocolError::Decode {
                message,
                detail: format!("message type {}", env.t),
            });
        }
        if env.sig.len() != 64 {
            return Err(ProtocolError::Decode {
                message,
                detail: "signature length".into(),
            });
        }
        Ok(env)
    }

    /// The message type of an envelope of at most `max` bytes (nothing else checked), to tell
    /// apart the messages that share a topic (notify and abort; status and receipt).
    pub fn peek_type(bytes: &[u8], message: &'static str, max: usize) -> Result<u8, ProtocolError> {
        let env: SignedEnvelope = decode(bytes, message, max)?;
        if env.v != WIRE_VERSION {
            return Err(ProtocolError::Version(env.v));
        }
        Ok(env.t)
    }

    /// Verify the signature with `public`.
    pub fn verify(
        &self,
        public: &p256::PublicKey,
        message: &'static str,
    ) -> Result<(), ProtocolError> {
        if crate::crypto::verify(public, self.t, &self.body, &self.sig) {
            Ok(())
        } else {
            Err(ProtocolError::BadSignature { message })
        }
    }
}

/// Notify body (retained, on `notify`), signed by the manager's static key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyBody {
    /// Wire version.
    pub v: u8,
    /// Session id (also sent as Correlation Data).
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// Manager id.
    pub manager_id: String,
    /// Device id.
    pub device_id: String,
    /// Campaign id.
    pub campaign_id: String,
    /// Manager certificate DER.
    #[serde(with = "crate::codec::bytes")]
    pub manager_cert: Vec<u8>,
    /// Manager ephemeral public key (SEC1 uncompressed).
    #[serde(with = "crate::codec::bytes")]
    pub ephemeral: Vec<u8>,
    /// Manager nonce.
    #[serde(with = "crate::codec::array")]
    pub nonce: [u8; 32],
    /// Issued at, Unix seconds.
    pub issued_at: u64,
    /// Expires at, Unix seconds.
    pub expires_at: u64,
    /// Payload kind.
    pub kind: PayloadKind,
}

/// Resume summary a device sends in its ready message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Have {
    /// Campaign of the stored partial transfer.
    pub campaign_id: String,
    /// Its Merkle root.
    #[serde(with = "crate::codec::array")]
    pub merkle_root: [u8; 32],
    /// Chunks already stored.
    pub received: u32,
}

/// Ready body (on `ready`), signed by the device's static key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyBody {
    /// Wire version.
    pub v: u8,
    /// Echo of the session id.
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// Manager id.
    pub manager_id: String,
    /// Device id.
    pub device_id: String,
    /// Campaign id.
    pub campaign_id: String,
    /// Device certificate DER.
    #[serde(with = "crate::codec::bytes")]
    pub device_cert: Vec<u8>,
    /// Device ephemeral public key.
    #[serde(with = "crate::codec::bytes")]
    pub ephemeral: Vec<u8>,
    /// Device nonce.
    #[serde(with = "crate::codec::array")]
    pub nonce: [u8; 32],
    /// Echo of the manager nonce.
    #[serde(with = "crate::codec::array")]
    pub manager_nonce: [u8; 32],
    /// Running firmware version.
    pub running_version: String,
    /// MQTT Maximum Packet Size the device accepts (0 = no limit).
    pub max_packet_size: u32,
    /// PKCS#10 CSR (CSR rotation mode).
    #[serde(with = "crate::codec::opt_bytes", default)]
    pub csr: Option<Vec<u8>>,
    /// Partial transfer already stored.
    #[serde(default)]
    pub have: Option<Have>,
}

/// Update message (on `update`): AES-256-GCM under the manager-to-device key, random nonce,
/// AAD = `"sealed-ota/v2/update" || transcript hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateMsg {
    /// Wire version.
    pub v: u8,
    /// Session id.
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// AEAD nonce.
    #[serde(with = "crate::codec::array")]
    pub nonce: [u8; 12],
    /// Ciphertext of an [`UpdateBody`].
    #[serde(with = "crate::codec::bytes")]
    pub ct: Vec<u8>,
}

/// Plaintext of the update message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateBody {
    /// Firmware: signed manifest and the wrapped (here: session-encrypted) content key.
    Firmware {
        /// Signed manifest envelope.
        #[serde(with = "crate::codec::bytes")]
        manifest: Vec<u8>,
        /// Campaign content key.
        #[serde(with = "crate::codec::array")]
        content_key: [u8; 32],
    },
    /// Credentials: signed manifest, new certificate and (DeliverKey) the new PKCS#8 key.
    Credentials {
        /// Signed manifest envelope.
        #[serde(with = "crate::codec::bytes")]
        manifest: Vec<u8>,
        /// New certificate DER.
        #[serde(with = "crate::codec::bytes")]
        cert: Vec<u8>,
        /// New PKCS#8 private key DER (DeliverKey mode only).
        #[serde(with = "crate::codec::opt_bytes", default)]
        key: Option<Vec<u8>>,
    },
}

impl core::fmt::Debug for UpdateBody {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            UpdateBody::Firmware { .. } => f.write_str("UpdateBody::Firmware(<redacted>)"),
            UpdateBody::Credentials { .. } => f.write_str("UpdateBody::Credentials(<redacted>)"),
        }
    }
}

impl Drop for UpdateBody {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        match self {
            UpdateBody::Firmware { content_key, .. } => content_key.zeroize(),
            UpdateBody::Credentials { key, .. } => {
                if let Some(k) = key {
                    k.zeroize()
                }
            }
        }
    }
}

/// Status envelope body (signed by the device): session id, sequence number and the encrypted
/// [`StatusBody`] under the device-to-manager key, AAD = `"sealed-ota/v2/status" || transcript hash
/// || seq u32 BE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMsg {
    /// Wire version.
    pub v: u8,
    /// Session id.
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// Sequence number, strictly increasing within a session, starting at 1.
    pub seq: u32,
    /// AEAD nonce.
    #[serde(with = "crate::codec::array")]
    pub nonce: [u8; 12],
    /// Ciphertext.
    #[serde(with = "crate::codec::bytes")]
    pub ct: Vec<u8>,
}

/// What a device reports while a transfer runs (encrypted under the session key). Final outcomes
/// are [`ReceiptBody`] claims instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusBody {
    /// Manifest accepted; chunks already stored (resume).
    Accepted {
        /// Chunks stored.
        received: u32,
    },
    /// These chunks did not arrive in time: please republish.
    ChunksRequested {
        /// Indices.
        indices: Vec<u32>,
    },
}

/// The final outcome a device claims in a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Claim {
    /// The image (or credential set) is installed and committed: the only success.
    Installed {
        /// Installed version.
        version: String,
        /// SHA-256 of what was installed (the image, or the certificate DER of a rotation).
        #[serde(with = "crate::codec::array")]
        sha256: [u8; 32],
        /// Id of the release key whose signature the device verified (firmware, when it
        /// trusts release keys).
        #[serde(with = "crate::codec::opt_array", default)]
        release_key: Option<[u8; 32]>,
    },
    /// The image was installed, failed its health check, and the device went back to the
    /// version it ran before.
    RolledBack {
        /// Version that was tried.
        version: String,
        /// SHA-256 of the image that was tried.
        #[serde(with = "crate::codec::array")]
        sha256: [u8; 32],
        /// Why (device text, bounded by the manager).
        reason: String,
    },
    /// The device refused the update or its install failed before anything changed.
    Rejected {
        /// Why.
        reason: RejectReason,
    },
}

/// Receipt of a final outcome: a plaintext claim signed by the device's static key (type
/// [`TYPE_RECEIPT`]) and bound to one session by its id and transcript hash, so it is evidence a
/// person can check later with the device certificate alone, and it cannot be replayed into
/// another session. It needs no session key, so a device can send it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// Wire version.
    pub v: u8,
    /// Session id.
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// Transcript hash of that session.
    #[serde(with = "crate::codec::array")]
    pub transcript: [u8; 32],
    /// Manager id.
    pub manager_id: String,
    /// Device id.
    pub device_id: String,
    /// Campaign id.
    pub campaign_id: String,
    /// The claim.
    pub claim: Claim,
}

/// Post-install health report: after an install it committed (an `Installed` receipt), the
/// device runs its health check for a while and reports the result, signed by its static key
/// (type [`TYPE_HEALTH`]) and bound to the session that installed the image by its id, with the
/// version and image hash it installed. The manager's gates read it; a later report supersedes
/// an earlier one (`reported_at`, the device's clock). Plaintext, like a receipt: what it tells
/// the broker (healthy or not) the broker could guess from the device's behaviour anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthBody {
    /// Wire version.
    pub v: u8,
    /// Session that installed the image.
    #[serde(with = "crate::codec::array")]
    pub session_id: [u8; 16],
    /// Manager id.
    pub manager_id: String,
    /// Device id.
    pub device_id: String,
    /// Campaign id.
    pub campaign_id: String,
    /// Version installed.
    pub version: String,
    /// SHA-256 of the image installed.
    #[serde(with = "crate::codec::array")]
    pub sha256: [u8; 32],
    /// Whether the health check passed.
    pub healthy: bool,
    /// What the check found (device text, bounded by the manager).
    pub detail: String,
    /// When the device made the report (Unix seconds, its clock).
    pub reported_at: u64,
}

/// Abort: the manager ends every session of a campaign with one device that was issued at or
/// before `issued_at`. Signed by the manager's static key (type [`TYPE_ABORT`]) and retained on the
/// device's notify topic in place of the notify; it carries the manager certificate so a device
/// that restarted can verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortBody {
    /// Wire version.
    pub v: u8,
    /// Manager id.
    pub manager_id: String,
    /// Device id.
    pub device_id: String,
    /// Campaign id.
    pub campaign_id: String,
    /// Manager certificate DER.
    #[serde(with = "crate::codec::bytes")]
    pub manager_cert: Vec<u8>,
    /// Sessions notified at or before this time (Unix seconds) end.
    pub issued_at: u64,
}

/// Chunk message (retained, on `_chunks/<campaign>/<index>`). Authenticated by its Merkle proof
/// (checked first, against the signed root) and by AES-256-GCM under the content key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMsg {
    /// Wire version.
    pub v: u8,
    /// Campaign id.
    pub campaign_id: String,
    /// Index.
    pub index: u32,
    /// Chunk count.
    pub count: u32,
    /// Ciphertext||tag.
    #[serde(with = "crate::codec::bytes")]
    pub ct: Vec<u8>,
    /// Merkle proof, leaf to root.
    #[serde(with = "crate::codec::hashes")]
    pub proof: Vec<[u8; 32]>,
}

impl ChunkMsg {
    /// The plaintext of this chunk of the image whose chunks hash to `merkle_root`, sealed under
    /// `content_key`: its Merkle proof first, then AES-GCM (what a device does with every chunk
    /// it receives). The caller checks index and count against the manifest first.
    pub fn open(
        &self,
        content_key: &[u8; 32],
        merkle_root: &[u8; 32],
    ) -> Result<Zeroizing<Vec<u8>>, ProtocolError> {
        let leaf = crate::merkle::leaf_hash(self.index, &self.ct);
        if !crate::merkle::verify_proof(merkle_root, self.index, self.count, leaf, &self.proof) {
            return Err(ProtocolError::BadProof { index: self.index });
        }
        crate::crypto::decrypt_chunk(
            content_key,
            &self.campaign_id,
            self.index,
            self.count,
            &self.ct,
        )
        .ok_or(ProtocolError::Decrypt { message: "chunk" })
    }

    #[cfg(feature = "manager")]
    /// Append the CBOR encoding of a chunk message up to and including the head of its `ct` byte
    /// string of `ct_len` bytes; the ciphertext follows, then [`ChunkMsg::encode_tail`]. Together
    /// they write exactly what `encode_msg(&ChunkMsg { .. })` writes (a test pins it), without a
    /// second copy of the ciphertext.
    pub(crate) fn encode_head(
        out: &mut Vec<u8>,
        campaign_id: &str,
        index: u32,
        count: u32,
        ct_len: usize,
    ) {
        write_head(out, MAJOR_MAP, 6);
        write_text(out, "v");
        write_head(out, MAJOR_UINT, u64::from(WIRE_VERSION));
        write_text(out, "campaign_id");
        write_text(out, campaign_id);
        write_text(out, "index");
        write_head(out, MAJOR_UINT, u64::from(index));
        write_text(out, "count");
        write_head(out, MAJOR_UINT, u64::from(count));
        write_text(out, "ct");
        write_head(out, MAJOR_BYTES, ct_len as u64);
    }

    #[cfg(feature = "manager")]
    /// Append the rest of a chunk message after its ciphertext: the Merkle proof.
    pub(crate) fn encode_tail(out: &mut Vec<u8>, proof: &[[u8; 32]]) {
        write_text(out, "proof");
        write_head(out, MAJOR_ARRAY, proof.len() as u64);
        for h in proof {
            write_head(out, MAJOR_BYTES, 32);
            out.extend_from_slice(h);
        }
    }
}

/// Upper bound of the CBOR encoding (the PUBLISH payload) of any chunk message with
/// `plaintext_len` plaintext bytes in a `chunk_count`-chunk campaign: ciphertext (plaintext +
/// 16-byte tag), Merkle proof (34 bytes per level), campaign id and 64 bytes of CBOR framing.
pub(crate) fn chunk_payload_bound(campaign_id: &str, plaintext_len: u64, chunk_count: u32) -> u64 {
    let levels = 32 - chunk_count.saturating_sub(1).leading_zeros();
    plaintext_len
        + crate::crypto::TAG_LEN as u64
        + u64::from(levels) * 34
        + campaign_id.len() as u64
        + 64
}

/// Upper bound of the MQTT PUBLISH packet carrying any chunk of a campaign, computed from the
/// manifest alone: ciphertext (chunk size + 16-byte tag), Merkle proof (34 bytes per level), campaign
/// id, 64 bytes of CBOR framing, the longest chunk topic and the PUBLISH header
/// ([`PUBLISH_OVERHEAD`]). Manager and device compare the same value with the
/// device's Maximum Packet Size.
pub fn chunk_packet_bound(
    topics: &crate::topics::TopicTree,
    campaign_id: &str,
    chunk_size: u32,
    chunk_count: u32,
) -> u32 {
    let payload = chunk_payload_bound(campaign_id, u64::from(chunk_size), chunk_count);
    let topic = topics
        .chunk(campaign_id, chunk_count.saturating_sub(1))
        .len() as u64;
    (payload + topic + PUBLISH_OVERHEAD as u64).min(u64::from(u32::MAX)) as u32
}

fn check_v(v: u8) -> Result<(), ProtocolError> {
    if v == WIRE_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::Version(v))
    }
}

/// Decode a notify envelope and its body (signature NOT checked: that needs the certificate inside).
pub fn decode_notify(bytes: &[u8]) -> Result<(SignedEnvelope, NotifyBody), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_NOTIFY, "notify", MAX_NOTIFY)?;
    let body: NotifyBody = decode(&env.body, "notify", MAX_NOTIFY)?;
    check_v(body.v)?;
    Ok((env, body))
}

/// Decode a ready envelope and its body (signature NOT checked).
pub fn decode_ready(bytes: &[u8]) -> Result<(SignedEnvelope, ReadyBody), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_READY, "ready", MAX_READY)?;
    let body: ReadyBody = decode(&env.body, "ready", MAX_READY)?;
    check_v(body.v)?;
    Ok((env, body))
}

/// Decode an update message (not decrypted).
pub fn decode_update(bytes: &[u8]) -> Result<UpdateMsg, ProtocolError> {
    let m: UpdateMsg = decode(bytes, "update", MAX_UPDATE)?;
    check_v(m.v)?;
    Ok(m)
}

/// Decode a decrypted update body. It may hold a delivered private key: the decoder's scratch
/// buffer is zeroized afterwards (see `codec::decode_secret`).
pub fn decode_update_body(bytes: &[u8]) -> Result<UpdateBody, ProtocolError> {
    decode_secret(bytes, "update body", MAX_UPDATE)
}

/// Encode an update body into a buffer sized exactly for it (no reallocation leaves a copy of a
/// delivered key behind), zeroized on drop.
pub fn encode_update_body(body: &UpdateBody) -> Zeroizing<Vec<u8>> {
    encode_secret(body)
}

/// Decode a manifest envelope and its body (signature NOT checked).
pub fn decode_manifest(
    bytes: &[u8],
) -> Result<(SignedEnvelope, crate::manifest::Manifest), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_MANIFEST, "manifest", MAX_MANIFEST)?;
    let m: crate::manifest::Manifest = decode(&env.body, "manifest", MAX_MANIFEST)?;
    Ok((env, m))
}

/// Decode a status envelope and its outer body (signature NOT checked, body not decrypted).
pub fn decode_status(bytes: &[u8]) -> Result<(SignedEnvelope, StatusMsg), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_STATUS, "status", MAX_STATUS)?;
    let m: StatusMsg = decode(&env.body, "status", MAX_STATUS)?;
    check_v(m.v)?;
    Ok((env, m))
}

/// Decode a decrypted status body.
pub fn decode_status_body(bytes: &[u8]) -> Result<StatusBody, ProtocolError> {
    let b: StatusBody = decode(bytes, "status body", MAX_STATUS)?;
    if let StatusBody::ChunksRequested { indices } = &b {
        if indices.len() > MAX_REQUESTED {
            return Err(ProtocolError::TooLarge {
                message: "chunk request",
                size: indices.len(),
                max: MAX_REQUESTED,
            });
        }
    }
    Ok(b)
}

/// Decode a receipt envelope and its body (signature NOT checked).
pub fn decode_receipt(bytes: &[u8]) -> Result<(SignedEnvelope, ReceiptBody), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_RECEIPT, "receipt", MAX_RECEIPT)?;
    let body: ReceiptBody = decode(&env.body, "receipt", MAX_RECEIPT)?;
    check_v(body.v)?;
    Ok((env, body))
}

/// Decode an abort envelope and its body (signature NOT checked: that needs the certificate
/// inside).
pub fn decode_abort(bytes: &[u8]) -> Result<(SignedEnvelope, AbortBody), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_ABORT, "abort", MAX_ABORT)?;
    let body: AbortBody = decode(&env.body, "abort", MAX_ABORT)?;
    check_v(body.v)?;
    Ok((env, body))
}

/// Decode a health report envelope and its body (signature NOT checked).
pub fn decode_health(bytes: &[u8]) -> Result<(SignedEnvelope, HealthBody), ProtocolError> {
    let env = SignedEnvelope::decode(bytes, TYPE_HEALTH, "health", MAX_HEALTH)?;
    let body: HealthBody = decode(&env.body, "health", MAX_HEALTH)?;
    check_v(body.v)?;
    Ok((env, body))
}

/// Verify a receipt kept as evidence: its signature by the certificate's key (the certificate is
/// only parsed here, not validated against a CA: do that with [`crate::TrustAnchor::verify`]).
/// Returns the signed claim and what it is bound to.
pub fn verify_receipt(
    receipt: &[u8],
    device_cert_der: &[u8],
) -> Result<ReceiptBody, ProtocolError> {
    let (env, body) = decode_receipt(receipt)?;
    let public = crate::identity::cert_public_key(device_cert_der)?;
    env.verify(&public, "receipt")?;
    Ok(body)
}

/// Decode a chunk message.
pub fn decode_chunk(bytes: &[u8]) -> Result<ChunkMsg, ProtocolError> {
    let m: ChunkMsg = decode(bytes, "chunk", MAX_CHUNK_MSG)?;
    check_v(m.v)?;
    if m.proof.len() > crate::merkle::MAX_PROOF_LEN {
        return Err(ProtocolError::Decode {
            message: "chunk",
            detail: "proof too long".into(),
        });
    }
    Ok(m)
}

/// Encode any wire structure.
pub fn encode_msg<T: Serialize>(m: &T) -> Vec<u8> {
    encode(m)
}

/// Every decoder of the wire format, for fuzzing and corpus replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// [`decode_notify`]
    Notify,
    /// [`decode_ready`]
    Ready,
    /// [`decode_update`]
    Update,
    /// [`decode_update_body`]
    UpdateBody,
    /// [`decode_manifest`]
    Manifest,
    /// [`decode_status`]
    Status,
    /// [`decode_status_body`]
    StatusBody,
    /// [`decode_chunk`]
    Chunk,
    /// [`decode_receipt`]
    Receipt,
    /// [`decode_abort`]
    Abort,
    /// [`decode_health`]
    Health,
}

impl Decoder {
    /// All decoders.
    pub const ALL: [Decoder; 11] = [
        Decoder::Notify,
        Decoder::Ready,
        Decoder::Update,
        Decoder::UpdateBody,
        Decoder::Manifest,
        Decoder::Status,
        Decoder::StatusBody,
        Decoder::Chunk,
        Decoder::Receipt,
        Decoder::Abort,
        Decoder::Health,
    ];

    /// Lower-case name (fuzz target and corpus directory name).
    pub fn name(self) -> &'static str {
        match self {
            Decoder::Notify => "notify",
            Decoder::Ready => "ready",
            Decoder::Update => "update",
            Decoder::UpdateBody => "update_body",
            Decoder::Manifest => "manifest",
            Decoder::Status => "status",
            Decoder::StatusBody => "status_body",
            Decoder::Chunk => "chunk",
            Decoder::Receipt => "receipt",
            Decoder::Abort => "abort",
            Decoder::Health => "health",
        }
    }

    /// Size bound of this decoder's input.
    pub fn max(self) -> usize {
        match self {
            Decoder::Notify => MAX_NOTIFY,
            Decoder::Ready => MAX_READY,
            Decoder::Update | Decoder::UpdateBody => MAX_UPDATE,
            Decoder::Manifest => MAX_MANIFEST,
            Decoder::Status | Decoder::StatusBody => MAX_STATUS,
            Decoder::Chunk => MAX_CHUNK_MSG,
            Decoder::Receipt => MAX_RECEIPT,
            Decoder::Abort => MAX_ABORT,
            Decoder::Health => MAX_HEALTH,
        }
    }

    /// Run the decoder, discarding the value.
    pub fn decode(self, bytes: &[u8]) -> Result<(), ProtocolError> {
        match self {
            Decoder::Notify => decode_notify(bytes).map(drop),
            Decoder::Ready => decode_ready(bytes).map(drop),
            Decoder::Update => decode_update(bytes).map(drop),
            Decoder::UpdateBody => decode_update_body(bytes).map(drop),
            Decoder::Manifest => decode_manifest(bytes).map(drop),
            Decoder::Status => decode_status(bytes).map(drop),
            Decoder::StatusBody => decode_status_body(bytes).map(drop),
            Decoder::Chunk => decode_chunk(bytes).map(drop),
            Decoder::Receipt => decode_receipt(bytes).map(drop),
            Decoder::Abort => decode_abort(bytes).map(drop),
            Decoder::Health => decode_health(bytes).map(drop),
        }
    }
}

/// A valid encoding for each decoder, built from fixed inputs (deterministic except signatures,
/// which are RFC 6979 deterministic too). Used by tests, vectors and the fuzz corpus.
pub fn sample(decoder: Decoder) -> Vec<u8> {
    use crate::manifest::Manifest;
    let secret = p256::SecretKey::from_bytes(&[0x11; 32].into()).expect("valid scalar");
    let eph = crate::crypto::public_bytes(&secret.public_key());
    let secret = p256::ecdsa::SigningKey::from(&secret);
    let manifest = Manifest {
        campaign_id: "c1".into(),
        device_id: "s1".into(),
        version: "2.0.0".into(),
        size: 1000,
        sha256: [0xaa; 32],
        chunk_size: 512,
        chunk_count: 2,
        merkle_root: [0xbb; 32],
        expires_at: 1_800_003_600,
        allow_downgrade: false,
        kind: PayloadKind::Firmware,
        release: Some(crate::release::ReleaseSignature {
            public_key: eph.clone(),
            signature: [0xdd; 64],
        }),
        pull: false,
        delta: None,
    };
    let signed_manifest = SignedEnvelope::sign(&secret, TYPE_MANIFEST, encode(&manifest)).encode();
    match decoder {
        Decoder::Notify => SignedEnvelope::sign(
            &secret,
            TYPE_NOTIFY,
            encode(&NotifyBody {
                v: WIRE_VERSION,
                session_id: [1; 16],
                manager_id: "p1".into(),
                device_id: "s1".into(),
                campaign_id: "c1".into(),
                manager_cert: vec![0x30, 0x03, 0x02, 0x01, 0x01],
                ephemeral: eph,
                nonce: [2; 32],
                issued_at: 1_800_000_000,
                expires_at: 1_800_003_600,
                kind: PayloadKind::Firmware,
            }),
        )
        .encode(),
        Decoder::Ready => SignedEnvelope::sign(
            &secret,
            TYPE_READY,
            encode(&ReadyBody {
                v: WIRE_VERSION,
                session_id: [1; 16],
                manager_id: "p1".into(),
                device_id: "s1".into(),
                campaign_id: "c1".into(),
                device_cert: vec![0x30, 0x03, 0x02, 0x01, 0x01],
                ephemeral: eph,
                nonce: [3; 32],
                manager_nonce: [2; 32],
                running_version: "1.0.0".into(),
                max_packet_size: 65536,
                csr: Some(vec![0x30, 0x00]),
                have: Some(Have {
                    campaign_id: "c1".into(),
                    merkle_root: [0xbb; 32],
                    received: 1,
                }),
            }),
        )
        .encode(),
        Decoder::Update => encode(&UpdateMsg {
            v: WIRE_VERSION,
            session_id: [1; 16],
            nonce: [4; 12],
            ct: vec![5; 48],
        }),
        Decoder::UpdateBody => encode(&UpdateBody::Firmware {
            manifest: signed_manifest,
            content_key: [6; 32],
        }),
        Decoder::Manifest => signed_manifest,
        Decoder::Status => SignedEnvelope::sign(
            &secret,
            TYPE_STATUS,
            encode(&StatusMsg {
                v: WIRE_VERSION,
                session_id: [1; 16],
                seq: 1,
                nonce: [7; 12],
                ct: vec![8; 40],
            }),
        )
        .encode(),
        Decoder::StatusBody => encode(&StatusBody::ChunksRequested {
            indices: vec![0, 1, 70000],
        }),
        Decoder::Chunk => encode(&ChunkMsg {
            v: WIRE_VERSION,
            campaign_id: "c1".into(),
            index: 1,
            count: 2,
            ct: vec![9; 64],
            proof: vec![[0xcc; 32]],
        }),
        Decoder::Receipt => SignedEnvelope::sign(
            &secret,
            TYPE_RECEIPT,
            encode(&ReceiptBody {
                v: WIRE_VERSION,
                session_id: [1; 16],
                transcript: [0xee; 32],
                manager_id: "p1".into(),
                device_id: "s1".into(),
                campaign_id: "c1".into(),
                claim: Claim::Installed {
                    version: "2.0.0".into(),
                    sha256: [0xaa; 32],
                    release_key: Some([0x99; 32]),
                },
            }),
        )
        .encode(),
        Decoder::Abort => SignedEnvelope::sign(
            &secret,
            TYPE_ABORT,
            encode(&AbortBody {
                v: WIRE_VERSION,
                manager_id: "p1".into(),
                device_id: "s1".into(),
                campaign_id: "c1".into(),
                manager_cert: vec![0x30, 0x03, 0x02, 0x01, 0x01],
                issued_at: 1_800_000_500,
            }),
        )
        .encode(),
        Decoder::Health => SignedEnvelope::sign(
            &secret,
            TYPE_HEALTH,
            encode(&HealthBody {
                v: WIRE_VERSION,
                session_id: [1; 16],
                manager_id: "p1".into(),
                device_id: "s1".into(),
                campaign_id: "c1".into(),
                version: "2.0.0".into(),
                sha256: [0xaa; 32],
                healthy: true,
                detail: "service up 600 s".into(),
                reported_at: 1_800_000_900,
            }),
        )
        .encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_bound_covers_real_chunk_messages() {
        let topics = crate::topics::TopicTree::new("iot", "p1").unwrap();
        for (count, size) in [(1u32, 10u32), (2, 100), (3, 64), (1000, 17), (70_000, 1)] {
            let levels = 32 - (count - 1).leading_zeros();
            let m = ChunkMsg {
                v: WIRE_VERSION,
                campaign_id: "campaign-x".into(),
                index: count - 1,
                count,
                ct: vec![0; size as usize + 16],
                proof: vec![[0; 32]; levels as usize],
            };
            let actual = encode(&m).len() + topics.chunk("campaign-x", count - 1).len() + 10;
            let bound = chunk_packet_bound(&topics, "campaign-x", size, count) as usize;
            assert!(
                bound >= actual && bound <= actual + 100,
                "{count} {size}: {bound} vs {actual}"
            );
        }
    }

    #[test]
    fn chunk_head_and_tail_write_what_ciborium_writes() {
        // Every CBOR head width (1, 2, 3, 5 bytes) for the id, index, count, ciphertext and proof.
        for id in [
            "c",
            "campaign-with-a-23-char",
            "campaign-with-a-24-chars",
            &"x".repeat(63),
        ] {
            for (index, count) in [(0u32, 1u32), (23, 24), (255, 256), (65_535, 65_536)] {
                for ct_len in [0usize, 16, 23, 24, 255, 256, 65_535, 65_552] {
                    for proof_len in [0usize, 1, 23, 24, 32] {
                        let ct: Vec<u8> = (0..ct_len).map(|i| i as u8).collect();
                        let proof: Vec<[u8; 32]> = (0..proof_len).map(|i| [i as u8; 32]).collect();
                        let mut out = Vec::new();
                        ChunkMsg::encode_head(&mut out, id, index, count, ct.len());
                        out.extend_from_slice(&ct);
                        ChunkMsg::encode_tail(&mut out, &proof);
                        let reference = encode(&ChunkMsg {
                            v: WIRE_VERSION,
                            campaign_id: id.into(),
                            index,
                            count,
                            ct,
                            proof,
                        });
                        assert!(
                            out == reference,
                            "{id} {index}/{count} {ct_len} {proof_len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn samples_decode() {
        for d in Decoder::ALL {
            d.decode(&sample(d))
                .unwrap_or_else(|e| panic!("{}: {e}", d.name()));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for d in Decoder::ALL {
            let s = sample(d);
            for n in 0..s.len() {
                assert!(d.decode(&s[..n]).is_err(), "{} truncated to {n}", d.name());
            }
        }
    }

    #[test]
    fn trailing_bytes_and_oversize_are_errors() {
        for d in Decoder::ALL {
            let mut s = sample(d);
            s.push(0);
            assert!(
                matches!(d.decode(&s), Err(ProtocolError::Decode { .. })),
                "{}",
                d.name()
            );
            let big = vec![0u8; d.max() + 1];
            assert!(
                matches!(d.decode(&big), Err(ProtocolError::TooLarge { .. })),
                "{}",
                d.name()
            );
        }
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        // Deterministic pseudo-random garbage plus single-byte flips of valid samples.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for d in Decoder::ALL {
            for len in [1usize, 2, 7, 64, 300, 5000] {
                let g: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                assert!(d.decode(&g).is_err(), "{} garbage {len}", d.name());
            }
            let s = sample(d);
            for i in 0..s.len() {
                let mut t = s.clone();
                t[i] ^= 0xff;
                let _ = d.decode(&t); // may or may not decode; must not panic
            }
        }
    }

    #[test]
    fn nesting_and_huge_declared_lengths_are_bounded() {
        // 10,000 nested arrays.
        let deep = vec![0x81u8; 10_000];
        for d in Decoder::ALL {
            assert!(d.decode(&deep).is_err());
        }
        // A byte string declaring 2^63 bytes, and an array declaring 2^32 elements.
        let huge = [
            0xa1, 0x61, 0x76, 0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        let many = [0x9a, 0xff, 0xff, 0xff, 0xff, 0x00];
        for d in Decoder::ALL {
            assert!(d.decode(&huge).is_err());
            assert!(d.decode(&many).is_err());
        }
    }

    #[test]
    fn wrong_version_and_type_are_rejected() {
        let s = sample(Decoder::Notify);
        let mut env: SignedEnvelope = decode(&s, "t", MAX_NOTIFY).unwrap();
        env.v = 1;
        assert_eq!(
            decode_notify(&env.encode()).unwrap_err(),
            ProtocolError::Version(1)
        );
        env.v = WIRE_VERSION;
        env.t = TYPE_READY;
        assert!(matches!(
            decode_notify(&env.encode()),
            Err(ProtocolError::Decode { .. })
        ));
        let mut c = decode_chunk(&sample(Decoder::Chunk)).unwrap();
        c.v = 9;
        assert_eq!(
            decode_chunk(&encode(&c)).unwrap_err(),
            ProtocolError::Version(9)
        );
        c.v = WIRE_VERSION;
        c.proof = vec![[0; 32]; 33];
        assert!(matches!(
            decode_chunk(&encode(&c)),
            Err(ProtocolError::Decode { .. })
        ));
        let req = StatusBody::ChunksRequested {
            indices: vec![0; MAX_REQUESTED + 1],
        };
        assert!(matches!(
            decode_status_body(&encode(&req)),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
