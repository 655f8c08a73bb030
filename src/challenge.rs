//! Pure parsing and formatting for registry token auth: `WWW-Authenticate: Bearer` challenges
//! (RFC 9110 §11.6.1 auth-params), the `scope` grammar (`type:name:actions`, several per value,
//! space-separated), the scope a registry request needs, and reading `exp` from a JWT payload.
//! No I/O here; everything is table-tested.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// A parsed `Bearer` challenge: its auth-params in order (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `(name, value)` pairs, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses `Bearer k="v",k2=v2`; `None` for any other scheme or a malformed header.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim_start();
        let (scheme, rest) = header.split_at(header.find(' ').unwrap_or(header.len()));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut params = Vec::new();
        let mut s = rest.trim_start();
        while !s.is_empty() {
            let eq = s.find('=')?;
            let name = s[..eq].trim().to_ascii_lowercase();
            if name.is_empty() || name.contains([' ', ',', '"']) {
                return None;
            }
            s = s[eq + 1..].trim_start();
            let value;
            if let Some(quoted) = s.strip_prefix('"') {
                let mut out = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => out.push(chars.next()?.1),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => out.push(c),
                    }
                }
                value = out;
                s = &quoted[end?..];
            } else {
                let end = s.find(',').unwrap_or(s.len());
                value = s[..end].trim().to_owned();
                s = &s[end..];
            }
            params.push((name, value));
            s = s.trim_start();
            if let Some(r) = s.strip_prefix(',') {
                s = r.trim_start();
            } else if !s.is_empty() {
                return None;
            }
        }
        Some(Challenge { params })
    }

    /// The value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or appends) a parameter.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(n, _)| n == name) {
            Some(p) => p.1 = value.to_owned(),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
    }

    /// `error="…"`, if any (`invalid_token`, `insufficient_scope`).
    pub fn error(&self) -> Option<&str> {
        self.get("error")
    }
}

impl std::fmt::Display for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer ")?;
        for (i, (name, value)) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "{name}=\"{escaped}\"")?;
        }
        Ok(())
    }
}

/// Every scope in a token request: `scope` is repeated and each value may hold several
/// space-separated scopes. Values are percent-decoded (`+` is a space).
pub fn scopes_from_query(query: &str) -> Vec<String> {
    query_values(query, "scope")
        .iter()
        .flat_map(|v| v.split(' '))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The decoded values of `key` in an `application/x-www-form-urlencoded` string, in order.
pub fn query_values(query: &str, key: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
        .collect()
}

/// What [`percent_encode`] leaves as it is: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Decodes `%XX` and `+` (form encoding). Invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Encodes a query value: unreserved characters stay, everything else is `%XX`.
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// The query of a token request for `service` and `scopes` (one `scope` parameter each, as
/// Docker sends them).
pub fn token_query(service: &str, scopes: &[String]) -> String {
    let mut q = format!("service={}", percent_encode(service));
    for s in scopes {
        q.push_str("&scope=");
        q.push_str(&percent_encode(s));
    }
    q
}

/// Most scopes one token request may carry. Docker, containerd and BuildKit ask for one to a
/// few (a repository, plus the sources of cross-repository mounts); a session carries its scopes
/// in every token regrelay hands out and caches, so their number is bounded.
pub const MAX_SCOPES: usize = 32;
/// Longest scope accepted: a repository name is at most 255 bytes (distribution's
/// `NameTotalLengthMax`), plus its type and actions.
pub const MAX_SCOPE_BYTES: usize = 512;

/// A `type:name:actions` scope, borrowed from its string (the name may hold `:` and `/`; the
/// actions are after the last `:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope<'a> {
    /// `repository`, `registry`, `repository(plugin)`…
    pub kind: &'a str,
    /// The resource: a repository path, or `catalog`.
    pub name: &'a str,
    /// Comma-separated actions.
    pub actions: &'a str,
}

impl<'a> Scope<'a> {
    /// Parses `type:name:actions`.
    pub fn parse(s: &'a str) -> Option<Scope<'a>> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        (!kind.is_empty() && !name.is_empty()).then_some(Scope {
            kind,
            name,
            actions,
        })
    }

    /// Its actions.
    pub fn actions(&self) -> impl Iterator<Item = &'a str> {
        self.actions.split(',').filter(|a| !a.is_empty())
    }

    /// True when this scope asks for every action of `need` on the same resource (`*` is every
    /// action).
    pub fn covers(&self, need: &Scope<'_>) -> bool {
        self.kind == need.kind
            && self.name == need.name
            && need
                .actions()
                .all(|a| self.actions().any(|x| x == a || x == "*"))
    }
}

/// True when one of `scopes` asks for everything `need` needs.
pub fn covered(scopes: &[String], need: &Scope<'_>) -> bool {
    scopes
        .iter()
        .filter_map(|s| Scope::parse(s))
        .any(|s| s.covers(need))
}

