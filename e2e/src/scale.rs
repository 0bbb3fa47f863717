//! The scale run of `make bench-scale` (issue 16), its pure parts: what one sharded campaign
//! measured (`ScaleRun`), the cost model fitted to several runs (a straight line per figure over
//! the device count, least squares, and its prediction for a larger fleet), and the SVG plots
//! (`plotters`): devices completed over time per run, CPU seconds per process per run, resident
//! memory per process over the largest run. A run a test-bed process died in is kept as what it
//! measured up to then (`ended_early`), shown in the tables and left out of the cost model. The
//! binary `sealed-ota-scale-bench` drives the processes and feeds these; nothing here does I/O.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::{json, Value};

/// What one sharded campaign to `devices` devices measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleRun {
    /// Devices of the campaign.
    pub devices: u32,
    /// Operator replicas and shards.
    pub replicas: u32,
    /// Shards (`--shards`).
    pub shards: u32,
    /// Broker nodes the devices spread over.
    pub broker_nodes: u32,
    /// Emulator processes (`run --part K/N`).
    pub emulators: u32,
    /// The campaign's `maxInFlight` (the fleet: every device at once).
    pub max_in_flight: u32,
    /// Seconds from the campaign's apply to its terminal phase.
    pub wall_seconds: f64,
    /// Devices installed (the emulators' count) over seconds since the apply.
    pub completed: Vec<(f64, u64)>,
    /// CPU seconds each process group used from the apply to the end (`operator`, `emulator`,
    /// `broker`, `kube-apiserver`, `etcd`), summed over a group's processes.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Peak resident memory of each process group (bytes, summed over its processes).
    pub rss_peak_bytes: BTreeMap<String, u64>,
    /// Resident memory of each process group (bytes, summed over its processes) over seconds
    /// since the apply, sampled every second.
    pub memory: Vec<(f64, BTreeMap<String, u64>)>,
    /// Why the run stopped before its campaign's terminal phase (a test-bed process died):
    /// its figures are what was measured up to then; `None` for a run that ended.
    pub ended_early: Option<String>,
    /// Resident memory of the operator replicas before the campaign (bytes, summed).
    pub operator_rss_idle_bytes: u64,
    /// Resident memory of the operator replicas after the campaign (bytes, summed): read
    /// [`AFTER_CAMPAIGN_SECS`] after its terminal phase, once its runs ended (`None`: not read,
    /// a run that ended early or one written before this was measured).
    pub operator_rss_after_bytes: Option<u64>,
    /// Write requests the apiserver served during the campaign (its own
    /// `apiserver_request_total`, verbs that change objects).
    pub apiserver_writes: f64,
    /// The operator's own status writes during the campaign, by kind (campaign, device, shard).
    pub operator_writes: BTreeMap<String, f64>,
    /// Device failures the operator counted during the campaign, by reason (a `Timeout` is
    /// retried: a message lost on the way costs one).
    pub device_failures: BTreeMap<String, f64>,
    /// Device attempts that timed out and were retried (the operator's `device_retries_total`).
    pub device_retries: f64,
    /// Messages the broker dropped during the campaign (rmqtt's own counter; `None` for a broker
    /// that does not say).
    pub broker_dropped: Option<f64>,
    /// etcd's database size after the campaign (bytes).
    pub etcd_db_bytes: f64,
    /// Devices that installed the image (the emulators' summaries).
    pub installed: u64,
    /// What the devices received, added up over the emulators' summaries.
    pub deliveries: Deliveries,
}

/// What the devices of a run received, from the emulators' summaries (`--json`, camelCase):
/// how often the broker delivered each chunk, how often devices connected, what was refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deliveries {
    /// Connection attempts (first connections and reconnects).
    pub connect_attempts: u64,
    /// Messages on chunk topics, accepted or not.
    pub chunk_deliveries: u64,
    /// Chunks the devices accepted and stored.
    pub chunks_stored: u64,
    /// Subscriptions the broker refused in a SUBACK.
    pub subscriptions_refused: u64,
    /// Messages the protocol rejected.
    pub messages_rejected: u64,
    /// Payload bytes the devices received.
    pub bytes_received: u64,
}

