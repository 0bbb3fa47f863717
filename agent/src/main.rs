//! `sealed-ota-agent`: the command line. It parses arguments, sets up logging, and maps each
//! subcommand onto the library (`config`, `keygen`, `driver`); exit statuses are listed in `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sealed_ota_agent::config::{self, Config, Invalid};
use sealed_ota_agent::driver::{Agent, AgentError, RunEnd};
use sealed_ota_agent::journal::Journal;
use sealed_ota_agent::keygen;
use sealed_ota_agent::report::LogReporter;
use sealed_ota_agent::session::{self, SessionError};
use sealed_ota_agent::staging::Expected;
use sealed_ota_agent::transaction::Outcome;
use sealed_ota_device::store::hash_file;

const EXIT_ERROR: u8 = 1;
const EXIT_INVALID_CONFIG: u8 = 2;
const EXIT_ROLLED_BACK: u8 = 3;
const EXIT_FAILED: u8 = 4;

const AFTER_HELP: &str = "\
COMMANDS IN SHORT
    run            the device's service: connect to the manager through the broker, take
                   firmware and credential campaigns, install, report signed receipts; at
                   start, first finish an update interrupted by a reboot or power cut
    finish         finish (commit or roll back) an update interrupted by a reboot or power
                   cut, then stop, without connecting (bring-up, recovery)
    check-config   validate the configuration without connecting anywhere
    keygen         make the device key (never leaves the device) and a CSR to get signed
    install        install a local image file without a manager (bring-up, tests)
    status         show what runs, the update under way and the last outcomes

FILES
    /etc/sealed-ota/agent.toml     configuration (see /usr/share/doc/sealed-ota-agent/agent.toml.example)
    <state_dir>/journal.json       the update journal: what runs, the update under way, outcomes
    <state_dir>/state.json         the session state: transfers, the install awaiting its receipt
    <state_dir>/credentials/       credentials delivered by a rotation (used instead of
                                   device.key_file / device.cert_file once present)
    <state_dir>/downloads/<id>.part  an image being received (resumed after a restart)
    <state_dir>/transactions/<id>  a verified image and its installer work tree
    <state_dir>/agent.lock         held by the running agent (one agent per state directory)

