//! A token service that behaves like GitLab's `/jwt/auth` (see shared/reference/registry-auth.md):
//! GET only (POST → empty 404), `service=container_registry` only, HTTP Basic only, repeated and
//! space-separated `scope`s, `{"token":…}` and nothing else, RS256 JWTs with a libtrust `kid` that
//! Debian's registry trusts through `rootcertbundle`, silent dropping of actions the credential may
//! not have, PAT / deploy token / CI job token / password rules, and a configurable lifetime.
//! Faults can be injected while it runs: every answer a given error status ([`GitLab::fail_with`],
//! as GitLab's rate limiter or a maintenance window answers before any routing), a delay before
//! every answer ([`GitLab::delay`]), or no service at all ([`GitLab::stop`]).
//!
//! Optionally ([`GitLabBuilder::dependency_proxy`]) it is also a group's **Dependency Proxy**, on
//! its own address as GitLab serves it: `/v2/<group>/dependency_proxy/containers/<image>/…`
//! (manifests and blobs, GET and HEAD), proxied from a real backing registry (playing Docker Hub)
//! that the stand-in pulls from as itself, with registry tokens it mints for itself. Its
//! challenge names `/jwt/auth` with `service="dependency_proxy"`; `/jwt/auth` then mints DP
//! tokens (never for anonymous callers: 403), which only the stand-in verifies (`exp` with 1 s
//! leeway, signature, audience) and honours for group members only (403 otherwise). See
//! [`GitLabBuilder::dependency_proxy`] for the rules and [`CiJob`] for CI credentials.
//!
//! GitLab's finer rules, each opt-in on the builder: token expiry ([`GitLabBuilder::expires`]:
//! an expired token is a 401 like a wrong one), a project's CI/CD job token allowlist
//! ([`GitLabBuilder::job_token_allowlist`]), the registry disabled instance-wide (404
//! "registry not enabled", [`GitLabBuilder::registry_disabled`]) or for one project (its actions
//! dropped, [`GitLabBuilder::project_registry_disabled`]), protected container tags (the
//! `meta.tag_deny_access_patterns` claim, [`GitLabBuilder::protected_tag`]), a clock that is off
//! ([`GitLabBuilder::clock_offset`]: its `Date` header and token times), and the REST API's
//! `GET /api/v4/projects/:id` (for tokens with `api`/`read_api`). Every token names its
//! `auth_type` and, per access entry, `meta.project_path`, as GitLab's do.
//! Test and demo support only: it is not part of the regrelay binary.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{
    KeyPair, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use sha2::{Digest, Sha256};

/// The issuer the test registry is configured to trust.
pub const ISSUER: &str = "gitlab-issuer";
/// GitLab's registry service name.
pub const SERVICE: &str = "container_registry";
/// GitLab's Dependency Proxy service name (the `service` of its challenge and token requests,
/// and the `aud` of its tokens).
pub const DP_SERVICE: &str = "dependency_proxy";
/// Leeway the Dependency Proxy allows on a token's `exp` and `nbf`: deliberately strict (GitLab's
/// own JWT check may allow more), so a client that uses a token past its life is caught; one
/// second absorbs the whole-second claims.
pub const DP_LEEWAY_SECS: u64 = 1;
/// Lifetime of the registry tokens the Dependency Proxy mints for itself (backing pulls).
const BACKING_TOKEN_SECS: u64 = 60;

/// A response body of the stand-in: small answers in full, Dependency Proxy content streamed.
type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A project member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Pull.
    Reporter,
    /// Pull and push.
    Developer,
    /// Pull, push and delete.
    Maintainer,
}

/// Token scopes of GitLab access tokens that matter to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// `read_registry`.
    ReadRegistry,
    /// `write_registry`.
    WriteRegistry,
    /// `api` (implies both).
    Api,
    /// `read_api` (no registry ability).
    ReadApi,
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
    /// Deploy token: the username must match; bound to one project.
    Deploy {
        username: String,
        token: String,
        scopes: Vec<TokenScope>,
        project: String,
    },
    /// CI job token: username `gitlab-ci-token`; push only to its own project.
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

/// A GitLab project: images live at `path` and below.
#[derive(Debug, Clone)]
pub struct Project {
    /// e.g. `group/project`.
    pub path: String,
    /// Public projects allow anonymous pull.
    pub public: bool,
    /// user → role.
    pub members: HashMap<String, Role>,
}

/// What the service saw of one token request (for assertions). Dependency Proxy token requests
/// (`service=dependency_proxy`) are recorded here too; Dependency Proxy registry requests
/// (`/v2/…`) are in [`GitLab::dp_requests`].
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
    /// The raw `Authorization` header (test memory only, for byte-for-byte checks).
    pub authorization: Option<Vec<u8>>,
    /// The raw query string.
    pub query: String,
}

/// A group's Dependency Proxy, as configured.
#[derive(Debug, Clone)]
struct DpGroup {
    /// e.g. `my-group`.
    path: String,
    /// user → role (the group is private: only members, and the group's deploy tokens and CI
    /// jobs, may use its Dependency Proxy).
    members: HashMap<String, Role>,
    /// The registry it pulls from (plays Docker Hub).
    backing: SocketAddr,
}

