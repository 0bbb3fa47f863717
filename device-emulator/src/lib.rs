//! The Sealed OTA device emulator: thousands of devices in one tokio process, each a real
//! MQTT 5 client over TLS with its own identity, running the protocol crate's `DeviceSession`,
//! with its state in a directory of its own and fault switches per device or per fraction of
//! the fleet. The protocol crate makes every protocol decision; this crate owns the sockets,
//! the disk, pacing, faults and reporting. The binary's CLI is in `main.rs`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod barrier;
pub mod device;
pub mod enroll;
pub mod enroll_cmd;
pub mod error;
pub mod faults;
pub mod fleet;
pub mod keylog;
pub mod mqtt_io;
pub mod pacing;
pub mod stats;
pub mod store;

pub use error::{Error, Result};

pub use sealed_ota_mqtt::tls::install_crypto_provider;
