//! Object storage behind a registry that redirects blob reads to it, as S3-, GCS- and
//! Azure-backed registries do: a real nginx serving the registry's filesystem storage root
//! (distribution's `redirect` storage middleware names the file under that root in its
//! `Location`; see [`super::Registry::start_redirecting`]).
//!
//! Like a presigned URL, a read is served only with a secret in the query: a request without
//! `?sig=` is redirected once more (307, same path) to the URL carrying it, and a wrong `sig` is
//! refused (403). So a client that reaches the bytes has followed two hops, and the query it
//! followed is a secret a test can look for in logs. Every request is logged with its method,
//! status, path, query, user agent, and whether `Authorization` or `Cookie` came with it.

use std::net::SocketAddr;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::nginx::{free_addr, Nginx};

/// A running object store; ended on drop.
pub struct ObjectStore {
    /// Its address.
    pub addr: SocketAddr,
    /// The `sig` a read needs (the secret part of its "presigned" URL).
    pub secret: String,
    nginx: Nginx,
    dir: tempfile::TempDir,
}

/// One request the object store answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The status it answered.
    pub status: u16,
    /// The path.
    pub path: String,
    /// The query (empty when none).
    pub query: String,
    /// An `Authorization` header came with it.
    pub authorization: bool,
    /// A `Cookie` header came with it.
    pub cookie: bool,
    /// Its `User-Agent` (empty when none).
    pub user_agent: String,
}

impl ObjectStore {
    /// Serves `root` (a registry's `rootdirectory`) on a free 127.0.0.1 port.
    pub fn start(root: &Path) -> ObjectStore {
        let addr = free_addr();
        let dir = tempfile::tempdir().unwrap();
        let seed = format!(
            "{:?}{}{}",
            std::time::SystemTime::now(),
            std::process::id(),
            addr
        );
        let secret = hex::encode(&Sha256::digest(seed.as_bytes())[..16]);
        // `|` separates the fields: none but the last can hold one (paths are digests, the query
        // is ours, and the credential headers are reduced to presence).
        let http_extra = "log_format objstore \
            '$request_method|$status|$uri|$args|$http_authorization|$http_cookie|$http_user_agent';";
        let server = format!(
            "    access_log {log} objstore;\n    root {root};\n    location / {{\n      \
             if ($arg_sig = \"\") {{ return 307 http://{addr}$uri?sig={secret}; }}\n      \
             if ($arg_sig != \"{secret}\") {{ return 403; }}\n    }}",
            log = dir.path().join("access.log").display(),
            root = root.display(),
        );
        let nginx = Nginx::start_with(addr, http_extra, &server);
        ObjectStore {
            addr,
            secret,
            nginx,
            dir,
        }
    }

    /// `http://ADDR/`: the registry's redirect `baseurl`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Every request answered so far.
    pub fn served(&self) -> Vec<Served> {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        log.lines()
            .map(|line| {
                let f: Vec<&str> = line.splitn(7, '|').collect();
                assert_eq!(f.len(), 7, "object store log line {line:?}");
                let present = |v: &str| !v.is_empty() && v != "-";
                Served {
                    method: f[0].to_owned(),
                    status: f[1].parse().unwrap(),
                    path: f[2].to_owned(),
                    query: if f[3] == "-" {
                        String::new()
                    } else {
                        f[3].to_owned()
                    },
                    authorization: present(f[4]),
                    cookie: present(f[5]),
                    user_agent: if present(f[6]) {
                        f[6].to_owned()
                    } else {
                        String::new()
                    },
                }
            })
            .collect()
    }

    /// `GET`s that read content (answered 200 or 206): what an object store bills as reads.
    pub fn content_gets(&self) -> usize {
        self.served()
            .iter()
            .filter(|s| s.method == "GET" && matches!(s.status, 200 | 206))
            .count()
    }

    /// Requests with `method`, whatever their answer.
    pub fn requests(&self, method: &str) -> usize {
        self.served().iter().filter(|s| s.method == method).count()
    }

    /// The nginx serving it (its own error and access logs).
    pub fn nginx(&self) -> &Nginx {
        &self.nginx
    }
}
