//! Pull credentials regrelay holds for an upstream (`--upstream-credentials NAME=FILE`), for
//! clients that cannot send their own: a node's container runtime pulling through the mirror
//! (kubelet pull secrets do not reach a mirror). The file holds `username:token` (a GitLab deploy
//! token with `read_registry`, say), must be private (mode 0600 or stricter), and is re-read
//! when it changes, so a rotated token takes effect without a restart.
//!
//! The credentials never leave regrelay: they only ever go to the upstream's token service, and
//! clients only see what the upstream answers. Which requests may use them (pulls, from
//! `--inject-credentials-for` addresses, without credentials of their own) is decided by
//! [`crate::app`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{read_private, ConfigError};
use crate::lock::{lock, try_lock};

/// Largest credentials file read.
pub const MAX_CREDENTIALS_FILE_BYTES: u64 = 4096;
/// How often the file's modification time is looked at.
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The credential in force: the `Authorization` value and a fingerprint that changes with it
/// (token cache keys include it, so a rotated credential never reuses the old one's tokens).
#[derive(Clone)]
pub struct Credential {
    /// `Basic base64(username:token)`.
    pub authorization: Zeroizing<Vec<u8>>,
    /// Changes when the credential does; not reversible.
    pub fingerprint: u128,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("authorization", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// When the file was last looked at, and its modification time then.
struct Seen {
    checked: Instant,
    modified: Option<SystemTime>,
}

/// A credentials file, re-read when it changes.
pub struct InjectedCredentials {
    path: PathBuf,
    /// Read on every injected request: lock-free, never poisoned.
    current: ArcSwap<Credential>,
    /// One caller at a time looks at the file; the others use the credential in force.
    seen: Mutex<Seen>,
}

impl InjectedCredentials {
    /// Reads the file (it must be valid at start).
    pub fn load(path: &Path) -> Result<InjectedCredentials, ConfigError> {
        let current = read(path).map_err(|reason| ConfigError::Invalid {
            key: "upstream_credentials",
            reason: format!("{}: {reason}", path.display()),
        })?;
        Ok(InjectedCredentials {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(current),
            seen: Mutex::new(Seen {
                checked: Instant::now(),
                modified: modified(path),
            }),
        })
    }

    /// The credential in force, re-read first when the file changed (a bad new file is refused
    /// with a log line and the old credential stays).
    pub fn current(&self) -> Credential {
        if let Some(mut seen) = try_lock(&self.seen) {
            self.recheck(&mut seen);
        }
        Credential::clone(&self.current.load())
    }

    /// Re-reads the file when [`RECHECK_EVERY`] passed and its modification time changed.
    fn recheck(&self, seen: &mut Seen) {
        if seen.checked.elapsed() >= RECHECK_EVERY {
            seen.checked = Instant::now();
            let now = modified(&self.path);
            if now != seen.modified {
                match read(&self.path) {
                    Ok(c) => {
                        tracing::info!(file = %self.path.display(), "upstream credentials re-read");
                        self.current.store(Arc::new(c));
                        seen.modified = now;
                    }
                    Err(reason) => {
                        tracing::error!(file = %self.path.display(), error = %reason, "new upstream credentials refused; the previous ones stay");
                    }
                }
            }
        }
    }

    /// Reads the file now, whatever its time stamp (SIGHUP); on error the credential in force
    /// stays and the reason is returned.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = read(&self.path)?;
        let mut seen = lock(&self.seen);
        self.current.store(Arc::new(fresh));
        seen.modified = modified(&self.path);
        seen.checked = Instant::now();
        Ok(())
    }

    /// The file it reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Parses `username:token` (one trailing newline allowed).
fn read(path: &Path) -> Result<Credential, String> {
    let text = Zeroizing::new(read_private(path, MAX_CREDENTIALS_FILE_BYTES)?);
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let Some((user, token)) = line.split_once(':') else {
        return Err("want one line `username:token`".into());
    };
    if user.is_empty() || token.is_empty() || line.contains(['\n', '\r']) {
        return Err("want one line `username:token`".into());
    }
    let authorization = Zeroizing::new(format!("Basic {}", STANDARD.encode(line)).into_bytes());
    let digest = Sha256::digest(&*authorization);
    let fingerprint = u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"));
    Ok(Credential {
        authorization,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn files_are_checked_and_re_read_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        for (text, mode, want) in [
            ("deploy:gldt-abc\n", 0o600, None),
            ("deploy:gldt-abc", 0o400, None),
            ("deploy:gldt-abc\n", 0o644, Some("chmod 600")),
            ("no-colon\n", 0o600, Some("username:token")),
            ("a:b\nc:d\n", 0o600, Some("username:token")),
        ] {
            write(&path, text, mode);
            let got = InjectedCredentials::load(&path)
                .map(|_| ())
                .map_err(|e| e.to_string());
            match want {
                None => assert!(got.is_ok(), "{text:?} {mode:o}: {got:?}"),
                Some(w) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(w) && !e.contains("gldt"), "{e}");
                }
            }
        }
        write(&path, "deploy:gldt-old\n", 0o600);
        let creds = InjectedCredentials::load(&path).unwrap();
        let old = creds.current();
        assert_eq!(
            &*old.authorization,
            format!("Basic {}", STANDARD.encode("deploy:gldt-old")).as_bytes()
        );
        assert!(!format!("{old:?}").contains("Basic"));
        // Rotated: taken within the re-check interval (mtime granularity: set it explicitly).
        write(&path, "deploy:gldt-new\n", 0o600);
        let later = SystemTime::now() + Duration::from_secs(10);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        tokio::time::advance(RECHECK_EVERY).await;
        let new = creds.current();
        assert_ne!(new.fingerprint, old.fingerprint);
        // A bad new file keeps the old credential.
        write(&path, "garbage", 0o600);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(10))
            .unwrap();
        tokio::time::advance(RECHECK_EVERY).await;
        assert_eq!(creds.current().fingerprint, new.fingerprint);
    }

    /// Injection reads the credential on every request it serves: a panic while the file's
    /// re-check was under way must not fail every later injected pull, nor stop re-reading.
    #[tokio::test(start_paused = true)]
    async fn a_panic_during_a_re_check_fails_no_later_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        write(&path, "deploy:gldt-old\n", 0o600);
        let creds = InjectedCredentials::load(&path).unwrap();
        let old = creds.current().fingerprint;
        crate::lock::poison(&creds.seen);
        assert_eq!(creds.current().fingerprint, old);
        write(&path, "deploy:gldt-new\n", 0o600);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        tokio::time::advance(RECHECK_EVERY).await;
        assert_ne!(creds.current().fingerprint, old, "re-read after the panic");
        creds.reload().unwrap();
    }
}
