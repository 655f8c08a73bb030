//! The mirror endpoint's routing decision: which upstream a registry request (or a token
//! request's scope) is for, and the path it has there. One pure function, [`route`], over the
//! forms in which clients address a mirror:
//!
//! 1. a first path segment after `/v2/` that names an upstream (containerd `override_path`,
//!    registries.conf mirror `location = "relay/docker.io"`): `/v2/docker.io/library/alpine/…`;
//! 2. else containerd's `?ns=<registry host>` (hosts.toml mirrors, on pull and resolve);
//! 3. else the root upstream (dockerd's Docker Hub `registry-mirrors`: `/v2/library/alpine/…`):
//!    the default upstream unless `--root-upstream` names another.
//!
//! A first segment and an `ns` that name two different upstreams is a 400; an `ns` that names
//! no upstream is a 404 `NAME_UNKNOWN` without a challenge, so containerd falls back to its
//! next host without sending credentials. An upstream's repository prefix (a GitLab group's
//! dependency proxy, say) is prepended on the way up and removed on the way back
//! ([`Routed::client_path`], [`Routed::client_scope`]). No I/O here.

use crate::api_path::ApiPath;
use crate::challenge;
use crate::config::UpstreamConfig;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Index of the upstream.
    pub upstream: usize,
    /// The first path segment the client named the upstream with, if it did.
    pub segment: Option<String>,
    /// The upstream's repository prefix (empty for none).
    pub prefix: String,
    /// The path on the upstream (prefix applied).
    pub path: String,
}

/// Why a request names no upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `ns` names no upstream.
    Unknown(String),
    /// The first segment and `ns` name two different upstreams.
    Conflict {
        /// The segment.
        segment: String,
        /// The `ns`.
        ns: String,
    },
}

/// The index of the upstream `name` (lowercase) names.
pub fn find(upstreams: &[UpstreamConfig], name: &str) -> Option<usize> {
    upstreams.iter().position(|u| u.answers_to(name))
}

/// The `ns` of a query, decoded and lowercase.
pub fn ns_param(query: Option<&str>) -> Option<String> {
    let ns = challenge::query_values(query?, "ns").into_iter().next()?;
    Some(ns.to_ascii_lowercase())
}

/// Routes `rest`, the part of a registry path after `/v2/` (or a token scope's repository name),
/// given the request's `ns` and the upstream table.
pub fn route(
    rest: &str,
    ns: Option<&str>,
    upstreams: &[UpstreamConfig],
    root: usize,
) -> Result<Routed, Refusal> {
    let first = rest.split('/').next().unwrap_or("");
    let by_segment = (!first.is_empty())
        .then(|| find(upstreams, &first.to_ascii_lowercase()))
        .flatten();
    let by_ns = match ns {
        Some(ns) => Some(find(upstreams, ns).ok_or_else(|| Refusal::Unknown(ns.to_owned()))?),
        None => None,
    };
    let (upstream, segment) = match (by_segment, by_ns) {
        (Some(s), Some(n)) if s != n => {
            return Err(Refusal::Conflict {
                segment: first.to_owned(),
                ns: ns.unwrap_or_default().to_owned(),
            })
        }
        (Some(s), _) => (s, Some(first.to_owned())),
        (None, Some(n)) => (n, None),
        (None, None) => (root, None),
    };
    let name_rest = match &segment {
        Some(seg) => rest[seg.len()..].trim_start_matches('/'),
        None => rest,
    };
    let prefix = upstreams[upstream].prefix.clone();
    let path = match (prefix.is_empty(), name_rest.is_empty()) {
        (_, true) => "/v2/".to_owned(),
        (true, false) => format!("/v2/{name_rest}"),
        (false, false) => format!("/v2/{prefix}/{name_rest}"),
    };
    Ok(Routed {
        upstream,
        segment,
        prefix,
        path,
    })
}

impl Routed {
    /// True when the client's names differ from the upstream's (a segment or a prefix), so
    /// paths and scopes must be translated back.
    pub fn translates(&self) -> bool {
        self.segment.is_some() || !self.prefix.is_empty()
    }

    /// The upstream's form of the client's parsed path: the same resource, in the repository
    /// the upstream knows it by (the segment dropped, the prefix added); `/v2/`, the catalog and
    /// paths regrelay does not read are taken as [`Routed::path`] reads.
    pub fn upstream_api(&self, client: &ApiPath) -> ApiPath {
        if !self.translates() {
            return client.clone();
        }
        let bare = client.repository().and_then(|repo| match &self.segment {
            Some(seg) => repo.get(seg.len()..)?.strip_prefix('/'),
            None => Some(repo),
        });
        match bare.filter(|b| !b.is_empty()) {
            Some(bare) if self.prefix.is_empty() => ApiPath {
                repo: bare.to_owned(),
                kind: client.kind.clone(),
            },
            Some(bare) => ApiPath {
                repo: format!("{}/{bare}", self.prefix),
                kind: client.kind.clone(),
            },
            None => ApiPath::parse(&self.path).unwrap_or_else(|| client.clone()),
        }
    }

