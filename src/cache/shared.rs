//! The cache replicas share on S3-compatible object storage (`--cache-store`, issue 26).
//!
//! # In the bucket
//! ```text
//! <prefix>blobs/sha256/<64 hex>    a blob or manifest, by digest; written only once verified
//! <prefix>leases/sha256/<64 hex>   "<replica> <nonce> <renewal>": a replica is fetching it
//! ```
//! Each replica keeps its `--cache-dir` as the local tier: it fills there as before (single
//! flight within the replica, digest verified), and the bucket sits behind it. A local miss asks
//! the bucket ([`Shared::claim`]): a stored object is read from it (the local fill verifies it
//! again); else this replica takes the digest's lease, fetches from the upstream, and uploads the
//! verified file once committed ([`Shared::upload`], multipart above [`PART_BYTES`]), holding the
//! lease until the object is in. Another replica that finds the lease taken waits for the object
//! instead of fetching it too, for at most `--cache-s3-wait-secs` (its client gets no byte
//! meanwhile, and Kubernetes' CRI gives up on a pull without progress after 5 minutes), then
//! fetches it itself. So a blob crosses from the upstream once for all replicas, and a
//! replica killed mid-fill leaves nothing under the digest: the object is written only whole,
//! from a file whose digest was checked.
//!
//! # The lease, without conditional writes
//! Not every S3-compatible store honours `If-None-Match: *` on `PUT` (Garage 2.5 answers `200`
//! over an existing key), so the lease is taken by write, settle, read back: a replica that
//! finds no lease (or one it watched go unrenewed) writes its own, waits a settle time (three
//! times what its read and write took, at least [`MIN_SETTLE`]), and reads the lease again; it
//! holds the lease only if what it reads is what it wrote. Two replicas racing within the settle
//! time both read the later write, so one of them holds it. The holder rewrites the lease every
//! third of `--cache-s3-lease-secs`; a waiter that sees it unchanged for that long (by its own
//! clock, so skewed clocks do not matter) takes it over the same way. The lease saves upstream
//! fetches; correctness never rests on it: the objects are content-addressed and verified, so
//! the worst a lost race costs is one more upstream fetch of the same bytes.
//!
//! # Grants and secrets
//! Grants stay per replica and never go into the bucket: a client is served an object from the
//! bucket only after the upstream said yes to its own token, as for local hits. The
//! credentials sign each request as a presigned URL ([`rusty_s3`]) sent over regrelay's own
//! client; the URLs are never logged, and [`Shared`] prints no credential. `--cache-redirect`
//! hands a granted client a URL that lives [`REDIRECT_SECS`] seconds.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::{DashMap, DashSet};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use rusty_s3::actions::list_objects_v2::ListObjectsContent;
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::store::random_name;
use super::{Digest, Hit, Writer};
use crate::body::{self, ProxyBody};
use crate::config::SharedConfig;
use crate::upstream::{Upstream, UpstreamBody};

/// How long a presigned URL for regrelay's own request lives (it is used at once).
const SIGNED_SECS: u64 = 300;

/// How long a `--cache-redirect` URL lives: the client follows it at once.
pub const REDIRECT_SECS: u64 = 20;

/// Objects larger than this are uploaded in parts of this size (S3 allows at most 5 GiB in
/// one `PUT` and 10,000 parts: this reaches 640 GiB).
pub const PART_BYTES: u64 = 64 << 20;

/// The shortest settle time of a lease write.
pub const MIN_SETTLE: Duration = Duration::from_millis(50);

/// The longest settle time of a lease write.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// Rounds of "stored? else lease, else wait" before a replica fetches without a lease.
const MAX_ROUNDS: usize = 8;

/// The largest small answer read (a lease, an error, a multipart answer).
const SMALL_BODY_BYTES: usize = 64 * 1024;

/// The largest listing page read (S3 pages hold at most 1000 keys).
const LIST_PAGE_BYTES: usize = 4 << 20;

