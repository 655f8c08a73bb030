//! Case 8, the hostile soak (issue 20): `support::soak` against a release regrelay of its own
//! (defaults, `--session-cache-max-bytes 16 MiB`), for `BENCH_HOSTILE_SECS` (60): every hostile
//! client at once from other loopback addresses while a legitimate client pushes, pulls, sends
//! manifest `HEAD`s and health checks. The figures: the `HEAD` latency unloaded and under attack
//! (goal: p99 within 3x), and in the notes what failed, regrelay's peak memory and its file
//! descriptors before, at their height and after.

use std::time::Duration;

use crate::report::{Case, Goal, Measurement};
use crate::support;

/// Runs the soak for `secs`.
pub async fn hostile(secs: u64) -> Case {
    let title = format!(
        "8. Hostile soak, {secs} s: every hostile client at once, a legitimate one beside them"
    );
    let (gl, reg) = support::soak::world().await;
    let cache: u64 = 16 << 20;
    let px = support::Regrelay::process(&[
        "--registry",
        &reg.url(),
        "--session-cache-max-bytes",
        &cache.to_string(),
    ]);
    let r = support::soak::run(&px, Duration::from_secs(secs)).await;
    for line in r.lines() {
        eprintln!("  {line}");
    }
    let summary = format!(
        "{} of {} legitimate requests failed; {} of {} health checks failed; {} pushes+pulls; \
         peak RSS {} MiB; fds {} before, {} at most, {} after ({} of them pooled upstream \
         connections)",
        r.legit_failures.len(),
        r.legit,
        r.health_failures.len(),
        r.health,
        r.transfers,
        r.peak_rss_kib >> 10,
        r.fds.0,
        r.fds.1,
        r.fds.2,
        r.pooled_after
    );
    let mut measurements = vec![];
    for (metric, unloaded, loaded) in [
        (
            "manifest HEAD p50",
            r.head_unloaded_ms.0,
            r.head_loaded_ms.0,
        ),
        (
            "manifest HEAD p99",
            r.head_unloaded_ms.1,
            r.head_loaded_ms.1,
        ),
    ] {
        measurements.push(Measurement::new(metric, "ms", "unloaded", Some(unloaded)));
        let mut m = Measurement::new(metric, "ms", "under attack", Some(loaded));
        m.peak_rss_mib = Some((r.peak_rss_kib as f64) / 1024.0);
        if metric.ends_with("p99") {
            m.goal = Some(Goal::AtLeast {
                vs: "unloaded",
                ratio: 1.0 / 3.0,
            });
            m.note = summary.clone();
        }
        measurements.push(m);
    }
    drop((px, reg, gl));
    Case {
        id: "hostile",
        title,
        about:
            "For the whole case, from 127.0.0.2 and up: 21 HTTP/2 connections x 100 zero-window \
                streams of /-/healthy and 3 x 100 of /v2/, paced rapid resets (100/s), 100 \
                slowloris and 100 idle sockets, sessions of the largest shape allowed and \
                1,000-scope token requests (20/s each), hammering of a repository the session \
                may not pull (100/s), 246 KB OAuth2 forms (10/s). Meanwhile on 127.0.0.1 skopeo \
                pushes and pulls an image every 8 s and manifest HEADs are timed every 5 ms on a \
                thread of their own; health checks every 100 ms."
                .into(),
        measurements,
        baseline: Some("unloaded"),
        skipped: None,
    }
}
