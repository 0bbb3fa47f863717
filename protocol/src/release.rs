//! Release signatures: the offline release role, separate from the online manager (after Uptane and
//! TUF). A release key that never enters the cluster signs a statement of the firmware image
//! (version, size, SHA-256); the signature travels inside the manager-signed manifest, and a device
//! enrolled with trusted release public keys refuses firmware whose release signature does not
//! verify, whatever the manager signed. This module owns the statement, its signature, key files
//! and key ids; it holds no protocol state, and the decision to require a signature is the device's
//! (`DeviceConfig::release_keys`).
//!
//! Statement: `"sealed-ota/v2/release" || lp(version) || size u64 BE || sha256`, with `lp(x) = len(x)
//! u32 BE || x`. Signature: ECDSA P-256 / SHA-256 over the statement, 64 bytes r||s, low S.

use crate::prelude::*;

use core::fmt;

use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto;
use crate::error::IdentityError;

/// Label that starts every release statement.
pub const RELEASE_LABEL: &[u8] = b"sealed-ota/v2/release";

/// The bytes a release key signs for an image.
pub fn statement(version: &str, size: u64, sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(RELEASE_LABEL.len() + 4 + version.len() + 8 + 32);
    m.extend_from_slice(RELEASE_LABEL);
    m.extend_from_slice(&(version.len() as u32).to_be_bytes());
    m.extend_from_slice(version.as_bytes());
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(sha256);
    m
}

/// A release public key a device trusts.
#[derive(Clone, PartialEq, Eq)]
pub struct ReleaseKey {
    public: p256::PublicKey,
}

impl fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ReleaseKey")
            .field(&hex::encode(self.id()))
            .finish()
    }
}

fn parse_err(what: &'static str, detail: impl fmt::Display) -> IdentityError {
    IdentityError::Parse {
        what,
        detail: detail.to_string(),
    }
}

impl ReleaseKey {
    /// From a SEC1 public key (65 bytes uncompressed, or 33 compressed).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, IdentityError> {
        crypto::parse_public(bytes)
            .map(|public| Self { public })
            .ok_or_else(|| parse_err("release public key", "not a P-256 point"))
    }

    /// From a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), as `release keygen` writes it,
    /// or from 130 hex characters of the uncompressed SEC1 point.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            return p256::PublicKey::from_public_key_pem(text)
                .map(|public| Self { public })
                .map_err(|e| parse_err("release public key PEM", e));
        }
        let bytes = hex::decode(text).map_err(|e| parse_err("release public key hex", e))?;
        Self::from_sec1(&bytes)
    }

    /// Uncompressed SEC1 point (65 bytes).
    pub fn sec1(&self) -> Vec<u8> {
        crypto::public_bytes(&self.public)
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    /// Key id: SHA-256 of the uncompressed SEC1 point. Shown on status as lowercase hex.
    pub fn id(&self) -> [u8; 32] {
        crypto::sha256(&self.sec1())
    }

    /// Whether `sig` is this key's valid signature of the image.
    pub fn verifies(
        &self,
        sig: &ReleaseSignature,
        version: &str,
        size: u64,
        sha: &[u8; 32],
    ) -> bool {
        sig.public_key == self.sec1()
            && crypto::verify_message(&self.public, &statement(version, size, sha), &sig.signature)
    }
}

/// A release private key (offline; only the release pipeline and `sealed-ota release sign` hold it).
pub struct ReleaseSigner {
    secret: p256::SecretKey,
}

impl fmt::Debug for ReleaseSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseSigner")
            .field("key", &self.public())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ReleaseSigner {
    /// A fresh random key from the operating system's RNG.
    #[cfg(feature = "std")]
    pub fn generate() -> Self {
        Self {
            secret: p256::SecretKey::random(&mut rand_core::OsRng),
        }
    }

    #[cfg(feature = "manager")]
    /// From a secret scalar (test vectors).
    pub(crate) fn from_secret(secret: p256::SecretKey) -> Self {
        Self { secret }
    }

    /// From a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        p256::SecretKey::from_pkcs8_pem(pem.trim())
            .map(|secret| Self { secret })
            .map_err(|_| parse_err("release private key PEM", "not a P-256 PKCS#8 key"))
    }

    /// PKCS#8 PEM of the private key.
    pub fn to_pem(&self) -> Zeroizing<String> {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap_or_else(|_| Zeroizing::new(String::new()))
    }

    /// The public half.
    pub fn public(&self) -> ReleaseKey {
        ReleaseKey {
            public: self.secret.public_key(),
        }
    }

    /// Sign an image statement.
    pub fn sign(&self, version: &str, size: u64, sha256: &[u8; 32]) -> ReleaseSignature {
        ReleaseSignature {
            public_key: self.public().sec1(),
            signature: crypto::sign_message(
                &p256::ecdsa::SigningKey::from(&self.secret),
                &statement(version, size, sha256),
            ),
        }
    }
}

