//! `sealed-ota campaign status|watch`: what an UpdateCampaign's status says, for people (a table,
//! or a live progress line with per-phase counts and an ETA) and pipelines (`-o json|yaml`, and
//! `watch`'s exit status). The status is the operator's (`sealed_ota_operator::crd`); this module
//! reads it with the kubeconfig's identity and renders it with pure functions.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kube::Api;
use sealed_ota_operator::crd::{CampaignPhase, UpdateCampaign, UpdateCampaignStatus};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota campaign`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a campaign's status: phase, devices per phase, conditions, failures.
    Status(StatusArgs),
    /// Follow a campaign until it ends: a progress line with per-phase counts and an ETA. Exits 0
    /// when it succeeded, 2 when it failed or was aborted.
    Watch(WatchArgs),
}

/// The campaign a command reads.
#[derive(Debug, Args)]
pub struct Target {
    /// The UpdateCampaign's name.
    pub name: String,
    /// Its namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
}

/// `campaign status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// `campaign watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds between two reads of the status.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    interval: u64,
    /// Give up after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
}

/// What a command printed and whether the campaign is fine.
pub struct Outcome {
    /// The text for stdout.
    pub text: String,
    /// False when `watch` saw the campaign fail or be aborted.
    pub ok: bool,
}

/// Run a `campaign` subcommand.
pub fn run(command: Command) -> Result<Outcome> {
    crate::runtime::block_on(async {
        match command {
            Command::Status(args) => {
                let campaign = read(&api(&args.target.namespace).await?, &args.target).await?;
                let status = campaign.status.clone().unwrap_or_default();
                Ok(Outcome {
                    text: output::render(args.output, &status, || {
                        table(&args.target.name, &status)
                    })?,
                    ok: true,
                })
            }
            Command::Watch(args) => watch(args).await,
        }
    })?
}

async fn api(namespace: &str) -> Result<Api<UpdateCampaign>> {
    Ok(Api::namespaced(
        crate::runtime::kube_client().await?,
        namespace,
    ))
}

async fn read(api: &Api<UpdateCampaign>, target: &Target) -> Result<UpdateCampaign> {
    match api.get_opt(&target.name).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(Error::Flag {
            flag: "NAME",
            detail: format!(
                "no UpdateCampaign {:?} in namespace {:?}; check the name and -n/--namespace",
                target.name, target.namespace
            ),
        }),
        Err(e) => Err(Error::Flag {
            flag: "KUBECONFIG",
            detail: format!("reading UpdateCampaign {}: {e}", target.name),
        }),
    }
}

async fn watch(args: WatchArgs) -> Result<Outcome> {
    let api = api(&args.target.namespace).await?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut first: Option<(Instant, u32)> = None;
    let mut last_line = String::new();
    loop {
        let status = read(&api, &args.target).await?.status.unwrap_or_default();
        let done = finished(&status);
        let now = Instant::now();
        let (t0, d0) = *first.get_or_insert((now, done));
        let eta = eta(d0, done, now.duration_since(t0), status.devices.selected);
        let line = progress_line(&status, eta);
        if line != last_line {
            let mut err = std::io::stderr();
            if tty {
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            last_line = line;
        }
        if status.phase.is_terminal() {
            if tty {
                let _ = writeln!(std::io::stderr());
            }
            return Ok(Outcome {
                text: format!("{} {:?}\n", args.target.name, status.phase),
                ok: status.phase == CampaignPhase::Succeeded,
            });
        }
        if args.timeout > 0 && started.elapsed() >= Duration::from_secs(args.timeout) {
            return Err(Error::Flag {
                flag: "--timeout",
                detail: format!(
                    "{} is still {:?} after {} s; raise --timeout or look at `campaign status`",
                    args.target.name, status.phase, args.timeout
                ),
            });
        }
        tokio::time::sleep(Duration::from_secs(args.interval)).await;
    }
}

fn finished(status: &UpdateCampaignStatus) -> u32 {
    status.devices.succeeded + status.devices.failed
}

/// Time left at the rate devices finished since watching began (pure): `None` before any
/// finished.
pub fn eta(done_at_start: u32, done: u32, elapsed: Duration, selected: u32) -> Option<Duration> {
    let progressed = done.saturating_sub(done_at_start);
    if progressed == 0 || done >= selected {
        return None;
    }
    let per_device = elapsed.as_secs_f64() / f64::from(progressed);
    Some(Duration::from_secs_f64(
        per_device * f64::from(selected - done),
    ))
}

/// One progress line: a bar of finished devices, the phase, per-phase counts and the ETA (pure).
pub fn progress_line(status: &UpdateCampaignStatus, eta: Option<Duration>) -> String {
    const WIDTH: u32 = 24;
    let d = &status.devices;
    let done = finished(status);
    let filled = (done * WIDTH)
        .checked_div(d.selected)
        .unwrap_or(0)
        .min(WIDTH) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    );
    let eta = match (status.phase.is_terminal(), eta) {
        (true, _) => String::new(),
        (false, Some(t)) => format!("  ETA {}s", t.as_secs()),
        (false, None) => "  ETA -".into(),
    };
    format!(
        "[{bar}] {done}/{} {:?}  pending {}  in progress {}  succeeded {}  failed {}  rolled back {}  wave {}/{}{eta}",
        d.selected,
        status.phase,
        d.pending,
        d.in_progress,
        d.succeeded,
        d.failed,
        d.rolled_back,
        status.current_wave + 1,
        status.total_waves.max(1),
    )
}