/// What the Dependency Proxy saw of one registry request (`/v2/…`), for assertions.
#[derive(Debug, Clone)]
pub struct DpRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Who the request's DP token names (`user:<name>`, `deploy:<username>`,
    /// `job:<project>:<user>`), when it carried a valid one.
    pub identity: Option<String>,
    /// Answered status.
    pub status: u16,
    /// The raw `Authorization` header (test memory only).
    pub authorization: Option<Vec<u8>>,
}

/// GitLab's rules beyond credentials and members (see [`GitLabBuilder`]'s setters).
#[derive(Debug, Clone, Default)]
struct Rules {
    /// Seconds added to the real clock: the stand-in's own time (`Date`, `iat`, `exp`, expiry).
    clock_offset: i64,
    /// secret → Unix time (stand-in clock) from which the token is expired.
    expiries: HashMap<String, u64>,
    /// project → the projects whose CI job tokens may pull from it ("Limit access to this
    /// project" on); a project absent here lets job tokens pull by their user's membership.
    allowlists: HashMap<String, Vec<String>>,
    /// The container registry is off instance-wide: every registry token request is a 404.
    registry_disabled: bool,
    /// Projects whose container registry is disabled: every action on them is dropped.
    registry_disabled_projects: Vec<String>,
    /// project → protected tag rules: (tag name pattern, minimum role allowed to push).
    protected_tags: HashMap<String, Vec<(String, Role)>>,
}

struct State {
    key: RsaKeyPair,
    rules: Rules,
    kid: String,
    lifetime: Duration,
    credentials: Mutex<Vec<Credential>>,
    projects: Vec<Project>,
    mints: AtomicUsize,
    addr: SocketAddr,
    dp: Vec<DpGroup>,
    dp_mints: AtomicUsize,
    dp_requests: Mutex<Vec<DpRequest>>,
    backing_client: Client<HttpConnector, Empty<Bytes>>,
    seen: Mutex<Vec<Seen>>,
    issued: Mutex<Vec<String>>,
    attempts: AtomicUsize,
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

/// Builder for the service.
pub struct GitLabBuilder {
    lifetime: Duration,
    credentials: Vec<Credential>,
    projects: Vec<Project>,
    dp: Vec<DpGroup>,
    rules: Rules,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// A running token service on 127.0.0.1:0; stops when dropped.
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

/// Starts configuring a token service.
pub fn gitlab() -> GitLabBuilder {
    GitLabBuilder {
        lifetime: Duration::from_secs(300),
        credentials: vec![],
        projects: vec![],
        dp: vec![],
        rules: Rules::default(),
        tls: None,
    }
}

/// A running service with one read/write access token `pat` of `user`, a Developer of the private
/// project `project`, issuing tokens that live `lifetime`.
pub async fn with_developer_pat(
    user: &str,
    pat: &str,
    project: &str,
    lifetime: Duration,
) -> GitLab {
    gitlab()
        .credential(Credential::Pat {
            user: user.into(),
            token: pat.into(),
            scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
        })
        .project(project, false, &[(user, Role::Developer)])
        .lifetime(lifetime)
        .start()
        .await
}

impl GitLabBuilder {
    /// Token lifetime (GitLab self-managed default: 5 minutes).
    pub fn lifetime(mut self, d: Duration) -> Self {
        self.lifetime = d;
        self
    }
    /// Adds a credential.
    pub fn credential(mut self, c: Credential) -> Self {
        self.credentials.push(c);
        self
    }
    /// Adds a project with members.
    pub fn project(mut self, path: &str, public: bool, members: &[(&str, Role)]) -> Self {
        self.projects.push(Project {
            path: path.into(),
            public,
            members: members.iter().map(|(u, r)| (u.to_string(), *r)).collect(),
        });
        self
    }

    /// The token (PAT, deploy or job token) or password `secret` expires at `at` (on the
    /// stand-in's clock, see [`GitLabBuilder::clock_offset`]): from then on it is refused with
    /// GitLab's 401, exactly as a wrong one (GitLab's message says "incorrect, expired, or
    /// improperly scoped" and nothing more).
    pub fn expires(mut self, secret: &str, at: SystemTime) -> Self {
        let unix = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.rules.expiries.insert(secret.into(), unix);
        self
    }

    /// Turns on "Limit access to this project" for `project` (Settings → CI/CD → Job token
    /// permissions) with `allowed` as its CI/CD job token allowlist: a CI job token of another
    /// project may pull from `project` only when its project is listed (and its user may read
    /// `project`). A job token never pushes to another project, listed or not. Without this
    /// call a project lets other projects' job tokens pull by their user's membership.
    pub fn job_token_allowlist(mut self, project: &str, allowed: &[&str]) -> Self {
        self.rules.allowlists.insert(
            project.into(),
            allowed.iter().map(|p| p.to_string()).collect(),
        );
        self
    }

    /// The container registry is not enabled on this instance: every registry token request
    /// (`service=container_registry`) is answered 404 `UNAVAILABLE` "registry not enabled",
    /// GitLab's first check.
    pub fn registry_disabled(mut self) -> Self {
        self.rules.registry_disabled = true;
        self
    }

