//! A RAUC system for the agent's tests: the real RAUC from Debian as `rauc service` on a private
//! D-Bus with two file-backed raw slots (A, B) and RAUC's `custom` bootloader backend (a script
//! keeping the bootloader state in a file), bundles made and signed by `rauc bundle`. The harness
//! plays the bootloader at each reboot: it boots the primary slot if it is good, else the other,
//! and restarts `rauc service` with `--override-boot-slot` (what a real boot would show RAUC).
//! Needs root (RAUC loop-mounts the bundle's squashfs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Board;

pub const OLD: &[u8] = b"rootfs 1.0.0 ";
pub const SLOT_SIZE: usize = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// RAUC's custom bootloader backend: `get-primary`, `set-primary`, `get-state`, `set-state`,
/// `get-current`, with the state in `bootstate` (as the rig in shared/notes did).
const CUSTOM_BACKEND: &str = r#"#!/bin/sh
S="$(dirname "$0")/bootstate"
echo "$*" >> "$S.log"
case "$1" in
  get-primary) p=$(sed -n 's/^PRIMARY=//p' "$S"); if [ "$(sed -n "s/^STATE_$p=//p" "$S")" = good ]; then echo "$p"; fi ;;
  set-primary) sed -i -e "s/^PRIMARY=.*/PRIMARY=$2/" -e "s/^STATE_$2=.*/STATE_$2=good/" "$S" ;;
  get-state)   sed -n "s/^STATE_$2=//p" "$S" ;;
  set-state)   sed -i "s/^STATE_$2=.*/STATE_$2=$3/" "$S" ;;
  get-current) sed -n 's/^CURRENT=//p' "$S" ;;
  *) exit 1 ;;
esac
"#;

/// A RAUC system on a board: PKI, slots, bootloader state, private D-Bus and `rauc service`.
pub struct RaucDevice {
    pub board: Board,
    pub rig: PathBuf,
    dbus: Child,
    dbus_address: String,
    service: Option<Child>,
}

impl RaucDevice {
    pub fn new(healthy: bool) -> RaucDevice {
        super::debian_packages();
        let placeholder = Board::new("[installer]\ntype = \"rauc\"\n", "");
        let rig = placeholder.path().join("rig");
        for dir in ["ca", "images", "mnt", "data", "bundles"] {
            fs::create_dir_all(rig.join(dir)).unwrap();
        }
        make_pki(&rig.join("ca"));
        let mut slot_a = OLD.to_vec();
        slot_a.resize(SLOT_SIZE, 0);
        fs::write(rig.join("images/rootfs-0"), slot_a).unwrap();
        fs::write(rig.join("images/rootfs-1"), vec![0u8; SLOT_SIZE]).unwrap();
        placeholder.write_script("rig/custom-bootloader.sh", CUSTOM_BACKEND);
        fs::write(
            rig.join("bootstate"),
            "PRIMARY=A\nCURRENT=A\nSTATE_A=good\nSTATE_B=good\n",
        )
        .unwrap();
        fs::write(
            rig.join("system.conf"),
            format!(
                "[system]\ncompatible=sealed-ota-test\nbootloader=custom\ndata-directory={r}/data\n\n\
                 [keyring]\npath={r}/ca/ca.crt\ncheck-purpose=codesign\n\n\
                 [handlers]\nbootloader-custom-backend={r}/custom-bootloader.sh\n\n\
                 [slot.rootfs.0]\ndevice={r}/images/rootfs-0\ntype=raw\nbootname=A\n\n\
                 [slot.rootfs.1]\ndevice={r}/images/rootfs-1\ntype=raw\nbootname=B\n",
                r = rig.display()
            ),
        )
        .unwrap();
        // A private bus, as RAUC's own test suite runs it.
        let socket = rig.join("bus");
        let dbus_address = format!("unix:path={}", socket.display());
        let dbus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={dbus_address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian's dbus-daemon package)");
        wait_for(|| socket.exists(), "the private D-Bus socket");
        // The board's configuration, now that the bus address is known.
        let health = "[health_check]\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e \\\"$BOARD/unhealthy\\\"\"]\n";
        let installer = format!(
            "[installer]\ntype = \"rauc\"\n\n[installer.rauc]\ndbus_address = \"{dbus_address}\"\ntimeout_secs = 120\n"
        );
        let config = fs::read_to_string(placeholder.config()).unwrap().replace(
            "[installer]\ntype = \"rauc\"\n",
            &format!("{installer}\n{health}"),
        );
        fs::write(placeholder.config(), config).unwrap();
        if !healthy {
            fs::write(placeholder.path().join("unhealthy"), "").unwrap();
        }
        let mut device = RaucDevice {
            board: placeholder,
            rig,
            dbus,
            dbus_address,
            service: None,
        };
        device.start_service("A");
        device
    }

    fn start_service(&mut self, boot_slot: &str) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.rig.join("service.log"))
            .unwrap();
        let child = Command::new("rauc")
            .arg("service")
            .arg(format!("--conf={}", self.rig.join("system.conf").display()))
            .arg(format!("--mount={}", self.rig.join("mnt").display()))
            .arg(format!("--override-boot-slot={boot_slot}"))
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .env("DBUS_SESSION_BUS_ADDRESS", &self.dbus_address)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rauc (Debian's rauc package)");
        self.service = Some(child);
        wait_for(
            || {
                self.busctl(&[
                    "get-property",
                    "de.pengutronix.rauc",
                    "/",
                    "de.pengutronix.rauc.Installer",
                    "BootSlot",
                ])
                .is_some()
            },
            "rauc service on the bus",
        );
    }

