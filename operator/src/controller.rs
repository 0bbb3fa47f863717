//! The `UpdateCampaign` controller (kube-runtime `Controller`), the I/O shell of a reconcile pass.
//! Every replica runs it; what a pass does depends on the replica's part (`Role`):
//!
//! - for each **shard it holds** (its Lease, `membership`), a shard pass over that shard's Devices
//!   (a reflector per shard, label-selected, so a replica watches only its own devices): fetch and
//!   validate, prepare the campaign once with the campaign's seed, weigh the rollout policy over
//!   the shard's devices (`policy_of`, the step one replica takes too: windows, deadline, rate
//!   share, arbitration), release the shard's devices that left the selection and count joiners
//!   and leavers (`follow_members`, as one replica does), decide which of them start or time out
//!   (`rollout::decide` within the shard's assignment), let the engine act, and report the
//!   shard's progress, its plan, what its devices wait for and the health of its devices of the
//!   current wave in its `CampaignShard` (at most once a second, only when it changed);
//! - as **coordinator** (holder of the leader Lease): fix the expiry and the campaign's seed before
//!   any shard starts (a dry run only learns the payload's size), add the shards' reports up
//!   (`coordinate`, pure) into the campaign's phase, counts, wave (held by the gate, judged on
//!   every shard's health reports with the step one replica takes, `judge_gate`), policy status
//!   and each shard's assignment (its share of the wave, of `maxInFlight` and of the rate), write
//!   the status by server-side apply at most once a second and only when it changed, publish
//!   Events, label Devices that carry no bucket label, and on delete clear the campaign's
//!   retained MQTT messages (finalizer).
//!
//! Passes are woken by the campaign, its shards' reports, the shards' Devices and the engine (a
//! device finished), at most four times a second per campaign (`throttle`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, Patch, PatchParams};
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
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::arbitration::{Contender, Standing};
use crate::coordinate::{
    coordinate, hold_for_gate, merge_policy, shard_cutoffs, shard_params, shard_report,
    wave_health, CoordinateInput,
};
use crate::crd::{
    CampaignPhase, Device, DeviceCampaignStatus, DeviceCounts, DeviceFailure, DevicePhase,
    RotationModeSpec, UpdateCampaign, UpdateCampaignStatus, WaitingStatus, FINALIZER,
};
use crate::engine::{Engine, FIELD_MANAGER};
use crate::error::Error;
use crate::firmware::RecordedDigests;
use crate::gates::{self, GateInput, HealthTally};
use crate::inputs;
use crate::mqtt::ConnState;
use crate::plan::{self, PassInput, Wake};
use crate::policy::{self, up_to_date, PolicyInput};
use crate::ramp::{Rate, StartLog};
use crate::reasons::BlockerReason;
use crate::rollout::{decide, wave_cutoffs, DecideInput, Progress, RolloutParams};
use crate::runs::{clear_retained, CampaignKey, CampaignRun, Plan};
use crate::schedule::Calendar;
use crate::shard_crd::{report_name, CampaignShard, CampaignShardSpec, CAMPAIGN_LABEL};
use crate::shards::{relabel, unlabelled_selector, ShardCount, BUCKET_LABEL};
use crate::status::{compute, Blocker, PolicyStatus, StatusInput};
use crate::throttle::{Offer, Throttle};
use crate::time::{k8s_time, unix_now, unix_secs};
use crate::AbortOnDrop;
use crate::{preview, prometheus};

/// How this replica takes part in campaigns.
#[derive(Clone, Debug)]
pub struct Role {
    /// Manager id (the manager certificate's CN).
    pub manager_id: String,
    /// This replica's identity (Leases, Events, reports).
    pub identity: String,
    /// Shards of the deployment.
    pub shards: ShardCount,
    /// Shards whose Lease this replica holds.
    pub held: watch::Receiver<BTreeSet<u32>>,
    /// Whether this replica holds the leader Lease (the coordinator).
    pub coordinating: watch::Receiver<bool>,
}

/// At most this many passes of one campaign per second (see `throttle`).
const PASS_INTERVAL: Duration = Duration::from_millis(250);
/// A shard's report and the campaign's status are written at most this often.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// A running campaign is looked at again at least this often (a safety net: events wake it).
const SAFETY_WAKE: Duration = Duration::from_secs(5);

/// What the coordinator remembers per campaign between passes (one place for all of it).
#[derive(Debug, Default)]
struct Memo {
    /// The status last written and when (the once-a-second limit, and skipping unchanged writes).
    written: Option<(Instant, UpdateCampaignStatus)>,
    /// Consecutive reconcile errors (backoff of the error policy).
    errors: u32,
    /// Consecutive passes blocked by the same transient blocker (its retry backoff).
    blocked_retries: u32,
    /// A dry run's prepared payload size: (uid, bytes of the encrypted chunks).
    planned: Option<(String, u64)>,
}

/// What a shard pass remembers per campaign between passes.
#[derive(Debug, Default)]
struct ShardMemo {
    /// The report last written and when.
    reported: Option<(Instant, CampaignShardSpec)>,
    /// The selected Devices, kept until the shard's Devices or the campaign's spec change.
    selection: Option<Selection>,
    /// The uid whose leftovers this process cleared for the shard (an ended campaign's retained
    /// messages).
    cleaned: Option<String>,
    /// The shard's starts of the last minute (its share of the rate).
    starts: StartLog,
    /// When this process last started one of the shard's devices (unix seconds).
    last_start: Option<u64>,
    /// The devices selected at the last pass (late joiners and leavers are told apart by it) and
    /// the running totals of both: kept here, not added to the last written status or report, so
    /// a pass whose write is held back by the rate limit loses no count.
    members: Option<Members>,
}

/// The Devices of a shard a campaign selects, sorted by name (the wave order).
#[derive(Debug)]
struct Selection {
    stamp: SelectionStamp,
    devices: Selected,
    /// The shard's count of applied watch events when `devices` were taken from its store:
    /// while it has not moved, they are the store's versions.
    applied: u64,
}

impl Selection {
    /// This selection for a pass made as `stamp` says, reading `view`: `None` when it was made
    /// under another stamp. A status write replaces a Device without moving the epoch, so when
    /// the store applied events since, the same Devices are taken as the store holds them now
    /// (kept here too), and the memo keeps no second copy of each beside the store's; when it
    /// applied none, they are returned as they are (no pass over the shard).
    fn reuse(&mut self, stamp: SelectionStamp, view: &ShardView) -> Option<Selected> {
        if self.stamp != stamp {
            return None;
        }
        if self.applied != view.applied {
            self.devices = current_versions(&self.devices, &view.store);
            self.applied = view.applied;
        }
        Some(self.devices.clone())
    }
}

/// The Devices of one held shard: a reflector selecting the shard's buckets.
struct ShardDevices {
    store: Store<Device>,
    /// Bumped when a Device of the shard comes, goes, or changes its labels or spec.
    epoch: Arc<AtomicU64>,
    /// Bumped for every watch event the store applied (a status write too).
    applied: Arc<AtomicU64>,
    /// The first list is in.
    ready: Arc<AtomicBool>,
    _reflector: AbortOnDrop<()>,
}

/// Shared state of one controller (one watched namespace, or all).
struct Ctx {
    client: Client,
    engine: Arc<Engine>,
    role: Role,
    namespace: Option<String>,
    recorder: Recorder,
    shard_devices: Mutex<BTreeMap<u32, ShardDevices>>,
    reports: Store<CampaignShard>,
    campaigns: Store<UpdateCampaign>,
    memo: Mutex<HashMap<CampaignKey, Memo>>,
    shard_memo: Mutex<HashMap<(CampaignKey, u32), ShardMemo>>,
    /// Requests to reconcile a campaign (throttled before they reach the controller).
    wake: mpsc::UnboundedSender<ObjectRef<UpdateCampaign>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Devices one pass decides for, sorted by name (the wave order).
type Selected = Arc<Vec<Arc<Device>>>;

/// What a selection was made from: the shard's Device epoch (bumped when a Device comes, goes,
/// or changes labels or spec) and the campaign's generation. Two passes with the same stamp
/// select the same Devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SelectionStamp {
    epoch: u64,
    generation: Option<i64>,
}

/// Late joiners and leavers of one campaign (or one shard of it), as this process saw them.
#[derive(Debug, Default)]
struct Members {
    /// The selection the last pass counted and its stamp (`None` before the first). It shares
    /// the Devices with the reflector's store: no name is copied.
    last: Option<(SelectionStamp, Selected)>,
    /// Devices that started matching while the campaign ran, in total (from the status on the
    /// first pass of this process).
    joined: u32,
    /// Devices that stopped matching or were deleted while it ran, in total.
    left: u32,
}

impl Members {
    /// Whether the last pass counted a selection with this `stamp`: then no device joined or
    /// left since, and the run has no device outside the selection to release.
    fn counted(&self, stamp: SelectionStamp) -> bool {
        self.last.as_ref().is_some_and(|(l, _)| *l == stamp)
    }

    /// The selection counted with `stamp` is now `current` (the same Devices, newer versions):
    /// keep that, not the versions it was counted with.
    fn follow_versions(&mut self, stamp: SelectionStamp, current: &Selected) {
        if let Some((_, selected)) = self.last.as_mut().filter(|(s, _)| *s == stamp) {
            *selected = current.clone();
        }
    }

    /// The running totals (joined, left).
    fn totals(&self) -> (u32, u32) {
        (self.joined, self.left)
    }

    /// Count this pass's selection (`selected`, made as `stamp` says; `released`: devices the
    /// run let go of) against the last pass's while the campaign is `running`; returns the
    /// totals (joined, left).
    fn step(
        &mut self,
        (stamp, selected): (SelectionStamp, &Selected),
        running: bool,
        released: usize,
    ) -> (u32, u32) {
        if self.counted(stamp) {
            return self.totals();
        }
        let (joined, left) = match (&self.last, running) {
            (Some((_, before)), true) => {
                let before = names_of(before);
                let now = names_of(selected);
                (
                    now.difference(&before).count() as u32,
                    before.difference(&now).count() as u32,
                )
            }
            _ => (0, 0),
        };
        self.last = Some((stamp, selected.clone()));
        self.joined += joined;
        self.left += left.max(released as u32);
        self.totals()
    }
}

/// The names of `devices`, borrowed.
fn names_of(devices: &[Arc<Device>]) -> HashSet<&str> {
    devices
        .iter()
        .filter_map(|d| d.metadata.name.as_deref())
        .collect()
}

