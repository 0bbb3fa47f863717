//! The `update-module` backend: Mender Update Modules (protocol v3), so every existing module works
//! unchanged. It owns the module's work tree (`<work_dir>/payloads/0000/tree`, laid out as the Mender
//! client lays it: `version`, `current_artifact_name`, `current_artifact_group`,
//! `current_device_type`, `header/…`, `tmp/`, then `files/` or the `stream-next` streams), which
//! module runs (`<modules_dir>/<payload type>`), and the mapping of transaction steps to module
//! states: prepare = `SupportsRollback` + `Download`; install = `ArtifactInstall` +
//! `NeedsArtifactReboot`; `ArtifactReboot` / `ArtifactRollbackReboot` when the module answered
//! `Yes` (on `Automatic` the agent reboots the system); `ArtifactVerifyReboot`,
//! `ArtifactVerifyRollbackReboot`, `ArtifactCommit`, `ArtifactRollback`, `ArtifactFailure`,
//! `Cleanup`. The work tree lives as long as the transaction, so `tmp/` (where modules keep their
//! backups) survives reboots.
//!
//! `current_artifact_name` holds the version the device runs (the agent's name for what runs).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use super::mender_artifact::{self, ArtifactError, Header};
use super::{Installed, Installer, InstallerError, Prepared, StepContext, Towards};
use crate::config::UpdateModuleConfig;
use crate::durable;
use crate::process::{Program, Running};
use crate::transaction::RebootBy;

/// The update-module backend.
#[derive(Debug)]
pub struct UpdateModule {
    config: UpdateModuleConfig,
    running_version: String,
}

impl From<ArtifactError> for InstallerError {
    fn from(e: ArtifactError) -> Self {
        InstallerError::Image(e.to_string())
    }
}

fn io_err(what: &str, path: &Path, e: io::Error) -> InstallerError {
    InstallerError::Image(format!("{what} {}: {e}", path.display()))
}

impl UpdateModule {
    /// The backend as configured; `running_version` fills `current_artifact_name`.
    pub fn new(config: UpdateModuleConfig, running_version: String) -> Self {
        UpdateModule {
            config,
            running_version,
        }
    }

    fn tree(step: &StepContext<'_>) -> PathBuf {
        step.work_dir.join("payloads/0000/tree")
    }

