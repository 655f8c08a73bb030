use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::error::BoxError;

fn sha(data: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(data).into())
}

/// Deterministic test content: `len` bytes that differ from chunk to chunk.
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ seed ^ ((i >> 9) as u8))
        .collect()
}

fn open(dir: &Path, max: u64) -> Store {
    Store::open(dir, max).unwrap()
}

async fn writer(store: &Store, digest: &Digest, len: Option<u64>) -> Writer {
    match store.fill(digest, len).await.unwrap() {
        Fill::Writer(w) => w,
        _ => panic!("expected to be the writer"),
    }
}

async fn follower(store: &Store, digest: &Digest) -> Follower {
    match store.fill(digest, None).await.unwrap() {
        Fill::Follower(f) => f,
        _ => panic!("expected to follow"),
    }
}

/// Stores `data` under its digest, in chunks of 50,000 bytes.
async fn put(store: &Store, data: &[u8]) -> Hit {
    let digest = sha(data);
    let mut w = writer(store, &digest, Some(data.len() as u64)).await;
    for chunk in data.chunks(50_000) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    w.commit().await.unwrap()
}

/// `fut`, or a panic after 30 s: a bug here must fail the test, not hang the suite.
async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("stuck for 30 s")
}

/// Reads a whole body: the bytes, the largest frame, or the first error.
async fn read_all<B>(body: B) -> Result<(Vec<u8>, usize), B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let (mut out, mut largest) = (Vec::new(), 0);
    while let Some(frame) = within(body.frame()).await {
        let data = frame?.into_data().unwrap_or_default();
        largest = largest.max(data.len());
        out.extend_from_slice(&data);
    }
    Ok((out, largest))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits (up to 5 s) for `cond`: some cleanup runs in a blocking task.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn digests_parse_strictly() {
    let good = "sha256:".to_owned() + &"0123456789abcdef".repeat(4);
    let d = Digest::parse(&good).unwrap();
    assert_eq!(d.to_string(), good);
    assert_eq!(d.hex(), &good[7..]);
    let bad = [
        "sha256:../../etc".to_owned(),
        "sha256:../../etc/passwd/".to_owned() + &"a".repeat(48),
        good.to_uppercase(),
        "sha256:".to_owned() + &"0123456789ABCDEF".repeat(4),
        "sha512:".to_owned() + &"ab".repeat(64),
        "sha256:".to_owned() + &"a".repeat(63),
        "sha256:".to_owned() + &"a".repeat(65),
        "sha256:".to_owned() + &"g".repeat(64),
        "a".repeat(64),
        "sha256:".to_owned() + &"é".repeat(32),
        String::new(),
    ];
    for b in bad {
        assert!(
            matches!(Digest::parse(&b), Err(CacheError::BadDigest { .. })),
            "{b:?} must be refused"
        );
    }
}

#[tokio::test]
async fn commit_then_lookup_streams_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let data = content(1, 300_000);
    let digest = sha(&data);
    assert!(store.lookup(&digest).is_none());

    let hit = put(&store, &data).await;
    assert_eq!((hit.digest, hit.len), (digest, data.len() as u64));
    let path = dir.path().join("blobs/sha256").join(digest.hex());
    assert_eq!(hit.path, path);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(files_in(&dir.path().join("tmp")).is_empty());

    let hit = store.lookup(&digest).expect("stored");
    let body = hit.body(None).await.unwrap();
    assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
    let (read, largest) = read_all(body).await.unwrap();
    assert!(read == data, "streamed content differs");
    assert_eq!(largest, super::read::HIT_CHUNK_BYTES);

    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses, stats.fills), (1, 1, 1));
    assert_eq!((stats.entries, stats.bytes), (1, data.len() as u64));
    assert_eq!(stats.bytes_served, data.len() as u64);
    // Already stored: a later fill is a hit.
    assert!(matches!(
        store.fill(&digest, None).await.unwrap(),
        Fill::Hit(_)
    ));
}

