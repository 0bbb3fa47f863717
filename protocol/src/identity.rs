//! Identities: the CA, own identities (certificate + P-256 key) and validation of a peer's
//! certificate. Owns certificate issuance and CSRs (rcgen, `std` only), chain and EKU validation
//! (rustls-webpki, with the signatures checked by RustCrypto's p256 so that it needs no ring and
//! builds for `no_std`) and reading names, SAN, validity and key (x509-cert). It must not
//! hand-roll any X.509 logic.
//!
//! Certificates: P-256, CN = name, SAN URI `urn:sealed-ota:<manager|device>:<name>`, EKU
//! clientAuth. The role is taken from the SAN URI only, so a device certificate can never be
//! accepted where a manager is expected.

use crate::prelude::*;

use core::fmt;
use core::time::Duration;

use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, LineEnding};
#[cfg(feature = "std")]
use rand_core::{OsRng, RngCore};
#[cfg(feature = "std")]
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
#[cfg(feature = "std")]
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::{
    alg_id, AlgorithmIdentifier, CertificateDer, InvalidSignature, SignatureVerificationAlgorithm,
    UnixTime,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::IdentityError;
#[cfg(feature = "std")]
use crate::topics::validate_id;

/// Which side a certificate belongs to, read from its SAN URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// The update manager (operator).
    Manager,
    /// A device.
    Device,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Device => "device",
        }
    }
}

/// SAN URI naming an entity: `urn:sealed-ota:<role>:<name>`.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("urn:sealed-ota:{}:{}", role.as_str(), name)
}

fn parse_err(what: &'static str, e: impl fmt::Display) -> IdentityError {
    IdentityError::Parse {
        what,
        detail: e.to_string(),
    }
}

#[cfg(feature = "std")]
fn issue_err(e: impl fmt::Display) -> IdentityError {
    IdentityError::Issue(e.to_string())
}

#[cfg(feature = "std")]
fn offset_time(secs: u64) -> Result<time::OffsetDateTime, IdentityError> {
    let secs = i64::try_from(secs).map_err(issue_err)?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(issue_err)
}

#[cfg(feature = "std")]
fn random_serial() -> SerialNumber {
    let mut s = [0u8; 16];
    OsRng.fill_bytes(&mut s);
    s[0] &= 0x7f; // positive INTEGER
    s[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&s)
}

#[cfg(feature = "std")]
fn rcgen_key(secret: &p256::SecretKey) -> Result<KeyPair, IdentityError> {
    let der = secret.to_pkcs8_der().map_err(issue_err)?;
    KeyPair::try_from(der.as_bytes()).map_err(issue_err)
}

