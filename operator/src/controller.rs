//! The `UpdateCampaign` controller (kube-runtime `Controller`): the I/O shell of a reconcile pass,
//! read as a pipeline — fetch and validate (Devices from a reflector, `validate` pure; Secrets,
//! ConfigMaps and the firmware from the API, parsed by `inputs`) → decide (`rollout::decide`,
//! pure) → plan (`plan::plan_pass`, `status::compute`, `plan::events`, pure) → act (the engine
//! carries out the plan, the status is written by server-side apply at most once a second and only
//! when it changed, Events are published). It watches the Devices a campaign selects and the
//! Secrets/ConfigMaps it reads, so a fix to any of them wakes a campaign that waits for a change. A
//! finalizer clears the campaign's retained MQTT messages on delete.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use sealed_ota_protocol::{
    Action, CampaignPayload, CampaignSpec, ManagerConfig, PreparedCampaign, RotationMode,
};

use crate::arbitration::{Contender, Standing};
use crate::crd::{
    CampaignPhase, Device, DeviceCampaignStatus, DeviceFailure, DevicePhase, RotationModeSpec,
    UpdateCampaign, UpdateCampaignStatus, WaitingStatus, FINALIZER,
};
use crate::engine::{Engine, FIELD_MANAGER};
use crate::error::Error;
use crate::gates::{self, GateInput, HealthTally};
use crate::inputs;
use crate::mqtt::ConnState;
use crate::plan::{self, PassInput, Wake};
use crate::policy::{self, up_to_date, PolicyInput};
use crate::ramp::StartLog;
use crate::reasons::BlockerReason;
use crate::rollout::{decide, wave_cutoffs, DecideInput, Progress, RolloutParams};
use crate::runs::{clear_retained, CampaignKey, CampaignRun};
use crate::schedule::Calendar;
use crate::status::{compute, Blocker, StatusInput};
use crate::time::{k8s_time, unix_now, unix_secs};
use crate::{preview, prometheus};

/// What the controller remembers per campaign between passes (one place for all of it).
#[derive(Debug, Default)]
struct Memo {
    /// The status last written and when (the once-a-second limit, and skipping unchanged writes).
    written: Option<(Instant, UpdateCampaignStatus)>,
    /// The uid whose leftovers this process cleared (an ended campaign's retained messages).
    cleaned: Option<String>,
    /// Consecutive reconcile errors (backoff of the error policy).
    errors: u32,
    /// Consecutive passes blocked by the same transient blocker (its retry backoff).
    blocked_retries: u32,
    /// The devices selected at the last pass (late joiners and leavers are told apart by it) and
    /// the running totals of both: kept here, not added to the last written status, so a pass whose
    /// status write is held back by the rate limit loses no count.
    members: Option<Members>,
    /// Starts of the last minute (the rate).
    starts: StartLog,
    /// A dry run's prepared payload size: (uid, bytes of the encrypted chunks).
    planned: Option<(String, u64)>,
}

/// Shared state of one controller (one watched namespace, or all).
struct Ctx {
    client: Client,
    engine: Arc<Engine>,
    manager_id: String,
    recorder: Recorder,
    devices: Store<Device>,
    campaigns: Store<UpdateCampaign>,
    memo: Mutex<HashMap<CampaignKey, Memo>>,
}

/// Late joiners and leavers of one campaign, as this process saw them.
#[derive(Debug, Default)]
struct Members {
    /// The devices selected at the last pass (`None` before the first).
    names: Option<HashSet<String>>,
    /// Devices that started matching while the campaign ran, in total (from the status on the
    /// first pass of this process).
    joined: u32,
    /// Devices that stopped matching or were deleted while it ran, in total.
    left: u32,
}

