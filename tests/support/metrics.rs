//! Reading regrelay's Prometheus endpoint (`--metrics-listen 127.0.0.1:0`) in tests.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;

use super::{upstream, Regrelay};

/// The metrics address regrelay logged.
pub fn addr(px: &Regrelay) -> SocketAddr {
    let line = px
        .output
        .wait_for("metrics on", Duration::from_secs(5))
        .expect("metrics listener logged");
    line.split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("addr= field")
        .parse()
        .expect("an address")
}

/// Status, content type and text of `GET /metrics`.
pub async fn scrape(addr: SocketAddr) -> (http::StatusCode, String, String) {
    let resp = upstream::client()
        .request(
            http::Request::get(format!("http://{addr}/metrics"))
                .body(regrelay::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the sample `name{labels…}` whose labels include every one of `with`.
pub fn value(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}
