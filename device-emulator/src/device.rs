//! One emulated device: the shared session runner (`sealed_ota_device::Device`) with the
//! emulator's installer, [`EmulatedInstaller`]: simulated A/B image slots (`slots`), the
//! `crash-install` fault (power lost half-way through the switch) and the `selftest-fail` fault
//! (the installed image fails its self-test: rolled back and reported, signed). After a power loss
//! a boot finishes an install that was pending from what the slots hold. Every other fault switch
//! is played by the runner through `DeviceFaults`' `Faults` implementation.

use std::future::Future;
use std::path::{Path, PathBuf};

use sealed_ota_device::{InstallProgress, Installer, LateOutcome, Result};
use sealed_ota_protocol::{FinalOutcome, PendingInstall};
use tracing::{info, warn};

use crate::faults::DeviceFaults;
use crate::slots::ImageSlots;

pub use sealed_ota_device::{unix_now, DeviceReport, Settings};

/// An emulated device: the shared runner with the emulated installer.
pub type EmulatedDevice = sealed_ota_device::Device<EmulatedInstaller>;

/// Installs into the emulated image slots, playing the install faults.
#[derive(Debug)]
pub struct EmulatedInstaller {
    device_id: String,
    slots: ImageSlots,
    faults: DeviceFaults,
    /// Benchmarks only: remove each committed image (`ImageSlots::drop_installed_image`).
    drop_installed: bool,
}

impl EmulatedInstaller {
    /// The installer of device `device_id` whose directory is `dir`, with its faults.
    pub fn new(device_id: &str, dir: &Path, faults: DeviceFaults) -> Self {
        EmulatedInstaller {
            device_id: device_id.to_string(),
            slots: ImageSlots::in_dir(dir),
            faults,
            drop_installed: false,
        }
    }

    /// Benchmarks only: each committed image is hashed on disk and removed (`run
    /// --drop-installed-images`), after the runner checked its SHA-256 and signature.
    pub fn dropping_installed_images(mut self) -> Self {
        self.drop_installed = true;
        self
    }

    /// The image slots.
    pub fn slots(&self) -> &ImageSlots {
        &self.slots
    }

    /// Switches to the received image, then finishes the install ([`Self::finish_switched`]).
    fn install_received(&mut self, pending: &PendingInstall) -> Result<FinalOutcome> {
        self.slots
            .switch_image(&pending.version, pending.size, &pending.sha256)?;
        self.finish_switched(pending)
    }

    /// The image is in place: run the self-test (the `selftest-fail` fault fails it), then commit
    /// or roll back.
    fn finish_switched(&mut self, pending: &PendingInstall) -> Result<FinalOutcome> {
        match self.faults.self_test_failure().map(str::to_string) {
            Some(reason) => {
                self.slots.roll_back_image()?;
                warn!(device = %self.device_id, campaign = %pending.campaign_id, version = %pending.version, %reason, "self-test failed: rolled back (fault switch)");
                Ok(FinalOutcome::RolledBack { reason })
            }
            None => {
                self.slots.commit_image()?;
                if self.drop_installed {
                    self.slots.drop_installed_image()?;
                }
                Ok(FinalOutcome::Committed)
            }
        }
    }
}

impl Installer for EmulatedInstaller {
    fn download_path(&self, _campaign_id: &str) -> PathBuf {
        self.slots.download_path()
    }

    fn installed_image_path(&self) -> Option<PathBuf> {
        Some(self.slots.firmware_path())
    }

    fn on_boot(&mut self) -> Result<()> {
        Ok(self.slots.recover_after_crash()?)
    }

    fn install(&mut self, pending: &PendingInstall, _image: &Path) -> Result<InstallProgress> {
        if let Some(down_for) = self.faults.crash_on_install() {
            // Power loss half-way through writing the image: nothing else is saved.
            self.slots.interrupt_install()?;
            return Ok(InstallProgress::PowerLost(down_for));
        }
        self.install_received(pending)
            .map(InstallProgress::Finished)
    }