    /// `project`'s Container Registry is disabled (Settings → General → Visibility): GitLab then
    /// grants no action on it to anyone (dropped silently, like any refused action), and its
    /// API shows `container_registry_access_level: "disabled"`.
    pub fn project_registry_disabled(mut self, project: &str) -> Self {
        self.rules.registry_disabled_projects.push(project.into());
        self
    }

    /// A protected container tag rule on `project` (Settings → Packages and registries):
    /// tags matching `pattern` (an RE2 regex) may be pushed only by `push_min` and above. The
    /// push itself is still granted; a user (or a CI job's user) below `push_min` gets the
    /// pattern in `meta.tag_deny_access_patterns.push` of the access entry, as GitLab does
    /// (GitLab's own registry enforces it; Debian's `docker-registry` ignores the claim). Deploy
    /// tokens name no user and get no patterns.
    pub fn protected_tag(mut self, project: &str, pattern: &str, push_min: Role) -> Self {
        self.rules
            .protected_tags
            .entry(project.into())
            .or_default()
            .push((pattern.into(), push_min));
        self
    }

    /// Shifts the stand-in's clock by `secs` (negative: behind): its `Date` header, the `iat`,
    /// `nbf` and `exp` of its tokens, and token expiry all use real time + `secs`, as a GitLab
    /// host whose NTP is broken does.
    pub fn clock_offset(mut self, secs: i64) -> Self {
        self.rules.clock_offset = secs;
        self
    }

    /// Makes the private group `group` a Dependency Proxy on the stand-in's own address, backed
    /// by the registry at `backing`: a real `docker-registry` playing Docker Hub, started before
    /// this stand-in, so with another token service's realm (Docker Hub's own stand-in, which
    /// also seeds it: `Registry::start(&hub_gl.realm())`). Every stand-in signs with the same
    /// key, which that registry trusts, so the DP's own backing tokens work. GitLab's behaviour:
    /// - `GET /v2/`: 401 `Bearer realm="http://<stand-in>/jwt/auth",service="dependency_proxy"`
    ///   without a valid DP token, `200 {}` with one.
    /// - `GET|HEAD /v2/<group>/dependency_proxy/containers/<image>/manifests/<ref>` and
    ///   `…/blobs/<digest>`: no token (or not a Bearer one) → 401 with that challenge plus
    ///   `scope="repository:<group>/dependency_proxy/containers/<image>:pull"`; an expired
    ///   (past `exp` + [`DP_LEEWAY_SECS`]), forged, or other-service token → the same 401 with
    ///   `error="invalid_token"`; an unknown group → 404; a valid token whose holder may not use
    ///   the group → 403 `DENIED` "access forbidden". Otherwise the stand-in GETs (or HEADs)
    ///   `<image>` from `backing` with a registry token it mints itself for
    ///   `repository:<image>:pull`, forwarding `Accept`, and streams the answer back with its
    ///   status, `Content-Type`, `Docker-Content-Digest` and `Content-Length` (a 404 keeps the
    ///   registry's JSON error).
    /// - Who may use the group: a user (PAT, password) in `members` (any role); a group deploy
    ///   token, i.e. a [`Credential::Deploy`] whose `project` is `group`; a CI job
    ///   ([`Credential::Job`], [`CiJob`]) whose project lies in the group (`group/…`) or whose
    ///   user is in `members`.
    /// - Tokens: `/jwt/auth?service=dependency_proxy` (see [`GitLab::dp_mints`]).
    pub fn dependency_proxy(
        mut self,
        group: &str,
        members: &[(&str, Role)],
        backing: SocketAddr,
    ) -> Self {
        self.dp.push(DpGroup {
            path: group.into(),
            members: members.iter().map(|(u, r)| (u.to_string(), *r)).collect(),
            backing,
        });
        self
    }

    /// Serves HTTPS only, with `tls` (see [`super::tls`]); its realm is then by name,
    /// `https://localhost:PORT/jwt/auth`. Handshakes that fail are dropped.
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Binds 127.0.0.1:0 and serves `/jwt/auth` (and the Dependency Proxy, when configured).
    pub async fn start(self) -> GitLab {
        let pem = std::fs::read_to_string(signing_key_path()).expect("read token signing key");
        let der = pem_body(&pem);
        let key = RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key");
        let kid = libtrust_kid(&spki_from_pkcs1(key.public_key().as_ref()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            key,
            rules: self.rules,
            kid,
            lifetime: self.lifetime,
            credentials: Mutex::new(self.credentials),
            projects: self.projects,
            mints: AtomicUsize::new(0),
            addr,
            dp: self.dp,
            dp_mints: AtomicUsize::new(0),
            dp_requests: Mutex::new(vec![]),
            backing_client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            seen: Mutex::new(vec![]),
            issued: Mutex::new(vec![]),
            attempts: AtomicUsize::new(0),
            fault: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            connections: Mutex::new(vec![]),
        });
        let st = state.clone();
        let tls = self.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let names = Arc::new(Mutex::new(vec![]));
        let seen_names = names.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let conns = st.clone();
                let (tls, seen_names) = (tls.clone(), seen_names.clone());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let Some(tls) = tls else {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        return;
                    };
                    let Ok(stream) = tls.accept(stream).await else {
                        return;
                    };
                    let name = stream.get_ref().1.server_name().unwrap_or("").to_owned();
                    seen_names.lock().unwrap().push(name);
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                });
                let mut open = conns.connections.lock().unwrap();
                open.retain(|c| !c.is_finished());
                open.push(conn.abort_handle());
            }
        });
        GitLab {
            addr,
            state,
            task,
            tls: self.tls.is_some(),
            names,
        }
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
    /// Tokens minted so far.
    pub fn mints(&self) -> usize {
        self.state.mints.load(Ordering::SeqCst)
    }
    /// Requests received so far, whatever their answer (failed and faulted ones included);
    /// counted on arrival, before any [`GitLab::delay`].
    pub fn attempts(&self) -> usize {
        self.state.attempts.load(Ordering::SeqCst)
    }
    /// From now on every request is answered `status` with a registry-format body
    /// ([`error_body`]) holding `message`, and `Retry-After: retry_after` when given — as GitLab's
    /// rate limiter (429, "Retry later") or a maintenance window (503) answers, before any
    /// routing or authentication. Nothing is minted meanwhile.
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
    /// Every token issued so far (for secret greps).
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
    /// Token requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
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
    /// Signs `claims` with the stand-in's key, as its tokens are signed (for negative tests:
    /// expired, other-audience or otherwise crafted tokens). Not recorded anywhere.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        sign(&self.state, claims)
    }
}

