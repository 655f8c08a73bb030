//! `--cache-store s3://BUCKET[/PREFIX]` and its settings ([`SharedConfig`]): the bucket, where
//! regrelay's objects go in it, the endpoint (path-style, any S3-compatible store), the region
//! requests are signed for, and the credentials, from a private file or the standard AWS
//! environment variables.

use std::path::Path;
use std::time::Duration;

use super::secret::read_private;
use super::{invalid, ConfigError, ConfigFile, SharedConfig};

/// Default `--cache-s3-lease-secs`.
pub const DEFAULT_CACHE_S3_LEASE_SECS: u64 = 15;

/// Default `--cache-s3-wait-secs`.
pub const DEFAULT_CACHE_S3_WAIT_SECS: u64 = 60;

/// Default `--cache-store-max-bytes`: 100 GiB.
pub const DEFAULT_CACHE_STORE_MAX_BYTES: u64 = 100 << 30;

/// The largest credentials file read.
const MAX_CREDENTIALS_FILE_BYTES: u64 = 64 * 1024;

/// `--cache-store` and the keys that only mean something with it; `None` when it is not set (a
/// key set without it is named as a mistake). `env` reads the AWS variables.
pub fn shared(
    raw: &ConfigFile,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<SharedConfig>, ConfigError> {
    let Some(url) = raw.cache_store.as_deref() else {
        let orphans: Vec<ConfigError> = [
            ("cache_store_max_bytes", raw.cache_store_max_bytes.is_some()),
            ("cache_s3_endpoint", raw.cache_s3_endpoint.is_some()),
            ("cache_s3_region", raw.cache_s3_region.is_some()),
            (
                "cache_s3_credentials_file",
                raw.cache_s3_credentials_file.is_some(),
            ),
            ("cache_s3_lease_secs", raw.cache_s3_lease_secs.is_some()),
            ("cache_s3_wait_secs", raw.cache_s3_wait_secs.is_some()),
            ("cache_redirect", raw.cache_redirect == Some(true)),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(key, _)| invalid(key, "needs --cache-store"))
        .collect();
        return match orphans.is_empty() {
            true => Ok(None),
            false => Err(ConfigError::all(orphans)),
        };
    };
    let mut problems = vec![];
    let location = bucket_and_prefix(url).map_err(|e| problems.push(invalid("cache_store", e)));
    let region = raw
        .cache_s3_region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        problems.push(invalid(
            "cache_s3_region",
            format!("{region:?} is not a region name (letters, digits and `-`)"),
        ));
    }
    let endpoint = match raw.cache_s3_endpoint.as_deref() {
        Some(e) => endpoint(e).map_err(|e| problems.push(invalid("cache_s3_endpoint", e))),
        None => Ok(format!("https://s3.{region}.amazonaws.com")),
    };
    let credentials = match raw.cache_s3_credentials_file.as_deref() {
        Some(path) => credentials_file(path)
            .map_err(|e| problems.push(invalid("cache_s3_credentials_file", e))),
        None => credentials_env(&env).map_err(|e| problems.push(invalid("cache_store", e))),
    };
    let lease_secs = raw
        .cache_s3_lease_secs
        .unwrap_or(DEFAULT_CACHE_S3_LEASE_SECS);
    if !(2..=3600).contains(&lease_secs) {
        problems.push(invalid(
            "cache_s3_lease_secs",
            format!("{lease_secs} is outside 2..=3600"),
        ));
    }
    let wait_secs = raw.cache_s3_wait_secs.unwrap_or(DEFAULT_CACHE_S3_WAIT_SECS);
    if !(1..=3600).contains(&wait_secs) {
        problems.push(invalid(
            "cache_s3_wait_secs",
            format!("{wait_secs} is outside 1..=3600"),
        ));
    }
    let max_bytes = raw
        .cache_store_max_bytes
        .unwrap_or(DEFAULT_CACHE_STORE_MAX_BYTES);
    if max_bytes < 1 << 20 {
        problems.push(invalid(
            "cache_store_max_bytes",
            format!("{max_bytes} is below 1 MiB (1048576)"),
        ));
    }
    if raw.cache_dir.is_none() {
        problems.push(invalid(
            "cache_store",
            "needs --cache-dir too: the local tier each replica fills and serves from (it can \
             be small; the bucket holds the rest)",
        ));
    }
    if !problems.is_empty() {
        return Err(ConfigError::all(problems));
    }
    let ((bucket, prefix), endpoint, (key_id, secret, session_token)) = (
        location.expect("checked"),
        endpoint.expect("checked"),
        credentials.expect("checked"),
    );
    Ok(Some(SharedConfig {
        bucket,
        prefix,
        endpoint,
        region,
        key_id,
        secret,
        session_token,
        lease: Duration::from_secs(lease_secs),
        wait: Duration::from_secs(wait_secs),
        max_bytes,
        redirect: raw.cache_redirect.unwrap_or(false),
    }))
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix ending in `/` or empty).
fn bucket_and_prefix(url: &str) -> Result<(String, String), String> {
    if url.contains('@') {
        return Err(
            "the URL carries credentials; write s3://BUCKET/PREFIX and give them with \
                    --cache-s3-credentials-file or the AWS_* variables"
                .into(),
        );
    }
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        format!("{url:?} is not an s3:// URL; write s3://BUCKET or s3://BUCKET/PREFIX")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        && !bucket.starts_with(['.', '-'])
        && !bucket.ends_with(['.', '-']);
    if !bucket_ok {
        return Err(format!(
            "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, `.` and `-`)"
        ));
    }
    let prefix = prefix.trim_matches('/');
    let prefix_ok = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && !prefix.split('/').any(|s| s == "." || s == "..");
    if !prefix_ok || prefix.contains("//") {
        return Err(format!(
            "prefix {prefix:?}: use letters, digits, `.`, `-`, `_` and single `/` between parts"
        ));
    }
    let prefix = match prefix.is_empty() {
        true => String::new(),
        false => format!("{prefix}/"),
    };
    Ok((bucket.to_owned(), prefix))
}

