//! The `command` installer driven end to end through the real binary, and the power-loss property:
//! the agent is stopped with SIGKILL at every step of the update transaction (the crash hook), then
//! restarted in the same boot or after a power cycle, until the transaction settles; the journaled
//! outcome must match what runs (`Installed` ⇒ the new image, `RolledBack` ⇒ the previous one), and
//! must still hold after one more reboot.
//!
//! The device is `support::ab` (`fixtures/ab-hook.sh`, two image slots in files, with this harness
//! as its bootloader).

mod support;

use std::collections::BTreeSet;
use std::fs;

use support::{Crash, Device as _};

use support::ab::{AbDevice as Device, Mode, NEW, OLD};

impl Device {
    fn settle(&mut self, crash: Option<&Crash>, power_cut: bool) -> bool {
        let image = self.board.path().join("image-2.0.0");
        let image = image.to_str().unwrap().to_string();
        let install = [
            "install",
            "--image",
            &image,
            "--version",
            "2.0.0",
            "--id",
            "campaign-1",
        ];
        support::settle(self, &install, crash, power_cut)
    }

    /// The outcome matches what runs, and still holds after another reboot.
    fn check_consistent(&mut self, context: &str) -> String {
        let journal = self.board.journal();
        let finished = journal["finished"].as_array().cloned().unwrap_or_default();
        let result = match finished.last() {
            // The crash came before the journal recorded the transaction: nothing was installed.
            None => "not-begun".to_string(),
            Some(f) => f["outcome"]["result"].as_str().unwrap().to_string(),
        };
        let expected_running = match result.as_str() {
            "installed" => NEW,
            "rolled-back" | "not-begun" => OLD,
            other => panic!("{context}: unexpected outcome {other}: {journal:#}"),
        };
        assert_eq!(
            self.running(),
            expected_running,
            "{context}: outcome {result} but the device runs otherwise: {journal:#}"
        );
        let version = journal["running"]["version"].as_str().unwrap_or("1.0.0");
        assert_eq!(
            version,
            if result == "installed" {
                "2.0.0"
            } else {
                "1.0.0"
            },
            "{context}"
        );
        self.power_cycle();
        assert_eq!(
            self.running(),
            expected_running,
            "{context}: the outcome did not survive a reboot"
        );
        assert!(
            !self
                .board
                .path()
                .join("state/transactions/campaign-1")
                .exists(),
            "{context}: the transaction's files were not removed"
        );
        result
    }
}

/// Every crash point, in the same boot and with a power cut; returns the points that fired.
fn every_crash_point(
    mode: Mode,
    healthy: bool,
    expected: &str,
    phases: &[&str],
    processes: usize,
) -> BTreeSet<String> {
    let mut fired = BTreeSet::new();
    for power_cut in [false, true] {
        for crash in support::crash_points(phases, processes, 5) {
            let mut device = Device::new(mode, healthy);
            let name = crash.name();
            let context =
                format!("{mode:?} healthy={healthy} crash at {name} power_cut={power_cut}");
            let this_fired = device.settle(Some(&crash), power_cut);
            if this_fired {
                fired.insert(name);
            }
            let result = device.check_consistent(&context);
            // Without a crash, the scenario's own outcome.
            if !this_fired {
                assert_eq!(result, expected, "{context}");
            }
        }
    }
    fired
}

fn assert_fired(fired: &BTreeSet<String>, phases: &[&str], processes: usize) {
    for phase in phases {
        for point in [format!("before:{phase}"), format!("after:{phase}")] {
            if point == "after:rebooting" || point == "after:rollback-rebooting" {
                // The reboot stops the agent before its request returns.
                continue;
            }
            assert!(
                fired.contains(&point),
                "crash point {point} never fired: {fired:?}"
            );
        }
    }
    for point in ["before:report", "after:report"] {
        assert!(
            fired.contains(point),
            "crash point {point} never fired: {fired:?}"
        );
    }
    for process in 1..=processes {
        for n in 1..=4 {
            let point = format!("p{process}:journal-rename#{n}");
            assert!(
                fired.contains(&point),
                "crash point {point} never fired: {fired:?}"
            );
        }
    }
}