impl Deliveries {
    /// Adds one emulator's summary; a field it lacks counts 0.
    pub fn add_summary(&mut self, summary: &Value) {
        let field = |name: &str| summary[name].as_u64().unwrap_or(0);
        self.connect_attempts += field("connectAttempts");
        self.chunk_deliveries += field("chunkDeliveries");
        self.chunks_stored += field("chunksReceived");
        self.subscriptions_refused += field("subscriptionsRefused");
        self.messages_rejected += field("messagesRejected");
        self.bytes_received += field("bytesReceived");
    }

    /// Chunk messages delivered per chunk stored (1.0: no chunk was delivered twice).
    pub fn deliveries_per_chunk(&self) -> Option<f64> {
        (self.chunks_stored > 0).then(|| self.chunk_deliveries as f64 / self.chunks_stored as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "connect_attempts": self.connect_attempts,
            "chunk_deliveries": self.chunk_deliveries,
            "chunks_stored": self.chunks_stored,
            "deliveries_per_chunk": self.deliveries_per_chunk(),
            "subscriptions_refused": self.subscriptions_refused,
            "messages_rejected": self.messages_rejected,
            "bytes_received": self.bytes_received,
        })
    }
}

impl ScaleRun {
    /// Devices that did not install.
    pub fn lost(&self) -> u64 {
        u64::from(self.devices).saturating_sub(self.installed)
    }

    /// Devices completed a minute, over the whole campaign.
    pub fn devices_per_minute(&self) -> f64 {
        f64::from(self.devices) * 60.0 / self.wall_seconds.max(f64::EPSILON)
    }

    /// A run as [`ScaleRun::to_json`] wrote it (`scale.json`'s `runs`), so runs measured by an
    /// earlier invocation join the cost model (`--previous-runs`).
    pub fn from_json(run: &Value) -> Result<Self> {
        let u64_of = |field: &str| {
            run[field]
                .as_u64()
                .ok_or_else(|| anyhow!("scale.json run: `{field}` is not a count"))
        };
        let u32_of = |field: &str| -> Result<u32> { Ok(u32::try_from(u64_of(field)?)?) };
        // A figure that died with its process was written as null: NaN again.
        let f64_of = |field: &str| run[field].as_f64().unwrap_or(f64::NAN);
        let map = |field: &str| -> BTreeMap<String, f64> {
            serde_json::from_value(run[field].clone()).unwrap_or_default()
        };
        let deliveries = &run["deliveries"];
        let delivered = |field: &str| deliveries[field].as_u64().unwrap_or(0);
        Ok(ScaleRun {
            devices: u32_of("devices")?,
            replicas: u32_of("replicas")?,
            shards: u32_of("shards")?,
            broker_nodes: u32_of("broker_nodes")?,
            emulators: u32_of("emulators")?,
            max_in_flight: u32_of("max_in_flight")?,
            wall_seconds: f64_of("wall_seconds"),
            completed: serde_json::from_value(run["completed"].clone())?,
            cpu_seconds: map("cpu_seconds"),
            rss_peak_bytes: serde_json::from_value(run["rss_peak_bytes"].clone())?,
            memory: serde_json::from_value(run["memory"].clone()).unwrap_or_default(),
            ended_early: run["ended_early"].as_str().map(str::to_owned),
            operator_rss_idle_bytes: u64_of("operator_rss_idle_bytes")?,
            operator_rss_after_bytes: run["operator_rss_after_bytes"].as_u64(),
            apiserver_writes: f64_of("apiserver_writes"),
            operator_writes: map("operator_writes"),
            device_failures: map("device_failures"),
            device_retries: f64_of("device_retries"),
            broker_dropped: run["broker_dropped"].as_f64(),
            etcd_db_bytes: f64_of("etcd_db_bytes"),
            installed: u64_of("installed")?,
            deliveries: Deliveries {
                connect_attempts: delivered("connect_attempts"),
                chunk_deliveries: delivered("chunk_deliveries"),
                chunks_stored: delivered("chunks_stored"),
                subscriptions_refused: delivered("subscriptions_refused"),
                messages_rejected: delivered("messages_rejected"),
                bytes_received: delivered("bytes_received"),
            },
        })
    }