/// A CI job as GitLab runs it: its `CI_JOB_TOKEN` is a [`Credential::Job`] (add
/// [`CiJob::credential`] to the builder), and GitLab sets `CI_DEPENDENCY_PROXY_USER` to
/// `gitlab-ci-token` and `CI_DEPENDENCY_PROXY_PASSWORD` to the job token. The Dependency Proxy
/// accepts them for the groups the job's project belongs to (see
/// [`GitLabBuilder::dependency_proxy`]).
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
        "gitlab-ci-token"
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

/// Path of the committed test-only signing key.
pub fn signing_key_path() -> String {
    format!("{}/certs/token-signing.key", env!("CARGO_MANIFEST_DIR"))
}

/// Path of the certificate the registry trusts (`rootcertbundle`).
pub fn signing_cert_path() -> String {
    format!("{}/certs/token-signing.pem", env!("CARGO_MANIFEST_DIR"))
}

fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).expect("PEM base64")
}

fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// SubjectPublicKeyInfo DER for an RSA PKCS#1 public key.
fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    let alg = der(
        0x30,
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ],
    );
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    der(0x30, &[alg, der(0x03, &bits)].concat())
}

/// libtrust key id: base32 of the first 30 bytes of SHA-256(SPKI DER), `:` every 4 characters.
pub fn libtrust_kid(spki: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki);
    let mut bits = 0u64;
    let mut nbits = 0;
    let mut b32 = String::new();
    for byte in &hash[..30] {
        bits = (bits << 8) | u64::from(*byte);
        nbits += 8;
        while nbits >= 5 {
            nbits -= 5;
            b32.push(ALPHABET[((bits >> nbits) & 31) as usize] as char);
        }
    }
    let chunks: Vec<String> = b32
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into())
        .collect();
    chunks.join(":")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string into (key, value) pairs, keeping repeats.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

enum Identity {
    Anonymous,
    User {
        name: String,
        read: bool,
        write: bool,
        /// GitLab's `auth_type`: `personal_access_token` or `gitlab_or_ldap` (a password).
        auth_type: &'static str,
    },
    Deploy {
        project: String,
        read: bool,
        write: bool,
    },
    Job {
        project: String,
        user: String,
    },
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(status, error_body(code, message))
}

/// A registry-format error body, as GitLab writes it: `{"errors":[{"code":…,"message":…}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"errors":[{"code":code,"message":message}]}).to_string()
}

/// The registry error code GitLab uses for `status`.
pub fn error_code(status: u16) -> &'static str {
    match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NOT_FOUND",
        429 => "TOOMANYREQUESTS",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

fn fault_response(fault: &Fault) -> Response<Full<Bytes>> {
    let mut r = error(
        fault.status,
        error_code(fault.status.as_u16()),
        &fault.message,
    );
    if let Some(secs) = fault.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
    }
    r
}

