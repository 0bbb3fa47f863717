//! The agent's configuration file (`/etc/sealed-ota/agent.toml`): its types, parsing, and the
//! checks `check-config` runs. It owns every field's default and every field's error message, each
//! naming the field and the fix. It reads the files the configuration names to check them, and
//! never connects anywhere.
//!
//! The checks come in two groups: what an update transaction needs (`state_dir`, `[installer]`,
//! `[reboot]`, `[health_check]`), which `run` and `install` require before they touch the journal,
//! and what the MQTT session needs (`[device]`, `[broker]`, `[manager]`, `[release_keys]`,
//! `[session]`).

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sealed_ota_mqtt::BrokerUrl;
use sealed_ota_protocol::identity::{Identity, Role, TrustAnchor};
use sealed_ota_protocol::topics::{validate_id, TopicTree};
use sealed_ota_protocol::ReleaseKey;

/// Where the packaged service reads its configuration.
pub const DEFAULT_PATH: &str = "/etc/sealed-ota/agent.toml";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for the journal, staged images and installer work trees (mode 0700).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// This device.
    pub device: DeviceConfig,
    /// The MQTT broker.
    pub broker: BrokerConfig,
    /// The manager (the Sealed OTA operator) this device obeys.
    pub manager: ManagerConfig,
    /// How images are installed.
    pub installer: InstallerSection,
    /// How the agent reboots the system and notices that it did.
    #[serde(default)]
    pub reboot: RebootConfig,
    /// The check that decides, after an install (and reboot), whether to commit or roll back.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Public keys of the offline release key(s) that sign firmware.
    #[serde(default)]
    pub release_keys: ReleaseKeysConfig,
    /// How the session with the manager pulls images (all optional).
    #[serde(default)]
    pub session: SessionConfig,
}

/// `[session]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Largest MQTT packet the device accepts (advertised to the broker; chunks must fit).
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// Chunk topics subscribed at once.
    #[serde(default = "default_window")]
    pub window: u32,
    /// Seconds before chunks of the window that did not arrive are asked for again.
    #[serde(default = "default_window_timeout")]
    pub window_timeout_secs: u64,
    /// MQTT keep-alive, in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_packet_size: default_max_packet_size(),
            window: default_window(),
            window_timeout_secs: default_window_timeout(),
            keep_alive_secs: default_keep_alive(),
        }
    }
}

fn default_max_packet_size() -> u32 {
    256 * 1024
}

fn default_window() -> u32 {
    8
}

fn default_window_timeout() -> u64 {
    30
}

fn default_keep_alive() -> u64 {
    60
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sealed-ota")
}

/// `[device]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id: the certificate's common name and the topic level (`[a-z0-9-]`, 1-63).
    pub id: String,
    /// The device's P-256 private key (PKCS#8 or SEC1 PEM, mode 0600), made by `keygen`.
    pub key_file: PathBuf,
    /// The device's certificate (PEM), signed by the CA from the CSR `keygen` made.
    pub cert_file: PathBuf,
    /// The firmware version the device runs before the agent installs anything (semver).
    pub initial_version: String,
}

/// `[broker]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtts://host:port` (TLS with the device certificate) or `mqtt://host:port` (tests only).
    pub url: String,
    /// CA certificate(s) that signed the broker's TLS certificate (PEM).
    pub ca_file: PathBuf,
}

/// `[manager]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// The manager's id (its certificate's common name and a topic level).
    pub id: String,
    /// MQTT topic prefix.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// The Sealed OTA CA that signed the manager's certificate (defaults to `broker.ca_file`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_topic_prefix() -> String {
    sealed_ota_protocol::topics::DEFAULT_PREFIX.to_string()
}

/// `[installer]`: `type` picks the backend; its settings are in the table of that name
/// (`[installer.rauc]`, `[installer.update-module]`, `[installer.command]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerSection {
    /// `rauc`, `update-module` or `command`.
    #[serde(rename = "type")]
    pub kind: InstallerKind,
    /// Settings of the `rauc` backend (all optional).
    #[serde(default)]
    pub rauc: Option<RaucConfig>,
    /// Settings of the `update-module` backend.
    #[serde(default, rename = "update-module")]
    pub update_module: Option<UpdateModuleConfig>,
    /// Settings of the `command` backend.
    #[serde(default)]
    pub command: Option<CommandConfig>,
}

