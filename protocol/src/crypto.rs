//! Key schedule and AEAD of the inner channel, built only from maintained primitives (p256 ECDH and
//! ECDSA, HKDF-SHA256, AES-256-GCM). Owns labels and nonce rules; must not hold protocol state.
//!
//! ⚠️ Nonce rules: session messages use a random 96-bit nonce under a key that is fresh per session
//! (derived from fresh ephemeral keys and nonces), so a nonce never repeats under a key, also across
//! restarts. Chunks use a nonce derived from the chunk index, which is safe ONLY because the content
//! key is a fresh random 256-bit key for every prepared campaign and each index is encrypted once.

use crate::prelude::*;

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Label prefixed to every signed body: `sealed-ota/v2/sig/` then the one-byte message type.
pub const SIG_LABEL: &[u8] = b"sealed-ota/v2/sig/";
/// Label of the transcript hash.
pub const TRANSCRIPT_LABEL: &[u8] = b"sealed-ota/v2/transcript";
/// HKDF info of the manager-to-device key.
pub const INFO_M2D: &[u8] = b"sealed-ota/v2/key/manager-to-device";
/// HKDF info of the device-to-manager key.
pub const INFO_D2M: &[u8] = b"sealed-ota/v2/key/device-to-manager";
/// AAD label of chunk encryption.
pub const CHUNK_AAD_LABEL: &[u8] = b"sealed-ota/v2/chunk";
/// HKDF info label of a content key derived from a campaign seed (see [`seeded_content_key`]).
pub const INFO_CONTENT_KEY: &[u8] = b"sealed-ota/v2/key/content";
/// Bytes of the AES-256-GCM tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// Everything the session keys are bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript<'a> {
    /// Manager id.
    pub manager_id: &'a str,
    /// Device id.
    pub device_id: &'a str,
    /// Campaign id.
    pub campaign_id: &'a str,
    /// Session id chosen by the manager.
    pub session_id: &'a [u8; 16],
    /// Manager nonce.
    pub manager_nonce: &'a [u8; 32],
    /// Device nonce.
    pub device_nonce: &'a [u8; 32],
    /// Manager ephemeral public key (SEC1 uncompressed).
    pub manager_ephemeral: &'a [u8],
    /// Device ephemeral public key (SEC1 uncompressed).
    pub device_ephemeral: &'a [u8],
    /// SHA-256 of the manager certificate.
    pub manager_cert_fingerprint: &'a [u8; 32],
    /// SHA-256 of the device certificate.
    pub device_cert_fingerprint: &'a [u8; 32],
}

impl Transcript<'_> {
    /// SHA-256 over the label, the wire version and every field, each length-prefixed (u32 BE).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(TRANSCRIPT_LABEL);
        h.update([crate::WIRE_VERSION]);
        let fields: [&[u8]; 10] = [
            self.manager_id.as_bytes(),
            self.device_id.as_bytes(),
            self.campaign_id.as_bytes(),
            self.session_id,
            self.manager_nonce,
            self.device_nonce,
            self.manager_ephemeral,
            self.device_ephemeral,
            self.manager_cert_fingerprint,
            self.device_cert_fingerprint,
        ];
        for f in fields {
            h.update((f.len() as u32).to_be_bytes());
            h.update(f);
        }
        h.finalize().into()
    }
}

/// The two directional session keys. Zeroized on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionKeys {
    /// Manager to device (update message).
    pub m2d: [u8; 32],
    /// Device to manager (status reports).
    pub d2m: [u8; 32],
}

impl core::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

