//! On-disk layout of an emulated fleet: the settings every device shares, the CA they trust, and
//! one device directory per device (the shared `sealed_ota_device::store::DeviceDir`: identity,
//! protocol state, image being received; plus the emulator's image slots, see `slots`).
//!
//! ```text
//! <fleet>/fleet.json          manager id, topic prefix, initial version, release keys
//! <fleet>/ca.crt              trust anchor (inner channel, and broker TLS by default)
//! <fleet>/devices/<id>/       the device directory of <id>
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use sealed_ota_device::durable::{self, Mode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use sealed_ota_device::store::DeviceDir;

/// Settings shared by every device of a fleet, written at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetSettings {
    /// Manager id the devices expect (topic level and certificate name).
    pub manager_id: String,
    /// MQTT topic prefix.
    pub topic_prefix: String,
    /// Version a freshly enrolled device runs.
    pub initial_version: String,
    /// Release public keys the devices trust (hex of the uncompressed SEC1 point). Empty: the
    /// fleet does not use release keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_keys: Vec<String>,
}

/// The root directory of an enrolled fleet.
#[derive(Debug, Clone)]
pub struct FleetDir {
    root: PathBuf,
}

impl FleetDir {
    /// A fleet rooted at `root` (not checked until read).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FleetDir { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the CA certificate the devices trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    fn settings_path(&self) -> PathBuf {
        self.root.join("fleet.json")
    }

    fn devices_root(&self) -> PathBuf {
        self.root.join("devices")
    }

    /// Writes `fleet.json` and `ca.crt`, creating the directories.
    pub fn initialise(&self, settings: &FleetSettings, ca_cert_pem: &str) -> Result<()> {
        let devices = self.devices_root();
        fs::create_dir_all(&devices).map_err(|e| Error::io("creating directory", &devices, e))?;
        durable::write_json(&self.settings_path(), settings, Mode::Public, true)?;
        durable::write_atomic(&self.ca_cert_path(), ca_cert_pem.as_bytes(), Mode::Public)?;
        Ok(())
    }

    /// Reads `fleet.json`.
    pub fn settings(&self) -> Result<FleetSettings> {
        durable::read_json(&self.settings_path())?.ok_or_else(|| {
            Error::Config(format!(
                "{} is not an enrolled fleet (no fleet.json): run `enroll` first",
                self.root.display()
            ))
        })
    }

    /// The directory of device `id`.
    pub fn device(&self, id: &str) -> DeviceDir {
        DeviceDir::at(self.devices_root().join(id))
    }

    /// Ids of every enrolled device, sorted.
    pub fn device_ids(&self) -> Result<Vec<String>> {
        let root = self.devices_root();
        let entries = fs::read_dir(&root).map_err(|e| Error::io("listing", &root, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &root, e))?;
            if entry.path().join("cert.pem").is_file() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_lists_enrolled_devices_sorted_and_reads_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = FleetDir::new(tmp.path());
        let settings = FleetSettings {
            manager_id: "manager".into(),
            topic_prefix: "iot".into(),
            initial_version: "1.0.0".into(),
            release_keys: Vec::new(),
        };
        fleet.initialise(&settings, "CA").unwrap();
        for id in ["dev-2", "dev-10", "dev-1"] {
            fleet.device(id).write_credentials("C", "K").unwrap();
        }
        fs::create_dir_all(tmp.path().join("devices/not-enrolled")).unwrap();
        assert_eq!(fleet.device_ids().unwrap(), ["dev-1", "dev-10", "dev-2"]);
        assert_eq!(fleet.settings().unwrap(), settings);
        assert_eq!(fs::read_to_string(fleet.ca_cert_path()).unwrap(), "CA");
    }

    #[test]
    fn an_unenrolled_directory_says_to_enroll() {
        let tmp = tempfile::tempdir().unwrap();
        let err = FleetDir::new(tmp.path()).settings().unwrap_err();
        assert!(err.to_string().contains("enroll"), "{err}");
    }
}
