//! A registry API path (`/v2/…`), parsed once by the [`router`](crate::router) and carried by the
//! route: the scope a request needs, its metrics label, upload detection, upload splitting, cache
//! targets and mirror routing all read this one value, so they cannot disagree about what a path
//! names.
//!
//! A path is read from the right, as distribution's routes match it: the resource is the last
//! one or two segments (`manifests/<ref>`, `blobs/<digest>`, `blobs/uploads/<id>`, `tags/list`,
//! `referrers/<digest>`) and everything before is the repository, whatever its own segments are
//! called. So `/v2/team/blobs/app/manifests/sha256:…` is a manifest of `team/blobs/app`, and
//! `/v2/g/uploads/blobs/uploads/` starts an upload to `g/uploads`.

use http::Method;

/// A parsed `/v2/…` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath {
    /// The repository (`group/project`); empty for [`Resource::Base`] and
    /// [`Resource::Catalog`]; for [`Resource::Other`], the whole path after `/v2/`.
    pub repo: String,
    /// What in the repository the path names.
    pub kind: Resource,
}

/// What an [`ApiPath`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `/v2/`: the API version check (and the login probe).
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<repo>/tags/list`.
    Tags,
    /// `/v2/<repo>/referrers/<digest>`.
    Referrers(String),
    /// `/v2/<repo>/blobs/<digest>`.
    Blob(String),
    /// `/v2/<repo>/manifests/<tag or digest>`.
    Manifest(String),
    /// `/v2/<repo>/blobs/uploads/` (`None`: starts an upload) or `…/uploads/<id>`.
    Upload(Option<String>),
    /// Any other path under `/v2/` (the registry answers it; regrelay reads nothing in it).
    Other,
}

impl ApiPath {
    /// `/v2/`.
    pub const BASE: ApiPath = ApiPath {
        repo: String::new(),
        kind: Resource::Base,
    };

    /// Parses `path` (without query), or `None` when it is not under `/v2`.
    pub fn parse(path: &str) -> Option<ApiPath> {
        let rest = match path {
            "/v2" | "/v2/" => return Some(ApiPath::BASE),
            p => p.strip_prefix("/v2/")?,
        };
        if rest == "_catalog" {
            return Some(ApiPath {
                repo: String::new(),
                kind: Resource::Catalog,
            });
        }
        Some(ApiPath::of_rest(rest).unwrap_or_else(|| ApiPath {
            repo: rest.to_owned(),
            kind: Resource::Other,
        }))
    }

    /// A resource of a repository, read from the right; `None` for anything else.
    fn of_rest(rest: &str) -> Option<ApiPath> {
        // An upload starts at `…/blobs/uploads/` (the trailing slash is the usual form).
        let trimmed = rest.strip_suffix('/').unwrap_or(rest);
        let segments: Vec<&str> = trimmed.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let n = segments.len();
        let at = |i: usize| n.checked_sub(i).map(|i| segments[i]);
        let slash = trimmed.len() != rest.len();
        let (kind, resource_segments) = match (at(3), at(2), at(1)) {
            (_, Some("blobs"), Some("uploads")) => (Resource::Upload(None), 2),
            _ if slash => return None,
            (Some("blobs"), Some("uploads"), Some(id)) => {
                (Resource::Upload(Some(id.to_owned())), 3)
            }
            (_, Some("tags"), Some("list")) => (Resource::Tags, 2),
            (_, Some("blobs"), Some(digest)) => (Resource::Blob(digest.to_owned()), 2),
            (_, Some("manifests"), Some(reference)) => {
                (Resource::Manifest(reference.to_owned()), 2)
            }
            (_, Some("referrers"), Some(digest)) => (Resource::Referrers(digest.to_owned()), 2),
            _ => return None,
        };
        let repo = segments.get(..n.checked_sub(resource_segments)?)?;
        if repo.is_empty() {
            return None;
        }
        Some(ApiPath {
            repo: repo.join("/"),
            kind,
        })
    }

    /// The repository the path names, if it names one.
    pub fn repository(&self) -> Option<&str> {
        match self.kind {
            Resource::Base | Resource::Catalog | Resource::Other => None,
            _ => Some(&self.repo),
        }
    }

    /// The scope the registry asks for on `method` of this path, for a challenge regrelay writes
    /// itself or a token it mints: `repository:<repo>:<actions>` (GET/HEAD `pull`,
    /// POST/PUT/PATCH `pull,push`, DELETE `delete`); `None` when the path names no repository.
    pub fn scope(&self, method: &Method) -> Option<String> {
        let repo = self.repository()?;
        let actions = match *method {
            Method::GET | Method::HEAD => "pull",
            Method::DELETE => "delete",
            _ => "pull,push",
        };
        Some(format!("repository:{repo}:{actions}"))
    }

    /// True for an upload (`…/blobs/uploads/…`).
    pub fn is_upload(&self) -> bool {
        matches!(self.kind, Resource::Upload(_))
    }

    /// The metrics label of the path: a fixed set, never a repository name.
    pub fn class(&self) -> &'static str {
        match self.kind {
            Resource::Base => "base",
            Resource::Catalog => "catalog",
            Resource::Tags => "tags",
            Resource::Referrers(_) => "referrers",
            Resource::Blob(_) => "blob",
            Resource::Manifest(_) => "manifest",
            Resource::Upload(_) => "upload",
            Resource::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123";

    fn path(repo: &str, kind: Resource) -> Option<ApiPath> {
        Some(ApiPath {
            repo: repo.to_owned(),
            kind,
        })
    }

    #[test]
    fn table() {
        use Resource::*;
        let cases = [
            ("/v2/", path("", Base)),
            ("/v2", path("", Base)),
            ("/v2/_catalog", path("", Catalog)),
            ("/v2/g/p/tags/list", path("g/p", Tags)),
            ("/v2/g/p/manifests/v1", path("g/p", Manifest("v1".into()))),
            ("/v2/a/b/c/blobs/sha256:0123", path("a/b/c", Blob(D.into()))),
            ("/v2/g/p/blobs/uploads/", path("g/p", Upload(None))),
            ("/v2/g/p/blobs/uploads", path("g/p", Upload(None))),
            (
                "/v2/g/p/blobs/uploads/u-1",
                path("g/p", Upload(Some("u-1".into()))),
            ),
            (
                "/v2/g/p/referrers/sha256:0123",
                path("g/p", Referrers(D.into())),
            ),
            // Repositories whose segments are route words: the resource is at the right.
            (
                "/v2/team/blobs/app/manifests/sha256:0123",
                path("team/blobs/app", Manifest(D.into())),
            ),
            (
                "/v2/team/blobs/app/blobs/sha256:0123",
                path("team/blobs/app", Blob(D.into())),
            ),
            (
                "/v2/team/manifests/app/blobs/uploads/",
                path("team/manifests/app", Upload(None)),
            ),
            (
                "/v2/g/uploads/blobs/uploads/u",
                path("g/uploads", Upload(Some("u".into()))),
            ),
            ("/v2/blobs/blobs/sha256:0123", path("blobs", Blob(D.into()))),
            (
                "/v2/manifests/manifests/v1",
                path("manifests", Manifest("v1".into())),
            ),
            ("/v2/tags/tags/list", path("tags", Tags)),
            (
                "/v2/g/blobs/manifests/v1",
                path("g/blobs", Manifest("v1".into())),
            ),
            (
                "/v2/g/p/blobs/uploads/blobs/sha256:0123",
                path("g/p/blobs/uploads", Blob(D.into())),
            ),
            // Nothing a repository's: forwarded, read no further.
            ("/v2/manifests/x", path("manifests/x", Other)),
            ("/v2/blobs/uploads/", path("blobs/uploads/", Other)),
            ("/v2/g/p", path("g/p", Other)),
            ("/v2/g/p/manifests/", path("g/p/manifests/", Other)),
            ("/v2/g/p/manifests/v1/", path("g/p/manifests/v1/", Other)),
            ("/v2//blobs", path("/blobs", Other)),
            (
                "/v2/a//b/blobs/sha256:00",
                path("a//b/blobs/sha256:00", Other),
            ),
            ("/jwt/auth", None),
            ("/v22/x", None),
        ];
        for (p, want) in cases {
            assert_eq!(ApiPath::parse(p), want, "{p}");
        }
    }

    #[test]
    fn scopes_follow_the_repository() {
        let scope = |m: Method, p: &str| ApiPath::parse(p).and_then(|a| a.scope(&m));
        let cases: &[(Method, &str, Option<&str>)] = &[
            (Method::GET, "/v2/", None),
            (Method::GET, "/v2/_catalog", None),
            (
                Method::GET,
                "/v2/g/p/manifests/v1",
                Some("repository:g/p:pull"),
            ),
            (
                Method::HEAD,
                "/v2/a/b/c/blobs/sha256:00",
                Some("repository:a/b/c:pull"),
            ),
            (
                Method::PATCH,
                "/v2/g/p/blobs/uploads/u",
                Some("repository:g/p:pull,push"),
            ),
            (
                Method::PUT,
                "/v2/g/blobs/manifests/v1",
                Some("repository:g/blobs:pull,push"),
            ),
            (
                Method::DELETE,
                "/v2/g/p/manifests/sha256:0",
                Some("repository:g/p:delete"),
            ),
            (
                Method::GET,
                "/v2/g/p/tags/list",
                Some("repository:g/p:pull"),
            ),
            (
                Method::GET,
                "/v2/team/blobs/app/manifests/sha256:0",
                Some("repository:team/blobs/app:pull"),
            ),
            (Method::GET, "/v2/manifests/x", None),
            // Found by fuzzing (fuzz/regressions/scope-empty-repository-name).
            (Method::GET, "/v2//blobs", None),
            (Method::GET, "/v2/a//b/blobs/sha256:00", None),
        ];
        for (m, p, want) in cases {
            assert_eq!(scope(m.clone(), p).as_deref(), *want, "{m} {p}");
        }
    }

    #[test]
    fn classes_are_a_fixed_set_and_never_a_name() {
        let cases = [
            ("/v2/", "base"),
            ("/v2/_catalog", "catalog"),
            ("/v2/g/p/blobs/uploads/", "upload"),
            ("/v2/g/p/blobs/uploads/u", "upload"),
            ("/v2/g/p/blobs/sha256:0", "blob"),
            ("/v2/g/p/manifests/v1", "manifest"),
            ("/v2/team/blobs/app/manifests/sha256:0", "manifest"),
            ("/v2/team/manifests/app/blobs/sha256:0", "blob"),
            ("/v2/g/p/tags/list", "tags"),
            ("/v2/g/p/referrers/sha256:0", "referrers"),
            ("/v2/g/p/unknown", "other"),
        ];
        for (p, class) in cases {
            assert_eq!(ApiPath::parse(p).unwrap().class(), class, "{p}");
        }
    }
}
