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
//! Typical use, manager side: [`ChunkSealer`] seals the image chunk by chunk (or
//! [`PreparedCampaign::prepare`] an image in memory) and [`PreparedCampaign::prepare`] once per
//! campaign, publish chunks as devices ask for them ([`PreparedCampaign::chunk_publish_from`]
//! around the stored ciphertext, or [`PreparedCampaign::chunk_publish`]), subscribe [`TopicTree::ready_filter`] and
//! [`TopicTree::status_filter`], then one [`ManagerSession::start`] per device and feed it the
//! ready/status messages of that device. Device side: [`DeviceSession::new`], feed every message of
//! its notify, update and chunk topics to [`DeviceSession::handle`], call
//! [`DeviceSession::poll`] on a timer, [`DeviceSession::on_reconnect`] after a reconnect, and after
//! [`DeviceEvent::ImageComplete`] [`DeviceSession::stage_install`], the switch, then
//! [`DeviceSession::report_final`] (or [`DeviceSession::finish_install`] in one step); persist
//! [`DeviceSession::state`]. Release keys: [`release`] (`sealed-ota release keygen/sign` use it).
//!
//! Features: `std` (default) adds what needs an operating system (OsRng, PEM, CSR generation,
//! certificate issuance); `manager` (default, needs `std`) the update manager; `device` (default)
//! the device session, which builds for `no_std` + `alloc` (`--no-default-features --features
//! device`, checked by `make no-std`), where the caller passes its RNG in
//! ([`DeviceSession::with_rng`]); `delta` (default, needs `std`) the binary-delta codec ([`delta`]).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

mod codec;
pub mod crypto;
#[cfg(feature = "delta")]
pub mod delta;
#[cfg(feature = "device")]
pub mod device;
pub mod error;
pub mod identity;
#[cfg(feature = "manager")]
pub mod manager;
pub mod manifest;
pub mod merkle;
pub mod mqtt;
mod prelude;
pub mod release;
#[cfg(feature = "manager")]
pub mod sealer;
pub mod topics;
#[cfg(feature = "manager")]
pub mod vectors;
pub mod wire;

#[cfg(feature = "device")]
pub use device::{
    AbortRecord, Bitmap, Completion, DeviceConfig, DeviceEvent, DeviceOutput, DeviceSession,
    DeviceState, FinalOutcome, InstalledImage, KeyLog, PendingInstall, RolledBackImage,
    SessionBinding, TransferState,
};
pub use error::{IdentityError, ProtocolError, TopicError};
#[cfg(feature = "std")]
pub use identity::CertificateAuthority;
pub use identity::{Identity, PeerCertificate, Role, TrustAnchor};
#[cfg(feature = "manager")]
pub use manager::{
    abort_publish, CampaignPayload, CampaignSpec, DeviceTarget, HealthReport, HealthVerifier,
    IssuedCertificate, ManagerConfig, ManagerEvent, ManagerOutput, ManagerSession, ManagerState,
    PreparedCampaign, RotationMode,
};
pub use manifest::{bounded_text, DeltaManifest, Manifest, PayloadKind, RejectReason, Transfer};
pub use mqtt::{Action, Inbound, Outbound, Properties};
pub use release::{ReleaseKey, ReleaseSignature, ReleaseSigner};
#[cfg(feature = "manager")]
pub use sealer::{ChunkSealer, SealedFirmware, MAX_PREPARE_THREADS};
pub use topics::{bucket_of, TopicKind, TopicTree};
pub use wire::{verify_receipt, Claim, HealthBody, ReceiptBody};

/// The RNG traits of [`DeviceSession::with_rng`] (the version this crate is built with).
pub use rand_core;

/// Version of the wire format spoken by this crate (2: receipts, signed abort, release signatures).
pub const WIRE_VERSION: u8 = 2;
