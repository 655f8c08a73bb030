//! A real HAProxy (Debian's) as the balancer in front of regrelay replicas: HTTP mode,
//! round-robin, health checks on `/-/ready` every 500 ms (down after 3 failures, so a loaded
//! machine's slow answer does not move traffic to the backup), on a free 127.0.0.1 port; ended on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{kill, require, Captured};

/// One backend server.
pub struct Server {
    /// Where the replica listens.
    pub addr: SocketAddr,
    /// Only used while every other server is down (HAProxy's `backup`).
    pub backup: bool,
}

/// How the balancer treats a server that refuses a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `option redispatch` with retries: the request goes to another server.
    Redispatch,
    /// `retries 0`, no redispatch: the client gets HAProxy's 503.
    Fail,
}

/// A running HAProxy.
pub struct Haproxy {
    /// Its address.
    pub addr: SocketAddr,
    /// What it printed.
    pub output: Captured,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

impl Haproxy {
    /// Starts HAProxy on `addr` (a free port: HAProxy cannot bind port 0 and tell) balancing
    /// over `servers`, and waits until it accepts connections.
    pub fn start(addr: SocketAddr, servers: &[Server], refused: Refused) -> Haproxy {
        require("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let retries = match refused {
            Refused::Redispatch => "retries 3\n    option redispatch",
            Refused::Fail => "retries 0",
        };
        let mut conf = format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 10m\n    \
             timeout server 10m\n    timeout check 2s\n    {retries}\n\
             frontend fe\n    bind {addr}\n    default_backend be\n\
             backend be\n    balance roundrobin\n    option httpchk GET /-/ready\n    \
             http-check expect status 200\n    default-server inter 500ms fall 3 rise 2\n"
        );
        for (i, s) in servers.iter().enumerate() {
            let backup = if s.backup { " backup" } else { "" };
            conf.push_str(&format!("    server r{i} {} check{backup}\n", s.addr));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, conf).unwrap();
        let mut child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let output = Captured::default();
        output.attach(child.stdout.take().unwrap());
        output.attach(child.stderr.take().unwrap());
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > end || child.try_wait().unwrap().is_some() {
                kill(&mut child);
                panic!("haproxy did not start:\n{}", output.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy {
            addr,
            output,
            child,
            _dir: dir,
        }
    }
}
