//! `sealed-ota campaign plan|status|watch`: what a campaign would do before it runs and what its
//! status says, for people (a table, or a live progress line with per-phase counts and an ETA)
//! and pipelines (`-o json|yaml`, and `watch`'s exit status). The status and the plan are the
//! operator's (`sealed_ota_operator::crd`, `sealed_ota_operator::preview::preview`, the same
//! validation and policy the controller runs); this module reads the resources with the
//! kubeconfig's identity and renders them with pure functions.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kube::api::ListParams;
use kube::Api;
use sealed_ota_operator::crd::{CampaignPhase, Device, UpdateCampaign, UpdateCampaignStatus};
use sealed_ota_operator::preview::{preview, CampaignPreview};

use crate::error::{Error, Result};
use crate::output::{self, Format};

/// Subcommands of `sealed-ota campaign`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a campaign would do if it started now, before it runs: the devices it selects,
    /// its waves, the devices left out and why, the windows, what blocks it and the devices its
    /// first pass would start. Reads an applied campaign (NAME) or a manifest (-f FILE) and the
    /// namespace's Devices and campaigns; changes nothing.
    Plan(PlanArgs),
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

/// `campaign plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The UpdateCampaign's name (applied to the cluster).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    name: Option<String>,
    /// A campaign manifest (YAML or JSON) not applied yet.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// The namespace (a manifest's own namespace wins; they must agree when both are given).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
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
    /// Output format of the final status (the progress line goes to stderr).
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
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
            Command::Plan(args) => {
                let plan = plan(&args).await?;
                Ok(Outcome {
                    text: output::render(args.output, &plan, || plan_table(&plan))?,
                    ok: true,
                })
            }
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

/// The campaign of a manifest file, in its namespace (or -n's).
fn from_file(path: &std::path::Path, namespace: Option<&str>) -> Result<UpdateCampaign> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let invalid = |detail: String| Error::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| invalid(format!("not YAML or JSON: {e}")))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "UpdateCampaign" {
        return Err(invalid(format!(
            "kind is {kind:?}, not UpdateCampaign; give -f one UpdateCampaign manifest (as in examples/)"
        )));
    }
    let mut campaign: UpdateCampaign = serde_yaml::from_value(value).map_err(|e| {
        invalid(format!(
            "not a valid UpdateCampaign: {e}; fix the field it names"
        ))
    })?;
    if campaign.metadata.name.is_none() {
        return Err(invalid(
            "metadata.name is missing; name the campaign".into(),
        ));
    }
    match (campaign.metadata.namespace.as_deref(), namespace) {
        (Some(own), Some(flag)) if own != flag => {
            return Err(Error::Flag {
                flag: "-n/--namespace",
                detail: format!(
                    "{flag:?} differs from the manifest's metadata.namespace {own:?}; drop -n or make them agree"
                ),
            })
        }
        (None, flag) => campaign.metadata.namespace = Some(flag.unwrap_or("default").to_owned()),
        _ => {}
    }
    Ok(campaign)
}

async fn plan(args: &PlanArgs) -> Result<CampaignPreview> {
    let campaign = match (&args.file, &args.name) {
        (Some(path), _) => from_file(path, args.namespace.as_deref())?,
        (None, name) => {
            let target = Target {
                name: name.clone().unwrap_or_default(),
                namespace: args.namespace.clone().unwrap_or_else(|| "default".into()),
            };
            read(&api(&target.namespace).await?, &target).await?
        }
    };
    let ns = campaign.metadata.namespace.clone().unwrap_or_default();
    let client = crate::runtime::kube_client().await?;
    let listing = |what: &str, e: kube::Error| Error::Flag {
        flag: "KUBECONFIG",
        detail: format!("listing the {what} of namespace {ns:?}: {e}"),
    };
    let devices = Api::<Device>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| listing("Devices", e))?;
    let campaigns = Api::<UpdateCampaign>::namespaced(client, &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| listing("UpdateCampaigns", e))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(preview(
        &campaign,
        devices.items.into_iter().map(Arc::new).collect(),
        campaigns.items.into_iter().map(Arc::new).collect(),
        now,
    ))
}

