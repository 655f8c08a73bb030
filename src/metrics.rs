//! Prometheus metrics (`--metrics-listen`, `GET /metrics`, OpenMetrics text), with the
//! `prometheus-client` crate. Names follow Prometheus conventions (`regrelay_` prefix, base units,
//! `_total` counters). Labels are bounded: a route class, a method from the registry API's set,
//! a status code, a configured upstream name, an outcome from a fixed list, a worker's index. No label carries a
//! repository name, a host a client sent, or anything from a credential.
//!
//! Most metrics are updated where the event happens; the token caches' counters (kept by
//! [`crate::token`] for its own tests and logs) are read at scrape time by [`TokenCollector`],
//! and each connection worker's open connections by [`WorkerCollector`].

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::body::{self, ProxyBody};
use crate::token::Counters;

/// The token caches' counters by upstream name, set once the upstreams are built.
type WatchedTokens = Arc<OnceLock<Vec<(String, Arc<Counters>)>>>;
/// Each connection worker's count of open connections, once the server has its workers.
type WatchedWorkers = Arc<OnceLock<Vec<Arc<AtomicUsize>>>>;
/// Reads the shared bucket's counters by operation (`--cache-store`) at scrape time.
pub struct SharedCounters(pub Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>);
type WatchedShared = Arc<OnceLock<SharedCounters>>;

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedCounters")
    }
}

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// [`crate::router::Route::class`] of the request.
    pub route: &'static str,
    /// [`method_label`] of the method.
    pub method: &'static str,
    /// Status sent to the client.
    pub status: u16,
}

/// A route class alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// [`crate::router::Route::class`] of the request.
    pub route: &'static str,
}

/// A configured upstream's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `--upstream NAME` (`default` for `--registry`).
    pub upstream: String,
}

/// A shared pool (`connections`, `requests`, `upstream`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The pool.
    pub pool: &'static str,
}

/// A dependency of readiness and the upstream it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// `registry`, `token_service` or `cache_dir`.
    pub dependency: &'static str,
    /// `default` or a configured `--upstream` name.
    pub upstream: String,
}

/// One outcome from a fixed list.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The outcome.
    pub outcome: &'static str,
}

