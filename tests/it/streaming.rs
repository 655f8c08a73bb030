//! Bodies stream through regrelay: the upstream sees the first bytes of an upload while the client
//! is still sending, and regrelay's memory stays flat while 2 GiB pass each way.

use crate::support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use regrelay::body::{self, ProxyBody};
use regrelay::error::BoxError;
use support::upstream::{self, client, drain, Generated};
use support::Regrelay;
use tokio::sync::{mpsc, oneshot, Mutex};

type FrameTx = mpsc::Sender<Result<http_body::Frame<Bytes>, BoxError>>;

struct Rx(mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>);

impl futures_core::Stream for Rx {
    type Item = Result<http_body::Frame<Bytes>, BoxError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn channel_body() -> (FrameTx, ProxyBody) {
    let (tx, rx) = mpsc::channel(2);
    (tx, StreamBody::new(Rx(rx)).boxed_unsync())
}

#[tokio::test]
async fn upstream_sees_first_bytes_before_the_client_has_finished() {
    let (first_tx, first_rx) = oneshot::channel::<usize>();
    let first_tx = Arc::new(Mutex::new(Some(first_tx)));
    let origin = upstream::serve(move |req: Request<hyper::body::Incoming>| {
        let first_tx = first_tx.clone();
        async move {
            let mut incoming = req.into_body();
            let mut total = 0usize;
            while let Some(frame) = incoming.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(d) = frame.data_ref() {
                    if total == 0 {
                        if let Some(tx) = first_tx.lock().await.take() {
                            let _ = tx.send(d.len());
                        }
                    }
                    total += d.len();
                }
            }
            let mut resp = Response::new(body::full(total.to_string()));
            *resp.status_mut() = StatusCode::ACCEPTED;
            resp
        }
    })
    .await;
    let px = Regrelay::start(&["--registry", &origin.url()]);
    let (tx, req_body) = channel_body();
    let req = Request::patch(format!("{}/v2/g/p/blobs/uploads/u", px.url()))
        .body(req_body)
        .unwrap();
    let response = tokio::spawn(client().request(req));
    tx.send(Ok(http_body::Frame::data(Bytes::from(vec![1u8; 1 << 20]))))
        .await
        .unwrap();
    // The client holds back the rest until the upstream has seen the start: a buffering proxy
    // would deadlock here and the timeout fails the test.
    let seen = tokio::time::timeout(Duration::from_secs(10), first_rx)
        .await
        .expect("upstream saw nothing while the client was still sending: the body was buffered")
        .unwrap();
    assert!(seen > 0);
    for _ in 0..15 {
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![2u8; 1 << 20]))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = response.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let total = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(total, (16u64 << 20).to_string().as_bytes());
}

const TWO_GIB: u64 = 2 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_while_2_gib_stream_each_way() {
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let origin = upstream::serve(move |req: Request<hyper::body::Incoming>| {
        let r = r.clone();
        async move {
            if req.method() == http::Method::GET {
                return Response::new(Generated::new(TWO_GIB).boxed_unsync());
            }
            let n = drain(req.into_body()).await.unwrap_or(0);
            r.store(n, Ordering::SeqCst);
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::CREATED;
            resp
        }
    })
    .await;
    let px = Regrelay::process(&["--registry", &origin.url()]);
    let baseline = support::proc_status_kib(px.pid(), "VmRSS:");
    let up = Request::put(format!(
        "{}/v2/g/p/blobs/uploads/u?digest=sha256:0",
        px.url()
    ))
    .body(Generated::new(TWO_GIB).boxed_unsync())
    .unwrap();
    let resp = client().request(up).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(received.load(Ordering::SeqCst), TWO_GIB);
    let down = Request::get(format!("{}/v2/g/p/blobs/sha256:0", px.url()))
        .body(body::empty())
        .unwrap();
    let resp = client().request(down).await.unwrap();
    assert_eq!(drain(resp.into_body()).await.unwrap(), TWO_GIB);
    let peak = px.peak_rss_kib();
    eprintln!("regrelay RSS: baseline {baseline} KiB, peak {peak} KiB after 2 GiB up + 2 GiB down");
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS {peak} KiB grew with the blob (baseline {baseline} KiB)"
    );
}