#[cfg(feature = "std")]
fn leaf_params(
    role: Role,
    name: &str,
    now: u64,
    validity_days: u32,
) -> Result<CertificateParams, IdentityError> {
    validate_id(name)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let uri = rcgen::Ia5String::try_from(identity_uri(role, name)).map_err(issue_err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.not_before = offset_time(now.saturating_sub(300))?;
    params.not_after = offset_time(now.saturating_add(u64::from(validity_days) * 86_400))?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Facts read from a certificate (not yet trusted).
struct CertFacts {
    name: String,
    role: Role,
    not_after: u64,
    public_key: p256::PublicKey,
}

fn read_cert(der: &[u8]) -> Result<CertFacts, IdentityError> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::der::oid::db::{rfc4519::CN, rfc5280::ID_CE_SUBJECT_ALT_NAME};
    use x509_cert::der::{Decode, Encode};
    use x509_cert::ext::pkix::{name::GeneralName, SubjectAltName};
    // `from_der` refuses trailing bytes after the certificate.
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| parse_err("certificate", e))?;
    let tbs = &cert.tbs_certificate;
    let cn = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .and_then(|atv| {
            let v = &atv.value;
            v.decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_string())
                .or_else(|_| {
                    v.decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.to_string())
                })
                .or_else(|_| v.decode_as::<Ia5StringRef<'_>>().map(|s| s.to_string()))
                .ok()
        })
        .ok_or_else(|| IdentityError::MissingIdentity("no common name".into()))?;
    let san_ext = tbs
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == ID_CE_SUBJECT_ALT_NAME)
        .ok_or_else(|| IdentityError::MissingIdentity("no subjectAltName".into()))?;
    let san = SubjectAltName::from_der(san_ext.extn_value.as_bytes())
        .map_err(|e| parse_err("subjectAltName", e))?;
    let mut found: Option<(Role, String)> = None;
    for gn in &san.0 {
        if let GeneralName::UniformResourceIdentifier(uri) = gn {
            let uri = uri.as_str();
            if let Some(rest) = uri.strip_prefix("urn:sealed-ota:") {
                let (role, name) = rest
                    .split_once(':')
                    .ok_or_else(|| IdentityError::MissingIdentity(format!("bad URI {uri}")))?;
                let role = match role {
                    "manager" => Role::Manager,
                    "device" => Role::Device,
                    _ => return Err(IdentityError::MissingIdentity(format!("bad role in {uri}"))),
                };
                if found.is_some() {
                    return Err(IdentityError::MissingIdentity(
                        "several sealed-ota URIs".into(),
                    ));
                }
                found = Some((role, name.to_string()));
            }
        }
    }
    let (role, name) =
        found.ok_or_else(|| IdentityError::MissingIdentity("no urn:sealed-ota URI".into()))?;
    if name != cn {
        return Err(IdentityError::MissingIdentity(format!(
            "CN {cn:?} differs from URI {name:?}"
        )));
    }
    let not_after = tbs.validity.not_after.to_unix_duration().as_secs();
    let spki = tbs
        .subject_public_key_info
        .to_der()
        .map_err(|e| parse_err("subjectPublicKeyInfo", e))?;
    let public_key =
        p256::PublicKey::from_public_key_der(&spki).map_err(|_| IdentityError::UnsupportedKey)?;
    Ok(CertFacts {
        name,
        role,
        not_after,
        public_key,
    })
}

#[cfg(feature = "manager")]
/// Expiry (Unix seconds) of a certificate this crate can read (not a trust decision).
pub(crate) fn cert_not_after(der: &[u8]) -> Result<u64, IdentityError> {
    read_cert(der).map(|f| f.not_after)
}

/// The P-256 public key of a certificate this crate can read (not a trust decision).
pub(crate) fn cert_public_key(der: &[u8]) -> Result<p256::PublicKey, IdentityError> {
    read_cert(der).map(|f| f.public_key)
}

#[cfg(feature = "std")]
fn decode_pem_cert(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| parse_err("certificate PEM", e))?;
    if p.label != "CERTIFICATE" {
        return Err(parse_err(
            "certificate PEM",
            format!("unexpected label {}", p.label),
        ));
    }
    Ok(p.contents)
}

/// PKCS#8 PEM of a P-256 key, shared by the CA and identities (encoding a valid key does not fail).
fn pkcs8_pem(secret: &p256::SecretKey) -> Zeroizing<String> {
    secret
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap_or_else(|_| Zeroizing::new(String::new()))
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(core::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(feature = "std")]
fn parse_secret_pem(key_pem: &str) -> Result<p256::SecretKey, IdentityError> {
    p256::SecretKey::from_pkcs8_pem(key_pem)
        .or_else(|_| p256::SecretKey::from_sec1_pem(key_pem))
        .map_err(|_| IdentityError::Parse {
            what: "private key PEM",
            detail: "not a P-256 PKCS#8 or SEC1 key".into(),
        })
}

fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The certificate authority: issues manager and device certificates (`std` only: rcgen).
#[cfg(feature = "std")]
pub struct CertificateAuthority {
    issuer: rcgen::Certificate,
    key: KeyPair,
    secret: p256::SecretKey,
    cert_der: Vec<u8>,
}

#[cfg(feature = "std")]
impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &hex::encode(fingerprint(&self.cert_der)))
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "std")]
impl CertificateAuthority {
    /// Generate a new self-signed P-256 CA.
    pub fn generate(
        common_name: &str,
        now: u64,
        validity_days: u32,
    ) -> Result<Self, IdentityError> {
        let secret = p256::SecretKey::random(&mut OsRng);
        let key = rcgen_key(&secret)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset_time(now.saturating_sub(300))?;
        params.not_after = offset_time(now.saturating_add(u64::from(validity_days) * 86_400))?;
        params.serial_number = Some(random_serial());
        let issuer = params.self_signed(&key).map_err(issue_err)?;
        let cert_der = issuer.der().to_vec();
        Ok(Self {
            issuer,
            key,
            secret,
            cert_der,
        })
    }

