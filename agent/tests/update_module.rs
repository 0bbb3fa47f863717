//! The `update-module` installer with real Mender Update Modules: the `single-file`, `directory`
//! and `script` modules Debian's `mender-client` ships (unchanged, from
//! /usr/share/mender/modules/v3), with artifacts made by Debian's `mender-artifact`; and a module of
//! our own (`fixtures/modules/sealed-ota-selftest`) that streams its payload, asks for a reboot and
//! fails its self-test after it, so the update is rolled back.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::Crash;

use support::modules::ModuleDevice;

impl ModuleDevice {
    fn install(&mut self, artifact: &Path, crash: Option<&Crash>, power_cut: bool) -> bool {
        let args = [
            "install",
            "--image",
            artifact.to_str().unwrap(),
            "--version",
            "2.0.0",
            "--id",
            "campaign-1",
        ];
        support::settle(self, &args, crash, power_cut)
    }

    fn outcome(&self) -> serde_json::Value {
        self.board.last_outcome().expect("a finished transaction")
    }

    fn module_log(&self) -> Vec<String> {
        fs::read_to_string(self.path("module.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

#[test]
fn single_file_installs_and_commits() {
    let mut device = ModuleDevice::debian(true);
    device.file("dest/app.conf", "version 1\n");
    let artifact = device.single_file_artifact("version 2\n");
    device.install(&artifact, None, false);
    assert_eq!(
        device.outcome()["result"],
        "installed",
        "{:#}",
        device.board.journal()
    );
    assert_eq!(
        fs::read_to_string(device.path("dest/app.conf")).unwrap(),
        "version 2\n"
    );
    let mode = fs::metadata(device.path("dest/app.conf"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640);
    assert!(
        !device.path("state/transactions/campaign-1").exists(),
        "the module work tree is removed after Cleanup"
    );
}

#[test]
fn single_file_rolls_back_on_a_failed_health_check() {
    let mut device = ModuleDevice::debian(false);
    device.file("dest/app.conf", "version 1\n");
    let artifact = device.single_file_artifact("version 2\n");
    device.install(&artifact, None, false);
    let outcome = device.outcome();
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "health-check");
    assert_eq!(
        fs::read_to_string(device.path("dest/app.conf")).unwrap(),
        "version 1\n"
    );
}

#[test]
fn directory_module_replaces_a_directory_and_rolls_back() {
    for healthy in [true, false] {
        let mut device = ModuleDevice::debian(healthy);
        device.file("dest/old.txt", "old\n");
        device.file("tree/new.txt", "new\n");
        let tar = device.path("update.tar");
        assert!(Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(device.path("tree"))
            .arg(".")
            .status()
            .unwrap()
            .success());
        let dest_dir = device.file("dest_dir", &format!("{}\n", device.path("dest").display()));
        let artifact = device.artifact("directory", "test-board", &[tar, dest_dir], "none");
        device.install(&artifact, None, false);
        let outcome = device.outcome();
        if healthy {
            assert_eq!(outcome["result"], "installed", "{outcome:#}");
            assert!(device.path("dest/new.txt").exists() && !device.path("dest/old.txt").exists());
        } else {
            assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
            assert!(!device.path("dest/new.txt").exists() && device.path("dest/old.txt").exists());
        }
    }
}

#[test]
fn script_module_runs_the_script_and_cannot_roll_back() {
    for healthy in [true, false] {
        let mut device = ModuleDevice::debian(healthy);
        let script = device.file(
            "run.sh",
            &format!("#!/bin/sh\necho ran > {}\n", device.path("ran").display()),
        );
        let artifact = device.artifact("script", "test-board", &[script], "gzip");
        device.install(&artifact, None, false);
        assert!(device.path("ran").exists(), "the script ran");
        let outcome = device.outcome();
        // The script module answers nothing to SupportsRollback (= No): a failed health check
        // cannot be undone, and the outcome says so instead of claiming a rollback.
        let expected = if healthy { "installed" } else { "failed" };
        assert_eq!(outcome["result"], expected, "{outcome:#}");
    }
}

#[test]
fn an_artifact_for_another_device_type_is_refused_before_any_change() {
    let mut device = ModuleDevice::debian(true);
    device.file("dest/app.conf", "version 1\n");
    let artifact = device.single_file_artifact_for("another-board", "version 2\n", "gzip");
    device.install(&artifact, None, false);
    let outcome = device.outcome();
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "prepare");
    assert!(outcome["reason"]["detail"]
        .as_str()
        .unwrap()
        .contains("another-board"));
    assert_eq!(
        fs::read_to_string(device.path("dest/app.conf")).unwrap(),
        "version 1\n"
    );
}

#[test]
fn an_artifact_whose_payload_does_not_match_its_manifest_is_refused() {
    let mut device = ModuleDevice::debian(true);
    device.file("dest/app.conf", "version 1\n");
    let artifact = device.single_file_artifact_for("test-board", "version 2\n", "none");
    // Rebuild the artifact with a payload file changed after mender-artifact hashed it.
    let x = device.path("x");
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&x)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fs::create_dir_all(x.join("d")).unwrap();
    sh(&format!(
        "tar -xf {} && tar -xf data/0000.tar -C d",
        artifact.display()
    ));
    fs::write(x.join("d/app.conf"), "version 3\n").unwrap();
    sh("tar -cf data/0000.tar -C d dest_dir filename permissions app.conf");
    sh(&format!(
        "tar -cf {} version manifest header.tar data/0000.tar",
        artifact.display()
    ));
    device.install(&artifact, None, false);
    let outcome = device.outcome();
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "prepare");
    assert!(
        outcome["reason"]["detail"]
            .as_str()
            .unwrap()
            .contains("data/0000/app.conf"),
        "{outcome:#}"
    );
    assert_eq!(
        fs::read_to_string(device.path("dest/app.conf")).unwrap(),
        "version 1\n"
    );
}

fn selftest_artifact(device: &ModuleDevice, passes: bool) -> PathBuf {
    let payload = device.file(
        "src/payload.bin",
        if passes {
            "app 2.0.0\nselftest=pass\n"
        } else {
            "app 2.0.0\nselftest=fail\n"
        },
    );
    device.artifact("sealed-ota-selftest", "test-board", &[payload], "gzip")
}

#[test]
fn our_module_streams_reboots_and_commits_when_its_self_test_passes() {
    let mut device = ModuleDevice::ours(true);
    device.file("app.bin", "app 1.0.0\n");
    let artifact = selftest_artifact(&device, true);
    device.install(&artifact, None, false);
    assert_eq!(
        device.outcome()["result"],
        "installed",
        "{:#}",
        device.board.journal()
    );
    assert_eq!(
        fs::read_to_string(device.path("app.bin")).unwrap(),
        "app 2.0.0\nselftest=pass\n"
    );
    assert_eq!(
        device.module_log(),
        [
            "SupportsRollback",
            "Download",
            "ArtifactInstall",
            "NeedsArtifactReboot",
            "ArtifactVerifyReboot",
            "ArtifactCommit",
            "Cleanup"
        ]
    );
}

#[test]
fn our_module_failing_its_self_test_after_the_reboot_is_rolled_back() {
    let mut device = ModuleDevice::ours(true);
    device.file("app.bin", "app 1.0.0\n");
    let artifact = selftest_artifact(&device, false);
    device.install(&artifact, None, false);
    let outcome = device.outcome();
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "verify-boot");
    assert!(
        outcome["reason"]["detail"]
            .as_str()
            .unwrap()
            .contains("self-test failed"),
        "{outcome:#}"
    );
    assert_eq!(
        fs::read_to_string(device.path("app.bin")).unwrap(),
        "app 1.0.0\n"
    );
    assert_eq!(
        device.module_log(),
        [
            "SupportsRollback",
            "Download",
            "ArtifactInstall",
            "NeedsArtifactReboot",
            "ArtifactVerifyReboot",
            "ArtifactRollback",
            "ArtifactVerifyRollbackReboot",
            "ArtifactFailure",
            "Cleanup"
        ]
    );
}

