//! A user-space delay line at the TCP level: a relay on 127.0.0.1:0 that holds every chunk of
//! bytes for half the round trip in each direction before passing it on, with at most `window`
//! bytes in flight per direction, each counted until its acknowledgement would be back (one RTT):
//! like a TCP window over that RTT, at most `window / rtt` bytes/s per connection.
//!
//! The kernel here has no netem. This is not a packet-level link (no TCP slow start, losses or
//! ACK clocking): it reproduces what an RTT does to protocols above TCP — HTTP/2 flow-control
//! windows, request/response turns, handshakes — which is what the HTTP/2 upload comparison
//! is about. TLS passes through untouched (the relay only sees bytes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A running delay line to one target; stops accepting on drop.
pub struct DelayLine {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DelayLine {
    /// Relays to `target` with `rtt` round trip and `window` bytes in flight per direction.
    pub async fn start(target: SocketAddr, rtt: Duration, window: usize) -> DelayLine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let one_way = rtt / 2;
        // A chunk is read (up to 64 KiB) before it waits for room in the window.
        let window = window.max(64 * 1024);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(cr, sw, one_way, window));
                    let down = tokio::spawn(pump(sr, cw, one_way, window));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        DelayLine { addr, task }
    }
}

/// Copies `from` to `to`, each chunk leaving `delay` after it entered the line.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration, window: usize) {
    let budget = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes, OwnedSemaphorePermit)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk, permit)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            // The bytes leave the window when their acknowledgement would be back: one more
            // one-way delay, a whole RTT after they entered.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                drop(permit);
            });
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(permit) = budget.clone().acquire_many_owned(n as u32).await else {
            break;
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        if tx.send((Instant::now() + delay, chunk, permit)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