    /// Load a CA from its certificate and key (PKCS#8 or SEC1 PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let cert_der = decode_pem_cert(cert_pem)?;
        let secret = parse_secret_pem(key_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| parse_err("CA certificate", e))?;
        let ca_pub = p256::PublicKey::from_public_key_der(parsed.public_key().raw)
            .map_err(|_| IdentityError::UnsupportedKey)?;
        if ca_pub != secret.public_key() {
            return Err(IdentityError::KeyMismatch);
        }
        let key = rcgen_key(&secret)?;
        // rcgen 0.13 needs an issuer `Certificate`: rebuild one from the CA's own parameters and
        // key (same subject DN and key, so issued certificates chain to the original CA cert).
        let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(cert_der.clone()))
            .map_err(|e| parse_err("CA certificate", e))?;
        let issuer = params.self_signed(&key).map_err(issue_err)?;
        Ok(Self {
            issuer,
            key,
            secret,
            cert_der,
        })
    }

    /// CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        der_to_pem(&self.cert_der)
    }

    /// CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        pkcs8_pem(&self.secret)
    }

    /// Issue a certificate and a fresh P-256 key for `name` in `role`.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        now: u64,
        validity_days: u32,
    ) -> Result<Identity, IdentityError> {
        let secret = p256::SecretKey::random(&mut OsRng);
        let key = rcgen_key(&secret)?;
        let params = leaf_params(role, name, now, validity_days)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(issue_err)?;
        Identity::from_parts(cert.der().to_vec(), secret)
    }

    /// Issue a certificate for the public key of a PKCS#10 CSR (whose signature is checked). Names,
    /// role, EKU and validity come from the arguments, never from the CSR.
    pub fn issue_for_csr(
        &self,
        csr_der: &[u8],
        role: Role,
        name: &str,
        now: u64,
        validity_days: u32,
    ) -> Result<Vec<u8>, IdentityError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr_der.to_vec(),
        ))
        .map_err(|e| IdentityError::Csr(e.to_string()))?;
        // Only P-256 keys.
        p256::PublicKey::from_sec1_bytes(rcgen::PublicKeyData::der_bytes(&csr.public_key))
            .map_err(|_| IdentityError::UnsupportedKey)?;
        let params = leaf_params(role, name, now, validity_days)?;
        let req = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = req.signed_by(&self.issuer, &self.key).map_err(issue_err)?;
        Ok(cert.der().to_vec())
    }

    /// The trust anchor to verify certificates issued by this CA.
    pub fn trust_anchor(&self) -> TrustAnchor {
        TrustAnchor {
            ca_der: self.cert_der.clone(),
        }
    }
}

