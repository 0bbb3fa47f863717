//! The Sealed OTA device emulator: thousands of devices in one tokio process, each a real
//! MQTT 5 client over TLS with its own identity, running the shared device runner of
//! `sealed-ota-device` (the same one the device agent runs) with its state in a directory of its
//! own, an emulated installer (`device`, `slots`) and fault switches per device or per fraction of
//! the fleet. The protocol crate makes every protocol decision and the device crate owns the
//! session, the sockets and the device's files; this crate owns the fleet, its faults, pacing
//! settings, enrollment and reporting. The binary's CLI is in `main.rs`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod barrier;
pub mod device;
pub mod enroll;
pub mod enroll_cmd;
pub mod error;
pub mod faults;
pub mod fleet;
pub mod inventory;
pub mod keylog;
pub mod slots;
pub mod stats;
pub mod store;

/// The broker connection of a device (moved to the shared device crate).
pub use sealed_ota_device::link as mqtt_io;
/// Connection pacing (moved to the shared device crate).
pub use sealed_ota_device::pacing;

pub use error::{Error, Result};

pub use sealed_ota_mqtt::tls::install_crypto_provider;
