//! The rules every workload and every release's objects keep (probes, sidecars, grace periods,
//! security, Secret modes, replicas, PDB, HPA, Services, node files, the cache volume, the
//! metrics port).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use super::{kind, name, str_list, Set};

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: u64 = 30;
/// regrelay's shutdown defaults (`serve --help`).
const DEFAULT_DELAY: u64 = 5;
const DEFAULT_GRACE_SECS: u64 = 30;
const DEFAULT_DRAIN: u64 = 900;
/// Secret volume mode: owner read only.
const SECRET_MODE: u64 = 0o400;

/// A workload's pod spec (and whether it is the CI job pod).
pub(crate) struct PodRef<'a> {
    pub(crate) what: String,
    pub(crate) spec: &'a Value,
    pub(crate) ci_job: bool,
}

pub(crate) fn pods<'a>(set: &'a Set, ci: &'a [Value]) -> Vec<PodRef<'a>> {
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
pub(crate) fn containers(spec: &Value) -> Vec<(&Value, bool)> {
    let init = spec["initContainers"].as_array().into_iter().flatten();
    let main = spec["containers"].as_array().into_iter().flatten();
    init.map(|c| (c, true))
        .chain(main.map(|c| (c, false)))
        .collect()
}

/// A container running the regrelay image.
pub(crate) fn is_regrelay(c: &Value) -> bool {
    let image = c["image"].as_str().unwrap_or("");
    let repo = image.rsplit('/').next().unwrap_or("");
    repo.split([':', '@']).next() == Some("regrelay")
}

/// A regrelay container's settings: its flags, else its literal REGRELAY_* env.
pub(crate) struct Settings {
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
}

/// What an env variable from the downward API's `status.hostIP`/`status.podIP` holds here: an
/// address that is neither loopback nor unspecified (TEST-NET-1), as a node's or pod's is.
pub(crate) const STAND_IN_IP: &str = "192.0.2.10";

/// Expands `$(VAR)` in a container argument from the container's env, as the kubelet does
/// (an unknown `$(VAR)` stays as written).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')').map(|j| (&after[..j], &after[j + 1..])) {
            Some((var, tail)) if env.contains_key(var) => {
                out.push_str(&env[var]);
                rest = tail;
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl Settings {
    /// A container's settings, its arguments expanded as the kubelet would.
    pub(crate) fn of(c: &Value) -> Settings {
        let env: BTreeMap<String, String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let value = match (
                    e["value"].as_str(),
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                ) {
                    (Some(v), _) => v.to_owned(),
                    (None, Some("status.hostIP" | "status.podIP")) => STAND_IN_IP.to_owned(),
                    _ => return None,
                };
                Some((e["name"].as_str()?.to_owned(), value))
            })
            .collect();
        let args = str_list(&c["args"])
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        Settings { args, env }
    }

    /// Every value of `--flag` (as `--flag=V` or `--flag V`), else of its env variable.
    pub(crate) fn all(&self, flag: &str) -> Vec<String> {
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

    pub(crate) fn one(&self, flag: &str) -> Option<String> {
        self.all(flag).pop()
    }

    pub(crate) fn secs(&self, flag: &str, default: u64) -> u64 {
        self.one(flag)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("--{flag}={v}")))
            .unwrap_or(default)
    }

    pub(crate) fn listen(&self) -> SocketAddr {
        let l = self.one("listen").unwrap_or_else(|| "0.0.0.0:5000".into());
        l.parse().unwrap_or_else(|_| panic!("--listen={l}"))
    }

    /// `--metrics-listen`, if set.
    pub(crate) fn metrics_listen(&self) -> Option<SocketAddr> {
        let l = self.one("metrics-listen")?;
        Some(l.parse().unwrap_or_else(|_| panic!("--metrics-listen={l}")))
    }

    /// Files regrelay refuses unless only their owner may read them.
    pub(crate) fn private_files(&self) -> Vec<String> {
        let mut files = self.all("session-key-file");
        files.extend(
            self.all("upstream-credentials")
                .iter()
                .filter_map(|nf| nf.split_once('=').map(|(_, f)| f.to_owned())),
        );
        files
    }
}

pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// The volume a container path lives on: (volume name, mount path).
pub(crate) fn volume_of<'a>(c: &'a Value, path: &str) -> Option<(&'a str, &'a str)> {
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .filter(|(_, mp)| path.starts_with(&format!("{}/", mp.trim_end_matches('/'))))
        .max_by_key(|(_, mp)| mp.len())
}

