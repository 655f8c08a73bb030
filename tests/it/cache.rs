//! The authorizing pull-through cache (`--cache-dir`): a hit goes only to a client the upstream
//! has authorized for that repository. Real registry (token auth), GitLab stand-in, real skopeo;
//! upstream requests are counted in the registry's own log.
//!
//! - Leak test: alice warms the cache with a private image; bob (no access to that project) asks
//!   for the same blob digest through regrelay, by alice's repository path and by his own, and is
//!   refused; the CNCF registry in proxy mode, asked the same by an anonymous client, serves it.
//! - A second pull by alice makes no upstream blob GET.
//! - 20 parallel cold GETs of one blob make one upstream GET, all 20 byte-identical.
//! - After a restart the warm cache still serves hits (after a HEAD re-authorizes), and a
//!   half-written file left by a killed fetch is gone.
//! - A repository named like a route (`team/blobs/app`): its manifest by digest is cached and
//!   every request is counted under what it asks for (issue 22: the path is parsed once).
//! - A tag whose manifest is cached is asked with a `HEAD` and served from the cache: 50 pulls
//!   from 5 clients make no upstream manifest `GET`; once the tag moves, the new manifest is
//!   fetched, one `GET` (issue 26).
//! - 20 random `Range` reads of one cold 256 MiB blob at once make one upstream read of it, each
//!   answered from the growing fill (issue 26: lazy-pulling snapshotters read layers so).
//! - `--cache-serve-stale`: with the registry down, a tag is answered from the cache to the
//!   client whose grant holds (marked stale), and to no one else.

use crate::support;

use std::path::Path;
use std::time::Duration;

use http_body_util::BodyExt;
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::*;

pub(crate) const ALICE: (&str, &str) = ("alice", "glpat-AliceCacheToken1234");
pub(crate) const BOB: (&str, &str) = ("bob", "glpat-BobCacheToken123456");
pub(crate) const PRIVATE: &str = "team/private";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub(crate) async fn world() -> (GitLab, Registry) {
    world_with(PRIVATE).await
}

/// alice's private project `private` and bob's own, on a registry with token auth.
async fn world_with(private: &str) -> (GitLab, Registry) {
    let pat = |(user, token): (&str, &str)| Credential::Pat {
        user: user.into(),
        token: token.into(),
        scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
    };
    let gl = gitlab()
        .credential(pat(ALICE))
        .credential(pat(BOB))
        .project(private, false, &[(ALICE.0, Role::Developer)])
        .project("bob/own", false, &[(BOB.0, Role::Developer)])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let reg = Registry::start(&gl.realm());
    (gl, reg)
}

/// Pushes `image` to `repo:v1` at `host` as `who`.
pub(crate) async fn push(image: &OciImage, host: String, repo: &str, who: (&str, &str)) {
    let (src, dest, creds) = (
        image.reference(),
        format!("docker://{host}/{repo}:v1"),
        format!("{}:{}", who.0, who.1),
    );
    let out =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
            .await
            .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Pulls `repo:v1` from `host` as `who` and compares it with `image`.
pub(crate) async fn pull(image: &OciImage, host: String, repo: &str, who: (&str, &str)) {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest, creds) = (
        format!("docker://{host}/{repo}:v1"),
        format!("oci:{}:latest", dir.path().display()),
        format!("{}:{}", who.0, who.1),
    );
    let out =
        tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
            .await
            .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_same_blobs(image, dir.path());
}

/// Requests the registry completed with `method` on `uri` (its own access log).
pub(crate) fn upstream_requests(reg: &Registry, method: &str, uri: &str) -> usize {
    reg.log
        .text()
        .lines()
        .filter(|l| l.contains("response completed"))
        .filter(|l| l.contains(&format!("http.request.method={method} ")))
        // logrus quotes a value only when it needs to (a digest's `:` does, a tag does not).
        .filter(|l| {
            l.contains(&format!("http.request.uri=\"{uri}\""))
                || l.contains(&format!("http.request.uri={uri} "))
        })
        .count()
}

