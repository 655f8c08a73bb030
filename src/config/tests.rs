use std::path::Path;

use super::*;

fn raw(registry: &str) -> ConfigFile {
    ConfigFile {
        registry: Some(registry.into()),
        ..ConfigFile::default()
    }
}

fn err_of(raw: ConfigFile) -> String {
    Config::try_from(raw).unwrap_err().to_string()
}

#[test]
fn defaults_apply() {
    let c = Config::try_from(raw("http://127.0.0.1:5001")).unwrap();
    assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(
        c.timeouts.body_idle,
        Duration::from_secs(DEFAULT_BODY_IDLE_TIMEOUT_SECS)
    );
    assert_eq!(c.upload_split, UploadSplit::Auto);
    assert!(c.tls.is_none() && c.public_url.is_none());
}

#[test]
fn errors_name_the_key() {
    let with = |f: fn(&mut ConfigFile)| {
        let mut c = raw("http://r");
        f(&mut c);
        c
    };
    let cases: Vec<(ConfigFile, &str)> = vec![
        (ConfigFile::default(), "`registry`"),
        (raw("ftp://x"), "`registry`"),
        (raw("http://r/some/path"), "`registry`"),
        (raw("http://user:pw@r"), "`registry`"),
        (raw("http://r:0"), "`registry`"),
        (
            with(|c| c.public_url = Some(vec!["nope".into()])),
            "`public_url`",
        ),
        (with(|c| c.listen = Some("localhost".into())), "`listen`"),
        (
            with(|c| c.listen = Some("1.2.3.4:70000".into())),
            "`listen`",
        ),
        (with(|c| c.tls_cert = Some("/x".into())), "`tls_key`"),
        (with(|c| c.max_connections = Some(0)), "`max_connections`"),
        (with(|c| c.max_requests = Some(0)), "`max_requests`"),
        (
            with(|c| c.max_upstream_connections = Some(0)),
            "`max_upstream_connections`",
        ),
        (
            with(|c| c.h2_max_concurrent_streams = Some(0)),
            "`h2_max_concurrent_streams`",
        ),
        (
            with(|c| c.max_header_bytes = Some(100)),
            "`max_header_bytes`",
        ),
        (with(|c| c.max_headers = Some(100_000)), "`max_headers`"),
        (
            with(|c| c.body_idle_timeout_secs = Some(0)),
            "`body_idle_timeout_secs`",
        ),
        // Absurd values used to pass and then panic at start (timer overflow).
        (
            with(|c| c.header_read_timeout_secs = Some(u64::MAX)),
            "`header_read_timeout_secs`",
        ),
        (
            with(|c| c.shutdown_grace_secs = Some(u64::MAX / 2)),
            "`shutdown_grace_secs`",
        ),
        (
            with(|c| c.tls_handshake_timeout_secs = Some(100_000)),
            "`tls_handshake_timeout_secs`",
        ),
        (
            with(|c| c.idle_timeout_secs = Some(0)),
            "`idle_timeout_secs`",
        ),
        (
            with(|c| c.token_timeout_secs = Some(86_400)),
            "`token_timeout_secs`",
        ),
        (
            with(|c| c.token_realm = Some("/jwt/auth".into())),
            "`token_realm`",
        ),
        (
            with(|c| c.auth_redirect_allow = Some(vec!["user@host".into()])),
            "`auth_redirect_allow`",
        ),
        (
            with(|c| c.auth_redirect_allow = Some(vec!["gitlab.example.com".into()])),
            "`auth_redirect_allow`",
        ),
        (
            with(|c| c.trusted_proxies = Some(vec!["10.0.0.0/33".into()])),
            "`trusted_proxies`",
        ),
        (
            with(|c| c.session_lifetime_secs = Some(86_401)),
            "`session_lifetime_secs`",
        ),
        (
            with(|c| c.token_cache_max_entries = Some(0)),
            "`token_cache_max_entries`",
        ),
        (with(|c| c.upload_chunk_max = Some(0)), "`upload_chunk_max`"),
        (
            with(|c| c.client_share_percent = Some(0)),
            "`client_share_percent`",
        ),
        (
            with(|c| c.client_share_percent = Some(101)),
            "`client_share_percent`",
        ),
        (
            with(|c| c.h2_stall_timeout_secs = Some(0)),
            "`h2_stall_timeout_secs`",
        ),
        (
            with(|c| c.session_cache_max_bytes = Some(1000)),
            "`session_cache_max_bytes`",
        ),
        (
            with(|c| c.inject_credentials_for = Some(vec!["10.0.0.0/40".into()])),
            "`inject_credentials_for`",
        ),
    ];
    for (c, key) in cases {
        let msg = err_of(c);
        assert!(msg.contains(key), "{msg:?} should name {key}");
    }
}

