//! Filling the store: one [`Writer`] per digest, [`Follower`]s reading its file as it grows,
//! and the commit (verify, fsync, rename, index, evict) or failure that ends a fill.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinError, JoinHandle};

use super::read::CacheBody;
use super::store::{
    blocking_soon, join_error, random_name, unlink, Failure, Flight, FlightState, Hit, Inner,
    Progress, Store,
};
use super::{CacheError, Digest};

/// Chunks are written in batches of about this many bytes: one blocking task per batch rather
/// than per frame (a thread hop costs about as much as writing 64 KiB to the page cache).
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;

impl Store {
    /// Starts filling `digest`, or joins the fill under way: the first caller gets the
    /// [`Writer`], callers while it writes get a [`Follower`], and a caller that comes after the
    /// commit gets the [`Hit`]. `expected_len` (the upstream's `Content-Length`) lets followers
    /// announce their length, and refuses a blob that cannot fit ([`Fill::TooLarge`]).
    pub async fn fill(
        &self,
        digest: &Digest,
        expected_len: Option<u64>,
    ) -> Result<Fill, CacheError> {
        if expected_len.is_some_and(|len| len > self.inner.max_bytes) {
            return Ok(Fill::TooLarge);
        }
        let (tx, id) = {
            let mut index = self.inner.lock();
            if let Some((len, id)) = index.pin(digest) {
                drop(index);
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Fill::Hit(Hit::new(&self.inner, *digest, len, id)));
            }
            if let Some(flight) = index.flights.get(digest) {
                let progress = flight.progress.clone();
                drop(index);
                self.inner
                    .counters
                    .followers
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Fill::Follower(Follower {
                    store: self.inner.clone(),
                    digest: *digest,
                    progress,
                    expected_len,
                }));
            }
            let (tx, progress) = watch::channel(Progress::default());
            let id = index.next_tick();
            index.flights.insert(*digest, Flight { id, progress });
            (tx, id)
        };
        self.inner.counters.fills.fetch_add(1, Ordering::Relaxed);
        // From here the flight is registered: if this future is dropped, or creating the file
        // fails, the core's Drop ends it and its followers fail.
        let mut core = Box::new(Core {
            store: self.inner.clone(),
            digest: *digest,
            id,
            tx,
            tmp: None,
            sink: None,
            pending: Vec::new(),
            pending_len: 0,
            taken: 0,
            done: false,
            after: None,
        });
        // Named before it is created, so that a Drop during the creation still deletes it.
        let path = self.inner.tmp.join(random_name());
        core.tmp = Some(path.clone());
        let file = tokio::task::spawn_blocking(move || create_tmp(&path))
            .await
            .map_err(join_error)??;
        let file = Arc::new(file);
        core.sink = Some(Sink {
            file: file.clone(),
            hasher: Sha256::new(),
            written: 0,
        });
        core.tx.send_modify(|p| p.file = Some(file));
        Ok(Fill::Writer(Writer {
            digest: *digest,
            core: Some(core),
        }))
    }
}

/// A copy of `e` for a second receiver (an i/o error keeps its kind and message).
fn copy_error(e: &CacheError) -> CacheError {
    match e {
        CacheError::Io(e) => CacheError::Io(io::Error::new(e.kind(), e.to_string())),
        CacheError::DigestMismatch { digest, got } => CacheError::DigestMismatch {
            digest: *digest,
            got: *got,
        },
        CacheError::BadDigest { reason } => CacheError::BadDigest { reason },
        CacheError::Aborted => CacheError::Aborted,
        &CacheError::RangeNotSatisfiable { start, end, len } => {
            CacheError::RangeNotSatisfiable { start, end, len }
        }
        &CacheError::TooLarge { len, max } => CacheError::TooLarge { len, max },
    }
}

/// Creates a fill's file, read-write (followers read it through the same handle). Never an
/// existing file: a name clash (64 random bits) fails this fill rather than share a file. The
/// file holds a lock (`fcntl`, this process's) while open: another process opening the same
/// directory (the one taking over in an upgrade) leaves it alone ([`super::store`]'s
/// `clean_tmp`). A record lock, not `flock`, because those belong to the process: this process
/// reopening the directory treats its own unfinished files as a crash's leftovers.
fn create_tmp(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    rustix::fs::fcntl_lock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
    Ok(file)
}

