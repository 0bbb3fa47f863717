//! The agent as a device's service for the end-to-end tests: a board enrolled with a product of
//! the e2e kit (its key made on the board by `keygen`, its CSR signed and its `Device` created by
//! `sealed-ota device enroll --csr`), and `sealed-ota-agent run` started again as systemd would
//! (`Restart=`) after a crash point killed it, and after the reboot it asked for (the board's
//! reboot command stops it with SIGTERM; the harness plays the reboot through the device's
//! `power_cycle`). Each run's log stays on the board (`agent-run-N.log`).

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sealed_ota_e2e::product::{binary, Product};

use crate::support::{agent_bin, Board, Crash, Device};

/// Makes `board` the device `device_id` of `product`: its configuration points at the product's
/// broker and manager (the test bed's CA), its key is made on the board and its CSR enrolled with
/// the CLI (certificate into the board, `Device` labelled `fleet=<namespace>` in the product's
/// namespace, with `labels` besides). `check-config` must pass afterwards.
pub fn enroll(board: &Board, product: &Product, device_id: &str, labels: &[(&str, &str)]) {
    let bed = product.bed;
    fs::copy(&bed.ca_file, board.path().join("pki/ca.crt")).unwrap();
    let config = fs::read_to_string(board.config())
        .unwrap()
        .replace("id = \"board-1\"", &format!("id = \"{device_id}\""))
        .replace(
            "url = \"mqtts://127.0.0.1:8883\"",
            &format!("url = \"{}\"", product.device_broker_urls),
        )
        .replace(
            "[manager]\nid = \"manager\"",
            &format!("[manager]\nid = \"{}\"", product.manager_id),
        );
    fs::write(
        board.config(),
        format!("{config}\n[session]\nwindow_timeout_secs = 3\n"),
    )
    .unwrap();
    let csr = board.path().join("pki/device.csr");
    let keygen = board.agent(
        &["keygen", "--force", "--csr-out", csr.to_str().unwrap()],
        None,
        &[],
    );
    assert!(keygen.status.success(), "keygen: {}", keygen.stderr);
    let mut command = Command::new(binary("sealed-ota"));
    command
        .args(["device", "enroll", "--csr"])
        .arg(&csr)
        .args(["--id", device_id, "--ca-cert"])
        .arg(&bed.ca_file)
        .arg("--ca-key")
        .arg(&bed.ca_key_file)
        .arg("--cert-out")
        .arg(board.path().join("pki/device.crt"))
        .args(["--label", &format!("fleet={}", product.fleet_label())])
        .args(["-n", &product.ns.name, "--apply"])
        .env("KUBECONFIG", &bed.kubeconfig);
    for (key, value) in labels {
        command.args(["--label", &format!("{key}={value}")]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "sealed-ota device enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = board.agent(&["check-config"], None, &[]);
    assert!(check.status.success(), "check-config: {}", check.stderr);
}

/// What the supervisor saw.
#[derive(Debug, Clone, Default)]
pub struct ServiceRecord {
    /// Agent processes started.
    pub starts: usize,
    /// Whether the armed crash point fired.
    pub crash_fired: bool,
    /// Reboots played (asked for by the agent, or a power cut after a crash).
    pub reboots: usize,
    /// Exits that were neither the armed crash nor a reboot, nor the final stop.
    pub unexpected: Vec<String>,
}

/// `sealed-ota-agent run` on a device, supervised on a thread of its own.
pub struct Service<D: Device + Send + 'static> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(D, ServiceRecord)>>,
}

impl<D: Device + Send + 'static> Service<D> {
    /// Starts the service. `crash` is armed until it fires once (in the process it names, or in
    /// every one); after it fires the device restarts in the same boot, or power-cycles when
    /// `power_cut`.
    pub fn start(device: D, crash: Option<Crash>, power_cut: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || supervise(device, crash, power_cut, &stopping));
        Service {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the agent (SIGTERM, as systemd) and returns the device and what happened.
    pub fn stop(mut self) -> (D, ServiceRecord) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("stopped once")
            .join()
            .expect("the supervisor thread panicked")
    }
}

impl<D: Device + Send + 'static> Drop for Service<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const SIGKILL: i32 = 9;

fn supervise<D: Device>(
    mut device: D,
    crash: Option<Crash>,
    power_cut: bool,
    stop: &AtomicBool,
) -> (D, ServiceRecord) {
    let mut record = ServiceRecord::default();
    let mut process = 0;
    while !stop.load(Ordering::SeqCst) {
        process += 1;
        let armed = crash
            .as_ref()
            .filter(|c| !record.crash_fired && c.process.is_none_or(|p| p == process))
            .map(|c| c.point.clone());
        let board = device.board();
        let log = fs::File::create(board.path().join(format!("agent-run-{process}.log"))).unwrap();
        let mut command = Command::new(agent_bin());
        command
            .arg("--config")
            .arg(board.config())
            .arg("run")
            .env("BOARD", board.path())
            .env("RUST_LOG", "info")
            .env_remove("SEALED_OTA_AGENT_CRASH_AT")
            .envs(device.env())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(point) = &armed {
            command.env("SEALED_OTA_AGENT_CRASH_AT", point);
        }
        let mut child = command.spawn().expect("starting sealed-ota-agent run");
        record.starts += 1;
        let (status, stopped) = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break (status, false);
            }
            if stop.load(Ordering::SeqCst) {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                break (child.wait().unwrap(), true);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if stopped {
            break;
        }
        if status.signal() == Some(SIGKILL) && armed.is_some() {
            record.crash_fired = true;
            if power_cut {
                device.power_cycle();
                record.reboots += 1;
            }
        } else if device.board().take_reboot_request() {
            device.power_cycle();
            record.reboots += 1;
        } else {
            record
                .unexpected
                .push(format!("agent process {process} ended with {status}"));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    (device, record)
}
