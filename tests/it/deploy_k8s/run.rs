//! Running the real binary on what the manifests pass: the pod's volumes laid out as the kubelet
//! would, `regrelay check-config` with each container's arguments, its exec probes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use super::rules::{containers, is_regrelay, PodRef, Settings};
use super::{str_list, support, text};
use support::regrelay_bin;

/// What a Secret file holds here, by its name.
pub(crate) fn secret_content(file: &str) -> Vec<u8> {
    let cert = |n: &str| std::fs::read(support::cert(n)).unwrap();
    match file {
        "tls.crt" => cert("server.pem"),
        "tls.key" => cert("server.key"),
        "ca.crt" => cert("ca.pem"),
        f if f.ends_with(".keys") => format!("{}\n", STANDARD.encode([7u8; 32])).into_bytes(),
        f if f.ends_with(".credentials") => {
            b"gitlab+deploy-token-1:gldt-Zq8Xw3Rk7Lm2Pn5Vt9Yc\n".to_vec()
        }
        other => panic!("teach tests/it/deploy_k8s/run.rs what Secret file {other:?} holds"),
    }
}

/// This process's group ids (real, effective, saved, fs, supplementary), from /proc/self/status,
/// as regrelay reads its own: regrelay runs here as the same user, with the same groups.
pub(crate) fn own_groups() -> Vec<u32> {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Gid:") || l.starts_with("Groups:"))
        .flat_map(|l| l.split_whitespace().skip(1))
        .filter_map(|g| g.parse().ok())
        .collect()
}

/// This process's effective gid: the stand-in for the pod's fsGroup here.
pub(crate) fn own_gid() -> u32 {
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
pub(crate) fn lay_out_volumes(spec: &Value, dir: &Path) -> BTreeMap<String, PathBuf> {
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
pub(crate) fn rewriter(c: &Value, volumes: &BTreeMap<String, PathBuf>) -> impl Fn(&str) -> String {
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

pub(crate) fn regrelay_cmd(args: &[String]) -> Output {
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
pub(crate) fn run_pod(pod: &PodRef, live: SocketAddr) -> Vec<String> {
    run_pod_with(pod, live, &|_| {})
}

/// `run_pod`, with `tamper` called on the laid-out volumes (name -> dir) before anything runs.
pub(crate) fn run_pod_with(
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
