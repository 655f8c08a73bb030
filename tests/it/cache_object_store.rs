//! The pull-through cache (`--cache-dir`) in front of a registry whose blobs live on object
//! storage (issue 21). Real components: Debian's `docker-registry` with distribution's own
//! `redirect` storage middleware, so blob `GET` and `HEAD` answer `307` exactly as S3-backed
//! registries do; nginx as the object store, whose own log counts its reads (a read needs a
//! secret `sig` in the query, reached through one more `307`, like a presigned URL: see
//! `support::object_store`); the GitLab stand-in; real skopeo.
//!
//! - Two pulls by alice: the first reads each blob once from object storage, the second reads
//!   nothing from it; nor does a third after a restart (grants gone: the registry's `307` to
//!   alice's own `HEAD` re-authorizes her). Bob (no access) is refused by alice's path and by
//!   his own; anonymous too.
//! - 20 parallel cold pulls of one blob make one object-store read.
//! - A cold `HEAD` and a `Range` are answered without the redirect; a dead object store is a
//!   502 in the registry's error format.
//! - The presigned URL (its path and its secret query) never appears in regrelay's output at
//!   `REGRELAY_LOG=trace`, nor in its metrics, nor in any answer; `Authorization` and cookies
//!   never reach the object store.
//! - Without `--cache-dir` the `307` reaches the client untouched (and skopeo follows it).

use crate::support;

use std::path::Path;
use std::time::Duration;

use http::HeaderMap;
use http_body_util::BodyExt;
use support::gitlab::{gitlab, Credential, GitLab, Role, TokenScope};
use support::object_store::ObjectStore;
use support::*;

const ALICE: (&str, &str) = ("alice", "glpat-AliceObjectStore1234");
const BOB: (&str, &str) = ("bob", "glpat-BobObjectStore123456");
const PRIVATE: &str = "team/private";

/// The GitLab stand-in, a redirecting registry, its object store, and an image alice pushed.
struct World {
    gl: GitLab,
    reg: Registry,
    store: ObjectStore,
    image: OciImage,
    cache: tempfile::TempDir,
}

async fn world(seed: u64, layers: &[usize]) -> World {
    let pat = |(user, token): (&str, &str)| Credential::Pat {
        user: user.into(),
        token: token.into(),
        scopes: vec![TokenScope::ReadRegistry, TokenScope::WriteRegistry],
    };
    let gl = gitlab()
        .credential(pat(ALICE))
        .credential(pat(BOB))
        .project(PRIVATE, false, &[(ALICE.0, Role::Developer)])
        .project("bob/own", false, &[(BOB.0, Role::Developer)])
        .lifetime(Duration::from_secs(300))
        .start()
        .await;
    let (reg, store) = Registry::start_redirecting(&gl.realm());
    let image = OciImage::random(seed, layers);
    let out = copy(
        image.reference(),
        format!("docker://{}/{PRIVATE}:v1", reg.addr),
        ALICE,
    )
    .await;
    assert!(out.status.success(), "push: {}", text(&out));
    World {
        gl,
        reg,
        store,
        image,
        cache: tempfile::tempdir().unwrap(),
    }
}

