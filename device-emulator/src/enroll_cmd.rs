//! The `pki-init` and `enroll` commands (flags and what they do), shared by the emulator's
//! subcommands and the `sealed-ota` CLI (`pki init`, `device enroll`), so both tools bootstrap
//! the PKI and enroll devices with the same code: create or load the CA, issue the manager
//! identity and the device identities (files in a fleet directory), or sign one device's CSR
//! (`enroll --csr`: a real device whose key never leaves it, as `sealed-ota-agent keygen` makes
//! it; `enroll --inventory`: many such devices from a CSV file, see [`crate::inventory`]), and
//! ship the Secrets and `Device` resources (applied by server-side apply, or written as
//! YAML for GitOps).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use sealed_ota_protocol::{CertificateAuthority, ReleaseKey, Role};
use sha2::{Digest, Sha256};

use crate::device::unix_now;
use crate::enroll::{self, CaSource, EnrollRequest, SecretNames};
use crate::inventory;
use crate::store::{FleetDir, FleetSettings};
use crate::{Error, Result};

/// The CA to issue with: existing files, or a new one.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Existing CA certificate (PEM). Without it a new CA is generated.
    #[arg(long, requires = "ca_key", env = "SEALED_OTA_CA_FILE")]
    ca_cert: Option<PathBuf>,
    /// Existing CA private key (PEM).
    #[arg(long, requires = "ca_cert", env = "SEALED_OTA_CA_KEY_FILE")]
    ca_key: Option<PathBuf>,
    /// Certificate validity in days.
    #[arg(long, default_value_t = 365)]
    validity_days: u32,
}

impl CaArgs {
    fn source(&self) -> CaSource {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CaSource::Generate {
                common_name: "sealed-ota-ca".into(),
            },
        }
    }
}

/// Where the Kubernetes objects go: applied, and/or written as YAML.
#[derive(Debug, Clone, Args)]
pub struct KubeOutputArgs {
    /// Namespace of the Kubernetes objects.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Apply the objects to the cluster of the current kubeconfig (server-side apply).
    #[arg(long)]
    apply: bool,
    /// Write the objects as multi-document YAML to this file ("-" for stdout).
    #[arg(long)]
    yaml: Option<PathBuf>,
}

/// Flags of `pki-init` (`sealed-ota pki init`).
#[derive(Debug, Args)]
pub struct PkiInitArgs {
    #[command(flatten)]
    ca: CaArgs,
    /// Directory for ca.crt, ca.key (new CA only), manager.crt, manager.key.
    #[arg(long, default_value = "pki")]
    out: PathBuf,
    /// Manager id (the manager certificate's name).
    #[arg(long, default_value = "manager")]
    manager_id: String,
    /// Name of the manager Secret (type kubernetes.io/tls: tls.crt, tls.key, ca.crt).
    #[arg(long, default_value = "sealed-ota-manager")]
    manager_secret: String,
    /// Name of the CA Secret (type kubernetes.io/tls: tls.crt, tls.key), for rotation campaigns.
    #[arg(long, default_value = "sealed-ota-ca")]
    ca_secret: String,
    #[command(flatten)]
    output: KubeOutputArgs,
}

