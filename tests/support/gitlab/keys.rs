//! Keys and encodings: the committed test signing key (which the test registry trusts through
//! `rootcertbundle`), its libtrust `kid`, JWT signing as `JSONWebToken::RSAToken` (RS256, registry
//! tokens) and `JSONWebToken::HMACToken` (HS256, Dependency Proxy tokens) do it
//! (lib/json_web_token/*.rb), `SecureRandom.uuid` token ids, query strings as Rack parses them,
//! and HTTP dates. No GitLab rule lives here.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use sha2::{Digest, Sha256};

use super::State;

/// Path of the committed test-only signing key.
pub fn signing_key_path() -> String {
    format!("{}/certs/token-signing.key", env!("CARGO_MANIFEST_DIR"))
}

/// Path of the certificate the registry trusts (`rootcertbundle`).
pub fn signing_cert_path() -> String {
    format!("{}/certs/token-signing.pem", env!("CARGO_MANIFEST_DIR"))
}

/// The signing key and its libtrust key id.
pub(super) fn load_signing_key() -> (RsaKeyPair, String) {
    let pem = std::fs::read_to_string(signing_key_path()).expect("read token signing key");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(b64).expect("PEM base64");
    let key = RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key");
    let kid = libtrust_kid(&spki_from_pkcs1(key.public_key().as_ref()));
    (key, kid)
}

/// `n` random bytes.
pub(super) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("system randomness");
    b
}

/// A random (version 4) UUID, as Ruby's `SecureRandom.uuid` writes it: GitLab's `jti`.
pub(super) fn uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An RS256 JWT with the registry key: header `{"typ":"JWT","alg":"RS256","kid":…}`.
pub(super) fn sign_rs256(st: &State, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": st.kid});
    let input = signing_input(&header, claims);
    let mut sig = vec![0u8; st.key.public().modulus_len()];
    st.key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .expect("RSA signing");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An HS256 JWT with `secret`: header `{"typ":"JWT","alg":"HS256"}`.
pub(super) fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "HS256"});
    let input = signing_input(&header, claims);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// The claims of an HS256 JWT signed with `secret`, or `None` when it is not one (any other
/// `alg`, a bad signature, not a JWT): ruby-jwt's `JWT::DecodeError`. Times are not checked here.
pub(super) fn verify_hs256(secret: &[u8], jwt: &str) -> Option<serde_json::Value> {
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    let [head, payload, sig] = parts[..] else {
        return None;
    };
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).ok()?).ok()?;
    if header["alg"] != "HS256" {
        return None;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    hmac::verify(&key, format!("{head}.{payload}").as_bytes(), &sig).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// SubjectPublicKeyInfo DER for an RSA PKCS#1 public key.
fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    let alg = der(
        0x30,
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ],
    );
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    der(0x30, &[alg, der(0x03, &bits)].concat())
}

/// libtrust key id: base32 of the first 30 bytes of SHA-256(SPKI DER), `:` every 4 characters.
pub fn libtrust_kid(spki: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki);
    let mut bits = 0u64;
    let mut nbits = 0;
    let mut b32 = String::new();
    for byte in &hash[..30] {
        bits = (bits << 8) | u64::from(*byte);
        nbits += 8;
        while nbits >= 5 {
            nbits -= 5;
            b32.push(ALPHABET[((bits >> nbits) & 31) as usize] as char);
        }
    }
    let chunks: Vec<String> = b32
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into())
        .collect();
    chunks.join(":")
}

/// Parses a query string into (key, value) pairs, keeping repeats, as Rack's `parse_query` does
/// (`+` is a space, `%XX` is decoded).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// An HTTP date (IMF-fixdate, RFC 9110 §5.6.7) for Unix seconds.
pub fn http_date(unix: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}