/// The installer backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallerKind {
    /// RAUC over D-Bus.
    Rauc,
    /// A Mender Update Module (v3 file API), picked by the artifact's payload type.
    UpdateModule,
    /// A plain executable hook.
    Command,
}

/// The chosen backend with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallerConfig {
    /// RAUC over D-Bus.
    Rauc(RaucConfig),
    /// A Mender Update Module.
    UpdateModule(UpdateModuleConfig),
    /// A plain executable hook.
    Command(CommandConfig),
}

impl InstallerKind {
    /// `rauc`, `update-module` or `command`.
    pub fn name(self) -> &'static str {
        match self {
            InstallerKind::Rauc => "rauc",
            InstallerKind::UpdateModule => "update-module",
            InstallerKind::Command => "command",
        }
    }
}

impl InstallerSection {
    /// The backend `type` names, with its settings; the error names the missing or stray table.
    pub fn backend(&self) -> Result<InstallerConfig, Vec<FieldError>> {
        let mut errors = Vec::new();
        let stray = [
            (InstallerKind::Rauc, self.rauc.is_some()),
            (InstallerKind::UpdateModule, self.update_module.is_some()),
            (InstallerKind::Command, self.command.is_some()),
        ];
        for (kind, present) in stray {
            if present && kind != self.kind {
                errors.push(field(
                    &format!("installer.{}", kind.name()),
                    format!("is set but installer.type is {:?}", self.kind.name()),
                    "remove the table, or set installer.type to the backend you mean",
                ));
            }
        }
        let missing = |errors: &mut Vec<FieldError>, example: &str| {
            errors.push(field(
                &format!("installer.{}", self.kind.name()),
                format!("is missing (installer.type is {:?})", self.kind.name()),
                &format!(
                    "add a [installer.{}] table, e.g. {example}",
                    self.kind.name()
                ),
            ))
        };
        let backend = match self.kind {
            InstallerKind::Rauc => {
                Some(InstallerConfig::Rauc(self.rauc.clone().unwrap_or_default()))
            }
            InstallerKind::UpdateModule => match &self.update_module {
                Some(c) => Some(InstallerConfig::UpdateModule(c.clone())),
                None => {
                    missing(&mut errors, "device_type = \"my-board\"");
                    None
                }
            },
            InstallerKind::Command => match &self.command {
                Some(c) => Some(InstallerConfig::Command(c.clone())),
                None => {
                    missing(&mut errors, "path = \"/usr/local/bin/ota-hook\"");
                    None
                }
            },
        };
        match backend {
            Some(backend) if errors.is_empty() => Ok(backend),
            _ => Err(errors),
        }
    }
}

impl InstallerConfig {
    /// `rauc`, `update-module` or `command`.
    pub fn kind(&self) -> &'static str {
        match self {
            InstallerConfig::Rauc(_) => "rauc",
            InstallerConfig::UpdateModule(_) => "update-module",
            InstallerConfig::Command(_) => "command",
        }
    }
}

/// `[installer.rauc]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaucConfig {
    /// D-Bus address of the bus RAUC's service is on; the system bus when absent.
    #[serde(default)]
    pub dbus_address: Option<String>,
    /// Longest an install may take, in seconds.
    #[serde(default = "default_install_timeout")]
    pub timeout_secs: u64,
}

/// `[installer.update-module]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateModuleConfig {
    /// Directory of the modules, each named after the payload type it installs.
    #[serde(default = "default_modules_dir")]
    pub modules_dir: PathBuf,
    /// This device's type; an artifact must list it in `artifact_depends.device_type`.
    pub device_type: String,
    /// Longest one module call may take, in seconds (Mender's `ModuleTimeoutSeconds`).
    #[serde(default = "default_module_timeout")]
    pub timeout_secs: u64,
}

fn default_modules_dir() -> PathBuf {
    // Debian's mender-client; upstream Mender uses /usr/lib/mender/modules/v3.
    PathBuf::from("/usr/share/mender/modules/v3")
}

