//! The `UpdateCampaign` controller (kube-runtime `Controller`), read as a pipeline:
//! fetch (Devices from a reflector, Secrets/ConfigMaps from the API) → validate (pure, `inputs`) →
//! decide (pure, `rollout`) → act (sessions and retained messages through the `engine`) →
//! status (pure `status::compute`, written by server-side apply at most once a second, only when it
//! changed). It watches the Devices a campaign selects and the Secrets/ConfigMaps it reads, so a fix
//! to any of them wakes the campaign. A finalizer clears the campaign's retained MQTT messages on delete.

use std::collections::HashMap;
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

use crate::crd::{
    CampaignPhase, Device, DeviceFailure, DevicePhase, RotationModeSpec, UpdateCampaign,
    UpdateCampaignStatus, FINALIZER,
};
use crate::engine::{
    clear_retained, k8s_time, unix_now, CampaignKey, CampaignRun, Engine, FIELD_MANAGER,
};
use crate::error::Error;
use crate::inputs;
use crate::mqtt::ConnState;
use crate::rollout::{decide, DecideInput, Progress, RolloutParams};
use crate::status::{compute, Blocker, StatusInput};

/// Shared state of one controller (one watched namespace, or all).
struct Ctx {
    client: Client,
    engine: Arc<Engine>,
    manager_id: String,
    recorder: Recorder,
    devices: Store<Device>,
    written: Mutex<HashMap<CampaignKey, (Instant, UpdateCampaignStatus)>>,
    cleaned: Mutex<std::collections::HashSet<String>>,
    failures: Mutex<HashMap<CampaignKey, u32>>,
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
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        engine,
        manager_id,
        recorder,
        devices: device_store,
        written: Mutex::new(HashMap::new()),
        cleaned: Mutex::new(Default::default()),
        failures: Mutex::new(HashMap::new()),
    });
    let controller = Controller::new(
        api::<UpdateCampaign>(&client, ns),
        watcher::Config::default(),
    );
    let campaigns = controller.store();
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

/// Delay before retrying after `failures` consecutive reconcile errors: 1 s doubling to 5 min.
fn error_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(8)).min(Duration::from_secs(300))
}