/// A replica marks a digest used at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Digests a replica remembers (when it last marked each, which it saw in the bucket) before
/// it forgets.
const MAX_TOUCHED: usize = 100_000;

/// An S3 `LastModified` (RFC 3339).
fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Why the bucket could not be used. Never carries a URL's query.
#[derive(Debug)]
pub struct SharedError {
    origin: String,
    problem: String,
    /// The connection's failure, for the log (names addresses).
    cause: Option<String>,
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared cache at {}: {}", self.origin, self.problem)?;
        match &self.cause {
            Some(cause) => write!(f, " ({cause})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for SharedError {}

impl SharedError {
    /// What went wrong and what to check, without the store's address (for `/-/ready`).
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

/// What the bucket holds for a digest.
#[derive(Debug, Clone)]
pub struct Stat {
    /// Its length.
    pub len: u64,
    /// The `Content-Type` it was stored with (a manifest's media type).
    pub content_type: Option<HeaderValue>,
}

/// What [`Shared::claim`] found.
pub enum Claim {
    /// The object is in the bucket.
    Stored(Stat),
    /// This replica fetches it from the upstream: upload it, then drop the lease.
    Lease(Lease),
    /// Neither after many rounds (a store that loses writes, a flapping holder), after
    /// `--cache-s3-wait-secs`, or the bucket failed: fetch without a lease.
    Unclaimed,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SharedStats {
    /// Local misses answered from the bucket.
    pub hits: u64,
    /// Objects uploaded.
    pub uploads: u64,
    /// Uploads that failed.
    pub upload_failures: u64,
    /// Claims that waited for another replica's fill.
    pub waits: u64,
    /// Leases taken over from a replica that stopped renewing.
    pub takeovers: u64,
    /// Claims that stopped waiting (`--cache-s3-wait-secs`) and fetched themselves.
    pub impatient: u64,
    /// Objects this replica evicted from the bucket.
    pub evictions: u64,
}

impl SharedStats {
    /// Each counter by its operation's name (`regrelay_cache_shared_operations_total`).
    pub fn by_operation(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("hits", self.hits),
            ("uploads", self.uploads),
            ("upload_failures", self.upload_failures),
            ("waits", self.waits),
            ("takeovers", self.takeovers),
            ("impatient", self.impatient),
            ("evictions", self.evictions),
        ]
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    uploads: AtomicU64,
    upload_failures: AtomicU64,
    waits: AtomicU64,
    takeovers: AtomicU64,
    impatient: AtomicU64,
    evictions: AtomicU64,
}

/// The shared bucket: where objects are, how to sign for them, the client that asks, and this
/// replica's name in leases.
pub struct Shared {
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    client: Upstream,
    origin: String,
    replica: String,
    lease: Duration,
    /// How long a claim waits for other replicas' fills in all.
    patience: Duration,
    redirect: bool,
    /// Digests this replica saw in the bucket (for `--cache-redirect`).
    known: DashSet<Digest>,
    /// The bucket's size bound.
    max_bytes: u64,
    /// When this replica last marked each digest used.
    touched: DashMap<Digest, Instant>,
    counters: Counters,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("bucket", &self.bucket.name())
            .field("prefix", &self.prefix)
            .field("origin", &self.origin)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The bucket of `cfg`, asked through `client` (a client for the endpoint's origin).
    pub fn new(cfg: &SharedConfig, client: Upstream) -> Result<Shared, String> {
        let endpoint: url::Url = cfg
            .endpoint
            .parse()
            .map_err(|e| format!("{}: {e}", cfg.endpoint))?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .map_err(|e| format!("{}: {e}", cfg.endpoint))?;
        let credentials = match &cfg.session_token {
            Some(token) => Credentials::new_with_token(&cfg.key_id, &cfg.secret, token),
            None => Credentials::new(&cfg.key_id, &cfg.secret),
        };
        Ok(Shared {
            bucket,
            credentials,
            prefix: cfg.prefix.clone(),
            client,
            origin: cfg.endpoint.clone(),
            replica: random_name(),
            lease: cfg.lease,
            patience: cfg.wait,
            redirect: cfg.redirect,
            known: DashSet::new(),
            max_bytes: cfg.max_bytes,
            touched: DashMap::new(),
            counters: Counters::default(),
        })
    }

    /// `--cache-redirect` is on.
    pub fn redirects(&self) -> bool {
        self.redirect
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> SharedStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SharedStats {
            hits: get(&c.hits),
            uploads: get(&c.uploads),
            upload_failures: get(&c.upload_failures),
            waits: get(&c.waits),
            takeovers: get(&c.takeovers),
            impatient: get(&c.impatient),
            evictions: get(&c.evictions),
        }
    }

    fn object_key(&self, digest: &Digest) -> String {
        format!("{}blobs/sha256/{}", self.prefix, digest.hex())
    }

    fn lease_key(&self, digest: &Digest) -> String {
        format!("{}leases/sha256/{}", self.prefix, digest.hex())
    }

    fn access_key(&self, hex: &str) -> String {
        format!("{}access/sha256/{hex}", self.prefix)
    }

    fn error(&self, problem: impl Into<String>) -> SharedError {
        SharedError {
            origin: self.origin.clone(),
            problem: problem.into(),
            cause: None,
        }
    }

    /// What an unexpected status means, with the fix.
    fn refused(&self, what: &str, status: StatusCode) -> SharedError {
        let hint = match status.as_u16() {
            403 => {
                "check the credentials, the region and that the key may read, write and \
                    delete under the prefix (see the README's IAM policy)"
            }
            404 => "check that the bucket exists",
            301 | 307 => "the bucket is in another region: set --cache-s3-region",
            _ => "see the object store's log",
        };
        self.error(format!("{what} answered {status}; {hint}"))
    }

    /// One signed request: `url` is presigned (its query is a credential: never logged).
    async fn send(
        &self,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: ProxyBody,
    ) -> Result<Response<UpstreamBody>, SharedError> {
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|_| self.error("a signed URL did not parse"))?;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        self.client.send(req).await.map_err(|e| SharedError {
            cause: Some(e.chain()),
            ..self.error(format!(
                "{}; check that regrelay can reach it (network, DNS, TLS trust)",
                e.public_message()
            ))
        })
    }

    /// `action`'s presigned URL, for a request made at once.
    fn sign<'a>(&self, action: &impl S3Action<'a>) -> url::Url {
        action.sign(Duration::from_secs(SIGNED_SECS))
    }

    /// A request without a body.
    async fn bodiless(
        &self,
        method: Method,
        url: url::Url,
    ) -> Result<Response<UpstreamBody>, SharedError> {
        self.send(method, url, HeaderMap::new(), body::empty())
            .await
    }

    /// A request with `bytes` as its body.
    async fn send_bytes(
        &self,
        method: Method,
        url: url::Url,
        bytes: impl Into<Bytes>,
    ) -> Result<Response<UpstreamBody>, SharedError> {
        let bytes = bytes.into();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        self.send(method, url, headers, body::full(bytes)).await
    }

    /// An answer's body, at most `limit` bytes (an error's, a lease, a multipart answer, a
    /// listing page).
    async fn read(&self, resp: Response<UpstreamBody>, limit: usize) -> Result<Bytes, SharedError> {
        Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| self.error(format!("reading an answer: {e}")))
    }

    /// Readiness: the bucket answers, with this key, a `HEAD` of a key under the prefix that
    /// is never written (`404` is the answer of a bucket that works).
    pub async fn probe(&self) -> Result<(), SharedError> {
        let key = format!("{}leases/probe", self.prefix);
        let url = self.sign(&self.bucket.head_object(Some(&self.credentials), &key));
        let resp = self.bodiless(Method::HEAD, url).await?;
        match resp.status() {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            status => Err(self.refused("a HEAD under the prefix", status)),
        }
    }

    /// The object of `digest`, if the bucket holds it.
    pub async fn stat(&self, digest: &Digest) -> Result<Option<Stat>, SharedError> {
        let key = self.object_key(digest);
        let url = self.sign(&self.bucket.head_object(Some(&self.credentials), &key));
        let resp = self.bodiless(Method::HEAD, url).await?;
        match resp.status() {
            StatusCode::OK => {
                let len = crate::upload::content_length(resp.headers())
                    .ok_or_else(|| self.error("a HEAD answered without Content-Length"))?;
                self.remember(digest);
                let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
                Ok(Some(Stat { len, content_type }))
            }
            StatusCode::NOT_FOUND => {
                self.known.remove(digest);
                Ok(None)
            }
            status => Err(self.refused("a HEAD of an object", status)),
        }
    }

    /// Reads the object of `digest` (`None`: not there, evicted since it was seen).
    pub async fn get(
        &self,
        digest: &Digest,
    ) -> Result<Option<Response<UpstreamBody>>, SharedError> {
        let key = self.object_key(digest);
        let url = self.sign(&self.bucket.get_object(Some(&self.credentials), &key));
        let resp = self.bodiless(Method::GET, url).await?;
        match resp.status() {
            StatusCode::OK => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(resp))
            }
            StatusCode::NOT_FOUND => {
                self.known.remove(digest);
                Ok(None)
            }
            status => Err(self.refused("a GET of an object", status)),
        }
    }

    /// Notes that the bucket holds `digest` (bounded: past [`MAX_TOUCHED`] digests the notes
    /// start over, and a redirect waits for the next `HEAD`).
    fn remember(&self, digest: &Digest) {
        if self.known.len() >= MAX_TOUCHED {
            self.known.clear();
        }
        self.known.insert(*digest);
    }

    /// A URL a client may `GET` the object of `digest` with, for [`REDIRECT_SECS`] seconds;
    /// `None` when this replica has not seen it in the bucket. A credential: never log it.
    pub fn presigned(&self, digest: &Digest) -> Option<HeaderValue> {
        if !self.known.contains(digest) {
            return None;
        }
        let key = self.object_key(digest);
        let url = (self.bucket.get_object(Some(&self.credentials), &key))
            .sign(Duration::from_secs(REDIRECT_SECS));
        let mut value = HeaderValue::from_str(url.as_str()).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Uploads the committed entry `hit` (skipped when the bucket has it already), with
    /// `content_type` (a manifest's media type).
    pub async fn upload(
        &self,
        hit: &Hit,
        content_type: Option<HeaderValue>,
    ) -> Result<(), SharedError> {
        if self.stat(&hit.digest).await?.is_some() {
            return Ok(());
        }
        let done = match hit.len <= PART_BYTES {
            true => self.put_whole(hit, content_type.as_ref()).await,
            false => self.put_parts(hit, content_type.as_ref()).await,
        };
        let counter = match &done {
            Ok(()) => &self.counters.uploads,
            Err(_) => &self.counters.upload_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if done.is_ok() {
            self.remember(&hit.digest);
            tracing::debug!(digest = %hit.digest, len = hit.len, "shared cache: uploaded");
        }
        done
    }

    /// A body of bytes `start..=end` of `hit`, with its `Content-Length`.
    async fn file_body(
        &self,
        hit: &Hit,
        range: Option<(u64, u64)>,
    ) -> Result<(ProxyBody, u64), SharedError> {
        let len = range.map_or(hit.len, |(s, e)| e - s + 1);
        let body = (hit.body(range).await)
            .map_err(|e| self.error(format!("reading the local copy to upload: {e}")))?;
        Ok((body.map_err(Into::into).boxed_unsync(), len))
    }

    /// `action`'s presigned URL with `content_type` (a manifest's media type) among its signed
    /// headers, and the headers to send with it.
    fn sign_typed<'a>(
        &self,
        mut action: impl S3Action<'a>,
        content_type: Option<&HeaderValue>,
    ) -> (url::Url, HeaderMap) {
        let mut headers = HeaderMap::new();
        if let Some((value, text)) = content_type.and_then(|t| Some((t, t.to_str().ok()?))) {
            action.headers_mut().insert("content-type", text.to_owned());
            headers.insert(header::CONTENT_TYPE, value.clone());
        }
        (self.sign(&action), headers)
    }

    async fn put_whole(
        &self,
        hit: &Hit,
        content_type: Option<&HeaderValue>,
    ) -> Result<(), SharedError> {
        let key = self.object_key(&hit.digest);
        let put = self.bucket.put_object(Some(&self.credentials), &key);
        let (url, mut headers) = self.sign_typed(put, content_type);
        let (body, len) = self.file_body(hit, None).await?;
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let resp = self.send(Method::PUT, url, headers, body).await?;
        match resp.status().is_success() {
            true => Ok(()),
            false => Err(self.refused("a PUT of an object", resp.status())),
        }
    }

    async fn put_parts(
        &self,
        hit: &Hit,
        content_type: Option<&HeaderValue>,
    ) -> Result<(), SharedError> {
        let key = self.object_key(&hit.digest);
        let create = (self.bucket).create_multipart_upload(Some(&self.credentials), &key);
        let (url, headers) = self.sign_typed(create, content_type);
        let resp = self.send(Method::POST, url, headers, body::empty()).await?;
        if !resp.status().is_success() {
            return Err(self.refused("starting a multipart upload", resp.status()));
        }
        let answer = self.read(resp, SMALL_BODY_BYTES).await?;
        let created = rusty_s3::actions::CreateMultipartUpload::parse_response(&answer)
            .map_err(|e| self.error(format!("a multipart upload's answer: {e}")))?;
        let upload_id = created.upload_id();
        let parts = self.put_each_part(hit, &key, upload_id).await;
        let completed = match parts {
            Ok(etags) => self.complete(&key, upload_id, &etags).await,
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let abort =
                (self.bucket).abort_multipart_upload(Some(&self.credentials), &key, upload_id);
            let url = self.sign(&abort);
            let _ = self.bodiless(Method::DELETE, url).await;
        }
        completed
    }

    async fn put_each_part(
        &self,
        hit: &Hit,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<String>, SharedError> {
        let mut etags = Vec::new();
        let mut start = 0;
        while start < hit.len {
            let end = (start + PART_BYTES).min(hit.len) - 1;
            let number =
                u16::try_from(etags.len() + 1).map_err(|_| self.error("more than 65535 parts"))?;
            let part = self
                .bucket
                .upload_part(Some(&self.credentials), key, number, upload_id);
            let url = self.sign(&part);
            let (body, len) = self.file_body(hit, Some((start, end))).await?;
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            let resp = self.send(Method::PUT, url, headers, body).await?;
            if !resp.status().is_success() {
                return Err(self.refused("a PUT of a part", resp.status()));
            }
            let etag = (resp.headers().get(header::ETAG))
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.error("a part's answer had no ETag"))?;
            etags.push(etag.to_owned());
            start = end + 1;
        }
        Ok(etags)
    }

    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), SharedError> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = self.sign(&action);
        let resp = self.send_bytes(Method::POST, url, action.body()).await?;
        let status = resp.status();
        // S3 may answer 200 with an error in the body when the completion fails late.
        let answer = self.read(resp, SMALL_BODY_BYTES).await?;
        if !status.is_success() || answer.windows(7).any(|w| w == b"<Error>") {
            return Err(self.refused("completing a multipart upload", status));
        }
        Ok(())
    }

