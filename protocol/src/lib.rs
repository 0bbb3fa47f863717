//! Sans-IO implementation of the Sealed OTA inner channel shared by the
//! operator (manager side) and devices. It owns message formats, key
//! agreement, manifests and chunked transfer; it never touches a socket,
//! a clock or a Kubernetes API: callers feed messages and time in and
//! carry the produced publishes out.
//!
//! The specification (sequence diagrams, wire format, key schedule, security argument) is
//! `docs/protocol.md`; the API contract with the operator and the device emulator is
//! `docs/protocol-api.md`.
//!
//! Typical use, manager side: [`PreparedCampaign::prepare`] once per campaign (encrypts the image
//! once), publish [`PreparedCampaign::chunk_publishes`], subscribe [`TopicTree::ready_filter`] and
//! [`TopicTree::status_filter`], then one [`ManagerSession::start`] per device and feed it the
//! ready/status messages of that device. Device side: [`DeviceSession::new`], feed every message of
//! its notify, update and chunk topics to [`DeviceSession::handle`], call
//! [`DeviceSession::poll`] on a timer, [`DeviceSession::on_reconnect`] after a reconnect and
//! [`DeviceSession::finish_install`] after [`DeviceEvent::ImageComplete`]; persist
//! [`DeviceSession::state`].
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
    Bitmap, Completion, DeviceConfig, DeviceEvent, DeviceOutput, DeviceSession, DeviceState,
    InstalledImage, TransferState,
};
pub use error::{IdentityError, ProtocolError, TopicError};
pub use identity::{CertificateAuthority, Identity, PeerCertificate, Role, TrustAnchor};
pub use manager::{
    CampaignPayload, CampaignSpec, DeviceTarget, IssuedCertificate, ManagerConfig, ManagerEvent,
    ManagerOutput, ManagerSession, ManagerState, PreparedCampaign, RotationMode,
};
pub use manifest::{Manifest, PayloadKind, RejectReason};
pub use mqtt::{Action, Inbound, Outbound, Properties};
pub use topics::{TopicKind, TopicTree};

/// Version of the wire format spoken by this crate.
pub const WIRE_VERSION: u8 = 1;
