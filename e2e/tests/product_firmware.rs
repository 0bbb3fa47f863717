//! End to end, as real processes: a firmware campaign to 50 emulated devices succeeds, every
//! device holds the source image byte for byte, the Device statuses show the new version — and
//! a curious broker (a spy subscribed to `#` for the whole run) saw no plaintext image bytes, no
//! private key, and neither the campaign's content key nor any session key (which the devices log
//! for the test through the emulator's key log).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use p256::pkcs8::DecodePrivateKey;
use sealed_ota_e2e::product::{leaked_secrets, leaked_windows, random_image, Product, Spy};
use sealed_ota_operator::crd::CampaignPhase;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firmware_campaign_to_50_devices_under_a_curious_broker() -> Result<()> {
    let mut product = Product::new("fw50", 50).await?;
    let spy = Spy::start(product.bed, &product.ns.name).await?;

    let image = random_image(192 * 1024);
    product.firmware_configmap("fw-1-1-0", &image).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign(
        "fw-1-1-0",
        product.firmware_spec("1.1.0", "fw-1-1-0", serde_json::json!({})),
    )?;
    let campaign = product
        .wait_campaign(
            "fw-1-1-0",
            "campaign Succeeded",
            Duration::from_secs(240),
            |c| c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true),
        )
        .await?;
    let status = campaign.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, 50);
    assert_eq!(status.progress.as_deref(), Some("50/50"));

    let devices = product.devices().await?;
    assert_eq!(devices.len(), 50);
    for device in &devices {
        let s = device.status.as_ref().context("device status")?;
        assert_eq!(s.running_version.as_deref(), Some("1.1.0"), "{device:?}");
    }
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image"))?;
        assert!(
            installed == image,
            "{id}: installed image differs from the source"
        );
    }

    // The curious broker: it relayed the whole transfer, and none of it in the clear.
    product.stop_emulator();
    let seen = spy.stop();
    assert!(
        seen.len() > image.len(),
        "the spy saw {} bytes, less than the image: it did not observe the transfer",
        seen.len()
    );
    assert_eq!(
        leaked_windows(&seen, &image),
        0,
        "image plaintext crossed the broker"
    );
    let mut key_files = vec![product.dir.join("pki/manager.key")];
    key_files.extend(
        product
            .device_ids
            .iter()
            .map(|id| product.device_dir(id).join("key.pem")),
    );
    let mut scalars = HashSet::new();
    for key in &key_files {
        let pem = std::fs::read_to_string(key)?;
        let secret = p256::SecretKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("reading {}", key.display()))?;
        scalars.insert(secret.to_bytes().to_vec());
    }
    assert_eq!(
        scalars.len(),
        51,
        "one distinct key per device plus the manager's"
    );
    let leaked_keys = seen.windows(32).filter(|w| scalars.contains(*w)).count();
    assert_eq!(leaked_keys, 0, "a private key crossed the broker");
    // The keys that protect the transfer: one content key for the campaign, two session keys per
    // device session.
    let secrets = product.logged_secrets()?;
    let count = |label: &str| secrets.iter().filter(|(l, _)| l == label).count();
    assert!(count("content-key") >= 50, "{}", count("content-key"));
    assert!(count("session-m2d") >= 50 && count("session-d2m") >= 50);
    assert_eq!(
        leaked_secrets(&seen, &secrets),
        Vec::<&str>::new(),
        "a content or session key crossed the broker"
    );
    product.pass();
    Ok(())
}

#[test]
fn the_secret_scan_finds_what_it_looks_for() {
    let secrets = vec![
        ("content-key".to_string(), vec![7u8; 32]),
        ("session-m2d".to_string(), (0..32).collect::<Vec<u8>>()),
    ];
    let mut seen = b"some framing".to_vec();
    seen.extend((0..32).collect::<Vec<u8>>());
    seen.extend(b"trailer");
    assert_eq!(leaked_secrets(&seen, &secrets), vec!["session-m2d"]);
    assert!(leaked_secrets(
        b"nothing secret in here, nothing at all, really not",
        &secrets
    )
    .is_empty());
}

#[test]
fn the_leak_scan_finds_what_it_looks_for() {
    // The scan must be able to fail: a transcript that carries part of the image is caught.
    let image: Vec<u8> = (0..4096u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut seen = b"header".to_vec();
    seen.extend_from_slice(&image[1000..1100]);
    assert!(leaked_windows(&seen, &image) > 0);
    assert_eq!(
        leaked_windows(b"nothing of the image here at all, not one window", &image),
        0
    );
}
