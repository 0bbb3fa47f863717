//! The large-image row of the benchmark (issue 17 item 2, `make bench-large`): a random image
//! of `--large-image-mib` written to disk by streaming (never held in memory), pushed with
//! `oras` to the test bed's `distribution` registry, and an UpdateCampaign with
//! `payload.firmware.oci` to `--large-devices` emulated devices through Mosquitto. It measures
//! the operator's and Mosquitto's resident memory (idle before, peak during), checks that every
//! device succeeded with the image's SHA-256 as hashed on its disk, and times the campaign
//! beside a plain relay of the same bytes to as many subscribers through the same Mosquitto.
//! Disk is bounded: at most `--large-in-flight` devices hold the image at once
//! (`rollout.maxInFlight`), the emulator drops each image after it was checked and committed
//! (`run --drop-installed-images`, bench only), the run stops when the disk falls below
//! [`MIN_FREE_DISK`], and everything it made (source file, registry blobs, cache, fleet) is
//! removed at the end, whatever the outcome.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::RngCore as _;
use sha2::Digest as _;

use crate::bench::{process_memory, testbed_pid, RelayFleet, RelayRound};
use crate::product::{metric, Product};
use crate::TestBed;

/// The run stops (and reports why) when the disk of its files has less than this free.
pub const MIN_FREE_DISK: u64 = 8 << 30;
/// How often memory and free disk are sampled during the campaign.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// What to run.
#[derive(Debug, Clone)]
pub struct LargeConfig {
    /// Image size, bytes.
    pub image_bytes: u64,
    /// Devices of the campaign and subscribers of the relay.
    pub devices: u32,
    /// `rollout.maxInFlight`: devices holding (part of) the image at once.
    pub in_flight: u32,
    /// `spec.chunkSize`, bytes.
    pub chunk_bytes: u32,
    /// How long the campaign may take.
    pub timeout: Duration,
}

/// What the run measured.
#[derive(Debug, Clone)]
pub struct LargeRun {
    /// Seconds from the campaign's apply to its terminal phase (tag resolution, pull from the
    /// registry, sealing, every device).
    pub campaign_seconds: f64,
    /// Devices the campaign status counts as succeeded.
    pub succeeded: u32,
    /// Devices whose image, hashed on their disk, is the pushed image.
    pub hashes_matching: u32,
    /// Operator VmRSS once ready and idle, and its VmHWM at the campaign's end.
    pub operator_rss_idle: u64,
    pub operator_rss_peak: u64,
    /// Mosquitto VmRSS before the campaign, and its peak during it (VmHWM reset before the
    /// campaign; the larger of it and the sampled VmRSS).
    pub broker_rss_idle: u64,
    pub broker_rss_peak: u64,
    /// The same for the relay of the same bytes (broker peak during the relay).
    pub relay: RelayRound,
    pub relay_broker_rss_peak: u64,
    /// Bytes the operator published (its metric) and chunk publishes it served.
    pub published_bytes: f64,
    pub chunks_served: f64,
    /// Least free disk seen during the run, bytes.
    pub min_free_disk: u64,
    /// Seconds to write the random image and to push it.
    pub write_seconds: f64,
    pub push_seconds: f64,
}

/// Writes `len` random bytes to `path` in 4 MiB pieces (never the whole image in memory);
/// returns its SHA-256.
pub fn write_random_file(path: &Path, len: u64) -> Result<[u8; 32]> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut hasher = sha2::Sha256::new();
    let mut piece = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let n = piece.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        rand::thread_rng().fill_bytes(&mut piece[..n]);
        hasher.update(&piece[..n]);
        out.write_all(&piece[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(hasher.finalize().into())
}

/// Free bytes on the file system of `path` (`df`, so no new dependency).
pub fn free_disk(path: &Path) -> Result<u64> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("df printed no free space for {}: {text}", path.display()))
}

