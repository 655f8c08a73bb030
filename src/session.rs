//! Sealed sessions: the opaque token regrelay hands to clients instead of GitLab's short-lived JWT.
//!
//! A session holds what regrelay needs to mint upstream tokens later on the client's behalf: the
//! client's `Authorization` header as it arrived at `/jwt/auth` (or none, for anonymous pulls), the
//! service, the exact scopes that were asked for, its expiry, and a random id (the token cache key).
//! It is serialized, then sealed with XChaCha20-Poly1305 under the first key of a [`KeyRing`];
//! the key id and the public URL are the associated data, so a token opens only on a regrelay that
//! has the key *and* is reached under the same public URL. Any replica holding the key serves any
//! session: no sticky sessions, no shared store, and a restart loses nothing.
//!
//! Token form: `rr1.<kid>.<base64url(nonce ‖ ciphertext)>`. Nothing here logs; [`Session`]'s
//! `Debug` never shows the credentials, and every plaintext buffer is zeroized after use.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::config::ConfigError;

/// Prefix of every token regrelay seals; anything else is not ours and passes untouched.
pub const TOKEN_PREFIX: &str = "rr1.";
const NONCE_LEN: usize = 24;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a sealed token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A registry access session: scopes fixed at issue.
    Access,
    /// An OAuth2 refresh token (containerd): credentials only, scopes come with each use.
    Refresh,
}

/// An open session. Credentials are zeroized on drop and never printed.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Session {
    /// Random id: the token cache key.
    #[zeroize(skip)]
    pub id: u128,
    /// Access or refresh.
    #[zeroize(skip)]
    pub kind: Kind,
    /// The client's `Authorization` header value, byte-for-byte (base64 inside the seal), or
    /// `None` for an anonymous session.
    #[serde(with = "opt_bytes")]
    pub authorization: Option<Vec<u8>>,
    /// The `service` the client asked for.
    pub service: String,
    /// The exact scopes the client asked for (each one `type:name:actions`).
    pub scopes: Vec<String>,
    /// Issued at, Unix seconds.
    #[zeroize(skip)]
    pub iat: u64,
    /// Expires at, Unix seconds.
    #[zeroize(skip)]
    pub exp: u64,
    /// The upstream it is bound to (its name; empty for the default upstream, as sealed before
    /// there were several).
    #[serde(default)]
    pub upstream: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &format_args!("{:032x}", self.id))
            .field("kind", &self.kind)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("service", &self.service)
            .field("scopes", &self.scopes)
            .field("exp", &self.exp)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl Session {
    /// Heap bytes it holds, roughly: its credentials, service, scopes and upstream name.
    pub fn heap_bytes(&self) -> usize {
        let scopes: usize = self.scopes.iter().map(|s| 24 + s.len()).sum();
        self.authorization.as_ref().map_or(0, Vec::len)
            + self.service.len()
            + scopes
            + self.upstream.len()
    }

    /// A new session of `kind` with a random id, valid for `lifetime` from now.
    pub fn new(
        kind: Kind,
        authorization: Option<Vec<u8>>,
        service: String,
        scopes: Vec<String>,
        lifetime: Duration,
    ) -> Session {
        let mut id = [0u8; 16];
        chacha20poly1305::aead::rand_core::RngCore::fill_bytes(&mut OsRng, &mut id);
        let iat = unix_now();
        Session {
            id: u128::from_le_bytes(id),
            kind,
            authorization,
            service,
            scopes,
            iat,
            exp: iat + lifetime.as_secs(),
            upstream: String::new(),
        }
    }
}

