//! The chart's toggles (issue 23), each rendered on and off: metrics and their ServiceMonitor,
//! the Grafana dashboard, NetworkPolicy, cert-manager, the cache volume in both forms, affinity
//! and spread constraints, and the token-service readiness flag; and the custom-resource checks
//! of `objects` shown to catch broken objects.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::objects::check_objects;
use super::rules::{containers, is_regrelay, volume, Settings, STAND_IN_IP};
use super::{kind, name, render_k8s, renderer_available, text, yaml_docs, Set};

/// The chart's objects for these values (JSON over values.yaml).
fn render(values: &str) -> Vec<Value> {
    let out = render_k8s(&["--values", values]);
    assert!(out.status.success(), "{values}: {}", text(&out));
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

fn regrelay_args(docs: &[Value], workload: &str) -> Vec<String> {
    let d = docs
        .iter()
        .find(|d| kind(d) == workload)
        .unwrap_or_else(|| panic!("no {workload}"));
    let c = containers(&d["spec"]["template"]["spec"])
        .into_iter()
        .map(|(c, _)| c)
        .find(|c| is_regrelay(c))
        .expect("a regrelay container");
    Settings::of(c).args
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter().map(|d| kind(d).to_owned()).collect()
}

/// Each toggle renders its objects (and only with it on): the metrics Service, ServiceMonitor,
/// Grafana dashboard, NetworkPolicy, Certificate, the cache volume in both forms, affinity and
/// spread constraints. Their rules and schemas are checked on the VARIANTS that turn them on.
#[test]
fn every_chart_toggle_renders_its_objects() {
    const NAME: &str = "every_chart_toggle_renders_its_objects";
    if !renderer_available(NAME) {
        return;
    }
    let defaults = render("{}");
    for absent in ["ServiceMonitor", "Certificate", "NetworkPolicy"] {
        assert!(
            !kinds(&defaults).contains(absent),
            "{absent} renders by default"
        );
    }
    assert!(
        defaults
            .iter()
            .any(|d| kind(d) == "Service" && name(d) == "regrelay-metrics"),
        "metrics are on by default: no regrelay-metrics Service"
    );
    assert!(!regrelay_args(&defaults, "Deployment")
        .iter()
        .any(|a| a.starts_with("--cache-dir")));

    let on = render(
        r#"{"metrics":{"serviceMonitor":{"enabled":true},"grafanaDashboard":{"enabled":true}},
            "front":{"networkPolicy":{"enabled":true},"tls":{"certManager":{"enabled":true}},
                     "cache":{"enabled":true},
                     "affinity":{"podAntiAffinity":{"preferredDuringSchedulingIgnoredDuringExecution":[
                       {"weight":100,"podAffinityTerm":{"topologyKey":"topology.kubernetes.io/zone",
                        "labelSelector":{"matchLabels":{"app.kubernetes.io/component":"front"}}}}]}},
                     "topologySpreadConstraints":[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule"}]}}"#,
    );
    for present in ["ServiceMonitor", "Certificate", "NetworkPolicy"] {
        assert!(
            kinds(&on).contains(present),
            "no {present} with its toggle on"
        );
    }
    assert!(on
        .iter()
        .any(|d| kind(d) == "ConfigMap"
            && d["metadata"]["labels"]["grafana_dashboard"] == json!("1")));
    let deployment = on.iter().find(|d| kind(d) == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        pod["affinity"]["podAntiAffinity"].is_object(),
        "affinity not carried: {pod}"
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], json!("topology.kubernetes.io/zone"));
    assert_eq!(
        spread["labelSelector"]["matchLabels"],
        pod_labels(deployment),
        "a constraint without labelSelector gets the front's pod labels"
    );
    assert!(
        volume(pod, "cache").is_some_and(|v| v.get("emptyDir").is_some()),
        "{pod}"
    );

    let pvc =
        render(r#"{"front":{"cache":{"enabled":true,"volume":"pvc","storageClassName":"fast"}}}"#);
    let pod = &pvc.iter().find(|d| kind(d) == "Deployment").unwrap()["spec"]["template"]["spec"];
    let claim =
        &volume(pod, "cache").expect("a cache volume")["ephemeral"]["volumeClaimTemplate"]["spec"];
    assert_eq!(claim["storageClassName"], json!("fast"), "{pod}");

    let mirror = render(
        r#"{"front":{"enabled":false},"mirror":{"enabled":true,"cache":{"enabled":true},"metrics":{"enabled":true}}}"#,
    );
    let args = regrelay_args(&mirror, "DaemonSet");
    assert!(
        args.iter().any(|a| a.starts_with("--cache-dir=")),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--metrics-listen={}:9091", STAND_IN_IP)),
        "the node mirror's metrics on the node's IP: {args:?}"
    );
    assert!(mirror
        .iter()
        .any(|d| kind(d) == "Service" && name(d) == "regrelay-mirror-metrics"));

    // The bucket replicas share (issue 26): its flags, and its key from the Secret as env.
    let shared = render(
        r#"{"front":{"cache":{"enabled":true,"store":{"url":"s3://registry-cache/front",
            "endpoint":"https://s3.example.com:9000","region":"eu-1","credentialsSecret":"regrelay-s3",
            "redirect":true}}}}"#,
    );
    let args = regrelay_args(&shared, "Deployment");
    for want in [
        "--cache-store=s3://registry-cache/front",
        "--cache-store-max-bytes=107374182400",
        "--cache-s3-endpoint=https://s3.example.com:9000",
        "--cache-s3-region=eu-1",
        "--cache-redirect",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    let deployment = shared.iter().find(|d| kind(d) == "Deployment").unwrap();
    let container = containers(&deployment["spec"]["template"]["spec"])
        .into_iter()
        .map(|(c, _)| c)
        .find(|c| is_regrelay(c))
        .unwrap();
    assert_eq!(
        container["envFrom"],
        json!([{"secretRef": {"name": "regrelay-s3"}}]),
        "{container}"
    );
    let refused = render_k8s(&[
        "--values",
        r#"{"front":{"cache":{"enabled":true,"store":{"url":"s3://registry-cache/front"}}}}"#,
    ]);
    assert!(
        !refused.status.success() && text(&refused).contains("credentialsSecret"),
        "{}",
        text(&refused)
    );
    assert!(!regrelay_args(&on, "Deployment")
        .iter()
        .any(|a| a.starts_with("--cache-store")));

    let refused = render_k8s(&[
        "--values",
        r#"{"front":{"cache":{"enabled":true,"volume":"hostPath"}}}"#,
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("emptyDir or pvc"),
        "{}",
        text(&refused)
    );
}

fn pod_labels(d: &Value) -> Value {
    d["spec"]["template"]["metadata"]["labels"].clone()
}

/// Readiness keeps following the registry (`/-/ready`); `--ready-requires-token-service` (whether
/// a GitLab outage makes a replica not-ready) is passed only when readyRequiresTokenService is
/// set, to every form: by default a GitLab outage leaves the Service's endpoints in place.
#[test]
fn the_token_service_readiness_flag_is_passed_only_when_asked() {
    const NAME: &str = "the_token_service_readiness_flag_is_passed_only_when_asked";
    if !renderer_available(NAME) {
        return;
    }
    const FLAG: &str = "--ready-requires-token-service";
    let every =
        r#""front":{"enabled":true},"mirror":{"enabled":true},"ciSidecar":{"enabled":true}"#;
    for (values, want) in [
        (format!("{{{every}}}"), false),
        (
            format!("{{{every},\"readyRequiresTokenService\":true}}"),
            true,
        ),
    ] {
        let docs = render(&values);
        for workload in ["Deployment", "DaemonSet"] {
            let args = regrelay_args(&docs, workload);
            assert_eq!(
                args.iter().any(|a| a == FLAG),
                want,
                "{values}: {workload} {args:?}"
            );
        }
        let cm = docs
            .iter()
            .find(|d| d["data"].get("pod-spec-patch.yaml").is_some())
            .expect("the CI sidecar's ConfigMap");
        let patch = cm["data"]["pod-spec-patch.yaml"].as_str().unwrap();
        assert_eq!(patch.contains(FLAG), want, "{values}: CI sidecar {patch}");
        let deployment = docs.iter().find(|d| kind(d) == "Deployment").unwrap();
        let c = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], json!("/-/ready"));
    }
}