    fn resume(&mut self, pending: &PendingInstall, _image: &Path) -> Result<InstallProgress> {
        let installed = self.slots.installed_sha256()?;
        let download = self.slots.download_matches(&pending.sha256)?;
        let outcome = match reconcile(pending, installed, download) {
            Reconcile::Switched => {
                info!(device = %self.device_id, campaign = %pending.campaign_id, "install was switched before the restart: finishing it");
                self.finish_switched(pending)?
            }
            Reconcile::SwitchAgain => {
                info!(device = %self.device_id, campaign = %pending.campaign_id, "install interrupted before the switch: installing again");
                self.install_received(pending)?
            }
            Reconcile::Lost => {
                warn!(device = %self.device_id, campaign = %pending.campaign_id, "install interrupted and the received image is gone: reporting a rollback");
                FinalOutcome::RolledBack {
                    reason: "install interrupted by a power loss; the received image was lost"
                        .into(),
                }
            }
        };
        Ok(InstallProgress::Finished(outcome))
    }

    fn next_outcome(&mut self) -> impl Future<Output = LateOutcome> + Send {
        // Every install finishes in `install` or `resume`.
        std::future::pending()
    }
}

/// What a boot finds of an install that was pending when power was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconcile {
    /// The installed image is the pending one: the switch happened; finish it.
    Switched,
    /// The old image still runs and the received one is intact: switch again.
    SwitchAgain,
    /// Neither: the install cannot be finished (reported as a rollback).
    Lost,
}

/// Decide how to finish a pending install from what is on disk (pure).
fn reconcile(
    pending: &PendingInstall,
    installed_sha256: Option<[u8; 32]>,
    download_matches: bool,
) -> Reconcile {
    if installed_sha256 == Some(pending.sha256) {
        Reconcile::Switched
    } else if download_matches {
        Reconcile::SwitchAgain
    } else {
        Reconcile::Lost
    }
}

#[cfg(test)]
mod tests {
    //! The device's handling of a campaign and of each fault switch, against a manager session
    //! and a broker in memory (retained messages, exact-topic subscriptions): the same
    //! `Device::process` the connection loop uses, without sockets.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::sync::Arc;
    use std::time::Duration;

    use rand::Rng;
    use sealed_ota_device::runner::ConnectionEnd;
    use sealed_ota_device::store::DeviceDir;
    use sealed_ota_device::Outcome;
    use sealed_ota_protocol::{
        Action, CampaignPayload, CampaignSpec, CertificateAuthority, DeviceSession, DeviceState,
        DeviceTarget, Identity, Inbound, ManagerConfig, ManagerEvent, ManagerSession, Outbound,
        PreparedCampaign, RejectReason, ReleaseKey, Role, RotationMode, TopicTree,
    };
    use tokio::sync::watch;

    use super::*;
    use crate::faults::FaultSpec;
    use crate::fleet::FleetObserver;
    use crate::mqtt_io::BrokerEndpoint;
    use crate::stats::FleetStats;

    const CHUNK: u32 = 1024;
    const CHUNKS: u32 = 10;
    const DEVICE: &str = "dev-00000";

    struct World {
        _tmp: tempfile::TempDir,
        settings: Arc<Settings>,
        stats: Arc<FleetStats>,
        dir: DeviceDir,
        device: EmulatedDevice,
        session: DeviceSession,
        manager: ManagerSession,
        campaign: Arc<PreparedCampaign>,
        retained: BTreeMap<String, Outbound>,
        subscribed: BTreeSet<String>,
        to_device: VecDeque<Inbound>,
        manager_events: Vec<ManagerEvent>,
        image: Vec<u8>,
        _shutdown: watch::Sender<bool>,
    }

    /// What the world's campaign delivers.
    #[derive(Clone, Copy)]
    enum Delivers {
        Firmware,
        Credentials(RotationMode),
    }