/// HKDF-SHA256(salt = transcript hash, ikm = ECDH(eph, eph) || ECDH(static, static),
/// info = direction label).
pub fn derive_session_keys(
    transcript_hash: &[u8; 32],
    ephemeral_shared: &[u8; 32],
    static_shared: &[u8; 32],
) -> SessionKeys {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(ephemeral_shared);
    ikm[32..].copy_from_slice(static_shared);
    let hk = Hkdf::<Sha256>::new(Some(transcript_hash), &ikm[..]);
    let mut keys = SessionKeys {
        m2d: [0; 32],
        d2m: [0; 32],
    };
    // 32 bytes is far below HKDF-SHA256's 255*32 limit: expand cannot fail.
    let _ = hk.expand(INFO_M2D, &mut keys.m2d);
    let _ = hk.expand(INFO_D2M, &mut keys.d2m);
    keys
}

/// Raw ECDH x-coordinate (only ever used as HKDF input).
pub fn ecdh(secret: &p256::SecretKey, public: &p256::PublicKey) -> Zeroizing<[u8; 32]> {
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(shared.raw_secret_bytes());
    out
}

/// SEC1 uncompressed encoding of a public key (65 bytes).
pub fn public_bytes(public: &p256::PublicKey) -> Vec<u8> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    public.to_encoded_point(false).as_bytes().to_vec()
}

/// Parse a SEC1 public key (rejects the identity and off-curve points).
pub fn parse_public(bytes: &[u8]) -> Option<p256::PublicKey> {
    p256::PublicKey::from_sec1_bytes(bytes).ok()
}

fn sig_input(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIG_LABEL.len() + 1 + body.len());
    m.extend_from_slice(SIG_LABEL);
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// ECDSA P-256 / SHA-256 signature (64 bytes r||s) over `SIG_LABEL || kind || body`, in low-S
/// form. The key is a `SigningKey`, kept by its owner ([`crate::Identity::signing_key`]): making
/// one from a secret key computes the public key, a scalar multiplication as costly as half the
/// signature, which a profile of the operator at 30,000 devices found on every signature.
pub fn sign(key: &SigningKey, kind: u8, body: &[u8]) -> [u8; 64] {
    sign_message(key, &sig_input(kind, body))
}

/// Verify a signature made by [`sign`]. A high-S signature is refused even when it is
/// mathematically valid (see [`verify_message`]).
pub fn verify(public: &p256::PublicKey, kind: u8, body: &[u8], sig: &[u8]) -> bool {
    verify_message(public, &sig_input(kind, body), sig)
}

/// ECDSA P-256 / SHA-256 signature (64 bytes r||s) over `message`, normalized to low S
/// (`s <= n/2`), the only form [`verify_message`] accepts.
pub fn sign_message(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    let sig: Signature = key.sign(message);
    let sig = sig.normalize_s().unwrap_or(sig);
    sig.to_bytes().into()
}

/// Verify a 64-byte r||s signature over `message`. ⚠️ ECDSA signatures are malleable: `(r, n - s)`
/// verifies whenever `(r, s)` does. Only the low-S form is accepted, so every signed message has
/// exactly one valid signature (nothing can be re-signed into a "new" message by a third party).
pub fn verify_message(public: &p256::PublicKey, message: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    if sig.normalize_s().is_some() {
        return false; // high S
    }
    VerifyingKey::from(public).verify(message, &sig).is_ok()
}

/// AES-256-GCM with a fresh random 96-bit nonce from the OS. Returns (nonce, ciphertext||tag).
#[cfg(feature = "std")]
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> ([u8; 12], Vec<u8>) {
    seal_with_rng(&mut rand_core::OsRng, key, aad, plaintext)
}

/// AES-256-GCM with a fresh random 96-bit nonce drawn from `rng`. Returns (nonce,
/// ciphertext||tag).
pub fn seal_with_rng(
    rng: &mut dyn CryptoRngCore,
    key: &[u8; 32],
    aad: &[u8],
    plaintext: &[u8],
) -> ([u8; 12], Vec<u8>) {
    let nonce = random_with(rng);
    let ct = seal_with_nonce(key, &nonce, aad, plaintext);
    (nonce, ct)
}

