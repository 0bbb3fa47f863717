//! `sealed-ota release`: make a release key pair, sign a firmware image with it, verify a signature.
//! The release key is the offline role: keep `release.key` out of the cluster (an HSM or the release
//! pipeline's secret store); devices are enrolled with `release.pub`. The signature is printed as the
//! JSON a campaign carries in `spec.payload.firmware.releaseSignature`.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use sealed_ota_protocol::{ReleaseKey, ReleaseSignature, ReleaseSigner};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Subcommands of `sealed-ota release`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a release key pair: DIR/release.key (PKCS#8 PEM, mode 0600) and DIR/release.pub.
    Keygen(KeygenArgs),
    /// Sign a firmware image for a version: prints the signature JSON (and writes it with --out).
    Sign(SignArgs),
    /// Verify a signature JSON against an image, a version and a trusted public key.
    Verify(VerifyArgs),
}

/// `release keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory for release.key and release.pub (created).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

/// `release sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The release private key (release.key).
    #[arg(long)]
    pub key: PathBuf,
    /// The firmware image.
    #[arg(long)]
    pub image: PathBuf,
    /// The version the campaign delivers it as (spec.targetVersion).
    #[arg(long)]
    pub version: String,
    /// Also write the signature JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `release verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A trusted release public key (release.pub).
    #[arg(long = "pub")]
    pub public: PathBuf,
    /// The firmware image.
    #[arg(long)]
    pub image: PathBuf,
    /// The version.
    #[arg(long)]
    pub version: String,
    /// The signature JSON that `release sign` printed.
    #[arg(long)]
    pub signature: PathBuf,
}

/// What `release sign` prints: the statement signed and the campaign's `releaseSignature`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureFile {
    /// Version signed.
    pub version: String,
    /// Image size in bytes.
    pub size: u64,
    /// Image SHA-256 (hex).
    pub sha256: String,
    /// Release key id (SHA-256 of the public key, hex), as campaign and Device status show it.
    pub key_id: String,
    /// Paste into `spec.payload.firmware.releaseSignature`.
    pub release_signature: CampaignSignature,
}

/// `spec.payload.firmware.releaseSignature` of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignSignature {
    /// Uncompressed P-256 public key, 130 hex characters.
    pub public_key: String,
    /// r||s, 128 hex characters.
    pub signature: String,
}

/// Run a `release` subcommand; returns what to print.
pub fn run(command: Command) -> Result<String> {
    match command {
        Command::Keygen(args) => keygen(&args),
        Command::Sign(args) => sign(&args),
        Command::Verify(args) => verify(&args),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))
}

/// SHA-256 and size of a file, streamed.
fn digest(path: &Path) -> Result<([u8; 32], u64)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize().into(), size))
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|e| Error::io("writing", path, e))
}

fn keygen(args: &KeygenArgs) -> Result<String> {
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io("creating", &args.out, e))?;
    let private = args.out.join("release.key");
    let public = args.out.join("release.pub");
    if !args.force {
        if let Some(existing) = [&private, &public].into_iter().find(|p| p.exists()) {
            return Err(Error::Exists {
                path: existing.clone(),
            });
        }
    }
    let signer = ReleaseSigner::generate();
    write_file(&private, &signer.to_pem(), true)?;
    write_file(&public, &signer.public().to_pem(), false)?;
    Ok(format!(
        "release key {}\nprivate key: {} (keep it offline)\npublic key:  {} (enroll devices with it)\n",
        hex::encode(signer.public().id()),
        private.display(),
        public.display()
    ))
}

/// The signature file of `image` (its digest already computed) for `version`.
fn signature_file(
    signer: &ReleaseSigner,
    version: &str,
    sha256: [u8; 32],
    size: u64,
) -> SignatureFile {
    let sig = signer.sign(version, size, &sha256);
    SignatureFile {
        version: version.to_string(),
        size,
        sha256: hex::encode(sha256),
        key_id: hex::encode(sig.key_id()),
        release_signature: CampaignSignature {
            public_key: hex::encode(&sig.public_key),
            signature: hex::encode(sig.signature),
        },
    }
}

