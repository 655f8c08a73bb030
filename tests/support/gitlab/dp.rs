//! A group's Dependency Proxy and its tokens, as GitLab's source has them:
//! - `/jwt/auth?service=dependency_proxy`
//!   (app/services/auth/dependency_proxy_authentication_service.rb): anonymous callers, users whose
//!   credentials cannot both read and write the registry (`read_container_image` and
//!   `create_container_image`, or a job's build abilities), and deploy tokens that are not group
//!   tokens with `read_registry` and `write_registry` (app/models/deploy_token.rb
//!   `valid_for_dependency_proxy?`) get `403 {"message":"access forbidden","status":"error",
//!   "http_status":403}` (app/services/base_service_utility.rb `error`); the others an HS256 JWT
//!   naming `user_id` (a job: its user), the raw `personal_access_token`, or the raw
//!   `deploy_token`, living `container_registry_token_expire_delay`.
//! - `/v2/…` (app/controllers/groups/dependency_proxy/application_controller.rb,
//!   dependency_proxy_auth_controller.rb, dependency_proxy_for_containers_controller.rb,
//!   concerns/dependency_proxy/group_access.rb): without a valid token (HS256 with the DP secret,
//!   `exp`/`nbf` checked with 60 s leeway, `JSONWebToken::HMACToken::LEEWAY`) a `401` with an empty
//!   `text/plain` body and `WWW-Authenticate: Bearer realm="<gitlab>/jwt/auth",service=
//!   "dependency_proxy"` (app/models/dependency_proxy/registry.rb: no `scope`, never `error=`);
//!   with one, `/v2/` is an empty `200`, and a manifest or blob of an unknown group, or of a group
//!   its holder may not read (`read_dependency_proxy`: a member, any role; a group deploy token of
//!   the group or above it), an empty `404` (`access_denied!` hides the group); other methods
//!   have no route (empty `404`).
//!
//! Content comes from the group's backing registry (playing Docker Hub): the stand-in pulls it
//! as itself with a registry token it mints for itself, and streams it back. It keeps no cache.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::jwt::Actor;
use super::keys::{sign_hs256, sign_rs256, uuid, verify_hs256};
use super::{
    boxed, empty, json, limits, plain, within, Body, Credential, DpGroup, DpRequest, State,
    TokenScope, DP_LEEWAY_SECS, DP_SERVICE, ISSUER, SERVICE,
};

/// Lifetime of the registry tokens the Dependency Proxy mints for itself (backing pulls).
const BACKING_TOKEN_SECS: u64 = 60;

/// `BaseServiceUtility#error` as `JwtController` renders it (keys in Ruby's insertion order).
fn service_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let message = serde_json::Value::from(message);
    let body = format!(
        r#"{{"message":{message},"status":"error","http_status":{}}}"#,
        status.as_u16()
    );
    json(status, body)
}

/// `valid_for_dependency_proxy?`: a group deploy token with both registry scopes.
fn valid_deploy_token(st: &State, holder: &str, scopes: &[TokenScope]) -> bool {
    st.is_group(holder)
        && scopes.contains(&TokenScope::ReadRegistry)
        && scopes.contains(&TokenScope::WriteRegistry)
}

/// `/jwt/auth?service=dependency_proxy`: `DependencyProxyAuthenticationService#execute`.
pub(super) fn token(st: &State, actor: &Actor) -> Response<Full<Bytes>> {
    let now = st.now();
    let (mut claims, holder) = match actor {
        Actor::Anonymous => return service_error(StatusCode::FORBIDDEN, "access forbidden"),
        Actor::Deploy {
            username,
            token,
            holder,
            scopes,
            ..
        } => {
            if !valid_deploy_token(st, holder, scopes) {
                return service_error(StatusCode::FORBIDDEN, "access forbidden");
            }
            (
                serde_json::json!({ "deploy_token": token }),
                format!("deploy:{username}"),
            )
        }
        Actor::User {
            name,
            abilities,
            pat,
            ..
        } => {
            if !(abilities.read && abilities.create) {
                return service_error(StatusCode::FORBIDDEN, "access forbidden");
            }
            let mut c = serde_json::json!({ "user_id": st.user_id(name) });
            if let Some(pat) = pat {
                c["personal_access_token"] = pat.as_str().into();
            }
            (c, format!("user:{name}"))
        }
        Actor::Job { project, user } => (
            serde_json::json!({ "user_id": st.user_id(user) }),
            format!("job:{project}:{user}"),
        ),
    };
    let jti = uuid();
    for (k, v) in [
        ("jti", serde_json::Value::from(jti.as_str())),
        ("iat", now.into()),
        ("nbf", (now - 5).into()),
        ("exp", (now + st.lifetime.as_secs()).into()),
    ] {
        claims[k] = v;
    }
    let token = sign_hs256(&st.dp_secret.lock().unwrap(), &claims);
    st.dp_mints.fetch_add(1, Ordering::SeqCst);
    st.dp_holders.lock().unwrap().insert(jti, holder);
    st.issued.lock().unwrap().push(token.clone());
    json(
        StatusCode::OK,
        serde_json::json!({ "token": token }).to_string(),
    )
}

/// Who a DP request's token names.
enum Holder {
    User(String),
    Deploy {
        holder: String,
        scopes: Vec<TokenScope>,
    },
}

