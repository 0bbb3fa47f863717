//! `make bench-scale` (issue 16): sharded campaigns at several fleet sizes on the running test bed
//! (`e2e/testbed up --broker rmqtt-cluster` with `SEALED_OTA_RMQTT_NODES` nodes, or any broker),
//! with `--replicas` operator replicas sharing `--shards` shards and the fleet split over emulator
//! processes (`run --part K/N`: one process may not hold more connections than its open-file
//! limit). Per run it records devices completed over time, CPU seconds and peak RSS per process
//! group, the apiserver's write requests, the operator's status writes and etcd's growth; then
//! it fits the cost model (`sealed_ota_e2e::scale`) and writes `scale.json`, `scale.md` (tables)
//! and three SVG plots to `--out`, after every run (a long series keeps what it measured). CPU
//! and memory are sampled every second, so a run a test-bed process dies in (the OOM killer)
//! is written with what it measured up to then, and the series stops there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kube::api::ListParams;
use kube::Api;
use sealed_ota_e2e::bench::{parse_metrics, process_cpu_seconds, process_memory, testbed_pid};
use sealed_ota_e2e::product::{random_image, Product};
use sealed_ota_e2e::scale::{
    completion_svg, cost_model, cpu_svg, deliveries_table, memory_svg, model_table,
    operator_memory_table, runs_table, sampled_peaks, Deliveries, ScaleRun, AFTER_CAMPAIGN_SECS,
};
use sealed_ota_e2e::TestBed;
use sealed_ota_operator::crd::{CampaignPhase, Device};
use sealed_ota_operator::shards::BUCKET_LABEL;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "sealed-ota-scale-bench",
    about = "Sharded campaigns at several fleet sizes, and the cost model fitted to them"
)]
struct Args {
    /// Fleet sizes, one campaign each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,30000,100000")]
    devices: Vec<u32>,
    /// Operator replicas.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Shards (`--shards`, a power of two).
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Devices per emulator process at most (each holds a connection and files per device
    /// under the per-process open-file limit, 20,000 here).
    #[arg(long, default_value_t = 12_000)]
    devices_per_emulator: u32,
    /// The campaign's `maxInFlight`; 0 (the default) puts every device in flight at once. A
    /// bound keeps the broker's, the emulators' and the operator's in-flight memory to that many
    /// devices (what a 100,000-device run needs on a 23 GB machine).
    #[arg(long, default_value_t = 0)]
    max_in_flight: u32,
    /// Image size, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    image_bytes: usize,
    /// The fleet size the cost model predicts.
    #[arg(long, default_value_t = 1_000_000.0)]
    predict: f64,
    /// Where scale.json, scale.md and the plots go.
    #[arg(long, default_value = "target/bench/scale")]
    out: PathBuf,
    /// A `scale.json` an earlier invocation wrote: its runs come first in the tables, plots and
    /// cost model (a long run measured once is fitted with shorter ones measured later).
    #[arg(long)]
    previous_runs: Option<PathBuf>,
}

/// Processes of one group (`operator`, `emulator`, `broker`, `kube-apiserver`, `etcd`).
type Groups = Vec<(&'static str, Vec<u32>)>;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bed = TestBed::get()?;
    std::fs::create_dir_all(&args.out)?;
    let mut runs = match &args.previous_runs {
        Some(path) => previous_runs(path)?,
        None => Vec::new(),
    };
    for &devices in &args.devices {
        eprintln!(
            "scale: {devices} devices, {} replicas, {} shards, broker {} ({} nodes)",
            args.replicas,
            args.shards,
            bed.broker,
            bed.mqtts_urls.len()
        );
        let run = run_campaign(bed, &args, devices).await?;
        eprintln!(
            "scale: {devices} devices in {:.0} s ({:.0} a minute), {} lost",
            run.wall_seconds,
            run.devices_per_minute(),
            run.lost()
        );
        let ended_early = run.ended_early.clone();
        runs.push(run);
        write_outputs(&args, &runs)?;
        if let Some(why) = ended_early {
            bail!(
                "the {devices}-device run ended early ({why}); what it measured is in {}",
                args.out.display()
            );
        }
    }
    println!("{}", std::fs::read_to_string(args.out.join("scale.md"))?);
    Ok(())
}

fn previous_runs(path: &Path) -> Result<Vec<ScaleRun>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--previous-runs {}", path.display()))?;
    let summary: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--previous-runs {}: not JSON", path.display()))?;
    summary["runs"]
        .as_array()
        .with_context(|| format!("--previous-runs {}: no `runs` list", path.display()))?
        .iter()
        .map(ScaleRun::from_json)
        .collect::<Result<_>>()
        .with_context(|| format!("--previous-runs {}", path.display()))
}

