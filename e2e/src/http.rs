//! HTTP in tests, on the operator's own server and client code (hyper): a loopback server of
//! canned bytes (a campaign's `payload.firmware.url`), a GET of a test server's URL, and the
//! samples of a Prometheus text exposition. No hand-written HTTP.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use hyper::StatusCode;
use sealed_ota_operator::http::Reply;

/// Serves the same bytes at every path on a loopback port until dropped.
#[derive(Debug)]
pub struct FileServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    /// Start serving `body` (as `application/octet-stream`).
    pub async fn start(body: Vec<u8>) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = hyper::body::Bytes::from(body);
        let task = tokio::spawn(sealed_ota_operator::http::serve(listener, move |_| Reply {
            status: StatusCode::OK,
            content_type: "application/octet-stream",
            body: body.clone(),
        }));
        Ok(Self { addr, task })
    }

    /// Start serving the current content of the file at `path` (read at every request; 404
    /// while it does not exist), as Prometheus text: what a process writes there (the emulator's
    /// `run --metrics-file`) becomes scrapeable.
    pub async fn of_path(path: std::path::PathBuf) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task =
            tokio::spawn(sealed_ota_operator::http::serve(
                listener,
                move |_| match std::fs::read(&path) {
                    Ok(body) => Reply {
                        status: StatusCode::OK,
                        content_type: "text/plain; version=0.0.4; charset=utf-8",
                        body: body.into(),
                    },
                    Err(_) => Reply::text(StatusCode::NOT_FOUND, "not written yet\n"),
                },
            ));
        Ok(Self { addr, task })
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The URL of the served file.
    pub fn url(&self) -> String {
        format!("http://{}/firmware.bin", self.addr)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// GET `url` (e.g. an operator's `/metrics` or `/readyz`) and return the body of a 2xx answer.
pub async fn get(url: &str) -> Result<String> {
    let body = sealed_ota_operator::fetch::fetch(url, 64 << 20, std::time::Duration::from_secs(10))
        .await
        .with_context(|| format!("GET {url}"))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Every sample of a Prometheus text exposition as (series with labels, value).
pub fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Sum of the samples of `name`: a metric family (every label set) or one series written with
/// its labels, e.g. `x_total{kind="device"}`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, v)| v)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_one_family_only() {
        let text = "# HELP x_total x\nx_total{reason=\"a\"} 2\nx_total{reason=\"b\"} 3\nx_total_other 7\nx_totalx 1\n";
        assert_eq!(metric_sum(text, "x_total"), 5.0);
        assert_eq!(metric_sum(text, "x_total_other"), 7.0);
        assert_eq!(metric_sum(text, "x_total{reason=\"b\"}"), 3.0);
        assert_eq!(samples(text).len(), 4);
    }

    #[tokio::test]
    async fn serves_and_gets_a_file() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = FileServer::start(b"firmware".to_vec()).await.unwrap();
        assert_eq!(get(&server.url()).await.unwrap(), "firmware");
    }
}