    impl World {
        fn new(faults: &[&str]) -> Self {
            Self::with(faults, 1, Delivers::Firmware)
        }

        fn with(faults: &[&str], save_every_chunks: u32, delivers: Delivers) -> Self {
            Self::build(faults, save_every_chunks, delivers, Vec::new())
        }

        fn build(
            faults: &[&str],
            save_every_chunks: u32,
            delivers: Delivers,
            release_keys: Vec<ReleaseKey>,
        ) -> Self {
            let now = unix_now();
            let tmp = tempfile::tempdir().unwrap();
            let ca = Arc::new(CertificateAuthority::generate("test-ca", now, 1).unwrap());
            let topics = Arc::new(TopicTree::new("iot", "manager").unwrap());
            let dir = DeviceDir::at(tmp.path().join(DEVICE));
            let identity = ca.issue(Role::Device, DEVICE, now, 1).unwrap();
            dir.write_credentials(&identity.cert_pem(), &identity.key_pem())
                .unwrap();
            let stats = Arc::new(FleetStats::new(1));
            let settings = Arc::new(Settings {
                endpoint: BrokerEndpoint::parse("mqtt://127.0.0.1:1883", None).unwrap(),
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::clone(&topics),
                initial_version: "1.0.0".into(),
                max_packet_size: 64 * 1024,
                window: 4,
                window_timeout: 30,
                keep_alive: Duration::from_secs(60),
                poll_interval: Duration::from_secs(1),
                save_every_chunks,
                pacer: None,
                observer: Arc::new(FleetObserver::new(Arc::clone(&stats), None)),
                release_keys,
                key_log: None,
                health_report_after: Some(Duration::from_secs(2)),
            });
            let specs: Vec<FaultSpec> = faults.iter().map(|f| f.parse().unwrap()).collect();
            let (shutdown, shutdown_rx) = watch::channel(false);
            let faults = DeviceFaults::for_device(&specs, DEVICE, 0);
            let mut device = EmulatedDevice::new(
                Arc::clone(&settings),
                DEVICE.into(),
                dir.clone(),
                EmulatedInstaller::new(DEVICE, dir.root(), faults.clone()),
                Box::new(faults),
                shutdown_rx,
            );
            let mut image = vec![0u8; (CHUNK * CHUNKS - 100) as usize];
            rand::thread_rng().fill(&mut image[..]);
            let payload = match delivers {
                Delivers::Firmware => CampaignPayload::Firmware {
                    image: image.clone(),
                },
                Delivers::Credentials(mode) => CampaignPayload::RotateCredentials {
                    mode,
                    ca: Arc::clone(&ca),
                    validity_days: 1,
                },
            };
            let campaign = Arc::new(
                PreparedCampaign::prepare(CampaignSpec {
                    campaign_id: "fw-1".into(),
                    target_version: "1.1.0".into(),
                    payload,
                    expires_at: now + 3600,
                    chunk_size: CHUNK,
                    release: None,
                })
                .unwrap(),
            );
            let manager_config = ManagerConfig {
                identity: Arc::new(ca.issue(Role::Manager, "manager", now, 1).unwrap()),
                trust: Arc::new(ca.trust_anchor()),
                topics: Arc::clone(&topics),
            };
            let target = DeviceTarget {
                device_id: DEVICE.into(),
                pinned_fingerprint: None,
                allow_downgrade: false,
            };
            let (manager, notify) =
                ManagerSession::start(&manager_config, Arc::clone(&campaign), target, now).unwrap();
            let boot = device.boot().unwrap();
            let mut world = World {
                _tmp: tmp,
                settings,
                stats,
                dir,
                device,
                session: boot.session,
                manager,
                campaign,
                retained: BTreeMap::new(),
                subscribed: BTreeSet::new(),
                to_device: VecDeque::new(),
                manager_events: Vec::new(),
                image,
                _shutdown: shutdown,
            };
            let chunks = world.campaign.chunk_publishes(&world.settings.topics);
            chunks.into_iter().for_each(|c| world.publish(c));
            world.route_manager_actions(notify);
            world.route_device_actions(boot.actions);
            world
        }

