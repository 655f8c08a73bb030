//! `/jwt/auth`, as GitLab's source has it:
//! - config/routes.rb: `GET` (and so `HEAD`) only; anything else is an empty `404`.
//! - app/controllers/jwt_controller.rb: HTTP Basic only (a `Bearer` header is anonymous); a login
//!   that fails is `401` with one message whatever the cause; `service` picks the service (an
//!   unknown one is an empty `404`); `scope` is read from the raw query, repeatable, split on
//!   whitespace; `offline_token` and the rest are ignored.
//! - lib/gitlab/auth.rb `find_for_git_client`: job token, access token, deploy token, password, in
//!   that order, with the abilities each gets (`read_api` pulls; `api` and passwords may
//!   administer), the IP ban around it, and 2FA, blocked and locked users refused.
//! - app/services/auth/container_registry_authentication_service.rb (and EE's override):
//!   anonymous callers pull public projects only and get `403` when nothing is granted; refused
//!   scopes are left out of `access`; `delete` is for the job's own project or `user_can_admin?`,
//!   `*` for `user_can_admin?`, `registry:catalog:*` for admins; deploy tokens apply to their
//!   project or every project of their group; job tokens pull from other projects only through
//!   their allowlist; EE maintenance mode drops every action but `pull`; claims as
//!   lib/json_web_token/token.rb writes them (uuid `jti`, `nbf = iat - 5`), with `access[].meta`
//!   and a nested `user` JWT.
//!
//! The Dependency Proxy's token service (`service=dependency_proxy`) is in `dp`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::keys::{parse_query, sign_rs256, uuid};
use super::{
    dp, empty, json, limits, within, Credential, Project, Role, Seen, State, TokenScope,
    CI_JOB_USER, DP_SERVICE, ISSUER, SERVICE,
};

/// The start of GitLab's 401 for credentials it does not accept (wrong, expired or revoked
/// token, wrong deploy-token username, password with 2FA, blocked or locked user); the message
/// then says " See <help page URL>".
pub const BASIC_DENIED: &str = "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password. If a token was provided, it was either incorrect, expired, or improperly scoped.";

/// The help page GitLab's 401 links to (`help_page_url` with its anchor).
const HELP_PAGE: &str = "/help/user/profile/account/two_factor_authentication_troubleshooting.md#error-http-basic-access-denied-if-a-password-was-provided-for-git-authentication-";

/// Lifetime of the nested `user` JWT (`JSONWebToken::Token::DEFAULT_EXPIRE_TIME`).
const USER_JWT_SECS: u64 = 60;
/// `Namespace::NUMBER_OF_ANCESTORS_ALLOWED`: a repository path has fewer components.
const MAX_COMPONENTS: usize = 20;
/// `ContainerRegistry::Path::LEVELS_SUPPORTED`: the project is among the 3 longest prefixes.
const LEVELS_SUPPORTED: usize = 3;

/// A registry-format error body: `{"errors":[{"code":…,"message":…}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"errors":[{"code":code,"message":message}]}).to_string()
}

/// What a credential may do (`Gitlab::Auth`'s authentication abilities that matter here).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Abilities {
    /// `read_container_image`.
    pub read: bool,
    /// `create_container_image`.
    pub create: bool,
    /// `admin_container_image`.
    pub admin: bool,
    /// `build_read_container_image`, `build_create_container_image`,
    /// `build_destroy_container_image`.
    pub build: bool,
}

impl Abilities {
    /// `read_only_authentication_abilities` (anonymous callers, `read_api`).
    const READ_ONLY: Abilities = Abilities {
        read: true,
        create: false,
        admin: false,
        build: false,
    };
    /// `full_authentication_abilities` (passwords, `api`).
    const FULL: Abilities = Abilities {
        read: true,
        create: true,
        admin: true,
        build: false,
    };