fn write_outputs(args: &Args, runs: &[ScaleRun]) -> Result<()> {
    let model = cost_model(runs, args.predict);
    let summary = json!({
        "runs": runs.iter().map(ScaleRun::to_json).collect::<Vec<_>>(),
        "model": model.iter().map(|r| json!({
            "figure": r.figure, "fixed": r.line.fixed, "per_device": r.line.per_device,
            "predicted": r.predicted})).collect::<Vec<_>>(),
        "predict_devices": args.predict,
    });
    std::fs::write(
        args.out.join("scale.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let mut md = format!(
        "## Runs\n\n{}\n## What the devices received\n\n{}\n## Operator memory (budget: idle + 2 KiB per device in flight, back near idle after the campaign)\n\n{}\n",
        runs_table(runs),
        deliveries_table(runs),
        operator_memory_table(runs)
    );
    if model.is_empty() {
        md.push_str("No cost model: it needs runs at two fleet sizes at least.\n");
    } else {
        md.push_str(&format!(
            "## Cost model\n\n{}",
            model_table(&model, args.predict)
        ));
    }
    std::fs::write(args.out.join("scale.md"), md)?;
    std::fs::write(args.out.join("completed.svg"), completion_svg(runs)?)?;
    std::fs::write(args.out.join("cpu.svg"), cpu_svg(runs)?)?;
    std::fs::write(args.out.join("memory.svg"), memory_svg(runs)?)?;
    Ok(())
}

async fn run_campaign(bed: &TestBed, args: &Args, devices: u32) -> Result<ScaleRun> {
    let etcd_before = etcd_db_bytes(bed).await?;
    let mut product = Product::new(&format!("scale{devices}"), devices).await?;
    product.window_timeout_seconds = 30;
    product.log_keys = false;
    product.emulator_metrics = true;
    product.operator_args = vec!["--shards".into(), args.shards.to_string()];
    product
        .firmware_configmap("fw", &random_image(args.image_bytes))
        .await?;
    for i in 0..args.replicas as usize {
        product.start_replica(i)?;
    }
    wait_labelled(&product, Duration::from_secs(3600)).await?;
    // Idle: leases held, caches synced, no campaign.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let replicas: Vec<u32> = (0..args.replicas as usize)
        .map(|i| product.replica_pid(i).context("a replica exited"))
        .collect::<Result<_>>()?;
    let operator_rss_idle_bytes = replicas
        .iter()
        .map(|&pid| process_memory(pid, "VmRSS"))
        .sum::<Result<u64>>()?;
    let parts = devices.div_ceil(args.devices_per_emulator).max(1) as usize;
    product.start_emulators(parts, &["--no-state-fsync"])?;
    wait_connected(&product, devices, Duration::from_secs(3600)).await?;
    let groups: Groups = vec![
        ("operator", replicas.clone()),
        ("emulator", product.emulator_pids()),
        ("broker", broker_pids(&bed.state_dir)?),
        (
            "kube-apiserver",
            vec![testbed_pid(&bed.state_dir, "apiserver")?],
        ),
        ("etcd", vec![testbed_pid(&bed.state_dir, "etcd")?]),
    ];
    let cpu_before = sample(&groups).map_err(anyhow::Error::msg)?.0;
    let apiserver_before = apiserver_writes(&product).await?;
    let operator_before = operator_counters(&mut product, args.replicas, WRITES).await?;
    let failures_before = operator_counters(&mut product, args.replicas, FAILURES).await?;
    let retries_before = operator_counter(&mut product, args.replicas, RETRIES).await?;
    let dropped_before = broker_dropped(&bed.state_dir).await?;
    let max_in_flight = match args.max_in_flight {
        0 => devices,
        bound => bound.min(devices),
    };
    product.apply_campaign(
        "fw",
        product.firmware_spec(
            "2.0.0",
            "fw",
            // A message the broker drops costs its device a timeout and a retry: short enough
            // that the run ends, counted in `device_retries`.
            json!({"rollout": {"maxInFlight": max_in_flight, "deviceTimeoutSeconds": 300,
                "retries": 2, "retryBackoffSeconds": 5}}),
        ),
    )?;
    let applied = Instant::now();
    let mut completed = vec![(0.0, 0)];
    let mut memory = Vec::new();
    let mut cpu_last = cpu_before.clone();
    // Every second: devices installed, every process's CPU and memory, the campaign's phase. A
    // test-bed process that died (the kernel's OOM killer, a crash) ends the run with what it
    // measured up to then.
    let ended = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = applied.elapsed().as_secs_f64();
        completed.push((t, installed_now(&product)));
        match sample(&groups) {
            Ok((cpu, rss)) => {
                cpu_last = cpu;
                memory.push((t, rss));
            }
            Err(died) => break Err(format!("{died} {t:.0} s after the campaign was applied")),
        }
        let campaign = match product.campaign("fw").await {
            Ok(campaign) => campaign,
            Err(e) => match sample(&groups) {
                Err(died) => break Err(format!("{died} {t:.0} s after the campaign was applied")),
                Ok(_) => return Err(e),
            },
        };
        if campaign
            .status
            .as_ref()
            .is_some_and(|s| s.phase.is_terminal())
        {
            break Ok(campaign);
        }
        if applied.elapsed() > Duration::from_secs(4 * 3600) {
            bail!("the {devices}-device campaign did not end within 4 hours");
        }
    };
    let wall_seconds = applied.elapsed().as_secs_f64();
    let cpu_seconds = cpu_last
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v - cpu_before[k]))
        .collect();
    // What the samples measured; the rest is NaN (or empty) until read below: for a run that
    // ended early, what died with its process stays so.
    let mut run = ScaleRun {
        devices,
        replicas: args.replicas,
        shards: args.shards,
        broker_nodes: bed.mqtts_urls.len() as u32,
        emulators: parts as u32,
        max_in_flight,
        wall_seconds,
        completed,
        cpu_seconds,
        rss_peak_bytes: sampled_peaks(&memory),
        memory,
        ended_early: None,
        operator_rss_idle_bytes,
        operator_rss_after_bytes: None,
        apiserver_writes: f64::NAN,
        operator_writes: BTreeMap::new(),
        device_failures: BTreeMap::new(),
        device_retries: f64::NAN,
        broker_dropped: None,
        etcd_db_bytes: f64::NAN,
        installed: installed_now(&product),
        deliveries: Deliveries::default(),
    };
    let campaign = match ended {
        Ok(campaign) => campaign,
        Err(ended_early) => {
            eprintln!("scale: the {devices}-device run ended early: {ended_early}");
            run.ended_early = Some(ended_early);
            if let Ok(writes) = apiserver_writes(&product).await {
                run.apiserver_writes = writes - apiserver_before;
            }
            if let Ok(bytes) = etcd_db_bytes(bed).await {
                run.etcd_db_bytes = bytes - etcd_before;
            }
            product.keep();
            return Ok(run);
        }
    };
    run.rss_peak_bytes = groups
        .iter()
        .map(|(name, pids)| {
            let peak = pids
                .iter()
                .map(|&pid| process_memory(pid, "VmHWM"))
                .sum::<Result<u64>>()?;
            Ok(((*name).to_owned(), peak))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    run.apiserver_writes = apiserver_writes(&product).await? - apiserver_before;
    let operator_after = operator_counters(&mut product, args.replicas, WRITES).await?;
    run.operator_writes = difference(&operator_after, &operator_before);
    let failures_after = operator_counters(&mut product, args.replicas, FAILURES).await?;
    run.device_failures = difference(&failures_after, &failures_before);
    run.device_retries =
        operator_counter(&mut product, args.replicas, RETRIES).await? - retries_before;
    run.broker_dropped = broker_dropped(&bed.state_dir)
        .await?
        .zip(dropped_before)
        .map(|(a, b)| a - b);
    let status = campaign.status.context("campaign status")?;
    if status.phase != CampaignPhase::Succeeded {
        bail!("campaign ended {:?}: {:?}", status.phase, status.failures);
    }
    // Back near idle after the campaign? Its runs end with the terminal phase; the replicas'
    // memory once they have, and once the last Device writes landed.
    tokio::time::sleep(Duration::from_secs(AFTER_CAMPAIGN_SECS)).await;
    run.operator_rss_after_bytes = Some(
        replicas
            .iter()
            .map(|&pid| process_memory(pid, "VmRSS"))
            .sum::<Result<u64>>()?,
    );
    product.stop_emulator();
    run.installed = 0;
    for path in product.emulator_summaries() {
        let summary: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("emulator summary {}", path.display()))?;
        run.installed += summary["outcomes"]["installed"].as_u64().unwrap_or(0);
        run.deliveries.add_summary(&summary);
    }
    run.completed.push((wall_seconds, run.installed));
    run.etcd_db_bytes = etcd_db_bytes(bed).await? - etcd_before;
    for i in 0..args.replicas as usize {
        product.kill_replica(i);
    }
    // The namespace and the logs are kept (not `pass()`): the runs' objects stay in etcd as the
    // next run's starting point, and the operator, emulator and broker logs can be read after.
    product.keep();
    eprintln!(
        "scale: logs of the {devices}-device run in {}",
        product.dir.display()
    );
    // The devices' stores (keys, state, images) are not kept: 100,000 devices write GBs.
    std::fs::remove_dir_all(product.dir.join("fleet"))
        .with_context(|| format!("removing {}", product.dir.join("fleet").display()))?;
    Ok(run)
}

