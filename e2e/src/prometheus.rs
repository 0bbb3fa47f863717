//! A real Prometheus server (Debian's `prometheus`, installed by `scripts/install-prometheus.sh`)
//! for the tests of the campaigns' metrics gates: started on a free loopback port with a
//! configuration of the test's scrape targets (every second), its data in the test's directory,
//! stopped by pid when dropped. Queries go through the operator's own client and parser
//! (`sealed_ota_operator::prometheus`), the code the gates use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{product::free_port, repo_root};

/// A running Prometheus server.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    port: u16,
    /// Its directory (configuration, data, log).
    pub dir: PathBuf,
}

impl Prometheus {
    /// Installs Prometheus if needed and starts it in `dir`, scraping every target
    /// (`job`, `host:port`) every second at `/metrics`.
    pub async fn start(dir: &Path, targets: &[(&str, &str)]) -> Result<Self> {
        let install = Command::new(repo_root().join("scripts/install-prometheus.sh"))
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/install-prometheus.sh")?;
        if !install.status.success() {
            bail!("scripts/install-prometheus.sh failed");
        }
        let binary = String::from_utf8(install.stdout)?.trim().to_owned();
        std::fs::create_dir_all(dir)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let prometheus = Prometheus {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        };
        crate::wait_for("Prometheus ready", Duration::from_secs(60), || async {
            Ok(crate::http::get(&format!("{}/-/ready", prometheus.url()))
                .await
                .ok()
                .map(|_| ()))
        })
        .await
        .with_context(|| format!("log in {}", dir.join("prometheus.log").display()))?;
        Ok(prometheus)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The samples of an instant query.
    pub async fn query(&self, query: &str) -> Result<Vec<(String, f64)>> {
        match sealed_ota_operator::prometheus::instant_query(&self.url(), query).await {
            sealed_ota_operator::gates::MetricResult::Samples(s) => Ok(s),
            sealed_ota_operator::gates::MetricResult::Error(e) => bail!("query {query}: {e}"),
        }
    }

    /// Waits until every scrape target is up (`up == 1` for each job).
    pub async fn wait_targets_up(&self, jobs: &[&str]) -> Result<()> {
        for job in jobs {
            let query = format!("up{{job=\"{job}\"}}");
            crate::wait_for(
                &format!("Prometheus scraped {job}"),
                Duration::from_secs(60),
                || async {
                    Ok(self
                        .query(&query)
                        .await
                        .ok()
                        .filter(|s| s.iter().any(|(_, v)| *v == 1.0))
                        .map(|_| ()))
                },
            )
            .await?;
        }
        Ok(())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