    /// `abilities_for_scopes`.
    fn of_scopes(scopes: &[TokenScope]) -> Abilities {
        scopes.iter().fold(Abilities::default(), |a, s| {
            let b = match s {
                TokenScope::Api => Abilities::FULL,
                TokenScope::ReadApi => Abilities::READ_ONLY,
                TokenScope::ReadRegistry => Abilities {
                    read: true,
                    ..Abilities::default()
                },
                TokenScope::WriteRegistry => Abilities {
                    create: true,
                    ..Abilities::default()
                },
                TokenScope::ReadUser => Abilities::default(),
            };
            Abilities {
                read: a.read || b.read,
                create: a.create || b.create,
                admin: a.admin || b.admin,
                build: a.build || b.build,
            }
        })
    }

    /// `has_registry_ability?`.
    fn any(&self) -> bool {
        self.read || self.create || self.admin || self.build
    }
}

/// Who a request authenticated as (`Gitlab::Auth::Result`).
#[derive(Debug, Clone)]
pub(super) enum Actor {
    /// No Basic credentials: type `none`, read-only abilities.
    Anonymous,
    /// A user, by access token (`pat` holds it) or password.
    User {
        name: String,
        auth_type: &'static str,
        abilities: Abilities,
        pat: Option<String>,
    },
    /// A deploy token of `holder` (a project or a group).
    Deploy {
        username: String,
        token: String,
        holder: String,
        scopes: Vec<TokenScope>,
        id: u64,
    },
    /// A CI job of `project` run by `user`.
    Job { project: String, user: String },
}

impl Actor {
    fn auth_type(&self) -> &'static str {
        match self {
            Actor::Anonymous => "none",
            Actor::User { auth_type, .. } => auth_type,
            Actor::Deploy { .. } => "deploy_token",
            Actor::Job { .. } => "build",
        }
    }

    fn abilities(&self) -> Abilities {
        match self {
            Actor::Anonymous => Abilities::READ_ONLY,
            Actor::User { abilities, .. } => *abilities,
            Actor::Deploy { scopes, .. } => Abilities::of_scopes(scopes),
            Actor::Job { .. } => Abilities {
                build: true,
                ..Abilities::default()
            },
        }
    }

    /// `current_user`: a user, or a job's user.
    pub(super) fn user(&self) -> Option<&str> {
        match self {
            Actor::User { name, .. } | Actor::Job { user: name, .. } => Some(name),
            Actor::Anonymous | Actor::Deploy { .. } => None,
        }
    }
}

/// The outcome of `find_for_git_client`.
enum Login {
    Ok(Actor),
    /// GitLab's 401.
    Denied,
    /// `Gitlab::Auth::IpBlocked`.
    Banned,
}

/// Serves a request that is neither Dependency Proxy content nor API, and records it in
/// [`super::GitLab::seen`].
pub(super) fn handle(st: &State, req: &Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let basic = auth.as_deref().and_then(decode_basic);
    let ip = limits::client_ip(st, peer, headers);
    let fault = st.fault.lock().unwrap().clone();
    let resp = match fault {
        Some(f) => limits::fault_response(st, &f, auth.is_some()),
        None => respond(st, req, basic.as_ref(), &ip),
    };
    st.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        auth_scheme: auth
            .as_deref()
            .map(|a| a.split(' ').next().unwrap_or("").to_owned()),
        username: basic.map(|(u, _)| u),
        status: resp.status().as_u16(),
        forwarded_for: headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        client_ip: ip,
        peer,
        authorization: headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec()),
        query: req.uri().query().unwrap_or("").to_owned(),
    });
    resp
}

/// Rails' `has_basic_credentials?` and `user_name_and_password`: scheme `Basic` (any case), and
/// a decoded `login:password` (split at the first colon); anything else is no credentials.
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
    ip: &str,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/jwt/auth" || !matches!(*req.method(), Method::GET | Method::HEAD) {
        return empty(StatusCode::NOT_FOUND);
    }
    // `authenticate_project_or_user` runs before the action looks at `service`.
    let actor = match basic {
        None => Actor::Anonymous,
        Some((login, password)) => match find_for_git_client(st, login, password, ip) {
            Login::Ok(actor) => actor,
            Login::Denied => return access_denied(st),
            Login::Banned => return limits::banned_response(),
        },
    };
    let params = parse_query(req.uri().query().unwrap_or(""));
    // Rails' `params[:x]` is the last value of a repeated key.
    let service = params.iter().rev().find(|(k, _)| k == "service");
    match service.map(|(_, v)| v.as_str()) {
        Some(SERVICE) => registry_token(st, &actor, &params),
        Some(DP_SERVICE) => dp::token(st, &actor),
        _ => empty(StatusCode::NOT_FOUND),
    }
}

