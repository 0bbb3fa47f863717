//! Reading Mender artifacts (format version 3, as `mender-artifact write module-image` makes them),
//! so that existing Update Modules get the work tree they expect. It owns the artifact's layout: a
//! tar of `version`, `manifest` (SHA-256 of every other part), `header.tar[.gz]` (`header-info`,
//! `headers/0000/type-info`, `headers/0000/meta-data`) and `data/0000.tar[.gz]` (the payload files).
//! Every part is checked against the manifest as it is read. Not supported (refused with a clear
//! error): xz or zstd compression, augmented artifacts, more than one payload. The artifact's own
//! signature (`manifest.sig`) is not checked: the whole file is already verified against the signed
//! Sealed OTA manifest before this module reads it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why an artifact cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Reading failed.
    #[error("reading the artifact: {0}")]
    Io(#[from] io::Error),
    /// It is not an artifact this agent reads.
    #[error("not a supported Mender artifact: {0}")]
    Format(String),
    /// A part does not match the artifact's manifest.
    #[error("artifact part {part} has SHA-256 {actual}, its manifest says {expected}")]
    Checksum {
        /// The part (`header.tar.gz`, `data/0000/<file>`).
        part: String,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
}

fn format_err(what: impl Into<String>) -> ArtifactError {
    ArtifactError::Format(what.into())
}

/// The header of a single-payload artifact.
#[derive(Debug, Clone)]
pub struct Header {
    /// `artifact_provides.artifact_name`.
    pub artifact_name: String,
    /// `artifact_provides.artifact_group` (empty when absent).
    pub artifact_group: String,
    /// The payload's type: the name of the module that installs it.
    pub payload_type: String,
    /// `artifact_depends.device_type`.
    pub device_types: Vec<String>,
    /// `header-info`, verbatim.
    pub header_info: Vec<u8>,
    /// `headers/0000/type-info`, verbatim.
    pub type_info: Vec<u8>,
    /// `headers/0000/meta-data`, verbatim (`null` when the artifact has none, as Mender writes).
    pub meta_data: Vec<u8>,
    /// The manifest: part path → hex SHA-256.
    checksums: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Version {
    format: String,
    version: u32,
}

#[derive(Deserialize)]
struct HeaderInfo {
    payloads: Vec<PayloadEntry>,
    artifact_provides: Provides,
    #[serde(default)]
    artifact_depends: Depends,
}

#[derive(Deserialize)]
struct PayloadEntry {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Provides {
    artifact_name: String,
    #[serde(default)]
    artifact_group: Option<String>,
}

#[derive(Deserialize, Default)]
struct Depends {
    #[serde(default)]
    device_type: Vec<String>,
}

/// How a part is compressed, from its name's suffix.
fn decompressor<'a, R: Read + 'a>(
    name: &str,
    stem: &str,
    reader: R,
) -> Result<Box<dyn Read + 'a>, ArtifactError> {
    match name.strip_prefix(stem) {
        Some(".tar") => Ok(Box::new(reader)),
        Some(".tar.gz") => Ok(Box::new(flate2::read::GzDecoder::new(reader))),
        Some(other) => Err(format_err(format!(
            "{stem}{other}: only uncompressed or gzip parts are supported (make the artifact with mender-artifact --compression gzip or none)"
        ))),
        None => Err(format_err(format!("unexpected part {name}"))),
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn check(self, part: &str, checksums: &HashMap<String, String>) -> Result<(), ArtifactError> {
        let actual = hex::encode(self.hasher.finalize());
        let expected = checksums
            .get(part)
            .ok_or_else(|| format_err(format!("the manifest does not list {part}")))?;
        if expected.eq_ignore_ascii_case(&actual) {
            Ok(())
        } else {
            Err(ArtifactError::Checksum {
                part: part.to_string(),
                expected: expected.clone(),
                actual,
            })
        }
    }
}

fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, ArtifactError> {
    Ok(entry.path()?.to_string_lossy().into_owned())
}

/// Reads and checks the artifact's version, manifest and header (stops before the payload).
pub fn read_header(path: &Path) -> Result<Header, ArtifactError> {
    let mut archive = tar::Archive::new(BufReader::new(File::open(path)?));
    let mut checksums: Option<HashMap<String, String>> = None;
    let mut version_bytes: Option<Vec<u8>> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry_name(&entry)?;
        match name.as_str() {
            "version" => {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                let version: Version = serde_json::from_slice(&bytes)
                    .map_err(|e| format_err(format!("version: {e}")))?;
                if version.format != "mender" || version.version != 3 {
                    return Err(format_err(format!(
                        "format {} version {} (this agent reads mender version 3)",
                        version.format, version.version
                    )));
                }
                version_bytes = Some(bytes);
            }
            "manifest" => {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                checksums = Some(parse_manifest(&text)?);
            }
            "manifest.sig" => {}
            n if n.starts_with("manifest-augment") || n.starts_with("header-augment") => {
                return Err(format_err("augmented artifacts are not supported"));
            }
            n if n.starts_with("header.tar") => {
                let checksums = checksums
                    .as_ref()
                    .ok_or_else(|| format_err("the header comes before the manifest"))?;
                let version = version_bytes
                    .as_ref()
                    .ok_or_else(|| format_err("the header comes before the version"))?;
                let mut v = Hashing::new(version.as_slice());
                io::copy(&mut v, &mut io::sink())?;
                v.check("version", checksums)?;
                let mut hashing = Hashing::new(&mut entry);
                let header = parse_header(decompressor(n, "header", &mut hashing)?, checksums)?;
                io::copy(&mut hashing, &mut io::sink())?;
                hashing.check(n, checksums)?;
                return Ok(header);
            }
            other => {
                return Err(format_err(format!(
                    "unexpected part {other} before the header"
                )))
            }
        }
    }
    Err(format_err("no header"))
}

fn parse_manifest(text: &str) -> Result<HashMap<String, String>, ArtifactError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(sum), Some(path), None) if sum.len() == 64 => {
                    Ok((path.to_string(), sum.to_string()))
                }
                _ => Err(format_err(format!("manifest line {line:?}"))),
            }
        })
        .collect()
}