/// The status as a table (pure).
pub fn table(name: &str, status: &UpdateCampaignStatus) -> String {
    let d = &status.devices;
    let mut rows = vec![
        vec!["campaign".to_string(), name.to_string()],
        vec!["phase".into(), format!("{:?}", status.phase)],
        vec![
            "progress".into(),
            status.progress.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["selected".into(), d.selected.to_string()],
        vec!["pending".into(), d.pending.to_string()],
        vec!["in progress".into(), d.in_progress.to_string()],
        vec!["succeeded".into(), d.succeeded.to_string()],
        vec!["failed".into(), d.failed.to_string()],
        vec!["rolled back".into(), d.rolled_back.to_string()],
        vec![
            "wave".into(),
            format!("{}/{}", status.current_wave + 1, status.total_waves.max(1)),
        ],
    ];
    if let Some(digest) = &status.oci_digest {
        rows.push(vec!["OCI digest".into(), digest.clone()]);
    }
    if let Some(key) = &status.release_key_id {
        rows.push(vec!["release key".into(), key.clone()]);
    }
    let mut out = output::columns(&rows);
    if !status.conditions.is_empty() {
        let mut c = vec![vec![
            "CONDITION".to_string(),
            "STATUS".into(),
            "REASON".into(),
            "MESSAGE".into(),
        ]];
        c.extend(status.conditions.iter().map(|x| {
            vec![
                x.type_.clone(),
                x.status.clone(),
                x.reason.clone(),
                x.message.clone(),
            ]
        }));
        out += "\n";
        out += &output::columns(&c);
    }
    if !status.failures.is_empty() {
        let mut f = vec![vec!["FAILED DEVICE".to_string(), "REASON".into()]];
        f.extend(
            status
                .failures
                .iter()
                .map(|x| vec![x.device.clone(), x.reason.clone()]),
        );
        out += "\n";
        out += &output::columns(&f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        phase: CampaignPhase,
        selected: u32,
        succeeded: u32,
        failed: u32,
    ) -> UpdateCampaignStatus {
        let mut s = UpdateCampaignStatus {
            phase,
            total_waves: 2,
            ..UpdateCampaignStatus::default()
        };
        s.devices.selected = selected;
        s.devices.succeeded = succeeded;
        s.devices.failed = failed;
        s.devices.in_progress = selected - succeeded - failed;
        s
    }

    #[test]
    fn the_eta_follows_the_rate_devices_finished_at_since_watching_began() {
        assert_eq!(eta(0, 0, Duration::from_secs(10), 20), None);
        assert_eq!(
            eta(2, 7, Duration::from_secs(10), 22),
            Some(Duration::from_secs(30))
        );
        assert_eq!(eta(0, 20, Duration::from_secs(10), 20), None);
    }

    #[test]
    fn the_progress_line_shows_the_bar_the_counts_and_the_eta() {
        let line = progress_line(
            &status(CampaignPhase::Progressing, 20, 9, 1),
            Some(Duration::from_secs(42)),
        );
        assert!(
            line.starts_with("[############............] 10/20 Progressing"),
            "{line}"
        );
        for needle in [
            "in progress 10",
            "succeeded 9",
            "failed 1",
            "wave 1/2",
            "ETA 42s",
        ] {
            assert!(line.contains(needle), "{needle}: {line}");
        }
        let over = progress_line(&status(CampaignPhase::Succeeded, 20, 20, 0), None);
        assert!(
            over.starts_with(&format!("[{}] 20/20 Succeeded", "#".repeat(24))),
            "{over}"
        );
        assert!(!over.contains("ETA"), "{over}");
        // No device selected yet: an empty bar, no division by zero.
        assert!(
            progress_line(&status(CampaignPhase::Pending, 0, 0, 0), None).contains("0/0 Pending")
        );
    }

    #[test]
    fn the_table_names_every_count_and_the_recorded_digest() {
        let mut s = status(CampaignPhase::Succeeded, 4, 4, 0);
        s.oci_digest = Some("sha256:ab".into());
        let t = table("fw", &s);
        for needle in [
            "campaign     fw",
            "phase        Succeeded",
            "succeeded    4",
            "OCI digest   sha256:ab",
        ] {
            assert!(t.contains(needle), "{needle}:\n{t}");
        }
    }
}
