//! PKI bootstrap and enrollment: create (or load) the CA, issue the manager identity and put
//! both into Kubernetes Secrets; issue device identities into a fleet directory and describe
//! each device as a `Device` resource (group `ota.sealed-ota.dev/v1alpha1`), applied with
//! server-side apply or written as YAML for `kubectl apply` / GitOps. Certificates come from the
//! protocol crate's [`CertificateAuthority`]; this module only stores and ships them. Keys are
//! written to files of mode 0600 and into Secrets, never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use sealed_ota_protocol::{CertificateAuthority, Identity, Role};
use serde_json::json;

use crate::error::{Error, Result};
use crate::store::{FleetDir, FleetSettings};

/// Field manager of every object the emulator applies.
pub const FIELD_MANAGER: &str = "sealed-ota-device-emulator";
/// API group of the `Device` resource.
pub const DEVICE_GROUP: &str = "ota.sealed-ota.dev";
/// API version of the `Device` resource.
pub const DEVICE_VERSION: &str = "v1alpha1";

/// Where a CA comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Generate a new CA with this common name.
    Generate {
        /// Common name of the new CA.
        common_name: String,
    },
    /// Load an existing CA (for example the test bed's, which Mosquitto trusts for client certs).
    Files {
        /// CA certificate, PEM.
        cert: PathBuf,
        /// CA private key, PEM (PKCS#8 or SEC1).
        key: PathBuf,
    },
}

/// Loads or generates the CA.
pub fn load_ca(source: &CaSource, now: u64, validity_days: u32) -> Result<CertificateAuthority> {
    let identity_error = |source| Error::Identity {
        subject: "CA".into(),
        source,
    };
    match source {
        CaSource::Generate { common_name } => {
            CertificateAuthority::generate(common_name, now, validity_days).map_err(identity_error)
        }
        CaSource::Files { cert, key } => {
            let cert_pem = read(cert)?;
            let key_pem = zeroize::Zeroizing::new(read(key)?);
            CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(identity_error)
        }
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))
}

/// Writes a PEM file; private ones get mode 0600.
fn write_pem(path: &Path, pem: &str, private: bool) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating directory", parent, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|e| Error::io("writing", path, e))
}

/// The outcome of `pki init`: files written and the two Secrets to apply.
#[derive(Debug)]
pub struct PkiBundle {
    /// `kubernetes.io/tls` Secret of the manager: `tls.crt`, `tls.key`, `ca.crt`.
    pub manager_secret: Secret,
    /// `kubernetes.io/tls` Secret of the CA: `tls.crt`, `tls.key` (signs rotated credentials).
    pub ca_secret: Secret,
}

/// Names and namespace of the Secrets `pki init` produces.
#[derive(Debug, Clone)]
pub struct SecretNames {
    /// Namespace of both Secrets.
    pub namespace: String,
    /// The manager Secret's name.
    pub manager: String,
    /// The CA Secret's name.
    pub ca: String,
}

/// Issues the manager identity from `ca`, writes `ca.crt`, `manager.crt`, `manager.key` (and
/// `ca.key` when `write_ca_key`) under `out`, and builds the two Secrets.
pub fn pki_init(
    ca: &CertificateAuthority,
    manager_id: &str,
    out: &Path,
    write_ca_key: bool,
    names: &SecretNames,
    now: u64,
    validity_days: u32,
) -> Result<PkiBundle> {
    let manager = ca
        .issue(Role::Manager, manager_id, now, validity_days)
        .map_err(|source| Error::Identity {
            subject: format!("manager {manager_id}"),
            source,
        })?;
    write_pem(&out.join("ca.crt"), &ca.cert_pem(), false)?;
    if write_ca_key {
        write_pem(&out.join("ca.key"), &ca.key_pem(), true)?;
    }
    write_pem(&out.join("manager.crt"), &manager.cert_pem(), false)?;
    write_pem(&out.join("manager.key"), &manager.key_pem(), true)?;
    let manager_secret = tls_secret(
        &names.manager,
        &names.namespace,
        &manager.cert_pem(),
        &manager.key_pem(),
        Some(&ca.cert_pem()),
    );
    let ca_secret = tls_secret(
        &names.ca,
        &names.namespace,
        &ca.cert_pem(),
        &ca.key_pem(),
        None,
    );
    Ok(PkiBundle {
        manager_secret,
        ca_secret,
    })
}

