//! The `rauc` installer against the real RAUC from Debian: `rauc service` on a private D-Bus with
//! two file-backed raw slots (A, B) and RAUC's `custom` bootloader backend (a script keeping the
//! bootloader state in a file), bundles made and signed by `rauc bundle` here. The harness plays
//! the bootloader at each reboot: it boots the primary slot if it is good, else the other, and
//! restarts `rauc service` with `--override-boot-slot` (what a real boot would show RAUC).
//! Needs root (RAUC loop-mounts the bundle's squashfs). The rig is `support::rauc`.

mod support;

use std::fs;
use std::path::Path;

use support::rauc::{RaucDevice, OLD};
use support::{Crash, Device as _};

impl RaucDevice {
    fn install_args(bundle: &Path) -> Vec<String> {
        [
            "install",
            "--image",
            bundle.to_str().unwrap(),
            "--version",
            "2.0.0",
            "--id",
            "campaign-1",
        ]
        .map(String::from)
        .to_vec()
    }

    fn settle(&mut self, bundle: &Path, crash: Option<&Crash>, power_cut: bool) -> bool {
        let args = Self::install_args(bundle);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::settle(self, &args, crash, power_cut)
    }
}

fn new_image() -> Vec<u8> {
    let mut image = b"rootfs 2.0.0 ".to_vec();
    image.extend((0..200_000u32).map(|i| (i % 251) as u8));
    image
}

fn outcome(device: &RaucDevice) -> serde_json::Value {
    device.board.last_outcome().expect("a finished transaction")
}

#[test]
fn installs_reboots_into_the_new_slot_and_marks_it_good() {
    let mut device = RaucDevice::new(true);
    let image = new_image();
    let bundle = device.bundle("v2", "sealed-ota-test", "2.0.0", &image);
    device.settle(&bundle, None, false);
    assert_eq!(
        outcome(&device)["result"],
        "installed",
        "{:#}",
        device.board.journal()
    );
    assert_eq!(
        device.running(image.len()),
        ("B".to_string(), image.clone())
    );
    // Committed: B is primary and good (RAUC's `Mark good booted`), so it stays after a reboot.
    assert_eq!(device.bootstate("PRIMARY"), "B");
    assert_eq!(device.bootstate("STATE_B"), "good");
    let calls = fs::read_to_string(device.rig.join("bootstate.log")).unwrap();
    assert!(calls.contains("set-state B good"), "{calls}");
    device.power_cycle();
    assert_eq!(device.running(image.len()).0, "B");
    assert_eq!(device.board.journal()["running"]["version"], "2.0.0");
}

#[test]
fn a_failed_health_check_marks_the_new_slot_bad_and_boots_the_old_one() {
    let mut device = RaucDevice::new(false);
    let image = new_image();
    let bundle = device.bundle("v2", "sealed-ota-test", "2.0.0", &image);
    device.settle(&bundle, None, false);
    let outcome = outcome(&device);
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "health-check");
    assert_eq!(device.running(OLD.len()), ("A".to_string(), OLD.to_vec()));
    assert_eq!(device.bootstate("STATE_B"), "bad");
    assert_eq!(device.bootstate("PRIMARY"), "A");
    device.power_cycle();
    assert_eq!(
        device.running(OLD.len()).0,
        "A",
        "the rollback holds across a reboot"
    );
    assert!(
        device.board.journal()["running"].is_null(),
        "still the enrolment version"
    );
}

#[test]
fn a_bundle_for_another_device_is_refused_by_rauc() {
    let mut device = RaucDevice::new(true);
    let bundle = device.bundle("other", "another-device", "2.0.0", &new_image());
    device.settle(&bundle, None, false);
    let outcome = outcome(&device);
    assert_eq!(outcome["result"], "rolled-back", "{outcome:#}");
    assert_eq!(outcome["reason"]["step"], "install");
    let detail = outcome["reason"]["detail"].as_str().unwrap();
    assert!(
        detail.to_lowercase().contains("compatible mismatch"),
        "{detail}"
    );
    assert_eq!(device.running(OLD.len()), ("A".to_string(), OLD.to_vec()));
    assert_eq!(device.bootstate("PRIMARY"), "A");
}

/// SIGKILL at every step of a RAUC update (in the same boot, and with a power cut), including
/// while RAUC installs the bundle on its own: the outcome always matches the booted slot.
#[test]
fn sigkill_at_every_step_with_rauc() {
    let image = new_image();
    for healthy in [true, false] {
        let rollback = support::after("health-check", support::ROLLBACK_WITH_REBOOT);
        let phases = if healthy {
            support::INSTALL_WITH_REBOOT
        } else {
            &rollback[..]
        };
        let mut points = support::crash_points(phases, 0, 0);
        points.push(Crash::at("during:installing"));
        for crash in points {
            for power_cut in [false, true] {
                let mut device = RaucDevice::new(healthy);
                let bundle = device.bundle("v2", "sealed-ota-test", "2.0.0", &image);
                let fired = device.settle(&bundle, Some(&crash), power_cut);
                let context = format!(
                    "healthy={healthy} crash at {} power_cut={power_cut} fired={fired}",
                    crash.name()
                );
                let outcome = outcome(&device);
                let (booted, content) = match outcome["result"].as_str().unwrap() {
                    "installed" => ("B", image.clone()),
                    "rolled-back" => ("A", OLD.to_vec()),
                    other => panic!("{context}: outcome {other}: {outcome:#}"),
                };
                assert_eq!(
                    device.running(content.len()),
                    (booted.to_string(), content),
                    "{context}: {outcome:#}"
                );
                device.power_cycle();
                assert_eq!(
                    device.running(1).0,
                    booted,
                    "{context}: the outcome did not survive a reboot"
                );
                if !fired {
                    assert_eq!(
                        outcome["result"],
                        if healthy { "installed" } else { "rolled-back" },
                        "{context}"
                    );
                }
                let expected_fired =
                    crash.point != "after:rebooting" && crash.point != "after:rollback-rebooting";
                assert!(
                    fired || !expected_fired,
                    "{context}: the crash point never fired"
                );
            }
        }
    }
}