/// What [`Store::fill`] makes of a caller.
pub enum Fill {
    /// The content is already stored.
    Hit(Hit),
    /// This caller fetches from the upstream and writes (usually through a [`super::Tee`]).
    Writer(Writer),
    /// Another caller is writing: read along with [`Follower::body`].
    Follower(Follower),
    /// `expected_len` exceeds `max_bytes`: serve from the upstream without caching.
    TooLarge,
}

/// Reads along with another caller's fill.
pub struct Follower {
    store: Arc<Inner>,
    digest: Digest,
    progress: watch::Receiver<Progress>,
    expected_len: Option<u64>,
}

impl Follower {
    /// The digest being filled.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// A body of the whole content, read from the file as the writer writes it. It ends when
    /// the writer commits, and fails when the fill fails (fetch from the upstream then).
    pub fn body(self) -> CacheBody {
        CacheBody::growing(self.store, self.digest, self.progress, self.expected_len)
    }

    /// Bytes `start..=end` of the content, each sent once the writer has written it. The body
    /// fails when the fill fails (or the content ends before `end`).
    pub fn range_body(self, start: u64, end: u64) -> CacheBody {
        CacheBody::growing_range(self.store, self.digest, self.progress, start, end + 1)
    }

    /// Waits for the writer to finish: the committed entry, or why there is none.
    pub async fn finished(mut self) -> Result<Hit, CacheError> {
        let done = |p: &Progress| matches!(p.state, FlightState::Stored | FlightState::Failed(_));
        let state = match self.progress.wait_for(done).await {
            Ok(p) => p.state,
            Err(_) => return Err(CacheError::Aborted),
        };
        match state {
            FlightState::Failed(f) => Err(f.error(self.digest)),
            _ => {
                let pinned = self.store.lock().pin(&self.digest);
                let (len, id) = pinned.ok_or(CacheError::Aborted)?;
                Ok(Hit::new(&self.store, self.digest, len, id))
            }
        }
    }
}

/// The one caller filling a digest: [`Writer::write`] the content, then [`Writer::commit`].
/// Dropped without a commit, it aborts ([`Writer::abort`]).
pub struct Writer {
    digest: Digest,
    // Boxed: a `Fill` is mostly a hit or a follower.
    core: Option<Box<Core>>,
}

/// The temporary file and the running hash; moved into the blocking task of each write.
pub(super) struct Sink {
    file: Arc<File>,
    hasher: Sha256,
    written: u64,
}

impl Sink {
    /// Blocking: appends and hashes `chunks`.
    fn write(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        for chunk in chunks {
            self.file.write_all_at(chunk, self.written)?;
            self.hasher.update(chunk);
            self.written += chunk.len() as u64;
        }
        Ok(())
    }
}

/// A batch being written ([`Writer::start_flush`]).
pub(super) type WriteTask = JoinHandle<(Sink, io::Result<()>)>;

struct Core {
    store: Arc<Inner>,
    digest: Digest,
    id: u64,
    tx: watch::Sender<Progress>,
    tmp: Option<PathBuf>,
    /// `None` while a batch is being written, or after a write was cancelled (then the fill
    /// fails).
    sink: Option<Sink>,
    /// Chunks taken but not written yet (less than a batch, plus one chunk).
    pending: Vec<Bytes>,
    pending_len: usize,
    /// All bytes taken so far, written or not.
    taken: u64,
    done: bool,
    /// Runs once the entry is committed ([`Writer::after_commit`]); dropped unrun when the fill
    /// fails.
    after: Option<AfterCommit>,
}

/// What runs with the new entry once a fill is committed.
pub type AfterCommit = Box<dyn FnOnce(&Hit) + Send>;

impl Writer {
    /// The digest being filled.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Has `after` run with the entry once this fill is committed (in the commit's blocking
    /// task: hand any I/O to a runtime). A fill that fails drops it unrun, with whatever it
    /// holds.
    pub fn after_commit(&mut self, after: AfterCommit) {
        if let Some(core) = self.core.as_mut() {
            core.after = Some(after);
        }
    }

