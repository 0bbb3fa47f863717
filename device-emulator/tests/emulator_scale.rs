//! Scale measurement, run by hand (ignored by default): N emulated devices (default 1,000)
//! connect to the test bed's Mosquitto over TLS and install one firmware campaign from a manager
//! played by the test. Prints connect time, campaign time and memory per device.
//!
//! `EMULATOR_SCALE_DEVICES=10000 EMULATOR_SCALE_IMAGE_KIB=16 cargo test --release \
//!   -p sealed-ota-device-emulator --test emulator_scale -- --ignored --nocapture`

mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use sealed_ota_device_emulator::fleet::RunningFleet;
use sealed_ota_e2e::TestBed;
use support::{enroll_fleet, firmware, fleet_options, testbed_ca, unique, TestManager};

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, minutes long: run by hand with --ignored --nocapture"]
async fn fleet_connects_and_installs_a_campaign_at_scale() -> Result<()> {
    let devices = env_number("EMULATOR_SCALE_DEVICES", 1000);
    let image_kib = env_number("EMULATOR_SCALE_IMAGE_KIB", 64);
    let bed = TestBed::get()?;
    let ca = testbed_ca(bed)?;
    let tmp = tempfile::tempdir()?;
    let manager_id = unique("mgr");
    let (fleet, ids) = enroll_fleet(
        &ca,
        &tmp.path().join("fleet"),
        &unique("s"),
        &manager_id,
        devices,
    )?;
    let mut manager = TestManager::connect(bed, &ca, &manager_id, tmp.path()).await?;
    let mut options = fleet_options(bed, fleet)?;
    options.connect_rate = 1000.0;
    options.max_connecting = 128;
    options.window = 8;
    options.window_timeout = 30;
    options.save_every_chunks = 16;
    let running = RunningFleet::start(options)?;
    let stats = std::sync::Arc::clone(running.stats());
    let wait = Duration::from_secs(u64::from(devices) / 50 + 60);
    sealed_ota_e2e::wait_for("every device connected", wait, || {
        let stats = std::sync::Arc::clone(&stats);
        async move { Ok((stats.ever_connected() == u64::from(devices)).then_some(())) }
    })
    .await?;

    let started = Instant::now();
    manager
        .start_firmware_campaign(
            &unique("fw"),
            "1.1.0",
            firmware(image_kib as usize * 1024),
            16 * 1024,
            &ids,
        )
        .await?;
    // Serve in slices, printing progress between them.
    while manager
        .serve_until(Duration::from_secs(10), "every device installed", |m| {
            m.installed.len() == ids.len()
        })
        .await
        .is_err()
    {
        eprintln!(
            "scale: {:.0} s: {} installed, {} rejected, {} chunks republished; {}",
            started.elapsed().as_secs_f64(),
            manager.installed.len(),
            manager.rejected.len(),
            manager.republished,
            stats.progress_line()
        );
        anyhow::ensure!(started.elapsed() < wait * 4, "campaign did not finish");
    }
    let campaign_seconds = started.elapsed().as_secs_f64();
    let (summary, _) = running.stop().await;
    println!(
        "{}",
        serde_json::json!({
            "devices": devices,
            "imageKiB": image_kib,
            "allConnectedSeconds": summary.all_connected_seconds,
            "connectFailures": summary.connect_failures,
            "memoryPerDeviceBytes": summary.memory_per_device_bytes,
            "campaignSeconds": campaign_seconds,
            "chunksRequestedAgain": manager.republished,
            "bytesReceivedByDevices": summary.bytes_received,
        })
    );
    assert_eq!(summary.outcomes["installed"], u64::from(devices));
    manager.clean_up().await
}
