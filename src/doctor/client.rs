//! Doctor's HTTP client: one request at a time with a deadline, answers read up to a bound, and
//! network errors told apart (TLS, refused, DNS, timeout).

use super::*;

/// An answer, body read (capped).
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// Local time when it arrived.
    pub(super) at: SystemTime,
}

impl Answer {
    pub(super) fn header(&self, name: &header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// What a refusal says, in whichever of GitLab's formats it came: quoted (a server's words,
    /// searched for secrets when printed).
    pub(super) fn message(&self) -> String {
        quote(&gitlab_answers::message(&self.headers, &self.body))
    }

    /// The registry-format error code, if any.
    pub(super) fn code(&self) -> String {
        gitlab_answers::code(&self.body)
    }

    /// The Bearer challenge, if any.
    pub(super) fn bearer(&self) -> Option<Challenge> {
        self.headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse)
    }

    /// True when a `WWW-Authenticate: Basic` challenge came.
    pub(super) fn basic(&self) -> bool {
        self.headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.trim_start().to_ascii_lowercase().starts_with("basic"))
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub(super) enum NetError {
    Timeout,
    Tls(String),
    Connect(String),
    Other(String),
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Timeout => write!(f, "no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            // The error chains quote what servers and libraries said.
            NetError::Tls(e) => write!(f, "TLS failed: {}", quote(e)),
            NetError::Connect(e) => write!(f, "cannot connect: {}", quote(e)),
            NetError::Other(e) => f.write_str(&quote(e)),
        }
    }
}

/// The text of an error and its sources, deduplicated; and whether rustls is among them.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut parts: Vec<String> = vec![];
    let mut tls = false;
    let mut cur = Some(err);
    while let Some(e) = cur {
        tls |= is_tls(e, 0);
        let text = e.to_string();
        // hyper-util's own line ("client error (Connect)") names no cause: its sources do.
        let bare = text.starts_with("client error (");
        if !bare && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    (parts.join(": "), tls)
}

/// A rustls error, also inside (nested) `io::Error`s: hyper-rustls wraps tokio-rustls's
/// `io::Error`, and `source()` of an `io::Error` skips the error it holds.
pub(super) fn is_tls(e: &(dyn std::error::Error + 'static), depth: usize) -> bool {
    if depth > 4 {
        return false;
    }
    if e.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return is_tls(inner, depth + 1);
    }
    false
}

pub(super) struct Http {
    pub(super) client: crate::tls::OneShotClient<Full<Bytes>>,
}

impl Http {
    pub(super) fn new(ca_file: Option<&Path>) -> Result<Http, String> {
        let client = crate::tls::one_shot_client(ca_file, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        Ok(Http { client })
    }

    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Result<Answer, NetError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| NetError::Other(format!("bad URL {url:?}: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri).header(
            header::USER_AGENT,
            concat!("regrelay-doctor/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| NetError::Other(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let (text, tls) = error_chain(&e);
                if tls {
                    NetError::Tls(text)
                } else if e.is_connect() {
                    NetError::Connect(text)
                } else {
                    NetError::Other(text)
                }
            })?;
            let at = SystemTime::now();
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
                at,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(NetError::Timeout))
    }
}

pub(super) fn basic_header(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

pub(super) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `location` resolved against `base` (absolute, or a path on `base`'s origin).
pub(super) fn resolve(base: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_owned());
    }
    let uri: Uri = base.parse().ok()?;
    let origin = format!("{}://{}", uri.scheme_str()?, uri.authority()?);
    location
        .starts_with('/')
        .then(|| format!("{origin}{location}"))
}