/// Resets a process's peak resident memory (VmHWM) to its current RSS (`clear_refs` 5).
fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// Removes what the run made, whatever its outcome.
#[derive(Debug, Default)]
struct Cleanup {
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.paths {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            if let Err(e) = removed {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("bench-large: could not remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// Peak VmRSS of `pids` sampled while running, and the least free disk; `low_disk` is set
/// when it falls below [`MIN_FREE_DISK`].
#[derive(Debug, Default)]
struct Samples {
    rss_peak: Vec<AtomicU64>,
    min_free_disk: AtomicU64,
    low_disk: AtomicBool,
}

fn spawn_sampler(pids: Vec<u32>, disk: PathBuf) -> (Arc<Samples>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Samples {
        rss_peak: pids.iter().map(|_| AtomicU64::new(0)).collect(),
        min_free_disk: AtomicU64::new(u64::MAX),
        low_disk: AtomicBool::new(false),
    });
    let task = {
        let samples = Arc::clone(&samples);
        tokio::spawn(async move {
            let mut tick = 0u32;
            loop {
                for (pid, peak) in pids.iter().zip(&samples.rss_peak) {
                    if let Ok(rss) = process_memory(*pid, "VmRSS") {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                }
                // df is a process: once a second is enough.
                if tick % 5 == 0 {
                    if let Ok(free) = free_disk(&disk) {
                        samples.min_free_disk.fetch_min(free, Ordering::Relaxed);
                        if free < MIN_FREE_DISK {
                            samples.low_disk.store(true, Ordering::Relaxed);
                        }
                    }
                }
                tick = tick.wrapping_add(1);
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    (samples, task)
}

/// The whole run; everything it wrote is removed before it returns.
pub async fn run(config: &LargeConfig) -> Result<LargeRun> {
    let bed = TestBed::get()?;
    let registry = bed
        .registry
        .as_ref()
        .context("the test bed runs no OCI registry (e2e/testbed up starts one)")?;
    let mut product = Product::new("large", config.devices).await?;
    let mut cleanup = Cleanup::default();
    let source = product.dir.join("large-firmware.bin");
    cleanup.paths.extend([
        source.clone(),
        product.dir.join("fleet"),
        product.dir.join("cache"),
    ]);
    let result = measure(&mut product, registry, config, &source, &mut cleanup).await;
    if result.is_ok() {
        product.pass();
    }
    // Operator and emulator stop before their files go.
    drop(product);
    drop(cleanup);
    result
}

async fn measure(
    product: &mut Product,
    registry: &crate::Registry,
    config: &LargeConfig,
    source: &Path,
    cleanup: &mut Cleanup,
) -> Result<LargeRun> {
    let free = free_disk(&product.dir)?;
    ensure!(
        free > MIN_FREE_DISK + 3 * config.image_bytes,
        "{} free on the disk of {}: the run needs {} MiB for the source, the registry and the cache, and keeps {} GiB free",
        free >> 20,
        product.dir.display(),
        (3 * config.image_bytes) >> 20,
        MIN_FREE_DISK >> 30
    );
    eprintln!(
        "bench-large: writing a {} MiB random image",
        config.image_bytes >> 20
    );
    let started = Instant::now();
    let image_sha256 = hex::encode(write_random_file(source, config.image_bytes)?);
    let write_seconds = started.elapsed().as_secs_f64();
    let repository = format!("{}/firmware", product.ns.name);
    let started = Instant::now();
    let digest = registry.push(source, &repository, "2.0.0")?;
    let push_seconds = started.elapsed().as_secs_f64();
    // The registry's copy: the namespace's repositories, the layer blob (its digest is the
    // image's SHA-256) and the manifest blob (the shared empty config blob stays).
    let data = product
        .bed
        .state_dir
        .join("registry/data/docker/registry/v2");
    cleanup
        .paths
        .push(data.join("repositories").join(&product.ns.name));
    for blob in [image_sha256.as_str(), digest.trim_start_matches("sha256:")] {
        cleanup
            .paths
            .push(data.join("blobs/sha256").join(&blob[..2]).join(blob));
    }
    eprintln!("bench-large: pushed {digest} in {push_seconds:.1} s");
    // The relay below reads the source again; the registry holds the campaign's copy.
    registry
        .pull_secret(
            &product.ns.client,
            &product.ns.name,
            "regcred",
            &registry.password,
        )
        .await?;

    product.window_timeout_seconds = 30;
    product.log_keys = false;
    product.start_operator()?;
    crate::wait_for("the operator's /readyz", Duration::from_secs(120), || {
        let url = format!("http://{}/readyz", product.metrics_addr);
        async move { Ok(crate::http::get(&url).await.ok().map(|_| ())) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let operator = product.operator_pid().context("operator not running")?;
    let broker = testbed_pid(&product.bed.state_dir, "mosquitto")?;
    let operator_rss_idle = process_memory(operator, "VmRSS")?;
    let broker_rss_idle = process_memory(broker, "VmRSS")?;
    reset_peak_rss(broker)?;
    product.start_emulator(&["--no-state-fsync", "--drop-installed-images"])?;
    let (samples, sampler) = spawn_sampler(vec![operator, broker], product.dir.clone());
    let name = "large-2-0-0";
    let mut spec = product.firmware_spec("2.0.0", "unused", serde_json::json!({}));
    spec["payload"] = serde_json::json!({"firmware": {"oci": {
        "reference": format!("{}/{repository}:2.0.0", registry.addr),
        "pullSecretName": "regcred", "insecure": true}}});
    spec["chunkSize"] = serde_json::json!(config.chunk_bytes);
    spec["rollout"] = serde_json::json!({"maxInFlight": config.in_flight,
        "deviceTimeoutSeconds": config.timeout.as_secs(), "retries": 2, "retryBackoffSeconds": 5});
    eprintln!(
        "bench-large: campaign to {} devices, {} in flight",
        config.devices, config.in_flight
    );
    product.apply_campaign(name, spec)?;
    let applied = Instant::now();
    let low_disk = Arc::clone(&samples);
    let campaign = product
        .wait_campaign(name, "campaign finished", config.timeout, move |c| {
            low_disk.low_disk.load(Ordering::Relaxed)
                || c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await;
    let campaign_seconds = applied.elapsed().as_secs_f64();
    let operator_rss_peak =
        process_memory(operator, "VmHWM")?.max(samples.rss_peak[0].load(Ordering::Relaxed));
    let broker_rss_peak =
        process_memory(broker, "VmHWM")?.max(samples.rss_peak[1].load(Ordering::Relaxed));
    sampler.abort();
    let min_free_disk = samples.min_free_disk.load(Ordering::Relaxed);
    if samples.low_disk.load(Ordering::Relaxed) {
        bail!(
            "stopped: less than {} GiB free on the disk (least {} MiB)",
            MIN_FREE_DISK >> 30,
            min_free_disk >> 20
        );
    }
    let status = campaign?.status.context("campaign status")?;
    let metrics = product.metrics().await?;
    product.stop_emulator();
    let mut hashes_matching = 0;
    for id in &product.device_ids {
        let dropped = product.device_dir(id).join("firmware.dropped");
        match std::fs::read_to_string(&dropped) {
            Ok(sha) if sha.trim() == image_sha256 => hashes_matching += 1,
            Ok(sha) => eprintln!("bench-large: {id} installed {sha}, not {image_sha256}"),
            Err(e) => eprintln!("bench-large: {id}: no {}: {e}", dropped.display()),
        }
    }
    // Free the devices' disk before the relay.
    std::fs::remove_dir_all(product.dir.join("fleet"))?;
    eprintln!(
        "bench-large: campaign {:?} in {campaign_seconds:.1} s; relaying the same bytes to {} subscribers",
        status.phase, config.devices
    );
    let relay_fleet = RelayFleet::connect(product.bed, config.devices as usize).await?;
    reset_peak_rss(broker)?;
    let (relay_samples, relay_sampler) = spawn_sampler(vec![broker], product.dir.clone());
    let relay = relay_fleet
        .file_round(
            "large relay",
            source,
            config.chunk_bytes as usize,
            config.timeout,
        )
        .await?;
    relay_sampler.abort();
    let relay_broker_rss_peak =
        process_memory(broker, "VmHWM")?.max(relay_samples.rss_peak[0].load(Ordering::Relaxed));
    drop(relay_fleet);
    Ok(LargeRun {
        campaign_seconds,
        succeeded: status.devices.succeeded,
        hashes_matching,
        operator_rss_idle,
        operator_rss_peak,
        broker_rss_idle,
        broker_rss_peak,
        relay,
        relay_broker_rss_peak,
        published_bytes: metric(
            &metrics,
            "sealed_ota_operator_mqtt_published_bytes_total",
            None,
        ),
        chunks_served: metric(&metrics, "sealed_ota_operator_chunks_served_total", None),
        min_free_disk: min_free_disk.min(relay_samples.min_free_disk.load(Ordering::Relaxed)),
        write_seconds,
        push_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_random_file_has_the_length_and_hash_returned() {
        let dir = std::env::temp_dir().join(format!("large-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        let len = (4 << 20) + 12345;
        let sha = write_random_file(&path, len).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(<[u8; 32]>::from(sha2::Sha256::digest(&bytes)), sha);
        assert!(free_disk(&dir).unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