/// Waits until the coordinator labelled every Device with its bucket (a shard's replica sees
/// only labelled Devices): no Device without the label is left.
async fn wait_labelled(product: &Product, limit: Duration) -> Result<()> {
    let api: Api<Device> = Api::namespaced(product.ns.client.clone(), &product.ns.name);
    let unlabelled = ListParams::default()
        .labels(&format!("!{BUCKET_LABEL}"))
        .limit(1);
    sealed_ota_e2e::wait_for("every Device labelled with its bucket", limit, || {
        let api = &api;
        let unlabelled = &unlabelled;
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(api.list(unlabelled).await?.items.is_empty().then_some(()))
        }
    })
    .await
}

/// Sum of one emulator counter over every part's metrics file (a part not written yet: 0).
fn emulator_sum(product: &Product, series: &str) -> u64 {
    product
        .emulator_metrics_files()
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| parse_metrics(&text).get(series).copied().unwrap_or(0.0) as u64)
        .sum()
}

fn installed_now(product: &Product) -> u64 {
    emulator_sum(
        product,
        "sealed_ota_emulator_device_outcomes{outcome=\"installed\"}",
    )
}

async fn wait_connected(product: &Product, devices: u32, limit: Duration) -> Result<()> {
    sealed_ota_e2e::wait_for("every device connected", limit, || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let connected = emulator_sum(product, "sealed_ota_emulator_connected_devices");
        Ok((connected >= u64::from(devices)).then_some(()))
    })
    .await
}