    /// Appends `chunk`. Chunks are written (and hashed) in a blocking task once a batch of
    /// [`WRITE_BATCH_BYTES`] is reached, and the rest at the commit; followers see data as
    /// batches land. Fails the fill on an error, or when the content would exceed `max_bytes`
    /// ([`CacheError::TooLarge`]). Dropping the future before it completes fails the fill too.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        self.push(chunk)?;
        if self.pending_len() >= WRITE_BATCH_BYTES {
            let task = self.start_flush()?;
            let out = task.await;
            self.finish_write(out)?;
        }
        Ok(())
    }

    /// Writes what is pending now, so followers can read it without waiting for a full batch.
    pub async fn flush(&mut self) -> Result<(), CacheError> {
        if self.pending_len() == 0 {
            return Ok(());
        }
        let task = self.start_flush()?;
        let out = task.await;
        self.finish_write(out)
    }

    /// Takes `chunk` into the pending batch (no I/O).
    pub(super) fn push(&mut self, chunk: Bytes) -> Result<(), CacheError> {
        let core = self.core.as_mut().ok_or(CacheError::Aborted)?;
        let (len, max) = (core.taken + chunk.len() as u64, core.store.max_bytes);
        if len > max {
            self.abort_inner();
            return Err(CacheError::TooLarge { len, max });
        }
        core.taken = len;
        core.pending_len += chunk.len();
        core.pending.push(chunk);
        Ok(())
    }

    /// Bytes taken and not yet being written.
    pub(super) fn pending_len(&self) -> usize {
        self.core.as_ref().map_or(0, |c| c.pending_len)
    }

    /// Starts writing the pending batch; hand the task's outcome to [`Writer::finish_write`].
    pub(super) fn start_flush(&mut self) -> Result<WriteTask, CacheError> {
        let core = self.core.as_mut().ok_or(CacheError::Aborted)?;
        let Some(mut sink) = core.sink.take() else {
            self.abort_inner();
            return Err(CacheError::Aborted);
        };
        let batch = std::mem::take(&mut core.pending);
        core.pending_len = 0;
        Ok(tokio::task::spawn_blocking(move || {
            let written = sink.write(&batch);
            (sink, written)
        }))
    }

    /// Takes back the sink of a write and tells the followers; fails the fill on an error.
    pub(super) fn finish_write(
        &mut self,
        out: Result<(Sink, io::Result<()>), JoinError>,
    ) -> Result<(), CacheError> {
        let core = self.core.as_mut().ok_or(CacheError::Aborted)?;
        let err = match out {
            Ok((sink, Ok(()))) => {
                let written = sink.written;
                core.sink = Some(sink);
                core.tx.send_modify(|p| p.written = written);
                return Ok(());
            }
            Ok((_, Err(e))) => CacheError::Io(e),
            Err(e) => join_error(e),
        };
        self.abort_inner();
        Err(err)
    }

    /// Verifies the digest, makes the file durable, moves it into `blobs/` and indexes it, then
    /// evicts to stay within `max_bytes` and lets the followers finish. On a mismatch nothing
    /// is stored, the followers fail, and [`CacheError::DigestMismatch`] is returned. The
    /// returned [`Hit`] keeps the new entry from eviction. Runs to the end even if the future
    /// is dropped.
    pub async fn commit(mut self) -> Result<Hit, CacheError> {
        let mut core = self.core.take().ok_or(CacheError::Aborted)?;
        tokio::task::spawn_blocking(move || core.commit(None))
            .await
            .map_err(join_error)?
    }

    /// Commits in a blocking task that outlives the caller; the receiver gets the outcome of
    /// the digest check, before the fsync (which can take seconds for a large blob that is
    /// still in the page cache). Failures after the check are logged.
    pub(super) fn commit_detached(mut self) -> oneshot::Receiver<Result<(), CacheError>> {
        let (tx, rx) = oneshot::channel();
        match self.core.take() {
            Some(mut core) => drop(tokio::task::spawn_blocking(move || {
                if let Err(e) = core.commit(Some(tx)) {
                    if !matches!(e, CacheError::DigestMismatch { .. }) {
                        tracing::warn!(digest = %core.digest, error = %e, "cache: commit failed");
                    }
                }
            })),
            None => drop(tx.send(Err(CacheError::Aborted))),
        }
        rx
    }

    /// Gives up the fill: the temporary file is deleted and followers fail.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        if let Some(mut core) = self.core.take() {
            core.fail(Failure::Aborted);
        }
    }
}

