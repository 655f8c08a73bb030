//! An in-process GitLab for tests: its container registry token service (`GET /jwt/auth`), a
//! group's Dependency Proxy, and the one REST call `regrelay doctor` makes. It answers as GitLab's
//! source does, row by row of shared/reference/gitlab-behaviour.md; each room names the GitLab
//! files it mirrors:
//! - [`jwt`]: `JwtController`, `Gitlab::Auth.find_for_git_client` and
//!   `Auth::ContainerRegistryAuthenticationService` (methods, query, Basic only, anonymous callers,
//!   refused scopes left out, claims with a nested `user` JWT, `delete`/`*`/catalog rules, PAT
//!   scopes, deploy and CI job tokens, the job token allowlist, EE maintenance mode and
//!   immutable tags).
//! - [`limits`]: who the client is (`request.ip` behind `trusted_proxies`), the failed-login IP
//!   ban (`Gitlab::Auth::IpRateLimiter`), Devise's account lockout, Rack::Attack's 429.
//! - [`dp`]: the Dependency Proxy (`/v2/<group>/dependency_proxy/containers/…`) and its tokens
//!   (`service=dependency_proxy`), proxied from a real backing registry playing Docker Hub.
//! - [`api`]: `GET /api/v4/projects/:id`.
//! - [`builder`]: GitLab's settings and the facts of a test (projects, members, credentials),
//!   and starting the server.
//! - [`keys`]: the signing key the test registry trusts, JWT signing, small encodings.
//!
//! GitLab's defaults are the stand-in's defaults; what GitLab makes opt-in is opt-in on
//! [`GitLabBuilder`] (the IP ban, maintenance mode, immutable tag rules, a disabled registry…).
//! Faults can be injected while it runs ([`GitLab::fail_with`], [`GitLab::delay`],
//! [`GitLab::stop`]). It does not model GitLab's web UI, its other APIs, LDAP, OAuth, or caching
//! in the Dependency Proxy. Test and demo support only: not part of the regrelay binary.

mod api;
mod builder;
mod dp;
mod jwt;
mod keys;
mod limits;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use ipnet::IpNet;
use ring::signature::RsaKeyPair;

// Each test binary uses a part of the stand-in's surface.
#[allow(unused_imports)]
pub use builder::{gitlab, with_developer_pat, GitLabBuilder};
#[allow(unused_imports)]
pub use jwt::{error_body, BASIC_DENIED};
#[allow(unused_imports)]
pub use keys::{http_date, libtrust_kid, parse_query, signing_cert_path, signing_key_path};
#[allow(unused_imports)]
pub use limits::BANNED_MESSAGE;

/// The issuer the test registry is configured to trust.
pub const ISSUER: &str = "gitlab-issuer";
/// GitLab's registry service name (`Auth::ContainerRegistryAuthenticationService::AUDIENCE`).
pub const SERVICE: &str = "container_registry";
/// GitLab's Dependency Proxy service name (`Auth::DependencyProxyAuthenticationService::AUDIENCE`):
/// the `service` of its challenge and token requests.
pub const DP_SERVICE: &str = "dependency_proxy";
/// Leeway the Dependency Proxy allows on a token's `exp` and `nbf` (`JSONWebToken::HMACToken::LEEWAY`).
pub const DP_LEEWAY_SECS: u64 = 60;
/// The username of CI job token logins (`Gitlab::Auth::CI_JOB_USER`).
pub const CI_JOB_USER: &str = "gitlab-ci-token";

/// A response body of the stand-in: small answers in full, Dependency Proxy content streamed.
type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A member's role (`Gitlab::Access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Sees a group (and may use its Dependency Proxy); pulls only from public projects.
    Guest,
    /// Pull.
    Reporter,
    /// Pull and push.
    Developer,
    /// Pull, push and delete (`admin_container_image`).
    Maintainer,
}

/// Access token scopes that matter to the registry (`Gitlab::Auth#abilities_for_scopes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// `read_registry`: pull.
    ReadRegistry,
    /// `write_registry`: push.
    WriteRegistry,
    /// `api`: every registry ability, `delete` and `*` included (for Maintainers).
    Api,
    /// `read_api`: the read-only abilities, which include pulling images.
    ReadApi,
    /// `read_user`: no registry ability at all.
    ReadUser,
}

