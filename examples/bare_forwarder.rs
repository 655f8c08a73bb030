//! The benchmark's reference front (bench code, not the product): a bare hyper 1 HTTP/1.1
//! forwarder with nothing of regrelay's own work: an `http1::Builder` server, hyper-util's legacy
//! client, `TCP_NODELAY`, built with the release profile (fat LTO). `scripts/bench` runs it
//! beside regrelay and the peers, so regrelay's cost per small request is measured against what
//! hyper itself costs on the same runtime model.
//!
//! `bare_forwarder LISTEN ORIGIN MODEL WORKERS`: MODEL `multi` is tokio's work-stealing runtime
//! with WORKERS threads (regrelay's model); `per-core` is WORKERS current-thread runtimes, each
//! with its own `SO_REUSEPORT` listener and client pool (nginx's and HAProxy's model). Prints
//! `listening on ADDR` once every worker accepts.

use std::net::SocketAddr;

use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};

type Upstream = Client<HttpConnector, Incoming>;

fn usage() -> ! {
    eprintln!("usage: bare_forwarder LISTEN ORIGIN (multi|per-core) WORKERS");
    std::process::exit(64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, origin, model, workers] = args.as_slice() else {
        usage()
    };
    let listen: SocketAddr = listen.parse().unwrap_or_else(|_| usage());
    let origin: Authority = origin.parse().unwrap_or_else(|_| usage());
    let workers: usize = workers.parse().unwrap_or_else(|_| usage());
    match model.as_str() {
        "multi" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .expect("runtime");
            let listener = bind(listen);
            rt.block_on(async {
                let listener = TcpListener::from_std(listener).expect("listener");
                println!("listening on {}", listener.local_addr().expect("address"));
                serve(listener, origin).await
            });
        }
        "per-core" => {
            // The first listener picks the port; the others join it. All are bound before any
            // accepts, each moved to its worker.
            let first = bind(listen);
            let addr = first.local_addr().expect("address");
            let mut listeners = vec![first];
            for _ in 1..workers {
                listeners.push(bind(addr));
            }
            let threads: Vec<_> = listeners
                .into_iter()
                .map(|listener| {
                    let origin = origin.clone();
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
                        rt.block_on(async move {
                            let listener = TcpListener::from_std(listener).expect("listener");
                            serve(listener, origin).await
                        });
                    })
                })
                .collect();
            println!("listening on {addr}");
            for t in threads {
                let _ = t.join();
            }
        }
        _ => usage(),
    }
}

/// A listener on `addr` that others may join (`SO_REUSEPORT`: the kernel spreads connections).
/// Called outside a runtime too: tokio's socket only needs one to register the listener.
fn bind(addr: SocketAddr) -> std::net::TcpListener {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let _in = rt.enter();
    let s = TcpSocket::new_v4().expect("socket");
    s.set_reuseport(true).expect("SO_REUSEPORT");
    s.bind(addr).expect("bind");
    let listener = s.listen(1024).expect("listen");
    listener.into_std().expect("listener")
}

async fn serve(listener: TcpListener, origin: Authority) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, origin) = (client.clone(), origin.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), origin.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The request to `origin`, its answer back; an upstream failure closes the connection.
async fn forward(
    client: Upstream,
    origin: Authority,
    req: Request<Incoming>,
) -> Result<hyper::Response<Incoming>, hyper_util::client::legacy::Error> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(origin);
    parts.uri = Uri::from_parts(uri).expect("uri");
    client.request(Request::from_parts(parts, body)).await
}
