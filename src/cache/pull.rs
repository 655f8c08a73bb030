//! The HTTP side of the pull-through cache: which requests it serves ([`Target`]), whose they are
//! ([`principal`]), `Range` headers, manifest media types, and the responses of a hit. The
//! decisions that ask the upstream (a `HEAD` or `GET` with the client's own token) are in
//! [`crate::app`], which holds the sessions and upstreams.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};

use super::shared::Shared;
use super::{CacheError, Digest, Follower, Grants, Hit, Store};
use crate::api_path::{ApiPath, Resource};
use crate::body::ProxyBody;
use crate::session::Session;

/// What kind of object a cached request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v2/<repo>/blobs/<digest>`.
    Blob,
    /// `/v2/<repo>/manifests/<digest>` (by digest only: tags always go upstream).
    Manifest,
}

/// A request the cache may serve: a `GET` or `HEAD` of a blob, or of a manifest by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The repository, as the upstream names it.
    pub repo: String,
    /// Blob or manifest.
    pub kind: Kind,
    /// The digest asked for.
    pub digest: Digest,
}

impl Target {
    /// The target of `method api` (an upstream path), or `None` for anything the cache leaves
    /// alone (tags, uploads, other methods, digests other than sha256).
    pub fn of(method: &Method, api: &ApiPath) -> Option<Target> {
        if !matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        let (kind, reference) = match &api.kind {
            Resource::Blob(digest) => (Kind::Blob, digest),
            Resource::Manifest(reference) => (Kind::Manifest, reference),
            _ => return None,
        };
        Some(Target {
            repo: api.repository()?.to_owned(),
            kind,
            digest: Digest::parse(reference).ok()?,
        })
    }
}

/// A manifest by tag (`GET`/`HEAD /v2/<repo>/manifests/<tag>`): never served from the cache
/// while the upstream answers, but remembered for `--cache-serve-stale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRef {
    /// The repository.
    pub repo: String,
    /// The tag.
    pub tag: String,
}

impl TagRef {
    /// The tag reference of `method api`, if it is one.
    pub fn of(method: &Method, api: &ApiPath) -> Option<TagRef> {
        if !matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        let (Resource::Manifest(tag), Some(repo)) = (&api.kind, api.repository()) else {
            return None;
        };
        let valid = tag.len() <= 128
            && !tag.contains(':')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        valid.then(|| TagRef {
            repo: repo.to_owned(),
            tag: tag.clone(),
        })
    }
}

impl TagRef {
    /// The manifest this tag names, by digest.
    pub fn manifest(&self, digest: Digest) -> Target {
        Target {
            repo: self.repo.clone(),
            kind: Kind::Manifest,
            digest,
        }
    }
}

