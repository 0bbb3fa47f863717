//! `sealed-ota`: the project's command line for people and pipelines outside the cluster. One module
//! per command group (`release`: the offline release key; `device`: enrolment from a device's CSR);
//! the cryptography lives in the protocol crate (`sealed_ota_protocol::release`, its CA), so every
//! tool signs and verifies the same way.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod device;
mod error;
mod release;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Devices: enrol one from the CSR it made (its key never leaves it).
    #[command(subcommand)]
    Device(device::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Release(command) => release::run(command),
        Command::Device(command) => device::run(command),
    };
    match result {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