/// Like [`upstream_requests`], once the registry has logged at least `n` (its log is read by
/// another thread): the count then, or after 10 s.
pub(crate) fn upstream_requests_at_least(
    reg: &Registry,
    method: &str,
    uri: &str,
    n: usize,
) -> usize {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let count = upstream_requests(reg, method, uri);
        if count >= n || std::time::Instant::now() >= end {
            return count;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET` (or `HEAD`) `path` on `base` with a Bearer token; status and body.
pub(crate) async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
    head: bool,
) -> (u16, bytes::Bytes) {
    let mut req = http::Request::builder()
        .method(if head { "HEAD" } else { "GET" })
        .uri(format!("{base}{path}"))
        .header("accept", OCI_MANIFEST);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = upstream::client()
        .request(req.body(regrelay::body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn regrelay_with_cache(reg: &Registry, dir: &Path, keys: &Path) -> Regrelay {
    regrelay_with_cache_and(reg, dir, keys, &[])
}

/// [`regrelay_with_cache`] with `more` flags.
fn regrelay_with_cache_and(reg: &Registry, dir: &Path, keys: &Path, more: &[&str]) -> Regrelay {
    let url = reg.url();
    let mut args = vec![
        "--registry",
        &url,
        "--cache-dir",
        dir.to_str().unwrap(),
        "--cache-max-bytes",
        "1073741824",
        "--session-key-file",
        keys.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    Regrelay::start(&args)
}

pub(crate) fn key_file() -> tempfile::NamedTempFile {
    use base64::Engine;
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "{}",
        base64::engine::general_purpose::STANDARD.encode([0x5cu8; 32])
    )
    .unwrap();
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_private_blob_reaches_no_one_the_upstream_did_not_authorize() {
    let (gl, reg) = world().await;
    let image = OciImage::random(181, &[2 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, len) = image.layers[0].clone();
    let blob_uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let px = regrelay_with_cache(&reg, cache.path(), keys.path());

    // Alice warms the cache; her second pull makes no upstream blob GET.
    pull(&image, px.addr.to_string(), PRIVATE, ALICE).await;
    let gets = upstream_requests(&reg, "GET", &blob_uri);
    assert_eq!(gets, 1, "{}", reg.log.text());
    pull(&image, px.addr.to_string(), PRIVATE, ALICE).await;
    assert_eq!(
        upstream_requests(&reg, "GET", &blob_uri),
        gets,
        "the second pull was served from the cache"
    );

    // Bob knows the digest. Through regrelay he gets nothing, by either path.
    let realm = format!("{}/jwt/auth", px.url());
    let bob_private =
        fetch_token(&realm, BOB.0, BOB.1, &format!("repository:{PRIVATE}:pull")).await;
    let (status, body) = get(&px.url(), &blob_uri, Some(&bob_private), false).await;
    assert!(
        matches!(status, 401 | 403 | 404),
        "bob by alice's path: {status}"
    );
    assert!(body.len() < 4096, "no blob bytes for bob");
    let bob_own = fetch_token(&realm, BOB.0, BOB.1, "repository:bob/own:pull").await;
    let (status, body) = get(
        &px.url(),
        &format!("/v2/bob/own/blobs/{layer}"),
        Some(&bob_own),
        false,
    )
    .await;
    assert!(
        matches!(status, 401 | 403 | 404),
        "bob by his own path: {status}"
    );
    assert!(body.len() < 4096);
    // Nor anonymously.
    let (status, _) = get(&px.url(), &blob_uri, None, false).await;
    assert_eq!(status, 401);

    // The CNCF registry in proxy mode, holding alice's credential, serves it to anyone.
    let mirror = Registry::start_proxy(&reg.url(), ALICE.0, ALICE.1);
    let (status, body) = get(&mirror.url(), &blob_uri, None, false).await;
    assert_eq!(
        status, 200,
        "the CNCF proxy serves the private blob anonymously"
    );
    assert_eq!(body.len(), len);
    assert_eq!(digest(&body), layer);

    let mut secrets = gl.issued();
    secrets.extend([ALICE.1.to_owned(), BOB.1.to_owned()]);
    assert_no_secrets(&px.output.text(), ALICE.0, &secrets);
}

/// Issue 22: `/v2/team/blobs/app/manifests/sha256:…` is a manifest of `team/blobs/app`, not a
/// blob of `team`: the cache keeps it (the second GET makes no upstream request) and the metrics
/// count it as a manifest. (A Developer pulls a private project: gitlab-behaviour.md's rows on
/// `/jwt/auth` scopes, as in the other tests here.)
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_named_like_a_route_is_cached_and_counted_by_what_it_asks() {
    const REPO: &str = "team/blobs/app";
    let (_gl, reg) = world_with(REPO).await;
    let image = OciImage::random(183, &[1 << 20]);
    push(&image, reg.addr.to_string(), REPO, ALICE).await;
    let (layer, _) = image.layers[0].clone();
    let manifest_uri = format!("/v2/{REPO}/manifests/{}", image.manifest_digest);
    let blob_uri = format!("/v2/{REPO}/blobs/{layer}");
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let metrics_flags = ["--metrics-listen", "127.0.0.1:0"];
    let px = regrelay_with_cache_and(&reg, cache.path(), keys.path(), &metrics_flags);
    let realm = format!("{}/jwt/auth", px.url());
    let token = fetch_token(&realm, ALICE.0, ALICE.1, &format!("repository:{REPO}:pull")).await;
    for _ in 0..2 {
        for (uri, want) in [(&manifest_uri, &image.manifest_digest), (&blob_uri, &layer)] {
            let (status, body) = get(&px.url(), uri, Some(&token), false).await;
            assert_eq!(status, 200, "{uri}\n{}", px.output.text());
            assert_eq!(&digest(&body), want, "{uri}");
        }
    }
    for uri in [&manifest_uri, &blob_uri] {
        assert_eq!(
            upstream_requests(&reg, "GET", uri),
            1,
            "the second GET of {uri} is a cache hit\n{}",
            px.output.text()
        );
    }
    let (_, _, text) = metrics::scrape(metrics::addr(&px)).await;
    let requests = |route: &str| {
        metrics::value(
            &text,
            "regrelay_requests_total",
            &[
                &format!("route=\"{route}\""),
                "method=\"GET\"",
                "status=\"200\"",
            ],
        )
    };
    assert_eq!(
        (requests("manifest"), requests("blob")),
        (2.0, 2.0),
        "{text}"
    );
}

/// Issue 26: a `GET` of a tag whose manifest is cached asks the upstream with a `HEAD` (Docker
/// Hub does not count those against its pull limit; no manifest body crosses the network) and is
/// served from the cache: 50 pulls from 5 clients make no upstream manifest `GET`; when the tag
/// has moved, the new manifest is fetched (one more).
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_tag_is_revalidated_with_a_head() {
    let (_gl, reg) = world().await;
    let image = OciImage::random(184, &[1 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let metrics_flags = ["--metrics-listen", "127.0.0.1:0"];
    let px = regrelay_with_cache_and(&reg, cache.path(), keys.path(), &metrics_flags);
    let realm = format!("{}/jwt/auth", px.url());
    let scope = format!("repository:{PRIVATE}:pull");
    let token = fetch_token(&realm, ALICE.0, ALICE.1, &scope).await;
    let tag_uri = format!("/v2/{PRIVATE}/manifests/v1");
    let (status, body) = get(&px.url(), &tag_uri, Some(&token), false).await;
    assert_eq!(
        (status, digest(&body)),
        (200, image.manifest_digest.clone())
    );
    // The fill commits in the background once the body is out: wait for it.
    let committed = format!("cache: committed digest={}", image.manifest_digest);
    let stored = px.output.wait_for(&committed, Duration::from_secs(10));
    assert!(stored.is_some(), "{}", px.output.text());
    // The proof: 50 pulls by tag from 5 clients (5 sessions, each its own login), ten
    // rounds of five at once.
    let mut clients = vec![token.clone()];
    for _ in 1..5 {
        clients.push(fetch_token(&realm, ALICE.0, ALICE.1, &scope).await);
    }
    for _ in 0..10 {
        let pulls: Vec<_> = clients
            .iter()
            .map(|t| {
                let (base, uri, t) = (px.url(), tag_uri.clone(), t.clone());
                tokio::spawn(async move { get(&base, &uri, Some(&t), false).await })
            })
            .collect();
        for p in pulls {
            let (status, again) = p.await.unwrap();
            assert_eq!(
                (status, &again),
                (200, &body),
                "the same manifest, from the cache"
            );
        }
    }
    let head = upstream_requests_at_least(&reg, "HEAD", &tag_uri, 50);
    assert_eq!(
        (upstream_requests(&reg, "GET", &tag_uri), head),
        (1, 50),
        "one GET, then a HEAD per pull\n{}",
        px.output.text()
    );
    // The tag moves: the HEAD names a manifest the cache does not hold, so it is fetched.
    let moved = OciImage::random(185, &[1 << 20]);
    push(&moved, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (status, body) = get(&px.url(), &tag_uri, Some(&token), false).await;
    assert_eq!(
        (status, digest(&body)),
        (200, moved.manifest_digest.clone())
    );
    assert_eq!(upstream_requests_at_least(&reg, "GET", &tag_uri, 2), 2);
    let (_, _, text) = metrics::scrape(metrics::addr(&px)).await;
    let avoided = metrics::value(&text, "regrelay_cache_manifest_gets_avoided_total", &[]);
    assert_eq!(avoided, 50.0, "{text}");
    // bob may not pull it: GitLab grants his session nothing there, and no cache answers him.
    let bob = fetch_token(&realm, BOB.0, BOB.1, &scope).await;
    let (status, _) = get(&px.url(), &tag_uri, Some(&bob), false).await;
    assert_eq!(status, 401);
}

/// `GET` bytes `start..=end` of `path` on `base` with a Bearer token; status and body.
pub(crate) async fn get_range(
    base: &str,
    path: &str,
    token: &str,
    (start, end): (u64, u64),
) -> (u16, Vec<u8>) {
    let req = http::Request::get(format!("{base}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("range", format!("bytes={start}-{end}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

/// Issue 26: 20 clients read ranges of one cold blob at once (as lazy-pulling snapshotters
/// do): one upstream GET of it in all, each range byte-identical, answered from the fill as it
/// grows; afterwards a whole pull of it is a hit.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_range_reads_of_a_cold_blob_make_one_upstream_read() {
    let (_gl, reg) = world().await;
    // The proof: a 256 MiB layer, 20 random ranges at once.
    let image = OciImage::random(186, &[256 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, len) = image.layers[0].clone();
    let hex = layer.strip_prefix("sha256:").unwrap();
    let content = std::fs::read(image.dir.path().join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(content.len(), len);
    let blob_uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let px = regrelay_with_cache(&reg, cache.path(), keys.path());
    let realm = format!("{}/jwt/auth", px.url());
    let scope = format!("repository:{PRIVATE}:pull");
    let token = fetch_token(&realm, ALICE.0, ALICE.1, &scope).await;
    let len = len as u64;
    let mut noise = Noise::new(26);
    let mut random = move || {
        let mut b = [0u8; 8];
        noise.fill(&mut b);
        u64::from_le_bytes(b)
    };
    let reads: Vec<_> = (0..20u64)
        .map(|i| {
            // Anywhere in the blob, up to 1 MiB long; the last one reaching its end.
            let start = random() % len;
            let end = match i {
                19 => len - 1,
                _ => (start + random() % (1 << 20)).min(len - 1),
            };
            let (base, uri, token) = (px.url(), blob_uri.clone(), token.clone());
            tokio::spawn(async move {
                (
                    (start, end),
                    get_range(&base, &uri, &token, (start, end)).await,
                )
            })
        })
        .collect();
    for read in reads {
        let ((start, end), (status, body)) = read.await.unwrap();
        assert_eq!(status, 206, "{start}-{end}\n{}", px.output.text());
        assert!(
            body == content[start as usize..=end as usize],
            "bytes {start}-{end} differ ({} bytes)",
            body.len()
        );
    }
    let committed = format!("cache: committed digest={layer}");
    let stored = px.output.wait_for(&committed, Duration::from_secs(60));
    assert!(stored.is_some(), "{}", px.output.text());
    let (status, whole) = get(&px.url(), &blob_uri, Some(&token), false).await;
    assert_eq!((status, whole.len()), (200, content.len()));
    assert_eq!(
        upstream_requests_at_least(&reg, "GET", &blob_uri, 1),
        1,
        "one upstream read for 20 ranges and a whole pull\n{}",
        px.output.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_cold_pulls_of_one_blob_make_one_upstream_fetch() {
    let (_gl, reg) = world().await;
    let image = OciImage::random(182, &[8 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, len) = image.layers[0].clone();
    let blob_uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let px = regrelay_with_cache(&reg, cache.path(), keys.path());
    let realm = format!("{}/jwt/auth", px.url());
    let token = fetch_token(
        &realm,
        ALICE.0,
        ALICE.1,
        &format!("repository:{PRIVATE}:pull"),
    )
    .await;
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let (base, uri, token) = (px.url(), blob_uri.clone(), token.clone());
            tokio::spawn(async move { get(&base, &uri, Some(&token), false).await })
        })
        .collect();
    for p in pulls {
        let (status, body) = p.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.len(), len);
        assert_eq!(digest(&body), layer, "byte-identical");
    }
    assert_eq!(
        upstream_requests(&reg, "GET", &blob_uri),
        1,
        "one upstream fetch for 20 cold pulls\n{}",
        px.output.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_cache_survives_a_restart_and_partial_files_do_not() {
    let (_gl, reg) = world().await;
    let image = OciImage::random(183, &[1 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, _) = image.layers[0].clone();
    let blob_uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let px = regrelay_with_cache(&reg, cache.path(), keys.path());
    pull(&image, px.addr.to_string(), PRIVATE, ALICE).await;
    assert_eq!(upstream_requests(&reg, "GET", &blob_uri), 1);
    drop(px);
    // What a fetch killed mid-way leaves behind.
    let partial = cache.path().join("tmp").join("killed-fetch");
    std::fs::write(&partial, b"half a blob").unwrap();

    let px = regrelay_with_cache(&reg, cache.path(), keys.path());
    assert!(!partial.exists(), "the half-written file is gone");
    let heads = upstream_requests(&reg, "HEAD", &blob_uri);
    pull(&image, px.addr.to_string(), PRIVATE, ALICE).await;
    assert_eq!(
        upstream_requests(&reg, "GET", &blob_uri),
        1,
        "served from the cache after the restart"
    );
    assert!(
        upstream_requests(&reg, "HEAD", &blob_uri) > heads,
        "but only after the upstream re-authorized alice"
    );
    // Range requests are served from the cache too.
    let realm = format!("{}/jwt/auth", px.url());
    let token = fetch_token(
        &realm,
        ALICE.0,
        ALICE.1,
        &format!("repository:{PRIVATE}:pull"),
    )
    .await;
    let resp = upstream::client()
        .request(
            http::Request::get(format!("{}{blob_uri}", px.url()))
                .header("authorization", format!("Bearer {token}"))
                .header("range", "bytes=10-19")
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"]
            .to_str()
            .unwrap()
            .split('/')
            .next(),
        Some("bytes 10-19")
    );
    let part = resp.into_body().collect().await.unwrap().to_bytes();
    let blob = std::fs::read(
        image
            .dir
            .path()
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert_eq!(&part[..], &blob[10..20]);
    assert_eq!(upstream_requests(&reg, "GET", &blob_uri), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_registry_down_a_tag_is_served_stale_only_under_a_grant() {
    let (_gl, reg) = world().await;
    let image = OciImage::random(184, &[256 << 10]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let cache = tempfile::tempdir().unwrap();
    let keys = key_file();
    let px = Regrelay::start(&[
        "--registry",
        &reg.url(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--cache-serve-stale",
        "--session-key-file",
        keys.path().to_str().unwrap(),
    ]);
    let realm = format!("{}/jwt/auth", px.url());
    let alice = fetch_token(
        &realm,
        ALICE.0,
        ALICE.1,
        &format!("repository:{PRIVATE}:pull"),
    )
    .await;
    let bob = fetch_token(&realm, BOB.0, BOB.1, &format!("repository:{PRIVATE}:pull")).await;
    let tag = format!("/v2/{PRIVATE}/manifests/v1");
    let (status, fresh) = get(&px.url(), &tag, Some(&alice), false).await;
    assert_eq!(status, 200);
    assert_eq!(digest(&fresh), image.manifest_digest);

    drop(reg);
    let resp = upstream::client()
        .request(
            http::Request::get(format!("{}{tag}", px.url()))
                .header("authorization", format!("Bearer {alice}"))
                .header("accept", OCI_MANIFEST)
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "alice is answered from the cache");
    assert!(resp.headers()["warning"]
        .to_str()
        .unwrap()
        .starts_with("110"));
    let stale = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(stale, fresh);
    let (status, _) = get(&px.url(), &tag, Some(&bob), false).await;
    assert_eq!(
        status, 401,
        "bob holds no grant: GitLab gave his session no pull, refused without the registry"
    );
    // The WARN line is written before the answer, but read from regrelay's stderr by another
    // thread: wait for it rather than race it.
    assert!(
        px.output
            .wait_for(
                "manifest served stale from the cache",
                Duration::from_secs(5)
            )
            .is_some(),
        "no WARN line for the stale answer"
    );
}