/// Why a token request's scopes are refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// More than [`MAX_SCOPES`].
    #[error(
        "the token request asks for {0} scopes; at most {MAX_SCOPES} are accepted (registry \
         clients ask for one per repository they use)"
    )]
    TooMany(usize),
    /// A scope longer than [`MAX_SCOPE_BYTES`].
    #[error(
        "a scope of {0} bytes; at most {MAX_SCOPE_BYTES} are accepted (repository names are at \
         most 255 bytes)"
    )]
    TooLong(usize),
}

/// The scopes a session keeps of what a token request asked: at most [`MAX_SCOPES`] of at most
/// [`MAX_SCOPE_BYTES`] (else the request is refused), without scope types the token service
/// ignores (GitLab's `container_registry_authentication_service.rb` reads `repository` and
/// `registry` only; `repository(plugin)` stays for other registries) and without repeats.
pub fn session_scopes(asked: Vec<String>) -> Result<Vec<String>, ScopeError> {
    if asked.len() > MAX_SCOPES {
        return Err(ScopeError::TooMany(asked.len()));
    }
    if let Some(long) = asked.iter().find(|s| s.len() > MAX_SCOPE_BYTES) {
        return Err(ScopeError::TooLong(long.len()));
    }
    let mut kept: Vec<String> = Vec::with_capacity(asked.len());
    for scope in asked {
        let known = Scope::parse(&scope).is_some_and(|s| {
            matches!(s.kind, "repository" | "registry") || s.kind.starts_with("repository(")
        });
        if known && !kept.contains(&scope) {
            kept.push(scope);
        }
    }
    Ok(kept)
}

/// The `exp` claim of a JWT, read from its payload without verifying anything: regrelay uses it
/// only to know when to mint again.
pub fn jwt_exp(token: &str) -> Option<u64> {
    jwt_times(token).1
}

/// The `iat` and `exp` claims of a JWT (unverified). Their difference is the token's lifetime
/// as its issuer's clock counts it, whatever the local clock says.
pub fn jwt_times(token: &str) -> (Option<u64>, Option<u64>) {
    let claims = jwt_claims(token);
    let claim = |name: &str| claims.as_ref().and_then(|c| c.get(name)?.as_u64());
    (claim("iat"), claim("exp"))
}