/// A detached release signature: the signing key's public point (so a verifier can tell which of
/// its trusted keys to use) and the signature of the image statement.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSignature {
    /// Uncompressed SEC1 point of the release key (65 bytes).
    #[serde(with = "crate::codec::bytes")]
    pub public_key: Vec<u8>,
    /// ECDSA P-256 signature r||s (low S) of [`statement`].
    #[serde(with = "crate::codec::array")]
    pub signature: [u8; 64],
}

impl fmt::Debug for ReleaseSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseSignature")
            .field("key_id", &hex::encode(self.key_id()))
            .finish()
    }
}

impl ReleaseSignature {
    /// Id of the key that made it (SHA-256 of its public point).
    pub fn key_id(&self) -> [u8; 32] {
        crypto::sha256(&self.public_key)
    }

    /// From the hex texts a campaign carries (`publicKey`: 130 hex characters, `signature`: 128).
    pub fn from_hex(public_key: &str, signature: &str) -> Result<Self, IdentityError> {
        let key = ReleaseKey::parse(public_key)?;
        let sig = hex::decode(signature.trim()).map_err(|e| parse_err("release signature", e))?;
        let signature = <[u8; 64]>::try_from(sig).map_err(|_| {
            parse_err(
                "release signature",
                "expected 64 bytes (128 hex characters)",
            )
        })?;
        Ok(Self {
            public_key: key.sec1(),
            signature,
        })
    }

    /// Whether it verifies for this image under the key it names (not a trust decision).
    pub fn verifies_for(&self, version: &str, size: u64, sha: &[u8; 32]) -> bool {
        ReleaseKey::from_sec1(&self.public_key).is_ok_and(|k| k.verifies(self, version, size, sha))
    }

    /// The device's decision: `Ok(key id)` when `trusted` holds the signing key and the signature
    /// verifies for this image; otherwise why not (for a signed `RejectReason::ReleaseSignature`).
    pub fn check(
        signature: Option<&ReleaseSignature>,
        trusted: &[ReleaseKey],
        version: &str,
        size: u64,
        sha: &[u8; 32],
    ) -> Result<[u8; 32], String> {
        let sig = signature.ok_or("the firmware carries no release signature")?;
        let key = trusted
            .iter()
            .find(|k| k.sec1() == sig.public_key)
            .ok_or_else(|| {
                format!(
                    "release key {} is not trusted by this device",
                    hex::encode(&sig.key_id()[..8])
                )
            })?;
        if key.verifies(sig, version, size, sha) {
            Ok(key.id())
        } else {
            Err("the release signature does not verify for this image and version".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_what_breaks_it() {
        let signer = ReleaseSigner::generate();
        let key = signer.public();
        let sha = [7u8; 32];
        let sig = signer.sign("1.2.0", 1000, &sha);
        assert_eq!(
            ReleaseSignature::check(Some(&sig), core::slice::from_ref(&key), "1.2.0", 1000, &sha),
            Ok(key.id())
        );
        assert!(sig.verifies_for("1.2.0", 1000, &sha));
        for (v, size, h) in [
            ("1.2.1", 1000, sha),
            ("1.2.0", 1001, sha),
            ("1.2.0", 1000, [8u8; 32]),
        ] {
            assert!(
                ReleaseSignature::check(Some(&sig), core::slice::from_ref(&key), v, size, &h)
                    .is_err()
            );
        }
        let other = ReleaseSigner::generate().public();
        assert!(
            ReleaseSignature::check(Some(&sig), &[other], "1.2.0", 1000, &sha)
                .unwrap_err()
                .contains("not trusted")
        );
        assert!(ReleaseSignature::check(None, &[key], "1.2.0", 1000, &sha).is_err());
    }

    #[test]
    fn keys_round_trip_through_pem_and_hex() {
        let signer = ReleaseSigner::generate();
        let again = ReleaseSigner::from_pem(&signer.to_pem()).unwrap();
        assert_eq!(again.public(), signer.public());
        let key = signer.public();
        assert_eq!(ReleaseKey::parse(&key.to_pem()).unwrap(), key);
        assert_eq!(ReleaseKey::parse(&hex::encode(key.sec1())).unwrap(), key);
        let sig = signer.sign("2.0.0", 5, &[1; 32]);
        let back =
            ReleaseSignature::from_hex(&hex::encode(&sig.public_key), &hex::encode(sig.signature))
                .unwrap();
        assert_eq!(back, sig);
        assert!(ReleaseKey::parse("zz").is_err());
        assert!(ReleaseSignature::from_hex(&hex::encode(key.sec1()), "00").is_err());
        assert!(!format!("{signer:?}").contains("PRIVATE"));
    }
}
