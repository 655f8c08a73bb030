//! Logging: `tracing` output as text or JSON (level from `REGRELAY_LOG`, default `info`), and the
//! access log — exactly one line per request, written when the response body has been sent (or
//! dropped), so it carries the real byte counts and duration of a streamed blob. The access log
//! records method, path (never the query: upload state and token-request parameters stay out),
//! status, upstream status (none when the upstream was not asked: a cache hit), bytes both ways,
//! duration, peer, and what the handling learned ([`Notes`]): who asked (a Basic username or a
//! session's, `anonymous`; never a secret), which upstream, the cache's outcome, and for uploads
//! the parts and the tokens refreshed mid-upload. No header is ever logged.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::metrics::Metrics;

/// Installs the global subscriber (stderr). Called once by `main`; a second call is ignored.
pub fn init(format: LogFormat) {
    use tracing_subscriber::util::SubscriberInitExt;
    let asked = std::env::var("REGRELAY_LOG").ok();
    let (filter, refused) = log_filter(asked.as_deref());
    let _ = dispatch(format, filter, std::io::stderr).try_init();
    if let Some(why) = refused {
        tracing::warn!("{why}");
    }
}

/// The subscriber for `format` and `filter`, writing to `writer`: the process's (stderr, by
/// [`init`]) or an embedded proxy's ([`crate::embedded`]).
pub fn dispatch<W>(format: LogFormat, filter: EnvFilter, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.finish().into(),
        LogFormat::Json => builder.json().flatten_event(true).finish().into(),
    }
}

/// The filter `REGRELAY_LOG` asks for, or `info` and why not. A bare word that is no level
/// (`verbose`, `bogus`) is a valid filter for a target of that name, and would hide every line
/// regrelay writes, fatal ones included: it is refused, as is anything that does not parse.
pub fn log_filter(asked: Option<&str>) -> (EnvFilter, Option<String>) {
    let Some(asked) = asked.map(str::trim).filter(|a| !a.is_empty()) else {
        return (EnvFilter::new("info"), None);
    };
    let refuse = |why: &str| {
        let msg = format!(
            "REGRELAY_LOG={asked:?} {why}: logging at info. Want a level (error, warn, info, \
             debug, trace) or target=level pairs, e.g. regrelay=debug,info"
        );
        (EnvFilter::new("info"), Some(msg))
    };
    let bare_word = asked.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains('=')
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
    });
    if let Some(word) = bare_word {
        return refuse(&format!(
            "names no level ({word:?} would show only a target of that name)"
        ));
    }
    match EnvFilter::try_new(asked) {
        Ok(filter) => (filter, None),
        Err(e) => refuse(&format!("does not parse ({e})")),
    }
}

/// What a request's handling learns for its access line, set by whichever room learns it.
#[derive(Debug, Default)]
pub struct Notes {
    principal: std::sync::OnceLock<String>,
    upstream: std::sync::OnceLock<String>,
    cache: std::sync::OnceLock<&'static str>,
    parts: std::sync::atomic::AtomicU32,
    refreshes: std::sync::atomic::AtomicU32,
}

impl Notes {
    /// Who asked: a username, `anonymous`, `injected` (regrelay's own pull credentials).
    pub fn principal(&self, who: impl Into<String>) {
        let _ = self.principal.set(who.into());
    }

    /// Which upstream served it.
    pub fn upstream(&self, name: &str) {
        let _ = self.upstream.set(name.to_owned());
    }

    /// What the cache did (`hit`, `miss`, `follower`, `denied`, `pass`, `stale`).
    pub fn cache(&self, outcome: &'static str) {
        let _ = self.cache.set(outcome);
    }

    /// The cache answered without asking the upstream.
    pub fn answered_by_cache(&self) -> bool {
        matches!(self.cache.get(), Some(&("hit" | "follower" | "stale")))
    }

