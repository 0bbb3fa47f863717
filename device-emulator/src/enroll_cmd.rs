//! The `pki-init` and `enroll` commands (flags and what they do), shared by the emulator's
//! subcommands and the `sealed-ota` CLI (`pki init`, `device enroll`), so both tools bootstrap
//! the PKI and enroll devices with the same code: create or load the CA, issue the manager
//! identity and the device identities (files in a fleet directory), or sign one device's CSR
//! (`enroll --csr`: a real device whose key never leaves it, as `sealed-ota-agent keygen` makes
//! it), and ship the Secrets and `Device` resources (applied by server-side apply, or written as
//! YAML for GitOps).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use sealed_ota_protocol::{ReleaseKey, Role};
use sha2::{Digest, Sha256};

use crate::device::unix_now;
use crate::enroll::{self, CaSource, EnrollRequest, SecretNames};
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
#[derive(Debug, Args)]
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
    #[command(flatten)]
    output: KubeOutputArgs,
}

fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

/// `pki-init`: create or load the CA, issue the manager identity, write the files and ship the
/// manager and CA Secrets.
pub async fn pki_init(args: PkiInitArgs) -> Result<()> {
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
    eprintln!(
        "pki: manager {} issued; files in {}; Secrets {}/{} and {}/{}",
        args.manager_id,
        args.out.display(),
        names.namespace,
        names.manager,
        names.namespace,
        names.ca
    );
    Ok(())
}

/// `enroll`: issue device identities into a fleet directory and ship their `Device` resources
/// (needs a multi-threaded runtime).
pub async fn enroll_devices(args: EnrollArgs) -> Result<()> {
    crate::install_crypto_provider();
    if let (Some(csr), Some(id), Some(cert_out)) = (&args.csr, &args.id, &args.cert_out) {
        return enroll_from_csr(&args, csr, id, cert_out).await;
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
    eprintln!(
        "enroll: {} devices in {}",
        devices.len(),
        fleet.root().display()
    );
    Ok(())
}

/// `enroll --csr`: signs one device's CSR with the CA, writes its certificate and ships its
/// `Device` resource pinning the certificate's fingerprint.
async fn enroll_from_csr(
    args: &EnrollArgs,
    csr_path: &Path,
    id: &str,
    cert_out: &Path,
) -> Result<()> {
    let now = unix_now();
    let ca = enroll::load_ca(&args.ca.source(), now, args.ca.validity_days)?;
    let text = std::fs::read_to_string(csr_path).map_err(|e| Error::io("reading", csr_path, e))?;
    let csr = pem::parse(text.as_bytes())
        .ok()
        .filter(|p| p.tag() == "CERTIFICATE REQUEST")
        .ok_or_else(|| {
            Error::Config(format!(
                "--csr {}: not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----); use the CSR `sealed-ota-agent keygen` printed",
                csr_path.display()
            ))
        })?;
    let cert_der = ca
        .issue_for_csr(
            csr.contents(),
            Role::Device,
            id,
            now.saturating_sub(60),
            args.ca.validity_days,
        )
        .map_err(|e| {
            Error::Config(format!(
                "--csr {}: cannot issue a certificate for --id {id:?}: {e}",
                csr_path.display()
            ))
        })?;
    let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone()));
    std::fs::write(cert_out, cert_pem).map_err(|e| Error::io("writing", cert_out, e))?;
    let fingerprint: [u8; 32] = Sha256::digest(&cert_der).into();
    let labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    let device = enroll::device_resource_for(id, &fingerprint, &args.output.namespace, &labels);
    let devices = [device];
    let devices_ref = &devices;
    ship(&args.output, &devices, |client| async move {
        enroll::apply_devices(&client, devices_ref, 1).await
    })
    .await?;
    eprintln!(
        "enroll: device {id} from its CSR: certificate {} (fingerprint {})",
        cert_out.display(),
        hex::encode(fingerprint)
    );
    Ok(())
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
