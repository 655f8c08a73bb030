//! Configuration: arbitrary TOML → `ConfigFile` → `Config::try_from` never panics, and what it
//! accepts respects the documented bounds. Never touches the filesystem: key/CA/cert file paths
//! are cleared (a lone `tls_cert` or `tls_key` is kept: it is refused before any file is read),
//! and the system trust store is pointed at /dev/null so each run does not read /etc/ssl.
#![no_main]

use std::sync::Once;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use regrelay::config::{Config, ConfigFile, MAX_SESSION_LIFETIME};

fuzz_target!(|text: &str| {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // rustls-native-certs reads only these when set.
        std::env::set_var("SSL_CERT_FILE", "/dev/null");
        std::env::remove_var("SSL_CERT_DIR");
    });

    let Ok(mut raw) = toml::from_str::<ConfigFile>(text) else {
        return;
    };
    raw.config = None;
    raw.upstream_ca = None;
    raw.session_key_file = None;
    if raw.tls_cert.is_some() && raw.tls_key.is_some() {
        raw.tls_cert = None;
        raw.tls_key = None;
    }

    // Flags over an empty file change nothing.
    let merged = raw.clone().over(ConfigFile::default());
    let a = Config::try_from(raw);
    let b = Config::try_from(merged);
    assert_eq!(a.is_ok(), b.is_ok());
    let Ok(c) = a else { return };
    let _ = format!("{c:?}");
    let t = c.timeouts;
    for d in [
        t.header_read,
        t.tls_handshake,
        t.idle,
        t.body_idle,
        t.upstream_connect,
        t.token_request,
        t.h2_keepalive,
        t.shutdown_grace,
    ] {
        // In range both ways: an absurd value used to pass and then panic at start.
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(86_400));
        let _ = std::time::Instant::now().checked_add(d).expect("a deadline that fits");
    }
    let l = c.limits;
    assert!(l.max_connections >= 1 && l.max_requests >= 1 && l.max_upstream_connections >= 1);
    assert!(l.h2_max_concurrent_streams >= 1 && l.max_header_bytes >= 8192);
    assert!(l.fds_needed(c.upstreams.len()) < u64::MAX);
    assert!(
        c.session_lifetime >= Duration::from_secs(1) && c.session_lifetime <= MAX_SESSION_LIFETIME
    );
    assert!(c.token_cache_max_entries >= 1);
    assert_ne!(c.upload_chunk_max, Some(0));
    assert!(c.tls.is_none());
    assert_ne!(c.registry.effective_port(), 0);
});