/// Flags of `enroll` (`sealed-ota device enroll`).
#[derive(Debug, Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    ca: CaArgs,
    /// Fleet directory (created).
    #[arg(long, default_value = "fleet")]
    fleet: PathBuf,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    count: u32,
    /// Index of the first device.
    #[arg(long, default_value_t = 0)]
    first_index: u32,
    /// Device ids are <prefix>-<5-digit index>.
    #[arg(long, default_value = "dev")]
    id_prefix: String,
    /// Label put on every Device (repeatable): key=value.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Manager id the devices expect.
    #[arg(long, default_value = "manager")]
    manager_id: String,
    /// MQTT topic prefix.
    #[arg(long, default_value = "iot")]
    topic_prefix: String,
    /// Version a freshly enrolled device runs.
    #[arg(long, default_value = "1.0.0")]
    initial_version: String,
    /// Release public key the devices trust (repeatable): a PEM file as `sealed-ota release keygen`
    /// writes it (release.pub). With one, devices install only firmware it signed.
    #[arg(long = "release-key")]
    release_keys: Vec<PathBuf>,
    /// Enrol one device from the CSR it made (`sealed-ota-agent keygen`; its key never leaves
    /// it) instead of issuing identities into --fleet: the CSR is signed with the CA of
    /// --ca-cert/--ca-key (names, role, usage and validity from these flags, never from the CSR).
    #[arg(long, requires_all = ["id", "cert_out", "ca_cert"])]
    csr: Option<PathBuf>,
    /// With --csr: the device's id.
    #[arg(long, requires = "csr")]
    id: Option<String>,
    /// With --csr: where the device's certificate (PEM) is written.
    #[arg(long, requires = "csr")]
    cert_out: Option<PathBuf>,
    /// Enrol many devices from their CSRs: a CSV file with the columns id,csr,labels, one row
    /// per device (see the `inventory` module). Every row is checked and every CSR signed before
    /// anything is written; errors name the file, the line and the column.
    #[arg(long, requires_all = ["cert_dir", "ca_cert"], conflicts_with_all = ["csr", "count", "first_index", "id_prefix"])]
    inventory: Option<PathBuf>,
    /// With --inventory: the directory the devices' certificates are written to (<id>.crt).
    #[arg(long, requires = "inventory")]
    cert_dir: Option<PathBuf>,
    #[command(flatten)]
    output: KubeOutputArgs,
}

impl KubeOutputArgs {
    /// Whether `--yaml -` writes the objects to standard output.
    pub fn yaml_to_stdout(&self) -> bool {
        self.yaml.as_deref().is_some_and(|p| p.as_os_str() == "-")
    }
}

impl PkiInitArgs {
    /// Where the objects go.
    pub fn output(&self) -> &KubeOutputArgs {
        &self.output
    }
}

impl EnrollArgs {
    /// Where the objects go.
    pub fn output(&self) -> &KubeOutputArgs {
        &self.output
    }
}

fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

/// What `pki-init` made (the CLI prints it as a table or `-o json|yaml`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PkiReport {
    /// The manager id issued.
    pub manager_id: String,
    /// Where the files are.
    pub directory: PathBuf,
    /// Whether a new CA was generated (else the given one was used).
    pub new_ca: bool,
    /// Namespace of the Secrets.
    pub namespace: String,
    /// The manager Secret.
    pub manager_secret: String,
    /// The CA Secret.
    pub ca_secret: String,
    /// Whether the Secrets were applied to the cluster.
    pub applied: bool,
}

impl PkiReport {
    /// One line for a log.
    pub fn summary(&self) -> String {
        format!(
            "pki: manager {} issued; files in {}; Secrets {}/{} and {}/{}",
            self.manager_id,
            self.directory.display(),
            self.namespace,
            self.manager_secret,
            self.namespace,
            self.ca_secret
        )
    }
}

/// One device `enroll` issued an identity for.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolledDevice {
    /// Its id (and Device name).
    pub id: String,
    /// SHA-256 of its certificate (hex), pinned by its Device.
    pub certificate_fingerprint: String,
    /// Where its certificate was written (`--csr`, `--inventory`; the fleet directory holds the
    /// others').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
}

/// What `enroll` did (the CLI prints it as a table or `-o json|yaml`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollReport {
    /// Namespace of the Device resources.
    pub namespace: String,
    /// Whether they were applied to the cluster.
    pub applied: bool,
    /// The fleet directory (identities issued here, keys included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<PathBuf>,
    /// The devices.
    pub devices: Vec<EnrolledDevice>,
}

