//! Command line of `sealed-ota-device-emulator`:
//!
//! - `pki-init`: create (or load) the CA, issue the manager identity, write PEM files and the
//!   manager / CA Secrets (applied to Kubernetes, or written as YAML);
//! - `enroll`: issue N device identities into a fleet directory and describe them as `Device`
//!   resources (applied, or written as YAML);
//!
//!   both are the library's `enroll_cmd`, which `sealed-ota pki init` and `sealed-ota device
//!   enroll` run too;
//! - `run`: run the enrolled devices against a broker until interrupted, a deadline, or a
//!   condition, with a live progress line and a final summary (text, or JSON with `--json`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sealed_ota_device_emulator::enroll_cmd;
use sealed_ota_device_emulator::faults::{parse_duration, FaultSpec};
use sealed_ota_device_emulator::fleet::{FleetOptions, Part, RunningFleet};
use sealed_ota_device_emulator::mqtt_io::BrokerEndpoint;
use sealed_ota_device_emulator::stats::{self, Outcome};
use sealed_ota_device_emulator::store::FleetDir;
use sealed_ota_device_emulator::{Error, Result};

#[derive(Debug, Parser)]
#[command(name = "sealed-ota-device-emulator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or load the CA, issue the manager identity, and produce the manager and CA Secrets.
    PkiInit(enroll_cmd::PkiInitArgs),
    /// Issue device identities into a fleet directory and produce their `Device` resources.
    Enroll(enroll_cmd::EnrollArgs),
    /// Run the enrolled devices against a broker.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExitWhen {
    /// Every device has connected once (measures connect time and memory).
    Connected,
    /// Every device has installed, rejected or failed its campaign.
    Settled,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Fleet directory written by `enroll`.
    #[arg(long, default_value = "fleet")]
    fleet: PathBuf,
    /// Broker URL, mqtts://host:port (client certificates) or mqtt://host:port; for a cluster,
    /// every node's URL separated by commas (devices spread over them and move to the next node
    /// when a connection is lost).
    #[arg(long, env = "SEALED_OTA_MQTTS_URL")]
    broker: String,
    /// CA that signed the broker's server certificate (default: the fleet's CA).
    #[arg(long)]
    broker_ca: Option<PathBuf>,
    /// Manager id (default: the one recorded at enrollment).
    #[arg(long)]
    manager_id: Option<String>,
    /// Topic prefix (default: the one recorded at enrollment).
    #[arg(long)]
    topic_prefix: Option<String>,
    /// Run only the first N enrolled devices.
    #[arg(long)]
    devices: Option<usize>,
    /// Run part K of N of the fleet (every Nth device from the Kth): several processes share a
    /// fleet larger than one process's file descriptor limit, e.g. `--part 1/4` ... `--part 4/4`.
    #[arg(long)]
    part: Option<Part>,
    /// Connection attempts per second (first connects and reconnects).
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// TLS + MQTT handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    max_connecting: usize,
    /// Fault switch (repeatable), KIND[:key=value,...][@SELECTOR]; see the README.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Maximum Packet Size the devices advertise (bytes).
    #[arg(long, default_value_t = 256 * 1024)]
    max_packet_size: u32,
    /// Chunk topics a device subscribes at once.
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// Seconds before a device asks again for chunks that did not arrive.
    #[arg(long, default_value_t = 30)]
    window_timeout: u64,
    /// Benchmarks: every device accepts at once but starts pulling chunks only when the whole
    /// fleet was offered the update, so the summary's dataPhaseSeconds times the transfer alone.
    #[arg(long)]
    transfer_barrier: bool,
    /// Save device state every N chunks.
    #[arg(long, default_value_t = 16)]
    save_every_chunks: u32,
    /// Stop after this long (e.g. 90s, 10m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop when this condition holds.
    #[arg(long, value_enum)]
    exit_when: Option<ExitWhen>,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No live progress line (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Tests only: append every session key, content key and delivered private key to this file
    /// (like SSLKEYLOGFILE), so a test can scan what the broker relayed for them.
    #[arg(long, hide = true)]
    key_log: Option<PathBuf>,
    /// Benchmarks only: do not fsync the frequent protocol-state saves (thousands of emulated
    /// devices share one disk; a real device has its own). Credentials and installs are fsynced
    /// regardless.
    #[arg(long)]
    no_state_fsync: bool,
    /// Benchmarks only: after an image was checked (SHA-256, signature) and committed, hash it
    /// on disk into `firmware.dropped` and remove it, so many devices with a large image do not
    /// fill one disk (`make bench-large`). The device's record and version stay.
    #[arg(long)]
    drop_installed_images: bool,
    /// Seconds after a committed install a device sends its signed post-install health report
    /// (healthy unless the `unhealthy` fault hits it); "off" sends none.
    #[arg(long, default_value = "2s", value_parser = parse_optional_duration)]
    health_report_after: OptionalDuration,
    /// Write the fleet's counters in the Prometheus text format to this file every second
    /// (atomically: a temporary file renamed), for Prometheus (through an HTTP server of the
    /// file, or node_exporter's textfile collector).
    #[arg(long)]
    metrics_file: Option<PathBuf>,
}

