//! The Kubernetes forms: the Helm chart deploy/helm/regrelay and the static manifests in
//! deploy/k8s/ (its rendered output, scripts/render-k8s).
//!
//! - The static files are what the chart renders now (`scripts/render-k8s --check`, Helm's own
//!   engine through the PyPI package helm-python-sdk; it also runs `helm lint --strict`), its
//!   appVersion is the crate's, and the chart refuses values that would cut uploads short or run
//!   replicas without a shared key ring.
//! - Every object, static and rendered (more value sets than the static files use), validates
//!   against the Kubernetes OpenAPI schemas in strict mode (`kubernetes-validate`, PyPI) for 1.29,
//!   the first release with native sidecars on by default, and for the newest schema it bundles.
//!   The CI-job sidecar is validated as the pod the runner makes: the runner config.toml's
//!   strategic merge patch applied to a runner-like job pod.
//! - What went wrong before stays fixed: probes reach regrelay (an httpGet goes to the pod IP on
//!   a declared container port, never with `host:`; a loopback listener gets an exec
//!   `regrelay healthcheck` on its own port); the CI sidecar is an init container with
//!   `restartPolicy: Always`; the grace period outlasts the shutdown delay plus the drain;
//!   non-root, read-only, no privilege escalation, no capabilities; Secret volumes 0400, and the
//!   key ring and credentials read straight from one under the pod's fsGroup; replicas, PDB, HPA
//!   and Service fit together; the node mirror listens on loopback only and the node files point
//!   at it.
//! - The real binary accepts what each manifest passes: the pod's volumes are laid out in a temp
//!   dir as the kubelet would (a 0400 Secret file under fsGroup comes out 0440, its group the
//!   fsGroup, which the container has: here the test's own group stands in for it), then
//!   `regrelay check-config` runs with the container's exact arguments (mount paths rewritten),
//!   and every exec probe runs against a live regrelay. A typo'd flag or a wrong path fails, and
//!   so does a key ring that others, or a group regrelay is not in, may read.
//!
//! - What each deploy form carries (issue 23): metrics on a port of their own (`--metrics-listen`
//!   equals the container port named `metrics`, which a metrics Service and the optional
//!   ServiceMonitor lead to), the Grafana dashboard ConfigMap, a cache volume mounted exactly at
//!   `--cache-dir` (the root is read-only), a NetworkPolicy, a cert-manager Certificate for the
//!   Secret the front mounts, affinity and spread constraints, and the token-service readiness
//!   flag only when asked (`objects`, `toggles`).
//!
//! Files: `ci` (the runner's pod), `rules` (workload rules), `objects` (Services, custom
//! resources, NetworkPolicy, dashboard), `toggles` (each chart toggle on and off), `run` (the
//! real binary).
//! YAML is read through python3's PyYAML (a dependency of kubernetes-validate): no YAML crate.
//! Missing tools: a failure when CI is set (scripts/install-deps installs them), else a SKIP.

use crate::support;

mod ci;
mod objects;
mod rules;
mod run;
mod toggles;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ci::ci_pods;
use rules::{
    check_pod, check_set, containers, is_regrelay, pods, volume, volume_of, PodRef, Settings,
};
use run::{own_groups, run_pod, run_pod_with};
use serde_json::Value;
use support::{text, Registry, Regrelay};

