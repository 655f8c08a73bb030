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
//! YAML is read through python3's PyYAML (a dependency of kubernetes-validate): no YAML crate.
//! Missing tools: a failure when CI is set (scripts/install-deps installs them), else a SKIP.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use support::{regrelay_bin, text, Regrelay};

/// The oldest Kubernetes the manifests are for: native sidecars are on by default from 1.29.
const KUBE_MIN: &str = "1.29.0";
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: u64 = 30;
/// regrelay's shutdown defaults (`serve --help`).
const DEFAULT_DELAY: u64 = 5;
const DEFAULT_GRACE_SECS: u64 = 30;
const DEFAULT_DRAIN: u64 = 900;
/// Secret volume mode: owner read only.
const SECRET_MODE: u64 = 0o400;

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

// ---------------------------------------------------------------------------------------------
// The CI sidecar: the runner's config.toml, its pod_spec patch, and the job pod it makes.

/// A job pod as the GitLab Runner Kubernetes executor makes it (trimmed to what matters here):
/// the permissions init container, the build and helper containers, the build volume.
fn runner_job_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runner-x7kq2-project-42-concurrent-0-abcd1234"},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [{
                "name": "init-permissions",
                "image": "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-v17.0.0",
                "command": ["sh", "-c", "touch /logs-42/output.log && chmod 666 /logs-42/output.log"],
                "volumeMounts": [{"name": "logs", "mountPath": "/logs-42"}]
            }],
            "containers": [
                {
                    "name": "build",
                    "image": "quay.io/buildah/stable",
                    "command": ["sh", "-c", "if [ -x /usr/local/bin/bash ]; then exec /usr/local/bin/bash; else exec sh; fi"],
                    "volumeMounts": [{"name": "repo", "mountPath": "/builds"}, {"name": "logs", "mountPath": "/logs-42"}]
                },
                {
                    "name": "helper",
                    "image": "registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper:x86_64-v17.0.0",
                    "command": ["sh", "-c", "exec sleep infinity"],
                    "volumeMounts": [{"name": "repo", "mountPath": "/builds"}, {"name": "logs", "mountPath": "/logs-42"}]
                }
            ],
            "volumes": [{"name": "repo", "emptyDir": {}}, {"name": "logs", "emptyDir": {}}]
        }
    })
}

/// Strategic merge of a PodSpec patch, as far as these patches go: lists of named things
/// (containers, init containers, volumes, mounts, env, ports) merge by `name`, new ones are
/// appended; other maps merge; anything else is replaced.
fn strategic_merge(base: &mut Value, patch: &Value) {
    const BY_NAME: &[&str] = &[
        "containers",
        "initContainers",
        "volumes",
        "volumeMounts",
        "env",
        "ports",
    ];
    let (Some(b), Some(p)) = (base.as_object_mut(), patch.as_object()) else {
        *base = patch.clone();
        return;
    };
    for (key, pv) in p {
        let by_name = BY_NAME.contains(&key.as_str());
        match (b.get_mut(key), pv) {
            (Some(Value::Array(items)), Value::Array(patch_items)) if by_name => {
                for pi in patch_items {
                    match items.iter_mut().find(|i| i["name"] == pi["name"]) {
                        Some(existing) => strategic_merge(existing, pi),
                        None => items.push(pi.clone()),
                    }
                }
            }
            (Some(bv), Value::Object(_)) if bv.is_object() => strategic_merge(bv, pv),
            _ => {
                b.insert(key.clone(), pv.clone());
            }
        }
    }
}