impl Ctx {
    fn memo<T>(&self, key: &CampaignKey, f: impl FnOnce(&mut Memo) -> T) -> T {
        f(lock(&self.memo).entry(key.clone()).or_default())
    }

    fn shard_memo<T>(
        &self,
        key: &CampaignKey,
        shard: u32,
        f: impl FnOnce(&mut ShardMemo) -> T,
    ) -> T {
        f(lock(&self.shard_memo)
            .entry((key.clone(), shard))
            .or_default())
    }

    fn coordinating(&self) -> bool {
        *self.role.coordinating.borrow()
    }

    /// Wake every campaign selecting `device` (or every campaign).
    fn wake_selecting(&self, device: Option<&Device>) {
        for c in self.campaigns.state() {
            if device.is_none_or(|d| selects(&c, d)) {
                let _ = self.wake.send(ObjectRef::from_obj(&*c));
            }
        }
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
        || c.spec.payload.firmware.as_ref().is_some_and(|f| {
            std::iter::once(&f.secret_key_ref)
                .chain(f.deltas.iter().map(|d| &d.secret_key_ref))
                .any(|r| r.as_ref().is_some_and(|r| r.name == name))
        })
        || c.spec
            .payload
            .rotate_credentials
            .as_ref()
            .is_some_and(|r| r.ca_secret_name == name)
}

fn references_config_map(c: &UpdateCampaign, name: &str) -> bool {
    c.spec.payload.firmware.as_ref().is_some_and(|f| {
        std::iter::once(&f.config_map_key_ref)
            .chain(f.deltas.iter().map(|d| &d.config_map_key_ref))
            .any(|r| r.as_ref().is_some_and(|r| r.name == name))
    })
}

/// Device objects as the shard reflectors keep them: without what no decision and no status write
/// reads (the apiserver keeps it all): the managed fields, the annotations (kubectl's and GitOps
/// tools' last-applied copy of the object among them), the receipt (a kilobyte and a half of
/// base64) and the conditions' messages (a write reads only a condition's type, status and
/// transition time, see `device_status::device_status`).
fn slim(d: &mut Device) {
    d.managed_fields_mut().clear();
    d.metadata.annotations = None;
    if let Some(s) = d.status.as_mut() {
        if let Some(c) = s.campaign.as_mut() {
            c.receipt = None;
        }
        for c in &mut s.conditions {
            c.message = String::new();
        }
    }
}

/// Labels a Device with its bucket (a merge patch of one label).
async fn label_bucket(client: &Client, d: &Device, bucket: &str) {
    let (Some(ns), Some(name)) = (d.metadata.namespace.as_deref(), d.metadata.name.as_deref())
    else {
        return;
    };
    let patch = serde_json::json!({"metadata": {"labels": {BUCKET_LABEL: bucket}}});
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    if let Err(e) = Api::<Device>::namespaced(client.clone(), ns)
        .patch(name, &pp, &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(device = %name, error = %e, "cannot label the device with its bucket");
    }
}

/// Whether a watch event changes what selection reads from `known` (the store before the event is
/// applied): a Device new or gone, its generation (its spec) or its labels; a relist.
fn changes_selection_of(known: &Store<Device>, event: &watcher::Event<Device>) -> bool {
    match event {
        watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
            known.get(&ObjectRef::from_obj(d)).is_none_or(|old| {
                old.metadata.generation != d.metadata.generation
                    || old.metadata.labels != d.metadata.labels
            })
        }
        watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone => true,
    }
}

/// Keep shard `shard`'s Devices: a reflector over its buckets, whose events bump the shard's epoch
/// (a Device came, went, or changed labels or spec), relabel Devices whose bucket label is wrong,
/// and wake the campaigns that select the Device.
fn shard_reflector(ctx: &Arc<Ctx>, shard: u32) -> ShardDevices {
    let (store, writer) = reflector::store();
    let epoch = Arc::new(AtomicU64::new(0));
    let applied = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let mut config = watcher::Config::default();
    if let Some(selector) = ctx.role.shards.selector(shard) {
        config = config.labels(&selector);
    }
    // The epoch moves when what selection reads (a Device's generation and labels) changed: the
    // event is compared with the store before the reflector applies it, and the epoch moved
    // after (a selection read under the new epoch sees the change). A relist is applied at its
    // end, which moves the epoch too.
    let changes_selection = Arc::new(AtomicBool::new(false));
    let compare = {
        let (known, changes_selection) = (store.clone(), changes_selection.clone());
        move |event: &watcher::Event<Device>| {
            changes_selection.store(changes_selection_of(&known, event), Ordering::Release);
        }
    };
    let stream = reflector(
        writer,
        watcher(api::<Device>(&ctx.client, ctx.namespace.as_deref()), config)
            .modify(slim)
            .inspect_ok(compare),
    )
    .default_backoff();
    let task = {
        let (ctx, epoch, ready) = (Arc::downgrade(ctx), epoch.clone(), ready.clone());
        let applied = applied.clone();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                // The store holds this event now.
                if changes_selection.swap(false, Ordering::AcqRel) {
                    epoch.fetch_add(1, Ordering::Release);
                }
                if event.is_ok() {
                    applied.fetch_add(1, Ordering::Release);
                }
                let Some(ctx) = ctx.upgrade() else { return };
                match event {
                    Ok(watcher::Event::Apply(d)) | Ok(watcher::Event::InitApply(d)) => {
                        if ctx.role.shards.get() > 1 {
                            if let Some(bucket) =
                                relabel(&d.device_id(), d.metadata.labels.as_ref())
                            {
                                let client = ctx.client.clone();
                                tokio::spawn(
                                    async move { label_bucket(&client, &d, &bucket).await },
                                );
                                continue;
                            }
                        }
                        if ready.load(Ordering::Acquire) {
                            ctx.wake_selecting(Some(&d));
                        }
                    }
                    Ok(watcher::Event::Delete(d)) => ctx.wake_selecting(Some(&d)),
                    Ok(watcher::Event::Init) => {}
                    Ok(watcher::Event::InitDone) => {
                        ready.store(true, Ordering::Release);
                        ctx.wake_selecting(None);
                    }
                    Err(e) => tracing::debug!(shard, error = %e, "shard device watch"),
                }
            }
        })
    };
    ShardDevices {
        store,
        epoch,
        applied,
        ready,
        _reflector: AbortOnDrop(task),
    }
}

/// Follow the shards this replica holds: a reflector per held shard, started when its Lease is
/// taken and stopped when it is lost; every campaign is woken when the set changes.
async fn follow_shards(ctx: Arc<Ctx>) {
    let mut held = ctx.role.held.clone();
    loop {
        let now: BTreeSet<u32> = held.borrow_and_update().clone();
        {
            let mut shard_devices = lock(&ctx.shard_devices);
            shard_devices.retain(|k, _| now.contains(k));
            for &k in &now {
                shard_devices
                    .entry(k)
                    .or_insert_with(|| shard_reflector(&ctx, k));
            }
        }
        lock(&ctx.shard_memo).retain(|(_, k), _| now.contains(k));
        ctx.wake_selecting(None);
        if held.changed().await.is_err() {
            return;
        }
    }
}

/// While coordinating (and with more than one shard), label the Devices that carry no bucket label
/// (or a wrong one): no shard reflector sees them until they do.
async fn label_unlabelled(ctx: Arc<Ctx>) {
    if ctx.role.shards.get() == 1 {
        return;
    }
    let mut coordinating = ctx.role.coordinating.clone();
    loop {
        if !*coordinating.borrow_and_update() {
            if coordinating.changed().await.is_err() {
                return;
            }
            continue;
        }
        let config = watcher::Config::default().labels(&unlabelled_selector());
        let stream = watcher(api::<Device>(&ctx.client, ctx.namespace.as_deref()), config)
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(d)) => {
                        if let Some(bucket) = relabel(&d.device_id(), d.metadata.labels.as_ref()) {
                            label_bucket(&ctx.client, &d, &bucket).await;
                        }
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "unlabelled device watch"),
                    None => break,
                },
                changed = coordinating.changed() => {
                    if changed.is_err() { return; }
                    if !*coordinating.borrow() { break; }
                }
            }
        }
    }
}

/// Pass campaign wake-ups on to the controller, at most one per campaign per [`PASS_INTERVAL`].
async fn throttle_wakes(
    mut input: mpsc::UnboundedReceiver<ObjectRef<UpdateCampaign>>,
    output: mpsc::UnboundedSender<ObjectRef<UpdateCampaign>>,
) {
    let mut throttle = Throttle::new(PASS_INTERVAL);
    let (fired_tx, mut fired) = mpsc::unbounded_channel::<ObjectRef<UpdateCampaign>>();
    let mut pruned = Instant::now();
    loop {
        tokio::select! {
            next = input.recv() => {
                let Some(r) = next else { return };
                match throttle.offer(&r, Instant::now()) {
                    Offer::Now => {
                        if output.send(r).is_err() { return; }
                    }
                    Offer::Later(after) => {
                        let fired_tx = fired_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(after).await;
                            let _ = fired_tx.send(r);
                        });
                    }
                    Offer::Folded => {}
                }
            }
            Some(r) = fired.recv() => {
                throttle.fire(&r, Instant::now());
                if output.send(r).is_err() { return; }
            }
        }
        if pruned.elapsed() > Duration::from_secs(60) {
            throttle.prune(Instant::now());
            pruned = Instant::now();
        }
    }
}