/// A small answer as a [`Body`].
fn boxed(resp: Response<Full<Bytes>>) -> Response<Body> {
    resp.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

async fn handle(st: &State, req: Request<Incoming>) -> Response<Body> {
    st.attempts.fetch_add(1, Ordering::SeqCst);
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path();
    let mut resp = if !st.dp.is_empty() && (path == "/v2" || path.starts_with("/v2/")) {
        dp_handle(st, req).await
    } else if path.starts_with("/api/v4/") {
        boxed(api(st, &req))
    } else {
        boxed(handle_token(st, req))
    };
    // GitLab's own clock, shifted with it (hyper keeps a Date header that is already set).
    resp.headers_mut().insert(
        header::DATE,
        HeaderValue::from_str(&http_date(st.now())).expect("an HTTP date"),
    );
    resp
}

/// GitLab's REST API, the one call `regrelay doctor` makes: `GET /api/v4/projects/:id` (`:id`
/// a number or the URL-encoded path) with `PRIVATE-TOKEN: <token>` or `Authorization: Bearer
/// <token>`. Access tokens only ([`Credential::Pat`]); answers as GitLab does: 401 `{"message":
/// "401 Unauthorized"}` for an unknown or expired token, 403 `insufficient_scope` for a token
/// without `api`/`read_api`, 404 `{"message":"404 Project Not Found"}` for a project the user
/// may not see, else the project with its `container_registry_access_level`.
fn api(st: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/api/v4/projects/")
        .map(percent_decode)
        .filter(|id| !id.is_empty());
    let (Some(id), &Method::GET) = (id, req.method()) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "404 Not Found"}).to_string(),
        );
    };
    let headers = req.headers();
    let token = headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, t) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| t.trim().to_owned())
        });
    let unauthorized = || {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"message": "401 Unauthorized"}).to_string(),
        )
    };
    let Some(token) = token else {
        return unauthorized();
    };
    let found = st.credentials.lock().unwrap().iter().find_map(|c| match c {
        Credential::Pat {
            user,
            token: t,
            scopes,
        } if *t == token => Some((user.clone(), scopes.clone())),
        _ => None,
    });
    let Some((user, scopes)) = found.filter(|_| !st.expired(&token)) else {
        return unauthorized();
    };
    if !scopes
        .iter()
        .any(|s| matches!(s, TokenScope::Api | TokenScope::ReadApi))
    {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": "insufficient_scope",
                "error_description": "The request requires higher privileges than provided by the access token.",
                "scope": "api read_api",
            })
            .to_string(),
        );
    }
    let found = st
        .projects
        .iter()
        .enumerate()
        .find(|(i, p)| p.path == id || (i + 1).to_string() == id);
    let Some((i, p)) = found.filter(|(_, p)| p.public || p.members.contains_key(&user)) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"message": "404 Project Not Found"}).to_string(),
        );
    };
    let enabled = !st.rules.registry_disabled_projects.contains(&p.path);
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": i + 1,
            "path_with_namespace": p.path,
            "visibility": if p.public { "public" } else { "private" },
            "container_registry_enabled": enabled,
            "container_registry_access_level": if enabled { "enabled" } else { "disabled" },
        })
        .to_string(),
    )
}

fn handle_token(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let basic = auth.as_deref().and_then(decode_basic);
    let fault = st.fault.lock().unwrap().clone();
    let resp = match fault {
        Some(f) => fault_response(&f),
        None => respond(st, &req, basic.as_ref()),
    };
    st.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        auth_scheme: auth
            .as_deref()
            .map(|a| a.split(' ').next().unwrap_or("").to_owned()),
        username: basic.map(|(u, _)| u),
        status: resp.status().as_u16(),
        forwarded_for: req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec()),
        query: req.uri().query().unwrap_or("").to_owned(),
    });
    resp
}

fn decode_basic(header: &str) -> Option<(String, String)> {
    let (scheme, rest) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = String::from_utf8(STANDARD.decode(rest.trim()).ok()?).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn respond(
    st: &State,
    req: &Request<Incoming>,
    basic: Option<&(String, String)>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/jwt/auth" {
        return empty(StatusCode::NOT_FOUND);
    }
    let params = parse_query(req.uri().query().unwrap_or(""));
    if !st.dp.is_empty()
        && params
            .iter()
            .any(|(k, v)| k == "service" && v == DP_SERVICE)
    {
        return dp_token(st, basic);
    }
    if !params.iter().any(|(k, v)| k == "service" && v == SERVICE) {
        return empty(StatusCode::NOT_FOUND);
    }
    if st.rules.registry_disabled {
        return error(StatusCode::NOT_FOUND, "UNAVAILABLE", "registry not enabled");
    }
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| {
            v.split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let identity = match basic {
        None => Identity::Anonymous,
        Some((user, secret)) => match authenticate(st, user, secret) {
            Some(id) => id,
            None => return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", BASIC_DENIED),
        },
    };
    let auth_type = match &identity {
        Identity::Anonymous => None,
        Identity::User { auth_type, .. } => Some(*auth_type),
        Identity::Deploy { .. } => Some("deploy_token"),
        Identity::Job { .. } => Some("build"),
    };
    let has_ability = match &identity {
        Identity::Anonymous => !scopes.is_empty(),
        Identity::User { read, write, .. } | Identity::Deploy { read, write, .. } => {
            *read || *write
        }
        Identity::Job { .. } => true,
    };
    if !has_ability {
        return error(StatusCode::FORBIDDEN, "DENIED", "access forbidden");
    }
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| grant(st, &identity, s))
        .collect();
    let now = st.now();
    let n = st.mints.fetch_add(1, Ordering::SeqCst);
    let mut claims = serde_json::json!({
        "iss": ISSUER, "aud": SERVICE, "iat": now, "nbf": now - 5,
        "exp": now + st.lifetime.as_secs(), "jti": format!("jti-{now}-{n}"), "access": access,
    });
    match &identity {
        Identity::User { name, .. } | Identity::Job { user: name, .. } => {
            claims["sub"] = name.clone().into()
        }
        Identity::Anonymous | Identity::Deploy { .. } => {}
    }
    if let Some(auth_type) = auth_type {
        claims["auth_type"] = auth_type.into();
    }
    let token = sign(st, &claims);
    st.issued.lock().unwrap().push(token.clone());
    json(
        StatusCode::OK,
        serde_json::json!({ "token": token }).to_string(),
    )
}

