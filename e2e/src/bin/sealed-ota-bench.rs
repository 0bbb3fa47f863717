//! `make bench`: the budgets of DESIGN.md section 5, each measured beside its baseline in the
//! same run, on the test bed (`e2e/testbed`), with the release-built operator and emulator as
//! real processes. It runs a firmware campaign to `--devices` emulated devices and the two
//! relay baselines (plain Mosquitto fan-out, the paper's per-device encryption) with the same
//! client stack, then a `--scale-devices` campaign for the Kubernetes and memory figures, merges
//! the protocol benchmark's ratios (`--protocol-json`), prints a table and writes
//! `summary.json`. Exit status 0 when every figure was measured, whatever the budgets say.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sealed_ota_e2e::bench::{
    drained_metrics, process_cpu_seconds, process_memory, render_markdown, render_table,
    testbed_pid, unix_seconds, wrap_bytes, write_json, Budget, CpuTimeline, RelayFleet,
};
use sealed_ota_e2e::large_bench::{self, LargeConfig};
use sealed_ota_e2e::product::{random_image, Product};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::crd::CampaignPhase;
use sealed_ota_protocol::crypto::sha256;
use sealed_ota_protocol::manager::{CampaignPayload, CampaignSpec, PreparedCampaign};
use sealed_ota_protocol::sealer::SealedFirmware;
use sealed_ota_protocol::topics::TopicTree;
use serde_json::{json, Value};

/// The emulator's default chunk window (`run --window`).
const PULL_WINDOW: u32 = 8;

#[derive(Debug, Parser)]
#[command(
    name = "sealed-ota-bench",
    about = "Sealed OTA budgets (DESIGN.md section 5)"
)]
struct Args {
    /// Devices of the fan-out campaign and of the relay baselines.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Image size of the fan-out campaign, bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    image_bytes: usize,
    /// Chunk size (spec.chunkSize), bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    chunk_bytes: u32,
    /// Devices of the scale campaign (Kubernetes writes, campaign size, operator memory); 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    scale_devices: u32,
    /// Image size of the scale campaign, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    scale_image_bytes: usize,
    /// The protocol benchmark's ratios (written by `cargo bench -p sealed-ota-protocol` with
    /// SEALED_OTA_BENCH_JSON); absent figures are reported as not measured.
    #[arg(long, default_value = "target/bench/protocol.json")]
    protocol_json: PathBuf,
    /// Where summary.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Base of the delta figures: a release binary of ours at an earlier commit (made by
    /// scripts/delta-pair.sh); the figures are skipped when it is absent.
    #[arg(long, default_value = "target/bench/delta/base")]
    delta_base: PathBuf,
    /// Target of the delta figures: the same binary at this commit, stripped (make bench).
    #[arg(long, default_value = "target/bench/delta/target")]
    delta_target: PathBuf,
    /// Measure only the delta figures (no test bed needed) and print them.
    #[arg(long)]
    delta_only: bool,
    /// The large-image row (issue 17, `make bench-large`): an image of this many MiB pushed to
    /// the test bed's registry and sent by an OCI campaign; 0 skips it.
    #[arg(long, default_value_t = 0)]
    large_image_mib: u64,
    /// Devices of the large-image campaign (and subscribers of its relay baseline).
    #[arg(long, default_value_t = 20)]
    large_devices: u32,
    /// The large campaign's rollout.maxInFlight: devices holding the image on this one disk at
    /// once (each drops it once checked: `run --drop-installed-images`).
    #[arg(long, default_value_t = 4)]
    large_in_flight: u32,
    /// How long the large campaign (and its relay) may take, seconds.
    #[arg(long, default_value_t = 5400)]
    large_timeout_seconds: u64,
    /// Run only the large-image row (needs --large-image-mib).
    #[arg(long)]
    large_only: bool,
}