/// The job pod the runner makes with this config.toml, checking the config on the way.
fn ci_job_pod(set: &str, config_toml: &str, patch_yaml: Option<&str>) -> Value {
    let config: toml::Value = toml::from_str(config_toml)
        .unwrap_or_else(|e| panic!("{set}: config.toml does not parse: {e}"));
    let runner = &config["runners"][0];
    assert_eq!(
        runner.get("executor").and_then(|v| v.as_str()),
        Some("kubernetes"),
        "{set}: the snippet is for the Kubernetes executor"
    );
    assert_eq!(
        runner
            .get("feature_flags")
            .and_then(|f| f.get("FF_USE_ADVANCED_POD_SPEC_CONFIGURATION"))
            .and_then(|v| v.as_bool()),
        Some(true),
        "{set}: pod_spec patches need FF_USE_ADVANCED_POD_SPEC_CONFIGURATION"
    );
    let specs = runner["kubernetes"]["pod_spec"]
        .as_array()
        .unwrap_or_else(|| panic!("{set}: no [[runners.kubernetes.pod_spec]]"));
    assert_eq!(specs.len(), 1, "{set}: one pod_spec patch");
    let spec = &specs[0];
    assert_eq!(
        spec.get("patch_type").and_then(|v| v.as_str()),
        Some("strategic"),
        "{set}: a strategic merge patch adds to the runner's init containers"
    );
    let patch_text = spec["patch"].as_str().expect("inline patch");
    if let Some(carried) = patch_yaml {
        assert_eq!(
            carried.trim(),
            patch_text.trim(),
            "{set}: pod-spec-patch.yaml and config.toml's patch differ"
        );
    }
    let patch = yaml_docs(patch_text)
        .into_iter()
        .next()
        .expect("a patch document");
    let mut pod = runner_job_pod();
    strategic_merge(&mut pod["spec"], &patch);
    pod
}

/// The CI job pods a set describes (one per ConfigMap carrying a runner config.toml).
fn ci_pods(set: &Set) -> Vec<Value> {
    set.docs
        .iter()
        .filter(|d| kind(d) == "ConfigMap")
        .filter_map(|d| {
            let toml = d["data"]["config.toml"].as_str()?;
            Some(ci_job_pod(
                &set.name,
                toml,
                d["data"]["pod-spec-patch.yaml"].as_str(),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reading workloads.

/// A workload's pod spec (and whether it is the CI job pod).
struct PodRef<'a> {
    what: String,
    spec: &'a Value,
    ci_job: bool,
}

fn pods<'a>(set: &'a Set, ci: &'a [Value]) -> Vec<PodRef<'a>> {
    let mut out = vec![];
    for d in &set.docs {
        if matches!(
            kind(d),
            "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job"
        ) {
            out.push(PodRef {
                what: format!("{}: {}/{}", set.name, kind(d), name(d)),
                spec: &d["spec"]["template"]["spec"],
                ci_job: false,
            });
        } else if kind(d) == "Pod" {
            out.push(PodRef {
                what: format!("{}: Pod/{}", set.name, name(d)),
                spec: &d["spec"],
                ci_job: false,
            });
        }
    }
    for pod in ci {
        out.push(PodRef {
            what: format!(
                "{}: CI job pod (runner config.toml patch applied)",
                set.name
            ),
            spec: &pod["spec"],
            ci_job: true,
        });
    }
    out
}

/// Every container of a pod spec, init containers first, with whether it is an init container.
fn containers(spec: &Value) -> Vec<(&Value, bool)> {
    let init = spec["initContainers"].as_array().into_iter().flatten();
    let main = spec["containers"].as_array().into_iter().flatten();
    init.map(|c| (c, true))
        .chain(main.map(|c| (c, false)))
        .collect()
}

/// A container running the regrelay image.
fn is_regrelay(c: &Value) -> bool {
    let image = c["image"].as_str().unwrap_or("");
    let repo = image.rsplit('/').next().unwrap_or("");
    repo.split([':', '@']).next() == Some("regrelay")
}

/// A regrelay container's settings: its flags, else its literal REGRELAY_* env.
struct Settings {
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

impl Settings {
    fn of(c: &Value) -> Settings {
        let env = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e["value"].as_str()?.to_owned(),
                ))
            })
            .collect();
        Settings {
            args: str_list(&c["args"]),
            env,
        }
    }

    /// Every value of `--flag` (as `--flag=V` or `--flag V`), else of its env variable.
    fn all(&self, flag: &str) -> Vec<String> {
        let mut out = vec![];
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix(&format!("--{flag}=")) {
                out.push(v.to_owned());
            } else if a.strip_prefix("--") == Some(flag) {
                out.extend(it.next().cloned());
            }
        }
        if out.is_empty() {
            let var = format!("REGRELAY_{}", flag.to_uppercase().replace('-', "_"));
            if let Some(v) = self.env.get(&var) {
                out.extend(v.split(',').map(str::to_owned));
            }
        }
        out
    }

    fn one(&self, flag: &str) -> Option<String> {
        self.all(flag).pop()
    }

    fn secs(&self, flag: &str, default: u64) -> u64 {
        self.one(flag)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("--{flag}={v}")))
            .unwrap_or(default)
    }

    fn listen(&self) -> SocketAddr {
        let l = self.one("listen").unwrap_or_else(|| "0.0.0.0:5000".into());
        l.parse().unwrap_or_else(|_| panic!("--listen={l}"))
    }

    /// Files regrelay refuses unless only their owner may read them.
    fn private_files(&self) -> Vec<String> {
        let mut files = self.all("session-key-file");
        files.extend(
            self.all("upstream-credentials")
                .iter()
                .filter_map(|nf| nf.split_once('=').map(|(_, f)| f.to_owned())),
        );
        files
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// The volume a container path lives on: (volume name, mount path).
fn volume_of<'a>(c: &'a Value, path: &str) -> Option<(&'a str, &'a str)> {
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .filter(|(_, mp)| path.starts_with(&format!("{}/", mp.trim_end_matches('/'))))
        .max_by_key(|(_, mp)| mp.len())
}