/// Run the controller for one namespace (`None`: all namespaces) until the future is dropped.
/// `finished` carries the campaigns whose device finished (from the engine).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    engine: Arc<Engine>,
    role: Role,
    mut finished: mpsc::UnboundedReceiver<CampaignKey>,
) {
    let ns = namespace.as_deref();
    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let (trigger_tx, mut trigger_rx) = mpsc::unbounded_channel();
    let (report_store, report_writer) = reflector::store();
    let reports = reflector(
        report_writer,
        watcher(
            api::<CampaignShard>(&client, ns),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let controller = Controller::new(
        api::<UpdateCampaign>(&client, ns),
        watcher::Config::default(),
    );
    let campaigns = controller.store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sealed-ota-operator".into(),
            instance: Some(role.identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        engine,
        role,
        namespace: namespace.clone(),
        recorder,
        shard_devices: Mutex::new(BTreeMap::new()),
        reports: report_store,
        campaigns,
        memo: Mutex::new(HashMap::new()),
        shard_memo: Mutex::new(HashMap::new()),
        wake: wake_tx.clone(),
    });
    let _shards = AbortOnDrop(tokio::spawn(follow_shards(ctx.clone())));
    let _labeller = AbortOnDrop(tokio::spawn(label_unlabelled(ctx.clone())));
    let _throttle = AbortOnDrop(tokio::spawn(throttle_wakes(wake_rx, trigger_tx)));
    let _finished = {
        let wake = wake_tx.clone();
        AbortOnDrop(tokio::spawn(async move {
            while let Some((ns, name)) = finished.recv().await {
                let _ = wake.send(ObjectRef::new(&name).within(&ns));
            }
        }))
    };
    let _coordinating = {
        let ctx = ctx.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut coordinating = ctx.role.coordinating.clone();
            while coordinating.changed().await.is_ok() {
                ctx.wake_selecting(None);
            }
        }))
    };
    let reports = {
        let wake = wake_tx.clone();
        reports.for_each(move |r| {
            if let Ok(r) = r {
                if let Some(ns) = r.namespace() {
                    let _ = wake.send(ObjectRef::new(&r.spec.campaign).within(&ns));
                }
            }
            futures::future::ready(())
        })
    };
    let controller = controller
        .watches(api::<Secret>(&client, ns), watcher::Config::default(), {
            let campaigns = ctx.campaigns.clone();
            move |s| {
                let name = s.name_any();
                campaigns
                    .state()
                    .into_iter()
                    .filter(|c| c.namespace() == s.namespace() && references_secret(c, &name))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            }
        })
        .watches(api::<ConfigMap>(&client, ns), watcher::Config::default(), {
            let campaigns = ctx.campaigns.clone();
            move |m| {
                let name = m.name_any();
                campaigns
                    .state()
                    .into_iter()
                    .filter(|c| c.namespace() == m.namespace() && references_config_map(c, &name))
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            }
        })
        .reconcile_on(futures::stream::poll_fn(move |cx| trigger_rx.poll_recv(cx)))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile loop");
            }
            futures::future::ready(())
        });
    futures::join!(reports, controller);
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
    // A pass reads the campaign cache (rivals): before its initial list is in it holds too few
    // campaigns, so no pass runs before. (The Devices of a shard wait for theirs: `shard_view`.)
    synced(&ctx.campaigns, "UpdateCampaign").await?;
    ctx.engine.metrics.reconciliations.inc();
    let ns = c.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let key = key_of(&c)?;
    let result = if ctx.coordinating() {
        let api: Api<UpdateCampaign> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, c, |ev| async {
            match ev {
                FinalizerEvent::Apply(c) => apply(c, &ctx).await,
                FinalizerEvent::Cleanup(c) => cleanup(c, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    } else if c.metadata.deletion_timestamp.is_some() {
        // The coordinator clears what the campaign left retained; this replica forgets its part.
        ctx.engine
            .remove_run(&key)
            .await
            .map(|()| Requeue::await_change())
    } else {
        apply(c, &ctx).await
    };
    if result.is_ok() {
        ctx.memo(&key, |m| m.errors = 0);
    }
    result
}

/// Returns once `store` holds its watch's initial list (at once after that); the reflector filling
/// it runs beside the controller (`run`).
async fn synced<K>(store: &Store<K>, kind: &'static str) -> Result<(), Error>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheStopped(kind))
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

/// When to look at the campaign again: the earliest of the wishes (`None` is "only on a change").
fn earliest(wakes: impl IntoIterator<Item = Option<Duration>>) -> Requeue {
    match wakes.into_iter().flatten().min() {
        Some(d) => Requeue::requeue(d.max(Duration::from_millis(100))),
        None => Requeue::await_change(),
    }
}

#[tracing::instrument(skip_all, fields(namespace = %c.namespace().unwrap_or_default(), campaign = %c.name_any()))]
async fn apply(c: Arc<UpdateCampaign>, ctx: &Ctx) -> Result<Requeue, Error> {
    if ctx.role.shards == ShardCount::ONE {
        // One shard: the coordinator holds it too (see `run` in lib.rs) and runs the whole pass.
        return match shard_view(ctx, 0) {
            Some(view) if ctx.coordinating() => single_pass(&c, view, ctx).await,
            // Its Devices are still being listed: the reflector wakes the campaign when they are in.
            _ => Ok(Requeue::await_change()),
        };
    }
    let mut status = c.status.clone().unwrap_or_default();
    let mut wakes = Vec::new();
    if ctx.coordinating() {
        let (coordinated, wake) = coordinator_pass(&c, ctx).await?;
        status = coordinated;
        wakes.push(wake);
    }
    let held: Vec<u32> = ctx.role.held.borrow().iter().copied().collect();
    for shard in held {
        wakes.push(shard_pass(&c, &status, shard, ctx).await?);
    }
    Ok(earliest(wakes))
}

/// What validation of the campaign's own spec found (pure): its rollout parameters and schedule
/// (the defaults, always open, when they do not parse: then the blocker says so) and the first
/// problem.
fn validate_spec(c: &UpdateCampaign) -> (RolloutParams, Calendar, Option<Blocker>) {
    let mut blocker = Selector::try_from(c.spec.selector.clone())
        .err()
        .map(|e| Blocker {
            reason: BlockerReason::InvalidSelector,
            message: format!("spec.selector is not a valid label selector: {e}"),
        });
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
    if let Some(Err(b)) = c
        .spec
        .payload
        .firmware
        .as_ref()
        .map(|fw| crate::deltas::validate(fw, &c.spec.target_version))
    {
        blocker.get_or_insert(b);
    }
    (params, calendar, blocker)
}

/// The Devices of shard `shard` the campaign selects, sorted by name (the wave order): from the
/// shard's reflector, recomputed only when its Devices or the campaign's spec changed.
fn selection(
    c: &UpdateCampaign,
    key: &CampaignKey,
    shard: u32,
    view: &ShardView,
    ctx: &Ctx,
) -> (SelectionStamp, Selected) {
    let store = &view.store;
    let stamp = SelectionStamp {
        epoch: view.epoch,
        generation: c.metadata.generation,
    };
    if let Some(current) = ctx.shard_memo(key, shard, |m| {
        let current = m.selection.as_mut()?.reuse(stamp, view)?;
        if let Some(members) = m.members.as_mut() {
            members.follow_versions(stamp, &current);
        }
        Some(current)
    }) {
        return (stamp, current);
    }
    let shards = ctx.role.shards;
    let devices = Arc::new(select(c, store.state(), |d| {
        shards.get() == 1 || shards.of_device(&d.device_id()) == shard
    }));
    ctx.shard_memo(key, shard, |m| {
        m.selection = Some(Selection {
            stamp,
            devices: devices.clone(),
            applied: view.applied,
        })
    });
    (stamp, devices)
}

/// `selected` with each Device as `store` holds it now (same Devices, same order; one the store no
/// longer holds stays as it was).
fn current_versions(selected: &Selected, store: &Store<Device>) -> Selected {
    if selected.is_empty() {
        return selected.clone();
    }
    let state = store.state();
    let now: HashMap<(Option<&str>, &str), &Arc<Device>> = state
        .iter()
        .filter_map(|d| {
            Some((
                (d.metadata.namespace.as_deref(), d.metadata.name.as_deref()?),
                d,
            ))
        })
        .collect();
    Arc::new(
        selected
            .iter()
            .map(|d| {
                d.metadata
                    .name
                    .as_deref()
                    .and_then(|name| now.get(&(d.metadata.namespace.as_deref(), name)))
                    .map_or_else(|| d.clone(), |&current| current.clone())
            })
            .collect(),
    )
}

/// The `devices` the campaign's selector picks in its namespace (and `keep` keeps), sorted by
/// name: the wave order. None when the selector does not parse (`validate_spec` names the
/// problem). Pure; selecting compares and sorts in place rather than cloning names and labels.
fn select(
    c: &UpdateCampaign,
    devices: Vec<Arc<Device>>,
    keep: impl Fn(&Device) -> bool,
) -> Vec<Arc<Device>> {
    let Ok(selector) = Selector::try_from(c.spec.selector.clone()) else {
        return Vec::new();
    };
    let mut selected: Vec<_> = devices
        .into_iter()
        .filter(|d| {
            d.metadata.namespace == c.metadata.namespace
                && selector.matches(ResourceExt::labels(&**d))
                && keep(d)
        })
        .collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    selected
}

/// What validation of a campaign found in the single-replica mode (pure).
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
    let (params, calendar, blocker) = validate_spec(c);
    let selected = select(c, devices, |_| true);
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

/// Release the run's devices of shard `shard` that left the campaign's `selected` (stopped
/// matching, or were deleted: a session in flight ends with the signed abort) and count the
/// joiners and leavers while it runs (`Members::step`), for one shard or several; `before` is the
/// phase and counts as last written (the totals a new process starts from). Returns the totals.
/// A pass over the selection the last pass counted costs nothing here: it is the common case
/// (a pass woken by a device's message), and looking at every device of a large fleet on each
/// such pass made the operator's cost per device grow with the fleet (docs/scale.md).
async fn follow_members(
    key: &CampaignKey,
    shard: u32,
    (stamp, selected): (SelectionStamp, &Selected),
    (store, ns): (&Store<Device>, &str),
    (phase, before): (CampaignPhase, &DeviceCounts),
    ctx: &Ctx,
) -> Result<(u32, u32), Error> {
    let counted = ctx.shard_memo(key, shard, |m| {
        m.members
            .as_ref()
            .filter(|members| members.counted(stamp))
            .map(Members::totals)
    });
    if let Some(totals) = counted {
        return Ok(totals);
    }
    let shards = ctx.role.shards;
    let released = ctx
        .engine
        .release(
            key,
            &names_of(selected),
            |id| shards.get() == 1 || shards.of_device(id) == shard,
            |n| store.get(&ObjectRef::new(n).within(ns)).is_some(),
        )
        .await?;
    let running = matches!(phase, CampaignPhase::Progressing | CampaignPhase::Paused);
    Ok(ctx.shard_memo(key, shard, |m| {
        m.members
            .get_or_insert(Members {
                last: None,
                joined: before.joined,
                left: before.left,
            })
            .step((stamp, selected), running, released.len())
    }))
}

/// The gate after a finished wave, for one replica or the coordinator of several: run the
/// metric query when the gate judges now, then `gates::step` with the wave's `health`.
async fn judge_gate(
    c: &UpdateCampaign,
    previous: &UpdateCampaignStatus,
    awaiting: Option<u32>,
    health: impl FnOnce(u32) -> HealthTally,
    now: u64,
) -> Option<gates::GateOutcome> {
    let spec = c.spec.rollout.gate.as_ref()?;
    if previous.phase.is_terminal() {
        return None;
    }
    let metric = match (
        &spec.metrics,
        gates::needs_metric(spec, previous.gate.as_ref(), awaiting, now),
    ) {
        (Some(m), true) => Some(prometheus::instant_query(&m.prometheus_url, &m.query).await),
        _ => None,
    };
    Some(gates::step(&GateInput {
        spec,
        previous: previous.gate.as_ref(),
        promoted_through: c.spec.promote_through_wave,
        awaiting,
        now,
        health: awaiting.map(health).unwrap_or_default(),
        metric,
    }))
}

/// What the policy status says about the gate (pure): its state, why it failed, and the wait
/// for it while a finished wave awaits it.
fn show_gate(
    policy_status: &mut PolicyStatus,
    gate: Option<&gates::GateOutcome>,
    awaiting: Option<u32>,
    previous: &UpdateCampaignStatus,
) {
    let Some(g) = gate else {
        policy_status.gate = previous.gate.clone();
        return;
    };
    policy_status.gate = g.status.clone();
    policy_status.gate_failed = g.failed.as_ref().map(|f| f.1.clone());
    if policy_status.waiting.is_none() && awaiting.is_some() && g.failed.is_none() {
        policy_status.waiting = g.status.as_ref().map(|s| WaitingStatus {
            reason: "Gate".into(),
            message: s.message.clone(),
            until: s.soak_until.clone().filter(|_| s.state == gates::SOAKING),
        });
    }
}

/// When to look at the gate again: at the soak's end, or right away when it just opened a wave.
fn gate_wake(
    gate: Option<&gates::GateOutcome>,
    previous: &UpdateCampaignStatus,
    now: u64,
) -> Option<u64> {
    let g = gate?;
    let opened = g
        .status
        .as_ref()
        .is_some_and(|s| s.passed_waves > previous.gate.as_ref().map_or(0, |p| p.passed_waves));
    if opened {
        Some(now)
    } else {
        g.due
    }
}

/// The devices one pass decides for (the whole fleet with one shard, a held shard's with
/// several) and what the policy weighs them against.
struct PolicyScope<'a> {
    /// Shard index (its start log keeps the rate).
    shard: u32,
    /// The scope's selected Devices, in wave order.
    selected: &'a [Arc<Device>],
    /// Their progress before this pass.
    progress: &'a [Progress],
    /// The campaign's schedule (validated).
    calendar: &'a Calendar,
    /// The campaign's status as stored (with several shards: as the coordinator wrote it).
    previous: &'a UpdateCampaignStatus,
    /// The scope's share of the rate when it is one shard of several (the coordinator's
    /// assignment, `coordinate::rate_shares`).
    rate_share: Option<u32>,
}

/// The rollout policy's say over one pass (issue 15: windows, deadline, rate, arbitration with
/// the other running campaigns), the same for one shard or several: `policy::assess` over the
/// scope's devices, with the scope's own start log.
fn policy_of(
    c: &UpdateCampaign,
    key: &CampaignKey,
    ctx: &Ctx,
    scope: &PolicyScope<'_>,
    now: u64,
) -> policy::PolicyDecision {
    let others = rivals_of(c, &ctx.campaigns, &ctx.engine);
    let rivals: Vec<Vec<(Contender<'_>, Standing)>> = if others.is_empty() {
        Vec::new()
    } else {
        scope
            .selected
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
    ctx.shard_memo(key, scope.shard, |m| {
        policy::assess(
            &PolicyInput {
                now,
                spec: &c.spec,
                me: contender(c),
                devices: scope.selected,
                progress: scope.progress,
                rivals: &rivals,
                calendar: scope.calendar,
                previous: scope.previous,
                rate_share: scope.rate_share,
            },
            &mut m.starts,
        )
    })
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

/// How many of a wave's devices (`devices`, with their `progress`) the campaign updated, and of
/// them how many sent a healthy report (the gate's device-health check).
fn health_tally(
    key: &CampaignKey,
    uid: &str,
    devices: &[Arc<Device>],
    progress: &[Progress],
    engine: &Engine,
) -> HealthTally {
    let mut tally = HealthTally::default();
    for (d, p) in devices.iter().zip(progress) {
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

/// A campaign prepared for its run, and the OCI digests its references resolved to.
struct Prepared {
    run: CampaignRun,
    oci_digest: Option<String>,
    /// Each OCI delta base's, by fromVersion.
    delta_oci_digests: BTreeMap<String, String>,
}

/// Fetch and validate everything the campaign needs, and prepare it (encrypt once, chunk by
/// chunk into the cache directory: `firmware::prepare`) with its manifests expiring at
/// `expires_at` (fixed when the campaign was first prepared) and its content key from the
/// campaign's `seed` (every replica prepares the same chunks). An OCI reference is pinned to
/// what the first preparation resolved it to (`recorded`), the image's and every delta base's.
async fn prepare_run(
    c: &UpdateCampaign,
    ctx: &Ctx,
    expires_at: u64,
    seed: Zeroizing<[u8; 32]>,
    recorded: RecordedDigests<'_>,
) -> Result<Result<Prepared, Blocker>, Error> {
    let ns = c.namespace().unwrap_or_default();
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let spec = &c.spec;
    let (identity, trust) = match manager_identity(c, ctx).await? {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    let mut release = None;
    let mut chunks = None;
    let mut deltas = Vec::new();
    let mut full_image = (0, [0; 32]);
    let mut oci_digest = None;
    let mut delta_oci_digests = BTreeMap::new();
    let payload = if let Some(fw) = &spec.payload.firmware {
        let settings = &ctx.engine.firmware;
        let image = match crate::firmware::prepare(
            settings,
            &ctx.client,
            &ns,
            &uid,
            fw,
            spec.chunk_size,
            recorded,
            crate::firmware::Seed {
                seed: &seed,
                target_version: &spec.target_version,
            },
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
        delta_oci_digests = image.delta_resolved_digests;
        chunks = Some(image.chunks);
        deltas = image.deltas;
        full_image = (image.sealed.size(), image.sealed.sha256());
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
    let delta_release = release.clone();
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
    // Each delta: its own prepared campaign (its stream id), sealed like the image.
    for d in deltas {
        let base_version = d.manifest.base_version.clone();
        let dspec = CampaignSpec {
            campaign_id: d.stream_id,
            target_version: spec.target_version.clone(),
            payload: CampaignPayload::SealedDelta {
                sealed: d.sealed,
                delta: d.manifest,
                image_size: full_image.0,
                image_sha256: full_image.1,
            },
            expires_at,
            chunk_size: spec.chunk_size,
            release: delta_release.clone(),
        };
        let prepared = match PreparedCampaign::prepare(dspec) {
            Ok(p) if p.chunk_count() > capacity => p.served_on_request(),
            Ok(p) => p,
            Err(e) => {
                return Ok(Err(Blocker {
                    reason: BlockerReason::PayloadInvalid,
                    message: format!("the delta from {base_version} (spec.payload.firmware.deltas) cannot be prepared: {e}"),
                }))
            }
        };
        run = run.with_delta(
            base_version,
            Arc::new(prepared),
            Arc::new(d.chunks),
            capacity,
        );
    }
    Ok(Ok(Prepared {
        run,
        oci_digest,
        delta_oci_digests,
    }))
}

/// The manager identity (and the CA it trusts) of the campaign's manager Secret, or what is wrong
/// with it.
async fn manager_identity(
    c: &UpdateCampaign,
    ctx: &Ctx,
) -> Result<
    Result<
        (
            sealed_ota_protocol::Identity,
            sealed_ota_protocol::TrustAnchor,
        ),
        Blocker,
    >,
    Error,
> {
    let ns = c.namespace().unwrap_or_default();
    let name = &c.spec.manager_secret_name;
    Ok(match get_opt::<Secret>(&ctx.client, &ns, name).await? {
        Some(secret) => inputs::manager_identity(&secret, &ctx.role.manager_id),
        None => Err(Blocker {
            reason: BlockerReason::ManagerSecretMissing,
            message: format!(
                "Secret {name} (spec.managerSecretName) not found in namespace {ns}: create a kubernetes.io/tls Secret with tls.crt, tls.key (manager certificate with CN {}) and ca.crt",
                ctx.role.manager_id
            ),
        }),
    })
}

/// The campaign's content seed from its status (`status.sealedSeed`, sealed to the manager key by
/// the coordinator): every replica derives the same content key from it.
async fn open_seed(
    c: &UpdateCampaign,
    ctx: &Ctx,
    uid: &str,
    sealed: &str,
) -> Result<Result<Zeroizing<[u8; 32]>, Blocker>, Error> {
    use base64::Engine as _;
    let identity = match manager_identity(c, ctx).await? {
        Ok((identity, _)) => identity,
        Err(b) => return Ok(Err(b)),
    };
    let seed = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .ok()
        .and_then(|bytes| identity.open_sealed(uid.as_bytes(), &bytes))
        .and_then(|seed| <[u8; 32]>::try_from(seed.as_slice()).ok())
        .map(Zeroizing::new);
    Ok(seed.ok_or_else(|| Blocker {
        reason: BlockerReason::ManagerSecretInvalid,
        message: format!(
            "status.sealedSeed does not open with the key of Secret {} (spec.managerSecretName): the manager key changed while the campaign ran; create a new campaign",
            c.spec.manager_secret_name
        ),
    }))
}

/// A dry run's payload, prepared once per campaign uid only to learn what it weighs (the plan's
/// broker estimate): nothing is kept or published. Returns what blocks it, if anything.
async fn plan_payload(
    c: &UpdateCampaign,
    ctx: &Ctx,
    key: &CampaignKey,
    uid: &str,
    expires_at: u64,
    previous: &UpdateCampaignStatus,
) -> Result<Option<Blocker>, Error> {
    if ctx.memo(key, |m| m.planned.as_ref().is_some_and(|(u, _)| u == uid)) {
        return Ok(None);
    }
    let seed = Zeroizing::new(sealed_ota_protocol::crypto::random::<32>());
    Ok(
        match prepare_run(c, ctx, expires_at, seed, RecordedDigests::of(previous)).await? {
            Ok(Prepared { run, .. }) => {
                let bytes = run.facts().chunk_bytes;
                ctx.memo(key, |m| m.planned = Some((uid.to_owned(), bytes)));
                None
            }
            Err(b) => Some(b),
        },
    )
}

/// The size of the campaign's encrypted chunks: its run's, or what its dry run learned.
fn chunk_bytes(ctx: &Ctx, key: &CampaignKey, uid: &str) -> Option<u64> {
    let facts = ctx
        .engine
        .run_facts(key)
        .filter(|_| ctx.engine.has_run(key, uid));
    facts.map(|f| f.chunk_bytes).or_else(|| {
        ctx.memo(key, |m| {
            m.planned.as_ref().filter(|(u, _)| u == uid).map(|p| p.1)
        })
    })
}

/// The reports of this campaign (this uid, this shard count), by shard index.
fn reports_of(ctx: &Ctx, c: &UpdateCampaign, uid: &str) -> Vec<Option<CampaignShardSpec>> {
    let shards = ctx.role.shards;
    let mut reports = vec![None; shards.get() as usize];
    for r in ctx.reports.state() {
        if r.metadata.namespace == c.metadata.namespace
            && r.spec.campaign_uid == uid
            && r.spec.shards == shards.get()
            && r.spec.shard < shards.get()
        {
            reports[r.spec.shard as usize] = Some(r.spec.clone());
        }
    }
    reports
}

/// The coordinator's pass: fix the expiry and the seed before anything starts, add the shards up,
/// write the status and the Events. Returns the status (written, or held back by the rate limit)
/// for this replica's own shard passes, and when to wake.
async fn coordinator_pass(
    c: &UpdateCampaign,
    ctx: &Ctx,
) -> Result<(UpdateCampaignStatus, Option<Duration>), Error> {
    let key = key_of(c)?;
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let now = unix_now();
    let previous = c.status.clone().unwrap_or_default();
    let dry_run = c.spec.dry_run;
    let (params, calendar, mut blocker) = validate_spec(c);
    // The expiry is fixed the first time the campaign is prepared and recorded on its status
    // before any device starts; every replica then prepares with the recorded one.
    let expires_at = previous
        .expires_at
        .as_ref()
        .and_then(unix_secs)
        .unwrap_or_else(|| now + u64::from(c.spec.expires_after_seconds));
    let expired = now >= expires_at && !dry_run;
    let stopping = previous.phase.is_terminal() || c.spec.abort;
    let mut recorded = previous.clone();
    if blocker.is_none() && !stopping && dry_run {
        blocker = plan_payload(c, ctx, &key, &uid, expires_at, &previous).await?;
    } else if blocker.is_none() && !stopping && !expired && previous.expires_at.is_none() {
        // First preparation: a fresh content seed, sealed to the manager key for the other
        // replicas, and the inputs fetched and checked (the image encrypted once) before the
        // expiry is fixed and any shard starts.
        match manager_identity(c, ctx).await? {
            Err(b) => blocker = Some(b),
            Ok((identity, _)) => {
                use base64::Engine as _;
                let seed = Zeroizing::new(sealed_ota_protocol::crypto::random::<32>());
                let sealed = identity.seal_to_self(uid.as_bytes(), &seed[..]);
                match prepare_run(c, ctx, expires_at, seed, RecordedDigests::of(&previous)).await? {
                    Ok(Prepared {
                        run,
                        oci_digest,
                        delta_oci_digests,
                    }) => {
                        let facts = run.facts();
                        let delta_chunk_counts = run.delta_chunk_counts();
                        tracing::info!(chunks = facts.chunk_count, expires_at, "campaign prepared");
                        if !ctx.engine.has_run(&key, &uid) {
                            ctx.engine.insert_run(key.clone(), run);
                        }
                        recorded.expires_at = Some(k8s_time(expires_at));
                        recorded.chunk_count = Some(facts.chunk_count);
                        recorded.delta_chunk_counts = delta_chunk_counts;
                        recorded.release_key_id = facts.release_key_id.map(hex::encode);
                        recorded.sealed_seed =
                            Some(base64::engine::general_purpose::STANDARD.encode(sealed));
                        recorded.oci_digest = oci_digest;
                        recorded.delta_oci_digests = delta_oci_digests;
                        write_status(c, &key, &recorded, ctx).await?;
                    }
                    Err(b) => blocker = Some(b),
                }
            }
        }
    }
    // The campaign-wide part of the policy: its calendar (the shards weigh their own devices).
    let campaign_policy = policy::assess(
        &PolicyInput {
            now,
            spec: &c.spec,
            me: contender(c),
            devices: &[],
            progress: &[],
            rivals: &[],
            calendar: &calendar,
            previous: &recorded,
            rate_share: None,
        },
        &mut StartLog::default(),
    );
    if blocker.is_none() {
        blocker = campaign_policy.blocker.clone();
    }
    let reports = reports_of(ctx, c, &uid);
    let refs: Vec<Option<&CampaignShardSpec>> = reports.iter().map(Option::as_ref).collect();
    let rate = Rate::from_spec(&c.spec.rollout);
    let mut co = coordinate(&CoordinateInput {
        shards: ctx.role.shards,
        reports: &refs,
        params: &params,
        paused: c.spec.paused,
        abort: c.spec.abort,
        blocker: blocker.as_ref(),
        previous: &recorded,
        expired,
        deadline_passed: campaign_policy.deadline_passed,
        now,
        wave_limit: campaign_policy.wave_limit,
        dry_run,
        rate: &rate,
    });
    // The gate after a finished wave, judged over every shard's devices of it.
    let merged = merge_policy(&refs, co.awaiting_gate, chunk_bytes(ctx, &key, &uid));
    let gate = judge_gate(c, &recorded, co.awaiting_gate, |_| merged.health, now).await;
    hold_for_gate(
        &mut co,
        gate.as_ref().and_then(|g| g.failed.as_ref()).map(|f| f.0),
    );
    tracing::debug!(phase = ?co.phase, counts = ?co.counts, wave = co.current_wave, unreported = ?co.unreported, awaiting_gate = ?co.awaiting_gate, "coordinated");
    let mut policy_status = campaign_policy.status;
    policy_status.waiting = merged.waiting.clone();
    policy_status.held_by = merged.held_by.clone();
    policy_status.plan = merged.plan.clone();
    policy_status.rate_per_minute = co.rate_per_minute.filter(|_| rate.is_limited());
    policy_status.warnings =
        preview::warnings(&c.spec, &params, co.counts.selected, Some(&calendar), now);
    show_gate(
        &mut policy_status,
        gate.as_ref(),
        co.awaiting_gate,
        &recorded,
    );
    let mut status = compute(StatusInput {
        generation: c.metadata.generation,
        phase: co.phase,
        counts: co.counts.clone(),
        current_wave: co.current_wave,
        total_waves: co.total_waves,
        chunk_count: recorded.chunk_count,
        expires_at: recorded.expires_at.clone(),
        expired: co.expired,
        release_key_id: recorded.release_key_id.clone(),
        failures: co.failures.clone(),
        blocker: co.blocker.clone(),
        previous: Some(&recorded),
        now: k8s_time(now),
        policy: policy_status,
    });
    status.shards = co.assignments.clone();
    status.delta = co.delta.or(recorded.delta);
    // Nothing prepares an ended campaign any more: its seed goes.
    status.sealed_seed = recorded
        .sealed_seed
        .clone()
        .filter(|_| !status.phase.is_terminal());
    let events = plan::events(&recorded, &status, co.blocker.as_ref());
    campaign_gauges(ctx, &key, &status);
    let held_back = write_status(c, &key, &status, ctx).await?;
    for ev in events {
        publish_event(ctx, c, ev).await;
    }
    let blocked_retries = ctx.memo(&key, |m| {
        m.blocked_retries = match &co.blocker {
            Some(b) if b.reason.is_transient() => m.blocked_retries.saturating_add(1),
            _ => 0,
        };
        m.blocked_retries
    });
    // The policy's next change (a window, the deadline), a rate share handed on, the gate.
    let due = [
        campaign_policy.due,
        co.due,
        gate_wake(gate.as_ref(), &recorded, now),
    ]
    .into_iter()
    .flatten()
    .min()
    .map(|t| Duration::from_secs(t.saturating_sub(now).max(1)));
    let wake = if status.phase.is_terminal() {
        held_back
    } else if let Some(b) = co.blocker.as_ref().filter(|b| b.reason.is_transient()) {
        let _ = b;
        Some(plan::backoff(blocked_retries).min(held_back.unwrap_or(Duration::MAX)))
    } else {
        [Some(SAFETY_WAKE), held_back, due]
            .into_iter()
            .flatten()
            .min()
    };
    Ok((status, wake))
}

/// A held shard's Devices as one pass reads them: its reflector's store and its two counters.
struct ShardView {
    store: Store<Device>,
    /// Changes of what selection reads (see [`ShardDevices::epoch`]).
    epoch: u64,
    /// Watch events applied (see [`ShardDevices::applied`]), read before the store is.
    applied: u64,
}

/// The Devices of a held shard, once its first list is in.
fn shard_view(ctx: &Ctx, shard: u32) -> Option<ShardView> {
    lock(&ctx.shard_devices)
        .get(&shard)
        .filter(|v| v.ready.load(Ordering::Acquire))
        .map(|v| ShardView {
            epoch: v.epoch.load(Ordering::Acquire),
            applied: v.applied.load(Ordering::Acquire),
            store: v.store.clone(),
        })
}

/// One held shard's pass over the campaign: prepare (with the recorded expiry and the seed),
/// decide for the shard's devices within its assignment, act, report. Returns when to wake.
async fn shard_pass(
    c: &UpdateCampaign,
    status: &UpdateCampaignStatus,
    shard: u32,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    let Some(view) = shard_view(ctx, shard) else {
        // Its Devices are still being listed: the reflector wakes the campaign when they are in.
        return Ok(None);
    };
    let key = key_of(c)?;
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let now = unix_now();
    let dry_run = c.spec.dry_run;
    let expires_at = status.expires_at.as_ref().and_then(unix_secs);
    if expires_at.is_none() && !dry_run {
        // The coordinator fixes the expiry (and the seed) first; its status write wakes us.
        return Ok(None);
    }
    let expired = expires_at.is_some_and(|e| now >= e) && !dry_run;
    let terminal = status.phase.is_terminal() || c.spec.abort;
    let (campaign_params, calendar, mut blocker) = validate_spec(c);
    if let Some(expires_at) = expires_at.filter(|_| {
        blocker.is_none() && !terminal && !expired && !dry_run && !ctx.engine.has_run(&key, &uid)
    }) {
        let Some(sealed) = status.sealed_seed.as_deref() else {
            // The coordinator records the seed with the expiry; its status write wakes us.
            return Ok(None);
        };
        match open_seed(c, ctx, &uid, sealed).await? {
            Ok(seed) => {
                match prepare_run(c, ctx, expires_at, seed, RecordedDigests::of(status)).await? {
                    Ok(Prepared { run, .. }) => {
                        tracing::info!(
                            shard,
                            chunks = run.chunk_count(),
                            "campaign prepared for a shard"
                        );
                        ctx.engine.insert_run(key.clone(), run);
                    }
                    Err(b) => blocker = Some(b),
                }
            }
            Err(b) => blocker = Some(b),
        }
    }
    let has_run = ctx.engine.has_run(&key, &uid);
    if blocker.is_none() && !terminal && !dry_run {
        if let ConnState::Down(e) = ctx.engine.mqtt.state() {
            blocker = Some(plan::broker_blocker(&e));
        }
    }
    let (stamp, selected) = selection(c, &key, shard, &view, ctx);
    let before = reports_of(ctx, c, &uid)
        .into_iter()
        .nth(shard as usize)
        .flatten();
    // Devices of the shard that stopped matching (or were deleted) leave the run; new ones join.
    let (joined, left) = follow_members(
        &key,
        shard,
        (stamp, &selected),
        (&view.store, &key.0),
        (
            status.phase,
            &before
                .as_ref()
                .map(|r| r.devices.clone())
                .unwrap_or_default(),
        ),
        ctx,
    )
    .await?;
    let progress = ctx.engine.progress(&key, &uid, &selected);
    let assignment = status.shards.iter().find(|a| a.shard == shard);
    // The shard's share of the campaign's rate, as the coordinator assigned it.
    let rate_share = Rate::from_spec(&c.spec.rollout)
        .is_limited()
        .then(|| assignment.and_then(|a| a.rate_per_minute).unwrap_or(0));
    let policy = policy_of(
        c,
        &key,
        ctx,
        &PolicyScope {
            shard,
            selected: &selected,
            progress: &progress,
            calendar: &calendar,
            previous: status,
            rate_share,
        },
        now,
    );
    if blocker.is_none() {
        blocker = policy.blocker.clone();
    }
    let params = shard_params(&campaign_params, assignment);
    let decision = decide(&DecideInput {
        now,
        devices: &progress,
        params: &params,
        paused: c.spec.paused,
        abort: c.spec.abort,
        blocked: blocker.is_some() || expired || dry_run,
        previous_phase: status.phase,
        previous_wave: 0,
        eligible_limit: Some(assignment.map_or(0, |a| a.wave_end)),
        holds: &policy.holds,
        start_cap: policy.start_cap,
        // The coordinator holds the waves for the gates (`wave_end` of the assignment).
        wave_limit: None,
        deadline_passed: policy.deadline_passed,
        policy_due: policy.due,
    });
    let starts = decision.phase == CampaignPhase::Progressing
        && blocker.is_none()
        && !terminal
        && !expired
        && !dry_run;
    let plan = Plan {
        timed_out: decision.timed_out.clone(),
        start: if starts {
            decision.start.clone()
        } else {
            Vec::new()
        },
        deadline: now + params.timeout_secs,
        end: (terminal || expired) && has_run,
    };
    ctx.engine.apply(&key, &uid, &selected, &plan).await?;
    let last_start = ctx.shard_memo(&key, shard, |m| {
        m.starts.record(now, plan.start.len());
        if !plan.start.is_empty() {
            m.last_start = Some(now);
        }
        m.last_start
    });
    if terminal && !has_run {
        // Ended under an earlier process (or before a restart): clear what the resources say the
        // shard may have left retained, once per process.
        let first = ctx.shard_memo(&key, shard, |m| {
            let first = m.cleaned.as_deref() != Some(uid.as_str());
            m.cleaned = Some(uid.clone());
            first
        });
        if first {
            let notifies = status.phase == CampaignPhase::Succeeded;
            ctx.engine
                .mqtt
                .execute(recorded_clears(c, ctx, &uid, shard, &selected, notifies))
                .await?;
        }
    }
    let mut report = shard_report(
        &key.1,
        &uid,
        shard,
        ctx.role.shards,
        &ctx.role.identity,
        &decision,
        &progress,
        &policy.holds,
        failures(&selected, &progress, &uid, &view.store),
        ctx.engine.device_writes_pending_in(shard) as u32,
        has_run || terminal || dry_run,
        blocker.as_ref(),
    );
    report.devices.joined = joined;
    report.devices.left = left;
    // This replica's run tallies every device it served, over all the shards it holds: the
    // lowest of them reports it, the others keep what an earlier holder reported (the
    // coordinator adds the reports up; reporting the run's tally from each would count it twice).
    let reports_run_tally = ctx.role.held.borrow().first() == Some(&shard);
    report.delta = ctx
        .engine
        .delta_tally(&key)
        .filter(|_| has_run && reports_run_tally)
        .or_else(|| before.as_ref().and_then(|r| r.delta));
    report.last_start = last_start
        .map(k8s_time)
        .or_else(|| before.and_then(|r| r.last_start));
    report.waiting = policy.status.waiting.clone();
    report.held_by = policy.status.held_by.clone();
    // The shard's devices in the campaign's waves (its share of each), as the coordinator
    // apportions them: only once the coordinator has counted every shard as they are now (before,
    // no plan: the campaign's shows none rather than one cut wrong).
    let sizes: Vec<u32> = status.shards.iter().map(|a| a.selected).collect();
    let counted = sizes.len() == ctx.role.shards.get() as usize
        && sizes.get(shard as usize) == Some(&(selected.len() as u32));
    report.plan = counted.then(|| {
        let cutoffs = shard_cutoffs(
            &wave_cutoffs(sizes.iter().sum(), &campaign_params),
            &sizes,
            shard,
        );
        preview::plan_in_waves(&selected, &policy.exclusions, &cutoffs, None)
    });
    report.plan_sizes = if counted { sizes } else { Vec::new() };
    // The health of its devices of the current wave, for the gate after it.
    if c.spec.rollout.gate.is_some() {
        let wave = assignment.map_or(0..0, |a| {
            let end = (a.wave_end as usize).min(selected.len());
            (a.wave_start as usize).min(end)..end
        });
        report.health = Some(wave_health(
            status.current_wave,
            health_tally(
                &key,
                &uid,
                &selected[wave.clone()],
                &progress[wave],
                &ctx.engine,
            ),
        ));
    }
    let held_back = write_report(c, &key, shard, report, ctx).await?;
    let due = decision
        .next_due
        .map(|t| Duration::from_secs(t.saturating_sub(now).max(1)));
    Ok(if terminal {
        held_back
    } else {
        Some(
            [Some(SAFETY_WAKE), due, held_back]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(SAFETY_WAKE),
        )
    })
}

/// The single-replica pass (`--shards 1`, the default): the holder of the leader Lease drives
/// every device with the whole rollout policy (issue 15: the policy step of every shard pass,
/// `policy_of`, plus gates, dry run, joiners and leavers and the policy's status) over the
/// Devices of its one shard, and writes the status itself.
async fn single_pass(
    c: &UpdateCampaign,
    ShardView { store, epoch, .. }: ShardView,
    ctx: &Ctx,
) -> Result<Requeue, Error> {
    let store = &store;
    let key = key_of(c)?;
    let uid = c.uid().ok_or(Error::MissingMetadata("uid"))?;
    let ns = key.0.clone();
    let now = unix_now();
    let previous = c.status.clone().unwrap_or_default();
    let dry_run = c.spec.dry_run;

    // fetch + validate (fresh Devices on every pass: a device's status, read when it starts, may
    // have changed since the last pass without changing the selection)
    let stamp = SelectionStamp {
        epoch,
        generation: c.metadata.generation,
    };
    let Validated {
        selected,
        params,
        calendar,
        mut blocker,
    } = validate(c, store.state());
    let selected = Arc::new(selected);
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
    let mut delta_oci_digests = previous.delta_oci_digests.clone();
    if blocker.is_none() && !stopping && dry_run {
        blocker = plan_payload(c, ctx, &key, &uid, expires_at, &previous).await?;
    } else if blocker.is_none() && !stopping && !expired && !ctx.engine.has_run(&key, &uid) {
        match prepare_run(
            c,
            ctx,
            expires_at,
            Zeroizing::new(sealed_ota_protocol::crypto::random::<32>()),
            RecordedDigests::of(&previous),
        )
        .await?
        {
            Ok(Prepared {
                run,
                oci_digest: resolved,
                delta_oci_digests: resolved_bases,
            }) => {
                tracing::info!(chunks = run.chunk_count(), expires_at, "campaign prepared");
                let delta_chunk_counts = run.delta_chunk_counts();
                ctx.engine.insert_run(key.clone(), run);
                oci_digest = oci_digest.or(resolved);
                for (from_version, digest) in resolved_bases {
                    delta_oci_digests.entry(from_version).or_insert(digest);
                }
                if previous.expires_at.is_none()
                    || previous.oci_digest != oci_digest
                    || previous.delta_oci_digests != delta_oci_digests
                    || previous.delta_chunk_counts != delta_chunk_counts
                {
                    let mut recorded = previous.clone();
                    recorded.expires_at = Some(k8s_time(expires_at));
                    recorded.oci_digest = oci_digest.clone();
                    recorded.delta_oci_digests = delta_oci_digests.clone();
                    recorded.delta_chunk_counts = delta_chunk_counts;
                    write_status(c, &key, &recorded, ctx).await?;
                }
            }
            Err(b) => blocker = Some(b),
        }
    }
    if blocker.is_none() && !stopping && !dry_run {
        if let ConnState::Down(e) = ctx.engine.mqtt.state() {
            blocker = Some(plan::broker_blocker(&e));
        }
    }

    // Devices that stopped matching (or were deleted) leave the run; new ones join it.
    let (joined, left) = follow_members(
        &key,
        0,
        (stamp, &selected),
        (store, &ns),
        (previous.phase, &previous.devices),
        ctx,
    )
    .await?;

    // policy
    let progress = ctx.engine.progress(&key, &uid, &selected);
    let policy = policy_of(
        c,
        &key,
        ctx,
        &PolicyScope {
            shard: 0,
            selected: &selected,
            progress: &progress,
            calendar: &calendar,
            previous: &previous,
            rate_share: None,
        },
        now,
    );
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
        eligible_limit: None,
    });
    tracing::debug!(phase = ?decision.phase, counts = ?decision.counts, starts = decision.start.len(), blocked = ?blocker.as_ref().map(|b| b.reason), "decided");

    // the gate after a finished wave
    let gate = judge_gate(
        c,
        &previous,
        decision.awaiting_gate,
        |w| {
            let cutoffs = wave_cutoffs(selected.len() as u32, &params);
            let end = cutoffs.get(w as usize).copied().unwrap_or(0) as usize;
            let start = w
                .checked_sub(1)
                .and_then(|w| cutoffs.get(w as usize))
                .copied()
                .unwrap_or(0) as usize;
            health_tally(
                &key,
                &uid,
                &selected[start..end],
                &decision.progress[start..end],
                &ctx.engine,
            )
        },
        now,
    )
    .await;

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
    let mut policy_status = policy.status;
    policy_status.plan = Some(preview::plan(
        &selected,
        &policy.exclusions,
        &params,
        chunk_bytes(ctx, &key, &uid),
    ));
    policy_status.warnings = preview::warnings(
        &c.spec,
        &params,
        selected.len() as u32,
        Some(&calendar),
        now,
    );
    show_gate(
        &mut policy_status,
        gate.as_ref(),
        decision.awaiting_gate,
        &previous,
    );
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
        failures: failures(&selected, &decision.progress, &uid, store),
        blocker: blocker.clone(),
        previous: Some(&previous),
        now: k8s_time(now),
        policy: policy_status,
    });
    let mut status = status;
    status.oci_digest = oci_digest;
    status.delta_oci_digests = delta_oci_digests;
    status.delta_chunk_counts = ctx
        .engine
        .delta_chunk_counts(&key)
        .filter(|_| has_run)
        .unwrap_or_else(|| previous.delta_chunk_counts.clone());
    status.delta = ctx
        .engine
        .delta_tally(&key)
        .filter(|_| has_run)
        .or(previous.delta);
    let events = plan::events(&previous, &status, blocker.as_ref());

    // act
    ctx.engine.apply(&key, &uid, &selected, &pass.run).await?;
    ctx.shard_memo(&key, 0, |m| m.starts.record(now, pass.run.start.len()));
    if let Some(notifies) = pass.clear_recorded {
        // Ended under an earlier process (or before a restart): clear what the resources say it
        // may have left retained, once per process.
        let first = ctx.shard_memo(&key, 0, |m| {
            let first = m.cleaned.as_deref() != Some(uid.as_str());
            m.cleaned = Some(uid.clone());
            first
        });
        if first {
            ctx.engine
                .mqtt
                .execute(recorded_clears(c, ctx, &uid, 0, &selected, notifies))
                .await?;
        }
    }
    campaign_gauges(ctx, &key, &status);
    let held_back = write_status(c, &key, &status, ctx).await?;
    for ev in events {
        publish_event(ctx, c, ev).await;
    }
    let blocked_retries = ctx.memo(&key, |m| {
        m.blocked_retries = match &blocker {
            Some(b) if b.reason.is_transient() => m.blocked_retries.saturating_add(1),
            _ => 0,
        };
        m.blocked_retries
    });
    let mut decision = decision;
    // The soak's end; a gate that just passed opens the next wave on the very next pass.
    if let Some(due) = gate_wake(gate.as_ref(), &previous, now) {
        decision.next_due = Some(decision.next_due.map_or(due, |d| d.min(due)));
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

/// The failed devices of this pass with what their Device status says about it.
fn failures(
    selected: &[Arc<Device>],
    progress: &[Progress],
    uid: &str,
    store: &Store<Device>,
) -> Vec<DeviceFailure> {
    selected
        .iter()
        .zip(progress)
        .filter_map(|(d, p)| match p {
            Progress::Failed { reason } => Some(DeviceFailure {
                device: d.name_any(),
                reason: reason.as_str().to_owned(),
                // The selection may predate the Device's final write: read the store's copy.
                message: store
                    .get(&ObjectRef::from_obj(&**d))
                    .and_then(|d| d.status.clone())
                    .and_then(|s| s.campaign)
                    .filter(|r| r.uid == uid && r.phase == DevicePhase::Failed)
                    .and_then(|r| r.message)
                    .unwrap_or_else(|| reason.as_str().to_owned()),
            }),
            _ => None,
        })
        .collect()
}

/// Write shard `shard`'s report by server-side apply when it changed, at most once a second, and
/// only while this replica holds the shard. Returns how long to wait when it was held back.
async fn write_report(
    c: &UpdateCampaign,
    key: &CampaignKey,
    shard: u32,
    report: CampaignShardSpec,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    let held = ctx.shard_memo(key, shard, |m| match &m.reported {
        Some((_, last)) if *last == report => Some(None),
        Some((at, _)) if at.elapsed() < WRITE_INTERVAL => Some(Some(WRITE_INTERVAL - at.elapsed())),
        _ => None,
    });
    if let Some(wait) = held {
        return Ok(wait);
    }
    if !ctx.role.held.borrow().contains(&shard) {
        return Ok(None);
    }
    let uid = c.uid().unwrap_or_default();
    let name = report_name(&key.1, &uid, shard, ctx.role.shards.get());
    let owner = c.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o
    });
    let object = serde_json::json!({
        "apiVersion": "ota.sealed-ota.dev/v1alpha1",
        "kind": "CampaignShard",
        "metadata": {
            "name": name,
            "labels": {CAMPAIGN_LABEL: key.1},
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": report,
    });
    Api::<CampaignShard>::namespaced(ctx.client.clone(), &key.0)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(Error::kube("writing a shard report"))?;
    ctx.engine
        .metrics
        .status_writes
        .with_label_values(&["shard"])
        .inc();
    ctx.shard_memo(key, shard, |m| m.reported = Some((Instant::now(), report)));
    Ok(None)
}

/// The campaign's device counts as gauges.
fn campaign_gauges(ctx: &Ctx, key: &CampaignKey, status: &UpdateCampaignStatus) {
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
}

/// Server-side apply the campaign status when it changed, at most once a second. Returns how long
/// to wait when a changed status was held back by the rate limit.
async fn write_status(
    c: &UpdateCampaign,
    key: &CampaignKey,
    status: &UpdateCampaignStatus,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    let held = ctx.memo(key, |m| match &m.written {
        Some((_, last)) if last == status => Some(None),
        Some((at, _)) if at.elapsed() < WRITE_INTERVAL => Some(Some(WRITE_INTERVAL - at.elapsed())),
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

/// Clears of whatever a campaign may have left retained in one shard, from what the resources
/// record: the image's and the deltas' chunks by index (status.chunkCount and
/// status.deltaChunkCounts, [`recorded_chunk_clears`]; shard 0 only, they are shared) and, with
/// `notifies`, the notify topic of the shard's devices that recorded this campaign. Clearing an
/// absent retained message is harmless.
fn recorded_clears(
    c: &UpdateCampaign,
    ctx: &Ctx,
    uid: &str,
    shard: u32,
    selected: &[Arc<Device>],
    notifies: bool,
) -> Vec<Action> {
    let topics = &ctx.engine.topics;
    let mut actions = Vec::new();
    if shard == 0 {
        if let Some(status) = &c.status {
            actions.extend(recorded_chunk_clears(status, uid, topics));
        }
    }
    if notifies {
        actions.extend(
            selected
                .iter()
                .filter(|d| recorded_uid(d) == Some(uid))
                .map(|d| Action::Publish(clear_retained(topics.notify(&d.device_id())))),
        );
    }
    actions
}

/// Clears of every chunk the status says campaign `uid` sealed: the image's (`chunkCount`) and
/// each delta's (`deltaChunkCounts`, on the delta's own stream id).
fn recorded_chunk_clears<'t>(
    status: &UpdateCampaignStatus,
    uid: &str,
    topics: &'t sealed_ota_protocol::topics::TopicTree,
) -> impl Iterator<Item = Action> + 't {
    let image = status.chunk_count.map(|n| (uid.to_owned(), n));
    let deltas = status
        .delta_chunk_counts
        .iter()
        .enumerate()
        .map(|(i, &n)| (crate::firmware::delta_stream_id(uid, i), n));
    image
        .into_iter()
        .chain(deltas.collect::<Vec<_>>())
        .flat_map(move |(stream, n)| (0..n).map(move |i| topics.chunk(&stream, i)))
        .map(|topic| Action::Publish(clear_retained(topic)))
}

fn recorded_uid(d: &Device) -> Option<&str> {
    d.status
        .as_ref()
        .and_then(|s| s.campaign.as_ref())
        .map(|r| r.uid.as_str())
}

/// Finalizer clean-up (the coordinator): clear the campaign's retained messages — its chunks and
/// the notify topic of every Device that recorded it (listed from the apiserver in pages: this
/// replica may hold no shard). Its shard reports go with it (owner references). Needs the broker;
/// retried until done.
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
    let topics = &ctx.engine.topics;
    let mut actions: Vec<Action> = c
        .status
        .as_ref()
        .map(|s| recorded_chunk_clears(s, &uid, topics).collect())
        .unwrap_or_default();
    let devices: Api<Device> = Api::namespaced(ctx.client.clone(), &key.0);
    let mut page = ListParams::default().limit(500);
    loop {
        let list = devices
            .list(&page)
            .await
            .map_err(Error::kube("listing Devices to clear a campaign"))?;
        actions.extend(
            list.items
                .iter()
                .filter(|d| recorded_uid(d) == Some(uid.as_str()))
                .map(|d| Action::Publish(clear_retained(topics.notify(&d.device_id())))),
        );
        match list.metadata.continue_ {
            Some(token) if !token.is_empty() => page = page.continue_token(&token),
            _ => break,
        }
    }
    ctx.engine.mqtt.execute(actions).await?;
    lock(&ctx.memo).remove(&key);
    lock(&ctx.shard_memo).retain(|(k, _), _| *k != key);
    tracing::info!(campaign = %key.1, "retained messages cleared on delete");
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CampaignPayloadSpec, FirmwareSource, KeyRef, UpdateCampaignSpec};

    /// A restarted operator clears every chunk the status recorded: the image's and each
    /// delta's, on the delta's own stream id (`<uid>-d<i>`), nothing else.
    #[test]
    fn recorded_clears_cover_the_image_s_and_every_delta_s_chunks() {
        let topics = sealed_ota_protocol::topics::TopicTree::new("iot", "m").unwrap();
        let status = UpdateCampaignStatus {
            chunk_count: Some(3),
            delta_chunk_counts: vec![2, 1],
            ..Default::default()
        };
        let cleared: Vec<(String, bool, usize)> = recorded_chunk_clears(&status, "u1", &topics)
            .map(|a| match a {
                Action::Publish(o) => (o.topic, o.retain, o.payload.len()),
                other => panic!("not a publish: {other:?}"),
            })
            .collect();
        let topics = &topics;
        let expected: Vec<(String, bool, usize)> = [("u1", 3), ("u1-d0", 2), ("u1-d1", 1)]
            .into_iter()
            .flat_map(|(stream, n)| (0..n).map(move |i| (topics.chunk(stream, i), true, 0)))
            .collect();
        assert_eq!(cleared, expected);
    }

    /// A cached selection follows the store's versions of its Devices (a status write replaces
    /// a Device without moving the epoch): the memo holds no second copy of them.
    #[test]
    fn a_cached_selection_follows_the_store_s_versions_of_its_devices() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = reflector::store::<Device>();
        let named = |name: &str, ns: &str| {
            let mut d = device(&[("fleet", "a")], ns);
            d.metadata.name = Some(name.into());
            d
        };
        let (a, b) = (named("a", "ns"), named("b", "ns"));
        let other_namespace_a = named("a", "other");
        for d in [&a, &b, &other_namespace_a] {
            writer.apply_watcher_event(&Event::Apply(d.clone()));
        }
        let selected: Selected = Arc::new(vec![
            store.get(&ObjectRef::from_obj(&b)).unwrap(),
            store.get(&ObjectRef::from_obj(&a)).unwrap(),
        ]);
        let mut written = a.clone();
        written.status = Some(Default::default());
        writer.apply_watcher_event(&Event::Apply(written));
        let mut members = Members {
            last: Some((stamp(3), selected.clone())),
            joined: 0,
            left: 0,
        };
        let current = current_versions(&selected, &store);
        let names: Vec<_> = current.iter().map(|d| d.name_any()).collect();
        assert_eq!(names, ["b", "a"], "same Devices, same order");
        assert!(current[1].status.is_some(), "a as written");
        assert!(Arc::ptr_eq(
            &current[1],
            &store.get(&ObjectRef::from_obj(&a)).unwrap()
        ));
        assert!(Arc::ptr_eq(&current[0], &selected[0]), "b unchanged");
        assert_eq!(
            Arc::strong_count(&selected[1]),
            1,
            "the old version is held only here"
        );
        members.follow_versions(stamp(3), &current);
        assert!(Arc::ptr_eq(&members.last.as_ref().unwrap().1, &current));
        members.follow_versions(stamp(4), &selected);
        assert!(
            Arc::ptr_eq(&members.last.as_ref().unwrap().1, &current),
            "another stamp's selection is not this one"
        );
    }

    /// A cached selection is returned as it is while its shard's store applied no watch event
    /// (no pass over the shard), and its Devices taken again from the store once it applied one.
    #[test]
    fn a_cached_selection_is_refreshed_only_when_its_store_moved() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = reflector::store::<Device>();
        let mut a = device(&[("fleet", "a")], "ns");
        a.metadata.name = Some("a".into());
        writer.apply_watcher_event(&Event::Apply(a.clone()));
        let devices: Selected = Arc::new(vec![store.get(&ObjectRef::from_obj(&a)).unwrap()]);
        let mut selection = Selection {
            stamp: stamp(1),
            devices: devices.clone(),
            applied: 1,
        };
        let view = |applied| ShardView {
            store: store.clone(),
            epoch: 1,
            applied,
        };
        let same = selection.reuse(stamp(1), &view(1)).unwrap();
        assert!(Arc::ptr_eq(&same, &devices), "nothing applied: as it was");
        assert!(
            selection.reuse(stamp(2), &view(1)).is_none(),
            "another stamp"
        );

        let mut written = a.clone();
        written.status = Some(Default::default());
        writer.apply_watcher_event(&Event::Apply(written));
        let current = selection.reuse(stamp(1), &view(2)).unwrap();
        assert!(current[0].status.is_some(), "a as the store holds it now");
        let again = selection.reuse(stamp(1), &view(2)).unwrap();
        assert!(Arc::ptr_eq(&again, &current), "kept: no second pass");
    }

    /// A shard's epoch (what cached selections are keyed by) moves when a Device comes, goes, or
    /// changes its spec or labels, and not for a status write (one per device per campaign).
    #[test]
    fn only_what_selection_reads_moves_the_epoch() {
        use kube::runtime::watcher::Event;
        let (known, mut writer) = reflector::store::<Device>();
        let mut d = device(&[("fleet", "a")], "ns");
        d.metadata.generation = Some(1);
        assert!(
            changes_selection_of(&known, &Event::Apply(d.clone())),
            "new"
        );
        writer.apply_watcher_event(&Event::Apply(d.clone()));
        let mut written = d.clone();
        written.status = Some(Default::default());
        assert!(
            !changes_selection_of(&known, &Event::Apply(written)),
            "status"
        );
        let mut relabelled = d.clone();
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("fleet".into(), "b".into());
        assert!(
            changes_selection_of(&known, &Event::Apply(relabelled)),
            "labels"
        );
        let mut respecced = d.clone();
        respecced.metadata.generation = Some(2);
        assert!(
            changes_selection_of(&known, &Event::InitApply(respecced)),
            "spec"
        );
        assert!(changes_selection_of(&known, &Event::Delete(d)), "gone");
        assert!(changes_selection_of(&known, &Event::InitDone), "relisted");
    }

    /// What the shard reflectors drop is nothing a status write reads: the next write built from
    /// a slimmed Device is the one built from the Device as the apiserver holds it.
    #[test]
    fn a_slimmed_device_builds_the_same_status_write() {
        use crate::device_status::{device_status, kept_receipt, Handshake};
        use crate::time::k8s_time;
        let record = |phase, attempts| crate::crd::DeviceCampaignStatus {
            name: "c".into(),
            uid: "u".into(),
            target_version: "2.0.0".into(),
            phase,
            attempts,
            reason: None,
            message: None,
            receipt: None,
            receipt_certificate_fingerprint: None,
            release_key_id: None,
        };
        let handshake = Handshake {
            fingerprint: [7; 32],
            not_after: 9_000,
            running_version: "1.0.0".into(),
        };
        let installed = device_status(
            None,
            Some(&handshake),
            Some("2.0.0"),
            kept_receipt(
                record(DevicePhase::Succeeded, 1),
                &[5; 900],
                Some([7; 32]),
                None,
            ),
            600,
        );
        let mut stored = device(&[("fleet", "a")], "ns");
        stored.status = Some(installed);
        stored.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "{\"spec\":{}}".to_owned(),
            )]
            .into(),
        );
        let mut slimmed = stored.clone();
        slim(&mut slimmed);
        assert!(slimmed.metadata.annotations.is_none());
        let kept = slimmed.status.as_ref().unwrap();
        assert!(kept.campaign.as_ref().unwrap().receipt.is_none());
        assert!(kept.conditions[0].message.is_empty());
        // The next campaign: a timeout (nothing new seen), then a success with a new handshake.
        for (handshake, version, phase) in [
            (None, None, DevicePhase::Failed),
            (Some(&handshake), Some("3.0.0"), DevicePhase::Succeeded),
        ] {
            let next = |d: &Device| {
                device_status(
                    d.status.as_ref(),
                    handshake,
                    version,
                    record(phase, 2),
                    1_200,
                )
            };
            assert_eq!(next(&slimmed), next(&stored), "{phase:?}");
        }
        // A write that keeps the Ready condition keeps its transition time.
        let again = device_status(
            slimmed.status.as_ref(),
            None,
            None,
            record(DevicePhase::Succeeded, 1),
            1_200,
        );
        assert_eq!(again.conditions[0].last_transition_time, k8s_time(600));
    }

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

    /// A pass on a cache whose initial list is not in yet would see too few objects: `synced`
    /// holds the pass back until the list is complete, and fails once the cache's writer is gone.
    #[test]
    fn no_pass_before_the_initial_list() {
        use futures::FutureExt;
        let (store, mut writer) = reflector::store::<Device>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(device(&[("fleet", "a")], "ns")));
        assert!(store.state().is_empty());
        assert!(synced(&store, "Device").now_or_never().is_none());
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(matches!(
            synced(&store, "Device").now_or_never(),
            Some(Ok(()))
        ));
        assert_eq!(store.state().len(), 1);
        let (unfilled, writer) = reflector::store::<Device>();
        drop(writer);
        assert!(matches!(
            synced(&unfilled, "Device").now_or_never(),
            Some(Err(Error::CacheStopped("Device")))
        ));
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
                deltas: Vec::new(),
            }),
            rotate_credentials: None,
        };
        assert!(references_secret(&s, "fw-secret"));
    }

    fn named(names: &[&str]) -> Selected {
        Arc::new(
            names
                .iter()
                .map(|n| {
                    let mut d = device(&[("fleet", "a")], "ns");
                    d.metadata.name = Some((*n).into());
                    Arc::new(d)
                })
                .collect(),
        )
    }

    fn stamp(epoch: u64) -> SelectionStamp {
        SelectionStamp {
            epoch,
            generation: Some(1),
        }
    }

    /// Joiners and leavers are counted while the campaign runs, from the totals a new process
    /// starts with; a pass with the stamp already counted changes nothing, even when handed a
    /// different list (it is not looked at: the stamp says the Devices did not change), and
    /// released devices count as leavers when the selection did not show them leaving.
    #[test]
    fn members_count_joiners_and_leavers_once_per_selection() {
        let mut m = Members {
            last: None,
            joined: 2,
            left: 1,
        };
        assert!(!m.counted(stamp(1)));
        assert_eq!(m.step((stamp(1), &named(&["a", "b"])), true, 0), (2, 1));
        assert!(m.counted(stamp(1)));
        assert!(!m.counted(SelectionStamp {
            epoch: 1,
            generation: Some(2)
        }));
        // b left, c and d joined.
        assert_eq!(
            m.step((stamp(2), &named(&["a", "c", "d"])), true, 0),
            (4, 2)
        );
        // Same stamp: counted already.
        assert_eq!(m.step((stamp(2), &named(&["x"])), true, 5), (4, 2));
        // Not running (e.g. before the start): the selection is recorded, nothing counted.
        assert_eq!(m.step((stamp(3), &named(&["a"])), false, 0), (4, 2));
        // The run released three devices (deleted between passes) the selection shows as one.
        assert_eq!(m.step((stamp(4), &named(&[])), true, 3), (4, 5));
    }
}