/// The oldest Kubernetes the manifests are for: native sidecars are on by default from 1.29.
const KUBE_MIN: &str = "1.29.0";
/// Extra value sets the chart is rendered with besides the static files' (JSON over values.yaml).
const VARIANTS: &[(&str, &str)] = &[
    (
        "chart: every form",
        r#"{"front":{"enabled":true},"mirror":{"enabled":true},"ciSidecar":{"enabled":true}}"#,
    ),
    (
        "chart: front, plain HTTP, fixed replicas",
        r#"{"front":{"tls":{"secretName":""},"autoscaling":{"enabled":false},"replicas":3}}"#,
    ),
    (
        "chart: mirror without key ring or credentials, on port 5001",
        r#"{"front":{"enabled":false},"mirror":{"enabled":true,"port":5001,"credentials":{"secretName":""}},"sessionKeys":{"secretName":""}}"#,
    ),
    (
        "chart: front with every option (cache, ServiceMonitor, dashboard, NetworkPolicy, cert-manager, spread)",
        r#"{"front":{"cache":{"enabled":true},"networkPolicy":{"enabled":true},"tls":{"certManager":{"enabled":true}},
            "publicUrls":["https://regrelay.example.com","https://registry.example.com:8443"],
            "topologySpreadConstraints":[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"}],
            "affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/os","operator":"In","values":["linux"]}]}]}}}},
           "metrics":{"serviceMonitor":{"enabled":true,"labels":{"release":"kube-prometheus-stack"}},"grafanaDashboard":{"enabled":true}}}"#,
    ),
    (
        "chart: front, plain HTTP to a registry on port 5000, cache on a claim per pod, NetworkPolicy, no metrics",
        r#"{"registry":"http://registry.internal:5000","front":{"tls":{"secretName":""},"networkPolicy":{"enabled":true},
            "cache":{"enabled":true,"volume":"pvc","maxBytes":1073741824,"serveStale":false}},"metrics":{"enabled":false}}"#,
    ),
    (
        "chart: mirror with a cache, metrics on the node's IP and a ServiceMonitor",
        r#"{"front":{"enabled":false},"mirror":{"enabled":true,"cache":{"enabled":true,"size":"20Gi"},"metrics":{"enabled":true}},
           "metrics":{"serviceMonitor":{"enabled":true}}}"#,
    ),
    (
        "chart: front whose replicas leave the Service while GitLab's token service is down",
        r#"{"readyRequiresTokenService":true,"front":{"tls":{"secretName":""}}}"#,
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool the test needs is missing: a failure under CI, else a SKIP saying what is left out
/// (the caller returns, or goes on with less).
fn missing(test: &str, what: &str, left_out: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is missing under CI: scripts/install-deps installs it"
    );
    support::skip(
        test,
        &format!("{what} is missing (scripts/install-deps installs it): {left_out}"),
    );
}

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// PyYAML (comes with kubernetes-validate) and kubernetes-validate itself.
fn validator_available(test: &str) -> bool {
    if python_has("yaml, kubernetes_validate") {
        return true;
    }
    missing(test, "kubernetes-validate (PyPI)", "skipped");
    false
}

/// Helm's engine for Python (helm-python-sdk): without it the chart cannot be rendered.
fn renderer_available(test: &str) -> bool {
    if python_has("helm_python") {
        return true;
    }
    missing(test, "helm-python-sdk (PyPI; renders the chart)", "skipped");
    false
}

/// Every document of a YAML stream, as JSON (python3 + PyYAML).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let input = yaml.to_owned();
    let writer = std::thread::spawn(move || {
        std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "YAML did not parse: {}", text(&out));
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("not a list of documents: {other}"),
    }
}

fn render_k8s(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(root().join("scripts/render-k8s"))
        .args(args)
        .output()
        .expect("python3 scripts/render-k8s")
}

/// One release's objects: a static file, or the chart rendered with one value set.
struct Set {
    name: String,
    docs: Vec<Value>,
}

fn static_sets() -> Vec<Set> {
    let dir = root().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let yaml = std::fs::read_to_string(&path).unwrap();
            Set {
                name: format!("deploy/k8s/{}", path.file_name().unwrap().to_string_lossy()),
                docs: yaml_docs(&yaml),
            }
        })
        .collect()
}

fn rendered_sets() -> Vec<Set> {
    VARIANTS
        .iter()
        .map(|(name, values)| {
            let out = render_k8s(&["--values", values]);
            assert!(out.status.success(), "{name}: {}", text(&out));
            Set {
                name: (*name).to_owned(),
                docs: yaml_docs(&String::from_utf8(out.stdout).unwrap()),
            }
        })
        .collect()
}