fn tls_secret(name: &str, namespace: &str, cert: &str, key: &str, ca: Option<&str>) -> Secret {
    let mut data = BTreeMap::from([
        ("tls.crt".to_string(), ByteString(cert.as_bytes().to_vec())),
        ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
    ]);
    if let Some(ca) = ca {
        data.insert("ca.crt".into(), ByteString(ca.as_bytes().to_vec()));
    }
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// What to enroll.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// Device ids are `<id_prefix>-<index, 5 digits>`.
    pub id_prefix: String,
    /// First index.
    pub first_index: u32,
    /// Number of devices.
    pub count: u32,
    /// Labels put on every `Device`.
    pub labels: BTreeMap<String, String>,
    /// Namespace of the `Device` resources.
    pub namespace: String,
    /// Certificate validity.
    pub validity_days: u32,
}

impl EnrollRequest {
    /// The device ids this request enrolls.
    pub fn device_ids(&self) -> impl Iterator<Item = String> + '_ {
        (self.first_index..self.first_index + self.count).map(|i| device_id(&self.id_prefix, i))
    }
}

/// `<prefix>-<index>` with the index zero-padded to 5 digits, so ids sort in index order.
pub fn device_id(prefix: &str, index: u32) -> String {
    format!("{prefix}-{index:05}")
}

/// Issues one identity per device into the fleet directory (writing `fleet.json` and `ca.crt`
/// the first time) and returns the `Device` resources describing them.
pub fn enroll(
    ca: &CertificateAuthority,
    fleet: &FleetDir,
    settings: &FleetSettings,
    request: &EnrollRequest,
    now: u64,
) -> Result<Vec<serde_json::Value>> {
    fleet.initialise(settings, &ca.cert_pem())?;
    let mut devices = Vec::with_capacity(request.count as usize);
    for id in request.device_ids() {
        let identity = ca
            .issue(Role::Device, &id, now, request.validity_days)
            .map_err(|source| Error::Identity {
                subject: id.clone(),
                source,
            })?;
        fleet
            .device(&id)
            .write_credentials(&identity.cert_pem(), &identity.key_pem())?;
        devices.push(device_resource(
            &identity,
            &request.namespace,
            &request.labels,
        ));
    }
    Ok(devices)
}

/// The `Device` resource of an identity: name and `spec.deviceId` = the certificate's name,
/// `spec.certificateFingerprint` = SHA-256 of its DER (pinned by the manager).
pub fn device_resource(
    identity: &Identity,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> serde_json::Value {
    device_resource_for(identity.name(), &identity.fingerprint(), namespace, labels)
}

/// The `Device` resource of device `device_id` whose certificate's DER has SHA-256
/// `fingerprint` (a device enrolled from its CSR: no key here).
pub fn device_resource_for(
    device_id: &str,
    fingerprint: &[u8; 32],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> serde_json::Value {
    json!({
        "apiVersion": format!("{DEVICE_GROUP}/{DEVICE_VERSION}"),
        "kind": "Device",
        "metadata": {
            "name": device_id,
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "deviceId": device_id,
            "certificateFingerprint": hex::encode(fingerprint),
        },
    })
}

/// Renders objects as one multi-document YAML stream.
pub fn to_yaml_stream<T: serde::Serialize>(objects: &[T]) -> Result<String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out)
}

/// A kube client from the environment (`KUBECONFIG` or in-cluster).
pub async fn kube_client() -> Result<Client> {
    Client::try_default()
        .await
        .map_err(|e| Error::KubeConfig(e.to_string()))
}

/// Applies the Secrets (server-side apply, field manager [`FIELD_MANAGER`]).
pub async fn apply_secrets(client: &Client, secrets: &[&Secret]) -> Result<()> {
    for secret in secrets {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let namespace = secret.metadata.namespace.clone().unwrap_or_default();
        Api::<Secret>::namespaced(client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(secret),
            )
            .await
            .map_err(|source| Error::Kube {
                action: format!("applying Secret {namespace}/{name}"),
                source,
            })?;
    }
    Ok(())
}