/// `render_access_denied`: the one 401 for every refused login.
fn access_denied(st: &State) -> Response<Full<Bytes>> {
    let message = format!("{BASIC_DENIED} See http://{}{HELP_PAGE}", st.addr);
    json(
        StatusCode::UNAUTHORIZED,
        error_body("UNAUTHORIZED", &message),
    )
}

/// `Gitlab::Auth.find_for_git_client` for the checks that apply to `/jwt/auth`, with the IP ban
/// around them (`gitlab-ci-token` logins skip it). A 2FA user's password raises
/// `MissingPersonalAccessTokenError` before the failure is counted.
fn find_for_git_client(st: &State, login: &str, password: &str, ip: &str) -> Login {
    let rate_limited = login != CI_JOB_USER;
    if rate_limited && limits::banned(st, ip) {
        return Login::Banned;
    }
    let found = if st.expired(password) {
        None
    } else {
        job_check(st, login, password)
            .or_else(|| pat_check(st, password))
            .or_else(|| deploy_check(st, login, password))
            .or_else(|| password_check(st, login, password))
    };
    let actor = match found {
        Some(Ok(actor)) => Some(actor),
        Some(Err(TwoFactor)) => return Login::Denied,
        None => None,
    };
    if rate_limited {
        limits::register(st, ip, actor.is_some());
    }
    actor.map_or(Login::Denied, Login::Ok)
}

/// A password login of a user with two-factor authentication on.
struct TwoFactor;

type Check = Option<Result<Actor, TwoFactor>>;

/// `build_access_token_check`: `gitlab-ci-token` and a running job's token.
fn job_check(st: &State, login: &str, password: &str) -> Check {
    if login != CI_JOB_USER {
        return None;
    }
    st.credentials.lock().unwrap().iter().find_map(|c| match c {
        Credential::Job {
            token,
            project,
            user,
        } if token == password && st.can_log_in(user) => Some(Ok(Actor::Job {
            project: project.clone(),
            user: user.clone(),
        })),
        _ => None,
    })
}

/// `personal_access_token_check`: an active token, any login, its user able to log in.
fn pat_check(st: &State, password: &str) -> Check {
    st.credentials.lock().unwrap().iter().find_map(|c| match c {
        Credential::Pat {
            user,
            token,
            scopes,
        } if token == password && st.can_log_in(user) => Some(Ok(Actor::User {
            name: user.clone(),
            auth_type: "personal_access_token",
            abilities: Abilities::of_scopes(scopes),
            pat: Some(token.clone()),
        })),
        _ => None,
    })
}

/// `deploy_token_check`: an active token whose username is the login.
fn deploy_check(st: &State, login: &str, password: &str) -> Check {
    let creds = st.credentials.lock().unwrap();
    let mut deploy_tokens = creds
        .iter()
        .filter(|c| matches!(c, Credential::Deploy { .. }))
        .enumerate();
    deploy_tokens.find_map(|(i, c)| match c {
        Credential::Deploy {
            username,
            token,
            scopes,
            project,
        } if token == password && username == login => Some(Ok(Actor::Deploy {
            username: username.clone(),
            token: token.clone(),
            holder: project.clone(),
            scopes: scopes.clone(),
            id: i as u64 + 1,
        })),
        _ => None,
    })
}