fn error_policy(c: Arc<UpdateCampaign>, e: &Error, ctx: Arc<Ctx>) -> Requeue {
    ctx.engine
        .metrics
        .reconcile_errors
        .with_label_values(&[e.metric_label()])
        .inc();
    let failures = key_of(&c).ok().map_or(1, |key| {
        let mut f = lock(&ctx.failures);
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    let delay = error_backoff(failures);
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
        lock(&ctx.failures).remove(&key);
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

/// Devices the campaign selects, sorted by name (the wave order). It runs on every Device event
/// of a campaign, so it compares and sorts in place rather than cloning names and labels.
fn selected_devices(
    c: &UpdateCampaign,
    store: &Store<Device>,
) -> Result<Vec<Arc<Device>>, Blocker> {
    let selector = Selector::try_from(c.spec.selector.clone()).map_err(|e| Blocker {
        reason: "InvalidSelector",
        message: format!("spec.selector is not a valid label selector: {e}"),
    })?;
    let ns = &c.metadata.namespace;
    let mut devices: Vec<_> = store
        .state()
        .into_iter()
        .filter(|d| &d.metadata.namespace == ns && selector.matches(ResourceExt::labels(&**d)))
        .collect();
    devices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(devices)
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

/// Fetch and validate everything the campaign needs, and prepare it (encrypt once) with its
/// manifests expiring at `expires_at` (fixed when the campaign was first prepared).
async fn prepare_run(
    c: &UpdateCampaign,
    ctx: &Ctx,
    expires_at: u64,
) -> Result<Result<CampaignRun, Blocker>, Error> {
    let ns = c.namespace().unwrap_or_default();
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let spec = &c.spec;
    let Some(secret) = get_opt::<Secret>(&ctx.client, &ns, &spec.manager_secret_name).await? else {
        return Ok(Err(Blocker {
            reason: "ManagerSecretMissing",
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
    let payload = if let Some(fw) = &spec.payload.firmware {
        let image = if let Some(r) = &fw.config_map_key_ref {
            match get_opt::<ConfigMap>(&ctx.client, &ns, &r.name).await? {
                Some(cm) => inputs::firmware_from_config_map(&cm, &r.key),
                None => Err(Blocker {
                    reason: "FirmwareUnreadable",
                    message: format!("ConfigMap {} (spec.payload.firmware.configMapKeyRef) not found; create it with the image under key {:?}", r.name, r.key),
                }),
            }
        } else if let Some(r) = &fw.secret_key_ref {
            match get_opt::<Secret>(&ctx.client, &ns, &r.name).await? {
                Some(s) => inputs::firmware_from_secret(&s, &r.key),
                None => Err(Blocker {
                    reason: "FirmwareUnreadable",
                    message: format!("Secret {} (spec.payload.firmware.secretKeyRef) not found; create it with the image under key {:?}", r.name, r.key),
                }),
            }
        } else if let Some(u) = &fw.url {
            crate::fetch::fetch(&u.url, Duration::from_secs(120))
                .await
                .map_err(|e| Blocker {
                    reason: "FirmwareUnreadable",
                    message: format!("downloading spec.payload.firmware.url failed: {e}; make the image reachable from the operator or use configMapKeyRef/secretKeyRef"),
                })
        } else {
            Err(Blocker {
                reason: "FirmwareUnreadable",
                message: "spec.payload.firmware names no source; set configMapKeyRef, secretKeyRef or url".into(),
            })
        };
        let image = match image.and_then(|img| {
            inputs::check_digest(
                &img,
                fw.sha256
                    .as_deref()
                    .or(fw.url.as_ref().map(|u| u.sha256.as_str())),
            )
            .map(|()| img)
        }) {
            Ok(img) => img,
            Err(b) => return Ok(Err(b)),
        };
        if let Some(sig) = &fw.release_signature {
            match inputs::release_signature(sig, &image, &spec.target_version) {
                Ok(sig) => release = Some(sig),
                Err(b) => return Ok(Err(b)),
            }
        }
        CampaignPayload::Firmware { image }
    } else if let Some(rot) = &spec.payload.rotate_credentials {
        let Some(ca_secret) = get_opt::<Secret>(&ctx.client, &ns, &rot.ca_secret_name).await?
        else {
            return Ok(Err(Blocker {
                reason: "CaSecretMissing",
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
            reason: "PayloadMissing",
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
    // Encrypting a large image is CPU work: keep it off the async workers.
    let prepared = tokio::task::spawn_blocking(move || PreparedCampaign::prepare(cspec))
        .await
        .map_err(|e| Error::Join(e.to_string()))?;
    let prepared = match prepared {
        Ok(p) => Arc::new(p),
        Err(e) => {
            return Ok(Err(Blocker {
                reason: "PayloadInvalid",
                message: format!("the payload cannot be prepared: {e}"),
            }))
        }
    };
    Ok(Ok(CampaignRun::new(
        uid,
        spec.target_version.clone(),
        prepared,
        ManagerConfig {
            identity: Arc::new(identity),
            trust: Arc::new(trust),
            topics: ctx.engine.topics.clone(),
        },
        spec.allow_downgrade,
    )))
}

async fn publish_event(
    ctx: &Ctx,
    c: &UpdateCampaign,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &c.object_ref(&())).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

async fn apply(c: Arc<UpdateCampaign>, ctx: &Ctx) -> Result<Requeue, Error> {
    let key = key_of(&c)?;
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let now = unix_now();
    let previous = c.status.clone().unwrap_or_default();

    // fetch + validate
    let mut blocker = None;
    let selected = match selected_devices(&c, &ctx.devices) {
        Ok(d) => d,
        Err(b) => {
            blocker = Some(b);
            Vec::new()
        }
    };
    let params = match RolloutParams::from_spec(&c.spec.rollout) {
        Ok(p) => p,
        Err(e) => {
            blocker.get_or_insert(Blocker {
                reason: "InvalidRollout",
                message: e.to_string(),
            });
            RolloutParams::from_spec(&Default::default())
                .map_err(|_| Error::MissingMetadata("rollout defaults"))?
        }
    };
    let stopping = previous.phase.is_terminal() || c.spec.abort;
    // The expiry is fixed the first time the campaign is prepared and recorded on its status
    // before any device starts; a restarted operator prepares again with the recorded one.
    let expires_at =
        recorded_expiry(&previous).unwrap_or_else(|| now + u64::from(c.spec.expires_after_seconds));
    let expired = now >= expires_at;
    if blocker.is_none() && !stopping && !expired && !ctx.engine.has_run(&key, &uid) {
        match prepare_run(&c, ctx, expires_at).await? {
            Ok(run) => {
                tracing::info!(campaign = %key.1, chunks = run.chunk_count(), expires_at, "campaign prepared");
                ctx.engine.insert_run(key.clone(), run);
                if previous.expires_at.is_none() {
                    let mut recorded = previous.clone();
                    recorded.expires_at = Some(k8s_time(expires_at));
                    write_status(&c, &key, &recorded, ctx).await?;
                }
            }
            Err(b) => blocker = Some(b),
        }
    }
    if blocker.is_none() && !stopping {
        if let ConnState::Down(e) = ctx.engine.mqtt.state() {
            blocker = Some(Blocker {
                reason: "BrokerUnavailable",
                message: format!("the MQTT broker refuses or drops the connection ({e}); check --broker-url, TLS material and credentials"),
            });
        }
    }

    // decide
    let progress = ctx.engine.progress_of(&key, &uid, &selected);
    let decision = decide(&DecideInput {
        now,
        devices: &progress,
        params: &params,
        paused: c.spec.paused,
        abort: c.spec.abort,
        previous_phase: previous.phase,
        previous_wave: previous.current_wave,
    });
    tracing::debug!(campaign = %key.1, phase = ?decision.phase, counts = ?decision.counts, starts = decision.start.len(), blocked = ?blocker.as_ref().map(|b| b.reason), "decided");
    let mut phase = decision.phase;
    if blocker.is_some() && phase == CampaignPhase::Progressing {
        phase = CampaignPhase::Pending;
    }
    // Past the expiry nothing of the campaign is installed any more: it fails (reason Expired).
    let expired = if previous.phase.is_terminal() {
        ready_reason(&previous) == Some("Expired")
    } else {
        expired && !phase.is_terminal()
    };
    if expired {
        phase = CampaignPhase::Failed;
    }
    // The campaign says it ended only once the Device statuses it wrote have landed, so whoever
    // reads a finished campaign reads its devices' final records too.
    let settling = phase.is_terminal()
        && !previous.phase.is_terminal()
        && ctx.engine.device_writes_pending() > 0;
    if settling {
        phase = CampaignPhase::Progressing;
    }

    // act
    let names: Vec<String> = selected.iter().map(|d| d.name_any()).collect();
    let mut actions: Vec<Action> =
        ctx.engine
            .apply_timeouts(&key, &names, &decision.timed_out, now);
    if phase.is_terminal() {
        if ctx.engine.has_run(&key, &uid) {
            actions.extend(ctx.engine.end_run(&key, now));
        } else if lock(&ctx.cleaned).insert(uid.clone()) {
            // Ended under an earlier process (or before a restart): clear what the resources say it
            // may have left retained, once per process. The notify topics of a campaign that did
            // not succeed may hold the signed aborts of its devices: those stay.
            actions.extend(recorded_clears(
                &c,
                ctx,
                &uid,
                phase == CampaignPhase::Succeeded,
            ));
        }
    } else if blocker.is_none() && phase == CampaignPhase::Progressing && !decision.start.is_empty()
    {
        actions.extend(
            ctx.engine
                .take_chunk_publishes(&key)
                .into_iter()
                .map(Action::Publish),
        );
        for &(index, attempt) in &decision.start {
            let device = &selected[index];
            match ctx
                .engine
                .start_device(&key, device, attempt, now + params.timeout_secs, now)
            {
                Ok(a) => {
                    tracing::info!(campaign = %key.1, device = %device.name_any(), attempt, "device started");
                    actions.extend(a);
                }
                Err(e) => {
                    tracing::warn!(campaign = %key.1, device = %device.name_any(), error = %e, "cannot start a session for the device");
                }
            }
        }
    }
    ctx.engine.mqtt.execute(actions).await?;

    // status
    let failures: Vec<DeviceFailure> = selected
        .iter()
        .zip(&progress)
        .filter_map(|(d, p)| match p {
            Progress::Failed { reason } => Some(DeviceFailure {
                device: d.name_any(),
                reason: reason.clone(),
                message: d
                    .status
                    .as_ref()
                    .and_then(|s| s.campaign.as_ref())
                    .filter(|r| r.uid == uid && r.phase == DevicePhase::Failed)
                    .and_then(|r| r.message.clone())
                    .unwrap_or_else(|| reason.clone()),
            }),
            _ => None,
        })
        .collect();
    let facts = ctx
        .engine
        .has_run(&key, &uid)
        .then(|| ctx.engine.run_facts(&key))
        .flatten();
    let chunk_count = facts
        .as_ref()
        .map(|f| f.chunk_count)
        .or(previous.chunk_count);
    let release_key_id = facts
        .as_ref()
        .map(|f| f.release_key_id.map(hex::encode))
        .unwrap_or_else(|| previous.release_key_id.clone());
    let recorded_expires_at = facts
        .as_ref()
        .map(|f| k8s_time(f.expires_at))
        .or_else(|| previous.expires_at.clone());
    let status = compute(StatusInput {
        generation: c.metadata.generation,
        phase,
        counts: decision.counts.clone(),
        current_wave: decision.current_wave,
        total_waves: decision.total_waves,
        chunk_count,
        expires_at: recorded_expires_at,
        expired,
        release_key_id,
        failures,
        blocker: blocker.clone(),
        previous: Some(&previous),
        now: k8s_time(now),
    });
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
    let wait = write_status(&c, &key, &status, ctx).await?;
    emit_events(ctx, &c, &previous, &status, blocker.as_ref()).await;

    if phase.is_terminal() {
        // A changed status held back by the rate limit still has to be written once.
        return Ok(wait.map_or_else(Requeue::await_change, Requeue::requeue));
    }
    let due = decision
        .next_due
        .map(|t| Duration::from_secs(t.saturating_sub(now).max(1)))
        .unwrap_or(Duration::from_secs(30));
    let mut after = due.min(Duration::from_secs(if blocker.is_some() { 10 } else { 5 }));
    if settling {
        after = after.min(Duration::from_secs(1));
    }
    if let Some(w) = wait {
        after = after.min(w);
    }
    Ok(Requeue::requeue(after))
}

/// Server-side apply the status when it changed, at most once a second. Returns how long to wait when
/// a changed status was held back by the rate limit.
async fn write_status(
    c: &UpdateCampaign,
    key: &CampaignKey,
    status: &UpdateCampaignStatus,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    {
        let written = lock(&ctx.written);
        let stored = c.status.as_ref();
        match written.get(key) {
            Some((_, last)) if last == status => return Ok(None),
            Some((at, _)) if at.elapsed() < Duration::from_secs(1) => {
                return Ok(Some(Duration::from_secs(1) - at.elapsed()));
            }
            None if stored == Some(status) => return Ok(None),
            _ => {}
        }
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
    lock(&ctx.written).insert(key.clone(), (Instant::now(), status.clone()));
    Ok(None)
}

fn ready_reason(s: &UpdateCampaignStatus) -> Option<&str> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.as_str())
}

async fn emit_events(
    ctx: &Ctx,
    c: &UpdateCampaign,
    previous: &UpdateCampaignStatus,
    status: &UpdateCampaignStatus,
    blocker: Option<&Blocker>,
) {
    if let Some(b) = blocker {
        if ready_reason(previous) != Some(b.reason) {
            publish_event(ctx, c, EventType::Warning, b.reason, b.message.clone()).await;
        }
    }
    if previous.phase != status.phase || previous.observed_generation.is_none() {
        let (t, note) = match status.phase {
            CampaignPhase::Failed | CampaignPhase::Aborted => (
                EventType::Warning,
                format!(
                    "campaign {:?}: {} succeeded, {} failed",
                    status.phase, status.devices.succeeded, status.devices.failed
                ),
            ),
            p => (
                EventType::Normal,
                format!(
                    "campaign {p:?}: {} of {} devices finished",
                    status.devices.succeeded + status.devices.failed,
                    status.devices.selected
                ),
            ),
        };
        publish_event(ctx, c, t, &format!("{:?}", status.phase), note).await;
    }
    if status.current_wave > previous.current_wave && status.phase == CampaignPhase::Progressing {
        publish_event(
            ctx,
            c,
            EventType::Normal,
            "WaveStarted",
            format!(
                "wave {} of {} started",
                status.current_wave + 1,
                status.total_waves
            ),
        )
        .await;
    }
    if status.devices.rolled_back > previous.devices.rolled_back {
        let names: Vec<&str> = status
            .failures
            .iter()
            .filter(|f| f.reason == crate::engine::ROLLED_BACK)
            .map(|f| f.device.as_str())
            .collect();
        publish_event(
            ctx,
            c,
            EventType::Warning,
            "DeviceRolledBack",
            format!(
                "{} devices installed the update, failed their health check and rolled back (signed receipts on their Device status){}",
                status.devices.rolled_back,
                if names.is_empty() {
                    String::new()
                } else {
                    format!(": {}", names.join(", "))
                }
            ),
        )
        .await;
    }
    if status.devices.failed > previous.devices.failed {
        publish_event(
            ctx,
            c,
            EventType::Warning,
            "DeviceFailed",
            format!(
                "{} devices failed so far (see status.failures and Device status)",
                status.devices.failed
            ),
        )
        .await;
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

/// The expiry recorded on a campaign's status (Unix seconds).
fn recorded_expiry(status: &UpdateCampaignStatus) -> Option<u64> {
    status
        .expires_at
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    let mut actions = ctx.engine.remove_run(&key, unix_now());
    actions.extend(recorded_clears(&c, ctx, &uid, true));
    ctx.engine.mqtt.execute(actions).await?;
    lock(&ctx.written).remove(&key);
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
    fn error_backoff_doubles_and_caps() {
        assert_eq!(error_backoff(1), Duration::from_secs(1));
        assert_eq!(error_backoff(2), Duration::from_secs(2));
        assert_eq!(error_backoff(5), Duration::from_secs(16));
        assert_eq!(error_backoff(50), Duration::from_secs(256));
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
                sha256: None,
                release_signature: None,
            }),
            rotate_credentials: None,
        };
        assert!(references_secret(&s, "fw-secret"));
    }
}