#[tokio::test]
async fn ranges_are_served_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let data = content(2, 200_000);
    let hit = put(&store, &data).await;
    let len = data.len() as u64;
    for (start, end) in [
        (0, 0),
        (10, 99),
        (65_535, 65_536),
        (1, len - 2),
        (len - 1, len - 1),
    ] {
        let body = hit.body(Some((start, end))).await.unwrap();
        assert_eq!(body.size_hint().exact(), Some(end - start + 1));
        let (read, _) = read_all(body).await.unwrap();
        assert!(read == data[start as usize..=end as usize], "{start}-{end}");
    }
    for (start, end) in [(5, 4), (0, len), (len, len), (len + 10, len + 20)] {
        let err = hit.body(Some((start, end))).await.err().expect("refused");
        assert!(
            matches!(err, CacheError::RangeNotSatisfiable { len: l, .. } if l == len),
            "{start}-{end}: {err}"
        );
    }
    let empty = put(&store, b"").await;
    assert!(empty.body(Some((0, 0))).await.is_err());
    assert!(read_all(empty.body(None).await.unwrap())
        .await
        .unwrap()
        .0
        .is_empty());
}

#[tokio::test]
async fn digest_mismatch_stores_nothing_and_fails_followers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let claimed = sha(b"what the manifest promised");
    let mut w = writer(&store, &claimed, None).await;
    let f = follower(&store, &claimed).await;
    let waiting = follower(&store, &claimed).await;
    let body = tokio::spawn(read_all(f.body()));
    w.flush().await.unwrap();
    w.write(Bytes::from_static(b"something else"))
        .await
        .unwrap();
    let err = w.commit().await.err().expect("mismatch");
    let got = sha(b"something else");
    assert!(
        matches!(err, CacheError::DigestMismatch { digest, got: g } if digest == claimed && g == got),
        "{err}"
    );
    let err = within(body).await.unwrap().expect_err("the follower fails");
    assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
    assert!(matches!(
        within(waiting.finished()).await,
        Err(CacheError::DigestMismatch { .. })
    ));
    assert!(store.lookup(&claimed).is_none());
    let tmp = dir.path().join("tmp");
    eventually("tmp/ empty", || files_in(&tmp).is_empty()).await;
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    assert_eq!(store.stats().digest_mismatches, 1);
    // The next caller fills again.
    writer(&store, &claimed, None).await.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_fills_one_writer_nineteen_followers() {
    const CHUNKS: usize = 40;
    const CHUNK: usize = 48 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100 << 20);
    let data = Arc::new(content(3, CHUNKS * CHUNK));
    let digest = sha(&data);
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let committed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (store, data, barrier, committed) = (
            store.clone(),
            data.clone(),
            barrier.clone(),
            committed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match store.fill(&digest, Some(data.len() as u64)).await.unwrap() {
                Fill::Writer(mut w) => {
                    // A slow upstream: followers must read a file that is still growing.
                    for chunk in data.chunks(CHUNK) {
                        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    w.commit().await.unwrap();
                    committed.store(true, Ordering::SeqCst);
                    ("writer", digest, false)
                }
                Fill::Follower(f) => {
                    let mut body = std::pin::pin!(f.body());
                    let (mut hasher, mut early) = (Sha256::new(), false);
                    while let Some(frame) = within(body.frame()).await {
                        early |= !committed.load(Ordering::SeqCst);
                        hasher.update(frame.unwrap().into_data().unwrap());
                    }
                    (
                        "follower",
                        Digest::from_bytes(hasher.finalize().into()),
                        early,
                    )
                }
                _ => panic!("nothing is stored yet"),
            }
        }));
    }
    let mut roles = Vec::new();
    for t in tasks {
        roles.push(within(t).await.unwrap());
    }
    let writers = roles.iter().filter(|r| r.0 == "writer").count();
    assert_eq!(writers, 1);
    for (role, got, early) in &roles {
        assert_eq!(*got, digest, "{role} read other bytes");
        if *role == "follower" {
            assert!(*early, "a follower read only after the commit");
        }
    }
    let stats = store.stats();
    assert_eq!((stats.fills, stats.followers), (1, 19));
    assert_eq!(stats.bytes_served, 19 * data.len() as u64);
}

