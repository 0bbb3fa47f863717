//! A device for the update-module tests: a board whose installer is Mender Update Modules from a
//! directory (Debian's `mender-client` modules, or our own fixtures), and artifacts made with
//! Debian's `mender-artifact`. No bootloader to play: a reboot only changes the boot id.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Board;

pub const DEBIAN_MODULES: &str = "/usr/share/mender/modules/v3";

pub struct ModuleDevice {
    pub board: Board,
}

impl super::Device for ModuleDevice {
    fn board(&self) -> &Board {
        &self.board
    }

    /// No bootloader to play: a reboot only changes the boot id.
    fn power_cycle(&mut self) {
        self.board.new_boot_id();
    }
}

impl ModuleDevice {
    pub fn new(modules_dir: &Path, healthy: bool) -> ModuleDevice {
        super::debian_packages();
        let installer = format!(
            "[installer]\ntype = \"update-module\"\n\n[installer.update-module]\nmodules_dir = \"{}\"\ndevice_type = \"test-board\"\ntimeout_secs = 60\n",
            modules_dir.display()
        );
        let board = Board::new(
            &installer,
            "[health_check]\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e \\\"$BOARD/unhealthy\\\"\"]\n",
        );
        if !healthy {
            fs::write(board.path().join("unhealthy"), "").unwrap();
        }
        ModuleDevice { board }
    }

    pub fn debian(healthy: bool) -> ModuleDevice {
        Self::new(Path::new(DEBIAN_MODULES), healthy)
    }

    pub fn ours(healthy: bool) -> ModuleDevice {
        Self::new(
            &super::repo_root().join("agent/tests/fixtures/modules"),
            healthy,
        )
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.board.path().join(name)
    }

    /// `mender-artifact write module-image` with these payload files.
    pub fn artifact(
        &self,
        kind: &str,
        device_type: &str,
        files: &[PathBuf],
        compression: &str,
    ) -> PathBuf {
        let out = self.path(&format!("{kind}.mender"));
        let mut cmd = Command::new("mender-artifact");
        cmd.args([
            "write",
            "module-image",
            "-T",
            kind,
            "-t",
            device_type,
            "-n",
            "art-2.0.0",
        ])
        .args(["--compression", compression, "-o"])
        .arg(&out);
        for f in files {
            cmd.arg("-f").arg(f);
        }
        let status = cmd.output().unwrap();
        assert!(
            status.status.success(),
            "mender-artifact: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        out
    }

    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.path(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        path
    }

    /// A `single-file` artifact installing `content` as `<board>/dest/app.conf`, mode 640.
    pub fn single_file_artifact(&self, content: &str) -> PathBuf {
        self.single_file_artifact_for("test-board", content, "gzip")
    }

    pub fn single_file_artifact_for(
        &self,
        device_type: &str,
        content: &str,
        compression: &str,
    ) -> PathBuf {
        let dir = self.path("payload");
        let files = [
            self.file(
                "payload/dest_dir",
                &format!("{}\n", self.path("dest").display()),
            ),
            self.file("payload/filename", "app.conf\n"),
            self.file("payload/permissions", "640\n"),
            self.file("payload/app.conf", content),
        ];
        let artifact = self.artifact("single-file", device_type, &files, compression);
        fs::remove_dir_all(dir).unwrap();
        artifact
    }
}