/// A credential GitLab knows.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Personal/project/group access token: any username works; acts as `user`.
    Pat {
        user: String,
        token: String,
        scopes: Vec<TokenScope>,
    },
    /// Deploy token: the username must match. `project` is the project or the group it belongs
    /// to: a group deploy token applies to every project of the group and its subgroups (a path
    /// that is no configured project is a group).
    Deploy {
        username: String,
        token: String,
        scopes: Vec<TokenScope>,
        project: String,
    },
    /// CI job token: username `gitlab-ci-token`; the job runs in `project` as `user`.
    Job {
        token: String,
        project: String,
        user: String,
    },
    /// Username + password; refused when 2FA is on.
    Password {
        user: String,
        password: String,
        two_factor: bool,
    },
}

/// A GitLab project: images live at `path` and up to two levels below it.
#[derive(Debug, Clone)]
pub struct Project {
    /// e.g. `group/project`.
    pub path: String,
    /// Public projects allow anonymous pull.
    pub public: bool,
    /// user → role.
    pub members: HashMap<String, Role>,
}

/// What the service saw of one `/jwt/auth` request (for assertions). Dependency Proxy token
/// requests (`service=dependency_proxy`) are recorded here too; Dependency Proxy registry
/// requests (`/v2/…`) are in [`GitLab::dp_requests`].
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// `Authorization` scheme, if a header arrived.
    pub auth_scheme: Option<String>,
    /// Basic username, if any.
    pub username: Option<String>,
    /// Answered status.
    pub status: u16,
    /// `X-Forwarded-For`, if any.
    pub forwarded_for: Option<String>,
    /// The client's address as GitLab computes `request.ip` (see [`GitLabBuilder::trusted_proxies`]).
    pub client_ip: String,
    /// The TCP peer.
    pub peer: IpAddr,
    /// The raw `Authorization` header (test memory only, for byte-for-byte checks).
    pub authorization: Option<Vec<u8>>,
    /// The raw query string.
    pub query: String,
}

/// What the Dependency Proxy saw of one registry request (`/v2/…`), for assertions.
#[derive(Debug, Clone)]
pub struct DpRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// For whom the stand-in minted the request's DP token (`user:<name>`, `deploy:<username>`,
    /// `job:<project>:<user>`), when it carried a valid one. GitLab's token itself names the job's
    /// user only; the stand-in remembers the rest for assertions.
    pub identity: Option<String>,
    /// Answered status.
    pub status: u16,
    /// The raw `Authorization` header (test memory only).
    pub authorization: Option<Vec<u8>>,
}

/// A group's Dependency Proxy, as configured.
#[derive(Debug, Clone)]
struct DpGroup {
    /// e.g. `my-group`.
    path: String,
    /// user → role in the (private) group.
    members: HashMap<String, Role>,
    /// The registry it pulls from (plays Docker Hub).
    backing: SocketAddr,
}

/// `gitlab.yml`'s `rack_attack.git_basic_auth` (config/initializers/1_settings.rb).
#[derive(Debug, Clone, Copy)]
struct BanConfig {
    maxretry: u32,
    findtime: u64,
    bantime: u64,
}

/// GitLab's rules beyond credentials and members (see [`GitLabBuilder`]'s setters).
#[derive(Debug, Clone)]
struct Rules {
    /// Seconds added to the real clock: the stand-in's own time (`Date`, `iat`, `exp`, expiry).
    clock_offset: i64,
    /// secret → Unix time (stand-in clock) from which the token is expired.
    expiries: HashMap<String, u64>,
    /// project → projects and groups on its CI/CD job token allowlist, besides itself.
    allowlists: HashMap<String, Vec<String>>,
    /// Projects with "Limit access to this project" turned off (job tokens of any project).
    job_token_scope_off: Vec<String>,
    /// The container registry is off instance-wide.
    registry_disabled: bool,
    /// Projects whose container registry is disabled.
    registry_disabled_projects: Vec<String>,
    /// project → protected tag rules: (tag name pattern, minimum role to push or delete).
    protected_tags: HashMap<String, Vec<(String, Role)>>,
    /// project → immutable tag patterns (EE, licensed).
    immutable_tags: HashMap<String, Vec<String>>,
    /// Instance administrators.
    admins: Vec<String>,
    /// Blocked users.
    blocked: Vec<String>,
    /// The failed-login IP ban, when enabled.
    ip_ban: Option<BanConfig>,
    /// `rack_attack.git_basic_auth.ip_whitelist`: never banned.
    ip_whitelist: Vec<IpNet>,
    /// `trusted_proxies`: peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpNet>,
}

