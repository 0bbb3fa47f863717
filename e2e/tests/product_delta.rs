//! End to end, as real processes: delta updates through the operator
//! (`spec.payload.firmware.deltas`). Release 1.1.0 goes to three of four emulated devices as a
//! full image; release 1.2.0 then offers a delta from 1.1.0, computed by the operator from the
//! 1.1.0 image, pulled by tag from the test bed's OCI registry (the digest recorded). The device on 1.1.0 rebuilds 1.2.0 from the delta; the device still on its
//! enrolled 1.0.0 gets the full image; a device that reports 1.1.0 but lost its installed image
//! refuses the delta (signed `DeltaBaseMismatch`) and installs the full image next; a device whose
//! storage corrupts every received chunk rebuilds another image and refuses it, nothing installed.
//! The campaign status counts the bytes sent against full images; run twice, the second time with
//! the fleet in two shards. Another test: bad
//! `deltas` entries block the campaign with a condition naming the field, nothing started.

use std::time::Duration;

use anyhow::{Context, Result};
use sealed_ota_e2e::product::{condition, random_image, Product};
use sealed_ota_operator::crd::{CampaignPhase, DevicePhase, UpdateCampaignStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delta_campaign_through_the_operator() -> Result<()> {
    delta_campaign("delta", &[]).await
}

/// The same with the fleet in two shards (the coordinator's status path and the shards'
/// preparation of the delta from the recorded seed), one replica holding both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delta_campaign_through_a_sharded_operator() -> Result<()> {
    delta_campaign("delta-shards", &["--shards", "2"]).await
}

