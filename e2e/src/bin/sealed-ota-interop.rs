//! `sealed-ota-interop DIR OUT`: renders the interop table (see `sealed_ota_e2e::interop`) from
//! the per-broker runs `e2e/interop.sh` left in DIR (`DIR/<broker>/{broker,version,probe.json,
//! probe-defaults.json,tests-*.log}`) into OUT, and exits non-zero when a test failed that is not a
//! known failure, or a known failure passed.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use sealed_ota_e2e::interop::{parse_cargo_test, parse_known_failures, render, run_ok, BrokerRun};
use sealed_ota_e2e::repo_root;

fn read_run(dir: &Path) -> Result<BrokerRun> {
    let text = |name: &str| std::fs::read_to_string(dir.join(name));
    let report = |name: &str| -> Result<Option<_>> {
        match text(name) {
            Ok(json) => Ok(Some(
                serde_json::from_str(&json).with_context(|| format!("{}/{name}", dir.display()))?,
            )),
            Err(_) => Ok(None),
        }
    };
    let mut tests = std::collections::BTreeMap::new();
    let mut logs: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tests-") && n.ends_with(".log"))
        .collect();
    logs.sort();
    for log in logs {
        let file = &log["tests-".len()..log.len() - ".log".len()];
        for (name, outcome) in parse_cargo_test(&text(&log)?) {
            tests.insert(format!("{file}::{name}"), outcome);
        }
    }
    Ok(BrokerRun {
        broker: text("broker")?.trim().to_string(),
        version: text("version").unwrap_or_default().trim().to_string(),
        probe: report("probe.json")?,
        probe_defaults: report("probe-defaults.json")?,
        tests,
    })
}

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, out] = args.as_slice() else {
        anyhow::bail!("usage: sealed-ota-interop RUNS-DIR OUT.md");
    };
    let known_path = repo_root().join("e2e/interop/known-failures.tsv");
    let known = parse_known_failures(
        &std::fs::read_to_string(&known_path)
            .with_context(|| format!("reading {}", known_path.display()))?,
    )
    .map_err(anyhow::Error::msg)?;
    let order = ["mosquitto", "mochi", "rmqtt-cluster"];
    let mut runs = Vec::new();
    for broker in order {
        let d = Path::new(dir).join(broker);
        if d.join("broker").exists() {
            runs.push(read_run(&d)?);
        }
    }
    anyhow::ensure!(!runs.is_empty(), "no broker run found under {dir}");
    std::fs::write(out, render(&runs, &known, "make interop"))
        .with_context(|| format!("writing {out}"))?;
    eprintln!("interop: wrote {out} ({} broker(s))", runs.len());
    Ok(if run_ok(&runs, &known) {
        ExitCode::SUCCESS
    } else {
        eprintln!("interop: a test failed that is not a known failure, or a known failure passed (see {out})");
        ExitCode::FAILURE
    })
}
