//! Configuring and starting the stand-in: [`gitlab`] gives GitLab's defaults, each setter of
//! [`GitLabBuilder`] one of GitLab's settings (or a fact: a project, a credential, a member), and
//! [`GitLabBuilder::start`] serves it on 127.0.0.1:0. No GitLab rule is applied here.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;

use super::{
    handle, keys, limits, BanConfig, Credential, DpGroup, GitLab, Project, Role, Rules, State,
    TokenScope,
};

/// Builder for the service.
pub struct GitLabBuilder {
    lifetime: Duration,
    credentials: Vec<Credential>,
    projects: Vec<Project>,
    dp: Vec<DpGroup>,
    rules: Rules,
    maintenance: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Starts configuring a GitLab with GitLab's defaults: 5-minute tokens, registry on, no IP ban,
/// `trusted_proxies` 127.0.0.1 and ::1, `ip_whitelist` 127.0.0.1, job token allowlists on.
pub fn gitlab() -> GitLabBuilder {
    GitLabBuilder {
        lifetime: Duration::from_secs(300),
        credentials: vec![],
        projects: vec![],
        dp: vec![],
        rules: Rules {
            clock_offset: 0,
            expiries: HashMap::new(),
            allowlists: HashMap::new(),
            job_token_scope_off: vec![],
            registry_disabled: false,
            registry_disabled_projects: vec![],
            protected_tags: HashMap::new(),
            immutable_tags: HashMap::new(),
            admins: vec![],
            blocked: vec![],
            ip_ban: None,
            ip_whitelist: nets(&["127.0.0.1"]),
            trusted_proxies: nets(&["127.0.0.1", "::1"]),
        },
        maintenance: false,
        tls: None,
    }
}

/// Addresses or CIDR ranges, as `gitlab.yml` lists them.
fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .unwrap_or_else(|_| panic!("not an address or CIDR range: {s}"))
        })
        .collect()
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
    /// Token lifetime, `container_registry_token_expire_delay` (self-managed default: 5 minutes;
    /// the Dependency Proxy's tokens live as long).
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

    /// `user` is an instance administrator: may do anything to any project's images, and only
    /// administrators get `registry:catalog:*`.
    pub fn admin(mut self, user: &str) -> Self {
        self.rules.admins.push(user.into());
        self
    }

    /// `user` is blocked: its password, access tokens and jobs are refused (GitLab's 401).
    pub fn blocked(mut self, user: &str) -> Self {
        self.rules.blocked.push(user.into());
        self
    }

    /// The token (PAT, deploy or job token) or password `secret` expires at `at` (on the
    /// stand-in's clock, see [`GitLabBuilder::clock_offset`]): from then on it is refused with
    /// GitLab's 401, exactly as a wrong one.
    pub fn expires(mut self, secret: &str, at: SystemTime) -> Self {
        let unix = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.rules.expiries.insert(secret.into(), unix);
        self
    }

    /// Adds `allowed` (projects or groups) to `project`'s CI/CD job token allowlist (Settings →
    /// CI/CD → Job token permissions). GitLab's default is on for every project, with only the
    /// project itself listed: a job token of another project pulls from `project` only when its
    /// project (or a group above it) is listed, and its user may read `project` (public projects
    /// skip the allowlist: their registry is open to everyone). A job token
    /// never pushes to another project, listed or not.
    pub fn job_token_allowlist(mut self, project: &str, allowed: &[&str]) -> Self {
        self.rules
            .allowlists
            .entry(project.into())
            .or_default()
            .extend(allowed.iter().map(|p| p.to_string()));
        self
    }

    /// Turns "Limit access to this project" off for `project` (the pre-18.0 setting): job tokens
    /// of any project may pull from it by their user's access.
    pub fn job_token_scope_disabled(mut self, project: &str) -> Self {
        self.rules.job_token_scope_off.push(project.into());
        self
    }

    /// The container registry is not enabled on this instance: every registry token request is
    /// answered 404 `UNAVAILABLE` "registry not enabled".
    pub fn registry_disabled(mut self) -> Self {
        self.rules.registry_disabled = true;
        self
    }

    /// `project`'s Container Registry is disabled (Settings → General → Visibility): GitLab then
    /// grants no action on it to anyone (left out of the token, like any refused scope), and its
    /// API shows `container_registry_access_level: "disabled"`.
    pub fn project_registry_disabled(mut self, project: &str) -> Self {
        self.rules.registry_disabled_projects.push(project.into());
        self
    }

    /// A protected container tag rule on `project` (Settings → Packages and registries): tags
    /// matching `pattern` (an RE2 regex) may be pushed and deleted only by `min` and above. The
    /// push itself is still granted; a user (or a CI job's user) below `min` gets the pattern in
    /// `meta.tag_deny_access_patterns` of the access entry, as GitLab does (GitLab's own registry
    /// enforces it; Debian's `docker-registry` ignores the claim). Deploy tokens name no user and
    /// get no patterns.
    pub fn protected_tag(mut self, project: &str, pattern: &str, min: Role) -> Self {
        self.rules
            .protected_tags
            .entry(project.into())
            .or_default()
            .push((pattern.into(), min));
        self
    }

    /// An immutable tag rule on `project` (GitLab EE, licensed): access entries granting `push`,
    /// `delete` or `*` carry the project's immutable patterns in `meta.tag_immutable_patterns`.
    pub fn immutable_tag(mut self, project: &str, pattern: &str) -> Self {
        self.rules
            .immutable_tags
            .entry(project.into())
            .or_default()
            .push(pattern.into());
        self
    }

    /// GitLab EE maintenance mode is on: every action but `pull` is silently dropped from the
    /// grant (a push looks like "no permission"). See also [`GitLab::set_maintenance_mode`].
    pub fn maintenance_mode(mut self) -> Self {
        self.maintenance = true;
        self
    }

    /// Turns on the failed-login IP ban (`rack_attack.git_basic_auth.enabled`, off by default):
    /// `maxretry` failed Basic logins from one client IP within one `findtime` window (windows
    /// are aligned on the epoch, as Rack::Attack's counters are) ban the IP for `bantime`
    /// (typically 10, 60 s, 1 h). A banned IP's Basic logins get `403` [`BANNED_MESSAGE`] before
    /// any credential check. `gitlab-ci-token` logins are neither counted nor refused; a success
    /// resets the IP's count.
    pub fn ip_ban(mut self, maxretry: u32, findtime: Duration, bantime: Duration) -> Self {
        self.rules.ip_ban = Some(BanConfig {
            maxretry,
            findtime: findtime.as_secs().max(1),
            bantime: bantime.as_secs(),
        });
        self
    }

    /// `rack_attack.git_basic_auth.ip_whitelist`: client IPs (or CIDR ranges) the ban never
    /// counts nor refuses. GitLab's default: `127.0.0.1`.
    pub fn ip_whitelist(mut self, list: &[&str]) -> Self {
        self.rules.ip_whitelist = nets(list);
        self
    }

    /// The addresses (or CIDR ranges) whose `X-Forwarded-For` GitLab believes when it computes a
    /// request's client IP. GitLab's default is `127.0.0.1` and `::1` (plus
    /// `gitlab_rails['trusted_proxies']`); an empty list models a regrelay on another host, which
    /// is then the client, for every user behind it.
    pub fn trusted_proxies(mut self, list: &[&str]) -> Self {
        self.rules.trusted_proxies = nets(list);
        self
    }

    /// Shifts the stand-in's clock by `secs` (negative: behind): its `Date` header, the `iat`,
    /// `nbf` and `exp` of its tokens, token expiry, bans and lockouts all use real time + `secs`,
    /// as a GitLab host whose NTP is broken does.
    pub fn clock_offset(mut self, secs: i64) -> Self {
        self.rules.clock_offset = secs;
        self
    }

    /// Makes the private group `group` a Dependency Proxy on the stand-in's own address, backed
    /// by the registry at `backing`: a real `docker-registry` playing Docker Hub, started before
    /// this stand-in, so with another token service's realm (Docker Hub's own stand-in, which
    /// also seeds it: `Registry::start(&hub_gl.realm())`). Every stand-in signs with the same
    /// key, which that registry trusts, so the DP's own backing tokens work. See [`dp`] for
    /// GitLab's rules; in short: tokens from `/jwt/auth?service=dependency_proxy` (users whose
    /// credentials can read and write the registry, group deploy tokens with `read_registry` and
    /// `write_registry`), content for the group's members (any role), its deploy tokens, and CI
    /// jobs whose user is a member.
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

    /// Every user name the configuration mentions, sorted: user ids are positions in it.
    fn users(&self) -> Vec<String> {
        let mut users = BTreeSet::new();
        for c in &self.credentials {
            match c {
                Credential::Pat { user, .. }
                | Credential::Job { user, .. }
                | Credential::Password { user, .. } => {
                    users.insert(user.clone());
                }
                Credential::Deploy { .. } => {}
            }
        }
        let members = self.projects.iter().flat_map(|p| p.members.keys());
        users.extend(
            members
                .chain(self.dp.iter().flat_map(|g| g.members.keys()))
                .cloned(),
        );
        users.extend(self.rules.admins.iter().chain(&self.rules.blocked).cloned());
        users.into_iter().collect()
    }

    /// Serves HTTPS only, with `tls` (see [`crate::support::tls`]); its realm is then by name,
    /// `https://localhost:PORT/jwt/auth`. Handshakes that fail are dropped.
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Binds 127.0.0.1:0 and serves GitLab (and the Dependency Proxy, when configured).
    pub async fn start(self) -> GitLab {
        let (key, kid) = keys::load_signing_key();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let users = self.users();
        let state = Arc::new(State {
            key,
            kid,
            dp_secret: Mutex::new(keys::random_bytes::<32>().to_vec()),
            rules: self.rules,
            lifetime: self.lifetime,
            credentials: Mutex::new(self.credentials),
            projects: self.projects,
            users,
            maintenance: AtomicBool::new(self.maintenance),
            mints: AtomicUsize::new(0),
            addr,
            dp: self.dp,
            dp_mints: AtomicUsize::new(0),
            dp_requests: Mutex::new(vec![]),
            dp_holders: Mutex::new(HashMap::new()),
            backing_client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            seen: Mutex::new(vec![]),
            issued: Mutex::new(vec![]),
            attempts: AtomicUsize::new(0),
            bans: Mutex::new(limits::Bans::default()),
            lockout: Mutex::new(limits::Lockout::default()),
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
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let conns = st.clone();
                let (tls, seen_names) = (tls.clone(), seen_names.clone());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req, peer.ip()).await) }
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
