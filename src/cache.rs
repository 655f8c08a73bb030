//! The storage and authorization core of the authorizing pull-through cache (issue 13): blobs
//! and manifests kept on disk by digest ([`Store`]), and who may be served them ([`Grants`]).
//!
//! # On disk
//! ```text
//! <dir>/blobs/sha256/<64 hex>   committed content, named by its sha256, immutable
//! <dir>/tmp/<random>            a fill in progress (or an evicted file about to be unlinked)
//! ```
//! A file reaches `blobs/` only by `rename(2)` from `tmp/` after its sha256 was checked against
//! the name and the data was `fsync`ed (the directory too), so a name in `blobs/` always holds
//! that content, even after a crash. [`Store::open`] rebuilds the index from `blobs/` (size, and
//! mtime as the last use), deletes whatever is in `tmp/` (a fill cut by a crash) and any file in
//! `blobs/sha256/` whose name is not a lowercase 64-hex sha256. A path is only ever built from a
//! parsed [`Digest`] (32 bytes, printed back as hex), never from a string a client sent:
//! `sha256:../../etc` fails to parse ([`CacheError::BadDigest`]).
//!
//! # Filling: single flight, followers read the growing file
//! [`Store::fill`] makes exactly one caller per digest the [`Writer`]; whoever asks while it
//! writes becomes a [`Follower`]. The writer writes to `tmp/<random>`, hashing as it goes; a
//! follower shares its open file and reads what is written so far with positional reads
//! (`pread`), woken by a `watch` channel that carries the byte count. [`Writer::commit`]
//! writes the rest and verifies the digest, at which point the followers may read to the end;
//! then it fsyncs, renames atomically into `blobs/` and indexes the entry. A digest mismatch, an
//! abort or a dropped writer deletes the temporary file and the followers' bodies end with an
//! error (they should fetch from the upstream themselves). [`Tee`] is the usual writer: it passes an upstream body to the client frame by
//! frame and writes the same data to the cache; the last frame is released once the digest is
//! verified, without waiting for the fsync (which can take seconds for a large blob still in
//! the page cache).
//!
//! # Memory and blocking
//! Nothing holds a blob: a reader holds one chunk of at most [`CHUNK_BYTES`] (64 KiB), a fill
//! at most two batches of [`WRITE_BATCH_BYTES`] (256 KiB: one being written, one filling). A
//! 256 MiB fill plus a follower and a hit read grows the peak RSS by about 1 MiB (see the
//! tests). Disk work runs in `spawn_blocking` (tokio's `fs` feature is not enabled here, and
//! tokio's own files do the same), never on the async threads: a write that hits dirty-page
//! throttling can block for many milliseconds. Writes are batched because a thread hop per
//! 64 KiB chunk halved the throughput. Measured on the development VM (debug build of this
//! crate, optimized dependencies, 256 MiB, sha256 included; `write_paths_compared` and
//! `a_256_mib_blob_streams_with_flat_memory` in the tests): std::fs inline ~800 MB/s,
//! `spawn_blocking` per 64 KiB chunk ~250–430 MB/s, the [`Writer`] in batches ~650–830 MB/s
//! (fsync included), a [`Tee`] of 16 KiB frames ~1.1 GB/s to the client's last frame (the fsync
//! follows), a follower ~500 MB/s alongside its writer, a hit ~1.6–2.8 GB/s.
//!
//! # Eviction
//! Least recently used first ([`Store::lookup`] marks an entry used, and the mtime is refreshed
//! when a body opens it, so the order survives a restart), until the total is within
//! `max_bytes`. Eviction runs after each commit, at open, and when the last reader of an entry
//! goes while the store is over budget. An entry that has a [`Hit`] alive (a response being
//! served, or just committed) is never evicted, so while readers pin more than `max_bytes` the
//! store stays over budget until they finish. A blob larger than `max_bytes` is never stored
//! ([`Fill::TooLarge`], [`CacheError::TooLarge`]).
//!
//! # Grants
//! A client asking for digest `D` under repository `R` of an upstream is served from the cache
//! only if `D` was seen served by that upstream for `R` ([`Grants::seen`]) and the client's
//! principal holds an unexpired grant for `R` ([`Grants::may_serve_in`]). A grant is what the
//! upstream proved: it let this principal pull `R` (a token for `pull` on `R` that the upstream
//! accepted) until, at the latest, that token expires. Content-addressing says *what* the bytes
//! are, never *who* may have them: without these checks a cache would hand a private layer to
//! anyone who learnt its digest.
//!
//! # HTTP
//! [`pull`] holds the HTTP side (which requests, principals, `Range`, manifest media types, hit
//! responses); [`redirect`] follows a registry's redirect to object storage (presigned URLs)
//! so a cold fill can read the blob there; [`shared`] is the bucket replicas share behind this
//! store (`--cache-store`: leases, uploads, eviction across replicas); asking the upstream
//! whether a principal may pull
//! (`HEAD`/`GET` with its own token) is in [`crate::app`], which holds sessions and upstreams.