/// Who the credentials name, or `None` for GitLab's 401 "HTTP Basic: Access denied".
fn authenticate(st: &State, user: &str, secret: &str) -> Option<Identity> {
    let read_write = |scopes: &[TokenScope]| {
        let api = scopes.contains(&TokenScope::Api);
        (
            api || scopes.contains(&TokenScope::ReadRegistry),
            api || scopes.contains(&TokenScope::WriteRegistry),
        )
    };
    if st.expired(secret) {
        return None;
    }
    for c in st.credentials.lock().unwrap().iter() {
        match c {
            Credential::Pat {
                user: owner,
                token,
                scopes,
            } if token == secret => {
                let (read, write) = read_write(scopes);
                return Some(Identity::User {
                    name: owner.clone(),
                    read,
                    write,
                    auth_type: "personal_access_token",
                });
            }
            Credential::Deploy {
                username,
                token,
                scopes,
                project,
            } if token == secret && username == user => {
                let (read, write) = read_write(scopes);
                return Some(Identity::Deploy {
                    project: project.clone(),
                    read,
                    write,
                });
            }
            Credential::Job {
                token,
                project,
                user: owner,
            } if token == secret && user == "gitlab-ci-token" => {
                return Some(Identity::Job {
                    project: project.clone(),
                    user: owner.clone(),
                });
            }
            Credential::Password {
                user: name,
                password,
                two_factor,
            } if name == user && password == secret => {
                if *two_factor {
                    return None;
                }
                return Some(Identity::User {
                    name: name.clone(),
                    read: true,
                    write: true,
                    auth_type: "gitlab_or_ldap",
                });
            }
            _ => {}
        }
    }
    None
}

/// The access entry for one requested scope, with the actions this identity may have (possibly
/// none: GitLab drops what is not allowed, silently).
fn grant(st: &State, id: &Identity, scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind != "repository" {
        // registry:catalog:* is for admins; there are none here.
        return Some(serde_json::json!({"type": kind, "name": name, "actions": []}));
    }
    let project = st.project_of(name);
    let disabled = project.is_some_and(|p| st.rules.registry_disabled_projects.contains(&p.path));
    let (pull, push, delete) = match (project, id) {
        (None, _) => (false, false, false),
        (Some(_), _) if disabled => (false, false, false),
        (Some(p), Identity::Anonymous) => (p.public, false, false),
        (
            Some(p),
            Identity::User {
                name, read, write, ..
            },
        ) => {
            let role = p.members.get(name).copied();
            let pull = *read && (p.public || role.is_some());
            let push = *write && role >= Some(Role::Developer);
            (pull, push, *write && role >= Some(Role::Maintainer))
        }
        (
            Some(p),
            Identity::Deploy {
                project,
                read,
                write,
            },
        ) => {
            let own = &p.path == project;
            (own && *read, own && *write, false)
        }
        (Some(p), Identity::Job { project, user }) => {
            let own = &p.path == project;
            let listed = st
                .rules
                .allowlists
                .get(&p.path)
                .map_or(true, |allowed| allowed.contains(project));
            let readable = p.public || p.members.contains_key(user);
            (own || (listed && readable), own, false)
        }
    };
    let granted: Vec<&str> = actions
        .split(',')
        .filter(|a| match *a {
            "pull" => pull,
            "push" => push,
            "delete" => delete,
            "*" => pull && push && delete,
            _ => false,
        })
        .collect();
    let mut entry = serde_json::json!({"type": "repository", "name": name, "actions": granted});
    if let Some(p) = project {
        let mut meta = serde_json::json!({ "project_path": p.path.to_lowercase() });
        if let Some(patterns) = tag_deny_access_patterns(st, p, id, &granted) {
            meta["tag_deny_access_patterns"] = patterns;
        }
        entry["meta"] = meta;
    }
    Some(entry)
}

/// GitLab's `meta.tag_deny_access_patterns` for a granted access entry: only when the project
/// has protected tag rules and the token names a user (a person or a CI job's user, not a deploy
/// token); one key per granted action other than `pull` (`*` counts as push and delete), each
/// with the patterns of the rules whose minimum role the user does not reach.
fn tag_deny_access_patterns(
    st: &State,
    project: &Project,
    id: &Identity,
    granted: &[&str],
) -> Option<serde_json::Value> {
    let rules = st.rules.protected_tags.get(&project.path)?;
    let user = match id {
        Identity::User { name, .. } | Identity::Job { user: name, .. } => name,
        Identity::Anonymous | Identity::Deploy { .. } => return None,
    };
    let role = project.members.get(user).copied();
    let mut patterns = serde_json::Map::new();
    for action in granted {
        let actions: &[&str] = match *action {
            "*" => &["push", "delete"],
            "pull" => &[],
            _ => std::slice::from_ref(action),
        };
        for action in actions {
            let denied: Vec<serde_json::Value> = rules
                .iter()
                // Deleting a protected tag takes the same minimum role as pushing it, here.
                .filter(|(_, min)| role < Some(*min))
                .map(|(pattern, _)| pattern.as_str().into())
                .collect();
            patterns.insert((*action).to_owned(), denied.into());
        }
    }
    Some(patterns.into())
}

