//! Logging: `tracing` output as text or JSON (level from `REGRELAY_LOG`, default `info`), and the
//! access log — exactly one line per request, written when the response body has been sent (or
//! dropped), so it carries the real byte counts and duration of a streamed blob. The access log
//! records method, path (never the query: upload state and token-request parameters stay out),
//! status, upstream status (none when the upstream was not asked: a cache hit), bytes both ways,
//! duration, peer, and what the handling learned ([`Notes`]): who asked (a Basic username or a
//! session's, `anonymous`; never a secret), which upstream, the cache's outcome, and for uploads
//! the parts and the tokens refreshed mid-upload. No header is ever logged.

use std::fmt::Write as _;
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
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
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
/// [`init`]) or an embedded proxy's ([`crate::embedded`]). A text log's access lines go to the
/// same writer by [`TextFormat::access`], without an event.
pub fn dispatch<W>(format: LogFormat, filter: EnvFilter, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let writer = Arc::new(writer);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Shared(writer.clone()))
        .with_ansi(false);
    match format {
        LogFormat::Text => {
            let tap = Tap {
                write: Box::new(move |line| {
                    use std::io::Write;
                    let _ = writer.make_writer().write_all(line);
                }),
                on: std::sync::OnceLock::new(),
            };
            let text = TextFormat {
                time: true,
                tap: Some(tap),
            };
            let dispatch: tracing::Dispatch = builder.event_format(text).finish().into();
            // Whether the filter lets access lines through, asked once: the filter is fixed.
            let on = tracing::dispatcher::with_default(
                &dispatch,
                || tracing::enabled!(target: ACCESS, tracing::Level::INFO),
            );
            if let Some(tap) = dispatch
                .downcast_ref::<TextFormat>()
                .and_then(|t| t.tap.as_ref())
            {
                let _ = tap.on.set(on);
            }
            dispatch
        }
        LogFormat::Json => builder.json().flatten_event(true).finish().into(),
    }
}

/// A log's writer, shared by its subscriber and its access lines.
struct Shared<W>(Arc<W>);

impl<'a, W: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Shared<W>
{
    type Writer = W::Writer;

    fn make_writer(&'a self) -> W::Writer {
        self.0.make_writer()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> W::Writer {
        self.0.make_writer_for(meta)
    }
}

/// Writes one line, whole, to a log's writer.
type WriteLine = dyn Fn(&[u8]) + Send + Sync;

/// Where a text log's access lines go without an event: its writer, and whether its filter
/// lets them through.
struct Tap {
    write: Box<WriteLine>,
    on: std::sync::OnceLock<bool>,
}

/// Where access lines go (a target `REGRELAY_LOG` can name: `regrelay::access=warn` hides them).
const ACCESS: &str = "regrelay::access";

/// The text format: `tracing`'s own (time, level, target, fields), but for the access line,
/// which it writes in the same form without the formatter's per-character pass over the
/// message (~10k of the line's ~17k instructions, callgrind): the message is scanned for the
/// control characters that pass escapes, and written whole when it has none. The process's and
/// an embedded proxy's log also write access lines without an event ([`TextFormat::access`]).
struct TextFormat {
    /// With the time (the tests compare lines without it).
    time: bool,
    /// The log's writer, for access lines written without an event.
    tap: Option<Tap>,
}

thread_local! {
    /// The access line being written, a buffer per thread.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl TextFormat {
    /// Writes `line` as [`TextFormat::format_event`] writes its event, straight to the log's
    /// writer: no event, field visitor or message copy (~8k instructions a request,
    /// callgrind). False when this log has no writer of its own for it (a test's format).
    fn access(&self, line: &Line<'_>) -> bool {
        let Some(tap) = &self.tap else {
            return false;
        };
        if !tap.on.get().copied().unwrap_or(true) {
            return true;
        }
        let write = |buf: &mut String| -> std::fmt::Result {
            buf.clear();
            if self.time {
                write_time(&mut Writer::new(buf))?;
                buf.push(' ');
            }
            buf.push_str(" INFO regrelay::access: ");
            let start = buf.len();
            line.write_text(buf);
            if !line.plain() && buf[start..].chars().any(control) {
                let text = buf.split_off(start);
                write_escaped(buf, &text)?;
            }
            buf.push('\n');
            (tap.write)(buf.as_bytes());
            Ok(())
        };
        let _ = LINE.with(|buf| match buf.try_borrow_mut() {
            Ok(mut buf) => write(&mut buf),
            Err(_) => write(&mut String::new()),
        });
        true
    }
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut only = OnlyMessage(None, true);
        if meta.target() == ACCESS && *meta.level() == tracing::Level::INFO {
            event.record(&mut only);
        }
        let (Some(message), true) = (only.0, only.1) else {
            let default = Format::default().with_ansi(false);
            return match self.time {
                true => default.format_event(ctx, writer, event),
                false => default.without_time().format_event(ctx, writer, event),
            };
        };
        if self.time {
            write_time(&mut writer)?;
            writer.write_char(' ')?;
        }
        writer.write_str(" INFO regrelay::access: ")?;
        write_escaped(&mut writer, &message)?;
        writer.write_char('\n')
    }
}

