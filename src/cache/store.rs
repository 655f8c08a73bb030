//! The content-addressed store: index, lookups, single-flight fills, commits and eviction (see
//! the module docs of [`crate::cache`] for the design).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::task::JoinError;

use super::{CacheError, Digest};

/// The most a body of the cache reads from disk at once (and so holds in memory per reader).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// A content-addressed store of blobs and manifests in a directory, bounded by `max_bytes`.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Store {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) blobs: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) max_bytes: u64,
    // A std mutex (mini-redis db.rs): held to update maps and, when evicting, for a few renames;
    // never across an await.
    index: Mutex<Index>,
    pub(super) counters: Counters,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) bytes_served: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) fills: AtomicU64,
    pub(super) fill_failures: AtomicU64,
    pub(super) followers: AtomicU64,
    pub(super) digest_mismatches: AtomicU64,
}

/// Counters of a [`Store`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lookups (and fills) answered from the store.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Bytes read out of the store by hits and followers.
    pub bytes_served: u64,
    /// Entries evicted to stay within `max_bytes`.
    pub evictions: u64,
    /// Entries now.
    pub entries: u64,
    /// Bytes of the entries now.
    pub bytes: u64,
    /// Fills started (callers that became the writer).
    pub fills: u64,
    /// Fills that ended without a commit (abort, error, mismatch).
    pub fill_failures: u64,
    /// Callers that followed another caller's fill.
    pub followers: u64,
    /// Fills whose content did not hash to their digest.
    pub digest_mismatches: u64,
}

#[derive(Default)]
pub(super) struct Index {
    entries: HashMap<Digest, Entry>,
    /// Last use → digest; the first is the least recently used.
    lru: BTreeMap<u64, Digest>,
    pub(super) flights: HashMap<Digest, Flight>,
    total: u64,
    tick: u64,
}

struct Entry {
    len: u64,
    tick: u64,
    /// Live [`Hit`]s (and bodies made from them): never evicted while non-zero.
    readers: u32,
    /// Tells this entry from a later one with the same digest.
    id: u64,
}

pub(super) struct Flight {
    pub(super) id: u64,
    pub(super) progress: watch::Receiver<Progress>,
}

impl Index {
    pub(super) fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `digest` used and adds a reader: `(len, id)`.
    pub(super) fn pin(&mut self, digest: &Digest) -> Option<(u64, u64)> {
        let tick = self.next_tick();
        let entry = self.entries.get_mut(digest)?;
        self.lru.remove(&entry.tick);
        self.lru.insert(tick, *digest);
        entry.tick = tick;
        entry.readers += 1;
        Some((entry.len, entry.id))
    }

    pub(super) fn insert(&mut self, digest: Digest, len: u64, readers: u32) -> u64 {
        self.remove(&digest);
        let tick = self.next_tick();
        let entry = Entry {
            len,
            tick,
            readers,
            id: tick,
        };
        self.entries.insert(digest, entry);
        self.lru.insert(tick, digest);
        self.total += len;
        tick
    }

    fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        let entry = self.entries.remove(digest)?;
        self.lru.remove(&entry.tick);
        self.total -= entry.len;
        Some(entry)
    }

    /// Takes least recently used entries without readers out of the index until the total is
    /// within `max`.
    fn victims(&mut self, max: u64) -> Vec<Digest> {
        let mut over = self.total.saturating_sub(max);
        let mut out = Vec::new();
        for digest in self.lru.values() {
            if over == 0 {
                break;
            }
            let entry = &self.entries[digest];
            if entry.readers == 0 {
                over = over.saturating_sub(entry.len);
                out.push(*digest);
            }
        }
        for digest in &out {
            self.remove(digest);
        }
        out
    }
}