    /// The lease of `digest` as it reads now, if any.
    async fn read_lease(&self, digest: &Digest) -> Result<Option<String>, SharedError> {
        let key = self.lease_key(digest);
        let url = self.sign(&self.bucket.get_object(Some(&self.credentials), &key));
        let resp = self.bodiless(Method::GET, url).await?;
        match resp.status() {
            StatusCode::OK => {
                let text = self.read(resp, SMALL_BODY_BYTES).await?;
                Ok(Some(String::from_utf8_lossy(&text).into_owned()))
            }
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(self.refused("a GET of a lease", status)),
        }
    }

    async fn write_lease(&self, digest: &Digest, text: &str) -> Result<(), SharedError> {
        self.put_small(&self.lease_key(digest), text, "a PUT of a lease")
            .await
    }

    async fn delete_lease(&self, digest: &Digest) -> Result<(), SharedError> {
        self.delete(&self.lease_key(digest), "a DELETE of a lease")
            .await
    }

    async fn put_small(&self, key: &str, text: &str, what: &str) -> Result<(), SharedError> {
        let url = self.sign(&self.bucket.put_object(Some(&self.credentials), key));
        let resp = self.send_bytes(Method::PUT, url, text.to_owned()).await?;
        match resp.status().is_success() {
            true => Ok(()),
            false => Err(self.refused(what, resp.status())),
        }
    }