/// An endpoint URL: `http(s)://HOST[:PORT]`, nothing else (no credentials, path or query).
fn endpoint(raw: &str) -> Result<String, String> {
    // Never echoed whole: a URL with credentials in it would carry them into the message.
    if raw.contains('@') {
        return Err(
            "the URL carries credentials; give them with --cache-s3-credentials-file \
                    or the AWS_* variables, and write http(s)://HOST[:PORT]"
                .into(),
        );
    }
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let Some(authority) = uri.authority().filter(|_| scheme_ok) else {
        return Err(format!("{raw:?}: write http(s)://HOST[:PORT]"));
    };
    if uri.path() != "/" || uri.query().is_some() {
        return Err(format!(
            "{raw:?} has a path or query; write http(s)://HOST[:PORT] (requests are path-style: \
             the bucket is the first path segment)"
        ));
    }
    Ok(format!(
        "{}://{authority}",
        uri.scheme_str().unwrap_or("https")
    ))
}

type Credentials = (String, String, Option<String>);

/// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
fn credentials_env(env: &impl Fn(&str) -> Option<String>) -> Result<Credentials, String> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok((id, secret, get("AWS_SESSION_TOKEN"))),
        _ => Err("no credentials for the bucket: set AWS_ACCESS_KEY_ID and \
                  AWS_SECRET_ACCESS_KEY, or give --cache-s3-credentials-file FILE (mode 0600)"
            .into()),
    }
}