/// `user_with_password_for_git`: the user's password, the user able to log in, no 2FA.
fn password_check(st: &State, login: &str, password: &str) -> Check {
    st.credentials.lock().unwrap().iter().find_map(|c| match c {
        Credential::Password {
            user,
            password: p,
            two_factor,
        } if user == login && p == password && st.can_log_in(user) => Some(if *two_factor {
            Err(TwoFactor)
        } else {
            Ok(Actor::User {
                name: user.clone(),
                auth_type: "gitlab_or_ldap",
                abilities: Abilities::FULL,
                pat: None,
            })
        }),
        _ => None,
    })
}

/// A service's error as `JwtController` renders it: the result hash, `http_status` included.
fn service_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "errors": [{"code": code, "message": message}],
        "http_status": status.as_u16(),
    });
    json(status, body.to_string())
}

/// `ContainerRegistryAuthenticationService#execute`.
fn registry_token(st: &State, actor: &Actor, params: &[(String, String)]) -> Response<Full<Bytes>> {
    if st.rules.registry_disabled {
        return service_error(StatusCode::NOT_FOUND, "UNAVAILABLE", "registry not enabled");
    }
    if !actor.abilities().any() {
        return service_error(StatusCode::FORBIDDEN, "DENIED", "access forbidden");
    }
    let mut access = vec![];
    for scope in scopes_param(params) {
        match process_scope(st, actor, &scope) {
            Ok(Some(entry)) => access.push(entry),
            Ok(None) => {}
            Err(Malformed) => return internal_error(),
        }
    }
    // `scopes.any? || current_user || deploy_token || project`: only anonymous callers can
    // have none of them.
    if access.is_empty() && matches!(actor, Actor::Anonymous) {
        return service_error(StatusCode::FORBIDDEN, "DENIED", "access forbidden");
    }
    let now = st.now();
    let user_jwt = sign_rs256(
        st,
        &serde_json::json!({
            "user_info": user_info(st, actor), "jti": uuid(), "iat": now, "nbf": now - 5,
            "exp": now + USER_JWT_SECS,
        }),
    );
    let mut claims = serde_json::json!({
        "auth_type": actor.auth_type(), "access": access, "user": user_jwt, "jti": uuid(),
        "aud": SERVICE, "iss": ISSUER, "iat": now, "nbf": now - 5,
        "exp": now + st.lifetime.as_secs(),
    });
    if let Some(user) = actor.user() {
        claims["sub"] = user.into();
    }
    let token = sign_rs256(st, &claims);
    st.mints.fetch_add(1, Ordering::SeqCst);
    st.issued.lock().unwrap().extend([token.clone(), user_jwt]);
    json(
        StatusCode::OK,
        serde_json::json!({ "token": token }).to_string(),
    )
}

/// The nested `user` JWT's `user_info`.
fn user_info(st: &State, actor: &Actor) -> serde_json::Value {
    match actor {
        Actor::Anonymous => serde_json::Value::Null,
        Actor::Deploy { username, id, .. } => serde_json::json!({
            "token_type": "deploy_token", "username": username, "deploy_token_id": id,
        }),
        Actor::User { name, .. } | Actor::Job { user: name, .. } => serde_json::json!({
            "token_type": actor.auth_type(), "username": name, "user_id": st.user_id(name),
        }),
    }
}

/// Rails' 500 page: what an exception in the service (a scope without actions) becomes.
fn internal_error() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(
        b"<!DOCTYPE html>\n<html><head><title>Something went wrong (500)</title></head>\n<body><h1>500</h1><h2>We're sorry, something went wrong on our end</h2></body></html>\n",
    )));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// `scopes_param`: none unless the last `scope` is present (not blank); then every `scope`
/// value, split on whitespace.
fn scopes_param(params: &[(String, String)]) -> Vec<String> {
    let values: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.as_str())
        .collect();
    if values.last().is_none_or(|v| v.trim().is_empty()) {
        return vec![];
    }
    values
        .iter()
        .flat_map(|v| v.split_ascii_whitespace())
        .map(str::to_owned)
        .collect()
}

/// A scope without its third part: Ruby's `nil.split` raises.
struct Malformed;

