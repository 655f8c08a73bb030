//! The objects around the workloads, each checked against the workload it serves: Services (the
//! metrics ones included) target regrelay's declared ports; a ServiceMonitor scrapes a metrics
//! Service whose port leads to `--metrics-listen`; a cert-manager Certificate writes the Secret
//! the front reads `--tls-cert` from, for every `--public-url` host; a NetworkPolicy lets in the
//! registry and metrics ports and out DNS and the registry's port; the Grafana dashboard
//! ConfigMap carries deploy/grafana/regrelay.json with the sidecar's label.
//!
//! ServiceMonitor (monitoring.coreos.com/v1) and Certificate (cert-manager.io/v1) are custom
//! resources: kubernetes-validate has no schema for them, so their shape is checked here, field
//! names against those their CRDs define (prometheus-operator 0.7x, cert-manager 1.1x).

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::rules::{containers, is_regrelay, volume, volume_of, Settings};
use super::{kind, name, str_list, Set};

/// API groups of custom resources the chart renders: left out of kubernetes-validate, checked here.
const CRD_GROUPS: &[&str] = &["monitoring.coreos.com/", "cert-manager.io/"];

/// ServiceMonitor `spec` fields (prometheus-operator's CRD).
const SERVICE_MONITOR_SPEC: &[&str] = &[
    "attachMetadata",
    "bodySizeLimit",
    "endpoints",
    "fallbackScrapeProtocol",
    "jobLabel",
    "keepDroppedTargets",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "namespaceSelector",
    "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor",
    "podTargetLabels",
    "sampleLimit",
    "scrapeClass",
    "scrapeClassicHistograms",
    "scrapeProtocols",
    "selector",
    "targetLabels",
    "targetLimit",
];
/// ServiceMonitor `spec.endpoints[]` fields.
const SERVICE_MONITOR_ENDPOINT: &[&str] = &[
    "authorization",
    "basicAuth",
    "bearerTokenFile",
    "bearerTokenSecret",
    "enableHttp2",
    "filterRunning",
    "followRedirects",
    "honorLabels",
    "honorTimestamps",
    "interval",
    "metricRelabelings",
    "oauth2",
    "params",
    "path",
    "port",
    "proxyUrl",
    "relabelings",
    "scheme",
    "scrapeTimeout",
    "targetPort",
    "tlsConfig",
    "trackTimestampsStaleness",
];
/// Certificate `spec` fields (cert-manager's CRD).
const CERTIFICATE_SPEC: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
];
/// Certificate `spec.usages[]` values the front's serving certificate may ask for.
const CERTIFICATE_USAGES: &[&str] = &["server auth", "digital signature", "key encipherment"];

/// A custom resource: kubernetes-validate has no schema for it.
pub(crate) fn is_crd(doc: &Value) -> bool {
    let api = doc["apiVersion"].as_str().unwrap_or("");
    CRD_GROUPS.iter().any(|g| api.starts_with(g))
}

/// A workload of a set: what it is, its pod labels, its pod spec.
struct Workload<'a> {
    what: String,
    labels: &'a Value,
    spec: &'a Value,
}

fn workloads(set: &Set) -> Vec<Workload<'_>> {
    set.docs
        .iter()
        .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet"))
        .map(|d| Workload {
            what: format!("{}/{}", kind(d), name(d)),
            labels: &d["spec"]["template"]["metadata"]["labels"],
            spec: &d["spec"]["template"]["spec"],
        })
        .collect()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn fields_known(problems: &mut Vec<String>, at: &str, obj: &Value, known: &[&str]) {
    for key in obj.as_object().into_iter().flatten().map(|(k, _)| k) {
        if !known.contains(&key.as_str()) {
            problems.push(format!(
                "{at}: unknown field {key:?} (the CRD would refuse it)"
            ));
        }
    }
}

/// The number of a container port, by name or number, among regrelay's declared ports.
fn container_port(spec: &Value, port: &Value) -> Option<(u64, Settings)> {
    containers(spec)
        .into_iter()
        .filter(|(c, _)| is_regrelay(c))
        .find_map(|(c, _)| {
            let p = c["ports"].as_array()?.iter().find(|p| match port {
                Value::String(n) => p["name"].as_str() == Some(n),
                n => p["containerPort"] == *n,
            })?;
            Some((p["containerPort"].as_u64()?, Settings::of(c)))
        })
}

/// The port a URL's origin listens on.
fn url_port(url: &str) -> u16 {
    let uri: http::Uri = url.parse().unwrap_or_else(|_| panic!("URL {url}"));
    uri.port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        })
}

/// Every object around the workloads of one release (see the module documentation).
pub(crate) fn check_objects(problems: &mut Vec<String>, set: &Set) {
    let loads = workloads(set);
    for d in &set.docs {
        let at = format!("{}: {}/{}", set.name, kind(d), name(d));
        match kind(d) {
            "Service" => check_service(problems, &at, d, &loads),
            "ServiceMonitor" => check_service_monitor(problems, &at, d, set, &loads),
            "Certificate" => check_certificate(problems, &at, d, &loads),
            "NetworkPolicy" => check_network_policy(problems, &at, d, &loads),
            "ConfigMap" if d["metadata"]["labels"].get("grafana_dashboard").is_some() => {
                check_dashboard(problems, &at, d)
            }
            _ if is_crd(d) => problems.push(format!("{at}: a custom resource nothing checks")),
            _ => {}
        }
    }
}