/// Own identity: certificate plus P-256 secret key.
#[derive(Clone)]
pub struct Identity {
    cert_der: Vec<u8>,
    secret: p256::SecretKey,
    /// The same key, ready to sign (see [`crate::crypto::sign`]).
    signing: p256::ecdsa::SigningKey,
    name: String,
    role: Role,
    not_after: u64,
    fingerprint: [u8; 32],
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("fingerprint", &hex::encode(self.fingerprint))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Identity {
    pub(crate) fn from_parts(
        cert_der: Vec<u8>,
        secret: p256::SecretKey,
    ) -> Result<Self, IdentityError> {
        let facts = read_cert(&cert_der)?;
        if facts.public_key != secret.public_key() {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(Self {
            fingerprint: fingerprint(&cert_der),
            cert_der,
            signing: p256::ecdsa::SigningKey::from(&secret),
            secret,
            name: facts.name,
            role: facts.role,
            not_after: facts.not_after,
        })
    }

    /// Load from a PEM certificate and a PKCS#8 or SEC1 PEM key.
    #[cfg(feature = "std")]
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let der = decode_pem_cert(cert_pem)?;
        let secret = parse_secret_pem(key_pem)?;
        Self::from_parts(der, secret)
    }

    /// Load from a DER certificate and a PKCS#8 DER key.
    pub fn from_der(cert_der: &[u8], key_pkcs8_der: &[u8]) -> Result<Self, IdentityError> {
        let secret =
            p256::SecretKey::from_pkcs8_der(key_pkcs8_der).map_err(|_| IdentityError::Parse {
                what: "private key DER",
                detail: "not a P-256 PKCS#8 key".into(),
            })?;
        Self::from_parts(cert_der.to_vec(), secret)
    }

    /// Certificate, PEM.
    pub fn cert_pem(&self) -> String {
        der_to_pem(&self.cert_der)
    }
    /// Certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// Private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        pkcs8_pem(&self.secret)
    }
    /// Private key, PKCS#8 DER.
    pub fn key_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            self.secret
                .to_pkcs8_der()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default(),
        )
    }
    /// Name (CN and SAN URI).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Role (SAN URI).
    pub fn role(&self) -> Role {
        self.role
    }
    /// SHA-256 of the certificate DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
    /// Certificate expiry, Unix seconds.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }
    /// Seal `secret` so that only a holder of this identity's private key opens it, bound to
    /// `context` (ECIES, see [`crate::crypto::seal_to`]): for material the replicas of one manager
    /// share through a store they do not fully trust, such as a campaign's content seed.
    #[cfg(feature = "std")]
    pub fn seal_to_self(&self, context: &[u8], secret: &[u8]) -> Vec<u8> {
        crate::crypto::seal_to(&self.secret.public_key(), context, secret)
    }

    /// Open what [`Identity::seal_to_self`] sealed with this identity and the same `context`;
    /// `None` otherwise.
    pub fn open_sealed(&self, context: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        crate::crypto::open_sealed(&self.secret, context, sealed)
    }

    #[cfg(any(feature = "device", feature = "manager"))]
    pub(crate) fn secret(&self) -> &p256::SecretKey {
        &self.secret
    }

    /// The secret key, ready to sign (made once, with the identity).
    #[cfg(any(feature = "device", feature = "manager"))]
    pub(crate) fn signing_key(&self) -> &p256::ecdsa::SigningKey {
        &self.signing
    }
}

/// The trusted CA certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    ca_der: Vec<u8>,
}

impl fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchor")
            .field("fingerprint", &hex::encode(fingerprint(&self.ca_der)))
            .finish()
    }
}

/// A peer certificate that verified against the CA, with the role and name it is bound to.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// Name (CN = SAN URI name).
    pub name: String,
    /// Role (SAN URI).
    pub role: Role,
    /// SHA-256 of the DER.
    pub fingerprint: [u8; 32],
    /// Expiry, Unix seconds.
    pub not_after: u64,
    pub(crate) public_key: p256::PublicKey,
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("fingerprint", &hex::encode(self.fingerprint))
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl PeerCertificate {
    /// The certificate's P-256 public key.
    pub fn public_key(&self) -> &p256::PublicKey {
        &self.public_key
    }
}

impl TrustAnchor {
    /// From the CA certificate PEM.
    #[cfg(feature = "std")]
    pub fn from_pem(ca_pem: &str) -> Result<Self, IdentityError> {
        Self::from_der(&decode_pem_cert(ca_pem)?)
    }

    /// From the CA certificate DER.
    pub fn from_der(ca_der: &[u8]) -> Result<Self, IdentityError> {
        let der = CertificateDer::from(ca_der);
        webpki::anchor_from_trusted_cert(&der).map_err(|e| parse_err("CA certificate", e))?;
        Ok(Self {
            ca_der: ca_der.to_vec(),
        })
    }

    /// Chain to the CA, validity at `now`, EKU clientAuth, role and name binding.
    pub fn verify(
        &self,
        cert_der: &[u8],
        role: Role,
        expected_name: &str,
        now: u64,
    ) -> Result<PeerCertificate, IdentityError> {
        let ca = CertificateDer::from(self.ca_der.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&ca).map_err(|e| parse_err("CA", e))?;
        let leaf = CertificateDer::from(cert_der);
        let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| parse_err("certificate", e))?;
        ee.verify_for_usage(
            &[&P256Sha256],
            &[anchor],
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| IdentityError::Chain(format!("{e:?}")))?;
        let facts = read_cert(cert_der)?;
        if facts.role != role {
            return Err(IdentityError::WrongRole {
                expected: role,
                got: facts.role,
            });
        }
        if facts.name != expected_name {
            return Err(IdentityError::WrongName {
                expected: expected_name.to_string(),
                got: facts.name,
            });
        }
        Ok(PeerCertificate {
            name: facts.name,
            role: facts.role,
            fingerprint: fingerprint(cert_der),
            not_after: facts.not_after,
            public_key: facts.public_key,
        })
    }
}