/// AES-256-GCM with an explicit nonce (callers guarantee uniqueness under the key).
pub fn seal_with_nonce(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    // Encryption only fails for plaintexts beyond 64 GiB, far above every bound of this crate.
    cipher
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default()
}

/// Authenticated decryption; opaque failure.
pub fn open(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], ct: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(&Nonce::from(*nonce), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

/// Chunk nonce: 4 zero bytes then the index as u64 BE. Unique because the content key is fresh
/// random per prepared campaign and each index is encrypted exactly once under it.
pub fn chunk_nonce(index: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&u64::from(index).to_be_bytes());
    n
}

/// Chunk AAD: label, campaign id (length-prefixed), index, count.
pub fn chunk_aad(campaign_id: &str, index: u32, count: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CHUNK_AAD_LABEL.len() + campaign_id.len() + 12);
    aad.extend_from_slice(CHUNK_AAD_LABEL);
    aad.extend_from_slice(&(campaign_id.len() as u32).to_be_bytes());
    aad.extend_from_slice(campaign_id.as_bytes());
    aad.extend_from_slice(&index.to_be_bytes());
    aad.extend_from_slice(&count.to_be_bytes());
    aad
}

/// The content-key cipher, keyed once and reused for every chunk of a campaign.
pub struct ChunkCipher {
    cipher: Aes256Gcm,
}

impl core::fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ChunkCipher(<redacted>)")
    }
}

impl ChunkCipher {
    /// Key the cipher.
    pub fn new(content_key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(content_key.into()),
        }
    }

    /// Encrypt chunk `index` of `count` (see [`chunk_nonce`], [`chunk_aad`]): ciphertext||tag.
    pub fn encrypt(&self, campaign_id: &str, index: u32, count: u32, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        self.encrypt_into(campaign_id, index, count, plaintext, &mut out);
        out
    }

    /// Append the ciphertext||tag of chunk `index` of `count` to `out` (the plaintext is copied
    /// once, then encrypted in place): the same bytes as [`ChunkCipher::encrypt`], written where
    /// the caller wants them, e.g. right after the CBOR header of the chunk message.
    pub fn encrypt_into(
        &self,
        campaign_id: &str,
        index: u32,
        count: u32,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let aad = chunk_aad(campaign_id, index, count);
        let start = out.len();
        out.extend_from_slice(plaintext);
        // Encryption only fails for plaintexts beyond 64 GiB, far above every bound of this
        // crate; never leave plaintext behind if it did.
        match self.cipher.encrypt_in_place_detached(
            &Nonce::from(chunk_nonce(index)),
            &aad,
            &mut out[start..],
        ) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => out.truncate(start),
        }
    }

    /// Decrypt chunk `index` of `count`; opaque failure.
    pub fn decrypt(
        &self,
        campaign_id: &str,
        index: u32,
        count: u32,
        ct: &[u8],
    ) -> Option<Zeroizing<Vec<u8>>> {
        let aad = chunk_aad(campaign_id, index, count);
        self.cipher
            .decrypt(
                &Nonce::from(chunk_nonce(index)),
                Payload { msg: ct, aad: &aad },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

/// Encrypt one chunk under the campaign content key.
pub fn encrypt_chunk(
    content_key: &[u8; 32],
    campaign_id: &str,
    index: u32,
    count: u32,
    plaintext: &[u8],
) -> Vec<u8> {
    seal_with_nonce(
        content_key,
        &chunk_nonce(index),
        &chunk_aad(campaign_id, index, count),
        plaintext,
    )
}

/// Decrypt one chunk; opaque failure.
pub fn decrypt_chunk(
    content_key: &[u8; 32],
    campaign_id: &str,
    index: u32,
    count: u32,
    ct: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    open(
        content_key,
        &chunk_nonce(index),
        &chunk_aad(campaign_id, index, count),
        ct,
    )
}

/// AAD of a session message: label, transcript hash, extra (e.g. sequence number).
pub fn session_aad(label: &[u8], transcript_hash: &[u8; 32], extra: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(label.len() + 32 + extra.len());
    aad.extend_from_slice(label);
    aad.extend_from_slice(transcript_hash);
    aad.extend_from_slice(extra);
    aad
}

/// A content key derived from a secret random campaign `seed` that several manager replicas share,
/// so that each of them encrypts the image into the same chunks: HKDF-SHA256(ikm = seed, info =
/// label || campaign id || target version || chunk size || SHA-256 of the image). ⚠️ Chunk nonces
/// come from the chunk index, so a key must never encrypt two different images: binding the image
/// digest (and the chunking) into the key makes a changed image get a different key from the same
/// seed. The seed must be as fresh and as secret as a random content key.
pub fn seeded_content_key(
    seed: &[u8; 32],
    campaign_id: &str,
    target_version: &str,
    chunk_size: u32,
    image_sha256: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, seed);
    let mut info = Vec::with_capacity(INFO_CONTENT_KEY.len() + 128);
    for part in [
        INFO_CONTENT_KEY,
        campaign_id.as_bytes(),
        target_version.as_bytes(),
    ] {
        info.extend_from_slice(&(part.len() as u32).to_be_bytes());
        info.extend_from_slice(part);
    }
    info.extend_from_slice(&chunk_size.to_be_bytes());
    info.extend_from_slice(image_sha256);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
    let _ = hk.expand(&info, &mut key[..]);
    key
}

/// HKDF info label of the key that seals a secret to an identity (see [`seal_to`]).
pub const INFO_SEALED: &[u8] = b"sealed-ota/v2/key/sealed-to-identity";

fn sealing_key(shared: &[u8; 32], ephemeral_public: &[u8], context: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(ephemeral_public), shared);
    let mut info = Vec::with_capacity(INFO_SEALED.len() + context.len());
    info.extend_from_slice(INFO_SEALED);
    info.extend_from_slice(context);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
    let _ = hk.expand(&info, &mut key[..]);
    key
}