    /// One more upload part went upstream; `refreshed`: with a newer token than the last.
    pub fn part(&self, refreshed: bool) {
        self.parts.fetch_add(1, Ordering::Relaxed);
        if refreshed {
            self.refreshes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The facts of one request, logged once on drop.
pub struct AccessLog {
    /// Request method.
    pub method: Method,
    /// Request path, without query.
    pub path: String,
    /// Its metrics label ([`crate::router::Route::class`]).
    pub route: &'static str,
    /// Client address.
    pub peer: IpAddr,
    /// When the request headers arrived.
    pub start: Instant,
    /// Status sent to the client.
    pub status: u16,
    /// Status the upstream answered, when it was asked.
    pub upstream_status: Option<u16>,
    /// Request body bytes read from the client.
    pub bytes_in: Arc<AtomicU64>,
    /// Response body bytes handed to the client.
    pub bytes_out: u64,
    /// Whether the response body reached its end.
    pub complete: bool,
    /// Where the request is counted.
    pub metrics: Arc<Metrics>,
    /// What the handling learned.
    pub notes: Arc<Notes>,
}

impl AccessLog {
    /// The log of a request that starts now.
    pub fn new<B>(
        req: &http::Request<B>,
        route: &'static str,
        peer: IpAddr,
        metrics: Arc<Metrics>,
    ) -> AccessLog {
        AccessLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            route,
            peer,
            start: Instant::now(),
            status: 0,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            complete: false,
            metrics,
            notes: Arc::default(),
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.metrics.request(
            self.route,
            &self.method,
            self.status,
            self.start.elapsed().as_secs_f64(),
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out,
        );
        // Health checks come every few seconds from every balancer: DEBUG, not INFO.
        if self.path.starts_with("/-/") {
            tracing::debug!(
                target: "regrelay::access",
                method = %self.method,
                path = %self.path,
                status = self.status,
                duration_ms = self.start.elapsed().as_millis() as u64,
                peer = %self.peer,
                "request"
            );
            return;
        }
        let n = &self.notes;
        let or_dash = |v: Option<&String>| v.map_or("-", String::as_str).to_owned();
        let upstream_status = self.upstream_status.filter(|_| !n.answered_by_cache());
        tracing::info!(
            target: "regrelay::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            upstream_status = upstream_status,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            duration_ms = self.start.elapsed().as_millis() as u64,
            complete = self.complete,
            peer = %self.peer,
            user = %or_dash(n.principal.get()),
            upstream = %or_dash(n.upstream.get()),
            cache = %n.cache.get().copied().unwrap_or("-"),
            parts = n.parts.load(Ordering::Relaxed),
            refreshes = n.refreshes.load(Ordering::Relaxed),
            "request"
        );
    }
}

pin_project! {
    /// A response body that counts what it hands out and logs the request when it is done.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        log: AccessLog,
    }
}

impl<B: Body> Logged<B> {
    /// Attaches `log` to `inner`.
    pub fn new(inner: B, mut log: AccessLog) -> Self {
        // hyper never polls a body that is already at its end (HEAD, 204, empty bodies).
        log.complete = inner.is_end_stream();
        Logged { inner, log }
    }
}

impl<B: Body<Data = Bytes>> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes_out += data.len() as u64;
                }
                // hyper stops polling once the body reports its end (known length reached).
                this.log.complete = this.inner.is_end_stream();
            }
            Poll::Ready(None) => this.log.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_that_hides_everything_falls_back_to_info() {
        for (asked, ok) in [
            (None, true),
            (Some(""), true),
            (Some("debug"), true),
            (Some("regrelay=debug,info"), true),
            (Some("WARN"), true),
            (Some("bogus"), false),
            (Some("verbose"), false),
            (Some("info,verbose"), false),
            (Some("regrelay=loud"), false),
        ] {
            let (_, refused) = log_filter(asked);
            assert_eq!(refused.is_none(), ok, "{asked:?}: {refused:?}");
            if let Some(why) = refused {
                assert!(why.contains("logging at info"), "{why}");
            }
        }
    }
}
