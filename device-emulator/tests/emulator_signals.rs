//! `run` stops cleanly on SIGTERM (what Kubernetes sends to a pod) exactly as on Ctrl-C: every
//! device saves its state and the JSON summary is printed. No broker needed: the devices keep
//! retrying an address where nothing listens.
#![cfg(unix)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_sealed-ota-device-emulator");

fn stops_cleanly_on(signal: &str) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fleet = tmp.path().join("fleet");
    let enroll = Command::new(BIN)
        .arg("enroll")
        .arg("--fleet")
        .arg(&fleet)
        .args(["--count", "2"])
        .output()?;
    if !enroll.status.success() {
        bail!("enroll failed: {}", String::from_utf8_lossy(&enroll.stderr));
    }
    // Port 1 on loopback: connections are refused at once, devices back off and retry.
    let child = Command::new(BIN)
        .args([
            "run",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--json",
            "--no-progress",
        ])
        .arg("--fleet")
        .arg(&fleet)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()?;
    assert!(status.success(), "kill {signal} failed");
    let started = Instant::now();
    let out = child.wait_with_output()?;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?} to stop",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "run exited with {:?} on {signal}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("summary: {}", String::from_utf8_lossy(&out.stdout)))?;
    assert!(summary.is_object(), "{summary}");
    for entry in std::fs::read_dir(fleet.join("devices"))? {
        let dir = entry?.path();
        assert!(
            dir.join("state.json").exists(),
            "{} saved no state on {signal}",
            dir.display()
        );
    }
    Ok(())
}

#[test]
fn run_stops_cleanly_on_sigterm() -> Result<()> {
    stops_cleanly_on("-TERM")
}

#[test]
fn run_stops_cleanly_on_sigint() -> Result<()> {
    stops_cleanly_on("-INT")
}