impl Ctx {
    fn memo<T>(&self, key: &CampaignKey, f: impl FnOnce(&mut Memo) -> T) -> T {
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        f(memo.entry(key.clone()).or_default())
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn selects(c: &UpdateCampaign, d: &Device) -> bool {
    c.metadata.namespace == d.metadata.namespace
        && Selector::try_from(c.spec.selector.clone())
            .is_ok_and(|s| s.matches(ResourceExt::labels(d)))
}

fn references_secret(c: &UpdateCampaign, name: &str) -> bool {
    c.spec.manager_secret_name == name
        || c.spec
            .payload
            .firmware
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .is_some_and(|r| r.name == name)
        || c.spec
            .payload
            .rotate_credentials
            .as_ref()
            .is_some_and(|r| r.ca_secret_name == name)
}

fn references_config_map(c: &UpdateCampaign, name: &str) -> bool {
    c.spec
        .payload
        .firmware
        .as_ref()
        .and_then(|f| f.config_map_key_ref.as_ref())
        .is_some_and(|r| r.name == name)
}

/// Run the controller for one namespace (`None`: all namespaces) until the future is dropped.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    engine: Arc<Engine>,
    manager_id: String,
    instance: String,
) {
    let ns = namespace.as_deref();
    let (device_store, writer) = reflector::store();
    let device_reflector = reflector(
        writer,
        watcher(api::<Device>(&client, ns), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sealed-ota-operator".into(),
            instance: Some(instance),
        },
    );
    let controller = Controller::new(
        api::<UpdateCampaign>(&client, ns),
        watcher::Config::default(),
    );
    let campaigns = controller.store();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        engine,
        manager_id,
        recorder,
        devices: device_store,
        campaigns: campaigns.clone(),
        memo: Mutex::new(HashMap::new()),
    });
    let (c1, c2, c3) = (campaigns.clone(), campaigns.clone(), campaigns);
    let controller = controller
        .watches(
            api::<Device>(&client, ns),
            watcher::Config::default(),
            move |d| {
                c1.state()
                    .into_iter()
                    .filter(|c| selects(c, &d))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<Secret>(&client, ns),
            watcher::Config::default(),
            move |s| {
                let name = s.name_any();
                c2.state()
                    .into_iter()
                    .filter(|c| c.namespace() == s.namespace() && references_secret(c, &name))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<ConfigMap>(&client, ns),
            watcher::Config::default(),
            move |m| {
                let name = m.name_any();
                c3.state()
                    .into_iter()
                    .filter(|c| c.namespace() == m.namespace() && references_config_map(c, &name))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile loop");
            }
            futures::future::ready(())
        });
    futures::join!(device_reflector, controller);
}