/// SIGKILL at every step (of `phases`, and the first journal writes of `processes` agent
/// processes), in the same boot and with a power cut: the outcome always matches the installed
/// file. `ours`: our module (reboots, self-test); else Debian's single-file (no reboot).
fn sigkill_at_every_step(ours: bool, healthy: bool, phases: &[&str], processes: usize) {
    for crash in support::crash_points(phases, processes, 4) {
        for power_cut in [false, true] {
            let mut device = if ours {
                ModuleDevice::ours(true)
            } else {
                ModuleDevice::debian(healthy)
            };
            let (dest, old) = if ours {
                ("app.bin", "app 1.0.0\n")
            } else {
                ("dest/app.conf", "version 1\n")
            };
            device.file(dest, old);
            let (artifact, new) = if ours {
                let new = if healthy {
                    "app 2.0.0\nselftest=pass\n"
                } else {
                    "app 2.0.0\nselftest=fail\n"
                };
                (selftest_artifact(&device, healthy), new)
            } else {
                (device.single_file_artifact("version 2\n"), "version 2\n")
            };
            let fired = device.install(&artifact, Some(&crash), power_cut);
            let context = format!(
                "ours={ours} healthy={healthy} crash at {} power_cut={power_cut} fired={fired}",
                crash.name()
            );
            let journal = device.board.journal();
            let result = journal["finished"]
                .as_array()
                .and_then(|f| f.last())
                .map_or("not-begun", |f| f["outcome"]["result"].as_str().unwrap())
                .to_string();
            let expected = match result.as_str() {
                "installed" => new,
                "rolled-back" | "not-begun" => old,
                other => panic!("{context}: outcome {other}: {journal:#}"),
            };
            assert_eq!(
                fs::read_to_string(device.path(dest)).unwrap(),
                expected,
                "{context}: {journal:#}"
            );
            if !fired {
                assert_eq!(
                    result,
                    if healthy { "installed" } else { "rolled-back" },
                    "{context}"
                );
            }
            // Every phase point is reached (journal writes past a process's last one are not).
            let reachable = crash.process.is_none()
                && !crash.point.starts_with("after:rebooting")
                && !crash.point.starts_with("after:rollback-rebooting");
            assert!(
                fired || !reachable,
                "{context}: the crash point never fired"
            );
        }
    }
}

#[test]
fn sigkill_at_every_step_our_module_passing() {
    sigkill_at_every_step(true, true, support::INSTALL_WITH_REBOOT, 2);
}

#[test]
fn sigkill_at_every_step_our_module_failing_its_self_test() {
    // The self-test fails in ArtifactVerifyReboot: the boot check, before any health check.
    let phases = support::after("verifying", support::ROLLBACK_WITH_REBOOT);
    sigkill_at_every_step(true, false, &phases, 3);
}

#[test]
fn sigkill_at_every_step_single_file_healthy() {
    sigkill_at_every_step(false, true, support::INSTALL_IN_PLACE, 1);
}

#[test]
fn sigkill_at_every_step_single_file_unhealthy() {
    let phases = support::after("health-check", support::ROLLBACK_IN_PLACE);
    sigkill_at_every_step(false, false, &phases, 1);
}