/// Applies `Device` resources, `concurrency` requests at a time.
pub async fn apply_devices(
    client: &Client,
    devices: &[serde_json::Value],
    concurrency: usize,
) -> Result<()> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        DEVICE_GROUP,
        DEVICE_VERSION,
        "Device",
    ));
    stream::iter(devices)
        .map(|device| {
            let resource = resource.clone();
            async move {
                let name = device["metadata"]["name"].as_str().unwrap_or_default();
                let namespace = device["metadata"]["namespace"].as_str().unwrap_or_default();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &resource);
                api.patch(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(device),
                )
                .await
                .map(|_| ())
                .map_err(|source| Error::Kube {
                    action: format!("applying Device {namespace}/{name}"),
                    source,
                })
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn names() -> SecretNames {
        SecretNames {
            namespace: "ota".into(),
            manager: "manager".into(),
            ca: "sealed-ota-ca".into(),
        }
    }

    #[test]
    fn pki_init_writes_files_and_builds_tls_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = load_ca(
            &CaSource::Generate {
                common_name: "fleet-ca".into(),
            },
            NOW,
            30,
        )
        .unwrap();
        let bundle = pki_init(&ca, "manager", tmp.path(), true, &names(), NOW, 30).unwrap();
        let data = bundle.manager_secret.data.as_ref().unwrap();
        assert_eq!(
            bundle.manager_secret.type_.as_deref(),
            Some("kubernetes.io/tls")
        );
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
        // The manager identity loads back and chains to the CA.
        let manager = Identity::from_pem(
            std::str::from_utf8(&data["tls.crt"].0).unwrap(),
            std::str::from_utf8(&data["tls.key"].0).unwrap(),
        )
        .unwrap();
        ca.trust_anchor()
            .verify(manager.cert_der(), Role::Manager, "manager", NOW)
            .unwrap();
        let ca_data = bundle.ca_secret.data.as_ref().unwrap();
        assert!(ca_data.contains_key("tls.key") && !ca_data.contains_key("ca.crt"));
        // The CA written out loads again as a CA (the --ca-cert/--ca-key path).
        let reloaded = load_ca(
            &CaSource::Files {
                cert: tmp.path().join("ca.crt"),
                key: tmp.path().join("ca.key"),
            },
            NOW,
            30,
        )
        .unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn enroll_issues_identities_and_pinned_device_resources() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("fleet-ca", NOW, 30).unwrap();
        let fleet = FleetDir::new(tmp.path());
        let settings = FleetSettings {
            manager_id: "manager".into(),
            topic_prefix: "iot".into(),
            initial_version: "1.0.0".into(),
            release_keys: Vec::new(),
        };
        let request = EnrollRequest {
            id_prefix: "dev".into(),
            first_index: 7,
            count: 3,
            labels: BTreeMap::from([("fleet".to_string(), "test".to_string())]),
            namespace: "ota".into(),
            validity_days: 30,
        };
        let devices = enroll(&ca, &fleet, &settings, &request, NOW).unwrap();
        assert_eq!(
            fleet.device_ids().unwrap(),
            ["dev-00007", "dev-00008", "dev-00009"]
        );
        let (cert, key) = fleet.device("dev-00008").read_credentials().unwrap();
        let identity = Identity::from_pem(&cert, &key).unwrap();
        ca.trust_anchor()
            .verify(identity.cert_der(), Role::Device, "dev-00008", NOW)
            .unwrap();
        let resource = &devices[1];
        assert_eq!(resource["kind"], "Device");
        assert_eq!(resource["apiVersion"], "ota.sealed-ota.dev/v1alpha1");
        assert_eq!(resource["spec"]["deviceId"], "dev-00008");
        assert_eq!(
            resource["spec"]["certificateFingerprint"],
            hex::encode(identity.fingerprint())
        );
        assert_eq!(resource["metadata"]["labels"]["fleet"], "test");
        let yaml = to_yaml_stream(&devices).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 3);
        assert!(yaml.contains("certificateFingerprint"));
        assert_eq!(fleet.settings().unwrap(), settings);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = load_ca(
            &CaSource::Files {
                cert: "/nonexistent/ca.crt".into(),
                key: "/nonexistent/ca.key".into(),
            },
            NOW,
            30,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    }
}
