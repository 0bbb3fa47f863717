//! End to end, as real processes: a firmware campaign to 50 emulated devices succeeds, every
//! device holds the source image byte for byte, the Device statuses show the new version — and
//! a curious broker (a spy subscribed to `#` for the whole run) saw no plaintext image bytes and
//! no private key.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use p256::pkcs8::DecodePrivateKey;
use rand::RngCore;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use sealed_ota_e2e::product::Product;
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::crd::CampaignPhase;

/// Everything the broker relayed to a subscriber of `#`, payload bytes concatenated.
struct Spy {
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Spy {
    async fn start(bed: &TestBed, id: &str) -> Result<Self> {
        let (client, mut eventloop) = AsyncClient::new(bed.mqtt_options(&format!("spy-{id}"))?, 64);
        client.subscribe("#", QoS::AtLeastOnce).await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let _keep_client = client;
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().unwrap().extend_from_slice(&p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("spy: no SUBACK")??;
        Ok(Spy { seen, task })
    }

    fn stop(self) -> Vec<u8> {
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// 32-byte windows of `image` at every 16-byte offset found anywhere in `seen`.
fn leaked_windows(seen: &[u8], image: &[u8]) -> usize {
    let windows: HashSet<&[u8]> = (0..image.len().saturating_sub(32))
        .step_by(16)
        .map(|i| &image[i..i + 32])
        .collect();
    let found: HashSet<&[u8]> = seen.windows(32).filter(|w| windows.contains(w)).collect();
    found.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firmware_campaign_to_50_devices_under_a_curious_broker() -> Result<()> {
    let mut product = Product::new("fw50", 50).await?;
    let spy = Spy::start(product.bed, &product.ns.name).await?;

    let mut image = vec![0u8; 192 * 1024];
    rand::thread_rng().fill_bytes(&mut image);
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
    Ok(())
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
