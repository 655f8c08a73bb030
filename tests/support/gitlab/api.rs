//! GitLab's REST API, the one call `regrelay doctor` makes: `GET /api/v4/projects/:id` (`:id` a
//! number or the URL-encoded path) with `PRIVATE-TOKEN: <token>` or `Authorization: Bearer
//! <token>`, as lib/api/projects.rb and lib/api/helpers.rb answer it. Access tokens only
//! ([`Credential::Pat`]): 401 `{"message":"401 Unauthorized"}` for an unknown, expired or revoked
//! token (or a user who may not log in), 403 `insufficient_scope` for a token without
//! `api`/`read_api`, 404 `{"message":"404 Project Not Found"}` for a project the user may not see,
//! else the project with its `container_registry_access_level`. Nothing else of the API.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{json, Credential, State, TokenScope};

pub(super) fn handle(st: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/api/v4/projects/")
        .map(|id| {
            percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned()
        })
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
    let usable = |(user, _): &(String, Vec<TokenScope>)| !st.expired(&token) && st.can_log_in(user);
    let Some((user, scopes)) = found.filter(usable) else {
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
