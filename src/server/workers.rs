//! Thread-per-core: the threads that serve connections, each on a current-thread runtime of its
//! own (`--workers`, one per CPU by default), as nginx and HAProxy run one event loop per core.
//! The accept loop stays on the process's runtime; each accepted connection moves to the
//! worker with the fewest open connections and lives there, with every request's task on it
//! (hyper spawns HTTP/2 streams on the connection's runtime, and a request's own tasks join
//! them), so a request never crosses threads and no work-stealing queue is shared.
//!
//! A connection's socket is registered with its worker's reactor ([`TcpStream::into_std`] off
//! the accepting runtime, `from_std` on the worker). Shared state (semaphores, the app, the
//! cache, the clients' shares) stays shared: the workers are threads of one process.
//!
//! Without workers ([`Workers::here`]), connections run on the accepting runtime: an embedding
//! that drives regrelay on its own current-thread runtime (a paused clock) keeps everything
//! there.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// What a worker thread runs when it starts and when it ends (an embedding's logging and panic
/// bookkeeping: threads it did not make still report to it).
pub type ThreadHook = Arc<dyn Fn() + Send + Sync>;

/// How long a worker's runtime waits at its end for blocking work (cache file reads).
const WORKER_SHUTDOWN: Duration = Duration::from_secs(2);

/// One worker thread.
struct Worker {
    runtime: Handle,
    /// Connections it serves now.
    open: Arc<AtomicUsize>,
    /// Dropped to end the worker.
    end: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The threads that serve connections; dropping them (or [`Workers::stop`]) ends their
/// runtimes, and with them any connection still open.
pub struct Workers {
    workers: Vec<Worker>,
    /// Where the search for the least loaded worker starts (ties go round).
    next: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.workers.len())
            .finish()
    }
}

impl Workers {
    /// Starts `count` worker threads named `regrelay-w{i}`, each with a current-thread runtime;
    /// `start` and `stop` run on each thread at its start and end, and on each thread of the
    /// runtimes' blocking pools (cache file work) too. A `count` of 0 starts none: [`Workers::here`].
    pub fn start(
        count: usize,
        start: Option<ThreadHook>,
        stop: Option<ThreadHook>,
    ) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder
                .enable_all()
                .thread_name(format!("regrelay-w{i}-blocking"));
            if let Some(start) = start.clone() {
                builder.on_thread_start(move || start());
            }
            if let Some(stop) = stop.clone() {
                builder.on_thread_stop(move || stop());
            }
            let runtime = builder.build()?;
            let handle = runtime.handle().clone();
            let (end, ended) = oneshot::channel::<()>();
            let (start, stop) = (start.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("regrelay-w{i}"))
                .spawn(move || {
                    crate::upstream::on_worker(i);
                    if let Some(start) = &start {
                        start();
                    }
                    let _ = runtime.block_on(ended);
                    runtime.shutdown_timeout(WORKER_SHUTDOWN);
                    if let Some(stop) = &stop {
                        stop();
                    }
                })?;
            workers.push(Worker {
                runtime: handle,
                open: Arc::new(AtomicUsize::new(0)),
                end: Some(end),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// No worker threads: connections run on the runtime that accepts them.
    pub fn here() -> Workers {
        Workers {
            workers: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }

    /// Each worker's count of the connections it serves (for the metrics).
    pub fn counts(&self) -> Vec<Arc<AtomicUsize>> {
        self.workers.iter().map(|w| w.open.clone()).collect()
    }

    /// Runs `serve(stream)` for an accepted connection on the worker with the fewest open
    /// connections (or here, without workers).
    pub(super) fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self.least_loaded() else {
            tokio::spawn(serve(stream));
            return;
        };
        // Off this runtime's reactor, onto the worker's (on the worker's thread).
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => return tracing::debug!(error = %e, "accepted socket lost; closed"),
        };
        let open = worker.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        worker.runtime.spawn(async move {
            let _open = Open(open);
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "cannot register a connection; closed"),
            }
        });
    }

    fn least_loaded(&self) -> Option<&Worker> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &self.workers[(first + i) % n])
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
    }

    /// Ends every worker (their open connections with them) and waits for their threads.
    pub async fn stop(mut self) {
        let threads: Vec<_> = self.end_all();
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }

    fn end_all(&mut self) -> Vec<JoinHandle<()>> {
        self.workers
            .iter_mut()
            .filter_map(|w| {
                drop(w.end.take());
                w.thread.take()
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined here: a drop may run on a runtime thread.
        self.end_all();
    }
}

/// A worker's count of open connections, for as long as one lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted connections go to the worker with the fewest, each worker's connections run on
    /// that worker's own thread, and a worker busy with one connection does not hold up another
    /// worker's.
    #[tokio::test]
    async fn connections_spread_over_workers_and_one_busy_worker_stalls_no_other() {
        let workers = Workers::start(2, None, None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (names_tx, mut names) = tokio::sync::mpsc::unbounded_channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let release = Arc::new(std::sync::Mutex::new(release));
        let _clients: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        for i in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            let names_tx = names_tx.clone();
            let release = release.clone();
            workers.spawn(stream, move |_stream| async move {
                let name = std::thread::current().name().unwrap().to_owned();
                names_tx.send(name).unwrap();
                if i == 0 {
                    // Blocks its worker's thread outright, as CPU-bound work would.
                    let _ = release.lock().unwrap().recv();
                }
                std::future::pending::<()>().await;
            });
        }
        let first = names.recv().await.unwrap();
        // The second connection went to the other worker and runs while the first blocks.
        let second = tokio::time::timeout(Duration::from_secs(10), names.recv())
            .await
            .expect("the second worker served while the first was blocked")
            .unwrap();
        assert!(second.starts_with("regrelay-w"), "{second}");
        assert_ne!(first, second, "both connections on one worker");
        let open: Vec<_> = workers
            .counts()
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        assert_eq!(open, vec![1, 1]);
        release_tx.send(()).unwrap();
        workers.stop().await;
    }
}