#[tokio::test]
async fn abort_and_drop_delete_the_temp_file_and_fail_followers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let tmp = dir.path().join("tmp");
    let digest = sha(b"never finished");
    for explicit in [true, false] {
        let mut w = writer(&store, &digest, None).await;
        let f = follower(&store, &digest).await;
        w.write(Bytes::from_static(b"never")).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(files_in(&tmp).len(), 1);
        let mut body = std::pin::pin!(f.body());
        let first = within(body.frame()).await.unwrap().unwrap();
        let first = first.into_data().unwrap();
        assert_eq!(first, "never");
        if explicit {
            w.abort();
        } else {
            drop(w);
        }
        let err = within(body.frame()).await.unwrap().expect_err("fails");
        assert!(matches!(err, CacheError::Aborted), "{err}");
        eventually("tmp/ empty", || files_in(&tmp).is_empty()).await;
        assert!(store.lookup(&digest).is_none());
    }
    assert_eq!(store.stats().fill_failures, 2);
}

#[tokio::test]
async fn a_dropped_fill_future_does_not_wedge_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let digest = sha(b"x");
    // Polled once (it registers the flight, then waits for its file) and dropped.
    let once = tokio::time::timeout(Duration::ZERO, store.fill(&digest, None)).await;
    drop(once);
    writer(&store, &digest, None).await.abort();
}

#[tokio::test]
async fn reopen_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(4, 123_456);
    let other = content(5, 1000);
    {
        let store = open(dir.path(), 10 << 20);
        put(&store, &data).await;
        put(&store, &other).await;
        // Killed mid-fill: a partial temp file stays behind.
        let mut w = writer(&store, &sha(b"partial"), None).await;
        w.write(Bytes::from_static(b"part")).await.unwrap();
        std::mem::forget(w);
    }
    let blobs = dir.path().join("blobs/sha256");
    std::fs::write(dir.path().join("tmp/evicted-0123"), b"old").unwrap();
    std::fs::write(blobs.join("not-a-digest"), b"junk").unwrap();
    std::fs::write(blobs.join(sha(b"u").hex().to_uppercase()), b"u").unwrap();
    assert_eq!(files_in(&dir.path().join("tmp")).len(), 2);

    let store = open(dir.path(), 10 << 20);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    let mut want = vec![sha(&data).hex(), sha(&other).hex()];
    want.sort();
    assert_eq!(files_in(&blobs), want);
    let stats = store.stats();
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.bytes, (data.len() + other.len()) as u64);
    let hit = store.lookup(&sha(&data)).expect("still served");
    assert_eq!(hit.len, data.len() as u64);
    assert!(read_all(hit.body(None).await.unwrap()).await.unwrap().0 == data);
    // The abandoned fill is no longer in flight after a restart.
    writer(&store, &sha(b"partial"), None).await.abort();
}

#[tokio::test]
async fn a_file_lost_behind_the_index_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let hit = put(&store, b"soon gone").await;
    std::fs::remove_file(&hit.path).unwrap();
    let err = hit.body(None).await.err().expect("missing");
    assert!(matches!(err, CacheError::Io(_)), "{err}");
    assert!(store.lookup(&hit.digest).is_none());
}

