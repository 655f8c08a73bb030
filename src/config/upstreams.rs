//! The upstream table of the mirror endpoint: the default upstream (`--registry`) first, then
//! `--upstream NAME=URL` flags and `[[upstream]]` tables, names unique, pull credentials
//! attached by name, and the root upstream picked. Every bad entry is reported, not the first.

use std::path::PathBuf;

use http::Uri;

use super::origin::parse_realm;
use super::problems::Problems;
use super::{invalid, AllowedOrigin, ConfigError, ConfigFile, Origin};

/// One upstream registry of the mirror endpoint.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Its name (lowercase): the registry host clients use, or an alias.
    pub name: String,
    /// More names that route to it (the default upstream also answers to the public URL's host).
    pub aliases: Vec<String>,
    /// Its origin.
    pub origin: Origin,
    /// Repository prefix prepended to names on the way up (no leading or trailing `/`).
    pub prefix: String,
    /// Its token realm, when configured.
    pub token_realm: Option<Uri>,
    /// Pull credentials file, when regrelay holds one for it.
    pub credentials_file: Option<PathBuf>,
    /// Extra CA bundle for it.
    pub ca: Option<PathBuf>,
    /// Origins its token service may redirect credentials to (`--auth-redirect-allow` for the
    /// default upstream, `auth_redirect_allow` in an `[[upstream]]` table).
    pub auth_redirect_allow: Vec<AllowedOrigin>,
}

impl UpstreamConfig {
    /// True when `name` (lowercase) is this upstream's name or an alias.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

/// An upstream name: a registry host[:port] or an alias, lowercase, no `/`.
fn name(s: &str) -> Result<String, ConfigError> {
    let name = s.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name != "v2"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !ok {
        return Err(invalid(
            "upstream",
            format!("{s:?}: a name is a registry host[:port] or an alias ([a-z0-9.-_:])"),
        ));
    }
    Ok(name)
}

/// Splits `https://host/v2/<prefix>` into the origin and the repository prefix.
fn url(key: &'static str, s: &str) -> Result<(Origin, String), ConfigError> {
    let uri: Uri = s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
    let path = uri.path().trim_end_matches('/');
    let prefix = match path {
        "" | "/v2" => String::new(),
        p => p.strip_prefix("/v2/").map(str::to_owned).ok_or_else(|| {
            invalid(
                key,
                format!("{s:?}: a path must be /v2/<repository prefix>"),
            )
        })?,
    };
    let canonical = prefix.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    });
    if (!prefix.is_empty() && !canonical) || uri.query().is_some() {
        return Err(invalid(
            key,
            format!("{s:?}: not a canonical repository prefix"),
        ));
    }
    let base = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or(""),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    Ok((Origin::parse(key, &base)?, prefix))
}

/// The default upstream: the `--registry` origin, answering to the public URLs' hosts too.
pub(super) fn default(
    raw: &ConfigFile,
    registry: &Origin,
    publics: &[Origin],
    token_realm: Option<Uri>,
    auth_redirect_allow: Vec<AllowedOrigin>,
) -> UpstreamConfig {
    UpstreamConfig {
        name: registry.authority().as_str().to_ascii_lowercase(),
        aliases: publics
            .iter()
            .map(|p| p.authority().as_str().to_ascii_lowercase())
            .collect(),
        origin: registry.clone(),
        prefix: String::new(),
        token_realm,
        credentials_file: None,
        ca: raw.upstream_ca.clone(),
        auth_redirect_allow,
    }
}

/// One `--upstream NAME=URL`.
fn from_flag(spec: &str) -> Result<UpstreamConfig, ConfigError> {
    let (name_part, url_part) = spec
        .split_once('=')
        .ok_or_else(|| invalid("upstream", format!("{spec:?}: want NAME=URL")))?;
    let (origin, prefix) = url("upstream", url_part.trim())?;
    Ok(UpstreamConfig {
        name: name(name_part)?,
        aliases: vec![],
        origin,
        prefix,
        token_realm: None,
        credentials_file: None,
        ca: None,
        auth_redirect_allow: vec![],
    })
}

/// One `[[upstream]]` table; every problem in it is kept.
fn from_table(t: &super::UpstreamTable, p: &mut Problems) -> Option<UpstreamConfig> {
    let place = p.take(url("upstream", &t.url));
    let name = p.take(name(&t.name));
    let token_realm = p.take(t.token_realm.as_deref().map(parse_realm).transpose());
    let allow = p.list(&t.auth_redirect_allow, AllowedOrigin::parse);
    let ((origin, prefix), name, token_realm, auth_redirect_allow) =
        (place?, name?, token_realm?, allow?);
    Some(UpstreamConfig {
        name,
        aliases: vec![],
        origin,
        prefix,
        token_realm,
        credentials_file: t.credentials_file.clone(),
        ca: t.ca.clone(),
        auth_redirect_allow,
    })
}

/// Every upstream, `default` first, and the index of the root one; `None` when a problem was
/// kept. Without `default` (the `--registry` key has its own problem) the other entries are
/// still checked, but names are not looked up: one may name the default upstream.
pub(super) fn table(
    raw: &ConfigFile,
    default: Option<UpstreamConfig>,
    p: &mut Problems,
) -> Option<(Vec<UpstreamConfig>, usize)> {
    let before = p.len();
    let complete = default.is_some();
    let mut all: Vec<UpstreamConfig> = default.into_iter().collect();
    for spec in entries(&raw.upstream) {
        all.extend(p.take(from_flag(spec)));
    }
    for t in raw.upstream_tables.iter().flatten() {
        all.extend(from_table(t, p));
    }
    let find = |all: &[UpstreamConfig], name: &str| all.iter().position(|u| u.answers_to(name));
    for (i, u) in all.iter().enumerate() {
        if let Some(j) = find(&all[..i], &u.name) {
            p.add(invalid(
                "upstream",
                format!(
                    "{:?} names two upstreams ({} and {}); give each a name of its own",
                    u.name, all[j].origin, u.origin
                ),
            ));
        }
    }
    for spec in entries(&raw.upstream_credentials) {
        let Some((name, file)) = spec.split_once('=') else {
            p.add(invalid(
                "upstream_credentials",
                format!("{spec:?}: want NAME=FILE"),
            ));
            continue;
        };
        match find(&all, &name.trim().to_ascii_lowercase()) {
            Some(i) => all[i].credentials_file = Some(PathBuf::from(file.trim())),
            None if complete => p.add(invalid(
                "upstream_credentials",
                format!(
                    "{name:?} names no upstream; use a name of --upstream or --registry's host"
                ),
            )),
            None => {}
        }
    }
    let root = match &raw.root_upstream {
        Some(name) => find(&all, &name.trim().to_ascii_lowercase()).or_else(|| {
            if complete {
                p.add(invalid(
                    "root_upstream",
                    format!(
                        "{name:?} names no upstream; use a name of --upstream or --registry's host"
                    ),
                ));
            }
            None
        }),
        None => Some(0),
    };
    if p.len() != before || !complete {
        return None;
    }
    Some((all, root?))
}

/// The non-empty entries of a list key.
fn entries(list: &Option<Vec<String>>) -> impl Iterator<Item = &String> {
    list.iter().flatten().filter(|s| !s.trim().is_empty())
}