fn default_module_timeout() -> u64 {
    4 * 3600
}

/// `[installer.command]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The hook executable (absolute path); called as `<path> <action>`, see the README.
    pub path: PathBuf,
    /// Whether the new image runs only after a reboot.
    #[serde(default)]
    pub reboot: bool,
    /// Whether the hook implements `rollback`.
    #[serde(default = "yes")]
    pub supports_rollback: bool,
    /// Longest one hook call may take, in seconds.
    #[serde(default = "default_install_timeout")]
    pub timeout_secs: u64,
}

fn default_install_timeout() -> u64 {
    3600
}

impl Default for RaucConfig {
    fn default() -> Self {
        RaucConfig {
            dbus_address: None,
            timeout_secs: default_install_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}

/// `[reboot]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    /// The command that asks the system to reboot (it may return before the reboot).
    #[serde(default = "default_reboot_command")]
    pub command: Vec<String>,
    /// How long to wait for the reboot to stop the agent before asking again, in seconds.
    #[serde(default = "default_reboot_wait")]
    pub wait_secs: u64,
    /// A file whose content changes on every boot.
    #[serde(default = "default_boot_id_file")]
    pub boot_id_file: PathBuf,
}

impl Default for RebootConfig {
    fn default() -> Self {
        RebootConfig {
            command: default_reboot_command(),
            wait_secs: default_reboot_wait(),
            boot_id_file: default_boot_id_file(),
        }
    }
}

fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

fn default_reboot_wait() -> u64 {
    300
}

fn default_boot_id_file() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}

/// `[health_check]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The check; exit status 0 means healthy.
    pub command: Vec<String>,
    /// Longest it may take, in seconds.
    #[serde(default = "default_health_timeout")]
    pub timeout_secs: u64,
}

fn default_health_timeout() -> u64 {
    120
}

/// `[release_keys]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseKeysConfig {
    /// P-256 public keys (SPKI PEM) of the release keys this device trusts.
    #[serde(default)]
    pub trusted: Vec<PathBuf>,
}

/// Why the configuration file could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration: {source}; create it (an example is in /usr/share/doc/sealed-ota-agent/agent.toml.example) or pass --config", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message: line, column, the key and what was expected.
        message: String,
    },
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a TOML path (`broker.url`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; fix: {}", self.field, self.problem, self.fix)
    }
}

