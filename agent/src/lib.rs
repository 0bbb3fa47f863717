//! `sealed-ota-agent`: the Sealed OTA device agent for embedded Linux devices and gateways.
//!
//! The agent installs firmware through one of three backends (`installer`: RAUC over D-Bus, Mender
//! Update Modules, or a command hook) as a journaled transaction (`transaction`, the pure state
//! machine; `driver`, the shell that performs its effects), with A/B commit and rollback, a health
//! check and reboots (`system`), surviving a power cut at any step (`journal`, `durable`). Images
//! reach an installer only verified and complete (`staging`). Final outcomes go to a `report::Reporter`.
//! `session` connects the device to the manager with the shared runner of `sealed-ota-device`,
//! the transaction behind its installer seam (signed receipts, release keys, credential rotations).
//! `config` reads `/etc/sealed-ota/agent.toml`; `keygen` makes the device key and CSR on the device.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use sealed_ota_device::{crashpoint, durable};

pub mod config;
pub mod driver;
pub mod installer;
pub mod journal;
pub mod keygen;
pub mod process;
pub mod report;
pub mod session;
pub mod staging;
pub mod system;
pub mod transaction;