    async fn delete(&self, key: &str, what: &str) -> Result<(), SharedError> {
        let url = self.sign(&self.bucket.delete_object(Some(&self.credentials), key));
        let resp = self.bodiless(Method::DELETE, url).await?;
        match resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            true => Ok(()),
            false => Err(self.refused(what, resp.status())),
        }
    }

    /// Every object under `under` (all pages).
    async fn list(&self, under: &str) -> Result<Vec<ListObjectsContent>, SharedError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            action.with_prefix(under);
            if let Some(token) = &next {
                action.with_continuation_token(token.clone());
            }
            let url = self.sign(&action);
            let resp = self.bodiless(Method::GET, url).await?;
            if !resp.status().is_success() {
                return Err(self.refused("a listing", resp.status()));
            }
            let page = self.read(resp, LIST_PAGE_BYTES).await?;
            let page = ListObjectsV2::parse_response(&page)
                .map_err(|e| self.error(format!("a listing's answer: {e}")))?;
            out.extend(page.contents);
            match page.next_continuation_token {
                Some(token) if !token.is_empty() => next = Some(token),
                _ => return Ok(out),
            }
        }
    }

    /// Marks `digest` used now, for eviction across replicas: an empty object under
    /// `access/`, whose `LastModified` is the last use any replica marked. At most once per
    /// [`TOUCH_EVERY`] per replica, in the background.
    pub fn touch(self: &Arc<Self>, digest: &Digest) {
        let now = Instant::now();
        if self
            .touched
            .get(digest)
            .is_some_and(|t| now - *t < TOUCH_EVERY)
        {
            return;
        }
        if self.touched.len() >= MAX_TOUCHED {
            self.touched.retain(|_, t| now - *t < TOUCH_EVERY);
        }
        self.touched.insert(*digest, now);
        let (shared, key) = (self.clone(), self.access_key(&digest.hex()));
        tokio::spawn(async move {
            if let Err(e) = shared.put_small(&key, "", "a PUT of an access mark").await {
                tracing::debug!(error = %e, "shared cache: marking a use");
            }
        });
    }

    /// Evicts the objects used least recently (by any replica: the later of an object's own
    /// `LastModified` and its access mark's) until the bucket is within `--cache-store-max-bytes`.
    /// Replicas may sweep at once: deletes are idempotent, and they pick the same victims.
    pub async fn sweep(&self) -> Result<u64, SharedError> {
        let blobs = self.list(&format!("{}blobs/sha256/", self.prefix)).await?;
        let total: u64 = blobs.iter().map(|o| o.size).sum();
        if total <= self.max_bytes {
            return Ok(0);
        }
        let marks = self.list(&format!("{}access/sha256/", self.prefix)).await?;
        // Listings name keys percent-encoded (rusty-s3 asks `encoding-type=url`).
        let hex = |key: &str| {
            let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            key.rsplit('/').next().unwrap_or_default().to_owned()
        };
        let used: std::collections::HashMap<String, OffsetDateTime> = marks
            .iter()
            .filter_map(|o| Some((hex(&o.key), parse_time(&o.last_modified)?)))
            .collect();
        let mut order: Vec<(OffsetDateTime, String, u64)> = blobs
            .iter()
            .map(|o| {
                let name = hex(&o.key);
                // An unreadable date counts as now: never evicted for it.
                let own = parse_time(&o.last_modified).unwrap_or_else(OffsetDateTime::now_utc);
                let last = used.get(&name).map_or(own, |m| own.max(*m));
                (last, name, o.size)
            })
            .collect();
        order.sort();
        let mut over = total - self.max_bytes;
        let mut evicted = 0;
        for (_, name, size) in order {
            if over == 0 {
                break;
            }
            let key = format!("{}blobs/sha256/{name}", self.prefix);
            self.delete(&key, "a DELETE of an evicted object").await?;
            self.delete(&self.access_key(&name), "a DELETE of an access mark")
                .await?;
            if let Some(digest) = Digest::from_hex(&name) {
                self.known.remove(&digest);
            }
            over = over.saturating_sub(size);
            evicted += 1;
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(digest = %name, size, "shared cache: evicted");
        }
        Ok(evicted)
    }

    /// Before this replica fetches `digest` from the upstream: the object when the bucket has
    /// it (or gets it from the replica that holds the lease), else the lease, so that this
    /// replica is the one that fetches it. See the module docs. A bucket that fails is logged
    /// and [`Claim::Unclaimed`]: the bucket never fails a pull.
    pub async fn claim(self: &Arc<Self>, digest: &Digest) -> Claim {
        self.try_claim(digest).await.unwrap_or_else(|err| {
            tracing::warn!(%digest, error = %err, "shared cache unusable; fetching from the upstream");
            Claim::Unclaimed
        })
    }

    async fn try_claim(self: &Arc<Self>, digest: &Digest) -> Result<Claim, SharedError> {
        let mut stale: Option<String> = None;
        let until = Instant::now() + self.patience;
        for _ in 0..MAX_ROUNDS {
            if let Some(stat) = self.stat(digest).await? {
                return Ok(Claim::Stored(stat));
            }
            let seen = match self.try_lease(digest, stale.as_deref()).await? {
                Ok(lease) => return Ok(Claim::Lease(lease)),
                Err(seen) => seen,
            };
            self.counters.waits.fetch_add(1, Ordering::Relaxed);
            stale = match self.wait(digest, seen, until).await? {
                Waited::Stored(stat) => return Ok(Claim::Stored(stat)),
                Waited::TooLong => {
                    self.counters.impatient.fetch_add(1, Ordering::Relaxed);
                    let secs = self.patience.as_secs();
                    tracing::info!(%digest, secs, "shared cache: another replica's fill took longer than --cache-s3-wait-secs; fetching it here");
                    return Ok(Claim::Unclaimed);
                }
                Waited::Free => None,
                Waited::Stale(last) => Some(last),
            };
        }
        Ok(Claim::Unclaimed)
    }

    /// Write, settle, read back: `Ok(lease)` when this replica holds it, else `Err(what the
    /// lease read)`. `stale`: a lease another replica stopped renewing, which may be replaced.
    async fn try_lease(
        self: &Arc<Self>,
        digest: &Digest,
        stale: Option<&str>,
    ) -> Result<Result<Lease, String>, SharedError> {
        let started = Instant::now();
        let ours = format!("{} ", self.replica);
        if let Some(now) = self.read_lease(digest).await? {
            if !now.starts_with(&ours) && Some(now.as_str()) != stale {
                return Ok(Err(now));
            }
        }
        let name = format!("{}{}", ours, random_name());
        let text = format!("{name} 0");
        self.write_lease(digest, &text).await?;
        let settle = (started.elapsed() * 3).clamp(MIN_SETTLE, MAX_SETTLE);
        tokio::time::sleep(settle).await;
        match self.read_lease(digest).await? {
            Some(now) if now == text => {
                if stale.is_some() {
                    self.counters.takeovers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, "shared cache: another replica's fill went unrenewed; taken over");
                }
                Ok(Ok(Lease::start(self.clone(), *digest, name)))
            }
            now => Ok(Err(now.unwrap_or_default())),
        }
    }

    /// Waits while another replica holds the lease of `digest` (`seen`: the lease as last read).
    async fn wait(
        &self,
        digest: &Digest,
        seen: String,
        until: Instant,
    ) -> Result<Waited, SharedError> {
        let poll = (self.lease / 30).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let (mut last, mut since) = (seen, Instant::now());
        loop {
            tokio::time::sleep(poll).await;
            if let Some(stat) = self.stat(digest).await? {
                return Ok(Waited::Stored(stat));
            }
            if Instant::now() >= until {
                return Ok(Waited::TooLong);
            }
            match self.read_lease(digest).await? {
                None => return Ok(Waited::Free),
                Some(now) if now != last => (last, since) = (now, Instant::now()),
                Some(_) if since.elapsed() >= self.lease => return Ok(Waited::Stale(last)),
                Some(_) => {}
            }
        }
    }
}