#[tokio::test]
async fn lru_eviction_within_max_bytes_spares_entries_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 300);
    let [a, b, c, d, e] = [1u8, 2, 3, 4, 5].map(|s| content(s, 100));
    let [da, db, dc, _, _] = [&a, &b, &c, &d, &e].map(|x| sha(x));
    drop((put(&store, &a).await, put(&store, &b).await));
    drop(put(&store, &c).await);
    drop(store.lookup(&da)); // a is now more recent than b
    drop(put(&store, &d).await);
    assert!(store.lookup(&db).is_none(), "b was least recently used");
    assert_eq!(store.stats().bytes, 300);
    // c is the least recently used now, but being read: a goes instead.
    let reading = store.lookup(&dc).unwrap().body(None).await.unwrap();
    drop(store.lookup(&da));
    drop(store.lookup(&sha(&d)));
    drop(put(&store, &e).await);
    assert!(store.lookup(&da).is_none(), "a went instead of c");
    assert!(read_all(reading).await.unwrap().0 == c);
    let stats = store.stats();
    assert_eq!((stats.entries, stats.bytes, stats.evictions), (3, 300, 2));
    assert_eq!(files_in(&dir.path().join("blobs/sha256")).len(), 3);
    eventually("tmp/ empty", || {
        files_in(&dir.path().join("tmp")).is_empty()
    })
    .await;
}

#[tokio::test]
async fn over_budget_while_pinned_evicts_when_the_reader_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 200);
    let [a, b, c] = [1u8, 2, 3].map(|s| content(s, 100));
    let hit_a = put(&store, &a).await;
    let hit_b = put(&store, &b).await;
    let hit_c = put(&store, &c).await;
    assert_eq!(store.stats().bytes, 300, "everything is being read");
    drop(hit_a);
    eventually("within budget", || store.stats().bytes == 200).await;
    assert!(store.lookup(&sha(&a)).is_none());
    drop((hit_b, hit_c));
}

#[tokio::test]
async fn blobs_larger_than_the_cache_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1000);
    let digest = sha(&content(6, 1500));
    assert!(matches!(
        store.fill(&digest, Some(1500)).await.unwrap(),
        Fill::TooLarge
    ));
    let mut w = writer(&store, &digest, None).await;
    let f = follower(&store, &digest).await;
    w.write(Bytes::from(content(6, 800))).await.unwrap();
    let err = w.write(Bytes::from(vec![0; 700])).await.unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::TooLarge {
                len: 1500,
                max: 1000
            }
        ),
        "{err}"
    );
    assert!(matches!(read_all(f.body()).await, Err(CacheError::Aborted)));
    assert!(matches!(w.commit().await, Err(CacheError::Aborted)));
    assert!(store.lookup(&digest).is_none());
}

/// An upstream body whose frames are given up front.
struct Upstream {
    chunks: VecDeque<Bytes>,
    fail_at_end: bool,
    /// Like a `Content-Length` body: says it has ended as soon as the last chunk is out.
    knows_end: bool,
}

impl Upstream {
    fn new(data: &[u8], knows_end: bool) -> Upstream {
        Upstream {
            chunks: data.chunks(70_000).map(Bytes::copy_from_slice).collect(),
            fail_at_end: false,
            knows_end,
        }
    }
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None if self.fail_at_end => {
                self.fail_at_end = false;
                Poll::Ready(Some(Err("upstream reset".into())))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.knows_end && self.chunks.is_empty() && !self.fail_at_end
    }
}

#[tokio::test]
async fn tee_serves_the_client_and_fills_the_cache() {
    for knows_end in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10 << 20);
        let data = content(7, 400_000);
        let digest = sha(&data);
        let w = writer(&store, &digest, None).await;
        let f = follower(&store, &digest).await;
        let waiting = follower(&store, &digest).await;
        let tee = Tee::new(Upstream::new(&data, knows_end), w);
        assert!(!tee.is_end_stream());
        assert_eq!(tee.size_hint().lower(), 0);
        let (client, largest) = read_all(tee).await.unwrap();
        assert!(client == data);
        assert_eq!(largest, 70_000, "frames pass unchanged");
        assert!(read_all(f.body()).await.unwrap().0 == data);
        // The fsync and the rename go on after the client's last frame.
        let stored = within(waiting.finished()).await.unwrap();
        assert_eq!(stored.len, data.len() as u64);
        let hit = store.lookup(&digest).expect("filled");
        assert!(read_all(hit.body(None).await.unwrap()).await.unwrap().0 == data);
    }
}

