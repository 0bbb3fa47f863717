//! The Sealed OTA operator: custom resources, the campaign controller and
//! the MQTT side of the manager. The binary in `main.rs` only wires these
//! together.
#![forbid(unsafe_code)]

pub mod crd;
pub mod crdgen;
pub mod rollout;
pub mod status;
