//! The interop table (`make interop`): reads what `e2e/interop.sh` left for each broker under
//! `target/interop/<broker>/` — its kind and version, the broker probe's JSON report, and the
//! output of each product test file run against it — classifies every test against the list of
//! known failures (`e2e/interop/known-failures.tsv`), and renders the Markdown page the README
//! links (`docs/interop.md`). A test listed as a known failure that passes is reported as such, so
//! the list cannot hide a fix; a failure not listed fails the run. Parsing and rendering are pure;
//! the binary `sealed-ota-interop` does the file I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sealed_ota_mqtt::probe::{BrokerReport, Verdict};

/// How one test ended in cargo's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestOutcome {
    /// `... ok`
    Passed,
    /// `... FAILED`
    Failed,
    /// `... ignored` (not run)
    Ignored,
}

/// `test NAME ... ok|FAILED|ignored` lines of `cargo test` output, in order.
pub fn parse_cargo_test(output: &str) -> Vec<(String, TestOutcome)> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("test ")?;
            let (name, result) = rest.rsplit_once(" ... ")?;
            let outcome = match result.trim() {
                "ok" => TestOutcome::Passed,
                "FAILED" => TestOutcome::Failed,
                r if r.starts_with("ignored") => TestOutcome::Ignored,
                _ => return None,
            };
            Some((name.trim().to_string(), outcome))
        })
        .collect()
}

/// A test expected to fail on a broker, with why and the proposed fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownFailure {
    /// Broker kind.
    pub broker: String,
    /// `file::test` (file without `.rs`).
    pub test: String,
    /// The cause.
    pub cause: String,
    /// The fix proposed.
    pub fix: String,
}

/// Parses `known-failures.tsv`: `broker<TAB>file::test<TAB>cause<TAB>fix`, `#` comments.
pub fn parse_known_failures(text: &str) -> Result<Vec<KnownFailure>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let f: Vec<&str> = l.split('\t').collect();
            match f.as_slice() {
                [broker, test, cause, fix] if test.contains("::") => Ok(KnownFailure {
                    broker: broker.trim().into(),
                    test: test.trim().into(),
                    cause: cause.trim().into(),
                    fix: fix.trim().into(),
                }),
                _ => Err(format!(
                    "known-failures.tsv line {}: want broker<TAB>file::test<TAB>cause<TAB>fix",
                    i + 1
                )),
            }
        })
        .collect()
}

/// A test's place in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestVerdict {
    /// Passed, as expected.
    Passed,
    /// Failed, and listed as a known failure.
    KnownFailure(KnownFailure),
    /// Failed, not listed: the run fails.
    Failed,
    /// Listed as a known failure but passed: the list must be updated (the run fails).
    KnownFailurePassed(KnownFailure),
    /// Not run (`#[ignore]` without `--include-ignored`).
    NotRun,
}

/// Everything about one broker.
#[derive(Clone, Debug)]
pub struct BrokerRun {
    /// Kind (`mosquitto`, `mochi`, `rmqtt-cluster`).
    pub broker: String,
    /// Version.
    pub version: String,
    /// The probe's report with the test bed's configuration.
    pub probe: Option<BrokerReport>,
    /// The probe's report against the broker's default configuration, when it differs.
    pub probe_defaults: Option<BrokerReport>,
    /// `file::test` → how it ended.
    pub tests: BTreeMap<String, TestOutcome>,
}

impl BrokerRun {
    /// Each test's verdict against the known failures.
    pub fn verdicts(&self, known: &[KnownFailure]) -> Vec<(String, TestVerdict)> {
        self.tests
            .iter()
            .map(|(test, outcome)| {
                let listed = known
                    .iter()
                    .find(|k| k.broker == self.broker && &k.test == test)
                    .cloned();
                let verdict = match (outcome, listed) {
                    (TestOutcome::Ignored, _) => TestVerdict::NotRun,
                    (TestOutcome::Passed, None) => TestVerdict::Passed,
                    (TestOutcome::Passed, Some(k)) => TestVerdict::KnownFailurePassed(k),
                    (TestOutcome::Failed, Some(k)) => TestVerdict::KnownFailure(k),
                    (TestOutcome::Failed, None) => TestVerdict::Failed,
                };
                (test.clone(), verdict)
            })
            .collect()
    }
}

/// True when no test failed unexpectedly and no known failure passed.
pub fn run_ok(runs: &[BrokerRun], known: &[KnownFailure]) -> bool {
    runs.iter().all(|r| {
        r.verdicts(known)
            .iter()
            .all(|(_, v)| !matches!(v, TestVerdict::Failed | TestVerdict::KnownFailurePassed(_)))
    })
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Works => "works",
        Verdict::Limited => "limited",
        Verdict::Broken => "**broken**",
        Verdict::NotTested => "not tested",
    }
}