/// From a private file in `~/.aws/credentials` form: `key = value` lines, in no section or
/// in `[default]` (other profiles are ignored), `#` and `;` comments.
fn credentials_file(path: &Path) -> Result<Credentials, String> {
    let text = read_private(path, MAX_CREDENTIALS_FILE_BYTES)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_default = true;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_default = section.trim() == "default";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !in_default {
            continue;
        }
        let value = Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        match key.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = value,
            "aws_secret_access_key" => secret = value,
            "aws_session_token" => token = value,
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret, token)),
        _ => Err(format!(
            "{}: needs aws_access_key_id and aws_secret_access_key (as in ~/.aws/credentials, \
             in [default] or no section)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut ConfigFile)) -> ConfigFile {
        let mut c = ConfigFile {
            cache_dir: Some("/tmp/c".into()),
            cache_store: Some("s3://regrelay-cache/fleet/a".into()),
            ..Default::default()
        };
        f(&mut c);
        c
    }

    fn aws(k: &str) -> Option<String> {
        match k {
            "AWS_ACCESS_KEY_ID" => Some("GK0123".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("s3cr3t-value".into()),
            _ => None,
        }
    }

    #[test]
    fn a_store_url_names_bucket_prefix_endpoint_and_region() {
        let c = shared(&raw(|_| {}), aws).unwrap().unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("regrelay-cache", "fleet/a/")
        );
        assert_eq!(c.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str()),
            ("GK0123", "s3cr3t-value")
        );
        assert_eq!(c.lease, Duration::from_secs(DEFAULT_CACHE_S3_LEASE_SECS));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        let c = shared(
            &raw(|c| {
                c.cache_s3_endpoint = Some("http://127.0.0.1:3900".into());
                c.cache_store = Some("s3://b-1".into());
            }),
            |k| match k {
                "AWS_REGION" => Some("garage".into()),
                k => aws(k),
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.prefix.as_str(), c.region.as_str()), ("", "garage"));
        assert_eq!(c.endpoint, "http://127.0.0.1:3900");
    }

    #[test]
    fn mistakes_are_named_each() {
        let err = |c: ConfigFile| shared(&c, aws).unwrap_err().to_string();
        assert!(err(raw(|c| c.cache_store = Some("https://b/x".into()))).contains("s3://"));
        assert!(
            err(raw(|c| c.cache_store = Some("s3://Bad_Bucket".into()))).contains("bucket name")
        );
        assert!(err(raw(|c| c.cache_store = Some("s3://bkt/../x".into()))).contains("prefix"));
        let e = err(raw(|c| c.cache_s3_endpoint = Some("http://k:s@h:1".into())));
        assert!(e.contains("credentials") && !e.contains("k:s@"), "{e}");
        assert!(err(raw(|c| c.cache_s3_endpoint = Some("http://h:1/x".into()))).contains("path"));
        let e = err(raw(|c| {
            c.cache_store = Some("s3://AKIA:s3cr3t@bucket/p".into())
        }));
        assert!(e.contains("credentials") && !e.contains("s3cr3t"), "{e}");
        assert!(err(raw(|c| c.cache_dir = None)).contains("--cache-dir"));
        assert!(err(raw(|c| c.cache_s3_lease_secs = Some(1))).contains("2..=3600"));
        assert!(err(raw(|c| c.cache_s3_wait_secs = Some(0))).contains("1..=3600"));
        let none = shared(&raw(|_| {}), |_| None).unwrap_err().to_string();
        assert!(none.contains("AWS_ACCESS_KEY_ID"), "{none}");
        let orphan = raw(|c| {
            c.cache_store = None;
            c.cache_redirect = Some(true);
        });
        assert!(err(orphan).contains("needs --cache-store"));
    }

    #[test]
    fn a_credentials_file_is_read_from_default_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "[other]\naws_access_key_id = NOPE\n\n[default]\n# comment\naws_access_key_id = GKfile\n\
             aws_secret_access_key = file-secret\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with_file = raw(|c| c.cache_s3_credentials_file = Some(path.clone()));
        let c = shared(&with_file, |_| None).unwrap().unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str()),
            ("GKfile", "file-secret")
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = shared(&with_file, |_| None).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("file-secret"), "{e}");
    }
}
