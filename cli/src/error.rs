//! Errors of the `sealed-ota` command: each says what failed, on which file, and what to do.

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key or signature file holds something else.
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and the fix.
        detail: String,
    },
    /// A key file exists and `--force` was not given.
    #[error("{} exists: refusing to overwrite a release key (pass --force to replace it)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A flag's value is unusable.
    #[error("{flag}: {detail}")]
    Flag {
        /// The flag, as typed (`--broker`).
        flag: &'static str,
        /// What is wrong and the fix.
        detail: String,
    },
    /// PKI bootstrap or enrollment failed (the device library says what and the fix).
    #[error("{0}")]
    Device(#[from] sealed_ota_device_emulator::Error),
    /// The result could not be printed.
    #[error("printing the result: {0}")]
    Output(String),
    /// The signature does not verify.
    #[error("{0}")]
    Refused(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of the command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