#[test]
fn a_realm_on_regrelay_itself_is_refused() {
    let cases = [
        ("0.0.0.0:5000", None, "http://127.0.0.1:5000/jwt/auth", true),
        (
            "127.0.0.1:5000",
            None,
            "http://localhost:5000/jwt/auth",
            true,
        ),
        (
            "127.0.0.1:5000",
            Some("https://px.example.com"),
            "https://px.example.com/jwt/auth",
            true,
        ),
        (
            "127.0.0.1:5000",
            None,
            "http://127.0.0.1:5001/jwt/auth",
            false,
        ),
        (
            "0.0.0.0:443",
            None,
            "https://gitlab.example.com/jwt/auth",
            false,
        ),
    ];
    for (listen, public, realm, refused) in cases {
        let c = ConfigFile {
            listen: Some(listen.into()),
            public_url: public.map(|p: &str| vec![p.to_owned()]),
            token_realm: Some(realm.into()),
            ..raw("http://r:5001")
        };
        let got = Config::try_from(c).map_err(|e| e.to_string());
        assert_eq!(
            got.is_err(),
            refused,
            "{listen} {public:?} {realm}: {got:?}"
        );
    }
}

#[test]
fn flags_win_over_file_and_unknown_keys_and_huge_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "registry = \"http://file:1\"\nlisten = \"127.0.0.1:7\"\n",
    )
    .unwrap();
    let cli = ConfigFile {
        config: Some(path.clone()),
        registry: Some("http://flag:2".into()),
        ..ConfigFile::default()
    };
    let c = Config::load(cli).unwrap();
    assert_eq!(c.registry.to_string(), "http://flag:2");
    assert_eq!(c.listen.port(), 7);
    let load = |path: &Path| {
        Config::load(ConfigFile {
            config: Some(path.to_owned()),
            ..ConfigFile::default()
        })
        .unwrap_err()
        .to_string()
    };
    std::fs::write(&path, "registy = \"http://typo\"\n").unwrap();
    assert!(load(&path).contains("registy"));
    let mut big = "# padding\n".repeat(120_000);
    big.push_str("registry = \"http://r\"\n");
    std::fs::write(&path, big).unwrap();
    let msg = load(&path);
    assert!(msg.contains("larger than"), "{msg}");
}

#[test]
fn upstreams_from_flags_and_toml_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        r#"
registry = "https://registry.gitlab.example.com"
public_url = "https://relay.example.com:5000"
root_upstream = "docker.io"
inject_credentials_for = ["10.0.0.0/8"]

[[upstream]]
name = "docker.io"
url = "https://gitlab.example.com/v2/my-group/dependency_proxy/containers/"
token_realm = "https://gitlab.example.com/jwt/auth"
credentials_file = "/etc/regrelay/hub.creds"
auth_redirect_allow = ["https://sso.gitlab.example.com"]
"#,
    )
    .unwrap();
    let c = Config::load(ConfigFile {
        config: Some(path.clone()),
        upstream: Some(vec!["GHCR.io=https://ghcr.io".into()]),
        upstream_credentials: Some(vec![
            "registry.gitlab.example.com=/etc/regrelay/gl.creds".into()
        ]),
        ..ConfigFile::default()
    })
    .unwrap();
    let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        ["registry.gitlab.example.com", "ghcr.io", "docker.io"]
    );
    assert!(c.upstreams[0].answers_to("relay.example.com:5000"));
    assert_eq!(
        c.upstreams[2].prefix,
        "my-group/dependency_proxy/containers"
    );
    assert_eq!(
        c.upstreams[2].origin.to_string(),
        "https://gitlab.example.com"
    );
    assert!(c.upstreams[2].token_realm.is_some());
    assert_eq!(c.upstreams[2].auth_redirect_allow.len(), 1);
    assert!(c.upstreams[1].auth_redirect_allow.is_empty());
    assert_eq!(c.root_upstream, 2);
    assert_eq!(
        c.upstreams[0].credentials_file.as_deref(),
        Some(Path::new("/etc/regrelay/gl.creds"))
    );
    assert!(c.inject_credentials_for[0].contains("10.1.2.3".parse().unwrap()));
    let bad = |f: fn(&mut ConfigFile)| {
        let mut raw = raw("http://r:5000");
        f(&mut raw);
        err_of(raw)
    };
    for (msg, key) in [
        (
            bad(|c| c.upstream = Some(vec!["noequals".into()])),
            "`upstream`",
        ),
        (
            bad(|c| c.upstream = Some(vec!["a/b=http://x".into()])),
            "`upstream`",
        ),
        (
            bad(|c| c.upstream = Some(vec!["x=http://h/other/path".into()])),
            "`upstream`",
        ),
        (
            bad(|c| c.upstream = Some(vec!["x=http://h/v2/../up".into()])),
            "`upstream`",
        ),
        (
            bad(|c| c.upstream = Some(vec!["r:5000=http://other".into()])),
            "`upstream`",
        ),
        (
            bad(|c| c.upstream_credentials = Some(vec!["nobody=/f".into()])),
            "`upstream_credentials`",
        ),
        (
            bad(|c| c.root_upstream = Some("nobody".into())),
            "`root_upstream`",
        ),
    ] {
        assert!(msg.contains(key), "{msg}");
    }
}