fn volume<'a>(spec: &'a Value, name: &str) -> Option<&'a Value> {
    spec["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
}

// ---------------------------------------------------------------------------------------------
// The rules.

/// A probe reaches regrelay: an httpGet on the pod IP and a declared container port that is
/// regrelay's (no `host:`, regrelay not on loopback), or an exec `regrelay healthcheck` on
/// regrelay's own port.
fn check_probe(
    problems: &mut Vec<String>,
    at: &str,
    c: &Value,
    probe: &Value,
    paths: &[&str],
    s: &Settings,
) {
    let listen = s.listen();
    let tls = s.one("tls-cert").is_some();
    if let Some(get) = probe.get("httpGet") {
        if get.get("host").is_some() {
            problems.push(format!(
                "{at}: httpGet has `host:` (the kubelet would probe that host, not the pod)"
            ));
        }
        if is_loopback(listen.ip()) {
            problems.push(format!(
                "{at}: httpGet goes to the pod IP but regrelay listens on {listen} only: use an \
                 exec `regrelay healthcheck`"
            ));
        }
        let ports: Vec<&Value> = c["ports"].as_array().into_iter().flatten().collect();
        let port = match &get["port"] {
            Value::String(n) => ports
                .iter()
                .find(|p| p["name"].as_str() == Some(n))
                .and_then(|p| p["containerPort"].as_u64()),
            Value::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64())
                .and_then(|p| p["containerPort"].as_u64()),
            _ => None,
        };
        if port != Some(u64::from(listen.port())) {
            problems.push(format!(
                "{at}: httpGet port {} is not a declared container port equal to --listen {listen}",
                get["port"]
            ));
        }
        let path = get["path"].as_str().unwrap_or("");
        if !paths.contains(&path) {
            problems.push(format!("{at}: path {path:?}, want one of {paths:?}"));
        }
        let scheme = get["scheme"].as_str().unwrap_or("HTTP");
        if scheme != if tls { "HTTPS" } else { "HTTP" } {
            problems.push(format!("{at}: scheme {scheme} but TLS is {tls}"));
        }
    } else if let Some(exec) = probe.get("exec") {
        let cmd = str_list(&exec["command"]);
        if cmd.len() < 2 || !cmd[0].ends_with("regrelay") || cmd[1] != "healthcheck" {
            problems.push(format!(
                "{at}: exec {cmd:?} is not `regrelay healthcheck` (the image has no shell)"
            ));
            return;
        }
        let url = cmd
            .iter()
            .find_map(|a| a.strip_prefix("--url="))
            .map(str::to_owned)
            .or_else(|| {
                let i = cmd.iter().position(|a| a == "--url")?;
                cmd.get(i + 1).cloned()
            })
            .unwrap_or_else(|| "http://127.0.0.1:5000/-/healthy".into());
        let uri: http::Uri = url.parse().unwrap_or_else(|_| panic!("{at}: url {url}"));
        let host_ok = matches!(uri.host(), Some("127.0.0.1" | "localhost" | "[::1]"));
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        if !host_ok || port != listen.port() {
            problems.push(format!(
                "{at}: healthcheck asks {url}, regrelay listens on {listen}"
            ));
        }
        if !(listen.ip().is_unspecified() || is_loopback(listen.ip())) {
            problems.push(format!(
                "{at}: regrelay listens on {listen}, the exec probe asks the loopback"
            ));
        }
        if !paths.contains(&uri.path()) {
            problems.push(format!("{at}: path {}, want one of {paths:?}", uri.path()));
        }
        if (uri.scheme_str() == Some("https")) != tls {
            problems.push(format!("{at}: {url} but TLS is {tls}"));
        }
    } else {
        problems.push(format!(
            "{at}: neither httpGet nor exec `regrelay healthcheck`"
        ));
    }
}