mod opt_bytes {
    use super::{Engine, STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&zeroize::Zeroizing::new(STANDARD.encode(b)).as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(zeroize::Zeroizing::new)
            .map(|s| {
                STANDARD
                    .decode(s.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
    }
}

/// Why a sealed token was refused. Says nothing about its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not of the `rr1.<kid>[.<name>].<data>` form.
    #[error("malformed session token")]
    Malformed,
    /// Sealed with a key this replica does not hold (rotated out, or another deployment).
    #[error("session token sealed with a key this replica does not have: check the key ring on every replica")]
    UnknownKey,
    /// Sealed for another canonical public URL (replicas configured differently).
    #[error("session token sealed by a replica with a different --public-url")]
    OtherPublicUrl,
    /// Tampered with.
    #[error("session token failed authentication")]
    Tampered,
    /// Past its expiry.
    #[error("session expired")]
    Expired,
}

struct SealingKey {
    id: String,
    cipher: XChaCha20Poly1305,
    /// Accepted for opening, never used for sealing (step 1 of a rolling key rotation).
    open_only: bool,
}

/// Largest session key file read (a ring of keys is a few hundred bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// Marks a key-file line whose key opens sessions but never seals them.
pub const OPEN_ONLY: &str = "open-only";

/// Session keys: the first seals, every one opens. Key material is zeroized on drop (the cipher
/// type zeroizes its key schedule).
pub struct KeyRing {
    keys: Vec<SealingKey>,
    ephemeral: bool,
    /// Unique per ring built in this process: what was opened under one ring is known by it.
    generation: u64,
}

/// The key ring in force, replaceable while serving ([`Keys::reload`], on SIGHUP): sessions
/// sealed before a reload still open as long as the new ring holds their key (see the rotation
/// steps in the README).
#[derive(Debug)]
pub struct Keys {
    path: Option<std::path::PathBuf>,
    /// Read on every request with a session: lock-free, never poisoned.
    ring: arc_swap::ArcSwap<KeyRing>,
}

impl Keys {
    /// The ring from `path`, or a random per-process key without one.
    pub fn new(path: Option<&Path>) -> Result<Keys, ConfigError> {
        let ring = match path {
            Some(p) => KeyRing::load(p)?,
            None => KeyRing::ephemeral(),
        };
        Ok(Keys {
            path: path.map(Path::to_owned),
            ring: arc_swap::ArcSwap::from_pointee(ring),
        })
    }

    /// The ring in force.
    pub fn current(&self) -> Arc<KeyRing> {
        self.ring.load_full()
    }

    /// Reads the key file again: `Ok(true)` when replaced, `Ok(false)` without a key file; on
    /// any error the ring in force stays.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let fresh = KeyRing::load(path)?;
        self.ring.store(Arc::new(fresh));
        Ok(true)
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{}{}", k.id, if k.open_only { " (open-only)" } else { "" }))
            .collect();
        f.debug_struct("KeyRing")
            .field("key_ids", &ids)
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

impl KeyRing {
    /// Builds a ring from raw 32-byte keys, first one sealing.
    pub fn from_keys(keys: &[[u8; 32]]) -> KeyRing {
        let keys: Vec<([u8; 32], bool)> = keys.iter().map(|k| (*k, false)).collect();
        let ring = KeyRing::with_modes(&keys);
        drop(Zeroizing::new(keys));
        ring
    }

    /// Builds a ring from keys and their open-only flags; the first key that is not open-only
    /// seals. The caller guarantees there is one.
    fn with_modes(keys: &[([u8; 32], bool)]) -> KeyRing {
        let keys = keys
            .iter()
            .map(|(k, open_only)| {
                let hash = Sha256::digest(k);
                SealingKey {
                    id: hash[..4].iter().map(|b| format!("{b:02x}")).collect(),
                    cipher: XChaCha20Poly1305::new(Key::from_slice(k)),
                    open_only: *open_only,
                }
            })
            .collect();
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        KeyRing {
            keys,
            ephemeral: false,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// This ring's number, unique in the process (a reload builds a new ring, a new number).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// One random key for this process only: sessions die with it.
    pub fn ephemeral() -> KeyRing {
        let key = Zeroizing::new(<[u8; 32]>::from(XChaCha20Poly1305::generate_key(
            &mut OsRng,
        )));
        let mut ring = KeyRing::from_keys(&[*key]);
        ring.ephemeral = true;
        ring
    }

    /// Reads a key file: one base64 32-byte key per line, `#` comments and blank lines ignored;
    /// `open-only KEY` lines open but never seal. The first other key seals; all open.
    /// The file must not be readable by group or others, and is read with a size bound.
    ///
    /// Rolling rotation over replicas: (1) add the new key as `open-only` everywhere, so every
    /// replica opens what any replica will seal with it; (2) make it the first plain key
    /// everywhere (it seals, the old one still opens); (3) after one session lifetime, remove the
    /// old key.
    pub fn load(path: &Path) -> Result<KeyRing, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "session_key_file",
            reason: format!("{}: {reason}", path.display()),
        };
        let text =
            Zeroizing::new(crate::config::read_private(path, MAX_KEY_FILE_BYTES).map_err(invalid)?);
        let mut keys = Zeroizing::new(Vec::new());
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (open_only, encoded) = match line.strip_prefix(OPEN_ONLY) {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            // The decode error never echoes the key.
            let raw = Zeroizing::new(
                STANDARD
                    .decode(encoded)
                    .map_err(|_| invalid(format!("line {}: not base64", n + 1)))?,
            );
            let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "line {}: a key is 32 bytes (`head -c 32 /dev/urandom | base64`)",
                    n + 1
                ))
            })?;
            keys.push((key, open_only));
        }
        if keys.is_empty() {
            return Err(invalid("no key found".into()));
        }
        if keys.iter().all(|(_, open_only)| *open_only) {
            return Err(invalid(
                "every key is open-only: one key must seal (a line without `open-only`)".into(),
            ));
        }
        Ok(KeyRing::with_modes(&keys))
    }

    /// True when the ring is a random per-process key.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// What the startup line says of the ring: `ephemeral`, or how many keys and which one
    /// seals (its id, a hash prefix that tokens carry anyway; never the key).
    pub fn describe(&self) -> String {
        if self.ephemeral {
            return "ephemeral (random per process)".to_owned();
        }
        let sealing = self
            .keys
            .iter()
            .find(|k| !k.open_only)
            .map_or("-", |k| &k.id);
        format!("{} key(s), sealing with {sealing}", self.keys.len())
    }

    /// Seals `session` for clients of `public_url`.
    pub fn seal(&self, session: &Session, public_url: &str) -> String {
        let key = self
            .keys
            .iter()
            .find(|k| !k.open_only)
            .expect("a key ring always has a sealing key");
        let plain = Zeroizing::new(serde_json::to_vec(session).expect("a session serializes"));
        let name = name_hint(public_url);
        let data = key.encrypt(&plain, Some(&name), public_url);
        format!("{TOKEN_PREFIX}{}.{name}.{data}", key.id)
    }

    /// Opens a token sealed for `public_url`, checking its expiry against `now`.
    pub fn open(&self, token: &str, public_url: &str, now: u64) -> Result<Session, OpenError> {
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(OpenError::Malformed)?;
        // `<kid>.<name>.<data>`, or `<kid>.<data>` as sealed before names were carried.
        let (kid, rest) = rest.split_once('.').ok_or(OpenError::Malformed)?;
        let (name, data) = match rest.split_once('.') {
            Some((name, data)) => (Some(name), data),
            None => (None, rest),
        };
        let data = URL_SAFE_NO_PAD
            .decode(data)
            .map_err(|_| OpenError::Malformed)?;
        if data.len() < NONCE_LEN {
            return Err(OpenError::Malformed);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == kid)
            .ok_or(OpenError::UnknownKey)?;
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let aad = aad(&key.id, name, public_url);
        let plain = Zeroizing::new(
            key.cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| match name {
                    // The name is part of the authenticated data, so a token that fails and
                    // names another public URL was sealed for it (or had its name forged).
                    Some(n) if n != name_hint(public_url) => OpenError::OtherPublicUrl,
                    _ => OpenError::Tampered,
                })?,
        );
        let session: Session = serde_json::from_slice(&plain).map_err(|_| OpenError::Malformed)?;
        if session.exp <= now {
            return Err(OpenError::Expired);
        }
        Ok(session)
    }
}

