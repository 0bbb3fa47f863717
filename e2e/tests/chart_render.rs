//! The Helm chart `charts/sealed-ota`, rendered: `helm lint`, the strict values schema, CRDs identical
//! to `crds/`, a hardened Deployment wired to the operator's real flags, least-privilege RBAC, and the
//! rendered manifests accepted by the test bed's kube-apiserver (`kubectl apply --dry-run=server`).

mod chart_support;

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use chart_support::{
    chart_dir, documents, helm, helm_output, kubectl, of_kind, render, with, BASE,
};
use sealed_ota_e2e::{repo_root, TestBed};
use serde_yaml::Value;

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn helm_lint_passes_for_every_mode() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path")?;
    let modes: &[&[&str]] = &[
        BASE,
        &with(&["watchNamespaces={team-a,team-b}", "replicas=2"]),
        &with(&[
            "metrics.serviceMonitor.enabled=true",
            "broker.credentials.secretName=broker-login",
            "logFormat=json",
        ]),
        &[
            "broker.url=mqtt://mosquitto:1883",
            "leaderElection.enabled=false",
            "crds.enabled=false",
        ],
    ];
    for sets in modes {
        let mut args = vec!["lint", chart, "--strict"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = helm(&args, None).with_context(|| format!("values {sets:?}"))?;
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
    Ok(())
}

#[test]
fn values_that_cannot_work_are_rejected_with_a_reason() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path")?;
    let cases: &[(&[&str], &str)] = &[
        (&[], "broker.url is required"),
        (&["broker.url=mqtts://b:8883"], "/broker/tls/secretName"),
        (&["broker.url=http://b:80"], "/broker/url"),
        (
            &[
                "broker.url=mqtt://b:1883",
                "replicas=2",
                "leaderElection.enabled=false",
            ],
            "/leaderElection/enabled",
        ),
        (
            &["broker.url=mqtt://b:1883", "brokerUrl=mqtt://x:1"],
            "additional properties 'brokerUrl' not allowed",
        ),
        (
            &[
                "broker.url=mqtt://b:1883",
                "securityContext.allowPrivilegeEscalation=true",
            ],
            "/securityContext/allowPrivilegeEscalation",
        ),
        (
            &[
                "broker.url=mqtt://b:1883",
                "podSecurityContext.runAsNonRoot=false",
            ],
            "/podSecurityContext/runAsNonRoot",
        ),
        (
            &["broker.url=mqtt://b:1883", "topicPrefix=iot/#"],
            "/topicPrefix",
        ),
        (
            &["broker.url=mqtt://b:1883", "watchNamespaces={Bad_Name}"],
            "/watchNamespaces/0",
        ),
        (
            &[
                "broker.url=mqtt://b:1883",
                "extraEnv[0].name=SEALED_OTA_BROKER_URL",
            ],
            "/extraEnv/0/name",
        ),
    ];
    for (sets, expected) in cases {
        let mut args = vec!["template", "x", chart];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let out = helm_output(&args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{sets:?} rendered but should not have"
        );
        assert!(
            stderr.contains(expected),
            "{sets:?}: expected {expected:?} in: {stderr}"
        );
    }
    Ok(())
}

