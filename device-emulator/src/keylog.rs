//! A key log for tests, like `SSLKEYLOGFILE`: every session key, content key and delivered private
//! key a device session handles, appended to a file as `label session-id-hex secret-hex` lines, so
//! an end-to-end test can scan everything the broker relayed for them. ⚠️ It exposes every secret;
//! the emulator writes it only when `run --key-log FILE` asks.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use sealed_ota_protocol::KeyLog;

use crate::error::{Error, Result};

/// Appends secrets to a file.
#[derive(Debug)]
pub struct KeyLogFile {
    file: Mutex<std::fs::File>,
}

impl KeyLogFile {
    /// Opens (creates, appends to) `path`, mode 0600.
    pub fn open(path: &Path) -> Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(path)
            .map_err(|e| Error::io("opening the key log", path, e))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }
}

impl KeyLog for KeyLogFile {
    fn log(&self, label: &str, session_id: &[u8; 16], secret: &[u8]) {
        let line = format!(
            "{label} {} {}\n",
            hex::encode(session_id),
            hex::encode(secret)
        );
        if let Ok(mut file) = self.file.lock() {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// The secrets of a key log file: (label, secret) per line.
pub fn read(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let label = parts.next()?;
            let _session = parts.next()?;
            let secret = hex::decode(parts.next()?).ok()?;
            Some((label.to_string(), secret))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys.log");
        let log = KeyLogFile::open(&path).unwrap();
        log.log("content-key", &[1; 16], &[2; 32]);
        log.log("session-m2d", &[3; 16], &[4; 32]);
        let entries = read(&path).unwrap();
        assert_eq!(
            entries,
            vec![
                ("content-key".to_string(), vec![2; 32]),
                ("session-m2d".to_string(), vec![4; 32])
            ]
        );
    }
}