impl Shared {
    /// Has `writer`'s entry uploaded once committed (with `content_type`, a manifest's media
    /// type), holding `lease` until the object is in; a fill that fails drops both.
    pub fn upload_when_committed(
        self: &Arc<Self>,
        writer: &mut Writer,
        content_type: Option<HeaderValue>,
        lease: Option<Lease>,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        writer.after_commit(Box::new(move |hit: &Hit| {
            let hit = hit.clone();
            rt.spawn(async move {
                let uploaded = shared.upload(&hit, content_type).await;
                drop(lease);
                if let Err(e) = uploaded {
                    tracing::warn!(digest = %hit.digest, error = %e, "shared cache: upload failed; the next replica to miss fetches it");
                    return;
                }
                // Only uploads grow the bucket: each is followed by a sweep.
                if let Err(e) = shared.sweep().await {
                    tracing::warn!(error = %e, "shared cache: eviction failed; the bucket may exceed --cache-store-max-bytes until the next upload");
                }
            });
        }));
    }
}

enum Waited {
    Stored(Stat),
    /// Longer than `--cache-s3-wait-secs` in all.
    TooLong,
    Free,
    Stale(String),
}

/// This replica's claim on fetching a digest: renewed while it lives, deleted when dropped
/// (after the upload, or when the fill failed).
pub struct Lease {
    shared: Arc<Shared>,
    digest: Digest,
    /// `<replica> <nonce>`: the lease's text up to its renewal count.
    name: String,
    renewing: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.digest)
    }
}

impl Lease {
    fn start(shared: Arc<Shared>, digest: Digest, name: String) -> Lease {
        let renewing = {
            let (shared, name) = (shared.clone(), name.clone());
            tokio::spawn(async move {
                let every = shared.lease / 3;
                for n in 1u64.. {
                    tokio::time::sleep(every).await;
                    let text = format!("{name} {n}");
                    if let Err(e) = shared.write_lease(&digest, &text).await {
                        tracing::warn!(%digest, error = %e, "shared cache: renewing a lease");
                    }
                }
            })
        };
        Lease {
            shared,
            digest,
            name,
            renewing,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
        let (shared, digest) = (self.shared.clone(), self.digest);
        let ours = format!("{} ", self.name);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let ended = match shared.read_lease(&digest).await {
                Ok(Some(now)) if now.starts_with(&ours) => shared.delete_lease(&digest).await,
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                tracing::warn!(%digest, error = %e, "shared cache: ending a lease (it expires unrenewed)");
            }
        });
    }
}