fn error_policy(c: Arc<UpdateCampaign>, e: &Error, ctx: Arc<Ctx>) -> Requeue {
    ctx.engine
        .metrics
        .reconcile_errors
        .with_label_values(&[e.metric_label()])
        .inc();
    let errors = key_of(&c).ok().map_or(1, |key| {
        ctx.memo(&key, |m| {
            m.errors = m.errors.saturating_add(1);
            m.errors
        })
    });
    let delay = plan::backoff(errors);
    tracing::warn!(campaign = %c.name_any(), error = %e, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

async fn reconcile(c: Arc<UpdateCampaign>, ctx: Arc<Ctx>) -> Result<Requeue, Error> {
    ctx.engine.metrics.reconciliations.inc();
    let ns = c.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let key = key_of(&c)?;
    let api: Api<UpdateCampaign> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, c, |ev| async {
        match ev {
            FinalizerEvent::Apply(c) => apply(c, &ctx).await,
            FinalizerEvent::Cleanup(c) => cleanup(c, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.memo(&key, |m| m.errors = 0);
    }
    result
}

fn key_of(c: &UpdateCampaign) -> Result<CampaignKey, Error> {
    Ok((
        c.namespace().ok_or(Error::MissingMetadata("namespace"))?,
        c.metadata
            .name
            .clone()
            .ok_or(Error::MissingMetadata("name"))?,
    ))
}

/// What validation of the campaign's own spec found (pure).
#[derive(Debug)]
pub struct Validated {
    /// Selected Devices sorted by name (the wave order).
    pub selected: Vec<Arc<Device>>,
    /// Rollout parameters (the defaults when the spec's do not parse: then `blocker` says so).
    pub params: RolloutParams,
    /// The campaign's schedule (always open when it does not parse: then `blocker` says so).
    pub calendar: Calendar,
    /// The first problem found.
    pub blocker: Option<Blocker>,
}

/// Validate the selector and the rollout (pure over a snapshot of the Devices; also the CLI's
/// `campaign plan`, see [`crate::preview::preview`]). Selecting compares and sorts in place
/// rather than cloning names and labels: it runs on every pass.
pub fn validate(c: &UpdateCampaign, devices: Vec<Arc<Device>>) -> Validated {
    let mut blocker = None;
    let selected = match Selector::try_from(c.spec.selector.clone()) {
        Ok(selector) => {
            let ns = &c.metadata.namespace;
            let mut devices: Vec<_> = devices
                .into_iter()
                .filter(|d| {
                    &d.metadata.namespace == ns && selector.matches(ResourceExt::labels(&**d))
                })
                .collect();
            devices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            devices
        }
        Err(e) => {
            blocker = Some(Blocker {
                reason: BlockerReason::InvalidSelector,
                message: format!("spec.selector is not a valid label selector: {e}"),
            });
            Vec::new()
        }
    };
    let params = RolloutParams::from_spec(&c.spec.rollout).unwrap_or_else(|e| {
        blocker.get_or_insert(Blocker {
            reason: BlockerReason::InvalidRollout,
            message: e.to_string(),
        });
        RolloutParams::defaults()
    });
    let calendar = Calendar::for_campaign(c.spec.schedule.as_ref()).unwrap_or_else(|e| {
        blocker.get_or_insert(Blocker {
            reason: BlockerReason::InvalidSchedule,
            message: e.to_string(),
        });
        Calendar::always()
    });
    Validated {
        selected,
        params,
        calendar,
        blocker,
    }
}

/// The other running campaigns of the namespace (not finished, not dry runs, not aborted), with
/// their selectors, for the arbitration over shared devices.
fn rivals_of(
    c: &UpdateCampaign,
    campaigns: &Store<UpdateCampaign>,
    engine: &Engine,
) -> Vec<(Arc<UpdateCampaign>, Selector)> {
    // A campaign that never got going (blocked before its first start: a missing Secret, a bad
    // payload) claims no device: only one with a run here, or that has run, is a rival.
    let running = |o: &UpdateCampaign| {
        matches!(
            o.status.as_ref().map(|s| s.phase),
            Some(CampaignPhase::Progressing | CampaignPhase::Paused)
        ) || key_of(o).is_ok_and(|k| engine.has_run(&k, &o.uid().unwrap_or_default()))
    };
    rivals(c, campaigns.state(), running)
}

/// The campaigns among `campaigns` that compete with `c` for its devices (same namespace, not
/// finished, not dry runs, not aborted, and `running`), with their selectors (pure).
pub fn rivals(
    c: &UpdateCampaign,
    campaigns: Vec<Arc<UpdateCampaign>>,
    running: impl Fn(&UpdateCampaign) -> bool,
) -> Vec<(Arc<UpdateCampaign>, Selector)> {
    campaigns
        .into_iter()
        .filter(|o| {
            o.namespace() == c.namespace()
                && o.name_any() != c.name_any()
                && !o.spec.dry_run
                && !o.spec.abort
                && !o.status.as_ref().is_some_and(|s| s.phase.is_terminal())
                && running(o)
        })
        .filter_map(|o| {
            let selector = Selector::try_from(o.spec.selector.clone()).ok()?;
            Some((o, selector))
        })
        .collect()
}

/// A campaign as arbitration ranks it.
pub fn contender(c: &UpdateCampaign) -> Contender<'_> {
    Contender {
        name: c.metadata.name.as_deref().unwrap_or_default(),
        priority: c.spec.priority,
        created: c
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(unix_secs)
            .unwrap_or(0),
    }
}

/// Where `device` stands in the other campaign `o`: its run on this replica first, then what
/// the Device status records for it, then whether it needs `o` at all. A device the other run
/// finished stays held until the Device status that says so (and its new running version) is in
/// the cache: before that, this campaign would take it for a device still at the old version.
fn standing(o: &UpdateCampaign, device: &Device, engine: &Engine) -> Standing {
    let uid = o.uid().unwrap_or_default();
    let name = device.name_any();
    if let Ok(key) = key_of(o) {
        let recorded_done = record_of(device, &uid)
            .is_some_and(|r| matches!(r.phase, DevicePhase::Succeeded | DevicePhase::Failed));
        match engine.standing(&key, &uid, &name) {
            Some(p) if p.is_terminal() && recorded_done => return Standing::Done,
            Some(Progress::NotStarted) | None => {}
            Some(_) => return Standing::Started,
        }
    }
    recorded_standing(o, device)
}

/// What `device`'s status records about the campaign with `uid`, if it is the last one there.
fn record_of<'a>(device: &'a Device, uid: &str) -> Option<&'a DeviceCampaignStatus> {
    device
        .status
        .as_ref()
        .and_then(|s| s.campaign.as_ref())
        .filter(|r| r.uid == uid)
}

/// Where `device` stands in the other campaign `o` by what its Device status records (pure).
pub fn recorded_standing(o: &UpdateCampaign, device: &Device) -> Standing {
    match record_of(device, &o.uid().unwrap_or_default()).map(|r| r.phase) {
        Some(DevicePhase::Succeeded | DevicePhase::Failed) => Standing::Done,
        Some(DevicePhase::Pending | DevicePhase::Transferring) => Standing::Started,
        Some(DevicePhase::Released) | None if up_to_date(device, &o.spec) => Standing::Done,
        Some(DevicePhase::Released) | None => Standing::NotStarted,
    }
}

/// How many of the devices of `wave` the campaign updated, and of them how many sent a healthy
/// report (the gate's device-health check).
fn health_tally(
    key: &CampaignKey,
    uid: &str,
    selected: &[Arc<Device>],
    progress: &[Progress],
    params: &RolloutParams,
    wave: u32,
    engine: &Engine,
) -> HealthTally {
    let cutoffs = wave_cutoffs(selected.len() as u32, params);
    let end = cutoffs.get(wave as usize).copied().unwrap_or(0) as usize;
    let start = wave
        .checked_sub(1)
        .and_then(|w| cutoffs.get(w as usize))
        .copied()
        .unwrap_or(0) as usize;
    let mut tally = HealthTally::default();
    for (d, p) in selected[start..end].iter().zip(&progress[start..end]) {
        if *p == Progress::Succeeded {
            tally.updated += 1;
            match engine.health(key, uid, &d.name_any()) {
                Some(true) => {
                    tally.reported += 1;
                    tally.healthy += 1;
                }
                Some(false) => tally.reported += 1,
                None => {}
            }
        }
    }
    tally
}

async fn get_opt<K>(client: &Client, ns: &str, name: &str) -> Result<Option<K>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(Error::kube("reading a campaign input"))
}