        fn publish(&mut self, out: Outbound) {
            if out.retain {
                if out.payload.is_empty() {
                    self.retained.remove(&out.topic);
                } else {
                    self.retained.insert(out.topic.clone(), out.clone());
                }
            }
            if self.subscribed.contains(&out.topic) {
                self.to_device.push_back(out.to_inbound());
            }
        }

        fn route_manager_actions(&mut self, actions: Vec<Action>) {
            for action in actions {
                if let Action::Publish(out) = action {
                    self.publish(out);
                }
            }
        }

        fn route_device_actions(&mut self, actions: Vec<Action>) {
            for action in actions {
                match action {
                    Action::Subscribe(topics) => {
                        for topic in topics {
                            if let Some(retained) = self.retained.get(&topic) {
                                self.to_device.push_back(retained.to_inbound());
                            }
                            self.subscribed.insert(topic);
                        }
                    }
                    Action::Unsubscribe(topics) => {
                        topics.iter().for_each(|t| {
                            self.subscribed.remove(t);
                        });
                    }
                    Action::Publish(out) => {
                        let Ok(output) = self.manager.handle(&out.to_inbound(), unix_now()) else {
                            continue;
                        };
                        self.route_manager_actions(output.actions);
                        for event in output.events {
                            if let ManagerEvent::ChunksRequested { indices } = &event {
                                for &index in indices {
                                    let chunk =
                                        self.campaign.chunk_publish(&self.settings.topics, index);
                                    self.publish(chunk);
                                }
                            }
                            self.manager_events.push(event);
                        }
                    }
                }
            }
        }

        /// Delivers queued messages until none is left, the connection ends, or `stop` holds.
        fn run_until(&mut self, stop: impl Fn(&World) -> bool) -> Option<ConnectionEnd> {
            while let Some(message) = self.to_device.pop_front() {
                let step = self.device.process(&mut self.session, message).unwrap();
                if !matches!(step.end, Some(ConnectionEnd::Crash(_))) {
                    self.route_device_actions(step.actions);
                }
                if step.end.is_some() {
                    return step.end;
                }
                if stop(self) {
                    return None;
                }
            }
            None
        }

        fn run(&mut self) -> Option<ConnectionEnd> {
            self.run_until(|_| false)
        }

        /// The connection drops; the same session continues on a new one.
        fn reconnect(&mut self) {
            self.subscribed.clear();
            self.to_device.clear();
            let actions = self.session.on_reconnect(unix_now());
            self.route_device_actions(actions);
        }

        /// The device loses power (or the emulator is killed) and boots from its directory.
        fn reboot(&mut self) {
            self.subscribed.clear();
            self.to_device.clear();
            let boot = self.device.boot().unwrap();
            self.session = boot.session;
            self.route_device_actions(boot.actions);
        }

        fn chunks(&self) -> u64 {
            self.stats.summary(Default::default()).chunks_received
        }

        /// Messages delivered on chunk topics, accepted or not.
        fn chunk_deliveries(&self) -> u64 {
            self.stats.summary(Default::default()).chunk_deliveries
        }

        fn installed(&self) -> bool {
            self.manager_events
                .iter()
                .any(|e| matches!(e, ManagerEvent::Installed { version, .. } if version == "1.1.0"))
        }

        fn rejection(&self) -> Option<RejectReason> {
            self.manager_events.iter().find_map(|e| match e {
                ManagerEvent::Rejected { reason, .. } => Some(reason.clone()),
                _ => None,
            })
        }

        fn slots(&self) -> &ImageSlots {
            self.device.installer().slots()
        }

        fn state_on_disk(&self) -> DeviceState {
            self.dir.load_state().unwrap().expect("state saved")
        }
    }