/// A campaign's plan as tables (pure).
pub fn plan_table(p: &CampaignPreview) -> String {
    let mut rows = vec![
        vec![
            "campaign".to_string(),
            format!("{}/{}", p.namespace, p.campaign),
        ],
        vec!["selected".into(), p.selected.to_string()],
        vec!["to update".into(), p.plan.devices.to_string()],
        vec![
            "blocked".into(),
            p.blocked
                .as_ref()
                .map_or("no".into(), |b| format!("{}: {}", b.reason, b.message)),
        ],
        vec![
            "starts now".into(),
            if p.starts_now.is_empty() {
                "none".into()
            } else {
                format!("{} ({})", p.starts_now.len(), p.starts_now.join(", "))
            },
        ],
    ];
    if let Some(s) = &p.schedule {
        let window = match (s.open, &s.closes_at, &s.next_open) {
            (true, Some(t), _) => format!("open, closes {}", t.0),
            (true, None, _) => "open".into(),
            (false, _, Some(t)) => format!("closed, opens {}", t.0),
            (false, _, None) => "closed, never opens".into(),
        };
        rows.push(vec!["window".into(), window]);
    }
    if let Some(w) = &p.waiting {
        rows.push(vec![
            "waits for".into(),
            format!("{}: {}", w.reason, w.message),
        ]);
    }
    for note in &p.notes {
        rows.push(vec!["note".into(), note.clone()]);
    }
    let mut out = output::columns(&rows);
    let mut waves = vec![vec![
        "WAVE".to_string(),
        "DEVICES".into(),
        "FIRST DEVICES".into(),
    ]];
    waves.extend(p.plan.waves.iter().map(|w| {
        vec![
            w.wave.to_string(),
            w.size.to_string(),
            w.first_devices.join(", "),
        ]
    }));
    out += "\n";
    out += &output::columns(&waves);
    if !p.plan.excluded.is_empty() || !p.held_by.is_empty() {
        let mut left = vec![vec![
            "LEFT OUT".to_string(),
            "DEVICES".into(),
            "FIRST DEVICES".into(),
        ]];
        left.extend(
            p.plan
                .excluded
                .iter()
                .map(|e| vec![e.reason.clone(), e.count.to_string(), e.devices.join(", ")]),
        );
        left.extend(
            p.held_by
                .iter()
                .map(|h| vec![format!("held by {}", h.campaign), h.devices.to_string()]),
        );
        out += "\n";
        out += &output::columns(&left);
    }
    for w in &p.warnings {
        out += &format!("\nwarning: {w}");
    }
    if !p.warnings.is_empty() {
        out += "\n";
    }
    out
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
                text: output::render(args.output, &status, || {
                    format!("{} {:?}\n", args.target.name, status.phase)
                })?,
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
    if let Some(d) = &status.delta {
        rows.push(vec!["delta devices".into(), d.devices.to_string()]);
        let ratio = if d.bytes_full == 0 {
            String::new()
        } else {
            format!(
                " ({:.3} of full)",
                d.bytes_sent as f64 / d.bytes_full as f64
            )
        };
        rows.push(vec![
            "bytes sent".into(),
            format!("{} of {} full{ratio}", d.bytes_sent, d.bytes_full),
        ]);
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
    fn the_plan_table_shows_waves_left_out_devices_blockers_and_warnings() {
        let plan: CampaignPreview = serde_json::from_value(serde_json::json!({
            "campaign": "fw", "namespace": "fleet", "selected": 4,
            "blocked": {"reason": "InvalidSchedule", "message": "spec.schedule.timeZone: unknown"},
            "notes": ["spec.paused is set"],
            "plan": {"devices": 3, "waves": [
                {"wave": 0, "size": 1, "firstDevices": ["a"]},
                {"wave": 1, "size": 2, "firstDevices": ["b", "c"]}],
                "excluded": [{"reason": "UpToDate", "count": 1, "devices": ["d"]}]},
            "startsNow": [],
            "schedule": {"open": false},
            "heldBy": [{"campaign": "older", "devices": 1}],
            "warnings": ["spec.rollout.canary is set without failureThreshold"],
        }))
        .unwrap();
        let t = plan_table(&plan);
        for needle in [
            "campaign    fleet/fw",
            "to update   3",
            "blocked     InvalidSchedule: spec.schedule.timeZone: unknown",
            "starts now  none",
            "window      closed, never opens",
            "note        spec.paused is set",
            "1     2        b, c",
            "UpToDate       1        d\n",
            "held by older  1\n",
            "warning: spec.rollout.canary",
        ] {
            assert!(t.contains(needle), "{needle:?} not in:\n{t}");
        }
    }

    #[test]
    fn the_table_names_every_count_and_the_recorded_digest() {
        let mut s = status(CampaignPhase::Succeeded, 4, 4, 0);
        s.oci_digest = Some("sha256:ab".into());
        s.delta = Some(sealed_ota_operator::crd::DeltaStatus {
            devices: 3,
            bytes_sent: 250,
            bytes_full: 1000,
        });
        let t = table("fw", &s);
        for needle in [
            "campaign       fw",
            "phase          Succeeded",
            "succeeded      4",
            "OCI digest     sha256:ab",
            "delta devices  3",
            "bytes sent     250 of 1000 full (0.250 of full)",
        ] {
            assert!(t.contains(needle), "{needle}:\n{t}");
        }
    }
}