/// A short, public hint of the public URL a token is sealed for (8 hex digits of its SHA-256),
/// so a replica configured with another `--public-url` can say so instead of "tampered".
fn name_hint(public_url: &str) -> String {
    Sha256::digest(public_url.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl SealingKey {
    /// `plain` sealed under this key for `public_url` (and the name hint a token carries, if
    /// any): a fresh nonce and the ciphertext, base64url.
    fn encrypt(&self, plain: &[u8], name: Option<&str>, public_url: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = aad(&self.id, name, public_url);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 sealing does not fail for in-memory data");
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(data)
    }
}

fn aad(kid: &str, name: Option<&str>, public_url: &str) -> Vec<u8> {
    match name {
        Some(name) => format!("{TOKEN_PREFIX}{kid}.{name}|{public_url}").into_bytes(),
        None => format!("{TOKEN_PREFIX}{kid}|{public_url}").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "https://registry.example.com";

    fn session(lifetime: u64) -> Session {
        Session::new(
            Kind::Access,
            Some(b"Basic YWxpY2U6czNjcjN0".to_vec()),
            "container_registry".into(),
            vec!["repository:g/p:pull,push".into()],
            Duration::from_secs(lifetime),
        )
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let ring = KeyRing::from_keys(&[[7; 32]]);
        let s = session(3600);
        let token = ring.seal(&s, PUBLIC);
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(
            !token.contains("YWxpY2U6czNjcjN0"),
            "credentials must not be readable"
        );
        let now = unix_now();
        let opened = ring.open(&token, PUBLIC, now).unwrap();
        assert_eq!(opened.id, s.id);
        assert_eq!(opened.authorization, s.authorization);
        assert_eq!(opened.scopes, s.scopes);

        // A flipped bit anywhere in the sealed part, another public URL, an expired session.
        let mut bytes = token.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let cases: &[(&str, &str, u64, OpenError)] = &[
            (&tampered, PUBLIC, now, OpenError::Tampered),
            (
                &token,
                "https://other.example.com",
                now,
                OpenError::OtherPublicUrl,
            ),
            (&token, PUBLIC, s.exp, OpenError::Expired),
            ("rr1.nodot", PUBLIC, now, OpenError::Malformed),
            ("rr1.abcd.ef01.!!!", PUBLIC, now, OpenError::Malformed),
            ("rr1.abcd.!!!", PUBLIC, now, OpenError::Malformed),
            ("eyJhbGciOi.x.y", PUBLIC, now, OpenError::Malformed),
        ];
        for (tok, public, at, want) in cases {
            assert_eq!(ring.open(tok, public, *at).unwrap_err(), *want, "{tok}");
        }
    }

    #[test]
    fn tokens_sealed_before_names_were_carried_still_open() {
        let ring = KeyRing::from_keys(&[[9; 32]]);
        let s = session(60);
        let key = &ring.keys[0];
        let plain = serde_json::to_vec(&s).unwrap();
        let data = key.encrypt(&plain, None, PUBLIC);
        let legacy = format!("{TOKEN_PREFIX}{}.{data}", key.id);
        assert_eq!(ring.open(&legacy, PUBLIC, unix_now()).unwrap().id, s.id);
        assert_eq!(
            ring.open(&legacy, "https://other.example.com", unix_now())
                .unwrap_err(),
            OpenError::Tampered
        );
        let unknown = KeyRing::from_keys(&[[8; 32]]);
        let msg = unknown
            .open(&ring.seal(&s, PUBLIC), PUBLIC, unix_now())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("check the key ring on every replica"), "{msg}");
    }

    #[test]
    fn rotation_new_key_seals_old_key_still_opens_removed_key_is_unknown() {
        let old = KeyRing::from_keys(&[[1; 32]]);
        let rotated = KeyRing::from_keys(&[[2; 32], [1; 32]]);
        let after = KeyRing::from_keys(&[[2; 32]]);
        let s = session(60);
        let now = unix_now();
        let by_old = old.seal(&s, PUBLIC);
        let by_new = rotated.seal(&s, PUBLIC);
        assert!(rotated.open(&by_old, PUBLIC, now).is_ok());
        assert!(old.open(&by_new, PUBLIC, now).is_err());
        assert_eq!(
            after.open(&by_old, PUBLIC, now).unwrap_err(),
            OpenError::UnknownKey
        );
        assert!(after.open(&by_new, PUBLIC, now).is_ok());
    }

    #[test]
    fn key_file_parsing_and_debug_redaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let k1 = STANDARD.encode([3u8; 32]);
        let k2 = STANDARD.encode([4u8; 32]);
        let write = |text: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&format!("# current\n{k1}\n\n# previous\n{k2}\n"));
        let ring = KeyRing::load(&path).unwrap();
        assert_eq!(ring.keys.len(), 2);
        assert!(!format!("{ring:?}").contains(&k1));
        for (text, want) in [
            ("", "no key"),
            ("!!\n", "not base64"),
            ("AAAA\n", "32 bytes"),
            (format!("open-only {k1}\n").as_str(), "one key must seal"),
            ("#\n".repeat(40_000).as_str(), "larger than"),
        ] {
            write(text);
            let msg = KeyRing::load(&path).unwrap_err().to_string();
            assert!(
                msg.contains("session_key_file") && msg.contains(want),
                "{msg}"
            );
        }
        let s = session(60);
        let dbg = format!("{s:?}");
        assert!(dbg.contains("<redacted>") && !dbg.contains("YWxp"), "{dbg}");
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        // The file's group is this process's own group: group read is fine (a Kubernetes Secret
        // under fsGroup), group write or any access by others is not; foreign groups are covered
        // by config::tests.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{}\n", STANDARD.encode([5u8; 32]))).unwrap();
        let cases = [
            (0o600, true),
            (0o400, true),
            (0o440, true),
            (0o660, false),
            (0o644, false),
            (0o604, false),
        ];
        for (mode, ok) in cases {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = KeyRing::load(&path);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}");
            if let Err(e) = got {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
    }

    #[test]
    fn open_only_keys_open_but_never_seal_through_a_rolling_rotation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (old, new) = (STANDARD.encode([1u8; 32]), STANDARD.encode([2u8; 32]));
        let ring = |text: String| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            KeyRing::load(&path).unwrap()
        };
        let before = ring(format!("{old}\n"));
        // Step 1: the new key is open-only everywhere; sealing still uses the old key.
        let step1 = ring(format!("{OPEN_ONLY} {new}\n{old}\n"));
        // Step 2: the new key seals on some replicas while others are still at step 1.
        let step2 = ring(format!("{new}\n{old}\n"));
        let now = unix_now();
        let s = session(60);
        let by_step1 = step1.seal(&s, PUBLIC);
        assert!(
            before.open(&by_step1, PUBLIC, now).is_ok(),
            "step 1 seals with the old key"
        );
        let by_step2 = step2.seal(&s, PUBLIC);
        assert!(step1.open(&by_step2, PUBLIC, now).is_ok());
        assert!(step2.open(&by_step1, PUBLIC, now).is_ok());
        assert!(format!("{step1:?}").contains("open-only"));
    }
}
