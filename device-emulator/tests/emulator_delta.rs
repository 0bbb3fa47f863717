//! Delta updates end to end on the test bed's Mosquitto: devices that installed a base release
//! receive only a binary delta from it, rebuild the new release against their installed
//! `firmware.bin`, check its SHA-256 and install it; a device without that base refuses the delta
//! (signed `DeltaBaseMismatch`, nothing installed) and installs the full image offered next; a
//! delta corrupted on a device's storage rebuilds an image whose SHA-256 does not match and is
//! refused, the base left running. The manager is played by the test (`support::TestManager`).
//! Needs `e2e/testbed up` (started on demand).

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_device_emulator::fleet::RunningFleet;
use sealed_ota_device_emulator::slots::ImageSlots;
use sealed_ota_e2e::TestBed;
use sealed_ota_protocol::{CampaignPayload, CampaignSpec, RejectReason};
use support::{enroll_fleet, firmware, fleet_options, testbed_ca, unique, TestManager};

const CHUNK: u32 = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_campaign_rebuilds_on_the_base_and_is_refused_elsewhere() -> Result<()> {
    let bed = TestBed::get()?;
    let ca = testbed_ca(bed)?;
    let tmp = tempfile::tempdir()?;
    let manager_id = unique("mgr");
    let (fleet, ids) = enroll_fleet(&ca, &tmp.path().join("fleet"), &unique("d"), &manager_id, 4)?;
    let mut manager = TestManager::connect(bed, &ca, &manager_id, tmp.path()).await?;
    let firmware_of = |i: usize| {
        std::fs::read(ImageSlots::in_dir(fleet.device(&ids[i]).root()).firmware_path()).ok()
    };

    // Release 1.1.0 (full image) to devices 0..3; device 3 stays on its enrolled 1.0.0.
    let base = firmware(64 * CHUNK as usize);
    let on_base = &ids[..3];
    let running = RunningFleet::start(fleet_options(bed, fleet.clone())?)?;
    manager
        .start_firmware_campaign(&unique("base"), "1.1.0", base.clone(), CHUNK, on_base)
        .await?;
    manager
        .serve_until(Duration::from_secs(90), "the base installed", |m| {
            m.installed.len() + m.rejected.len() == 3
        })
        .await?;
    assert_eq!(manager.installed.len(), 3, "{:?}", manager.rejected);
    let _ = running.stop().await;

    // Release 1.2.0: most of 1.1.0, a changed range and a tail. Device 2's storage flips a bit
    // of every stored chunk.
    let mut target = base.clone();
    target[10_000..14_000].fill(0x5a);
    target.extend_from_slice(&firmware(2 * CHUNK as usize));
    let mut options = fleet_options(bed, fleet.clone())?;
    options.faults = vec![format!("bitflip:p=1,where=storage@devices={}", ids[2]).parse()?];
    let running = RunningFleet::start(options.clone())?;
    let spec = CampaignSpec {
        campaign_id: unique("delta"),
        target_version: "1.2.0".into(),
        payload: CampaignPayload::Delta {
            base_version: "1.1.0".into(),
            base: base.clone(),
            image: target.clone(),
        },
        expires_at: sealed_ota_device_emulator::device::unix_now() + 3600,
        chunk_size: CHUNK,
        release: None,
    };
    let campaign = manager.start_campaign(spec, &ids).await?;
    let delta_bytes = campaign.transfer_size();
    assert!(
        delta_bytes * 4 < target.len() as u64,
        "the delta ({delta_bytes} bytes) is far smaller than the image ({})",
        target.len()
    );
    manager
        .serve_until(Duration::from_secs(90), "every device settled", |m| {
            m.installed.len() + m.rejected.len() == 4
        })
        .await?;
    let (summary, reports) = running.stop().await;
    for i in [0, 1] {
        assert!(manager.installed.contains(&ids[i]), "{}", ids[i]);
        assert!(
            firmware_of(i).as_ref() == Some(&target),
            "device {i} runs 1.2.0"
        );
    }
    assert_eq!(
        manager.rejected.get(&ids[2]),
        Some(&RejectReason::ImageHashMismatch),
        "a delta corrupted on storage rebuilds another image"
    );
    assert!(
        firmware_of(2).as_ref() == Some(&base),
        "device 2 still runs the base"
    );
    assert_eq!(
        manager.rejected.get(&ids[3]),
        Some(&RejectReason::DeltaBaseMismatch),
        "a device without the base refuses the delta"
    );
    assert_eq!(firmware_of(3), None, "nothing installed on device 3");
    let version = |i: usize| {
        reports
            .iter()
            .find(|r| r.device_id == ids[i])
            .map(|r| r.running_version.clone())
            .context("report")
    };
    assert_eq!(version(2)?, "1.1.0");
    assert_eq!(version(3)?, "1.0.0");
    // Each device received only the delta's chunks.
    let delta_chunks = delta_bytes.div_ceil(u64::from(CHUNK));
    assert!(
        summary.chunks_received <= 4 * delta_chunks + 4,
        "{} chunks received, the delta has {delta_chunks}",
        summary.chunks_received
    );
    manager.clean_up().await?;

    // The device without the base takes the full image.
    let running = RunningFleet::start(fleet_options(bed, fleet.clone())?)?;
    manager
        .start_firmware_campaign(&unique("full"), "1.2.0", target.clone(), CHUNK, &ids[3..])
        .await?;
    manager
        .serve_until(Duration::from_secs(90), "the full image installed", |m| {
            m.installed.len() + m.rejected.len() == 1
        })
        .await?;
    let _ = running.stop().await;
    assert!(
        manager.installed.contains(&ids[3]),
        "{:?}",
        manager.rejected
    );
    assert!(firmware_of(3).as_ref() == Some(&target));
    manager.clean_up().await
}