async fn delta_campaign(name: &str, operator_args: &[&str]) -> Result<()> {
    let mut product = Product::new(name, 4).await?;
    product.operator_args = operator_args.iter().map(|a| a.to_string()).collect();
    let ids = product.device_ids.clone();
    let names: Vec<String> = {
        let devices = product.devices().await?;
        ids.iter()
            .map(|id| {
                devices
                    .iter()
                    .find(|d| &d.device_id() == id)
                    .and_then(|d| d.metadata.name.clone())
                    .context("device resource")
            })
            .collect::<Result<_>>()?
    };
    // Device 3 stays on 1.0.0: left out of the base campaign by a label.
    product.kubectl(&["label", "device", &names[3], "delta-e2e=late"])?;

    let base = random_image(160 * 1024);
    let mut target = base.clone();
    target[40_000..44_000].fill(0x5a);
    target.extend_from_slice(&random_image(8 * 1024));
    product.firmware_configmap("fw-1-1-0", &base).await?;
    product.firmware_configmap("fw-1-2-0", &target).await?;
    product.start_operator()?;
    product.start_emulator(&[])?;
    let mut spec = product.firmware_spec("1.1.0", "fw-1-1-0", serde_json::json!({}));
    spec["selector"]["matchExpressions"] =
        serde_json::json!([{"key": "delta-e2e", "operator": "DoesNotExist"}]);
    product.apply_campaign("base", spec)?;
    let c = product
        .wait_campaign("base", "base Succeeded", Duration::from_secs(120), |c| {
            c.status.as_ref().is_some_and(|s| s.phase.is_terminal())
        })
        .await?;
    let status = c.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Succeeded, "{status:?}");
    assert_eq!(status.devices.succeeded, 3);
    product.stop_emulator();

    // Device 1 lost its installed image (it still reports 1.1.0); device 2's storage flips a bit
    // of every chunk it stores.
    let dirs: Vec<_> = ids.iter().map(|id| product.device_dir(id)).collect();
    let firmware_of = |i: usize| std::fs::read(dirs[i].join("firmware.bin"));
    std::fs::remove_file(product.device_dir(&ids[1]).join("firmware.bin"))?;
    let fault = format!("bitflip:p=1,where=storage@devices={}", ids[2]);
    product.start_emulator(&["--fault", &fault])?;
    // The base release is also in the registry, by tag: the operator pulls it from there and
    // records the digest the tag resolved to.
    let reg = product.registry()?;
    let (repository, base_digest) = product.push_firmware(&base, "1.1.0").await?;
    let spec = product.firmware_spec(
        "1.2.0",
        "fw-1-2-0",
        serde_json::json!({
            "payload": {"firmware": {
                "configMapKeyRef": {"name": "fw-1-2-0", "key": "image.bin"},
                "deltas": [{"fromVersion": "1.1.0",
                            "oci": {"reference": format!("{}/{repository}:1.1.0", reg.addr),
                                    "pullSecretName": "regcred", "insecure": true}}],
            }},
            "rollout": {"maxInFlight": 50, "deviceTimeoutSeconds": 60, "retries": 2,
                        "retryBackoffSeconds": 1, "failureThreshold": "2"},
        }),
    );
    product.apply_campaign("release", spec)?;
    let c = product
        .wait_campaign(
            "release",
            "release finished",
            Duration::from_secs(180),
            |c| c.status.as_ref().is_some_and(|s| s.phase.is_terminal()),
        )
        .await?;
    let status = c.status.context("status")?;
    assert_eq!(status.phase, CampaignPhase::Completed, "{status:?}");
    assert_eq!(status.devices.succeeded, 3, "{status:?}");
    assert_eq!(status.devices.failed, 1, "{status:?}");
    product.stop_emulator();

    for i in [0, 1, 3] {
        assert!(
            firmware_of(i)? == target,
            "device {i} installed 1.2.0 byte for byte"
        );
    }
    assert!(
        firmware_of(2)? == base,
        "device 2 refused the rebuilt image and still runs 1.1.0"
    );
    let devices = product.devices().await?;
    let device = |i: usize| {
        devices
            .iter()
            .find(|d| d.device_id() == ids[i])
            .and_then(|d| d.status.clone())
            .context("device status")
    };
    let failed = device(2)?;
    let record = failed.campaign.context("campaign record")?;
    assert_eq!(record.phase, DevicePhase::Failed);
    assert_eq!(
        record.reason.as_deref(),
        Some("ImageHashMismatch"),
        "{record:?}"
    );
    assert_eq!(failed.running_version.as_deref(), Some("1.1.0"));
    for i in [0, 1, 3] {
        assert_eq!(device(i)?.running_version.as_deref(), Some("1.2.0"));
    }

    // One device rebuilt from the delta; the other two got the full image.
    let delta = status.delta.context("status.delta")?;
    let full = target.len() as u64;
    assert_eq!(delta.devices, 1, "{delta:?}");
    assert_eq!(delta.bytes_full, 3 * full, "{delta:?}");
    assert!(
        delta.bytes_sent > 2 * full && delta.bytes_sent < delta.bytes_full,
        "{delta:?}"
    );
    // The CLI shows it.
    let table = product.cli(&["campaign", "status", "release", "-n", &product.ns.name])?;
    assert!(table.contains("delta devices  1"), "{table}");
    assert!(table.contains("bytes sent"), "{table}");
    let json = product.cli(&[
        "campaign",
        "status",
        "release",
        "-n",
        &product.ns.name,
        "-o",
        "json",
    ])?;
    let shown: UpdateCampaignStatus = serde_json::from_str(&json).context("status JSON")?;
    assert_eq!(shown.delta, Some(delta));
    // The tag the base was given by is recorded as the digest it resolved to (a restarted
    // operator or another replica makes the delta from that very base).
    assert_eq!(
        status.delta_oci_digests,
        std::collections::BTreeMap::from([("1.1.0".to_string(), base_digest)]),
        "{status:?}"
    );
    // The delta's chunks are recorded beside the image's, for a restarted operator to clear.
    assert_eq!(status.delta_chunk_counts.len(), 1, "{status:?}");
    assert!(status.delta_chunk_counts[0] >= 1, "{status:?}");
    product.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deltas_block_the_campaign_naming_the_field() -> Result<()> {
    let mut product = Product::new("delta-bad", 1).await?;
    product
        .firmware_configmap("fw", &random_image(8 * 1024))
        .await?;
    product.start_operator()?;
    let cases = [
        (
            "same-version",
            serde_json::json!([{"fromVersion": "1.1.0",
                                "configMapKeyRef": {"name": "fw", "key": "image.bin"}}]),
            "spec.payload.firmware.deltas[0].fromVersion 1.1.0 is the campaign's targetVersion",
        ),
        (
            "twice",
            serde_json::json!([
                {"fromVersion": "1.0.0", "configMapKeyRef": {"name": "fw", "key": "image.bin"}},
                {"fromVersion": "1.0.0", "configMapKeyRef": {"name": "fw", "key": "image.bin"}}]),
            "spec.payload.firmware.deltas[1].fromVersion 1.0.0 appears twice",
        ),
        (
            "not-semver",
            serde_json::json!([{"fromVersion": "latest",
                                "configMapKeyRef": {"name": "fw", "key": "image.bin"}}]),
            "spec.payload.firmware.deltas[0].fromVersion \"latest\" is not a semantic version",
        ),
        (
            "missing-base",
            serde_json::json!([{"fromVersion": "1.0.0",
                                "configMapKeyRef": {"name": "no-such-base", "key": "image.bin"}}]),
            "spec.payload.firmware.deltas[0].configMapKeyRef",
        ),
    ];
    for (name, deltas, _) in &cases {
        let spec = product.firmware_spec(
            "1.1.0",
            "fw",
            serde_json::json!({"payload": {"firmware": {
                "configMapKeyRef": {"name": "fw", "key": "image.bin"},
                "deltas": deltas,
            }}}),
        );
        product.apply_campaign(name, spec)?;
    }
    for (name, _, needle) in &cases {
        let c = product
            .wait_campaign(
                name,
                &format!("{name}: Ready=False"),
                Duration::from_secs(60),
                |c| condition(c, "Ready").is_some_and(|(s, _, _)| s == "False"),
            )
            .await?;
        let (_, _, message) = condition(&c, "Ready").context("Ready")?;
        assert!(message.contains(needle), "{name}: {message}");
        let status = c.status.context("status")?;
        assert_eq!(status.phase, CampaignPhase::Pending, "{name}: {status:?}");
        assert!(
            product.touched(name).await?.is_empty(),
            "{name} touched a device"
        );
    }
    // Exactly one source per entry is the apiserver's to refuse.
    let spec = product.firmware_spec(
        "1.1.0",
        "fw",
        serde_json::json!({"payload": {"firmware": {
            "configMapKeyRef": {"name": "fw", "key": "image.bin"},
            "deltas": [{"fromVersion": "1.0.0"}],
        }}}),
    );
    let err = product.apply_campaign("no-source", spec).unwrap_err();
    assert!(
        format!("{err:#}").contains("each of spec.payload.firmware.deltas must set exactly one of"),
        "{err:#}"
    );
    product.pass();
    Ok(())
}