impl EnrollReport {
    fn new(
        output: &KubeOutputArgs,
        fleet: Option<PathBuf>,
        devices: &[serde_json::Value],
        certificate: impl Fn(&str) -> Option<PathBuf>,
    ) -> Self {
        let text = |d: &serde_json::Value, pointer: &str| {
            d.pointer(pointer)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        EnrollReport {
            namespace: output.namespace.clone(),
            applied: output.apply,
            fleet,
            devices: devices
                .iter()
                .map(|d| {
                    let id = text(d, "/metadata/name");
                    EnrolledDevice {
                        certificate: certificate(&id),
                        certificate_fingerprint: text(d, "/spec/certificateFingerprint"),
                        id,
                    }
                })
                .collect(),
        }
    }

    /// One line for a log.
    pub fn summary(&self) -> String {
        let place = match &self.fleet {
            Some(fleet) => format!(" in {}", fleet.display()),
            None => String::new(),
        };
        format!("enroll: {} devices{place}", self.devices.len())
    }
}

/// `pki-init`: create or load the CA, issue the manager identity, write the files and ship the
/// manager and CA Secrets.
pub async fn pki_init(args: PkiInitArgs) -> Result<PkiReport> {
    crate::install_crypto_provider();
    let now = unix_now();
    let source = args.ca.source();
    let ca = enroll::load_ca(&source, now, args.ca.validity_days)?;
    let names = SecretNames {
        namespace: args.output.namespace.clone(),
        manager: args.manager_secret,
        ca: args.ca_secret,
    };
    let generated = matches!(source, CaSource::Generate { .. });
    let bundle = enroll::pki_init(
        &ca,
        &args.manager_id,
        &args.out,
        generated,
        &names,
        now,
        args.ca.validity_days,
    )?;
    let secrets = [&bundle.manager_secret, &bundle.ca_secret];
    ship(&args.output, &secrets, |client| async move {
        enroll::apply_secrets(&client, &secrets).await
    })
    .await?;
    Ok(PkiReport {
        manager_id: args.manager_id,
        directory: args.out,
        new_ca: generated,
        namespace: names.namespace,
        manager_secret: names.manager,
        ca_secret: names.ca,
        applied: args.output.apply,
    })
}

/// `enroll`: issue device identities into a fleet directory and ship their `Device` resources
/// (needs a multi-threaded runtime).
pub async fn enroll_devices(args: EnrollArgs) -> Result<EnrollReport> {
    crate::install_crypto_provider();
    if let (Some(csr), Some(id), Some(cert_out)) = (&args.csr, &args.id, &args.cert_out) {
        return enroll_from_csr(&args, csr, id, cert_out).await;
    }
    if let (Some(inventory), Some(cert_dir)) = (&args.inventory, &args.cert_dir) {
        return enroll_inventory(&args, inventory, cert_dir).await;
    }
    let now = unix_now();
    let ca = enroll::load_ca(&args.ca.source(), now, args.ca.validity_days)?;
    let fleet = FleetDir::new(&args.fleet);
    let release_keys = args
        .release_keys
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
            let key = ReleaseKey::parse(&text).map_err(|source| Error::Identity {
                subject: format!("release key {}", path.display()),
                source,
            })?;
            Ok(hex::encode(key.sec1()))
        })
        .collect::<Result<Vec<_>>>()?;
    let settings = FleetSettings {
        manager_id: args.manager_id,
        topic_prefix: args.topic_prefix,
        initial_version: args.initial_version,
        release_keys,
    };
    let request = EnrollRequest {
        id_prefix: args.id_prefix,
        first_index: args.first_index,
        count: args.count,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        namespace: args.output.namespace.clone(),
        validity_days: args.ca.validity_days,
    };
    let devices =
        tokio::task::block_in_place(|| enroll::enroll(&ca, &fleet, &settings, &request, now))?;
    let devices_ref = &devices;
    ship(&args.output, &devices, |client| async move {
        enroll::apply_devices(&client, devices_ref, 32).await
    })
    .await?;
    Ok(EnrollReport::new(
        &args.output,
        Some(fleet.root().to_path_buf()),
        &devices,
        |_| None,
    ))
}

/// A device's certificate issued from its CSR: the PEM and the SHA-256 of its DER.
struct Issued {
    cert_pem: String,
    fingerprint: [u8; 32],
}

/// Signs the CSR in `csr_path` for device `id` (names, role, usage and validity from the flags,
/// never from the CSR); `what` says where the CSR came from in errors (`--csr FILE`, or the
/// inventory's file, line and column).
fn issue_from_csr(
    ca: &CertificateAuthority,
    validity_days: u32,
    now: u64,
    csr_path: &Path,
    id: &str,
    what: &str,
) -> Result<Issued> {
    let text = std::fs::read_to_string(csr_path)
        .map_err(|e| Error::Config(format!("{what}: reading {}: {e}", csr_path.display())))?;
    let csr = pem::parse(text.as_bytes())
        .ok()
        .filter(|p| p.tag() == "CERTIFICATE REQUEST")
        .ok_or_else(|| {
            Error::Config(format!(
                "{what}: {} is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----); use the CSR `sealed-ota-agent keygen` printed",
                csr_path.display()
            ))
        })?;
    let cert_der = ca
        .issue_for_csr(
            csr.contents(),
            Role::Device,
            id,
            now.saturating_sub(60),
            validity_days,
        )
        .map_err(|e| {
            Error::Config(format!(
                "{what}: cannot issue a certificate for device {id:?} from {}: {e}",
                csr_path.display()
            ))
        })?;
    Ok(Issued {
        cert_pem: pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone())),
        fingerprint: Sha256::digest(&cert_der).into(),
    })
}

