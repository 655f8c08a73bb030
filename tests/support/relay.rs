//! A TCP relay on 127.0.0.1:0: a throttled link (one shared byte rate for the client → server
//! direction, like a slow uplink) and a round-robin balancer over backends that can be swapped
//! while it runs (a restart behind a stable address). Plain bytes; it knows nothing of HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Paces bytes to one rate shared by every connection.
struct Pace {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
}

impl Pace {
    /// Reserves a slot for `n` bytes and returns when they may go.
    fn reserve(&self, n: usize) -> Instant {
        let mut next = self.next_free.lock().unwrap();
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        *next
    }
}

/// A running relay; stops accepting when dropped (open connections end with their peers).
pub struct Relay {
    /// Its address.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Relays to `backends` in turn; `upload_rate` (bytes/s) throttles client → server bytes.
    pub async fn start(backends: Vec<SocketAddr>, upload_rate: Option<u64>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let connections = Arc::new(AtomicUsize::new(0));
        let pace = upload_rate.map(|r| {
            Arc::new(Pace {
                bytes_per_sec: r,
                next_free: Mutex::new(Instant::now()),
            })
        });
        let (b, c) = (backends.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let n = c.fetch_add(1, Ordering::SeqCst);
                let backend = {
                    let list = b.lock().unwrap();
                    list[n % list.len()]
                };
                let pace = pace.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(copy(cr, sw, pace));
                    let down = tokio::spawn(copy(sr, cw, None));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Relay {
            addr,
            backends,
            connections,
            task,
        }
    }

    /// New connections go to `backends` from now on.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    pace: Option<Arc<Pace>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(p) = &pace {
            tokio::time::sleep_until(p.reserve(n)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