/// What a product campaign measured.
#[derive(Debug)]
struct CampaignRun {
    devices: u32,
    wall_seconds: f64,
    data_phase_seconds: f64,
    published_bytes: f64,
    device_status_writes: f64,
    campaign_status_writes: f64,
    chunks_expected: u64,
    chunks_received: u64,
    installed: u64,
    campaign_object_bytes: usize,
    rss_idle: u64,
    rss_peak: u64,
    rss_end: u64,
    /// Seconds from the campaign's end until the last Device status write landed.
    device_writes_lag_seconds: f64,
    /// Per-device manager bytes besides the shared chunks, with this run's identifiers.
    wrap_bytes: u64,
    /// CPU seconds each process used from the campaign's apply to its end.
    cpu_seconds: BTreeMap<&'static str, f64>,
    /// CPU seconds each process used in the data phase (first to last chunk), sampled every
    /// 200 ms (a sample either side of the window).
    data_phase_cpu_seconds: BTreeMap<&'static str, f64>,
    emulator: Value,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    sealed_ota_device_emulator::install_crypto_provider();
    let args = Args::parse();
    let started = Instant::now();
    if args.delta_only {
        let mut rows = Vec::new();
        let delta = delta_rows(&args, &mut rows)?;
        println!("{}", render_table(&rows));
        println!("{}", serde_json::to_string_pretty(&delta)?);
        return Ok(());
    }
    if args.large_only {
        anyhow::ensure!(
            args.large_image_mib > 0,
            "--large-only needs --large-image-mib (e.g. 1024)"
        );
        let mut rows = Vec::new();
        let large = large_rows(&args, &mut rows).await?;
        println!("{}", render_table(&rows));
        let summary = json!({
            "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
            "large": large,
            "budgets": budgets_json(&rows),
            "seconds": started.elapsed().as_secs_f64(),
            "reproduce": "make bench-large",
        });
        return write_summary(&args, &rows, summary, started);
    }
    let bed = TestBed::get()?;
    let protocol: Value = match std::fs::read(&args.protocol_json) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", args.protocol_json.display()))?,
        Err(e) => {
            eprintln!(
                "bench: no protocol ratios ({}: {e}); run `make bench` for them",
                args.protocol_json.display()
            );
            Value::Null
        }
    };

    let image = random_image(args.image_bytes);
    let (sealed, payloads) = chunk_payloads(&image, args.chunk_bytes)?;
    let n = args.devices as usize;

    eprintln!("bench: relay baseline: connecting {n} plain subscribers");
    let relay = RelayFleet::connect(bed, n).await?;
    // The baselines' CPU: this process (publisher and subscribers) and the broker, per round.
    let baseline_processes = [
        ("bench", std::process::id()),
        (
            "mosquitto",
            testbed_pid(&TestBed::get()?.state_dir, "mosquitto")?,
        ),
    ];
    let cpu_total = || -> Result<f64> { Ok(cpu_of(&baseline_processes)?.values().sum()) };
    let cpu = cpu_total()?;
    let baseline_before = relay.shared_round("relay baseline", &payloads).await?;
    let relay_cpu = cpu_total()? - cpu;
    eprintln!("bench: relay baseline {:.3} s", baseline_before.seconds);
    let cpu = cpu_total()?;
    let pull = relay.pull_round(&payloads, PULL_WINDOW).await?;
    let pull_cpu = cpu_total()? - cpu;
    eprintln!("bench: windowed-pull baseline {:.3} s", pull.seconds);
    let cpu = cpu_total()?;
    let pull_work = relay
        .pull_round_with_device_work(&sealed, &payloads, PULL_WINDOW)
        .await?;
    let pull_work_cpu = cpu_total()? - cpu;
    eprintln!(
        "bench: windowed pull with the device-side work {:.3} s, {pull_work_cpu:.1} CPU-s ({} corrupt)",
        pull_work.seconds, pull_work.corrupt_messages
    );
    let cpu = cpu_total()?;
    let paper = relay
        .paper_round(&image, args.chunk_bytes as usize, false)
        .await?;
    let paper_cpu = cpu_total()? - cpu;
    eprintln!(
        "bench: paper baseline {:.3} s, {} bytes published",
        paper.seconds, paper.published_bytes
    );
    let cpu = cpu_total()?;
    let paper_stored = relay
        .paper_round(&image, args.chunk_bytes as usize, true)
        .await?;
    let paper_stored_cpu = cpu_total()? - cpu;
    eprintln!(
        "bench: paper baseline storing and checking the image {:.3} s, {paper_stored_cpu:.1} CPU-s ({} corrupt)",
        paper_stored.seconds, paper_stored.corrupt_messages
    );
    drop(relay);

    eprintln!("bench: firmware campaign to {n} devices");
    // The transfer barrier holds every device's first chunk window until all were offered the
    // update, so the data phase times the transfer, as the relay baseline does, not the handshakes.
    let fanout = run_campaign(
        "bench",
        args.devices,
        &image,
        args.chunk_bytes,
        &["--transfer-barrier"],
    )
    .await?;
    eprintln!(
        "bench: campaign {:.1} s, data phase {:.3} s; CPU seconds during the campaign: {}; in the data phase: {}",
        fanout.wall_seconds,
        fanout.data_phase_seconds,
        cpu_line(&fanout.cpu_seconds),
        cpu_line(&fanout.data_phase_cpu_seconds)
    );
    // CPU time is counted in clock ticks (10 ms): a tiny run's figure is at least one tick.
    let data_phase_cpu: f64 = fanout
        .data_phase_cpu_seconds
        .values()
        .sum::<f64>()
        .max(0.01);
    let pull_work_cpu = pull_work_cpu.max(0.01);

    let relay = RelayFleet::connect(bed, n).await?;
    let baseline_after = relay.shared_round("relay baseline", &payloads).await?;
    eprintln!(
        "bench: relay baseline again {:.3} s",
        baseline_after.seconds
    );
    drop(relay);
    // The faster baseline: the stricter ratio for the product.
    let baseline = if baseline_after.seconds < baseline_before.seconds {
        &baseline_after
    } else {
        &baseline_before
    };

    let scale = if args.scale_devices > 0 {
        eprintln!("bench: scale campaign to {} devices", args.scale_devices);
        let image = random_image(args.scale_image_bytes);
        Some(run_campaign("scale", args.scale_devices, &image, args.chunk_bytes, &[]).await?)
    } else {
        None
    };

    let mut rows = Vec::new();
    let fanout_ratio = fanout.data_phase_seconds / baseline.seconds;
    rows.push(Budget::at_most(
        "fanout_ratio",
        fanout_ratio,
        1.25,
        format!(
            "data phase {:.3} s (first to last chunk once all {} devices accepted, {} KiB image) / plain relay {:.3} s",
            fanout.data_phase_seconds,
            n,
            image.len() / 1024,
            baseline.seconds
        ),
    ));
    let ideal = image.len() as f64 + n as f64 * fanout.wrap_bytes as f64;
    rows.push(Budget::at_most(
        "egress_ratio",
        fanout.published_bytes / ideal,
        1.05,
        format!(
            "{} bytes published / (image + {n} x {} wrap bytes, the run's identifiers)",
            fanout.published_bytes, fanout.wrap_bytes
        ),
    ));
    for (key, how) in [
        (
            "handshake_ratio",
            "manager handshakes/s, one core / raw keygen + ECDH + sign + verify rate",
        ),
        (
            "crypto_ratio",
            "chunk encryption in the product's path / raw aes-gcm, one core",
        ),
    ] {
        if let Some(v) = protocol[key].as_f64() {
            rows.push(Budget::at_least(key, v, 0.8, how.into()));
        }
    }
    if let Some(v) = protocol["prepare_ratio"].as_f64() {
        rows.push(Budget::report(
            "prepare_ratio",
            v,
            "whole campaign preparation (encrypt + image SHA-256 + Merkle) / raw aes-gcm".into(),
        ));
    }
    if let Some(v) = protocol["mqtt_interactions_per_device_phase"].as_f64() {
        rows.push(Budget::at_most(
            "mqtt_interactions_per_device_phase",
            v,
            6.0,
            format!(
                "largest control count of one phase (sans-IO sessions); transfer: {}",
                protocol["mqtt_interactions"]
            ),
        ));
    }
    let lost = fanout
        .chunks_expected
        .saturating_sub(fanout.chunks_received);
    rows.push(Budget::at_most(
        "lost_chunks",
        lost as f64,
        0.0,
        format!(
            "{} of {} device-chunks never delivered (Mosquitto defaults, max_queued_messages 1000)",
            lost, fanout.chunks_expected
        ),
    ));
    if let Some(scale) = &scale {
        let writes = scale.device_status_writes / f64::from(scale.devices);
        rows.push(Budget::at_most(
            "k8s_writes_per_device",
            writes,
            2.0,
            format!(
                "Device status writes / {} devices (2 phase changes a user sees: InProgress, Succeeded)",
                scale.devices
            ),
        ));
        rows.push(Budget::report(
            "device_status_lag_seconds",
            scale.device_writes_lag_seconds,
            format!(
                "the last Device status write landed this long after the campaign's own status said done ({} devices)",
                scale.devices
            ),
        ));
        rows.push(Budget::at_most(
            "campaign_status_writes_per_second",
            scale.campaign_status_writes / scale.wall_seconds,
            1.0,
            format!(
                "{} campaign status writes in {:.1} s",
                scale.campaign_status_writes, scale.wall_seconds
            ),
        ));
        rows.push(Budget::at_most(
            "campaign_status_bytes",
            scale.campaign_object_bytes as f64,
            65536.0,
            format!("UpdateCampaign JSON at {} devices", scale.devices),
        ));
        let per_device =
            scale.rss_peak.saturating_sub(scale.rss_idle) as f64 / f64::from(scale.devices);
        rows.push(Budget::at_most(
            "rss_bytes_per_device",
            per_device,
            2048.0,
            format!(
                "(operator peak RSS {} MiB - idle {} MiB, Devices cached; {} MiB after the campaign) / {}",
                scale.rss_peak >> 20,
                scale.rss_idle >> 20,
                scale.rss_end >> 20,
                scale.devices
            ),
        ));
    }
    rows.push(Budget::at_most(
        "pull_baseline_ratio",
        pull.seconds / baseline.seconds,
        1.25,
        format!(
            "transport alone: the devices' retained windowed pull ({PULL_WINDOW} topics per SUBSCRIBE), no crypto: {:.3} s / plain relay {:.3} s",
            pull.seconds, baseline.seconds
        ),
    ));
    rows.push(Budget::report(
        "device_work_ratio",
        fanout.data_phase_seconds / pull_work.seconds,
        format!(
            "our data phase {:.3} s / the same pull with the device-side work and no manager (open, store, check: {:.3} s): the manager's and Kubernetes' share",
            fanout.data_phase_seconds, pull_work.seconds
        ),
    ));
    rows.push(Budget::report(
        "data_phase_cpu_ratio",
        data_phase_cpu / pull_work_cpu,
        format!(
            "CPU seconds of our data phase {data_phase_cpu:.1} ({}) / the pull with the device-side work {pull_work_cpu:.1} (bench process and Mosquitto): the same comparison as device_work_ratio, much less sensitive to other load on the machine",
            cpu_line(&fanout.data_phase_cpu_seconds)
        ),
    ));
    rows.push(Budget::report(
        "paper_stored_cpu_ratio",
        paper_stored_cpu / data_phase_cpu,
        format!(
            "CPU seconds of the paper's scheme with the devices storing and checking {paper_stored_cpu:.1} (its per-device encryption included) / ours {data_phase_cpu:.1}"
        ),
    ));
    rows.push(Budget::report(
        "paper_egress_ratio",
        paper.published_bytes as f64 / fanout.published_bytes,
        format!(
            "paper's per-device encryption published {} bytes / ours {}",
            paper.published_bytes, fanout.published_bytes
        ),
    ));
    rows.push(Budget::at_least(
        "paper_wall_ratio",
        paper.seconds / fanout.data_phase_seconds,
        1.0,
        format!(
            "paper's data phase {:.3} s (per-device encryption + relay, devices only decrypt, no handshakes) / ours {:.3} s",
            paper.seconds, fanout.data_phase_seconds
        ),
    ));
    rows.push(Budget::report(
        "paper_stored_wall_ratio",
        paper_stored.seconds / fanout.data_phase_seconds,
        format!(
            "paper's data phase with the devices storing and checking the image as ours do {:.3} s / ours {:.3} s",
            paper_stored.seconds, fanout.data_phase_seconds
        ),
    ));

    let delta = delta_rows(&args, &mut rows)?;
    let large = if args.large_image_mib > 0 {
        large_rows(&args, &mut rows).await?
    } else {
        Value::Null
    };

    println!("{}", render_table(&rows));
    let summary = json!({
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "config": {
            "devices": n, "image_bytes": image.len(), "chunk_bytes": args.chunk_bytes,
            "scale_devices": args.scale_devices, "scale_image_bytes": args.scale_image_bytes,
        },
        "fanout": campaign_json(&fanout),
        "relay_baseline_seconds": [baseline_before.seconds, baseline_after.seconds],
        "baseline_cpu_seconds": {
            "relay": relay_cpu, "pull": pull_cpu, "pull_device_work": pull_work_cpu,
            "paper": paper_cpu, "paper_stored": paper_stored_cpu,
        },
        "relay_baseline_lost_messages": baseline_before.lost_messages + baseline_after.lost_messages,
        "pull_baseline": {"seconds": pull.seconds, "lost_messages": pull.lost_messages, "window": PULL_WINDOW},
        "pull_device_work_baseline": {
            "seconds": pull_work.seconds,
            "lost_messages": pull_work.lost_messages,
            "corrupt_messages": pull_work.corrupt_messages,
        },
        "paper_stored_baseline": {
            "wall_seconds": paper_stored.seconds,
            "lost_messages": paper_stored.lost_messages,
            "corrupt_messages": paper_stored.corrupt_messages,
        },
        "paper_baseline": {
            "egress_bytes": paper.published_bytes,
            "wall_seconds": paper.seconds,
            "lost_messages": paper.lost_messages,
            "corrupt_messages": paper.corrupt_messages,
        },
        "scale": scale.as_ref().map(campaign_json),
        "scale_mode": if scale.is_some() { "full: every device connected over TLS" } else { "skipped" },
        "protocol": protocol,
        "delta": delta,
        "large": large,
        "budgets": budgets_json(&rows),
        "seconds": started.elapsed().as_secs_f64(),
        "reproduce": "make bench (BENCH_ARGS='--devices N --image-bytes B ...' to change the sizes)",
    });
    write_summary(&args, &rows, summary, started)
}

