//! Test support for the agent's process-level tests: a "board" (a temporary directory holding the
//! agent's configuration, state directory, a Sealed OTA PKI, a boot id that a simulated reboot
//! changes, and a reboot command that stops the agent as a real reboot would), a runner for the
//! real `sealed-ota-agent` binary, and the installer of the Debian packages the tests drive.
#![allow(dead_code)]

pub mod ab;
pub mod modules;
pub mod rauc;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;

use sealed_ota_protocol::identity::{CertificateAuthority, Role};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Installs the Debian packages the tests need (once per test binary), with the project's script.
/// Panics with a pointer to the script when that is impossible.
pub fn debian_packages() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let script = repo_root().join("scripts/install-agent-test-deps.sh");
        let out = Command::new(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}): {}\nThe agent's installer tests need Debian's rauc, rauc-service, mender-client, mender-artifact, squashfs-tools and dbus; run that script as root.",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The agent binary under test.
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sealed-ota-agent")
}

/// How one agent process ended.
#[derive(Debug)]
pub struct Exit {
    /// Its status.
    pub status: ExitStatus,
    /// What it printed.
    pub stdout: String,
    /// Its log.
    pub stderr: String,
}

impl Exit {
    /// Killed by this signal.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Exit code.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A simulated device: a directory with the agent's files and a boot id.
#[derive(Debug)]
pub struct Board {
    dir: tempfile::TempDir,
    boots: u32,
}

impl Board {
    /// A board whose configuration has `installer` (the `[installer]` tables) and `extra` (more
    /// tables: `[health_check]`, ...). A valid PKI is made so that `check-config` and `run` pass.
    pub fn new(installer: &str, extra: &str) -> Board {
        let dir = tempfile::Builder::new()
            .prefix("agent-board-")
            .tempdir()
            .unwrap();
        let mut board = Board { dir, boots: 0 };
        let root = board.path().to_path_buf();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ca = CertificateAuthority::generate("test-ca", now - 60, 30).unwrap();
        let device = ca.issue(Role::Device, "board-1", now - 60, 30).unwrap();
        fs::create_dir_all(root.join("pki")).unwrap();
        fs::write(root.join("pki/ca.crt"), ca.cert_pem()).unwrap();
        fs::write(root.join("pki/device.crt"), device.cert_pem()).unwrap();
        fs::write(root.join("pki/device.key"), device.key_pem().as_bytes()).unwrap();
        fs::set_permissions(
            root.join("pki/device.key"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        board.write_script(
            "reboot.sh",
            "#!/bin/sh\n# Stands in for `systemctl reboot`: note the request, stop the agent like a shutdown.\necho \"$SEALED_OTA_TRANSACTION\" >> \"$BOARD/reboot-requested\"\nkill -TERM \"$SEALED_OTA_AGENT_PID\"\n",
        );
        board.new_boot_id();
        let config = format!(
            r#"state_dir = "{root}/state"

[device]
id = "board-1"
key_file = "{root}/pki/device.key"
cert_file = "{root}/pki/device.crt"
initial_version = "1.0.0"

[broker]
url = "mqtts://127.0.0.1:8883"
ca_file = "{root}/pki/ca.crt"

[manager]
id = "manager"

{installer}

[reboot]
command = ["{root}/reboot.sh"]
wait_secs = 30
boot_id_file = "{root}/boot_id"

{extra}
"#,
            root = root.display()
        );
        fs::write(root.join("agent.toml"), config).unwrap();
        board
    }

    /// The board's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.path().join("agent.toml")
    }

    /// Writes an executable script into the board directory.
    pub fn write_script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A new boot id (a reboot).
    pub fn new_boot_id(&mut self) {
        self.boots += 1;
        fs::write(
            self.path().join("boot_id"),
            format!("boot-{}\n", self.boots),
        )
        .unwrap();
    }

    /// Whether the agent asked for a reboot since the last call (and forgets the request).
    pub fn take_reboot_request(&self) -> bool {
        fs::remove_file(self.path().join("reboot-requested")).is_ok()
    }

    /// Runs the agent with `args` (the board's configuration and environment; `crash_at` arms the
    /// crash hook; `env` adds variables).
    pub fn agent(&self, args: &[&str], crash_at: Option<&str>, env: &[(&str, &str)]) -> Exit {
        let mut command = Command::new(agent_bin());
        command
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("BOARD", self.path())
            .env("RUST_LOG", "info")
            .env_remove("SEALED_OTA_AGENT_CRASH_AT");
        if let Some(point) = crash_at {
            command.env("SEALED_OTA_AGENT_CRASH_AT", point);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        Exit {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The journal (`status --json`, read by the real binary).
    pub fn journal(&self) -> serde_json::Value {
        let out = self.agent(&["status", "--json"], None, &[]);
        assert!(out.status.success(), "status failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// The outcome of the last finished transaction, as journaled.
    pub fn last_outcome(&self) -> Option<serde_json::Value> {
        self.journal()["finished"]
            .as_array()?
            .last()
            .map(|f| f["outcome"].clone())
    }
}

/// A crash point, armed in every agent process until it fires, or only in the `process`-th.
#[derive(Debug, Clone)]
pub struct Crash {
    /// The point (`before:installing`, `journal-rename#2`, ...).
    pub point: String,
    /// Only in this agent process (1-based), when set.
    pub process: Option<usize>,
}

impl Crash {
    /// Armed from the first process on.
    pub fn at(point: &str) -> Crash {
        Crash {
            point: point.to_string(),
            process: None,
        }
    }

    /// A name for reports (`p2:journal-rename#1`).
    pub fn name(&self) -> String {
        match self.process {
            Some(p) => format!("p{p}:{}", self.point),
            None => self.point.clone(),
        }
    }
}

/// A simulated device the harness can power-cycle (playing its bootloader).
pub trait Device {
    /// Its board.
    fn board(&self) -> &Board;
    /// Environment for the agent (read by hooks).
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// A reboot: the bootloader picks a slot, the boot id changes, services restart.
    fn power_cycle(&mut self);
}

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// Runs the device until its transaction settles: `first` (an `install`), then after each exit
/// the system reboots when the agent asked for it (the reboot command stops the agent with
/// SIGTERM), and the agent starts again with `finish` (what `run` does first, without
/// connecting), as systemd would. `crash` is armed until it
/// fires once; the device then restarts in the same boot, or power-cycles when `power_cut`.
/// Returns whether the crash fired. Exit statuses other than 0 (installed, idle) and 3 (rolled
/// back) and 4 (failed) fail the test.
pub fn settle<D: Device>(
    device: &mut D,
    first: &[&str],
    crash: Option<&Crash>,
    power_cut: bool,
) -> bool {
    let mut args: Vec<&str> = first.to_vec();
    let mut fired = false;
    for process in 1..=16 {
        let armed = crash
            .filter(|c| !fired && c.process.is_none_or(|p| p == process))
            .map(|c| c.point.as_str());
        let env = device.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let exit = device.board().agent(&args, armed, &env);
        let clean_exit = exit.signal().is_none();
        match exit.signal() {
            Some(SIGKILL) => {
                assert!(
                    armed.is_some(),
                    "killed without a crash point: {}",
                    exit.stderr
                );
                fired = true;
                if power_cut {
                    device.power_cycle();
                }
            }
            Some(SIGTERM) => {
                assert!(
                    device.board().take_reboot_request(),
                    "stopped by SIGTERM without a reboot request: {}",
                    exit.stderr
                );
                device.power_cycle();
            }
            other => {
                let code = exit.code();
                assert!(
                    matches!(code, Some(0 | 3 | 4)),
                    "agent {args:?} ended with {code:?} / signal {other:?}: {}",
                    exit.stderr
                );
            }
        }
        // A stopped agent is started again (systemd's Restart=, or the next boot).
        if clean_exit && device.board().journal()["active"].is_null() {
            return fired;
        }
        args = vec!["finish"];
    }
    panic!(
        "the transaction did not settle: {:#}",
        device.board().journal()
    );
}

/// The phases of an update that installs through a reboot and commits.
pub const INSTALL_WITH_REBOOT: &[&str] = &[
    "preparing",
    "installing",
    "rebooting",
    "verifying",
    "health-check",
    "committing",
    "cleanup",
];
/// The phases of an update that installs without a reboot and commits.
pub const INSTALL_IN_PLACE: &[&str] = &[
    "preparing",
    "installing",
    "health-check",
    "committing",
    "cleanup",
];
/// The phases after a failed check on an image that needed a reboot: rollback through a reboot.
pub const ROLLBACK_WITH_REBOOT: &[&str] = &[
    "rolling-back",
    "rollback-rebooting",
    "verifying-rollback",
    "failing",
    "cleanup",
];
/// The phases after a failed check on an image installed in place.
pub const ROLLBACK_IN_PLACE: &[&str] = &["rolling-back", "failing", "cleanup"];

/// `phases` preceded by `first` (the step that failed).
pub fn after(first: &'static str, phases: &[&'static str]) -> Vec<&'static str> {
    std::iter::once(first)
        .chain(phases.iter().copied())
        .collect()
}

/// Every `before:` and `after:` point of `phases`, `before:report`, `after:report`, and the first
/// `writes` journal writes of each of the first `processes` agent processes.
pub fn crash_points(phases: &[&str], processes: usize, writes: usize) -> Vec<Crash> {
    let mut points = Vec::new();
    for phase in phases {
        points.push(Crash::at(&format!("before:{phase}")));
        points.push(Crash::at(&format!("after:{phase}")));
    }
    points.push(Crash::at("before:report"));
    points.push(Crash::at("after:report"));
    for process in 1..=processes {
        for n in 1..=writes {
            points.push(Crash {
                point: format!("journal-rename#{n}"),
                process: Some(process),
            });
        }
    }
    points
}