fn sign(args: &SignArgs) -> Result<String> {
    semver_check(&args.version)?;
    let pem = zeroize::Zeroizing::new(read_text(&args.key)?);
    let signer = ReleaseSigner::from_pem(&pem).map_err(|e| Error::Invalid {
        path: args.key.clone(),
        detail: format!("{e}; pass the release.key that `sealed-ota release keygen` wrote"),
    })?;
    let (sha256, size) = digest(&args.image)?;
    let file = signature_file(&signer, &args.version, sha256, size);
    let text = serde_json::to_string_pretty(&file).unwrap_or_default() + "\n";
    if let Some(out) = &args.out {
        write_file(out, &text, false)?;
    }
    Ok(text)
}

fn semver_check(version: &str) -> Result<()> {
    // The campaign's targetVersion is checked the same way by the apiserver and the devices.
    let ok = version.split(['-', '+']).next().is_some_and(|core| {
        let parts: Vec<&str> = core.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "--version {version:?} is not a semantic version such as 1.4.2 (sign the exact spec.targetVersion)"
        )))
    }
}

fn verify(args: &VerifyArgs) -> Result<String> {
    let key = ReleaseKey::parse(&read_text(&args.public)?).map_err(|e| Error::Invalid {
        path: args.public.clone(),
        detail: format!("{e}; pass the release.pub that `sealed-ota release keygen` wrote"),
    })?;
    let text = read_text(&args.signature)?;
    let file: SignatureFile = serde_json::from_str(&text).map_err(|e| Error::Invalid {
        path: args.signature.clone(),
        detail: format!("not the JSON `sealed-ota release sign` prints: {e}"),
    })?;
    let sig = ReleaseSignature::from_hex(
        &file.release_signature.public_key,
        &file.release_signature.signature,
    )
    .map_err(|e| Error::Invalid {
        path: args.signature.clone(),
        detail: e.to_string(),
    })?;
    let (sha256, size) = digest(&args.image)?;
    ReleaseSignature::check(
        Some(&sig),
        std::slice::from_ref(&key),
        &args.version,
        size,
        &sha256,
    )
    .map_err(Error::Refused)?;
    Ok(format!(
        "release signature by key {} verifies for {} version {} ({size} bytes)\n",
        hex::encode(key.id()),
        args.image.display(),
        args.version
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_sign_verify_round_trip_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        keygen(&KeygenArgs {
            out: dir.clone(),
            force: false,
        })
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("release.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            keygen(&KeygenArgs {
                out: dir.clone(),
                force: false
            }),
            Err(Error::Exists { .. })
        ));
        let image = tmp.path().join("fw.bin");
        std::fs::write(&image, vec![7u8; 100_000]).unwrap();
        let out = tmp.path().join("fw.sig.json");
        let printed = sign(&SignArgs {
            key: dir.join("release.key"),
            image: image.clone(),
            version: "1.2.0".into(),
            out: Some(out.clone()),
        })
        .unwrap();
        let file: SignatureFile = serde_json::from_str(&printed).unwrap();
        assert_eq!(file.size, 100_000);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), printed);
        let verify_as = |version: &str, image: &Path| {
            verify(&VerifyArgs {
                public: dir.join("release.pub"),
                image: image.to_path_buf(),
                version: version.into(),
                signature: out.clone(),
            })
        };
        assert!(verify_as("1.2.0", &image).unwrap().contains(&file.key_id));
        assert!(matches!(verify_as("1.2.1", &image), Err(Error::Refused(_))));
        let other = tmp.path().join("other.bin");
        std::fs::write(&other, b"other").unwrap();
        assert!(matches!(verify_as("1.2.0", &other), Err(Error::Refused(_))));
        assert!(sign(&SignArgs {
            key: dir.join("release.pub"),
            image,
            version: "1.2.0".into(),
            out: None,
        })
        .unwrap_err()
        .to_string()
        .contains("release.key"));
        assert!(semver_check("v1.0").is_err());
        assert!(semver_check("1.0.0-rc.1+b7").is_ok());
    }

    /// What the CLI prints is what the operator and the devices accept.
    #[test]
    fn the_printed_signature_is_the_protocol_signature() {
        let signer = ReleaseSigner::generate();
        let file = signature_file(&signer, "3.0.0", [9; 32], 42);
        let sig = ReleaseSignature::from_hex(
            &file.release_signature.public_key,
            &file.release_signature.signature,
        )
        .unwrap();
        assert_eq!(file.release_signature.public_key.len(), 130);
        assert_eq!(file.release_signature.signature.len(), 128);
        assert!(sig.verifies_for("3.0.0", 42, &[9; 32]));
        assert_eq!(file.key_id, hex::encode(signer.public().id()));
    }
}