/// The rules for one pod.
fn check_pod(problems: &mut Vec<String>, pod: &PodRef) {
    let spec = pod.spec;
    let psc = &spec["securityContext"];
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(DEFAULT_GRACE);
    let mut regrelays = 0;
    for (c, init) in containers(spec) {
        let regrelay = is_regrelay(c);
        if !regrelay && pod.ci_job {
            continue; // the runner's own containers in the CI job pod
        }
        let at = format!(
            "{} container {}",
            pod.what,
            c["name"].as_str().unwrap_or("?")
        );
        // Security, for every container the manifests define.
        let sc = &c["securityContext"];
        let eff = |k: &str| sc.get(k).or_else(|| psc.get(k));
        if eff("runAsNonRoot") != Some(&json!(true)) {
            problems.push(format!("{at}: runAsNonRoot is not true"));
        }
        match eff("runAsUser").and_then(Value::as_u64) {
            Some(0) | None => problems.push(format!("{at}: no fixed non-root runAsUser")),
            Some(_) => {}
        }
        if sc["readOnlyRootFilesystem"] != json!(true) {
            problems.push(format!("{at}: readOnlyRootFilesystem is not true"));
        }
        if sc["allowPrivilegeEscalation"] != json!(false) {
            problems.push(format!("{at}: allowPrivilegeEscalation is not false"));
        }
        if !str_list(&sc["capabilities"]["drop"])
            .iter()
            .any(|d| d == "ALL")
        {
            problems.push(format!("{at}: capabilities are not dropped (ALL)"));
        }
        for r in ["cpu", "memory"] {
            if c["resources"]["requests"].get(r).is_none() {
                problems.push(format!("{at}: no {r} request"));
            }
        }
        if !regrelay {
            continue;
        }
        regrelays += 1;
        let s = Settings::of(c);
        if s.args.first().map(String::as_str) != Some("serve") {
            problems.push(format!("{at}: args do not start with `serve`"));
        }
        // A regrelay init container must be a sidecar, or the pod never starts.
        let sidecar = init && c["restartPolicy"] == json!("Always");
        if init && !sidecar {
            problems.push(format!(
                "{at}: an init container without restartPolicy: Always (never completes)"
            ));
        }
        // In a pod that runs to completion (a CI job), regrelay never exits on its own: only a
        // native sidecar lets the pod finish.
        let completes = matches!(spec["restartPolicy"].as_str(), Some("Never" | "OnFailure"));
        if (pod.ci_job || completes) && !sidecar {
            problems.push(format!(
                "{at}: in a pod that runs to completion regrelay must be a native sidecar \
                 (initContainers, restartPolicy: Always): as a container it keeps the pod running"
            ));
        }
        // Probes.
        for (probe, paths) in [
            ("readinessProbe", &["/-/ready"][..]),
            ("livenessProbe", &["/-/healthy"][..]),
            ("startupProbe", &["/-/healthy", "/-/ready"][..]),
        ] {
            match c.get(probe) {
                Some(p) => check_probe(problems, &format!("{at} {probe}"), c, p, paths, &s),
                None if probe != "startupProbe" => problems.push(format!("{at}: no {probe}")),
                None => {}
            }
        }
        if sidecar && c.get("startupProbe").is_none() {
            problems.push(format!(
                "{at}: a sidecar needs a startupProbe (the job's containers wait for it)"
            ));
        }
        // Shutdown: the grace period outlasts delay + drain.
        let delay = s.secs("shutdown-delay-secs", DEFAULT_DELAY);
        let drain = s
            .secs("shutdown-grace-secs", DEFAULT_GRACE_SECS)
            .max(s.secs("upload-drain-secs", DEFAULT_DRAIN));
        if grace <= delay + drain {
            problems.push(format!(
                "{at}: terminationGracePeriodSeconds {grace} <= shutdown delay {delay} + drain \
                 {drain}: uploads in flight would be killed"
            ));
        }
        // Private files are read straight from a Secret volume (defaultMode 0400, checked
        // below) under the pod's fsGroup: the kubelet makes them 0440 with group fsGroup, a
        // group the container has, which regrelay accepts. Without fsGroup they are root's
        // 0400, unreadable by the non-root uid.
        for f in s.private_files() {
            match volume_of(c, &f).and_then(|(v, _)| volume(spec, v)) {
                Some(v) if v.get("secret").is_some() => {
                    if psc.get("fsGroup").and_then(Value::as_u64).is_none() {
                        problems.push(format!(
                            "{at}: {f} is on Secret volume {} but the pod has no fsGroup: its \
                             files are root's 0400, unreadable by a non-root uid",
                            v["name"]
                        ));
                    }
                }
                Some(v) => problems.push(format!(
                    "{at}: {f} is read from volume {} (not a Secret volume): nothing puts it \
                     there (mount the Secret, defaultMode 0400, under fsGroup)",
                    v["name"]
                )),
                None => problems.push(format!("{at}: {f} is on no volume")),
            }
        }
        // Listening: a host-network pod listens on loopback only (it holds pull credentials).
        if spec["hostNetwork"] == json!(true) && !is_loopback(s.listen().ip()) {
            problems.push(format!(
                "{at}: on the host network regrelay must listen on loopback, not {}",
                s.listen()
            ));
        }
    }
    if regrelays == 0 {
        problems.push(format!("{}: no regrelay container", pod.what));
    }
    if pod.ci_job && spec.get("terminationGracePeriodSeconds").is_some() {
        problems.push(format!(
            "{}: the patch sets the job pod's grace period (the runner's setting)",
            pod.what
        ));
    }
    // Secret volumes: owner-read only, named files.
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let Some(secret) = v.get("secret") else {
            continue;
        };
        let at = format!("{} volume {}", pod.what, v["name"]);
        if secret["defaultMode"].as_u64() != Some(SECRET_MODE) {
            problems.push(format!(
                "{at}: defaultMode {}, want 0400 (256)",
                secret["defaultMode"]
            ));
        }
        let items = secret["items"].as_array();
        if items.map(Vec::len).unwrap_or(0) == 0 {
            problems.push(format!("{at}: list its files (items)"));
        }
        for i in items.into_iter().flatten() {
            if i.get("mode")
                .is_some_and(|m| m.as_u64() != Some(SECRET_MODE))
            {
                problems.push(format!("{at}: item mode {}, want 0400", i["mode"]));
            }
        }
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The rules across one release's objects: replicas, PDB, HPA, Service; node mirror files.
fn check_set(problems: &mut Vec<String>, set: &Set) {
    let of_kind = |k: &'static str| set.docs.iter().filter(move |d| kind(d) == k);
    for d in of_kind("Deployment") {
        let at = format!("{}: Deployment/{}", set.name, name(d));
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let hpa = of_kind("HorizontalPodAutoscaler").find(|h| {
            h["spec"]["scaleTargetRef"]["kind"] == json!("Deployment")
                && h["spec"]["scaleTargetRef"]["name"].as_str() == Some(name(d))
        });
        match (d["spec"]["replicas"].as_u64(), hpa) {
            (Some(_), Some(_)) => problems.push(format!(
                "{at}: sets replicas and has an HPA (every apply would undo the HPA's count)"
            )),
            (Some(n), None) if n < 2 => {
                problems.push(format!("{at}: {n} replica(s), want at least 2"))
            }
            (None, None) => problems.push(format!("{at}: 1 replica (default), want 2+")),
            (None, Some(h)) if h["spec"]["minReplicas"].as_u64().unwrap_or(1) < 2 => {
                problems.push(format!("{at}: HPA minReplicas below 2"))
            }
            _ => {}
        }
        if !of_kind("PodDisruptionBudget")
            .any(|p| labels_match(&p["spec"]["selector"]["matchLabels"], labels))
        {
            problems.push(format!("{at}: no PodDisruptionBudget selects its pods"));
        }
        let ports: BTreeSet<String> = containers(&d["spec"]["template"]["spec"])
            .into_iter()
            .filter(|(c, _)| is_regrelay(c))
            .flat_map(|(c, _)| c["ports"].as_array().cloned().unwrap_or_default())
            .flat_map(|p| [p["name"].to_string(), p["containerPort"].to_string()])
            .collect();
        let services: Vec<&Value> = of_kind("Service")
            .filter(|s| labels_match(&s["spec"]["selector"], labels))
            .collect();
        if services.is_empty() {
            problems.push(format!("{at}: no Service selects its pods"));
        }
        for s in services {
            for p in s["spec"]["ports"].as_array().into_iter().flatten() {
                if !ports.contains(&p["targetPort"].to_string()) {
                    problems.push(format!(
                        "{at}: Service {} targets port {}, not regrelay's",
                        name(s),
                        p["targetPort"]
                    ));
                }
            }
        }
    }
    for d in of_kind("DaemonSet") {
        let at = format!("{}: DaemonSet/{}", set.name, name(d));
        let spec = &d["spec"]["template"]["spec"];
        if spec["hostNetwork"] != json!(true) {
            problems.push(format!(
                "{at}: not on the host network (the node's runtime pulls from its loopback)"
            ));
        }
        for (c, _) in containers(spec).into_iter().filter(|(c, _)| is_regrelay(c)) {
            check_node_files(problems, set, &at, &Settings::of(c));
        }
    }
}

/// The node mirror's containerd hosts.toml and registries.conf name every upstream and point at
/// the DaemonSet's listener.
fn check_node_files(problems: &mut Vec<String>, set: &Set, at: &str, s: &Settings) {
    let relay = s.listen().to_string();
    let Some(cm) = set
        .docs
        .iter()
        .find(|d| kind(d) == "ConfigMap" && d["data"].get("registries.conf").is_some())
    else {
        problems.push(format!("{at}: no ConfigMap with the node files"));
        return;
    };
    let registry: http::Uri = s.one("registry").unwrap_or_default().parse().unwrap();
    let mut names = vec![registry.authority().unwrap().to_string()];
    names.extend(
        s.all("upstream")
            .iter()
            .filter_map(|u| u.split_once('=').map(|(n, _)| n.to_owned())),
    );
    let conf: toml::Value = toml::from_str(cm["data"]["registries.conf"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{at}: registries.conf: {e}"));
    for n in &names {
        let key = format!("{}.hosts.toml", n.replace(':', "_"));
        match cm["data"][&key].as_str() {
            None => problems.push(format!("{at}: no {key} for upstream {n}")),
            Some(t) => {
                let hosts: toml::Value =
                    toml::from_str(t).unwrap_or_else(|e| panic!("{at}: {key}: {e}"));
                let host = hosts
                    .get("host")
                    .and_then(|h| h.get(format!("http://{relay}").as_str()));
                let pulls = host
                    .and_then(|h| h.get("capabilities"))
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| c.iter().any(|x| x.as_str() == Some("pull")));
                if !pulls || hosts.get("server").is_none() {
                    problems.push(format!(
                        "{at}: {key} does not send pulls to http://{relay} with a server fallback"
                    ));
                }
            }
        }
        let mirrored = conf
            .get("registry")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
            .filter(|r| r.get("prefix").and_then(|p| p.as_str()) == Some(n.as_str()))
            .flat_map(|r| r.get("mirror").and_then(|m| m.as_array()).cloned())
            .flatten()
            .any(|m| {
                m.get("location").and_then(|l| l.as_str()) == Some(format!("{relay}/{n}").as_str())
            });
        if !mirrored {
            problems.push(format!(
                "{at}: registries.conf has no mirror {relay}/{n} for {n}"
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running the real binary on what the manifests pass.

/// What a Secret file holds here, by its name.
fn secret_content(file: &str) -> Vec<u8> {
    let cert = |n: &str| std::fs::read(support::cert(n)).unwrap();
    match file {
        "tls.crt" => cert("server.pem"),
        "tls.key" => cert("server.key"),
        "ca.crt" => cert("ca.pem"),
        f if f.ends_with(".keys") => format!("{}\n", STANDARD.encode([7u8; 32])).into_bytes(),
        f if f.ends_with(".credentials") => {
            b"gitlab+deploy-token-1:gldt-Zq8Xw3Rk7Lm2Pn5Vt9Yc\n".to_vec()
        }
        other => panic!("teach tests/deploy_k8s.rs what Secret file {other:?} holds"),
    }
}

/// This process's group ids (real, effective, saved, fs, supplementary), from /proc/self/status,
/// as regrelay reads its own: regrelay runs here as the same user, with the same groups.
fn own_groups() -> Vec<u32> {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Gid:") || l.starts_with("Groups:"))
        .flat_map(|l| l.split_whitespace().skip(1))
        .filter_map(|g| g.parse().ok())
        .collect()
}

/// This process's effective gid: the stand-in for the pod's fsGroup here.
fn own_gid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let gid = status.lines().find_map(|l| l.strip_prefix("Gid:"));
    let effective = gid.and_then(|g| g.split_whitespace().nth(1));
    effective
        .and_then(|g| g.parse().ok())
        .expect("Gid: in /proc/self/status")
}

/// Lays out a pod's volumes as the kubelet would: Secret files with their mode; under fsGroup,
/// group read added and the group set to fsGroup (kubernetes/kubernetes#57923), here this
/// process's own gid, as the container has fsGroup among its groups; empty dirs for the rest.
fn lay_out_volumes(spec: &Value, dir: &Path) -> BTreeMap<String, PathBuf> {
    let fs_group = spec["securityContext"].get("fsGroup").is_some();
    let mut out = BTreeMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let vname = v["name"].as_str().unwrap().to_owned();
        let vdir = dir.join(&vname);
        std::fs::create_dir_all(&vdir).unwrap();
        if let Some(secret) = v.get("secret") {
            let default = secret["defaultMode"].as_u64().unwrap_or(0o644);
            for item in secret["items"].as_array().into_iter().flatten() {
                let file = item["path"].as_str().unwrap();
                let path = vdir.join(file);
                std::fs::write(&path, secret_content(file)).unwrap();
                let mut mode = item["mode"].as_u64().unwrap_or(default) as u32;
                if fs_group {
                    mode |= 0o440;
                    std::os::unix::fs::chown(&path, None, Some(own_gid())).unwrap();
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        out.insert(vname, vdir);
    }
    out
}

/// The container's view: its mount paths, rewritten to the laid-out volumes (longest first).
fn rewriter(c: &Value, volumes: &BTreeMap<String, PathBuf>) -> impl Fn(&str) -> String {
    let mut mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let dir = &volumes[m["name"].as_str().unwrap()];
            (
                m["mountPath"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_owned(),
                dir.display().to_string(),
            )
        })
        .collect();
    mounts.sort_by_key(|(mp, _)| std::cmp::Reverse(mp.len()));
    move |arg: &str| {
        for (mp, dir) in &mounts {
            // The mount path itself, or a path under it: `/run/x`, `--flag=/run/x/file`.
            let at = arg.match_indices(mp.as_str()).map(|(i, _)| i).find(|&i| {
                let rest = &arg[i + mp.len()..];
                rest.is_empty() || rest.starts_with('/')
            });
            if let Some(i) = at {
                return format!("{}{dir}{}", &arg[..i], &arg[i + mp.len()..]);
            }
        }
        arg.to_owned()
    }
}

fn regrelay_cmd(args: &[String]) -> Output {
    let mut cmd = Command::new(regrelay_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("REGRELAY_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

/// Runs one pod's regrelay containers for real, as far as they can run here: `regrelay
/// check-config` with each one's arguments and env, then its exec probes against `live`.
/// Returns the problems.
fn run_pod(pod: &PodRef, live: SocketAddr) -> Vec<String> {
    run_pod_with(pod, live, &|_| {})
}

/// `run_pod`, with `tamper` called on the laid-out volumes (name -> dir) before anything runs.
fn run_pod_with(
    pod: &PodRef,
    live: SocketAddr,
    tamper: &dyn Fn(&BTreeMap<String, PathBuf>),
) -> Vec<String> {
    let mut problems = vec![];
    let dir = tempfile::tempdir().unwrap();
    let volumes = lay_out_volumes(pod.spec, dir.path());
    tamper(&volumes);
    for (c, _) in containers(pod.spec) {
        let at = format!(
            "{} container {}",
            pod.what,
            c["name"].as_str().unwrap_or("?")
        );
        let rw = rewriter(c, &volumes);
        if !is_regrelay(c) {
            continue;
        }
        let s = Settings::of(c);
        let mut args: Vec<String> = s.args.iter().map(|a| rw(a)).collect();
        if args.first().map(String::as_str) == Some("serve") {
            args[0] = "check-config".into();
        }
        let mut cmd = Command::new(regrelay_bin());
        cmd.args(&args);
        for (k, _) in std::env::vars() {
            if k.starts_with("REGRELAY_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(s.env.iter().map(|(k, v)| (k.clone(), rw(v))));
        let out = cmd.output().unwrap();
        if !out.status.success() {
            problems.push(format!(
                "{at}: regrelay {} refused the manifest's settings: {}",
                args.join(" "),
                text(&out)
            ));
        }
        let listen = s.listen();
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let cmd = str_list(&c[probe]["exec"]["command"]);
            if cmd.len() < 2 {
                continue;
            }
            let moved: Vec<String> = cmd[1..]
                .iter()
                .map(|a| a.replace(&format!("127.0.0.1:{}", listen.port()), &live.to_string()))
                .collect();
            let out = regrelay_cmd(&moved);
            if !out.status.success() {
                problems.push(format!(
                    "{at} {probe}: `regrelay {}` (port moved to a live regrelay) failed: {}",
                    moved.join(" "),
                    text(&out)
                ));
            }
        }
    }
    problems
}

/// A regrelay whose /-/healthy and /-/ready answer 200: its upstream is another regrelay (any
/// HTTP answer makes an upstream ready).
fn live_regrelay() -> (Regrelay, Regrelay) {
    let upstream = Regrelay::start(&["--registry", "http://127.0.0.1:9"]);
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
    for (i, set) in sets.iter().enumerate() {
        let mut docs: Vec<Value> = set.docs.clone();
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
