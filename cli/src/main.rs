//! `sealed-ota`: the project's command line for people and pipelines outside the cluster (also
//! usable as `kubectl sealed-ota`). One module per command group (`release`: the offline release
//! key; `broker`: the broker probe; `campaign`: a campaign's status; `receipt`: receipt verification; `fleet`: `pki init` and `device enroll`); the work lives in the
//! libraries (`sealed_ota_protocol::release`, `sealed_ota_mqtt::probe`, the device library's
//! `enroll_cmd`), so every tool signs, verifies, probes and enrolls the same way. `completions`
//! prints clap's shell completions.
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
    /// Campaigns: status (table or -o json|yaml) and a live watch with per-phase counts and ETA.
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
    let result = match cli.command {
        Command::Release(command) => release::run(command).map(|text| (text, true)),
        Command::Broker(command) => broker::run(command).map(|o| (o.text, o.usable)),
        Command::Campaign(command) => campaign::run(command).map(|o| (o.text, o.ok)),
        Command::Receipt(command) => receipt::run(command).map(|text| (text, true)),
        Command::Pki(command) => fleet::run_pki(command).map(|text| (text, true)),
        Command::Device(command) => fleet::run_device(command).map(|text| (text, true)),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sealed-ota", &mut out);
            Ok((String::from_utf8_lossy(&out).into_owned(), true))
        }
    };
    match result {
        Ok((output, ok)) => {
            print!("{output}");
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
