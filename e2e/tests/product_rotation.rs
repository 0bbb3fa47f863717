//! End to end, as real processes: credential rotation in both modes (the paper's delivered
//! key, and CSR where the key never leaves the device). Each device ends with a new certificate
//! from the CA, its Device status shows the new fingerprint, and the fleet reconnects to
//! Mosquitto with the new certificates. A spy on `#` checks that no new private key, session key
//! or delivered key (as the devices logged them) crossed the broker in the clear.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use p256::pkcs8::DecodePrivateKey;
use sealed_ota_e2e::product::{certificate_fingerprint, leaked_secrets, Product, Spy};
use sealed_ota_operator::crd::CampaignPhase;

async fn rotate(mode: &str) -> Result<()> {
    let mut product = Product::new(&format!("rot-{}", mode.to_lowercase()), 6).await?;
    let mut before = BTreeMap::new();
    for id in &product.device_ids {
        let pem = std::fs::read_to_string(product.device_dir(id).join("cert.pem"))?;
        before.insert(id.clone(), certificate_fingerprint(&pem)?);
    }
    let spy = Spy::start(product.bed, &product.ns.name).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    product.apply_campaign(
        "rotate",
        serde_json::json!({
            "selector": {"matchLabels": {"fleet": product.fleet_label()}},
            "targetVersion": "2.0.0",
            "payload": {"rotateCredentials": {"mode": mode, "caSecretName": "sealed-ota-ca",
                                              "validityDays": 30}},
            "managerSecretName": "sealed-ota-manager",
            "rollout": {"maxInFlight": 10, "deviceTimeoutSeconds": 60},
        }),
    )?;
    let campaign = product
        .wait_campaign(
            "rotate",
            "rotation finished",
            Duration::from_secs(180),
            |c| c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true),
        )
        .await?;
    let status = campaign.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    product.stop_emulator();

    // New certificates on the devices, recorded on their Device status.
    let devices = product.devices().await?;
    let mut new_keys = HashSet::new();
    for id in &product.device_ids {
        let dir = product.device_dir(id);
        let pem = std::fs::read_to_string(dir.join("cert.pem"))?;
        let now = certificate_fingerprint(&pem)?;
        assert_ne!(now, before[id], "{id} still has its old certificate");
        let device = devices
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(id.as_str()))
            .with_context(|| format!("Device {id}"))?;
        let recorded = device
            .status
            .as_ref()
            .and_then(|s| s.certificate_fingerprint.clone())
            .with_context(|| format!("{id}: no certificate fingerprint on its status"))?;
        assert_eq!(
            recorded.to_lowercase().replace(':', ""),
            now,
            "{id}: status fingerprint"
        );
        let key = p256::SecretKey::from_pkcs8_pem(&std::fs::read_to_string(dir.join("key.pem"))?)?;
        new_keys.insert(key.to_bytes().to_vec());
    }
    assert_eq!(new_keys.len(), 6, "every device has a key of its own");
    let seen = spy.stop();
    assert!(
        !seen.is_empty(),
        "the spy saw nothing: it did not observe the rotation"
    );
    let leaked = seen.windows(32).filter(|w| new_keys.contains(*w)).count();
    assert_eq!(
        leaked, 0,
        "a new private key crossed the broker in the clear"
    );
    let secrets = product.logged_secrets()?;
    let delivered = secrets.iter().filter(|(l, _)| l == "delivered-key").count();
    if mode == "DeliverKey" {
        assert!(delivered >= 6, "{delivered} delivered keys logged");
    } else {
        assert_eq!(delivered, 0, "in CSR mode no key travels");
    }
    assert!(secrets.iter().filter(|(l, _)| l == "session-m2d").count() >= 6);
    assert_eq!(
        leaked_secrets(&seen, &secrets),
        Vec::<&str>::new(),
        "a session key or delivered key crossed the broker"
    );

    // The fleet reconnects with the new certificates (Mosquitto checks them against the CA).
    let summary = product.connect_fleet_once()?;
    assert_eq!(summary["devices"], 6, "{summary}");
    assert_eq!(summary["connectFailures"], 0, "{summary}");
    assert!(summary["allConnectedSeconds"].is_number(), "{summary}");
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_delivering_the_key_on_the_inner_channel() -> Result<()> {
    rotate("DeliverKey").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_with_a_device_generated_key_and_csr() -> Result<()> {
    rotate("Csr").await
}
