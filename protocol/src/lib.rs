//! Sans-IO implementation of the Sealed OTA inner channel shared by the
//! operator (manager side) and devices. It owns message formats, key
//! agreement, manifests and chunked transfer; it never touches a socket,
//! a clock or a Kubernetes API: callers feed messages and time in and
//! carry the produced publishes out.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Version of the wire format spoken by this crate.
pub const WIRE_VERSION: u8 = 1;
