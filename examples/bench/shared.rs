//! Case 7b: the cache replicas share on object storage (`--cache-store`, issue 26), on a real
//! single-node Garage: a warm hit read from the bucket by a replica with an empty local tier,
//! beside a warm hit from local disk and the direct download; and a cold miss through the bucket
//! (lease, fetch, upload) beside regrelay without a cache, the registry over the link of case 7.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{cache_relay, fresh_cache_dir, median, relay_with_session, Bench, Pulls, HIT, LINK};
use crate::client::{self, Endpoint, Proto};
use crate::report::{Case, Goal, Measurement};
use crate::support::garage::Garage;
use crate::{delay, http, procs, Blob, MIB, REPO};

const BUCKET_HIT: &str = "regrelay+bucket hit";
const BUCKET_DIRECT: &str = "object store direct";
const BUCKET_MISS_LINK: &str = "regrelay+bucket miss, registry over a link";

/// A new regrelay on an empty local tier sharing `garage`'s bucket under `prefix`.
async fn bucket_relay(
    b: &Bench,
    name: &str,
    registry: SocketAddr,
    garage: &Garage,
    creds: &tempfile::NamedTempFile,
    prefix: &str,
    max_bytes: u64,
) -> Result<(procs::Proc, Endpoint, tempfile::TempDir), String> {
    let dir = fresh_cache_dir(b)?;
    let mut args = vec![
        "--cache-dir".to_owned(),
        dir.path().display().to_string(),
        "--cache-max-bytes".to_owned(),
        max_bytes.to_string(),
    ];
    args.extend(garage.flags(prefix, creds));
    let (proc, ep) = relay_with_session(b, name, registry, &args).await?;
    Ok((proc, ep, dir))
}

/// GET of `blob` through `ep`, checked to be answered as `want` says (`X-Regrelay-Cache`;
/// empty for a miss), with the CPU seconds of `pid` meanwhile.
async fn pull_as(
    b: &Bench,
    ep: &Endpoint,
    pid: Option<u32>,
    blob: &Blob,
    want: &str,
) -> (Result<client::Reply, String>, f64) {
    b.metered(pid, async {
        let reply = client::download(ep, REPO, &blob.digest, blob.len).await?;
        match reply.cache == want {
            true => Ok(reply),
            false => Err(format!(
                "X-Regrelay-Cache {:?} (wanted {want:?})",
                reply.cache
            )),
        }
    })
    .await
}