    fn stop_service(&mut self) {
        if let Some(mut child) = self.service.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    pub fn busctl(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.dbus_address))
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn bootstate(&self, key: &str) -> String {
        fs::read_to_string(self.rig.join("bootstate"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    }

    /// Makes and signs a bundle with `rauc bundle`.
    pub fn bundle(&self, name: &str, compatible: &str, version: &str, image: &[u8]) -> PathBuf {
        let dir = self.rig.join("bundles").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("rootfs.img"), image).unwrap();
        fs::write(
            dir.join("manifest.raucm"),
            format!("[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.img\n"),
        )
        .unwrap();
        let out = self.rig.join("bundles").join(format!("{name}.raucb"));
        let ca = self.rig.join("ca");
        run(Command::new("rauc")
            .arg("bundle")
            .arg(format!("--cert={}", ca.join("signing.crt").display()))
            .arg(format!("--key={}", ca.join("signing.key").display()))
            .arg(&dir)
            .arg(&out));
        out
    }

    /// What runs: the booted slot's bootname and the start of its content.
    pub fn running(&self, len: usize) -> (String, Vec<u8>) {
        let booted = self.bootstate("CURRENT");
        let file = if booted == "A" {
            "rootfs-0"
        } else {
            "rootfs-1"
        };
        let bytes = fs::read(self.rig.join("images").join(file)).unwrap();
        (booted, bytes[..len].to_vec())
    }
}

impl super::Device for RaucDevice {
    fn board(&self) -> &Board {
        &self.board
    }

    /// The bootloader: the primary slot if it is good, else the other; RAUC restarts with it.
    fn power_cycle(&mut self) {
        self.stop_service();
        let primary = self.bootstate("PRIMARY");
        let other = if primary == "A" { "B" } else { "A" };
        let boot = if self.bootstate(&format!("STATE_{primary}")) == "good" {
            primary.clone()
        } else {
            other.to_string()
        };
        let state = fs::read_to_string(self.rig.join("bootstate")).unwrap();
        let state: String = state
            .lines()
            .map(|l| {
                if l.starts_with("CURRENT=") {
                    format!("CURRENT={boot}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        fs::write(self.rig.join("bootstate"), state).unwrap();
        self.board.new_boot_id();
        self.start_service(&boot);
    }
}

impl Drop for RaucDevice {
    fn drop(&mut self) {
        self.stop_service();
        let _ = Command::new("kill")
            .arg(self.dbus.id().to_string())
            .status();
        let _ = self.dbus.wait();
    }
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test CA and a code-signing certificate (RAUC's keyring checks `codesign` purpose).
fn make_pki(dir: &Path) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=sealed-ota rauc test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=sealed-ota rauc signer",
        "-keyout",
        &p("signing.key"),
        "-out",
        &p("signing.csr"),
    ]));
    fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n",
    )
    .unwrap();
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &p("signing.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p("leaf.ext"),
        "-out",
        &p("signing.crt"),
    ]));
}
