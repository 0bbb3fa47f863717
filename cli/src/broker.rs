//! `sealed-ota broker check`: probe a user's MQTT 5 broker for every feature and limit the product
//! relies on (the probe library, `sealed_ota_mqtt::probe`) and print what works, what is limited
//! and which campaign settings fit. This module only turns flags into a probe configuration and
//! the report into a table; the probing and the judging live in the library, which the interop
//! runs (`e2e/interop.sh`) call through this same command.

use clap::{Args, Subcommand};
use sealed_ota_mqtt::probe::{probe, BrokerReport, FitAssumptions, ProbeConfig, Verdict};
use sealed_ota_mqtt::{tls, BrokerUrl};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota broker`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe a broker for what Sealed OTA relies on and print the campaign settings that fit.
    /// Exits 2 when a feature is broken.
    Check(CheckArgs),
}

/// `broker check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Broker URL (mqtt:// or mqtts://); repeat or separate with commas for the nodes of a cluster:
    /// publishers use the first, subscribers the last.
    #[arg(long, required = true, value_delimiter = ',')]
    pub broker: Vec<String>,
    /// CA certificate (PEM) that signed the broker's server certificate (needed for mqtts://).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) the broker accepts.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Key of --cert (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The smallest Maximum Packet Size a device of the fleet advertises.
    #[arg(long, default_value_t = FitAssumptions::default().device_max_packet_size)]
    pub device_max_packet_size: u32,
    /// The largest image a campaign will carry, in bytes.
    #[arg(long, default_value_t = FitAssumptions::default().image_size)]
    pub image_size: u64,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// What `broker check` printed and whether the broker is usable.
pub struct Outcome {
    /// The report, rendered.
    pub text: String,
    /// False when a feature is broken.
    pub usable: bool,
}

/// Run a `broker` subcommand.
pub fn run(command: Command) -> Result<Outcome> {
    match command {
        Command::Check(args) => {
            let config = config(&args)?;
            let report = crate::runtime::block_on(probe(&config))?.map_err(|e| Error::Flag {
                flag: "--broker",
                detail: format!("{e}; check the URL, that the broker runs, and --ca/--cert/--key"),
            })?;
            Ok(Outcome {
                text: output::render(args.output, &report, || table(&report))?,
                usable: report.usable(),
            })
        }
    }
}

fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Flag {
        flag,
        detail: format!("cannot read {}: {e}", path.display()),
    })
}

fn config(args: &CheckArgs) -> Result<ProbeConfig> {
    tls::install_crypto_provider();
    let urls = args
        .broker
        .iter()
        .map(|u| {
            BrokerUrl::parse(u).map_err(|e| Error::Flag {
                flag: "--broker",
                detail: format!("{u:?}: {e}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tls = match &args.ca {
        None => None,
        Some(ca) => {
            let roots = tls::roots_from_pem(&read(ca, "--ca")?).map_err(|e| Error::Flag {
                flag: "--ca",
                detail: format!("{}: {e}; pass the CA certificate in PEM", ca.display()),
            })?;
            let client = match (&args.cert, &args.key) {
                (Some(c), Some(k)) => Some((read(c, "--cert")?, read(k, "--key")?)),
                _ => None,
            };
            Some(
                tls::client_config(
                    roots,
                    client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
                )
                .map_err(|e| Error::Flag {
                    flag: "--cert/--key",
                    detail: format!("{e}; pass a PEM certificate and its PEM key"),
                })?,
            )
        }
    };
    if tls.is_none() && args.broker.iter().any(|u| u.starts_with("mqtts://")) {
        return Err(Error::Flag {
            flag: "--ca",
            detail: "an mqtts:// broker needs the CA that signed its certificate: pass --ca ca.crt"
                .into(),
        });
    }
    let mut config = ProbeConfig::new(urls, tls);
    config.assumptions.device_max_packet_size = args.device_max_packet_size;
    config.assumptions.image_size = args.image_size;
    Ok(config)
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Works => "works",
        Verdict::Limited => "limited",
        Verdict::Broken => "BROKEN",
        Verdict::NotTested => "not tested",
    }
}

/// The report as a table of checks, then the campaign settings that fit (pure).
pub fn table(report: &BrokerReport) -> String {
    let mut rows = vec![vec![
        "FEATURE".to_string(),
        "VERDICT".into(),
        "DETAIL".into(),
    ]];
    rows.extend(report.checks.iter().map(|c| {
        vec![
            c.feature.title().to_string(),
            verdict(c.verdict).into(),
            c.detail.clone(),
        ]
    }));
    let fit = &report.fit;
    let or_none =
        |v: Option<u32>| v.map_or_else(|| "no limit found".to_string(), |v| v.to_string());
    let mut out = format!("broker {}\n\n", report.urls.join(", "));
    out += &output::columns(&rows);
    out += "\ncampaign settings that fit:\n";
    out += &output::columns(&[
        vec![
            "chunk packets at most".into(),
            format!("{} bytes", fit.chunk_packet_limit),
        ],
        vec![
            "spec.chunkSize at most".into(),
            fit.max_chunk_size
                .map_or_else(|| "none fits".to_string(), |v| v.to_string()),
        ],
        vec!["window at most".into(), or_none(fit.max_window)],
        vec![
            "operator QoS 1 in flight".into(),
            fit.operator_inflight.to_string(),
        ],
    ]);
    for note in &fit.notes {
        out += &format!("note: {note}\n");
    }
    out += if report.usable() {
        "\nusable: yes\n"
    } else {
        "\nusable: NO (a feature is broken)\n"
    };
    out
}