impl Core {
    /// Blocking: writes what is pending and checks the digest (then tells `verified`, and lets
    /// the followers finish), fsyncs, renames and indexes.
    fn commit(
        &mut self,
        verified: Option<oneshot::Sender<Result<(), CacheError>>>,
    ) -> Result<Hit, CacheError> {
        let checked = self.verify();
        if let Some(tx) = verified {
            let _ = tx.send(checked.as_ref().map(|_| ()).map_err(copy_error));
        }
        let sink = checked?;
        if let Err(e) = self.persist(&sink.file) {
            self.fail(Failure::Aborted);
            return Err(e.into());
        }
        let len = sink.written;
        let store = self.store.clone();
        let (id, trash) = {
            let mut index = store.lock();
            let id = index.insert(self.digest, len, 1);
            if index
                .flights
                .get(&self.digest)
                .is_some_and(|f| f.id == self.id)
            {
                index.flights.remove(&self.digest);
            }
            (id, store.evict_locked(&mut index))
        };
        self.done = true;
        self.tx.send_modify(|p| p.state = FlightState::Stored);
        tracing::debug!(digest = %self.digest, len, "cache: committed");
        unlink(trash);
        let hit = Hit::new(&store, self.digest, len, id);
        if let Some(after) = self.after.take() {
            after(&hit);
        }
        Ok(hit)
    }

    /// Blocking: writes what is pending and checks the digest; on success the followers may
    /// read to the end.
    fn verify(&mut self) -> Result<Sink, CacheError> {
        let Some(mut sink) = self.sink.take() else {
            self.fail(Failure::Aborted);
            return Err(CacheError::Aborted);
        };
        let pending = std::mem::take(&mut self.pending);
        if let Err(e) = sink.write(&pending) {
            self.fail(Failure::Aborted);
            return Err(e.into());
        }
        let got = Digest::from_bytes(sink.hasher.finalize_reset().into());
        if got != self.digest {
            let counters = &self.store.counters;
            counters.digest_mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(digest = %self.digest, %got, "cache: content does not match its digest");
            self.fail(Failure::Mismatch(got));
            return Err(CacheError::DigestMismatch {
                digest: self.digest,
                got,
            });
        }
        let len = sink.written;
        self.tx.send_modify(|p| {
            p.written = len;
            p.state = FlightState::Verified;
        });
        Ok(sink)
    }

    fn persist(&mut self, file: &File) -> io::Result<()> {
        file.sync_all()?;
        let tmp = self.tmp.take().ok_or(io::ErrorKind::NotFound)?;
        let to = self.store.blob_path(&self.digest);
        if let Err(e) = fs::rename(&tmp, &to) {
            self.tmp = Some(tmp);
            return Err(e);
        }
        // The rename is durable once the directory is synced; the content is already, so a
        // failure here only risks losing the entry in a crash.
        if let Err(e) = File::open(&self.store.blobs).and_then(|d| d.sync_all()) {
            tracing::warn!(error = %e, "cache: syncing the blobs directory");
        }
        Ok(())
    }

    /// Ends the fill without an entry: new callers may fill again, followers fail, and the
    /// temporary file goes.
    fn fail(&mut self, why: Failure) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        drop(self.after.take());
        {
            let mut index = self.store.lock();
            if index
                .flights
                .get(&self.digest)
                .is_some_and(|f| f.id == self.id)
            {
                index.flights.remove(&self.digest);
            }
        }
        // Followers of a verified fill have everything they need: they keep it.
        self.tx.send_if_modified(|p| {
            let verified = p.state == FlightState::Verified;
            if !verified {
                p.state = FlightState::Failed(why);
            }
            !verified
        });
        let counters = &self.store.counters;
        counters.fill_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(tmp) = self.tmp.take() {
            blocking_soon(move || unlink(vec![tmp]));
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.fail(Failure::Aborted);
    }
}
