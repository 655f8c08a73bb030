//! The cache replicas share on object storage (`--cache-store`, issue 26). Real components: a
//! single-node Garage (an S3-compatible store users run; it ignores `If-None-Match: *`, so the
//! lease is regrelay's write-settle-read), Debian's `docker-registry` with token auth, the GitLab
//! stand-in, skopeo; upstream requests are counted in the registry's own log, objects read from
//! Garage with the bucket's key.
//!
//! - Two replicas, one bucket: a pull through replica 1 and then through replica 2 makes one
//!   upstream GET per blob; the bucket holds each blob byte-identical, no lease is left, and
//!   bob (no access) gets nothing from replica 2.
//! - 10 parallel cold GETs of one blob split across both replicas make one upstream GET.
//! - A replica killed mid-fill leaves no object under the digest; the other replica, waiting on
//!   its lease, takes the fill over once the lease goes unrenewed and completes it.
//! - A replica waits for another's fill at most `--cache-s3-wait-secs`, then fetches the blob
//!   itself (a pull without bytes for minutes fails in Kubernetes' CRI).
//! - `--cache-redirect`: a granted GET of a blob in the bucket is a `307` to a presigned URL
//!   that serves the blob without `Authorization`; skopeo pulls through it; the URL's signature
//!   never reaches regrelay's output, and bob is refused, not redirected.
//! - Eviction across replicas: over `--cache-store-max-bytes`, the blob no replica used lately
//!   goes, not one another replica read from the bucket since it was stored.
//! - A bucket that refuses the key costs no pull (they go to the upstream, as without it), and
//!   `/-/ready` stays 200 while naming the problem (`ok` when the bucket works).
//! - The bucket's secret key never reaches regrelay's output.

use crate::support;

use std::time::Duration;

use super::cache::{
    get, key_file, pull, push, upstream_requests, upstream_requests_at_least, world, ALICE, BOB,
    PRIVATE,
};
use http_body_util::BodyExt;
use support::garage::Garage;
use support::*;

/// Where the replicas of these tests keep their objects in the bucket.
const PREFIX: &str = "fleet";

/// Replicas of one front sharing a Garage bucket under [`PREFIX`]: each with a cache directory
/// of its own, all with the same session key ring and the bucket's credentials file.
struct Fleet {
    registry: String,
    garage: Garage,
    creds: tempfile::NamedTempFile,
    keys: tempfile::NamedTempFile,
    dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    async fn new(reg: &Registry) -> Fleet {
        let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
        Fleet {
            registry: reg.url(),
            creds: garage.credentials_file(),
            garage,
            keys: key_file(),
            dirs: vec![],
        }
    }

