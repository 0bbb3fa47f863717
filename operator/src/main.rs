//! Entry point of the `sealed-ota-operator` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "sealed-ota-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write one CRD YAML per custom resource into a directory.
    Crdgen {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
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
    }
}