/// ECDSA P-256 with SHA-256 for rustls-webpki's chain validation, checked by RustCrypto's p256
/// (the algorithm the CA signs with; webpki's own implementations need ring, which does not
/// build for every microcontroller).
#[derive(Debug)]
struct P256Sha256;

impl SignatureVerificationAlgorithm for P256Sha256 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        use p256::ecdsa::signature::Verifier;
        let key =
            p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| InvalidSignature)?;
        let signature =
            p256::ecdsa::Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        key.verify(message, &signature)
            .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_P256
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_SHA256
    }
}

/// A fresh key and its PKCS#10 CSR naming `name` in `role` (device side of the CSR rotation mode).
/// Without `std` (no rcgen) this returns [`IdentityError::Csr`]: such a device rotates with
/// delivered keys only.
#[cfg(not(feature = "std"))]
pub fn generate_csr(
    _role: Role,
    _name: &str,
) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), IdentityError> {
    Err(IdentityError::Csr(
        "generating a CSR needs the `std` feature (rcgen)".into(),
    ))
}

/// A fresh key and its PKCS#10 CSR naming `name` in `role` (device side of the CSR rotation mode).
#[cfg(feature = "std")]
pub fn generate_csr(
    role: Role,
    name: &str,
) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), IdentityError> {
    let secret = p256::SecretKey::random(&mut OsRng);
    let key = rcgen_key(&secret)?;
    validate_id(name)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let uri = rcgen::Ia5String::try_from(identity_uri(role, name)).map_err(issue_err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(issue_err)?;
    let pkcs8 = secret.to_pkcs8_der().map_err(issue_err)?;
    Ok((
        Zeroizing::new(pkcs8.as_bytes().to_vec()),
        csr.der().to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_secret_sealed_to_an_identity_opens_only_with_its_key_and_context() {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let manager = ca.issue(Role::Manager, "m1", NOW, 1).unwrap();
        let sealed = manager.seal_to_self(b"campaign-uid-1", b"thirty-two bytes of seed material");
        assert_eq!(
            manager
                .open_sealed(b"campaign-uid-1", &sealed)
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"thirty-two bytes of seed material"[..])
        );
        assert_ne!(
            sealed,
            manager.seal_to_self(b"campaign-uid-1", b"thirty-two bytes of seed material"),
            "fresh ephemeral key and nonce each time"
        );
        assert!(
            manager.open_sealed(b"campaign-uid-2", &sealed).is_none(),
            "bound to its context"
        );
        let other = ca.issue(Role::Manager, "m2", NOW, 1).unwrap();
        assert!(
            other.open_sealed(b"campaign-uid-1", &sealed).is_none(),
            "another key"
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                manager.open_sealed(b"campaign-uid-1", &bad).is_none(),
                "byte {i} changed"
            );
        }
        assert!(manager
            .open_sealed(b"campaign-uid-1", &sealed[..sealed.len() - 1])
            .is_none());
        assert!(manager.open_sealed(b"campaign-uid-1", &[]).is_none());
    }

    #[test]
    fn issue_and_verify() {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let trust = ca.trust_anchor();
        let dev = ca.issue(Role::Device, "s1", NOW, 1).unwrap();
        assert_eq!(dev.name(), "s1");
        assert_eq!(dev.role(), Role::Device);
        let peer = trust
            .verify(dev.cert_der(), Role::Device, "s1", NOW)
            .unwrap();
        assert_eq!(peer.fingerprint, dev.fingerprint());
        assert_eq!(peer.public_key, dev.secret().public_key());
        // Round trip through PEM.
        let again = Identity::from_pem(&dev.cert_pem(), &dev.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), dev.fingerprint());
        let ca2 = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let m = ca2.issue(Role::Manager, "p1", NOW, 1).unwrap();
        trust
            .verify(m.cert_der(), Role::Manager, "p1", NOW)
            .unwrap();
        let t2 = TrustAnchor::from_pem(&ca.cert_pem()).unwrap();
        t2.verify(m.cert_der(), Role::Manager, "p1", NOW).unwrap();
    }

    #[test]
    fn rejects_foreign_ca_wrong_name_wrong_role_expired() {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let other = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let dev = other.issue(Role::Device, "s1", NOW, 1).unwrap();
        assert!(matches!(
            ca.trust_anchor()
                .verify(dev.cert_der(), Role::Device, "s1", NOW),
            Err(IdentityError::Chain(_))
        ));
        let dev = ca.issue(Role::Device, "s1", NOW, 1).unwrap();
        assert!(matches!(
            ca.trust_anchor()
                .verify(dev.cert_der(), Role::Device, "s2", NOW),
            Err(IdentityError::WrongName { .. })
        ));
        assert!(matches!(
            ca.trust_anchor()
                .verify(dev.cert_der(), Role::Manager, "s1", NOW),
            Err(IdentityError::WrongRole {
                expected: Role::Manager,
                got: Role::Device
            })
        ));
        assert!(matches!(
            ca.trust_anchor()
                .verify(dev.cert_der(), Role::Device, "s1", NOW + 3 * 86_400),
            Err(IdentityError::Chain(_))
        ));
        assert!(matches!(
            ca.trust_anchor()
                .verify(b"garbage", Role::Device, "s1", NOW),
            Err(IdentityError::Parse { .. })
        ));
    }

    #[test]
    fn a_certificate_altered_after_issuance_fails_the_chain() {
        // The CA's signature binds the names: a certificate whose CN and SAN URI were rewritten
        // to another device (same length, consistent, so only the signature can tell) must not
        // verify, nor one whose signature was altered.
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let dev = ca.issue(Role::Device, "victim", NOW, 1).unwrap();
        let der = dev.cert_der().to_vec();
        let forged =
            hex::decode(hex::encode(&der).replace(&hex::encode("victim"), &hex::encode("attack")))
                .unwrap();
        assert_ne!(forged, der);
        assert_eq!(cert_public_key(&forged).unwrap(), dev.secret().public_key());
        assert!(matches!(
            ca.trust_anchor()
                .verify(&forged, Role::Device, "attack", NOW),
            Err(IdentityError::Chain(_))
        ));
        let mut bad_signature = der.clone();
        let n = bad_signature.len();
        bad_signature[n - 3] ^= 1;
        assert!(matches!(
            ca.trust_anchor()
                .verify(&bad_signature, Role::Device, "victim", NOW),
            Err(IdentityError::Chain(_))
        ));
        ca.trust_anchor()
            .verify(&der, Role::Device, "victim", NOW)
            .unwrap();
    }

    #[test]
    fn key_mismatch_and_garbage_pem() {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let a = ca.issue(Role::Device, "a", NOW, 1).unwrap();
        let b = ca.issue(Role::Device, "b", NOW, 1).unwrap();
        assert_eq!(
            Identity::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err(),
            IdentityError::KeyMismatch
        );
        assert!(Identity::from_pem("nope", &a.key_pem()).is_err());
        assert!(Identity::from_pem(&a.cert_pem(), "nope").is_err());
        assert!(TrustAnchor::from_pem("nope").is_err());
        assert!(format!("{a:?}").contains("redacted"));
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn csr_issue_binds_names_from_arguments() {
        let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
        let (key, csr) = generate_csr(Role::Device, "s1").unwrap();
        let der = ca.issue_for_csr(&csr, Role::Device, "s1", NOW, 1).unwrap();
        let id = Identity::from_der(&der, &key).unwrap();
        ca.trust_anchor()
            .verify(id.cert_der(), Role::Device, "s1", NOW)
            .unwrap();
        let mut bad = csr.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        assert!(ca.issue_for_csr(&bad, Role::Device, "s1", NOW, 1).is_err());
        assert!(ca
            .issue_for_csr(b"junk", Role::Device, "s1", NOW, 1)
            .is_err());
    }
}