#[test]
fn origins_compare_by_effective_port() {
    let a = Origin::parse("registry", "https://Registry.example.com").unwrap();
    let b = Origin::of(&"https://registry.example.com:443/v2/x".parse().unwrap()).unwrap();
    let c = Origin::of(&"http://registry.example.com/v2/x".parse().unwrap()).unwrap();
    assert!(a.same_as(&b));
    assert!(!a.same_as(&c));
}

#[test]
fn redirect_allow_entries_match_scheme_host_and_port() {
    let o = |s: &str| Origin::of(&s.parse().unwrap()).unwrap();
    let cases = [
        (
            "https://gitlab.example.com",
            "https://GitLab.example.com/jwt/auth",
            true,
        ),
        (
            "https://gitlab.example.com",
            "http://gitlab.example.com/jwt/auth",
            false,
        ),
        (
            "https://gitlab.example.com",
            "https://gitlab.example.com:8443/x",
            false,
        ),
        (
            "https://gitlab.example.com:8443",
            "https://gitlab.example.com:8443/x",
            true,
        ),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9001/x", false),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/x", true),
        (
            "https://other.example.com",
            "https://gitlab.example.com/x",
            false,
        ),
    ];
    for (entry, url, want) in cases {
        assert_eq!(
            AllowedOrigin::parse(entry).unwrap().matches(&o(url)),
            want,
            "{entry} {url}"
        );
    }
}

#[test]
fn cidr_table() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let cases = [
        ("10.0.0.0/8", "10.1.2.3", true),
        ("10.0.0.0/8", "11.0.0.1", false),
        ("192.0.2.7", "192.0.2.7", true),
        ("192.0.2.7", "192.0.2.8", false),
        ("0.0.0.0/0", "203.0.113.9", true),
        ("127.0.0.0/8", "::ffff:127.0.0.1", true),
        ("::1/128", "::1", true),
        ("fd00::/8", "fd12::1", true),
        ("fd00::/8", "10.0.0.1", false),
    ];
    for (net, addr, want) in cases {
        assert_eq!(
            Cidr::parse("trusted_proxies", net)
                .unwrap()
                .contains(ip(addr)),
            want,
            "{net} {addr}"
        );
    }
}

#[test]
fn secret_files_are_private_to_the_owner_or_to_our_own_group() {
    let ours = [1000, 65532];
    let cases = [
        (0o600, 0, true),
        (0o400, 0, true),
        // Kubernetes Secret volume with fsGroup 65532: group-readable by the pod's group only.
        (0o440, 65532, true),
        (0o440, 0, false),
        (0o460, 65532, false),
        (0o444, 65532, false),
        (0o604, 0, false),
        (0o640, 5, false),
    ];
    for (mode, gid, ok) in cases {
        assert_eq!(private_enough(mode, gid, &ours), ok, "{mode:o} gid {gid}");
    }
}

#[test]
fn shares_are_a_percentage_of_each_pool() {
    let c = Config::try_from(raw("http://r")).unwrap();
    assert_eq!(c.limits.client_share_percent, DEFAULT_CLIENT_SHARE_PERCENT);
    assert_eq!(c.limits.client_share(2048), 512);
    assert_eq!(c.limits.client_share(256), 64);
    assert_eq!(c.limits.client_share(3), 1, "at least one, rounded up");
    assert_eq!(c.timeouts.h2_stall.as_secs(), DEFAULT_H2_STALL_TIMEOUT_SECS);
    assert_eq!(
        c.session_cache_max_bytes as u64,
        DEFAULT_SESSION_CACHE_MAX_BYTES
    );
    let mut all = raw("http://r");
    all.client_share_percent = Some(100);
    let c = Config::try_from(all).unwrap();
    assert_eq!(c.limits.client_share(2048), 2048);
}

