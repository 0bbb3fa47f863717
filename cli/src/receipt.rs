//! `sealed-ota receipt verify`: check a device's signed receipt, kept on its Device status as
//! evidence, with nothing but the device's certificate (and, with `--ca`, that the CA issued that
//! certificate to the device the receipt names). The cryptography is the protocol's
//! (`verify_receipt`, `TrustAnchor`); this module reads the Device, compares the certificate's
//! fingerprint with the one the operator recorded, and prints the claim.

use std::path::PathBuf;

use base64::Engine as _;
use clap::{Args, Subcommand};
use kube::Api;
use sealed_ota_operator::crd::Device;
use sealed_ota_protocol::{verify_receipt, Claim, ReceiptBody, Role, TrustAnchor};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota receipt`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify the signed receipt on a Device's status with the device's certificate and print
    /// what it claims. Exits 1 when it does not verify.
    Verify(VerifyArgs),
}

/// `receipt verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The Device resource's name.
    #[arg(long)]
    device: String,
    /// Its namespace.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The device's certificate (PEM) whose key signed the receipt (the emulator keeps it at
    /// <fleet>/devices/<id>/cert.pem).
    #[arg(long)]
    cert: PathBuf,
    /// Also check that this CA (PEM) issued the certificate to the device the receipt names.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// What a verified receipt says.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    /// The device that signed it.
    pub device_id: String,
    /// The manager it answered.
    pub manager_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// Installed, RolledBack or Rejected.
    pub outcome: String,
    /// The version the claim is about (none for a refusal).
    pub version: Option<String>,
    /// SHA-256 (hex) of what was installed or tried, when the claim names it.
    pub sha256: Option<String>,
    /// Id (hex) of the release key the device verified, when it names one.
    pub release_key: Option<String>,
    /// The device's reason, for a rollback or a refusal.
    pub reason: Option<String>,
    /// SHA-256 (hex) of the certificate that verified it.
    pub certificate_fingerprint: String,
    /// Whether `--ca` issued that certificate to `device_id`.
    pub ca_checked: bool,
}

/// Run a `receipt` subcommand.
pub fn run(command: Command) -> Result<String> {
    let Command::Verify(args) = command;
    let device = crate::runtime::block_on(read_device(&args))??;
    let status = device.status.and_then(|s| s.campaign);
    let recorded = status
        .as_ref()
        .and_then(|c| c.receipt_certificate_fingerprint.clone());
    let receipt = status.and_then(|c| c.receipt).ok_or_else(|| Error::Flag {
        flag: "--device",
        detail: format!(
            "Device {} has no receipt on its status yet (no campaign finished on it)",
            args.device
        ),
    })?;
    let receipt = base64::engine::general_purpose::STANDARD
        .decode(receipt.trim())
        .map_err(|e| {
            Error::Refused(format!(
                "the receipt on Device {} is not base64: {e}",
                args.device
            ))
        })?;
    let cert_der = read_pem(&args.cert, "--cert")?;
    let ca = args
        .ca
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .map_err(|e| Error::io("reading", path, e))
                .and_then(|pem| {
                    TrustAnchor::from_pem(&pem).map_err(|e| Error::Flag {
                        flag: "--ca",
                        detail: format!("{}: {e}; pass the CA certificate in PEM", path.display()),
                    })
                })
        })
        .transpose()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let verified = verify(
        &receipt,
        &cert_der,
        recorded.as_deref(),
        ca.as_ref().map(|ca| (ca, now)),
    )?;
    output::render(args.output, &verified, || table(&verified))
}

async fn read_device(args: &VerifyArgs) -> Result<Device> {
    Api::<Device>::namespaced(crate::runtime::kube_client().await?, &args.namespace)
        .get_opt(&args.device)
        .await
        .map_err(|e| Error::Flag {
            flag: "KUBECONFIG",
            detail: format!("reading Device {}: {e}", args.device),
        })?
        .ok_or_else(|| Error::Flag {
            flag: "--device",
            detail: format!(
                "no Device {:?} in namespace {:?}; check the name and -n/--namespace",
                args.device, args.namespace
            ),
        })
}

fn read_pem(path: &std::path::Path, flag: &'static str) -> Result<Vec<u8>> {
    let text = std::fs::read(path).map_err(|e| Error::Flag {
        flag,
        detail: format!("cannot read {}: {e}", path.display()),
    })?;
    pem::parse(&text)
        .map(|p| p.into_contents())
        .map_err(|e| Error::Flag {
            flag,
            detail: format!("{}: {e}; pass a PEM certificate", path.display()),
        })
}

/// Verify `receipt` with `cert_der` (pure): the certificate must be the one the operator recorded
/// (`recorded`, hex SHA-256) when it recorded one, its key must have signed the receipt, and with
/// a CA, the CA must have issued it to the device the receipt names.
pub fn verify(
    receipt: &[u8],
    cert_der: &[u8],
    recorded: Option<&str>,
    ca: Option<(&TrustAnchor, u64)>,
) -> Result<Verified> {
    let fingerprint = hex::encode(Sha256::digest(cert_der));
    if let Some(recorded) = recorded {
        if !recorded.eq_ignore_ascii_case(&fingerprint) {
            return Err(Error::Flag {
                flag: "--cert",
                detail: format!("the certificate's fingerprint {fingerprint} is not the one that signed the receipt ({recorded}); pass that device certificate"),
            });
        }
    }
    let body: ReceiptBody = verify_receipt(receipt, cert_der)
        .map_err(|e| Error::Refused(format!("the receipt does not verify: {e}")))?;
    if let Some((anchor, now)) = ca {
        anchor
            .verify(cert_der, Role::Device, &body.device_id, now)
            .map_err(|e| {
                Error::Refused(format!(
                    "the CA did not issue --cert to device {:?}: {e}",
                    body.device_id
                ))
            })?;
    }
    let (outcome, version, sha256, release_key, reason) = match body.claim {
        Claim::Installed {
            version,
            sha256,
            release_key,
        } => ("Installed", Some(version), Some(sha256), release_key, None),
        Claim::RolledBack {
            version,
            sha256,
            reason,
        } => (
            "RolledBack",
            Some(version),
            Some(sha256),
            None,
            Some(reason),
        ),
        Claim::Rejected { reason } => ("Rejected", None, None, None, Some(format!("{reason:?}"))),
    };
    Ok(Verified {
        device_id: body.device_id,
        manager_id: body.manager_id,
        campaign_id: body.campaign_id,
        outcome: outcome.into(),
        version,
        sha256: sha256.map(hex::encode),
        release_key: release_key.map(hex::encode),
        reason,
        certificate_fingerprint: fingerprint,
        ca_checked: ca.is_some(),
    })
}

fn table(v: &Verified) -> String {
    let mut rows = vec![
        vec!["receipt".to_string(), "verified".into()],
        vec!["device".into(), v.device_id.clone()],
        vec!["manager".into(), v.manager_id.clone()],
        vec!["campaign".into(), v.campaign_id.clone()],
        vec!["outcome".into(), v.outcome.clone()],
    ];
    let optional = [
        ("version", &v.version),
        ("sha256", &v.sha256),
        ("release key", &v.release_key),
        ("reason", &v.reason),
    ];
    rows.extend(
        optional
            .iter()
            .filter_map(|(k, x)| x.as_ref().map(|x| vec![k.to_string(), x.clone()])),
    );
    rows.push(vec![
        "certificate".into(),
        v.certificate_fingerprint.clone(),
    ]);
    rows.push(vec![
        "issued by --ca".into(),
        if v.ca_checked { "yes" } else { "not checked" }.into(),
    ]);
    output::columns(&rows)
}
