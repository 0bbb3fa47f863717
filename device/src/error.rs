//! The one error type of the device crate. Each variant says what failed and on what (a path, a
//! device), so a message printed at the edge is enough to act on. It never carries key material or
//! payload bytes.

pub use crate::durable::FileError;

/// Everything a device's session runner can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A certificate, key or CA could not be loaded.
    #[error("identity of {subject}: {source}")]
    Identity {
        /// Device id, manager id or "CA".
        subject: String,
        /// The protocol crate's error.
        source: sealed_ota_protocol::IdentityError,
    },
    /// The topic prefix or a device / manager id is not acceptable to the protocol.
    #[error("topics for manager {manager_id:?}: {source}")]
    Topics {
        /// The manager id.
        manager_id: String,
        /// The protocol crate's error.
        source: sealed_ota_protocol::TopicError,
    },
    /// A broker URL or setting is inconsistent.
    #[error("{0}")]
    Config(String),
    /// Building the TLS configuration of a device failed.
    #[error("TLS configuration of {device}: {reason}")]
    Tls {
        /// The device id.
        device: String,
        /// What failed.
        reason: String,
    },
    /// The installer could not take or resume an install.
    #[error("installer: {0}")]
    Installer(String),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
