//! The one error type of the emulator crate. Each variant says what failed and on what (a path,
//! a device, a fault specification), so a message printed at the edge is enough to act on. It
//! never carries key material or payload bytes.

use std::path::PathBuf;

/// Everything the emulator can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", "creating directory", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A certificate, key or CA could not be loaded or issued.
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
    /// A `--fault` specification could not be parsed.
    #[error("fault specification {spec:?}: {reason}")]
    FaultSpec {
        /// The text as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line value or a fleet directory is inconsistent.
    #[error("{0}")]
    Config(String),
    /// The shared device runner or store failed.
    #[error(transparent)]
    Device(#[from] sealed_ota_device::Error),
    /// A file operation of the shared store failed.
    #[error(transparent)]
    File(#[from] sealed_ota_device::durable::FileError),
    /// A Kubernetes request failed.
    #[error("Kubernetes: {action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        source: kube::Error,
    },
    /// Loading the kubeconfig failed.
    #[error("Kubernetes configuration: {0}")]
    KubeConfig(String),
    /// A row of a device inventory (`enroll --inventory`) is unusable.
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    /// Rendering YAML failed.
    #[error("YAML rendering: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