/// A Service selects a workload of the release and targets regrelay's declared ports.
fn check_service(problems: &mut Vec<String>, at: &str, svc: &Value, loads: &[Workload]) {
    let selected: Vec<&Workload> = loads
        .iter()
        .filter(|w| selects(&svc["spec"]["selector"], w.labels))
        .collect();
    if selected.is_empty() {
        problems.push(format!("{at}: selects no workload of the release"));
    }
    for w in selected {
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            if container_port(w.spec, &p["targetPort"]).is_none() {
                problems.push(format!(
                    "{at}: targets port {} that {} does not declare",
                    p["targetPort"], w.what
                ));
            }
        }
    }
}

/// A ServiceMonitor scrapes `/metrics` over HTTP on a metrics Service of the release, whose port
/// leads to the container port `--metrics-listen` serves.
fn check_service_monitor(
    problems: &mut Vec<String>,
    at: &str,
    sm: &Value,
    set: &Set,
    loads: &[Workload],
) {
    if sm["apiVersion"] != json!("monitoring.coreos.com/v1") {
        problems.push(format!("{at}: apiVersion {}", sm["apiVersion"]));
    }
    let spec = &sm["spec"];
    fields_known(problems, at, spec, SERVICE_MONITOR_SPEC);
    let services: Vec<&Value> = set
        .docs
        .iter()
        .filter(|d| kind(d) == "Service")
        .filter(|d| selects(&spec["selector"]["matchLabels"], &d["metadata"]["labels"]))
        .collect();
    if services.is_empty() {
        problems.push(format!(
            "{at}: its selector matches no Service of the release"
        ));
    }
    let endpoints = spec["endpoints"].as_array().cloned().unwrap_or_default();
    if endpoints.is_empty() {
        problems.push(format!("{at}: no endpoints"));
    }
    for e in &endpoints {
        fields_known(
            problems,
            &format!("{at} endpoint"),
            e,
            SERVICE_MONITOR_ENDPOINT,
        );
        if e["path"] != json!("/metrics") || !matches!(e["scheme"].as_str(), Some("http") | None) {
            problems.push(format!(
                "{at}: scrapes {} {}, regrelay serves http /metrics",
                e["scheme"], e["path"]
            ));
        }
        for field in ["interval", "scrapeTimeout"] {
            // A Prometheus duration as the chart writes them: digits and one unit.
            let ok = e.get(field).is_none_or(|v| {
                v.as_str().is_some_and(|d| {
                    let digits = d.trim_end_matches(['s', 'm', 'h']);
                    !digits.is_empty()
                        && digits.len() + 1 == d.len()
                        && digits.chars().all(|c| c.is_ascii_digit())
                })
            });
            if !ok {
                problems.push(format!("{at}: {field} {} is not a duration", e[field]));
            }
        }
        for svc in &services {
            let port = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == e["port"]);
            let Some(port) = port else {
                problems.push(format!(
                    "{at}: Service {} has no port {}",
                    name(svc),
                    e["port"]
                ));
                continue;
            };
            let target = loads
                .iter()
                .filter(|w| selects(&svc["spec"]["selector"], w.labels))
                .filter_map(|w| container_port(w.spec, &port["targetPort"]))
                .next();
            match target {
                Some((n, s)) if s.metrics_listen().map(|a| u64::from(a.port())) == Some(n) => {}
                Some((n, _)) => problems.push(format!(
                    "{at}: Service {} port {} leads to container port {n}, not --metrics-listen's",
                    name(svc),
                    e["port"]
                )),
                None => problems.push(format!(
                    "{at}: Service {} leads to no regrelay port",
                    name(svc)
                )),
            }
        }
    }
}

