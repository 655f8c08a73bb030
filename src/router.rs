//! Pure routing: which handler a request goes to, decided from its method, target and `Host`
//! only. No IO. This is also where regrelay refuses to be an open proxy: `CONNECT`, absolute-form
//! targets naming another host, dot segments and paths outside the registry API never reach the
//! upstream.

use http::{Method, Uri, Version};

use crate::api_path::ApiPath;
use crate::config::Origin;
use crate::error::Error;

/// The token realm path regrelay serves (on the registry's own host).
pub const TOKEN_PATH: &str = "/jwt/auth";
/// Liveness path.
pub const HEALTHY_PATH: &str = "/-/healthy";
/// Readiness path (upstream reachable).
pub const READY_PATH: &str = "/-/ready";

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Registry API (`/v2/…`): forwarded to the upstream registry; its path, parsed.
    Registry(ApiPath),
    /// The token realm (`/jwt/auth`): served by regrelay, on the registry's own host.
    Token,
    /// `/-/healthy`.
    Healthy,
    /// `/-/ready`.
    Ready,
}

/// Routes a request, or says why it is refused. `publics` are the configured public URLs.
pub fn route(
    method: &Method,
    uri: &Uri,
    version: Version,
    publics: &[Origin],
) -> Result<Route, Error> {
    let path = uri.path();
    if method == Method::CONNECT {
        return Err(Error::MethodNotAllowed {
            method: method.clone(),
            path: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
        });
    }
    // In HTTP/1 an absolute-form target is how a client asks a *forward* proxy for a site
    // (RFC 9112 §3.2.2); registry clients never send one to a registry. Accept it only when it
    // names a configured public URL; refuse it otherwise, whatever the Host header says.
    if version < Version::HTTP_2 && uri.authority().is_some() {
        let ours = Origin::of(uri).is_some_and(|target| publics.iter().any(|p| target.same_as(p)));
        if !ours {
            return Err(Error::Refused {
                reason: "absolute-form target (regrelay is a reverse proxy, not a forward proxy)",
            });
        }
    }
    if let Err(reason) = canonical(path) {
        return Err(Error::Refused { reason });
    }
    let route = match path {
        TOKEN_PATH => Route::Token,
        HEALTHY_PATH => Route::Healthy,
        READY_PATH => Route::Ready,
        _ => match ApiPath::parse(path) {
            Some(api) => Route::Registry(api),
            None => {
                return Err(Error::NotFound {
                    path: path.to_owned(),
                })
            }
        },
    };
    let allowed = match route {
        Route::Registry(_) => matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::POST
                | Method::PUT
                | Method::PATCH
                | Method::DELETE
        ),
        Route::Token => matches!(*method, Method::GET | Method::POST),
        Route::Healthy | Route::Ready => matches!(*method, Method::GET | Method::HEAD),
    };
    if !allowed {
        return Err(Error::MethodNotAllowed {
            method: method.clone(),
            path: path.to_owned(),
        });
    }
    Ok(route)
}

impl Route {
    /// Every value [`Route::class`] returns.
    pub const CLASSES: [&'static str; 10] = [
        "base",
        "catalog",
        "tags",
        "referrers",
        "blob",
        "manifest",
        "upload",
        "other",
        "token",
        "health",
    ];

    /// The metrics label of the route: a fixed set ([`Route::CLASSES`]), never a repository name.
    pub fn class(&self) -> &'static str {
        match self {
            Route::Registry(api) => api.class(),
            Route::Token => "token",
            Route::Healthy | Route::Ready => "health",
        }
    }
}

