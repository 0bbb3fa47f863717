//! `sealed-ota pki init` and `sealed-ota device enroll`: bootstrap the PKI (CA, manager identity,
//! their Secrets) and enroll devices (identities in a fleet directory, one device from its CSR,
//! or many from an inventory file; `Device` resources applied or written as YAML). The flags and
//! the work are the device library's `enroll_cmd`, which the emulator's `pki-init` and `enroll`
//! subcommands run too: this module only starts the runtime and prints the report (a table, or
//! `-o json|yaml`).

use clap::{Args, Subcommand};
use sealed_ota_device_emulator::enroll_cmd::{
    self, EnrollArgs, EnrollReport, KubeOutputArgs, PkiInitArgs, PkiReport,
};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota pki`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create (or load with --ca-cert/--ca-key) the CA, issue the manager identity, write the
    /// files and the manager and CA Secrets (--apply, or --yaml FILE for GitOps).
    Init(Printed<PkiInitArgs>),
}

/// Subcommands of `sealed-ota device`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Issue device identities into a fleet directory (keys, certificates, settings), or sign
    /// devices' CSRs (--csr for one, --inventory FILE for many), and ship their Device resources
    /// (--apply, or --yaml FILE for GitOps).
    Enroll(Printed<EnrollArgs>),
}

/// A command's flags and the format of its report.
#[derive(Debug, Args)]
pub struct Printed<A: Args> {
    #[command(flatten)]
    args: A,
    /// Output format of the report (a table goes to stderr when `--yaml -` takes stdout).
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// What to print and where: `(stdout, stderr)`.
pub type Streams = (String, String);

/// Runs the library's `work` on the flags `args` and prints its report in `format`: on stdout, or
/// (a table) on stderr when `--yaml -` holds stdout; a JSON or YAML report that would mix with
/// the YAML objects there is refused before any work.
fn run_printed<A, R, Fut>(
    args: A,
    format: Format,
    kube: impl Fn(&A) -> &KubeOutputArgs,
    work: impl FnOnce(A) -> Fut,
    table: impl FnOnce(&R) -> String,
) -> Result<Streams>
where
    R: serde::Serialize,
    Fut: std::future::Future<Output = sealed_ota_device_emulator::Result<R>>,
{
    let to_stdout = !kube(&args).yaml_to_stdout();
    if !to_stdout && format != Format::Table {
        return Err(Error::Flag {
            flag: "-o/--output",
            detail: "--yaml - already writes the objects to stdout; write them to a file (--yaml FILE) to get the report as JSON or YAML".into(),
        });
    }
    let report = crate::runtime::block_on(work(args))??;
    let text = output::render(format, &report, || table(&report))?;
    Ok(if to_stdout {
        (text, String::new())
    } else {
        (String::new(), text)
    })
}

/// Run a `pki` subcommand.
pub fn run_pki(command: PkiCommand) -> Result<Streams> {
    let PkiCommand::Init(Printed { args, output }) = command;
    run_printed(
        args,
        output,
        PkiInitArgs::output,
        enroll_cmd::pki_init,
        pki_table,
    )
}

/// Run a `device` subcommand.
pub fn run_device(command: DeviceCommand) -> Result<Streams> {
    let DeviceCommand::Enroll(Printed { args, output }) = command;
    run_printed(
        args,
        output,
        EnrollArgs::output,
        enroll_cmd::enroll_devices,
        enroll_table,
    )
}

fn pki_table(r: &PkiReport) -> String {
    let shipped = if r.applied { "applied" } else { "not applied" };
    output::columns(&[
        vec!["manager".into(), r.manager_id.clone()],
        vec!["files".into(), r.directory.display().to_string()],
        vec![
            "CA".into(),
            if r.new_ca { "new" } else { "given" }.to_string(),
        ],
        vec![
            "Secrets".into(),
            format!(
                "{ns}/{} and {ns}/{} ({shipped})",
                r.manager_secret,
                r.ca_secret,
                ns = r.namespace
            ),
        ],
    ])
}

/// The enrolled devices as a table (pure).
pub fn enroll_table(r: &EnrollReport) -> String {
    let mut rows = vec![vec![
        "DEVICE".to_string(),
        "FINGERPRINT".into(),
        "CERTIFICATE".into(),
    ]];
    rows.extend(r.devices.iter().map(|d| {
        vec![
            d.id.clone(),
            d.certificate_fingerprint.clone(),
            d.certificate
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
        ]
    }));
    let shipped = if r.applied { "applied" } else { "not applied" };
    let place = r.fleet.as_ref().map_or(String::new(), |f| {
        format!(", identities in {}", f.display())
    });
    output::columns(&rows)
        + &format!(
            "{} Devices in namespace {} ({shipped}{place})\n",
            r.devices.len(),
            r.namespace
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealed_ota_device_emulator::enroll_cmd::EnrolledDevice;

    #[test]
    fn the_enroll_table_lists_each_device_its_pin_and_its_certificate() {
        let report = EnrollReport {
            namespace: "fleet".into(),
            applied: true,
            fleet: None,
            devices: vec![
                EnrolledDevice {
                    id: "gw-01".into(),
                    certificate_fingerprint: "ab".repeat(32),
                    certificate: Some("certs/gw-01.crt".into()),
                },
                EnrolledDevice {
                    id: "gw-02".into(),
                    certificate_fingerprint: "cd".repeat(32),
                    certificate: None,
                },
            ],
        };
        let t = enroll_table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("DEVICE  FINGERPRINT"), "{t}");
        assert_eq!(
            lines[1],
            format!("gw-01   {}  certs/gw-01.crt", "ab".repeat(32))
        );
        assert!(lines[2].ends_with("  -"), "{t}");
        assert_eq!(lines[3], "2 Devices in namespace fleet (applied)");
    }
}
