//! Error types of the crate boundary. Every rejection path returns one of these typed errors; none
//! panics. Decryption failures are deliberately opaque (no detail that could serve as an oracle).

use crate::prelude::*;

use crate::manifest::RejectReason;

/// Errors about topic names and identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The prefix is empty, too long, or contains `+`, `#`, a NUL or an empty level.
    #[error("invalid topic prefix {0:?}")]
    InvalidPrefix(String),
    /// An id is not 1-63 chars of `[a-z0-9-]` (or starts with `_`).
    #[error("invalid id {0:?}: expected 1-63 chars of [a-z0-9-]")]
    InvalidId(String),
    /// The topic does not belong to this tree or has an unknown shape.
    #[error("topic {0:?} is not part of this topic tree")]
    NotInTree(String),
}

impl TopicError {
    /// Short stable label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TopicError::InvalidPrefix(_) => "topic_invalid_prefix",
            TopicError::InvalidId(_) => "topic_invalid_id",
            TopicError::NotInTree(_) => "topic_not_in_tree",
        }
    }
}

/// Errors about certificates, keys and the CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A certificate or key could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// Parser message (never contains key material).
        detail: String,
    },
    /// The certificate does not chain to the trusted CA, is expired/not yet valid, or lacks the
    /// clientAuth EKU.
    #[error("certificate chain rejected: {0}")]
    Chain(String),
    /// The certificate names another role than the one expected (for example a device certificate
    /// presented as the manager).
    #[error("certificate role is {got:?}, expected {expected:?}")]
    WrongRole {
        /// Role the caller expected.
        expected: crate::identity::Role,
        /// Role the certificate states (SAN URI).
        got: crate::identity::Role,
    },
    /// The certificate names another entity.
    #[error("certificate names {got:?}, expected {expected:?}")]
    WrongName {
        /// Name expected.
        expected: String,
        /// Name the certificate carries.
        got: String,
    },
    /// The certificate lacks the `urn:sealed-ota:<role>:<name>` SAN URI or it disagrees with the CN.
    #[error("certificate has no consistent sealed-ota identity: {0}")]
    MissingIdentity(String),
    /// The certificate fingerprint differs from the pinned one.
    #[error("certificate fingerprint does not match the pinned fingerprint")]
    PinMismatch,
    /// The certificate was retired by a credential rotation (the device holds a newer one): whoever
    /// presents it holds a key that no longer speaks for the device.
    #[error("certificate was retired by a credential rotation")]
    Retired,
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The key is not a P-256 key.
    #[error("unsupported key type: only ECDSA P-256 is supported")]
    UnsupportedKey,
    /// The certificate could not be issued.
    #[error("cannot issue certificate: {0}")]
    Issue(String),
    /// The CSR is malformed or its signature is invalid.
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    /// A name is not a valid id.
    #[error(transparent)]
    InvalidName(#[from] TopicError),
}

impl IdentityError {
    /// Short stable label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            IdentityError::Parse { .. } => "identity_parse",
            IdentityError::Chain(_) => "identity_chain",
            IdentityError::WrongRole { .. } => "identity_wrong_role",
            IdentityError::WrongName { .. } => "identity_wrong_name",
            IdentityError::MissingIdentity(_) => "identity_missing",
            IdentityError::PinMismatch => "identity_pin_mismatch",
            IdentityError::Retired => "identity_retired",
            IdentityError::KeyMismatch => "identity_key_mismatch",
            IdentityError::UnsupportedKey => "identity_unsupported_key",
            IdentityError::Issue(_) => "identity_issue",
            IdentityError::Csr(_) => "identity_csr",
            IdentityError::InvalidName(_) => "identity_invalid_name",
        }
    }
}