/// The Markdown page.
pub fn render(runs: &[BrokerRun], known: &[KnownFailure], generated_by: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Broker interop\n");
    let _ = writeln!(
        md,
        "Generated by `{generated_by}` from the runs under `target/interop/`: each broker on the \
         test bed (`e2e/testbed up --broker KIND`), the broker probe \
         (`sealed_ota_mqtt::probe`, `sealed-ota broker check`), and the \
         product e2e groups. A test that fails for a known reason is listed in \
         `e2e/interop/known-failures.tsv` with its cause and the fix proposed, and shown as a known \
         failure; any other failure, or a known failure that passes, fails `make interop`.\n"
    );
    // Summary table.
    let _ = writeln!(
        md,
        "| broker | version | product tests passed | known failures | probe: broken | limits the operator must respect |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for run in runs {
        let verdicts = run.verdicts(known);
        let ran = verdicts
            .iter()
            .filter(|(_, v)| !matches!(v, TestVerdict::NotRun))
            .count();
        let passed = verdicts
            .iter()
            .filter(|(_, v)| matches!(v, TestVerdict::Passed | TestVerdict::KnownFailurePassed(_)))
            .count();
        let known_n = verdicts
            .iter()
            .filter(|(_, v)| matches!(v, TestVerdict::KnownFailure(_)))
            .count();
        let (broken, limits) = match &run.probe {
            Some(p) => (
                p.checks
                    .iter()
                    .filter(|c| c.verdict == Verdict::Broken)
                    .map(|c| c.feature.title())
                    .collect::<Vec<_>>()
                    .join(", "),
                p.fit.notes.join("; "),
            ),
            None => ("(no probe report)".into(), String::new()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {passed}/{ran} | {known_n} | {} | {} |",
            run.broker,
            run.version,
            if broken.is_empty() { "none" } else { &broken },
            if limits.is_empty() { "-" } else { &limits }
        );
    }
    for run in runs {
        let _ = writeln!(md, "\n## {} {}\n", run.broker, run.version);
        let _ = writeln!(md, "| product test | result |");
        let _ = writeln!(md, "|---|---|");
        for (test, verdict) in run.verdicts(known) {
            let cell = match verdict {
                TestVerdict::Passed => "passed".to_string(),
                TestVerdict::Failed => "**FAILED** (not a known failure)".to_string(),
                TestVerdict::NotRun => "not run".to_string(),
                TestVerdict::KnownFailure(k) => {
                    format!(
                        "known failure (expected): {}; proposed fix: {}",
                        k.cause, k.fix
                    )
                }
                TestVerdict::KnownFailurePassed(k) => format!(
                    "**passed, but listed as a known failure** ({}): remove it from the list",
                    k.cause
                ),
            };
            let _ = writeln!(md, "| `{test}` | {cell} |");
        }
        for (title, report) in [
            ("Broker probe (test bed configuration)", &run.probe),
            (
                "Broker probe (the broker's default configuration)",
                &run.probe_defaults,
            ),
        ] {
            let Some(report) = report else { continue };
            let _ = writeln!(md, "\n{title}, nodes {}:\n", report.urls.len());
            let _ = writeln!(md, "| feature | verdict | observed |");
            let _ = writeln!(md, "|---|---|---|");
            for c in &report.checks {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    c.feature.title(),
                    verdict_word(c.verdict),
                    c.detail.replace('|', "\\|")
                );
            }
            let f = &report.fit;
            let _ = writeln!(
                md,
                "\nFits: chunk packets up to {} bytes (`chunkSize` at most {}), chunk window at most {}, \
                 operator QoS 1 publishes in flight {}.",
                f.chunk_packet_limit,
                f.max_chunk_size.map_or("-".into(), |s| s.to_string()),
                f.max_window.map_or("no limit found".into(), |w| w.to_string()),
                f.operator_inflight
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_test_lines_are_read() {
        let out = "running 3 tests\ntest a ... ok\ntest b::c ... FAILED\n\
                   test d ... ignored, needs the rmqtt cluster\ntest result: FAILED. 1 passed\n";
        assert_eq!(
            parse_cargo_test(out),
            [
                ("a".to_string(), TestOutcome::Passed),
                ("b::c".to_string(), TestOutcome::Failed),
                ("d".to_string(), TestOutcome::Ignored),
            ]
        );
    }

    fn run(tests: &[(&str, TestOutcome)]) -> BrokerRun {
        BrokerRun {
            broker: "rmqtt-cluster".into(),
            version: "0.24.0".into(),
            probe: None,
            probe_defaults: None,
            tests: tests.iter().map(|(t, o)| (t.to_string(), *o)).collect(),
        }
    }

    #[test]
    fn known_failures_are_expected_and_cannot_hide_a_pass() {
        let known = parse_known_failures(
            "# comment\nrmqtt-cluster\tf::t1\tthe cause\tthe fix\nmochi\tf::t2\tc\tf\n",
        )
        .unwrap();
        assert_eq!(known.len(), 2);
        let expected = run(&[
            ("f::t1", TestOutcome::Failed),
            ("f::t2", TestOutcome::Passed),
        ]);
        assert!(matches!(
            expected.verdicts(&known)[0].1,
            TestVerdict::KnownFailure(_)
        ));
        assert_eq!(
            expected.verdicts(&known)[1].1,
            TestVerdict::Passed,
            "t2 is listed for mochi only"
        );
        assert!(run_ok(std::slice::from_ref(&expected), &known));
        let fixed = run(&[("f::t1", TestOutcome::Passed)]);
        assert!(matches!(
            fixed.verdicts(&known)[0].1,
            TestVerdict::KnownFailurePassed(_)
        ));
        assert!(
            !run_ok(&[fixed], &known),
            "a known failure that passes fails the run"
        );
        let broken = run(&[("f::t3", TestOutcome::Failed)]);
        assert!(!run_ok(std::slice::from_ref(&broken), &known));
        let md = render(&[expected, broken], &known, "test");
        assert!(
            md.contains("known failure (expected): the cause; proposed fix: the fix"),
            "{md}"
        );
        assert!(md.contains("**FAILED** (not a known failure)"), "{md}");
        assert!(parse_known_failures("mochi\tno-separator\tc\tf\n").is_err());
    }
}