/// Every metric regrelay exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `regrelay_requests_total{route,method,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `regrelay_request_duration_seconds{route}`: headers in → response body done.
    pub request_duration: Family<RouteLabels, Histogram>,
    /// `regrelay_client_received_bytes_total`: request body bytes read from clients.
    pub received_bytes: Counter,
    /// `regrelay_client_sent_bytes_total`: response body bytes handed to clients.
    pub sent_bytes: Counter,
    /// `regrelay_upstream_request_duration_seconds{upstream}`: request sent → response headers.
    pub upstream_duration: Family<UpstreamLabels, Histogram>,
    /// `regrelay_sessions_issued_total`: sealed sessions handed out by `/jwt/auth`.
    pub sessions_issued: Counter,
    /// `regrelay_session_opens_total{outcome}`: sealed sessions presented on registry requests.
    pub session_opens: Family<OutcomeLabels, Counter>,
    /// `regrelay_upload_parts_total`: upstream requests uploads were split into.
    pub upload_parts: Counter,
    /// `regrelay_upload_token_refreshes_total`: parts that went with a newer token than the part
    /// before (re-minted mid-upload).
    pub upload_token_refreshes: Counter,
    /// `regrelay_uploads_cut_total`: uploads ended at the upload drain deadline.
    pub uploads_cut: Counter,
    /// `regrelay_uploads_in_flight`.
    pub uploads_in_flight: Gauge,
    /// `regrelay_connections_accepted_total`.
    pub connections_accepted: Counter,
    /// `regrelay_connections_open`.
    pub connections_open: Gauge,
    /// `regrelay_connections_shed_total{outcome}`: closed at the connection limit (`idle`,
    /// `stalled`).
    pub connections_shed: Family<OutcomeLabels, Counter>,
    /// `regrelay_requests_refused_overload_total`: answered 503 at `--max-requests`.
    pub requests_overloaded: Counter,
    /// `regrelay_client_share_refused_total{pool}`: connections closed and requests answered 503
    /// because their client held its share of the pool (`connections`, `requests`, `upstream`).
    pub client_share_refused: Family<PoolLabels, Counter>,
    /// `regrelay_requests_shed_total{outcome}`: requests whose client took none of their response,
    /// reset (HTTP/2) or cut with their connection (HTTP/1.1): `stall` (past
    /// `--h2-stall-timeout-secs`) or `pressure` (a shared pool was exhausted).
    pub requests_shed: Family<OutcomeLabels, Counter>,
    /// `regrelay_dependency_up{dependency,upstream}`: 1 when the last readiness probe found the
    /// dependency answering (`registry`, `token_service`, `cache_dir`), else 0.
    pub dependency_up: Family<DependencyLabels, Gauge>,
    /// `regrelay_token_service_bans_total`: answers of a token service that bans regrelay's
    /// address (GitLab's failed-login ban).
    pub token_service_bans: Counter,
    /// `regrelay_logins_answered_locally_total{outcome}`: token requests regrelay answered
    /// without asking the token service: `replayed` (a refusal of the same credential a moment
    /// ago), `throttled` (429, failed-login budget spent), `banned` (the ban, taken as given).
    pub logins_answered_locally: Family<OutcomeLabels, Counter>,
    /// `regrelay_reserve_connections_total{outcome}`: connections accepted past
    /// `--max-connections`: `health` (answered a health check), `promoted` (got a slot),
    /// `refused` (503, no slot in time).
    pub reserve_connections: Family<OutcomeLabels, Counter>,

    /// `regrelay_shutdown_phase`: 0 serving, 1 shutdown delay (not ready), 2 draining, 3 grace
    /// over, 4 uploads cut.
    pub shutdown_phase: Gauge,
    /// `regrelay_unknown_host_requests_total`: requests whose `Host` is no configured
    /// `--public-url` (the hosts themselves are in the log, once each).
    pub unknown_host_requests: Counter,
    /// `regrelay_reloads_total{outcome}`: SIGHUP reloads (`ok`, or `refused` when a file was
    /// refused and the old one kept).
    pub reloads: Family<OutcomeLabels, Counter>,
    /// `regrelay_cache_requests_total{outcome}`: pulls the cache took part in: `hit`, `miss`
    /// (fetched and filled), `follower` (read another fill), `denied` (the upstream refused the
    /// client), `pass` (proxied without caching), `shared` (read from the shared bucket),
    /// `redirect` (sent to the shared bucket by a presigned URL).
    pub cache_requests: Family<OutcomeLabels, Counter>,
    /// `regrelay_cache_served_bytes_total`: body bytes served from the cache.
    pub cache_served_bytes: Counter,
    /// `regrelay_cache_manifest_gets_avoided_total`: manifest `GET`s by tag answered from the
    /// cache after a `HEAD` found the tag still naming the cached manifest (Docker Hub counts
    /// `GET`s against its pull limit, not `HEAD`s).
    pub cache_manifest_gets_avoided: Counter,
    /// The token caches' counters by upstream name, read at scrape time.
    tokens: WatchedTokens,
    workers: WatchedWorkers,
    shared: WatchedShared,
    /// `request_duration`'s histogram of each route class, taken once: a request's own
    /// observation skips the family's lock and label hashing.
    route_durations: Vec<(&'static str, Histogram)>,
    /// Tells this instance's entries apart in [`REQUEST_COUNTERS`].
    id: u64,
}

/// Where the next [`Metrics`] instance's id comes from.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Entries of [`REQUEST_COUNTERS`] per thread, at most (a request with labels beyond them counts
/// through the family).
const REQUEST_COUNTERS_MAX: usize = 64;

/// One [`REQUEST_COUNTERS`] entry: the instance, route, method and status it counts.
type CachedCounter = (u64, &'static str, &'static str, u16, Counter);