impl Inner {
    /// The index; a poisoned one is used as it is (see [`crate::lock`]).
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        crate::lock::lock(&self.index)
    }

    pub(super) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Evicts down to `max_bytes`, with the index locked. Victims are renamed into `tmp/` before
    /// the lock goes (a quick metadata operation): unlinking them later by their `blobs/` name
    /// could delete a fresh commit of the same digest. Returns the paths to unlink.
    pub(super) fn evict_locked(&self, index: &mut Index) -> Vec<PathBuf> {
        let victims = index.victims(self.max_bytes);
        let mut trash = Vec::with_capacity(victims.len());
        for digest in victims {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            let to = self.tmp.join(format!("evicted-{}", random_name()));
            match fs::rename(self.blob_path(&digest), &to) {
                Ok(()) => trash.push(to),
                Err(e) => tracing::warn!(%digest, error = %e, "cache: evicting"),
            }
            tracing::debug!(%digest, "cache: evicted");
        }
        trash
    }

    fn evict(&self) {
        let trash = self.evict_locked(&mut self.lock());
        unlink(trash);
    }

    /// A reader of entry `id` is done; evicts when the store is over budget because of it.
    fn unpin(self: &Arc<Self>, digest: &Digest, id: u64) {
        let over = {
            let mut index = self.lock();
            match index.entries.get_mut(digest) {
                Some(e) if e.id == id => e.readers -= 1,
                _ => return,
            }
            index.total > self.max_bytes
        };
        if over {
            let inner = self.clone();
            blocking_soon(move || inner.evict());
        }
    }

    /// Blocking: drops entry `id`, whose file is gone or has another length than indexed.
    pub(super) fn discard(&self, digest: &Digest, id: u64) {
        let trash = {
            let mut index = self.lock();
            if !matches!(index.entries.get(digest), Some(e) if e.id == id) {
                return;
            }
            index.remove(digest);
            let to = self.tmp.join(format!("damaged-{}", random_name()));
            fs::rename(self.blob_path(digest), &to).map(|()| to)
        };
        tracing::warn!(%digest, "cache: entry damaged or missing, dropped");
        if let Ok(to) = trash {
            unlink(vec![to]);
        }
    }
}

/// Runs blocking `work` off the async threads when a runtime is around, else right here.
pub(super) fn blocking_soon(work: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(work)),
        Err(_) => work(),
    }
}

pub(super) fn unlink(paths: Vec<PathBuf>) {
    for path in paths {
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cache: unlinking");
            }
        }
    }
}

/// A name for a temporary file: 64 bits from std's `RandomState` (randomly seeded per process)
/// over a counter and the clock. Files are created with `create_new`: a clash fails, never
/// shares a file.
pub(super) fn random_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:016x}", h.finish())
}

pub(super) fn join_error(e: JoinError) -> CacheError {
    CacheError::Io(io::Error::other(e))
}

