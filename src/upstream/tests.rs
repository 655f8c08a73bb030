//! The bound on upstream connections against idle ones: a permit an idle connection holds is
//! given up for a request to another origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{on_worker, Upstream};
use crate::body;
use crate::config::{Config, ConfigFile};
use crate::tls::UpstreamTrust;

/// A keep-alive HTTP/1.1 origin answering every request `200 {}`; counts the connections it
/// accepted and the ones that ended.
async fn origin() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counts = (accepted.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counts.0.fetch_add(1, Ordering::SeqCst);
            let ended = counts.1.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                        if stream.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, ended)
}

/// `GET /v2/` on `addr` through `up`, its answer read to the end.
async fn get(up: &Upstream, addr: SocketAddr) -> Result<(), crate::error::Error> {
    let req = Request::get(format!("http://{addr}/v2/"))
        .body(body::empty())
        .unwrap();
    let resp = up.send(req).await?;
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    Ok(())
}

/// With one connection permit: the registry's idle connection, pooled by one worker, is closed
/// for a request to object storage on another (an upload `Location`), which is served rather
/// than answered 503 once the queue's two seconds are up; then the registry again, the other
/// way round.
#[tokio::test]
async fn an_idle_connection_gives_its_permit_to_a_request_for_another_origin() {
    let (registry, registry_accepted, registry_ended) = origin().await;
    let (storage, storage_accepted, _) = origin().await;
    let cfg = Config::try_from(ConfigFile {
        registry: Some(format!("http://{registry}")),
        max_upstream_connections: Some(1),
        workers: Some(2),
        ..Default::default()
    })
    .unwrap();
    let trust = UpstreamTrust::load(None).unwrap();
    let up = Upstream::new(&cfg, &trust, cfg.registry.clone());

    on_worker(0);
    get(&up, registry).await.unwrap();
    get(&up, registry).await.unwrap();
    // One connection, idle now, holding the one permit.
    assert_eq!(registry_accepted.load(Ordering::SeqCst), 1);
    assert_eq!(up.permits.available_permits(), 0);

    on_worker(1);
    get(&up, storage)
        .await
        .expect("the request to object storage got the idle connection's permit");
    assert_eq!(storage_accepted.load(Ordering::SeqCst), 1);
    while registry_ended.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }

    on_worker(0);
    get(&up, registry).await.unwrap();
    assert_eq!(registry_accepted.load(Ordering::SeqCst), 2);
    // The same origin again reuses its connection: nothing is closed that need not be.
    get(&up, registry).await.unwrap();
    assert_eq!(registry_accepted.load(Ordering::SeqCst), 2);
}