ENVIRONMENT
    RUST_LOG                   log filter (default: info); logs go to stderr (the journal under systemd)
    SEALED_OTA_AGENT_CRASH_AT  tests only: stop with SIGKILL at a named step (before:<phase>,
                               after:<phase>, during:installing, journal-rename[#N], before:report,
                               after:report, after:chunk[#N], after:save[#N], before:stage,
                               after:stage, before:receipt, after:receipt, after:credentials)

EXIT STATUS
    0  success (install: installed; run: stopped by SIGTERM or SIGINT)
    1  error (the message says what and where)
    2  invalid configuration (each field's problem and fix is listed)
    3  install: the update was rolled back (the previous image runs)
    4  install: the update failed and could not be rolled back

SEE ALSO
    rauc(1), the Mender Update Modules v3 protocol, README.md of sealed-ota-agent";

/// The Sealed OTA device agent: installs firmware through RAUC, Mender update modules or a command
/// hook, as a journaled A/B transaction with health check, commit and rollback.
#[derive(Debug, Parser)]
#[command(name = "sealed-ota-agent", version, after_long_help = AFTER_HELP)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH, env = "SEALED_OTA_AGENT_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as the device's service: connect to the manager through the broker and take its
    /// campaigns (firmware through the configured installer, credential rotations), reporting
    /// each final outcome as a signed receipt. At start, an update interrupted by a reboot or a
    /// power cut is finished first. Stops on SIGTERM or SIGINT.
    Run,
    /// Finish (commit or roll back) an update interrupted by a reboot or a power cut, then stop,
    /// without connecting; `run` reports the outcome to the manager later.
    Finish,
    /// Check the configuration and every file it names, without connecting anywhere.
    CheckConfig,
    /// Make the device's P-256 key (mode 0600) and print a certificate signing request for it.
    Keygen {
        /// Also write the CSR to this file.
        #[arg(long)]
        csr_out: Option<PathBuf>,
        /// Replace an existing key (its certificate stops matching).
        #[arg(long)]
        force: bool,
    },
    /// Install a local image file now, without a manager, through the configured installer.
    /// A reboot, if the installer needs one, ends this command; `run` finishes the update after it.
    Install {
        /// The image: a RAUC bundle, a Mender artifact or what the command hook takes.
        #[arg(long)]
        image: PathBuf,
        /// The version the image carries.
        #[arg(long)]
        version: String,
        /// Refuse the image unless it has this SHA-256 (hex).
        #[arg(long)]
        sha256: Option<String>,
        /// Transaction id (default: local-<unix time>).
        #[arg(long)]
        id: Option<String>,
    },
    /// Show the journal: what runs, the update under way and the last outcomes.
    Status {
        /// Print the journal as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("sealed-ota-agent: error: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn load(path: &Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

/// SIGTERM (systemd, a reboot) or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn invalid(config_path: &Path, invalid: &Invalid) -> ExitCode {
    eprintln!("sealed-ota-agent: {} is invalid:", config_path.display());
    for error in &invalid.0 {
        eprintln!("  {error}");
    }
    ExitCode::from(EXIT_INVALID_CONFIG)
}

fn open_agent(cli: &Cli, config: &Config) -> Result<Result<Agent, ExitCode>, String> {
    match Agent::open(config) {
        Ok(agent) => Ok(Ok(agent)),
        Err(AgentError::Config(e)) => Ok(Err(invalid(&cli.config, &e))),
        Err(e) => Err(e.to_string()),
    }
}

fn outcome_code(outcome: &Outcome) -> ExitCode {
    match outcome {
        Outcome::Installed { .. } => ExitCode::SUCCESS,
        Outcome::RolledBack { .. } => ExitCode::from(EXIT_ROLLED_BACK),
        Outcome::Failed { .. } => ExitCode::from(EXIT_FAILED),
    }
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    match &cli.command {
        Command::CheckConfig => {
            let config = load(&cli.config)?;
            match config.check_all(unix_now()) {
                Ok(()) => {
                    println!(
                        "{}: ok (installer {})",
                        cli.config.display(),
                        config.installer.kind.name()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(invalid(&cli.config, &e)),
            }
        }
        Command::Keygen { csr_out, force } => {
            let config = load(&cli.config)?;
            let csr = keygen::generate(&config.device.id, &config.device.key_file, *force)
                .map_err(|e| e.to_string())?;
            if let Some(out) = csr_out {
                sealed_ota_agent::durable::write_atomic(
                    out,
                    csr.as_bytes(),
                    sealed_ota_agent::durable::Mode::Public,
                )
                .map_err(|e| e.to_string())?;
                eprintln!("sealed-ota-agent: wrote {}", out.display());
            }
            eprintln!(
                "sealed-ota-agent: made {} (mode 0600); have this CSR signed by the Sealed OTA CA for device {:?} and install the certificate as {}",
                config.device.key_file.display(),
                config.device.id,
                config.device.cert_file.display()
            );
            print!("{csr}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let config = load(&cli.config)?;
            if let Err(e) = config.check_all(unix_now()) {
                return Ok(invalid(&cli.config, &e));
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("starting the runtime: {e}"))?;
            runtime.block_on(async {
                let (stop, shutdown) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    stop_signal().await;
                    tracing::info!("stopping (signal)");
                    let _ = stop.send(true);
                });
                match session::run(&config, shutdown).await {
                    Ok(report) => {
                        tracing::info!(running = %report.running_version, outcome = report.outcome.name(), "stopped");
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(SessionError::Config(e)) => Ok(invalid(&cli.config, &e)),
                    Err(e) => Err(e.to_string()),
                }
            })
        }
        Command::Finish => {
            let config = load(&cli.config)?;
            let mut agent = match open_agent(cli, &config)? {
                Ok(agent) => agent,
                Err(code) => return Ok(code),
            };
            let mut reporter = LogReporter::default();
            match agent.run(&mut reporter).map_err(|e| e.to_string())? {
                RunEnd::Idle => {
                    tracing::info!(running = agent.running_version(), "no update under way")
                }
                RunEnd::Finished(outcome) => {
                    tracing::info!(
                        running = agent.running_version(),
                        outcome = outcome.label(),
                        "update finished"
                    )
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Install {
            image,
            version,
            sha256,
            id,
        } => {
            if semver::Version::parse(version).is_err() {
                return Err(format!(
                    "--version {version:?} is not a semantic version (MAJOR.MINOR.PATCH)"
                ));
            }
            let config = load(&cli.config)?;
            let mut agent = match open_agent(cli, &config)? {
                Ok(agent) => agent,
                Err(code) => return Ok(code),
            };
            let id = id
                .clone()
                .unwrap_or_else(|| format!("local-{}", unix_now()));
            let part = agent
                .staging()
                .receive_file(&id, image)
                .map_err(|e| e.to_string())?;
            let (size, actual) = hash_file(&part).map_err(|e| e.to_string())?;
            let expected = Expected {
                sha256: sha256.clone().unwrap_or_else(|| hex::encode(actual)),
                size,
            };
            agent
                .begin(&id, version, &expected)
                .map_err(|e| e.to_string())?;
            let mut reporter = LogReporter::default();
            match agent.run(&mut reporter).map_err(|e| e.to_string())? {
                RunEnd::Finished(outcome) => {
                    println!(
                        "{id}: {}",
                        serde_json::to_string(&outcome).expect("serialises")
                    );
                    Ok(outcome_code(&outcome))
                }
                RunEnd::Idle => Err("the transaction vanished from the journal".into()),
            }
        }
        Command::Status { json } => {
            let config = load(&cli.config)?;
            let journal = Journal::open(&config.state_dir).map_err(|e| e.to_string())?;
            let state = journal.state();
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(state).expect("serialises")
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "running: {}",
                journal.running_version(&config.device.initial_version)
            );
            match journal.active() {
                Some(tx) => println!(
                    "under way: {} version {} (phase {})",
                    tx.id,
                    tx.image.version,
                    tx.phase.name()
                ),
                None => println!("under way: none"),
            }
            for f in state.finished.iter().rev() {
                let detail = match &f.outcome {
                    Outcome::Installed { .. } => String::new(),
                    Outcome::RolledBack { reason } | Outcome::Failed { reason } => {
                        format!(": {reason}")
                    }
                };
                println!(
                    "finished: {} version {} {}{detail} (reported: {})",
                    f.id,
                    f.version,
                    f.outcome.label(),
                    if f.reported { "yes" } else { "no" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