/// Refuses paths that mean something else once a later hop normalizes them: dot segments, in
/// any spelling (`..`, `%2e%2e`, `%2E.`), encoded or back slashes (`..%2f`, `%5c`), empty
/// segments and encoded NULs. Registry paths never need any of them (repository names, tags
/// and digests are `[a-z0-9._:/-]`), so nothing legitimate is lost.
pub fn canonical(path: &str) -> Result<(), &'static str> {
    if path.contains('\\') {
        return Err("backslash in path");
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return Err("percent-encoded dot, slash, backslash or NUL in path");
    }
    if path.contains("//") {
        return Err("empty path segment");
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("dot segments in path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn base() -> ApiPath {
        ApiPath::parse("/v2/").unwrap()
    }

    #[test]
    fn every_class_is_listed() {
        let registry = [
            "/v2/",
            "/v2/_catalog",
            "/v2/g/p/tags/list",
            "/v2/g/p/referrers/sha256:0123",
            "/v2/g/p/blobs/sha256:0123",
            "/v2/g/p/manifests/v1",
            "/v2/g/p/blobs/uploads/",
            "/v2/g/p/what",
        ];
        let mut routes: Vec<Route> = registry
            .iter()
            .map(|p| Route::Registry(ApiPath::parse(p).unwrap()))
            .collect();
        routes.extend([Route::Token, Route::Healthy, Route::Ready]);
        let classes: std::collections::BTreeSet<_> = routes.iter().map(Route::class).collect();
        let listed: std::collections::BTreeSet<_> = Route::CLASSES.into_iter().collect();
        assert_eq!(classes, listed);
    }

    #[test]
    fn table() {
        let h1 = Version::HTTP_11;
        let public = Origin::parse("public_url", "http://px:5000").unwrap();
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a Origin>,
            Version,
            Result<Route, StatusCode>,
        );
        let cases: &[Case] = &[
            (
                "GET",
                "/v2/",
                Some(&public),
                h1,
                Ok(Route::Registry(base())),
            ),
            ("GET", "/v2", None, h1, Ok(Route::Registry(base()))),
            (
                "PATCH",
                "/v2/g/p/blobs/uploads/u?_state=x",
                None,
                h1,
                Ok(Route::Registry(base())),
            ),
            (
                "DELETE",
                "/v2/g/p/manifests/sha256:0",
                None,
                h1,
                Ok(Route::Registry(base())),
            ),
            ("HEAD", "/-/healthy", None, h1, Ok(Route::Healthy)),
            ("GET", "/-/ready", None, h1, Ok(Route::Ready)),
            ("GET", "/jwt/auth", None, h1, Ok(Route::Token)),
            ("POST", "/jwt/auth", None, h1, Ok(Route::Token)),
            (
                "PUT",
                "/jwt/auth",
                None,
                h1,
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            ("GET", "/jwt/auth/x", None, h1, Err(StatusCode::NOT_FOUND)),
            (
                "POST",
                "/-/ready",
                None,
                h1,
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                "OPTIONS",
                "/v2/",
                None,
                h1,
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                "TRACE",
                "/v2/",
                None,
                h1,
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                "CONNECT",
                "evil.com:443",
                None,
                h1,
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                "GET",
                "http://evil.com/v2/",
                Some(&public),
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "http://evil.com/v2/",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "http://px:5000/v2/",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "http://px:5000/v2/",
                Some(&public),
                h1,
                Ok(Route::Registry(base())),
            ),
            (
                "GET",
                "https://any:1/v2/",
                None,
                Version::HTTP_2,
                Ok(Route::Registry(base())),
            ),
            (
                "GET",
                "/v2/../admin",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "/v2/%2e%2e/admin",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            ("GET", "/v2/%2E./x", None, h1, Err(StatusCode::BAD_REQUEST)),
            ("GET", "/v2/..%2fx", None, h1, Err(StatusCode::BAD_REQUEST)),
            (
                "GET",
                "/v2/a%2Fb/manifests/1",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "/v2/a%5c..%5cb",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "GET",
                "/v2//etc/passwd",
                None,
                h1,
                Err(StatusCode::BAD_REQUEST),
            ),
            ("GET", "/v2/./x", None, h1, Err(StatusCode::BAD_REQUEST)),
            ("GET", "/v2/a/%00", None, h1, Err(StatusCode::BAD_REQUEST)),
            (
                "GET",
                "/v2/g/p/blobs/sha256%3Aab",
                None,
                h1,
                Ok(Route::Registry(base())),
            ),
            (
                "GET",
                "/v2/g/p.v2/manifests/1.0_rc-1",
                None,
                h1,
                Ok(Route::Registry(base())),
            ),
            ("GET", "/", None, h1, Err(StatusCode::NOT_FOUND)),
            ("GET", "/v20/", None, h1, Err(StatusCode::NOT_FOUND)),
            ("GET", "/admin", None, h1, Err(StatusCode::NOT_FOUND)),
        ];
        for (m, target, public, v, want) in cases {
            let method: Method = m.parse().unwrap();
            let uri: Uri = target.parse().unwrap();
            let publics: Vec<Origin> = public.iter().map(|p| (*p).clone()).collect();
            // Which route only: the paths' parsing has its own table (api_path.rs).
            let got = route(&method, &uri, *v, &publics)
                .map(|r| match r {
                    Route::Registry(_) => Route::Registry(base()),
                    other => other,
                })
                .map_err(|e| e.status());
            assert_eq!(&got, want, "{m} {target}");
        }
    }

    #[test]
    fn classes_are_a_fixed_set() {
        let cases = [
            ("GET", "/v2/", "base"),
            ("GET", "/jwt/auth", "token"),
            ("GET", "/-/ready", "health"),
            ("HEAD", "/-/healthy", "health"),
            ("GET", "/v2/g/p/blobs/sha256:ab", "blob"),
            ("GET", "/v2/team/blobs/app/manifests/sha256:ab", "manifest"),
            ("PATCH", "/v2/g/p/blobs/uploads/u", "upload"),
        ];
        for (m, path, class) in cases {
            let method: Method = m.parse().unwrap();
            let route = route(&method, &path.parse().unwrap(), Version::HTTP_11, &[]).unwrap();
            assert_eq!(route.class(), class, "{m} {path}");
        }
    }
}
