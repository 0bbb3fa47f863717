//! Entry point of the `sealed-ota-operator` binary: `run` starts the operator, `crdgen` writes the
//! CRDs, `reasons` prints the reason tables (docs/reasons.md). Parsing, logging setup and signal handling only; the work is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sealed_ota_operator::config::{Config, LogFormat};

/// jemalloc (feature `jemalloc`, default): after a campaign it gives back what the campaign freed,
/// where glibc's malloc kept the pages shared with live objects (docs/scale.md, twelfth change).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "sealed-ota-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator.
    Run(Box<Config>),
    /// Write one CRD YAML per custom resource into a directory.
    Crdgen {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the tables of the reasons the operator records (Markdown, docs/reasons.md).
    Reasons,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out } => match sealed_ota_operator::crdgen::write_all(&out) {
            Ok(paths) => paths.iter().for_each(|p| println!("{p}")),
            Err(e) => {
                eprintln!("crdgen: {e}");
                std::process::exit(1);
            }
        },
        Command::Reasons => print!("{}", sealed_ota_operator::reasons::render_markdown()),
        Command::Run(config) => {
            init_logging(config.log_format);
            sealed_ota_operator::heap::configure();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    std::process::exit(1);
                }
            };
            let result =
                runtime.block_on(async move {
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    let client = kube::Client::try_default().await.map_err(
                        sealed_ota_operator::Error::kube("connecting to the apiserver"),
                    )?;
                    sealed_ota_operator::run(*config, client, shutdown_signal()).await
                });
            if let Err(e) = result {
                tracing::error!(error = %e, "operator stopped");
                std::process::exit(1);
            }
        }
    }
}
