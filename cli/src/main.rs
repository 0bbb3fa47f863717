//! `sealed-ota`: the project's command line for people and pipelines outside the cluster (also
//! usable as `kubectl sealed-ota`). One module per command group (`release`: the offline release
//! key; `broker`: the broker probe; `campaign`: a campaign's plan and status; `receipt`: receipt
//! verification; `fleet`: `pki init` and `device enroll`); the work lives in the libraries
//! (`sealed_ota_protocol::release`, `sealed_ota_mqtt::probe`, the operator's
//! `preview::preview`, the device library's `enroll_cmd`), so every tool signs, verifies, plans,
//! probes and enrolls the same way. Every command that prints does so through `output`: a table
//! by default, `-o json|yaml` for pipelines. `completions` prints clap's shell completions.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod broker;
mod campaign;
mod error;
mod fleet;
mod output;
mod receipt;
mod release;
mod runtime;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sealed-ota", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Release keys and signatures: the offline role that signs firmware images (devices enrolled
    /// with the public key refuse images it did not sign, whatever the operator signs).
    #[command(subcommand)]
    Release(release::Command),
    /// Check an MQTT 5 broker before a rollout: what works, what is limited, which settings fit.
    #[command(subcommand)]
    Broker(broker::Command),
    /// Campaigns: the plan before one runs, its status, and a live watch with per-phase counts
    /// and ETA.
    #[command(subcommand)]
    Campaign(campaign::Command),
    /// Receipts: verify a device's signed receipt with its certificate alone.
    #[command(subcommand)]
    Receipt(receipt::Command),
    /// The PKI: the CA and the manager identity, as files and Secrets.
    #[command(subcommand)]
    Pki(fleet::PkiCommand),
    /// Devices: identities and Device resources.
    #[command(subcommand)]
    Device(fleet::DeviceCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = |text: String| (text, String::new(), true);
    let result = match cli.command {
        Command::Release(command) => release::run(command).map(quiet),
        Command::Broker(command) => broker::run(command).map(|o| (o.text, String::new(), o.usable)),
        Command::Campaign(command) => campaign::run(command).map(|o| (o.text, String::new(), o.ok)),
        Command::Receipt(command) => receipt::run(command).map(quiet),
        Command::Pki(command) => fleet::run_pki(command).map(|(out, err)| (out, err, true)),
        Command::Device(command) => fleet::run_device(command).map(|(out, err)| (out, err, true)),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sealed-ota", &mut out);
            Ok(quiet(String::from_utf8_lossy(&out).into_owned()))
        }
    };
    match result {
        Ok((output, log, ok)) => {
            print!("{output}");
            eprint!("{log}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