    /// A new replica's flags (a new cache directory), with `more`.
    fn flags(&mut self, more: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--registry",
            &self.registry,
            "--cache-dir",
            dir.path().to_str().unwrap(),
            "--cache-max-bytes",
            "1073741824",
            "--session-key-file",
            self.keys.path().to_str().unwrap(),
        ]
        .map(String::from)
        .into();
        args.extend(self.garage.flags(PREFIX, &self.creds));
        args.extend(more.iter().map(|s| s.to_string()));
        self.dirs.push(dir);
        args
    }

    /// A new replica in this process.
    fn replica(&mut self, more: &[&str]) -> Regrelay {
        let args = self.flags(more);
        Regrelay::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A new replica as a process of its own (one a test can kill).
    fn process(&mut self, more: &[&str]) -> Regrelay {
        let args = self.flags(more);
        Regrelay::process(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

/// A client of `px` that `GET`s `uri` and stops reading after the first frame: the fill it
/// started stalls, its lease of `layer` held (checked). Drop the body to end it.
async fn stall(
    px: &Regrelay,
    uri: &str,
    token: &str,
    garage: &Garage,
    layer: &str,
) -> hyper::body::Incoming {
    let req = http::Request::get(format!("{}{uri}", px.url()))
        .header("authorization", format!("Bearer {token}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stalled = resp.into_body();
    let first = stalled.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    let lease = object_eventually(garage, &lease_key(layer), true).await;
    assert!(lease.is_some(), "the stalled fill holds the lease");
    stalled
}

fn object_key(digest: &str) -> String {
    format!(
        "{PREFIX}/blobs/sha256/{}",
        digest.trim_start_matches("sha256:")
    )
}

fn lease_key(digest: &str) -> String {
    format!(
        "{PREFIX}/leases/sha256/{}",
        digest.trim_start_matches("sha256:")
    )
}

/// Polls `garage` until `key` holds an object (or 20 s pass): its content then.
async fn object_eventually(garage: &Garage, key: &str, present: bool) -> Option<bytes::Bytes> {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = garage.object(key).await;
        if found.is_some() == present || tokio::time::Instant::now() >= end {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private image of one `size`-byte layer (random from `seed`), pushed by Alice: the image,
/// its layer's digest and length, and the layer's blob path.
async fn one_layer_pushed(
    reg: &Registry,
    seed: u64,
    size: usize,
) -> (OciImage, String, usize, String) {
    let image = OciImage::random(seed, &[size]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, len) = image.layers[0].clone();
    let uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    (image, layer, len, uri)
}

async fn token(px: &Regrelay, who: (&str, &str)) -> String {
    let realm = format!("{}/jwt/auth", px.url());
    fetch_token(&realm, who.0, who.1, &format!("repository:{PRIVATE}:pull")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_sharing_one_bucket_fetch_each_blob_from_the_upstream_once() {
    let (gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let image = OciImage::random(261, &[3 << 20, 1 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let (r1, r2) = (fleet.replica(&[]), fleet.replica(&[]));
    let garage = &fleet.garage;

    pull(&image, r1.addr.to_string(), PRIVATE, ALICE).await;
    // Replica 1 uploads each blob once its digest verified, holding the blob's lease until the
    // object is in: replica 2, finding the lease, waits for the object instead of fetching.
    pull(&image, r2.addr.to_string(), PRIVATE, ALICE).await;
    let both = || format!("{}\n--- replica 2\n{}", r1.output.text(), r2.output.text());
    for (layer, len) in &image.layers {
        let uri = format!("/v2/{PRIVATE}/blobs/{layer}");
        assert_eq!(
            upstream_requests(&reg, "GET", &uri),
            1,
            "one upstream GET of {layer} for both replicas\n{}",
            both()
        );
        let stored = garage
            .object(&object_key(layer))
            .await
            .expect("in the bucket");
        assert_eq!((stored.len(), digest(&stored)), (*len, layer.clone()));
        let lease = object_eventually(garage, &lease_key(layer), false).await;
        assert!(
            lease.is_none(),
            "the lease of {layer} is gone once its object is in"
        );
    }
    let (status, body) = get(&r2.url(), "/-/ready", None, false).await;
    let ready: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &ready["cache_store"]["status"]),
        (200, &"ok".into())
    );
    assert!(
        r2.output.text().contains("cache=shared"),
        "replica 2 read from the bucket\n{}",
        both()
    );

    // Bob knows the digest; replica 2 holds it locally now and in the bucket. He gets nothing.
    let (layer, _) = &image.layers[0];
    let bob = token(&r2, BOB).await;
    let (status, body) = get(
        &r2.url(),
        &format!("/v2/{PRIVATE}/blobs/{layer}"),
        Some(&bob),
        false,
    )
    .await;
    assert!(matches!(status, 401 | 403 | 404), "bob: {status}");
    assert!(body.len() < 4096, "no blob bytes for bob");

    let mut secrets = gl.issued();
    secrets.extend([ALICE.1.to_owned(), BOB.1.to_owned(), garage.secret.clone()]);
    assert_no_secrets(&both(), ALICE.0, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_cold_pulls_across_two_replicas_make_one_upstream_fetch() {
    let (_gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let (_image, layer, len, uri) = one_layer_pushed(&reg, 262, 8 << 20).await;
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let (r1, r2) = (fleet.replica(&metrics), fleet.replica(&metrics));
    // A session token is sealed for the replica's public URL (here, each its own address).
    let tokens = [token(&r1, ALICE).await, token(&r2, ALICE).await];
    let pulls: Vec<_> = (0..10)
        .map(|i| {
            let base = [r1.url(), r2.url()][i % 2].clone();
            let (uri, alice) = (uri.clone(), tokens[i % 2].clone());
            tokio::spawn(async move { get(&base, &uri, Some(&alice), false).await })
        })
        .collect();
    for p in pulls {
        let (status, body) = p.await.unwrap();
        assert_eq!((status, body.len()), (200, len));
        assert_eq!(digest(&body), layer, "byte-identical");
    }
    assert_eq!(
        upstream_requests_at_least(&reg, "GET", &uri, 1),
        1,
        "one upstream GET for 10 cold pulls on two replicas\n{}\n--- replica 2\n{}",
        r1.output.text(),
        r2.output.text()
    );

    // The metrics say how: one replica fetched and uploaded, the other waited on its lease
    // and read the bucket.
    let counted = |name: &'static str, label: &'static str| {
        let (a1, a2) = (support::metrics::addr(&r1), support::metrics::addr(&r2));
        async move {
            let mut n = 0.0;
            for addr in [a1, a2] {
                let text = support::metrics::scrape(addr).await.2;
                n += support::metrics::value(&text, name, &[label]);
            }
            n
        }
    };
    let ops = "regrelay_cache_shared_operations_total";
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while counted(ops, "operation=\"uploads\"").await < 1.0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted(ops, "operation=\"uploads\"").await, 1.0);
    assert!(counted(ops, "operation=\"waits\"").await >= 1.0);
    let shared = counted("regrelay_cache_requests_total", "outcome=\"shared\"").await;
    assert!(shared >= 1.0, "bucket reads: {shared}");

    // A third replica, cold, serves ranges of it (as lazy-pulling snapshotters read layers)
    // from the bucket: still one upstream GET in all.
    let r3 = fleet.replica(&[]);
    let alice = token(&r3, ALICE).await;
    let whole = get(&r1.url(), &uri, Some(&tokens[0]), false).await.1;
    for (start, end) in [
        (0, 99),
        (len as u64 / 2, len as u64 / 2 + 65_535),
        (len as u64 - 10, len as u64 - 1),
    ] {
        let (status, part) = super::cache::get_range(&r3.url(), &uri, &alice, (start, end)).await;
        assert_eq!(status, 206, "{}", r3.output.text());
        assert_eq!(
            part,
            whole[start as usize..=end as usize],
            "bytes {start}-{end}"
        );
    }
    assert_eq!(
        upstream_requests(&reg, "GET", &uri),
        1,
        "{}",
        r3.output.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_fill_leaves_nothing_and_the_other_takes_the_fill_over() {
    let (_gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    // Above PART_BYTES (64 MiB): the takeover uploads it in parts.
    let (_image, layer, len, uri) = one_layer_pushed(&reg, 263, 80 << 20).await;
    let lease = ["--cache-s3-lease-secs", "2"];
    let (r1, r2) = (fleet.process(&lease), fleet.process(&lease));
    let garage = &fleet.garage;
    let alice = token(&r1, ALICE).await;

    // A client of replica 1 takes the first bytes and reads no more: the fill stalls, its
    // lease renewed.
    let stalled = stall(&r1, &uri, &alice, garage, &layer).await;

    // A client of replica 2 asks meanwhile: replica 2 waits on replica 1's lease.
    let waiting = {
        let alice = token(&r2, ALICE).await;
        let (base, uri) = (r2.url(), uri.clone());
        tokio::spawn(async move { get(&base, &uri, Some(&alice), false).await })
    };
    r1.signal("KILL");
    drop(stalled);
    assert!(
        garage.object(&object_key(&layer)).await.is_none(),
        "a fill cut by a kill leaves no object under the digest"
    );

    let (status, body) = waiting.await.unwrap();
    assert_eq!((status, body.len()), (200, len), "{}", r2.output.text());
    assert_eq!(digest(&body), layer);
    // The killed fill's GET (logged, or not, as the registry saw it cut) and the takeover's.
    let gets = upstream_requests_at_least(&reg, "GET", &uri, 2);
    assert!((1..=2).contains(&gets), "{gets} upstream GETs");
    assert!(
        r2.output.text().contains("taken over"),
        "{}",
        r2.output.text()
    );
    let stored = object_eventually(garage, &object_key(&layer), true).await;
    assert_eq!(
        stored.map(|b| digest(&b)),
        Some(layer.clone()),
        "replica 2 uploaded it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_cache_redirect_a_granted_blob_is_read_from_the_bucket_by_a_presigned_url() {
    let (gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let (image, layer, len, uri) = one_layer_pushed(&reg, 264, 2 << 20).await;
    // Replica 1 warms the bucket; replica 2 redirects.
    let (r1, r2) = (fleet.replica(&[]), fleet.replica(&["--cache-redirect"]));
    let garage = &fleet.garage;
    pull(&image, r1.addr.to_string(), PRIVATE, ALICE).await;
    object_eventually(garage, &object_key(&layer), true).await;

    let alice = token(&r2, ALICE).await;
    let req = http::Request::get(format!("{}{uri}", r2.url()))
        .header("authorization", format!("Bearer {alice}"))
        .body(regrelay::body::empty())
        .unwrap();
    let resp = upstream::client().request(req).await.unwrap();
    assert_eq!(resp.status(), 307, "{}", r2.output.text());
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&garage.endpoint), "to the bucket");
    let signature = location
        .split("X-Amz-Signature=")
        .nth(1)
        .expect("a presigned URL")
        .to_owned();
    // The URL alone (no Authorization) reads the blob.
    let object = upstream::client()
        .request(
            http::Request::get(&location)
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(object.status(), 200);
    let body = object.into_body().collect().await.unwrap().to_bytes();
    assert_eq!((body.len(), digest(&body)), (len, layer.clone()));

    // skopeo follows it.
    pull(&image, r2.addr.to_string(), PRIVATE, ALICE).await;
    assert_eq!(
        upstream_requests(&reg, "GET", &uri),
        1,
        "every read after the first from the bucket"
    );

    // Bob is refused, not redirected.
    let bob = token(&r2, BOB).await;
    let (status, body) = get(&r2.url(), &uri, Some(&bob), false).await;
    assert!(matches!(status, 401 | 403 | 404), "bob: {status}");
    assert!(body.len() < 4096);

    let output = r2.output.text();
    assert!(
        !output.contains(&signature),
        "the presigned URL reached the log"
    );
    let mut secrets = gl.issued();
    secrets.extend([ALICE.1.to_owned(), BOB.1.to_owned(), garage.secret.clone()]);
    assert_no_secrets(&output, ALICE.0, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bucket_evicts_what_no_replica_used_lately() {
    let (_gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let image = OciImage::random(265, &[1 << 20, 1 << 20, 1 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let [a, b, c] = [0, 1, 2].map(|i| image.layers[i].0.clone());
    let len = |blob: &str| image.layers.iter().find(|l| l.0 == blob).unwrap().1;
    // Room for two of the three blobs.
    let bound = ["--cache-store-max-bytes", "2621440"];
    let (r1, r2) = (fleet.replica(&bound), fleet.replica(&bound));
    let garage = &fleet.garage;
    let tokens = [token(&r1, ALICE).await, token(&r2, ALICE).await];
    let read = |replica: usize, blob: &str| {
        let base = [r1.url(), r2.url()][replica].clone();
        let (uri, token) = (
            format!("/v2/{PRIVATE}/blobs/{blob}"),
            tokens[replica].clone(),
        );
        let want = len(blob);
        async move {
            let (status, body) = get(&base, &uri, Some(&token), false).await;
            assert_eq!((status, body.len()), (200, want));
        }
    };
    // Objects are ordered by their LastModified, which some stores keep to the second.
    let tick = || tokio::time::sleep(Duration::from_millis(1100));

    read(0, &a).await;
    object_eventually(garage, &object_key(&a), true).await;
    tick().await;
    read(1, &b).await;
    object_eventually(garage, &object_key(&b), true).await;
    tick().await;
    // Replica 2 reads a from the bucket: its use is marked for every replica to see.
    read(1, &a).await;
    let mark = format!("{PREFIX}/access/sha256/{}", a.trim_start_matches("sha256:"));
    assert!(object_eventually(garage, &mark, true).await.is_some());
    tick().await;
    // c makes three: replica 1 evicts the least recently used, b (its own a is older by its
    // own clock, but replica 2 used it since).
    read(0, &c).await;
    assert!(
        object_eventually(garage, &object_key(&b), false)
            .await
            .is_none(),
        "b evicted\n{}",
        r1.output.text()
    );
    assert!(
        garage.object(&object_key(&a)).await.is_some(),
        "a, used lately, stays"
    );
    assert!(
        garage.object(&object_key(&c)).await.is_some(),
        "c, just stored, stays"
    );
}

/// A bucket that refuses the key (a wrong secret): pulls work as without the bucket (from the
/// upstream, then from the local tier), and `/-/ready` stays 200 while it names the problem,
/// without the store's address or the secret.
#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_refuses_the_key_costs_no_pull_and_readiness_says_so() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let (_gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let wrong = "0000000000000000000000000000000000000000000000000000000000000000";
    let mut creds = tempfile::NamedTempFile::new().unwrap();
    let key = &fleet.garage.key_id;
    writeln!(
        creds,
        "[default]\naws_access_key_id = {key}\naws_secret_access_key = {wrong}"
    )
    .unwrap();
    std::fs::set_permissions(creds.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    fleet.creds = creds;
    let image = OciImage::random(266, &[1 << 20]);
    push(&image, reg.addr.to_string(), PRIVATE, ALICE).await;
    let r = fleet.replica(&[]);
    pull(&image, r.addr.to_string(), PRIVATE, ALICE).await;
    pull(&image, r.addr.to_string(), PRIVATE, ALICE).await;
    let (layer, _) = &image.layers[0];
    let uri = format!("/v2/{PRIVATE}/blobs/{layer}");
    assert_eq!(
        upstream_requests(&reg, "GET", &uri),
        1,
        "{}",
        r.output.text()
    );
    assert!(
        r.output
            .text()
            .contains("shared cache unusable; fetching from the upstream"),
        "{}",
        r.output.text()
    );
    let (status, body) = get(&r.url(), "/-/ready", None, false).await;
    let ready: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["cache_store"]["status"], "unusable", "{ready}");
    let detail = ready["cache_store"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("403") && detail.contains("credentials"),
        "{detail}"
    );
    let port = fleet.garage.endpoint.rsplit(':').next().unwrap();
    assert!(
        !detail.contains(port),
        "the store's address stays out: {detail}"
    );
    assert_no_secrets(
        &r.output.text(),
        ALICE.0,
        &[wrong.to_owned(), ALICE.1.to_owned()],
    );
}

/// A replica waits for another replica's fill at most `--cache-s3-wait-secs`: a pull gets no
/// byte while it waits (Kubernetes' CRI gives up on a pull without progress after 5 minutes).
/// Then it fetches the blob itself, while the other replica still holds the lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_waits_for_another_replicas_fill_no_longer_than_cache_s3_wait_secs() {
    let (_gl, reg) = world().await;
    let mut fleet = Fleet::new(&reg).await;
    let (_image, layer, len, uri) = one_layer_pushed(&reg, 267, 64 << 20).await;
    let (r1, r2) = (
        fleet.replica(&[]),
        fleet.replica(&["--cache-s3-wait-secs", "1"]),
    );
    let garage = &fleet.garage;
    let stalled = stall(&r1, &uri, &token(&r1, ALICE).await, garage, &layer).await;

    let alice = token(&r2, ALICE).await;
    // Without the bound, replica 2 would wait as long as replica 1 renews its lease.
    let base = r2.url();
    let asked = get(&base, &uri, Some(&alice), false);
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .expect("replica 2 answered within 30 s");
    assert_eq!((status, body.len()), (200, len), "{}", r2.output.text());
    assert_eq!(digest(&body), layer);
    assert!(
        r2.output.text().contains("fetching it here"),
        "{}",
        r2.output.text()
    );
    assert!(
        garage.object(&lease_key(&layer)).await.is_some(),
        "replica 1 still holds the lease: replica 2 did not wait for it"
    );
    drop(stalled);
}