impl World {
    /// regrelay in front of the registry, logging everything (`REGRELAY_LOG=trace`), with
    /// metrics, and with the cache when `cached`.
    fn regrelay(&self, cached: bool, keys: &Path) -> Regrelay {
        let mut args = vec![
            "--registry".to_owned(),
            self.reg.url(),
            "--session-key-file".to_owned(),
            keys.display().to_string(),
            "--metrics-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        if cached {
            args.extend([
                "--cache-dir".to_owned(),
                self.cache.path().display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Regrelay::start_with_prefix(&["env", "REGRELAY_LOG=trace"], &args)
    }

    /// Where the registry sends a client for `digest`: what the redirect middleware builds.
    fn location(&self, digest: &str) -> String {
        let hex = digest.trim_start_matches("sha256:");
        format!(
            "{}docker/registry/v2/blobs/sha256/{}/{hex}/data",
            self.store.url(),
            &hex[..2]
        )
    }

    /// Every blob of the image: its layers and its config.
    fn blobs(&self) -> usize {
        self.image.layers.len() + 1
    }
}

/// skopeo copy with `who`'s credentials on the registry side.
async fn copy(src: String, dest: String, who: (&str, &str)) -> std::process::Output {
    let creds = format!("{}:{}", who.0, who.1);
    tokio::task::spawn_blocking(move || skopeo_copy(&src, &dest, &creds, &Transport::Http))
        .await
        .unwrap()
}

/// Pulls `PRIVATE:v1` through `px` as `who` into a fresh layout; the layout when it worked.
async fn pull(px: &Regrelay, who: (&str, &str)) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::tempdir().unwrap();
    let out = copy(
        format!("docker://{}/{PRIVATE}:v1", px.addr),
        format!("oci:{}:latest", dir.path().display()),
        who,
    )
    .await;
    match out.status.success() {
        true => Ok(dir),
        false => Err(text(&out)),
    }
}

/// A token from regrelay's realm for `who` and `scope`.
async fn token(px: &Regrelay, who: (&str, &str), scope: &str) -> String {
    fetch_token(&format!("{}/jwt/auth", px.url()), who.0, who.1, scope).await
}

/// `method` `path` through `px` with a Bearer token and extra headers: status, headers, body.
async fn ask(
    px: &Regrelay,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, HeaderMap, bytes::Bytes) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", px.url()));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = upstream::client()
        .request(req.body(regrelay::body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

fn key_file() -> tempfile::NamedTempFile {
    use base64::Engine;
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([0x3du8; 32]);
    writeln!(f, "{key}").unwrap();
    f
}

/// Fails when any part of a presigned URL reached `text`: the object store's paths, its
/// `secret` query, or any of `locations`.
fn assert_no_presigned_url(text: &str, secret: &str, locations: &[String], what: &str) {
    for needle in
        locations
            .iter()
            .map(String::as_str)
            .chain(["/docker/registry/v2/", "sig=", secret])
    {
        assert!(
            !text.contains(needle),
            "a presigned URL (or its query) reached {what}: {needle}"
        );
    }
}

/// The blob's bytes as pushed.
fn blob_bytes(image: &OciImage, digest: &str) -> Vec<u8> {
    let hex = digest.trim_start_matches("sha256:");
    std::fs::read(image.dir.path().join("blobs/sha256").join(hex)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_pull_through_the_cache_reads_nothing_from_object_storage() {
    let w = world(211, &[1 << 20, 300 << 10]).await;
    let keys = key_file();
    let px = w.regrelay(true, keys.path());
    let pushed_reads = w.store.content_gets();

    let first = pull(&px, ALICE).await.expect("first pull");
    assert_same_blobs(&w.image, first.path());
    let after_first = w.store.served().len();
    let first_reads = w.store.content_gets() - pushed_reads;
    assert_eq!(
        first_reads,
        w.blobs(),
        "the first pull reads each blob once from object storage\n{:?}",
        w.store.served()
    );

    let second = pull(&px, ALICE).await.expect("second pull");
    assert_same_blobs(&w.image, second.path());
    let second_reads = w.store.content_gets() - pushed_reads - first_reads;
    eprintln!("object-store GETs: first pull {first_reads}, second pull {second_reads}");
    assert_eq!(second_reads, 0, "the second pull was served from the cache");
    assert_eq!(
        w.store.served().len(),
        after_first,
        "no object-store request at all (not even a HEAD) for the second pull"
    );

    // After a restart no grant is left: the registry's redirect answer to alice's own HEAD is
    // what lets her be served from the cache again, still without reading object storage.
    let filled = px.output.clone();
    drop(px);
    let px = w.regrelay(true, keys.path());
    let redirected_heads = || {
        // Settled: the registry's lines reach us through a reader thread.
        let log = w.reg.log.settled();
        let head = |l: &&str| l.contains("http.request.method=HEAD");
        let redirected = |l: &&str| l.contains("http.response.status=307");
        log.lines().filter(head).filter(redirected).count()
    };
    let heads = redirected_heads();
    let third = pull(&px, ALICE).await.expect("pull after a restart");
    assert_same_blobs(&w.image, third.path());
    assert_eq!(
        redirected_heads() - heads,
        w.blobs(),
        "each blob was re-authorized by a HEAD the registry answered 307"
    );
    assert_eq!(
        w.store.served().len(),
        after_first,
        "after a restart too, no object-store request"
    );

    // Bob knows the digests; he gets nothing, by alice's path or by his own, nor anonymously.
    assert!(pull(&px, BOB).await.is_err(), "bob's pull is refused");
    let (layer, _) = w.image.layers[0].clone();
    let bob_private = token(&px, BOB, &format!("repository:{PRIVATE}:pull")).await;
    let bob_own = token(&px, BOB, "repository:bob/own:pull").await;
    for (path, tok) in [
        (format!("/v2/{PRIVATE}/blobs/{layer}"), Some(&bob_private)),
        (format!("/v2/bob/own/blobs/{layer}"), Some(&bob_own)),
        (format!("/v2/{PRIVATE}/blobs/{layer}"), None),
    ] {
        for method in ["GET", "HEAD"] {
            let (status, headers, body) =
                ask(&px, method, &path, tok.map(String::as_str), &[]).await;
            assert!(
                matches!(status, 401 | 403 | 404),
                "{method} {path} as bob: {status}"
            );
            assert!(body.len() < 4096, "no blob bytes for bob");
            assert!(!headers.contains_key("location"));
        }
    }
    assert_eq!(
        w.store.served().len(),
        after_first,
        "bob caused no object-store request"
    );

    // Nothing that carries credentials went to the object store.
    for s in w.store.served() {
        assert!(!s.authorization && !s.cookie, "{s:?}");
    }
    // The presigned URLs never reached regrelay's output (at TRACE) or its metrics.
    let locations: Vec<String> = (w.image.layers.iter().map(|(d, _)| d.clone()))
        .map(|d| w.location(&d))
        .collect();
    // Both regrelays: the one that filled the cache, and the one that served it.
    let output = filled.text() + &px.output.settled();
    assert!(output.contains(" TRACE "), "the output is at TRACE level");
    assert!(output.contains("cache: reading from object storage"));
    let secret = &w.store.secret;
    assert_no_presigned_url(&output, secret, &locations, "regrelay's output");
    let (_, _, metrics) = metrics::scrape(metrics::addr(&px)).await;
    assert_no_presigned_url(&metrics, secret, &locations, "the metrics");
    let mut secrets = w.gl.issued();
    secrets.extend([ALICE.1.to_owned(), BOB.1.to_owned()]);
    assert_no_secrets(&output, ALICE.0, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_cold_pulls_of_one_blob_make_one_object_store_read() {
    let w = world(212, &[4 << 20]).await;
    let keys = key_file();
    let px = w.regrelay(true, keys.path());
    let (layer, len) = w.image.layers[0].clone();
    let path = format!("/v2/{PRIVATE}/blobs/{layer}");
    let tok = token(&px, ALICE, &format!("repository:{PRIVATE}:pull")).await;
    let before = w.store.content_gets();
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let (url, path, tok) = (px.url(), path.clone(), tok.clone());
            tokio::spawn(async move {
                let resp = upstream::client()
                    .request(
                        http::Request::get(format!("{url}{path}"))
                            .header("authorization", format!("Bearer {tok}"))
                            .body(regrelay::body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let (parts, body) = resp.into_parts();
                (parts, body.collect().await.unwrap().to_bytes())
            })
        })
        .collect();
    for p in pulls {
        let (parts, body) = p.await.unwrap();
        assert_eq!(parts.status, 200);
        assert!(!parts.headers.contains_key("location"));
        assert_eq!(body.len(), len);
        assert_eq!(digest(&body), layer, "byte-identical");
        // The writer's answer and its followers' (chunked: the length is the object store's).
        assert_eq!(parts.headers["docker-content-digest"], layer.as_str());
    }
    assert_eq!(
        w.store.content_gets() - before,
        1,
        "one object-store read for 20 cold pulls\n{:?}",
        w.store.served()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_head_and_a_range_are_answered_without_the_redirect() {
    let w = world(213, &[512 << 10]).await;
    let keys = key_file();
    let px = w.regrelay(true, keys.path());
    let (layer, len) = w.image.layers[0].clone();
    let path = format!("/v2/{PRIVATE}/blobs/{layer}");
    let tok = token(&px, ALICE, &format!("repository:{PRIVATE}:pull")).await;
    let reads = w.store.content_gets();

    let (status, headers, _) = ask(&px, "HEAD", &path, Some(&tok), &[]).await;
    assert_eq!(status, 200, "{headers:?}");
    assert!(!headers.contains_key("location"));
    assert_eq!(headers["content-length"], len.to_string().as_str());
    assert_eq!(headers["docker-content-digest"], layer.as_str());

    let (status, headers, part) =
        ask(&px, "GET", &path, Some(&tok), &[("range", "bytes=10-19")]).await;
    assert_eq!(status, 206, "{headers:?}");
    assert!(!headers.contains_key("location"));
    assert_eq!(&part[..], &blob_bytes(&w.image, &layer)[10..20]);
    assert_eq!(
        w.store.content_gets(),
        reads + 1,
        "the range was read from object storage"
    );

    // Filled by a whole GET, then a HEAD and a range are answered from the cache.
    let (status, _, body) = ask(&px, "GET", &path, Some(&tok), &[]).await;
    assert_eq!((status, body.len()), (200, len));
    // The client's last frame waits for the digest check, not for the fsync and the index.
    let committed = format!("cache: committed digest={layer}");
    let waited = px.output.wait_for(&committed, Duration::from_secs(10));
    assert!(waited.is_some(), "the fill was committed");
    let served = w.store.served().len();
    let (status, headers, _) = ask(&px, "HEAD", &path, Some(&tok), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-regrelay-cache"], "hit");
    let (status, _, part) = ask(&px, "GET", &path, Some(&tok), &[("range", "bytes=0-3")]).await;
    assert_eq!(
        (status, &part[..]),
        (206, &blob_bytes(&w.image, &layer)[..4])
    );
    assert_eq!(
        w.store.served().len(),
        served,
        "warm: no object-store request"
    );

    // With the object store gone, a cold blob is a 502 in the registry's format, URL-free.
    let config = {
        let manifest = blob_bytes(&w.image, &w.image.manifest_digest);
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        m["config"]["digest"].as_str().unwrap().to_owned()
    };
    let (secret, locations) = (
        w.store.secret.clone(),
        vec![w.location(&layer), w.location(&config)],
    );
    drop(w.store);
    let (status, headers, body) = ask(
        &px,
        "GET",
        &format!("/v2/{PRIVATE}/blobs/{config}"),
        Some(&tok),
        &[],
    )
    .await;
    assert_eq!(status, 502);
    assert!(!headers.contains_key("location"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "{v}");
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("object storage"), "{message}");
    assert!(
        !message.contains("127.0.0.1"),
        "the answer names no address: {message}"
    );
    let output = px.output.settled();
    assert_no_presigned_url(&output, &secret, &locations, "regrelay's output");
    assert_no_presigned_url(
        &format!("{headers:?}{v}"),
        &secret,
        &locations,
        "the answer",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cache_the_redirect_reaches_the_client_untouched() {
    let w = world(214, &[256 << 10]).await;
    let keys = key_file();
    let px = w.regrelay(false, keys.path());
    let (layer, _) = w.image.layers[0].clone();
    let path = format!("/v2/{PRIVATE}/blobs/{layer}");
    let tok = token(&px, ALICE, &format!("repository:{PRIVATE}:pull")).await;
    for method in ["GET", "HEAD"] {
        let (status, headers, _) = ask(&px, method, &path, Some(&tok), &[]).await;
        assert_eq!(status, 307, "{method}");
        assert_eq!(headers["location"], w.location(&layer).as_str(), "{method}");
    }
    let before = w.store.content_gets();
    let pulled = pull(&px, ALICE).await.expect("pull");
    assert_same_blobs(&w.image, pulled.path());
    assert_eq!(
        w.store.content_gets() - before,
        w.blobs(),
        "skopeo read every blob from object storage itself"
    );
    // Only the client itself went there. (skopeo 1.9, built with Go 1.19, sends its
    // `Authorization` again on the store's own second hop, a same-host redirect: Go < 1.22.11
    // compares each hop with the previous one only. Nothing regrelay can prevent here; in cache
    // mode regrelay follows the redirects itself and the client never meets them.)
    for s in w.store.served() {
        assert!(s.user_agent.starts_with("skopeo/"), "{s:?}");
    }
}
