use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::*;

fn sha(data: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(data).into())
}

#[test]
fn grants_expire_and_can_be_revoked() {
    let g = Grants::default();
    let now = Instant::now();
    let until = now + Duration::from_secs(300);
    g.grant("alice", "https://gitlab", "group/app", until);
    assert!(g.is_granted("alice", "https://gitlab", "group/app", now));
    assert!(!g.is_granted("bob", "https://gitlab", "group/app", now));
    assert!(!g.is_granted("alice", "https://other", "group/app", now));
    assert!(!g.is_granted("alice", "https://gitlab", "group/lib", now));
    assert!(!g.is_granted("alice", "https://gitlab", "group/app", until));
    assert_eq!(g.grants_len(), 0, "expired grants are dropped when met");
    g.grant("alice", "https://gitlab", "group/app", until);
    g.revoke("alice", "https://gitlab", "group/app");
    assert!(!g.is_granted("alice", "https://gitlab", "group/app", now));
    // A new proof replaces the old one.
    g.grant("alice", "https://gitlab", "group/app", until);
    g.grant(
        "alice",
        "https://gitlab",
        "group/app",
        now + Duration::from_secs(10),
    );
    assert!(!g.is_granted(
        "alice",
        "https://gitlab",
        "group/app",
        now + Duration::from_secs(60)
    ));
    g.grant("a", "u", "r1", now + Duration::from_secs(1));
    g.grant("b", "u", "r2", now + Duration::from_secs(5));
    assert_eq!(g.sweep(now + Duration::from_secs(2)), 1);
    assert_eq!(g.grants_len(), 1);
}

#[test]
fn may_serve_in_needs_a_sighting_in_that_repository_and_a_grant() {
    let g = Grants::default();
    let now = Instant::now();
    let until = now + Duration::from_secs(300);
    let (up, d, other) = ("https://gitlab", sha(b"layer"), sha(b"other layer"));
    g.seen(up, "group/app", &d);
    g.grant("alice", up, "group/app", until);
    g.grant("bob", up, "group/lib", until);
    assert!(g.may_serve_in("alice", up, "group/app", &d, now));
    // Seen in another repository than the one asked for: refused.
    g.seen(up, "group/secret", &other);
    g.grant("alice", up, "group/secret2", until);
    assert!(!g.may_serve_in("alice", up, "group/app", &other, now));
    assert!(!g.may_serve_in("alice", up, "group/secret2", &other, now));
    // A grant for another principal: refused.
    assert!(!g.may_serve_in("bob", up, "group/app", &d, now));
    // Bob's grant is for a repository where the digest was not seen: refused.
    assert!(!g.may_serve_in("bob", up, "group/lib", &d, now));
    // Another upstream: refused.
    assert!(!g.may_serve_in("alice", "https://elsewhere", "group/app", &d, now));
    // Expired: refused.
    assert!(!g.may_serve_in("alice", up, "group/app", &d, until));
    assert!(!g.may_serve_in("alice", up, "group/app", &d, now));

    // The loose check finds a granted repository where the digest was seen.
    g.grant("carol", up, "group/app", until);
    g.grant("carol", up, "group/unrelated", until);
    assert_eq!(
        g.may_serve("carol", up, &d, now).as_deref(),
        Some("group/app")
    );
    assert_eq!(g.may_serve("carol", "https://elsewhere", &d, now), None);
    assert_eq!(g.may_serve("bob", up, &d, now), None);
    assert_eq!(g.may_serve("carol", up, &d, until), None);
}

#[test]
fn grants_and_sightings_are_bounded() {
    let g = Grants::new(3, 4);
    let now = Instant::now();
    let secs = |s| now + Duration::from_secs(s);
    g.grant("p", "u", "r1", secs(50));
    g.grant("p", "u", "r2", secs(10));
    g.grant("p", "u", "r3", secs(30));
    g.grant("p", "u", "r4", secs(40));
    assert_eq!(g.grants_len(), 3);
    assert!(
        !g.is_granted("p", "u", "r2", now),
        "the soonest to expire went"
    );
    for r in ["r1", "r3", "r4"] {
        assert!(g.is_granted("p", "u", r, now), "{r}");
    }

    let ds: Vec<Digest> = (0u8..6).map(|i| sha(&[i])).collect();
    for d in &ds[..4] {
        g.seen("u", "r1", d);
    }
    g.seen("u", "r1", &ds[0]); // seen again: now the most recent
    g.seen("u", "r1", &ds[4]);
    g.seen("u", "r1", &ds[5]);
    assert!(g.seen_len() <= 4);
    let kept: Vec<usize> = (0..6)
        .filter(|&i| g.may_serve_in("p", "u", "r1", &ds[i], now))
        .collect();
    assert_eq!(kept, [0, 4, 5], "the least recently seen went");
    // Repeated sightings take no room.
    for _ in 0..10_000 {
        g.seen("u", "r1", &ds[5]);
    }
    assert_eq!(g.seen_len(), 3);
    // Forgotten repositories are freed: sightings in many repositories stay bounded.
    for i in 0..1000 {
        g.seen("u", &format!("repo-{i}"), &ds[1]);
    }
    assert!(g.seen_len() <= 4);
}

/// Cache hits ask the table on every request: a panic elsewhere while it was held must not
/// make every later pull panic.
#[test]
fn a_panic_while_the_table_is_held_fails_no_later_pull() {
    let g = Grants::new(8, 8);
    let until = Instant::now() + Duration::from_secs(60);
    g.grant("alice", "default", "g/p", until);
    crate::lock::poison(&g.table);
    assert!(g.is_granted("alice", "default", "g/p", Instant::now()));
    g.grant("bob", "default", "g/p", until);
    assert!(g.is_granted("bob", "default", "g/p", Instant::now()));
    assert_eq!(g.grants_len(), 2);
}

/// Measures the memory of the sightings and grants tables at their default caps. Informational; run with
/// `cargo test --lib cache::grants::tests::sightings_memory -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, prints bytes per sighting"]
fn sightings_memory() {
    let rss_kib = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let g = Grants::default();
    let before = rss_kib();
    for i in 0..DEFAULT_MAX_SEEN as u64 {
        let repo = format!("group/project-{}", i % 5000);
        g.seen("https://gitlab.example.com", &repo, &sha(&i.to_le_bytes()));
    }
    let after = rss_kib();
    assert_eq!(g.seen_len(), DEFAULT_MAX_SEEN);
    let seen_kib = after - before;
    let grants = Grants::default();
    let before = rss_kib();
    let until = Instant::now() + Duration::from_secs(300);
    for i in 0..DEFAULT_MAX_GRANTS {
        let principal = format!("{:064x}", i / 4);
        grants.grant(
            &principal,
            "https://gitlab.example.com",
            &format!("group/p-{i}"),
            until,
        );
    }
    let per_grant = (rss_kib() - before) * 1024 / DEFAULT_MAX_GRANTS as u64;
    println!("{DEFAULT_MAX_GRANTS} grants (4 a principal): {per_grant} B each");
    println!(
        "{DEFAULT_MAX_SEEN} sightings: RSS +{} MiB, {} B each",
        seen_kib / 1024,
        seen_kib * 1024 / DEFAULT_MAX_SEEN as u64
    );
}
