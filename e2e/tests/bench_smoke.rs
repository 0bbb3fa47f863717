//! `make bench` in miniature: the benchmark binary against the test bed with a small fleet, so the
//! measurement machinery (relay baselines, campaign probes, summary) cannot rot between bench runs.
//! The figures of a run this small say nothing about most budgets; what is asserted holds at any
//! size: every chunk delivered, chunks published once for the fleet (egress within 1.05x), at
//! most two Device status writes per device, the paper's per-device encryption publishing more
//! than the product, and every key of the summary present.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use sealed_ota_e2e::product::build_binaries;
use sealed_ota_e2e::{repo_root, TestBed};

#[test]
fn the_benchmark_measures_a_small_fleet() -> Result<()> {
    let bed = TestBed::get()?;
    build_binaries()?;
    let out = repo_root().join("target/e2e-runs/bench-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_sealed-ota-bench"))
        .args([
            "--devices",
            "20",
            "--image-bytes",
            "131072",
            "--chunk-bytes",
            "16384",
        ])
        .args(["--scale-devices", "30", "--scale-image-bytes", "4096"])
        .arg("--out")
        .arg(&out)
        .arg("--protocol-json")
        .arg(out.join("absent.json"))
        .env("KUBECONFIG", &bed.kubeconfig)
        .current_dir(repo_root())
        .status()
        .context("running sealed-ota-bench")?;
    ensure!(status.success(), "sealed-ota-bench failed: {status}");
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("summary.json")).context("reading summary.json")?,
    )?;
    for key in [
        "fanout_ratio",
        "egress_ratio",
        "lost_chunks",
        "k8s_writes_per_device",
        "campaign_status_writes_per_second",
        "device_status_lag_seconds",
        "campaign_status_bytes",
        "rss_bytes_per_device",
        "pull_baseline_ratio",
        "paper_egress_ratio",
        "paper_wall_ratio",
        "device_work_ratio",
        "paper_stored_wall_ratio",
        "data_phase_cpu_ratio",
        "paper_stored_cpu_ratio",
        "paper_settled_cpu_ratio",
    ] {
        ensure!(summary[key].is_number(), "summary lacks {key}: {summary:#}");
    }
    ensure!(
        summary["lost_chunks"].as_f64() == Some(0.0),
        "chunks lost: {summary:#}"
    );
    ensure!(summary["fanout"]["installed"] == 20, "{summary:#}");
    ensure!(summary["scale"]["installed"] == 30, "{summary:#}");
    let writes = summary["k8s_writes_per_device"]
        .as_f64()
        .unwrap_or(f64::MAX);
    ensure!(writes <= 2.0, "{writes} Device status writes per device");
    // Chunks go out once for the fleet, not once per device.
    let egress = summary["egress_ratio"].as_f64().unwrap_or(f64::MAX);
    ensure!(egress <= 1.05, "egress ratio {egress}: {summary:#}");
    let paper = summary["paper_egress_ratio"].as_f64().unwrap_or(0.0);
    ensure!(
        paper > 1.0,
        "the paper's scheme published less than ours: {paper}"
    );
    // The baselines with device-side work opened, stored and checked every image.
    for round in ["pull_device_work_baseline", "paper_stored_baseline"] {
        ensure!(
            summary[round]["corrupt_messages"] == 0 && summary[round]["lost_messages"] == 0,
            "{round}: {summary:#}"
        );
    }
    ensure!(
        summary["fanout_ratio"].as_f64().is_some_and(|r| r > 0.0),
        "no fan-out figure: {summary:#}"
    );
    Ok(())
}