/// Write requests the apiserver served so far (its own `apiserver_request_total`).
async fn apiserver_writes(product: &Product) -> Result<f64> {
    let request = hyper::Request::get("/metrics").body(Vec::new())?;
    let text = product
        .ns
        .client
        .request_text(request)
        .await
        .context("reading the apiserver's /metrics")?;
    Ok(parse_metrics(&text)
        .iter()
        .filter(|(series, _)| series.starts_with("apiserver_request_total{"))
        .filter(|(series, _)| {
            ["POST", "PUT", "PATCH", "DELETE", "APPLY"]
                .iter()
                .any(|verb| series.contains(&format!("verb=\"{verb}\"")))
        })
        .map(|(_, v)| v)
        .sum())
}

/// The operator's status writes, by kind.
const WRITES: &str = "sealed_ota_operator_status_writes_total{kind=\"";
/// The operator's device failures (after the last retry), by reason.
const FAILURES: &str = "sealed_ota_operator_device_failures_total{reason=\"";
/// The operator's timed-out device attempts that were retried.
const RETRIES: &str = "sealed_ota_operator_device_retries_total";

/// One labelled operator counter so far (`series` up to the label's value), by label value,
/// summed over the replicas.
async fn operator_counters(
    product: &mut Product,
    replicas: u32,
    series: &str,
) -> Result<BTreeMap<String, f64>> {
    let mut counts = BTreeMap::new();
    for i in 0..replicas as usize {
        let addr = product.replica_metrics_addr(i)?;
        let metrics = sealed_ota_e2e::bench::scrape_metrics(&addr).await?;
        for (name, v) in metrics {
            if let Some(label) = name
                .strip_prefix(series)
                .and_then(|rest| rest.strip_suffix("\"}"))
            {
                *counts.entry(label.to_owned()).or_insert(0.0) += v;
            }
        }
    }
    Ok(counts)
}