/// Every problem the checks found (never just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct Invalid(pub Vec<FieldError>);

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|message| LoadError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the TOML text; the error says where and which key.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The CA that signs the manager's certificate.
    pub fn manager_ca_file(&self) -> &Path {
        self.manager
            .ca_file
            .as_deref()
            .unwrap_or(&self.broker.ca_file)
    }

    /// Checks what an update transaction needs (state directory, installer, reboot, health check).
    pub fn check_transaction(&self) -> Result<(), Invalid> {
        let mut errors = Vec::new();
        self.check_state_dir(&mut errors);
        self.check_installer(&mut errors);
        self.check_reboot(&mut errors);
        self.check_health(&mut errors);
        finish(errors)
    }

    /// Checks what the MQTT session needs: identity, broker, manager, release keys, session
    /// settings. `now` is Unix seconds (certificate validity).
    pub fn check_session(&self, now: u64) -> Result<(), Invalid> {
        let mut errors = Vec::new();
        self.check_device(now, &mut errors);
        self.check_broker(&mut errors);
        self.check_manager(&mut errors);
        self.check_release_keys(&mut errors);
        self.check_session_settings(&mut errors);
        finish(errors)
    }

    /// The trusted release keys (`[release_keys] trusted`), each file read and parsed; the error
    /// names the entry.
    pub fn release_keys(&self) -> Result<Vec<ReleaseKey>, Invalid> {
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for (i, path) in self.release_keys.trusted.iter().enumerate() {
            let name = format!("release_keys.trusted[{i}]");
            match fs::read_to_string(path) {
                Err(e) => errors.push(field(
                    &name,
                    format!("cannot read {}: {e}", path.display()),
                    "install the release public key there or remove the entry",
                )),
                Ok(text) => match ReleaseKey::parse(&text) {
                    Ok(key) => keys.push(key),
                    Err(e) => errors.push(field(
                        &name,
                        format!("{} is not a P-256 public key in PEM: {e}", path.display()),
                        "use the public key `sealed-ota release keygen` wrote (or openssl pkey -pubout)",
                    )),
                },
            }
        }
        finish(errors).map(|()| keys)
    }

    fn check_session_settings(&self, errors: &mut Vec<FieldError>) {
        let session = &self.session;
        if session.max_packet_size < 4096 {
            errors.push(field(
                "session.max_packet_size",
                format!("{} bytes is too small for a chunk", session.max_packet_size),
                "leave it out (256 KiB) or give at least 4096, above the campaigns' chunk size",
            ));
        }
        if session.window == 0 {
            errors.push(field(
                "session.window",
                "is 0".into(),
                "leave it out (8) or give at least 1",
            ));
        }
        positive(
            "session.window_timeout_secs",
            session.window_timeout_secs,
            errors,
        );
        positive("session.keep_alive_secs", session.keep_alive_secs, errors);
    }

    /// Every check (`check-config`).
    pub fn check_all(&self, now: u64) -> Result<(), Invalid> {
        let mut errors = Vec::new();
        for result in [self.check_transaction(), self.check_session(now)] {
            if let Err(Invalid(more)) = result {
                errors.extend(more);
            }
        }
        finish(errors)
    }

    fn check_state_dir(&self, errors: &mut Vec<FieldError>) {
        let dir = &self.state_dir;
        if !dir.is_absolute() {
            errors.push(field(
                "state_dir",
                format!("{} is not an absolute path", dir.display()),
                "use an absolute path such as /var/lib/sealed-ota",
            ));
        } else if dir.exists() {
            if !dir.is_dir() {
                errors.push(field(
                    "state_dir",
                    format!("{} exists and is not a directory", dir.display()),
                    "point it at a directory, or move the file away",
                ));
            } else if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_err() {
                errors.push(field(
                    "state_dir",
                    format!("{} is not writable by this user", dir.display()),
                    "run the agent as the directory's owner (root for the packaged service)",
                ));
            }
        } else if !dir.parent().is_some_and(Path::is_dir) {
            errors.push(field(
                "state_dir",
                format!(
                    "{} does not exist and neither does its parent",
                    dir.display()
                ),
                "create the parent directory (the agent creates the last level, mode 0700)",
            ));
        }
    }

    fn check_installer(&self, errors: &mut Vec<FieldError>) {
        let backend = match self.installer.backend() {
            Ok(backend) => backend,
            Err(more) => {
                errors.extend(more);
                return;
            }
        };
        match &backend {
            InstallerConfig::Rauc(rauc) => {
                if let Some(address) = &rauc.dbus_address {
                    if let Err(e) = zbus::Address::from_str(address) {
                        errors.push(field(
                            "installer.rauc.dbus_address",
                            format!("{address:?} is not a D-Bus address ({e})"),
                            "use an address such as unix:path=/run/dbus/system_bus_socket, or remove it to use the system bus",
                        ));
                    }
                }
                positive("installer.rauc.timeout_secs", rauc.timeout_secs, errors);
            }
            InstallerConfig::UpdateModule(m) => {
                if !m.modules_dir.is_dir() {
                    errors.push(field(
                        "installer.update-module.modules_dir",
                        format!("{} is not a directory", m.modules_dir.display()),
                        "install the update modules (Debian: apt-get install mender-client) or point it at their directory",
                    ));
                }
                if m.device_type.trim().is_empty()
                    || m.device_type.contains(['\n', '='])
                    || m.device_type.trim() != m.device_type
                {
                    errors.push(field(
                        "installer.update-module.device_type",
                        format!("{:?} is not a device type", m.device_type),
                        "set it to the device type your artifacts are built for (mender-artifact -t)",
                    ));
                }
                positive(
                    "installer.update-module.timeout_secs",
                    m.timeout_secs,
                    errors,
                );
            }
            InstallerConfig::Command(c) => {
                check_executable("installer.command.path", &c.path, errors);
                positive("installer.command.timeout_secs", c.timeout_secs, errors);
            }
        }
    }

    fn check_reboot(&self, errors: &mut Vec<FieldError>) {
        check_command("reboot.command", &self.reboot.command, errors);
        positive("reboot.wait_secs", self.reboot.wait_secs, errors);
        if let Err(e) = fs::read_to_string(&self.reboot.boot_id_file) {
            errors.push(field(
                "reboot.boot_id_file",
                format!("cannot read {}: {e}", self.reboot.boot_id_file.display()),
                "leave it at /proc/sys/kernel/random/boot_id (Linux) or name a file that changes on every boot",
            ));
        }
    }

    fn check_health(&self, errors: &mut Vec<FieldError>) {
        if let Some(health) = &self.health_check {
            check_command("health_check.command", &health.command, errors);
            positive("health_check.timeout_secs", health.timeout_secs, errors);
        }
    }

    fn check_device(&self, now: u64, errors: &mut Vec<FieldError>) {
        let device = &self.device;
        let id_ok = validate_id(&device.id).is_ok();
        if !id_ok {
            errors.push(field(
                "device.id",
                format!("{:?} is not a device id", device.id),
                "use 1-63 characters of a-z, 0-9 and '-' (the certificate's common name)",
            ));
        }
        if semver::Version::parse(&device.initial_version).is_err() {
            errors.push(field(
                "device.initial_version",
                format!("{:?} is not a semantic version", device.initial_version),
                "write it as MAJOR.MINOR.PATCH, e.g. 1.0.0",
            ));
        }
        let key = match fs::read_to_string(&device.key_file) {
            Ok(key) => Some(zeroize::Zeroizing::new(key)),
            Err(e) => {
                errors.push(field(
                    "device.key_file",
                    format!("cannot read {}: {e}", device.key_file.display()),
                    "run `sealed-ota-agent keygen` to make the key and a CSR on this device",
                ));
                None
            }
        };
        if key.is_some() {
            if let Ok(meta) = fs::metadata(&device.key_file) {
                if meta.permissions().mode() & 0o077 != 0 {
                    errors.push(field(
                        "device.key_file",
                        format!(
                            "{} is readable by other users (mode {:o})",
                            device.key_file.display(),
                            meta.permissions().mode() & 0o777
                        ),
                        "chmod 600 it",
                    ));
                }
            }
        }
        let cert = match fs::read_to_string(&device.cert_file) {
            Ok(cert) => Some(cert),
            Err(e) => {
                errors.push(field(
                    "device.cert_file",
                    format!("cannot read {}: {e}", device.cert_file.display()),
                    "have the CSR from `sealed-ota-agent keygen` signed by the Sealed OTA CA and store the certificate there",
                ));
                None
            }
        };
        let (Some(cert), Some(key)) = (cert, key) else {
            return;
        };
        let identity = match Identity::from_pem(&cert, &key) {
            Ok(identity) => identity,
            Err(e) => {
                errors.push(field(
                    "device.cert_file",
                    format!("the certificate and device.key_file do not form an identity: {e}"),
                    "use the certificate issued for the CSR of this key (run keygen again and have the new CSR signed if the key was replaced)",
                ));
                return;
            }
        };
        if id_ok && identity.name() != device.id {
            errors.push(field(
                "device.cert_file",
                format!(
                    "the certificate names device {:?}, not device.id {:?}",
                    identity.name(),
                    device.id
                ),
                "set device.id to the certificate's name or use this device's certificate",
            ));
            return;
        }
        if let Ok(ca) = fs::read_to_string(self.manager_ca_file()) {
            if let Ok(anchor) = TrustAnchor::from_pem(&ca) {
                if let Err(e) = anchor.verify(identity.cert_der(), Role::Device, &device.id, now) {
                    errors.push(field(
                        "device.cert_file",
                        format!("the certificate does not verify against the manager CA: {e}"),
                        "use a certificate the Sealed OTA CA issued to this device and that has not expired",
                    ));
                }
            }
        }
    }

    fn check_broker(&self, errors: &mut Vec<FieldError>) {
        if let Err(e) = BrokerUrl::parse(&self.broker.url) {
            errors.push(field(
                "broker.url",
                e.to_string(),
                "write mqtts://host:port (TLS with the device certificate); mqtt://host:port only for tests",
            ));
        }
        check_ca("broker.ca_file", &self.broker.ca_file, errors);
    }

    fn check_manager(&self, errors: &mut Vec<FieldError>) {
        if validate_id(&self.manager.id).is_err() {
            errors.push(field(
                "manager.id",
                format!("{:?} is not a manager id", self.manager.id),
                "use the operator's manager id: 1-63 characters of a-z, 0-9 and '-'",
            ));
        } else if let Err(e) = TopicTree::new(&self.manager.topic_prefix, &self.manager.id) {
            errors.push(field(
                "manager.topic_prefix",
                format!("{:?}: {e}", self.manager.topic_prefix),
                "use the operator's topic prefix (default iot)",
            ));
        }
        if let Some(ca) = &self.manager.ca_file {
            check_ca("manager.ca_file", ca, errors);
        }
    }

    fn check_release_keys(&self, errors: &mut Vec<FieldError>) {
        if let Err(Invalid(more)) = self.release_keys() {
            errors.extend(more);
        }
    }
}