#[tokio::test]
async fn tee_mismatch_ends_the_client_body_with_an_error() {
    for knows_end in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10 << 20);
        let data = content(8, 200_000);
        let claimed = sha(b"another blob");
        let w = writer(&store, &claimed, None).await;
        let mut tee = std::pin::pin!(Tee::new(Upstream::new(&data, knows_end), w));
        let mut got = 0;
        let err = loop {
            match within(tee.frame()).await {
                Some(Ok(f)) => got += f.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("a clean end after a mismatch"),
            }
        };
        assert!(err.to_string().contains("hashes to"), "{err}");
        if knows_end {
            assert!(got < data.len(), "the last frame is held back");
        }
        assert!(store.lookup(&claimed).is_none());
    }
}

#[tokio::test]
async fn tee_dropped_or_failed_upstream_aborts_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 << 20);
    let data = content(9, 300_000);
    let digest = sha(&data);
    // The client goes away after the first frame.
    let w = writer(&store, &digest, None).await;
    let f = follower(&store, &digest).await;
    let mut tee = Box::pin(Tee::new(Upstream::new(&data, true), w));
    within(tee.frame()).await.unwrap().unwrap();
    drop(tee);
    assert!(matches!(read_all(f.body()).await, Err(CacheError::Aborted)));
    // The upstream fails mid-body.
    let w = writer(&store, &digest, None).await;
    let f = follower(&store, &digest).await;
    let mut up = Upstream::new(&data[..100_000], false);
    up.fail_at_end = true;
    let err = read_all(Tee::new(up, w)).await.expect_err("upstream error");
    assert_eq!(err.to_string(), "upstream reset");
    assert!(matches!(read_all(f.body()).await, Err(CacheError::Aborted)));
    assert!(store.lookup(&digest).is_none());
    eventually("tmp/ empty", || {
        files_in(&dir.path().join("tmp")).is_empty()
    })
    .await;
}

#[tokio::test]
async fn tee_keeps_serving_when_the_cache_cannot_take_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100_000);
    let data = content(10, 300_000);
    let digest = sha(&data);
    let w = writer(&store, &digest, None).await;
    let (client, _) = read_all(Tee::new(Upstream::new(&data, true), w))
        .await
        .unwrap();
    assert!(client == data);
    assert!(store.lookup(&digest).is_none());
}