/// Who is asking, as the grants know them: a hash of the credential a session carries (never
/// the credential), or `anonymous`. Two sessions of the same credential are one principal.
pub fn principal(session: &Session) -> String {
    match &session.authorization {
        None => "anonymous".to_owned(),
        Some(auth) => {
            let mut h = Sha256::new();
            h.update(b"regrelay-cache-principal\0");
            h.update(auth);
            let d = h.finalize();
            d[..16].iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// A single `bytes=START-END` / `bytes=START-` / `bytes=-SUFFIX` range, resolved against `len`
/// (inclusive bounds). `Err(())` for a range the blob cannot satisfy (416); `None` when there
/// is no `Range` header or it is one the cache does not serve (several ranges): the whole
/// object is served then, as RFC 9110 allows.
pub fn range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = spec.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    let resolved = match (start.is_empty(), end.is_empty()) {
        (true, false) => {
            let suffix: u64 = end.parse().ok()?;
            if suffix == 0 || len == 0 {
                return Some(Err(()));
            }
            (len.saturating_sub(suffix), len - 1)
        }
        (false, _) => {
            let s: u64 = start.parse().ok()?;
            let e: u64 = if end.is_empty() {
                len.saturating_sub(1)
            } else {
                end.parse().ok()?
            };
            if s >= len || e < s {
                return Some(Err(()));
            }
            (s, e.min(len - 1))
        }
        (true, true) => return None,
    };
    Some(Ok(resolved))
}

/// The store, the grants, and the media types of cached manifests.
pub struct PullCache {
    /// Content by digest.
    pub store: Store,
    /// Who may be served what.
    pub grants: Grants,
    types: DashMap<Digest, HeaderValue>,
    types_dir: PathBuf,
    tags: DashMap<String, Digest>,
    tags_dir: PathBuf,
    /// `--cache-serve-stale`.
    pub serve_stale: bool,
    /// The bucket replicas share (`--cache-store`), behind the local store.
    pub shared: Option<Arc<Shared>>,
}

impl PullCache {
    /// `Ok` when fills can be written: the directory where they start can take a file (a full
    /// disk, a directory gone or made read-only says so here, for `/-/ready`).
    pub fn usable(&self) -> Result<(), String> {
        let probe = self.store.inner.tmp.join(".ready");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("the cache directory cannot take a file: {e}"))
    }

    /// Opens (or creates) the cache in `dir`: the store in `dir`, manifest media types in
    /// `dir/types/`.
    pub fn open(dir: &Path, max_bytes: u64, serve_stale: bool) -> std::io::Result<PullCache> {
        let store = Store::open(dir, max_bytes)?;
        let (types_dir, tags_dir) = (dir.join("types"), dir.join("tags"));
        std::fs::create_dir_all(&types_dir)?;
        std::fs::create_dir_all(&tags_dir)?;
        Ok(PullCache {
            store,
            grants: Grants::default(),
            types: DashMap::new(),
            types_dir,
            tags: DashMap::new(),
            tags_dir,
            serve_stale,
            shared: None,
        })
    }

    /// Remembers which digest a tag named when the upstream last answered.
    pub fn remember_tag(&self, upstream: &str, tag: &TagRef, digest: &Digest) {
        let key = tag_key(upstream, tag);
        if self.tags.get(&key).is_some_and(|d| *d == *digest) {
            return;
        }
        let _ = std::fs::write(self.tags_dir.join(file_name(&key)), digest.to_string());
        self.tags.insert(key, *digest);
    }

    /// The digest a tag named when the upstream last answered, if known.
    pub fn tag(&self, upstream: &str, tag: &TagRef) -> Option<Digest> {
        let key = tag_key(upstream, tag);
        if let Some(d) = self.tags.get(&key) {
            return Some(*d);
        }
        let raw = std::fs::read_to_string(self.tags_dir.join(file_name(&key))).ok()?;
        let d = Digest::parse(raw.trim()).ok()?;
        self.tags.insert(key, d);
        Some(d)
    }

    /// Remembers the media type a manifest was served with.
    pub fn set_media_type(&self, digest: &Digest, value: &HeaderValue) {
        if self.types.get(digest).is_some_and(|v| *v == *value) {
            return;
        }
        // Best effort: without the file a manifest hit after a restart goes upstream.
        let _ = std::fs::write(self.types_dir.join(digest.hex()), value.as_bytes());
        self.types.insert(*digest, value.clone());
    }

    /// The media type a manifest was served with, if known.
    pub fn media_type(&self, digest: &Digest) -> Option<HeaderValue> {
        if let Some(v) = self.types.get(digest) {
            return Some(v.clone());
        }
        let raw = std::fs::read(self.types_dir.join(digest.hex())).ok()?;
        let v = HeaderValue::from_bytes(&raw).ok()?;
        self.types.insert(*digest, v.clone());
        Some(v)
    }

    /// The answer for a hit: the whole object, or one range of it; `Ok(None)` when the object
    /// cannot be served from here after all (a manifest whose media type is unknown).
    pub async fn hit_response(
        &self,
        hit: &Hit,
        target: &Target,
        head: bool,
        headers: &HeaderMap,
    ) -> Result<Option<Response<ProxyBody>>, CacheError> {
        let content_type = match target.kind {
            Kind::Blob => HeaderValue::from_static("application/octet-stream"),
            Kind::Manifest => match self.media_type(&target.digest) {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        let asked = range(headers, hit.len);
        let mut resp = Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header("docker-content-digest", target.digest.to_string())
            .header(header::ETAG, format!("\"{}\"", target.digest))
            .header(header::ACCEPT_RANGES, "bytes")
            .header("x-regrelay-cache", "hit");
        let (status, span, body_range) = match asked {
            Some(Err(())) => {
                let resp = resp
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{}", hit.len))
                    .body(crate::body::empty())
                    .expect("static headers");
                return Ok(Some(resp));
            }
            Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, e - s + 1, Some((s, e))),
            None => (StatusCode::OK, hit.len, None),
        };
        if let Some((s, e)) = body_range {
            resp = resp.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{}", hit.len));
        }
        let body = if head {
            crate::body::empty()
        } else {
            hit.body(body_range)
                .await?
                .map_err(Into::into)
                .boxed_unsync()
        };
        let resp = resp
            .status(status)
            .header(header::CONTENT_LENGTH, span)
            .body(body)
            .expect("valid headers");
        Ok(Some(resp))
    }
}

impl PullCache {
    /// A `206` of bytes `start..=end` of a blob of `len` bytes being filled, each byte sent once
    /// the fill has written it ([`Follower::range_body`]).
    pub fn range_response(
        &self,
        follower: Follower,
        target: &Target,
        len: u64,
        (start, end): (u64, u64),
    ) -> Response<ProxyBody> {
        Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header("docker-content-digest", target.digest.to_string())
            .header(header::ETAG, format!("\"{}\"", target.digest))
            .header(header::ACCEPT_RANGES, "bytes")
            .header("x-regrelay-cache", "follow")
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
            .header(header::CONTENT_LENGTH, end - start + 1)
            .body(boxed(follower.range_body(start, end)))
            .expect("valid headers")
    }
}

fn tag_key(upstream: &str, tag: &TagRef) -> String {
    format!("{upstream}\0{}\0{}", tag.repo, tag.tag)
}

/// A file name for a key (never built from the client's string itself).
fn file_name(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A body of `Bytes` frames as a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::error::BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Kind as SessionKind;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn api(path: impl AsRef<str>) -> ApiPath {
        ApiPath::parse(path.as_ref()).unwrap()
    }

    #[test]
    fn targets_are_blobs_and_manifests_by_digest_only() {
        let blob = Target::of(&Method::GET, &api(format!("/v2/g/p/app/blobs/{D}"))).unwrap();
        assert_eq!((blob.repo.as_str(), blob.kind), ("g/p/app", Kind::Blob));
        let m = Target::of(&Method::HEAD, &api(format!("/v2/g/app/manifests/{D}"))).unwrap();
        assert_eq!(m.kind, Kind::Manifest);
        // A repository with a route word in its name (issue 22).
        let m = Target::of(
            &Method::GET,
            &api(format!("/v2/team/blobs/app/manifests/{D}")),
        )
        .unwrap();
        assert_eq!(
            (m.repo.as_str(), m.kind),
            ("team/blobs/app", Kind::Manifest)
        );
        for (method, path) in [
            (Method::GET, "/v2/g/app/manifests/latest".to_owned()),
            (Method::PUT, format!("/v2/g/app/blobs/{D}")),
            (Method::GET, format!("/v2/g/app/blobs/uploads/{D}")),
            (Method::GET, "/v2/g/app/blobs/sha512:abcd".to_owned()),
            (Method::GET, format!("/v2//blobs/{D}")),
            (Method::GET, "/v2/g/app/tags/list".to_owned()),
        ] {
            assert_eq!(Target::of(&method, &api(&path)), None, "{method} {path}");
        }
    }

    #[test]
    fn tags_are_manifests_by_name() {
        let t = TagRef::of(&Method::GET, &api("/v2/g/app/manifests/v1.2-rc_3")).unwrap();
        assert_eq!((t.repo.as_str(), t.tag.as_str()), ("g/app", "v1.2-rc_3"));
        assert_eq!(
            TagRef::of(&Method::GET, &api(format!("/v2/g/app/manifests/{D}"))),
            None
        );
        assert_eq!(
            TagRef::of(&Method::PUT, &api("/v2/g/app/manifests/v1")),
            None
        );
        assert_eq!(
            TagRef::of(&Method::GET, &api("/v2/g/app/manifests/../x")),
            None
        );
        assert_eq!(TagRef::of(&Method::GET, &api("/v2/g/app/blobs/v1")), None);
    }

    #[test]
    fn ranges_resolve_against_the_length() {
        let at = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            range(&h, 100)
        };
        assert_eq!(at("bytes=0-9"), Some(Ok((0, 9))));
        assert_eq!(at("bytes=90-"), Some(Ok((90, 99))));
        assert_eq!(at("bytes=-10"), Some(Ok((90, 99))));
        assert_eq!(at("bytes=95-200"), Some(Ok((95, 99))));
        assert_eq!(at("bytes=100-"), Some(Err(())));
        assert_eq!(at("bytes=9-0"), Some(Err(())));
        assert_eq!(at("bytes=0-1,5-6"), None);
        assert_eq!(at("items=0-1"), None);
        assert_eq!(range(&HeaderMap::new(), 100), None);
    }

    fn session(authorization: Option<&[u8]>) -> Session {
        let life = std::time::Duration::from_secs(60);
        let auth = authorization.map(<[u8]>::to_vec);
        Session::new(
            SessionKind::Access,
            auth,
            "container_registry".into(),
            vec![],
            life,
        )
    }

    #[test]
    fn principals_hide_the_credential_and_match_across_sessions() {
        let p1 = principal(&session(Some(b"Basic YWxpY2U6cw==")));
        let p2 = principal(&session(Some(b"Basic YWxpY2U6cw==")));
        assert_eq!(p1, p2, "same credential, same principal");
        assert!(!p1.contains("YWxp"));
        assert_ne!(principal(&session(Some(b"Basic Ym9iOnM="))), p1);
        assert_eq!(principal(&session(None)), "anonymous");
    }
}
