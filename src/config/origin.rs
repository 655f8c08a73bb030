//! Where things are, as URLs: an [`Origin`] (the upstream registry, a public URL of regrelay),
//! an [`AllowedOrigin`] a token service may redirect credentials to, and a token realm. Each
//! parser refuses what cannot be meant (a path on a base URL, credentials in a URL, port 0) and
//! names the key.

use http::uri::{Authority, Scheme};
use http::Uri;

use super::{invalid, ConfigError};

/// A scheme + authority (no path): the upstream registry, or the public URL of this proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    /// Parses a base URL; a path other than `/`, a query, userinfo or port 0 are refused.
    pub fn parse(key: &'static str, s: &str) -> Result<Origin, ConfigError> {
        let uri: Uri = s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
        let origin = Origin::of(&uri)
            .ok_or_else(|| invalid(key, format!("{s:?}: want an http(s) URL with a host")))?;
        if origin.authority.as_str().contains('@') {
            return Err(invalid(key, "credentials in the URL are not allowed"));
        }
        if origin.authority.port_u16() == Some(0) {
            return Err(invalid(key, format!("{s:?}: port must be 1-65535")));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                key,
                format!("{s:?}: must be a base URL without path or query"),
            ));
        }
        Ok(origin)
    }

    /// Builds from a scheme and a `Host` value, when it is a valid authority.
    pub fn from_parts(scheme: Scheme, host: &str) -> Option<Origin> {
        let authority: Authority = host.parse().ok()?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return None;
        }
        Some(Origin { scheme, authority })
    }

    /// The origin of an absolute URI, if it is http(s).
    pub fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme()?.clone();
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return None;
        }
        let authority = uri.authority()?.clone();
        if authority.host().is_empty() {
            return None;
        }
        Some(Origin { scheme, authority })
    }

    /// The scheme.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The `host[:port]` as configured.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The port, or the scheme's default.
    pub fn effective_port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    /// Same scheme, host (case-insensitive) and effective port.
    pub fn same_as(&self, other: &Origin) -> bool {
        // The common case first (a request to the upstream it was built for): the same text.
        if self.scheme == other.scheme && self.authority.as_str() == other.authority.as_str() {
            return true;
        }
        self.scheme == other.scheme
            && self
                .authority
                .host()
                .eq_ignore_ascii_case(other.authority.host())
            && self.effective_port() == other.effective_port()
    }

    /// An absolute URI on this origin.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// A `SCHEME://HOST[:PORT]` the token service may redirect credentials to
/// (`--auth-redirect-allow`): scheme, host and port must all match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(Origin);

impl AllowedOrigin {
    /// Parses `https://host[:port]` (or `http://…`, for a plain-HTTP test GitLab).
    pub fn parse(s: &str) -> Result<AllowedOrigin, ConfigError> {
        let s = s.trim();
        if !s.contains("://") {
            return Err(invalid(
                "auth_redirect_allow",
                format!("{s:?}: want SCHEME://HOST[:PORT], e.g. https://{s}"),
            ));
        }
        Origin::parse("auth_redirect_allow", s).map(AllowedOrigin)
    }

    /// Same scheme, host and effective port.
    pub fn matches(&self, origin: &Origin) -> bool {
        self.0.same_as(origin)
    }
}

/// A token realm: an absolute http(s) URL (its path is the endpoint, e.g. `/jwt/auth`).
pub(super) fn parse_realm(s: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = s
        .parse()
        .map_err(|e| invalid("token_realm", format!("{s:?}: {e}")))?;
    match (Origin::of(&uri), uri.authority()) {
        (Some(o), Some(a)) if !a.as_str().contains('@') && o.authority.port_u16() != Some(0) => {
            Ok(uri)
        }
        _ => Err(invalid(
            "token_realm",
            format!("{s:?}: want an absolute http(s) URL"),
        )),
    }
}