impl Store {
    /// Opens (creating) the store in `dir`: see the module docs for what is rebuilt and
    /// cleaned. Blocking (it reads the directory): call it at startup or in `spawn_blocking`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Store> {
        let blobs = dir.join("blobs").join("sha256");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(&tmp)?;
        clean_tmp(&tmp)?;
        let mut found = scan_blobs(&blobs)?;
        found.sort_unstable();
        let mut index = Index::default();
        for (_, digest, len) in found {
            index.insert(digest, len, 0);
        }
        tracing::info!(
            dir = %dir.display(),
            entries = index.entries.len(),
            bytes = index.total,
            max_bytes,
            "cache: opened"
        );
        let inner = Arc::new(Inner {
            blobs,
            tmp,
            max_bytes,
            index: Mutex::new(index),
            counters: Counters::default(),
        });
        inner.evict();
        Ok(Store { inner })
    }

    /// The largest total the store keeps.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// The entry for `digest`, marked as just used. The entry is not evicted while the [`Hit`]
    /// (or a body made from it) is alive.
    pub fn lookup(&self, digest: &Digest) -> Option<Hit> {
        let pinned = self.inner.lock().pin(digest);
        let counters = &self.inner.counters;
        match pinned {
            Some((len, id)) => {
                counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(Hit::new(&self.inner, *digest, len, id))
            }
            None => {
                counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Counters and sizes, for metrics.
    pub fn stats(&self) -> Stats {
        let (entries, bytes) = {
            let index = self.inner.lock();
            (index.entries.len() as u64, index.total)
        };
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            bytes_served: get(&c.bytes_served),
            evictions: get(&c.evictions),
            entries,
            bytes,
            fills: get(&c.fills),
            fill_failures: get(&c.fill_failures),
            followers: get(&c.followers),
            digest_mismatches: get(&c.digest_mismatches),
        }
    }
}

/// Empties `tmp/`: fills cut by a crash, evicted files not yet unlinked. A fill's file that
/// another process holds locked is its fill in progress (two processes share the directory
/// during an upgrade in place) and stays; a crashed process's lock is gone with it. (Between
/// creating its file and locking it, a fill is unprotected for two system calls; losing that
/// race costs the fill's cache entry, never a client's body.)
fn clean_tmp(tmp: &Path) -> io::Result<()> {
    for entry in fs::read_dir(tmp)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_file() && locked_by_another(&path) {
            tracing::info!(path = %path.display(), "cache: a fill of another process, left alone");
            continue;
        }
        let removed = if kind.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(path = %path.display(), "cache: removed partial file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when another process holds `path`'s lock (its live fill, see `fill::create_tmp`).
/// Opened for writing (a write lock needs it) but never written; this process's own locks do
/// not conflict.
fn locked_by_another(path: &Path) -> bool {
    use rustix::fs::{fcntl_lock, FlockOperation};
    use rustix::io::Errno;
    let Ok(file) = fs::OpenOptions::new().write(true).open(path) else {
        return false;
    };
    match fcntl_lock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => false,
        Err(e) => e == Errno::AGAIN || e == Errno::ACCESS,
    }
}

/// The committed files of `blobs/sha256/` as (mtime, digest, len); deletes files whose name is
/// not a digest, and symlinks (regrelay never makes either).
fn scan_blobs(blobs: &Path) -> io::Result<Vec<(SystemTime, Digest, u64)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(blobs)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        let digest = entry.file_name().to_str().and_then(Digest::from_hex);
        match digest {
            _ if kind.is_dir() => {
                tracing::warn!(path = %path.display(), "cache: unexpected directory, left alone");
            }
            Some(digest) if kind.is_file() => {
                let meta = entry.metadata()?;
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, digest, meta.len()));
            }
            _ => {
                tracing::warn!(path = %path.display(), "cache: not a digest, removed");
                fs::remove_file(&path)?;
            }
        }
    }
    Ok(found)
}

/// A stored entry, kept from eviction while this (or a body made from it) lives.
#[derive(Clone)]
pub struct Hit {
    /// Its digest.
    pub digest: Digest,
    /// Its file (`blobs/sha256/<hex>`).
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
    pub(super) pin: Arc<PinGuard>,
}

/// Keeps an entry from eviction until dropped.
pub(super) struct PinGuard {
    pub(super) store: Arc<Inner>,
    pub(super) digest: Digest,
    pub(super) id: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.store.unpin(&self.digest, self.id);
    }
}

impl Hit {
    pub(super) fn new(store: &Arc<Inner>, digest: Digest, len: u64, id: u64) -> Hit {
        Hit {
            digest,
            path: store.blob_path(&digest),
            len,
            pin: Arc::new(PinGuard {
                store: store.clone(),
                digest,
                id,
            }),
        }
    }
}

/// What a fill has done so far, as its followers see it.
#[derive(Clone, Default)]
pub(super) struct Progress {
    /// The temporary file, once created.
    pub(super) file: Option<Arc<File>>,
    /// Bytes written (all of them once committed).
    pub(super) written: u64,
    pub(super) state: FlightState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum FlightState {
    #[default]
    Writing,
    /// All written and the digest checked: readers may finish (the file is being made durable
    /// and moved into `blobs/`).
    Verified,
    /// In the index.
    Stored,
    Failed(Failure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    Aborted,
    Mismatch(Digest),
}

impl Failure {
    pub(super) fn error(self, digest: Digest) -> CacheError {
        match self {
            Failure::Aborted => CacheError::Aborted,
            Failure::Mismatch(got) => CacheError::DigestMismatch { digest, got },
        }
    }
}
