//! `broker_check`: runs the broker probe ([`sealed_ota_mqtt::probe`]) against a broker and prints
//! its report as JSON (stdout) and as a short table (stderr). It stands in for `sealed-ota broker
//! check` until the CLI exists.
//!
//! ```text
//! cargo run -p sealed-ota-mqtt --example broker_check -- \
//!     --broker mqtts://127.0.0.1:8883 [--broker URL ...] --ca ca.crt --cert client.crt --key client.key
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sealed_ota_mqtt::probe::{probe, FitAssumptions, ProbeConfig};
use sealed_ota_mqtt::{tls, BrokerUrl};

#[derive(Debug, Parser)]
#[command(about = "Probe an MQTT 5 broker for what Sealed OTA relies on")]
struct Args {
    /// Broker URL; repeat (or separate with commas) for the nodes of a cluster: publishers use
    /// the first, subscribers the last.
    #[arg(long, required = true, value_delimiter = ',')]
    broker: Vec<String>,
    /// CA certificate (PEM) that signed the broker's server certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) the broker accepts.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Key of --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The smallest Maximum Packet Size a device of the fleet advertises.
    #[arg(long, default_value_t = FitAssumptions::default().device_max_packet_size)]
    device_max_packet_size: u32,
    /// The largest image a campaign will carry, in bytes.
    #[arg(long, default_value_t = FitAssumptions::default().image_size)]
    image_size: u64,
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<bool, String> {
    let urls = args
        .broker
        .iter()
        .map(|u| BrokerUrl::parse(u).map_err(|e| format!("--broker: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match &args.ca {
        None => None,
        Some(ca) => {
            let roots = tls::roots_from_pem(&read(ca, "ca")?).map_err(|e| format!("--ca: {e}"))?;
            let client = match (&args.cert, &args.key) {
                (Some(c), Some(k)) => Some((read(c, "cert")?, read(k, "key")?)),
                _ => None,
            };
            Some(
                tls::client_config(
                    roots,
                    client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
                )
                .map_err(|e| format!("--cert/--key: {e}"))?,
            )
        }
    };
    let mut config = ProbeConfig::new(urls, tls);
    config.assumptions.device_max_packet_size = args.device_max_packet_size;
    config.assumptions.image_size = args.image_size;
    let report = probe(&config).await.map_err(|e| e.to_string())?;
    for check in &report.checks {
        eprintln!(
            "{:<38} {:<10} {}",
            check.feature.title(),
            format!("{:?}", check.verdict),
            check.detail
        );
    }
    eprintln!(
        "fit: chunk packets <= {} bytes, chunkSize <= {:?}, window <= {:?}, operator in flight {}",
        report.fit.chunk_packet_limit,
        report.fit.max_chunk_size,
        report.fit.max_window,
        report.fit.operator_inflight
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    );
    Ok(report.usable())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("broker_check: {e}");
            ExitCode::FAILURE
        }
    }
}