    /// The module for the tree's payload type.
    fn module(&self, tree: &Path) -> Result<PathBuf, InstallerError> {
        let kind_file = tree.join("header/payload_type");
        let kind = fs::read_to_string(&kind_file).map_err(|e| io_err("reading", &kind_file, e))?;
        let module = self.config.modules_dir.join(kind.trim());
        let executable =
            fs::metadata(&module).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            Ok(module)
        } else {
            Err(InstallerError::Image(format!(
                "no update module for payload type {:?}: {} is missing or not executable",
                kind.trim(),
                module.display()
            )))
        }
    }

    fn program(&self, module: &Path, state: &str, tree: &Path) -> Program {
        Program::new(
            format!("module {} {state}", module.display()),
            [module.as_os_str()],
        )
        .arg(state)
        .arg(tree)
        .cwd(tree)
        .timeout(Duration::from_secs(self.config.timeout_secs))
    }

    /// Runs the module in `state`; returns its trimmed stdout.
    fn call(&self, step: &StepContext<'_>, state: &str) -> Result<String, InstallerError> {
        let tree = Self::tree(step);
        let module = self.module(&tree)?;
        let out = self.program(&module, state, &tree).run()?;
        Ok(out.stdout.trim().to_string())
    }

    fn write_tree(&self, tree: &Path, header: &Header) -> Result<(), InstallerError> {
        durable::remove_all(tree)?;
        for dir in ["header", "tmp"] {
            let path = tree.join(dir);
            fs::create_dir_all(&path).map_err(|e| io_err("creating", &path, e))?;
        }
        let line = |s: &str| format!("{s}\n").into_bytes();
        let files: [(&str, Vec<u8>); 10] = [
            ("version", line("3")),
            ("current_artifact_name", line(&self.running_version)),
            ("current_artifact_group", Vec::new()),
            ("current_device_type", line(&self.config.device_type)),
            (
                "header/artifact_name",
                header.artifact_name.clone().into_bytes(),
            ),
            (
                "header/artifact_group",
                header.artifact_group.clone().into_bytes(),
            ),
            (
                "header/payload_type",
                header.payload_type.clone().into_bytes(),
            ),
            ("header/header-info", header.header_info.clone()),
            ("header/type-info", header.type_info.clone()),
            ("header/meta-data", header.meta_data.clone()),
        ];
        for (name, bytes) in files {
            let path = tree.join(name);
            fs::write(&path, bytes).map_err(|e| io_err("writing", &path, e))?;
        }
        // Like Mender: the tree is complete on disk before the module sees it.
        rustix::fs::sync();
        Ok(())
    }

    /// The `Download` state: the module may take the payload as streams through `stream-next`;
    /// if it exits without opening it, the payload files go to `files/` (Mender's rule).
    fn download(&self, step: &StepContext<'_>, header: &Header) -> Result<(), InstallerError> {
        let tree = Self::tree(step);
        let module = self.module(&tree)?;
        let stream_next = tree.join("stream-next");
        mkfifo(&stream_next)?;
        let mut child = self.program(&module, "Download", &tree).spawn()?;
        let streamed = match open_for_writer(&stream_next, &mut child) {
            Ok(Some(first)) => self.stream(&tree, step.image, header, first, &mut child),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        let streamed = match streamed {
            Ok(streamed) => streamed,
            Err(e) => {
                child.kill();
                return Err(e);
            }
        };
        child.wait()?;
        durable::remove_all(&stream_next)?;
        durable::remove_all(&tree.join("streams"))?;
        if !streamed {
            let files = tree.join("files");
            fs::create_dir_all(&files).map_err(|e| io_err("creating", &files, e))?;
            mender_artifact::for_each_payload_file(step.image, header, |name, _size, reader| {
                let path = files.join(name);
                let mut out = File::create(&path)?;
                io::copy(reader, &mut out)?;
                out.sync_all()
            })?;
            durable::sync_dir(&files)?;
        }
        Ok(())
    }

    /// Feeds every payload file through its own FIFO, announced on `stream-next`.
    fn stream(
        &self,
        tree: &Path,
        image: &Path,
        header: &Header,
        first: File,
        child: &mut Running,
    ) -> Result<bool, InstallerError> {
        let streams = tree.join("streams");
        fs::create_dir_all(&streams).map_err(|e| io_err("creating", &streams, e))?;
        let stream_next = tree.join("stream-next");
        let mut announce = Some(first);
        let mut failure: Option<InstallerError> = None;
        let result =
            mender_artifact::for_each_payload_file(image, header, |name, _size, reader| {
                let fifo = streams.join(name);
                let step = (|| {
                    mkfifo(&fifo)?;
                    let mut next = match announce.take() {
                        Some(next) => next,
                        None => open_for_writer(&stream_next, child)?
                            .ok_or_else(|| module_gone("before reading the next stream name"))?,
                    };
                    next.write_all(format!("streams/{name}\n").as_bytes())
                        .map_err(|e| io_err("writing", &stream_next, e))?;
                    drop(next);
                    let mut out = open_for_writer(&fifo, child)?
                        .ok_or_else(|| module_gone("before opening its stream"))?;
                    io::copy(reader, &mut out).map_err(|e| io_err("streaming into", &fifo, e))?;
                    Ok(())
                })();
                step.map_err(|e: InstallerError| {
                    failure = Some(e);
                    io::Error::other("streaming stopped")
                })
            });
        if let Some(e) = failure {
            return Err(e);
        }
        result?;
        // An empty entry ends the list.
        if let Some(end) = open_for_writer(&stream_next, child)? {
            drop(end);
        }
        Ok(true)
    }
}

impl UpdateModule {
    fn needs_reboot(&self, step: &StepContext<'_>) -> Result<Option<RebootBy>, InstallerError> {
        match self.call(step, "NeedsArtifactReboot")?.as_str() {
            "" | "No" => Ok(None),
            "Yes" => Ok(Some(RebootBy::Installer)),
            "Automatic" => Ok(Some(RebootBy::System)),
            other => Err(InstallerError::Image(format!(
                "the update module answered {other:?} to NeedsArtifactReboot (expected Yes, No or Automatic)"
            ))),
        }
    }
}

fn module_gone(when: &str) -> InstallerError {
    InstallerError::Image(format!("the update module exited {when} during Download"))
}

