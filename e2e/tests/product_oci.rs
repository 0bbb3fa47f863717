//! Firmware from an OCI registry, end to end as real processes (issue 17): a release pipeline
//! pushes the image with `oras` to the test bed's `distribution` registry (basic auth), a
//! campaign names it by tag with a `kubernetes.io/dockerconfigjson` pull Secret, the operator
//! resolves the tag once (status.ociDigest), streams the image into its cache directory, and —
//! with a retained window smaller than the image — serves the chunks as the devices pull them.
//! Every device installs the pushed bytes, and `sealed-ota campaign status|watch` says so. Bad input on every new field gets a condition naming
//! the field and the cause, and nothing starts.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use sealed_ota_e2e::product::{metric, random_image, Product};
use sealed_ota_operator::crd::{CampaignPhase, UpdateCampaign, UpdateCampaignStatus};
use sha2::Digest as _;

fn oci_spec(product: &Product, version: &str, oci: serde_json::Value) -> serde_json::Value {
    let mut spec = product.firmware_spec(version, "unused", serde_json::json!({}));
    spec["payload"] = serde_json::json!({"firmware": {"oci": oci}});
    spec
}

fn ready(c: &UpdateCampaign) -> Option<(String, String, String)> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .find(|x| x.type_ == "Ready")
        .map(|x| (x.status.clone(), x.reason.clone(), x.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oci_artifact_reaches_every_device_pulled_through_a_bounded_retained_window(
) -> Result<()> {
    let mut product = Product::new("oci", 4).await?;
    let reg = product.registry()?;
    // 1 MiB in 16 KiB chunks (64), at most 256 KiB (16 chunks) retained: served on request.
    let image = random_image(1024 * 1024);
    let (repository, digest) = product.push_firmware(&image, "1.1.0").await?;
    product.operator_args = vec!["--retained-chunk-bytes".into(), (256 * 1024).to_string()];
    product.start_operator()?;
    product.start_emulator(&[])?;
    let mut spec = oci_spec(
        &product,
        "1.1.0",
        serde_json::json!({"reference": format!("{}/{repository}:1.1.0", reg.addr),
                           "pullSecretName": "regcred", "insecure": true}),
    );
    spec["chunkSize"] = serde_json::json!(16384);
    product.apply_campaign("from-oci", spec)?;
    let campaign = product
        .wait_campaign(
            "from-oci",
            "campaign finished",
            Duration::from_secs(240),
            |c| c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true),
        )
        .await?;
    let status = campaign.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, 4);
    assert_eq!(
        status.oci_digest.as_deref(),
        Some(digest.as_str()),
        "the tag is recorded as the digest it resolved to"
    );
    for id in &product.device_ids {
        let installed = std::fs::read(product.device_dir(id).join("firmware.bin"))
            .with_context(|| format!("{id} has no installed image"))?;
        assert!(
            installed == image,
            "{id}: installed image differs from the pushed one"
        );
    }
    // The CLI says the same as the status, as JSON and as a table, and watch ends at once.
    let ns = product.ns.name.clone();
    let json = product.cli(&["campaign", "status", "from-oci", "-n", &ns, "-o", "json"])?;
    let shown: UpdateCampaignStatus = serde_json::from_str(&json).context("status JSON")?;
    assert_eq!(
        (shown.phase, &shown.devices, &shown.oci_digest),
        (status.phase, &status.devices, &status.oci_digest),
        "campaign status -o json"
    );
    let table = product.cli(&["campaign", "status", "from-oci", "-n", &ns])?;
    assert!(
        table.contains("Succeeded") && table.contains(&digest),
        "{table}"
    );
    let watched = product.cli(&["campaign", "watch", "from-oci", "-n", &ns])?;
    assert_eq!(watched.trim(), "from-oci Succeeded");
    let missing = product.cli_output(&["campaign", "status", "nope", "-n", &ns])?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("\"nope\"") && stderr.contains("--namespace"),
        "{stderr}"
    );
    // A device's signed receipt verifies with its certificate (issued by the CA to that device)
    // and says it installed the pushed image; another device's certificate, or a receipt changed
    // by one bit, is refused.
    let devices = product.devices().await?;
    let (first, second) = (&devices[0], &devices[1]);
    let name = first.metadata.name.clone().context("name")?;
    let id = |d: &sealed_ota_operator::crd::Device| {
        d.spec
            .device_id
            .clone()
            .or_else(|| d.metadata.name.clone())
            .unwrap_or_default()
    };
    let cert = product.device_dir(&id(first)).join("cert.pem");
    let ca = product.bed.ca_file.to_string_lossy().into_owned();
    let verify = |cert: &std::path::Path| {
        product.cli_output(&[
            "receipt",
            "verify",
            "--device",
            &name,
            "-n",
            &ns,
            "--cert",
            &cert.to_string_lossy(),
            "--ca",
            &ca,
            "-o",
            "json",
        ])
    };
    let out = verify(&cert)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(claim["outcome"], "Installed", "{claim}");
    assert_eq!(claim["version"], "1.1.0", "{claim}");
    assert_eq!(claim["deviceId"], id(first), "{claim}");
    assert_eq!(claim["caChecked"], true, "{claim}");
    assert_eq!(
        claim["sha256"],
        hex::encode(sha2::Sha256::digest(&image)),
        "{claim}"
    );
    let other = verify(&product.device_dir(&id(second)).join("cert.pem"))?;
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && stderr.contains("--cert"),
        "{stderr}"
    );
    let mut record = first
        .status
        .clone()
        .and_then(|s| s.campaign)
        .context("campaign record")?;
    let mut receipt = base64::engine::general_purpose::STANDARD
        .decode(record.receipt.as_deref().context("receipt")?)?;
    let last = receipt.len() - 1;
    receipt[last] ^= 1;
    record.receipt = Some(base64::engine::general_purpose::STANDARD.encode(&receipt));
    kube::Api::<sealed_ota_operator::crd::Device>::namespaced(product.ns.client.clone(), &ns)
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"campaign": record}})),
        )
        .await?;
    let forged = verify(&cert)?;
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(
        !forged.status.success() && stderr.contains("does not verify"),
        "a changed receipt: {stderr}"
    );
    // The devices pulled: chunks were published as they asked, about once each (4 devices
    // moving through 64 chunks together), never the whole image up front and again per device.
    let served = metric(
        &product.metrics().await?,
        "sealed_ota_operator_chunks_served_total",
        None,
    );
    assert!(
        (64.0..=4.0 * 64.0).contains(&served),
        "{served} chunk publishes for 64 chunks and 4 devices"
    );
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_oci_input_gets_a_condition_naming_the_field_and_starts_nothing() -> Result<()> {
    let mut product = Product::new("ocibad", 1).await?;
    let reg = product.registry()?;
    let (repository, _) = product.push_firmware(&random_image(8192), "1.1.0").await?;
    reg.pull_secret(
        &product.ns.client,
        &product.ns.name,
        "wrongpass",
        "not-the-password",
    )
    .await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let good = format!("{}/{repository}:1.1.0", reg.addr);
    let missing = format!("{}/{repository}@sha256:{}", reg.addr, "0".repeat(64));
    let cases: Vec<(&str, serde_json::Value, &str, &[&str])> = vec![
        (
            "bad-reference",
            serde_json::json!({"reference": format!("{}/UPPER/case:1", reg.addr), "insecure": true}),
            "OciReferenceInvalid",
            &["spec.payload.firmware.oci.reference", "registry/repository"],
        ),
        (
            "no-credentials",
            serde_json::json!({"reference": good, "insecure": true}),
            "RegistryAuthFailed",
            &["spec.payload.firmware.oci.pullSecretName"],
        ),
        (
            "wrong-password",
            serde_json::json!({"reference": good, "pullSecretName": "wrongpass", "insecure": true}),
            "RegistryAuthFailed",
            &["spec.payload.firmware.oci.pullSecretName"],
        ),
        (
            "no-such-secret",
            serde_json::json!({"reference": good, "pullSecretName": "nope", "insecure": true}),
            "PullSecretInvalid",
            &["Secret nope", "spec.payload.firmware.oci.pullSecretName"],
        ),
        (
            "missing-digest",
            serde_json::json!({"reference": missing, "pullSecretName": "regcred", "insecure": true}),
            "FirmwareUnreadable",
            &["spec.payload.firmware.oci.reference", "not in the registry"],
        ),
        (
            "registry-down",
            serde_json::json!({"reference": format!("{closed}/fleet/fw:1.1.0"), "insecure": true}),
            "FirmwareDownloadFailed",
            &["spec.payload.firmware.oci.reference", "reachable"],
        ),
    ];
    product.start_operator()?;
    for (name, oci, _, _) in &cases {
        product.apply_campaign(name, oci_spec(&product, "1.1.0", oci.clone()))?;
    }
    let mut problems = Vec::new();
    for (name, _, reason, needles) in &cases {
        let c = product
            .wait_campaign(
                name,
                &format!("Ready=False {reason}"),
                Duration::from_secs(90),
                |c| ready(c).is_some_and(|(s, r, _)| s == "False" && r == *reason),
            )
            .await;
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        let (_, _, message) = ready(&c).context("Ready")?;
        for needle in needles.iter() {
            if !message.contains(needle) {
                problems.push(format!(
                    "{name}: the message does not say {needle:?}: {message}"
                ));
            }
        }
        let status = c.status.context("status")?;
        if status.devices.in_progress + status.devices.succeeded + status.devices.failed != 0 {
            problems.push(format!("{name}: devices started: {:?}", status.devices));
        }
    }
    // Nothing of any of them reached a device.
    for d in product.devices().await? {
        if let Some(record) = d.status.and_then(|s| s.campaign) {
            problems.push(format!(
                "{:?} was addressed by {}",
                d.metadata.name, record.name
            ));
        }
    }
    // A reference without a registry is refused by the apiserver, naming the field.
    let refused = product.apply_campaign(
        "no-registry",
        oci_spec(
            &product,
            "1.1.0",
            serde_json::json!({"reference": "firmware:1.1.0"}),
        ),
    );
    match refused {
        Ok(()) => problems.push("a reference without a registry was accepted".into()),
        Err(e) if !format!("{e:#}").contains("spec.payload.firmware.oci.reference") => {
            problems.push(format!("the refusal does not name the field: {e:#}"))
        }
        Err(_) => {}
    }
    assert!(problems.is_empty(), "{problems:#?}");
    product.pass();
    Ok(())
}