    /// The run as JSON (`target/bench/scale/scale.json`).
    pub fn to_json(&self) -> Value {
        json!({
            "devices": self.devices,
            "replicas": self.replicas,
            "max_in_flight": self.max_in_flight,
            "shards": self.shards,
            "broker_nodes": self.broker_nodes,
            "emulators": self.emulators,
            "wall_seconds": self.wall_seconds,
            "devices_per_minute": self.devices_per_minute(),
            "completed": self.completed,
            "cpu_seconds": self.cpu_seconds,
            "rss_peak_bytes": self.rss_peak_bytes,
            "memory": self.memory,
            "ended_early": self.ended_early,
            "operator_rss_idle_bytes": self.operator_rss_idle_bytes,
            "operator_rss_after_bytes": self.operator_rss_after_bytes,
            "apiserver_writes": self.apiserver_writes,
            "operator_writes": self.operator_writes,
            "device_failures": self.device_failures,
            "device_retries": self.device_retries,
            "broker_dropped": self.broker_dropped,
            "etcd_db_bytes": self.etcd_db_bytes,
            "installed": self.installed,
            "lost": self.lost(),
            "deliveries": self.deliveries.to_json(),
        })
    }

    /// The figures the cost model fits, by name.
    fn figures(&self) -> Vec<(String, f64)> {
        let mut figures = vec![("wall seconds".to_owned(), self.wall_seconds)];
        for (process, s) in &self.cpu_seconds {
            figures.push((format!("{process} CPU seconds"), *s));
        }
        for (process, b) in &self.rss_peak_bytes {
            figures.push((format!("{process} peak RSS MiB"), *b as f64 / 1048576.0));
        }
        figures.push(("apiserver writes".to_owned(), self.apiserver_writes));
        figures.push(("etcd MiB".to_owned(), self.etcd_db_bytes / 1048576.0));
        figures
    }
}

/// `y = fixed + per_device * n`, fitted by least squares; `None` with fewer than two distinct
/// device counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    /// The intercept (what the figure costs with no device).
    pub fixed: f64,
    /// The slope (what each device adds).
    pub per_device: f64,
}

impl Line {
    /// The line's value at `devices`.
    pub fn at(&self, devices: f64) -> f64 {
        self.fixed + self.per_device * devices
    }
}

/// Least-squares line through `(devices, value)` points.
pub fn fit(points: &[(f64, f64)]) -> Option<Line> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if points.len() < 2 || sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let per_device = sxy / sxx;
    Some(Line {
        fixed: mean_y - per_device * mean_x,
        per_device,
    })
}

/// One figure of the cost model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRow {
    /// What is modelled (`operator CPU seconds`, ...).
    pub figure: String,
    /// The fitted line.
    pub line: Line,
    /// Its value at the predicted fleet size.
    pub predicted: f64,
}

/// The cost model of `runs` (each figure a line over the device count) with each figure's
/// value at `predict_devices`. Runs that ended early, and figures that not every other run
/// measured, are left out.
pub fn cost_model(runs: &[ScaleRun], predict_devices: f64) -> Vec<ModelRow> {
    let runs: Vec<&ScaleRun> = runs.iter().filter(|r| r.ended_early.is_none()).collect();
    let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for run in &runs {
        for (figure, value) in run.figures() {
            points
                .entry(figure)
                .or_default()
                .push((f64::from(run.devices), value));
        }
    }
    points
        .into_iter()
        .filter(|(_, p)| p.len() == runs.len())
        .filter_map(|(figure, p)| {
            let line = fit(&p)?;
            Some(ModelRow {
                figure,
                predicted: line.at(predict_devices),
                line,
            })
        })
        .collect()
}

/// The cost model as a Markdown table (`scale.md`, pasted into docs/scale.md).
pub fn model_table(rows: &[ModelRow], predict_devices: f64) -> String {
    let mut out = format!(
        "| figure | fixed | per 1,000 devices | at {predict_devices:.0} devices |\n|---|---|---|---|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {:.3} | {:.0} |\n",
            r.figure,
            r.line.fixed,
            r.line.per_device * 1000.0,
            r.predicted
        ));
    }
    out
}