fn sign(st: &State, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": st.kid});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; st.key.public().modulus_len()];
    st.key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .expect("RSA signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// GitLab's 401 for credentials it does not accept (wrong, expired or revoked token, wrong
/// deploy-token username, password with 2FA): one message for all, as current GitLab words it.
pub const BASIC_DENIED: &str = "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password. If a token was provided, it was either incorrect, expired, or improperly scoped.";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
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

    /// The project an image path belongs to (the longest project path that is a prefix).
    fn project_of(&self, name: &str) -> Option<&Project> {
        self.projects
            .iter()
            .filter(|p| name == p.path || name.starts_with(&format!("{}/", p.path)))
            .max_by_key(|p| p.path.len())
    }
}

/// An HTTP date (IMF-fixdate, RFC 9110 §5.6.7) for Unix seconds.
pub fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `/jwt/auth?service=dependency_proxy`: GitLab's `DependencyProxyAuthenticationService`.
/// Anonymous → 403; bad credentials → 401 as for the registry; a PAT or deploy token without
/// `read_registry` (or `api`) → 403; otherwise a token (scopes are not looked at: GitLab's DP
/// tokens name who holds them, and group access is checked on each request).
///
/// Real GitLab signs DP tokens HS256 with an instance secret; the stand-in signs them RS256 with
/// its registry key (same `kid`), which changes nothing for clients or regrelay: only the
/// stand-in verifies them, and the registry refuses them for their `aud`.
fn dp_token(st: &State, basic: Option<&(String, String)>) -> Response<Full<Bytes>> {
    let Some((user, secret)) = basic else {
        return error(StatusCode::FORBIDDEN, "DENIED", "access forbidden");
    };
    let Some(identity) = authenticate(st, user, secret) else {
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", BASIC_DENIED);
    };
    let holder = match &identity {
        Identity::User { read: false, .. } | Identity::Deploy { read: false, .. } => {
            return error(StatusCode::FORBIDDEN, "DENIED", "access forbidden");
        }
        Identity::User { name, .. } => serde_json::json!({ "user_id": name }),
        // GitLab puts the deploy token itself in the claim; the stand-in names its username
        // (and looks the token up again on each request).
        Identity::Deploy { .. } => serde_json::json!({ "deploy_token": user }),
        Identity::Job { project, user } => {
            serde_json::json!({ "user_id": user, "job_project": project })
        }
        Identity::Anonymous => unreachable!("Basic credentials authenticate someone"),
    };
    let now = st.now();
    let n = st.dp_mints.fetch_add(1, Ordering::SeqCst);
    let mut claims = serde_json::json!({
        "iss": ISSUER, "aud": DP_SERVICE, "iat": now, "nbf": now - 5,
        "exp": now + st.lifetime.as_secs(), "jti": format!("dp-jti-{now}-{n}"),
    });
    for (k, v) in holder.as_object().expect("an object") {
        claims[k] = v.clone();
    }
    let token = sign(st, &claims);
    st.issued.lock().unwrap().push(token.clone());
    json(
        StatusCode::OK,
        serde_json::json!({ "token": token }).to_string(),
    )
}

/// Why a Dependency Proxy request's token is not accepted.
enum DpAuth {
    /// No Bearer token: a plain challenge.
    Missing,
    /// Expired, forged, or for another service: `error="invalid_token"`.
    Invalid,
}

/// The claims of a DP token the stand-in issued and that is valid now.
fn dp_verify(st: &State, headers: &http::HeaderMap) -> Result<serde_json::Value, DpAuth> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(DpAuth::Missing)?;
    let (scheme, jwt) = value.split_once(' ').ok_or(DpAuth::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(DpAuth::Missing);
    }
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    let [head, payload, sig] = parts[..] else {
        return Err(DpAuth::Invalid);
    };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|_| DpAuth::Invalid);
    let header: serde_json::Value =
        serde_json::from_slice(&decode(head)?).map_err(|_| DpAuth::Invalid)?;
    if header["alg"] != "RS256" || header["kid"] != st.kid.as_str() {
        return Err(DpAuth::Invalid);
    }
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, st.key.public_key().as_ref())
        .verify(format!("{head}.{payload}").as_bytes(), &decode(sig)?)
        .map_err(|_| DpAuth::Invalid)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(payload)?).map_err(|_| DpAuth::Invalid)?;
    let now = st.now();
    let exp = claims["exp"].as_u64().ok_or(DpAuth::Invalid)?;
    let nbf = claims["nbf"].as_u64().unwrap_or(0);
    let fresh = now <= exp + DP_LEEWAY_SECS && now + DP_LEEWAY_SECS >= nbf;
    if claims["aud"] != DP_SERVICE || claims["iss"] != ISSUER || !fresh {
        return Err(DpAuth::Invalid);
    }
    Ok(claims)
}

/// Who a DP token names, for [`DpRequest::identity`].
fn dp_identity(claims: &serde_json::Value) -> String {
    match (
        claims["deploy_token"].as_str(),
        claims["job_project"].as_str(),
        claims["user_id"].as_str(),
    ) {
        (Some(deploy), _, _) => format!("deploy:{deploy}"),
        (None, Some(project), user) => format!("job:{project}:{}", user.unwrap_or("")),
        (None, None, user) => format!("user:{}", user.unwrap_or("")),
    }
}