fn finish(errors: Vec<FieldError>) -> Result<(), Invalid> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid(errors))
    }
}

fn field(name: &str, problem: String, fix: &str) -> FieldError {
    FieldError {
        field: name.to_string(),
        problem,
        fix: fix.to_string(),
    }
}

fn positive(name: &str, value: u64, errors: &mut Vec<FieldError>) {
    if value == 0 {
        errors.push(field(
            name,
            "is 0".into(),
            "give it a number of seconds above 0",
        ));
    }
}

fn check_ca(name: &str, path: &Path, errors: &mut Vec<FieldError>) {
    match fs::read_to_string(path) {
        Err(e) => errors.push(field(
            name,
            format!("cannot read {}: {e}", path.display()),
            "install the CA certificate (PEM) there",
        )),
        Ok(pem) => {
            if let Err(e) = TrustAnchor::from_pem(&pem) {
                errors.push(field(
                    name,
                    format!("{} is not a CA certificate in PEM: {e}", path.display()),
                    "use the CA certificate file (-----BEGIN CERTIFICATE-----)",
                ));
            }
        }
    }
}

fn check_executable(name: &str, path: &Path, errors: &mut Vec<FieldError>) {
    if !path.is_absolute() {
        errors.push(field(
            name,
            format!("{} is not an absolute path", path.display()),
            "give the executable's absolute path",
        ));
        return;
    }
    match fs::metadata(path) {
        Err(e) => errors.push(field(
            name,
            format!("{}: {e}", path.display()),
            "install the executable there or fix the path",
        )),
        Ok(meta) if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 => {
            errors.push(field(
                name,
                format!("{} is not an executable file", path.display()),
                "chmod +x it",
            ))
        }
        Ok(_) => {}
    }
}