#[test]
fn in_place_install_commits_after_the_health_check() {
    let mut device = Device::new(Mode::InPlace, true);
    device.settle(None, false);
    assert_eq!(device.check_consistent("in place"), "installed");
    let log = fs::read_to_string(device.board.path().join("hook.log")).unwrap();
    let actions: Vec<&str> = log.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(actions, ["install", "commit", "cleanup"]);
}

#[test]
fn a_failed_health_check_rolls_back_in_place() {
    let mut device = Device::new(Mode::InPlace, false);
    device.settle(None, false);
    assert_eq!(
        device.check_consistent("in place, unhealthy"),
        "rolled-back"
    );
    let outcome = device.board.last_outcome().unwrap();
    assert_eq!(outcome["reason"]["step"], "health-check");
    let log = fs::read_to_string(device.board.path().join("hook.log")).unwrap();
    let actions: Vec<&str> = log.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(actions, ["install", "rollback", "failure", "cleanup"]);
}

#[test]
fn ab_install_reboots_verifies_and_commits() {
    let mut device = Device::new(Mode::Ab, true);
    device.settle(None, false);
    assert_eq!(device.check_consistent("ab"), "installed");
    let (booted, primary, trying) = device.boot();
    assert_eq!((booted.as_str(), primary.as_str(), trying), ("b", "b", 0));
}

#[test]
fn ab_unhealthy_image_is_rolled_back_through_a_reboot() {
    let mut device = Device::new(Mode::Ab, false);
    device.settle(None, false);
    assert_eq!(device.check_consistent("ab, unhealthy"), "rolled-back");
    let log = fs::read_to_string(device.board.path().join("hook.log")).unwrap();
    let actions: Vec<&str> = log.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "install",
            "verify",
            "rollback",
            "verify-rollback",
            "failure",
            "cleanup"
        ]
    );
}

#[test]
fn ab_bootloader_fallback_is_caught_and_reported() {
    let mut device = Device::new(Mode::Ab, true);
    // The new image "fails to boot": its one try ends in a reset, the bootloader falls back.
    device.hangs_on_next_try = true;
    device.settle(None, false);
    assert_eq!(device.check_consistent("fallback"), "rolled-back");
    let outcome = device.board.last_outcome().unwrap();
    assert_eq!(outcome["reason"]["step"], "verify-boot", "{outcome:#}");
}

#[test]
fn a_reboot_that_never_comes_is_retried_then_rolled_back() {
    let mut device = Device::new(Mode::Ab, true);
    let config = fs::read_to_string(device.board.config()).unwrap();
    let config = config
        .replace(
            &format!(
                "command = [\"{}/reboot.sh\"]",
                device.board.path().display()
            ),
            "command = [\"/bin/true\"]",
        )
        .replace("wait_secs = 30", "wait_secs = 1");
    fs::write(device.board.config(), config).unwrap();
    device.settle(None, false);
    assert_eq!(device.check_consistent("no reboot"), "rolled-back");
    let outcome = device.board.last_outcome().unwrap();
    assert_eq!(outcome["reason"]["step"], "reboot", "{outcome:#}");
}

fn sigkill_at_every_step(
    mode: Mode,
    healthy: bool,
    expected: &str,
    phases: &[&str],
    processes: usize,
) {
    let fired = every_crash_point(mode, healthy, expected, phases, processes);
    assert_fired(&fired, phases, processes);
}

#[test]
fn sigkill_at_every_step_in_place_healthy() {
    sigkill_at_every_step(
        Mode::InPlace,
        true,
        "installed",
        support::INSTALL_IN_PLACE,
        1,
    );
}

#[test]
fn sigkill_at_every_step_in_place_unhealthy() {
    let phases = support::after("health-check", support::ROLLBACK_IN_PLACE);
    sigkill_at_every_step(Mode::InPlace, false, "rolled-back", &phases, 1);
}

#[test]
fn sigkill_at_every_step_ab_healthy() {
    sigkill_at_every_step(Mode::Ab, true, "installed", support::INSTALL_WITH_REBOOT, 2);
}

#[test]
fn sigkill_at_every_step_ab_unhealthy() {
    let phases = support::after("health-check", support::ROLLBACK_WITH_REBOOT);
    sigkill_at_every_step(Mode::Ab, false, "rolled-back", &phases, 3);
}