/// `process_scope`: `type:name:actions` split at the first two colons, actions split on commas
/// (Ruby drops trailing empty ones); types other than `registry` and `repository` are ignored.
fn process_scope(
    st: &State,
    actor: &Actor,
    scope: &str,
) -> Result<Option<serde_json::Value>, Malformed> {
    let mut parts = scope.splitn(3, ':');
    let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Malformed);
    };
    let mut actions: Vec<&str> = actions.split(',').collect();
    while actions.last().is_some_and(|a| a.is_empty()) {
        actions.pop();
    }
    Ok(match kind {
        "registry" => registry_access(st, actor, name, &actions),
        "repository" => repository_access(st, actor, name, &actions),
        _ => None,
    })
}

/// `process_registry_access`: `registry:catalog:*` for administrators, nothing else.
fn registry_access(
    st: &State,
    actor: &Actor,
    name: &str,
    actions: &[&str],
) -> Option<serde_json::Value> {
    let admin = actor.user().is_some_and(|u| st.is_admin(u));
    (admin && name == "catalog" && actions == ["*"])
        .then(|| serde_json::json!({"type": "registry", "name": "catalog", "actions": ["*"]}))
}

/// `ContainerRegistry::Path#valid?` (`Gitlab::Regex.container_repository_name_regex`, fewer
/// than 20 components, at least 2).
fn valid_path(path: &str) -> bool {
    static NAME: OnceLock<regex::Regex> = OnceLock::new();
    let name = NAME.get_or_init(|| {
        regex::Regex::new(r"\A[a-z0-9]+(([._/]|__|-*)[a-z0-9])*\z").expect("a regex")
    });
    let components = path.split('/').count();
    name.is_match(path) && components > 1 && components < MAX_COMPONENTS
}

/// `ContainerRegistry::Path#repository_project`: the project among the path's three longest
/// prefixes (of at least two components).
fn repository_project<'a>(st: &'a State, path: &str) -> Option<&'a Project> {
    let components: Vec<&str> = path.split('/').collect();
    (2..=components.len())
        .rev()
        .take(LEVELS_SUPPORTED)
        .find_map(|len| st.project(&components[..len].join("/")))
}

/// `process_repository_access`: the allowed actions on the (downcased) path, with
/// `access_metadata`; `None` when the path is invalid, no project holds it, or nothing is allowed.
fn repository_access(
    st: &State,
    actor: &Actor,
    name: &str,
    actions: &[&str],
) -> Option<serde_json::Value> {
    let path = name.to_lowercase();
    if !valid_path(&path) {
        return None;
    }
    let project = repository_project(st, &path)?;
    let authorized: Vec<&str> = actions
        .iter()
        .copied()
        .filter(|a| can_access(st, actor, project, a))
        .collect();
    if authorized.is_empty() {
        return None;
    }
    let meta = access_metadata(st, project, actor, &authorized);
    Some(serde_json::json!({
        "type": "repository", "name": path, "actions": authorized, "meta": meta,
    }))
}

/// A user's role in a project (administrators may do anything).
fn role(st: &State, user: Option<&str>, project: &Project) -> Option<Role> {
    let user = user?;
    if st.is_admin(user) {
        return Some(Role::Maintainer);
    }
    project.members.get(user).copied()
}

/// `read_container_image` for `user` (`None`: anonymous): public projects, else Reporter and up.
fn can_read(st: &State, user: Option<&str>, project: &Project) -> bool {
    project.public || role(st, user, project) >= Some(Role::Reporter)
}

/// May a job token of `source` reach `target` (the CI/CD job token allowlist)? Its own project,
/// a project with the allowlist off, one that lists `source` or a group above it, or a public
/// project (its registry open to everyone: no allowlist check, gitlab-org/gitlab!135263).
fn job_token_allowed(st: &State, source: &str, target: &Project) -> bool {
    source.eq_ignore_ascii_case(&target.path)
        || target.public
        || st.rules.job_token_scope_off.contains(&target.path)
        || st
            .rules
            .allowlists
            .get(&target.path)
            .is_some_and(|allowed| allowed.iter().any(|a| within(source, a)))
}