/// The time as `tracing-subscriber`'s [`SystemTime`] writes it (RFC 3339 in UTC, microseconds:
/// `2026-12-07T11:35:24.681080Z`). Its formatter runs once a second per thread; within that
/// second the access line reuses the date and time it wrote and adds the microseconds.
fn write_time(w: &mut Writer<'_>) -> std::fmt::Result {
    use std::time::UNIX_EPOCH;
    thread_local! {
        /// The second last formatted, and its text up to the fraction (`…T11:35:24.`).
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = since(std::time::SystemTime::now());
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != now.as_secs() {
            let mut text = String::with_capacity(32);
            SystemTime.format_time(&mut Writer::new(&mut text))?;
            // Kept only when the formatter's own reading fell in the same second, in the
            // expected shape; else this line gets its text as it is.
            let same = since(std::time::SystemTime::now()).as_secs() == now.as_secs();
            if !(same && text.len() == 27 && text.as_bytes()[19] == b'.') {
                return w.write_str(&text);
            }
            text.truncate(20);
            *second = (now.as_secs(), text);
        }
        w.write_str(&second.1)?;
        let mut n = itoa::Buffer::new();
        let micros = n.format(now.subsec_micros());
        w.write_str(&"000000"[micros.len()..])?;
        w.write_str(micros)?;
        w.write_char('Z')
    })
}

/// An event's message, when it is its only field.
struct OnlyMessage(Option<String>, bool);

impl tracing::field::Visit for OnlyMessage {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        } else {
            self.1 = false;
        }
    }
}

