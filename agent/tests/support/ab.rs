//! The A/B device of the command-hook tests: `fixtures/ab-hook.sh` (two image slots in files)
//! with the harness as its bootloader: a slot made primary for one try boots once; if it is not
//! committed by then, the next boot falls back to the other slot.

use std::fs;

use super::Board;

pub const OLD: &str = "firmware 1.0.0\n";
pub const NEW: &str = "firmware 2.0.0\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A/B: the new image runs after a reboot.
    Ab,
    /// In place: the new image runs at once.
    InPlace,
}

pub struct AbDevice {
    pub board: Board,
    pub mode: Mode,
    /// The next boot of a slot on trial hangs (a watchdog resets it): the bootloader falls back.
    pub hangs_on_next_try: bool,
}

impl AbDevice {
    /// A device running 1.0.0 from slot A, with `image-2.0.0` on its board; `healthy`: the
    /// health check passes.
    pub fn new(mode: Mode, healthy: bool) -> AbDevice {
        let hook = super::repo_root().join("agent/tests/fixtures/ab-hook.sh");
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
        AbDevice {
            board,
            mode,
            hangs_on_next_try: false,
        }
    }

    /// The bootloader state: booted slot, primary slot, tries.
    pub fn boot(&self) -> (String, String, u32) {
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
    pub fn running(&self) -> String {
        let (booted, _, _) = self.boot();
        fs::read_to_string(self.board.path().join(format!("slot-{booted}"))).unwrap()
    }
}

impl super::Device for AbDevice {
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
