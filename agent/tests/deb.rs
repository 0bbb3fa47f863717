//! The Debian package: built by cargo-deb (the project's pinned copy, from the debug binary this
//! test run built; `make agent-deb` builds the release one), installed with `dpkg --root` into a
//! scratch root that holds Debian's systemd units (copied from the host's `systemd` package) and a
//! dpkg database that knows libc6; then `systemd-analyze verify` checks the unit (any warning
//! fails), `systemd-analyze security` bounds its exposure, and the installed binary's `--help` and
//! `check-config` run against the packaged example configuration.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn build_deb(out_dir: &Path) -> PathBuf {
    let script = support::repo_root().join("scripts/cargo-deb-install.sh");
    let cargo_deb = String::from_utf8(run(&mut Command::new(&script)).stdout).unwrap();
    // The binary of this test run: <target>/debug/sealed-ota-agent.
    let target_dir = Path::new(support::agent_bin())
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    run(Command::new(cargo_deb.trim())
        .args([
            "-p",
            "sealed-ota-agent",
            "--profile",
            "dev",
            "--no-build",
            "--no-strip",
            "--fast",
            "--locked",
            "-o",
        ])
        .arg(out_dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(support::repo_root()));
    let deb = fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo-deb wrote a .deb");
    deb
}

/// A root with a dpkg database that knows the host's libc6 (the package's only dependency) and
/// the unit files of the host's `systemd` package.
fn scratch_root(root: &Path) {
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir)).unwrap();
    }
    let status = fs::read_to_string("/var/lib/dpkg/status").unwrap();
    let libc6: Vec<&str> = status
        .split("\n\n")
        .filter(|stanza| stanza.starts_with("Package: libc6\n"))
        .collect();
    assert_eq!(libc6.len(), 1, "the host's dpkg status lists libc6 once");
    fs::write(admin.join("status"), format!("{}\n\n", libc6[0])).unwrap();
    let files =
        String::from_utf8(run(Command::new("dpkg").args(["-L", "systemd"])).stdout).unwrap();
    for file in files
        .lines()
        .filter(|f| f.starts_with("/lib/systemd/system/"))
    {
        let source = Path::new(file);
        if source.is_dir() {
            continue;
        }
        let dest = root.join(file.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        run(Command::new("cp").arg("-a").arg(source).arg(&dest));
    }
}

#[test]
fn the_package_installs_and_its_unit_verifies() {
    support::debian_packages();
    let work = tempfile::Builder::new()
        .prefix("agent-deb-")
        .tempdir()
        .unwrap();
    let deb = build_deb(&work.path().join("out"));
    let info = String::from_utf8(run(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout).unwrap();
    assert!(info.contains("Package: sealed-ota-agent"), "{info}");
    assert!(info.contains("Depends: libc6"), "{info}");

    let root = work.path().join("root");
    scratch_root(&root);
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg("-i")
        .arg(&deb));
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "sealed-ota-agent"]));
    assert!(String::from_utf8_lossy(&status.stdout).contains("Status: install ok installed"));
    for file in [
        "usr/bin/sealed-ota-agent",
        "lib/systemd/system/sealed-ota-agent.service",
        "usr/share/doc/sealed-ota-agent/agent.toml.example",
        "usr/share/doc/sealed-ota-agent/README.md",
    ] {
        assert!(root.join(file).is_file(), "{file} is not installed");
    }

    // The unit: no error, no warning (verify reports unknown keys and bad values as warnings).
    let verify = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .args(["verify", "sealed-ota-agent.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    // Hardening that does not regress unnoticed: systemd's exposure score (0-10) stays below 4.5.
    run(Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .args([
            "security",
            "--offline=true",
            "--threshold=45",
            "sealed-ota-agent.service",
        ]));

    // The installed binary: a man-page-like help, and the packaged example parses (check-config
    // then reports the files a real device must provide, by field).
    let agent = root.join("usr/bin/sealed-ota-agent");
    let help = String::from_utf8(run(Command::new(&agent).arg("--help")).stdout).unwrap();
    for section in [
        "FILES",
        "ENVIRONMENT",
        "EXIT STATUS",
        "check-config",
        "keygen",
        "SEE ALSO",
    ] {
        assert!(help.contains(section), "--help lacks {section}:\n{help}");
    }
    let example = root.join("usr/share/doc/sealed-ota-agent/agent.toml.example");
    let check = Command::new(&agent)
        .arg("--config")
        .arg(&example)
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("device.key_file: cannot read"), "{stderr}");
    assert!(!stderr.contains("TOML parse error"), "{stderr}");
}
