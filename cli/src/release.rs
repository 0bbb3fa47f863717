//! `sealed-ota release`: make a release key pair, sign a firmware image with it, verify a signature.
//! The release key is the offline role: keep `release.key` out of the cluster (an HSM or the release
//! pipeline's secret store); devices are enrolled with `release.pub`. The signature is printed as the
//! JSON a campaign carries in `spec.payload.firmware.releaseSignature` (`-o json`, and the file of
//! `--out`); every subcommand prints a table by default and `-o json|yaml` for pipelines.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use sealed_ota_protocol::{ReleaseKey, ReleaseSignature, ReleaseSigner};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota release`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a release key pair: DIR/release.key (PKCS#8 PEM, mode 0600) and DIR/release.pub.
    Keygen(KeygenArgs),
    /// Sign a firmware image for a version: prints the signature (a table, or with -o json the
    /// JSON a campaign carries; --out writes that JSON to a file).
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
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
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
    /// Output format (`-o json` prints the file `--out` writes).
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
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
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// What `release keygen` made.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeygenReport {
    /// The key id (SHA-256 of the public key, hex).
    pub key_id: String,
    /// The private key file (keep it offline).
    pub private_key: PathBuf,
    /// The public key file (enroll devices with it).
    pub public_key: PathBuf,
}

/// What `release verify` checked (printed only when the signature verifies).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// The signing key's id.
    pub key_id: String,
    /// The image checked.
    pub image: PathBuf,
    /// The version it verifies for.
    pub version: String,
    /// The image's size.
    pub size: u64,
    /// Always true: a signature that does not verify is an error.
    pub verified: bool,
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
        Command::Keygen(args) => {
            let r = keygen(&args)?;
            output::render(args.output, &r, || {
                output::columns(&[
                    vec!["release key".into(), r.key_id.clone()],
                    vec![
                        "private key".into(),
                        format!("{} (keep it offline)", r.private_key.display()),
                    ],
                    vec![
                        "public key".into(),
                        format!("{} (enroll devices with it)", r.public_key.display()),
                    ],
                ])
            })
        }
        Command::Sign(args) => {
            let f = sign(&args)?;
            output::render(args.output, &f, || sign_table(&f))
        }
        Command::Verify(args) => {
            let r = verify(&args)?;
            output::render(args.output, &r, || {
                format!(
                    "release signature by key {} verifies for {} version {} ({} bytes)\n",
                    r.key_id,
                    r.image.display(),
                    r.version,
                    r.size
                )
            })
        }
    }
}

/// A signature as a table (pure): what was signed and the two values of `releaseSignature`.
fn sign_table(f: &SignatureFile) -> String {
    output::columns(&[
        vec!["version".into(), f.version.clone()],
        vec!["size".into(), f.size.to_string()],
        vec!["sha256".into(), f.sha256.clone()],
        vec!["key id".into(), f.key_id.clone()],
        vec![
            "releaseSignature.publicKey".into(),
            f.release_signature.public_key.clone(),
        ],
        vec![
            "releaseSignature.signature".into(),
            f.release_signature.signature.clone(),
        ],
    ]) + "(paste releaseSignature into spec.payload.firmware; -o json or --out FILE gives it as JSON)\n"
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

fn keygen(args: &KeygenArgs) -> Result<KeygenReport> {
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
    Ok(KeygenReport {
        key_id: hex::encode(signer.public().id()),
        private_key: private,
        public_key: public,
    })
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

fn sign(args: &SignArgs) -> Result<SignatureFile> {
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
    Ok(file)
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

fn verify(args: &VerifyArgs) -> Result<VerifyReport> {
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
    Ok(VerifyReport {
        key_id: hex::encode(key.id()),
        image: args.image.clone(),
        version: args.version.clone(),
        size,
        verified: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_sign_verify_round_trip_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let made = keygen(&KeygenArgs {
            out: dir.clone(),
            force: false,
            output: Format::Table,
        })
        .unwrap();
        assert_eq!(made.private_key, dir.join("release.key"));
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
                force: false,
                output: Format::Table,
            }),
            Err(Error::Exists { .. })
        ));
        let image = tmp.path().join("fw.bin");
        std::fs::write(&image, vec![7u8; 100_000]).unwrap();
        let out = tmp.path().join("fw.sig.json");
        let file = sign(&SignArgs {
            key: dir.join("release.key"),
            image: image.clone(),
            version: "1.2.0".into(),
            out: Some(out.clone()),
            output: Format::Json,
        })
        .unwrap();
        assert_eq!(file.size, 100_000);
        let written: SignatureFile =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(written, file);
        let table = sign_table(&file);
        assert!(
            table.contains(&format!(
                "releaseSignature.signature  {}",
                file.release_signature.signature
            )),
            "{table}"
        );
        let verify_as = |version: &str, image: &Path| {
            verify(&VerifyArgs {
                public: dir.join("release.pub"),
                image: image.to_path_buf(),
                version: version.into(),
                signature: out.clone(),
                output: Format::Table,
            })
        };
        assert_eq!(verify_as("1.2.0", &image).unwrap().key_id, file.key_id);
        assert!(matches!(verify_as("1.2.1", &image), Err(Error::Refused(_))));
        let other = tmp.path().join("other.bin");
        std::fs::write(&other, b"other").unwrap();
        assert!(matches!(verify_as("1.2.0", &other), Err(Error::Refused(_))));
        assert!(sign(&SignArgs {
            key: dir.join("release.pub"),
            image,
            version: "1.2.0".into(),
            out: None,
            output: Format::Table,
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