/// Errors returned by sessions and decoders. A `ProtocolError` from `handle` means the message was
/// rejected and the session state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes are not a valid message of the expected type (truncated, garbage, bad field).
    #[error("cannot decode {message}: {detail}")]
    Decode {
        /// Message type being decoded.
        message: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The message is larger than the bound for its type.
    #[error("{message} is {size} bytes, larger than the maximum {max}")]
    TooLarge {
        /// Message type.
        message: &'static str,
        /// Actual size.
        size: usize,
        /// Bound.
        max: usize,
    },
    /// Unsupported wire version.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// A signature does not verify.
    #[error("bad signature on {message}")]
    BadSignature {
        /// Message type.
        message: &'static str,
    },
    /// The peer certificate was rejected.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Authenticated decryption failed. Opaque on purpose.
    #[error("cannot decrypt {message}")]
    Decrypt {
        /// Message type.
        message: &'static str,
    },
    /// The message belongs to another session (session id, nonces or transcript differ).
    #[error("message belongs to another session")]
    WrongSession,
    /// The message names another device.
    #[error("message is for device {got:?}, expected {expected:?}")]
    WrongDevice {
        /// This side's device id.
        expected: String,
        /// Device id in the message.
        got: String,
    },
    /// The message names another manager.
    #[error("message is from/for manager {got:?}, expected {expected:?}")]
    WrongManager {
        /// Expected manager id.
        expected: String,
        /// Manager id in the message.
        got: String,
    },
    /// The message belongs to another campaign.
    #[error("message belongs to campaign {got:?}, expected {expected:?}")]
    WrongCampaign {
        /// Expected campaign id.
        expected: String,
        /// Campaign id in the message.
        got: String,
    },
    /// A message already seen (or older than one already seen) arrived again.
    #[error("replayed message")]
    Replay,
    /// The message or campaign expired.
    #[error("expired")]
    Expired,
    /// A chunk index or size lies outside the manifest.
    #[error("chunk {index} out of range (count {count})")]
    ChunkOutOfRange {
        /// Chunk index received.
        index: u32,
        /// Declared chunk count.
        count: u32,
    },
    /// A chunk's Merkle proof does not lead to the signed root.
    #[error("chunk {index} fails its Merkle proof")]
    BadProof {
        /// Chunk index.
        index: u32,
    },
    /// A broker-alterable hint (topic, Response Topic, Correlation Data, User Property) disagrees with
    /// the signed/encrypted content.
    #[error("broker-supplied {field} disagrees with the authenticated content")]
    HintMismatch {
        /// Which hint.
        field: &'static str,
    },
    /// The message type is not expected in the current state.
    #[error("unexpected {message} in state {state}")]
    UnexpectedMessage {
        /// Message type.
        message: &'static str,
        /// Session state.
        state: &'static str,
    },
    /// The campaign specification is invalid.
    #[error("invalid campaign: {0}")]
    InvalidCampaign(String),
    /// Topic error.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The device refused (only returned where an operation cannot proceed because of it).
    #[error("rejected: {0}")]
    Rejected(RejectReason),
    /// The device asked for chunks more often or in larger numbers than a session allows (a
    /// stolen device key must not make the manager republish without bound).
    #[error("chunk request refused: {0}")]
    RateLimited(&'static str),
    /// Internal crypto failure (key generation, encoding). Not expected in practice.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

impl ProtocolError {
    /// Short stable label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProtocolError::Decode { .. } => "decode",
            ProtocolError::TooLarge { .. } => "too_large",
            ProtocolError::Version(_) => "version",
            ProtocolError::BadSignature { .. } => "bad_signature",
            ProtocolError::Identity(e) => e.metric_label(),
            ProtocolError::Decrypt { .. } => "decrypt",
            ProtocolError::WrongSession => "wrong_session",
            ProtocolError::WrongDevice { .. } => "wrong_device",
            ProtocolError::WrongManager { .. } => "wrong_manager",
            ProtocolError::WrongCampaign { .. } => "wrong_campaign",
            ProtocolError::Replay => "replay",
            ProtocolError::Expired => "expired",
            ProtocolError::ChunkOutOfRange { .. } => "chunk_out_of_range",
            ProtocolError::BadProof { .. } => "bad_proof",
            ProtocolError::HintMismatch { .. } => "hint_mismatch",
            ProtocolError::UnexpectedMessage { .. } => "unexpected_message",
            ProtocolError::InvalidCampaign(_) => "invalid_campaign",
            ProtocolError::Topic(e) => e.metric_label(),
            ProtocolError::Rejected(_) => "rejected",
            ProtocolError::RateLimited(_) => "rate_limited",
            ProtocolError::Crypto(_) => "crypto",
        }
    }
}
