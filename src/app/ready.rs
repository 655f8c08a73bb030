//! `/-/ready`: whether this replica should get traffic, and what each dependency says.
//!
//! Ready means the default upstream answers `GET /v2/` as a registry does (`200` or `401`, with
//! the `Docker-Distribution-API-Version` header or a challenge): a `--registry` that answers
//! something else (a 404 of a web server) is not ready, and says so. Each upstream's token
//! service is probed too (any HTTP answer to its realm means it is there) and the cache directory
//! checked (and the shared cache's bucket, with `--cache-store`: reported, never a reason to be
//! not ready, since pulls go to the upstream without it), all reported in the body and in
//! `regrelay_dependency_up`; a token service
//! that is down makes the replica not ready only with `--ready-requires-token-service` (off by
//! default: a fleet-wide GitLab outage must not empty a Service whose cached tokens, sessions
//! and cache still serve pulls).
//!
//! The probes have their own connections (the registry's) or take little of the pool (the
//! token service's), and their answer is reused for [`READY_CACHE`], so readiness answers at
//! every limit and a flood of probes costs each dependency one request a second. The body names
//! no internal address: the default upstream is `default`, others by their configured names.

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Request, StatusCode};
use serde_json::{json, Value};

use super::{json, App};
use crate::body::{self, ProxyBody};
use crate::error::Error;
use crate::metrics::DependencyLabels;
use crate::upstream::Upstream;

/// How long a readiness answer is reused.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// The readiness probe's state: its registry client, and its last answer.
pub(super) struct Readiness {
    pub(super) probe: Upstream,
    pub(super) last: tokio::sync::Mutex<Option<(Instant, Probed)>>,
}

/// What the probes found.
#[derive(Clone)]
pub(super) struct Probed {
    ready: bool,
    body: Value,
}

/// A dependency's state in the body: `ok`, or what is wrong with it.
fn state(ok: bool, what: &str, detail: Option<String>) -> Value {
    let mut v = json!({ "status": if ok { "ok" } else { what } });
    if let Some(d) = detail {
        v["detail"] = d.into();
    }
    v
}

/// True when an answer to `GET /v2/` comes from a registry: the registry API's version header
/// (distribution and GitLab's registry send it on every answer) on anything but a 404 or a server
/// error, or a `401` with a challenge (registries behind fronts that drop the header).
fn is_registry(status: StatusCode, headers: &HeaderMap) -> bool {
    let api_version = headers.contains_key("docker-distribution-api-version");
    let challenged = headers.contains_key(header::WWW_AUTHENTICATE);
    let answered = status != StatusCode::NOT_FOUND && !status.is_server_error();
    (api_version && answered) || (status == StatusCode::UNAUTHORIZED && challenged)
}

