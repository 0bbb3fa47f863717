//! Enrollment against the test bed's real kube-apiserver: the manager and CA Secrets and the
//! `Device` resources are applied with server-side apply, accepted by the CRD's validation, and
//! read back with the values the emulator's devices use. Needs `e2e/testbed up`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::Api;
use rand::Rng;
use sealed_ota_device_emulator::device::unix_now;
use sealed_ota_device_emulator::enroll::{self, CaSource, EnrollRequest, SecretNames};
use sealed_ota_device_emulator::store::{FleetDir, FleetSettings};
use sealed_ota_e2e::TestBed;
use sealed_ota_protocol::Identity;

#[tokio::test]
async fn secrets_and_devices_are_applied_to_the_apiserver() -> Result<()> {
    sealed_ota_device_emulator::install_crypto_provider();
    let bed = TestBed::get()?;
    let ns = bed.namespace("emu-enroll").await?;
    sealed_ota_e2e::install_crds(&ns.client).await?;
    let ca = enroll::load_ca(
        &CaSource::Files {
            cert: bed.ca_file.clone(),
            key: bed.ca_key_file.clone(),
        },
        unix_now(),
        1,
    )?;
    let tmp = tempfile::tempdir()?;
    let now = unix_now();

    let names = SecretNames {
        namespace: ns.name.clone(),
        manager: "sealed-ota-manager".into(),
        ca: "sealed-ota-ca".into(),
    };
    let bundle = enroll::pki_init(&ca, "manager", tmp.path(), false, &names, now, 1)?;
    enroll::apply_secrets(&ns.client, &[&bundle.manager_secret, &bundle.ca_secret]).await?;
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let manager = secrets.get("sealed-ota-manager").await?;
    assert_eq!(manager.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = manager.data.context("manager Secret without data")?;
    assert_eq!(data["ca.crt"].0, ca.cert_pem().into_bytes());
    let identity = Identity::from_pem(
        std::str::from_utf8(&data["tls.crt"].0)?,
        std::str::from_utf8(&data["tls.key"].0)?,
    )?;
    assert_eq!(identity.name(), "manager");
    let ca_secret = secrets.get("sealed-ota-ca").await?;
    assert!(ca_secret
        .data
        .context("CA Secret without data")?
        .contains_key("tls.key"));
    assert!(
        !tmp.path().join("ca.key").exists(),
        "an existing CA's key is not copied"
    );

    let fleet = FleetDir::new(tmp.path().join("fleet"));
    let settings = FleetSettings {
        manager_id: "manager".into(),
        topic_prefix: "iot".into(),
        initial_version: "1.0.0".into(),
        release_keys: Vec::new(),
    };
    let prefix = format!("k{:06x}", rand::thread_rng().gen_range(0..0xff_ffffu32));
    let request = EnrollRequest {
        id_prefix: prefix.clone(),
        first_index: 0,
        count: 20,
        labels: BTreeMap::from([("fleet".to_string(), "e2e".to_string())]),
        namespace: ns.name.clone(),
        validity_days: 1,
    };
    let devices = enroll::enroll(&ca, &fleet, &settings, &request, now)?;
    enroll::apply_devices(&ns.client, &devices, 8).await?;
    // Applying again is harmless (server-side apply, same field manager).
    enroll::apply_devices(&ns.client, &devices, 8).await?;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        enroll::DEVICE_GROUP,
        enroll::DEVICE_VERSION,
        "Device",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let listed = api.list(&ListParams::default().labels("fleet=e2e")).await?;
    assert_eq!(listed.items.len(), 20);
    let id = format!("{prefix}-00007");
    let device = api.get(&id).await?;
    let (cert, key) = fleet.device(&id).read_credentials()?;
    let fingerprint = hex::encode(Identity::from_pem(&cert, &key)?.fingerprint());
    assert_eq!(device.data["spec"]["deviceId"], id.as_str());
    assert_eq!(
        device.data["spec"]["certificateFingerprint"],
        fingerprint.as_str()
    );
    ns.pass();
    Ok(())
}
