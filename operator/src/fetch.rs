//! Download of a firmware image from `spec.payload.firmware.url` (HTTP or HTTPS, system trust roots),
//! bounded in size and time. The caller checks the SHA-256 before anything is published. The URL is
//! never logged or echoed (it may carry a token); errors say what failed, not where.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;

/// Largest image accepted (256 MiB).
pub const MAX_IMAGE_BYTES: usize = 256 * 1024 * 1024;

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
    /// Reading the body failed or it exceeded the size limit.
    #[error("reading the body failed or it exceeds {MAX_IMAGE_BYTES} bytes: {0}")]
    Body(String),
    /// The whole download took too long.
    #[error("download did not finish within {0:?}")]
    Timeout(Duration),
}

/// Download `url` (no redirects followed).
pub async fn fetch(url: &str, timeout: Duration) -> Result<Vec<u8>, FetchError> {
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
    let download = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| FetchError::Request(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), MAX_IMAGE_BYTES)
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
    async fn downloads_and_reports_failures() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = serve(StatusCode::OK, vec![7; 5000]).await;
        assert_eq!(
            fetch(&url, Duration::from_secs(10)).await.unwrap(),
            vec![7; 5000]
        );
        let url = serve(StatusCode::NOT_FOUND, vec![]).await;
        assert!(matches!(
            fetch(&url, Duration::from_secs(10)).await,
            Err(FetchError::Status(404))
        ));
        assert!(matches!(
            fetch("ftp://x/y", Duration::from_secs(1)).await,
            Err(FetchError::BadUrl)
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            fetch(&format!("http://{closed}/x"), Duration::from_secs(5)).await,
            Err(FetchError::Request(_))
        ));
    }
}
