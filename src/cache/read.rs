//! Bodies read out of the store: a committed file (a hit), or the file a writer is still
//! writing (a follower). Each read is a positional read (`pread`) in a blocking task, so readers
//! never share a file offset and never block the async threads. A follower holds one chunk of
//! at most [`CHUNK_BYTES`] at a time; a hit reads ahead, one chunk of [`HIT_CHUNK_BYTES`] read
//! while the one before it is sent (two in memory per reader).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use super::store::{join_error, FlightState, Hit, Inner, PinGuard, Progress, CHUNK_BYTES};
use super::{CacheError, Digest};

/// The chunk a hit reads from its file at once.
pub const HIT_CHUNK_BYTES: usize = 256 * 1024;

type Next = Pin<Box<dyn Future<Output = (Reader, Option<Result<Bytes, CacheError>>)> + Send>>;

/// A body read from the store (see [`super::Hit::body`] and [`super::Follower::body`]). Its
/// error is a [`CacheError`]; box it into a `ProxyBody` with
/// `body.map_err(Into::into).boxed_unsync()`.
pub struct CacheBody {
    /// A committed file (a hit), read ahead.
    fixed: Option<Fixed>,
    reader: Option<Reader>,
    next: Option<Next>,
    /// Bytes still to come, when known.
    remaining: Option<u64>,
}

struct Reader {
    store: Arc<Inner>,
    digest: Digest,
    /// `None` until the writer has created it (a follower that came very early).
    file: Option<Arc<File>>,
    pos: u64,
    /// One past the last byte to read; `None` while the writer may still write.
    end: Option<u64>,
    /// One past the last byte asked for (a range), whatever the writer writes beyond it.
    limit: Option<u64>,
    /// The fill being followed, until it commits.
    progress: Option<watch::Receiver<Progress>>,
}

impl CacheBody {
    /// Bytes `start..end` of a committed file.
    pub(super) fn fixed(
        store: Arc<Inner>,
        file: Arc<File>,
        start: u64,
        end: u64,
        pin: Arc<PinGuard>,
    ) -> CacheBody {
        CacheBody {
            fixed: Some(Fixed {
                store,
                file,
                pos: start,
                end,
                inflight: None,
                _pin: pin,
            }),
            reader: None,
            next: None,
            remaining: Some(end - start),
        }
    }

    /// The whole content of a fill under way.
    pub(super) fn growing(
        store: Arc<Inner>,
        digest: Digest,
        progress: watch::Receiver<Progress>,
        expected_len: Option<u64>,
    ) -> CacheBody {
        CacheBody::following(store, digest, progress, 0, None, expected_len)
    }

    /// Bytes `start..end` of a fill under way: each is sent once the writer has written it
    /// (a range beyond what is filled waits for it).
    pub(super) fn growing_range(
        store: Arc<Inner>,
        digest: Digest,
        progress: watch::Receiver<Progress>,
        start: u64,
        end: u64,
    ) -> CacheBody {
        CacheBody::following(store, digest, progress, start, Some(end), Some(end - start))
    }

    /// A follower of the fill of `digest` from byte `pos`, to `limit` or the end.
    fn following(
        store: Arc<Inner>,
        digest: Digest,
        progress: watch::Receiver<Progress>,
        pos: u64,
        limit: Option<u64>,
        remaining: Option<u64>,
    ) -> CacheBody {
        CacheBody {
            fixed: None,
            reader: Some(Reader {
                store,
                digest,
                file: None,
                pos,
                end: None,
                limit,
                progress: Some(progress),
            }),
            next: None,
            remaining,
        }
    }
}

/// A committed file read in chunks of [`HIT_CHUNK_BYTES`], the next chunk's read started as
/// soon as the one before it is handed on (the disk and the socket work at once).
struct Fixed {
    store: Arc<Inner>,
    file: Arc<File>,
    /// The first byte not yet asked for.
    pos: u64,
    end: u64,
    inflight: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
    _pin: Arc<PinGuard>,
}