fn budgets_json(rows: &[Budget]) -> Vec<Value> {
    rows.iter()
        .map(|r| json!({"key": r.key, "value": r.value, "budget": r.budget, "met": r.met, "how": r.how}))
        .collect()
}

/// Writes `summary.json` (with every row's value under its key) and `summary.md` (the table)
/// to `--out` and prints which budgets were not met.
fn write_summary(args: &Args, rows: &[Budget], mut summary: Value, started: Instant) -> Result<()> {
    for row in rows {
        summary[row.key] = json!(row.value);
    }
    let path = args.out.join("summary.json");
    write_json(&path, &summary)?;
    std::fs::write(args.out.join("summary.md"), render_markdown(rows))
        .with_context(|| format!("writing {}", args.out.join("summary.md").display()))?;
    let unmet: Vec<&str> = rows
        .iter()
        .filter(|r| r.met == Some(false))
        .map(|r| r.key)
        .collect();
    println!(
        "bench: {} figures in {:.0} s; {} budgets not met{}; {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        unmet.len(),
        if unmet.is_empty() {
            String::new()
        } else {
            format!(" ({})", unmet.join(", "))
        },
        path.display()
    );
    Ok(())
}

/// The chunk publishes the product makes for `image` (their exact payloads), so the relay
/// baseline moves the same bytes as the campaign, and the sealed image they open with.
fn chunk_payloads(image: &[u8], chunk_bytes: u32) -> Result<(SealedFirmware, Vec<Vec<u8>>)> {
    let prepared = PreparedCampaign::prepare(CampaignSpec {
        campaign_id: "bench".into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware {
            image: image.to_vec(),
        },
        expires_at: u64::MAX / 2,
        chunk_size: chunk_bytes,
        release: None,
    })?;
    let topics = TopicTree::new("iot", "bench")?;
    let sealed = prepared
        .firmware()
        .cloned()
        .context("a firmware campaign has a sealed image")?;
    let payloads = prepared
        .chunk_publishes(&topics)
        .into_iter()
        .map(|o| o.payload)
        .collect();
    Ok((sealed, payloads))
}