/// `enroll --csr`: signs one device's CSR with the CA, writes its certificate and ships its
/// `Device` resource pinning the certificate's fingerprint.
async fn enroll_from_csr(
    args: &EnrollArgs,
    csr_path: &Path,
    id: &str,
    cert_out: &Path,
) -> Result<EnrollReport> {
    let now = unix_now();
    let ca = enroll::load_ca(&args.ca.source(), now, args.ca.validity_days)?;
    let what = format!("--csr {}", csr_path.display());
    let issued = issue_from_csr(&ca, args.ca.validity_days, now, csr_path, id, &what)?;
    std::fs::write(cert_out, &issued.cert_pem).map_err(|e| Error::io("writing", cert_out, e))?;
    let labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    let device =
        enroll::device_resource_for(id, &issued.fingerprint, &args.output.namespace, &labels);
    let devices = [device];
    let devices_ref = &devices;
    ship(&args.output, &devices, |client| async move {
        enroll::apply_devices(&client, devices_ref, 1).await
    })
    .await?;
    Ok(EnrollReport::new(&args.output, None, &devices, |_| {
        Some(cert_out.to_path_buf())
    }))
}

/// `enroll --inventory`: checks every row and signs every CSR first (a bad row stops the command
/// before anything is written), then writes the certificates into `cert_dir` and ships the
/// `Device` resources.
async fn enroll_inventory(args: &EnrollArgs, path: &Path, cert_dir: &Path) -> Result<EnrollReport> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let rows = inventory::parse(path, &text)?;
    let now = unix_now();
    let ca = enroll::load_ca(&args.ca.source(), now, args.ca.validity_days)?;
    let common: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    let mut issued = Vec::with_capacity(rows.len());
    for row in &rows {
        let what = format!("{}:{}: csr", path.display(), row.line);
        let cert = tokio::task::block_in_place(|| {
            issue_from_csr(&ca, args.ca.validity_days, now, &row.csr, &row.id, &what)
        })?;
        let mut labels = common.clone();
        labels.extend(row.labels.clone());
        let device = enroll::device_resource_for(
            &row.id,
            &cert.fingerprint,
            &args.output.namespace,
            &labels,
        );
        issued.push((row, cert, device));
    }
    let cert_file = |id: &str| cert_dir.join(format!("{id}.crt"));
    std::fs::create_dir_all(cert_dir).map_err(|e| Error::io("creating", cert_dir, e))?;
    for (row, cert, _) in &issued {
        let out = cert_file(&row.id);
        std::fs::write(&out, &cert.cert_pem).map_err(|e| Error::io("writing", &out, e))?;
    }
    let devices: Vec<serde_json::Value> = issued.into_iter().map(|(_, _, d)| d).collect();
    let devices_ref = &devices;
    ship(&args.output, &devices, |client| async move {
        enroll::apply_devices(&client, devices_ref, 32).await
    })
    .await?;
    Ok(EnrollReport::new(&args.output, None, &devices, |id| {
        Some(cert_file(id))
    }))
}

/// Writes `objects` as YAML and/or applies them, as the output flags ask.
async fn ship<T, F, Fut>(output: &KubeOutputArgs, objects: &[T], apply: F) -> Result<()>
where
    T: serde::Serialize,
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    if let Some(path) = &output.yaml {
        let yaml = enroll::to_yaml_stream(objects)?;
        if path.as_os_str() == "-" {
            print!("{yaml}");
        } else {
            std::fs::write(path, yaml).map_err(|e| Error::io("writing", path, e))?;
        }
    }
    if output.apply {
        apply(enroll::kube_client().await?).await?;
    }
    Ok(())
}
