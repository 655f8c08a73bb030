//! A real S3-compatible object store for the shared cache (`--cache-store`): Garage
//! (crates.io `garage`, installed by scripts/install-deps), single node, on free 127.0.0.1
//! ports, its metadata and data in a temp dir; one key and one bucket made with its own CLI.
//! Ended on drop.
//!
//! [`Garage::object`] asks it what a key holds, signed with the same key (rusty-s3, as regrelay
//! signs): tests check what is (and is not) in the bucket without going through regrelay.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::nginx::free_addr;
use super::{kill, require, text, upstream};

/// The region Garage signs for.
pub const REGION: &str = "garage";

/// A running single-node Garage with a bucket and a key that may use it.
pub struct Garage {
    /// `http://127.0.0.1:PORT`: its S3 API.
    pub endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// The key's id.
    pub key_id: String,
    /// The key's secret.
    pub secret: String,
    config: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Garage {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

impl Garage {
    /// Starts Garage, applies a one-node layout, and makes the key and the bucket.
    pub fn start() -> Garage {
        require("garage");
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_addr(), free_addr(), free_addr());
        let d = dir.path().display();
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 251))
            .collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"{rpc}\"\nrpc_public_addr = \"{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\n\
                 api_bind_addr = \"{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"{admin}\"\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let mut g = Garage {
            endpoint: format!("http://{s3}"),
            bucket: "regrelay-cache".into(),
            key_id: String::new(),
            secret: String::new(),
            config,
            child,
            dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        let node = loop {
            let out = g.cli(&["node", "id", "-q"]);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            if let Some(status) = g.child.try_wait().unwrap() {
                panic!("garage exited ({status}):\n{}", g.log());
            }
            assert!(Instant::now() < end, "garage did not answer:\n{}", g.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        let node = node.split('@').next().unwrap().to_owned();
        // `node id` reads the node's key from `metadata_dir` (garage 2.5.0, cli/local/init.rs),
        // no RPC: the server writes that key before its RPC port listens, and `layout assign`
        // once found that port closed (CI, 2026-12-08).
        while std::net::TcpStream::connect(rpc).is_err() {
            if let Some(status) = g.child.try_wait().unwrap() {
                panic!("garage exited ({status}):\n{}", g.log());
            }
            assert!(
                Instant::now() < end,
                "garage's RPC did not listen:\n{}",
                g.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        g.ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.ok(&["layout", "apply", "--version", "1"]);
        let key = g.ok(&["key", "create", "regrelay"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in:\n{key}"))
        };
        (g.key_id, g.secret) = (field("Key ID:"), field("Secret key:"));
        g.ok(&["bucket", "create", &g.bucket.clone()]);
        let bucket = g.bucket.clone();
        g.ok(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "regrelay",
        ]);
        while std::net::TcpStream::connect(s3).is_err() {
            assert!(Instant::now() < end, "garage's S3 API did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new("garage")
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run garage")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "garage {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// A credentials file (mode 0600) in `~/.aws/credentials` form, for
    /// `--cache-s3-credentials-file`.
    pub fn credentials_file(&self) -> tempfile::NamedTempFile {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}",
            self.key_id, self.secret
        )
        .unwrap();
        let perms = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(f.path(), perms).unwrap();
        f
    }

    /// The flags of a regrelay sharing this bucket under `prefix`, with `credentials` (from
    /// [`Garage::credentials_file`]).
    pub fn flags(&self, prefix: &str, credentials: &tempfile::NamedTempFile) -> Vec<String> {
        vec![
            "--cache-store".into(),
            format!("s3://{}/{prefix}", self.bucket),
            "--cache-s3-endpoint".into(),
            self.endpoint.clone(),
            "--cache-s3-region".into(),
            REGION.into(),
            "--cache-s3-credentials-file".into(),
            credentials.path().display().to_string(),
        ]
    }

    /// A URL that reads `key` for a minute without credentials (for the bench's baseline).
    pub fn presigned_get(&self, key: &str) -> String {
        let (bucket, creds) = (self.bucket(), self.creds());
        let action = bucket.get_object(Some(&creds), key);
        action.sign(Duration::from_secs(60)).to_string()
    }

    /// Whether the bucket holds `key` (a `HEAD`: nothing is read).
    pub async fn has(&self, key: &str) -> bool {
        let url = self
            .bucket()
            .head_object(Some(&self.creds()), key)
            .sign(Duration::from_secs(60));
        let req = http::Request::head(url.as_str())
            .body(regrelay::body::empty())
            .unwrap();
        let resp = upstream::client().request(req).await.unwrap();
        resp.status() == 200
    }

    fn bucket(&self) -> Bucket {
        let endpoint = self.endpoint.parse().unwrap();
        Bucket::new(endpoint, UrlStyle::Path, self.bucket.clone(), REGION).unwrap()
    }

    fn creds(&self) -> Credentials {
        Credentials::new(&self.key_id, &self.secret)
    }

    /// The content of `key` in the bucket (`None`: no such object), read with the key.
    pub async fn object(&self, key: &str) -> Option<bytes::Bytes> {
        let url = self
            .bucket()
            .get_object(Some(&self.creds()), key)
            .sign(Duration::from_secs(60));
        let req = http::Request::get(url.as_str())
            .body(regrelay::body::empty())
            .unwrap();
        let resp = upstream::client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        match status {
            200 => Some(body),
            404 => None,
            other => panic!("garage answered {other} for {key}: {body:?}"),
        }
    }
}
