//! `sealed-ota-device`: what every Sealed OTA device runs around the protocol crate's
//! `DeviceSession`, shared by the device emulator (thousands of devices in one process) and the
//! device agent (one real device). It owns the session runner (`runner`: connect with the
//! `sealed-ota-mqtt` adapter, subscribe, feed messages, persist the state, store and check chunks,
//! stage an install, send the signed receipt of its outcome, finish a pending install after a
//! restart), the device's files (`store`: the credential store, the state, the image being
//! received; `durable`: crash-safe writes), the broker connection settings (`link`), connection
//! pacing (`pacing`) and the crash test hook (`crashpoint`). What differs between devices goes
//! through the small seam in `seam`: an [`Installer`], and for tests and fleets [`Faults`] and an
//! [`Observer`]. The protocol crate makes every protocol decision.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod crashpoint;
pub mod durable;
pub mod error;
pub mod link;
pub mod pacing;
pub mod runner;
pub mod seam;
pub mod store;

pub use error::{Error, Result};
pub use runner::{unix_now, Device, DeviceReport, Settings};
pub use seam::{
    Faults, InstallProgress, Installer, LateOutcome, NoFaults, NoObserver, Observer, Outcome,
};

pub use sealed_ota_mqtt::tls::install_crypto_provider;
