//! Sans-IO implementation of the Sealed OTA inner channel shared by the
//! operator (manager side) and devices. It owns message formats, key
//! agreement, manifests and chunked transfer; it never touches a socket,
//! a clock or a Kubernetes API: callers feed messages and time in and
//! carry the produced publishes out.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod codec;
pub mod crypto;
pub mod device;
pub mod error;
pub mod identity;
pub mod manager;
pub mod manifest;
pub mod merkle;
pub mod mqtt;
pub mod topics;
pub mod vectors;
pub mod wire;

pub use device::{
    Bitmap, DeviceConfig, DeviceEvent, DeviceOutput, DeviceSession, DeviceState, TransferState,
};
pub use error::{IdentityError, ProtocolError, TopicError};
pub use identity::{CertificateAuthority, Identity, PeerCertificate, Role, TrustAnchor};
pub use manager::{
    CampaignPayload, CampaignSpec, DeviceTarget, ManagerConfig, ManagerEvent, ManagerOutput,
    ManagerSession, ManagerState, PreparedCampaign, RotationMode,
};
pub use manifest::{Manifest, PayloadKind, RejectReason};
pub use mqtt::{Action, Inbound, Outbound, Properties};
pub use topics::{TopicKind, TopicTree};

/// Version of the wire format spoken by this crate.
pub const WIRE_VERSION: u8 = 1;