/// The CRDs the chart ships are the generated ones: byte-identical files, rendered unchanged apart
/// from the labels and the keep annotation the chart adds.
#[test]
fn chart_crds_are_the_generated_crds() -> Result<()> {
    let crds_dir = repo_root().join("crds");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&crds_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().context("file name")?.to_owned();
            let copy = chart_dir().join("files/crds").join(&name);
            let a = std::fs::read(&path)?;
            let b =
                std::fs::read(&copy).with_context(|| format!("{} is missing", copy.display()))?;
            assert!(
                a == b,
                "{} differs from {}: run `cp crds/*.yaml charts/sealed-ota/files/crds/`",
                copy.display(),
                path.display()
            );
            names.insert(name.to_string_lossy().into_owned());
        }
    }
    let copies: BTreeSet<String> = std::fs::read_dir(chart_dir().join("files/crds"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(copies, names, "the chart has CRD files that crds/ does not");
    assert_eq!(names.len(), 3, "{names:?}");

    for keep in [true, false] {
        let docs = documents(&render("ota", &with(&[&format!("crds.keep={keep}")]))?)?;
        let rendered = of_kind(&docs, "CustomResourceDefinition");
        assert_eq!(rendered.len(), names.len());
        for name in &names {
            let mut expected: Value =
                serde_yaml::from_str(&std::fs::read_to_string(crds_dir.join(name))?)?;
            let crd_name = expected["metadata"]["name"].clone();
            let mut got = (*rendered
                .iter()
                .find(|c| c["metadata"]["name"] == crd_name)
                .with_context(|| format!("{crd_name:?} not rendered"))?)
            .clone();
            let meta = got["metadata"].as_mapping_mut().context("metadata")?;
            let annotations = meta.remove("annotations");
            let labels = meta.remove("labels").context("labels")?;
            assert_eq!(labels["app.kubernetes.io/part-of"], "sealed-ota");
            match (keep, annotations) {
                (true, Some(a)) => assert_eq!(a["helm.sh/resource-policy"], "keep"),
                (false, None) => {}
                (k, a) => bail!("crds.keep={k} rendered annotations {a:?}"),
            }
            // The generated file has no labels or annotations of its own.
            let emeta = expected["metadata"].as_mapping_mut().context("metadata")?;
            assert!(emeta.get("labels").is_none() && emeta.get("annotations").is_none());
            assert_eq!(
                got, expected,
                "rendered {crd_name:?} differs from crds/{name}"
            );
        }
    }
    let docs = documents(&render("ota", &with(&["crds.enabled=false"]))?)?;
    assert!(of_kind(&docs, "CustomResourceDefinition").is_empty());
    Ok(())
}

/// Environment variables the operator reads (clap `env = "..."` in operator/src/config.rs).
fn operator_env_vars() -> Result<BTreeSet<String>> {
    let src = std::fs::read_to_string(repo_root().join("operator/src/config.rs"))?;
    let vars: BTreeSet<String> = src
        .split("env = \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_string)
        .collect();
    assert!(vars.contains("SEALED_OTA_BROKER_URL"), "{vars:?}");
    Ok(vars)
}

#[test]
fn deployment_is_hardened_and_sets_only_real_operator_flags() -> Result<()> {
    let docs = documents(&render(
        "ota",
        &with(&[
            "broker.credentials.secretName=broker-login",
            "watchNamespaces={team-a,team-b}",
            "topicPrefix=plant/7",
            "manager.id=mgr-7",
            "logFormat=json",
            "replicas=2",
        ]),
    )?)?;
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let d = deployments[0];
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = pod["containers"].as_sequence().context("containers")?;
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(strs(&c["args"]), vec!["run"]);

    let env: Vec<(String, Value)> = c["env"]
        .as_sequence()
        .context("env")?
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_string(),
                e.clone(),
            )
        })
        .collect();
    let value = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, e)| e["value"].as_str().map(str::to_string))
    };
    assert_eq!(
        value("SEALED_OTA_BROKER_URL").as_deref(),
        Some("mqtts://mosquitto.example:8883")
    );
    assert_eq!(
        value("SEALED_OTA_BROKER_TLS_SECRET").as_deref(),
        Some("broker-tls")
    );
    assert_eq!(
        value("SEALED_OTA_BROKER_CREDENTIALS_SECRET").as_deref(),
        Some("broker-login")
    );
    assert_eq!(
        value("SEALED_OTA_WATCH_NAMESPACES").as_deref(),
        Some("team-a,team-b")
    );
    assert_eq!(value("SEALED_OTA_TOPIC_PREFIX").as_deref(), Some("plant/7"));
    assert_eq!(value("SEALED_OTA_MANAGER_ID").as_deref(), Some("mgr-7"));
    assert_eq!(value("SEALED_OTA_LOG_FORMAT").as_deref(), Some("json"));
    assert_eq!(value("SEALED_OTA_LEADER_ELECTION").as_deref(), Some("true"));
    let ns_ref = env
        .iter()
        .find(|(n, _)| n == "SEALED_OTA_OPERATOR_NAMESPACE")
        .context("operator namespace")?;
    assert_eq!(
        ns_ref.1["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    // Every variable the chart sets is one the operator reads (a renamed flag fails here).
    let known = operator_env_vars()?;
    for (name, _) in &env {
        assert!(
            known.contains(name) || name == "RUST_LOG",
            "the chart sets {name}, which operator/src/config.rs does not read ({known:?})"
        );
    }
    // The metrics port the operator listens on is the one the probes and Service use.
    assert_eq!(
        value("SEALED_OTA_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let svc = of_kind(&docs, "Service");
    assert_eq!(svc.len(), 1);
    assert_eq!(svc[0]["spec"]["ports"][0]["targetPort"], "metrics");
    Ok(())
}

/// Every RBAC rule is commented, uses no wildcard and only the verbs the operator's code uses.
#[test]
fn rbac_is_least_privilege_and_commented() -> Result<()> {
    let allowed_verbs: BTreeSet<&str> = ["get", "list", "watch", "create", "patch"].into();
    for (sets, cluster_wide) in [
        (with(&[]), true),
        (with(&["watchNamespaces={team-a,team-b}"]), false),
    ] {
        let text = render("ota", &sets)?;
        // A comment line directly above every rule.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                assert!(
                    lines[i - 1].trim_start().starts_with('#'),
                    "RBAC rule without a comment: {line} (after {:?})",
                    lines[i - 1]
                );
            }
        }
        let docs = documents(&text)?;
        let roles: Vec<&Value> = of_kind(&docs, "ClusterRole")
            .into_iter()
            .chain(of_kind(&docs, "Role"))
            .collect();
        assert!(!roles.is_empty());
        for role in &roles {
            for rule in role["rules"].as_sequence().context("rules")? {
                for field in ["verbs", "resources", "apiGroups", "resourceNames"] {
                    assert!(
                        !strs(&rule[field]).iter().any(|v| v.contains('*')),
                        "wildcard in {rule:?}"
                    );
                }
                for verb in strs(&rule["verbs"]) {
                    assert!(
                        allowed_verbs.contains(verb.as_str()),
                        "verb {verb} in {rule:?}"
                    );
                }
            }
        }
        let cluster_roles = of_kind(&docs, "ClusterRole");
        let secrets_cluster_wide = cluster_roles.iter().any(|r| {
            r["rules"].as_sequence().is_some_and(|rules| {
                rules
                    .iter()
                    .any(|x| strs(&x["resources"]).contains(&"secrets".to_string()))
            })
        });
        assert_eq!(secrets_cluster_wide, cluster_wide, "values {sets:?}");
        if !cluster_wide {
            assert!(cluster_roles.is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty());
            let ns: BTreeSet<&str> = of_kind(&docs, "Role")
                .iter()
                .filter_map(|r| r["metadata"]["namespace"].as_str())
                .collect();
            assert_eq!(ns, ["ota", "team-a", "team-b"].into());
        }
        // In its own namespace the operator reads the broker Secret by name only.
        let own = of_kind(&docs, "Role")
            .into_iter()
            .find(|r| {
                r["metadata"]["namespace"] == "ota"
                    && r["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("-self"))
            })
            .context("the operator-namespace Role")?;
        let secret_rule = own["rules"]
            .as_sequence()
            .context("rules")?
            .iter()
            .find(|r| strs(&r["resources"]) == ["secrets"])
            .context("broker Secret rule")?;
        assert_eq!(strs(&secret_rule["resourceNames"]), vec!["broker-tls"]);
        assert_eq!(strs(&secret_rule["verbs"]), vec!["get"]);
    }
    Ok(())
}

#[test]
fn pod_disruption_budget_is_optional_and_selects_the_operator() -> Result<()> {
    let off = documents(&render("ota", BASE)?)?;
    assert!(of_kind(&off, "PodDisruptionBudget").is_empty());
    let on = documents(&render(
        "ota",
        &with(&["replicas=2", "podDisruptionBudget.enabled=true"]),
    )?)?;
    let pdb = of_kind(&on, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert_eq!(pdb[0]["spec"]["maxUnavailable"], 1);
    let deployment = of_kind(&on, "Deployment")[0];
    assert_eq!(
        pdb[0]["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    Ok(())
}

#[test]
fn service_monitor_is_optional() -> Result<()> {
    let off = documents(&render("ota", BASE)?)?;
    assert!(of_kind(&off, "ServiceMonitor").is_empty());
    let on = documents(&render(
        "ota",
        &with(&[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prom",
        ]),
    )?)?;
    let sm = of_kind(&on, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0]["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm[0]["metadata"]["labels"]["release"], "prom");
    Ok(())
}

/// The apiserver accepts every rendered object (schema, CEL and admission), without persisting them.
#[tokio::test]
async fn rendered_manifests_pass_server_side_dry_run() -> Result<()> {
    let bed = TestBed::get()?;
    let op = bed.namespace("chart-dry").await?;
    let team = bed.namespace("chart-dry-team").await?;
    let watch = format!("watchNamespaces={{{}}}", team.name);
    for sets in [
        with(&[]),
        with(&[
            &watch,
            "replicas=2",
            "broker.credentials.secretName=login",
            "podDisruptionBudget.enabled=true",
        ]),
        vec!["broker.url=mqtt://m:1883", "leaderElection.enabled=false"],
    ] {
        let text = render(&op.name, &sets)?;
        let out = kubectl(
            &bed.kubeconfig,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&text),
        )
        .with_context(|| format!("values {sets:?}"))?;
        let docs = documents(&text)?;
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(accepted, docs.len(), "{out}");
        assert!(out.contains("deployment.apps/"), "{out}");
        assert!(
            out.contains(
                "customresourcedefinition.apiextensions.k8s.io/updatecampaigns.ota.sealed-ota.dev"
            ),
            "{out}"
        );
    }
    op.pass();
    team.pass();
    Ok(())
}

fn leaf_paths(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v.as_mapping() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let key = k.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_paths(&path, child, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// Every value is documented in the chart README's table (itself or a parent such as `resources`),
/// and the table documents no value that does not exist.
#[test]
fn every_value_is_documented() -> Result<()> {
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml"))?)?;
    let readme = std::fs::read_to_string(chart_dir().join("README.md"))?;
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let mut leaves = Vec::new();
    leaf_paths("", &values, &mut leaves);
    assert!(leaves.len() > 30, "{leaves:?}");
    for leaf in &leaves {
        let mut path = leaf.as_str();
        let found = loop {
            if documented.contains(path) {
                break true;
            }
            match path.rsplit_once('.') {
                Some((parent, _)) => path = parent,
                None => break false,
            }
        };
        assert!(
            found,
            "value {leaf} is not documented in charts/sealed-ota/README.md"
        );
    }
    for key in &documented {
        assert!(
            leaves
                .iter()
                .any(|l| l == key || l.starts_with(&format!("{key}."))),
            "README documents {key}, which values.yaml does not have"
        );
    }
    Ok(())
}