struct State {
    key: RsaKeyPair,
    kid: String,
    /// The Dependency Proxy's HMAC secret (GitLab derives it from `db_key_base`).
    dp_secret: Mutex<Vec<u8>>,
    rules: Rules,
    lifetime: Duration,
    credentials: Mutex<Vec<Credential>>,
    projects: Vec<Project>,
    /// Every user name the instance knows, in id order (`id` = index + 1).
    users: Vec<String>,
    maintenance: AtomicBool,
    mints: AtomicUsize,
    addr: SocketAddr,
    dp: Vec<DpGroup>,
    dp_mints: AtomicUsize,
    dp_requests: Mutex<Vec<DpRequest>>,
    /// DP token `jti` → for whom it was minted (for [`DpRequest::identity`]).
    dp_holders: Mutex<HashMap<String, String>>,
    backing_client: Client<HttpConnector, Empty<Bytes>>,
    seen: Mutex<Vec<Seen>>,
    issued: Mutex<Vec<String>>,
    attempts: AtomicUsize,
    bans: Mutex<limits::Bans>,
    lockout: Mutex<limits::Lockout>,
    fault: Mutex<Option<Fault>>,
    delay: Mutex<Duration>,
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// An injected failure: every answer becomes this.
#[derive(Debug, Clone)]
struct Fault {
    status: StatusCode,
    retry_after: Option<u64>,
    message: String,
}

/// A running GitLab on 127.0.0.1:0; stops when dropped.
pub struct GitLab {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    tls: bool,
    /// The SNI names of its TLS handshakes.
    names: Arc<Mutex<Vec<String>>>,
}

impl Drop for GitLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitLab {
    /// `http://127.0.0.1:PORT/jwt/auth`; over TLS `https://localhost:PORT/jwt/auth`.
    pub fn realm(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}/jwt/auth", self.addr.port()),
            false => format!("http://{}/jwt/auth", self.addr),
        }
    }

    /// The server names (SNI) its TLS handshakes asked for ("" for none), in order.
    pub fn tls_names(&self) -> Vec<String> {
        self.names.lock().unwrap().clone()
    }
    /// Registry tokens minted so far.
    pub fn mints(&self) -> usize {
        self.state.mints.load(Ordering::SeqCst)
    }
    /// Requests received so far, whatever their answer (failed and faulted ones included);
    /// counted on arrival, before any [`GitLab::delay`].
    pub fn attempts(&self) -> usize {
        self.state.attempts.load(Ordering::SeqCst)
    }
    /// From now on every request is answered `status` before any routing or authentication.
    /// `429` is Rack::Attack's throttle answer (lib/gitlab/rack_attack.rb): `text/plain`,
    /// `message` and a newline as the body (GitLab's default `rate_limiting_response_text` is
    /// "Retry later"), `Retry-After` (`retry_after`, else the seconds left in the hour's window)
    /// and the `RateLimit-*` headers. Any other status stands for a front in trouble (nginx,
    /// Workhorse, a load balancer) and carries a registry-format body ([`error_body`]) and
    /// `Retry-After` when given. Nothing is minted meanwhile.
    pub fn fail_with(&self, status: u16, retry_after: Option<u64>, message: &str) {
        *self.state.fault.lock().unwrap() = Some(Fault {
            status: StatusCode::from_u16(status).expect("an HTTP status"),
            retry_after,
            message: message.into(),
        });
    }
    /// Ends [`GitLab::fail_with`]: requests are answered normally again.
    pub fn heal(&self) {
        *self.state.fault.lock().unwrap() = None;
    }
    /// Every request from now on waits `d` before it is answered (`Duration::ZERO`: no delay).
    pub fn delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }
    /// Stops listening and closes every open connection (kept-alive ones included): the address
    /// then refuses connections, as a GitLab that is down does.
    pub fn stop(&self) {
        self.task.abort();
        for conn in self.state.connections.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
    /// Every token issued so far, registry and Dependency Proxy tokens and the nested `user`
    /// JWTs (for secret greps).
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
    /// Revokes every credential whose secret is `secret` (as an admin revoking a token does).
    pub fn revoke(&self, secret: &str) {
        self.state.credentials.lock().unwrap().retain(|c| match c {
            Credential::Pat { token, .. }
            | Credential::Deploy { token, .. }
            | Credential::Job { token, .. } => token != secret,
            Credential::Password { password, .. } => password != secret,
        });
    }
    /// Turns EE maintenance mode on or off while running (see [`GitLabBuilder::maintenance_mode`]).
    pub fn set_maintenance_mode(&self, on: bool) {
        self.state.maintenance.store(on, Ordering::SeqCst);
    }
    /// `/jwt/auth` requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    /// Client IPs the failed-login ban holds now.
    pub fn banned_ips(&self) -> Vec<String> {
        limits::banned_ips(&self.state)
    }
    /// Failed Basic logins counted against `ip` so far (all windows; whitelisted IPs and
    /// `gitlab-ci-token` logins are never counted, and nothing is counted while the ban is off).
    pub fn ip_failures(&self, ip: &str) -> u32 {
        limits::ip_failures(&self.state, ip)
    }
    /// A sign-in on GitLab's web form (`POST /users/sign_in`), which Devise's lockable counts:
    /// the 10th wrong password in a row locks the account for 10 minutes. True when signed in.
    /// (Wrong passwords at `/jwt/auth` are not counted: `find_for_git_client` does not increment
    /// `failed_attempts`.)
    pub fn web_sign_in(&self, user: &str, password: &str) -> bool {
        limits::web_sign_in(&self.state, user, password)
    }
    /// Devise's `failed_attempts` of `user`.
    pub fn failed_attempts(&self, user: &str) -> u32 {
        limits::failed_attempts(&self.state, user)
    }
    /// True while `user`'s account is locked.
    pub fn locked(&self, user: &str) -> bool {
        limits::locked(&self.state, user)
    }
    /// `user`'s id, as tokens name it.
    pub fn user_id(&self, user: &str) -> Option<u64> {
        self.state.user_id(user)
    }
    /// Replaces the secret the Dependency Proxy signs and checks its tokens with: every DP
    /// token issued so far is refused from now on (its 401, with no `error=`), as after GitLab
    /// changes its secrets.
    pub fn rotate_dp_secret(&self) {
        *self.state.dp_secret.lock().unwrap() = keys::random_bytes::<32>().to_vec();
    }
    /// Dependency Proxy tokens minted so far (`/jwt/auth?service=dependency_proxy`); not counted
    /// in [`GitLab::mints`]. The registry tokens the proxy mints itself for its backing pulls are
    /// counted nowhere and never leave it.
    pub fn dp_mints(&self) -> usize {
        self.state.dp_mints.load(Ordering::SeqCst)
    }
    /// Dependency Proxy registry requests (`/v2/…`) seen so far.
    pub fn dp_requests(&self) -> Vec<DpRequest> {
        self.state.dp_requests.lock().unwrap().clone()
    }
    /// `<stand-in>/<group>/dependency_proxy/containers`: GitLab's
    /// `CI_DEPENDENCY_PROXY_DIRECT_GROUP_IMAGE_PREFIX` (image references start with it).
    pub fn dp_image_prefix(&self, group: &str) -> String {
        format!("{}/{group}/dependency_proxy/containers", self.addr)
    }
    /// Signs `claims` with the stand-in's registry key, as its registry tokens are signed (for
    /// negative tests: expired, other-audience or otherwise crafted tokens). Not recorded.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        keys::sign_rs256(&self.state, claims)
    }
    /// Signs `claims` as the Dependency Proxy signs its tokens (HS256 with its secret). Not
    /// recorded.
    pub fn sign_dp(&self, claims: &serde_json::Value) -> String {
        keys::sign_hs256(&self.state.dp_secret.lock().unwrap(), claims)
    }
}