thread_local! {
    /// The `requests` counters this thread used, by instance and labels: a request counts
    /// without the family's lock, SipHash and map lookup (~1k instructions, callgrind).
    static REQUEST_COUNTERS: std::cell::RefCell<Vec<CachedCounter>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Outcomes of opening a sealed session (`regrelay_session_opens_total{outcome}`).
pub const SESSION_OUTCOMES: [&str; 6] = [
    "ok",
    "malformed",
    "unknown_key",
    "other_public_url",
    "tampered",
    "expired",
];

/// `regrelay_shutdown_phase` values.
pub mod phase {
    /// Accepting and ready.
    pub const SERVING: i64 = 0;
    /// SIGTERM received: not ready, still serving.
    pub const DELAY: i64 = 1;
    /// Not accepting; requests finish.
    pub const DRAINING: i64 = 2;
    /// Connections without an upload closed; uploads continue.
    pub const GRACE_OVER: i64 = 3;
    /// Upload drain over: uploads cut.
    pub const UPLOADS_CUT: i64 = 4;
}

/// Registers a metric where it is made, so each is named once ([`Metrics::new`]).
trait Add {
    fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M;
    fn add_with_unit<M: Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        metric: M,
    ) -> M;
}

impl Add for Registry {
    fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.register(name, help, metric.clone());
        metric
    }

    fn add_with_unit<M: Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        metric: M,
    ) -> M {
        self.register_with_unit(name, help, unit, metric.clone());
        metric
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered (the token caches' counters come with [`Metrics::watch_tokens`]).
    pub fn new() -> Metrics {
        let tokens = Arc::new(OnceLock::new());
        let workers = Arc::new(OnceLock::new());
        let shared = Arc::new(OnceLock::new());
        let mut registry = Registry::with_prefix("regrelay");
        let r = &mut registry;
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.5, 14));
        let m = Metrics {
            requests: r.add(
                "requests",
                "Requests served, by route class, method and status",
                Family::default(),
            ),
            request_duration: r.add_with_unit(
                "request_duration",
                "Time from request headers to the end of the response body",
                Unit::Seconds,
                Family::new_with_constructor(seconds as fn() -> Histogram),
            ),
            received_bytes: r.add_with_unit(
                "client_received",
                "Request body bytes read from clients",
                Unit::Bytes,
                Counter::default(),
            ),
            sent_bytes: r.add_with_unit(
                "client_sent",
                "Response body bytes handed to clients",
                Unit::Bytes,
                Counter::default(),
            ),
            upstream_duration: r.add_with_unit(
                "upstream_request_duration",
                "Time from sending a request upstream to its response headers",
                Unit::Seconds,
                Family::new_with_constructor(seconds as fn() -> Histogram),
            ),
            sessions_issued: r.add(
                "sessions_issued",
                "Sealed sessions handed out by /jwt/auth",
                Counter::default(),
            ),
            session_opens: r.add(
                "session_opens",
                "Sealed sessions presented on registry requests, by outcome",
                Family::default(),
            ),
            upload_parts: r.add(
                "upload_parts",
                "Upstream requests that uploads were split into",
                Counter::default(),
            ),
            upload_token_refreshes: r.add(
                "upload_token_refreshes",
                "Upload parts sent with a token minted after the previous part's (refreshed mid-upload)",
                Counter::default(),
            ),
            uploads_cut: r.add(
                "uploads_cut",
                "Uploads ended at the upload drain deadline of a shutdown",
                Counter::default(),
            ),
            uploads_in_flight: r.add(
                "uploads_in_flight",
                "Blob uploads being served",
                Gauge::default(),
            ),
            connections_accepted: r.add(
                "connections_accepted",
                "Client connections accepted",
                Counter::default(),
            ),
            connections_open: r.add(
                "connections_open",
                "Client connections open",
                Gauge::default(),
            ),
            connections_shed: r.add(
                "connections_shed",
                "Connections closed at the connection limit, by why (idle, stalled)",
                Family::default(),
            ),
            requests_overloaded: r.add(
                "requests_refused_overload",
                "Requests answered 503 at --max-requests",
                Counter::default(),
            ),
            client_share_refused: r.add(
                "client_share_refused",
                "Connections closed and requests answered 503 because their client held its share of the pool (connections, requests, upstream)",
                Family::default(),
            ),
            requests_shed: r.add(
                "requests_shed",
                "Requests whose client took none of their response, reset or cut: stall (past --h2-stall-timeout-secs) or pressure (a shared pool was exhausted)",
                Family::default(),
            ),
            reserve_connections: r.add(
                "reserve_connections",
                "Connections accepted past --max-connections, by outcome (health, promoted, refused)",
                Family::default(),
            ),
            token_service_bans: r.add(
                "token_service_bans",
                "Answers of a token service that bans regrelay's address (GitLab's failed-login ban)",
                Counter::default(),
            ),
            dependency_up: r.add(
                "dependency_up",
                "1 when the last readiness probe found the dependency answering (registry, token_service, cache_dir), else 0",
                Family::default(),
            ),
            logins_answered_locally: r.add(
                "logins_answered_locally",
                "Token requests answered without asking the token service: replayed (a refusal of the same credential a moment ago), throttled (failed-login budget spent), banned (the ban, taken as given)",
                Family::default(),
            ),

            shutdown_phase: r.add(
                "shutdown_phase",
                "0 serving, 1 shutdown delay (not ready), 2 draining, 3 grace over, 4 uploads cut",
                Gauge::default(),
            ),
            unknown_host_requests: r.add(
                "unknown_host_requests",
                "Requests whose Host is no configured --public-url",
                Counter::default(),
            ),
            reloads: r.add(
                "reloads",
                "SIGHUP reloads, by outcome (refused: a file was refused and the old one kept)",
                Family::default(),
            ),
            cache_requests: r.add(
                "cache_requests",
                "Pulls the cache took part in, by outcome (hit, miss, follower, denied, pass, stale, shared, redirect)",
                Family::default(),
            ),
            cache_served_bytes: r.add_with_unit(
                "cache_served",
                "Body bytes served from the pull-through cache",
                Unit::Bytes,
                Counter::default(),
            ),
            cache_manifest_gets_avoided: r.add(
                "cache_manifest_gets_avoided",
                "Manifest GETs by tag answered from the cache after a HEAD found the tag unchanged",
                Counter::default(),
            ),
            tokens: tokens.clone(),
            workers: workers.clone(),
            shared: shared.clone(),
            registry: Registry::default(),
            route_durations: Vec::new(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        // Known label values start at 0, so rates and absence alerts work from the first scrape.
        for outcome in ["idle", "stalled"] {
            let _ = m.connections_shed.get_or_create(&OutcomeLabels { outcome });
        }
        for pool in ["connections", "requests", "upstream"] {
            let _ = m.client_share_refused.get_or_create(&PoolLabels { pool });
        }
        for outcome in ["stall", "pressure"] {
            let _ = m.requests_shed.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["replayed", "throttled", "banned"] {
            let _ = m
                .logins_answered_locally
                .get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["health", "promoted", "refused"] {
            let _ = m
                .reserve_connections
                .get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in [
            "hit", "miss", "follower", "denied", "pass", "stale", "shared", "redirect",
        ] {
            let _ = m.cache_requests.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "refused"] {
            let _ = m.reloads.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in SESSION_OUTCOMES {
            let _ = m.session_opens.get_or_create(&OutcomeLabels { outcome });
        }
        r.register(
            "build",
            "regrelay's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register_collector(Box::new(TokenCollector { tokens }));
        r.register_collector(Box::new(WorkerCollector { workers }));
        r.register_collector(Box::new(SharedCollector { shared }));
        // Every route class is timed from the first scrape on.
        let route_durations = crate::router::Route::CLASSES
            .iter()
            .map(|&route| {
                let h = m.request_duration.get_or_create(&RouteLabels { route });
                (route, h.clone())
            })
            .collect();
        Metrics {
            registry,
            route_durations,
            ..m
        }
    }

    /// Exports each connection worker's open connections (once; later calls are ignored).
    pub fn watch_workers(&self, open: Vec<Arc<AtomicUsize>>) {
        let _ = self.workers.set(open);
    }

    /// Exports the shared bucket's counters, read by `read` at scrape time (once; later calls
    /// are ignored).
    pub fn watch_shared(&self, read: SharedCounters) {
        let _ = self.shared.set(read);
    }

    /// Exports the token caches' counters, by upstream name (once; later calls are ignored).
    pub fn watch_tokens(&self, tokens: Vec<(String, Arc<Counters>)>) {
        let _ = self.tokens.set(tokens);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records one finished request.
    pub fn request(
        &self,
        route: &'static str,
        method: &Method,
        status: u16,
        secs: f64,
        received: u64,
        sent: u64,
    ) {
        let method = method_label(method);
        REQUEST_COUNTERS.with(|cached| {
            let mut cached = cached.borrow_mut();
            let key = |e: &CachedCounter| {
                e.0 == self.id && e.1 == route && e.2 == method && e.3 == status
            };
            if let Some(entry) = cached.iter().find(|e| key(e)) {
                entry.4.inc();
                return;
            }
            let labels = RequestLabels {
                route,
                method,
                status,
            };
            let counter = self.requests.get_or_create(&labels).clone();
            counter.inc();
            if cached.len() < REQUEST_COUNTERS_MAX {
                cached.push((self.id, route, method, status, counter));
            }
        });
        match self.route_durations.iter().find(|(r, _)| *r == route) {
            Some((_, histogram)) => histogram.observe(secs),
            None => self
                .request_duration
                .get_or_create(&RouteLabels { route })
                .observe(secs),
        }
        self.received_bytes.inc_by(received);
        self.sent_bytes.inc_by(sent);
    }

    /// Where the response times of `upstream` go (kept by its client: no lookup per request).
    pub fn upstream_histogram(&self, upstream: &str) -> Histogram {
        self.upstream_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// Counts one outcome of a session presented on a request.
    pub fn session_open(&self, outcome: &'static str) {
        self.session_opens
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// The method as a label: the ones registry clients use, else `other` (methods are open-ended).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `regrelay_worker_connections{worker}`, read at each scrape (nothing per connection).
#[derive(Debug)]
struct WorkerCollector {
    workers: WatchedWorkers,
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "worker_connections",
            "Client connections each worker thread serves now (--workers; none with 0)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (i, open) in self.workers.get().into_iter().flatten().enumerate() {
            let worker = i.to_string();
            let labels = [("worker", worker.as_str())];
            let encoder = family.encode_family(&labels)?;
            let n = open.load(std::sync::atomic::Ordering::Relaxed);
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(encoder)?;
        }
        Ok(())
    }
}

/// Reads the shared bucket's counters at scrape time (nothing without `--cache-store`).
#[derive(Debug)]
struct SharedCollector {
    shared: WatchedShared,
}

impl Collector for SharedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(read) = self.shared.get() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "cache_shared_operations",
            "The shared bucket's work (--cache-store), by operation: hits (local misses read \
             from it), uploads, upload_failures, waits (for another replica's fill), takeovers \
             (of a fill whose replica stopped renewing its lease), impatient (stopped waiting \
             after --cache-s3-wait-secs and fetched), evictions",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (operation, n) in (read.0)() {
            let labels = [("operation", operation)];
            let encoder = family.encode_family(&labels)?;
            ConstCounter::new(n).encode(encoder)?;
        }
        Ok(())
    }
}

/// Reads the token caches' counters at scrape time.
#[derive(Debug)]
struct TokenCollector {
    tokens: WatchedTokens,
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        type Read = fn(&Counters) -> Vec<(&'static str, u64)>;
        let families: [(&str, &str, &str, Read); 3] = [
            (
                "token_mints",
                "GitLab tokens minted for sessions, by outcome (refresh: replaced a running-out token)",
                "outcome",
                |c| {
                    let minted = c.mints.load(Relaxed);
                    let refreshed = c.refreshes.load(Relaxed);
                    let failed = c.mint_failures.iter().map(|e| e.value().load(Relaxed)).sum();
                    vec![
                        ("first", minted.saturating_sub(refreshed)),
                        ("refresh", refreshed),
                        ("failed", failed),
                    ]
                },
            ),
            (
                "token_cache_lookups",
                "Token cache lookups, by result (hit, miss, joined another request's mint, \
                 failure remembered, scope refused: a scope the token service refused the \
                 session, answered without a mint or a registry request)",
                "result",
                |c| {
                    vec![
                        ("hit", c.hits.load(Relaxed)),
                        ("miss", c.misses.load(Relaxed)),
                        ("joined", c.joins.load(Relaxed)),
                        ("failure_remembered", c.negative_hits.load(Relaxed)),
                        ("scope_refused", c.scope_refusals.load(Relaxed)),
                    ]
                },
            ),
            (
                "token_background_refreshes",
                "Background re-mints started ahead of a token's expiry",
                "kind",
                |c| vec![("ahead", c.background.load(Relaxed))],
            ),
        ];
        let mut bytes = encoder.encode_descriptor(
            "session_cache",
            "Memory held by cached sessions (opened) and their upstream tokens (tokens), \
             bounded by --session-cache-max-bytes",
            Some(&Unit::Bytes),
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (upstream, counters) in self.tokens.get().into_iter().flatten() {
            for (cache, n) in [
                ("tokens", counters.token_bytes.load(Relaxed)),
                ("opened", counters.opened_bytes.load(Relaxed)),
            ] {
                let labels = [("upstream", upstream.as_str()), ("cache", cache)];
                let encoder = bytes.encode_family(&labels)?;
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(encoder)?;
            }
        }
        for (name, help, key, read) in families {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (upstream, counters) in self.tokens.get().into_iter().flatten() {
                for (value, n) in read(counters) {
                    let labels = [("upstream", upstream.as_str()), (key, value)];
                    let encoder = family.encode_family(&labels)?;
                    ConstCounter::new(n).encode(encoder)?;
                }
            }
        }
        Ok(())
    }
}

/// The admin listener's answer ([`crate::server::admin`]): the exposition for `GET /metrics`
/// (and `HEAD`), 404 for anything else.
pub fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<ProxyBody> {
    let ok = req.uri().path() == "/metrics" && matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, text) = if ok {
        (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_owned(),
        )
    };
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// Binds the metrics listener (before serving, so a bad address fails the start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_per_instance_and_labels_past_the_threads_cache() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let count = |m: &Metrics, route, status| {
            let labels = RequestLabels {
                route,
                method: "GET",
                status,
            };
            m.requests.get_or_create(&labels).get()
        };
        for _ in 0..3 {
            a.request("manifest", &Method::GET, 200, 0.001, 0, 2);
        }
        b.request("manifest", &Method::GET, 200, 0.001, 0, 2);
        // More label sets than the thread keeps: the ones past it count through the family.
        for status in 100..(100 + 2 * REQUEST_COUNTERS_MAX as u16) {
            a.request("blob", &Method::GET, status, 0.001, 0, 0);
            a.request("blob", &Method::GET, status, 0.001, 0, 0);
        }
        assert_eq!(count(&a, "manifest", 200), 3);
        assert_eq!(count(&b, "manifest", 200), 1);
        assert_eq!(count(&a, "blob", 100), 2);
        assert_eq!(
            count(&a, "blob", 100 + 2 * REQUEST_COUNTERS_MAX as u16 - 1),
            2
        );
        assert!(a
            .encode()
            .contains(r#"regrelay_requests_total{route="manifest",method="GET",status="200"} 3"#));
    }

    #[test]
    fn method_labels_are_a_fixed_set() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }

    #[test]
    fn exposition_names_follow_conventions_and_carry_token_counters() {
        let counters = Arc::new(Counters::default());
        counters
            .hits
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let m = Metrics::new();
        m.watch_tokens(vec![("default".into(), counters)]);
        m.request("blob", &Method::GET, 200, 0.5, 0, 10);
        let text = m.encode();
        for needle in [
            "regrelay_requests_total{route=\"blob\",method=\"GET\",status=\"200\"} 1",
            "regrelay_client_sent_bytes_total 10",
            "regrelay_token_cache_lookups_total{upstream=\"default\",result=\"hit\"} 3",
            "regrelay_request_duration_seconds_bucket{le=",
            "regrelay_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }
}