/// A Certificate writes the TLS Secret a front reads `--tls-cert`/`--tls-key` from, for the host
/// of every `--public-url`, from an Issuer or ClusterIssuer.
fn check_certificate(problems: &mut Vec<String>, at: &str, cert: &Value, loads: &[Workload]) {
    if cert["apiVersion"] != json!("cert-manager.io/v1") {
        problems.push(format!("{at}: apiVersion {}", cert["apiVersion"]));
    }
    let spec = &cert["spec"];
    fields_known(problems, at, spec, CERTIFICATE_SPEC);
    fields_known(
        problems,
        &format!("{at} issuerRef"),
        &spec["issuerRef"],
        &["name", "kind", "group"],
    );
    let issuer = &spec["issuerRef"];
    if issuer["name"].as_str().unwrap_or("").is_empty()
        || !matches!(issuer["kind"].as_str(), Some("Issuer" | "ClusterIssuer"))
    {
        problems.push(format!(
            "{at}: issuerRef {issuer} names no Issuer or ClusterIssuer"
        ));
    }
    let key = &spec["privateKey"];
    fields_known(
        problems,
        &format!("{at} privateKey"),
        key,
        &["algorithm", "encoding", "rotationPolicy", "size"],
    );
    if key
        .get("algorithm")
        .is_some_and(|a| !matches!(a.as_str(), Some("RSA" | "ECDSA" | "Ed25519")))
    {
        problems.push(format!("{at}: privateKey.algorithm {}", key["algorithm"]));
    }
    for u in str_list(&spec["usages"]) {
        if !CERTIFICATE_USAGES.contains(&u.as_str()) {
            problems.push(format!("{at}: usage {u:?}"));
        }
    }
    let secret = spec["secretName"].as_str().unwrap_or("");
    let names: BTreeSet<String> = str_list(&spec["dnsNames"]).into_iter().collect();
    let mut fronts = 0;
    for w in loads {
        for (c, _) in containers(w.spec)
            .into_iter()
            .filter(|(c, _)| is_regrelay(c))
        {
            let s = Settings::of(c);
            let Some(cert_file) = s.one("tls-cert") else {
                continue;
            };
            let on_secret = volume_of(c, &cert_file)
                .and_then(|(v, _)| volume(w.spec, v))
                .and_then(|v| v["secret"]["secretName"].as_str());
            if on_secret != Some(secret) {
                continue;
            }
            fronts += 1;
            for url in s.all("public-url") {
                let uri: http::Uri = url.parse().unwrap_or_else(|_| panic!("--public-url={url}"));
                let host = uri.host().unwrap_or("").to_owned();
                if !names.contains(&host) {
                    problems.push(format!(
                        "{at}: dnsNames {names:?} lack {host} ({} --public-url={url})",
                        w.what
                    ));
                }
            }
        }
    }
    if fronts == 0 {
        problems.push(format!(
            "{at}: writes Secret {secret:?}, which no regrelay reads --tls-cert from"
        ));
    }
}

/// A NetworkPolicy selects regrelay pods and, for each policy type it sets, lets through what
/// regrelay needs: in, the `--listen` and `--metrics-listen` ports; out, DNS (UDP and TCP 53) and
/// the `--registry` port.
fn check_network_policy(problems: &mut Vec<String>, at: &str, np: &Value, loads: &[Workload]) {
    let spec = &np["spec"];
    let selected: Vec<&Workload> = loads
        .iter()
        .filter(|w| selects(&spec["podSelector"]["matchLabels"], w.labels))
        .collect();
    if selected.is_empty() {
        problems.push(format!("{at}: selects no workload of the release"));
    }
    let types = str_list(&spec["policyTypes"]);
    // (port as written, protocol) of every rule of a direction.
    let rule_ports = |dir: &str| -> Vec<(Value, String)> {
        spec[dir]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| {
                (
                    p["port"].clone(),
                    p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                )
            })
            .collect()
    };
    let (ingress, egress) = (rule_ports("ingress"), rule_ports("egress"));
    for w in selected {
        for (c, _) in containers(w.spec)
            .into_iter()
            .filter(|(c, _)| is_regrelay(c))
        {
            let s = Settings::of(c);
            let allows_in = |want: u16| {
                ingress.iter().any(|(p, proto)| {
                    proto == "TCP"
                        && container_port(w.spec, p).is_some_and(|(n, _)| n == u64::from(want))
                })
            };
            if types.iter().any(|t| t == "Ingress") {
                let mut wanted = vec![("--listen", s.listen().port())];
                wanted.extend(s.metrics_listen().map(|a| ("--metrics-listen", a.port())));
                for (flag, port) in wanted {
                    if !allows_in(port) {
                        problems.push(format!(
                            "{at}: lets no one in on {} {flag} port {port}",
                            w.what
                        ));
                    }
                }
            }
            if types.iter().any(|t| t == "Egress") {
                for proto in ["UDP", "TCP"] {
                    if !egress.iter().any(|(p, pr)| *p == json!(53) && pr == proto) {
                        problems.push(format!("{at}: lets {} no DNS out over {proto}", w.what));
                    }
                }
                let registry = s.one("registry").unwrap_or_default();
                let port = url_port(&registry);
                if !egress
                    .iter()
                    .any(|(p, pr)| *p == json!(port) && pr == "TCP")
                {
                    problems.push(format!(
                        "{at}: lets {} not out to --registry={registry} (port {port})",
                        w.what
                    ));
                }
            }
        }
    }
}

/// The dashboard ConfigMap carries deploy/grafana/regrelay.json, unchanged.
fn check_dashboard(problems: &mut Vec<String>, at: &str, cm: &Value) {
    let file = super::root().join("deploy/grafana/regrelay.json");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let data = cm["data"].as_object().cloned().unwrap_or_default();
    match data.get("regrelay.json").and_then(Value::as_str) {
        None => problems.push(format!("{at}: no data key regrelay.json")),
        Some(json) => match serde_json::from_str::<Value>(json) {
            Ok(have) if have == want => {}
            Ok(_) => problems.push(format!(
                "{at}: regrelay.json differs from {}",
                file.display()
            )),
            Err(e) => problems.push(format!("{at}: regrelay.json is not JSON: {e}")),
        },
    }
}
