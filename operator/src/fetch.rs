//! Download of a firmware image from `spec.payload.firmware.url` (HTTP or HTTPS, system trust roots)
//! into a file of the cache directory, streamed (never held in memory) and hashed on the way,
//! bounded in size and time. The caller compares the SHA-256 before anything is published. The
//! URL is never logged or echoed (it may carry a token); errors say what failed, not where.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL does not parse as an absolute http(s) URI.
    #[error("the URL is not a valid http(s) URI")]
    BadUrl,
    /// The system trust roots could not be loaded.
    #[error("loading the system trust roots: {0}")]
    Roots(std::io::Error),
    /// Connecting or sending the request failed.
    #[error("request failed: {0}")]
    Request(String),
    /// The server answered with a non-success status.
    #[error("server answered HTTP {0}")]
    Status(u16),
    /// Reading the body failed.
    #[error("reading the body failed: {0}")]
    Body(String),
    /// The body is larger than the operator accepts.
    #[error("the image exceeds {0} bytes (the operator's --max-image-bytes)")]
    TooLarge(u64),
    /// Writing the cache file failed.
    #[error("writing the cache file: {0}")]
    Write(std::io::Error),
    /// The whole download took too long.
    #[error("download did not finish within {0:?}")]
    Timeout(Duration),
}

/// What a download stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes written.
    pub size: u64,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

/// Write a byte stream to `path`, hashing it and refusing more than `max_bytes`.
pub(crate) struct HashingFile {
    file: tokio::fs::File,
    hash: Sha256,
    size: u64,
    max_bytes: u64,
}

impl HashingFile {
    pub(crate) async fn create(path: &Path, max_bytes: u64) -> Result<Self, FetchError> {
        Ok(Self {
            file: tokio::fs::File::create(path)
                .await
                .map_err(FetchError::Write)?,
            hash: Sha256::new(),
            size: 0,
            max_bytes,
        })
    }

    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        self.size += bytes.len() as u64;
        if self.size > self.max_bytes {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        self.hash.update(bytes);
        self.file.write_all(bytes).await.map_err(FetchError::Write)
    }

    pub(crate) async fn finish(mut self) -> Result<Downloaded, FetchError> {
        self.file.flush().await.map_err(FetchError::Write)?;
        Ok(Downloaded {
            size: self.size,
            sha256: self.hash.finalize().into(),
        })
    }
}

/// GET `url` (no redirects followed): the response of a 2xx answer.
async fn get(url: &str) -> Result<hyper::body::Incoming, FetchError> {
    let uri: hyper::Uri = url.parse().map_err(|_| FetchError::BadUrl)?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(FetchError::BadUrl);
    }
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(FetchError::Roots)?
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let resp = client
        .get(uri)
        .await
        .map_err(|e| FetchError::Request(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    Ok(resp.into_body())
}

/// Download `url` into `path`.
pub async fn fetch_to_file(
    url: &str,
    path: &Path,
    max_bytes: u64,
    timeout: Duration,
) -> Result<Downloaded, FetchError> {
    let download = async {
        let mut body = get(url).await?;
        let mut out = HashingFile::create(path, max_bytes).await?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| FetchError::Body(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                out.write(data).await?;
            }
        }
        out.finish().await
    };
    tokio::time::timeout(timeout, download)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

/// Download a small body (at most `max_bytes`) into memory: the test kit's GET of /metrics.
pub async fn fetch(url: &str, max_bytes: usize, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    let download = async {
        let body = http_body_util::Limited::new(get(url).await?, max_bytes)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(timeout, download)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Reply;
    use hyper::StatusCode;

    /// Serve one canned reply at every path.
    async fn serve(status: StatusCode, body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Bytes::from(body);
        tokio::spawn(crate::http::serve(listener, move |_| Reply {
            status,
            content_type: "application/octet-stream",
            body: body.clone(),
        }));
        format!("http://{addr}/fw.bin")
    }

    #[tokio::test]
    async fn downloads_to_a_file_and_reports_failures() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("image");
        let t = Duration::from_secs(10);
        let url = serve(StatusCode::OK, vec![7; 5000]).await;
        let got = fetch_to_file(&url, &file, 1 << 20, t).await.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), vec![7; 5000]);
        assert_eq!(got.size, 5000);
        assert_eq!(got.sha256, <[u8; 32]>::from(Sha256::digest(vec![7; 5000])));
        assert!(matches!(
            fetch_to_file(&url, &file, 4999, t).await,
            Err(FetchError::TooLarge(4999))
        ));
        let url = serve(StatusCode::NOT_FOUND, vec![]).await;
        assert!(matches!(
            fetch_to_file(&url, &file, 1 << 20, t).await,
            Err(FetchError::Status(404))
        ));
        assert!(matches!(
            fetch_to_file("ftp://x/y", &file, 1 << 20, t).await,
            Err(FetchError::BadUrl)
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            fetch_to_file(&format!("http://{closed}/x"), &file, 1 << 20, t).await,
            Err(FetchError::Request(_))
        ));
    }
}
