//! The command line as a person uses it: `check-config` (every field error names the field and
//! the fix), `keygen` (the key stays on the device, mode 0600; the CSR, signed by a CA tool,
//! gives a certificate that `check-config` accepts), `status`, and `run` with nothing to do.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use sealed_ota_protocol::identity::CertificateAuthority;
use support::Board;

fn command_board() -> Board {
    Board::new(
        "[installer]\ntype = \"command\"\n\n[installer.command]\npath = \"/bin/true\"\n",
        "",
    )
}

#[test]
fn check_config_accepts_a_complete_configuration() {
    let board = command_board();
    let out = board.agent(&["check-config"], None, &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("ok (installer command)"),
        "{}",
        out.stdout
    );
}

#[test]
fn check_config_lists_every_problem_with_its_field_and_fix() {
    let board = command_board();
    let config = fs::read_to_string(board.config())
        .unwrap()
        .replace("id = \"board-1\"", "id = \"Board_1\"")
        .replace("mqtts://127.0.0.1:8883", "https://broker")
        .replace("path = \"/bin/true\"", "path = \"/nonexistent/hook\"");
    fs::write(board.config(), config).unwrap();
    fs::set_permissions(
        board.path().join("pki/device.key"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = board.agent(&["check-config"], None, &[]);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    for field in [
        "device.id:",
        "broker.url:",
        "installer.command.path:",
        "device.key_file:",
    ] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("no error for {field}:\n{}", out.stderr));
        assert!(line.contains("; fix: "), "{line}");
    }
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
}

#[test]
fn a_malformed_file_names_the_line_and_key() {
    let board = command_board();
    let config = fs::read_to_string(board.config())
        .unwrap()
        .replace("wait_secs = 30", "wait_secs = \"thirty\"");
    fs::write(board.config(), config).unwrap();
    let out = board.agent(&["check-config"], None, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("wait_secs") && out.stderr.contains("line"),
        "{}",
        out.stderr
    );
}

#[test]
fn keygen_makes_a_private_key_and_a_csr_a_ca_tool_can_sign() {
    let board = command_board();
    let key = board.path().join("pki/device.key");
    fs::remove_file(&key).unwrap();
    fs::remove_file(board.path().join("pki/device.crt")).unwrap();
    let csr = board.path().join("device.csr");
    let out = board.agent(&["keygen", "--csr-out", csr.to_str().unwrap()], None, &[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{}",
        out.stdout
    );
    assert_eq!(fs::read_to_string(&csr).unwrap(), out.stdout);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first_key = fs::read(&key).unwrap();

    // A second keygen refuses to replace the key.
    let again = board.agent(&["keygen"], None, &[]);
    assert_eq!(again.code(), Some(1));
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    assert_eq!(fs::read(&key).unwrap(), first_key);

    // Without the certificate, check-config says what to do.
    let check = board.agent(&["check-config"], None, &[]);
    assert_eq!(check.code(), Some(2));
    assert!(
        check.stderr.contains("device.cert_file: cannot read"),
        "{}",
        check.stderr
    );

    // Sign the CSR with openssl and the board's CA, as README.md shows.
    // (The board keeps no CA key: a CA is made here, and the board trusts it.)
    let ca = CertificateAuthority::generate("signing-ca", now() - 60, 30).unwrap();
    fs::write(board.path().join("pki/ca.crt"), ca.cert_pem()).unwrap();
    fs::write(board.path().join("pki/ca.key"), ca.key_pem().as_bytes()).unwrap();
    fs::write(
        board.path().join("device.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:urn:sealed-ota:device:board-1\n",
    )
    .unwrap();
    let signed = Command::new("openssl")
        .args(["x509", "-req", "-days", "10", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(board.path().join("pki/ca.crt"))
        .arg("-CAkey")
        .arg(board.path().join("pki/ca.key"))
        .arg("-extfile")
        .arg(board.path().join("device.ext"))
        .arg("-out")
        .arg(board.path().join("pki/device.crt"))
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let check = board.agent(&["check-config"], None, &[]);
    assert!(check.status.success(), "{}", check.stderr);
}

#[test]
fn status_and_an_idle_finish() {
    let board = command_board();
    let status = board.agent(&["status"], None, &[]);
    assert!(status.status.success(), "{}", status.stderr);
    assert!(
        status.stdout.contains("running: 1.0.0"),
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains("under way: none"),
        "{}",
        status.stdout
    );
    let finish = board.agent(&["finish"], None, &[]);
    assert!(finish.status.success(), "{}", finish.stderr);
    assert!(
        finish.stderr.contains("no update under way"),
        "{}",
        finish.stderr
    );
    assert_eq!(
        fs::metadata(board.path().join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

#[test]
fn one_agent_per_state_directory() {
    let board = command_board();
    // A hook that holds the first agent inside its install while a second one starts.
    let hook = board.write_script(
        "slow-hook.sh",
        "#!/bin/sh\n[ \"$1\" = install ] && { touch \"$BOARD/installing\"; sleep 5; }\nexit 0\n",
    );
    let config = fs::read_to_string(board.config())
        .unwrap()
        .replace("/bin/true", hook.to_str().unwrap());
    fs::write(board.config(), config).unwrap();
    let image = board.path().join("image");
    fs::write(&image, "x").unwrap();
    let mut first = Command::new(support::agent_bin())
        .arg("--config")
        .arg(board.config())
        .args(["install", "--version", "2.0.0", "--image"])
        .arg(&image)
        .env("BOARD", board.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !board.path().join("installing").exists() {
        assert!(
            started.elapsed().as_secs() < 20,
            "the first agent did not start installing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = board.agent(&["run"], None, &[]);
    assert_eq!(second.code(), Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("another sealed-ota-agent is using"),
        "{}",
        second.stderr
    );
    assert!(first.wait().unwrap().success());
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
