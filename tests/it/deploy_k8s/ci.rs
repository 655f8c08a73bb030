//! The CI sidecar: the runner's config.toml, its pod_spec patch, and the job pod it makes.

use serde_json::{json, Value};

use super::{kind, yaml_docs, Set};

/// A job pod as the GitLab Runner Kubernetes executor makes it (trimmed to what matters here):
/// the permissions init container, the build and helper containers, the build volume.
pub(crate) fn runner_job_pod() -> Value {
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
pub(crate) fn strategic_merge(base: &mut Value, patch: &Value) {
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
pub(crate) fn ci_job_pod(set: &str, config_toml: &str, patch_yaml: Option<&str>) -> Value {
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
pub(crate) fn ci_pods(set: &Set) -> Vec<Value> {
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