/// A terminal control character `tracing-subscriber` escapes in a message.
fn control(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// `text` as `tracing-subscriber` escapes a message (terminal control characters: ESC, BEL,
/// BS, FF, DEL and C1 codes), in one write when it has none of them.
fn write_escaped(w: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    if !text.chars().any(control) {
        return w.write_str(text);
    }
    for c in text.chars() {
        match c {
            '\u{80}'..='\u{9f}' => write!(w, "\\u{{{:x}}}", c as u32)?,
            c if control(c) => write!(w, "\\x{:02x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    Ok(())
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
    /// The line goes to a JSON log (its fields as fields); else it is formatted here.
    pub json: bool,
}

impl AccessLog {
    /// The log of a request that starts now.
    pub fn new<B>(
        req: &http::Request<B>,
        route: &'static str,
        peer: IpAddr,
        metrics: Arc<Metrics>,
        json: bool,
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
            json,
        }
    }

    /// The fields of the access line, each as [`Line`] writes it.
    fn line(&self) -> Line<'_> {
        let n = &self.notes;
        Line {
            method: &self.method,
            path: &self.path,
            status: self.status,
            upstream_status: self.upstream_status.filter(|_| !n.answered_by_cache()),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            duration_ms: self.start.elapsed().as_millis() as u64,
            complete: self.complete,
            peer: self.peer,
            user: n.principal.get().map_or("-", String::as_str),
            upstream: n.upstream.get().map_or("-", String::as_str),
            cache: n.cache.get().copied().unwrap_or("-"),
            parts: n.parts.load(Ordering::Relaxed),
            refreshes: n.refreshes.load(Ordering::Relaxed),
        }
    }
}

/// An access line's fields. A JSON log gets them as fields ([`structured`]); a text log gets them
/// as one message, `request key=value …` ([`Line::text`]), which [`TextFormat`] writes without
/// `tracing-subscriber`'s per-character escaping pass. The line is byte for byte what `tracing`
/// writes of the same message, and of the same fields where they hold no control character
/// (`the_text_access_line_is_what_tracing_writes`).
struct Line<'a> {
    method: &'a Method,
    path: &'a str,
    status: u16,
    upstream_status: Option<u16>,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: u64,
    complete: bool,
    peer: IpAddr,
    user: &'a str,
    upstream: &'a str,
    cache: &'a str,
    parts: u32,
    refreshes: u32,
}

impl Line<'_> {
    /// The message of a text log's access line: `request key=value …`.
    fn text(&self) -> String {
        let mut s = String::with_capacity(160 + self.path.len());
        self.write_text(&mut s);
        s
    }

    /// Whether the fields a client or the configuration names (path, user, upstream) are
    /// printable ASCII, so the line has no character to escape: a byte test, not a scan of the
    /// whole line's characters (~2.8k instructions a line, callgrind). The rest are numbers,
    /// an address, a method (an HTTP token) and fixed words.
    fn plain(&self) -> bool {
        [self.path, self.user, self.upstream]
            .iter()
            .all(|f| f.bytes().all(|b| (0x20..0x7f).contains(&b)))
    }

    /// Appends the message to `s`.
    fn write_text(&self, s: &mut String) {
        let mut n = itoa::Buffer::new();
        s.push_str("request method=");
        s.push_str(self.method.as_str());
        s.push_str(" path=");
        s.push_str(self.path);
        s.push_str(" status=");
        s.push_str(n.format(self.status));
        if let Some(upstream_status) = self.upstream_status {
            s.push_str(" upstream_status=");
            s.push_str(n.format(upstream_status));
        }
        s.push_str(" bytes_in=");
        s.push_str(n.format(self.bytes_in));
        s.push_str(" bytes_out=");
        s.push_str(n.format(self.bytes_out));
        s.push_str(" duration_ms=");
        s.push_str(n.format(self.duration_ms));
        s.push_str(if self.complete {
            " complete=true peer="
        } else {
            " complete=false peer="
        });
        push_ip(s, self.peer);
        s.push_str(" user=");
        s.push_str(self.user);
        s.push_str(" upstream=");
        s.push_str(self.upstream);
        s.push_str(" cache=");
        s.push_str(self.cache);
        s.push_str(" parts=");
        s.push_str(n.format(self.parts));
        s.push_str(" refreshes=");
        s.push_str(n.format(self.refreshes));
    }
}

/// Appends `ip` as its `Display` writes it; an IPv4 address for a tenth of the cost (~2k
/// instructions, callgrind): the access line's peer and `X-Forwarded-For`.
pub fn push_ip(s: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                s.push_str(n.format(octet));
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(s, "{ip}");
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
                target: ACCESS,
                method = %self.method,
                path = %self.path,
                status = self.status,
                duration_ms = self.start.elapsed().as_millis() as u64,
                peer = %self.peer,
                "request"
            );
            return;
        }
        let line = self.line();
        if self.json {
            return structured(&line);
        }
        let written = tracing::dispatcher::get_default(|log| {
            log.downcast_ref::<TextFormat>()
                .is_some_and(|format| format.access(&line))
        });
        if !written {
            tracing::info!(target: ACCESS, "{}", line.text());
        }
    }
}