/// `can_access?` (EE first: maintenance mode leaves `pull` only).
fn can_access(st: &State, actor: &Actor, project: &Project, action: &str) -> bool {
    if st.maintenance.load(Ordering::SeqCst) && action != "pull" {
        return false;
    }
    if st.rules.registry_disabled_projects.contains(&project.path) {
        return false;
    }
    let ab = actor.abilities();
    let user = actor.user();
    let own_job = match actor {
        Actor::Job { project: p, .. } => p.eq_ignore_ascii_case(&project.path),
        _ => false,
    };
    let deploy_reaches = match actor {
        Actor::Deploy { holder, .. } => within(&project.path, holder),
        _ => false,
    };
    let build_can_pull = ab.build
        && (own_job
            || match actor {
                Actor::Job {
                    project: source, ..
                } => job_token_allowed(st, source, project) && can_read(st, user, project),
                _ => false,
            });
    let user_can_admin =
        ab.admin && user.is_some() && role(st, user, project) >= Some(Role::Maintainer);
    match action {
        "pull" => {
            build_can_pull
                // `user_can_pull?` asks about `current_user`, which is nil for deploy tokens
                // too: any read-capable credential pulls public projects.
                || (ab.read && can_read(st, user, project))
                || (ab.read && deploy_reaches)
        }
        "push" => {
            (ab.build && own_job)
                || (ab.create && user.is_some() && role(st, user, project) >= Some(Role::Developer))
                || (ab.create && deploy_reaches)
        }
        "delete" => (ab.build && own_job) || user_can_admin,
        "*" => user_can_admin,
        _ => false,
    }
}

/// `access_metadata`: project path and ids, then (for a user, when the project has protected
/// tag rules) `tag_deny_access_patterns`, and (EE, licensed) `tag_immutable_patterns`.
fn access_metadata(
    st: &State,
    project: &Project,
    actor: &Actor,
    actions: &[&str],
) -> serde_json::Value {
    let root = project.path.split('/').next().unwrap_or("");
    let mut meta = serde_json::json!({
        "project_path": project.path.to_lowercase(),
        "project_id": st.project_id(&project.path),
        "root_namespace_id": st.namespace_id(root),
    });
    if let Some(patterns) = tag_deny_access_patterns(st, project, actor.user(), actions) {
        meta["tag_deny_access_patterns"] = patterns;
    }
    let writes = actions.iter().any(|a| ["push", "delete", "*"].contains(a));
    match st.rules.immutable_tags.get(&project.path) {
        Some(patterns) if writes && !patterns.is_empty() => {
            meta["tag_immutable_patterns"] = patterns.clone().into();
        }
        _ => {}
    }
    meta
}

/// `tag_deny_access_patterns`: one key per granted action other than `pull` (`*` is push and
/// delete), each listing the patterns of the rules whose minimum role the user does not reach
/// (administrators: none).
fn tag_deny_access_patterns(
    st: &State,
    project: &Project,
    user: Option<&str>,
    actions: &[&str],
) -> Option<serde_json::Value> {
    let user = user?;
    let rules = st
        .rules
        .protected_tags
        .get(&project.path)
        .filter(|r| !r.is_empty())?;
    let checked: Vec<&str> = if actions.contains(&"*") {
        vec!["push", "delete"]
    } else {
        let mut unique: Vec<&str> = vec![];
        for a in actions {
            if *a != "pull" && !unique.contains(a) {
                unique.push(a);
            }
        }
        unique
    };
    let admin = st.is_admin(user);
    let level = project.members.get(user).copied();
    let mut patterns = serde_json::Map::new();
    for action in checked {
        let denied: Vec<serde_json::Value> = rules
            .iter()
            .filter(|(_, min)| !admin && level < Some(*min))
            .map(|(pattern, _)| pattern.as_str().into())
            .collect();
        patterns.insert(action.to_owned(), denied.into());
    }
    Some(patterns.into())
}