/// The measured runs as a Markdown table.
pub fn runs_table(runs: &[ScaleRun]) -> String {
    let mut out = String::from(
        "| devices | in flight at most | replicas / shards | broker nodes | emulators | wall s | devices/min | lost | attempts retried (timeouts) | broker dropped | CPU s (operator, emulator, broker, apiserver, etcd) | peak RSS MiB (operator, broker) | apiserver writes | etcd MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let cpu = |k: &str| r.cpu_seconds.get(k).copied().unwrap_or(0.0);
        let rss = |k: &str| r.rss_peak_bytes.get(k).copied().unwrap_or(0) as f64 / 1048576.0;
        out.push_str(&format!(
            "| {} | {} | {} / {} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {:.0}, {:.0}, {:.0}, {:.0}, {:.0} | {:.0}, {:.0} | {:.0} | {:.1} |\n",
            r.devices,
            r.max_in_flight,
            r.replicas,
            r.shards,
            r.broker_nodes,
            r.emulators,
            r.wall_seconds,
            r.devices_per_minute(),
            r.lost(),
            r.device_retries,
            r.broker_dropped
                .map_or_else(|| "-".to_owned(), |d| format!("{d:.0}")),
            cpu("operator"),
            cpu("emulator"),
            cpu("broker"),
            cpu("kube-apiserver"),
            cpu("etcd"),
            rss("operator"),
            rss("broker"),
            r.apiserver_writes,
            r.etcd_db_bytes / 1048576.0,
        ));
    }
    for r in runs.iter().filter(|r| r.ended_early.is_some()) {
        out.push_str(&format!(
            "\nThe {}-device run ended early: {}. Its figures are what was measured up to then \
             (NaN: not measurable after it), and it is not in the cost model.\n",
            r.devices,
            r.ended_early.as_deref().unwrap_or_default()
        ));
    }
    out
}

/// Seconds after a campaign's terminal phase at which the operator's memory is read again: its
/// runs have ended and the last Device writes landed by then.
pub const AFTER_CAMPAIGN_SECS: u64 = 15;

/// The operator replicas' memory per run (issue 16's budget: idle + 2 KiB per device in flight,
/// back near idle after the campaign), as a Markdown table.
pub fn operator_memory_table(runs: &[ScaleRun]) -> String {
    let mut out = String::from(
        "| devices | in flight at most | idle MiB | peak MiB | (peak - idle) per device KiB | after the campaign MiB | (after - idle) per device KiB |\n|---|---|---|---|---|---|---|\n",
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    for r in runs {
        let idle = r.operator_rss_idle_bytes;
        let per_device = |b: u64| (b as f64 - idle as f64) / 1024.0 / f64::from(r.devices.max(1));
        let peak = r.rss_peak_bytes.get("operator").copied().unwrap_or(0);
        let after = r.operator_rss_after_bytes;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} |\n",
            r.devices,
            r.max_in_flight,
            mib(idle),
            mib(peak),
            per_device(peak),
            after.map_or_else(|| "-".to_owned(), |a| format!("{:.0}", mib(a))),
            after.map_or_else(|| "-".to_owned(), |a| format!("{:.1}", per_device(a))),
        ));
    }
    out
}

/// The highest sampled resident memory of each process group.
pub fn sampled_peaks(memory: &[(f64, BTreeMap<String, u64>)]) -> BTreeMap<String, u64> {
    let mut peaks = BTreeMap::new();
    for (_, sample) in memory {
        for (group, &bytes) in sample {
            let peak = peaks.entry(group.clone()).or_insert(0);
            *peak = bytes.max(*peak);
        }
    }
    peaks
}