/// May the holder of `claims` use `group`'s Dependency Proxy?
fn dp_allowed(st: &State, group: &DpGroup, claims: &serde_json::Value) -> bool {
    let user = claims["user_id"].as_str();
    let member = user.is_some_and(|u| group.members.contains_key(u));
    if let Some(username) = claims["deploy_token"].as_str() {
        return st.credentials.lock().unwrap().iter().any(|c| {
            matches!(c, Credential::Deploy { username: u, project, .. }
                if u == username && *project == group.path)
        });
    }
    if let Some(project) = claims["job_project"].as_str() {
        return member || project.starts_with(&format!("{}/", group.path));
    }
    member
}

/// The DP's 401: its challenge (with `scope` for a repository, `error` for a refused token).
fn dp_challenge(st: &State, scope: Option<&str>, invalid: bool) -> Response<Full<Bytes>> {
    let mut challenge = format!(
        "Bearer realm=\"http://{}/jwt/auth\",service=\"{DP_SERVICE}\"",
        st.addr
    );
    if let Some(scope) = scope {
        challenge.push_str(&format!(",scope=\"{scope}\""));
    }
    if invalid {
        challenge.push_str(",error=\"invalid_token\"");
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
    r
}

/// Serves a Dependency Proxy request (`/v2/…`) and records it in [`GitLab::dp_requests`].
async fn dp_handle(st: &State, req: Request<Incoming>) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let fault = st.fault.lock().unwrap().clone();
    let verified = dp_verify(st, req.headers());
    let identity = verified.as_ref().ok().map(dp_identity);
    let resp = match fault {
        Some(f) => boxed(fault_response(&f)),
        None => dp_respond(st, req, verified).await,
    };
    st.dp_requests.lock().unwrap().push(DpRequest {
        method: method.to_string(),
        path,
        identity,
        status: resp.status().as_u16(),
        authorization,
    });
    resp
}

async fn dp_respond(
    st: &State,
    req: Request<Incoming>,
    verified: Result<serde_json::Value, DpAuth>,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/v2" || path == "/v2/" {
        return boxed(match verified {
            Ok(_) => json(StatusCode::OK, "{}".into()),
            Err(DpAuth::Missing) => dp_challenge(st, None, false),
            Err(DpAuth::Invalid) => dp_challenge(st, None, true),
        });
    }
    let not_found = || boxed(error(StatusCode::NOT_FOUND, "NOT_FOUND", "404 Not Found"));
    // /v2/<group>/dependency_proxy/containers/<image>/(manifests|blobs)/<reference>
    let Some((group_path, rest)) = path
        .strip_prefix("/v2/")
        .and_then(|p| p.split_once("/dependency_proxy/containers/"))
    else {
        return not_found();
    };
    let Some((image, kind, reference)) = ["manifests", "blobs"].iter().find_map(|k| {
        let (image, reference) = rest.rsplit_once(&format!("/{k}/"))?;
        Some((image, *k, reference))
    }) else {
        return not_found();
    };
    if image.is_empty() || reference.is_empty() || reference.contains('/') {
        return not_found();
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return boxed(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the dependency proxy serves pulls only",
        ));
    }
    let scope = format!("repository:{group_path}/dependency_proxy/containers/{image}:pull");
    let claims = match verified {
        Ok(c) => c,
        Err(DpAuth::Missing) => return boxed(dp_challenge(st, Some(&scope), false)),
        Err(DpAuth::Invalid) => return boxed(dp_challenge(st, Some(&scope), true)),
    };
    let Some(group) = st.dp.iter().find(|g| g.path == group_path) else {
        return not_found();
    };
    if !dp_allowed(st, group, &claims) {
        return boxed(error(StatusCode::FORBIDDEN, "DENIED", "access forbidden"));
    }
    dp_fetch(st, group, &req, image, kind, reference).await
}

/// Pulls `image`'s manifest or blob from the group's backing registry, as the stand-in itself
/// (a registry token for `repository:<image>:pull` it mints for itself), and streams it back.
async fn dp_fetch(
    st: &State,
    group: &DpGroup,
    req: &Request<Incoming>,
    image: &str,
    kind: &str,
    reference: &str,
) -> Response<Body> {
    let now = st.now();
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": SERVICE, "sub": "dependency-proxy", "iat": now, "nbf": now - 5,
        "exp": now + BACKING_TOKEN_SECS, "jti": format!("dp-backing-{now}"),
        "access": [{"type": "repository", "name": image, "actions": ["pull"]}],
    });
    let token = sign(st, &claims);
    let mut up = Request::builder()
        .method(req.method().clone())
        .uri(format!(
            "http://{}/v2/{image}/{kind}/{reference}",
            group.backing
        ))
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    for accept in req.headers().get_all(header::ACCEPT) {
        up = up.header(header::ACCEPT, accept.clone());
    }
    let resp = match st
        .backing_client
        .request(up.body(Empty::new()).unwrap())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return boxed(error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("backing registry unreachable: {e}"),
            ))
        }
    };
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // The backing registry refused the stand-in's own token: a rig problem, said plainly.
        return boxed(error(
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            &format!("backing registry refused the dependency proxy: {status}"),
        ));
    }
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(body.map_err(Into::into).boxed_unsync());
    *out.status_mut() = status;
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::HeaderName::from_static("docker-content-digest"),
    ] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    out
}