/// The payload of a JWT as JSON, unverified.
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The actions a registry JWT grants on `repository:<name>` (its `access` claim, unverified):
/// GitLab drops the actions a credential may not have without an error, so this is how regrelay
/// learns that a push was not granted.
pub fn jwt_granted(token: &str, name: &str) -> Vec<String> {
    let claims = jwt_claims(token);
    let Some(access) = claims
        .as_ref()
        .and_then(|c| c.get("access")?.as_array().cloned())
    else {
        return vec![];
    };
    access
        .iter()
        .filter(|a| a["type"] == "repository" && a["name"] == name)
        .filter_map(|a| a["actions"].as_array())
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// The username of a `Basic` `Authorization` value (never the password), if it is one.
pub fn basic_username(authorization: &[u8]) -> Option<String> {
    use base64::engine::general_purpose::STANDARD;
    let (scheme, rest) = match authorization.iter().position(|b| *b == b' ') {
        Some(i) => (&authorization[..i], &authorization[i + 1..]),
        None => return None,
    };
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = zeroize::Zeroizing::new(STANDARD.decode(rest.trim_ascii()).ok()?);
    let at = decoded.iter().position(|b| *b == b':')?;
    Some(String::from_utf8_lossy(&decoded[..at]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_what_a_request_needs() {
        let need = |s| Scope::parse(s).unwrap();
        let cases = [
            ("repository:g/p:pull,push", "repository:g/p:pull", true),
            ("repository:g/p:pull", "repository:g/p:pull,push", false),
            ("repository:g/p:*", "repository:g/p:delete", true),
            ("repository:g/p:pull", "repository:g/q:pull", false),
            ("repository:g/p:pull", "repository:g/p/x:pull", false),
            ("registry:catalog:*", "repository:catalog:pull", false),
            ("repository:h:5000/g:pull", "repository:h:5000/g:pull", true),
        ];
        for (have, want, ok) in cases {
            assert_eq!(
                covered(&[have.to_owned()], &need(want)),
                ok,
                "{have} {want}"
            );
        }
        assert_eq!(Scope::parse("repository::pull"), None);
        assert_eq!(Scope::parse("repository"), None);
    }

    #[test]
    fn session_scopes_are_bounded_and_keep_what_the_token_service_reads() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let kept = session_scopes(v(&[
            "repository:g/p:pull",
            "foo:bar:baz",
            "repository:g/p:pull",
            "registry:catalog:*",
            "repository(plugin):p/q:pull",
            "nonsense",
        ]))
        .unwrap();
        assert_eq!(
            kept,
            v(&[
                "repository:g/p:pull",
                "registry:catalog:*",
                "repository(plugin):p/q:pull"
            ])
        );
        let many: Vec<String> = (0..=MAX_SCOPES)
            .map(|i| format!("repository:r{i}:pull"))
            .collect();
        assert_eq!(
            session_scopes(many),
            Err(ScopeError::TooMany(MAX_SCOPES + 1))
        );
        let long = format!("repository:{}:pull", "a".repeat(MAX_SCOPE_BYTES));
        assert!(matches!(
            session_scopes(vec![long]),
            Err(ScopeError::TooLong(_))
        ));
    }

    #[test]
    fn granted_actions_and_basic_usernames() {
        use base64::engine::general_purpose::STANDARD;
        let claims = serde_json::json!({"access": [
            {"type": "repository", "name": "g/p", "actions": ["pull"]},
            {"type": "repository", "name": "g/q", "actions": ["pull", "push"]},
        ]});
        let jwt = format!("h.{}.s", URL_SAFE_NO_PAD.encode(claims.to_string()));
        assert_eq!(jwt_granted(&jwt, "g/p"), vec!["pull"]);
        assert_eq!(jwt_granted(&jwt, "g/q"), vec!["pull", "push"]);
        assert!(jwt_granted(&jwt, "g/r").is_empty());
        assert!(jwt_granted("garbage", "g/p").is_empty());
        let basic = format!("Basic {}", STANDARD.encode("deployer:secret"));
        assert_eq!(
            basic_username(basic.as_bytes()).as_deref(),
            Some("deployer")
        );
        assert_eq!(basic_username(b"Bearer abc"), None);
    }

    #[test]
    fn challenge_parse_table() {
        type Params<'a> = Option<&'a [(&'a str, &'a str)]>;
        let cases: &[(&str, Params)] = &[
            (
                r#"Bearer realm="http://gl/jwt/auth",service="container_registry",scope="repository:g/p:pull,push""#,
                Some(&[
                    ("realm", "http://gl/jwt/auth"),
                    ("service", "container_registry"),
                    ("scope", "repository:g/p:pull,push"),
                ]),
            ),
            (
                r#"bearer Realm="r", error="insufficient_scope""#,
                Some(&[("realm", "r"), ("error", "insufficient_scope")]),
            ),
            (
                r#"Bearer realm=r,service="a\"b""#,
                Some(&[("realm", "r"), ("service", "a\"b")]),
            ),
            ("Bearer", Some(&[])),
            (r#"Basic realm="Registry Realm""#, None),
            (r#"Bearer realm="unterminated"#, None),
            (r#"Bearer realm="a" service="b""#, None),
        ];
        for (header, want) in cases {
            let got = Challenge::parse(header);
            let want = want.map(|w| Challenge {
                params: w
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            });
            assert_eq!(got, want, "{header}");
        }
    }

    #[test]
    fn challenge_rewrite_keeps_service_scope_error() {
        let mut c = Challenge::parse(
            r#"Bearer realm="http://gitlab:8080/jwt/auth",service="container_registry",scope="repository:g/p:pull",error="invalid_token""#,
        )
        .unwrap();
        c.set("realm", "https://px.example.com/jwt/auth");
        assert_eq!(
            c.to_string(),
            r#"Bearer realm="https://px.example.com/jwt/auth",service="container_registry",scope="repository:g/p:pull",error="invalid_token""#
        );
        assert_eq!(c.error(), Some("invalid_token"));
        assert_eq!(Challenge::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn scope_parsing_table() {
        let cases: &[(&str, &[&str])] = &[
            ("service=container_registry", &[]),
            (
                "service=container_registry&scope=repository:g/p:pull,push",
                &["repository:g/p:pull,push"],
            ),
            (
                "scope=repository%3Ag%2Fa%3Apull&account=x&scope=repository:g/b:push+repository:g/c:pull",
                &["repository:g/a:pull", "repository:g/b:push", "repository:g/c:pull"],
            ),
            ("scope=&scope=%20registry:catalog:*", &["registry:catalog:*"]),
        ];
        for (q, want) in cases {
            assert_eq!(scopes_from_query(q), *want, "{q}");
        }
        let scopes = vec![
            "repository:g/p:pull,push".to_owned(),
            "registry:catalog:*".into(),
        ];
        let q = token_query("container_registry", &scopes);
        assert_eq!(
            q,
            "service=container_registry&scope=repository%3Ag%2Fp%3Apull%2Cpush&scope=registry%3Acatalog%3A%2A"
        );
        assert_eq!(scopes_from_query(&q), scopes);
    }

    #[test]
    fn invalid_percent_escapes_are_kept() {
        // `from_str_radix` alone takes "+f" as 15 (found while fuzzing).
        for (raw, want) in [
            ("%+f", "% f"),
            ("%-1", "%-1"),
            ("%2f", "/"),
            ("a+b", "a b"),
            ("%", "%"),
        ] {
            assert_eq!(percent_decode(raw), want, "{raw}");
        }
    }

    #[test]
    fn jwt_exp_table() {
        let jwt = |payload: &str| format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(payload));
        let cases = [
            (jwt(r#"{"exp":1700000000,"iat":1}"#), Some(1_700_000_000)),
            (jwt(r#"{"iat":1}"#), None),
            (jwt(r#"{"exp":"soon"}"#), None),
            (jwt("not json"), None),
            ("only-one-part".to_owned(), None),
            ("a.!!!.c".to_owned(), None),
        ];
        for (token, want) in cases {
            assert_eq!(jwt_exp(&token), want, "{token}");
        }
    }
}