pub(crate) fn volume<'a>(spec: &'a Value, name: &str) -> Option<&'a Value> {
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
pub(crate) fn check_probe(
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
pub(crate) fn check_pod(problems: &mut Vec<String>, pod: &PodRef) {
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
        check_cache(problems, &at, spec, c, &s);
        check_metrics(problems, &at, c, &s);
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

pub(crate) fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The rules across one release's objects: replicas, PDB, HPA, Service; node mirror files.
pub(crate) fn check_set(problems: &mut Vec<String>, set: &Set) {
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
pub(crate) fn check_node_files(problems: &mut Vec<String>, set: &Set, at: &str, s: &Settings) {
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

/// A byte quantity (`11811160064`, `12Gi`, `500M`) as Kubernetes reads it.
pub(crate) fn quantity_bytes(q: &Value) -> Option<u64> {
    let q = match q {
        Value::Number(n) => return n.as_u64(),
        Value::String(s) => s.as_str(),
        _ => return None,
    };
    let digits = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let n: u64 = q[..digits].parse().ok()?;
    let unit: u64 = match &q[digits..] {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// The cache: `--cache-dir` is exactly the mount path of a writable volume of the pod's own
/// (emptyDir, or a generic ephemeral claim: one per pod), since the root filesystem is read-only
/// and a cache directory belongs to one process; the volume holds `--cache-max-bytes`.
fn check_cache(problems: &mut Vec<String>, at: &str, spec: &Value, c: &Value, s: &Settings) {
    let Some(dir) = s.one("cache-dir") else {
        return;
    };
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| {
            m["mountPath"].as_str().map(|p| p.trim_end_matches('/'))
                == Some(dir.trim_end_matches('/'))
        });
    let Some(mount) = mount else {
        problems.push(format!(
            "{at}: --cache-dir={dir} is no volume's mount path: on the read-only root the cache \
             fails at start"
        ));
        return;
    };
    if mount["readOnly"] == json!(true) {
        problems.push(format!("{at}: the cache mount {dir} is read-only"));
    }
    let vname = mount["name"].as_str().unwrap_or("");
    let Some(v) = volume(spec, vname) else {
        problems.push(format!("{at}: the cache mount names no volume {vname}"));
        return;
    };
    let size = if let Some(e) = v.get("emptyDir") {
        e.get("sizeLimit")
    } else if let Some(e) = v.get("ephemeral") {
        let claim = &e["volumeClaimTemplate"]["spec"];
        if !str_list(&claim["accessModes"])
            .iter()
            .any(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod")
        {
            problems.push(format!("{at}: the cache claim is not ReadWriteOnce"));
        }
        claim["resources"]["requests"].get("storage")
    } else {
        problems.push(format!(
            "{at}: the cache is on volume {vname} ({v}), not the pod's own emptyDir or ephemeral \
             claim: a cache directory belongs to one regrelay"
        ));
        return;
    };
    let max: u64 = s
        .one("cache-max-bytes")
        .map_or(10 << 30, |m| m.parse().expect("--cache-max-bytes"));
    match size.and_then(quantity_bytes) {
        Some(bytes) if bytes >= max => {}
        other => problems.push(format!(
            "{at}: the cache volume holds {other:?} bytes, less than --cache-max-bytes {max}"
        )),
    }
}

/// Metrics: `--metrics-listen` is on an address scrapers reach (not loopback) and its port is
/// the container port named `metrics`; a `metrics` port without the flag serves nothing.
fn check_metrics(problems: &mut Vec<String>, at: &str, c: &Value, s: &Settings) {
    let declared = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .and_then(|p| p["containerPort"].as_u64());
    match (s.metrics_listen(), declared) {
        (None, None) => {}
        (None, Some(p)) => problems.push(format!(
            "{at}: container port metrics ({p}) but no --metrics-listen"
        )),
        (Some(addr), declared) => {
            if is_loopback(addr.ip()) {
                problems.push(format!(
                    "{at}: --metrics-listen={addr}: no scraper reaches a loopback address"
                ));
            }
            if declared != Some(u64::from(addr.port())) {
                problems.push(format!(
                    "{at}: --metrics-listen={addr}, but the container port named metrics is {declared:?}"
                ));
            }
        }
    }
}