/// A campaign prepared for its run, and the OCI digest its reference resolved to.
struct Prepared {
    run: CampaignRun,
    oci_digest: Option<String>,
}

/// Fetch and validate everything the campaign needs, and prepare it (encrypt once, chunk by
/// chunk into the cache directory: `firmware::prepare`) with its manifests expiring at
/// `expires_at` (fixed when the campaign was first prepared). An OCI reference is pinned to
/// `recorded_digest`, what the first preparation resolved it to.
async fn prepare_run(
    c: &UpdateCampaign,
    ctx: &Ctx,
    expires_at: u64,
    recorded_digest: Option<&str>,
) -> Result<Result<Prepared, Blocker>, Error> {
    let ns = c.namespace().unwrap_or_default();
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let spec = &c.spec;
    let Some(secret) = get_opt::<Secret>(&ctx.client, &ns, &spec.manager_secret_name).await? else {
        return Ok(Err(Blocker {
            reason: BlockerReason::ManagerSecretMissing,
            message: format!(
                "Secret {} (spec.managerSecretName) not found in namespace {ns}: create a kubernetes.io/tls Secret with tls.crt, tls.key (manager certificate with CN {}) and ca.crt",
                spec.manager_secret_name, ctx.manager_id
            ),
        }));
    };
    let (identity, trust) = match inputs::manager_identity(&secret, &ctx.manager_id) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    let mut release = None;
    let mut chunks = None;
    let mut oci_digest = None;
    let payload = if let Some(fw) = &spec.payload.firmware {
        let settings = &ctx.engine.firmware;
        let image = match crate::firmware::prepare(
            settings,
            &ctx.client,
            &ns,
            &uid,
            fw,
            spec.chunk_size,
            recorded_digest,
        )
        .await?
        {
            Ok(image) => image,
            Err(b) => return Ok(Err(b)),
        };
        if let Some(sig) = &fw.release_signature {
            let (size, sha) = (image.sealed.size(), image.sealed.sha256());
            match inputs::release_signature(sig, size, &sha, &spec.target_version) {
                Ok(sig) => release = Some(sig),
                Err(b) => return Ok(Err(b)),
            }
        }
        oci_digest = image.resolved_digest;
        chunks = Some(image.chunks);
        CampaignPayload::Sealed(image.sealed)
    } else if let Some(rot) = &spec.payload.rotate_credentials {
        let Some(ca_secret) = get_opt::<Secret>(&ctx.client, &ns, &rot.ca_secret_name).await?
        else {
            return Ok(Err(Blocker {
                reason: BlockerReason::CaSecretMissing,
                message: format!("Secret {} (spec.payload.rotateCredentials.caSecretName) not found: create it with the CA's tls.crt and tls.key", rot.ca_secret_name),
            }));
        };
        let ca = match inputs::rotation_ca(&ca_secret) {
            Ok(ca) => ca,
            Err(b) => return Ok(Err(b)),
        };
        CampaignPayload::RotateCredentials {
            mode: match rot.mode {
                RotationModeSpec::DeliverKey => RotationMode::DeliverKey,
                RotationModeSpec::Csr => RotationMode::Csr,
            },
            ca: Arc::new(ca),
            validity_days: rot.validity_days,
        }
    } else {
        return Ok(Err(Blocker {
            reason: BlockerReason::PayloadMissing,
            message: "spec.payload sets neither firmware nor rotateCredentials".into(),
        }));
    };
    let cspec = CampaignSpec {
        campaign_id: uid.clone(),
        target_version: spec.target_version.clone(),
        payload,
        expires_at,
        chunk_size: spec.chunk_size,
        release,
    };
    let prepared = match PreparedCampaign::prepare(cspec) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Err(Blocker {
                reason: BlockerReason::PayloadInvalid,
                message: format!("the payload cannot be prepared: {e}"),
            }))
        }
    };
    // Chunks that fit the retained window are published whole; a larger image is served as
    // devices ask (docs/protocol.md, "Large images").
    let capacity =
        u32::try_from(ctx.engine.firmware.retained_chunk_bytes / u64::from(spec.chunk_size.max(1)))
            .unwrap_or(u32::MAX)
            .max(1);
    let prepared = if prepared.chunk_count() > capacity {
        prepared.served_on_request()
    } else {
        prepared
    };
    let mut run = CampaignRun::new(
        uid,
        spec.target_version.clone(),
        Arc::new(prepared),
        ManagerConfig {
            identity: Arc::new(identity),
            trust: Arc::new(trust),
            topics: ctx.engine.topics.clone(),
        },
        spec.allow_downgrade,
    );
    if let Some(chunks) = chunks {
        run = run.with_chunks(Arc::new(chunks), capacity);
    }
    Ok(Ok(Prepared { run, oci_digest }))
}