/// A duration, or none ("off").
#[derive(Debug, Clone, Copy)]
struct OptionalDuration(Option<Duration>);

fn parse_optional_duration(text: &str) -> std::result::Result<OptionalDuration, String> {
    if text == "off" {
        return Ok(OptionalDuration(None));
    }
    parse_duration(text).map(|d| OptionalDuration(Some(d)))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::PkiInit(args) => enroll_cmd::pki_init(args)
                .await
                .map(|r| eprintln!("{}", r.summary())),
            Command::Enroll(args) => enroll_cmd::enroll_devices(args)
                .await
                .map(|r| eprintln!("{}", r.summary())),
            Command::Run(args) => run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let fleet = FleetDir::new(&args.fleet);
    let broker_ca_path = args.broker_ca.unwrap_or_else(|| fleet.ca_cert_path());
    let broker_ca = if args.broker.starts_with("mqtts") || args.broker.starts_with("ssl") {
        Some(std::fs::read(&broker_ca_path).map_err(|e| Error::io("reading", &broker_ca_path, e))?)
    } else {
        None
    };
    let endpoint = BrokerEndpoint::parse(&args.broker, broker_ca)?;
    let faults = args
        .faults
        .iter()
        .map(|text| text.parse::<FaultSpec>())
        .collect::<Result<Vec<_>>>()?;
    let mut options = FleetOptions::new(fleet, endpoint);
    options.manager_id = args.manager_id;
    options.topic_prefix = args.topic_prefix;
    options.device_limit = args.devices;
    options.part = args.part;
    options.connect_rate = args.connect_rate;
    options.max_connecting = args.max_connecting;
    options.faults = faults;
    options.max_packet_size = args.max_packet_size;
    options.window = args.window;
    options.window_timeout = args.window_timeout;
    options.transfer_barrier = args.transfer_barrier;
    options.save_every_chunks = args.save_every_chunks;
    options.key_log = args.key_log;
    options.no_state_fsync = args.no_state_fsync;
    options.drop_installed_images = args.drop_installed_images;
    options.health_report_after = args.health_report_after.0;
    let running = RunningFleet::start(options)?;
    let stats = std::sync::Arc::clone(running.stats());
    let metrics = args.metrics_file.map(|path| {
        let stats = std::sync::Arc::clone(&stats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = stats::write_atomically(&path, &stats.prometheus_text()) {
                    tracing::warn!(path = %path.display(), error = %e, "writing the metrics file");
                }
            }
        })
    });
    let progress = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        stats::spawn_progress_display(std::sync::Arc::clone(&stats), Duration::from_millis(250))
    });
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let condition = async {
        let Some(exit_when) = args.exit_when else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let total = stats.devices();
            let reached = match exit_when {
                ExitWhen::Connected => stats.ever_connected() == total,
                ExitWhen::Settled => {
                    stats.count(Outcome::Installed)
                        + stats.count(Outcome::Rejected)
                        + stats.count(Outcome::Failed)
                        + stats.count(Outcome::RolledBack)
                        == total
                }
            };
            if reached {
                return;
            }
        }
    };
    tokio::select! {
        _ = deadline => {}
        _ = condition => {}
        _ = shutdown_signal() => {}
    }
    let (summary, _) = running.stop().await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!("\r{}\x1b[K", stats.progress_line());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("the summary serializes")
        );
    } else {
        eprint!("{}", summary.render_text());
    }
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM (what Kubernetes sends to a pod): both stop
/// the fleet cleanly (state saved, summary printed).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