fn parse_header(
    reader: Box<dyn Read + '_>,
    checksums: &HashMap<String, String>,
) -> Result<Header, ArtifactError> {
    let mut archive = tar::Archive::new(reader);
    let (mut header_info, mut type_info, mut meta_data) = (None, None, None);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry_name(&entry)?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        match name.as_str() {
            "header-info" => header_info = Some(bytes),
            "headers/0000/type-info" => type_info = Some(bytes),
            "headers/0000/meta-data" => meta_data = Some(bytes),
            n if n.starts_with("headers/0000/") => {}
            n if n.starts_with("headers/") => {
                return Err(format_err(
                    "artifacts with more than one payload are not supported",
                ))
            }
            _ => {}
        }
    }
    let header_info = header_info.ok_or_else(|| format_err("the header has no header-info"))?;
    let type_info =
        type_info.ok_or_else(|| format_err("the header has no headers/0000/type-info"))?;
    let info: HeaderInfo = serde_json::from_slice(&header_info)
        .map_err(|e| format_err(format!("header-info: {e}")))?;
    let [payload] = info.payloads.as_slice() else {
        return Err(format_err(format!(
            "{} payloads (this agent installs artifacts with exactly one)",
            info.payloads.len()
        )));
    };
    let payload_type = payload
        .kind
        .clone()
        .filter(|t| !t.is_empty() && !t.contains('/') && t != "." && t != "..")
        .ok_or_else(|| {
            format_err("the payload has no usable type (a rootfs-image v2 artifact?)")
        })?;
    Ok(Header {
        artifact_name: info.artifact_provides.artifact_name,
        artifact_group: info.artifact_provides.artifact_group.unwrap_or_default(),
        payload_type,
        device_types: info.artifact_depends.device_type,
        header_info,
        type_info,
        meta_data: meta_data.unwrap_or_else(|| b"null".to_vec()),
        checksums: checksums.clone(),
    })
}

/// Reads the payload files in order; `each(name, size, reader)` must read the file to its end.
/// Each file is checked against the manifest once read.
pub fn for_each_payload_file(
    path: &Path,
    header: &Header,
    mut each: impl FnMut(&str, u64, &mut dyn Read) -> io::Result<()>,
) -> Result<(), ArtifactError> {
    let mut archive = tar::Archive::new(BufReader::new(File::open(path)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry_name(&entry)?;
        if !name.starts_with("data/") {
            continue;
        }
        if !name.starts_with("data/0000.tar") {
            return Err(format_err(format!("unexpected payload {name}")));
        }
        let mut data = tar::Archive::new(decompressor(&name, "data/0000", &mut entry)?);
        for file in data.entries()? {
            let mut file = file?;
            if file.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let file_name = entry_name(&file)?;
            if file_name.is_empty()
                || file_name.contains('/')
                || file_name == "."
                || file_name == ".."
            {
                return Err(format_err(format!("payload file name {file_name:?}")));
            }
            let size = file.header().size()?;
            let mut hashing = Hashing::new(&mut file);
            each(&file_name, size, &mut hashing)?;
            io::copy(&mut hashing, &mut io::sink())?;
            hashing.check(&format!("data/0000/{file_name}"), &header.checksums)?;
        }
        return Ok(());
    }
    Err(format_err("no payload data (data/0000.tar)"))
}