/// The failed devices of this pass with what their Device status says about it (pure).
fn failures(selected: &[Arc<Device>], progress: &[Progress], uid: &str) -> Vec<DeviceFailure> {
    selected
        .iter()
        .zip(progress)
        .filter_map(|(d, p)| match p {
            Progress::Failed { reason } => Some(DeviceFailure {
                device: d.name_any(),
                reason: reason.as_str().to_owned(),
                message: d
                    .status
                    .as_ref()
                    .and_then(|s| s.campaign.as_ref())
                    .filter(|r| r.uid == uid && r.phase == DevicePhase::Failed)
                    .and_then(|r| r.message.clone())
                    .unwrap_or_else(|| reason.as_str().to_owned()),
            }),
            _ => None,
        })
        .collect()
}

#[tracing::instrument(skip_all, fields(namespace = %c.namespace().unwrap_or_default(), campaign = %c.name_any()))]
async fn apply(c: Arc<UpdateCampaign>, ctx: &Ctx) -> Result<Requeue, Error> {
    let key = key_of(&c)?;
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let ns = key.0.clone();
    let now = unix_now();
    let previous = c.status.clone().unwrap_or_default();
    let dry_run = c.spec.dry_run;

    // fetch + validate
    let Validated {
        selected,
        params,
        calendar,
        mut blocker,
    } = validate(&c, ctx.devices.state());
    // The expiry is fixed the first time the campaign is prepared and recorded on its status
    // before any device starts; a restarted operator prepares again with the recorded one.
    let expires_at = previous
        .expires_at
        .as_ref()
        .and_then(unix_secs)
        .unwrap_or_else(|| now + u64::from(c.spec.expires_after_seconds));
    let expired = now >= expires_at && !dry_run;
    let stopping = previous.phase.is_terminal() || c.spec.abort;
    let mut oci_digest = previous.oci_digest.clone();
    if blocker.is_none() && !stopping && !expired && !ctx.engine.has_run(&key, &uid) {
        let planned = ctx.memo(&key, |m| m.planned.as_ref().is_some_and(|(u, _)| *u == uid));
        if !(dry_run && planned) {
            match prepare_run(&c, ctx, expires_at, previous.oci_digest.as_deref()).await? {
                // A dry run only learns what the payload weighs; nothing is kept or published.
                Ok(Prepared { run, .. }) if dry_run => {
                    let bytes = run.facts().chunk_bytes;
                    ctx.memo(&key, |m| m.planned = Some((uid.clone(), bytes)));
                }
                Ok(Prepared {
                    run,
                    oci_digest: resolved,
                }) => {
                    tracing::info!(chunks = run.chunk_count(), expires_at, "campaign prepared");
                    ctx.engine.insert_run(key.clone(), run);
                    oci_digest = oci_digest.or(resolved);
                    if previous.expires_at.is_none() || previous.oci_digest != oci_digest {
                        let mut recorded = previous.clone();
                        recorded.expires_at = Some(k8s_time(expires_at));
                        recorded.oci_digest = oci_digest.clone();
                        write_status(&c, &key, &recorded, ctx).await?;
                    }
                }
                Err(b) => blocker = Some(b),
            }
        }
    }
    if blocker.is_none() && !stopping && !dry_run {
        if let ConnState::Down(e) = ctx.engine.mqtt.state() {
            blocker = Some(plan::broker_blocker(&e));
        }
    }

    // Devices that stopped matching (or were deleted) leave the run; new ones join it.
    let names: HashSet<&str> = selected
        .iter()
        .filter_map(|d| d.metadata.name.as_deref())
        .collect();
    let store = &ctx.devices;
    let released = ctx
        .engine
        .release(&key, &names, |n| {
            store.get(&ObjectRef::new(n).within(&ns)).is_some()
        })
        .await?;
    let running = matches!(
        previous.phase,
        CampaignPhase::Progressing | CampaignPhase::Paused
    );
    let (joined, left) = ctx.memo(&key, |m| {
        let members = m.members.get_or_insert_with(|| Members {
            names: None,
            joined: previous.devices.joined,
            left: previous.devices.left,
        });
        let (joined, left) = match (&members.names, running) {
            (Some(before), true) => (
                names.iter().filter(|n| !before.contains(**n)).count() as u32,
                before
                    .iter()
                    .filter(|n| !names.contains(n.as_str()))
                    .count() as u32,
            ),
            _ => (0, 0),
        };
        members.names = Some(names.iter().map(|n| n.to_string()).collect());
        members.joined += joined;
        members.left += left.max(released.len() as u32);
        (members.joined, members.left)
    });

    // policy
    let progress = ctx.engine.progress(&key, &uid, &selected);
    let others = rivals_of(&c, &ctx.campaigns, &ctx.engine);
    let rivals: Vec<Vec<(Contender<'_>, Standing)>> = if others.is_empty() {
        Vec::new()
    } else {
        selected
            .iter()
            .map(|d| {
                others
                    .iter()
                    .filter(|(_, sel)| sel.matches(ResourceExt::labels(&**d)))
                    .map(|(o, _)| (contender(o), standing(o, d, &ctx.engine)))
                    .collect()
            })
            .collect()
    };
    let policy = ctx.memo(&key, |m| {
        policy::assess(
            &PolicyInput {
                now,
                spec: &c.spec,
                me: contender(&c),
                devices: &selected,
                progress: &progress,
                rivals: &rivals,
                calendar: &calendar,
                previous: &previous,
            },
            &mut m.starts,
        )
    });
    if blocker.is_none() {
        blocker = policy.blocker.clone();
    }
    let gate_due = previous
        .gate
        .as_ref()
        .and_then(|g| g.soak_until.as_ref())
        .and_then(unix_secs)
        .filter(|t| *t > now);

    // decide
    let decision = decide(&DecideInput {
        now,
        devices: &progress,
        params: &params,
        paused: c.spec.paused,
        abort: c.spec.abort,
        blocked: blocker.is_some(),
        previous_phase: previous.phase,
        previous_wave: previous.current_wave,
        holds: &policy.holds,
        start_cap: policy.start_cap,
        wave_limit: policy.wave_limit,
        deadline_passed: policy.deadline_passed,
        policy_due: policy.due.into_iter().chain(gate_due).min(),
    });
    tracing::debug!(phase = ?decision.phase, counts = ?decision.counts, starts = decision.start.len(), blocked = ?blocker.as_ref().map(|b| b.reason), "decided");

    // the gate after a finished wave
    let gate = match &c.spec.rollout.gate {
        Some(spec) if !previous.phase.is_terminal() => {
            let metric = match (
                &spec.metrics,
                gates::needs_metric(spec, previous.gate.as_ref(), decision.awaiting_gate, now),
            ) {
                (Some(m), true) => {
                    Some(prometheus::instant_query(&m.prometheus_url, &m.query).await)
                }
                _ => None,
            };
            let health = decision
                .awaiting_gate
                .map(|w| {
                    health_tally(
                        &key,
                        &uid,
                        &selected,
                        &decision.progress,
                        &params,
                        w,
                        &ctx.engine,
                    )
                })
                .unwrap_or_default();
            Some(gates::step(&GateInput {
                spec,
                previous: previous.gate.as_ref(),
                promoted_through: c.spec.promote_through_wave,
                awaiting: decision.awaiting_gate,
                now,
                health,
                metric,
            }))
        }
        _ => None,
    };

    // plan
    let has_run = ctx.engine.has_run(&key, &uid);
    let pass = plan::plan_pass(&PassInput {
        now,
        decision: &decision,
        blocker: blocker.as_ref(),
        previous: &previous,
        expired,
        writes_pending: ctx.engine.device_writes_pending() > 0,
        timeout_secs: params.timeout_secs,
        has_run,
        dry_run,
        gate_failed: gate.as_ref().and_then(|g| g.failed.as_ref()).map(|f| f.0),
    });
    let facts = ctx.engine.run_facts(&key).filter(|_| has_run);
    let chunk_bytes = facts.map(|f| f.chunk_bytes).or_else(|| {
        ctx.memo(&key, |m| {
            m.planned.as_ref().filter(|(u, _)| *u == uid).map(|p| p.1)
        })
    });
    let mut policy_status = policy.status;
    policy_status.plan = Some(preview::plan(
        &selected,
        &policy.exclusions,
        &params,
        chunk_bytes,
    ));
    policy_status.warnings = preview::warnings(
        &c.spec,
        &params,
        selected.len() as u32,
        Some(&calendar),
        now,
    );
    if let Some(g) = &gate {
        policy_status.gate = g.status.clone();
        policy_status.gate_failed = g.failed.as_ref().map(|f| f.1.clone());
        if policy_status.waiting.is_none() && decision.awaiting_gate.is_some() && g.failed.is_none()
        {
            policy_status.waiting = g.status.as_ref().map(|s| WaitingStatus {
                reason: "Gate".into(),
                message: s.message.clone(),
                until: s.soak_until.clone().filter(|_| s.state == gates::SOAKING),
            });
        }
    } else {
        policy_status.gate = previous.gate.clone();
    }
    let mut counts = decision.counts.clone();
    counts.joined = joined;
    counts.left = left;
    let status = compute(StatusInput {
        generation: c.metadata.generation,
        phase: pass.phase,
        counts,
        current_wave: decision.current_wave,
        total_waves: decision.total_waves,
        chunk_count: facts.map(|f| f.chunk_count).or(previous.chunk_count),
        expires_at: facts
            .map(|f| k8s_time(f.expires_at))
            .or_else(|| previous.expires_at.clone()),
        expired: pass.expired,
        release_key_id: facts
            .map(|f| f.release_key_id.map(hex::encode))
            .unwrap_or_else(|| previous.release_key_id.clone()),
        failures: failures(&selected, &decision.progress, &uid),
        blocker: blocker.clone(),
        previous: Some(&previous),
        now: k8s_time(now),
        policy: policy_status,
    });
    let mut status = status;
    status.oci_digest = oci_digest;
    let events = plan::events(&previous, &status, blocker.as_ref());

    // act
    ctx.engine.apply(&key, &uid, &selected, &pass.run).await?;
    ctx.memo(&key, |m| m.starts.record(now, pass.run.start.len()));
    if let Some(notifies) = pass.clear_recorded {
        // Ended under an earlier process (or before a restart): clear what the resources say it
        // may have left retained, once per process.
        let first = ctx.memo(&key, |m| {
            let first = m.cleaned.as_deref() != Some(uid.as_str());
            m.cleaned = Some(uid.clone());
            first
        });
        if first {
            ctx.engine
                .mqtt
                .execute(recorded_clears(&c, ctx, &uid, notifies))
                .await?;
        }
    }
    for (p, n) in [
        ("pending", status.devices.pending),
        ("in_progress", status.devices.in_progress),
        ("succeeded", status.devices.succeeded),
        ("failed", status.devices.failed),
    ] {
        ctx.engine
            .metrics
            .campaign_devices
            .with_label_values(&[&key.0, &key.1, p])
            .set(i64::from(n));
    }
    let held_back = write_status(&c, &key, &status, ctx).await?;
    for ev in events {
        publish_event(ctx, &c, ev).await;
    }
    let blocked_retries = ctx.memo(&key, |m| {
        m.blocked_retries = match &blocker {
            Some(b) if b.reason.is_transient() => m.blocked_retries.saturating_add(1),
            _ => 0,
        };
        m.blocked_retries
    });
    let mut decision = decision;
    if let Some(due) = gate.as_ref().and_then(|g| g.due) {
        decision.next_due = Some(decision.next_due.map_or(due, |d| d.min(due)));
    }
    // A gate that just passed opens the next wave on the very next pass.
    let gate_opened = gate
        .as_ref()
        .and_then(|g| g.status.as_ref())
        .is_some_and(|g| g.passed_waves > previous.gate.as_ref().map_or(0, |p| p.passed_waves));
    if gate_opened {
        decision.next_due = Some(now);
    }
    Ok(
        match plan::wake(
            &pass,
            &decision,
            blocker.as_ref(),
            blocked_retries,
            held_back,
            now,
        ) {
            Wake::OnChange => Requeue::await_change(),
            Wake::After(d) => Requeue::requeue(d),
        },
    )
}