/// Compiles only if the bodies fit the proxy path's `ProxyBody` (a hit's body, and a tee of
/// hyper's `Incoming`).
#[test]
fn bodies_box_into_a_proxy_body() {
    fn boxed(hit: CacheBody, tee: Tee<hyper::body::Incoming>) -> [crate::body::ProxyBody; 2] {
        [hit.map_err(Into::into).boxed_unsync(), tee.boxed_unsync()]
    }
    let _ = boxed;
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mb_per_s(bytes: u64, since: StdInstant) -> f64 {
    bytes as f64 / (1 << 20) as f64 / since.elapsed().as_secs_f64()
}

/// 256 MiB through a writer with a follower reading along, then read back as a hit: memory stays
/// flat (no buffer of the blob anywhere), and the throughput of each path is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_blob_streams_with_flat_memory() {
    const LEN: u64 = 256 << 20;
    let block = content(11, CHUNK_BYTES);
    let chunk = |i: u64| {
        let mut c = block.clone();
        c[..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(c)
    };
    let n = LEN / CHUNK_BYTES as u64;
    let mut hasher = Sha256::new();
    for i in 0..n {
        hasher.update(chunk(i));
    }
    let digest = Digest::from_bytes(hasher.finalize().into());

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let hwm_before = vm_hwm_kib();
    let mut w = writer(&store, &digest, Some(LEN)).await;
    let f = follower(&store, &digest).await;
    let follow = tokio::spawn(async move {
        let start = StdInstant::now();
        let mut body = std::pin::pin!(f.body());
        let (mut hasher, mut len) = (Sha256::new(), 0u64);
        while let Some(frame) = within(body.frame()).await {
            let data = frame.unwrap().into_data().unwrap();
            len += data.len() as u64;
            hasher.update(&data);
        }
        let rate = mb_per_s(len, start);
        (Digest::from_bytes(hasher.finalize().into()), len, rate)
    });
    let start = StdInstant::now();
    for i in 0..n {
        w.write(chunk(i)).await.unwrap();
    }
    let hit = w.commit().await.unwrap();
    let write_rate = mb_per_s(LEN, start);
    let (followed, len, follow_rate) = within(follow).await.unwrap();
    assert_eq!((followed, len), (digest, LEN));

    let start = StdInstant::now();
    let mut body = std::pin::pin!(hit.body(None).await.unwrap());
    let mut read = 0u64;
    while let Some(frame) = within(body.frame()).await {
        read += frame.unwrap().into_data().unwrap().len() as u64;
    }
    assert_eq!(read, LEN);
    let read_rate = mb_per_s(LEN, start);
    println!(
        "256 MiB: write+hash+commit {write_rate:.0} MB/s, follower {follow_rate:.0} MB/s, \
         hit read {read_rate:.0} MB/s"
    );
    if let (Some(before), Some(after)) = (hwm_before, vm_hwm_kib()) {
        // VmHWM is read from per-CPU counters that lag: a later read can be lower.
        let grown_mib = after.saturating_sub(before) / 1024;
        println!("VmHWM grew by {grown_mib} MiB");
        assert!(
            grown_mib < 64,
            "memory grew by {grown_mib} MiB for a 256 MiB blob"
        );
    }
}

/// An upstream that sends the same frame `left` times (like h2's 16 KiB DATA frames).
struct Repeat {
    frame: Bytes,
    left: usize,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.frame.clone()))))
    }
}

/// Measures the write paths: chunks written inline on the async thread (std::fs in the task:
/// the fastest, but it blocks a runtime thread for every write), the [`Writer`] (batches in
/// `spawn_blocking`), and a [`Tee`] fed 16 KiB frames. Informational; run with
/// `cargo test --lib cache::tests::write_paths -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, prints MB/s"]
async fn write_paths_compared() {
    use std::io::Write;
    const LEN: usize = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let digest_of = |block: &Bytes| {
        let mut hasher = Sha256::new();
        for _ in 0..LEN / block.len() {
            hasher.update(block);
        }
        Digest::from_bytes(hasher.finalize().into())
    };

    let block = Bytes::from(content(12, CHUNK_BYTES));
    let start = StdInstant::now();
    let mut file = std::fs::File::create(dir.path().join("inline")).unwrap();
    let mut hasher = Sha256::new();
    for _ in 0..LEN / CHUNK_BYTES {
        file.write_all(&block).unwrap();
        hasher.update(&block);
    }
    file.sync_all().unwrap();
    let inline = mb_per_s(LEN as u64, start);

    let digest = digest_of(&block);
    let start = StdInstant::now();
    let mut w = writer(&store, &digest, None).await;
    for _ in 0..LEN / CHUNK_BYTES {
        w.write(block.clone()).await.unwrap();
    }
    w.commit().await.unwrap();
    let batched = mb_per_s(LEN as u64, start);

    let frame = Bytes::from(content(13, 16 << 10));
    let digest = digest_of(&frame);
    let start = StdInstant::now();
    let w = writer(&store, &digest, None).await;
    let upstream = Repeat {
        left: LEN / frame.len(),
        frame,
    };
    let mut tee = std::pin::pin!(Tee::new(upstream, w));
    while let Some(f) = tee.frame().await {
        f.unwrap();
    }
    let teed = mb_per_s(LEN as u64, start);
    eventually("stored", || store.lookup(&digest).is_some()).await;
    println!(
        "inline std::fs {inline:.0} MB/s, Writer (64 KiB chunks) {batched:.0} MB/s, \
         Tee (16 KiB frames) {teed:.0} MB/s"
    );
}