impl Fixed {
    /// Starts reading the next chunk, unless one is being read or none is left.
    fn read_ahead(&mut self) {
        if self.inflight.is_some() || self.pos >= self.end {
            return;
        }
        let n = (self.end - self.pos).min(HIT_CHUNK_BYTES as u64) as usize;
        self.inflight = Some(pread(self.file.clone(), self.pos, n));
        self.pos += n as u64;
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, CacheError>>> {
        self.read_ahead();
        let Some(reading) = self.inflight.as_mut() else {
            return Poll::Ready(None);
        };
        let read = ready!(Pin::new(reading).poll(cx));
        self.inflight = None;
        match read.map_err(io::Error::other).and_then(|r| r) {
            Ok(data) => {
                served(&self.store, &data);
                self.read_ahead();
                Poll::Ready(Some(Ok(data)))
            }
            Err(e) => {
                self.pos = self.end;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inflight.is_none() && self.pos >= self.end
    }
}

impl Reader {
    async fn next(mut self) -> (Reader, Option<Result<Bytes, CacheError>>) {
        let out = self.read_chunk().await.transpose();
        (self, out)
    }

    /// Bytes available to read: the end of a committed file, or what the writer wrote so far
    /// (waiting while that is nothing new).
    async fn available(&mut self) -> Result<u64, CacheError> {
        loop {
            if let Some(end) = self.end {
                return Ok(end);
            }
            let rx = self
                .progress
                .as_mut()
                .expect("a growing read follows a fill");
            let p = rx.borrow_and_update().clone();
            if self.file.is_none() {
                self.file = p.file;
            }
            match p.state {
                FlightState::Verified | FlightState::Stored => {
                    self.end = Some(p.written);
                    self.progress = None;
                }
                FlightState::Failed(why) => return Err(why.error(self.digest)),
                FlightState::Writing if p.written > self.pos => return Ok(p.written),
                FlightState::Writing => {
                    if rx.changed().await.is_err() {
                        return Err(CacheError::Aborted);
                    }
                }
            }
        }
    }

    async fn read_chunk(&mut self) -> Result<Option<Bytes>, CacheError> {
        if self.limit.is_some_and(|limit| self.pos >= limit) {
            return Ok(None);
        }
        let mut available = self.available().await?;
        if let Some(limit) = self.limit {
            available = available.min(limit);
        }
        if self.pos >= available {
            // The content ended before the range did: the body is cut short, never padded.
            return match self.limit {
                Some(_) => Err(CacheError::Aborted),
                None => Ok(None),
            };
        }
        let n = (available - self.pos).min(CHUNK_BYTES as u64) as usize;
        let file = self.file.clone().ok_or(CacheError::Aborted)?;
        let data = pread(file, self.pos, n).await.map_err(io::Error::other)??;
        self.pos += n as u64;
        served(&self.store, &data);
        Ok(Some(data))
    }
}

/// Reads `n` bytes at `pos` of `file` in a blocking task.
fn pread(file: Arc<File>, pos: u64, n: usize) -> tokio::task::JoinHandle<io::Result<Bytes>> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
    })
}

/// Counts `data` as served from the store.
fn served(store: &Inner, data: &Bytes) {
    let counters = &store.counters;
    counters
        .bytes_served
        .fetch_add(data.len() as u64, Ordering::Relaxed);
}

impl Body for CacheBody {
    type Data = Bytes;
    type Error = CacheError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, CacheError>>> {
        let this = &mut *self;
        if let Some(fixed) = this.fixed.as_mut() {
            let item = ready!(fixed.poll_chunk(cx));
            if let (Some(Ok(data)), Some(r)) = (&item, this.remaining.as_mut()) {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(item.map(|r| r.map(Frame::data)));
        }
        if this.next.is_none() {
            let Some(reader) = this.reader.take() else {
                return Poll::Ready(None);
            };
            this.next = Some(Box::pin(reader.next()));
        }
        let next = this.next.as_mut().expect("a read in flight");
        let (reader, item) = ready!(next.as_mut().poll(cx));
        this.next = None;
        match item {
            Some(Ok(data)) => {
                this.reader = Some(reader);
                if let Some(r) = this.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(fixed) = &self.fixed {
            return fixed.is_end_stream();
        }
        let idle = self.next.is_none();
        let fixed_done = self
            .reader
            .as_ref()
            .is_some_and(|r| r.end == Some(r.pos) || r.limit == Some(r.pos));
        idle && (self.reader.is_none() || fixed_done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Hit {
    /// A body streaming the content, or bytes `start..=end` of it, from the file in chunks of
    /// [`HIT_CHUNK_BYTES`], read ahead. Opens the file now, so a missing or damaged file is an error here (the
    /// entry is then dropped: serve from the upstream), not in the middle of the body.
    pub async fn body(&self, range: Option<(u64, u64)>) -> Result<CacheBody, CacheError> {
        let (start, end) = match range {
            None => (0, self.len),
            Some((start, end)) if start <= end && end < self.len => (start, end + 1),
            Some((start, end)) => {
                return Err(CacheError::RangeNotSatisfiable {
                    start,
                    end,
                    len: self.len,
                })
            }
        };
        let (path, len, pin) = (self.path.clone(), self.len, self.pin.clone());
        let file = tokio::task::spawn_blocking(move || {
            let opened = open_checked(&path, len);
            if let Err(e) = &opened {
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) {
                    pin.store.discard(&pin.digest, pin.id);
                }
            }
            opened
        })
        .await
        .map_err(join_error)??;
        let store = self.pin.store.clone();
        Ok(CacheBody::fixed(
            store,
            Arc::new(file),
            start,
            end,
            self.pin.clone(),
        ))
    }
}

/// Opens a committed file, checks its length, and records the use in its mtime (so the LRU
/// order survives a restart; best effort).
fn open_checked(path: &Path, len: u64) -> io::Result<File> {
    let file = File::open(path)?;
    let actual = file.metadata()?.len();
    if actual != len {
        let msg = format!("cache file has {actual} bytes, the index {len}");
        return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
    }
    let _ = file.set_modified(SystemTime::now());
    Ok(file)
}