/// Server-side apply the status when it changed, at most once a second. Returns how long to wait when
/// a changed status was held back by the rate limit.
async fn write_status(
    c: &UpdateCampaign,
    key: &CampaignKey,
    status: &UpdateCampaignStatus,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    let held = ctx.memo(key, |m| match &m.written {
        Some((_, last)) if last == status => Some(None),
        Some((at, _)) if at.elapsed() < Duration::from_secs(1) => {
            Some(Some(Duration::from_secs(1) - at.elapsed()))
        }
        None if c.status.as_ref() == Some(status) => Some(None),
        _ => None,
    });
    if let Some(wait) = held {
        return Ok(wait);
    }
    let api: Api<UpdateCampaign> = Api::namespaced(ctx.client.clone(), &key.0);
    let patch = serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "UpdateCampaign",
        "status": status,
    });
    api.patch_status(
        &key.1,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("writing campaign status"))?;
    ctx.engine
        .metrics
        .status_writes
        .with_label_values(&["campaign"])
        .inc();
    ctx.memo(key, |m| m.written = Some((Instant::now(), status.clone())));
    Ok(None)
}

async fn publish_event(ctx: &Ctx, c: &UpdateCampaign, ev: plan::PlannedEvent) {
    let ev = Event {
        type_: if ev.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: ev.reason,
        note: Some(ev.note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &c.object_ref(&())).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

/// Clears of whatever a campaign may have left retained, from what the resources record: chunks by
/// index (status.chunkCount) and, with `notifies`, the notify topic of the devices that recorded
/// this campaign. Clearing an absent retained message is harmless.
fn recorded_clears(c: &UpdateCampaign, ctx: &Ctx, uid: &str, notifies: bool) -> Vec<Action> {
    let topics = &ctx.engine.topics;
    let mut actions = Vec::new();
    if let Some(n) = c.status.as_ref().and_then(|s| s.chunk_count) {
        actions.extend((0..n).map(|i| Action::Publish(clear_retained(topics.chunk(uid, i)))));
    }
    if !notifies {
        return actions;
    }
    for d in ctx.devices.state() {
        let recorded = d
            .status
            .as_ref()
            .and_then(|s| s.campaign.as_ref())
            .is_some_and(|r| r.uid == uid);
        if recorded && d.namespace() == c.namespace() {
            actions.push(Action::Publish(clear_retained(
                topics.notify(&d.device_id()),
            )));
        }
    }
    actions
}

/// Finalizer clean-up: clear the campaign's retained messages. Needs the broker; retried until done.
async fn cleanup(c: Arc<UpdateCampaign>, ctx: &Ctx) -> Result<Requeue, Error> {
    let key = key_of(&c)?;
    let uid = c.uid().unwrap_or_default();
    if ctx.engine.mqtt.state() != ConnState::Connected
        && !ctx.engine.mqtt.wait_connected(Duration::from_secs(5)).await
    {
        return Err(Error::BrokerUnavailable(
            "cannot clear the campaign's retained messages".into(),
        ));
    }
    ctx.engine.remove_run(&key).await?;
    ctx.engine
        .mqtt
        .execute(recorded_clears(&c, ctx, &uid, true))
        .await?;
    ctx.memo
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    tracing::info!(campaign = %key.1, "retained messages cleared on delete");
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CampaignPayloadSpec, FirmwareSource, KeyRef, UpdateCampaignSpec};

    fn campaign() -> UpdateCampaign {
        let spec: UpdateCampaignSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"fleet": "a"}},
            "targetVersion": "1.2.3",
            "payload": {"firmware": {"configMapKeyRef": {"name": "fw", "key": "image"}}},
            "managerSecretName": "manager"
        }))
        .unwrap();
        let mut c = UpdateCampaign::new("c", spec);
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn device(labels: &[(&str, &str)], ns: &str) -> Device {
        let mut d = Device::new("d", Default::default());
        d.metadata.namespace = Some(ns.into());
        d.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        d
    }

    #[test]
    fn mappers_find_the_campaigns_to_wake() {
        let c = campaign();
        assert!(selects(&c, &device(&[("fleet", "a")], "ns")));
        assert!(!selects(&c, &device(&[("fleet", "b")], "ns")));
        assert!(!selects(&c, &device(&[("fleet", "a")], "other")));
        assert!(references_secret(&c, "manager"));
        assert!(!references_secret(&c, "fw"));
        assert!(references_config_map(&c, "fw"));
        let mut s = c.clone();
        s.spec.payload = CampaignPayloadSpec {
            firmware: Some(FirmwareSource {
                config_map_key_ref: None,
                secret_key_ref: Some(KeyRef {
                    name: "fw-secret".into(),
                    key: "k".into(),
                }),
                url: None,
                oci: None,
                sha256: None,
                release_signature: None,
            }),
            rotate_credentials: None,
        };
        assert!(references_secret(&s, "fw-secret"));
    }
}