impl App {
    /// `/-/ready`: 200 when ready, else 503 ("not ready" is not a gateway error of a proxied
    /// request, so it is not the 502 of [`Error::status`]), the body saying why.
    pub(super) async fn ready(&self) -> Response {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "draining" }).to_string(),
            );
        }
        let probed = {
            let mut last = self.ready.last.lock().await;
            match &*last {
                Some((at, probed)) if at.elapsed() < READY_CACHE => probed.clone(),
                _ => {
                    let probed = self.probe_dependencies().await;
                    *last = Some((Instant::now(), probed.clone()));
                    probed
                }
            }
        };
        let status = match probed.ready {
            true => StatusCode::OK,
            false => StatusCode::SERVICE_UNAVAILABLE,
        };
        json(status, probed.body.to_string())
    }

    async fn probe_dependencies(&self) -> Probed {
        let registry = async {
            match self.ready.probe.probe_response().await {
                Ok(resp) => {
                    let (status, ok) = (resp.status(), is_registry(resp.status(), resp.headers()));
                    let detail = (!ok).then(|| {
                        format!(
                            "GET /v2/ answered {status} without a registry's headers: \
                             --registry does not point at a registry's API"
                        )
                    });
                    let mut v = state(ok, "not_a_registry", detail);
                    v["upstream_status"] = status.as_u16().into();
                    (ok, v)
                }
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "not ready: the registry");
                    (
                        false,
                        state(false, "unreachable", Some(err.public_message())),
                    )
                }
            }
        };
        // The token services are probed at once (a few upstreams, each with its deadline).
        let mut probes = tokio::task::JoinSet::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            let name = if i == 0 {
                "default".to_owned()
            } else {
                lane.config.name.clone()
            };
            let minter = lane.access.shared_minter();
            probes.spawn(async move { (i, name, token_service(&minter).await) });
        }
        let tokens = async {
            let mut found = vec![];
            while let Some(Ok(probe)) = probes.join_next().await {
                found.push(probe);
            }
            found.sort_by_key(|(i, _, _)| *i);
            found
                .into_iter()
                .map(|(_, name, v)| (name, v))
                .collect::<Vec<_>>()
        };
        // The shared bucket: reported, never a reason to be not ready (a replica that cannot
        // use it fetches from the upstream as without it).
        let store = async {
            let shared = self.cache.as_ref().and_then(|c| c.shared.as_ref())?;
            let timeout = Duration::from_secs(crate::upstream::READY_TIMEOUT_SECS);
            Some(match tokio::time::timeout(timeout, shared.probe()).await {
                Ok(Ok(())) => (true, state(true, "", None)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the shared cache's bucket is unusable; fills go to the upstream");
                    (
                        false,
                        state(false, "unusable", Some(e.problem().to_owned())),
                    )
                }
                Err(_) => (
                    false,
                    state(false, "unreachable", Some("no answer within 5 s".into())),
                ),
            })
        };
        let ((registry_ok, registry), tokens, store) = tokio::join!(registry, tokens, store);
        let cache_ok = self.cache.as_ref().map(|c| c.usable());
        let mut token_services = serde_json::Map::new();
        let mut tokens_ok = true;
        for (name, (ok, v)) in tokens {
            self.metrics
                .dependency_up
                .get_or_create(&DependencyLabels {
                    dependency: "token_service",
                    upstream: name.clone(),
                })
                .set(i64::from(ok));
            if !ok {
                tracing::warn!(upstream = %name, state = %v, "a token service does not answer");
            }
            tokens_ok &= ok;
            token_services.insert(name, v);
        }
        let up = |dependency, ok: bool| {
            self.metrics
                .dependency_up
                .get_or_create(&DependencyLabels {
                    dependency,
                    upstream: "default".into(),
                })
                .set(i64::from(ok));
        };
        up("registry", registry_ok);
        let mut body = json!({
            "registry": registry,
            "token_services": token_services,
        });
        if let Some(result) = cache_ok {
            up("cache_dir", result.is_ok());
            body["cache_dir"] = match result {
                Ok(()) => state(true, "", None),
                Err(e) => state(false, "unusable", Some(e)),
            };
        }
        if let Some((ok, v)) = store {
            up("cache_store", ok);
            body["cache_store"] = v;
        }
        let ready = registry_ok && (tokens_ok || !self.config.ready_requires_token_service);
        body["status"] = if ready { "ready" } else { "not ready" }.into();
        Probed { ready, body }
    }
}

type Response = http::Response<ProxyBody>;

/// Whether a token service answers HTTP at its realm (no credentials, no scope: GitLab answers
/// 403 or 404, which is fine), and what is wrong otherwise.
async fn token_service(minter: &crate::mint::Minter) -> (bool, Value) {
    let realm = match minter.realm().await {
        Ok(r) => r,
        Err(e) => return (false, state(false, "unknown", Some(e.public_message()))),
    };
    let req = match Request::get(realm).body(body::empty()) {
        Ok(r) => r,
        Err(e) => {
            return (
                false,
                state(false, "unknown", Some(Error::from(e).to_string())),
            )
        }
    };
    let timeout = Duration::from_secs(crate::upstream::READY_TIMEOUT_SECS);
    match tokio::time::timeout(timeout, minter.token_client().send(req)).await {
        Ok(Ok(resp)) => {
            let mut v = state(true, "", None);
            v["upstream_status"] = resp.status().as_u16().into();
            (true, v)
        }
        Ok(Err(e)) => (false, state(false, "unreachable", Some(e.public_message()))),
        Err(_) => (
            false,
            state(false, "unreachable", Some("no answer within 5 s".into())),
        ),
    }
}