/// Waits until the bucket holds `blob` under `prefix` (the upload follows the client's last
/// byte), so that no upload runs into the next measurement.
async fn uploaded(garage: &Garage, prefix: &str, blob: &Blob) -> Result<(), String> {
    let key = format!(
        "{prefix}/blobs/sha256/{}",
        blob.digest.trim_start_matches("sha256:")
    );
    let end = Instant::now() + Duration::from_secs(120);
    while !garage.has(&key).await {
        if Instant::now() > end {
            return Err("the blob did not reach the bucket within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn shared(b: &Bench) -> Case {
    let title = format!(
        "7b. Shared cache on object storage (Garage), real registry: {} MiB blob, median of {}",
        b.s.cache_mib, b.s.rounds
    );
    let Some(direct) = b
        .fronts
        .iter()
        .find(|f| f.name == "direct")
        .and_then(|f| f.registry)
    else {
        return Case::skip("shared", title, "no registry");
    };
    if !procs::have("garage") {
        return Case::skip("shared", title, "garage is not installed");
    }
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let creds = garage.credentials_file();
    let blob = b.blob(b.s.cache_mib);
    let direct_ep = Endpoint {
        base: http(direct.addr),
        proto: Proto::H1,
        auth: Some(format!("Bearer {}", b.jwt)),
    };
    // The warm local tier (as in case 7), and the warm bucket filled by another replica.
    let (warm, max_bytes) = match super::warm_cache(b, direct.addr, &direct_ep, blob).await {
        Ok(warm) => warm,
        Err(e) => return Case::skip("shared", title, e),
    };
    let filled = async {
        let fill = "regrelay-bucket-fill";
        let (_p, ep, _dir) =
            bucket_relay(b, fill, direct.addr, &garage, &creds, "warm", max_bytes).await?;
        pull_as(b, &ep, None, blob, "").await.0?;
        uploaded(&garage, "warm", blob).await
    };
    if let Err(e) = filled.await {
        return Case::skip("shared", title, format!("cannot fill the bucket: {e}"));
    }
    let warm_key = format!(
        "warm/blobs/sha256/{}",
        blob.digest.trim_start_matches("sha256:")
    );
    // direct, local hit, bucket hit, the object store read directly.
    let mut t: [Pulls; 4] = Default::default();
    for round in 0..b.s.rounds {
        for k in 0..t.len() {
            let i = (k + round) % t.len();
            match i {
                0 => {
                    let (r, _) = pull_as(b, &direct_ep, None, blob, "").await;
                    t[0].add(r, 0.0, blob.len);
                }
                // As in case 7: the first GET of a new regrelay earns the grant (a HEAD), the
                // second is the hit measured.
                1 => {
                    let name = format!("regrelay-local-hit-{round}");
                    match cache_relay(b, &name, direct.addr, warm.path(), max_bytes).await {
                        Err(e) => t[1].down.add(Err(e), 0.0),
                        Ok((proc, ep)) => {
                            let _ = pull_as(b, &ep, None, blob, "hit").await;
                            procs::reset_peak_rss(proc.pid());
                            let (r, cpu) = pull_as(b, &ep, Some(proc.pid()), blob, "hit").await;
                            t[1].add(r, cpu, blob.len);
                            t[1].rss = t[1].rss.max(procs::peak_rss_mib(proc.pid()));
                        }
                    }
                }
                // The object store's own speed here: curl reads the object by a presigned URL.
                3 => {
                    let url = garage.presigned_get(&warm_key);
                    let (r, _) = b.metered(None, client::download_url(&url, blob.len)).await;
                    t[3].add(r, 0.0, blob.len);
                }
                // A new replica with an empty local tier: its one GET is read from the bucket
                // (after the registry's yes to a HEAD) and verified into the local tier.
                _ => {
                    debug_assert_eq!(i, 2);
                    let name = format!("regrelay-bucket-hit-{round}");
                    let relay =
                        bucket_relay(b, &name, direct.addr, &garage, &creds, "warm", max_bytes);
                    match relay.await {
                        Err(e) => t[2].down.add(Err(e), 0.0),
                        Ok((proc, ep, _dir)) => {
                            procs::reset_peak_rss(proc.pid());
                            let (r, cpu) = pull_as(b, &ep, Some(proc.pid()), blob, "shared").await;
                            t[2].add(r, cpu, blob.len);
                            t[2].rss = t[2].rss.max(procs::peak_rss_mib(proc.pid()));
                        }
                    }
                }
            }
        }
        eprintln!("  round {}/{} done", round + 1, b.s.rounds);
    }
    let link = over_link(b, direct.addr, blob, &garage, &creds, max_bytes).await;
    let paths = [
        "direct",
        HIT,
        BUCKET_HIT,
        BUCKET_DIRECT,
        LINK,
        BUCKET_MISS_LINK,
    ];
    let mut ms = vec![];
    for (path, mut p) in paths.into_iter().zip(t.into_iter().chain(link)) {
        let metered = path != "direct" && path != BUCKET_DIRECT;
        let rss = metered.then_some(p.rss);
        let mut down = p.down.figure("download", path, metered);
        let mut ttfb = Measurement::new("time to first byte", "ms", path, median(&mut p.ttfb));
        down.peak_rss_mib = rss;
        ttfb.peak_rss_mib = rss;
        down.goal = match path {
            BUCKET_HIT => Some(Goal::AtLeast {
                vs: HIT,
                ratio: 0.8,
            }),
            BUCKET_MISS_LINK => Some(Goal::AtLeast {
                vs: LINK,
                ratio: 0.9,
            }),
            _ => None,
        };
        ms.extend([down, ttfb]);
    }
    let metrics = ["download", "time to first byte"]
        .map(String::from)
        .to_vec();
    Case {
        id: "shared",
        title,
        about: format!(
            "regrelay with --cache-dir and --cache-store on a single-node Garage (its data on \
             the bench's scratch directory), in front of the real registry. Local hit: as in \
             case 7 (a new regrelay on a warm --cache-dir, its second GET). Bucket hit: a new \
             regrelay with an empty --cache-dir sharing a bucket another replica warmed; its one \
             GET asks the bucket (HEAD), the registry (HEAD with this client's token), then \
             streams the object from the bucket to the client while verifying it into its local \
             tier (X-Regrelay-Cache: shared). Goal: ≥ 0.8× the local hit (the `× regrelay+cache \
             hit` column). Object store direct: curl reads the same object \
             from Garage by a presigned URL, the store's own speed on this machine (what a \
             bucket hit cannot exceed). Over the link of case 7 ({} ms round trip, {} MiB in \
             flight): regrelay without a cache, and a cold miss through the bucket (a new \
             regrelay and a new prefix each round: the bucket's HEAD, the lease's write, settle \
             and read, the registry's GET streamed to the client and the local tier; the upload \
             to the bucket follows the client's last byte and is awaited before the next \
             measurement). Goal: ≥ 0.9× no cache.",
            b.s.cache_link_rtt_ms, b.s.cache_link_window_mib
        ),
        measurements: super::arrange(ms, &metrics, &paths),
        baseline: Some(HIT),
        skipped: None,
    }
}

/// The registry over case 7's delay line: regrelay without a cache, and a cold miss through
/// the bucket (a new replica and a new prefix each round), taking turns.
async fn over_link(
    b: &Bench,
    registry: SocketAddr,
    blob: &Blob,
    garage: &Garage,
    creds: &tempfile::NamedTempFile,
    max_bytes: u64,
) -> [Pulls; 2] {
    let mut t: [Pulls; 2] = Default::default();
    let rtt = Duration::from_millis(b.s.cache_link_rtt_ms.max(1));
    let window = (b.s.cache_link_window_mib * MIB) as usize;
    let line = delay::DelayLine::start(registry, rtt, window).await;
    let plain = relay_with_session(b, "regrelay-link-nocache", line.addr, &[]).await;
    for round in 0..b.s.rounds {
        for k in 0..t.len() {
            let i = (k + round) % t.len();
            if i == 0 {
                match &plain {
                    Err(e) => t[0].down.add(Err(e.clone()), 0.0),
                    Ok((proc, ep)) => {
                        let (r, cpu) = pull_as(b, ep, Some(proc.pid()), blob, "").await;
                        t[0].add(r, cpu, blob.len);
                        t[0].rss = t[0].rss.max(procs::peak_rss_mib(proc.pid()));
                    }
                }
                continue;
            }
            let (name, prefix) = (
                format!("regrelay-bucket-miss-{round}"),
                format!("cold-{round}"),
            );
            match bucket_relay(b, &name, line.addr, garage, creds, &prefix, max_bytes).await {
                Err(e) => t[1].down.add(Err(e), 0.0),
                Ok((proc, ep, _dir)) => {
                    procs::reset_peak_rss(proc.pid());
                    let (r, cpu) = pull_as(b, &ep, Some(proc.pid()), blob, "").await;
                    t[1].add(r, cpu, blob.len);
                    t[1].rss = t[1].rss.max(procs::peak_rss_mib(proc.pid()));
                    if let Err(e) = uploaded(garage, &prefix, blob).await {
                        t[1].down.add(Err(e), 0.0);
                    }
                }
            }
        }
        eprintln!("  over the link: round {}/{} done", round + 1, b.s.rounds);
    }
    t
}
