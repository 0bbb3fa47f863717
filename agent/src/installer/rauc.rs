//! The `rauc` backend: a thin D-Bus client of RAUC's service (`de.pengutronix.rauc.Installer`),
//! as rauc-hawkbit-updater is. It owns the calls: `InstallBundle` (waiting for `Completed`, reading
//! `Progress` meanwhile), `GetPrimary` and `GetSlotStatus` to learn which slot the bundle went to,
//! the `BootSlot` property to see what booted, and `Mark` good / bad / active for commit and
//! rollback. RAUC itself checks the bundle's signature and `compatible`; the booted slot tells
//! whether a reboot really switched images.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use zbus::blocking::Connection;
use zbus::zvariant::{OwnedValue, Value};

use super::{Installed, Installer, InstallerError, Prepared, StepContext, Towards};
use crate::config::RaucConfig;
use crate::crashpoint::{self, CrashPoint};
use crate::transaction::RebootBy;

#[zbus::proxy(
    interface = "de.pengutronix.rauc.Installer",
    default_service = "de.pengutronix.rauc",
    default_path = "/",
    gen_async = false,
    blocking_name = "RaucInstaller"
)]
trait RaucInstallerApi {
    fn install_bundle(&self, source: &str, args: HashMap<&str, Value<'_>>) -> zbus::Result<()>;
    fn mark(&self, state: &str, slot_identifier: &str) -> zbus::Result<(String, String)>;
    fn get_primary(&self) -> zbus::Result<String>;
    fn get_slot_status(&self) -> zbus::Result<Vec<(String, HashMap<String, OwnedValue>)>>;
    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<(i32, String, i32)>;
    #[zbus(property)]
    fn boot_slot(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn completed(&self, result: i32) -> zbus::Result<()>;
}

/// How long a rollback waits for an install still running in RAUC (the agent may have died while
/// RAUC kept installing).
const BUSY_WAIT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(250);

/// The RAUC backend.
#[derive(Debug)]
pub struct Rauc {
    config: RaucConfig,
    connection: Option<Connection>,
}

fn dbus_err(what: &str) -> impl Fn(zbus::Error) -> InstallerError + '_ {
    move |e| InstallerError::Rauc(format!("{what}: {e}"))
}

impl Rauc {
    /// The backend as configured (connects on first use).
    pub fn new(config: RaucConfig) -> Self {
        Rauc {
            config,
            connection: None,
        }
    }

    fn proxy(&mut self) -> Result<RaucInstaller<'static>, InstallerError> {
        if self.connection.is_none() {
            let connection = match &self.config.dbus_address {
                Some(address) => zbus::Address::from_str(address)
                    .and_then(|a| zbus::blocking::connection::Builder::address(a)?.build()),
                None => Connection::system(),
            }
            .map_err(dbus_err("connecting to D-Bus"))?;
            self.connection = Some(connection);
        }
        let connection = self.connection.clone().expect("connected above");
        RaucInstaller::builder(&connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .map_err(dbus_err("RAUC service"))
    }

    /// Waits until RAUC is not busy (an install it started may outlive the agent).
    fn wait_idle(&mut self) -> Result<RaucInstaller<'static>, InstallerError> {
        let proxy = self.proxy()?;
        let started = Instant::now();
        loop {
            let operation = proxy.operation().map_err(dbus_err("reading Operation"))?;
            if operation == "idle" {
                return Ok(proxy);
            }
            if started.elapsed() > BUSY_WAIT {
                return Err(InstallerError::Rauc(format!(
                    "still {operation} after {} s",
                    BUSY_WAIT.as_secs()
                )));
            }
            thread::sleep(POLL);
        }
    }

    fn mark(proxy: &RaucInstaller<'_>, state: &str, slot: &str) -> Result<(), InstallerError> {
        let (marked, message) = proxy
            .mark(state, slot)
            .map_err(dbus_err(&format!("marking {slot} {state}")))?;
        tracing::info!(slot = %marked, "RAUC: {message}");
        Ok(())
    }
}

/// Slot name → bootname, from `GetSlotStatus`.
fn bootnames(proxy: &RaucInstaller<'_>) -> Result<HashMap<String, String>, InstallerError> {
    let slots = proxy.get_slot_status().map_err(dbus_err("GetSlotStatus"))?;
    Ok(slots
        .into_iter()
        .filter_map(|(name, props)| {
            let bootname = props
                .get("bootname")
                .and_then(|v| String::try_from(v.clone()).ok())?;
            Some((name, bootname))
        })
        .collect())
}

/// The slot (name, e.g. `rootfs.0`) that booted.
fn booted_slot(proxy: &RaucInstaller<'_>) -> Result<String, InstallerError> {
    let bootname = proxy.boot_slot().map_err(dbus_err("reading BootSlot"))?;
    bootnames(proxy)?
        .into_iter()
        .find(|(_, b)| *b == bootname)
        .map(|(name, _)| name)
        .ok_or_else(|| {
            InstallerError::Rauc(format!("no slot has the booted bootname {bootname:?}"))
        })
}