#[test]
fn injection_ranges_covering_a_trusted_front_are_refused_unless_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    let cfg = |trusted: &[&str], inject: Option<&[&str]>, ack: Option<bool>| {
        let mut c = raw("http://r");
        c.upstream = Some(vec!["docker.io=https://registry-1.docker.io".into()]);
        c.upstream_credentials = Some(vec![format!("docker.io={}", creds.display())]);
        c.trusted_proxies = Some(trusted.iter().map(|s| s.to_string()).collect());
        c.inject_credentials_for = inject.map(|v| v.iter().map(|s| s.to_string()).collect());
        c.inject_through_trusted_proxies = ack;
        Config::try_from(c).map(|_| ()).map_err(|e| e.to_string())
    };
    // The default injection range (loopback) covers a front on the same host.
    let err = cfg(&["127.0.0.1/32"], None, None).unwrap_err();
    assert!(
        err.contains("127.0.0.0/8 covers the trusted front 127.0.0.1/32")
            && err.contains("--inject-through-trusted-proxies"),
        "{err}"
    );
    assert!(cfg(&["127.0.0.1/32"], None, Some(true)).is_ok());
    // A front elsewhere, or injection for a node's own addresses only: fine.
    assert!(cfg(&["10.0.0.0/8"], None, None).is_ok());
    assert!(cfg(&["10.0.0.1"], Some(&["10.0.0.0/30"]), None).is_err());
    assert!(cfg(&["10.0.0.8"], Some(&["10.0.0.0/30"]), None).is_ok());
    // Without injected credentials nothing is injected, so nothing to refuse.
    let mut plain = raw("http://r");
    plain.trusted_proxies = Some(vec!["127.0.0.1".into()]);
    assert!(Config::try_from(plain).is_ok());
}

#[test]
fn cidrs_overlap_when_they_share_an_address() {
    let c = |s| Cidr::parse("trusted_proxies", s).unwrap();
    assert!(c("10.0.0.0/8").overlaps(&c("10.1.0.0/16")));
    assert!(c("10.1.0.0/16").overlaps(&c("10.0.0.0/8")));
    assert!(!c("10.0.0.0/8").overlaps(&c("11.0.0.0/8")));
    assert!(c("::/0").overlaps(&c("::1/128")));
    assert!(!c("127.0.0.0/8").overlaps(&c("::1/128")));
    assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
}

/// `--listen :5000` and `localhost:5000` (issue 23, finding 7) were refused as "invalid socket
/// address syntax"; a host name other than localhost is refused saying what to write instead.
#[test]
fn listen_addresses_as_people_write_them() {
    let listen = |s: &str| {
        let mut c = raw("http://r");
        c.listen = Some(s.into());
        Config::try_from(c).map(|c| c.listen.to_string())
    };
    for (written, bound) in [
        (":5000", "0.0.0.0:5000"),
        ("5000", "0.0.0.0:5000"),
        ("*:5000", "0.0.0.0:5000"),
        ("localhost:5000", "127.0.0.1:5000"),
        ("LOCALHOST:5001", "127.0.0.1:5001"),
        ("[::]:5000", "[::]:5000"),
        ("127.0.0.2:0", "127.0.0.2:0"),
    ] {
        assert_eq!(listen(written).unwrap(), bound, "{written}");
    }
    let e = listen("registry.example.com:5000").unwrap_err().to_string();
    assert!(
        e.contains("is a host name") && e.contains(":PORT or localhost:PORT"),
        "{e}"
    );
    let e = listen(":http").unwrap_err().to_string();
    assert!(e.contains("is not a port number"), "{e}");
    let mut c = raw("http://r");
    c.metrics_listen = Some(":9100".into());
    assert_eq!(
        Config::try_from(c)
            .unwrap()
            .metrics_listen
            .unwrap()
            .to_string(),
        "0.0.0.0:9100"
    );
}

/// Three independent mistakes in one run: all three are named, one line each, with what to
/// write instead (validation used to stop at the first, so fixing a config took a run a mistake).
#[test]
fn every_mistake_is_reported_at_once() {
    let mut c = raw("ftp://r");
    c.max_connections = Some(0);
    c.trusted_proxies = Some(vec!["10.0.0.1".into(), "10.0.0.0/40".into()]);
    let msg = err_of(c);
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 3, "{msg}");
    for (key, fix) in [
        ("`registry`", "want an http(s) URL"),
        ("`max_connections`", "set a value within it"),
        ("`trusted_proxies`", "want ADDR/PREFIX"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(key) && l.contains(fix)),
            "{key} with {fix:?} missing:\n{msg}"
        );
    }
    // A key that depends on a broken one is not blamed for it: a bad listen address is one
    // problem, not a second one about --metrics-listen being the same address.
    let mut c = raw("http://r");
    c.listen = Some("nowhere".into());
    c.metrics_listen = Some(":9100".into());
    assert_eq!(err_of(c).lines().count(), 1);
}