/// `authenticate_user_from_jwt_token!`: the holder of a valid `Bearer` (or `Token`) DP token,
/// with its `jti`; `Err(true)` when the token names a user id that does not exist (`User.find`
/// raises, rendered as a 404).
fn authenticate(st: &State, req: &Request<Incoming>) -> Result<(Holder, String), bool> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(false)?;
    let jwt = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("Token "))
        .ok_or(false)?;
    let claims = verify_hs256(&st.dp_secret.lock().unwrap(), jwt).ok_or(false)?;
    let now = st.now();
    let expired = claims["exp"]
        .as_u64()
        .is_some_and(|exp| exp + DP_LEEWAY_SECS <= now);
    let immature = claims["nbf"]
        .as_u64()
        .is_some_and(|nbf| nbf > now + DP_LEEWAY_SECS);
    if expired || immature {
        return Err(false);
    }
    let jti = claims["jti"].as_str().unwrap_or("").to_owned();
    if let Some(id) = claims["user_id"].as_u64() {
        let name = id
            .checked_sub(1)
            .and_then(|i| st.users.get(i as usize))
            .ok_or(true)?;
        return Ok((Holder::User(name.clone()), jti));
    }
    let secret = claims["deploy_token"].as_str().ok_or(false)?;
    if st.expired(secret) {
        return Err(false);
    }
    let found = st.credentials.lock().unwrap().iter().find_map(|c| match c {
        Credential::Deploy {
            token,
            project,
            scopes,
            ..
        } if token == secret => Some(Holder::Deploy {
            holder: project.clone(),
            scopes: scopes.clone(),
        }),
        _ => None,
    });
    found.map(|h| (h, jti)).ok_or(false)
}

/// `read_dependency_proxy` on `group`.
fn may_read(st: &State, group: &DpGroup, holder: &Holder) -> bool {
    match holder {
        Holder::User(name) => {
            st.is_admin(name)
                || (!st.rules.blocked.contains(name) && group.members.contains_key(name))
        }
        Holder::Deploy { holder, scopes } => {
            valid_deploy_token(st, holder, scopes) && within(&group.path, holder)
        }
    }
}

/// The DP's `401`: `request_bearer_token!`.
fn challenge(st: &State) -> Response<Full<Bytes>> {
    let mut r = plain(StatusCode::UNAUTHORIZED, "");
    let value = format!(
        "Bearer realm=\"http://{}/jwt/auth\",service=\"{DP_SERVICE}\"",
        st.addr
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&value).expect("a header value"),
    );
    r
}

/// A manifest or blob route: `(group, image, kind, reference)`.
fn route(path: &str) -> Option<(&str, &str, &'static str, &str)> {
    let (group, rest) = path
        .strip_prefix("/v2/")?
        .split_once("/dependency_proxy/containers/")?;
    let (image, kind, reference) = ["manifests", "blobs"].iter().find_map(|k| {
        let (image, reference) = rest.rsplit_once(&format!("/{k}/"))?;
        Some((image, *k, reference))
    })?;
    let ok = !group.is_empty() && !image.is_empty() && !reference.is_empty();
    (ok && !reference.contains('/')).then_some((group, image, kind, reference))
}

/// Serves a Dependency Proxy request (`/v2/…`) and records it in
/// [`super::GitLab::dp_requests`].
pub(super) async fn handle(st: &State, req: Request<Incoming>) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let fault = st.fault.lock().unwrap().clone();
    let authenticated = authenticate(st, &req);
    let identity = authenticated
        .as_ref()
        .ok()
        .and_then(|(_, jti)| st.dp_holders.lock().unwrap().get(jti).cloned());
    let resp = match fault {
        Some(f) => boxed(limits::fault_response(st, &f, authorization.is_some())),
        None => respond(st, req, authenticated).await,
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

async fn respond(
    st: &State,
    req: Request<Incoming>,
    authenticated: Result<(Holder, String), bool>,
) -> Response<Body> {
    let not_found = || boxed(empty(StatusCode::NOT_FOUND));
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let content = route(path);
    if !get || (content.is_none() && path != "/v2" && path != "/v2/") {
        return not_found();
    }
    let holder = match authenticated {
        Ok((holder, _)) => holder,
        Err(false) => return boxed(challenge(st)),
        Err(true) => return not_found(),
    };
    let Some((group_path, image, kind, reference)) = content else {
        return boxed(plain(StatusCode::OK, ""));
    };
    let Some(group) = st
        .dp
        .iter()
        .find(|g| g.path.eq_ignore_ascii_case(group_path))
    else {
        return not_found();
    };
    if !may_read(st, group, &holder) {
        return not_found();
    }
    fetch(st, group, &req, image, kind, reference).await
}

/// Pulls `image`'s manifest or blob from the group's backing registry, as the stand-in itself
/// (a registry token for `repository:<image>:pull` it mints for itself), and streams it back.
async fn fetch(
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
        "exp": now + BACKING_TOKEN_SECS, "jti": uuid(),
        "access": [{"type": "repository", "name": image, "actions": ["pull"]}],
    });
    let token = sign_rs256(st, &claims);
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
    let up = up.body(Empty::new()).expect("a request");
    let resp = match st.backing_client.request(up).await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("backing registry unreachable: {e}");
            return boxed(service_error(StatusCode::BAD_GATEWAY, &msg));
        }
    };
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // The backing registry refused the stand-in's own token: a rig problem, said plainly.
        let msg = format!("backing registry refused the dependency proxy: {status}");
        return boxed(service_error(StatusCode::BAD_GATEWAY, &msg));
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