/// A command line: not empty, and its program found (absolute, or on PATH).
fn check_command(name: &str, command: &[String], errors: &mut Vec<FieldError>) {
    let Some(program) = command.first() else {
        errors.push(field(
            name,
            "is empty".into(),
            "give the program and its arguments, e.g. [\"/usr/local/bin/check\"]",
        ));
        return;
    };
    let program = Path::new(program);
    if program.is_absolute() {
        check_executable(name, program, errors);
    } else if find_on_path(program).is_none() {
        errors.push(field(
            name,
            format!("{} is not on PATH", program.display()),
            "install it or give its absolute path",
        ));
    }
}

/// The executable `program` resolves to on PATH.
pub fn find_on_path(program: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

impl RebootConfig {
    /// How long to wait for a requested reboot.
    pub fn wait(&self) -> Duration {
        Duration::from_secs(self.wait_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[device]
id = "sensor-1"
key_file = "/k"
cert_file = "/c"
initial_version = "1.0.0"

[broker]
url = "mqtts://broker:8883"
ca_file = "/ca"

[manager]
id = "manager"

[installer]
type = "command"

[installer.command]
path = "/bin/true"
"#;

    #[test]
    fn defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/sealed-ota"));
        assert_eq!(c.manager.topic_prefix, "iot");
        assert_eq!(c.manager_ca_file(), Path::new("/ca"));
        assert_eq!(c.reboot.command, ["systemctl", "reboot"]);
        assert!(c.health_check.is_none());
        assert_eq!(
            c.installer.backend().unwrap(),
            InstallerConfig::Command(CommandConfig {
                path: "/bin/true".into(),
                reboot: false,
                supports_rollback: true,
                timeout_secs: 3600
            })
        );
    }

    #[test]
    fn every_backend_parses() {
        let rauc = MINIMAL.replace(
            "type = \"command\"\n\n[installer.command]\npath = \"/bin/true\"",
            "type = \"rauc\"",
        );
        assert!(matches!(
            Config::parse(&rauc).unwrap().installer.backend(),
            Ok(InstallerConfig::Rauc(_))
        ));
        let module = MINIMAL.replace(
            "type = \"command\"\n\n[installer.command]\npath = \"/bin/true\"",
            "type = \"update-module\"\n\n[installer.update-module]\ndevice_type = \"board\"",
        );
        match Config::parse(&module).unwrap().installer.backend().unwrap() {
            InstallerConfig::UpdateModule(m) => {
                assert_eq!(m.modules_dir, PathBuf::from("/usr/share/mender/modules/v3"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Parse errors name the key: a missing one, a misspelt one, a wrong type, an unknown backend.
    #[test]
    fn parse_errors_name_the_field() {
        let cases = [
            (
                MINIMAL.replace("url = \"mqtts://broker:8883\"\n", ""),
                "url",
            ),
            (MINIMAL.replace("[manager]\nid", "[manager]\nidd"), "idd"),
            (
                MINIMAL.replace(
                    "path = \"/bin/true\"",
                    "path = \"/bin/true\"\nreboot = \"yes\"",
                ),
                "reboot",
            ),
            (
                MINIMAL.replace("type = \"command\"", "type = \"swupdate\""),
                "swupdate",
            ),
            (
                MINIMAL.replace("[device]", "state_dirr = \"/x\"\n[device]"),
                "state_dirr",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(key), "error for {key} does not name it: {err}");
            assert!(err.contains("line"), "error for {key} has no line: {err}");
        }
    }

    #[test]
    fn semantic_errors_name_the_field_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let text = MINIMAL
            .replace("id = \"sensor-1\"", "id = \"Sensor_1\"")
            .replace("initial_version = \"1.0.0\"", "initial_version = \"one\"")
            .replace("mqtts://broker:8883", "http://broker")
            .replace(
                "path = \"/bin/true\"",
                "path = \"relative/hook\"\ntimeout_secs = 0",
            )
            .replace(
                "[manager]\nid = \"manager\"",
                "[manager]\nid = \"manager\"\ntopic_prefix = \"a/#\"",
            );
        let mut c = Config::parse(&text).unwrap();
        c.state_dir = dir.path().join("state");
        c.reboot.command = vec!["no-such-reboot-program".into()];
        let Invalid(errors) = c.check_all(0).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "installer.command.path",
            "installer.command.timeout_secs",
            "reboot.command",
            "device.id",
            "device.initial_version",
            "device.key_file",
            "device.cert_file",
            "broker.url",
            "broker.ca_file",
            "manager.topic_prefix",
        ] {
            assert!(
                fields.contains(&expected),
                "no error for {expected}: {fields:?}"
            );
        }
        for e in &errors {
            assert!(!e.fix.is_empty() && !e.problem.is_empty(), "{e}");
        }
        assert!(c.check_transaction().is_err());
    }

    #[test]
    fn the_backend_table_must_match_the_type() {
        let missing = MINIMAL.replace("\n[installer.command]\npath = \"/bin/true\"\n", "");
        let errors = Config::parse(&missing)
            .unwrap()
            .installer
            .backend()
            .unwrap_err();
        assert_eq!(errors[0].field, "installer.command");
        let stray = format!("{MINIMAL}\n[installer.rauc]\ntimeout_secs = 5\n");
        let errors = Config::parse(&stray)
            .unwrap()
            .installer
            .backend()
            .unwrap_err();
        assert_eq!(errors[0].field, "installer.rauc");
    }
}