/// The static sets, plus the rendered ones when the chart can be rendered here.
fn all_sets(test: &str) -> Vec<Set> {
    let mut sets = static_sets();
    if python_has("helm_python") {
        sets.extend(rendered_sets());
    } else {
        missing(
            test,
            "helm-python-sdk (PyPI; renders the chart)",
            "only the static manifests are checked",
        );
    }
    sets
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| match s {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A regrelay whose /-/healthy and /-/ready answer 200: its upstream is a real registry (ready
/// asks for one: an answer without the registry API's header is not ready).
fn live_regrelay() -> (Registry, Regrelay) {
    let upstream = Registry::start_open();
    let live = Regrelay::start(&["--registry", &upstream.url()]);
    (upstream, live)
}

fn report(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------------------------

#[test]
fn static_manifests_are_what_the_chart_renders() {
    const NAME: &str = "static_manifests_are_what_the_chart_renders";
    if !validator_available(NAME) || !renderer_available(NAME) {
        return;
    }
    // The image tag defaults to the chart's appVersion: the release being built.
    let chart = std::fs::read_to_string(root().join("deploy/helm/regrelay/Chart.yaml")).unwrap();
    let chart = &yaml_docs(&chart)[0];
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "deploy/helm/regrelay/Chart.yaml appVersion is not Cargo.toml's version"
    );
    let out = render_k8s(&["--check"]);
    assert!(
        out.status.success(),
        "deploy/k8s/ differs from the chart's output (run scripts/render-k8s):\n{}",
        text(&out)
    );
}

#[test]
fn chart_refuses_unsafe_values() {
    const NAME: &str = "chart_refuses_unsafe_values";
    if !validator_available(NAME) || !renderer_available(NAME) {
        return;
    }
    for (values, says) in [
        (
            r#"{"terminationGracePeriodSeconds":900}"#,
            "terminationGracePeriodSeconds (900) must exceed",
        ),
        (
            r#"{"shutdown":{"uploadDrainSecs":1800}}"#,
            "must exceed shutdown delay (5) + max(grace, upload drain) (1800)",
        ),
        (
            r#"{"sessionKeys":{"secretName":""}}"#,
            "sessionKeys.secretName is required",
        ),
    ] {
        let out = render_k8s(&["--values", values]);
        assert_eq!(out.status.code(), Some(2), "{values}: {}", text(&out));
        assert!(text(&out).contains(says), "{values}: {}", text(&out));
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    const NAME: &str = "manifests_validate_against_the_kubernetes_schemas";
    if !validator_available(NAME) {
        return;
    }
    let sets = all_sets(NAME);
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![];
    let mut custom = 0;
    for (i, set) in sets.iter().enumerate() {
        // Custom resources (ServiceMonitor, Certificate) have no schema here: their shape is
        // checked by objects::check_objects (workloads_keep_the_deployment_rules).
        let (crds, mut docs): (Vec<Value>, Vec<Value>) =
            set.docs.iter().cloned().partition(objects::is_crd);
        custom += crds.len();
        docs.extend(ci_pods(set));
        let stream: String = docs.iter().map(|d| format!("---\n{d}\n")).collect();
        let slug: String = set
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = dir.path().join(format!("{i:02}-{slug}.yaml"));
        std::fs::write(&path, stream).unwrap();
        files.push(path);
    }
    assert!(
        custom > 0,
        "no ServiceMonitor or Certificate among the manifests"
    );
    // The oldest supported, and the package's default: the newest schema it bundles.
    for version in [Some(KUBE_MIN), None] {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"]);
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.args(&files).output().unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict ({}):\n{}",
            version.unwrap_or("newest bundled"),
            text(&out)
        );
    }
}

#[test]
fn workloads_keep_the_deployment_rules() {
    const NAME: &str = "workloads_keep_the_deployment_rules";
    if !validator_available(NAME) {
        return;
    }
    let mut problems = vec![];
    let mut seen = BTreeSet::new();
    for set in all_sets(NAME) {
        let ci = ci_pods(&set);
        for pod in pods(&set, &ci) {
            seen.insert(if pod.ci_job { "CI job pod" } else { "workload" }.to_owned());
            check_pod(&mut problems, &pod);
        }
        check_set(&mut problems, &set);
        objects::check_objects(&mut problems, &set);
        for d in &set.docs {
            seen.insert(kind(d).to_owned());
        }
    }
    for want in [
        "Deployment",
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "CI job pod",
        "NetworkPolicy",
        "ServiceMonitor",
        "Certificate",
        "ConfigMap",
    ] {
        assert!(seen.contains(want), "no {want} among the manifests");
    }
    report("deployment rules", problems);
}

#[test]
fn regrelay_accepts_what_every_manifest_passes() {
    const NAME: &str = "regrelay_accepts_what_every_manifest_passes";
    if !validator_available(NAME) {
        return;
    }
    let (_upstream, live) = live_regrelay();
    let mut problems = vec![];
    let mut ran = 0;
    for set in all_sets(NAME) {
        let ci = ci_pods(&set);
        for pod in pods(&set, &ci) {
            ran += 1;
            problems.extend(run_pod(&pod, live.addr));
        }
    }
    assert!(ran >= 3, "only {ran} pods");
    report("regrelay on the manifests' settings", problems);
}

/// Why no copy is needed: under fsGroup the kubelet makes a 0400 Secret file 0440 with group
/// fsGroup, a group the container has, and regrelay accepts that. It still refuses the same file
/// readable by others (0444) or group-readable by a group it is not in; and the rules catch a key
/// ring on a Secret volume of a pod without fsGroup (root's 0400 file, unreadable by the uid).
#[test]
fn a_key_ring_read_straight_from_a_secret_volume_under_fs_group_is_accepted() {
    const NAME: &str = "a_key_ring_read_straight_from_a_secret_volume_under_fs_group_is_accepted";
    if !validator_available(NAME) {
        return;
    }
    let front = static_sets()
        .into_iter()
        .find(|s| s.name.ends_with("/front.yaml"))
        .expect("deploy/k8s/front.yaml");
    let deployment = front
        .docs
        .into_iter()
        .find(|d| kind(d) == "Deployment")
        .expect("a Deployment");
    let pod = PodRef {
        what: "front, key ring off the Secret".into(),
        spec: &deployment["spec"]["template"]["spec"],
        ci_job: false,
    };
    // The manifest reads the key ring straight from the Secret volume, under fsGroup.
    let c = containers(pod.spec)
        .into_iter()
        .map(|(c, _)| c)
        .find(|c| is_regrelay(c))
        .expect("a regrelay container");
    let key_file = Settings::of(c)
        .one("session-key-file")
        .expect("--session-key-file");
    let (vname, mount) = volume_of(c, &key_file).expect("the key ring's volume");
    let secret = volume(pod.spec, vname).expect("a declared volume");
    assert!(
        secret.get("secret").is_some(),
        "{key_file} is not on a Secret volume: {secret}"
    );
    assert!(
        pod.spec["securityContext"]["fsGroup"].as_u64().is_some(),
        "the pod has no fsGroup"
    );
    let mut problems = vec![];
    check_pod(&mut problems, &pod);
    report("front, key ring off the Secret", problems);
    let in_volume = key_file[mount.len()..].trim_start_matches('/').to_owned();
    let key_path = |volumes: &BTreeMap<String, PathBuf>| volumes[vname].join(&in_volume);

    let (_upstream, live) = live_regrelay();
    // As the kubelet lays it out: 0440, group fsGroup (one of regrelay's groups): accepted.
    let run = run_pod_with(&pod, live.addr, &|volumes| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(key_path(volumes)).unwrap();
        assert_eq!(
            meta.mode() & 0o777,
            0o440,
            "the kubelet's mode under fsGroup"
        );
        assert!(
            own_groups().contains(&meta.gid()),
            "group {} is not one of ours ({:?})",
            meta.gid(),
            own_groups()
        );
    });
    report("regrelay on a 0440 key ring of its own group", run);

    // Readable by others: refused, whatever the group.
    let run = run_pod_with(&pod, live.addr, &|volumes| {
        let path = key_path(volumes);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
    });
    assert!(
        run.iter().any(|p| p.contains("mode 0444")),
        "regrelay should refuse a key ring others may read: {run:?}"
    );

    // 0440 with a group regrelay is not in: refused. Giving a file away to another group takes
    // root (CAP_CHOWN) and a gid mapped into this user namespace.
    let ours = own_groups();
    let foreign = (60000..u32::MAX)
        .find(|g| !ours.contains(g))
        .expect("a gid we are not in");
    let probe = tempfile::NamedTempFile::new().unwrap();
    match std::os::unix::fs::chown(probe.path(), None, Some(foreign)) {
        Err(e) => support::skip(
            NAME,
            &format!(
                "cannot chown a file to gid {foreign} ({e}; needs root): the foreign-group \
                 half is left out"
            ),
        ),
        Ok(()) => {
            let run = run_pod_with(&pod, live.addr, &|volumes| {
                std::os::unix::fs::chown(key_path(volumes), None, Some(foreign)).unwrap();
            });
            assert!(
                run.iter().any(|p| p.contains("mode 0440")),
                "regrelay should refuse a key ring group {foreign} (not ours) may read: {run:?}"
            );
        }
    }

    // The rules: the same Secret volume in a pod without fsGroup is root's 0400 file.
    let mut no_fs_group = deployment["spec"]["template"]["spec"].clone();
    no_fs_group["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("fsGroup");
    let mut problems = vec![];
    check_pod(
        &mut problems,
        &PodRef {
            what: "front without fsGroup".into(),
            spec: &no_fs_group,
            ci_job: false,
        },
    );
    assert!(
        problems.iter().any(|p| p.contains("no fsGroup")),
        "{problems:?}"
    );
}