/// What the devices received in each run, as a Markdown table: connections and chunk
/// deliveries per device, deliveries per chunk stored, refusals and rejections.
pub fn deliveries_table(runs: &[ScaleRun]) -> String {
    let mut out = String::from(
        "| devices | connect attempts per device | chunks stored | chunk messages delivered | deliveries per chunk | subscriptions refused | messages rejected | MiB received per device |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let d = &r.deliveries;
        let per_device = |n: u64| n as f64 / f64::from(r.devices.max(1));
        out.push_str(&format!(
            "| {} | {:.2} | {} | {} | {} | {} | {} | {:.3} |\n",
            r.devices,
            per_device(d.connect_attempts),
            d.chunks_stored,
            d.chunk_deliveries,
            d.deliveries_per_chunk()
                .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
            d.subscriptions_refused,
            d.messages_rejected,
            per_device(d.bytes_received) / 1048576.0,
        ));
    }
    out
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// A line chart over seconds since the campaign was applied: one named line per series.
struct Lines<'a> {
    caption: String,
    y_desc: &'a str,
    /// Top of the y axis (before a 5 % margin).
    y_max: f64,
    legend: SeriesLabelPosition,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

fn lines_svg(lines: Lines) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let max_t = lines
            .series
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(&lines.caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_t * 1.02, 0.0..lines.y_max * 1.05)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the campaign was applied")
            .y_desc(lines.y_desc)
            .draw()
            .map_err(plot_error)?;
        for (i, (name, points)) in lines.series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(lines.legend)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Devices completed over time, one line per run (SVG).
pub fn completion_svg(runs: &[ScaleRun]) -> Result<String> {
    lines_svg(Lines {
        caption: "Devices updated over time".to_owned(),
        y_desc: "devices installed",
        y_max: runs
            .iter()
            .map(|r| f64::from(r.devices))
            .fold(1.0, f64::max),
        legend: SeriesLabelPosition::LowerRight,
        series: runs
            .iter()
            .map(|run| {
                (
                    format!(
                        "{} devices, {} replicas, {} broker nodes",
                        run.devices, run.replicas, run.broker_nodes
                    ),
                    run.completed.iter().map(|&(t, n)| (t, n as f64)).collect(),
                )
            })
            .collect(),
    })
}

/// Resident memory of each process group over the largest run, one line per group (SVG).
pub fn memory_svg(runs: &[ScaleRun]) -> Result<String> {
    let run = runs.iter().max_by_key(|r| r.devices);
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let memory = run.map_or(&[][..], |r| &r.memory[..]);
    let groups: std::collections::BTreeSet<&String> = memory
        .iter()
        .flat_map(|(_, sample)| sample.keys())
        .collect();
    lines_svg(Lines {
        caption: format!(
            "Resident memory per process, {}-device run",
            run.map_or(0, |r| r.devices)
        ),
        y_desc: "GiB resident",
        y_max: memory
            .iter()
            .flat_map(|(_, sample)| sample.values().map(|&b| gib(b)))
            .fold(0.1, f64::max),
        legend: SeriesLabelPosition::UpperLeft,
        series: groups
            .into_iter()
            .map(|group| {
                let points = memory
                    .iter()
                    .filter_map(|(t, sample)| Some((*t, gib(*sample.get(group)?))))
                    .collect();
                (group.clone(), points)
            })
            .collect(),
    })
}

/// CPU seconds per process group, one group of bars per run (SVG).
pub fn cpu_svg(runs: &[ScaleRun]) -> Result<String> {
    let processes: Vec<String> = runs
        .iter()
        .flat_map(|r| r.cpu_seconds.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let max_cpu = runs
            .iter()
            .flat_map(|r| r.cpu_seconds.values().copied())
            .fold(1.0, f64::max);
        let slots = runs.len() * (processes.len() + 1);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "CPU seconds per process during the campaign",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..slots.max(1) as f64, 0.0..max_cpu * 1.1)
            .map_err(plot_error)?;
        let width = processes.len() + 1;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("CPU seconds")
            .draw()
            .map_err(plot_error)?;
        // Each run's name above its group of bars.
        chart
            .draw_series(runs.iter().enumerate().map(|(r, run)| {
                Text::new(
                    format!("{} devices", run.devices),
                    ((r * width) as f64, max_cpu * 1.05),
                    ("sans-serif", 14),
                )
            }))
            .map_err(plot_error)?;
        for (p, process) in processes.iter().enumerate() {
            let color = Palette99::pick(p).to_rgba();
            chart
                .draw_series(runs.iter().enumerate().map(|(r, run)| {
                    let x = (r * width + p) as f64;
                    let y = run.cpu_seconds.get(process).copied().unwrap_or(0.0);
                    Rectangle::new([(x + 0.1, 0.0), (x + 0.9, y)], color.filled())
                }))
                .map_err(plot_error)?
                .label(process.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(devices: u32, operator_cpu: f64) -> ScaleRun {
        ScaleRun {
            devices,
            replicas: 2,
            max_in_flight: devices,
            shards: 4,
            broker_nodes: 3,
            emulators: 1,
            wall_seconds: 10.0 + f64::from(devices) / 100.0,
            completed: vec![
                (0.0, 0),
                (5.0, u64::from(devices) / 2),
                (9.0, u64::from(devices)),
            ],
            cpu_seconds: [
                ("operator".to_owned(), operator_cpu),
                ("broker".to_owned(), 2.0),
            ]
            .into(),
            rss_peak_bytes: [("operator".to_owned(), 100 << 20)].into(),
            memory: vec![
                (
                    1.0,
                    [
                        ("operator".to_owned(), 90 << 20),
                        ("broker".to_owned(), 1 << 30),
                    ]
                    .into(),
                ),
                (
                    2.0,
                    [
                        ("operator".to_owned(), 100 << 20),
                        ("broker".to_owned(), 2 << 30),
                    ]
                    .into(),
                ),
            ],
            ended_early: None,
            operator_rss_idle_bytes: 80 << 20,
            operator_rss_after_bytes: Some(90 << 20),
            apiserver_writes: f64::from(devices) * 1.5 + 20.0,
            operator_writes: BTreeMap::new(),
            device_failures: BTreeMap::new(),
            device_retries: 0.0,
            broker_dropped: Some(0.0),
            etcd_db_bytes: 4.0 * 1048576.0,
            installed: u64::from(devices) - 1,
            deliveries: Deliveries {
                connect_attempts: u64::from(devices),
                chunk_deliveries: u64::from(devices) * 3,
                chunks_stored: u64::from(devices) * 2,
                ..Deliveries::default()
            },
        }
    }

    #[test]
    fn the_operator_memory_table_shows_peak_and_after_per_device_over_idle() {
        // 1,024 devices: idle 80 MiB, peak 100 MiB (20 KiB each), after 90 MiB (10 KiB each).
        let measured = run(1024, 1.0);
        let mut unread = run(2048, 1.0);
        unread.operator_rss_after_bytes = None;
        let table = operator_memory_table(&[measured.clone(), unread]);
        assert!(
            table.contains("| 1024 | 1024 | 80 | 100 | 20.0 | 90 | 10.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| 2048 | 2048 | 80 | 100 | 10.0 | - | - |"),
            "{table}"
        );
        // Written and read back as it was.
        let back = ScaleRun::from_json(&measured.to_json()).unwrap();
        assert_eq!(back.operator_rss_after_bytes, Some(90 << 20));
    }

    #[test]
    fn deliveries_are_added_up_over_emulators_and_shown_per_device_and_chunk() {
        let mut deliveries = Deliveries::default();
        assert_eq!(deliveries.deliveries_per_chunk(), None);
        // A real emulator summary, so a field renamed there fails here.
        let stats = sealed_ota_device_emulator::stats::FleetStats::new(100);
        (0..120).for_each(|_| stats.connect_attempt());
        (0..300).for_each(|_| stats.chunk_delivered());
        (0..200).for_each(|_| stats.chunk());
        stats.subscriptions_refused(2);
        (0..5).for_each(|_| stats.message_rejected());
        stats.received(1048576);
        deliveries.add_summary(&serde_json::to_value(stats.summary(BTreeMap::new())).unwrap());
        // An older emulator's summary without chunkDeliveries adds 0 to it.
        deliveries.add_summary(&json!({"connectAttempts": 80, "chunksReceived": 100}));
        assert_eq!(deliveries.connect_attempts, 200);
        assert_eq!(deliveries.chunks_stored, 300);
        assert_eq!(deliveries.deliveries_per_chunk(), Some(1.0));
        assert_eq!(deliveries.subscriptions_refused, 2);
        assert_eq!(deliveries.messages_rejected, 5);
        let mut r = run(100, 1.0);
        r.deliveries = deliveries;
        assert_eq!(r.to_json()["deliveries"]["chunk_deliveries"], 300);
        let table = deliveries_table(&[r]);
        assert!(
            table.contains("| 100 | 2.00 | 300 | 300 | 1.00 | 2 | 5 | 0.010 |"),
            "{table}"
        );
        assert!(
            deliveries_table(&[run(1000, 1.0)]).contains("| 1000 | 1.00 | 2000 | 3000 | 1.50 |")
        );
    }

    #[test]
    fn a_line_through_exact_points_is_found_and_one_count_fits_nothing() {
        let line = fit(&[(1000.0, 12.0), (3000.0, 32.0), (10_000.0, 102.0)]).unwrap();
        assert!((line.per_device - 0.01).abs() < 1e-9, "{line:?}");
        assert!((line.fixed - 2.0).abs() < 1e-6, "{line:?}");
        assert!((line.at(1_000_000.0) - 10_002.0).abs() < 1e-3);
        assert_eq!(fit(&[(1000.0, 1.0), (1000.0, 2.0)]), None);
        assert_eq!(fit(&[(1000.0, 1.0)]), None);
    }

    #[test]
    fn the_cost_model_predicts_each_figure_from_the_runs() {
        let runs = [run(1000, 11.0), run(3000, 31.0)];
        let model = cost_model(&runs, 1_000_000.0);
        let row = |name: &str| model.iter().find(|r| r.figure == name).unwrap();
        assert!((row("operator CPU seconds").predicted - 10_001.0).abs() < 1e-6);
        assert!((row("apiserver writes").line.per_device - 1.5).abs() < 1e-9);
        // Measured the same at every size: no per-device cost.
        assert!(row("broker CPU seconds").line.per_device.abs() < 1e-12);
        let table = model_table(&model, 1_000_000.0);
        assert!(
            table.contains("| operator CPU seconds | 1.0 | 10.000 | 10001 |"),
            "{table}"
        );
        assert_eq!(runs[0].lost(), 1);
        assert!(
            runs_table(&runs).contains("| 3000 | 2 / 4 | 3 | 1 | 40 | 4500 | 1 | 0 | 0 |"),
            "{}",
            runs_table(&runs)
        );
    }

    #[test]
    fn a_run_that_ended_early_is_shown_and_kept_out_of_the_model() {
        let mut broken = run(10_000, 500.0);
        broken.ended_early = Some("kube-apiserver (pid 42) exited 900 s after the apply".into());
        broken.apiserver_writes = f64::NAN;
        let runs = [run(1000, 11.0), run(3000, 31.0), broken];
        let model = cost_model(&runs, 1_000_000.0);
        let row = |name: &str| model.iter().find(|r| r.figure == name).unwrap();
        // The line through the two complete runs only (the third would bend it and NaN it).
        assert!((row("operator CPU seconds").predicted - 10_001.0).abs() < 1e-6);
        assert!((row("apiserver writes").line.per_device - 1.5).abs() < 1e-9);
        let table = runs_table(&runs);
        assert!(
            table.contains("The 10000-device run ended early: kube-apiserver (pid 42) exited"),
            "{table}"
        );
        assert_eq!(
            runs[2].to_json()["ended_early"],
            "kube-apiserver (pid 42) exited 900 s after the apply"
        );
        assert!(runs[2].to_json()["apiserver_writes"].is_null());
    }

    #[test]
    fn a_run_read_back_from_its_json_is_the_same_run() {
        let mut r = run(3000, 31.0);
        assert_eq!(ScaleRun::from_json(&r.to_json()).unwrap(), r);
        r.ended_early = Some("etcd (pid 7) exited".into());
        r.device_retries = 4.0;
        r.broker_dropped = None;
        assert_eq!(ScaleRun::from_json(&r.to_json()).unwrap(), r);
        let err = ScaleRun::from_json(&json!({"devices": "many"})).unwrap_err();
        assert!(err.to_string().contains("`devices`"), "{err}");
    }

    #[test]
    fn sampled_peaks_are_each_groups_highest_sample() {
        let peaks = sampled_peaks(&run(1000, 1.0).memory);
        assert_eq!(peaks["operator"], 100 << 20);
        assert_eq!(peaks["broker"], 2 << 30);
        assert!(sampled_peaks(&[]).is_empty());
    }

    #[test]
    fn the_plots_draw_every_run_and_process() {
        let runs = [run(1000, 11.0), run(3000, 31.0)];
        let svg = completion_svg(&runs).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.matches("<polyline").count() >= 2, "one line per run");
        assert!(svg.contains("3000 devices, 2 replicas, 3 broker nodes"));
        let svg = cpu_svg(&runs).unwrap();
        // plotters writes each text element's content on a line of its own.
        assert!(
            svg.contains("\noperator\n") && svg.contains("\nbroker\n"),
            "legend"
        );
        assert!(svg.contains("\n1000 devices\n"), "run labels");
        let svg = memory_svg(&runs).unwrap();
        assert!(svg.contains("3000-device run"), "the largest run");
        assert!(
            svg.matches("<polyline").count() >= 2,
            "one line per process"
        );
        assert!(memory_svg(&[]).unwrap().starts_with("<svg"));
    }
}