/// The custom-resource checks catch what the CRDs would refuse or what would scrape or serve
/// nothing: a misspelt field, a Certificate for a Secret no front reads, a ServiceMonitor on a
/// port that is not `--metrics-listen`'s.
#[test]
fn the_custom_resource_checks_catch_broken_objects() {
    const NAME: &str = "the_custom_resource_checks_catch_broken_objects";
    if !renderer_available(NAME) {
        return;
    }
    let good = render(
        r#"{"metrics":{"serviceMonitor":{"enabled":true}},"front":{"tls":{"certManager":{"enabled":true}},"networkPolicy":{"enabled":true}}}"#,
    );
    let check = |docs: Vec<Value>| {
        let mut problems = vec![];
        check_objects(
            &mut problems,
            &Set {
                name: "broken".into(),
                docs,
            },
        );
        problems
    };
    assert_eq!(check(good.clone()), Vec::<String>::new());
    let broken = |f: &dyn Fn(&mut Value), says: &str| {
        let mut docs = good.clone();
        docs.iter_mut().for_each(f);
        let problems = check(docs);
        assert!(
            problems.iter().any(|p| p.contains(says)),
            "want {says:?}: {problems:?}"
        );
    };
    broken(
        &|d| {
            if kind(d) == "ServiceMonitor" {
                let e = d["spec"]["endpoints"][0].take();
                d["spec"]["endpoints"][0] = json!({"ports": e["port"], "path": "/metrics"});
            }
        },
        "unknown field \"ports\"",
    );
    broken(
        &|d| {
            if kind(d) == "Certificate" {
                d["spec"]["secretName"] = json!("other-tls");
            }
        },
        "which no regrelay reads --tls-cert from",
    );
    broken(
        &|d| {
            if kind(d) == "Certificate" {
                d["spec"]["dnsNames"] = json!(["elsewhere.example.com"]);
            }
        },
        "lack regrelay.example.com",
    );
    broken(
        &|d| {
            if kind(d) == "Service" && name(d) == "regrelay-metrics" {
                d["spec"]["ports"][0]["targetPort"] = json!("registry");
            }
        },
        "not --metrics-listen's",
    );
    broken(
        &|d| {
            if kind(d) == "NetworkPolicy" {
                d["spec"]["egress"] = json!([]);
            }
        },
        "no DNS out",
    );
}
