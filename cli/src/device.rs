//! `sealed-ota device enroll --csr`: enrolment of a device whose key never leaves it. The device
//! made its key and a CSR (`sealed-ota-agent keygen`); this signs the CSR with the fleet CA (the
//! names, role, usage and validity come from the arguments, never from the CSR) and describes the
//! device as a `Device` resource pinning the new certificate's fingerprint, printed as YAML or
//! applied to the cluster. Certificates come from the protocol crate's CA and the resource from
//! the same code the emulator enrolls with (`sealed_ota_device_emulator::enroll`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use sealed_ota_device_emulator::enroll::{self, CaSource};
use sealed_ota_protocol::Role;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Subcommands of `sealed-ota device`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sign a device's CSR with the fleet CA, write its certificate, and print (or apply) its
    /// Device resource.
    Enroll(EnrollArgs),
}

/// `device enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The device's CSR (PEM), made on the device by `sealed-ota-agent keygen`.
    #[arg(long)]
    pub csr: PathBuf,
    /// The device id the certificate names (the agent's `device.id`).
    #[arg(long)]
    pub id: String,
    /// The fleet CA's certificate (PEM).
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// The fleet CA's private key (PEM).
    #[arg(long)]
    pub ca_key: PathBuf,
    /// Where to write the device's certificate (install it as the agent's `device.cert_file`).
    #[arg(long)]
    pub cert_out: PathBuf,
    /// Certificate validity in days.
    #[arg(long, default_value_t = 825)]
    pub validity_days: u32,
    /// Label of the Device resource, `key=value` (repeatable); campaigns select devices by them.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Namespace of the Device resource.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Apply the Device resource (server-side apply, KUBECONFIG) instead of printing it.
    #[arg(long)]
    pub apply: bool,
}

fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("label {text:?} is not key=value")),
    }
}

/// Runs one `device` subcommand; returns what to print.
pub fn run(command: Command) -> Result<String> {
    match command {
        Command::Enroll(args) => enroll_from_csr(&args),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))
}

fn enroll_from_csr(args: &EnrollArgs) -> Result<String> {
    let csr_pem = read(&args.csr)?;
    let csr = pem::parse(csr_pem.as_bytes())
        .ok()
        .filter(|p| p.tag() == "CERTIFICATE REQUEST")
        .ok_or_else(|| Error::Invalid {
            path: args.csr.clone(),
            detail: "not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----); use the CSR `sealed-ota-agent keygen` printed".into(),
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ca = enroll::load_ca(
        &CaSource::Files {
            cert: args.ca_cert.clone(),
            key: args.ca_key.clone(),
        },
        now,
        args.validity_days,
    )
    .map_err(|e| Error::Enroll(e.to_string()))?;
    let cert_der = ca
        .issue_for_csr(
            csr.contents(),
            Role::Device,
            &args.id,
            now.saturating_sub(60),
            args.validity_days,
        )
        .map_err(|e| Error::Invalid {
            path: args.csr.clone(),
            detail: format!("cannot issue a certificate for --id {:?}: {e}", args.id),
        })?;
    let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone()));
    std::fs::write(&args.cert_out, &cert_pem)
        .map_err(|e| Error::io("writing", &args.cert_out, e))?;
    let fingerprint: [u8; 32] = Sha256::digest(&cert_der).into();
    let labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    let device = enroll::device_resource_for(&args.id, &fingerprint, &args.namespace, &labels);
    if !args.apply {
        return enroll::to_yaml_stream(&[device]).map_err(|e| Error::Enroll(e.to_string()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Enroll(format!("starting the runtime: {e}")))?;
    runtime
        .block_on(async {
            let client = enroll::kube_client().await?;
            enroll::apply_devices(&client, &[device], 1).await
        })
        .map_err(|e| Error::Enroll(e.to_string()))?;
    Ok(format!(
        "device/{} applied in namespace {} (certificate {}, fingerprint {})\n",
        args.id,
        args.namespace,
        args.cert_out.display(),
        hex::encode(fingerprint)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value() {
        assert_eq!(
            parse_label("fleet=a=b").unwrap(),
            ("fleet".to_string(), "a=b".to_string())
        );
        assert!(parse_label("=x").is_err());
        assert!(parse_label("fleet").is_err());
    }
}