/// The large-image row (`sealed_ota_e2e::large_bench`): the operator's and the broker's memory
/// budgets (DESIGN.md section 5, docs/protocol.md "Large images"), nothing lost, and the
/// campaign's time beside a plain relay of the same bytes; its JSON for the summary.
async fn large_rows(args: &Args, rows: &mut Vec<Budget>) -> Result<Value> {
    let config = LargeConfig {
        image_bytes: args.large_image_mib << 20,
        devices: args.large_devices,
        in_flight: args.large_in_flight,
        chunk_bytes: args.chunk_bytes,
        timeout: Duration::from_secs(args.large_timeout_seconds),
    };
    let run = large_bench::run(&config).await?;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let n = config.devices;
    let size = format!(
        "{} MiB OCI image to {n} devices, {} in flight",
        args.large_image_mib, config.in_flight
    );
    for (key, who, peak, idle, limit) in [
        (
            "large_operator_rss_growth_mib",
            "operator peak RSS",
            run.operator_rss_peak,
            run.operator_rss_idle,
            128.0,
        ),
        (
            "large_broker_rss_growth_mib",
            "Mosquitto peak RSS during the campaign",
            run.broker_rss_peak,
            run.broker_rss_idle,
            256.0,
        ),
    ] {
        rows.push(Budget::at_most(
            key,
            mib(peak.saturating_sub(idle)),
            limit,
            format!(
                "{who} {:.0} MiB - idle before it {:.0} MiB ({size})",
                mib(peak),
                mib(idle)
            ),
        ));
    }
    let delivered = run.succeeded.min(run.hashes_matching);
    rows.push(Budget::at_most(
        "large_devices_lost",
        f64::from(n.saturating_sub(delivered)),
        0.0,
        format!(
            "{} of {n} Succeeded, {} with the image's SHA-256 as hashed on the device's disk",
            run.succeeded, run.hashes_matching
        ),
    ));
    rows.push(Budget::report(
        "large_campaign_relay_ratio",
        run.campaign_seconds / run.relay.seconds,
        format!(
            "campaign {:.1} s (apply to Succeeded: registry pull, sealing, {n} devices {} at a time) / plain relay of the same bytes to {n} subscribers {:.1} s ({} messages lost)",
            run.campaign_seconds, config.in_flight, run.relay.seconds, run.relay.lost_messages
        ),
    ));
    rows.push(Budget::report(
        "large_relay_broker_rss_growth_mib",
        mib(run
            .relay_broker_rss_peak
            .saturating_sub(run.broker_rss_idle)),
        "Mosquitto peak RSS during the plain relay - before the campaign (MiB)".into(),
    ));
    Ok(json!({
        "image_bytes": config.image_bytes,
        "devices": n,
        "in_flight": config.in_flight,
        "chunk_bytes": config.chunk_bytes,
        "campaign_seconds": run.campaign_seconds,
        "succeeded": run.succeeded,
        "hashes_matching": run.hashes_matching,
        "operator_rss_idle_bytes": run.operator_rss_idle,
        "operator_rss_peak_bytes": run.operator_rss_peak,
        "broker_rss_idle_bytes": run.broker_rss_idle,
        "broker_rss_peak_bytes": run.broker_rss_peak,
        "relay_seconds": run.relay.seconds,
        "relay_lost_messages": run.relay.lost_messages,
        "relay_published_bytes": run.relay.published_bytes,
        "relay_broker_rss_peak_bytes": run.relay_broker_rss_peak,
        "operator_published_bytes": run.published_bytes,
        "chunks_served": run.chunks_served,
        "min_free_disk_bytes": run.min_free_disk,
        "write_seconds": run.write_seconds,
        "push_seconds": run.push_seconds,
    }))
}

