//! The `command` installer driven end to end through the real binary, and the power-loss property:
//! the agent is stopped with SIGKILL at every step of the update transaction (the crash hook), then
//! restarted in the same boot or after a power cycle, until the transaction settles; the journaled
//! outcome must match what runs (`Installed` ⇒ the new image, `RolledBack` ⇒ the previous one), and
//! must still hold after one more reboot.
//!
//! The device is `fixtures/ab-hook.sh` (two image slots in files) with this harness as its
//! bootloader: a slot made primary for one try boots once; if it is not committed by then, the next
//! boot falls back to the other slot.

mod support;

use std::collections::BTreeSet;
use std::fs;

use support::{Board, Crash, Device as _};

const OLD: &str = "firmware 1.0.0\n";
const NEW: &str = "firmware 2.0.0\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A/B: the new image runs after a reboot.
    Ab,
    /// In place: the new image runs at once.
    InPlace,
}

struct Device {
    board: Board,
    mode: Mode,
    /// The next boot of a slot on trial hangs (a watchdog resets it): the bootloader falls back.
    hangs_on_next_try: bool,
}

impl Device {
    fn new(mode: Mode, healthy: bool) -> Device {
        let hook = support::repo_root().join("agent/tests/fixtures/ab-hook.sh");
        let installer = format!(
            "[installer]\ntype = \"command\"\n\n[installer.command]\npath = \"{}\"\nreboot = {}\ntimeout_secs = 30\n",
            hook.display(),
            mode == Mode::Ab
        );
        let board = Board::new(
            &installer,
            "[health_check]\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e \\\"$BOARD/unhealthy\\\"\"]\ntimeout_secs = 30\n",
        );
        let root = board.path();
        fs::write(root.join("slot-a"), OLD).unwrap();
        fs::write(root.join("boot.env"), "BOOTED=a\nPRIMARY=a\nTRYING=0\n").unwrap();
        fs::write(root.join("image-2.0.0"), NEW).unwrap();
        if !healthy {
            fs::write(root.join("unhealthy"), "").unwrap();
        }
        Device {
            board,
            mode,
            hangs_on_next_try: false,
        }
    }

    fn boot(&self) -> (String, String, u32) {
        let text = fs::read_to_string(self.board.path().join("boot.env")).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_string()
        };
        (
            get("BOOTED"),
            get("PRIMARY"),
            get("TRYING").parse().unwrap(),
        )
    }

    /// What runs: the content of the booted slot.
    fn running(&self) -> String {
        let (booted, _, _) = self.boot();
        fs::read_to_string(self.board.path().join(format!("slot-{booted}"))).unwrap()
    }
}

impl support::Device for Device {
    fn board(&self) -> &Board {
        &self.board
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "MODE",
            if self.mode == Mode::Ab {
                "ab"
            } else {
                "inplace"
            }
            .to_string(),
        )]
    }

    /// A reboot: the harness is the bootloader (see the module doc), and the boot id changes.
    fn power_cycle(&mut self) {
        let (_, mut primary, trying) = self.boot();
        let other = |s: &str| {
            if s == "a" {
                "b".to_string()
            } else {
                "a".to_string()
            }
        };
        let (booted, trying) = match trying {
            1 if self.hangs_on_next_try => {
                self.hangs_on_next_try = false;
                primary = other(&primary);
                (primary.clone(), 0)
            }
            1 => (primary.clone(), 2),
            2 => {
                primary = other(&primary);
                (primary.clone(), 0)
            }
            _ => (primary.clone(), 0),
        };
        fs::write(
            self.board.path().join("boot.env"),
            format!("BOOTED={booted}\nPRIMARY={primary}\nTRYING={trying}\n"),
        )
        .unwrap();
        self.board.new_boot_id();
    }
}

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