impl Installer for Rauc {
    fn kind(&self) -> &'static str {
        "rauc"
    }

    fn prepare(&mut self, _step: &StepContext<'_>) -> Result<Prepared, InstallerError> {
        // Reachable and idle: the install can start. The booted slot is journaled before RAUC
        // writes anything, so a rollback after any crash knows which slot to return to.
        let proxy = self.wait_idle()?;
        Ok(Prepared {
            supports_rollback: true,
            booted_slot: Some(booted_slot(&proxy)?),
        })
    }

    fn install(
        &mut self,
        step: &StepContext<'_>,
        progress: &mut dyn FnMut(u8, &str),
    ) -> Result<Installed, InstallerError> {
        let proxy = self.wait_idle()?;
        let previous = previous_slot(step)?;
        // Subscribe before starting, so the end cannot be missed.
        let completed = proxy
            .receive_completed()
            .map_err(dbus_err("subscribing to Completed"))?;
        let (done_tx, done) = mpsc::channel();
        thread::spawn(move || {
            if let Some(signal) = completed.into_iter().next() {
                let result = signal.args().map(|a| a.result).unwrap_or(-1);
                let _ = done_tx.send(result);
            }
        });
        let image = step.image.to_str().ok_or_else(|| {
            InstallerError::Rauc(format!("bundle path {} is not UTF-8", step.image.display()))
        })?;
        proxy
            .install_bundle(image, HashMap::new())
            .map_err(dbus_err("InstallBundle"))?;
        crashpoint::reached(&CrashPoint::During("installing"));
        let timeout = Duration::from_secs(self.config.timeout_secs);
        let started = Instant::now();
        let mut last = None;
        let result = loop {
            match done.recv_timeout(POLL) {
                Ok(result) => break result,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(InstallerError::Rauc(
                        "the Completed signal stream ended".into(),
                    ))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if started.elapsed() > timeout {
                return Err(InstallerError::Rauc(format!(
                    "the install did not complete within {} s",
                    timeout.as_secs()
                )));
            }
            if let Ok((percent, message, _depth)) = proxy.progress() {
                if last.as_ref() != Some(&(percent, message.clone())) {
                    progress(percent.clamp(0, 100) as u8, &message);
                    last = Some((percent, message));
                }
            }
        };
        if result != 0 {
            let error = proxy.last_error().unwrap_or_default();
            return Err(InstallerError::Rauc(format!(
                "install failed ({result}): {error}"
            )));
        }
        progress(100, "installed");
        let target = proxy.get_primary().map_err(dbus_err("GetPrimary"))?;
        if target == previous {
            return Err(InstallerError::Rauc(format!(
                "after the install the primary slot is still the booted one ({target})"
            )));
        }
        Ok(Installed {
            reboot: Some(RebootBy::System),
            target_slot: Some(target),
        })
    }

    fn verify_boot(
        &mut self,
        step: &StepContext<'_>,
        towards: Towards,
    ) -> Result<(), InstallerError> {
        let proxy = self.wait_idle()?;
        let booted = booted_slot(&proxy)?;
        let expected = match towards {
            Towards::New => step.transaction.target_slot.clone().ok_or_else(|| {
                InstallerError::Rauc(
                    "the journal does not record the slot the bundle went to".into(),
                )
            })?,
            Towards::Previous => previous_slot(step)?,
        };
        if booted == expected {
            Ok(())
        } else {
            Err(InstallerError::WrongBoot(format!(
                "booted slot {booted}, expected {expected} (the bootloader fell back or did not switch)"
            )))
        }
    }

    fn commit(&mut self, _step: &StepContext<'_>) -> Result<(), InstallerError> {
        let proxy = self.wait_idle()?;
        Self::mark(&proxy, "good", "booted")
    }

    fn rollback(&mut self, step: &StepContext<'_>) -> Result<Option<RebootBy>, InstallerError> {
        // An install the agent did not see finish may still be running in RAUC.
        let proxy = self.wait_idle()?;
        let previous = previous_slot(step)?;
        let booted = booted_slot(&proxy)?;
        if booted != previous {
            // Running another slot (the new image, booted after the install or a power cut):
            // make it unbootable and the previous one primary, then reboot into it.
            Self::mark(&proxy, "bad", "booted")?;
            Self::mark(&proxy, "active", &previous)?;
            Ok(Some(RebootBy::System))
        } else {
            // On the previous image: keep booting it; the other slot (written or half-written)
            // must not boot.
            Self::mark(&proxy, "active", "booted")?;
            Self::mark(&proxy, "bad", "other")?;
            Ok(None)
        }
    }
}

/// The slot that ran when the transaction was prepared.
fn previous_slot(step: &StepContext<'_>) -> Result<String, InstallerError> {
    step.transaction.previous_slot.clone().ok_or_else(|| {
        InstallerError::Rauc(
            "the journal does not record the slot that ran before the install".into(),
        )
    })
}