/// The access line as fields (a JSON log: each its own key).
fn structured(l: &Line<'_>) {
    tracing::info!(
        target: ACCESS,
        method = %l.method,
        path = %l.path,
        status = l.status,
        upstream_status = l.upstream_status,
        bytes_in = l.bytes_in,
        bytes_out = l.bytes_out,
        duration_ms = l.duration_ms,
        complete = l.complete,
        peer = %l.peer,
        user = %l.user,
        upstream = %l.upstream,
        cache = %l.cache,
        parts = l.parts,
        refreshes = l.refreshes,
        "request"
    );
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

    /// What a text subscriber without the time writes of `log`: `tracing`'s own format, or
    /// regrelay's ([`dispatch`]'s).
    fn text_of(ours: bool, log: impl FnOnce()) -> String {
        let out = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let writer = {
            let out = out.clone();
            move || Sink(out.clone())
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false);
        let dispatch: tracing::Dispatch = match ours {
            true => builder
                .event_format(TextFormat {
                    time: false,
                    tap: None,
                })
                .finish()
                .into(),
            false => builder.without_time().finish().into(),
        };
        tracing::dispatcher::with_default(&dispatch, log);
        let text = out.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_access_lines_time_is_what_tracing_writes() {
        for _ in 0..3 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            write_time(&mut Writer::new(&mut ours)).unwrap();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), 27, "{ours}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            // Read a moment apart: the same second (but at a second's turn), later or equal.
            assert!(ours <= theirs, "{ours} after {theirs}");
            if ours[..19] == theirs[..19] {
                assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()), "{ours}");
            }
        }
    }

    #[test]
    fn the_text_access_line_is_what_tracing_writes() {
        let method = Method::PATCH;
        let paths = [
            "/v2/group/app/blobs/uploads/5f0e",
            "/v2/\x1b[31mred\x07/\u{85}\u{9f}\u{a0}é/manifests/x",
        ];
        let cases = [
            (Some(202), paths[0], "2001:db8::7"),
            (None, paths[0], "192.0.2.10"),
            (None, paths[1], "10.255.0.1"),
            (Some(404), paths[0], "::ffff:192.0.2.1"),
        ];
        for (upstream_status, path, peer) in cases {
            let line = Line {
                method: &method,
                path,
                status: 202,
                upstream_status,
                bytes_in: 1 << 30,
                bytes_out: 0,
                duration_ms: 81_234,
                complete: true,
                peer: peer.parse().unwrap(),
                user: "ci-bot",
                upstream: "default",
                cache: "-",
                parts: 3,
                refreshes: 2,
            };
            let message = || tracing::info!(target: ACCESS, "{}", line.text());
            let fast = text_of(true, message);
            // As tracing writes the same message: control characters escaped.
            assert_eq!(fast, text_of(false, message));
            // As it writes the fields, where those are clean (a field written with `%` is not
            // escaped there: a path could reach the terminal raw).
            if path == paths[0] {
                assert_eq!(fast, text_of(false, || structured(&line)));
            }
            assert_eq!(
                fast.contains(" upstream_status="),
                upstream_status.is_some()
            );
            assert!(fast.contains(&format!(" peer={peer} ")), "{fast}");
            assert!(!fast.contains('\x1b') && !fast.contains('\u{85}'), "{fast}");
        }
        // Every other line is tracing's own.
        let other = || tracing::warn!(path = "/v2/\x1b", status = 502, "request failed");
        assert_eq!(text_of(true, other), text_of(false, other));
    }

    /// A text log of `filter` as `regrelay serve` makes it, and what it wrote.
    fn text_log(filter: &str) -> (tracing::Dispatch, Arc<std::sync::Mutex<Vec<u8>>>) {
        let out = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let writer = {
            let out = out.clone();
            move || Sink(out.clone())
        };
        let log = dispatch(LogFormat::Text, EnvFilter::new(filter), writer);
        (log, out)
    }

    #[test]
    fn the_access_line_written_without_an_event_is_the_events() {
        let method = Method::GET;
        for (path, peer) in [
            ("/v2/group/app/manifests/latest", "192.0.2.10"),
            ("/v2/\x1b[31mred\x07/\u{85}é/manifests/x", "2001:db8::7"),
        ] {
            let line = Line {
                method: &method,
                path,
                status: 200,
                upstream_status: Some(200),
                bytes_in: 0,
                bytes_out: 1234,
                duration_ms: 3,
                complete: true,
                peer: peer.parse().unwrap(),
                user: "ci-bot",
                upstream: "default",
                cache: "-",
                parts: 0,
                refreshes: 0,
            };
            let (log, out) = text_log("info");
            let format = log
                .downcast_ref::<TextFormat>()
                .expect("a text log's format");
            assert!(format.access(&line), "written without an event");
            tracing::dispatcher::with_default(
                &log,
                || tracing::info!(target: ACCESS, "{}", line.text()),
            );
            let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{text}");
            // The same line but for the time (27 characters) each was written at.
            assert_eq!(lines[0][27..], lines[1][27..], "{text}");
            assert!(lines[0].contains(&format!(" peer={peer} ")), "{text}");
            assert!(!text.contains('\x1b') && !text.contains('\u{85}'), "{text}");

            // A filter that hides access lines hides these.
            let (log, out) = text_log("info,regrelay::access=warn");
            assert!(log.downcast_ref::<TextFormat>().unwrap().access(&line));
            assert!(out.lock().unwrap().is_empty());
        }
    }

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