/// A CI job as GitLab runs it: its `CI_JOB_TOKEN` is a [`Credential::Job`] (add
/// [`CiJob::credential`] to the builder), and GitLab sets `CI_DEPENDENCY_PROXY_USER` to
/// `gitlab-ci-token` and `CI_DEPENDENCY_PROXY_PASSWORD` to the job token. The Dependency Proxy
/// accepts them when the job's user is a member of the group.
#[derive(Debug, Clone)]
pub struct CiJob {
    /// `CI_JOB_TOKEN`.
    pub token: String,
    /// The job's project, e.g. `my-group/app`.
    pub project: String,
    /// The user who runs the job.
    pub user: String,
}

impl CiJob {
    /// A job of `project` run by `user`, with job token `token`.
    pub fn new(token: &str, project: &str, user: &str) -> CiJob {
        CiJob {
            token: token.into(),
            project: project.into(),
            user: user.into(),
        }
    }
    /// The job token as GitLab knows it.
    pub fn credential(&self) -> Credential {
        Credential::Job {
            token: self.token.clone(),
            project: self.project.clone(),
            user: self.user.clone(),
        }
    }
    /// `CI_DEPENDENCY_PROXY_USER`.
    pub fn dependency_proxy_user(&self) -> &'static str {
        CI_JOB_USER
    }
    /// `CI_DEPENDENCY_PROXY_PASSWORD`.
    pub fn dependency_proxy_password(&self) -> &str {
        &self.token
    }
    /// `CI_DEPENDENCY_PROXY_USER:CI_DEPENDENCY_PROXY_PASSWORD`, as `skopeo --creds` and
    /// `docker login -u … --password-stdin` take them.
    pub fn dependency_proxy_creds(&self) -> String {
        format!(
            "{}:{}",
            self.dependency_proxy_user(),
            self.dependency_proxy_password()
        )
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl State {
    /// Unix seconds on the stand-in's clock (real time + [`GitLabBuilder::clock_offset`]).
    fn now(&self) -> u64 {
        unix_now().saturating_add_signed(self.rules.clock_offset)
    }

    /// True when `secret` has an expiry that has passed on the stand-in's clock.
    fn expired(&self, secret: &str) -> bool {
        self.rules
            .expiries
            .get(secret)
            .is_some_and(|at| self.now() >= *at)
    }

    /// A user's id (position in the sorted user list, from 1).
    fn user_id(&self, name: &str) -> Option<u64> {
        let i = self.users.iter().position(|u| u == name)?;
        Some(i as u64 + 1)
    }

    /// A project's id (position in the builder, from 1).
    fn project_id(&self, path: &str) -> Option<u64> {
        let i = self.projects.iter().position(|p| p.path == path)?;
        Some(i as u64 + 1)
    }

    /// The id of a root namespace (its position among the sorted root namespaces, from 1001).
    fn namespace_id(&self, root: &str) -> u64 {
        let roots: BTreeSet<&str> = self
            .projects
            .iter()
            .filter_map(|p| p.path.split('/').next())
            .collect();
        roots.iter().position(|r| *r == root).unwrap_or(roots.len()) as u64 + 1001
    }

    fn is_admin(&self, user: &str) -> bool {
        self.rules.admins.iter().any(|a| a == user)
    }

    /// A user may log in (`can_log_in_with_non_expired_password?`): neither blocked nor locked.
    fn can_log_in(&self, user: &str) -> bool {
        !self.rules.blocked.iter().any(|b| b == user) && !limits::locked(self, user)
    }

    /// A configured project, by its full path (case-insensitive, as GitLab routes are).
    fn project(&self, path: &str) -> Option<&Project> {
        self.projects
            .iter()
            .find(|p| p.path.eq_ignore_ascii_case(path))
    }

    /// True when `path` is a group (no configured project has it).
    fn is_group(&self, path: &str) -> bool {
        self.project(path).is_none()
    }
}

/// True when `inner` is `outer` or lies below it (`group/sub/project` is in `group`).
fn within(inner: &str, outer: &str) -> bool {
    match inner.get(..outer.len()) {
        Some(head) if head.eq_ignore_ascii_case(outer) => {
            inner.len() == outer.len() || inner.as_bytes()[outer.len()] == b'/'
        }
        _ => false,
    }
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Rails' `render plain:` (`text/plain; charset=utf-8`).
fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A small answer as a [`Body`].
fn boxed(resp: Response<Full<Bytes>>) -> Response<Body> {
    resp.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// Routes a request: Rack::Attack (an injected fault) first, then `/v2/…` to the Dependency
/// Proxy, `/api/v4/…` to the API, and everything else to `/jwt/auth`'s controller.
async fn handle(st: &State, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    st.attempts.fetch_add(1, Ordering::SeqCst);
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path();
    let mut resp = if !st.dp.is_empty() && (path == "/v2" || path.starts_with("/v2/")) {
        dp::handle(st, req).await
    } else if path.starts_with("/api/v4/") {
        boxed(api::handle(st, &req))
    } else {
        boxed(jwt::handle(st, &req, peer))
    };
    // GitLab's own clock, shifted with it (hyper keeps a Date header that is already set).
    resp.headers_mut().insert(
        header::DATE,
        HeaderValue::from_str(&http_date(st.now())).expect("an HTTP date"),
    );
    resp
}