/// Seal `secret` to the holder of `recipient`'s private key (ECIES: a fresh ephemeral P-256 key,
/// ECDH with the recipient's key, HKDF-SHA256 salted with the ephemeral public key and bound to
/// `context`, AES-256-GCM with `context` as associated data). Output: ephemeral public key (65
/// bytes) || nonce (12) || ciphertext || tag. Opened by [`open_sealed`] with the same context only.
#[cfg(feature = "std")]
pub fn seal_to(recipient: &p256::PublicKey, context: &[u8], secret: &[u8]) -> Vec<u8> {
    let ephemeral = p256::SecretKey::random(&mut rand_core::OsRng);
    let ephemeral_public = public_bytes(&ephemeral.public_key());
    let key = sealing_key(&ecdh(&ephemeral, recipient), &ephemeral_public, context);
    let (nonce, ct) = seal(&key, context, secret);
    let mut out = ephemeral_public;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Open what [`seal_to`] sealed to `recipient`'s public key, with the recipient's private key and
/// the same `context`; `None` for anything else (no detail: no oracle).
pub fn open_sealed(
    recipient: &p256::SecretKey,
    context: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    use p256::elliptic_curve::sec1::FromEncodedPoint;
    if sealed.len() < 65 + 12 + TAG_LEN {
        return None;
    }
    let (ephemeral_public, rest) = sealed.split_at(65);
    let (nonce, ct) = rest.split_at(12);
    let point = p256::EncodedPoint::from_bytes(ephemeral_public).ok()?;
    let ephemeral: p256::PublicKey = Option::from(p256::PublicKey::from_encoded_point(&point))?;
    let key = sealing_key(&ecdh(recipient, &ephemeral), ephemeral_public, context);
    open(&key, nonce.try_into().ok()?, context, ct)
}

/// Fresh random bytes from the OS.
#[cfg(feature = "std")]
pub fn random<const N: usize>() -> [u8; N] {
    random_with(&mut rand_core::OsRng)
}

/// Fresh random bytes from `rng`.
pub fn random_with<const N: usize>(rng: &mut dyn CryptoRngCore) -> [u8; N] {
    let mut b = [0u8; N];
    rng.fill_bytes(&mut b);
    b
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn seal_open_and_tamper() {
        let key = random::<32>();
        let (n, mut ct) = seal(&key, b"aad", b"hello");
        assert_eq!(&open(&key, &n, b"aad", &ct).unwrap()[..], b"hello");
        assert!(open(&key, &n, b"aae", &ct).is_none());
        ct[0] ^= 1;
        assert!(open(&key, &n, b"aad", &ct).is_none());
    }

    #[test]
    fn ecdh_is_symmetric_and_keys_differ_by_direction() {
        let a = p256::SecretKey::random(&mut OsRng);
        let b = p256::SecretKey::random(&mut OsRng);
        assert_eq!(*ecdh(&a, &b.public_key()), *ecdh(&b, &a.public_key()));
        let k = derive_session_keys(&[1; 32], &[2; 32], &[3; 32]);
        assert_ne!(k.m2d, k.d2m);
        assert!(!format!("{k:?}").contains('1'));
    }

    #[test]
    fn chunk_cipher_writes_what_the_one_shot_functions_write() {
        let key = random::<32>();
        let cipher = ChunkCipher::new(&key);
        for len in [0usize, 1, 15, 16, 17, 4096] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let one_shot = encrypt_chunk(&key, "c1", 2, 5, &pt);
            assert_eq!(one_shot.len(), len + TAG_LEN);
            assert_eq!(cipher.encrypt("c1", 2, 5, &pt), one_shot);
            let mut out = b"head".to_vec();
            cipher.encrypt_into("c1", 2, 5, &pt, &mut out);
            assert_eq!(&out[..4], b"head");
            assert_eq!(&out[4..], &one_shot[..]);
            let back = cipher.decrypt("c1", 2, 5, &out[4..]).unwrap();
            assert_eq!(&back[..], &pt[..]);
            assert!(decrypt_chunk(&key, "c1", 3, 5, &out[4..]).is_none());
        }
    }

    #[test]
    fn signatures_are_domain_separated() {
        let a = p256::SecretKey::random(&mut OsRng);
        let s = sign(&SigningKey::from(&a), 1, b"body");
        assert!(verify(&a.public_key(), 1, b"body", &s));
        assert!(!verify(&a.public_key(), 2, b"body", &s));
        assert!(!verify(&a.public_key(), 1, b"bodx", &s));
        assert!(!verify(&a.public_key(), 1, b"body", &s[..63]));
    }

    /// ECDSA malleability: `(r, n - s)` is a second valid signature of the same message. Only the
    /// low-S form is produced and accepted.
    #[test]
    fn high_s_signatures_are_refused() {
        let a = p256::SecretKey::random(&mut OsRng);
        for i in 0..16u8 {
            let s = sign(&SigningKey::from(&a), 1, &[i]);
            let sig = Signature::from_slice(&s).unwrap();
            assert!(sig.normalize_s().is_none(), "signer produced high S");
            // The mirrored signature: same r, s' = n - s (high S). It verifies with the raw
            // primitive, so only the low-S rule refuses it.
            let (r, s_low) = sig.split_scalars();
            let s_high = -*s_low;
            let high = Signature::from_scalars(r.to_bytes(), s_high.to_bytes()).unwrap();
            let raw_ok = VerifyingKey::from(&a.public_key())
                .verify(&sig_input(1, &[i]), &high)
                .is_ok();
            assert!(raw_ok, "the mirrored signature is mathematically valid");
            let high_bytes: [u8; 64] = high.to_bytes().into();
            assert!(!verify(&a.public_key(), 1, &[i], &high_bytes));
            assert!(verify(&a.public_key(), 1, &[i], &s));
        }
    }
}
