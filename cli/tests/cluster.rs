//! `sealed-ota device enroll --inventory`, `campaign plan` and the `-o json|yaml` reports, run as
//! processes against the test bed's apiserver (each test in its own namespace, no operator: the
//! plan is computed by the CLI itself through the operator's library). Bad input on each new flag
//! and inventory field gets an error naming the file, the line, the field or the flag, and
//! leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use sealed_ota_e2e::{install_crds, TestBed, TestNamespace};
use sealed_ota_operator::crd::Device;
use sealed_ota_protocol::identity::generate_csr;
use sealed_ota_protocol::Role;
use sha2::{Digest, Sha256};

fn sealed_ota(bed: &TestBed, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sealed-ota"))
        .args(args)
        .env("KUBECONFIG", &bed.kubeconfig)
        .output()
        .expect("running sealed-ota")
}

/// Its stdout, after checking it succeeded.
fn ok(out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "sealed-ota failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Its stderr, after checking it failed.
fn refused(out: Output) -> String {
    assert!(
        !out.status.success(),
        "sealed-ota should have refused; it printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A CSR as a device makes it (`sealed-ota-agent keygen`), written to `dir/<id>.csr`.
fn csr_file(dir: &Path, id: &str) -> Result<PathBuf> {
    let (_key, der) = generate_csr(Role::Device, id)?;
    let path = dir.join(format!("{id}.csr"));
    std::fs::write(
        &path,
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
    )?;
    Ok(path)
}

async fn devices(ns: &TestNamespace) -> Result<Vec<Device>> {
    Ok(Api::<Device>::namespaced(ns.client.clone(), &ns.name)
        .list(&ListParams::default())
        .await?
        .items)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inventory_enrolls_many_devices_from_their_csrs_and_a_bad_row_enrolls_none() -> Result<()>
{
    let bed = TestBed::get()?;
    let ns = bed.namespace("cli-inventory").await?;
    install_crds(&ns.client).await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    std::fs::create_dir(dir.join("csr"))?;
    for id in ["gw-01", "gw-02", "gw-03"] {
        csr_file(&dir.join("csr"), id)?;
    }
    let (ca, ca_key) = (s(&bed.ca_file), s(&bed.ca_key_file));
    let enroll = |inventory: &Path, certs: &Path, extra: &[&str]| {
        let mut args = vec![
            "device",
            "enroll",
            "--inventory",
            s(inventory),
            "--cert-dir",
            s(certs),
            "--ca-cert",
            ca,
            "--ca-key",
            ca_key,
            "-n",
            &ns.name,
            "--label",
            "fleet=gateways",
        ];
        args.extend_from_slice(extra);
        sealed_ota(bed, &args)
    };

    // Bad rows: each names the file, the line and the column; nothing is written or applied.
    let unused = dir.join("certs-unused");
    for (text, needle) in [
        (
            "id,csr,labels\ngw-01,csr/gw-01.csr,site=berlin\ngw-02,csr/gw-02.csr,site\n",
            "bad.csv:3: labels: \"site\" is not key=value",
        ),
        ("id,csr\ngw-01,csr/missing.csr\n", "bad.csv:2: csr: reading"),
        (
            "id,csr\ngw-01,csr/gw-01.csr\nGw_02,csr/gw-02.csr\n",
            "bad.csv:3: id: \"Gw_02\" is not a Kubernetes name",
        ),
        (
            "id,csr\ngw-01,csr/gw-01.csr\ngw-01,csr/gw-02.csr\n",
            "bad.csv:3: id: \"gw-01\" is already on line 2",
        ),
        (
            "id,csr,owner\ngw-01,csr/gw-01.csr,ops\n",
            "bad.csv:1: header: unknown column \"owner\"",
        ),
        // A certificate is not a CSR.
        (
            &format!("id,csr\ngw-01,csr/gw-01.csr\ngw-02,{ca}\n"),
            "bad.csv:3: csr: ",
        ),
    ] {
        let bad = dir.join("bad.csv");
        std::fs::write(&bad, text)?;
        let err = refused(enroll(&bad, &unused, &["--apply"]));
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(!unused.exists(), "a refused inventory wrote certificates");
    assert!(
        devices(&ns).await?.is_empty(),
        "a refused inventory applied Devices"
    );

    // Flags: --cert-dir is required, --count does not mix, -o json does not mix with --yaml -.
    let inventory = dir.join("devices.csv");
    std::fs::write(
        &inventory,
        "# the gateways\nid,csr,labels\ngw-01,csr/gw-01.csr,site=berlin;tier=gold\ngw-02,csr/gw-02.csr,site=paris\n\ngw-03,csr/gw-03.csr,\n",
    )?;
    let err = refused(sealed_ota(
        bed,
        &[
            "device",
            "enroll",
            "--inventory",
            s(&inventory),
            "--ca-cert",
            ca,
            "--ca-key",
            ca_key,
        ],
    ));
    assert!(err.contains("--cert-dir"), "{err}");
    let certs = dir.join("certs");
    let err = refused(enroll(&inventory, &certs, &["--count", "3"]));
    assert!(err.contains("--count"), "{err}");
    let err = refused(enroll(&inventory, &certs, &["--yaml", "-", "-o", "json"]));
    assert!(
        err.contains("-o/--output") && err.contains("--yaml FILE"),
        "{err}"
    );
    assert!(!certs.exists());

    // The inventory: three certificates, three Devices pinning them, labels merged.
    let report: serde_json::Value =
        serde_json::from_str(&ok(enroll(&inventory, &certs, &["--apply", "-o", "json"]))?)?;
    let listed = report["devices"].as_array().context("devices")?;
    assert_eq!(listed.len(), 3, "{report}");
    assert_eq!(report["applied"], true);
    let mut applied = devices(&ns).await?;
    applied.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for (device, (row, id)) in applied
        .iter()
        .zip(listed.iter().zip(["gw-01", "gw-02", "gw-03"]))
    {
        let pem_text = std::fs::read_to_string(certs.join(format!("{id}.crt")))?;
        let der = pem::parse(pem_text)?.into_contents();
        let fingerprint = hex::encode(Sha256::digest(&der));
        assert_eq!(device.metadata.name.as_deref(), Some(id));
        assert_eq!(row["id"], id);
        assert_eq!(row["certificateFingerprint"], fingerprint.as_str());
        assert_eq!(
            device.spec.certificate_fingerprint.as_deref(),
            Some(fingerprint.as_str())
        );
        assert_eq!(
            device.metadata.labels.as_ref().and_then(|l| l.get("fleet")),
            Some(&"gateways".to_string())
        );
    }
    let labels = applied[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("gold"));
    // The table (default) lists the devices.
    let table = ok(enroll(&inventory, &dir.join("again"), &[]))?;
    assert!(table.starts_with("DEVICE"), "{table}");
    assert!(
        table.contains("gw-03") && table.contains("3 Devices"),
        "{table}"
    );
    ns.pass();
    Ok(())
}

/// Enrols `count` lab devices labelled fleet=<ns> (fleet mode, keys generated here).
fn enroll_lab_fleet(bed: &TestBed, ns: &TestNamespace, dir: &Path, count: u32) -> Result<()> {
    let label = format!("fleet={}", ns.name);
    ok(sealed_ota(
        bed,
        &[
            "device",
            "enroll",
            "--fleet",
            s(&dir.join("fleet")),
            "--count",
            &count.to_string(),
            "--ca-cert",
            s(&bed.ca_file),
            "--ca-key",
            s(&bed.ca_key_file),
            "-n",
            &ns.name,
            "--label",
            &label,
            "--apply",
            "-o",
            "yaml",
        ],
    ))
    .map(drop)
}

fn campaign_manifest(ns: &str, name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "selector": {"matchLabels": {"fleet": ns}},
        "targetVersion": "2.0.0",
        "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
        "managerSecretName": "sealed-ota-manager",
        "rollout": {"canary": "1", "waveSize": "2", "maxInFlight": 1},
    });
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "UpdateCampaign",
        "metadata": {"name": name},
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_plan_shows_waves_left_out_devices_and_blockers_before_anything_runs() -> Result<()>
{
    let bed = TestBed::get()?;
    let ns = bed.namespace("cli-plan").await?;
    install_crds(&ns.client).await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    enroll_lab_fleet(bed, &ns, dir, 6)?;
    // One device already runs the target: the plan leaves it out as UpToDate.
    Api::<Device>::namespaced(ns.client.clone(), &ns.name)
        .patch_status(
            "dev-00005",
            &PatchParams::apply("cli-test").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "ota.sealed-ota.dev/v1alpha1",
                "kind": "Device",
                "status": {"runningVersion": "2.0.0"},
            })),
        )
        .await?;
    let file = dir.join("campaign.yaml");
    let write = |manifest: serde_json::Value| -> Result<()> {
        Ok(std::fs::write(&file, serde_yaml::to_string(&manifest)?)?)
    };

    let plan_json = |target: &[&str]| -> Result<serde_json::Value> {
        let mut args = vec!["campaign", "plan"];
        args.extend_from_slice(target);
        args.extend(["-n", &ns.name, "-o", "json"]);
        Ok(serde_json::from_str(&ok(sealed_ota(bed, &args))?)?)
    };

    // From a manifest not applied yet.
    write(campaign_manifest(&ns.name, "fw", serde_json::json!({})))?;
    let plan = plan_json(&["-f", s(&file)])?;
    assert_eq!(plan["selected"], 6, "{plan:#}");
    assert_eq!(plan["plan"]["devices"], 5, "{plan:#}");
    let sizes: Vec<u64> = plan["plan"]["waves"]
        .as_array()
        .context("waves")?
        .iter()
        .filter_map(|w| w["size"].as_u64())
        .collect();
    assert_eq!(sizes, vec![1, 2, 2, 0], "canary 1, waves of 2: {plan:#}");
    assert_eq!(plan["plan"]["excluded"][0]["reason"], "UpToDate");
    assert_eq!(plan["plan"]["excluded"][0]["devices"][0], "dev-00005");
    assert_eq!(plan["startsNow"], serde_json::json!(["dev-00000"]));
    assert!(plan.get("blocked").is_none(), "{plan:#}");
    let yaml: serde_json::Value = serde_yaml::from_str(&ok(sealed_ota(
        bed,
        &[
            "campaign",
            "plan",
            "-f",
            s(&file),
            "-n",
            &ns.name,
            "-o",
            "yaml",
        ],
    ))?)?;
    assert_eq!(yaml, plan, "-o yaml carries the same data");
    let table = ok(sealed_ota(
        bed,
        &["campaign", "plan", "-f", s(&file), "-n", &ns.name],
    ))?;
    for needle in [
        "to update   5",
        "starts now  1 (dev-00000)",
        "WAVE",
        "UpToDate",
    ] {
        assert!(table.contains(needle), "{needle:?} not in:\n{table}");
    }

    // Applied (paused): read from the cluster by name; nothing starts and the note says why.
    write(campaign_manifest(
        &ns.name,
        "held",
        serde_json::json!({"paused": true}),
    ))?;
    let applied: sealed_ota_operator::crd::UpdateCampaign =
        serde_yaml::from_str(&std::fs::read_to_string(&file)?)?;
    Api::<sealed_ota_operator::crd::UpdateCampaign>::namespaced(ns.client.clone(), &ns.name)
        .create(&Default::default(), &applied)
        .await?;
    let plan = plan_json(&["held"])?;
    assert_eq!(plan["plan"]["devices"], 5, "{plan:#}");
    assert_eq!(plan["startsNow"], serde_json::json!([]), "{plan:#}");
    assert!(
        plan["notes"][0]
            .as_str()
            .unwrap_or("")
            .contains("spec.paused"),
        "{plan:#}"
    );

    // What blocks a campaign: a schedule in a time zone that does not exist.
    write(campaign_manifest(
        &ns.name,
        "tz",
        serde_json::json!({"schedule": {"timeZone": "Mars/Olympus", "windows": [{"days": ["Mon"], "start": "02:00", "duration": "2h"}]}}),
    ))?;
    let plan = plan_json(&["-f", s(&file)])?;
    assert_eq!(plan["blocked"]["reason"], "InvalidSchedule", "{plan:#}");
    assert!(
        plan["blocked"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("timeZone"),
        "{plan:#}"
    );
    assert_eq!(plan["startsNow"], serde_json::json!([]));

    // Bad input: another kind, disagreeing namespaces, an unknown name, an unknown format.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )?;
    let err = refused(sealed_ota(bed, &["campaign", "plan", "-f", s(&file)]));
    assert!(
        err.contains("campaign.yaml") && err.contains("\"ConfigMap\", not UpdateCampaign"),
        "{err}"
    );
    let mut unnamed = campaign_manifest(&ns.name, "fw", serde_json::json!({}));
    unnamed["metadata"] = serde_json::json!({});
    write(unnamed)?;
    let err = refused(sealed_ota(bed, &["campaign", "plan", "-f", s(&file)]));
    assert!(err.contains("metadata.name is missing"), "{err}");
    let mut no_target = campaign_manifest(&ns.name, "fw", serde_json::json!({}));
    no_target["spec"]
        .as_object_mut()
        .context("spec")?
        .remove("targetVersion");
    write(no_target)?;
    let err = refused(sealed_ota(bed, &["campaign", "plan", "-f", s(&file)]));
    assert!(
        err.contains("not a valid UpdateCampaign") && err.contains("targetVersion"),
        "{err}"
    );
    let mut elsewhere = campaign_manifest(&ns.name, "fw", serde_json::json!({}));
    elsewhere["metadata"]["namespace"] = "other".into();
    write(elsewhere)?;
    let err = refused(sealed_ota(
        bed,
        &["campaign", "plan", "-f", s(&file), "-n", &ns.name],
    ));
    assert!(
        err.contains("-n/--namespace") && err.contains("\"other\""),
        "{err}"
    );
    let err = refused(sealed_ota(
        bed,
        &["campaign", "plan", "nope", "-n", &ns.name],
    ));
    assert!(err.contains("NAME") && err.contains("\"nope\""), "{err}");
    let err = refused(sealed_ota(bed, &["campaign", "plan", "held", "-o", "xml"]));
    assert!(err.contains("--output") && err.contains("json"), "{err}");
    let err = refused(sealed_ota(bed, &["campaign", "plan"]));
    assert!(err.contains("--file") || err.contains("<NAME>"), "{err}");
    ns.pass();
    Ok(())
}

#[test]
fn release_commands_print_tables_json_and_yaml() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = tmp.path().join("keys");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sealed-ota"))
            .args(args)
            .output()
            .expect("running sealed-ota")
    };
    let made: serde_json::Value = serde_json::from_str(&ok(run(&[
        "release",
        "keygen",
        "--out",
        s(&keys),
        "-o",
        "json",
    ]))?)?;
    let key_id = made["keyId"].as_str().context("keyId")?.to_string();
    assert_eq!(made["publicKey"], s(&keys.join("release.pub")));
    let image = tmp.path().join("fw.bin");
    std::fs::write(&image, vec![3u8; 4096])?;
    let sign = |format: &str| {
        run(&[
            "release",
            "sign",
            "--key",
            s(&keys.join("release.key")),
            "--image",
            s(&image),
            "--version",
            "1.0.0",
            "-o",
            format,
        ])
    };
    let table = ok(sign("table"))?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("key id ") && l.ends_with(&format!(" {key_id}"))),
        "{table}"
    );
    let yaml: serde_json::Value = serde_yaml::from_str(&ok(sign("yaml"))?)?;
    assert_eq!(yaml["keyId"], key_id.as_str());
    let sig = tmp.path().join("fw.sig.json");
    std::fs::write(&sig, ok(sign("json"))?)?;
    let verified: serde_json::Value = serde_json::from_str(&ok(run(&[
        "release",
        "verify",
        "--pub",
        s(&keys.join("release.pub")),
        "--image",
        s(&image),
        "--version",
        "1.0.0",
        "--signature",
        s(&sig),
        "-o",
        "json",
    ]))?)?;
    assert_eq!(
        (verified["verified"].as_bool(), verified["size"].as_u64()),
        (Some(true), Some(4096))
    );
    Ok(())
}