/// One firmware campaign to `devices` emulated devices, from an image served over HTTP.
async fn run_campaign(
    prefix: &str,
    devices: u32,
    image: &[u8],
    chunk_bytes: u32,
    emulator_args: &[&str],
) -> Result<CampaignRun> {
    let mut product = Product::new(prefix, devices).await?;
    product.window_timeout_seconds = 30;
    // Measuring the product, not the test tooling: no key log, and the emulated devices (which
    // share one disk here) do not fsync their frequent state saves.
    product.log_keys = false;
    let server = sealed_ota_e2e::http::FileServer::start(image.to_vec()).await?;
    product.start_operator()?;
    wait_ready(&product.metrics_addr).await?;
    // Idle: leader, caches synced with every Device, no campaign.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = product.operator_pid().context("operator not running")?;
    let rss_idle = process_memory(pid, "VmRSS")?;
    product.start_emulator(&[emulator_args, &["--no-state-fsync"]].concat())?;
    let processes = [
        ("operator", pid),
        (
            "device-emulator",
            product.emulator_pid().context("emulator not running")?,
        ),
        (
            "mosquitto",
            testbed_pid(&product.bed.state_dir, "mosquitto")?,
        ),
        (
            "kube-apiserver",
            testbed_pid(&product.bed.state_dir, "apiserver")?,
        ),
        ("etcd", testbed_pid(&product.bed.state_dir, "etcd")?),
    ];
    let cpu_before = cpu_of(&processes)?;
    // Samples from before the apply to after the end, so they always cover the data phase.
    let mut first = CpuTimeline::default();
    first.push(unix_seconds(), cpu_before.clone());
    let timeline = std::sync::Arc::new(std::sync::Mutex::new(first));
    let sampler = {
        let timeline = std::sync::Arc::clone(&timeline);
        tokio::spawn(async move {
            loop {
                if let Ok(cpu) = cpu_of(&processes) {
                    timeline
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(unix_seconds(), cpu);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let name = "bench-2-0-0";
    product.apply_campaign(
        name,
        json!({
            "selector": {"matchLabels": {"fleet": product.fleet_label()}},
            "targetVersion": "2.0.0",
            "payload": {"firmware": {"url": {"url": server.url(), "sha256": hex(&sha256(image))}}},
            "managerSecretName": "sealed-ota-manager",
            "chunkSize": chunk_bytes,
            "rollout": {"maxInFlight": devices, "deviceTimeoutSeconds": 900, "retries": 2,
                        "retryBackoffSeconds": 5},
        }),
    )?;
    let applied = Instant::now();
    let campaign = product
        .wait_campaign(name, "campaign finished", Duration::from_secs(1500), |c| {
            c.status.as_ref().map(|s| s.phase.is_terminal()) == Some(true)
        })
        .await?;
    let wall_seconds = applied.elapsed().as_secs_f64();
    let rss_peak = process_memory(pid, "VmHWM")?;
    sampler.abort();
    // Cancelled, so no sample lands after the last one.
    let _ = sampler.await;
    let cpu_after = cpu_of(&processes)?;
    timeline
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(unix_seconds(), cpu_after.clone());
    let cpu_seconds = cpu_after
        .into_iter()
        .map(|(name, after)| (name, after - cpu_before[name]))
        .collect();
    let status = campaign.status.clone().context("campaign status")?;
    if status.phase != CampaignPhase::Succeeded {
        bail!("campaign ended {:?}: {:?}", status.phase, status.failures);
    }
    // Device status writes queue behind the apiserver; the campaign can finish first. Count
    // them once they stopped (and report how long after the campaign the last one landed).
    let (metrics, device_writes_lag_seconds) = drained_metrics(
        &product.metrics_addr,
        Duration::from_secs(5),
        Duration::from_secs(600),
    )
    .await?;
    let rss_end = process_memory(pid, "VmRSS")?;
    let uid = campaign.metadata.uid.clone().context("campaign uid")?;
    let wrap_bytes = wrap_bytes(
        &product.manager_id,
        &product.device_ids[0],
        &uid,
        image,
        chunk_bytes,
    )?;
    let metric = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
    let campaign_object_bytes = product
        .kubectl(&["get", "updatecampaign", name, "-o", "json"])?
        .len();
    product.stop_emulator();
    let emulator_json = product.dir.join("emulator-1.json");
    let emulator: Value = serde_json::from_slice(
        &std::fs::read(&emulator_json)
            .with_context(|| format!("reading {}", emulator_json.display()))?,
    )
    .context("emulator JSON summary")?;
    // The devices' stored images (N x image) are not kept: a 1,000-device run writes 1 GiB.
    std::fs::remove_dir_all(product.dir.join("fleet"))
        .with_context(|| format!("removing {}", product.dir.join("fleet").display()))?;
    let chunk_count = image.len().div_ceil(chunk_bytes as usize) as u64;
    let data_phase_seconds = emulator["dataPhaseSeconds"]
        .as_f64()
        .context("the emulator saw no chunk")?;
    let data_phase_started = emulator["dataPhaseStartedUnixSeconds"]
        .as_f64()
        .context("the emulator saw no chunk")?;
    let data_phase_cpu_seconds = timeline
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .between(data_phase_started, data_phase_started + data_phase_seconds)
        .context("the CPU samples do not cover the data phase")?;
    Ok(CampaignRun {
        devices,
        wall_seconds,
        data_phase_seconds,
        published_bytes: metric("sealed_ota_operator_mqtt_published_bytes_total"),
        device_status_writes: metric("sealed_ota_operator_status_writes_total{kind=\"device\"}"),
        campaign_status_writes: metric(
            "sealed_ota_operator_status_writes_total{kind=\"campaign\"}",
        ),
        chunks_expected: chunk_count * u64::from(devices),
        chunks_received: emulator["chunksReceived"].as_u64().unwrap_or(0),
        installed: emulator["outcomes"]["installed"].as_u64().unwrap_or(0),
        campaign_object_bytes,
        rss_idle,
        rss_peak,
        rss_end,
        device_writes_lag_seconds,
        wrap_bytes,
        cpu_seconds,
        data_phase_cpu_seconds,
        emulator,
    })
}

fn cpu_line(cpu: &BTreeMap<&'static str, f64>) -> String {
    cpu.iter()
        .map(|(name, s)| format!("{name} {s:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu_of(processes: &[(&'static str, u32)]) -> Result<BTreeMap<&'static str, f64>> {
    processes
        .iter()
        .map(|(name, pid)| Ok((*name, process_cpu_seconds(*pid)?)))
        .collect()
}

/// The delta figures on the pair of release binaries (zstd, the product's codec, and bsdiff), as
/// table rows; their JSON for the summary (`null` when the base binary is absent).
fn delta_rows(args: &Args, rows: &mut Vec<Budget>) -> Result<Value> {
    let (Ok(base), Ok(target)) = (
        std::fs::read(&args.delta_base),
        std::fs::read(&args.delta_target),
    ) else {
        eprintln!(
            "bench: no delta figures ({} or {} missing; scripts/delta-pair.sh makes the base)",
            args.delta_base.display(),
            args.delta_target.display()
        );
        return Ok(Value::Null);
    };
    eprintln!("bench: delta codecs on two release builds of the device agent");
    let f = sealed_ota_e2e::delta_bench::measure(&base, &target)?;
    let pair = format!(
        "{} -> {} ({} -> {} bytes)",
        args.delta_base.display(),
        args.delta_target.display(),
        f.base_bytes,
        f.full_bytes
    );
    rows.push(Budget::report(
        "delta_zstd_ratio",
        f.zstd_ratio(),
        format!(
            "zstd --patch-from delta {} bytes / full image {}, made in {:.2} s, applied in {:.2} s: {pair}",
            f.zstd.delta_bytes, f.full_bytes, f.zstd.make_seconds, f.zstd.apply_seconds
        ),
    ));
    rows.push(Budget::report(
        "delta_bsdiff_ratio",
        f.bsdiff_ratio(),
        format!(
            "bsdiff delta {} bytes / full image {}, made in {:.2} s, applied in {:.2} s",
            f.bsdiff.delta_bytes, f.full_bytes, f.bsdiff.make_seconds, f.bsdiff.apply_seconds
        ),
    ));
    let codec = |c: &sealed_ota_e2e::delta_bench::CodecFigures| json!({"delta_bytes": c.delta_bytes, "make_seconds": c.make_seconds, "apply_seconds": c.apply_seconds});
    Ok(json!({
        "base_bytes": f.base_bytes,
        "full_bytes": f.full_bytes,
        "zstd": codec(&f.zstd),
        "bsdiff": codec(&f.bsdiff),
    }))
}

fn campaign_json(run: &CampaignRun) -> Value {
    json!({
        "devices": run.devices,
        "wall_seconds": run.wall_seconds,
        "data_phase_seconds": run.data_phase_seconds,
        "published_bytes": run.published_bytes,
        "device_status_writes": run.device_status_writes,
        "campaign_status_writes": run.campaign_status_writes,
        "chunks_expected": run.chunks_expected,
        "chunks_received": run.chunks_received,
        "installed": run.installed,
        "campaign_object_bytes": run.campaign_object_bytes,
        "operator_rss_idle_bytes": run.rss_idle,
        "operator_rss_peak_bytes": run.rss_peak,
        "operator_rss_end_bytes": run.rss_end,
        "device_writes_lag_seconds": run.device_writes_lag_seconds,
        "wrap_bytes": run.wrap_bytes,
        "cpu_seconds": run.cpu_seconds,
        "data_phase_cpu_seconds": run.data_phase_cpu_seconds,
        "emulator": run.emulator,
    })
}

/// Waits for the operator's /readyz (leader elected, caches synced).
async fn wait_ready(addr: &str) -> Result<()> {
    let url = format!("http://{addr}/readyz");
    sealed_ota_e2e::wait_for(
        "the operator's /readyz",
        Duration::from_secs(120),
        || async { Ok(sealed_ota_e2e::http::get(&url).await.ok().map(|_| ())) },
    )
    .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
