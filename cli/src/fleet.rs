//! `sealed-ota pki init` and `sealed-ota device enroll`: bootstrap the PKI (CA, manager identity,
//! their Secrets) and enroll devices (identities in a fleet directory, `Device` resources applied
//! or written as YAML). The flags and the work are the device library's `enroll_cmd`, which the
//! emulator's `pki-init` and `enroll` subcommands run too: this module only starts the runtime.

use clap::Subcommand;
use sealed_ota_device_emulator::enroll_cmd::{self, EnrollArgs, PkiInitArgs};

use crate::error::{Error, Result};

/// Subcommands of `sealed-ota pki`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create (or load with --ca-cert/--ca-key) the CA, issue the manager identity, write the
    /// files and the manager and CA Secrets (--apply, or --yaml FILE for GitOps).
    Init(PkiInitArgs),
}

/// Subcommands of `sealed-ota device`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Issue device identities into a fleet directory (keys, certificates, settings) and their
    /// Device resources (--apply, or --yaml FILE for GitOps).
    Enroll(EnrollArgs),
}

fn block_on(
    work: impl std::future::Future<Output = sealed_ota_device_emulator::Result<()>>,
) -> Result<String> {
    crate::runtime::block_on(work)?.map_err(Error::Device)?;
    Ok(String::new())
}

/// Run a `pki` subcommand.
pub fn run_pki(command: PkiCommand) -> Result<String> {
    match command {
        PkiCommand::Init(args) => block_on(enroll_cmd::pki_init(args)),
    }
}

/// Run a `device` subcommand.
pub fn run_device(command: DeviceCommand) -> Result<String> {
    match command {
        DeviceCommand::Enroll(args) => block_on(enroll_cmd::enroll_devices(args)),
    }
}