use std::fmt;
use std::str::FromStr;

mod fill;
mod grants;
pub mod pull;
mod read;
pub mod redirect;
pub mod shared;
mod store;
mod tee;

pub use fill::{AfterCommit, Fill, Follower, Writer, WRITE_BATCH_BYTES};
pub use grants::{Grants, DEFAULT_MAX_GRANTS, DEFAULT_MAX_SEEN};
pub use read::CacheBody;
pub use store::{Hit, Stats, Store, CHUNK_BYTES};
pub use tee::Tee;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The filesystem failed.
    #[error("cache i/o")]
    Io(#[from] std::io::Error),
    /// The content written does not hash to the digest it was filed under; nothing was stored.
    #[error("content of {digest} hashes to {got}")]
    DigestMismatch {
        /// The digest the content was filed under.
        digest: Digest,
        /// What the content hashes to.
        got: Digest,
    },
    /// Not a `sha256:<64 lowercase hex>` digest.
    #[error("bad digest: {reason}")]
    BadDigest {
        /// What is wrong (the input is not repeated: it came from a client).
        reason: &'static str,
    },
    /// The fill was given up (aborted, dropped, or its writer failed); read from the upstream.
    #[error("the cache fill was aborted")]
    Aborted,
    /// The range `start..=end` does not lie within the content.
    #[error("range {start}-{end} is not satisfiable for {len} bytes")]
    RangeNotSatisfiable {
        /// First byte asked for.
        start: u64,
        /// Last byte asked for (inclusive).
        end: u64,
        /// Length of the content.
        len: u64,
    },
    /// The content is larger than the whole cache may hold; it is not stored.
    #[error("{len} bytes do not fit in a cache of {max} bytes")]
    TooLarge {
        /// Bytes of the content (so far, when its length is not known up front).
        len: u64,
        /// The cache's `max_bytes`.
        max: u64,
    },
}

/// A validated `sha256:<64 lowercase hex>` digest: the only key of the store, and the only thing a
/// path in it is built from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>` (the OCI form; other algorithms are refused).
    pub fn parse(s: &str) -> Result<Digest, CacheError> {
        let bad = |reason| Err(CacheError::BadDigest { reason });
        let Some((algorithm, hex)) = s.split_once(':') else {
            return bad("no algorithm");
        };
        if algorithm != "sha256" {
            return bad("only sha256 is supported");
        }
        Digest::from_hex(hex).ok_or(CacheError::BadDigest {
            reason: "not 64 lowercase hex digits",
        })
    }

    /// Parses the 64 lowercase hex digits of a sha256 (a file name in `blobs/sha256/`).
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Digest(out))
    }

    /// The digest of raw sha256 output.
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits (no `sha256:` prefix).
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 0x0f)] as char);
        }
        out
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Digest, CacheError> {
        Digest::parse(s)
    }
}

#[cfg(test)]
mod tests;
