//! `sealed-ota broker check` as a process against the test bed's broker (`eval "$(e2e/testbed
//! env)"`): the table and the JSON carry the probe's report, and bad flags get an error naming the
//! flag and the fix, with nothing probed.

use std::process::{Command, Output};

use sealed_ota_mqtt::probe::{BrokerReport, Feature, Verdict};

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run eval \"$(e2e/testbed env)\" first"))
}

fn sealed_ota(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealed-ota"))
        .args(args)
        .output()
        .expect("running sealed-ota")
}

fn check_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "broker".into(),
        "check".into(),
        "--broker".into(),
        env("SEALED_OTA_MQTTS_URLS"),
        "--ca".into(),
        env("SEALED_OTA_CA_FILE"),
        "--cert".into(),
        env("SEALED_OTA_CLIENT_CERT"),
        "--key".into(),
        env("SEALED_OTA_CLIENT_KEY"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_test_bed_broker_is_probed_and_reported_as_a_table_and_as_json() {
    let args = check_args(&["-o", "json"]);
    let out = sealed_ota(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: BrokerReport = serde_json::from_slice(&out.stdout).expect("the JSON is a report");
    assert!(report.usable(), "{report:#?}");
    for feature in [
        Feature::RetainedSize,
        Feature::ResponseTopic,
        Feature::SharedSubscriptions,
    ] {
        let check = report
            .check(feature)
            .unwrap_or_else(|| panic!("{feature:?} not probed"));
        assert_ne!(check.verdict, Verdict::NotTested, "{check:?}");
    }
    assert!(report.fit.max_chunk_size.is_some(), "{:?}", report.fit);
    // Devices fetch a retained chunk the broker failed to deliver by subscribing it again; the
    // test bed's Mosquitto sends it again, as MQTT 5 says.
    let again = report
        .check(Feature::RetainedOnResubscribe)
        .expect("RetainedOnResubscribe probed");
    assert_eq!(again.verdict, Verdict::Works, "{again:?}");

    let args = check_args(&[]);
    let out = sealed_ota(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(table.starts_with("broker mqtts://"), "{table}");
    for needle in [
        Feature::RetainedSize.title(),
        "spec.chunkSize at most",
        "usable: yes",
    ] {
        assert!(table.contains(needle), "no {needle:?} in:\n{table}");
    }
}

#[test]
fn bad_flags_name_the_flag_and_the_fix() {
    let ca = env("SEALED_OTA_CA_FILE");
    let url = env("SEALED_OTA_MQTTS_URLS");
    let url = url.split(',').next().unwrap();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--broker", "http://127.0.0.1:1"], "--broker", "mqtt"),
        (vec!["--broker", url], "--ca", "pass --ca"),
        (
            vec!["--broker", url, "--ca", "/nonexistent/ca.crt"],
            "--ca",
            "cannot read",
        ),
        (
            vec!["--broker", url, "--ca", &ca, "-o", "xml"],
            "--output",
            "json",
        ),
    ];
    for (flags, flag, fix) in cases {
        let mut args = vec!["broker", "check"];
        args.extend(&flags);
        let out = sealed_ota(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(out.stdout.is_empty(), "{flags:?} printed a report");
        assert!(
            stderr.contains(flag) && stderr.contains(fix),
            "{flags:?}: the error does not name {flag} and {fix:?}: {stderr}"
        );
    }
}

#[test]
fn shell_completions_are_generated_for_every_command() {
    let out = sealed_ota(&["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = text(&out.stdout);
    for needle in ["_sealed__ota", "broker", "release", "--output"] {
        assert!(
            script.contains(needle),
            "no {needle:?} in the bash completions"
        );
    }
}