/// One unlabelled operator counter so far, summed over the replicas.
async fn operator_counter(product: &mut Product, replicas: u32, series: &str) -> Result<f64> {
    let mut sum = 0.0;
    for i in 0..replicas as usize {
        let addr = product.replica_metrics_addr(i)?;
        let metrics = sealed_ota_e2e::bench::scrape_metrics(&addr).await?;
        sum += metrics.get(series).copied().unwrap_or(0.0);
    }
    Ok(sum)
}

fn difference(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// Messages the rmqtt cluster dropped so far (its HTTP API's `messages.dropped`, summed over the
/// nodes); `None` for another broker.
async fn broker_dropped(state_dir: &Path) -> Result<Option<f64>> {
    let Ok(ports) = std::fs::read_to_string(state_dir.join("rmqtt/ports")) else {
        return Ok(None);
    };
    let http_port = ports
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(5))
        .context("rmqtt/ports: node 1's HTTP port")?;
    let text =
        sealed_ota_e2e::http::get(&format!("http://127.0.0.1:{http_port}/api/v1/metrics/sum"))
            .await?;
    let sum: serde_json::Value = serde_json::from_str(&text).context("rmqtt metrics JSON")?;
    let sum = if sum.is_array() { &sum[0] } else { &sum };
    sum["messages.dropped"]
        .as_f64()
        .map(Some)
        .context("messages.dropped in rmqtt's /api/v1/metrics/sum")
}

/// etcd's database size (its own `etcd_mvcc_db_total_size_in_bytes`).
async fn etcd_db_bytes(bed: &TestBed) -> Result<f64> {
    let url = std::fs::read_to_string(bed.state_dir.join("etcd.url"))?;
    let text = sealed_ota_e2e::http::get(&format!("{}/metrics", url.trim())).await?;
    parse_metrics(&text)
        .get("etcd_mvcc_db_total_size_in_bytes")
        .copied()
        .context("etcd_mvcc_db_total_size_in_bytes in etcd's /metrics")
}

/// The broker's processes: `mosquitto.pid`, `mochi.pid` or `rmqtt-N.pid` per node.
fn broker_pids(state_dir: &Path) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(state_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".pid") {
            if stem == "mosquitto" || stem == "mochi" || stem.starts_with("rmqtt-") {
                pids.push(testbed_pid(state_dir, stem)?);
            }
        }
    }
    if pids.is_empty() {
        bail!("no broker pid file in {}", state_dir.display());
    }
    Ok(pids)
}

/// CPU seconds so far and resident bytes now, by process group.
type Sample = (BTreeMap<&'static str, f64>, BTreeMap<String, u64>);

/// Every group's CPU seconds so far and resident memory now, or which process has died (its
/// `/proc` entry gone, or a zombie without memory).
fn sample(groups: &Groups) -> Result<Sample, String> {
    let died = |name: &str, pid: u32| format!("{name} (pid {pid}) exited");
    let mut cpu = BTreeMap::new();
    let mut rss = BTreeMap::new();
    for (name, pids) in groups {
        let (mut seconds, mut bytes) = (0.0, 0);
        for &pid in pids {
            seconds += process_cpu_seconds(pid).map_err(|_| died(name, pid))?;
            bytes += process_memory(pid, "VmRSS").map_err(|_| died(name, pid))?;
        }
        cpu.insert(*name, seconds);
        rss.insert((*name).to_owned(), bytes);
    }
    Ok((cpu, rss))
}
