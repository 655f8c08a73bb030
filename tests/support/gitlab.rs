//! A token service that behaves like GitLab's `/jwt/auth` (see shared/reference/registry-auth.md):
//! GET only (POST → empty 404), `service=container_registry` only, HTTP Basic only, repeated and
//! space-separated `scope`s, `{"token":…}` and nothing else, RS256 JWTs with a libtrust `kid` that
//! Debian's registry trusts through `rootcertbundle`, silent dropping of actions the credential may
//! not have, PAT / deploy token / CI job token / password rules, and a configurable lifetime.
//! Faults can be injected while it runs: every answer a given error status ([`GitLab::fail_with`],
//! as GitLab's rate limiter or a maintenance window answers before any routing), a delay before
//! every answer ([`GitLab::delay`]), or no service at all ([`GitLab::stop`]).
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
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use sha2::{Digest, Sha256};

/// The issuer the test registry is configured to trust.
pub const ISSUER: &str = "gitlab-issuer";
/// GitLab's registry service name.
pub const SERVICE: &str = "container_registry";

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

/// What the service saw of one token request (for assertions).
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

struct State {
    key: RsaKeyPair,
    kid: String,
    lifetime: Duration,
    credentials: Mutex<Vec<Credential>>,
    projects: Vec<Project>,
    mints: AtomicUsize,
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
}

/// A running token service on 127.0.0.1:0; stops when dropped.
pub struct GitLab {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
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

    /// Binds 127.0.0.1:0 and serves `/jwt/auth`.
    pub async fn start(self) -> GitLab {
        let pem = std::fs::read_to_string(signing_key_path()).expect("read token signing key");
        let der = pem_body(&pem);
        let key = RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key");
        let kid = libtrust_kid(&spki_from_pkcs1(key.public_key().as_ref()));
        let state = Arc::new(State {
            key,
            kid,
            lifetime: self.lifetime,
            credentials: Mutex::new(self.credentials),
            projects: self.projects,
            mints: AtomicUsize::new(0),
            seen: Mutex::new(vec![]),
            issued: Mutex::new(vec![]),
            attempts: AtomicUsize::new(0),
            fault: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            connections: Mutex::new(vec![]),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let conns = st.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut open = conns.connections.lock().unwrap();
                open.retain(|c| !c.is_finished());
                open.push(conn.abort_handle());
            }
        });
        GitLab { addr, state, task }
    }
}

impl GitLab {
    /// `http://127.0.0.1:PORT/jwt/auth`.
    pub fn realm(&self) -> String {
        format!("http://{}/jwt/auth", self.addr)
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

async fn handle(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    st.attempts.fetch_add(1, Ordering::SeqCst);
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
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
    if !params.iter().any(|(k, v)| k == "service" && v == SERVICE) {
        return empty(StatusCode::NOT_FOUND);
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
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "HTTP Basic: Access denied. The provided password or token is incorrect or your account has 2FA enabled and you must use a personal access token instead of a password.",
                )
            }
        },
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
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
    let project = st
        .projects
        .iter()
        .filter(|p| name == p.path || name.starts_with(&format!("{}/", p.path)))
        .max_by_key(|p| p.path.len());
    let (pull, push, delete) = match (project, id) {
        (None, _) => (false, false, false),
        (Some(p), Identity::Anonymous) => (p.public, false, false),
        (Some(p), Identity::User { name, read, write }) => {
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
            (own || p.public || p.members.contains_key(user), own, false)
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
    Some(serde_json::json!({"type": "repository", "name": name, "actions": granted}))
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