    #[test]
    fn installs_only_after_the_hash_check_then_switches_the_version() {
        let mut world = World::new(&[]);
        assert_eq!(world.run(), None);
        assert!(world.installed(), "{:?}", world.manager_events);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
        assert_eq!(
            std::fs::read(world.slots().firmware_path()).unwrap(),
            world.image
        );
        let state = world.state_on_disk();
        assert_eq!(state.running_version, "1.1.0");
        assert!(state.transfer.is_none());
        assert_eq!(world.device.outcome(), Outcome::Installed);
        // The retained notify seen again after a reboot does not start the campaign over.
        world.reboot();
        assert_eq!(world.run(), None);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
    }

    #[test]
    fn a_rebooted_device_resumes_with_the_chunks_it_saved() {
        let mut world = World::new(&[]);
        world.run_until(|w| w.chunks() == 6);
        let saved = world.state_on_disk().transfer.unwrap().received.count();
        assert_eq!(saved, 6);
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            world.chunks(),
            u64::from(CHUNKS),
            "no chunk travelled twice"
        );
        assert_eq!(
            std::fs::read(world.slots().firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn state_saved_less_often_than_chunks_lags_the_data_never_leads_it() {
        let mut world = World::with(&[], 4, Delivers::Firmware);
        world.run_until(|w| w.chunks() == 6);
        assert_eq!(world.state_on_disk().transfer.unwrap().received.count(), 4);
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            world.chunks(),
            u64::from(CHUNKS) + 2,
            "two chunks fetched again"
        );
        assert_eq!(
            std::fs::read(world.slots().firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn refuse_sends_a_signed_decline_and_takes_no_chunk() {
        let mut world = World::new(&["refuse:reason=maintenance"]);
        world.run();
        assert_eq!(
            world.rejection(),
            Some(RejectReason::DeclinedByDevice("maintenance".into()))
        );
        assert_eq!(world.chunks(), 0);
        assert_eq!(world.device.outcome(), Outcome::Rejected);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn storage_bitflip_fails_the_install_and_keeps_the_running_version() {
        let mut world = World::new(&["bitflip:p=1,where=storage"]);
        world.run();
        assert_eq!(world.rejection(), Some(RejectReason::ImageHashMismatch));
        assert_eq!(world.device.outcome(), Outcome::Failed);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
        assert!(!world.slots().firmware_path().exists());
    }

    #[test]
    fn wire_bitflip_chunks_are_refused_then_subscribed_and_requested_again() {
        let mut world = World::new(&["bitflip:p=1,where=wire"]);
        world.run();
        assert_eq!(world.chunks(), 0, "no tampered chunk is accepted");
        assert_eq!(
            world.stats.messages_rejected(),
            4,
            "the whole window refused"
        );
        let asked = |world: &World| {
            world
                .manager_events
                .iter()
                .filter(|e| matches!(e, ManagerEvent::ChunksRequested { indices } if indices.len() == 4))
                .count()
        };
        // At the window timeout the device subscribes the missing chunks again: the broker sends
        // their retained copies once more (flipped again on this wire).
        let actions = world.session.poll(unix_now() + 31);
        world.route_device_actions(actions);
        world.run();
        assert_eq!(asked(&world), 0, "the manager is not asked yet");
        assert_eq!(world.stats.messages_rejected(), 8);
        // At the next timeout it asks the manager, whose republish is refused as well.
        let actions = world.session.poll(unix_now() + 62);
        world.route_device_actions(actions);
        assert_eq!(asked(&world), 1, "then the manager is asked");
        world.run();
        assert_eq!(world.stats.messages_rejected(), 12);
        assert_eq!(
            world.chunk_deliveries(),
            12,
            "refused chunks are deliveries all the same"
        );
        assert!(!world.installed());
    }

    #[test]
    fn offline_after_k_chunks_ends_the_connection_and_the_session_resumes() {
        let mut world = World::new(&["offline:after=3,for=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Offline(Duration::from_secs(1)))
        );
        assert_eq!(world.chunks(), 3);
        world.reconnect();
        assert_eq!(world.run(), None, "offline fires once");
        assert!(world.installed());
        assert_eq!(world.chunks(), u64::from(CHUNKS));
        assert_eq!(
            world.chunk_deliveries(),
            u64::from(CHUNKS),
            "the window subscribed again after the reconnect holds only the chunks still missing"
        );
    }

    #[test]
    fn offline_on_the_last_chunk_still_completes_the_image() {
        let mut world = World::new(&[&format!("offline:after={CHUNKS},for=1s")]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Offline(Duration::from_secs(1)))
        );
        assert!(
            world.installed(),
            "the install went out before going offline"
        );
    }

    #[test]
    fn crash_during_install_keeps_the_old_version_and_installs_after_reboot() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Crash(Duration::from_secs(1)))
        );
        assert!(world.dir.root().join("firmware.staging").exists());
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
        assert!(!world.installed());
        world.reboot();
        assert!(!world.dir.root().join("firmware.staging").exists());
        assert_eq!(world.run(), None);
        assert!(world.installed());
        assert_eq!(
            std::fs::read(world.slots().firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn a_small_maximum_packet_size_refuses_the_update() {
        let mut world = World::new(&["max-packet:bytes=1024"]);
        world.run();
        assert!(
            matches!(
                world.rejection(),
                Some(RejectReason::PacketTooLarge {
                    max_packet_size: 1024,
                    ..
                })
            ),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.chunks(), 0);
    }

    #[test]
    fn a_committed_install_is_followed_by_a_signed_health_report_the_fault_can_fail() {
        for (faults, healthy) in [
            (&[][..], true),
            (&["unhealthy:reason=watchdog resets"][..], false),
        ] {
            let mut world = World::new(faults);
            assert_eq!(world.run(), None);
            assert!(world.installed());
            let verifier = world.manager.health_verifier().expect("installed firmware");
            let now = unix_now();
            assert!(
                world.device.health_report(&world.session, now).is_none(),
                "not due before --health-report-after"
            );
            let Some(Action::Publish(report)) = world.device.health_report(&world.session, now + 3)
            else {
                panic!("the report is due");
            };
            let verified = verifier.verify(&report.payload).unwrap();
            assert_eq!(verified.healthy, healthy, "{faults:?}");
            if !healthy {
                assert_eq!(verified.detail, "watchdog resets");
            }
            assert!(
                world
                    .device
                    .health_report(&world.session, now + 10)
                    .is_none(),
                "sent once"
            );
            assert_eq!(
                world.stats.health_reports(),
                (u64::from(healthy), u64::from(!healthy))
            );
        }
    }

    #[test]
    fn a_failed_self_test_rolls_back_and_is_reported_signed() {
        let mut world = World::new(&["selftest-fail:reason=watchdog reset"]);
        assert_eq!(world.run(), None);
        assert!(!world.installed());
        assert!(
            world.manager_events.iter().any(|e| matches!(
                e,
                ManagerEvent::RolledBack { version, reason, .. }
                    if version == "1.1.0" && reason == "watchdog reset"
            )),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.device.outcome(), Outcome::RolledBack);
        let state = world.state_on_disk();
        assert_eq!(state.running_version, "1.0.0");
        assert!(state.pending_install.is_none());
        // This was the device's first image: nothing to go back to, nothing installed.
        assert!(!world.slots().firmware_path().exists());
        // Rebooting does not try again.
        world.reboot();
        assert_eq!(world.run(), None);
        assert_eq!(world.chunks(), u64::from(CHUNKS));
    }

    /// The install is persisted as pending before the switch: a power loss right after the switch
    /// is finished at boot, and the signed receipt goes out bound to the session the image came in.
    #[test]
    fn a_power_loss_after_the_switch_is_committed_at_boot() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        assert_eq!(
            world.run(),
            Some(ConnectionEnd::Crash(Duration::from_secs(1)))
        );
        let pending = world
            .state_on_disk()
            .pending_install
            .expect("persisted first");
        assert_eq!(pending.version, "1.1.0");
        // The switch itself completed before the power went.
        world
            .slots()
            .switch_image(&pending.version, pending.size, &pending.sha256)
            .unwrap();
        world.reboot();
        assert_eq!(world.run(), None);
        assert!(world.installed(), "{:?}", world.manager_events);
        assert_eq!(world.state_on_disk().running_version, "1.1.0");
        assert!(world.state_on_disk().pending_install.is_none());
        assert_eq!(
            std::fs::read(world.slots().firmware_path()).unwrap(),
            world.image
        );
    }

    #[test]
    fn a_pending_install_whose_image_was_lost_is_reported_as_rolled_back() {
        let mut world = World::new(&["crash-install:restart-after=1s"]);
        world.run();
        std::fs::remove_file(world.dir.root().join("download.part")).unwrap();
        world.reboot();
        world.run();
        assert!(!world.installed());
        assert!(world
            .manager_events
            .iter()
            .any(|e| matches!(e, ManagerEvent::RolledBack { .. })));
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn reconciling_a_pending_install() {
        let pending = PendingInstall {
            campaign_id: "c".into(),
            binding: sealed_ota_protocol::SessionBinding {
                session_id: [0; 16],
                transcript: [0; 32],
                issued_at: 0,
            },
            version: "2.0.0".into(),
            sha256: [7; 32],
            size: 1,
            release_key: None,
        };
        assert_eq!(
            reconcile(&pending, Some([7; 32]), false),
            Reconcile::Switched
        );
        assert_eq!(
            reconcile(&pending, Some([7; 32]), true),
            Reconcile::Switched
        );
        assert_eq!(
            reconcile(&pending, Some([1; 32]), true),
            Reconcile::SwitchAgain
        );
        assert_eq!(reconcile(&pending, None, true), Reconcile::SwitchAgain);
        assert_eq!(reconcile(&pending, None, false), Reconcile::Lost);
    }

    #[test]
    fn a_device_enrolled_with_a_release_key_refuses_unsigned_firmware() {
        let key = sealed_ota_protocol::ReleaseSigner::generate().public();
        let mut world = World::build(&[], 1, Delivers::Firmware, vec![key]);
        world.run();
        assert!(
            matches!(world.rejection(), Some(RejectReason::ReleaseSignature(_))),
            "{:?}",
            world.manager_events
        );
        assert_eq!(world.chunks(), 0);
        assert_eq!(world.state_on_disk().running_version, "1.0.0");
    }

    #[test]
    fn a_clock_past_the_campaign_expiry_refuses_the_notify() {
        let mut world = World::new(&["clock-skew:seconds=7200"]);
        world.run();
        assert_eq!(world.stats.messages_rejected(), 1);
        assert!(world.manager_events.is_empty(), "no ready was sent");
    }

    #[test]
    fn rotated_credentials_replace_the_old_ones_and_trigger_a_reconnect() {
        for mode in [RotationMode::DeliverKey, RotationMode::Csr] {
            let mut world = World::with(&[], 1, Delivers::Credentials(mode));
            let (old_cert, _) = world.dir.read_credentials().unwrap();
            assert_eq!(world.run(), Some(ConnectionEnd::Reload), "{mode:?}");
            assert!(world.installed(), "{mode:?}: {:?}", world.manager_events);
            let (new_cert, new_key) = world.dir.read_credentials().unwrap();
            assert_ne!(new_cert, old_cert);
            let identity = Identity::from_pem(&new_cert, &new_key).unwrap();
            assert_eq!(identity.name(), DEVICE);
            // The next boot uses them.
            world.reboot();
            assert_eq!(world.run(), None);
        }
    }
}