    /// The client's form of an upstream repository name.
    fn client_name(&self, name: &str) -> Option<String> {
        let bare = if self.prefix.is_empty() {
            name
        } else {
            name.strip_prefix(&self.prefix)?.strip_prefix('/')?
        };
        Some(match &self.segment {
            Some(seg) => format!("{seg}/{bare}"),
            None => bare.to_owned(),
        })
    }

    /// The client's form of an upstream path (`/v2/<prefix>/<name>/…` → `/v2/<segment>/<name>/…`);
    /// `None` for paths outside the prefix.
    pub fn client_path(&self, upstream_path: &str) -> Option<String> {
        let rest = upstream_path.strip_prefix("/v2/")?;
        Some(format!("/v2/{}", self.client_name(rest)?))
    }

    /// The client's form of a scope (`repository:<prefix>/<name>:pull`); others unchanged.
    pub fn client_scope(&self, scope: &str) -> String {
        let Some(rest) = scope.strip_prefix("repository:") else {
            return scope.to_owned();
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            return scope.to_owned();
        };
        match self.client_name(name) {
            Some(n) => format!("repository:{n}:{actions}"),
            None => scope.to_owned(),
        }
    }
}

/// The upstream and upstream form of a token request scope (`repository:<name>:<actions>`),
/// routed like a request for that name; other scopes (`registry:catalog:*`) go to `fallback`.
pub fn route_scope(
    scope: &str,
    ns: Option<&str>,
    upstreams: &[UpstreamConfig],
    fallback: usize,
) -> Result<(usize, String), Refusal> {
    let Some((name, actions)) = scope
        .strip_prefix("repository:")
        .and_then(|r| r.rsplit_once(':'))
    else {
        return Ok((fallback, scope.to_owned()));
    };
    let routed = route(name, ns, upstreams, fallback)?;
    let upstream_name = routed.path.trim_start_matches("/v2/");
    Ok((
        routed.upstream,
        format!("repository:{upstream_name}:{actions}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;

    fn up(name: &str, aliases: &[&str], prefix: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            origin: Origin::parse("registry", "http://r:1").unwrap(),
            prefix: prefix.into(),
            token_realm: None,
            credentials_file: None,
            ca: None,
            auth_redirect_allow: vec![],
        }
    }

    fn table() -> Vec<UpstreamConfig> {
        vec![
            up(
                "registry.gitlab.example.com",
                &["relay.example.com:5000"],
                "",
            ),
            up("docker.io", &[], "my-group/dependency_proxy/containers"),
            up("ghcr.io", &[], ""),
            // An alias that collides with a GitLab group name on the default upstream.
            up("hub", &[], ""),
        ]
    }

    #[test]
    fn every_mirror_form_routes() {
        let t = table();
        type Want<'a> = Result<(usize, Option<&'a str>, &'a str), Refusal>;
        let cases: &[(&str, Option<&str>, usize, Want)] = &[
            // dockerd registry-mirrors: root path, no ns → the root upstream.
            (
                "library/alpine/manifests/3",
                None,
                0,
                Ok((0, None, "/v2/library/alpine/manifests/3")),
            ),
            (
                "library/alpine/manifests/3",
                None,
                1,
                Ok((
                    1,
                    None,
                    "/v2/my-group/dependency_proxy/containers/library/alpine/manifests/3",
                )),
            ),
            ("", None, 0, Ok((0, None, "/v2/"))),
            // containerd hosts.toml: ?ns=<registry host>.
            (
                "library/alpine/manifests/3",
                Some("ghcr.io"),
                0,
                Ok((2, None, "/v2/library/alpine/manifests/3")),
            ),
            (
                "library/alpine/blobs/sha256:ab",
                Some("docker.io"),
                0,
                Ok((
                    1,
                    None,
                    "/v2/my-group/dependency_proxy/containers/library/alpine/blobs/sha256:ab",
                )),
            ),
            (
                "g/app/manifests/1",
                Some("registry.gitlab.example.com"),
                0,
                Ok((0, None, "/v2/g/app/manifests/1")),
            ),
            (
                "g/app/manifests/1",
                Some("relay.example.com:5000"),
                0,
                Ok((0, None, "/v2/g/app/manifests/1")),
            ),
            ("", Some("ghcr.io"), 0, Ok((2, None, "/v2/"))),
            (
                "x/manifests/1",
                Some("quay.io"),
                0,
                Err(Refusal::Unknown("quay.io".into())),
            ),
            // override_path / registries.conf prefix: the first segment names the upstream.
            (
                "ghcr.io/o/app/manifests/1",
                None,
                0,
                Ok((2, Some("ghcr.io"), "/v2/o/app/manifests/1")),
            ),
            (
                "docker.io/library/alpine/manifests/3",
                None,
                0,
                Ok((
                    1,
                    Some("docker.io"),
                    "/v2/my-group/dependency_proxy/containers/library/alpine/manifests/3",
                )),
            ),
            ("docker.io", None, 0, Ok((1, Some("docker.io"), "/v2/"))),
            (
                "DOCKER.IO/library/a/manifests/1",
                None,
                0,
                Ok((
                    1,
                    Some("DOCKER.IO"),
                    "/v2/my-group/dependency_proxy/containers/library/a/manifests/1",
                )),
            ),
            // containerd's override_path requests carry ns too, which agrees.
            (
                "ghcr.io/o/app/manifests/1",
                Some("ghcr.io"),
                0,
                Ok((2, Some("ghcr.io"), "/v2/o/app/manifests/1")),
            ),
            // They disagree: refused.
            (
                "ghcr.io/o/app/manifests/1",
                Some("docker.io"),
                0,
                Err(Refusal::Conflict {
                    segment: "ghcr.io".into(),
                    ns: "docker.io".into(),
                }),
            ),
            // A name colliding with an alias routes to the alias (documented); with the default's
            // ns it is a conflict, not a silent misroute.
            (
                "hub/app/manifests/1",
                None,
                0,
                Ok((3, Some("hub"), "/v2/app/manifests/1")),
            ),
            (
                "hub/app/manifests/1",
                Some("registry.gitlab.example.com"),
                0,
                Err(Refusal::Conflict {
                    segment: "hub".into(),
                    ns: "registry.gitlab.example.com".into(),
                }),
            ),
            // A first segment naming nothing is a repository of the routed upstream.
            (
                "group/app/manifests/1",
                None,
                0,
                Ok((0, None, "/v2/group/app/manifests/1")),
            ),
        ];
        for (rest, ns, root, want) in cases {
            let got = route(rest, *ns, &t, *root)
                .map(|r| (r.upstream, r.segment.clone(), r.path.clone()));
            let want = want
                .clone()
                .map(|(u, s, p)| (u, s.map(str::to_owned), p.to_owned()));
            assert_eq!(got, want, "{rest} ns={ns:?} root={root}");
        }
    }

    #[test]
    fn the_upstream_path_is_the_routed_path_parsed() {
        let t = table();
        for (rest, ns) in [
            ("docker.io/library/alpine/manifests/3", None),
            ("docker.io/team/blobs/app/blobs/sha256:ab", None),
            ("DOCKER.IO/library/a/blobs/uploads/", None),
            ("library/alpine/manifests/3", Some("docker.io")),
            ("ghcr.io/o/app/tags/list", None),
            ("g/app/manifests/1", None),
            ("docker.io/", None),
            ("docker.io/manifests/1", None),
            ("_catalog", None),
            ("", Some("docker.io")),
        ] {
            let routed = route(rest, ns, &t, 0).unwrap();
            let client = ApiPath::parse(&format!("/v2/{rest}")).unwrap();
            assert_eq!(
                Some(routed.upstream_api(&client)),
                ApiPath::parse(&routed.path),
                "{rest} ns={ns:?}"
            );
        }
    }

    #[test]
    fn paths_and_scopes_translate_back() {
        let t = table();
        let r = route("docker.io/library/alpine/blobs/uploads/", None, &t, 0).unwrap();
        assert!(r.translates());
        assert_eq!(
            r.client_path(
                "/v2/my-group/dependency_proxy/containers/library/alpine/blobs/uploads/u1"
            )
            .as_deref(),
            Some("/v2/docker.io/library/alpine/blobs/uploads/u1")
        );
        assert_eq!(r.client_path("/v2/other/x"), None);
        assert_eq!(
            r.client_scope("repository:my-group/dependency_proxy/containers/library/alpine:pull"),
            "repository:docker.io/library/alpine:pull"
        );
        assert_eq!(r.client_scope("registry:catalog:*"), "registry:catalog:*");
        let plain = route("g/app/manifests/1", None, &t, 0).unwrap();
        assert!(!plain.translates());
        let scopes = [
            (
                "repository:docker.io/library/alpine:pull",
                None,
                0,
                Ok((
                    1,
                    "repository:my-group/dependency_proxy/containers/library/alpine:pull",
                )),
            ),
            (
                "repository:library/alpine:pull",
                Some("ghcr.io"),
                0,
                Ok((2, "repository:library/alpine:pull")),
            ),
            (
                "repository:library/alpine:pull",
                None,
                1,
                Ok((
                    1,
                    "repository:my-group/dependency_proxy/containers/library/alpine:pull",
                )),
            ),
            (
                "repository:g/app:pull,push",
                None,
                0,
                Ok((0, "repository:g/app:pull,push")),
            ),
            ("registry:catalog:*", None, 0, Ok((0, "registry:catalog:*"))),
            (
                "repository:x:pull",
                Some("quay.io"),
                0,
                Err(Refusal::Unknown("quay.io".into())),
            ),
        ];
        for (scope, ns, fallback, want) in scopes {
            let want = want.map(|(u, s): (usize, &str)| (u, s.to_owned()));
            assert_eq!(route_scope(scope, ns, &t, fallback), want, "{scope}");
        }
    }
}