fn mkfifo(path: &Path) -> Result<(), InstallerError> {
    let _ = fs::remove_file(path);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .map_err(|e| io_err("creating FIFO", path, e.into()))
}

/// Opens a FIFO for writing once the module opens it for reading; `None` if the module exits
/// first (or times out, which `Running::wait` then reports).
fn open_for_writer(path: &Path, child: &mut Running) -> Result<Option<File>, InstallerError> {
    use rustix::fs::OFlags;
    loop {
        match rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => {
                rustix::fs::fcntl_setfl(&fd, OFlags::empty())
                    .map_err(|e| io_err("configuring", path, e.into()))?;
                return Ok(Some(File::from(fd)));
            }
            Err(rustix::io::Errno::NXIO) => {
                if !child.is_running() || child.timed_out() {
                    return Ok(None);
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("opening", path, e.into())),
        }
    }
}

fn yes_no(state: &str, answer: &str) -> Result<bool, InstallerError> {
    match answer {
        "" | "No" => Ok(false),
        "Yes" => Ok(true),
        other => Err(InstallerError::Image(format!(
            "the update module answered {other:?} to {state} (expected Yes or No)"
        ))),
    }
}

impl Installer for UpdateModule {
    fn kind(&self) -> &'static str {
        "update-module"
    }

    fn prepare(&mut self, step: &StepContext<'_>) -> Result<Prepared, InstallerError> {
        let header = mender_artifact::read_header(step.image)?;
        if !header
            .device_types
            .iter()
            .any(|t| t == &self.config.device_type)
        {
            return Err(InstallerError::Image(format!(
                "the artifact is for device types {:?}; this device is {:?} (installer.device_type)",
                header.device_types, self.config.device_type
            )));
        }
        let tree = Self::tree(step);
        self.write_tree(&tree, &header)?;
        let supports_rollback = yes_no("SupportsRollback", &self.call(step, "SupportsRollback")?)?;
        self.download(step, &header)?;
        Ok(Prepared {
            supports_rollback,
            booted_slot: None,
        })
    }

    fn install(
        &mut self,
        step: &StepContext<'_>,
        progress: &mut dyn FnMut(u8, &str),
    ) -> Result<Installed, InstallerError> {
        progress(0, "ArtifactInstall");
        self.call(step, "ArtifactInstall")?;
        progress(100, "ArtifactInstall done");
        let reboot = self.needs_reboot(step)?;
        Ok(Installed {
            reboot,
            target_slot: None,
        })
    }

    fn reboot(&mut self, step: &StepContext<'_>, towards: Towards) -> Result<(), InstallerError> {
        let state = match towards {
            Towards::New => "ArtifactReboot",
            Towards::Previous => "ArtifactRollbackReboot",
        };
        self.call(step, state).map(drop)
    }

    fn verify_boot(
        &mut self,
        step: &StepContext<'_>,
        towards: Towards,
    ) -> Result<(), InstallerError> {
        let state = match towards {
            Towards::New => "ArtifactVerifyReboot",
            Towards::Previous => "ArtifactVerifyRollbackReboot",
        };
        self.call(step, state).map(drop)
    }

    fn commit(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        self.call(step, "ArtifactCommit").map(drop)
    }

    fn rollback(&mut self, step: &StepContext<'_>) -> Result<Option<RebootBy>, InstallerError> {
        self.call(step, "ArtifactRollback")?;
        // As the Mender client: a module that needed a reboot into the update needs one back
        // (`ArtifactRollbackReboot`), once the system booted since the install began. An install
        // interrupted before `NeedsArtifactReboot` was asked is asked now.
        if !step.transaction.rebooted {
            return Ok(None);
        }
        match step.transaction.reboot {
            Some(by) => Ok(Some(by)),
            None => self.needs_reboot(step),
        }
    }

    fn failure(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        self.call(step, "ArtifactFailure").map(drop)
    }

    fn cleanup(&mut self, step: &StepContext<'_>) -> Result<(), InstallerError> {
        let tree = Self::tree(step);
        // Preparation may have failed before the tree existed: then no module ever ran.
        let result = if tree.join("header/payload_type").is_file() {
            self.call(step, "Cleanup").map(drop)
        } else {
            Ok(())
        };
        durable::remove_all(&tree)?;
        result
    }
}
